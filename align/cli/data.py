"""``vidalign data validate | import | inspect | cache | pairs | samples``: preference datasets,
checked, imported from public layouts, summarised, encoded into a latent cache, or made from a
model's own samples judged by ``--judge``."""

from __future__ import annotations

import argparse
from pathlib import Path

from align.cli import common

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


def add_parser(sub) -> None:
    """Register ``data`` and its subcommands."""
    da = sub.add_parser("data", help="preference datasets: validate, import, inspect, cache, pairs, samples")
    dsub = da.add_subparsers(dest="data_command", required=True)
    v = dsub.add_parser("validate", help="report every bad row; exit 1 if any is fatal")
    v.add_argument("dataset", help="save_to_disk dir, .jsonl/.csv/.parquet, folder layout, or hub id")
    v.add_argument("--min-frames", type=int, default=1, help="fewer frames than this is an error")
    v.set_defaults(run=run_validate, name="data validate")
    _add_import(dsub)
    ins = dsub.add_parser("inspect", help="counts, tie share, prompt and video histograms (PNG)")
    ins.add_argument("dataset")
    ins.add_argument("--out", default=None, help="PNG path (default: DATASET/inspect.png)")
    ins.set_defaults(run=run_inspect, name="data inspect")
    ca = _add_cache(dsub)
    for q in (v, ins, ca):
        q.add_argument("--split", default="train", help="split of a hub dataset / DatasetDict")
    for q in (v, ca):
        q.add_argument("--allow-absolute-paths", action="store_true", help="trust absolute video paths")
    _add_pairs_and_samples(dsub)


def _add_import(dsub) -> None:
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
    im.add_argument("--split", default=None, help="split (default: the format's published one, else train)")
    im.add_argument("--allow-absolute-paths", action="store_true", help="trust absolute video paths")
    im.set_defaults(run=run_import, name="data import")


def _add_cache(dsub) -> argparse.ArgumentParser:
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
    ca.set_defaults(run=run_cache, name="data cache")
    return ca


def _add_pairs_and_samples(dsub) -> None:
    pa = dsub.add_parser("pairs", help="sample a model, label best-vs-worst pairs with judges (--judge)")
    common.add_sampling_options(pa)
    common.add_judge_options(pa)
    pa.add_argument("--samples-per-prompt", type=int, default=4)
    pa.add_argument("--rounds", type=int, default=2, help="passes over the prompts")
    pa.add_argument(
        "--tie-margin",
        type=float,
        default=0.01,
        help="score gap below which a pair is a tie (one judge: its units; several: z-score units)",
    )
    pa.add_argument("--pairs", choices=("best_worst", "all"), default="best_worst", help="pairs per group of samples")
    pa.set_defaults(run=run_pairs, name="data pairs")
    sa = dsub.add_parser("samples", help="sample a model K times per prompt and score with judges (for RWR)")
    common.add_sampling_options(sa)
    common.add_judge_options(sa)
    sa.add_argument("--samples-per-prompt", type=int, default=4)
    sa.set_defaults(run=run_samples, name="data samples")


def run_validate(args: argparse.Namespace) -> int:
    """Print the dataset's counts and every problem; exit 1 if any is fatal."""
    from align.data.checks import check_rows
    from align.data.preference import load_preference_dataset

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


def run_import(args: argparse.Namespace) -> int:
    from align.data.importers import ImportOptions, import_dataset

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
        bad_rows="skip" if args.skip_bad else "error",
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


def _spread(xs, scale: float = 1.0) -> str:
    """``min / median / max`` of ``xs`` for printing."""
    import numpy as np

    if not xs:
        return "n/a"
    return f"min {min(xs) * scale:.3g} / median {np.median(xs) * scale:.3g} / max {max(xs) * scale:.3g}"


