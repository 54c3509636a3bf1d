"""Sequence parallel (``sequence_parallel_size``, Ulysses all-to-all attention) on a tiny Wan.

CPU processes over gloo, groups of K = 2 (2 processes: one group; 4: two data-parallel groups),
with DDP around the denoiser as ``vidalign train`` prepares it: the DPO loss and the LoRA
gradient after DDP's averaging equal one process's (K = 1, no split, no checkpointing) within
1e-5, each process ran the blocks on half of the tokens, and the gradient is the whole one, not
1/K of it (the gather's backward sums the group's gradients, see
``align.models.diffusers.sequence_parallel``). The checks that need no
process group: the clear errors."""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from accelerate.state import AcceleratorState

from align.models.diffusers.sequence_parallel import check_heads, enable_sequence_parallel, local_tokens
from align.training import build_config, core
from align.training.dpo import dpo_step_losses

TOL = 1e-5
PAIRS = 2  # the global batch
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory):
    from test_diffusers_models import build_pipeline

    path = tmp_path_factory.mktemp("wan_sp") / "pipe"
    build_pipeline("wan").save_pretrained(path)
    return path


def _config(wan_dir, k: int, out) -> object:
    return build_config(
        objective="dpo", model=str(wan_dir), dataset="unused", output_dir=str(out), name=f"sp{k}",
        model_options={"num_frames": 5, "height": 32, "width": 32},
        lora_rank=4, lora_alpha=4.0, lora_targets=["to_q", "to_k", "to_v", "to_out.0"], beta=50.0,
        sequence_parallel_size=k, gradient_checkpointing=k > 1, effective_batch_size=PAIRS,
        progress=False, checkpointing_steps=0,
    )  # fmt: skip


def _step(wan_dir, k: int, out, per_token_t: bool = False) -> dict:
    """One DPO forward + backward of the global batch's share of this process; the loss averaged
    over processes, the LoRA gradients (after DDP) and this process's token count.
    ``per_token_t``: Wan 2.2 TI2V's one timestep per token (split with the tokens)."""
    cfg = _config(wan_dir, k, out)
    run = core.start(cfg)
    run.model.denoiser.expand_timesteps = per_token_t
    core.prepare(cfg, run)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # B != 0, so the A matrices get a gradient too; the same on every process
        for name, p in sorted(run.base.named_parameters()):
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    shape = run.model.latent_shape
    lat_w, lat_l = torch.randn(PAIRS, *shape, generator=g), torch.randn(PAIRS, *shape, generator=g)
    cond = torch.randn(PAIRS, 6, 32, generator=g)
    part = slice(run.rank * run.micro, (run.rank + 1) * run.micro)
    batch = (lat_w[part], lat_l[part], cond[part])
    noise = torch.Generator().manual_seed(2)
    loss = dpo_step_losses(run.model, run.denoiser, run.base, batch, 50.0, "sigmoid", noise, (run.rank, run.world))
    run.accelerator.backward(loss["loss"])
    grads = {n: p.grad.detach().clone() for n, p in run.base.named_parameters() if p.grad is not None}
    mean = run.accelerator.reduce(loss["loss"].detach().reshape(1), reduction="mean")
    tokens = [m.local_tokens for m in run.sp_modules]
    return {"loss": float(mean), "grads": grads, "tokens": tokens, "micro": run.micro, "world": run.world}


def _worker(rank: int, world: int, k: int, wan_dir, out, port: int, per_token_t: bool) -> None:
    env = dict(RANK=rank, LOCAL_RANK=rank, WORLD_SIZE=world, LOCAL_WORLD_SIZE=world, MASTER_ADDR="127.0.0.1")
    os.environ.update({key: str(v) for key, v in env.items()}, MASTER_PORT=str(port), HF_HUB_OFFLINE="1")
    AcceleratorState._reset_state(reset_partial_state=True)  # forked: the parent's one-process state
    torch.set_num_threads(1)
    result = _step(wan_dir, k, out, per_token_t)
    torch.save(result, out / f"rank{rank}.pt")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def one_process(wan_dir, tmp_path_factory):
    """``per_token_t -> K = 1`` result, computed on first use."""
    cache = {}

    def get(per_token_t: bool) -> dict:
        if per_token_t not in cache:
            cache[per_token_t] = _step(wan_dir, 1, tmp_path_factory.mktemp("sp1"), per_token_t)
        return cache[per_token_t]

    return get


