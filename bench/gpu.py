"""The real Wan 2.1 T2V 1.3B architecture on one GPU: a DPO step and a GRPO round, each beside
the planner's figure (``align/plan.py``), written to ``bench/gpu.json``.

    python -m bench.gpu [--out bench/gpu.json] [--size 33x480x832] [--steps 2]     (``make bench-gpu``)
    python -m bench.gpu --tiny --device cpu --out /tmp/gpu.json                  (the script's own check)

The transformer is built from its published config (``align/models/diffusers/configs``) with
random weights in bf16 on the device, gradient checkpointing on, under the shipped recipes'
LoRA (``recipes/wan2_1_t2v_1_3b_dpo.yaml``, ``..._grpo.yaml``: targets, rank, alpha, bf16
autocast). The VAE and the text encoder are tiny, of the same classes (as ``make test-real``
builds them: the VAE's working memory is not what is measured, and the 5.7 B UMT5-XXL would
only add its weights); the planner is given the same parts, so its figures are for exactly
what runs.

- DPO: the recipe's micro-batch (1 pair: policy on 2 videos with gradients, the reference on
  2 without) through ``dpo_step_losses`` under bf16 autocast, backward, and every
  ``gradient_accumulation_steps`` micro-steps clipping and AdamW; one optimizer step of
  warm-up, then ``--steps`` timed. Figures: seconds per micro-step and per optimizer step,
  ``torch.cuda.max_memory_allocated`` over the timed steps, MFU (the planner's FLOPs over the
  measured time and the card's dense bf16 peak).
- GRPO: the real trainer (``align.training.train``) with the recipe shrunk to 2 rounds of one
  prompt x 2 rollouts (the recipe's 10 SDE steps with CFG 5, 6 trained steps per rollout), the
  model loader pointed at the random-weight build and a brightness judge; the second round's
  time (sampling, scoring, its 12 micro-steps) from ``metrics.jsonl``, the peak over the run.

``--tiny`` shrinks the transformer (2 blocks, width 32), the video (5x32x32), the DPO
accumulation (1) and the GRPO rollouts (2 SDE steps, 1 trained) so the script runs end to end
on a CPU in seconds (tests/test_bench_gpu.py); ``--device cpu`` reports no
peak memory (``max_memory_allocated`` is CUDA's) and no MFU. Timings on a shared machine vary;
the planner's figures assume 40% MFU on the card it names.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = "wan2_1_t2v_1_3b"
RECIPES = {"dpo": ROOT / "recipes" / "wan2_1_t2v_1_3b_dpo.yaml", "grpo": ROOT / "recipes" / "wan2_1_t2v_1_3b_grpo.yaml"}
PARTS = {  # the tiny VAE and text encoder (UMT5 at the transformer's text width, one layer)
    "vae": dict(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1),
    "text_encoder": dict(num_layers=1, num_heads=2, d_kv=32, d_ff=64, vocab_size=64),
}
TINY = {  # --tiny: the same classes, narrow and shallow
    "transformer": dict(num_layers=2, num_attention_heads=2, attention_head_dim=16, ffn_dim=64, text_dim=32),
    "text_encoder": dict(d_model=32, d_kv=16),
}
WORDS = "a red blue green square circle moving left right up down on black gray background".split()
PROMPTS = ["a red square moving left on a black background", "a blue circle moving up on a gray background"]
GRPO_ROUND = dict(prompts_per_round=1, group_size=2, rollout_batch_size=2, rollout_batches_per_update=1)
GiB = 2**30


def tokenizer(max_length: int):
    """A word-level fast tokenizer over ``WORDS``, built in memory (pad 0, eos 1, unk 2)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=max_length
    )


def overrides(tiny: bool) -> dict:
    """The component config overrides: the tiny parts, and with ``--tiny`` a tiny transformer."""
    if not tiny:
        return PARTS
    return {
        **PARTS,
        "transformer": TINY["transformer"],
        "text_encoder": {**PARTS["text_encoder"], **TINY["text_encoder"]},
    }


