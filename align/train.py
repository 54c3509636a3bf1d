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
from align.data.preference import load_preference_dataset, to_pairs
from align.data.video import from_uint8
from align.models import load_model
from align.models.lora import adapters_disabled, attach_lora, load_lora, lora_parameters, save_lora
from align.objectives import diffusion_dpo_loss, per_sample_mse

OBJECTIVES = ("dpo",)


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


def train(cfg: TrainConfig) -> Path:
    """Run DPO alignment as configured; returns the run directory."""
    if cfg.objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {cfg.objective!r}")
    accelerator = make_accelerator(cfg)
    run_dir = Path(cfg.output_dir) / cfg.name
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed + accelerator.process_index)
    t_start = time.time()

    model = load_model(cfg.model, device=accelerator.device)
    model.requires_grad_(False)
    ds = load_preference_dataset(cfg.dataset)
    pairs = to_pairs(ds, source=cfg.dataset, root=cfg.dataset, bad_rows=cfg.bad_rows)
    data = encode_pairs(model, pairs)
    attach_lora(model.denoiser, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
    model.denoiser.train()

    loader = DataLoader(
        data,
        batch_size=cfg.train_batch_size,
        shuffle=True,
        drop_last=len(data) >= cfg.train_batch_size,
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    optimizer = torch.optim.AdamW(lora_parameters(model.denoiser), lr=cfg.learning_rate, weight_decay=0.0)
    warm = max(1, cfg.lr_warmup_steps)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warm))
    denoiser, optimizer, loader, lr_scheduler = accelerator.prepare(model.denoiser, optimizer, loader, lr_scheduler)

    base = accelerator.unwrap_model(denoiser)
    info = {"pairs": len(pairs.prompts), "skipped": pairs.skipped, "rows": len(ds)}
    if accelerator.is_main_process:
        print(f"[vidalign] {cfg.dataset}: {info['pairs']} pairs from {info['rows']} rows; skipped {pairs.skipped}")
    metrics_f = open(run_dir / "metrics.jsonl", "a") if accelerator.is_main_process else None
    bar = tqdm(
        total=cfg.max_steps,
        desc=f"{cfg.objective} ({cfg.name})",
        disable=not (cfg.progress and accelerator.is_main_process),
    )
    step, t_step = 0, time.time()
    sums: dict[str, float] = {}
    n_micro = 0
    while step < cfg.max_steps:
        for batch in loader:
            with accelerator.accumulate(denoiser):
                out = dpo_step_losses(model, denoiser, base, batch, cfg.beta, cfg.loss_type, generator=gen)
                loss = out["loss"] + cfg.sft_weight * out["err_w"].mean()
                accelerator.backward(loss)
                grad_norm = None
                if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                    grad_norm = accelerator.clip_grad_norm_(denoiser.parameters(), cfg.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            for k in ("loss", "implicit_acc", "reward_margin", "model_diff", "ref_diff"):
                sums[k] = sums.get(k, 0.0) + float(out[k].detach())
            n_micro += 1
            if not accelerator.sync_gradients:
                continue
            step += 1
            avg = torch.tensor([sums[k] / n_micro for k in sorted(sums)], device=accelerator.device)
            avg = accelerator.reduce(avg, reduction="mean")
            rec = {"step": step, **{k: float(v) for k, v in zip(sorted(sums), avg)}}
            rec["lr"] = lr_scheduler.get_last_lr()[0]
            rec["grad_norm"] = float(grad_norm) if grad_norm is not None else None
            rec["step_time_s"] = time.time() - t_step
            sums, n_micro, t_step = {}, 0, time.time()
            if accelerator.is_main_process:
                if step % cfg.log_every == 0 or step == cfg.max_steps:
                    metrics_f.write(json.dumps(rec) + "\n")
                    metrics_f.flush()
                bar.update(1)
                bar.set_postfix(loss=f"{rec['loss']:.4f}", acc=f"{rec['implicit_acc']:.2f}")
                if cfg.checkpointing_steps > 0 and step % cfg.checkpointing_steps == 0:
                    unwrapped = accelerator.unwrap_model(denoiser)
                    save_checkpoint(run_dir, step, unwrapped, optimizer, lr_scheduler, cfg.checkpoints_total_limit)
            if step >= cfg.max_steps:
                break
    bar.close()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        metrics_f.close()
        save_lora(accelerator.unwrap_model(denoiser), run_dir / "lora", {"base_model": str(cfg.model)})
        info["train_s"] = time.time() - t_start
        (run_dir / "summary.json").write_text(json.dumps(info, indent=2))
    accelerator.end_training()
    return run_dir


def load_aligned(model_path: str | Path, lora_path: str | Path | None, device="cpu"):
    """The base generator, with a trained LoRA attached when ``lora_path`` is given."""
    model = load_model(model_path, device=device)
    if lora_path:
        load_lora(model.denoiser, lora_path)
    return model.eval()
