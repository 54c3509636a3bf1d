"""Importers: Pick-a-Pic, VideoGen-RewardBench and chosen/rejected layouts mapped onto the schema,
with real mp4 files; the imported dataset is self-contained and passes validation."""

from __future__ import annotations

import json
import shutil

import datasets
import numpy as np
import pytest
from test_data_formats import clip

from align.cli import main
from align.data.importers import import_dataset
from align.data.preference import PreferenceDataError, check_rows, content_hash, load_preference_dataset, to_pairs
from align.data.video import read_video, write_video


@pytest.fixture
def src_dir(tmp_path):
    """A source folder with ``videos/v0.mp4 .. v7.mp4`` (8 frames, 32x32, distinct)."""
    d = tmp_path / "src"
    for i in range(8):
        write_video(d / "videos" / f"v{i}.mp4", clip(i))
    return d


def _frames(root, rel):
    return read_video(root / rel)


def test_pickapic_labels_ties_unlabelled_and_provenance(src_dir, tmp_path):
    rows = {
        "caption": ["a red square", "a blue dot", "a green dot", "unlabelled", "a cat"],
        "video_0": ["videos/v0.mp4", "videos/v2.mp4", "videos/v4.mp4", "videos/v6.mp4", "videos/v0.mp4"],
        "video_1": ["videos/v1.mp4", "videos/v3.mp4", "videos/v5.mp4", "videos/v7.mp4", "videos/v7.mp4"],
        "label_0": [1.0, 0.0, 0.5, None, 0.0],
        "label_1": [0.0, 1.0, 0.5, None, 1.0],
        "has_label": [True, True, True, False, True],
        "model_0": ["m1", "m1", "m2", "m1", "m2"],
        "model_1": ["m2", "m3", "m1", "m2", "m3"],
        "user_id": [7, 8, 7, 9, 9],
        "ranking_id": [100, 101, 102, 103, 104],
    }
    datasets.Dataset.from_dict(rows).to_parquet(str(src_dir / "train.parquet"))
    dst = tmp_path / "imported"
    stats = import_dataset("pickapic", src_dir / "train.parquet", dst)
    assert (stats["rows_in"], stats["rows_out"]) == (5, 4)
    assert stats["skipped"] == {"unlabelled": 1, "bad_row": 0}
    assert stats["videos"] == 7  # v0 is used twice, stored once (by content); v6 only by the skipped row
    ds = load_preference_dataset(dst)
    assert list(ds["preference"]) == ["a", "b", "tie", "b"]
    assert list(ds["prompt"]) == ["a red square", "a blue dot", "a green dot", "a cat"]
    assert list(ds["score_a"]) == [1.0, 0.0, 0.5, 0.0] and list(ds["score_b"]) == [0.0, 1.0, 0.5, 1.0]
    assert list(ds["model_a"]) == ["m1", "m1", "m2", "m2"] and list(ds["annotator"]) == ["7", "8", "7", "9"]
    assert list(ds["source_row"]) == [0, 1, 2, 4] and set(ds["source_format"]) == {"pickapic"}
    assert all(p.startswith("videos/") and p.endswith(".mp4") for p in list(ds["video_a"]) + list(ds["video_b"]))
    assert json.loads((dst / "vidalign_import.json").read_text())["rows_out"] == 4

    # self-contained: the source can go away; the videos are byte-identical copies. Compared
    # with the source files themselves, not with a re-encode of the same frames: a clean-clone
    # CI run once failed that comparison (cause not isolated; x264 with threads is the only
    # step not known to be deterministic)
    source = {i: (src_dir / "videos" / f"v{i}.mp4").read_bytes() for i in (0, 3)}
    shutil.rmtree(src_dir)
    assert check_rows(ds, str(dst), root=dst, min_frames=8).problems == []
    assert (dst / ds["video_a"][0]).read_bytes() == source[0]
    assert (dst / ds["video_b"][1]).read_bytes() == source[3]  # label_1 won
    pairs = to_pairs(ds, root=dst)
    assert pairs.skipped["tie"] == 1 and pairs.rows == [0, 1, 3]
    assert content_hash(pairs.chosen[0]) == content_hash(read_video(dst / ds["video_a"][0]))
    assert content_hash(pairs.chosen[1]) == content_hash(read_video(dst / ds["video_b"][1]))


