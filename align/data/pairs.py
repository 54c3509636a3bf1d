"""Preference pairs, both ways: a dataset's rows as chosen/rejected videos (:func:`to_pairs`,
what DPO trains on), and scored groups of samples as a preference dataset
(:func:`pairs_from_groups`, what ``data pairs`` and the demo write).

``to_pairs`` validates every row (:func:`align.data.checks.validate_rows`); ``bad_rows``
says whether a bad row raises or is skipped and counted, and ties are always skipped and
counted (DPO cannot use them), never dropped silently.

``pairs_from_groups``: for each prompt a group of ``k`` samples scored by a judge (any
``score(videos, prompts)``, e.g. ``align.judges.combined_score`` of the ``--judge`` specs:
RLAIF-style labelling); the best and the worst form a pair (best-of-n vs worst-of-n, as in
on-policy preference pipelines), or every pair within the group. A pair whose scores differ by
less than ``tie_margin`` (in the judge's units) is labelled a tie. The a/b order is randomised
so that "a" carries no bias.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from align.data.checks import validate_rows
from align.data.preference import PreferenceDataError

# --------------------------------------------------------------------------------------------
# a dataset's rows as chosen / rejected videos


@dataclass
class Pairs:
    """Chosen/rejected videos ready for DPO, with what was skipped and why."""

    prompts: list[str]
    chosen: np.ndarray  # uint8 (N, T, H, W, C)
    rejected: np.ndarray
    rows: list[int]  # source row of each pair
    skipped: dict[str, int] = field(default_factory=dict)


def to_pairs(
    ds,
    source: str = "dataset",
    root: str | Path | None = None,
    bad_rows: str = "error",
    *,
    allow_absolute_paths: bool = False,
    min_frames: int = 1,
    target: dict | None = None,
) -> Pairs:
    """Validated chosen/rejected pairs. ``bad_rows``: ``error`` raises listing every bad row,
    ``skip`` skips and counts them. Ties are always skipped and counted.

    ``target`` (``num_frames``, ``height``, ``width``, ``fps``: the model's input) resamples
    every video as it is decoded (timestamps at ``fps``, resize + centre crop), so videos of any
    size, fps and length become one shape; a video too short for it is a bad row. Without a
    target all usable videos must already share one shape (else a ``ValueError`` listing the
    shapes, asking for a target)."""
    if bad_rows not in ("error", "skip"):
        raise ValueError(f"bad_rows must be 'error' or 'skip', got {bad_rows!r}")
    if len(ds) == 0:
        raise ValueError(f"{source}: the preference dataset is empty")
    problems, decoded = validate_rows(
        ds, source, root, allow_absolute_paths=allow_absolute_paths, min_frames=min_frames, target=target
    )
    if problems and bad_rows == "error":
        raise PreferenceDataError(source, problems)
    prompts, chosen, rejected, rows = [], [], [], []
    skipped = {"bad_row": len({r for r, _ in problems}), "tie": 0}
    all_prompts = ds["prompt"]
    for i, (pref, vids) in enumerate(zip(ds["preference"], decoded)):
        if vids is None:
            continue
        if pref == "tie":
            skipped["tie"] += 1
            continue
        va, vb = vids
        w, l = (va, vb) if pref == "a" else (vb, va)
        prompts.append(str(all_prompts[i]))
        chosen.append(w)
        rejected.append(l)
        rows.append(i)
    if not prompts:
        raise ValueError(f"{source}: no usable pairs (skipped: {skipped})")
    shapes: dict[tuple, int] = {}
    for r, v in zip(rows + rows, chosen + rejected):
        shapes.setdefault(tuple(v.shape), r)
    if len(shapes) > 1:
        listed = ", ".join(f"{s} (first in row {r})" for s, r in list(shapes.items())[:5])
        raise ValueError(
            f"{source}: videos of {len(shapes)} shapes ({listed}); pass the model's input as the target "
            f"(num_frames, height, width, fps) to resample them to one"
        )
    return Pairs(prompts, np.stack(chosen), np.stack(rejected), rows, skipped)


# --------------------------------------------------------------------------------------------
# scored groups of samples as a preference dataset


def _dataset(rows: dict, shape):
    """The schema's dataset; ``shape`` None: videos are file paths (relative to the dataset dir)."""
    import datasets

    video = datasets.Value("string") if shape is None else datasets.Array4D(tuple(shape), "uint8")
    features = datasets.Features(
        {
            "prompt": datasets.Value("string"),
            "video_a": video,
            "video_b": video,
            "preference": datasets.Value("string"),
            "score_a": datasets.Value("float32"),
            "score_b": datasets.Value("float32"),
        }
    )
    return datasets.Dataset.from_dict(rows, features=features)


def pairs_from_groups(
    prompts: list[str],
    videos: np.ndarray,
    totals: np.ndarray,
    which: str = "best_worst",
    tie_margin: float = 0.01,
    seed: int = 0,
):
    """A preference dataset from scored groups: ``best_worst`` (one pair per group, as DPO
    uses) or ``all`` (every pair within a group: k(k-1)/2, as a reward model can use).
    The a/b order is randomised; ties are labelled, not dropped. ``videos``: a uint8 array
    ``(N*k, T, H, W, C)``, or a list of file paths (stored as such, relative to the dataset)."""
    n, k = totals.shape
    rng = np.random.default_rng(seed)
    rows: dict[str, list] = {c: [] for c in ("prompt", "video_a", "video_b", "preference", "score_a", "score_b")}
    for i in range(n):
        if which == "best_worst":
            best, worst = int(totals[i].argmax()), int(totals[i].argmin())
            cand = [(best, worst if worst != best else (best + 1) % k)]
        elif which == "all":
            cand = list(itertools.combinations(range(k), 2))
        else:
            raise ValueError(f"which must be 'best_worst' or 'all', got {which!r}")
        for x, y in cand:
            a, b = (x, y) if rng.random() < 0.5 else (y, x)
            sa, sb = float(totals[i, a]), float(totals[i, b])
            rows["prompt"].append(prompts[i * k])
            rows["video_a"].append(videos[i * k + a])
            rows["video_b"].append(videos[i * k + b])
            rows["preference"].append("tie" if abs(sa - sb) < tie_margin else ("a" if sa > sb else "b"))
            rows["score_a"].append(sa)
            rows["score_b"].append(sb)
    return _dataset(rows, None if isinstance(videos, list) else videos.shape[1:])
