"""Video diffusion models that implement the `VideoDiffusionModel` protocol."""

from __future__ import annotations

from pathlib import Path


def default_device() -> str:
    """``cuda`` when a GPU is visible, else ``cpu``."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(path: str | Path, device="cpu", **options):
    """Load a generator: a TinySora directory (``config.json`` + safetensors written by
    ``vidalign pretrain``), or a diffusers video pipeline by local directory (with
    ``model_index.json``) or Hugging Face Hub id (``owner/name``), through
    ``align.models.diffusers.load_diffusers_model`` (``options`` go to it: dtype,
    num_frames, height, width, gradient_checkpointing, ...)."""
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
    if not (path / "vae.safetensors").is_file():
        raise ValueError(
            f"model {path}: not a supported model directory (expected a TinySora checkpoint, "
            "or a diffusers pipeline with model_index.json)"
        )
    if options:
        raise ValueError(f"model {path}: TinySora takes no model options, got {sorted(options)}")
    return TinySora.from_pretrained(path, device=device)


def is_diffusers_source(path: str | Path) -> bool:
    """Whether ``path`` names a diffusers pipeline: a local directory with ``model_index.json``,
    or (no such local path) a Hugging Face Hub id."""
    return (Path(path) / "model_index.json").is_file() or (not Path(path).exists() and _looks_like_hub_id(str(path)))


def _looks_like_hub_id(name: str) -> bool:
    from align.models.diffusers import looks_like_hub_id

    return looks_like_hub_id(name)
