"""GRPO for flow and diffusion video models (Flow-GRPO, Liu et al. 2025; DanceGRPO), with LoRA.

Training runs in rounds. Round ``r`` draws ``prompts_per_round`` prompts from ``prompts_file``
and samples ``group_size`` rollouts of each from the *current* policy with a stochastic sampler
that records every step (``align.sample.sample_with_logprobs``: the flow SDE with the ODE's
marginals, noise ``sde_noise``; DDIM with ``eta`` for epsilon / v models; CFG at
``guidance_scale``). The judges score the videos; each judge's scores are z-scored within the
prompt group, weighted by ``judge_weights``, and the group-normalised advantage
``(r - mean_group) / (std_group + eps)`` of that sum (``adv_global_std``: the round's std), clipped
at ``adv_clip_max``, is each rollout's advantage (one judge: its raw scores go in directly). The
round then trains for ``inner_epochs`` passes over its rollouts: each rollout on a random
``train_timestep_fraction`` of its denoising steps (re-drawn every pass, as Flow-GRPO does),
with the clipped likelihood ratio of the step under the current policy against the rollout
policy, plus ``kl_weight`` times the KL of the step to the reference (the adapters off)
(``align.objectives.grpo_loss`` / ``gaussian_kl``).

Micro-steps and updates. A micro-step is ``micro`` rollouts of this process, each at one of its
trained steps; the ``K`` trained steps of a micro-batch are consecutive micro-steps, so
``gradient_accumulation_steps = K`` updates once per micro-batch of rollouts with all their
trained steps (Flow-GRPO's layout), and ``effective_batch_size`` counts (rollout, step) pairs.

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
disabled; epsilon / v models end their stochastic DDIM at ``alphas_cumprod[0]``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from align.models.lora import adapters_disabled
from align.objectives import gaussian_kl, group_advantages, grpo_loss
from align.sample import policy_step, sample_with_logprobs
from align.training import core

KEYS = ("loss", "policy_loss", "clip_fraction", "approx_kl", "ratio_mean", "ratio_max", "ratio_min", "kl")


@dataclass
class GRPOConfig(core.TrainConfig):
    """GRPO on rollouts of the current policy, scored by judges (see the module docstring)."""

    name: str = field(default="grpo", metadata={"help": "the run's name: its directory is <output_dir>/<name>"})
    objective: str = field(default="grpo", metadata={"help": "grpo (picks the training module)"})
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
    sample_steps: int = field(default=10, metadata={"help": "stochastic steps per rollout"})
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
        default=1.0, metadata={"help": "share of each rollout's steps trained per pass"}
    )
    rollout_batch_size: int = field(default=8, metadata={"help": "rollouts sampled at once per process"})
    hacking_patience: int = field(
        default=3, metadata={"help": "rounds of rising train reward and falling held-out score before a warning"}
    )
    lr_warmup_steps: int = field(
        default=0, metadata={"help": "linear warm-up steps of the learning rate, then constant"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.objective != "grpo":
            raise ValueError(f"GRPOConfig: recipe key `objective` must be 'grpo', got {self.objective!r}")
        if not self.prompts_file:
            raise ValueError("recipe key `prompts_file` is required for objective 'grpo' (one prompt per line)")
        if self.dataset:
            raise ValueError("recipe key `dataset` is not used by objective 'grpo' (it samples its own rollouts)")
        for key in ("judges", "judge_weights", "eval_judges"):
            if isinstance(getattr(self, key), str):
                setattr(self, key, [getattr(self, key)])
        if not self.judges:
            raise ValueError("recipe key `judges` is required for objective 'grpo' (e.g. [reward:runs/reward/best])")
        if self.judge_weights and len(self.judge_weights) != len(self.judges):
            raise ValueError(
                f"recipe key `judge_weights` has {len(self.judge_weights)} value(s) for {len(self.judges)} judge(s)"
            )
        if any(float(w) < 0 for w in self.judge_weights) or (self.judge_weights and not sum(self.judge_weights) > 0):
            raise ValueError(f"recipe key `judge_weights` must be >= 0 and not all 0, got {self.judge_weights}")
        both = sorted(set(self.judges) & set(self.eval_judges))
        if both:
            raise ValueError(f"recipe key `eval_judges`: {both[0]!r} is also a training judge, so it is not held out")
        if self.group_size < 2:
            raise ValueError(
                f"recipe key `group_size` must be >= 2 (advantages are relative to the group), got {self.group_size}"
            )
        for key in ("prompts_per_round", "inner_epochs", "sample_steps", "rollout_batch_size", "hacking_patience"):
            if getattr(self, key) < 1:
                raise ValueError(f"recipe key `{key}` must be >= 1, got {getattr(self, key)}")
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

    @property
    def rollouts_per_round(self) -> int:
        return self.prompts_per_round * self.group_size

    @property
    def trained_steps(self) -> int:
        """Denoising steps trained per rollout and pass: ``train_timestep_fraction`` of ``sample_steps``, >= 1."""
        return max(1, round(self.train_timestep_fraction * self.sample_steps))


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
    order: list[int] = []
    while len(order) < cfg.prompts_per_round:
        order += torch.randperm(len(prompts), generator=g).tolist()
    return [prompts[i] for i in order[: cfg.prompts_per_round] for _ in range(cfg.group_size)]


def local_columns(n: int, width: int, micro: int, rank: int) -> list[int]:
    """Rollout indices of process ``rank``: those in columns ``[rank micro, (rank + 1) micro)`` of
    ``n`` rollouts laid out in rows of ``width``."""
    return [i for i in range(n) if (i % width) // micro == rank]


def epoch_batches(cfg: GRPOConfig, r: int, e: int, n: int, width: int, micro: int, rank: int) -> list[list[int]]:
    """This process's micro-batches (global rollout indices) of pass ``e`` of round ``r``: row
    ``k`` of every column after a seeded permutation of that column's rows (world-independent)."""
    rows = n // width
    cols = range(rank * micro, (rank + 1) * micro)
    perms = {
        c: torch.randperm(rows, generator=torch.Generator().manual_seed(_seed(cfg.seed, 1, r, e, c))) for c in cols
    }
    return [[int(perms[c][k]) * width + c for c in cols] for k in range(rows)]


