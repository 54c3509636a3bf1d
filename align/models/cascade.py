"""A cascade in the Imagen Video manner: the tiny Sora base model, then super-resolution stages.

Imagen Video (Ho et al. 2022) generates a small, short video with a base model and refines it
with a chain of conditional diffusion models: temporal super-resolution (TSR: more frames) and
spatial super-resolution (SSR: more pixels), each conditioned on the upsampled output of the
stage below, "to focus computational resources on producing fine details only where needed"
(the seed deck, ``shared/seed``). Each stage is trained with *noise-conditioning augmentation*:
the conditioning video is noised by a random level at training and a fixed level at sampling,
and the level is given to the model, so that the stage learns to fix the artefacts of the
stage below rather than trust its input blindly.

The embedded cascade (``align/demo_models/tiny_sora_cascade``): the tiny base (8 x 32 x 32),
a TSR stage (x2 frames: 16 x 32 x 32) and an SSR stage (x2 height and width: 16 x 64 x 64).

Departures from Imagen Video, all for a model that trains in CPU minutes:

- The stages work in the base model's latent space (its VAE is fully convolutional, so it
  encodes and decodes any size): a stage maps latents ``(4, T, H, W)`` to ``(4, 2T, H, W)`` or
  ``(4, T, 2H, 2W)`` and the final latents are decoded once (LTX-Video's latent upsampler
  works in latent space too). Imagen Video's stages are pixel-space U-Nets.
- The stages are not text-conditioned (their input video fixes the content of the synthetic
  world's clips); the base is. Imagen Video conditions every stage on the text.
- Each stage is a small convolutional ResNet (3x3x3 kernels in TSR, 1x3x3 in SSR; the time
  step and the augmentation level are added to every block), trained with the base's
  flow-matching objective; sampling is ``num_steps`` Euler steps of the flow ODE. Imagen Video
  uses v-prediction U-Nets with progressive distillation.
- Augmentation is the flow interpolation ``(1 - s) z + s eps`` of the conditioning latents
  (``s ~ U(0, aug_level_max)`` at training, ``sample_aug_level`` at sampling), not Imagen
  Video's variance-preserving Gaussian noise; the level ``s`` is the model's second timestep.

What the cascade presents to training is the base stage: ``denoiser`` is the base's U-ViT
(LoRA goes there; the stages are frozen), ``encode_video`` takes the base's size (a final
video is first downsampled: every other frame, 2x2 area pooling, the inverse of how the stages'
training pairs are made), ``latent_shape`` is the base's. Sampling runs the base, then
``decode_videos`` runs the stages (seeded per sample) and decodes the final latents: that is
the video ``generate``, ``eval``, ``data pairs`` and the online rounds give the judges.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from align.atomic import atomic_directory
from align.models.tiny_sora import TinySora, timestep_embedding
from align.schedules import NoiseSchedule

CASCADE_CONFIG = "cascade.json"  # what makes a model directory a cascade
STAGE_KINDS = ("temporal", "spatial")


@dataclass
class StageConfig:
    """One super-resolution stage. Saved in the cascade's ``cascade.json``."""

    kind: str = "spatial"  # temporal (x factor frames) | spatial (x factor height and width)
    factor: int = 2
    latent_channels: int = 4
    channels: int = 32
    blocks: int = 2
    num_train_timesteps: int = 1000
    aug_level_max: float = 0.5  # training: conditioning noised at s ~ U(0, aug_level_max)
    sample_aug_level: float = 0.1  # sampling: the fixed level
    num_steps: int = 6  # Euler steps of the flow ODE at sampling

    def __post_init__(self) -> None:
        if self.kind not in STAGE_KINDS:
            raise ValueError(f"StageConfig.kind must be one of {STAGE_KINDS}, got {self.kind!r}")
        if self.factor < 2 or self.channels < 8 or self.blocks < 1 or self.num_steps < 1:
            raise ValueError(f"StageConfig: factor >= 2, channels >= 8, blocks >= 1, num_steps >= 1; got {self}")
        if not 0.0 <= self.sample_aug_level <= self.aug_level_max <= 1.0:
            raise ValueError(
                "StageConfig: need 0 <= sample_aug_level <= aug_level_max <= 1, "
                f"got {self.sample_aug_level} and {self.aug_level_max}"
            )

    @classmethod
    def from_dict(cls, d: dict) -> StageConfig:
        """Build from a dict, naming any key the config does not have."""
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown StageConfig keys: {unknown}")
        return cls(**d)

    def up_shape(self, shape: tuple[int, int, int]) -> tuple[int, int, int]:
        """Latent ``(T, H, W)`` after this stage."""
        t, h, w = shape
        return (t * self.factor, h, w) if self.kind == "temporal" else (t, h * self.factor, w * self.factor)


