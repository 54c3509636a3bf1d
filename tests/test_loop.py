"""The whole loop on a user's own model, as `vidalign` CLI commands in a subprocess, with nothing
of the synthetic world involved: tiny pipelines of two families (the real diffusers classes, built
from configs: Wan with Wan 2.1's UniPC flow scheduler, and CogVideoX) and prompts of the
user's own.

generate -> labels of those videos -> reward train -> data pairs --judge reward:... -> DPO
train -> eval --judge reward:... --judge clip:... -> (Wan) eval --judge human -> labels
posted to the annotation app -> eval human. The commands run one after another in one
``vidalign`` session process (:class:`CliSession`: ``align.cli.main(argv)`` per command, as the
console script calls it), so the loop pays torch's, diffusers' and peft's imports once instead
of per command (~6 s each); the session ends by checking that no command imported
``align.demo.synthetic``. The annotation server runs as its own ``vidalign annotate serve``
process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

PROMPTS = [
    "a robot walking on the street in rain",
    "a cat asleep on a sofa",
    "fireworks over a harbour at night",
    "a chef slicing bread in a kitchen",
]
FRAMES = {"wan": 5, "cogvideox": 9}
STEPS = ["--height", "16", "--width", "16", "--steps", "2", "--device", "cpu"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def tiny_wan_pipeline():
    """A randomly initialised tiny WanPipeline whose word-level tokenizer knows the prompts' words."""
    import diffusers as d
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    words = sorted({w for p in PROMPTS for w in p.split()})
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=16
    )
    torch.manual_seed(0)
    return d.WanPipeline(
        tokenizer=tokenizer,
        text_encoder=UMT5EncoderModel(
            UMT5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=37, num_layers=1, num_heads=4)
        ),
        vae=d.AutoencoderKLWan(
            base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
        ),
        transformer=d.WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
            text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
        ),
        scheduler=d.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0),
    )  # fmt: skip


def tiny_pipeline(family: str):
    if family == "wan":
        return tiny_wan_pipeline()
    from test_diffusers_models import build_pipeline

    return build_pipeline(family)


SESSION = r"""
import contextlib, io, json, os, sys
proto = os.fdopen(os.dup(1), "w")  # the answers; anything written to fd 1 below goes to stderr
os.dup2(2, 1)
from align.cli import main
for line in sys.stdin:
    argv = json.loads(line)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 1
        except Exception as e:
            import traceback
            traceback.print_exc(file=err)
            rc = 1
    synthetic = "align.demo.synthetic" in sys.modules
    answer = {"rc": rc or 0, "out": out.getvalue(), "err": err.getvalue()[-3000:], "synthetic": synthetic}
    proto.write(json.dumps(answer) + "\n")
    proto.flush()
"""


