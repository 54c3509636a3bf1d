"""Preference data: missing columns, bad rows reported with their index, skips counted."""

import json

import datasets
import numpy as np
import pytest
from conftest import make_preference_rows, save_rows

from align.data.checks import check_rows, summarize, validate_rows
from align.data.pairs import to_pairs
from align.data.preference import (
    PreferenceDataError,
    iter_rows,
    load_preference_dataset,
    value_reader,
)
from align.data.video import write_video


def test_missing_columns_are_named(tmp_path):
    rows = make_preference_rows(2)
    del rows["preference"]
    path = save_rows(rows, tmp_path / "d")
    with pytest.raises(ValueError, match=r"missing required column\(s\) \['preference'\]"):
        load_preference_dataset(path)


def test_missing_directory_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        load_preference_dataset(tmp_path / "nope")


def test_bad_rows_are_reported_with_their_index(tmp_path):
    rows = make_preference_rows(6)
    rows["video_b"][2] = rows["video_a"][2].copy()  # chosen == rejected
    rows["prompt"][4] = "   "
    rows["preference"][5] = "left"
    ds = load_preference_dataset(save_rows(rows, tmp_path / "d"))
    with pytest.raises(PreferenceDataError) as e:
        to_pairs(ds, source="d")
    assert sorted(r for r, _ in e.value.problems) == [2, 4, 5]
    msg = str(e.value)
    assert "row 2: video_a and video_b are identical" in msg
    assert "row 4: empty prompt" in msg
    assert "row 5: preference 'left'" in msg


def test_skip_counts_bad_rows_and_ties(tmp_path):
    rows = make_preference_rows(6)
    rows["video_b"][1] = rows["video_a"][1].copy()
    rows["preference"][3] = "tie"
    ds = load_preference_dataset(save_rows(rows, tmp_path / "d"))
    pairs = to_pairs(ds, bad_rows="skip")
    assert pairs.skipped == {"bad_row": 1, "tie": 1}
    assert pairs.rows == [0, 2, 4, 5]
    assert len(pairs.prompts) + sum(pairs.skipped.values()) == len(ds)  # nothing lost silently
    # chosen follows the label: row 0 prefers b, row 5 prefers a
    np.testing.assert_array_equal(pairs.chosen[0], rows["video_b"][0])
    np.testing.assert_array_equal(pairs.chosen[3], rows["video_a"][5])
    np.testing.assert_array_equal(pairs.rejected[3], rows["video_b"][5])


def test_only_ties_is_an_error(tmp_path):
    rows = make_preference_rows(2)
    rows["preference"] = ["tie", "tie"]
    ds = load_preference_dataset(save_rows(rows, tmp_path / "d"))
    with pytest.raises(ValueError, match="no usable pairs"):
        to_pairs(ds)


def test_empty_dataset_is_an_error(tmp_path):
    ds = datasets.Dataset.from_dict({"prompt": [], "video_a": [], "video_b": [], "preference": []})
    with pytest.raises(ValueError, match="empty"):
        to_pairs(ds, source="empty-set")


def test_video_paths_relative_to_the_dataset_and_missing_files_named(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "d"
    (root / "videos").mkdir(parents=True)
    for name in ("a.gif", "b.gif"):
        write_video(root / "videos" / name, rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8))
    ds = datasets.Dataset.from_dict(
        {
            "prompt": ["p", "q"],
            "video_a": ["videos/a.gif", "videos/a.gif"],
            "video_b": ["videos/b.gif", "videos/missing.gif"],
            "preference": ["a", "b"],
        }
    )
    problems, decoded = validate_rows(ds, "d", root=root)
    assert [r for r, _ in problems] == [1]
    assert "missing.gif" in problems[0][1]
    assert decoded[0][0].shape == (8, 32, 32, 3)


