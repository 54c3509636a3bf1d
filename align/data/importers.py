"""Importers: map the published layouts of public preference sets onto the vidalign schema.

    import_dataset("videogen-rewardbench", "VideoGen-RewardBench/", "data/vgrb")
    vidalign data import --format pickapic pickapic_v2/ out/pickapic --limit 10000 --skip-bad

Formats (``FORMATS``; column names, sources and licenses in ``data/<layout>.md``):

- ``pickapic``: Pick-a-Pic v2 as published (``caption``, ``jpg_0`` / ``jpg_1`` JPEG bytes,
  ``label_0`` / ``label_1``, ``has_label``, ``are_different``, ``model_*``, ``user_id``,
  ``ranking_id``), or the same layout with image or video paths (``image_0`` / ``file_0`` /
  ``path_0`` / ``video_0`` ...). Stills are one-frame videos. Unlabelled rows and rows with
  ``are_different`` false are skipped and counted.
- ``hpdv2``: HPDv2-style ranked images, one row per prompt: ``prompt``, a list of images
  (``image`` / ``image_path`` / ``file_path``) and a list of ``human_preference`` (higher wins)
  or ``rank`` (lower wins) -> every pair of the row.
- ``imagereward``: ImageRewardDB-style, one row per image: ``prompt_id``, ``prompt``, ``image``
  / ``image_path``, ``rank`` (lower wins) -> every pair of one prompt.
- ``videogen-rewardbench``: VideoGen-RewardBench from a local clone of its Hub repository (the
  README's split ``eval``: ``videogen-rewardbench.csv``; videos read from ``videos.zip``):
  ``path_A``, ``path_B``, ``prompt``, ``Overall`` / ``VQ`` / ``MQ`` / ``TA`` in A | B | same.
- ``videoalign``: VideoAlign's training CSV: ``path_A, path_B, prompt, VQ, MQ, TA, fps_*,
  num_frames_*``, no ``Overall``: the overall label is the majority of the aspect labels, or
  one aspect (``overall_from``); the aspects are kept.
- ``genai-bench-video``: GenAI-Bench video (``prompt, left_video, right_video, vote_type`` in
  leftvote | rightvote | tievote | bothbad_vote; ``bothbad``: tie by default, or skip).
- ``rapidata``: Rapidata video pairs (``prompt``, ``video1`` / ``video2`` or ``file_name1`` /
  ``file_name2``, ``weighted_results1_Preference`` / ``weighted_results2_Preference`` and the
  same for each other criterion, e.g. Coherence, Alignment).
- ``videofeedback``: per-video scores (VideoFeedback / VideoScore aspects, LiFT-style ratings:
  ``text prompt``, a video or a list of frame ``images``, score columns) -> pairs within a
  prompt (a score gap of at most ``tie_margin`` is a tie), or scored samples for RWR.
- ``chosen-rejected``: ``prompt`` with ``chosen`` / ``rejected`` videos; which one becomes
  ``video_a`` is drawn per row from ``seed``, so position carries no signal.

Sources are read as streams (:func:`open_source`): Parquet by Arrow record batches, CSV and
JSONL row by row, a Hub id with ``datasets`` streaming, a local clone of a Hub repository through
the ``configs`` of its README. Nothing is read ahead: ``limit`` imports a prefix, and a layout
that does not fit stops within the first rows. CSV is read strictly: a row with more or fewer
fields than the header, a quoted field that swallowed whole rows (an unbalanced quote), bad
quoting or a field over ``MAX_CSV_FIELD`` characters is a bad record named by file and line,
like a JSONL line that is not a JSON object; a file that cannot be read on (a truncated
Parquet, a quote left open over several lines) is an error naming the file. Numbers must be
finite: NaN or infinity in a score or label column is a bad row, not a missing value. Media
are paths (relative to the source's root, with the safety checks of loading: every path,
symlinks followed, must resolve inside the root; a member of a ``.zip`` at the root when the
file is not there) or embedded bytes. Each is copied into ``DST/videos/<content
hash><ext>`` (hard-linked when possible; identical files stored once), so ``DST`` is a
self-contained ``save_to_disk`` dataset. Stills are decoded at import (cheap, finds truncated
JPEGs); videos are not (``vidalign data validate`` decodes them) unless ``preprocessing`` or
``repeat_frames`` asks for new clips.
Every bad row is reported with its index and column; the import fails (``bad_rows="error"``,
after at most ``MAX_PROBLEMS`` of them) or skips and counts them (``"skip"``, but the first
``FAIL_FAST_ROWS`` rows all failing alike stop it: the layout is wrong). ``DST`` is written
atomically.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import re
import shutil
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from align.atomic import atomic_directory, file_sha256
from align.data.preference import (
    HUB_ID,
    IMAGE_EXTS,
    MEDIA_EXTS,
    METADATA_NAMES,
    TABLE_SUFFIXES,
    HubRoot,
    PreferenceDataError,
    check_saved_files,
    inside_root,
    load_pair_folders,
    resolve_video_path,
    undecoded_media,
    video_label,
)
from align.data.video import (
    check_image,
    decode_video_bytes,
    read_video,
    repeat_frames,
    resample_frames,
    sniff_media_format,
    sniff_video_format,
    video_info,
    write_video,
)

FORMATS = (
    "pickapic",
    "hpdv2",
    "imagereward",
    "videogen-rewardbench",
    "videoalign",
    "genai-bench-video",
    "rapidata",
    "videofeedback",
    "chosen-rejected",
)
GROUPED_FORMATS = ("hpdv2", "imagereward", "videofeedback")  # scored items -> pairs (or samples)
DEFAULT_SPLITS = {"videogen-rewardbench": "eval"}  # the split a format's Hub repository publishes
FAIL_FAST_ROWS = 20  # skip mode: this many first rows all failing alike stop the import
MAX_PROBLEMS = 20  # error mode: stop reading after this many bad rows
ROW_BATCH = 256  # Parquet rows per Arrow record batch
CHUNK_ROWS = 4096  # output rows per Arrow chunk
MAX_CSV_FIELD = 1 << 20  # characters in one CSV field (csv's default limit is 131,072)

PICKAPIC_MEDIA = (
    ("jpg_0", "jpg_1"),
    ("image_0", "image_1"),
    ("video_0", "video_1"),
    ("file_0", "file_1"),
    ("path_0", "path_1"),
)
AB_LABELS = {"a": "a", "b": "b", "same": "tie", "tie": "tie"}
AB_ASPECTS = {"VQ": "visual_quality", "MQ": "motion_quality", "TA": "text_alignment"}
GENAI_VOTES = {"leftvote": "a", "rightvote": "b", "tievote": "tie", "bothbad_vote": "tie"}
CHOSEN_REJECTED = (("chosen", "rejected"), ("video_chosen", "video_rejected"), ("chosen_video", "rejected_video"))
VIDEOFEEDBACK_SCORES = (
    "visual quality",
    "temporal consistency",
    "dynamic degree",
    "text-to-video alignment",
    "factual consistency",
)


@dataclass
class ImportOptions:
    """The knobs of one import (each named after its CLI flag)."""

    seed: int = 0  # chosen-rejected: the a/b order
    overall_from: str | None = None  # videoalign / vgrb: take the overall label from this aspect; videofeedback: score
    bothbad: str = "tie"  # genai-bench-video: bothbad_vote -> "tie" or "skip"
    tie_margin: float = 0.0  # scored formats and rapidata: a gap of at most this is a tie
    as_samples: bool = False  # grouped formats: write scored samples (prompt, video, reward, group) for RWR
    score_columns: tuple[str, ...] | None = None  # videofeedback: which columns are scores
    repeat_frames: int | None = None  # stills become this many identical frames (mp4)
    frames_fps: float = 8.0  # a video given as a list of frame images is written at this rate


@dataclass(frozen=True)
class _BadRecord:
    """A source record that cannot be read as a row (a CSV row with the wrong number of fields,
    a JSONL line that is not an object): a bad row of the import, named by file and line."""

    message: str


class _Skip(Exception):
    """A row that carries no preference (unlabelled, not different, bothbad): counted, not an error."""

    def __init__(self, reason: str = "unlabelled"):
        super().__init__(reason)
        self.reason = reason


@dataclass
class Source:
    """A table read as a stream: its column names, an iterator over its rows (dicts), the root
    relative media paths resolve against, and what was opened."""

    columns: list[str]
    rows: Iterator[dict | _BadRecord]
    root: Path | HubRoot | None
    files: list[str] = field(default_factory=list)
    split: str | None = None


# --------------------------------------------------------------------------------------------
# the entry point


def import_dataset(
    fmt: str,
    src: str | Path,
    dst: str | Path,
    *,
    split: str | None = None,
    revision: str | None = None,
    seed: int = 0,
    bad_rows: str = "error",
    allow_absolute_paths: bool = False,
    overwrite: bool = False,
    preprocessing: dict | None = None,
    limit: int | None = None,
    options: ImportOptions | None = None,
) -> dict:
    """Read ``src`` in layout ``fmt`` as a stream, write a schema dataset with its media to ``dst``.

    ``split``: default the format's published split (``DEFAULT_SPLITS``), else the only split
    of a clone's README, else ``train``. ``limit``: import the first ``limit`` source rows.
    ``preprocessing`` (``num_frames``, ``height``, ``width``, ``fps``) decodes each video,
    brings it to a model's input with :func:`align.data.video.resample_frames` and stores that
    as mp4 (H.264, CRF 15: near-lossless, not lossless) instead of copying the file; so does
    ``options.repeat_frames`` for stills. ``options`` holds the format-specific knobs.

    Returns ``{"rows_in", "rows_out", "skipped", "videos", "seconds", "rows_per_s", ...}``
    (also saved as ``dst/vidalign_import.json``). Raises :class:`PreferenceDataError` listing
    the bad rows with ``bad_rows="error"``, ``ValueError`` for an unknown format, missing
    source columns, a layout whose first rows all fail alike, or when ``dst`` exists and not
    ``overwrite``.
    """
    import datasets

    opts = options or ImportOptions(seed=seed)
    pre = _checked_arguments(fmt, bad_rows, preprocessing, opts, limit)
    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise ValueError(f"{dst} already exists (pass overwrite=True / --overwrite to replace it)")
    source = open_source(src, split or DEFAULT_SPLITS.get(fmt), revision)
    if isinstance(source.root, HubRoot) and revision:
        source.root = HubRoot(source.root.repo_id, revision)
    mapper = _mapper(fmt, source.columns, str(src), opts)
    name = f"{src} ({fmt})"
    start = time.perf_counter()
    with atomic_directory(dst) as stage:  # written aside, renamed into place when complete
        store = _MediaStore(stage, source.root, allow_absolute_paths, pre, opts)
        where = str(source.files[0] if len(source.files) == 1 else src)
        run = _run(source, mapper, store, _Problems(name, bad_rows), limit, {"source": where, "source_format": fmt})
        if fmt in GROUPED_FORMATS and opts.as_samples:
            run.writer.extend(_samples(run.items))
        elif fmt in GROUPED_FORMATS:
            rows = _scored_pairs(run.items, opts.tie_margin)
            run.skipped["unpaired_videos"] = store.drop_unused({r[c] for r in rows for c in ("video_a", "video_b")})
            run.writer.extend(rows)
        if run.writer.n == 0:
            raise ValueError(f"{name}: no rows to import (read {run.rows_in}; skipped: {run.skipped})")
        datasets.Dataset(datasets.table.InMemoryTable(run.writer.table())).save_to_disk(str(stage))
        seconds = time.perf_counter() - start
        stats = {
            "format": fmt,
            "source": str(src),
            "files": source.files,
            "split": source.split,
            "rows_in": run.rows_in,
            "rows_out": run.writer.n,
            "skipped": run.skipped,
            "problems": [f"row {r}: {m}" for r, m in run.problems],
            "videos": len(store.stored),
            "preprocessing": pre,
            "kind": "scored samples" if opts.as_samples else "preference pairs",
            "seconds": round(seconds, 3),
            "rows_per_s": round(run.rows_in / seconds, 1) if seconds > 0 else None,
            "dst": str(dst),
        }
        (stage / "vidalign_import.json").write_text(json.dumps(stats, indent=2))
    return stats


def _checked_arguments(fmt: str, bad_rows: str, preprocessing: dict | None, opts: ImportOptions, limit) -> dict:
    """The preprocessing keys given, once every argument of :func:`import_dataset` is checked."""
    pre = {k: v for k, v in (preprocessing or {}).items() if v is not None}
    unknown = sorted(set(pre) - {"num_frames", "height", "width", "fps"})
    if unknown:
        raise ValueError(f"unknown preprocessing key(s) {unknown}; use num_frames, height, width, fps")
    if fmt not in FORMATS:
        raise ValueError(f"unknown import format {fmt!r}; use one of {list(FORMATS)}")
    if bad_rows not in ("error", "skip"):
        raise ValueError(f"bad_rows must be 'error' or 'skip', got {bad_rows!r}")
    if opts.as_samples and fmt not in GROUPED_FORMATS:
        raise ValueError(f"as_samples (--as-samples) needs a scored format ({list(GROUPED_FORMATS)}), not {fmt!r}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    return pre


@dataclass
class _Run:
    rows_in: int
    skipped: dict
    problems: list
    writer: _RowWriter
    items: list


def _run(source: Source, mapper, store: _MediaStore, problems: _Problems, limit: int | None, provenance: dict) -> _Run:
    """Map, store and write every source row (up to ``limit``); scored items are collected."""
    writer, items = _RowWriter(), []
    skipped = {"unlabelled": 0, "bad_row": 0}
    rows_in = 0
    for i, row in enumerate(source.rows):
        if limit is not None and i >= limit:
            break
        rows_in += 1
        if isinstance(row, _BadRecord):
            problems.bad(i, [row.message])
            continue
        try:
            records = mapper(i, row)
        except _Skip as s:
            skipped[s.reason] = skipped.get(s.reason, 0) + 1
            continue
        except (ValueError, TypeError) as e:
            problems.bad(i, [str(e)])
            continue
        out, row_problems = [], []
        for mapped, media in records:
            for col, (src_col, value) in media.items():
                try:
                    mapped[col] = store.put(value)
                except (ValueError, OSError) as e:
                    text, label = str(e), video_label(value)
                    row_problems.append(f"{src_col}: {text}" if label in text else f"{src_col}: {label}: {text}")
            out.append(mapped)
        if row_problems:
            problems.bad(i, row_problems)
            continue
        problems.good()
        for mapped in out:
            mapped.update(provenance, source_row=i)
            if "_group" in mapped:
                items.append(mapped)
            else:
                writer.add(mapped)
    problems.finish()
    skipped["bad_row"] = len({r for r, _ in problems.rows})
    return _Run(rows_in, skipped, problems.rows, writer, items)


class _Problems:
    """Bad rows of one import, and when to stop: ``error`` mode after ``MAX_PROBLEMS`` bad rows
    (or at the end); ``skip`` mode when the first ``FAIL_FAST_ROWS`` rows all fail with the same
    error (the layout does not fit; reading on would fail the same way for hours)."""

    def __init__(self, name: str, bad_rows: str):
        self.name, self.mode = name, bad_rows
        self.rows: list[tuple[int, str]] = []
        self.seen_good = False
        self.signatures: set[tuple] = set()

    def good(self) -> None:
        self.seen_good = True

    def bad(self, row: int, messages: list[str]) -> None:
        self.rows += [(row, m) for m in messages]
        n_bad = len({r for r, _ in self.rows})
        if self.mode == "error" and n_bad >= MAX_PROBLEMS:
            raise PreferenceDataError(f"{self.name}, stopped after {n_bad} bad rows", self.rows)
        if not self.seen_good:
            self.signatures.add(tuple(_signature(m) for m in messages))
            if n_bad >= FAIL_FAST_ROWS and len(self.signatures) == 1:
                first = next(m for r, m in self.rows if r == self.rows[0][0])
                raise ValueError(
                    f"{self.name}: the first {n_bad} rows all fail the same way, so the layout does not fit "
                    f"(stopped at row {row}); row {self.rows[0][0]}: {first}"
                )

    def finish(self) -> None:
        if self.rows and self.mode == "error":
            raise PreferenceDataError(self.name, self.rows)


def _signature(message: str) -> str:
    """A message with its values (quoted text, paths, numbers) blanked: "the same error"."""
    return re.sub(r"'[^']*'|\"[^\"]*\"|\S*[/\\]\S*|<[^>]*>|\d+(\.\d+)?", "_", message)


class _RowWriter:
    """Output rows collected as Arrow chunks (compact: no Python dict per row is kept)."""

    def __init__(self):
        self.chunks: list = []
        self.pending: list[dict] = []
        self.n = 0

    def add(self, row: dict) -> None:
        self.pending.append(row)
        self.n += 1
        if len(self.pending) >= CHUNK_ROWS:
            self._flush()

    def extend(self, rows: list[dict]) -> None:
        for r in rows:
            self.add(r)

    def _flush(self) -> None:
        import pyarrow as pa

        if self.pending:
            self.chunks.append(pa.Table.from_pylist(self.pending))
            self.pending = []

    def table(self):
        import pyarrow as pa

        self._flush()
        return pa.concat_tables(self.chunks, promote_options="default").combine_chunks()


# --------------------------------------------------------------------------------------------
# reading sources as streams


def open_source(src: str | Path, split: str | None = None, revision: str | None = None) -> Source:
    """Open ``src`` for streaming: a ``.parquet`` / ``.csv`` / ``.jsonl`` / ``.json`` file, a
    ``save_to_disk`` directory, a directory with ``metadata.*`` or pair folders, a local clone of
    a Hub dataset repository (its README's ``configs`` name the files of each split; without
    them, files named after the split, or the only table file), or a Hub id (``datasets``
    streaming). Raises ``FileNotFoundError`` / ``ValueError`` naming what is missing."""
    p = Path(src)
    if p.is_file():
        return _file_source([p], p.parent, None)
    if p.is_dir():
        return _dir_source(p, split)
    if isinstance(src, str) and HUB_ID.match(src) and not src.startswith("."):
        return _hub_source(src, split or "train", revision)
    raise FileNotFoundError(f"{src}: no such directory or file (nor a Hub dataset id)")


def _file_source(files: list[Path], root: Path, split: str | None) -> Source:
    """Rows of one or more table files of one kind, one after the other."""
    kinds = {TABLE_SUFFIXES.get(f.suffix.lower()) for f in files}
    if None in kinds:
        bad = next(f for f in files if f.suffix.lower() not in TABLE_SUFFIXES)
        raise ValueError(f"{bad}: unsupported file type {bad.suffix!r}; use one of {sorted(TABLE_SUFFIXES)}")
    columns = _columns(files[0])

    def rows():
        for f in files:
            yield from _file_rows(f)

    return Source(columns, rows(), root, [str(f) for f in files], split)


def _columns(f: Path) -> list[str]:
    """The column names of a table file, read from its header (no rows read for Parquet/CSV)."""
    suffix = f.suffix.lower()
    if suffix == ".parquet":
        return list(_parquet_file(f).schema_arrow.names)
    if suffix == ".csv":
        return _csv_header(f)
    first = next((r for r in _file_rows(f) if isinstance(r, dict)), None)
    return list(first) if first else []


def _file_rows(f: Path) -> Iterator[dict | _BadRecord]:
    """Rows of one table file as dicts, streamed: Parquet by record batches, CSV / JSONL by line.
    A record that cannot be a row comes as a :class:`_BadRecord`; a file that cannot be read
    on is a ``ValueError`` naming it."""
    suffix = f.suffix.lower()
    read = {".parquet": _parquet_rows, ".csv": _csv_rows, ".jsonl": _jsonl_rows}.get(suffix, _json_rows)
    try:
        yield from read(f)
    except UnicodeDecodeError as e:
        raise ValueError(f"{f}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _parquet_file(f: Path):
    """``pyarrow.parquet.ParquetFile(f)``; a damaged file is a ``ValueError`` naming it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(f)
    except (OSError, pa.ArrowException) as e:
        raise ValueError(f"{f}: cannot read as parquet ({e})") from None


