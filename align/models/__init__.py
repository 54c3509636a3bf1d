"""Video diffusion models that implement the `VideoDiffusionModel` protocol."""

from __future__ import annotations

from pathlib import Path


def default_device() -> str:
    """``cuda`` when a GPU is visible, else ``cpu``."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(path: str | Path, device="cpu", **options):
    """Load a generator: a TinySora directory (``config.json`` + safetensors written by
    ``vidalign pretrain``), a cascade directory (``cascade.json``: a TinySora base and its
    super-resolution stages, or an LTX pipeline and its latent upsampler; ``align.models.cascade``),
    or a diffusers video pipeline by local directory (with ``model_index.json``) or Hugging Face
    Hub id (``owner/name``), through ``align.models.diffusers.load_diffusers_model`` (``options``
    go to it: dtype, num_frames, height, width, gradient_checkpointing, ...)."""
    from align.models.cascade import is_cascade_dir
    from align.models.tiny_sora import TinySora

    name = str(path)
    path = Path(path)
    if is_diffusers_source(path):
        from align.models.diffusers import load_diffusers_model

        return load_diffusers_model(name, device=device, **options)
    if not path.is_dir():
        raise FileNotFoundError(
            f"model {path}: no such directory (train one with `vidalign pretrain`, or give a diffusers "
            "pipeline directory or Hub id such as Wan-AI/Wan2.1-T2V-1.3B-Diffusers)"
        )
    if is_cascade_dir(path):  # cascade.json: a base and its later stages (align.models.cascade)
        return _load_cascade(path, device, options)
    if not (path / "vae.safetensors").is_file():
        raise ValueError(
            f"model {path}: not a supported model directory (expected a TinySora checkpoint, "
            "or a diffusers pipeline with model_index.json)"
        )
    if options:
        raise ValueError(f"model {path}: TinySora takes no model options, got {sorted(options)}")
    return TinySora.from_pretrained(path, device=device)


def _load_cascade(path: Path, device, options: dict):
    """A cascade directory: the tiny base with its super-resolution stages, or a diffusers LTX
    pipeline with its latent upsampler (``cascade.json``'s ``upsampler``; ``options`` over its own)."""
    from align.models.cascade import Cascade, read_cascade_config, resolve_near

    spec = read_cascade_config(path)
    if "upsampler" in spec:
        from align.models.diffusers import load_diffusers_model

        kw = {**spec.get("options", {}), **options, "cascade": resolve_near(path, spec["upsampler"])}
        return load_diffusers_model(resolve_near(path, spec["base"]), device=device, **kw)
    if options:
        raise ValueError(f"model {path}: the tiny cascade takes no model options, got {sorted(options)}")
    return Cascade.from_pretrained(path, device=device)


def is_diffusers_source(path: str | Path) -> bool:
    """Whether ``path`` names a diffusers pipeline: a local directory with ``model_index.json``,
    or (no such local path) a Hugging Face Hub id."""
    return (Path(path) / "model_index.json").is_file() or (not Path(path).exists() and _looks_like_hub_id(str(path)))


def _looks_like_hub_id(name: str) -> bool:
    from align.models.diffusers import looks_like_hub_id

    return looks_like_hub_id(name)
