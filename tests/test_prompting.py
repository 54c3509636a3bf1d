"""Prompt rewriting (align/prompting.py) through every path that samples: a tiny causal LM
with a chat template (``hf:``), a local OpenAI-compatible server (``http:``), the cache, the
named errors, the online round, and the prompt A/B of ``vidalign eval``."""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from align.prompting import DEFAULT_INSTRUCTION, PromptRewriter, RewriterError, read_cache

DEMO = str(Path(__file__).resolve().parents[1] / "align" / "demo_models" / "tiny_sora")
WORLD = ["a red square moving left on a black background", "a blue circle moving up on a gray background"]
SAMPLE = ["--steps", "2", "--device", "cpu", "--seed", "0"]


# ------------------------------------------------------------------------- a tiny chat LM


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory) -> Path:
    """A one-layer Llama over a 32-word vocabulary whose weights make greedy decoding a chain on
    the current token: any token -> "bright" -> "vivid" -> end of sequence (attention and MLP
    outputs zeroed, identity embeddings, a hand-set head). Saved with its tokenizer (a
    ``tokenizers`` WordLevel model) and a chat template, loaded back through ``hf:DIR``."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    special = ["<unk>", "<pad>", "<eos>", "<|system|>", "<|user|>", "<|assistant|>"]
    words = "bright vivid a red blue green square circle moving left right up down on black gray background".split()
    vocab = {w: i for i, w in enumerate(special + words)}
    vocab |= {f"w{i}": i for i in range(len(vocab), 32)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        eos_token="<eos>",
        additional_special_tokens=special[3:],
    )
    fast.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    cfg = LlamaConfig(
        vocab_size=32, hidden_size=32, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
        eos_token_id=vocab["<eos>"], pad_token_id=vocab["<pad>"], bos_token_id=None,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg)
    nxt = {t: vocab["bright"] for t in range(32)} | {vocab["bright"]: vocab["vivid"], vocab["vivid"]: vocab["<eos>"]}
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(torch.eye(32))
        model.model.layers[0].self_attn.o_proj.weight.zero_()
        model.model.layers[0].mlp.down_proj.weight.zero_()
        head = torch.zeros(32, 32)
        for t, n in nxt.items():
            head[n, t] = 1.0
        model.lm_head.weight.copy_(head)
    path = tmp_path_factory.mktemp("lm") / "tiny_chat_lm"
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


def _rows(d: Path) -> list[dict]:
    return [json.loads(x) for x in (d / "index.jsonl").read_text().splitlines()]


def test_hf_rewriter_conditions_generate_records_and_caches(tiny_lm, tiny_model_dir, tmp_path, monkeypatch):
    import align.generation
    import align.prompting
    from align.cli import main

    conditioned = []
    sample_batch = align.generation._sample_batch
    monkeypatch.setattr(
        align.generation, "_sample_batch", lambda m, ps, *a: conditioned.extend(ps) or sample_batch(m, ps, *a)
    )
    out = tmp_path / "gen"
    spec = f"hf:{tiny_lm}"
    args = ["generate", "--model", str(tiny_model_dir), "--prompt", WORLD[0], "--prompt", WORLD[1], "--out", str(out)]
    args += SAMPLE
    assert main([*args, "--prompt-rewriter", spec]) == 0
    rows = _rows(out)
    assert conditioned == ["bright vivid"] * 2  # the model is conditioned on the LM's rewrites
    assert [r["prompt"] for r in rows] == WORLD  # the original is what judges and reports see
    assert [r["rewritten_prompt"] for r in rows] == ["bright vivid"] * 2 and rows[0]["prompt_rewriter"] == spec
    cache = read_cache(out / "rewrites.jsonl")
    assert len(cache) == 2 and set(cache.values()) == {"bright vivid"}
    assert {k[2] for k in cache} == {align.prompting.instruction_sha256(DEFAULT_INSTRUCTION)}
    # a resumed rerun takes every rewrite from the cache (the LM is not even loaded) and every video from disk
    monkeypatch.setattr(align.prompting.HFRewriter, "__init__", lambda *a, **k: pytest.fail("LM loaded again"))
    assert main([*args, "--prompt-rewriter", spec, "--resume"]) == 0
    assert _rows(out) == rows and len(conditioned) == 2 and (out / "rewrites.jsonl").read_text().count("\n") == 2
    # resuming without the rewriter would mix settings: an error naming the rewritten prompt
    monkeypatch.setenv("VIDALIGN_DEBUG", "1")  # the CLI re-raises instead of printing one line
    with pytest.raises(ValueError, match="rewritten_prompt: 'bright vivid' on disk, None now"):
        main([*args, "--resume"])


def test_hf_budget_and_a_template_without_a_system_role(tiny_lm, monkeypatch):
    r = PromptRewriter(f"hf:{tiny_lm}", device="cpu")
    tok = r.backend().tokenizer  # a Gemma-like template: no system role, the instruction opens the user turn
    tok.chat_template = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system') }}{% endif %}" + (
        tok.chat_template
    )
    seen, apply = [], tok.apply_chat_template
    monkeypatch.setattr(tok, "apply_chat_template", lambda m, **k: seen.append(m) or apply(m, **k))
    assert r.rewrite(["a cat"]) == ["bright vivid"] and r.calls == 1
    assert seen[-1] == [{"role": "user", "content": f"{DEFAULT_INSTRUCTION}\n\na cat"}]
    monkeypatch.setenv("VIDALIGN_REWRITER_MAX_TOKENS", "2")  # "bright vivid" and no end of sequence
    with pytest.raises(RewriterError, match=r"hf:.*prompt 'a cat'.*over-long, cut at the token budget"):
        PromptRewriter(f"hf:{tiny_lm}", device="cpu").rewrite(["a cat"])


# -------------------------------------------------------------------- a local chat server


class _Chat(BaseHTTPRequestHandler):
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append((self.path, body))
        if self.server.mode == "500":
            self.send_response(500)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        prompt = body["messages"][1]["content"]
        content, reason = {
            "ok": (f'"{prompt}, vivid and smooth"', "stop"),
            "empty": ("  ", "stop"),
            "cut": ("a red square moving", "length"),
            "long": ("word " * 1000, "stop"),
        }[self.server.mode]
        data = json.dumps({"choices": [{"message": {"content": content}, "finish_reason": reason}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def chat_server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Chat)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def chat(chat_server, monkeypatch):
    """The server in mode "ok" with no requests yet; its spec is ``chat.spec``."""
    monkeypatch.setenv("VIDALIGN_REWRITER_RETRIES", "0")
    chat_server.mode, chat_server.requests = "ok", []
    chat_server.spec = f"http:http://127.0.0.1:{chat_server.server_address[1]}#tiny-chat"
    return chat_server


def test_http_rewriter_request_answer_and_cache(chat, tmp_path):
    cache = tmp_path / "rewrites.jsonl"
    r = PromptRewriter(chat.spec, cache=cache)
    assert r.rewrite(["a cat", "a dog", "a cat"]) == ["a cat, vivid and smooth", "a dog, vivid and smooth"] + [
        "a cat, vivid and smooth"
    ]  # quotes removed; a repeated prompt is asked once
    assert r.calls == 2 and len(chat.requests) == 2
    path, body = chat.requests[0]
    assert path == "/v1/chat/completions" and body["model"] == "tiny-chat" and body["temperature"] == 0
    assert body["messages"] == [
        {"role": "system", "content": DEFAULT_INSTRUCTION},
        {"role": "user", "content": "a cat"},
    ]
    again = PromptRewriter(chat.spec, cache=cache)
    assert again.rewrite(["a dog", "a cat"]) == ["a dog, vivid and smooth", "a cat, vivid and smooth"]
    assert again.calls == 0 and len(chat.requests) == 2  # all from the cache
    instruction = tmp_path / "instruction.txt"
    instruction.write_text("Rewrite as a film still.\n")
    other = PromptRewriter(chat.spec, instruction, cache=cache)
    assert other.rewrite(["a cat"]) and other.calls == 1  # another instruction: another key
    assert chat.requests[-1][1]["messages"][0]["content"] == "Rewrite as a film still."
    with open(cache, "a") as f:
        f.write('{"prompt": "torn')  # a run killed mid-line
    assert len(read_cache(cache)) == 3


@pytest.mark.parametrize(
    "mode, message",
    [
        ("500", r"no usable answer from .* for prompt 'a cat' after 1 tries \(HTTP 500"),
        ("empty", "prompt 'a cat': the answer is empty"),
        ("cut", "prompt 'a cat': the answer is over-long, cut at the token budget"),
        ("long", r"prompt 'a cat': the answer is over-long, 4999 characters > 4000"),
    ],
)
def test_http_errors_name_the_rewriter_and_the_prompt(chat, tmp_path, mode, message):
    chat.mode = mode
    with pytest.raises(RewriterError, match=message) as e:
        PromptRewriter(chat.spec, cache=tmp_path / "c.jsonl").rewrite(["a cat"])
    assert chat.spec in str(e.value)
    assert not (tmp_path / "c.jsonl").exists()  # nothing unusable is cached


def test_endpoint_down_and_bad_options_are_named(monkeypatch, tmp_path):
    from align.sample import SamplingOptions

    monkeypatch.setenv("VIDALIGN_REWRITER_RETRIES", "0")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spec = f"http:http://127.0.0.1:{port}/v1"
    with pytest.raises(RewriterError, match=rf"{spec}: no usable answer .* prompt 'a cat' .*endpoint down"):
        PromptRewriter(spec).rewrite(["a cat"])
    with pytest.raises(RewriterError, match=r"'gpt:x': not a rewriter spec; use one of hf:PATH, http:URL"):
        SamplingOptions(prompt_rewriter="gpt:x")
    with pytest.raises(RewriterError, match="--rewrite-instruction .* needs --prompt-rewriter"):
        SamplingOptions(rewrite_instruction="x.txt")
    with pytest.raises(FileNotFoundError, match="rewrite instruction file .*nope.txt does not exist"):
        SamplingOptions(prompt_rewriter="hf:x", rewrite_instruction=str(tmp_path / "nope.txt"))


def test_every_sampling_command_takes_the_rewriter_flags():
    from align.cli import build_parser
    from align.cli.common import sampling_options

    p = build_parser()
    flags = ["--prompt-rewriter", "http:http://h:1", "--rewrite-instruction", __file__]
    for cmd in (["generate"], ["eval"], ["data", "pairs"], ["data", "samples"]):
        options = sampling_options(p.parse_args([*cmd, "--model", "m", "--out", "o", *flags]))
        assert (options.prompt_rewriter, options.rewrite_instruction) == ("http:http://h:1", __file__), cmd


# ------------------------------------------------------------------------- online rounds


def test_online_round_samples_rewrites_and_judges_originals(chat, tmp_path):
    import torch

    from align.training import rollouts

    cfg = SimpleNamespace(prompt_rewriter=chat.spec, rewrite_instruction=None, objective="grpo")
    run = SimpleNamespace(
        world=1, run_dir=tmp_path, device="cpu", model=SimpleNamespace(denoiser=torch.nn.Linear(1, 1))
    )
    rewrites = rollouts.prompt_rewrites(cfg, run, ["a", "b", "a"])
    assert rewrites == {"a": "a, vivid and smooth", "b": "b, vivid and smooth"} and len(chat.requests) == 2
    assert rollouts.prompt_rewrites(cfg, run, ["b", "a"]) == rewrites and len(chat.requests) == 2  # resumed: cached
    seen = {}

    def sample(prompts, seeds):
        seen["sampled"] = prompts
        return {"videos": np.zeros((len(prompts), 1, 2, 2, 3), np.uint8)}

    class Judge:
        name = "j"

        def score(self, videos, prompts):
            seen["judged"] = list(prompts)
            return np.ones(len(prompts))

    spec = rollouts.Rollouts(sample, [Judge()], [0, 1, 2, 3], 2, rewrites=rewrites)
    rnd = rollouts.play_round(run, spec, 0, ["a", "a", "b", "b"], [0, 1, 2, 3])
    assert seen["sampled"] == ["a, vivid and smooth"] * 2 + ["b, vivid and smooth"] * 2
    assert seen["judged"] == ["a", "a", "b", "b"] and rnd.prompts == ["a", "a", "b", "b"]
    assert rnd.conditioning == seen["sampled"]
    from align.training import build_config  # the recipe keys every objective takes (TrainConfig)

    recipe = build_config(
        model="m", objective="grpo", prompts_file="p.txt", judges=["oracle"], prompt_rewriter=chat.spec
    )
    assert (recipe.prompt_rewriter, recipe.rewrite_instruction) == (chat.spec, None)
    with pytest.raises(ValueError, match="`prompt_rewriter` is for online objectives .* not offline dpo"):
        rollouts.check_prompt_rewriter(SimpleNamespace(prompt_rewriter=chat.spec, objective="dpo"), online=False)


# ------------------------------------------------------------------------- the prompt A/B


def test_eval_prompt_ab_rewritten_vs_plain_same_model_and_seeds(chat, tmp_path):
    from align.cli import main
    from align.generation import read_samples

    out = tmp_path / "ab"
    base = ["eval", "--model", DEMO, "--prompt", WORLD[0], "--prompt", WORLD[1], "--seeds-per-prompt", "2", *SAMPLE]
    with pytest.raises(SystemExit):  # no --lora and no prompt A/B: a usage error
        main([*base, "--out", str(out), "--judge", "oracle"])
    assert main([*base, "--out", str(out), "--judge", "oracle", "--baseline-prompts", "plain"]) == 2  # no rewriter
    ab = [*base, "--out", str(out), "--prompt-rewriter", chat.spec, "--baseline-prompts", "plain"]
    assert main([*ab, "--judge", "oracle", "--judge", "human"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["title"] == "vidalign eval: rewritten prompts vs plain prompts"
    assert report["prompt_rewriter"] == chat.spec and report["lora"] is None and report["comparisons"] == 4
    assert report["arms"] == {"base": "plain prompts", "aligned": "rewritten prompts"}
    wr = report["winrate"]["oracle"]
    assert (
        wr["n"] == 4 and set(wr["mean_score"]) == {"base", "aligned"} and wr["ci95"][0] <= wr["rate"] <= wr["ci95"][1]
    )
    assert "| oracle |" in (out / "report.md").read_text() and (out / "human").is_dir()
    plain, rewritten = _rows(out / "samples" / "base"), _rows(out / "samples" / "aligned")
    assert [(r["prompt"], r["seed"]) for r in plain] == [(r["prompt"], r["seed"]) for r in rewritten]
    assert "rewritten_prompt" not in plain[0] and rewritten[0]["rewritten_prompt"] == f"{WORLD[0]}, vivid and smooth"
    assert not np.array_equal(read_samples(out / "samples" / "base")[0], read_samples(out / "samples" / "aligned")[0])
    assert len(chat.requests) == 2 and len(read_cache(out / "rewrites.jsonl")) == 2  # 2 prompts, asked once each
