"""Checkpoint / resume: a run killed with SIGKILL (or stopped with SIGTERM) mid-training and
resumed with ``resume: latest`` ends with bit-identical LoRA weights and losses to an
uninterrupted run on CPU; bad resumes and bad batch layouts fail with clear errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_recipe
from safetensors.torch import load_file

from align.training import build_config, train
from align.training.core import check_zero3_layout, micro_batch_size

ROOT = Path(__file__).resolve().parents[1]
LORA = "lora/pytorch_lora_weights.safetensors"


def _cfg(model_dir, dataset, out, **kw):
    base = dict(
        dataset=dataset,
        name="full",
        max_steps=6,
        train_batch_size=2,
        gradient_accumulation_steps=2,
        lr_warmup_steps=3,
        lora_dropout=0.1,  # dropout: the torch RNG state matters too
        checkpointing_steps=2,
        checkpoints_total_limit=2,
    )
    return build_config(**tiny_recipe(model_dir, out, **(base | kw)))


# runs train(cfg) in a fresh interpreter and sends itself `sig` at the n-th micro-step
_KILLER = """
import json, os, signal, sys
import align.training.dpo as T
from align.training import build_config
cfg = build_config(**json.loads(sys.argv[1]))
sig, at = getattr(signal, sys.argv[2]), int(sys.argv[3])
orig, calls = T.dpo_step_losses, [0]
def step(*a, **k):
    calls[0] += 1
    if calls[0] == at:
        os.kill(os.getpid(), sig)
    return orig(*a, **k)
