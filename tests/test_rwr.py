"""Reward-weighted regression through the trainer: offline on scored samples, and online
with a reward model in the loop. LoRA trains; the base stays bit-identical."""

import json

import numpy as np
import pytest
import torch
from conftest import PROMPT, tiny_recipe
from safetensors.torch import load_file

from align.cli import main
from align.data.samples import load_scored_samples, scored_samples_dataset
from align.training import build_config, train
from reward_models.model import RewardModelConfig, VideoRewardModel


def _samples(tmp_path, n=8, bad=None):
    rng = np.random.default_rng(0)
    videos = rng.integers(0, 256, (n, 8, 32, 32, 3), dtype=np.uint8)
    rewards = rng.normal(size=n)
    if bad is not None:
        rewards[bad] = np.nan
    ds = scored_samples_dataset([PROMPT] * n, videos, rewards, [i // 4 for i in range(n)])
    ds.save_to_disk(str(tmp_path / "samples"))
    return str(tmp_path / "samples")


def _cfg(model_dir, out, **kw):
    base = dict(name="rwr", objective="rwr", max_steps=3, train_batch_size=4, rwr_temperature=1.0, rwr_max_weight=0.5)
    return build_config(**tiny_recipe(model_dir, out, **(base | kw)))


def test_offline_rwr_trains_lora_only(tiny_model_dir, tmp_path):
    data = _samples(tmp_path)
    before = load_file(tiny_model_dir / "denoiser.safetensors")
    run = train(_cfg(tiny_model_dir, tmp_path, dataset=data))
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3]
    assert {"loss", "weighted_err", "mean_err", "ess"} <= set(lines[0])
    assert all(1.0 <= r["ess"] <= 4.0 + 1e-6 for r in lines)
    lora = load_file(run / "lora" / "pytorch_lora_weights.safetensors")
    assert any(v.abs().max() > 0 for k, v in lora.items() if "lora_B" in k)
    after = load_file(tiny_model_dir / "denoiser.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert json.loads((run / "summary.json").read_text())["groups"] == 2
    again = train(_cfg(tiny_model_dir, tmp_path, dataset=data, max_steps=2))  # same name, no checkpoint: starts over
    assert [json.loads(x)["step"] for x in (again / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_scored_samples_bad_rows_are_named(tmp_path):
    data = _samples(tmp_path, bad=3)
    with pytest.raises(ValueError, match="row 3: reward"):
        load_scored_samples(data)
    s = load_scored_samples(data, bad_rows="skip")
    assert len(s.prompts) == 7 and s.skipped == {"bad_row": 1}


def _online(tmp_path) -> dict:
    """Recipe keys of a tiny online RWR run: a fresh reward model and two prompts in tmp_path,
    rounds of 2 prompts x 2 samples, 2 steps per round."""
    torch.manual_seed(0)
    VideoRewardModel(RewardModelConfig(pooling="mean")).save_pretrained(tmp_path / "rm")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{PROMPT}\na blue circle moving up on a gray background\n")
    return dict(
        online=True,
        reward_model=str(tmp_path / "rm"),
        prompts_file=str(prompts),
        online_prompts_per_round=2,
        online_samples_per_prompt=2,
        online_steps_per_round=2,
        max_steps=4,
        sample_steps=2,
    )


def test_online_rwr_with_a_reward_model(tiny_model_dir, tmp_path):
    run = train(_cfg(tiny_model_dir, tmp_path, name="online", **_online(tmp_path)))
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in lines] == [0, 0, 1, 1]  # a fresh round of samples every 2 steps
    assert all(np.isfinite(r["reward_mean"]) for r in lines)
    with pytest.raises(ValueError, match="reward_model"):
        train(_cfg(tiny_model_dir, tmp_path, name="x", online=True))


def test_online_rwr_resumes(tiny_model_dir, tmp_path, capsys):
    """Stopped on a round boundary and resumed: bit-identical to an uninterrupted run (the
    next round samples the restored policy with the same prompts and seeds). Resumed
    mid-round: the round is sampled again, and the run finishes with a note saying so."""
    kw = _online(tmp_path) | dict(
        train_batch_size=2,
        lora_dropout=0.1,  # the torch RNG state matters too
        checkpointing_steps=2,
    )
    full = train(_cfg(tiny_model_dir, tmp_path, name="full", **kw))
    cut = train(_cfg(tiny_model_dir, tmp_path, name="cut", **(kw | {"max_steps": 2})))
    resumed = train(_cfg(tiny_model_dir, tmp_path, name="cut", resume="latest", **kw))
    assert resumed == cut and (cut / "checkpoint-4").is_dir()
    a, b = (load_file(r / "lora" / "pytorch_lora_weights.safetensors") for r in (full, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit-identical
    rows = [[json.loads(x) for x in (r / "metrics.jsonl").read_text().splitlines()] for r in (full, resumed)]
    keys = ("step", "round", "loss", "reward_mean")
    assert [[r[k] for k in keys] for r in rows[0]] == [[r[k] for k in keys] for r in rows[1]]
    assert [r["round"] for r in rows[1]] == [0, 0, 1, 1]

    # a checkpoint at step 3, inside round 1: resuming redraws round 1 and runs its last step
    mid = train(_cfg(tiny_model_dir, tmp_path, name="mid", **(kw | {"max_steps": 3, "checkpointing_steps": 3})))
    capsys.readouterr()
    train(_cfg(tiny_model_dir, tmp_path, name="mid", resume="latest", **(kw | {"checkpointing_steps": 3})))
    assert "is mid-round" in capsys.readouterr().out
    lines = [json.loads(x) for x in (mid / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["round"]) for r in lines] == [(1, 0), (2, 0), (3, 1), (4, 1)]
    assert [[r[k] for k in keys] for r in lines[:3]] == [[r[k] for k in keys] for r in rows[0][:3]]


def test_rwr_needs_a_dataset_offline(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="dataset"):
        train(_cfg(tiny_model_dir, tmp_path, name="y"))


def test_data_samples_cli(tiny_model_dir, tmp_path):
    torch.manual_seed(0)
    VideoRewardModel(RewardModelConfig(pooling="mean")).save_pretrained(tmp_path / "rm")
    out = tmp_path / "scored"
    assert (
        main(
            [
                "data",
                "samples",
                "--model",
                str(tiny_model_dir),
                "--reward-model",
                str(tmp_path / "rm"),
                "--prompt",
                PROMPT,
                "--samples-per-prompt",
                "3",
                "--steps",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    s = load_scored_samples(str(out))
    assert len(s.prompts) == 3 and s.groups.tolist() == [0, 0, 0] and np.isfinite(s.rewards).all()


def test_sample_groups_rejects_a_bad_judge(tiny_model_dir):
    from align.demo.run import sample_groups
    from align.models import load_model

    model = load_model(tiny_model_dir)
    with pytest.raises(ValueError, match="non-finite scores, first for video 1"):
        sample_groups(model, [PROMPT], 2, num_steps=1, progress=False, score=lambda v, p: np.array([0.0, np.nan]))
    with pytest.raises(ValueError, match="returned 1 scores for 2 videos"):
        sample_groups(model, [PROMPT], 2, num_steps=1, progress=False, score=lambda v, p: np.zeros(1))


def _rwr_batch(model, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    lat = torch.randn((n, *model.latent_shape), generator=g)
    cond = model.encode_prompts([PROMPT] * n)
    return lat, cond, torch.full((n,), 1.0 / n)


def _model_batch_uncond(model_dir):
    """The tiny model, a batch ``(latents, cond, weights)`` and the empty prompt's state."""
    from align.models import load_model

    model = load_model(model_dir)
    return model, _rwr_batch(model), model.encode_prompts([""])


def test_rwr_cond_dropout_uses_the_empty_prompt(tiny_model_dir):
    """Dropped rows are conditioned on the empty prompt: dropping all equals an all-empty batch."""
    from align.training.rwr import rwr_step_losses

    model, (lat, cond, w), uncond = _model_batch_uncond(tiny_model_dir)
    with torch.no_grad():
        dropped = rwr_step_losses(
            model, model.denoiser, (lat, cond, w), torch.Generator().manual_seed(3), uncond=uncond, cond_dropout=0.9999
        )
        # the same noise draws, then the dropout draw: replay them with the empty prompt everywhere
        gen = torch.Generator().manual_seed(3)
        all_empty = rwr_step_losses(model, model.denoiser, (lat, uncond.expand_as(cond), w), gen)
        kept = rwr_step_losses(model, model.denoiser, (lat, cond, w), torch.Generator().manual_seed(3))
    assert torch.allclose(dropped["loss"], all_empty["loss"])
    assert not torch.allclose(dropped["loss"], kept["loss"])
    with pytest.raises(ValueError, match="uncond"):
        rwr_step_losses(model, model.denoiser, (lat, cond, w), cond_dropout=0.5)


def test_rwr_kl_term_is_zero_at_the_base_and_grows_with_the_adapter(tiny_model_dir):
    from align.models import load_model
    from align.models.lora import attach_lora, lora_parameters
    from align.training.rwr import rwr_step_losses

    model = load_model(tiny_model_dir)
    attach_lora(model.denoiser, 4, 4.0, 0.0, ["attn.qkv", "attn.proj"])
    batch = _rwr_batch(model)
    plain = rwr_step_losses(model, model.denoiser, batch, torch.Generator().manual_seed(1))
    out = rwr_step_losses(
        model, model.denoiser, batch, torch.Generator().manual_seed(1), base=model.denoiser, kl_weight=2.0
    )
    assert float(out["kl"]) == 0.0  # LoRA B starts at zero: policy == reference
    assert torch.allclose(out["loss"], plain["loss"])
    with torch.no_grad():
        for p in lora_parameters(model.denoiser):
            p.add_(0.05 * torch.randn_like(p))
    out = rwr_step_losses(
        model, model.denoiser, batch, torch.Generator().manual_seed(1), base=model.denoiser, kl_weight=2.0
    )
    plain = rwr_step_losses(model, model.denoiser, batch, torch.Generator().manual_seed(1))
    assert float(out["kl"]) > 0
    assert torch.allclose(out["loss"], plain["loss"] + 2.0 * out["kl"], atol=1e-6)
    out["loss"].backward()  # the KL term has a gradient through the policy only
    assert all(p.grad is not None for p in lora_parameters(model.denoiser))


def test_rwr_guided_loss_fits_the_cfg_prediction(tiny_model_dir):
    """With guidance_scale g the error is that of u + g * (c - u), computed by hand from two
    separate calls on the same noised latents; g = 1 is the plain conditional loss."""
    from align.objectives import per_sample_mse
    from align.training.core import shared_draws
    from align.training.rwr import rwr_step_losses

    model, (lat, cond, w), uncond = _model_batch_uncond(tiny_model_dir)
    with torch.no_grad():
        out = rwr_step_losses(
            model, model.denoiser, (lat, cond, w), torch.Generator().manual_seed(5), uncond=uncond, guidance_scale=3.0
        )
        noise, t = shared_draws(model, lat.shape, torch.Generator().manual_seed(5), (0, 1), lat.device)
        x_t = model.scheduler.add_noise(lat, noise, t)
        c = model.denoiser(x_t, t, cond)
        u = model.denoiser(x_t, t, uncond.expand_as(cond))
        target = model.scheduler.target(lat, noise, t)
        by_hand = (w * per_sample_mse(u + 3.0 * (c - u), target)).sum()
        plain = rwr_step_losses(model, model.denoiser, (lat, cond, w), torch.Generator().manual_seed(5))
        one = rwr_step_losses(
            model, model.denoiser, (lat, cond, w), torch.Generator().manual_seed(5), uncond=uncond, guidance_scale=1.0
        )
    assert torch.allclose(out["loss"], by_hand, rtol=1e-5)
    assert not torch.allclose(out["loss"], plain["loss"])
    assert torch.equal(one["loss"], plain["loss"])
    with pytest.raises(ValueError, match="uncond"):
        rwr_step_losses(model, model.denoiser, (lat, cond, w), guidance_scale=3.0)


def test_rwr_with_kl_and_cond_dropout_through_the_trainer(tiny_model_dir, tmp_path):
    data = _samples(tmp_path)
    run = train(_cfg(tiny_model_dir, tmp_path, dataset=data, rwr_kl_weight=1.0, rwr_cond_dropout=0.25))
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert all("kl" in r and r["kl"] >= 0 for r in lines)
    assert lines[-1]["kl"] > 0  # the adapter moved away from the reference
    with pytest.raises(ValueError, match="rwr_cond_dropout"):
        train(_cfg(tiny_model_dir, tmp_path / "bad", dataset=data, rwr_cond_dropout=1.5))
    with pytest.raises(ValueError, match="rwr_guidance_scale"):
        train(_cfg(tiny_model_dir, tmp_path / "bad", dataset=data, rwr_guidance_scale=0.0))
    guided = train(
        _cfg(tiny_model_dir, tmp_path, name="guided", dataset=data, rwr_kl_weight=1.0, rwr_guidance_scale=4.0)
    )
    lines = [json.loads(x) for x in (guided / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["kl"] > 0 and all(np.isfinite(r["loss"]) for r in lines)


def test_shared_draws_are_the_global_batch_sliced(tiny_model_dir):
    """Each process gets its slice of what one process draws for the global batch."""
    from align.models import load_model
    from align.training.core import shared_draws

    model = load_model(tiny_model_dir)
    shape = (8, *model.latent_shape)
    noise, t = shared_draws(model, shape, torch.Generator().manual_seed(0), (0, 1), "cpu")
    g = torch.Generator().manual_seed(0)
    assert torch.equal(noise, torch.randn(shape, generator=g))
    assert torch.equal(t, model.scheduler.sample_timesteps(8, generator=g, device="cpu"))
    halves = [shared_draws(model, (4, *shape[1:]), torch.Generator().manual_seed(0), (r, 2), "cpu") for r in (0, 1)]
    assert torch.equal(torch.cat([h[0] for h in halves]), noise) and torch.equal(torch.cat([h[1] for h in halves]), t)


@pytest.mark.integration
def test_online_rwr_two_processes_sample_half_each_and_gather_the_round(tiny_model_dir, tmp_path):
    """2 DDP processes each sample and score half of a round (align.training.rollouts) and
    gather the buffer: the round's reward statistics are the 1-process ones, and training runs on
    the gathered latents. (The two processes then train the same micro-batches with their own
    noise, so the updates, and later rounds, differ from one process's.)"""
    import yaml

    from align.launch import cpu_launch

    keys = _online(tmp_path) | dict(name="one", train_batch_size=2, max_steps=2)
    recipe = tiny_recipe(tiny_model_dir, tmp_path, objective="rwr", **keys)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    one = train(build_config(**recipe))
    proc = cpu_launch("ddp", 2, tmp_path / "recipe.yaml", "--name", "two", timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    ref, got = (
        [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()] for d in (one, tmp_path / "two")
    )
    assert [r["step"] for r in got] == [1, 2] and [r["round"] for r in got] == [0, 0]
    for k in ("reward_mean", "reward_std"):
        assert abs(ref[0][k] - got[0][k]) <= 1e-5, (k, ref[0][k], got[0][k])
    assert all(np.isfinite(r["loss"]) for r in got)
