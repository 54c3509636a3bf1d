"""AnimateDiff (``AnimateDiffPipeline``): epsilon prediction, an image UNet with motion modules.

What differs from the base: the denoiser is ``UNetMotionModel`` (``pipe.unet``, so LoRA keys
start with ``unet.``), which takes one text state per frame; the VAE is an image VAE, run
frame by frame, with no temporal compression and no patching; the schedule is the pipeline
scheduler's linear-beta ``alphas_cumprod``; the default size is 16 frames at the UNet's
sample size; text is CLIP's 77 tokens. The usual Hub layout, a Stable Diffusion repository
plus a MotionAdapter repository (``motion_adapter=<id or path>``), is loaded as an
AnimateDiffPipeline with the DDIM settings the motion modules were trained with.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from align.models.diffusers.base import DiffusersVideoModel, ddpm_schedule
from align.models.diffusers.loading import pipeline_load_errors
from align.schedules import NoiseSchedule


class AnimateDiffDenoiser(nn.Module):
    """UNetMotionModel (an image UNet with motion modules); LoRA keys start with ``unet.``."""

    lora_key_prefix = ""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, latents_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        dtype = self.unet.dtype
        cond = cond.repeat_interleave(latents_t.shape[2], dim=0)  # one text state per frame, as the pipeline does
        out = self.unet(latents_t.to(dtype), t, encoder_hidden_states=cond.to(dtype)).sample
        return out.to(latents_t.dtype)


class AnimateDiffVideoModel(DiffusersVideoModel):
    """AnimateDiff behind the ``VideoDiffusionModel`` protocol (see the module docstring)."""

    family: ClassVar[str] = "animatediff"
    pipeline_class: ClassVar[str] = "AnimateDiffPipeline"
    default_fps: ClassVar[float] = 8.0
    component: ClassVar[str] = "unet"

    @classmethod
    def load_pipeline(cls, source: str, pipe_class: str, kw: dict[str, Any], motion_adapter: str | None = None) -> Any:
        """An AnimateDiffPipeline; from a Stable Diffusion pipeline (``pipe_class``) only with a
        ``motion_adapter``, and then with the linear-beta DDIM scheduler AnimateDiff uses."""
        import diffusers

        if pipe_class != "AnimateDiffPipeline" and motion_adapter is None:
            raise ValueError(
                f"model {source} is a {pipe_class}; AnimateDiff also needs motion_adapter=<MotionAdapter id or path>"
            )
        with pipeline_load_errors(source, cls.family):
            if motion_adapter is not None:
                kw["motion_adapter"] = diffusers.MotionAdapter.from_pretrained(
                    motion_adapter, torch_dtype=kw["torch_dtype"]
                )
            pipe = diffusers.AnimateDiffPipeline.from_pretrained(source, **kw)
            if pipe_class != "AnimateDiffPipeline":  # the scheduler the motion modules were trained with
                pipe.scheduler = diffusers.DDIMScheduler.from_config(
                    pipe.scheduler.config,
                    beta_schedule="linear",
                    clip_sample=False,
                    timestep_spacing="linspace",
                    steps_offset=1,
                )
        return pipe

    def make_denoiser(self) -> nn.Module:
        return AnimateDiffDenoiser(self.pipe.unet)

    def default_video_size(self) -> tuple[int, int, int]:
        size = self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor
        return 16, size, size

    def resolve_max_sequence_length(self, value: int | None) -> int:
        return 77  # CLIP; the pipeline uses tokenizer.model_max_length

    def compression(self) -> tuple[int, int]:
        return 1, self.pipe.vae_scale_factor

    def patch(self) -> tuple[int, int, int]:
        return 1, 1, 1

    def make_schedule(self) -> NoiseSchedule:
        return ddpm_schedule(self.pipe, self.family)

    def vae_encode(self, video: torch.Tensor, sample: bool) -> torch.Tensor:
        dist = self.pipe.vae.encode(video[0].transpose(0, 1)).latent_dist  # an image VAE over (T, 3, H, W)
        z = dist.sample() if sample else dist.mode()
        return z.transpose(0, 1)[None]

    def vae_decode(self, z: torch.Tensor) -> torch.Tensor:
        frames = self.pipe.vae.decode(z[0].transpose(0, 1)).sample  # (T, 3, H, W)
        return frames.transpose(0, 1)[None]

    def encode_with_pipeline(self, prompts: list[str]) -> torch.Tensor:
        emb, _ = self.pipe.encode_prompt(prompts, self.device, 1, False)
        return emb

    def sampler_kwargs(self) -> dict[str, Any]:
        return {}  # AnimateDiffPipeline takes no max_sequence_length
