"""Adapters that make pretrained diffusers text-to-video pipelines look like a `VideoDiffusionModel`.

Supported families (the diffusers pipeline class named in ``model_index.json`` picks one):

===============  ==========================  ==========  ==============================================
family           pipeline                    prediction  denoiser input (what the wrapper handles)
===============  ==========================  ==========  ==============================================
``wan``          WanPipeline (Wan 2.1, 2.2)  flow        ``(B, C, T, H, W)``; Wan 2.2 TI2V: per-token t
``cogvideox``    CogVideoXPipeline           v           ``(B, T, C, H, W)``; 3D RoPE for 5B / 1.5
``ltx``          LTXPipeline                 flow        packed tokens ``(B, T*H*W, C)``, RoPE scale
``animatediff``  AnimateDiffPipeline         epsilon     UNetMotionModel (image UNet + motion adapter)
``hunyuan``      HunyuanVideoPipeline        flow        Llama states + mask + pooled CLIP, guidance
===============  ==========================  ==========  ==============================================

Each adapter keeps the diffusers pipeline it was loaded from (``model.pipe``) and exposes:

- ``denoiser``: a thin ``nn.Module`` around the pipeline's own transformer / UNet (the same
  object, not a copy) whose ``forward(latents_t, t, cond)`` takes latents in vidalign's
  ``(B, C, T, H, W)`` layout and timesteps in ``[0, 1000)``, does the family's packing,
  permutation, positional embeddings and timestep convention, and returns the prediction in
  the same layout (in the latents' dtype). The trainer calls it directly, so DDP and
  DeepSpeed can wrap it. The inner module is stored under the attribute name the diffusers
  LoRA loader expects (``transformer`` or ``unet``), so the peft keys of the wrapper already
  read ``transformer.blocks.0.attn1.to_q.lora_A.weight``: ``save_lora`` writes them
  unprefixed (``lora_key_prefix = ""``) and ``pipeline.load_lora_weights(dir)`` reads them.
- ``scheduler``: an ``align.schedules.NoiseSchedule``. For flow families it is the flow
  schedule with the model's own shift; for DDPM families (CogVideoX, AnimateDiff) it carries
  the pipeline scheduler's ``alphas_cumprod`` (CogVideoX's SNR-shifted, zero-terminal-SNR
  schedule; AnimateDiff's linear betas), so noising and targets match what the model was
  trained with.
- ``encode_video``: frozen VAE, posterior mean, the family's latent normalisation (Wan and
  LTX: per-channel mean/std; CogVideoX, AnimateDiff, Hunyuan: ``scaling_factor``). Videos of
  another size are first resampled to ``(num_frames, height, width)``: frames by nearest
  index, space by an aspect-preserving bilinear resize and a centre crop.
- ``encode_prompts``: the pipeline's own ``encode_prompt`` (so the templates, max lengths and
  padding conventions are exactly those of inference), or a table of precomputed prompt
  embeddings (``save_prompt_embeds``; then the text encoder need not be loaded at all). The
  trainer keeps the conditioning in a ``TensorDataset``, so it must be one tensor: families
  whose transformer also takes a text attention mask (LTX, Hunyuan) append the mask as one
  extra feature channel (and Hunyuan its pooled CLIP vector as one extra leading token).
- ``generate_videos``: runs the real diffusers pipeline (its own scheduler and sampler),
  with whatever LoRA is attached to the denoiser.

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
β scale: at the same ``x_s`` the velocity error is the noise error divided by ``(1 - s)^2``
and the clean-sample error divided by ``s^2``, so it weighs low-noise timesteps more than the
noise error does, and at high noise (where the noise error is small) it is of the order of the
x0 error; velocity-error differences, hence DPO logits at a given β, run larger than with
noise errors. Errors are means over elements, so β does not depend on resolution or frame
count. vidalign's recipes start at β = 500 for flow models and 2000-5000 for epsilon / v
models (the Diffusion-DPO range on Stable Diffusion); these are starting points to sweep,
none of them was tuned here.

Wan 2.2 A14B has two experts (``transformer`` for ``t >= boundary``, ``transformer_2`` below).
One expert is aligned at a time (``wan_expert="high_noise" | "low_noise"``), with training
timesteps restricted to its range; the LoRA of the low-noise expert is loaded with
``pipe.load_lora_weights(dir, load_into_transformer_2=True)``.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from align.schedules import NoiseSchedule

# diffusers pipeline class (``_class_name`` in model_index.json) -> vidalign family
PIPELINE_FAMILIES = {
    "WanPipeline": "wan",
    "CogVideoXPipeline": "cogvideox",
    "LTXPipeline": "ltx",
    "AnimateDiffPipeline": "animatediff",
    "StableDiffusionPipeline": "animatediff",  # an image model; needs motion_adapter=<id or path>
    "HunyuanVideoPipeline": "hunyuan",
}
FAMILIES = ("wan", "cogvideox", "ltx", "animatediff", "hunyuan")

# LoRA on the attention projections (self- and cross-attention; AnimateDiff: spatial and motion).
DEFAULT_LORA_TARGETS = {
    "wan": ["to_q", "to_k", "to_v", "to_out.0"],
    "cogvideox": ["to_q", "to_k", "to_v", "to_out.0"],
    "ltx": ["to_q", "to_k", "to_v", "to_out.0"],
    "animatediff": ["to_q", "to_k", "to_v", "to_out.0"],
    "hunyuan": ["to_q", "to_k", "to_v", "to_out.0"],
}

# (num_frames, height, width) the pipelines default to; CogVideoX and AnimateDiff read theirs from the config.
DEFAULT_SIZE = {"wan": (81, 480, 832), "ltx": (161, 512, 704), "hunyuan": (129, 720, 1280)}
# Text length the pipelines default to (CogVideoX: the transformer's max_text_seq_length; AnimateDiff: CLIP's 77).
DEFAULT_MAX_SEQUENCE_LENGTH = {"wan": 512, "ltx": 128, "hunyuan": 256}

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def looks_like_hub_id(name: str) -> bool:
    """``owner/name`` with Hub-legal characters (a local path that does not exist may look like one)."""
    return bool(_HUB_ID.match(name)) and ".." not in name


def _resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """``"auto"``: bfloat16 on a CUDA device that supports it, else float32."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    names.update({"float16": torch.float16, "fp16": torch.float16})
    if dtype not in names:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(names)}, got {dtype!r}")
    return names[dtype]


