"""What every objective's training shares: config keys, accelerator and DeepSpeed setup, the
sharded batch streams, checkpoint + resume, metrics.jsonl and trackers, and the step loop.

An objective module (``dpo.py``, ``rwr.py``, ...) reads top to bottom as::

    run = start(cfg)                      # accelerator, run directory, frozen model, checkpoint found
    data, info = <its own data>(cfg, run.model)
    prepare(cfg, run)                     # LoRA, optimizer, accelerate.prepare, checkpoint loaded
    return loop(cfg, run, batches, step_fn, keys, info)

Distributed runs (``accelerate launch``, DDP, DeepSpeed ZeRO-2/3 with or without offload, or
FSDP2): only the denoiser (with its LoRA) is prepared by accelerate (under FSDP2 sharded by
``shard_fsdp2``); the frozen VAE and text encoder stay outside the engine (moved with
``.to()``, built outside ZeRO-3 partitioning). ``effective_batch_size`` is in
samples (pairs for DPO); each optimizer step consumes the same global batch and the same noise
whatever the number of processes: every process walks one seeded index stream and one seeded
noise generator and takes its slice, so 1 and N processes compute the same update.
With ``sequence_parallel_size`` K > 1 (Wan), K consecutive processes form a sequence-parallel
group that takes one slice (the same batch and noise) and splits each video's tokens
(``align.models.diffusers.sequence_parallel``): ``Run.rank`` / ``Run.world`` are then the
data-parallel rank and size (processes / K) that every batch and gather follows.

A run writes ``<output_dir>/<name>/``: ``config.yaml``, ``metrics.jsonl``,
``checkpoint-<step>/`` (atomic: temp dir + rename; the last ``checkpoints_total_limit``
kept; LoRA, optimizer, LR scheduler, per-process RNG states and the data position) and the
final LoRA in ``lora/`` (diffusers layout, safetensors). ``resume: latest`` continues from the
newest checkpoint of the same recipe; on SIGTERM a checkpoint is written before the process exits.
"""

from __future__ import annotations

import dataclasses
import errno
import importlib.util
import json
import os
import shutil
import signal
import sys
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import default_collate
from tqdm.auto import tqdm

from align.atomic import file_sha256, replace_directory
from align.config import REQUIRED, save_config
from align.models import load_model
from align.models.lora import attach_lora, load_lora, lora_parameters, save_lora

TRACKERS = ("tensorboard", "wandb")
MANIFEST = "manifest.json"  # in a checkpoint: every file's size and sha256, written at save time
# errors of writing a checkpoint that are the disk's or the user's, not a bug: one line, no traceback
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS)
MIXED_PRECISION = ("no", "fp16", "bf16")
# objectives whose batches and gathers follow the data-parallel rank (Run.rank), so a sequence-parallel group
# (processes with the same batch) works; offline RWR normalises its weights over all processes
SEQUENCE_PARALLEL_OBJECTIVES = ("dpo", "grpo")
# keys a resumed run may change; every other key must match the checkpoint's recipe
RESUME_FREE_KEYS = (
    "max_steps",
    "checkpointing_steps",
    "checkpoints_total_limit",
    "log_every",
    "progress",
    "resume",
    "report_to",
    "output_dir",
    "latent_cache_dir",
    "bad_rows",
    "gradient_checkpointing",
)


@dataclass
class TrainConfig:
    """Keys every objective shares. An objective's config subclasses this and adds its own keys."""

    model: str = field(
        default=REQUIRED,
        metadata={"help": "a TinySora directory (see `vidalign pretrain`), a diffusers directory or hub id"},
    )
    model_options: dict = field(
        default_factory=dict, metadata={"help": "load_model options (dtype, num_frames, height, width, ...)"}
    )
    dataset: str = field(default="", metadata={"help": "the objective's dataset (checked by the objective)"})
    name: str = field(default="run", metadata={"help": "the run's name: its directory is <output_dir>/<name>"})
    output_dir: str = field(default="runs", metadata={"help": "the folder that holds run directories"})
    objective: str = field(default="dpo", metadata={"help": "picks the training module: dpo | rwr | grpo | nft"})
    learning_rate: float = field(default=1e-3, metadata={"help": "peak learning rate of the LoRA parameters (AdamW)"})
    lr_warmup_steps: int = field(
        default=10, metadata={"help": "linear warm-up steps of the learning rate, then constant"}
    )
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank r"})
    lora_alpha: float = field(default=8.0, metadata={"help": "LoRA alpha (the update is scaled by alpha / r)"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA branch's input"})
    lora_targets: list = field(
        default_factory=lambda: ["attn.qkv", "attn.proj"],
        metadata={"help": "module-name suffixes of the denoiser's linear layers that get LoRA adapters"},
    )
    train_batch_size: int = field(
        default=16, metadata={"help": "samples per process per micro-step (derived from effective_batch_size when set)"}
    )
    effective_batch_size: int = field(
        default=0,
        metadata={
            "help": "samples per optimizer step over all processes and accumulation steps; must divide by "
            "processes x gradient_accumulation_steps. 0 = train_batch_size x processes x accumulation"
        },
    )
    gradient_accumulation_steps: int = field(
        default=0,
        metadata={
            "help": "micro-steps per optimizer step; 0 = unset, derived: 1 for offline objectives, from the round's "
            "layout for online ones (GRPO: the trained steps of one micro-batch of rollouts; online RWR: 1)"
        },
    )
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "for denoisers that support it (diffusers transformers)"}
    )
    sequence_parallel_size: int = field(
        default=1,
        metadata={
            "help": "K: each video's tokens split over K processes (Ulysses all-to-all attention; Wan only; "
            "objectives dpo and grpo); the launch's processes / K groups are data parallel. 1 = off"
        },
    )
    max_steps: int = field(default=200, metadata={"help": "optimizer steps of the run"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm; 0 = no clipping"})
    mixed_precision: Literal["no", "fp16", "bf16"] = field(default="no", metadata={"help": "no | fp16 | bf16"})
    seed: int = field(
        default=0, metadata={"help": "seed of every random choice of the run (data order, noise, timesteps, rollouts)"}
    )
    log_every: int = field(default=1, metadata={"help": "write metrics every N optimizer steps"})
    checkpointing_steps: int = field(default=100, metadata={"help": "0 = only the final LoRA"})
    checkpoints_total_limit: int = field(default=2, metadata={"help": "checkpoints kept (the newest)"})
    bad_rows: Literal["error", "skip"] = field(
        default="error", metadata={"help": "error | skip (skipped rows are counted and logged)"}
    )
    latent_cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "a folder for VAE latents and prompt states (safetensors shards keyed by content hash and "
            "model fingerprint, read lazily); None = encode in memory at every start"
        },
    )
    progress: bool = field(default=True, metadata={"help": "show a progress bar on the main process"})
    resume: str | None = field(
        default=None,
        metadata={"help": '"latest" (the run\'s newest checkpoint, if any) or a checkpoint-<step> directory'},
    )
    report_to: list = field(
        default_factory=list, metadata={"help": "tensorboard, wandb (via accelerate): used when installed"}
    )
    prompt_rewriter: str | None = field(
        default=None,
        metadata={
            "help": "online objectives: hf:PATH | http:URL[#MODEL], a language model that rewrites each prompt; "
            "rollouts are conditioned on the rewrites (cached in the run's rewrites.jsonl), judges see the originals"
        },
    )
    rewrite_instruction: str | None = field(
        default=None, metadata={"help": "the prompt rewriter's system instruction file (None: vidalign's default)"}
    )

    def __post_init__(self) -> None:
        for key in ("learning_rate", "lora_rank", "train_batch_size", "max_steps", "sequence_parallel_size"):
            if getattr(self, key) <= 0:
                raise ValueError(f"recipe key `{key}` must be > 0, got {getattr(self, key)}")
        nonnegative = ("effective_batch_size", "gradient_accumulation_steps", "lr_warmup_steps", "max_grad_norm")
        for key in (*nonnegative, "checkpointing_steps"):
            if getattr(self, key) < 0:
                raise ValueError(f"recipe key `{key}` must be >= 0, got {getattr(self, key)}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(
                f"recipe key `mixed_precision` must be one of {MIXED_PRECISION}, got {self.mixed_precision!r}"
            )
        if self.sequence_parallel_size > 1 and self.objective not in SEQUENCE_PARALLEL_OBJECTIVES:
            raise ValueError(
                f"recipe key `sequence_parallel_size`: {self.sequence_parallel_size} is supported for objectives "
                f"{', '.join(SEQUENCE_PARALLEL_OBJECTIVES)}, not {self.objective!r}; set it to 1"
            )
        if self.bad_rows not in ("error", "skip"):
            raise ValueError(f"recipe key `bad_rows` must be 'error' or 'skip', got {self.bad_rows!r}")
        if isinstance(self.report_to, str):
            self.report_to = [self.report_to]
        for name in self.report_to:
            if name not in (*TRACKERS, "none", ""):
                raise ValueError(f"report_to: unknown tracker {name!r}; use tensorboard, wandb or none")

    @property
    def accumulation_steps(self) -> int:
        """Micro-steps per optimizer step as the run uses them: ``gradient_accumulation_steps``,
        or when the recipe leaves it unset (0) the objective's :meth:`derived_accumulation_steps`."""
        return self.gradient_accumulation_steps or self.derived_accumulation_steps()

    def derived_accumulation_steps(self) -> int:
        """``gradient_accumulation_steps`` when unset: 1 here (offline objectives); an online
        objective's config derives it from the layout of its rounds."""
        return 1


