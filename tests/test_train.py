"""The DPO trainer end to end on a tiny model: LoRA trains, the base stays bit-identical,
metrics and atomic checkpoints are written."""

import json

import pytest
import torch
from conftest import PROMPT, tiny_recipe
from safetensors.torch import load_file

from align.models import load_model
from align.models.lora import adapters_disabled
from align.training import build_config, load_aligned, train


def _cfg(model_dir, dataset, out, **kw):
    base = dict(
        dataset=dataset, name="run", max_steps=4, train_batch_size=4, checkpointing_steps=2, checkpoints_total_limit=1
    )
    return build_config(**tiny_recipe(model_dir, out, **(base | kw)))


def test_train_writes_run_and_changes_only_lora(tiny_model_dir, pref_dataset_dir, tmp_path):
    before = {k: v.clone() for k, v in load_file(tiny_model_dir / "denoiser.safetensors").items()}
    run = train(_cfg(tiny_model_dir, pref_dataset_dir, tmp_path))

    # run directory layout
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4]
    assert {"loss", "implicit_acc", "reward_margin", "lr", "grad_norm", "step_time_s"} <= set(lines[0])
    assert all(0.0 <= r["implicit_acc"] <= 1.0 for r in lines)
    assert abs(lines[0]["loss"] - 0.6931) < 1e-3  # LoRA B = 0 at init: policy == reference
    assert [p.name for p in run.glob("checkpoint-*")] == ["checkpoint-4"]  # keeps the last 1
    assert not list(run.glob(".checkpoint-*"))  # no temp dirs left behind
    assert (run / "checkpoint-4" / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert (run / "config.yaml").is_file()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["pairs"] == 8 and summary["skipped"] == {"bad_row": 0, "tie": 0}

    # LoRA weights trained (B moved off zero); the base model files are untouched
    lora = load_file(run / "lora" / "pytorch_lora_weights.safetensors")
    assert lora and all(k.startswith("transformer.") for k in lora)
    assert any(v.abs().max() > 0 for k, v in lora.items() if "lora_B" in k)
    after = load_file(tiny_model_dir / "denoiser.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)

    # the aligned model differs from the base; with adapters off it *is* the base
    base, aligned = load_model(tiny_model_dir), load_aligned(tiny_model_dir, run / "lora")
    x = torch.randn(2, *base.latent_shape, generator=torch.Generator().manual_seed(0))
    t = torch.full((2,), 400.0)
    c = base.encode_prompts([PROMPT] * 2)
    ref = base.predict(x, t, c)
    assert not torch.allclose(aligned.predict(x, t, c), ref)
    with adapters_disabled(aligned.denoiser):
        assert torch.equal(aligned.predict(x, t, c), ref)
    for name, p in aligned.denoiser.named_parameters():
        if "lora_" not in name:
            assert torch.equal(p, base.denoiser.get_parameter(name.replace(".base_layer", ""))), name


@pytest.mark.parametrize("loss_type", ["hinge", "ipo"])
def test_other_loss_types_train(tiny_model_dir, pref_dataset_dir, tmp_path, loss_type):
    run = train(
        _cfg(tiny_model_dir, pref_dataset_dir, tmp_path, loss_type=loss_type, max_steps=2, checkpointing_steps=0)
    )
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in lines)


def test_bad_dataset_stops_before_training(tiny_model_dir, tmp_path):
    from conftest import make_preference_rows, save_rows

    rows = make_preference_rows(4)
    rows["video_b"][3] = rows["video_a"][3].copy()
    data = save_rows(rows, tmp_path / "bad")
    with pytest.raises(ValueError, match="row 3: video_a and video_b are identical"):
        train(_cfg(tiny_model_dir, data, tmp_path))
    run = train(_cfg(tiny_model_dir, data, tmp_path, name="skip", bad_rows="skip", max_steps=1, checkpointing_steps=0))
    assert json.loads((run / "summary.json").read_text())["skipped"] == {"bad_row": 1, "tie": 0}


def test_unknown_objective(tiny_model_dir, pref_dataset_dir, tmp_path):
    with pytest.raises(ValueError, match="objective"):
        train(_cfg(tiny_model_dir, pref_dataset_dir, tmp_path, objective="ppo"))
