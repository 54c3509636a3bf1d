"""Using a trained reward model: its accuracy on a preference dataset, written to a folder
(``vidalign reward eval``), and the scores of videos for a prompt (``vidalign reward score``).

Videos come in decoded (uint8 ``(T, H, W, C)`` arrays); reading files is the caller's job, so
this package imports nothing from ``align``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from reward_models.model import VideoRewardModel
from reward_models.train import PairData, evaluate, plot_calibration

# what ``vidalign reward eval`` prints of the summary (reward_eval.json holds all of it); the
# accuracies with and without ties are VideoAlign's (``reward_models.train.evaluate``)
SHOWN = (
    "accuracy",
    "accuracy_ci95",
    "accuracy_with_ties",
    "accuracy_without_ties",
    "accuracy_three_way",
    "n",
    "ties",
    "aspect_agreement",
)


def evaluate_to_dir(
    model: VideoRewardModel,
    data: PairData,
    out_dir: str | Path,
    tie_threshold: float = 0.1,
    tie_loss: str | None = None,
    k: float | None = None,
    model_dir: str | Path | None = None,
) -> dict:
    """:func:`reward_models.train.evaluate` of ``model`` on ``data``, written to ``out_dir``:
    ``reward_eval.json`` (the summary, without the per-pair scores) and ``calibration.png``.
    The calibration uses the tie model the reward model was trained with (``tie_loss``, ``k``;
    None: the one ``model_dir``'s ``reward_config.json`` records, else ``soft``). Returns the
    summary."""
    saved = tie_model(model_dir) if model_dir is not None else {"tie_loss": "soft", "btt_k": 5.0}
    tie_loss = saved["tie_loss"] if tie_loss is None else tie_loss
    k = saved["btt_k"] if k is None else k
    res = evaluate(model, data, tie_threshold, tie_loss=tie_loss, k=k)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot_calibration(res["calibration"], out / "calibration.png")
    summary = {k: v for k, v in res.items() if k not in ("score_a", "score_b")}
    (out / "reward_eval.json").write_text(json.dumps(summary, indent=2))
    return summary


def tie_model(model_dir: str | Path) -> dict:
    """``{"tie_loss", "btt_k"}`` a saved reward model was trained with (``reward train`` records
    them in ``reward_config.json``; older models: ``soft``)."""
    path = Path(model_dir) / "reward_config.json"
    saved = json.loads(path.read_text()) if path.is_file() else {}
    return {"tie_loss": saved.get("tie_loss", "soft"), "btt_k": float(saved.get("btt_k", 5.0))}


def score_videos(model: VideoRewardModel, videos: Sequence[np.ndarray], prompt: str) -> np.ndarray:
    """One score per video for ``prompt``: one batch when the videos share a shape, else one
    call per video (a score depends only on its own video and prompt)."""
    if not prompt.strip():
        raise ValueError("the prompt is empty")
    if not videos:
        raise ValueError("no videos to score")
    if len({v.shape for v in videos}) == 1:
        return model.score(np.stack(videos), [prompt] * len(videos))
    return np.concatenate([model.score(v[None], [prompt]) for v in videos])
