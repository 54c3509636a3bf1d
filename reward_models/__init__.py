"""CLIP-based video reward models: ``model.py`` (``VideoRewardModel`` on an open_clip backbone,
``bt_loss``) and ``train.py`` (Bradley-Terry training with ties, evaluation, contrastive
backbone pretraining)."""
