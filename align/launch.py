"""``accelerate launch`` of ``vidalign train`` on this machine's CPU processes.

The command line that the multi-process tests (``tests/test_distributed.py``) and
``bench/distributed.py`` run: ``kind`` is ``ddp`` (gloo), ``zero2`` or ``zero3`` (DeepSpeed,
with the JSON configs in ``recipes/accelerate/``) or ``fsdp2`` (PyTorch FSDP2 over gloo), each
process on one thread. On GPUs use
``accelerate launch --config_file recipes/accelerate/<config>.yaml`` (see README).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DISTRIBUTED_FLAGS = {
    "ddp": ["--multi_gpu"],
    "zero2": ["--use_deepspeed", "--deepspeed_config_file", "recipes/accelerate/ds_zero2.json"],
    "zero3": ["--use_deepspeed", "--deepspeed_config_file", "recipes/accelerate/ds_zero3.json"],
    "zero2_offload": ["--use_deepspeed", "--deepspeed_config_file", "recipes/accelerate/ds_zero2_offload.json"],
    "zero3_offload": ["--use_deepspeed", "--deepspeed_config_file", "recipes/accelerate/ds_zero3_offload.json"],
    "fsdp2": ["--use_fsdp", "--fsdp_version", "2", "--fsdp_reshard_after_forward", "true"],
}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_launch(
    kind: str, nproc: int, recipe: str | Path, *train_args: str, timeout: float | None = None
) -> subprocess.CompletedProcess:
    """Run ``vidalign train RECIPE *train_args`` under ``accelerate launch`` with ``nproc`` CPU
    processes (output captured; the caller checks ``returncode``). One DDP process is a
    plain launch; DeepSpeed kinds keep their flags at any process count."""
    if kind not in DISTRIBUTED_FLAGS:
        raise ValueError(f"cpu_launch: kind must be one of {sorted(DISTRIBUTED_FLAGS)}, got {kind!r}")
    flags = [] if kind == "ddp" and nproc == 1 else DISTRIBUTED_FLAGS[kind]
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        str(nproc),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        *flags,
        "-m",
        "align.cli",
        "train",
        str(recipe),
        *train_args,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
