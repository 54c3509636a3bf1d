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
    pt.add_argument(
        "recipe",
        nargs="?",
        default=None,
        help="a pretrain recipe (default: the built-in one); one with a `stages` key pretrains a cascade's "
        "super-resolution stages over its base (recipes/tiny_sora_cascade_pretrain.yaml)",
    )
    pt.add_argument(
        "--demo",
        metavar="DIR",
        default=None,
        help="write both models the demo ships (generator + reward backbone, fp16, SHA256SUMS) into DIR; with a "
        "cascade recipe, the stages into DIR/tiny_sora_cascade over DIR/tiny_sora (their lines added to SHA256SUMS)",
    )
    pt.set_defaults(run=run, name="pretrain", overrides_ok=True)


def run(args: argparse.Namespace) -> int:
    from align.config import PretrainConfig, load_config
    from align.demo.cascade_pretrain import CascadePretrainConfig, is_cascade_recipe, pretrain_cascade, ship_cascade
    from align.demo.pretrain import pretrain, pretrain_demo_models

    if is_cascade_recipe(args.recipe):  # a `stages` key: a cascade's super-resolution stages over its base
        cfg = load_config(CascadePretrainConfig, args.recipe, args.overrides)
        path = ship_cascade(cfg, args.demo) if args.demo else pretrain_cascade(cfg)
        print(f"cascade (base {cfg.base} + {len(cfg.stages)} stages) written to {path}")
        return 0
    cfg = load_config(PretrainConfig, args.recipe, args.overrides)
    if args.demo:
        print(f"the demo's generator and reward backbone written to {pretrain_demo_models(args.demo, cfg)}")
        return 0
    print(f"pretrained model written to {pretrain(cfg)}")
    return 0
