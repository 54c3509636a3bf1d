"""The synthetic world: short clips of one coloured shape moving on a plain background,
their compositional prompts, and an oracle judge that scores a clip against its prompt.

The world stands in for reality in the RLHF demo: a tiny video diffusion model is trained on
it, pairs of its samples are judged by the oracle (the stand-in for a human annotator), the
model is aligned on those preferences, and the oracle measures win rates.

A scene has four attributes and one prompt::

    a {color} {shape} moving {direction} on a {background} background

7 colours x 3 shapes x 4 directions x 3 backgrounds = 252 scenes.

The oracle looks at pixels only (it never sees how a clip was made). ``C(z) = 1 / (1 + z^2)``
is its kernel: 1 for a perfect match, 0.5 one scale away, with a long tail, so that a clip
far from its prompt still gains a little by getting closer. Per frame of a clip:

1. Background. Its colour ``bg`` is the median of the frame's border pixels and its noise
   ``spread`` the median distance of those pixels from ``bg``. Score:
   ``C(d / 30) * C(spread / 40)``, ``d`` the RGB distance from the prompt's background.
2. Foreground. A pixel's coverage is its distance from ``bg`` over the object's distance
   (90% of the frame's peak 3x3-mean distance), clipped to 1, gated off below the noise of
   the background (the gate opens from distance ``8 + 1.6 * spread`` over 32 units); isolated
   speckles are removed (a pixel keeps its mass only if its 8 neighbours hold >= 1 pixel's
   worth). The frame's *presence* ``p`` says it holds one object of plausible size:
   ``1 - exp(-(A / 12)^2)`` for the mask's mass ``A`` (pixels at 32x32), times a penalty for
   blobs over a quarter of the frame. Each object score below is multiplied by ``p``, so a
   missing object scores 0 (never NaN) and a screen-filling blob scores ~0.
3. Colour. The object's colour unmixed from the background (``bg`` + peak distance * the
   mask-weighted mean direction from ``bg``; anti-aliased edges do not bias it).
   Score: ``C(d / 60)``, ``d`` the distance from the prompt's colour (colours are >= 255
   apart, so a wrong colour scores <= 0.05).
4. Shape. From the mask: ``fill`` of its soft bounding box (mass / (width * height), with
   width = sum over columns of the column's max; square 1.0, circle 0.79, triangle 0.56),
   ``offset`` of its centroid below the middle of its rows, over its height (triangles point
   up, so 0.15; 0 for the others), ``log_aspect`` (0 for all three) and ``edge_width``
   (partial-coverage band / total variation: ~0.5 px anti-aliased, > 1 px blurred). Score:
   ``C(max(edge_width - 0.7, 0)) / (1 + ((fill - f*) / 0.12)^2 + ((offset - o*) / 0.06)^2
   + (log_aspect / 0.25)^2)``, targets ``f*``, ``o*`` calibrated on clean renders.

Per clip:

5. Direction. Presence-weighted least-squares velocity ``v`` (px/frame at 32x32) of the
   centroid of the coverage near the mask (ungated, so sub-pixel motion reads smoothly).
   With ``along = v . dir`` and ``cos`` the cosine between ``v`` and ``dir``, score:
   ``(1 + tanh((along - 0.5) / 0.4)) / 2 * ((1 + cos) / 2)^4`` -- 0.92 at 1 px/frame and
   0.99 at 1.5 in the right direction, 0.08 standing still, ~0 the wrong way. (For clips
   longer than 11 frames the speed scale shrinks by ``10 / (T - 1)``, as the shape must
   stay in frame: ``render`` caps its speed likewise.)
6. Smoothness. RMS residual ``r`` (px) of the centroid off that constant-velocity line and
   flicker ``f`` of the coverage's mass (mean |A[t+1] - A[t]| / mean A). Score:
   ``1 / (1 + (r / 0.5)^2 + (f / 0.15)^2)``.

Direction and smoothness are multiplied by the mean presence; the per-frame scores are
averaged over frames. ``total`` is the weighted mean of the five, weights
``ORACLE_WEIGHTS``: background 0.15, color 0.25, shape 0.20, direction 0.25, smoothness 0.15.

Every score is a smooth function of the pixels (soft masks, smooth kernels), so small
improvements of a generated clip move the score and exact ties are rare. Noise (in the
background's spread, the colour, the shape) and blur (in the edge width) cost a little, a
wrong attribute a lot. Lengths scale with ``min(H, W) / 32``, so other frame sizes work.
Scoring is numpy-vectorised over the batch: ~0.7 s per 1000 clips of 8x32x32 on one core.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# -----------------------------------------------------------------------------
# the world's vocabulary

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "magenta": (255, 0, 255),
    "cyan": (0, 255, 255),
    "white": (255, 255, 255),
}
SHAPES: tuple[str, ...] = ("square", "circle", "triangle")
DIRECTIONS: dict[str, tuple[float, float]] = {  # (dx, dy) in image coordinates, y points down
    "left": (-1.0, 0.0),
    "right": (1.0, 0.0),
    "up": (0.0, -1.0),
    "down": (0.0, 1.0),
}
# every shape colour is >= 175 RGB units from every background (the closest: blue on navy)
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "gray": (96, 96, 96),
    "navy": (0, 0, 80),
}

ORACLE_WEIGHTS: dict[str, float] = {
    "background": 0.15,
    "color": 0.25,
    "shape": 0.20,
    "direction": 0.25,
    "smoothness": 0.15,
}

GRAMMAR = "a <color> <shape> moving <direction> on a <background> background"


@dataclass(frozen=True)
class Scene:
    """One scene of the world: what to draw, and the prompt that describes it."""

    color: str
    shape: str
    direction: str
    background: str

    @property
    def prompt(self) -> str:
        """The scene's text prompt; ``parse_prompt`` is its inverse."""
        return f"a {self.color} {self.shape} moving {self.direction} on a {self.background} background"


