"""The real tier (``make test-real``; marker ``real``, outside ``make test``): the Wan 2.1 T2V 1.3B
transformer built from its published config (``align/models/diffusers/configs/wan2_1_t2v_1_3b``)
with random weights in bf16, at the width and depth users train, under the shipped Wan recipes'
LoRA (targets, rank, alpha, bf16 mixed precision), on CPU at a small video size (5 x 64 x 64:
2 x 4 x 4 = 32 tokens).

The VAE and the text encoder are tiny, of the same classes: AutoencoderKLWan with ``base_dim`` 3,
and UMT5 at the published width 4096 (the transformer's ``text_dim``) with one layer and a
64-word vocabulary behind a word-level tokenizer. What runs through vidalign's trainer
(``align.training.train``, its loader patched to build this model): one DPO step and one GRPO
round (2 rollouts of 2 SDE steps with CFG, scored by a brightness judge). Checked: the LoRA
parameter count against ``r (in + out)``, that only LoRA moved, that ``WanPipeline
.load_lora_weights`` puts the saved LoRA into a pipeline of the full-width transformer, and the
planner's figure for a DPO step against its measured peak (with ``MALLOC_MMAP_THRESHOLD_`` set, as
``make test-real`` does: see ``tests/test_plan.py``). ``pytest -s`` prints the CPU step times.
"""

from __future__ import annotations

import gc
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from align.plan import Setup, lora_layers, lora_parameter_count, memory
from align.plan import load_architecture as planned_architecture
from align.plan import trace as planned_trace

pytestmark = pytest.mark.real

ROOT = Path(__file__).resolve().parents[2]
SIZE = dict(num_frames=5, height=64, width=64, max_sequence_length=16)
TINY = {
    "vae": dict(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1),
    "text_encoder": dict(num_layers=1, num_heads=2, d_kv=32, d_ff=64, vocab_size=64),
}
TIMES: dict[str, float] = {}


@pytest.fixture(autouse=True)
def _quiet_and_two_threads():
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    torch.set_num_threads(2)


def build_wan(**options):
    """The adapter (``WanVideoModel``) around a WanPipeline of the full-width 1.3B transformer
    (random bf16 weights, seed 0: every call builds the same weights) and the tiny parts."""
    from test_diffusers_models import _tokenizer

    torch.manual_seed(0)
    size = {**SIZE, **{k: v for k, v in options.items() if k in SIZE}}
    arch = planned_architecture("wan2_1_t2v_1_3b", size, torch.bfloat16, TINY, device="cpu")
    pipe = arch.model.pipe
    pipe.register_modules(text_encoder=arch.text_encoders["text_encoder"], tokenizer=_tokenizer(16))
    model = type(arch.model)(pipe, **{**size, "gradient_checkpointing": options.get("gradient_checkpointing", False)})
    return model.requires_grad_(False).eval()


def recipe_config(recipe: str, out: Path, **keys):
    """A shipped recipe with the small size and ``keys`` overriding it (parsed as ``train`` does)."""
    import yaml

    from align.training import load_train_config

    path = ROOT / "recipes" / recipe
    options = {**yaml.safe_load(path.read_text())["model_options"], **SIZE}
    base = {"output_dir": str(out), "checkpointing_steps": 0, "progress": False, "model_options": options}
    return load_train_config(path, {**base, **keys})


@pytest.fixture
def patched_loader(monkeypatch):
    """``align.training.core.load_model`` builds the real-width model; the models are kept."""
    import align.training.core

    built = []

    def load_model(path, device="cpu", **options):
        built.append(build_wan(**options))
        return built[-1]

    monkeypatch.setattr(align.training.core, "load_model", load_model)
    return built


def _lora_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for n, p in module.named_parameters() if "lora_" in n)


def test_dpo_step_lora_count_and_load_lora_weights(patched_loader, pref_dataset_dir, tmp_path):
    from align.training import train

    cfg = recipe_config("wan2_1_t2v_1_3b_dpo.yaml", tmp_path, dataset=pref_dataset_dir, max_steps=1,
                        gradient_accumulation_steps=1, latent_cache_dir=None, name="dpo")  # fmt: skip
    t0 = time.perf_counter()
    run = train(cfg)
    TIMES["dpo: one step through the trainer (s)"] = json.loads((run / "summary.json").read_text())["train_s"]
    TIMES["dpo: run incl. build and encoding (s)"] = time.perf_counter() - t0
    model = patched_loader[-1]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1] and np.isfinite(rows[0]["loss"])
    # the LoRA parameter count is r (in + out) over the recipe's targets: 30 blocks x 2 attentions x 4
    arch = planned_architecture(cfg.model, cfg.model_options, torch.bfloat16)
    layers = lora_layers(arch, planned_trace(arch), cfg.lora_targets)
    assert _lora_count(model.denoiser) == lora_parameter_count(layers, cfg.lora_rank) == 240 * 32 * (1536 + 1536)
    # only LoRA moved: the base weights are those of a fresh build with the same seed
    del patched_loader[:]
    fresh = build_wan()
    trained = {n.replace(".base_layer", ""): p for n, p in model.denoiser.named_parameters() if "lora_" not in n}
    assert trained.keys() == dict(fresh.denoiser.named_parameters()).keys()
    assert all(torch.equal(p, trained[n]) for n, p in fresh.denoiser.named_parameters())
    assert any(p.abs().max() > 0 for n, p in model.denoiser.named_parameters() if "lora_B" in n)
    del model, trained
    gc.collect()
    # WanPipeline.load_lora_weights reads the saved LoRA into a pipeline of the full-width transformer
    from safetensors.torch import load_file

    def matrix(name: str) -> str:  # "blocks.0.attn1.to_q.lora_A.<adapter>.weight" -> "blocks.0.attn1.to_q.lora_A"
        head, tail = name.removeprefix("transformer.").split(".lora_")
        return f"{head}.lora_{tail[0]}"

    saved = {matrix(k): v for k, v in load_file(str(run / "lora" / "pytorch_lora_weights.safetensors")).items()}
    fresh.pipe.load_lora_weights(str(run / "lora"))
    loaded = {matrix(n): p for n, p in fresh.pipe.transformer.named_parameters() if "lora_" in n}
    assert loaded.keys() == saved.keys() and len(saved) == 480
    for key, value in saved.items():
        assert torch.allclose(loaded[key].float(), value.float(), atol=1e-3, rtol=1e-2), key


