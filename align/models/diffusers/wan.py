"""Wan 2.1 / 2.2 (``WanPipeline``): flow matching, latents ``(B, C, T, H, W)`` as vidalign's.

What differs from the base: the VAE's ``z_dim`` latent channels normalised per channel with
``latents_mean`` / ``latents_std`` (no scaling factor), a 3-tuple patch size, Wan 2.2 TI2V's
per-token timesteps (``expand_timesteps``), and Wan 2.2 A14B's two experts: ``transformer``
for ``t >= boundary_ratio * 1000``, ``transformer_2`` below. One expert is aligned at a time
(``wan_expert="high_noise" | "low_noise"``), with training timesteps restricted to its range
(``TimestepRangeSchedule``) and the other, frozen expert answering ``predict`` outside it; the
LoRA of the low-noise expert is loaded with ``pipe.load_lora_weights(dir, load_into_transformer_2=True)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from align.models.diffusers.base import DiffusersVideoModel
from align.schedules import NoiseSchedule


@dataclass
class TimestepRangeSchedule(NoiseSchedule):
    """A flow schedule whose training timesteps are confined to ``[t_min, t_max)``.

    The distribution is the parent's (uniform or logit-normal, then shifted) truncated to
    the range, sampled exactly by inverting its CDF. Used for one expert of Wan 2.2 A14B.
    """

    t_min: float = 0.0
    t_max: float = 1000.0

    def _unshift(self, s: torch.Tensor) -> torch.Tensor:
        k = self.flow_shift
        return s if k == 1.0 else s / (k - (k - 1) * s)

    def sample_timesteps(self, batch_size: int, generator: torch.Generator | None = None, device="cpu") -> torch.Tensor:
        T = self.num_train_timesteps
        lo = self._unshift(torch.tensor(self.t_min / T, dtype=torch.float64)).clamp(0, 1)
        hi = self._unshift(torch.tensor(self.t_max / T, dtype=torch.float64)).clamp(0, 1)
        u = torch.rand(batch_size, generator=generator, dtype=torch.float64)
        if self.flow_timestep_sampling == "logit_normal":
            normal = torch.distributions.Normal(0.0, 1.0)
            c_lo, c_hi = normal.cdf(torch.logit(lo)), normal.cdf(torch.logit(hi))
            s = torch.sigmoid(torch.special.ndtri(c_lo + u * (c_hi - c_lo)))
        else:
            s = lo + u * (hi - lo)
        t = self.shift_sigma(s) * T
        return t.clamp(self.t_min, min(self.t_max, T - 1e-3)).float().to(device)


class WanDenoiser(nn.Module):
    """WanTransformer3DModel. Wan 2.2 TI2V (``expand_timesteps``) takes one timestep per token."""

    lora_key_prefix = ""  # peft keys already start with "transformer."

    def __init__(self, transformer: nn.Module, expand_timesteps: bool = False):
        super().__init__()
        self.transformer = transformer
        self.expand_timesteps = expand_timesteps

    def forward(self, latents_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        dtype = self.transformer.dtype
        if self.expand_timesteps:
            pt, ph, pw = self.transformer.config.patch_size
            _, _, T, H, W = latents_t.shape
            t = t[:, None].expand(-1, (T // pt) * (H // ph) * (W // pw))
        out = self.transformer(
            hidden_states=latents_t.to(dtype), timestep=t, encoder_hidden_states=cond.to(dtype), return_dict=False
        )[0]
        return out.to(latents_t.dtype)


class WanVideoModel(DiffusersVideoModel):
    """Wan 2.1 / 2.2 behind the ``VideoDiffusionModel`` protocol (see the module docstring)."""

    family: ClassVar[str] = "wan"
    pipeline_class: ClassVar[str] = "WanPipeline"
    default_size: ClassVar[tuple[int, int, int]] = (81, 480, 832)
    default_fps: ClassVar[float] = 16.0
    default_max_sequence_length: ClassVar[int] = 512
    # set by make_denoiser for a two-expert Wan 2.2: the frozen expert and the trained one's [t_min, t_max)
    _other_expert: nn.Module | None = None
    _expert_range: tuple[float, float] | None = None

    def make_denoiser(self) -> nn.Module:
        pipe = self.pipe
        expand = bool(pipe.config.get("expand_timesteps", False))
        transformer_2 = getattr(pipe, "transformer_2", None)
        boundary = pipe.config.get("boundary_ratio", None)
        if transformer_2 is None or boundary is None:
            return WanDenoiser(pipe.transformer, expand)
        if self.wan_expert not in ("high_noise", "low_noise"):
            raise ValueError(f"wan_expert must be 'high_noise' or 'low_noise', got {self.wan_expert!r}")
        T = pipe.scheduler.config.num_train_timesteps
        cut = boundary * T
        if self.wan_expert == "high_noise":
            trained, other, self._expert_range = pipe.transformer, transformer_2, (cut, float(T))
        else:
            trained, other, self._expert_range = transformer_2, pipe.transformer, (0.0, cut)
        self._other_expert = WanDenoiser(other, expand)
        denoiser = WanDenoiser(trained, expand)
        denoiser.lora_metadata = {"wan_expert": self.wan_expert}  # in adapter_config.json, checked by load_lora
        return denoiser

    def patch(self) -> tuple[int, int, int]:
        return tuple(self.pipe.transformer.config.patch_size)

    @property
    def latent_channels(self) -> int:
        return self.pipe.vae.config.z_dim

    def latent_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        cfg = self.pipe.vae.config
        return (
            torch.tensor(cfg.latents_mean, device=like.device),
            torch.tensor(cfg.latents_std, device=like.device),
            1.0,
        )

    def make_schedule(self) -> NoiseSchedule:
        if self._expert_range is None:
            return super().make_schedule()
        T = int(self.pipe.scheduler.config.get("num_train_timesteps", 1000))
        lo, hi = self._expert_range
        return TimestepRangeSchedule("flow", T, self.timestep_sampling, self.flow_shift(), t_min=lo, t_max=hi)

    def predict(self, latents_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """The denoiser's output; for a two-expert Wan 2.2, timesteps outside the trained
        expert's range go to the other (frozen) expert, as in the pipeline."""
        if self._other_expert is None:
            return self.denoiser(latents_t, t, cond)
        lo, hi = self._expert_range
        inside = (t >= lo) & (t < hi)
        out = torch.empty_like(latents_t)
        if inside.any():
            out[inside] = self.denoiser(latents_t[inside], t[inside], cond[inside])
        if (~inside).any():
            out[~inside] = self._other_expert(latents_t[~inside], t[~inside], cond[~inside])
        return out
