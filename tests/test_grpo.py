"""GRPO: stochastic steps with log-probabilities, group advantages and the clipped objective."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import PROMPT, SMALL
from torch.distributions import Normal

from align.models.tiny_sora import TinySora, TinySoraConfig
from align.objectives import gaussian_kl, group_advantages, grpo_loss
from align.sample import (
    ddim_step,
    flow_sde_step,
    gaussian_log_prob,
    initial_noise,
    policy_step,
    sample_with_logprobs,
)
from align.schedules import NoiseSchedule

OTHER = "a blue circle moving up on a gray background"


def _tensors(seed: int, shape=(2, 3, 1, 2, 2)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(3)]


# -- one step against a hand-computed Gaussian density -------------------------------------------


def test_flow_sde_step_log_prob_is_the_hand_computed_gaussian():
    x, v, x_next = _tensors(0)
    s, sn, a = 0.6, 0.4, 0.7
    out = flow_sde_step(v, x, s, sn, a, x_next=x_next)
    sigma = a * math.sqrt(s / (1 - s))
    mean = x + (v + sigma**2 / (2 * s) * (x + (1 - s) * v)) * (sn - s)
    std = sigma * math.sqrt(s - sn)
    dens = Normal(mean, std).log_prob(x_next)
    torch.testing.assert_close(out.mean, mean)
    torch.testing.assert_close(out.std, torch.full((2,), std))
    torch.testing.assert_close(out.log_prob, dens.flatten(1).mean(1))
    summed = flow_sde_step(v, x, s, sn, a, x_next=x_next, reduction="sum").log_prob
    torch.testing.assert_close(summed, dens.flatten(1).sum(1))
    # one element by hand, in plain floats
    e = (x.flatten()[0].item(), v.flatten()[0].item(), x_next.flatten()[0].item())
    m = e[0] + (e[1] + sigma**2 / (2 * s) * (e[0] + (1 - s) * e[1])) * (sn - s)
    lp = -((e[2] - m) ** 2) / (2 * std**2) - math.log(std) - 0.5 * math.log(2 * math.pi)
    assert out.mean.flatten()[0].item() == pytest.approx(m, rel=1e-5)
    assert dens.flatten()[0].item() == pytest.approx(lp, rel=1e-5)


def test_flow_sde_step_at_pure_noise_and_without_noise():
    x, v, z = _tensors(1)
    # s = 1: 1 - s in sigma is replaced by 1 - s_next (Flow-GRPO), so the std is finite
    out = flow_sde_step(v, x, 1.0, 0.8, 0.5, noise=z)
    sigma = 0.5 * math.sqrt(1.0 / 0.2)
    torch.testing.assert_close(out.std, torch.full((2,), sigma * math.sqrt(0.2)))
    assert torch.isfinite(out.log_prob).all()
    torch.testing.assert_close(out.x_next, out.mean + out.std[0] * z)
    # sde_noise 0 is the ODE's Euler step
    ode = flow_sde_step(v, x, 0.6, 0.4, 0.0, noise=z)
    torch.testing.assert_close(ode.x_next, x - 0.2 * v)
    # per-sample noise levels
    per = flow_sde_step(v, x, torch.tensor([0.6, 1.0]), torch.tensor([0.4, 0.8]), 0.5, x_next=z)
    torch.testing.assert_close(per.log_prob[1], flow_sde_step(v, x, 1.0, 0.8, 0.5, x_next=z).log_prob[1])
    with pytest.raises(ValueError, match="s_next < s"):
        flow_sde_step(v, x, 0.4, 0.6, 0.5, noise=z)


def test_ddim_step_log_prob_is_the_hand_computed_gaussian():
    sched = NoiseSchedule("epsilon")
    x, eps_hat, x_next = _tensors(2)
    t, tn, eta = 600, 400, 0.8
    out = ddim_step(eps_hat, x, t, tn, sched, eta, x_next=x_next)
    a_t, a_n = sched.alphas_cumprod[t].item(), sched.alphas_cumprod[tn].item()
    x0 = (x - math.sqrt(1 - a_t) * eps_hat) / math.sqrt(a_t)
    std = eta * math.sqrt((1 - a_n) / (1 - a_t)) * math.sqrt(1 - a_t / a_n)
    mean = math.sqrt(a_n) * x0 + math.sqrt(1 - a_n - std**2) * eps_hat
    torch.testing.assert_close(out.mean, mean)
    torch.testing.assert_close(out.std, torch.full((2,), std))
    torch.testing.assert_close(out.log_prob, Normal(mean, std).log_prob(x_next).flatten(1).mean(1))
    # the last step ends at alphas_cumprod[0] < 1: a positive std
    last = ddim_step(eps_hat, x, 100, 0, sched, eta, x_next=x_next)
    assert (last.std > 0).all() and torch.isfinite(last.log_prob).all()
    # v-prediction goes through the same step with its own x0 / eps
    vs = NoiseSchedule("v")
    v_out = ddim_step(eps_hat, x, t, tn, vs, eta, x_next=x_next)
    x0v, epsv = vs.predict_x0_eps(x, eps_hat, torch.full((2,), float(t)))
    torch.testing.assert_close(v_out.mean, math.sqrt(a_n) * x0v + math.sqrt(1 - a_n - std**2) * epsv)


def _final_std(step, n: int = 20000, c: float = 0.5, steps: int = 100, seed: int = 0) -> float:
    """Run a sampler on 1-D Gaussian data N(0, c^2) with the exact denoiser; return the std."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, generator=g)
    for i in range(steps):
        x = step(x, i, steps, torch.randn(n, 1, generator=g), c)
    return x.std().item()


