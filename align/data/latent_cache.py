"""A disk cache of VAE latents and prompt states, so DPO epochs neither decode nor encode videos.

The VAE and the text encoder are frozen during alignment, so a video's latents depend only on
its pixels, the VAE weights and how pixels were prepared; a prompt's states only on its text
and the text encoder. The cache stores them once, in safetensors shards:

    <cache_dir>/video-<fingerprint[:16]>/fingerprint.json        what the fingerprint covers
    <cache_dir>/video-<fingerprint[:16]>/shard-<id>.safetensors  {content hash: latents}
    <cache_dir>/prompt-<fingerprint[:16]>/...                      {sha256(prompt): states}

- Keys: the *content hash* of a video's decoded uint8 frames (:func:`content_hash`; the same
  video stored twice, or as a file and as an array, is one entry) and of a prompt's UTF-8 text.
- Namespace: the *model fingerprint*, a hash of the VAE's state dict, its scaling factors, the
  model class and the preprocessing parameters (frames, size, fps) for videos; of the text
  encoders' state dicts and the context length for prompts. Change any of them and the lookup
  lands in a new, empty namespace: stale latents are never read (old namespaces stay on disk
  until deleted). Every shard also records its fingerprint in its header, checked on open.
- Shards are written to a temp name and renamed, so a crash leaves no half shard; a shard that
  cannot be opened (damaged on disk) is reported with a warning, ignored, and its entries are
  encoded again. Several processes may fill one cache at once: each writes its own shards.
- Reading is lazy: :class:`LatentPairDataset` holds only keys and shard names and reads each
  item with ``safetensors.safe_open`` (memory-mapped), so a dataset larger than RAM trains; the
  OS page cache keeps what fits.

Training without the text encoder. A diffusers pipeline named by its source (a directory or
Hub id: ``model_source``) has its prompt namespace keyed by the *files* of its text encoder(s)
and tokenizer(s) (sha256 of each, memoised in ``<cache_dir>/file-digests.json`` by path, size
and mtime; Hugging Face cache blobs are already named by their sha256), the adapter class, the
dtype and the ``max_sequence_length`` option, not by the loaded weights, so a model loaded
with ``load_text_encoder=False`` finds the states a run with the encoder wrote. Such a cache
holds the states of *every* prompt of the dataset and of ``""`` (the unconditional prompt, also
written as ``unconditional.safetensors`` in ``save_prompt_embeds``' format).
:func:`cached_prompt_states` finds them by the text-encoder files alone, before any model is
loaded; whether a run then loads its model without the text encoder (UMT5-XXL alone is ~11 GB
in bf16) is the trainer's decision (:mod:`align.training.text_encoder`). TinySora (small)
always keeps its text encoder, and its prompt namespace stays keyed by the encoder's weights.

Entry points: :func:`build_latent_cache` (streaming from a dataset: one batch of decoded
videos in memory at a time, for datasets whose pixels do not fit in RAM; used by ``vidalign
data cache`` and by the trainer when ``latent_cache_dir`` is set) and :func:`cached_latents`
(pairs already decoded in memory by ``to_pairs``).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shlex
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from align.atomic import atomic_write, atomic_write_text, file_sha256
from align.data.checks import check_rows
from align.data.preference import (
    PreferenceDataError,
    content_hash,
    dataset_root,
    load_video_value,
    value_reader,
    video_fps,
)
from align.data.video import resample_frames
from align.frames import from_uint8

CACHE_VERSION = 1
SHARD_BYTES = 32 << 20  # a shard is written before more than this is buffered
MAX_OPEN_SHARDS = 64  # open safe_open handles kept per dataset (per DataLoader worker)
PREPROCESSING_KEYS = ("num_frames", "height", "width", "fps")
UNCOND_FILE = "unconditional.safetensors"  # the state of "" in save_prompt_embeds' format
FILE_DIGESTS = "file-digests.json"  # sha256 of text-encoder files by path, size and mtime
SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}  # fmt: skip


# --------------------------------------------------------------------------------------------
# keys and fingerprints


def prompt_hash(prompt: str) -> str:
    """SHA-256 of a prompt's UTF-8 text."""
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()


