"""Diffusers video adapters on tiny models of the real diffusers classes (no download).

For each family: build a tiny pipeline from configs, save it like a Hub repository, load it
through ``align.models.load_model``, run DPO steps with LoRA through the trainer's
``dpo_step_losses``, save the LoRA, load it with the family's diffusers pipeline
``load_lora_weights`` and check that the pipeline's output changed, that the pipeline's
transformer now computes what vidalign's LoRA denoiser computes, and that with adapters
disabled the denoiser gives the base output exactly.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import PROMPT
from safetensors import safe_open

from align.models import load_model
from align.models.diffusers import (
    DEFAULT_LORA_TARGETS,
    DiffusersVideoModel,
    TimestepRangeSchedule,
    WanDenoiser,
    model_class,
    resample_video,
    save_prompt_embeds,
)
from align.models.lora import adapters_disabled, attach_lora, load_lora, lora_parameters, save_lora
from align.training import build_config, load_train_config
from align.training.dpo import dpo_step_losses

WORDS = "a red green blue yellow square circle triangle moving left right up down on black white background".split()
# (num_frames, height, width) of the tiny models; the dataset videos are (8, 32, 32) and get resampled.
SIZE = {
    "wan": dict(num_frames=9, height=16, width=16, max_sequence_length=16),
    "cogvideox": dict(num_frames=9, height=16, width=16),
    "ltx": dict(num_frames=9, height=32, width=32, max_sequence_length=16),
    "animatediff": dict(num_frames=4, height=16, width=16),
    "hunyuan": dict(num_frames=5, height=16, width=16, max_sequence_length=16),
}
PIPELINES = {
    "wan": "WanPipeline",
    "cogvideox": "CogVideoXPipeline",
    "ltx": "LTXPipeline",
    "animatediff": "AnimateDiffPipeline",
    "hunyuan": "HunyuanVideoPipeline",
}


# ---------------------------------------------------------------------------------------
# Tiny pipelines (same diffusers / transformers classes as the real checkpoints)
# ---------------------------------------------------------------------------------------


def _tokenizer(max_length: int, bos: bool = False):
    """A word-level fast tokenizer built in memory (pad=0, eos=1, unk=2, bos=3)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, "<s>": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    single = "<s> $A </s>" if bos else "$A </s>"
    tk.post_processor = processors.TemplateProcessing(single=single, special_tokens=[("</s>", 1), ("<s>", 3)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", bos_token="<s>",
        model_max_length=max_length,
    )  # fmt: skip


def _t5(d_model: int = 32):
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(
        vocab_size=64, d_model=d_model, d_kv=8, d_ff=37, num_layers=1, num_heads=4, relative_attention_num_buckets=8
    )
    return T5EncoderModel(cfg)


def _clip(hidden: int = 32, eos: int = 1):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=3, eos_token_id=eos, pad_token_id=0, hidden_size=hidden, intermediate_size=37,
            num_attention_heads=4, num_hidden_layers=1, vocab_size=64, max_position_embeddings=77,
        )
    )  # fmt: skip


