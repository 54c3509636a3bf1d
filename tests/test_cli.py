"""The ``vidalign`` command line: commands end to end, and clear errors (exit 2) before sampling."""

import json
import os
import sys
import types
from pathlib import Path

import pytest
from conftest import PROMPT

from align.cli import main

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
WORLD = [PROMPT, "a blue circle moving up on a gray background"]  # prompts the demo's oracle knows


def test_generate_writes_videos_and_index(tiny_model_dir, tmp_path):
    out = tmp_path / "gen"
    args = ["generate", "--model", str(tiny_model_dir), "--prompt", PROMPT, "--num", "2", "--steps", "2"]
    assert main([*args, "--out", str(out), "--device", "cpu"]) == 0
    index = [json.loads(x) for x in (out / "index.jsonl").read_text().splitlines()]
    assert [r["seed"] for r in index] == [0, 1] and index[0]["file"].endswith(".mp4")
    assert index[0]["model"] == str(tiny_model_dir) and index[0]["size"] == [8, 32, 32]
    assert all((out / r["file"]).stat().st_size > 0 for r in index)
    stamps = [(out / r["file"]).stat().st_mtime_ns for r in index]
    assert main([*args, "--num", "3", "--out", str(out), "--resume"]) == 0  # one more per prompt, two reused
    index = [json.loads(x) for x in (out / "index.jsonl").read_text().splitlines()]
    assert len(index) == 3 and [(out / r["file"]).stat().st_mtime_ns for r in index[:2]] == stamps


