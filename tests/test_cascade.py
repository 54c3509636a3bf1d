"""Cascades: the embedded one (tiny Sora base + TSR + SSR, ``align.models.cascade``) and LTX-Video's
two-stage generation with its latent upsampler (``cascade:`` option of ``align.models.diffusers.ltx``).

Sampling shapes and determinism per seed; the videos judges see are the final stage's; LoRA
trains the base stage only (the stages' parameters unchanged); the shipped models' size.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from conftest import PROMPT, tiny_recipe

from align.models import load_model
from align.models.base import VideoDiffusionModel
from align.models.cascade import Cascade, StageConfig, SuperResolutionStage
from align.models.lora import adapters_disabled, attach_lora, lora_parameters
from align.models.tiny_sora import TinySora
from align.sample import generate, sample_latents, sample_with_logprobs

OTHER = "a blue circle moving up on a gray background"


@pytest.fixture(scope="module")
def cascade_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A cascade over the tiny test base (8x32x32): TSR (x2 frames) and SSR (x2 space), tiny and
    randomly initialised (output layers non-zero), saved as a cascade directory."""
    torch.manual_seed(1)
    stages = [
        SuperResolutionStage(StageConfig(kind=k, channels=8, blocks=1, num_steps=2)) for k in ("temporal", "spatial")
    ]
    for st in stages:
        torch.nn.init.normal_(st.denoiser.out.weight, std=0.05)
    path = tmp_path_factory.mktemp("cascade") / "tiny_cascade"
    rel = os.path.relpath(tiny_model_dir, path)
    return Cascade(TinySora.from_pretrained(tiny_model_dir), stages).save_stages(path, rel)


def _stage_state(model: Cascade) -> dict[str, torch.Tensor]:
    return {
        f"{k}.{n}": p.detach().clone() for k, st in enumerate(model.stages) for n, p in st.denoiser.named_parameters()
    }


def test_cascade_samples_final_videos_deterministically(cascade_dir):
    m = load_model(cascade_dir)
    assert isinstance(m, Cascade) and isinstance(m, VideoDiffusionModel)
    assert m.latent_shape == (4, 4, 8, 8)  # the base stage's: what training sees
    assert m.check_video_size() == (16, 64, 64) == m.final_size
    with pytest.raises(ValueError, match="Cascade: video size 8x32x32"):
        m.check_video_size(8, 32, 32)

    v = generate(m, [PROMPT, PROMPT, OTHER], [0, 1, 2], num_steps=2, guidance_scale=2.0)
    assert v.shape == (3, 3, 16, 64, 64) and v.min() >= -1 and v.max() <= 1
    alone = generate(m, [PROMPT], [1], num_steps=2, guidance_scale=2.0)
    assert torch.allclose(v[1:2], alone, atol=1e-5)  # a video depends on its seed, not its batch
    assert not torch.allclose(v[0], v[1], atol=1e-3)  # another seed, another video

    lat = sample_latents(m, [PROMPT], [0], num_steps=2, guidance_scale=2.0)
    levels = m.stage_latents(lat, [0])
    assert [tuple(z.shape[1:]) for z in levels] == [(4, 4, 8, 8), (4, 8, 8, 8), (4, 8, 16, 16)]
    assert torch.equal(m.stage_latents(lat, [0])[-1], levels[-1])
    assert not torch.allclose(m.stage_latents(lat, [7])[-1], levels[-1])  # stage noise comes from the seed
    # a final-size video is encoded as its base-size version (every other frame, 2x2 pooled)
    small = torch.nn.functional.avg_pool3d(v[:1, :, ::2], (1, 2, 2))
    assert torch.allclose(m.encode_video(v[:1]), m.encode_video(small), atol=1e-6)


def test_online_rollouts_give_the_cascade_output(cascade_dir):
    m = load_model(cascade_dir)
    out = sample_with_logprobs(m, [PROMPT, OTHER], [3, 4], num_steps=3, guidance_scale=2.0)
    assert out["videos"].shape == (2, 16, 64, 64, 3)  # what the judges score: the final stage
    assert out["latents"].shape[2:] == (4, 4, 8, 8)  # what GRPO trains: the base stage's trajectory


def test_generate_to_disk_records_final_size(cascade_dir, tmp_path):
    from align.data.video import read_video
    from align.generation import sample_to_disk
    from align.sample import SamplingOptions

    m = load_model(cascade_dir)
    rows = sample_to_disk(m, [PROMPT], [0], tmp_path, SamplingOptions(num_steps=2), progress=False)
    assert rows[0]["size"] == [16, 64, 64]
    assert read_video(tmp_path / rows[0]["file"]).shape == (16, 64, 64, 3)


