"""Judges: anything that scores videos against their prompts, higher is better.

Every command that needs scores (``data pairs``, ``data samples``, ``eval``, online RWR) takes
judges the same way, as ``--judge SPEC`` strings parsed by :func:`parse_judge`:

- ``reward:DIR`` -- a trained vidalign reward model (``vidalign reward train``; its ``best/``
  directory, with ``reward_config.json`` and ``model.safetensors``).
- ``clip:MODEL[@PRETRAINED]`` -- zero-shot CLIP score with an open_clip model: the mean over
  ``num_frames`` evenly spaced frames of ``100 * cos(frame, prompt)`` (the CLIPScore convention
  of Hessel et al. 2021 without its clipping at 0 and its 2.5 rescaling, so that scores stay a
  smooth function of the video). ``PRETRAINED`` is an open_clip tag (e.g. ``openai``, downloaded
  as open_clip does) or a local weights file (``.safetensors``, or a torch state dict loaded with
  ``weights_only=True``). Without it: open_clip's ``openai`` tag when the model has one, else
  its first tag, else (a model with no published weights, e.g. the tests' tiny config) random
  weights (seeded: the same ones every time) with a warning.
- ``http:URL`` (or a bare ``http://...`` / ``https://...``) -- a scoring service: POST
  ``{"prompts": [...], "videos": [base64 mp4, ...]}``, answer ``{"scores": [...]}``, so that a
  VLM reward model served elsewhere can judge. ``parse_judge`` sends one probe request (a black
  8-frame 64x64 clip), so a service that is down, slow or answers garbage fails before any
  sampling. Settings: ``VIDALIGN_HTTP_TIMEOUT`` (the deadline of one request, connect and the
  whole answer together: seconds, default 120), ``VIDALIGN_HTTP_MAX_BYTES`` (the largest answer
  read, default 16 MiB), ``VIDALIGN_HTTP_RETRIES`` (retries of transient failures only:
  connection refused or reset, HTTP 5xx, 429; default 2), ``VIDALIGN_HTTP_BATCH`` (videos per
  request, default 8).
- ``oracle`` -- the synthetic world's oracle (its total score), for the demo's prompts only.

``human`` is not a scoring judge: ``vidalign eval --judge human`` writes a blinded A/B task
instead (:mod:`align.eval.human`).

Commands that need one score per video combine several judges with the one rule of
:func:`combine_judges` (one judge: its raw scores; several: the weighted mean of their
z-scores). All spec errors, bad directories and unreachable services are raised by
:func:`parse_judge`, before anything is sampled.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable
from urllib.parse import urlsplit

import numpy as np

from align.models import default_device

KINDS = ("reward:DIR", "clip:MODEL[@PRETRAINED]", "http:URL", "oracle")


class JudgeError(ValueError):
    """A judge could not be built or gave an unusable answer (the CLI prints it and exits 2)."""


@runtime_checkable
class Judge(Protocol):
    """Scores uint8 videos ``(N, T, H, W, C)`` for their prompts: ``(N,)`` floats, higher is better."""

    name: str

    def score(self, videos: np.ndarray, prompts: list[str]) -> np.ndarray: ...


def _check_batch(videos, prompts, name: str) -> None:
    if len(videos) != len(prompts):
        raise JudgeError(f"judge {name}: {len(videos)} videos but {len(prompts)} prompts")
    if len(prompts) == 0:
        raise JudgeError(f"judge {name}: nothing to score (no videos)")
    v = np.asarray(videos[0]) if len(videos) else None
    if v is None or v.ndim != 4 or v.shape[-1] != 3 or v.dtype != np.uint8:
        shape = None if v is None else (v.shape, v.dtype)
        raise JudgeError(f"judge {name}: videos must be uint8 (N, T, H, W, 3), got {shape}")


# ------------------------------------------------------------------------------------ reward


class RewardJudge:
    """A trained vidalign reward model (``VideoRewardModel``) as a judge."""

    def __init__(self, path: str | Path, device: str | None = None):
        from reward_models.model import VideoRewardModel

        path = Path(path)
        if not (path / "reward_config.json").is_file():
            what = (
                "is not a directory" if not path.is_dir() else "is not a vidalign reward model (no reward_config.json)"
            )
            raise JudgeError(
                f"judge reward:{path}: {path} {what}; give the directory `vidalign reward train` wrote "
                "(e.g. runs/reward_clip/best)"
            )
        self.name = f"reward:{path}"
        self.model = VideoRewardModel.from_pretrained(path, device=device or default_device())

    def score(self, videos: np.ndarray, prompts: list[str]) -> np.ndarray:
        _check_batch(videos, prompts, self.name)
        return np.asarray(self.model.score(videos, list(prompts)), dtype=np.float64)


# -------------------------------------------------------------------------------------- clip


def _open_clip():
    """open_clip with vidalign's model configs (e.g. ``vidalign-tiny-clip``) registered."""
    import open_clip

    from reward_models.model import CONFIG_DIR

    if str(CONFIG_DIR) not in [str(p) for p in open_clip.factory._MODEL_CONFIG_PATHS]:
        open_clip.add_model_config(CONFIG_DIR)
    return open_clip


