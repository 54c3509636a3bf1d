"""The embedded default: the whole alignment loop, small, on a CPU (``vidalign demo``).

1. Pretrain a tiny Sora generator on the synthetic world (cached by config hash).
2. Sample several videos per training prompt from the base; the oracle judge (a stand-in
   for a human annotator, never a training loss) labels best vs worst as a preference pair.
3. Align the generator with Diffusion-DPO through LoRA on that preference dataset.
4. Sample base and aligned on *held-out* prompts with the same seeds; the oracle's paired
   win rate with a bootstrap 95% CI is the result.
5. Write ``report.json``, ``report.md``, plots and a base-vs-aligned GIF grid.

``--quick`` runs the same plumbing with tiny budgets (for tests); its numbers mean nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch

from align.config import PretrainConfig, TrainConfig
from align.data.pairs import oracle_preference_dataset
from align.data.synthetic import split_scenes
from align.data.video import write_grid_gif
from align.eval.evaluate import oracle_winrate, sample_paired
from align.eval.plots import plot_score_histograms, plot_training_curves, plot_winrates
from align.eval.report import write_report
from align.models import load_model
from align.pretrain import pretrain
from align.train import load_aligned, train


@dataclasses.dataclass
class DemoConfig:
    """Budgets of the demo. ``quick()`` shrinks every one of them."""

    seed: int = 0
    pretrain: PretrainConfig = dataclasses.field(default_factory=PretrainConfig)
    samples_per_prompt: int = 4
    pair_rounds: int = 2  # passes over the training prompts when building pairs
    sample_steps: int = 20
    guidance_scale: float = 4.0
    dpo_steps: int = 200
    dpo_batch_size: int = 16
    beta: float = 500.0
    learning_rate: float = 1e-3
    lora_rank: int = 8
    eval_seeds_per_prompt: int = 5
    heldout_fraction: float = 0.2

    @classmethod
    def quick(cls) -> DemoConfig:
        return cls(
            pretrain=PretrainConfig(
                num_videos=64,
                vae_steps=3,
                vae_batch_size=8,
                denoiser_steps=3,
                denoiser_batch_size=8,
                model={"dim": 64, "depth": 3, "vae_channels": 8},
            ),
            samples_per_prompt=2,
            pair_rounds=1,
            sample_steps=2,
            dpo_steps=3,
            dpo_batch_size=4,
            eval_seeds_per_prompt=1,
        )


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def run_demo(
    out: str | Path = "runs/demo",
    quick: bool = False,
    cache_dir: str | Path = "runs/cache",
    progress: bool = True,
    model: str | Path | None = None,
) -> dict:
    """Run the demo end to end; returns the report dict (also written to ``out``).

    ``model``: a TinySora directory to align instead of pretraining one."""
    cfg = DemoConfig.quick() if quick else DemoConfig()
    out, cache_dir = Path(out), Path(cache_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    timings: dict[str, float] = {}
    t_all = time.time()

    # 1. pretrained generator (cached between runs)
    t0 = time.time()
    pre = dataclasses.replace(cfg.pretrain, seed=cfg.seed)
    model_dir = Path(model) if model else cache_dir / f"tiny_sora-{_hash(dataclasses.asdict(pre))}"
    if model and not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"--model {model}: no config.json there (make one with `vidalign pretrain`)")
    if not (model_dir / "config.json").is_file():
        pre.output_dir = str(model_dir)
        pretrain(pre, progress=progress)
        timings["pretrain"] = time.time() - t0
    else:
        timings["pretrain_cached"] = time.time() - t0

    # 2. preference pairs from the base, labelled by the oracle
    t0 = time.time()
    train_scenes, heldout_scenes = split_scenes(cfg.heldout_fraction, seed=cfg.seed)
    train_prompts = [s.prompt for s in train_scenes] * cfg.pair_rounds
    model = load_model(model_dir)
    ds = oracle_preference_dataset(
        model,
        train_prompts,
        cfg.samples_per_prompt,
        seed=cfg.seed + 1,
        num_steps=cfg.sample_steps,
        guidance_scale=cfg.guidance_scale,
        progress=progress,
    )
    data_dir = out / "preference_data"
    ds.save_to_disk(str(data_dir))
    prefs = ds["preference"]
    timings["pairs"] = time.time() - t0

    # 3. DPO with LoRA
    t0 = time.time()
    tcfg = TrainConfig(
        model=str(model_dir),
        dataset=str(data_dir),
        name="dpo",
        output_dir=str(out),
        beta=cfg.beta,
        learning_rate=cfg.learning_rate,
        lora_rank=cfg.lora_rank,
        lora_alpha=float(cfg.lora_rank),
        max_steps=cfg.dpo_steps,
        train_batch_size=cfg.dpo_batch_size,
        seed=cfg.seed,
        checkpointing_steps=0,
        progress=progress,
    )
    run_dir = train(tcfg)
    timings["dpo"] = time.time() - t0

    # 4. paired evaluation on held-out prompts
    t0 = time.time()
    aligned = load_aligned(model_dir, run_dir / "lora")
    prompts = [s.prompt for s in heldout_scenes for _ in range(cfg.eval_seeds_per_prompt)]
    seeds = [10_000 + i for i in range(len(prompts))]
    samples = sample_paired(aligned, prompts, seeds, cfg.sample_steps, cfg.guidance_scale, progress=progress)
    wr = oracle_winrate(samples, seed=cfg.seed)
    timings["eval"] = time.time() - t0

    # 5. plots, grid, report
    arts = {
        "training_curves": plot_training_curves(run_dir / "metrics.jsonl", out / "training_curves.png"),
        "winrates": plot_winrates({"DPO vs base (oracle)": wr}, out / "winrates.png"),
        "score_histogram": plot_score_histograms(
            {"base": [s["total"] for s in samples.base_scores], "DPO": [s["total"] for s in samples.aligned_scores]},
            out / "oracle_scores.png",
        ),
    }
    pick = np.arange(0, len(prompts), max(1, cfg.eval_seeds_per_prompt))[:8]
    arts["grid"] = write_grid_gif(
        [[samples.base[i], samples.aligned[i]] for i in pick],
        out / "base_vs_dpo.gif",
        row_labels=[prompts[i].removeprefix("a ").replace(" background", "") for i in pick],
        col_labels=["base", "DPO"],
    )
    timings["total"] = time.time() - t_all
    report = {
        "winrate": {"oracle": wr},
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "data": {
            "pairs": len(prefs),
            "ties": prefs.count("tie"),
            "train_prompts": len(set(train_prompts)),
            "heldout_prompts": len(heldout_scenes),
            "comparisons": len(prompts),
        },
        "config": {"quick": quick, **{k: v for k, v in dataclasses.asdict(cfg).items() if k != "pretrain"}},
        "artifacts": {k: Path(v).name for k, v in arts.items()},
    }
    write_report(report, out)
    return report