@dataclass
class Run:
    """The state of one training run that the objective modules and ``loop`` share."""

    accelerator: Any
    model: Any  # the VideoDiffusionModel (frozen; LoRA attached by ``prepare``)
    run_dir: Path
    micro: int  # samples per process per micro-step
    stage: int | None  # DeepSpeed ZeRO stage, None without DeepSpeed
    gen: torch.Generator  # the noise generator (shared stream offline, per process online)
    ckpt: Path | None = None
    resumed: dict | None = None
    fsdp2: bool = False  # the denoiser is sharded with FSDP2 (fully_shard), see ``shard_fsdp2``
    step: int = 0
    micro_step: int = 0
    denoiser: Any = None  # the prepared (possibly DDP / DeepSpeed-wrapped) denoiser
    base: Any = None  # the unwrapped LoRA denoiser: the reference is it with adapters off
    optimizer: Any = None
    lr_scheduler: Any = None
    sequence_parallel: int = 1  # K: consecutive processes that share one batch, each with 1/K of the tokens
    sp_group: Any = None  # this process's sequence-parallel process group (K > 1)
    sp_modules: list = field(default_factory=list)  # the WanSequenceParallel of each split transformer

    @property
    def world(self) -> int:
        """Data-parallel processes (those that see different samples): all processes / K."""
        return self.accelerator.num_processes // self.sequence_parallel

    @property
    def rank(self) -> int:
        """This process's data-parallel rank (the index of its sequence-parallel group)."""
        return self.accelerator.process_index // self.sequence_parallel

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process