def module_digest(module: torch.nn.Module) -> str:
    """SHA-256 over a module's state dict: every name, dtype, shape and byte, in name order."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def _digest(meta: dict) -> str:
    return hashlib.sha256(json.dumps(meta, sort_keys=True, default=str).encode()).hexdigest()


def normalize_preprocessing(preprocessing: dict | None) -> dict:
    """The preprocessing parameters that matter, without ``None`` values (``{}`` = frames used as
    decoded). Unknown keys are an error naming them."""
    pre = {k: v for k, v in (preprocessing or {}).items() if v is not None}
    unknown = sorted(set(pre) - set(PREPROCESSING_KEYS))
    if unknown:
        raise ValueError(f"unknown preprocessing key(s) {unknown}; use {list(PREPROCESSING_KEYS)}")
    return {k: (float(v) if k == "fps" else int(v)) for k, v in sorted(pre.items())}


def video_fingerprint(model, preprocessing: dict | None = None) -> tuple[str, dict]:
    """``(fingerprint, what it covers)`` for video latents of ``model``: its VAE's state dict and
    scaling factors, the model class, how pixels reach the VAE, and the preprocessing."""
    vae = getattr(model, "vae", None)
    if not isinstance(vae, torch.nn.Module):
        raise ValueError(f"{type(model).__name__}: the latent cache needs the model's VAE as `model.vae`")
    scaling = {}
    for holder in (getattr(model, "cfg", None), getattr(vae, "config", None)):
        for k in ("scaling_factor", "shift_factor"):
            v = getattr(holder, k, None) if holder is not None else None
            if v is None and isinstance(holder, dict):
                v = holder.get(k)
            if v is not None:
                scaling[k] = float(v)
    meta = {
        "cache_version": CACHE_VERSION,
        "kind": "video",
        "model_class": type(model).__name__,
        "vae_sha256": module_digest(vae),
        "scaling": scaling,
        "pixels": "uint8 frames -> from_uint8 -> [-1, 1] (B, C, T, H, W) -> model.encode_video (default args)",
        "preprocessing": normalize_preprocessing(preprocessing),
    }
    return _digest(meta), meta


def _is_diffusers(model) -> bool:
    """Whether ``model`` is a diffusers adapter: its class names the pipeline's text components
    (``text_components``, what :func:`text_identity` hashes); TinySora's does not."""
    return hasattr(type(model), "text_components")


def text_encoder_loaded(model) -> bool:
    """Whether ``model`` can encode prompts itself: TinySora always; a diffusers model unless it
    was loaded with ``load_text_encoder=False``."""
    return not _is_diffusers(model) or model.text_encoder is not None


def _file_digest(path: Path, memo: dict) -> str:
    """sha256 of a file's bytes. A Hugging Face cache blob named by its sha256 is not read;
    other digests are memoised in ``memo`` by real path, size and mtime."""
    real = path.resolve()
    if real.parent.name == "blobs" and len(real.name) == 64:  # LFS blob: the name is its sha256
        return real.name
    st = real.stat()
    known = memo.get(str(real))
    if known and known["size"] == st.st_size and known["mtime_ns"] == st.st_mtime_ns:
        return known["sha256"]
    digest = file_sha256(real, chunk_bytes=1 << 24)
    memo[str(real)] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
    return digest


def _text_root(source: str, components: tuple[str, ...], revision: str | None) -> Path:
    """The local folder holding the pipeline's text components: ``source`` itself, or a Hub id's
    snapshot in the local Hugging Face cache (no download)."""
    if Path(source).is_dir():
        return Path(source)
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                source, revision=revision, local_files_only=True, allow_patterns=[f"{c}/*" for c in components]
            )
        )
    except Exception as e:  # huggingface_hub raises its own error types for a missing snapshot
        raise ValueError(f"model {source}: its text encoder files are not in the local Hugging Face cache ({e})") from e


