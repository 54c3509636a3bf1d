"""Samplers with classifier-free guidance: DDIM (epsilon / v) and Euler (flow).

Both are deterministic given the initial noise, and the initial noise of sample ``i`` comes
from its own seed, so "same prompt, same seed" means the same starting point for the base
and the aligned model: the basis of paired win rates.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from align.frames import to_uint8
from align.models.base import VideoDiffusionModel

SAMPLERS = ("pipeline", "vidalign")
# the command-line flag of each SamplingOptions field (`vidalign generate | eval | data pairs | data samples`)
SAMPLING_FLAGS = {
    "num_frames": "--num-frames",
    "height": "--height",
    "width": "--width",
    "num_steps": "--steps",
    "guidance_scale": "--guidance",
    "batch_size": "--batch-size",
    "device": "--device",
    "sampler": "--sampler",
    "fps": "--fps",
    "seed": "--seed",
    "seeds_per_prompt": "--seeds-per-prompt",
    "prompt_rewriter": "--prompt-rewriter",
    "rewrite_instruction": "--rewrite-instruction",
}


@dataclass(frozen=True)
class SamplingOptions:
    """How every sampling path samples: ``generate``, ``data pairs``, ``data samples``, ``eval``
    and the online rounds take one of these, built once from the CLI's flags or a recipe.

    ``None`` sizes keep the model's own; ``batch_size`` None is the model's default (1 for a
    diffusers pipeline, 16 for the tiny model); ``device`` None is CUDA when there is one.
    ``sampler`` ``pipeline`` is the family's own diffusers sampler, ``vidalign`` the ODE of
    :func:`generate` (the tiny model has only that). Video ``i`` of prompt ``p`` is drawn from
    seed ``seed + i`` (:meth:`expand`)."""

    num_frames: int | None = None
    height: int | None = None
    width: int | None = None
    num_steps: int = 20
    guidance_scale: float = 4.0
    batch_size: int | None = None
    device: str | None = None
    sampler: str = "pipeline"
    fps: int = 8
    seed: int = 0
    seeds_per_prompt: int = 1
    prompt_rewriter: str | None = None  # hf:PATH | http:URL[#MODEL]: condition on rewritten prompts (align.prompting)
    rewrite_instruction: str | None = None  # the rewriter's system instruction file (None: the default)

    def __post_init__(self) -> None:
        # each error names the option as a recipe spells it and as the command line does
        for key in ("num_frames", "height", "width", "batch_size", "num_steps", "fps", "seeds_per_prompt"):
            v = getattr(self, key)
            if v is not None and v < 1:
                raise ValueError(f"sampling option {key} must be >= 1, got {v} ({SAMPLING_FLAGS[key]} must be >= 1)")
        if self.guidance_scale < 0:
            raise ValueError(f"sampling option guidance_scale must be >= 0, got {self.guidance_scale} (--guidance)")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampling option sampler must be one of {SAMPLERS}, got {self.sampler!r} (--sampler)")
        if self.prompt_rewriter is not None or self.rewrite_instruction is not None:
            from align.prompting import check_rewriter_options

            check_rewriter_options(self.prompt_rewriter, self.rewrite_instruction)

    @property
    def size(self) -> tuple[int | None, int | None, int | None]:
        """``(num_frames, height, width)``; None keeps the model's."""
        return self.num_frames, self.height, self.width

    def expand(self, prompts: list[str]) -> tuple[list[str], list[int]]:
        """Each prompt ``seeds_per_prompt`` times, with seeds ``seed, seed + 1, ...`` over the
        whole list (the layout of ``vidalign generate --num K``)."""
        out = [p for p in prompts for _ in range(self.seeds_per_prompt)]
        return out, [self.seed + i for i in range(len(out))]

    def replace(self, **changes) -> SamplingOptions:
        """A copy with ``changes`` (checked again)."""
        return replace(self, **changes)


