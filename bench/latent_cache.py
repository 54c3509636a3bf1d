"""DPO epoch time with the latent cache vs without, on the tiny model, as ratios measured in one run.

    python -m bench.latent_cache [--pairs 64] [--batch 8] [--epochs 5] [--threads 1] [--out FILE]

The data: ``--pairs`` pairs of synthetic-world videos written as mp4 files with a JSONL index,
as users bring them, in three scenarios:

- ``model_resolution``: the files already hold the model's input (8 frames of 32x32): the
  least a cache can save, only the decode and the VAE.
- ``source_128px`` / ``source_256px``: the files are 16 frames of 128x128 at 16 fps / 32
  frames of 256x256 at 24 fps (still far below real 480p-720p clips), brought to the model's
  8 frames at 8 fps and 32x32 by :func:`align.data.video.prepare_video` (fps-aware sampling,
  resize and centre crop): what real data needs, and what the cache also saves.

Every epoch runs the same LoRA Diffusion-DPO steps (policy forward + backward on both videos,
reference forward) over all pairs; what differs is where the latents come from:

- ``no_cache``: the streaming path that a dataset too large for memory needs without a cache:
  per batch, decode the files (and prepare the frames), encode the videos with the VAE and the
  prompts with the text encoder, then step.
- ``cache``: read latents and prompt states from the safetensors shards
  (``LatentPairDataset``), then step. Filling the cache once (``build``) is timed separately,
  and the report says after how many epochs it has paid for itself.
- ``in_memory``: one ``TensorDataset`` of latents (what ``align.train`` does when everything
  fits in RAM), for reference: the cache should cost about as much as holding latents in memory.

Epochs of the three kinds are interleaved, and the ratio compares each kind's fastest epoch
(the one least disturbed by other load on a shared CPU; medians are reported too). Torch runs
one thread by default (``--threads``): on a shared 2-core machine, two threads per process made
single epochs up to 40x slower at random; one thread keeps them within ~20% of each other.
The results are the ratios ``no_cache / cache`` (goal: >= 3x). The cache cannot make an epoch
faster than its DPO steps, so the ratio is (decode + prepare + VAE + steps) / steps: it grows
with the size of the source videos, while the tiny denoiser's step cost stays the same.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from align.data.latent_cache import build_latent_cache
from align.data.preference import load_preference_dataset
from align.data.synthetic import all_scenes, sample_videos
from align.data.video import from_uint8, prepare_video, read_video, video_info, write_video
from align.models.lora import attach_lora, lora_parameters
from align.models.tiny_sora import TinySora, TinySoraConfig
from align.training.dpo import dpo_step_losses

SCENARIOS = {
    # name: (frames in the file, size in the file, fps of the file, preprocessing for the model)
    "model_resolution": (8, 32, 8, None),
    "source_128px": (16, 128, 16, {"num_frames": 8, "height": 32, "width": 32, "fps": 8}),
    "source_256px": (32, 256, 24, {"num_frames": 8, "height": 32, "width": 32, "fps": 8}),
}


def write_dataset(root: Path, n_pairs: int, frames: int = 8, size: int = 32, fps: int = 8, seed: int = 0) -> str:
    """``n_pairs`` pairs of synthetic-world mp4 videos under ``root/videos`` and ``root/prefs.jsonl``."""
    rng = np.random.default_rng(seed)
    scenes = all_scenes()
    picked = [scenes[i] for i in rng.integers(0, len(scenes), n_pairs)]
    videos = sample_videos([s for s in picked for _ in range(2)], rng, num_frames=frames, size=size)
    lines = []
    for i, scene in enumerate(picked):
        a = write_video(root / "videos" / f"{i:05d}_a.mp4", videos[2 * i], fps=fps)
        b = write_video(root / "videos" / f"{i:05d}_b.mp4", videos[2 * i + 1], fps=fps)
        rec = {"prompt": scene.prompt, "video_a": f"videos/{a.name}", "video_b": f"videos/{b.name}"}
        lines.append(json.dumps(rec | {"preference": "a" if rng.random() < 0.5 else "b"}))
    (root / "prefs.jsonl").write_text("\n".join(lines) + "\n")
    return str(root / "prefs.jsonl")


def run_scenario(model, step, tmp: Path, name: str, args) -> dict:
    """Time the three kinds of epoch on one scenario's files; return times and ratios."""
    frames, size, fps, pre = SCENARIOS[name]
    src = write_dataset(tmp / name, args.pairs, frames, size, fps)
    ds = load_preference_dataset(src)
    recs = [json.loads(line) for line in Path(src).read_text().splitlines()]
    root = Path(src).parent

    def load(rel: str) -> np.ndarray:
        """Decode one file and bring it to the model's input, as the cache build does."""
        v = read_video(root / rel)
        if pre is None:
            return v
        src_fps = video_info(root / rel)["fps"]
        return prepare_video(v, pre["num_frames"], pre["height"], pre["width"], src_fps, pre["fps"])

    t0 = time.perf_counter()
    cached = build_latent_cache(model, ds, tmp / f"cache-{name}", src, src, preprocessing=pre)
    t_build = time.perf_counter() - t0
    in_memory = torch.utils.data.TensorDataset(*(torch.stack(x) for x in zip(*(cached[i] for i in range(len(cached))))))

    def epoch_no_cache() -> None:
        for i in range(0, len(recs), args.batch):
            chunk = recs[i : i + args.batch]
            win = [r["video_a"] if r["preference"] == "a" else r["video_b"] for r in chunk]
            lose = [r["video_b"] if r["preference"] == "a" else r["video_a"] for r in chunk]
            with torch.no_grad():
                lat_w = model.encode_video(from_uint8(np.stack([load(p) for p in win])))
                lat_l = model.encode_video(from_uint8(np.stack([load(p) for p in lose])))
                cond = model.encode_prompts([r["prompt"] for r in chunk])
            step((lat_w, lat_l, cond))

    def epoch_from(dataset) -> None:
        gen = torch.Generator().manual_seed(0)
        for batch in torch.utils.data.DataLoader(dataset, batch_size=args.batch, shuffle=True, generator=gen):
            step(batch)

    kinds = {
        "no_cache": epoch_no_cache,
        "cache": lambda: epoch_from(cached),
        "in_memory": lambda: epoch_from(in_memory),
    }
    for fn in kinds.values():  # warm-up: first calls allocate and fill the OS page cache
        fn()
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for _ in range(args.epochs):
        for k, fn in kinds.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    saved = best["no_cache"] - best["cache"]
    return {
        "files": {"frames": frames, "size": size, "fps": fps, "preprocessing": pre},
        "epoch_seconds": times,
        "median_epoch_seconds": med,
        "best_epoch_seconds": best,
        "build_seconds": t_build,
        "no_cache / cache": best["no_cache"] / best["cache"],
        "no_cache / cache (medians)": med["no_cache"] / med["cache"],
        "cache / in_memory": best["cache"] / best["in_memory"],
        "cache_pays_off_after_epochs": t_build / saved if saved > 0 else None,
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8, help="pairs per DPO step")
    ap.add_argument("--epochs", type=int, default=5, help="epochs of each kind (the fastest are compared)")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma-separated, of {list(SCENARIOS)}")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's choice)")
    ap.add_argument("--out", default="bench/latent_cache.json")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [s for s in args.scenarios.split(",") if s]
    unknown = [s for s in names if s not in SCENARIOS]
    if unknown:
        ap.error(f"unknown scenario(s) {unknown}; use {list(SCENARIOS)}")
    torch.manual_seed(0)
    model = TinySora(TinySoraConfig()).eval()  # the demo's tiny model
    model.requires_grad_(False)
    attach_lora(model.denoiser, rank=8, alpha=8.0)  # LoRA leaves the VAE and the text encoder alone
    model.denoiser.train()
    opt = torch.optim.AdamW(lora_parameters(model.denoiser), lr=1e-4)
    gen = torch.Generator().manual_seed(0)

    def step(batch) -> None:
        out = dpo_step_losses(model, model.denoiser, model.denoiser, batch, 500.0, "sigmoid", generator=gen)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()

    with tempfile.TemporaryDirectory() as tmp:
        scenarios = {name: run_scenario(model, step, Path(tmp), name, args) for name in names}
    res = {
        "machine": {"threads": torch.get_num_threads(), "torch": torch.__version__},
        "pairs": args.pairs,
        "batch_pairs": args.batch,
        "epochs": args.epochs,
        "scenarios": scenarios,
        "ratios": {f"{n}: no_cache / cache": s["no_cache / cache"] for n, s in scenarios.items()},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    for name, s in scenarios.items():
        best = {k: round(v, 3) for k, v in s["best_epoch_seconds"].items()}
        medians = s["no_cache / cache (medians)"]
        print(
            f"{name:17s} no_cache / cache {s['no_cache / cache']:5.2f}x (medians {medians:.2f}x)"
            f"   cache / in_memory {s['cache / in_memory']:4.2f}x   (fastest epoch s {best}; "
            f"build {s['build_seconds']:.2f} s)"
        )
    print(f"written to {out}")
    return res


if __name__ == "__main__":
    main()
