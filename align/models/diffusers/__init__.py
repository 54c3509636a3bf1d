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

One module per family (``wan.py``, ``cogvideox.py``, ``ltx.py``, ``animatediff.py``,
``hunyuan.py``) holds its denoiser wrapper and its subclass of ``DiffusersVideoModel``
(``base.py``), which overrides what the family does differently; ``load_diffusers_model``
picks the class from ``MODEL_CLASSES``. Each adapter keeps the diffusers pipeline it was
loaded from (``model.pipe``) and exposes:

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
  with whatever LoRA is attached to the denoiser (``has_pipeline_sampler = True``).
- ``video_size_rules`` / ``check_video_size(num_frames, height, width)`` / ``set_video_size``:
  the sizes the VAE compression and the transformer's patches allow (for the released
  checkpoints: Wan, CogVideoX, Hunyuan ``num_frames = 4k+1`` and height / width multiples of
  16, CogVideoX 1.5 also an even number of latent frames; LTX ``8k+1`` and 32; AnimateDiff any
  frame count and 8), checked with an error naming the family and the broken rule before
  anything is encoded or sampled.
- ``supports_gradient_checkpointing = True`` / ``enable_gradient_checkpointing()``: diffusers'
  own checkpointing of the transformer / UNet (also the ``gradient_checkpointing`` option).

The flow-matching DPO derivation (velocity error in place of the noise error, the timestep
distribution, the β scale) is in ``align.models.diffusers.base``.

Wan 2.2 A14B has two experts (``transformer`` for ``t >= boundary``, ``transformer_2`` below).
One expert is aligned at a time (``wan_expert="high_noise" | "low_noise"``), with training
timesteps restricted to its range; the LoRA of the low-noise expert is loaded with
``pipe.load_lora_weights(dir, load_into_transformer_2=True)``.
"""

from __future__ import annotations

from align.models.diffusers.animatediff import AnimateDiffDenoiser, AnimateDiffVideoModel
from align.models.diffusers.base import (
    MODEL_CLASSES,
    DiffusersVideoModel,
    load_diffusers_model,
    load_prompt_embeds,
    model_class,
    resample_video,
    save_prompt_embeds,
)
from align.models.diffusers.cogvideox import CogVideoXDenoiser, CogVideoXVideoModel
from align.models.diffusers.hunyuan import HunyuanDenoiser, HunyuanVideoModel
from align.models.diffusers.loading import (
    FAMILIES,
    PIPELINE_FAMILIES,
    family_of,
    looks_like_hub_id,
    read_pipeline_class,
)
from align.models.diffusers.ltx import LTXDenoiser, LTXVideoModel
from align.models.diffusers.wan import TimestepRangeSchedule, WanDenoiser, WanVideoModel

# every family's adapter is defined (imported above) and registered in MODEL_CLASSES
assert set(MODEL_CLASSES) == set(FAMILIES), (sorted(MODEL_CLASSES), FAMILIES)

# LoRA on the attention projections (self- and cross-attention; AnimateDiff: spatial and motion).
DEFAULT_LORA_TARGETS = {family: list(MODEL_CLASSES[family].default_lora_targets) for family in FAMILIES}


__all__ = [
    "DEFAULT_LORA_TARGETS",
    "FAMILIES",
    "MODEL_CLASSES",
    "PIPELINE_FAMILIES",
    "AnimateDiffDenoiser",
    "AnimateDiffVideoModel",
    "CogVideoXDenoiser",
    "CogVideoXVideoModel",
    "DiffusersVideoModel",
    "HunyuanDenoiser",
    "HunyuanVideoModel",
    "LTXDenoiser",
    "LTXVideoModel",
    "TimestepRangeSchedule",
    "WanDenoiser",
    "WanVideoModel",
    "family_of",
    "load_diffusers_model",
    "load_prompt_embeds",
    "looks_like_hub_id",
    "model_class",
    "read_pipeline_class",
    "resample_video",
    "save_prompt_embeds",
]
