"""Judges: spec parsing, each kind (reward model, CLIP score, HTTP service, oracle), their errors
(at parse time), and the combined z-scored score."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch

from align.judges import (
    ClipJudge,
    HttpJudge,
    JudgeError,
    OracleJudge,
    RewardJudge,
    check_prompts,
    combine_judges,
    combine_scores,
    combined_score,
    load_judges,
    parse_judge,
    zscore,
)

PROMPTS = ["a robot walking on the street in rain", "a cat asleep on a sofa", "fireworks over a harbour"]


def _videos(n: int = 3, seed: int = 0, shape=(6, 24, 40)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, *shape, 3), dtype=np.uint8)


# ------------------------------------------------------------------------------- parsing


@pytest.mark.parametrize("spec", ["nonsense", "reward", "reward:", "clip:", "foo:bar", "http:", ""])
def test_unknown_spec_lists_the_kinds(spec):
    with pytest.raises(ValueError, match=r"unknown judge .*reward:DIR, clip:MODEL\[@PRETRAINED\], http:URL, oracle"):
        parse_judge(spec)


def test_human_is_not_a_scoring_judge():
    with pytest.raises(JudgeError, match="human does not score videos.*eval --judge human"):
        parse_judge("human")


def test_a_spec_given_twice_is_an_error():
    with pytest.raises(JudgeError, match="given twice"):
        load_judges(["oracle", "oracle"])


# ------------------------------------------------------------------------------- reward


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory):
    from reward_models.model import RewardModelConfig, VideoRewardModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("rm") / "best"
    VideoRewardModel(RewardModelConfig(num_frames=2)).save_pretrained(path)
    return path


def test_reward_judge_scores_like_the_reward_model(reward_dir):
    from reward_models.model import VideoRewardModel

    judge = parse_judge(f"reward:{reward_dir}", device="cpu")
    assert isinstance(judge, RewardJudge) and judge.name == f"reward:{reward_dir}"
    v = _videos()
    expected = VideoRewardModel.from_pretrained(reward_dir).score(v, PROMPTS)
    np.testing.assert_allclose(judge.score(v, PROMPTS), expected, rtol=1e-5)


def test_reward_judge_rejects_a_directory_that_is_not_a_reward_model(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("{}")
    with pytest.raises(JudgeError, match=rf"reward:{tmp_path / 'run'}: .* is not a vidalign reward model"):
        parse_judge(f"reward:{tmp_path / 'run'}")
    with pytest.raises(JudgeError, match=rf"{tmp_path / 'nowhere'} is not a directory"):
        parse_judge(f"reward:{tmp_path / 'nowhere'}")


# ---------------------------------------------------------------------------------- clip


@pytest.fixture(scope="module")
def clip_judge():
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="random weights"):
        return parse_judge("clip:vidalign-tiny-clip", device="cpu")


def test_clip_score_is_100_cos_averaged_over_frames(clip_judge):
    import torch.nn.functional as F

    assert isinstance(clip_judge, ClipJudge) and clip_judge.name == "clip:vidalign-tiny-clip"
    v = _videos()
    s = clip_judge.score(v, PROMPTS)
    assert s.shape == (3,) and np.all(np.abs(s) <= 100)
    # by hand for video 0: the mean over its (up to 8) evenly spaced frames of 100 cos
    frames, k = clip_judge._frames(v[:1])
    with torch.no_grad():
        f = F.normalize(clip_judge.model.encode_image(frames), dim=-1)
        t = F.normalize(clip_judge.model.encode_text(clip_judge.tokenizer(PROMPTS[:1])), dim=-1)
    assert k == 6 and s[0] == pytest.approx(float(100 * (f @ t[0]).mean()), rel=1e-4)
    # a score depends on its own video and prompt only
    assert clip_judge.score(v[1:2], PROMPTS[1:2])[0] == pytest.approx(s[1], rel=1e-4)
    assert clip_judge.score(v[:1], PROMPTS[1:2])[0] != pytest.approx(s[0], rel=1e-4)
    # a still video scores like its one frame
    still = np.repeat(v[:1, :1], 6, axis=1)
    assert clip_judge.score(still, PROMPTS[:1])[0] == pytest.approx(clip_judge.score(v[:1, :1], PROMPTS[:1])[0])


def test_clip_judge_loads_local_weights(clip_judge, tmp_path):
    from safetensors.torch import save_file

    f = tmp_path / "clip.safetensors"
    save_file({k: v.contiguous() for k, v in clip_judge.model.state_dict().items()}, str(f))
    judge = parse_judge(f"clip:vidalign-tiny-clip@{f}", device="cpu")
    assert judge.name == f"clip:vidalign-tiny-clip@{f}"
    v = _videos(seed=1)
    np.testing.assert_allclose(judge.score(v, PROMPTS), clip_judge.score(v, PROMPTS), rtol=1e-5)


def test_clip_judge_errors(tmp_path):
    with pytest.raises(JudgeError, match="unknown open_clip model 'no-such-clip'"):
        parse_judge("clip:no-such-clip")
    with pytest.raises(JudgeError, match="weights file .*missing.safetensors does not exist"):
        parse_judge(f"clip:vidalign-tiny-clip@{tmp_path / 'missing.safetensors'}")
    with pytest.raises(JudgeError, match="neither a file nor an open_clip tag of ViT-B-32 .*openai"):
        parse_judge("clip:ViT-B-32@no_such_tag")


# ---------------------------------------------------------------------------------- http


class _Handler(BaseHTTPRequestHandler):
    """/good: score = mean pixel of each decoded video; /slow: answers too late; /garbage: HTML;
    /short: too few scores; /text: a string score; /flaky: 503 on every other request; else 404."""

    calls: list[str] = []
    shapes: list[tuple] = []

    def log_message(self, *a):
        pass

    def do_POST(self):
        from align.data.video import decode_video_bytes

        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).calls.append(self.path)
        videos = [decode_video_bytes(base64.b64decode(v)) for v in body["videos"]]
        type(self).shapes += [v.shape for v in videos]
        answer = {"scores": [float(v.mean()) for v in videos]}
        if self.path not in ("/good", "/slow", "/garbage", "/short", "/text", "/flaky"):
            self.send_response(404)
            self.end_headers()
            return
        if self.path == "/slow":
            time.sleep(1.5)
        if self.path == "/flaky" and len([c for c in type(self).calls if c == "/flaky"]) % 2:
            self.send_response(503)
            self.end_headers()
            return
        data = {
            "/garbage": b"<html>oops</html>",
            "/short": json.dumps({"scores": answer["scores"][:-1]}).encode(),
            "/text": json.dumps({"scores": ["high"] * len(videos)}).encode(),
        }.get(self.path, json.dumps(answer).encode())
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the judge gave up waiting (/slow)
            pass


@pytest.fixture(scope="module")
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def test_http_judge_posts_mp4s_and_reads_scores(server):
    judge = parse_judge(f"http:{server}/good")
    assert isinstance(judge, HttpJudge) and judge.name == f"http:{server}/good"
    assert _Handler.calls[-1] == "/good" and _Handler.shapes[-1] == (8, 64, 64, 3)  # the probe at parse time
    v = np.stack([np.full((5, 16, 24, 3), c, np.uint8) for c in (20, 120, 220)])
    judge.batch_size = 2  # two requests
    n = len(_Handler.calls)
    s = judge.score(v, PROMPTS)
    assert len(_Handler.calls) == n + 2 and _Handler.shapes[-3:] == [(5, 16, 24, 3)] * 3
    np.testing.assert_allclose(s, [20, 120, 220], atol=3)  # mp4 (yuv420p) round trip
    assert parse_judge(f"{server}/good").name == judge.name  # a bare URL is an http judge too


@pytest.mark.parametrize(
    "path, message",
    [
        ("/slow", r"no usable answer from .*/slow after 1 tries \(timed out after 0.3 s\)"),
        ("/garbage", r"/garbage answered with something that is not JSON: '<html>oops</html>'"),
        ("/short", r"/short must answer \{\"scores\": \[1 numbers\]\}"),
        ("/text", r"/text gave a non-number score at position 0"),
        ("/missing", r"no usable answer from .*/missing after 1 tries \(HTTP 404"),
    ],
)
def test_http_judge_errors_name_the_url_at_parse_time(server, monkeypatch, path, message):
    monkeypatch.setenv("VIDALIGN_HTTP_TIMEOUT", "0.3")
    monkeypatch.setenv("VIDALIGN_HTTP_RETRIES", "0")
    with pytest.raises(JudgeError, match=rf"judge http:{server}{path}: .*{message}"):
        parse_judge(f"http:{server}{path}")


def test_http_judge_retries_server_errors(server, monkeypatch):
    monkeypatch.setenv("VIDALIGN_HTTP_RETRIES", "1")
    n = len(_Handler.calls)
    judge = parse_judge(f"http:{server}/flaky")  # 503, then the answer
    assert len(_Handler.calls) == n + 2 and judge.retries == 1
    with pytest.raises(JudgeError, match="not an http:// or https:// URL"):
        parse_judge("http:ftp://example.org")
    monkeypatch.setenv("VIDALIGN_HTTP_TIMEOUT", "soon")
    with pytest.raises(JudgeError, match="VIDALIGN_HTTP_TIMEOUT='soon' is not a number"):
        parse_judge(f"http:{server}/good")


def test_http_judge_unreachable(monkeypatch):
    monkeypatch.setenv("VIDALIGN_HTTP_RETRIES", "0")
    with pytest.raises(JudgeError, match=r"judge http:http://127.0.0.1:9/score: no usable answer from"):
        parse_judge("http:http://127.0.0.1:9/score")


# -------------------------------------------------------------------------------- oracle


def test_oracle_judge_is_the_synthetic_worlds_total():
    from align.demo.synthetic import all_scenes, oracle_scores, sample_videos

    scenes = all_scenes()[:3]
    v = sample_videos(scenes, np.random.default_rng(0))
    prompts = [s.prompt for s in scenes]
    judge = parse_judge("oracle")
    assert isinstance(judge, OracleJudge)
    np.testing.assert_allclose(judge.score(v, prompts), [s["total"] for s in oracle_scores(v, prompts)])
    with pytest.raises(JudgeError, match="oracle knows only the demo's synthetic world"):
        check_prompts([judge], [prompts[0], PROMPTS[0]])


def test_judges_module_does_not_import_the_synthetic_world():
    code = (
        "import sys, align.judges, align.generation, align.eval.evaluate, align.data.pairs, align.cli;"
        "align.judges.parse_judge; assert 'align.demo.synthetic' not in sys.modules, 'imported'"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]


# ------------------------------------------------------------------------------ combined


def test_zscore_and_combined_scores_by_hand():
    a, b = np.array([1.0, 2.0, 3.0]), np.array([10.0, 10.0, 40.0])
    za = np.array([-1, 0, 1]) * np.sqrt(1.5)
    zb = np.array([-1, -1, 2]) / np.sqrt(2)
    np.testing.assert_allclose(zscore(a), za)
    np.testing.assert_allclose(combine_scores([a, b]), (za + zb) / 2)
    np.testing.assert_allclose(combine_scores([a, b], weights=[3, 1]), (3 * za + zb) / 4)
    np.testing.assert_allclose(zscore(np.array([5.0, 5.0])), [0, 0])  # a constant set scores 0
    # within groups: each group on its own
    x = np.array([1.0, 3.0, 100.0, 300.0])
    np.testing.assert_allclose(zscore(x, groups=[0, 0, 1, 1]), [-1, 1, -1, 1])
    with pytest.raises(ValueError, match="non-negative weights"):
        combine_scores([a, b], weights=[1])
    with pytest.raises(ValueError, match="at least one"):
        combine_scores([])


def test_combined_score_of_judges_and_bad_answers():
    class Fixed:
        def __init__(self, name, values):
            self.name, self.values = name, np.asarray(values, dtype=float)

        def score(self, videos, prompts):
            return self.values[: len(prompts)]

    v = _videos(3)
    got = combined_score([Fixed("a", [1, 2, 3]), Fixed("b", [10, 10, 40])], v, PROMPTS)
    np.testing.assert_allclose(got, combine_scores([np.array([1.0, 2, 3]), np.array([10.0, 10, 40])]))
    with pytest.raises(JudgeError, match="judge nan gave 1 non-finite score.*video 1"):
        combined_score([Fixed("nan", [0, np.nan, 1])], v, PROMPTS)
    with pytest.raises(JudgeError, match="judge short returned 2 scores for 3 videos"):
        combined_score([Fixed("short", [0, 1])], v, PROMPTS)


def test_combine_judges_is_the_one_rule():
    """One judge: its raw scores. Several: the weighted mean of exact z-scores, within groups
    when given, else over the whole set; combine_scores / combined_score are the same rule."""
    a, b = np.array([1.0, 3.0, 0.0, 0.0]), np.array([10.0, 0.0, 5.0, 7.0])
    np.testing.assert_array_equal(combine_judges(a[None]), a)  # raw, not z-scored
    np.testing.assert_array_equal(combine_judges([a], weights=[2.0], groups=[0, 0, 1, 1]), a)
    # within groups: judge a -> -1, 1, 0 (constant group), 0; judge b -> 1, -1, -1, 1
    got = combine_judges(np.stack([a, b]), weights=[3.0, 1.0], groups=[0, 0, 1, 1])
    np.testing.assert_allclose(got, [-0.5, 0.5, -0.25, 0.25], rtol=0, atol=1e-15)
    # over the whole set (no groups): the judges' global z-scores, equal weights
    np.testing.assert_allclose(combine_judges(np.stack([a, b])), (zscore(a) + zscore(b)) / 2)
    np.testing.assert_array_equal(combine_scores([a, b], [3.0, 1.0], [0, 0, 1, 1]), got)
    with pytest.raises(ValueError, match="non-negative weights"):
        combine_judges(np.stack([a, b]), weights=[1.0, -1.0])
    with pytest.raises(ValueError, match="at least one"):
        combine_judges(np.zeros((0, 4)))


# ------------------------------------------------------------ http: deadline, size cap, retries


class _HostileHandler(BaseHTTPRequestHandler):
    """A scoring service gone wrong. /trickle-head and /trickle-body: a byte every 0.2 s (the
    status line; the body); /huge: 2 MB of answer without a Content-Length; /declared: a
    Content-Length of 600 MB; /bad400, /busy503, /limited429: those statuses every time."""

    calls: list[str] = []

    def log_message(self, *a):
        pass

    def _trickle(self, data: bytes, seconds: float = 10.0) -> None:
        end = time.monotonic() + seconds
        for b in data:
            if time.monotonic() > end:
                return
            self.wfile.write(bytes([b]))
            time.sleep(0.2)

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        type(self).calls.append(self.path)
        try:
            if self.path == "/trickle-head":
                self._trickle(b"HTTP/1.0 200 OK\r\n" + b"X-Slow: " + b"." * 100)
            elif self.path == "/trickle-body":
                self.send_response(200)
                self.end_headers()
                self._trickle(b'{"scores": [' + b" " * 100)
            elif self.path in ("/huge", "/declared"):
                self.send_response(200)
                if self.path == "/declared":
                    self.send_header("Content-Length", str(600_000_000))
                self.end_headers()
                for _ in range(32):  # 2 MB in 64 KiB chunks, or until the judge stops reading
                    self.wfile.write(b" " * 65536)
            else:
                code = {"/bad400": 400, "/busy503": 503, "/limited429": 429}.get(self.path, 404)
                self.send_response(code)
                self.send_header("Retry-After", "0")
                self.send_header("Content-Length", "0")
                self.end_headers()
        except (BrokenPipeError, ConnectionResetError):  # the judge gave up: as it should
            pass


@pytest.fixture(scope="module")
def hostile():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _HostileHandler)
    srv.daemon_threads, srv.block_on_close = True, False
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def test_http_judge_deadline_cuts_off_a_trickling_service(hostile, monkeypatch):
    """A byte every 0.2 s never trips a per-read timeout; the deadline of the request does."""
    monkeypatch.setenv("VIDALIGN_HTTP_TIMEOUT", "1")
    monkeypatch.setenv("VIDALIGN_HTTP_RETRIES", "2")  # a request past its deadline is not retried
    for path in ("/trickle-body", "/trickle-head"):
        t0 = time.monotonic()
        with pytest.raises(JudgeError) as e:
            parse_judge(f"http:{hostile}{path}")
        elapsed = time.monotonic() - t0
        assert elapsed < 3.0, f"{path}: held for {elapsed:.1f} s with a 1 s deadline"
        assert f"no usable answer from {hostile}{path} after 1 tries (timed out after 1 s)" in str(e.value)
        assert "VIDALIGN_HTTP_TIMEOUT is the deadline of one request" in str(e.value)
    assert HttpJudge(f"{hostile}/x", probe=False).timeout == 1.0
    monkeypatch.delenv("VIDALIGN_HTTP_TIMEOUT")
    assert HttpJudge(f"{hostile}/x", probe=False).timeout == 120.0  # minutes, not a quarter hour


def test_http_judge_refuses_an_oversized_answer_naming_the_cap(hostile, monkeypatch):
    monkeypatch.setenv("VIDALIGN_HTTP_MAX_BYTES", "100000")
    monkeypatch.setenv("VIDALIGN_HTTP_RETRIES", "2")  # an oversized answer is not retried
    n = len(_HostileHandler.calls)
    with pytest.raises(
        JudgeError, match=rf"{hostile}/huge after 1 tries \(the answer is over the cap of 100000 bytes "
    ):
        parse_judge(f"http:{hostile}/huge")
    t0 = time.monotonic()
    with pytest.raises(JudgeError, match=r"over the cap of 100000 bytes \(VIDALIGN_HTTP_MAX_BYTES\): Content-Length 6"):
        parse_judge(f"http:{hostile}/declared")  # refused on its header, before reading
    assert time.monotonic() - t0 < 2.0
    assert _HostileHandler.calls[n:] == ["/huge", "/declared"]
    assert HttpJudge(f"{hostile}/x", probe=False, max_bytes=5).max_bytes == 5
    monkeypatch.setenv("VIDALIGN_HTTP_MAX_BYTES", "0")
    with pytest.raises(JudgeError, match="VIDALIGN_HTTP_MAX_BYTES must be >= 1"):
        HttpJudge(f"{hostile}/x", probe=False)


def test_http_judge_retries_only_transient_failures(hostile, server, monkeypatch):
    """5xx, 429 and a refused connection are retried; a 4xx and a bad answer are not."""
    monkeypatch.setenv("VIDALIGN_HTTP_RETRIES", "1")
    for path, tries, reason in [
        ("/bad400", 1, "HTTP 400"),
        ("/busy503", 2, "HTTP 503"),
        ("/limited429", 2, "HTTP 429"),
    ]:
        n = len(_HostileHandler.calls)
        with pytest.raises(JudgeError, match=rf"{hostile}{path} after {tries} tries \({reason}"):
            parse_judge(f"http:{hostile}{path}")
        assert _HostileHandler.calls[n:] == [path] * tries
    n = len(_Handler.calls)
    with pytest.raises(JudgeError, match="not JSON"):
        parse_judge(f"http:{server}/garbage")
    assert _Handler.calls[n:] == ["/garbage"]  # a bad answer is asked once
    with pytest.raises(JudgeError, match=r"127.0.0.1:9/score after 2 tries \(.*refused"):
        parse_judge("http:http://127.0.0.1:9/score")
