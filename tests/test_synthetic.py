"""Tests of the synthetic world: prompts, splits, rendering, and the oracle judge."""

from __future__ import annotations

import re

import numpy as np
import pytest

from align.demo.synthetic import (
    BACKGROUNDS,
    COLORS,
    DIRECTIONS,
    ORACLE_WEIGHTS,
    SHAPES,
    Scene,
    all_scenes,
    oracle_prefer,
    oracle_score,
    oracle_scores,
    parse_prompt,
    render,
    sample_videos,
    split_scenes,
)

SEEDS = range(50)
KEYS = ("background", "color", "shape", "direction", "smoothness", "total")


# -----------------------------------------------------------------------------
# helpers


def random_scene(rng: np.random.Generator) -> Scene:
    """A scene drawn uniformly from the world."""
    scenes = all_scenes()
    return scenes[rng.integers(len(scenes))]


def other(value: str, vocab, rng: np.random.Generator) -> str:
    """A word of the vocabulary other than ``value``."""
    choices = [v for v in vocab if v != value]
    return choices[rng.integers(len(choices))]


def foreground(video: np.ndarray, background: str) -> np.ndarray:
    """Coverage-like mask (T, H, W) of a clean render: distance from the background over the
    distance of the object's colour (taken as the frame's largest distance)."""
    dist = np.linalg.norm(video.astype(float) - np.array(BACKGROUNDS[background], float), axis=-1)
    return dist / dist.max(axis=(1, 2), keepdims=True)


def centroids(mask: np.ndarray) -> np.ndarray:
    """(T, 2) centroids (x, y) of a mask (T, H, W)."""
    T, H, W = mask.shape
    ys, xs = np.mgrid[0:H, 0:W] + 0.5
    mass = mask.sum(axis=(1, 2))
    return np.stack([(mask * xs).sum(axis=(1, 2)) / mass, (mask * ys).sum(axis=(1, 2)) / mass], axis=-1)


def shift(frame: np.ndarray, dx: int, dy: int, fill: tuple[int, int, int]) -> np.ndarray:
    """A frame moved by (dx, dy) whole pixels, the uncovered part filled with ``fill``."""
    H, W, _ = frame.shape
    out = np.empty_like(frame)
    out[:] = fill
    out[max(dy, 0) : H + min(dy, 0), max(dx, 0) : W + min(dx, 0)] = frame[
        max(-dy, 0) : H + min(-dy, 0), max(-dx, 0) : W + min(-dx, 0)
    ]
    return out


def jitter(video: np.ndarray, background: str, rng: np.random.Generator, amount: int = 2) -> np.ndarray:
    """Every frame moved by its own random offset of up to ``amount`` pixels per axis."""
    offsets = rng.integers(-amount, amount + 1, size=(len(video), 2))
    return np.stack([shift(f, int(dx), int(dy), BACKGROUNDS[background]) for f, (dx, dy) in zip(video, offsets)])


