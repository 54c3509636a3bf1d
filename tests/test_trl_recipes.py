"""Recipes through TRL's parser: TrlParser reads the recipe, the command line wins, `--help` lists
every key with its help and default, and errors name the key, the file and the closest key."""

import os
from pathlib import Path

import pytest
from trl import TrlParser

from align.config import RecipeParser, config_help, load_config
from align.training import load_train_config, recipe_help
from reward_models.train import RewardTrainConfig

ROOT = Path(__file__).resolve().parents[1]
GRPO = "objective: grpo\nmodel: m\nprompts_file: p.txt\njudges: [reward:r]\n"


def _recipe(tmp_path, text, name="r.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def _flat(text: str) -> str:
    """argparse wraps help at the terminal's width: compare with single spaces."""
    return " ".join(text.split())


def test_trl_parser_reads_the_recipe(tmp_path, monkeypatch):
    calls = []
    parse = TrlParser.parse_args_and_config

    def spy(self, args=None, *rest, **kw):
        calls.append(list(args))
        return parse(self, args, *rest, **kw)

    monkeypatch.setattr(TrlParser, "parse_args_and_config", spy)
    monkeypatch.delenv("VIDALIGN_TRL_TEST", raising=False)
    p = _recipe(tmp_path, "model: m\ndataset: d\nenv:\n  VIDALIGN_TRL_TEST: from-the-recipe\n")
    cfg = load_train_config(p, ["--beta", "7"])
    assert issubclass(RecipeParser, TrlParser)
    assert calls == [["--config", str(p), "--beta", "7"]]  # the recipe by TrlParser's --config, then the CLI
    assert os.environ["VIDALIGN_TRL_TEST"] == "from-the-recipe"  # TrlParser's `env:` block
    assert cfg.beta == 7.0 and cfg.model == "m"


def test_command_line_wins_over_the_recipe(tmp_path):
    p = _recipe(tmp_path, GRPO + "group_size: 4\nsde_noise: 0.5\nmixed_precision: bf16\n")
    cfg = load_train_config(p, ["--group-size", "2", "--sde_noise=0.9", "--mixed_precision", "no"])
    assert (cfg.group_size, cfg.sde_noise, cfg.mixed_precision) == (2, 0.9, "no")
    assert type(cfg).__name__ == "GRPOConfig" and cfg.prompts_file == "p.txt"  # the rest from the recipe
    cfg = load_train_config(p, {"group_size": 3, "judges": ["reward:a", "reward:b"], "progress": False})
    assert cfg.group_size == 3 and cfg.judges == ["reward:a", "reward:b"] and cfg.progress is False
    assert load_train_config(p, ["--progress"]).progress is True  # a bare flag is true
    assert load_train_config(p, ["--resume", "null"]).resume is None  # optional keys take none / null


def test_help_lists_keys_with_help_and_defaults(tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # argparse wraps at the terminal's width (and splits at hyphens)
    text = _flat(recipe_help(ROOT / "recipes" / "wan2_1_t2v_1_3b_grpo.yaml"))
    assert "--sde_noise float flow models: a in sigma_s = a sqrt(s / (1 - s)) (default: 0.7)" in text
    assert "--model str" in text and "(default: Wan-AI/Wan2.1-T2V-1.3B-Diffusers)" in text  # the recipe's value
    assert "--mixed_precision no|fp16|bf16" in text and "--lora_targets list" in text
    p = _recipe(tmp_path, GRPO + "sde_noise: 0.25\n")
    assert "(default: 0.25)" in _flat(recipe_help(p))
    shared = _flat(recipe_help(None))  # no recipe: the keys every objective shares, `model` required
    assert "--model str a TinySora directory" in shared and "(required)" in shared and "--sde_noise" not in shared
    reward = _flat(config_help(RewardTrainConfig, ROOT / "recipes" / "reward_clip.yaml"))
    assert "--finetune full|lora|head" in reward and "(default: reward_clip)" in reward


def test_unknown_keys_name_the_key_the_file_and_the_closest(tmp_path):
    p = _recipe(tmp_path, GRPO + "sde_nois: 0.5\n", name="mine.yaml")
    with pytest.raises(
        ValueError, match=r"mine\.yaml: unknown key 'sde_nois' for GRPOConfig \(did you mean 'sde_noise'"
    ):
        load_train_config(p)
    with pytest.raises(ValueError, match=r"command line: unknown key 'group_sise'.*did you mean 'group_size'"):
        load_train_config(_recipe(tmp_path, GRPO), ["--group-sise", "2"])
    with pytest.raises(ValueError, match="command line: unknown key 'lr'"):  # no argparse abbreviation
        load_train_config(_recipe(tmp_path, "model: m\ndataset: d\n"), ["--lr", "1"])


def test_choice_keys_are_literals(tmp_path):
    with pytest.raises(ValueError, match=r"r\.yaml: key 'mixed_precision' must be one of no \| fp16 \| bf16"):
        load_train_config(_recipe(tmp_path, "model: m\ndataset: d\nmixed_precision: fp8\n"))
    with pytest.raises(ValueError, match="quote it"):  # YAML reads an unquoted `no` as false
        load_train_config(_recipe(tmp_path, "model: m\ndataset: d\nmixed_precision: no\n"))
    with pytest.raises(ValueError, match=r"command line: key 'loss_type' must be one of sigmoid \| hinge \| ipo"):
        load_train_config(_recipe(tmp_path, "model: m\ndataset: d\n"), ["--loss_type", "logistic"])
    with pytest.raises(ValueError, match="key 'finetune' must be one of full | lora | head"):
        load_config(RewardTrainConfig, _recipe(tmp_path, "dataset: d\nfinetune: some\n"))


def test_lists_and_dicts_from_yaml_and_command_line(tmp_path):
    p = _recipe(tmp_path, "model: m\ndataset: d\nlora_targets: [to_q, to_k]\nmodel_options: {num_frames: 9}\n")
    cfg = load_train_config(p)
    assert cfg.lora_targets == ["to_q", "to_k"] and cfg.model_options == {"num_frames": 9}
    cfg = load_train_config(p, ["--lora_targets", "a,b", "--model_options", "{height: 32, width: 48}"])
    assert cfg.lora_targets == ["a", "b"] and cfg.model_options == {"height": 32, "width": 48}
    assert load_train_config(p, ["--lora_targets=[x, y.z]"]).lora_targets == ["x", "y.z"]
    assert load_train_config(p, {"model_options": {"dtype": "float32"}}).model_options == {"dtype": "float32"}
    with pytest.raises(ValueError, match="command line: key 'model_options' must be a dict"):
        load_train_config(p, ["--model_options", "3"])
    with pytest.raises(ValueError, match=r"r\.yaml: key 'lora_targets' must be a list"):
        load_train_config(_recipe(tmp_path, "model: m\ndataset: d\nlora_targets: {a: 1}\n"))


def test_wrong_types_name_the_key_and_the_source(tmp_path):
    with pytest.raises(ValueError, match=r"r\.yaml: key 'learning_rate' must be float, got 'fast'"):
        load_train_config(_recipe(tmp_path, "model: m\ndataset: d\nlearning_rate: fast\n"))
    with pytest.raises(ValueError, match="command line: key 'max_steps' must be int, got '2.5'"):
        load_train_config(_recipe(tmp_path, "model: m\ndataset: d\n"), ["--max_steps", "2.5"])
    with pytest.raises(ValueError, match="command line: expected --key value, got '500'"):
        load_train_config(_recipe(tmp_path, "model: m\ndataset: d\n"), ["500"])
    with pytest.raises(ValueError, match="command line: key 'beta' expected one argument"):
        load_train_config(_recipe(tmp_path, "model: m\ndataset: d\n"), ["--beta"])
    with pytest.raises(ValueError, match="recipe key `beta` must be > 0"):  # __post_init__ checks still run
        load_train_config(_recipe(tmp_path, "model: m\ndataset: d\n"), ["--beta", "-1"])