def _parquet_rows(f: Path) -> Iterator[dict]:
    import pyarrow as pa

    try:
        for batch in _parquet_file(f).iter_batches(batch_size=ROW_BATCH):
            yield from batch.to_pylist()
    except (OSError, pa.ArrowException) as e:  # ArrowInvalid is a ValueError, ArrowIOError an OSError
        raise ValueError(f"{f}: cannot read as parquet ({e})") from None


def _jsonl_rows(f: Path) -> Iterator[dict | _BadRecord]:
    with open(f, encoding="utf-8") as fh:
        for n, line in enumerate(fh, start=1):
            if line.strip():
                yield _json_record(line, f, n)


def _json_rows(f: Path) -> Iterator[dict | _BadRecord]:
    """A ``.json`` table: a list of objects, or an object of objects (the key becomes ``id``)."""
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{f}: not valid JSON (line {e.lineno}: {e.msg})") from None
    if isinstance(data, dict):  # {id: record}: the id becomes a column
        data = [{"id": k, **v} if isinstance(v, dict) else {"id": k, "value": v} for k, v in data.items()]
    if not isinstance(data, list):
        raise ValueError(f"{f}: a JSON table must be a list of objects (or an object of objects)")
    for k, rec in enumerate(data):
        yield rec if isinstance(rec, dict) else _BadRecord(f"{f}: item {k} is not a JSON object")


