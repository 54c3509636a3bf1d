"""Preference pairs from scored groups of samples (align/data/pairs.py), built by hand."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from align.data.pairs import pairs_from_groups


def _groups(prompts_per_group: list[str], k: int, totals: np.ndarray):
    """Videos whose every pixel is the row index, so a pair's videos name their rows."""
    prompts = [p for p in prompts_per_group for _ in range(k)]
    videos = np.stack([np.full((2, 2, 2, 3), i, np.uint8) for i in range(len(prompts))])
    return prompts, videos, totals


def _rows(ds) -> list[tuple[str, int, int, str, float, float]]:
    return [
        (r["prompt"], int(np.asarray(r["video_a"]).flat[0]), int(np.asarray(r["video_b"]).flat[0]), r["preference"],
         r["score_a"], r["score_b"])
        for r in ds
    ]  # fmt: skip


def test_all_pairs_within_a_group_are_labelled_from_the_totals():
    totals = np.array([[0.5, 0.9, 0.505], [0.2, 0.1, 0.3]], np.float32)
    prompts, videos, totals = _groups(["p", "q"], 3, totals)
    rows = _rows(pairs_from_groups(prompts, videos, totals, "all", tie_margin=0.01, seed=0))
    assert len(rows) == 6
    flat = totals.reshape(-1)
    for prompt, a, b, pref, sa, sb in rows:
        assert a // 3 == b // 3 and prompt == prompts[a] == prompts[b]  # never across groups
        assert sa == pytest.approx(flat[a]) and sb == pytest.approx(flat[b])
        assert pref == ("tie" if abs(sa - sb) < 0.01 else "a" if sa > sb else "b")
    assert {frozenset((a, b)) for _, a, b, *_ in rows} == {frozenset(c) for g in (0, 3) for c in
                                                          itertools.combinations(range(g, g + 3), 2)}  # fmt: skip
    assert ("p", 0, 2, "tie") in {r[:4] for r in rows} or ("p", 2, 0, "tie") in {r[:4] for r in rows}
    best_worst = _rows(pairs_from_groups(prompts, videos, totals, "best_worst", seed=0))
    assert {frozenset(r[1:3]) for r in best_worst} == {frozenset((1, 0)), frozenset((5, 4))}
