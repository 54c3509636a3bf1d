"""Pairs to annotate, from a preference dataset or a ``vidalign generate`` output directory.

A :class:`Pair` names each of its two videos by a *media path* ``"<root>/<relative path>"``:
``data/...`` is a file under the dataset root (served as it is), ``cache/...`` a file this
module wrote into the cache directory. Browsers play MP4 (H.264) and WebM in a ``<video>``
element, which can be paused, looped and kept in sync; they cannot do that with GIFs. So GIF
files and decoded ``uint8 (T, H, W, C)`` arrays are converted once to ``cache_format`` (WebM by
default: every PyAV build here has a VP9/VP8 encoder, while MP4 falls back to MPEG-4 Part 2,
which browsers do not play). Cached files are named by a hash of their content, so a second
``serve`` reuses them and a changed video gets a new file.

Every video must resolve (symlinks followed) to a file inside the dataset root; a row that
points elsewhere is an error naming the row, because the server serves nothing outside it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import numpy as np

from align.atomic import file_sha256

#: suffixes a browser's <video> element plays, served straight from the dataset root
PLAYABLE = (".mp4", ".webm")
CACHE_FORMATS = ("webm", "mp4")
#: cached conversions are upscaled (nearest neighbour) until the short side is at least this
MIN_CACHE_SIDE = 128


@dataclass(frozen=True)
class Pair:
    """Two videos of one prompt. ``media_*`` are what the server serves; ``video_*`` the
    absolute source file (``None`` for a decoded array, then ``source_row`` is its row)."""

    key: str
    prompt: str
    media_a: str
    media_b: str
    video_a: str | None
    video_b: str | None
    source_row: int | None


@dataclass
class PairSource:
    """What :func:`load_pairs` found: the pairs, the served roots and where they came from."""

    pairs: list[Pair]
    roots: dict[str, Path]  # "data" -> dataset root, "cache" -> cache directory (both resolved)
    source: str  # absolute path of the dataset or generate directory
    kind: str  # "dataset" | "generate"


def load_pairs(
    path: str | Path,
    cache_dir: str | Path,
    root: str | Path | None = None,
    cache_format: str = "webm",
    fps: int = 8,
) -> PairSource:
    """Pairs from ``path``: a ``vidalign generate`` directory (it holds ``index.jsonl``) or a
    local preference dataset in any layout :func:`~align.data.preference.load_preference_dataset`
    reads. ``root`` (default: the dataset's root, i.e. its directory, or the folder of a table
    file) is the folder videos must lie in; ``cache_dir`` receives converted videos. Raises
    ``ValueError`` / ``FileNotFoundError`` naming the row or line and file of every problem."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"pairs {path}: no such directory or file (annotation needs local videos)")
    if cache_format not in CACHE_FORMATS:
        raise ValueError(f"cache format must be one of {CACHE_FORMATS}, got {cache_format!r}")
    base = path if path.is_dir() else path.parent  # where relative video paths start
    data_root = Path(os.path.realpath(root if root is not None else base))
    if not data_root.is_dir():
        raise FileNotFoundError(f"root {root}: no such directory")
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    cache = Path(os.path.realpath(cache))
    conv = _Converter(cache, cache_format, fps)
    if (path / "index.jsonl").is_file():
        pairs, kind = _pairs_from_generate(path, data_root, conv), "generate"
    else:
        pairs, kind = _pairs_from_dataset(path, base, data_root, conv), "dataset"
    if not pairs:
        raise ValueError(f"pairs {path}: no pairs to annotate")
    return PairSource(pairs, {"data": data_root, "cache": cache}, str(Path(os.path.realpath(path))), kind)


def inside(path: Path, root: Path) -> Path | None:
    """``path`` with symlinks resolved if that lies inside the (resolved) ``root``, else ``None``."""
    real = Path(os.path.realpath(path))
    return real if real == root or real.is_relative_to(root) else None


# --------------------------------------------------------------------------------------------
# the two sources


def _pairs_from_dataset(path: Path, base: Path, data_root: Path, conv: _Converter) -> list[Pair]:
    """One pair per row of a preference dataset; its ``preference`` column is ignored.

    A video may be a path (relative to ``base``, or absolute; either way it must resolve
    inside ``data_root``), a ``{"bytes", "path"}`` dict (a ``datasets.Video`` column: bytes are
    decoded and cached, a bare path is a path), or a decoded array (cached). ``source_row`` is
    set for rows with any non-file video, so that the export can take those from the dataset."""
    from align.data.preference import PreferenceDataError, load_preference_dataset, load_video_value, value_reader

    ds = load_preference_dataset(path)
    arrays = {c: _is_array(ds.features[c]) for c in ("video_a", "video_b")}
    readers = {c: value_reader(ds, c) for c, a in arrays.items() if a}  # nested lists too, read fast
    values = {c: None if a else ds[c] for c, a in arrays.items()}
    problems: list[tuple[int, str]] = []
    pairs = []
    for i, prompt in enumerate(ds["prompt"]):
        msgs = [] if isinstance(prompt, str) and prompt.strip() else ["empty prompt"]
        media, files = {}, {}
        for col in ("video_a", "video_b"):
            value = readers[col](i) if arrays[col] else values[col][i]
            if isinstance(value, dict) and not value.get("bytes"):
                value = value.get("path")  # a datasets.Video entry that only names its file
            try:
                if value is None or (isinstance(value, str) and not value.strip()):
                    raise ValueError("no video (empty value)")
                if isinstance(value, str):
                    media[col], files[col] = _file_media(value, base, data_root, conv)
                else:
                    media[col], files[col] = conv.array(load_video_value(value)), None
            except (ValueError, FileNotFoundError, OSError) as e:
                msgs.append(f"{col}: {e}")
        if msgs:
            problems += [(i, m) for m in msgs]
            continue
        row = None if files["video_a"] and files["video_b"] else i
        pairs.append(
            Pair(f"row{i}", prompt, media["video_a"], media["video_b"], files["video_a"], files["video_b"], row)
        )
    if problems:
        raise PreferenceDataError(str(path), problems)
    return pairs