def recipe(kind: str, size: tuple[int, int, int], out: Path, tiny: bool, **keys):
    """The shipped recipe at ``size`` with ``keys`` overriding it (parsed as ``train`` parses it)."""
    import yaml

    from align.training import load_train_config

    options = yaml.safe_load(RECIPES[kind].read_text())["model_options"]
    options.update(num_frames=size[0], height=size[1], width=size[2], gradient_checkpointing=True)
    if tiny:
        options["max_sequence_length"] = 16
    base = {"output_dir": str(out), "checkpointing_steps": 0, "progress": False, "model_options": options}
    return load_train_config(RECIPES[kind], {**base, **keys})


def build(cfg, device: str, tiny: bool):
    """The ``WanVideoModel`` around the published transformer with random bf16 weights on
    ``device`` (seed 0) and the tiny parts, frozen, with the recipe's size and checkpointing."""
    from align.plan import load_architecture

    torch.manual_seed(0)
    arch = load_architecture(CHECKPOINT, cfg.model_options, torch.bfloat16, overrides(tiny), device=device)
    pipe = arch.model.pipe
    length = cfg.model_options.get("max_sequence_length", 512)
    pipe.register_modules(text_encoder=arch.text_encoders["text_encoder"], tokenizer=tokenizer(length))
    keys = ("num_frames", "height", "width", "max_sequence_length", "gradient_checkpointing", "timestep_sampling")
    model = type(arch.model)(pipe, **{k: cfg.model_options[k] for k in keys if k in cfg.model_options})
    return model.requires_grad_(False).eval()


def planned(cfg, tiny: bool):
    """The planner's plan of ``cfg`` with the same parts as :func:`build` (meta device)."""
    from align.plan import Setup, load_architecture, make_plan

    arch = load_architecture(CHECKPOINT, cfg.model_options, torch.bfloat16, overrides(tiny))
    return make_plan(cfg, Setup(), "bench/gpu.py", arch=arch)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / GiB if device.startswith("cuda") else None


def card(device: str) -> str | None:
    """``"H100"`` / ``"H200"`` (the planner's cards) for such a GPU, else None."""
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name()
    return next((c for c in ("H200", "H100") if c in name), None)


def pair(measured: float | None, plan: float) -> dict:
    """A figure beside the planner's, and their ratio (4 significant digits)."""

    def sig(x: float | None) -> float | None:
        return None if x is None else float(f"{x:.4g}")

    return {
        "measured": sig(measured),
        "planned": sig(plan),
        "measured_over_planned": None if measured is None or not plan else sig(measured / plan),
    }


