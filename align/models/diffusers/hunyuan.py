"""HunyuanVideo (``HunyuanVideoPipeline``): flow matching with embedded (distilled) guidance.

What differs from the base: the text conditioning is Llama states with their attention mask
plus a pooled CLIP vector (two text encoders), packed into one tensor (``pack_hunyuan``); the
transformer takes a guidance embedding, held fixed at ``embedded_guidance`` (6.0, the
pipeline's default) in training. The pipeline's own ``guidance_scale`` is that embedded
guidance, not classifier-free guidance (which it calls ``true_cfg_scale``): ``generate_videos``
passes its ``guidance_scale`` on as the pipeline's ``guidance_scale``, so for Hunyuan it sets
the embedded guidance of sampling, and true CFG stays off unless ``true_cfg_scale`` is given.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from align.models.diffusers.base import DiffusersVideoModel, pack_mask, split_mask


def pack_hunyuan(states: torch.Tensor, mask: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """``(B, 1 + L, D + 1)``: row 0 holds the pooled CLIP vector (zero-padded), rows 1.. are ``[states | mask]``."""
    B, _, D = states.shape
    if pooled.shape[-1] > D + 1:
        raise ValueError(f"Hunyuan: pooled projection dim {pooled.shape[-1]} exceeds text dim {D} + 1")
    head = states.new_zeros(B, 1, D + 1)
    head[:, 0, : pooled.shape[-1]] = pooled.to(states.dtype)
    return torch.cat([head, pack_mask(states, mask)], dim=1)


class HunyuanDenoiser(nn.Module):
    """HunyuanVideoTransformer3DModel with its embedded (distilled) guidance held fixed."""

    lora_key_prefix = ""

    def __init__(self, transformer: nn.Module, embedded_guidance: float = 6.0):
        super().__init__()
        self.transformer = transformer
        self.embedded_guidance = embedded_guidance

    def forward(self, latents_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        dtype = self.transformer.dtype
        pooled_dim = self.transformer.config.pooled_projection_dim
        pooled = cond[:, 0, :pooled_dim]
        states, mask = split_mask(cond[:, 1:])
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full((latents_t.shape[0],), self.embedded_guidance * 1000.0, device=t.device, dtype=dtype)
        out = self.transformer(
            hidden_states=latents_t.to(dtype),
            timestep=t,
            encoder_hidden_states=states.to(dtype),
            encoder_attention_mask=mask,
            pooled_projections=pooled.to(dtype),
            guidance=guidance,
            return_dict=False,
        )[0]
        return out.to(latents_t.dtype)


class HunyuanVideoModel(DiffusersVideoModel):
    """HunyuanVideo behind the ``VideoDiffusionModel`` protocol (see the module docstring)."""

    family: ClassVar[str] = "hunyuan"
    pipeline_class: ClassVar[str] = "HunyuanVideoPipeline"
    default_fps: ClassVar[float] = 24.0
    text_components: ClassVar[tuple[str, ...]] = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    default_size: ClassVar[tuple[int, int, int]] = (129, 720, 1280)
    default_max_sequence_length: ClassVar[int] = 256

    def make_denoiser(self) -> nn.Module:
        return HunyuanDenoiser(self.pipe.transformer, self.embedded_guidance)

    def encode_with_pipeline(self, prompts: list[str]) -> torch.Tensor:
        """Pooled CLIP row + ``[Llama states | attention mask]`` rows, ``(B, 1 + L, D + 1)``."""
        emb, pooled, mask = self.pipe.encode_prompt(
            prompts, device=self.device, max_sequence_length=self.max_sequence_length
        )
        return pack_hunyuan(emb, mask, pooled)
