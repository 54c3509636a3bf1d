"""Tiny Sora: the seed architecture, small enough to train on a laptop CPU.

Three parts, as in the presumed Sora design (see ``shared/seed``):

1. ``SpatioTemporalVAE``: a 3D-convolutional KL autoencoder that compresses time by
   ``time_down`` and space by ``space_down`` (8x32x32 RGB -> 4x8x8 latents by default).
   Trained with reconstruction + a small KL term, as in latent diffusion.
2. ``TextEncoder``: open_clip's BPE tokenizer (it ships inside the wheel, so no download)
   and a small transformer trained from scratch with the denoiser.
3. ``UViT``: a U-ViT denoiser (Bao et al. 2022) over spacetime latent patches. The time
   step, the text tokens and the noisy patches are all tokens of one sequence; the first
   half of the blocks feed long skip connections into the second half (concatenate, then a
   linear layer), like a U-Net. Departures from the paper: pre-LN blocks with
   ``scaled_dot_product_attention``, learned position embeddings, a zero-initialised
   output layer, and no final 3x3 conv.

``TinySora`` ties them together and implements the ``VideoDiffusionModel`` protocol.
Weights are saved as safetensors next to a JSON config.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from align.atomic import atomic_directory
from align.schedules import NoiseSchedule


@dataclass
class TinySoraConfig:
    """Every size of the tiny model. Saved as ``config.json``; data, not code."""

    num_frames: int = 8
    image_size: int = 32
    in_channels: int = 3
    # VAE
    latent_channels: int = 4
    vae_channels: int = 16  # after the first downsampling; doubles per stage
    time_down: int = 2  # 1 or 2
    space_down: int = 4  # 2 or 4
    scaling_factor: float = 1.0  # set after VAE training so latents have unit std
    # text
    context_length: int = 16
    text_dim: int = 96
    text_layers: int = 2
    # U-ViT
    patch_size: tuple[int, int, int] = (1, 2, 2)
    dim: int = 96
    depth: int = 5  # odd: (depth-1)/2 in-blocks, 1 mid-block, (depth-1)/2 out-blocks
    heads: int = 4
    mlp_ratio: float = 4.0
    # diffusion
    prediction_type: str = "flow"
    num_train_timesteps: int = 1000

    def __post_init__(self) -> None:
        self.patch_size = tuple(self.patch_size)
        if self.depth % 2 != 1:
            raise ValueError(f"TinySoraConfig.depth must be odd (U-ViT), got {self.depth}")
        if self.time_down not in (1, 2) or self.space_down not in (2, 4):
            raise ValueError("TinySoraConfig: time_down must be 1|2 and space_down 2|4")
        lt, lh, lw = self.latent_size
        pt, ph, pw = self.patch_size
        if lt % pt or lh % ph or lw % pw:
            raise ValueError(f"patch_size {self.patch_size} does not divide latents {self.latent_size}")

    @property
    def latent_size(self) -> tuple[int, int, int]:
        """Latent ``(T, H, W)`` for the configured video size."""
        s = self.image_size // self.space_down
        return (self.num_frames // self.time_down, s, s)

    @classmethod
    def from_dict(cls, d: dict) -> TinySoraConfig:
        """Build from a dict, naming any key the config does not have."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown TinySoraConfig keys: {unknown}")
        return cls(**d)


# ---------------------------------------------------------------------------------------
# 1. Spatiotemporal VAE
# ---------------------------------------------------------------------------------------


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, c), c)


