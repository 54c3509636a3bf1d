"""``vidalign plan RECIPE [--gpus N] [--backend ddp|zero2|zero3|fsdp2] [--sp K] [--json]``: memory per
process and time per step of a recipe, from its published architecture, before renting a GPU."""

from __future__ import annotations

import argparse
import json


def add_parser(sub) -> None:
    """Register ``plan``; arguments it does not know are recipe overrides (``--lora_rank 64``)."""
    p = sub.add_parser(
        "plan",
        help="memory per GPU and time per step of a recipe, planned on the meta device",
        description="Build the recipe's model from its published configs without allocating weights, trace one "
        "forward at the recipe's video size, and print per process: weights, LoRA and optimizer state, "
        "activations with and without gradient checkpointing, rollout buffers, text encoder; FLOPs and time "
        "per step on an H100 / H200; a verdict for 24, 48, 80 and 141 GB cards (align/plan.py has the formulas).",
        usage="vidalign plan RECIPE [--gpus N] [--backend ddp|zero2|zero3|fsdp2] [--sp K] [--json] [--key value ...]",
    )
    p.add_argument("recipe", metavar="RECIPE", help="a training recipe (e.g. recipes/wan2_1_t2v_1_3b_dpo.yaml)")
    p.add_argument(
        "--gpus", type=int, default=None, help="processes (one per GPU); default: the sequence-parallel degree (1)"
    )
    p.add_argument("--backend", default="ddp", choices=("ddp", "zero2", "zero3", "fsdp2"), help="default ddp")
    p.add_argument(
        "--sp",
        type=int,
        default=None,
        help="sequence-parallel degree K (activations / K); default: the recipe's "
        "sequence_parallel_size (--sp K is --sequence_parallel_size K)",
    )
    p.add_argument("--json", action="store_true", help="print the plan as JSON (bytes, FLOPs, seconds)")
    p.set_defaults(run=run, name="plan", overrides_ok=True)


def run(args: argparse.Namespace) -> int:
    from align.plan import Setup, format_plan, make_plan
    from align.training import load_train_config

    overrides = [*args.overrides, *(["--sequence_parallel_size", str(args.sp)] if args.sp is not None else [])]
    cfg = load_train_config(args.recipe, overrides)
    k = cfg.sequence_parallel_size
    plan = make_plan(cfg, Setup(args.gpus or k, args.backend, k), str(args.recipe))
    print(json.dumps(plan.to_dict(), indent=2) if args.json else format_plan(plan))
    return 0
