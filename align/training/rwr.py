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
short for ``judges: [reward:DIR]``), and train on that buffer for ``online_steps_per_round``
micro-batches.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

from align.data.video import from_uint8
from align.models.lora import adapters_disabled
from align.objectives import per_sample_mse, rwr_loss, rwr_weights
from align.sample import guided_prediction
from align.training import core

KEYS = ("loss", "weighted_err", "mean_err", "ess")


@dataclass
class RWRConfig(core.TrainConfig):
    """Reward-weighted regression, offline (``dataset``: scored samples) or online (``online``)."""

    name: str = field(default="rwr", metadata={"help": "the run's name: its directory is <output_dir>/<name>"})
    objective: str = field(default="rwr", metadata={"help": "rwr (picks the training module)"})
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


@torch.no_grad()
def encode_scored(model, prompts: list[str], videos, rewards, groups, cfg: RWRConfig, batch_size: int = 64):
    """Latents, prompt states and RWR weights (softmax of reward / temperature within each
    group, clipped) of scored samples, as a TensorDataset ``(latents, cond, weight)``."""
    w = rwr_weights(
        torch.as_tensor(rewards, dtype=torch.float32), torch.as_tensor(groups), cfg.rwr_temperature, cfg.rwr_max_weight
    )
    lat, txt = [], []
    for i in range(0, len(prompts), batch_size):
        lat.append(model.encode_video(from_uint8(videos[i : i + batch_size]).to(model.device)).cpu())
        txt.append(model.encode_prompts(prompts[i : i + batch_size]).cpu())
    return TensorDataset(torch.cat(lat), torch.cat(txt), w)


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


def read_prompts(path: str | Path) -> list[str]:
    """Prompts of a file, one per line; an empty line is an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {path}: no such file")
    lines = path.read_text().rstrip("\n").split("\n")
    bad = [i + 1 for i, ln in enumerate(lines) if not ln.strip()]
    if bad:
        raise ValueError(f"prompts file {path}: line {bad[0]} is empty")
    return [ln.strip() for ln in lines]


def online_batches(cfg: RWRConfig, run: core.Run, prompts: list[str], score):
    """Online RWR in rounds: sample the *current* policy on ``online_prompts_per_round`` prompts
    x ``online_samples_per_prompt`` seeds, ``score(videos, prompts, groups)``, and yield that
    round's reward statistics (a dict) followed by ``online_steps_per_round`` micro-batches.

    Round r draws its prompts and batch order from its own generator (seeded by the recipe's
    seed and r), so a run resumed at micro-step ``run.micro_step`` picks up at round
    ``micro_step // online_steps_per_round`` without replaying earlier rounds. At a round
    boundary that is exact; mid-round, the round's buffer is sampled again from the restored
    policy (the buffer itself is not checkpointed) and only the round's remaining steps run."""
    from align.data.video import to_uint8
    from align.sample import generate

    model, spr, k = run.model, cfg.online_steps_per_round, cfg.online_samples_per_prompt
    r, n = divmod(run.micro_step, spr)
    while True:
        rng = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 17 + r)
        pick = torch.randperm(len(prompts), generator=rng)[: cfg.online_prompts_per_round].tolist()
        ps = [prompts[i] for i in pick for _ in range(k)]
        seeds = [cfg.seed * 1_000_003 + 10_000 * r + i for i in range(len(ps))]
        model.denoiser.eval()
        videos = to_uint8(generate(model, ps, seeds, cfg.sample_steps, cfg.guidance_scale))
        model.denoiser.train()
        groups = [i // k for i in range(len(ps))]
        rewards = score(videos, ps, groups)
        data = encode_scored(model, ps, videos, rewards, groups, cfg)
        loader = DataLoader(data, batch_size=run.micro, shuffle=True, generator=rng)
        yield {"round": r, "reward_mean": float(rewards.mean()), "reward_std": float(rewards.std())}
        while n < spr:
            for batch in loader:
                yield tuple(x.to(run.device) for x in batch)
                n += 1
                if n >= spr:
                    break
        r, n = r + 1, 0


def _scorer(cfg: RWRConfig, device):
    """``score(videos, prompts, groups)`` of the recipe's judges: one judge's own scores, or the
    mean of several judges' scores z-scored within each prompt group."""
    from align.judges import combined_score, load_judges

    judges = load_judges(cfg.judge_specs, device=device)
    if len(judges) == 1:
        return lambda videos, prompts, groups: judges[0].score(videos, prompts)
    return lambda videos, prompts, groups: combined_score(judges, videos, prompts, groups=groups)


def _offline_data(cfg: RWRConfig, model) -> tuple[TensorDataset, dict]:
    """The encoded scored samples and a summary for the log."""
    from align.data.samples import load_scored_samples

    s = load_scored_samples(cfg.dataset, bad_rows=cfg.bad_rows)
    data = encode_scored(model, s.prompts, s.videos, s.rewards, s.groups, cfg)
    return data, {"samples": len(s.prompts), "groups": int(len(set(s.groups.tolist()))), "skipped": s.skipped}


def train(cfg: RWRConfig) -> Path:
    """Run RWR as configured (offline on ``dataset``, or online); returns the run directory."""
    if cfg.online:  # prompts and judges are checked before the model loads
        prompts = read_prompts(cfg.prompts_file)
        score = _scorer(cfg, device=None)
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
        if run.ckpt is not None and run.micro_step % cfg.online_steps_per_round and run.is_main:
            print(
                f"[vidalign] online RWR: {run.ckpt} is mid-round (micro-step {run.micro_step}, "
                f"{cfg.online_steps_per_round} per round): this round's samples are drawn again "
                "from the restored policy, so the run will not match an uninterrupted one exactly "
                "(checkpoints on round boundaries resume exactly)"
            )
        batches, shard = online_batches(cfg, run, prompts, score), (0, 1)
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

    return core.loop(cfg, run, batches, step, keys, info)