def make_accelerator(cfg: TrainConfig, run_dir: Path | None = None):
    """An Accelerator, with the recipe's trackers that are installed. Launched on CPU with several
    processes (``accelerate launch --multi_gpu --num_processes N`` without GPUs, or DeepSpeed), it
    runs as MULTI_CPU over gloo; without ``cpu=True`` and the gloo handler accelerate would not
    synchronise the processes."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    multi_cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    handlers = [InitProcessGroupKwargs(backend="gloo")] if multi_cpu else []
    trackers = []
    for name in cfg.report_to:
        if name in TRACKERS:
            if importlib.util.find_spec(name) is None:
                print(f"[vidalign] report_to {name}: not installed, skipped (metrics.jsonl is still written)")
            else:
                trackers.append(name)
    return Accelerator(
        gradient_accumulation_steps=cfg.accumulation_steps,
        mixed_precision=cfg.mixed_precision,
        cpu=multi_cpu and os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true",
        kwargs_handlers=handlers,
        log_with=trackers or None,
        project_dir=str(run_dir) if run_dir is not None else None,
    )


def micro_batch_size(cfg: TrainConfig, num_processes: int) -> int:
    """Samples per process per micro-step. With ``effective_batch_size`` set, it is derived from
    it and must divide evenly by processes x accumulation steps; otherwise ``train_batch_size``."""
    if cfg.effective_batch_size <= 0:
        return cfg.train_batch_size
    div = num_processes * cfg.accumulation_steps
    if cfg.effective_batch_size % div:
        raise ValueError(
            f"effective_batch_size {cfg.effective_batch_size} is not divisible by {num_processes} process(es) x "
            f"{cfg.accumulation_steps} gradient_accumulation_steps = {div}; choose a multiple of {div}"
        )
    return cfg.effective_batch_size // div


def check_zero3_layout(model) -> None:
    """ZeRO-3 partitions every parameter of the prepared module (the denoiser). The frozen VAE /
    text encoders are called outside the engine, so they must be separate modules that share no
    parameter with the denoiser; a model built otherwise is refused with the offending part named."""
    den = model.denoiser
    den_params = {id(p) for p in den.parameters()}
    den_modules = {id(m) for m in den.modules()}
    for name, mod in model.components().items():
        if mod is None or mod is den or name in ("denoiser", "transformer", "transformer_2", "unet"):
            continue
        if id(mod) in den_modules:
            raise ValueError(
                f"DeepSpeed ZeRO-3: frozen part {name!r} is a submodule of the denoiser; ZeRO-3 would "
                "partition it and calls outside the engine would see empty weights. Use ZeRO-2 or DDP."
            )
        shared = [n for n, p in mod.named_parameters() if id(p) in den_params]
        if shared:
            raise ValueError(
                f"DeepSpeed ZeRO-3: frozen part {name!r} shares parameter {shared[0]!r} with the "
                "denoiser (tied weights); ZeRO-3 cannot partition it for one and not the other. "
                "Use ZeRO-2 or DDP."
            )


def shared_draws(model, shape, generator, shard: tuple[int, int], device):
    """Noise and timesteps for the *global* batch (``shape[0] * world`` samples) from
    ``generator``, sliced to this process's part: every process draws the same numbers, so the
    update does not depend on the number of processes."""
    rank, world = shard
    n = shape[0]
    noise = torch.randn((n * world, *shape[1:]), generator=generator)
    t = model.scheduler.sample_timesteps(n * world, generator=generator, device=device)
    return noise[rank * n : (rank + 1) * n].to(device), t[rank * n : (rank + 1) * n]


def index_stream(n: int, global_batch: int, seed: int, start: int = 0) -> Iterator[list[int]]:
    """Indices of global batch ``start``, ``start + 1``, ...: consecutive slices of an endless
    concatenation of seeded permutations of ``range(n)`` (epoch ``e`` uses seed ``seed + e``).
    A position is just a batch count, so resuming skips ahead without replaying batches."""
    pos, cache = start * global_batch, {}

    def perm(e):
        if e not in cache:
            cache.clear()
            cache[e] = torch.randperm(n, generator=torch.Generator().manual_seed(seed + e))
        return cache[e]

    while True:
        idx = [int(perm((pos + i) // n)[(pos + i) % n]) for i in range(global_batch)]
        pos += global_batch
        yield idx


def shard_batches(data, run: Run, seed: int) -> Iterator[tuple]:
    """This process's micro-batches from its checkpointed position: slice ``rank`` of each global
    batch of ``micro * world`` items of ``data`` (a dataset of tensor tuples)."""
    micro, rank = run.micro, run.rank
    for idx in index_stream(len(data), micro * run.world, seed, run.micro_step):
        batch = default_collate([data[i] for i in idx[rank * micro : (rank + 1) * micro]])
        yield tuple(x.to(run.device) for x in batch)


# ---------------------------------------------------------------- checkpoints


def checkpoints(run_dir: Path) -> list[Path]:
    """``checkpoint-<step>/`` directories of a run, oldest first."""
    found = [p for p in Path(run_dir).glob("checkpoint-*") if p.is_dir() and p.name.split("-", 1)[1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-", 1)[1]))


def uses_deepspeed(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def zero_stage(accelerator) -> int | None:
    """The DeepSpeed ZeRO stage of this launch; None when DeepSpeed is not used."""
    if not uses_deepspeed(accelerator):
        return None
    return int(accelerator.state.deepspeed_plugin.zero_stage or 0)


def gathered_lora(module, accelerator):
    """Under ZeRO-3, a context in which the (partitioned) LoRA parameters are whole on every
    process (entered by all of them); otherwise nothing."""
    if accelerator is None or zero_stage(accelerator) != 3:
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(lora_parameters(module)), modifier_rank=None)


# ---------------------------------------------------------------- FSDP2


def uses_fsdp2(accelerator) -> bool:
    """Whether this launch asks for FSDP2 (``accelerate launch --config_file
    recipes/accelerate/fsdp2.yaml`` or ``--use_fsdp --fsdp_version 2``). On GPUs accelerate
    reports it (``is_fsdp2``); on CPU accelerate runs such a launch as MULTI_CPU over gloo and
    only its environment says so. FSDP1 is refused: vidalign shards with FSDP2 only. One CPU
    process has nothing to shard (and no process group): False there."""
    if getattr(accelerator, "is_fsdp2", False):
        return True
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true" or accelerator.num_processes == 1:
        return False
    version = os.environ.get("FSDP_VERSION", "1")
    if version != "2":
        raise ValueError(
            f"FSDP version {version} is not supported: use FSDP2 (fsdp_version: 2, recipes/accelerate/fsdp2.yaml)"
        )
    return True


def _fsdp2_blocks(denoiser: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules FSDP2 shards one by one (each all-gathered for its own forward): those whose
    class is named in ``fsdp_transformer_layer_cls_to_wrap`` (env ``FSDP_TRANSFORMER_CLS_TO_WRAP``),
    else in the denoiser's ``_no_split_modules`` (diffusers' transformer blocks), else of a class
    that makes up the non-leaf entries of the denoiser's ``nn.ModuleList``s (TinySora's
    ``Block``, the mid-block too). Deepest first."""
    names = os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "") or ",".join(
        getattr(denoiser, "_no_split_modules", None) or []
    )
    wanted = {n.strip() for n in names.split(",") if n.strip()} or {
        type(m).__name__
        for lst in denoiser.modules()
        if isinstance(lst, torch.nn.ModuleList)
        for m in lst
        if any(True for _ in m.children())
    }
    found = {name: mod for name, mod in denoiser.named_modules() if name and type(mod).__name__ in wanted}
    return [found[n] for n in sorted(found, key=lambda n: -n.count("."))]


def shard_fsdp2(denoiser: torch.nn.Module, device: torch.device, mixed_precision: str = "no") -> None:
    """``fully_shard`` the denoiser in place: each block (:func:`_fsdp2_blocks`), then the root
    (the rest). Frozen base weights and LoRA weights are both sharded; the LoRA stays float32
    while the base may be bf16 (FSDP2 needs one dtype per group only among trainable
    parameters, and the LoRA is all of them), so no MixedPrecisionPolicy casts parameters and
    gradients are reduced in float32. ``mixed_precision: bf16`` autocasts the denoiser's forward
    with float32 outputs, as accelerate does under DDP (a cast of every gathered parameter
    would break denoisers that compute embeddings in float32); fp16 is refused (no loss
    scaling for a sharded module here). ``FSDP_RESHARD_AFTER_FORWARD`` and, on GPUs,
    ``FSDP_OFFLOAD_PARAMS`` (CPUOffloadPolicy) come from the accelerate config."""
    from types import MethodType

    from accelerate.utils import convert_outputs_to_fp32
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    if mixed_precision == "fp16":
        raise ValueError("FSDP2: mixed_precision fp16 is not supported (no loss scaling); use bf16 or no")
    reshard = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() not in ("false", "no_shard", "0")
    offload = os.environ.get("FSDP_OFFLOAD_PARAMS", "false").lower() == "true" and device.type == "cuda"
    kwargs = dict(
        reshard_after_forward=reshard,
        mp_policy=MixedPrecisionPolicy(reduce_dtype=torch.float32),
        offload_policy=CPUOffloadPolicy() if offload else OffloadPolicy(),
    )
    for block in _fsdp2_blocks(denoiser):
        fully_shard(block, **kwargs)
    fully_shard(denoiser, **kwargs)
    if mixed_precision == "bf16":
        autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        denoiser.forward = MethodType(convert_outputs_to_fp32(autocast(denoiser.forward.__func__)), denoiser)