def _resolve_clip_weights(open_clip, model_name: str, pretrained: str | None) -> tuple[str | None, Path | None]:
    """``(open_clip tag or None, local file or None)`` for ``clip:MODEL[@PRETRAINED]``."""
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    if pretrained is None:
        if not tags:
            warnings.warn(
                f"judge clip:{model_name}: no published weights for this model; scoring with random weights "
                "(give clip:MODEL@WEIGHTS_FILE for real ones)",
                stacklevel=3,
            )
            return None, None
        return ("openai" if "openai" in tags else tags[0]), None
    local = Path(pretrained)
    if local.suffix in (".safetensors", ".pt", ".pth", ".bin") or local.exists():
        if not local.is_file():
            raise JudgeError(f"judge clip:{model_name}@{pretrained}: weights file {local} does not exist")
        return None, local
    if pretrained not in tags:
        raise JudgeError(
            f"judge clip:{model_name}@{pretrained}: {pretrained!r} is neither a file nor an open_clip tag of "
            f"{model_name} (tags: {', '.join(tags) or 'none'})"
        )
    return pretrained, None


class ClipJudge:
    """Zero-shot CLIP score: mean over ``num_frames`` evenly spaced frames of 100 * cos(frame, prompt)."""

    def __init__(self, model_name: str, pretrained: str | None = None, device: str | None = None, num_frames: int = 8):
        import torch

        open_clip = _open_clip()
        spec = f"clip:{model_name}" + (f"@{pretrained}" if pretrained else "")
        if model_name not in open_clip.list_models():
            raise JudgeError(f"judge {spec}: unknown open_clip model {model_name!r} (see open_clip.list_models())")
        tag, local = _resolve_clip_weights(open_clip, model_name, pretrained)
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)  # random weights (no tag, no file) are the same ones every time
                model = open_clip.create_model(model_name, pretrained=tag)
        except (RuntimeError, OSError, ValueError) as e:  # e.g. offline and not in the cache
            raise JudgeError(f"judge {spec}: could not load open_clip weights {tag!r} ({e})") from e
        if local is not None:
            from reward_models.model import load_weights

            missing, unexpected = model.load_state_dict(load_weights(local), strict=False)
            if missing or unexpected:
                raise JudgeError(
                    f"judge {spec}: {local} does not fit {model_name}: missing {missing[:5]}, "
                    f"unexpected {unexpected[:5]}"
                )
        self.name = f"clip:{model_name}@{tag or local}" if (tag or local) else f"clip:{model_name}"
        self.device = torch.device(device or default_device())
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(model_name)
        cfg = open_clip.get_model_preprocess_cfg(model)
        self.image_size = tuple(cfg.get("size", model.visual.image_size))
        self.mean = torch.tensor(cfg.get("mean", (0.48145466, 0.4578275, 0.40821073))).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg.get("std", (0.26862954, 0.26130258, 0.27577711))).view(1, 3, 1, 1)
        self.num_frames = num_frames

    def _frames(self, videos: np.ndarray):
        """K evenly spaced frames of each video, resized (shortest side), centre-cropped and
        normalised: ``(N * K, 3, h, w)``."""
        import torch
        import torch.nn.functional as F

        T = videos.shape[1]
        idx = np.linspace(0, T - 1, min(self.num_frames, T)).round().astype(int)
        x = torch.as_tensor(np.ascontiguousarray(videos[:, idx])).flatten(0, 1).permute(0, 3, 1, 2).float() / 255
        h, w = x.shape[-2:]
        th, tw = self.image_size
        s = max(th / h, tw / w)
        x = F.interpolate(x, size=(max(th, round(h * s)), max(tw, round(w * s))), mode="bicubic", antialias=True)
        top, left = (x.shape[-2] - th) // 2, (x.shape[-1] - tw) // 2
        x = x[..., top : top + th, left : left + tw].clamp(0, 1)
        return ((x - self.mean) / self.std).to(self.device), len(idx)

    def score(self, videos: np.ndarray, prompts: list[str], batch_size: int = 16) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        _check_batch(videos, prompts, self.name)
        out = []
        with torch.no_grad():
            for i in range(0, len(prompts), batch_size):
                frames, k = self._frames(np.asarray(videos[i : i + batch_size]))
                f = F.normalize(self.model.encode_image(frames).float(), dim=-1)
                ids = self.tokenizer(list(prompts[i : i + batch_size])).to(self.device)
                t = F.normalize(self.model.encode_text(ids).float(), dim=-1)
                cos = (f.view(len(t), k, -1) * t[:, None]).sum(-1)  # (B, K)
                out.append((100.0 * cos.mean(dim=1)).cpu().numpy())
        return np.concatenate(out).astype(np.float64)


