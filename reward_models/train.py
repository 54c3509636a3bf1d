"""Training and evaluation of the video reward model on preference data.

``vidalign reward train recipes/reward_clip.yaml`` reads a preference dataset (the project
schema: prompt, video_a, video_b, preference a|b|tie; optional per-aspect labels in columns
``preference_<aspect>`` with the same values) through the loader its caller passes in (this
package imports nothing from ``align``; vidalign's is ``align.training.reward.load_pairs``), as
decoded :class:`PairData`, splits it *by prompt* into train and held-out parts, and minimises
the Bradley–Terry loss with ties (``reward_models.model.bt_loss``: ties as soft targets, or the
Rao–Kupper model VideoAlign trains with: ``tie_loss``). Each epoch it evaluates held-out
pairwise accuracy (with and without ties, as VideoAlign computes them: :func:`evaluate`) and
keeps the best checkpoint in ``<output_dir>/<name>/best/``.

Fine-tuning modes: ``full`` (everything), ``lora`` (LoRA on the backbone's MLP projections
``c_fc``/``c_proj`` of both towers, merged into the weights when saved, plus the heads),
``head`` (only the temporal head, learned head, aspect heads and logit scale).

``contrastive_pretrain`` trains a backbone CLIP-style on (video, caption) pairs: what an
open_clip pretrained tag gives a real user, made here for the synthetic world (the demo).
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from reward_models.model import TIE_LOSSES, RewardModelConfig, VideoRewardModel, bt_loss

PREF_TO_TARGET = {"a": 1.0, "b": 0.0, "tie": 0.5}


@dataclass
class RewardTrainConfig:
    """A reward-model training run. Keys of ``recipes/reward_clip.yaml``."""

    dataset: str = field(default="", metadata={"help": "a preference dataset directory (save_to_disk)"})
    output_dir: str = field(default="runs", metadata={"help": "the folder that holds reward-model runs"})
    name: str = field(default="reward", metadata={"help": "the run's name: its directory is <output_dir>/<name>"})
    init_from: str | None = field(default=None, metadata={"help": "a saved reward model directory to start from"})
    model: dict = field(
        default_factory=dict,
        metadata={
            "help": "RewardModelConfig fields; with init_from, changes to the saved config that add parts "
            "(motion_keypoints, aspects, learned_head): those parts start fresh"
        },
    )
    finetune: Literal["full", "lora", "head"] = field(default="full", metadata={"help": "full | lora | head"})
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank of the backbone (finetune: lora)"})
    learning_rate: float = field(default=3e-4, metadata={"help": "AdamW learning rate"})
    fresh_learning_rate: float | None = field(
        default=None, metadata={"help": "for the parts `model` adds to init_from (default: learning_rate)"}
    )
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    epochs: int = field(default=10, metadata={"help": "passes over the training pairs"})
    batch_size: int = field(default=32, metadata={"help": "pairs per step"})
    eval_fraction: float = field(default=0.2, metadata={"help": "share of prompts held out"})
    seed: int = field(default=0, metadata={"help": "seed of the split, the order and initialisation"})
    bad_rows: Literal["error", "skip"] = field(default="error", metadata={"help": "error | skip"})
    tie_loss: Literal["soft", "btt"] = field(
        default="soft",
        metadata={
            "help": "soft: a tie is the target 0.5 of sigmoid(s_a - s_b); btt: the Rao-Kupper tie model "
            "(VideoAlign's BTT loss, tie parameter btt_k)"
        },
    )
    btt_k: float = field(default=5.0, metadata={"help": "tie_loss btt: the Rao-Kupper k > 1 (VideoAlign: 5)"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})

    def __post_init__(self) -> None:
        if self.tie_loss not in TIE_LOSSES:
            raise ValueError(f"reward train: `tie_loss` must be one of {' | '.join(TIE_LOSSES)}, got {self.tie_loss!r}")
        if not self.btt_k > 1:
            raise ValueError(f"reward train: `btt_k` must be > 1 (the Rao-Kupper tie parameter), got {self.btt_k}")


@dataclass
class PairData:
    """Decoded preference pairs (ties kept), with per-aspect targets when present."""

    prompts: list[str]
    video_a: np.ndarray  # uint8 (N, T, H, W, C)
    video_b: np.ndarray
    target: np.ndarray  # (N,) 1 / 0 / 0.5
    aspects: dict[str, np.ndarray] = field(default_factory=dict)
    skipped: int = 0

    def subset(self, idx) -> PairData:
        idx = np.asarray(idx, dtype=int)
        return PairData(
            [self.prompts[i] for i in idx],
            self.video_a[idx],
            self.video_b[idx],
            self.target[idx],
            {k: v[idx] for k, v in self.aspects.items()},
        )


def split_by_prompt(prompts: list[str], eval_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Row indices of train and held-out parts; no prompt is in both."""
    uniq = sorted(set(prompts))
    rng = np.random.default_rng(seed)
    rng.shuffle(uniq)
    n_eval = int(round(eval_fraction * len(uniq)))
    held = set(uniq[:n_eval])
    return [i for i, p in enumerate(prompts) if p not in held], [i for i, p in enumerate(prompts) if p in held]


