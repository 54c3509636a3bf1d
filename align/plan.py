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
encoder's activations, DeepSpeed's communication buckets, the CUDA context and allocator
fragmentation: a card counts as holding ``USABLE`` of its memory.

Time: forward FLOPs per video ``F = F_linear + F_attention + F_conv`` (counted on the meta
trace, where attention runs as two batched matmuls: the nominal ``4 x tokens x keys x width``
per layer that fused kernels also do). A LoRA step needs the input gradients only (the frozen
weights get none): backward ``F_linear + F_conv + 2 F_attention``, plus one more forward with
gradient checkpointing; the reference pass (adapters off) is one more forward per video. For a
full fine-tune this would be the familiar ``6 x params x tokens + 12 x layers x tokens^2 x
width``; LoRA saves the weight gradients, a third. Time = FLOPs / (peak x ``MFU``), peak =
989 dense bf16 TFLOPS for an H100 SXM and for an H200 (the same compute; the H200 has more and
faster memory).
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
TRANSIENT = 0.75  # tau: the working set beyond the saved tensors, in largest units (fitted to measured CPU peaks)

# saved(u) = tokens * (a h + b f + c heads) + text_tokens * d h bytes per unit class and regime:
# "autocast" = bf16 weights under bf16 autocast (the recipes' mixed_precision bf16), "bf16" = bf16 weights
# without autocast, "fp32" = float32 weights. Measured with saved_tensors_hooks (see the module docstring).
UNIT_BYTES: dict[str, dict[str, tuple[float, float, float, float]]] = {
    "WanTransformerBlock": {
        "autocast": (48.1, 2.07, 16.4, 12.2),
        "bf16": (60.1, 2.07, 16.4, 16.2),
        "fp32": (56.1, 4.07, 16.4, 12.2),
    },
    "CogVideoXBlock": {
        "autocast": (1.90, 7.59, 17.4, 32.6),
        "bf16": (2.37, 9.47, 17.4, 40.6),
        "fp32": (3.33, 13.3, 29.4, 57.1),
    },
    "LTXVideoTransformerBlock": {
        "autocast": (3.31, 13.2, 9.68, 12.2),
        "bf16": (4.01, 16.0, 9.68, 16.2),
        "fp32": (4.02, 16.1, 11.2, 12.3),
    },
    "HunyuanVideoTransformerBlock": {
        "autocast": (30.7, 2.73, 23.3, 28.3),
        "bf16": (38.7, 2.73, 23.3, 28.3),
        "fp32": (33.5, 5.46, 30.6, 40.4),
    },
    "HunyuanVideoSingleTransformerBlock": {
        "autocast": (26.6, 2.68, 18.0, 32.3),
        "bf16": (32.6, 2.68, 18.0, 38.3),
        "fp32": (29.3, 5.37, 20.1, 40.4),
    },
    # Hunyuan's token refiner (2 blocks on the text only): taken as a single-stream block, not measured
    "HunyuanVideoIndividualTokenRefinerBlock": {
        "autocast": (26.6, 2.68, 18.0, 0.0),
        "bf16": (32.6, 2.68, 18.0, 0.0),
        "fp32": (29.3, 5.37, 20.1, 0.0),
    },
    "ResnetBlock2D": {
        "autocast": (6.0, 6.04, 0.0, 0.0),
        "bf16": (6.0, 6.04, 0.0, 0.0),
        "fp32": (12.0, 12.1, 0.0, 0.0),
    },
    "Transformer2DModel": {
        "autocast": (0.90, 7.23, 11.1, 8.29),
        "bf16": (1.07, 8.54, 14.0, 12.5),
        "fp32": (1.60, 12.8, 8.40, 8.03),
    },
    "AnimateDiffTransformer3D": {
        "autocast": (0.99, 7.88, 11.0, 0.0),
        "bf16": (1.23, 9.85, 11.0, 0.0),
        "fp32": (1.60, 12.8, 14.0, 0.0),
    },
}
# LoRA's rank-r terms, bytes per (rows x r) and per ((in + out) x r) of each adapted layer: the r-wide projection
# kept for lora_B, and under autocast the bf16 copies of the float32 LoRA weights (measured with UNIT_BYTES)
LORA_RANK_BYTES = {"autocast": (2.0, 2.0), "bf16": (4.0, 0.0), "fp32": (4.0, 0.0)}
# the units diffusers' gradient checkpointing recomputes (UNetMotionModel checkpoints its resnets only)
CHECKPOINTED = (
    "WanTransformerBlock", "CogVideoXBlock", "LTXVideoTransformerBlock", "HunyuanVideoTransformerBlock",
    "HunyuanVideoSingleTransformerBlock", "ResnetBlock2D",
)  # fmt: skip

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
SHAPE_OPTIONS = (
    "num_frames",
    "height",
    "width",
    "max_sequence_length",
    "frame_rate",
    "embedded_guidance",
    "wan_expert",
)


# ---------------------------------------------------------------------------------------
# The architecture: published configs -> modules on the meta device
# ---------------------------------------------------------------------------------------


def checkpoints() -> dict[str, dict]:
    """``checkpoint name -> entry`` of the shipped configs (``configs/checkpoints.json``): family,
    pipeline class, Hub ids, denoiser / frozen / text-encoder components, pipeline config."""
    return json.loads((CONFIGS / "checkpoints.json").read_text())


