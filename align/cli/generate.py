"""``vidalign generate``: sample videos for prompts into a folder (a file per video + index.jsonl)."""

from __future__ import annotations

import argparse

from align.cli.common import add_sampling_options, positive_int, prompts_from, sampling_options


def add_parser(sub) -> None:
    """Register ``generate``."""
    g = sub.add_parser(
        "generate",
        help="write videos for prompts (resumable; index.jsonl records prompt, seed and settings)",
        description="Sample a model (with a LoRA) for prompts into OUT: one video file per (prompt, seed), "
        "written as produced, and OUT/index.jsonl. Video i comes from seed SEED + i.",
    )
    add_sampling_options(g)
    g.add_argument("--lora", default=None)
    g.add_argument("--num", type=positive_int, default=1, help="videos per prompt (seeds SEED, SEED + 1, ...)")
    g.add_argument("--format", choices=("mp4", "gif", "webm"), default="mp4")
    g.set_defaults(run=run, name="generate")


def run(args: argparse.Namespace) -> int:
    """Sample into ``--out``; under ``accelerate launch`` each process samples its shard and the
    main process writes the merged index and prints (with the sampling time, all processes')."""
    import time
    from pathlib import Path

    from align import distributed
    from align.generation import load_generator, sample_to_disk
    from align.prompting import rewrite_ahead

    options = sampling_options(args, seeds_per_prompt=args.num)
    prompts, seeds = options.expand(prompts_from(args))
    rewrite_ahead(options, prompts, Path(args.out) / "rewrites.jsonl")  # --prompt-rewriter: before the model loads
    model = load_generator(args.model, args.lora, options.device)
    distributed.barrier()  # every process has its model: the time below is sampling alone
    start = time.perf_counter()
    rows = sample_to_disk(
        model, prompts, seeds, args.out, options, model_name=args.model, lora=args.lora, resume=args.resume,
        video_format=args.format,
    )  # fmt: skip
    seconds = time.perf_counter() - start  # sample_to_disk ends when every process is done
    if distributed.is_main():
        print(
            f"wrote {len(rows)} videos to {args.out} in {seconds:.1f} s on {distributed.num_processes()} "
            "process(es) (index.jsonl: file, prompt, seed, model, lora, settings)"
        )
    return 0
