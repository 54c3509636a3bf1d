"""People as the judge: blinded A/B studies in the annotation app, and their labels as a win rate.

:func:`write_ab_task` lays out a pair set that ``vidalign annotate serve TASK --db DB`` serves
like any preference dataset: ``metadata.jsonl`` (``prompt``, ``video_a``, ``video_b``, an empty
``preference``, ``seed``) and ``videos/``, one row per (prompt, seed) with the two models'
videos of it. Which model is ``video_a`` is a coin flip per pair (``numpy`` generator seeded by
``seed``), and the videos are copied (hard-linked where possible) under the first 20 hex digits
of the SHA-256 of their content, so neither a file name, a URL nor a row tells one model from
the other. The server then shows each annotator ``video_a`` on the left or the right by a second
coin flip drawn from the database's own random seed, which is never served. The answer key,
``ab_key.json`` (per row: which model is ``a`` and which ``b``, and the source files), lies in the
task folder but is not a video of any pair, and the server serves nothing else (404).

:func:`human_report` reads the labels and the key and reports, in the format of ``vidalign
eval``'s judge reports (:mod:`align.eval.winrate`, :mod:`align.eval.report`):

- the human win rate of the evaluated model (``names[1]``, e.g. ``aligned``) over the baseline
  (``names[0]``): one outcome per pair, the majority of its annotators' votes (a shared top count
  is a tie, as in ``vidalign annotate export``), ties counting one half, with a percentile
  bootstrap 95% CI over pairs; the vote-level rate (every label one outcome) beside it;
- the same per aspect (visual quality, motion, text alignment) where annotators answered them;
- position bias: among decided votes, the share won by the video shown on the left (0.5: none),
  with its bootstrap CI, and how often the evaluated model was the one on the left;
- agreement: Fleiss' kappa over pairs with two or more labels and Cohen's kappa for each two
  annotators (:mod:`align.annotate.stats`), on the categories evaluated / baseline / tie;
- per annotator: labels, skips, tie rate, left rate and the evaluated model's vote rate.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np

from align.annotate.export import majority_vote
from align.annotate.stats import agreement_stats, json_safe
from align.annotate.storage import ASPECTS, LabelStore
from align.atomic import atomic_write, atomic_write_text, file_sha256
from align.eval.winrate import bootstrap_ci, win_rate_from_outcomes

KEY_FILE = "ab_key.json"
TABLE_FILE = "metadata.jsonl"
VIDEO_DIR = "videos"
KEY_FORMAT = "vidalign-ab-task"


def write_ab_task(
    files_a: list[Path],
    files_b: list[Path],
    prompts: list[str],
    seeds: list[int],
    out_dir: Path,
    names: tuple[str, str] = ("base", "aligned"),
    seed: int = 0,
) -> Path:
    """Write a blinded A/B pair set into ``out_dir`` and return ``out_dir``.

    ``files_a[i]`` is model ``names[0]``'s video of ``prompts[i]`` with noise seed ``seeds[i]``,
    ``files_b[i]`` model ``names[1]``'s of the same; ``names[1]`` is the model under evaluation.
    Writing the same inputs again gives the same task (so an annotation database stays bound to
    it). Raises ``ValueError`` / ``FileNotFoundError`` naming the index of a bad input."""
    files_a, files_b = [Path(f) for f in files_a], [Path(f) for f in files_b]
    prompts, seeds = list(prompts), [int(s) for s in seeds]
    n = len(files_a)
    if n == 0:
        raise ValueError("an A/B task needs at least one pair of videos")
    if not (len(files_b) == len(prompts) == len(seeds) == n):
        raise ValueError(
            f"an A/B task needs one entry per pair in each list: files_a {n}, files_b {len(files_b)}, "
            f"prompts {len(prompts)}, seeds {len(seeds)}"
        )
    if len(names) != 2 or not all(isinstance(m, str) and m.strip() for m in names) or names[0] == names[1]:
        raise ValueError(f"names must be two different non-empty model names, got {names!r}")
    for i, (fa, fb, prompt) in enumerate(zip(files_a, files_b, prompts)):
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"A/B pair {i}: empty prompt")
        for f in (fa, fb):
            if not f.is_file():
                raise FileNotFoundError(f"A/B pair {i}: no such video file {f}")
        if fa.suffix.lower() != fb.suffix.lower():
            raise ValueError(
                f"A/B pair {i}: {fa.name} and {fb.name} differ in format; both models' videos must be of one "
                "format, or the format would tell the annotators which is which"
            )
    out_dir = Path(out_dir)
    (out_dir / VIDEO_DIR).mkdir(parents=True, exist_ok=True)
    flips = np.random.default_rng(seed).integers(0, 2, size=n)  # 1: names[1] (evaluated) is video_a
    rows, keys = [], []
    for i in range(n):
        first, second = (files_b[i], files_a[i]) if flips[i] else (files_a[i], files_b[i])
        model_a, model_b = (names[1], names[0]) if flips[i] else (names[0], names[1])
        va, vb = _place_blind(first, out_dir), _place_blind(second, out_dir)
        rows.append({"prompt": prompts[i], "video_a": va, "video_b": vb, "preference": "", "seed": seeds[i]})
        keys.append(
            {
                "row": i,
                "prompt": prompts[i],
                "seed": seeds[i],
                "video_a": va,
                "video_b": vb,
                "a": model_a,
                "b": model_b,
                "source_a": str(first.resolve()),
                "source_b": str(second.resolve()),
            }
        )
    key = {"format": KEY_FORMAT, "version": 1, "baseline": names[0], "evaluated": names[1], "seed": seed}
    atomic_write_text(out_dir / KEY_FILE, json.dumps({**key, "pairs": keys}, indent=1) + "\n")
    atomic_write_text(out_dir / TABLE_FILE, "".join(json.dumps(r) + "\n" for r in rows))
    return out_dir


def _place_blind(src: Path, out_dir: Path) -> str:
    """Hard-link (or copy) ``src`` to ``videos/<content hash><suffix>``; return that relative name."""
    rel = f"{VIDEO_DIR}/{file_sha256(src)[:20]}{src.suffix.lower()}"
    target = out_dir / rel
    if not target.is_file():
        atomic_write(target, lambda tmp: _link_or_copy(src, tmp))
    return rel


def _link_or_copy(src: Path, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or links not allowed: copy the bytes
        shutil.copyfile(src, dst)


# --------------------------------------------------------------------------------------------
# the report


def load_ab_key(task_dir: Path) -> dict:
    """The answer key of an A/B task folder; ``ValueError`` / ``FileNotFoundError`` if it is not one."""
    path = Path(task_dir) / KEY_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{task_dir}: not an A/B task (no {KEY_FILE}; `vidalign eval ... --judge human` writes one)"
        )
    try:
        key = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e})") from None
    if not isinstance(key, dict) or key.get("format") != KEY_FORMAT or not isinstance(key.get("pairs"), list):
        raise ValueError(f"{path}: not a vidalign A/B key (format {KEY_FORMAT!r} with a list of pairs)")
    for i, p in enumerate(key["pairs"]):
        if not isinstance(p, dict) or {p.get("a"), p.get("b")} != {key.get("baseline"), key.get("evaluated")}:
            raise ValueError(
                f"{path}: pair {i} must name the models {key.get('baseline')!r} and {key.get('evaluated')!r}"
            )
    return key


def human_report(db: Path, task_dir: Path | None = None, seed: int = 0, out_dir: Path | None = None) -> dict:
    """The human win rate and its diagnostics (see the module docstring) from the labels in
    ``db`` of the A/B task in ``task_dir`` (default: the pair source recorded in ``db`` when it was
    served). ``seed`` seeds the bootstrap. With ``out_dir`` also writes ``report.json``,
    ``report.md`` and ``winrate_human.png`` there."""
    store = LabelStore(db, create=False)
    task_dir = _task_dir(store, task_dir)
    key = load_ab_key(task_dir)
    new, old = key["evaluated"], key["baseline"]
    models = _pair_models(store, key, task_dir)  # pair id -> {"a": model, "b": model}
    labels = store.labels()
    if not labels:
        raise ValueError(f"{db}: no labels yet (serve the task with `vidalign annotate serve {task_dir} --db {db}`)")
    # every label in the evaluated model's terms: "a" = the evaluated model won, "b" = the baseline
    to_new = {pid: {s: ("a" if m[s] == new else "b") for s in ("a", "b")} | {"tie": "tie"} for pid, m in models.items()}
    votes = [
        {**r, "choice": to_new[r["pair_id"]][r["choice"]], "shown_left": to_new[r["pair_id"]][r["shown_left"]]}
        | {a: to_new[r["pair_id"]].get(r[a]) for a in ASPECTS}
        for r in labels
    ]
    skips = sum(r["choice"] == "skip" for r in store.labels(include_skips=True))
    agreement = agreement_stats(votes, len(models), int(store.meta("per_pair", "1")), skips)
    comparison = f"{new} vs {old}"
    winrates = {"human": _pair_winrate(votes, "choice", seed)}
    for aspect in ASPECTS:
        if any(v[aspect] is not None for v in votes):
            winrates[f"human: {aspect}"] = _pair_winrate(votes, aspect, seed)
    vote_rate = win_rate_from_outcomes([v["choice"] for v in votes], n_boot=1, seed=seed)
    report = {
        "title": f"Human A/B study: {comparison}",
        "comparison": {"evaluated": new, "baseline": old, "judge": "human"},
        "task": str(task_dir),
        "db": str(db),
        "pairs_total": len(models),
        "pairs_labelled": agreement["pairs_labelled"],
        "labels": len(votes),
        "skips": skips,
        "winrate": winrates,
        "votes": {k: vote_rate[k] for k in ("rate", "n", "wins", "ties", "losses")},
        "position_bias": _position_bias(votes, seed),
        "annotator_agreement": {
            "fleiss_kappa": agreement["fleiss"]["kappa"],
            "fleiss_pairs": agreement["fleiss"]["pairs"],
            "cohen_kappa_mean": agreement["cohen"]["mean"],
            "annotator_pairs": len(agreement["cohen"]["pairs"]),
            "tie_rate": agreement["tie_rate"],
        },
        "cohen": agreement["cohen"]["pairs"],
        "annotator_agreement_per_aspect": {a: s["kappa"] for a, s in agreement["aspects"].items() if s["labels"]},
        "annotators": _annotators(votes, agreement["annotators"], store, seed),
    }
    report["labels_per_annotator"] = {name: a["labels"] for name, a in report["annotators"].items()}
    report = json_safe(report)
    if out_dir is not None:
        write_human_report(report, Path(out_dir))
    return report


def write_human_report(report: dict, out_dir: Path) -> tuple[Path, Path]:
    """``report.json``, ``report.md`` and the win-rate plot of a :func:`human_report` in ``out_dir``."""
    from align.eval.plots import plot_winrates
    from align.eval.report import write_report

    c = report["comparison"]
    plot_winrates(
        report["winrate"],
        Path(out_dir) / "winrate_human.png",
        title=f"Human win rate, {c['evaluated']} vs {c['baseline']} (ties 1/2), 95% bootstrap CI over pairs",
    )
    return write_report({**report, "artifacts": {"human win rate": "winrate_human.png"}}, out_dir)


def _task_dir(store: LabelStore, task_dir: Path | None) -> Path:
    """The task folder given, or the pair source ``store`` recorded when it was served."""
    if task_dir is None:
        source = store.meta("source")
        if source is None:
            raise ValueError(f"{store.path}: records no served task; pass --task DIR (the A/B task folder)")
        task_dir = Path(source)
        if task_dir.is_file():  # served as the table file itself
            task_dir = task_dir.parent
    return Path(task_dir)


def _pair_models(store: LabelStore, key: dict, task_dir: Path) -> dict[int, dict[str, str]]:
    """Pair id in ``store`` -> which model each of its videos is, checked against the key's files."""
    rows = key["pairs"]
    out = {}
    for p in store.pairs():
        i = int(p["key"][3:]) if p["key"].startswith("row") and p["key"][3:].isdigit() else -1
        names = [Path(p[c] or "").name for c in ("video_a", "video_b")]
        if not 0 <= i < len(rows) or names != [Path(rows[i]["video_a"]).name, Path(rows[i]["video_b"]).name]:
            raise ValueError(
                f"{store.path}: pair {p['id']} ({p['key']}, videos {names}) is not a pair of the A/B task "
                f"{task_dir}; were these labels collected on another task?"
            )
        out[p["id"]] = {"a": rows[i]["a"], "b": rows[i]["b"]}
    return out


