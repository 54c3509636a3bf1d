"""DiffusionNFT (Zheng et al. 2025, "DiffusionNFT: Online Diffusion Reinforcement with Forward
Process"; NVlabs/DiffusionNFT) for flow and diffusion video models, with LoRA.

Training runs in rounds, like GRPO's (:mod:`align.training.rollouts`), but it trains on the
*forward* process: a rollout keeps only its clean latent, so any sampler will do and no
log-probability is recorded.

1. **Sample** ``prompts_per_round`` prompts x ``group_size`` rollouts with the *old* policy (the
   LoRA weights ``old``, below) and any sampler: ``sampler: vidalign`` is vidalign's ODE (DDIM
   eta 0 / flow Euler; the clean latent is the sampler's own), ``pipeline`` the family's diffusers
   sampler (its videos are encoded back by the VAE: a round trip the ODE avoids). CFG is
   ``guidance_scale``, off (1) by default as in NVlabs' NFT configs.
2. **Score**: the judges score the decoded clean videos; their scores are combined into one reward
   per rollout (:func:`align.judges.combine_judges`), normalised within the prompt group (mean of
   the group, std of the group or with ``adv_global_std`` of the round, + 1e-4, NVlabs'
   ``PerPromptStatTracker`` with ``global_std``) and mapped to an optimality probability
   ``r = clip(adv, -c, c) / 2c + 1/2`` (``c = adv_clip_max``; :func:`align.objectives.optimality_probability`).
3. **Train** ``inner_epochs`` passes: each rollout at ``K = max(1, int(train_timestep_fraction x
   sample_steps))`` of the sampler's ``sample_steps`` timesteps (a seeded random subset, NVlabs'
   ``timestep_fraction`` on the scheduler's grid), each with fresh noise: ``x_t = add_noise(x0,
   eps, t)``; the trained prediction ``v`` and the old policy's ``v_old`` (no gradient) at ``x_t``
   make the implicit positive ``beta v + (1 - beta) v_old`` and negative ``(1 + beta) v_old - beta
   v`` policies, fitted to the forward-process target with weights ``r`` and ``1 - r``
   (:func:`align.objectives.nft_loss`: x0-space errors, adaptive weighting, NVlabs' ``adv_clip_max /
   beta`` scale), plus ``kl_weight`` x ``mean (v - v_ref)^2`` to the reference (adapters off).
4. **Old policy**: at the start of every round after the first, ``old = d old + (1 - d) theta``
   with ``d = min(old_decay_rate x max(0, step - old_decay_flat), old_decay_max)`` (``step`` = the
   optimizer steps so far; NVlabs' ``return_decay``: ``decay_type`` 1 is 0.001 / 0 / 0.5, 2 is
   0.0075 / 75 / 0.999). Round 0 samples the initial LoRA.

Departures (docs/training.md): epsilon models compute the loss on the predicted noise (x0 errors
would be scaled by ``sigma / alpha``, 2e4 at ``t = 999``); v models on x0 (``scale = sigma``).
The old policy is a copy of the LoRA tensors swapped into the one denoiser for its forward passes
(NVlabs keeps a second peft adapter); it is refused under ZeRO-3 and FSDP2, whose LoRA is sharded.
CFG rollouts train the conditional prediction (the forward process has no guidance).

Layout, seeding, checkpoints and 1 vs N processes are GRPO's (:mod:`align.training.grpo`):
rollouts in rows of ``micro x world``, process ``p`` trains columns ``[p micro, (p + 1) micro)``,
each micro-batch's ``K`` timesteps are ``K`` consecutive micro-steps, and the accumulation is
derived as ``rollout_batches_per_update x K``; every random draw (prompts, seeds, order,
timesteps, noise) is seeded by the recipe's seed and the round, so 1 and N processes compute the
same update and a run resumed on a round boundary repeats the uninterrupted one. Checkpoints hold
the old policy (``nft_state.pt``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from align.models.lora import adapters_disabled, lora_parameters
from align.objectives import group_advantages, nft_loss, optimality_probability
from align.sample import SamplingOptions, sample_latents, stochastic_timesteps
from align.training import core, rollouts
from align.training.grpo import epoch_batches, hacking_streak
from align.training.rollouts import local_columns

KEYS = ("loss", "policy_loss", "positive_loss", "negative_loss", "old_deviation", "r_mean", "kl")


@dataclass
class NFTConfig(core.TrainConfig):
    """DiffusionNFT on clean rollouts of the old policy, scored by judges (see the module docstring)."""

    name: str = field(default="nft", metadata={"help": "the run's name: its directory is <output_dir>/<name>"})
    objective: Literal["nft"] = field(default="nft", metadata={"help": "nft (picks the training module)"})
    prompts_file: str = field(default="", metadata={"help": "required: one prompt per line"})
    judges: list = field(default_factory=list, metadata={"help": "the training reward: judge specs (align/judges.py)"})
    judge_weights: list = field(default_factory=list, metadata={"help": "one per judge; [] = equal"})
    eval_judges: list = field(
        default_factory=list, metadata={"help": "held-out judges: scored each round, never trained on"}
    )
    group_size: int = field(default=4, metadata={"help": "G rollouts per prompt (the group of the normalisation)"})
    prompts_per_round: int = field(default=4, metadata={"help": "prompt groups per round"})
    inner_epochs: int = field(default=1, metadata={"help": "passes over a round's rollouts"})
    sample_steps: int = field(default=10, metadata={"help": "sampler steps per rollout (NVlabs trains with 10)"})
    sampler: Literal["vidalign", "pipeline"] = field(
        default="vidalign",
        metadata={"help": "vidalign (the ODE; its clean latent) or pipeline (the family's sampler; VAE round trip)"},
    )
    guidance_scale: float = field(default=1.0, metadata={"help": "CFG of the rollouts; 1 = off (NVlabs' NFT)"})
    nft_beta: float = field(
        default=1.0, metadata={"help": "beta of the implicit policies (NVlabs' config.beta: 1, 0.1 for OCR)"}
    )
    adv_clip_max: float = field(
        default=5.0, metadata={"help": "advantages clipped to [-c, c], then r = adv / 2c + 1/2; also the loss scale"}
    )
    adv_global_std: bool = field(
        default=True, metadata={"help": "normalise by the round's reward std (NVlabs) instead of the group's"}
    )
    adaptive_weight: bool = field(
        default=True, metadata={"help": "divide each sample's squared x0 error by its detached mean |error| (NVlabs)"}
    )
    train_timestep_fraction: float = field(
        default=0.99,
        metadata={"help": "int(fraction x sample_steps) (>= 1) of the sampler's timesteps trained per rollout (TIME)"},
    )
    kl_weight: float = field(
        default=0.0, metadata={"help": "weight of mean (v - v_ref)^2 to the base (NVlabs 1e-4); 0 skips that pass"}
    )
    old_decay_rate: float = field(default=0.001, metadata={"help": "old-policy EMA: d grows this much per step ..."})
    old_decay_flat: int = field(default=0, metadata={"help": "... after this many steps (d = 0 before) ..."})
    old_decay_max: float = field(default=0.5, metadata={"help": "... up to this; old = d old + (1 - d) theta"})
    rollout_batch_size: int = field(default=8, metadata={"help": "rollouts sampled at once per process (MEMORY)"})
    rollout_batches_per_update: int = field(
        default=1,
        metadata={"help": "micro-batches of rollouts (each at all its timesteps) per update; accumulation is derived"},
    )
    hacking_patience: int = field(
        default=3, metadata={"help": "rounds of rising train reward and falling held-out score before a warning"}
    )
    lr_warmup_steps: int = field(
        default=0, metadata={"help": "linear warm-up steps of the learning rate, then constant"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.objective != "nft":
            raise ValueError(f"NFTConfig: recipe key `objective` must be 'nft', got {self.objective!r}")
        rollouts.check_online_keys(self, "nft", "rewards are normalised in the group")
        if self.sample_steps < 1:
            raise ValueError(f"recipe key `sample_steps` must be >= 1, got {self.sample_steps}")
        for key in ("nft_beta", "adv_clip_max"):
            if not getattr(self, key) > 0:
                raise ValueError(f"recipe key `{key}` must be > 0, got {getattr(self, key)}")
        for key in ("kl_weight", "old_decay_rate", "old_decay_flat"):
            if getattr(self, key) < 0:
                raise ValueError(f"recipe key `{key}` must be >= 0, got {getattr(self, key)}")
        if not 0 <= self.old_decay_max < 1:
            raise ValueError(f"recipe key `old_decay_max` must be in [0, 1), got {self.old_decay_max}")
        if not 0 < self.train_timestep_fraction <= 1:
            raise ValueError(
                f"recipe key `train_timestep_fraction` must be in (0, 1], got {self.train_timestep_fraction}"
            )
        if self.guidance_scale < 1:
            raise ValueError(f"recipe key `guidance_scale` must be >= 1 (1 = no guidance), got {self.guidance_scale}")
        if self.sampler not in ("vidalign", "pipeline"):
            raise ValueError(f"recipe key `sampler` must be vidalign or pipeline, got {self.sampler!r}")

    @property
    def rollouts_per_round(self) -> int:
        return self.prompts_per_round * self.group_size

    @property
    def trained_steps(self) -> int:
        """Timesteps trained per rollout and pass: ``int(train_timestep_fraction x sample_steps)``,
        at least 1 (NVlabs: ``int(10 x 0.99) = 9`` of its 10)."""
        return max(1, int(self.train_timestep_fraction * self.sample_steps))

    def derived_accumulation_steps(self) -> int:
        """Unset ``gradient_accumulation_steps``: every trained timestep of
        ``rollout_batches_per_update`` micro-batches of rollouts per update."""
        return self.rollout_batches_per_update * self.trained_steps


def _seed(*parts: int) -> int:
    """A 63-bit seed from integers (the recipe's seed, a purpose tag, round, ...)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def old_decay(cfg: NFTConfig, step: int) -> float:
    """The old policy's EMA decay after ``step`` optimizer steps (NVlabs' ``return_decay``)."""
    if step < cfg.old_decay_flat:
        return 0.0
    return min((step - cfg.old_decay_flat) * cfg.old_decay_rate, cfg.old_decay_max)


@contextmanager
def policy_weights(params: Sequence[torch.nn.Parameter], weights: Sequence[torch.Tensor]) -> Iterator[None]:
    """The LoRA ``params`` hold ``weights`` inside the block, their own values again after it
    (bit for bit). Forward passes in the block must not need gradients."""
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, w in zip(params, weights):
            p.copy_(w)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)


