"""``bench/gpu.py`` (``make bench-gpu``) end to end on a CPU at its tiny size: a DPO optimizer
step and two GRPO rounds through the real trainer, each figure beside the planner's, written to
the JSON file. What a GPU adds (peak memory, MFU) is null here and filled on CUDA."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/, also under a bare `pytest`
from bench import gpu  # noqa: E402

pytestmark = pytest.mark.integration


@pytest.fixture
def one_thread_fresh_accelerate():
    """Tiny ops on a shared CPU: thread hand-offs cost more than the arithmetic. The recipes'
    ``mixed_precision: bf16`` needs accelerate's process-wide state fresh (the tests before
    left it at ``no``), and the tests after need it fresh again."""
    from accelerate.state import AcceleratorState

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    torch.set_num_threads(before)


def test_tiny_bench_runs_end_to_end_on_cpu(tmp_path, one_thread_fresh_accelerate):
    out = tmp_path / "gpu.json"
    gpu.main(["--tiny", "--device", "cpu", "--steps", "1", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["video"] == "5x32x32" and "--tiny" in result["architecture"]
    dpo, grpo = result["dpo"], result["grpo"]
    assert dpo["tokens_per_video"] == 2 * 2 * 2  # latent 2x4x4 in 1x2x2 patches
    assert dpo["gradient_accumulation_steps"] == 1 and dpo["micro_batch_pairs"] == 1
    for figure in (dpo["micro_step_s"], dpo["optimizer_step_s"], grpo["round_s"], grpo["rollout_s"]):
        assert figure["measured"] > 0 and figure["planned"] > 0
        assert figure["measured_over_planned"] == pytest.approx(figure["measured"] / figure["planned"], rel=1e-2)
    for figure in (dpo["peak_gib"], grpo["peak_gib"]):  # CUDA's allocator statistics: none on a CPU
        assert figure["measured"] is None and figure["planned"] > 0
    assert grpo["round"]["sample_steps"] == 2 and grpo["optimizer_steps_per_round"] == 2
    assert grpo["round_s"]["measured"] > grpo["rollout_s"]["measured"]  # the round also scores and trains
