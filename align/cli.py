"""The ``vidalign`` command line.

    vidalign demo [--out runs/demo] [--quick] [--set KEY=VALUE ...]
    vidalign pretrain [RECIPE] [--key value ...]
    vidalign train RECIPE [--key value ...]          (e.g. --beta 500)
    vidalign eval --model M --lora L [--baseline-lora L0] --prompts-file F --judge SPEC [--judge ...]
                  [--seeds-per-prompt K] --out DIR           (SPEC: reward:DIR | clip:MODEL[@W] | http:URL | human)
    vidalign eval human --db labels.sqlite [--task DIR]      (the human win rate of an `eval --judge human` task)
    vidalign generate --model DIR [--lora DIR] --prompt TEXT [...] --out DIR [--resume]
    vidalign data validate DATASET [--min-frames N] [--allow-absolute-paths]
    vidalign data import --format FORMAT SRC DST [--limit N] [--skip-bad] [--num-frames N ...]  (docs/data.md)
    vidalign data inspect DATASET [--out PNG]
    vidalign data cache DATASET --model DIR --cache-dir DIR [--num-frames N ...] | --recipe RECIPE
    vidalign data pairs --model DIR --prompts-file F --judge SPEC --out DATASET_DIR [--samples-per-prompt 4]
    vidalign data samples --model DIR --prompts-file F --judge SPEC --out DATASET_DIR
      (every sampling command: [--num-frames N --height H --width W] [--batch-size B] [--device D]
       [--sampler pipeline|vidalign] [--resume])
    vidalign annotate serve PAIRS --db labels.sqlite [--per-pair N] [--host 127.0.0.1] [--port 8765]
                                 [--secret S | --require-invite]   (required for a non-loopback --host)
    vidalign annotate invite NAME --db labels.sqlite [--base-url http://HOST:PORT] [--revoke]
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

# align.data.importers.FORMATS, spelled out so that building the parser imports nothing heavy
IMPORT_FORMATS = (
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


def _prompts_from(args) -> list[str]:
    """The prompts of ``--prompt`` (repeatable) and ``--prompts-file`` (one per line); none, or an
    empty one, is an error that says how to give them (no command but the demo has default prompts)."""
    prompts = list(args.prompt or [])
    if args.prompts_file:
        f = Path(args.prompts_file)
        if not f.is_file():
            raise FileNotFoundError(f"prompts file {f}: no such file")
        lines = f.read_text().rstrip("\n").split("\n")
        for i, line in enumerate(lines):
            if not line.strip():
                raise ValueError(f"prompts file {f}: line {i + 1} is empty (one prompt per line, no blank lines)")
        prompts += [ln.strip() for ln in lines]
    for i, p in enumerate(prompts):
        if not p.strip():
            raise ValueError(f"--prompt number {i + 1} is empty")
    if not prompts:
        raise ValueError(
            "no prompts given: use --prompt TEXT (repeatable) or --prompts-file FILE (one prompt per line); "
            "only `vidalign demo` has prompts of its own"
        )
    return prompts


def _judges(args, command: str, device=None) -> list:
    """The judges of ``--judge SPEC`` (repeatable) and ``--reward-model DIR ...`` (= ``--judge
    reward:DIR``), built now so that a bad spec fails before anything is sampled."""
    from align.judges import load_judges

    specs = list(args.judge or []) + [f"reward:{d}" for d in (args.reward_model or [])]
    if not specs:
        raise ValueError(
            f"{command} needs a judge: --judge reward:DIR (a `vidalign reward train` model), "
            "--judge clip:MODEL[@WEIGHTS] or --judge http:URL (repeatable; --judge oracle: the demo's world only)"
        )
    return load_judges(specs, device=device)


def _one_score(judges: list, scores: dict) -> np.ndarray:
    """One score per video: a single judge's own, several judges' mean z-score."""
    from align.judges import combine_scores

    return scores[judges[0].name] if len(judges) == 1 else combine_scores([scores[j.name] for j in judges])


def cmd_demo(args) -> int:
    from align.demo import parse_overrides, run_demo

    report = run_demo(args.out, quick=args.quick, overrides=parse_overrides(args.set or []))
    for judge, methods in report["winrate"].items():
        for method, w in methods.items():
            lo, hi = w["ci95"]
            print(
                f"{method} vs base, {judge.replace('_', ' ')} win rate {w['rate']:.3f} (95% CI {lo:.3f}-{hi:.3f}; "
                f"{w['wins']} wins, {w['ties']} ties, {w['losses']} losses)"
            )
    rm = report["reward_model"]
    ci = rm.get("accuracy_ci95")
    print(
        f"reward model held-out accuracy vs oracle {rm['accuracy']:.3f}"
        + (f" (95% CI {ci[0]:.3f}-{ci[1]:.3f}, bootstrap over prompts)" if ci else "")
        + f"; report: {Path(args.out) / 'report.md'}"
    )
    return 0


def cmd_pretrain(args, extra) -> int:
    from align.config import PretrainConfig, load_config
    from align.pretrain import pretrain, pretrain_demo_models

    cfg = load_config(PretrainConfig, args.recipe, extra)
    if args.demo:
        print(f"the demo's generator and reward backbone written to {pretrain_demo_models(args.demo, cfg)}")
        return 0
    print(f"pretrained model written to {pretrain(cfg)}")
    return 0


def cmd_train(args, extra) -> int:
    from align.training import load_train_config, train

    run_dir = train(load_train_config(args.recipe, extra))
    print(f"run written to {run_dir} (LoRA in {run_dir / 'lora'})")
    return 0


def cmd_eval(args) -> int:
    """Paired win rates of ``--lora`` against the base (or ``--baseline-lora``) by every judge."""
    from align.eval.evaluate import EvalConfig, run_eval

    prompts = _prompts_from(args)
    specs = list(args.judge or []) + [f"reward:{d}" for d in (args.reward_model or [])]
    cfg = EvalConfig(
        model=args.model,
        lora=args.lora,
        prompts=prompts,
        out=args.out,
        judges=specs,
        baseline_lora=args.baseline_lora,
        seeds_per_prompt=args.seeds_per_prompt,
        seed=args.seed,
        num_steps=args.steps,
        guidance_scale=args.guidance,
        batch_size=args.batch_size,
        num_frames=args.num_frames,
        height=args.height,
        width=args.width,
        sampler=args.sampler,
        device=args.device,
        tie_margin=args.tie_margin,
        fps=args.fps,
        resume=args.resume,
    )
    report = run_eval(cfg)
    for name, wr in (report.get("winrate") or {}).items():
        lo, hi = wr["ci95"]
        print(
            f"{name}: win rate {wr['rate']:.3f} (95% CI {lo:.3f}-{hi:.3f}, n={wr['n']}, "
            f"wins/ties/losses {wr['wins']}/{wr['ties']}/{wr['losses']})"
        )
    for name in report.get("suspect_judges") or []:
        print(f"warning: judge {name} prefers the aligned model while the other judges do not (reward hacking?)")
    if "human_task" in report:
        print(f"blinded A/B task for annotators: {report['human_task']} (vidalign annotate serve ...)")
    print(f"report: {Path(args.out) / 'report.md'}")
    summary = {k: {f: wr[f] for f in ("rate", "ci95", "n", "ties")} for k, wr in (report.get("winrate") or {}).items()}
    print(json.dumps(summary))
    return 0


def _sample(args, model, prompts: list[str], seeds: list[int], out: str | Path, **kw) -> list[dict]:
    """``sample_to_disk`` with the sampling options every sampling command takes."""
    from align.generation import default_batch_size, sample_to_disk

    return sample_to_disk(
        model,
        prompts,
        seeds,
        out,
        num_steps=args.steps,
        guidance_scale=args.guidance,
        batch_size=args.batch_size or default_batch_size(model),
        num_frames=args.num_frames,
        height=args.height,
        width=args.width,
        sampler=args.sampler,
        model_name=args.model,
        resume=args.resume,
        fps=args.fps,
        **kw,
    )


def cmd_generate(args) -> int:
    """Sample videos for prompts into ``--out`` (an mp4 or GIF per video + index.jsonl)."""
    from align.generation import load_generator

    prompts = _prompts_from(args)
    prompts = [p for p in prompts for _ in range(args.num)]
    seeds = [args.seed + i for i in range(len(prompts))]
    model = load_generator(args.model, args.lora, args.device)
    rows = _sample(args, model, prompts, seeds, args.out, lora=args.lora, video_format=args.format)
    print(f"wrote {len(rows)} videos to {args.out} (index.jsonl: file, prompt, seed, model, lora, settings)")
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
    for line in rep.info_lines():  # mixed sizes / lengths / fps are information: training resamples
        print(f"  info: {line}")
    for p in rep.problems:
        print(f"  {p}")
    print(f"{len(rep.fatal)} problem(s) in {len(rep.bad_rows)} row(s), {len(rep.warnings)} warning(s)")
    return 1 if rep.fatal else 0


def cmd_data_import(args) -> int:
    from align.data.importers import ImportOptions, import_dataset

    bad_rows = "skip" if args.skip_bad else "error"
    opts = ImportOptions(
        seed=args.seed,
        overall_from=args.overall_from,
        bothbad=args.bothbad,
        tie_margin=args.tie_margin,
        as_samples=args.as_samples,
        score_columns=tuple(c.strip() for c in args.score_columns.split(",")) if args.score_columns else None,
        repeat_frames=args.repeat_frames,
        frames_fps=args.frames_fps,
    )
    s = import_dataset(
        args.format,
        args.src,
        args.dst,
        split=args.split,
        revision=args.revision,
        bad_rows=bad_rows,
        allow_absolute_paths=args.allow_absolute_paths,
        overwrite=args.overwrite,
        preprocessing={"num_frames": args.num_frames, "height": args.height, "width": args.width, "fps": args.fps},
        limit=args.limit,
        options=opts,
    )
    for line in s["problems"][:50]:
        print(f"  skipped {line}")
    if len(s["problems"]) > 50:
        print(f"  ... and {len(s['problems']) - 50} more (all in {args.dst}/vidalign_import.json)")
    print(
        f"imported {s['rows_out']} {s['kind']} from {s['rows_in']} rows ({s['format']}) into {args.dst}; "
        f"skipped {s['skipped']}; {s['rows_per_s']} rows/s"
    )
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
    """``data cache``: fill a latent cache as a training run with the same model and options reads
    it (videos at the model's input, every prompt's state); ``--recipe`` takes the model, its
    options, the dataset and the cache folder from the training recipe (flags override)."""
    from align.data.latent_cache import build_latent_cache
    from align.data.preference import load_preference_dataset
    from align.models import default_device, load_model

    options: dict = {}
    dataset, model_name, cache_dir = args.dataset, args.model, args.cache_dir
    bad_rows = "skip" if args.skip_bad else "error"
    if args.recipe:
        from align.training import load_train_config

        cfg = load_train_config(args.recipe)
        options = {k: v for k, v in cfg.model_options.items() if k not in ("load_text_encoder", "prompt_embeds")}
        dataset, model_name = dataset or cfg.dataset, model_name or cfg.model
        cache_dir = cache_dir or cfg.latent_cache_dir
        bad_rows = "skip" if args.skip_bad else cfg.bad_rows
    for key in ("num_frames", "height", "width", "fps", "max_sequence_length", "dtype"):
        if getattr(args, key) is not None:
            options[key] = getattr(args, key)
    missing = [name for name, v in (("DATASET", dataset), ("--model", model_name), ("--cache-dir", cache_dir)) if not v]
    if missing:
        raise ValueError(f"data cache: give {', '.join(missing)} (or a --recipe whose keys set them)")
    model = load_model(model_name, device=args.device or default_device(), **options)
    model.requires_grad_(False)
    ds = load_preference_dataset(dataset, split=args.split)
    data = build_latent_cache(
        model, ds, cache_dir, dataset, dataset, target=model.video_input, bad_rows=bad_rows,
        allow_absolute_paths=args.allow_absolute_paths, batch_size=args.batch_size,
        model_source=model_name, model_options=options,
    )  # fmt: skip
    s = data.stats
    print(
        f"{cache_dir}: {s['pairs']} pairs (skipped {s['skipped']}); videos encoded {s['videos_encoded']}, "
        f"reused {s['videos_reused']}; prompts encoded {s['prompts_encoded']}, reused {s['prompts_reused']}"
    )
    if s["prompts_by_text_encoder_files"]:
        print("all prompt states cached: training with this latent_cache_dir loads the model without its text encoder")
    return 0


def _sample_and_judge(args, command: str, rounds: int = 1) -> tuple[list[str], list[str], dict, list]:
    """``data pairs`` / ``data samples``: prompts and judges checked first, then K samples per
    prompt and round into ``OUT/videos`` (resumable), then every judge's scores:
    ``(prompts, files relative to OUT, scores by judge name, judges)``."""
    from align.eval.evaluate import score_samples
    from align.generation import load_generator
    from align.judges import check_prompts

    prompts = _prompts_from(args)
    k = args.samples_per_prompt
    if k < 2:
        raise ValueError(f"--samples-per-prompt must be >= 2 (samples are compared with each other), got {k}")
    judges = _judges(args, command, args.device)
    check_prompts(judges, prompts)
    ps = [p for p in prompts * rounds for _ in range(k)]
    seeds = [args.seed * 1_000_003 + i for i in range(len(ps))]
    videos = Path(args.out) / "videos"
    model = load_generator(args.model, None, args.device)
    rows = _sample(args, model, ps, seeds, videos, desc=command)
    del model
    return ps, [f"videos/{r['file']}" for r in rows], score_samples(judges, videos, rows), judges


def cmd_data_pairs(args) -> int:
    """Sample the model K times per prompt (and round), score every video with the judges, and
    write best-vs-worst (or all) pairs as a preference dataset whose videos are files in OUT/videos."""
    from align.data.pairs import pairs_from_groups

    ps, files, scores, judges = _sample_and_judge(args, "data pairs", args.rounds)
    totals = _one_score(judges, scores).reshape(-1, args.samples_per_prompt)
    ds = pairs_from_groups(ps, files, totals, args.pairs, args.tie_margin, args.seed)
    ds.save_to_disk(args.out)
    prefs = ds["preference"]
    print(
        f"wrote {len(ds)} pairs judged by {' + '.join(j.name for j in judges)} to {args.out} "
        f"(a={prefs.count('a')} b={prefs.count('b')} tie={prefs.count('tie')})"
    )
    return 0


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

        model = load_reward_model(args.model)
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
    model = load_reward_model(args.model)
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
    """Sample a generator K times per prompt and score every video with the judges (RWR's data)."""
    from align.data.samples import scored_samples_dataset

    ps, files, scores, judges = _sample_and_judge(args, "data samples")
    rewards = _one_score(judges, scores)
    k = args.samples_per_prompt
    scored_samples_dataset(ps, files, rewards, [i // k for i in range(len(ps))]).save_to_disk(args.out)
    print(
        f"wrote {len(ps)} scored samples ({len(ps) // k} prompts x {k}) judged by "
        f"{' + '.join(j.name for j in judges)} to {args.out}; reward mean {rewards.mean():.3f} std {rewards.std():.3f}"
    )
    return 0


def cmd_annotate(args) -> int:
    """The human-preference web app: serve it, summarise agreement, export a preference dataset."""
    if args.annotate_command == "serve":
        from align.annotate.server import serve

        serve(
            args.pairs,
            args.db,
            args.host,
            args.port,
            args.per_pair,
            args.root,
            args.cache_format,
            args.verbose,
            secret=args.secret or os.environ.get("VIDALIGN_ANNOTATE_SECRET") or None,
            require_invite=args.require_invite,
        )
        return 0
    if args.annotate_command == "invite":
        from align.annotate.server import invite_link
        from align.annotate.storage import LabelStore

        store = LabelStore(args.db)
        if args.revoke:
            print(f"revoked {store.revoke_invites(args.name)} invite(s) of {args.name}")
            return 0
        print(invite_link(args.base_url, store.add_invite(args.name)))
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
    d.add_argument("--quick", action="store_true", help="tiny budgets, for tests (numbers mean nothing)")
    d.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="change a DemoConfig field (align/demo.py) or STAGE.KEY of a stage's recipe, e.g. --set DPO.beta=1000",
    )

    pt = sub.add_parser("pretrain", help="pretrain the tiny Sora model on the synthetic world")
    pt.add_argument("recipe", nargs="?", default=None)
    pt.add_argument(
        "--demo",
        metavar="DIR",
        default=None,
        help="write both models the demo ships (generator + reward backbone, fp16, SHA256SUMS) into DIR",
    )

    t = sub.add_parser("train", help="align a generator with DPO + LoRA from a recipe")
    t.add_argument("recipe")

    def sampling(q, judges: bool = True, resume: bool = False):
        """The options of every command that samples a model (and, with ``judges``, scores it)."""
        q.add_argument("--model", required=True, help="model directory, or a diffusers pipeline (dir or Hub id)")
        q.add_argument("--prompt", action="append", help="a prompt (repeatable)")
        q.add_argument("--prompts-file", help="one prompt per line (no blank lines)")
        q.add_argument("--seed", type=int, default=0)
        q.add_argument("--steps", type=int, default=20)
        q.add_argument("--guidance", type=float, default=4.0)
        q.add_argument("--out", required=True)
        for flag in ("--num-frames", "--height", "--width"):
            q.add_argument(flag, type=int, default=None, help="video size (default: the model's); checked first")
        q.add_argument(
            "--batch-size", type=int, default=None, help="videos per sampler call (default 1 for diffusers models)"
        )
        q.add_argument("--device", default=None, help="cuda, cuda:1, cpu, ... (default: cuda when available)")
        q.add_argument(
            "--sampler",
            choices=("pipeline", "vidalign"),
            default="pipeline",
            help="diffusers models: the family's own pipeline sampler, or vidalign's ODE sampler",
        )
        q.add_argument("--fps", type=int, default=8, help="frame rate written into the video files")
        q.add_argument(
            "--resume",
            action=argparse.BooleanOptionalAction,
            default=resume,
            help="reuse videos already sampled into OUT with the same prompt, seed and settings"
            + (" (default)" if resume else ""),
        )
        if judges:
            q.add_argument(
                "--judge",
                action="append",
                metavar="SPEC",
                help="reward:DIR | clip:MODEL[@WEIGHTS] | http:URL (repeatable; oracle: the demo's world only)",
            )
            q.add_argument(
                "--reward-model", nargs="+", metavar="DIR", help="the same as --judge reward:DIR for each DIR"
            )

    e = sub.add_parser("eval", help="win rates of an aligned LoRA vs its base (same prompts and seeds), any judge")
    sampling(e, resume=True)
    e.add_argument("--lora", required=True, help="LoRA directory (run_dir/lora)")
    e.add_argument("--baseline-lora", default=None, help="compare against this LoRA instead of the base model")
    e.add_argument("--seeds-per-prompt", type=int, default=5)
    e.add_argument("--tie-margin", type=float, default=0.0, help="|score gap| at or below which a comparison is a tie")

    g = sub.add_parser("generate", help="write videos for prompts")
    sampling(g, judges=False)
    g.add_argument("--lora", default=None)
    g.add_argument("--num", type=int, default=1, help="videos per prompt")
    g.add_argument("--format", choices=("mp4", "gif", "webm"), default="mp4")

    da = sub.add_parser("data", help="preference datasets")
    dsub = da.add_subparsers(dest="data_command", required=True)
    v = dsub.add_parser("validate", help="report every bad row; exit 1 if any is fatal")
    v.add_argument("dataset", help="save_to_disk dir, .jsonl/.csv/.parquet, folder layout, or hub id")
    v.add_argument("--min-frames", type=int, default=1, help="fewer frames than this is an error")
    im = dsub.add_parser("import", help="map a public layout onto the schema (copies the videos)")
    im.add_argument("--format", required=True, choices=IMPORT_FORMATS, help="the source's layout (docs/data.md)")
    im.add_argument("src", help="file, directory (a local clone of a Hub repo too) or hub dataset id in that layout")
    im.add_argument("dst", help="new save_to_disk directory (videos copied under DST/videos)")
    im.add_argument("--revision", default=None, help="hub dataset revision")
    im.add_argument("--seed", type=int, default=0, help="chosen-rejected: seed of the a/b order")
    im.add_argument("--skip-bad", action="store_true", help="skip and count bad rows instead of failing")
    im.add_argument("--overwrite", action="store_true")
    im.add_argument("--num-frames", type=int, default=None, help="prepare videos: frames per clip")
    im.add_argument("--fps", type=float, default=None, help="prepare videos: sample frames at this rate")
    im.add_argument("--height", type=int, default=None, help="prepare videos: resize + centre-crop height")
    im.add_argument("--width", type=int, default=None, help="prepare videos: resize + centre-crop width")
    im.add_argument("--limit", type=int, default=None, help="import only the first N source rows")
    im.add_argument("--repeat-frames", type=int, default=None, help="stills become N identical frames (mp4)")
    im.add_argument("--overall-from", default=None, help="videoalign/videogen-rewardbench/videofeedback: label column")
    im.add_argument("--bothbad", choices=("tie", "skip"), default="tie", help="genai-bench-video: bothbad_vote")
    im.add_argument("--tie-margin", type=float, default=0.0, help="scored formats, rapidata: gap counted as a tie")
    im.add_argument("--as-samples", action="store_true", help="scored formats: write scored samples for RWR")
    im.add_argument("--score-columns", default=None, help="videofeedback: comma-separated score columns")
    im.add_argument("--frames-fps", type=float, default=8.0, help="videos given as frame lists: their frame rate")
    ins = dsub.add_parser("inspect", help="counts, tie share, prompt and video histograms (PNG)")
    ins.add_argument("dataset")
    ins.add_argument("--out", default=None, help="PNG path (default: DATASET/inspect.png)")
    ca = dsub.add_parser("cache", help="encode videos and prompts once into a latent cache for training")
    ca.add_argument("dataset", nargs="?", help="the preference dataset (default: the recipe's)")
    ca.add_argument("--recipe", help="the training recipe: model, model_options, dataset, latent_cache_dir")
    ca.add_argument("--model", help="the model whose VAE and text encoder encode")
    ca.add_argument("--cache-dir", help="the same folder as the recipe's latent_cache_dir")
    ca.add_argument("--skip-bad", action="store_true", help="skip and count bad rows instead of failing")
    for flag, kind in (("--num-frames", int), ("--height", int), ("--width", int), ("--fps", float)):
        ca.add_argument(flag, type=kind, default=None, help="model option: the model input videos are resampled to")
    ca.add_argument("--max-sequence-length", type=int, default=None, help="model option: the prompts' text length")
    ca.add_argument("--dtype", default=None, help="model option (default auto: bfloat16 on CUDA), as the recipe's")
    ca.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available)")
    ca.add_argument("--batch-size", type=int, default=16, help="videos per VAE call")
    for q in (v, ins, ca):
        q.add_argument("--split", default="train", help="split of a hub dataset / DatasetDict")
    im.add_argument("--split", default=None, help="split (default: the format's published one, else train)")
    for q in (v, im, ca):
        q.add_argument("--allow-absolute-paths", action="store_true", help="trust absolute video paths")
    pa = dsub.add_parser("pairs", help="sample a model, label best-vs-worst pairs with judges (--judge)")
    sampling(pa)
    pa.add_argument("--samples-per-prompt", type=int, default=4)
    pa.add_argument("--rounds", type=int, default=2, help="passes over the prompts")
    pa.add_argument(
        "--tie-margin",
        type=float,
        default=0.01,
        help="score gap below which a pair is a tie (one judge: its units; several: z-score units)",
    )
    pa.add_argument("--pairs", choices=("best_worst", "all"), default="best_worst", help="pairs per group of samples")

    sa = dsub.add_parser("samples", help="sample a model K times per prompt and score with judges (for RWR)")
    sampling(sa)
    sa.add_argument("--samples-per-prompt", type=int, default=4)

    rw = sub.add_parser("reward", help="CLIP-based video reward models: train, eval, score")
    rsub = rw.add_subparsers(dest="reward_command", required=True)
    rt = rsub.add_parser("train", help="train on a preference dataset (Bradley-Terry with ties)")
    rt.add_argument("recipe")
    rev = rsub.add_parser("eval", help="pairwise accuracy (with and without ties) and a calibration plot")
    rev.add_argument("dataset")
    rev.add_argument("--model", required=True, help="a reward model directory (`vidalign reward train`)")
    rev.add_argument("--out", default="runs/reward_eval")
    rev.add_argument(
        "--tie-threshold", type=float, default=0.1, help="|score difference| below which a tie is predicted"
    )
    rev.add_argument("--skip-bad-rows", action="store_true")
    rsc = rsub.add_parser("score", help="score video files against a prompt")
    rsc.add_argument("--model", required=True, help="a reward model directory (`vidalign reward train`)")
    rsc.add_argument("--prompt", required=True)
    rsc.add_argument("--video", nargs="+", required=True)

    an = sub.add_parser("annotate", help="collect human preferences in a local web app")
    asub = an.add_subparsers(dest="annotate_command", required=True)
    se = asub.add_parser("serve", help="serve the annotation page for pairs of videos")
    se.add_argument("pairs", help="a preference dataset directory, or `vidalign generate` output (index.jsonl)")
    se.add_argument("--db", required=True, help="SQLite file for the labels (created if missing)")
    se.add_argument("--per-pair", type=int, default=1, help="annotators each pair is shown to")
    se.add_argument("--host", default="127.0.0.1", help="address to bind (not loopback: needs access control)")
    se.add_argument("--port", type=int, default=8765, help="0 picks a free port")
    se.add_argument("--root", default=None, help="folder videos may be served from (default: PAIRS)")
    se.add_argument("--cache-format", choices=("webm", "mp4"), default="webm", help="for converted GIFs/arrays")
    se.add_argument("--verbose", action="store_true", help="log every request")
    se.add_argument(
        "--secret",
        default=None,
        help="shared secret every request must carry (?token=S, then a cookie); default $VIDALIGN_ANNOTATE_SECRET",
    )
    se.add_argument(
        "--require-invite",
        action="store_true",
        help="every request needs a token: an invite (`annotate invite NAME`) or the --secret",
    )
    inv = asub.add_parser("invite", help="make an annotator's access link (a token stored, hashed, in the db)")
    inv.add_argument("name", help="the annotator: labels made with this link are stored under this name")
    inv.add_argument("--db", required=True, help="the SQLite file `annotate serve` uses (created if missing)")
    inv.add_argument("--base-url", default=None, help="where annotators reach the app (default http://HOSTNAME:8765)")
    inv.add_argument("--revoke", action="store_true", help="revoke every link of NAME instead")
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


def _user_error(command: str, e: Exception) -> int:
    """Print a user error in one line and return exit code 2 (``VIDALIGN_DEBUG=1``: re-raise it)."""
    if os.environ.get("VIDALIGN_DEBUG"):
        raise e
    print(f"vidalign {command}: error: {e}", file=sys.stderr)
    return 2


def _eval_human(argv: list[str]) -> int:
    """``vidalign eval human ...``: handed to ``align.eval.human.main_eval_human``."""
    try:
        from align.eval.human import main_eval_human

        return main_eval_human(argv)
    except (ValueError, FileNotFoundError) as e:
        return _user_error("eval human", e)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``vidalign`` console script."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:2] == ["eval", "human"]:
        return _eval_human(argv[2:])
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
        return _user_error(args.command, e)


if __name__ == "__main__":
    sys.exit(main())