def initial_noise(shape: tuple[int, ...], seeds: list[int], device="cpu") -> torch.Tensor:
    """One standard-normal latent per seed, ``(len(seeds), *shape)``, independent of batching."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]).to(device)


def guided_prediction(predict, x: torch.Tensor, t: torch.Tensor, cond, uncond, scale: float) -> torch.Tensor:
    """``predict(x, t, cond)`` with classifier-free guidance ``u + scale * (c - u)``, ``u`` on
    ``uncond`` (one batched call); plain ``predict`` when ``scale`` is 1 or ``uncond`` is None.
    Used by the samplers and by RWR's guided loss (``rwr_guidance_scale``)."""
    if scale == 1.0 or uncond is None:
        return predict(x, t, cond)
    c, u = predict(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, uncond])).chunk(2)
    return u + scale * (c - u)


def _guided(model: VideoDiffusionModel, x: torch.Tensor, t: float, cond, uncond, scale: float) -> torch.Tensor:
    tt = torch.full((x.shape[0],), float(t), device=x.device)
    return guided_prediction(model.predict, x, tt, cond, uncond, scale)


@torch.no_grad()
def sample_latents(
    model: VideoDiffusionModel,
    prompts: list[str],
    seeds: list[int],
    num_steps: int = 20,
    guidance_scale: float = 4.0,
) -> torch.Tensor:
    """Sample latents for ``prompts`` (one per seed) with DDIM (eta=0) or flow Euler."""
    if len(prompts) != len(seeds):
        raise ValueError(f"need one seed per prompt: {len(prompts)} prompts, {len(seeds)} seeds")
    if not prompts:
        raise ValueError("sample_latents: empty prompt list")
    sched = model.scheduler
    device = next(model.denoiser.parameters()).device
    x = initial_noise(model.latent_shape, seeds, device)
    cond = model.encode_prompts(list(prompts))
    uncond = model.encode_prompts([""] * len(prompts)) if guidance_scale != 1.0 else None
    T = sched.num_train_timesteps
    if model.prediction_type == "flow":
        sigmas = sched.shift_sigma(torch.linspace(1.0, 0.0, num_steps + 1))
        for i in range(num_steps):
            v = _guided(model, x, sigmas[i].item() * T, cond, uncond, guidance_scale)
            x = x + (sigmas[i + 1] - sigmas[i]).item() * v
        return x
    ts = torch.linspace(T - 1, 0, num_steps).round()
    acp = sched.alphas_cumprod.to(device)
    for i, t in enumerate(ts):
        out = _guided(model, x, t.item(), cond, uncond, guidance_scale)
        x0, eps = sched.predict_x0_eps(x, out, torch.full((x.shape[0],), t.item(), device=device))
        a_prev = acp[int(ts[i + 1])] if i + 1 < num_steps else torch.tensor(1.0, device=device)
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    return x


@torch.no_grad()
def generate(
    model: VideoDiffusionModel,
    prompts: list[str],
    seeds: list[int],
    num_steps: int = 20,
    guidance_scale: float = 4.0,
    batch_size: int = 128,
    progress: bool = False,
    desc: str = "sampling",
) -> torch.Tensor:
    """Videos ``(B, C, T, H, W)`` in [-1, 1] for prompts and seeds, in batches (a cascade's final
    videos: ``model.decode_videos`` runs its later stages)."""
    if not prompts:
        raise ValueError("generate: empty prompt list")
    if len(seeds) != len(prompts):
        raise ValueError(f"generate: need one seed per prompt: {len(prompts)} prompts, {len(seeds)} seeds")
    out = []
    for i in tqdm(range(0, len(prompts), batch_size), desc=desc, disable=not progress, leave=False):
        lat = sample_latents(model, prompts[i : i + batch_size], seeds[i : i + batch_size], num_steps, guidance_scale)
        out.append(model.decode_videos(lat, prompts[i : i + batch_size], seeds[i : i + batch_size]).cpu())
    return torch.cat(out)


