"""Distributed training on this machine: optimizer-state bytes per rank and step-time ratios.

    python -m bench.distributed [--out bench/distributed.json] [--steps 8] [--model DIR]

Launches ``vidalign train`` on the tiny model (a small random TinySora unless ``--model``) with
``accelerate launch`` for 1 and 2 CPU processes under DDP (gloo), DeepSpeed ZeRO-2 and ZeRO-3,
and for 2 processes under FSDP2 (gloo) and the DeepSpeed offload configs (ZeRO-2 with the
optimizer, ZeRO-3 with optimizer and parameters in host memory; one process of FSDP2 is
unsharded, the same as 1-process DDP), always with the same effective batch (8 pairs per
optimizer step). Reported per launch:

- ``optimizer_state_bytes_per_rank``: AdamW state (exp_avg, exp_avg_sq, step) held by each
  process after the first step. DDP replicates it; ZeRO-2/3 and FSDP2 shard it, ~1/N per rank.
  Under offload it is the same shard, held in host memory (on this CPU-only machine the host
  is the device, so offload saves nothing here; on GPUs it is GPU memory freed).
- ``denoiser_param_bytes_per_rank``: the denoiser's parameters (frozen base + LoRA) held by
  each process: whole under DDP / ZeRO-2, ~1/N under ZeRO-3 and FSDP2.
- ``step_time_s``: mean wall time of steps 2..N on the main process, and
  ``step_time_ratio_vs_ddp_1proc``: that time over the 1-process DDP run's.

Each process runs one thread (``OMP_NUM_THREADS=1``), so 2 processes use both cores of this
machine; absolute times on a shared CPU vary between runs, the ratios within one run are the
result. On a tiny model the all-reduce / partition overhead dominates the compute, so the
2-process ratios say little about GPU scaling (bf16 MFU needs the lent GPU; not measured here).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import yaml

from align.launch import DISTRIBUTED_FLAGS, cpu_launch


def _tiny_setup(tmp: Path, model: str | None) -> tuple[str, str]:
    """A small TinySora (unless given) and a 16-pair preference dataset of random videos."""
    import datasets
    import numpy as np
    import torch

    from align.models.tiny_sora import TinySora, TinySoraConfig

    if model is None:
        torch.manual_seed(0)
        m = TinySora(TinySoraConfig(dim=32, depth=3, heads=2, vae_channels=8, text_dim=32, text_layers=1))
        model = str(m.save_pretrained(tmp / "model"))
    rng = np.random.default_rng(0)
    n = 16
    vids = rng.integers(0, 256, size=(2 * n, 8, 32, 32, 3), dtype=np.uint8)
    rows = {
        "prompt": ["a red square moving left on a black background"] * n,
        "video_a": list(vids[:n]),
        "video_b": list(vids[n:]),
        "preference": ["a" if i % 2 else "b" for i in range(n)],
    }
    feats = datasets.Features(
        {
            "prompt": datasets.Value("string"),
            "video_a": datasets.Array4D((8, 32, 32, 3), "uint8"),
            "video_b": datasets.Array4D((8, 32, 32, 3), "uint8"),
            "preference": datasets.Value("string"),
        }
    )
    datasets.Dataset.from_dict(rows, features=feats).save_to_disk(str(tmp / "prefs"))
    return model, str(tmp / "prefs")


def run_launch(kind: str, nproc: int, recipe: Path, name: str) -> dict:
    """One ``accelerate launch``; returns the run's summary.json."""
    proc = cpu_launch(kind, nproc, recipe, "--name", name)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} x{nproc} failed:\n{proc.stderr[-4000:]}")
    out = Path(yaml.safe_load(recipe.read_text())["output_dir"]) / name
    return json.loads((out / "summary.json").read_text())


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench/distributed.json")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--model", default=None, help="a TinySora directory (default: a small random one)")
    args = p.parse_args(argv)
    results: dict = {"effective_batch_size": 8, "steps": args.steps, "runs": {}}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        model, data = _tiny_setup(tmp, args.model)
        recipe = tmp / "recipe.yaml"
        recipe.write_text(
            yaml.safe_dump(
                dict(
                    model=model,
                    dataset=data,
                    output_dir=str(tmp / "runs"),
                    max_steps=args.steps,
                    effective_batch_size=8,
                    learning_rate=1e-2,
                    lora_rank=4,
                    lora_alpha=4.0,
                    beta=50.0,
                    checkpointing_steps=0,
                    progress=False,
                )
            )
        )
        for kind in DISTRIBUTED_FLAGS:
            for nproc in (1, 2) if kind in ("ddp", "zero2", "zero3") else (2,):
                s = run_launch(kind, nproc, recipe, f"{kind}-{nproc}")
                results["runs"][f"{kind}_{nproc}proc"] = {
                    "optimizer_state_bytes_per_rank": s["optimizer_state_bytes_per_rank"],
                    "denoiser_param_bytes_per_rank": s.get("denoiser_param_bytes_per_rank"),
                    "step_time_s": s["step_time_s_mean"],
                }
                print(f"{kind} x{nproc}: {results['runs'][f'{kind}_{nproc}proc']}", flush=True)
    base = results["runs"]["ddp_1proc"]["step_time_s"]
    for r in results["runs"].values():
        r["step_time_ratio_vs_ddp_1proc"] = r["step_time_s"] / base
    one = results["runs"]["ddp_1proc"]
    for kind in ("zero2", "zero3", "fsdp2", "zero2_offload", "zero3_offload"):
        two = results["runs"][f"{kind}_2proc"]
        for what in ("optimizer_state", "denoiser_param"):
            key = f"{what}_bytes_per_rank"
            results[f"{kind}_{key}_2proc_over_1proc"] = max(two[key]) / one[key][0]
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
