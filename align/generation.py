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
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from align.atomic import atomic_write_text

if TYPE_CHECKING:
    from align.sample import SamplingOptions

INDEX = "index.jsonl"
_SETTINGS = ("prompt", "seed", "model", "lora", "steps", "guidance", "size", "sampler")


def load_generator(model: str | Path, lora: str | Path | None = None, device: str | None = None):
    """The generator at ``model`` (TinySora dir, diffusers pipeline dir or Hub id) on ``device``
    (default: CUDA when available), with the LoRA at ``lora`` attached, in eval mode."""
    from align.models import default_device, load_model
    from align.models.lora import load_lora

    m = load_model(model, device=device or default_device())
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


def read_index(out_dir: str | Path) -> list[dict]:
    """The rows of ``out_dir/index.jsonl`` ([] if there is none). A torn last line (a run
    killed while writing it) is dropped; any other unreadable line is an error naming it."""
    path = Path(out_dir) / INDEX
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


def _plan(out: Path, expected: list[dict], resume: bool) -> list[int]:
    """Indices still to sample; with ``resume``, lines that match are kept, others are an error."""
    existing = {r["file"]: r for r in read_index(out)} if resume else {}
    todo = []
    for i, want in enumerate(expected):
        have = existing.get(want["file"])
        if have is None or not (out / want["file"]).is_file():
            todo.append(i)
            continue
        diff = {k: (have.get(k), want[k]) for k in _SETTINGS if have.get(k) != want[k]}
        if diff:
            shown = ", ".join(f"{k}: {a!r} on disk, {b!r} now" for k, (a, b) in diff.items())
            raise ValueError(
                f"{out / INDEX}: {want['file']} was sampled with other settings ({shown}); "
                "write to another directory, or delete this one to start over"
            )
    return todo


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
) -> list[dict]:
    """Sample video ``i`` of ``prompts[i]`` from ``seeds[i]`` into ``out_dir`` (see the module
    docstring) as ``options`` say (size, steps, guidance, sampler, fps; ``options.batch_size``
    videos per sampler call, default :func:`default_batch_size`); return the index rows in order.
    The seeds are given here, so ``options.seed`` and ``seeds_per_prompt`` are not read, nor
    ``options.device`` (the model is already on one).

    ``model_name`` and ``lora`` are recorded (and matched on resume); ``lora`` describes the
    model as given, it is not loaded here. Without ``resume`` every video is sampled again and
    the index rewritten. The size check and every argument check run before sampling.
    """
    from tqdm.auto import tqdm

    from align.data.video import write_video

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
    num_steps, guidance_scale = options.num_steps, options.guidance_scale
    used = options.sampler if model.has_pipeline_sampler else "vidalign"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    common = {"model": str(model_name), "lora": None if lora is None else str(lora), "steps": int(num_steps)}
    common |= {"guidance": float(guidance_scale), "size": size, "sampler": used}
    expected = [
        {"file": f"{i:04d}_seed{s}.{video_format}", "prompt": p, "seed": s, **common}
        for i, (p, s) in enumerate(zip(prompts, seeds))
    ]
    todo = _plan(out, expected, resume)
    index = out / INDEX
    if not resume:
        index.write_text("")
    done = set(range(len(expected))) - set(todo)
    bar = tqdm(total=len(todo), desc=desc, unit="video", disable=not progress, dynamic_ncols=True)
    if done:
        bar.set_postfix(reused=len(done))
    for b in range(0, len(todo), batch_size):
        idx = todo[b : b + batch_size]
        ps, ss = [prompts[i] for i in idx], [seeds[i] for i in idx]
        videos = _sample_batch(model, ps, ss, num_steps, guidance_scale, used)
        for i, v in zip(idx, videos):
            write_video(out / expected[i]["file"], v, fps=options.fps)
            _append(index, expected[i])
        bar.update(len(idx))
    bar.close()
    atomic_write_text(index, "".join(json.dumps(r) + "\n" for r in expected))  # in order, no duplicates
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
    videos at a time (real-size videos do not all fit in memory)."""
    from align.judges import judge_scores

    scores: dict[str, list[np.ndarray]] = {j.name: [] for j in judges}
    for i in range(0, len(rows), chunk):
        videos, part = read_samples(out_dir, rows[i : i + chunk])
        prompts = [r["prompt"] for r in part]
        for j in judges:
            scores[j.name].append(judge_scores(j, videos, prompts))
    return {k: np.concatenate(v) for k, v in scores.items()}


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
    judges' prompt checks run before the model is loaded."""
    from align.judges import check_prompts

    k = samples_per_prompt
    if k < 2:
        raise ValueError(f"--samples-per-prompt must be >= 2 (samples are compared with each other), got {k}")
    check_prompts(judges, prompts)
    ps = [p for p in list(prompts) * rounds for _ in range(k)]
    seeds = [options.seed * 1_000_003 + i for i in range(len(ps))]
    videos = Path(out_dir) / "videos"
    model = load_generator(model_name, None, options.device)
    rows = sample_to_disk(
        model, ps, seeds, videos, options, model_name=str(model_name), resume=resume, progress=progress, desc=desc
    )
    del model
    return ps, [f"videos/{r['file']}" for r in rows], score_samples(judges, videos, rows)
