"""Benchmarks of the tiny model on this machine, reported as ratios measured in one run.

    python -m bench.run [--out bench/results.json]

- ``dpo_step / sft_step``: one Diffusion-DPO step (policy on both videos of a pair with
  gradients, reference with adapters off and no gradients) over one denoising (SFT) step on
  the same number of videos. DPO needs the extra reference forward, so ~1.3-1.6x is expected.
- ``cfg_sampling / plain_sampling``: sampling with classifier-free guidance (two denoiser
  passes per step) over guidance 1 (one pass): ~2x expected, less when the VAE decode counts.
- ``lora_step / full_step``: a LoRA DPO step over a full fine-tuning denoising step.

Absolute times vary between runs on shared CPUs; the ratios are the result.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from align.models.lora import attach_lora, lora_parameters
from align.models.tiny_sora import TinySora, TinySoraConfig
from align.objectives import per_sample_mse
from align.sample import generate
from align.training.dpo import dpo_step_losses

PROMPT = "a red square moving left on a black background"


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=16, help="pairs per step")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="bench/results.json")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    m = TinySora(TinySoraConfig())
    m.requires_grad_(False)
    gen = torch.Generator().manual_seed(0)
    B = args.batch
    lat_w, lat_l = torch.randn(B, *m.latent_shape), torch.randn(B, *m.latent_shape)
    cond = m.encode_prompts([PROMPT] * B)
    sched = m.scheduler

    # full fine-tuning denoising step on 2B videos
    full_params = list(m.denoiser.parameters())
    for p in full_params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(full_params, lr=1e-4)

    def sft_step(optimizer):
        """One denoising step on the 2B videos of the pairs, updating ``optimizer``'s parameters."""
        x0 = torch.cat([lat_w, lat_l])
        n = torch.randn(x0.shape, generator=gen)
        t = sched.sample_timesteps(2 * B, generator=gen)
        loss = per_sample_mse(
            m.denoiser(sched.add_noise(x0, n, t), t, torch.cat([cond, cond])), sched.target(x0, n, t)
        ).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    t_full = _time(lambda: sft_step(opt), args.repeats)
    m.denoiser.requires_grad_(False)

    attach_lora(m.denoiser, rank=8, alpha=8)
    lora_opt = torch.optim.AdamW(lora_parameters(m.denoiser), lr=1e-3)

    def dpo_step():
        out = dpo_step_losses(m, m.denoiser, m.denoiser, (lat_w, lat_l, cond), 500.0, "sigmoid", generator=gen)
        lora_opt.zero_grad()
        out["loss"].backward()
        lora_opt.step()

    t_dpo = _time(dpo_step, args.repeats)
    t_sft = _time(lambda: sft_step(lora_opt), args.repeats)
    prompts, seeds = [PROMPT] * B, list(range(B))
    t_cfg = _time(lambda: generate(m, prompts, seeds, num_steps=10, guidance_scale=4.0), max(1, args.repeats // 2))
    t_plain = _time(lambda: generate(m, prompts, seeds, num_steps=10, guidance_scale=1.0), max(1, args.repeats // 2))
    res = {
        "machine": {"threads": torch.get_num_threads(), "torch": torch.__version__},
        "batch_pairs": B,
        "seconds": {
            "dpo_step": t_dpo,
            "lora_sft_step": t_sft,
            "full_sft_step": t_full,
            "cfg_sampling_10_steps": t_cfg,
            "plain_sampling_10_steps": t_plain,
        },
        "ratios": {
            "dpo_step / sft_step": t_dpo / t_sft,
            "lora_dpo_step / full_sft_step": t_dpo / t_full,
            "cfg_sampling / plain_sampling": t_cfg / t_plain,
        },
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    for k, v in res["ratios"].items():
        print(f"{k:32s} {v:6.2f}x")
    print(f"(seconds: {json.dumps({k: round(v, 4) for k, v in res['seconds'].items()})}; written to {out})")
    return res


if __name__ == "__main__":
    main()
