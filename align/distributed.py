"""Sharding sampling and judging over the processes of ``accelerate launch`` (or ``torchrun``).

Without a launcher there is one process: every function here is trivial and no process group
is made. Under ``accelerate launch`` with N processes, on one machine or several, the launcher
sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (through torchrun, or DeepSpeed's launcher;
accelerate's mpirun launch of ``--cpu`` processes is not read); the first collective call joins
a gloo process group (the default group when one exists already, e.g. an ``Accelerator``'s).
Only small Python objects cross it (index rows, scores, counts), so gloo is used on GPU
machines too and needs no device set-up.

- :func:`shard`: this process's indices of a work list of ``n`` items (``i % N == rank``);
  :func:`gather` puts every process's values back in work-list order, on every process.
- :func:`barrier`, :func:`all_gather` (Python objects), :func:`sum_all` (an integer).
- :func:`on_main`: run a function (a write, a read of shared state) on the main process
  only and hand its result, or its exception, to every process.
- :func:`local_device`: the GPU of this process (``cuda:LOCAL_RANK``) under N processes.

A process that waits longer than ``VIDALIGN_DIST_TIMEOUT`` seconds (default 3600) for the
others at one sync point (joining, one batch of videos, the final gather) fails with a timeout
error instead of hanging; a process that dies closes its connections and the others fail at
their next sync point (and ``accelerate launch`` stops the rest of its machine's processes).
"""

from __future__ import annotations

import atexit
import os
import pickle
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")
TIMEOUT_ENV = "VIDALIGN_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 3600.0


def num_processes() -> int:
    """How many processes share the work (``WORLD_SIZE``; 1 without a launcher)."""
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))


def process_index() -> int:
    """This process's rank, 0 to N - 1 over all machines (``RANK``; 0 without a launcher)."""
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """Whether this is the main process (rank 0): the one that writes shared files and prints."""
    return process_index() == 0


def local_device(device: str | None) -> str | None:
    """The device this process samples and judges on: under N processes with CUDA, ``None`` or
    ``"cuda"`` means this process's own GPU, ``cuda:LOCAL_RANK`` (made the current device, for
    pipelines that say ``"cuda"``); anything else, and one process, is returned as given."""
    if num_processes() == 1 or not torch.cuda.is_available() or device not in (None, "cuda"):
        return device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local)
    return f"cuda:{local}"


def _init() -> None:
    """Join the process group of the launch (gloo, ``VIDALIGN_DIST_TIMEOUT``) unless one exists."""
    if dist.is_initialized():
        return
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(
            f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {' and '.join(missing)} unset: launch with accelerate "
            "launch (--multi_gpu on a machine without GPUs) or torchrun"
        )
    timeout = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
    dist.init_process_group("gloo", timeout=timedelta(seconds=timeout))
    atexit.register(_shutdown)


def _shutdown() -> None:
    """Destroy the group before the interpreter exits (a live gloo group then can abort the
    process: "terminate called without an active exception")."""
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait until every process is here."""
    if num_processes() > 1:
        _init()
        dist.barrier()


def all_gather(obj: Any) -> list:
    """``[obj of process 0, obj of process 1, ...]`` on every process (picklable objects)."""
    if num_processes() == 1:
        return [obj]
    _init()
    out: list = [None] * num_processes()
    dist.all_gather_object(out, obj)
    return out


def sum_all(x: int) -> int:
    """The sum of ``x`` over the processes, on every process."""
    if num_processes() == 1:
        return int(x)
    _init()
    t = torch.tensor([int(x)], dtype=torch.int64)
    dist.all_reduce(t)
    return int(t.item())


def shard(n: int) -> list[int]:
    """This process's indices of a work list of ``n`` items: every N-th from its rank. The
    shards differ in size by at most one and together cover ``range(n)`` once."""
    return list(range(process_index(), n, num_processes()))


def gather(indices: list[int], values: list, n: int) -> list:
    """The values of every process in work-list order, on every process: ``values[k]`` is this
    process's value of item ``indices[k]`` of a list of ``n``; an item no process has is an error."""
    out: list = [None] * n
    seen = [False] * n
    for idx, vals in all_gather((list(indices), list(values))):
        for i, v in zip(idx, vals):
            out[i], seen[i] = v, True
    if not all(seen):
        raise RuntimeError(f"gather: item {seen.index(False)} of {n} came from no process")
    return out


def on_main(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` run on the main process only; every process returns its result
    (or raises its exception) once it has run, so this is also a barrier."""
    if num_processes() == 1:
        return fn(*args, **kwargs)
    _init()
    box: list = [None]
    if is_main():
        try:
            box[0] = ("ok", fn(*args, **kwargs))
        except Exception as e:  # every process raises it, not only the main one
            box[0] = ("error", e if _picklable(e) else RuntimeError(f"{type(e).__name__}: {e}"))
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise value
    return value


def _picklable(obj: Any) -> bool:
    try:
        pickle.loads(pickle.dumps(obj))
        return True
    except Exception:
        return False