def build_unet2d():
    """The tiny image UNet under AnimateDiff's motion modules."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, norm_num_groups=2,
    )  # fmt: skip


def build_pipeline(family: str, **extra):
    """A randomly initialised tiny pipeline of ``family`` (fixed seed)."""
    import diffusers as d

    torch.manual_seed(0)
    if family == "wan":
        from transformers import UMT5Config, UMT5EncoderModel

        te = UMT5EncoderModel(UMT5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=37, num_layers=1, num_heads=4))
        vae = d.AutoencoderKLWan(
            base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
        )

        def transformer():
            return d.WanTransformer3DModel(
                patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
                text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
            )  # fmt: skip

        two = extra.pop("two_experts", False)
        return d.WanPipeline(
            tokenizer=_tokenizer(16),
            text_encoder=te,
            vae=vae,
            transformer=transformer(),
            transformer_2=transformer() if two else None,
            boundary_ratio=0.5 if two else None,
            scheduler=d.FlowMatchEulerDiscreteScheduler(shift=3.0),
        )
    if family == "cogvideox":
        return d.CogVideoXPipeline(
            tokenizer=_tokenizer(16),
            text_encoder=_t5(),
            vae=d.AutoencoderKLCogVideoX(
                in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
                up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), latent_channels=4,
                layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4,
            ),
            transformer=d.CogVideoXTransformer3DModel(**{
                "num_attention_heads": 4, "attention_head_dim": 8, "in_channels": 4, "out_channels": 4,
                "time_embed_dim": 2, "text_embed_dim": 32, "num_layers": 1, "sample_width": 2, "sample_height": 2,
                "sample_frames": 9, "patch_size": 2, "temporal_compression_ratio": 4, "max_text_seq_length": 16,
                **extra,
            }),
            scheduler=d.CogVideoXDDIMScheduler(prediction_type="v_prediction"),
        )  # fmt: skip
    if family == "ltx":
        return d.LTXPipeline(
            tokenizer=_tokenizer(16),
            text_encoder=_t5(),
            vae=d.AutoencoderKLLTXVideo(
                in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(8, 8, 8, 8),
                decoder_block_out_channels=(8, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1),
                decoder_layers_per_block=(1, 1, 1, 1, 1), spatio_temporal_scaling=(True, True, False, False),
                decoder_spatio_temporal_scaling=(True, True, False, False),
                decoder_inject_noise=(False,) * 5, upsample_residual=(False,) * 4,
                upsample_factor=(1, 1, 1, 1), timestep_conditioning=False, patch_size=1, patch_size_t=1,
                encoder_causal=True, decoder_causal=False,
            ),
            transformer=d.LTXVideoTransformer3DModel(
                in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=4,
                attention_head_dim=8, cross_attention_dim=32, num_layers=1, caption_channels=32,
            ),
            scheduler=d.FlowMatchEulerDiscreteScheduler(),
        )  # fmt: skip
    if family == "animatediff":
        unet = build_unet2d()
        adapter = d.MotionAdapter(
            block_out_channels=(8, 16), motion_layers_per_block=1, motion_norm_num_groups=2,
            motion_num_attention_heads=2, use_motion_mid_block=False,
        )  # fmt: skip
        vae = d.AutoencoderKL(
            block_out_channels=[8, 16], in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=2,
            down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
        )  # fmt: skip
        sched = d.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="linear", clip_sample=False)
        return d.AnimateDiffPipeline(
            vae=vae, text_encoder=_clip(), tokenizer=_tokenizer(77, bos=True), unet=unet, motion_adapter=adapter,
            scheduler=sched,
        )  # fmt: skip
    if family == "hunyuan":
        from transformers import LlamaConfig, LlamaModel

        llama = LlamaModel(
            LlamaConfig(
                vocab_size=64, hidden_size=16, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                num_key_value_heads=4, bos_token_id=3, eos_token_id=1, pad_token_id=0,
            )
        )  # fmt: skip
        return d.HunyuanVideoPipeline(
            text_encoder=llama,
            tokenizer=_tokenizer(256, bos=True),
            transformer=d.HunyuanVideoTransformer3DModel(
                in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=1,
                num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True,
                text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 4, 4),
            ),
            vae=d.AutoencoderKLHunyuanVideo(
                in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8),
                layers_per_block=1, norm_num_groups=4, spatial_compression_ratio=8, temporal_compression_ratio=4,
                mid_block_add_attention=True, down_block_types=("HunyuanVideoDownBlock3D",) * 4,
                up_block_types=("HunyuanVideoUpBlock3D",) * 4,
            ),
            scheduler=d.FlowMatchEulerDiscreteScheduler(shift=7.0),
            text_encoder_2=_clip(hidden=8),
            tokenizer_2=_tokenizer(77, bos=True),
        )  # fmt: skip
    raise AssertionError(family)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from intra-op threads and lose much to them on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    """``family -> directory`` of a saved tiny pipeline (built once per module, on demand)."""
    cache: dict[str, object] = {}

    def get(family: str):
        if family not in cache:
            path = tmp_path_factory.mktemp(family) / "pipe"
            build_pipeline(family).save_pretrained(path)
            cache[family] = path
        return cache[family]

    return get


def _videos(n: int, seed: int) -> torch.Tensor:
    """Dataset-like videos ``(n, 3, 8, 32, 32)`` in [-1, 1]: different size from the models'."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 8, 32, 32, generator=g) * 2 - 1


