"""``vidalign reward train | eval | score``: CLIP-based video reward models (``reward_models``)."""

from __future__ import annotations

import argparse
import json


def add_parser(sub) -> None:
    """Register ``reward`` and its subcommands."""
    rw = sub.add_parser("reward", help="CLIP-based video reward models: train, eval, score")
    rsub = rw.add_subparsers(dest="reward_command", required=True)
    rt = rsub.add_parser(
        "train",
        help="train on a preference dataset (Bradley-Terry with ties)",
        description="Train a reward model from RECIPE; recipe keys can be overridden (--epochs 3).",
    )
    rt.add_argument("recipe")
    rt.set_defaults(run=run_train, name="reward train", overrides_ok=True)
    rev = rsub.add_parser("eval", help="pairwise accuracy (with and without ties) and a calibration plot")
    rev.add_argument("dataset")
    rev.add_argument("--model", required=True, help="a reward model directory (`vidalign reward train`)")
    rev.add_argument("--out", default="runs/reward_eval")
    rev.add_argument(
        "--tie-threshold", type=float, default=0.1, help="|score difference| below which a tie is predicted"
    )
    rev.add_argument("--skip-bad-rows", action="store_true")
    rev.set_defaults(run=run_eval, name="reward eval")
    rsc = rsub.add_parser("score", help="score video files against a prompt")
    rsc.add_argument("--model", required=True, help="a reward model directory (`vidalign reward train`)")
    rsc.add_argument("--prompt", required=True)
    rsc.add_argument("--video", nargs="+", required=True)
    rsc.set_defaults(run=run_score, name="reward score")


def run_train(args: argparse.Namespace) -> int:
    from align.config import load_config
    from align.training.reward import train_reward_model
    from reward_models.train import RewardTrainConfig

    run = train_reward_model(load_config(RewardTrainConfig, args.recipe, args.overrides))
    summary = json.loads((run / "summary.json").read_text())
    print(f"reward model written to {run / 'best'} (held-out accuracy {summary['best_eval_accuracy']:.3f})")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    """Accuracy on a dataset, written to ``--out``; print the headline numbers as JSON."""
    from align.training.reward import load_pairs
    from reward_models.evaluate import SHOWN, evaluate_to_dir
    from reward_models.model import load_reward_model

    model = load_reward_model(args.model)
    data = load_pairs(args.dataset, "skip" if args.skip_bad_rows else "error")
    summary = evaluate_to_dir(model, data, args.out, args.tie_threshold, model_dir=args.model)
    print(json.dumps({k: summary[k] for k in SHOWN}))
    return 0


def run_score(args: argparse.Namespace) -> int:
    """Print each video file's score for the prompt. Under ``accelerate launch`` each process
    scores every N-th file and the main process prints them all, in order."""
    from align import distributed
    from align.data.video import read_video
    from reward_models.evaluate import score_videos
    from reward_models.model import load_reward_model

    if not args.prompt.strip():
        raise ValueError("--prompt is empty")
    model = load_reward_model(args.model)
    mine = distributed.shard(len(args.video))
    local = score_videos(model, [read_video(args.video[i]) for i in mine], args.prompt) if mine else []
    scores = distributed.gather(mine, [float(x) for x in local], len(args.video))
    if not distributed.is_main():
        return 0
    for f, sc in zip(args.video, scores):
        print(f"{sc:10.4f}  {f}")
    return 0