def _local_entry(path: Path) -> dict:
    """The entry of a local diffusers pipeline directory, read from its model_index.json."""
    from align.models.diffusers.loading import family_of

    index = json.loads((path / "model_index.json").read_text())
    family = family_of(index["_class_name"], str(path))
    present = [k for k, v in index.items() if isinstance(v, list) and v[0] is not None]
    return {
        "family": family,
        "pipeline": "AnimateDiffPipeline" if family == "animatediff" else index["_class_name"],
        "denoiser": "unet" if family == "animatediff" else "transformer",
        "frozen": [k for k in ("transformer_2",) if k in present],
        "text_encoders": [k for k in ("text_encoder", "text_encoder_2") if k in present],
        "pipeline_config": {k: index[k] for k in ("boundary_ratio", "expand_timesteps") if index.get(k) is not None},
        "motion_adapters": [],
    }


def find_checkpoint(model: str) -> tuple[Path, dict]:
    """The configs directory and entry of ``model``: a Hub id of a shipped checkpoint, a shipped
    checkpoint's name, or a local diffusers directory (components in ``<dir>/<name>/config.json``)."""
    for name, entry in checkpoints().items():
        if model == name or model in entry["hub_ids"]:
            return CONFIGS / name, entry
    local = Path(model)
    if (local / "model_index.json").is_file():
        return local, _local_entry(local)
    known = sorted(h for e in checkpoints().values() for h in e["hub_ids"])
    raise ValueError(
        f"plan: no published architecture for model {model!r}; shipped: {', '.join(known)} "
        "(or give a local diffusers pipeline directory)"
    )


def component_config(where: Path, component: str) -> dict:
    """A component's config: ``<where>/<component>.json`` (shipped) or ``<where>/<component>/config.json``."""
    for path in (where / f"{component}.json", where / component / "config.json"):
        if path.is_file():
            return json.loads(path.read_text())
    raise FileNotFoundError(f"plan: no config for component {component!r} in {where}")


def build_component(
    cfg: dict, overrides: dict | None = None, device: str = "meta", dtype: torch.dtype | None = None
) -> nn.Module:
    """A diffusers (``_class_name``) or transformers (``model_type`` + ``architectures``) module
    from its config, on the meta device (no memory) or, with random weights created directly in
    ``dtype``, on ``device``; ``overrides`` replace config values."""
    cfg = {**cfg, **(overrides or {})}
    previous = torch.get_default_dtype()
    if dtype is not None and dtype.is_floating_point:
        torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            if "_class_name" in cfg:
                import diffusers

                return getattr(diffusers, cfg["_class_name"]).from_config(cfg)
            import transformers

            fields = {k: v for k, v in cfg.items() if k not in ("architectures", "model_type")}
            config = transformers.AutoConfig.for_model(cfg["model_type"], **fields)
            return getattr(transformers, cfg["architectures"][0])(config)
    finally:
        torch.set_default_dtype(previous)