def _json_record(line: str, f: Path, n: int) -> dict | _BadRecord:
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        return _BadRecord(f"{f}: line {n} is not valid JSON ({e.msg})")
    if not isinstance(rec, dict):
        return _BadRecord(f"{f}: line {n} is not a JSON object")
    return rec


def _csv_header(f: Path) -> list[str]:
    """The first row of a CSV file (a ``ValueError`` naming the file when it cannot be read)."""
    csv.field_size_limit(MAX_CSV_FIELD)
    with open(f, encoding="utf-8-sig", newline="") as fh:
        try:
            return next(csv.reader(fh, strict=True), [])
        except csv.Error as e:
            raise ValueError(f"{f}: line 1 (the header): {_csv_message(e)}") from None


def _csv_rows(f: Path) -> Iterator[dict | _BadRecord]:
    """The rows of a CSV file, each checked (:func:`_csv_problem`). A malformed record on one
    line is a bad record (the reader goes on with the next line); one over several lines (a
    quote left open) stops the file: what follows cannot be trusted."""
    header = _csv_header(f)
    with open(f, encoding="utf-8-sig", newline="") as fh:
        reader = csv.reader(fh, strict=True)
        next(reader, None)
        end = reader.line_num
        while True:
            start = end + 1
            try:
                fields = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                end = reader.line_num
                if end > start:
                    raise ValueError(
                        f"{f}: lines {start}-{end}: {_csv_message(e)}; stopped reading (a quote opened at "
                        f"line {start} and never closed?)"
                    ) from None
                yield _BadRecord(f"{f}: line {start}: {_csv_message(e)}")
                continue
            end = reader.line_num
            if not fields or (len(fields) == 1 and not fields[0].strip()):
                continue  # a blank line
            problem = _csv_problem(fields, header, start, end)
            yield _BadRecord(f"{f}: {problem}") if problem else dict(zip(header, fields))


