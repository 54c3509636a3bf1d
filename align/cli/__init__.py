"""The ``vidalign`` command line: one module per command group, each parsing its options,
calling the library and printing.

    vidalign demo [--out runs/demo] [--quick] [--set KEY=VALUE ...]
    vidalign pretrain [RECIPE] [--key value ...]
    vidalign train RECIPE [--key value ...]          (e.g. --beta 500; RECIPE --help lists the keys)
    vidalign plan RECIPE [--gpus N] [--backend ddp|zero2|zero3|fsdp2] [--sp K] [--json]   (memory and time)
    vidalign eval --model M --lora L [--baseline-lora L0] --prompts-file F --judge SPEC [--judge ...]
                  [--seeds-per-prompt K] --out DIR           (SPEC: reward:DIR | clip:MODEL[@W] | http:URL | human)
    vidalign eval --model M --prompt-rewriter SPEC --baseline-prompts plain ...  (rewritten vs plain prompts)
    vidalign eval human --db labels.sqlite [--task DIR]      (the human win rate of an `eval --judge human` task)
    vidalign generate --model DIR [--lora DIR] --prompt TEXT [...] --out DIR [--resume]
    vidalign data validate DATASET [--min-frames N] [--allow-absolute-paths]
    vidalign data import --format FORMAT SRC DST [--limit N] [--skip-bad] [--num-frames N ...]  (docs/data.md)
    vidalign data inspect DATASET [--out PNG]
    vidalign data cache DATASET --model DIR --cache-dir DIR [--num-frames N ...] | --recipe RECIPE
    vidalign data pairs --model DIR --prompts-file F --judge SPEC --out DATASET_DIR [--samples-per-prompt 4]
    vidalign data samples --model DIR --prompts-file F --judge SPEC --out DATASET_DIR
      (every sampling command: [--num-frames N --height H --width W] [--steps S] [--guidance G]
       [--batch-size B] [--device D] [--sampler pipeline|vidalign] [--fps F] [--seed S] [--resume]
       [--prompt-rewriter hf:PATH|http:URL [--rewrite-instruction FILE]]:
       one align.sample.SamplingOptions, built in common.py)
    vidalign reward train RECIPE [--key value ...]
    vidalign reward eval DATASET --model DIR [--out DIR]
    vidalign reward score --model DIR --prompt TEXT --video FILE [FILE ...]
    vidalign annotate serve PAIRS --db labels.sqlite [--per-pair N] [--host 127.0.0.1] [--port 8765]
                                 [--secret S | --require-invite]   (required for a non-loopback --host)
    vidalign annotate invite NAME --db labels.sqlite [--base-url http://HOST:PORT] [--revoke]
    vidalign annotate stats --db labels.sqlite [--json]
    vidalign annotate export --db labels.sqlite OUT [--mode majority|all] [--min-labels N]

Multi-process: ``accelerate launch --config_file recipes/accelerate/X.yaml -m align.cli train RECIPE``.
Errors in user input (recipes, datasets, paths) print one clear message and exit with 2
(``VIDALIGN_DEBUG=1`` shows the traceback).
"""

from __future__ import annotations

import argparse
import sys

from align.cli import annotate, data, demo, generate, plan, pretrain, reward, train
from align.cli import eval as eval_
from align.cli.common import user_error
from align.cli.data import IMPORT_FORMATS

__all__ = ["IMPORT_FORMATS", "build_parser", "main"]

GROUPS = (demo, pretrain, train, plan, eval_, generate, data, reward, annotate)


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command: each group module registers its own (``add_parser``), with
    defaults ``run`` (the function that runs it), ``name`` (for error lines) and, for the
    commands that take recipe overrides, ``overrides_ok``."""
    p = argparse.ArgumentParser(prog="vidalign", description="Align video diffusion models with human preferences.")
    sub = p.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        group.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``vidalign`` console script: parse, run the command, and turn a user
    error into one line on stderr and exit code 2. Arguments the parser does not know are recipe
    overrides (``train``, ``pretrain``, ``reward train``), an error for every other command."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args, overrides = parser.parse_known_args(argv)
    if overrides and not getattr(args, "overrides_ok", False):
        parser.error(f"unrecognized arguments: {' '.join(overrides)}")
    args.overrides = overrides
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError) as e:
        return user_error(args.name, e)
