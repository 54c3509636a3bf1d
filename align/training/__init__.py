"""Alignment training: a shared core and one module per objective family.

``OBJECTIVES`` maps a recipe's ``objective`` to its config dataclass and train function.
Adding an objective means adding one module (its config, subclassing ``core.TrainConfig``,
and a ``train(cfg) -> run_dir``) and one line here. A recipe is parsed by TRL's parser into the
config of its ``objective`` (``align.config``); ``recipe_help`` lists that config's keys.
"""

from __future__ import annotations

from pathlib import Path

from align.config import config_help, load_config, override_args, read_recipe
from align.training import dpo, grpo, nft, rwr
from align.training.core import TrainConfig, load_aligned

OBJECTIVES = {
    "dpo": (dpo.DPOConfig, dpo.train),
    "rwr": (rwr.RWRConfig, rwr.train),
    "grpo": (grpo.GRPOConfig, grpo.train),
    "nft": (nft.NFTConfig, nft.train),
}

__all__ = ["OBJECTIVES", "TrainConfig", "build_config", "load_aligned", "load_train_config", "recipe_help", "train"]


def _config_class(objective: str, source: str) -> type:
    if objective not in OBJECTIVES:
        raise ValueError(f"{source}: unknown objective {objective!r}; choose one of {sorted(OBJECTIVES)}")
    return OBJECTIVES[objective][0]


def build_config(**values) -> TrainConfig:
    """The config of ``objective`` (default ``dpo``) built from the keyword arguments."""
    return _config_class(values.get("objective", "dpo"), "config")(**values)


def _objective(recipe: str | Path | None, overrides: list[str] | dict | None) -> str:
    """The run's objective: the last ``--objective`` of the overrides, else the recipe's, else dpo."""
    objective = "dpo" if recipe is None else read_recipe(recipe).get("objective", "dpo")
    args = override_args(overrides)
    for i, arg in enumerate(args):
        if arg == "--objective" and i + 1 < len(args):
            objective = args[i + 1]
        elif arg.startswith("--objective="):
            objective = arg.partition("=")[2]
    return objective


def load_train_config(recipe: str | Path | None, overrides: list[str] | dict | None = None) -> TrainConfig:
    """A recipe YAML plus ``--key value`` overrides (a list as on the command line, or a dict), as
    the config of the recipe's ``objective`` (an override may change it), parsed by TRL's parser;
    unknown keys are errors naming the key, the file (or "command line") and the closest key."""
    cls = _config_class(_objective(recipe, overrides), str(recipe or "command line"))
    return load_config(cls, recipe, overrides)


def recipe_help(recipe: str | Path | None) -> str:
    """``vidalign train RECIPE --help``: every key of the config of the recipe's objective, with its
    type, help text and default (the recipe's value where it sets one). Without a recipe: the keys
    every objective shares."""
    if recipe is None:
        return config_help(TrainConfig, None, prog="vidalign train RECIPE")
    cls = _config_class(_objective(recipe, None), str(recipe))
    return config_help(cls, recipe, prog=f"vidalign train {recipe}")


def train(cfg: TrainConfig) -> Path:
    """Train with the module of ``cfg.objective``; returns the run directory."""
    return OBJECTIVES[cfg.objective][1](cfg)
