"""Video diffusion models that implement the `VideoDiffusionModel` protocol."""

from __future__ import annotations

from pathlib import Path


def load_model(path: str | Path, device="cpu"):
    """Load a generator from a local directory. Today: TinySora directories
    (``config.json`` + safetensors written by ``vidalign pretrain``)."""
    from align.models.tiny_sora import TinySora

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model {path}: no such directory (train one with `vidalign pretrain`)")
    if not (path / "vae.safetensors").is_file():
        raise ValueError(f"model {path}: not a supported model directory (expected a TinySora checkpoint)")
    return TinySora.from_pretrained(path, device=device)
