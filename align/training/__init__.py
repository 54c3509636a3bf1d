"""Alignment training: a shared core and one module per objective family.

``OBJECTIVES`` maps a recipe's ``objective`` to its config dataclass and train function.
Adding an objective means adding one module (its config, subclassing ``core.TrainConfig``,
and a ``train(cfg) -> run_dir``) and one line here.
"""

from __future__ import annotations

from pathlib import Path

from align.config import load_config
from align.training import dpo, grpo, rwr
from align.training.core import TrainConfig, load_aligned

OBJECTIVES = {
    "dpo": (dpo.DPOConfig, dpo.train),
    "rwr": (rwr.RWRConfig, rwr.train),
    "grpo": (grpo.GRPOConfig, grpo.train),
}

__all__ = ["OBJECTIVES", "TrainConfig", "build_config", "load_aligned", "load_train_config", "train"]


def _config_class(objective: str, source: str) -> type:
    if objective not in OBJECTIVES:
        raise ValueError(f"{source}: unknown objective {objective!r}; choose one of {sorted(OBJECTIVES)}")
    return OBJECTIVES[objective][0]


def build_config(**values) -> TrainConfig:
    """The config of ``objective`` (default ``dpo``) built from the keyword arguments."""
    return _config_class(values.get("objective", "dpo"), "config")(**values)


def load_train_config(recipe: str | Path | None, overrides: list[str] | dict | None = None) -> TrainConfig:
    """A recipe YAML plus ``--key value`` overrides, as the config of the recipe's ``objective``
    (an override may change it); unknown keys are errors naming the key and the file."""
    import yaml

    from align.config import parse_overrides

    objective = "dpo"
    if recipe is not None and Path(recipe).is_file():
        try:
            loaded = yaml.safe_load(Path(recipe).read_text())
        except yaml.YAMLError:
            loaded = None  # load_config reports it with the file named
        if isinstance(loaded, dict):
            objective = loaded.get("objective", objective)
    over = parse_overrides(overrides) if isinstance(overrides, list) else dict(overrides or {})
    objective = over.get("objective", objective)
    return load_config(_config_class(objective, str(recipe or "command line")), recipe, over)


def train(cfg: TrainConfig) -> Path:
    """Train with the module of ``cfg.objective``; returns the run directory."""
    return OBJECTIVES[cfg.objective][1](cfg)
