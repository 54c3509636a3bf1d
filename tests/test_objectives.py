"""Diffusion-DPO loss against hand-computed values."""

import math

import pytest
import torch

from align.objectives import diffusion_dpo_loss, per_sample_mse

# Two pairs, beta = 10. model_diff = err_w - err_l = [-0.1, 0.2]; ref_diff = [0, 0]
# inside = -0.5 * 10 * (model_diff - ref_diff) = [0.5, -1.0]
ERRS = dict(
    model_err_w=torch.tensor([0.1, 0.3]),
    model_err_l=torch.tensor([0.2, 0.1]),
    ref_err_w=torch.tensor([0.15, 0.2]),
    ref_err_l=torch.tensor([0.15, 0.2]),
)


def test_sigmoid_by_hand():
    out = diffusion_dpo_loss(**ERRS, beta=10.0, loss_type="sigmoid")
    expected = (math.log(1 + math.exp(-0.5)) + math.log(1 + math.exp(1.0))) / 2  # 0.893669...
    assert out["loss"].item() == pytest.approx(expected, rel=1e-5)
    assert out["implicit_acc"].item() == pytest.approx(0.5)
    assert out["reward_margin"].item() == pytest.approx(-0.25)


def test_hinge_by_hand():
    out = diffusion_dpo_loss(**ERRS, beta=10.0, loss_type="hinge")
    assert out["loss"].item() == pytest.approx((0.5 + 2.0) / 2)


def test_ipo_by_hand():
    out = diffusion_dpo_loss(**ERRS, beta=10.0, loss_type="ipo")
    # h = inside / beta = [0.05, -0.1]; target 1/(2 beta) = 0.05 -> [0, 0.0225]
    assert out["loss"].item() == pytest.approx(0.0225 / 2, rel=1e-5)


def test_reference_gap_is_subtracted():
    errs = dict(ERRS, ref_err_w=torch.tensor([0.0, 0.0]), ref_err_l=torch.tensor([0.1, 0.1]))
    # ref_diff = -0.1 -> inside = -5 * ([-0.1, 0.2] + 0.1) = [0, -1.5]
    out = diffusion_dpo_loss(**errs, beta=10.0)
    assert out["reward_margin"].item() == pytest.approx(-0.75)
    assert out["implicit_acc"].item() == pytest.approx(0.25)  # a tie counts one half


def test_gradient_lowers_preferred_error():
    w = torch.tensor([0.5], requires_grad=True)
    l = torch.tensor([0.5], requires_grad=True)
    out = diffusion_dpo_loss(w, l, torch.tensor([0.5]), torch.tensor([0.5]), beta=2.0)
    out["loss"].backward()
    assert w.grad.item() > 0 and l.grad.item() < 0  # descent lowers err_w and raises err_l
    # d/dw of -logsigmoid(-0.5*beta*(w-l)) at 0 is 0.5*beta*sigmoid(0) = 0.5
    assert w.grad.item() == pytest.approx(0.5)


def test_bad_arguments():
    with pytest.raises(ValueError, match="loss_type"):
        diffusion_dpo_loss(**ERRS, beta=1.0, loss_type="nope")
    with pytest.raises(ValueError, match="beta"):
        diffusion_dpo_loss(**ERRS, beta=0.0)
    with pytest.raises(ValueError, match="same shape"):
        diffusion_dpo_loss(torch.zeros(2), torch.zeros(3), torch.zeros(2), torch.zeros(2), beta=1.0)


def test_per_sample_mse():
    a = torch.zeros(2, 3, 4)
    b = torch.ones(2, 3, 4)
    b[1] *= 2
    assert per_sample_mse(a, b).tolist() == [1.0, 4.0]


# --- reward-weighted regression -------------------------------------------------------


def test_rwr_weights_softmax_per_group_by_hand():
    from align.objectives import rwr_weights

    r = torch.tensor([0.0, math.log(3.0), 5.0, 5.0])
    g = torch.tensor([0, 0, 1, 1])
    w = rwr_weights(r, g, temperature=1.0)
    torch.testing.assert_close(w, torch.tensor([0.25, 0.75, 0.5, 0.5]))
    w2 = rwr_weights(r * 2, g, temperature=2.0)  # only reward / temperature matters
    torch.testing.assert_close(w, w2)


def test_rwr_weights_sum_to_one_and_clip():
    from align.objectives import rwr_weights

    gen = torch.Generator().manual_seed(0)
    r = torch.randn(24, generator=gen) * 5
    g = torch.arange(24) // 4
    w = rwr_weights(r, g, temperature=0.5, max_weight=0.4)
    for k in range(6):
        assert abs(float(w[g == k].sum()) - 1.0) < 1e-5
    assert float(w.max()) <= 0.4 + 1e-6
    # by hand: softmax [e^3, 1, 1, 1]/(e^3+3) = [0.870, 0.043, ...]; capped at 0.4 -> the rest 0.2 each
    w = rwr_weights(torch.tensor([3.0, 0.0, 0.0, 0.0]), torch.zeros(4), max_weight=0.4)
    torch.testing.assert_close(w, torch.tensor([0.4, 0.2, 0.2, 0.2]))


def test_rwr_errors():
    from align.objectives import rwr_weights

    with pytest.raises(ValueError, match="NaN"):
        rwr_weights(torch.tensor([float("nan"), 1.0]), torch.zeros(2))
    with pytest.raises(ValueError, match="max_weight"):
        rwr_weights(torch.tensor([1.0, 2.0, 3.0]), torch.zeros(3), max_weight=0.2)
    with pytest.raises(ValueError, match="temperature"):
        rwr_weights(torch.tensor([1.0]), torch.zeros(1), temperature=0.0)


def test_rwr_loss_by_hand():
    from align.objectives import rwr_loss

    err = torch.tensor([1.0, 3.0, 2.0, 4.0], requires_grad=True)
    w = torch.tensor([0.25, 0.75, 0.5, 0.5])
    out = rwr_loss(err, w, num_groups=2)
    # (0.25*1 + 0.75*3 + 0.5*2 + 0.5*4) / 2 = (2.5 + 3) / 2
    assert abs(out["loss"].item() - 2.75) < 1e-6
    assert abs(out["mean_err"].item() - 2.5) < 1e-6
    assert abs(out["ess"].item() - 4.0 / (0.0625 + 0.5625 + 0.25 + 0.25)) < 1e-5
    out["loss"].backward()
    torch.testing.assert_close(err.grad, w / 2)
