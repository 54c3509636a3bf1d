"""Pretraining a cascade's super-resolution stages on the synthetic world (``vidalign pretrain
recipes/tiny_sora_cascade_pretrain.yaml``): the base (a pretrained TinySora) stays as it is.

1. Render ``num_videos`` clips of random scenes at the cascade's *final* size (16 x 64 x 64 for
   a TSR and an SSR stage over the 8 x 32 x 32 base): the same scenes, sizes and speeds as
   :func:`align.demo.synthetic.render` draws at the base's size, sampled at ``time_up`` times
   the frame rate and ``space_up`` times the resolution (:func:`render_fine`).
2. Make every level's clip from it by going down the cascade: a temporal stage keeps every
   ``factor``-th frame, a spatial stage averages ``factor x factor`` pixels (so the base level
   is the base's own distribution), and encode each level once with the base's VAE (posterior
   mean, times its scaling factor).
3. Train each stage on (its level's latents, the level below's) with the flow-matching loss
   and noise-conditioning augmentation (:meth:`align.models.cascade.SuperResolutionStage.loss`).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from align.demo.synthetic import BACKGROUNDS, COLORS, DIRECTIONS, Scene, _coverage, all_scenes
from align.frames import from_uint8
from align.models.cascade import Cascade, StageConfig, SuperResolutionStage, stage_param_count
from align.models.tiny_sora import TinySora


@dataclass
class CascadePretrainConfig:
    """Pretraining of a cascade's stages (a recipe with a ``stages`` key is one of these)."""

    output_dir: str = field(
        default="runs/pretrained/tiny_sora_cascade", metadata={"help": "where the cascade directory is written"}
    )
    base: str = field(
        default="align/demo_models/tiny_sora", metadata={"help": "the pretrained TinySora base (kept as it is)"}
    )
    stages: list = field(
        default_factory=lambda: [{"kind": "temporal"}, {"kind": "spatial"}],
        metadata={"help": "the stages, bottom up: StageConfig dicts (kind temporal|spatial, factor, channels, ...)"},
    )
    seed: int = field(default=0, metadata={"help": "seed of the clips and of training"})
    num_videos: int = field(default=1024, metadata={"help": "synthetic clips rendered at the final size"})
    steps: int = field(default=400, metadata={"help": "training steps per stage"})
    batch_size: int = field(default=16, metadata={"help": "clips per step"})
    lr: float = field(default=2e-3, metadata={"help": "AdamW learning rate (cosine decay to 10%)"})

    def __post_init__(self) -> None:
        self.stage_configs = [StageConfig.from_dict(dict(d)) for d in self.stages]  # checks every stage
        if self.num_videos < self.batch_size or self.steps < 1:
            raise ValueError(f"num_videos ({self.num_videos}) must be >= batch_size ({self.batch_size}), steps >= 1")


def render_fine(
    scene: Scene, rng: np.random.Generator, num_frames: int = 8, size: int = 32, time_up: int = 2, space_up: int = 2
) -> np.ndarray:
    """A clip of ``scene`` drawn as :func:`align.demo.synthetic.render` draws it at ``num_frames``
    x ``size`` (side 8-12 px and speed 1.5-2.5 px/frame at 32), rendered at ``time_up`` times the
    frame rate and ``space_up`` times the resolution: uint8 ``(num_frames * time_up, size *
    space_up, size * space_up, 3)``; every ``time_up``-th frame, area-pooled, is a base-size clip."""
    scale = size / 32
    side, speed, drift = rng.uniform(8, 12) * scale, rng.uniform(1.5, 2.5) * scale, rng.uniform(-0.2, 0.2) * scale
    room = size - side
    length = (num_frames - 1) + (time_up - 1) / time_up  # the path, in base frames
    speed = min(speed, 0.9 * room / length)
    drift = float(np.clip(drift, -0.05 * room / length, 0.05 * room / length))
    dx, dy = DIRECTIONS[scene.direction]
    vx, vy = speed * dx - drift * dy, speed * dy + drift * dx

    def start(v: float) -> float:
        return rng.uniform(max(0.0, -v * length), min(room, room - v * length))

    t = np.arange(num_frames * time_up) / time_up
    x0, y0 = (start(vx) + vx * t) * space_up, (start(vy) + vy * t) * space_up
    alpha = _coverage(scene.shape, x0, y0, side * space_up, size * space_up)[..., None]
    bg = np.array(BACKGROUNDS[scene.background], dtype=np.float64)
    fg = np.array(COLORS[scene.color], dtype=np.float64)
    return np.round(bg + alpha * (fg - bg)).astype(np.uint8)


def level_videos(fine: torch.Tensor, stages: list[StageConfig]) -> list[torch.Tensor]:
    """Every level's clips, base first, from the final-size clips ``fine`` ``(B, 3, T, H, W)``
    (going down the cascade: frames subsampled, pixels area-pooled)."""
    levels = [fine]
    for st in reversed(stages):
        x = levels[0]
        f = st.factor
        levels.insert(0, x[:, :, ::f] if st.kind == "temporal" else F.avg_pool3d(x, (1, f, f)))
    return levels