def shuffle(video: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The frames in a random order that is far from the original one."""
    T = len(video)
    while True:
        perm = rng.permutation(T)
        if np.abs(np.corrcoef(perm, np.arange(T))[0, 1]) < 0.5:
            return video[perm]


def blur(video: np.ndarray) -> np.ndarray:
    """A 3x3 binomial blur of every frame (edge pixels repeated)."""
    x = np.pad(video.astype(np.float32), [(0, 0), (1, 1), (1, 1), (0, 0)], mode="edge")
    k = np.array([1.0, 2.0, 1.0]) / 4
    x = k[0] * x[:, :-2] + k[1] * x[:, 1:-1] + k[2] * x[:, 2:]
    x = k[0] * x[:, :, :-2] + k[1] * x[:, :, 1:-1] + k[2] * x[:, :, 2:]
    return np.round(x).astype(np.uint8)


def noisy(video: np.ndarray, rng: np.random.Generator, sigma: float = 20.0) -> np.ndarray:
    """The clip plus Gaussian pixel noise."""
    return np.clip(video + rng.normal(0, sigma, video.shape), 0, 255).astype(np.uint8)


def wrong_render(attribute: str, seed: int) -> tuple[Scene, np.ndarray, np.ndarray]:
    """A scene, its clip, and a clip of the same draw that gets ``attribute`` wrong."""
    rng = np.random.default_rng(seed)
    scene = random_scene(rng)
    good = render(scene, np.random.default_rng(1000 + seed))
    if attribute == "smoothness":
        bad = shuffle(good, rng) if seed % 2 else jitter(good, scene.background, rng)
        return scene, good, bad
    vocab = {"color": COLORS, "shape": SHAPES, "direction": DIRECTIONS, "background": BACKGROUNDS}[attribute]
    fields = {"color": scene.color, "shape": scene.shape, "direction": scene.direction, "background": scene.background}
    fields[attribute] = other(fields[attribute], vocab, rng)
    bad = render(Scene(**fields), np.random.default_rng(1000 + seed))  # same size, speed, start
    return scene, good, bad


# -----------------------------------------------------------------------------
# prompts and splits


def test_vocabulary():
    assert len(COLORS) == 7 and len(SHAPES) == 3 and len(DIRECTIONS) == 4 and len(BACKGROUNDS) == 3
    for c in COLORS.values():
        for b in BACKGROUNDS.values():
            assert np.linalg.norm(np.subtract(c, b)) > 150, (c, b)
    assert abs(sum(ORACLE_WEIGHTS.values()) - 1) < 1e-9


def test_prompt_round_trip():
    scenes = all_scenes()
    assert len(scenes) == 252 == len(set(scenes))
    assert scenes == all_scenes()
    for scene in scenes:
        assert parse_prompt(scene.prompt) == scene
        messy = "  " + scene.prompt.upper().replace(" ", "   ") + " \n"
        assert parse_prompt(messy) == scene
    assert Scene("red", "square", "left", "black").prompt == "a red square moving left on a black background"


@pytest.mark.parametrize(
    "prompt",
    [
        "a purple square moving left on a black background",
        "a red hexagon moving left on a black background",
        "a red square moving sideways on a black background",
        "a red square moving left on a pink background",
        "a red square moving left on a black",
        "a red square moving left",
        "the red square moving left on a black background",
        "",
    ],
)
def test_parse_prompt_errors_name_the_prompt(prompt):
    with pytest.raises(ValueError, match=re.escape(repr(prompt))):
        parse_prompt(prompt)


def test_split_is_disjoint_deterministic_and_covers_every_word():
    train, heldout = split_scenes()
    assert heldout and train
    assert not set(train) & set(heldout)
    assert set(train) | set(heldout) == set(all_scenes())
    assert (train, heldout) == split_scenes()
    assert split_scenes(seed=1)[1] != heldout
    assert len(heldout) == round(0.2 * 252)
    assert {s.color for s in train} == set(COLORS) and {s.shape for s in train} == set(SHAPES)
    assert {s.direction for s in train} == set(DIRECTIONS) and {s.background for s in train} == set(BACKGROUNDS)
    assert len(split_scenes(heldout_fraction=0.0)[1]) == 1
    with pytest.raises(ValueError):
        split_scenes(heldout_fraction=1.0)


# -----------------------------------------------------------------------------
# rendering


@pytest.mark.parametrize("num_frames,size", [(8, 32), (16, 32), (8, 48)])
def test_render_shape_and_motion(num_frames, size):
    for seed in range(40):
        scene = random_scene(np.random.default_rng(seed))
        video = render(scene, np.random.default_rng(seed), num_frames=num_frames, size=size)
        assert video.shape == (num_frames, size, size, 3) and video.dtype == np.uint8
        mask = foreground(video, scene.background)
        # the shape is wholly in frame: same mass every frame, nothing on the far side of the border
        mass = mask.sum(axis=(1, 2))
        assert mass.min() > 0.95 * mass.max(), (scene, mass)
        assert mass.min() > (0.25 if scene.shape == "triangle" else 0.5) * (8 * size / 32) ** 2
        # it moves along the prompt's direction, at a speed of at least ~1 px/frame
        c = centroids(mask)
        step = (c[-1] - c[0]) / (num_frames - 1)
        along = step @ np.array(DIRECTIONS[scene.direction])
        assert along > 0.9 * size / 32 if num_frames == 8 else along > 0.4, (scene, step)
        assert abs(step @ np.array(DIRECTIONS[scene.direction])[::-1]) < 0.3 * along


def test_render_deterministic_and_sample_videos():
    scenes = all_scenes()[:5]
    a = sample_videos(scenes, np.random.default_rng(3))
    b = sample_videos(scenes, np.random.default_rng(3))
    assert a.shape == (5, 8, 32, 32, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, sample_videos(scenes, np.random.default_rng(4)))


# -----------------------------------------------------------------------------
# the oracle


def test_clean_renders_score_high():
    rng = np.random.default_rng(0)
    scenes = all_scenes()
    scores = oracle_scores(sample_videos(scenes, rng), [s.prompt for s in scenes])
    for key in KEYS:
        values = np.array([s[key] for s in scores])
        assert values.min() > 0.75 and values.mean() > 0.95, (key, values.min(), values.mean())


@pytest.mark.parametrize("num_frames,size", [(4, 32), (16, 32), (32, 32), (8, 48), (8, 64)])
def test_clean_renders_score_high_at_other_lengths_and_sizes(num_frames, size):
    scenes = all_scenes()[::3]
    videos = sample_videos(scenes, np.random.default_rng(0), num_frames=num_frames, size=size)
    totals = np.array([s["total"] for s in oracle_scores(videos, [s.prompt for s in scenes])])
    assert totals.min() > 0.8 and totals.mean() > 0.95, (totals.min(), totals.mean())


@pytest.mark.parametrize("attribute", ["color", "shape", "direction", "background", "smoothness"])
def test_oracle_ranks_correct_above_wrong(attribute):
    good_scores, bad_scores = [], []
    for seed in SEEDS:
        scene, good, bad = wrong_render(attribute, seed)
        g, b = oracle_scores(np.stack([good, bad]), [scene.prompt] * 2)
        good_scores.append(g)
        bad_scores.append(b)
    for key in (attribute, "total"):
        g = np.array([s[key] for s in good_scores])
        b = np.array([s[key] for s in bad_scores])
        assert (g > b).mean() >= 0.95, (key, g, b)
        assert (g - b).mean() > (0.05 if key == "total" else 0.3), (key, (g - b).mean())


def test_each_shape_scores_highest_for_its_own_name():
    for seed in SEEDS:
        rng = np.random.default_rng(seed)
        scene = random_scene(rng)
        video = render(scene, rng)
        by_name = {}
        for shape in SHAPES:
            prompt = Scene(scene.color, shape, scene.direction, scene.background).prompt
            by_name[shape] = oracle_score(video, prompt)["shape"]
        assert max(by_name, key=by_name.get) == scene.shape, (scene, by_name)


def test_noisy_and_blurred_rank_between_clean_and_wrong():
    for degrade in ("noise", "blur"):
        wins = []
        for seed in SEEDS:
            scene, good, wrong_color = wrong_render("color", seed)
            rng = np.random.default_rng(seed)
            worse = noisy(good, rng) if degrade == "noise" else blur(good)
            s_good, s_worse, s_wrong = (
                s["total"] for s in oracle_scores(np.stack([good, worse, wrong_color]), [scene.prompt] * 3)
            )
            wins.append(s_good > s_worse > s_wrong)
        assert np.mean(wins) >= 0.95, (degrade, np.mean(wins))


def test_degenerate_videos_score_low_without_nan():
    rng = np.random.default_rng(0)
    prompt = "a red circle moving up on a gray background"
    noise = rng.integers(0, 256, size=(8, 32, 32, 3), dtype=np.uint8)
    empty = np.empty((8, 32, 32, 3), dtype=np.uint8)
    empty[:] = BACKGROUNDS["gray"]
    black = np.zeros((8, 32, 32, 3), dtype=np.float32)
    still = np.repeat(render(parse_prompt(prompt), rng)[:1], 8, axis=0)  # right picture, no motion
    for video in (noise, empty, black, still):
        s = oracle_score(video, prompt)
        assert set(s) == set(KEYS)
        assert all(np.isfinite(v) and 0.0 <= v <= 1.0 for v in s.values()), s
    assert oracle_score(noise, prompt)["total"] < 0.3
    assert oracle_score(empty, prompt)["total"] < 0.3
    assert oracle_score(black, prompt)["total"] < 0.3
    assert oracle_score(still, prompt)["direction"] < 0.2
    nan_video = np.full((8, 32, 32, 3), np.nan, dtype=np.float32)
    assert all(np.isfinite(v) for v in oracle_score(nan_video, prompt).values())


def test_small_improvements_raise_the_score():
    """Blending a wrong-colour clip into the right one raises the score step by step."""
    for seed in range(10):
        scene, good, bad = wrong_render("color", seed)
        lams = np.linspace(0, 1, 11)
        blends = np.stack([(1 - lam) * bad.astype(np.float32) + lam * good for lam in lams])
        totals = np.array([s["total"] for s in oracle_scores(blends, [scene.prompt] * len(lams))])
        assert np.all(np.diff(totals) > 0), totals


def test_few_exact_ties():
    scenes = all_scenes()[::2]
    videos = sample_videos(scenes, np.random.default_rng(0))
    totals = [s["total"] for s in oracle_scores(videos, [s.prompt for s in scenes])]
    assert len(set(totals)) == len(totals)


def test_oracle_batch_float_and_determinism():
    scenes = all_scenes()[:20]
    videos = sample_videos(scenes, np.random.default_rng(1))
    prompts = [s.prompt for s in scenes]
    batch = oracle_scores(videos, prompts)
    assert batch == oracle_scores(videos, prompts)
    assert batch == oracle_scores(videos, prompts, chunk=3)
    singles = [oracle_score(v, p) for v, p in zip(videos, prompts)]
    for a, b in zip(batch, singles):
        assert a == pytest.approx(b, abs=1e-6)
    floats = oracle_scores(videos.astype(np.float64), prompts)
    for a, b in zip(batch, floats):
        assert a == pytest.approx(b, abs=1e-6)
    for s in batch:
        assert s["total"] == pytest.approx(sum(ORACLE_WEIGHTS[k] * s[k] for k in ORACLE_WEIGHTS), abs=1e-6)
    with pytest.raises(ValueError, match="prompts"):
        oracle_scores(videos, prompts[:-1])
    with pytest.raises(ValueError, match="not a prompt|not of the form"):
        oracle_scores(videos[:1], ["a video"])


def test_oracle_prefer():
    scene, good, bad = wrong_render("direction", 0)
    assert oracle_prefer(good, good.copy(), scene.prompt) == "tie"
    assert oracle_prefer(good, good, scene.prompt, tie_margin=0.0) == "tie"
    assert oracle_prefer(good, bad, scene.prompt) == "a"
    assert oracle_prefer(bad, good, scene.prompt) == "b"
    assert oracle_prefer(good, bad, scene.prompt, tie_margin=1.0) == "tie"