# -----------------------------------------------------------------------------------------
# Stochastic steps with log-probabilities (GRPO rollouts)


class StepOutput(NamedTuple):
    """One stochastic denoising step: the sample, its Gaussian log-probability ``(B,)``, the
    step's mean (shape of the latents) and its standard deviation ``(B,)`` (one per sample)."""

    x_next: torch.Tensor
    log_prob: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor


LOG_PROB_REDUCTIONS = ("mean", "sum")


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Log-density of ``x`` under ``N(mean, std^2 I)`` per sample, ``(B,)``: the per-element
    log-density averaged (``mean``, Flow-GRPO's and DDPO's choice, which makes the likelihood
    ratio the geometric mean of the per-element ratios and independent of the latent size) or
    summed (``sum``, the exact log-density) over every dim but the batch. ``std`` is ``(B,)``."""
    if reduction not in LOG_PROB_REDUCTIONS:
        raise ValueError(f"reduction must be one of {LOG_PROB_REDUCTIONS}, got {reduction!r}")
    sd = std.float().reshape(-1, *([1] * (x.dim() - 1)))
    lp = -((x.float() - mean.float()) ** 2) / (2 * sd**2) - torch.log(sd) - 0.5 * math.log(2 * math.pi)
    lp = lp.flatten(1)
    return lp.mean(dim=1) if reduction == "mean" else lp.sum(dim=1)


def _per_sample(v: float | torch.Tensor, batch: int, device) -> torch.Tensor:
    """A float or a ``(B,)`` / scalar tensor as a float32 ``(B,)`` tensor."""
    t = torch.as_tensor(v, dtype=torch.float32, device=device)
    return t.expand(batch).clone() if t.dim() == 0 else t.reshape(batch)


def _finish_step(x_next, mean, std, noise, reduction) -> StepOutput:
    """Draw ``x_next = mean + std * noise`` unless given, then its log-probability."""
    if x_next is None:
        if noise is None:
            raise ValueError("a stochastic step needs either x_next (to score) or noise (to sample)")
        x_next = mean + std.reshape(-1, *([1] * (mean.dim() - 1))) * noise.float()
    return StepOutput(x_next.float(), gaussian_log_prob(x_next.detach(), mean, std, reduction), mean, std)


def flow_sde_step(
    velocity: torch.Tensor,
    x: torch.Tensor,
    s: float | torch.Tensor,
    s_next: float | torch.Tensor,
    sde_noise: float,
    x_next: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    reduction: str = "mean",
) -> StepOutput:
    """One Euler-Maruyama step, from noise level ``s`` down to ``s_next`` (floats or ``(B,)``, in
    [0, 1]), of the reverse SDE that has the flow ODE's marginals (Flow-GRPO, Liu et al. 2025).

    Derivation. With ``x_s = (1 - s) x0 + s eps`` and the velocity ``v = eps - x0``, the
    probability-flow ODE is ``dx = v ds``. Since ``E[eps | x_s] = x_s + (1 - s) v``, the score is
    ``grad log p_s(x) = -(x + (1 - s) v) / s``. Every SDE ``dx = [v - (sigma^2 / 2) grad log p] ds
    + sigma dw`` run backwards in ``s`` has the same marginals as the ODE (Song et al. 2021, the
    reverse-time SDE with the drift corrected by half the diffusion times the score), i.e.

        dx = [v + sigma_s^2 / (2 s) (x + (1 - s) v)] ds + sigma_s dw,   sigma_s = a sqrt(s / (1 - s))

    with ``a = sde_noise``. Euler-Maruyama with ``ds = s_next - s < 0`` gives a Gaussian step

        mean = x + [v + sigma_s^2 / (2 s) (x + (1 - s) v)] (s_next - s),
        std  = sigma_s sqrt(s - s_next).

    At ``s = 1`` (pure noise) ``sigma_s`` is infinite; as Flow-GRPO does (it uses the second
    sigma of the schedule there), ``1 - s`` in ``sigma_s`` is replaced by ``1 - s_next``.
    ``sde_noise = 0`` is the ODE's Euler step (std 0: sampling works, the log-probability does
    not). If ``x_next`` is given it is scored (the recomputation for the current policy), else
    it is drawn as ``mean + std * noise``. Computed in float32 (bf16 overflows here).
    """
    v, xf = velocity.float(), x.float()
    b, dev = x.shape[0], x.device
    s_, sn = _per_sample(s, b, dev), _per_sample(s_next, b, dev)
    if bool((sn >= s_).any()) or bool((s_ <= 0).any()):
        raise ValueError(f"flow_sde_step: need 0 <= s_next < s <= 1, got s={s_.tolist()}, s_next={sn.tolist()}")
    one_minus = torch.where(s_ >= 1, 1 - sn, 1 - s_).clamp(min=1e-6)
    sigma = sde_noise * torch.sqrt(s_ / one_minus)
    bs = lambda u: u.reshape(-1, *([1] * (x.dim() - 1)))  # noqa: E731
    drift = v + bs(sigma**2 / (2 * s_)) * (xf + bs(1 - s_) * v)
    mean = xf + drift * bs(sn - s_)
    std = sigma * torch.sqrt(s_ - sn)
    return _finish_step(x_next, mean, std, noise, reduction)


def ddim_step(
    model_out: torch.Tensor,
    x: torch.Tensor,
    t: float | torch.Tensor,
    t_next: float | torch.Tensor,
    sched,
    eta: float,
    x_next: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    reduction: str = "mean",
) -> StepOutput:
    """One DDIM step with ``eta > 0`` (Song et al. 2021, eq. 12; DDPO's ``ddim_step_with_logprob``,
    Black et al. 2023) for epsilon / v models, from timestep ``t`` to ``t_next < t`` (floats or
    ``(B,)``, integers in ``[0, T)``): with ``x0, eps`` predicted from ``model_out`` and
    ``a = alphas_cumprod``,

        std  = eta sqrt((1 - a_next) / (1 - a_t)) sqrt(1 - a_t / a_next),
        mean = sqrt(a_next) x0 + sqrt(1 - a_next - std^2) eps.

    ``t_next = 0`` means ``a_next = alphas_cumprod[0]`` (not 1, so that the last step keeps a
    positive std and a log-probability, as DDPO with ``set_alpha_to_one=False``). No x0
    clipping. Scores ``x_next`` if given, else draws ``mean + std * noise``; float32.
    """
    b, dev = x.shape[0], x.device
    tt, tn = _per_sample(t, b, dev), _per_sample(t_next, b, dev)
    if bool((tn >= tt).any()) or bool((tn < 0).any()):
        raise ValueError(f"ddim_step: need 0 <= t_next < t, got t={tt.tolist()}, t_next={tn.tolist()}")
    x0, eps = sched.predict_x0_eps(x.float(), model_out.float(), tt)
    acp = sched.alphas_cumprod.to(dev).float()
    a_t, a_n = acp[tt.long()], acp[tn.long()]
    std = eta * torch.sqrt((1 - a_n) / (1 - a_t)) * torch.sqrt((1 - a_t / a_n).clamp(min=0))
    bs = lambda u: u.reshape(-1, *([1] * (x.dim() - 1)))  # noqa: E731
    mean = bs(a_n.sqrt()) * x0 + bs((1 - a_n - std**2).clamp(min=0).sqrt()) * eps
    return _finish_step(x_next, mean, std, noise, reduction)


def stochastic_timesteps(model: VideoDiffusionModel, num_steps: int) -> torch.Tensor:
    """The ``num_steps + 1`` timesteps (model units, ``[0, T]``) a rollout visits: for flow models
    the shifted ``s = linspace(1, 0)`` times ``T`` (sample_latents' grid, DanceGRPO's
    ``sd3_time_shift`` grid); for epsilon / v models ``linspace(T - 1, 0).round()``. The model is
    called at the first ``num_steps``; steps ``0 .. num_steps - 2`` are stochastic, the last one
    lands on the clean end (``t = 0``; see :func:`sample_with_logprobs`)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    sched = model.scheduler
    T = sched.num_train_timesteps
    if model.prediction_type == "flow":
        return sched.shift_sigma(torch.linspace(1.0, 0.0, num_steps + 1)) * T
    return torch.linspace(T - 1, 0, num_steps + 1).round()


