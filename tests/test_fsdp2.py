"""FSDP2 (``recipes/accelerate/fsdp2.yaml``) and DeepSpeed host-memory offload
(``deepspeed_zero{2,3}_offload.yaml``) as training backends.

Unit tier: which launches ask for FSDP2 (FSDP1 refused), which blocks are sharded, and in one
process over gloo a sharded LoRA denoiser whose frozen base is bf16 and LoRA float32 computes
what the unsharded one does, with adapters on and off (the reference), trains only its LoRA,
and saves / loads its LoRA gathered to full tensors. Integration tier: 2 FSDP2 processes on CPU
(gloo) match 1 process within ``TOL`` (losses of 3 steps, final LoRA), each rank holds about
half of the denoiser's parameters and of the optimizer state, and a resumed run redoes step 3
bit-identically; the offload configs launch here and match 1 process too."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import load_file

from align.training import core

TOL = 1e-5
KEYS = ("loss", "implicit_acc", "reward_margin", "model_diff", "ref_diff")
LORA = "lora/pytorch_lora_weights.safetensors"


def test_uses_fsdp2_reads_the_launch(monkeypatch):
    acc = SimpleNamespace(is_fsdp2=False, num_processes=2)
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert not core.uses_fsdp2(acc)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    assert core.uses_fsdp2(acc)
    assert not core.uses_fsdp2(SimpleNamespace(is_fsdp2=False, num_processes=1))  # nothing to shard
    assert core.uses_fsdp2(SimpleNamespace(is_fsdp2=True, num_processes=1))  # accelerate says so (GPUs)
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(ValueError, match="FSDP version 1 is not supported: use FSDP2"):
        core.uses_fsdp2(acc)


def test_blocks_sharded_one_by_one(tiny_model_dir, monkeypatch):
    from align.models import load_model
    from align.models.tiny_sora import Block

    den = load_model(str(tiny_model_dir)).denoiser
    monkeypatch.delenv("FSDP_TRANSFORMER_CLS_TO_WRAP", raising=False)
    blocks = core._fsdp2_blocks(den)
    assert blocks and all(isinstance(b, Block) for b in blocks)
    assert len(blocks) == sum(isinstance(m, Block) for m in den.modules())
    monkeypatch.setenv("FSDP_TRANSFORMER_CLS_TO_WRAP", "Linear")  # the accelerate config's class names win
    assert all(isinstance(b, torch.nn.Linear) for b in core._fsdp2_blocks(den))


@pytest.fixture
def gloo_world_of_one():
    """A 1-process gloo group in this interpreter (FSDP2 needs a process group)."""
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this interpreter")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _lora_denoiser(model_dir: Path):
    """The tiny model with its denoiser in bf16 and a LoRA (float32, B non-zero) attached."""
    from align.models import load_model
    from align.models.lora import attach_lora, lora_parameters

    model = load_model(str(model_dir))
    model.denoiser.to(torch.bfloat16)
    attach_lora(model.denoiser, 4, 4.0, 0.0, ["attn.qkv", "attn.proj"])
    torch.manual_seed(1)
    for p in lora_parameters(model.denoiser):
        torch.nn.init.normal_(p, std=0.1)
    return model


def test_sharded_bf16_base_with_fp32_lora_in_one_process(tiny_model_dir, gloo_world_of_one, tmp_path):
    from align.models.lora import adapters_disabled, lora_parameters, save_lora

    model, plain = _lora_denoiser(tiny_model_dir), _lora_denoiser(tiny_model_dir)
    den = model.denoiser
    core.shard_fsdp2(den, torch.device("cpu"))
    assert {type(p).__name__ for p in den.parameters()} == {"DTensor"}
    assert {p.dtype for p in lora_parameters(den)} == {torch.float32}
    assert torch.bfloat16 in {p.dtype for p in den.parameters()}
    x, t, cond = torch.randn(2, *model.latent_shape), torch.tensor([100, 700]), model.encode_prompts(["a", "b"])
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as mixed_precision: bf16 runs it
        out, ref = den(x, t, cond), plain.denoiser(x, t, cond)
        with torch.no_grad(), adapters_disabled(den), adapters_disabled(plain.denoiser):
            off, plain_off = den(x, t, cond), plain.denoiser(x, t, cond)
    assert torch.allclose(out.float(), ref.float(), atol=1e-2)
    assert torch.allclose(off.float(), plain_off.float(), atol=1e-2) and not torch.allclose(off, out)
    out.float().square().mean().backward()
    assert all(p.grad is not None for p in lora_parameters(den))
    assert all(p.grad is None for n, p in den.named_parameters() if "lora_" not in n)

    save_lora(den, tmp_path / "lora", state_dict=core.fsdp2_full_lora(den))
    save_lora(plain.denoiser, tmp_path / "plain")
    a, b = load_file(tmp_path / LORA), load_file(tmp_path / "plain" / LORA.split("/")[1])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    fresh = _lora_denoiser(tiny_model_dir).denoiser
    with torch.no_grad():
        for p in lora_parameters(fresh):
            p.zero_()
    core.shard_fsdp2(fresh, torch.device("cpu"))
    core.fsdp2_load_lora(fresh, tmp_path / "lora")
    back = core.fsdp2_full_lora(fresh)
    assert all(torch.equal(back[n], v) for n, v in core.fsdp2_full_lora(den).items())


def test_mixed_precision_bf16_autocasts_the_sharded_denoiser(tiny_model_dir, gloo_world_of_one):
    """``mixed_precision: bf16``: the sharded denoiser computes under bf16 autocast (as DDP
    under accelerate), outputs float32, the LoRA kept float32; fp16 is refused."""
    from align.models import load_model
    from align.models.lora import attach_lora, lora_parameters

    model, plain = load_model(str(tiny_model_dir)), load_model(str(tiny_model_dir))
    for m in (model, plain):
        attach_lora(m.denoiser, 4, 4.0, 0.0, ["attn.qkv", "attn.proj"])
    with pytest.raises(ValueError, match="fp16 is not supported"):
        core.shard_fsdp2(model.denoiser, torch.device("cpu"), "fp16")
    core.shard_fsdp2(model.denoiser, torch.device("cpu"), "bf16")
    x, t, cond = torch.randn(2, *model.latent_shape), torch.tensor([100, 700]), model.encode_prompts(["a", "b"])
    out, ref = model.denoiser(x, t, cond), plain.denoiser(x, t, cond)
    assert out.dtype == torch.float32 and {p.dtype for p in lora_parameters(model.denoiser)} == {torch.float32}
    assert torch.allclose(out, ref, atol=0.1) and not torch.equal(out, ref)  # computed in bf16


def test_a_checkpoint_of_another_backend_is_refused(tiny_model_dir, tmp_path):
    from conftest import tiny_recipe

    from align.training import build_config

    cfg = build_config(**tiny_recipe(tiny_model_dir, tmp_path, dataset="x"))
    ckpt = tmp_path / "checkpoint-2"
    ckpt.mkdir()
    state = {"step": 2, "recipe": core.recipe_fingerprint(cfg), "num_processes": 2, "zero_stage": None}
    (ckpt / "trainer_state.json").write_text(json.dumps({**state, "backend": "fsdp2"}))
    assert core.check_resumable(ckpt, cfg, 2, None, "fsdp2")["step"] == 2
    with pytest.raises(ValueError, match="written with backend fsdp2; this launch uses DDP/DeepSpeed"):
        core.check_resumable(ckpt, cfg, 2, None)


# -- integration: 2 processes on CPU ---------------------------------------------------------------


def _launch(kind: str, recipe: Path, *overrides: str) -> None:
    from align.launch import cpu_launch

    proc = cpu_launch(kind, 2, recipe, *overrides, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


def _metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _same_update(one: Path, run: Path) -> dict:
    """Max |difference| of the metrics of steps 1-3; asserts the final LoRAs agree within TOL."""
    ref, got = _metrics(one), _metrics(run)
    assert [r["step"] for r in got] == [1, 2, 3]
    a, b = load_file(one / LORA), load_file(run / LORA)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=TOL, rtol=0) for k in a)
    return {k: max(abs(x[k] - y[k]) for x, y in zip(ref, got)) for k in KEYS}


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    """A 16-pair dataset, a recipe with an effective batch of 8 pairs, and the 1-process run."""
    from conftest import make_preference_rows, save_rows, tiny_recipe

    from align.training import build_config, train

    tmp = tmp_path_factory.mktemp("fsdp2")
    data = save_rows(make_preference_rows(16), tmp / "prefs")
    recipe = tiny_recipe(
        tiny_model_dir, tmp / "runs", dataset=data, max_steps=3, effective_batch_size=8, checkpointing_steps=2
    )
    (tmp / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return tmp / "recipe.yaml", train(build_config(**recipe, name="one"))


@pytest.mark.integration
def test_fsdp2_two_processes_match_one_and_resume(setup):
    recipe, one = setup
    _launch("fsdp2", recipe, "--name", "fsdp2")
    run = one.parent / "fsdp2"
    diffs = _same_update(one, run)
    print(f"\nfsdp2: max |2-process - 1-process| over steps 1-3: {diffs}")
    assert all(d <= TOL for d in diffs.values()), diffs
    full, two = (json.loads((r / "summary.json").read_text()) for r in (one, run))
    assert two["backend"] == "fsdp2" and json.loads((run / "checkpoint-2/trainer_state.json").read_text())["backend"]
    for key in ("denoiser_param_bytes_per_rank", "optimizer_state_bytes_per_rank"):
        print(f"fsdp2: {key} {two[key]} (1 process: {full[key]})")
        # sharded: the shards add up to the whole (+ each rank's Adam step counters)
        assert abs(sum(two[key]) - full[key][0]) <= 0.01 * full[key][0] and max(two[key]) <= 0.6 * full[key][0]

    shutil.copytree(run, run.parent / "fsdp2-first")  # resume from checkpoint-2: step 3 and the LoRA, same bits
    _launch("fsdp2", recipe, "--name", "fsdp2", "--resume", "latest")
    first = run.parent / "fsdp2-first"
    assert [(r["step"], r["loss"]) for r in _metrics(run)] == [(r["step"], r["loss"]) for r in _metrics(first)]
    a, b = load_file(first / LORA), load_file(run / LORA)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["zero2_offload", "zero3_offload"])
def test_offload_configs_launch_and_match_one(setup, kind):
    recipe, one = setup
    _launch(kind, recipe, "--name", kind)
    diffs = _same_update(one, one.parent / kind)
    assert all(d <= TOL for d in diffs.values()), diffs
    summary = json.loads((one.parent / kind / "summary.json").read_text())
    print(f"\n{kind}: {diffs}; per rank: optimizer {summary['optimizer_state_bytes_per_rank']}")