def blend_old(old: list[torch.Tensor], params: Sequence[torch.nn.Parameter], decay: float) -> None:
    """``old = decay old + (1 - decay) theta``, in place."""
    with torch.no_grad():
        for o, p in zip(old, params):
            o.mul_(decay).add_(p.detach(), alpha=1.0 - decay)


def round_prompts(prompts: list[str], cfg: NFTConfig, r: int) -> list[str]:
    """The ``prompts_per_round`` prompts of round ``r``, each ``group_size`` times."""
    order = rollouts.draw_prompts(
        len(prompts), cfg.prompts_per_round, torch.Generator().manual_seed(_seed(cfg.seed, 0, r))
    )
    return [prompts[i] for i in order for _ in range(cfg.group_size)]


def trained_timesteps(cfg: NFTConfig, r: int, e: int, i: int) -> list[int]:
    """Indices (into the sampler's ``sample_steps`` timesteps) rollout ``i`` trains in pass ``e``."""
    g = torch.Generator().manual_seed(_seed(cfg.seed, 2, r, e, i))
    return torch.randperm(cfg.sample_steps, generator=g)[: cfg.trained_steps].tolist()


def probabilities(cfg: NFTConfig, reward: np.ndarray, groups: np.ndarray) -> torch.Tensor:
    """``(N,)`` optimality probabilities of a round's combined rewards (module docstring, step 2)."""
    adv = group_advantages(torch.as_tensor(reward).float(), torch.as_tensor(groups), global_std=cfg.adv_global_std)
    return optimality_probability(adv, cfg.adv_clip_max)