def accuracy_ci(
    correct: np.ndarray, groups: Sequence, n_boot: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile-bootstrap confidence interval of the accuracy ``correct.mean()`` that
    resamples *groups* (prompts) with replacement, not pairs: the pairs of one prompt share
    videos, so their errors go together and resampling pairs would understate the spread."""
    correct = np.asarray(correct, dtype=np.float64)
    if len(correct) == 0 or len(correct) != len(groups):
        raise ValueError(f"accuracy_ci: {len(correct)} outcomes for {len(groups)} group labels")
    _, inverse = np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True)
    hits, sizes = np.bincount(inverse, weights=correct), np.bincount(inverse).astype(np.float64)
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(len(sizes), np.full(len(sizes), 1 / len(sizes)), size=n_boot)  # (n_boot, groups)
    accs = (draws @ hits) / (draws @ sizes)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(accs, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def _signed_labels(target: np.ndarray) -> np.ndarray:
    """VideoAlign's labels: 1 (a preferred), -1 (b preferred), 0 (tie) from targets 1 / 0 / 0.5."""
    y = np.asarray(target, dtype=np.float64)
    return np.where(y > 0.5, 1, np.where(y < 0.5, -1, 0))


def accuracy_without_ties(target: np.ndarray, diff: np.ndarray) -> float:
    """VideoAlign's ``calc_accuracy_without_ties``: over the pairs with a winner, the share whose
    score difference ``diff = s_a - s_b`` has the winner's sign (a difference of exactly 0 counts
    as wrong there); NaN when no pair has a winner."""
    h, m = _signed_labels(target), np.asarray(diff, dtype=np.float64)
    decided = h != 0
    return float((h * m > 0)[decided].mean()) if decided.any() else float("nan")


def accuracy_with_ties(target: np.ndarray, diff: np.ndarray) -> tuple[float, float]:
    """VideoAlign's ``calc_accuracy_with_ties`` (the tie calibration of Deutsch et al. 2023):
    three-way accuracy over all pairs -- a tie label is right when the model predicts a tie,
    ``|diff| <= eps``, a winner when the difference has its sign and exceeds ``eps`` -- at the
    threshold ``eps`` that maximises it. Returns ``(accuracy, eps)``; ``(nan, nan)`` without pairs.

    As VideoAlign computes it: the pairs are sorted by ``|diff|`` (stably) and ``eps`` walks
    through them, the first ``j`` pairs predicted ties for ``j = 1 .. N``; the best of those N
    accuracies is reported (so at least one pair is predicted a tie, and pairs with equal
    ``|diff|`` are taken one at a time). ``eps`` is chosen on the evaluated pairs themselves,
    so it is an optimistic number, comparable with VideoAlign's tables."""
    h, m = _signed_labels(target), np.asarray(diff, dtype=np.float64)
    if len(h) == 0:
        return float("nan"), float("nan")
    order = np.argsort(np.abs(m), kind="stable")
    h, m = h[order], m[order]
    both_tie = np.cumsum(h == 0)  # among the first j (predicted ties): labelled ties are right
    right = (h != 0) & (h * m > 0)
    rest_right = right.sum() - np.cumsum(right)  # among the others: winners with the right sign
    acc = (both_tie + rest_right) / len(h)
    best = int(np.argmax(acc))  # the first maximum, as VideoAlign's strict `>`
    return float(acc[best]), float(abs(m[best]))


def expected_preference(diff: np.ndarray, tie_loss: str = "soft", k: float = 5.0) -> np.ndarray:
    """The model's expected label ``E[y]`` (1 = a, 0 = b, 0.5 = tie) for ``diff = s_a - s_b``:
    ``sigmoid(diff)`` under the soft-target loss; ``P(a > b) + P(tie) / 2`` under Rao–Kupper."""
    d = np.asarray(diff, dtype=np.float64)
    if tie_loss == "soft":
        return 1 / (1 + np.exp(-d))
    pa, pb = 1 / (1 + k * np.exp(-d)), 1 / (1 + k * np.exp(d))
    return pa + 0.5 * (k**2 - 1) * pa * pb


def _calibration(p: np.ndarray, y: np.ndarray) -> list[dict]:
    """Mean predicted ``p`` against the observed label mean in 10 bins of ``p``."""
    bins = np.clip((p * 10).astype(int), 0, 9)
    return [
        {
            "bin": b / 10,
            "predicted": float(p[bins == b].mean()),
            "observed": float(y[bins == b].mean()),
            "n": int((bins == b).sum()),
        }
        for b in range(10)
        if (bins == b).any()
    ]


@torch.no_grad()
def evaluate(
    model: VideoRewardModel,
    data: PairData,
    tie_threshold: float = 0.1,
    batch_size: int = 64,
    tie_loss: str = "soft",
    k: float = 5.0,
) -> dict:
    """Pairwise accuracy against the labels.

    ``accuracy``: over pairs with a winner, the share where the higher score is the winner;
    ``accuracy_ci95``: its 95% interval from a bootstrap over prompts (``accuracy_ci``).
    ``accuracy_with_ties`` / ``accuracy_without_ties``: VideoAlign's two numbers, computed as its
    ``calc_accuracy`` does (:func:`accuracy_with_ties`, with its tie threshold in
    ``accuracy_with_ties_threshold``; :func:`accuracy_without_ties`, which differs from
    ``accuracy`` only in counting an exact score tie as wrong), so they compare with its tables.
    ``accuracy_three_way``: over all pairs, three-way at the fixed ``tie_threshold`` (a tie
    predicted when the scores differ by less). ``calibration``: the mean predicted label (the
    model's ``E[y]`` under its ``tie_loss``: :func:`expected_preference`) vs the observed label
    mean, in 10 bins. ``aspect_agreement`` (when the data has per-aspect labels
    ``preference_<aspect>``): for each aspect, over pairs where it has a winner, the share where
    the *overall* score prefers that winner, and the count. An aspect near 0.5 is one the reward
    model does not see -- a blind spot that a generator optimised against it is free to get
    worse on."""
    sa = model.score(data.video_a, data.prompts, batch_size)
    sb = model.score(data.video_b, data.prompts, batch_size)
    d, y = sa - sb, data.target
    decided = y != 0.5
    correct = ((d > 0) == (y > 0.5))[decided]
    acc = float(correct.mean()) if decided.any() else float("nan")
    ci = list(accuracy_ci(correct, [q for q, dec in zip(data.prompts, decided) if dec])) if decided.any() else None
    pred3 = np.where(np.abs(d) < tie_threshold, 0.5, np.where(d > 0, 1.0, 0.0))
    with_ties, eps = accuracy_with_ties(y, d)
    aspect_agreement = {}
    for name, ya in data.aspects.items():
        won = ya != 0.5
        if won.any():
            agree = ((d > 0) == (ya > 0.5))[won]
            aspect_agreement[name] = {"agreement": float(agree.mean()), "n": int(won.sum())}
    return {
        "accuracy": acc,
        "accuracy_ci95": ci,
        "accuracy_with_ties": with_ties,
        "accuracy_with_ties_threshold": eps,
        "accuracy_without_ties": accuracy_without_ties(y, d),
        "accuracy_three_way": float((pred3 == y).mean()),
        "tie_threshold": tie_threshold,
        "n": int(len(y)),
        "n_decided": int(decided.sum()),
        "ties": int((~decided).sum()),
        "calibration": _calibration(expected_preference(d, tie_loss, k), y),
        "aspect_agreement": aspect_agreement,
        "score_a": sa.tolist(),
        "score_b": sb.tolist(),
    }


def plot_calibration(calibration: list[dict], path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 4))
    ax.plot([0, 1], [0, 1], "--", color="gray", lw=1, label="perfect")
    ax.plot([c["predicted"] for c in calibration], [c["observed"] for c in calibration], "o-", label="reward model")
    ax.set_xlabel("predicted P(a preferred)")
    ax.set_ylabel("observed share preferring a")
    ax.set_title("reward model calibration")
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _setup_finetune(model: VideoRewardModel, mode: str, rank: int) -> list[torch.nn.Parameter]:
    heads = [p for n, p in model.named_parameters() if not n.startswith("clip.")] + [model.clip.logit_scale]
    if mode == "full":
        return list(model.parameters())
    model.clip.requires_grad_(False)
    if mode == "head":
        for p in heads:
            p.requires_grad_(True)
        return heads
    if mode == "lora":
        from peft import LoraConfig, inject_adapter_in_model

        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=["c_fc", "c_proj"]), model.clip)
        lora = [p for n, p in model.clip.named_parameters() if "lora_" in n]
        for p in lora + heads:
            p.requires_grad_(True)
        return lora + heads
    raise ValueError(f"finetune must be full | lora | head, got {mode!r}")


