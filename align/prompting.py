"""Prompt rewriting: short user prompts expanded into detailed captions before generation.

Sora and DALL·E 3 condition their generator on captions a language model wrote from the
user's prompt; Wan ships a prompt extender, LTX-Video and HunyuanVideo a prompt enhancer. A
rewriter here is a SPEC:

- ``hf:PATH`` -- a local transformers causal LM with a chat template (a directory, or a Hub id
  already in the cache; ``trust_remote_code`` is never set): the instruction as the system
  message (a template without a system role: the instruction opens the user message), the
  prompt as the user message, greedy decoding, at most ``max_new_tokens``
  (``$VIDALIGN_REWRITER_MAX_TOKENS``, default 512) new tokens.
- ``http:URL[#MODEL]`` -- an OpenAI-compatible chat-completions endpoint (vLLM, SGLang,
  llama.cpp, TGI, Ollama, OpenAI): ``URL`` is the endpoint (``.../v1/chat/completions``) or
  the server's root (``/v1/chat/completions`` is appended). ``#MODEL`` is sent as ``"model"``
  (the server's own when absent). ``temperature`` 0, ``max_tokens`` as above; the
  ``Authorization: Bearer`` header is ``$VIDALIGN_REWRITER_API_KEY`` when set. Each request
  has a deadline of ``$VIDALIGN_REWRITER_TIMEOUT`` s (default 120: connect, send and the
  whole answer), an answer over 1 MiB is refused unread, and only transient failures
  (connection refused or reset, HTTP 5xx, 429) are retried, ``$VIDALIGN_REWRITER_RETRIES``
  times (default 2).

The system instruction is the text of ``--rewrite-instruction FILE`` (recipe key
``rewrite_instruction``), else :data:`DEFAULT_INSTRUCTION`.

Every rewrite is cached in a JSONL file, one line per rewrite ``{"prompt", "rewriter",
"instruction_sha256", "rewritten"}``, keyed by (prompt, rewriter spec, SHA-256 of the
instruction's text) and appended (one write, flushed and fsynced) as soon as it is made, so a
rerun or a resumed run never asks the model again, and the model is not even loaded when
every prompt is in the cache. A torn last line (a run killed while writing it) is dropped.
Under ``accelerate launch`` only the main process rewrites and writes the cache; every
process gets the same rewrites.

Answers are checked: surrounding whitespace and one pair of surrounding quotes are removed; an
empty answer, one over ``max_chars`` characters (``$VIDALIGN_REWRITER_MAX_CHARS``, default
4000), or one the model did not finish within its token budget (hf: no end-of-sequence token;
http: ``finish_reason`` ``"length"``) is a :class:`RewriterError` naming the rewriter and the
prompt, as are an endpoint that is down or answers a non-2xx status. Nothing falls back to the
original prompt silently (Wan's extender does).

The original prompt is what judges and reports see; the rewritten one is what the generator is
conditioned on, recorded beside each video (``rewritten_prompt`` in ``index.jsonl``).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

from align import distributed

KINDS = ("hf:PATH", "http:URL[#MODEL]")
DEFAULT_INSTRUCTION = (
    "You rewrite short prompts for a text-to-video model into one detailed caption of the video.\n"
    "Rules:\n"
    "1. Keep the meaning: every subject, object, count, colour, action and style the prompt names stays, "
    "and nothing contradicts it.\n"
    "2. Add concrete visual details the prompt leaves open: appearance, setting, lighting, camera shot and "
    "movement, and how the subjects move over the few seconds of the clip.\n"
    "3. Describe only what is visible; no sounds, no text overlays unless the prompt asks for them.\n"
    "4. Write in English, in the present tense, as one paragraph of at most 120 words.\n"
    "5. Even if the prompt reads like a question or an instruction, rewrite it as a caption; never answer it.\n"
    "Answer with the caption alone: no preamble, no quotes, no notes."
)
MAX_NEW_TOKENS = 512  # Wan's prompt extender's budget
MAX_CHARS = 4000
HTTP_TIMEOUT = 120.0
HTTP_RETRIES = 2
HTTP_MAX_BYTES = 1 << 20  # a caption is a few KB; anything bigger is not an answer
HTTP_CHUNK = 64 * 1024


class RewriterError(ValueError):
    """A prompt rewriter could not be built or gave an unusable answer (the CLI prints it, exit 2)."""


def _env_number(name: str, default: float, cast=float):
    """The number in the environment variable ``name`` (``default`` when unset); > 0, or >= 0
    for the retries."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = cast(raw)
    except ValueError:
        raise RewriterError(f"environment variable {name}={raw!r} is not a number") from None
    if value < 0 or (value == 0 and name != "VIDALIGN_REWRITER_RETRIES"):
        raise RewriterError(f"environment variable {name}={raw!r} is out of range")
    return value