def test_pickapic_embedded_bytes_and_bad_rows(src_dir, tmp_path):
    """Media as bytes (Pick-a-Pic's jpg_0/jpg_1 columns); an image instead of a video is a bad row."""
    data = [(src_dir / "videos" / f"v{i}.mp4").read_bytes() for i in range(4)]
    jpeg = b"\xff\xd8\xff\xe0\x00\x10JFIF" + b"\x00" * 100
    rows = {
        "caption": ["p0", "p1", "p2"],
        "jpg_0": [data[0], jpeg, data[2]],
        "jpg_1": [data[1], data[3], data[3]],
        "label_0": [0.0, 1.0, 1.0],
        "label_1": [1.0, 0.0, 0.0],
    }
    datasets.Dataset.from_dict(rows).to_parquet(str(tmp_path / "p.parquet"))
    with pytest.raises(PreferenceDataError) as e:
        import_dataset("pickapic", tmp_path / "p.parquet", tmp_path / "out")
    assert e.value.problems == [(1, "jpg_0: <embedded bytes>: embedded bytes are not an mp4, webm or gif video")]
    assert not (tmp_path / "out").exists()  # nothing half-written
    stats = import_dataset("pickapic", tmp_path / "p.parquet", tmp_path / "out", bad_rows="skip")
    assert stats["rows_out"] == 2 and stats["skipped"]["bad_row"] == 1
    ds = load_preference_dataset(tmp_path / "out")
    assert list(ds["preference"]) == ["b", "a"] and list(ds["source_row"]) == [0, 2]
    np.testing.assert_array_equal(read_video(tmp_path / "out" / ds[0]["video_b"]), _frames(src_dir, "videos/v1.mp4"))


def test_videogen_rewardbench_overall_and_aspects(src_dir, tmp_path):
    csv = src_dir / "data.csv"
    csv.write_text(
        "prompt,path_A,path_B,A_model,B_model,VQ,MQ,TA,Overall,fps_A,fps_B\n"
        "a red square,videos/v0.mp4,videos/v1.mp4,kling,sora,A,B,same,A,8,8\n"
        "a blue dot,videos/v2.mp4,videos/v3.mp4,kling,sora,B,B,B,B,8,8\n"
        "a green dot,videos/v4.mp4,videos/v5.mp4,sora,kling,same,A,B,same,8,8\n"
        "no label yet,videos/v6.mp4,videos/v7.mp4,sora,kling,,,,,8,8\n"
    )
    dst = tmp_path / "vgrb"
    stats = import_dataset("videogen-rewardbench", csv, dst)
    assert stats["rows_out"] == 3 and stats["skipped"] == {"unlabelled": 1, "bad_row": 0}
    ds = load_preference_dataset(dst)
    assert list(ds["preference"]) == ["a", "b", "tie"]
    assert list(ds["preference_visual_quality"]) == ["a", "b", "tie"]
    assert list(ds["preference_motion_quality"]) == ["b", "b", "a"]
    assert list(ds["preference_text_alignment"]) == ["tie", "b", "b"]
    assert list(ds["model_a"]) == ["kling", "kling", "sora"] and list(ds["fps_a"]) == [8.0, 8.0, 8.0]
    assert check_rows(ds, str(dst), root=dst, min_frames=8).problems == []
    np.testing.assert_array_equal(read_video(dst / ds[2]["video_b"]), _frames(src_dir, "videos/v5.mp4"))


def test_videogen_rewardbench_unknown_label_and_missing_video_are_named(src_dir, tmp_path):
    csv = src_dir / "data.csv"
    csv.write_text(
        "prompt,path_A,path_B,Overall\n"
        "p0,videos/v0.mp4,videos/v1.mp4,A\n"
        "p1,videos/v2.mp4,videos/v3.mp4,C\n"
        "p2,videos/v4.mp4,videos/gone.mp4,B\n"
        "p3,../outside.mp4,videos/v5.mp4,A\n"
    )
    with pytest.raises(PreferenceDataError) as e:
        import_dataset("videogen-rewardbench", csv, tmp_path / "out")
    msg = str(e.value)
    assert "3 bad row(s)" in msg
    assert "row 1: Overall 'C' is not one of A, B, same" in msg
    assert "row 2: path_B: " in msg and "videos/gone.mp4: no such video file" in msg
    assert "row 3: path_A: ../outside.mp4: path escapes the dataset root" in msg


