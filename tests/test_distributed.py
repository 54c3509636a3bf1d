"""Multi-process training on CPU: 2-process DDP (gloo), DeepSpeed ZeRO-2 and ZeRO-3 runs of
the tiny model, launched with ``accelerate launch ... -m align.cli train RECIPE``, match a
1-process run with the same effective batch (8 pairs): losses of the first 3 steps within
``TOL`` (float reduction order differs across processes, nothing else does: data and noise are
the same global batch), the same final LoRA within ``TOL``; under ZeRO each rank holds about
half of the optimizer state. A ZeRO-3 run resumed from its checkpoint redoes step 3 bit-identically."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from align.launch import cpu_launch
from align.training import build_config, train

TOL = 1e-5
KEYS = ("loss", "implicit_acc", "reward_margin", "model_diff", "ref_diff")
LORA = "lora/pytorch_lora_weights.safetensors"
pytestmark = pytest.mark.integration


def launch(kind: str, recipe: Path, nproc: int = 2, *overrides: str) -> subprocess.CompletedProcess:
    """``accelerate launch`` of ``vidalign train`` with ``nproc`` CPU processes; must succeed."""
    proc = cpu_launch(kind, nproc, recipe, *overrides, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def _metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    """A 16-pair dataset, a recipe with an effective batch of 8 pairs, and the 1-process run."""
    from conftest import make_preference_rows, save_rows, tiny_recipe

    tmp = tmp_path_factory.mktemp("dist")
    recipe = tiny_recipe(
        tiny_model_dir,
        tmp / "runs",
        dataset=save_rows(make_preference_rows(16), tmp / "prefs"),
        max_steps=3,
        effective_batch_size=8,
        checkpointing_steps=2,
    )
    (tmp / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    one = train(build_config(**recipe, name="one"))
    return tmp / "recipe.yaml", one


@pytest.mark.parametrize("kind", ["ddp", "zero2", "zero3"])
def test_two_processes_match_one(setup, kind):
    recipe, one = setup
    launch(kind, recipe, 2, "--name", kind)
    run = one.parent / kind
    ref, got = _metrics(one), _metrics(run)
    assert [r["step"] for r in got] == [1, 2, 3]
    diffs = {k: max(abs(a[k] - b[k]) for a, b in zip(ref, got)) for k in KEYS}
    print(f"\n{kind}: max |2-process - 1-process| over steps 1-3: {diffs}")
    assert all(d <= TOL for d in diffs.values()), diffs
    assert ref[1]["loss"] != ref[0]["loss"]  # the steps did update the policy
    a, b = load_file(one / LORA), load_file(run / LORA)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=TOL, rtol=0) for k in a)

    full = json.loads((one / "summary.json").read_text())["optimizer_state_bytes_per_rank"][0]
    per_rank = json.loads((run / "summary.json").read_text())["optimizer_state_bytes_per_rank"]
    print(f"{kind}: optimizer state bytes per rank {per_rank} (1 process: {full})")
    assert len(per_rank) == 2
    if kind == "ddp":
        assert per_rank == [full, full]  # replicated
    else:
        assert all(abs(b - full / 2) <= 0.02 * full for b in per_rank)  # ~1/2 each

    if kind == "zero3":  # resume from the DeepSpeed checkpoint of step 2: step 3 and the LoRA are the same bits
        shutil.copytree(run, run.parent / "zero3-first")
        launch(kind, recipe, 2, "--name", kind, "--resume", "latest")
        first = run.parent / "zero3-first"
        assert [(r["step"], r["loss"]) for r in _metrics(run)] == [(r["step"], r["loss"]) for r in _metrics(first)]
        a, b = load_file(first / LORA), load_file(run / LORA)
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_rwr_two_processes_match_one(tiny_model_dir, tmp_path):
    """Offline RWR with its KL term: 2 DDP processes (4 samples each) match 1 process (8) step
    for step."""
    import numpy as np
    from conftest import PROMPT, tiny_recipe

    from align.data.samples import scored_samples_dataset

    rng = np.random.default_rng(0)
    videos = rng.integers(0, 256, (16, 8, 32, 32, 3), dtype=np.uint8)
    scored_samples_dataset([PROMPT] * 16, videos, rng.normal(size=16), [i // 4 for i in range(16)]).save_to_disk(
        str(tmp_path / "samples")
    )
    recipe = tiny_recipe(
        tiny_model_dir,
        tmp_path / "runs",
        dataset=str(tmp_path / "samples"),
        objective="rwr",
        rwr_kl_weight=1.0,
        max_steps=3,
        effective_batch_size=8,
    )
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    one = train(build_config(**recipe, name="one"))
    launch("ddp", tmp_path / "recipe.yaml", 2, "--name", "two")
    ref, got = _metrics(one), _metrics(one.parent / "two")
    keys = ("loss", "weighted_err", "kl")
    diffs = {k: max(abs(a[k] - b[k]) for a, b in zip(ref, got)) for k in keys}
    assert [r["step"] for r in got] == [1, 2, 3] and all(d <= TOL for d in diffs.values()), diffs
    assert ref[2]["kl"] > 0
    a, b = load_file(one / LORA), load_file(one.parent / "two" / LORA)
    assert all(torch.allclose(a[k], b[k], atol=TOL, rtol=0) for k in a)


def test_two_machines_match_one(setup):
    """2 machines x 1 process on 127.0.0.1 (two ``accelerate launch --num_machines 2
    --machine_rank r``, DDP over gloo) train the same update as 1 process."""
    import os
    import sys

    from align.launch import ROOT, free_port

    recipe, one = setup
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}

    def cmd(rank: int) -> list[str]:
        flags = ["--num_processes", "2", "--num_machines", "2", "--machine_rank", str(rank), "--multi_gpu"]
        flags += ["--main_process_ip", "127.0.0.1", "--main_process_port", str(port), "--mixed_precision", "no"]
        train_args = ["train", str(recipe), "--name", "two_machines"]
        return [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            *flags,
            "--dynamo_backend",
            "no",
            "-m",
            "align.cli",
        ] + train_args

    procs = [
        subprocess.Popen(cmd(r), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for r in (0, 1)
    ]
    try:
        outs = [p.communicate(timeout=400) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (o, e) in zip(procs, outs):
        assert p.returncode == 0, o[-3000:] + e[-5000:]
    run = one.parent / "two_machines"
    ref, got = _metrics(one), _metrics(run)
    assert [r["step"] for r in got] == [1, 2, 3]
    assert all(abs(a[k] - b[k]) <= TOL for a, b in zip(ref, got) for k in KEYS)
    a, b = load_file(one / LORA), load_file(run / LORA)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=TOL, rtol=0) for k in a)
