"""Shared fixtures: a tiny saved TinySora model and a small preference dataset on disk."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from align.models.tiny_sora import TinySora, TinySoraConfig

SMALL = dict(dim=32, depth=3, heads=2, vae_channels=8, text_dim=32, text_layers=1)
PROMPT = "a red square moving left on a black background"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A randomly initialised small TinySora saved with ``save_pretrained`` (no training)."""
    torch.manual_seed(0)
    m = TinySora(TinySoraConfig(**SMALL))
    torch.nn.init.normal_(m.denoiser.out.weight, std=0.05)  # a non-trivial "pretrained" output
    path = tmp_path_factory.mktemp("model") / "tiny_sora"
    m.save_pretrained(path)
    return path


def make_preference_rows(n: int = 8, seed: int = 0) -> dict[str, list]:
    """Rows of the schema with distinct random uint8 videos (8, 32, 32, 3)."""
    rng = np.random.default_rng(seed)
    videos = rng.integers(0, 256, size=(2 * n, 8, 32, 32, 3), dtype=np.uint8)
    return {
        "prompt": [PROMPT] * n,
        "video_a": [videos[2 * i] for i in range(n)],
        "video_b": [videos[2 * i + 1] for i in range(n)],
        "preference": ["a" if i % 2 else "b" for i in range(n)],
    }


def save_rows(rows: dict[str, list], path) -> str:
    import datasets

    features = {
        "prompt": datasets.Value("string"),
        "video_a": datasets.Array4D((8, 32, 32, 3), "uint8"),
        "video_b": datasets.Array4D((8, 32, 32, 3), "uint8"),
        "preference": datasets.Value("string"),
    }
    features = datasets.Features({k: v for k, v in features.items() if k in rows})
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(path))
    return str(path)


def tiny_recipe(model_dir, out, **kw) -> dict:
    """A training recipe (config keys) for the tiny model: LoRA rank 4, lr 1e-2, beta 50 for DPO,
    no progress bars, no checkpoints; ``kw`` adds or overrides keys."""
    base = dict(
        model=str(model_dir),
        output_dir=str(out),
        learning_rate=1e-2,
        lora_rank=4,
        lora_alpha=4.0,
        checkpointing_steps=0,
        progress=False,
    )
    if kw.get("objective", "dpo") == "dpo":
        base["beta"] = 50.0
    return base | kw


@pytest.fixture
def pref_dataset_dir(tmp_path):
    return save_rows(make_preference_rows(), tmp_path / "prefs")
