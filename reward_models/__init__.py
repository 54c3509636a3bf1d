"""CLIP-based video reward models: ``model.py`` (``VideoRewardModel`` on an open_clip backbone,
``RewardEnsemble``, ``bt_loss``), ``train.py`` (Bradley-Terry training with ties, evaluation,
contrastive backbone pretraining) and ``distort.py`` (distortions as pretraining negatives)."""
