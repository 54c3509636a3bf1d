"""CLIP-based video reward models (scoring, Bradley-Terry training, accuracy).

Planned in the reward-model issue; nothing here yet.
"""