def parse_prompt(prompt: str) -> Scene:
    """The scene a prompt describes. Case and extra whitespace are ignored; a prompt outside
    the world's grammar or vocabulary is a ValueError that names it."""
    words = str(prompt).lower().split()
    if (
        len(words) != 9
        or words[0] != "a"
        or words[3] != "moving"
        or words[5:7] != ["on", "a"]
        or words[8] != "background"
    ):
        raise ValueError(f"prompt {prompt!r} is not of the form {GRAMMAR!r}")
    color, shape, direction, background = words[1], words[2], words[4], words[7]
    for word, vocab, kind in (
        (color, COLORS, "color"),
        (shape, SHAPES, "shape"),
        (direction, DIRECTIONS, "direction"),
        (background, BACKGROUNDS, "background"),
    ):
        if word not in vocab:
            raise ValueError(f"prompt {prompt!r}: unknown {kind} {word!r} (known: {', '.join(vocab)})")
    return Scene(color, shape, direction, background)


def all_scenes() -> list[Scene]:
    """Every scene of the world (252), in a fixed order: colour, shape, direction, background."""
    return [Scene(*combo) for combo in itertools.product(COLORS, SHAPES, DIRECTIONS, BACKGROUNDS)]


def split_scenes(heldout_fraction: float = 0.2, seed: int = 0) -> tuple[list[Scene], list[Scene]]:
    """A deterministic (train, held-out) split of ``all_scenes()``, both in its order.

    The held-out scenes are unseen *combinations* of words that all appear in training (at
    the default fraction): a test of compositional generalisation."""
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    scenes = all_scenes()
    n_heldout = max(1, int(round(heldout_fraction * len(scenes))))
    heldout_idx = set(np.random.default_rng(seed).permutation(len(scenes))[:n_heldout].tolist())
    train = [s for i, s in enumerate(scenes) if i not in heldout_idx]
    heldout = [s for i, s in enumerate(scenes) if i in heldout_idx]
    return train, heldout


