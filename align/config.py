"""Config dataclasses parsed from a recipe YAML and ``--key value`` overrides by TRL's parser.

A recipe's keys are exactly the fields of one config dataclass, each with ``help`` metadata.
``load_config(cls, recipe, overrides)`` parses them with :class:`RecipeParser`, a
``trl.TrlParser`` (itself transformers' ``HfArgumentParser``, an ``argparse`` parser):

- TrlParser reads the recipe (``--config recipe.yaml``): its ``env:`` block sets environment
  variables, its other keys become the parser's defaults (``set_defaults_with_config``);
- argparse parses the command line over them (``--key value``, ``--key=value``; ``--key-name``
  is ``--key_name``; a bare ``--flag`` is true), so the command line wins over the recipe;
- HfArgumentParser builds the dataclass from the result, so every ``__post_init__`` check runs.

TrlParser is used whole (TRL ships its own copy of transformers' HfArgumentParser under it):
it lacks nothing that transformers' parser has; what RecipeParser changes is below.

``config_help(cls, recipe)`` is the parser's argparse help: every key with its type, help text
and default (the recipe's value where it sets one); ``vidalign train RECIPE --help`` prints it.

What RecipeParser changes in HfArgumentParser, and why:

- One ``--key`` per field, its string converted by ``_coerce``, the rule a YAML value follows
  too, in place of HfArgumentParser's per-type rules: those cannot take a bare ``list`` or
  ``dict`` (our judge specs, LoRA targets, model options), read ``list[X]`` as several tokens
  and keep ``none`` as a string for ``str | None``. Here a list is ``a,b`` or ``[a, b]``, a
  dict ``{k: v}`` (both YAML), ``none`` / ``null`` is None for an optional key, and a
  ``Literal`` key lists its choices. No ``--key-name`` aliases: the dashes are turned into
  underscores before parsing (``override_args``), so the help lists each key once.
- The recipe's values are checked before they become defaults, so an unknown key (with the
  closest one) or a value of the wrong type is an error naming the key and the file; unknown
  and missing keys are checked before parsing, with the file or "command line" named.
- A bad command line (a value of the wrong type, a key without its value, a value without its
  key) raises ``ValueError`` naming the key instead of printing usage and exiting; argparse's
  abbreviations (``--lr`` for ``--lr_warmup_steps``) and HfArgumentParser's ``<script>.args``
  file are off. TrlParser's other abilities are kept: ``env:``, and ``--help`` among the
  overrides prints the help and exits, as argparse does.

A dict of overrides (the demo, tests) is the command line it stands for: ``{"beta": 500}`` is
``--beta=500`` (non-string values written as JSON, which the YAML reading of a value accepts).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from trl import TrlParser

REQUIRED = dataclasses.MISSING
CLI = "command line"
YAML_BOOLEANS = " (YAML reads unquoted yes / no / on / off as true / false: quote it)"


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


def type_name(tp: Any) -> str:
    """How a field's type reads in help and errors: ``int``, ``list``, ``str|None``, ``no|fp16|bf16``."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "|".join(str(choice) for choice in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return "|".join("None" if a is type(None) else type_name(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _int(value: Any) -> int:
    """``7``, ``"7"``, ``7.0``, ``"1e3"`` as an int; ``2.5`` or ``"lots"`` is a ValueError."""
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            value = float(value)
    if isinstance(value, float) and not value.is_integer():
        raise ValueError(value)
    return int(value)


