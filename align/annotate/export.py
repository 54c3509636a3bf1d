"""Labels out of the annotation database, as a preference dataset in the project's schema.

Two modes:

- ``majority``: one row per pair with at least ``min_labels`` labels. The preference is the
  outcome with the most votes; when the top count is shared (e.g. one ``a``, one ``b``) the row
  is a ``tie``: the annotators could not tell the videos apart as a group. The vote counts are
  kept (``votes_a``, ``votes_b``, ``votes_tie``) so a user can filter on agreement instead.
  Each aspect (``preference_<aspect>``, the schema's per-aspect columns) is decided the same
  way among the labels that gave it (empty if none did).
- ``all``: one row per label, with its annotator, the side video a was shown on
  (``shown_left``), the comment and the time. A pair labelled by three annotators appears three
  times: the schema's validation keys duplicates by the ``annotator`` column too, so these rows
  are votes, not duplicates, and DPO or a reward model trains on each (a pair labelled alike
  by all weighs more than a split one; ``majority`` gives every pair one row instead).

Video files are copied (``videos="copy"``), hard-linked (``"hardlink"``: no bytes copied; a copy
across filesystems) or symlinked (``"symlink"``: the links leave ``OUT``, so loading the export
needs ``allow_absolute_paths``, as every symlink out of a dataset root does) into ``OUT/videos/``
and named relative to ``OUT``, the dataset root, as the schema wants. Pairs whose videos were
arrays or embedded bytes in the source dataset get those values from it (it must still be at
the recorded path). The directory is written under a temporary name and renamed, so a failed
export leaves nothing at ``OUT``.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
from collections import Counter, defaultdict
from datetime import datetime, timezone
from pathlib import Path

from align.annotate.stats import CATEGORIES
from align.annotate.storage import ASPECTS, LabelStore
from align.atomic import atomic_directory

MODES = ("majority", "all")
VIDEO_MODES = ("copy", "hardlink", "symlink")
ASPECT_PREFIX = "preference_"  # the schema's per-aspect label columns (align.data.preference)


def export_dataset(
    db: str | Path,
    out: str | Path,
    mode: str = "majority",
    min_labels: int = 1,
    videos: str = "copy",
) -> dict:
    """Write the labels in ``db`` to ``out`` with ``save_to_disk``; return a summary
    (``rows``, ``a``, ``b``, ``tie``, ``pairs``, ``out``)."""
    import datasets

    if mode not in MODES:
        raise ValueError(f"export mode must be one of {MODES}, got {mode!r}")
    if videos not in VIDEO_MODES:
        raise ValueError(f"videos must be one of {VIDEO_MODES}, got {videos!r}")
    if min_labels < 1:
        raise ValueError(f"min_labels must be >= 1, got {min_labels}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"export: {out} already exists; choose a new directory")
    store = LabelStore(db, create=False)
    pairs = {p["id"]: p for p in store.pairs()}
    labels = store.labels()
    if not labels:
        raise ValueError(f"export: {db} holds no labels yet")
    rows = _majority_rows(labels, pairs, min_labels) if mode == "majority" else _label_rows(labels, pairs)
    if not rows:
        raise ValueError(f"export: no pair of {db} has {min_labels} or more labels")

    with atomic_directory(out) as tmp:  # replaces an empty `out` (checked above)
        features = _attach_videos(rows, pairs, store, tmp, videos)
        ds = datasets.Dataset.from_list(rows, features=datasets.Features(features))
        ds.save_to_disk(str(tmp))
    prefs = Counter(r["preference"] for r in rows)
    return {
        "rows": len(rows),
        **{c: prefs[c] for c in CATEGORIES},
        "pairs": len({r["pair_id"] for r in rows}),
        "out": str(out),
    }


def majority_vote(values: list[str | None]) -> str | None:
    """The outcome with most votes; a shared top count is a tie; ``None`` without votes."""
    counts = Counter(v for v in values if v is not None)
    if not counts:
        return None
    (top, n), *rest = counts.most_common()
    return "tie" if rest and rest[0][1] == n else top


def _majority_rows(labels: list[dict], pairs: dict[int, dict], min_labels: int) -> list[dict]:
    by_pair: dict[int, list[dict]] = defaultdict(list)
    for r in labels:
        by_pair[r["pair_id"]].append(r)
    rows = []
    for pid in sorted(by_pair):
        group = by_pair[pid]
        if len(group) < min_labels:
            continue
        votes = Counter(r["choice"] for r in group)
        rows.append(
            {
                "prompt": pairs[pid]["prompt"],
                "preference": majority_vote([r["choice"] for r in group]),
                **{ASPECT_PREFIX + a: majority_vote([r[a] for r in group]) for a in ASPECTS},
                "pair_id": pid,
                "pair_key": pairs[pid]["key"],
                "n_labels": len(group),
                **{f"votes_{c}": votes[c] for c in CATEGORIES},
            }
        )
    return rows


def _label_rows(labels: list[dict], pairs: dict[int, dict]) -> list[dict]:
    return [
        {
            "prompt": pairs[r["pair_id"]]["prompt"],
            "preference": r["choice"],
            **{ASPECT_PREFIX + a: r[a] for a in ASPECTS},
            "pair_id": r["pair_id"],
            "pair_key": pairs[r["pair_id"]]["key"],
            "annotator": r["annotator"],
            "shown_left": r["shown_left"],
            "comment": r["comment"],
            "created_at": datetime.fromtimestamp(r["created_at"], timezone.utc).isoformat(),
        }
        for r in labels
    ]


def _attach_videos(rows: list[dict], pairs: dict[int, dict], store: LabelStore, out: Path, mode: str) -> dict:
    """Fill ``video_a`` / ``video_b`` of every row; return the dataset's features."""
    import datasets

    used = [pairs[pid] for pid in sorted({r["pair_id"] for r in rows})]
    from_source = [p for p in used if p["source_row"] is not None]
    videos: dict[int, tuple] = {}
    video_feature = datasets.Value("string")
    if from_source:
        from align.data.preference import load_preference_dataset

        source = store.meta("source")
        if len(from_source) != len(used):
            raise ValueError(f"export: {source} mixes video files with arrays or bytes; export one kind at a time")
        try:
            src = load_preference_dataset(source)
        except (FileNotFoundError, ValueError) as e:
            msg = f"export: the pairs' videos are arrays or bytes in the dataset {source}, which cannot be read: {e}"
            raise ValueError(msg) from None
        video_feature = src.features["video_a"]
        if src.features["video_b"] != video_feature:
            raise ValueError(f"export: {source} stores video_a and video_b differently; cannot copy them")
        if isinstance(video_feature, (datasets.Array2D, datasets.Array3D, datasets.Array4D, datasets.Array5D)):
            src = src.with_format("numpy", columns=["video_a", "video_b"])
        for p in from_source:
            r = src[int(p["source_row"])]
            videos[p["id"]] = (r["video_a"], r["video_b"])
    else:
        for p in used:
            videos[p["id"]] = tuple(_place(v, out, mode) for v in (p["video_a"], p["video_b"]))
    for i, r in enumerate(rows):  # the schema's columns first, in its order
        va, vb = videos[r["pair_id"]]
        rows[i] = {"prompt": r["prompt"], "video_a": va, "video_b": vb, **{k: v for k, v in r.items() if k != "prompt"}}
    features = {"prompt": datasets.Value("string"), "video_a": video_feature, "video_b": video_feature}
    for k, v in rows[0].items():  # the rest in row order; ints are counts and ids, the others strings
        if k not in features:
            features[k] = datasets.Value("int64") if isinstance(v, int) else datasets.Value("string")
    return features


def _hardlink_or_copy(src: Path, target: Path) -> None:
    """A hard link to ``src`` (no bytes copied, and inside the export's root, so training reads it
    like a copy); a copy where the two folders are on different filesystems."""
    try:
        os.link(src.resolve(), target)
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
            raise
        shutil.copy2(src, target)


def _place(path: str, out_dir: Path, mode: str) -> str:
    """Copy or symlink a video into ``out_dir/videos/`` once (named by a hash of its path);
    return its name relative to ``out_dir``."""
    src = Path(path)
    if not src.is_file():
        raise FileNotFoundError(f"export: video {src} no longer exists")
    name = f"videos/{hashlib.sha256(str(src).encode()).hexdigest()[:16]}{src.suffix.lower()}"
    target = out_dir / name
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        if mode == "symlink":
            target.symlink_to(src.resolve())
        elif mode == "hardlink":
            _hardlink_or_copy(src, target)
        else:
            shutil.copy2(src, target)
    return name
