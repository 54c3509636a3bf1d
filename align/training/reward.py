"""Training the reward model on a preference dataset: ``vidalign reward train`` and the demo.

:mod:`reward_models` trains and evaluates CLIP-based reward models on decoded pairs
(:class:`reward_models.train.PairData`) and reads no dataset format itself (it imports nothing
from ``align``). This module is the one place that turns a vidalign preference dataset (any
layout :func:`align.data.preference.load_preference_dataset` reads, every row checked) into
those pairs, and passes that loader to the trainer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from align.data.checks import validate_rows
from align.data.preference import ASPECT_PREFIX, PreferenceDataError, load_preference_dataset
from reward_models.train import PREF_TO_TARGET, PairData, RewardTrainConfig
from reward_models.train import train_reward_model as train_on_pairs


def load_pairs(path: str, bad_rows: str = "error") -> PairData:
    """All usable rows of a preference dataset, ties included (target 0.5), with per-aspect
    targets from its ``preference_<aspect>`` columns; bad rows raise or are counted."""
    ds = load_preference_dataset(path)
    problems, decoded = validate_rows(ds, path, root=path)
    if problems and bad_rows == "error":
        raise PreferenceDataError(path, problems)
    aspect_cols = [c for c in ds.column_names if c.startswith(ASPECT_PREFIX)]
    keep = [i for i, d in enumerate(decoded) if d is not None]
    if not keep:
        raise ValueError(f"{path}: no usable rows")
    prefs = ds["preference"]
    aspects = {}
    for c in aspect_cols:
        vals = list(ds[c])
        bad = [i for i in keep if vals[i] not in PREF_TO_TARGET]
        if bad:
            raise ValueError(f"{path}: column {c}: row {bad[0]} has {vals[bad[0]]!r}, not one of a|b|tie")
        aspects[c.removeprefix(ASPECT_PREFIX)] = np.array([PREF_TO_TARGET[vals[i]] for i in keep], np.float32)
    prompts = list(ds["prompt"])
    return PairData(
        prompts=[str(prompts[i]) for i in keep],
        video_a=np.stack([decoded[i][0] for i in keep]),
        video_b=np.stack([decoded[i][1] for i in keep]),
        target=np.array([PREF_TO_TARGET[prefs[i]] for i in keep], np.float32),
        aspects=aspects,
        skipped=len(decoded) - len(keep),
    )


def train_reward_model(cfg: RewardTrainConfig) -> Path:
    """Train a reward model on the preference dataset ``cfg.dataset`` (read by :func:`load_pairs`);
    returns the run directory (:func:`reward_models.train.train_reward_model`)."""
    return train_on_pairs(cfg, load_pairs)
