"""GRPO on the tiny model: one round's time split into rollout / reward / train, and the train
time with ``train_timestep_fraction`` 0.5 over 1.0, measured in one run.

    python -m bench.grpo [--out bench/grpo.json]

Runs the real trainer (``align.training.grpo.train``) twice on a randomly initialised
TinySora (the default config) with a fresh tiny reward model as the judge: rounds of
``--prompts`` prompts x ``--group-size`` rollouts of ``--steps`` SDE steps, one update per
micro-batch of rollouts with all its trained steps. The times come from the run's
``summary.json`` (``round_times``): the median over the rounds after the first (warm-up) of
``--repeats`` runs per fraction, interleaved (the last round of a run has no complete train
time and is left out). Training half the steps should take
about half the train time (~0.5x); rollout and reward times do not depend on it. Absolute
times vary between runs on shared CPUs; the ratios are the result.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch

from align.models.tiny_sora import TinySora, TinySoraConfig
from align.training import build_config, train

PROMPTS = ["a red square moving left on a black background", "a blue circle moving up on a gray background"]


def _round_times(tmp: Path, fraction: float, args, repeat: int) -> list[dict]:
    """Rollout / reward / train seconds of each round after the first of one run."""
    steps = max(1, round(fraction * args.steps))
    cfg = build_config(
        objective="grpo",
        model=str(tmp / "model"),
        output_dir=str(tmp / "runs"),
        name=f"fraction_{fraction}_{repeat}",
        prompts_file=str(tmp / "prompts.txt"),
        judges=[f"reward:{tmp / 'rm'}"],
        group_size=args.group_size,
        prompts_per_round=args.prompts,
        sample_steps=args.steps,
        train_timestep_fraction=fraction,
        train_batch_size=args.prompts * args.group_size,
        rollout_batch_size=args.prompts * args.group_size,
        gradient_accumulation_steps=steps,  # one update per round
        max_steps=args.rounds,
        checkpointing_steps=0,
        progress=False,
    )
    return json.loads((train(cfg) / "summary.json").read_text())["round_times"][1:]


def _median(rounds: list[dict]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in rounds) for k in ("rollout_s", "reward_s", "train_s")}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=2, help="prompts per round")
    ap.add_argument("--group-size", type=int, default=4, help="rollouts per prompt")
    ap.add_argument("--steps", type=int, default=10, help="SDE steps per rollout")
    ap.add_argument("--rounds", type=int, default=4, help="rounds per run (>= 3)")
    ap.add_argument("--repeats", type=int, default=2, help="runs per fraction, interleaved")
    ap.add_argument("--out", default="bench/grpo.json")
    args = ap.parse_args(argv)
    if args.rounds < 3:
        ap.error("--rounds must be >= 3 (the first is warm-up, the last has no complete train time)")
    from reward_models.model import RewardModelConfig, VideoRewardModel

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        torch.manual_seed(0)
        TinySora(TinySoraConfig()).save_pretrained(tmp / "model")
        VideoRewardModel(RewardModelConfig(pooling="mean")).save_pretrained(tmp / "rm")
        (tmp / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
        times: dict[float, list] = {1.0: [], 0.5: []}
        for rep in range(args.repeats):
            for fraction in times:
                times[fraction] += _round_times(tmp, fraction, args, rep)
    full, half = _median(times[1.0]), _median(times[0.5])
    total = sum(full.values())
    res = {
        "machine": {"threads": torch.get_num_threads(), "torch": torch.__version__},
        "rollouts_per_round": args.prompts * args.group_size,
        "sde_steps": args.steps,
        "rounds_per_fraction": len(times[1.0]),
        "seconds": {"fraction_1.0": full, "fraction_0.5": half},
        "ratios": {
            "rollout / round (fraction 1.0)": full["rollout_s"] / total,
            "reward / round (fraction 1.0)": full["reward_s"] / total,
            "train / round (fraction 1.0)": full["train_s"] / total,
            "train fraction 0.5 / fraction 1.0": half["train_s"] / full["train_s"],
        },
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    for k, v in res["ratios"].items():
        print(f"{k:36s} {v:6.3f}")
    print(f"(seconds: {json.dumps(res['seconds'])}; written to {out})")
    return res


if __name__ == "__main__":
    main()
