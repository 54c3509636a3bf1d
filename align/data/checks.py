"""Checking the rows of a preference dataset (:func:`check_rows`, :func:`validate_rows`) and
summarising it (:func:`summarize`), streaming: one row's videos in memory at a time.

Every problem names its row and, where there is one, the file; fatal problems stop training
(or are skipped and counted), warnings are reported and the row is kept. The schema and how
rows and videos are read are :mod:`align.data.preference`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from align.data.preference import (
    ASPECT_PREFIX,
    LABELLER_COLUMNS,
    PREFERENCES,
    HubRoot,
    content_hash,
    dataset_root,
    iter_rows,
    load_video_value,
    resolve_video_path,
    video_fps,
    video_label,
)

SCORE_PREFIX = "score_"  # score_a, score_b (and per-aspect scores): numbers, finite when given

# --------------------------------------------------------------------------------------------
# checks


@dataclass(frozen=True)
class Problem:
    """One problem of one row. ``fatal`` problems stop training (or are skipped and counted);
    the others are warnings (reported, the row is kept)."""

    row: int
    message: str
    fatal: bool = True

    def __str__(self) -> str:
        return f"row {self.row}: {'' if self.fatal else 'warning: '}{self.message}"


@dataclass
class Report:
    """What :func:`check_rows` found. ``hashes[i]`` is ``(content_hash(a), content_hash(b))`` of
    row ``i`` (None where a video could not be read); ``decoded[i]`` the frames when kept.
    ``info`` describes the videos (each distinct file once): how many of each frame size
    (``"HxW"``), length (frames) and frame rate, and how many are stills (one frame). Mixed
    sizes, lengths and rates are normal for data from several generators: information, not
    problems (training resamples every video to the model's input)."""

    source: str
    rows: int
    problems: list[Problem]
    counts: dict[str, int]
    hashes: list[tuple[str, str] | None]
    decoded: list | None = None
    info: dict = field(default_factory=dict)

    @property
    def fatal(self) -> list[Problem]:
        return [p for p in self.problems if p.fatal]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if not p.fatal]

    @property
    def bad_rows(self) -> set[int]:
        return {p.row for p in self.problems if p.fatal}

    def info_lines(self) -> list[str]:
        """``info`` as short human-readable lines (sizes, lengths, frame rates)."""

        def top(counter: dict, unit: str = "") -> str:
            items = sorted(counter.items(), key=lambda kv: -kv[1])
            shown = ", ".join(f"{k}{unit} x{n}" for k, n in items[:6])
            return shown + (f", ... ({len(items)} kinds)" if len(items) > 6 else "")

        i = self.info
        if not i.get("videos"):
            return []
        lines = [f"{i['videos']} distinct video(s), {i['stills']} of them still image(s) (1 frame)"]
        lines.append(f"sizes: {top(i['sizes'])}")
        lines.append(f"lengths: {top(i['frames'], ' frames')}")
        lines.append(f"frame rates: {top(i['fps'], ' fps')}")
        return lines


TARGET_KEYS = ("num_frames", "height", "width", "fps")


def normalize_target(target: dict | None) -> dict | None:
    """A model-input target (``num_frames``, ``height``, ``width``, ``fps``) without ``None``
    values, or None when it asks for nothing. Unknown keys are an error naming them."""
    if not target:
        return None
    unknown = sorted(set(target) - set(TARGET_KEYS))
    if unknown:
        raise ValueError(f"unknown target key(s) {unknown}; use {list(TARGET_KEYS)}")
    out = {k: (float(v) if k == "fps" else int(v)) for k, v in target.items() if v is not None}
    return out or None