def trained_step_indices(cfg: GRPOConfig, r: int, e: int, i: int) -> list[int]:
    """The denoising steps rollout ``i`` trains in pass ``e`` of round ``r`` (a seeded random subset)."""
    g = torch.Generator().manual_seed(_seed(cfg.seed, 2, r, e, i))
    return torch.randperm(cfg.sample_steps, generator=g)[: cfg.trained_steps].tolist()


def advantages(cfg: GRPOConfig, scores: np.ndarray, groups: torch.Tensor) -> torch.Tensor:
    """Advantages ``(N,)`` of a round from the training judges' scores ``(J, N)``: one judge's raw
    scores, or the weighted sum of the judges' scores z-scored within the group; then
    :func:`align.objectives.group_advantages`, clipped at ``adv_clip_max``."""
    s = torch.as_tensor(scores, dtype=torch.float64)
    if s.shape[0] == 1:
        combined = s[0]
    else:
        w = torch.as_tensor(cfg.judge_weights or [1.0] * s.shape[0], dtype=torch.float64)
        z = torch.stack([group_advantages(sj, groups).double() for sj in s])
        combined = (w[:, None] * z).sum(0) / w.sum()
    adv = group_advantages(combined.float(), groups, global_std=cfg.adv_global_std)
    return adv.clamp(-cfg.adv_clip_max, cfg.adv_clip_max) if cfg.adv_clip_max > 0 else adv


# ---------------------------------------------------------------- rounds


@torch.no_grad()
def _rollouts(cfg: GRPOConfig, run: core.Run, prompts: list[str], seeds: list[int]) -> dict:
    """Rollouts of this process's prompts in chunks of ``rollout_batch_size``, concatenated."""
    model = run.model
    model.denoiser.eval()
    parts = []
    for a in range(0, len(prompts), cfg.rollout_batch_size):
        parts.append(
            sample_with_logprobs(
                model,
                prompts[a : a + cfg.rollout_batch_size],
                seeds[a : a + cfg.rollout_batch_size],
                cfg.sample_steps,
                cfg.guidance_scale,
                cfg.sde_noise,
                cfg.eta,
            )
        )
    model.denoiser.train()
    out = {k: torch.cat([p[k] for p in parts]) for k in ("latents", "log_probs", "cond")}
    out["videos"] = np.concatenate([p["videos"] for p in parts])
    out["uncond"] = parts[0]["uncond"][:1] if parts[0]["uncond"] is not None else None
    out["timesteps"], out["next_timesteps"] = parts[0]["timesteps"], parts[0]["next_timesteps"]
    return out


