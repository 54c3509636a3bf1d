"""The online round every online objective shares (online RWR, GRPO and DiffusionNFT).

A round ``r`` of ``N`` rollouts, the same on 1 or N processes:

1. **draw**: the objective lists the round's ``N`` (prompt, seed) pairs, ``group_size``
   consecutive rollouts of one prompt forming a prompt group. :func:`draw_prompts` picks the
   prompts (seeded permutations of the prompts file); each objective keeps its own seeding of
   the draw and of the rollout seeds, so its numbers are the ones it always had.
2. **sample**: this process samples its share ``local`` of the rollouts (:func:`local_columns`,
   :func:`share`) with the objective's sampler, ``sample(prompts, seeds) -> dict``: the clean
   videos (``"videos"``, uint8 ``(n, T, H, W, C)``: the end of the trajectory, what the judges
   score) plus whatever the objective keeps (GRPO: the trajectories and step log-probabilities).
   The sampler's settings are one :class:`align.sample.SamplingOptions` (:func:`sampling_options`).
   With the recipe's ``prompt_rewriter`` the sampler is conditioned on each prompt's rewrite
   (:func:`prompt_rewrites`, made once before the first round; ``Round.conditioning``) while
   the judges and the metrics see the original prompts.
3. **score**: every training (and held-out) judge scores this process's videos, after its
   sampling; the scores of all processes are gathered into ``(J, N)`` in rollout order
   (:func:`gather_rows`). A judge that raises, times out or gives a non-finite score stops the
   run on every process with an error naming the round, the judge, the rollouts and the prompt
   (never a silent 0). Judges score after this process's whole share is sampled; overlapping
   the scoring with the sampling of the next chunk (Flow-GRPO's reward thread pool) is not done
   yet: it pays off for remote ``http:`` judges, and needs chunk-wise scoring that stays
   bit-identical to scoring the share at once.
4. **combine**: :func:`align.judges.combine_judges` makes one reward per rollout (one judge:
   its raw scores; several: the weighted mean of their z-scores within each prompt group).

:func:`play_round` runs 2-4 and returns a :class:`Round`; the objective turns it into its
micro-batches (RWR: softmax weights of the reward within each group; GRPO: group-normalised
advantages). :func:`reward_stats` is the round's record in metrics.jsonl, and
:func:`mid_round_note` the note a run resumed inside a round prints (the round's rollouts are
drawn again from the restored policy: not exact; a checkpoint on a round boundary is).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from align.judges import JudgeError, combine_judges, judge_scores
from align.sample import SamplingOptions


def check_online_keys(cfg, objective: str, group_use: str) -> None:
    """The recipe checks GRPO and NFT share (their configs' ``__post_init__``): prompts and judges
    given, no dataset, judge specs as lists, weights matching the judges, held-out judges not
    trained on, groups of 2 or more (``group_use``: what the objective does with a group), the
    accumulation derived from ``rollout_batches_per_update`` alone, the round's counts >= 1."""
    if not cfg.prompts_file:
        raise ValueError(f"recipe key `prompts_file` is required for objective {objective!r} (one prompt per line)")
    if cfg.dataset:
        raise ValueError(f"recipe key `dataset` is not used by objective {objective!r} (it samples its own rollouts)")
    for key in ("judges", "judge_weights", "eval_judges"):
        if isinstance(getattr(cfg, key), str):
            setattr(cfg, key, [getattr(cfg, key)])
    if not cfg.judges:
        raise ValueError(
            f"recipe key `judges` is required for objective {objective!r} (e.g. [reward:runs/reward/best])"
        )
    if cfg.judge_weights and len(cfg.judge_weights) != len(cfg.judges):
        raise ValueError(
            f"recipe key `judge_weights` has {len(cfg.judge_weights)} value(s) for {len(cfg.judges)} judge(s)"
        )
    if any(float(w) < 0 for w in cfg.judge_weights) or (cfg.judge_weights and not sum(cfg.judge_weights) > 0):
        raise ValueError(f"recipe key `judge_weights` must be >= 0 and not all 0, got {cfg.judge_weights}")
    both = sorted(set(cfg.judges) & set(cfg.eval_judges))
    if both:
        raise ValueError(f"recipe key `eval_judges`: {both[0]!r} is also a training judge, so it is not held out")
    if cfg.group_size < 2:
        raise ValueError(f"recipe key `group_size` must be >= 2 ({group_use}), got {cfg.group_size}")
    if cfg.gradient_accumulation_steps and cfg.rollout_batches_per_update != 1:
        raise ValueError(
            "recipe keys `gradient_accumulation_steps` and `rollout_batches_per_update` both set: set only "
            "`rollout_batches_per_update` (gradient_accumulation_steps is derived from it)"
        )
    keys = ("prompts_per_round", "inner_epochs", "rollout_batch_size", "hacking_patience", "rollout_batches_per_update")
    for key in keys:
        if getattr(cfg, key) < 1:
            raise ValueError(f"recipe key `{key}` must be >= 1, got {getattr(cfg, key)}")


def sampling_options(cfg, batch_size: int | None = None) -> SamplingOptions:
    """How an online round samples, from the recipe's ``sample_steps`` and ``guidance_scale``:
    vidalign's own samplers (the objectives need their steps), ``batch_size`` rollouts at once
    per process. The rollouts' seeds are the objective's, not the options' ``seed``."""
    return SamplingOptions(
        num_steps=cfg.sample_steps, guidance_scale=cfg.guidance_scale, batch_size=batch_size, sampler="vidalign"
    )


def draw_prompts(n_prompts: int, k: int, generator: torch.Generator) -> list[int]:
    """Indices of a round's ``k`` prompts among ``n_prompts``: seeded permutations of
    ``range(n_prompts)`` from ``generator``, concatenated until there are ``k`` (so a prompts
    file shorter than a round repeats instead of shrinking the round)."""
    order: list[int] = []
    while len(order) < k:
        order += torch.randperm(n_prompts, generator=generator).tolist()
    return order[:k]


def local_columns(n: int, width: int, micro: int, rank: int) -> list[int]:
    """Rollout indices of process ``rank``: those in columns ``[rank micro, (rank + 1) micro)`` of
    ``n`` rollouts laid out in rows of ``width`` (GRPO: a process trains what it sampled)."""
    return [i for i in range(n) if (i % width) // micro == rank]


def share(n: int, world: int, rank: int) -> list[int]:
    """This process's rollouts when its training does not fix them (online RWR gathers the whole
    round): every ``world``-th from ``rank``. A round that does not split evenly is sampled whole
    by every process (DeepSpeed ZeRO-3 needs the same forward passes on every process)."""
    return local_columns(n, world, 1, rank) if n % world == 0 else list(range(n))


def gather_rows(run, local: Sequence[int], rows: torch.Tensor, n: int) -> torch.Tensor:
    """The rows of every process (``rows[k]`` is rollout ``local[k]`` of this process) gathered
    into ``(n, ...)`` in rollout order, on the CPU. Collective: every process calls it."""
    idx = torch.as_tensor(list(local), dtype=torch.long)
    if run.world == 1:
        out = rows.new_zeros((n, *rows.shape[1:]))
        out[idx] = rows
        return out.cpu()
    acc = run.accelerator
    all_idx = acc.gather(acc.pad_across_processes(idx.to(run.device), pad_index=-1)).cpu()
    all_rows = acc.gather(acc.pad_across_processes(rows.to(run.device).contiguous())).cpu()
    keep = all_idx >= 0
    out = all_rows.new_zeros((n, *rows.shape[1:]))
    out[all_idx[keep]] = all_rows[keep]
    return out


@dataclass
class Rollouts:
    """What an objective's rounds are made of: its sampler, its judges, its prompt groups and
    this process's share of every round."""

    sample: Callable[[list[str], list[int]], dict]  # (prompts, seeds) -> {"videos": uint8, ...}
    judges: Sequence  # the training judges
    local: list[int]  # this process's rollouts of a round
    group_size: int  # rollouts i // group_size share a prompt
    weights: Sequence[float] | None = None  # one per training judge; None = equal
    eval_judges: Sequence = ()  # held-out judges: scored, never trained on
    rewrites: dict[str, str] | None = None  # prompt -> its rewrite the sampler is conditioned on (prompt_rewrites)


@dataclass
class Round:
    """One online round as this process sees it."""

    index: int
    prompts: list[str]  # the round's N prompts, in rollout order
    seeds: list[int]  # the round's N rollout seeds
    groups: np.ndarray  # (N,) the prompt group of each rollout
    local: list[int]  # the rollouts this process sampled
    samples: dict  # the sampler's output for ``local``: "videos" and what the objective keeps
    scores: np.ndarray  # (J, N) the training judges' scores, gathered
    heldout: np.ndarray | None  # (E, N) the held-out judges' scores, gathered; None without any
    reward: np.ndarray  # (N,) combine_judges(scores, weights, groups)
    rollout_s: float  # seconds sampling
    reward_s: float  # seconds scoring, gathering, combining
    conditioning: list[str] | None = None  # the N prompts the model was conditioned on (rewritten or not)


def _gathered_scores(run, r: int, local: list[int], judges, videos: np.ndarray, prompts: list[str]) -> np.ndarray:
    """``(J, N)`` scores of every process's videos (``videos[k]`` is rollout ``local[k]`` of the
    round's ``N = len(prompts)``), C-ordered, in rollout order.

    A judge that fails on this process (:func:`align.judges.judge_scores`: it raised, timed out,
    or answered a NaN, an inf or too few scores) stops the run with a :class:`JudgeError` naming
    the round, the judge, the rollouts and their prompt: never a silent 0. Its rows go into the
    gather as NaN first, so that the other processes do not wait forever on this one: each of
    them raises too, naming the judge and the rollouts that failed elsewhere."""
    n, mine = len(prompts), [prompts[i] for i in local]
    rows, errors = [], []
    for j in judges:
        try:
            rows.append(judge_scores(j, videos, mine, index=local, what="rollout"))
        except JudgeError as e:
            rows.append(np.full(len(local), np.nan))
            errors.append(e)
    scores = torch.as_tensor(np.stack(rows) if rows else np.zeros((0, len(local))), dtype=torch.float64)
    out = np.ascontiguousarray(gather_rows(run, local, scores.T.contiguous(), n).numpy().T)
    if errors:
        raise JudgeError(f"online round {r}: {errors[0]}") from errors[0]
    for j, row in zip(judges, out):
        failed = np.flatnonzero(~np.isfinite(row))
        if failed.size:
            raise JudgeError(
                f"online round {r}: judge {j.name} failed on another process, on rollouts {failed.tolist()[:8]} "
                f"(first prompt {prompts[failed[0]]!r}); its error is in that process's log"
            )
    return out


def play_round(run, spec: Rollouts, r: int, prompts: list[str], seeds: list[int]) -> Round:
    """Round ``r`` of the rollouts ``(prompts[i], seeds[i])``: this process samples its share
    with the denoiser in eval mode and without gradients, every judge scores it, the scores are
    gathered and combined (see the module docstring)."""
    n, local = len(prompts), spec.local
    conditioning = [spec.rewrites.get(p, p) for p in prompts] if spec.rewrites else list(prompts)
    t0 = time.perf_counter()
    run.model.denoiser.eval()
    with torch.no_grad():  # conditioned on the rewrites; the judges below see the original prompts
        samples = spec.sample([conditioning[i] for i in local], [seeds[i] for i in local])
    run.model.denoiser.train()
    t1 = time.perf_counter()
    groups = np.arange(n) // spec.group_size
    scores = _gathered_scores(run, r, local, spec.judges, samples["videos"], prompts)
    held = _gathered_scores(run, r, local, spec.eval_judges, samples["videos"], prompts) if spec.eval_judges else None
    reward = combine_judges(scores, spec.weights, groups)
    return Round(
        r, prompts, seeds, groups, local, samples, scores, held, reward, t1 - t0, time.perf_counter() - t1, conditioning
    )


def check_prompt_rewriter(cfg, online: bool = True) -> None:
    """Check the recipe's ``prompt_rewriter`` and ``rewrite_instruction`` before the model loads:
    a spec that parses and an instruction file that exists, for an online objective only (an
    offline dataset's videos were made from its prompts as they are)."""
    from align.prompting import check_rewriter_options

    if cfg.prompt_rewriter and not online:
        raise ValueError(
            f"recipe key `prompt_rewriter` is for online objectives (grpo, rwr with online: true), not offline "
            f"{cfg.objective}: an offline dataset's videos were sampled from its own prompts"
        )
    check_rewriter_options(cfg.prompt_rewriter, cfg.rewrite_instruction)


def prompt_rewrites(cfg, run, prompts: list[str]) -> dict[str, str] | None:
    """Each prompt's rewrite by the recipe's ``prompt_rewriter`` (with ``rewrite_instruction``),
    cached in the run's ``rewrites.jsonl`` (a resumed run asks the model for none again); None
    without a rewriter. The main process rewrites the whole prompts file once, before the first
    round, on the run's device; every process gets the same rewrites (a collective call)."""
    if not cfg.prompt_rewriter:
        return None
    from align.prompting import rewrite_prompts

    unique = list(dict.fromkeys(prompts))
    rewritten = rewrite_prompts(
        cfg.prompt_rewriter, cfg.rewrite_instruction, unique, run.run_dir / "rewrites.jsonl", str(run.device)
    )
    return dict(zip(unique, rewritten))


def reward_stats(rnd: Round, spec: Rollouts) -> dict:
    """The round's metrics: ``round``, the (weighted) mean of the training judges' mean scores
    (raw, in each judge's units), with one judge its std, with several each judge's mean; the
    held-out judges' mean (and each one's, when several)."""
    w = np.asarray(spec.weights or [1.0] * len(spec.judges), dtype=np.float64)
    means = rnd.scores.mean(1)
    stats = {"round": rnd.index, "reward_mean": float((w * means).sum() / w.sum())}
    if len(spec.judges) == 1:
        stats["reward_std"] = float(rnd.scores[0].std())
    else:
        stats.update({f"reward/{j.name}": float(m) for j, m in zip(spec.judges, means)})
    if rnd.heldout is not None:
        stats["heldout_mean"] = float(rnd.heldout.mean(1).mean())
        if len(spec.eval_judges) > 1:
            stats.update({f"heldout/{j.name}": float(m) for j, m in zip(spec.eval_judges, rnd.heldout.mean(1))})
    return stats


def mid_round_note(run, per_round: int, label: str) -> None:
    """Print, on the main process of a run resumed inside a round (``per_round`` micro-steps per
    round), that the round's rollouts are drawn again and the run is not exact."""
    if run.ckpt is not None and run.micro_step % per_round and run.is_main:
        print(
            f"[vidalign] {label}: {run.ckpt} is mid-round (micro-step {run.micro_step}, {per_round} per round): "
            "the round's rollouts are drawn again from the restored policy, so the run will not match an "
            "uninterrupted one exactly (checkpoints on round boundaries resume exactly)"
        )