def text_identity(source: str, model_class: type, dtype, options: dict | None, cache_dir: str | Path) -> dict:
    """What identifies a diffusers pipeline's prompt states without loading its text encoder: the
    sha256 of every file of its text encoder(s) and tokenizer(s) (``model_class.text_components``),
    the adapter class, the dtype and the ``max_sequence_length`` option."""
    options = options or {}
    root = _text_root(str(source), model_class.text_components, options.get("revision"))
    memo_file = Path(cache_dir) / FILE_DIGESTS
    memo = json.loads(memo_file.read_text()) if memo_file.is_file() else {}
    before = dict(memo)
    files = {}
    for comp in model_class.text_components:
        folder = root / comp
        if not folder.is_dir():
            raise ValueError(f"model {source}: no {comp}/ folder; cannot identify its prompt states")
        for f in sorted(q for q in folder.rglob("*") if q.is_file()):
            files[f.relative_to(root).as_posix()] = _file_digest(f, memo)
    if memo != before:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        atomic_write_text(memo_file, json.dumps(memo, indent=1))
    return {
        "cache_version": CACHE_VERSION,
        "kind": "prompt",
        "model_class": model_class.__name__,
        "text_files_sha256": files,
        "dtype": str(dtype).removeprefix("torch."),
        "max_sequence_length_option": options.get("max_sequence_length"),
    }


def text_fingerprint(
    model, source: str | None = None, options: dict | None = None, cache_dir: str | Path | None = None
) -> tuple[str, dict]:
    """``(fingerprint, what it covers)`` for prompt states.

    A diffusers model with its ``source`` (directory or Hub id; ``options``: its load options):
    :func:`text_identity` plus the resolved ``max_sequence_length``, so it works without the
    text encoder loaded (``meta["identity"]`` is the digest looked up before loading). Any
    other model: the text encoders' state dicts, the context length and the model class."""
    if source is not None and _is_diffusers(model):
        identity = text_identity(source, type(model), model.dtype, options, cache_dir or ".")
        meta = {**identity, "max_sequence_length": model.max_sequence_length, "identity": _digest(identity)}
        return _digest(meta), meta
    encoders = {
        name: module_digest(m)
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3")
        if isinstance(m := getattr(model, name, None), torch.nn.Module)
    }
    if not encoders:
        raise ValueError(
            f"{type(model).__name__}: no text encoder loaded, and no model source to identify cached prompt states by"
        )
    meta = {
        "cache_version": CACHE_VERSION,
        "kind": "prompt",
        "model_class": type(model).__name__,
        "text_encoders_sha256": encoders,
        "context_length": getattr(getattr(model, "cfg", None), "context_length", None),
    }
    return _digest(meta), meta


# --------------------------------------------------------------------------------------------
# the shard store


