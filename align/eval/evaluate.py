"""Paired evaluation: the aligned model against its base, same prompts and same seeds.

The base is the aligned model with its LoRA adapters switched off, so both see identical
initial noise and differ only by the adapter. Each (prompt, seed) is one comparison, judged
by the oracle of the synthetic world; the win rate counts ties as one half and comes with a
bootstrap 95% confidence interval.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from align.data.synthetic import oracle_scores
from align.data.video import to_uint8
from align.eval.winrate import win_rate
from align.models.lora import adapters_disabled
from align.sample import generate


@dataclass
class PairedSamples:
    """Videos and oracle scores of base and aligned samples for the same prompts and seeds."""

    prompts: list[str]
    seeds: list[int]
    base: np.ndarray  # uint8 (N, T, H, W, 3)
    aligned: np.ndarray
    base_scores: list[dict]
    aligned_scores: list[dict]


def sample_paired(
    model, prompts: list[str], seeds: list[int], num_steps: int = 20, guidance_scale: float = 4.0, progress=True
) -> PairedSamples:
    """Sample ``model`` with and without its adapters for every (prompt, seed) and score both."""
    if not prompts:
        raise ValueError("evaluation needs at least one prompt")
    with adapters_disabled(model.denoiser):
        base = to_uint8(generate(model, prompts, seeds, num_steps, guidance_scale, progress=progress, desc="eval base"))
    aligned = to_uint8(
        generate(model, prompts, seeds, num_steps, guidance_scale, progress=progress, desc="eval aligned")
    )
    return PairedSamples(prompts, seeds, base, aligned, oracle_scores(base, prompts), oracle_scores(aligned, prompts))


def oracle_winrate(samples: PairedSamples, tie_margin: float = 0.005, seed: int = 0) -> dict:
    """Win rate of aligned over base by the oracle's total score, plus per-attribute means."""
    new = [s["total"] for s in samples.aligned_scores]
    old = [s["total"] for s in samples.base_scores]
    out = win_rate(new, old, tie_margin=tie_margin, seed=seed)
    attrs = [k for k in samples.base_scores[0] if k != "total"]
    out["mean_score"] = {"base": float(np.mean(old)), "aligned": float(np.mean(new))}
    out["per_attribute"] = {
        k: {
            "base": float(np.mean([s[k] for s in samples.base_scores])),
            "aligned": float(np.mean([s[k] for s in samples.aligned_scores])),
        }
        for k in attrs
    }
    return out


def reward_winrate(
    reward_model, base: np.ndarray, aligned: np.ndarray, prompts: list[str], tie_margin: float = 0.0, seed: int = 0
) -> dict:
    """Win rate of aligned over base videos (same prompts and seeds) judged by a reward model."""
    old = reward_model.score(base, prompts)
    new = reward_model.score(aligned, prompts)
    out = win_rate(new.tolist(), old.tolist(), tie_margin=tie_margin, seed=seed)
    out["mean_score"] = {"base": float(old.mean()), "aligned": float(new.mean())}
    return out
