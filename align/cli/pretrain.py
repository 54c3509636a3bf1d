"""``vidalign pretrain [RECIPE] [--key value ...]``: the tiny model on the synthetic world."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    """Register ``pretrain``."""
    pt = sub.add_parser(
        "pretrain",
        help="pretrain the tiny Sora model (and, with --demo, the reward backbone) on the synthetic world",
        description="Pretrain the tiny Sora generator on the demo's synthetic world; recipe keys can be "
        "overridden on the command line (--steps 100).",
    )
    pt.add_argument("recipe", nargs="?", default=None, help="a pretrain recipe (default: the built-in one)")
    pt.add_argument(
        "--demo",
        metavar="DIR",
        default=None,
        help="write both models the demo ships (generator + reward backbone, fp16, SHA256SUMS) into DIR",
    )
    pt.set_defaults(run=run, name="pretrain", overrides_ok=True)


def run(args: argparse.Namespace) -> int:
    from align.config import PretrainConfig, load_config
    from align.demo.pretrain import pretrain, pretrain_demo_models

    cfg = load_config(PretrainConfig, args.recipe, args.overrides)
    if args.demo:
        print(f"the demo's generator and reward backbone written to {pretrain_demo_models(args.demo, cfg)}")
        return 0
    print(f"pretrained model written to {pretrain(cfg)}")
    return 0