T.dpo_step_losses = step
T.train(cfg)
"""


def _interrupted(cfg, sig: str, at: int) -> subprocess.CompletedProcess:
    import dataclasses

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    args = [sys.executable, "-c", _KILLER, json.dumps(dataclasses.asdict(cfg)), sig, str(at)]
    return subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)


def _losses(run: Path) -> list[tuple]:
    return [(r["step"], r["loss"], r["implicit_acc"]) for r in map(json.loads, (run / "metrics.jsonl").open())]


@pytest.fixture(scope="module")
def full_run(tiny_model_dir, tmp_path_factory):
    from conftest import make_preference_rows, save_rows

    tmp = tmp_path_factory.mktemp("resume")
    data = save_rows(make_preference_rows(8), tmp / "prefs")
    return train(_cfg(tiny_model_dir, data, tmp / "runs")), data, tmp / "runs"


@pytest.mark.parametrize("sig,at,ckpt", [("SIGKILL", 10, 4), ("SIGTERM", 9, 5)])
def test_interrupted_run_resumes_bit_identical(full_run, tiny_model_dir, sig, at, ckpt):
    full, data, out = full_run
    cfg = _cfg(tiny_model_dir, data, out, name=f"cut-{sig}")
    proc = _interrupted(cfg, sig, at)
    run = out / cfg.name
    if sig == "SIGKILL":  # killed in step 5 (micro-step 10): the last checkpoint is step 4
        assert proc.returncode == -9, proc.stderr[-2000:]
    else:  # SIGTERM in step 5: that step finishes, is checkpointed (off the 2-step schedule), then exit 1
        assert proc.returncode == 1 and "continue with --resume latest" in proc.stderr, proc.stderr[-2000:]
    kept = sorted(p.name for p in run.glob("checkpoint-*"))
    assert kept == (["checkpoint-2", "checkpoint-4"] if ckpt == 4 else ["checkpoint-4", "checkpoint-5"])
    assert not (run / "lora").exists() and not list(run.glob(".checkpoint-*"))
    state = json.loads((run / f"checkpoint-{ckpt}" / "trainer_state.json").read_text())
    assert state["step"] == ckpt and state["micro_step"] == 2 * ckpt

    resumed = train(build_config(**{**cfg.__dict__, "resume": "latest"}))
    a, b = load_file(full / LORA), load_file(resumed / LORA)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit-identical
    assert _losses(resumed) == _losses(full)  # metrics.jsonl: steps 1..6 once each, same values
    assert sorted(p.name for p in run.glob("checkpoint-*"))[-1] == "checkpoint-6"
    assert len(list(run.glob("checkpoint-*"))) == 2  # keeps the last 2


def test_resume_checks_recipe_and_allows_longer_runs(full_run, tiny_model_dir):
    full, data, out = full_run
    with pytest.raises(ValueError, match=r"another recipe: 'beta' is 50.0 there and 10.0 here"):
        train(_cfg(tiny_model_dir, data, out, beta=10.0, resume="latest"))
    with pytest.raises(FileNotFoundError, match="not a checkpoint directory"):
        train(_cfg(tiny_model_dir, data, out, name="x", resume=str(out / "nope")))
    # a longer run may resume (max_steps is free to change): it trains only steps 7..8
    run = train(_cfg(tiny_model_dir, data, out, max_steps=8, resume=str(full / "checkpoint-6")))
    steps = [s for s, *_ in _losses(run)]
    assert steps == [1, 2, 3, 4, 5, 6, 7, 8]
    # `latest` with no checkpoint yet starts a fresh run (the same command starts or continues)
    fresh = train(_cfg(tiny_model_dir, data, out, name="fresh", max_steps=1, checkpointing_steps=0, resume="latest"))
    assert [s for s, *_ in _losses(fresh)] == [1]


def test_batch_layout_errors(tiny_model_dir, pref_dataset_dir, tmp_path):
    cfg = _cfg(tiny_model_dir, pref_dataset_dir, tmp_path, effective_batch_size=6, gradient_accumulation_steps=4)
    with pytest.raises(ValueError, match=r"effective_batch_size 6 is not divisible by 1 process\(es\) x 4"):
        train(cfg)
    assert micro_batch_size(_cfg(tiny_model_dir, "d", tmp_path, effective_batch_size=16), 4) == 2
    with pytest.raises(ValueError, match="not divisible by 3 process"):
        micro_batch_size(_cfg(tiny_model_dir, "d", tmp_path, effective_batch_size=16, gradient_accumulation_steps=1), 3)
    assert micro_batch_size(_cfg(tiny_model_dir, "d", tmp_path, train_batch_size=5), 3) == 5  # 0 = not stated


def test_zero3_layout_check(tiny_model_dir):
    from align.models import load_model

    model = load_model(tiny_model_dir)
    check_zero3_layout(model)  # separate VAE / text encoder / denoiser: fine
    model.denoiser.register_parameter("tied", next(model.text_encoder.parameters()))  # tied weights
    with pytest.raises(ValueError, match="ZeRO-3: frozen part 'text_encoder' shares parameter"):
        check_zero3_layout(model)
    model = load_model(tiny_model_dir)
    model.denoiser.add_module("vae_inside", model.vae)
    with pytest.raises(ValueError, match="ZeRO-3: frozen part 'vae' is a submodule of the denoiser"):
        check_zero3_layout(model)


def test_trackers_are_optional(tiny_model_dir, pref_dataset_dir, tmp_path, capsys):
    run = train(
        _cfg(
            tiny_model_dir,
            pref_dataset_dir,
            tmp_path,
            name="t",
            max_steps=1,
            checkpointing_steps=0,
            gradient_accumulation_steps=1,
            report_to=["tensorboard", "wandb"],
        )
    )
    assert len(_losses(run)) == 1
    out = capsys.readouterr().out
    for name in ("tensorboard", "wandb"):
        try:
            __import__(name)
        except ImportError:
            assert f"report_to {name}: not installed, skipped" in out
    with pytest.raises(ValueError, match="unknown tracker 'mlflow'"):
        train(_cfg(tiny_model_dir, pref_dataset_dir, tmp_path, name="u", max_steps=1, report_to=["mlflow"]))


def test_accelerate_configs_parse():
    """Each launch config in recipes/accelerate/ loads with accelerate and points at its json."""
    from accelerate.commands.config.config_args import load_config_from_file

    root = Path(__file__).resolve().parents[1] / "recipes" / "accelerate"
    kinds = {}
    for f in sorted(root.glob("*.yaml")):
        c = load_config_from_file(str(f))
        kinds[f.stem] = str(c.distributed_type)
        if f.stem.startswith("deepspeed"):
            ds = json.loads((root.parent.parent / c.deepspeed_config["deepspeed_config_file"]).read_text())
            assert ds["zero_optimization"]["stage"] == int(f.stem.split("_zero")[1][0])
            assert ds["train_micro_batch_size_per_gpu"] == "auto" and c.deepspeed_config["zero3_init_flag"] is False
            assert ("offload_optimizer" in ds["zero_optimization"]) == f.stem.endswith("_offload")
    assert kinds == {
        "deepspeed_zero2": "DistributedType.DEEPSPEED",
        "deepspeed_zero2_offload": "DistributedType.DEEPSPEED",
        "deepspeed_zero3": "DistributedType.DEEPSPEED",
        "deepspeed_zero3_offload": "DistributedType.DEEPSPEED",
        "fsdp2": "DistributedType.FSDP",
        "multi_gpu_ddp": "DistributedType.MULTI_GPU",
        "multi_node": "DistributedType.MULTI_GPU",
        "single_process": "DistributedType.NO",
    }