def policy_step(
    model: VideoDiffusionModel,
    x: torch.Tensor,
    t: torch.Tensor,
    t_next: torch.Tensor,
    cond,
    uncond,
    guidance_scale: float,
    sde_noise: float = 0.7,
    eta: float = 1.0,
    x_next: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    reduction: str = "mean",
    predict=None,
) -> StepOutput:
    """One stochastic step ``x`` (timestep ``t``) -> ``t_next`` (``(B,)`` each, model units) under
    the model's current guided prediction: the flow SDE step (``sde_noise``) for flow models,
    DDIM(``eta``) otherwise. With ``x_next`` it recomputes the log-probability of that recorded
    step (differentiable in the model's parameters: GRPO's new policy; under ``torch.no_grad`` or
    with adapters disabled: the rollout or reference policy); with ``noise`` it draws the step.
    The rollout calls it too, so recomputing a rollout step with the same weights and batch
    gives bit-identical log-probabilities (ratio exactly 1). ``predict(x, t, cond)`` replaces
    ``model.predict`` (a trainer passes its DDP / DeepSpeed-wrapped denoiser, so gradients sync)."""
    t = t.to(x.device).float()
    t_next = t_next.to(x.device).float()
    out = guided_prediction(model.predict if predict is None else predict, x, t, cond, uncond, guidance_scale)
    if model.prediction_type == "flow":
        T = model.scheduler.num_train_timesteps
        return flow_sde_step(out, x, t / T, t_next / T, sde_noise, x_next=x_next, noise=noise, reduction=reduction)
    return ddim_step(out, x, t, t_next, model.scheduler, eta, x_next=x_next, noise=noise, reduction=reduction)


