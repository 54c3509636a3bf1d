"""Scored samples: the data of reward-weighted regression.

Schema (a ``datasets.Dataset`` saved with ``save_to_disk``):
    prompt: str
    video: a decoded ``uint8 (T, H, W, C)`` array, or a path relative to the dataset directory
    reward: float (from a reward model, or any scorer)
    group: int, optional -- samples compared with each other (default: same prompt = same group)

``vidalign data samples --model M --reward-model R --out D`` writes one from a generator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


@dataclass
class ScoredSamples:
    prompts: list[str]
    videos: np.ndarray  # uint8 (N, T, H, W, C)
    rewards: np.ndarray  # (N,)
    groups: np.ndarray  # (N,) int
    skipped: dict = field(default_factory=dict)


def scored_samples_dataset(prompts: list[str], videos: np.ndarray, rewards, groups=None):
    """A ``datasets.Dataset`` of scored samples: ``videos`` a uint8 array ``(N, T, H, W, C)``
    (stored as arrays) or a list of file paths relative to the dataset directory."""
    import datasets

    if not prompts:
        raise ValueError("scored_samples_dataset: empty prompt list")
    if not (len(prompts) == len(videos) == len(rewards)):
        raise ValueError(
            f"scored_samples_dataset: {len(prompts)} prompts, {len(videos)} videos, {len(rewards)} rewards"
        )
    paths = isinstance(videos, list) and all(isinstance(v, str) for v in videos)
    video = datasets.Value("string") if paths else datasets.Array4D(tuple(videos.shape[1:]), "uint8")
    cols = {"prompt": list(prompts), "video": list(videos), "reward": [float(r) for r in rewards]}
    feats = {
        "prompt": datasets.Value("string"),
        "video": video,
        "reward": datasets.Value("float32"),
    }
    if groups is not None:
        cols["group"] = [int(g) for g in groups]
        feats["group"] = datasets.Value("int64")
    return datasets.Dataset.from_dict(cols, features=datasets.Features(feats))


def load_scored_samples(path: str, bad_rows: str = "error") -> ScoredSamples:
    """Load and validate; every bad row is named (empty prompt, missing/NaN reward,
    unreadable or mis-shaped video) and raises, or is skipped and counted."""
    import datasets

    from align.data.preference import PreferenceDataError, load_video_value

    try:
        ds = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise FileNotFoundError(f"scored samples {path}: no such dataset directory") from None
    missing = [c for c in ("prompt", "video", "reward") if c not in ds.column_names]
    if missing:
        raise ValueError(f"{path}: missing required column(s) {missing}; has {ds.column_names}")
    problems, keep, videos = [], [], []
    shape = None
    for i, row in enumerate(ds.with_format("numpy")):
        msgs = []
        if not str(row["prompt"]).strip():
            msgs.append("empty prompt")
        r = row["reward"]
        if r is None or not math.isfinite(float(r)):
            msgs.append(f"reward {r!r} is not a finite number")
        try:
            v = load_video_value(row["video"], root=path)
            if shape is not None and v.shape != shape:
                msgs.append(f"video shape {v.shape} differs from earlier rows {shape}")
            shape = shape or v.shape
        except (ValueError, FileNotFoundError, OSError) as e:
            msgs.append(f"video: {e}")
        problems += [(i, m) for m in msgs]
        if not msgs:
            keep.append(i)
            videos.append(v)
    if problems and bad_rows == "error":
        raise PreferenceDataError(str(path), problems)
    if not keep:
        raise ValueError(f"{path}: no usable samples")
    prompts = [str(p) for p in ds["prompt"]]
    if "group" in ds.column_names:
        groups = np.array([int(g) for g in ds["group"]])[keep]
    else:
        index = {p: j for j, p in enumerate(dict.fromkeys(prompts))}
        groups = np.array([index[p] for p in prompts])[keep]
    rewards = np.array([float(r) for r in ds["reward"]], dtype=np.float32)[keep]
    return ScoredSamples(
        [prompts[i] for i in keep], np.stack(videos), rewards, groups, {"bad_row": len(ds) - len(keep)}
    )