def _csv_message(e: csv.Error) -> str:
    if "field limit" in str(e):
        return f"a field longer than {MAX_CSV_FIELD:,} characters"
    return str(e)


def _csv_problem(fields: list[str], header: list[str], start: int, end: int) -> str | None:
    """What is wrong with one CSV record read from lines ``start``..``end``: a field count other
    than the header's, or a quoted field holding lines that read as whole rows (an unbalanced
    quote that swallowed the rows after it); None when nothing is."""
    where = f"line {start}" if start == end else f"lines {start}-{end}"
    n = len(header)
    if len(fields) != n:
        return f"{where}: {len(fields)} field(s), the header has {n} (a missing or extra delimiter, or a stray quote?)"
    for col, value in zip(header, fields):
        if "\n" in value and any(len(next(csv.reader([ln]), [])) == n for ln in value.splitlines()):
            return f"{where}: the quoted {col} field holds lines that read as whole rows (an unbalanced quote?)"
    return None


def _dir_source(p: Path, split: str | None) -> Source:
    """A local directory in one of the layouts of :func:`open_source`."""
    import datasets

    if any((p / n).is_file() for n in ("state.json", "dataset_dict.json")):
        check_saved_files(p)
        ds = datasets.load_from_disk(str(p))
        if isinstance(ds, datasets.DatasetDict):
            split = split or ("train" if "train" in ds else next(iter(ds)))
            if split not in ds:
                raise ValueError(f"{p}: a DatasetDict without a {split!r} split ({list(ds)})")
            ds = ds[split]
        ds = undecoded_media(ds)
        return Source(list(ds.column_names), iter(ds), p, [str(p)], split)
    for name in METADATA_NAMES:
        if (p / name).is_file():
            inside_root(p / name, p)
            return _file_source([p / name], p, split)
    if any((d / "prompt.txt").is_file() for d in p.iterdir() if d.is_dir()):
        ds = load_pair_folders(p)
        return Source(list(ds.column_names), iter(ds), p, [str(p)], split)
    files, split = _repo_files(p, split)
    return _file_source(files, p, split)