class ShardStore:
    """Tensors under hash keys in safetensors shards of one directory (one fingerprint)."""

    def __init__(self, directory: str | Path, fingerprint: str, meta: dict, shard_bytes: int = SHARD_BYTES):
        self.dir = Path(directory)
        self.fingerprint = fingerprint
        self.shard_bytes = shard_bytes
        self.dir.mkdir(parents=True, exist_ok=True)
        meta_file = self.dir / "fingerprint.json"
        if meta_file.is_file():
            found = json.loads(meta_file.read_text()).get("fingerprint")
            if found != fingerprint:
                raise ValueError(f"{self.dir}: holds fingerprint {found}, not {fingerprint}; do not reuse its folders")
        else:
            atomic_write_text(meta_file, json.dumps({"fingerprint": fingerprint, **meta}, indent=2, default=str))
        self.where: dict[str, Path] = {}
        self.bad_shards: list[str] = []
        self._scanned: set[Path] = set()
        self._buffer: dict[str, tuple] = {}  # key -> (dtype, shape, begin, end) in the arena
        self._buffered = 0
        self._arena: torch.Tensor | None = None
        self.refresh()

    @classmethod
    def open(cls, cache_dir: str | Path, kind: str, fingerprint: str, meta: dict, **kw) -> ShardStore:
        return cls(Path(cache_dir) / f"{kind}-{fingerprint[:16]}", fingerprint, meta, **kw)

    def refresh(self) -> None:
        """Read the keys of every shard (headers only). Unreadable shards are warned about and skipped."""
        for f in sorted(self.dir.glob("shard-*.safetensors")):
            if f in self._scanned:
                continue
            self._scanned.add(f)
            try:
                with safe_open(str(f), framework="pt") as h:
                    found = (h.metadata() or {}).get("fingerprint")
                    if found != self.fingerprint:
                        raise ValueError(f"fingerprint {found} in the header, expected {self.fingerprint}")
                    keys = list(h.keys())
            except Exception as e:  # safetensors raises its own error type for damaged files
                self.bad_shards.append(str(f))
                warnings.warn(
                    f"latent cache: ignoring unreadable shard {f} ({e}); its entries are re-encoded", stacklevel=2
                )
                continue
            for k in keys:
                self.where.setdefault(k, f)

    def __contains__(self, key: str) -> bool:
        return key in self.where or key in self._buffer

    def put(self, key: str, tensor: torch.Tensor) -> None:
        """Buffer one entry; a shard is written before the buffer would pass ``shard_bytes``.

        Entries are copied into one preallocated byte arena, not kept as many small tensors:
        small long-lived tensors interleaved with each batch's freed activations fragment the
        heap (measured: ~100 KB of RSS per buffered 4 KB latent), so memory would grow with the
        dataset; the arena keeps it at ``shard_bytes`` at most."""
        if key in self:
            return
        t = tensor.detach().to("cpu").contiguous()
        if t.dtype not in SAFETENSORS_DTYPES:
            raise TypeError(f"latent cache: cannot store {t.dtype} tensors")
        raw = t.reshape(-1).view(torch.uint8)
        n = raw.numel()
        if n > self.shard_bytes:  # larger than a shard: a shard of its own
            self.flush()
            self._write({key: (t.dtype, tuple(t.shape), 0, n)}, raw)
            return
        if self._buffered + n > self.shard_bytes:
            self.flush()
        if self._arena is None:
            self._arena = torch.empty(self.shard_bytes, dtype=torch.uint8)  # pages are committed as written
        start = self._buffered
        self._arena[start : start + n].copy_(raw)
        self._buffer[key] = (t.dtype, tuple(t.shape), start, start + n)
        self._buffered = start + n

    def flush(self) -> Path | None:
        """Write the buffered entries as one new shard (temp name, then rename)."""
        if not self._buffer:
            return None
        final = self._write(self._buffer, self._arena[: self._buffered])
        self._buffer, self._buffered = {}, 0
        return final

    def _write(self, entries: dict[str, tuple], body: torch.Tensor) -> Path:
        """A safetensors file of ``entries`` (``key: (dtype, shape, begin, end)`` into the bytes
        ``body``): the 8-byte header length, the JSON header, then ``body`` as it is."""
        header = {"__metadata__": {"fingerprint": self.fingerprint}}
        for k, (dtype, shape, begin, end) in entries.items():
            header[k] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [begin, end]}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the format pads the header with spaces to 8 bytes
        name = f"shard-{time.strftime('%Y%m%d%H%M%S')}-{os.getpid()}-{secrets.token_hex(4)}.safetensors"

        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                f.write(len(raw).to_bytes(8, "little"))
                f.write(raw)
                f.write(memoryview(body.numpy()))

        final = atomic_write(self.dir / name, write)
        self._scanned.add(final)
        for k in entries:
            self.where.setdefault(k, final)
        return final

    def get(self, key: str) -> torch.Tensor:
        if key in self._buffer:
            dtype, shape, begin, end = self._buffer[key]
            return self._arena[begin:end].clone().view(dtype).reshape(shape)
        with safe_open(str(self.where[key]), framework="pt") as h:
            return h.get_tensor(key)


# --------------------------------------------------------------------------------------------
# the lazy dataset


