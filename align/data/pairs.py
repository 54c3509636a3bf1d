"""Build a preference dataset from a generator's own samples, judged by the oracle.

For each prompt the generator draws ``samples_per_prompt`` videos (different seeds); the
oracle scores them; the best and the worst form a pair (best-of-n vs worst-of-n, as in
on-policy preference pipelines). A pair whose scores differ by less than ``tie_margin`` is
labelled a tie. The a/b order is randomised so that "a" carries no bias.
"""

from __future__ import annotations

import numpy as np

from align.data.synthetic import oracle_scores
from align.data.video import to_uint8
from align.sample import generate


def oracle_preference_dataset(
    model,
    prompts: list[str],
    samples_per_prompt: int = 4,
    seed: int = 0,
    num_steps: int = 20,
    guidance_scale: float = 4.0,
    tie_margin: float = 0.01,
    progress: bool = True,
):
    """A ``datasets.Dataset`` in the project's schema, videos as uint8 arrays."""
    import datasets

    if not prompts:
        raise ValueError("oracle_preference_dataset: empty prompt list")
    if samples_per_prompt < 2:
        raise ValueError(f"samples_per_prompt must be >= 2, got {samples_per_prompt}")
    k = samples_per_prompt
    all_prompts = [p for p in prompts for _ in range(k)]
    seeds = [seed * 1_000_003 + i for i in range(len(all_prompts))]
    videos = to_uint8(generate(model, all_prompts, seeds, num_steps, guidance_scale, progress=progress, desc="pairs"))
    totals = np.array([s["total"] for s in oracle_scores(videos, all_prompts)]).reshape(len(prompts), k)
    rng = np.random.default_rng(seed)
    rows: dict[str, list] = {k_: [] for k_ in ("prompt", "video_a", "video_b", "preference", "score_a", "score_b")}
    for i, prompt in enumerate(prompts):
        best, worst = int(totals[i].argmax()), int(totals[i].argmin())
        if best == worst:
            worst = (best + 1) % k
        a, b = (best, worst) if rng.random() < 0.5 else (worst, best)
        sa, sb = float(totals[i, a]), float(totals[i, b])
        pref = "tie" if abs(sa - sb) < tie_margin else ("a" if sa > sb else "b")
        rows["prompt"].append(prompt)
        rows["video_a"].append(videos[i * k + a])
        rows["video_b"].append(videos[i * k + b])
        rows["preference"].append(pref)
        rows["score_a"].append(sa)
        rows["score_b"].append(sb)
    T, H, W, C = videos.shape[1:]
    features = datasets.Features(
        {
            "prompt": datasets.Value("string"),
            "video_a": datasets.Array4D((T, H, W, C), "uint8"),
            "video_b": datasets.Array4D((T, H, W, C), "uint8"),
            "preference": datasets.Value("string"),
            "score_a": datasets.Value("float32"),
            "score_b": datasets.Value("float32"),
        }
    )
    return datasets.Dataset.from_dict(rows, features=features)
