"""The preference-data schema: loading it from many layouts, validating it, turning rows into pairs.

Schema (a ``datasets.Dataset``):
    prompt: str
    video_a, video_b: a file path relative to the dataset root, a decoded ``uint8 (T, H, W, C)``
        array, or ``{"bytes": ..., "path": ...}`` (what a ``datasets.Video(decode=False)`` column holds)
    preference: "a" | "b" | "tie"
    optional: per-aspect labels ``preference_<aspect>`` (a | b | tie, or empty), ``score_a`` /
        ``score_b`` (floats), and provenance columns (``source``, ``source_row``, ``model_a``, ...).

Where a dataset can come from (:func:`load_preference_dataset`), and what its *root* is (the
folder relative video paths are resolved against, :func:`dataset_root`):

- a directory written by ``datasets.Dataset.save_to_disk``: root = that directory;
- a ``.jsonl`` / ``.json`` / ``.csv`` / ``.parquet`` file: root = the file's folder;
- a directory holding ``metadata.jsonl|csv|parquet``: the file, root = the directory;
- a directory of pair folders ``<id>/prompt.txt, a.<ext>, b.<ext>, preference.txt``: root = it;
- any other local directory: ``datasets.load_dataset(dir)`` (a local copy of a hub dataset);
- a Hugging Face Hub dataset id ``owner/name``: ``datasets.load_dataset(id)``; relative video
  paths are files of that repo, fetched one by one with ``huggingface_hub.hf_hub_download``.

Every problem is reported with its row index and, where there is one, the file. Paths must
stay inside the root: ``..`` that leaves it, and absolute paths (unless
``allow_absolute_paths``), are errors, checked on the path as written (symlinks the dataset's
owner placed inside the root are followed, as the hub cache needs). DPO cannot use ties; they
are skipped and counted, never dropped silently.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REQUIRED_COLUMNS = ("prompt", "video_a", "video_b", "preference")
PREFERENCES = ("a", "b", "tie")
ASPECT_PREFIX = "preference_"  # per-aspect label columns: preference_<aspect> in PREFERENCES (or empty)
# who gave a row's label: rows that agree in prompt, videos and label but differ in one of these
# are several votes (e.g. `vidalign annotate export --mode all`), not a duplicate
LABELLER_COLUMNS = ("annotator", "source")
TABLE_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
METADATA_NAMES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")
PAIR_FOLDER_FILES = ("prompt.txt", "preference.txt")  # plus a.<ext> and b.<ext>
VIDEO_EXTS = (".mp4", ".webm", ".gif")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")  # stills: one-frame videos
MEDIA_EXTS = VIDEO_EXTS + IMAGE_EXTS
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


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


# --------------------------------------------------------------------------------------------
# loading


def load_preference_dataset(path: str | Path, split: str = "train", revision: str | None = None):
    """Load a preference dataset from any supported layout (see the module docstring) and check
    that it has the required columns. ``split`` / ``revision`` apply to hub datasets and
    ``DatasetDict`` directories."""
    ds = load_table(path, split=split, revision=revision)
    check_columns(ds.column_names, str(path))
    return ds


def load_table(source: str | Path, split: str = "train", revision: str | None = None):
    """A ``datasets.Dataset`` from ``source`` in any supported layout, columns unchecked (the
    importers read foreign layouts with this). Media columns (``datasets.Video`` / ``Image``) are
    left encoded: ``{"bytes", "path"}`` dicts, decoded later by the same code as paths."""
    import datasets

    p = Path(source)
    if p.is_file():
        ds = _load_file(p)
    elif p.is_dir():
        ds = _load_dir(p, split)
    elif isinstance(source, str) and HUB_ID.match(source) and not source.startswith("."):
        ds = _load_hub(source, split, revision)
    else:
        raise FileNotFoundError(f"preference dataset {source}: no such directory or file")
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ValueError(f"{source}: a DatasetDict without a {split!r} split ({list(ds)})")
        ds = ds[split]
    return undecoded_media(ds)


def dataset_root(source: str | Path | None):
    """Where relative video paths of ``source`` live: a directory ``Path``, a :class:`HubRoot`
    for a hub dataset id, or ``None`` (paths are then taken as written, relative to the CWD)."""
    if source is None or isinstance(source, HubRoot):
        return source
    p = Path(source)
    if p.is_dir():
        return p
    if p.is_file():
        return p.parent
    if isinstance(source, str) and HUB_ID.match(source) and not source.startswith("."):
        return HubRoot(source)
    return p  # a directory that does not exist (yet): paths under it will be reported missing


@dataclass(frozen=True)
class HubRoot:
    """The root of a Hugging Face Hub dataset repo: relative paths are files in it."""

    repo_id: str
    revision: str | None = None

    def fetch(self, relpath: str) -> Path:
        """Download one file of the repo (cached by ``huggingface_hub``) and return its local path."""
        from huggingface_hub import hf_hub_download

        try:
            return Path(hf_hub_download(self.repo_id, relpath, repo_type="dataset", revision=self.revision))
        except Exception as e:  # network, 404, offline mode: all mean "this file cannot be had"
            raise ValueError(
                f"{relpath}: cannot fetch from hub dataset {self.repo_id} ({type(e).__name__}: {e})"
            ) from e


def _load_file(p: Path):
    """A JSONL / JSON / CSV / Parquet table through the ``datasets`` packaged builders."""
    import datasets

    kind = TABLE_SUFFIXES.get(p.suffix.lower())
    if kind is None:
        raise ValueError(f"{p}: unsupported file type {p.suffix!r}; use one of {sorted(TABLE_SUFFIXES)}")
    if kind == "json" and p.suffix.lower() == ".jsonl":
        _check_jsonl(p)
    kwargs = {"keep_default_na": False, "na_values": [""]} if kind == "csv" else {}
    try:
        return datasets.load_dataset(kind, data_files=str(p), split="train", **kwargs)
    except Exception as e:  # the builders raise DatasetGenerationError, ArrowInvalid, ... for bad files
        raise ValueError(f"{p}: cannot read as {kind} ({type(e).__name__}: {e})") from None


def _check_jsonl(p: Path) -> None:
    """Name the first line of a JSONL file that is not a JSON object (the builder's error does not)."""
    with open(p, encoding="utf-8") as f:
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{p}: line {i} is not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{p}: line {i} is not a JSON object")


def _load_dir(p: Path, split: str):
    """A local directory in one of the supported layouts."""
    import datasets

    if any((p / n).is_file() for n in ("state.json", "dataset_dict.json")):
        try:
            return datasets.load_from_disk(str(p))
        except Exception as e:  # datasets raises several types for a damaged directory
            raise ValueError(f"{p}: not a dataset saved with save_to_disk ({e})") from None
    for name in METADATA_NAMES:
        if (p / name).is_file():
            return _load_file(p / name)
    if any((d / "prompt.txt").is_file() for d in p.iterdir() if d.is_dir()):
        return load_pair_folders(p)
    try:
        return datasets.load_dataset(str(p), split=split)
    except Exception as e:
        raise ValueError(
            f"{p}: not a preference dataset: expected a save_to_disk directory, a metadata.jsonl|csv|parquet, "
            f"pair folders (<id>/prompt.txt, a.mp4, b.mp4, preference.txt) or data files that "
            f"datasets.load_dataset reads ({type(e).__name__}: {e})"
        ) from None


def load_pair_folders(p: Path):
    """The folder layout: one sub-folder per pair with ``prompt.txt``, ``preference.txt`` and one
    ``a.*`` and one ``b.*`` video. Sub-folders are rows in name order; ``pair_id`` is the name.
    A folder with a missing or ambiguous file is still a row: validation reports it."""
    import datasets

    rows: dict[str, list] = {"prompt": [], "video_a": [], "video_b": [], "preference": [], "pair_id": []}
    for d in sorted(x for x in p.iterdir() if x.is_dir()):
        texts = {}
        for name in PAIR_FOLDER_FILES:
            f = d / name
            texts[name] = f.read_text(encoding="utf-8").strip() if f.is_file() else ""
        rows["prompt"].append(texts["prompt.txt"])
        rows["preference"].append(texts["preference.txt"])
        for side in ("a", "b"):
            found = sorted(f.name for f in d.iterdir() if f.stem == side and f.suffix.lower() in MEDIA_EXTS)
            # one candidate: that file; none or several: a name validation reports as missing / ambiguous
            rows[f"video_{side}"].append(f"{d.name}/{found[0]}" if len(found) == 1 else f"{d.name}/{side}.mp4")
        rows["pair_id"].append(d.name)
    return datasets.Dataset.from_dict(rows)


def _load_hub(repo_id: str, split: str, revision: str | None):
    """``datasets.load_dataset(repo_id)`` from the Hugging Face Hub (no remote code is run)."""
    import datasets

    try:
        return datasets.load_dataset(repo_id, split=split, revision=revision)
    except Exception as e:
        raise FileNotFoundError(
            f"preference dataset {repo_id}: no such local directory or file, and loading it as a "
            f"Hugging Face Hub dataset failed ({type(e).__name__}: {e})"
        ) from None


def undecoded_media(ds):
    """Cast ``datasets.Video`` / ``Image`` columns to ``decode=False`` ({"bytes", "path"} dicts):
    validation decodes them itself, with PyAV, and reports problems per row."""
    import datasets

    for name, feat in ds.features.items():
        if isinstance(feat, (datasets.Video, datasets.Image)) and feat.decode:
            ds = ds.cast_column(name, type(feat)(decode=False))
    return ds


def check_columns(columns: list[str], source: str) -> None:
    """Raise naming every missing required column."""
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise ValueError(f"{source}: missing required column(s) {missing}; has {columns}")


# --------------------------------------------------------------------------------------------
# resolving and decoding one video value


def resolve_video_path(value: str, root, allow_absolute_paths: bool = False) -> Path:
    """The local file a path-valued video points at. Raises ``ValueError`` naming the path when it
    is empty, absolute (unless allowed), or leaves ``root`` through ``..`` (checked lexically)."""
    if not value or not str(value).strip():
        raise ValueError("empty video path")
    value = str(value)
    if os.path.isabs(value) or value.startswith("\\"):
        if not allow_absolute_paths:
            raise ValueError(f"{value}: absolute paths are not allowed (trust them with --allow-absolute-paths)")
        return Path(value)
    norm = os.path.normpath(value)
    if root is not None and (norm == ".." or norm.startswith(".." + os.sep)):
        raise ValueError(f"{value}: path escapes the dataset root {_root_name(root)}")
    if isinstance(root, HubRoot):
        return root.fetch(Path(norm).as_posix())
    return Path(root) / norm if root is not None else Path(norm)


def _root_name(root) -> str:
    return f"hub:{root.repo_id}" if isinstance(root, HubRoot) else str(root)


def video_label(value) -> str:
    """How a video value is named in messages: its path, or a short description."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return str(value.get("path") or "<embedded bytes>")
    if isinstance(value, (bytes, bytearray)):
        return "<embedded bytes>"
    if value is None:
        return "<none>"
    if isinstance(value, np.ndarray):
        return f"<array {value.shape}>"
    try:
        return f"<array {np.asarray(value).shape}>"
    except ValueError:  # nested lists of uneven lengths
        return "<nested lists>"


def load_video_value(value, root=None, allow_absolute_paths: bool = False) -> np.ndarray:
    """A row's video as uint8 ``(T, H, W, 3)``: decode a path or ``{"bytes", "path"}`` dict, or
    convert an array. Raises ``ValueError`` / ``OSError`` naming the file."""
    from align.data.video import decode_video_bytes, read_video

    if isinstance(value, dict):  # a datasets.Video / Image column with decode=False
        if value.get("bytes"):
            return decode_video_bytes(value["bytes"], video_label(value))
        value = value.get("path") or ""
    if isinstance(value, (str, np.str_)):
        return read_video(resolve_video_path(str(value), root, allow_absolute_paths))
    if value is None:
        raise ValueError("no video (empty value)")
    try:
        arr = np.asarray(value)
    except ValueError:  # numpy refuses nested lists of uneven lengths
        raise ValueError("nested lists of uneven lengths, not a (T, H, W, 3) array") from None
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"must be (T, H, W, 3), got shape {arr.shape}")
    if arr.dtype != np.uint8:
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    return arr


def content_hash(frames: np.ndarray) -> str:
    """SHA-256 of decoded frames (shape, dtype and pixels): the identity of a video's content."""
    h = hashlib.sha256(f"{frames.dtype.str}{tuple(frames.shape)}".encode())
    h.update(np.ascontiguousarray(frames).data)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# reading rows
#
# ``datasets``' numpy formatter converts an untyped nested-list column (videos stored as lists of
# lists, e.g. from ``Dataset.from_dict`` without features, or a JSON table) element by element in
# Python: about 50 ms per 8x32x32x3 video. These readers convert such columns from Arrow
# directly (offsets and one flat buffer per video) and use the numpy formatter for the rest.

ROW_BATCH = 64  # rows converted from Arrow at a time by iter_rows


def _is_numeric_list(arrow_type) -> bool:
    """Whether an Arrow type is a (nested) variable-size list of integers or floats."""
    import pyarrow as pa

    depth = 0
    while pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type):
        arrow_type, depth = arrow_type.value_type, depth + 1
    return depth > 0 and (pa.types.is_integer(arrow_type) or pa.types.is_floating(arrow_type))