def _coerce(value: Any, tp: Any) -> Any:
    """``value`` (a YAML value or a command-line string) as field type ``tp``; a ValueError says
    what was expected (the caller names the key and the source)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):  # X | None
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(value, next(a for a in typing.get_args(tp) if a is not type(None)))
    if origin is Literal:
        if value not in typing.get_args(tp):
            hint = YAML_BOOLEANS if isinstance(value, bool) else ""
            raise ValueError(f"must be one of {type_name(tp).replace('|', ' | ')}, got {value!r}{hint}")
        return value
    if tp in (list, dict) or origin in (list, dict):
        base = origin or tp
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value) if value.strip().startswith(("[", "{")) else value.split(",")
            except yaml.YAMLError:
                pass  # left a string: refused below
        if not isinstance(value, base):
            raise ValueError(f"must be a {base.__name__}, got {value!r}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ValueError(f"must be true/false, got {value!r}")
    if tp in (int, float, str):
        try:
            return _int(value) if tp is int else tp(value)
        except (TypeError, ValueError, OverflowError):
            raise ValueError(f"must be {tp.__name__}, got {value!r}") from None
    return value


def check_keys(cls: type, keys: Iterable[str], source: str) -> None:
    """An unknown key is an error naming ``source`` and the closest field of dataclass ``cls``."""
    fields = [f.name for f in dataclasses.fields(cls)]
    for key in keys:
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"{source}: unknown key {key!r} for {cls.__name__}{hint}")


def coerce_fields(cls: type, mapping: dict, source: str) -> dict[str, Any]:
    """``mapping``'s values converted to the types of dataclass ``cls``'s fields; an unknown key or
    a value of the wrong type is an error naming the key and ``source``."""
    check_keys(cls, mapping, source)
    hints = typing.get_type_hints(cls)
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        try:
            out[key] = _coerce(value, hints[key])
        except ValueError as e:
            raise ValueError(f"{source}: key {key!r} {e}") from None
    return out


def read_recipe(recipe: str | Path) -> dict[str, Any]:
    """A recipe's keys and values; a missing file, bad YAML or a non-mapping is an error naming it."""
    path = Path(recipe)
    if not path.is_file():
        raise FileNotFoundError(f"recipe {recipe}: no such file")
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{recipe}: not valid YAML: {e}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ValueError(f"{recipe}: a recipe must be a mapping of config keys, got {type(loaded).__name__}")
    return loaded


def _as_text(value: Any) -> str:
    """A value as its command-line string: a string or a path as it is, anything else as JSON."""
    return str(value) if isinstance(value, (str, os.PathLike)) else json.dumps(value, default=str)


def override_args(overrides: list[str] | dict | None) -> list[str]:
    """Overrides as command-line arguments: a list is one already (``--max-steps`` becomes
    ``--max_steps``); a dict ``{key: value}`` becomes ``--key=value``, a value that is not a string
    or a path written as JSON."""
    if isinstance(overrides, dict):
        return [f"--{k}={_as_text(v)}" for k, v in overrides.items()]
    out = []
    for arg in overrides or []:
        key, eq, value = arg[2:].partition("=")
        out.append(f"--{key.replace('-', '_')}{eq}{value}" if arg.startswith("--") else arg)
    return out


def arg_keys(args: list[str]) -> list[str]:
    """The keys that command-line arguments (from ``override_args``) set, ``--help`` left out."""
    keys = [arg[2:].partition("=")[0] for arg in args if arg.startswith("--")]
    return [k for k in keys if k != "help"]


def _converter(tp: Any):
    """argparse's ``type=`` for a field of type ``tp``: ``_coerce`` of the command-line string."""

    def convert(text: str) -> Any:
        try:
            return _coerce(text, tp)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    convert.__name__ = type_name(tp)
    return convert


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's help with each key's default; a key with none (in the dataclass or the recipe)
    says "required"."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.required:
            return f"{action.help} (required)"
        if action.default == "":
            return f'{action.help} (default: "")'
        return super()._get_help_string(action)


