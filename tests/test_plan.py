"""``vidalign plan``: the published architectures, the per-process figures under each backend, the
activation constants against saved tensors, and the planned peak against a measured one.

The measured peak is the resident-set high-water mark of a subprocess running one DPO step
(``align.training.dpo.dpo_step_losses``, policy + reference + backward) of a mid-width Wan built
from the published 1.3B config (2 blocks, width 512) on CPU, minus its resident set just before.
glibc's malloc is told to hand every block over 128 KiB back to the system when freed
(``MALLOC_MMAP_THRESHOLD_``): with its default dynamic threshold freed tensors stay in the heap
and the high-water mark over-reports live memory (2.0 GB for 0.93 GB live at one size here).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from align.models.lora import attach_lora
from align.plan import (
    COND_SHAPES,
    UNIT_BYTES,
    Setup,
    build_component,
    checkpoints,
    component_config,
    format_plan,
    load_architecture,
    lora_layers,
    lora_parameter_count,
    make_plan,
    memory,
    trace,
    unit_bytes,
)
from align.training import build_config, load_train_config

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
# parameters of the denoiser of each shipped checkpoint (published sizes in the comments)
DENOISER_PARAMS = {
    "wan2_1_t2v_1_3b": 1_418_996_800,  # "1.3B"
    "wan2_1_t2v_14b": 14_288_491_584,  # "14B"
    "wan2_2_ti2v_5b": 4_999_787_712,  # "5B"
    "wan2_2_t2v_a14b": 14_288_491_584,  # each of the two experts
    "cogvideox_2b": 1_693_783_872,
    "cogvideox_5b": 5_570_283_072,
    "ltx_video": 1_923_385_472,  # "2B"
    "hunyuan_video": 12_821_012_544,  # "13B"
    "animatediff_sd15": 859_520_964,  # the SD 1.5 UNet (the motion adapter adds 453 M)
}
# tiny text encoders and VAEs (same classes) for the architectures built on the CPU
TINY = {
    "vae_wan": dict(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1),
    "t5": dict(d_model=64, num_layers=1, num_heads=2, d_kv=32, d_ff=64, vocab_size=100),
    "vae_blocks": dict(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=2),
}
MID = {  # the mid-width Wan of the measured test: the published 1.3B config, 2 blocks of width 512
    "transformer": dict(num_layers=2, num_attention_heads=4, attention_head_dim=128, ffn_dim=2048),
    "vae": TINY["vae_wan"],
    "text_encoder": dict(num_layers=1, num_heads=2, d_kv=32, d_ff=64, vocab_size=100),
}


@pytest.fixture(autouse=True)
def _quiet():
    import diffusers

    level = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_error()
    yield
    diffusers.utils.logging.set_verbosity(level)


# ---------------------------------------------------------------------------------------
# Published architectures
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(DENOISER_PARAMS))
def test_published_architectures_build_on_the_meta_device(name):
    entry = checkpoints()[name]
    where = ROOT / "align" / "models" / "diffusers" / "configs" / name
    denoiser = build_component(component_config(where, entry["denoiser"]))
    assert all(p.is_meta for p in denoiser.parameters())
    assert sum(p.numel() for p in denoiser.parameters()) == DENOISER_PARAMS[name]
    for component in ("vae", *entry["text_encoders"]):
        assert sum(p.numel() for p in build_component(component_config(where, component)).parameters()) > 0
    readme = (where.parent / "README.md").read_text()
    assert name in readme and all(h in readme for h in entry["hub_ids"])


def test_text_encoders_and_vaes_have_their_published_sizes():
    def count(name, component):
        cfg = component_config(ROOT / "align/models/diffusers/configs" / name, component)
        return sum(p.numel() for p in build_component(cfg).parameters())

    assert count("wan2_1_t2v_1_3b", "text_encoder") == 5_680_910_336  # UMT5-XXL encoder
    assert count("cogvideox_2b", "text_encoder") == 4_762_310_656  # T5 v1.1 XXL encoder
    assert count("animatediff_sd15", "text_encoder") == 123_060_480  # CLIP ViT-L/14 text tower
    assert count("animatediff_sd15", "vae") == 83_653_863  # the SD VAE
    assert count("hunyuan_video", "text_encoder") == 7_505_186_816  # llava-llama-3-8b's language model


def test_unknown_model_is_named():
    with pytest.raises(ValueError, match="no published architecture for model 'someone/else'"):
        load_architecture("someone/else")


# ---------------------------------------------------------------------------------------
# Per-process figures
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wan_dpo():
    """The shipped Wan 1.3B DPO recipe, its architecture (meta) and trace."""
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    cfg = load_train_config(ROOT / "recipes" / "wan2_1_t2v_1_3b_dpo.yaml")
    arch = load_architecture(cfg.model, cfg.model_options, torch.bfloat16)
    return cfg, arch, trace(arch)


def test_lora_parameters_follow_the_formula(wan_dpo):
    cfg, arch, tr = wan_dpo
    layers = lora_layers(arch, tr, cfg.lora_targets)
    # 30 blocks x 2 attentions x (q, k, v, out) of 1536 x 1536: r (in + out) each
    assert len(layers) == 240 and lora_parameter_count(layers, 32) == 240 * 32 * (1536 + 1536)
    with pytest.raises(ValueError, match="'attn.qkv' matches no linear layer"):
        lora_layers(arch, tr, ["attn.qkv"])


def test_tokens_and_rows_of_the_trace(wan_dpo):
    _, arch, tr = wan_dpo
    tokens = 9 * 30 * 52  # 33 frames -> 9 latent frames; 480 x 832 / 8 / 2 = 30 x 52 patches
    blocks = [u for u in tr.units if u.kind == "WanTransformerBlock"]
    assert len(blocks) == 30 and all(u.tokens == tokens and u.hidden == 1536 and u.ffn == 8960 for u in blocks)
    assert all(u.text_tokens == 512 for u in blocks)
    assert tr.rows["transformer.blocks.0.attn1.to_q"] == tokens and tr.rows["transformer.blocks.0.attn2.to_k"] == 512
    # forward FLOPs: 2 x rows x in x out over the linear layers, attention on top
    linear = sum(
        2 * tr.rows[n] * m.in_features * m.out_features for n, m in arch.denoiser.named_modules() if n in tr.rows
    )
    assert tr.flops["linear"] == pytest.approx(linear, rel=1e-6)
    assert tr.flops["attention"] == pytest.approx(30 * 4 * tokens * 1536 * (tokens + 512), rel=1e-6)


def test_zero3_on_8_gpus_shards_what_it_should(wan_dpo):
    cfg, arch, tr = wan_dpo
    one = memory(cfg, Setup(1, "ddp"), arch, tr)
    zero2 = memory(cfg, Setup(8, "zero2"), arch, tr)
    zero3 = memory(cfg, Setup(8, "zero3"), arch, tr)
    block = max(u.param_bytes for u in tr.units)
    assert zero3["denoiser"] == pytest.approx(one["denoiser"] / 8 + block)
    assert zero2["denoiser"] == one["denoiser"]
    p = lora_parameter_count(lora_layers(arch, tr, cfg.lora_targets), cfg.lora_rank)
    assert one["lora"] == 4 * p and one["grads"] == 4 * p and one["optimizer"] == 8 * p
    assert zero2["grads"] == pytest.approx(4 * p / 8) and zero2["optimizer"] == pytest.approx(12 * p / 8)
    assert zero3["lora"] == pytest.approx(2 * p / 8) and zero3["grads"] == pytest.approx(4 * p / 8)
    for key in ("vae", "text_encoder", "activations"):  # not sharded: outside the engine, or per sample
        assert zero3[key] == one[key]
    assert zero3["peak"] < zero2["peak"] < one["peak"]
    sp = memory(cfg, Setup(8, "zero3", sp=4), arch, tr)
    assert sp["activations"] < zero3["activations"] / 3


def test_the_recipes_sequence_parallel_size_is_the_default(wan_dpo):
    cfg, arch, tr = wan_dpo
    two = dataclasses.replace(cfg, sequence_parallel_size=2)
    plan = make_plan(two, None, "sp 2", arch=arch)
    assert plan.setup == Setup(2, "ddp", 2)
    assert plan.memory["activations"] == pytest.approx(memory(cfg, Setup(2), arch, tr)["activations"] / 2, rel=0.01)


def test_checkpointing_text_encoder_and_rollout_buffers(wan_dpo):
    cfg, arch, tr = wan_dpo
    mem = memory(cfg, Setup(), arch, tr)
    assert mem["activations_checkpointing"] < mem["activations_no_checkpointing"] / 5
    assert mem["activations"] == mem["activations_checkpointing"]  # the recipe turns it on
    assert mem["text_encoder"] == 0  # latent_cache_dir: not loaded once every prompt is cached
    uncached = load_train_config(ROOT / "recipes" / "wan2_1_t2v_1_3b_dpo.yaml", {"latent_cache_dir": None})
    assert memory(uncached, Setup(), arch, tr)["text_encoder"] == pytest.approx(5_680_910_336 * 2, rel=0.01)
    grpo = load_train_config(ROOT / "recipes" / "wan2_1_t2v_1_3b_grpo.yaml")
    one, four = memory(grpo, Setup(1), arch, tr), memory(grpo, Setup(4), arch, tr)
    latent = 16 * 9 * 60 * 104 * 4  # float32
    assert one["buffers"] == 32 * (11 * latent + 512 * 4096 * 2)  # 11 steps, the bf16 text states
    assert four["buffers"] == pytest.approx(one["buffers"] / 4)
    assert one["text_encoder"] > 0 and one["peak_rollout"] > 0


def test_cli_prints_the_table_and_a_verdict(capsys):
    from align.cli import main

    for recipe in ("wan2_1_t2v_1_3b_dpo.yaml", "wan2_1_t2v_1_3b_grpo.yaml"):
        assert main(["plan", str(ROOT / "recipes" / recipe)]) == 0
        out = capsys.readouterr().out
        assert "PEAK per process" in out and "activations, gradient checkpointing" in out
        assert " 24 GB card:" in out and "141 GB card:" in out and "time per process on an H100" in out
    assert main(["plan", str(ROOT / "recipes" / "wan2_1_t2v_1_3b_dpo.yaml"), "--gpus", "8", "--backend", "zero3",
                 "--json", "--gradient_checkpointing", "false"]) == 0  # fmt: skip
    plan = json.loads(capsys.readouterr().out)
    assert plan["setup"] == {"gpus": 8, "backend": "zero3", "sp": 1} and plan["memory_gib"]["peak"] > 0
    assert set(plan["verdicts"]) == {"24", "48", "80", "141"}


def test_a_plan_that_does_not_fit_names_the_knob_to_turn_first():
    cfg = load_train_config(ROOT / "recipes" / "wan2_1_t2v_1_3b_grpo.yaml")
    cfg.model_options = {**cfg.model_options, "gradient_checkpointing": False}
    plan = make_plan(cfg, Setup(), "grpo without checkpointing")
    v = plan.verdicts[24]
    assert not v["fits"] and v["turn"][0] == "gradient_checkpointing: true"
    assert "turn first: gradient_checkpointing: true" in format_plan(plan)


# ---------------------------------------------------------------------------------------
# The activation constants against saved tensors (CPU, tiny widths of every family)
# ---------------------------------------------------------------------------------------

SMALL = {  # checkpoint, transformer overrides, text encoder overrides, vae overrides, options
    "wan": ("wan2_1_t2v_1_3b", dict(num_layers=3, num_attention_heads=4, attention_head_dim=64, ffn_dim=640,
            text_dim=64), {"text_encoder": TINY["t5"]}, TINY["vae_wan"], dict(max_sequence_length=24)),
    "cogvideox": ("cogvideox_2b", dict(num_layers=3, num_attention_heads=4, attention_head_dim=64, text_embed_dim=64,
                  max_text_seq_length=24, time_embed_dim=64), {"text_encoder": TINY["t5"]},
                  {**TINY["vae_blocks"], "latent_channels": 16}, {}),
    "ltx": ("ltx_video", dict(num_layers=3, num_attention_heads=4, attention_head_dim=64, cross_attention_dim=256,
            caption_channels=64), {"text_encoder": TINY["t5"]},
            dict(block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
                 layers_per_block=(1, 1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1, 1)),
            dict(max_sequence_length=24)),
    "hunyuan": ("hunyuan_video", dict(num_layers=2, num_single_layers=2, num_refiner_layers=1, num_attention_heads=4,
                attention_head_dim=64, text_embed_dim=64, pooled_projection_dim=16, rope_axes_dim=(16, 24, 24)),
                {"text_encoder": dict(hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=2, head_dim=32, vocab_size=100),
                 "text_encoder_2": dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, vocab_size=100, projection_dim=16)},
                {**TINY["vae_blocks"], "latent_channels": 16, "norm_num_groups": 4}, dict(max_sequence_length=24)),
}  # fmt: skip
SIZES = {"wan": (9, 128, 64), "cogvideox": (9, 128, 64), "ltx": (17, 256, 128), "hunyuan": (9, 128, 64)}


class SavedByUnit:
    """Bytes of the distinct storages saved for backward (parameters excluded), by the unit running."""

    def __init__(self, module: torch.nn.Module):
        self.stack, self.seen, self.bytes = [], set(), {}
        self.skip = {p.untyped_storage().data_ptr() for p in module.parameters()}
        self.skip |= {b.untyped_storage().data_ptr() for b in module.buffers()}
        self.handles = []
        for name, m in module.named_modules():
            if type(m).__name__ in UNIT_BYTES:
                self.handles.append(m.register_forward_pre_hook(lambda _m, _a, n=name: self.stack.append(n)))
                self.handles.append(m.register_forward_hook(lambda _m, _a, _o: (self.stack.pop(), None)[1]))

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage().data_ptr()
        if key and key not in self.skip and key not in self.seen:
            self.seen.add(key)
            unit = self.stack[-1] if self.stack else ""
            self.bytes[unit] = self.bytes.get(unit, 0) + t.untyped_storage().nbytes()
        return t


@pytest.mark.parametrize("family", sorted(SMALL))
def test_unit_constants_match_the_saved_tensors(family):
    """Each unit's estimate (``saved(u)`` + LoRA's rank terms) against what autograd saves in a bf16
    autocast forward with LoRA on the attention projections, every unit but the first of its kind
    (the first also saves what all share: text states, timestep embedding, rotary tables)."""
    name, tr_over, te_over, vae_over, options = SMALL[family]
    frames, height, width = SIZES[family]
    options = {**options, "num_frames": frames, "height": height, "width": width}
    overrides = {"transformer": tr_over, "vae": vae_over, **te_over}
    meta = load_architecture(name, options, torch.bfloat16, overrides)
    tr = trace(meta)
    torch.manual_seed(0)
    arch = load_architecture(name, options, torch.bfloat16, overrides, device="cpu")
    den = arch.denoiser.requires_grad_(False)
    attach_lora(den, rank=8, alpha=8.0, target_modules=TARGETS)
    model = arch.model
    x = torch.randn(1, *model.latent_shape)
    cond = torch.ones(1, *COND_SHAPES[family](model.max_sequence_length, arch.text_width))
    saved = SavedByUnit(den)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
        den(x, torch.tensor([500.0]), cond)
    for h in saved.handles:
        h.remove()
    layers = lora_layers(meta, tr, TARGETS)
    first = set()
    for u in tr.units:
        if u.kind in first:
            lora = sum(8 * 2.0 * rows for n, _, _, rows in layers if n.startswith(u.name + "."))
            assert unit_bytes(u, "autocast") + lora == pytest.approx(saved.bytes[u.name], rel=0.1), u.name
        first.add(u.kind)


# ---------------------------------------------------------------------------------------
# Planned against measured peak memory (CPU, mid-width Wan, three video sizes)
# ---------------------------------------------------------------------------------------


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def measure_dpo_step(frames: int, height: int, width: int) -> dict:
    """In this process: build the mid-width Wan (float32, CPU), attach LoRA, run a warm-up DPO
    step, then return the resident set before a second step and its high-water mark during it."""
    import ctypes
    import gc

    from align.models.lora import lora_parameters
    from align.training.dpo import dpo_step_losses

    torch.set_num_threads(2)
    options = dict(num_frames=frames, height=height, width=width)
    arch = load_architecture("wan2_1_t2v_1_3b", options, torch.float32, MID, device="cpu")
    model = arch.model
    attach_lora(model.denoiser, rank=16, alpha=16.0, target_modules=TARGETS)
    model.denoiser.train()
    optimizer = torch.optim.AdamW(lora_parameters(model.denoiser), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(1, *model.latent_shape, generator=g), torch.randn(1, *model.latent_shape, generator=g))
    batch += (torch.randn(1, model.max_sequence_length, arch.text_width, generator=g),)

    def step() -> None:
        out = dpo_step_losses(model, model.denoiser, model.denoiser, batch, 500.0, "sigmoid", generator=g)
        out["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()

    step()  # warm-up: thread pools, BLAS buffers and the optimizer state exist before the measured step
    gc.collect()
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
    step()
    return {"before": before, "peak": _status("VmHWM")}


def _mid_plan(frames: int, height: int, width: int):
    cfg = build_config(
        model="Wan-AI/Wan2.1-T2V-1.3B-Diffusers", dataset="unused", objective="dpo", train_batch_size=1,
        model_options=dict(dtype="float32", num_frames=frames, height=height, width=width),
        lora_rank=16, lora_alpha=16.0, lora_targets=TARGETS, mixed_precision="no",
    )  # fmt: skip
    arch = load_architecture(cfg.model, cfg.model_options, torch.float32, MID)
    return memory(cfg, Setup(), arch, trace(arch))


@pytest.mark.integration
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("size", [(9, 256, 256), (9, 256, 512), (9, 512, 512)])  # 768, 1536, 3072 tokens
def test_planned_peak_is_the_measured_one_within_20_percent(size):
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    run = subprocess.run(
        [sys.executable, __file__, *map(str, size)], capture_output=True, text=True, env=env, timeout=600, cwd=ROOT
    )
    assert run.returncode == 0, run.stderr[-3000:]
    measured = json.loads(run.stdout.strip().splitlines()[-1])
    mem = _mid_plan(*size)
    planned = mem["activations"] + mem["grads"]  # what the step adds to what was resident before it
    step = measured["peak"] - measured["before"]
    print(f"{size}: planned {planned / 2**20:.0f} MiB, measured {step / 2**20:.0f} MiB ({planned / step - 1:+.1%})")
    assert planned == pytest.approx(step, rel=0.2)


if __name__ == "__main__":  # the measured side of the test above, in a fresh process
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    print(json.dumps(measure_dpo_step(*map(int, sys.argv[1:4]))))