def _fsdp2_lora(denoiser: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The LoRA parameters of the sharded denoiser by peft key (the key ``save_lora`` writes,
    without the component prefix)."""
    from peft import get_peft_model_state_dict

    params = {n: p for n, p in denoiser.named_parameters() if "lora_" in n}
    return get_peft_model_state_dict(denoiser, state_dict=params)


def fsdp2_full_lora(denoiser: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA of an FSDP2-sharded denoiser as full CPU tensors keyed by parameter name (what
    ``save_lora(state_dict=...)`` takes); collective: every process must call it. Only the LoRA
    is all-gathered, never the frozen base."""
    return {
        n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu()
        for n, p in denoiser.named_parameters()
        if "lora_" in n
    }


def fsdp2_load_lora(denoiser: torch.nn.Module, path: Path) -> None:
    """Load a LoRA written by ``save_lora`` into the shards of an FSDP2-sharded denoiser: each
    process reads the file and keeps its own shard of every tensor (no communication)."""
    from safetensors.torch import load_file
    from torch.distributed.tensor import distribute_tensor

    from align.models.lora import LORA_WEIGHTS, PREFIX

    weights = load_file(str(path / LORA_WEIGHTS))
    prefix = getattr(denoiser, "lora_key_prefix", PREFIX)
    with torch.no_grad():
        for key, p in _fsdp2_lora(denoiser).items():
            if prefix + key not in weights:
                raise ValueError(f"{path / LORA_WEIGHTS}: no tensor {prefix + key!r} for this denoiser's LoRA")
            full = weights[prefix + key].to(device=p.device, dtype=p.dtype)
            shard = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None)
            p.to_local().copy_(shard.to_local())


def _fsdp2_optimizer_state(run: Run) -> dict:
    """The optimizer's state as full tensors (on the main process; empty elsewhere), keyed by
    parameter name; collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(run.base, _inner_optimizer(run.optimizer), options=options)


def _fsdp2_load_optimizer(run: Run, state: dict) -> None:
    """Shard a full optimizer state (from :func:`_fsdp2_optimizer_state`) into this process's."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True)
    set_optimizer_state_dict(run.base, _inner_optimizer(run.optimizer), optim_state_dict=state, options=options)


def _inner_optimizer(optimizer):
    """The torch optimizer inside accelerate / DeepSpeed wrappers of any depth."""
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def write_lora(run: Run, path: Path, metadata: dict | None = None) -> None:
    """The LoRA of the run's denoiser to ``path`` (diffusers layout) by the main process;
    collective under ZeRO-3 and FSDP2, where the shards are gathered first."""
    if run.fsdp2:
        full = fsdp2_full_lora(run.base)
        if run.is_main:
            _saving(path, lambda: save_lora(run.base, path, metadata, state_dict=full))
        return
    with gathered_lora(run.base, run.accelerator):
        if run.is_main:
            _saving(path, lambda: save_lora(run.base, path, metadata))


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed: a file missing, truncated, changed or unreadable."""


class CheckpointWriteError(OSError, ValueError):
    """A checkpoint that could not be written (disk full, no permission): one line naming the
    path; a ``ValueError`` too, so the CLI prints it as a user error."""

    def __str__(self) -> str:
        return str(self.args[0])


def save_checkpoint(run: Run, limit: int, state: dict, extra: dict[str, Any] | None = None) -> Path:
    """``checkpoint-<step>/``: LoRA (safetensors), optimizer, LR scheduler, RNG and step; atomic
    (written to ``.checkpoint-<step>.tmp``, listed with sizes and sha256 in ``manifest.json``,
    fsynced and renamed); only the last ``limit`` up to this step are kept.

    Every process must call this: a DeepSpeed engine saves its own optimizer shards,
    collectively; each process writes its RNG states (``rng_state_<rank>.pt``: torch and the
    noise generator), the main process the rest. ``state`` (data position, recipe) goes to
    ``trainer_state.json``; ``extra`` (name -> tensors) to ``<name>.pt`` by the main process.
    A full disk or a refused permission is a :class:`CheckpointWriteError` naming the path."""
    acc, run_dir, step = run.accelerator, run.run_dir, run.step
    final, tmp = run_dir / f"checkpoint-{step}", run_dir / f".checkpoint-{step}.tmp"
    try:
        if run.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        try:
            _write_checkpoint_files(run, tmp, state, extra)
            acc.wait_for_everyone()
            if run.is_main:
                _write_manifest(tmp)
                replace_directory(tmp, final)  # fsyncs every file and directory first
                _prune_checkpoints(run_dir, step, limit)
        finally:
            if run.is_main and tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    except OSError as e:
        if e.errno not in WRITE_ERRNOS or isinstance(e, CheckpointWriteError):
            raise
        raise _write_error(e, final) from None
    acc.wait_for_everyone()
    return final


def _write_checkpoint_files(run: Run, tmp: Path, state: dict, extra: dict[str, Any] | None) -> None:
    """What this process writes of one checkpoint into ``tmp`` (see :func:`save_checkpoint`)."""
    acc = run.accelerator
    write_lora(run, tmp / "lora")
    if uses_deepspeed(acc):
        save_ds = run.denoiser.save_checkpoint
        _saving(tmp / "deepspeed", lambda: save_ds(str(tmp / "deepspeed"), tag="state", exclude_frozen_parameters=True))
    elif run.fsdp2:
        optimizer = _fsdp2_optimizer_state(run)  # collective
        if run.is_main:
            _torch_save(optimizer, tmp / "optimizer.pt")
    elif run.is_main:
        _torch_save(run.optimizer.state_dict(), tmp / "optimizer.pt")
    rng = {"torch": torch.get_rng_state(), "gen": run.gen.get_state()}
    _torch_save(rng, tmp / f"rng_state_{acc.process_index}.pt")
    if run.is_main:
        _torch_save(run.lr_scheduler.state_dict(), tmp / "scheduler.pt")
        for name, obj in (extra or {}).items():
            _torch_save(obj, tmp / f"{name}.pt")
        text = json.dumps({"step": run.step, **state}, indent=1)
        _saving(tmp / "trainer_state.json", lambda: (tmp / "trainer_state.json").write_text(text))


def _saving(path: Path, write: Callable[[], Any]) -> None:
    """Run one checkpoint writer for ``path``: an OSError without a file name gets ``path``; a
    writer's own error type that reports a full disk or a refused permission (safetensors,
    DeepSpeed) becomes that OSError."""
    try:
        write()
    except OSError as e:
        if e.filename is None:
            e.filename = str(path)
        raise
    except Exception as e:
        code = next((c for c in WRITE_ERRNOS if os.strerror(c) in str(e)), None)
        if code is None:
            raise
        raise OSError(code, os.strerror(code), str(path)) from e


def _torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` to ``path`` through :class:`_WholeWrites`, so that a full disk is the
    OSError it is (torch's zip writer reports it as ``RuntimeError: unexpected pos``)."""

    def write() -> None:
        with open(path, "wb", buffering=0) as raw:
            out = _WholeWrites(raw)
            try:
                torch.save(obj, out)
            except Exception:
                if out.error is None:
                    raise
                raise out.error from None

    _saving(path, write)