def _pair_winrate(votes: list[dict], field: str, seed: int) -> dict:
    """Win rate over pairs, each the majority of its votes in ``field`` (labels without it left out)."""
    by_pair: dict[int, list[str]] = defaultdict(list)
    for v in votes:
        if v[field] is not None:
            by_pair[v["pair_id"]].append(v[field])
    outcomes = [majority_vote(by_pair[pid]) for pid in sorted(by_pair)]
    return {**win_rate_from_outcomes(outcomes, seed=seed), "votes": sum(len(x) for x in by_pair.values())}


def _position_bias(votes: list[dict], seed: int) -> dict:
    """Share of decided votes won by the video on the left, and how often the evaluated model was there."""
    decided = np.array([v["choice"] == v["shown_left"] for v in votes if v["choice"] != "tie"], dtype=float)
    out = {
        "decided_votes": int(decided.size),
        "left_rate": float(decided.mean()) if decided.size else math.nan,
        "evaluated_shown_left": float(np.mean([v["shown_left"] == "a" for v in votes])),
    }
    if decided.size:
        out["ci95"] = list(bootstrap_ci(decided, seed=seed))
    return out


def _annotators(votes: list[dict], rates: dict[str, dict], store: LabelStore, seed: int) -> dict:
    """Per annotator: labels, skips, tie rate and left rate (from ``rates``, the agreement
    statistics' per-annotator part), and the evaluated model's vote rate."""
    skips: dict[str, int] = defaultdict(int)
    for r in store.labels(include_skips=True):
        skips[r["annotator"]] += r["choice"] == "skip"
    by: dict[str, list[str]] = defaultdict(list)
    for v in votes:
        by[v["annotator"]].append(v["choice"])
    out = {}
    for name in sorted(set(by) | {n for n, k in skips.items() if k}):
        r = rates.get(name, {"labels": 0, "tie_rate": math.nan, "left_rate": math.nan})
        rate = win_rate_from_outcomes(by[name], n_boot=1, seed=seed)["rate"] if by[name] else math.nan
        out[name] = {**r, "skips": skips[name], "evaluated_rate": rate}
    return out


