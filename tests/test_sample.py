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