def _denoiser_inputs(model, n: int = 2):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(n, *model.latent_shape, generator=g)
    t = model.scheduler.sample_timesteps(n, generator=g)
    return x, t, model.encode_prompts([PROMPT] * n)


def _frozen_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Non-LoRA parameters by name (peft renames ``x.weight`` to ``x.base_layer.weight``)."""
    return {n.replace(".base_layer", ""): p.detach().clone() for n, p in module.named_parameters() if "lora_" not in n}


# ---------------------------------------------------------------------------------------
# DPO with LoRA, then the diffusers pipeline loads the LoRA
# ---------------------------------------------------------------------------------------


def _dpo_and_pipeline_round_trip(family: str, pipe_dir, tmp_path):
    import diffusers

    model = load_model(pipe_dir, **SIZE[family])
    assert isinstance(model, DiffusersVideoModel) and model.family == family
    assert not any(p.requires_grad for m in model.components().values() for p in m.parameters())

    lat_w, lat_l = model.encode_video(_videos(1, 1)), model.encode_video(_videos(1, 2))
    assert lat_w.shape == (1, *model.latent_shape)
    x, t, cond = _denoiser_inputs(model)
    base_out = model.denoiser(x, t, cond)
    assert base_out.shape == x.shape
    base_weights = _frozen_state(model.denoiser)

    attach_lora(model.denoiser, rank=4, alpha=8.0, target_modules=DEFAULT_LORA_TARGETS[family])
    opt = torch.optim.AdamW(lora_parameters(model.denoiser), lr=2e-2)
    gen = torch.Generator().manual_seed(0)
    batch = (lat_w, lat_l, model.encode_prompts([PROMPT]))
    losses = []
    for _ in range(3):
        out = dpo_step_losses(
            model, model.denoiser, model.denoiser, batch, beta=5000.0, loss_type="sigmoid", generator=gen
        )
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert abs(losses[0] - 0.6931) < 1e-3  # B = 0 at init: policy == reference
    assert all(torch.isfinite(torch.tensor(losses)))
    # only LoRA moved; the reference (adapters off) is the base model exactly
    after = _frozen_state(model.denoiser)
    assert all(torch.equal(base_weights[k], after[k]) for k in base_weights)
    with torch.no_grad():
        lora_out = model.denoiser(x, t, cond)
        with adapters_disabled(model.denoiser):
            assert torch.equal(model.denoiser(x, t, cond), base_out)
    assert not torch.allclose(lora_out, base_out)

    lora_dir = save_lora(model.denoiser, tmp_path / "lora")
    weights = safe_open(str(lora_dir / "pytorch_lora_weights.safetensors"), "pt")
    component = "unet" if family == "animatediff" else "transformer"
    assert weights.keys() and all(k.startswith(component + ".") for k in weights.keys())
    meta = json.loads(weights.metadata()["lora_adapter_metadata"])
    assert meta[f"{component}.r"] == 4 and meta[f"{component}.lora_alpha"] == 8.0

    # a fresh diffusers pipeline loads the LoRA with its own loader
    pipe = getattr(diffusers, PIPELINES[family]).from_pretrained(pipe_dir)
    fresh = model_class(family)(pipe, **SIZE[family])
    seeds, steps = [0], 2
    before_video = fresh.generate_videos([PROMPT], seeds, steps, guidance_scale=3.0)
    with torch.no_grad():
        assert torch.allclose(fresh.denoiser(x, t, cond), base_out, atol=1e-6)
    pipe.load_lora_weights(str(lora_dir))
    with torch.no_grad():
        # the pipeline's transformer computes vidalign's LoRA output (keys, rank and alpha scale all right)
        assert torch.allclose(fresh.denoiser(x, t, cond), lora_out, atol=1e-5, rtol=1e-4)
    after_video = fresh.generate_videos([PROMPT], seeds, steps, guidance_scale=3.0)
    assert after_video.shape == (1, 3, *[SIZE[family][k] for k in ("num_frames", "height", "width")])
    assert (after_video - before_video).abs().max() > 1e-4  # the pipeline's output changed
    # and vidalign's own model (LoRA attached by vidalign) samples the same video through the pipeline
    assert torch.allclose(model.generate_videos([PROMPT], seeds, steps, guidance_scale=3.0), after_video, atol=1e-4)
    return model, lora_dir


@pytest.mark.parametrize("family", ["wan", "cogvideox", "ltx", "animatediff", "hunyuan"])
def test_dpo_lora_loads_in_diffusers_pipeline(family, pipeline_dir, tmp_path):
    _dpo_and_pipeline_round_trip(family, pipeline_dir(family), tmp_path)


def test_trainer_end_to_end_on_a_diffusers_model(pipeline_dir, pref_dataset_dir, tmp_path, monkeypatch):
    """``align.training.train`` on a diffusers pipeline directory; the run's LoRA loads in WanPipeline.

    The tiny model needs a tiny video size, which reaches ``load_model`` here by patching it
    (a recipe passes it as ``model_options``)."""
    import diffusers

    import align.training

    def tiny_load_model(path, device="cpu", **options):
        return load_model(path, device=device, **{**SIZE["wan"], **options})

    monkeypatch.setattr(align.training.core, "load_model", tiny_load_model)
    cfg = build_config(
        model=str(pipeline_dir("wan")), dataset=pref_dataset_dir, output_dir=str(tmp_path), name="wan", max_steps=3,
        train_batch_size=4, learning_rate=2e-2, lora_rank=4, lora_alpha=4.0, lora_targets=DEFAULT_LORA_TARGETS["wan"],
        checkpointing_steps=0, progress=False, beta=5000.0,
    )  # fmt: skip
    run = align.training.train(cfg)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3] and abs(lines[0]["loss"] - 0.6931) < 1e-3
    pipe = diffusers.WanPipeline.from_pretrained(pipeline_dir("wan"))
    fresh = model_class("wan")(pipe, **SIZE["wan"])
    before = fresh.generate_videos([PROMPT], [0], 2)
    pipe.load_lora_weights(str(run / "lora"))
    assert (fresh.generate_videos([PROMPT], [0], 2) - before).abs().max() > 1e-4


def test_generate_cli_runs_the_pipeline_with_and_without_lora(pipeline_dir, tmp_path):
    from align.cli import main
    from align.data.video import read_video

    model = load_model(pipeline_dir("wan"), **SIZE["wan"])
    attach_lora(model.denoiser, rank=4, alpha=4.0, target_modules=["to_q", "to_v"])
    for p in lora_parameters(model.denoiser):
        torch.nn.init.normal_(p, std=0.3)
    lora_dir = save_lora(model.denoiser, tmp_path / "lora")
    size = ["--num-frames", "9", "--height", "16", "--width", "16", "--format", "gif"]
    base = ["generate", "--model", str(pipeline_dir("wan")), "--prompt", PROMPT, "--steps", "2", *size]
    assert main([*base, "--out", str(tmp_path / "base")]) == 0
    assert main([*base, "--lora", str(lora_dir), "--out", str(tmp_path / "lora_out")]) == 0
    a = read_video(tmp_path / "base" / "0000_seed0.gif")
    b = read_video(tmp_path / "lora_out" / "0000_seed0.gif")
    assert a.shape == b.shape == (9, 16, 16, 3)  # the model's size, no upscaling
    assert (a.astype(int) - b.astype(int)).__abs__().max() > 0


def test_vidalign_load_lora_round_trip(pipeline_dir, tmp_path):
    """vidalign's own ``load_lora`` (used by ``vidalign eval / generate``) reads the unprefixed keys."""
    model = load_model(pipeline_dir("ltx"), **SIZE["ltx"])
    attach_lora(model.denoiser, rank=2, alpha=4.0, target_modules=["to_q", "to_v"])
    for p in lora_parameters(model.denoiser):
        torch.nn.init.normal_(p, std=0.2)
    x, t, cond = _denoiser_inputs(model)
    with torch.no_grad():
        out = model.denoiser(x, t, cond)
    lora_dir = save_lora(model.denoiser, tmp_path / "lora")
    again = load_lora(load_model(pipeline_dir("ltx"), **SIZE["ltx"]).denoiser, lora_dir)
    with torch.no_grad():
        assert torch.equal(again(x, t, cond), out)


