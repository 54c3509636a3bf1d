"""Plots for training runs and evaluations, written as PNG files with matplotlib's Agg backend.

Figures are built with :class:`matplotlib.figure.Figure` directly (not pyplot), so nothing here
touches the global backend or leaks open figures; saving to PNG renders with Agg.

- :func:`plot_training_curves`: loss / implicit accuracy / reward margin against step.
- :func:`plot_winrates`: win rates with 95% confidence intervals, one bar per comparison.
- :func:`plot_score_histograms`: overlaid score distributions, e.g. base vs aligned.
- :func:`plot_summary`: a preference dataset's prompt and video lengths and file sizes
  (``vidalign data stats``; the numbers come from :func:`align.data.checks.summarize`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from align.atomic import atomic_write


def plot_training_curves(
    metrics_jsonl: str | Path | list[dict],
    out_png: str | Path,
    keys: Sequence[str] = ("loss", "implicit_acc", "reward_margin"),
) -> Path:
    """Plot each metric in ``keys`` against ``"step"``, one subplot per key that the records have.

    ``metrics_jsonl`` is a JSON-lines file (one record per line) or the list of records itself.
    Each curve gets a moving average on top. Missing or non-finite values (e.g. ``None``) are
    skipped. Raises ``ValueError`` if there are no records, none has a ``"step"``, or none has
    any of ``keys``.
    """
    source = str(metrics_jsonl) if isinstance(metrics_jsonl, (str, Path)) else "metrics"
    records = _load_records(metrics_jsonl)
    if not records:
        raise ValueError(f"{source}: no metric records to plot")
    records = [r for r in records if r.get("step") is not None]
    if not records:
        raise ValueError(f"{source}: no record has a 'step' field")

    series = {}
    for key in keys:
        pts = [(r["step"], r[key]) for r in records if _is_number(r.get(key))]
        if pts:
            series[key] = np.array(pts, dtype=np.float64)
    if not series:
        raise ValueError(f"{source}: none of the keys {list(keys)} appear in the records")

    fig = Figure(figsize=(4.2 * len(series), 3.2))
    axes = fig.subplots(1, len(series), squeeze=False)
    for ax, (key, pts) in zip(axes[0], series.items()):
        steps, vals = pts[:, 0], pts[:, 1]
        ax.plot(steps, vals, color="tab:blue", alpha=0.35, linewidth=1, label="raw")
        window = max(1, len(vals) // 20)
        if window > 1:
            ax.plot(steps, _moving_average(vals, window), color="tab:blue", linewidth=2, label=f"avg ({window})")
            ax.legend(fontsize=8)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, out_png)


def plot_winrates(
    winrates: dict[str, dict],
    out_png: str | Path,
    title: str = "Win rate vs base (ties count 1/2), 95% bootstrap CI",
) -> Path:
    """Horizontal bars of each comparison's win ``rate`` with its ``ci95`` as error bars.

    ``winrates`` maps a comparison's name (e.g. ``"dpo vs base (oracle)"``) to a dict from
    :func:`align.eval.winrate.win_rate`. A dashed line marks 0.5 (no difference).
    """
    if not winrates:
        raise ValueError("plot_winrates needs at least one comparison")
    names = list(winrates)
    rates = np.array([float(winrates[k]["rate"]) for k in names])
    lo = np.array([float(winrates[k].get("ci95", [r, r])[0]) for k, r in zip(names, rates)])
    hi = np.array([float(winrates[k].get("ci95", [r, r])[1]) for k, r in zip(names, rates)])
    err = np.stack([np.clip(rates - lo, 0, None), np.clip(hi - rates, 0, None)])

    fig = Figure(figsize=(7, 1.0 + 0.55 * len(names)))
    ax = fig.subplots()
    y = np.arange(len(names))
    colors = ["tab:green" if r > 0.5 else "tab:red" if r < 0.5 else "tab:gray" for r in rates]
    ax.barh(y, rates, xerr=err, color=colors, alpha=0.8, capsize=4)
    for yi, r, l, h, k in zip(y, rates, lo, hi, names):
        label = f"{r:.2f} [{l:.2f}, {h:.2f}] n={winrates[k].get('n', '?')}"
        if h <= 0.7:  # room right of the error bar, else put the label left of it
            ax.text(h + 0.02, yi, label, va="center", ha="left", fontsize=8)
        else:
            ax.text(l - 0.02, yi, label, va="center", ha="right", fontsize=8)
    ax.axvline(0.5, color="black", linestyle="--", linewidth=1)
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("win rate")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, out_png)


def plot_score_histograms(
    scores: dict[str, Sequence[float]],
    out_png: str | Path,
    title: str = "Score distribution",
    bins: int | None = None,
) -> Path:
    """Overlaid, semi-transparent histograms of each named score list on shared bins.

    ``bins`` defaults to about sqrt(n) (between 10 and 40). Each legend entry shows the mean and
    count. NaNs are dropped; a name with no finite scores is skipped.
    """
    clean = {}
    for name, vals in scores.items():
        arr = np.asarray(vals, dtype=np.float64).reshape(-1)
        arr = arr[np.isfinite(arr)]
        if arr.size:
            clean[name] = arr
    if not clean:
        raise ValueError("plot_score_histograms needs at least one non-empty score list")
    allv = np.concatenate(list(clean.values()))
    lo, hi = float(allv.min()), float(allv.max())
    if bins is None:
        bins = int(np.clip(np.sqrt(max(a.size for a in clean.values())), 10, 40))
    edges = np.linspace(lo, hi if hi > lo else lo + 1.0, bins + 1)

    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    for name, arr in clean.items():
        ax.hist(arr, bins=edges, alpha=0.5, label=f"{name} (mean {arr.mean():.3f}, n={arr.size})")
    ax.set_xlabel("score")
    ax.set_ylabel("count")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, out_png)


def _load_records(metrics: str | Path | list[dict]) -> list[dict]:
    """Records from a JSON-lines file (blank lines skipped) or a list passed through."""
    if not isinstance(metrics, (str, Path)):
        return list(metrics)
    path = Path(metrics)
    if not path.is_file():
        raise ValueError(f"{path}: metrics file not found")
    records = []
    for i, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i}: not valid JSON ({e.msg})") from None
    return records


def _is_number(v) -> bool:
    """True for a finite int/float (not bool, not None)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _moving_average(x: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average, same length as ``x`` (shorter windows at the start)."""
    c = np.cumsum(np.insert(x, 0, 0.0))
    idx = np.arange(1, len(x) + 1)
    start = np.maximum(idx - window, 0)
    return (c[idx] - c[start]) / (idx - start)


def plot_summary(summary: dict, path: str | Path, title: str = "") -> Path:
    """Histograms of prompt length, video length (frames, seconds) and file size, written as a PNG."""
    panels = [
        ("prompt_words", "prompt length (words)"),
        ("video_frames", "video length (frames)"),
        ("video_seconds", "video length (seconds)"),
        ("video_bytes", "video size (KiB)"),
    ]
    fig = Figure(figsize=(16, 3.4))
    axes = fig.subplots(1, 4)
    for ax, (key, label) in zip(axes, panels):
        values = np.asarray(summary[key], dtype=float)
        if key == "video_bytes":
            values = values / 1024
        if len(values):
            ax.hist(values, bins=min(30, max(1, len(np.unique(values)))), color="#4477aa")
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel(label)
        ax.set_ylabel("count")
    c = summary["counts"]
    counts = f"a={c['a']} b={c['b']} tie={c['tie']} (tie share {summary['tie_share']:.2f})"
    fig.suptitle(f"{title}  rows={summary['rows']}  {counts}")
    fig.tight_layout()
    return _save(fig, path, dpi=80)


def _save(fig: Figure, out_png: str | Path, dpi: int = 110) -> Path:
    """Save ``fig`` as PNG atomically (temp file in the same folder, then rename)."""
    return atomic_write(out_png, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))


def plot_online_rounds(metrics_jsonl: str | Path | list[dict], out_png: str | Path, title: str = "") -> Path:
    """What a user watches in an online run (GRPO, online RWR, NFT): the training reward
    (``reward_mean``) and the held-out score (``heldout_mean``, when the run has held-out judges)
    per round, side by side, from metrics.jsonl (a round's records share its values: the first
    of each round is plotted). Raises ``ValueError`` when no record has a ``round``."""
    rounds: dict[int, dict] = {}
    for r in _load_records(metrics_jsonl):
        if _is_number(r.get("round")) and int(r["round"]) not in rounds:
            rounds[int(r["round"])] = r
    if not rounds:
        raise ValueError(f"{metrics_jsonl if isinstance(metrics_jsonl, (str, Path)) else 'metrics'}: no round records")
    keys = [k for k in ("reward_mean", "heldout_mean") if any(_is_number(r.get(k)) for r in rounds.values())]
    names = {"reward_mean": "training reward (judges)", "heldout_mean": "held-out score (eval_judges)"}
    fig = Figure(figsize=(4.2 * max(1, len(keys)), 3.2))
    axes = fig.subplots(1, max(1, len(keys)), squeeze=False)[0]
    for ax, key in zip(axes, keys):
        pts = np.array([(i, r[key]) for i, r in sorted(rounds.items()) if _is_number(r.get(key))], dtype=np.float64)
        ax.plot(pts[:, 0], pts[:, 1], marker="o", color="tab:green" if key == "heldout_mean" else "tab:blue")
        ax.set_title(names[key])
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, out_png)
