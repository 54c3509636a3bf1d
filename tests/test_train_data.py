"""DPO from the data users bring: an imported image preference set (Pick-a-Pic v2's published
layout, from data/) and a video set whose pairs differ in size, fps and length, on the tiny
Sora model and on a tiny Wan pipeline. Training resamples every video to the model's input."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_recipe
from safetensors.torch import load_file

from align.data.video import write_video
from align.training import build_config, train

ROOT = Path(__file__).resolve().parents[1]
PICKAPIC = ROOT / "data" / "pickapic_v2" / "sample.parquet"


def _import_pickapic(dst: Path, *extra: str) -> str:
    cmd = [sys.executable, "-m", "align.cli", "data", "import", "--format", "pickapic", str(PICKAPIC), str(dst)]
    r = subprocess.run([*cmd, *extra], capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "PATH": ""})
    assert r.returncode == 0, r.stderr[-2000:]
    return str(dst)


def _mixed_videos(root: Path, n: int = 6) -> str:
    """``n`` pairs whose two videos differ in size, fps and length (as from two generators)."""
    rng = np.random.default_rng(0)
    shapes = [(12, 40, 56, 8), (20, 24, 24, 16), (9, 64, 48, 12)]  # frames, height, width, fps
    recs = []
    for i in range(n):
        names = []
        for j in range(2):
            t, h, w, fps = shapes[(i + j) % len(shapes)]
            v = rng.integers(0, 256, (t, h, w, 3), dtype=np.uint8)
            names.append(write_video(root / "videos" / f"v{i}_{j}.mp4", v, fps=fps).relative_to(root).as_posix())
        recs.append({"prompt": f"a clip number {i % 3}", "video_a": names[0], "video_b": names[1]})
        recs[-1]["preference"] = "a" if i % 2 else "b"
    (root / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return str(root / "prefs.jsonl")


def _trained(run: Path, steps: int) -> None:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, steps + 1)) and all(np.isfinite(r["loss"]) for r in lines)
    lora = load_file(run / "lora" / "pytorch_lora_weights.safetensors")
    assert any(float(v.abs().max()) > 0 for k, v in lora.items() if "lora_B" in k)


def test_tiny_sora_dpo_on_an_imported_image_set_and_mixed_sizes(tiny_model_dir, tmp_path):
    # the tiny model takes 8 frames, so its stills are repeated at import; without that, one
    # frame is too short for it and every row is named as bad
    stills = _import_pickapic(tmp_path / "pickapic_once")
    cfg = build_config(**tiny_recipe(tiny_model_dir, tmp_path / "runs", dataset=stills, name="x", max_steps=1))
    with pytest.raises(ValueError, match="row 0"):
        train(cfg)
    images = _import_pickapic(tmp_path / "pickapic", "--repeat-frames", "8")
    mixed = _mixed_videos(tmp_path / "mixed")
    for name, data in (("images", images), ("mixed", mixed)):
        recipe = tiny_recipe(
            tiny_model_dir, tmp_path / "runs", dataset=data, name=name, max_steps=2, train_batch_size=2
        )
        run = train(build_config(**recipe))
        _trained(run, 2)
        summary = json.loads((run / "summary.json").read_text())
        assert summary["pairs"] >= 2 and summary["skipped"]["bad_row"] == 0


@pytest.mark.integration
def test_wan_dpo_on_stills_and_mixed_sizes(tmp_path):
    """Wan takes single frames (num_frames = 4*0 + 1): the stills train as they are; the mixed
    set is resampled to 9 frames at Wan's 16 fps, 16 x 16."""
    from test_diffusers_models import DEFAULT_LORA_TARGETS, build_pipeline

    build_pipeline("wan").save_pretrained(tmp_path / "wan")
    common = dict(
        model=str(tmp_path / "wan"), output_dir=str(tmp_path / "runs"), max_steps=2, train_batch_size=2,
        learning_rate=2e-2, lora_rank=4, lora_alpha=4.0, lora_targets=DEFAULT_LORA_TARGETS["wan"], beta=5000.0,
        checkpointing_steps=0, progress=False,
    )  # fmt: skip
    size = {"height": 16, "width": 16, "max_sequence_length": 16}
    images = _import_pickapic(tmp_path / "pickapic")
    run = train(build_config(**common, dataset=images, name="stills", model_options={**size, "num_frames": 1}))
    _trained(run, 2)
    mixed = _mixed_videos(tmp_path / "mixed")
    run = train(build_config(**common, dataset=mixed, name="mixed", model_options={**size, "num_frames": 9}))
    _trained(run, 2)