def _ups(stages: list[StageConfig]) -> tuple[int, int]:
    """``(time_up, space_up)``: the final size over the base's."""
    tu = int(np.prod([s.factor for s in stages if s.kind == "temporal"] or [1]))
    su = int(np.prod([s.factor for s in stages if s.kind == "spatial"] or [1]))
    return tu, su


@torch.no_grad()
def encode_levels(base: TinySora, cfg: CascadePretrainConfig, chunk: int = 32) -> list[torch.Tensor]:
    """Steps 1-2: every level's latents ``(num_videos, 4, ...)``, base level first."""
    rng = np.random.default_rng(cfg.seed)
    scenes = all_scenes()
    tu, su = _ups(cfg.stage_configs)
    mc = base.cfg
    picks = [scenes[i] for i in rng.integers(0, len(scenes), cfg.num_videos)]
    out: list[list[torch.Tensor]] = [[] for _ in range(len(cfg.stage_configs) + 1)]
    for i in range(0, len(picks), chunk):
        clips = np.stack([render_fine(s, rng, mc.num_frames, mc.image_size, tu, su) for s in picks[i : i + chunk]])
        for k, v in enumerate(level_videos(from_uint8(clips), cfg.stage_configs)):
            out[k].append(base.vae.encode(v)[0] * mc.scaling_factor)
    return [torch.cat(o) for o in out]


def train_stage(stage: SuperResolutionStage, high: torch.Tensor, low: torch.Tensor, cfg, gen, desc: str) -> list:
    """Step 3 for one stage; returns its loss per step."""
    from align.demo.pretrain import _cosine_lr

    den = stage.denoiser.train()
    opt = torch.optim.AdamW(den.parameters(), lr=cfg.lr, weight_decay=0.0, foreach=True)
    losses = []
    bar = tqdm(range(cfg.steps), desc=desc)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = _cosine_lr(step, cfg.steps, cfg.lr)
        idx = torch.randint(0, len(high), (cfg.batch_size,), generator=gen)
        loss = stage.loss(high[idx], low[idx], generator=gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(den.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.4f}")
    den.eval().requires_grad_(False)
    return losses


def pretrain_cascade(cfg: CascadePretrainConfig) -> Path:
    """Pretrain the stages of ``cfg`` over its base and write the cascade directory (its
    ``cascade.json`` names the base by a path relative to it), with ``pretrain_info.json``."""
    from align.config import save_config

    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    base = TinySora.from_pretrained(cfg.base)
    t0 = time.time()
    lat = encode_levels(base, cfg)
    timings = {"data_s": time.time() - t0}
    stages = [SuperResolutionStage(c) for c in cfg.stage_configs]
    final_loss = {}
    for k, st in enumerate(stages):
        t0 = time.time()
        losses = train_stage(st, lat[k + 1], lat[k], cfg, gen, f"pretrain stage {k} ({st.cfg.kind})")
        timings[f"stage{k}_s"] = time.time() - t0
        final_loss[f"stage{k}"] = float(np.mean(losses[-20:]))
    out = Path(cfg.output_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    rel = os.path.relpath(Path(cfg.base).resolve(), out.resolve())
    Cascade(base, stages).save_stages(out, rel)
    save_config(cfg, out / "pretrain_config.yaml")
    info = {"timings_s": timings, "final_loss": final_loss, "stage_params": stage_param_count(stages)}
    (out / "pretrain_info.json").write_text(json.dumps({**info, "num_videos": cfg.num_videos}, indent=2))
    return out


def ship_cascade(cfg: CascadePretrainConfig, out: str | Path) -> Path:
    """The cascade the demo ships, into ``out/tiny_sora_cascade`` over the base ``out/tiny_sora``:
    pretrained (``pretrain_cascade``), its stage weights stored as float16, and its files'
    lines added to (or replaced in) ``out/SHA256SUMS``, which ``demo_models`` checks."""
    from align.atomic import file_sha256
    from align.demo.pretrain import SHA256SUMS, _to_fp16

    out = Path(out)
    cfg.output_dir, cfg.base = str(out / "tiny_sora_cascade"), str(out / "tiny_sora")
    path = pretrain_cascade(cfg)
    sums = out / SHA256SUMS
    keep = [ln for ln in (sums.read_text().splitlines() if sums.is_file() else []) if " tiny_sora_cascade/" not in ln]
    for f in sorted(path.iterdir()):
        if f.suffix == ".safetensors":
            _to_fp16(f)
        keep.append(f"{file_sha256(f)}  {f.relative_to(out)}")
    sums.write_text("\n".join(keep) + "\n")
    return path


def is_cascade_recipe(recipe: str | Path | None) -> bool:
    """Whether a pretrain recipe pretrains a cascade's stages: it has a ``stages`` key."""
    from align.config import read_recipe

    return recipe is not None and "stages" in read_recipe(recipe)