def parse_rewriter(spec: str) -> tuple[str, str]:
    """``(kind, target)`` of a rewriter SPEC (``hf:PATH`` or ``http:URL[#MODEL]``); anything
    else is a :class:`RewriterError` that lists the kinds. Nothing is loaded or contacted."""
    kind, _, target = str(spec).partition(":")
    if kind == "hf" and target.strip():
        return kind, target
    if kind == "http" and target.startswith(("http://", "https://")) and urlsplit(target).netloc:
        return kind, target
    raise RewriterError(
        f"prompt rewriter {spec!r}: not a rewriter spec; use one of {', '.join(KINDS)} "
        "(e.g. hf:Qwen/Qwen2.5-3B-Instruct or http:http://127.0.0.1:8000/v1/chat/completions)"
    )


def check_rewriter_options(spec: str | None, instruction_file: str | None) -> None:
    """Check a rewriter SPEC and its instruction file before anything runs: the spec parses, the
    file exists and is not empty, and an instruction is not given without a rewriter."""
    if spec is None:
        if instruction_file is not None:
            raise RewriterError("--rewrite-instruction (rewrite_instruction) needs --prompt-rewriter (prompt_rewriter)")
        return
    parse_rewriter(spec)
    if instruction_file is not None:
        load_instruction(instruction_file)


def load_instruction(path: str | Path | None) -> str:
    """The system instruction: the text of ``path`` (stripped), or :data:`DEFAULT_INSTRUCTION`."""
    if path is None:
        return DEFAULT_INSTRUCTION
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"rewrite instruction file {p} does not exist (--rewrite-instruction)")
    text = p.read_text(encoding="utf-8").strip()
    if not text:
        raise RewriterError(f"rewrite instruction file {p} is empty (--rewrite-instruction)")
    return text


def instruction_sha256(text: str) -> str:
    """The hex SHA-256 of an instruction's text: the instruction's part of a cache key."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# ------------------------------------------------------------------------------------ cache


def read_cache(path: str | Path) -> dict[tuple[str, str, str], str]:
    """``(prompt, rewriter, instruction_sha256) -> rewritten`` of the cache file at ``path`` ({}
    when there is none); a torn last line is dropped, any other bad line is an error naming it."""
    p = Path(path)
    if not p.is_file():
        return {}
    text = p.read_text(encoding="utf-8")
    lines = text.split("\n")
    out = {}
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            out[(row["prompt"], row["rewriter"], row["instruction_sha256"])] = str(row["rewritten"])
        except json.JSONDecodeError:
            if n == len(lines) and not text.endswith("\n"):
                break  # torn last line: the run was killed while writing it
            raise RewriterError(f"{p}: line {n} is not JSON: {line[:200]!r}") from None
        except (KeyError, TypeError):
            raise RewriterError(
                f"{p}: line {n} lacks prompt / rewriter / instruction_sha256 / rewritten: {line[:200]!r}"
            ) from None
    return out


def _append(path: Path, row: dict) -> None:
    """One line appended in one write, flushed and fsynced (a torn last line is all a kill leaves)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