class _WholeWrites:
    """A raw binary file whose ``write`` writes all of ``data`` or raises, keeping the OSError:
    torch's writer ignores short writes and replaces a writer's exception by its own."""

    def __init__(self, raw: Any):
        self.raw, self.error = raw, None

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        done = 0
        try:
            while done < len(view):
                n = self.raw.write(view[done:])
                if not n:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                done += n
        except OSError as e:
            self.error = e
            raise
        return done

    def flush(self) -> None:
        self.raw.flush()


def _write_error(e: OSError, final: Path) -> CheckpointWriteError:
    """One line for a checkpoint the disk refused: what, where, and what to do."""
    full = e.errno in (errno.ENOSPC, errno.EDQUOT)
    hint = (
        "free space (or lower checkpoints_total_limit), then continue with --resume latest"
        if full
        else "check the permissions of output_dir"
    )
    err = CheckpointWriteError(f"cannot write checkpoint {final}: {e.strerror}: {e.filename or final}; {hint}")
    err.errno, err.strerror, err.filename = e.errno, e.strerror, e.filename
    return err


def _write_manifest(ckpt: Path) -> None:
    """``manifest.json``: the size and sha256 of every file of the finished checkpoint ``ckpt``
    (all processes' files), written last; :func:`checkpoint_problem` checks them at resume."""
    files = sorted(p for p in ckpt.rglob("*") if p.is_file() and p.name != MANIFEST)
    listing = {p.relative_to(ckpt).as_posix(): {"bytes": p.stat().st_size, "sha256": file_sha256(p)} for p in files}
    text = json.dumps({"files": listing}, indent=1)
    _saving(ckpt / MANIFEST, lambda: (ckpt / MANIFEST).write_text(text))


def _prune_checkpoints(run_dir: Path, step: int, limit: int) -> None:
    """Keep the newest ``limit`` checkpoints up to ``step``. Later ones (left by a run that was
    resumed from an earlier checkpoint, e.g. past a damaged one) are replaced when reached."""
    ckpts = [c for c in checkpoints(run_dir) if int(c.name.split("-", 1)[1]) <= step]
    for old in ckpts[: max(0, len(ckpts) - limit)]:
        shutil.rmtree(old)


def checkpoint_problem(ckpt: Path) -> str | None:
    """What makes ``ckpt`` unusable, naming the file, or None when it is intact: every file of
    its ``manifest.json`` must be there with the size and sha256 written at save time. A
    checkpoint of an older vidalign (no manifest) must have a ``trainer_state.json`` that
    parses and readable ``.safetensors`` headers and ``.pt`` archives."""
    manifest = ckpt / MANIFEST
    if not manifest.is_file():
        return _unlisted_problem(ckpt)
    try:
        listing = json.loads(manifest.read_text())["files"]
        for rel, want in listing.items():
            path = ckpt / rel
            if not path.is_file():
                return f"{path}: missing"
            size = path.stat().st_size
            if size != want["bytes"]:
                return f"{path}: {size} bytes, {want['bytes']} written at save time (truncated?)"
            if file_sha256(path) != want["sha256"]:
                return f"{path}: its content changed since it was saved (sha256 differs)"
    except OSError as e:
        return f"{e.filename or ckpt}: cannot be read ({e.strerror})"
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        return f"{manifest}: damaged ({type(e).__name__}: {e})"
    return None


def _unlisted_problem(ckpt: Path) -> str | None:
    """:func:`checkpoint_problem` of a checkpoint without a manifest: a reading check."""
    from safetensors import SafetensorError, safe_open

    path = ckpt / "trainer_state.json"
    try:
        json.loads(path.read_text())
        for path in sorted(ckpt.rglob("*")):
            if path.suffix == ".safetensors":
                with safe_open(str(path), framework="pt"):
                    pass
            elif path.suffix == ".pt" and zipfile.ZipFile(path).testzip() is not None:
                return f"{path}: damaged (a member fails its CRC check)"
    except OSError as e:
        return f"{path}: cannot be read ({e.strerror or e})"
    except (ValueError, SafetensorError, zipfile.BadZipFile) as e:
        return f"{path}: damaged ({type(e).__name__}: {e})"
    return None


def recipe_fingerprint(cfg: TrainConfig) -> dict:
    """The config values a checkpoint must agree on to be resumed (all but ``RESUME_FREE_KEYS``)."""
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RESUME_FREE_KEYS}


def find_checkpoint(cfg: TrainConfig, run_dir: Path, report: Callable[[str], Any] | None = None) -> Path | None:
    """The checkpoint ``cfg.resume`` names, verified (:func:`checkpoint_problem`): ``latest`` is
    the newest intact checkpoint of the run (None when the run has none yet, so the same command
    starts or continues a run), each damaged newer one skipped with its reason given to
    ``report``; a named ``checkpoint-<step>`` directory that is damaged is a
    :class:`CheckpointError` naming the damaged file."""
    if not cfg.resume:
        return None
    if cfg.resume == "latest":
        return _newest_intact(run_dir, report or (lambda _: None))
    path = Path(cfg.resume)
    if not (path / "trainer_state.json").is_file():
        raise FileNotFoundError(f"resume: {path} is not a checkpoint directory (no trainer_state.json)")
    problem = checkpoint_problem(path)
    if problem:
        raise CheckpointError(f"resume: checkpoint {path} is damaged: {problem}")
    return path


def _newest_intact(run_dir: Path, report: Callable[[str], Any]) -> Path | None:
    """The newest checkpoint of ``run_dir`` that :func:`checkpoint_problem` passes; None when
    there is none at all, a :class:`CheckpointError` when every one is damaged."""
    ckpts = checkpoints(run_dir)
    problems = []
    for ckpt in reversed(ckpts):
        problem = checkpoint_problem(ckpt)
        if problem is None:
            if problems:
                report(f"resume latest: resuming from {ckpt.name}, the newest intact checkpoint")
            return ckpt
        problems.append(problem)
        report(f"resume latest: skipping {ckpt.name}, it is damaged: {problem}")
    if problems:
        raise CheckpointError(
            f"resume latest: every checkpoint of {run_dir} is damaged (the newest: {problems[0]}); "
            "move them aside to start the run over"
        )
    return None


