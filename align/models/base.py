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

Optional abilities (gradient checkpointing, the model's own pipeline sampler) are part of
the protocol: every model declares them (``supports_gradient_checkpointing``,
``has_pipeline_sampler``) with the defaults documented below, so callers test a flag instead
of probing with ``hasattr``.
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

    def decode_videos(self, latents: torch.Tensor, prompts: list[str], seeds: list[int]) -> torch.Tensor:
        """The final videos of sampled latents, what judges see: ``decode_latents`` for a one-stage
        model; a cascade (``align.models.cascade``, LTX with ``cascade:``) first runs its later
        stages, seeded per sample by ``seeds`` (and conditioned on ``prompts`` where they read text)."""
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

    def components(self) -> dict[str, nn.Module]:
        """The model's torch modules by name (VAE, text encoder(s), denoiser / transformer)."""
        ...

    # -- video size --------------------------------------------------------------------
    @property
    def video_input(self) -> dict:
        """``{"num_frames", "height", "width", "fps"}`` that training resamples every video to
        (``fps`` None: frames are taken as they are)."""
        ...

    @property
    def video_size_rules(self) -> str:
        """The sizes the model accepts, in words (TinySora: its one fixed size; Wan:
        ``num_frames = 4k+1; height and width multiples of 16``)."""
        ...

    def check_video_size(
        self, num_frames: int | None = None, height: int | None = None, width: int | None = None
    ) -> tuple[int, int, int]:
        """``(num_frames, height, width)`` (``None``: the model's current value) if the model can
        take that size, else a ValueError naming the model and the broken rule. Changes nothing
        (diffusers models change their size with ``set_video_size``, which checks it first)."""
        ...

    # -- optional abilities: declared by every model, with these defaults ---------------
    # supports_gradient_checkpointing: False by default (TinySora); True for the diffusers
    #   families, whose ``enable_gradient_checkpointing()`` turns on diffusers' own. Without
    #   the ability ``enable_gradient_checkpointing()`` raises a ValueError.
    # has_pipeline_sampler: False by default (TinySora: sample with ``align.sample.generate``);
    #   True for the diffusers families, which then also have ``generate_videos(prompts, seeds,
    #   num_steps, guidance_scale, batch_size, **pipe_kwargs)``: the family's own pipeline and
    #   scheduler, one generator per seed, videos ``(B, C, T, H, W)`` in [-1, 1] on the CPU.
    supports_gradient_checkpointing: bool
    has_pipeline_sampler: bool

    def enable_gradient_checkpointing(self) -> None:
        """Recompute the denoiser's activations in the backward pass (ValueError without the ability)."""
        ...
