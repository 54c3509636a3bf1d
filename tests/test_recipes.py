"""Every tiny-model recipe parses into its config dataclass (keys exist, values have the right types)."""

from pathlib import Path

import pytest

from align.config import PretrainConfig, TrainConfig, load_config
from reward_models.train import RewardTrainConfig

RECIPES = {
    "tiny_sora_pretrain.yaml": PretrainConfig,
    "tiny_sora_dpo.yaml": TrainConfig,
    "tiny_sora_rwr.yaml": TrainConfig,
    "tiny_sora_rwr_online.yaml": TrainConfig,
    "reward_clip.yaml": RewardTrainConfig,
}
ROOT = Path(__file__).resolve().parents[1] / "recipes"


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_parses(name):
    cfg = load_config(RECIPES[name], str(ROOT / name), [])
    assert cfg is not None