class RecipeParser(TrlParser):
    """TrlParser over one config dataclass ``cls``; what it changes is in the module docstring.
    ``source`` (the recipe's path) is what errors about the recipe's values name."""

    def __init__(self, cls: type, source: str = "recipe", prog: str | None = None):
        self.source = source
        doc = (cls.__doc__ or "").strip()
        kwargs = {"usage": "%(prog)s [--key value ...]", "description": doc, "formatter_class": HelpFormatter}
        super().__init__(cls, prog=prog, allow_abbrev=False, exit_on_error=False, **kwargs)

    @staticmethod
    def _parse_dataclass_field(parser: argparse.ArgumentParser, field: dataclasses.Field) -> None:
        """One ``--key`` for one field (``field.type`` resolved by HfArgumentParser)."""
        tp = field.type
        help_text = field.metadata.get("help", "").replace("%", "%%")  # argparse %-formats help
        kwargs: dict[str, Any] = {"type": _converter(tp), "metavar": type_name(tp), "help": help_text}
        if typing.get_origin(tp) is Literal:
            kwargs["choices"] = typing.get_args(tp)
        if tp is bool:
            kwargs |= {"nargs": "?", "const": True}  # a bare --flag is true
        if field.default is not REQUIRED:
            kwargs["default"] = field.default
        elif field.default_factory is not REQUIRED:
            kwargs["default"] = field.default_factory()
        else:
            kwargs |= {"required": True, "default": argparse.SUPPRESS}
        parser.add_argument(f"--{field.name}", **kwargs)

    def set_defaults_with_config(self, **values: Any) -> list[str]:
        """The recipe's values (TrlParser hands them over without its ``env:`` block), checked and
        converted to the fields' types, become the parser's defaults."""
        return super().set_defaults_with_config(**coerce_fields(self.dataclass_types[0], values, self.source))

    def parse_args_into_dataclasses(self, args=None, return_remaining_strings=False, **_ignored):
        """HfArgumentParser's, without reading a ``<script>.args`` file: a run is its recipe and its
        command line."""
        return super().parse_args_into_dataclasses(args, return_remaining_strings, look_for_args_file=False)

    def parse_known_args(self, args=None, namespace=None):
        """argparse's, with a bad value a ValueError naming the key (argparse would exit), and an
        argument left over (a value without its ``--key``) an error too."""
        try:
            namespace, rest = super().parse_known_args(args, namespace)
        except argparse.ArgumentError as e:  # a value _coerce refused, or a key without its value
            if e.argument_name is None:
                raise ValueError(f"{CLI}: {e.message}") from None
            key = e.argument_name.split("/")[0].lstrip("-")
            raise ValueError(f"{CLI}: key {key!r} {e.message}") from None
        if rest:
            raise ValueError(f"{CLI}: expected --key value, got {rest[0]!r}")
        return namespace, rest

    def error(self, message: str) -> typing.NoReturn:
        """Any other bad command line is a ValueError too, not argparse's usage-and-exit."""
        raise ValueError(f"{CLI}: {message}")


def load_config(cls: type, recipe: str | Path | None = None, overrides: list[str] | dict | None = None) -> Any:
    """Config ``cls`` from a YAML recipe (the defaults) and overrides (``["--key", "value", ...]``
    as on the command line, or ``{key: value}``), parsed by :class:`RecipeParser`. Unknown and
    missing keys and values of the wrong type are errors naming the key and where it came from.
    ``--help`` among the overrides prints ``config_help`` and exits, as argparse does."""
    source = "recipe" if recipe is None else str(recipe)
    values = {} if recipe is None else read_recipe(recipe)  # for the errors below; TrlParser reads it itself
    args = override_args(overrides)
    check_keys(cls, [k for k in values if k != "env"], source)  # env: TrlParser's environment variables
    check_keys(cls, arg_keys(args), CLI)
    given = {*values, *arg_keys(args)}
    fields = dataclasses.fields(cls)
    missing = [
        f.name for f in fields if f.default is REQUIRED and f.default_factory is REQUIRED and f.name not in given
    ]
    if missing:
        raise ValueError(f"{source}: missing required key(s) {missing} for {cls.__name__}")
    config = ["--config", str(recipe)] if values else []
    (cfg,) = RecipeParser(cls, source).parse_args_and_config([*config, *args])
    return cfg


def config_help(cls: type, recipe: str | Path | None = None, prog: str | None = None) -> str:
    """Every key of config ``cls`` with its type, help text and default (the recipe's value where
    it sets one): the help of the parser that reads the recipe."""
    parser = RecipeParser(cls, str(recipe or "recipe"), prog=prog)
    if recipe is not None:
        values = read_recipe(recipe)
        values.pop("env", None)
        parser.set_defaults_with_config(**values)
    return parser.format_help()


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write the resolved config as YAML."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
    return path