# -------------------------------------------------------------------------------------- http


def _env_number(name: str, default: float, cast=float) -> float:
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        value = cast(raw)
    except ValueError:
        raise JudgeError(f"environment variable {name}={raw!r} is not a number") from None
    if value < (1 if cast is int and name.endswith("BATCH") else 0):
        raise JudgeError(f"environment variable {name}={raw!r} is out of range")
    return value


def encode_mp4(video: np.ndarray, fps: int = 8) -> bytes:
    """One uint8 ``(T, H, W, 3)`` video as the bytes of an mp4 file."""
    from align.data.video import write_video

    with tempfile.TemporaryDirectory() as d:
        return write_video(Path(d) / "v.mp4", video, fps=fps).read_bytes()


HTTP_TIMEOUT = 120.0  # seconds: the deadline of one request (connect, send, the whole answer)
HTTP_MAX_BYTES = 16 * 1024 * 1024  # the largest answer read (scores are a few bytes each)
HTTP_RETRIES = 2
HTTP_CHUNK = 64 * 1024
HTTP_MAX_RETRY_AFTER = 10.0  # seconds: the longest Retry-After honoured between tries


class _DeadlineReader(io.RawIOBase):
    """The reading side of a socket on which every read waits at most the time left until
    ``deadline`` (``time.monotonic()``): a service that trickles its answer a byte at a time
    cannot stretch a request beyond it, as it can a per-read timeout. Past it: ``TimeoutError``."""

    def __init__(self, sock, deadline: float):
        super().__init__()
        # the socket's own raw file: it keeps the socket open while the answer is read, as
        # http.client expects (it may close the connection's handle of it before)
        self._sock, self._raw, self._deadline = sock, sock.makefile("rb", buffering=0), deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("timed out")
        self._sock.settimeout(left)
        return self._raw.readinto(buffer)

    def close(self) -> None:
        self._raw.close()
        super().close()


class _DeadlineSocket:
    """What :class:`http.client.HTTPResponse` reads its status, headers and body from."""

    def __init__(self, sock, deadline: float):
        self._sock, self._deadline = sock, deadline

    def makefile(self, mode: str = "rb", *args, **kwargs) -> io.BufferedReader:
        return io.BufferedReader(_DeadlineReader(self._sock, self._deadline))


