"""The preference-data schema, its validation, and turning rows into training pairs.

Schema (a ``datasets.Dataset``):
    prompt: str
    video_a, video_b: a file path (relative to the dataset directory, or absolute) or a
        decoded ``uint8 (T, H, W, C)`` array
    preference: "a" | "b" | "tie"
    optional: score_a, score_b (floats), per-aspect labels, provenance columns.

Every problem is reported with its row index (and file, where there is one). DPO cannot
use ties; they are skipped and counted, never dropped silently.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REQUIRED_COLUMNS = ("prompt", "video_a", "video_b", "preference")
PREFERENCES = ("a", "b", "tie")


class PreferenceDataError(ValueError):
    """A preference dataset with problems; ``problems`` lists ``(row, message)``."""

    def __init__(self, source: str, problems: list[tuple[int, str]]):
        self.problems = problems
        shown = "\n".join(f"  row {r}: {m}" for r, m in problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        super().__init__(f"{source}: {len(problems)} bad row(s)\n{shown}{more}")


@dataclass
class Pairs:
    """Chosen/rejected videos ready for DPO, with what was skipped and why."""

    prompts: list[str]
    chosen: np.ndarray  # uint8 (N, T, H, W, C)
    rejected: np.ndarray
    rows: list[int]  # source row of each pair
    skipped: dict[str, int] = field(default_factory=dict)


def load_preference_dataset(path: str | Path):
    """Load a dataset written by ``datasets.Dataset.save_to_disk`` and check its columns."""
    import datasets

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"preference dataset {path}: no such directory")
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets raises several types for a wrong directory
        raise ValueError(f"{path}: not a dataset saved with save_to_disk ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise ValueError(f"{path}: a DatasetDict without a 'train' split ({list(ds)})")
        ds = ds["train"]
    check_columns(ds.column_names, str(path))
    return ds


def check_columns(columns: list[str], source: str) -> None:
    """Raise naming every missing required column."""
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise ValueError(f"{source}: missing required column(s) {missing}; has {columns}")


def _load_video(value, root: Path | None, row: int, column: str) -> np.ndarray:
    """A row's video as uint8 ``(T, H, W, C)``: decode a path or convert an array."""
    if isinstance(value, str):
        from align.data.video import read_video

        p = Path(value)
        if not p.is_absolute() and root is not None:
            p = root / p
        return read_video(p)
    arr = np.asarray(value)
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"{column} must be (T, H, W, 3), got shape {arr.shape}")
    if arr.dtype != np.uint8:
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    return arr


def validate_rows(ds, source: str = "dataset", root: str | Path | None = None) -> tuple[list[tuple[int, str]], list]:
    """Check every row; return ``(problems, decoded)`` where decoded[i] = (va, vb) or None."""
    root = Path(root) if root is not None else None
    problems: list[tuple[int, str]] = []
    decoded: list = []
    shape = None
    for i, row in enumerate(ds.with_format("numpy")):
        msgs = []
        prompt = row["prompt"]
        if not isinstance(prompt, str) or not prompt.strip():
            msgs.append("empty prompt")
        pref = row["preference"]
        pref = str(pref) if isinstance(pref, str) else pref  # numpy format yields np.str_
        if pref not in PREFERENCES:
            msgs.append(f"preference {pref!r} is not one of {PREFERENCES}")
        videos = []
        for col in ("video_a", "video_b"):
            try:
                videos.append(_load_video(row[col], root, i, col))
            except (ValueError, FileNotFoundError, OSError) as e:
                msgs.append(f"{col}: {e}")
        if len(videos) == 2:
            va, vb = videos
            if va.shape != vb.shape:
                msgs.append(f"video_a {va.shape} and video_b {vb.shape} differ in shape")
            elif np.array_equal(va, vb):
                msgs.append("video_a and video_b are identical (chosen == rejected)")
            elif shape is not None and va.shape != shape:
                msgs.append(f"video shape {va.shape} differs from earlier rows {shape}")
            shape = shape or va.shape
        problems += [(i, m) for m in msgs]
        decoded.append(None if msgs else (videos[0], videos[1]))
    return problems, decoded


def to_pairs(ds, source: str = "dataset", root: str | Path | None = None, bad_rows: str = "error") -> Pairs:
    """Validated chosen/rejected pairs. ``bad_rows``: ``error`` raises listing every bad row,
    ``skip`` skips and counts them. Ties are always skipped and counted."""
    if bad_rows not in ("error", "skip"):
        raise ValueError(f"bad_rows must be 'error' or 'skip', got {bad_rows!r}")
    if len(ds) == 0:
        raise ValueError(f"{source}: the preference dataset is empty")
    problems, decoded = validate_rows(ds, source, root)
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
    return Pairs(prompts, np.stack(chosen), np.stack(rejected), rows, skipped)
