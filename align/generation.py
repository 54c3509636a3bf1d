"""Sampling a generator to disk, at the size you ask for, resumably.

``sample_to_disk`` writes each video as soon as it is produced (an mp4 per video, written to
a temp name and renamed) and appends its line to ``index.jsonl``::

    {"file": "0003_seed3.mp4", "prompt": "...", "seed": 3, "model": "...", "lora": null,
     "steps": 30, "guidance": 5.0, "size": [81, 480, 832], "sampler": "pipeline"}

so a run stopped at video 900 of 1000 keeps 900, and a rerun with ``resume=True`` samples only
the missing ones (a video is reused when its line matches the prompt, seed and settings asked
for; a line that does not is an error, not a silent mix). Video ``i`` always comes from seed
``seeds[i]`` alone, so batching and resuming do not change what is sampled.

How to sample (size, steps, guidance, batch size, sampler, fps) is one
``align.sample.SamplingOptions``, the same type every sampling path takes. Samplers: a diffusers
model samples with its family's own pipeline (its scheduler and guidance conventions,
``model.generate_videos``) unless ``sampler="vidalign"`` asks for vidalign's ODE sampler
(``align.sample.generate``); TinySora has only vidalign's. The video size is checked before
anything is sampled (e.g. Wan needs ``num_frames = 4k + 1``).

:func:`sample_and_score` is ``vidalign data pairs`` / ``data samples``: K samples per prompt
into ``OUT/videos``, then every judge's scores of them (:func:`score_samples`).

Under ``accelerate launch`` with N processes (``align.distributed``; ``OUT`` on a filesystem
every machine shares) the main process plans the work (the videos still to sample) and every
process samples every N-th of them, appending its rows to its own shard of the index,
``index-<rank>-of-<N>.jsonl`` (5 digits each). At the end the main process writes the merged
``index.jsonl`` (in order, the same as one process's) and removes the shards. A run killed
part-way leaves its shards; ``resume`` reads ``index.jsonl`` and every shard present, so the
rerun may use another process count. Judges score in shards too, gathered in order.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from align import distributed
from align.atomic import atomic_write_text

if TYPE_CHECKING:
    from align.sample import SamplingOptions

INDEX = "index.jsonl"
SHARD_GLOB = "index-*-of-*.jsonl"  # the shards of the index a run on N processes writes
_SETTINGS = ("prompt", "seed", "model", "lora", "steps", "guidance", "size", "sampler", "rewritten_prompt")


def load_generator(model: str | Path, lora: str | Path | None = None, device: str | None = None):
    """The generator at ``model`` (TinySora dir, diffusers pipeline dir or Hub id) on ``device``
    (default: CUDA when available; under N processes this process's GPU), with the LoRA at
    ``lora`` attached, in eval mode."""
    from align.models import default_device, load_model
    from align.models.lora import load_lora

    m = load_model(model, device=distributed.local_device(device) or default_device())
    if lora:
        load_lora(m.denoiser, lora)
    return m.eval()


def default_batch_size(model) -> int:
    """Videos per sampler call when none is asked for: 1 for diffusers models (a real-size video
    fills a GPU), 16 for a model without a pipeline sampler (the tiny model)."""
    return 1 if model.has_pipeline_sampler else 16


def check_video_size(
    model, num_frames: int | None = None, height: int | None = None, width: int | None = None
) -> tuple[int, int, int]:
    """Set the size a model samples at (``None``: keep the model's) and return
    ``(frames, height, width)``; a size the model cannot take is a ``ValueError`` naming the
    rule it breaks (``model.check_video_size``), raised before anything changes."""
    size = model.check_video_size(num_frames, height, width)
    if model.has_pipeline_sampler:  # diffusers models keep their size as state (latent_shape, the pipeline)
        model.set_video_size(*size)
    return tuple(size)


def _sample_batch(model, prompts: list[str], seeds: list[int], steps: int, guidance: float, sampler: str):
    """uint8 videos ``(B, T, H, W, 3)`` for one batch."""
    from align.frames import to_uint8

    if sampler == "vidalign" or not model.has_pipeline_sampler:
        from align.sample import generate

        return to_uint8(generate(model, prompts, seeds, steps, guidance, batch_size=len(prompts)))
    return to_uint8(model.generate_videos(prompts, seeds, steps, guidance, batch_size=len(prompts)))


def read_index(out_dir: str | Path, name: str = INDEX) -> list[dict]:
    """The rows of ``out_dir/index.jsonl`` (or of the index file ``name``; [] if there is none).
    A torn last line (a run killed while writing it) is dropped; any other unreadable line is an
    error naming it."""
    path = Path(out_dir) / name
    if not path.is_file():
        return []
    text = path.read_text()
    lines = text.split("\n")
    rows = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines) and not text.endswith("\n"):
                break  # torn last line: the run was killed while writing it
            raise ValueError(f"{path}: line {n} is not JSON: {line[:200]!r}") from None
        if not isinstance(row, dict) or not isinstance(row.get("file"), str):
            raise ValueError(f"{path}: line {n} has no 'file' field: {line[:200]!r}")
        rows.append(row)
    return rows


def _append(index: Path, row: dict) -> None:
    with open(index, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _rows_on_disk(out: Path) -> dict[str, dict]:
    """The rows of ``index.jsonl`` and of every shard of the index present (a run on N
    processes killed part-way), by file name."""
    names = [INDEX, *sorted(p.name for p in out.glob(SHARD_GLOB))]
    return {r["file"]: r for name in names for r in read_index(out, name)}


def _shard_index(out: Path) -> Path:
    """The index file this process appends to: ``index.jsonl`` alone, else its own shard."""
    n = distributed.num_processes()
    return out / (INDEX if n == 1 else f"index-{distributed.process_index():05d}-of-{n:05d}.jsonl")


def _plan(out: Path, expected: list[dict], resume: bool) -> list[int]:
    """Indices still to sample (run on the main process). With ``resume``, rows on disk that
    match are kept and others are an error; without it the index and its shards are cleared."""
    if not resume:
        for shard in out.glob(SHARD_GLOB):
            shard.unlink()
        (out / INDEX).write_text("")
    existing = _rows_on_disk(out) if resume else {}
    todo = []
    for i, want in enumerate(expected):
        have = existing.get(want["file"])
        if have is None or not (out / want["file"]).is_file():
            todo.append(i)
            continue
        diff = {k: (have.get(k), want.get(k)) for k in _SETTINGS if have.get(k) != want.get(k)}
        if diff:
            shown = ", ".join(f"{k}: {a!r} on disk, {b!r} now" for k, (a, b) in diff.items())
            raise ValueError(
                f"{out / INDEX}: {want['file']} was sampled with other settings ({shown}); "
                "write to another directory, or delete this one to start over"
            )
    return todo


def _merge(out: Path, expected: list[dict]) -> None:
    """Write the merged ``index.jsonl`` (in order, no duplicates) and remove the shards (run on
    the main process once every process has written its videos)."""
    missing = [r["file"] for r in expected if not (out / r["file"]).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{out}: {len(missing)} sampled video(s) are not there, first {missing[0]}; under N machines "
            "OUT must be on a filesystem every machine shares"
        )
    atomic_write_text(out / INDEX, "".join(json.dumps(r) + "\n" for r in expected))
    for shard in out.glob(SHARD_GLOB):
        shard.unlink()


def _sample_todo(model, out: Path, expected: list[dict], todo: list[int], options, batch_size: int, bar) -> None:
    """Sample this process's share of ``todo`` (every N-th) in batches, writing each video and
    its row as produced. Processes step through the same number of batches (an empty one when
    their share is done) and add up their counts after each, for the global progress bar."""
    from align.data.video import write_video

    mine = [todo[k] for k in distributed.shard(len(todo))]
    index = _shard_index(out)
    used = expected[0]["sampler"]
    largest_share = math.ceil(len(todo) / distributed.num_processes())
    for b in range(math.ceil(largest_share / batch_size)):
        idx = mine[b * batch_size : (b + 1) * batch_size]
        if idx:
            ps = [expected[i].get("rewritten_prompt", expected[i]["prompt"]) for i in idx]  # what conditions
            ss = [expected[i]["seed"] for i in idx]
            videos = _sample_batch(model, ps, ss, options.num_steps, options.guidance_scale, used)
            for i, v in zip(idx, videos):
                write_video(out / expected[i]["file"], v, fps=options.fps)
                _append(index, expected[i])
        bar.update(distributed.sum_all(len(idx)))


def _add_rewrites(rows: list[dict], options: SamplingOptions, cache: Path) -> None:
    """Each row gains ``rewritten_prompt``, the prompt the model is conditioned on (its prompt
    rewritten by ``options.prompt_rewriter`` through the cache file ``cache``,
    :func:`align.prompting.rewrite_prompts`), and ``prompt_rewriter``, the rewriter's spec."""
    from align.prompting import rewrite_prompts

    spec = options.prompt_rewriter
    ps = [r["prompt"] for r in rows]
    for r, c in zip(rows, rewrite_prompts(spec, options.rewrite_instruction, ps, cache, options.device)):
        r["rewritten_prompt"], r["prompt_rewriter"] = c, spec


def sample_to_disk(
    model,
    prompts: Sequence[str],
    seeds: Sequence[int],
    out_dir: str | Path,
    options: SamplingOptions,
    *,
    model_name: str = "",
    lora: str | Path | None = None,
    resume: bool = True,
    progress: bool = True,
    video_format: str = "mp4",
    desc: str = "sampling",
    rewrite_cache: str | Path | None = None,
) -> list[dict]:
    """Sample video ``i`` of ``prompts[i]`` from ``seeds[i]`` into ``out_dir`` (see the module
    docstring) as ``options`` say (size, steps, guidance, sampler, fps; ``options.batch_size``
    videos per sampler call, default :func:`default_batch_size`); return the index rows in order.
    The seeds are given here, so ``options.seed`` and ``seeds_per_prompt`` are not read, nor
    ``options.device`` (the model is already on one). Under N processes each samples its share
    (every process returns every row); one progress bar, on the main process, counts them all.

    ``model_name`` and ``lora`` are recorded (and matched on resume); ``lora`` describes the
    model as given, it is not loaded here. Without ``resume`` every video is sampled again and
    the index rewritten. The size check and every argument check run before sampling.

    With ``options.prompt_rewriter`` the model is conditioned on each prompt's rewrite (cached in
    ``rewrite_cache``, default ``out_dir/rewrites.jsonl``), recorded as the row's
    ``rewritten_prompt`` (matched on resume); ``prompt`` stays the original, what judges see.
    """
    from tqdm.auto import tqdm

    prompts, seeds = [str(p) for p in prompts], [int(s) for s in seeds]
    if not prompts:
        raise ValueError("sample_to_disk: no prompts")
    if len(prompts) != len(seeds):
        raise ValueError(f"sample_to_disk: {len(prompts)} prompts but {len(seeds)} seeds")
    empty = [i for i, p in enumerate(prompts) if not p.strip()]
    if empty:
        raise ValueError(f"sample_to_disk: prompt {empty[0]} is empty")
    if video_format not in ("mp4", "gif", "webm"):
        raise ValueError(f"video_format must be mp4, gif or webm, got {video_format!r}")
    size = list(check_video_size(model, *options.size))
    batch_size = options.batch_size or default_batch_size(model)
    used = options.sampler if model.has_pipeline_sampler else "vidalign"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    common = {"model": str(model_name), "lora": None if lora is None else str(lora), "steps": int(options.num_steps)}
    common |= {"guidance": float(options.guidance_scale), "size": size, "sampler": used}
    expected = [
        {"file": f"{i:04d}_seed{s}.{video_format}", "prompt": p, "seed": s, **common}
        for i, (p, s) in enumerate(zip(prompts, seeds))
    ]
    if options.prompt_rewriter:
        _add_rewrites(expected, options, Path(rewrite_cache) if rewrite_cache else out / "rewrites.jsonl")
    todo = distributed.on_main(_plan, out, expected, resume)  # every process waits for the plan
    show = progress and distributed.is_main()
    bar = tqdm(total=len(todo), desc=desc, unit="video", disable=not show, dynamic_ncols=True)
    if len(todo) < len(expected):
        bar.set_postfix(reused=len(expected) - len(todo))
    _sample_todo(model, out, expected, todo, options, batch_size, bar)
    bar.close()
    distributed.on_main(_merge, out, expected)
    return expected


def read_samples(out_dir: str | Path, rows: Sequence[dict] | None = None) -> tuple[np.ndarray, list[dict]]:
    """Decode the videos of ``rows`` (default: every row of ``out_dir/index.jsonl``):
    ``(uint8 (N, T, H, W, 3), rows)``; videos of different shapes are an error naming them."""
    from align.data.video import read_video

    out = Path(out_dir)
    rows = list(read_index(out) if rows is None else rows)
    if not rows:
        raise ValueError(f"{out}: no samples (no {INDEX} lines)")
    videos = [read_video(out / r["file"]) for r in rows]
    shapes = {v.shape for v in videos}
    if len(shapes) > 1:
        first = rows[[v.shape for v in videos].index(next(iter(shapes - {videos[0].shape})))]
        raise ValueError(f"{out}: videos differ in shape: {rows[0]['file']} {videos[0].shape}, {first['file']} ...")
    return np.stack(videos), rows


def score_samples(judges: Sequence, out_dir: str | Path, rows: list[dict], chunk: int = 16) -> dict[str, np.ndarray]:
    """Every judge's scores of the videos of ``rows`` under ``out_dir``, decoding ``chunk``
    videos at a time (real-size videos do not all fit in memory). Under N processes each
    scores every N-th video and every process returns all the scores, in order."""
    from align.judges import judge_scores

    mine = distributed.shard(len(rows))
    scores = np.zeros((len(mine), len(judges)))
    for i in range(0, len(mine), chunk):
        videos, part = read_samples(out_dir, [rows[k] for k in mine[i : i + chunk]])
        prompts = [r["prompt"] for r in part]
        for n, j in enumerate(judges):
            scores[i : i + len(part), n] = judge_scores(j, videos, prompts, index=mine[i : i + chunk])
    every = np.array(distributed.gather(mine, list(scores), len(rows))).reshape(len(rows), len(judges))
    return {j.name: np.ascontiguousarray(every[:, n]) for n, j in enumerate(judges)}


def sample_and_score(
    model_name: str | Path,
    prompts: Sequence[str],
    judges: Sequence,
    out_dir: str | Path,
    options: SamplingOptions,
    *,
    samples_per_prompt: int,
    rounds: int = 1,
    resume: bool = False,
    progress: bool = True,
    desc: str = "sampling",
) -> tuple[list[str], list[str], dict[str, np.ndarray]]:
    """``vidalign data pairs`` / ``data samples``: ``samples_per_prompt`` samples of the base
    model ``model_name`` per prompt and round into ``out_dir/videos`` (resumable; video ``i``
    from seed ``options.seed * 1_000_003 + i``), then every judge's scores of them.

    Returns ``(prompt of each video, its file relative to out_dir, scores by judge name)``;
    consecutive ``samples_per_prompt`` videos share a prompt. The argument checks and the
    judges' prompt checks run before the model is loaded. Under N processes sampling and
    scoring are sharded and every process returns everything."""
    from align.judges import check_prompts
    from align.prompting import rewrite_ahead

    k = samples_per_prompt
    if k < 2:
        raise ValueError(f"--samples-per-prompt must be >= 2 (samples are compared with each other), got {k}")
    check_prompts(judges, prompts)
    ps = [p for p in list(prompts) * rounds for _ in range(k)]
    seeds = [options.seed * 1_000_003 + i for i in range(len(ps))]
    videos = Path(out_dir) / "videos"
    rewrite_ahead(options, ps, videos / "rewrites.jsonl")  # --prompt-rewriter: before the model loads
    model = load_generator(model_name, None, options.device)
    rows = sample_to_disk(
        model, ps, seeds, videos, options, model_name=str(model_name), resume=resume, progress=progress, desc=desc
    )
    del model
    return ps, [f"videos/{r['file']}" for r in rows], score_samples(judges, videos, rows)