def check_resumable(
    ckpt: Path, cfg: TrainConfig, num_processes: int, stage: int | None, backend: str | None = None
) -> dict:
    """``trainer_state.json`` of ``ckpt``, after checking it comes from this recipe and an
    equivalent launch (process count, ZeRO stage, ``backend``: "fsdp2" or None); raises
    ValueError naming the first key that differs."""
    try:
        st = json.loads((ckpt / "trainer_state.json").read_text())
    except ValueError as e:  # a checkpoint named without a manifest to check it against
        raise CheckpointError(f"{ckpt / 'trainer_state.json'}: not valid JSON ({e})") from None
    theirs, ours = st.get("recipe"), json.loads(json.dumps(recipe_fingerprint(cfg)))
    if theirs is None:
        raise ValueError(f"{ckpt}: no recipe recorded in trainer_state.json; cannot check it belongs to this run")
    for k in sorted(set(theirs) | set(ours)):
        if theirs.get(k) != ours.get(k):
            raise ValueError(
                f"{ckpt} is from another recipe: {k!r} is {theirs.get(k)!r} there and {ours.get(k)!r} here "
                f"(only {', '.join(RESUME_FREE_KEYS)} may change on resume)"
            )
    if st.get("num_processes") != num_processes or st.get("zero_stage") != stage:
        raise ValueError(
            f"{ckpt} was written by {st.get('num_processes')} process(es) with ZeRO stage {st.get('zero_stage')}; "
            f"this launch has {num_processes} with ZeRO stage {stage}. Resume with the same launch config."
        )
    if st.get("backend") != backend:
        raise ValueError(
            f"{ckpt} was written with backend {st.get('backend') or 'DDP/DeepSpeed'}; this launch uses "
            f"{backend or 'DDP/DeepSpeed'}. Resume with the same launch config."
        )
    return st


def _load_checkpoint(run: Run) -> None:
    """Restore what ``save_checkpoint`` wrote into the prepared objects of this process."""
    ckpt, acc = run.ckpt, run.accelerator
    if uses_deepspeed(acc):
        options = dict(load_module_strict=False, load_optimizer_states=True, load_lr_scheduler_states=False)
        _loading(ckpt / "deepspeed", lambda: run.denoiser.load_checkpoint(str(ckpt / "deepspeed"), "state", **options))
    elif run.fsdp2:
        _loading(ckpt / "lora", lambda: fsdp2_load_lora(run.base, ckpt / "lora"))
        optimizer = _loading(ckpt / "optimizer.pt", lambda: torch.load(ckpt / "optimizer.pt", "cpu", weights_only=True))
        _loading(ckpt / "optimizer.pt", lambda: _fsdp2_load_optimizer(run, optimizer))
    else:
        _loading(ckpt / "lora", lambda: load_lora(run.base, ckpt / "lora"))
        optimizer = _loading(ckpt / "optimizer.pt", lambda: torch.load(ckpt / "optimizer.pt", "cpu", weights_only=True))
        run.optimizer.load_state_dict(optimizer)
    scheduler = _loading(ckpt / "scheduler.pt", lambda: torch.load(ckpt / "scheduler.pt", weights_only=True))
    run.lr_scheduler.load_state_dict(scheduler)
    rng_file = ckpt / f"rng_state_{acc.process_index}.pt"
    rng = _loading(rng_file, lambda: torch.load(rng_file, weights_only=True))
    torch.set_rng_state(rng["torch"])
    run.gen.set_state(rng["gen"])
    run.step, run.micro_step = run.resumed["step"], run.resumed["micro_step"]


def _say(message: str) -> None:
    """A line for the user on stderr, marked as vidalign's."""
    print(f"[vidalign] {message}", file=sys.stderr, flush=True)


def _loading(path: Path, load: Callable[[], Any]) -> Any:
    """``load()`` of one checkpoint file; a failure is a :class:`CheckpointError` naming it."""
    try:
        return load()
    except Exception as e:  # safetensors, torch and DeepSpeed each raise their own types
        raise CheckpointError(f"{path}: cannot be loaded ({type(e).__name__}: {e})") from e


def optimizer_state_bytes(optimizer) -> int:
    """Bytes of optimizer state tensors held by this process (under ZeRO / FSDP2, its shard)."""
    inner = _inner_optimizer(optimizer)
    return sum(_local_bytes(v) for s in inner.state.values() for v in s.values() if torch.is_tensor(v))


def _local_bytes(t: torch.Tensor) -> int:
    """Bytes this process holds of ``t``: an FSDP2 DTensor's local shard, a ZeRO-3 parameter's
    partition (``ds_tensor``), else the whole tensor."""
    if hasattr(t, "to_local"):
        t = t.to_local()
    elif hasattr(t, "ds_tensor"):
        t = t.ds_tensor
    return t.numel() * t.element_size()


def denoiser_param_bytes(denoiser: torch.nn.Module) -> int:
    """Bytes of the denoiser's parameters (frozen base and LoRA) held by this process: all of
    them under DDP / ZeRO-2, a shard under ZeRO-3 and FSDP2."""
    return sum(_local_bytes(p) for p in denoiser.parameters())


# ---------------------------------------------------------------- setup


def start(
    cfg: TrainConfig,
    noise_per_process: bool = False,
    load_options: Callable[[torch.device], dict] | None = None,
) -> Run:
    """The accelerator, the run directory (with ``config.yaml``), the checkpoint to resume from
    (checked against the recipe), the seeded noise generator and the frozen model.

    ``noise_per_process``: each process draws its own noise (online objectives, whose batches are
    per process); otherwise one stream shared by all processes, each taking its slice.
    ``load_options(device)``: ``load_model`` options the objective adds to the recipe's
    ``model_options`` once the device is known (DPO: whether the text encoder is loaded)."""
    run_dir = Path(cfg.output_dir) / cfg.name
    accelerator = make_accelerator(cfg, run_dir)
    world, rank = accelerator.num_processes, accelerator.process_index
    sp_group, dp_rank, dp_world = sequence_parallel_layout(cfg.sequence_parallel_size, world, rank)
    micro = micro_batch_size(cfg, dp_world)
    stage, fsdp2 = zero_stage(accelerator), uses_fsdp2(accelerator)
    ckpt = find_checkpoint(cfg, run_dir, _say if accelerator.is_main_process else None)
    resumed = check_resumable(ckpt, cfg, world, stage, "fsdp2" if fsdp2 else None) if ckpt else None
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed + (dp_rank if noise_per_process else 0))
    no_zero_init = (
        accelerator.state.deepspeed_plugin.zero3_init_context_manager(enable=False)
        if stage is not None
        else nullcontext()
    )
    options = {**cfg.model_options, **(load_options(accelerator.device) if load_options else {})}
    with no_zero_init:  # frozen parts are built whole, outside ZeRO-3 partitioning
        model = load_model(cfg.model, device=accelerator.device, **options)
    model.requires_grad_(False)
    if stage == 3:
        check_zero3_layout(model)
    run = Run(accelerator, model, run_dir, micro, stage, gen, ckpt, resumed, fsdp2=fsdp2)
    run.sequence_parallel, run.sp_group = cfg.sequence_parallel_size, sp_group
    return run


