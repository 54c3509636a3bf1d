"""The ``vidalign`` command line: the quick demo end to end, and clear errors (exit 2)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
from conftest import PROMPT

from align.cli import main

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


@pytest.mark.integration
def test_demo_quick_end_to_end(tmp_path):
    out, cache = tmp_path / "demo", tmp_path / "cache"
    cmd = [sys.executable, "-m", "align.cli", "demo", "--quick", "--out", str(out), "--cache-dir", str(cache)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "oracle win rate" in r.stdout
    report = json.loads((out / "report.json").read_text())
    wr = report["winrate"]["oracle"]
    assert 0.0 <= wr["rate"] <= 1.0 and wr["ci95"][0] <= wr["rate"] <= wr["ci95"][1]
    assert wr["n"] == report["data"]["comparisons"] > 0 and 0 <= wr["ties"] <= wr["n"]
    assert {"pretrain", "pairs", "reward_model", "dpo", "rwr", "eval", "total"} <= set(report["timings_s"])
    for name in (
        "report.md",
        "training_curves_dpo.png",
        "training_curves_rwr.png",
        "winrates.png",
        "base_vs_aligned.gif",
    ):
        assert (out / name).stat().st_size > 0, name
    for run in ("dpo", "rwr"):
        assert (out / run / "lora" / "pytorch_lora_weights.safetensors").is_file()
    for judge in ("oracle", "reward_model"):
        for method in ("DPO", "RWR"):
            w = report["winrate"][judge][method]
            assert w["n"] == wr["n"] and w["ci95"][0] <= w["rate"] <= w["ci95"][1]
    assert 0.0 <= report["reward_model"]["accuracy"] <= 1.0
    lo, hi = report["reward_model"]["accuracy_ci95"]
    assert lo <= report["reward_model"]["accuracy"] <= hi
    md = (out / "report.md").read_text()
    for attr in ("background", "color", "shape", "direction", "smoothness"):  # where the reward model is blind
        key = f"agreement_with_oracle_{attr}_on_eval_comparisons"
        v = report["reward_model"][key]
        assert (v is None or 0.0 <= v <= 1.0) and key in md
    rm_cfg = json.loads((out / "reward_model" / "best" / "reward_config.json").read_text())
    assert rm_cfg["motion_keypoints"] == 16 and rm_cfg["motion_frame"]  # backbone + motion encoder
    assert rm_cfg["frame_sampling"] == "strided"  # a random phase while training, scores averaged over phases
    # 2 rounds of 2 samples per prompt: DPO and the reward model get each round's pair
    dpo, rm = (datasets.load_from_disk(str(out / d)) for d in ("preference_data", "reward_data"))
    n_prompts = len(set(rm["prompt"]))
    assert len(dpo) == len(rm) == 2 * n_prompts and set(dpo["prompt"]) == set(rm["prompt"])
    # a second run reuses the cached pretrained model; --set changes DemoConfig fields: the
    # reward model now gets every pair among a prompt's 4 samples from both rounds, and RWR
    # takes whole groups of 4 per batch with the group-relative term; and a second reward model
    # from the direction-group backbone joins the first as an ensemble
    sets = [
        "reward_pairs_across_rounds=true",
        "rwr_group_batches=true",
        "rwr_advantage_weight=0.5",
        "reward_ensemble=true",
    ]
    r = subprocess.run([*cmd, *(a for kv in sets for a in ("--set", kv))], capture_output=True, text=True, env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert "pretrain_cached" in report["timings_s"] and report["config"]["reward_pairs_across_rounds"] is True
    rm = datasets.load_from_disk(str(out / "reward_data"))
    assert len(rm) == 6 * n_prompts and len(datasets.load_from_disk(str(out / "preference_data"))) == 2 * n_prompts
    assert report["reward_model"]["eval_pairs"] > 0 and report["reward_model"]["train_pairs"] > 2 * n_prompts
    assert json.loads((out / "rwr" / "summary.json").read_text())["group_size"] == 4
    members = report["reward_model"]["member_accuracy"]
    assert set(members) == {"reversal", "directions"} and all(0.0 <= v <= 1.0 for v in members.values())
    assert (out / "reward_model_directions" / "best" / "model.safetensors").is_file()
    # the second backbone is cached under its own key: 2 backbones x (contrastive + distortion stage)
    assert len(list(cache.glob("reward_backbone-*"))) == 4
    assert all("advantage_err" in json.loads(x) for x in (out / "rwr" / "metrics.jsonl").read_text().splitlines())


def test_generate_writes_videos_and_index(tiny_model_dir, tmp_path):
    out = tmp_path / "gen"
    rc = main(
        [
            "generate",
            "--model",
            str(tiny_model_dir),
            "--prompt",
            PROMPT,
            "--num",
            "2",
            "--steps",
            "2",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    index = [json.loads(x) for x in (out / "index.jsonl").read_text().splitlines()]
    assert [r["seed"] for r in index] == [0, 1]
    assert all((out / r["file"]).stat().st_size > 0 for r in index)


def test_train_eval_and_data_commands(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "pairs"
    assert (
        main(
            [
                "data",
                "pairs",
                "--model",
                str(tiny_model_dir),
                "--out",
                str(data),
                "--steps",
                "2",
                "--rounds",
                "1",
                "--samples-per-prompt",
                "2",
                "--tie-margin",
                "0",
                "--prompt",
                PROMPT,
                "--prompt",
                "a blue circle moving up on a gray background",
            ]
        )
        == 0
    )
    assert main(["data", "validate", str(data)]) == 0
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {tiny_model_dir}\ndataset: {data}\noutput_dir: {tmp_path}\nname: cli\n")
    assert main(["train", str(recipe), "--max_steps", "2", "--train_batch_size", "2", "--progress", "false"]) == 0
    lora = tmp_path / "cli" / "lora"
    assert (lora / "pytorch_lora_weights.safetensors").is_file()
    capsys.readouterr()
    assert (
        main(
            [
                "eval",
                "--model",
                str(tiny_model_dir),
                "--lora",
                str(lora),
                "--prompt",
                PROMPT,
                "--seeds-per-prompt",
                "3",
                "--steps",
                "2",
                "--out",
                str(tmp_path / "eval"),
            ]
        )
        == 0
    )
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["oracle"]["n"] == 3
    assert json.loads((tmp_path / "eval" / "report.json").read_text())["winrate"]["oracle"]["n"] == 3


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
    recipe.write_text("dataset: d\n")
    assert main(["train", str(recipe)]) == 2
    assert "model" in capsys.readouterr().err
    prompts = tmp_path / "p.txt"
    prompts.write_text(f"{PROMPT}\n\n{PROMPT}\n")
    assert (
        main(["generate", "--model", str(tiny_model_dir), "--prompts-file", str(prompts), "--out", str(tmp_path / "g")])
        == 2
    )
    assert "line 2 is empty" in capsys.readouterr().err
    prompts.write_text("")
    assert (
        main(["generate", "--model", str(tiny_model_dir), "--prompts-file", str(prompts), "--out", str(tmp_path / "g")])
        == 2
    )
    assert "empty" in capsys.readouterr().err
    assert (
        main(["generate", "--model", str(tmp_path / "nowhere"), "--prompt", PROMPT, "--out", str(tmp_path / "g")]) == 2
    )
    assert "nowhere" in capsys.readouterr().err
    assert main(["demo", "--model", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2
    assert not Path(tmp_path / "g").exists()
    capsys.readouterr()
    for bad, msg in [
        ("reward_epoch=1", "--set: unknown key 'reward_epoch' for DemoConfig (did you mean 'reward_epochs'?)"),
        ("pretrain=1", "set by `vidalign pretrain` recipes"),
        ("reward_epochs=three", "--set: key 'reward_epochs' must be int, got 'three'"),
        ("reward_pairs_across_rounds=maybe", "key 'reward_pairs_across_rounds' must be true/false, got 'maybe'"),
        ("reward_epochs", "expected KEY=VALUE"),
        ("reward_pretrain_negatives=flips", "reward_pretrain_negatives must be 'reversal' or 'directions'"),
    ]:
        assert main(["demo", "--set", bad, "--out", str(tmp_path / "y")]) == 2
        assert msg in capsys.readouterr().err, bad
    assert not (tmp_path / "y").exists()  # refused before anything ran
    from align.demo import DemoConfig, _reward_overrides, parse_overrides

    got = parse_overrides(["reward_epochs=3", "learning_rate=2e-3", "reward_pairs_across_rounds=yes", "seed= 7 "])
    assert got == {"reward_epochs": 3, "learning_rate": 0.002, "reward_pairs_across_rounds": True, "seed": 7}
    assert type(got["learning_rate"]) is float and type(got["reward_epochs"]) is int
    assert "test_time_shifts" not in _reward_overrides(DemoConfig())
    cfg = DemoConfig(**parse_overrides(["reward_test_time_shifts=1"]))
    assert _reward_overrides(cfg)["test_time_shifts"] == 1
    assert _reward_overrides(DemoConfig())["frame_weight"] == DemoConfig().reward_frame_weight
    assert "frame_weight" not in _reward_overrides(DemoConfig(reward_frame_weight=1.0))
