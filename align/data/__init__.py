"""Preference data, the synthetic world and video I/O."""