def sequence_parallel_layout(k: int, world: int, rank: int) -> tuple[Any, int, int]:
    """``(group, data-parallel rank, data-parallel size)`` of this process for
    ``sequence_parallel_size`` K: groups of K consecutive processes share a batch
    (``align.models.diffusers.sequence_parallel``); ``(None, rank, world)`` for K = 1.
    Collective for K > 1. A launch that K does not divide is a ValueError."""
    if k == 1:
        return None, rank, world
    if world % k:
        raise ValueError(
            f"recipe key `sequence_parallel_size`: {k} does not divide the {world} process(es) of this launch; "
            f"launch a multiple of {k} processes (accelerate launch --num_processes), or lower it"
        )
    from align.models.diffusers.sequence_parallel import sequence_parallel_groups

    return sequence_parallel_groups(k)


def _configure_deepspeed(run: Run, cfg: TrainConfig) -> None:
    """Fill the DeepSpeed config's ``auto`` batch / clipping values from the recipe (there is no
    DataLoader for accelerate to read them from) and refuse values that contradict it."""
    ds = run.accelerator.state.deepspeed_plugin.deepspeed_config
    gas, world, micro = cfg.accumulation_steps, run.accelerator.num_processes, run.micro
    want = {
        "train_micro_batch_size_per_gpu": micro,
        "train_batch_size": micro * gas * world,
        "gradient_clipping": cfg.max_grad_norm if cfg.max_grad_norm > 0 else 0.0,
    }
    for key, value in want.items():
        have = ds.get(key, "auto")
        if have == "auto" or (key == "train_batch_size" and key not in ds):
            ds[key] = value
        elif have != value:
            raise ValueError(
                f"DeepSpeed config: {key} is {have} but the recipe implies {value} "
                f"({micro} samples per process x {gas} accumulation x {world} processes); "
                f'set it to "auto"'
            )
    have = ds.get("gradient_accumulation_steps", "auto")
    if have not in ("auto", gas):
        raise ValueError(
            f'DeepSpeed config: gradient_accumulation_steps is {have}, the recipe says {gas}; set it to "auto"'
        )


def prepare(cfg: TrainConfig, run: Run) -> None:
    """LoRA on the denoiser (optionally with gradient checkpointing), AdamW over the LoRA
    parameters with linear warmup, ``accelerator.prepare`` and, when resuming, the checkpoint."""
    model = run.model
    attach_lora(model.denoiser, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
    if cfg.gradient_checkpointing:
        if not model.supports_gradient_checkpointing:
            raise ValueError(
                f"gradient_checkpointing: the denoiser of {cfg.model} does not support it "
                "(diffusers transformers do; pass it for them via model_options)"
            )
        model.enable_gradient_checkpointing()
    model.denoiser.train()
    if run.sequence_parallel > 1:  # after LoRA: the hooks go on the modules that run
        from align.models.diffusers.sequence_parallel import enable_sequence_parallel

        run.sp_modules = enable_sequence_parallel(model, run.sp_group)
    if run.fsdp2:  # before the optimizer: fully_shard replaces the parameters by sharded ones
        shard_fsdp2(model.denoiser, run.device, cfg.mixed_precision)
    optimizer = torch.optim.AdamW(lora_parameters(model.denoiser), lr=cfg.learning_rate, weight_decay=0.0)
    warm = max(1, cfg.lr_warmup_steps)
    # stepped once per optimizer step by the loop (not prepared: accelerate would step it once per process)
    run.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warm))
    if run.stage is not None:
        _configure_deepspeed(run, cfg)
    if run.fsdp2 and not run.accelerator.is_fsdp2:  # FSDP2 on CPU: accelerate would wrap it in DDP
        run.denoiser, run.optimizer = model.denoiser, run.accelerator.prepare(optimizer)
    else:  # on GPUs accelerate keeps an already sharded (FSDPModule) denoiser as it is
        run.denoiser, run.optimizer = run.accelerator.prepare(model.denoiser, optimizer)
    run.base = run.accelerator.unwrap_model(run.denoiser)
    if run.ckpt is not None:
        _load_checkpoint(run)


# ---------------------------------------------------------------- the loop


def _open_metrics(run: Run) -> Any:
    """metrics.jsonl of the main process: a resumed run drops the records a killed run wrote
    after its last checkpoint (it rewrites them); a fresh run starts the file over."""
    if not run.is_main:
        return None
    path = run.run_dir / "metrics.jsonl"
    if run.ckpt is not None and path.exists():
        kept = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= run.step]
        path.write_text("".join(ln + "\n" for ln in kept))
    return open(path, "a" if run.ckpt is not None else "w")


def _scalar_config(cfg: TrainConfig) -> dict:
    """The config's scalar values, as trackers store hyperparameters."""
    return {k: v for k, v in dataclasses.asdict(cfg).items() if isinstance(v, (int, float, str, bool))}


def _agree(run: Run, flag: bool) -> bool:
    """True on every process when ``flag`` is true on any (saving is collective)."""
    if run.accelerator.num_processes == 1:
        return flag
    t = torch.tensor([float(flag)], device=run.device)
    return bool(run.accelerator.reduce(t, reduction="sum").item())


def _record(run: Run, keys: tuple[str, ...], sums: dict, n_micro: int, extra: dict, grad_norm) -> dict:
    """One metrics record: the keys averaged over micro-steps and processes, plus lr and timing."""
    avg = torch.tensor([sums[k] / n_micro for k in keys], device=run.device)
    avg = run.accelerator.reduce(avg, reduction="mean")
    rec = {"step": run.step, **{k: float(v) for k, v in zip(keys, avg)}, **extra}
    rec["lr"] = run.lr_scheduler.get_last_lr()[0]
    rec["grad_norm"] = float(grad_norm) if grad_norm is not None else None
    return rec


