"""The latent cache: memory flat in the dataset size, and its speed-up, as ratios measured in one run.

    python -m bench.latent_cache [--pairs 1000,8000] [--no-in-memory] [--size 128] [--frames 17]
                                 [--steps 4] [--threads 1] [--out bench/latent_cache.json]

Two measurements, each on its own tiny model (both random-initialised from configs):

1. **Peak RSS, 1k vs 8k pairs** (the tiny Sora model, ``TinySoraConfig()``, the demo's size:
   8 frames of 32x32; its VAE is fast enough to encode 16k videos on one CPU core in about a
   minute). The dataset is a ``save_to_disk`` directory whose videos are uint8 arrays (Arrow,
   memory-mapped), 64 prompts, every video distinct; the 1k set is the first 1000 rows of the
   8k set. Each measurement is a fresh subprocess that builds the cache (``build_latent_cache``
   at the model input, as ``vidalign train`` with ``latent_cache_dir`` does) and then reads every
   pair once through a shuffling ``DataLoader`` (as an epoch does). For contrast the in-memory
   path (``to_pairs`` + ``encode_pairs``: every video decoded into memory, as ``train`` does
   without ``latent_cache_dir``) runs in its own subprocesses too. Reported per process: the
   peak resident set (``VmHWM`` of the child, which counts from its exec, unlike ``ru_maxrss``;
   it includes file-backed pages of the memory-mapped dataset and shards and of the shared
   libraries, which the OS can drop at any time) and the peak
   *anonymous* resident memory (``RssAnon`` sampled from ``/proc/PID/status`` every 20 ms: what
   cannot be dropped, the part that must not grow with the dataset). Goal: 8k / 1k ~= 1 for
   the cache.

2. **Speed-up at the model's resolution** (a tiny diffusers Wan pipeline built from config,
   the classes of Wan 2.1, at ``--frames`` x ``--size`` x ``--size``, default 17 x 128 x 128; the
   mp4 files hold exactly that, at Wan's 16 fps, so nothing is resampled: the least a cache
   saves). Two ratios:

   - ``per step``: the time of one DPO step (LoRA policy forward + backward on both videos of
     ``--batch`` pairs, reference forward) when its latents come from the files (decode the
     mp4s, VAE-encode the videos, encode the prompts with the text encoder: the only way to
     stream a dataset too large for memory without a cache) over the time of the same step
     reading latents and prompt states from the cache. Steps of the two kinds are interleaved;
     the fastest of each is compared (medians are reported too).
   - ``start-up``: the data preparation of a run without a cache (``load_dpo_data``'s in-memory
     path: ``to_pairs`` + ``encode_pairs``, repeated at every start) over that of a later run with
     a filled cache (``build_latent_cache`` again: validate and hash every file, encode nothing).

   The tiny transformer is far cheaper next to its VAE than Wan 2.1's 1.3B one, so the per-step
   ratio overstates what a real model gains per step; the start-up ratio and the memory (no
   decoded dataset, no text encoder: see ``text_encoder_options``) carry over.

Torch runs one thread by default (``--threads``): on a shared 2-core machine more threads made
timings noisy. Results go to ``--out`` as JSON and are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

VIDEO = (8, 32, 32, 3)  # the tiny Sora model's input
N_PROMPTS = 64


# --------------------------------------------------------------------------------------------
# 1. peak RSS of building + reading the cache, 1k vs 8k pairs


def write_array_dataset(root: Path, n_pairs: int, seed: int = 0) -> Path:
    """``n_pairs`` rows with distinct random uint8 videos ``VIDEO`` as a ``save_to_disk`` dataset."""
    import datasets

    rng = np.random.default_rng(seed)
    video = datasets.Array4D(VIDEO, "uint8")
    features = datasets.Features(
        {"prompt": datasets.Value("string"), "video_a": video, "video_b": video, "preference": datasets.Value("string")}
    )

    def rows():
        for start in range(0, n_pairs, 500):
            m = min(500, n_pairs - start)
            a, b = (rng.integers(0, 256, (m, *VIDEO), dtype=np.uint8) for _ in range(2))
            for j in range(m):
                pref = "a" if rng.random() < 0.5 else "b"
                yield {
                    "prompt": f"prompt {(start + j) % N_PROMPTS}",
                    "video_a": a[j],
                    "video_b": b[j],
                    "preference": pref,
                }

    ds = datasets.Dataset.from_generator(rows, features=features, cache_dir=str(root / "hf"))
    ds.save_to_disk(str(root / f"pairs-{n_pairs}"))
    return root / f"pairs-{n_pairs}"


def child(mode: str, data: str, cache: str, threads: int) -> None:
    """One measured process: build (``cache``) or encode in memory (``in_memory``), then one epoch."""
    torch.set_num_threads(threads)
    from align.data.latent_cache import build_latent_cache
    from align.data.pairs import to_pairs
    from align.data.preference import load_preference_dataset
    from align.models.tiny_sora import TinySora, TinySoraConfig
    from align.training.dpo import encode_pairs

    torch.manual_seed(0)
    model = TinySora(TinySoraConfig()).eval()
    model.requires_grad_(False)
    ds = load_preference_dataset(data)
    t0 = time.perf_counter()
    if mode == "cache":
        pairs = build_latent_cache(model, ds, cache, data, data, target=model.video_input)
    else:
        pairs = encode_pairs(model, to_pairs(ds, source=data, root=data, target=model.video_input))
    t1 = time.perf_counter()
    gen = torch.Generator().manual_seed(0)
    total = 0.0
    for lat_w, lat_l, cond in torch.utils.data.DataLoader(pairs, batch_size=16, shuffle=True, generator=gen):
        total += float(lat_w.sum() + lat_l.sum() + cond.sum())
    hwm = _status_kb(os.getpid())["VmHWM"] / 1024  # the peak resident set of this process since exec
    print(json.dumps({"pairs": len(pairs), "prepare_s": t1 - t0, "epoch_read_s": time.perf_counter() - t1, "hwm": hwm}))


def _status_kb(pid: int) -> dict[str, int]:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    return {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in text.splitlines()) if v.endswith("kB")}


def measure(mode: str, data: Path, cache: Path, threads: int) -> dict:
    """Run :func:`child` in a subprocess: its peak RSS (``VmHWM``, reset at exec; the ``ru_maxrss``
    of ``getrusage`` / ``wait4`` is not, it counts the parent's pages before exec) and its peak
    RssAnon / RssFile, sampled."""
    cmd = [sys.executable, "-m", "bench.latent_cache", "--child", mode, "--data", str(data), "--cache", str(cache)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.Popen(cmd + ["--threads", str(threads)], stdout=subprocess.PIPE, env=env, text=True)
    peak = {"RssAnon": 0, "RssFile": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            s = _status_kb(proc.pid)
            for k in peak:
                peak[k] = max(peak[k], s.get(k, 0))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out = proc.stdout.read()
    _, status, _ = os.wait4(proc.pid, 0)
    done.set()
    sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"bench child {mode} on {data} failed with exit code {proc.returncode}")
    res = json.loads(out.strip().splitlines()[-1])
    return res | {
        "peak_rss_mib": res.pop("hwm"),
        "peak_anon_rss_mib": peak["RssAnon"] / 1024,
        "peak_file_rss_mib": peak["RssFile"] / 1024,
    }


def bench_rss(tmp: Path, sizes: list[int], in_memory: bool, threads: int) -> dict:
    """Peak memory of the cache path (and the in-memory path) at each dataset size."""
    import datasets

    largest = write_array_dataset(tmp, max(sizes))
    data = {max(sizes): largest}
    full = datasets.load_from_disk(str(largest))
    for n in sizes:
        if n not in data:
            full.select(range(n)).save_to_disk(str(tmp / f"pairs-{n}"))
            data[n] = tmp / f"pairs-{n}"
    modes = ["cache", "in_memory"] if in_memory else ["cache"]
    res: dict = {m: {} for m in modes}
    for n in sorted(sizes):
        for m in modes:
            res[m][str(n)] = measure(m, data[n], tmp / f"cache-{n}", threads)
            r = res[m][str(n)]
            print(
                f"  {m:9s} {n:5d} pairs: peak RSS {r['peak_rss_mib']:7.1f} MiB"
                f" (anonymous {r['peak_anon_rss_mib']:7.1f})"
                f"  prepare {r['prepare_s']:6.1f} s  epoch {r['epoch_read_s']:5.1f} s",
                flush=True,
            )
    lo, hi = str(min(sizes)), str(max(sizes))
    ratios = {}
    for m in modes:
        ratios[f"{m}: peak RSS {hi} / {lo} pairs"] = res[m][hi]["peak_rss_mib"] / res[m][lo]["peak_rss_mib"]
        ratios[f"{m}: peak anonymous RSS {hi} / {lo} pairs"] = (
            res[m][hi]["peak_anon_rss_mib"] / res[m][lo]["peak_anon_rss_mib"]
        )
    return {
        "model": "tiny Sora, TinySoraConfig() (8 frames of 32x32, latents 4x4x8x8)",
        "videos": f"distinct random uint8 {VIDEO} arrays in a save_to_disk dataset; {N_PROMPTS} prompts",
        **res,
        "ratios": ratios,
    }


# --------------------------------------------------------------------------------------------
# 2. speed-up at the model's resolution, tiny Wan pipeline


def tiny_wan_pipeline(max_length: int = 16):
    """A random tiny ``WanPipeline`` (UMT5 encoder, Wan VAE, Wan transformer) with a word-level tokenizer."""
    import diffusers
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    words = "a red green blue yellow square circle triangle moving left right up down prompt".split()
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=max_length
    )
    torch.manual_seed(0)
    return diffusers.WanPipeline(
        tokenizer=tokenizer,
        text_encoder=UMT5EncoderModel(
            UMT5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=37, num_layers=1, num_heads=4)
        ),
        vae=diffusers.AutoencoderKLWan(
            base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
        ),
        transformer=diffusers.WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=2,
            attention_head_dim=12,
            in_channels=16,
            out_channels=16,
            text_dim=32,
            freq_dim=256,
            ffn_dim=32,
            num_layers=2,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            rope_max_seq_len=64,
        ),  # fmt: skip
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
    )


def write_mp4_dataset(root: Path, n_pairs: int, frames: int, size: int, fps: int = 16, seed: int = 0) -> str:
    """``n_pairs`` pairs of smooth random mp4 videos (``frames`` x ``size`` x ``size``) and a JSONL index."""
    from align.data.video import write_video

    rng = np.random.default_rng(seed)
    lines = []
    t = np.linspace(0, 1, frames)[:, None, None, None]
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(n_pairs):
        names = []
        for side in "ab":
            c0, c1 = rng.random(3), rng.random(3)
            phase = rng.random() * 2 * np.pi
            wave = 0.5 + 0.5 * np.sin(6 * (xx + yy)[None, :, :, None] + phase + 4 * t)
            frames_u8 = (255 * (c0 * wave + c1 * (1 - wave))).astype(np.uint8)
            names.append(write_video(root / "videos" / f"{i:04d}_{side}.mp4", frames_u8, fps=fps).name)
        rec = {"prompt": f"a {['red', 'blue'][i % 2]} square moving left", "video_a": f"videos/{names[0]}"}
        rec |= {"video_b": f"videos/{names[1]}", "preference": "a" if rng.random() < 0.5 else "b"}
        lines.append(json.dumps(rec))
    (root / "prefs.jsonl").write_text("\n".join(lines) + "\n")
    return str(root / "prefs.jsonl")


def bench_speed(tmp: Path, args) -> dict:
    """Per-step and start-up ratios of the cache on a tiny Wan pipeline at ``frames x size x size``."""
    from align.data.latent_cache import build_latent_cache
    from align.data.pairs import to_pairs
    from align.data.preference import load_preference_dataset
    from align.data.video import read_video
    from align.frames import from_uint8
    from align.models import load_model
    from align.models.lora import attach_lora, lora_parameters
    from align.training.dpo import dpo_step_losses, encode_pairs

    tiny_wan_pipeline().save_pretrained(tmp / "wan")
    options = {"num_frames": args.frames, "height": args.size, "width": args.size, "max_sequence_length": 16}
    model = load_model(tmp / "wan", **options)
    n_pairs = args.batch * args.steps
    src = write_mp4_dataset(tmp / "mp4", n_pairs, args.frames, args.size)
    ds = load_preference_dataset(src)
    kw = dict(target=model.video_input, model_source=str(tmp / "wan"), model_options=options)

    t0 = time.perf_counter()
    in_memory = encode_pairs(model, to_pairs(ds, source=src, root=src, target=model.video_input))
    t_in_memory = time.perf_counter() - t0
    t0 = time.perf_counter()
    cached = build_latent_cache(model, ds, tmp / "cache", src, src, **kw)
    t_build = time.perf_counter() - t0
    t0 = time.perf_counter()
    cached = build_latent_cache(model, ds, tmp / "cache", src, src, **kw)
    t_warm = time.perf_counter() - t0
    assert cached.stats["videos_encoded"] == 0 and len(cached) == len(in_memory)

    attach_lora(model.denoiser, rank=8, alpha=8.0, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    model.denoiser.train()
    opt = torch.optim.AdamW(lora_parameters(model.denoiser), lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    recs = [json.loads(line) for line in Path(src).read_text().splitlines()]
    root = Path(src).parent

    def step(batch) -> None:
        out = dpo_step_losses(model, model.denoiser, model.denoiser, batch, 500.0, "sigmoid", generator=gen)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()

    def from_files(i: int) -> None:
        chunk = recs[i * args.batch : (i + 1) * args.batch]
        win = [r["video_a"] if r["preference"] == "a" else r["video_b"] for r in chunk]
        lose = [r["video_b"] if r["preference"] == "a" else r["video_a"] for r in chunk]
        with torch.no_grad():
            lat_w = model.encode_video(from_uint8(np.stack([read_video(root / p) for p in win])))
            lat_l = model.encode_video(from_uint8(np.stack([read_video(root / p) for p in lose])))
            cond = model.encode_prompts([r["prompt"] for r in chunk])
        step((lat_w, lat_l, cond))

    def from_cache(i: int) -> None:
        items = [cached[j] for j in range(i * args.batch, (i + 1) * args.batch)]
        step(tuple(torch.stack(x) for x in zip(*items)))

    kinds = {"no_cache": from_files, "cache": from_cache}
    for fn in kinds.values():
        fn(0)  # warm-up
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for i in range(args.steps):
        for k, fn in kinds.items():
            t0 = time.perf_counter()
            fn(i)
            times[k].append(time.perf_counter() - t0)
    best = {k: min(v) for k, v in times.items()}
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "model": f"tiny diffusers WanPipeline from config at {args.frames}x{args.size}x{args.size}, latents "
        f"{tuple(model.latent_shape)}",
        "files": f"{n_pairs} pairs of mp4 at {args.frames}x{args.size}x{args.size}, 16 fps (the model's input)",
        "batch_pairs": args.batch,
        "step_seconds": times,
        "best_step_seconds": best,
        "median_step_seconds": med,
        "start_up_seconds": {"in_memory_encode": t_in_memory, "cache_build": t_build, "cache_warm": t_warm},
        "ratios": {
            "per step: no_cache / cache": best["no_cache"] / best["cache"],
            "per step: no_cache / cache (medians)": med["no_cache"] / med["cache"],
            "start-up: in-memory encode / warm cache": t_in_memory / t_warm,
        },
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", default="1000,8000", help="dataset sizes of the RSS measurement (comma-separated)")
    ap.add_argument("--no-in-memory", action="store_true", help="skip the in-memory path's RSS (for contrast)")
    ap.add_argument("--frames", type=int, default=17, help="tiny Wan's num_frames (4k+1)")
    ap.add_argument("--size", type=int, default=128, help="tiny Wan's height and width (multiple of 16)")
    ap.add_argument("--batch", type=int, default=2, help="pairs per DPO step")
    ap.add_argument("--steps", type=int, default=4, help="timed steps of each kind")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--out", default="bench/latent_cache.json")
    ap.add_argument("--child", choices=("cache", "in_memory"), help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--cache", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.child, args.data, args.cache, args.threads)
        return {}
    torch.set_num_threads(args.threads)
    sizes = [int(n) for n in args.pairs.split(",") if n]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        print("peak RSS, building + reading the cache (subprocesses):", flush=True)
        rss = bench_rss(Path(tmp) / "rss", sizes, not args.no_in_memory, args.threads)
        print("speed-up at the model's resolution:", flush=True)
        speed = bench_speed(Path(tmp) / "speed", args)
    res = {
        "machine": {"threads": args.threads, "cpus": os.cpu_count(), "torch": torch.__version__},
        "seconds": time.perf_counter() - t0,
        "rss": rss,
        "speed": speed,
        "ratios": {**rss["ratios"], **speed["ratios"]},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    for k, v in res["ratios"].items():
        print(f"  {k:50s} {v:6.2f}x")
    print(f"written to {out} ({res['seconds']:.0f} s)")
    return res


if __name__ == "__main__":
    main()
