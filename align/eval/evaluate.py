"""Paired evaluation: the aligned model against its base, same prompts and same seeds, by any judge.

``run_eval`` is ``vidalign eval``: the base (the aligned model with its LoRA switched off, or
another LoRA given as the baseline) and the aligned model sample every (prompt, seed) into
``OUT/samples/base`` and ``OUT/samples/aligned`` (``align.generation.sample_to_disk``: reused
from disk when present), so both start from identical noise and differ only by the adapter.
Each (prompt, seed) is one comparison. Per judge: the paired win rate with ties counted as one
half, wins / ties / losses, a bootstrap 95% confidence interval and the mean scores; with two
or more judges, their pairwise agreement and the judges that prefer the aligned model while
the others do not (``align.eval.winrate.suspect_judges``). ``--judge human`` writes a blinded
A/B task for annotators (``align.eval.human.write_ab_task``). Outputs: ``report.json``,
``report.md``, ``winrates.png`` and a side-by-side grid (``side_by_side.mp4`` / ``.gif``).
Under ``accelerate launch`` with N processes both models' sampling and every judge's scoring
are sharded by (prompt, seed) and the scores gathered before the win rates (the same as one
process's); the main process writes the outputs.

The prompt A/B (``--prompt-rewriter SPEC --baseline-prompts plain``): the base arm samples the
plain prompts and the candidate arm the prompts rewritten by SPEC (:mod:`align.prompting`),
same seeds, in the same report; without ``--lora`` both arms are the one model, so the win
rate is what prompt rewriting alone buys. Judges, the report and the human A/B task see the
original prompts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from align import distributed
from align.eval.winrate import judge_agreement, suspect_judges, win_rate
from align.generation import score_samples
from align.sample import SamplingOptions


@dataclass
class EvalConfig:
    """What ``vidalign eval`` compares and how it samples: ``sampling.seeds_per_prompt`` seeds
    per prompt (``seed, seed + 1, ...`` over the expanded list), the same for both models."""

    model: str
    lora: str | None  # None: only with baseline_prompts "plain" (one model, two prompt arms)
    prompts: list[str]
    out: str
    judges: list[str] = field(default_factory=list)  # judge specs (align.judges); "human" writes an A/B task
    baseline_lora: str | None = None  # None: the base model (the aligned model's adapters off)
    sampling: SamplingOptions = field(default_factory=lambda: SamplingOptions(seeds_per_prompt=5))
    tie_margin: float = 0.0  # |score gap| at or below which a comparison is a tie, in each judge's units
    resume: bool = True  # reuse samples already under OUT/samples
    progress: bool = True
    # "plain": the baseline arm samples the plain prompts, the candidate the prompts rewritten by
    # sampling.prompt_rewriter (the prompt A/B); "same": both arms sample the same prompts
    baseline_prompts: str = "same"

    def __post_init__(self) -> None:
        if self.baseline_prompts not in ("same", "plain"):
            raise ValueError(f"--baseline-prompts must be same or plain, got {self.baseline_prompts!r}")
        if self.baseline_prompts == "plain" and not self.sampling.prompt_rewriter:
            raise ValueError("--baseline-prompts plain compares against rewritten prompts: give --prompt-rewriter SPEC")
        if self.lora is None and self.baseline_prompts != "plain":
            raise ValueError("eval needs --lora (aligned vs base), or --prompt-rewriter with --baseline-prompts plain")
        if self.lora is None and self.baseline_lora:
            raise ValueError("--baseline-lora needs --lora (the candidate's LoRA)")

    def arms(self) -> tuple[str, str]:
        """The names of the baseline and the candidate arm (the plots' and the A/B task's)."""
        if self.baseline_prompts == "same":
            return "base", "aligned"
        if self.lora is None:
            return "plain prompts", "rewritten prompts"
        return ("baseline LoRA" if self.baseline_lora else "base") + ", plain prompts", "aligned, rewritten prompts"


def reward_winrate(
    reward_model, base: np.ndarray, aligned: np.ndarray, prompts: list[str], tie_margin: float = 0.0, seed: int = 0
) -> dict:
    """Win rate of aligned over base videos (same prompts and seeds) judged by a reward model
    (or any judge: an object with ``score(videos, prompts)``)."""
    old = np.asarray(reward_model.score(base, prompts), dtype=np.float64)
    new = np.asarray(reward_model.score(aligned, prompts), dtype=np.float64)
    out = win_rate(new.tolist(), old.tolist(), tie_margin=tie_margin, seed=seed)
    out["mean_score"] = {"base": float(old.mean()), "aligned": float(new.mean())}
    return out


def judge_winrates(
    base: dict[str, np.ndarray], aligned: dict[str, np.ndarray], tie_margin: float = 0.0, seed: int = 0
) -> dict:
    """``{"winrate": judge -> win-rate dict with mean scores, "agreement": ..., "suspect_judges": [...]}``
    from each judge's scores of the base and the aligned videos (paired by index)."""
    winrate = {}
    for name in base:
        wr = win_rate(aligned[name], base[name], tie_margin=tie_margin, seed=seed)
        wr["mean_score"] = {"base": float(np.mean(base[name])), "aligned": float(np.mean(aligned[name]))}
        winrate[name] = wr
    out: dict = {"winrate": winrate, "suspect_judges": suspect_judges(winrate)}
    if len(base) > 1:
        out["agreement"] = judge_agreement({k: aligned[k] - base[k] for k in base}, tie_margin)
    return out


