"""The embedded demo's loop: the whole alignment loop, small, on a CPU (``vidalign demo``).

It composes the functions the CLI commands call; only the prompts (the synthetic world's) and
the judge standing in for a human (its oracle) are the demo's own.

1. Load the shipped pretrained tiny Sora generator and reward backbone (``align/demo_models``,
   sha256-checked: :mod:`align.demo.pretrain`; ``make pretrained`` remakes them).
2. Sample ``samples_per_prompt`` videos per training prompt from the base (``sample_groups``,
   as ``data pairs`` does); the oracle (:mod:`align.demo.synthetic`) labels them: best vs worst
   of each group become the DPO pairs, every pair within a group the reward-model data.
3. Train the CLIP reward model on the oracle's labels (``reward train``,
   ``recipes/tiny_sora_reward.yaml``) and report its pairwise accuracy on held-out prompts.
4. Align the generator with each objective's shipped recipe (``train``): Diffusion-DPO on the
   pairs, offline RWR on every sample scored by the reward model, and DiffusionNFT online with
   the reward model as its judge (the online objective ``bench/online_rl.py`` favours).
5. Sample base and aligned models on *held-out* prompts with the same seeds and judge them by
   the oracle and by the reward model (``eval``'s judges and paired win rates with CIs).
   The cascade row: the DPO LoRA on the base stage of the shipped cascade (base, TSR, SSR),
   base vs aligned judged by the oracle on the cascade's 16x64x64 output (``_cascade_row``).
6. Write ``report.json``, ``report.md``, plots and a base / aligned GIF grid.

``--quick`` runs the same plumbing with tiny budgets (for tests); its numbers mean nothing.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from align.config import coerce_fields, load_config
from align.data.pairs import pairs_from_groups
from align.data.samples import scored_samples_dataset
from align.data.video import write_grid_gif
from align.demo.pretrain import DEMO_MODELS, demo_models
from align.demo.synthetic import split_scenes
from align.eval.evaluate import judge_winrates
from align.eval.plots import plot_score_histograms, plot_training_curves, plot_winrates
from align.eval.report import write_report
from align.frames import to_uint8
from align.judges import OracleJudge, RewardJudge
from align.models import load_model
from align.sample import generate
from align.training import load_aligned, load_train_config, train
from align.training.reward import train_reward_model
from reward_models.train import RewardTrainConfig, plot_calibration

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
CASCADE = "tiny_sora_cascade"  # the shipped cascade over the shipped base (align/demo_models/)
# the online row is DiffusionNFT, the objective bench/online_rl.py favours on this world (GRPO and
# windowed GRPO stay in that bench: docs/training.md)
METHODS = {"DPO": "tiny_sora_dpo.yaml", "RWR": "tiny_sora_rwr.yaml", "NFT": "tiny_sora_nft.yaml"}
REWARD_RECIPE = "tiny_sora_reward.yaml"


@dataclasses.dataclass
class DemoConfig:
    """The demo's own knobs; each stage's settings come from its shipped recipe."""

    seed: int = 0
    samples_per_prompt: int = 4
    pair_rounds: int = 2  # passes over the training prompts when building pairs
    sample_steps: int = 20
    guidance_scale: float = 4.0
    heldout_fraction: float = 0.2  # share of the world's scenes held out for the evaluation
    eval_seeds_per_prompt: int = 5
    # methods evaluated at their own training guidance, each against the base at that guidance
    # (NFT's rollouts run without CFG; the others are evaluated at guidance_scale)
    eval_guidance: dict = dataclasses.field(default_factory=lambda: {"NFT": 1.0})
    cascade_seeds_per_prompt: int = 2  # the cascade row: held-out prompts x this many seeds (0: no row)
    tie_margin: float = 0.005  # |score gap| at or below which a comparison is a tie
    max_prompts: int = 0  # > 0: only that many training and held-out prompts (quick runs)
    # recipe keys to change per stage: {"DPO": {...}, "RWR": {...}, "reward": {...}}
    recipe_overrides: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def quick(cls) -> DemoConfig:
        steps = {"max_steps": 3, "train_batch_size": 4}
        nft = {"max_steps": 2, "group_size": 2, "prompts_per_round": 2, "sample_steps": 2, "train_batch_size": 4}
        nft |= {"gradient_accumulation_steps": 1, "rollout_batch_size": 4, "train_timestep_fraction": 0.5}
        return cls(
            samples_per_prompt=2,
            sample_steps=2,
            eval_seeds_per_prompt=1,
            cascade_seeds_per_prompt=1,
            max_prompts=12,
            recipe_overrides={"DPO": steps, "RWR": steps, "NFT": nft, "reward": {"epochs": 1}},
        )


def parse_overrides(items: list[str]) -> dict:
    """``["samples_per_prompt=2", "DPO.beta=1000"]`` -> DemoConfig changes; ``STAGE.KEY=VALUE``
    changes a key of that stage's recipe (checked when the stage's config is built)."""
    raw: dict[str, str] = {}
    stages: dict[str, dict] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE or STAGE.KEY=VALUE")
        stage, dot, rkey = key.partition(".")
        if dot:
            if stage not in (*METHODS, "reward"):
                raise ValueError(f"--set {item!r}: unknown stage {stage!r}; use one of {[*METHODS, 'reward']}")
            stages.setdefault(stage, {})[rkey] = value.strip()
        else:
            raw[key] = value.strip()
    out = coerce_fields(DemoConfig, raw, "--set")
    if stages:
        out["recipe_overrides"] = stages
    return out


def _prompts(cfg: DemoConfig) -> tuple[list[str], list[str]]:
    """The world's training and held-out prompts (``max_prompts`` of each when set)."""
    train_scenes, heldout_scenes = split_scenes(cfg.heldout_fraction, seed=cfg.seed)
    n = cfg.max_prompts or None
    return [s.prompt for s in train_scenes][:n], [s.prompt for s in heldout_scenes][:n]


