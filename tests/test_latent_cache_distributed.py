"""The latent cache under ``accelerate launch``: a 2-process DDP run that streams the dataset
into a latent cache (every process validates and fills it for itself, concurrently) trains
the same LoRA as a 1-process run from the same cache; a later run reuses what both wrote."""

import json

import pytest
import torch
from safetensors.torch import load_file
from test_distributed import KEYS, LORA, TOL, _metrics, launch

from align.training import build_config, train

pytestmark = pytest.mark.integration


def test_ddp_with_latent_cache_matches_one_process(tiny_model_dir, tmp_path):
    import yaml
    from conftest import make_preference_rows, save_rows, tiny_recipe

    rows = make_preference_rows(16)
    rows["preference"][3] = "tie"
    cache = tmp_path / "cache"
    recipe = tiny_recipe(
        tiny_model_dir,
        tmp_path / "runs",
        dataset=save_rows(rows, tmp_path / "prefs"),
        max_steps=3,
        effective_batch_size=8,
    )
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    launch("ddp", tmp_path / "recipe.yaml", 2, "--name", "ddp", "--latent_cache_dir", str(cache))
    ddp = tmp_path / "runs" / "ddp"
    summary = json.loads((ddp / "summary.json").read_text())
    assert summary["pairs"] == 15 and summary["skipped"] == {"bad_row": 0, "tie": 1}
    assert summary["num_processes"] == 2

    one = train(build_config(**recipe, name="one", latent_cache_dir=str(cache)))
    stats = json.loads((one / "summary.json").read_text())["latent_cache"]
    assert stats["videos_encoded"] == 0 and stats["videos_reused"] == 30  # both processes' shards serve it
    ref, got = _metrics(one), _metrics(ddp)
    assert [r["step"] for r in got] == [1, 2, 3]
    assert all(abs(a[k] - b[k]) <= TOL for a, b in zip(ref, got) for k in KEYS)
    a, b = load_file(one / LORA), load_file(ddp / LORA)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=TOL, rtol=0) for k in a)
