"""Reward-weighted regression (Peng et al. 2019; Lee et al. 2023 for text-to-image) with LoRA,
offline on a scored-samples dataset or online on samples of the current policy.

The loss is the denoising loss of each sample weighted by ``softmax(reward / rwr_temperature)``
within its prompt group, clipped at ``rwr_max_weight`` (``align.objectives.rwr_weights``).
Three departures from plain RWR, each a recipe key (off = plain RWR):

- ``rwr_guidance_scale`` g != 1: the error is that of the classifier-free-guided prediction
  ``u + g * (c - u)`` (``u`` on the empty prompt's state), not of the conditional one. The
  samples were drawn with guidance, so this is the prediction that made them; fitting the
  conditional branch to guided samples and then guiding again at sampling time compounds the
  guidance (colour and background drift).
- ``rwr_kl_weight`` > 0: adds ``rwr_kl_weight * mean ||pred - pred_ref||^2`` on the same
  noised inputs (with g != 1 both guided), the reference being the denoiser with its adapters
  off: the per-step KL bound to the base model that DPOK uses (Fan et al. 2023).
- ``rwr_cond_dropout`` > 0: that share of the samples (drawn for the global batch, like the
  noise) is conditioned on the empty prompt, so the unconditional branch follows too.

Online (``online: true``), training runs in rounds: sample the current policy on
``online_prompts_per_round`` prompts x ``online_samples_per_prompt`` seeds, score them with the
judges (``judges``: ``reward:DIR``, ``clip:MODEL``, ``http:URL``; ``reward_model: DIR`` is
short for ``judges: [reward:DIR]``), combine them into one reward per sample (one judge: its
raw score; several: the mean of their z-scores within the prompt group,
:func:`align.judges.combine_judges`), and train on that buffer for ``online_steps_per_round``
micro-batches. The round is :mod:`align.training.rollouts`' (each process samples and encodes
its share of the round, the buffer is gathered); every process then trains on the same
micro-batches of the buffer with its own noise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Literal

import torch
from torch.utils.data import DataLoader, TensorDataset

from align.frames import from_uint8
from align.models.lora import adapters_disabled
from align.objectives import per_sample_mse, rwr_loss, rwr_weights
from align.sample import SamplingOptions, guided_prediction
from align.training import core, rollouts

KEYS = ("loss", "weighted_err", "mean_err", "ess")


@dataclass
class RWRConfig(core.TrainConfig):
    """Reward-weighted regression, offline (``dataset``: scored samples) or online (``online``)."""

    name: str = field(default="rwr", metadata={"help": "the run's name: its directory is <output_dir>/<name>"})
    objective: Literal["rwr"] = field(default="rwr", metadata={"help": "rwr (picks the training module)"})
    rwr_temperature: float = field(
        default=1.0, metadata={"help": "weights = softmax(reward / T) within a prompt group ..."}
    )
    rwr_max_weight: float = field(default=0.5, metadata={"help": "... clipped at this share of the group"})
    rwr_cond_dropout: float = field(default=0.0, metadata={"help": "share of samples trained with the empty prompt"})
    rwr_kl_weight: float = field(default=0.0, metadata={"help": "weight of ||pred - pred_reference||^2 (adapters off)"})
    rwr_guidance_scale: float = field(
        default=1.0, metadata={"help": "fit the guided prediction (set it to the samples' guidance); 1 = plain"}
    )
    online: bool = field(
        default=False, metadata={"help": "online RWR: sample the current policy, score with the judges, update, repeat"}
    )
    judges: list = field(
        default_factory=list, metadata={"help": "judge specs (align/judges.py); several: mean of z-scores"}
    )
    reward_model: str | None = field(
        default=None, metadata={"help": "a reward model directory: short for judges [reward:DIR]"}
    )
    prompts_file: str | None = field(default=None, metadata={"help": "online prompts, one per line (required online)"})
    online_prompts_per_round: int = field(default=16, metadata={"help": "online: prompts drawn per round"})
    online_samples_per_prompt: int = field(
        default=4, metadata={"help": "online: samples (seeds) per prompt, one prompt group"}
    )
    online_steps_per_round: int = field(
        default=10, metadata={"help": "online: micro-batches trained on each round's samples"}
    )
    sample_steps: int = field(default=20, metadata={"help": "online: sampler steps per video"})
    guidance_scale: float = field(default=4.0, metadata={"help": "online: classifier-free guidance of the samples"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.objective != "rwr":
            raise ValueError(f"RWRConfig: recipe key `objective` must be 'rwr', got {self.objective!r}")
        if self.rwr_temperature <= 0:
            raise ValueError(f"recipe key `rwr_temperature` must be > 0, got {self.rwr_temperature}")
        if not 0.0 <= self.rwr_cond_dropout < 1.0:
            raise ValueError(f"recipe key `rwr_cond_dropout` must be in [0, 1), got {self.rwr_cond_dropout}")
        if self.rwr_kl_weight < 0:
            raise ValueError(f"recipe key `rwr_kl_weight` must be >= 0, got {self.rwr_kl_weight}")
        if self.rwr_guidance_scale < 1.0:
            raise ValueError(
                f"recipe key `rwr_guidance_scale` must be >= 1 (1 = plain RWR), got {self.rwr_guidance_scale}"
            )
        if not self.online:
            if not self.dataset:
                raise ValueError("recipe key `dataset` is required for objective 'rwr' (unless `online: true`)")
            return
        if not self.judge_specs:
            raise ValueError("online RWR needs `judges` (e.g. [reward:runs/reward_model/best]) or `reward_model`")
        if not self.prompts_file:
            raise ValueError("online RWR needs `prompts_file` (one prompt per line)")
        for key in ("online_prompts_per_round", "online_samples_per_prompt", "online_steps_per_round", "sample_steps"):
            if getattr(self, key) <= 0:
                raise ValueError(f"recipe key `{key}` must be > 0, got {getattr(self, key)}")

    @property
    def judge_specs(self) -> list[str]:
        """``judges``, with ``reward_model`` as ``reward:DIR`` in front."""
        return ([f"reward:{self.reward_model}"] if self.reward_model else []) + list(self.judges)


def _weights(cfg: RWRConfig, rewards, groups) -> torch.Tensor:
    """RWR weights: softmax of reward / temperature within each group, clipped."""
    r = torch.as_tensor(rewards, dtype=torch.float32)
    return rwr_weights(r, torch.as_tensor(groups), cfg.rwr_temperature, cfg.rwr_max_weight)


@torch.no_grad()
def _encode(model, prompts: list[str], videos, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """VAE latents and prompt states of uint8 videos and their prompts, on the CPU."""
    lat, txt = [], []
    for i in range(0, len(prompts), batch_size):
        lat.append(model.encode_video(from_uint8(videos[i : i + batch_size]).to(model.device)).cpu())
        txt.append(model.encode_prompts(prompts[i : i + batch_size]).cpu())
    return torch.cat(lat), torch.cat(txt)


def encode_scored(model, prompts: list[str], videos, rewards, groups, cfg: RWRConfig, batch_size: int = 64):
    """Latents, prompt states and RWR weights (softmax of reward / temperature within each
    group, clipped) of scored samples, as a TensorDataset ``(latents, cond, weight)``."""
    return TensorDataset(*_encode(model, prompts, videos, batch_size), _weights(cfg, rewards, groups))


def rwr_step_losses(
    model,
    denoiser,
    batch,
    generator=None,
    shard: tuple[int, int] = (0, 1),
    uncond: torch.Tensor | None = None,
    cond_dropout: float = 0.0,
    base=None,
    kl_weight: float = 0.0,
    guidance_scale: float = 1.0,
    num_groups: torch.Tensor | float | None = None,
) -> dict:
    """RWR terms for one batch ``(latents, cond, weight)``: the weighted denoising loss, with
    the module docstring's three departures. ``shard`` as in ``dpo.dpo_step_losses``;
    ``num_groups`` as in ``objectives.rwr_loss`` (the trainer passes this process's share of the
    global batch's, so that N processes average to the one-process loss)."""
    lat, cond, w = batch
    sched = model.scheduler
    noise, t = core.shared_draws(model, lat.shape, generator, shard, lat.device)
    if (cond_dropout > 0 or guidance_scale != 1.0) and uncond is None:
        raise ValueError("rwr_step_losses: cond_dropout and guidance_scale != 1 need the empty prompt's state `uncond`")
    if cond_dropout > 0:
        rank, world = shard
        n = lat.shape[0]
        drop = (torch.rand(n * world, generator=generator)[rank * n : (rank + 1) * n] < cond_dropout).to(cond.device)
        cond = torch.where(drop.view(-1, *[1] * (cond.dim() - 1)), uncond.to(cond.dtype).expand_as(cond), cond)
    x_t = sched.add_noise(lat, noise, t)
    u = uncond.to(cond.dtype).expand_as(cond) if guidance_scale != 1.0 else None
    pred = guided_prediction(denoiser, x_t, t, cond, u, guidance_scale)
    err = per_sample_mse(pred, sched.target(lat, noise, t))
    out = rwr_loss(err, w.to(err.dtype), num_groups)
    if kl_weight > 0:
        if base is None:
            raise ValueError("rwr_step_losses: kl_weight needs `base` (the LoRA-wrapped denoiser) for the reference")
        with torch.no_grad(), adapters_disabled(base):
            ref = guided_prediction(base, x_t, t, cond, u, guidance_scale)
        kl = per_sample_mse(pred, ref).mean()
        out["loss"] = out["loss"] + kl_weight * kl
        out["kl"] = kl.detach()
    return out


def _sample(opts: SamplingOptions, model, prompts: list[str], seeds: list[int]) -> dict:
    """Online RWR's sampler of a round: the deterministic sampler's videos (``generate``)."""
    from align.frames import to_uint8
    from align.sample import generate

    return {"videos": to_uint8(generate(model, prompts, seeds, opts.num_steps, opts.guidance_scale, opts.batch_size))}


def _round_data(cfg: RWRConfig, run: core.Run, rnd: rollouts.Round) -> TensorDataset:
    """The round's buffer ``(latents, cond, weight)`` on every process: this process encodes the
    videos it sampled, the encodings are gathered, the weights come from the combined rewards."""
    lat, txt = _encode(run.model, [rnd.conditioning[i] for i in rnd.local], rnd.samples["videos"])  # as sampled
    lat, txt = (rollouts.gather_rows(run, rnd.local, x, len(rnd.prompts)) for x in (lat, txt))
    return TensorDataset(lat, txt, _weights(cfg, rnd.reward, rnd.groups))


def online_batches(cfg: RWRConfig, run: core.Run, prompts: list[str], judges: list):
    """Online RWR in rounds (:mod:`align.training.rollouts`): sample the *current* policy on
    ``online_prompts_per_round`` prompts x ``online_samples_per_prompt`` seeds (this process its
    share), score with the judges, combine them into one reward per sample, and yield that
    round's reward statistics (a dict) followed by ``online_steps_per_round`` micro-batches.

    Round r draws its prompts and batch order from its own generator (seeded by the recipe's
    seed and r), so a run resumed at micro-step ``run.micro_step`` picks up at round
    ``micro_step // online_steps_per_round`` without replaying earlier rounds. At a round
    boundary that is exact; mid-round, the round's buffer is sampled again from the restored
    policy (the buffer itself is not checkpointed) and only the round's remaining steps run."""
    spr, k = cfg.online_steps_per_round, cfg.online_samples_per_prompt
    n = cfg.online_prompts_per_round * k
    opts = rollouts.sampling_options(cfg, batch_size=128)
    spec = rollouts.Rollouts(partial(_sample, opts, run.model), judges, rollouts.share(n, run.world, run.rank), k)
    spec.rewrites = rollouts.prompt_rewrites(cfg, run, prompts)  # prompt_rewriter: sample the rewrites, judge originals
    r, done = divmod(run.micro_step, spr)
    while True:
        rng = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 17 + r)
        pick = rollouts.draw_prompts(len(prompts), cfg.online_prompts_per_round, rng)
        ps = [prompts[i] for i in pick for _ in range(k)]
        seeds = [cfg.seed * 1_000_003 + 10_000 * r + i for i in range(n)]
        rnd = rollouts.play_round(run, spec, r, ps, seeds)
        loader = DataLoader(_round_data(cfg, run, rnd), batch_size=run.micro, shuffle=True, generator=rng)
        yield rollouts.reward_stats(rnd, spec)
        while done < spr:
            for batch in loader:
                yield tuple(x.to(run.device) for x in batch)
                done += 1
                if done >= spr:
                    break
        r, done = r + 1, 0