def cast_like_loaded(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """What ``from_pretrained(torch_dtype=dtype)`` gives: ``dtype``, except the diffusers class's
    ``_keep_in_fp32_modules`` (Wan's norms, time embedder, ...) in float32."""
    nn.Module.to(module, dtype)  # not ModelMixin.to, which warns about exactly what follows
    keep = getattr(module, "_keep_in_fp32_modules", None) or []
    if not hasattr(module, "register_to_config"):  # a transformers model: it keeps its own only in float16
        keep = []
    for name, sub in module.named_modules():
        if any(k in name.split(".") for k in keep):
            sub.float()
    return module


def module_bytes(module: nn.Module | None) -> int:
    """Bytes of a module's parameters (at their dtypes)."""
    return 0 if module is None else sum(p.numel() * p.element_size() for p in module.parameters())


@dataclass
class Architecture:
    """A recipe's model on the meta device: the family's adapter (``model``: a ``DiffusersVideoModel``
    around a pipeline of meta modules, so latent shapes, size rules and the denoiser wrapper are
    the training code's own), the text encoders, and frozen denoisers beside the trained one."""

    name: str
    family: str
    model: Any
    text_encoders: dict[str, nn.Module]
    frozen: dict[str, nn.Module]
    text_width: int

    @property
    def denoiser(self) -> nn.Module:
        return self.model.denoiser

    @property
    def vae(self) -> nn.Module:
        return self.model.pipe.vae


def _motion_adapter_config(where: Path, entry: dict, options: dict) -> dict:
    """AnimateDiff's motion adapter config: the shipped one for a known Hub id, else a local directory's."""
    source = options.get("motion_adapter")
    if source is None or source in entry.get("motion_adapters", []):
        return component_config(where, "motion_adapter")
    if (Path(source) / "config.json").is_file():
        return json.loads((Path(source) / "config.json").read_text())
    known = ", ".join(entry.get("motion_adapters", []))
    raise ValueError(f"plan: no published config for motion adapter {source!r} (shipped: {known})")


def _assemble(entry: dict, parts: dict[str, nn.Module], device: str = "meta") -> Any:
    """The family's diffusers pipeline around meta modules, without text encoders or tokenizers."""
    import diffusers

    name, kw = SCHEDULERS[entry["family"]]
    none = dict.fromkeys(("text_encoder", "tokenizer"))
    if entry["family"] == "hunyuan":
        none.update(dict.fromkeys(("text_encoder_2", "tokenizer_2")))
    scheduler = getattr(diffusers, name)(**kw)
    with torch.device(device):  # AnimateDiffPipeline builds a UNetMotionModel from the UNet and the motion adapter
        return getattr(diffusers, entry["pipeline"])(
            **parts, scheduler=scheduler, **none, **entry.get("pipeline_config", {})
        )


def load_architecture(
    model: str,
    options: dict | None = None,
    dtype: torch.dtype = torch.bfloat16,
    overrides: dict | None = None,
    device: str = "meta",
) -> Architecture:
    """The architecture of ``model`` (a shipped checkpoint's Hub id or name, or a local diffusers
    directory) at ``dtype`` on the meta device, sized by ``options`` (a recipe's ``model_options``:
    ``num_frames``, ``height``, ``width``, ...; the size is checked like training checks it).
    ``overrides``: ``component -> {config key: value}`` (tests build narrower models this way);
    ``device`` other than meta: real modules with random weights (tests run them)."""
    from align.models.diffusers import model_class

    options, overrides = dict(options or {}), dict(overrides or {})
    where, entry = find_checkpoint(model)

    def build(component: str, cfg: dict | None = None) -> nn.Module:
        at = torch.float32 if component == "vae" else dtype
        module = build_component(cfg or component_config(where, component), overrides.get(component), device, at)
        return cast_like_loaded(module, at)

    parts = {c: build(c) for c in (entry["denoiser"], *entry.get("frozen", []), "vae")}
    if entry["family"] == "animatediff":
        parts["motion_adapter"] = build("motion_adapter", _motion_adapter_config(where, entry, options))
    texts = {c: build(c) for c in entry["text_encoders"]}
    pipe = _assemble(entry, parts, device)
    adapter = model_class(entry["family"])(pipe, **{k: options[k] for k in SHAPE_OPTIONS if k in options})
    first = next(iter(texts.values())).config
    width = getattr(first, "d_model", None) or first.hidden_size
    trained = getattr(adapter.denoiser, adapter.component)
    frozen = {c: m for c, m in parts.items() if c.startswith("transformer") and m is not trained}
    return Architecture(where.name, entry["family"], adapter, texts, frozen, width)


# ---------------------------------------------------------------------------------------
# One forward on the meta device: units, linear rows, FLOPs
# ---------------------------------------------------------------------------------------


@dataclass
class Unit:
    """One transformer block (UNet: resnet, spatial transformer, motion module) as the trace saw it."""

    name: str  # its module name in the denoiser
    kind: str  # its class
    tokens: int  # rows of its input hidden states (video tokens; UNet: frames x pixels)
    hidden: int  # their width
    ffn: int  # the width of the widest linear layer its tokens pass (the MLP; a resnet: its output channels)
    heads: int  # attention heads (0 for a resnet)
    text_tokens: int  # rows of the text states it attends to (0 if none)
    param_bytes: int  # its weights (one of them is gathered at a time under ZeRO-3 / FSDP2)


@dataclass
class Trace:
    """What one forward of one video at the recipe's size did (batch 1, meta device)."""

    units: list[Unit]
    rows: dict[str, int]  # nn.Linear name -> rows it processed
    flops: dict[str, float]  # "linear", "attention", "conv": forward FLOPs


def _unit_hook(units: list[Unit], name: str, module: nn.Module):
    """A forward pre-hook recording a unit's input (``hidden_states`` first; 3D ``(B, rows, width)``
    or 4D ``(B, C, H, W)``) and the text states it is given (a 3D second argument or
    ``encoder_hidden_states``)."""
    heads = next((m.heads for m in module.modules() if isinstance(getattr(m, "heads", None), int)), 0)
    weights = sum(p.numel() * p.element_size() for p in module.parameters())

    def hook(mod, args, kwargs):
        hs = args[0] if args else kwargs.get("hidden_states", kwargs.get("input_tensor"))
        text = args[1] if len(args) > 1 else kwargs.get("encoder_hidden_states")
        text_rows = text.shape[0] * text.shape[1] if torch.is_tensor(text) and text.dim() == 3 else 0
        if hs.dim() == 3:
            rows, width = hs.shape[0] * hs.shape[1], hs.shape[2]
        else:
            rows, width = hs.numel() // hs.shape[1], hs.shape[1]
        units.append(Unit(name, type(mod).__name__, rows, width, 0, heads, text_rows, weights))

    return hook


def _rows_hook(rows: dict[str, int], name: str):
    def hook(mod, args, out):
        rows[name] = rows.get(name, 0) + out.numel() // mod.out_features

    return hook


def _flop_kinds(counts: dict) -> dict[str, float]:
    """FlopCounterMode's global counts by kind: linear layers (mm / addmm), attention (bmm: SDPA
    runs its math path on the meta device), convolutions."""
    out = {"linear": 0.0, "attention": 0.0, "conv": 0.0}
    for op, n in counts.get("Global", {}).items():
        name = str(op)
        kind = "attention" if "bmm" in name or "attention" in name else "conv" if "conv" in name else "linear"
        out[kind] += float(n)
    return out


def trace(arch: Architecture) -> Trace:
    """One forward of one video at the architecture's video size (on the meta device, or where
    the architecture's modules are), with hooks on every unit (``UNIT_BYTES``' classes) and every
    ``nn.Linear``, under a FLOP counter."""
    from torch.utils.flop_counter import FlopCounterMode

    model, units, rows = arch.model, [], {}
    handles = []
    for name, m in arch.denoiser.named_modules():
        if type(m).__name__ in UNIT_BYTES:
            handles.append(m.register_forward_pre_hook(_unit_hook(units, name, m), with_kwargs=True))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(_rows_hook(rows, name)))
    cond_shape = COND_SHAPES[arch.family](model.max_sequence_length, arch.text_width)
    device = next(arch.denoiser.parameters()).device
    x = torch.zeros(1, *model.latent_shape, device=device)
    t = torch.full((1,), 500.0, device=device)
    cond = torch.ones(1, *cond_shape, device=device)
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            arch.denoiser(x, t, cond)
    finally:
        for h in handles:
            h.remove()
    modules = dict(arch.denoiser.named_modules())
    for u in units:  # the MLP: the widest linear layer the unit's tokens pass (not the adaLN ones, fed the timestep)
        inside = [n for n in rows if n.startswith(u.name + ".") and rows[n] >= u.tokens]
        resnet_out = getattr(modules[u.name], "out_channels", None) or 0  # a resnet: no linear, its output width
        u.ffn = max((modules[n].out_features for n in inside), default=resnet_out)
    return Trace(units, rows, _flop_kinds(counter.get_flop_counts()))


