"""Videos as tensors and as frames: the two conventions of the core interfaces, and the
conversions between them.

- Model-side videos are float torch tensors ``(B, C, T, H, W)`` (or ``(C, T, H, W)``) in [-1, 1].
- File-side videos are numpy ``uint8`` arrays ``(T, H, W, 3)`` (RGB), batches ``(B, T, H, W, 3)``.

This module sits below the data, model and sampling layers, which all convert.
"""

from __future__ import annotations

import numpy as np
import torch


def to_uint8(videos: torch.Tensor | np.ndarray) -> np.ndarray:
    """Float videos in [-1, 1] as uint8 frames, channels last.

    ``(B, C, T, H, W)`` becomes ``(B, T, H, W, C)``; ``(C, T, H, W)`` becomes ``(T, H, W, C)``.
    Values outside [-1, 1] are clamped. Raises ``ValueError`` on a wrong rank or on NaNs (a NaN
    video is a bug upstream, e.g. a diverged model, and must not silently turn into grey frames).
    """
    x = torch.as_tensor(videos).detach()
    if x.ndim not in (4, 5):
        raise ValueError(f"expected videos (B, C, T, H, W) or (C, T, H, W), got shape {tuple(x.shape)}")
    x = x.float()
    n_nan = int(torch.isnan(x).sum())
    if n_nan:
        raise ValueError(f"videos contain {n_nan} NaN value(s) out of {x.numel()}")
    x = x.clamp(-1.0, 1.0).add(1.0).mul(127.5).round().to(torch.uint8)
    return x.movedim(-4, -1).cpu().numpy()  # channels (dim -4) last


def from_uint8(frames: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Uint8 frames as a float32 tensor in [-1, 1], channels first (the inverse of :func:`to_uint8`).

    ``(T, H, W, C)`` becomes ``(C, T, H, W)``; ``(B, T, H, W, C)`` becomes ``(B, C, T, H, W)``.
    """
    x = torch.as_tensor(np.ascontiguousarray(frames)) if isinstance(frames, np.ndarray) else torch.as_tensor(frames)
    if x.dtype != torch.uint8:
        raise ValueError(f"expected uint8 frames, got {x.dtype}")
    if x.ndim not in (4, 5):
        raise ValueError(f"expected frames (T, H, W, C) or (B, T, H, W, C), got shape {tuple(x.shape)}")
    return x.float().div(127.5).sub(1.0).movedim(-1, -4).contiguous()