def _micro_step(cfg: TrainConfig, run: Run, step_fn: Callable[[Any], dict], batch) -> tuple[dict, Any]:
    """One micro-batch under accelerate's accumulation: forward and backward; on the last
    micro-step of an update the gradient is clipped and the optimizer steps. Returns the loss
    dict and the gradient norm (None unless clipped on this micro-step)."""
    acc = run.accelerator
    with acc.accumulate(run.denoiser):
        out = step_fn(batch)
        acc.backward(out["loss"])
        grad_norm = None
        if acc.sync_gradients and cfg.max_grad_norm > 0:
            grad_norm = acc.clip_grad_norm_(run.denoiser.parameters(), cfg.max_grad_norm)
            if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor of partial norms
                grad_norm = grad_norm.full_tensor()
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
    run.micro_step += 1
    return out, grad_norm


def _log_update(cfg: TrainConfig, run: Run, rec: dict, keys: tuple[str, ...], info: dict, metrics_f, bar) -> None:
    """After an update: the optimizer state's size per process (once), the record in
    metrics.jsonl and the trackers (every ``log_every`` steps and at the last), the progress bar."""
    acc = run.accelerator
    if "optimizer_state_bytes_per_rank" not in info:
        mine = [optimizer_state_bytes(run.optimizer), denoiser_param_bytes(run.base)]
        per_rank = acc.gather(torch.tensor([mine], device=run.device))
        info["optimizer_state_bytes_per_rank"] = [int(b) for b in per_rank[:, 0].tolist()]
        info["denoiser_param_bytes_per_rank"] = [int(b) for b in per_rank[:, 1].tolist()]
    if run.step % cfg.log_every == 0 or run.step == cfg.max_steps:
        if run.is_main:
            metrics_f.write(json.dumps(rec) + "\n")
            metrics_f.flush()
        acc.log({f"train/{k}": v for k, v in rec.items() if isinstance(v, (int, float))}, step=run.step)
    bar.update(1)
    post = {k: f"{rec[k]:.4f}" for k in keys[:2]}
    bar.set_postfix({**post, "s/step": f"{rec['step_time_s']:.3f}"})


def _checkpoint_or_stop(
    cfg: TrainConfig, run: Run, stop: threading.Event, state: dict, checkpoint_extra: Callable[[], dict] | None
) -> None:
    """A checkpoint every ``checkpointing_steps``, and when any process got SIGTERM: then exit."""
    stopping = _agree(run, stop.is_set())
    if stopping or (cfg.checkpointing_steps > 0 and run.step % cfg.checkpointing_steps == 0):
        more = checkpoint_extra() if checkpoint_extra else None
        save_checkpoint(run, cfg.checkpoints_total_limit, {**state, "micro_step": run.micro_step}, more)
    if stopping:
        raise SystemExit(
            f"[vidalign] SIGTERM: stopped at step {run.step}, checkpoint written to "
            f"{run.run_dir / f'checkpoint-{run.step}'}; continue with --resume latest"
        )


def loop(
    cfg: TrainConfig,
    run: Run,
    batches: Iterator,
    step_fn: Callable[[Any], dict],
    keys: tuple[str, ...],
    info: dict,
    checkpoint_extra: Callable[[], dict] | None = None,
) -> Path:
    """Optimise until ``cfg.max_steps``: ``step_fn(batch)`` returns the loss dict of one
    micro-batch (``"loss"`` plus the diagnostics named in ``keys``). A ``dict`` coming out of
    ``batches`` instead of a batch is logged with the following steps (e.g. an online round's
    reward statistics). Writes metrics.jsonl, trackers, checkpoints, the final LoRA and
    ``summary.json``; returns the run directory."""
    acc, gas = run.accelerator, cfg.accumulation_steps
    info.update(
        num_processes=acc.num_processes,
        sequence_parallel_size=run.sequence_parallel,
        zero_stage=run.stage,
        backend="fsdp2" if run.fsdp2 else ("deepspeed" if run.stage is not None else "ddp"),
        micro_batch_size=run.micro,
        gradient_accumulation_steps=gas,
        effective_batch_size=run.micro * run.world * gas,
    )
    if run.is_main:
        resuming = f"; resuming from {run.ckpt} (step {run.step})" if run.ckpt else ""
        print(f"[vidalign] {cfg.objective}: {json.dumps(info)}{resuming}")
    metrics_f = _open_metrics(run)
    acc.init_trackers("vidalign", config=_scalar_config(cfg))
    show = cfg.progress and run.is_main
    bar = tqdm(total=cfg.max_steps, initial=run.step, desc=f"{cfg.objective} ({cfg.name})", disable=not show)
    stop = threading.Event()  # set by SIGTERM: checkpoint at the end of this step, then exit
    old_handler = None
    if threading.current_thread() is threading.main_thread():
        old_handler = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    state = {"recipe": recipe_fingerprint(cfg), "num_processes": acc.num_processes, "zero_stage": run.stage}
    if run.fsdp2:
        state["backend"] = "fsdp2"
    t_start = t_step = time.time()
    sums, n_micro, step_times, extra = {}, 0, [], {}
    try:
        while run.step < cfg.max_steps:
            batch = next(batches)
            if isinstance(batch, dict):
                extra = batch
                continue
            out, grad_norm = _micro_step(cfg, run, step_fn, batch)
            for k in keys:
                sums[k] = sums.get(k, 0.0) + float(out[k].detach())
            n_micro += 1
            if not acc.sync_gradients:
                continue
            run.lr_scheduler.step()
            run.step += 1
            rec = _record(run, keys, sums, n_micro, extra, grad_norm)
            rec["step_time_s"] = time.time() - t_step
            step_times.append(rec["step_time_s"])
            sums, n_micro = {}, 0
            _log_update(cfg, run, rec, keys, info, metrics_f, bar)
            _checkpoint_or_stop(cfg, run, stop, state, checkpoint_extra)
            t_step = time.time()
    finally:
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)
        bar.close()
        if metrics_f is not None:
            metrics_f.close()
    return _finish(cfg, run, info, time.time() - t_start, step_times)


def _finish(cfg: TrainConfig, run: Run, info: dict, train_s: float, step_times: list[float]) -> Path:
    """The final LoRA (diffusers layout) and ``summary.json``; ends the trackers."""
    acc = run.accelerator
    acc.wait_for_everyone()
    write_lora(run, run.run_dir / "lora", {"base_model": str(cfg.model)})
    if run.is_main:
        info["train_s"] = train_s
        later = step_times[1:] or step_times
        info["step_time_s_mean"] = sum(later) / len(later) if later else None
        (run.run_dir / "summary.json").write_text(json.dumps(info, indent=2))
    acc.end_training()
    return run.run_dir


def load_aligned(model_path: str | Path, lora_path: str | Path | None, device="cpu", **options):
    """The base generator, with a trained LoRA attached when ``lora_path`` is given."""
    model = load_model(model_path, device=device, **options)
    if lora_path:
        load_lora(model.denoiser, lora_path)
    return model.eval()