def check_rows(
    ds,
    source: str = "dataset",
    root=None,
    *,
    allow_absolute_paths: bool = False,
    min_frames: int = 1,
    keep_videos: bool = False,
    target: dict | None = None,
) -> Report:
    """Check every row of a preference dataset, streaming (one row's videos in memory at a time
    unless ``keep_videos``). ``root`` is a dataset source or root (see :func:`dataset_root`).

    Fatal: empty prompt; unknown preference or per-aspect label; a NaN or infinite ``score_*``;
    a video that is missing, undecodable (corrupt, truncated), has fewer than ``min_frames``
    frames, or whose path leaves the root (``..`` or a symlink out of it) or is absolute
    (unless allowed); with ``target`` (a model's ``num_frames`` /
    ``height`` / ``width`` / ``fps``), a video too short for it (or a still where the model
    takes several frames); identical videos; a duplicate row (same prompt, same two videos by
    content, same winner and same labeller as an earlier row). The labeller is the row's values
    in the :data:`LABELLER_COLUMNS` it has (``annotator``, ``source``): the same comparison
    labelled alike by two annotators is two votes, both kept. Warning: the same comparison with
    a different label than an earlier row (annotators disagree; both rows are kept). Videos of
    different sizes, lengths and frame rates are fine: ``Report.info`` counts them. A file used
    by many rows is decoded once. With ``keep_videos`` and ``target``, the kept frames are
    resampled to the target (:func:`align.data.video.resample_frames`), so only model-sized
    clips are held in memory.
    """
    root = dataset_root(root)
    target = normalize_target(target)
    columns = ds.column_names
    aspects = [c for c in columns if c.startswith(ASPECT_PREFIX)]
    problems: list[Problem] = []
    hashes: list[tuple[str, str] | None] = []
    decoded: list | None = [] if keep_videos else None
    counts = {p: 0 for p in PREFERENCES}
    seen_files: dict[str, tuple | str] = {}  # resolved path -> (hash, shape, fps) or error
    described: dict[str, tuple] = {}  # content hash -> (shape, fps) of each distinct video
    labeller_columns = [c for c in LABELLER_COLUMNS if c in columns]
    # (prompt, sorted hashes) -> [(row, winner, labeller)] of the rows that compare those videos
    seen_pairs: dict[tuple, list[tuple[int, str, tuple]]] = {}
    ctx = (root, allow_absolute_paths, seen_files, keep_videos, target)
    bad_scores = nonfinite_scores(ds)
    for i, row in enumerate(iter_rows(ds)):
        msgs, prompt, pref = _label_problems(row, aspects)
        msgs += [(m, True) for m in bad_scores.get(i, [])]
        if pref in PREFERENCES:
            counts[pref] += 1
        infos, videos = [], []
        for col in ("video_a", "video_b"):
            value = row[col]
            name = video_label(value)
            try:
                frames, digest, shp, fps = _checked_video(value, row.get(f"fps_{col[-1]}"), ctx)
            except (ValueError, OSError) as e:
                text = str(e)
                msgs.append((f"{col}: {text}" if name in text else f"{col}: {name}: {text}", True))
                continue
            described.setdefault(digest, (shp, fps))
            if shp[0] < min_frames:
                msgs.append((f"{col}: {name}: {shp[0]} frame(s), fewer than the {min_frames} needed", True))
            infos.append((digest, name))
            videos.append(frames)
        row_hashes = None
        if len(infos) == 2:
            (ha, na), (hb, nb) = infos
            row_hashes = (ha, hb)
            if ha == hb:
                msgs.append((f"video_a and video_b are identical (chosen == rejected): {na}, {nb}", True))
            elif pref in PREFERENCES and isinstance(prompt, str):
                msgs += _pair_messages(i, row, prompt, pref, infos, labeller_columns, seen_pairs)
        problems += [Problem(i, m, fatal) for m, fatal in msgs]
        hashes.append(row_hashes)
        if decoded is not None:
            ok = len(videos) == 2 and not any(f for _, f in msgs)
            decoded.append((videos[0], videos[1]) if ok else None)
    return Report(source, len(hashes), problems, counts, hashes, decoded, _describe(described))


