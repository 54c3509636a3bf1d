"""``vidalign plan``: what a recipe needs per process (memory) and per step (time), before renting a GPU.

The recipe's model is built from its published configs (``align/models/diffusers/configs/``, or
a local diffusers directory) on the meta device: no weight is allocated. One forward of the
denoiser at the recipe's video size runs on meta tensors with hooks, which records every
linear layer's rows (tokens), every transformer block's / UNet unit's input, and the forward
FLOPs (``torch.utils.flop_counter``). Memory per process is then, in bytes:

- **weights**: the trained denoiser at the recipe's ``dtype`` (the modules diffusers keeps in
  float32 stay float32), the frozen second expert (Wan 2.2 A14B), the VAE in float32 (the
  adapters keep it there) and the text encoder(s) when they are loaded (DPO with
  ``latent_cache_dir``: not loaded once the cache holds every prompt; ``load_text_encoder:
  false``: never). Only the denoiser is sharded (ZeRO-3 / FSDP2: ``/ N`` plus one gathered
  block); the frozen parts stay outside the engine, whole on every process.
- **LoRA**: ``P = sum over adapted nn.Linear of r * (in + out)`` parameters. ddp: float32
  parameter, gradient and AdamW's two moments, 16 B per parameter; zero2: the parameter (bf16
  under mixed precision) whole, gradient (fp32, 4 B), moments (8 B) and the fp32 master (4 B,
  mixed precision only) ``/ N``; zero3: all of it ``/ N``; fsdp2: 16 B ``/ N``.
- **activations** of one micro-step's forward with gradients, ``V`` videos (DPO: 2 per pair,
  chosen and rejected; GRPO: 1 per rollout, 2 with CFG; RWR: 1, 2 with ``rwr_guidance_scale``):
  ``V * (sum over units of saved(u) + lora(u)) + tau * V * max_u saved(u)`` where a unit is a
  transformer block (UNet: a resnet, a spatial transformer, a motion module) and
  ``saved(u) = tokens * (a h + b f + c heads) + text_tokens * d h`` bytes (``h``: the unit's
  width, ``f``: its widest linear layer, the MLP). ``a, b, c, d`` (``UNIT_BYTES``) were measured
  per block class with ``torch.autograd.graph.saved_tensors_hooks`` on CPU at small widths
  (diffusers 0.42), LoRA on ``to_q, to_k, to_v, to_out.0`` included; ``lora(u)`` adds the
  rank-r projections, ``rows * r * 2`` bytes under autocast (4 without) per adapted layer, and
  under autocast the bf16 copies of the LoRA weights. With gradient checkpointing every unit
  keeps only its input (``tokens * h`` elements) and one unit is recomputed at a time:
  ``V * (sum_u input(u) + max_u (saved(u) + lora(u))) + tau * V * max_u saved(u)``. ``tau``
  (``TRANSIENT``) is the backward pass's working set, calibrated against the measured peak RSS
  of a DPO step on CPU (``tests/test_plan.py``). Sequence parallel over ``K`` processes
  divides the activations by ``K``.
- **rollout buffers** (GRPO): a process's ``rollouts_per_round / N`` trajectories of
  ``sample_steps + 1`` float32 latents and their text states, twice while the chunks are
  concatenated; sampling itself (no gradients) needs one unit's working set for
  ``rollout_batch_size`` videos (x2 with CFG). Online RWR keeps the round's clean latents.

Not modelled: the VAE's working memory while it encodes (DPO without a latent cache, once at
start) or decodes rollouts (one video at a time; enable tiling if a card is tight), the text
encoder's activations, the CUDA context and allocator fragmentation: a card counts as holding
``USABLE`` of its memory.

Time: forward FLOPs per video ``F = F_linear + F_attention + F_conv`` (counted on the meta
trace). A LoRA step needs the input gradients only (the frozen weights get none): backward
``F_linear + F_conv + 2 F_attention``, plus one more forward with gradient checkpointing; the
reference pass (adapters off) is one more forward per video. For a full fine-tune this would
be the familiar ``6 x params x tokens + 12 x layers x tokens^2 x width``; LoRA saves the weight
gradients, a third. Time = FLOPs / (peak x ``MFU``), peak = 989 dense bf16 TFLOPS for an H100
SXM and for an H200 (the same compute; the H200 has more and faster memory).
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

CONFIGS = Path(__file__).resolve().parent / "models" / "diffusers" / "configs"
GB = 1024**3  # figures are GiB; a "80 GB" card holds 80 GiB
CARDS = (24, 48, 80, 141)
USABLE = 0.92  # share of a card's memory a process can fill (CUDA context, allocator fragmentation)
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12}  # dense bf16 tensor-core peak, SXM
MFU = 0.40
BACKENDS = ("ddp", "zero2", "zero3", "fsdp2")
TRANSIENT = 1.0  # tau: the backward working set, in units of the largest unit's saved bytes (calibrated on CPU)

# saved(u) = tokens * (a h + b f + c heads) + text_tokens * d h bytes per unit class and regime:
# "autocast" = bf16 weights under bf16 autocast (the recipes' mixed_precision bf16), "bf16" = bf16 weights
# without autocast, "fp32" = float32 weights. Measured with saved_tensors_hooks (see the module docstring).
UNIT_BYTES: dict[str, dict[str, tuple[float, float, float, float]]] = {}

# the scheduler each family's pipeline is assembled with (only the training schedule's kind matters here)
SCHEDULERS = {
    "wan": ("FlowMatchEulerDiscreteScheduler", {"shift": 3.0}),
    "cogvideox": ("CogVideoXDDIMScheduler", {"prediction_type": "v_prediction"}),
    "ltx": ("FlowMatchEulerDiscreteScheduler", {}),
    "hunyuan": ("FlowMatchEulerDiscreteScheduler", {"shift": 7.0}),
    "animatediff": ("DDIMScheduler", {"beta_schedule": "linear", "beta_start": 0.00085, "beta_end": 0.012}),
}
# the denoiser's text conditioning (rows, features) from the text length L and the text encoder's width D
# (LTX and Hunyuan pack the attention mask as one more feature; Hunyuan its pooled CLIP vector as one more row)
COND_SHAPES = {
    "wan": lambda L, D: (L, D),
    "cogvideox": lambda L, D: (L, D),
    "ltx": lambda L, D: (L, D + 1),
    "hunyuan": lambda L, D: (L + 1, D + 1),
    "animatediff": lambda L, D: (L, D),
}
# DiffusersVideoModel options that change the architecture's shapes (the rest of model_options is ignored here)
SHAPE_OPTIONS = ("num_frames", "height", "width", "max_sequence_length", "frame_rate", "embedded_guidance", "wan_expert")