class CliSession:
    """One ``python -c SESSION`` process that runs ``vidalign`` commands sent as JSON argv lines
    through ``align.cli.main``; each answer holds the exit code, stdout, the tail of stderr and
    whether ``align.demo.synthetic`` has been imported so far."""

    def __init__(self):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SESSION], env=ENV, text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )

    def __call__(self, *args) -> str:
        """Run ``vidalign ARGS``; fail on a non-zero exit or if the synthetic world was imported."""
        argv = list(map(str, args))
        self.proc.stdin.write(json.dumps(argv) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, f"the vidalign session died running {' '.join(argv)}"
        r = json.loads(line)
        assert r["rc"] == 0, f"{' '.join(argv)}:\n{r['err']}"
        assert not r["synthetic"], f"{args[0]} imported the synthetic world"
        return r["out"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


@pytest.fixture
def vidalign():
    session = CliSession()
    yield session
    session.close()


def _labels(gen_dir) -> str:
    """A preference file for the generated videos, as an annotator might label them: of each two
    videos of a prompt, the brighter one wins."""
    from align.data.video import read_video

    rows = [json.loads(x) for x in (gen_dir / "index.jsonl").read_text().splitlines()]
    out = []
    for a, b in zip(rows[::2], rows[1::2]):
        assert a["prompt"] == b["prompt"]
        la, lb = (read_video(gen_dir / r["file"]).mean() for r in (a, b))
        out.append(
            {"prompt": a["prompt"], "video_a": a["file"], "video_b": b["file"], "preference": "b" if lb > la else "a"}
        )
    path = gen_dir / "labels.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in out))
    return str(path)


@pytest.mark.integration
@pytest.mark.parametrize("family", ["wan", "cogvideox"])
def test_whole_loop_on_a_tiny_pipeline_without_the_synthetic_world(family, tmp_path, vidalign):
    pipe = tmp_path / family
    tiny_pipeline(family).save_pretrained(pipe)
    frames = FRAMES[family]
    SIZE = ["--num-frames", frames, *STEPS]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")

    gen = tmp_path / "gen"
    vidalign("generate", "--model", pipe, "--prompts-file", prompts, "--num", 4, *SIZE, "--out", gen)
    index = [json.loads(x) for x in (gen / "index.jsonl").read_text().splitlines()]
    assert len(index) == 16 and index[0]["size"] == [frames, 16, 16] and index[0]["sampler"] == "pipeline"

    rm_recipe = tmp_path / "reward.yaml"
    rm_recipe.write_text(
        f"dataset: {_labels(gen)}\noutput_dir: {tmp_path}\nname: rm\nepochs: 2\nbatch_size: 4\n"
        "eval_fraction: 0.25\nprogress: false\nmodel:\n  model_name: vidalign-tiny-clip\n  num_frames: 2\n"
    )
    vidalign("reward", "train", rm_recipe)
    rm = tmp_path / "rm" / "best"

    pairs = tmp_path / "pairs"
    out = vidalign(
        "data", "pairs", "--model", pipe, "--prompts-file", prompts, "--judge", f"reward:{rm}",
        "--samples-per-prompt", 2, "--rounds", 1, *SIZE, "--out", pairs,
    )  # fmt: skip
    assert f"wrote 4 pairs judged by reward:{rm}" in out
    assert len(list((pairs / "videos").glob("*.mp4"))) == 8  # the dataset's videos are files next to it

    dpo = tmp_path / "dpo.yaml"
    dpo.write_text(
        f"model: {pipe}\nmodel_options:\n  num_frames: {frames}\n  height: 16\n  width: 16\n"
        f"dataset: {pairs}\nname: dpo\noutput_dir: {tmp_path}\nobjective: dpo\nbeta: 500.0\nlearning_rate: 0.001\n"
        "lora_rank: 4\nlora_alpha: 4.0\nlora_targets: [to_q, to_k, to_v, to_out.0]\ntrain_batch_size: 2\n"
        "max_steps: 2\ncheckpointing_steps: 0\nprogress: false\n"
    )
    vidalign("train", dpo)
    lora = tmp_path / "dpo" / "lora"

    ev = tmp_path / "eval"
    out = vidalign(
        "eval", "--model", pipe, "--lora", lora, "--prompts-file", prompts, "--judge", f"reward:{rm}",
        "--judge", "clip:vidalign-tiny-clip", "--seeds-per-prompt", 1, *SIZE, "--out", ev,
    )  # fmt: skip
    report = json.loads((ev / "report.json").read_text())
    assert set(report["winrate"]) == {f"reward:{rm}", "clip:vidalign-tiny-clip"}
    for wr in report["winrate"].values():
        assert wr["n"] == 4 and wr["ci95"][0] <= wr["rate"] <= wr["ci95"][1] and np.isfinite(wr["rate"])
    assert len(report["agreement"]) == 1 and isinstance(report["suspect_judges"], list)
    assert (ev / "side_by_side.mp4").stat().st_size > 0 and (ev / "winrates.png").stat().st_size > 0
    assert json.loads(out.strip().splitlines()[-1])[f"reward:{rm}"]["n"] == 4
    if family == "wan":
        _human_ab_study(vidalign, pipe, lora, prompts, SIZE, tmp_path)


def _human_ab_study(vidalign, pipe, lora, prompts, size, tmp_path):
    """eval --judge human writes a blinded task; the app serves it; every pair is voted a tie
    through the app's API; eval human reports the human win rate (0.5: all ties)."""
    import http.client
    import time

    from align.launch import free_port

    ab = tmp_path / "ab"
    vidalign(
        "eval", "--model", pipe, "--lora", lora, "--prompts-file", prompts, "--judge", "human",
        "--seeds-per-prompt", 1, *size, "--out", ab,
    )  # fmt: skip
    db, port = tmp_path / "ab.sqlite", free_port()
    cmd = [sys.executable, "-m", "align.cli", "annotate", "serve", ab / "human", "--db", db, "--port", port]
    server = subprocess.Popen(list(map(str, cmd)), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def call(method, path, body=None):
        con = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        con.request(method, path, body=json.dumps(body) if body else None, headers={"Content-Type": "application/json"})
        res = con.getresponse()
        data = json.loads(res.read() or b"null")
        con.close()
        return res.status, data

    try:
        for _ in range(100):  # the server's start-up
            try:
                status, nxt = call("GET", "/api/next?annotator=ann")
                break
            except OSError:
                time.sleep(0.2)
        voted = 0
        while nxt["pair"] is not None:
            status, data = call(
                "POST", "/api/label", {"annotator": "ann", "pair_id": nxt["pair"]["id"], "choice": "tie"}
            )
            assert status == 200, data
            voted += 1
            status, nxt = call("GET", "/api/next?annotator=ann")
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert voted == 4
    out = vidalign("eval", "human", "--db", db, "--task", ab / "human", "--out", tmp_path / "human_report")
    report = json.loads((tmp_path / "human_report" / "report.json").read_text())
    wr = report["winrate"]["human"]
    assert wr["n"] == 4 and wr["ties"] == 4 and wr["rate"] == 0.5, wr
    assert "human win rate" in out
