"""The shared base of the diffusers adapters: ``DiffusersVideoModel``.

The base does everything that is the same for every family (the prompt-embedding table,
resampling and encoding videos one at a time, the video-size check, sampling with the
pipeline, freezing and moving the pipeline's modules). What a family does differently is a
class attribute or a small method that its subclass (``wan.py``, ``cogvideox.py``, ``ltx.py``,
``hunyuan.py``, ``animatediff.py``) sets or overrides; the base never asks which family it is.

Flow-matching DPO
-----------------
For flow families (Wan, LTX, Hunyuan) the diffusion process is the rectified flow
``x_s = (1 - s) x0 + s eps`` with ``s = t / 1000``, and the model predicts the velocity
``v = eps - x0``. Following Diffusion-DPO (Wallace et al. 2023) with the velocity error in
place of the noise error, for a pair (w preferred, l rejected) sharing ``eps`` and ``s``::

    err(theta, x) = mean over elements of || v_theta(x_s, s, c) - (eps - x0) ||^2
    loss = -log sigmoid( -beta/2 * [ (err(theta, w) - err(theta, l)) - (err(ref, w) - err(ref, l)) ] )

with ``ref`` the same denoiser with its LoRA disabled (``align.objectives.diffusion_dpo_loss``).
The timestep is drawn from the model's own training distribution: ``s`` uniform (or
logit-normal, ``timestep_sampling="logit_normal"``), then shifted as the model's sampler
shifts it, ``s' = k s / (1 + (k - 1) s)``, with ``k`` the scheduler's ``shift`` / ``flow_shift``
(Wan: 3 at 480p, 5 at 720p; Hunyuan 7), or for LTX ``k = exp(mu)`` with ``mu`` the dynamic
shift of the training resolution's token count. Departures from the epsilon formula and its
β scale: at the same ``x_s`` the noise and clean-sample estimates implied by a velocity are
``eps = x_s + (1 - s) v`` and ``x0 = x_s - s v``, so the velocity error is the noise error
divided by ``(1 - s)^2`` and the clean-sample error divided by ``s^2``. Compared with the
noise error it therefore weighs high-noise timesteps (``s`` near 1) more, and there, where the
noise error is small, it is of the order of the x0 error; it is never smaller than the noise
error, so velocity-error differences, hence DPO logits at a given β, run larger than with
noise errors. Errors are means over elements, so β does not depend on resolution or frame
count. vidalign's recipes start at β = 500 for flow models and 2000-5000 for epsilon / v
models (the Diffusion-DPO range on Stable Diffusion); these are starting points to sweep,
none of them was tuned here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from align.atomic import atomic_write
from align.models.diffusers.loading import FAMILIES, family_of, pipeline_load_errors, read_pipeline_class, resolve_dtype
from align.schedules import NoiseSchedule

# vidalign family -> its adapter class. Each family's subclass adds itself when it is defined
# (``DiffusersVideoModel.__init_subclass__``), so loading needs no import of the family modules
# (they import this one); ``align.models.diffusers`` imports them all.
MODEL_CLASSES: dict[str, type[DiffusersVideoModel]] = {}

# ---------------------------------------------------------------------------------------
# Helpers shared by several families
# ---------------------------------------------------------------------------------------


def ddpm_schedule(pipe: Any, family: str) -> NoiseSchedule:
    """A NoiseSchedule for epsilon / v families carrying the pipeline scheduler's alphas_cumprod."""
    cfg = pipe.scheduler.config
    pred = {"epsilon": "epsilon", "v_prediction": "v"}.get(cfg.get("prediction_type", "epsilon"))
    if pred is None:
        raise ValueError(f"{family}: scheduler prediction_type {cfg.get('prediction_type')!r} is not epsilon or v")
    sched = NoiseSchedule(pred, int(cfg.get("num_train_timesteps", 1000)))
    acp = getattr(pipe.scheduler, "alphas_cumprod", None)
    if acp is None or len(acp) != sched.num_train_timesteps:
        raise ValueError(f"{family}: scheduler {type(pipe.scheduler).__name__} has no alphas_cumprod table")
    sched.alphas_cumprod = torch.as_tensor(acp, dtype=torch.float32).clone()
    return sched


