"""``vidalign demo``: the whole loop, small, on the synthetic world (runs on a laptop CPU)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub) -> None:
    """Register ``demo``."""
    d = sub.add_parser(
        "demo",
        help="the whole loop on the synthetic world, on a CPU",
        description="Pairs sampled and labelled by the oracle, a reward model trained on them, the tiny "
        "generator aligned with DPO, RWR and an online objective, win rates on held-out prompts.",
    )
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--quick", action="store_true", help="tiny budgets, for tests (numbers mean nothing)")
    d.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="change a DemoConfig field or STAGE.KEY of a stage's recipe, e.g. --set DPO.beta=1000",
    )
    d.set_defaults(run=run, name="demo")


def run(args: argparse.Namespace) -> int:
    from align.demo import parse_overrides, run_demo

    report = run_demo(args.out, quick=args.quick, overrides=parse_overrides(args.set or []))
    for judge, methods in report["winrate"].items():
        for method, w in methods.items():
            lo, hi = w["ci95"]
            print(
                f"{method} vs {w['vs']}, {judge.replace('_', ' ')} win rate {w['rate']:.3f} "
                f"(95% CI {lo:.3f}-{hi:.3f}; "
                f"{w['wins']} wins, {w['ties']} ties, {w['losses']} losses)"
            )
    if "cascade" in report:  # the DPO LoRA on the cascade's base stage, judged on its final videos
        c = report["cascade"]
        lo, hi = c["oracle_winrate_ci95"]
        print(
            f"DPO (base stage) vs base through the cascade ({c['video_size']}), oracle win rate "
            f"{c['oracle_winrate']:.3f} (95% CI {lo:.3f}-{hi:.3f}; {c['wins']} wins, {c['ties']} ties, "
            f"{c['losses']} losses)"
        )
    rm = report["reward_model"]
    ci = rm.get("accuracy_ci95")
    print(
        f"reward model held-out accuracy vs oracle {rm['accuracy']:.3f}"
        + (f" (95% CI {ci[0]:.3f}-{ci[1]:.3f}, bootstrap over prompts)" if ci else "")
        + f"; report: {Path(args.out) / 'report.md'}"
    )
    return 0
