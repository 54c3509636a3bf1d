"""Samplers with classifier-free guidance: DDIM (epsilon / v) and Euler (flow).

Both are deterministic given the initial noise, and the initial noise of sample ``i`` comes
from its own seed, so "same prompt, same seed" means the same starting point for the base
and the aligned model: the basis of paired win rates.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from align.models.base import VideoDiffusionModel


def initial_noise(shape: tuple[int, ...], seeds: list[int], device="cpu") -> torch.Tensor:
    """One standard-normal latent per seed, ``(len(seeds), *shape)``, independent of batching."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]).to(device)


def guided_prediction(predict, x: torch.Tensor, t: torch.Tensor, cond, uncond, scale: float) -> torch.Tensor:
    """``predict(x, t, cond)`` with classifier-free guidance ``u + scale * (c - u)``, ``u`` on
    ``uncond`` (one batched call); plain ``predict`` when ``scale`` is 1 or ``uncond`` is None.
    Used by the samplers and by RWR's guided loss (``rwr_guidance_scale``)."""
    if scale == 1.0 or uncond is None:
        return predict(x, t, cond)
    c, u = predict(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, uncond])).chunk(2)
    return u + scale * (c - u)


def _guided(model: VideoDiffusionModel, x: torch.Tensor, t: float, cond, uncond, scale: float) -> torch.Tensor:
    tt = torch.full((x.shape[0],), float(t), device=x.device)
    return guided_prediction(model.predict, x, tt, cond, uncond, scale)


@torch.no_grad()
def sample_latents(
    model: VideoDiffusionModel,
    prompts: list[str],
    seeds: list[int],
    num_steps: int = 20,
    guidance_scale: float = 4.0,
) -> torch.Tensor:
    """Sample latents for ``prompts`` (one per seed) with DDIM (eta=0) or flow Euler."""
    if len(prompts) != len(seeds):
        raise ValueError(f"need one seed per prompt: {len(prompts)} prompts, {len(seeds)} seeds")
    if not prompts:
        raise ValueError("sample_latents: empty prompt list")
    sched = model.scheduler
    device = next(model.denoiser.parameters()).device
    x = initial_noise(model.latent_shape, seeds, device)
    cond = model.encode_prompts(list(prompts))
    uncond = model.encode_prompts([""] * len(prompts)) if guidance_scale != 1.0 else None
    T = sched.num_train_timesteps
    if model.prediction_type == "flow":
        sigmas = sched.shift_sigma(torch.linspace(1.0, 0.0, num_steps + 1))
        for i in range(num_steps):
            v = _guided(model, x, sigmas[i].item() * T, cond, uncond, guidance_scale)
            x = x + (sigmas[i + 1] - sigmas[i]).item() * v
        return x
    ts = torch.linspace(T - 1, 0, num_steps).round()
    acp = sched.alphas_cumprod.to(device)
    for i, t in enumerate(ts):
        out = _guided(model, x, t.item(), cond, uncond, guidance_scale)
        x0, eps = sched.predict_x0_eps(x, out, torch.full((x.shape[0],), t.item(), device=device))
        a_prev = acp[int(ts[i + 1])] if i + 1 < num_steps else torch.tensor(1.0, device=device)
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    return x


@torch.no_grad()
def generate(
    model: VideoDiffusionModel,
    prompts: list[str],
    seeds: list[int],
    num_steps: int = 20,
    guidance_scale: float = 4.0,
    batch_size: int = 128,
    progress: bool = False,
    desc: str = "sampling",
) -> torch.Tensor:
    """Videos ``(B, C, T, H, W)`` in [-1, 1] for prompts and seeds, in batches."""
    if not prompts:
        raise ValueError("generate: empty prompt list")
    if len(seeds) != len(prompts):
        raise ValueError(f"generate: need one seed per prompt: {len(prompts)} prompts, {len(seeds)} seeds")
    out = []
    for i in tqdm(range(0, len(prompts), batch_size), desc=desc, disable=not progress, leave=False):
        lat = sample_latents(model, prompts[i : i + batch_size], seeds[i : i + batch_size], num_steps, guidance_scale)
        out.append(model.decode_latents(lat).cpu())
    return torch.cat(out)
