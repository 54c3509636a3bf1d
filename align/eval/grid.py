"""Side-by-side video grids of paired samples: one row per (prompt, seed), base | aligned."""

from __future__ import annotations

from pathlib import Path

import numpy as np

TILE_HEIGHT = (96, 160)  # tiles are scaled up to at least the first, down to at most the second


def _tile(video: np.ndarray) -> np.ndarray:
    """A video resized for a grid cell: small ones scaled up by an integer, large ones down."""
    from align.data.video import resize_center_crop

    _, h, w, _ = video.shape
    if h < TILE_HEIGHT[0]:
        k = max(1, TILE_HEIGHT[0] // h)
        return video.repeat(k, axis=1).repeat(k, axis=2)
    if h > TILE_HEIGHT[1]:
        return resize_center_crop(video, TILE_HEIGHT[1], max(1, round(w * TILE_HEIGHT[1] / h)))
    return video


def pick_rows(rows: list[dict], max_rows: int) -> list[int]:
    """Indices of up to ``max_rows`` comparisons: the first seed of each prompt, then the rest."""
    first, rest, seen = [], [], set()
    for i, r in enumerate(rows):
        (rest if r["prompt"] in seen else first).append(i)
        seen.add(r["prompt"])
    return (first + rest)[:max_rows]


def write_side_by_side(
    base_dir: str | Path,
    base_rows: list[dict],
    aligned_dir: str | Path,
    aligned_rows: list[dict],
    out_stem: str | Path,
    names: tuple[str, str] = ("base", "aligned"),
    max_rows: int = 8,
    fps: int = 8,
) -> tuple[Path, Path]:
    """Write ``out_stem.gif`` and ``out_stem.mp4``: rows of (prompt, seed), columns ``names``.
    The mp4 is encoded from the GIF's frames (so both show the same 256-colour pixels)."""
    from align.data.video import read_video, write_grid_gif, write_video

    if len(base_rows) != len(aligned_rows):
        raise ValueError(f"side by side: {len(base_rows)} base and {len(aligned_rows)} aligned samples")
    pick = pick_rows(base_rows, max_rows)
    grid = [
        [
            _tile(read_video(Path(base_dir) / base_rows[i]["file"])),
            _tile(read_video(Path(aligned_dir) / aligned_rows[i]["file"])),
        ]
        for i in pick
    ]
    labels = [f"{base_rows[i]['prompt']} (seed {base_rows[i]['seed']})" for i in pick]
    stem = Path(out_stem)
    gif = write_grid_gif(grid, stem.with_suffix(".gif"), row_labels=labels, col_labels=list(names), scale=1, fps=fps)
    mp4 = write_video(stem.with_suffix(".mp4"), read_video(gif), fps=fps)
    return gif, mp4
