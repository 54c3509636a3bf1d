"""Alignment objectives as pure functions of per-sample denoising errors.

Every function takes tensors of shape ``(B,)`` and returns a dict of named terms whose
``"loss"`` entry is the scalar to minimise; the other entries are detached diagnostics.

Diffusion-DPO (Wallace et al. 2023, "Diffusion Model Alignment Using Direct Preference
Optimization"). For a pair (w = preferred, l = rejected) noised with the *same* noise and
timestep, with per-sample errors ``err = ||target - prediction||^2`` (mean over elements):

    inside = -0.5 * beta * ((err_w - err_l) - (ref_err_w - ref_err_l))

``-(err_w - ref_err_w)`` estimates the log-likelihood ratio of the policy over the reference
on the preferred sample, so ``inside`` is the DPO logit ``beta * (log-ratio_w - log-ratio_l)``.
The 0.5 and the *mean* over elements follow the diffusers research script
(``examples/research_projects/diffusion_dpo``); the paper's ``T * omega(lambda_t)`` weighting
is folded into ``beta``. This is why published betas carry over: SD1.5 used 2000-5000,
SDXL 5000. Because errors are means, beta does not depend on the latent size.

Flow-matching DPO uses the same formula with velocity errors (``target = eps - x0``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo")


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over every dim but the batch: ``(B, ...) -> (B,)``, in float32."""
    return (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)