def _numeric_list_columns(ds, columns: list[str]) -> list[str]:
    schema = ds.data.schema
    return [c for c in columns if _is_numeric_list(schema.field(c).type)]


def _list_value(arr, i: int):
    """Row ``i`` of a (nested) list array as an n-d numpy array, read through the offsets.
    ``None`` for a null row; a row with nulls or lists of uneven lengths inside comes back as
    Python lists (:func:`load_video_value` reports those)."""
    import pyarrow as pa

    if not arr[i].is_valid:
        return None
    level, start, end, shape = arr, i, i + 1, []
    while pa.types.is_list(level.type) or pa.types.is_large_list(level.type):
        if level.slice(start, end - start).null_count:
            return arr[i].as_py()
        offsets = level.offsets.slice(start, end - start + 1).to_numpy()
        lengths = np.diff(offsets)
        if lengths.size and (lengths != lengths[0]).any():
            return arr[i].as_py()
        shape.append(int(lengths[0]) if lengths.size else 0)
        start, end, level = int(offsets[0]), int(offsets[-1]), level.values
    leaf = level.slice(start, end - start)
    if leaf.null_count:
        return arr[i].as_py()
    return leaf.to_numpy(zero_copy_only=False).reshape(shape)


def iter_rows(ds, columns: list[str] | None = None, batch_size: int = ROW_BATCH):
    """Yield every row of ``ds`` as a dict of ``columns`` (default: all), with the values
    ``ds.with_format("numpy")`` gives, except that untyped numeric nested-list columns come
    back as n-d numpy arrays converted from Arrow ``batch_size`` rows at a time (fast, and
    only one batch of them in memory)."""
    columns = list(ds.column_names if columns is None else columns)
    lists = _numeric_list_columns(ds, columns)
    if not lists:
        yield from ds.with_format("numpy", columns=columns)
        return
    others = [c for c in columns if c not in lists]
    rest = iter(ds.with_format("numpy", columns=others)) if others else None
    arrow = ds.with_format("arrow", columns=lists)
    for start in range(0, len(ds), batch_size):
        table = arrow[start : start + batch_size]
        arrays = {c: table.column(c).combine_chunks() for c in lists}
        for j in range(table.num_rows):
            row = dict(next(rest)) if rest is not None else {}
            row.update({c: _list_value(arrays[c], j) for c in lists})
            yield row