class LatentPairDataset(torch.utils.data.Dataset):
    """``(latents_chosen, latents_rejected, prompt_states)`` per pair, read lazily from shards.

    Holds only shard names and keys; each item opens its shards with ``safe_open`` (an LRU of
    ``MAX_OPEN_SHARDS`` handles, memory-mapped) and copies out three tensors. Items match what
    ``align.train.encode_pairs`` puts in its ``TensorDataset``, so the trainer is unchanged.
    Picklable (handles are reopened in each DataLoader worker). ``stats`` says what was reused.
    """

    def __init__(self, files: list[str], items: list[tuple[int, str, int, str, int, str]], stats: dict | None = None):
        self.files = files
        self.items = items
        self.stats = stats or {}
        self._handles: OrderedDict[int, object] = OrderedDict()

    @classmethod
    def from_stores(cls, vstore: ShardStore, tstore: ShardStore, keys: Iterable[tuple[str, str, str]], stats=None):
        """One item per ``(chosen hash, rejected hash, prompt hash)``; every key must be stored (flushed)."""
        files: list[str] = []
        index: dict[Path, int] = {}

        def loc(store: ShardStore, key: str) -> tuple[int, str]:
            f = store.where[key]
            if f not in index:
                index[f] = len(files)
                files.append(str(f))
            return index[f], key

        items = [(*loc(vstore, w), *loc(vstore, lo), *loc(tstore, p)) for w, lo, p in keys]
        return cls(files, items, stats)

    def __len__(self) -> int:
        return len(self.items)

    def _tensor(self, file_idx: int, key: str) -> torch.Tensor:
        h = self._handles.get(file_idx)
        if h is None:
            h = safe_open(self.files[file_idx], framework="pt")
            self._handles[file_idx] = h
            if len(self._handles) > MAX_OPEN_SHARDS:
                self._handles.popitem(last=False)
        else:
            self._handles.move_to_end(file_idx)
        return h.get_tensor(key)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        fw, kw, fl, kl, fp, kp = self.items[i]
        return self._tensor(fw, kw), self._tensor(fl, kl), self._tensor(fp, kp)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_handles": OrderedDict()}


# --------------------------------------------------------------------------------------------
# filling the cache


def _model_device(model) -> torch.device:
    dev = getattr(model, "device", None)
    return torch.device(dev) if dev is not None else next(model.denoiser.parameters()).device


@torch.no_grad()
def _encode_videos(model, store: ShardStore, todo: Iterable[tuple[str, Callable[[], np.ndarray]]], batch_size: int):
    """Encode ``(key, load frames)`` entries in batches of ``batch_size`` and store the latents."""
    device = _model_device(model)
    batch: list[tuple[str, np.ndarray]] = []
    n = 0

    def run():
        x = from_uint8(np.stack([f for _, f in batch])).to(device)
        for (k, _), z in zip(batch, model.encode_video(x)):
            store.put(k, z)

    for key, load in todo:
        batch.append((key, load()))
        if len(batch) == batch_size:
            run()
            n += len(batch)
            batch = []
    if batch:
        run()
        n += len(batch)
    return n


def missing_prompts_message(missing: list[str], cache_dir, command: str | None) -> str:
    """The error for prompts a run without its text encoder cannot find in the cache."""
    command = command or "vidalign data cache DATASET --model MODEL --cache-dir DIR"
    return (
        f"{len(missing)} prompt(s) are not in the latent cache {cache_dir} and the text encoder is not loaded "
        f"(model_options.load_text_encoder: false), e.g. {missing[0]!r}; fill the cache with `{command}` "
        "(the same model options), or leave load_text_encoder unset to load the text encoder for them"
    )


@torch.no_grad()
def _encode_prompts(model, store: ShardStore, prompts: list[str], batch_size: int) -> int:
    """Encode and store the states of ``prompts`` not stored yet; returns how many were encoded."""
    todo = list({k: p for p in prompts if (k := prompt_hash(p)) not in store}.items())
    for i in range(0, len(todo), batch_size):
        chunk = todo[i : i + batch_size]
        states = model.encode_prompts([p for _, p in chunk])
        if not isinstance(states, torch.Tensor):
            raise TypeError(f"the latent cache stores tensor prompt states, not {type(states).__name__}")
        for (k, _), s in zip(chunk, states):
            store.put(k, s)
    return len(todo)