def _repo_files(p: Path, split: str | None) -> tuple[list[Path], str | None]:
    """The table files of ``split`` in a local clone of a Hub dataset repository."""
    configs = _readme_configs(p)
    if configs:
        splits = {}
        for entry in configs:
            paths = entry.get("path")
            splits.setdefault(entry.get("split", "train"), []).extend(
                [paths] if isinstance(paths, str) else paths or []
            )
        if split is None:
            split = "train" if "train" in splits or len(splits) != 1 else next(iter(splits))
        if split not in splits:
            raise ValueError(f"{p}: its README declares the split(s) {sorted(splits)}, not {split!r} (use --split)")
        files = sorted({f for pattern in splits[split] for f in p.glob(pattern) if f.is_file()})
        for f in files:  # a pattern with .. or a symlinked file must not read outside the clone
            inside_root(f, p)
        if not files:
            raise FileNotFoundError(f"{p}: split {split!r} names {splits[split]}, but no such file is here")
        return files, split
    tables = sorted(
        f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in TABLE_SUFFIXES and ".git" not in f.parts
    )
    want = split or "train"
    named = [f for f in tables if re.search(rf"(^|[/_.-]){re.escape(want)}([/_.-]|$)", str(f.relative_to(p)))]
    if named or len(tables) == 1:
        for f in named or tables:  # a symlinked table must not read outside the clone
            inside_root(f, p)
        return (named, want) if named else (tables, split)
    found = [str(f.relative_to(p)) for f in tables[:10]]
    raise ValueError(
        f"{p}: cannot tell which table file to read (found {found or 'none'}; no README configs); "
        f"pass the file itself, or --split naming it"
    )


def _readme_configs(p: Path) -> list[dict]:
    """The ``data_files`` entries of the first (default) config in a repository README's YAML."""
    import yaml

    readme = p / "README.md"
    if not readme.is_file():
        return []
    text = inside_root(readme, p).read_text(encoding="utf-8", errors="replace")
    m = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, re.S)
    if not m:
        return []
    try:
        meta = yaml.safe_load(m.group(1)) or {}
    except yaml.YAMLError:
        return []
    configs = meta.get("configs") or []
    if not configs:
        return []
    default = next((c for c in configs if c.get("default")), configs[0])
    files = default.get("data_files") or []
    if isinstance(files, (str, list)) and not (files and isinstance(files, list) and isinstance(files[0], dict)):
        files = [{"split": "train", "path": files}]
    return [f for f in files if isinstance(f, dict)]


def _hub_source(repo_id: str, split: str, revision: str | None) -> Source:
    """A Hub dataset through ``datasets`` streaming: rows arrive as they are downloaded."""
    import datasets

    try:
        ds = datasets.load_dataset(repo_id, split=split, revision=revision, streaming=True)
    except Exception as e:  # network, offline mode, unknown repo or split
        raise FileNotFoundError(
            f"{repo_id}: no such local directory or file, and streaming it as a Hugging Face Hub dataset "
            f"failed ({type(e).__name__}: {e})"
        ) from None
    for name, feat in (ds.features or {}).items():
        if isinstance(feat, (datasets.Video, datasets.Image)) and feat.decode:
            ds = ds.cast_column(name, type(feat)(decode=False))
    columns = list(ds.column_names or [])
    return Source(columns, iter(ds), HubRoot(repo_id, revision), [f"hub:{repo_id}"], split)


# --------------------------------------------------------------------------------------------
# media


