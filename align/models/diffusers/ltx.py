"""LTX-Video (``LTXPipeline``): flow matching on packed tokens ``(B, T*H*W, C)``.

What differs from the base: the denoiser packs latents into tokens and passes the text
attention mask (carried as one extra feature channel of the conditioning, ``pack_mask``) and
the RoPE interpolation scale ``(temporal_ratio / frame_rate, spatial_ratio, spatial_ratio)``;
latents are normalised per channel (``latents_mean`` / ``latents_std``) and by the scaling
factor; the timestep shift is dynamic, ``exp(mu)`` with ``mu`` linear in the latent token count
of the current video size; the VAE names its compression ``vae_*_compression_ratio`` and,
when ``timestep_conditioning`` is on, decodes at timestep 0.

Two-stage generation (the ``cascade`` option: a ``LTXLatentUpsamplerModel`` directory, or a
``LTXLatentUpsamplePipeline`` one with its ``latent_upsampler/`` folder), as LTX-Video 0.9.7+
ships it: stage 1 samples at half the height and width; the latent upsampler doubles the
latents' height and width (``LTXLatentUpsamplePipeline``, latents in and out); stage 2 noises
the upsampled latents to ``cascade_strength`` and denoises them in ``cascade_steps`` Euler steps
of the flow ODE (classifier-free guidance ``cascade_guidance``) at the full size; the VAE decodes
that. Sizes (``height``, ``width`` options, ``--height``, ``--width``) are the *final* video's;
the model's latents, ``encode_video`` and ``video_input`` are stage 1's, which is what training
sees and what LoRA adapts. Stage 2 runs with the LoRA adapters disabled: the later stages stay
frozen, as in the embedded cascade (``align.models.cascade``). Both samplers share stage 2:
the pipeline sampler draws stage 1 with ``LTXPipeline`` (``output_type="latent"``), vidalign's
with its own ODE / SDE. Departures from diffusers' recipe (stage 2 with
``LTXConditionPipeline(denoise_strength=0.4, num_inference_steps=10)``, same transformer,
adapters on): stage 2 is vidalign's Euler ODE on the shifted grid from ``cascade_strength`` to 0
(no ``decode_timestep`` / ``image_cond_noise_scale``), its noise drawn from a generator per seed
(``seed * 1000003 + 7919``), and the refinement does not use the LoRA.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from align.models.diffusers.base import DiffusersVideoModel, pack_mask, split_mask
from align.models.lora import adapters_disabled


def ltx_dynamic_shift(pipe: Any, seq_len: int) -> float:
    """exp(mu) with mu linear in the latent token count, as LTXPipeline computes it."""
    cfg = pipe.scheduler.config
    base_len, max_len = cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096)
    base_shift, max_shift = cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15)
    m = (max_shift - base_shift) / (max_len - base_len)
    return math.exp(seq_len * m + base_shift - m * base_len)


class LTXDenoiser(nn.Module):
    """LTXVideoTransformer3DModel: packs latents into tokens, passes the text mask and RoPE scale."""

    lora_key_prefix = ""

    def __init__(self, transformer: nn.Module, temporal_ratio: int, spatial_ratio: int, frame_rate: float = 25.0):
        super().__init__()
        self.transformer = transformer
        self.rope_interpolation_scale = (temporal_ratio / frame_rate, spatial_ratio, spatial_ratio)

    def forward(self, latents_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        from diffusers import LTXPipeline

        dtype = self.transformer.dtype
        p, p_t = self.transformer.config.patch_size, self.transformer.config.patch_size_t
        _, _, T, H, W = latents_t.shape
        states, mask = split_mask(cond)
        out = self.transformer(
            hidden_states=LTXPipeline._pack_latents(latents_t.to(dtype), p, p_t),
            encoder_hidden_states=states.to(dtype),
            timestep=t,
            encoder_attention_mask=mask,
            num_frames=T // p_t,
            height=H // p,
            width=W // p,
            rope_interpolation_scale=self.rope_interpolation_scale,
            return_dict=False,
        )[0]
        return LTXPipeline._unpack_latents(out, T // p_t, H // p, W // p, p, p_t).to(latents_t.dtype)


def load_latent_upsampler(path: str, device: torch.device) -> nn.Module:
    """The ``LTXLatentUpsamplerModel`` at ``path`` (its own directory, or a latent-upsample
    pipeline's ``latent_upsampler/`` folder), float32 on ``device``, frozen; errors name the path."""
    from diffusers.pipelines.ltx.modeling_latent_upsampler import LTXLatentUpsamplerModel

    root = Path(path)
    sub = "latent_upsampler" if (root / "latent_upsampler" / "config.json").is_file() else None
    if sub is None and not (root / "config.json").is_file():
        raise FileNotFoundError(
            f"ltx cascade: {path} is not a latent upsampler (no config.json, nor latent_upsampler/config.json); "
            "give the LTXLatentUpsamplerModel folder, e.g. Lightricks/ltxv-spatial-upscaler-0.9.7 downloaded"
        )
    up = LTXLatentUpsamplerModel.from_pretrained(str(root), subfolder=sub, torch_dtype=torch.float32)
    if up.config.temporal_upsample or not up.config.spatial_upsample:
        raise ValueError(f"ltx cascade: {path} is not a spatial-only latent upsampler (config {dict(up.config)})")
    return up.to(device).requires_grad_(False).eval()


class LTXVideoModel(DiffusersVideoModel):
    """LTX-Video behind the ``VideoDiffusionModel`` protocol (see the module docstring)."""

    family: ClassVar[str] = "ltx"
    pipeline_class: ClassVar[str] = "LTXPipeline"
    default_fps: ClassVar[float] = 24.0
    default_size: ClassVar[tuple[int, int, int]] = (161, 512, 704)
    default_max_sequence_length: ClassVar[int] = 128

    def __init__(
        self,
        pipe: Any,
        *,
        cascade: str | None = None,
        cascade_strength: float = 0.4,
        cascade_steps: int = 10,
        cascade_guidance: float = 3.0,
        **options: Any,
    ):
        """``cascade``: the latent upsampler's path for two-stage generation (module docstring),
        with stage 2's ``cascade_strength``, ``cascade_steps`` and ``cascade_guidance``; None: one stage."""
        if not 0.0 < cascade_strength <= 1.0 or cascade_steps < 1:
            raise ValueError(
                f"ltx cascade: cascade_strength must be in (0, 1] and cascade_steps >= 1, "
                f"got {cascade_strength} and {cascade_steps}"
            )
        self.scale = 1 if cascade is None else 2  # LTXLatentUpsamplerModel doubles height and width
        self.upsampler = None if cascade is None else load_latent_upsampler(cascade, pipe.vae.device)
        self.strength, self.steps, self.guidance = float(cascade_strength), int(cascade_steps), float(cascade_guidance)
        super().__init__(pipe, **options)

    def make_denoiser(self) -> nn.Module:
        tc, sc = self.compression()
        return LTXDenoiser(self.pipe.transformer, tc, sc, self.frame_rate)

    def compression(self) -> tuple[int, int]:
        return self.pipe.vae_temporal_compression_ratio, self.pipe.vae_spatial_compression_ratio

    def flow_shift(self) -> float:
        _, lt, lh, lw = self.latent_shape
        pt, ph, pw = self.patch()
        return ltx_dynamic_shift(self.pipe, (lt // pt) * (lh // ph) * (lw // pw))

    def latent_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        vae = self.pipe.vae
        return (
            vae.latents_mean.to(like.device).float(),
            vae.latents_std.to(like.device).float(),
            vae.config.scaling_factor,
        )

    def vae_decode(self, z: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        if vae.config.timestep_conditioning:
            return vae.decode(z, torch.zeros(1, device=z.device, dtype=z.dtype)).sample
        return vae.decode(z).sample

    def encode_with_pipeline(self, prompts: list[str]) -> torch.Tensor:
        """``[T5 states | attention mask]`` ``(B, L, D + 1)``."""
        emb, mask, _, _ = self.pipe.encode_prompt(
            prompts, do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length, device=self.device
        )
        return pack_mask(emb, mask)

    # -- sizes: given as the final video's, kept as stage 1's ------------------------------
    @property
    def video_size_rules(self) -> str:
        if self.upsampler is None:
            return super().video_size_rules
        return (
            f"the final video's size; stage 1 samples at half its height and width, where "
            f"{super().video_size_rules} (so final height and width multiples of {2 * self.compression()[1]})"
        )

    def check_video_size(
        self, num_frames: int | None = None, height: int | None = None, width: int | None = None
    ) -> tuple[int, int, int]:
        """The final size ``(num_frames, height, width)`` if stage 1 can take half its height and width
        (one stage: the size itself, the base's check)."""
        s = self.scale
        if self.upsampler is None:
            return super().check_video_size(num_frames, height, width)
        H, W = height or self.height * s, width or self.width * s
        if H % s or W % s:
            raise ValueError(
                f"ltx cascade: final size {H}x{W} must have even height and width (stage 1 samples at half)"
            )
        try:
            f, h, w = super().check_video_size(num_frames, H // s, W // s)
        except ValueError as e:
            raise ValueError(f"ltx cascade (final {H}x{W}, stage 1 at {H // s}x{W // s}): {e}") from None
        return f, h * s, w * s

    def set_video_size(
        self, num_frames: int | None = None, height: int | None = None, width: int | None = None
    ) -> None:
        """Set the final size (checked); the model keeps stage 1's (with a cascade half the height and width)."""
        f, h, w = self.check_video_size(num_frames, height, width)
        self.num_frames, self.height, self.width = f, h // self.scale, w // self.scale
        self.scheduler = self.make_schedule()

    # -- stage 2 ---------------------------------------------------------------------------
    def upsample_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Stage-1 latents (vidalign's normalisation) -> the upsampled ones, twice the height and
        width, what ``LTXLatentUpsamplePipeline(latents=..., output_type="latent")`` returns."""
        mean, std, scale = self.latent_stats(latents)
        shape = (1, -1, 1, 1, 1)
        raw = latents.float() * std.view(shape) / scale + mean.view(shape)
        up = self.upsampler(raw.to(self.upsampler.dtype)).float()
        return (up - mean.view(shape)) * scale / std.view(shape)

    def refine(self, latents: torch.Tensor, prompts: list[str], seeds: list[int]) -> torch.Tensor:
        """Stage 2 on upsampled latents: noised to ``cascade_strength`` (noise per seed), then
        ``cascade_steps`` Euler steps to 0 on the flow grid shifted for the full size, guided;
        the LoRA adapters (stage 1's) are disabled."""
        from align.models.cascade import stage_generator

        shape = tuple(latents.shape[1:])
        noise = torch.stack([torch.randn(shape, generator=stage_generator(s, 0)) for s in seeds]).to(latents.device)
        T = self.scheduler.num_train_timesteps
        pt, ph, pw = self.patch()
        k = ltx_dynamic_shift(self.pipe, (shape[1] // pt) * (shape[2] // ph) * (shape[3] // pw))
        grid = torch.linspace(self.strength, 0.0, self.steps + 1)
        grid = k * grid / (1 + (k - 1) * grid)
        x = (1 - grid[0]) * latents.float() + grid[0] * noise
        cond = self.encode_prompts(list(prompts))
        uncond = self.encode_prompts([""] * len(prompts)) if self.guidance != 1.0 else None
        with torch.no_grad(), adapters_disabled(self.denoiser):
            for i in range(self.steps):
                t = torch.full((x.shape[0],), grid[i].item() * T, device=x.device)
                v = self.denoiser(x, t, cond).float()
                if uncond is not None:
                    u = self.denoiser(x, t, uncond).float()
                    v = u + self.guidance * (v - u)
                x = x + (grid[i + 1] - grid[i]).item() * v
        return x

    @torch.no_grad()
    def decode_videos(self, latents: torch.Tensor, prompts: list[str], seeds: list[int]) -> torch.Tensor:
        """The final videos of stage-1 latents: upsampled, refined (stage 2), decoded (one stage:
        ``decode_latents``)."""
        if self.upsampler is None:
            return self.decode_latents(latents)
        if len(prompts) != latents.shape[0] or len(seeds) != latents.shape[0]:
            raise ValueError(f"ltx cascade: {latents.shape[0]} latents, {len(prompts)} prompts, {len(seeds)} seeds")
        return self.decode_latents(self.refine(self.upsample_latents(latents), prompts, seeds))

    @torch.no_grad()
    def generate_videos(
        self,
        prompts: list[str],
        seeds: list[int],
        num_steps: int = 50,
        guidance_scale: float = 5.0,
        batch_size: int = 1,
        **pipe_kwargs: Any,
    ) -> torch.Tensor:
        """Stage 1 with ``LTXPipeline`` (``output_type="latent"``, one generator per seed), then
        stage 2 as ``decode_videos``: videos ``(B, 3, T, 2H, 2W)`` in [-1, 1] on the CPU (one stage:
        the base's ``generate_videos``)."""
        from diffusers import LTXPipeline

        if self.upsampler is None:
            return super().generate_videos(prompts, seeds, num_steps, guidance_scale, batch_size, **pipe_kwargs)
        if len(prompts) != len(seeds) or not prompts:
            raise ValueError(f"generate_videos: {len(prompts)} prompts and {len(seeds)} seeds (need the same, > 0)")
        f, h, w = self.num_frames, self.height, self.width
        _, lt, lh, lw = self.latent_shape
        pt, ph, _ = self.patch()
        videos = []
        for i in range(0, len(prompts), batch_size):
            ps, ss = list(prompts[i : i + batch_size]), list(seeds[i : i + batch_size])
            packed = self.pipe(
                prompt=ps, num_frames=f, height=h, width=w, num_inference_steps=num_steps,
                guidance_scale=guidance_scale, generator=[torch.Generator().manual_seed(int(s)) for s in ss],
                output_type="latent", **self.sampler_kwargs(), **pipe_kwargs,
            ).frames  # fmt: skip
            lat = LTXPipeline._unpack_latents(packed, lt // pt, lh // ph, lw // ph, ph, pt)
            videos.append(self.decode_videos(lat.float(), ps, ss).cpu())
        return torch.cat(videos)

    # -- the latent upsampler is one of the model's modules -----------------------------------
    def components(self) -> dict[str, nn.Module]:
        """The pipeline's modules, plus ``latent_upsampler`` with a cascade."""
        comps = super().components()
        return comps if self.upsampler is None else {**comps, "latent_upsampler": self.upsampler}

    def to(self, device: str | torch.device) -> LTXVideoModel:
        super().to(device)
        if self.upsampler is not None:
            self.upsampler.to(device)
        return self