@pytest.mark.parametrize("world, per_token_t", [(2, False), (4, False), (2, True)])
def test_k2_matches_one_process(wan_dir, one_process, tmp_path, world, per_token_t):
    """K = 2 in ``world`` processes: ``world / 2`` data-parallel groups of 2; Wan 2.1's one
    timestep per video, and Wan 2.2 TI2V's one per token."""
    one = one_process(per_token_t)
    assert one["grads"] and one["tokens"] == [] and one["micro"] == PAIRS
    # forked, not spawned: the children need not import torch, diffusers and vidalign again
    args = (world, 2, wan_dir, tmp_path, _free_port(), per_token_t)
    mp.start_processes(_worker, args, nprocs=world, start_method="fork")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]
    tokens = 2 * (4 // 2) * (4 // 2)  # latent 2x4x4, patch 1x2x2
    for got in ranks:
        assert got["world"] == world // 2 and got["micro"] == PAIRS // (world // 2)
        assert got["tokens"] == [tokens // 2]  # each process ran the blocks on half of the tokens
        assert abs(got["loss"] - one["loss"]) < TOL, (got["loss"], one["loss"])
        assert got["grads"].keys() == one["grads"].keys()
        for name, want in one["grads"].items():
            assert want.abs().max() > 1e-6, name  # every LoRA matrix has a gradient to compare
            diff = (got["grads"][name] - want).abs().max()
            assert diff < TOL, (name, float(diff), float(want.abs().max()))


def test_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="does not divide the 3 process"):
        core.sequence_parallel_layout(2, 3, 0)
    with pytest.raises(ValueError, match="supported for objectives dpo, grpo, not 'rwr'"):
        build_config(objective="rwr", model="m", dataset="d", sequence_parallel_size=2)
    with pytest.raises(ValueError, match="`sequence_parallel_size` must be > 0"):
        build_config(objective="dpo", model="m", dataset="d", sequence_parallel_size=0)
    with pytest.raises(ValueError, match="12 attention heads do not divide by it"):
        check_heads(12, 8)
    with pytest.raises(ValueError, match="has 15 tokens .* not divisible by 2"):
        local_tokens((5, 6, 2), (1, 2, 2), 2)
    assert local_tokens((9, 60, 104), (1, 2, 2), 4) == 9 * 30 * 52 // 4

    class NotWan:
        pass

    with pytest.raises(ValueError, match="supported for the wan family .* not for NotWan"):
        enable_sequence_parallel(NotWan(), group=None)


class Brightness:
    """A judge: the mean pixel value."""

    name = "brightness"

    def score(self, videos, prompts):
        return videos.reshape(len(videos), -1).mean(1).astype("float64")


def _grpo(wan_dir, k: int, out) -> None:
    """Two GRPO steps (one round of 2 rollouts) through the trainer; the judge is ``Brightness``."""
    import align.judges
    from align.training import train

    align.judges.load_judges = lambda specs, device=None: [Brightness() for _ in specs]
    (out / "prompts.txt").write_text("a red square moving left\n")
    cfg = build_config(
        objective="grpo", model=str(wan_dir), output_dir=str(out), name=f"grpo{k}",
        prompts_file=str(out / "prompts.txt"), judges=["brightness"],
        model_options={"num_frames": 5, "height": 32, "width": 32}, lora_rank=4, lora_alpha=8.0,
        lora_targets=["to_q", "to_k", "to_v", "to_out.0"], group_size=2, prompts_per_round=1, sample_steps=2,
        train_timestep_fraction=1.0, rollout_batch_size=2, train_batch_size=1, rollout_batches_per_update=1,
        guidance_scale=2.0, max_steps=2, learning_rate=1e-2, sequence_parallel_size=k, progress=False,
        checkpointing_steps=0,
    )  # fmt: skip
    train(cfg)


def _grpo_worker(rank: int, world: int, k: int, wan_dir, out, port: int) -> None:
    env = dict(RANK=rank, LOCAL_RANK=rank, WORLD_SIZE=world, LOCAL_WORLD_SIZE=world, MASTER_ADDR="127.0.0.1")
    os.environ.update({key: str(v) for key, v in env.items()}, MASTER_PORT=str(port), HF_HUB_OFFLINE="1")
    AcceleratorState._reset_state(reset_partial_state=True)
    torch.set_num_threads(1)
    _grpo(wan_dir, k, out)


def test_grpo_k2_matches_one_process(wan_dir, tmp_path, monkeypatch):
    """GRPO: the group samples the same rollouts together (each forward split), scores and trains
    them: the losses and rewards of K = 2 in 2 processes are one process's within 1e-5, the LoRA after
    two AdamW steps of 1e-2 within 1e-4."""
    import json

    from safetensors.torch import load_file

    import align.judges

    monkeypatch.setattr(align.judges, "load_judges", align.judges.load_judges)  # _grpo replaces it
    (tmp_path / "one").mkdir()
    _grpo(wan_dir, 1, tmp_path / "one")
    (tmp_path / "two").mkdir()
    mp.start_processes(_grpo_worker, (2, 2, wan_dir, tmp_path / "two", _free_port()), nprocs=2, start_method="fork")
    runs = [tmp_path / "one" / "grpo1", tmp_path / "two" / "grpo2"]
    rows = [[json.loads(x) for x in (r / "metrics.jsonl").read_text().splitlines()] for r in runs]
    assert [r["step"] for r in rows[1]] == [1, 2]
    for a, b in zip(*rows):
        for key in ("loss", "reward_mean"):
            assert abs(a[key] - b[key]) < TOL, (key, a[key], b[key])
    loras = [load_file(str(r / "lora" / "pytorch_lora_weights.safetensors")) for r in runs]
    assert loras[0].keys() == loras[1].keys()
    # AdamW divides by sqrt(v): where a gradient is ~0 (cross-attention keys), float-order noise moves an
    # element by up to 1e-5 of the 2e-2 the two updates move it (the gradients themselves: the DPO test above)
    for name, want in loras[0].items():
        assert torch.allclose(loras[1][name], want, atol=1e-4, rtol=0), name
