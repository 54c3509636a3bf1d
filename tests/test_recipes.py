"""Every tiny-model recipe parses into its config dataclass (keys exist, values have the right types)."""

import shutil
import subprocess
from pathlib import Path

import pytest

from align.config import PretrainConfig, load_config
from align.demo.cascade_pretrain import CascadePretrainConfig, is_cascade_recipe
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


def _load(path: Path):
    """A shipped recipe's config: pretrain and reward recipes by their classes, the rest by objective."""
    if is_cascade_recipe(path):  # a cascade's stages (a `stages` key)
        return load_config(CascadePretrainConfig, str(path), [])
    if path.name.endswith("pretrain.yaml"):
        return load_config(PretrainConfig, str(path), [])
    if path.name.startswith("reward") or path.name.endswith("_reward.yaml"):
        return load_config(RewardTrainConfig, str(path), [])
    return load_train_config(str(path), [])


@pytest.mark.parametrize("name", sorted(p.name for p in ROOT.glob("*.yaml")))
def test_every_shipped_recipe_parses(name):
    """Hub-id recipes (Wan, CogVideoX, LTX, ...) are only parsed here: no model is loaded."""
    assert _load(ROOT / name) is not None


TINY = sorted(p.name for p in ROOT.glob("tiny_sora_*.yaml") if p.name != "tiny_sora_pretrain.yaml")


@pytest.mark.parametrize("name", TINY)
def test_tiny_recipes_need_no_earlier_run(name):
    """The tiny recipes name the generator and reward backbone that ship in align/demo_models/
    (tracked, checked against SHA256SUMS), not a folder that only a demo or pretrain run makes."""
    from align.demo.pretrain import DEMO_MODELS, demo_models

    cfg = _load(ROOT / name)
    key = "init_from" if name.endswith("_reward.yaml") else "base" if is_cascade_recipe(ROOT / name) else "model"
    path = ROOT.parent / getattr(cfg, key)
    assert path.resolve().parent == DEMO_MODELS.resolve() and path.is_dir(), path
    demo_models()  # every shipped file is there and unchanged
    if shutil.which("git") and (ROOT.parent / ".git").exists():  # tracked: in a fresh clone
        files = subprocess.run(["git", "ls-files", str(path)], cwd=ROOT.parent, capture_output=True, text=True)
        assert "config.json" in files.stdout or "cascade.json" in files.stdout, path


def test_the_shipped_generator_loads():
    from align.models import load_model

    model = load_model(ROOT.parent / _load(ROOT / "tiny_sora_grpo.yaml").model)
    assert model.denoiser is not None
