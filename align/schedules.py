"""Noise schedules: forward noising, training targets and timestep sampling.

One small class serves the three prediction types a video diffusion model can have:

- ``epsilon``: DDPM. ``x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps``, target ``eps``.
- ``v``: same forward process, target ``v = sqrt(a_t) eps - sqrt(1 - a_t) x0``
  (Salimans & Ho 2022; CogVideoX uses it).
- ``flow``: rectified flow / flow matching. ``x_t = (1 - s) x0 + s eps`` with
  ``s = t / T`` in [0, 1], target the velocity ``eps - x0`` (Wan, LTX, SD3 convention).

Timesteps are float tensors in ``[0, num_train_timesteps)`` for every type, so a denoiser
always sees the same scale. For epsilon/v they are integers stored as floats.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

PREDICTION_TYPES = ("epsilon", "v", "flow")


def _cosine_alphas_cumprod(num_steps: int, s: float = 0.008) -> torch.Tensor:
    """Cosine schedule of Nichol & Dhariwal 2021, clipped like diffusers' 'squaredcos_cap_v2'."""
    steps = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
    return torch.cumprod(1 - betas, dim=0).float()


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a per-sample ``(B,)`` tensor so it broadcasts against ``like``."""
    return v.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)


@dataclass
class NoiseSchedule:
    """Forward process and training target for one prediction type.

    ``flow_timestep_sampling`` is ``uniform`` or ``logit_normal`` (SD3's default,
    mean 0, std 1); ``flow_shift`` > 1 pushes flow timesteps toward high noise, as
    Wan/SD3 do for large resolutions (``s' = shift s / (1 + (shift - 1) s)``).
    """

    prediction_type: str = "epsilon"
    num_train_timesteps: int = 1000
    flow_timestep_sampling: str = "uniform"
    flow_shift: float = 1.0
    alphas_cumprod: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {self.prediction_type!r}")
        if self.flow_timestep_sampling not in ("uniform", "logit_normal"):
            raise ValueError(
                f"flow_timestep_sampling must be 'uniform' or 'logit_normal', got {self.flow_timestep_sampling!r}"
            )
        self.alphas_cumprod = _cosine_alphas_cumprod(self.num_train_timesteps)

    # -- timesteps -------------------------------------------------------------------
    def sample_timesteps(self, batch_size: int, generator: torch.Generator | None = None, device="cpu") -> torch.Tensor:
        """Training timesteps, float ``(B,)`` in ``[0, T)``."""
        T = self.num_train_timesteps
        if self.prediction_type != "flow":
            t = torch.randint(0, T, (batch_size,), generator=generator)
            return t.float().to(device)
        if self.flow_timestep_sampling == "logit_normal":
            s = torch.sigmoid(torch.randn(batch_size, generator=generator))
        else:
            s = torch.rand(batch_size, generator=generator)
        s = self.shift_sigma(s)
        return (s * T).clamp(0, T - 1e-3).to(device)

    def shift_sigma(self, s: torch.Tensor) -> torch.Tensor:
        """Apply the flow timestep shift (identity when ``flow_shift == 1``)."""
        k = self.flow_shift
        return s if k == 1.0 else k * s / (1 + (k - 1) * s)

    def _alpha_sigma(self, t: torch.Tensor, like: torch.Tensor):
        """Signal and noise coefficients at timesteps ``t`` broadcast to ``like``."""
        if self.prediction_type == "flow":
            s = _bcast(t / self.num_train_timesteps, like)
            return 1 - s, s
        a = self.alphas_cumprod.to(like.device)[t.long().clamp(0, self.num_train_timesteps - 1)]
        return _bcast(a.sqrt(), like), _bcast((1 - a).sqrt(), like)

    # -- forward process and targets -------------------------------------------------
    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Noised latents ``x_t`` for clean ``x0``, noise ``eps`` and timesteps ``t``."""
        alpha, sigma = self._alpha_sigma(t, x0)
        return alpha * x0 + sigma * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the denoiser is trained to output at ``t``."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "flow":
            return noise - x0
        alpha, sigma = self._alpha_sigma(t, x0)
        return alpha * noise - sigma * x0

    def predict_x0_eps(
        self, x_t: torch.Tensor, model_out: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Recover ``(x0, eps)`` estimates from a model output at ``t``.

        Epsilon models: ``x0 = (x_t - sqrt(1 - a) eps) / sqrt(a)``, unclamped (as diffusers' DDIM
        and DDPO): on the cosine table ``sqrt(a)`` is 4.9e-5 at ``t = 999``, and a clamp at 1e-4
        would scale x0 by 0.49 on the first step of every sample. Only a true zero is guarded
        (a zero-terminal-SNR table, which this one is not: its smallest ``a`` is 2.4e-9): there
        ``x_t`` is pure noise, x0 cannot be read from eps, and the division is by 1 instead, so
        that x0 is ``x_t - eps`` (0, the mean of centred latents, for an exact eps) and not inf."""
        alpha, sigma = self._alpha_sigma(t, x_t)
        if self.prediction_type == "epsilon":
            eps = model_out
            x0 = (x_t - sigma * eps) / torch.where(alpha == 0, torch.ones_like(alpha), alpha)
        elif self.prediction_type == "v":
            x0 = alpha * x_t - sigma * model_out
            eps = sigma * x_t + alpha * model_out
        else:  # flow: x_t = (1-s) x0 + s eps, v = eps - x0
            x0 = x_t - sigma * model_out
            eps = x_t + alpha * model_out
        return x0, eps
