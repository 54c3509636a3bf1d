"""Pretraining of the demo's two models on the synthetic world: the tiny Sora generator (the
VAE, then the denoiser) and the reward model's tiny CLIP backbone.

This gives the demo a *pretrained* generator to align, the way a user brings one. It is
deliberately short: the result is a mediocre generator with room for alignment. The demo
ships both models (``align/demo_models/``, made by ``pretrain_demo_models``).

The generator:

1. Render ``num_videos`` synthetic clips (every scene of the world, at random).
2. Train the spatiotemporal VAE (reconstruction + ``kl_weight`` * KL).
3. Encode every clip once (posterior mean), set ``scaling_factor = 1 / std(latents)``.
4. Train the U-ViT denoiser and the text encoder on the cached latents, dropping the
   prompt (replacing it by ``""``) for ``cond_dropout`` of samples, for classifier-free
   guidance.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from align.atomic import file_sha256
from align.config import PretrainConfig, save_config
from align.demo.synthetic import all_scenes, sample_videos
from align.frames import from_uint8
from align.models.tiny_sora import TinySora, TinySoraConfig
from align.objectives import per_sample_mse


def _cosine_lr(step: int, total: int, base: float, warmup: int = 20) -> float:
    """Linear warmup then cosine decay to 10% of ``base``."""
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def _log(f, record: dict) -> None:
    f.write(json.dumps(record) + "\n")
    f.flush()


def pretrain(cfg: PretrainConfig, progress: bool = True) -> Path:
    """Run the whole pretraining and write a TinySora directory to ``cfg.output_dir``."""
    out = Path(cfg.output_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    mcfg = TinySoraConfig.from_dict(cfg.model)
    model = TinySora(mcfg)
    timings: dict[str, float] = {}

    # 1. data
    t0 = time.time()
    scenes = all_scenes()
    picks = [scenes[i] for i in rng.integers(0, len(scenes), cfg.num_videos)]
    videos = sample_videos(picks, rng, num_frames=mcfg.num_frames, size=mcfg.image_size)  # uint8 (N,T,H,W,3)
    prompts = [s.prompt for s in picks]
    timings["data_s"] = time.time() - t0
    log_path = out.parent / f"{out.name}.metrics.jsonl"
    logf = open(log_path, "w")

    # 2. VAE
    t0 = time.time()
    vae = _train_vae(model, videos, cfg, gen, logf, progress)
    timings["vae_s"] = time.time() - t0

    # 3. latent cache
    t0 = time.time()
    with torch.no_grad():
        lat = torch.cat([vae.encode(from_uint8(videos[i : i + 256]))[0] for i in range(0, len(videos), 256)])
    model.cfg.scaling_factor = float(1.0 / lat.std())
    lat = lat * model.cfg.scaling_factor
    tokens = model.tokenize(prompts)
    empty = model.tokenize([""])[0]
    timings["encode_s"] = time.time() - t0

    # 4. denoiser + text encoder
    t0 = time.time()
    _train_denoiser(model, lat, tokens, empty, cfg, gen, logf, progress)
    timings["denoiser_s"] = time.time() - t0
    logf.close()

    model.eval().requires_grad_(False)
    model.save_pretrained(out)
    save_config(cfg, out / "pretrain_config.yaml")
    (out / "pretrain_info.json").write_text(
        json.dumps({"timings_s": timings, "model": asdict(model.cfg), "num_videos": cfg.num_videos}, indent=2)
    )
    return out


def _train_vae(model: TinySora, videos: np.ndarray, cfg: PretrainConfig, gen, logf, progress: bool):
    """Step 2: the VAE on random batches of the clips (reconstruction + ``kl_weight`` * KL);
    returns it frozen, in eval mode."""
    vae = model.vae.train()
    # foreach: the same numbers as the single-tensor loop PyTorch picks on CPU (checked bitwise),
    # ~10% less time per step for a model of many small tensors
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0, foreach=True)
    bar = tqdm(range(cfg.vae_steps), desc="pretrain VAE", disable=not progress)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = _cosine_lr(step, cfg.vae_steps, cfg.vae_lr)
        idx = torch.randint(0, len(videos), (cfg.vae_batch_size,), generator=gen)
        x = from_uint8(videos[idx.numpy()])
        o = vae(x, generator=gen)
        loss = o["rec_loss"] + cfg.kl_weight * o["kl"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(rec=f"{o['rec_loss'].item():.4f}", kl=f"{o['kl'].item():.2f}")
        _log(logf, {"phase": "vae", "step": step, "rec_loss": o["rec_loss"].item(), "kl": o["kl"].item()})
    return vae.eval().requires_grad_(False)


def _train_denoiser(model: TinySora, lat, tokens, empty, cfg: PretrainConfig, gen, logf, progress: bool) -> None:
    """Step 4: the denoiser and the text encoder on the cached latents, the prompt dropped for
    ``cond_dropout`` of samples; with ``ema_decay``, the denoiser ends as its EMA."""
    den, txt = model.denoiser.train(), model.text_encoder.train()
    params = list(den.parameters()) + list(txt.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.denoiser_lr, weight_decay=0.0, foreach=True)
    ema = copy.deepcopy(den).requires_grad_(False) if cfg.ema_decay > 0 else None
    sched = model.scheduler
    bar = tqdm(range(cfg.denoiser_steps), desc="pretrain denoiser", disable=not progress)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = _cosine_lr(step, cfg.denoiser_steps, cfg.denoiser_lr)
        idx = torch.randint(0, len(lat), (cfg.denoiser_batch_size,), generator=gen)
        x0, ids = lat[idx], tokens[idx].clone()
        drop = torch.rand(len(idx), generator=gen) < cfg.cond_dropout
        ids[drop] = empty
        noise = torch.randn(x0.shape, generator=gen)
        t = sched.sample_timesteps(len(idx), generator=gen)
        pred = den(sched.add_noise(x0, noise, t), t, txt(ids))
        loss = per_sample_mse(pred, sched.target(x0, noise, t)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if ema is not None:
            with torch.no_grad():
                for pe, p in zip(ema.parameters(), den.parameters()):
                    pe.lerp_(p, 1 - cfg.ema_decay)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        _log(logf, {"phase": "denoiser", "step": step, "loss": loss.item()})
    if ema is not None:
        model.denoiser.load_state_dict(ema.state_dict())


# ---------------------------------------------------------------- the demo's reward backbone

# the demo reward model's backbone: frames averaged, plus the signed last-minus-first frame so
# that a frame-level CLIP can see where the shape moved
REWARD_BACKBONE = {"pooling": "mean", "motion_frame": True}


def world_clips_with_reversals(seed: int, n: int = 2048) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Clips of ``n`` random scenes of the synthetic world with their captions, plus each clip
    played backwards with the opposite direction in its caption (``2n`` items);
    ``negatives[i]`` is the index of item i's reversed twin."""
    import dataclasses

    rng = np.random.default_rng(seed + 7)
    scenes = all_scenes()
    picks = [scenes[i] for i in rng.integers(0, len(scenes), n)]
    videos = sample_videos(picks, rng)
    flip = {"left": "right", "right": "left", "up": "down", "down": "up"}
    prompts = [s.prompt for s in picks] + [dataclasses.replace(s, direction=flip[s.direction]).prompt for s in picks]
    negatives = np.concatenate([np.arange(n) + n, np.arange(n)])
    return np.concatenate([videos, videos[:, ::-1]]), prompts, negatives