def _step_noise(generators: list[torch.Generator], shape: tuple[int, ...], device) -> torch.Tensor:
    return torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device)


def ode_step(
    model: VideoDiffusionModel,
    x: torch.Tensor,
    t: torch.Tensor,
    t_next: torch.Tensor,
    cond,
    uncond,
    guidance_scale: float,
) -> torch.Tensor:
    """One deterministic step ``x`` (timestep ``t``) -> ``t_next`` (``(B,)`` each, model units) of the
    probability-flow ODE under the model's guided prediction, float32: for flow models the Euler step
    ``x + (s_next - s) v`` (:func:`sample_latents`' step; :func:`flow_sde_step`'s mean at
    ``sde_noise = 0``), for epsilon / v models DDIM with ``eta = 0`` to ``alphas_cumprod[t_next]``
    (:func:`ddim_step`'s mean at ``eta = 0``). No log-probability: MixGRPO's ODE steps outside its
    SDE window (:func:`sample_with_logprobs` with ``stochastic_steps``)."""
    t = t.to(x.device).float()
    t_next = t_next.to(x.device).float()
    out = guided_prediction(model.predict, x, t, cond, uncond, guidance_scale).float()
    bs = lambda u: u.reshape(-1, *([1] * (x.dim() - 1)))  # noqa: E731
    sched = model.scheduler
    if model.prediction_type == "flow":
        return x.float() + bs((t_next - t) / sched.num_train_timesteps) * out
    x0, eps = sched.predict_x0_eps(x.float(), out, t)
    a_n = sched.alphas_cumprod.to(x.device).float()[t_next.long()]
    return bs(a_n.sqrt()) * x0 + bs((1 - a_n).sqrt()) * eps


