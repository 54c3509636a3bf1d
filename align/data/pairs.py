"""Build a preference dataset from a generator's own samples, judged by the oracle or by a
reward model.

For each prompt the generator draws ``samples_per_prompt`` videos (different seeds); a judge
scores them (any ``score(videos, prompts)``, e.g. ``align.judges.combined_score`` of the
``--judge`` specs: RLAIF-style labelling; ``score=None`` is the synthetic world's oracle, which
only the demo uses, imported only then);
the best and the worst form a pair (best-of-n vs worst-of-n, as in on-policy preference
pipelines). A pair whose scores differ by less than ``tie_margin`` (in the judge's units) is
labelled a tie. The a/b order is randomised so that "a" carries no bias.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import numpy as np

from align.data.video import to_uint8
from align.sample import generate


def sample_groups(
    model,
    prompts: list[str],
    samples_per_prompt: int,
    seed: int = 0,
    num_steps: int = 20,
    guidance_scale: float = 4.0,
    progress: bool = True,
    *,
    score: Callable[[np.ndarray, Sequence[str]], np.ndarray],
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """``k`` samples per prompt (consecutive rows form a group) and their scores:
    ``(all_prompts, videos uint8 (N*k, T, H, W, C), totals (N, k))``. ``score(videos,
    prompts)`` (a judge's ``score``, ``align.judges``) returns one number per video."""
    if not prompts:
        raise ValueError("sample_groups: empty prompt list")
    if samples_per_prompt < 2:
        raise ValueError(f"samples_per_prompt must be >= 2, got {samples_per_prompt}")
    k = samples_per_prompt
    all_prompts = [p for p in prompts for _ in range(k)]
    seeds = [seed * 1_000_003 + i for i in range(len(all_prompts))]
    videos = to_uint8(generate(model, all_prompts, seeds, num_steps, guidance_scale, progress=progress, desc="pairs"))
    flat = np.asarray(score(videos, all_prompts), dtype=np.float64).reshape(-1)
    if flat.shape != (len(all_prompts),):
        raise ValueError(f"sample_groups: the judge returned {flat.size} scores for {len(all_prompts)} videos")
    bad = np.flatnonzero(~np.isfinite(flat))
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"sample_groups: the judge gave {bad.size} non-finite scores, first for video {i} "
            f"(prompt {all_prompts[i]!r}, seed {seeds[i]})"
        )
    return all_prompts, videos, flat.reshape(len(prompts), k)


def _dataset(rows: dict, shape):
    """The schema's dataset; ``shape`` None: videos are file paths (relative to the dataset dir)."""
    import datasets

    video = datasets.Value("string") if shape is None else datasets.Array4D(tuple(shape), "uint8")
    features = datasets.Features(
        {
            "prompt": datasets.Value("string"),
            "video_a": video,
            "video_b": video,
            "preference": datasets.Value("string"),
            "score_a": datasets.Value("float32"),
            "score_b": datasets.Value("float32"),
        }
    )
    return datasets.Dataset.from_dict(rows, features=features)


def pairs_from_groups(
    prompts: list[str],
    videos: np.ndarray,
    totals: np.ndarray,
    which: str = "best_worst",
    tie_margin: float = 0.01,
    seed: int = 0,
):
    """A preference dataset from scored groups: ``best_worst`` (one pair per group, as DPO
    uses) or ``all`` (every pair within a group: k(k-1)/2, as a reward model can use).
    The a/b order is randomised; ties are labelled, not dropped. ``videos``: a uint8 array
    ``(N*k, T, H, W, C)``, or a list of file paths (stored as such, relative to the dataset)."""
    n, k = totals.shape
    rng = np.random.default_rng(seed)
    rows: dict[str, list] = {c: [] for c in ("prompt", "video_a", "video_b", "preference", "score_a", "score_b")}
    for i in range(n):
        if which == "best_worst":
            best, worst = int(totals[i].argmax()), int(totals[i].argmin())
            cand = [(best, worst if worst != best else (best + 1) % k)]
        elif which == "all":
            cand = list(itertools.combinations(range(k), 2))
        else:
            raise ValueError(f"which must be 'best_worst' or 'all', got {which!r}")
        for x, y in cand:
            a, b = (x, y) if rng.random() < 0.5 else (y, x)
            sa, sb = float(totals[i, a]), float(totals[i, b])
            rows["prompt"].append(prompts[i * k])
            rows["video_a"].append(videos[i * k + a])
            rows["video_b"].append(videos[i * k + b])
            rows["preference"].append("tie" if abs(sa - sb) < tie_margin else ("a" if sa > sb else "b"))
            rows["score_a"].append(sa)
            rows["score_b"].append(sb)
    return _dataset(rows, None if isinstance(videos, list) else videos.shape[1:])