def pretrain_reward_backbone(out: str | Path, steps: int = 2400, seed: int = 0, progress: bool = True) -> Path:
    """A tiny CLIP backbone for the demo's reward model, pretrained contrastively on the world's
    clips and captions (what an open_clip pretrained tag is for a real user). Each batch holds
    clips together with their time-reversed twins as hard negatives, so that the video
    embedding has to see motion, not only colour and shape."""
    from reward_models.model import RewardModelConfig, VideoRewardModel
    from reward_models.train import contrastive_pretrain

    videos, prompts, negatives = world_clips_with_reversals(seed)
    torch.manual_seed(seed)
    model = VideoRewardModel(RewardModelConfig(**REWARD_BACKBONE))
    contrastive_pretrain(model, videos, prompts, steps, seed=seed, progress=progress, hard_negatives=negatives)
    return model.save_pretrained(Path(out), {"pretrained_on": "synthetic world (contrastive, reversal negatives)"})


# ---------------------------------------------------------------- the demo's shipped models

# align/demo_models/: tiny_sora/, reward_backbone/, SHA256SUMS (package data, beside this package)
DEMO_MODELS = Path(__file__).resolve().parents[1] / "demo_models"
SHA256SUMS = "SHA256SUMS"


def _to_fp16(path: Path) -> None:
    """Rewrite the float32 tensors of a safetensors file as float16 (loading casts them back)."""
    from safetensors.torch import load_file, save_file

    state = {k: v.half() if v.dtype == torch.float32 else v for k, v in load_file(str(path)).items()}
    save_file(state, str(path))


def pretrain_demo_models(
    out: str | Path = DEMO_MODELS, cfg: PretrainConfig | None = None, reward_steps: int = 2400, progress: bool = True
) -> Path:
    """Both models the demo ships, into ``out``: the tiny Sora generator (``pretrain``) and the
    reward backbone (``pretrain_reward_backbone``), their weights stored as float16, and a
    ``SHA256SUMS`` file that ``demo_models`` checks at load. ``vidalign pretrain --demo`` and
    ``make pretrained`` run this."""
    out = Path(out)
    cfg = cfg or PretrainConfig()
    gen = pretrain(PretrainConfig(**{**asdict(cfg), "output_dir": str(out / "tiny_sora")}), progress=progress)
    rm = pretrain_reward_backbone(out / "reward_backbone", reward_steps, cfg.seed, progress)
    lines = []
    for f in sorted([*gen.iterdir(), *rm.iterdir()]):
        if f.suffix == ".safetensors":
            _to_fp16(f)
        lines.append(f"{file_sha256(f)}  {f.relative_to(out)}")
    (out / SHA256SUMS).write_text("\n".join(lines) + "\n")
    for stale in out.glob("*.metrics.jsonl"):  # pretrain's training log lands beside the model
        stale.unlink()
    return out


def demo_models(root: str | Path = DEMO_MODELS) -> tuple[Path, Path]:
    """The shipped generator and reward backbone directories, after checking every file against
    ``SHA256SUMS``; a missing or changed file is an error that says how to regenerate them."""
    root = Path(root)
    sums = root / SHA256SUMS
    fix = "regenerate them with `make pretrained` (vidalign pretrain --demo)"
    if not sums.is_file():
        raise FileNotFoundError(f"demo models: {sums} is missing; {fix}")
    for line in sums.read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        f = root / name
        if not f.is_file():
            raise FileNotFoundError(f"demo models: {f} is missing; {fix}")
        if file_sha256(f) != digest:
            raise ValueError(f"demo models: {f} does not match its sha256 in {sums} (changed or corrupt); {fix}")
    return root / "tiny_sora", root / "reward_backbone"