# -----------------------------------------------------------------------------
# rendering


def _coverage(shape: str, x0: np.ndarray, y0: np.ndarray, side: float, size: int) -> np.ndarray:
    """Anti-aliased coverage (T, size, size) in [0, 1] of a shape whose bounding box has
    top-left corner (x0[t], y0[t]) and side ``side`` (pixels).

    Coverage is ``clip(0.5 - signed distance of the pixel centre to the outline, 0, 1)``
    (exact for the square), so it changes smoothly as the shape moves by sub-pixels."""
    centres = np.arange(size) + 0.5
    px = centres[None, None, :] - x0[:, None, None]  # (T, 1, W) position within the box
    py = centres[None, :, None] - y0[:, None, None]  # (T, H, 1)
    if shape == "square":
        cover_x = np.clip(np.minimum(px, side - px) + 0.5, 0.0, 1.0)
        cover_y = np.clip(np.minimum(py, side - py) + 0.5, 0.0, 1.0)
        return cover_x * cover_y
    if shape == "circle":
        r = side / 2
        return np.clip(r + 0.5 - np.sqrt((px - r) ** 2 + (py - r) ** 2), 0.0, 1.0)
    if shape == "triangle":  # apex at the top centre, base along the bottom: |px - side/2| <= py/2
        slant = (np.abs(px - side / 2) - py / 2) / np.sqrt(1.25)
        return np.clip(0.5 - np.maximum(slant, py - side), 0.0, 1.0)
    raise ValueError(f"unknown shape {shape!r}")


def render(scene: Scene, rng: np.random.Generator, num_frames: int = 8, size: int = 32) -> np.ndarray:
    """One clip of a scene, uint8 (T, H, W, 3).

    The shape's side is 8-12 px and its speed 1.5-2.5 px/frame along the prompt's direction
    (at size 32; both scale with ``size``), plus a drift of at most 0.2 px/frame across it.
    The start is drawn so that the shape stays wholly inside the frame for the whole clip
    (for long clips the speed is capped to make that possible)."""
    scale = size / 32
    T = num_frames
    side = rng.uniform(8, 12) * scale
    room = size - side  # the box's top-left corner must stay in [0, room]
    speed = rng.uniform(1.5, 2.5) * scale
    drift = rng.uniform(-0.2, 0.2) * scale
    if T > 1:  # cap so that the whole path fits
        speed = min(speed, 0.9 * room / (T - 1))
        drift = float(np.clip(drift, -0.05 * room / (T - 1), 0.05 * room / (T - 1)))
    dx, dy = DIRECTIONS[scene.direction]
    vx, vy = speed * dx - drift * dy, speed * dy + drift * dx  # along + across
    t = np.arange(T)

    def start(v: float) -> float:
        lo, hi = max(0.0, -v * (T - 1)), min(room, room - v * (T - 1))
        return rng.uniform(lo, hi)

    x0 = start(vx) + vx * t
    y0 = start(vy) + vy * t
    alpha = _coverage(scene.shape, x0, y0, side, size)[..., None]  # (T, H, W, 1)
    bg = np.array(BACKGROUNDS[scene.background], dtype=np.float64)
    fg = np.array(COLORS[scene.color], dtype=np.float64)
    frames = bg + alpha * (fg - bg)
    return np.round(frames).astype(np.uint8)


def sample_videos(scenes: Sequence[Scene], rng: np.random.Generator, num_frames: int = 8, size: int = 32) -> np.ndarray:
    """One clip per scene, uint8 (N, T, H, W, 3)."""
    videos = np.empty((len(scenes), num_frames, size, size, 3), dtype=np.uint8)
    for i, scene in enumerate(scenes):
        videos[i] = render(scene, rng, num_frames, size)
    return videos


# -----------------------------------------------------------------------------
# the oracle judge