def run_inspect(args: argparse.Namespace) -> int:
    """Print a dataset's summary and write its histograms (default ``DATASET/inspect.png``)."""
    from align.data.checks import summarize
    from align.data.preference import load_preference_dataset
    from align.eval.plots import plot_summary

    ds = load_preference_dataset(args.dataset, split=args.split)
    s = summarize(ds, root=args.dataset)
    src = Path(args.dataset)
    out = Path(args.out) if args.out else src / "inspect.png" if src.is_dir() else Path(f"{src}.inspect.png")
    if not src.exists() and not args.out:
        out = Path("inspect.png")  # a hub dataset id
    c = s["counts"]
    print(f"{args.dataset}: {s['rows']} rows, {s['unique_prompts']} distinct prompts")
    print(f"  labels: a={c['a']} b={c['b']} tie={c['tie']} other={c['other']}; tie share {s['tie_share']:.3f}")
    for name, ac in s["aspects"].items():
        print(f"  {name}: a={ac['a']} b={ac['b']} tie={ac['tie']}")
    print(f"  prompt length (words): {_spread(s['prompt_words'])}")
    print(f"  videos: {len(s['video_bytes'])}; frames {_spread(s['video_frames'])}")
    print(f"  video length (seconds): {_spread(s['video_seconds'])}")
    print(f"  video size (KiB): {_spread(s['video_bytes'], 1 / 1024)}")
    for u in s["unreadable_videos"][:10]:
        print(f"  unreadable: {u}")
    if s["unreadable_videos"]:
        print(f"  {len(s['unreadable_videos'])} unreadable video(s): run `vidalign data validate` for details")
    print(f"  histograms: {plot_summary(s, out, title=str(args.dataset))}")
    return 0


def _cache_settings(args: argparse.Namespace) -> tuple[str, str, str, dict, str]:
    """``(dataset, model, cache_dir, model options, bad_rows)`` of ``data cache``: the recipe's
    (``--recipe``) with the flags over them; a missing one is an error naming it."""
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
    return dataset, model_name, cache_dir, options, bad_rows


def run_cache(args: argparse.Namespace) -> int:
    """``data cache``: fill a latent cache as a training run with the same model and options reads
    it (videos at the model's input, every prompt's state)."""
    from align.data.latent_cache import build_latent_cache
    from align.data.preference import load_preference_dataset
    from align.models import default_device, load_model

    dataset, model_name, cache_dir, options, bad_rows = _cache_settings(args)
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


def _sample_and_score(args: argparse.Namespace, rounds: int = 1) -> tuple[list[str], list[str], dict, list]:
    """``data pairs`` / ``data samples``: prompts and judges from the flags (checked first), then
    ``align.generation.sample_and_score``: ``(prompts, files, scores by judge, judges)``, on
    every process under ``accelerate launch`` (sampling and judging sharded, scores gathered)."""
    from align import distributed
    from align.generation import sample_and_score

    args.device = distributed.local_device(args.device)  # this process's GPU under N processes
    prompts = common.prompts_from(args)
    options = common.sampling_options(args)
    judges = common.judges_from(args, args.name)
    ps, files, scores = sample_and_score(
        args.model, prompts, judges, args.out, options, samples_per_prompt=args.samples_per_prompt, rounds=rounds,
        resume=args.resume, desc=args.name,
    )  # fmt: skip
    return ps, files, scores, judges


def run_pairs(args: argparse.Namespace) -> int:
    """Sample the model K times per prompt (and round), score every video with the judges, and
    write best-vs-worst (or all) pairs as a preference dataset whose videos are files in OUT/videos."""
    from align import distributed
    from align.data.pairs import pairs_from_groups

    ps, files, scores, judges = _sample_and_score(args, args.rounds)
    if not distributed.is_main():  # the main process writes the dataset
        return 0
    totals = common.one_score(judges, scores).reshape(-1, args.samples_per_prompt)
    ds = pairs_from_groups(ps, files, totals, args.pairs, args.tie_margin, args.seed)
    ds.save_to_disk(args.out)
    prefs = ds["preference"]
    print(
        f"wrote {len(ds)} pairs judged by {' + '.join(j.name for j in judges)} to {args.out} "
        f"(a={prefs.count('a')} b={prefs.count('b')} tie={prefs.count('tie')})"
    )
    return 0


def run_samples(args: argparse.Namespace) -> int:
    """Sample a generator K times per prompt and score every video with the judges (RWR's data)."""
    from align import distributed
    from align.data.samples import scored_samples_dataset

    ps, files, scores, judges = _sample_and_score(args)
    if not distributed.is_main():  # the main process writes the dataset
        return 0
    rewards = common.one_score(judges, scores)
    k = args.samples_per_prompt
    scored_samples_dataset(ps, files, rewards, [i // k for i in range(len(ps))]).save_to_disk(args.out)
    print(
        f"wrote {len(ps)} scored samples ({len(ps) // k} prompts x {k}) judged by "
        f"{' + '.join(j.name for j in judges)} to {args.out}; reward mean {rewards.mean():.3f} std {rewards.std():.3f}"
    )
    return 0
