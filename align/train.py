"""The alignment training loop: Diffusion-DPO with LoRA, on accelerate.

Read top to bottom: load the generator and freeze it, attach LoRA to the denoiser, turn the
preference dataset into (chosen, rejected) latent pairs once (the VAE and text encoder are
frozen, so their outputs are cached in memory), then for each step noise both videos of a
pair with the *same* noise and timestep, compute per-sample errors of the policy and of the
reference (= the same denoiser with adapters off) and minimise the DPO loss.

A run writes ``<output_dir>/<name>/``: ``config.yaml``, ``metrics.jsonl``,
``checkpoint-<step>/`` (atomic: temp dir + rename; the last ``checkpoints_total_limit``
kept) and the final LoRA in ``lora/`` (diffusers layout, safetensors).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from align.config import TrainConfig, save_config
from align.data.latent_cache import cached_latents
from align.data.preference import load_preference_dataset, to_pairs
from align.data.video import from_uint8
from align.models import load_model
from align.models.lora import adapters_disabled, attach_lora, load_lora, lora_parameters, save_lora
from align.objectives import diffusion_dpo_loss, per_sample_mse, rwr_loss, rwr_weights

OBJECTIVES = ("dpo", "rwr")


def make_accelerator(cfg: TrainConfig):
    """An Accelerator. Launched on CPU with several processes (``accelerate launch
    --num_processes N``), it uses the gloo backend; otherwise accelerate would see one process."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    multi_cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    handlers = [InitProcessGroupKwargs(backend="gloo")] if multi_cpu else []
    return Accelerator(
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        mixed_precision=cfg.mixed_precision,
        kwargs_handlers=handlers,
    )


@torch.no_grad()
def encode_pairs(model, pairs, batch_size: int = 64) -> TensorDataset:
    """Latents of chosen and rejected videos and prompt states, computed once."""
    lw, ll, txt = [], [], []
    for i in range(0, len(pairs.prompts), batch_size):
        lw.append(model.encode_video(from_uint8(pairs.chosen[i : i + batch_size]).to(model.device)).cpu())
        ll.append(model.encode_video(from_uint8(pairs.rejected[i : i + batch_size]).to(model.device)).cpu())
        txt.append(model.encode_prompts(pairs.prompts[i : i + batch_size]).cpu())
    return TensorDataset(torch.cat(lw), torch.cat(ll), torch.cat(txt))


def dpo_step_losses(model, denoiser, base, batch, beta: float, loss_type: str, generator=None) -> dict:
    """DPO terms for one batch of pairs. Noise and timestep are shared within a pair.

    ``denoiser`` is the (possibly DDP/DeepSpeed-wrapped) policy; ``base`` the unwrapped
    module, run with its adapters off as the reference.
    """
    lat_w, lat_l, cond = batch
    sched = model.scheduler
    noise = torch.randn(lat_w.shape, generator=generator).to(lat_w.device)
    t = sched.sample_timesteps(lat_w.shape[0], generator=generator, device=lat_w.device)
    x0 = torch.cat([lat_w, lat_l])
    noise2, t2, cond2 = torch.cat([noise, noise]), torch.cat([t, t]), torch.cat([cond, cond])
    x_t = sched.add_noise(x0, noise2, t2)
    target = sched.target(x0, noise2, t2)
    err_w, err_l = per_sample_mse(denoiser(x_t, t2, cond2), target).chunk(2)
    with torch.no_grad(), adapters_disabled(base):
        ref_w, ref_l = per_sample_mse(base(x_t, t2, cond2), target).chunk(2)
    out = diffusion_dpo_loss(err_w, err_l, ref_w, ref_l, beta=beta, loss_type=loss_type)
    out["err_w"] = err_w
    return out