def _oracle_attributes(judges, base_dir, aligned_dir, base_rows, aligned_rows) -> dict:
    """Per-attribute mean scores when the oracle judges (the demo's world)."""
    from align.generation import read_samples
    from align.judges import OracleJudge

    oracle = next((j for j in judges if isinstance(j, OracleJudge)), None)
    if oracle is None:
        return {}
    means = {}
    for side, d, rows in (("base", base_dir, base_rows), ("aligned", aligned_dir, aligned_rows)):
        videos, _ = read_samples(d, rows)
        scores = oracle.attribute_scores(videos, [r["prompt"] for r in rows])
        for attr in scores[0]:
            if attr != "total":
                means.setdefault(attr, {})[side] = float(np.mean([s[attr] for s in scores]))
    return means


def sample_pairs(cfg: EvalConfig, prompts: list[str], seeds: list[int]) -> tuple[Path, list[dict], Path, list[dict]]:
    """Sample base and aligned into ``OUT/samples/{base,aligned}``; return both dirs and index rows.
    With a prompt rewriter both arms share one rewrite cache, ``OUT/rewrites.jsonl`` (the same
    rewrite of a prompt in both); with ``baseline_prompts`` "plain" the base arm samples the
    plain prompts, and without a LoRA both arms are the one model."""
    import contextlib
    import gc

    from align.generation import load_generator, sample_to_disk
    from align.models.lora import adapters_disabled
    from align.prompting import rewrite_ahead

    out, device = Path(cfg.out) / "samples", cfg.sampling.device
    plain = cfg.sampling.replace(prompt_rewriter=None, rewrite_instruction=None)
    cache = Path(cfg.out) / "rewrites.jsonl"
    rewrite_ahead(cfg.sampling, prompts, cache)  # before the generator loads and anything is sampled

    def sample(model, name: str, lora):
        options = plain if name == "base" and cfg.baseline_prompts == "plain" else cfg.sampling
        return sample_to_disk(
            model, prompts, seeds, out / name, options, model_name=str(cfg.model), lora=lora,
            resume=cfg.resume, progress=cfg.progress, desc=f"eval {name}", rewrite_cache=cache,
        )  # fmt: skip

    if cfg.baseline_lora:
        model = load_generator(cfg.model, cfg.baseline_lora, device)
        base_rows = sample(model, "base", str(cfg.baseline_lora))
        del model
        gc.collect()
        model = load_generator(cfg.model, cfg.lora, device)
    else:
        model = load_generator(cfg.model, cfg.lora, device)
        with adapters_disabled(model.denoiser) if cfg.lora else contextlib.nullcontext():
            base_rows = sample(model, "base", None)
    aligned_rows = sample(model, "aligned", None if cfg.lora is None else str(cfg.lora))
    return out / "base", base_rows, out / "aligned", aligned_rows


def _judges(cfg: EvalConfig) -> tuple[list, bool]:
    """The judges of ``cfg`` (built, every spec and prompt checked) and whether a human A/B task
    is asked for; on this process's device."""
    from align.judges import check_prompts, load_judges

    human = "human" in cfg.judges
    specs = [s for s in cfg.judges if s != "human"]
    if not specs and not human:
        raise ValueError(
            "eval needs at least one judge: --judge reward:DIR, clip:MODEL[@WEIGHTS], http:URL or human "
            "(oracle: the demo's synthetic world only)"
        )
    judges = load_judges(specs, device=distributed.local_device(cfg.sampling.device))
    check_prompts(judges, cfg.prompts)
    if human:
        from align.eval.human import write_ab_task  # noqa: F401  (fails here, before sampling, if missing)
    return judges, human