# ---------------------------------------------------------------------------------------
# Family conventions
# ---------------------------------------------------------------------------------------


def test_schedules_follow_each_family(pipeline_dir):
    wan = load_model(pipeline_dir("wan"), **SIZE["wan"])
    assert wan.prediction_type == "flow" and wan.scheduler.flow_shift == 3.0
    cog = load_model(pipeline_dir("cogvideox"), **SIZE["cogvideox"])
    assert cog.prediction_type == "v"
    assert torch.allclose(cog.scheduler.alphas_cumprod, cog.pipe.scheduler.alphas_cumprod.float())
    ad = load_model(pipeline_dir("animatediff"), **SIZE["animatediff"])
    assert ad.prediction_type == "epsilon"
    assert torch.allclose(ad.scheduler.alphas_cumprod, ad.pipe.scheduler.alphas_cumprod.float())
    ltx = load_model(pipeline_dir("ltx"), **SIZE["ltx"])
    # LTX: dynamic shift exp(mu) for 3*8*8 = 192 latent tokens, as LTXPipeline computes mu
    m = (1.15 - 0.5) / (4096 - 256)
    assert ltx.prediction_type == "flow"
    assert ltx.scheduler.flow_shift == pytest.approx(torch.tensor(192 * m + 0.5 - m * 256).exp().item())
    # LTX cond packs the text mask as one extra channel; padding tokens are masked
    cond = ltx.encode_prompts([PROMPT])
    assert cond.shape == (1, 16, 33) and cond[0, :, -1].sum() == len(PROMPT.split()) + 1


