"""Agreement between annotators: Cohen's kappa (each two annotators), Fleiss' kappa (all), tie rate.

Categories are the three outcomes ``a``, ``b``, ``tie``; skips and undone labels are not
labels. Kappa is ``(p_o - p_e) / (1 - p_e)``: observed agreement corrected for the agreement
expected by chance from the category frequencies. It is undefined (``nan``, ``null`` in JSON)
when chance agreement is already 1 (everyone always used one category).

Fleiss' kappa here accepts a different number of raters per pair (the usual extension:
``P_i = (sum_j n_ij^2 - n_i) / (n_i (n_i - 1))``, ``p_j`` pooled over all ratings, ``P_e =
sum_j p_j^2``); with a constant number of raters it is exactly Fleiss (1971). Pairs with fewer
than two labels carry no agreement information and are left out.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from itertools import combinations

import numpy as np

from align.annotate.storage import ASPECTS

CATEGORIES = ("a", "b", "tie")


def cohen_kappa(x: list[str], y: list[str], categories: tuple[str, ...] = CATEGORIES) -> float:
    """Cohen's kappa of two raters' labels of the same items (``x[i]``, ``y[i]`` for item i)."""
    if len(x) != len(y):
        raise ValueError(f"cohen_kappa: {len(x)} and {len(y)} labels; need one each per item")
    if not x:
        return math.nan
    n = len(x)
    p_o = sum(a == b for a, b in zip(x, y)) / n
    cx, cy = Counter(x), Counter(y)
    p_e = sum(cx[c] * cy[c] for c in categories) / (n * n)
    return math.nan if p_e >= 1.0 else (p_o - p_e) / (1.0 - p_e)


def fleiss_kappa(counts: np.ndarray) -> float:
    """Fleiss' kappa of an ``(items, categories)`` matrix of label counts; rows with fewer than
    two labels are dropped, the rest may differ in their number of labels."""
    m = np.asarray(counts, dtype=float)
    if m.ndim != 2:
        raise ValueError(f"fleiss_kappa: counts must be (items, categories), got shape {m.shape}")
    n_i = m.sum(axis=1)
    m, n_i = m[n_i >= 2], n_i[n_i >= 2]
    if len(m) == 0:
        return math.nan
    p_i = ((m * m).sum(axis=1) - n_i) / (n_i * (n_i - 1))
    p_j = m.sum(axis=0) / n_i.sum()
    p_bar, p_e = p_i.mean(), float((p_j * p_j).sum())
    return math.nan if p_e >= 1.0 else float((p_bar - p_e) / (1.0 - p_e))


def agreement_stats(labels: list[dict], pairs_total: int, per_pair: int = 1, skips: int = 0) -> dict:
    """Summary of live labels (rows of :meth:`LabelStore.labels`, skips excluded).

    Returns counts, the tie rate (overall and per annotator), the *left rate* (among non-tie
    labels, how often the video shown on the left won: 0.5 without position bias), Fleiss'
    kappa over pairs with at least two labels (overall and per aspect) and Cohen's kappa for
    each two annotators with pairs in common (and their mean)."""
    by_pair: dict[int, dict[str, str]] = defaultdict(dict)
    by_annotator: dict[str, list[dict]] = defaultdict(list)
    for r in labels:
        by_pair[r["pair_id"]][r["annotator"]] = r["choice"]
        by_annotator[r["annotator"]].append(r)

    def rates(rows: list[dict]) -> dict:
        decided = [r for r in rows if r["choice"] != "tie"]
        return {
            "labels": len(rows),
            "tie_rate": _ratio(len(rows) - len(decided), len(rows)),
            "left_rate": _ratio(sum(r["choice"] == r["shown_left"] for r in decided), len(decided)),
        }

    def fleiss(field: str) -> dict:
        votes: dict[int, Counter] = defaultdict(Counter)
        for r in labels:
            if r.get(field) in CATEGORIES:
                votes[r["pair_id"]][r[field]] += 1
        rows = [[v[c] for c in CATEGORIES] for v in votes.values() if sum(v.values()) >= 2]
        return {"kappa": fleiss_kappa(np.array(rows).reshape(-1, 3)), "pairs": len(rows)}

    cohen = []
    for u, v in combinations(sorted(by_annotator), 2):
        shared = [p for p, who in by_pair.items() if u in who and v in who]
        if shared:
            k = cohen_kappa([by_pair[p][u] for p in shared], [by_pair[p][v] for p in shared])
            cohen.append({"annotators": [u, v], "kappa": k, "pairs": len(shared)})
    finite = [c["kappa"] for c in cohen if not math.isnan(c["kappa"])]
    return {
        **rates(labels),
        "skips": skips,
        "annotators": {name: rates(rows) for name, rows in sorted(by_annotator.items())},
        "pairs_total": pairs_total,
        "pairs_labelled": len(by_pair),
        "pairs_complete": sum(len(who) >= per_pair for who in by_pair.values()),
        "per_pair": per_pair,
        "fleiss": fleiss("choice"),
        "aspects": {a: {"labels": sum(r.get(a) is not None for r in labels), **fleiss(a)} for a in ASPECTS},
        "cohen": {"pairs": cohen, "mean": float(np.mean(finite)) if finite else math.nan},
    }


def store_stats(store) -> dict:
    """:func:`agreement_stats` of a :class:`~align.annotate.storage.LabelStore`."""
    labels = store.labels()
    skips = sum(r["choice"] == "skip" for r in store.labels(include_skips=True))
    per_pair = int(store.meta("per_pair", "1"))
    return agreement_stats(labels, len(store.pairs()), per_pair, skips)


def format_stats(s: dict) -> str:
    """A short human-readable report of :func:`agreement_stats`."""

    def f(x: float) -> str:
        return "n/a" if x is None or math.isnan(x) else f"{x:.3f}"

    lines = [
        f"labels: {s['labels']} (skips: {s['skips']}) on {s['pairs_labelled']}/{s['pairs_total']} pairs; "
        f"complete (>= {s['per_pair']} labels): {s['pairs_complete']}",
        f"tie rate: {f(s['tie_rate'])}   left rate (position bias, 0.5 = none): {f(s['left_rate'])}",
        f"Fleiss' kappa: {f(s['fleiss']['kappa'])} over {s['fleiss']['pairs']} pairs with >= 2 labels",
    ]
    for name, a in s["aspects"].items():
        if a["labels"]:
            lines.append(f"  {name}: {a['labels']} labels, Fleiss' kappa {f(a['kappa'])} over {a['pairs']} pairs")
    lines.append(f"Cohen's kappa, mean over annotator pairs: {f(s['cohen']['mean'])}")
    for c in s["cohen"]["pairs"]:
        lines.append(f"  {c['annotators'][0]} vs {c['annotators'][1]}: {f(c['kappa'])} on {c['pairs']} pairs")
    lines.append("annotators:")
    for name, a in s["annotators"].items():
        lines.append(f"  {name}: {a['labels']} labels, tie rate {f(a['tie_rate'])}, left rate {f(a['left_rate'])}")
    return "\n".join(lines)


def json_safe(x):
    """``x`` with NaN and infinities replaced by ``None`` (valid JSON: ``null``)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, list):
        return [json_safe(v) for v in x]
    return x


def _ratio(num: int, den: int) -> float:
    return num / den if den else math.nan
