"""Finding a diffusers pipeline (local directory or Hub id), its family and dtype.

Nothing here knows the adapter classes (``base.py`` and the family modules), so every module
of the package can import it."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

# diffusers pipeline class (``_class_name`` in model_index.json) -> vidalign family
PIPELINE_FAMILIES = {
    "WanPipeline": "wan",
    "CogVideoXPipeline": "cogvideox",
    "LTXPipeline": "ltx",
    "AnimateDiffPipeline": "animatediff",
    "StableDiffusionPipeline": "animatediff",  # an image model; needs motion_adapter=<id or path>
    "HunyuanVideoPipeline": "hunyuan",
}
FAMILIES = ("wan", "cogvideox", "ltx", "animatediff", "hunyuan")  # the vidalign families, in the order they are listed

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def looks_like_hub_id(name: str) -> bool:
    """``owner/name`` with Hub-legal characters (a local path that does not exist may look like one)."""
    return bool(_HUB_ID.match(name)) and ".." not in name


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
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


@contextmanager
def pipeline_load_errors(source: str, family: str) -> Iterator[None]:
    """Turn what diffusers raises for a missing or broken pipeline into one FileNotFoundError naming it."""
    try:
        yield
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"model {source}: could not load the {family} pipeline ({e})") from e