# ---------------------------------------------------------------------------------------
# Memory per process
# ---------------------------------------------------------------------------------------


@dataclass
class Setup:
    """How the run is launched: processes, the backend sharding them, sequence-parallel degree."""

    gpus: int = 1
    backend: str = "ddp"
    sp: int = 1

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"plan: --backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.gpus < 1 or self.sp < 1 or self.gpus % self.sp:
            raise ValueError(f"plan: --gpus ({self.gpus}) must be a positive multiple of --sp ({self.sp})")

    @property
    def data_parallel(self) -> int:
        """Processes that see different samples (a sequence-parallel group shares one)."""
        return self.gpus // self.sp


def regime(dtype: torch.dtype, mixed_precision: str) -> str:
    """Which ``UNIT_BYTES`` column: bf16/fp16 mixed precision runs under autocast; else the weights' dtype."""
    if mixed_precision in ("bf16", "fp16"):
        return "autocast"
    return "fp32" if dtype == torch.float32 else "bf16"


def lora_layers(arch: Architecture, tr: Trace, targets: list[str]) -> list[tuple[str, int, int, int]]:
    """``(name, in, out, rows)`` of every nn.Linear LoRA adapts (peft's rule: the name is a target
    or ends with ``.target``); a target that matches nothing is an error, as in training."""
    linears = {n: m for n, m in arch.denoiser.named_modules() if isinstance(m, nn.Linear)}
    out = []
    for target in targets:
        hits = [n for n in linears if n == target or n.endswith("." + target)]
        if not hits:
            raise ValueError(f"plan: LoRA target {target!r} matches no linear layer of the {arch.family} denoiser")
        out += [(n, linears[n].in_features, linears[n].out_features, tr.rows.get(n, 0)) for n in hits]
    return sorted(set(out))


def lora_parameter_count(layers: list[tuple[str, int, int, int]], rank: int) -> int:
    """``sum r * (in + out)`` over the adapted layers (lora_A is r x in, lora_B out x r)."""
    return sum(rank * (i + o) for _, i, o, _ in layers)


def unit_bytes(u: Unit, mode: str) -> float:
    """Bytes a unit saves for backward in one forward: ``tokens (a h + b f + c heads) + text d h``."""
    a, b, c, d = UNIT_BYTES[u.kind][mode]
    return u.tokens * (a * u.hidden + b * u.ffn + c * u.heads) + u.text_tokens * d * u.hidden


def activation_bytes(tr: Trace, layers: list, rank: int, mode: str) -> dict[str, float]:
    """Per video, one forward with gradients: ``saved`` (everything kept for backward),
    ``checkpointed`` (gradient checkpointing: the checkpointed units keep their input, one of them
    is recomputed at a time; the others keep everything) and ``largest`` (the largest unit's
    saved bytes, the unit of the transient working set); per forward call, whatever the batch,
    ``copies`` (the bf16 copies autocast makes of the LoRA weights)."""
    per_row, per_io = LORA_RANK_BYTES[mode]
    element = 4 if mode == "fp32" else 2
    lora = {u.name: 0.0 for u in tr.units}
    outside = 0.0
    for name, _, _, rows in layers:
        owner = next((u.name for u in tr.units if name.startswith(u.name + ".")), None)
        if owner is None:
            outside += rank * per_row * rows
        else:
            lora[owner] += rank * per_row * rows
    full = {u.name: unit_bytes(u, mode) + lora[u.name] for u in tr.units}
    kept = [full[u.name] for u in tr.units if u.kind not in CHECKPOINTED]
    inputs = [u.tokens * u.hidden * element for u in tr.units if u.kind in CHECKPOINTED]
    recompute = max((full[u.name] for u in tr.units if u.kind in CHECKPOINTED), default=0.0)
    return {
        "saved": sum(full.values()) + outside,
        "checkpointed": sum(kept) + sum(inputs) + recompute + outside,
        "largest": max((unit_bytes(u, mode) for u in tr.units), default=0.0),
        "copies": rank * per_io * sum(i + o for _, i, o, _ in layers),
    }


def lora_state_bytes(params: int, backend: str, n: int, mixed: bool) -> dict[str, float]:
    """LoRA parameters, gradients and AdamW state per process (see the module docstring)."""
    if backend == "ddp":
        return {"lora": 4.0 * params, "grads": 4.0 * params, "optimizer": 8.0 * params}
    if backend == "zero2":
        return {
            "lora": (2.0 if mixed else 4.0) * params,
            "grads": 4.0 * params / n,
            "optimizer": (12.0 if mixed else 8.0) * params / n,
        }
    if backend == "zero3":
        return {
            "lora": (2.0 if mixed else 4.0) * params / n,
            "grads": 4.0 * params / n,
            "optimizer": (12.0 if mixed else 8.0) * params / n,
        }
    return {"lora": 4.0 * params / n, "grads": 4.0 * params / n, "optimizer": 8.0 * params / n}  # fsdp2