def test_stochastic_samplers_keep_the_marginals():
    """With the exact velocity / epsilon of Gaussian data, the SDE and DDIM(eta=1) end at the
    data distribution, as the deterministic samplers do (the SDE has the ODE's marginals)."""

    def flow(x, i, n, z, c):
        s, sn = 1 - i / n, 1 - (i + 1) / n
        v = (s - (1 - s) * c**2) * x / ((1 - s) ** 2 * c**2 + s**2)  # E[eps - x0 | x_s]
        return flow_sde_step(v, x, s, sn, 0.7, noise=z).x_next

    sched = NoiseSchedule("epsilon")
    ts = torch.linspace(999, 0, 101).round()

    def ddim(x, i, n, z, c):
        a = sched.alphas_cumprod[int(ts[i])].item()
        eps = math.sqrt(1 - a) * x / (a * c**2 + 1 - a)  # E[eps | x_t]
        return ddim_step(eps, x, ts[i].item(), ts[i + 1].item(), sched, 1.0, noise=z).x_next

    assert _final_std(flow) == pytest.approx(0.5, abs=0.02)
    assert _final_std(ddim) == pytest.approx(0.5, abs=0.02)


def test_gaussian_log_prob_errors():
    x, m, _ = _tensors(3)
    with pytest.raises(ValueError, match="reduction"):
        gaussian_log_prob(x, m, torch.ones(2), reduction="max")
    with pytest.raises(ValueError, match="x_next .* or noise"):
        flow_sde_step(m, x, 0.6, 0.4, 0.5)


# -- rollouts on the tiny model --------------------------------------------------------------------


def _tiny(prediction_type: str) -> TinySora:
    torch.manual_seed(0)
    m = TinySora(TinySoraConfig(**SMALL, prediction_type=prediction_type))
    torch.nn.init.normal_(m.denoiser.out.weight, std=0.05)
    return m.eval()


@pytest.mark.parametrize("prediction_type", ["flow", "epsilon"])
def test_rollout_records_steps_that_recompute_exactly(prediction_type):
    m = _tiny(prediction_type)
    r = sample_with_logprobs(m, [PROMPT, OTHER], [3, 4], num_steps=3, guidance_scale=2.0, sde_noise=0.7, eta=1.0)
    B, S = 2, 3
    assert r["latents"].shape == (B, S + 1, *m.latent_shape)
    assert r["log_probs"].shape == (B, S) and torch.isfinite(r["log_probs"]).all()
    assert r["timesteps"].shape == (S,) and (r["next_timesteps"] < r["timesteps"]).all()
    assert r["videos"].dtype.name == "uint8" and r["videos"].shape[0] == B and r["videos"].shape[-1] == 3
    torch.testing.assert_close(r["latents"][:, 0], initial_noise(m.latent_shape, [3, 4]))  # generate's start
    lat = r["latents"]
    with torch.no_grad():
        for j in range(S):
            t, tn = r["timesteps"][j].expand(B), r["next_timesteps"][j].expand(B)
            out = policy_step(m, lat[:, j], t, tn, r["cond"], r["uncond"], 2.0, 0.7, 1.0, x_next=lat[:, j + 1])
            assert torch.equal(out.log_prob, r["log_probs"][:, j])  # same weights: ratio exactly 1


