"""Importers: map common public preference layouts onto the vidalign schema.

    import_dataset("videogen-rewardbench", "VideoGen-RewardBench/data.csv", "data/vgrb")

Formats (``FORMATS``), each read from anything :func:`align.data.preference.load_table` reads
(JSONL / CSV / Parquet file, ``save_to_disk`` directory, local copy of a hub repo, hub id):

- ``pickapic``: Pick-a-Pic style pairwise rows: ``caption`` (or ``prompt``), two media columns
  ``video_0``/``video_1`` (or ``file_*``, ``path_*``, ``jpg_*``) and ``label_0``/``label_1``, the
  share of the vote each got (1/0, 0/1, or 0.5/0.5 for a tie). Rows with ``has_label`` false or
  no labels are skipped and counted. The labels are kept as ``score_a``/``score_b``;
  ``model_*``, ``user_id``, ``ranking_id`` as provenance.
- ``videogen-rewardbench``: VideoGen-RewardBench style A/B rows: ``prompt``, ``path_A``,
  ``path_B``, ``Overall`` in ``A | B | same`` and per-aspect ``VQ`` / ``MQ`` / ``TA`` (visual
  quality, motion quality, text alignment) in the same values, which become
  ``preference_visual_quality`` / ``preference_motion_quality`` / ``preference_text_alignment``.
  Rows without an ``Overall`` label are skipped and counted.
- ``chosen-rejected``: ``prompt`` (or ``caption``) with ``chosen`` / ``rejected`` videos (or
  ``video_chosen`` / ``video_rejected``, ``chosen_video`` / ``rejected_video``). Which one becomes
  ``video_a`` is drawn per row from ``seed``, so that position carries no signal.

Videos may be paths (relative to the source's root, with the same safety checks as loading:
no ``..`` out of it, no absolute paths unless allowed) or embedded bytes. Each is copied into
``DST/videos/<content hash><ext>`` (hard-linked when the filesystem allows; identical files are
stored once), so ``DST`` is a self-contained ``save_to_disk`` dataset with relative paths. A row
whose videos cannot be found, or whose label is unknown, is reported with its index and file;
the import then fails (``bad_rows="error"``) or skips and counts it (``"skip"``). Videos are not
decoded here (``vidalign data validate DST`` does that) unless ``preprocessing`` asks to bring
them to a model's input (frames, fps, size), which stores the prepared clips as mp4 instead.
``DST`` is written atomically.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np

from align.atomic import atomic_directory
from align.data.preference import (
    VIDEO_EXTS,
    HubRoot,
    PreferenceDataError,
    dataset_root,
    load_table,
    resolve_video_path,
    video_label,
)
from align.data.video import prepare_video, read_video, sniff_video_format, video_info, write_video

FORMATS = ("pickapic", "videogen-rewardbench", "chosen-rejected")

PICKAPIC_MEDIA = (("video_0", "video_1"), ("file_0", "file_1"), ("path_0", "path_1"), ("jpg_0", "jpg_1"))
VGRB_LABELS = {"a": "a", "b": "b", "same": "tie", "tie": "tie"}
VGRB_ASPECTS = {"VQ": "visual_quality", "MQ": "motion_quality", "TA": "text_alignment"}
CHOSEN_REJECTED = (("chosen", "rejected"), ("video_chosen", "video_rejected"), ("chosen_video", "rejected_video"))


class _Skip(Exception):
    """A row that carries no preference (unlabelled): skipped and counted, not an error."""


def import_dataset(
    fmt: str,
    src: str | Path,
    dst: str | Path,
    *,
    split: str = "train",
    revision: str | None = None,
    seed: int = 0,
    bad_rows: str = "error",
    allow_absolute_paths: bool = False,
    overwrite: bool = False,
    preprocessing: dict | None = None,
) -> dict:
    """Read ``src`` in layout ``fmt``, write a schema dataset with its videos to ``dst``.

    ``preprocessing`` (``num_frames``, ``height``, ``width``, ``fps``; see
    :func:`align.data.video.prepare_video`) decodes each video, brings it to a model's input
    (fps-aware frame sampling, resize, centre crop) and stores that as mp4 (H.264, CRF 15:
    near-lossless, not lossless) instead of copying the file.

    Returns ``{"rows_in", "rows_out", "skipped": {"unlabelled", "bad_row"}, "videos", "dst"}``
    (also saved as ``dst/vidalign_import.json``). Raises :class:`PreferenceDataError` listing
    every bad row with ``bad_rows="error"``, ``ValueError`` for an unknown format or missing
    source columns or when ``dst`` exists and not ``overwrite``.
    """
    import datasets

    pre = {k: v for k, v in (preprocessing or {}).items() if v is not None}
    unknown = sorted(set(pre) - {"num_frames", "height", "width", "fps"})
    if unknown:
        raise ValueError(f"unknown preprocessing key(s) {unknown}; use num_frames, height, width, fps")
    if fmt not in FORMATS:
        raise ValueError(f"unknown import format {fmt!r}; use one of {list(FORMATS)}")
    if bad_rows not in ("error", "skip"):
        raise ValueError(f"bad_rows must be 'error' or 'skip', got {bad_rows!r}")
    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise ValueError(f"{dst} already exists (pass overwrite=True / --overwrite to replace it)")
    table = load_table(src, split=split, revision=revision)
    root = dataset_root(src)
    if isinstance(root, HubRoot) and revision:
        root = HubRoot(root.repo_id, revision)
    columns = table.column_names
    if fmt == "pickapic":
        mapper = _pickapic_mapper(columns, str(src))
    elif fmt == "videogen-rewardbench":
        mapper = _vgrb_mapper(columns, str(src))
    else:
        mapper = _chosen_rejected_mapper(columns, str(src), seed)

    with atomic_directory(dst) as stage:  # written aside, renamed into place when complete
        (stage / "videos").mkdir()
        out: list[dict] = []
        problems: list[tuple[int, str]] = []
        skipped = {"unlabelled": 0, "bad_row": 0}
        stored: dict[str, str] = {}  # content hash -> relative path in dst
        for i, row in enumerate(table):
            try:
                mapped, media = mapper(i, row)
            except _Skip:
                skipped["unlabelled"] += 1
                continue
            except ValueError as e:
                problems.append((i, str(e)))
                continue
            row_problems = []
            for col, (src_col, value) in media.items():
                try:
                    mapped[col] = _store_video(value, root, allow_absolute_paths, stage, stored, pre)
                except (ValueError, OSError) as e:
                    text = str(e)
                    name = video_label(value)
                    row_problems.append(f"{src_col}: {text}" if name in text else f"{src_col}: {name}: {text}")
            if row_problems:
                problems += [(i, m) for m in row_problems]
                continue
            mapped.update({"source": str(src), "source_format": fmt, "source_row": i})
            out.append(mapped)
        skipped["bad_row"] = len({r for r, _ in problems})
        if problems and bad_rows == "error":
            raise PreferenceDataError(f"{src} ({fmt})", problems)
        if not out:
            raise ValueError(f"{src} ({fmt}): no rows to import (skipped: {skipped})")
        keys = list(dict.fromkeys(k for r in out for k in r))
        datasets.Dataset.from_dict({k: [r.get(k) for r in out] for k in keys}).save_to_disk(str(stage))
        stats = {
            "format": fmt,
            "source": str(src),
            "rows_in": len(table),
            "rows_out": len(out),
            "skipped": skipped,
            "problems": [f"row {r}: {m}" for r, m in problems],
            "videos": len(stored),
            "preprocessing": pre,
            "dst": str(dst),
        }
        (stage / "vidalign_import.json").write_text(json.dumps(stats, indent=2))
    return stats


# --------------------------------------------------------------------------------------------
# the formats: each mapper takes (row index, row) and returns (schema columns, {column: (source
# column, video value)}); it raises _Skip for an unlabelled row and ValueError for a bad one


def _pick(columns: list[str], options: tuple, what: str, source: str):
    """The first of ``options`` (names or tuples of names) that ``columns`` has."""
    for opt in options:
        names = opt if isinstance(opt, tuple) else (opt,)
        if all(n in columns for n in names):
            return opt
    raise ValueError(f"{source}: no {what} column(s); expected one of {list(options)}, has {columns}")


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or (isinstance(v, str) and not v.strip())


def _pickapic_mapper(columns: list[str], source: str):
    prompt_col = _pick(columns, ("caption", "prompt"), "prompt", source)
    c0, c1 = _pick(columns, PICKAPIC_MEDIA, "media", source)
    _pick(columns, (("label_0", "label_1"),), "label", source)

    def label(row, col):
        v = row[col]
        if _missing(v):
            raise _Skip
        try:
            return float(v)
        except (TypeError, ValueError):
            raise ValueError(f"{col} {v!r} is not a number") from None

    def mapper(i, row):
        if "has_label" in row and row["has_label"] is not None and not row["has_label"]:
            raise _Skip
        l0, l1 = label(row, "label_0"), label(row, "label_1")
        pref = "a" if l0 > l1 else "b" if l1 > l0 else "tie"
        mapped = {"prompt": row[prompt_col], "preference": pref, "score_a": l0, "score_b": l1}
        for src_col, dst_col in (("model_0", "model_a"), ("model_1", "model_b"), ("user_id", "annotator")):
            if src_col in row:
                mapped[dst_col] = None if row[src_col] is None else str(row[src_col])
        if "ranking_id" in row:
            mapped["source_id"] = None if row["ranking_id"] is None else str(row["ranking_id"])
        return mapped, {"video_a": (c0, row[c0]), "video_b": (c1, row[c1])}

    return mapper


def _vgrb_mapper(columns: list[str], source: str):
    _pick(columns, ("prompt",), "prompt", source)
    _pick(columns, (("path_A", "path_B"),), "video", source)
    _pick(columns, ("Overall",), "Overall label", source)
    aspects = [c for c in VGRB_ASPECTS if c in columns]

    def label(row, col, allow_missing):
        v = row[col]
        if _missing(v):
            if allow_missing:
                return None
            raise _Skip
        out = VGRB_LABELS.get(str(v).strip().lower())
        if out is None:
            raise ValueError(f"{col} {v!r} is not one of A, B, same")
        return out

    def mapper(i, row):
        mapped = {"prompt": row["prompt"], "preference": label(row, "Overall", False)}
        for col in aspects:
            mapped[f"preference_{VGRB_ASPECTS[col]}"] = label(row, col, True)
        for src_col, dst_col in (("A_model", "model_a"), ("B_model", "model_b")):
            if src_col in row:
                mapped[dst_col] = None if row[src_col] is None else str(row[src_col])
        for src_col, dst_col in (("fps_A", "fps_a"), ("fps_B", "fps_b")):
            if src_col in row and not _missing(row[src_col]):
                mapped[dst_col] = float(row[src_col])
        return mapped, {"video_a": ("path_A", row["path_A"]), "video_b": ("path_B", row["path_B"])}

    return mapper


def _chosen_rejected_mapper(columns: list[str], source: str, seed: int):
    prompt_col = _pick(columns, ("prompt", "caption"), "prompt", source)
    cc, rc = _pick(columns, CHOSEN_REJECTED, "chosen/rejected", source)
    rng = np.random.default_rng(seed)

    def mapper(i, row):
        chosen_first = bool(rng.random() < 0.5)  # drawn for every row, so row i's order depends only on seed
        chosen, rejected = (cc, row[cc]), (rc, row[rc])
        a, b = (chosen, rejected) if chosen_first else (rejected, chosen)
        return {"prompt": row[prompt_col], "preference": "a" if chosen_first else "b"}, {"video_a": a, "video_b": b}

    return mapper


# --------------------------------------------------------------------------------------------
# videos


def _store_video(value, root, allow_absolute_paths: bool, stage: Path, stored: dict[str, str], pre: dict) -> str:
    """Copy one video (a path or bytes) into ``stage/videos/<hash><ext>``, or with ``pre`` its
    prepared frames into ``stage/videos/<hash>.prepared.mp4``; return its relative path. The
    hash is of the source file, so a file used by many rows is stored (and prepared) once."""
    data = None
    if isinstance(value, dict):  # datasets.Video / Image with decode=False
        data, value = value.get("bytes"), value.get("path")
    elif isinstance(value, (bytes, bytearray)):
        data, value = bytes(value), None
    if data:
        ext = sniff_video_format(bytes(data[:16]))
        if ext is None:
            raise ValueError("embedded bytes are not an mp4, webm or gif video")
        digest = hashlib.sha256(data).hexdigest()[:32]
        rel = f"videos/{digest}{ext}"
        if digest not in stored:
            (stage / rel).write_bytes(data)
            stored[digest] = _prepared(stage, rel, digest, pre) if pre else rel
        return stored[digest]
    if not isinstance(value, str):
        raise ValueError(f"expected a video path or bytes, got {type(value).__name__}")
    path = resolve_video_path(value, root, allow_absolute_paths)
    if not path.is_file():
        raise ValueError(f"{path}: no such video file")
    ext = path.suffix.lower()
    if ext not in VIDEO_EXTS:
        raise ValueError(f"{path}: not a video file ({ext or 'no suffix'}; expected one of {list(VIDEO_EXTS)})")
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    digest = h.hexdigest()[:32]
    if digest not in stored:
        rel = f"videos/{digest}{ext}"
        try:
            os.link(path, stage / rel)
        except OSError:  # another filesystem, or links not allowed: copy
            shutil.copyfile(path, stage / rel)
        stored[digest] = _prepared(stage, rel, digest, pre) if pre else rel
    return stored[digest]


def _prepared(stage: Path, rel: str, digest: str, pre: dict) -> str:
    """Replace the staged file ``rel`` by its frames brought to ``pre``, written as mp4."""
    original = stage / rel
    try:
        info = video_info(original)
        frames = prepare_video(
            read_video(original),
            pre.get("num_frames"),
            pre.get("height"),
            pre.get("width"),
            info["fps"],
            pre.get("fps"),
        )
        out = f"videos/{digest}.prepared.mp4"
        write_video(stage / out, frames, fps=pre.get("fps") or info["fps"] or 8)
    except ValueError as e:  # name the source, not the staged copy
        raise ValueError(str(e).replace(str(original), "video")) from None
    finally:
        original.unlink(missing_ok=True)
    return out
