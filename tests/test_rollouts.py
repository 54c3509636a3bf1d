"""The online round shared by online RWR and GRPO (align/training/rollouts.py), prompt files
(align/data/prompts.py), and derived gradient accumulation."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from align.data.prompts import read_prompts
from align.training import rollouts


def test_read_prompts(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text(" a cat \na dog\n")
    assert read_prompts(f) == ["a cat", "a dog"]
    f.write_text("a cat\n\na dog\n")
    with pytest.raises(ValueError, match="line 2 is empty"):
        read_prompts(f)
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_prompts(tmp_path / "nope.txt")


def test_draw_prompts_is_a_seeded_permutation_repeated_when_short():
    g = torch.Generator().manual_seed(3)
    want = torch.randperm(5, generator=torch.Generator().manual_seed(3))[:3].tolist()
    assert rollouts.draw_prompts(5, 3, g) == want  # a round smaller than the file: one permutation
    long = rollouts.draw_prompts(5, 12, torch.Generator().manual_seed(3))
    assert len(long) == 12 and sorted(long[:5]) == sorted(long[5:10]) == list(range(5))


def test_shares_cover_the_round_once():
    n = 12
    for world in (1, 2, 3, 4):
        parts = [rollouts.share(n, world, r) for r in range(world)]
        assert sorted(i for p in parts for i in p) == list(range(n))
    assert rollouts.share(5, 2, 1) == list(range(5))  # uneven: every process samples the round
    assert rollouts.local_columns(8, 4, 2, 1) == [2, 3, 6, 7]


def test_gather_rows_on_one_process_puts_rows_in_rollout_order():
    run = SimpleNamespace(world=1)
    rows = torch.tensor([[1.0, 1.0], [3.0, 3.0]])
    out = rollouts.gather_rows(run, [2, 0], rows, 3)
    assert torch.equal(out, torch.tensor([[3.0, 3.0], [0.0, 0.0], [1.0, 1.0]]))


class _Judge:
    def __init__(self, name, fn):
        self.name, self.fn = name, fn

    def score(self, videos, prompts):
        return np.array([self.fn(int(v[0, 0, 0, 0]), p) for v, p in zip(videos, prompts)], dtype=np.float64)


def _round(judges, weights=None, eval_judges=()):
    """A round of 2 prompts x 2 seeds on a fake model: the 'video' of seed s is filled with s."""
    run = SimpleNamespace(world=1, model=SimpleNamespace(denoiser=torch.nn.Linear(1, 1)))
    modes = []

    def sample(prompts, seeds):
        modes.append(run.model.denoiser.training)
        return {"videos": np.stack([np.full((1, 2, 2, 3), s, np.uint8) for s in seeds]), "kept": list(seeds)}

    spec = rollouts.Rollouts(sample, judges, [0, 1, 2, 3], 2, weights, eval_judges)
    rnd = rollouts.play_round(run, spec, 7, ["a", "a", "b", "b"], [1, 2, 3, 5])
    assert modes == [False] and run.model.denoiser.training  # sampled in eval mode, back to train
    return rnd, spec


def test_play_round_scores_gathers_and_combines():
    seed = _Judge("seed", lambda s, p: float(s))
    rnd, spec = _round([seed])
    assert rnd.samples["kept"] == [1, 2, 3, 5] and rnd.groups.tolist() == [0, 0, 1, 1]
    np.testing.assert_array_equal(rnd.scores, [[1.0, 2.0, 3.0, 5.0]])
    np.testing.assert_array_equal(rnd.reward, [1.0, 2.0, 3.0, 5.0])  # one judge: raw
    stats = rollouts.reward_stats(rnd, spec)
    assert stats == {"round": 7, "reward_mean": 2.75, "reward_std": pytest.approx(np.std([1, 2, 3, 5]))}

    neg = _Judge("neg", lambda s, p: -10.0 * s)
    held = _Judge("held", lambda s, p: 1.0)
    rnd, spec = _round([seed, neg], weights=[3.0, 1.0], eval_judges=[held])
    # within each prompt group: seed -> -1, 1; neg -> 1, -1; weighted 3:1
    np.testing.assert_allclose(rnd.reward, [-0.5, 0.5, -0.5, 0.5])
    stats = rollouts.reward_stats(rnd, spec)
    assert stats["reward_mean"] == pytest.approx((3 * 2.75 - 27.5) / 4)
    assert stats["reward/seed"] == 2.75 and stats["reward/neg"] == -27.5 and stats["heldout_mean"] == 1.0


def test_a_failing_judge_stops_the_round_naming_it_and_the_rollouts(monkeypatch):
    """A judge that raises, or answers a NaN, stops the round with an error that names the round,
    the judge, the rollouts and the prompt -- never a silent 0 -- held-out judges included."""
    from align.judges import JudgeError

    def boom(s, p):
        raise RuntimeError("CUDA out of memory")

    seed = _Judge("seed", lambda s, p: float(s))
    with pytest.raises(JudgeError, match=r"online round 7: judge flaky failed on rollouts 0-3 \(first prompt 'a'\): "):
        _round([seed, _Judge("flaky", boom)])
    with pytest.raises(JudgeError, match=r"RuntimeError: CUDA out of memory") as e:
        _round([seed], eval_judges=[_Judge("flaky", boom)])
    assert isinstance(e.value.__cause__, JudgeError) and isinstance(e.value.__cause__.__cause__, RuntimeError)
    nan = _Judge("nan", lambda s, p: float("nan") if s == 3 else 1.0)  # the video of seed 3 is rollout 2
    with pytest.raises(JudgeError, match=r"online round 7: judge nan gave 1 non-finite score\(s\): nan for rollout 2 "):
        _round([nan])
    # a judge that failed on another process: its rows arrive as NaN, and this process stops too
    real = rollouts.gather_rows

    def from_two_processes(run, local, rows, n):
        out = real(run, local, rows, n)
        out[3] = float("nan")  # rollout 3 belongs to the process whose judge failed
        return out

    monkeypatch.setattr(rollouts, "gather_rows", from_two_processes)
    with pytest.raises(JudgeError, match=r"round 7: judge seed failed on another process, on rollouts \[3\] .*'b'"):
        _round([seed])


def test_mid_round_note(capsys):
    run = SimpleNamespace(ckpt="ckpt-3", micro_step=3, is_main=True)
    rollouts.mid_round_note(run, 2, "grpo")
    assert "grpo: ckpt-3 is mid-round (micro-step 3, 2 per round)" in capsys.readouterr().out
    rollouts.mid_round_note(SimpleNamespace(ckpt="ckpt-4", micro_step=4, is_main=True), 2, "grpo")
    assert capsys.readouterr().out == ""


def test_sampling_options_of_a_recipe():
    cfg = SimpleNamespace(sample_steps=7, guidance_scale=3.0)
    opts = rollouts.sampling_options(cfg, batch_size=4)
    assert (opts.num_steps, opts.guidance_scale, opts.batch_size, opts.sampler) == (7, 3.0, 4, "vidalign")


# -- derived gradient accumulation ---------------------------------------------------------------


def test_accumulation_is_derived_when_unset():
    from align.training import build_config

    dpo = build_config(model="m", dataset="d")
    assert dpo.gradient_accumulation_steps == 0 and dpo.accumulation_steps == 1  # offline: 1
    assert build_config(model="m", dataset="d", gradient_accumulation_steps=4).accumulation_steps == 4
    online = build_config(model="m", objective="rwr", online=True, judges=["reward:r"], prompts_file="p")
    assert online.accumulation_steps == 1
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        build_config(model="m", dataset="d", gradient_accumulation_steps=-1)


def test_online_rwr_rounds_must_end_on_an_update():
    from align.training import build_config
    from align.training.rwr import check_online_layout

    keys = dict(model="m", objective="rwr", online=True, judges=["reward:r"], prompts_file="p")
    check_online_layout(build_config(**keys, online_steps_per_round=4, gradient_accumulation_steps=2))
    with pytest.raises(ValueError, match="not a multiple of gradient_accumulation_steps 3"):
        check_online_layout(build_config(**keys, online_steps_per_round=4, gradient_accumulation_steps=3))