def test_rollout_depends_on_the_seed_not_the_batch():
    m = _tiny("flow")
    a = sample_with_logprobs(m, [PROMPT, OTHER], [3, 4], num_steps=2, guidance_scale=2.0, decode=False)
    b = sample_with_logprobs(m, [OTHER, PROMPT], [9, 3], num_steps=2, guidance_scale=2.0, decode=False)
    torch.testing.assert_close(a["latents"][0], b["latents"][1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a["log_probs"][0], b["log_probs"][1], atol=1e-5, rtol=1e-5)
    c = sample_with_logprobs(m, [PROMPT], [5], num_steps=2, guidance_scale=2.0, decode=False)
    assert not torch.allclose(a["latents"][0, -1], c["latents"][0, -1])
    with pytest.raises(ValueError, match="sde_noise must be > 0"):
        sample_with_logprobs(m, [PROMPT], [0], num_steps=2, sde_noise=0.0)
    with pytest.raises(ValueError, match="one seed per prompt"):
        sample_with_logprobs(m, [PROMPT], [0, 1], num_steps=2)


# -- advantages, clipping and KL by hand -----------------------------------------------------------


def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 7.0, 4.0])
    g = torch.tensor([0, 0, 0, 1, 1, 1, 2])
    adv = group_advantages(r, g, eps=1e-4)
    s0 = math.sqrt(2 / 3)  # population std of 1, 2, 3
    s1 = math.sqrt(((5 - 17 / 3) ** 2 * 2 + (7 - 17 / 3) ** 2) / 3)
    want = [-1 / (s0 + 1e-4), 0.0, 1 / (s0 + 1e-4)] + [(v - 17 / 3) / (s1 + 1e-4) for v in (5, 5, 7)] + [0.0]
    torch.testing.assert_close(adv, torch.tensor(want))
    glob = group_advantages(r, g, eps=1e-4, global_std=True)
    sg = r.double().std(unbiased=False).item()
    torch.testing.assert_close(glob[:3], torch.tensor([-1.0, 0.0, 1.0]) / (sg + 1e-4))
    # equal rewards in a group: all zero, not NaN
    assert torch.equal(group_advantages(torch.ones(3), torch.zeros(3, dtype=torch.long)), torch.zeros(3))
    with pytest.raises(ValueError, match="NaN"):
        group_advantages(torch.tensor([1.0, float("nan")]), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="both be"):
        group_advantages(torch.ones(3), torch.zeros(2))


def test_grpo_loss_clipping_by_hand():
    ratio = torch.tensor([1.5, 0.5, 1.1, 0.9, 0.5])
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0, -1.0])
    old = torch.tensor([0.3, -0.2, 0.1, 0.0, 1.0])
    lp = (old + ratio.log()).requires_grad_()
    out = grpo_loss(lp, old, adv, clip_range=0.2)
    # per sample max(-A r, -A clip(r)): -1.2 (clipped), -0.5, 1.1, 0.9, 0.8 (clipped)
    assert out["loss"].item() == pytest.approx((-1.2 - 0.5 + 1.1 + 0.9 + 0.8) / 5, abs=1e-6)
    assert out["clip_fraction"].item() == pytest.approx(3 / 5)
    assert out["ratio_max"].item() == pytest.approx(1.5) and out["ratio_min"].item() == pytest.approx(0.5)
    out["loss"].backward()
    # d/d log_prob of -A r is -A r / B where unclipped, 0 where the clip is active
    want = torch.tensor([0.0, -0.5, 1.1, 0.9, 0.0]) / 5
    torch.testing.assert_close(lp.grad, want)


def test_grpo_loss_at_the_rollout_policy_and_with_kl():
    lp = torch.tensor([-1.3, 0.2, 0.7])
    adv = torch.tensor([1.0, -2.0, 0.5])
    out = grpo_loss(lp, lp.clone(), adv, clip_range=0.1)
    assert out["ratio_mean"].item() == 1.0 and out["ratio_max"].item() == 1.0 and out["ratio_min"].item() == 1.0
    assert out["approx_kl"].item() == 0.0 and out["clip_fraction"].item() == 0.0
    assert out["loss"].item() == pytest.approx(-adv.mean().item())
    kl = torch.tensor([0.2, 0.4, 0.0])
    with_kl = grpo_loss(lp, lp.clone(), adv, clip_range=0.1, kl=kl, kl_weight=0.5)
    assert with_kl["loss"].item() == pytest.approx(-adv.mean().item() + 0.5 * 0.2)
    assert with_kl["kl"].item() == pytest.approx(0.2)
    diff = grpo_loss(lp + torch.tensor([0.1, -0.2, 0.0]), lp, adv, clip_range=0.1)
    assert diff["approx_kl"].item() == pytest.approx(0.5 * (0.01 + 0.04) / 3)
    with pytest.raises(ValueError, match="needs kl"):
        grpo_loss(lp, lp, adv, 0.1, kl_weight=0.1)
    with pytest.raises(ValueError, match="clip_range"):
        grpo_loss(lp, lp, adv, 0.0)
    with pytest.raises(ValueError, match=r"\(B,\)"):
        grpo_loss(lp, lp[:2], adv, 0.1)


def test_gaussian_kl_matches_torch():
    mean, ref, _ = _tensors(4)
    std = torch.tensor([0.3, 0.7])
    sd = std.reshape(-1, 1, 1, 1, 1)
    exact = torch.distributions.kl_divergence(Normal(mean, sd), Normal(ref, sd)).flatten(1)
    torch.testing.assert_close(gaussian_kl(mean, ref, std), exact.mean(1))
    torch.testing.assert_close(gaussian_kl(mean, ref, std, reduction="sum"), exact.sum(1))
    assert torch.equal(gaussian_kl(mean, mean, std), torch.zeros(2))
