"""Sampling: per-seed determinism, independent of batch composition; clear errors."""

import pytest
import torch
from conftest import PROMPT

from align.models import load_model
from align.sample import generate


def test_same_seed_same_video_whatever_the_batch(tiny_model_dir):
    m = load_model(tiny_model_dir)
    other = "a blue circle moving up on a gray background"
    a = generate(m, [PROMPT, other], [7, 8], num_steps=3, guidance_scale=2.0, progress=False)
    b = generate(m, [other, PROMPT, PROMPT], [3, 7, 9], num_steps=3, guidance_scale=2.0, batch_size=2, progress=False)
    assert a.shape == (2, 3, 8, 32, 32)
    torch.testing.assert_close(a[0], b[1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(b[1], b[2])  # another seed, another video


def test_guidance_changes_the_sample(tiny_model_dir):
    m = load_model(tiny_model_dir)
    a = generate(m, [PROMPT], [0], num_steps=3, guidance_scale=1.0, progress=False)
    b = generate(m, [PROMPT], [0], num_steps=3, guidance_scale=5.0, progress=False)
    assert not torch.allclose(a, b)


def test_errors(tiny_model_dir):
    m = load_model(tiny_model_dir)
    with pytest.raises(ValueError, match="empty prompt list"):
        generate(m, [], [], num_steps=2, guidance_scale=1.0, progress=False)
    with pytest.raises(ValueError, match="one seed per prompt"):
        generate(m, [PROMPT, PROMPT], [0], num_steps=2, guidance_scale=1.0, progress=False)


# -- GRPO rollouts end clean -----------------------------------------------------------------------


class _PointMassFlow:
    """A flow model whose prediction is exact: data is one latent ``m``, so the velocity at noise
    level ``s`` is ``(x - m) / s`` and any x0 prediction is ``m``. What a rollout decodes minus
    ``m`` is the noise left in the decoded latent."""

    prediction_type = "flow"

    def __init__(self, shift: float):
        from align.schedules import NoiseSchedule

        self.scheduler = NoiseSchedule("flow", flow_shift=shift)
        self.denoiser = torch.nn.Linear(1, 1)  # a parameter: the device
        self.latent_shape = (4, 2, 8, 8)
        self.m = torch.randn(self.latent_shape, generator=torch.Generator().manual_seed(123)).clamp(-1, 1)
        self.decoded = None

    def encode_prompts(self, prompts):
        return torch.zeros(len(prompts), 1)

    def predict(self, x, t, cond):
        return (x - self.m) / (t / self.scheduler.num_train_timesteps).reshape(-1, 1, 1, 1, 1)

    def decode_latents(self, latents):
        self.decoded = latents.clone()
        return latents[:, :3]

    def decode_videos(self, latents, prompts, seeds):  # one stage: the protocol's default
        return self.decode_latents(latents)


@pytest.mark.parametrize("shift", [3.0, 1.0])
def test_a_grpo_rollout_decodes_the_clean_end(shift):
    """At Wan's shift 3, 10 steps and sde_noise 0.7 the last SDE step (from s = 0.25 to 0) drew
    noise of std 0.20 into the decoded latent (0.07 at shift 1); the clean end has none."""
    from align.sample import sample_with_logprobs

    m = _PointMassFlow(shift)
    r = sample_with_logprobs(m, ["p"] * 8, list(range(8)), num_steps=10, guidance_scale=1.0, sde_noise=0.7)
    assert (m.decoded - m.m).std().item() < 0.01
    torch.testing.assert_close(m.decoded, r["clean"])
    # the trajectory itself is stochastic: its last recorded latent (s = shift(1/10)) is noisy
    assert (r["latents"][:, -1] - m.m).std().item() > 0.05
    assert r["log_probs"].shape == (8, 9) and torch.isfinite(r["log_probs"]).all()


def test_a_rollout_without_noise_ends_where_the_ode_ends(tiny_model_dir):
    """As sde_noise goes to 0 the rollout is the ODE's Euler sampler on the same grid from the same
    start: its clean end is sample_latents' (what generate decodes)."""
    from align.sample import sample_latents, sample_with_logprobs

    m = load_model(tiny_model_dir)
    if m.prediction_type != "flow":
        pytest.skip("the shipped tiny model is not a flow model")
    ode = sample_latents(m, [PROMPT], [7], num_steps=4, guidance_scale=2.0)
    r = sample_with_logprobs(m, [PROMPT], [7], num_steps=4, guidance_scale=2.0, sde_noise=1e-6, decode=False)
    torch.testing.assert_close(r["clean"], ode, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="num_steps must be >= 2"):
        sample_with_logprobs(m, [PROMPT], [7], num_steps=1)
