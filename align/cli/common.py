"""What several commands share: the sampling, prompt and judge options, turning them into the
library's types (one ``SamplingOptions``, a prompt list, judges), and one-line user errors.

Building the parser imports nothing heavy: the library is imported when a command runs.
"""

from __future__ import annotations

import argparse
import os
import sys

JUDGE_NOTE = "(repeatable; oracle: the demo's world only)"


def user_error(command: str, e: Exception) -> int:
    """Print a user error in one line and return exit code 2 (``VIDALIGN_DEBUG=1``: re-raise it)."""
    if os.environ.get("VIDALIGN_DEBUG"):
        raise e
    print(f"vidalign {command}: error: {e}", file=sys.stderr)
    return 2


def positive_int(text: str) -> int:
    """An argparse ``type``: an integer >= 1."""
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def add_prompt_options(q: argparse.ArgumentParser) -> None:
    """``--prompt TEXT`` (repeatable) and ``--prompts-file FILE``."""
    q.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    q.add_argument("--prompts-file", help="one prompt per line (no blank lines)")


def add_sampling_options(q: argparse.ArgumentParser, resume: bool = False, required: bool = True) -> None:
    """The options of every command that samples a model: the model, its prompts, the output
    folder and the fields of one ``align.sample.SamplingOptions`` (see :func:`sampling_options`).
    ``required=False`` leaves checking ``--model`` and ``--out`` to the command (one with
    subcommands of other options)."""
    q.add_argument("--model", required=required, help="model directory, or a diffusers pipeline (dir or Hub id)")
    add_prompt_options(q)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--steps", type=int, default=20)
    q.add_argument("--guidance", type=float, default=4.0)
    q.add_argument("--out", required=required)
    for flag in ("--num-frames", "--height", "--width"):
        q.add_argument(flag, type=int, default=None, help="video size (default: the model's); checked first")
    q.add_argument(
        "--batch-size", type=int, default=None, help="videos per sampler call (default 1 for diffusers models)"
    )
    q.add_argument("--device", default=None, help="cuda, cuda:1, cpu, ... (default: cuda when available)")
    q.add_argument(
        "--sampler",
        default="pipeline",
        help="diffusers models: pipeline (the family's own pipeline sampler) or vidalign (vidalign's ODE sampler)",
    )
    q.add_argument("--fps", type=int, default=8, help="frame rate written into the video files")
    q.add_argument(
        "--prompt-rewriter",
        metavar="SPEC",
        default=None,
        help="hf:PATH | http:URL[#MODEL]: condition on prompts rewritten by a language model (cached in "
        "rewrites.jsonl; judges and reports see the originals; docs/judges.md)",
    )
    q.add_argument("--rewrite-instruction", metavar="FILE", default=None, help="the rewriter's system instruction")
    q.add_argument(
        "--resume",
        action=argparse.BooleanOptionalAction,
        default=resume,
        help="reuse videos already sampled into OUT with the same prompt, seed and settings"
        + (" (default)" if resume else ""),
    )


def add_judge_options(q: argparse.ArgumentParser, human: bool = False) -> None:
    """``--judge SPEC`` (repeatable; with ``human``, ``--judge human`` too) and its alias
    ``--reward-model DIR ...``."""
    specs = "reward:DIR | clip:MODEL[@WEIGHTS] | http:URL" + (" | human" if human else "")
    q.add_argument("--judge", action="append", metavar="SPEC", help=f"{specs} {JUDGE_NOTE}")
    q.add_argument("--reward-model", nargs="+", metavar="DIR", help="the same as --judge reward:DIR for each DIR")


def sampling_options(args: argparse.Namespace, seeds_per_prompt: int = 1):
    """The one ``align.sample.SamplingOptions`` of the flags of :func:`add_sampling_options`
    (checked: a bad value is an error naming the option)."""
    from align.sample import SamplingOptions

    return SamplingOptions(
        num_frames=args.num_frames,
        height=args.height,
        width=args.width,
        num_steps=args.steps,
        guidance_scale=args.guidance,
        batch_size=args.batch_size,
        device=args.device,
        sampler=args.sampler,
        fps=args.fps,
        seed=args.seed,
        seeds_per_prompt=seeds_per_prompt,
        prompt_rewriter=args.prompt_rewriter,
        rewrite_instruction=args.rewrite_instruction,
    )


def prompts_from(args: argparse.Namespace) -> list[str]:
    """The prompts of ``--prompt`` (repeatable) and ``--prompts-file`` (one per line); none, or an
    empty one, is an error that says how to give them (no command but the demo has default prompts)."""
    from align.data.prompts import read_prompts

    prompts = list(args.prompt or [])
    if args.prompts_file:
        prompts += read_prompts(args.prompts_file)
    for i, p in enumerate(prompts):
        if not p.strip():
            raise ValueError(f"--prompt number {i + 1} is empty")
    if not prompts:
        raise ValueError(
            "no prompts given: use --prompt TEXT (repeatable) or --prompts-file FILE (one prompt per line); "
            "only `vidalign demo` has prompts of its own"
        )
    return prompts


def judge_specs(args: argparse.Namespace) -> list[str]:
    """The specs of ``--judge SPEC ...`` then ``--reward-model DIR ...`` (as ``reward:DIR``)."""
    return list(args.judge or []) + [f"reward:{d}" for d in (args.reward_model or [])]


def judges_from(args: argparse.Namespace, command: str) -> list:
    """The judges of the judge options, built now so that a bad spec fails before anything is
    sampled; none is an error that says how to give one."""
    from align.judges import load_judges

    specs = judge_specs(args)
    if not specs:
        raise ValueError(
            f"{command} needs a judge: --judge reward:DIR (a `vidalign reward train` model), "
            "--judge clip:MODEL[@WEIGHTS] or --judge http:URL (repeatable; --judge oracle: the demo's world only)"
        )
    return load_judges(specs, device=args.device)


def one_score(judges: list, scores: dict):
    """One score per video by the one rule of ``align.judges.combine_judges`` (a single judge's
    own scores, several judges' mean z-score), from the scores by judge name."""
    from align.judges import combine_judges

    return combine_judges([scores[j.name] for j in judges])