def clean_end(model: VideoDiffusionModel, x: torch.Tensor, t: torch.Tensor, cond, uncond, guidance_scale: float):
    """The last step of a rollout, from ``x`` at timestep ``t`` (``(B,)``) to the clean end: the
    model's guided x0 prediction, float32. For flow models it is exactly the ODE's Euler step to
    ``s = 0`` (``x - s v``); for epsilon / v models DDIM with ``eta = 0`` to ``alpha = 1``.

    Why. The video the judges score is the clean end of the trajectory, not the latent after one
    more SDE step: on the grid ``shift(linspace(1, 0))`` that step runs from ``shift(1 / N)`` to
    0 with fresh noise of std ``sde_noise sqrt(s / (1 - s)) sqrt(s)`` (0.20 at 10 steps,
    ``sde_noise`` 0.7, shift 3), so the judges would score noise the model does not make at
    evaluation. We decode the last model call's x0 prediction, which is what DanceGRPO decodes
    and, for flow models, exactly the ODE's last Euler step, and we make that last step
    deterministic rather than x0-decode beside a stochastic last step: a stochastic last step's
    noise never reaches the decoded video, so its policy-gradient term would have zero
    expectation (pure variance) -- DanceGRPO draws it and then drops it from training; we skip
    the draw. Every earlier step's sample does reach the video, so GRPO trains (a random share
    of) the ``S`` stochastic steps, all of which have log-probabilities (Flow-GRPO, with
    ``timestep_fraction`` 0.99 of 10 steps, also trains all but the last). Departure from
    Flow-GRPO: its last step keeps a little noise (std 0.006 on its SD3 grid, whose last step
    runs from s = 0.009 to 0), and it is in the decoded image; ours ends clean.
    """
    t = t.to(x.device).float()
    out = guided_prediction(model.predict, x, t, cond, uncond, guidance_scale)
    return model.scheduler.predict_x0_eps(x.float(), out.float(), t)[0]