class _Failure(Exception):
    """One try of a request failed: ``reason`` for the message, ``transient`` when a retry may
    help (connection refused or reset, HTTP 5xx, 429), ``retry_after`` as the service asked."""

    def __init__(self, reason: str, transient: bool = False, retry_after: float | None = None, hint: str = ""):
        super().__init__(reason)
        self.reason, self.transient, self.retry_after, self.hint = reason, transient, retry_after, hint


def _retry_after(value: str | None) -> float | None:
    """A ``Retry-After`` in seconds (the HTTP-date form is ignored), at most HTTP_MAX_RETRY_AFTER."""
    try:
        return min(max(float(value), 0.0), HTTP_MAX_RETRY_AFTER) if value else None
    except ValueError:
        return None


class HttpJudge:
    """A scoring service: POST ``{"prompts", "videos": [base64 mp4]}`` -> ``{"scores"}``.

    Each request has an overall deadline, ``timeout`` seconds for connecting, sending and
    reading the whole answer (``$VIDALIGN_HTTP_TIMEOUT``, default :data:`HTTP_TIMEOUT`); an
    answer over ``max_bytes`` (``$VIDALIGN_HTTP_MAX_BYTES``, default :data:`HTTP_MAX_BYTES`) is
    refused without being read whole. Only transient failures (connection refused or reset,
    HTTP 5xx, 429) are retried, ``retries`` times (``$VIDALIGN_HTTP_RETRIES``) with exponential
    backoff; a request past its deadline, a 4xx, an oversized or malformed answer are not."""

    def __init__(
        self,
        url: str,
        timeout: float | None = None,
        retries: int | None = None,
        batch_size: int | None = None,
        fps: int = 8,
        probe: bool = True,
        max_bytes: int | None = None,
    ):
        if not url.startswith(("http://", "https://")) or len(url.split("://", 1)[1]) == 0:
            raise JudgeError(f"judge http:{url}: not an http:// or https:// URL")
        self.url, self.name, self.fps = url, f"http:{url}", fps
        self.timeout = timeout if timeout is not None else _env_number("VIDALIGN_HTTP_TIMEOUT", HTTP_TIMEOUT)
        self.retries = retries if retries is not None else int(_env_number("VIDALIGN_HTTP_RETRIES", HTTP_RETRIES, int))
        self.batch_size = batch_size or int(_env_number("VIDALIGN_HTTP_BATCH", 8, int))
        self.max_bytes = (
            max_bytes if max_bytes is not None else _env_number("VIDALIGN_HTTP_MAX_BYTES", HTTP_MAX_BYTES, int)
        )
        if not self.timeout > 0:
            raise JudgeError(f"judge {self.name}: the deadline VIDALIGN_HTTP_TIMEOUT must be > 0 s, got {self.timeout}")
        if self.max_bytes < 1:
            raise JudgeError(f"judge {self.name}: VIDALIGN_HTTP_MAX_BYTES must be >= 1, got {self.max_bytes}")
        if probe:
            self.score(np.zeros((1, 8, 64, 64, 3), np.uint8), ["a probe video"])

    def _post(self, body: bytes) -> bytes:
        """The answer's bytes. Transient failures are retried after 0.5, 1, 2, ... s (at most
        5 s, or the service's ``Retry-After`` up to HTTP_MAX_RETRY_AFTER); others end at once."""
        for attempt in range(self.retries + 1):
            try:
                return self._request(body)
            except _Failure as e:
                failure = e
            if not failure.transient or attempt == self.retries:
                break
            time.sleep(max(min(2.0 ** (attempt + 1) * 0.25, 5.0), failure.retry_after or 0.0))
        raise JudgeError(
            f"judge {self.name}: no usable answer from {self.url} after {attempt + 1} tries "
            f"({failure.reason}){failure.hint}"
        )

    def _request(self, body: bytes) -> bytes:
        """One POST within the deadline; its answer (2xx) read up to the cap, or :class:`_Failure`."""
        deadline = time.monotonic() + self.timeout
        url = urlsplit(self.url)
        connection = http.client.HTTPSConnection if url.scheme == "https" else http.client.HTTPConnection
        try:  # the host[:port] of the URL, without any user:password@
            con = connection(url.netloc.rpartition("@")[2], timeout=self.timeout)
        except http.client.InvalidURL as e:  # e.g. a port that is not a number
            raise _Failure(f"bad URL: {e}") from None
        con.response_class = lambda sock, *a, **k: http.client.HTTPResponse(_DeadlineSocket(sock, deadline), *a, **k)
        path = (url.path or "/") + (f"?{url.query}" if url.query else "")
        try:
            con.connect()
            con.sock.settimeout(max(deadline - time.monotonic(), 1e-3))  # sending: in all, not per write
            con.request("POST", path, body=body, headers={"Content-Type": "application/json"})
            res = con.getresponse()
            if not 200 <= res.status < 300:
                transient = res.status >= 500 or res.status == 429
                raise _Failure(f"HTTP {res.status} {res.reason}", transient, _retry_after(res.getheader("Retry-After")))
            return self._read_capped(res)
        except TimeoutError:
            hint = "; VIDALIGN_HTTP_TIMEOUT is the deadline of one request (connect, send and the whole answer)"
            raise _Failure(f"timed out after {self.timeout:g} s", hint=hint) from None
        except (ConnectionRefusedError, ConnectionResetError, ConnectionAbortedError, BrokenPipeError) as e:
            raise _Failure(str(e) or type(e).__name__, transient=True) from None
        except (OSError, http.client.HTTPException) as e:  # no such host, TLS, a garbled answer
            raise _Failure(f"{type(e).__name__}: {e}") from None
        finally:
            con.close()

    def _read_capped(self, res: http.client.HTTPResponse) -> bytes:
        """The body, read in chunks and refused (:class:`_Failure`) once over ``max_bytes``."""
        over = f"the answer is over the cap of {self.max_bytes} bytes (VIDALIGN_HTTP_MAX_BYTES)"
        length = res.getheader("Content-Length")
        if length is not None and length.strip().isdigit() and int(length) > self.max_bytes:
            raise _Failure(f"{over}: Content-Length {int(length)}")
        chunks, size = [], 0
        while chunk := res.read(HTTP_CHUNK):
            size += len(chunk)
            if size > self.max_bytes:
                raise _Failure(f"{over}; stopped reading at {size} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    def _parse(self, raw: bytes, n: int) -> np.ndarray:
        snippet = raw[:200].decode("utf-8", "replace")
        try:
            answer = json.loads(raw)
        except (ValueError, RecursionError):  # not JSON or UTF-8, a 5,000-digit number, nested too deeply
            raise JudgeError(
                f"judge {self.name}: {self.url} answered with something that is not JSON: {snippet!r}"
            ) from None
        scores = answer.get("scores") if isinstance(answer, dict) else None
        if not isinstance(scores, list) or len(scores) != n:
            raise JudgeError(f'judge {self.name}: {self.url} must answer {{"scores": [{n} numbers]}}, got {snippet!r}')
        bad = [i for i, s in enumerate(scores) if isinstance(s, bool) or not isinstance(s, (int, float))]
        arr = np.array([np.nan if i in bad else s for i, s in enumerate(scores)], dtype=np.float64)
        bad = bad or np.flatnonzero(~np.isfinite(arr)).tolist()
        if bad:
            raise JudgeError(f"judge {self.name}: {self.url} gave a non-number score at position {bad[0]}: {snippet!r}")
        return arr

    def score(self, videos: np.ndarray, prompts: list[str]) -> np.ndarray:
        _check_batch(videos, prompts, self.name)
        out = []
        for i in range(0, len(prompts), self.batch_size):
            batch = [base64.b64encode(encode_mp4(v, self.fps)).decode() for v in videos[i : i + self.batch_size]]
            ps = list(prompts[i : i + self.batch_size])
            out.append(self._parse(self._post(json.dumps({"prompts": ps, "videos": batch}).encode()), len(ps)))
        return np.concatenate(out)


# ------------------------------------------------------------------------------------ oracle


class OracleJudge:
    """The synthetic world's oracle (its ``total``): the demo's judge, for the demo's prompts only."""

    name = "oracle"

    def __init__(self):
        from align.demo import synthetic  # the demo's world: imported only when this judge is used

        self._synthetic = synthetic

    def check_prompts(self, prompts: Sequence[str]) -> None:
        """Raise before sampling when a prompt is not one of the synthetic world's."""
        for p in dict.fromkeys(prompts):
            try:
                self._synthetic.parse_prompt(p)
            except ValueError as e:
                raise JudgeError(
                    f"judge oracle: {e}; the oracle knows only the demo's synthetic world -- judge your own "
                    "prompts with reward:DIR, clip:MODEL or http:URL"
                ) from None

    def attribute_scores(self, videos: np.ndarray, prompts: list[str]) -> list[dict[str, float]]:
        """Per video, the oracle's total and per-attribute scores."""
        return self._synthetic.oracle_scores(videos, list(prompts))

    def score(self, videos: np.ndarray, prompts: list[str]) -> np.ndarray:
        _check_batch(videos, prompts, self.name)
        return np.array([s["total"] for s in self.attribute_scores(videos, prompts)], dtype=np.float64)


# ----------------------------------------------------------------------------------- parsing


def parse_judge(spec: str, device: str | None = None) -> Judge:
    """Build the judge a ``--judge SPEC`` string names (see the module docstring); every error
    (unknown kind, bad directory, unloadable weights, unreachable service) is raised here."""
    s = str(spec).strip()
    if s == "oracle":
        return OracleJudge()
    if s == "human":
        raise JudgeError(
            "judge human does not score videos: `vidalign eval --judge human` writes a blinded A/B task for "
            "annotators instead; other commands need a scoring judge"
        )
    if s.startswith(("http://", "https://")):
        return HttpJudge(s)
    kind, sep, rest = s.partition(":")
    if sep and rest.strip():
        if kind == "reward":
            return RewardJudge(rest, device=device)
        if kind == "clip":
            name, _, pretrained = rest.partition("@")
            return ClipJudge(name, pretrained or None, device=device)
        if kind == "http":
            return HttpJudge(rest)
    raise JudgeError(f"unknown judge {spec!r}; a judge is one of: {', '.join(KINDS)} (and `human` for eval)")


def load_judges(specs: Sequence[str], device: str | None = None) -> list[Judge]:
    """``parse_judge`` for each spec; a spec given twice is an error (it would count twice)."""
    seen = [s for i, s in enumerate(specs) if s in specs[:i]]
    if seen:
        raise JudgeError(f"judge {seen[0]!r} is given twice")
    return [parse_judge(s, device=device) for s in specs]


def check_prompts(judges: Sequence[Judge], prompts: Sequence[str]) -> None:
    """Raise before sampling when a judge cannot judge these prompts (the oracle: non-world prompts)."""
    for j in judges:
        if isinstance(j, OracleJudge):
            j.check_prompts(prompts)


def _span(ids: Sequence[int]) -> str:
    """Video numbers for a message: ``4`` / ``4-7`` (a run) / ``0, 2, 5, ...`` (at most 8)."""
    ids = [int(i) for i in ids]
    if len(ids) > 1 and ids == list(range(ids[0], ids[0] + len(ids))):
        return f"{ids[0]}-{ids[-1]}"
    return ", ".join(map(str, ids[:8])) + (", ..." if len(ids) > 8 else "")


def judge_scores(
    judge: Judge, videos: np.ndarray, prompts: list[str], index: Sequence[int] | None = None, what: str = "video"
) -> np.ndarray:
    """``judge.score`` checked: one finite float per video, or a :class:`JudgeError` that names the
    judge, the video(s) and the prompt -- never a silent 0. A judge that raises (a crashed reward
    model; an ``http:`` service past its deadline or still failing after its retries, which
    HttpJudge raises itself), that answers with the wrong number of scores or with a NaN or inf
    is an error here, so every caller (online rounds, ``data pairs``, ``eval``) stops. ``index``
    numbers the videos in the message (e.g. a round's rollout numbers; default ``0 .. N-1``) and
    ``what`` names them (``video``, ``rollout``)."""
    ids = list(range(len(prompts))) if index is None else [int(i) for i in index]
    where = f"{what}s {_span(ids)} (first prompt {str(prompts[0]) if prompts else ''!r})"
    try:
        s = np.asarray(judge.score(videos, list(prompts)), dtype=np.float64).reshape(-1)
    except Exception as e:  # any failure of a judge stops the caller, named
        raise JudgeError(f"judge {judge.name} failed on {where}: {type(e).__name__}: {e}") from e
    if s.shape != (len(prompts),):
        raise JudgeError(f"judge {judge.name} returned {s.size} scores for {len(prompts)} {where}")
    bad = np.flatnonzero(~np.isfinite(s))
    if bad.size:
        b = int(bad[0])
        raise JudgeError(
            f"judge {judge.name} gave {bad.size} non-finite score(s): {s[b]} for {what} {ids[b]} "
            f"(prompt {prompts[b]!r})" + (f", also {what}s {_span([ids[i] for i in bad[1:]])}" if bad.size > 1 else "")
        )
    return s


ZSCORE_EPS = 1e-12  # a std at most this is a constant set: z-score 0


def zscore(x: np.ndarray, groups: Sequence[int] | None = None) -> np.ndarray:
    """``(x - mean) / std`` (population std) over the set, or within each group; a set whose
    std is at most ``ZSCORE_EPS`` (constant scores) scores 0. No eps is added to the std."""
    x = np.asarray(x, dtype=np.float64)
    keys = np.zeros(len(x), dtype=int) if groups is None else np.asarray(groups)
    if len(keys) != len(x):
        raise ValueError(f"zscore: {len(keys)} groups for {len(x)} scores")
    out = np.zeros_like(x)
    for g in np.unique(keys):
        m = keys == g
        sd = x[m].std()
        out[m] = (x[m] - x[m].mean()) / sd if sd > ZSCORE_EPS else 0.0
    return out


def combine_judges(
    scores: np.ndarray | Sequence[np.ndarray],
    weights: Sequence[float] | None = None,
    groups: Sequence[int] | None = None,
) -> np.ndarray:
    """THE rule that turns several judges' scores ``(J, N)`` into one score per video ``(N,)``,
    used by every caller that needs one number (online RWR and GRPO rewards, ``data pairs``,
    ``data samples``):

    - one judge: its raw scores, unchanged (so margins and temperatures stay in its units);
    - several: the ``weights``-weighted mean (``None`` = equal) of each judge's :func:`zscore`,
      within ``groups`` (e.g. prompt groups of an online round) when given, else over all ``N``.

    The z-score is exact (population std, no eps; a judge constant on a set scores 0 there), so
    no judge counts more because its scores are larger or spread wider. GRPO then normalises this
    score within each group again (its advantage, with its own eps: ``objectives.group_advantages``)."""
    s = np.stack([np.asarray(x, dtype=np.float64).reshape(-1) for x in scores]) if len(scores) else None
    if s is None:
        raise ValueError("combine_judges needs at least one judge's scores")
    w = np.ones(len(s)) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (len(s),) or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"combine_judges: need {len(s)} non-negative weights, not all 0; got {weights}")
    if len(s) == 1:
        return s[0]
    z = np.stack([zscore(sj, groups) for sj in s])
    return (w[:, None] * z).sum(0) / w.sum()


def combine_scores(
    scores: Sequence[np.ndarray], weights: Sequence[float] | None = None, groups: Sequence[int] | None = None
) -> np.ndarray:
    """:func:`combine_judges` (kept for callers that still use this name)."""
    return combine_judges(scores, weights, groups)


def score_judges(judges: Sequence[Judge], videos: np.ndarray, prompts: list[str]) -> np.ndarray:
    """Every judge's checked scores (:func:`judge_scores`) of the videos, ``(J, N)``."""
    if not judges:
        return np.zeros((0, len(prompts)))
    return np.stack([judge_scores(j, videos, prompts) for j in judges])


def combined_score(
    judges: Sequence[Judge],
    videos: np.ndarray,
    prompts: list[str],
    weights: Sequence[float] | None = None,
    groups: Sequence[int] | None = None,
) -> np.ndarray:
    """One score per video from the judges: :func:`score_judges`, then :func:`combine_judges`."""
    return combine_judges(score_judges(judges, videos, prompts), weights, groups)