class _MediaStore:
    """Copies media into ``stage/videos`` under their content hash (each file once)."""

    def __init__(self, stage: Path, root, allow_absolute_paths: bool, pre: dict, opts: ImportOptions):
        self.stage, self.root, self.allow_abs, self.pre, self.opts = stage, root, allow_absolute_paths, pre, opts
        (stage / "videos").mkdir()
        self.stored: dict[str, str] = {}  # content hash -> relative path in dst
        self._zips: dict[str, zipfile.ZipFile] | None = None

    def put(self, value) -> str:
        """Store one media value (path, bytes, ``{"bytes", "path"}``, or a list of frame paths)."""
        if isinstance(value, dict):  # datasets.Video / Image with decode=False
            data, value = value.get("bytes"), value.get("path")
            if data:
                return self._put_bytes(bytes(data))
        if isinstance(value, (bytes, bytearray)):
            return self._put_bytes(bytes(value))
        if isinstance(value, (list, tuple)):
            return self._put_frames(value)
        if not isinstance(value, str):
            raise ValueError(f"expected a video or image path or bytes, got {type(value).__name__}")
        if re.match(r"^[a-z]+://", value.strip()):
            raise ValueError(f"{value}: a URL, not a file; download the media and give paths relative to the source")
        path, member = self._locate(value)
        ext = Path(value).suffix.lower()
        if ext not in MEDIA_EXTS:
            raise ValueError(
                f"{value}: not a video or image ({ext or 'no suffix'}; expected one of {list(MEDIA_EXTS)})"
            )
        if member is not None:
            return self._put_member(member, ext)
        if ext in IMAGE_EXTS:
            check_image(path, str(path))
        digest = _file_hash(path)
        if digest not in self.stored:
            rel = f"videos/{digest}{ext}"
            try:
                os.link(path, self.stage / rel)
            except OSError:  # another filesystem, or links not allowed: copy
                shutil.copyfile(path, self.stage / rel)
            self.stored[digest] = self._finish(rel, digest)
        return self.stored[digest]

    def _locate(self, value: str) -> tuple[Path | None, tuple | None]:
        """``(file, None)`` for a file under the root, or ``(None, (zip, member))`` for a zip
        member at the root (e.g. VideoGen-RewardBench's ``videos.zip``)."""
        path = resolve_video_path(value, self.root, self.allow_abs)
        if path.is_file():
            return path, None
        if isinstance(self.root, Path):
            alt = self.root / "videos" / os.path.normpath(value)  # layouts that keep media under videos/
            if alt.is_file() and not value.startswith(".."):
                if not self.allow_abs:
                    inside_root(alt, self.root)
                return alt, None
            zips = self._zip_index()
            rel = Path(os.path.normpath(value)).as_posix()
            for cand in (rel, rel.split("/", 1)[-1], f"videos/{rel}"):
                if cand in zips:
                    return None, (zips[cand], cand)
            if zips:
                names = sorted({Path(z.filename).name for z in zips.values()})
                raise ValueError(f"{value}: no such file under {self.root}, and not in {', '.join(names)}")
        raise ValueError(f"{path}: no such video file")

    def _zip_index(self) -> dict[str, zipfile.ZipFile]:
        if self._zips is None:
            self._zips = {}
            for z in sorted(self.root.glob("*.zip")) if isinstance(self.root, Path) else []:
                if not self.allow_abs:
                    inside_root(z, self.root)
                try:
                    zf = zipfile.ZipFile(z)
                except zipfile.BadZipFile as e:
                    raise ValueError(f"{z}: not a readable zip file ({e})") from None
                for n in zf.namelist():
                    if not n.endswith("/"):
                        self._zips.setdefault(n, zf)
        return self._zips

    def _put_member(self, member: tuple, ext: str) -> str:
        """Extract one zip member into the output once: streamed to a temp name in the staging
        directory, then renamed to its content's name (its sha256 is known only once extracted)."""
        zf, name = member
        tmp = self.stage / "videos" / f".extract-{os.getpid()}{ext}"
        try:
            with zf.open(name) as fin, open(tmp, "wb") as fout:
                shutil.copyfileobj(fin, fout, 1 << 20)
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            tmp.unlink(missing_ok=True)
            raise ValueError(f"{name}: cannot extract from {Path(zf.filename).name} ({e})") from None
        digest = _file_hash(tmp)
        if digest in self.stored:
            tmp.unlink()
            return self.stored[digest]
        if ext in IMAGE_EXTS:
            try:
                check_image(tmp, name)
            except ValueError:
                tmp.unlink()
                raise
        rel = f"videos/{digest}{ext}"
        os.replace(tmp, self.stage / rel)
        self.stored[digest] = self._finish(rel, digest)
        return self.stored[digest]

    def _put_bytes(self, data: bytes) -> str:
        ext = sniff_media_format(data[:16])
        if ext is None:
            raise ValueError("embedded bytes are neither a video (mp4, webm, gif) nor an image (jpeg, png, webp, bmp)")
        if sniff_video_format(data[:16]) is None:
            check_image(io.BytesIO(data), "<embedded bytes>")
        digest = hashlib.sha256(data).hexdigest()[:32]
        if digest not in self.stored:
            rel = f"videos/{digest}{ext}"
            (self.stage / rel).write_bytes(data)
            self.stored[digest] = self._finish(rel, digest)
        return self.stored[digest]

    def _put_frames(self, frames: list) -> str:
        """A video given as a list of frame image paths (VideoFeedback), written as one mp4."""
        if not frames:
            raise ValueError("an empty list of frames")
        paths = [self._locate(str(f)) for f in frames]
        h = hashlib.sha256()
        for p, m in paths:
            h.update(_file_hash(p).encode() if p is not None else f"{m[1]}".encode())
        digest = h.hexdigest()[:32]
        if digest not in self.stored:
            images = [
                read_video(p) if p is not None else decode_video_bytes(m[0].read(m[1]), str(f))
                for (p, m), f in zip(paths, frames)
            ]
            sizes = {im.shape for im in images}
            if len(sizes) != 1:
                raise ValueError(f"frames differ in size: {sorted(sizes)}")
            rel = f"videos/{digest}.frames.mp4"
            write_video(self.stage / rel, np.concatenate(images), fps=self.opts.frames_fps)
            self.stored[digest] = self._finish(rel, digest)
        return self.stored[digest]

    def _finish(self, rel: str, digest: str) -> str:
        """With preprocessing or repeat_frames, replace the staged file by the prepared clip."""
        repeat = self.opts.repeat_frames if Path(rel).suffix.lower() in IMAGE_EXTS else None
        pre = self.pre
        if not pre and not repeat:
            return rel
        original = self.stage / rel
        try:
            info = video_info(original)
            frames = read_video(original)
            if repeat:
                frames = repeat_frames(frames, repeat)
            if pre:  # a still asked for several frames names --repeat-frames (resample_indices)
                frames = resample_frames(
                    frames, info["fps"], pre.get("num_frames"), pre.get("fps"), pre.get("height"), pre.get("width")
                )
            out = f"videos/{digest}.prepared.mp4"
            write_video(self.stage / out, frames, fps=pre.get("fps") or info["fps"] or self.opts.frames_fps)
        except ValueError as e:  # name the source, not the staged copy
            raise ValueError(str(e).replace(str(original), "video")) from None
        finally:
            original.unlink(missing_ok=True)
        return out

    def drop_unused(self, used: set[str]) -> int:
        """Delete stored media no output row uses (items of one-item groups); return how many."""
        n = 0
        for digest, rel in list(self.stored.items()):
            if rel not in used:
                (self.stage / rel).unlink(missing_ok=True)
                del self.stored[digest]
                n += 1
        return n


def _file_hash(path: Path) -> str:
    """A stored file's name: the first 32 hex digits of its sha256."""
    return file_sha256(path)[:32]


# --------------------------------------------------------------------------------------------
# the formats: each mapper takes (row index, row) and returns a list of (schema columns,
# {column: (source column, media value)}); it raises _Skip for a row without a preference and
# ValueError (naming the column) for a bad one. Scored formats return items (``_group`` set)
# that become pairs (or samples) once every row is read.


def _mapper(fmt: str, columns: list[str], source: str, opts: ImportOptions):
    """The row mapper of ``fmt`` for a source with ``columns`` (missing columns fail here)."""
    if fmt == "pickapic":
        return _pickapic_mapper(columns, source)
    if fmt in ("videogen-rewardbench", "videoalign"):
        return _ab_mapper(columns, source, opts.overall_from)
    if fmt == "genai-bench-video":
        return _genai_mapper(columns, source, opts.bothbad)
    if fmt == "rapidata":
        return _rapidata_mapper(columns, source, opts.tie_margin)
    if fmt == "hpdv2":
        return _hpdv2_mapper(columns, source)
    if fmt == "imagereward":
        return _imagereward_mapper(columns, source)
    if fmt == "videofeedback":
        return _videofeedback_mapper(columns, source, opts)
    return _chosen_rejected_mapper(columns, source, opts.seed)


def _pick(columns: list[str], options: tuple, what: str, source: str):
    """The first of ``options`` (names or tuples of names) that ``columns`` has."""
    for opt in options:
        names = opt if isinstance(opt, tuple) else (opt,)
        if all(n in columns for n in names):
            return opt
    raise ValueError(f"{source}: no {what} column(s); expected one of {list(options)}, has {columns}")


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or (isinstance(v, str) and not v.strip())


def _number(row: dict, col: str) -> float | None:
    """A numeric cell (None when empty or null); a non-number, NaN or infinity is a ValueError
    naming the column (a NaN score is a broken score, not a missing one)."""
    v = row[col]
    if v is None or (isinstance(v, str) and not v.strip()):
        return None
    try:
        x = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"{col} {v!r} is not a number") from None
    if not math.isfinite(x):
        raise ValueError(f"{col} {v!r} is not a finite number")
    return x


