"""Tests of video I/O: tensor <-> uint8 conversion, GIF/MP4 round trips, read errors, grid GIFs,
stills as one-frame videos, resampling to a model's input by timestamps."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from align.data.video import (
    check_image,
    decode_video_bytes,
    read_video,
    repeat_frames,
    resample_frames,
    resample_indices,
    resize_center_crop,
    video_info,
    write_grid_gif,
    write_video,
)
from align.frames import from_uint8, to_uint8


def smooth_video(t: int = 8, h: int = 32, w: int = 32) -> np.ndarray:
    """A smooth moving colour gradient, uint8 (T, H, W, 3)."""
    tt, yy, xx = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
    r = 128 + 100 * np.sin(2 * np.pi * (xx / w + tt / t))
    g = 128 + 100 * np.cos(2 * np.pi * yy / h)
    b = 60 + 3 * (xx + yy)
    return np.stack([r, g, b], axis=-1).round().astype(np.uint8)


def few_colour_video(t: int = 6, h: int = 20, w: int = 18) -> np.ndarray:
    """Random pixels drawn from 100 colours: a GIF stores this exactly."""
    rng = np.random.default_rng(0)
    palette = rng.integers(0, 256, (100, 3), dtype=np.uint8)
    return palette[rng.integers(0, 100, (t, h, w))]


def mae(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


# ---------------------------------------------------------------------------------- conversion


def test_to_uint8_shapes_and_clamping():
    x = torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0]).view(1, 1, 5, 1, 1).expand(2, 3, 5, 4, 6)
    out = to_uint8(x)
    assert out.dtype == np.uint8 and out.shape == (2, 5, 4, 6, 3)
    assert out[0, :, 0, 0, 0].tolist() == [0, 0, 128, 255, 255]
    assert to_uint8(x[0]).shape == (5, 4, 6, 3)
    with pytest.raises(ValueError, match="NaN"):
        to_uint8(torch.full((3, 2, 4, 4), float("nan")))
    with pytest.raises(ValueError, match="shape"):
        to_uint8(torch.zeros(3, 4, 4))


def test_uint8_round_trip():
    frames = np.random.default_rng(0).integers(0, 256, (2, 4, 8, 6, 3), dtype=np.uint8)
    x = from_uint8(frames)
    assert x.dtype == torch.float32 and x.shape == (2, 3, 4, 8, 6)
    assert x.min() >= -1 and x.max() <= 1
    np.testing.assert_array_equal(to_uint8(x), frames)
    assert from_uint8(frames[0]).shape == (3, 4, 8, 6)
    np.testing.assert_array_equal(to_uint8(from_uint8(frames[1])), frames[1])
    with pytest.raises(ValueError, match="uint8"):
        from_uint8(frames.astype(np.float32))


# ---------------------------------------------------------------------------------- round trips


def test_gif_round_trip_is_exact_for_few_colours(tmp_path):
    frames = few_colour_video()
    path = write_video(tmp_path / "v.gif", frames, fps=8)
    assert path == tmp_path / "v.gif"
    np.testing.assert_array_equal(read_video(path), frames)
    assert Image.open(path).info["loop"] == 0


def test_gif_round_trip_smooth(tmp_path):
    frames = smooth_video()
    back = read_video(write_video(tmp_path / "v.gif", frames))
    assert back.shape == frames.shape and mae(back, frames) < 5  # > 256 colours: palette loss


def test_gif_keeps_repeated_frames(tmp_path):
    frames = np.repeat(smooth_video()[:1], 5, axis=0)  # a static video
    assert read_video(write_video(tmp_path / "static.gif", frames)).shape == (5, 32, 32, 3)


@pytest.mark.parametrize("suffix", [".mp4", ".webm"])
def test_lossy_round_trip(tmp_path, suffix):
    frames = smooth_video()
    back = read_video(write_video(tmp_path / f"v{suffix}", frames, fps=8))
    assert back.shape == frames.shape and back.dtype == np.uint8
    assert mae(back, frames) < 6


def test_scale_upsamples(tmp_path):
    frames = smooth_video()
    for suffix, tol in ((".gif", 5), (".mp4", 4)):
        back = read_video(write_video(tmp_path / f"big{suffix}", frames, scale=3))
        assert back.shape == (8, 96, 96, 3)
        assert mae(back[:, 1::3, 1::3], frames) < tol


def test_mp4_odd_size_is_padded_to_even(tmp_path):
    frames = smooth_video(h=31, w=29)
    back = read_video(write_video(tmp_path / "odd.mp4", frames))
    assert back.shape == (8, 32, 30, 3)
    assert mae(back[:, :31, :29], frames) < 6


def test_read_num_frames_samples_uniformly(tmp_path):
    frames = few_colour_video(t=9)
    path = write_video(tmp_path / "v.gif", frames)
    np.testing.assert_array_equal(read_video(path, num_frames=3), frames[[0, 4, 8]])
    with pytest.raises(ValueError, match=r"v\.gif.*9 frames.*10"):
        read_video(path, num_frames=10)


def test_write_is_atomic_and_overwrites(tmp_path):
    path = tmp_path / "sub" / "v.mp4"
    write_video(path, smooth_video())
    write_video(path, smooth_video(t=4))
    assert read_video(path).shape[0] == 4
    assert [p.name for p in path.parent.iterdir()] == ["v.mp4"]


def test_write_errors(tmp_path):
    with pytest.raises(ValueError, match=r"unknown video format '\.avi'"):
        write_video(tmp_path / "v.avi", smooth_video())
    with pytest.raises(ValueError, match="uint8"):
        write_video(tmp_path / "v.gif", smooth_video().astype(np.float32))
    with pytest.raises(ValueError, match="shape"):
        write_video(tmp_path / "v.gif", smooth_video()[0])
    with pytest.raises(ValueError, match="scale"):
        write_video(tmp_path / "v.gif", smooth_video(), scale=0)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------- read errors


@pytest.mark.parametrize("name", ["missing.mp4", "missing.gif"])
def test_read_missing_file_names_it(tmp_path, name):
    with pytest.raises(ValueError, match=name):
        read_video(tmp_path / name)


@pytest.mark.parametrize("name", ["garbage.mp4", "garbage.gif", "garbage.webm", "empty.mp4"])
def test_read_garbage_file_names_it(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"" if name.startswith("empty") else np.random.default_rng(0).bytes(4096))
    with pytest.raises(ValueError, match=name):
        read_video(path)


# ---------------------------------------------------------------------------------- grid


def test_grid_gif(tmp_path):
    a, b = smooth_video(), few_colour_video(t=8, h=32, w=32)
    path = write_grid_gif(
        [[a, b], [b, a], [a, b]],
        tmp_path / "grid.gif",
        row_labels=["a red circle moving left on a blue background", "short", "x" * 200],
        col_labels=["base", "DPO"],
        scale=2,
        fps=6,
    )
    with Image.open(path) as im:
        assert im.n_frames == 8
        width, height = im.size
    assert width > 2 * 64 and height > 3 * 64  # tiles plus label column and header
    grid = read_video(path)
    assert grid.shape == (8, height, width, 3)
    # the bottom-right tile is video b, upscaled 2x, flush with the 2-pixel outer margin
    # (lossy: a frame of the grid has more than a GIF palette's 256 colours)
    tile = grid[:, height - 2 - 64 : height - 2, width - 2 - 64 : width - 2]
    assert mae(tile[:, ::2, ::2], b) < 8


def test_grid_gif_errors(tmp_path):
    a = smooth_video()
    with pytest.raises(ValueError, match="same number of frames"):
        write_grid_gif([[a, a[:4]]], tmp_path / "g.gif")
    with pytest.raises(ValueError, match="row labels"):
        write_grid_gif([[a]], tmp_path / "g.gif", row_labels=["a", "b"])
    with pytest.raises(ValueError, match=r"\.gif"):
        write_grid_gif([[a]], tmp_path / "g.mp4")


# ------------------------------------------------------------------------------ stills, resampling


def test_stills_are_one_frame_videos(tmp_path):
    img = smooth_video(1, 24, 40)[0]
    Image.fromarray(img).save(tmp_path / "x.png")
    Image.fromarray(img).save(tmp_path / "x.jpg", quality=95)
    png = read_video(tmp_path / "x.png")
    assert png.shape == (1, 24, 40, 3) and png.dtype == np.uint8
    np.testing.assert_array_equal(png[0], img)  # PNG is lossless
    assert read_video(tmp_path / "x.jpg").shape == (1, 24, 40, 3)
    assert decode_video_bytes((tmp_path / "x.jpg").read_bytes()).shape == (1, 24, 40, 3)
    assert video_info(tmp_path / "x.png")["frames"] == 1 and video_info(tmp_path / "x.png")["fps"] is None
    data = (tmp_path / "x.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut\.jpg: cannot decode image \(OSError"):
        read_video(tmp_path / "cut.jpg")
    with pytest.raises(ValueError, match=r"row 3: cannot decode image \(OSError"):
        check_image(io.BytesIO(data[: len(data) // 2]), "row 3")
    assert check_image(io.BytesIO(data), "ok") == (24, 40)


def test_resample_indices_follow_timestamps_not_the_frame_count():
    assert resample_indices(48, 24, 8, 8).tolist() == [0, 3, 6, 9, 12, 15, 18, 21]  # 24 -> 8 fps: every 3rd
    assert resample_indices(10, 8, 6, 16).tolist() == [0, 0, 1, 1, 2, 2]  # 8 -> 16 fps: each frame twice
    assert resample_indices(30, 30, None, 10).tolist() == [0, 3, 6, 9, 12, 15, 18, 21, 24, 27]  # whole clip
    assert resample_indices(5, None, 5, 16).tolist() == [0, 1, 2, 3, 4]  # no source rate: plays at the target
    assert resample_indices(1, None, 1, 16).tolist() == [0]  # a still for a one-frame model
    assert resample_indices(48, 24, 8, None).tolist() == [0, 7, 13, 20, 27, 34, 40, 47]  # no fps: spread
    with pytest.raises(ValueError, match=r"64 frames at 16 fps \(4.00 s\), too short for 81 frames at 16 fps"):
        resample_indices(64, 16, 81, 16)
    with pytest.raises(ValueError, match=r"an image \(1 frame\) cannot give the 33 frames.*--repeat-frames 33"):
        resample_indices(1, None, 33, 16)


def test_resample_frames_brings_any_size_to_one_shape():
    wide, tall = smooth_video(24, 36, 64), smooth_video(40, 64, 48)
    a = resample_frames(wide, 24, num_frames=8, fps=8, height=32, width=32)
    b = resample_frames(tall, 30, num_frames=8, fps=8, height=32, width=32)
    assert a.shape == b.shape == (8, 32, 32, 3) and a.dtype == b.dtype == np.uint8
    # frame k of the 24 fps clip at 8 fps is source frame 3k, resized to cover and centre-cropped
    np.testing.assert_array_equal(a, resize_center_crop(wide[::3][:8], 32, 32))
    assert resample_frames(wide, 24) is wide  # nothing asked: unchanged
    still = repeat_frames(wide[:1], 4)
    assert still.shape == (4, 36, 64, 3) and (still == wide[0]).all()
