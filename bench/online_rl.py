"""Online RL on the demo world: held-out oracle score against wall-clock training time for GRPO,
windowed GRPO (MixGRPO's sliding SDE window) and DiffusionNFT, at equal time budgets, in one run.

    python -m bench.online_rl [--budget-s 240] [--set nft.learning_rate=0.01] [--out bench/online_rl.json]

Each method runs the real trainer from its shipped recipe (``recipes/tiny_sora_grpo.yaml``,
the same with ``sde_window_size``, ``recipes/tiny_sora_nft.yaml``) on the shipped tiny generator
and the demo world's training prompts, with the world's oracle as the training judge (so the
bench measures how fast each objective optimises a reward, not how good a reward model is), a
checkpoint on every round boundary, and is stopped (SIGTERM: a checkpoint, then exit) once
``--budget-s`` seconds of training have passed; the run finishes the update it is in. Every
checkpoint's LoRA then samples the world's *held-out* prompts (``--eval-prompts``, one fixed
seed each, ``--eval-steps`` ODE steps, the method's own training guidance: GRPO's 4, NFT's 1)
and the oracle scores them; the base is scored the same way at each guidance. A point's time
is the run's cumulative ``step_time_s`` (rollouts, scoring and training; not model loading,
checkpoint writing or the evaluation) at the checkpoint's step.

``ratios``: for each method, the first time its held-out score reaches GRPO's final held-out
score, over GRPO's time at that final point (null when it never does). Goal for NFT: <= 1/3.
``gains`` and ``gain_ratios``: the same on each method's gain over the base at its own evaluation
guidance (GRPO samples with CFG 4, NFT without, and the base scores differ between the two).
``pass_ratios``: the first ratio on denoiser forward-pass equivalents (:func:`cost`) instead of
seconds: wall-clock on a CPU shared with other jobs varies many-fold between runs.
The numbers are one run's on a shared CPU: noisy, reported as measured.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
MODEL = Path(__file__).resolve().parents[1] / "align" / "demo_models" / "tiny_sora"
# method -> (recipe, overrides): the shipped recipes; windowed GRPO trains a 3-step SDE window
METHODS = {
    "grpo": ("tiny_sora_grpo.yaml", {}),
    "grpo_window": ("tiny_sora_grpo.yaml", {"sde_window_size": 3, "train_timestep_fraction": 1.0}),
    "nft": ("tiny_sora_nft.yaml", {}),
}


def _config(method: str, tmp: Path, overrides: dict):
    """The method's config: its recipe, the demo world's prompts and the oracle, a checkpoint on
    every round boundary, no step limit (the time budget stops it)."""
    from align.training import load_train_config
    from align.training.core import micro_batch_size

    recipe, own = METHODS[method]
    over = {"model": str(MODEL), "output_dir": str(tmp / "runs"), "name": method, "seed": 0}
    over |= {"prompts_file": str(tmp / "train_prompts.txt"), "judges": ["oracle"], "eval_judges": []}
    over |= {"max_steps": 100_000, "checkpoints_total_limit": 100_000, "progress": False, **own, **overrides}
    cfg = load_train_config(RECIPES / recipe, over | {"checkpointing_steps": 0})
    if cfg.objective == "grpo":
        from align.training.grpo import check_layout
    else:
        from align.training.nft import check_layout
    per_round = check_layout(cfg, micro_batch_size(cfg, 1), 1)
    return load_train_config(RECIPES / recipe, over | {"checkpointing_steps": per_round})


def cost(cfg) -> dict:
    """Denoiser forward-pass equivalents (a backward = 2 forwards) of a round: ``sampling`` (every
    rollout's model calls, x2 with CFG) and ``train_per_step`` (per optimizer step: GRPO's trained
    steps with CFG and the KL reference, NFT's pass with gradients, the old policy's and the
    reference's), and ``steps_per_round``: a machine-independent clock beside the wall-clock one."""
    from align.training.core import micro_batch_size

    g = 2 if cfg.guidance_scale != 1.0 else 1
    n, trained = cfg.rollouts_per_round, cfg.inner_epochs * cfg.trained_steps
    if cfg.objective == "grpo":
        from align.training.grpo import check_layout

        per_sample = 3 * g + (g if cfg.kl_weight > 0 else 0)
    else:
        from align.training.nft import check_layout

        per_sample = 3 + 1 + (1 if cfg.kl_weight > 0 else 0)
    steps = check_layout(cfg, micro_batch_size(cfg, 1), 1)
    return {
        "sampling": n * cfg.sample_steps * g,
        "train_per_step": n * trained * per_sample / steps,
        "steps_per_round": steps,
    }


def _passes(c: dict, step: int) -> float:
    """Forward-pass equivalents spent by the end of optimizer step ``step`` (a round's rollouts
    are spent before its first step)."""
    return -(-step // c["steps_per_round"]) * c["sampling"] + step * c["train_per_step"]


def _train(cfg, budget_s: float) -> Path:
    """Train until ``budget_s`` seconds have passed (SIGTERM from a timer: the trainer writes a
    checkpoint at the end of its update and exits)."""
    from align.training import train

    timer = threading.Timer(budget_s, lambda: os.kill(os.getpid(), signal.SIGTERM))
    timer.start()
    try:
        train(cfg)
    except SystemExit:
        pass
    finally:
        timer.cancel()
    return Path(cfg.output_dir) / cfg.name


@torch.no_grad()
def _score(model_dir: Path, lora: Path | None, prompts: list[str], steps: int, guidance: float) -> float:
    """The oracle's mean score of the held-out prompts sampled (seed i for prompt i) with ``lora``."""
    from align.frames import to_uint8
    from align.judges import OracleJudge
    from align.sample import generate
    from align.training import load_aligned

    model = load_aligned(model_dir, lora)
    videos = to_uint8(generate(model, prompts, list(range(len(prompts))), steps, guidance))
    return float(np.mean(OracleJudge().score(videos, prompts)))


def _curve(run: Path, prompts: list[str], steps: int, guidance: float, c: dict) -> list[dict]:
    """``{step, round, time_s, score, passes}`` of every checkpoint of ``run`` (time: cumulative step
    times; passes: :func:`cost` ``c``'s forward-pass equivalents)."""
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    elapsed = np.cumsum([r["step_time_s"] for r in rows])
    out = []
    for ckpt in sorted(run.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1])):
        step = int(ckpt.name.split("-")[1])
        score = _score(MODEL, ckpt / "lora", prompts, steps, guidance)
        point = {"step": step, "round": rows[step - 1]["round"], "time_s": float(elapsed[step - 1]), "score": score}
        out.append(point | {"passes": _passes(c, step)})
    return out


