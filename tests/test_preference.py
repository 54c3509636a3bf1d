"""Preference data: missing columns, bad rows reported with their index, skips counted."""

import datasets
import numpy as np
import pytest
from conftest import make_preference_rows, save_rows

from align.data.preference import PreferenceDataError, load_preference_dataset, to_pairs, validate_rows
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
