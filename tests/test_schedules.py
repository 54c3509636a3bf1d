"""Forward process, targets and their inverses for every prediction type."""

import pytest
import torch

from align.schedules import NoiseSchedule


@pytest.mark.parametrize("ptype", ["epsilon", "v", "flow"])
def test_predict_x0_eps_inverts_target(ptype):
    s = NoiseSchedule(ptype)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 2, 3, generator=g), torch.randn(4, 2, 3, generator=g)
    t = s.sample_timesteps(4, generator=g)
    x_t = s.add_noise(x0, noise, t)
    rx0, reps = s.predict_x0_eps(x_t, s.target(x0, noise, t), t)
    assert torch.allclose(rx0, x0, atol=1e-3) and torch.allclose(reps, noise, atol=1e-3)


def test_flow_endpoints():
    s = NoiseSchedule("flow")
    x0, noise = torch.ones(1, 3), torch.full((1, 3), -1.0)
    assert torch.allclose(s.add_noise(x0, noise, torch.tensor([0.0])), x0)
    assert torch.allclose(s.add_noise(x0, noise, torch.tensor([1000.0])), noise)
    assert torch.allclose(s.target(x0, noise, torch.tensor([3.0])), noise - x0)


def test_timesteps_in_range_and_shift():
    s = NoiseSchedule("flow", flow_shift=3.0, flow_timestep_sampling="logit_normal")
    t = s.sample_timesteps(1000, generator=torch.Generator().manual_seed(0))
    assert t.min() >= 0 and t.max() < 1000 and t.mean() > 500  # shift pushes toward noise
    e = NoiseSchedule("epsilon").sample_timesteps(1000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(e, e.round()) and e.max() <= 999


def test_bad_prediction_type():
    with pytest.raises(ValueError, match="prediction_type"):
        NoiseSchedule("x0")


def test_epsilon_x0_is_unclamped_at_the_last_timestep():
    """sqrt(alphas_cumprod[999]) is 4.9e-5 on the cosine table: x0 = (x_t - sqrt(1 - a) eps) / sqrt(a)
    exactly (a clamp of the divisor at 1e-4 scaled it by 0.49)."""
    s = NoiseSchedule("epsilon")
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 3, 4, generator=g) * 0.5, torch.randn(2, 3, 4, generator=g)
    t = torch.full((2,), 999.0)
    a = s.alphas_cumprod[999].double()
    assert a.sqrt().item() == pytest.approx(4.93e-5, rel=1e-2)
    x_t = s.add_noise(x0, eps, t)
    eps_hat = eps + 1e-3 * torch.randn(2, 3, 4, generator=g)  # a slightly wrong prediction
    got, _ = s.predict_x0_eps(x_t, eps_hat, t)
    want = (x_t.double() - (1 - a).sqrt() * eps_hat.double()) / a.sqrt()
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-3)
    exact, _ = s.predict_x0_eps(x_t, eps, t)  # an exact eps recovers x0 up to float32 round-off / sqrt(a)
    assert (exact - x0).abs().max().item() < 0.05


def test_epsilon_x0_at_a_true_zero_alpha_is_finite():
    s = NoiseSchedule("epsilon")
    s.alphas_cumprod = s.alphas_cumprod.clone()
    s.alphas_cumprod[-1] = 0.0  # a zero-terminal-SNR table: x_t is pure noise
    x_t = torch.randn(2, 3)
    x0, eps = s.predict_x0_eps(x_t, x_t.clone(), torch.full((2,), 999.0))
    assert torch.equal(x0, torch.zeros(2, 3)) and torch.equal(eps, x_t)
