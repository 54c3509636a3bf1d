"""The latent cache: same latents as encoding in memory, reuse across runs, invalidation when the
VAE or preprocessing changes, damaged shards, lazy reading, streaming build, and training."""

from __future__ import annotations

import json
import pickle
import weakref
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
import yaml
from conftest import SMALL, make_preference_rows, tiny_recipe
from safetensors.torch import load_file
from test_data_formats import clip

from align.data import latent_cache as lc
from align.data.latent_cache import (
    build_latent_cache,
    cached_latents,
    text_fingerprint,
    video_fingerprint,
)
from align.data.pairs import to_pairs
from align.data.preference import PreferenceDataError, load_preference_dataset
from align.data.video import write_video
from align.models import load_model
from align.models.tiny_sora import TinySora, TinySoraConfig
from align.training import build_config, train
from align.training.dpo import encode_pairs


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = TinySora(TinySoraConfig(**SMALL)).eval()
    m.requires_grad_(False)
    return m


@pytest.fixture(scope="module")
def pairs():
    return to_pairs(datasets.Dataset.from_dict(make_preference_rows(8)))


class CountingEncoder:
    """Wraps model.encode_video to count the videos it encodes."""

    def __init__(self, model):
        self.model, self.n = model, 0
        self.orig = model.encode_video

    def __call__(self, x):
        self.n += x.shape[0]
        return self.orig(x)


def _counting(model, monkeypatch) -> CountingEncoder:
    c = CountingEncoder(model)
    monkeypatch.setattr(model, "encode_video", c)
    return c


def test_cached_latents_match_encode_pairs_and_are_reused(model, pairs, tmp_path, monkeypatch):
    ref = encode_pairs(model, pairs)
    counter = _counting(model, monkeypatch)
    data = cached_latents(model, pairs, tmp_path / "cache")
    assert counter.n == 16 and data.stats["videos_encoded"] == 16 and data.stats["prompts_encoded"] == 1
    assert len(data) == len(ref) == 8
    for i in range(8):
        for got, want in zip(data[i], ref[i]):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # the second run encodes nothing and writes no shard
    shards = sorted((tmp_path / "cache").rglob("shard-*.safetensors"))
    again = cached_latents(model, pairs, tmp_path / "cache")
    assert counter.n == 16 and again.stats["videos_reused"] == 16 and again.stats["prompts_reused"] == 1
    assert sorted((tmp_path / "cache").rglob("shard-*.safetensors")) == shards
    torch.testing.assert_close(again[3][1], data[3][1])
    # shards are plain safetensors, keyed by content hash, with the fingerprint in the header
    fp, meta = video_fingerprint(model)
    vdir = tmp_path / "cache" / f"video-{fp[:16]}"
    assert json.loads((vdir / "fingerprint.json").read_text())["fingerprint"] == fp
    assert meta["preprocessing"] == {} and "vae_sha256" in meta
    keys = set().union(*(load_file(f).keys() for f in vdir.glob("shard-*.safetensors")))
    assert len(keys) == 16 and all(len(k) == 64 for k in keys)


def test_fingerprint_changes_with_vae_scaling_and_preprocessing_only(model):
    fp, _ = video_fingerprint(model)
    tfp, _ = text_fingerprint(model)
    assert video_fingerprint(model)[0] == fp  # deterministic
    assert video_fingerprint(model, {"num_frames": 8, "height": 32})[0] != fp
    assert video_fingerprint(model, {"num_frames": None})[0] == fp  # None = not set
    with pytest.raises(ValueError, match=r"unknown preprocessing key\(s\) \['size'\]"):
        video_fingerprint(model, {"size": 32})
    other = TinySora(TinySoraConfig(**SMALL))
    other.vae.load_state_dict(model.vae.state_dict())
    other.text_encoder.load_state_dict(model.text_encoder.state_dict())
    assert video_fingerprint(other)[0] == fp and text_fingerprint(other)[0] == tfp  # the denoiser does not count
    other.cfg.scaling_factor = 0.5
    assert video_fingerprint(other)[0] != fp
    other.cfg.scaling_factor = model.cfg.scaling_factor
    with torch.no_grad():
        next(iter(other.vae.parameters()))[0].add_(1e-3)
    assert video_fingerprint(other)[0] != fp
    with torch.no_grad():
        next(iter(other.text_encoder.parameters()))[0].add_(1e-3)
    assert text_fingerprint(other)[0] != tfp