def _gather_scores(run: core.Run, local: list[int], scores: np.ndarray, n: int) -> np.ndarray:
    """Every process's ``(J, n_local)`` scores, gathered into ``(J, n)`` in rollout order."""
    t = torch.cat([torch.tensor(local, dtype=torch.float64)[None], torch.as_tensor(scores, dtype=torch.float64)])
    allt = run.accelerator.gather(t.T.contiguous().to(run.device)).cpu().numpy()
    full = np.zeros((scores.shape[0], n))
    full[:, allt[:, 0].astype(int)] = allt[:, 1:].T
    return full


def _score(judges, videos: np.ndarray, prompts: list[str]) -> np.ndarray:
    from align.judges import judge_scores

    return np.stack([judge_scores(j, videos, prompts) for j in judges]) if judges else np.zeros((0, len(prompts)))


def _round_stats(cfg: GRPOConfig, r: int, train_s: np.ndarray, eval_s: np.ndarray, judges, eval_judges, history: dict):
    """The round's metrics: the (weighted) mean training score, the held-out mean, per-judge
    means, and the reward-hacking streak over the run's history (updated here)."""
    w = np.asarray(cfg.judge_weights or [1.0] * len(judges), dtype=np.float64)
    stats = {"round": r, "reward_mean": float((w * train_s.mean(1)).sum() / w.sum())}
    if len(judges) == 1:
        stats["reward_std"] = float(train_s[0].std())
    else:
        stats.update({f"reward/{j.name}": float(m) for j, m in zip(judges, train_s.mean(1))})
    history["train"].append(stats["reward_mean"])
    if eval_judges:
        stats["heldout_mean"] = float(eval_s.mean(1).mean())
        if len(eval_judges) > 1:
            stats.update({f"heldout/{j.name}": float(m) for j, m in zip(eval_judges, eval_s.mean(1))})
        history["heldout"].append(stats["heldout_mean"])
        stats["hacking_streak"] = hacking_streak(history["train"], history["heldout"])
        stats["hacking_warning"] = stats["hacking_streak"] >= cfg.hacking_patience
    return stats