def _untyped(rows: dict) -> datasets.Dataset:
    """The rows with videos as untyped nested lists of uint8 (what ``from_dict`` without
    features gives), not ``datasets.Array4D``."""
    ds = datasets.Dataset.from_dict(rows)
    assert str(ds.features["video_a"]).startswith("List(List(List(List(")
    return ds


def test_untyped_nested_list_videos_validate_like_typed_arrays(tmp_path):
    rows = make_preference_rows(6)
    rows["video_b"][2] = rows["video_a"][2].copy()  # identical videos: a bad row either way
    rows["preference"][4] = "tie"
    typed = load_preference_dataset(save_rows(rows, tmp_path / "typed"))
    untyped = _untyped(rows)
    want = check_rows(typed, "d")
    got = check_rows(untyped, "d")
    assert got.hashes == want.hashes and [str(p) for p in got.problems] == [str(p) for p in want.problems]
    assert got.bad_rows == {2}
    p_typed, p_untyped = to_pairs(typed, bad_rows="skip"), to_pairs(untyped, bad_rows="skip")
    assert p_untyped.rows == p_typed.rows == [0, 1, 3, 5] and p_untyped.skipped == {"bad_row": 1, "tie": 1}
    np.testing.assert_array_equal(p_untyped.chosen, p_typed.chosen)
    np.testing.assert_array_equal(p_untyped.rejected, p_typed.rejected)

    # rows are read as arrays, through an index mapping and across several Arrow chunks
    mixed = datasets.concatenate_datasets([untyped.select(range(3)), untyped.select(range(3, 6))])
    order = [5, 0, 3, 1, 4, 2]
    shuffled = mixed.select(order)
    values = [r["video_a"] for r in iter_rows(shuffled, batch_size=4)]
    assert all(v.dtype == np.uint8 and v.shape == (8, 32, 32, 3) for v in values)
    for v, i in zip(values, order):
        np.testing.assert_array_equal(v, rows["video_a"][i])
    read = value_reader(shuffled, "video_b")
    np.testing.assert_array_equal(read(2), rows["video_b"][3])
    assert check_rows(shuffled, "d").hashes == [want.hashes[i] for i in order]
    assert summarize(untyped)["video_frames"] == [8] * 12


def test_untyped_nested_list_problems_are_named(tmp_path):
    rows = {
        k: [v.tolist() if isinstance(v, np.ndarray) else v for v in vs] for k, vs in make_preference_rows(4).items()
    }
    rows["video_a"][1][3] = rows["video_a"][1][3][:16]  # frame 3 has 16 rows, the others 32
    rows["video_b"][2] = None
    rows["video_b"][3] = [[[[1, 2, 3]]]]  # one 1x1 frame: a still of another size, which is fine
    (tmp_path / "prefs.jsonl").write_text("".join(json.dumps(dict(zip(rows, r))) + "\n" for r in zip(*rows.values())))
    ds = load_preference_dataset(tmp_path / "prefs.jsonl")  # JSON: int64 lists
    rep = check_rows(ds, "prefs.jsonl")
    msgs = {p.row: p.message for p in rep.problems}
    assert sorted(msgs) == [1, 2]
    assert msgs[1] == "video_a: <nested lists>: nested lists of uneven lengths, not a (T, H, W, 3) array"
    assert msgs[2] == "video_b: <none>: no video (empty value)"
    assert rep.info["sizes"] == {"32x32": 5, "1x1": 1} and rep.info["stills"] == 1  # reported, not a problem
    with pytest.raises(ValueError, match=r"videos of 2 shapes .*pass the model's input as the target"):
        to_pairs(ds, bad_rows="skip")  # two sizes and no target: cannot be stacked
    pairs = to_pairs(ds, bad_rows="skip", target={"num_frames": 1, "height": 16, "width": 16})
    assert pairs.rows == [0, 3] and pairs.chosen.shape == (2, 1, 16, 16, 3) and pairs.chosen.dtype == np.uint8
    assert summarize(ds)["unreadable_videos"] == ["row 1 video_a: <nested lists>"]