# calibrated on clean renders at 32x32 (see the module docstring)
SHAPE_FILL = {"square": 1.0, "circle": 0.79, "triangle": 0.56}
SHAPE_OFFSET = {"square": 0.0, "circle": 0.0, "triangle": 0.15}
MASK_LO, MASK_RAMP = 8.0, 32.0  # gate: RGB distance from the background where it opens, + 1.6 * noise
MASK_REF_MIN = 120.0  # least distance that counts as a fully covered pixel
EPS = 1e-6


def _box3(m: np.ndarray) -> np.ndarray:
    """Mean over each pixel's 3x3 neighbourhood (zeros outside) of (..., H, W)."""
    pad = np.pad(m, [(0, 0)] * (m.ndim - 2) + [(1, 1), (1, 1)])
    rows = pad[..., :-2, :] + pad[..., 1:-1, :] + pad[..., 2:, :]  # separable: rows, then columns
    return (rows[..., :-2] + rows[..., 1:-1] + rows[..., 2:]) / 9.0


def _cauchy(z: np.ndarray) -> np.ndarray:
    """1 / (1 + z^2): 1 at z = 0, 0.5 at |z| = 1, with a long tail, so that even a clip far
    from its prompt gets a (small) reward for getting closer."""
    return 1.0 / (1.0 + z * z)


def _measure(x: np.ndarray) -> dict[str, np.ndarray]:
    """Pixel measurements of float clips x (N, T, H, W, 3) in [0, 255], per frame (N, T, ...)."""
    N, T, H, W, _ = x.shape
    scale = min(H, W) / 32

    # background: median colour of each frame's border, and how much the border scatters
    border = np.concatenate([x[:, :, 0], x[:, :, -1], x[:, :, 1:-1, 0], x[:, :, 1:-1, -1]], axis=2)  # (N, T, B, 3)
    bg = np.median(border, axis=2)  # (N, T, 3)
    spread = np.median(np.sqrt(((border - bg[:, :, None]) ** 2).sum(axis=-1)), axis=2)  # (N, T)

    # foreground: coverage ~ distance from the background over the object's own distance (90% of
    # the frame's peak 3x3-mean distance, so noise inside it still reads as 1), gated above the
    # background's noise, speckles suppressed
    diff = x - bg[:, :, None, None]
    dist = np.sqrt(diff[..., 0] ** 2 + diff[..., 1] ** 2 + diff[..., 2] ** 2)  # (N, T, H, W)
    peak = _box3(dist).max(axis=(2, 3))[..., None, None]  # (N, T, 1, 1)
    ref = np.maximum(0.9 * peak, MASK_REF_MIN)
    cover = np.minimum(dist / ref, 1.0)
    lo = (MASK_LO + 1.6 * spread)[..., None, None]  # above ~90% of the background's noise
    alpha = cover * np.clip((dist - lo) / MASK_RAMP, 0.0, 1.0)
    m = alpha * np.clip(9.0 * _box3(alpha) - alpha, 0.0, 1.0)  # its neighbours must hold >= 1 px of mass
    mass = m.sum(axis=(2, 3))  # (N, T)
    too_big = np.maximum(mass - 0.25 * H * W, 0.0) / (0.15 * H * W)
    presence = (1.0 - np.exp(-((mass / (12 * scale**2)) ** 2))) * np.exp(-(too_big**2))

    # colour of the object, unmixed from the background: bg + peak distance * mean direction
    # (edge pixels are part background, but their direction from it is the object's)
    mean_u = np.einsum("nthw,nthwc->ntc", m / (dist + EPS), diff) / (mass[..., None] + EPS)
    color = bg + peak[..., 0] * mean_u

    # shape: fill of the soft bounding box, vertical offset of the centroid in it, aspect ratio
    ys = np.arange(H, dtype=np.float32) + 0.5
    xs = np.arange(W, dtype=np.float32) + 0.5
    col_extent, row_extent = m.max(axis=2), m.max(axis=3)  # ~1 on the columns / rows it spans
    width, height = col_extent.sum(axis=-1), row_extent.sum(axis=-1)
    cy = (m.sum(axis=3) * ys).sum(axis=-1) / (mass + EPS)
    box_cy = (row_extent * ys).sum(axis=-1) / (height + EPS)  # middle of the rows it spans
    fill = mass / (width * height + EPS)
    offset = (cy - box_cy) / (height + EPS)  # > 0: mass sits low, as in an upward triangle
    log_aspect = np.log((width + 0.1) / (height + 0.1))
    # edge width: partial-coverage band over total variation (~ perimeter); ~0.5 px when
    # anti-aliased, > 1 px when blurred
    tv = np.abs(np.diff(m, axis=2)).sum(axis=(2, 3)) + np.abs(np.diff(m, axis=3)).sum(axis=(2, 3))
    edge_width = (4.0 * m * (1.0 - m)).sum(axis=(2, 3)) / (tv + EPS)

    # motion: centroid of the ungated coverage within a pixel of the mask (exact for
    # anti-aliased edges, so sub-pixel motion is smooth)
    track = cover * np.clip(9.0 * _box3(m), 0.0, 1.0)
    track_mass = track.sum(axis=(2, 3))
    centroid = np.stack([(track.sum(axis=2) * xs).sum(axis=-1), (track.sum(axis=3) * ys).sum(axis=-1)], axis=-1)
    centroid = centroid / (track_mass[..., None] + EPS)  # (N, T, 2), in pixels
    return {
        "bg": bg,
        "spread": spread,
        "presence": presence,
        "color": color,
        "fill": fill,
        "offset": offset,
        "log_aspect": log_aspect,
        "edge_width": edge_width,
        "centroid": centroid / scale,  # in pixels at 32x32
        "track_mass": track_mass,
    }


