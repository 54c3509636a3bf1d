"""The ``vidalign`` command line.

    vidalign demo [--out runs/demo] [--quick] [--set KEY=VALUE ...]
    vidalign pretrain [RECIPE] [--key value ...]
    vidalign train RECIPE [--key value ...]          (e.g. --beta 500)
    vidalign eval --model DIR --lora DIR [--prompts FILE] [--out DIR]
    vidalign generate --model DIR [--lora DIR] --prompt TEXT [...] --out DIR
    vidalign data validate DATASET [--min-frames N] [--allow-absolute-paths]
    vidalign data import --format pickapic|videogen-rewardbench|chosen-rejected SRC DST [--num-frames N ...]
    vidalign data inspect DATASET [--out PNG]
    vidalign data cache DATASET --model DIR --cache-dir DIR
    vidalign data pairs --model DIR --out DATASET_DIR [--samples-per-prompt 4]
    vidalign annotate serve PAIRS --db labels.sqlite [--per-pair N] [--host 127.0.0.1] [--port 8765]
    vidalign annotate stats --db labels.sqlite [--json]
    vidalign annotate export --db labels.sqlite OUT [--mode majority|all] [--min-labels N]

Multi-process: ``accelerate launch --config_file recipes/accelerate/X.yaml -m align.cli train RECIPE``.
Errors in user input (recipes, datasets, paths) print one clear message and exit with 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np


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
    from align.demo import parse_overrides, run_demo

    overrides = parse_overrides(args.set or [])
    report = run_demo(args.out, quick=args.quick, cache_dir=args.cache_dir, model=args.model, overrides=overrides)
    for method in ("DPO", "RWR"):
        w = report["winrate"]["oracle"][method]
        print(f"{method} vs base, oracle win rate {w['rate']:.3f} (95% CI {w['ci95'][0]:.3f}-{w['ci95'][1]:.3f})")
    rm = report["reward_model"]
    ci = rm.get("accuracy_ci95")
    print(
        f"reward model held-out accuracy vs oracle {rm['accuracy']:.3f}"
        + (f" (95% CI {ci[0]:.3f}-{ci[1]:.3f}, bootstrap over prompts)" if ci else "")
    )
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
    import torch

    tiny = Path(args.model, "vae.safetensors").is_file()  # TinySora samples on the CPU, as before
    model = load_aligned(args.model, args.lora, device="cuda" if torch.cuda.is_available() and not tiny else "cpu")
    if hasattr(model, "generate_videos"):  # a diffusers model: the real pipeline (its own scheduler)
        model.set_video_size(args.num_frames, args.height, args.width)
        videos = to_uint8(model.generate_videos(prompts, seeds, args.steps, args.guidance))
    else:
        videos = to_uint8(generate(model, prompts, seeds, args.steps, args.guidance, progress=True))
    scale = args.scale if args.scale is not None else (1 if hasattr(model, "generate_videos") else 4)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    index = []
    for i, (p, s, v) in enumerate(zip(prompts, seeds, videos)):
        f = write_video(out / f"{i:04d}_seed{s}.{args.format}", v, fps=args.fps, scale=scale)
        index.append({"file": f.name, "prompt": p, "seed": s})
    (out / "index.jsonl").write_text("".join(json.dumps(r) + "\n" for r in index))
    print(f"wrote {len(index)} videos to {out}")
    return 0


def cmd_data(args) -> int:
    from align.data.preference import load_preference_dataset

    if args.data_command == "samples":
        return cmd_data_samples(args)
    if args.data_command == "pairs":
        return cmd_data_pairs(args)
    if args.data_command == "import":
        return cmd_data_import(args)
    if args.data_command == "inspect":
        return cmd_data_inspect(args)
    if args.data_command == "cache":
        return cmd_data_cache(args)
    from align.data.preference import check_rows

    ds = load_preference_dataset(args.dataset, split=args.split)
    rep = check_rows(
        ds, args.dataset, root=args.dataset, allow_absolute_paths=args.allow_absolute_paths, min_frames=args.min_frames
    )
    c = rep.counts
    print(f"{args.dataset}: {len(ds)} rows; a={c['a']} b={c['b']} tie={c['tie']}")
    for p in rep.problems:
        print(f"  {p}")
    print(f"{len(rep.fatal)} problem(s) in {len(rep.bad_rows)} row(s), {len(rep.warnings)} warning(s)")
    return 1 if rep.fatal else 0


def cmd_data_import(args) -> int:
    from align.data.importers import import_dataset

    bad_rows = "skip" if args.skip_bad else "error"
    s = import_dataset(
        args.format,
        args.src,
        args.dst,
        split=args.split,
        revision=args.revision,
        seed=args.seed,
        bad_rows=bad_rows,
        allow_absolute_paths=args.allow_absolute_paths,
        overwrite=args.overwrite,
        preprocessing={"num_frames": args.num_frames, "height": args.height, "width": args.width, "fps": args.fps},
    )
    for line in s["problems"]:
        print(f"  skipped {line}")
    print(f"imported {s['rows_out']} of {s['rows_in']} rows ({s['format']}) into {args.dst}; skipped {s['skipped']}")
    return 0


def cmd_data_inspect(args) -> int:
    import numpy as np

    from align.data.preference import load_preference_dataset, plot_summary, summarize

    ds = load_preference_dataset(args.dataset, split=args.split)
    s = summarize(ds, root=args.dataset)
    src = Path(args.dataset)
    out = Path(args.out) if args.out else src / "inspect.png" if src.is_dir() else Path(f"{src}.inspect.png")
    if not src.exists() and not args.out:
        out = Path("inspect.png")  # a hub dataset id

    def spread(xs, scale=1.0):
        if not xs:
            return "n/a"
        return f"min {min(xs) * scale:.3g} / median {np.median(xs) * scale:.3g} / max {max(xs) * scale:.3g}"

    c = s["counts"]
    print(f"{args.dataset}: {s['rows']} rows, {s['unique_prompts']} distinct prompts")
    print(f"  labels: a={c['a']} b={c['b']} tie={c['tie']} other={c['other']}; tie share {s['tie_share']:.3f}")
    for name, ac in s["aspects"].items():
        print(f"  {name}: a={ac['a']} b={ac['b']} tie={ac['tie']}")
    print(f"  prompt length (words): {spread(s['prompt_words'])}")
    print(f"  videos: {len(s['video_bytes'])}; frames {spread(s['video_frames'])}")
    print(f"  video length (seconds): {spread(s['video_seconds'])}")
    print(f"  video size (KiB): {spread(s['video_bytes'], 1 / 1024)}")
    for u in s["unreadable_videos"][:10]:
        print(f"  unreadable: {u}")
    if s["unreadable_videos"]:
        print(f"  {len(s['unreadable_videos'])} unreadable video(s): run `vidalign data validate` for details")
    print(f"  histograms: {plot_summary(s, out, title=str(args.dataset))}")
    return 0


def cmd_data_cache(args) -> int:
    from align.data.latent_cache import build_latent_cache
    from align.data.preference import load_preference_dataset
    from align.models import load_model

    model = load_model(args.model)
    model.requires_grad_(False)
    ds = load_preference_dataset(args.dataset, split=args.split)
    data = build_latent_cache(
        model,
        ds,
        args.cache_dir,
        args.dataset,
        args.dataset,
        bad_rows="skip" if args.skip_bad else "error",
        allow_absolute_paths=args.allow_absolute_paths,
    )
    s = data.stats
    print(
        f"{args.cache_dir}: {s['pairs']} pairs (skipped {s['skipped']}); videos encoded {s['videos_encoded']}, "
        f"reused {s['videos_reused']}; prompts encoded {s['prompts_encoded']}, reused {s['prompts_reused']}"
    )
    return 0


def cmd_data_pairs(args) -> int:
    """Sample the model on the world's training prompts (or yours), label best vs worst (or
    all pairs) with the oracle, or with a reward model when ``--reward-model`` is given."""
    from align.data.pairs import sampled_preference_dataset
    from align.data.synthetic import split_scenes
    from align.models import load_model

    if args.prompt or args.prompts_file:
        prompts = _prompts_from(args)
    else:
        prompts = [s.prompt for s in split_scenes(args.heldout_fraction, seed=args.split_seed)[0]]
    score = None
    if args.reward_model:
        from reward_models.model import load_reward_model

        score = load_reward_model(args.reward_model).score
    model = load_model(args.model)
    ds = sampled_preference_dataset(
        model,
        prompts * args.rounds,
        args.samples_per_prompt,
        seed=args.seed,
        num_steps=args.steps,
        guidance_scale=args.guidance,
        tie_margin=args.tie_margin,
        score=score,
        which=args.pairs,
    )
    ds.save_to_disk(args.out)
    prefs = ds["preference"]
    judge = f"reward model {' + '.join(args.reward_model)}" if args.reward_model else "the oracle"
    print(
        f"wrote {len(ds)} pairs judged by {judge} to {args.out} "
        f"(a={prefs.count('a')} b={prefs.count('b')} tie={prefs.count('tie')})"
    )
    return 0


def _tta(args) -> dict | None:
    """``--test-time-shifts`` as a change to the saved reward model's config (None: as saved)."""
    return None if args.test_time_shifts is None else {"test_time_shifts": args.test_time_shifts}