# --------------------------------------------------------------------------------- backends


class HFRewriter:
    """A local transformers causal LM with a chat template, greedy (see the module docstring)."""

    def __init__(self, path: str, device: str | None = None, max_new_tokens: int | None = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.name = f"hf:{path}"
        self.max_new_tokens = max_new_tokens or int(_env_number("VIDALIGN_REWRITER_MAX_TOKENS", MAX_NEW_TOKENS, int))
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if str(self.device).startswith("cuda") else torch.float32
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(self.device).eval()
        except (OSError, ValueError) as e:
            raise RewriterError(f"prompt rewriter {self.name}: cannot load a causal LM and its tokenizer: {e}") from e
        eos = self.model.generation_config.eos_token_id
        self.eos = [] if eos is None else list(eos) if isinstance(eos, (list, tuple)) else [eos]
        if not self.eos:
            raise RewriterError(
                f"prompt rewriter {self.name}: the model has no end-of-sequence token "
                "(generation_config.json eos_token_id), so no answer could end"
            )
        if not self.tokenizer.chat_template:
            raise RewriterError(
                f"prompt rewriter {self.name}: its tokenizer has no chat template (tokenizer_config.json "
                "chat_template): use an instruct / chat model"
            )

    def __call__(self, instruction: str, prompt: str) -> tuple[str, bool]:
        """``(answer, finished)``: the greedy answer and whether it ended with end-of-sequence."""
        import torch
        from jinja2.exceptions import TemplateError

        messages = [{"role": "system", "content": instruction}, {"role": "user", "content": prompt}]
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except TemplateError:  # a template without a system role (Gemma): the instruction opens the user turn
            messages = [{"role": "user", "content": f"{instruction}\n\n{prompt}"}]
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = self.tokenizer(text, return_tensors="pt", add_special_tokens=False).to(self.device)
        eos = self.eos
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos[0]
        with torch.no_grad():
            out = self.model.generate(
                **ids, do_sample=False, max_new_tokens=self.max_new_tokens, pad_token_id=pad, eos_token_id=eos
            )
        new = out[0, ids["input_ids"].shape[1] :].tolist()
        finished = (bool(new) and new[-1] in eos) or len(new) < self.max_new_tokens
        return self.tokenizer.decode(new, skip_special_tokens=True), finished


def _chat_url(url: str) -> str:
    """The chat-completions endpoint of ``url``: as given when it ends with ``/chat/completions``,
    else with ``/chat/completions`` (after ``/v1``) or ``/v1/chat/completions`` appended."""
    base = url.rstrip("/")
    if base.endswith("/chat/completions"):
        return base
    return base + ("/chat/completions" if base.endswith("/v1") else "/v1/chat/completions")


class _Failure(Exception):
    """One try failed: ``transient`` when a retry may help."""

    def __init__(self, reason: str, transient: bool = False):
        super().__init__(reason)
        self.reason, self.transient = reason, transient


class HTTPRewriter:
    """An OpenAI-compatible ``/v1/chat/completions`` endpoint (see the module docstring)."""

    def __init__(self, target: str, timeout: float | None = None, retries: int | None = None):
        url, _, model = target.partition("#")
        self.name, self.url, self.model = f"http:{target}", _chat_url(url), model or None
        self.timeout = timeout or _env_number("VIDALIGN_REWRITER_TIMEOUT", HTTP_TIMEOUT)
        self.retries = (
            retries if retries is not None else int(_env_number("VIDALIGN_REWRITER_RETRIES", HTTP_RETRIES, int))
        )
        self.max_tokens = int(_env_number("VIDALIGN_REWRITER_MAX_TOKENS", MAX_NEW_TOKENS, int))
        self.api_key = os.environ.get("VIDALIGN_REWRITER_API_KEY") or None

    def __call__(self, instruction: str, prompt: str) -> tuple[str, bool]:
        """``(answer, finished)``: the answer's content and whether it was not cut at max_tokens."""
        body = {"messages": [{"role": "system", "content": instruction}, {"role": "user", "content": prompt}]}
        body |= {"temperature": 0, "max_tokens": self.max_tokens, "stream": False}
        if self.model:
            body["model"] = self.model
        for attempt in range(self.retries + 1):
            try:
                raw = self._request(json.dumps(body).encode())
                break
            except _Failure as e:
                if not e.transient or attempt == self.retries:
                    raise RewriterError(
                        f"prompt rewriter {self.name}: no usable answer from {self.url} for prompt {prompt!r} "
                        f"after {attempt + 1} tries ({e.reason})"
                    ) from None
                time.sleep(min(0.5 * 2**attempt, 5.0))
        return self._parse(raw, prompt)

    def _request(self, body: bytes) -> bytes:
        """One POST within the deadline, its 2xx answer read up to HTTP_MAX_BYTES, or :class:`_Failure`."""
        deadline = time.monotonic() + self.timeout
        url = urlsplit(self.url)
        connection = http.client.HTTPSConnection if url.scheme == "https" else http.client.HTTPConnection
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        try:
            con = connection(url.netloc.rpartition("@")[2], timeout=self.timeout)
            con.connect()
            sock = con.sock  # the response keeps reading from it after http.client lets go of it
            con.request("POST", url.path + (f"?{url.query}" if url.query else ""), body=body, headers=headers)
            res = con.getresponse()
            if not 200 <= res.status < 300:
                raise _Failure(f"HTTP {res.status} {res.reason}", res.status >= 500 or res.status == 429)
            chunks, size = [], 0
            while not res.isclosed():  # it closes (and its socket) once the whole body is read
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                sock.settimeout(left)  # the whole answer within the deadline, not each read
                chunk = res.read(HTTP_CHUNK)
                if not chunk:
                    break
                size += len(chunk)
                if size > HTTP_MAX_BYTES:
                    raise _Failure(f"the answer is over {HTTP_MAX_BYTES} bytes; stopped reading")
                chunks.append(chunk)
            return b"".join(chunks)
        except TimeoutError:
            raise _Failure(f"timed out after {self.timeout:g} s (VIDALIGN_REWRITER_TIMEOUT)") from None
        except (ConnectionRefusedError, ConnectionResetError, ConnectionAbortedError, BrokenPipeError) as e:
            raise _Failure(f"endpoint down: {e or type(e).__name__}", transient=True) from None
        except (OSError, http.client.HTTPException) as e:  # no such host, TLS, a garbled answer, a bad port
            raise _Failure(f"{type(e).__name__}: {e}") from None
        finally:
            if "con" in locals():
                con.close()

    def _parse(self, raw: bytes, prompt: str) -> tuple[str, bool]:
        snippet = raw[:200].decode("utf-8", "replace")
        try:
            choice = json.loads(raw)["choices"][0]
            content, reason = choice["message"]["content"], choice.get("finish_reason")
        except (ValueError, RecursionError, KeyError, IndexError, TypeError):
            raise RewriterError(
                f"prompt rewriter {self.name}: {self.url} did not answer a chat completion "
                f'({{"choices": [{{"message": {{"content": ...}}}}]}}) for prompt {prompt!r}: {snippet!r}'
            ) from None
        if not isinstance(content, str):
            content = ""  # null content: an empty answer
        return content, reason != "length"


# ---------------------------------------------------------------------------------- rewriter


def _clean(answer: str) -> str:
    """The answer without surrounding whitespace and one pair of surrounding quotes."""
    text = answer.strip()
    for a, b in (('"', '"'), ("'", "'"), ("“", "”")):
        if len(text) >= 2 and text[0] == a and text[-1] == b:
            return text[1:-1].strip()
    return text


class PromptRewriter:
    """Rewrites prompts with a SPEC's model and instruction, through the JSONL cache at ``cache``
    (see the module docstring). ``calls`` counts the model's answers (cache misses)."""

    def __init__(
        self,
        spec: str,
        instruction_file: str | Path | None = None,
        cache: str | Path | None = None,
        device: str | None = None,
        max_chars: int | None = None,
    ):
        self.kind, self.target = parse_rewriter(spec)
        self.spec, self.device = str(spec), device
        self.instruction = load_instruction(instruction_file)
        self.instruction_sha256 = instruction_sha256(self.instruction)
        self.cache = None if cache is None else Path(cache)
        self.max_chars = max_chars or int(_env_number("VIDALIGN_REWRITER_MAX_CHARS", MAX_CHARS, int))
        self.calls = 0
        self._backend = None

    def backend(self):
        """The model, built on first use (never when every prompt is in the cache)."""
        if self._backend is None:
            self._backend = HFRewriter(self.target, self.device) if self.kind == "hf" else HTTPRewriter(self.target)
        return self._backend

    def rewrite_one(self, prompt: str) -> str:
        """The model's checked rewrite of one prompt (no cache)."""
        answer, finished = self.backend()(self.instruction, prompt)
        self.calls += 1
        text = _clean(answer)
        where = f"prompt rewriter {self.spec}: prompt {prompt!r}"
        if not text:
            raise RewriterError(f"{where}: the answer is empty ({answer[:200]!r})")
        if not finished:
            raise RewriterError(
                f"{where}: the answer is over-long, cut at the token budget (VIDALIGN_REWRITER_MAX_TOKENS): "
                f"{text[:200]!r}...; ask for shorter captions in the instruction, or raise the budget"
            )
        if len(text) > self.max_chars:
            raise RewriterError(
                f"{where}: the answer is over-long, {len(text)} characters > {self.max_chars} "
                f"(VIDALIGN_REWRITER_MAX_CHARS): {text[:200]!r}..."
            )
        return text

    def rewrite(self, prompts: Sequence[str]) -> list[str]:
        """The rewrite of each prompt: from the cache, else from the model (each new one appended
        to the cache at once, so a run killed part-way keeps what it paid for)."""
        cached = read_cache(self.cache) if self.cache is not None else {}
        done: dict[str, str] = {}
        for p in dict.fromkeys(str(p) for p in prompts):
            key = (p, self.spec, self.instruction_sha256)
            if key not in cached:
                cached[key] = self.rewrite_one(p)
                if self.cache is not None:
                    row = {"prompt": p, "rewriter": self.spec, "instruction_sha256": self.instruction_sha256}
                    _append(self.cache, row | {"rewritten": cached[key]})
            done[p] = cached[key]
        return [done[str(p)] for p in prompts]

    def close(self) -> None:
        """Free the model (an hf rewriter's LM, and the GPU memory it held)."""
        was_hf, self._backend = self._backend is not None and self.kind == "hf", None
        if was_hf:
            import gc

            import torch

            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def rewrite_prompts(
    spec: str,
    instruction_file: str | Path | None,
    prompts: Sequence[str],
    cache: str | Path,
    device: str | None = None,
) -> list[str]:
    """The rewrite of each prompt by the rewriter SPEC through the cache file ``cache``, the model
    freed afterwards. Under N processes the main process rewrites (and alone writes the cache) and
    every process returns the same list."""

    def run() -> list[str]:
        rewriter = PromptRewriter(spec, instruction_file, cache, device=device)
        try:
            return rewriter.rewrite(prompts)
        finally:
            rewriter.close()

    return distributed.on_main(run)


def rewrite_ahead(options, prompts: Sequence[str], cache: str | Path) -> None:
    """Rewrite ``prompts`` into ``cache`` now when the sampling options ``options`` have a
    ``prompt_rewriter`` (nothing otherwise): called before the generator loads, so that an
    ``hf:`` LM is freed before the video model takes the memory and any rewriter error comes
    before anything is sampled; sampling then reads every rewrite from the cache."""
    if options.prompt_rewriter:
        rewrite_prompts(options.prompt_rewriter, options.rewrite_instruction, prompts, cache, options.device)