def test_wan_flow_velocity_target_matches_diffusers_scheduler(pipeline_dir):
    """x_t and the velocity target agree with FlowMatchEulerDiscreteScheduler's convention."""
    wan = load_model(pipeline_dir("wan"), **SIZE["wan"])
    x0, noise = torch.randn(2, 4, 3), torch.randn(2, 4, 3)
    t = torch.tensor([250.0, 900.0])
    sigma = (t / 1000).view(-1, 1, 1)
    assert torch.allclose(wan.scheduler.add_noise(x0, noise, t), sigma * noise + (1 - sigma) * x0)
    assert torch.equal(wan.scheduler.target(x0, noise, t), noise - x0)


def test_encode_decode_and_resampling(pipeline_dir):
    wan = load_model(pipeline_dir("wan"), **SIZE["wan"])
    v = _videos(1, 3)
    r = resample_video(v, 9, 16, 16)
    assert r.shape == (1, 3, 9, 16, 16)
    assert torch.equal(resample_video(v, 8, 32, 32), v)  # same size: untouched
    lat = wan.encode_video(v)
    assert lat.shape == (1, 16, 3, 2, 2)
    # Wan's latents are normalised per channel: z = (mu - mean) / std
    raw = wan.pipe.vae.encode(r).latent_dist.mode()
    mean = torch.tensor(wan.pipe.vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(wan.pipe.vae.config.latents_std).view(1, -1, 1, 1, 1)
    assert torch.allclose(lat, (raw - mean) / std, atol=1e-5)
    video = wan.decode_latents(lat)
    assert video.shape == (1, 3, 9, 16, 16) and video.abs().max() <= 1


def test_precomputed_prompt_embeds_replace_the_text_encoder(pipeline_dir, tmp_path):
    wan = load_model(pipeline_dir("wan"), **SIZE["wan"])
    f = save_prompt_embeds(wan, [PROMPT, "a blue circle moving up"], tmp_path / "prompts.safetensors")
    light = DiffusersVideoModel.from_pretrained(
        pipeline_dir("wan"), load_text_encoder=False, prompt_embeds=f, **SIZE["wan"]
    )
    assert light.pipe.text_encoder is None
    assert torch.equal(light.encode_prompts([PROMPT, ""]), wan.encode_prompts([PROMPT, ""]))
    with pytest.raises(ValueError, match="'a green square' is not in the prompt-embedding table"):
        light.encode_prompts(["a green square"])


def test_wan22_two_experts_train_one_expert(tmp_path):
    """Wan 2.2 A14B layout: the low-noise expert is trained on t < boundary only, and its LoRA
    loads into ``transformer_2`` with ``load_into_transformer_2=True``."""
    import diffusers

    pipe_dir = tmp_path / "wan22"
    build_pipeline("wan", two_experts=True).save_pretrained(pipe_dir)
    model = load_model(pipe_dir, wan_expert="low_noise", **SIZE["wan"])
    assert model.denoiser.transformer is model.pipe.transformer_2
    assert isinstance(model.scheduler, TimestepRangeSchedule)
    t = model.scheduler.sample_timesteps(2000, generator=torch.Generator().manual_seed(0))
    assert t.max() < 500 and t.min() >= 0 and t.std() > 50
    attach_lora(model.denoiser, rank=2, alpha=2.0, target_modules=["to_q", "to_v"])
    for p in lora_parameters(model.denoiser):
        torch.nn.init.normal_(p, std=0.2)
    x, _, cond = _denoiser_inputs(model)
    t = torch.tensor([100.0, 900.0])  # one sample per expert
    with torch.no_grad():
        mixed = model.predict(x, t, cond)
        with adapters_disabled(model.denoiser):
            base = model.predict(x, t, cond)
    assert not torch.allclose(mixed[0], base[0]) and torch.equal(mixed[1], base[1])  # high-noise expert untouched
    lora_dir = save_lora(model.denoiser, tmp_path / "lora")
    assert json.loads((lora_dir / "adapter_config.json").read_text())["wan_expert"] == "low_noise"
    with pytest.raises(ValueError, match="wan_expert='low_noise', this denoiser has wan_expert='high_noise'"):
        load_lora(load_model(pipe_dir, **SIZE["wan"]).denoiser, lora_dir)  # default: the high-noise expert
    pipe = diffusers.WanPipeline.from_pretrained(pipe_dir)
    pipe.load_lora_weights(str(lora_dir), load_into_transformer_2=True)
    fresh = model_class("wan")(pipe, wan_expert="low_noise", **SIZE["wan"])
    with torch.no_grad():
        assert torch.allclose(fresh.predict(x, t, cond), mixed, atol=1e-5)


def test_animatediff_from_an_image_model_and_a_motion_adapter(tmp_path):
    """The usual Hub layout: a Stable Diffusion repo plus a MotionAdapter repo."""
    import diffusers

    ad = build_pipeline("animatediff")
    sd = diffusers.StableDiffusionPipeline(
        vae=ad.vae, text_encoder=ad.text_encoder, tokenizer=ad.tokenizer, scheduler=diffusers.PNDMScheduler(),
        unet=build_unet2d(), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    sd.save_pretrained(tmp_path / "sd")
    ad.motion_adapter.save_pretrained(tmp_path / "motion")
    with pytest.raises(ValueError, match="StableDiffusionPipeline; AnimateDiff also needs motion_adapter"):
        load_model(tmp_path / "sd", **SIZE["animatediff"])
    model = load_model(tmp_path / "sd", motion_adapter=str(tmp_path / "motion"), **SIZE["animatediff"])
    assert model.family == "animatediff" and type(model.pipe.unet).__name__ == "UNetMotionModel"
    # the linear-beta DDIM schedule AnimateDiff's motion modules were trained with
    assert model.pipe.scheduler.config.beta_schedule == "linear"
    assert torch.allclose(model.scheduler.alphas_cumprod, model.pipe.scheduler.alphas_cumprod.float())
    x, t, cond = _denoiser_inputs(model)
    assert model.denoiser(x, t, cond).shape == x.shape


@pytest.mark.parametrize("sampling", ["uniform", "logit_normal"])
def test_expert_timesteps_are_the_truncated_model_distribution(sampling):
    """Inverse-CDF sampling on [500, 1000) = the shifted distribution conditioned on that range."""
    from align.schedules import NoiseSchedule

    g = torch.Generator().manual_seed(0)
    t = TimestepRangeSchedule("flow", 1000, sampling, 3.0, t_min=500.0, t_max=1000.0).sample_timesteps(50000, g)
    full = NoiseSchedule("flow", 1000, sampling, 3.0).sample_timesteps(100000, g)
    q = torch.tensor([0.1, 0.5, 0.9])
    assert t.min() >= 500 and t.max() < 1000
    assert torch.allclose(t.quantile(q), full[full >= 500].quantile(q), atol=6.0)


@pytest.mark.parametrize("extra", [{}, {"patch_size_t": 2}], ids=["cogvideox-5b", "cogvideox-1.5"])
def test_cogvideox_rotary_embeddings_match_the_pipeline(extra):
    """CogVideoX 5B / 1.5 use 3D RoPE; the denoiser builds the same embeddings as the pipeline."""
    pipe = build_pipeline("cogvideox", use_rotary_positional_embeddings=True, attention_head_dim=16, **extra)
    model = model_class("cogvideox")(pipe, num_frames=5, height=16, width=16)
    _, T, H, W = model.latent_shape
    ours = model.denoiser._rotary(T, H, W, "cpu")
    theirs = pipe._prepare_rotary_positional_embeddings(16, 16, T, "cpu")
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
    x, t, cond = _denoiser_inputs(model)
    assert model.denoiser(x, t, cond).shape == x.shape


def test_wan22_ti2v_per_token_timesteps(tmp_path):
    """Wan 2.2 TI2V (``expand_timesteps``): one timestep per latent token, the same prediction
    as a per-sample timestep when all tokens share it."""
    pipe = build_pipeline("wan")
    pipe.register_to_config(expand_timesteps=True)
    model = model_class("wan")(pipe, **SIZE["wan"])
    assert model.denoiser.expand_timesteps
    x, t, cond = _denoiser_inputs(model)
    with torch.no_grad():
        per_token = model.denoiser(x, t, cond)
        per_sample = WanDenoiser(pipe.transformer, expand_timesteps=False)(x, t, cond)
    assert torch.allclose(per_token, per_sample, atol=1e-5)


def test_bf16_weights_train_float32_lora_and_checkpointing_keeps_gradients(pipeline_dir):
    """dtype=bfloat16: frozen transformer in bf16, VAE in fp32, LoRA upcast to fp32, float32
    predictions; gradient checkpointing gives the same LoRA gradients."""
    grads = {}
    for ckpt in (False, True):
        model = load_model(pipeline_dir("wan"), dtype="bfloat16", gradient_checkpointing=ckpt, **SIZE["wan"])
        assert model.denoiser.transformer.dtype == torch.bfloat16 and model.pipe.vae.dtype == torch.float32
        assert model.denoiser.transformer.is_gradient_checkpointing == ckpt
        attach_lora(model.denoiser, rank=2, alpha=2.0, target_modules=["to_q", "to_v"])
        params = lora_parameters(model.denoiser)
        assert all(p.dtype == torch.float32 for p in params)
        for p in params:
            torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(0))
        x, t, cond = _denoiser_inputs(model)
        out = model.denoiser(x, t, cond)
        assert out.dtype == torch.float32
        out.square().mean().backward()
        grads[ckpt] = torch.cat([p.grad.flatten() for p in params])
    assert grads[False].abs().sum() > 0 and torch.allclose(grads[False], grads[True])


# ---------------------------------------------------------------------------------------
# Errors that name what is wrong
# ---------------------------------------------------------------------------------------


def test_unsupported_family_is_named(tmp_path):
    d = tmp_path / "mochi"
    d.mkdir()
    (d / "model_index.json").write_text(json.dumps({"_class_name": "MochiPipeline"}))
    with pytest.raises(ValueError, match="MochiPipeline is not a supported video model family"):
        load_model(d)


def test_bad_paths_and_hub_ids_are_named(tmp_path, monkeypatch):
    import huggingface_hub.constants

    with pytest.raises(FileNotFoundError, match="no such directory"):
        load_model(tmp_path / "missing" / "model")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match="no-such-owner/no-such-video-model"):
        load_model("no-such-owner/no-such-video-model")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="not a supported model directory"):
        load_model(empty)