def _objective(cfg, data_parallel: int = 1) -> dict[str, Any]:
    """What a micro-step of the recipe's objective runs, per data-parallel process: ``videos``
    forward with gradients, ``reference`` forwards without (the adapters-off reference), and for
    online objectives the round: ``local`` rollouts kept, ``steps`` sampler steps, ``cfg`` (x2 with
    guidance), ``sample_batch`` videos sampled at once, ``micro_steps`` trained per round."""
    from align.training.core import micro_batch_size

    micro = micro_batch_size(cfg, data_parallel)
    if cfg.objective == "dpo":
        return {"videos": 2 * micro, "reference": 2 * micro, "online": False}
    if cfg.objective == "grpo":
        guided = 2 if cfg.guidance_scale != 1.0 else 1
        return {
            "videos": guided * micro,
            "reference": guided * micro if cfg.kl_weight > 0 else 0,
            "online": True,
            "round": cfg.rollouts_per_round,
            "steps": cfg.sample_steps,
            "guided": guided,
            "sample_batch": cfg.rollout_batch_size,
            "trajectory": True,
            "micro_steps_per_rollout": cfg.inner_epochs * cfg.trained_steps,
        }
    if cfg.objective == "nft":  # one forward with gradients, the old policy's (and the reference's) without
        return {
            "videos": micro,
            "reference": micro * (2 if cfg.kl_weight > 0 else 1),
            "online": True,
            "round": cfg.rollouts_per_round,
            "steps": cfg.sample_steps,
            "guided": 2 if cfg.guidance_scale != 1.0 else 1,
            "sample_batch": cfg.rollout_batch_size,
            "trajectory": False,  # only the clean latents are kept
            "rollouts_per_micro_step": micro,  # trained without guidance
            "micro_steps_per_rollout": cfg.inner_epochs * cfg.trained_steps,
        }
    guided = 2 if cfg.rwr_guidance_scale != 1.0 else 1
    out = {"videos": guided * micro, "reference": guided * micro if cfg.rwr_kl_weight > 0 else 0, "online": cfg.online}
    if cfg.online:
        out.update(round=cfg.online_prompts_per_round * cfg.online_samples_per_prompt, steps=cfg.sample_steps)
        out.update(guided=2 if cfg.guidance_scale != 1.0 else 1, sample_batch=micro, trajectory=False)
        out["micro_steps_per_round"] = cfg.online_steps_per_round
    return out


def text_encoder_loaded(cfg) -> tuple[bool, str]:
    """Whether a run of ``cfg`` holds its text encoder(s) in memory, and why
    (``align.training.text_encoder``'s policy for DPO; online objectives encode their prompts)."""
    choice = cfg.model_options.get("load_text_encoder")
    if choice is False:
        return False, "model_options.load_text_encoder: false"
    if choice is True:
        return True, "model_options.load_text_encoder: true"
    if cfg.objective == "dpo" and cfg.latent_cache_dir:
        return False, "latent_cache_dir: not loaded once the cache holds every prompt (the run that fills it loads it)"
    return True, "loaded: it encodes the prompts" + (" of every rollout round" if cfg.objective != "dpo" else "")


def memory(cfg, setup: Setup, arch: Architecture, tr: Trace, checkpointing: bool | None = None) -> dict[str, float]:
    """Bytes per process of every part (module docstring), and ``peak``: the larger of the training
    micro-step and (online objectives) the rollout phase."""
    dtype = next(arch.denoiser.parameters()).dtype
    mode = regime(dtype, cfg.mixed_precision)
    n, obj = setup.gpus, _objective(cfg, setup.data_parallel)
    ckpt = gradient_checkpointing(cfg) if checkpointing is None else checkpointing
    weights = module_bytes(arch.denoiser)
    if setup.backend in ("zero3", "fsdp2") and n > 1:
        weights = weights / n + max((u.param_bytes for u in tr.units), default=0)
    layers = lora_layers(arch, tr, list(cfg.lora_targets))
    lora = lora_state_bytes(lora_parameter_count(layers, cfg.lora_rank), setup.backend, n, mode == "autocast")
    act = activation_bytes(tr, layers, cfg.lora_rank, mode)
    per_video = (act["checkpointed"] if ckpt else act["saved"]) + TRANSIENT * act["largest"]
    out = {
        "denoiser": weights,
        "frozen": float(sum(module_bytes(m) for m in arch.frozen.values())),
        "vae": float(module_bytes(arch.vae)),
        "text_encoder": float(sum(module_bytes(m) for m in arch.text_encoders.values()))
        if text_encoder_loaded(cfg)[0]
        else 0.0,
        **lora,
        "activations": (obj["videos"] * per_video / setup.sp) + act["copies"],
        "activations_no_checkpointing": obj["videos"] * (act["saved"] + TRANSIENT * act["largest"]) / setup.sp
        + act["copies"],
        "activations_checkpointing": obj["videos"] * (act["checkpointed"] + TRANSIENT * act["largest"]) / setup.sp
        + act["copies"],
        "buffers": 0.0,
        "sampling": 0.0,
    }
    if obj["online"]:
        local = math.ceil(obj["round"] / setup.data_parallel)
        latent = math.prod(arch.model.latent_shape) * 4  # float32 on the device
        cond = math.prod(COND_SHAPES[arch.family](arch.model.max_sequence_length, arch.text_width)) * 2
        steps = obj["steps"] + 1 if obj["trajectory"] else 1
        out["buffers"] = local * (steps * latent + cond)
        out["sampling"] = obj["guided"] * obj["sample_batch"] * act["largest"] / setup.sp
    static = sum(out[k] for k in ("denoiser", "frozen", "vae", "text_encoder", "lora", "grads", "optimizer"))
    out["peak_train"] = static + out["buffers"] + out["activations"]
    # the rollout chunks are concatenated at the end of sampling: the buffers exist twice for a moment
    out["peak_rollout"] = static + 2 * out["buffers"] + out["sampling"] if obj["online"] else 0.0
    out["peak"] = max(out["peak_train"], out["peak_rollout"])
    return out


