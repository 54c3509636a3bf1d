"""Dataclass configs, parsed from a recipe YAML plus ``--key value`` CLI overrides.

A recipe's keys are exactly the fields of one config dataclass. Unknown keys, missing
required keys and values of the wrong type are errors that name the key and the file.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REQUIRED = dataclasses.MISSING


@dataclass
class PretrainConfig:
    """Pretraining of the tiny Sora model on the synthetic world (VAE, then denoiser)."""

    output_dir: str = field(
        default="runs/pretrained/tiny_sora", metadata={"help": "where the pretrained model is written"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the synthetic data and of training"})
    model: dict = field(default_factory=dict, metadata={"help": "TinySoraConfig overrides"})
    num_videos: int = field(default=4096, metadata={"help": "synthetic training videos"})
    vae_steps: int = field(default=700, metadata={"help": "VAE training steps"})
    vae_batch_size: int = field(default=16, metadata={"help": "VAE batch size"})
    vae_lr: float = field(default=3e-3, metadata={"help": "VAE learning rate"})
    kl_weight: float = field(default=1e-4, metadata={"help": "VAE KL weight"})
    denoiser_steps: int = field(default=1600, metadata={"help": "denoiser training steps"})
    denoiser_batch_size: int = field(default=32, metadata={"help": "denoiser batch size"})
    denoiser_lr: float = field(default=2e-3, metadata={"help": "denoiser learning rate"})
    cond_dropout: float = field(
        default=0.1, metadata={"help": 'share of prompts replaced by "" (for classifier-free guidance)'}
    )
    ema_decay: float = field(default=0.0, metadata={"help": "0 = no EMA"})


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Convert ``value`` (a YAML value or a CLI string) to the field type ``tp``."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(value, args[0], key, source)
    if tp in (list, dict) or origin in (list, dict):
        base = origin or tp
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith(("[", "{")) else value.split(",")
        if not isinstance(value, base):
            raise ValueError(f"{source}: key {key!r} must be a {base.__name__}, got {value!r}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ValueError(f"{source}: key {key!r} must be true/false, got {value!r}")
    if tp in (int, float, str):
        try:
            if tp is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            return tp(float(value)) if tp is int and isinstance(value, str) and "e" in value.lower() else tp(value)
        except (TypeError, ValueError):
            raise ValueError(f"{source}: key {key!r} must be {tp.__name__}, got {value!r}") from None
    return value


def parse_overrides(args: list[str]) -> dict[str, str]:
    """``["--beta", "500", "--name=x"] -> {"beta": "500", "name": "x"}`` (dashes become underscores)."""
    out: dict[str, str] = {}
    i = 0
    while i < len(args):
        a = args[i]
        if not a.startswith("--"):
            raise ValueError(f"expected --key value, got {a!r}")
        if "=" in a:
            k, v = a[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ValueError(f"override {a} has no value")
            k, v = a[2:], args[i + 1]
            i += 2
        out[k.replace("-", "_")] = v
    return out


def coerce_fields(cls: type, mapping: dict, source: str) -> dict[str, Any]:
    """``mapping``'s values converted to the types of dataclass ``cls``'s fields; an unknown key
    is an error naming ``source`` and the closest field."""
    fields = [f.name for f in dataclasses.fields(cls)]
    hints = typing.get_type_hints(cls)
    out: dict[str, Any] = {}
    for k, v in mapping.items():
        if k not in fields:
            close = difflib.get_close_matches(k, fields, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"{source}: unknown key {k!r} for {cls.__name__}{hint}")
        out[k] = _coerce(v, hints[k], k, source)
    return out


def load_config(cls: type, recipe: str | Path | None = None, overrides: list[str] | dict | None = None):
    """Build config ``cls`` from a YAML recipe and CLI overrides, with errors that name the key."""
    values: dict[str, Any] = {}
    source = "recipe"
    if recipe is not None:
        source = str(recipe)
        path = Path(recipe)
        if not path.is_file():
            raise FileNotFoundError(f"recipe {recipe}: no such file")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ValueError(f"{recipe}: not valid YAML: {e}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{recipe}: a recipe must be a mapping of config keys, got {type(loaded).__name__}")
        values.update(loaded)
    over = parse_overrides(overrides) if isinstance(overrides, list) else dict(overrides or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    out = {**coerce_fields(cls, values, source), **coerce_fields(cls, over, "command line")}
    missing = [n for n, f in fields.items() if f.default is REQUIRED and f.default_factory is REQUIRED and n not in out]
    if missing:
        raise ValueError(f"{source}: missing required key(s) {missing} for {cls.__name__}")
    return cls(**out)


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write the resolved config as YAML."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
    return path