def upsample(z: torch.Tensor, cfg: StageConfig) -> torch.Tensor:
    """The lower stage's latents ``(B, C, T, H, W)`` upsampled to the stage's size (trilinear):
    what the stage is conditioned on."""
    scale = (cfg.factor, 1, 1) if cfg.kind == "temporal" else (1, cfg.factor, cfg.factor)
    return F.interpolate(z.float(), scale_factor=scale, mode="trilinear", align_corners=False)


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, c), c)


class StageBlock(nn.Module):
    """Residual conv block; the step embedding is added after the first convolution. Kernels are
    ``(kt, 3, 3)``: 3x3x3 in a temporal stage, 1x3x3 (per frame, a third of the cost) in a
    spatial one, whose input convolution alone mixes neighbouring frames."""

    def __init__(self, c: int, kt: int = 3):
        super().__init__()
        k, pad = (kt, 3, 3), (kt // 2, 1, 1)
        self.norm1, self.conv1 = _norm(c), nn.Conv3d(c, c, k, padding=pad)
        self.emb = nn.Linear(c, c)
        self.norm2, self.conv2 = _norm(c), nn.Conv3d(c, c, k, padding=pad)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x))) + self.emb(emb)[:, :, None, None, None]
        return x + self.conv2(F.silu(self.norm2(h)))


class StageDenoiser(nn.Module):
    """Velocity of the stage's noisy latents given the upsampled, augmented conditioning
    (concatenated on channels), the time step and the augmentation level (both embedded)."""

    def __init__(self, cfg: StageConfig):
        super().__init__()
        c, z = cfg.channels, cfg.latent_channels
        self.cfg = cfg
        self.inp = nn.Conv3d(2 * z, c, 3, padding=1)
        self.embed = nn.Sequential(nn.Linear(2 * c, c), nn.SiLU(), nn.Linear(c, c))
        kt = 3 if cfg.kind == "temporal" else 1
        self.blocks = nn.ModuleList(StageBlock(c, kt) for _ in range(cfg.blocks))
        self.out_norm, self.out = _norm(c), nn.Conv3d(c, z, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, aug: torch.Tensor) -> torch.Tensor:
        """``x`` and ``cond`` ``(B, C, T, H, W)``; ``t`` and ``aug`` ``(B,)`` in model units ``[0, T)``."""
        c = self.cfg.channels
        emb = self.embed(torch.cat([timestep_embedding(t, c), timestep_embedding(aug, c)], dim=-1))
        h = self.inp(torch.cat([x, cond], dim=1))
        for blk in self.blocks:
            h = blk(h, emb)
        return self.out(F.silu(self.out_norm(h)))


def stage_generator(seed: int, stage: int) -> torch.Generator:
    """The generator of stage ``stage``'s noise for the sample of ``seed`` (never the base's
    stream: the seed is mixed with the stage index)."""
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + 7919 * (stage + 1)) % (2**63 - 1))


