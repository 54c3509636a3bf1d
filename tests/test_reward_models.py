"""CLIP-based video reward model: BT-with-ties loss, scoring invariances, frame sampling,
training on a separable toy set, persistence, bad input, and the CLI."""

import json
import math
import warnings

import numpy as np
import pytest
import torch

from align.cli import main
from align.training.reward import load_pairs, train_reward_model
from reward_models.model import RewardModelConfig, VideoRewardModel, bt_loss, sample_frame_indices
from reward_models.train import (
    PairData,
    RewardTrainConfig,
    _setup_finetune,
    accuracy_ci,
    accuracy_with_ties,
    accuracy_without_ties,
    evaluate,
)


def _model(**kw):
    torch.manual_seed(0)
    return VideoRewardModel(RewardModelConfig(**kw))


def _solid(color, n=1, T=8, seed=0):
    rng = np.random.default_rng(seed)
    base = np.zeros((n, T, 32, 32, 3), np.float32) + np.array(color, np.float32)
    return np.clip(base + rng.normal(0, 10, base.shape), 0, 255).astype(np.uint8)


def test_bt_loss_by_hand_with_ties():
    sa, sb = torch.tensor([1.0, 1.0, 1.0]), torch.tensor([0.0, 0.0, 0.0])
    nl = lambda x: -math.log(1 / (1 + math.exp(-x)))  # noqa: E731
    for y, want in ((1.0, nl(1)), (0.0, nl(-1)), (0.5, 0.5 * (nl(1) + nl(-1)))):
        out = bt_loss(sa, sb, torch.full((3,), y))
        assert abs(out["loss"].item() - want) < 1e-6
    out = bt_loss(torch.tensor([2.0, 0.0, 3.0]), torch.tensor([1.0, 1.0, 3.0]), torch.tensor([1.0, 1.0, 0.5]))
    assert out["acc"].item() == 0.5  # the tie is left out of the accuracy
    assert abs(out["margin"].item() - (1.0 - 1.0 + 0.0) / 3) < 1e-6
    # a tie's loss is smallest where the scores are equal
    t = torch.tensor([0.5])
    assert (
        bt_loss(torch.tensor([0.0]), torch.tensor([0.0]), t)["loss"]
        < bt_loss(torch.tensor([0.3]), torch.tensor([0.0]), t)["loss"]
    )
    with pytest.raises(ValueError, match="three"):
        bt_loss(sa, sb[:2], torch.ones(3))


def test_frame_sampling_is_deterministic():
    assert sample_frame_indices(8, 4, "uniform") == [1, 3, 5, 7]
    a = sample_frame_indices(16, 4, "random", torch.Generator().manual_seed(3))
    b = sample_frame_indices(16, 4, "random", torch.Generator().manual_seed(3))
    assert a == b and a == sorted(a) and len(set(a)) == 4
    with pytest.raises(ValueError, match="fewer than num_frames=4"):
        sample_frame_indices(3, 4)


