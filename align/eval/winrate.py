"""Win rates of a new model over a baseline, with percentile-bootstrap 95% confidence intervals.

Each comparison is one paired sample (same prompt, same seed) and ends in a win, a loss or a tie.
The win rate counts a tie as half a win: ``(wins + 0.5 * ties) / n``, so 0.5 means "no better,
no worse". The confidence interval resamples comparisons with replacement.

Both entry points return the same JSON-serialisable dict::

    {"rate": 0.7, "ci95": [0.4, 1.0], "n": 5, "wins": 3, "losses": 1, "ties": 1}
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# What each outcome is worth to the new model; "a" means the new model (A) won, "b" the baseline.
_OUTCOME_VALUE = {"win": 1.0, "a": 1.0, "tie": 0.5, "loss": 0.0, "b": 0.0}


def win_rate(
    scores_new: Sequence[float],
    scores_base: Sequence[float],
    tie_margin: float = 0.0,
    n_boot: int = 2000,
    seed: int = 0,
) -> dict:
    """Win rate of ``scores_new`` over ``scores_base``, paired by index (same prompt and seed).

    A comparison is a win if ``new - base > tie_margin``, a loss if ``new - base < -tie_margin``,
    otherwise a tie. Higher scores are better. Raises ``ValueError`` on empty input, mismatched
    lengths, NaN scores or a negative ``tie_margin``.
    """
    new = _as_scores(scores_new, "scores_new")
    base = _as_scores(scores_base, "scores_base")
    if len(new) != len(base):
        raise ValueError(f"paired scores need equal lengths: scores_new has {len(new)}, scores_base has {len(base)}")
    if tie_margin < 0:
        raise ValueError(f"tie_margin must be >= 0, got {tie_margin}")
    diff = new - base
    values = np.where(diff > tie_margin, 1.0, np.where(diff < -tie_margin, 0.0, 0.5))
    return _summarise(values, n_boot=n_boot, seed=seed)


def win_rate_from_outcomes(outcomes: Sequence[str], n_boot: int = 2000, seed: int = 0) -> dict:
    """Win rate from judged outcomes, each ``"win"``, ``"loss"`` or ``"tie"`` (case-insensitive).

    ``"a"`` and ``"b"`` are accepted too, as in pairwise judgements of (A = new, B = base):
    ``"a"`` means the new model won (same as ``"win"``), ``"b"`` means the baseline won.
    """
    if len(outcomes) == 0:
        raise ValueError("win rate needs at least one outcome, got none")
    values = np.empty(len(outcomes), dtype=np.float64)
    for i, o in enumerate(outcomes):
        key = str(o).strip().lower()
        if key not in _OUTCOME_VALUE:
            raise ValueError(f"outcome {i} is {o!r}; expected one of {sorted(_OUTCOME_VALUE)}")
        values[i] = _OUTCOME_VALUE[key]
    return _summarise(values, n_boot=n_boot, seed=seed)


def bootstrap_ci(values: np.ndarray, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile-bootstrap confidence interval of ``values.mean()``, resampling with replacement."""
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    # Resampling n items with replacement only matters through how often each distinct value is
    # drawn, so draw those counts from a multinomial: same distribution, O(n_boot) memory.
    levels, counts = np.unique(values, return_counts=True)
    n = len(values)
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(n, counts / n, size=n_boot)  # (n_boot, n_levels)
    means = draws @ levels / n
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def judge_agreement(gaps: dict[str, Sequence[float]], tie_margin: float = 0.0) -> dict[str, float]:
    """Pairwise agreement of judges on the same comparisons: for each pair of judges, the share
    of comparisons whose score gaps (aligned - base) have the same sign (a gap within
    ``tie_margin`` counts as 0, so two ties agree). Keys are ``"judge1 vs judge2"``."""
    names = list(gaps)
    signs = {}
    for name in names:
        g = _as_scores(gaps[name], f"gaps of {name}")
        signs[name] = np.where(g > tie_margin, 1, np.where(g < -tie_margin, -1, 0))
    n = {len(s) for s in signs.values()}
    if len(n) > 1:
        raise ValueError(f"judge_agreement: judges scored different numbers of comparisons {sorted(n)}")
    return {f"{a} vs {b}": float(np.mean(signs[a] == signs[b])) for i, a in enumerate(names) for b in names[i + 1 :]}


def suspect_judges(winrates: dict[str, dict]) -> list[str]:
    """Judges that prefer the new model (95% CI above 0.5) while every other judge does not:
    with two or more judges, the first sign that the model learnt to please one of them
    (reward hacking) rather than to get better. [] with fewer than two judges."""
    if len(winrates) < 2:
        return []
    prefers = {name: wr["ci95"][0] > 0.5 for name, wr in winrates.items()}
    return [name for name, yes in prefers.items() if yes and not any(v for k, v in prefers.items() if k != name)]


def _summarise(values: np.ndarray, n_boot: int, seed: int) -> dict:
    """Counts, rate and bootstrap CI from per-comparison values (1 win, 0.5 tie, 0 loss)."""
    lo, hi = bootstrap_ci(values, n_boot=n_boot, seed=seed)
    return {
        "rate": float(values.mean()),
        "ci95": [lo, hi],
        "n": int(len(values)),
        "wins": int(np.sum(values == 1.0)),
        "losses": int(np.sum(values == 0.0)),
        "ties": int(np.sum(values == 0.5)),
    }


def _as_scores(scores: Sequence[float], name: str) -> np.ndarray:
    """Scores as a 1-D float64 array; raise on empty input or NaNs (saying how many and where)."""
    arr = np.asarray(scores, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one score per comparison), got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty; win rate needs at least one comparison")
    nan = np.flatnonzero(np.isnan(arr))
    if nan.size:
        raise ValueError(f"{name} has {nan.size} NaN score(s) out of {arr.size}; first at index {int(nan[0])}")
    return arr
