"""GPU tier (``make test-gpu``; skipped without CUDA): every diffusers family's adapter on the
GPU in bf16 with gradient checkpointing, one DPO step through the trainer's loss and one call of
the family's pipeline sampler, with peak memory and step time printed.

The models are the test suite's tiny pipelines of the real diffusers classes, at a larger video
size than the CPU tests use, so the numbers measure the adapters' overhead, not a real
checkpoint's cost; real-size timings need the real weights (``recipes/*`` on a GPU machine)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the gpu tier runs on a GPU machine)"),
]
SIZES = {
    "wan": dict(num_frames=17, height=64, width=64, max_sequence_length=16),
    "cogvideox": dict(num_frames=17, height=64, width=64),
    "ltx": dict(num_frames=17, height=64, width=64, max_sequence_length=16),
    "animatediff": dict(num_frames=8, height=64, width=64),
    "hunyuan": dict(num_frames=17, height=64, width=64, max_sequence_length=16),
}
PROMPT = "a red square moving left on a black background"


@pytest.mark.parametrize("family", sorted(SIZES))
def test_dpo_step_and_sampling_in_bf16(family, tmp_path):
    from test_diffusers_models import build_pipeline

    from align.models import load_model
    from align.models.diffusers import DEFAULT_LORA_TARGETS
    from align.models.lora import attach_lora, lora_parameters
    from align.training.dpo import dpo_step_losses

    build_pipeline(family).save_pretrained(tmp_path / "pipe")
    model = load_model(tmp_path / "pipe", device="cuda", dtype="bfloat16", **SIZES[family])
    model.requires_grad_(False)
    attach_lora(model.denoiser, rank=8, alpha=8.0, target_modules=DEFAULT_LORA_TARGETS[family])
    if model.supports_gradient_checkpointing:
        model.enable_gradient_checkpointing()
    model.denoiser.train()
    opt = torch.optim.AdamW(lora_parameters(model.denoiser), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    shape = (2, *model.latent_shape)
    lat_w, lat_l = (torch.randn(shape, generator=g).to("cuda", torch.bfloat16) for _ in range(2))
    cond = model.encode_prompts([PROMPT, PROMPT])
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = dpo_step_losses(model, model.denoiser, model.denoiser, (lat_w, lat_l, cond), 500.0, "sigmoid", g)
        opt.zero_grad()
        out["loss"].float().backward()
        opt.step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    assert torch.isfinite(out["loss"].float())
    grads = [p.grad for p in lora_parameters(model.denoiser) if p.grad is not None]
    assert grads and any(float(gr.abs().max()) > 0 for gr in grads)
    train_peak = torch.cuda.max_memory_allocated() / 2**20
    model.denoiser.eval()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    videos = model.generate_videos([PROMPT], [0], num_steps=2, guidance_scale=4.0)
    torch.cuda.synchronize()
    sample_s = time.perf_counter() - t0
    assert videos.shape[0] == 1 and torch.isfinite(videos.float()).all()
    print(
        f"\n[gpu] {family} {SIZES[family]}: DPO step {min(times) * 1e3:.1f} ms, peak {train_peak:.0f} MiB; "
        f"2-step sample {sample_s:.2f} s, peak {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB"
    )
