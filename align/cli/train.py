"""``vidalign train RECIPE [--key value ...]``: align a generator (LoRA) by the recipe's objective."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    """Register ``train``. Its ``--help`` is its own: with a recipe it lists that recipe's keys."""
    t = sub.add_parser(
        "train",
        add_help=False,
        help="align a generator with LoRA from a recipe: offline DPO / RWR or online RWR / GRPO",
        description="Align a generator with LoRA by the objective of RECIPE (a YAML file: dpo, rwr or grpo). "
        "Every recipe key can be overridden on the command line (--beta 500); "
        "`vidalign train RECIPE --help` lists the keys of that recipe's objective with help and default.",
        usage="vidalign train RECIPE [--key value ...] [-h]",
    )
    t.add_argument("recipe", nargs="?", metavar="RECIPE", help="the recipe (e.g. recipes/tiny_sora_dpo.yaml)")
    t.add_argument("-h", "--help", action="store_true", help="this help; after RECIPE: the recipe's keys")
    t.set_defaults(run=run, name="train", overrides_ok=True, parser=t)


def run(args: argparse.Namespace) -> int:
    """Train (or print help); the overrides are the arguments after RECIPE."""
    from align import training

    if args.help:
        print(training.recipe_help(args.recipe) if args.recipe else args.parser.format_help())
        return 0
    if not args.recipe:
        args.parser.error("the following arguments are required: RECIPE")
    run_dir = training.train(training.load_train_config(args.recipe, args.overrides))
    print(f"run written to {run_dir} (LoRA in {run_dir / 'lora'})")
    return 0