def _sample(opts: SamplingOptions, model, prompts: list[str], seeds: list[int]) -> dict:
    """NFT's sampler of a round: clean latents (CPU), prompt states and uint8 videos, in chunks of
    ``opts.batch_size``: vidalign's ODE, or the family's pipeline (its videos VAE-encoded)."""
    from align.frames import from_uint8, to_uint8

    lat, cond, videos = [], [], []
    for a in range(0, len(prompts), opts.batch_size):
        p, s = prompts[a : a + opts.batch_size], seeds[a : a + opts.batch_size]
        if opts.sampler == "vidalign":
            x0 = sample_latents(model, p, s, opts.num_steps, opts.guidance_scale)
            v = to_uint8(model.decode_latents(x0))
        else:
            v = to_uint8(model.generate_videos(p, s, opts.num_steps, opts.guidance_scale, batch_size=len(p)))
            x0 = model.encode_video(from_uint8(v).to(model.device))
        lat.append(x0.cpu())
        cond.append(model.encode_prompts(list(p)).cpu())
        videos.append(v)
    return {"latents": torch.cat(lat), "cond": torch.cat(cond), "videos": np.concatenate(videos)}


def _round_stats(cfg: NFTConfig, rnd: rollouts.Round, spec: rollouts.Rollouts, history: dict) -> dict:
    """The round's metrics and the reward-hacking streak (history updated here)."""
    stats = rollouts.reward_stats(rnd, spec)
    stats.update(rollout_s=rnd.rollout_s, reward_s=rnd.reward_s)
    history["train"].append(stats["reward_mean"])
    if spec.eval_judges:
        history["heldout"].append(stats["heldout_mean"])
        stats["hacking_streak"] = hacking_streak(history["train"], history["heldout"])
        stats["hacking_warning"] = stats["hacking_streak"] >= cfg.hacking_patience
    return stats


