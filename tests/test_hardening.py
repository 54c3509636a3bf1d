"""Issue 39, items 1, 2, 3 and 5: imports that never corrupt silently, paths that stay inside
the dataset root, finite scores, and resume that survives a damaged checkpoint.

Every malicious or damaged input is built here: CSV with an unbalanced quote, short and long
rows, oversized fields; a symlink out of the root; NaN / inf scores; a truncated Parquet; a
JSONL line that is not JSON; checkpoints with a truncated LoRA, optimizer or trainer state; a
disk that fills up (the writer raises ENOSPC) or refuses (EACCES) while a checkpoint is written.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from conftest import make_preference_rows, save_rows, tiny_recipe
from safetensors.torch import load_file
from test_data_formats import clip

import align.training.core as core
from align.cli import main
from align.data.checks import check_rows
from align.data.importers import MAX_CSV_FIELD, import_dataset
from align.data.preference import PreferenceDataError, load_preference_dataset
from align.data.video import read_video, write_video
from align.training import build_config, train
from reward_models import atomic

HEADER = "prompt,path_A,path_B,Overall\n"
VG = "videogen-rewardbench"


@pytest.fixture
def src(tmp_path) -> Path:
    """A source folder with ``videos/v0.mp4 .. v5.mp4`` (distinct clips)."""
    d = tmp_path / "src"
    for i in range(6):
        write_video(d / "videos" / f"v{i}.mp4", clip(i, frames=4, size=16))
    return d


def _row(prompt: str, a: int, b: int, label: str) -> str:
    return f"{prompt},videos/v{a}.mp4,videos/v{b}.mp4,{label}\n"


# --------------------------------------------------------------------------------------------
# 1. CSV: strict field counts, rows swallowed by a quote, oversized fields


def test_unbalanced_quote_that_swallows_rows_is_a_named_bad_record(src, tmp_path):
    # the quote opened in row 1 closes in row 3: three rows read as one with the right field
    # count (raw CSV in its prompt, row 3's videos and label): before, imported with exit 0
    csv = src / "merge.csv"
    lines = ['"a cat,videos/v0.mp4,videos/v1.mp4,A', "b dog,videos/v2.mp4,videos/v3.mp4,B"]
    lines += ['c bird",videos/v4.mp4,videos/v5.mp4,A', "d fish,videos/v0.mp4,videos/v2.mp4,B"]
    csv.write_text(HEADER + "\n".join(lines) + "\n")
    with pytest.raises(PreferenceDataError) as e:
        import_dataset(VG, csv, tmp_path / "out")
    assert e.value.problems == [
        (0, f"{csv}: lines 2-4: the quoted prompt field holds lines that read as whole rows (an unbalanced quote?)")
    ]
    stats = import_dataset(VG, csv, tmp_path / "out", bad_rows="skip")
    ds = load_preference_dataset(tmp_path / "out")
    assert list(ds["prompt"]) == ["d fish"] and list(ds["preference"]) == ["b"]
    assert stats["skipped"]["bad_row"] == 1


def test_short_and_long_csv_rows_are_named_with_their_line_or_skipped_and_counted(src, tmp_path, capsys):
    csv = src / "short.csv"
    csv.write_text(
        HEADER + "a cat,videos/v0.mp4,videos/v1.mp4\n" + _row("b dog", 2, 3, "B") + _row("c", 4, 5, "A,extra")
    )
    argv = ["data", "import", "--format", VG, str(csv), str(tmp_path / "out")]
    assert main(argv) == 2  # before: exit 0, the short row taken as unlabelled, the long one imported
    err = capsys.readouterr().err
    assert f"row 0: {csv}: line 2: 3 field(s), the header has 4" in err
    assert f"row 2: {csv}: line 4: 5 field(s), the header has 4" in err
    assert main([*argv, "--skip-bad"]) == 0
    assert "skipped {'unlabelled': 0, 'bad_row': 2}" in capsys.readouterr().out
    assert list(load_preference_dataset(tmp_path / "out")["prompt"]) == ["b dog"]


def test_oversized_csv_fields(src, tmp_path):
    # 200k characters: over csv's default limit (a _csv.Error traceback before), under ours
    csv = src / "big.csv"
    csv.write_text(HEADER + _row("x" * 200_000, 0, 1, "A"))
    import_dataset(VG, csv, tmp_path / "big")
    assert len(load_preference_dataset(tmp_path / "big")["prompt"][0]) == 200_000
    huge = src / "huge.csv"
    huge.write_text(HEADER + _row('"' + "x" * (MAX_CSV_FIELD + 1) + '"', 0, 1, "A") + _row("ok", 2, 3, "B"))
    with pytest.raises(PreferenceDataError, match=rf"{huge}: line 2: a field longer than 1,048,576 characters"):
        import_dataset(VG, huge, tmp_path / "huge")
    stats = import_dataset(VG, huge, tmp_path / "huge", bad_rows="skip")
    assert stats["rows_out"] == 1 and stats["skipped"]["bad_row"] == 1


def test_a_quote_left_open_to_the_end_stops_the_file_naming_it(src, tmp_path):
    csv = src / "open.csv"
    csv.write_text(HEADER + _row("ok", 0, 1, "A") + '"never closed,videos/v2.mp4\nmore,text\n')
    for mode in ("error", "skip"):  # what follows an open quote cannot be counted: stop either way
        with pytest.raises(ValueError, match=rf"{csv}: lines 3-4: unexpected end of data; stopped reading"):
            import_dataset(VG, csv, tmp_path / "out", bad_rows=mode)


# --------------------------------------------------------------------------------------------
# 2. every path resolves inside the root


def test_a_symlink_out_of_the_root_is_refused_by_import_and_validate(src, tmp_path, capsys):
    secret = write_video(tmp_path / "outside" / "secret.mp4", clip(99, frames=4, size=16))
    (src / "videos" / "link.mp4").symlink_to(secret)
    (src / "videos" / "inner.mp4").symlink_to(src / "videos" / "v3.mp4")  # a link inside the root is fine
    csv = src / "link.csv"
    csv.write_text(HEADER + "a,videos/link.mp4,videos/v1.mp4,A\n" + "b,videos/inner.mp4,videos/v2.mp4,B\n")
    with pytest.raises(PreferenceDataError) as e:
        import_dataset(VG, csv, tmp_path / "out")  # before: imported, the secret copied into out/videos
    assert e.value.problems == [
        (0, f"path_A: {src}/videos/link.mp4: a symlink out of the dataset root {src} (it leads to {secret.resolve()})")
    ]
    import_dataset(VG, csv, tmp_path / "out", bad_rows="skip")
    inside = [read_video(src / "videos" / f"v{i}.mp4") for i in range(6)]
    for f in (tmp_path / "out" / "videos").iterdir():  # only files from inside the root
        assert any(np.array_equal(read_video(f), v) for v in inside)

    rows = {"prompt": "p", "video_a": "videos/link.mp4", "video_b": "videos/v1.mp4", "preference": "a"}
    (src / "linked.jsonl").write_text(json.dumps(rows) + "\n")
    assert main(["data", "validate", str(src / "linked.jsonl")]) == 1  # before: 0 problems
    assert "row 0: video_a: " in capsys.readouterr().out
    rep = check_rows(load_preference_dataset(src / "linked.jsonl"), root=src, allow_absolute_paths=True)
    assert not rep.fatal  # trusted explicitly


def test_tables_and_pair_folder_texts_out_of_the_root_are_refused(src, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "metadata.csv").write_text(HEADER + _row("a", 0, 1, "A"))
    (src / "metadata.csv").symlink_to(outside / "metadata.csv")
    with pytest.raises(ValueError, match="metadata.csv: a symlink out of the dataset root"):
        import_dataset(VG, src, tmp_path / "out")
    with pytest.raises(ValueError, match="metadata.csv: a symlink out of the dataset root"):
        load_preference_dataset(src)
    pairs = tmp_path / "pairs"
    write_video(pairs / "0" / "a.mp4", clip(0, frames=4, size=16))
    write_video(pairs / "0" / "b.mp4", clip(1, frames=4, size=16))
    (pairs / "0" / "preference.txt").write_text("a")
    (outside / "id_rsa").write_text("PRIVATE KEY")
    (pairs / "0" / "prompt.txt").symlink_to(outside / "id_rsa")  # would become the prompt
    with pytest.raises(ValueError, match="prompt.txt: a symlink out of the dataset root"):
        load_preference_dataset(pairs)


def test_a_root_in_the_hub_cache_contains_its_blobs(tmp_path):
    repo = tmp_path / "hub" / "datasets--o--n"
    for i, blob in enumerate(("abc123", "def456")):  # blobs are named by their hash, without a suffix
        write_video(repo / "blobs" / f"{blob}.mp4", clip(i, frames=4, size=16)).rename(repo / "blobs" / blob)
    snap = repo / "snapshots" / "rev0"
    (snap / "videos").mkdir(parents=True)
    (snap / "videos" / "a.mp4").symlink_to("../../../blobs/abc123")
    (snap / "videos" / "b.mp4").symlink_to("../../../blobs/def456")
    (snap / "data.jsonl").write_text(
        json.dumps({"prompt": "p", "video_a": "videos/a.mp4", "video_b": "videos/b.mp4", "preference": "a"}) + "\n"
    )
    assert not check_rows(load_preference_dataset(snap / "data.jsonl"), root=snap).problems


# --------------------------------------------------------------------------------------------
# 3. finite scores, the file named, every countable bad record skipped


def test_nan_and_inf_scores_are_bad_rows_naming_row_and_column(src, tmp_path, capsys):
    table = pa.table(
        {
            "caption": ["a", "b", "c", "d"],
            "video_0": ["videos/v0.mp4", "videos/v2.mp4", "videos/v4.mp4", "videos/v0.mp4"],
            "video_1": ["videos/v1.mp4", "videos/v3.mp4", "videos/v5.mp4", "videos/v5.mp4"],
            "label_0": [float("nan"), 1.0, None, 1.0],  # NaN: before, skipped as "unlabelled"
            "label_1": [1.0, float("inf"), 0.0, 0.0],
        }
    )
    pq.write_table(table, src / "scores.parquet")
    with pytest.raises(PreferenceDataError) as e:
        import_dataset("pickapic", src / "scores.parquet", tmp_path / "out")
    assert e.value.problems == [(0, "label_0 nan is not a finite number"), (1, "label_1 inf is not a finite number")]
    stats = import_dataset("pickapic", src / "scores.parquet", tmp_path / "out", bad_rows="skip")
    assert stats["skipped"] == {"unlabelled": 1, "bad_row": 2} and stats["rows_out"] == 1

    rows = [
        {"prompt": "p", "video_a": "videos/v0.mp4", "video_b": "videos/v1.mp4", "preference": "a", "score_a": 1.0},
        {"prompt": "q", "video_a": "videos/v2.mp4", "video_b": "videos/v3.mp4", "preference": "b", "score_a": None},
        {"prompt": "r", "video_a": "videos/v4.mp4", "video_b": "videos/v5.mp4", "preference": "a", "score_a": None},
    ]
    rows[2]["score_a"], rows[2]["score_b"] = float("inf"), float("nan")
    (src / "scored.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["data", "validate", str(src / "scored.jsonl")]) == 1  # before: 0 problems
    out = capsys.readouterr().out
    assert "row 2: score_a inf is not a finite number" in out and "row 2: score_b nan is not a finite number" in out
    assert "row 1" not in out  # a missing score is fine


def test_a_truncated_parquet_is_named(src, tmp_path):
    pq.write_table(
        pa.table({"caption": ["a"], "video_0": ["v"], "video_1": ["w"], "label_0": [1], "label_1": [0]}),
        src / "t.parquet",
    )
    raw = (src / "t.parquet").read_bytes()
    (src / "t.parquet").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match=rf"^{src / 't.parquet'}: cannot read as parquet"):  # before: no file name
        import_dataset("pickapic", src / "t.parquet", tmp_path / "out")


def test_skip_bad_skips_lines_that_are_not_json_objects(src, tmp_path):
    good = {"caption": "a", "video_0": "videos/v0.mp4", "video_1": "videos/v1.mp4", "label_0": 1, "label_1": 0}
    lines = [json.dumps(good), "{not json", "[1, 2]", json.dumps({**good, "video_0": "videos/v2.mp4"})]
    (src / "bad.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(PreferenceDataError) as e:
        import_dataset("pickapic", src / "bad.jsonl", tmp_path / "out")
    assert [r for r, _ in e.value.problems] == [1, 2]
    assert e.value.problems[1] == (2, f"{src / 'bad.jsonl'}: line 3 is not a JSON object")
    stats = import_dataset("pickapic", src / "bad.jsonl", tmp_path / "out", bad_rows="skip")  # before: stopped
    assert stats["rows_out"] == 2 and stats["skipped"]["bad_row"] == 2
    assert stats["problems"][0].startswith(f"row 1: {src / 'bad.jsonl'}: line 2 is not valid JSON")


# --------------------------------------------------------------------------------------------
# 5. resume survives a damaged checkpoint; a full disk is one line

LORA = "lora/pytorch_lora_weights.safetensors"


def _recipe(model_dir, data, out, **kw) -> dict:
    base = dict(dataset=data, name="run", max_steps=3, train_batch_size=2, checkpointing_steps=1)
    return tiny_recipe(model_dir, out, **(base | {"checkpoints_total_limit": 3} | kw))


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    """A 3-step run with checkpoints 1, 2, 3, and the same recipe run for 4 steps straight."""
    tmp = tmp_path_factory.mktemp("hardening_runs")
    data = save_rows(make_preference_rows(8), tmp / "prefs")
    train(build_config(**_recipe(tiny_model_dir, data, tmp / "out")))
    reference = train(build_config(**_recipe(tiny_model_dir, data, tmp / "out", name="straight", max_steps=4)))
    return tmp / "out" / "run", reference, data


def _copy(runs, tmp_path) -> Path:
    run = tmp_path / "out" / "run"
    shutil.copytree(runs[0], run)
    return run


def _truncate(path: Path) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


def test_a_checkpoint_lists_its_files_with_size_and_sha256(runs):
    ckpt = runs[0] / "checkpoint-3"
    listing = json.loads((ckpt / "manifest.json").read_text())["files"]
    assert {"trainer_state.json", "optimizer.pt", "scheduler.pt", "rng_state_0.pt", LORA} <= set(listing)
    assert listing["optimizer.pt"]["bytes"] == (ckpt / "optimizer.pt").stat().st_size
    assert core.checkpoint_problem(ckpt) is None


@pytest.mark.parametrize(
    "damage", [LORA, "optimizer.pt", "trainer_state.json"], ids=["lora", "optimizer", "empty_state"]
)
def test_resume_latest_falls_back_to_the_newest_intact_checkpoint(runs, tiny_model_dir, tmp_path, capsys, damage):
    run = _copy(runs, tmp_path)
    target = run / "checkpoint-3" / damage
    if damage == "trainer_state.json":
        target.write_text("")  # before: "Expecting value" without the file's name
    else:
        _truncate(target)  # before: a SafetensorError / OSError traceback
    cfg = build_config(**_recipe(tiny_model_dir, runs[2], tmp_path / "out", max_steps=4, resume="latest"))
    resumed = train(cfg)
    err = capsys.readouterr().err
    assert f"resume latest: skipping checkpoint-3, it is damaged: {target}: " in err
    assert "resume latest: resuming from checkpoint-2, the newest intact checkpoint" in err
    a, b = load_file(runs[1] / LORA), load_file(resumed / LORA)
    assert all(torch.equal(a[k], b[k]) for k in a)  # steps 3 and 4 redone: the same bits as a straight run
    assert core.checkpoint_problem(run / "checkpoint-3") is None  # rewritten whole


def test_a_damaged_checkpoint_named_explicitly_is_an_error_naming_the_file(runs, tiny_model_dir, tmp_path, capsys):
    run = _copy(runs, tmp_path)
    _truncate(run / "checkpoint-3" / "optimizer.pt")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(_recipe(tiny_model_dir, runs[2], tmp_path / "out", max_steps=4)))
    assert main(["train", str(recipe), "--resume", str(run / "checkpoint-3")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"vidalign train: error: resume: checkpoint {run / 'checkpoint-3'} is damaged: "
        f"{run / 'checkpoint-3' / 'optimizer.pt'}: {(run / 'checkpoint-3' / 'optimizer.pt').stat().st_size} bytes, "
        f"{json.loads((run / 'checkpoint-3' / 'manifest.json').read_text())['files']['optimizer.pt']['bytes']} "
        "written at save time (truncated?)"
    ]
    for ckpt in core.checkpoints(run):
        (ckpt / "trainer_state.json").write_text("{")
    cfg = build_config(**_recipe(tiny_model_dir, runs[2], tmp_path / "out", max_steps=4, resume="latest"))
    with pytest.raises(core.CheckpointError, match="every checkpoint of .* is damaged"):
        train(cfg)


def test_a_checkpoint_without_a_manifest_is_checked_by_reading_it(runs, tmp_path):
    ckpt = tmp_path / "checkpoint-3"
    shutil.copytree(runs[0] / "checkpoint-3", ckpt)
    (ckpt / "manifest.json").unlink()  # as an older vidalign wrote them
    assert core.checkpoint_problem(ckpt) is None
    _truncate(ckpt / "optimizer.pt")
    assert core.checkpoint_problem(ckpt).startswith(f"{ckpt / 'optimizer.pt'}: damaged")


class _FullDisk:
    """A raw file that takes ``room`` bytes and then refuses with ENOSPC, as a full disk does."""

    def __init__(self, room: int):
        self.room = room

    def write(self, data) -> int:
        n = min(len(memoryview(data).cast("B")), self.room)
        if n == 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= n
        return n

    def flush(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def _refusing(code: int):
    """A writer that fails as the disk or the filesystem does (``OSError(ENOSPC)`` -> disk full)."""

    def write(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    return write


@pytest.mark.parametrize(
    "failing,code",
    [("optimizer.pt", errno.ENOSPC), ("lora", errno.ENOSPC), ("lora", errno.EACCES)],
    ids=["full_inside_torch_save", "full", "permission"],
)
def test_a_full_disk_or_a_refusal_while_checkpointing_is_one_line(
    runs, tiny_model_dir, tmp_path, monkeypatch, capsys, failing, code
):
    run = _copy(runs, tmp_path)
    if failing == "optimizer.pt":  # the disk fills up inside torch.save, which reports a RuntimeError
        real_open = open

        def opener(path, *args, **kwargs):
            return _FullDisk(100) if str(path).endswith(failing) else real_open(path, *args, **kwargs)

        monkeypatch.setattr(core, "open", opener, raising=False)
    else:
        monkeypatch.setattr(core, "save_lora", _refusing(code))
    why = os.strerror(code)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(_recipe(tiny_model_dir, runs[2], tmp_path / "out", max_steps=4)))
    assert main(["train", str(recipe), "--resume", "latest"]) == 2  # before: a "No space left" traceback
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        f"vidalign train: error: cannot write checkpoint {run / 'checkpoint-4'}: "
    )
    assert f"{why}: {run / '.checkpoint-4.tmp' / failing}" in err[0]
    assert sorted(p.name for p in run.iterdir() if p.name.startswith((".", "checkpoint"))) == [
        "checkpoint-1",
        "checkpoint-2",
        "checkpoint-3",
    ]  # no half-written checkpoint left behind


def test_atomic_writes_fsync_files_and_directories(tmp_path, monkeypatch):
    synced = []
    real = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    atomic.atomic_write_text(tmp_path / "a.txt", "x")
    assert synced[0].startswith(str(tmp_path / ".a.txt.")) and synced[1] == str(tmp_path)
    synced.clear()
    with atomic.atomic_directory(tmp_path / "d") as d:
        (d / "sub").mkdir()
        (d / "sub" / "f.bin").write_bytes(b"1")
        tmp_dir = d
    assert {str(tmp_dir / "sub" / "f.bin"), str(tmp_dir / "sub"), str(tmp_dir), str(tmp_path)} <= set(synced)