def time_to_reach(curve: list[dict], target: float) -> float | None:
    """The first time at which the curve's score is >= ``target``; None when never."""
    return next((p["time_s"] for p in curve if p["score"] >= target), None)


def ratios(res: dict) -> dict:
    """``ratios``: time for each method to reach GRPO's final held-out score over GRPO's time (None:
    never). ``gains``: each method's final score minus the base's at its evaluation guidance, and
    ``gain_ratios``: the same time ratio on gains over the base (the methods are evaluated at their
    own guidance, whose base scores differ). With GRPO's final gain <= 0 the ratios are degenerate
    (``grpo_improved``: false): any curve that starts at the base reaches GRPO's score at once."""
    grpo = res["curves"]["grpo"][-1]
    out: dict = {"ratios": {}, "pass_ratios": {}, "gains": {}, "gain_ratios": {}}
    base = {m: res["base"][str(res["eval_guidance"][m])] for m in res["curves"]}
    target_gain = grpo["score"] - base["grpo"]
    for method, curve in res["curves"].items():
        t = time_to_reach(curve, grpo["score"])
        out["ratios"][f"time to GRPO's final score: {method} / grpo"] = None if t is None else t / grpo["time_s"]
        p = next((q["passes"] for q in curve if q["score"] >= grpo["score"]), None)
        out["pass_ratios"][f"passes to GRPO's final score: {method} / grpo"] = None if p is None else p / grpo["passes"]
        out["gains"][method] = curve[-1]["score"] - base[method]
        gained = [dict(p, score=p["score"] - base[method]) for p in curve]
        t = time_to_reach(gained, target_gain) if target_gain > 0 else None
        out["gain_ratios"][f"time to GRPO's final gain: {method} / grpo"] = None if t is None else t / grpo["time_s"]
    out["grpo_improved"] = target_gain > 0
    return out


