"""The ``vidalign`` command line: commands end to end, and clear errors (exit 2)."""

import json
import os
from pathlib import Path

from conftest import PROMPT

from align.cli import main

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


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
    assert not Path(tmp_path / "g").exists()