def test_strided_sampling_phases_and_the_phase_averaged_score():
    # every 2nd frame of 8; the default (middle) phase is uniform's; leftovers split evenly
    assert sample_frame_indices(8, 4, "strided") == sample_frame_indices(8, 4, "uniform") == [1, 3, 5, 7]
    assert sample_frame_indices(8, 4, "strided", phase=0) == [0, 2, 4, 6]
    assert sample_frame_indices(11, 4, "strided", phase=0) == [1, 3, 5, 7]  # stride 2, 3 left over
    assert sample_frame_indices(12, 4, "strided", phase=2) == [2, 5, 8, 11]
    draws = [sample_frame_indices(16, 4, "strided", torch.Generator().manual_seed(s)) for s in range(20)]
    assert draws == [sample_frame_indices(16, 4, "strided", torch.Generator().manual_seed(s)) for s in range(20)]
    assert {d[0] for d in draws} == {0, 1, 2, 3} and all(np.diff(d).tolist() == [4, 4, 4] for d in draws)
    with pytest.raises(ValueError, match="phase 2 not in"):
        sample_frame_indices(8, 4, "strided", phase=2)
    with pytest.raises(ValueError, match="'strided'"):
        RewardModelConfig(frame_sampling="every_other")
    # a strided model's score is the mean of its per-phase scores, and still per-video
    m = _model(pooling="temporal", frame_sampling="strided")
    videos, prompts = _world(5)
    ids = m.tokenize(prompts)
    with torch.no_grad():
        per_phase = [m(m.frames(videos, phase=p), ids)["score"].numpy() for p in (0, 1)]
    assert m.num_phases(videos) == 2 and not np.allclose(per_phase[0], per_phase[1])
    np.testing.assert_allclose(m.score(videos, prompts), (per_phase[0] + per_phase[1]) / 2, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(m.score(videos[2:3], prompts[2:3]), m.score(videos, prompts)[2:3], rtol=1e-5, atol=1e-5)


def test_scores_do_not_depend_on_batch_composition():
    m = _model()
    videos = np.concatenate([_solid((255, 0, 0), 3, seed=1), _solid((0, 0, 255), 2, seed=2)])
    prompts = ["a red square moving left on a black background"] * 3 + [
        "a blue circle moving up on a gray background"
    ] * 2
    all_scores = m.score(videos, prompts, batch_size=4)
    alone = m.score(videos[3:4], prompts[3:4])
    np.testing.assert_allclose(all_scores[3], alone[0], rtol=1e-5, atol=1e-5)
    shuffled = m.score(videos[::-1].copy(), prompts[::-1], batch_size=2)
    np.testing.assert_allclose(all_scores, shuffled[::-1], rtol=1e-5, atol=1e-5)
    # float (B, C, T, H, W) in [-1, 1] input gives the same scores as uint8
    x = torch.from_numpy(videos).permute(0, 4, 1, 2, 3).float() / 127.5 - 1
    np.testing.assert_allclose(m.score(x, prompts), all_scores, rtol=1e-4, atol=1e-4)


def test_bad_input_is_named():
    m = _model()
    with pytest.raises(ValueError, match="fewer than num_frames"):
        m.score(_solid((255, 0, 0), 1, T=2), ["p"])
    nan = torch.full((1, 3, 8, 32, 32), float("nan"))
    with pytest.raises(ValueError, match="NaN"):
        m.score(nan, ["p"])
    with pytest.raises(ValueError, match="2 prompts"):
        m.score(_solid((255, 0, 0), 1), ["p", "q"])
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        s = m.score(_solid((255, 0, 0), 1), [" ".join(["red"] * 40)])
    assert any("truncated" in str(x.message) for x in w) and np.isfinite(s).all()
    # token ids are kept per prompt: the same ids as the tokenizer's, in the batch's order
    ps = ["a red square", "a blue circle", "a red square", " ".join(["red"] * 40)]
    assert torch.equal(m.tokenize(ps), m.tokenizer(ps)) and torch.equal(m.tokenize(ps[1:2]), m.tokenizer(ps[1:2]))
    assert m.tokenize([]).shape == (0, m.context_length)
    with pytest.raises(ValueError, match="unknown open_clip model name"):
        VideoRewardModel(RewardModelConfig(model_name="no-such-clip"))
    with pytest.raises(ValueError, match="pooling"):
        RewardModelConfig(pooling="max")


def test_save_load_and_local_weights(tmp_path):
    m = _model(aspects=["motion"])
    v, p = _solid((0, 255, 0), 2), ["a green square moving up on a navy background"] * 2
    m.save_pretrained(tmp_path / "rm")
    m2 = VideoRewardModel.from_pretrained(tmp_path / "rm")
    np.testing.assert_allclose(m.score(v, p), m2.score(v, p), rtol=1e-6)
    # backbone weights from a local file: safetensors, or torch with weights_only=True
    from safetensors.torch import save_file

    save_file({k: t.contiguous() for k, t in m.clip.state_dict().items()}, str(tmp_path / "clip.safetensors"))
    torch.save(m.clip.state_dict(), tmp_path / "clip.pt")
    for f in ("clip.safetensors", "clip.pt"):
        m3 = VideoRewardModel(RewardModelConfig(pretrained=str(tmp_path / f), aspects=["motion"]))
        assert all(torch.equal(a, b) for a, b in zip(m3.clip.state_dict().values(), m.clip.state_dict().values()))
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        VideoRewardModel(RewardModelConfig(pretrained=str(tmp_path / "missing.safetensors")))
    with pytest.raises(FileNotFoundError, match="reward_config.json"):
        VideoRewardModel.from_pretrained(tmp_path)


def _toy_pairs(n, seed):
    """Prompt names a colour; the video of that colour is preferred (separable)."""
    rng = np.random.default_rng(seed)
    cols = {"red": (255, 0, 0), "blue": (0, 0, 255), "green": (0, 255, 0)}
    names = list(cols)
    prompts, va, vb, y = [], [], [], []
    for i in range(n):
        want, other = rng.choice(3, 2, replace=False)
        good, bad = _solid(cols[names[want]], seed=2 * i + seed), _solid(cols[names[other]], seed=2 * i + 1 + seed)
        a_first = rng.random() < 0.5
        prompts.append(f"a {names[want]} square moving left on a black background")
        va.append((good if a_first else bad)[0])
        vb.append((bad if a_first else good)[0])
        y.append(1.0 if a_first else 0.0)
    return PairData(prompts, np.stack(va), np.stack(vb), np.array(y, np.float32))


def _fit(m, train, mode, lr, steps, batch=16):
    """Plain BT steps over ``train`` in fixed batches (no shuffling), for the toy tests."""
    opt = torch.optim.AdamW(_setup_finetune(m, mode, 4), lr=lr)
    for step in range(steps):
        idx = np.arange(batch) + (step % (len(train.prompts) // batch)) * batch
        ids = m.tokenize([train.prompts[i] for i in idx])
        out = bt_loss(
            m(m.frames(train.video_a[idx]), ids)["score"],
            m(m.frames(train.video_b[idx]), ids)["score"],
            torch.from_numpy(train.target[idx]),
        )
        opt.zero_grad()
        out["loss"].backward()
        opt.step()


def test_a_few_steps_on_a_separable_toy_set_beat_chance():
    m = _model(pooling="mean")
    train, held = _toy_pairs(48, 0), _toy_pairs(30, 100)
    before = {n: p.clone() for n, p in m.named_parameters()}
    _fit(m, train, "full", 3e-4, 20)
    assert evaluate(m, held)["accuracy"] >= 0.8
    assert any(not torch.equal(before[n], p) for n, p in m.named_parameters())


def test_head_and_lora_modes_freeze_the_backbone():
    m = _model()
    params = _setup_finetune(m, "head", 4)
    names = {n for n, p in m.named_parameters() if p.requires_grad}
    assert names and all(not n.startswith("clip.") or n == "clip.logit_scale" for n in names)
    assert len(params) == len(names)
    m = _model()
    _setup_finetune(m, "lora", 4)
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert any("lora_" in n for n in trainable)
    assert not any(n.startswith("clip.") and "lora_" not in n and n != "clip.logit_scale" for n in trainable)
    with pytest.raises(ValueError, match="finetune"):
        _setup_finetune(_model(), "half", 4)


def _save_toy_dataset(path, n, seed, tie_every=0):
    import datasets

    d = _toy_pairs(n, seed)
    prefs = ["a" if t == 1.0 else "b" for t in d.target]
    if tie_every:
        prefs = ["tie" if i % tie_every == 0 else p for i, p in enumerate(prefs)]
    video = datasets.Array4D((8, 32, 32, 3), "uint8")  # typed, so rows decode as arrays, fast
    text = datasets.Value("string")
    features = datasets.Features(
        {"prompt": text, "video_a": video, "video_b": video, "preference": text, "preference_color": text}
    )
    rows = {"prompt": d.prompts, "video_a": list(d.video_a), "video_b": list(d.video_b), "preference": prefs}
    rows["preference_color"] = prefs
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(path))
    return str(path)


def test_train_eval_score_cli(tmp_path, capsys):
    data = _save_toy_dataset(tmp_path / "toy", 60, 0, tie_every=7)
    recipe = tmp_path / "rm.yaml"
    recipe.write_text(
        f"dataset: {data}\noutput_dir: {tmp_path}\nname: rm\nepochs: 2\nbatch_size: 16\n"
        "learning_rate: 0.0003\nmodel: {pooling: mean, aspects: [color]}\nprogress: false\n"
    )
    assert main(["reward", "train", str(recipe), "--eval_fraction", "0.3"]) == 0
    best = tmp_path / "rm" / "best"
    assert (best / "model.safetensors").is_file()
    lines = [json.loads(x) for x in (tmp_path / "rm" / "metrics.jsonl").read_text().splitlines()]
    assert sum("eval_accuracy" in r for r in lines) == 2
    summary = json.loads((tmp_path / "rm" / "summary.json").read_text())
    assert summary["train_pairs"] + summary["eval_pairs"] == 60
    held = set(summary["eval_prompts"])  # the held-out prompts, recorded: exactly the eval pairs' prompts
    toy_prompts = load_pairs(data).prompts
    assert sum(p in held for p in toy_prompts) == summary["eval_pairs"] > 0
    agree = summary["best_eval_aspect_agreement"]["color"]  # colour labels = overall labels here
    assert agree["agreement"] == summary["best_eval_accuracy"] and 0 < agree["n"] <= summary["eval_pairs"]
    capsys.readouterr()
    assert main(["reward", "eval", data, "--model", str(best), "--out", str(tmp_path / "ev")]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["n"] == 60 and res["ties"] == 9 and 0 <= res["accuracy"] <= 1
    assert res["accuracy_without_ties"] == res["accuracy"]  # no exact score ties here
    assert 0 <= res["accuracy_with_ties"] <= 1 and 0 <= res["accuracy_three_way"] <= 1
    lo, hi = res["accuracy_ci95"]
    assert lo <= res["accuracy"] <= hi
    # the toy set's colour labels are its overall labels: agreement = accuracy, on the 51 decided pairs
    assert res["aspect_agreement"] == {"color": {"agreement": res["accuracy"], "n": 51}}
    assert (tmp_path / "ev" / "calibration.png").stat().st_size > 0
    from align.data.video import write_video

    write_video(tmp_path / "red.gif", _solid((255, 0, 0))[0])
    write_video(tmp_path / "blue.gif", _solid((0, 0, 255))[0])
    assert (
        main(
            [
                "reward",
                "score",
                "--model",
                str(best),
                "--prompt",
                "a red square moving left on a black background",
                "--video",
                str(tmp_path / "red.gif"),
                str(tmp_path / "blue.gif"),
            ]
        )
        == 0
    )
    assert len(capsys.readouterr().out.strip().splitlines()) == 2
    assert main(["reward", "score", "--model", str(best), "--prompt", "p", "--video", str(tmp_path / "nope.mp4")]) == 2
    assert "nope.mp4" in capsys.readouterr().err


def test_evaluate_reports_which_aspects_the_score_follows():
    """Hand-built pairs scored by their mean pixel: the score prefers b, a, b, a."""
    from reward_models.train import PairData

    class MeanPixel:
        def score(self, videos, prompts, batch_size=64):
            return videos.reshape(len(videos), -1).mean(axis=1).astype(np.float64)

    va = np.stack([np.full((2, 2, 2, 3), v, np.uint8) for v in (10, 20, 30, 40)])
    vb = np.stack([np.full((2, 2, 2, 3), v, np.uint8) for v in (20, 10, 40, 30)])
    aspects = {
        "color": np.array([0, 1, 0, 1], np.float32),  # always the score's pick
        "background": np.array([1, 0.5, 0.5, 0], np.float32),  # decided twice, against the score both times
        "shape": np.full(4, 0.5, np.float32),  # never decided: not reported
    }
    data = PairData(["p"] * 4, va, vb, np.array([0, 1, 1, 0.5], np.float32), aspects)
    res = evaluate(MeanPixel(), data)
    assert res["accuracy"] == pytest.approx(2 / 3) and res["n_decided"] == 3
    assert res["aspect_agreement"] == {"color": {"agreement": 1.0, "n": 4}, "background": {"agreement": 0.0, "n": 2}}


def test_accuracy_ci_resamples_prompts_not_pairs():
    assert accuracy_ci(np.ones(6), ["a", "a", "b", "b", "c", "c"]) == (1.0, 1.0)  # all correct
    # 10 prompts x 10 pairs, 70 correct either way
    prompts = [f"p{i // 10}" for i in range(100)]
    seven_of_ten = np.array([1] * 7 + [0] * 3, float)
    even = np.tile(seven_of_ten, 10)  # every prompt 7 of 10: prompts agree, so the interval is tight
    lumped = np.repeat(seven_of_ten, 10)  # 7 prompts all right, 3 all wrong
    lo_e, hi_e = accuracy_ci(even, prompts)
    lo_l, hi_l = accuracy_ci(lumped, prompts)
    assert lo_e == hi_e == pytest.approx(0.7)  # no spread between prompts
    assert lo_l < 0.5 and hi_l > 0.9  # a pair-level bootstrap would give about [0.61, 0.79]
    assert accuracy_ci(lumped, prompts) == (lo_l, hi_l)  # seeded
    with pytest.raises(ValueError, match="3 outcomes for 2 group labels"):
        accuracy_ci(np.ones(3), ["a", "b"])


def test_train_needs_prompts_in_both_splits(tmp_path):
    data = _save_toy_dataset(tmp_path / "toy", 6, 0)
    with pytest.raises(ValueError, match="cannot be split"):
        train_reward_model(RewardTrainConfig(dataset=data, output_dir=str(tmp_path), eval_fraction=0.0, progress=False))


def test_contrastive_pretraining_batches_hold_their_hard_negatives():
    from reward_models.train import contrastive_pretrain

    model = _model()
    videos = np.concatenate([_solid((255, 0, 0), 4), _solid((0, 0, 255), 4)])
    prompts = [f"clip {i}" for i in range(8)]
    reversal = np.array([4, 5, 6, 7, 0, 1, 2, 3])
    seen = []
    tokenize = model.tokenize
    model.tokenize = lambda ps: seen.append(list(ps)) or tokenize(ps)
    losses = contrastive_pretrain(model, videos, prompts, 3, batch_size=4, progress=False, hard_negatives=reversal)
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    for batch in seen:
        first, second = batch[:2], batch[2:]
        assert second == [prompts[reversal[prompts.index(p)]] for p in first]
    with pytest.raises(ValueError, match="got shape"):
        contrastive_pretrain(model, videos, prompts, 1, hard_negatives=reversal[:3], progress=False)
    with pytest.raises(ValueError, match="indices must lie"):
        contrastive_pretrain(model, videos, prompts, 1, hard_negatives=reversal + 1, progress=False)
    with pytest.raises(ValueError, match="cannot hold"):
        contrastive_pretrain(model, videos, prompts, 1, batch_size=1, hard_negatives=reversal, progress=False)


def test_demo_backbone_clips_come_with_their_reversals():
    """The demo backbone's data: each clip and its time-reversed copy, captioned with the
    opposite direction; each item's hard negative is the other."""
    from align.demo.pretrain import world_clips_with_reversals
    from align.demo.synthetic import DIRECTIONS, parse_prompt

    videos, prompts, neg = world_clips_with_reversals(0)
    assert len(videos) == len(prompts) == len(neg) == 4096
    for i in range(0, len(prompts), 97):
        scene, other = parse_prompt(prompts[i]), parse_prompt(prompts[neg[i]])
        assert tuple(-v for v in DIRECTIONS[scene.direction]) == DIRECTIONS[other.direction]
        assert (other.color, other.shape, other.background) == (scene.color, scene.shape, scene.background)
        np.testing.assert_array_equal(videos[neg[i]], videos[i, ::-1])


def _world(n=8, seed=0):
    from align.demo.synthetic import all_scenes, sample_videos

    rng = np.random.default_rng(seed)
    scenes = all_scenes()
    picks = [scenes[i] for i in rng.integers(0, len(scenes), n)]
    return sample_videos(picks, rng), [s.prompt for s in picks]


def _left_right_pairs(n, seed):
    """Clips of a shape moving left or right; the pair is (clip, the same clip played
    backwards) for the prompt naming the clip's direction, so only the order of frames differs."""
    from align.demo.synthetic import Scene, sample_videos

    rng = np.random.default_rng(seed)
    scenes = [Scene("red", "square", ["left", "right"][i % 2], "black") for i in range(n)]
    clips = sample_videos(scenes, rng)
    flip = rng.random(n) < 0.5
    va = np.where(flip[:, None, None, None, None], clips[:, ::-1], clips)
    vb = np.where(flip[:, None, None, None, None], clips, clips[:, ::-1])
    return PairData([s.prompt for s in scenes], va, vb, np.where(flip, 0.0, 1.0).astype(np.float32))


def test_motion_encoder_starts_at_zero_and_loads_onto_a_saved_model(tmp_path):
    plain = _model(pooling="mean")
    plain.save_pretrained(tmp_path / "rm")
    m = VideoRewardModel.from_pretrained(tmp_path / "rm", overrides={"motion_keypoints": 4})
    assert m.cfg.motion_keypoints == 4 and m.fresh_parameters
    assert all(n.startswith("motion.") for n in m.fresh_parameters)
    videos, prompts = _world(4)
    np.testing.assert_array_equal(m.score(videos, prompts), plain.score(videos, prompts))  # zero-initialised
    pos, peak = m.motion.keypoints(m.frames(videos))
    assert pos.shape == (4, 4, 4, 2) and peak.shape == (4, 4, 4) and pos.abs().max() <= 1
    assert VideoRewardModel.from_pretrained(tmp_path / "rm").fresh_parameters == []
    with pytest.raises(ValueError, match="unknown RewardModelConfig keys"):
        VideoRewardModel.from_pretrained(tmp_path / "rm", overrides={"keypoints": 4})
    # a change that makes saved weights unusable is refused, naming the directory
    _model(pooling="temporal").save_pretrained(tmp_path / "rm_t")
    with pytest.raises(ValueError, match="rm_t.*different shapes"):
        VideoRewardModel.from_pretrained(tmp_path / "rm_t", overrides={"num_frames": 2})
    with pytest.raises(ValueError, match="motion_keypoints must be >= 0"):
        RewardModelConfig(motion_keypoints=-1)


def test_frame_weight_scales_the_image_towers_part_against_the_motion_encoders():
    """encode_video = normalise(frame_weight * frame part + motion part). With the motion
    encoder still at zero the weight cancels in the normalisation, so a saved model scores
    the same with any weight until the encoder has learned something."""
    videos, prompts = _world(4)
    m1 = _model(pooling="mean", motion_keypoints=4)
    m3 = _model(pooling="mean", motion_keypoints=4, frame_weight=0.3)
    np.testing.assert_allclose(m3.score(videos, prompts), m1.score(videos, prompts), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        for m in (m1, m3):
            torch.manual_seed(1)
            m.motion.mlp[2].weight.normal_(0, 0.5)
        frames = m1.frames(videos)[:, : m1.cfg.num_frames]
        B, K = frames.shape[:2]
        image = m1.clip.encode_image(frames.flatten(0, 1)).view(B, K, -1).mean(dim=1)
        motion = m1.motion(frames)
        assert motion.abs().max() > 0
        for w, m in ((1.0, m1), (0.3, m3)):
            want = torch.nn.functional.normalize(w * image + motion, dim=-1)
            torch.testing.assert_close(m.encode_video(frames), want, rtol=1e-5, atol=1e-6)
    assert np.abs(m3.score(videos, prompts) - m1.score(videos, prompts)).max() > 1e-3
    with pytest.raises(ValueError, match="frame_weight must be > 0"):
        RewardModelConfig(motion_keypoints=4, frame_weight=0)
    with pytest.raises(ValueError, match="set motion_keypoints > 0"):
        RewardModelConfig(frame_weight=0.5)


def test_motion_encoder_learns_the_direction_that_frame_averaging_cannot_see():
    """Frame-mean pooling scores a clip and its reversal identically; with the keypoint
    motion encoder, a few steps rank the prompt's direction above its reversal."""
    train, held = _left_right_pairs(64, 0), _left_right_pairs(40, 1)
    plain = _model(pooling="mean", num_frames=8)  # all frames, so the two clips hold the same ones
    d = plain.score(held.video_a, held.prompts) - plain.score(held.video_b, held.prompts)
    assert np.abs(d).max() < 1e-4
    m = _model(pooling="mean", num_frames=8, motion_keypoints=8)
    _fit(m, train, "head", 3e-3, 40)
    assert evaluate(m, held)["accuracy"] >= 0.9


def test_train_adds_a_motion_encoder_to_a_saved_model(tmp_path):
    from safetensors.torch import load_file

    data = _save_toy_dataset(tmp_path / "toy", 40, 0)
    _model(pooling="mean").save_pretrained(tmp_path / "bb")
    cfg = RewardTrainConfig(
        dataset=data,
        output_dir=str(tmp_path),
        name="rm",
        init_from=str(tmp_path / "bb"),
        model={"motion_keypoints": 4},
        fresh_learning_rate=1e-2,
        epochs=1,
        batch_size=16,
        learning_rate=1e-4,
        progress=False,
    )
    with pytest.warns(UserWarning, match=r"per-aspect labels \['color'\] are not used"):
        best = train_reward_model(cfg) / "best"
    assert json.loads((best / "reward_config.json").read_text())["motion_keypoints"] == 4
    before, after = load_file(str(tmp_path / "bb" / "model.safetensors")), load_file(str(best / "model.safetensors"))
    assert not torch.equal(after["motion.mlp.2.weight"], torch.zeros_like(after["motion.mlp.2.weight"]))
    assert set(before) < set(after)
    # the backbone moved by the backbone's rate, the fresh encoder by its own (100x) rate
    clip_step = max((after[k] - before[k]).abs().max().item() for k in before if k.startswith("clip.visual"))
    assert 0 < clip_step < after["motion.mlp.2.bias"].abs().max().item()


def test_btt_loss_is_rao_kupper_by_hand():
    """tie_loss btt: P(a > b) = 1 / (1 + k e^-d), P(b > a) = 1 / (1 + k e^d), P(tie) the rest
    ((k^2 - 1) P(a > b) P(b > a)); the loss is the mean negative log-likelihood of the labels."""
    k, d = 5.0, [1.5, -0.4, 0.2]
    pa = [1 / (1 + k * math.exp(-x)) for x in d]
    pb = [1 / (1 + k * math.exp(x)) for x in d]
    pt = [(k**2 - 1) * a * b for a, b in zip(pa, pb)]
    assert all(a + b + t == pytest.approx(1.0) for a, b, t in zip(pa, pb, pt))  # a proper 3-way model
    sa, sb = torch.tensor(d), torch.zeros(3)
    out = bt_loss(sa, sb, torch.tensor([1.0, 0.0, 0.5]), tie_loss="btt", k=k)
    want = -(math.log(pa[0]) + math.log(pb[1]) + math.log(pt[2])) / 3
    assert out["loss"].item() == pytest.approx(want, rel=1e-6)
    assert out["acc"].item() == 1.0  # d > 0 for the a-pair, d < 0 for the b-pair; the tie left out
    # VideoAlign's k = 5 is the default; at d = 0 a tie is 4x as likely as either winner
    same = bt_loss(torch.zeros(1), torch.zeros(1), torch.tensor([0.5]), tie_loss="btt")["loss"].item()
    assert same == pytest.approx(-math.log(24 / 36)) and math.exp(-same) / (1 / 6) == pytest.approx(4.0)
    # the soft target stays the default and is unchanged
    soft = bt_loss(sa, sb, torch.tensor([1.0, 0.0, 0.5]))["loss"].item()
    nl = lambda x: -math.log(1 / (1 + math.exp(-x)))  # noqa: E731
    assert soft == pytest.approx((nl(1.5) + nl(0.4) + 0.5 * (nl(0.2) + nl(-0.2))) / 3, rel=1e-6)
    with pytest.raises(ValueError, match="k must be > 1"):
        bt_loss(sa, sb, torch.ones(3), tie_loss="btt", k=1.0)
    with pytest.raises(ValueError, match="no soft labels"):
        bt_loss(sa, sb, torch.full((3,), 0.7), tie_loss="btt")
    with pytest.raises(ValueError, match="tie_loss must be one of"):
        bt_loss(sa, sb, torch.ones(3), tie_loss="davidson")
    with pytest.raises(ValueError, match="btt_k"):
        RewardTrainConfig(btt_k=0.5)
    with pytest.raises(ValueError, match="tie_loss"):
        RewardTrainConfig(tie_loss="davidson")


def test_accuracy_with_and_without_ties_as_videoalign_computes_them():
    """Labels a, b, tie, tie, a; score differences 0.5, 0.2, 0.05, -0.3, 0.0. Without ties: of the
    three decided pairs only the first has the winner's sign (0.0 counts as wrong): 1/3. With ties,
    the pairs sorted by |d| -- (a, 0.0), (tie, 0.05), (b, 0.2), (tie, -0.3), (a, 0.5) -- become
    predicted ties one by one: 1/5, 2/5, 2/5, 3/5, 2/5 right; the best is 3/5 at eps 0.3 (both tie
    labels and the last pair right)."""
    y = np.array([1.0, 0.0, 0.5, 0.5, 1.0])
    d = np.array([0.5, 0.2, 0.05, -0.3, 0.0])
    assert accuracy_without_ties(y, d) == pytest.approx(1 / 3)
    acc, eps = accuracy_with_ties(y, d)
    assert acc == pytest.approx(3 / 5) and eps == pytest.approx(0.3)
    # VideoAlign's own example (calc_accuracy.py's __main__ prints 0.667 and 0.833)
    h = np.array([1, -1, 0, 1, -1, 0, 1, -1, 0])
    sa = np.array([0.9, -0.7, 0.1, 0.8, -0.6, 0.2, 0.7, -0.5, 0.3])
    sb = np.array([0.1, -0.8, 0.5, 0.5, -0.3, 0.3, 0.4, -0.4, 0.4])
    target = np.where(h == 1, 1.0, np.where(h == -1, 0.0, 0.5))
    assert accuracy_with_ties(target, sa - sb)[0] == pytest.approx(2 / 3)
    assert accuracy_without_ties(target, sa - sb) == pytest.approx(5 / 6)
    assert np.isnan(accuracy_without_ties(np.full(3, 0.5), np.ones(3))) and np.isnan(accuracy_with_ties([], [])[0])


def test_btt_training_records_its_tie_model(tmp_path):
    from reward_models.evaluate import evaluate_to_dir, tie_model

    data = _save_toy_dataset(tmp_path / "toy", 40, 0, tie_every=5)
    cfg = RewardTrainConfig(
        dataset=data, output_dir=str(tmp_path), name="btt", epochs=1, batch_size=8, eval_fraction=0.3,
        model={"pooling": "mean", "aspects": ["color"]}, tie_loss="btt", progress=False,
    )  # fmt: skip
    run = train_reward_model(cfg)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["config"]["tie_loss"] == "btt" and 0 <= summary["best_eval_accuracy_without_ties"] <= 1
    assert 0 <= summary["best_eval_accuracy_with_ties"] <= 1
    assert tie_model(run / "best") == {"tie_loss": "btt", "btt_k": 5.0}
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in rows if "loss" in r)
    model = VideoRewardModel.from_pretrained(run / "best")
    res = evaluate_to_dir(model, load_pairs(data), tmp_path / "ev", model_dir=run / "best")
    d = np.array(json.loads((tmp_path / "ev" / "reward_eval.json").read_text())["calibration"][0]["predicted"])
    assert res["n"] == 40 and res["ties"] == 8 and 0 <= d <= 1
