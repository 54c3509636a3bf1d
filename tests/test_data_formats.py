"""Preference datasets in every supported layout, with real mp4 files: loading, validation of
bad records (missing, corrupt, truncated, short videos; bad labels; identical and duplicate
rows; paths escaping the root), inspection, and the new video helpers."""

from __future__ import annotations

import json
import shutil

import datasets
import numpy as np
import pytest

from align.cli import main
from align.data.checks import check_rows, summarize, validate_rows
from align.data.pairs import to_pairs
from align.data.preference import (
    PreferenceDataError,
    dataset_root,
    load_preference_dataset,
)
from align.data.video import (
    decode_video_bytes,
    prepare_video,
    read_video,
    resize_center_crop,
    sample_frame_indices,
    video_info,
    write_video,
)
from align.eval.plots import plot_summary

PROMPTS = ["a red square moving left", "a blue circle moving up", "a green square moving right", "a dot"]
PREFS = ["a", "b", "tie", "a"]


def clip(seed: int, frames: int = 8, size: int = 32) -> np.ndarray:
    """A distinct, codec-friendly video: a smooth gradient with a moving bright block."""
    rng = np.random.default_rng(seed)
    base = rng.integers(30, 200, 3)
    yy, xx = np.mgrid[0:size, 0:size]
    out = np.zeros((frames, size, size, 3), np.uint8)
    for t in range(frames):
        img = np.stack([(base[c] + 40 * np.sin((xx + yy * (c + 1)) / 9 + t / 3 + seed)) for c in range(3)], -1)
        x0 = (seed * 5 + 3 * t) % (size - 8)
        img[8:16, x0 : x0 + 8] = 250
        out[t] = np.clip(img, 0, 255).astype(np.uint8)
    return out


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Eight distinct mp4 files (8 frames, 32x32) made with write_video."""
    d = tmp_path_factory.mktemp("clips")
    return [write_video(d / f"clip{i}.mp4", clip(i)) for i in range(8)]


def _rows(videos_dir: str = "videos") -> dict[str, list]:
    return {
        "prompt": PROMPTS,
        "video_a": [f"{videos_dir}/clip{2 * i}.mp4" for i in range(4)],
        "video_b": [f"{videos_dir}/clip{2 * i + 1}.mp4" for i in range(4)],
        "preference": PREFS,
        "score_a": [1.0, 0.0, 0.5, 0.9],
    }


def _copy_clips(clips, dest):
    dest.mkdir(parents=True, exist_ok=True)
    for c in clips:
        shutil.copy(c, dest / c.name)


def _make_layout(layout: str, clips, base):
    """Write the 4-row dataset in ``layout`` under ``base``; return what to pass as the source."""
    rows = _rows()
    if layout == "save_to_disk":
        _copy_clips(clips, base / "ds" / "videos")
        datasets.Dataset.from_dict(rows).save_to_disk(str(base / "ds"))
        return str(base / "ds")
    if layout in ("jsonl", "csv", "parquet"):
        _copy_clips(clips, base / "videos")
        f = base / f"prefs.{layout}"
        df = datasets.Dataset.from_dict(rows).to_pandas()
        if layout == "jsonl":
            df.to_json(f, orient="records", lines=True)
        elif layout == "csv":
            df.to_csv(f, index=False)
        else:
            df.to_parquet(f)
        return str(f)
    if layout == "metadata_folder":
        _copy_clips(clips, base / "ds" / "videos")
        datasets.Dataset.from_dict(rows).to_pandas().to_json(
            base / "ds" / "metadata.jsonl", orient="records", lines=True
        )
        return str(base / "ds")
    if layout == "pair_folders":
        for i in range(4):
            d = base / "ds" / f"pair{i}"
            d.mkdir(parents=True)
            shutil.copy(clips[2 * i], d / "a.mp4")
            shutil.copy(clips[2 * i + 1], d / "b.mp4")
            (d / "prompt.txt").write_text(PROMPTS[i] + "\n")
            (d / "preference.txt").write_text(PREFS[i])
        return str(base / "ds")
    if layout == "hub_repo_copy":  # what a hub dataset repo looks like: data files + the videos
        _copy_clips(clips, base / "repo" / "videos")
        (base / "repo" / "data").mkdir()
        datasets.Dataset.from_dict(rows).to_parquet(str(base / "repo" / "data" / "train-00000-of-00001.parquet"))
        return str(base / "repo")
    raise AssertionError(layout)


LAYOUTS = ["save_to_disk", "jsonl", "csv", "parquet", "metadata_folder", "pair_folders", "hub_repo_copy"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_round_trips(layout, clips, tmp_path):
    src = _make_layout(layout, clips, tmp_path)
    ds = load_preference_dataset(src)
    assert len(ds) == 4 and list(ds["preference"]) == PREFS and list(ds["prompt"]) == PROMPTS
    rep = check_rows(ds, src, root=src, min_frames=8)
    assert rep.problems == [] and rep.counts == {"a": 2, "b": 1, "tie": 1}
    pairs = to_pairs(ds, source=src, root=src)
    assert pairs.rows == [0, 1, 3] and pairs.skipped == {"bad_row": 0, "tie": 1}
    # chosen follows the label: row 0 prefers a (clip0), row 1 prefers b (clip3)
    np.testing.assert_array_equal(pairs.chosen[0], read_video(clips[0]))
    np.testing.assert_array_equal(pairs.rejected[0], read_video(clips[1]))
    np.testing.assert_array_equal(pairs.chosen[1], read_video(clips[3]))
    assert pairs.chosen.shape == (3, 8, 32, 32, 3)
    if layout != "pair_folders":
        assert [float(x) for x in ds["score_a"]] == [1.0, 0.0, 0.5, 0.9]  # numbers stay numbers (CSV too)


def test_relative_paths_resolve_against_the_file_folder_from_elsewhere(clips, tmp_path, monkeypatch):
    src = _make_layout("jsonl", clips, tmp_path / "somewhere")
    monkeypatch.chdir(tmp_path)  # the CWD is not the dataset's folder
    assert dataset_root(src) == tmp_path / "somewhere"
    assert to_pairs(load_preference_dataset(src), root=src).chosen.shape[0] == 3


def _bad_dataset(clips, tmp_path):
    """A JSONL dataset where every row but 0 and 2 has one problem; returns (path, rows, outside file)."""
    root = tmp_path / "ds"
    _copy_clips(clips, root / "videos")
    (root / "videos" / "corrupt.mp4").write_bytes(np.random.default_rng(0).bytes(3000))
    data = (root / "videos" / "clip6.mp4").read_bytes()
    (root / "videos" / "truncated.mp4").write_bytes(data[: len(data) // 2])
    write_video(root / "videos" / "short.mp4", clip(9, frames=3))
    outside = tmp_path / "secret.mp4"
    shutil.copy(clips[7], outside)  # a real video outside the root: must not be read through ../
    v = "videos/clip{}.mp4".format
    rows = [
        ("p0", v(0), v(1), "a"),  # 0 fine
        ("p1", v(0), "videos/missing.mp4", "a"),  # 1 missing file
        ("p2", v(2), v(3), "b"),  # 2 fine
        ("p3", "videos/corrupt.mp4", v(3), "a"),  # 3 undecodable
        ("p4", v(4), "videos/truncated.mp4", "b"),  # 4 truncated
        ("p5", "videos/short.mp4", v(5), "a"),  # 5 too few frames (and a different shape)
        ("p6", v(4), v(5), "left"),  # 6 unknown label
        ("p7", v(6), v(6), "a"),  # 7 identical videos
        ("p0", v(0), v(1), "a"),  # 8 duplicate of row 0
        ("p9", "../secret.mp4", v(1), "a"),  # 9 escapes the root
        ("p10", str(outside), v(2), "b"),  # 10 absolute path
        ("  ", v(4), v(7), "a"),  # 11 empty prompt
        ("p0", v(1), v(0), "a"),  # 12 same comparison as row 0, opposite winner: a warning
        ("p13", v(4), v(7), "tie"),  # 13 fine (a tie)
    ]
    f = root / "prefs.jsonl"
    f.write_text("".join(json.dumps(dict(zip(("prompt", "video_a", "video_b", "preference"), r))) + "\n" for r in rows))
    return str(f), rows, outside


def test_every_bad_record_is_named_with_row_and_file(clips, tmp_path):
    src, rows, outside = _bad_dataset(clips, tmp_path)
    ds = load_preference_dataset(src)
    rep = check_rows(ds, src, root=src, min_frames=8)
    by_row = {}
    for p in rep.problems:
        by_row.setdefault(p.row, []).append(p)
    assert sorted(by_row) == [1, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]
    msg = {r: " | ".join(p.message for p in ps) for r, ps in by_row.items()}
    assert "video_b:" in msg[1] and "videos/missing.mp4: no such video file" in msg[1]
    assert "video_a:" in msg[3] and "corrupt.mp4: cannot decode video" in msg[3]
    assert "video_b:" in msg[4] and "truncated.mp4: cannot decode video" in msg[4]
    assert "short.mp4: 3 frame(s), fewer than the 8 needed" in msg[5]
    assert "preference 'left' is not one of" in msg[6]
    assert "video_a and video_b are identical" in msg[7] and "videos/clip6.mp4" in msg[7]
    assert "duplicate of row 0" in msg[8] and "videos/clip0.mp4" in msg[8]
    assert "video_a: ../secret.mp4: path escapes the dataset root" in msg[9]
    assert f"video_a: {outside}: absolute paths are not allowed" in msg[10]
    assert msg[11] == "empty prompt"
    assert "conflicting label with row 0" in msg[12]
    assert [p.fatal for p in by_row[12]] == [False]  # annotators disagreeing is a warning only
    assert all(p.fatal for r, ps in by_row.items() if r != 12 for p in ps)
    assert {p.row for p in rep.fatal} == {1, 3, 4, 5, 6, 7, 8, 9, 10, 11}
    assert str(by_row[12][0]).startswith("row 12: warning: ")

    # allowing absolute paths accepts row 10; ../ stays forbidden
    rep2 = check_rows(ds, src, root=src, min_frames=8, allow_absolute_paths=True)
    assert 10 not in rep2.bad_rows and 9 in rep2.bad_rows

    # training: stop with the whole report, or skip and count (the warning row is kept)
    with pytest.raises(PreferenceDataError) as e:
        to_pairs(ds, source=src, root=src, min_frames=8)
    assert sorted({r for r, _ in e.value.problems}) == [1, 3, 4, 5, 6, 7, 8, 9, 10, 11]
    assert "row 9: video_a: ../secret.mp4: path escapes" in str(e.value)
    pairs = to_pairs(ds, source=src, root=src, bad_rows="skip", min_frames=8)
    assert pairs.rows == [0, 2, 12] and pairs.skipped == {"bad_row": 10, "tie": 1}
    assert len(pairs.rows) + sum(pairs.skipped.values()) == len(ds)  # nothing dropped silently

    # validate_rows (the old interface) reports the same fatal rows
    problems, decoded = validate_rows(ds, src, root=src, min_frames=8)
    assert sorted({r for r, _ in problems}) == [1, 3, 4, 5, 6, 7, 8, 9, 10, 11]
    assert decoded[0] is not None and decoded[1] is None


def test_cli_validate_reports_rows_and_files_and_exits_nonzero(clips, tmp_path, capsys):
    src, _, _ = _bad_dataset(clips, tmp_path)
    assert main(["data", "validate", src, "--min-frames", "8"]) == 1
    out = capsys.readouterr().out
    assert "row 1: video_b: " in out and "missing.mp4: no such video file" in out
    assert "row 9: video_a: ../secret.mp4: path escapes the dataset root" in out
    assert "row 12: warning: conflicting label with row 0" in out
    assert "10 problem(s) in 10 row(s), 1 warning(s)" in out  # row 5: too short (its other size is info)
    assert "info: sizes: 32x32 x" in out and "info: lengths: 8 frames x" in out
    good = _make_layout("parquet", clips, tmp_path / "good")
    assert main(["data", "validate", good, "--min-frames", "8"]) == 0
    assert main(["data", "validate", good, "--min-frames", "9"]) == 1  # every video is now too short


def test_aspect_labels_are_checked(clips, tmp_path):
    root = tmp_path / "ds"
    _copy_clips(clips, root / "videos")
    rows = _rows()
    rows["preference_motion_quality"] = ["a", None, "b", "sideways"]
    datasets.Dataset.from_dict(rows).save_to_disk(str(root))
    rep = check_rows(load_preference_dataset(root), "ds", root=root)
    assert [(p.row, p.message) for p in rep.problems] == [
        (3, "preference_motion_quality 'sideways' is not one of ('a', 'b', 'tie') (or empty)")
    ]


def test_embedded_video_bytes_are_decoded(clips, tmp_path):
    """A column of datasets.Video (as save_to_disk stores it: bytes inside the arrow file)."""
    rows = _rows()
    rows["video_a"] = [str(clips[2 * i]) for i in range(4)]
    rows["video_b"] = [str(clips[2 * i + 1]) for i in range(4)]
    ds = (
        datasets.Dataset.from_dict(rows)
        .cast_column("video_a", datasets.Video())
        .cast_column("video_b", datasets.Video())
    )
    ds.save_to_disk(str(tmp_path / "ds"))
    for c in clips:  # the files are gone: only the embedded bytes remain
        c.rename(c.with_suffix(".moved"))
    try:
        loaded = load_preference_dataset(tmp_path / "ds")
        assert loaded.features["video_a"].decode is False  # decoded by vidalign, not torchcodec
        pairs = to_pairs(loaded, root=tmp_path / "ds")
        np.testing.assert_array_equal(pairs.chosen[0], decode_video_bytes(loaded[0]["video_a"]["bytes"]))
        assert pairs.chosen.shape == (3, 8, 32, 32, 3)
    finally:
        for c in clips:
            c.with_suffix(".moved").rename(c)


def test_loading_errors_are_clear(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "video_a": "a.mp4", "video_b": "b.mp4", "preference": "a"}\n{"prompt": \n')
    with pytest.raises(ValueError, match=r"bad.jsonl: line 2 is not valid JSON"):
        load_preference_dataset(bad)
    csv = tmp_path / "x.csv"
    csv.write_text("prompt,video_a,preference\np,a.mp4,a\n")
    with pytest.raises(ValueError, match=r"missing required column\(s\) \['video_b'\]"):
        load_preference_dataset(csv)
    with pytest.raises(ValueError, match="unsupported file type '.txt'"):
        (tmp_path / "x.txt").write_text("hi")
        load_preference_dataset(tmp_path / "x.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty: not a preference dataset"):
        load_preference_dataset(tmp_path / "empty")
    # a hub id: offline here, so the error says what was tried (tests run with HF_HUB_OFFLINE=1)
    with pytest.raises(FileNotFoundError, match="no-such-org/no-such-dataset.*Hugging Face Hub"):
        load_preference_dataset("no-such-org/no-such-dataset")


def test_hub_root_fetch_failure_names_row_and_file():
    ds = datasets.Dataset.from_dict(
        {"prompt": ["p"], "video_a": ["videos/a.mp4"], "video_b": ["videos/b.mp4"], "preference": ["a"]}
    )
    rep = check_rows(ds, "org/name", root="org/name")
    assert [p.row for p in rep.problems] == [0, 0]
    assert "video_a: videos/a.mp4: cannot fetch from hub dataset org/name" in rep.problems[0].message


def test_inspect_counts_and_histograms(clips, tmp_path, capsys):
    src = _make_layout("save_to_disk", clips, tmp_path)
    s = summarize(load_preference_dataset(src), root=src)
    assert s["rows"] == 4 and s["counts"] == {"a": 2, "b": 1, "tie": 1, "other": 0}
    assert s["tie_share"] == pytest.approx(0.25)
    assert s["prompt_words"] == [5, 5, 5, 2]
    assert s["video_frames"] == [8] * 8 and s["video_seconds"] == pytest.approx([1.0] * 8)
    assert sorted(s["video_bytes"]) == sorted(c.stat().st_size for c in clips)
    png = plot_summary(s, tmp_path / "h.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["data", "inspect", src]) == 0
    out = capsys.readouterr().out
    assert "tie share 0.250" in out and "4 rows" in out and "frames min 8" in out
    assert (tmp_path / "ds" / "inspect.png").stat().st_size > 1000


# --------------------------------------------------------------------------------------------
# video helpers


def test_video_info_and_bytes_decoding(clips, tmp_path):
    info = video_info(clips[0])
    assert (info["frames"], info["fps"], info["height"], info["width"]) == (8, 8.0, 32, 32)
    webm = write_video(tmp_path / "x.webm", clip(1, frames=6))
    assert video_info(webm)["frames"] == 6  # WebM stores no frame count: counted from packets
    gif = write_video(tmp_path / "x.gif", clip(1, frames=5))
    assert video_info(gif)["frames"] == 5
    np.testing.assert_array_equal(decode_video_bytes(clips[0].read_bytes()), read_video(clips[0]))
    with pytest.raises(ValueError, match=r"junk: cannot decode image \(OSError"):
        decode_video_bytes(b"\xff\xd8\xff\xe0 a jpeg", "junk")
    with pytest.raises(ValueError, match="nope.mp4: no such video file"):
        video_info(tmp_path / "nope.mp4")


def test_frame_sampling_is_fps_aware():
    assert sample_frame_indices(48, 8).tolist() == [0, 7, 13, 20, 27, 34, 40, 47]  # spread over all
    assert sample_frame_indices(48, 8, src_fps=24, target_fps=8).tolist() == [0, 3, 6, 9, 12, 15, 18, 21]
    assert sample_frame_indices(10, 4, src_fps=10, target_fps=10).tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match=r"too short for 8 frames at 2 fps \(4.00 s\)"):
        sample_frame_indices(48, 8, src_fps=24, target_fps=2)
    with pytest.raises(ValueError, match="fewer than the 8 needed"):
        sample_frame_indices(5, 8)
    with pytest.raises(ValueError, match="positive fps"):
        sample_frame_indices(48, 8, src_fps=None, target_fps=8)


def test_resize_center_crop_keeps_the_centre():
    v = np.zeros((2, 40, 80, 3), np.uint8)
    v[:, :, 20:60] = 200  # a bright centre band, half the width
    out = resize_center_crop(v, 20, 20)  # 40x80 -> 20x40 -> centre 20x20 (all bright)
    assert out.shape == (2, 20, 20, 3) and out.dtype == np.uint8
    assert out[:, :, 2:-2].min() >= 190
    assert resize_center_crop(v, 40, 80) is v  # no-op at the right size
    pv = prepare_video(np.repeat(v, 8, axis=0), num_frames=4, height=16, width=32)
    assert pv.shape == (4, 16, 32, 3)