def _is_array(feature) -> bool:
    """Whether a column holds decoded frames (``datasets.Array4D`` and kin, or nested lists)."""
    import datasets

    names = ("Array2D", "Array3D", "Array4D", "Array5D", "Sequence", "List")
    return isinstance(
        feature, (list, *(getattr(datasets, n) for n in names if isinstance(getattr(datasets, n, None), type)))
    )


def _pairs_from_generate(path: Path, data_root: Path, conv: _Converter) -> list[Pair]:
    """Every two videos of the same prompt in ``index.jsonl`` (``file``, ``prompt``, ``seed``)
    form a pair: ``k`` videos of a prompt give ``k (k - 1) / 2`` pairs, in file order."""
    index = path / "index.jsonl"
    by_prompt: dict[str, list[tuple[str, str, str]]] = {}
    problems = []
    for n, line in enumerate(index.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"line {n}: not JSON ({e})")
            continue
        if not isinstance(row, dict) or not isinstance(row.get("file"), str) or not isinstance(row.get("prompt"), str):
            problems.append(f"line {n}: needs string fields 'file' and 'prompt', got {line[:200]}")
            continue
        if not row["prompt"].strip():
            problems.append(f"line {n}: empty prompt")
            continue
        try:
            media, real = _file_media(row["file"], path, data_root, conv)
        except (ValueError, FileNotFoundError, OSError) as e:
            problems.append(f"line {n}: {e}")
            continue
        by_prompt.setdefault(row["prompt"], []).append((row["file"], media, real))
    if problems:
        raise ValueError(f"{index}: {len(problems)} bad line(s)\n  " + "\n  ".join(problems[:20]))
    pairs = [
        Pair(f"{fa}|{fb}", prompt, ma, mb, ra, rb, None)
        for prompt, videos in by_prompt.items()
        for (fa, ma, ra), (fb, mb, rb) in combinations(videos, 2)
    ]
    if not pairs:
        raise ValueError(f"{index}: no prompt has two videos to compare (generate with --num 2 or more)")
    return pairs


def _file_media(value: str, base: Path, data_root: Path, conv: _Converter) -> tuple[str, str]:
    """``(media path, absolute file)`` of a video file named relative to ``base`` (or absolute)."""
    p = Path(value)
    p = p if p.is_absolute() else base / p
    real = inside(p, data_root)
    if real is None:
        raise ValueError(
            f"{value} resolves to {os.path.realpath(p)}, outside the root {data_root} "
            "(videos are served only from inside it; pass --root to choose a wider one)"
        )
    if not real.is_file():
        raise FileNotFoundError(f"{value}: no such video file ({p})")
    if real.suffix.lower() in PLAYABLE:
        return "data/" + real.relative_to(data_root).as_posix(), str(real)
    return conv.file(real), str(real)


# --------------------------------------------------------------------------------------------
# conversion into the cache


class _Converter:
    """Writes browser-playable copies into the cache, once per distinct content."""

    def __init__(self, cache: Path, fmt: str, fps: int):
        self.cache, self.fmt, self.fps = cache, fmt, fps

    def file(self, path: Path) -> str:
        """A cached conversion of a video file (e.g. a GIF) the browser cannot sync."""
        digest = file_sha256(path)[:20]
        target = self.cache / f"{digest}.{self.fmt}"
        if not target.is_file():
            from align.data.video import read_video, video_info

            self._write(target, read_video(path), video_info(path)["fps"])
        return "cache/" + target.name

    def array(self, value) -> str:
        """A cached encoding of a decoded ``uint8 (T, H, W, 3)`` video."""
        arr = np.asarray(value)
        if arr.ndim != 4 or arr.shape[-1] != 3:
            raise ValueError(f"must be (T, H, W, 3), got shape {arr.shape}")
        arr = np.ascontiguousarray(arr if arr.dtype == np.uint8 else np.clip(arr, 0, 255).astype(np.uint8))
        digest = hashlib.sha256(repr(arr.shape).encode() + arr.tobytes()).hexdigest()[:20]
        target = self.cache / f"{digest}.{self.fmt}"
        if not target.is_file():
            self._write(target, arr)
        return "cache/" + target.name

    def _write(self, target: Path, frames: np.ndarray, fps: float | None = None) -> None:
        from align.data.video import write_video

        scale = max(1, math.ceil(MIN_CACHE_SIDE / min(frames.shape[1:3])))
        fps = max(1, round(fps)) if fps else self.fps  # a GIF's own rate where it records one
        write_video(target, frames, fps=fps, scale=scale)  # atomic: temp file, then rename