def gradient_checkpointing(cfg) -> bool:
    """The recipe's gradient checkpointing (a model option in the shipped recipes, or the top-level key)."""
    return bool(cfg.model_options.get("gradient_checkpointing", False) or cfg.gradient_checkpointing)


# ---------------------------------------------------------------------------------------
# Time per step
# ---------------------------------------------------------------------------------------


def step_flops(cfg, setup: Setup, tr: Trace, checkpointing: bool) -> dict[str, float]:
    """FLOPs per process: ``micro_step`` (forward + input-gradient backward of the videos with
    gradients, one more forward with checkpointing, the reference forwards), ``optimizer_step``
    (x gradient accumulation) and for online objectives ``round`` (the process's rollouts'
    sampler steps, x2 with CFG, plus its micro-steps of the round)."""
    f = tr.flops
    forward = f["linear"] + f["attention"] + f["conv"]
    backward = f["linear"] + f["conv"] + 2 * f["attention"]
    obj = _objective(cfg, setup.data_parallel)
    micro = (
        obj["videos"] * (forward + backward + (forward if checkpointing else 0.0)) + obj["reference"] * forward
    ) / setup.sp
    out = {"forward_per_video": forward, "micro_step": micro, "optimizer_step": micro * cfg.accumulation_steps}
    if obj["online"]:
        local = math.ceil(obj["round"] / setup.data_parallel)
        sampling = local * obj["steps"] * obj["guided"] * forward / setup.sp
        per_sample = obj.get("rollouts_per_micro_step") or obj["videos"] // obj["guided"]  # rollouts per micro-step
        steps = obj.get("micro_steps_per_round") or math.ceil(local / per_sample) * obj["micro_steps_per_rollout"]
        out.update(sampling=sampling, round=sampling + steps * micro, micro_steps_per_round=steps)
    return out


def seconds(flops: float, card: str = "H100", mfu: float = MFU) -> float:
    """``flops / (peak x mfu)``."""
    return flops / (PEAK_FLOPS[card] * mfu)


# ---------------------------------------------------------------------------------------
# The plan: figures, a verdict per card, the knobs that make it fit
# ---------------------------------------------------------------------------------------


@dataclass
class Plan:
    """Everything ``vidalign plan`` prints (``to_dict`` for ``--json``; bytes, FLOPs and seconds)."""

    recipe: str
    model: str
    checkpoint: str
    family: str
    objective: str
    setup: Setup
    video: tuple[int, int, int]
    latent_shape: tuple[int, ...]
    tokens: int
    regime: str
    checkpointing: bool
    params: dict[str, int]
    memory: dict[str, float]
    flops: dict[str, float]
    verdicts: dict[int, dict] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def times(self, card: str) -> dict[str, float]:
        """Seconds per micro-step / optimizer step (/ round) on ``card`` at ``MFU``."""
        keys = ("micro_step", "optimizer_step", "sampling", "round")
        return {k: seconds(self.flops[k], card) for k in keys if k in self.flops}

    def to_dict(self) -> dict:
        out = {k: getattr(self, k) for k in ("recipe", "model", "checkpoint", "family", "objective", "regime")}
        out.update(setup=vars(self.setup), video=list(self.video), latent_shape=list(self.latent_shape))
        out.update(tokens=self.tokens, gradient_checkpointing=self.checkpointing, params=self.params)
        out["memory_gib"] = {k: round(v / GB, 3) for k, v in self.memory.items()}
        out["flops"] = self.flops
        out["seconds"] = {card: self.times(card) for card in PEAK_FLOPS}
        out["mfu"], out["usable_share"] = MFU, USABLE
        out["verdicts"] = {str(k): v for k, v in self.verdicts.items()}
        out["notes"] = self.notes
        return out


def recipe_dtype(cfg) -> torch.dtype:
    """The weights' dtype on a GPU: ``model_options.dtype`` (``auto``: bfloat16)."""
    from align.models.diffusers.loading import resolve_dtype

    value = cfg.model_options.get("dtype", "auto")
    return torch.bfloat16 if value == "auto" else resolve_dtype(value, torch.device("cpu"))