def _save(model: VideoRewardModel, path: Path, extra: dict) -> None:
    """Save; LoRA layers are merged into a clean copy so the checkpoint is a plain model."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    if not any(isinstance(m, BaseTunerLayer) for m in model.modules()):
        model.save_pretrained(path, extra)
        return
    state = {}
    for name, mod in model.named_modules():
        if isinstance(mod, BaseTunerLayer):
            base = mod.get_base_layer()
            w = base.weight.data + mod.get_delta_weight("default")
            state[f"{name}.weight"] = w
            if base.bias is not None:
                state[f"{name}.bias"] = base.bias.data
    for k, v in model.state_dict().items():
        if "lora_" not in k and ".base_layer." not in k:
            state[k] = v
    clean = VideoRewardModel(model.cfg)
    clean.load_state_dict(state)
    clean.save_pretrained(path, extra)


def train_reward_model(cfg: RewardTrainConfig, load_pairs: Callable[[str, str], PairData]) -> Path:
    """Train as configured; returns the run directory (best model in ``best/``).

    ``load_pairs(dataset, bad_rows)`` reads ``cfg.dataset`` as :class:`PairData`: this package
    reads no dataset format itself (vidalign's loader, for its preference datasets, is
    ``align.training.reward.load_pairs``; ``align.training.reward.train_reward_model`` passes it)."""
    if not cfg.dataset:
        raise ValueError("reward train: `dataset` is required")
    run_dir = Path(cfg.output_dir) / cfg.name
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    data = load_pairs(cfg.dataset, cfg.bad_rows)
    tr_idx, ev_idx = split_by_prompt(data.prompts, cfg.eval_fraction, cfg.seed)
    if not tr_idx or not ev_idx:
        raise ValueError(
            f"{cfg.dataset}: {len(set(data.prompts))} prompts cannot be split into train and "
            f"held-out parts with eval_fraction={cfg.eval_fraction}"
        )
    train_data, eval_data = data.subset(tr_idx), data.subset(ev_idx)
    model, params, opt, aspects = _model_and_optimizer(cfg, train_data)
    gen = torch.Generator().manual_seed(cfg.seed)
    metrics = open(run_dir / "metrics.jsonl", "w")
    best, best_eval, t0 = -1.0, {}, time.time()
    steps_per_epoch = max(1, len(tr_idx) // cfg.batch_size)
    bar = tqdm(total=cfg.epochs * steps_per_epoch, desc=f"reward ({cfg.name})", disable=not cfg.progress)
    num_phases = model.num_phases(train_data.video_a)  # 1 unless frame_sampling is strided
    for epoch in range(cfg.epochs):
        batches = _epoch_batches(model, train_data, cfg.batch_size, gen, num_phases)
        for s, (fa, fb, ids, idx) in enumerate(batches):
            out = _step(model, opt, params, fa, fb, ids, train_data, aspects, idx, cfg)
            bar.update(1)
            bar.set_postfix(loss=f"{out['loss'].item():.3f}", acc=f"{out['acc'].item():.2f}")
            step = epoch * steps_per_epoch + s
            rec = {"epoch": epoch, "step": step, "loss": out["loss"].item(), "acc": out["acc"].item()}
            metrics.write(json.dumps(rec) + "\n")
        ev = evaluate(model, eval_data, tie_loss=cfg.tie_loss, k=cfg.btt_k)
        ev["epoch"] = epoch
        rec = {"epoch": epoch, "eval_accuracy": ev["accuracy"]}
        rec |= {f"eval_{key}": ev[key] for key in ("accuracy_with_ties", "accuracy_without_ties")}
        metrics.write(json.dumps(rec) + "\n")
        metrics.flush()
        if ev["accuracy"] > best:
            best, best_eval = ev["accuracy"], ev
            extra = {"trained_on": cfg.dataset, "epoch": epoch, "eval_accuracy": best, "tie_loss": cfg.tie_loss}
            _save(model, run_dir / "best", extra | ({"btt_k": cfg.btt_k} if cfg.tie_loss == "btt" else {}))
    bar.close()
    metrics.close()
    summary = {
        "train_pairs": len(tr_idx),
        "eval_pairs": len(ev_idx),
        "eval_prompts": sorted(set(eval_data.prompts)),  # the held-out prompts, to evaluate other models alike
        "skipped_rows": data.skipped,
        "best_eval_accuracy": best,
        "best_eval_accuracy_ci95": best_eval.get("accuracy_ci95"),
        "best_eval_accuracy_with_ties": best_eval.get("accuracy_with_ties"),  # VideoAlign's (tie-calibrated)
        "best_eval_accuracy_without_ties": best_eval.get("accuracy_without_ties"),
        "calibration": best_eval.get("calibration"),
        "best_eval_aspect_agreement": best_eval.get("aspect_agreement"),
        "best_epoch": best_eval.get("epoch"),
        "train_s": time.time() - t0,
        "config": asdict(cfg),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return run_dir


def _model_and_optimizer(cfg: RewardTrainConfig, train_data: PairData) -> tuple:
    """``(model, trained parameters, AdamW, per-aspect targets the model has heads for)``: a fresh
    model from ``cfg.model``, or ``cfg.init_from`` with ``cfg.model``'s changes (new parts at
    ``fresh_learning_rate``), set up for ``cfg.finetune``."""
    if cfg.init_from:
        model = VideoRewardModel.from_pretrained(cfg.init_from, overrides=cfg.model)
    else:
        model = VideoRewardModel(RewardModelConfig.from_dict(cfg.model))
    unused = sorted(set(train_data.aspects) - set(model.cfg.aspects))
    if unused:
        warnings.warn(
            f"{cfg.dataset}: per-aspect labels {unused} are not used: the reward model has no heads for "
            f"them (add them to `model.aspects`)",
            stacklevel=3,
        )
    aspects = {k: v for k, v in train_data.aspects.items() if k in model.cfg.aspects}
    params = _setup_finetune(model, cfg.finetune, cfg.lora_rank)
    fresh_names = set(model.fresh_parameters)  # parts cfg.model added to init_from: their own rate
    if fresh_names and cfg.progress:
        parts = sorted({n.split(".")[0] for n in fresh_names})
        print(f"[vidalign] reward train: {cfg.init_from} with {cfg.model}: new parts {parts} start fresh")
    fresh = [p for n, p in model.named_parameters() if n in fresh_names and p.requires_grad]
    groups = [{"params": [p for p in params if not any(p is q for q in fresh)]}]
    if fresh:
        lr = cfg.learning_rate if cfg.fresh_learning_rate is None else cfg.fresh_learning_rate
        groups.append({"params": fresh, "lr": lr})
    opt = torch.optim.AdamW(groups, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, foreach=True)
    return model, params, opt, aspects


def _epoch_batches(model: VideoRewardModel, data: PairData, batch_size: int, gen: torch.Generator, num_phases: int):
    """Yield one epoch's ``(frames a, frames b, token ids, row indices)`` in a seeded random order
    (``len // batch_size`` full batches; the model in train mode)."""
    model.train()
    n = len(data.prompts)
    perm = torch.randperm(n, generator=gen).numpy()
    for s in range(max(1, n // batch_size)):
        idx = perm[s * batch_size : (s + 1) * batch_size]
        ids = model.tokenize([data.prompts[i] for i in idx])
        # strided sampling: one random phase per step, the same for both clips of a pair
        phase = None
        if model.cfg.frame_sampling == "strided":
            phase = int(torch.randint(0, num_phases, (1,), generator=gen))
        fa = model.frames(data.video_a[idx], generator=gen, phase=phase)
        fb = model.frames(data.video_b[idx], generator=gen, phase=phase)
        yield fa, fb, ids, idx


def _step(model, opt, params, fa, fb, ids, data: PairData, aspects: dict, idx, cfg: RewardTrainConfig) -> dict:
    """One optimizer step on the Bradley-Terry loss (``cfg.tie_loss``) of a batch (plus each aspect
    head's); returns the overall loss terms."""
    oa, ob = model(fa, ids), model(fb, ids)
    tie = {"tie_loss": cfg.tie_loss, "k": cfg.btt_k}
    out = bt_loss(oa["score"], ob["score"], torch.from_numpy(data.target[idx]), **tie)
    loss = out["loss"]
    for aspect, y in aspects.items():
        loss = loss + bt_loss(oa[aspect], ob[aspect], torch.from_numpy(y[idx]), **tie)["loss"]
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    return out


def contrastive_pretrain(
    model: VideoRewardModel,
    videos: np.ndarray,
    prompts: list[str],
    steps: int,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    progress: bool = True,
    hard_negatives: np.ndarray | None = None,
) -> list[float]:
    """CLIP's symmetric InfoNCE on (video, caption) pairs; captions that repeat within a
    batch are not counted as negatives of each other. Returns the loss per step.

    ``hard_negatives[i]``: the index of item i's hard negative (e.g. the same clip played
    backwards, captioned with the opposite direction). With it, each batch is ``batch_size // 2``
    random items plus their hard negatives, so the only way to tell them apart is what differs
    (motion), as in temporal hard-negative training of video-text models. Without it,
    time-reversed pairs rarely meet in a batch and a tiny CLIP does not learn direction."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, foreach=True)  # same numbers, faster
    losses = []
    if hard_negatives is not None:
        hard_negatives = np.asarray(hard_negatives)
        if hard_negatives.shape != (len(prompts),):
            raise ValueError(
                f"hard_negatives: expected {len(prompts)} indices (one per item), got shape {hard_negatives.shape}"
            )
        if hard_negatives.min() < 0 or hard_negatives.max() >= len(prompts):
            raise ValueError(
                f"hard_negatives: indices must lie in [0, {len(prompts)}), "
                f"got {hard_negatives.min()}..{hard_negatives.max()}"
            )
        if batch_size < 2:
            raise ValueError(f"hard_negatives: batch_size {batch_size} cannot hold an item and its hard negative")
    model.train()
    for _ in tqdm(range(steps), desc="reward backbone (contrastive)", disable=not progress):
        if hard_negatives is None:
            idx = torch.randint(0, len(prompts), (batch_size,), generator=gen).numpy()
        else:
            first = torch.randint(0, len(prompts), (batch_size // 2,), generator=gen).numpy()
            idx = np.concatenate([first, hard_negatives[first]])
        ps, clips = [prompts[i] for i in idx], videos[idx]
        v = model.encode_video(model.frames(clips, generator=gen))
        t = model.encode_text(model.tokenize(ps))
        scale = model.clip.logit_scale.exp()
        logits = scale * v @ t.T
        same = torch.tensor([[a == b for b in ps] for a in ps])
        logits = logits.masked_fill(same & ~torch.eye(len(ps), dtype=torch.bool), float("-inf"))
        target = torch.arange(len(ps))
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.clip.logit_scale.clamp_(0, np.log(100))
        losses.append(loss.item())
    model.eval()
    return losses
