"""Recipe parsing: YAML + CLI overrides, errors that name the key."""

import pytest

from align.training import load_train_config


def _recipe(tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def test_yaml_and_overrides(tmp_path):
    p = _recipe(tmp_path, "model: m\ndataset: d\nbeta: 100\nlora_targets: [attn.qkv]\n")
    cfg = load_train_config(p, ["--beta", "250", "--max-steps=7", "--progress", "false"])
    assert cfg.beta == 250.0 and cfg.max_steps == 7 and cfg.progress is False
    assert cfg.lora_targets == ["attn.qkv"] and cfg.model == "m"


def test_unknown_key_is_named(tmp_path):
    p = _recipe(tmp_path, "model: m\ndataset: d\nbetta: 100\n")
    with pytest.raises(ValueError, match=r"unknown key 'betta'.*did you mean 'beta'"):
        load_train_config(p)
    with pytest.raises(ValueError, match="command line: unknown key 'lr'"):
        load_train_config(_recipe(tmp_path, "model: m\ndataset: d\n"), ["--lr", "1"])


def test_missing_required_key_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"missing required key\(s\) \['model'\]"):
        load_train_config(_recipe(tmp_path, "dataset: d\n"))


def test_malformed_values(tmp_path):
    with pytest.raises(ValueError, match="key 'max_steps' must be int"):
        load_train_config(_recipe(tmp_path, "model: m\ndataset: d\nmax_steps: lots\n"))
    with pytest.raises(ValueError, match="a recipe must be a mapping"):
        load_train_config(_recipe(tmp_path, "- a\n- b\n"))
    with pytest.raises(ValueError, match="not valid YAML"):
        load_train_config(_recipe(tmp_path, "model: [\n"))
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_train_config(tmp_path / "nope.yaml")