def save_checkpoint(run_dir: Path, step: int, denoiser, optimizer, lr_scheduler, limit: int) -> Path:
    """``checkpoint-<step>/``: LoRA (safetensors), optimizer, LR scheduler, RNG and step; atomic."""
    final = run_dir / f"checkpoint-{step}"
    tmp = Path(tempfile.mkdtemp(dir=run_dir, prefix=f".checkpoint-{step}.tmp"))
    try:
        save_lora(denoiser, tmp / "lora")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(lr_scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save({"torch": torch.get_rng_state()}, tmp / "rng_state.pt")
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step}))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    ckpts = sorted(run_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    for old in ckpts[: max(0, len(ckpts) - limit)]:
        shutil.rmtree(old)
    return final


def _dpo_data(cfg: TrainConfig, model) -> tuple[object, dict]:
    ds = load_preference_dataset(cfg.dataset)
    pairs = to_pairs(ds, source=cfg.dataset, root=cfg.dataset, bad_rows=cfg.bad_rows)
    data = cached_latents(model, pairs, cfg.latent_cache_dir) if cfg.latent_cache_dir else encode_pairs(model, pairs)
    info = {"pairs": len(pairs.prompts), "skipped": pairs.skipped, "rows": len(ds)}
    return data, info


@torch.no_grad()
def encode_scored(model, prompts: list[str], videos, rewards, groups, cfg: TrainConfig, batch_size: int = 64):
    """Latents, prompt states and RWR weights (softmax of reward / temperature within each
    group, clipped) of scored samples, as a TensorDataset ``(latents, cond, weight)``."""
    w = rwr_weights(torch.as_tensor(rewards, dtype=torch.float32), torch.as_tensor(groups),
                    cfg.rwr_temperature, cfg.rwr_max_weight)
    lat, txt = [], []
    for i in range(0, len(prompts), batch_size):
        lat.append(model.encode_video(from_uint8(videos[i : i + batch_size]).to(model.device)).cpu())
        txt.append(model.encode_prompts(prompts[i : i + batch_size]).cpu())
    return TensorDataset(torch.cat(lat), torch.cat(txt), w)


def _rwr_offline_data(cfg: TrainConfig, model) -> tuple[object, dict]:
    from align.data.samples import load_scored_samples

    s = load_scored_samples(cfg.dataset, bad_rows=cfg.bad_rows)
    data = encode_scored(model, s.prompts, s.videos, s.rewards, s.groups, cfg)
    return data, {"samples": len(s.prompts), "groups": int(len(set(s.groups.tolist()))), "skipped": s.skipped}


def rwr_step_losses(model, denoiser, batch, generator=None) -> dict:
    """RWR terms for one batch ``(latents, cond, weight)``: weighted denoising loss."""
    lat, cond, w = batch
    sched = model.scheduler
    noise = torch.randn(lat.shape, generator=generator).to(lat.device)
    t = sched.sample_timesteps(lat.shape[0], generator=generator, device=lat.device)
    err = per_sample_mse(denoiser(sched.add_noise(lat, noise, t), t, cond), sched.target(lat, noise, t))
    return rwr_loss(err, w.to(err.dtype))


def _online_batches(cfg: TrainConfig, model, reward_model, accelerator, gen):
    """Online RWR: every ``online_steps_per_round`` steps, sample the *current* policy on
    ``online_prompts_per_round`` prompts x ``online_samples_per_prompt`` seeds, score with the
    reward model, and train on that buffer."""
    from align.data.synthetic import split_scenes
    from align.data.video import to_uint8
    from align.sample import generate

    if cfg.prompts_file:
        lines = Path(cfg.prompts_file).read_text().rstrip("\n").split("\n")
        bad = [i + 1 for i, ln in enumerate(lines) if not ln.strip()]
        if bad:
            raise ValueError(f"prompts file {cfg.prompts_file}: line {bad[0]} is empty")
        prompts = [ln.strip() for ln in lines]
    else:
        prompts = [s.prompt for s in split_scenes(0.2, seed=0)[0]]
    rng = torch.Generator().manual_seed(cfg.seed + 17)
    r = 0
    while True:
        pick = torch.randperm(len(prompts), generator=rng)[: cfg.online_prompts_per_round].tolist()
        k = cfg.online_samples_per_prompt
        ps = [prompts[i] for i in pick for _ in range(k)]
        seeds = [cfg.seed * 1_000_003 + 10_000 * r + i for i in range(len(ps))]
        model.denoiser.eval()
        videos = to_uint8(generate(model, ps, seeds, cfg.sample_steps, cfg.guidance_scale))
        model.denoiser.train()
        rewards = reward_model.score(videos, ps)
        groups = [i // k for i in range(len(ps))]
        data = encode_scored(model, ps, videos, rewards, groups, cfg)
        loader = DataLoader(data, batch_size=cfg.train_batch_size, shuffle=True, generator=rng)
        yield {"round": r, "reward_mean": float(rewards.mean()), "reward_std": float(rewards.std())}
        n = 0
        while n < cfg.online_steps_per_round:
            for batch in loader:
                yield tuple(x.to(accelerator.device) for x in batch)
                n += 1
                if n >= cfg.online_steps_per_round:
                    break
        r += 1


def train(cfg: TrainConfig) -> Path:
    """Run alignment as configured (``objective``: ``dpo`` on a preference dataset, ``rwr``
    on a scored-samples dataset, or online ``rwr`` with a reward model); returns the run
    directory."""
    if cfg.objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {cfg.objective!r}")
    online = cfg.objective == "rwr" and cfg.online
    if not online and not cfg.dataset:
        raise ValueError(f"recipe key `dataset` is required for objective {cfg.objective!r} (unless online RWR)")
    if online and not cfg.reward_model:
        raise ValueError("online RWR needs `reward_model` (a directory from `vidalign reward train`)")
    accelerator = make_accelerator(cfg)
    run_dir = Path(cfg.output_dir) / cfg.name
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed + accelerator.process_index)
    t_start = time.time()

    model = load_model(cfg.model, device=accelerator.device, **cfg.model_options)
    model.requires_grad_(False)
    if cfg.objective == "dpo":
        data, info = _dpo_data(cfg, model)
    elif not online:
        data, info = _rwr_offline_data(cfg, model)
    else:
        from reward_models.model import VideoRewardModel

        data, info = None, {"online": True}
        reward_model = VideoRewardModel.from_pretrained(cfg.reward_model, device=accelerator.device)
    attach_lora(model.denoiser, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
    model.denoiser.train()

    optimizer = torch.optim.AdamW(lora_parameters(model.denoiser), lr=cfg.learning_rate, weight_decay=0.0)
    warm = max(1, cfg.lr_warmup_steps)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warm))
    if online:
        denoiser, optimizer, lr_scheduler = accelerator.prepare(model.denoiser, optimizer, lr_scheduler)
        batches = _online_batches(cfg, model, reward_model, accelerator, gen)
    else:
        loader = DataLoader(
            data,
            batch_size=cfg.train_batch_size,
            shuffle=True,
            drop_last=len(data) >= cfg.train_batch_size,
            generator=torch.Generator().manual_seed(cfg.seed),
        )
        denoiser, optimizer, loader, lr_scheduler = accelerator.prepare(model.denoiser, optimizer, loader, lr_scheduler)

        def _repeat(loader):
            while True:
                yield from loader

        batches = _repeat(loader)
    base = accelerator.unwrap_model(denoiser)
    if accelerator.is_main_process:
        print(f"[vidalign] {cfg.objective}{' (online)' if online else ''}: {json.dumps(info)}")
    metrics_f = open(run_dir / "metrics.jsonl", "a") if accelerator.is_main_process else None
    bar = tqdm(total=cfg.max_steps, desc=f"{cfg.objective} ({cfg.name})",
               disable=not (cfg.progress and accelerator.is_main_process))
    keys = ("loss", "implicit_acc", "reward_margin", "model_diff", "ref_diff") if cfg.objective == "dpo" else (
        "loss", "weighted_err", "mean_err", "ess")
    step, t_step, n_micro = 0, time.time(), 0
    sums: dict[str, float] = {}
    round_info: dict = {}
    while step < cfg.max_steps:
        batch = next(batches)
        if isinstance(batch, dict):  # online RWR: a new round of samples
            round_info = batch
            continue
        with accelerator.accumulate(denoiser):
            if cfg.objective == "dpo":
                out = dpo_step_losses(model, denoiser, base, batch, cfg.beta, cfg.loss_type, generator=gen)
                loss = out["loss"] + cfg.sft_weight * out["err_w"].mean()
            else:
                out = rwr_step_losses(model, denoiser, batch, generator=gen)
                loss = out["loss"]
            accelerator.backward(loss)
            grad_norm = None
            if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                grad_norm = accelerator.clip_grad_norm_(denoiser.parameters(), cfg.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        for k in keys:
            sums[k] = sums.get(k, 0.0) + float(out[k].detach())
        n_micro += 1
        if not accelerator.sync_gradients:
            continue
        step += 1
        avg = torch.tensor([sums[k] / n_micro for k in keys], device=accelerator.device)
        avg = accelerator.reduce(avg, reduction="mean")
        rec = {"step": step, **{k: float(v) for k, v in zip(keys, avg)}, **round_info}
        rec["lr"] = lr_scheduler.get_last_lr()[0]
        rec["grad_norm"] = float(grad_norm) if grad_norm is not None else None
        rec["step_time_s"] = time.time() - t_step
        sums, n_micro, t_step = {}, 0, time.time()
        if accelerator.is_main_process:
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                metrics_f.write(json.dumps(rec) + "\n")
                metrics_f.flush()
            bar.update(1)
            post = {"loss": f"{rec['loss']:.4f}"}
            if "implicit_acc" in rec:
                post["acc"] = f"{rec['implicit_acc']:.2f}"
            bar.set_postfix(post)
            if cfg.checkpointing_steps > 0 and step % cfg.checkpointing_steps == 0:
                unwrapped = accelerator.unwrap_model(denoiser)
                save_checkpoint(run_dir, step, unwrapped, optimizer, lr_scheduler, cfg.checkpoints_total_limit)
    bar.close()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        metrics_f.close()
        save_lora(accelerator.unwrap_model(denoiser), run_dir / "lora", {"base_model": str(cfg.model)})
        info["train_s"] = time.time() - t_start
        (run_dir / "summary.json").write_text(json.dumps(info, indent=2))
    accelerator.end_training()
    return run_dir


def load_aligned(model_path: str | Path, lora_path: str | Path | None, device="cpu", **options):
    """The base generator, with a trained LoRA attached when ``lora_path`` is given."""
    model = load_model(model_path, device=device, **options)
    if lora_path:
        load_lora(model.denoiser, lora_path)
    return model.eval()