def _write_unconditional(model, tstore: ShardStore) -> Path:
    """``unconditional.safetensors`` in the prompt namespace: the state of ``""`` in
    ``save_prompt_embeds``' format, the ``prompt_embeds`` a model without its text encoder is
    loaded with (the adapters need one; samplers use it for classifier-free guidance)."""
    path = tstore.dir / UNCOND_FILE
    if not path.is_file():
        state = tstore.get(prompt_hash(""))[None].contiguous()
        meta = {"prompts": json.dumps([""]), "family": model.family}
        atomic_write(path, lambda tmp: save_file({"cond": state}, tmp, metadata=meta))
    return path


def _stats(vstore, tstore, prompts: list[str], n_enc: int, hits: int, p_enc: int) -> dict:
    return {
        "videos_encoded": n_enc,
        "videos_reused": hits,
        "prompts_encoded": p_enc,
        "prompts_reused": len(set(prompts)) - p_enc,
        "bad_shards": vstore.bad_shards + tstore.bad_shards,
        "video_dir": str(vstore.dir),
        "prompt_dir": str(tstore.dir),
    }


def _open_stores(model, cache_dir, preprocessing, shard_bytes, source=None, options=None):
    vfp, vmeta = video_fingerprint(model, preprocessing)
    tfp, tmeta = text_fingerprint(model, source, options, cache_dir)
    vstore = ShardStore.open(cache_dir, "video", vfp, vmeta, shard_bytes=shard_bytes)
    tstore = ShardStore.open(cache_dir, "prompt", tfp, tmeta, shard_bytes=shard_bytes)
    return vstore, tstore, "identity" in tmeta


def cached_latents(
    model, pairs, cache_dir: str | Path, batch_size: int = 32, shard_bytes: int = SHARD_BYTES
) -> LatentPairDataset:
    """The cached counterpart of ``align.training.dpo.encode_pairs``: latents of ``pairs.chosen``
    / ``pairs.rejected`` and prompt states, encoded only where ``cache_dir`` does not hold them
    yet, returned as a lazy :class:`LatentPairDataset` with the same items. Videos are used as
    decoded (preprocessing ``{}``), so a cache built by :func:`build_latent_cache` without a
    target serves it too."""
    vstore, tstore, _ = _open_stores(model, cache_dir, None, shard_bytes)
    hw = [content_hash(v) for v in pairs.chosen]
    hl = [content_hash(v) for v in pairs.rejected]
    first: dict[str, np.ndarray] = {}
    for h, v in zip(hw + hl, list(pairs.chosen) + list(pairs.rejected)):
        if h not in vstore:
            first.setdefault(h, v)
    hits = len(set(hw + hl)) - len(first)
    n_enc = _encode_videos(model, vstore, ((h, lambda v=v: v) for h, v in first.items()), batch_size)
    p_enc = _encode_prompts(model, tstore, list(pairs.prompts), batch_size)
    vstore.flush()
    tstore.flush()
    stats = _stats(vstore, tstore, list(pairs.prompts), n_enc, hits, p_enc)
    pkeys = [prompt_hash(p) for p in pairs.prompts]
    return LatentPairDataset.from_stores(vstore, tstore, zip(hw, hl, pkeys), stats)


def _usable_pairs(ds, report, vstore: ShardStore) -> tuple[list[int], list[tuple[str, str]], dict, dict]:
    """``(rows, (chosen, rejected) hashes, videos to encode {hash: (row, column)}, skipped)``
    of the rows that validation kept, ties skipped and counted."""
    bad = report.bad_rows
    rows, keys, where = [], [], {}
    skipped = {"bad_row": len(bad), "tie": 0}
    for i, (pref, hashes) in enumerate(zip((str(p) for p in ds["preference"]), report.hashes)):
        if i in bad:
            continue
        if pref == "tie":
            skipped["tie"] += 1
            continue
        ha, hb = hashes
        keys.append((ha, hb) if pref == "a" else (hb, ha))
        rows.append(i)
        for h, col in ((ha, "video_a"), (hb, "video_b")):
            if h not in vstore:
                where.setdefault(h, (i, col))
    return rows, keys, where, skipped