# --------------------------------------------------------------------------------------------
# the command


def run_human_eval(
    db: str | Path, task_dir: str | Path | None = None, out_dir: str | Path | None = None, seed: int = 0
) -> tuple[dict, Path]:
    """``vidalign eval human``: the :func:`human_report` of the labels in ``db`` for the A/B task
    in ``task_dir`` (default: the one ``db`` was served), written to ``out_dir`` (default
    ``TASK/report``); returns ``(report, out_dir)``."""
    db = Path(db)
    task = _task_dir(LabelStore(db, create=False), Path(task_dir) if task_dir else None)
    out = Path(out_dir) if out_dir else task / "report"
    return human_report(db, task, seed=seed, out_dir=out), out


def summary_line(report: dict) -> str:
    """One line: the human win rate, CI, counts, position bias and agreement of a report."""
    wr, c, pb, ag = (
        report["winrate"]["human"],
        report["comparison"],
        report["position_bias"],
        report["annotator_agreement"],
    )

    def f(x) -> str:
        return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"

    return (
        f"human win rate {c['evaluated']} vs {c['baseline']}: {wr['rate']:.3f} "
        f"[{wr['ci95'][0]:.3f}, {wr['ci95'][1]:.3f}] over {wr['n']} pairs "
        f"({wr['wins']} wins / {wr['ties']} ties / {wr['losses']} losses; {report['labels']} labels by "
        f"{len(report['annotators'])} annotator(s)); left rate {f(pb['left_rate'])}; "
        f"Fleiss' kappa {f(ag['fleiss_kappa'])}"
    )
