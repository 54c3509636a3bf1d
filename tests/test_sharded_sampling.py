"""Sampling and judging on N processes (``align.distributed``): under ``accelerate launch`` the
(prompt, seed) list is sharded by index, each process writes its videos and its shard of the
index, and the merged index equals a 1-process run's; judges score in shards, gathered before
the win rates. A run killed part-way resumes with another process count. The 2-machine launch
(2 x 1 process on 127.0.0.1) writes the same index too.

Frames are compared through GIF (H.264 is not deterministic here, docs/experiments.md), with
one video per sampler call (``--batch-size 1``): another batch size moves a few pixels by one
level (float reductions), which a GIF palette can turn into more, with one process as with N.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import PROMPT
from test_generation import FakePipelineModel, _run

import align.generation
from align.cli import main
from align.generation import read_index, read_samples
from align.launch import free_port

ROOT = Path(__file__).resolve().parents[1]
WORLD = [PROMPT, "a blue circle moving up on a gray background", "a green triangle moving right on a navy background"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
ENV["VIDALIGN_DIST_TIMEOUT"] = "120"


def _accelerate(nproc: int, *rest: str, machines: int = 1, rank: int = 0, port: int | None = None) -> list[str]:
    """``accelerate launch`` with ``nproc`` CPU processes over ``machines`` (torchrun through
    ``--multi_gpu``: a machine without GPUs runs it on gloo) of ``python -m align.cli *rest``."""
    flags = ["--num_processes", str(nproc), "--num_machines", str(machines), "--machine_rank", str(rank)]
    flags += ["--main_process_ip", "127.0.0.1", "--main_process_port", str(port or free_port())]
    flags += ["--mixed_precision", "no", "--dynamo_backend", "no"] + (["--multi_gpu"] if nproc > 1 else [])
    return [sys.executable, "-m", "accelerate.commands.launch", *flags, "-m", "align.cli", *rest]


def launch(nproc: int, *cli: str) -> subprocess.CompletedProcess:
    """Run ``vidalign *cli`` on ``nproc`` processes; it must succeed (output captured)."""
    proc = subprocess.run(_accelerate(nproc, *cli), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def generate(model, out: Path, *extra: str) -> list[str]:
    """The ``vidalign generate`` arguments of these tests: 6 GIF videos, 2 steps, one per call."""
    prompts = [a for p in WORLD for a in ("--prompt", p)]
    args = ["generate", "--model", str(model), *prompts, "--num", "2", "--steps", "2", "--batch-size", "1"]
    return [*args, "--format", "gif", "--device", "cpu", "--out", str(out), *extra]


def assert_same_output(got: Path, ref: Path) -> None:
    """The same files and index (byte for byte) as the 1-process run, no shard left, and the
    same decoded frames."""
    assert sorted(p.name for p in got.iterdir()) == sorted(p.name for p in ref.iterdir())
    assert (got / "index.jsonl").read_text() == (ref / "index.jsonl").read_text()
    np.testing.assert_array_equal(read_samples(got)[0], read_samples(ref)[0])


@pytest.fixture(scope="module")
def one_process(tiny_model_dir, tmp_path_factory) -> Path:
    """The 1-process ``generate`` every sharded run is compared with."""
    ref = tmp_path_factory.mktemp("one") / "gen"
    assert main(generate(tiny_model_dir, ref)) == 0
    return ref


# ------------------------------------------------------------------------- one process, no launch


def test_one_process_resumes_the_shards_a_killed_three_process_run_left(tmp_path):
    """The state a 3-process run leaves when killed: shards of the index (one with a torn last
    line, one never written), a video whose row was not written; 1 process samples only the rest."""
    ref = _run(FakePipelineModel(), tmp_path / "ref", video_format="gif")
    out = tmp_path / "out"
    out.mkdir()
    for i in (0, 1, 3, 4):
        shutil.copy(tmp_path / "ref" / ref[i]["file"], out / ref[i]["file"])
    (out / "index-00000-of-00003.jsonl").write_text(json.dumps(ref[0]) + "\n" + json.dumps(ref[3]) + "\n")
    (out / "index-00001-of-00003.jsonl").write_text(json.dumps(ref[1]) + "\n" + json.dumps(ref[4])[:30])
    model = FakePipelineModel()
    rows = _run(model, out, video_format="gif")
    assert sorted(s for c in model.calls for s in c) == [102, 104, 105]  # 4's row was torn: sampled again
    assert rows == ref and read_index(out) == ref and not list(out.glob("index-*"))
    np.testing.assert_array_equal(read_samples(out)[0], read_samples(tmp_path / "ref")[0])
    (out / "index-00001-of-00002.jsonl").write_text(json.dumps(ref[1] | {"steps": 9}) + "\n")
    with pytest.raises(ValueError, match="0001_seed101.gif was sampled with other settings"):
        _run(FakePipelineModel(), out, video_format="gif")


# ------------------------------------------------------------------------------------ N processes


@pytest.mark.integration
def test_a_stuck_process_times_out_and_an_error_on_main_reaches_every_process(tmp_path):
    """Two processes (torchrun's variables, no launcher): shard + gather in order, the main
    process's error raised on both, and a peer that never arrives is a timeout, not a hang."""
    code = textwrap.dedent("""
        import time
        from align import distributed as d
        print(d.gather(d.shard(5), [10 * i for i in d.shard(5)], 5), d.sum_all(1), flush=True)
        try:
            d.on_main(int, "not a number")
        except ValueError as e:
            print("raised", type(e).__name__, flush=True)
        if d.process_index() == 1:
            time.sleep(40)
        t = time.time()
        try:
            d.barrier()
        except RuntimeError:
            print(f"timed out after {time.time() - t:.0f} s", flush=True)
    """)
    env = ENV | {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2"}
    env["VIDALIGN_DIST_TIMEOUT"] = "5"
    procs = [
        subprocess.Popen([sys.executable, "-c", code], env=env | {"RANK": str(r), "LOCAL_RANK": str(r)}, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for r in (0, 1)
    ]  # fmt: skip
    try:
        main_out = procs[0].communicate(timeout=60)[0].splitlines()
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert main_out[:2] == ["[0, 10, 20, 30, 40] 2", "raised ValueError"], main_out
    assert len(main_out) == 3 and main_out[2].startswith("timed out after "), main_out
    assert 4 <= int(main_out[2].split()[3]) <= 30, main_out  # VIDALIGN_DIST_TIMEOUT=5, not the 40 s sleep


@pytest.mark.integration
def test_generate_on_two_processes_matches_one_and_resumes_on_one(tiny_model_dir, one_process, tmp_path, monkeypatch):
    out = tmp_path / "two"
    proc = launch(2, *generate(tiny_model_dir, out))
    bar = proc.stderr.replace("\r", "\n")
    assert "6/6" in bar and "3/3" not in bar  # one bar, the global count, with the rate:
    assert "video/s" in bar or "s/video" in bar  # (tqdm shows s/video below 1 video/s)
    assert proc.stdout.count("wrote 6 videos") == 1 and "on 2 process(es)" in proc.stdout
    assert_same_output(out, one_process)

    # killed part-way: rank 0's shard holds videos 0 and 2, rank 1's holds 1 (3 was written,
    # its row not yet), no merged index; resumed on 1 process
    rows = read_index(out)
    (out / "index.jsonl").unlink()
    (out / "index-00000-of-00002.jsonl").write_text("".join(json.dumps(rows[i]) + "\n" for i in (0, 2)))
    (out / "index-00001-of-00002.jsonl").write_text(json.dumps(rows[1]) + "\n")
    for r in rows[4:]:
        (out / r["file"]).unlink()
    sampled, sample_batch = [], align.generation._sample_batch
    monkeypatch.setattr(
        align.generation, "_sample_batch", lambda m, p, s, *a: sampled.extend(s) or sample_batch(m, p, s, *a)
    )
    assert main(generate(tiny_model_dir, out, "--resume")) == 0
    assert sampled == [3, 4, 5]
    assert_same_output(out, one_process)


@pytest.mark.integration
def test_two_machines_resume_a_one_process_run(tiny_model_dir, one_process, tmp_path):
    """2 machines x 1 process on 127.0.0.1 (two ``accelerate launch --machine_rank r``) resume a
    1-process run stopped after 2 of its 6 videos and write the same index."""
    out = tmp_path / "two_machines"
    shutil.copytree(one_process, out)
    rows = read_index(out)
    (out / "index.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    for r in rows[2:]:
        (out / r["file"]).unlink()
    stamps = [(out / r["file"]).stat().st_mtime_ns for r in rows[:2]]
    port = free_port()
    procs = [
        subprocess.Popen(_accelerate(2, *generate(tiny_model_dir, out, "--resume"), machines=2, rank=r, port=port),
                         cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for r in (0, 1)
    ]  # fmt: skip
    try:
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:  # timed out: stop the launchers
                p.kill()
    for p, (o, e) in zip(procs, outs):
        assert p.returncode == 0, o[-3000:] + e[-5000:]
    assert "wrote 6 videos" in outs[0][0] and "wrote" not in outs[1][0]  # one process reports
    assert [(out / r["file"]).stat().st_mtime_ns for r in rows[:2]] == stamps
    assert_same_output(out, one_process)


@pytest.fixture(scope="module")
def eval_assets(tiny_model_dir, tmp_path_factory):
    import torch
    from test_eval import _lora

    from reward_models.model import RewardModelConfig, VideoRewardModel

    root = tmp_path_factory.mktemp("eval_assets")
    torch.manual_seed(0)
    VideoRewardModel(RewardModelConfig(num_frames=2)).save_pretrained(root / "rm")
    return {"lora": _lora(tiny_model_dir, root / "lora", 1), "rm": root / "rm"}


@pytest.mark.integration
def test_eval_on_two_processes_gives_the_win_rates_of_one(tiny_model_dir, eval_assets, tmp_path, monkeypatch):
    """Both models sampled in shards (the same index as 1 process) and judged in shards: the
    per-judge win rates equal a 1-process eval's of the same videos. (Two runs' mp4 files may
    decode a few levels apart, H.264 here is not deterministic, so fresh 1- and 2-process
    evals may differ where a score gap is that small; they agreed when this was written.)"""
    prompts = [a for p in WORLD for a in ("--prompt", p)]
    judges = ["--judge", "oracle", "--judge", f"reward:{eval_assets['rm']}"]
    args = ["eval", "--model", str(tiny_model_dir), "--lora", str(eval_assets["lora"]), *prompts, *judges]
    args += ["--seeds-per-prompt", "2", "--steps", "2", "--batch-size", "1", "--device", "cpu"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    stdout = launch(2, *args, "--out", str(tmp_path / "two")).stdout
    for side in ("base", "aligned"):
        d1, d2 = tmp_path / "one" / "samples" / side, tmp_path / "two" / "samples" / side
        assert (d1 / "index.jsonl").read_text() == (d2 / "index.jsonl").read_text()
        assert sorted(p.name for p in d1.iterdir()) == sorted(p.name for p in d2.iterdir())

    shutil.copytree(tmp_path / "two" / "samples", tmp_path / "rejudged" / "samples")  # 1 process, same videos
    monkeypatch.setattr(align.generation, "_sample_batch", lambda *a: pytest.fail("sampled again"))
    assert main([*args, "--out", str(tmp_path / "rejudged")]) == 0
    two, ref = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("two", "rejudged"))
    assert set(two["winrate"]) == {"oracle", f"reward:{eval_assets['rm']}"}
    for name, wr in ref["winrate"].items():
        got = two["winrate"][name]
        assert {k: v for k, v in got.items() if k != "mean_score"} == {k: v for k, v in wr.items() if k != "mean_score"}
        for side in ("base", "aligned"):
            assert got["mean_score"][side] == pytest.approx(wr["mean_score"][side], abs=1e-6), name
    assert two["winrate"]["oracle"]["n"] == 6 and two["agreement"] == ref["agreement"]
    printed = json.loads(stdout.strip().splitlines()[-1])  # once, by the main process
    assert printed == {k: {f: wr[f] for f in ("rate", "ci95", "n", "ties")} for k, wr in two["winrate"].items()}
    assert stdout.count("report: ") == 1
    one = json.loads((tmp_path / "one" / "report.json").read_text())
    print({k: (one["winrate"][k]["rate"], wr["rate"]) for k, wr in two["winrate"].items()})  # 1 vs 2 processes


@pytest.mark.integration
def test_data_pairs_on_two_processes_labels_as_one_process_does(tiny_model_dir, tmp_path, monkeypatch):
    """``data pairs`` on 2 processes (sampled and judged in shards, the main process writes the
    dataset) gives the pairs 1 process gives when it judges the same videos."""
    import datasets

    prompts = [a for p in WORLD for a in ("--prompt", p)]
    args = ["data", "pairs", "--model", str(tiny_model_dir), *prompts, "--judge", "oracle", "--rounds", "1"]
    args += ["--samples-per-prompt", "3", "--steps", "2", "--batch-size", "1", "--device", "cpu"]
    stdout = launch(2, *args, "--out", str(tmp_path / "two")).stdout
    assert stdout.count("wrote 3 pairs") == 1
    shutil.copytree(tmp_path / "two" / "videos", tmp_path / "one" / "videos")
    monkeypatch.setattr(align.generation, "_sample_batch", lambda *a: pytest.fail("sampled again"))
    assert main([*args, "--out", str(tmp_path / "one"), "--resume"]) == 0
    two, one = (datasets.load_from_disk(str(tmp_path / d)) for d in ("two", "one"))
    assert two.to_dict() == one.to_dict() and len(two) == 3