def check_online_layout(cfg: RWRConfig) -> None:
    """Online rounds must end on an update: ``online_steps_per_round`` a multiple of
    ``gradient_accumulation_steps`` (unset: 1, an update per micro-batch)."""
    gas = cfg.accumulation_steps
    if cfg.online_steps_per_round % gas:
        raise ValueError(
            f"online RWR: a round has {cfg.online_steps_per_round} micro-steps (online_steps_per_round), not a "
            f"multiple of gradient_accumulation_steps {gas}: rounds must end on an update (leave it unset for 1)"
        )


def _offline_data(cfg: RWRConfig, model) -> tuple[TensorDataset, dict]:
    """The encoded scored samples and a summary for the log."""
    from align.data.samples import load_scored_samples

    s = load_scored_samples(cfg.dataset, bad_rows=cfg.bad_rows)
    data = encode_scored(model, s.prompts, s.videos, s.rewards, s.groups, cfg)
    return data, {"samples": len(s.prompts), "groups": int(len(set(s.groups.tolist()))), "skipped": s.skipped}


def train(cfg: RWRConfig) -> Path:
    """Run RWR as configured (offline on ``dataset``, or online); returns the run directory."""
    if cfg.online:  # prompts, judges and the round's layout are checked before the model loads
        from align.data.prompts import read_prompts
        from align.judges import check_prompts, load_judges

        check_online_layout(cfg)
        prompts = read_prompts(cfg.prompts_file)
        judges = load_judges(cfg.judge_specs, device=None)
        check_prompts(judges, prompts)
    rollouts.check_prompt_rewriter(cfg, online=cfg.online)
    run = core.start(cfg, noise_per_process=cfg.online)
    if cfg.online:
        data, info = None, {"online": True, "prompts": len(prompts), "judges": cfg.judge_specs}
    else:
        data, info = _offline_data(cfg, run.model)
    uncond = None
    if cfg.rwr_cond_dropout > 0 or cfg.rwr_guidance_scale != 1.0:
        with torch.no_grad():  # the empty prompt's state, for the unconditional share and for guidance
            uncond = run.model.encode_prompts([""])
    core.prepare(cfg, run)
    if cfg.online:
        rollouts.mid_round_note(run, cfg.online_steps_per_round, "online RWR")
        batches, shard = online_batches(cfg, run, prompts, judges), (0, 1)
    else:
        batches, shard = core.shard_batches(data, run, cfg.seed), (run.rank, run.world)
    keys = KEYS + (("kl",) if cfg.rwr_kl_weight > 0 else ())

    def step(batch) -> dict:
        groups = None
        if not cfg.online and run.world > 1:  # the global batch's weight mass, this process's share
            total = run.accelerator.reduce(batch[2].sum().to(run.device), reduction="sum")
            groups = total.clamp(min=1.0) / run.world
        return rwr_step_losses(
            run.model,
            run.denoiser,
            batch,
            run.gen,
            shard,
            uncond=uncond,
            cond_dropout=cfg.rwr_cond_dropout,
            base=run.base,
            kl_weight=cfg.rwr_kl_weight,
            guidance_scale=cfg.rwr_guidance_scale,
            num_groups=groups,
        )

    out = core.loop(cfg, run, batches, step, keys, info)
    if cfg.online and run.is_main:  # training reward and held-out score per round, side by side
        from align.eval.plots import plot_online_rounds

        plot_online_rounds(out / "metrics.jsonl", out / "rounds.png", title=f"online rwr ({cfg.name})")
    return out
