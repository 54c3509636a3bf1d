"""CogVideoX (``CogVideoXPipeline``): v-prediction on a DDPM schedule, frames-first layout.

What differs from the base: the transformer takes ``(B, T, C, H, W)``; CogVideoX 5B and 1.5
need the 3D rotary embeddings the pipeline builds from the latent grid (1.5 also patches
time, ``patch_size_t``); the schedule is the pipeline scheduler's SNR-shifted,
zero-terminal-SNR ``alphas_cumprod``; the default size and the text length come from the
transformer's config (``sample_frames`` / ``sample_height`` / ``sample_width``,
``max_text_seq_length``, which the text length must equal).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from align.models.diffusers.base import DiffusersVideoModel, ddpm_schedule
from align.schedules import NoiseSchedule


class CogVideoXDenoiser(nn.Module):
    """CogVideoXTransformer3DModel: frames-first layout, 3D RoPE when the config asks for it."""

    lora_key_prefix = ""

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.transformer = transformer

    def _rotary(self, T: int, H: int, W: int, device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The 3D rotary embeddings CogVideoXPipeline builds, from the latent grid."""
        cfg = self.transformer.config
        if not cfg.use_rotary_positional_embeddings:
            return None
        from diffusers.models.embeddings import get_3d_rotary_pos_embed
        from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

        p, p_t = cfg.patch_size, cfg.patch_size_t
        grid_h, grid_w = H // p, W // p
        base_h, base_w = cfg.sample_height // p, cfg.sample_width // p
        if p_t is None:  # CogVideoX 1.0
            crops = get_resize_crop_region_for_grid((grid_h, grid_w), base_w, base_h)
            return get_3d_rotary_pos_embed(
                embed_dim=cfg.attention_head_dim,
                crops_coords=crops,
                grid_size=(grid_h, grid_w),
                temporal_size=T,
                device=device,
            )
        return get_3d_rotary_pos_embed(  # CogVideoX 1.5
            embed_dim=cfg.attention_head_dim,
            crops_coords=None,
            grid_size=(grid_h, grid_w),
            temporal_size=(T + p_t - 1) // p_t,
            grid_type="slice",
            max_size=(base_h, base_w),
            device=device,
        )

    def forward(self, latents_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        dtype = self.transformer.dtype
        _, _, T, H, W = latents_t.shape
        p_t = self.transformer.config.patch_size_t
        if p_t is not None and T % p_t:
            raise ValueError(f"CogVideoX 1.5 needs latent frames divisible by {p_t}, got {T}")
        out = self.transformer(
            hidden_states=latents_t.permute(0, 2, 1, 3, 4).to(dtype),
            encoder_hidden_states=cond.to(dtype),
            timestep=t,
            image_rotary_emb=self._rotary(T, H, W, latents_t.device),
            return_dict=False,
        )[0]
        return out.permute(0, 2, 1, 3, 4).to(latents_t.dtype)


class CogVideoXVideoModel(DiffusersVideoModel):
    """CogVideoX behind the ``VideoDiffusionModel`` protocol (see the module docstring)."""

    family: ClassVar[str] = "cogvideox"
    pipeline_class: ClassVar[str] = "CogVideoXPipeline"
    default_fps: ClassVar[float] = 8.0

    def make_denoiser(self) -> nn.Module:
        return CogVideoXDenoiser(self.pipe.transformer)

    def default_video_size(self) -> tuple[int, int, int]:
        cfg, s = self.pipe.transformer.config, self.pipe.vae_scale_factor_spatial
        return cfg.sample_frames, cfg.sample_height * s, cfg.sample_width * s

    def resolve_max_sequence_length(self, value: int | None) -> int:
        native = self.pipe.transformer.config.max_text_seq_length
        if value is not None and value != native:
            raise ValueError(f"CogVideoX: max_sequence_length must equal the transformer's {native}, got {value}")
        return native

    def make_schedule(self) -> NoiseSchedule:
        return ddpm_schedule(self.pipe, self.family)
