"""Every tiny-model recipe parses into its config dataclass (keys exist, values have the right types)."""

from pathlib import Path

import pytest

from align.config import PretrainConfig, load_config
from align.training import load_train_config
from reward_models.train import RewardTrainConfig

RECIPES = {
    "tiny_sora_pretrain.yaml": PretrainConfig,
    "tiny_sora_dpo.yaml": None,  # None: a training recipe, parsed by its objective's config
    "tiny_sora_rwr.yaml": None,
    "tiny_sora_rwr_online.yaml": None,
    "reward_clip.yaml": RewardTrainConfig,
}
ROOT = Path(__file__).resolve().parents[1] / "recipes"


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_parses(name):
    cls = RECIPES[name]
    cfg = load_config(cls, str(ROOT / name), []) if cls else load_train_config(str(ROOT / name), [])
    assert cfg is not None