def cmd_reward(args, extra) -> int:
    """``vidalign reward train | eval | score``."""
    from reward_models.model import load_reward_model

    if args.reward_command == "train":
        from align.config import load_config
        from reward_models.train import RewardTrainConfig, train_reward_model

        cfg = load_config(RewardTrainConfig, args.recipe, extra)
        run = train_reward_model(cfg)
        summary = json.loads((run / "summary.json").read_text())
        print(f"reward model written to {run / 'best'} (held-out accuracy {summary['best_eval_accuracy']:.3f})")
        return 0
    if args.reward_command == "eval":
        from reward_models.train import evaluate, load_pairs, plot_calibration

        model = load_reward_model(args.model, overrides=_tta(args))
        res = evaluate(model, load_pairs(args.dataset, "skip" if args.skip_bad_rows else "error"), args.tie_threshold)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        plot_calibration(res["calibration"], out / "calibration.png")
        keep = {k: v for k, v in res.items() if k not in ("score_a", "score_b")}
        (out / "reward_eval.json").write_text(json.dumps(keep, indent=2))
        shown = ("accuracy", "accuracy_ci95", "accuracy_with_ties", "n", "ties", "aspect_agreement")
        print(json.dumps({k: keep[k] for k in shown}))
        return 0
    from align.data.video import read_video

    if not args.prompt.strip():
        raise ValueError("--prompt is empty")
    model = load_reward_model(args.model, overrides=_tta(args))
    videos = [read_video(Path(v)) for v in args.video]
    shapes = {v.shape for v in videos}
    scores = (
        model.score(np.stack(videos), [args.prompt] * len(videos))
        if len(shapes) == 1
        else np.concatenate([model.score(v[None], [args.prompt]) for v in videos])
    )
    for f, sc in zip(args.video, scores):
        print(f"{sc:10.4f}  {f}")
    return 0


