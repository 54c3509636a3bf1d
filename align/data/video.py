"""Video I/O helpers: GIF/MP4/WebM writing and reading, resampling, labelled grids (tensor <->
uint8 conversion is :mod:`align.frames`).

Conventions:

- Model-side videos are float torch tensors ``(B, C, T, H, W)`` (or ``(C, T, H, W)``) in [-1, 1].
- File-side videos are numpy ``uint8`` arrays ``(T, H, W, 3)`` (RGB), batches ``(B, T, H, W, 3)``.

Files are written atomically: to a temporary file in the destination folder, then ``os.replace``,
so a crash never leaves a half-written video under the final name.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
from PIL import GifImagePlugin, Image, ImageDraw, ImageFont, ImageSequence, UnidentifiedImageError

from align.atomic import atomic_write

VIDEO_SUFFIXES = (".gif", ".mp4", ".webm")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")  # read as one-frame videos (T = 1)


# --------------------------------------------------------------------------------------------
# writing


def write_video(path: str | Path, frames: np.ndarray, fps: int = 8, scale: int = 1) -> Path:
    """Write uint8 RGB ``frames`` ``(T, H, W, 3)`` to ``path``; the suffix picks the format.

    - ``.gif``: lossless up to a 256-colour palette per frame, loops forever. Every frame is
      kept, including repeats (Pillow's own GIF writer would merge identical consecutive frames).
    - ``.mp4``: H.264 (libx264) if this PyAV build has it, else MPEG-4 Part 2, both yuv420p.
    - ``.webm``: VP9 (libvpx-vp9), else VP8, yuv420p.

    yuv420p stores colour at half resolution, so its width and height must be even: an odd-sized
    video is padded by one replicated column (right) and/or row (bottom) and reads back that much
    larger. ``scale`` (integer >= 1) upscales each frame by pixel repetition first, which keeps tiny
    (e.g. 32x32) videos crisp and also sidesteps most of the colour loss of yuv420p.

    Returns the path. Raises ``ValueError`` for an unknown suffix or malformed frames.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in VIDEO_SUFFIXES:
        raise ValueError(f"{path}: unknown video format {suffix!r}; use one of {list(VIDEO_SUFFIXES)}")
    frames = _check_frames(frames, str(path))
    if fps <= 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    if int(scale) != scale or scale < 1:
        raise ValueError(f"scale must be an integer >= 1, got {scale}")
    if scale > 1:
        frames = frames.repeat(scale, axis=1).repeat(scale, axis=2)

    if suffix == ".gif":
        return atomic_write(path, lambda tmp: _write_gif(tmp, frames, fps))
    codecs = ("libx264", "mpeg4") if suffix == ".mp4" else ("libvpx-vp9", "libvpx")
    fmt = "mp4" if suffix == ".mp4" else "webm"
    return atomic_write(path, lambda tmp: _write_av(tmp, _pad_even(frames), fps, fmt, _pick_encoder(codecs)))


def write_grid_gif(
    rows: list[list[np.ndarray]],
    path: str | Path,
    row_labels: list[str] | None = None,
    col_labels: list[str] | None = None,
    scale: int = 3,
    fps: int = 6,
) -> Path:
    """Tile videos into a labelled grid and write it as an animated GIF (atomically).

    ``rows[i][j]`` is a uint8 video ``(T, H, W, 3)``; every video must have the same ``T``. Each is
    upscaled ``scale`` times (nearest neighbour). Column labels go in a header above the grid,
    row labels in a column on its left (word-wrapped, truncated with ".." when they do not fit),
    in PIL's default font. Rows may have different lengths; missing cells stay blank.
    """
    path = Path(path)
    if path.suffix.lower() != ".gif":
        raise ValueError(f"{path}: write_grid_gif writes GIFs; the path must end in .gif")
    if not rows or not any(rows):
        raise ValueError("write_grid_gif needs at least one video")
    if int(scale) != scale or scale < 1:
        raise ValueError(f"scale must be an integer >= 1, got {scale}")
    videos = [[_check_frames(v, f"rows[{i}][{j}]") for j, v in enumerate(row)] for i, row in enumerate(rows)]
    lengths = {v.shape[0] for row in videos for v in row}
    if len(lengths) != 1:
        raise ValueError(f"all videos in a grid need the same number of frames, got {sorted(lengths)}")
    n_rows, n_cols = len(videos), max(len(row) for row in videos)
    if row_labels is not None and len(row_labels) != n_rows:
        raise ValueError(f"{len(row_labels)} row labels for {n_rows} rows")
    if col_labels is not None and len(col_labels) != n_cols:
        raise ValueError(f"{len(col_labels)} column labels for {n_cols} columns")

    pad = 2
    tile_h = max(v.shape[1] for row in videos for v in row) * scale
    tile_w = max(v.shape[2] for row in videos for v in row) * scale
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = _text_height(measure, font) + 2

    # layout: optional label column on the left, optional header row on top, tiles with `pad` gaps
    label_w = 0
    if row_labels:
        widest = max(measure.textlength(str(s), font=font) for s in row_labels)
        label_w = int(min(widest, max(120, tile_w))) + 2 * pad
    header_h = line_h + 2 * pad if col_labels else 0
    width = label_w + n_cols * (tile_w + pad) + pad
    height = header_h + n_rows * (tile_h + pad) + pad

    # static background: white canvas with the labels drawn once
    background = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(background)
    for j, label in enumerate(col_labels or []):
        text = _fit_text(draw, str(label), font, tile_w, 1)[0]
        x0 = label_w + pad + j * (tile_w + pad)
        draw.text((x0 + (tile_w - draw.textlength(text, font=font)) / 2, pad), text, fill=(0, 0, 0), font=font)
    for i, label in enumerate(row_labels or []):
        lines = _fit_text(draw, str(label), font, label_w - 2 * pad, max(1, tile_h // line_h))
        y0 = header_h + pad + i * (tile_h + pad) + (tile_h - len(lines) * line_h) // 2
        for k, line in enumerate(lines):
            draw.text((pad, y0 + k * line_h), line, fill=(0, 0, 0), font=font)
    canvas = np.asarray(background)

    n_frames = lengths.pop()
    grid = np.repeat(canvas[None], n_frames, axis=0)
    for i, row in enumerate(videos):
        for j, v in enumerate(row):
            tile = v.repeat(scale, axis=1).repeat(scale, axis=2)
            y0 = header_h + pad + i * (tile_h + pad)
            x0 = label_w + pad + j * (tile_w + pad)
            grid[:, y0 : y0 + tile.shape[1], x0 : x0 + tile.shape[2]] = tile
    return write_video(path, grid, fps=fps)


# --------------------------------------------------------------------------------------------
# reading


def read_video(path: str | Path, num_frames: int | None = None) -> np.ndarray:
    """Decode a video file to uint8 RGB ``(T, H, W, 3)``: GIFs and images with PIL, anything else
    with PyAV. An image (``IMAGE_SUFFIXES``: JPEG, PNG, WebP, BMP) is a video with ``T = 1``; a
    truncated or corrupt one is an error naming the file, never a half-grey picture.

    With ``num_frames``, returns that many frames sampled uniformly over the video (first and last
    included). Raises ``ValueError`` naming the file if it is missing, cannot be decoded, has no
    frames, or has fewer than ``num_frames`` frames.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such video file")
    if num_frames is not None and num_frames < 1:
        raise ValueError(f"{path}: num_frames must be >= 1, got {num_frames}")
    image = path.suffix.lower() in IMAGE_SUFFIXES
    try:
        frames = _read_gif(path) if path.suffix.lower() == ".gif" or image else _read_av(path)
    except (av.FFmpegError, OSError, ValueError, EOFError, SyntaxError) as e:
        what = "image" if image else "video"
        raise ValueError(f"{path}: cannot decode {what} ({_error_text(e)})") from e
    if not frames:
        raise ValueError(f"{path}: video has no frames")
    if len({f.shape for f in frames}) != 1:
        raise ValueError(f"{path}: frames change size mid-video: {sorted({f.shape for f in frames})}")
    video = np.stack(frames)
    if num_frames is None:
        return video
    if len(video) < num_frames:
        raise ValueError(f"{path}: video has {len(video)} frames, fewer than the {num_frames} requested")
    idx = np.linspace(0, len(video) - 1, num_frames).round().astype(int)
    return video[idx]


# --------------------------------------------------------------------------------------------
# internals


def _check_frames(frames: np.ndarray, name: str) -> np.ndarray:
    """Validate uint8 RGB frames ``(T, H, W, 3)`` with T >= 1 and return them as an array."""
    arr = np.asarray(frames)
    if arr.dtype != np.uint8:
        raise ValueError(f"{name}: frames must be uint8, got {arr.dtype} (convert float videos with to_uint8)")
    if arr.ndim != 4 or arr.shape[-1] != 3 or min(arr.shape) == 0:
        raise ValueError(f"{name}: frames must be (T, H, W, 3) with T, H, W >= 1, got shape {arr.shape}")
    return arr


def _write_gif(filename: str, frames: np.ndarray, fps: float) -> None:
    """Write every frame as a full GIF image with its own adaptive palette, looping forever.

    Uses Pillow's frame-level GIF helpers (``getheader`` / ``getdata``) rather than
    ``Image.save(save_all=True)``, which drops frames identical to the previous one.
    """
    delay_ms = max(20, round(1000 / fps))  # GIF delays are in 1/100 s; most viewers treat < 20 ms as slow
    images = [
        Image.fromarray(f).quantize(256, method=Image.Quantize.MAXCOVERAGE, dither=Image.Dither.NONE) for f in frames
    ]
    header, _ = GifImagePlugin.getheader(images[0], info={"loop": 0, "duration": delay_ms})
    with open(filename, "wb") as fp:
        fp.writelines(header)
        for k, im in enumerate(images):
            fp.writelines(GifImagePlugin.getdata(im, (0, 0), duration=delay_ms, include_color_table=k > 0))
        fp.write(b";")  # GIF trailer


def _pick_encoder(names: tuple[str, ...]) -> str:
    """First encoder in ``names`` that this PyAV/FFmpeg build provides."""
    for name in names:
        try:
            av.Codec(name, "w")
            return name
        except (av.FFmpegError, ValueError):
            continue
    raise ValueError(f"none of the encoders {list(names)} is available in this PyAV build")


def _pad_even(frames: np.ndarray) -> np.ndarray:
    """Pad height and width to even numbers by replicating the last row/column (yuv420p needs it)."""
    _, h, w, _ = frames.shape
    if h % 2 == 0 and w % 2 == 0:
        return frames
    return np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")


def _write_av(filename: str, frames: np.ndarray, fps: float, fmt: str, codec: str) -> None:
    """Encode frames with PyAV into container ``fmt`` using ``codec`` at high quality, yuv420p."""
    _, h, w, _ = frames.shape
    with av.open(filename, mode="w", format=fmt) as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "15", "preset": "medium"}
        else:  # mpeg4 / vp8 / vp9: ask for a generous bit rate; tiny videos stay small anyway
            stream.bit_rate = max(1_000_000, 8 * w * h * int(np.ceil(fps)))
        for f in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        container.mux(stream.encode(None))  # flush delayed frames


def _read_gif(path) -> list[np.ndarray]:
    """All frames of a GIF (or of any image Pillow reads: one frame for a still) as RGB arrays
    (Pillow composites partial frames onto the canvas). ``path`` may be a file object."""
    with Image.open(path) as im:
        return [np.asarray(frame.convert("RGB")) for frame in ImageSequence.Iterator(im)]


def _read_av(path: Path) -> list[np.ndarray]:
    """All frames of the first video stream, decoded by PyAV to RGB arrays."""
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


def _text_height(draw: ImageDraw.ImageDraw, font) -> int:
    """Pixel height of a line of text in ``font``."""
    left, top, right, bottom = draw.textbbox((0, 0), "Ag|", font=font)
    return bottom - top


def _fit_text(draw: ImageDraw.ImageDraw, text: str, font, max_w: float, max_lines: int) -> list[str]:
    """Greedy word-wrap ``text`` into at most ``max_lines`` lines of width ``max_w``; truncate with ".."."""
    lines: list[str] = []
    words = text.split()
    while words and len(lines) < max_lines:
        line = words.pop(0)
        while words and draw.textlength(f"{line} {words[0]}", font=font) <= max_w:
            line = f"{line} {words.pop(0)}"
        lines.append(line)
    if words:  # out of lines: the rest goes on the last line, which gets cut below
        lines[-1] = " ".join([lines[-1], *words])
    return [_cut(draw, s, font, max_w) for s in lines] or [""]


def _cut(draw: ImageDraw.ImageDraw, text: str, font, max_w: float) -> str:
    """Shorten ``text`` to fit ``max_w``, ending in ".." when anything was cut."""
    if draw.textlength(text, font=font) <= max_w:
        return text
    while text and draw.textlength(text + "..", font=font) > max_w:
        text = text[:-1]
    return text + ".."


# --------------------------------------------------------------------------------------------
# probing, in-memory decoding and frame preparation (for preference datasets and the latent cache)


def video_info(path: str | Path) -> dict:
    """What a video file holds, read from its container (no full decode when it records them).

    Returns ``{"frames", "fps", "duration_s", "height", "width", "bytes"}``; ``fps`` and
    ``duration_s`` are ``None`` when the file does not record a frame rate. WebM files often
    store no frame count; their frames are then counted by demuxing packets (still no decode).
    Raises ``ValueError`` naming the file if it is missing or not a video.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such video file")
    size = path.stat().st_size
    try:
        if path.suffix.lower() == ".gif" or path.suffix.lower() in IMAGE_SUFFIXES:
            with Image.open(path) as im:
                n = getattr(im, "n_frames", 1)
                ms = im.info.get("duration") or 0
                fps = 1000.0 / ms if ms else None
                return {
                    "frames": n,
                    "fps": fps,
                    "duration_s": n / fps if fps else None,
                    "height": im.height,
                    "width": im.width,
                    "bytes": size,
                }
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError("no video stream")
            stream = container.streams.video[0]
            fps = float(stream.average_rate) if stream.average_rate else None
            n = stream.frames or sum(1 for p in container.demux(stream) if p.size)
            return {
                "frames": n,
                "fps": fps,
                "duration_s": n / fps if fps else None,
                "height": stream.codec_context.height,
                "width": stream.codec_context.width,
                "bytes": size,
            }
    except (av.FFmpegError, OSError, ValueError, EOFError) as e:
        raise ValueError(f"{path}: cannot read video ({type(e).__name__}: {e})") from e


def sniff_video_format(data: bytes) -> str | None:
    """The suffix (``.mp4`` / ``.webm`` / ``.gif``) that the first bytes of a video file say, or None."""
    if data[4:8] == b"ftyp":
        return ".mp4"
    if data[:4] == b"\x1aE\xdf\xa3":  # EBML header: Matroska / WebM
        return ".webm"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return ".gif"
    return None


def sniff_image_format(data: bytes) -> str | None:
    """The suffix (``.jpg`` / ``.png`` / ``.webp`` / ``.bmp``) that the first bytes of an image say, or None."""
    if data[:3] == b"\xff\xd8\xff":
        return ".jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return ".png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    if data[:2] == b"BM":
        return ".bmp"
    return None


def sniff_media_format(data: bytes) -> str | None:
    """The suffix of a video or image from its first 16 bytes (video formats first), or None."""
    return sniff_video_format(data) or sniff_image_format(data)


def check_image(source, name: str) -> tuple[int, int]:
    """Decode an image (a path or a file object) just enough to know it is whole; return
    ``(height, width)``. JPEGs are decoded at 1/8 scale (Pillow's draft mode reads every
    entropy-coded byte, so truncation is still found, for a fraction of the cost). Raises
    ``ValueError`` naming ``name`` for a truncated, corrupt or unknown image."""
    try:
        with Image.open(source) as im:
            size = (im.height, im.width)
            if im.format == "JPEG":
                im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
            im.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"{name}: cannot decode image ({_error_text(e)})") from None
    return size


def _error_text(e: Exception) -> str:
    """An exception as ``Type: message``, without the file object's repr Pillow puts in some."""
    if isinstance(e, UnidentifiedImageError):
        return "UnidentifiedImageError: not an image Pillow can identify"
    return f"{type(e).__name__}: {e}"


def decode_video_bytes(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Decode an encoded video or image held in memory (e.g. a dataset's ``bytes`` column) to
    uint8 ``(T, H, W, 3)`` (an image: ``T = 1``). Raises ``ValueError`` naming ``name`` when it
    is neither a decodable video (mp4, webm, gif) nor a decodable image (jpeg, png, webp, bmp)."""
    import io

    head = bytes(data[:16])
    kind = sniff_video_format(head)
    image = kind is None and sniff_image_format(head) is not None
    if kind is None and not image:
        raise ValueError(f"{name}: bytes are not an mp4, webm or gif video nor a jpeg, png, webp or bmp image")
    try:
        if kind == ".gif" or image:
            frames = _read_gif(io.BytesIO(data))
        else:
            with av.open(io.BytesIO(data)) as container:
                if not container.streams.video:
                    raise ValueError("no video stream")
                frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    except (av.FFmpegError, OSError, ValueError, EOFError, SyntaxError) as e:
        what = "image" if image else "video"
        raise ValueError(f"{name}: cannot decode {what} ({_error_text(e)})") from e
    if not frames:
        raise ValueError(f"{name}: video has no frames")
    if len({f.shape for f in frames}) != 1:
        raise ValueError(f"{name}: frames change size mid-video")
    return np.stack(frames)


def bytes_fps(data: bytes) -> float | None:
    """The frame rate an encoded video in memory records (None for images, GIFs without a
    frame delay, or anything unreadable: this is a hint, decoding reports the errors)."""
    import io

    head = bytes(data[:16])
    try:
        if sniff_video_format(head) == ".gif":
            with Image.open(io.BytesIO(data)) as im:
                ms = im.info.get("duration") or 0
                return 1000.0 / ms if ms else None
        if sniff_video_format(head) is None:
            return None
        with av.open(io.BytesIO(data)) as container:
            rate = container.streams.video[0].average_rate if container.streams.video else None
            return float(rate) if rate else None
    except (av.FFmpegError, OSError, ValueError, EOFError):
        return None


def sample_frame_indices(
    total: int, num_frames: int, src_fps: float | None = None, target_fps: float | None = None
) -> np.ndarray:
    """Indices of ``num_frames`` frames out of ``total``.

    Without ``target_fps``: spread uniformly over the whole video, first and last included (as
    :func:`read_video` does). With ``target_fps`` (needs the file's ``src_fps``): every
    ``src_fps / target_fps``-th frame from the start, so the clip plays at ``target_fps`` in real
    time; the clip covers ``num_frames / target_fps`` seconds. Raises ``ValueError`` when the
    video is too short for either rule.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if target_fps is None:
        if total < num_frames:
            raise ValueError(f"video has {total} frames, fewer than the {num_frames} needed")
        return np.linspace(0, total - 1, num_frames).round().astype(int)
    if not src_fps or src_fps <= 0 or target_fps <= 0:
        raise ValueError(f"fps-aware sampling needs positive fps: source {src_fps}, target {target_fps}")
    step = src_fps / target_fps
    idx = np.floor(np.arange(num_frames) * step + 1e-6).astype(int)
    if idx[-1] >= total:
        need = num_frames / target_fps
        raise ValueError(
            f"video has {total} frames at {src_fps:g} fps ({total / src_fps:.2f} s), too short for "
            f"{num_frames} frames at {target_fps:g} fps ({need:.2f} s)"
        )
    return idx


def resize_center_crop(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """Scale uint8 frames ``(T, H, W, 3)`` so they cover ``height x width`` (keeping the aspect
    ratio; bilinear with antialiasing), then cut the centre. A no-op when the size already matches."""
    frames = _check_frames(frames, "resize_center_crop")
    if height < 1 or width < 1:
        raise ValueError(f"target size must be >= 1, got {height}x{width}")
    _, h, w, _ = frames.shape
    if (h, w) == (height, width):
        return frames
    scale = max(height / h, width / w)
    new_h, new_w = max(height, round(h * scale)), max(width, round(w * scale))
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
    x = torch.nn.functional.interpolate(x, size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    x = x[:, :, top : top + height, left : left + width]
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def prepare_video(
    frames: np.ndarray,
    num_frames: int | None = None,
    height: int | None = None,
    width: int | None = None,
    src_fps: float | None = None,
    target_fps: float | None = None,
) -> np.ndarray:
    """Bring decoded frames to a model's input: pick ``num_frames`` (uniformly, or fps-aware with
    ``target_fps``), then resize / centre-crop to ``height x width``. ``None`` leaves that part alone."""
    frames = _check_frames(frames, "prepare_video")
    if num_frames is not None:
        frames = frames[sample_frame_indices(len(frames), num_frames, src_fps, target_fps)]
    if height is not None or width is not None:
        frames = resize_center_crop(frames, height or frames.shape[1], width or frames.shape[2])
    return frames


def resample_indices(
    total: int, src_fps: float | None, num_frames: int | None = None, fps: float | None = None
) -> np.ndarray:
    """Which source frames make a clip of ``num_frames`` frames at ``fps``, by timestamps.

    Output frame ``k`` shows the source frame on screen at time ``k / fps``: index
    ``floor(k * src_fps / fps)``, from the start of the video. A faster source skips frames, a
    slower one repeats them; the frame count is never squeezed to fit. Without a frame rate on
    either side (``src_fps`` None: arrays, GIFs without a frame delay; or ``fps`` None) there are
    no timestamps: ``num_frames`` are spread uniformly over the frames there are (repeating some
    when there are fewer). ``num_frames=None`` keeps every frame. A one-frame video (an image) gives one frame and
    cannot give more. Raises ``ValueError`` saying how long the video is and how long it must be.
    """
    if total < 1:
        raise ValueError("video has no frames")
    if num_frames is not None and num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if total == 1 and (num_frames or 1) > 1:
        raise ValueError(
            f"an image (1 frame) cannot give the {num_frames} frames the model takes: import it with "
            f"--repeat-frames {num_frames}, or use a model that takes single frames"
        )
    if fps is None or src_fps is None:
        if num_frames is None:
            return np.arange(total)
        if total < num_frames:  # nearest frames, some shown twice
            return np.round(np.linspace(0, total - 1, num_frames)).astype(int)
        return sample_frame_indices(total, num_frames)
    if fps <= 0 or src_fps <= 0:
        raise ValueError(f"frame rates must be > 0: source {src_fps}, target {fps}")
    src = float(src_fps)
    n = num_frames if num_frames is not None else max(1, int(np.floor(total / src * fps + 1e-6)))
    idx = np.floor(np.arange(n) * (src / fps) + 1e-6).astype(int)
    if idx[-1] >= total:
        raise ValueError(
            f"video has {total} frames at {src:g} fps ({total / src:.2f} s), too short for {n} frames at "
            f"{fps:g} fps ({n / fps:.2f} s); use fewer frames or a lower fps"
        )
    return idx


def resample_frames(
    video: np.ndarray,
    src_fps: float | None,
    num_frames: int | None = None,
    fps: float | None = None,
    height: int | None = None,
    width: int | None = None,
) -> np.ndarray:
    """Bring uint8 frames ``(T, H, W, C)`` of any size, fps and length to a model's input:
    temporal sampling by timestamps at ``fps`` (:func:`resample_indices`), then resize and centre
    crop to ``height x width`` (:func:`resize_center_crop`). ``None`` leaves that part as it is.
    Returns uint8 ``(num_frames, height, width, C)``."""
    video = _check_frames(video, "resample_frames")
    if num_frames is not None or fps is not None:
        idx = resample_indices(len(video), src_fps, num_frames, fps)
        if len(idx) != len(video) or (idx != np.arange(len(video))).any():
            video = video[idx]
    if height is not None or width is not None:
        video = resize_center_crop(video, height or video.shape[1], width or video.shape[2])
    return video


def repeat_frames(frames: np.ndarray, n: int) -> np.ndarray:
    """A still (``T = 1``) as ``n`` identical frames, for models that cannot take one frame."""
    frames = _check_frames(frames, "repeat_frames")
    if n < 1:
        raise ValueError(f"--repeat-frames must be >= 1, got {n}")
    return np.repeat(frames[:1], n, axis=0) if len(frames) == 1 else frames