def _label_problems(row: dict, aspects: list[str]) -> tuple[list[tuple[str, bool]], object, object]:
    """``(messages, prompt, preference)`` of one row's prompt and labels."""
    msgs: list[tuple[str, bool]] = []
    prompt = row["prompt"]
    prompt = str(prompt) if isinstance(prompt, (str, np.str_)) else prompt
    if not isinstance(prompt, str) or not prompt.strip():
        msgs.append(("empty prompt", True))
    pref = row["preference"]
    pref = str(pref) if isinstance(pref, (str, np.str_)) else pref  # numpy format yields np.str_
    if pref not in PREFERENCES:
        msgs.append((f"preference {pref!r} is not one of {PREFERENCES}", True))
    for col in aspects:
        v = row[col]
        v = str(v) if isinstance(v, (str, np.str_)) else v
        if v not in PREFERENCES and v not in (None, ""):
            msgs.append((f"{col} {v!r} is not one of {PREFERENCES} (or empty)", True))
    return msgs, prompt, pref


def nonfinite_scores(ds) -> dict[int, list[str]]:
    """``{row: [message]}`` for every NaN or infinite value of a numeric ``score_*`` column (a
    missing score is null, not NaN; read from Arrow, where the two differ)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    table = ds.with_format("arrow", columns=[c for c in ds.column_names if c.startswith(SCORE_PREFIX)])[:]
    out: dict[int, list[str]] = {}
    for col in table.column_names:
        arr = table.column(col)
        if not pa.types.is_floating(arr.type):
            continue  # integers are finite; strings are not scores this checks
        bad = pc.fill_null(pc.invert(pc.is_finite(arr)), False)
        for i in pc.indices_nonzero(bad).to_pylist():
            out.setdefault(i, []).append(f"{col} {arr[i].as_py()} is not a finite number")
    return out


def _pair_messages(i, row, prompt, pref, infos, labeller_columns, seen_pairs) -> list[tuple[str, bool]]:
    """Duplicate (fatal) and conflicting-label (warning) checks of one comparison."""
    (ha, na), (hb, nb) = infos
    key = (prompt.strip(), min(ha, hb), max(ha, hb))
    winner = "tie" if pref == "tie" else (ha if pref == "a" else hb)
    labeller = tuple(_plain(row[c]) for c in labeller_columns)
    earlier = seen_pairs.setdefault(key, [])
    dup = next((j for j, w, lb in earlier if w == winner and lb == labeller), None)
    other = next((j for j, w, _ in earlier if w != winner), None)
    if dup is not None:
        by = "".join(f", {c} {v!r}" for c, v in zip(labeller_columns, labeller))
        return [(f"duplicate of row {dup} (same prompt, videos and label{by}: {na}, {nb})", True)]
    earlier.append((i, winner, labeller))
    if other is not None:
        return [(f"conflicting label with row {other} (same prompt and videos: {na}, {nb})", False)]
    return []


def _describe(described: dict[str, tuple]) -> dict:
    """Counts of the frame sizes, lengths and rates of the distinct videos."""
    sizes: dict[str, int] = {}
    frames: dict[int, int] = {}
    rates: dict[str, int] = {}
    for shp, fps in described.values():
        size = f"{shp[1]}x{shp[2]}"
        sizes[size] = sizes.get(size, 0) + 1
        frames[shp[0]] = frames.get(shp[0], 0) + 1
        rate = "unknown" if fps is None else f"{fps:g}"
        rates[rate] = rates.get(rate, 0) + 1
    stills = sum(1 for shp, _ in described.values() if shp[0] == 1)
    return {"videos": len(described), "stills": stills, "sizes": sizes, "frames": frames, "fps": rates}


def _plain(value):
    """A cell as a hashable Python value (numpy scalars and strings unwrapped)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return repr(value.tolist())
    return value if value is None or isinstance(value, (str, int, float, bool)) else repr(value)


def _checked_video(value, column_fps, ctx):
    """``(frames or None, content hash, shape, fps)`` of one video value; ``ctx`` is
    ``(root, allow_absolute_paths, seen, keep, target)``. Without ``keep``, a file already seen
    (by resolved path) is not decoded again. With ``target``, checks that the video can be
    resampled to it (and resamples the kept frames)."""
    from align.data.video import resample_frames, resample_indices

    root, allow_abs, seen, keep, target = ctx
    key = None
    if isinstance(value, (str, np.str_)) and not isinstance(root, HubRoot):
        key = str(resolve_video_path(str(value), root, allow_abs))
        cached = seen.get(key)
        if isinstance(cached, str):
            raise ValueError(cached)
        if cached is not None and not keep:
            return None, *cached
    try:
        frames = load_video_value(value, root, allow_abs)
        digest, shp = content_hash(frames), tuple(frames.shape)
        fps = video_fps(value, root, allow_abs, column_fps)
        if target:
            n, rate = target.get("num_frames"), target.get("fps")
            if keep:
                frames = resample_frames(frames, fps, n, rate, target.get("height"), target.get("width"))
            else:
                resample_indices(shp[0], fps, n, rate)
    except (ValueError, OSError) as e:
        if key is not None:
            seen[key] = str(e)
        raise
    if key is not None:
        seen[key] = (digest, shp, fps)
    return (frames if keep else None), digest, shp, fps