def _figures(cfg, setup: Setup, arch: Architecture, tr: Trace, recipe: str) -> Plan:
    """The plan's figures for one configuration (no verdicts yet)."""
    ckpt = gradient_checkpointing(cfg)
    layers = lora_layers(arch, tr, list(cfg.lora_targets))
    dtype = next(arch.denoiser.parameters()).dtype
    params = {
        "denoiser": sum(p.numel() for p in arch.denoiser.parameters()),
        "frozen": sum(p.numel() for m in arch.frozen.values() for p in m.parameters()),
        "lora": lora_parameter_count(layers, cfg.lora_rank),
        "lora_layers": len(layers),
        "vae": sum(p.numel() for p in arch.vae.parameters()),
        "text_encoder": sum(p.numel() for m in arch.text_encoders.values() for p in m.parameters()),
    }
    m = arch.model
    return Plan(
        recipe, cfg.model, arch.name, arch.family, cfg.objective, setup, (m.num_frames, m.height, m.width),
        tuple(m.latent_shape), max((u.tokens for u in tr.units), default=0), regime(dtype, cfg.mixed_precision),
        ckpt, params, memory(cfg, setup, arch, tr), step_flops(cfg, setup, tr, ckpt),
    )  # fmt: skip


def _with_options(cfg, **options):
    """``cfg`` with ``model_options`` updated (a copy)."""
    new = copy.copy(cfg)
    new.model_options = {**cfg.model_options, **options}
    return new


def _knobs(cfg, setup: Setup, family: str = "") -> list[tuple[str, Any, Setup]]:
    """Each knob that can still be turned, alone, as ``(what, cfg, setup)``; sequence parallel
    only where training has it (``align.models.diffusers.sequence_parallel``: Wan, DPO / GRPO)."""
    from align.models.diffusers.sequence_parallel import SUPPORTED_FAMILIES
    from align.training.core import SEQUENCE_PARALLEL_OBJECTIVES

    out = []
    if not gradient_checkpointing(cfg):
        out.append(("gradient_checkpointing: true", _with_options(cfg, gradient_checkpointing=True), setup))
    if setup.gpus > 1 and setup.backend in ("ddp", "zero2"):
        out.append(("--backend zero3 (shards the denoiser's weights)", cfg, Setup(setup.gpus, "zero3", setup.sp)))
    if text_encoder_loaded(cfg)[0]:
        what = (
            "latent_cache_dir filled by `vidalign data cache`" if cfg.objective == "dpo" else "load_text_encoder: false"
        )
        out.append((f"{what} (the text encoder is not loaded)", _with_options(cfg, load_text_encoder=False), setup))
    for key in ("train_batch_size", "rollout_batch_size"):
        if getattr(cfg, key, 1) > 1 and not (key == "train_batch_size" and cfg.effective_batch_size):
            new = copy.copy(cfg)
            setattr(new, key, 1)
            out.append((f"{key}: 1", new, setup))
    k = 2 * setup.sp
    if setup.gpus % k == 0 and family in SUPPORTED_FAMILIES and cfg.objective in SEQUENCE_PARALLEL_OBJECTIVES:
        out.append((f"sequence_parallel_size: {k} (--sp {k})", cfg, Setup(setup.gpus, setup.backend, k)))
    return out


def _turn_knobs(cfg, setup: Setup, arch: Architecture, tr: Trace, usable: float) -> tuple[list[str], Any, Setup, float]:
    """Greedily, the knob that lowers the peak most, then the next, until the plan fits in
    ``usable`` bytes or no knob helps: ``(knobs turned, cfg, setup, peak)``."""
    turned, peak = [], memory(cfg, setup, arch, tr)["peak"]
    while peak > usable:
        options = [(memory(c, s, arch, tr)["peak"], what, c, s) for what, c, s in _knobs(cfg, setup, arch.family)]
        if not options or min(o[0] for o in options) > 0.99 * peak:
            break
        peak, what, cfg, setup = min(options, key=lambda o: o[0])
        turned.append(what)
    return turned, cfg, setup, peak