class SuperResolutionStage:
    """A stage: its config, denoiser and flow schedule; training loss and sampler."""

    def __init__(self, cfg: StageConfig):
        self.cfg = cfg
        self.denoiser = StageDenoiser(cfg)
        self.scheduler = NoiseSchedule("flow", cfg.num_train_timesteps)

    def loss(self, high: torch.Tensor, low: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Flow-matching loss on target latents ``high`` given the lower stage's ``low``, the
        conditioning noised at a random level ``s ~ U(0, aug_level_max)`` (the augmentation)."""
        b, T = high.shape[0], self.cfg.num_train_timesteps
        up = upsample(low, self.cfg)
        s_aug = torch.rand(b, generator=generator) * self.cfg.aug_level_max
        cond = self.scheduler.add_noise(up, torch.randn(up.shape, generator=generator), s_aug * T)
        noise = torch.randn(high.shape, generator=generator)
        t = self.scheduler.sample_timesteps(b, generator=generator)
        pred = self.denoiser(self.scheduler.add_noise(high, noise, t), t, cond, s_aug * T)
        return (pred - self.scheduler.target(high, noise, t)).pow(2).mean()

    @torch.no_grad()
    def sample(self, low: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        """The stage's latents for the lower stage's ``low``: the conditioning augmented at
        ``sample_aug_level``, then ``num_steps`` Euler steps from noise; one generator per sample
        (its augmentation noise, then its initial noise), so a sample does not depend on its batch."""
        cfg, T, dev = self.cfg, self.cfg.num_train_timesteps, low.device
        up = upsample(low, cfg)
        shape = tuple(up.shape[1:])
        aug_noise = torch.stack([torch.randn(shape, generator=g) for g in generators]).to(dev)
        x = torch.stack([torch.randn(shape, generator=g) for g in generators]).to(dev)
        s_aug = torch.full((up.shape[0],), cfg.sample_aug_level * T, device=dev)
        cond = self.scheduler.add_noise(up, aug_noise, s_aug)
        sigmas = torch.linspace(1.0, 0.0, cfg.num_steps + 1)
        for i in range(cfg.num_steps):
            t = torch.full((x.shape[0],), sigmas[i].item() * T, device=dev)
            x = x + (sigmas[i + 1] - sigmas[i]).item() * self.denoiser(x, t, cond, s_aug).float()
        return x


class Cascade:
    """The tiny Sora base model and its super-resolution stages; implements the
    ``VideoDiffusionModel`` protocol for the base stage (see the module docstring)."""

    def __init__(self, base: TinySora, stages: list[SuperResolutionStage]):
        if not stages:
            raise ValueError("Cascade: needs at least one super-resolution stage")
        self.base = base
        self.stages = stages
        self.scheduler = base.scheduler

    # -- the base stage: what training sees ---------------------------------------------
    @property
    def denoiser(self) -> nn.Module:
        return self.base.denoiser

    @denoiser.setter
    def denoiser(self, module: nn.Module) -> None:
        self.base.denoiser = module

    @property
    def prediction_type(self) -> str:
        return self.base.prediction_type

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return self.base.latent_shape

    @property
    def device(self) -> torch.device:
        return self.base.device

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        return self.base.encode_prompts(prompts)

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        return self.base.tokenize(prompts)

    def predict(self, latents_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.base.predict(latents_t, t, cond)

    def encode_video(self, videos: torch.Tensor, sample: bool = False) -> torch.Tensor:
        """Base latents of videos at the base's size, or at the final size (first downsampled to
        the base's: every ``factor``-th frame per temporal stage, area pooling per spatial one)."""
        if tuple(videos.shape[2:]) == self.final_size:
            for st in reversed(self.stages):
                f = st.cfg.factor
                videos = videos[:, :, ::f] if st.cfg.kind == "temporal" else F.avg_pool3d(videos, (1, f, f))
        return self.base.encode_video(videos, sample=sample)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """The base stage's video of base latents (no later stage): ``decode_videos`` is the cascade's."""
        return self.base.decode_latents(latents)

    def stage_latents(self, latents: torch.Tensor, seeds: list[int]) -> list[torch.Tensor]:
        """Every stage's latents, from the base's ``latents`` (first) to the final stage's (last);
        stage ``k``'s noise for sample ``i`` comes from ``stage_generator(seeds[i], k)``."""
        if len(seeds) != latents.shape[0]:
            raise ValueError(f"Cascade: {latents.shape[0]} latents but {len(seeds)} seeds")
        out = [latents]
        for k, st in enumerate(self.stages):
            out.append(st.sample(out[-1], [stage_generator(s, k) for s in seeds]))
        return out

    def decode_videos(self, latents: torch.Tensor, prompts: list[str], seeds: list[int]) -> torch.Tensor:
        """The cascade's final videos ``(B, 3, T', H', W')`` in [-1, 1] from the base's sampled
        latents: the stages in turn (seeded per sample by ``seeds``; not text-conditioned, so
        ``prompts`` are not read), then the base VAE on the final latents."""
        del prompts  # the stages see only the video below them (module docstring)
        with torch.no_grad():
            final = self.stage_latents(latents, seeds)[-1]
            return self.base.decode_latents(final.to(latents.dtype))

    # -- protocol: abilities and sizes --------------------------------------------------
    supports_gradient_checkpointing = False
    has_pipeline_sampler = False

    def enable_gradient_checkpointing(self) -> None:
        raise ValueError("Cascade does not support gradient checkpointing (supports_gradient_checkpointing is False)")

    @property
    def final_size(self) -> tuple[int, int, int]:
        """``(num_frames, height, width)`` of the cascade's videos."""
        c = self.base.cfg
        t, h, w = c.num_frames, c.image_size, c.image_size
        for st in self.stages:
            t, h, w = st.cfg.up_shape((t, h, w))
        return t, h, w

    @property
    def video_input(self) -> dict:
        """Training resamples every video to the base's size (it trains the base stage)."""
        return self.base.video_input

    @property
    def video_size_rules(self) -> str:
        shown = "x".join(map(str, self.final_size))
        return f"fixed size {shown} (frames x height x width) after its stages; the base stage makes " + "x".join(
            str(v) for v in self.base.check_video_size()
        )

    def check_video_size(
        self, num_frames: int | None = None, height: int | None = None, width: int | None = None
    ) -> tuple[int, int, int]:
        """The cascade's final size; ``None`` stands for it, any other value is a ValueError."""
        size = self.final_size
        asked = (num_frames, height, width)
        if any(a is not None and a != s for a, s in zip(asked, size)):
            shown = "x".join(str(s if a is None else a) for a, s in zip(asked, size))
            raise ValueError(f"Cascade: video size {shown} is invalid: this model has the {self.video_size_rules}")
        return size

    # -- utilities -------------------------------------------------------------------
    def components(self) -> dict[str, nn.Module]:
        """The base's parts and every stage's denoiser (``stage0_temporal``, ``stage1_spatial``)."""
        stages = {f"stage{k}_{st.cfg.kind}": st.denoiser for k, st in enumerate(self.stages)}
        return {**self.base.components(), **stages}

    def to(self, device) -> Cascade:
        for m in self.components().values():
            m.to(device)
        return self

    def eval(self) -> Cascade:
        for m in self.components().values():
            m.eval()
        return self

    def requires_grad_(self, flag: bool) -> Cascade:
        for m in self.components().values():
            m.requires_grad_(flag)
        return self

    def save_stages(self, path: str | Path, base_path: str) -> Path:
        """Write the cascade directory: ``cascade.json`` (the base's path, relative to it, and the
        stage configs) and one safetensors file per stage, atomically."""
        path = Path(path)
        with atomic_directory(path) as tmp:
            spec = {"base": base_path, "stages": [asdict(st.cfg) for st in self.stages]}
            (tmp / CASCADE_CONFIG).write_text(json.dumps(spec, indent=2))
            for k, st in enumerate(self.stages):
                sd = {n: v.detach().contiguous().cpu() for n, v in st.denoiser.state_dict().items()}
                save_file(sd, str(tmp / stage_file(k, st.cfg)))
        return path

    @classmethod
    def from_pretrained(cls, path: str | Path, device="cpu") -> Cascade:
        """Load a cascade directory: ``cascade.json`` names the base (a path relative to the
        directory, or absolute) and the stages, whose weights lie beside it."""
        path = Path(path)
        spec = read_cascade_config(path)
        base_dir = (path / spec["base"]).resolve()
        base = TinySora.from_pretrained(base_dir, device="cpu")
        stages = []
        for k, d in enumerate(spec["stages"]):
            st = SuperResolutionStage(StageConfig.from_dict(d))
            f = path / stage_file(k, st.cfg)
            if not f.is_file():
                raise FileNotFoundError(f"{f}: stage {k} ({st.cfg.kind}) weights missing from the cascade {path}")
            st.denoiser.load_state_dict({n: v.float() for n, v in load_file(str(f)).items()})
            stages.append(st)
        return cls(base, stages).to(device).eval()


def stage_file(k: int, cfg: StageConfig) -> str:
    """File name of stage ``k``'s weights."""
    return f"stage{k}_{cfg.kind}.safetensors"


def is_cascade_dir(path: str | Path) -> bool:
    """Whether ``path`` is a cascade directory (it holds ``cascade.json``)."""
    return (Path(path) / CASCADE_CONFIG).is_file()


def read_cascade_config(path: str | Path) -> dict:
    """``cascade.json`` of a cascade directory, checked; errors name the file and the key. Two
    kinds: the embedded cascade (``base``: a TinySora directory relative to ``path``, ``stages``:
    stage configs) and a diffusers pipeline with its latent upsampler (``base``: an LTX pipeline
    directory or Hub id, ``upsampler``: the ``LTXLatentUpsamplerModel`` directory, optional
    ``options``: load_model options such as the final ``height`` / ``width``)."""
    f = Path(path) / CASCADE_CONFIG
    try:
        spec = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{f}: not a readable cascade config ({e})") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("base"), str):
        raise ValueError(f"{f}: key 'base' (the base model: a directory relative to {Path(path)}) is missing")
    if "upsampler" in spec:
        if not isinstance(spec["upsampler"], str) or not isinstance(spec.get("options", {}), dict):
            raise ValueError(f"{f}: 'upsampler' must be a path and 'options' a mapping of load_model options")
        return spec
    if not isinstance(spec.get("stages"), list) or not spec["stages"]:
        raise ValueError(f"{f}: key 'stages' must be a non-empty list of stage configs (or give 'upsampler')")
    base = Path(path) / spec["base"]
    if not (base / "config.json").is_file():
        raise FileNotFoundError(f"{f}: 'base' is {spec['base']!r}, but {base} is not a TinySora directory")
    return spec


def resolve_near(path: str | Path, value: str) -> str:
    """``value`` as a path relative to the cascade directory ``path`` when that exists, else as
    given (an absolute path, or a Hugging Face Hub id)."""
    near = Path(path) / value
    return str(near.resolve()) if near.exists() else value


def stage_param_count(stages: list[SuperResolutionStage]) -> int:
    """Parameters of the stages together."""
    return sum(p.numel() for st in stages for p in st.denoiser.parameters())