def sample_groups(
    model,
    prompts: list[str],
    samples_per_prompt: int,
    seed: int = 0,
    num_steps: int = 20,
    guidance_scale: float = 4.0,
    progress: bool = True,
    *,
    score: Callable[[np.ndarray, Sequence[str]], np.ndarray],
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """``k`` samples per prompt (consecutive rows form a group) and their scores:
    ``(all_prompts, videos uint8 (N*k, T, H, W, C), totals (N, k))``. ``score(videos,
    prompts)`` (a judge's ``score``, ``align.judges``) returns one number per video."""
    if not prompts:
        raise ValueError("sample_groups: empty prompt list")
    if samples_per_prompt < 2:
        raise ValueError(f"samples_per_prompt must be >= 2, got {samples_per_prompt}")
    k = samples_per_prompt
    all_prompts = [p for p in prompts for _ in range(k)]
    seeds = [seed * 1_000_003 + i for i in range(len(all_prompts))]
    videos = to_uint8(generate(model, all_prompts, seeds, num_steps, guidance_scale, progress=progress, desc="pairs"))
    flat = np.asarray(score(videos, all_prompts), dtype=np.float64).reshape(-1)
    if flat.shape != (len(all_prompts),):
        raise ValueError(f"sample_groups: the judge returned {flat.size} scores for {len(all_prompts)} videos")
    bad = np.flatnonzero(~np.isfinite(flat))
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"sample_groups: the judge gave {bad.size} non-finite scores, first for video {i} "
            f"(prompt {all_prompts[i]!r}, seed {seeds[i]})"
        )
    return all_prompts, videos, flat.reshape(len(prompts), k)