def _header(cfg: EvalConfig, comparisons: int, base_rows: list[dict]) -> dict:
    """The report's fields that describe the run."""
    base, candidate = cfg.arms()
    if cfg.baseline_prompts == "same":
        base = "baseline LoRA" if cfg.baseline_lora else "base"
    return {
        "title": f"vidalign eval: {candidate} vs {base}",
        "model": str(cfg.model),
        "lora": None if cfg.lora is None else str(cfg.lora),
        "baseline": str(cfg.baseline_lora or ("base (LoRA adapters off)" if cfg.lora else "the model as given")),
        "prompts": len(cfg.prompts),
        "seeds_per_prompt": cfg.sampling.seeds_per_prompt,
        "comparisons": comparisons,
        "sampling": {
            "steps": cfg.sampling.num_steps,
            "guidance": cfg.sampling.guidance_scale,
            "sampler": base_rows[0]["sampler"],
        },
        "video_size": "x".join(str(x) for x in base_rows[0]["size"]),
        "tie_margin": cfg.tie_margin,
        "artifacts": {},
    } | (
        {
            "prompt_rewriter": cfg.sampling.prompt_rewriter,
            "baseline_prompts": cfg.baseline_prompts,
            "arms": dict(zip(("base", "aligned"), cfg.arms())),  # what mean_score's keys and samples/ name
        }
        if cfg.sampling.prompt_rewriter
        else {}
    )


def run_eval(cfg: EvalConfig) -> dict:
    """``vidalign eval``: sample, judge, write the report (see the module docstring); returns it.
    Judges are built (and every spec checked) before anything is sampled. Under N processes
    sampling and judging are sharded, the scores gathered, and the main process writes the
    report and its artifacts (the others return the win rates only)."""
    judges, human = _judges(cfg)
    prompts, seeds = cfg.sampling.expand(cfg.prompts)
    base_dir, base_rows, aligned_dir, aligned_rows = sample_pairs(cfg, prompts, seeds)
    report = _header(cfg, len(prompts), base_rows)
    if judges:
        report |= judge_winrates(
            score_samples(judges, base_dir, base_rows),
            score_samples(judges, aligned_dir, aligned_rows),
            cfg.tie_margin,
            cfg.sampling.seed,
        )
    if not distributed.is_main():
        return report
    samples = (base_dir, base_rows, aligned_dir, aligned_rows)
    _write_artifacts(cfg, report, judges, samples, human)
    return report


def _write_artifacts(cfg: EvalConfig, report: dict, judges: list, samples: tuple, human: bool) -> None:
    """Per-attribute oracle means, the win-rate plot, the side-by-side grid, the human A/B task
    and ``report.json`` / ``report.md`` under ``cfg.out`` (``report`` is completed in place)."""
    from align.eval.grid import write_side_by_side
    from align.eval.plots import plot_winrates
    from align.eval.report import write_report

    out = Path(cfg.out)
    base_dir, base_rows, aligned_dir, aligned_rows = samples
    if judges:
        attrs = _oracle_attributes(judges, base_dir, aligned_dir, base_rows, aligned_rows)
        if attrs:
            report["winrate"]["oracle"]["per_attribute"] = attrs
        base, candidate = cfg.arms()
        plot_winrates({f"{candidate} vs {base} ({k})": wr for k, wr in report["winrate"].items()}, out / "winrates.png")
        report["artifacts"]["winrates"] = "winrates.png"
    gif, mp4 = write_side_by_side(*samples, out / "side_by_side", fps=cfg.sampling.fps)
    report["artifacts"] |= {"side by side (gif)": gif.name, "side by side (mp4)": mp4.name}
    if human:
        from align.eval.human import write_ab_task

        task = write_ab_task(
            [base_dir / r["file"] for r in base_rows],
            [aligned_dir / r["file"] for r in aligned_rows],
            [r["prompt"] for r in base_rows],
            [r["seed"] for r in base_rows],
            out / "human",
            names=cfg.arms(),
            seed=cfg.sampling.seed,
        )
        report["human_task"] = str(task)
    write_report(report, out)