def test_a_changed_vae_invalidates_the_cache(model, pairs, tmp_path, monkeypatch):
    cached_latents(model, pairs, tmp_path / "c")
    changed = TinySora(TinySoraConfig(**SMALL)).eval()
    changed.text_encoder.load_state_dict(model.text_encoder.state_dict())
    counter = _counting(changed, monkeypatch)
    data = cached_latents(changed, pairs, tmp_path / "c")
    assert counter.n == 16 and data.stats["videos_reused"] == 0  # stale latents are never read
    assert data.stats["prompts_reused"] == 1  # the text encoder did not change
    torch.testing.assert_close(data[0][0], encode_pairs(changed, pairs)[0][0], rtol=1e-5, atol=1e-6)
    assert len(list((tmp_path / "c").glob("video-*"))) == 2


def test_damaged_shard_is_ignored_and_reencoded(model, pairs, tmp_path, monkeypatch):
    want = cached_latents(model, pairs, tmp_path / "c")[5][0]
    (shard,) = (tmp_path / "c").glob("video-*/shard-*.safetensors")
    raw = shard.read_bytes()
    shard.unlink()  # a new file: tensors read before may still map the old one
    shard.write_bytes(raw[:100])  # truncated on disk
    counter = _counting(model, monkeypatch)
    with pytest.warns(UserWarning, match="ignoring unreadable shard"):
        data = cached_latents(model, pairs, tmp_path / "c")
    assert counter.n == 16 and data.stats["bad_shards"] == [str(shard)]
    torch.testing.assert_close(data[5][0], want)


def test_lazy_dataset_reads_from_many_small_shards(model, pairs, tmp_path, monkeypatch):
    monkeypatch.setattr(lc, "MAX_OPEN_SHARDS", 2)
    one = model.latent_shape[0] * int(np.prod(model.latent_shape[1:])) * 4
    data = cached_latents(model, pairs, tmp_path / "c", batch_size=4, shard_bytes=3 * one)
    assert len(list((tmp_path / "c").glob("video-*/shard-*"))) >= 5
    # nothing but names and keys is held in memory
    assert not any(isinstance(v, torch.Tensor) for v in vars(data).values())
    assert all(isinstance(x, (int, str)) for item in data.items for x in item)
    ref = encode_pairs(model, pairs)
    clone = pickle.loads(pickle.dumps(data))  # DataLoader workers get a copy without open handles
    order = torch.randperm(8, generator=torch.Generator().manual_seed(0)).tolist()
    loader = torch.utils.data.DataLoader(clone, batch_size=3, sampler=order)
    got = torch.cat([b[0] for b in loader])
    torch.testing.assert_close(got, torch.stack([ref[i][0] for i in order]), rtol=1e-5, atol=1e-6)
    assert len(clone._handles) <= 2