def _collect(cfg: DemoConfig, model, prompts: list[str], out: Path) -> tuple:
    """Stage 2: the base's samples of the training prompts, labelled by the oracle, as DPO pairs
    (best vs worst of each group) and reward-model pairs (every pair within a group)."""
    all_prompts, videos, totals = sample_groups(
        model,
        prompts * cfg.pair_rounds,
        cfg.samples_per_prompt,
        seed=cfg.seed + 1,
        num_steps=cfg.sample_steps,
        guidance_scale=cfg.guidance_scale,
        progress=True,
        score=OracleJudge().score,
    )
    pairs = pairs_from_groups(all_prompts, videos, totals, "best_worst", seed=cfg.seed)
    pairs.save_to_disk(str(out / "preference_data"))
    pairs_from_groups(all_prompts, videos, totals, "all", seed=cfg.seed).save_to_disk(str(out / "reward_data"))
    return all_prompts, videos, pairs["preference"]


def _stage_configs(cfg: DemoConfig, out: Path, model_dir: Path, backbone: Path) -> dict:
    """The config of every training stage, from its shipped recipe with the demo's paths and
    ``recipe_overrides``; built before anything runs, so a bad override fails at once."""
    over = {"dataset": str(out / "reward_data"), "output_dir": str(out), "name": "reward_model"}
    over |= {"init_from": str(backbone), "seed": cfg.seed, **cfg.recipe_overrides.get("reward", {})}
    configs = {"reward": load_config(RewardTrainConfig, RECIPES / REWARD_RECIPE, over)}
    data = {  # what each objective learns from
        "DPO": {"dataset": str(out / "preference_data")},
        "RWR": {"dataset": str(out / "rwr_samples")},
        # online: the training prompts, the reward model as the reward, the oracle as the held-out judge
        "NFT": {
            "prompts_file": str(out / "train_prompts.txt"),
            "judges": [f"reward:{out / 'reward_model' / 'best'}"],
            "eval_judges": ["oracle"],
        },
    }
    for method, recipe in METHODS.items():
        over = {"model": str(model_dir), "output_dir": str(out), "name": method.lower(), "seed": cfg.seed}
        over |= {"checkpointing_steps": 0, **data[method], **cfg.recipe_overrides.get(method, {})}
        configs[method] = load_train_config(RECIPES / recipe, over)
    return configs


def _align(configs: dict, out: Path, reward_dir: Path, samples) -> dict[str, Path]:
    """Stage 4: one run per objective; returns method -> run directory. RWR trains on every
    base sample scored by the reward model (what ``data samples`` writes)."""
    prompts, videos = samples
    rewards = RewardJudge(reward_dir).score(videos, prompts)
    scored_samples_dataset(prompts, videos, rewards).save_to_disk(str(out / "rwr_samples"))
    return {method: train(configs[method]) for method in METHODS}


def _base_key(cfg: DemoConfig, method: str) -> str:
    """The base arm ``method`` is compared with: ``base``, or ``base@G`` at its own guidance G."""
    g = float(cfg.eval_guidance.get(method, cfg.guidance_scale))
    return "base" if g == cfg.guidance_scale else f"base@{g:g}"


def _evaluate(cfg: DemoConfig, model_dir: Path, runs: dict[str, Path], reward_dir: Path, prompts: list[str]):
    """Stage 5: same prompts and seeds for the base and every aligned model; the oracle's and
    the reward model's paired win rates (``eval``'s ``judge_winrates``). A method in
    ``eval_guidance`` is sampled at that guidance and compared with the base at the same one."""
    prompts = [p for p in prompts for _ in range(cfg.eval_seeds_per_prompt)]
    seeds = [10_000 + i for i in range(len(prompts))]

    def sample(model, method, desc):
        g = float(cfg.eval_guidance.get(method, cfg.guidance_scale))
        return to_uint8(generate(model, prompts, seeds, cfg.sample_steps, g, progress=True, desc=desc))

    base = load_model(model_dir)
    arms = {_base_key(cfg, m): m for m in ("base", *runs)}  # each base arm once, at its method's guidance
    videos = {key: sample(base, m, f"eval {key}") for key, m in arms.items()}
    for method, run in runs.items():
        videos[method] = sample(load_aligned(model_dir, run / "lora"), method, f"eval {method}")
    judges = {"oracle": OracleJudge(), "reward_model": RewardJudge(reward_dir)}
    scores = {m: {k: j.score(v, prompts) for k, j in judges.items()} for m, v in videos.items()}
    results = {m: judge_winrates(scores[_base_key(cfg, m)], scores[m], cfg.tie_margin, cfg.seed) for m in runs}
    oracle = judges["oracle"]
    attrs = {m: oracle.attribute_scores(v, prompts) for m, v in videos.items()}
    for m in runs:
        b = _base_key(cfg, m)
        results[m]["winrate"]["oracle"]["per_attribute"] = {
            a: {
                "base": float(np.mean([s[a] for s in attrs[b]])),
                "aligned": float(np.mean([s[a] for s in attrs[m]])),
            }
            for a in attrs[b][0]
            if a != "total"
        }
        for w in results[m]["winrate"].values():
            w["vs"] = b  # the base arm: "base" or "base@G" (eval_guidance)
    return prompts, videos, scores, results


