"""GRPO for flow and diffusion video models (Flow-GRPO, Liu et al. 2025; DanceGRPO), with LoRA.

Training runs in rounds. Round ``r`` draws ``prompts_per_round`` prompts from ``prompts_file``
and samples ``group_size`` rollouts of each from the *current* policy with a stochastic sampler
that records every stochastic step (``align.sample.sample_with_logprobs``: the flow SDE with the
ODE's marginals, noise ``sde_noise``; DDIM with ``eta`` for epsilon / v models; CFG at
``guidance_scale``). Of a rollout's ``sample_steps`` model calls the first ``sample_steps - 1``
are stochastic and the last lands deterministically on the clean end (the x0 prediction, what
DanceGRPO decodes): that clean end is the video the judges score, with no SDE noise left in it
(see ``sample_with_logprobs``). Each judge's scores are z-scored within the prompt group,
weighted by ``judge_weights``, and the group-normalised advantage ``(r - mean_group) /
(std_group + eps)`` of that sum (``adv_global_std``: the round's std), clipped at
``adv_clip_max``, is each rollout's advantage (one judge: its raw scores go in directly). The
round then trains for ``inner_epochs`` passes over its rollouts: each rollout on a random
``round(train_timestep_fraction x sample_steps)`` of its stochastic steps (at most all
``sample_steps - 1``; re-drawn every pass), with the clipped likelihood ratio of the step under
the current policy against the rollout policy, plus ``kl_weight`` times the KL of the step to
the reference (the adapters off) (``align.objectives.grpo_loss`` / ``gaussian_kl``).

Cheaper and safer GRPO (docs/training.md). ``sde_window_size`` > 0 is MixGRPO's sliding SDE
window (Li et al. 2025): only the window's consecutive steps are stochastic and trained, every
other step is the ODE's (no log-probability), and the window moves over training
(:func:`sde_window`); the trained steps, and the derived accumulation, count only the window's.
``ratio_norm`` is GRPO-Guard (Wang et al. 2025): its ratio normalisation
(:func:`align.objectives.guard_log_ratio`, from the rollout's step means, kept for it) and, with
``guard``, its ``1 / |dt|`` reweighting of each step's term. Both off by default: today's GRPO.

Rounds are :mod:`align.training.rollouts`' online rounds: prompts drawn, this process's share
of the rollouts sampled, the judges' scores gathered and combined by the one rule
(:func:`align.judges.combine_judges`); GRPO then normalises the combined score within the group.

Micro-steps and updates. A micro-step is ``micro`` rollouts of this process, each at one of its
trained steps; the ``K`` trained steps of a micro-batch are consecutive micro-steps, so
``gradient_accumulation_steps = K`` updates once per micro-batch of rollouts with all their
trained steps (Flow-GRPO's layout), and ``effective_batch_size`` counts (rollout, step) pairs.
A recipe leaves ``gradient_accumulation_steps`` unset and it is derived as
``rollout_batches_per_update x K`` (default 1: one micro-batch per update); a recipe that sets it
by hand must end every round on an update (:func:`check_layout`).

One process or N: the round's ``N`` rollouts are laid out in rows of ``micro x world``
(``effective_batch_size`` fixes that width whatever the process count): rollout ``i`` sits in
column ``i % width``; process ``p`` samples, scores and trains the columns ``[p micro, (p + 1)
micro)``, so a prompt group may be split across processes. Rewards are gathered before the
advantages are computed, and each pass shuffles the rows of every column with a seeded
permutation of its own, so every global micro-batch is the same set of rollouts at the same
steps for 1 and N processes, and so is the update. Every random choice (prompts, rollout seeds,
orders, trained steps) is seeded by the recipe's seed and the round, so a run resumed from a
checkpoint on a round boundary repeats the uninterrupted run (mid-round checkpoints, written on
SIGTERM, redo that round's rollouts from the restored policy: not exact, with a printed note).

Reward hacking in plain sight: ``eval_judges`` (never trained on) score every round's rollouts;
metrics.jsonl holds ``reward_mean`` and ``heldout_mean`` side by side, and when the first rose
and the second fell (each against the round before) for ``hacking_patience`` rounds in a row
the run prints a warning and sets ``hacking_warning`` (:func:`hacking_streak`).

Departures: log-probabilities are means over latent elements (Flow-GRPO's convention, so
``clip_range`` is of Flow-GRPO's 1e-4 scale); the reference is the same denoiser with its LoRA
disabled; the last step is deterministic (no log-probability, not trained) and the judges score
its clean x0 (Flow-GRPO scores a latent with a little noise left; DanceGRPO decodes the same x0
but also draws a stochastic last step, which it does not train); ``kl_weight`` weighs the exact
KL of a step (as Flow-GRPO's Wan script), which is Flow-GRPO SD3's ``beta`` KL divided by the
step's ``|ds|`` (docs/training.md maps each reference's keys).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from align.models.lora import adapters_disabled
from align.objectives import gaussian_kl, group_advantages, grpo_loss, guard_log_ratio
from align.sample import SamplingOptions, policy_step, sample_with_logprobs
from align.training import core, rollouts
from align.training.rollouts import local_columns

KEYS = ("loss", "policy_loss", "clip_fraction", "approx_kl", "ratio_mean", "ratio_max", "ratio_min", "kl")


@dataclass
class GRPOConfig(core.TrainConfig):
    """GRPO on rollouts of the current policy, scored by judges (see the module docstring)."""

    name: str = field(default="grpo", metadata={"help": "the run's name: its directory is <output_dir>/<name>"})
    objective: Literal["grpo"] = field(default="grpo", metadata={"help": "grpo (picks the training module)"})
    prompts_file: str = field(default="", metadata={"help": "required: one prompt per line"})
    judges: list = field(default_factory=list, metadata={"help": "the training reward: judge specs (align/judges.py)"})
    judge_weights: list = field(default_factory=list, metadata={"help": "one per judge; [] = equal"})
    eval_judges: list = field(
        default_factory=list, metadata={"help": "held-out judges: scored each round, never trained on"}
    )
    group_size: int = field(default=4, metadata={"help": "G rollouts per prompt"})
    prompts_per_round: int = field(
        default=4, metadata={"help": "prompt groups per round (each sampled group_size times)"}
    )
    inner_epochs: int = field(default=1, metadata={"help": "passes over a round's rollouts"})
    sample_steps: int = field(
        default=10,
        metadata={"help": "model calls per rollout (>= 2): sample_steps - 1 stochastic steps, one to the clean end"},
    )
    guidance_scale: float = field(
        default=4.0, metadata={"help": "CFG in rollouts and in the recomputed log-probabilities"}
    )
    sde_noise: float = field(default=0.7, metadata={"help": "flow models: a in sigma_s = a sqrt(s / (1 - s))"})
    eta: float = field(default=1.0, metadata={"help": "epsilon / v models: DDIM eta"})
    clip_range: float = field(
        default=1e-4, metadata={"help": "PPO clip of the ratio (of mean-over-elements log-probabilities)"}
    )
    kl_weight: float = field(
        default=0.04, metadata={"help": "KL to the reference (adapters off); 0 skips the reference pass"}
    )
    adv_global_std: bool = field(
        default=False, metadata={"help": "divide by the round's reward std instead of the group's"}
    )
    adv_clip_max: float = field(
        default=5.0, metadata={"help": "advantages clipped to [-adv_clip_max, adv_clip_max]; 0 = off"}
    )
    train_timestep_fraction: float = field(
        default=1.0,
        metadata={
            "help": "round(fraction x sample_steps) steps trained per rollout and pass, drawn among the "
            "sample_steps - 1 stochastic ones (at most all of them)"
        },
    )
    rollout_batch_size: int = field(default=8, metadata={"help": "rollouts sampled at once per process"})
    offload_rollouts: bool = field(
        default=False,
        metadata={
            "help": "MEMORY: keep a round's trajectories, step log-probabilities and means in host memory between "
            "sampling and training (each micro-step copies its two latents to the device)"
        },
    )
    rollout_batches_per_update: int = field(
        default=1,
        metadata={
            "help": "micro-batches of rollouts (each with all its trained steps) per optimizer update; "
            "gradient_accumulation_steps is then derived as this x trained steps (leave that unset)"
        },
    )
    hacking_patience: int = field(
        default=3, metadata={"help": "rounds of rising train reward and falling held-out score before a warning"}
    )
    lr_warmup_steps: int = field(
        default=0, metadata={"help": "linear warm-up steps of the learning rate, then constant"}
    )
    sde_window_size: int = field(
        default=0,
        metadata={
            "help": "MixGRPO: SDE only in a window of this many consecutive steps (ODE elsewhere), the only "
            "steps trained; 0 = off (every step but the last is stochastic)"
        },
    )
    sde_window_stride: int = field(
        default=1, metadata={"help": "MixGRPO: steps the window start advances per move (its prog_overlap_step)"}
    )
    sde_window_shift_every: int = field(
        default=1, metadata={"help": "MixGRPO: rounds between window moves (its iters_per_group)"}
    )
    sde_window_end: Literal["wrap", "stop"] = field(
        default="wrap",
        metadata={
            "help": "MixGRPO: past the last step the window restarts at step 0 (wrap: its roll_back) or stays "
            "at the last position (stop)"
        },
    )
    ratio_norm: Literal["off", "norm", "guard"] = field(
        default="off",
        metadata={
            "help": "GRPO-Guard: off; norm = its ratio normalisation; guard = that plus its 1/|dt| step "
            "reweighting (clip_range then acts on a rescaled ratio: see docs/training.md)"
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.objective != "grpo":
            raise ValueError(f"GRPOConfig: recipe key `objective` must be 'grpo', got {self.objective!r}")
        rollouts.check_online_keys(self, "grpo", "advantages are relative to the group")
        if self.sample_steps < 2:
            raise ValueError(
                f"recipe key `sample_steps` must be >= 2 for objective 'grpo' (the last step is the deterministic "
                f"one to the clean end; the others are the stochastic steps it trains), got {self.sample_steps}"
            )
        for key in ("sde_noise", "eta", "clip_range"):
            if not getattr(self, key) > 0:
                raise ValueError(f"recipe key `{key}` must be > 0, got {getattr(self, key)}")
        for key in ("kl_weight", "adv_clip_max"):
            if getattr(self, key) < 0:
                raise ValueError(f"recipe key `{key}` must be >= 0, got {getattr(self, key)}")
        if self.guidance_scale < 1:
            raise ValueError(f"recipe key `guidance_scale` must be >= 1 (1 = no guidance), got {self.guidance_scale}")
        if not 0 < self.train_timestep_fraction <= 1:
            raise ValueError(
                f"recipe key `train_timestep_fraction` must be in (0, 1], got {self.train_timestep_fraction}"
            )
        self._check_window()
        if self.ratio_norm not in ("off", "norm", "guard"):
            raise ValueError(f"recipe key `ratio_norm` must be one of off, norm, guard, got {self.ratio_norm!r}")
        if self.model_options.get("wan_expert"):
            raise ValueError(
                "recipe key `model_options.wan_expert`: GRPO does not train one expert of a two-expert Wan 2.2 yet "
                "(its recomputed log-probabilities would run the trained expert at the other expert's timesteps)"
            )
        if self.lora_dropout != 0:
            raise ValueError(
                f"recipe key `lora_dropout` must be 0 for objective 'grpo' (the likelihood ratio compares two "
                f"deterministic policies), got {self.lora_dropout}"
            )

    def _check_window(self) -> None:
        """The MixGRPO keys: a window of 1 .. ``sde_steps`` steps that moves by >= 1 step."""
        if not 0 <= self.sde_window_size <= self.sample_steps - 1:
            raise ValueError(
                f"recipe key `sde_window_size` must be 0 (off) or 1 .. sample_steps - 1 = {self.sample_steps - 1} "
                f"(the stochastic steps), got {self.sde_window_size}"
            )
        for key in ("sde_window_stride", "sde_window_shift_every"):
            if getattr(self, key) < 1:
                raise ValueError(f"recipe key `{key}` must be >= 1, got {getattr(self, key)}")
        if self.sde_window_end not in ("wrap", "stop"):
            raise ValueError(f"recipe key `sde_window_end` must be wrap or stop, got {self.sde_window_end!r}")

    @property
    def rollouts_per_round(self) -> int:
        return self.prompts_per_round * self.group_size

    @property
    def sde_steps(self) -> int:
        """The stochastic steps of a rollout, those with log-probabilities: all but the last."""
        return self.sample_steps - 1

    @property
    def trained_steps(self) -> int:
        """Denoising steps trained per rollout and pass: ``train_timestep_fraction`` of ``sample_steps``,
        >= 1 and at most the ``sde_steps`` (Flow-GRPO's ``timestep_fraction`` 0.99 of 10 steps trains
        9, all of them; 0.6 of 10 trains 6 of the 9). With an SDE window, at most its
        ``sde_window_size`` steps (MixGRPO trains all of them: fraction 1, the default)."""
        return min(
            self.sde_window_size or self.sde_steps, max(1, round(self.train_timestep_fraction * self.sample_steps))
        )

    def derived_accumulation_steps(self) -> int:
        """Unset ``gradient_accumulation_steps``: the ``trained_steps`` of
        ``rollout_batches_per_update`` micro-batches of rollouts, i.e. one update per that many
        micro-batches with all their trained steps (Flow-GRPO's layout)."""
        return self.trained_steps * self.rollout_batches_per_update


# ---------------------------------------------------------------- pure parts


def hacking_streak(train: Sequence[float], heldout: Sequence[float]) -> int:
    """The number of rounds, counted back from the last, in a row in which the training reward
    rose and the held-out score fell, each against the round before (0 when the last round did
    not do both). The run warns when it reaches ``hacking_patience``."""
    if len(train) != len(heldout):
        raise ValueError(f"hacking_streak: {len(train)} training rewards but {len(heldout)} held-out scores")
    n = 0
    for i in range(len(train) - 1, 0, -1):
        if not (train[i] > train[i - 1] and heldout[i] < heldout[i - 1]):
            break
        n += 1
    return n


def _seed(*parts: int) -> int:
    """A 63-bit seed from integers (recipe seed, a purpose tag, round, ...)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def round_prompts(prompts: list[str], cfg: GRPOConfig, r: int) -> list[str]:
    """The ``prompts_per_round`` prompts of round ``r`` (seeded permutations of the file, repeated
    when it is shorter), each ``group_size`` times: rollout ``i`` is of prompt group ``i // G``."""
    g = torch.Generator().manual_seed(_seed(cfg.seed, 0, r))
    order = rollouts.draw_prompts(len(prompts), cfg.prompts_per_round, g)
    return [prompts[i] for i in order for _ in range(cfg.group_size)]


def epoch_batches(cfg: GRPOConfig, r: int, e: int, n: int, width: int, micro: int, rank: int) -> list[list[int]]:
    """This process's micro-batches (global rollout indices) of pass ``e`` of round ``r``: row
    ``k`` of every column after a seeded permutation of that column's rows (world-independent)."""
    rows = n // width
    cols = range(rank * micro, (rank + 1) * micro)
    perms = {
        c: torch.randperm(rows, generator=torch.Generator().manual_seed(_seed(cfg.seed, 1, r, e, c))) for c in cols
    }
    return [[int(perms[c][k]) * width + c for c in cols] for k in range(rows)]


def sde_window(cfg: GRPOConfig, r: int) -> range | None:
    """MixGRPO's SDE window of round ``r`` (the stochastic, trained steps); None when off.

    It starts at step 0 and its start advances ``sde_window_stride`` steps every
    ``sde_window_shift_every`` rounds (MixGRPO's progressive strategy: ``prog_overlap_step``,
    ``iters_per_group``; one of its iterations is one vidalign round). A start that would put
    the window past the last stochastic step is clamped to the last whole window
    (``sde_steps - sde_window_size``); after that position it restarts at 0 (``wrap``, its
    ``roll_back``) or stays (``stop``). Departure: MixGRPO instead truncates the window at its
    end (fewer trained steps, down to none, before it rolls back or stops); here every window
    has ``sde_window_size`` steps, so the layout (accumulation) is the same in every round."""
    size = cfg.sde_window_size
    if not size:
        return None
    last, stride = cfg.sde_steps - size, cfg.sde_window_stride
    moves = r // cfg.sde_window_shift_every
    if cfg.sde_window_end == "wrap":
        moves %= -(-last // stride) + 1  # the starts 0, stride, ..., then last
    start = min(moves * stride, last)
    return range(start, start + size)


def trained_step_indices(cfg: GRPOConfig, r: int, e: int, i: int) -> list[int]:
    """The stochastic steps rollout ``i`` trains in pass ``e`` of round ``r`` (a seeded random
    subset; with an SDE window, of the window's steps: :func:`sde_window`)."""
    g = torch.Generator().manual_seed(_seed(cfg.seed, 2, r, e, i))
    window = sde_window(cfg, r)
    if window is None:
        return torch.randperm(cfg.sde_steps, generator=g)[: cfg.trained_steps].tolist()
    return [window.start + k for k in torch.randperm(len(window), generator=g)[: cfg.trained_steps].tolist()]


def advantages(cfg: GRPOConfig, scores: np.ndarray, groups: torch.Tensor) -> torch.Tensor:
    """Advantages ``(N,)`` of a round from the training judges' scores ``(J, N)``: the one
    combining rule (:func:`align.judges.combine_judges`: one judge's raw scores, or the weighted
    mean of the judges' z-scores within the group), then
    :func:`align.objectives.group_advantages` (eps 1e-4), clipped at ``adv_clip_max``."""
    from align.judges import combine_judges

    combined = combine_judges(scores, cfg.judge_weights or None, groups.numpy())
    adv = group_advantages(torch.as_tensor(combined).float(), groups, global_std=cfg.adv_global_std)
    return adv.clamp(-cfg.adv_clip_max, cfg.adv_clip_max) if cfg.adv_clip_max > 0 else adv


# ---------------------------------------------------------------- rounds


def _offloaded(offload: bool, part: dict) -> dict:
    """A chunk of rollouts with its trajectory, log-probabilities and step means moved to host
    memory (``offload_rollouts``) as soon as it is sampled, so the device never holds a round."""
    if not offload:
        return part
    return {k: v.cpu() if k in ("latents", "log_probs", "means") else v for k, v in part.items()}


def _rollouts(
    opts: SamplingOptions, cfg: GRPOConfig, model, window: range | None, prompts: list[str], seeds: list[int]
) -> dict:
    """GRPO's sampler of an online round: stochastic rollouts recording every step (with an SDE
    ``window``, only its steps are stochastic), in chunks of ``opts.batch_size``
    (``rollout_batch_size``), concatenated; ``videos`` are their clean ends. ``means`` (the step
    means) are kept for GRPO-Guard's ``ratio_norm``."""
    parts = []
    for a in range(0, len(prompts), opts.batch_size):
        parts.append(
            _offloaded(
                cfg.offload_rollouts,
                sample_with_logprobs(
                    model,
                    prompts[a : a + opts.batch_size],
                    seeds[a : a + opts.batch_size],
                    opts.num_steps,
                    opts.guidance_scale,
                    cfg.sde_noise,
                    cfg.eta,
                    stochastic_steps=window,
                    return_means=cfg.ratio_norm != "off",
                ),
            )
        )
    keys = ("latents", "log_probs", "cond", *(("means",) if cfg.ratio_norm != "off" else ()))
    out = {k: torch.cat([p[k] for p in parts]) for k in keys}
    out["videos"] = np.concatenate([p["videos"] for p in parts])
    out["uncond"] = parts[0]["uncond"][:1] if parts[0]["uncond"] is not None else None
    out["timesteps"], out["next_timesteps"] = parts[0]["timesteps"], parts[0]["next_timesteps"]
    return out


def _round_stats(cfg: GRPOConfig, rnd: rollouts.Round, spec: rollouts.Rollouts, history: dict) -> dict:
    """The round's metrics (:func:`align.training.rollouts.reward_stats`) and the reward-hacking
    streak over the run's history (updated here)."""
    stats = rollouts.reward_stats(rnd, spec)
    history["train"].append(stats["reward_mean"])
    if spec.eval_judges:
        history["heldout"].append(stats["heldout_mean"])
        stats["hacking_streak"] = hacking_streak(history["train"], history["heldout"])
        stats["hacking_warning"] = stats["hacking_streak"] >= cfg.hacking_patience
    return stats


def _micro_batches(cfg: GRPOConfig, run: core.Run, rnd: rollouts.Round, adv: torch.Tensor, width: int, skip: int):
    """The round's micro-batches ``(x, x_next, t, t_next, cond, old_log_prob, advantage,
    old_mean)`` (``old_mean`` None unless ``ratio_norm``): every pass's batches of rollouts, each
    at its ``K`` trained steps; the first ``skip`` are skipped (a run resumed inside the round)."""
    roll, n, micro, K = rnd.samples, len(rnd.prompts), run.micro, cfg.trained_steps
    pos = {g: k for k, g in enumerate(rnd.local)}
    lat, lp, ts, tn = roll["latents"], roll["log_probs"], roll["timesteps"], roll["next_timesteps"]
    for e in range(cfg.inner_epochs):
        for batch in epoch_batches(cfg, rnd.index, e, n, width, micro, run.rank):
            rows = torch.tensor([pos[i] for i in batch])
            steps = torch.tensor([trained_step_indices(cfg, rnd.index, e, i) for i in batch])  # (micro, K)
            for j in range(K):
                if skip:
                    skip -= 1
                    continue
                s = steps[:, j]
                x, x_next = lat[rows, s].to(run.device), lat[rows, s + 1].to(run.device)
                old_mean = roll["means"][rows, s].to(run.device) if "means" in roll else None
                yield (x, x_next, ts[s], tn[s], roll["cond"][rows], lp[rows, s].to(run.device), adv[batch], old_mean)


def grpo_batches(cfg: GRPOConfig, run: core.Run, prompts: list[str], judges, eval_judges, history: dict, info: dict):
    """Rounds from the checkpointed position: each yields its statistics (a dict, logged with
    the round's steps), then its micro-batches (:func:`_micro_batches`).
    ``info["round_times"]`` gets each round's rollout / reward / train seconds."""
    n, width = cfg.rollouts_per_round, run.micro * run.world
    per_round = cfg.inner_epochs * (n // width) * cfg.trained_steps
    opts = rollouts.sampling_options(cfg, batch_size=cfg.rollout_batch_size)
    spec = rollouts.Rollouts(
        sample=partial(_rollouts, opts, cfg, run.model, None),
        judges=judges,
        local=local_columns(n, width, run.micro, run.rank),
        group_size=cfg.group_size,
        weights=cfg.judge_weights or None,
        eval_judges=eval_judges,
        rewrites=rollouts.prompt_rewrites(cfg, run, prompts),  # prompt_rewriter: sample the rewrites, judge originals
    )
    groups = torch.tensor([i // cfg.group_size for i in range(n)])
    r, skip = divmod(run.micro_step, per_round)
    times = info.setdefault("round_times", [])
    while True:
        seeds = [_seed(cfg.seed, 3, r, i) for i in range(n)]
        spec.sample = partial(_rollouts, opts, cfg, run.model, sde_window(cfg, r))
        rnd = rollouts.play_round(run, spec, r, round_prompts(prompts, cfg, r), seeds)
        adv = advantages(cfg, rnd.scores, groups).to(run.device)
        stats = _round_stats(cfg, rnd, spec, history)
        stats.update(rollout_s=rnd.rollout_s, reward_s=rnd.reward_s)
        if cfg.sde_window_size:
            stats["sde_window_start"] = sde_window(cfg, r).start
        if stats.get("hacking_warning") and run.is_main:
            print(
                f"[vidalign] grpo WARNING round {r}: possible reward hacking -- the training reward rose and the "
                f"held-out score ({', '.join(cfg.eval_judges)}) fell for {stats['hacking_streak']} rounds in a row"
            )
        t2 = time.perf_counter()
        yield stats
        yield from _micro_batches(cfg, run, rnd, adv, width, skip)
        skip = 0
        train_s = time.perf_counter() - t2
        times.append({"round": r, "rollout_s": rnd.rollout_s, "reward_s": rnd.reward_s, "train_s": train_s})
        r += 1


def grpo_step_losses(cfg: GRPOConfig, run: core.Run, batch, uncond) -> dict:
    """GRPO terms of one micro-batch: the recorded steps' log-probabilities under the current
    policy (through the prepared denoiser, so DDP / DeepSpeed sync its gradients), the clipped
    ratio against the rollout's, and the KL to the reference (adapters off) when ``kl_weight`` > 0.
    With ``ratio_norm`` the ratio is GRPO-Guard's (:func:`align.objectives.guard_log_ratio`) and,
    with ``guard``, each sample's term is weighted by ``1 / |dt|``, ``dt = (t_next - t) / T``
    (flow: ``s_next - s``; epsilon / v models: the same timestep fraction, an extrapolation)."""
    x, x_next, t, t_next, cond, old_lp, adv, old_mean = batch
    u = uncond.expand(x.shape[0], *uncond.shape[1:]) if uncond is not None else None
    args = (run.model, x, t, t_next, cond, u, cfg.guidance_scale, cfg.sde_noise, cfg.eta)
    new = policy_step(*args, x_next=x_next, predict=run.denoiser)
    kl = None
    if cfg.kl_weight > 0:
        with torch.no_grad(), adapters_disabled(run.base):
            ref = policy_step(*args, x_next=x_next, predict=run.base)
        kl = gaussian_kl(new.mean, ref.mean, new.std)
    guard = {}
    if cfg.ratio_norm != "off":
        guard["log_ratio"] = guard_log_ratio(new.log_prob, old_lp, new.mean, old_mean, new.std)
        if cfg.ratio_norm == "guard":
            T = run.model.scheduler.num_train_timesteps
            guard["step_weights"] = T / (t - t_next).to(new.log_prob.device).float()
    return grpo_loss(new.log_prob, old_lp, adv, cfg.clip_range, kl=kl, kl_weight=cfg.kl_weight, **guard)


def check_layout(cfg: GRPOConfig, micro: int, world: int) -> int:
    """Optimizer steps per round; a layout whose rounds do not split into whole micro-batches,
    whole updates and (with ``checkpointing_steps``) whole checkpoint intervals is an error. The
    derived ``gradient_accumulation_steps`` (unset: ``trained_steps``) always ends rounds on updates."""
    n, width = cfg.rollouts_per_round, micro * world
    if n % width:
        raise ValueError(
            f"grpo: a round's {n} rollouts (prompts_per_round {cfg.prompts_per_round} x group_size {cfg.group_size}) "
            f"do not split into micro-batches of {micro} rollouts x {world} process(es); make it a multiple of {width}"
        )
    per_round, gas = cfg.inner_epochs * (n // width) * cfg.trained_steps, cfg.accumulation_steps
    if per_round % gas:
        raise ValueError(
            f"grpo: a round has {per_round} micro-steps (inner_epochs x {n // width} micro-batches x "
            f"{cfg.trained_steps} trained steps), not a multiple of gradient_accumulation_steps "
            f"{gas}: rounds must end on an update (leave it unset and choose `rollout_batches_per_update` "
            f"dividing {n // width * cfg.inner_epochs})"
        )
    steps = per_round // gas
    if cfg.checkpointing_steps and cfg.checkpointing_steps % steps:
        raise ValueError(
            f"grpo: checkpointing_steps {cfg.checkpointing_steps} is not a multiple of the {steps} optimizer steps "
            "per round: checkpoints must fall on round boundaries to resume exactly"
        )
    return steps


def train(cfg: GRPOConfig) -> Path:
    """Run GRPO as configured; returns the run directory (see the module docstring)."""
    from align.data.prompts import read_prompts
    from align.judges import check_prompts, load_judges

    prompts = read_prompts(cfg.prompts_file)
    rollouts.check_prompt_rewriter(cfg)
    run = core.start(cfg)
    steps_per_round = check_layout(cfg, run.micro, run.world)
    device = str(run.device)
    judges, eval_judges = load_judges(cfg.judges, device=device), load_judges(cfg.eval_judges, device=device)
    check_prompts([*judges, *eval_judges], prompts)
    uncond = None
    if cfg.guidance_scale != 1.0:
        with torch.no_grad():
            uncond = run.model.encode_prompts([""])
    core.prepare(cfg, run)
    history = {"train": [], "heldout": []}
    per_round = steps_per_round * cfg.accumulation_steps
    if run.ckpt is not None:
        r = run.micro_step // per_round
        saved = run.ckpt / "grpo_history.pt"
        if saved.is_file():
            h = torch.load(saved, weights_only=True)
            history = {"train": list(h["train"])[:r], "heldout": list(h["heldout"])[:r]}
        rollouts.mid_round_note(run, per_round, "grpo")
    info = {
        "online": True,
        "prompts": len(prompts),
        "judges": list(cfg.judges),
        "eval_judges": list(cfg.eval_judges),
        "rollouts_per_round": cfg.rollouts_per_round,
        "trained_steps_per_rollout": cfg.trained_steps,
        "sde_window_size": cfg.sde_window_size,
        "ratio_norm": cfg.ratio_norm,
        "steps_per_round": steps_per_round,
    }
    batches = grpo_batches(cfg, run, prompts, judges, eval_judges, history, info)
    extra = lambda: {"grpo_history": {k: list(v) for k, v in history.items()}}  # noqa: E731
    out = core.loop(cfg, run, batches, lambda b: grpo_step_losses(cfg, run, b, uncond), KEYS, info, extra)
    if run.is_main:  # training reward and held-out score per round, side by side
        from align.eval.plots import plot_online_rounds

        plot_online_rounds(out / "metrics.jsonl", out / "rounds.png", title=f"grpo ({cfg.name})")
    return out