def _smaller_video(cfg, setup: Setup, arch: Architecture, usable: float) -> tuple[int, int, int] | None:
    """The longest clip (same height and width; the family's frame rule) whose plan fits in
    ``usable`` bytes, among 1/2, 1/4 and 1/8 of the latent frames; None if none does."""
    m = arch.model
    size = (m.num_frames, m.height, m.width)
    tc = m.compression()[0]
    latent_frames = m.latent_shape[1]
    try:
        for share in (2, 4, 8):
            lt = max(1, latent_frames // share)
            frames = (lt - 1) * tc + 1 if tc > 1 else lt
            try:
                m.set_video_size(frames, size[1], size[2])
            except ValueError:  # a temporal patch that this frame count breaks
                continue
            if memory(cfg, setup, arch, trace(arch))["peak"] <= usable:
                return frames, size[1], size[2]
    finally:
        m.set_video_size(*size)
    return None


def verdict(cfg, setup: Setup, arch: Architecture, tr: Trace, card: int, peak: float) -> dict:
    """Whether the plan fits a ``card`` GB card, and if not the knobs to turn, the one that helps
    most first (each on top of the ones before), then a shorter clip if that is not enough."""
    usable = card * GB * USABLE
    if peak <= usable:
        return {"fits": True, "peak_gib": round(peak / GB, 2)}
    turned, cfg, setup, after = _turn_knobs(cfg, setup, arch, tr, usable)
    if after <= usable:
        return {"fits": False, "turn": turned, "then_gib": round(after / GB, 2)}
    size = _smaller_video(cfg, setup, arch, usable)
    if size is not None:
        return {"fits": False, "turn": [*turned, "a shorter clip: num_frames {} at {}x{}".format(*size)]}
    weights = memory(cfg, setup, arch, tr)
    if weights["denoiser"] + weights["frozen"] > usable:
        note = "the weights alone do not fit: shard them over several GPUs (--gpus N --backend zero3)"
    else:
        note = "no knob of vidalign's makes it fit (a larger card, a smaller video)"
    return {"fits": False, "turn": [], "note": note}


def make_plan(cfg, setup: Setup | None = None, recipe: str = "", arch: Architecture | None = None) -> Plan:
    """The plan of a training config (a recipe parsed by ``align.training.load_train_config``)."""
    setup = setup or Setup(cfg.sequence_parallel_size, sp=cfg.sequence_parallel_size)
    arch = arch or load_architecture(cfg.model, cfg.model_options, recipe_dtype(cfg))
    tr = trace(arch)
    plan = _figures(cfg, setup, arch, tr, recipe)
    for card in CARDS:
        plan.verdicts[card] = verdict(cfg, setup, arch, tr, card, plan.memory["peak"])
    loaded, why = text_encoder_loaded(cfg)
    plan.notes.append(f"text encoder: {why}")
    if setup.backend == "fsdp2":
        plan.notes.append("fsdp2: planned like ZeRO-3; recipes/accelerate has no FSDP2 config yet")
    if setup.sp > 1 and arch.family != "wan":  # align.models.diffusers.sequence_parallel.SUPPORTED_FAMILIES
        plan.notes.append(f"sequence parallel: vidalign's training splits Wan only, not {arch.family}")
    plan.notes.append(
        "not modelled: the VAE's working memory (encode / decode one video at a time), the text encoder's activations"
    )
    return plan


def plan_recipe(recipe: str, overrides: list[str] | None = None, setup: Setup | None = None) -> Plan:
    """``vidalign plan RECIPE``: the recipe (with ``--key value`` overrides) parsed like ``train`` parses it."""
    from align.training import load_train_config

    return make_plan(load_train_config(recipe, overrides or []), setup, str(recipe))


# ---------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------

ROWS = (
    ("denoiser", "denoiser weights"),
    ("frozen", "frozen second expert"),
    ("vae", "VAE (float32)"),
    ("text_encoder", "text encoder(s)"),
    ("lora", "LoRA parameters"),
    ("grads", "LoRA gradients"),
    ("optimizer", "AdamW state"),
    ("activations_no_checkpointing", "activations, no checkpointing"),
    ("activations_checkpointing", "activations, gradient checkpointing"),
    ("buffers", "rollout trajectories"),
    ("sampling", "sampling working set"),
    ("peak_train", "peak: training micro-step"),
    ("peak_rollout", "peak: rollout sampling"),
    ("peak", "PEAK per process"),
)


def _count(n: float) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


def _header(p: Plan) -> list[str]:
    s, pr = p.setup, p.params
    return [
        f"vidalign plan {p.recipe}: {p.model} ({p.checkpoint}, {p.family}), objective {p.objective}",
        f"  video {p.video[0]}x{p.video[1]}x{p.video[2]} -> latents {'x'.join(map(str, p.latent_shape))}, "
        f"{p.tokens} tokens per video; {p.regime} activations; gradient checkpointing "
        f"{'on' if p.checkpointing else 'off'}",
        f"  {s.gpus} GPU(s), {s.backend}, sequence parallel {s.sp}",
        f"  parameters: denoiser {_count(pr['denoiser'])}, LoRA {_count(pr['lora'])} ({pr['lora_layers']} layers), "
        f"VAE {_count(pr['vae'])}, text encoder(s) {_count(pr['text_encoder'])}"
        + (f", frozen expert {_count(pr['frozen'])}" if pr["frozen"] else ""),
    ]


def format_plan(p: Plan) -> str:
    """The table ``vidalign plan`` prints."""
    lines = [*_header(p), "", f"  {'per process':<40}{'GiB':>9}"]
    used = "activations_checkpointing" if p.checkpointing else "activations_no_checkpointing"
    for key, label in ROWS:
        if key in ("frozen", "buffers", "sampling", "peak_rollout") and not p.memory[key]:
            continue
        mark = " <- recipe" if key == used else ""
        lines.append(f"  {label:<40}{p.memory[key] / GB:>9.2f}{mark}")
    lines.append("")
    f = p.flops
    lines.append(
        f"  FLOPs: {f['forward_per_video'] / 1e12:.1f} T per video forward, "
        f"{f['micro_step'] / 1e12:.1f} T per micro-step"
        + (f", {f['round'] / 1e15:.2f} P per round" if "round" in f else "")
    )
    for card in PEAK_FLOPS:
        t = p.times(card)
        text = f"{t['micro_step']:.2f} s per micro-step, {t['optimizer_step']:.1f} s per optimizer step"
        if "round" in t:
            text += f", {t['round']:.0f} s per round ({t['sampling']:.0f} s sampling)"
        lines.append(f"  time per process on an {card} at {MFU:.0%} MFU: {text}")
    lines.append("")
    for card, v in p.verdicts.items():
        if v["fits"]:
            lines.append(f"  {card:>3} GB card: fits ({p.memory['peak'] / GB:.1f} GiB of {card * USABLE:.0f} usable)")
        elif v["turn"]:
            then = f" -> {v['then_gib']:.1f} GiB" if "then_gib" in v else ""
            lines.append(
                f"  {card:>3} GB card: does not fit; turn first: {v['turn'][0]}"
                + (f" (then: {'; '.join(v['turn'][1:])})" if len(v["turn"]) > 1 else "")
                + then
            )
        else:
            lines.append(f"  {card:>3} GB card: does not fit; {v['note']}")
    lines += ["", *(f"  note: {n}" for n in p.notes)]
    return "\n".join(lines)