def static_flow_shift(pipe: Any) -> float:
    """The static shift of a flow-matching scheduler (FlowMatchEuler ``shift``, UniPC ``flow_shift``)."""
    cfg = pipe.scheduler.config
    if "shift" in cfg:  # FlowMatchEulerDiscreteScheduler
        return float(cfg["shift"])
    return float(cfg.get("flow_shift") or 1.0)  # UniPC / DPM-Solver with use_flow_sigmas (Wan's hub scheduler)


def pack_mask(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Text states ``(B, L, D)`` and their attention mask ``(B, L)`` -> one tensor ``(B, L, D + 1)``."""
    return torch.cat([states, mask[..., None].to(states.dtype)], dim=-1)


def split_mask(cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[states | mask]`` along the last dim -> states, boolean mask (the inverse of ``pack_mask``)."""
    return cond[..., :-1], cond[..., -1] > 0.5


def resample_video(videos: torch.Tensor, num_frames: int, height: int, width: int) -> torch.Tensor:
    """``(B, C, T, H, W)`` -> ``(B, C, num_frames, height, width)``: frames by nearest index over
    the clip, space by an aspect-preserving bilinear resize (antialiased) and a centre crop."""
    B, C, T, H, W = videos.shape
    if T != num_frames:
        videos = videos[:, :, torch.linspace(0, T - 1, num_frames).round().long().to(videos.device)]
    if (H, W) != (height, width):
        scale = max(height / H, width / W)
        h2, w2 = max(height, round(H * scale)), max(width, round(W * scale))
        x = videos.transpose(1, 2).reshape(B * num_frames, C, H, W).float()
        x = F.interpolate(x, size=(h2, w2), mode="bilinear", antialias=True, align_corners=False)
        top, left = (h2 - height) // 2, (w2 - width) // 2
        x = x[:, :, top : top + height, left : left + width].to(videos.dtype)
        videos = x.reshape(B, num_frames, C, height, width).transpose(1, 2)
    return videos


# ---------------------------------------------------------------------------------------
# The base adapter
# ---------------------------------------------------------------------------------------


class DiffusersVideoModel:
    """A diffusers text-to-video pipeline behind the ``VideoDiffusionModel`` protocol.

    Build it with ``from_pretrained`` (a Hub id or a local pipeline directory) or from a
    pipeline with the family's class: ``WanVideoModel(pipe)``, or ``model_class("wan")(pipe)``.
    ``pipe`` is the diffusers pipeline; ``denoiser`` wraps
    ``pipe.transformer`` (``pipe.unet``), so a LoRA attached to the denoiser is used by ``pipe``
    too.

    Options: ``num_frames``, ``height``, ``width`` (default: the family's), ``max_sequence_length``,
    ``timestep_sampling`` (``"uniform"`` | ``"logit_normal"``, flow families), ``prompt_embeds``
    (a ``save_prompt_embeds`` file), ``gradient_checkpointing``. A recipe's ``model_options``
    is one flat dict, so the constructor also takes the options of single families, read by
    that family and ignored by the others: ``frame_rate`` (LTX's RoPE temporal scale),
    ``embedded_guidance`` (Hunyuan's distilled guidance, held fixed in training), ``wan_expert``
    (``"high_noise"`` | ``"low_noise"``: which expert of a two-expert Wan 2.2 is aligned).
    """

    # -- what a family's subclass sets -------------------------------------------------
    family: ClassVar[str] = ""  # the vidalign family name
    pipeline_class: ClassVar[str] = ""  # the diffusers pipeline class that load_pipeline loads
    component: ClassVar[str] = "transformer"  # the pipeline module the denoiser wraps; LoRA keys start with it
    text_components: ClassVar[tuple[str, ...]] = ("text_encoder", "tokenizer")  # left out by load_text_encoder=False
    default_size: ClassVar[tuple[int, int, int]] = (0, 0, 0)  # (num_frames, height, width) the pipeline defaults to
    default_max_sequence_length: ClassVar[int] = 0  # text length the pipeline defaults to
    default_lora_targets: ClassVar[tuple[str, ...]] = ("to_q", "to_k", "to_v", "to_out.0")  # attention projections
    default_fps: ClassVar[float] = 16.0  # the frame rate the family's checkpoints were trained at
    # -- optional abilities of the VideoDiffusionModel protocol (every diffusers family has both) --
    supports_gradient_checkpointing: ClassVar[bool] = True
    has_pipeline_sampler: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """A family's subclass registers itself in ``MODEL_CLASSES`` under its ``family``."""
        super().__init_subclass__(**kwargs)
        if cls.family:
            MODEL_CLASSES[cls.family] = cls

    def __init__(
        self,
        pipe: Any,
        *,
        num_frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
        max_sequence_length: int | None = None,
        timestep_sampling: str = "uniform",
        frame_rate: float = 25.0,
        embedded_guidance: float = 6.0,
        wan_expert: str = "high_noise",
        prompt_embeds: str | Path | None = None,
        gradient_checkpointing: bool = False,
        fps: float | None = None,
    ):
        self.pipe = pipe
        self.fps = float(fps or self.default_fps)
        self.frame_rate, self.embedded_guidance, self.wan_expert = frame_rate, embedded_guidance, wan_expert
        default = self.default_video_size()
        self.num_frames, self.height, self.width = num_frames or default[0], height or default[1], width or default[2]
        self.max_sequence_length = self.resolve_max_sequence_length(max_sequence_length)
        self._prompt_table: tuple[dict[str, int], torch.Tensor] | None = None
        if prompt_embeds is not None:
            index, table, fam = load_prompt_embeds(prompt_embeds)
            if fam and fam != self.family:
                raise ValueError(f"prompt embeddings {prompt_embeds} were written for {fam}, not {self.family}")
            self._prompt_table = (index, table)
        self.denoiser = self.make_denoiser()
        self.timestep_sampling = timestep_sampling
        self.set_video_size(self.num_frames, self.height, self.width)
        if gradient_checkpointing:
            self.enable_gradient_checkpointing()

    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id: str | Path,
        *,
        dtype: str | torch.dtype = "auto",
        device: str | torch.device = "cpu",
        family: str | None = None,
        motion_adapter: str | None = None,
        load_text_encoder: bool = True,
        revision: str | None = None,
        variant: str | None = None,
        **options: Any,
    ) -> DiffusersVideoModel:
        """:func:`load_diffusers_model`; on a family's class the family defaults to that class's."""
        return load_diffusers_model(
            path_or_hub_id, device, dtype=dtype, family=family or cls.family or None, motion_adapter=motion_adapter,
            load_text_encoder=load_text_encoder, revision=revision, variant=variant, **options,
        )  # fmt: skip

    # -- family hooks (defaults; a family's subclass overrides what differs) ------------
    @classmethod
    def load_pipeline(cls, source: str, pipe_class: str, kw: dict[str, Any], motion_adapter: str | None = None) -> Any:
        """The diffusers pipeline at ``source`` (``kw``: torch_dtype, revision, variant, components
        left out); ``pipe_class`` is the class named in its model_index.json."""
        import diffusers

        with pipeline_load_errors(source, cls.family):
            return getattr(diffusers, cls.pipeline_class).from_pretrained(source, **kw)

    def make_denoiser(self) -> nn.Module:
        """The ``(latents_t, t, cond) -> prediction`` module around the pipeline's transformer / UNet."""
        raise NotImplementedError(f"{type(self).__name__} must define make_denoiser")

    def default_video_size(self) -> tuple[int, int, int]:
        """``(num_frames, height, width)`` when the options leave them out."""
        return self.default_size

    def resolve_max_sequence_length(self, value: int | None) -> int:
        """The text length ``encode_prompts`` pads / truncates to; ``value`` is the option."""
        return value or self.default_max_sequence_length

    def compression(self) -> tuple[int, int]:
        """(temporal, spatial) compression of the VAE."""
        return self.pipe.vae_scale_factor_temporal, self.pipe.vae_scale_factor_spatial

    def patch(self) -> tuple[int, int, int]:
        """(temporal, height, width) patch size of the denoiser's tokens."""
        cfg = getattr(self.pipe, self.component).config
        return cfg.patch_size_t or 1, cfg.patch_size, cfg.patch_size

    @property
    def latent_channels(self) -> int:
        return self.pipe.vae.config.latent_channels

    def flow_shift(self) -> float:
        """The timestep shift ``k`` of a flow family at the current video size."""
        return static_flow_shift(self.pipe)

    def make_schedule(self) -> NoiseSchedule:
        """The training noise schedule (default: the flow schedule with ``flow_shift()``)."""
        T = int(self.pipe.scheduler.config.get("num_train_timesteps", 1000))
        return NoiseSchedule("flow", T, flow_timestep_sampling=self.timestep_sampling, flow_shift=self.flow_shift())

    def latent_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Per-channel (mean, std) and scaling factor such that ``z_norm = (z - mean) * scale / std``
        (default: mean 0, std 1, the VAE's ``scaling_factor``)."""
        C = like.shape[1]
        zero, one = torch.zeros(C, device=like.device), torch.ones(C, device=like.device)
        return zero, one, self.pipe.vae.config.scaling_factor

    def vae_encode(self, video: torch.Tensor, sample: bool) -> torch.Tensor:
        """One video ``(1, 3, T, H, W)`` -> raw latents: the posterior mean, or a sample."""
        dist = self.pipe.vae.encode(video).latent_dist
        return dist.sample() if sample else dist.mode()

    def vae_decode(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latents of one video ``(1, C, t, h, w)`` -> pixels ``(1, 3, T, H, W)``."""
        return self.pipe.vae.decode(z).sample

    def encode_with_pipeline(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> conditioning with the pipeline's own ``encode_prompt`` (the text encoder is loaded)."""
        emb, _ = self.pipe.encode_prompt(
            prompts, do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length, device=self.device
        )
        return emb

    def sampler_kwargs(self) -> dict[str, Any]:
        """Family-specific arguments of the pipeline call in ``generate_videos``."""
        return {"max_sequence_length": self.max_sequence_length}

    # -- video size ----------------------------------------------------------------------
    @property
    def video_input(self) -> dict:
        """What training resamples every video to: ``num_frames``, ``height``, ``width`` (the
        model's video size) and ``fps`` (the family's frame rate, or the ``fps`` option)."""
        return {"num_frames": self.num_frames, "height": self.height, "width": self.width, "fps": self.fps}

    @property
    def video_size_rules(self) -> str:
        """The sizes the model accepts, in words (e.g. ``num_frames = 4k+1; height and width multiples of 16``)."""
        tc, sc = self.compression()
        pt, ph, pw = self.patch()
        rules = [f"num_frames = {tc}k+1" if tc > 1 else "any num_frames"]
        if pt > 1:
            rules.append(f"latent frames ((num_frames - 1) / {tc} + 1) a multiple of {pt}")
        if ph == pw:
            rules.append(f"height and width multiples of {sc * ph}")
        else:
            rules.append(f"height a multiple of {sc * ph}, width a multiple of {sc * pw}")
        return "; ".join(rules)

    def check_video_size(
        self, num_frames: int | None = None, height: int | None = None, width: int | None = None
    ) -> tuple[int, int, int]:
        """The size ``(num_frames, height, width)`` (``None``: the current value) if the model
        accepts it, else a ValueError that names the family, the size and every rule it breaks."""
        F_, H, W = num_frames or self.num_frames, height or self.height, width or self.width
        if min(F_, H, W) < 1:
            raise ValueError(f"{self.family}: video size {F_}x{H}x{W} must be positive (frames x height x width)")
        tc, sc = self.compression()
        pt, ph, pw = self.patch()
        problems = []
        if tc > 1 and (F_ - 1) % tc:
            lower = tc * ((F_ - 1) // tc) + 1
            problems.append(
                f"num_frames must be {tc}k+1 (num_frames - 1 must be divisible by {tc}), got {F_} "
                f"(e.g. {lower} or {lower + tc})"
            )
        if H % (sc * ph) or W % (sc * pw):
            multiple = f"{sc * ph}" if ph == pw else f"{sc * ph} and {sc * pw}"
            problems.append(f"height and width must be divisible by {multiple}, got {H}x{W}")
        lat_t = (F_ - 1) // tc + 1 if tc > 1 else F_
        if lat_t % pt:
            lower, upper = [(n * pt - 1) * tc + 1 for n in (lat_t // pt, lat_t // pt + 1)]
            hint = f"e.g. num_frames {lower} or {upper}" if lat_t >= pt else f"e.g. num_frames {upper}"
            problems.append(f"latent frames ({lat_t}) must be divisible by the temporal patch {pt} ({hint})")
        if problems:
            raise ValueError(
                f"{self.family}: size {F_}x{H}x{W} (frames x height x width) is invalid: " + "; ".join(problems)
            )
        return F_, H, W

    def set_video_size(
        self, num_frames: int | None = None, height: int | None = None, width: int | None = None
    ) -> None:
        """Change the video size used by ``encode_video``, ``latent_shape``, ``generate_videos``
        (and, for LTX, the timestep shift); ``None`` keeps the current value. Checked first."""
        self.num_frames, self.height, self.width = self.check_video_size(num_frames, height, width)
        self.scheduler = self.make_schedule()

    # -- protocol --------------------------------------------------------------------
    @property
    def prediction_type(self) -> str:
        return self.scheduler.prediction_type

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.denoiser.parameters()).dtype

    @property
    def latent_shape(self) -> tuple[int, ...]:
        tc, sc = self.compression()
        frames = (self.num_frames - 1) // tc + 1 if tc > 1 else self.num_frames
        return (self.latent_channels, frames, self.height // sc, self.width // sc)

    def enable_gradient_checkpointing(self) -> None:
        """Recompute the transformer's (UNet's) activations in the backward pass (diffusers' own)."""
        getattr(self.denoiser, self.component).enable_gradient_checkpointing()

    @torch.no_grad()
    def encode_video(self, videos: torch.Tensor, sample: bool = False) -> torch.Tensor:
        """Pixels ``(B, 3, T, H, W)`` in [-1, 1] -> normalised latents ``(B, *latent_shape)``.

        Videos of another size are resampled first (``resample_video``). The posterior mean
        is used unless ``sample``. One video at a time goes through the VAE (memory).
        """
        if videos.dim() != 5 or videos.shape[1] != 3:
            raise ValueError(f"{self.family}.encode_video expects (B, 3, T, H, W), got {tuple(videos.shape)}")
        videos = resample_video(videos, self.num_frames, self.height, self.width)
        vae = self.pipe.vae
        out = [self._normalize(self.vae_encode(v[None].to(self.device, vae.dtype), sample).float()) for v in videos]
        return torch.cat(out)

    def _normalize(self, z: torch.Tensor) -> torch.Tensor:
        mean, std, scale = self.latent_stats(z)
        shape = (1, -1, 1, 1, 1)
        return (z - mean.view(shape)) * scale / std.view(shape)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> pixels ``(B, 3, T, H, W)`` in [-1, 1]."""
        mean, std, scale = self.latent_stats(latents)
        shape = (1, -1, 1, 1, 1)
        z = (latents.float() * std.view(shape) / scale + mean.view(shape)).to(self.pipe.vae.dtype)
        return torch.cat([self.vae_decode(zi[None]).float() for zi in z]).clamp(-1, 1)

    def decode_videos(self, latents: torch.Tensor, prompts: list[str], seeds: list[int]) -> torch.Tensor:
        """One stage: the final videos are ``decode_latents``'s (LTX with ``cascade:`` overrides it)."""
        return self.decode_latents(latents)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> one conditioning tensor (see the package docstring for LTX / Hunyuan packing).

        With a prompt-embedding table, prompts found in it are looked up; the rest need the
        text encoder, and without one the error names the missing prompt.
        """
        if isinstance(prompts, str):
            raise TypeError("encode_prompts takes a list of prompts, not one string")
        prompts = list(prompts)
        if self._prompt_table is not None:
            index, table = self._prompt_table
            if all(p in index for p in prompts):
                return table[[index[p] for p in prompts]].to(self.device)
            if getattr(self.pipe, "text_encoder", None) is None:
                missing = next(p for p in prompts if p not in index)
                raise ValueError(
                    f"prompt {missing!r} is not in the prompt-embedding table and no text encoder is loaded"
                )
        if getattr(self.pipe, "text_encoder", None) is None:
            raise ValueError(
                f"{self.family}: no text encoder loaded; pass prompt_embeds=FILE or load_text_encoder=True"
            )
        return self.encode_with_pipeline(prompts)

    def predict(self, latents_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """The denoiser's output."""
        return self.denoiser(latents_t, t, cond)

    # -- sampling with the real pipeline -----------------------------------------------
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
        """Videos ``(B, 3, T, H, W)`` in [-1, 1] (on the CPU) from the diffusers pipeline, one
        generator per seed (so the same prompt and seed give the same video with and without a
        LoRA), ``batch_size`` prompts per pipeline call. ``pipe_kwargs`` go to the pipeline (a
        ``num_frames``, ``height`` or ``width`` among them is checked like ``set_video_size``)."""
        if len(prompts) != len(seeds):
            raise ValueError(f"generate_videos: {len(prompts)} prompts but {len(seeds)} seeds")
        if not prompts:
            raise ValueError("generate_videos: empty prompt list")
        num_frames, height, width = self.check_video_size(
            pipe_kwargs.pop("num_frames", None), pipe_kwargs.pop("height", None), pipe_kwargs.pop("width", None)
        )
        videos = []
        for i in range(0, len(prompts), batch_size):
            kw: dict[str, Any] = dict(
                prompt=list(prompts[i : i + batch_size]),
                num_frames=num_frames,
                height=height,
                width=width,
                num_inference_steps=num_steps,
                guidance_scale=guidance_scale,
                generator=[torch.Generator().manual_seed(int(s)) for s in seeds[i : i + batch_size]],
                output_type="pt",
                **self.sampler_kwargs(),
            )
            kw.update(pipe_kwargs)
            frames = torch.as_tensor(self.pipe(**kw).frames)  # (B, T, 3, H, W) in [0, 1]
            videos.append((frames.permute(0, 2, 1, 3, 4).float().cpu() * 2 - 1).clamp(-1, 1))
        return torch.cat(videos)

    # -- utilities -------------------------------------------------------------------
    @property
    def vae(self) -> nn.Module:
        return self.pipe.vae

    @property
    def text_encoder(self) -> nn.Module | None:
        return getattr(self.pipe, "text_encoder", None)

    @property
    def text_encoder_2(self) -> nn.Module | None:
        return getattr(self.pipe, "text_encoder_2", None)

    def components(self) -> dict[str, nn.Module]:
        """The pipeline's torch modules (VAE, text encoders, transformer(s) / UNet)."""
        return {k: v for k, v in self.pipe.components.items() if isinstance(v, nn.Module)}

    def to(self, device: str | torch.device) -> DiffusersVideoModel:
        self.pipe.to(device)
        return self

    def eval(self) -> DiffusersVideoModel:
        for m in self.components().values():
            m.eval()
        return self

    def requires_grad_(self, flag: bool) -> DiffusersVideoModel:
        for m in self.components().values():
            m.requires_grad_(flag)
        return self


# ---------------------------------------------------------------------------------------
# Loading a pipeline into its family's adapter
# ---------------------------------------------------------------------------------------


def model_class(family: str, source: str | None = None) -> type[DiffusersVideoModel]:
    """The adapter class of ``family``; a clear error (naming the model ``source``) for any other name."""
    if family not in MODEL_CLASSES:
        where = f"model {source}: " if source else ""
        raise ValueError(f"{where}unsupported model family {family!r}; supported: {', '.join(FAMILIES)}")
    return MODEL_CLASSES[family]


def load_diffusers_model(
    path_or_hub_id: str | Path,
    device: str | torch.device = "cpu",
    *,
    dtype: str | torch.dtype = "auto",
    family: str | None = None,
    motion_adapter: str | None = None,
    load_text_encoder: bool = True,
    revision: str | None = None,
    variant: str | None = None,
    **options: Any,
) -> DiffusersVideoModel:
    """Load a pipeline by Hub id or local path, freeze it, put it on ``device`` and wrap it in
    its family's adapter (what ``align.models.load_model`` calls).

    ``dtype``: ``"auto"`` (bfloat16 on CUDA, else float32) or a dtype; the VAE stays in
    float32 (it runs once per video, and video VAEs are fragile in half precision).
    ``family`` overrides the one read from ``model_index.json``. ``motion_adapter``: a
    MotionAdapter id or path, required when the model is a Stable Diffusion image
    pipeline (AnimateDiff). ``load_text_encoder=False`` (with ``prompt_embeds=FILE``) skips
    the text encoder(s). Other ``options`` go to the constructor (``num_frames``,
    ``height``, ``width``, ``max_sequence_length``, ``timestep_sampling``, ``frame_rate``,
    ``embedded_guidance``, ``wan_expert``, ``prompt_embeds``, ``gradient_checkpointing``).
    """
    source = str(path_or_hub_id)
    device = torch.device(device)
    torch_dtype = resolve_dtype(dtype, device)
    pipe_class = read_pipeline_class(source)
    cls = model_class(family or family_of(pipe_class, source), source)
    if not load_text_encoder and options.get("prompt_embeds") is None:
        raise ValueError(f"model {source}: load_text_encoder=False needs prompt_embeds=FILE (save_prompt_embeds)")
    kw: dict[str, Any] = {"torch_dtype": torch_dtype, "revision": revision, "variant": variant}
    if not load_text_encoder:
        kw.update(dict.fromkeys(cls.text_components))
    pipe = cls.load_pipeline(source, pipe_class, kw, motion_adapter)
    if pipe.vae.dtype != torch.float32:
        pipe.vae.to(torch.float32)
    pipe.to(device)
    return cls(pipe, **options).requires_grad_(False).eval()


# ---------------------------------------------------------------------------------------
# Prompt-embedding tables: train without loading the text encoder
# ---------------------------------------------------------------------------------------


def save_prompt_embeds(model: DiffusersVideoModel, prompts: list[str], path: str | Path, batch_size: int = 8) -> Path:
    """Encode ``prompts`` (plus ``""``, the unconditional prompt) once and write them to a
    safetensors file, so that training can run without loading the text encoder."""
    prompts = list(dict.fromkeys([*prompts, ""]))
    with torch.no_grad():
        embeds = torch.cat(
            [model.encode_prompts(prompts[i : i + batch_size]).cpu() for i in range(0, len(prompts), batch_size)]
        )
    meta = {"prompts": json.dumps(prompts), "family": model.family}
    return atomic_write(path, lambda tmp: save_file({"cond": embeds.contiguous()}, tmp, metadata=meta))


def load_prompt_embeds(path: str | Path) -> tuple[dict[str, int], torch.Tensor, str]:
    """``(prompt -> row, table, family)`` from a file written by ``save_prompt_embeds``."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt embeddings {path}: no such file (write one with save_prompt_embeds)")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if "prompts" not in meta:
        raise ValueError(f"prompt embeddings {path}: no 'prompts' metadata; not written by save_prompt_embeds")
    prompts = json.loads(meta["prompts"])
    return {p: i for i, p in enumerate(prompts)}, load_file(str(path))["cond"], meta.get("family", "")
