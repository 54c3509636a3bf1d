"""LoRA on the denoiser with peft: attach, disable (= the DPO reference), save, load.

Adapters are injected in place (``peft.inject_adapter_in_model``), so the denoiser keeps
its own ``forward`` and class; the reference policy is the same module with its adapters
switched off, not a second copy of the weights.

Saved LoRAs use the diffusers layout: ``pytorch_lora_weights.safetensors`` whose keys are
the peft keys prefixed with ``transformer.`` (what ``pipeline.load_lora_weights`` reads),
plus ``adapter_config.json`` with rank, alpha and targets. A denoiser whose peft keys already
carry the component name (the diffusers wrappers: ``transformer.`` / ``unet.``) sets the class
attribute ``lora_key_prefix = ""``; a ``lora_metadata`` dict on the denoiser is written to
``adapter_config.json`` and checked on load. The safetensors header also carries diffusers'
``lora_adapter_metadata`` (rank, alpha, adapted modules per component), so a pipeline loads
an adapter with ``alpha != rank`` at the right scale.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file, save_file
from torch import nn

from align.atomic import atomic_directory

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
LORA_CONFIG = "adapter_config.json"
PREFIX = "transformer."


def attach_lora(
    denoiser: nn.Module,
    rank: int = 8,
    alpha: float = 8.0,
    dropout: float = 0.0,
    target_modules: list[str] | tuple[str, ...] = ("attn.qkv", "attn.proj"),
    init_lora_weights: bool | str = True,
) -> nn.Module:
    """Inject LoRA adapters into ``denoiser`` in place and freeze every non-LoRA parameter.

    ``target_modules`` are module-name suffixes (peft semantics). With the default init the
    B matrices are zero, so the adapted model starts equal to the base.
    """
    names = [n for n, _ in denoiser.named_modules()]
    for target in target_modules:
        if not any(n == target or n.endswith("." + target) for n in names):
            raise ValueError(
                f"LoRA target {target!r} matches no module of {type(denoiser).__name__}; "
                f"linear layers are e.g. {[n for n, m in denoiser.named_modules() if isinstance(m, nn.Linear)][:6]}"
            )
    cfg = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(target_modules),
        init_lora_weights=init_lora_weights,
    )
    inject_adapter_in_model(cfg, denoiser)
    for n, p in denoiser.named_parameters():
        p.requires_grad_("lora_" in n)
        if "lora_" in n and p.dtype in (torch.float16, torch.bfloat16):
            p.data = p.data.float()  # peft gives LoRA the base dtype; train it in float32 (peft casts inputs)
    denoiser.lora_config = cfg  # kept for saving
    return denoiser


def lora_parameters(denoiser: nn.Module) -> list[nn.Parameter]:
    """The trainable LoRA parameters (error if none: attach_lora was not called)."""
    params = [p for n, p in denoiser.named_parameters() if "lora_" in n]
    if not params:
        raise ValueError("the denoiser has no LoRA parameters; call attach_lora first")
    return params


def _tuner_layers(denoiser: nn.Module) -> list[BaseTunerLayer]:
    return [m for m in denoiser.modules() if isinstance(m, BaseTunerLayer)]


@contextmanager
def adapters_disabled(denoiser: nn.Module) -> Iterator[nn.Module]:
    """Context in which the denoiser computes the base (reference) output."""
    layers = _tuner_layers(denoiser)
    for m in layers:
        m.enable_adapters(False)
    try:
        yield denoiser
    finally:
        for m in layers:
            m.enable_adapters(True)


def _diffusers_metadata(weights: dict, cfg: LoraConfig) -> dict[str, str]:
    """safetensors header for diffusers' loaders: per component (``transformer``, ``unet``) the
    rank, alpha, dropout and the exact module paths adapted (so alpha / rank is honoured)."""
    meta: dict[str, object] = {}
    for key in weights:
        if ".lora_A." not in key:
            continue
        component, module = key.split(".lora_A.")[0].split(".", 1)
        meta.setdefault(f"{component}.r", cfg.r)
        meta.setdefault(f"{component}.lora_alpha", cfg.lora_alpha)
        meta.setdefault(f"{component}.lora_dropout", cfg.lora_dropout)
        meta.setdefault(f"{component}.target_modules", []).append(module)
    return {"format": "pt", "lora_adapter_metadata": json.dumps(meta, sort_keys=True)}


def save_lora(
    denoiser: nn.Module, path: str | Path, metadata: dict | None = None, state_dict: dict | None = None
) -> Path:
    """Write the adapter (diffusers layout, safetensors) to directory ``path`` atomically.
    ``state_dict``: the denoiser's parameters by name to save instead of its own (e.g. the LoRA
    gathered to full tensors from an FSDP2-sharded denoiser)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = get_peft_model_state_dict(denoiser, state_dict=state_dict)
    if not sd:
        raise ValueError("save_lora: the denoiser has no LoRA weights to save")
    cfg = denoiser.lora_config
    prefix = getattr(denoiser, "lora_key_prefix", PREFIX)
    weights = {prefix + k: v.detach().contiguous().cpu() for k, v in sd.items()}
    with atomic_directory(path) as tmp:
        save_file(weights, str(tmp / LORA_WEIGHTS), metadata=_diffusers_metadata(weights, cfg))
        conf = {
            "r": cfg.r,
            "lora_alpha": cfg.lora_alpha,
            "lora_dropout": cfg.lora_dropout,
            "target_modules": sorted(cfg.target_modules),
            **getattr(denoiser, "lora_metadata", {}),
            **(metadata or {}),
        }
        (tmp / LORA_CONFIG).write_text(json.dumps(conf, indent=2))
    return path


def load_lora(denoiser: nn.Module, path: str | Path) -> nn.Module:
    """Attach (if needed) and load a LoRA saved by ``save_lora`` into ``denoiser``."""
    path = Path(path)
    wfile, cfile = path / LORA_WEIGHTS, path / LORA_CONFIG
    for f in (wfile, cfile):
        if not f.is_file():
            raise FileNotFoundError(f"{f}: not found; is {path} a vidalign LoRA directory?")
    conf = json.loads(cfile.read_text())
    for key, value in getattr(denoiser, "lora_metadata", {}).items():  # e.g. which Wan 2.2 expert it adapts
        if key in conf and conf[key] != value:
            raise ValueError(f"{cfile}: LoRA trained with {key}={conf[key]!r}, this denoiser has {key}={value!r}")
    if not _tuner_layers(denoiser):
        attach_lora(denoiser, conf["r"], conf["lora_alpha"], conf.get("lora_dropout", 0.0), conf["target_modules"])
    prefix = getattr(denoiser, "lora_key_prefix", PREFIX)
    sd = {k.removeprefix(prefix): v for k, v in load_file(str(wfile)).items()}
    result = set_peft_model_state_dict(denoiser, sd)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"{wfile}: keys do not match this denoiser, e.g. {unexpected[:3]}")
    return denoiser
