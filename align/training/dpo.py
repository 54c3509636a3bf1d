"""Diffusion-DPO (Wallace et al. 2023) and flow-DPO with LoRA on a preference dataset.

The generator is loaded and frozen, LoRA is attached to the denoiser, and the preference
dataset is turned into (chosen, rejected) latent pairs once (the VAE and text encoder are
frozen: their outputs are kept in memory, or with ``latent_cache_dir`` streamed into
safetensors shards on disk and read memory-mapped). Each step noises both videos of a pair
with the *same* noise and timestep, computes per-sample errors of the policy and of the
reference (the same denoiser with its adapters off) and minimises the DPO loss
(``align.objectives.diffusion_dpo_loss``; flow models use the velocity error, see
``align.models.diffusers.base``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch.utils.data import TensorDataset

from align.data.latent_cache import build_latent_cache, cache_command
from align.data.pairs import to_pairs
from align.data.preference import load_preference_dataset
from align.frames import from_uint8
from align.models.lora import adapters_disabled
from align.objectives import diffusion_dpo_loss, per_sample_mse
from align.training import core, rollouts
from align.training.text_encoder import text_encoder_options

LOSS_TYPES = ("sigmoid", "hinge", "ipo")
KEYS = ("loss", "implicit_acc", "reward_margin", "model_diff", "ref_diff")


@dataclass
class DPOConfig(core.TrainConfig):
    """DPO alignment on a preference dataset (``prompt, video_a, video_b, preference``)."""

    name: str = field(default="dpo", metadata={"help": "the run's name: its directory is <output_dir>/<name>"})
    objective: Literal["dpo"] = field(default="dpo", metadata={"help": "dpo (picks the training module)"})
    loss_type: Literal["sigmoid", "hinge", "ipo"] = field(default="sigmoid", metadata={"help": "sigmoid | hinge | ipo"})
    beta: float = field(
        default=500.0, metadata={"help": "the KL strength; Diffusion-DPO's convention (see docs/training.md)"}
    )
    sft_weight: float = field(default=0.0, metadata={"help": "optional extra denoising loss on the preferred sample"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.objective != "dpo":
            raise ValueError(f"DPOConfig: recipe key `objective` must be 'dpo', got {self.objective!r}")
        if not self.dataset:
            raise ValueError("recipe key `dataset` is required for objective 'dpo' (a preference dataset)")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"recipe key `loss_type` must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if self.beta <= 0:
            raise ValueError(f"recipe key `beta` must be > 0, got {self.beta}")
        if self.sft_weight < 0:
            raise ValueError(f"recipe key `sft_weight` must be >= 0, got {self.sft_weight}")


@torch.no_grad()
def encode_pairs(model, pairs, batch_size: int = 64) -> TensorDataset:
    """Latents of chosen and rejected videos and prompt states, computed once."""
    lw, ll, txt = [], [], []
    for i in range(0, len(pairs.prompts), batch_size):
        lw.append(model.encode_video(from_uint8(pairs.chosen[i : i + batch_size]).to(model.device)).cpu())
        ll.append(model.encode_video(from_uint8(pairs.rejected[i : i + batch_size]).to(model.device)).cpu())
        txt.append(model.encode_prompts(pairs.prompts[i : i + batch_size]).cpu())
    return TensorDataset(torch.cat(lw), torch.cat(ll), torch.cat(txt))


def load_dpo_data(cfg: DPOConfig, model, ds) -> tuple[object, dict]:
    """The DPO pairs of ``ds`` (the loaded ``cfg.dataset``) as latents ``(chosen, rejected,
    prompt states)`` and what to report.

    Both paths validate every row with the same checks (``check_rows``) and apply
    ``cfg.bad_rows`` the same way: ``error`` raises the full report, ``skip`` skips and counts
    (``info["skipped"]``, ties included). With ``latent_cache_dir`` the dataset is streamed
    (``build_latent_cache``: one row's videos to validate, one batch to encode) and the
    latents are read lazily from the cache's memory-mapped shards, so a dataset larger than
    RAM trains; prompt states are cached too, and a diffusers model that ``core.start`` loaded
    without its text encoder (every prompt already cached: ``text_encoder_options``) reads them
    there. Without it every video is decoded into memory (``to_pairs``) and encoded once.
    Either way videos of any size, fps and length are resampled to ``model.video_input``.
    """
    target = model.video_input  # every video resampled to the model's frames, fps and size
    if cfg.latent_cache_dir:
        data = build_latent_cache(
            model, ds, cfg.latent_cache_dir, source=cfg.dataset, root=cfg.dataset, bad_rows=cfg.bad_rows, target=target,
            model_source=cfg.model, model_options=cfg.model_options,
            fill_command=cache_command(cfg.dataset, cfg.model, cfg.latent_cache_dir, cfg.model_options, model.device),
        )  # fmt: skip
        st = data.stats
        cache = ("videos_encoded", "videos_reused", "prompts_encoded", "prompts_reused", "bad_shards", "text_encoder")
        info = {
            "pairs": len(data),
            "skipped": st["skipped"],
            "rows": len(ds),
            "warnings": len(st["warnings"]),
            "latent_cache": {k: st[k] for k in cache},
        }
        return data, info
    pairs = to_pairs(ds, source=cfg.dataset, root=cfg.dataset, bad_rows=cfg.bad_rows, target=target)
    info = {"pairs": len(pairs.prompts), "skipped": pairs.skipped, "rows": len(ds)}
    return encode_pairs(model, pairs), info


def dpo_step_losses(
    model, denoiser, base, batch, beta: float, loss_type: str, generator=None, shard: tuple[int, int] = (0, 1)
) -> dict:
    """DPO terms for one batch of pairs. Noise and timestep are shared within a pair.

    ``denoiser`` is the (possibly DDP/DeepSpeed-wrapped) policy; ``base`` the unwrapped
    module, run with its adapters off as the reference. ``shard = (rank, world)``: the batch is
    this process's slice of a global batch ``world`` times larger (see ``core.shared_draws``).
    """
    lat_w, lat_l, cond = batch
    sched = model.scheduler
    noise, t = core.shared_draws(model, lat_w.shape, generator, shard, lat_w.device)
    x0 = torch.cat([lat_w, lat_l])
    noise2, t2, cond2 = torch.cat([noise, noise]), torch.cat([t, t]), torch.cat([cond, cond])
    x_t = sched.add_noise(x0, noise2, t2)
    target = sched.target(x0, noise2, t2)
    err_w, err_l = per_sample_mse(denoiser(x_t, t2, cond2), target).chunk(2)
    with torch.no_grad(), adapters_disabled(base):
        ref_w, ref_l = per_sample_mse(base(x_t, t2, cond2), target).chunk(2)
    out = diffusion_dpo_loss(err_w, err_l, ref_w, ref_l, beta=beta, loss_type=loss_type)
    out["err_w"] = err_w
    return out


def train(cfg: DPOConfig) -> Path:
    """Run DPO as configured; returns the run directory. With ``resume`` set, continues from a
    checkpoint of the same recipe. The dataset is read once: for the text-encoder decision
    (``text_encoder_options``) and for the pairs."""
    rollouts.check_prompt_rewriter(cfg, online=False)
    ds = load_preference_dataset(cfg.dataset)
    run = core.start(cfg, load_options=lambda device: text_encoder_options(cfg, device, ds))
    data, info = load_dpo_data(cfg, run.model, ds)
    core.prepare(cfg, run)
    shard = (run.rank, run.world)

    def step(batch) -> dict:
        out = dpo_step_losses(run.model, run.denoiser, run.base, batch, cfg.beta, cfg.loss_type, run.gen, shard)
        out["loss"] = out["loss"] + cfg.sft_weight * out["err_w"].mean()
        return out

    return core.loop(cfg, run, core.shard_batches(data, run, cfg.seed), step, KEYS, info)