def read_pipeline_class(path_or_hub_id: str) -> str:
    """The ``_class_name`` of a diffusers pipeline directory or Hub repository (model_index.json)."""
    local = Path(path_or_hub_id)
    if local.is_dir():
        index = local / "model_index.json"
        if not index.is_file():
            raise ValueError(f"model {path_or_hub_id}: {index} not found; not a diffusers pipeline directory")
        try:
            return json.loads(index.read_text())["_class_name"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"model {path_or_hub_id}: {index} has no readable _class_name ({e})") from None
    if not looks_like_hub_id(path_or_hub_id):
        raise FileNotFoundError(
            f"model {path_or_hub_id}: no such directory, and not a Hugging Face Hub id (owner/name)"
        )
    from diffusers import DiffusionPipeline

    try:
        return DiffusionPipeline.load_config(path_or_hub_id)["_class_name"]
    except Exception as e:  # offline, unknown repo, gated repo, not a pipeline: all the same user error
        raise FileNotFoundError(
            f"model {path_or_hub_id}: no such local directory, and its model_index.json could not be fetched "
            f"from the Hugging Face Hub ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from e


def family_of(pipeline_class: str, source: str) -> str:
    """The vidalign family of a diffusers pipeline class; a clear error for any other class."""
    if pipeline_class not in PIPELINE_FAMILIES:
        supported = ", ".join(sorted(PIPELINE_FAMILIES))
        raise ValueError(
            f"model {source}: diffusers pipeline {pipeline_class} is not a supported video model family "
            f"(supported pipelines: {supported})"
        )
    return PIPELINE_FAMILIES[pipeline_class]


# ---------------------------------------------------------------------------------------
# Noise schedules
# ---------------------------------------------------------------------------------------


@dataclass
class TimestepRangeSchedule(NoiseSchedule):
    """A flow schedule whose training timesteps are confined to ``[t_min, t_max)``.

    The distribution is the parent's (uniform or logit-normal, then shifted) truncated to
    the range, sampled exactly by inverting its CDF. Used for one expert of Wan 2.2 A14B.
    """

    t_min: float = 0.0
    t_max: float = 1000.0

    def _unshift(self, s: torch.Tensor) -> torch.Tensor:
        k = self.flow_shift
        return s if k == 1.0 else s / (k - (k - 1) * s)

    def sample_timesteps(self, batch_size: int, generator: torch.Generator | None = None, device="cpu") -> torch.Tensor:
        T = self.num_train_timesteps
        lo = self._unshift(torch.tensor(self.t_min / T, dtype=torch.float64)).clamp(0, 1)
        hi = self._unshift(torch.tensor(self.t_max / T, dtype=torch.float64)).clamp(0, 1)
        u = torch.rand(batch_size, generator=generator, dtype=torch.float64)
        if self.flow_timestep_sampling == "logit_normal":
            normal = torch.distributions.Normal(0.0, 1.0)
            c_lo, c_hi = normal.cdf(torch.logit(lo)), normal.cdf(torch.logit(hi))
            s = torch.sigmoid(torch.special.ndtri(c_lo + u * (c_hi - c_lo)))
        else:
            s = lo + u * (hi - lo)
        t = self.shift_sigma(s) * T
        return t.clamp(self.t_min, min(self.t_max, T - 1e-3)).float().to(device)


def _ddpm_schedule(pipe, family: str) -> NoiseSchedule:
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


def _flow_shift(pipe) -> float:
    """The static shift of a flow-matching scheduler (FlowMatchEuler ``shift``, UniPC ``flow_shift``)."""
    cfg = pipe.scheduler.config
    if "shift" in cfg:  # FlowMatchEulerDiscreteScheduler
        return float(cfg["shift"])
    return float(cfg.get("flow_shift") or 1.0)  # UniPC / DPM-Solver with use_flow_sigmas (Wan's hub scheduler)


def _ltx_dynamic_shift(pipe, seq_len: int) -> float:
    """exp(mu) with mu linear in the latent token count, as LTXPipeline computes it."""
    cfg = pipe.scheduler.config
    base_len, max_len = cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096)
    base_shift, max_shift = cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15)
    m = (max_shift - base_shift) / (max_len - base_len)
    return math.exp(seq_len * m + base_shift - m * base_len)