def _cascade_row(cfg: DemoConfig, cascade_dir: Path, dpo_run: Path, prompts: list[str]) -> dict:
    """The cascade row: the demo's DPO LoRA (trained on the base's own samples) on the base stage
    of the shipped cascade (``tiny_sora_cascade``: TSR then SSR, frozen), base vs aligned judged
    by the oracle on the cascade's final 16x64x64 videos (the oracle's lengths scale with the
    frame size and its speeds with the clip length, so it judges them as they are, no resampling)."""
    t0 = time.time()
    prompts = [p for p in prompts for _ in range(cfg.cascade_seeds_per_prompt)]
    seeds = [20_000 + i for i in range(len(prompts))]
    oracle = OracleJudge()
    scores = {}
    for arm, lora in (("base", None), ("aligned", dpo_run / "lora")):
        model = load_aligned(cascade_dir, lora)
        args = (cfg.sample_steps, cfg.guidance_scale)
        videos = to_uint8(generate(model, prompts, seeds, *args, progress=True, desc=f"cascade {arm}"))
        scores[arm] = {"oracle": oracle.score(videos, prompts)}
    wr = judge_winrates(scores["base"], scores["aligned"], cfg.tie_margin, cfg.seed)["winrate"]["oracle"]
    return {
        "what": "the DPO LoRA on the base stage; TSR + SSR frozen; the oracle on the final videos",
        "video_size": "x".join(map(str, videos.shape[1:4])),
        "oracle_winrate": wr["rate"],
        "oracle_winrate_ci95": wr["ci95"],
        "wins": wr["wins"],
        "ties": wr["ties"],
        "losses": wr["losses"],
        "comparisons": wr["n"],
        "oracle_mean_base": wr["mean_score"]["base"],
        "oracle_mean_aligned": wr["mean_score"]["aligned"],
        "seconds": round(time.time() - t0, 1),
    }


def _artifacts(cfg: DemoConfig, out: Path, runs, winrate, scores, rm_summary, prompts, videos) -> dict:
    """Stage 6: training curves, win rates, oracle score histograms, the reward model's
    calibration and the side-by-side grid."""
    arts = {
        f"training_curves_{m.lower()}": plot_training_curves(
            r / "metrics.jsonl", out / f"training_curves_{m.lower()}.png"
        )
        for m, r in runs.items()
    }
    arts["winrates"] = plot_winrates(
        {f"{m} vs {winrate[j][m]['vs']} ({j.replace('_', ' ')})": winrate[j][m] for j in winrate for m in runs},
        out / "winrates.png",
    )
    arts["score_histogram"] = plot_score_histograms(
        {m: s["oracle"] for m, s in scores.items()}, out / "oracle_scores.png"
    )
    if rm_summary.get("calibration"):
        arts["reward_calibration"] = plot_calibration(rm_summary["calibration"], out / "reward_calibration.png")
    cols = list(videos)
    pick = np.arange(0, len(prompts), max(1, cfg.eval_seeds_per_prompt))[:8]
    arts["grid"] = write_grid_gif(
        [[videos[c][i] for c in cols] for i in pick],
        out / "base_vs_aligned.gif",
        row_labels=[prompts[i].removeprefix("a ").replace(" background", "") for i in pick],
        col_labels=cols,
    )
    return {k: Path(v).name for k, v in arts.items()}


