"""The one interface training and sampling code know about: `VideoDiffusionModel`.

It is a `typing.Protocol`, not a base class: the tiny Sora model and every diffusers
adapter implement it by having these attributes, nothing to inherit.

Conventions
- Pixel videos are ``(B, C, T, H, W)`` floats in ``[-1, 1]``.
- Latents are whatever the model's VAE produces, already multiplied by its scaling
  factor, so that the diffusion process sees roughly unit variance.
- ``cond`` is whatever ``encode_prompts`` returns (a tensor or a dict of tensors); the
  trainer only moves it around and passes it back to ``predict``.
- Timesteps are float tensors ``(B,)`` in ``[0, scheduler.num_train_timesteps)``.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from align.schedules import NoiseSchedule


@runtime_checkable
class VideoDiffusionModel(Protocol):
    """What a latent video diffusion model must expose to be aligned by vidalign."""

    denoiser: nn.Module  # the module LoRA adapts
    scheduler: NoiseSchedule

    @property
    def prediction_type(self) -> str: ...

    def encode_video(self, videos: torch.Tensor) -> torch.Tensor:
        """Pixels ``(B, C, T, H, W)`` in [-1, 1] -> scaled latents."""
        ...

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> pixels ``(B, C, T, H, W)`` in [-1, 1]."""
        ...

    def encode_prompts(self, prompts: list[str]) -> Any:
        """Prompts -> the conditioning that ``predict`` takes (the empty string = unconditional)."""
        ...

    def predict(self, latents_t: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        """The denoiser's output (epsilon, v or velocity, by ``prediction_type``)."""
        ...

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """Shape of one sample's latents ``(C, T, H, W)`` at the model's default size."""
        ...
