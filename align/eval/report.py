"""Evaluation reports: ``report.json`` (everything, machine-readable) and ``report.md`` (a summary).

The report is a plain dict. Keys this module understands:

- ``"winrate"``: judge name -> a win-rate dict (from :mod:`align.eval.winrate`), or judge name ->
  method name -> win-rate dict. A win-rate dict may also carry ``"mean_score"`` (e.g.
  ``{"base": .., "aligned": ..}``) and ``"per_attribute"`` (attribute -> such a dict).
- ``"timings_s"``: step name -> seconds.
- ``"artifacts"``: name -> path of a PNG/GIF/other file, relative to the report's folder.
- ``"title"``: the markdown title (optional).
- ``"agreement"``: ``"judge1 vs judge2"`` -> share of comparisons whose score gaps agree in sign,
  and ``"suspect_judges"``: judges that prefer the new model while the others do not (both from
  :func:`align.eval.evaluate.judge_winrates`); shown together under "Judges".

Other top-level entries appear in the markdown when they are scalars, or flat dicts of scalars
(one small table each); everything is in ``report.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from align.atomic import atomic_write_text

_KNOWN = {"title", "winrate", "timings_s", "artifacts", "agreement", "suspect_judges"}
_IMAGE_SUFFIXES = (".png", ".gif", ".jpg", ".jpeg", ".svg", ".webp")


def write_report(report: dict, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``report.json`` (indent 2, sorted keys) and ``report.md`` into ``out_dir``, atomically.

    Paths and numpy values in ``report`` are converted to JSON (str, numbers, lists). Returns
    ``(json_path, md_path)``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(report, indent=2, sort_keys=True, default=_to_json) + "\n"
    json_path = atomic_write_text(out / "report.json", text)
    md_path = atomic_write_text(out / "report.md", render_markdown(report, out))
    return json_path, md_path


def render_markdown(report: dict, out_dir: str | Path | None = None) -> str:
    """The markdown summary of ``report``; artifact paths are made relative to ``out_dir`` if given."""
    parts = [f"# {report.get('title', 'vidalign report')}"]

    rows = list(_winrate_rows(report.get("winrate") or {}))
    if rows:
        parts.append("## Win rates")
        parts.append(
            "Paired comparisons (same prompt and seed) of the new model against its baseline. "
            "A tie counts as half a win, so 0.5 means no difference. "
            "95% CI: percentile bootstrap over comparisons."
        )
        table = [
            [name, f"{wr['rate']:.3f}", _fmt_ci(wr.get("ci95")), wr.get("n", ""), _fmt_wtl(wr)] for name, wr in rows
        ]
        parts.append(_table(["comparison", "win rate", "95% CI", "n", "wins / ties / losses"], table))
        for name, wr in rows:
            scores = _score_table(wr)
            if scores:
                parts.append(f"### Mean scores: {name}")
                parts.append(scores)

    judges = _judges_section(report)
    if judges:
        parts.append(judges)

    timings = report.get("timings_s") or {}
    if timings:
        parts.append("## Timings")
        parts.append(_table(["step", "seconds", "min:s"], [[k, _fmt(v), _fmt_minutes(v)] for k, v in timings.items()]))

    scalars = [[k, _fmt(v)] for k, v in report.items() if k not in _KNOWN and _is_scalar(v)]
    if scalars:
        parts.append("## Summary")
        parts.append(_table(["key", "value"], scalars))
    for key, value in report.items():
        if key not in _KNOWN and isinstance(value, dict) and value and all(_is_cell(v) for v in value.values()):
            parts.append(f"## {key}")
            cells = [[k, _fmt_ci(v) if _is_ci(v) else _fmt(v)] for k, v in value.items()]
            parts.append(_table(["key", "value"], cells))

    artifacts = report.get("artifacts") or {}
    if artifacts:
        parts.append("## Artifacts")
        for name, rel in artifacts.items():
            link = _relative(rel, out_dir)
            is_image = Path(link).suffix.lower() in _IMAGE_SUFFIXES
            parts.append(f"### {name}\n\n![{name}]({link})" if is_image else f"- [{name}]({link})")

    return "\n\n".join(parts) + "\n"


def _winrate_rows(winrate: dict):
    """Yield ``(name, winrate_dict)`` for judge -> dict and judge -> method -> dict layouts."""
    for judge, entry in winrate.items():
        if not isinstance(entry, dict):
            continue
        methods = [(m, wr) for m, wr in entry.items() if isinstance(wr, dict) and "rate" in wr]
        if methods:  # judge -> method -> dict (a top-level "rate" then repeats the first method)
            for method, wr in methods:
                yield f"{method} ({judge})", wr
        elif "rate" in entry:
            yield str(judge), entry


def _judges_section(report: dict) -> str:
    """Agreement between judges and the reward-hacking flag, or "" when the report has neither."""
    agreement, suspect = report.get("agreement") or {}, report.get("suspect_judges")
    if not agreement and suspect is None:
        return ""
    parts = ["## Judges"]
    if agreement:
        parts.append(
            "Agreement: the share of comparisons on which two judges' score gaps (aligned - base) have the "
            "same sign (ties agree with ties)."
        )
        parts.append(_table(["judges", "agreement"], [[k, _fmt(v)] for k, v in agreement.items()]))
    if suspect:
        parts.append(
            "**Suspect judges** (they prefer the aligned model, 95% CI above 0.5, while the other judges do "
            f"not: look at the videos for reward hacking): {', '.join(suspect)}"
        )
    elif suspect is not None and len(report.get("winrate") or {}) > 1:
        parts.append("No judge prefers the aligned model while the others do not.")
    return "\n\n".join(parts)


def _score_table(wr: dict) -> str:
    """A table of mean scores: the total row from ``mean_score``, then one row per attribute."""
    rows = {}
    if isinstance(wr.get("mean_score"), dict):
        rows["total"] = wr["mean_score"]
    for attr, means in (wr.get("per_attribute") or {}).items():
        if isinstance(means, dict):
            rows[attr] = means
    if not rows:
        return ""
    cols = list(dict.fromkeys(c for means in rows.values() for c in means))
    return _table(["score", *cols], [[name, *(_fmt(means.get(c, "")) for c in cols)] for name, means in rows.items()])


def _table(header: list[str], rows: list[list]) -> str:
    """A markdown table; ``|`` inside cells is escaped."""
    cell = lambda v: str(v).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _fmt(v) -> str:
    """Floats to 4 significant digits; everything else via ``str``."""
    if isinstance(v, (float, np.floating)):
        return f"{float(v):.4g}"
    return str(v)


def _fmt_ci(ci) -> str:
    """``[lo, hi]`` as "[0.412, 0.588]" (empty if absent)."""
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci is not None and len(ci) == 2 else ""


def _fmt_wtl(wr: dict) -> str:
    """Wins / ties / losses counts as "12 / 3 / 5"."""
    return " / ".join(str(wr.get(k, "?")) for k in ("wins", "ties", "losses"))


def _fmt_minutes(seconds) -> str:
    """Seconds as "m:ss" (empty for non-numbers)."""
    if not isinstance(seconds, (int, float, np.number)) or isinstance(seconds, bool):
        return ""
    m, s = divmod(int(round(float(seconds))), 60)
    return f"{m}:{s:02d}"


def _is_scalar(v) -> bool:
    """True for None, bools, numbers and strings (including numpy scalars)."""
    return v is None or isinstance(v, (bool, int, float, str, np.generic))


def _is_ci(v) -> bool:
    """True for a ``[lo, hi]`` pair of numbers (a confidence interval)."""
    return isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(x, (int, float, np.number)) for x in v)


def _is_cell(v) -> bool:
    """What a key/value table can show in one cell: a scalar or a confidence interval."""
    return _is_scalar(v) or _is_ci(v)


def _relative(path, out_dir: str | Path | None) -> str:
    """``path`` as a POSIX string, relative to ``out_dir`` when it is an absolute path inside it."""
    p = Path(path)
    if out_dir is not None and p.is_absolute() and p.is_relative_to(Path(out_dir).absolute()):
        p = p.relative_to(Path(out_dir).absolute())
    return p.as_posix()


def _to_json(obj):
    """JSON fallback for ``json.dumps``: paths to str, numpy scalars/arrays to Python values."""
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"report value of type {type(obj).__name__} is not JSON-serialisable: {obj!r}")