def grpo_batches(cfg: GRPOConfig, run: core.Run, prompts: list[str], judges, eval_judges, history: dict, info: dict):
    """Rounds from the checkpointed position: each yields its statistics (a dict, logged with
    the round's steps), then its micro-batches ``(x, x_next, t, t_next, cond, old_log_prob,
    advantage)``. ``info["round_times"]`` gets each round's rollout / reward / train seconds."""
    n, micro, world, K = cfg.rollouts_per_round, run.micro, run.world, cfg.trained_steps
    width = micro * world
    per_round = cfg.inner_epochs * (n // width) * K
    local = local_columns(n, width, micro, run.rank)
    pos = {g: k for k, g in enumerate(local)}
    groups = torch.tensor([i // cfg.group_size for i in range(n)])
    r, skip = divmod(run.micro_step, per_round)
    times = info.setdefault("round_times", [])
    while True:
        t0 = time.perf_counter()
        ps = round_prompts(prompts, cfg, r)
        mine = [ps[i] for i in local]
        roll = _rollouts(cfg, run, mine, [_seed(cfg.seed, 3, r, i) for i in local])
        t1 = time.perf_counter()
        scores = _gather_scores(run, local, _score(judges, roll["videos"], mine), n)
        held = _gather_scores(run, local, _score(eval_judges, roll["videos"], mine), n) if eval_judges else None
        adv = advantages(cfg, scores, groups).to(run.device)
        stats = _round_stats(cfg, r, scores, held, judges, eval_judges, history)
        t2 = time.perf_counter()
        stats.update(rollout_s=t1 - t0, reward_s=t2 - t1)
        if stats.get("hacking_warning") and run.is_main:
            print(
                f"[vidalign] grpo WARNING round {r}: possible reward hacking -- the training reward rose and the "
                f"held-out score ({', '.join(cfg.eval_judges)}) fell for {stats['hacking_streak']} rounds in a row"
            )
        yield stats
        lat, lp, ts, tn = roll["latents"], roll["log_probs"], roll["timesteps"], roll["next_timesteps"]
        for e in range(cfg.inner_epochs):
            for batch in epoch_batches(cfg, r, e, n, width, micro, run.rank):
                rows = torch.tensor([pos[i] for i in batch])
                steps = torch.tensor([trained_step_indices(cfg, r, e, i) for i in batch])  # (micro, K)
                for j in range(K):
                    if skip:
                        skip -= 1
                        continue
                    s = steps[:, j]
                    x, x_next = lat[rows, s].to(run.device), lat[rows, s + 1].to(run.device)
                    yield (x, x_next, ts[s], tn[s], roll["cond"][rows], lp[rows, s], adv[batch])
        times.append({"round": r, "rollout_s": t1 - t0, "reward_s": t2 - t1, "train_s": time.perf_counter() - t2})
        r += 1


def grpo_step_losses(cfg: GRPOConfig, run: core.Run, batch, uncond) -> dict:
    """GRPO terms of one micro-batch: the recorded steps' log-probabilities under the current
    policy (through the prepared denoiser, so DDP / DeepSpeed sync its gradients), the clipped
    ratio against the rollout's, and the KL to the reference (adapters off) when ``kl_weight`` > 0."""
    x, x_next, t, t_next, cond, old_lp, adv = batch
    u = uncond.expand(x.shape[0], *uncond.shape[1:]) if uncond is not None else None
    args = (run.model, x, t, t_next, cond, u, cfg.guidance_scale, cfg.sde_noise, cfg.eta)
    new = policy_step(*args, x_next=x_next, predict=run.denoiser)
    kl = None
    if cfg.kl_weight > 0:
        with torch.no_grad(), adapters_disabled(run.base):
            ref = policy_step(*args, x_next=x_next, predict=run.base)
        kl = gaussian_kl(new.mean, ref.mean, new.std)
    return grpo_loss(new.log_prob, old_lp, adv, cfg.clip_range, kl=kl, kl_weight=cfg.kl_weight)


def check_layout(cfg: GRPOConfig, micro: int, world: int) -> int:
    """Optimizer steps per round; a layout whose rounds do not split into whole micro-batches,
    whole updates and (with ``checkpointing_steps``) whole checkpoint intervals is an error."""
    n, width = cfg.rollouts_per_round, micro * world
    if n % width:
        raise ValueError(
            f"grpo: a round's {n} rollouts (prompts_per_round {cfg.prompts_per_round} x group_size {cfg.group_size}) "
            f"do not split into micro-batches of {micro} rollouts x {world} process(es); make it a multiple of {width}"
        )
    per_round = cfg.inner_epochs * (n // width) * cfg.trained_steps
    if per_round % cfg.gradient_accumulation_steps:
        raise ValueError(
            f"grpo: a round has {per_round} micro-steps (inner_epochs x {n // width} micro-batches x "
            f"{cfg.trained_steps} trained steps), not a multiple of gradient_accumulation_steps "
            f"{cfg.gradient_accumulation_steps}: rounds must end on an update"
        )
    steps = per_round // cfg.gradient_accumulation_steps
    if cfg.checkpointing_steps and cfg.checkpointing_steps % steps:
        raise ValueError(
            f"grpo: checkpointing_steps {cfg.checkpointing_steps} is not a multiple of the {steps} optimizer steps "
            "per round: checkpoints must fall on round boundaries to resume exactly"
        )
    return steps


def train(cfg: GRPOConfig) -> Path:
    """Run GRPO as configured; returns the run directory (see the module docstring)."""
    from align.judges import check_prompts, load_judges
    from align.training.rwr import read_prompts

    prompts = read_prompts(cfg.prompts_file)
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
    per_round = steps_per_round * cfg.gradient_accumulation_steps
    if run.ckpt is not None:
        r = run.micro_step // per_round
        saved = run.ckpt / "grpo_history.pt"
        if saved.is_file():
            h = torch.load(saved, weights_only=True)
            history = {"train": list(h["train"])[:r], "heldout": list(h["heldout"])[:r]}
        if run.micro_step % per_round and run.is_main:
            print(
                f"[vidalign] grpo: {run.ckpt} is mid-round (micro-step {run.micro_step}, {per_round} per round): "
                "the round's rollouts are drawn again from the restored policy, so the run will not match an "
                "uninterrupted one exactly (checkpoints on round boundaries resume exactly)"
            )
    info = {
        "online": True,
        "prompts": len(prompts),
        "judges": list(cfg.judges),
        "eval_judges": list(cfg.eval_judges),
        "rollouts_per_round": cfg.rollouts_per_round,
        "trained_steps_per_rollout": cfg.trained_steps,
        "steps_per_round": steps_per_round,
    }
    batches = grpo_batches(cfg, run, prompts, judges, eval_judges, history, info)
    extra = lambda: {"grpo_history": {k: list(v) for k, v in history.items()}}  # noqa: E731
    return core.loop(cfg, run, batches, lambda b: grpo_step_losses(cfg, run, b, uncond), KEYS, info, extra)
