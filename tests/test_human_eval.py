"""Blinded human A/B studies: the task the app serves, labels posted through its HTTP API, the report."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from test_annotate import Client

from align.annotate.pairs import load_pairs
from align.annotate.server import AnnotateApp, make_server, start_in_thread
from align.annotate.stats import cohen_kappa, fleiss_kappa
from align.annotate.storage import LabelStore
from align.cli import main
from align.data.video import write_video
from align.eval.human import KEY_FILE, human_report, load_ab_key, write_ab_task

NAMES = ("base", "aligned")


def model_videos(root: Path, n: int, real: bool = True) -> tuple[list[Path], list[Path]]:
    """``n`` videos per model in folders named after the models (the names must not leak)."""
    rng = np.random.default_rng(1)
    out = {}
    for model in NAMES:
        d = root / f"{model}_model"
        d.mkdir(parents=True)
        out[model] = []
        for i in range(n):
            f = d / f"{model}_{i:03d}.mp4"
            if real:
                write_video(f, rng.integers(0, 256, size=(4, 16, 16, 3), dtype=np.uint8), fps=8)
            else:  # write_ab_task only copies and hashes files: bytes are enough for the layout tests
                f.write_bytes(f"{model} video {i}".encode())
            out[model].append(f)
    return out["base"], out["aligned"]


@pytest.fixture
def ab_served(tmp_path):
    """An A/B task of five prompts served on 127.0.0.1; yields ``start(per_pair) -> (client, app, store, task)``."""
    servers = []

    def start(per_pair: int = 1):
        fa, fb = model_videos(tmp_path / "samples", 5)
        prompts = [f"a red ball rolling left, take {i}" for i in range(5)]
        task = write_ab_task(fa, fb, prompts, list(range(5)), tmp_path / "task", names=NAMES, seed=3)
        src = load_pairs(task, tmp_path / "cache")
        store = LabelStore(tmp_path / "labels.sqlite")
        store.sync_pairs(src.pairs, src.source, src.kind)
        app = AnnotateApp(store, src.roots, per_pair)
        server = make_server(app, "127.0.0.1", 0)
        start_in_thread(server)
        servers.append(server)
        return Client(server.server_address[1]), app, store, task

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


def screen_side(app: AnnotateApp, task: Path, pair: dict, winner: str) -> str:
    """The button (left | right | tie) that votes for model ``winner`` ("tie" for a tie) on ``pair``
    as displayed; uses the private key, as only the test may."""
    if winner == "tie":
        return "tie"
    key = load_ab_key(task)
    stored = app.pairs[pair["id"]]
    row = key["pairs"][int(stored["key"][3:])]
    left = "a" if pair["left"]["url"] == "/media/" + stored["media_a"] else "b"
    return "left" if row[left] == winner else "right"


def test_ab_task_sides_are_random_seeded_and_names_neutral(tmp_path):
    fa, fb = model_videos(tmp_path / "s", 200, real=False)
    prompts = [f"prompt {i}" for i in range(200)]
    task = write_ab_task(fa, fb, prompts, list(range(200)), tmp_path / "task", names=NAMES, seed=0)
    key = load_ab_key(task)
    evaluated_is_a = [p["a"] == "aligned" for p in key["pairs"]]
    assert 70 <= sum(evaluated_is_a) <= 130  # a fair coin: 100 +- 4.3 standard deviations
    assert all({p["a"], p["b"]} == set(NAMES) for p in key["pairs"])
    rows = [json.loads(line) for line in (task / "metadata.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == prompts and [r["seed"] for r in rows] == list(range(200))
    for r, p, i in zip(rows, key["pairs"], range(200)):
        # the file named video_a holds the bytes of the model the key says
        want = (fb if p["a"] == "aligned" else fa)[i].read_bytes()
        assert (task / r["video_a"]).read_bytes() == want
        assert re.fullmatch(r"videos/[0-9a-f]{20}\.mp4", r["video_a"]) and re.fullmatch(
            r"videos/[0-9a-f]{20}\.mp4", r["video_b"]
        )
    # the same inputs and seed give the same task (a database stays bound to it); another seed other sides
    again = write_ab_task(fa, fb, prompts, list(range(200)), tmp_path / "task", names=NAMES, seed=0)
    assert load_ab_key(again) == key
    other = load_ab_key(write_ab_task(fa, fb, prompts, list(range(200)), tmp_path / "t1", names=NAMES, seed=1))
    assert [p["a"] for p in other["pairs"]] != [p["a"] for p in key["pairs"]]


def test_ab_task_bad_input_names_the_pair(tmp_path):
    fa, fb = model_videos(tmp_path / "s", 2, real=False)
    with pytest.raises(ValueError, match="files_b 1"):
        write_ab_task(fa, fb[:1], ["p", "q"], [0, 1], tmp_path / "t")
    with pytest.raises(ValueError, match="A/B pair 1: empty prompt"):
        write_ab_task(fa, fb, ["p", " "], [0, 1], tmp_path / "t")
    with pytest.raises(FileNotFoundError, match="A/B pair 0: no such video file"):
        write_ab_task([tmp_path / "nope.mp4", fa[1]], fb, ["p", "q"], [0, 1], tmp_path / "t")
    gif = fb[1].with_suffix(".gif")
    gif.write_bytes(b"GIF89a")
    with pytest.raises(ValueError, match="A/B pair 1: .* differ in format"):
        write_ab_task(fa, [fb[0], gif], ["p", "q"], [0, 1], tmp_path / "t")
    with pytest.raises(ValueError, match="two different"):
        write_ab_task(fa, fb, ["p", "q"], [0, 1], tmp_path / "t", names=("m", "m"))
    with pytest.raises(FileNotFoundError, match="not an A/B task"):
        load_ab_key(tmp_path / "s")


def test_served_ab_task_hides_the_models_and_its_key(ab_served):
    client, app, store, task = ab_served(per_pair=2)
    seen = []
    for who in ("alice", "bob"):
        while (nxt := client.next(who))["pair"] is not None:
            seen.append(json.dumps(nxt))
            status, data = client.label(who, nxt["pair"]["id"], "left")
            assert status == 200, data
            seen.append(json.dumps(data))
    for path in ("/api/info", "/api/stats"):
        status, data = client.get_json(path)
        assert status == 200
        seen.append(json.dumps(data))
    status, data = client.post("/api/undo", {"annotator": "alice"})
    seen.append(json.dumps(data))
    text = " ".join(seen).lower()
    assert "/media/data/videos/" in text
    for leak in ("aligned", "base", "_model", KEY_FILE):
        assert leak not in text, leak
    for path in (f"/media/data/{KEY_FILE}", "/media/data/metadata.jsonl", f"/{KEY_FILE}", f"/static/{KEY_FILE}"):
        status, _, body = client.request("GET", path)
        assert status == 404 and b"aligned" not in body, path
    assert (task / KEY_FILE).is_file()


def test_human_report_from_votes_posted_through_the_api(ab_served, tmp_path, capsys):
    client, app, store, task = ab_served(per_pair=2)
    # alice: aligned wins 3, one tie, base wins 1 -> 0.7; motion answered on two pairs, both aligned
    alice = ["aligned", "aligned", "aligned", "tie", "base"]
    bob = ["aligned", "aligned", "base", "tie", "base"]
    order, left_wins, decided = [], 0, 0
    for who, wants in (("alice", alice), ("bob", bob)):
        for i, want in enumerate(wants):
            pair = client.next(who)["pair"]
            if who == "alice":
                order.append(pair["id"])
            else:
                assert pair["id"] in order
                want = wants[order.index(pair["id"])]  # bob votes by alice's pair order
            side = screen_side(app, task, pair, want)
            extra = {"aspects": {"motion": screen_side(app, task, pair, "aligned")}} if who == "alice" and i < 2 else {}
            status, data = client.label(who, pair["id"], side, **extra)
            assert status == 200, data
            left_wins += side == "left"
            decided += side != "tie"

    r = human_report(tmp_path / "labels.sqlite", None, seed=0, out_dir=tmp_path / "report")
    # per pair, the majority: aligned, aligned, tie (split), tie, base -> (2 + 0.5 * 2) / 5 = 0.6
    wr = r["winrate"]["human"]
    assert (wr["rate"], wr["n"], wr["wins"], wr["ties"], wr["losses"]) == (pytest.approx(0.6), 5, 2, 2, 1)
    assert wr["ci95"][0] <= 0.6 <= wr["ci95"][1] and wr["votes"] == 10
    assert r["votes"]["rate"] == pytest.approx((5 + 0.5 * 2) / 10)
    assert r["annotators"]["alice"]["evaluated_rate"] == pytest.approx(0.7)
    assert r["annotators"]["bob"]["evaluated_rate"] == pytest.approx(0.5)
    assert r["labels_per_annotator"] == {"alice": 5, "bob": 5}
    motion = r["winrate"]["human: motion"]
    assert (motion["rate"], motion["n"]) == (1.0, 2)
    assert r["position_bias"]["left_rate"] == pytest.approx(left_wins / decided)
    assert r["position_bias"]["decided_votes"] == decided
    # agreement on the categories aligned / base / tie, by hand
    code = {"aligned": "a", "base": "b", "tie": "tie"}
    kappa = cohen_kappa([code[w] for w in alice], [code[w] for w in bob])
    assert kappa == pytest.approx((0.8 - 9 / 25) / (1 - 9 / 25))
    assert r["cohen"][0]["kappa"] == pytest.approx(kappa)
    counts = np.array([[2, 0, 0], [2, 0, 0], [1, 1, 0], [0, 0, 2], [0, 2, 0]])
    assert r["annotator_agreement"]["fleiss_kappa"] == pytest.approx(fleiss_kappa(counts))
    assert r["annotator_agreement"]["fleiss_pairs"] == 5
    for name in ("report.json", "report.md", "winrate_human.png"):
        assert (tmp_path / "report" / name).is_file()
    assert json.loads((tmp_path / "report" / "report.json").read_text())["winrate"]["human"]["rate"] == 0.6

    # the command: the task recorded in the database, the default report folder
    assert main(["eval", "human", "--db", str(tmp_path / "labels.sqlite")]) == 0
    line = capsys.readouterr().out
    assert "human win rate aligned vs base: 0.600" in line and "over 5 pairs" in line
    assert (task / "report" / "report.md").read_text().count("| human | 0.600 |") == 1
    # through the CLI, into another folder; a missing database is a clear error (exit 2)
    assert main(["eval", "human", "--db", str(tmp_path / "labels.sqlite"), "--out", str(tmp_path / "r2")]) == 0
    assert json.loads((tmp_path / "r2" / "report.json").read_text())["winrate"]["human"]["n"] == 5
    assert main(["eval", "human", "--db", str(tmp_path / "nope.sqlite")]) == 2
    assert "nope.sqlite: no such file" in capsys.readouterr().err


def test_one_annotator_three_wins_one_tie_one_loss_is_0_7(ab_served, tmp_path):
    client, app, store, task = ab_served()
    for want in ("aligned", "tie", "aligned", "base", "aligned"):
        pair = client.next("carol")["pair"]
        assert client.label("carol", pair["id"], screen_side(app, task, pair, want))[0] == 200
    r = human_report(tmp_path / "labels.sqlite", task)
    wr = r["winrate"]["human"]
    assert (wr["rate"], wr["wins"], wr["ties"], wr["losses"]) == (pytest.approx(0.7), 3, 1, 1)
    assert r["annotator_agreement"]["fleiss_pairs"] == 0 and r["cohen"] == []


def test_human_report_errors_are_clear(ab_served, tmp_path):
    client, app, store, task = ab_served()
    with pytest.raises(ValueError, match="no labels yet"):
        human_report(tmp_path / "labels.sqlite", None)
    with pytest.raises(FileNotFoundError, match="no such file"):
        human_report(tmp_path / "missing.sqlite", task)
    with pytest.raises(FileNotFoundError, match="not an A/B task"):
        human_report(tmp_path / "labels.sqlite", tmp_path / "samples")
    other = write_ab_task(*model_videos(tmp_path / "other", 5), [f"q{i}" for i in range(5)], [0] * 5, tmp_path / "o")
    pair = client.next("u")["pair"]
    client.label("u", pair["id"], "left")
    with pytest.raises(ValueError, match="is not a pair of the A/B task"):
        human_report(tmp_path / "labels.sqlite", other)
