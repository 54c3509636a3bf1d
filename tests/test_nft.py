"""DiffusionNFT: the loss against hand-computed values and NVlabs' x0 formula, the reward ->
optimality probability mapping, the old policy's EMA, and the trainer on the tiny model (LoRA
only, 1 vs 2 processes, resume after kill -9, the shipped recipe through the CLI)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import PROMPT, tiny_recipe

from align.objectives import group_advantages, nft_loss, optimality_probability

ROOT = Path(__file__).resolve().parents[1]
LORA = "lora/pytorch_lora_weights.safetensors"
OTHER = "a blue circle moving up on a gray background"
NFT_KEYS = ("loss", "policy_loss", "positive_loss", "negative_loss", "old_deviation", "r_mean", "kl")


# -- the pure functions --------------------------------------------------------------------------


def test_nft_loss_by_hand():
    """One sample of two elements, beta 0.5, x0 scale 0.4, r 0.75, NVlabs' loss scale 5:
    v+ = (0.75, 1.5), e+ = 0.4 (0.75, 0.5): mean e^2 0.065 / mean |e| 0.25 = 0.26;
    v- = (0.25, 0.5), e- = 0.4 (0.25, -0.5): 0.025 / 0.15; (0.75 x 0.26 + 0.25 x 0.1667) / 0.5 x 5."""
    pred, old, target = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.5, 1.0]]), torch.tensor([[0.0, 1.0]])
    out = nft_loss(pred, old, target, torch.tensor([0.75]), beta=0.5, scale=torch.tensor([0.4]), loss_scale=5.0)
    pos, neg = 0.065 / 0.25, 0.025 / 0.15
    assert out["positive_loss"].item() == pytest.approx(pos, rel=1e-6)
    assert out["negative_loss"].item() == pytest.approx(neg, rel=1e-6)
    assert out["loss"].item() == pytest.approx(5 * (0.75 * pos + 0.25 * neg) / 0.5, rel=1e-6)
    assert out["old_deviation"].item() == pytest.approx((0.25 + 1.0) / 2)
    plain = nft_loss(pred, old, target, torch.tensor([0.75]), beta=0.5, scale=torch.tensor([0.4]), adaptive=False)
    assert plain["loss"].item() == pytest.approx((0.75 * 0.065 + 0.25 * 0.025) / 0.5, rel=1e-6)
    kl = nft_loss(pred, old, target, torch.tensor([0.75]), 0.5, kl=torch.tensor([2.0]), kl_weight=0.1, adaptive=False)
    assert kl["loss"].item() == pytest.approx(plain["loss"].item() / 0.4**2 + 0.2, rel=1e-6)
    # the gradient only flows through the trained prediction
    p = pred.clone().requires_grad_(True)
    o = old.clone().requires_grad_(True)
    nft_loss(p, o, target, torch.tensor([0.75]), 0.5)["loss"].backward()
    assert p.grad.abs().sum() > 0 and o.grad is None


def test_nft_loss_is_nvlabs_x0_formula_for_flow_models():
    """NVlabs computes x0 = x_t - t v for the implicit policies and weights by the detached mean
    |x0 error|; ``scale = t`` on velocity errors is the same loss (and gradient)."""
    g = torch.Generator().manual_seed(0)
    x0, noise, v, v_old = (torch.randn(3, 4, 2, 3, 3, generator=g) for _ in range(4))
    t, r, beta, c = torch.tensor([0.9, 0.5, 0.2]), torch.tensor([0.1, 0.5, 0.95]), 0.3, 5.0
    tt = t.view(-1, 1, 1, 1, 1)
    xt = (1 - tt) * x0 + tt * noise
    v = v.requires_grad_(True)
    terms = []
    for pol in (beta * v + (1 - beta) * v_old, (1 + beta) * v_old - beta * v):
        e = xt - tt * pol - x0
        w = e.detach().double().abs().mean(dim=(1, 2, 3, 4), keepdim=True).clip(min=1e-5)
        terms.append((e**2 / w).mean(dim=(1, 2, 3, 4)))
    ref = ((r * terms[0] / beta + (1 - r) * terms[1] / beta) * c).mean()
    (g_ref,) = torch.autograd.grad(ref, v)
    ours = nft_loss(v, v_old, noise - x0, r, beta, scale=t, loss_scale=c)["loss"]
    (g_ours,) = torch.autograd.grad(ours, v)
    torch.testing.assert_close(ours, ref.float())
    torch.testing.assert_close(g_ours, g_ref)


def test_optimality_probability_maps_clipped_advantages_onto_0_1():
    adv = torch.tensor([-7.0, -5.0, -2.5, 0.0, 1.0, 5.0, 9.0])
    want = torch.tensor([0.0, 0.0, 0.25, 0.5, 0.6, 1.0, 1.0])
    torch.testing.assert_close(optimality_probability(adv, 5.0), want)
    torch.testing.assert_close(optimality_probability(torch.tensor([1.0]), 2.0), torch.tensor([0.75]))
    with pytest.raises(ValueError, match="adv_clip_max"):
        optimality_probability(adv, 0.0)


def test_round_probabilities_by_hand():
    """Rewards (1, 3 | 10, 10): group means 2 and 10; NVlabs' global std of the round
    (population) sqrt(((1-6)^2 + (3-6)^2 + 2 (10-6)^2) / 4) = sqrt(16.5)."""
    from align.training.nft import NFTConfig, probabilities

    cfg = NFTConfig(model="m", prompts_file="p", judges=["oracle"], group_size=2, adv_clip_max=1.0)
    reward, groups = np.array([1.0, 3.0, 10.0, 10.0]), np.array([0, 0, 1, 1])
    a = 1 / (16.5**0.5 + 1e-4)
    want = torch.tensor([0.5 - a / 2, 0.5 + a / 2, 0.5, 0.5])
    torch.testing.assert_close(probabilities(cfg, reward, groups), want)
    cfg.adv_global_std = False  # the group's std: +-1 / (1 + 1e-4), clipped at 1
    got = probabilities(cfg, reward, groups)
    assert got[0].item() == pytest.approx(0.5 - 0.5 / (1 + 1e-4), abs=1e-6) and got[2].item() == 0.5
    torch.testing.assert_close(group_advantages(torch.tensor(reward).float(), torch.tensor(groups))[2:], torch.zeros(2))


def test_old_policy_schedule_swap_and_blend():
    from align.training.nft import NFTConfig, blend_old, old_decay, policy_weights

    one = NFTConfig(model="m", prompts_file="p", judges=["oracle"])  # NVlabs decay_type 1
    assert [old_decay(one, s) for s in (0, 100, 499, 900)] == pytest.approx([0.0, 0.1, 0.499, 0.5])
    two = NFTConfig(model="m", prompts_file="p", judges=["oracle"], old_decay_rate=0.0075, old_decay_flat=75)
    two.old_decay_max = 0.999  # decay_type 2
    assert [old_decay(two, s) for s in (10, 75, 175, 1000)] == pytest.approx([0.0, 0.0, 0.75, 0.999])
    p = [torch.nn.Parameter(torch.tensor([1.0, 2.0])), torch.nn.Parameter(torch.tensor([3.0]))]
    old = [torch.tensor([0.0, 0.0]), torch.tensor([1.0])]
    with policy_weights(p, old):
        assert torch.equal(p[0].detach(), old[0]) and torch.equal(p[1].detach(), old[1])
    assert torch.equal(p[0].detach(), torch.tensor([1.0, 2.0])) and p[1].item() == 3.0
    blend_old(old, p, 0.25)
    torch.testing.assert_close(old[0], torch.tensor([0.75, 1.5]))
    torch.testing.assert_close(old[1], torch.tensor([2.5]))


def test_config_checks_name_the_key():
    from align.training.nft import NFTConfig

    base = dict(model="m", prompts_file="p", judges=["oracle"])
    for bad, key in (
        ({"judges": []}, "judges"),
        ({"group_size": 1}, "group_size"),
        ({"nft_beta": 0.0}, "nft_beta"),
        ({"old_decay_max": 1.0}, "old_decay_max"),
        ({"train_timestep_fraction": 0.0}, "train_timestep_fraction"),
        ({"guidance_scale": 0.5}, "guidance_scale"),
        ({"eval_judges": ["oracle"]}, "eval_judges"),
    ):
        with pytest.raises(ValueError, match=key):
            NFTConfig(**(base | bad))
    assert NFTConfig(**base).trained_steps == 9 and NFTConfig(**base).accumulation_steps == 9  # NVlabs: 9 of 10


def test_online_rounds_plot_and_the_planner_branch(tmp_path):
    """The per-round plot takes the first record of each round; the planner counts NFT's passes:
    one with gradients, the old policy's without (+ the reference's with kl_weight), clean latents only."""
    from align.eval.plots import plot_online_rounds
    from align.plan import _objective
    from align.training.nft import NFTConfig

    recs = [{"step": s, "round": s // 2, "reward_mean": 0.1 * s, "heldout_mean": 1.0} for s in range(1, 6)]
    assert plot_online_rounds(recs, tmp_path / "rounds.png").stat().st_size > 0
    with pytest.raises(ValueError, match="no round records"):
        plot_online_rounds([{"step": 1, "loss": 0.0}], tmp_path / "x.png")
    cfg = NFTConfig(model="m", prompts_file="p", judges=["oracle"], train_batch_size=2, guidance_scale=3.0)
    obj = _objective(cfg)
    assert (obj["videos"], obj["reference"], obj["guided"], obj["trajectory"]) == (2, 2, 2, False)
    assert obj["rollouts_per_micro_step"] == 2 and obj["micro_steps_per_rollout"] == 9
    cfg.kl_weight = 0.1
    assert _objective(cfg)["reference"] == 4


# -- the trainer on the tiny model ---------------------------------------------------------------


@pytest.fixture(scope="module")
def nft_world(tmp_path_factory):
    """Two fresh tiny reward models (train judge, held-out judge) and a two-prompt file."""
    from reward_models.model import RewardModelConfig, VideoRewardModel

    tmp = tmp_path_factory.mktemp("nft")
    for s in (0, 1):
        torch.manual_seed(s)
        VideoRewardModel(RewardModelConfig(pooling="mean")).save_pretrained(tmp / f"rm{s}")
    (tmp / "prompts.txt").write_text(f"{PROMPT}\n{OTHER}\n")
    return tmp


def nft_recipe(model_dir, world, out, **kw) -> dict:
    """Rounds of 2 prompts x 2 rollouts of 3 sampler steps, 2 timesteps trained each, 2 rollouts
    per micro-step: 4 micro-steps, 2 updates per round; an old policy that moves (decay 0.25/step)."""
    keys = dict(
        objective="nft",
        prompts_file=str(world / "prompts.txt"),
        judges=[f"reward:{world / 'rm0'}"],
        eval_judges=[f"reward:{world / 'rm1'}"],
        group_size=2,
        prompts_per_round=2,
        sample_steps=3,
        train_timestep_fraction=0.67,
        nft_beta=0.5,
        kl_weight=0.1,
        old_decay_rate=0.25,
        train_batch_size=2,
        max_steps=4,
    )
    return tiny_recipe(model_dir, out, **(keys | kw))


def _rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


_KILLER = """
import json, os, signal, sys
import align.training.nft as N
from align.training import build_config, train
cfg = build_config(**json.loads(sys.argv[1]))
at, calls, orig = int(sys.argv[2]), [0], N.nft_step_losses
def step(*a, **k):
    calls[0] += 1
    if calls[0] == at:
        os.kill(os.getpid(), signal.SIGKILL)
    return orig(*a, **k)
