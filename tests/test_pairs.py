"""Preference pairs from scored groups of samples (align/data/pairs.py), built by hand."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from align.data.pairs import merge_groups, pairs_from_groups


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


def test_merge_groups_joins_the_rounds_of_a_prompt():
    # two rounds over prompts p and q, 2 samples per group: groups p, q, p, q
    totals = np.array([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6], [0.7, 0.8]], np.float32)
    prompts, videos, totals = _groups(["p", "q", "p", "q"], 2, totals)
    mp, mv, mt = merge_groups(prompts, videos, totals)
    assert mp == ["p"] * 4 + ["q"] * 4
    assert [int(v.flat[0]) for v in mv] == [0, 1, 4, 5, 2, 3, 6, 7]  # p's rows from both rounds, then q's
    np.testing.assert_array_equal(mt, np.array([[0.1, 0.2, 0.5, 0.6], [0.3, 0.4, 0.7, 0.8]], np.float32))
    rows = _rows(pairs_from_groups(mp, mv, mt, "all", seed=0))
    assert len(rows) == 12  # 4 * 3 / 2 per prompt, against 2 * 1 within rounds
    flat = totals.reshape(-1)
    for prompt, a, b, _, sa, sb in rows:
        assert prompts[a] == prompts[b] == prompt
        assert sa == pytest.approx(flat[a]) and sb == pytest.approx(flat[b])
    assert any(a // 2 != b // 2 for _, a, b, *_ in rows)  # pairs across rounds exist


def test_merge_groups_refuses_uneven_or_mismatched_groups():
    prompts, videos, totals = _groups(["p", "q", "p"], 2, np.zeros((3, 2), np.float32))
    with pytest.raises(ValueError, match="different numbers of groups.*'q': 1"):
        merge_groups(prompts, videos, totals)
    with pytest.raises(ValueError, match="5 prompts and 6 videos for 3 groups of 2"):
        merge_groups(prompts[:5], videos, totals)
    with pytest.raises(ValueError, match="group 1 mixes prompts"):
        merge_groups(["p", "p", "q", "p", "q", "q"], videos, totals)