# ---------------------------------------------------------------------------------------
# Denoiser wrappers: (latents_t (B, C, T, H, W), t (B,), cond) -> prediction (B, C, T, H, W)
# ---------------------------------------------------------------------------------------


class WanDenoiser(nn.Module):
    """WanTransformer3DModel. Wan 2.2 TI2V (``expand_timesteps``) takes one timestep per token."""

    lora_key_prefix = ""  # peft keys already start with "transformer."

    def __init__(self, transformer: nn.Module, expand_timesteps: bool = False):
        super().__init__()
        self.transformer = transformer
        self.expand_timesteps = expand_timesteps

    def forward(self, latents_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        dtype = self.transformer.dtype
        if self.expand_timesteps:
            pt, ph, pw = self.transformer.config.patch_size
            _, _, T, H, W = latents_t.shape
            t = t[:, None].expand(-1, (T // pt) * (H // ph) * (W // pw))
        out = self.transformer(
            hidden_states=latents_t.to(dtype), timestep=t, encoder_hidden_states=cond.to(dtype), return_dict=False
        )[0]
        return out.to(latents_t.dtype)


class CogVideoXDenoiser(nn.Module):
    """CogVideoXTransformer3DModel: frames-first layout, 3D RoPE when the config asks for it."""

    lora_key_prefix = ""

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.transformer = transformer

    def _rotary(self, T: int, H: int, W: int, device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The 3D rotary embeddings CogVideoXPipeline builds, from the latent grid."""
        cfg = self.transformer.config
        if not cfg.use_rotary_positional_embeddings:
            return None
        from diffusers.models.embeddings import get_3d_rotary_pos_embed
        from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

        p, p_t = cfg.patch_size, cfg.patch_size_t
        grid_h, grid_w = H // p, W // p
        base_h, base_w = cfg.sample_height // p, cfg.sample_width // p
        if p_t is None:  # CogVideoX 1.0
            crops = get_resize_crop_region_for_grid((grid_h, grid_w), base_w, base_h)
            return get_3d_rotary_pos_embed(
                embed_dim=cfg.attention_head_dim,
                crops_coords=crops,
                grid_size=(grid_h, grid_w),
                temporal_size=T,
                device=device,
            )
        return get_3d_rotary_pos_embed(  # CogVideoX 1.5
            embed_dim=cfg.attention_head_dim,
            crops_coords=None,
            grid_size=(grid_h, grid_w),
            temporal_size=(T + p_t - 1) // p_t,
            grid_type="slice",
            max_size=(base_h, base_w),
            device=device,
        )

    def forward(self, latents_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        dtype = self.transformer.dtype
        _, _, T, H, W = latents_t.shape
        p_t = self.transformer.config.patch_size_t
        if p_t is not None and T % p_t:
            raise ValueError(f"CogVideoX 1.5 needs latent frames divisible by {p_t}, got {T}")
        out = self.transformer(
            hidden_states=latents_t.permute(0, 2, 1, 3, 4).to(dtype),
            encoder_hidden_states=cond.to(dtype),
            timestep=t,
            image_rotary_emb=self._rotary(T, H, W, latents_t.device),
            return_dict=False,
        )[0]
        return out.permute(0, 2, 1, 3, 4).to(latents_t.dtype)


def _split_mask(cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[states | mask]`` along the last dim -> states, boolean mask (see ``_pack_mask``)."""
    return cond[..., :-1], cond[..., -1] > 0.5


def _pack_mask(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.cat([states, mask[..., None].to(states.dtype)], dim=-1)


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
        states, mask = _split_mask(cond)
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


class AnimateDiffDenoiser(nn.Module):
    """UNetMotionModel (an image UNet with motion modules); LoRA keys start with ``unet.``."""

    lora_key_prefix = ""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, latents_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        dtype = self.unet.dtype
        cond = cond.repeat_interleave(latents_t.shape[2], dim=0)  # one text state per frame, as the pipeline does
        out = self.unet(latents_t.to(dtype), t, encoder_hidden_states=cond.to(dtype)).sample
        return out.to(latents_t.dtype)


def _pack_hunyuan(states: torch.Tensor, mask: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """``(B, 1 + L, D + 1)``: row 0 holds the pooled CLIP vector (zero-padded), rows 1.. are ``[states | mask]``."""
    B, _, D = states.shape
    if pooled.shape[-1] > D + 1:
        raise ValueError(f"Hunyuan: pooled projection dim {pooled.shape[-1]} exceeds text dim {D} + 1")
    head = states.new_zeros(B, 1, D + 1)
    head[:, 0, : pooled.shape[-1]] = pooled.to(states.dtype)
    return torch.cat([head, _pack_mask(states, mask)], dim=1)


class HunyuanDenoiser(nn.Module):
    """HunyuanVideoTransformer3DModel with its embedded (distilled) guidance held fixed."""

    lora_key_prefix = ""

    def __init__(self, transformer: nn.Module, embedded_guidance: float = 6.0):
        super().__init__()
        self.transformer = transformer
        self.embedded_guidance = embedded_guidance

    def forward(self, latents_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        dtype = self.transformer.dtype
        pooled_dim = self.transformer.config.pooled_projection_dim
        pooled = cond[:, 0, :pooled_dim]
        states, mask = _split_mask(cond[:, 1:])
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full((latents_t.shape[0],), self.embedded_guidance * 1000.0, device=t.device, dtype=dtype)
        out = self.transformer(
            hidden_states=latents_t.to(dtype),
            timestep=t,
            encoder_hidden_states=states.to(dtype),
            encoder_attention_mask=mask,
            pooled_projections=pooled.to(dtype),
            guidance=guidance,
            return_dict=False,
        )[0]
        return out.to(latents_t.dtype)


# ---------------------------------------------------------------------------------------
# Video resampling and prompt-embedding tables
# ---------------------------------------------------------------------------------------


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


def save_prompt_embeds(model: DiffusersVideoModel, prompts: list[str], path: str | Path, batch_size: int = 8) -> Path:
    """Encode ``prompts`` (plus ``""``, the unconditional prompt) once and write them to a
    safetensors file, so that training can run without loading the text encoder."""
    prompts = list(dict.fromkeys([*prompts, ""]))
    with torch.no_grad():
        embeds = torch.cat(
            [model.encode_prompts(prompts[i : i + batch_size]).cpu() for i in range(0, len(prompts), batch_size)]
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    meta = {"prompts": json.dumps(prompts), "family": model.family}
    save_file({"cond": embeds.contiguous()}, str(tmp), metadata=meta)
    tmp.replace(path)
    return path


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


# ---------------------------------------------------------------------------------------
# The adapter
# ---------------------------------------------------------------------------------------


class DiffusersVideoModel:
    """A diffusers text-to-video pipeline behind the ``VideoDiffusionModel`` protocol.

    Build it with ``from_pretrained`` (a Hub id or a local pipeline directory). ``pipe`` is
    the diffusers pipeline; ``denoiser`` wraps ``pipe.transformer`` (``pipe.unet``), so a
    LoRA attached to the denoiser is used by ``pipe`` too.
    """

    def __init__(
        self,
        pipe: Any,
        family: str,
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
    ):
        if family not in FAMILIES:
            raise ValueError(f"unsupported model family {family!r}; supported: {', '.join(FAMILIES)}")
        self.pipe, self.family = pipe, family
        self.num_frames, self.height, self.width = self._default_size(num_frames, height, width)
        self.max_sequence_length = self._default_max_sequence_length(max_sequence_length)
        self._prompt_table: tuple[dict[str, int], torch.Tensor] | None = None
        if prompt_embeds is not None:
            index, table, fam = load_prompt_embeds(prompt_embeds)
            if fam and fam != family:
                raise ValueError(f"prompt embeddings {prompt_embeds} were written for {fam}, not {family}")
            self._prompt_table = (index, table)
        self._other_expert: nn.Module | None = None
        self._expert_range: tuple[float, float] | None = None
        self.denoiser = self._make_denoiser(frame_rate, embedded_guidance, wan_expert)
        self._timestep_sampling = timestep_sampling
        self.set_video_size(self.num_frames, self.height, self.width)
        if gradient_checkpointing:
            inner = self.denoiser.unet if family == "animatediff" else self.denoiser.transformer
            inner.enable_gradient_checkpointing()

    # -- construction ------------------------------------------------------------------
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
        """Load a pipeline by Hub id or local path, freeze it and put it on ``device``.

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
        torch_dtype = _resolve_dtype(dtype, device)
        pipe_class = read_pipeline_class(source)
        family = family or family_of(pipe_class, source)
        if family not in FAMILIES:
            raise ValueError(f"model {source}: unsupported model family {family!r}; supported: {', '.join(FAMILIES)}")
        if not load_text_encoder and options.get("prompt_embeds") is None:
            raise ValueError(f"model {source}: load_text_encoder=False needs prompt_embeds=FILE (save_prompt_embeds)")
        if family == "animatediff" and pipe_class != "AnimateDiffPipeline" and motion_adapter is None:
            raise ValueError(
                f"model {source} is a {pipe_class}; AnimateDiff also needs motion_adapter=<MotionAdapter id or path>"
            )
        kw: dict[str, Any] = {"torch_dtype": torch_dtype, "revision": revision, "variant": variant}
        if not load_text_encoder:
            kw.update(text_encoder=None, tokenizer=None)
            if family == "hunyuan":
                kw.update(text_encoder_2=None, tokenizer_2=None)
        try:
            pipe = cls._load_pipeline(family, source, pipe_class, motion_adapter, kw)
        except (OSError, ValueError) as e:
            raise FileNotFoundError(f"model {source}: could not load the {family} pipeline ({e})") from e
        if pipe.vae.dtype != torch.float32:
            pipe.vae.to(torch.float32)
        pipe.to(device)
        model = cls(pipe, family, **options)
        return model.requires_grad_(False).eval()

    @staticmethod
    def _load_pipeline(family: str, source: str, pipe_class: str, motion_adapter: str | None, kw: dict):
        import diffusers

        if family == "animatediff":
            if motion_adapter is not None:
                kw["motion_adapter"] = diffusers.MotionAdapter.from_pretrained(
                    motion_adapter, torch_dtype=kw["torch_dtype"]
                )
            pipe = diffusers.AnimateDiffPipeline.from_pretrained(source, **kw)
            if pipe_class != "AnimateDiffPipeline":  # the scheduler the motion modules were trained with
                pipe.scheduler = diffusers.DDIMScheduler.from_config(
                    pipe.scheduler.config,
                    beta_schedule="linear",
                    clip_sample=False,
                    timestep_spacing="linspace",
                    steps_offset=1,
                )
            return pipe
        cls_name = {
            "wan": "WanPipeline",
            "cogvideox": "CogVideoXPipeline",
            "ltx": "LTXPipeline",
            "hunyuan": "HunyuanVideoPipeline",
        }[family]
        return getattr(diffusers, cls_name).from_pretrained(source, **kw)

    def _default_size(self, num_frames, height, width) -> tuple[int, int, int]:
        if self.family == "cogvideox":
            cfg, s = self.pipe.transformer.config, self.pipe.vae_scale_factor_spatial
            default = (cfg.sample_frames, cfg.sample_height * s, cfg.sample_width * s)
        elif self.family == "animatediff":
            size = self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor
            default = (16, size, size)
        else:
            default = DEFAULT_SIZE[self.family]
        return num_frames or default[0], height or default[1], width or default[2]

    def _default_max_sequence_length(self, value: int | None) -> int:
        if self.family == "cogvideox":
            native = self.pipe.transformer.config.max_text_seq_length
            if value is not None and value != native:
                raise ValueError(f"CogVideoX: max_sequence_length must equal the transformer's {native}, got {value}")
            return native
        if self.family == "animatediff":
            return 77  # CLIP; the pipeline uses tokenizer.model_max_length
        return value or DEFAULT_MAX_SEQUENCE_LENGTH[self.family]

    def _make_denoiser(self, frame_rate: float, embedded_guidance: float, wan_expert: str) -> nn.Module:
        pipe = self.pipe
        if self.family == "wan":
            expand = bool(pipe.config.get("expand_timesteps", False))
            transformer_2 = getattr(pipe, "transformer_2", None)
            boundary = pipe.config.get("boundary_ratio", None)
            if transformer_2 is None or boundary is None:
                return WanDenoiser(pipe.transformer, expand)
            if wan_expert not in ("high_noise", "low_noise"):
                raise ValueError(f"wan_expert must be 'high_noise' or 'low_noise', got {wan_expert!r}")
            T = pipe.scheduler.config.num_train_timesteps
            cut = boundary * T
            if wan_expert == "high_noise":
                trained, other, self._expert_range = pipe.transformer, transformer_2, (cut, float(T))
            else:
                trained, other, self._expert_range = transformer_2, pipe.transformer, (0.0, cut)
            self.wan_expert = wan_expert
            self._other_expert = WanDenoiser(other, expand)
            denoiser = WanDenoiser(trained, expand)
            denoiser.lora_metadata = {"wan_expert": wan_expert}  # in adapter_config.json, checked by load_lora
            return denoiser
        if self.family == "cogvideox":
            return CogVideoXDenoiser(pipe.transformer)
        if self.family == "ltx":
            return LTXDenoiser(
                pipe.transformer, pipe.vae_temporal_compression_ratio, pipe.vae_spatial_compression_ratio, frame_rate
            )
        if self.family == "animatediff":
            return AnimateDiffDenoiser(pipe.unet)
        return HunyuanDenoiser(pipe.transformer, embedded_guidance)

    def _compression(self) -> tuple[int, int]:
        """(temporal, spatial) compression of the VAE."""
        pipe = self.pipe
        if self.family == "wan":
            return pipe.vae_scale_factor_temporal, pipe.vae_scale_factor_spatial
        if self.family == "cogvideox":
            return pipe.vae_scale_factor_temporal, pipe.vae_scale_factor_spatial
        if self.family == "ltx":
            return pipe.vae_temporal_compression_ratio, pipe.vae_spatial_compression_ratio
        if self.family == "animatediff":
            return 1, pipe.vae_scale_factor
        return pipe.vae_scale_factor_temporal, pipe.vae_scale_factor_spatial

    def _patch(self) -> tuple[int, int, int]:
        """(temporal, height, width) patch size of the denoiser's tokens (1 for the UNet)."""
        if self.family == "animatediff":
            return 1, 1, 1
        cfg = self.pipe.transformer.config
        if self.family == "wan":
            return tuple(cfg.patch_size)
        p_t = cfg.patch_size_t or 1
        return p_t, cfg.patch_size, cfg.patch_size

    def _check_size(self) -> None:
        tc, sc = self._compression()
        pt, ph, pw = self._patch()
        F_, H, W = self.num_frames, self.height, self.width
        problems = []
        if tc > 1 and (F_ - 1) % tc:
            problems.append(f"num_frames - 1 must be divisible by {tc} (e.g. {tc * max(1, (F_ - 1) // tc) + 1})")
        if H % (sc * ph) or W % (sc * pw):
            problems.append(f"height and width must be divisible by {sc * ph}")
        lat_t = (F_ - 1) // tc + 1 if tc > 1 else F_
        if lat_t % pt:
            problems.append(f"latent frames ({lat_t}) must be divisible by the temporal patch {pt}")
        if problems:
            raise ValueError(
                f"{self.family}: size {F_}x{H}x{W} (frames x height x width) is invalid: " + "; ".join(problems)
            )

    def set_video_size(self, num_frames: int | None = None, height: int | None = None, width: int | None = None):
        """Change the video size used by ``encode_video``, ``latent_shape``, ``generate_videos``
        (and, for LTX, the timestep shift); ``None`` keeps the current value."""
        self.num_frames, self.height, self.width = (
            num_frames or self.num_frames,
            height or self.height,
            width or self.width,
        )
        self._check_size()
        self.scheduler = self._make_schedule(self._timestep_sampling)

    def _make_schedule(self, timestep_sampling: str) -> NoiseSchedule:
        if self.family in ("cogvideox", "animatediff"):
            return _ddpm_schedule(self.pipe, self.family)
        T = int(self.pipe.scheduler.config.get("num_train_timesteps", 1000))
        if self.family == "ltx":
            _, lt, lh, lw = self.latent_shape
            pt, ph, pw = self._patch()
            shift = _ltx_dynamic_shift(self.pipe, (lt // pt) * (lh // ph) * (lw // pw))
        else:
            shift = _flow_shift(self.pipe)
        if self._expert_range is not None:
            lo, hi = self._expert_range
            return TimestepRangeSchedule("flow", T, timestep_sampling, shift, t_min=lo, t_max=hi)
        return NoiseSchedule("flow", T, flow_timestep_sampling=timestep_sampling, flow_shift=shift)

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
        tc, sc = self._compression()
        frames = (self.num_frames - 1) // tc + 1 if tc > 1 else self.num_frames
        cfg = self.pipe.vae.config
        channels = cfg.z_dim if self.family == "wan" else cfg.latent_channels
        return (channels, frames, self.height // sc, self.width // sc)

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
        out = []
        for v in videos:
            x = v[None].to(self.device, vae.dtype)
            if self.family == "animatediff":  # an image VAE, frame by frame
                x = x[0].transpose(0, 1)  # (T, 3, H, W)
            dist = vae.encode(x).latent_dist
            z = dist.sample() if sample else dist.mode()
            if self.family == "animatediff":
                z = z.transpose(0, 1)[None]
            out.append(self._normalize(z.float()))
        return torch.cat(out)

    def _latent_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Per-channel (mean, std) and scaling factor such that ``z_norm = (z - mean) * scale / std``."""
        vae = self.pipe.vae
        C = like.shape[1]
        zero, one = torch.zeros(C, device=like.device), torch.ones(C, device=like.device)
        if self.family == "wan":
            mean = torch.tensor(vae.config.latents_mean, device=like.device)
            std = torch.tensor(vae.config.latents_std, device=like.device)
            return mean, std, 1.0
        if self.family == "ltx":
            return (
                vae.latents_mean.to(like.device).float(),
                vae.latents_std.to(like.device).float(),
                vae.config.scaling_factor,
            )
        return zero, one, vae.config.scaling_factor

    def _normalize(self, z: torch.Tensor) -> torch.Tensor:
        mean, std, scale = self._latent_stats(z)
        shape = (1, -1, 1, 1, 1)
        return (z - mean.view(shape)) * scale / std.view(shape)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> pixels ``(B, 3, T, H, W)`` in [-1, 1]."""
        vae = self.pipe.vae
        mean, std, scale = self._latent_stats(latents)
        shape = (1, -1, 1, 1, 1)
        z = (latents.float() * std.view(shape) / scale + mean.view(shape)).to(vae.dtype)
        out = []
        for zi in z:
            zi = zi[None]
            if self.family == "animatediff":
                frames = vae.decode(zi[0].transpose(0, 1)).sample  # (T, 3, H, W)
                out.append(frames.transpose(0, 1)[None].float())
                continue
            if self.family == "ltx" and vae.config.timestep_conditioning:
                video = vae.decode(zi, torch.zeros(1, device=zi.device, dtype=zi.dtype)).sample
            else:
                video = vae.decode(zi).sample
            out.append(video.float())
        return torch.cat(out).clamp(-1, 1)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> one conditioning tensor (see the module docstring for LTX / Hunyuan packing).

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
        return self._encode_with_pipeline(prompts)

    def _encode_with_pipeline(self, prompts: list[str]) -> torch.Tensor:
        pipe, dev, L = self.pipe, self.device, self.max_sequence_length
        if getattr(pipe, "text_encoder", None) is None:
            raise ValueError(
                f"{self.family}: no text encoder loaded; pass prompt_embeds=FILE or load_text_encoder=True"
            )
        if self.family in ("wan", "cogvideox"):
            emb, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, max_sequence_length=L, device=dev)
            return emb
        if self.family == "ltx":
            emb, mask, _, _ = pipe.encode_prompt(
                prompts, do_classifier_free_guidance=False, max_sequence_length=L, device=dev
            )
            return _pack_mask(emb, mask)
        if self.family == "animatediff":
            emb, _ = pipe.encode_prompt(prompts, dev, 1, False)
            return emb
        emb, pooled, mask = pipe.encode_prompt(prompts, device=dev, max_sequence_length=L)
        return _pack_hunyuan(emb, mask, pooled)

    def predict(self, latents_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """The denoiser's output; for a two-expert Wan 2.2, timesteps outside the trained
        expert's range go to the other (frozen) expert, as in the pipeline."""
        if self._other_expert is None:
            return self.denoiser(latents_t, t, cond)
        lo, hi = self._expert_range
        inside = (t >= lo) & (t < hi)
        out = torch.empty_like(latents_t)
        if inside.any():
            out[inside] = self.denoiser(latents_t[inside], t[inside], cond[inside])
        if (~inside).any():
            out[~inside] = self._other_expert(latents_t[~inside], t[~inside], cond[~inside])
        return out

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
        LoRA), ``batch_size`` prompts per pipeline call. ``pipe_kwargs`` go to the pipeline."""
        if len(prompts) != len(seeds):
            raise ValueError(f"generate_videos: {len(prompts)} prompts but {len(seeds)} seeds")
        if not prompts:
            raise ValueError("generate_videos: empty prompt list")
        videos = []
        for i in range(0, len(prompts), batch_size):
            kw: dict[str, Any] = dict(
                prompt=list(prompts[i : i + batch_size]),
                num_frames=self.num_frames,
                height=self.height,
                width=self.width,
                num_inference_steps=num_steps,
                guidance_scale=guidance_scale,
                generator=[torch.Generator().manual_seed(int(s)) for s in seeds[i : i + batch_size]],
                output_type="pt",
            )
            if self.family != "animatediff":
                kw["max_sequence_length"] = self.max_sequence_length
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

    def to(self, device) -> DiffusersVideoModel:
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


def load_diffusers_model(path_or_hub_id: str | Path, device="cpu", **options: Any) -> DiffusersVideoModel:
    """``DiffusersVideoModel.from_pretrained`` (what ``align.models.load_model`` calls)."""
    return DiffusersVideoModel.from_pretrained(path_or_hub_id, device=device, **options)