class Brightness:
    """A judge: the mean pixel value (a stand-in; GRPO only needs a score per video)."""

    name = "brightness"

    def score(self, videos: np.ndarray, prompts: list[str]) -> np.ndarray:
        return videos.reshape(len(videos), -1).mean(1).astype(np.float64)


def test_grpo_round(patched_loader, tmp_path, monkeypatch):
    import align.judges
    from align.training import train

    monkeypatch.setattr(align.judges, "load_judges", lambda specs, device=None: [Brightness() for _ in specs])
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square moving left\na blue circle moving up\n")
    cfg = recipe_config(
        "wan2_1_t2v_1_3b_grpo.yaml", tmp_path, prompts_file=str(prompts), judges=["brightness"], group_size=2,
        prompts_per_round=1, sample_steps=2, train_timestep_fraction=0.5, rollout_batch_size=2,
        rollout_batches_per_update=1, max_steps=2, name="grpo",
    )  # fmt: skip
    run = train(cfg)
    summary = json.loads((run / "summary.json").read_text())
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["loss"]) for r in rows)
    TIMES["grpo: sampling 2 rollouts x 2 SDE steps with CFG (s)"] = rows[0]["rollout_s"]
    TIMES["grpo: the round, sampling + 2 micro-steps (s)"] = summary["train_s"]
    TIMES["grpo: one micro-step, mean (s)"] = summary["step_time_s_mean"]
    assert any(p.abs().max() > 0 for n, p in patched_loader[-1].denoiser.named_parameters() if "lora_B" in n)
    assert (run / "lora" / "pytorch_lora_weights.safetensors").is_file()


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


@pytest.mark.skipif(os.environ.get("MALLOC_MMAP_THRESHOLD_") is None, reason="run through `make test-real`")
def test_planned_dpo_step_memory_against_measured(tmp_path):
    """One DPO step of the recipe (bf16 autocast, LoRA rank 32, no checkpointing so that the
    activations are large enough to measure at this size; AdamW's state created beforehand, the
    thread pools warmed by the tests before): what it adds to the resident set against the
    planner's activations + LoRA gradients."""
    import ctypes

    from align.models.lora import attach_lora, lora_parameters
    from align.training.dpo import dpo_step_losses

    cfg = recipe_config("wan2_1_t2v_1_3b_dpo.yaml", tmp_path, dataset="unused", latent_cache_dir=None)
    size = dict(num_frames=5, height=64, width=128)  # 2 x 4 x 8 = 64 tokens
    model = build_wan(**size)
    attach_lora(model.denoiser, cfg.lora_rank, cfg.lora_alpha, 0.0, cfg.lora_targets)
    model.denoiser.train()
    opt = torch.optim.AdamW(lora_parameters(model.denoiser), lr=cfg.learning_rate)
    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(1, *model.latent_shape, generator=g), torch.randn(1, *model.latent_shape, generator=g))
    batch += (model.encode_prompts(["a red square moving left"]),)

    def step() -> float:
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = dpo_step_losses(model, model.denoiser, model.denoiser, batch, cfg.beta, cfg.loss_type, generator=g)
        out["loss"].backward()
        opt.step()
        opt.zero_grad()
        return time.perf_counter() - t0

    for p in lora_parameters(model.denoiser):  # AdamW's state exists before the measured step
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad()
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    TIMES["dpo: one step at 5x64x128 (64 tokens), no checkpointing (s)"] = step()
    measured = _status("VmHWM") - before
    cfg.model_options = {**cfg.model_options, **size, "gradient_checkpointing": False}
    arch = planned_architecture(cfg.model, cfg.model_options, torch.bfloat16)
    mem = memory(cfg, Setup(), arch, planned_trace(arch))
    planned = mem["activations"] + mem["grads"]
    TIMES["dpo step memory: planned (MiB)"] = planned / 2**20
    TIMES["dpo step memory: measured (MiB)"] = measured / 2**20
    assert planned == pytest.approx(measured, rel=0.25)


def test_zz_print_times():
    """Prints what the tests above measured (``pytest -s``)."""
    for key, value in TIMES.items():
        print(f"[test-real] {key}: {value:.1f}")