def _false(v) -> bool:
    """Whether a flag cell says false (bools, 0/1, "True"/"False" from CSV); empty is not false."""
    if isinstance(v, str):
        return v.strip().lower() in ("false", "0", "no")
    return v is not None and not bool(v)


def _provenance(row: dict, mapped: dict, pairs: tuple) -> None:
    for src_col, dst_col in pairs:
        if src_col in row:
            mapped[dst_col] = None if _missing(row[src_col]) else str(row[src_col])


def _pickapic_mapper(columns: list[str], source: str):
    prompt_col = _pick(columns, ("caption", "prompt"), "prompt", source)
    c0, c1 = _pick(columns, PICKAPIC_MEDIA, "media", source)
    _pick(columns, (("label_0", "label_1"),), "label", source)

    def mapper(i, row):
        if "has_label" in row and _false(row["has_label"]):
            raise _Skip("unlabelled")
        if "are_different" in row and _false(row["are_different"]):
            raise _Skip("not_different")
        l0, l1 = _number(row, "label_0"), _number(row, "label_1")
        if l0 is None or l1 is None:
            raise _Skip("unlabelled")
        pref = "a" if l0 > l1 else "b" if l1 > l0 else "tie"
        mapped = {"prompt": str(row[prompt_col]), "preference": pref, "score_a": l0, "score_b": l1}
        _provenance(row, mapped, (("model_0", "model_a"), ("model_1", "model_b"), ("user_id", "annotator")))
        _provenance(row, mapped, (("ranking_id", "source_id"),))
        return [(mapped, {"video_a": (c0, row[c0]), "video_b": (c1, row[c1])})]

    return mapper


def _ab_label(row: dict, col: str) -> str | None:
    v = row[col]
    if _missing(v):
        return None
    out = AB_LABELS.get(str(v).strip().lower())
    if out is None:
        raise ValueError(f"{col} {v!r} is not one of A, B, same")
    return out


def _ab_mapper(columns: list[str], source: str, overall_from: str | None):
    """VideoGen-RewardBench and VideoAlign: A/B/same labels per aspect, and Overall or not."""
    _pick(columns, ("prompt",), "prompt", source)
    _pick(columns, (("path_A", "path_B"),), "video", source)
    aspects = [c for c in AB_ASPECTS if c in columns]
    if overall_from is not None and overall_from not in columns:
        raise ValueError(f"{source}: --overall-from {overall_from!r} is not a column; has {columns}")
    if overall_from is None and "Overall" not in columns and not aspects:
        raise ValueError(f"{source}: no Overall column and no aspect labels {list(AB_ASPECTS)}; has {columns}")

    def mapper(i, row):
        labels = {col: _ab_label(row, col) for col in aspects}
        if overall_from is not None:
            overall = labels[overall_from] if overall_from in labels else _ab_label(row, overall_from)
        elif "Overall" in columns:
            overall = _ab_label(row, "Overall")
        else:  # VideoAlign's training CSV: the majority of the aspect labels
            votes = [v for v in labels.values() if v is not None]
            a, b = votes.count("a"), votes.count("b")
            overall = None if not votes else "a" if a > b else "b" if b > a else "tie"
        if overall is None:
            raise _Skip("unlabelled")
        mapped = {"prompt": str(row["prompt"]), "preference": overall}
        mapped.update({f"preference_{AB_ASPECTS[c]}": v for c, v in labels.items()})
        _provenance(row, mapped, (("A_model", "model_a"), ("B_model", "model_b")))
        for side in ("A", "B"):
            for col, key in (
                (f"fps_{side}", f"fps_{side.lower()}"),
                (f"num_frames_{side}", f"num_frames_{side.lower()}"),
            ):
                if col in row and (x := _number(row, col)) is not None:
                    mapped[key] = x if key.startswith("fps") else int(x)
        return [(mapped, {"video_a": ("path_A", row["path_A"]), "video_b": ("path_B", row["path_B"])})]

    return mapper


def _genai_mapper(columns: list[str], source: str, bothbad: str):
    if bothbad not in ("tie", "skip"):
        raise ValueError(f"bothbad must be 'tie' or 'skip', got {bothbad!r}")
    _pick(columns, ("prompt",), "prompt", source)
    _pick(columns, (("left_video", "right_video"),), "video", source)
    _pick(columns, ("vote_type",), "vote", source)

    def mapper(i, row):
        vote = row["vote_type"]
        if _missing(vote):
            raise _Skip("unlabelled")
        pref = GENAI_VOTES.get(str(vote).strip())
        if pref is None:
            raise ValueError(f"vote_type {vote!r} is not one of {', '.join(GENAI_VOTES)}")
        if str(vote).strip() == "bothbad_vote" and bothbad == "skip":
            raise _Skip("bothbad")
        mapped = {"prompt": str(row["prompt"]), "preference": pref}
        _provenance(row, mapped, (("left_model", "model_a"), ("right_model", "model_b"), ("judge", "annotator")))
        return [
            (mapped, {"video_a": ("left_video", row["left_video"]), "video_b": ("right_video", row["right_video"])})
        ]

    return mapper


def _rapidata_mapper(columns: list[str], source: str, tie_margin: float):
    _pick(columns, ("prompt",), "prompt", source)
    c1, c2 = _pick(columns, (("file_name1", "file_name2"), ("video1", "video2")), "video", source)
    criteria = [c[len("weighted_results1_") :] for c in columns if c.startswith("weighted_results1_")]
    criteria = [c for c in criteria if f"weighted_results2_{c}" in columns]
    if "Preference" not in criteria:
        raise ValueError(f"{source}: no weighted_results1_Preference / weighted_results2_Preference; has {columns}")

    def label(row, crit):
        r1, r2 = _number(row, f"weighted_results1_{crit}"), _number(row, f"weighted_results2_{crit}")
        if r1 is None or r2 is None:
            return None, r1, r2
        return ("a" if r1 - r2 > tie_margin else "b" if r2 - r1 > tie_margin else "tie"), r1, r2

    def mapper(i, row):
        pref, s1, s2 = label(row, "Preference")
        if pref is None:
            raise _Skip("unlabelled")
        mapped = {"prompt": str(row["prompt"]), "preference": pref, "score_a": s1, "score_b": s2}
        for crit in criteria:
            if crit != "Preference":
                mapped[f"preference_{_slug(crit)}"] = label(row, crit)[0]
        _provenance(row, mapped, (("model1", "model_a"), ("model2", "model_b")))
        return [(mapped, {"video_a": (c1, row[c1]), "video_b": (c2, row[c2])})]

    return mapper