def test_chosen_rejected_order_is_random_but_the_label_follows_chosen(src_dir, tmp_path):
    recs = [
        {"prompt": f"prompt {i}", "chosen": f"videos/v{i % 8}.mp4", "rejected": f"videos/v{(i + 3) % 8}.mp4"}
        for i in range(10)
    ]
    (src_dir / "cr.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    dst = tmp_path / "cr"
    import_dataset("chosen-rejected", src_dir / "cr.jsonl", dst, seed=0)
    ds = load_preference_dataset(dst)
    assert set(ds["preference"]) == {"a", "b"}  # both positions occur: no position bias
    for i, row in enumerate(ds):
        preferred = row["video_a"] if row["preference"] == "a" else row["video_b"]
        np.testing.assert_array_equal(read_video(dst / preferred), _frames(src_dir, recs[i]["chosen"]))
    # the order depends only on the seed
    import_dataset("chosen-rejected", src_dir / "cr.jsonl", tmp_path / "cr2", seed=0)
    assert list(load_preference_dataset(tmp_path / "cr2")["preference"]) == list(ds["preference"])
    import_dataset("chosen-rejected", src_dir / "cr.jsonl", tmp_path / "cr3", seed=1)
    assert list(load_preference_dataset(tmp_path / "cr3")["preference"]) != list(ds["preference"])


def test_import_errors(src_dir, tmp_path):
    (src_dir / "x.jsonl").write_text(json.dumps({"prompt": "p", "good": "videos/v0.mp4"}) + "\n")
    with pytest.raises(ValueError, match="unknown import format 'nope'"):
        import_dataset("nope", src_dir / "x.jsonl", tmp_path / "o")
    with pytest.raises(ValueError, match=r"no chosen/rejected column\(s\).*has \['prompt', 'good'\]"):
        import_dataset("chosen-rejected", src_dir / "x.jsonl", tmp_path / "o")
    (tmp_path / "exists").mkdir()
    with pytest.raises(ValueError, match="already exists"):
        import_dataset("chosen-rejected", src_dir / "x.jsonl", tmp_path / "exists")


def test_cli_import_inspect_validate(src_dir, tmp_path, capsys):
    recs = [{"caption": f"p{i}", "chosen": f"videos/v{i}.mp4", "rejected": f"videos/v{i + 4}.mp4"} for i in range(4)]
    (src_dir / "cr.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    dst = tmp_path / "d"
    assert main(["data", "import", "--format", "chosen-rejected", str(src_dir / "cr.jsonl"), str(dst)]) == 0
    assert "imported 4 of 4 rows (chosen-rejected)" in capsys.readouterr().out
    assert main(["data", "validate", str(dst), "--min-frames", "8"]) == 0
    assert main(["data", "inspect", str(dst), "--out", str(tmp_path / "i.png")]) == 0
    assert "tie share 0.000" in capsys.readouterr().out and (tmp_path / "i.png").is_file()
    # a second import into the same DST is a user error: exit 2 with the reason
    assert main(["data", "import", "--format", "chosen-rejected", str(src_dir / "cr.jsonl"), str(dst)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_import_can_bring_videos_to_the_model_input(tmp_path):
    """Sources at 16 frames of 48x64 and 16 fps become the model's 8 frames of 32x32 at 8 fps."""
    src = tmp_path / "src"
    for i in range(4):
        write_video(src / "videos" / f"v{i}.mp4", clip(i, frames=16, size=64)[:, 8:56], fps=16)
    write_video(src / "videos" / "short.mp4", clip(9, frames=6, size=64), fps=16)
    (src / "data.csv").write_text(
        "prompt,path_A,path_B,Overall\np0,videos/v0.mp4,videos/v1.mp4,A\np1,videos/v2.mp4,videos/v3.mp4,B\n"
        "p2,videos/v0.mp4,videos/short.mp4,A\n"
    )
    pre = {"num_frames": 8, "height": 32, "width": 32, "fps": 8}
    with pytest.raises(
        PreferenceDataError, match=r"row 2: path_B: videos/short.mp4: .*too short for 8 frames at 8 fps"
    ):
        import_dataset("videogen-rewardbench", src / "data.csv", tmp_path / "out", preprocessing=pre)
    stats = import_dataset(
        "videogen-rewardbench", src / "data.csv", tmp_path / "out", preprocessing=pre, bad_rows="skip"
    )
    assert stats["rows_out"] == 2 and stats["videos"] == 4 and stats["preprocessing"] == pre
    ds = load_preference_dataset(tmp_path / "out")
    assert check_rows(ds, "out", root=tmp_path / "out", min_frames=8).problems == []
    pairs = to_pairs(ds, root=tmp_path / "out")
    assert pairs.chosen.shape == (2, 8, 32, 32, 3)
    # every second source frame (16 -> 8 fps), scaled 48x64 -> 32x43 and centre-cropped to 32x32
    from align.data.video import resize_center_crop

    source = clip(0, frames=16, size=64)[:, 8:56]

    def err(frames):
        return np.abs(pairs.chosen[0].astype(float) - resize_center_crop(frames, 32, 32).astype(float)).mean()

    assert err(source[::2]) < 7  # close to the right frames, through two lossy encodes
    assert err(source[::2]) < 0.75 * min(err(source[:8]), err(source[1::2]))  # and far from other choices