N.nft_step_losses = step
train(cfg)
"""


@pytest.mark.integration
def test_nft_trains_lora_only_and_resumes_after_kill_9(tiny_model_dir, nft_world, tmp_path, monkeypatch):
    """2 rounds with a checkpoint on the round boundary; the run killed inside round 1 and
    resumed ends bit-identical (the old policy comes back from the checkpoint)."""
    from safetensors.torch import load_file

    from align.models import load_model
    from align.training import build_config, core, train

    runs, start = [], core.start
    monkeypatch.setattr(core, "start", lambda cfg, **k: runs.append(start(cfg, **k)) or runs[-1])
    kw = dict(max_steps=4, checkpointing_steps=2)
    full = train(build_config(**nft_recipe(tiny_model_dir, nft_world, tmp_path, name="full", **kw)))
    rows = _rows(full)
    assert [(r["step"], r["round"]) for r in rows] == [(1, 0), (2, 0), (3, 1), (4, 1)]
    assert all(np.isfinite(r[k]) for r in rows for k in (*NFT_KEYS, "reward_mean", "heldout_mean"))
    assert rows[0]["old_deviation"] == 0.0 and rows[0]["kl"] == 0.0  # round 0: old = initial LoRA = base
    assert rows[1]["old_deviation"] > 0 and rows[3]["kl"] > 0  # the policy moved away from both
    assert rows[2]["old_decay"] == 0.5 and (full / "rounds.png").is_file()
    base, trained = load_model(tiny_model_dir).denoiser.state_dict(), runs[0].base
    lora = {n: p for n, p in trained.named_parameters() if "lora_" in n}
    assert lora and any(p.abs().sum() > 0 for n, p in lora.items() if "lora_B" in n)  # B starts at 0
    frozen = {n.replace(".base_layer", ""): p for n, p in trained.named_parameters() if "lora_" not in n}
    assert frozen.keys() == base.keys() and all(torch.equal(p.detach(), base[n]) for n, p in frozen.items())

    recipe = nft_recipe(tiny_model_dir, nft_world, tmp_path, name="cut", **kw)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    args = [sys.executable, "-c", _KILLER, json.dumps(recipe), "6"]  # micro-step 6: inside round 1
    proc = subprocess.run(args, env=env, cwd=ROOT, capture_output=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    cut = tmp_path / "cut"
    assert sorted(p.name for p in cut.glob("checkpoint-*")) == ["checkpoint-2"]
    assert (cut / "checkpoint-2" / "nft_state.pt").is_file()
    resumed = train(build_config(**(recipe | {"resume": "latest"})))
    a, b = load_file(full / LORA), load_file(resumed / LORA)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    keys = ("step", "round", *NFT_KEYS, "reward_mean", "heldout_mean")
    assert [[r[k] for k in keys] for r in rows] == [[r[k] for k in keys] for r in _rows(resumed)]


@pytest.mark.integration
def test_nft_two_processes_match_one(tiny_model_dir, nft_world, tmp_path):
    """2 DDP processes (gloo), one rollout per micro-step each, match 1 process with two: round 0's
    metrics (the same old policy) within 1e-5; round 1 samples policies that differ by float
    rounding. The LoRA agrees to 1e-4 after round 0: its first gradient is a near-cancellation
    (the old policy is the trained one, so the r and 1 - r terms cancel up to 2r - 1; norm ~1e-4),
    whose rounding differences of the two reduction orders Adam's normalisation turns into ~3e-5."""
    import yaml
    from safetensors.torch import load_file

    from align.launch import cpu_launch
    from align.training import build_config, train

    recipe = nft_recipe(tiny_model_dir, nft_world, tmp_path, effective_batch_size=4, checkpointing_steps=2)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    one = train(build_config(**recipe, name="one"))
    proc = cpu_launch("ddp", 2, tmp_path / "recipe.yaml", "--name", "two", timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    two = tmp_path / "two"
    assert json.loads((two / "summary.json").read_text())["micro_batch_size"] == 1
    ref, got = _rows(one), _rows(two)
    keys = (*NFT_KEYS, "reward_mean", "heldout_mean")
    diffs = {k: max(abs(a[k] - b[k]) for a, b in zip(ref[:2], got[:2])) for k in keys}
    assert [r["step"] for r in got] == [1, 2, 3, 4] and all(d <= 1e-5 for d in diffs.values()), diffs
    later = {k: max(abs(a[k] - b[k]) for a, b in zip(ref[2:], got[2:])) for k in keys}
    assert max(later.values()) <= 1e-3, later
    for path, tol in ((f"checkpoint-2/{LORA}", 1e-4), (LORA, 1e-3)):
        a, b = load_file(one / path), load_file(two / path)
        assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=tol, rtol=0) for k in a), path


@pytest.mark.integration
def test_the_shipped_nft_recipe_runs_through_the_cli(nft_world, tmp_path):
    """``vidalign train recipes/tiny_sora_nft.yaml --max_steps 3`` (the shipped generator and
    reward backbone) runs and logs NFT's terms."""
    from align.cli import main

    args = ["train", str(ROOT / "recipes/tiny_sora_nft.yaml"), "--max_steps", "3", "--progress", "false"]
    assert main([*args, "--prompts_file", str(nft_world / "prompts.txt"), "--output_dir", str(tmp_path)]) == 0
    rows = _rows(tmp_path / "tiny_sora_nft")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(k in r and np.isfinite(r[k]) for r in rows for k in (*NFT_KEYS, "reward_mean"))
