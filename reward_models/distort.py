"""Generic video distortions, used as negatives when pretraining a reward backbone.

A CLIP backbone trained only on (clip, caption) pairs learns what tells captions apart —
colour names, shapes, directions — and becomes *invariant* to how well a clip shows them:
a blurry, jittery, off-colour clip of "a red square moving left" embeds like a clean one.
A reward model has to rank exactly those differences. As in synthetic-distortion
pretraining of quality models (RankIQA, CONTRIQUE), ``distort`` makes a worse copy of each
clip with one generic distortion, and ``contrastive_pretrain(..., distortions=...)``
adds the copies as extra negatives of each caption: the caption must match its clean clip
better than the distorted one.

The distortions know nothing about the oracle judge; they assume only a static background
(estimated as the median of the frame borders), which holds for the synthetic world:

- ``blur``: Gaussian blur, sigma 0.8-2 px;
- ``colour``: the foreground (pixels away from the background) recoloured by a random RGB
  shift of 50-120;
- ``jitter``: each frame shifted by up to 2 px;
- ``slow``: frames drawn again in order (repeats and skips: stutter), or half speed;
- ``flicker``: the foreground faded towards the background by a random amount per frame;
- ``noise``: Gaussian pixel noise, sigma 8-25.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

DISTORTIONS: tuple[str, ...] = ("blur", "colour", "jitter", "slow", "flicker", "noise")


def _blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of (T, H, W, 3) float frames, edges replicated."""
    T, H, W, _ = x.shape
    r = np.arange(-4, 5)
    g = np.exp(-(r**2) / (2 * sigma * sigma))
    k = torch.tensor(g / g.sum(), dtype=torch.float32).view(1, 1, 1, -1)
    t = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).reshape(T * 3, 1, H, W)
    t = F.conv2d(F.conv2d(F.pad(t, (4, 4, 4, 4), mode="replicate"), k), k.transpose(-1, -2))
    return t.reshape(T, 3, H, W).permute(0, 2, 3, 1).numpy()


def check_distortions(kinds: Sequence[str]) -> None:
    """Raise a ValueError naming any unknown distortion (or an empty list)."""
    unknown = sorted(set(kinds) - set(DISTORTIONS))
    if unknown or not kinds:
        raise ValueError(f"distort: unknown distortions {unknown or list(kinds)}; choose from {list(DISTORTIONS)}")


def distort(
    videos: np.ndarray,
    rng: np.random.Generator,
    kinds: Sequence[str] = DISTORTIONS,
) -> np.ndarray:
    """A distorted copy of each uint8 clip ``(N, T, H, W, 3)``: one distortion drawn from
    ``kinds`` per clip. Deterministic given ``rng``'s state."""
    videos = np.asarray(videos)
    if videos.ndim != 5 or videos.shape[-1] != 3 or videos.dtype != np.uint8:
        raise ValueError(f"distort: expected uint8 videos (N, T, H, W, 3), got {videos.dtype} {videos.shape}")
    check_distortions(kinds)
    out = videos.astype(np.float32)
    for i in range(len(out)):
        out[i] = _distort_one(out[i], kinds[rng.integers(len(kinds))], rng)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def _distort_one(x: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """One distortion of one float clip (T, H, W, 3)."""
    T = x.shape[0]
    border = np.concatenate([x[:, 0], x[:, -1], x[:, :, 0], x[:, :, -1]], axis=1).reshape(-1, 3)
    bg = np.median(border, axis=0)
    if kind == "blur":
        return _blur(x, rng.uniform(0.8, 2.0))
    if kind == "colour":
        dist = np.linalg.norm(x - bg, axis=-1)  # (T, H, W): how far each pixel is from the background
        fg = x[np.unravel_index(dist.argmax(), dist.shape)]
        alpha = np.clip(dist / (np.linalg.norm(fg - bg) + 1e-6), 0, 1)[..., None]
        shift = rng.normal(size=3)
        new_fg = np.clip(fg + shift / np.linalg.norm(shift) * rng.uniform(50, 120), 0, 255)
        return bg + alpha * (new_fg - bg)
    if kind == "jitter":
        return np.stack([np.roll(f, tuple(rng.integers(-2, 3, size=2)), axis=(0, 1)) for f in x])
    if kind == "slow":  # frames resampled in order, or half speed from a random start
        if rng.random() < 0.5:
            return x[np.sort(rng.integers(0, T, size=T))]
        return x[np.minimum(np.arange(T) // 2 + rng.integers(0, T // 2 + 1), T - 1)]
    if kind == "flicker":
        return bg + rng.uniform(0.2, 1.0, size=(T, 1, 1, 1)) * (x - bg)
    if kind == "noise":
        return x + rng.normal(0, rng.uniform(8, 25), size=x.shape)
    raise ValueError(f"distort: unknown distortion {kind!r}")