def diffusion_dpo_loss(
    model_err_w: torch.Tensor,
    model_err_l: torch.Tensor,
    ref_err_w: torch.Tensor,
    ref_err_l: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
) -> dict[str, torch.Tensor]:
    """Diffusion-DPO loss from per-sample denoising errors of a preference pair batch.

    ``loss_type``:
      - ``sigmoid``: ``-log sigmoid(inside)`` (the paper).
      - ``hinge``: ``relu(1 - inside)`` (SLiC-style, as in the diffusers script).
      - ``ipo``: ``(inside / beta - 1 / (2 beta))^2`` (Azar et al. 2023): the squared
        distance of the beta-free log-ratio margin ``h = inside / beta`` to ``1/(2 beta)``;
        here beta plays IPO's tau.

    Returns ``loss`` (scalar mean), ``implicit_acc`` (share of pairs with ``inside > 0``,
    ties count one half), ``reward_margin`` (mean ``inside``), and the mean model and
    reference error gaps ``model_diff`` / ``ref_diff`` (``err_w - err_l``).
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {DPO_LOSS_TYPES}, got {loss_type!r}")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    shapes = {t.shape for t in (model_err_w, model_err_l, ref_err_w, ref_err_l)}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise ValueError(f"DPO errors must all have the same shape (B,), got {sorted(shapes)}")

    model_diff = model_err_w - model_err_l
    ref_diff = (ref_err_w - ref_err_l).detach()
    inside = -0.5 * beta * (model_diff - ref_diff)
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(inside)
    elif loss_type == "hinge":
        losses = F.relu(1 - inside)
    else:
        losses = (inside / beta - 1 / (2 * beta)) ** 2

    d = inside.detach()
    acc = (d > 0).float() + 0.5 * (d == 0).float()
    return {
        "loss": losses.mean(),
        "implicit_acc": acc.mean(),
        "reward_margin": d.mean(),
        "model_diff": model_diff.detach().mean(),
        "ref_diff": ref_diff.mean(),
    }


def diffusion_sft_loss(model_err: torch.Tensor) -> dict[str, torch.Tensor]:
    """Plain denoising loss (supervised fine-tuning on preferred samples): mean error."""
    return {"loss": model_err.mean()}


def rwr_weights(
    rewards: torch.Tensor, groups: torch.Tensor, temperature: float = 1.0, max_weight: float = 1.0
) -> torch.Tensor:
    """Reward-weighted regression weights: ``softmax(reward / temperature)`` within each group
    (samples of the same prompt), then clipped at ``max_weight``.

    Clipping caps how much one lucky sample can dominate its group. The mass removed by the
    cap is given back to the unclipped samples of the group in proportion to their weights
    (repeated until nothing exceeds the cap), so each group's weights still sum to one. A
    group of ``n`` samples needs ``max_weight >= 1/n``; ``max_weight = 1`` disables clipping.
    Returns ``(B,)`` weights, no gradient.
    """
    if rewards.shape != groups.shape or rewards.dim() != 1:
        raise ValueError(f"rwr_weights: rewards and groups must both be (B,), got {rewards.shape}, {groups.shape}")
    if temperature <= 0:
        raise ValueError(f"rwr_weights: temperature must be > 0, got {temperature}")
    if not torch.isfinite(rewards).all():
        raise ValueError("rwr_weights: rewards contain NaN or inf")
    rewards = rewards.detach().double()
    w = torch.zeros_like(rewards)
    for g in torch.unique(groups):
        m = groups == g
        n = int(m.sum())
        if max_weight * n < 1 - 1e-9:
            raise ValueError(f"rwr_weights: max_weight {max_weight} < 1/{n} for a group of {n} samples")
        wg = torch.softmax(rewards[m] / temperature, dim=0)
        for _ in range(n):
            over = wg > max_weight
            if not over.any():
                break
            excess = (wg[over] - max_weight).sum()
            wg = torch.where(over, torch.full_like(wg, max_weight), wg)
            free = wg < max_weight
            wg = torch.where(free, wg + excess * wg / wg[free].sum(), wg)
        w[m] = wg
    return w.float()


def rwr_loss(model_err: torch.Tensor, weights: torch.Tensor, num_groups: int | None = None) -> dict[str, torch.Tensor]:
    """Reward-weighted regression (Peng et al. 2019; Lee et al. 2023 for text-to-image):
    the denoising loss of each sample weighted by its RWR weight, summed and divided by the
    number of groups, so a group counts once however many samples it has.

    Returns ``loss``, ``weighted_err`` (detached), ``mean_err`` (unweighted, for comparison)
    and ``ess`` (effective sample size ``(sum w)^2 / sum w^2``)."""
    if model_err.shape != weights.shape or model_err.dim() != 1:
        raise ValueError(f"rwr_loss: expected two (B,) tensors, got {model_err.shape}, {weights.shape}")
    g = num_groups if num_groups is not None else max(1.0, float(weights.sum()))
    loss = (weights * model_err).sum() / g
    ess = weights.sum() ** 2 / (weights.pow(2).sum() + 1e-12)
    return {"loss": loss, "weighted_err": loss.detach(), "mean_err": model_err.mean().detach(), "ess": ess.detach()}


def group_advantages(
    rewards: torch.Tensor, groups: torch.Tensor, eps: float = 1e-4, global_std: bool = False
) -> torch.Tensor:
    """GRPO's group-normalised advantages (Shao et al. 2024; Flow-GRPO, Liu et al. 2025):
    ``(r - mean_group) / (std_group + eps)`` for each sample, ``groups`` naming the prompt
    group of each. The std is the population std (``ddof = 0``, as Flow-GRPO's ``np.std``);
    with ``global_std`` it is the std of all ``rewards`` instead (Flow-GRPO's ``global_std``
    option), the mean still the group's. A group of one sample gets advantage 0. Pass the
    rewards of *every* process (gathered) so all processes compute the same advantages.
    Returns ``(N,)`` float32, no gradient."""
    if rewards.dim() != 1 or rewards.shape != groups.shape:
        raise ValueError(f"group_advantages: rewards and groups must both be (N,), got {rewards.shape}, {groups.shape}")
    if not torch.isfinite(rewards).all():
        raise ValueError("group_advantages: rewards contain NaN or inf")
    if eps <= 0:
        raise ValueError(f"group_advantages: eps must be > 0, got {eps}")
    r = rewards.detach().double()
    adv = torch.zeros_like(r)
    all_std = r.std(unbiased=False) if r.numel() > 1 else r.new_zeros(())
    for g in torch.unique(groups):
        m = groups == g
        std = all_std if global_std else r[m].std(unbiased=False)
        adv[m] = (r[m] - r[m].mean()) / (std + eps)
    return adv.float()


def gaussian_kl(mean: torch.Tensor, ref_mean: torch.Tensor, std: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """KL between two Gaussian steps with the same std, ``KL(N(mean, s^2) || N(ref_mean, s^2))
    = ||mean - ref_mean||^2 / (2 s^2)`` per sample ``(B,)`` (Flow-GRPO's KL to the reference).
    ``std`` is ``(B,)``; ``reduction`` over elements is ``mean`` (Flow-GRPO, matching the
    mean-reduced log-probabilities of ``align.sample``) or ``sum`` (the exact KL)."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"gaussian_kl: reduction must be 'mean' or 'sum', got {reduction!r}")
    if mean.shape != ref_mean.shape:
        raise ValueError(f"gaussian_kl: mean {tuple(mean.shape)} and ref_mean {tuple(ref_mean.shape)} differ")
    sq = (mean.float() - ref_mean.float()).pow(2).flatten(1)
    sq = sq.mean(dim=1) if reduction == "mean" else sq.sum(dim=1)
    return sq / (2 * std.float().reshape(-1) ** 2)


def guard_log_ratio(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    mean: torch.Tensor,
    old_mean: torch.Tensor,
    std: torch.Tensor,
) -> torch.Tensor:
    """GRPO-Guard's ratio normalisation (RatioNorm; Wang et al. 2025) of one Gaussian step's
    log-ratio, per sample ``(B,)``:

        b = mean((mean - old_mean)^2) / (2 std^2)
        log_ratio = (log_prob - old_log_prob + b) * std

    Why. For ``x_next = old_mean + std eps`` the mean-reduced log-ratio is ``-b - mean(eps
    (old_mean - mean)) / std``: its mean ``-b`` is below 0 (the ratio is left-shifted) and its
    spread scales with ``1 / std``, i.e. with the timestep. Adding ``b`` centres it on 0 and
    multiplying by ``std`` makes it ``mean(eps (mean - old_mean))``, the same scale at every
    step, so one ``clip_range`` clips positive and negative advantages alike at every step.

    ``log_prob`` / ``old_log_prob`` are mean-reduced over elements (vidalign's and Flow-GRPO's
    convention), ``mean`` the current policy's step mean (with gradient: ``b`` is part of the
    objective, as in verl-omni's ``GRPOGuardLoss``), ``old_mean`` the rollout policy's, ``std``
    the step's std ``(B,)`` (``sigma_t sqrt(|dt|)``). Departure from verl-omni: ``std`` is each
    sample's own, not the micro-batch's mean (the same when a micro-batch shares one step)."""
    if mean.shape != old_mean.shape or mean.shape[0] != log_prob.shape[0]:
        raise ValueError(f"guard_log_ratio: mean {tuple(mean.shape)} and old_mean {tuple(old_mean.shape)} differ")
    if log_prob.shape != old_log_prob.shape or log_prob.dim() != 1:
        raise ValueError(f"guard_log_ratio: log_prob and old_log_prob must be (B,), got {log_prob.shape}")
    s = std.float().reshape(-1)
    bias = (mean.float() - old_mean.detach().float()).pow(2).flatten(1).mean(dim=1) / (2 * s**2)
    return (log_prob.float() - old_log_prob.detach().float() + bias) * s


def grpo_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    clip_range: float,
    kl: torch.Tensor | None = None,
    kl_weight: float = 0.0,
    log_ratio: torch.Tensor | None = None,
    step_weights: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """GRPO / PPO-clip loss of one denoising step per sample (Flow-GRPO's per-step objective):

        ratio = exp(log_prob - old_log_prob)
        loss  = mean(max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps))) + kl_weight mean(kl)

    ``log_prob`` is the current policy's (with gradient), ``old_log_prob`` the rollout
    policy's, ``advantages`` from :func:`group_advantages`, ``kl`` per sample to the reference
    (:func:`gaussian_kl`), all ``(B,)``. Returns ``loss``, ``policy_loss``, ``clip_fraction``
    (share with ``|ratio - 1| > eps``), ``approx_kl`` (``0.5 mean((log_prob - old)^2)``, as
    DDPO / Flow-GRPO log it), ``ratio_mean`` / ``ratio_max`` / ``ratio_min`` and ``kl`` (mean,
    0 without a KL term); diagnostics detached.

    GRPO-Guard (:func:`guard_log_ratio`): ``log_ratio`` ``(B,)`` replaces ``log_prob -
    old_log_prob`` in the ratio (and its clip statistics; ``approx_kl`` stays the raw
    log-ratio's), and ``step_weights`` ``(B,)`` (its ``1 / |dt|``) weigh each sample's clipped
    term before the mean. Both None: the plain loss above, unchanged."""
    if clip_range <= 0:
        raise ValueError(f"grpo_loss: clip_range must be > 0, got {clip_range}")
    if kl_weight < 0:
        raise ValueError(f"grpo_loss: kl_weight must be >= 0, got {kl_weight}")
    shapes = {log_prob.shape, old_log_prob.shape, advantages.shape} | ({kl.shape} if kl is not None else set())
    if len(shapes) != 1 or log_prob.dim() != 1:
        raise ValueError(f"grpo_loss: log_prob, old_log_prob, advantages (and kl) must all be (B,), got {shapes}")
    if kl_weight > 0 and kl is None:
        raise ValueError("grpo_loss: kl_weight > 0 needs kl")
    if any(v is not None and v.shape != log_prob.shape for v in (log_ratio, step_weights)):
        raise ValueError(f"grpo_loss: log_ratio and step_weights must be (B,) like log_prob {tuple(log_prob.shape)}")
    diff = log_prob.float() - old_log_prob.detach().float()
    ratio = torch.exp(diff if log_ratio is None else log_ratio.float())
    adv = advantages.detach().float()
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    per_sample = torch.maximum(unclipped, clipped)
    if step_weights is not None:
        per_sample = per_sample * step_weights.detach().float()
    policy_loss = per_sample.mean()
    kl_mean = kl.float().mean() if kl is not None else policy_loss.new_zeros(())
    loss = policy_loss + kl_weight * kl_mean if kl_weight > 0 else policy_loss
    r = ratio.detach()
    return {
        "loss": loss,
        "policy_loss": policy_loss.detach(),
        "clip_fraction": ((r - 1.0).abs() > clip_range).float().mean(),
        "approx_kl": 0.5 * diff.detach().pow(2).mean(),
        "ratio_mean": r.mean(),
        "ratio_max": r.max(),
        "ratio_min": r.min(),
        "kl": kl_mean.detach(),
    }


# ---------------------------------------------------------------- DiffusionNFT


def optimality_probability(advantages: torch.Tensor, adv_clip_max: float) -> torch.Tensor:
    """DiffusionNFT's optimality probability ``r`` of each sample (Zheng et al. 2025; NVlabs
    ``train_nft_sd3.py``): the advantage clipped to ``[-c, c]`` and mapped linearly onto
    ``[0, 1]``, ``r = clip(adv, -c, c) / (2 c) + 1/2`` (0 = worst, 1/2 = the group's mean,
    1 = best), ``c = adv_clip_max``. Returns ``(B,)`` float32, no gradient."""
    if not adv_clip_max > 0:
        raise ValueError(f"optimality_probability: adv_clip_max must be > 0, got {adv_clip_max}")
    a = advantages.detach().float().clamp(-adv_clip_max, adv_clip_max)
    return (a / adv_clip_max / 2.0 + 0.5).clamp(0.0, 1.0)


def _nft_term(err: torch.Tensor, adaptive: bool) -> torch.Tensor:
    """Per-sample ``mean(err^2)``, divided (``adaptive``) by the detached ``mean |err|`` (>= 1e-5)."""
    sq = err.float().pow(2).flatten(1).mean(1)
    if not adaptive:
        return sq
    return sq / err.detach().double().abs().flatten(1).mean(1).clamp(min=1e-5).float()


def nft_loss(
    pred: torch.Tensor,
    old_pred: torch.Tensor,
    target: torch.Tensor,
    r: torch.Tensor,
    beta: float = 1.0,
    scale: torch.Tensor | None = None,
    adaptive: bool = True,
    loss_scale: float = 1.0,
    kl: torch.Tensor | None = None,
    kl_weight: float = 0.0,
) -> dict[str, torch.Tensor]:
    """DiffusionNFT's negative-aware loss (Zheng et al. 2025) on one batch of forward-process
    samples. With the trained prediction ``v = pred``, the old (sampling) policy's ``v_old``
    (no gradient) and ``beta``:

        v+ = beta v + (1 - beta) v_old          (the implicit positive policy)
        v- = (1 + beta) v_old - beta v          (the implicit negative policy)
        e+ = scale (v+ - target),  e- = scale (v- - target)
        loss = loss_scale * mean_b[(r_b ||e+_b||^2 / w+_b + (1 - r_b) ||e-_b||^2 / w-_b) / beta]
               + kl_weight * mean(kl)

    ``||.||^2`` is the mean over elements; ``w`` is the detached mean ``|e|`` of the sample
    (>= 1e-5; NVlabs' adaptive weighting) when ``adaptive``, else 1. ``scale`` ``(B,)`` maps
    prediction errors into x0 errors (flow: ``x0 = x_t - s v`` so ``s``; NVlabs computes the
    loss on ``x0`` predictions, which is this with ``scale = s``); None = 1. ``loss_scale`` is
    NVlabs' ``adv_clip_max`` factor. ``r`` ``(B,)`` from :func:`optimality_probability`.
    Diagnostics: the two terms, ``old_deviation`` ``mean (v - v_old)^2``, ``r_mean`` and ``kl``."""
    if not beta > 0:
        raise ValueError(f"nft_loss: beta must be > 0, got {beta}")
    if pred.shape != old_pred.shape or pred.shape != target.shape:
        shapes = (tuple(pred.shape), tuple(old_pred.shape), tuple(target.shape))
        raise ValueError(f"nft_loss: pred, old_pred and target must have one shape, got {shapes}")
    if r.shape != pred.shape[:1]:
        raise ValueError(f"nft_loss: r must be ({pred.shape[0]},), got {tuple(r.shape)}")
    old = old_pred.detach()
    view = (-1,) + (1,) * (pred.dim() - 1)
    s = scale.detach().float().view(view) if scale is not None else 1.0
    pos = _nft_term(s * (beta * pred.float() + (1 - beta) * old.float() - target.float()), adaptive)
    neg = _nft_term(s * ((1 + beta) * old.float() - beta * pred.float() - target.float()), adaptive)
    rr = r.detach().float()
    per_sample = (rr * pos + (1 - rr) * neg) / beta
    policy_loss = loss_scale * per_sample.mean()
    kl_mean = kl.float().mean() if kl is not None else policy_loss.new_zeros(())
    loss = policy_loss + kl_weight * kl_mean if kl_weight > 0 else policy_loss
    return {
        "loss": loss,
        "policy_loss": policy_loss.detach(),
        "positive_loss": pos.detach().mean(),
        "negative_loss": neg.detach().mean(),
        "old_deviation": (pred.detach().float() - old.float()).pow(2).mean(),
        "r_mean": rr.mean(),
        "kl": kl_mean.detach(),
    }
