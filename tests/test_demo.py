"""The embedded demo: the quick run end to end on the shipped models, its overrides, and the
sha256 check of the shipped models."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from align.cli import main
from align.demo.pretrain import DEMO_MODELS, SHA256SUMS, demo_models

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


@pytest.mark.integration
def test_demo_quick_end_to_end(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "align.cli", "demo", "--quick", "--out", str(out), "--set", "DPO.beta=1000"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "DPO vs base, oracle win rate" in r.stdout and "reward model held-out accuracy" in r.stdout
    report = json.loads((out / "report.json").read_text())
    methods = set(report["winrate"]["oracle"])
    assert {"DPO", "RWR"} <= methods
    n = report["data"]["comparisons"]
    for judge in ("oracle", "reward_model"):
        for method in methods:
            w = report["winrate"][judge][method]
            assert w["n"] == n > 0 and w["ci95"][0] <= w["rate"] <= w["ci95"][1]
            assert w["wins"] + w["ties"] + w["losses"] == n
    assert set(report["winrate"]["oracle"]["DPO"]["per_attribute"]) >= {"background", "direction", "shape"}
    assert {"pairs", "reward_model", "dpo", "rwr", "eval", "total"} <= set(report["timings_s"])
    assert "pretrain" not in report["timings_s"]  # the shipped models are used as they are
    assert report["config"]["recipe_overrides"]["DPO"] == {"max_steps": 3, "train_batch_size": 4, "beta": "1000"}
    assert "beta: 1000.0" in (out / "dpo" / "config.yaml").read_text()  # the override reached the DPO run
    for name in (
        "report.md",
        "training_curves_dpo.png",
        "training_curves_rwr.png",
        "winrates.png",
        "base_vs_aligned.gif",
    ):
        assert (out / name).stat().st_size > 0, name
    for method in methods:
        assert (out / method.lower() / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert 0.0 <= report["reward_model"]["accuracy"] <= 1.0
    cascade = report["cascade"]  # the DPO LoRA on the cascade's base stage, judged on its 16x64x64 output
    assert cascade["video_size"] == "16x64x64" and cascade["comparisons"] == 12  # 12 prompts x 1 seed (quick)
    lo, hi = cascade["oracle_winrate_ci95"]
    assert lo <= cascade["oracle_winrate"] <= hi and cascade["wins"] + cascade["ties"] + cascade["losses"] == 12
    assert "through the cascade (16x64x64), oracle win rate" in r.stdout
    assert "## cascade" in (out / "report.md").read_text()


def test_bad_overrides_are_refused_before_anything_runs(tmp_path, capsys):
    for bad, msg in [
        ("sample_step=1", "--set: unknown key 'sample_step' for DemoConfig (did you mean 'sample_steps'?)"),
        ("sample_steps=three", "--set: key 'sample_steps' must be int, got 'three'"),
        ("sample_steps", "expected KEY=VALUE"),
        ("PPO.beta=1", "unknown stage 'PPO'"),
        ("DPO.betta=1", "unknown key 'betta'"),
        ("DPO.beta=-1", "`beta` must be > 0"),
        ("reward.epochs=lots", "key 'epochs' must be int"),
    ]:
        assert main(["demo", "--set", bad, "--out", str(tmp_path / "y")]) == 2, bad
        assert msg in capsys.readouterr().err, bad
    assert not (tmp_path / "y").exists()


def test_shipped_models_are_checked_against_their_sha256(tmp_path):
    gen, backbone = demo_models()
    assert (gen / "config.json").is_file() and (backbone / "reward_config.json").is_file()
    copy = tmp_path / "models"
    shutil.copytree(DEMO_MODELS, copy)
    weights = copy / "tiny_sora" / "denoiser.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"denoiser.safetensors does not match its sha256 .*make pretrained"):
        demo_models(copy)
    (copy / SHA256SUMS).unlink()
    with pytest.raises(FileNotFoundError, match="SHA256SUMS is missing"):
        demo_models(copy)


def test_shipped_models_load_in_float32():
    from align.models import load_model
    from reward_models.model import VideoRewardModel

    gen, backbone = demo_models()
    model = load_model(gen)
    assert all(str(p.dtype) == "torch.float32" for p in model.denoiser.parameters())
    rm = VideoRewardModel.from_pretrained(backbone)
    assert all(str(p.dtype) == "torch.float32" for p in rm.parameters())
