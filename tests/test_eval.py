"""Tests of win rates with bootstrap CIs, the plots, and the markdown/JSON report."""

from __future__ import annotations

import json

import numpy as np
import pytest

from align.eval.plots import plot_score_histograms, plot_training_curves, plot_winrates
from align.eval.report import write_report
from align.eval.winrate import win_rate, win_rate_from_outcomes

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------- win rate


def test_hand_computed_three_wins_one_tie_one_loss():
    wr = win_rate([2.0, 3.0, 4.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0, 1.0])
    assert wr["rate"] == pytest.approx(0.7)
    assert (wr["n"], wr["wins"], wr["ties"], wr["losses"]) == (5, 3, 1, 1)


def test_result_is_plain_json_types():
    wr = win_rate(np.array([1.0, 2.0]), np.array([0.0, 3.0]))
    assert json.loads(json.dumps(wr)) == wr
    assert type(wr["rate"]) is float and type(wr["n"]) is int and type(wr["wins"]) is int
    assert isinstance(wr["ci95"], list) and all(type(x) is float for x in wr["ci95"])


def test_all_ties_give_one_half_with_degenerate_ci():
    wr = win_rate([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
    assert wr["rate"] == 0.5 and wr["ties"] == 3
    assert wr["ci95"] == [0.5, 0.5]


def test_all_wins_and_all_losses():
    assert win_rate([1, 1], [0, 0])["rate"] == 1.0
    assert win_rate([0, 0], [1, 1])["rate"] == 0.0


def test_tie_margin():
    new, base = [1.05, 0.95, 1.2, 0.5], [1.0, 1.0, 1.0, 1.0]
    strict = win_rate(new, base)
    assert (strict["wins"], strict["ties"], strict["losses"]) == (2, 0, 2)
    loose = win_rate(new, base, tie_margin=0.1)
    assert (loose["wins"], loose["ties"], loose["losses"]) == (1, 2, 1)
    assert loose["rate"] == pytest.approx(0.5)
    # exactly at the margin is a tie, not a win
    assert win_rate([1.5], [1.0], tie_margin=0.5)["ties"] == 1


def test_ci_contains_rate_and_narrows_with_n():
    rng = np.random.default_rng(0)
    widths = []
    for n in (20, 200, 2000):
        new, base = rng.normal(0.2, 1, n), rng.normal(0, 1, n)
        wr = win_rate(new, base)
        lo, hi = wr["ci95"]
        assert 0.0 <= lo <= wr["rate"] <= hi <= 1.0
        widths.append(hi - lo)
    assert widths[0] > widths[1] > widths[2]
    # for n=2000 a binomial-ish CI is about +-1.96 * sqrt(.25 / n) ~ 0.044 wide on each side
    assert widths[2] == pytest.approx(2 * 1.96 * np.sqrt(0.25 / 2000), rel=0.25)


def test_bootstrap_is_deterministic_under_seed():
    rng = np.random.default_rng(1)
    new, base = rng.normal(size=50), rng.normal(size=50)
    assert win_rate(new, base, seed=3) == win_rate(new, base, seed=3)
    other = win_rate(new, base, seed=4)["ci95"]  # another seed: a different but similar interval
    assert np.allclose(win_rate(new, base, seed=3)["ci95"], other, atol=0.05)


def test_errors_on_bad_input():
    with pytest.raises(ValueError, match="equal lengths"):
        win_rate([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="empty"):
        win_rate([], [])
    with pytest.raises(ValueError, match=r"2 NaN.*first at index 1"):
        win_rate([1.0, float("nan"), 3.0, float("nan")], [0.0, 0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="scores_base has 1 NaN"):
        win_rate([1.0], [float("nan")])
    with pytest.raises(ValueError, match="tie_margin"):
        win_rate([1.0], [0.0], tie_margin=-1)


def test_from_outcomes_matches_scores():
    outcomes = ["win", "win", "win", "tie", "loss"]
    wr = win_rate_from_outcomes(outcomes)
    assert wr == win_rate([2.0, 3.0, 4.0, 1.0, 0.0], [1.0] * 5)
    assert win_rate_from_outcomes(["a", "a", "a", "tie", "b"]) == wr  # "a" = new wins
    assert win_rate_from_outcomes(["WIN", " Tie "])["rate"] == pytest.approx(0.75)


def test_from_outcomes_errors():
    with pytest.raises(ValueError, match="at least one"):
        win_rate_from_outcomes([])
    with pytest.raises(ValueError, match=r"outcome 1 is 'draw'"):
        win_rate_from_outcomes(["win", "draw"])


# ---------------------------------------------------------------------------------- plots


def _is_png(path) -> bool:
    return path.is_file() and path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG_MAGIC


def test_training_curves_from_jsonl(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    recs = [
        {"step": s, "loss": 0.69 - 0.001 * s, "implicit_acc": 0.5 + s / 400, "grad_norm": None, "lr": 1e-4}
        for s in range(1, 101)
    ]
    metrics.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    out = plot_training_curves(metrics, tmp_path / "sub" / "curves.png")  # reward_margin absent: skipped
    assert out == tmp_path / "sub" / "curves.png" and _is_png(out)
    assert _is_png(plot_training_curves(recs, tmp_path / "from_list.png", keys=("loss", "grad_norm", "lr")))


def test_training_curves_errors(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="no metric records"):
        plot_training_curves(empty, tmp_path / "x.png")
    with pytest.raises(ValueError, match="'step'"):
        plot_training_curves([{"loss": 1.0}], tmp_path / "x.png")
    with pytest.raises(ValueError, match="none of the keys"):
        plot_training_curves([{"step": 1, "other": 1.0}], tmp_path / "x.png")
    with pytest.raises(ValueError, match="not found"):
        plot_training_curves(tmp_path / "missing.jsonl", tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_winrate_and_histogram_plots(tmp_path):
    rng = np.random.default_rng(0)
    base, new = rng.normal(0, 1, 100), rng.normal(0.3, 1, 100)
    wrs = {"dpo vs base (oracle)": win_rate(new, base), "rwr vs base (oracle)": win_rate(base, new)}
    assert _is_png(plot_winrates(wrs, tmp_path / "wr.png"))
    assert _is_png(plot_score_histograms({"base": base.tolist(), "DPO": new.tolist()}, tmp_path / "hist.png"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hist.png", "wr.png"]  # no temp files left


# ---------------------------------------------------------------------------------- report


def test_report_files(tmp_path):
    wr = win_rate([2.0, 3.0, 4.0, 1.0, 0.0], [1.0] * 5)
    wr["mean_score"] = {"base": 1.0, "aligned": 2.0}
    wr["per_attribute"] = {"color": {"base": 0.25, "aligned": 0.75}}
    other = win_rate([0.0, 1.0], [1.0, 1.0])
    report = {
        "winrate": {"oracle": wr, "clip": {"dpo": other}},
        "timings_s": {"pretrain": 12.5, "dpo": 125.0},
        "quick": True,
        "seed": 0,
        "data": {"pairs": 64, "ties": 3},
        "reward_model": {"accuracy": 0.75, "accuracy_ci95": [0.7, 0.8]},
        "config": {"nested": {"ignored": 1}},
        "artifacts": {"winrates": "winrates.png", "grid": tmp_path / "grid.gif", "log": "train.log"},
    }
    json_path, md_path = write_report(report, tmp_path / "out")
    assert json_path == tmp_path / "out" / "report.json" and md_path == tmp_path / "out" / "report.md"

    loaded = json.loads(json_path.read_text())
    assert loaded["winrate"]["oracle"]["rate"] == pytest.approx(0.7)
    assert list(loaded) == sorted(loaded)
    assert loaded["artifacts"]["grid"] == str(tmp_path / "grid.gif")

    md = md_path.read_text()
    assert md.startswith("# ")
    assert "| oracle | 0.700 |" in md and "3 / 1 / 1" in md
    assert "| dpo (clip) | 0.250 |" in md
    assert "| dpo | 125 | 2:05 |" in md  # timings
    assert "| quick | True |" in md and "| pairs | 64 |" in md
    assert "| color | 0.25 | 0.75 |" in md
    assert "| accuracy_ci95 | [0.700, 0.800] |" in md  # a dict with a CI still gets its table
    assert "![winrates](winrates.png)" in md and "[log](train.log)" in md
    assert "grid.gif)" in md
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["report.json", "report.md"]


def test_report_rejects_unserialisable(tmp_path):
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        write_report({"x": object()}, tmp_path)
    assert not (tmp_path / "report.json").exists()
