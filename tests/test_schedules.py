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
