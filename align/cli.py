"""The ``vidalign`` command line.

    vidalign demo [--out runs/demo] [--quick]
    vidalign pretrain [RECIPE] [--key value ...]
    vidalign train RECIPE [--key value ...]          (e.g. --beta 500)
    vidalign eval --model DIR --lora DIR [--prompts FILE] [--out DIR]
    vidalign generate --model DIR [--lora DIR] --prompt TEXT [...] --out DIR
    vidalign data validate DATASET_DIR
    vidalign data pairs --model DIR --out DATASET_DIR [--samples-per-prompt 4]

Multi-process: ``accelerate launch --config_file recipes/accelerate/X.yaml -m align.cli train RECIPE``.
Errors in user input (recipes, datasets, paths) print one clear message and exit with 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _prompts_from(args) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        f = Path(args.prompts_file)
        if not f.is_file():
            raise FileNotFoundError(f"prompts file {f}: no such file")
        lines = f.read_text().rstrip("\n").split("\n")
        for i, line in enumerate(lines):
            if not line.strip():
                raise ValueError(f"prompts file {f}: line {i + 1} is empty")
        prompts += [ln.strip() for ln in lines]
    for i, p in enumerate(prompts):
        if not p.strip():
            raise ValueError(f"--prompt number {i + 1} is empty")
    if not prompts:
        raise ValueError("no prompts given (use --prompt TEXT or --prompts-file FILE)")
    return prompts


def cmd_demo(args) -> int:
    from align.demo import run_demo

    report = run_demo(args.out, quick=args.quick, cache_dir=args.cache_dir, model=args.model)
    wr = report["winrate"]["oracle"]
    print(
        f"DPO vs base, oracle win rate {wr['rate']:.3f} (95% CI {wr['ci95'][0]:.3f}-{wr['ci95'][1]:.3f}, "
        f"n={wr['n']}, ties={wr['ties']}); report: {Path(args.out) / 'report.md'}"
    )
    return 0


def cmd_pretrain(args, extra) -> int:
    from align.config import PretrainConfig, load_config
    from align.pretrain import pretrain

    cfg = load_config(PretrainConfig, args.recipe, extra)
    print(f"pretrained model written to {pretrain(cfg)}")
    return 0


def cmd_train(args, extra) -> int:
    from align.config import TrainConfig, load_config
    from align.train import train

    cfg = load_config(TrainConfig, args.recipe, extra)
    run_dir = train(cfg)
    print(f"run written to {run_dir} (LoRA in {run_dir / 'lora'})")
    return 0


def cmd_eval(args) -> int:
    from align.data.synthetic import split_scenes
    from align.eval.evaluate import oracle_winrate, sample_paired
    from align.eval.plots import plot_winrates
    from align.eval.report import write_report
    from align.train import load_aligned

    if args.prompt or args.prompts_file:
        prompts = _prompts_from(args)
    else:
        prompts = [s.prompt for s in split_scenes(args.heldout_fraction, seed=args.split_seed)[1]]
    prompts = [p for p in prompts for _ in range(args.seeds_per_prompt)]
    seeds = [args.seed + i for i in range(len(prompts))]
    model = load_aligned(args.model, args.lora)
    samples = sample_paired(model, prompts, seeds, args.steps, args.guidance)
    wr = oracle_winrate(samples)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot_winrates({"aligned vs base (oracle)": wr}, out / "winrates.png")
    write_report(
        {
            "winrate": {"oracle": wr},
            "model": str(args.model),
            "lora": str(args.lora),
            "artifacts": {"winrates": "winrates.png"},
        },
        out,
    )
    print(json.dumps({"oracle": {k: wr[k] for k in ("rate", "ci95", "n", "ties")}}))
    return 0


def cmd_generate(args) -> int:
    from align.data.video import to_uint8, write_video
    from align.sample import generate
    from align.train import load_aligned

    prompts = _prompts_from(args)
    prompts = [p for p in prompts for _ in range(args.num)]
    seeds = [args.seed + i for i in range(len(prompts))]
    model = load_aligned(args.model, args.lora)
    videos = to_uint8(generate(model, prompts, seeds, args.steps, args.guidance, progress=True))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    index = []
    for i, (p, s, v) in enumerate(zip(prompts, seeds, videos)):
        f = write_video(out / f"{i:04d}_seed{s}.{args.format}", v, fps=args.fps, scale=args.scale)
        index.append({"file": f.name, "prompt": p, "seed": s})
    (out / "index.jsonl").write_text("".join(json.dumps(r) + "\n" for r in index))
    print(f"wrote {len(index)} videos to {out}")
    return 0


def cmd_data(args) -> int:
    from align.data.preference import load_preference_dataset, validate_rows

    if args.data_command == "pairs":
        return cmd_data_pairs(args)
    ds = load_preference_dataset(args.dataset)
    problems, _ = validate_rows(ds, args.dataset, root=args.dataset)
    prefs = ds["preference"]
    print(f"{args.dataset}: {len(ds)} rows; a={prefs.count('a')} b={prefs.count('b')} tie={prefs.count('tie')}")
    for row, msg in problems:
        print(f"  row {row}: {msg}")
    print(f"{len(problems)} problem(s)")
    return 1 if problems else 0


def cmd_data_pairs(args) -> int:
    """Sample the model on the world's training prompts, label best vs worst with the oracle."""
    from align.data.pairs import oracle_preference_dataset
    from align.data.synthetic import split_scenes
    from align.models import load_model

    if args.prompt or args.prompts_file:
        prompts = _prompts_from(args)
    else:
        prompts = [s.prompt for s in split_scenes(args.heldout_fraction, seed=args.split_seed)[0]]
    model = load_model(args.model)
    ds = oracle_preference_dataset(
        model,
        prompts * args.rounds,
        args.samples_per_prompt,
        seed=args.seed,
        num_steps=args.steps,
        guidance_scale=args.guidance,
        tie_margin=args.tie_margin,
    )
    ds.save_to_disk(args.out)
    prefs = ds["preference"]
    print(f"wrote {len(ds)} pairs to {args.out} (a={prefs.count('a')} b={prefs.count('b')} tie={prefs.count('tie')})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vidalign", description="Align video diffusion models with human preferences.")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="the whole loop on the synthetic world, on a CPU")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--model", default=None, help="align this TinySora directory instead of pretraining one")
    d.add_argument("--cache-dir", default="runs/cache", help="where the pretrained tiny model is cached")
    d.add_argument("--quick", action="store_true", help="tiny budgets, for tests (numbers mean nothing)")

    pt = sub.add_parser("pretrain", help="pretrain the tiny Sora model on the synthetic world")
    pt.add_argument("recipe", nargs="?", default=None)

    t = sub.add_parser("train", help="align a generator with DPO + LoRA from a recipe")
    t.add_argument("recipe")

    def sampling(q):
        q.add_argument("--model", required=True, help="pretrained model directory")
        q.add_argument("--prompt", action="append", help="a prompt (repeatable)")
        q.add_argument("--prompts-file", help="one prompt per line")
        q.add_argument("--seed", type=int, default=0)
        q.add_argument("--steps", type=int, default=20)
        q.add_argument("--guidance", type=float, default=4.0)
        q.add_argument("--out", required=True)

    e = sub.add_parser("eval", help="win rate of an aligned LoRA vs its base (same prompts and seeds)")
    sampling(e)
    e.add_argument("--lora", required=True, help="LoRA directory (run_dir/lora)")
    e.add_argument("--seeds-per-prompt", type=int, default=5)
    e.add_argument("--heldout-fraction", type=float, default=0.2, help="without prompts: the world's held-out split")
    e.add_argument("--split-seed", type=int, default=0)

    g = sub.add_parser("generate", help="write videos for prompts")
    sampling(g)
    g.add_argument("--lora", default=None)
    g.add_argument("--num", type=int, default=1, help="videos per prompt")
    g.add_argument("--format", choices=("gif", "mp4"), default="gif")
    g.add_argument("--fps", type=int, default=8)
    g.add_argument("--scale", type=int, default=4, help="nearest-neighbour upscaling of the output")

    da = sub.add_parser("data", help="preference datasets")
    dsub = da.add_subparsers(dest="data_command", required=True)
    v = dsub.add_parser("validate", help="report every bad row; exit 1 if any")
    v.add_argument("dataset")
    pa = dsub.add_parser("pairs", help="sample a model, label best-vs-worst pairs with the oracle judge")
    sampling(pa)
    pa.add_argument("--samples-per-prompt", type=int, default=4)
    pa.add_argument("--rounds", type=int, default=2, help="passes over the prompts")
    pa.add_argument("--tie-margin", type=float, default=0.01, help="score gap below which a pair is a tie")
    pa.add_argument("--heldout-fraction", type=float, default=0.2, help="without prompts: the world's train split")
    pa.add_argument("--split-seed", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``vidalign`` console script."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command not in ("train", "pretrain"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.command == "demo":
            return cmd_demo(args)
        if args.command == "pretrain":
            return cmd_pretrain(args, extra)
        if args.command == "train":
            return cmd_train(args, extra)
        if args.command == "eval":
            return cmd_eval(args)
        if args.command == "generate":
            return cmd_generate(args)
        return cmd_data(args)
    except (ValueError, FileNotFoundError) as e:
        if os.environ.get("VIDALIGN_DEBUG"):
            raise
        print(f"vidalign {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