def _plot(res: dict, out_png: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.subplots()
    for (method, curve), color in zip(res["curves"].items(), ("tab:blue", "tab:orange", "tab:green")):
        g = res["eval_guidance"][method]
        pts = [(0.0, res["base"][str(g)])] + [(p["time_s"], p["score"]) for p in curve]
        ax.plot(*zip(*pts), marker="o", color=color, label=f"{method} (guidance {g:g})")
    ax.axhline(res["grpo_final_score"], color="gray", linestyle="--", linewidth=1, label="GRPO's final score")
    ax.set_xlabel("training time (s): rollouts + scoring + updates")
    ax.set_ylabel("held-out oracle score")
    ax.set_title(f"online RL on the demo world, {res['budget_s']:g} s each", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)


def _overrides(items: list[str]) -> dict[str, dict]:
    """``["nft.learning_rate=0.01"]`` -> ``{"nft": {"learning_rate": "0.01"}}`` (checked by the recipe parser)."""
    out: dict[str, dict] = {}
    for item in items:
        key, sep, value = item.partition("=")
        method, dot, rkey = key.partition(".")
        if not (sep and dot and method in METHODS):
            raise SystemExit(f"--set {item!r}: expected METHOD.KEY=VALUE, METHOD one of {sorted(METHODS)}")
        out.setdefault(method, {})[rkey] = value
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget-s", type=float, default=240.0, help="training seconds per method")
    ap.add_argument("--eval-prompts", type=int, default=24, help="held-out prompts scored per checkpoint")
    ap.add_argument("--eval-steps", type=int, default=20, help="ODE steps of the evaluation samples")
    ap.add_argument("--set", action="append", default=[], help="METHOD.KEY=VALUE: a recipe key of one method")
    ap.add_argument("--out", default="bench/online_rl.json")
    ap.add_argument("--work-dir", default=None, help="keep the runs here (default: a temporary folder)")
    args = ap.parse_args(argv)
    from align.demo.synthetic import split_scenes

    overrides = _overrides(args.set)
    train_scenes, heldout = split_scenes(0.2, seed=0)
    prompts = [s.prompt for s in heldout][: args.eval_prompts]
    res: dict = {"budget_s": args.budget_s, "eval_prompts": len(prompts), "eval_steps": args.eval_steps}
    res |= {"machine": {"threads": torch.get_num_threads(), "torch": torch.__version__}, "overrides": overrides}
    res |= {"curves": {}, "eval_guidance": {}, "settings": {}, "cost": {}}
    t0 = time.time()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(args.work_dir or d)
        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / "train_prompts.txt").write_text("\n".join(s.prompt for s in train_scenes) + "\n")
        for method in METHODS:
            cfg = _config(method, tmp, overrides.get(method, {}))
            run = _train(cfg, args.budget_s)
            res["eval_guidance"][method] = cfg.guidance_scale
            res["settings"][method] = {k: v for k, v in vars(cfg).items() if isinstance(v, (int, float, str, bool))}
            res["cost"][method] = cost(cfg)
            res["curves"][method] = _curve(run, prompts, args.eval_steps, cfg.guidance_scale, res["cost"][method])
            print(f"[bench] {method}: {json.dumps(res['curves'][method])}", flush=True)
    guidances = sorted(set(res["eval_guidance"].values()))
    res["base"] = {str(g): _score(MODEL, None, prompts, args.eval_steps, g) for g in guidances}
    grpo = res["curves"]["grpo"][-1]
    res["grpo_final_score"], res["grpo_final_time_s"] = grpo["score"], grpo["time_s"]
    res |= ratios(res)
    res["bench_wall_s"] = time.time() - t0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    _plot(res, out.with_suffix(".png"))
    for k, v in (res["ratios"] | res["pass_ratios"] | res["gain_ratios"]).items():
        print(f"{k:50s} {'never' if v is None else f'{v:6.3f}'}")
    print(f"gains over the base at the budget: {json.dumps(res['gains'])}; GRPO improved: {res['grpo_improved']}")
    print(f"(base {res['base']}; GRPO final {grpo['score']:.4f} at {grpo['time_s']:.0f} s; written to {out})")
    return res


if __name__ == "__main__":
    main()