def test_data_pairs_train_eval_and_data_samples(tiny_model_dir, tmp_path, capsys):
    from align.data.samples import load_scored_samples

    data = tmp_path / "pairs"
    common = ["--model", str(tiny_model_dir), "--steps", "2", "--device", "cpu"]
    prompts = [a for p in WORLD for a in ("--prompt", p)]
    pairs = ["data", "pairs", *common, "--rounds", "1", "--samples-per-prompt", "2", "--tie-margin", "0"]
    assert main([*pairs, *prompts, "--judge", "oracle", "--out", str(data)]) == 0
    assert "judged by oracle" in capsys.readouterr().out
    assert main(["data", "validate", str(data)]) == 0
    assert sorted(p.name for p in (data / "videos").iterdir())[0] == "0000_seed0.mp4"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {tiny_model_dir}\ndataset: {data}\noutput_dir: {tmp_path}\nname: cli\n")
    assert main(["train", str(recipe), "--max_steps", "2", "--train_batch_size", "2", "--progress", "false"]) == 0
    lora = tmp_path / "cli" / "lora"
    assert (lora / "pytorch_lora_weights.safetensors").is_file()
    capsys.readouterr()
    ev = ["eval", *common, "--lora", str(lora), "--seeds-per-prompt", "3", "--out", str(tmp_path / "eval")]
    assert main([*ev, "--prompt", PROMPT, "--judge", "oracle"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["oracle"]["n"] == 3
    assert json.loads((tmp_path / "eval" / "report.json").read_text())["winrate"]["oracle"]["n"] == 3
    samples = ["data", "samples", *common, "--samples-per-prompt", "2", *prompts, "--out", str(tmp_path / "s")]
    assert main([*samples, "--judge", "oracle"]) == 0
    s = load_scored_samples(str(tmp_path / "s"))
    assert s.videos.shape == (4, 8, 32, 32, 3) and list(s.groups) == [0, 0, 1, 1]


def test_data_validate_exits_nonzero_on_bad_rows(tmp_path, capsys):
    from conftest import make_preference_rows, save_rows

    rows = make_preference_rows(3)
    rows["video_b"][1] = rows["video_a"][1].copy()
    path = save_rows(rows, tmp_path / "d")
    assert main(["data", "validate", path]) == 1
    assert "row 1: video_a and video_b are identical" in capsys.readouterr().out


def test_user_errors_exit_2_with_a_clear_message(tiny_model_dir, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: m\ndataset: d\nbetta: 3\n")
    assert main(["train", str(recipe)]) == 2
    assert "betta" in capsys.readouterr().err
    prompts = tmp_path / "p.txt"
    prompts.write_text(f"{PROMPT}\n\n{PROMPT}\n")
    gen = ["generate", "--model", str(tiny_model_dir), "--out", str(tmp_path / "g")]
    assert main([*gen, "--prompts-file", str(prompts)]) == 2
    assert "line 2 is empty" in capsys.readouterr().err
    prompts.write_text("")
    assert main([*gen, "--prompts-file", str(prompts)]) == 2
    assert "empty" in capsys.readouterr().err
    assert (
        main(["generate", "--model", str(tmp_path / "nowhere"), "--prompt", PROMPT, "--out", str(tmp_path / "g")]) == 2
    )
    assert "nowhere" in capsys.readouterr().err
    assert main([*gen, "--prompt", PROMPT, "--num-frames", "9"]) == 2
    assert "8x32x32" in capsys.readouterr().err
    assert not Path(tmp_path / "g").exists()


@pytest.mark.parametrize("command", [["data", "pairs"], ["data", "samples"], ["eval", "--lora", "L"]])
def test_no_prompts_no_judge_bad_judge_exit_2_before_sampling(tiny_model_dir, tmp_path, capsys, command):
    out = tmp_path / "out"
    args = [*command, "--model", str(tiny_model_dir), "--out", str(out)]
    assert main(args) == 2  # no synthetic-world default prompts
    assert "no prompts given: use --prompt TEXT (repeatable) or --prompts-file FILE" in capsys.readouterr().err
    prompts = tmp_path / "p.txt"
    prompts.write_text("a robot walking on the street in rain\n\na cat\n")
    assert main([*args, "--prompts-file", str(prompts), "--judge", "oracle"]) == 2
    assert "line 2 is empty" in capsys.readouterr().err
    assert main([*args, "--prompt", "a robot walking on the street in rain"]) == 2  # no judge, no oracle default
    assert "judge: --judge reward:DIR" in capsys.readouterr().err
    for judge, msg in [
        ("pickscore", "unknown judge 'pickscore'; a judge is one of: reward:DIR, clip:MODEL[@PRETRAINED], http:URL"),
        (f"reward:{tmp_path}", f"{tmp_path} is not a vidalign reward model"),
        ("oracle", "the oracle knows only the demo's synthetic world"),
    ]:
        assert main([*args, "--prompt", "a robot walking on the street in rain", "--judge", judge]) == 2
        assert msg in capsys.readouterr().err
    assert main([*args, "--reward-model", str(tmp_path / "nowhere"), "--prompt", PROMPT]) == 2  # the alias
    assert "nowhere is not a directory" in capsys.readouterr().err
    assert not out.exists()


def test_eval_human_is_an_ordinary_subcommand(monkeypatch, capsys):
    """``eval human`` parses its own options (none of eval's are required) and calls the library."""
    got = []
    fake = types.ModuleType("align.eval.human")
    fake.run_human_eval = lambda *a: got.append(a) or ({}, Path(a[1]) / "report")
    fake.summary_line = lambda report: "human win rate"
    monkeypatch.setitem(sys.modules, "align.eval.human", fake)
    assert main(["eval", "human", "--db", "labels.sqlite", "--task", "runs/eval/human"]) == 0
    assert got == [("labels.sqlite", "runs/eval/human", None, 0)]
    assert "human win rate; report in runs/eval/human/report/report.md" in capsys.readouterr().out

    def bad(*a):
        raise ValueError("labels.sqlite: no such database")

    fake.run_human_eval = bad
    assert main(["eval", "human", "--db", "labels.sqlite"]) == 2
    assert "vidalign eval human: error: labels.sqlite: no such database" in capsys.readouterr().err


def test_data_pairs_judged_by_a_reward_model(tiny_model_dir, tmp_path, capsys):
    """``data pairs --reward-model`` (= ``--judge reward:DIR``): labels come from the reward
    model's scores of the very video files in each pair, for a prompt no oracle knows."""
    import datasets
    import numpy as np
    import torch

    from align.data.video import read_video
    from reward_models.model import RewardModelConfig, VideoRewardModel

    torch.manual_seed(0)
    rm = VideoRewardModel(RewardModelConfig(pooling="mean"))
    rm.save_pretrained(tmp_path / "rm")
    prompt = "a corgi surfing a wave at sunset"
    args = ["data", "pairs", "--model", str(tiny_model_dir), "--reward-model", str(tmp_path / "rm"), "--prompt", prompt]
    args += ["--rounds", "2", "--samples-per-prompt", "3", "--steps", "2", "--tie-margin", "0", "--device", "cpu"]
    assert main([*args, "--out", str(tmp_path / "bw")]) == 0
    assert f"judged by reward:{tmp_path / 'rm'}" in capsys.readouterr().out
    assert main([*args, "--pairs", "all", "--out", str(tmp_path / "all")]) == 0
    bw, every = (datasets.load_from_disk(str(tmp_path / d)) for d in ("bw", "all"))
    assert len(bw) == 2 and len(every) == 2 * 3  # one pair per round; all 3 pairs of each round
    for d, ds in (("bw", bw), ("all", every)):
        sa, sb = (
            rm.score(np.stack([read_video(tmp_path / d / f) for f in ds[c]]), [prompt] * len(ds))
            for c in ("video_a", "video_b")
        )
        np.testing.assert_allclose(ds["score_a"], sa, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(ds["score_b"], sb, rtol=1e-4, atol=1e-4)
        assert list(ds["preference"]) == ["a" if a > b else "b" for a, b in zip(sa, sb)]
    # best vs worst: the chosen video scores highest among every pair of its round
    for i in range(2):
        rows = every.select(range(3 * i, 3 * i + 3))
        best = max(list(rows["score_a"]) + list(rows["score_b"]))
        assert max(bw[i]["score_a"], bw[i]["score_b"]) == pytest.approx(best)