def _rollout_steps(
    model: VideoDiffusionModel,
    x: torch.Tensor,
    grid: torch.Tensor,
    sde: set[int],
    gens: list[torch.Generator],
    cond,
    uncond,
    guidance_scale: float,
    noise: tuple[float, float],
    reduction: str,
    return_means: bool,
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """The ``len(grid) - 2`` steps of :func:`sample_with_logprobs` before its clean end: the
    trajectory (from ``x``), the log-probabilities (NaN for the ODE steps outside ``sde``) and,
    with ``return_means``, the step means. ``noise`` is ``(sde_noise, eta)``; each step draws
    its noise from ``gens`` whether it uses it or not."""
    shape, device = tuple(x.shape[1:]), x.device
    traj, lps, means = [x], [], []
    for i in range(len(grid) - 2):
        t, t_next = grid[i].expand(x.shape[0]), grid[i + 1].expand(x.shape[0])
        z = _step_noise(gens, shape, device)
        if i in sde:
            step = policy_step(model, x, t, t_next, cond, uncond, guidance_scale, *noise, noise=z, reduction=reduction)
            x, lp, mean = step.x_next, step.log_prob, step.mean
        else:
            x = mean = ode_step(model, x, t, t_next, cond, uncond, guidance_scale)
            lp = torch.full((x.shape[0],), float("nan"), device=x.device)
        traj.append(x)
        lps.append(lp)
        if return_means:
            means.append(mean)
    return traj, lps, means


@torch.no_grad()
def sample_with_logprobs(
    model: VideoDiffusionModel,
    prompts: list[str],
    seeds: list[int],
    num_steps: int = 10,
    guidance_scale: float = 4.0,
    sde_noise: float = 0.7,
    eta: float = 1.0,
    reduction: str = "mean",
    decode: bool = True,
    stochastic_steps: Collection[int] | None = None,
    return_means: bool = False,
) -> dict:
    """Stochastic rollouts with classifier-free guidance, recording every stochastic step for GRPO.

    Sample ``i`` starts from ``initial_noise``'s latent for ``seeds[i]`` (the same start as
    :func:`generate`) and draws its step noise from the same per-seed generator, so a rollout
    depends on its seed only, not on the batch it is in. ``num_steps`` model calls on the grid
    of :func:`stochastic_timesteps`: the first ``S = num_steps - 1`` are stochastic steps (flow
    models: the SDE of :func:`flow_sde_step`, noise ``sde_noise``; epsilon / v models: DDIM with
    ``eta``), each with its log-probability; the last is deterministic (:func:`clean_end`).

    The video the judges score is the clean end, not the latent after one more SDE step: no SDE
    noise is left in it (why: :func:`clean_end`).

    ``stochastic_steps`` (MixGRPO's SDE window): the steps in ``[0, S)`` drawn from the SDE; the
    others are ODE steps (:func:`ode_step`), their ``log_probs`` NaN. None = all ``S``. Step noise
    is drawn at every step, used or not (MixGRPO draws only inside), so a window covering all
    ``S`` steps is bit-identical to None. ``return_means`` adds ``means`` ``(B, S, *latent_shape)``
    (each step's Gaussian mean; the ODE result outside), for GRPO-Guard's ratio normalisation.

    Returns a dict: ``latents`` ``(B, S + 1, *latent_shape)`` (the stochastic trajectory, float32),
    ``clean`` ``(B, *latent_shape)`` (the clean end, what is decoded), ``log_probs`` ``(B, S)``
    (``reduction`` over elements), ``timesteps`` and ``next_timesteps`` ``(S,)``, ``cond`` /
    ``uncond`` (``uncond`` None without guidance) and, with ``decode``, ``videos`` uint8
    ``(B, T, H, W, C)``.
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"sample_with_logprobs: need one seed per prompt: {len(prompts)} prompts, {len(seeds)} seeds")
    if not prompts:
        raise ValueError("sample_with_logprobs: empty prompt list")
    if num_steps < 2:
        raise ValueError(
            f"sample_with_logprobs: num_steps must be >= 2 (the last step is the deterministic one to the "
            f"clean end, the others are stochastic), got {num_steps}"
        )
    noise_level = sde_noise if model.prediction_type == "flow" else eta
    if noise_level <= 0:
        name = "sde_noise" if model.prediction_type == "flow" else "eta"
        raise ValueError(f"sample_with_logprobs: {name} must be > 0 for a stochastic sampler, got {noise_level}")
    device = next(model.denoiser.parameters()).device
    shape = tuple(model.latent_shape)
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    x = _step_noise(gens, shape, device).float()  # == initial_noise(shape, seeds)
    cond = model.encode_prompts(list(prompts))
    uncond = model.encode_prompts([""] * len(prompts)) if guidance_scale != 1.0 else None
    grid = stochastic_timesteps(model, num_steps)
    S = num_steps - 1
    sde = set(range(S)) if stochastic_steps is None else {int(i) for i in stochastic_steps}
    if not sde <= set(range(S)):
        raise ValueError(f"sample_with_logprobs: stochastic_steps must lie in [0, {S}), got {sorted(sde)}")
    traj, lps, means = _rollout_steps(
        model, x, grid, sde, gens, cond, uncond, guidance_scale, (sde_noise, eta), reduction, return_means
    )
    x = traj[-1]
    clean = clean_end(model, x, grid[S].expand(x.shape[0]), cond, uncond, guidance_scale)
    result = {
        "latents": torch.stack(traj, dim=1),
        "clean": clean,
        "log_probs": torch.stack(lps, dim=1),
        "timesteps": grid[:S].clone(),
        "next_timesteps": grid[1 : S + 1].clone(),
        "cond": cond,
        "uncond": uncond,
    }
    if return_means:
        result["means"] = torch.stack(means, dim=1)
    if decode:
        result["videos"] = to_uint8(model.decode_videos(clean, list(prompts), list(seeds)).cpu())
    return result