def value_reader(ds, column: str):
    """A function ``i -> value`` of one column with random access, values as :func:`iter_rows`
    gives them (nested-list videos as arrays, without the numpy formatter's slow path)."""
    if _numeric_list_columns(ds, [column]):
        arrow = ds.with_format("arrow", columns=[column])
        return lambda i: _list_value(arrow[i : i + 1].column(column).combine_chunks(), 0)
    formatted = ds.with_format("numpy", columns=[column])
    return lambda i: formatted[i][column]


# --------------------------------------------------------------------------------------------
# validation


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

    Fatal: empty prompt; unknown preference or per-aspect label; a video that is missing,
    undecodable (corrupt, truncated), has fewer than ``min_frames`` frames, or whose path leaves
    the root or is absolute (unless allowed); with ``target`` (a model's ``num_frames`` /
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
    for i, row in enumerate(iter_rows(ds)):
        msgs, prompt, pref = _label_problems(row, aspects)
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


def video_fps(value, root=None, allow_absolute_paths: bool = False, column_fps=None) -> float | None:
    """The frame rate of a row's video: what its file (or embedded bytes) records, else the
    row's ``fps_a`` / ``fps_b`` value, else None (arrays and stills record none)."""
    from align.data.video import bytes_fps, video_info

    fps = None
    if isinstance(value, (str, np.str_)):
        try:
            fps = video_info(resolve_video_path(str(value), root, allow_absolute_paths))["fps"]
        except ValueError:
            fps = None
    elif isinstance(value, dict) and value.get("bytes"):
        fps = bytes_fps(value["bytes"])
    if fps is None and column_fps is not None:
        try:
            fps = float(column_fps)
        except (TypeError, ValueError):
            fps = None
        fps = fps if fps and np.isfinite(fps) and fps > 0 else None
    return fps


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


def plot_summary(summary: dict, path: str | Path, title: str = "") -> Path:
    """Histograms of prompt length, video length (frames, seconds) and file size, written as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("prompt_words", "prompt length (words)"),
        ("video_frames", "video length (frames)"),
        ("video_seconds", "video length (seconds)"),
        ("video_bytes", "video size (KiB)"),
    ]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.4))
    for ax, (key, label) in zip(axes, panels):
        values = np.asarray(summary[key], dtype=float)
        if key == "video_bytes":
            values = values / 1024
        if len(values):
            ax.hist(values, bins=min(30, max(1, len(np.unique(values)))), color="#4477aa")
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel(label)
        ax.set_ylabel("count")
    c = summary["counts"]
    counts = f"a={c['a']} b={c['b']} tie={c['tie']} (tie share {summary['tie_share']:.2f})"
    fig.suptitle(f"{title}  rows={summary['rows']}  {counts}")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, path)
    return path