def _score_batch(
    x: np.ndarray, bg_t: np.ndarray, col_t: np.ndarray, dir_t: np.ndarray, fill_t: np.ndarray, offset_t: np.ndarray
) -> dict[str, np.ndarray]:
    """Per-attribute scores (N,) of float clips x (N, T, H, W, 3) in [0, 255] against targets:
    background and object colours (N, 3), directions (N, 2), shape fill and offset (N,)."""
    f = _measure(x)
    T = x.shape[1]
    presence = f["presence"]  # (N, T): one object of a plausible size in the frame
    p_mean = presence.mean(axis=1)

    d_bg = np.linalg.norm(f["bg"] - bg_t[:, None], axis=-1)
    background = (_cauchy(d_bg / 30) * _cauchy(f["spread"] / 40)).mean(axis=1)

    d_col = np.linalg.norm(f["color"] - col_t[:, None], axis=-1)
    color = (presence * _cauchy(d_col / 60)).mean(axis=1)

    shape_err = (
        ((f["fill"] - fill_t[:, None]) / 0.12) ** 2
        + ((f["offset"] - offset_t[:, None]) / 0.06) ** 2
        + (f["log_aspect"] / 0.25) ** 2
    )
    crisp = _cauchy(np.maximum(f["edge_width"] - 0.7, 0.0))  # blurred edges cost
    shape = (presence * crisp / (1.0 + shape_err)).mean(axis=1)

    # direction: weighted least-squares velocity of the centroid (frames without an object barely count)
    w = presence + EPS
    t = np.arange(T, dtype=np.float32)
    tc = (w * t).sum(axis=1, keepdims=True) / w.sum(axis=1, keepdims=True)
    c = f["centroid"]  # (N, T, 2)
    cc = (w[..., None] * c).sum(axis=1, keepdims=True) / w.sum(axis=1)[:, None, None]
    dt = t - tc  # (N, T)
    v = (w[..., None] * dt[..., None] * (c - cc)).sum(axis=1) / (
        (w * dt**2).sum(axis=1)[:, None] + EPS
    )  # (N, 2) px/frame
    along = (v * dir_t).sum(axis=-1)
    cos = along / (np.linalg.norm(v, axis=-1) + EPS)
    v_full = min(1.0, 10.0 / max(T - 1, 1))  # full-credit speed; long clips must move slower to stay in frame
    direction = p_mean * 0.5 * (1.0 + np.tanh((along - 0.5 * v_full) / (0.4 * v_full))) * ((1.0 + cos) / 2) ** 4

    # smoothness: residual of the centroid off its constant-velocity line, flicker of the mass
    resid = c - (cc + dt[..., None] * v[:, None])
    rms = np.sqrt((w * (resid**2).sum(axis=-1)).sum(axis=1) / w.sum(axis=1))
    tm = f["track_mass"]
    flicker = np.abs(np.diff(tm, axis=1)).sum(axis=1) / (max(T - 1, 1) * tm.mean(axis=1) + EPS)
    smoothness = p_mean / (1.0 + (rms / 0.5) ** 2 + (flicker / 0.15) ** 2)

    scores = {
        "background": background,
        "color": color,
        "shape": shape,
        "direction": direction,
        "smoothness": smoothness,
    }
    scores["total"] = sum(ORACLE_WEIGHTS[k] * scores[k] for k in ORACLE_WEIGHTS)
    return scores


