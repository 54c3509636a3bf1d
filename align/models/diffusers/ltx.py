"""LTX-Video (``LTXPipeline``): flow matching on packed tokens ``(B, T*H*W, C)``.

What differs from the base: the denoiser packs latents into tokens and passes the text
attention mask (carried as one extra feature channel of the conditioning, ``pack_mask``) and
the RoPE interpolation scale ``(temporal_ratio / frame_rate, spatial_ratio, spatial_ratio)``;
latents are normalised per channel (``latents_mean`` / ``latents_std``) and by the scaling
factor; the timestep shift is dynamic, ``exp(mu)`` with ``mu`` linear in the latent token count
of the current video size; the VAE names its compression ``vae_*_compression_ratio`` and,
when ``timestep_conditioning`` is on, decodes at timestep 0.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import nn

from align.models.diffusers.base import DiffusersVideoModel, pack_mask, split_mask


def ltx_dynamic_shift(pipe: Any, seq_len: int) -> float:
    """exp(mu) with mu linear in the latent token count, as LTXPipeline computes it."""
    cfg = pipe.scheduler.config
    base_len, max_len = cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096)
    base_shift, max_shift = cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15)
    m = (max_shift - base_shift) / (max_len - base_len)
    return math.exp(seq_len * m + base_shift - m * base_len)


class LTXDenoiser(nn.Module):
    """LTXVideoTransformer3DModel: packs latents into tokens, passes the text mask and RoPE scale."""

    lora_key_prefix = ""

    def __init__(self, transformer: nn.Module, temporal_ratio: int, spatial_ratio: int, frame_rate: float = 25.0):
        super().__init__()
        self.transformer = transformer
        self.rope_interpolation_scale = (temporal_ratio / frame_rate, spatial_ratio, spatial_ratio)

    def forward(self, latents_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        from diffusers import LTXPipeline

        dtype = self.transformer.dtype
        p, p_t = self.transformer.config.patch_size, self.transformer.config.patch_size_t
        _, _, T, H, W = latents_t.shape
        states, mask = split_mask(cond)
        out = self.transformer(
            hidden_states=LTXPipeline._pack_latents(latents_t.to(dtype), p, p_t),
            encoder_hidden_states=states.to(dtype),
            timestep=t,
            encoder_attention_mask=mask,
            num_frames=T // p_t,
            height=H // p,
            width=W // p,
            rope_interpolation_scale=self.rope_interpolation_scale,
            return_dict=False,
        )[0]
        return LTXPipeline._unpack_latents(out, T // p_t, H // p, W // p, p, p_t).to(latents_t.dtype)


class LTXVideoModel(DiffusersVideoModel):
    """LTX-Video behind the ``VideoDiffusionModel`` protocol (see the module docstring)."""

    family: ClassVar[str] = "ltx"
    pipeline_class: ClassVar[str] = "LTXPipeline"
    default_fps: ClassVar[float] = 24.0
    default_size: ClassVar[tuple[int, int, int]] = (161, 512, 704)
    default_max_sequence_length: ClassVar[int] = 128

    def make_denoiser(self) -> nn.Module:
        tc, sc = self.compression()
        return LTXDenoiser(self.pipe.transformer, tc, sc, self.frame_rate)

    def compression(self) -> tuple[int, int]:
        return self.pipe.vae_temporal_compression_ratio, self.pipe.vae_spatial_compression_ratio

    def flow_shift(self) -> float:
        _, lt, lh, lw = self.latent_shape
        pt, ph, pw = self.patch()
        return ltx_dynamic_shift(self.pipe, (lt // pt) * (lh // ph) * (lw // pw))

    def latent_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        vae = self.pipe.vae
        return (
            vae.latents_mean.to(like.device).float(),
            vae.latents_std.to(like.device).float(),
            vae.config.scaling_factor,
        )

    def vae_decode(self, z: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        if vae.config.timestep_conditioning:
            return vae.decode(z, torch.zeros(1, device=z.device, dtype=z.dtype)).sample
        return vae.decode(z).sample

    def encode_with_pipeline(self, prompts: list[str]) -> torch.Tensor:
        """``[T5 states | attention mask]`` ``(B, L, D + 1)``."""
        emb, mask, _, _ = self.pipe.encode_prompt(
            prompts, do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length, device=self.device
        )
        return pack_mask(emb, mask)
