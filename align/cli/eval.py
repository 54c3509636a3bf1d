"""``vidalign eval``: paired win rates of an aligned LoRA against its base by every judge, and
``vidalign eval human``: the human win rate of the blinded A/B task an ``eval --judge human`` wrote."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from align.cli.common import add_judge_options, add_sampling_options, judge_specs, prompts_from, sampling_options

USAGE = """vidalign eval --model M --lora L --out DIR (--prompt TEXT | --prompts-file F) --judge SPEC [options]
       vidalign eval --model M --prompt-rewriter SPEC --baseline-prompts plain --out DIR ... (the prompt A/B)
       vidalign eval human --db DB [--task DIR] [--out DIR] [--seed N]"""


def add_parser(sub) -> None:
    """Register ``eval`` and its subcommand ``eval human``."""
    e = sub.add_parser(
        "eval",
        usage=USAGE,
        help="win rates of an aligned LoRA vs its base (same prompts and seeds), any judge; `eval human`",
        description="Sample the base (LoRA off, or --baseline-lora) and the aligned model on the same prompts "
        "and seeds, judge both, and report paired win rates with bootstrap CIs (--model, --lora and --out "
        "are required). --prompt-rewriter SPEC --baseline-prompts plain compares rewritten against plain prompts "
        "(the same report; --lora optional). --judge human writes a blinded A/B task for `vidalign annotate serve`; "
        "`vidalign eval human` turns its labels into a win rate.",
    )
    add_sampling_options(e, resume=True, required=False)
    add_judge_options(e, human=True)
    e.add_argument("--lora", help="LoRA directory (run_dir/lora)")
    e.add_argument("--baseline-lora", default=None, help="compare against this LoRA instead of the base model")
    e.add_argument(
        "--baseline-prompts",
        choices=("same", "plain"),
        default="same",
        help="plain: the baseline arm samples the plain prompts, the candidate the --prompt-rewriter's rewrites "
        "(the prompt A/B; --lora optional); same: both arms sample the same prompts (default)",
    )
    e.add_argument("--seeds-per-prompt", type=int, default=5)
    e.add_argument("--tie-margin", type=float, default=0.0, help="|score gap| at or below which a comparison is a tie")
    e.set_defaults(run=run, name="eval", parser=e)
    human = e.add_subparsers(dest="eval_command", metavar="{human}")
    h = human.add_parser(
        "human",
        prog="vidalign eval human",
        help="the human win rate of an `eval --judge human` task, from its labels",
        description="The human win rate of a blinded A/B task from its labels: per pair the majority vote, "
        "ties counting one half, a bootstrap CI over pairs, position bias and annotator agreement.",
    )
    h.add_argument("--db", required=True, help="the annotation database (`vidalign annotate serve ... --db`)")
    h.add_argument("--task", default=None, help="the A/B task folder (default: the one the db was served)")
    h.add_argument("--out", default=None, help="report folder (default: TASK/report)")
    h.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    h.set_defaults(run=run_human, name="eval human")


def run(args: argparse.Namespace) -> int:
    """Sample, judge and report (``align.eval.evaluate.run_eval``); print each judge's win rate."""
    from align import distributed
    from align.eval.evaluate import EvalConfig, run_eval

    needed = ("--model", "--out") if args.baseline_prompts == "plain" else ("--model", "--lora", "--out")
    missing = [flag for flag in needed if getattr(args, flag[2:]) is None]
    if missing:
        args.parser.error(f"the following arguments are required: {', '.join(missing)}")
    cfg = EvalConfig(
        model=args.model,
        lora=args.lora,
        prompts=prompts_from(args),
        out=args.out,
        judges=judge_specs(args),
        baseline_lora=args.baseline_lora,
        sampling=sampling_options(args, seeds_per_prompt=args.seeds_per_prompt),
        tie_margin=args.tie_margin,
        resume=args.resume,
        baseline_prompts=args.baseline_prompts,
    )
    report = run_eval(cfg)
    if not distributed.is_main():  # every process sampled and judged its shard; the main one reports
        return 0
    for name, wr in (report.get("winrate") or {}).items():
        lo, hi = wr["ci95"]
        print(
            f"{name}: win rate {wr['rate']:.3f} (95% CI {lo:.3f}-{hi:.3f}, n={wr['n']}, "
            f"wins/ties/losses {wr['wins']}/{wr['ties']}/{wr['losses']})"
        )
    for name in report.get("suspect_judges") or []:
        print(f"warning: judge {name} prefers the {cfg.arms()[1]} while the other judges do not (reward hacking?)")
    if "human_task" in report:
        print(f"blinded A/B task for annotators: {report['human_task']} (vidalign annotate serve ...)")
    print(f"report: {Path(args.out) / 'report.md'}")
    summary = {k: {f: wr[f] for f in ("rate", "ci95", "n", "ties")} for k, wr in (report.get("winrate") or {}).items()}
    print(json.dumps(summary))
    return 0


def run_human(args: argparse.Namespace) -> int:
    """Write the human report (``align.eval.human.run_human_eval``) and print its summary line."""
    from align.eval.human import run_human_eval, summary_line

    report, out = run_human_eval(args.db, args.task, args.out, args.seed)
    print(summary_line(report) + f"; report in {out / 'report.md'}")
    return 0
