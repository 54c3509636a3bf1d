"""sample_to_disk: videos written as produced, an index, resume after a kill, size checks first."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import PROMPT

from align.generation import read_index, read_samples, sample_to_disk
from align.sample import SamplingOptions

PROMPTS = ["a robot walking on the street in rain", "a cat asleep on a sofa", "fireworks over a harbour"]


class FakePipelineModel:
    """A diffusers-like model: the size rule of Wan (frames = 4k+1, sides multiples of 16), a
    pipeline sampler whose video depends only on its seed, and a kill switch after k videos."""

    has_pipeline_sampler = True

    def __init__(self, fail_after: int | None = None):
        self.num_frames, self.height, self.width = 5, 16, 32
        self.calls: list[list[int]] = []
        self.fail_after = fail_after

    def check_video_size(self, num_frames=None, height=None, width=None):
        f, h, w = num_frames or self.num_frames, height or self.height, width or self.width
        if (f - 1) % 4 or h % 16 or w % 16:
            raise ValueError(f"wan: size {f}x{h}x{w} is invalid: num_frames must be 4k+1, sides multiples of 16")
        return f, h, w

    def set_video_size(self, num_frames=None, height=None, width=None):
        self.num_frames, self.height, self.width = self.check_video_size(num_frames, height, width)

    def generate_videos(self, prompts, seeds, num_steps=50, guidance_scale=5.0, batch_size=1):
        done = sum(len(c) for c in self.calls)
        if self.fail_after is not None and done + len(seeds) > self.fail_after:
            raise KeyboardInterrupt("killed")
        self.calls.append(list(seeds))
        shape = (3, self.num_frames, self.height, self.width)
        return torch.stack([torch.rand(shape, generator=torch.Generator().manual_seed(s)) * 2 - 1 for s in seeds])


def _run(model, out, prompts=PROMPTS * 2, lora=None, resume=True, video_format="mp4", **sampling):
    """``sample_to_disk`` with ``SamplingOptions(**sampling)`` (2 steps, guidance 5 unless given)."""
    options = SamplingOptions(**({"num_steps": 2, "guidance_scale": 5.0} | sampling))
    seeds = list(range(100, 100 + len(prompts)))
    kw = dict(model_name="fake/wan", lora=lora, resume=resume, video_format=video_format, progress=False)
    return sample_to_disk(model, prompts, seeds, out, options, **kw)


def test_writes_an_mp4_per_video_and_the_index(tmp_path):
    model = FakePipelineModel()
    rows = _run(model, tmp_path / "s", num_frames=9, height=32, batch_size=4, lora="runs/x/lora")
    assert model.calls == [[100, 101, 102, 103], [104, 105]] and (model.num_frames, model.height) == (9, 32)
    assert rows == read_index(tmp_path / "s") and len(rows) == 6
    r = rows[4]
    assert r["file"] == "0004_seed104.mp4" and (tmp_path / "s" / r["file"]).stat().st_size > 0
    assert (r["prompt"], r["seed"], r["model"], r["lora"]) == (PROMPTS[1], 104, "fake/wan", "runs/x/lora")
    assert (r["steps"], r["guidance"], r["size"], r["sampler"]) == (2, 5.0, [9, 32, 32], "pipeline")
    videos, got = read_samples(tmp_path / "s")
    assert videos.shape == (6, 9, 32, 32, 3) and videos.dtype == np.uint8 and got == rows
    # batching does not change what is sampled: video i comes from seed i alone (compared as GIFs,
    # whose encoding is exact for these frames; H.264 files of equal frames were seen to differ
    # by a few levels in one block when the whole suite ran)
    for name, batch in (("b4", 4), ("b1", 1)):
        _run(FakePipelineModel(), tmp_path / name, num_frames=9, height=32, batch_size=batch, video_format="gif")
    np.testing.assert_array_equal(read_samples(tmp_path / "b1")[0], read_samples(tmp_path / "b4")[0])


def test_resume_after_a_kill_keeps_finished_videos(tmp_path):
    out = tmp_path / "s"
    with pytest.raises(KeyboardInterrupt):
        _run(FakePipelineModel(fail_after=3), out)
    kept = read_index(out)
    assert [r["seed"] for r in kept] == [100, 101, 102]  # written as produced
    stamps = {r["file"]: (out / r["file"]).stat().st_mtime_ns for r in kept}
    model = FakePipelineModel()
    rows = _run(model, out)
    assert model.calls == [[103], [104], [105]]  # only the missing ones
    assert all((out / f).stat().st_mtime_ns == t for f, t in stamps.items())
    _run(FakePipelineModel(), tmp_path / "fresh")
    np.testing.assert_array_equal(read_samples(out)[0], read_samples(tmp_path / "fresh")[0])
    assert read_index(out) == rows and len(rows) == 6
    # a third run samples nothing; resume=False samples everything again
    model = FakePipelineModel()
    _run(model, out)
    assert model.calls == []
    _run(model, out, resume=False)
    assert len(model.calls) == 6


def test_a_torn_last_index_line_is_dropped(tmp_path):
    out = tmp_path / "s"
    rows = _run(FakePipelineModel(), out)
    text = (out / "index.jsonl").read_text()
    (out / "index.jsonl").write_text(text[: -len(json.dumps(rows[-1])) // 2 - 1])  # killed mid-line
    assert len(read_index(out)) == 5
    model = FakePipelineModel()
    _run(model, out)
    assert model.calls == [[105]]
    (out / "index.jsonl").write_text("{not json\n" + text)
    with pytest.raises(ValueError, match="index.jsonl: line 1 is not JSON"):
        read_index(out)


def test_other_settings_on_disk_are_an_error_not_a_mix(tmp_path):
    out = tmp_path / "s"
    _run(FakePipelineModel(), out)
    with pytest.raises(ValueError, match=r"0000_seed100.mp4 was sampled with other settings \(steps: 2 on disk, 4 now"):
        _run(FakePipelineModel(), out, num_steps=4)
    with pytest.raises(ValueError, match=r"lora: None on disk, 'l' now"):
        _run(FakePipelineModel(), out, lora="l")


def test_a_size_the_model_cannot_take_fails_before_sampling(tmp_path):
    model = FakePipelineModel()
    with pytest.raises(ValueError, match="num_frames must be 4k\\+1"):
        _run(model, tmp_path / "s", num_frames=8)
    assert model.calls == [] and not (tmp_path / "s").exists() and model.num_frames == 5
    for bad, msg in [
        (dict(batch_size=0), "batch_size must be >= 1"),
        (dict(sampler="euler"), "sampler must be one of"),
        (dict(prompts=["ok", " "]), "prompt 1 is empty"),
    ]:
        with pytest.raises(ValueError, match=msg):
            _run(model, tmp_path / "s", **bad)
    assert not (tmp_path / "s").exists()


def test_tiny_sora_samples_with_the_vidalign_sampler(tiny_model_dir, tmp_path):
    from align.generation import default_batch_size, load_generator

    model = load_generator(tiny_model_dir, device="cpu")
    assert default_batch_size(model) == 16
    with pytest.raises(ValueError, match="8x32x32"):
        _run(model, tmp_path / "s", prompts=[PROMPT], num_frames=9)
    rows = _run(model, tmp_path / "s", prompts=[PROMPT, PROMPT], num_steps=1, batch_size=2)
    assert [r["sampler"] for r in rows] == ["vidalign"] * 2 and rows[0]["size"] == [8, 32, 32]
    videos, _ = read_samples(tmp_path / "s")
    assert videos.shape == (2, 8, 32, 32, 3) and not np.array_equal(videos[0], videos[1])


def test_a_wan_pipeline_refuses_frames_that_are_not_4k_plus_1_before_sampling(tmp_path):
    from test_loop import tiny_wan_pipeline

    from align.generation import default_batch_size, load_generator

    tiny_wan_pipeline().save_pretrained(tmp_path / "wan")
    model = load_generator(tmp_path / "wan", device="cpu")
    assert default_batch_size(model) == 1
    with pytest.raises(ValueError, match=r"wan: .*num_frames must be 4k\+1"):
        _run(model, tmp_path / "s", prompts=PROMPTS, num_frames=8, height=16, width=16)
    assert not (tmp_path / "s").exists() and model.num_frames != 8