def _checked_rows(ds, source: str, root, pre: dict, bad_rows: str, allow_absolute_paths: bool, min_frames: int):
    """:func:`check_rows` of ``ds`` at the target ``pre``: its fatal problems raised (``bad_rows="error"``),
    and without a target, videos of several shapes refused."""
    report = check_rows(
        ds, source, root, allow_absolute_paths=allow_absolute_paths, min_frames=min_frames, target=pre or None
    )
    if report.fatal and bad_rows == "error":
        raise PreferenceDataError(source, [(p.row, p.message) for p in report.fatal])
    if not pre and len(report.info.get("sizes", {})) + len(report.info.get("frames", {})) > 2:
        raise ValueError(
            f"{source}: videos of several sizes or lengths ({report.info['sizes']}, frames {report.info['frames']}); "
            f"pass the model's input as the target (num_frames, height, width, fps) to resample them to one"
        )
    return report


def _frame_loader(ds, source: str, root, pre: dict, allow_absolute_paths: bool) -> Callable[[int, str], np.ndarray]:
    """``load(row, column)``: one video of ``ds`` decoded and brought to the target ``pre``."""
    readers = {col: value_reader(ds, col) for col in ("video_a", "video_b")}
    fps_readers = {col: value_reader(ds, f"fps_{col[-1]}") for col in readers if f"fps_{col[-1]}" in ds.column_names}

    def load(i: int, col: str) -> np.ndarray:
        value = readers[col](i)
        frames = load_video_value(value, root, allow_absolute_paths)
        if not pre:
            return frames
        column_fps = fps_readers[col](i) if col in fps_readers else None
        src_fps = video_fps(value, root, allow_absolute_paths, column_fps)
        try:
            return resample_frames(
                frames, src_fps, pre.get("num_frames"), pre.get("fps"), pre.get("height"), pre.get("width")
            )
        except ValueError as e:
            raise ValueError(f"{source}: row {i} {col}: {e}") from None

    return load