def _micro_batches(cfg: NFTConfig, run: core.Run, rnd: rollouts.Round, prob: torch.Tensor, skip: int):
    """The round's micro-batches ``(x0, cond, t, noise, r)``: every pass's batches of rollouts, each
    at its ``K`` timesteps with seeded noise per (round, pass, rollout, timestep); the first
    ``skip`` are skipped (a run resumed inside the round)."""
    n, micro, width = len(rnd.prompts), run.micro, run.micro * run.world
    pos = {g: k for k, g in enumerate(rnd.local)}
    grid = stochastic_timesteps(run.model, cfg.sample_steps)[: cfg.sample_steps]
    lat, cond = rnd.samples["latents"], rnd.samples["cond"]
    for e in range(cfg.inner_epochs):
        for batch in epoch_batches(cfg, rnd.index, e, n, width, micro, run.rank):
            rows = torch.tensor([pos[i] for i in batch])
            steps = torch.tensor([trained_timesteps(cfg, rnd.index, e, i) for i in batch])  # (micro, K)
            for j in range(cfg.trained_steps):
                if skip:
                    skip -= 1
                    continue
                shape = lat.shape[1:]
                gens = [torch.Generator().manual_seed(_seed(cfg.seed, 4, rnd.index, e, i, j)) for i in batch]
                noise = torch.stack([torch.randn(shape, generator=g) for g in gens])
                t = grid[steps[:, j]].to(run.device)
                yield (lat[rows].to(run.device), cond[rows].to(run.device), t, noise.to(run.device), prob[batch])