def test_lora_target_matching_nothing_is_named(pipeline_dir):
    wan = load_model(pipeline_dir("wan"), **SIZE["wan"])
    with pytest.raises(ValueError, match="'attn.qkv' matches no module of WanDenoiser"):
        attach_lora(wan.denoiser, target_modules=["attn.qkv"])


def test_invalid_size_is_named(pipeline_dir):
    with pytest.raises(ValueError, match="num_frames - 1 must be divisible by 4"):
        load_model(pipeline_dir("wan"), num_frames=8, height=16, width=16)


# ---------------------------------------------------------------------------------------
# Recipes
# ---------------------------------------------------------------------------------------

RECIPES = {
    "wan2_1_t2v_1_3b_dpo.yaml": ("wan", 4, 16),  # family, frames = k * this + 1, height/width multiple
    "cogvideox_2b_dpo.yaml": ("cogvideox", 4, 16),
    "ltx_video_dpo.yaml": ("ltx", 8, 32),
}


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipes_are_valid_for_their_family(recipe, pipeline_dir):
    import inspect
    from pathlib import Path

    import yaml

    from align.models.diffusers import looks_like_hub_id

    family, frame_step, multiple = RECIPES[recipe]
    values = yaml.safe_load((Path(__file__).parents[1] / "recipes" / recipe).read_text())
    options = values.pop("model_options")
    cfg = load_train_config(None, values)  # every other key is a field of its objective's config, of the right type
    assert looks_like_hub_id(cfg.model) and cfg.mixed_precision == "bf16"
    accepted = set(inspect.signature(DiffusersVideoModel.__init__).parameters)
    accepted |= set(inspect.signature(DiffusersVideoModel.from_pretrained).parameters)
    assert set(options) <= accepted
    assert (options["num_frames"] - 1) % frame_step == 0
    assert options["height"] % multiple == 0 and options["width"] % multiple == 0
    # the LoRA targets exist in the same diffusers class
    model = load_model(pipeline_dir(family), **SIZE[family])
    attach_lora(model.denoiser, rank=2, alpha=2.0, target_modules=cfg.lora_targets)