class ResBlock3d(nn.Module):
    """GroupNorm-SiLU-Conv3d twice with a residual connection."""

    def __init__(self, c: int):
        super().__init__()
        self.net = nn.Sequential(
            _norm(c), nn.SiLU(), nn.Conv3d(c, c, 3, padding=1), _norm(c), nn.SiLU(), nn.Conv3d(c, c, 3, padding=1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


class SpatioTemporalVAE(nn.Module):
    """3D-conv KL autoencoder: ``(B, 3, T, H, W) -> (B, z, T/time_down, H/space_down, W/space_down)``.

    The first strided convolution halves space straight from the pixels (no full-resolution
    blocks, which dominate the cost on a CPU); each later stage halves space again (and,
    in the last stage, time when ``time_down == 2``) after a residual block. The decoder
    mirrors it with transposed convolutions.
    """

    def __init__(self, cfg: TinySoraConfig):
        super().__init__()
        c, z = cfg.vae_channels, cfg.latent_channels
        n_stages = int(math.log2(cfg.space_down))
        strides = [(1, 2, 2)] * n_stages
        if cfg.time_down == 2:
            strides[-1] = (2, 2, 2)
        chans = [c * 2**i for i in range(n_stages)]  # channels after each stage
        enc: list[nn.Module] = [nn.Conv3d(cfg.in_channels, chans[0], 3, stride=strides[0], padding=1)]
        for i in range(1, n_stages):
            enc += [ResBlock3d(chans[i - 1]), nn.Conv3d(chans[i - 1], chans[i], 3, stride=strides[i], padding=1)]
        enc += [ResBlock3d(chans[-1]), _norm(chans[-1]), nn.SiLU(), nn.Conv3d(chans[-1], 2 * z, 1)]
        dec: list[nn.Module] = [nn.Conv3d(z, chans[-1], 3, padding=1), ResBlock3d(chans[-1])]
        for i in reversed(range(1, n_stages)):
            kernel = tuple(4 if s == 2 else 3 for s in strides[i])  # exact 2x (or 1x) upsampling, padding 1
            dec += [nn.ConvTranspose3d(chans[i], chans[i - 1], kernel, stride=strides[i], padding=1)]
            dec += [ResBlock3d(chans[i - 1])]
        kernel = tuple(4 if s == 2 else 3 for s in strides[0])
        dec += [_norm(chans[0]), nn.SiLU()]
        dec += [nn.ConvTranspose3d(chans[0], cfg.in_channels, kernel, stride=strides[0], padding=1)]
        self.encoder = nn.Sequential(*enc)
        self.decoder = nn.Sequential(*dec)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and log-variance (log-variance clamped to [-30, 20])."""
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Reconstruction and loss terms for one training batch (pixels in [-1, 1])."""
        mean, logvar = self.encode(x)
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        z = mean + (0.5 * logvar).exp() * noise
        recon = self.decode(z)
        rec = F.mse_loss(recon, x)
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()
        return {"recon": recon, "rec_loss": rec, "kl": kl}


# ---------------------------------------------------------------------------------------
# 2. Text encoder
# ---------------------------------------------------------------------------------------


class Block(nn.Module):
    """Pre-LN transformer block. Linear layers are named ``attn.qkv``, ``attn.proj``,
    ``mlp.fc1`` and ``mlp.fc2``: those are the LoRA targets."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.ModuleDict({"qkv": nn.Linear(dim, 3 * dim), "proj": nn.Linear(dim, dim)})
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.ModuleDict({"fc1": nn.Linear(dim, hidden), "fc2": nn.Linear(hidden, dim)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        q, k, v = self.attn["qkv"](self.norm1(x)).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, D)
        x = x + self.attn["proj"](a)
        return x + self.mlp["fc2"](F.gelu(self.mlp["fc1"](self.norm2(x))))


class TextEncoder(nn.Module):
    """Token + position embeddings and a few transformer blocks; returns every token state."""

    def __init__(self, cfg: TinySoraConfig, vocab_size: int):
        super().__init__()
        self.tok = nn.Embedding(vocab_size, cfg.text_dim)
        self.pos = nn.Parameter(torch.zeros(1, cfg.context_length, cfg.text_dim))
        nn.init.normal_(self.pos, std=0.02)
        nn.init.normal_(self.tok.weight, std=0.02)
        self.blocks = nn.ModuleList(Block(cfg.text_dim, 4) for _ in range(cfg.text_layers))
        self.norm = nn.LayerNorm(cfg.text_dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.tok(ids) + self.pos[:, : ids.shape[1]]
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


# ---------------------------------------------------------------------------------------
# 3. U-ViT denoiser
# ---------------------------------------------------------------------------------------


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of float timesteps ``(B,) -> (B, dim)``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def spacetime_sincos(grid: tuple[int, int, int], dim: int) -> torch.Tensor:
    """Fixed 3D sin-cos position codes ``(gt*gh*gw, dim)``: a third of the channels per axis
    (the remainder zero), patches in ``patchify`` order (t slowest, w fastest)."""
    per = (dim // 3) // 2 * 2
    axes = [timestep_embedding(torch.arange(n, dtype=torch.float32), per, max_period=100.0) for n in grid]
    gt, gh, gw = grid
    codes = torch.cat(
        [
            axes[0][:, None, None].expand(gt, gh, gw, per),
            axes[1][None, :, None].expand(gt, gh, gw, per),
            axes[2][None, None, :].expand(gt, gh, gw, per),
        ],
        dim=-1,
    ).reshape(gt * gh * gw, 3 * per)
    return F.pad(codes, (0, dim - 3 * per))


class UViT(nn.Module):
    """U-ViT over spacetime latent patches, conditioned on a timestep token and text tokens.

    Sequence layout: ``[time token, text tokens (context_length), video patches]``.
    ``in_blocks[i]`` outputs are pushed on a stack; ``out_blocks[i]`` pops one, concatenates
    it with its input along channels and projects back with ``skips[i]``.

    Departure from U-ViT: besides the learned position embedding, patches get fixed 3D
    sin-cos codes, which lets a tiny model learn spatial structure in minutes on a CPU.
    """

    def __init__(self, cfg: TinySoraConfig):
        super().__init__()
        self.cfg = cfg
        pt, ph, pw = cfg.patch_size
        lt, lh, lw = cfg.latent_size
        self.grid = (lt // pt, lh // ph, lw // pw)
        self.num_patches = self.grid[0] * self.grid[1] * self.grid[2]
        patch_dim = cfg.latent_channels * pt * ph * pw
        d = cfg.dim
        self.patch_embed = nn.Linear(patch_dim, d)
        self.time_embed = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))
        self.text_proj = nn.Linear(cfg.text_dim, d)
        self.pos = nn.Parameter(torch.zeros(1, 1 + cfg.context_length + self.num_patches, d))
        nn.init.normal_(self.pos, std=0.02)
        fixed = torch.zeros(1, 1 + cfg.context_length + self.num_patches, d)
        fixed[0, 1 + cfg.context_length :] = spacetime_sincos(self.grid, d)
        self.register_buffer("pos_fixed", fixed, persistent=False)
        n_half = (cfg.depth - 1) // 2
        self.in_blocks = nn.ModuleList(Block(d, cfg.heads, cfg.mlp_ratio) for _ in range(n_half))
        self.mid_block = Block(d, cfg.heads, cfg.mlp_ratio)
        self.out_blocks = nn.ModuleList(Block(d, cfg.heads, cfg.mlp_ratio) for _ in range(n_half))
        self.skips = nn.ModuleList(nn.Linear(2 * d, d) for _ in range(n_half))
        self.norm = nn.LayerNorm(d)
        self.out = nn.Linear(d, patch_dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, T, H, W) -> (B, N, C*pt*ph*pw)``."""
        B, C = x.shape[:2]
        (pt, ph, pw), (gt, gh, gw) = self.cfg.patch_size, self.grid
        x = x.reshape(B, C, gt, pt, gh, ph, gw, pw).permute(0, 2, 4, 6, 1, 3, 5, 7)
        return x.reshape(B, gt * gh * gw, C * pt * ph * pw)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of ``patchify``."""
        B = x.shape[0]
        C = self.cfg.latent_channels
        (pt, ph, pw), (gt, gh, gw) = self.cfg.patch_size, self.grid
        x = x.reshape(B, gt, gh, gw, C, pt, ph, pw).permute(0, 4, 1, 5, 2, 6, 3, 7)
        return x.reshape(B, C, gt * pt, gh * ph, gw * pw)

    def forward(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Predict epsilon / v / velocity for noisy latents ``x`` at timesteps ``t`` given text states."""
        if x.shape[1:] != (self.cfg.latent_channels, *self.cfg.latent_size):
            raise ValueError(
                f"UViT expects latents (B, {self.cfg.latent_channels}, {self.cfg.latent_size}), got {tuple(x.shape)}"
            )
        t_tok = self.time_embed(timestep_embedding(t, self.cfg.dim))[:, None]
        h = torch.cat([t_tok, self.text_proj(text), self.patch_embed(self.patchify(x))], dim=1)
        h = h + self.pos + self.pos_fixed
        stack = []
        for blk in self.in_blocks:
            h = blk(h)
            stack.append(h)
        h = self.mid_block(h)
        for blk, skip in zip(self.out_blocks, self.skips):
            h = blk(skip(torch.cat([h, stack.pop()], dim=-1)))
        h = self.out(self.norm(h[:, -self.num_patches :]))
        return self.unpatchify(h)


# ---------------------------------------------------------------------------------------
# The model: VAE + text encoder + U-ViT, implementing VideoDiffusionModel
# ---------------------------------------------------------------------------------------


def _tokenizer(context_length: int):
    """open_clip's BPE tokenizer; its vocabulary file ships inside the wheel (offline)."""
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=context_length)


class TinySora:
    """The tiny Sora-style generator. Implements ``align.models.base.VideoDiffusionModel``."""

    def __init__(self, cfg: TinySoraConfig):
        self.cfg = cfg
        self.tokenizer = _tokenizer(cfg.context_length)
        self.vae = SpatioTemporalVAE(cfg)
        self.text_encoder = TextEncoder(cfg, vocab_size=len(self.tokenizer.encoder))
        self.denoiser = UViT(cfg)
        self.scheduler = NoiseSchedule(cfg.prediction_type, cfg.num_train_timesteps)

    # -- protocol --------------------------------------------------------------------
    @property
    def prediction_type(self) -> str:
        return self.cfg.prediction_type

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return (self.cfg.latent_channels, *self.cfg.latent_size)

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    def encode_video(self, videos: torch.Tensor, sample: bool = False) -> torch.Tensor:
        """Pixels ``(B, 3, T, H, W)`` in [-1, 1] -> latents times ``scaling_factor``
        (the posterior mean, or a posterior sample when ``sample``)."""
        expected = (self.cfg.in_channels, self.cfg.num_frames, self.cfg.image_size, self.cfg.image_size)
        if videos.dim() != 5 or tuple(videos.shape[1:]) != expected:
            raise ValueError(f"TinySora.encode_video expects (B, {expected}), got {tuple(videos.shape)}")
        mean, logvar = self.vae.encode(videos)
        z = mean + (0.5 * logvar).exp() * torch.randn_like(mean) if sample else mean
        return z * self.cfg.scaling_factor

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents / self.cfg.scaling_factor).clamp(-1, 1)

    def decode_videos(self, latents: torch.Tensor, prompts: list[str], seeds: list[int]) -> torch.Tensor:
        """One stage: the final videos are ``decode_latents``'s (the protocol's ``decode_videos``)."""
        return self.decode_latents(latents)

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """Token ids ``(B, context_length)``; longer prompts are truncated by the tokenizer."""
        if isinstance(prompts, str):
            raise TypeError("encode_prompts takes a list of prompts, not one string")
        return self.tokenizer(list(prompts)).to(self.device)

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Text token states ``(B, context_length, text_dim)``; ``""`` is the unconditional prompt."""
        return self.text_encoder(self.tokenize(prompts))

    def predict(self, latents_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.denoiser(latents_t, t, cond)

    # -- optional abilities of the protocol: TinySora has the defaults ------------------
    supports_gradient_checkpointing = False
    has_pipeline_sampler = False  # no generate_videos: sample with align.sample.generate

    def enable_gradient_checkpointing(self) -> None:
        raise ValueError("TinySora does not support gradient checkpointing (supports_gradient_checkpointing is False)")

    @property
    def video_input(self) -> dict:
        """What training resamples every video to: the model's fixed size; ``fps`` None (the
        synthetic world's clips carry no frame rate: frames are taken as they are)."""
        c = self.cfg
        return {"num_frames": c.num_frames, "height": c.image_size, "width": c.image_size, "fps": None}

    @property
    def video_size_rules(self) -> str:
        c = self.cfg
        return f"fixed size {c.num_frames}x{c.image_size}x{c.image_size} (frames x height x width, its config.json)"

    def check_video_size(
        self, num_frames: int | None = None, height: int | None = None, width: int | None = None
    ) -> tuple[int, int, int]:
        """The model's one size ``(num_frames, height, width)``; ``None`` stands for it, any other
        value is a ValueError naming both sizes."""
        size = (self.cfg.num_frames, self.cfg.image_size, self.cfg.image_size)
        asked = (num_frames, height, width)
        if any(a is not None and a != s for a, s in zip(asked, size)):
            shown = "x".join(str(s if a is None else a) for a, s in zip(asked, size))
            raise ValueError(
                f"TinySora: video size {shown} (frames x height x width) is invalid: "
                f"this model has the {self.video_size_rules}"
            )
        return size

    # -- utilities -------------------------------------------------------------------
    def components(self) -> dict[str, nn.Module]:
        """The model's parts by name (the VideoDiffusionModel protocol's ``components``)."""
        return {"vae": self.vae, "text_encoder": self.text_encoder, "denoiser": self.denoiser}

    def to(self, device) -> TinySora:
        for m in self.components().values():
            m.to(device)
        return self

    def eval(self) -> TinySora:
        for m in self.components().values():
            m.eval()
        return self

    def requires_grad_(self, flag: bool) -> TinySora:
        for m in self.components().values():
            m.requires_grad_(flag)
        return self

    def save_pretrained(self, path: str | Path) -> Path:
        """Write ``config.json`` and one safetensors file per part, atomically (temp dir + rename)."""
        path = Path(path)
        with atomic_directory(path) as tmp:
            (tmp / "config.json").write_text(json.dumps(asdict(self.cfg), indent=2))
            for name, m in self.components().items():
                sd = {k: v.detach().contiguous().cpu() for k, v in m.state_dict().items()}
                save_file(sd, str(tmp / f"{name}.safetensors"))
        return path

    @classmethod
    def from_pretrained(cls, path: str | Path, device="cpu") -> TinySora:
        """Load a model written by ``save_pretrained``; errors name the missing file."""
        path = Path(path)
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise FileNotFoundError(f"{cfg_file}: not a TinySora checkpoint (no config.json)")
        model = cls(TinySoraConfig.from_dict(json.loads(cfg_file.read_text())))
        for name, m in model.components().items():
            f = path / f"{name}.safetensors"
            if not f.is_file():
                raise FileNotFoundError(f"{f}: missing from the TinySora checkpoint")
            m.load_state_dict(load_file(str(f)))
        return model.to(device).eval()