def _mp4_dataset(tmp_path, n=4, frames=8, size=32):
    root = tmp_path / "ds"
    for i in range(2 * n):
        write_video(root / "videos" / f"v{i}.mp4", clip(i, frames=frames, size=size))
    recs = [
        {"prompt": f"prompt {i % 2}", "video_a": f"videos/v{2 * i}.mp4", "video_b": f"videos/v{2 * i + 1}.mp4"}
        for i in range(n)
    ]
    for i, r in enumerate(recs):
        r["preference"] = ["a", "b", "tie", "b"][i % 4]
    (root / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return str(root / "prefs.jsonl")


def test_streaming_build_serves_the_trainer(model, tmp_path, monkeypatch):
    src = _mp4_dataset(tmp_path)
    ds = load_preference_dataset(src)
    data = build_latent_cache(model, ds, tmp_path / "c", src, src, batch_size=2)
    assert data.rows == [0, 1, 3] and data.stats["skipped"] == {"bad_row": 0, "tie": 1}
    assert data.stats["videos_encoded"] == 6 and data.stats["prompts_encoded"] == 2  # the tie's videos are not needed
    # the trainer's path (to_pairs + cached_latents) finds everything already cached
    counter = _counting(model, monkeypatch)
    from_pairs = cached_latents(model, to_pairs(ds, root=src), tmp_path / "c")
    assert counter.n == 0 and from_pairs.stats["videos_reused"] == 6
    for i in range(3):
        for a, b in zip(data[i], from_pairs[i]):
            torch.testing.assert_close(a, b)


def test_streaming_build_with_preprocessing_and_bad_rows(model, tmp_path):
    src = _mp4_dataset(tmp_path, frames=16, size=48)  # not the model's 8x32x32
    lines = (tmp_path / "ds" / "prefs.jsonl").read_text().splitlines()
    bad = json.loads(lines[0]) | {"video_b": "videos/missing.mp4"}
    (tmp_path / "ds" / "prefs.jsonl").write_text("\n".join([json.dumps(bad), *lines[1:]]) + "\n")
    ds = load_preference_dataset(src)
    pre = {"num_frames": 8, "height": 32, "width": 32, "fps": 8}
    with pytest.raises(PreferenceDataError, match=r"row 0: video_b: .*missing.mp4: no such video file"):
        build_latent_cache(model, ds, tmp_path / "c", src, src, preprocessing=pre)
    data = build_latent_cache(model, ds, tmp_path / "c", src, src, preprocessing=pre, bad_rows="skip")
    assert data.rows == [1, 3] and data.stats["skipped"] == {"bad_row": 1, "tie": 1}
    assert data[0][0].shape == model.latent_shape
    fp, meta = video_fingerprint(model, pre)
    assert meta["preprocessing"] == {"fps": 8.0, "height": 32, "num_frames": 8, "width": 32}
    assert (tmp_path / "c" / f"video-{fp[:16]}").is_dir()
    # too short for the target: a bad row named with its file, found while validating (before any encoding)
    with pytest.raises(PreferenceDataError, match=r"row 1: video_a: .*\.mp4: .*too short for 8 frames at 1 fps"):
        build_latent_cache(model, ds, tmp_path / "c", src, src, target=pre | {"fps": 1})
    with pytest.raises(ValueError, match=r"no usable pairs \(skipped: \{'bad_row': 4"):
        build_latent_cache(model, ds, tmp_path / "c", src, src, target=pre | {"fps": 1}, bad_rows="skip")


def test_train_with_the_cache_matches_training_without(tiny_model_dir, pref_dataset_dir, tmp_path):
    def cfg(name, **kw):
        base = dict(dataset=pref_dataset_dir, name=name, max_steps=2, train_batch_size=4)
        return build_config(**tiny_recipe(tiny_model_dir, tmp_path, **(base | kw)))

    plain = train(cfg("plain"))
    cached = train(cfg("cached", latent_cache_dir=str(tmp_path / "cache")))
    shards = sorted((tmp_path / "cache").rglob("shard-*.safetensors"))
    assert shards
    a = load_file(plain / "lora" / "pytorch_lora_weights.safetensors")
    b = load_file(cached / "lora" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and any(v.abs().max() > 0 for k, v in b.items() if "lora_B" in k)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
    # a fresh load of the model finds everything the cached run wrote (the same fingerprints, at the model input)
    fresh = load_model(tiny_model_dir)
    ds = load_preference_dataset(pref_dataset_dir)
    again = build_latent_cache(fresh, ds, tmp_path / "cache", root=pref_dataset_dir, target=fresh.video_input)
    assert again.stats["videos_encoded"] == 0 and again.stats["videos_reused"] == 16
    assert again.stats["prompts_encoded"] == 0
    assert sorted((tmp_path / "cache").rglob("shard-*.safetensors")) == shards


def test_cli_cache_encodes_once(tiny_model_dir, tmp_path, capsys):
    from align.cli import main

    src = _mp4_dataset(tmp_path)
    cache = tmp_path / "cache"
    assert main(["data", "cache", src, "--model", str(tiny_model_dir), "--cache-dir", str(cache)]) == 0
    assert "3 pairs (skipped {'bad_row': 0, 'tie': 1}); videos encoded 6, reused 0" in capsys.readouterr().out
    assert main(["data", "cache", src, "--model", str(tiny_model_dir), "--cache-dir", str(cache)]) == 0
    assert "videos encoded 0, reused 6; prompts encoded 0, reused 2" in capsys.readouterr().out
    # --recipe: the model, dataset and cache folder of the training recipe (the same namespaces)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(tiny_model_dir, tmp_path, dataset=src, latent_cache_dir=str(cache))))
    assert main(["data", "cache", "--recipe", str(recipe)]) == 0
    assert "videos encoded 0, reused 6; prompts encoded 0, reused 2" in capsys.readouterr().out
    assert main(["data", "cache", src, "--model", str(tiny_model_dir)]) == 2
    assert "give --cache-dir (or a --recipe whose keys set them)" in capsys.readouterr().err


def test_streaming_build_reads_untyped_nested_list_videos(model, tmp_path):
    rows = make_preference_rows(4)
    untyped = datasets.Dataset.from_dict(rows)  # videos as List(List(List(List(uint8)))), not Array4D
    assert "List" in str(untyped.features["video_a"])
    data = build_latent_cache(model, untyped, tmp_path / "c")
    ref = encode_pairs(model, to_pairs(datasets.Dataset.from_dict(rows)))
    assert data.stats["videos_encoded"] == 8
    for i in range(4):
        for got, want in zip(data[i], ref[i]):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def _track_decodes(monkeypatch) -> dict:
    """Wrap ``load_video_value`` (validation's and the cache's) to count decoded videos and the
    most of them alive in memory at once."""
    from align.data import checks

    seen = {"decodes": 0, "peak_alive": 0}
    alive: list[weakref.ref] = []
    orig = checks.load_video_value

    def tracked(*args, **kwargs):
        frames = orig(*args, **kwargs)
        alive[:] = [r for r in alive if r() is not None] + [weakref.ref(frames)]
        seen["decodes"] += 1
        seen["peak_alive"] = max(seen["peak_alive"], len(alive))
        return frames

    monkeypatch.setattr(checks, "load_video_value", tracked)
    monkeypatch.setattr(lc, "load_video_value", tracked)
    return seen


def test_train_with_the_cache_streams_the_dataset(tiny_model_dir, tmp_path, monkeypatch):
    """With latent_cache_dir, train() validates and encodes row by row (never to_pairs, never all
    videos in memory), skips and counts as bad_rows says, and trains the same LoRA as without."""
    import align.training.dpo as train_module
    from align.data import pairs

    src = _mp4_dataset(tmp_path, n=24)  # 48 distinct mp4 files; every 4th row a tie
    lines = (tmp_path / "ds" / "prefs.jsonl").read_text().splitlines()
    lines[5] = json.dumps(json.loads(lines[5]) | {"video_b": "videos/missing.mp4"})
    (tmp_path / "ds" / "prefs.jsonl").write_text("\n".join(lines) + "\n")

    def cfg(name, **kw):
        base = dict(dataset=src, name=name, max_steps=2, train_batch_size=4, bad_rows="skip")
        return build_config(**tiny_recipe(tiny_model_dir, tmp_path / "runs", **(base | kw)))

    plain = train(cfg("plain"))  # to_pairs: every video decoded into memory at once

    def refuse(*args, **kwargs):
        raise AssertionError("to_pairs decodes every video into memory")

    monkeypatch.setattr(train_module, "to_pairs", refuse)
    monkeypatch.setattr(pairs, "to_pairs", refuse)
    monkeypatch.setattr(train_module, "encode_pairs", refuse)
    seen = _track_decodes(monkeypatch)
    cache = str(tmp_path / "cache")
    with pytest.raises(PreferenceDataError, match=r"row 5: video_b: .*missing.mp4: no such video file"):
        train(cfg("strict", latent_cache_dir=cache, bad_rows="error"))
    seen.update(decodes=0, peak_alive=0)
    cached = train(cfg("cached", latent_cache_dir=cache))

    # 47 files validated, then the 34 videos of the 17 usable pairs encoded (the ties' are not needed)
    assert seen["decodes"] == 47 + 34
    assert seen["peak_alive"] <= 16  # one encoding batch at most, never all 47
    summary = json.loads((cached / "summary.json").read_text())
    assert summary["rows"] == 24 and summary["pairs"] == 17
    assert summary["skipped"] == {"bad_row": 1, "tie": 6}
    assert summary["skipped"] == json.loads((plain / "summary.json").read_text())["skipped"]
    assert summary["latent_cache"]["videos_encoded"] == 34 and summary["latent_cache"]["videos_reused"] == 0
    a = load_file(plain / "lora" / "pytorch_lora_weights.safetensors")
    b = load_file(cached / "lora" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and any(v.abs().max() > 0 for k, v in b.items() if "lora_B" in k)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)

    # a second run reuses the cache: the files are decoded once, to validate and hash them
    seen.update(decodes=0, peak_alive=0)
    again = train(cfg("again", latent_cache_dir=cache))
    assert seen["decodes"] == 47 and seen["peak_alive"] <= 2
    assert json.loads((again / "summary.json").read_text())["latent_cache"]["videos_reused"] == 34


def test_mixed_sizes_and_stills_cache_at_the_model_input(model, tmp_path):
    """VideoGen-RewardBench's sample mixes sizes, frame rates and lengths; a target brings every
    video to the model's 8 frames of 32x32 at 8 fps. An image set caches with --repeat-frames."""
    from pathlib import Path

    from align.data.importers import ImportOptions, import_dataset

    data = Path(__file__).resolve().parent.parent / "data"
    import_dataset("videogen-rewardbench", data / "videogen_rewardbench", tmp_path / "vg")
    ds = load_preference_dataset(tmp_path / "vg")
    with pytest.raises(ValueError, match="videos of several sizes or lengths.*pass the model's input as the target"):
        build_latent_cache(model, ds, tmp_path / "c", "vg", tmp_path / "vg")
    target = {"num_frames": 8, "height": 32, "width": 32, "fps": 8}
    cached = build_latent_cache(model, ds, tmp_path / "c", "vg", tmp_path / "vg", target=target)
    assert len(cached) == 2 and cached.stats["skipped"]["tie"] == 1
    assert cached[0][0].shape == cached[1][1].shape == model.latent_shape
    pairs = to_pairs(ds, root=tmp_path / "vg", target=target)
    np.testing.assert_allclose(cached[0][0], encode_pairs(model, pairs)[0][0], atol=1e-5)  # same frames either way

    opts = ImportOptions(repeat_frames=8)
    import_dataset("pickapic", data / "pickapic_v2" / "sample.parquet", tmp_path / "pp", options=opts)
    still = load_preference_dataset(tmp_path / "pp")
    cached = build_latent_cache(model, still, tmp_path / "c", "pp", tmp_path / "pp", target=target)
    assert len(cached) == 2 and cached[0][0].shape == model.latent_shape


# --------------------------------------------------------------------------------------------
# prompt states keyed by the text encoder's files: training a diffusers model without it

WAN_SIZE = {"num_frames": 5, "height": 16, "width": 16, "max_sequence_length": 16}
WAN_FLAGS = ["--num-frames", "5", "--height", "16", "--width", "16", "--max-sequence-length", "16", "--device", "cpu"]


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory):
    from test_diffusers_models import build_pipeline

    path = tmp_path_factory.mktemp("wan") / "pipe"
    build_pipeline("wan").save_pretrained(path)
    return path


def _wan_recipe(wan_dir, tmp_path, src, name, **kw) -> dict:
    from test_diffusers_models import DEFAULT_LORA_TARGETS

    options = kw.pop("model_options", {})
    return dict(
        model=str(wan_dir), model_options={**WAN_SIZE, **options}, dataset=src, name=name,
        output_dir=str(tmp_path / "runs"), max_steps=2, train_batch_size=2, learning_rate=2e-2, lora_rank=4,
        lora_alpha=4.0, lora_targets=DEFAULT_LORA_TARGETS["wan"], beta=5000.0, checkpointing_steps=0, progress=False,
        bad_rows="skip", **kw,
    )  # fmt: skip


def _refuse_text_encoder(monkeypatch) -> None:
    """Loading (or running) a UMT5 encoder fails the test."""
    from transformers import UMT5EncoderModel

    def refuse(*args, **kwargs):
        raise AssertionError("the text encoder was loaded")

    monkeypatch.setattr(UMT5EncoderModel, "from_pretrained", classmethod(refuse))
    monkeypatch.setattr(UMT5EncoderModel, "forward", refuse)


def _add_row(src: str, prompt: str) -> None:
    f = Path(src)
    row = json.loads(f.read_text().splitlines()[0]) | {"prompt": prompt, "preference": "a"}
    f.write_text(f.read_text() + json.dumps(row) + "\n")


def test_cached_prompts_let_a_diffusers_model_load_without_its_text_encoder(wan_dir, tmp_path, monkeypatch, capsys):
    """`data cache` on a tiny Wan pipeline stores every prompt's state (and ""'s) keyed by the text
    encoder's files; a model loaded without the text encoder then builds from the cache, and the
    pre-load check (core.start's text_encoder_options) drops the encoder. A new prompt: the
    encoder is loaded again (auto) or, with load_text_encoder false, a clear error naming it."""
    from align.cli import main
    from align.data.latent_cache import UNCOND_FILE
    from align.training.text_encoder import prompt_coverage, text_encoder_options

    src = _mp4_dataset(tmp_path)
    cache = tmp_path / "cache"
    assert main(["data", "cache", src, "--model", str(wan_dir), "--cache-dir", str(cache), *WAN_FLAGS]) == 0
    out = capsys.readouterr().out
    assert "prompts encoded 3" in out and "loads the model without its text encoder" in out  # 2 prompts + ""
    (uncond,) = cache.glob(f"prompt-*/{UNCOND_FILE}")
    assert json.loads((cache / lc.FILE_DIGESTS).read_text())  # text-encoder file digests memoised

    cfg = build_config(**_wan_recipe(wan_dir, tmp_path, src, "x", latent_cache_dir=str(cache)))
    opts = text_encoder_options(cfg, "cpu")
    assert opts == {"load_text_encoder": False, "prompt_embeds": str(uncond)}
    _refuse_text_encoder(monkeypatch)
    model = load_model(wan_dir, **WAN_SIZE, **opts)
    assert model.text_encoder is None
    data = build_latent_cache(model, load_preference_dataset(src), cache, src, src, target=model.video_input,
                              model_source=str(wan_dir), model_options=WAN_SIZE)  # fmt: skip
    assert data.stats["videos_encoded"] == 0 and data.stats["prompts_encoded"] == 0 and len(data) == 3
    assert data.stats["text_encoder"] == "not loaded" and data[0][2].shape == (16, 32)
    torch.testing.assert_close(model.encode_prompts([""])[0], lc.ShardStore(
        uncond.parent, json.loads((uncond.parent / "fingerprint.json").read_text())["fingerprint"], {}
    ).get(lc.prompt_hash("")))  # fmt: skip

    # another dtype is another namespace; a new prompt is missing from this one
    assert prompt_coverage(str(wan_dir), {**WAN_SIZE, "dtype": "bfloat16"}, cache, ["prompt 0"], "cpu")[1] is None
    _add_row(src, "a red circle moving up")
    assert text_encoder_options(cfg, "cpu") == {}  # auto: this run loads the text encoder and fills the cache
    strict = build_config(**_wan_recipe(wan_dir, tmp_path, src, "y", latent_cache_dir=str(cache),
                                        model_options={"load_text_encoder": False}))  # fmt: skip
    want = (
        r"1 prompt\(s\) are not in the latent cache .* text encoder is not loaded .* 'a red circle moving up'; "
        rf"fill the cache with `vidalign data cache {src} --model {wan_dir} --cache-dir {cache} --num-frames 5 "
        r"--height 16 --width 16 --max-sequence-length 16`"
    )
    with pytest.raises(ValueError, match=want):
        text_encoder_options(strict, "cpu")  # before the model is loaded
    with pytest.raises(ValueError, match=r"1 prompt\(s\) .*'a red circle moving up'"):
        build_latent_cache(model, load_preference_dataset(src), cache, src, src, target=model.video_input,
                           model_source=str(wan_dir), model_options=WAN_SIZE)  # fmt: skip

    # changed text-encoder files are a new namespace: nothing cached for them
    cfg_file = wan_dir / "text_encoder" / "config.json"
    original = cfg_file.read_text()
    try:
        cfg_file.write_text(original.replace("{", '{"_note": "changed",', 1))
        assert prompt_coverage(str(wan_dir), WAN_SIZE, cache, ["prompt 0"], "cpu") == (["prompt 0"], None)
    finally:
        cfg_file.write_text(original)


@pytest.mark.integration
def test_wan_dpo_from_the_cache_trains_without_the_text_encoder(wan_dir, tmp_path, monkeypatch):
    """After `data cache`, `train` with latent_cache_dir never loads the UMT5 encoder, encodes
    nothing, and trains the same LoRA as the in-memory path with the encoder."""
    from align.cli import main

    src = _mp4_dataset(tmp_path)
    cache = tmp_path / "cache"
    plain = train(build_config(**_wan_recipe(wan_dir, tmp_path, src, "plain")))
    assert main(["data", "cache", src, "--model", str(wan_dir), "--cache-dir", str(cache), *WAN_FLAGS]) == 0
    _refuse_text_encoder(monkeypatch)
    cached = train(build_config(**_wan_recipe(wan_dir, tmp_path, src, "cached", latent_cache_dir=str(cache))))
    summary = json.loads((cached / "summary.json").read_text())["latent_cache"]
    assert summary["text_encoder"] == "not loaded"
    assert summary["videos_encoded"] == 0 and summary["prompts_encoded"] == 0 and summary["videos_reused"] == 6
    a = load_file(plain / "lora" / "pytorch_lora_weights.safetensors")
    b = load_file(cached / "lora" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and any(v.abs().max() > 0 for k, v in b.items() if "lora_B" in k)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def test_shard_store_writes_plain_safetensors_from_its_arena(tmp_path):
    """Entries of any supported dtype go through the byte arena into shards that safetensors
    reads back exactly; one larger than a shard gets a shard of its own; buffered entries read back too."""
    store = lc.ShardStore(tmp_path / "s", "fp", {}, shard_bytes=100)
    g = torch.Generator().manual_seed(0)
    want = {
        "f32": torch.randn(2, 5, generator=g),  # 40 bytes
        "bf16": torch.randn(3, 4, generator=g).to(torch.bfloat16),  # 24 bytes
        "u8": torch.arange(7, dtype=torch.uint8),
        "big": torch.randn(60, generator=g),  # 240 bytes > shard_bytes
        "f32b": torch.randn(9, generator=g),  # 36 bytes: 40 + 24 + 7 + 36 > 100, so a new shard first
    }
    for k, v in want.items():
        store.put(k, v)
    torch.testing.assert_close(store.get("f32b"), want["f32b"])  # still buffered
    store.flush()
    shards = sorted((tmp_path / "s").glob("shard-*.safetensors"))
    assert len(shards) == 3
    got = {}
    for f in shards:
        got |= load_file(f)
    assert got.keys() == want.keys()
    for k, v in want.items():
        assert got[k].dtype == v.dtype
        torch.testing.assert_close(got[k], v, rtol=0, atol=0)
    again = lc.ShardStore(tmp_path / "s", "fp", {})
    assert again.bad_shards == [] and set(again.where) == set(want)
    torch.testing.assert_close(again.get("bf16"), want["bf16"], rtol=0, atol=0)
    with pytest.raises(TypeError, match="cannot store torch.complex64"):
        store.put("c", torch.zeros(2, dtype=torch.complex64))