def test_wan_grpo_recipe_runs_with_another_group_layout(pipeline_dir, tmp_path):
    """`vidalign train recipes/wan2_1_t2v_1_3b_grpo.yaml --group_size 2 --prompts_per_round 2`
    runs without touching gradient_accumulation_steps: the recipe sets
    rollout_batches_per_update 2, so accumulation is derived (2 x 6 trained steps). The shipped
    recipe's keys are kept but the model (a tiny Wan pipeline), its size and the run's length."""
    from pathlib import Path

    from align.cli import main
    from reward_models.model import RewardModelConfig, VideoRewardModel

    torch.manual_seed(0)
    VideoRewardModel(RewardModelConfig(pooling="mean")).save_pretrained(tmp_path / "rm")
    (tmp_path / "prompts.txt").write_text(f"{PROMPT}\na blue circle moving left\n")
    recipe = Path(__file__).parents[1] / "recipes" / "wan2_1_t2v_1_3b_grpo.yaml"
    size = json.dumps(dict(SIZE["wan"], dtype="float32"))
    rc = main(
        ["train", str(recipe), "--group_size", "2", "--prompts_per_round", "2"]
        + [
            "--model",
            str(pipeline_dir("wan")),
            "--model_options",
            size,
            "--prompts_file",
            str(tmp_path / "prompts.txt"),
        ]
        + ["--judges", f"[reward:{tmp_path / 'rm'}]", "--output_dir", str(tmp_path / "runs"), "--max_steps", "2"]
        + ["--sample_steps", "5", "--mixed_precision", "no", "--checkpointing_steps", "0", "--progress", "false"]
    )
    assert rc == 0
    summary = json.loads((tmp_path / "runs" / "wan2_1_t2v_1_3b_grpo" / "summary.json").read_text())
    # 5 steps x 0.6 = 3 trained steps; 2 micro-batches of 1 rollout per update; 4 rollouts a round
    assert summary["gradient_accumulation_steps"] == 6 and summary["steps_per_round"] == 2
    assert (tmp_path / "runs" / "wan2_1_t2v_1_3b_grpo" / "lora").is_dir()