def test_dpo_trains_lora_on_the_base_stage_only(cascade_dir, pref_dataset_dir, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    import align.training.core as core
    from align.training import build_config, load_aligned, train

    fresh = load_model(cascade_dir)
    loaded = []

    def load_and_keep(*args, **kwargs):
        loaded.append(load_model(*args, **kwargs))
        return loaded[-1]

    monkeypatch.setattr(core, "load_model", load_and_keep)
    cfg = tiny_recipe(cascade_dir, tmp_path, dataset=pref_dataset_dir, name="run", max_steps=2, train_batch_size=4)
    run = train(build_config(**cfg))
    (trained,) = loaded
    assert isinstance(trained, Cascade)
    # the stages' parameters are bit-identical to the shipped ones after training
    after, before = _stage_state(trained), _stage_state(fresh)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    # LoRA: only in the base U-ViT, and it trained
    lora = load_file(run / "lora" / "pytorch_lora_weights.safetensors")
    assert lora and all(k.startswith("transformer.") and ".attn." in k for k in lora)
    assert any(v.abs().max() > 0 for k, v in lora.items() if "lora_B" in k)
    trainable = [n for name, mod in trained.components().items() for n, p in mod.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert {name for name, mod in trained.components().items() if any(p.requires_grad for p in mod.parameters())} == {
        "denoiser"
    }
    # base vs aligned through the cascade: same seed, different final videos
    aligned = load_aligned(cascade_dir, run / "lora")
    a = generate(aligned, [PROMPT], [0], num_steps=2, guidance_scale=2.0)
    b = generate(fresh, [PROMPT], [0], num_steps=2, guidance_scale=2.0)
    assert a.shape == b.shape == (1, 3, 16, 64, 64) and not torch.allclose(a, b)


# ---------------------------------------------------------------------------------------- LTX


@pytest.fixture(scope="module")
def ltx_dirs(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny LTXPipeline (tests/test_diffusers_models.py) and a tiny LTXLatentUpsamplerModel."""
    from diffusers.pipelines.ltx.modeling_latent_upsampler import LTXLatentUpsamplerModel
    from test_diffusers_models import build_pipeline

    root = tmp_path_factory.mktemp("ltx")
    torch.manual_seed(0)
    build_pipeline("ltx").save_pretrained(root / "pipe")
    up = LTXLatentUpsamplerModel(in_channels=8, mid_channels=32, num_blocks_per_stage=1, spatial_upsample=True)
    up.save_pretrained(root / "upsampler")
    return root / "pipe", root / "upsampler"


def test_ltx_two_stage_generation(ltx_dirs):
    pipe_dir, up_dir = ltx_dirs
    opts = dict(num_frames=9, height=64, width=64, max_sequence_length=16, cascade=str(up_dir), cascade_steps=2)
    m = load_model(pipe_dir, **opts)
    assert m.latent_shape == (8, 3, 8, 8)  # stage 1 at 32x32: what training and LoRA see
    assert m.video_input["height"] == 32 and m.check_video_size() == (9, 64, 64)
    with pytest.raises(ValueError, match=r"ltx cascade \(final 50x50, stage 1 at 25x25\)"):
        m.check_video_size(9, 50, 50)  # stage 1 at 25x25: not a multiple of the VAE's 4

    v = generate(m, [PROMPT, OTHER], [0, 1], num_steps=2, guidance_scale=3.0)  # vidalign's sampler
    assert v.shape == (2, 3, 9, 64, 64)
    assert torch.allclose(v[1:], generate(m, [OTHER], [1], num_steps=2, guidance_scale=3.0), atol=1e-4)
    piped = m.generate_videos([PROMPT], [0], num_steps=2, guidance_scale=3.0)  # LTXPipeline for stage 1
    assert piped.shape == (1, 3, 9, 64, 64)
    roll = sample_with_logprobs(m, [PROMPT], [0], num_steps=2, guidance_scale=3.0)  # an online rollout
    assert roll["videos"].shape == (1, 9, 64, 64, 3) and roll["latents"].shape[2:] == (8, 3, 8, 8)

    # LoRA on stage 1 only: stage 2 (upsampler + refinement) ignores the adapters
    lat = roll["clean"]
    before = m.refine(m.upsample_latents(lat), [PROMPT], [0])
    assert before.shape[2:] == (3, 16, 16)
    attach_lora(m.denoiser, 4, 4.0, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    with torch.no_grad():
        for p in lora_parameters(m.denoiser):
            p.add_(0.5)
    assert torch.allclose(m.refine(m.upsample_latents(lat), [PROMPT], [0]), before, atol=1e-5)
    x, t, c = torch.randn(1, *m.latent_shape), torch.full((1,), 500.0), m.encode_prompts([PROMPT])
    with adapters_disabled(m.denoiser):
        ref = m.predict(x, t, c)
    assert not torch.allclose(m.predict(x, t, c), ref)  # stage 1 is adapted
    assert not any(p.requires_grad for p in m.upsampler.parameters())


def test_ltx_cascade_directory_loads_like_any_model(ltx_dirs, tmp_path):
    """A cascade.json naming the pipeline and its upsampler: what `generate` / `eval` take as --model."""
    import json

    pipe_dir, up_dir = ltx_dirs
    opts = {"num_frames": 9, "height": 64, "width": 64, "max_sequence_length": 16, "cascade_steps": 2}
    spec = {"base": str(pipe_dir), "upsampler": os.path.relpath(up_dir, tmp_path), "options": opts}
    (tmp_path / "cascade.json").write_text(json.dumps(spec))
    m = load_model(tmp_path)
    assert m.upsampler is not None and m.check_video_size() == (9, 64, 64) and m.latent_shape == (8, 3, 8, 8)


def test_ltx_cascade_errors(ltx_dirs, tmp_path):
    pipe_dir, _ = ltx_dirs
    with pytest.raises(FileNotFoundError, match="not a latent upsampler"):
        load_model(pipe_dir, num_frames=9, height=64, width=64, cascade=str(tmp_path))
    one_stage = load_model(pipe_dir, num_frames=9, height=32, width=32, max_sequence_length=16)
    assert one_stage.upsampler is None and one_stage.latent_shape == (8, 3, 8, 8)


# ------------------------------------------------------------------------------- shipped models


def test_shipped_models_fit_and_include_the_cascade():
    from align.demo.pretrain import DEMO_MODELS, SHA256SUMS, demo_models

    demo_models()  # every file, the cascade's too, matches SHA256SUMS
    listed = {ln.split(maxsplit=1)[1] for ln in (DEMO_MODELS / SHA256SUMS).read_text().splitlines()}
    assert "tiny_sora_cascade/cascade.json" in listed
    total = sum(f.stat().st_size for f in DEMO_MODELS.rglob("*") if f.is_file())
    assert total <= 25 * 2**20, f"shipped models are {total / 2**20:.1f} MiB (> 25)"
    m = load_model(DEMO_MODELS / "tiny_sora_cascade")
    assert m.final_size == (16, 64, 64) and [st.cfg.kind for st in m.stages] == ["temporal", "spatial"]


def test_pretrain_cli_ships_a_cascade_over_a_base(tiny_model_dir, tmp_path, capsys):
    """`vidalign pretrain CASCADE_RECIPE --demo DIR`: stages trained over DIR/tiny_sora, written in
    fp16 to DIR/tiny_sora_cascade, their lines added to DIR/SHA256SUMS (the others kept)."""
    import shutil

    from safetensors.torch import load_file

    from align.cli import main
    from align.demo.pretrain import SHA256SUMS, demo_models

    root = tmp_path / "models"
    shutil.copytree(tiny_model_dir, root / "tiny_sora")
    (root / SHA256SUMS).write_text("0" * 64 + "  reward_backbone/model.safetensors\n")
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "tiny_sora_cascade_pretrain.yaml"
    over = ["--num_videos", "8", "--steps", "2", "--batch_size", "4"]
    assert main(["pretrain", str(recipe), "--demo", str(root), *over]) == 0
    assert "cascade (base" in capsys.readouterr().out
    lines = (root / SHA256SUMS).read_text().splitlines()
    assert lines[0].endswith("reward_backbone/model.safetensors") and any("stage1_spatial" in ln for ln in lines)
    assert all(
        v.dtype == torch.float16 for v in load_file(root / "tiny_sora_cascade" / "stage0_temporal.safetensors").values()
    )
    m = load_model(root / "tiny_sora_cascade")
    assert m.final_size == (16, 64, 64) and m.stages[0].denoiser.out.weight.dtype == torch.float32
    with pytest.raises(FileNotFoundError, match="reward_backbone"):  # the fake line is still checked
        demo_models(root)