def _chosen_rejected_mapper(columns: list[str], source: str, seed: int):
    prompt_col = _pick(columns, ("prompt", "caption"), "prompt", source)
    cc, rc = _pick(columns, CHOSEN_REJECTED, "chosen/rejected", source)
    rng = np.random.default_rng(seed)

    def mapper(i, row):
        chosen_first = bool(rng.random() < 0.5)  # drawn for every row, so row i's order depends only on seed
        chosen, rejected = (cc, row[cc]), (rc, row[rc])
        a, b = (chosen, rejected) if chosen_first else (rejected, chosen)
        mapped = {"prompt": str(row[prompt_col]), "preference": "a" if chosen_first else "b"}
        return [(mapped, {"video_a": a, "video_b": b})]

    return mapper


# scored items ------------------------------------------------------------------------------


def _slug(name: str) -> str:
    """A column name as an aspect name: ``"text-to-video alignment"`` -> ``text_to_video_alignment``."""
    return re.sub(r"[^0-9a-z]+", "_", str(name).lower()).strip("_")


def _item(group, prompt: str, score: float, aspects: dict, col: str, value) -> tuple[dict, dict]:
    return {"_group": group, "prompt": prompt, "_score": score, "_aspects": aspects}, {"_media": (col, value)}


def _hpdv2_mapper(columns: list[str], source: str):
    prompt_col = _pick(columns, ("prompt", "caption"), "prompt", source)
    media_col = _pick(columns, ("image", "image_path", "file_path", "images", "paths"), "list-of-images", source)
    score_col = _pick(columns, ("human_preference", "rank", "ranking"), "score", source)
    sign = 1.0 if score_col == "human_preference" else -1.0  # a rank: lower is better

    def mapper(i, row):
        media, scores = row[media_col], row[score_col]
        if _missing(scores) or (hasattr(scores, "__len__") and len(scores) == 0):
            raise _Skip("unlabelled")
        if isinstance(media, str) or isinstance(scores, str) or not hasattr(media, "__len__"):
            raise ValueError(f"{media_col} / {score_col}: expected lists (one entry per image)")
        if len(media) != len(scores):
            raise ValueError(f"{media_col} has {len(media)} images but {score_col} {len(scores)} values")
        out = []
        for k, (m, s) in enumerate(zip(media, scores)):
            x = _number({f"{score_col}[{k}]": s}, f"{score_col}[{k}]")
            if x is not None:
                out.append(_item(i, str(row[prompt_col]), sign * x, {}, f"{media_col}[{k}]", m))
        return out

    return mapper


def _imagereward_mapper(columns: list[str], source: str):
    _pick(columns, ("prompt",), "prompt", source)
    group_col = _pick(columns, ("prompt_id", "prompt"), "group", source)
    media_col = _pick(columns, ("image", "image_path", "path", "file"), "image", source)
    score_col = _pick(columns, ("rank", "overall_rating"), "score", source)
    sign = -1.0 if score_col == "rank" else 1.0
    aspects = {k: c for k, c in (("text_alignment", "image_text_alignment_rating"), ("fidelity", "fidelity_rating"))}
    aspects = {k: c for k, c in aspects.items() if c in columns}

    def mapper(i, row):
        score = _number(row, score_col)
        if score is None:
            raise _Skip("unlabelled")
        asp = {k: _number(row, c) for k, c in aspects.items()}
        return [_item(str(row[group_col]), str(row["prompt"]), sign * score, asp, media_col, row[media_col])]

    return mapper


def _videofeedback_mapper(columns: list[str], source: str, opts: ImportOptions):
    prompt_col = _pick(columns, ("text prompt", "prompt", "caption"), "prompt", source)
    media_col = _pick(
        columns, ("video", "video_path", "path", "file_name", "filename", "images", "video link"), "video", source
    )
    scores = list(opts.score_columns or [c for c in VIDEOFEEDBACK_SCORES if c in columns])
    missing = [c for c in scores if c not in columns]
    if missing or not scores:
        raise ValueError(f"{source}: score column(s) {missing or 'none found'} (use --score-columns); has {columns}")
    overall = opts.overall_from
    if overall is not None and overall not in columns:
        raise ValueError(f"{source}: --overall-from {overall!r} is not a column; has {columns}")

    def mapper(i, row):
        values = {c: _number(row, c) for c in scores}
        if overall is not None:
            score = _number(row, overall)
        else:
            present = [v for v in values.values() if v is not None]
            score = float(np.mean(present)) if present else None
        if score is None:
            raise _Skip("unlabelled")
        aspects = {_slug(c): v for c, v in values.items()} if len(scores) > 1 or overall else {}
        prompt = str(row[prompt_col])
        return [_item(prompt, prompt, score, aspects, media_col, row[media_col])]

    return mapper


def _scored_pairs(items: list[dict], tie_margin: float) -> list[dict]:
    """Every pair of items within one group (in row order): the higher score wins, a gap of at
    most ``tie_margin`` is a tie; per-aspect labels the same way. Scores kept as score_a/_b."""
    groups: dict = {}
    for it in items:
        groups.setdefault(it["_group"], []).append(it)

    def label(x, y):
        if x is None or y is None:
            return None
        return "a" if x - y > tie_margin else "b" if y - x > tie_margin else "tie"

    rows = []
    for members in groups.values():
        for j in range(len(members)):
            for k in range(j + 1, len(members)):
                a, b = members[j], members[k]
                if a["_media"] == b["_media"]:
                    continue  # the same file twice: no comparison
                row = {"prompt": a["prompt"], "video_a": a["_media"], "video_b": b["_media"]}
                row["preference"] = label(a["_score"], b["_score"])
                row.update({"score_a": a["_score"], "score_b": b["_score"]})
                for asp in a["_aspects"]:
                    row[f"preference_{asp}"] = label(a["_aspects"][asp], b["_aspects"].get(asp))
                row.update({k: a[k] for k in ("source", "source_format")})
                row.update({"source_row": a["source_row"], "source_row_b": b["source_row"]})
                rows.append(row)
    return rows


def _samples(items: list[dict]) -> list[dict]:
    """Scored samples for RWR (``align.data.samples``): prompt, video, reward, group."""
    index = {g: n for n, g in enumerate(dict.fromkeys(it["_group"] for it in items))}
    rows = []
    for it in items:
        row = {"prompt": it["prompt"], "video": it["_media"], "reward": it["_score"], "group": index[it["_group"]]}
        row.update({f"score_{k}": v for k, v in it["_aspects"].items()})
        row.update({k: it[k] for k in ("source", "source_format", "source_row")})
        rows.append(row)
    return rows