def oracle_scores(videos: np.ndarray, prompts: Sequence[str], chunk: int = 128) -> list[dict[str, float]]:
    """Oracle scores of clips (N, T, H, W, 3), uint8 or float in [0, 255], against their
    prompts: one dict per clip with keys background, color, shape, direction, smoothness
    and total, each a float in [0, 1]."""
    videos = np.asarray(videos)
    if videos.ndim != 5 or videos.shape[-1] != 3:
        raise ValueError(f"oracle_scores: expected videos of shape (N, T, H, W, 3), got {videos.shape}")
    if len(prompts) != videos.shape[0]:
        raise ValueError(f"oracle_scores: {videos.shape[0]} videos but {len(prompts)} prompts")
    scenes = [parse_prompt(p) for p in prompts]
    bg_t = np.array([BACKGROUNDS[s.background] for s in scenes], dtype=np.float32).reshape(-1, 3)
    col_t = np.array([COLORS[s.color] for s in scenes], dtype=np.float32).reshape(-1, 3)
    dir_t = np.array([DIRECTIONS[s.direction] for s in scenes], dtype=np.float32).reshape(-1, 2)
    fill_t = np.array([SHAPE_FILL[s.shape] for s in scenes], dtype=np.float32)
    offset_t = np.array([SHAPE_OFFSET[s.shape] for s in scenes], dtype=np.float32)
    columns: dict[str, list[float]] = {k: [] for k in (*ORACLE_WEIGHTS, "total")}
    for i in range(0, len(scenes), chunk):
        x = videos[i : i + chunk].astype(np.float32)
        if videos.dtype != np.uint8:
            x = np.clip(np.nan_to_num(x, nan=0.0, posinf=255.0, neginf=0.0), 0.0, 255.0)
        sl = slice(i, i + chunk)
        for k, v in _score_batch(x, bg_t[sl], col_t[sl], dir_t[sl], fill_t[sl], offset_t[sl]).items():
            columns[k].extend(np.clip(np.nan_to_num(v), 0.0, 1.0).tolist())
    return [dict(zip(columns, values)) for values in zip(*columns.values())]


def oracle_score(video: np.ndarray, prompt: str) -> dict[str, float]:
    """Oracle scores of one clip (T, H, W, 3) against its prompt (see ``oracle_scores``)."""
    return oracle_scores(np.asarray(video)[None], [prompt])[0]


def oracle_prefer(video_a: np.ndarray, video_b: np.ndarray, prompt: str, tie_margin: float = 0.01) -> str:
    """Which clip the oracle prefers for the prompt: "a", "b", or "tie" when their total
    scores differ by at most ``tie_margin``."""
    sa, sb = (s["total"] for s in oracle_scores(np.stack([np.asarray(video_a), np.asarray(video_b)]), [prompt, prompt]))
    if abs(sa - sb) <= tie_margin:
        return "tie"
    return "a" if sa > sb else "b"