def build_latent_cache(
    model,
    ds,
    cache_dir: str | Path,
    source: str = "dataset",
    root=None,
    *,
    preprocessing: dict | None = None,
    target: dict | None = None,
    bad_rows: str = "error",
    allow_absolute_paths: bool = False,
    min_frames: int = 1,
    batch_size: int = 16,
    shard_bytes: int = SHARD_BYTES,
    model_source: str | None = None,
    model_options: dict | None = None,
    fill_command: str | None = None,
) -> LatentPairDataset:
    """Validate ``ds`` and fill the cache from it, streaming: at most one batch of decoded videos
    is in memory at any time, so datasets whose pixels exceed RAM can be cached and trained.

    ``target`` (or its older name ``preprocessing``; ``target`` wins where both set a key):
    ``num_frames``, ``height``, ``width``, ``fps``, the model's input. Every video is brought to
    it by :func:`align.data.video.resample_frames` (timestamps at ``fps``, resize + centre crop),
    so videos of any size, fps and length share one cache; it is part of the fingerprint. A video
    too short for it is a bad row. Without a target, all videos must share one shape. Bad rows
    raise :class:`PreferenceDataError` (``bad_rows="error"``) or are skipped and counted
    (``"skip"``); ties are skipped and counted. Videos are decoded once to validate and hash
    them, and again only where the cache misses. The states of every distinct prompt of ``ds``
    are cached; with ``model_source`` (a diffusers pipeline's directory or Hub id, and its
    ``model_options``) keyed by its text-encoder files, and ``""`` too (see the module
    docstring). A model without its text encoder finds them there; a prompt missing then is a
    ValueError naming it and ``fill_command``, raised before any video is read. Returns the
    pairs as a :class:`LatentPairDataset`; its ``stats`` holds the counts and ``rows`` the
    source row of each pair.
    """
    if bad_rows not in ("error", "skip"):
        raise ValueError(f"bad_rows must be 'error' or 'skip', got {bad_rows!r}")
    if len(ds) == 0:
        raise ValueError(f"{source}: the preference dataset is empty")
    pre = normalize_preprocessing(
        {**(preprocessing or {}), **{k: v for k, v in (target or {}).items() if v is not None}}
    )
    vstore, tstore, by_files = _open_stores(model, cache_dir, pre, shard_bytes, model_source, model_options)
    prompts = [str(p) for p in ds["prompt"]]
    wanted = [*dict.fromkeys(prompts), *([""] if by_files else [])]
    if not text_encoder_loaded(model) and (missing := [p for p in wanted if prompt_hash(p) not in tstore]):
        raise ValueError(missing_prompts_message(missing, cache_dir, fill_command))
    root = dataset_root(root)
    report = _checked_rows(ds, source, root, pre, bad_rows, allow_absolute_paths, min_frames)
    rows, keys, where, skipped = _usable_pairs(ds, report, vstore)
    if not rows:
        raise ValueError(f"{source}: no usable pairs (skipped: {skipped})")
    load = _frame_loader(ds, source, root, pre, allow_absolute_paths)
    p_enc = _encode_prompts(model, tstore, wanted, batch_size)
    hits = len({h for k in keys for h in k}) - len(where)
    n_enc = _encode_videos(model, vstore, ((h, lambda i=i, c=c: load(i, c)) for h, (i, c) in where.items()), batch_size)
    vstore.flush()
    tstore.flush()
    if by_files:
        _write_unconditional(model, tstore)
    stats = {
        "pairs": len(rows),
        "skipped": skipped,
        "warnings": [str(p) for p in report.warnings],
        "prompts_by_text_encoder_files": by_files,
        "text_encoder": "loaded" if text_encoder_loaded(model) else "not loaded",
        **_stats(vstore, tstore, wanted, n_enc, hits, p_enc),
    }
    pkeys = [prompt_hash(prompts[i]) for i in rows]
    out = LatentPairDataset.from_stores(vstore, tstore, ((w, lo, p) for (w, lo), p in zip(keys, pkeys)), stats)
    out.rows = rows
    return out


# --------------------------------------------------------------------------------------------
# prompt states without the text encoder


def cache_command(dataset: str, model: str, cache_dir: str, options: dict | None = None, device=None) -> str:
    """The ``vidalign data cache`` command that fills ``cache_dir`` for a training run with these
    model ``options`` on ``device`` (the options that key the cache are spelled out)."""
    options = options or {}
    parts = ["vidalign", "data", "cache", str(dataset), "--model", str(model), "--cache-dir", str(cache_dir)]
    for key in ("num_frames", "height", "width", "fps", "max_sequence_length", "dtype"):
        if options.get(key) is not None:
            parts += [f"--{key.replace('_', '-')}", str(options[key])]
    if device is not None and torch.device(device).type != "cpu":
        parts += ["--device", str(device)]
    return shlex.join(parts)


def cached_prompt_states(identity: dict, cache_dir, prompts: list[str]) -> tuple[list[str], Path | None]:
    """``(prompts missing, unconditional.safetensors or None)`` of the prompt namespace in
    ``cache_dir`` whose text-encoder files match ``identity`` (:func:`text_identity`; no such
    namespace: every prompt is missing). Nothing is loaded but the namespaces' shard headers."""
    want = _digest(identity)
    fewest = list(prompts)
    for meta_file in sorted(Path(cache_dir).glob("prompt-*/fingerprint.json")):
        meta = json.loads(meta_file.read_text())
        if meta.get("identity") != want or not (meta_file.parent / UNCOND_FILE).is_file():
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a damaged shard is reported when the run opens the store
            store = ShardStore(meta_file.parent, meta["fingerprint"], meta)
        missing = [p for p in prompts if prompt_hash(p) not in store]
        if not missing:
            return [], meta_file.parent / UNCOND_FILE
        fewest = min(fewest, missing, key=len)
    return fewest, None