def validate_rows(
    ds,
    source: str = "dataset",
    root: str | Path | None = None,
    *,
    allow_absolute_paths: bool = False,
    min_frames: int = 1,
    target: dict | None = None,
) -> tuple[list[tuple[int, str]], list]:
    """Check every row; return ``(problems, decoded)`` where decoded[i] = (va, vb) or None.

    ``problems`` lists the fatal problems as ``(row, message)``; see :func:`check_rows` for the
    checks (and for warnings, which this leaves out). Keeps every decoded video in memory
    (resampled to ``target`` when given).
    """
    rep = check_rows(
        ds,
        source,
        root,
        allow_absolute_paths=allow_absolute_paths,
        min_frames=min_frames,
        keep_videos=True,
        target=target,
    )
    return [(p.row, p.message) for p in rep.fatal], rep.decoded


# --------------------------------------------------------------------------------------------
# inspection


def summarize(ds, root=None) -> dict:
    """Counts and distributions of a preference dataset without decoding its videos: rows, labels,
    tie share, per-aspect label counts, prompt lengths (words), and per distinct video its frame
    count, duration and file size (read from the container; arrays: frames and bytes in memory).
    Videos that cannot be read are counted under ``unreadable_videos``."""
    from align.data.video import video_info

    root = dataset_root(root)
    prefs = [str(p) for p in ds["preference"]]
    counts = {p: prefs.count(p) for p in PREFERENCES}
    counts["other"] = len(prefs) - sum(counts.values())
    labelled = counts["a"] + counts["b"] + counts["tie"]
    prompts = [str(p or "") for p in ds["prompt"]]
    aspects = {
        c[len(ASPECT_PREFIX) :]: {p: [str(v) for v in ds[c]].count(p) for p in PREFERENCES}
        for c in ds.column_names
        if c.startswith(ASPECT_PREFIX)
    }
    frames, durations, sizes, unreadable = [], [], [], []
    seen: set[str] = set()
    for col in ("video_a", "video_b"):
        for i, row in enumerate(iter_rows(ds, [col])):
            value = str(row[col]) if isinstance(row[col], np.str_) else row[col]
            name = video_label(value)
            if isinstance(value, str):
                if value in seen:
                    continue
                seen.add(value)
                try:
                    info = video_info(resolve_video_path(value, root))
                except (ValueError, OSError):
                    unreadable.append(f"row {i} {col}: {name}")
                    continue
                frames.append(info["frames"])
                sizes.append(info["bytes"])
                if info["duration_s"] is not None:
                    durations.append(info["duration_s"])
            elif isinstance(value, dict) and value.get("bytes"):
                sizes.append(len(value["bytes"]))
            elif value is not None and not isinstance(value, dict):
                try:
                    arr = np.asarray(value)
                except ValueError:  # nested lists of uneven lengths
                    unreadable.append(f"row {i} {col}: {name}")
                    continue
                if arr.ndim == 4:
                    frames.append(int(arr.shape[0]))
                    sizes.append(int(arr.nbytes))
    lengths = [len(p.split()) for p in prompts]
    return {
        "rows": len(ds),
        "counts": counts,
        "tie_share": counts["tie"] / labelled if labelled else 0.0,
        "aspects": aspects,
        "unique_prompts": len(set(prompts)),
        "prompt_words": lengths,
        "video_frames": frames,
        "video_seconds": durations,
        "video_bytes": sizes,
        "unreadable_videos": unreadable,
    }