def run_demo(
    out: str | Path = "runs/demo", quick: bool = False, overrides: dict | None = None, models: str | Path = DEMO_MODELS
) -> dict:
    """Run the demo end to end; returns the report dict (also written to ``out``).

    ``overrides``: DemoConfig fields to change (see ``parse_overrides``); the report's
    ``config`` records them. ``models``: where the shipped models are."""
    cfg = DemoConfig.quick() if quick else DemoConfig()
    over = dict(overrides or {})
    stages = {**cfg.recipe_overrides}
    for stage, keys in over.pop("recipe_overrides", {}).items():
        stages[stage] = {**stages.get(stage, {}), **keys}
    cfg = dataclasses.replace(cfg, **over, recipe_overrides=stages)
    out = Path(out)
    torch.manual_seed(cfg.seed)
    timings: dict[str, float] = {}
    t_all = t0 = time.time()

    model_dir, backbone = demo_models(models)
    configs = _stage_configs(cfg, out, model_dir, backbone)
    out.mkdir(parents=True, exist_ok=True)
    train_prompts, heldout_prompts = _prompts(cfg)
    (out / "train_prompts.txt").write_text("".join(p + "\n" for p in train_prompts))
    all_prompts, videos, prefs = _collect(cfg, load_model(model_dir), train_prompts, out)
    timings["pairs"], t0 = time.time() - t0, time.time()
    rm_run = train_reward_model(configs["reward"])
    rm_summary = json.loads((rm_run / "summary.json").read_text())
    timings["reward_model"], t0 = time.time() - t0, time.time()
    runs = _align(configs, out, rm_run / "best", (all_prompts, videos))
    for method, run in runs.items():
        timings[method.lower()] = json.loads((run / "summary.json").read_text())["train_s"]
    timings["align"], t0 = time.time() - t0, time.time()
    prompts, eval_videos, scores, results = _evaluate(cfg, model_dir, runs, rm_run / "best", heldout_prompts)
    timings["eval"] = time.time() - t0
    winrate = {j: {m: results[m]["winrate"][j] for m in runs} for j in ("oracle", "reward_model")}
    cascade = (
        _cascade_row(cfg, Path(models) / CASCADE, runs["DPO"], heldout_prompts) if cfg.cascade_seeds_per_prompt else {}
    )
    if cascade:
        timings["cascade"] = cascade["seconds"]
    arts = _artifacts(cfg, out, runs, winrate, scores, rm_summary, prompts, eval_videos)
    timings["total"] = time.time() - t_all
    report = {
        "winrate": winrate,
        "judge_agreement": {m: results[m].get("agreement") for m in runs},
        "reward_model": {
            "accuracy": rm_summary["best_eval_accuracy"],
            "accuracy_ci95": rm_summary.get("best_eval_accuracy_ci95"),  # bootstrap over held-out prompts
            "accuracy_with_ties": rm_summary.get("best_eval_accuracy_with_ties"),
            "heldout": "all within-group pairs of held-out training prompts, labelled by the oracle",
            "eval_pairs": rm_summary["eval_pairs"],
            "train_pairs": rm_summary["train_pairs"],
        },
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "data": {
            "pairs": len(prefs),
            "ties": prefs.count("tie"),
            "train_prompts": len(train_prompts),
            "samples": len(all_prompts),
            "heldout_prompts": len(heldout_prompts),
            "comparisons": len(prompts),
        },
        "config": {"quick": quick, **dataclasses.asdict(cfg)},
        "artifacts": arts,
        **({"cascade": cascade} if cascade else {}),
    }
    write_report(report, out)
    return report