def dpo_bench(args, device: str, out: Path) -> dict:
    """The DPO figures (module docstring)."""
    from align.models.lora import attach_lora, lora_parameters
    from align.plan import GB, MFU, PEAK_FLOPS
    from align.training.dpo import dpo_step_losses

    quick = {"gradient_accumulation_steps": 1} if args.tiny else {}
    cfg = recipe("dpo", args.size, out, args.tiny, dataset="unused", latent_cache_dir=None, **quick)
    plan, model = planned(cfg, args.tiny), build(cfg, device, args.tiny)
    attach_lora(model.denoiser, cfg.lora_rank, cfg.lora_alpha, 0.0, cfg.lora_targets)
    model.denoiser.train()
    params = list(lora_parameters(model.denoiser))
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate)
    g = torch.Generator().manual_seed(0)
    shape = model.latent_shape
    with torch.no_grad():
        cond = model.encode_prompts(PROMPTS[:1])
    batch = (torch.randn(1, *shape, generator=g).to(device), torch.randn(1, *shape, generator=g).to(device), cond)
    accumulation = cfg.accumulation_steps

    def optimizer_step() -> None:
        for _ in range(accumulation):
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
                loss = dpo_step_losses(model, model.denoiser, model.denoiser, batch, cfg.beta, cfg.loss_type, g)
            (loss["loss"] / accumulation).backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)

    optimizer_step()  # warm-up: kernels chosen, AdamW's state created
    reset_peak(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        optimizer_step()
    sync(device)
    step_s = (time.perf_counter() - t0) / args.steps
    which = card(device) or "H100"
    times, mem = plan.times(which), plan.memory
    mfu = plan.flops["optimizer_step"] / (step_s * PEAK_FLOPS[which]) if card(device) else None
    return {
        "micro_batch_pairs": cfg.train_batch_size,
        "gradient_accumulation_steps": accumulation,
        "micro_step_s": pair(step_s / accumulation, times["micro_step"]),
        "optimizer_step_s": pair(step_s, times["optimizer_step"]),
        "peak_gib": pair(peak_gib(device), mem["peak"] / GB),
        "mfu": pair(mfu, MFU),
        "planned_card": which,
        "tokens_per_video": plan.tokens,
    }


class Brightness:
    """A judge: the mean pixel value (GRPO needs a score per video, not a good one)."""

    name = "brightness"

    def score(self, videos: np.ndarray, prompts: list[str]) -> np.ndarray:
        return videos.reshape(len(videos), -1).mean(1).astype(np.float64)


def grpo_bench(args, device: str, out: Path) -> dict:
    """The GRPO figures (module docstring): the real trainer, the loader and the judges replaced."""
    import align.judges
    import align.training.core
    from align.plan import GB, MFU, PEAK_FLOPS
    from align.training import train

    out.mkdir(parents=True, exist_ok=True)
    prompts = out / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    quick = {"sample_steps": 2, "train_timestep_fraction": 0.5} if args.tiny else {}
    keys = dict(prompts_file=str(prompts), judges=["brightness"], **GRPO_ROUND, **quick)
    cfg = recipe("grpo", args.size, out, args.tiny, **keys)
    steps_per_round = cfg.inner_epochs * cfg.rollouts_per_round * cfg.trained_steps // cfg.accumulation_steps
    cfg.max_steps = 2 * steps_per_round
    plan = planned(cfg, args.tiny)
    loaders = (align.training.core.load_model, align.judges.load_judges)
    align.training.core.load_model = lambda path, device=device, **options: build(cfg, str(device), args.tiny)
    align.judges.load_judges = lambda specs, device=None: [Brightness() for _ in specs]
    resident = torch.cuda.memory_allocated() / GiB if device.startswith("cuda") else None
    try:
        reset_peak(device)
        run = train(cfg)
    finally:
        align.training.core.load_model, align.judges.load_judges = loaders
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    second = [r for r in rows if r["step"] > steps_per_round]
    round_s = sum(r["step_time_s"] for r in second)
    which = card(device) or "H100"
    times = plan.times(which)
    mfu = plan.flops["round"] / (round_s * PEAK_FLOPS[which]) if card(device) else None
    return {
        "round": {**GRPO_ROUND, "sample_steps": cfg.sample_steps, "trained_steps": cfg.trained_steps},
        "optimizer_steps_per_round": steps_per_round,
        "allocated_before_gib": resident,  # left over from the DPO part (should be ~0)
        "round_s": pair(round_s, times["round"]),
        "rollout_s": pair(second[0]["rollout_s"], times["sampling"]),
        "peak_gib": pair(peak_gib(device), plan.memory["peak"] / GB),
        "mfu": pair(mfu, MFU),
        "planned_card": which,
    }


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="a tiny transformer at 5x32x32 (checks the script on a CPU)")
    p.add_argument("--size", default=None, help="FRAMESxHEIGHTxWIDTH (default 33x480x832; --tiny 5x32x32)")
    p.add_argument("--steps", type=int, default=2, help="timed DPO optimizer steps after one of warm-up")
    p.add_argument("--only", choices=("dpo", "grpo"), default=None, help="run one of the two")
    p.add_argument("--out", default=str(ROOT / "bench" / "gpu.json"))
    args = p.parse_args(argv)
    args.size = tuple(int(x) for x in (args.size or ("5x32x32" if args.tiny else "33x480x832")).split("x"))
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    device = args.device
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else f"cpu ({platform.processor()})",
        "torch": torch.__version__,
        "architecture": CHECKPOINT + (" (--tiny: 2 blocks, width 32)" if args.tiny else " (published config)"),
        "video": "x".join(map(str, args.size)),
        "dtype": "bfloat16 weights, bf16 autocast, LoRA float32, gradient checkpointing",
    }
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for kind, bench in (("dpo", dpo_bench), ("grpo", grpo_bench)):
            if args.only in (None, kind):
                result[kind] = bench(args, device, Path(tmp) / kind)
                gc.collect()  # the model of the previous part is gone before the next one is built
                if device.startswith("cuda"):
                    torch.cuda.empty_cache()
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