def nft_batches(cfg: NFTConfig, run: core.Run, prompts: list[str], judges, eval_judges, state: dict, info: dict):
    """Rounds from the checkpointed position: each blends the old policy (rounds after the first,
    unless resumed inside the round), yields its statistics (a dict), then its micro-batches."""
    n, width = cfg.rollouts_per_round, run.micro * run.world
    per_round = cfg.inner_epochs * (n // width) * cfg.trained_steps
    opts = rollouts.sampling_options(cfg, batch_size=cfg.rollout_batch_size).replace(sampler=cfg.sampler)
    params = lora_parameters(run.base)

    def sample(ps: list[str], seeds: list[int]) -> dict:
        with policy_weights(params, state["old"]):
            return _sample(opts, run.model, ps, seeds)

    spec = rollouts.Rollouts(
        sample, judges, local_columns(n, width, run.micro, run.rank), cfg.group_size,
        cfg.judge_weights or None, eval_judges,
        rewrites=rollouts.prompt_rewrites(cfg, run, prompts),  # prompt_rewriter: sample the rewrites, judge originals
    )  # fmt: skip
    r, skip = divmod(run.micro_step, per_round)
    times = info.setdefault("round_times", [])
    while True:
        if r > 0 and skip == 0:
            blend_old(state["old"], params, old_decay(cfg, run.step))
        seeds = [_seed(cfg.seed, 3, r, i) for i in range(n)]
        rnd = rollouts.play_round(run, spec, r, round_prompts(prompts, cfg, r), seeds)
        prob = probabilities(cfg, rnd.reward, rnd.groups).to(run.device)
        stats = _round_stats(cfg, rnd, spec, state)
        stats["old_decay"] = old_decay(cfg, run.step) if r > 0 else 0.0
        if stats.get("hacking_warning") and run.is_main:
            print(
                f"[vidalign] nft WARNING round {r}: possible reward hacking -- the training reward rose and the "
                f"held-out score ({', '.join(cfg.eval_judges)}) fell for {stats['hacking_streak']} rounds in a row"
            )
        t2 = time.perf_counter()
        yield stats
        yield from _micro_batches(cfg, run, rnd, prob, skip)
        skip = 0
        times.append(
            {"round": r, "rollout_s": rnd.rollout_s, "reward_s": rnd.reward_s, "train_s": time.perf_counter() - t2}
        )
        r += 1


def x0_scale(model, t: torch.Tensor) -> torch.Tensor | None:
    """``(B,)`` factor from prediction errors to x0 errors: flow ``s = t / T``, v ``sigma_t``;
    epsilon models None (the loss stays on the noise: see the module docstring)."""
    sched = model.scheduler
    if model.prediction_type == "flow":
        return t.float() / sched.num_train_timesteps
    if model.prediction_type == "v":
        a = sched.alphas_cumprod.to(t.device)[t.long().clamp(0, sched.num_train_timesteps - 1)]
        return (1 - a).sqrt().float()
    return None


def nft_step_losses(cfg: NFTConfig, run: core.Run, batch, old: list[torch.Tensor]) -> dict:
    """NFT terms of one micro-batch: the old policy's prediction (its LoRA swapped in, no
    gradient), the trained one through the prepared denoiser (so DDP / DeepSpeed sync its
    gradients), the reference's when ``kl_weight`` > 0, and :func:`align.objectives.nft_loss`."""
    x0, cond, t, noise, r = batch
    sched = run.model.scheduler
    x_t, target = sched.add_noise(x0, noise, t), sched.target(x0, noise, t)
    with torch.no_grad(), policy_weights(lora_parameters(run.base), old):
        old_pred = run.base(x_t, t, cond)
    pred = run.denoiser(x_t, t, cond)
    kl = None
    if cfg.kl_weight > 0:
        with torch.no_grad(), adapters_disabled(run.base):
            ref = run.base(x_t, t, cond)
        kl = (pred.float() - ref.float()).pow(2).flatten(1).mean(1)
    return nft_loss(
        pred, old_pred, target, r, cfg.nft_beta, x0_scale(run.model, t), cfg.adaptive_weight,
        loss_scale=cfg.adv_clip_max, kl=kl, kl_weight=cfg.kl_weight,
    )  # fmt: skip


def check_layout(cfg: NFTConfig, micro: int, world: int) -> int:
    """Optimizer steps per round; rounds must split into whole micro-batches, updates and (with
    ``checkpointing_steps``) checkpoint intervals."""
    n, width = cfg.rollouts_per_round, micro * world
    if n % width:
        raise ValueError(
            f"nft: a round's {n} rollouts (prompts_per_round {cfg.prompts_per_round} x group_size {cfg.group_size}) "
            f"do not split into micro-batches of {micro} rollouts x {world} process(es); make it a multiple of {width}"
        )
    per_round, gas = cfg.inner_epochs * (n // width) * cfg.trained_steps, cfg.accumulation_steps
    if per_round % gas:
        raise ValueError(
            f"nft: a round has {per_round} micro-steps (inner_epochs x {n // width} micro-batches x "
            f"{cfg.trained_steps} timesteps), not a multiple of gradient_accumulation_steps {gas}: rounds must end "
            "on an update (leave it unset and choose `rollout_batches_per_update` dividing "
            f"{n // width * cfg.inner_epochs})"
        )
    steps = per_round // gas
    if cfg.checkpointing_steps and cfg.checkpointing_steps % steps:
        raise ValueError(
            f"nft: checkpointing_steps {cfg.checkpointing_steps} is not a multiple of the {steps} optimizer steps "
            "per round: checkpoints must fall on round boundaries to resume exactly"
        )
    return steps


def _restore(run: core.Run, state: dict, per_round: int) -> None:
    """A resumed run's old policy and reward history from its checkpoint's ``nft_state.pt``."""
    saved = run.ckpt / "nft_state.pt"
    if not saved.is_file():
        raise core.CheckpointError(f"{saved}: missing (an NFT checkpoint holds its old policy there)")
    s = torch.load(saved, weights_only=True)
    with torch.no_grad():
        for o, v in zip(state["old"], s["old"]):
            o.copy_(v.to(o.device))
    r = run.micro_step // per_round  # a round resumed inside it records its statistics again
    state["train"], state["heldout"] = list(s["train"])[:r], list(s["heldout"])[:r]
    rollouts.mid_round_note(run, per_round, "nft")


def train(cfg: NFTConfig) -> Path:
    """Run DiffusionNFT as configured; returns the run directory (see the module docstring)."""
    from align.data.prompts import read_prompts
    from align.judges import check_prompts, load_judges

    prompts = read_prompts(cfg.prompts_file)
    rollouts.check_prompt_rewriter(cfg)
    run = core.start(cfg)
    if run.stage == 3 or run.fsdp2:
        raise ValueError("nft: ZeRO-3 and FSDP2 shard the LoRA the old policy is swapped into; use DDP or ZeRO-2")
    if cfg.sampler == "pipeline" and not run.model.has_pipeline_sampler:
        raise ValueError(f"recipe key `sampler`: {cfg.model} has no pipeline sampler; use sampler: vidalign")
    steps_per_round = check_layout(cfg, run.micro, run.world)
    device = str(run.device)
    judges, eval_judges = load_judges(cfg.judges, device=device), load_judges(cfg.eval_judges, device=device)
    check_prompts([*judges, *eval_judges], prompts)
    core.prepare(cfg, run)
    state = {"old": [p.detach().clone() for p in lora_parameters(run.base)], "train": [], "heldout": []}
    per_round = steps_per_round * cfg.accumulation_steps
    if run.ckpt is not None:
        _restore(run, state, per_round)
    info = {
        "online": True,
        "prompts": len(prompts),
        "judges": list(cfg.judges),
        "eval_judges": list(cfg.eval_judges),
        "rollouts_per_round": cfg.rollouts_per_round,
        "trained_timesteps_per_rollout": cfg.trained_steps,
        "sampler": cfg.sampler,
        "steps_per_round": steps_per_round,
    }
    batches = nft_batches(cfg, run, prompts, judges, eval_judges, state, info)

    def extra() -> dict:
        old = [o.cpu() for o in state["old"]]
        return {"nft_state": {"old": old, "train": list(state["train"]), "heldout": list(state["heldout"])}}

    out = core.loop(cfg, run, batches, lambda b: nft_step_losses(cfg, run, b, state["old"]), KEYS, info, extra)
    if run.is_main:
        from align.eval.plots import plot_online_rounds

        plot_online_rounds(out / "metrics.jsonl", out / "rounds.png", title=f"nft ({cfg.name})")
    return out
