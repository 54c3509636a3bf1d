"""Tests of win rates with bootstrap CIs, the plots, and the markdown/JSON report."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import PROMPT

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


# ---------------------------------------------------------------------------------- judges


def test_judge_winrates_agreement_and_suspect_by_hand():
    from align.eval.evaluate import judge_winrates
    from align.eval.winrate import judge_agreement, suspect_judges

    base = {"rm": np.zeros(8), "clip": np.zeros(8)}
    aligned = {"rm": np.ones(8), "clip": np.array([1.0, -1, 0, 1, -1, 0, 1, -1])}
    res = judge_winrates(base, aligned)
    assert res["winrate"]["rm"]["rate"] == 1.0 and res["winrate"]["rm"]["mean_score"] == {"base": 0.0, "aligned": 1.0}
    assert (res["winrate"]["clip"]["wins"], res["winrate"]["clip"]["ties"]) == (3, 2)
    assert res["agreement"] == {"rm vs clip": pytest.approx(3 / 8)}
    assert res["suspect_judges"] == ["rm"]  # rm prefers aligned (CI > 0.5), clip does not
    assert suspect_judges({"a": res["winrate"]["rm"], "b": res["winrate"]["rm"]}) == []  # both prefer it
    assert suspect_judges({"a": res["winrate"]["rm"]}) == []  # one judge: nothing to compare with
    assert judge_agreement({"a": [0.1, -0.1], "b": [0.2, 0.05]}, tie_margin=0.06) == {"a vs b": 0.5}
    with pytest.raises(ValueError, match="different numbers of comparisons"):
        judge_agreement({"a": [1.0], "b": [1.0, 2.0]})


def test_report_shows_agreement_and_suspect_judges(tmp_path):
    wr = win_rate([1.0] * 6, [0.0] * 6)
    report = {"winrate": {"rm": wr, "clip": wr}, "agreement": {"rm vs clip": 0.5}, "suspect_judges": ["rm"]}
    md = write_report(report, tmp_path)[1].read_text()
    assert "## Judges" in md and "| rm vs clip | 0.5 |" in md and "**Suspect judges**" in md and ": rm" in md
    report["suspect_judges"] = []
    assert "No judge prefers" in write_report(report, tmp_path)[1].read_text()


# ------------------------------------------------------------------------- eval, tiny model


def _lora(model_dir, path, seed):
    import torch

    from align.models import load_model
    from align.models.lora import attach_lora, save_lora

    torch.manual_seed(seed)
    m = load_model(model_dir)
    attach_lora(m.denoiser, rank=4, alpha=4.0)
    for n, p in m.denoiser.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.3)
    return save_lora(m.denoiser, path)


@pytest.fixture(scope="module")
def eval_assets(tiny_model_dir, tmp_path_factory):
    import torch

    from reward_models.model import RewardModelConfig, VideoRewardModel

    root = tmp_path_factory.mktemp("eval_assets")
    torch.manual_seed(0)
    VideoRewardModel(RewardModelConfig(num_frames=2)).save_pretrained(root / "rm")
    return {"model": tiny_model_dir, "lora": _lora(tiny_model_dir, root / "lora", 1), "rm": root / "rm", "root": root}


def _cfg(a, out, **kw):
    """An EvalConfig; keywords that are SamplingOptions fields go into its ``sampling``."""
    from dataclasses import fields

    from align.eval.evaluate import EvalConfig
    from align.sample import SamplingOptions

    base = dict(
        model=str(a["model"]),
        lora=str(a["lora"]),
        prompts=["a robot walking on the street in rain", "a lighthouse at dusk"],
        out=str(out),
        judges=[f"reward:{a['rm']}", "clip:vidalign-tiny-clip"],
        seeds_per_prompt=2,
        num_steps=2,
        device="cpu",
        progress=False,
    )
    cfg = base | kw
    names = {f.name for f in fields(SamplingOptions)}
    sampling = SamplingOptions(**{k: cfg.pop(k) for k in list(cfg) if k in names})
    return EvalConfig(**cfg, sampling=sampling)


@pytest.mark.filterwarnings("ignore:judge clip")
def test_eval_with_reward_and_clip_judges(eval_assets, tmp_path, monkeypatch):
    from align.eval.evaluate import run_eval

    out = tmp_path / "eval"
    report = run_eval(_cfg(eval_assets, out))
    saved = json.loads((out / "report.json").read_text())
    assert set(saved["winrate"]) == {f"reward:{eval_assets['rm']}", "clip:vidalign-tiny-clip"}
    for wr in saved["winrate"].values():
        assert wr["n"] == 4 and wr["ci95"][0] <= wr["rate"] <= wr["ci95"][1]
        assert wr["wins"] + wr["ties"] + wr["losses"] == 4 and set(wr["mean_score"]) == {"base", "aligned"}
    assert saved["winrate"]["clip:vidalign-tiny-clip"]["ties"] < 4  # the LoRA changed the videos
    assert list(saved["agreement"]) == [f"reward:{eval_assets['rm']} vs clip:vidalign-tiny-clip"]
    assert saved["suspect_judges"] == report["suspect_judges"] and saved["comparisons"] == 4
    for name in ("report.md", "winrates.png", "side_by_side.gif", "side_by_side.mp4"):
        assert (out / name).stat().st_size > 0, name
    base = [json.loads(x) for x in (out / "samples" / "base" / "index.jsonl").read_text().splitlines()]
    aligned = [json.loads(x) for x in (out / "samples" / "aligned" / "index.jsonl").read_text().splitlines()]
    assert [(r["prompt"], r["seed"]) for r in base] == [(r["prompt"], r["seed"]) for r in aligned]
    assert base[0]["lora"] is None and aligned[0]["lora"] == str(eval_assets["lora"])
    # a second run with other judges judges the samples on disk: nothing is sampled again
    import align.generation

    monkeypatch.setattr(align.generation, "_sample_batch", lambda *a: pytest.fail("sampled again"))
    again = run_eval(_cfg(eval_assets, out, judges=["clip:vidalign-tiny-clip"]))
    assert again["winrate"]["clip:vidalign-tiny-clip"] == saved["winrate"]["clip:vidalign-tiny-clip"]
    assert "agreement" not in again and again["suspect_judges"] == []


@pytest.mark.filterwarnings("ignore:judge clip")
def test_eval_against_a_baseline_lora_and_the_human_task(eval_assets, tmp_path, monkeypatch):
    import sys
    import types

    from align.eval.evaluate import run_eval

    calls = []
    fake = types.ModuleType("align.eval.human")
    fake.write_ab_task = lambda *a, **k: calls.append((a, k)) or (tmp_path / "task")
    monkeypatch.setitem(sys.modules, "align.eval.human", fake)
    l0 = _lora(eval_assets["model"], tmp_path / "l0", 2)
    out = tmp_path / "eval"
    world = [PROMPT, "a blue circle moving up on a gray background"]  # the oracle judges the demo's world only
    report = run_eval(_cfg(eval_assets, out, baseline_lora=str(l0), judges=["human", "oracle"], prompts=world))
    assert report["baseline"] == str(l0) and report["human_task"] == str(tmp_path / "task")
    assert report["winrate"]["oracle"]["n"] == 4 and "direction" in report["winrate"]["oracle"]["per_attribute"]
    (files_a, files_b, prompts, seeds, task_dir), kw = calls[0]
    assert files_a[0] == out / "samples" / "base" / "0000_seed0.mp4" and files_b[0].parent.name == "aligned"
    assert prompts[:2] == [PROMPT] * 2 and seeds == [0, 1, 2, 3]
    assert task_dir == out / "human" and kw["names"] == ("base", "aligned")
    assert json.loads((out / "samples" / "base" / "index.jsonl").read_text().splitlines()[0])["lora"] == str(l0)


@pytest.mark.filterwarnings("ignore:judge clip")
def test_eval_errors_come_before_sampling(eval_assets, tmp_path):
    from align.eval.evaluate import run_eval

    out = tmp_path / "eval"
    for kw, msg in [
        (dict(judges=[]), "eval needs at least one judge: --judge reward:DIR"),
        (dict(judges=["pickscore"]), "unknown judge 'pickscore'"),
        (dict(judges=[f"reward:{tmp_path}"]), "is not a vidalign reward model"),
        (dict(judges=["oracle"]), "oracle knows only the demo's synthetic world"),
        (dict(seeds_per_prompt=0), "--seeds-per-prompt must be >= 1"),
        (dict(num_frames=9), "8x32x32"),
    ]:
        with pytest.raises(ValueError, match=msg):
            run_eval(_cfg(eval_assets, out, **kw))
    assert not (out / "samples" / "base").exists()