def cmd_data_samples(args) -> int:
    """Sample a generator K times per prompt and score every video with a reward model."""
    from align.data.samples import scored_samples_dataset
    from align.data.synthetic import split_scenes
    from align.data.video import to_uint8
    from align.models import load_model
    from align.sample import generate
    from reward_models.model import load_reward_model

    if args.prompt or args.prompts_file:
        prompts = _prompts_from(args)
    else:
        prompts = [s.prompt for s in split_scenes(0.2, seed=0)[0]]
    k = args.samples_per_prompt
    ps = [p for p in prompts for _ in range(k)]
    reward_model = load_reward_model(args.reward_model)  # before sampling: a bad path fails at once
    model = load_model(args.model)
    videos = to_uint8(
        generate(model, ps, [args.seed + i for i in range(len(ps))], args.steps, args.guidance, progress=True)
    )
    rewards = reward_model.score(videos, ps)
    scored_samples_dataset(ps, videos, rewards, [i // k for i in range(len(ps))]).save_to_disk(args.out)
    print(
        f"wrote {len(ps)} scored samples ({len(prompts)} prompts x {k}) to {args.out}; "
        f"reward mean {rewards.mean():.3f} std {rewards.std():.3f}"
    )
    return 0


def cmd_annotate(args) -> int:
    """The human-preference web app: serve it, summarise agreement, export a preference dataset."""
    if args.annotate_command == "serve":
        from align.annotate.server import serve

        serve(args.pairs, args.db, args.host, args.port, args.per_pair, args.root, args.cache_format, args.verbose)
        return 0
    if args.annotate_command == "stats":
        from align.annotate.stats import format_stats, json_safe, store_stats
        from align.annotate.storage import LabelStore

        stats = store_stats(LabelStore(args.db, create=False))
        print(json.dumps(json_safe(stats), indent=2) if args.json else format_stats(stats))
        return 0
    from align.annotate.export import export_dataset

    s = export_dataset(args.db, args.out, args.mode, args.min_labels, args.videos)
    print(f"wrote {s['rows']} rows ({s['pairs']} pairs; a={s['a']} b={s['b']} tie={s['tie']}) to {s['out']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vidalign", description="Align video diffusion models with human preferences.")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="the whole loop on the synthetic world, on a CPU")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--model", default=None, help="align this TinySora directory instead of pretraining one")
    d.add_argument("--cache-dir", default="runs/cache", help="where the pretrained tiny model is cached")
    d.add_argument("--quick", action="store_true", help="tiny budgets, for tests (numbers mean nothing)")
    d.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="change a DemoConfig field (align/demo.py), e.g. --set reward_test_time_shifts=1 (repeatable)",
    )

    pt = sub.add_parser("pretrain", help="pretrain the tiny Sora model on the synthetic world")
    pt.add_argument("recipe", nargs="?", default=None)

    t = sub.add_parser("train", help="align a generator with DPO + LoRA from a recipe")
    t.add_argument("recipe")

    def sampling(q):
        q.add_argument("--model", required=True, help="model directory, or a diffusers pipeline (dir or Hub id)")
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
    g.add_argument(
        "--scale", type=int, default=None, help="nearest-neighbour upscaling (default 4; 1 for diffusers models)"
    )
    for flag in ("--num-frames", "--height", "--width"):
        g.add_argument(flag, type=int, default=None, help="diffusers models: video size (default: the model's)")

    da = sub.add_parser("data", help="preference datasets")
    dsub = da.add_subparsers(dest="data_command", required=True)
    v = dsub.add_parser("validate", help="report every bad row; exit 1 if any is fatal")
    v.add_argument("dataset", help="save_to_disk dir, .jsonl/.csv/.parquet, folder layout, or hub id")
    v.add_argument("--min-frames", type=int, default=1, help="fewer frames than this is an error")
    im = dsub.add_parser("import", help="map a public layout onto the schema (copies the videos)")
    im.add_argument("--format", required=True, help="pickapic | videogen-rewardbench | chosen-rejected")
    im.add_argument("src", help="file, directory or hub dataset id in that layout")
    im.add_argument("dst", help="new save_to_disk directory (videos copied under DST/videos)")
    im.add_argument("--revision", default=None, help="hub dataset revision")
    im.add_argument("--seed", type=int, default=0, help="chosen-rejected: seed of the a/b order")
    im.add_argument("--skip-bad", action="store_true", help="skip and count bad rows instead of failing")
    im.add_argument("--overwrite", action="store_true")
    im.add_argument("--num-frames", type=int, default=None, help="prepare videos: frames per clip")
    im.add_argument("--fps", type=float, default=None, help="prepare videos: sample frames at this rate")
    im.add_argument("--height", type=int, default=None, help="prepare videos: resize + centre-crop height")
    im.add_argument("--width", type=int, default=None, help="prepare videos: resize + centre-crop width")
    ins = dsub.add_parser("inspect", help="counts, tie share, prompt and video histograms (PNG)")
    ins.add_argument("dataset")
    ins.add_argument("--out", default=None, help="PNG path (default: DATASET/inspect.png)")
    ca = dsub.add_parser("cache", help="encode videos and prompts once into a latent cache for training")
    ca.add_argument("dataset")
    ca.add_argument("--model", required=True, help="the model whose VAE and text encoder encode")
    ca.add_argument("--cache-dir", required=True, help="the same folder as the recipe's latent_cache_dir")
    ca.add_argument("--skip-bad", action="store_true", help="skip and count bad rows instead of failing")
    for q in (v, im, ins, ca):
        q.add_argument("--split", default="train", help="split of a hub dataset / DatasetDict")
    for q in (v, im, ca):
        q.add_argument("--allow-absolute-paths", action="store_true", help="trust absolute video paths")
    pa = dsub.add_parser(
        "pairs", help="sample a model, label best-vs-worst pairs with the oracle judge or a reward model"
    )
    sampling(pa)
    pa.add_argument("--samples-per-prompt", type=int, default=4)
    pa.add_argument("--rounds", type=int, default=2, help="passes over the prompts")
    pa.add_argument(
        "--tie-margin", type=float, default=0.01, help="score gap below which a pair is a tie (in the judge's units)"
    )
    pa.add_argument(
        "--reward-model",
        nargs="+",
        help="judge with this reward model (`vidalign reward train`; several: their mean score) "
        "instead of the synthetic world's oracle",
    )
    pa.add_argument("--pairs", choices=("best_worst", "all"), default="best_worst", help="pairs per group of samples")
    pa.add_argument("--heldout-fraction", type=float, default=0.2, help="without prompts: the world's train split")
    pa.add_argument("--split-seed", type=int, default=0)

    sa = dsub.add_parser("samples", help="sample a model K times per prompt and score with a reward model (for RWR)")
    sampling(sa)
    sa.add_argument(
        "--reward-model",
        nargs="+",
        required=True,
        help="a reward model directory (`vidalign reward train`); several: the mean of their scores",
    )
    sa.add_argument("--samples-per-prompt", type=int, default=4)

    rw = sub.add_parser("reward", help="CLIP-based video reward models: train, eval, score")
    rsub = rw.add_subparsers(dest="reward_command", required=True)
    rt = rsub.add_parser("train", help="train on a preference dataset (Bradley-Terry with ties)")
    rt.add_argument("recipe")
    rev = rsub.add_parser("eval", help="pairwise accuracy (with and without ties) and a calibration plot")
    rev.add_argument("dataset")
    rev.add_argument("--model", nargs="+", required=True, help="a reward model directory; several: their mean score")
    rev.add_argument("--out", default="runs/reward_eval")
    rev.add_argument(
        "--tie-threshold", type=float, default=0.1, help="|score difference| below which a tie is predicted"
    )
    rev.add_argument("--skip-bad-rows", action="store_true")
    rsc = rsub.add_parser("score", help="score video files against a prompt")
    rsc.add_argument("--model", nargs="+", required=True, help="a reward model directory; several: their mean score")
    rsc.add_argument("--prompt", required=True)
    rsc.add_argument("--video", nargs="+", required=True)
    for q in (rev, rsc):
        q.add_argument(
            "--test-time-shifts",
            type=int,
            default=None,
            help="average each score over the clip moved by this many pixels in 8 directions (default: as saved)",
        )

    an = sub.add_parser("annotate", help="collect human preferences in a local web app")
    asub = an.add_subparsers(dest="annotate_command", required=True)
    se = asub.add_parser("serve", help="serve the annotation page for pairs of videos")
    se.add_argument("pairs", help="a preference dataset directory, or `vidalign generate` output (index.jsonl)")
    se.add_argument("--db", required=True, help="SQLite file for the labels (created if missing)")
    se.add_argument("--per-pair", type=int, default=1, help="annotators each pair is shown to")
    se.add_argument("--host", default="127.0.0.1", help="address to bind (anything but loopback prints a warning)")
    se.add_argument("--port", type=int, default=8765, help="0 picks a free port")
    se.add_argument("--root", default=None, help="folder videos may be served from (default: PAIRS)")
    se.add_argument("--cache-format", choices=("webm", "mp4"), default="webm", help="for converted GIFs/arrays")
    se.add_argument("--verbose", action="store_true", help="log every request")
    st = asub.add_parser("stats", help="agreement (Cohen's / Fleiss' kappa), tie rate, progress")
    st.add_argument("--db", required=True)
    st.add_argument("--json", action="store_true")
    ex = asub.add_parser("export", help="write the labels as a preference dataset")
    ex.add_argument("--db", required=True)
    ex.add_argument("out")
    ex.add_argument("--mode", choices=("majority", "all"), default="majority", help="one row per pair or per label")
    ex.add_argument("--min-labels", type=int, default=1, help="majority mode: pairs with fewer labels are left out")
    ex.add_argument("--videos", choices=("copy", "symlink"), default="copy", help="how files get into OUT/videos")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``vidalign`` console script."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command not in ("train", "pretrain") and getattr(args, "reward_command", None) != "train":
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
        if args.command == "annotate":
            return cmd_annotate(args)
        if args.command == "reward":
            return cmd_reward(args, extra)
        return cmd_data(args)
    except (ValueError, FileNotFoundError) as e:
        if os.environ.get("VIDALIGN_DEBUG"):
            raise
        print(f"vidalign {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
