"""The preference-data schema and loading it: from many layouts, one video value at a time,
and row by row.

Checking rows is :mod:`align.data.checks`; turning rows into chosen/rejected pairs is
:mod:`align.data.pairs`.

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
stay inside the root: ``..`` that leaves it, a symlink whose target lies outside it (every
path is resolved, symlinks followed: a cloned dataset cannot pull in files from elsewhere on
the machine), and absolute paths are errors; ``allow_absolute_paths`` trusts both absolute
paths and symlinks out of the root. A root inside the Hugging Face cache (``<repo>/snapshots/
<rev>/``, whose files are symlinks to ``<repo>/blobs/``) contains the whole cached repository.
DPO cannot use ties; they are skipped and counted, never dropped silently.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
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
        check_saved_files(p)
        try:
            return datasets.load_from_disk(str(p))
        except Exception as e:  # datasets raises several types for a damaged directory
            raise ValueError(f"{p}: not a dataset saved with save_to_disk ({e})") from None
    for name in METADATA_NAMES:
        if (p / name).is_file():
            inside_root(p / name, p)
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


def check_saved_files(p: Path) -> None:
    """Check that the table and state files of a ``save_to_disk`` directory (and of its splits)
    resolve inside it (:func:`inside_root`)."""
    for pattern in ("*.json", "*.arrow", "*/*.json", "*/*.arrow"):
        for f in p.glob(pattern):
            inside_root(f, p)


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
            texts[name] = inside_root(f, p).read_text(encoding="utf-8").strip() if f.is_file() else ""
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
    is empty, absolute, leaves ``root`` through ``..``, or resolves (symlinks followed) outside
    ``root`` (:func:`inside_root`); ``allow_absolute_paths`` trusts absolute paths and symlinks
    out of the root."""
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
    if root is None:
        return Path(norm)
    path = Path(root) / norm
    if not allow_absolute_paths:
        inside_root(path, Path(root))
    return path


def inside_root(path: Path, root: Path) -> Path:
    """``path`` (a path under ``root`` as written) resolved, symlinks followed, after checking
    that it stays inside ``root``; a ``ValueError`` naming both otherwise. A root in the Hugging
    Face cache (``.../datasets--o--n/snapshots/<rev>``) contains the cached repository, whose
    snapshot files are symlinks to its ``blobs/``."""
    real, base = Path(path).resolve(), _containing_root(Path(root))
    if real != base and not real.is_relative_to(base):
        raise ValueError(f"{path}: a symlink out of the dataset root {root} (it leads to {real})")
    return real


def _containing_root(root: Path) -> Path:
    """The resolved ``root``, or the cached repository folder when ``root`` is (inside) a
    snapshot of the Hugging Face cache."""
    base = root.resolve()
    parts = base.parts
    for k in range(len(parts) - 2, 0, -1):
        if parts[k] == "snapshots" and parts[k - 1].startswith(("datasets--", "models--", "spaces--")):
            return Path(*parts[:k])
    return base


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
