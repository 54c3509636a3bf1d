"""The annotation app: pairs, storage, agreement statistics, export, and the HTTP API.

The HTTP tests drive the same JSON API the page's script uses (``/api/next``, ``/api/label``,
``/api/undo``); ``test_annotate_browser.py`` drives the page itself in headless Chromium.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import datasets
import numpy as np
import pytest
from conftest import make_preference_rows, save_rows

from align.annotate.export import export_dataset
from align.annotate.pairs import load_pairs
from align.annotate.server import (
    AnnotateApp,
    host_warning,
    invite_link,
    make_server,
    parse_range,
    start_in_thread,
)
from align.annotate.stats import agreement_stats, cohen_kappa, fleiss_kappa
from align.annotate.storage import DuplicateLabelError, LabelStore, UnknownPairError
from align.cli import main
from align.data.pairs import to_pairs
from align.data.preference import PreferenceDataError, load_preference_dataset
from align.data.video import read_video, write_video

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------
# helpers


def make_generate_dir(path: Path, prompts: dict[str, int], fmt: str = "mp4", seed: int = 0) -> Path:
    """A directory laid out like ``vidalign generate`` output: videos plus ``index.jsonl``."""
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True, exist_ok=True)
    rows, i = [], 0
    for prompt, n in prompts.items():
        for _ in range(n):
            frames = rng.integers(0, 256, size=(4, 16, 16, 3), dtype=np.uint8)
            f = write_video(path / f"{i:04d}_seed{i}.{fmt}", frames, fps=8)
            rows.append({"file": f.name, "prompt": prompt, "seed": i})
            i += 1
    (path / "index.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


class Client:
    """A tiny HTTP client for one server: each call a fresh connection, raw paths untouched."""

    def __init__(self, port: int):
        self.port = port

    def request(self, method: str, path: str, body=None, headers: dict | None = None):
        con = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        h = dict(headers or {})
        if body is not None and not isinstance(body, (bytes, str)):
            body = json.dumps(body)
            h.setdefault("Content-Type", "application/json")
        con.request(method, path, body=body, headers=h)
        res = con.getresponse()
        data = res.read()
        con.close()
        return res.status, {k.lower(): v for k, v in res.getheaders()}, data

    def get_json(self, path: str):
        status, _, data = self.request("GET", path)
        return status, json.loads(data)

    def post(self, path: str, body, headers: dict | None = None):
        status, _, data = self.request("POST", path, body, headers)
        return status, json.loads(data) if data else None

    def next(self, annotator: str) -> dict:
        status, data = self.get_json(f"/api/next?annotator={annotator}")
        assert status == 200, data
        return data

    def label(self, annotator: str, pair_id: int, choice: str, **extra):
        return self.post("/api/label", {"annotator": annotator, "pair_id": pair_id, "choice": choice, **extra})


@pytest.fixture
def gen_dir(tmp_path):
    """Three prompts with 3, 2 and 1 videos: 3 + 1 + 0 = 4 pairs (MP4: served as they are)."""
    return make_generate_dir(tmp_path / "gen", {"p one": 3, "p two": 2, "p three": 1})


@pytest.fixture
def served(tmp_path, gen_dir):
    """A running server (in a thread) over ``gen_dir``; yields ``(client, app, store)``."""
    servers = []

    def start(per_pair: int = 1, pairs_dir: Path = gen_dir):
        src = load_pairs(pairs_dir, tmp_path / "cache")
        store = LabelStore(tmp_path / "labels.sqlite")
        store.sync_pairs(src.pairs, src.source, src.kind)
        app = AnnotateApp(store, src.roots, per_pair)
        server = make_server(app, "127.0.0.1", 0)
        start_in_thread(server)
        servers.append(server)
        return Client(server.server_address[1]), app, store

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


# --------------------------------------------------------------------------------------------
# statistics


def test_cohen_kappa_hand_computed():
    # 50 items: both 'a' 20, x=a/y=b 5, x=b/y=a 10, both 'b' 15 -> p_o = 0.7, p_e = 0.5, kappa = 0.4
    x = ["a"] * 20 + ["a"] * 5 + ["b"] * 10 + ["b"] * 15
    y = ["a"] * 20 + ["b"] * 5 + ["a"] * 10 + ["b"] * 15
    assert cohen_kappa(x, y) == pytest.approx(0.4)
    assert cohen_kappa(["a", "b", "tie"], ["a", "b", "tie"]) == pytest.approx(1.0)
    assert cohen_kappa(["a", "b"], ["b", "a"]) == pytest.approx(-1.0)
    assert math.isnan(cohen_kappa(["a", "a"], ["a", "a"]))  # chance agreement is 1: undefined
    with pytest.raises(ValueError, match="one each per item"):
        cohen_kappa(["a"], ["a", "b"])


def test_fleiss_kappa_matches_the_published_example():
    # Fleiss (1971) as worked on Wikipedia: 10 subjects, 14 raters, 5 categories -> 0.210
    counts = np.array(
        [
            [0, 0, 0, 0, 14],
            [0, 2, 6, 4, 2],
            [0, 0, 3, 5, 6],
            [0, 3, 9, 2, 0],
            [2, 2, 8, 1, 1],
            [7, 7, 0, 0, 0],
            [3, 2, 6, 3, 0],
            [2, 5, 3, 2, 2],
            [6, 5, 2, 1, 0],
            [0, 2, 2, 3, 7],
        ]
    )
    assert fleiss_kappa(counts) == pytest.approx(0.20993, abs=1e-4)
    # items with fewer than two ratings carry no agreement and are dropped
    assert fleiss_kappa(np.vstack([counts, [[1, 0, 0, 0, 0]]])) == pytest.approx(fleiss_kappa(counts))
    # two raters, varying agreement: P_i = 1, 0, 1; p = (3/6, 2/6, 1/6); P_e = 14/36
    k = fleiss_kappa(np.array([[2, 0, 0], [1, 1, 0], [0, 0, 2]]))
    assert k == pytest.approx((2 / 3 - 14 / 36) / (1 - 14 / 36))
    assert math.isnan(fleiss_kappa(np.zeros((0, 3))))


def test_agreement_stats_tie_rate_left_rate_and_kappas():
    def lab(pair, who, choice, left="a"):
        return {"pair_id": pair, "annotator": who, "choice": choice, "shown_left": left, "motion": None}

    labels = [
        lab(1, "u", "a"),
        lab(1, "v", "a"),
        lab(2, "u", "b", left="b"),
        lab(2, "v", "tie"),
        lab(3, "u", "tie"),
    ]
    s = agreement_stats(labels, pairs_total=4, per_pair=2, skips=1)
    assert s["labels"] == 5 and s["skips"] == 1
    assert s["tie_rate"] == pytest.approx(2 / 5)
    assert s["left_rate"] == pytest.approx(1.0)  # the three decided labels all chose the video shown left
    assert s["annotators"]["u"]["tie_rate"] == pytest.approx(1 / 3)
    assert s["pairs_labelled"] == 3 and s["pairs_complete"] == 2
    assert s["fleiss"]["pairs"] == 2
    assert s["fleiss"]["kappa"] == pytest.approx(fleiss_kappa(np.array([[2, 0, 0], [0, 1, 1]])))
    (c,) = s["cohen"]["pairs"]
    assert c["annotators"] == ["u", "v"] and c["pairs"] == 2
    assert c["kappa"] == pytest.approx(cohen_kappa(["a", "b"], ["a", "tie"]))


# --------------------------------------------------------------------------------------------
# pairs


def test_pairs_from_generate_output_pair_videos_of_the_same_prompt(gen_dir, tmp_path):
    src = load_pairs(gen_dir, tmp_path / "cache")
    assert src.kind == "generate"
    assert [p.key for p in src.pairs] == [
        "0000_seed0.mp4|0001_seed1.mp4",
        "0000_seed0.mp4|0002_seed2.mp4",
        "0001_seed1.mp4|0002_seed2.mp4",
        "0003_seed3.mp4|0004_seed4.mp4",
    ]
    assert [p.prompt for p in src.pairs] == ["p one"] * 3 + ["p two"]
    assert src.pairs[0].media_a == "data/0000_seed0.mp4"  # MP4 is served as it is
    assert src.pairs[0].video_a == str(gen_dir.resolve() / "0000_seed0.mp4")


def test_generate_gifs_are_converted_once_into_the_cache(tmp_path):
    gen = make_generate_dir(tmp_path / "gen", {"p": 2}, fmt="gif")
    src = load_pairs(gen, tmp_path / "cache")
    (pair,) = src.pairs
    assert pair.media_a.startswith("cache/") and pair.media_a.endswith(".webm")
    cached = tmp_path / "cache" / pair.media_a.split("/", 1)[1]
    assert read_video(cached).shape[0] == 4  # every frame of the GIF
    mtime = cached.stat().st_mtime_ns
    assert load_pairs(gen, tmp_path / "cache").pairs == src.pairs
    assert cached.stat().st_mtime_ns == mtime  # written once


def test_generate_index_problems_name_the_line(tmp_path):
    gen = make_generate_dir(tmp_path / "gen", {"p": 2})
    lines = (gen / "index.jsonl").read_text()
    (gen / "index.jsonl").write_text(lines + "not json\n" + json.dumps({"file": "nope.mp4", "prompt": "p"}) + "\n")
    with pytest.raises(ValueError) as e:
        load_pairs(gen, tmp_path / "cache")
    assert "line 3: not JSON" in str(e.value) and "line 4: nope.mp4: no such video file" in str(e.value)
    single = make_generate_dir(tmp_path / "single", {"p": 1, "q": 1})
    with pytest.raises(ValueError, match="no prompt has two videos"):
        load_pairs(single, tmp_path / "cache")


def test_dataset_arrays_are_written_once_to_the_cache(tmp_path):
    ds = save_rows(make_preference_rows(3), tmp_path / "prefs")
    src = load_pairs(ds, tmp_path / "db.videos")
    assert src.kind == "dataset" and len(src.pairs) == 3
    assert all(p.media_a.startswith("cache/") and p.source_row == i for i, p in enumerate(src.pairs))
    files = sorted((tmp_path / "db.videos").glob("*.webm"))
    assert len(files) == 6
    stamps = [f.stat().st_mtime_ns for f in files]
    load_pairs(ds, tmp_path / "db.videos")
    assert [f.stat().st_mtime_ns for f in sorted((tmp_path / "db.videos").glob("*.webm"))] == stamps


def test_pairs_from_a_jsonl_table_resolve_against_its_folder(tmp_path, gen_dir):
    rows = [{"prompt": "p", "video_a": "0000_seed0.mp4", "video_b": "0001_seed1.mp4", "preference": "a"}]
    (gen_dir / "pairs.jsonl").write_text(json.dumps(rows[0]) + "\n")
    src = load_pairs(gen_dir / "pairs.jsonl", tmp_path / "cache")
    assert [(p.media_a, p.media_b) for p in src.pairs] == [("data/0000_seed0.mp4", "data/0001_seed1.mp4")]
    assert src.roots["data"] == gen_dir.resolve()


def test_dataset_rows_pointing_outside_the_root_are_refused(tmp_path):
    import datasets

    root = tmp_path / "prefs"
    root.mkdir()
    outside = write_video(tmp_path / "secret.mp4", np.zeros((2, 8, 8, 3), np.uint8))
    good = write_video(root / "good.mp4", np.full((2, 8, 8, 3), 9, np.uint8))
    (root / "link.mp4").symlink_to(outside)
    rows = {
        "prompt": ["x"] * 4,
        "video_a": ["../good.mp4", "../../secret.mp4", str(outside), "../link.mp4"],  # relative to root/ds
        "video_b": [str(good)] * 4,
        "preference": ["a"] * 4,
    }
    datasets.Dataset.from_dict(rows).save_to_disk(str(root / "ds"))
    with pytest.raises(PreferenceDataError) as e:
        load_pairs(root / "ds", tmp_path / "cache", root=root)
    assert [r for r, _ in e.value.problems] == [1, 2, 3]
    assert all("outside the root" in m for _, m in e.value.problems)
    # without --root the dataset's own directory is the root: even ../good.mp4 beside it is refused
    with pytest.raises(PreferenceDataError) as e:
        load_pairs(root / "ds", tmp_path / "cache")
    assert [r for r, _ in e.value.problems] == [0, 0, 1, 1, 2, 2, 3, 3]  # video_b is outside too


# --------------------------------------------------------------------------------------------
# storage


def test_store_wal_duplicates_undo_and_pair_binding(tmp_path, gen_dir):
    src = load_pairs(gen_dir, tmp_path / "cache")
    store = LabelStore(tmp_path / "l.sqlite")
    store.sync_pairs(src.pairs, src.source, src.kind)
    store.sync_pairs(src.pairs, src.source, src.kind)  # the same pairs again: fine
    con = __import__("sqlite3").connect(tmp_path / "l.sqlite")
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    con.close()

    first = store.add_label("u", 1, "a", "b", {"motion": "b"}, "nice")
    with pytest.raises(DuplicateLabelError):
        store.add_label("u", 1, "b", "a")
    with pytest.raises(UnknownPairError):
        store.add_label("u", 99, "a", "a")
    with pytest.raises(ValueError, match="choice"):
        store.add_label("u", 2, "left", "a")
    with pytest.raises(ValueError, match="aspect"):
        store.add_label("u", 2, "a", "a", {"colour": "a"})
    assert [(r["id"], r["choice"], r["shown_left"], r["motion"]) for r in store.labels()] == [(first, "a", "b", "b")]

    undone = store.undo_last("u")
    assert undone["id"] == first and store.labels() == []
    assert store.undo_last("u") is None
    pair, _ = store.next_pair("u", per_pair=1)
    assert pair["id"] == 1  # the undone pair comes back first
    store.add_label("u", 1, "tie", "a")  # and can be labelled again
    assert len(store.labels(include_undone=True)) == 2

    other = [p for p in src.pairs[::-1]]
    with pytest.raises(ValueError, match="differ at pair 1"):
        store.sync_pairs(other, "elsewhere", "generate")
    with pytest.raises(FileNotFoundError):
        LabelStore(tmp_path / "missing.sqlite", create=False)
    (tmp_path / "junk.sqlite").write_bytes(b"not a database" * 100)
    with pytest.raises(ValueError, match="not a usable SQLite database"):
        LabelStore(tmp_path / "junk.sqlite")


def test_assignment_quota_leases_skips_and_left_side(tmp_path, gen_dir):
    src = load_pairs(gen_dir, tmp_path / "cache")
    store = LabelStore(tmp_path / "l.sqlite")
    store.sync_pairs(src.pairs, src.source, src.kind)
    # two annotators at once are handed different pairs (leases)
    pu, _ = store.next_pair("u", per_pair=1)
    pv, _ = store.next_pair("v", per_pair=1)
    assert pu["id"] != pv["id"]
    assert store.next_pair("u", per_pair=1)[0]["id"] == pu["id"]  # a reload shows the same pair
    store.add_label("u", pu["id"], "skip", "a")  # a skip is no label: the pair stays open for others
    _, prog = store.next_pair("u", per_pair=1)
    assert prog["skipped"] == 1 and prog["labelled"] == 0
    assert store.progress("w", per_pair=1)["remaining"] == 4
    # per_pair = 2: every pair is handed to two annotators, then to nobody
    seen = {}
    for who in ("a1", "a2", "a3"):
        while (p := store.next_pair(who, per_pair=2)[0]) is not None:
            store.add_label(who, p["id"], "a", "a")
            seen.setdefault(p["id"], []).append(who)
    assert all(len(w) == 2 for w in seen.values()) and len(seen) == 4
    # the left side is a fair coin per (annotator, pair), stable across store instances
    sides = [store.left_video(f"ann{i}", 1) for i in range(400)]
    assert 150 < sides.count("a") < 250
    assert [LabelStore(tmp_path / "l.sqlite").left_video(f"ann{i}", 1) for i in range(400)] == sides


# --------------------------------------------------------------------------------------------
# export


def _label_all(store: LabelStore, votes: dict[int, list[str]]) -> None:
    for pid, choices in votes.items():
        for k, c in enumerate(choices):
            store.add_label(f"ann{k}", pid, c, "a", {"visual_quality": c if c != "skip" else None})


def test_export_majority_and_all_modes_are_usable_preference_datasets(tmp_path, gen_dir):
    src = load_pairs(gen_dir, tmp_path / "cache")
    store = LabelStore(tmp_path / "l.sqlite")
    store.sync_pairs(src.pairs, src.source, src.kind)
    _label_all(store, {1: ["a", "a", "b"], 2: ["a", "b"], 3: ["b", "skip"], 4: ["tie", "b", "b"]})
    store.add_label("late", 3, "a", "a")
    store.undo_last("late")  # undone: not exported

    out = tmp_path / "maj"
    s = export_dataset(tmp_path / "l.sqlite", out)
    assert s["rows"] == 4 and (s["a"], s["b"], s["tie"]) == (1, 2, 1)
    ds = load_preference_dataset(out)
    assert ds.column_names[:4] == ["prompt", "video_a", "video_b", "preference"]
    assert ds["preference"] == ["a", "tie", "b", "b"]  # 2-1, 1-1 split, 1 (skip ignored), 2-1
    assert ds["votes_a"] == [2, 1, 0, 0] and ds["n_labels"] == [3, 2, 1, 3]
    assert ds["preference_visual_quality"] == ["a", "tie", "b", "b"]
    assert all(not Path(v).is_absolute() and (out / v).is_file() for v in ds["video_a"])
    pairs = to_pairs(ds, source=str(out), root=out)  # ready for DPO: ties skipped and counted
    assert len(pairs.prompts) == 3 and pairs.skipped["tie"] == 1
    src_a = read_video(gen_dir / "0000_seed0.mp4")
    assert np.array_equal(read_video(out / ds["video_a"][0]), src_a)

    s2 = export_dataset(tmp_path / "l.sqlite", tmp_path / "min2", min_labels=2)
    assert s2["rows"] == 3
    s3 = export_dataset(tmp_path / "l.sqlite", tmp_path / "all", mode="all")
    every = load_preference_dataset(tmp_path / "all")
    assert s3["rows"] == 9 and len(every) == 9
    assert sorted(zip(every["pair_id"], every["annotator"])) == sorted(
        [(1, "ann0"), (1, "ann1"), (1, "ann2"), (2, "ann0"), (2, "ann1"), (3, "ann0")]
        + [(4, "ann0"), (4, "ann1"), (4, "ann2")]
    )
    assert all((tmp_path / "all" / v).is_file() for v in every["video_a"])
    export_dataset(tmp_path / "l.sqlite", tmp_path / "linked", videos="symlink")
    linked = load_preference_dataset(tmp_path / "linked")
    assert (tmp_path / "linked" / linked["video_b"][0]).is_symlink()
    with pytest.raises(PreferenceDataError, match="symlink out of the dataset root"):  # links leave OUT (issue 39)
        to_pairs(linked, root=tmp_path / "linked")
    assert to_pairs(linked, root=tmp_path / "linked", allow_absolute_paths=True).prompts == pairs.prompts
    export_dataset(tmp_path / "l.sqlite", tmp_path / "hard", videos="hardlink")  # no copy, inside OUT
    hard = load_preference_dataset(tmp_path / "hard")
    first = tmp_path / "hard" / hard["video_b"][0]
    assert not first.is_symlink() and first.stat().st_nlink == 2
    assert to_pairs(hard, root=tmp_path / "hard").prompts == pairs.prompts

    with pytest.raises(ValueError, match="already exists"):
        export_dataset(tmp_path / "l.sqlite", out)
    with pytest.raises(ValueError, match="mode"):
        export_dataset(tmp_path / "l.sqlite", tmp_path / "x", mode="best")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left behind


def test_export_of_array_pairs_carries_the_source_arrays(tmp_path):
    rows = make_preference_rows(3)
    ds_dir = save_rows(rows, tmp_path / "prefs")
    src = load_pairs(ds_dir, tmp_path / "l.videos")
    store = LabelStore(tmp_path / "l.sqlite")
    store.sync_pairs(src.pairs, src.source, src.kind)
    with pytest.raises(ValueError, match="no labels"):
        export_dataset(tmp_path / "l.sqlite", tmp_path / "empty")
    store.add_label("u", 2, "b", "a")
    store.add_label("u", 3, "a", "b")
    export_dataset(tmp_path / "l.sqlite", tmp_path / "out")
    ds = load_preference_dataset(tmp_path / "out").with_format("numpy")
    assert list(ds["preference"]) == ["b", "a"]
    assert np.array_equal(ds["video_a"][0], rows["video_a"][1])
    assert np.array_equal(ds["video_b"][1], rows["video_b"][2])


# --------------------------------------------------------------------------------------------
# HTTP


def test_page_has_buttons_and_keyboard_shortcuts(served):
    client, _, _ = served()
    status, headers, html = client.request("GET", "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    page = html.decode()
    for element in ('id="choose-left"', 'id="choose-right"', 'id="choose-tie"', 'id="choose-skip"', 'id="undo"'):
        assert element in page
    for element in ('id="video-left"', 'id="video-right"', 'id="comment"', 'id="aspects"', 'id="progress"'):
        assert element in page
    status, headers, js = client.request("GET", "/static/app.js")
    assert status == 200 and headers["content-type"].startswith("text/javascript")
    script = js.decode()
    for needle in ('addEventListener("keydown"', "arrowleft", "arrowright", 's: "skip"', 'key === "u"'):
        assert needle in script
    for endpoint in ("/api/next?annotator=", '"/api/label"', '"/api/undo"'):
        assert endpoint in script
    assert client.request("GET", "/static/style.css")[0] == 200
    assert client.request("GET", "/static/../server.py")[0] == 404


def test_media_mime_types_and_ranges(served, gen_dir):
    client, app, _ = served()
    pair = client.next("u")["pair"]
    url = pair["left"]["url"]
    data = (gen_dir / url.rsplit("/", 1)[1]).read_bytes()
    status, h, body = client.request("GET", url)
    assert (status, h["content-type"], h["accept-ranges"], body) == (200, "video/mp4", "bytes", data)
    status, h, body = client.request("GET", url, headers={"Range": "bytes=10-109"})
    assert status == 206 and body == data[10:110] and h["content-range"] == f"bytes 10-109/{len(data)}"
    status, h, body = client.request("GET", url, headers={"Range": "bytes=-50"})
    assert status == 206 and body == data[-50:]
    status, h, body = client.request("GET", url, headers={"Range": "bytes=100-"})
    assert status == 206 and body == data[100:]
    status, h, body = client.request("GET", url, headers={"Range": f"bytes={len(data)}-"})
    assert status == 416 and h["content-range"] == f"bytes */{len(data)}"
    status, h, body = client.request("HEAD", url)
    assert status == 200 and h["content-length"] == str(len(data)) and body == b""
    assert parse_range("bytes=5-2", 100) is None and parse_range("bytes=0-1,4-5", 100) is None
    assert parse_range("bytes=90-200", 100) == (90, 99)


def test_cached_videos_are_served_as_webm(served, tmp_path):
    gen = make_generate_dir(tmp_path / "gifs", {"p": 2}, fmt="gif")
    client, _, _ = served(pairs_dir=gen)
    pair = client.next("u")["pair"]
    assert pair["left"]["url"].startswith("/media/cache/") and pair["left"]["type"] == "video/webm"
    status, h, body = client.request("GET", pair["left"]["url"])
    assert status == 200 and h["content-type"] == "video/webm" and body[:4] == b"\x1a\x45\xdf\xa3"  # EBML


def test_traversal_attempts_are_refused(served, gen_dir, tmp_path):
    secret = tmp_path / "secret.mp4"
    secret.write_bytes(b"TOP-SECRET" * 10)
    (gen_dir / "link.mp4").symlink_to(secret)  # a symlink out of the root
    (gen_dir / "sub").mkdir()
    client, _, _ = served()
    attempts = [
        "/media/data/../secret.mp4",
        "/media/data/%2e%2e/secret.mp4",
        "/media/data/%2E%2E%2Fsecret.mp4",
        "/media/data/sub/../../secret.mp4",
        "/media/data/./0000_seed0.mp4",
        "/media/data/link.mp4",
        "/media/data/" + str(secret),
        "/media/data//" + str(secret).lstrip("/"),
        "/media/data/%2F" + str(secret).lstrip("/").replace("/", "%2F"),
        "/media/cache/../../secret.mp4",
        "/media/" + str(secret),
        "/media/data/..%5Csecret.mp4",
        "/media/data/index.jsonl",  # inside the root, but not a video of a pair
        "/media/nowhere/0000_seed0.mp4",
    ]
    for path in attempts:
        status, _, body = client.request("GET", path)
        assert 400 <= status < 500, (path, status)
        assert b"TOP-SECRET" not in body, path
    assert client.request("GET", "/media/data/link.mp4")[0] == 403
    assert client.request("GET", "/media/data/../secret.mp4")[0] == 403
    assert client.request("GET", "/media/data/0000_seed0.mp4")[0] == 200  # the real one still works


def test_malformed_requests_get_4xx_and_write_nothing(served):
    client, app, store = served()
    pid = client.next("u")["pair"]["id"]
    ok = {"annotator": "u", "pair_id": pid, "choice": "left"}
    cases = [
        ({**ok, "pair_id": 9999}, 404),
        ({**ok, "pair_id": "1"}, 400),
        ({**ok, "pair_id": True}, 400),
        ({**ok, "choice": "a"}, 400),
        ({**ok, "choice": None}, 400),
        ({k: v for k, v in ok.items() if k != "choice"}, 400),
        ({**ok, "annotator": ""}, 400),
        ({**ok, "annotator": "x" * 65}, 400),
        ({**ok, "annotator": "tab\there"}, 400),
        ({k: v for k, v in ok.items() if k != "annotator"}, 400),
        ({**ok, "aspects": {"colour": "left"}}, 400),
        ({**ok, "aspects": {"motion": "a"}}, 400),
        ({**ok, "aspects": ["motion"]}, 400),
        ({**ok, "comment": 5}, 400),
        ({**ok, "comment": "x" * 2001}, 400),
        ({**ok, "extra": 1}, 400),
        ([ok], 400),
        ("{not json", 400),
        (b"\xff\xfe", 400),
    ]
    for body, expected in cases:
        headers = {"Content-Type": "application/json"}
        status, _, data = client.request("POST", "/api/label", body, headers)
        assert status == expected, (body, status, data)
        assert json.loads(data)["ok"] is False
    assert client.request("POST", "/api/label", json.dumps(ok), {"Content-Type": "text/plain"})[0] == 415
    assert client.request("POST", "/api/label", b"x" * 70_000, {"Content-Type": "application/json"})[0] == 413
    assert client.post("/api/label", ok, {"Origin": "http://evil.example"})[0] == 403
    assert client.post("/api/label", ok, {"Host": "evil.example:80"})[0] == 403
    assert client.post("/api/nothing", ok)[0] == 404
    assert client.post("/api/undo", {"annotator": "u"})[0] == 409  # nothing to undo
    assert client.get_json("/api/next")[0] == 400  # no annotator
    assert store.labels(include_skips=True, include_undone=True) == []
    assert client.label("u", pid, "left")[0] == 200  # the well-formed request still works
    assert client.label("u", pid, "right")[0] == 409  # a second label of the same pair
    assert len(store.labels(include_undone=True)) == 1


def test_label_maps_sides_records_order_and_undo_shows_the_pair_again(served):
    client, app, store = served(per_pair=1)
    shown = client.next("u")["pair"]
    status, data = client.label(
        "u", shown["id"], "left", aspects={"motion": "right", "text_alignment": None}, comment=" smooth "
    )
    assert status == 200 and data["progress"]["done"] == 1
    (row,) = store.labels()
    pair = app.pairs[shown["id"]]
    left = "a" if shown["left"]["url"] == "/media/" + pair["media_a"] else "b"
    assert (row["choice"], row["shown_left"], row["motion"]) == (left, left, "b" if left == "a" else "a")
    assert row["text_alignment"] is None and row["comment"] == "smooth"
    status, data = client.post("/api/undo", {"annotator": "u"})
    assert status == 200 and data["pair"] == shown and data["progress"]["done"] == 0
    assert client.next("u")["pair"] == shown
    assert store.labels() == [] and len(store.labels(include_undone=True)) == 1
    status, stats = client.get_json("/api/stats")
    assert status == 200 and stats["labels"] == 0 and stats["fleiss"]["kappa"] is None


def test_concurrent_annotators_lose_and_duplicate_nothing(served, tmp_path):
    gen = make_generate_dir(tmp_path / "many", {f"prompt {i}": 3 for i in range(5)})  # 15 pairs
    client, app, store = served(per_pair=3, pairs_dir=gen)
    acked, errors = [], []
    lock = threading.Lock()

    def annotate(name: str) -> None:
        try:
            while (pair := client.next(name)["pair"]) is not None:
                status, data = client.label(name, pair["id"], ["left", "right", "tie"][pair["id"] % 3])
                if status == 409 and data.get("reason") == "pair_complete":
                    continue  # others filled the pair first (as the page does: on to the next one)
                if status != 200:
                    errors.append((name, status, data))
                    return
                with lock:
                    acked.append((data["label_id"], pair["id"], name))
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append((name, repr(e)))

    threads = [threading.Thread(target=annotate, args=(f"ann{i}",)) for i in range(6)]
    # and one annotator whose double click sends the same label twice at once
    pid = client.next("clicky")["pair"]["id"]
    results = []
    doubles = [threading.Thread(target=lambda: results.append(client.label("clicky", pid, "tie")[0])) for _ in range(4)]
    for t in threads + doubles:
        t.start()
    for t in threads + doubles:
        t.join(60)
    assert not errors
    assert sorted(results) == [200, 409, 409, 409]
    rows = store.labels()
    stored = {(r["id"], r["pair_id"], r["annotator"]) for r in rows if r["annotator"] != "clicky"}
    assert stored == set(acked)  # every acknowledged label is there, and nothing else
    keys = [(r["pair_id"], r["annotator"]) for r in rows]
    assert len(keys) == len(set(keys))  # no duplicates
    per_pair = {p: sum(1 for q, _ in keys if q == p) for p in app.pairs}
    assert set(per_pair.values()) == {3}  # every pair got its three labels, and none a fourth


def start_server_process(
    pairs_dir: Path, db: Path, port: int = 0, startup_s: float = 60, extra_args: tuple = (), **popen_kwargs
) -> tuple[subprocess.Popen, Client]:
    """``vidalign annotate serve`` in a subprocess on ``port`` (0: a free one), once it says it
    is serving (``extra_args``: more options, e.g. access control)."""
    cmd = ["annotate", "serve", str(pairs_dir), "--db", str(db), "--port", str(port), *extra_args]
    proc = subprocess.Popen(
        [sys.executable, "-m", "align.cli", *cmd],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        **popen_kwargs,
    )
    deadline = time.time() + startup_s
    while time.time() < deadline:
        line = proc.stdout.readline()
        if re.match(r"serving on http://[0-9.]+:\d+/", line):
            return proc, Client(int(line.split(":")[2].split("/")[0]))
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError(f"server did not start: {proc.stderr.read()}")


def test_killed_server_keeps_acknowledged_labels_and_cli_exports_them(tmp_path, gen_dir, capsys):
    """The browser test's flow at the HTTP level: label, undo one, kill -9, restart, export."""
    db = tmp_path / "labels.sqlite"
    proc, client = start_server_process(gen_dir, db)
    try:
        expected = {}
        for choice in ("left", "right", "tie"):
            pair = client.next("alice")["pair"]
            status, data = client.label("alice", pair["id"], choice)
            assert status == 200
            expected[pair["id"]] = (choice, pair)
        status, data = client.post("/api/undo", {"annotator": "alice"})
        assert status == 200
        expected.pop(data["undone"]["pair_id"])
        os.kill(proc.pid, signal.SIGKILL)  # no clean shutdown
        proc.wait(60)  # generous: a loaded CI machine is slow to tear a Python process down
    finally:
        proc.kill()
    proc, client = start_server_process(gen_dir, db)
    try:
        nxt = client.next("alice")
        assert nxt["progress"]["labelled"] == 2
        assert nxt["pair"]["id"] == data["undone"]["pair_id"]  # the undone pair comes back first
        status, _ = client.label("alice", nxt["pair"]["id"], "right")
        expected[nxt["pair"]["id"]] = ("right", nxt["pair"])
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)  # generous: a loaded CI machine is slow to tear a Python process down

    assert main(["annotate", "stats", "--db", str(db)]) == 0
    assert "labels: 3" in capsys.readouterr().out
    assert main(["annotate", "stats", "--db", str(db), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["labels"] == 3
    assert main(["annotate", "export", "--db", str(db), str(tmp_path / "out"), "--mode", "all"]) == 0
    ds = load_preference_dataset(tmp_path / "out")
    store = LabelStore(db, create=False)
    pairs = {p["id"]: p for p in store.pairs()}
    got = dict(zip(ds["pair_id"], ds["preference"]))
    want = {}
    for pid, (choice, shown) in expected.items():
        left = "a" if shown["left"]["url"] == "/media/" + pairs[pid]["media_a"] else "b"
        want[pid] = {"left": left, "right": "b" if left == "a" else "a", "tie": "tie"}[choice]
    assert got == want
    assert main(["annotate", "stats", "--db", str(tmp_path / "nope.sqlite")]) == 2


def test_sigint_stops_a_server_started_with_sigint_ignored(tmp_path, gen_dir):
    """A background job of a script starts with SIGINT ignored (so CI runners and `cmd &` do);
    Ctrl-C must still stop the server, or a test or a supervisor waits forever."""
    proc, client = start_server_process(
        gen_dir, tmp_path / "labels.sqlite", preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)
    )
    try:
        assert client.next("alice")["pair"] is not None
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0  # a clean exit, not a kill
    finally:
        proc.kill()


def test_all_mode_export_of_several_annotators_passes_validation(served, tmp_path, capsys):
    """Three annotators label every pair through the HTTP API; ``export --mode all`` writes one
    row per label. Rows that agree but come from different annotators are votes, not
    duplicates: ``data validate`` passes (disagreements are warnings) and DPO gets every vote.
    A row copied verbatim (same annotator too) is still a fatal duplicate."""
    client, app, _ = served(per_pair=3)

    def side(pair: dict, want: str) -> str:
        left = "a" if pair["left"]["url"] == "/media/" + app.pairs[pair["id"]]["media_a"] else "b"
        return "tie" if want == "tie" else ("left" if want == left else "right")

    # ann0 and ann1 prefer video a everywhere; ann2 agrees on even pair ids and prefers b on odd
    votes = {"ann0": lambda pid: "a", "ann1": lambda pid: "a", "ann2": lambda pid: "b" if pid % 2 else "a"}
    for name, want in votes.items():
        while (pair := client.next(name)["pair"]) is not None:
            status, data = client.label(name, pair["id"], side(pair, want(pair["id"])))
            assert status == 200, data
    out = tmp_path / "all"
    assert main(["annotate", "export", "--db", str(tmp_path / "labels.sqlite"), str(out), "--mode", "all"]) == 0
    ds = load_preference_dataset(out)
    assert len(ds) == 12 and sorted(set(ds["pair_id"])) == [1, 2, 3, 4]
    assert sorted(ds["annotator"]) == ["ann0"] * 4 + ["ann1"] * 4 + ["ann2"] * 4
    capsys.readouterr()
    assert main(["data", "validate", str(out)]) == 0
    text = capsys.readouterr().out
    assert "0 problem(s) in 0 row(s), 2 warning(s)" in text and "warning: conflicting label with row" in text
    pairs = to_pairs(ds, source=str(out), root=out)
    assert pairs.rows == list(range(12)) and pairs.skipped == {"bad_row": 0, "tie": 0}

    # the same label of the same annotator twice is a duplicate row
    dup = tmp_path / "dup"
    datasets.concatenate_datasets([ds, ds.select([0])]).save_to_disk(str(dup))
    shutil.copytree(out / "videos", dup / "videos")
    assert main(["data", "validate", str(dup)]) == 1
    text = capsys.readouterr().out
    who = ds["annotator"][0]
    assert f"row 12: duplicate of row 0 (same prompt, videos and label, annotator '{who}':" in text
    assert "1 problem(s) in 1 row(s), 2 warning(s)" in text
    with pytest.raises(PreferenceDataError, match="row 12: duplicate of row 0"):
        to_pairs(load_preference_dataset(dup), source=str(dup), root=dup)


def test_host_warning_only_for_non_loopback():
    assert host_warning("127.0.0.1") is None and host_warning("localhost") is None and host_warning("::1") is None
    assert "not a loopback address" in host_warning("0.0.0.0")
    assert "not a loopback address" in host_warning("192.168.1.5")


# --------------------------------------------------------------------------------------------
# access control


@pytest.fixture
def protected(tmp_path, gen_dir):
    """A server over ``gen_dir`` with access control; ``start(secret=..., require_invite=..., host=...)``
    yields ``(client, app, store)``."""
    servers = []

    def start(secret: str | None = None, require_invite: bool = False, host: str = "127.0.0.1"):
        src = load_pairs(gen_dir, tmp_path / "cache")
        store = LabelStore(tmp_path / "labels.sqlite")
        store.sync_pairs(src.pairs, src.source, src.kind)
        # two labels per pair: the invite test has alice and bob label the same pair
        app = AnnotateApp(store, src.roots, 2, secret=secret, require_invite=require_invite)
        server = make_server(app, host, 0)
        start_in_thread(server)
        servers.append(server)
        return Client(server.server_address[1]), app, store

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


SECRET = "team-secret-0123456789"


def test_secret_every_route_needs_the_token_and_401_writes_nothing(protected, gen_dir):
    client, app, store = protected(secret=SECRET)
    media = "/media/data/0000_seed0.mp4"
    routes = ["/", "/static/app.js", "/static/style.css", "/api/info", "/api/next?annotator=u", "/api/stats", media]
    label = json.dumps({"annotator": "u", "pair_id": 1, "choice": "left"})
    json_h = {"Content-Type": "application/json"}
    for token in (None, "wrong-token-0123456789", SECRET[:-1]):
        auth = {} if token is None else {"Authorization": f"Bearer {token}"}
        q = "" if token is None else f"?token={token}"
        for path in routes:
            status, h, body = client.request("GET", path, headers=auth)
            assert status == 401 and "set-cookie" not in h and h["www-authenticate"].startswith("Bearer"), path
            assert client.request("GET", path.split("?")[0] + q)[0] == 401, path
        assert client.request("POST", "/api/label", label, {**json_h, **auth})[0] == 401
        assert client.request("POST", "/api/label" + q, label, json_h)[0] == 401
        assert client.request("POST", "/api/undo", json.dumps({"annotator": "u"}), {**json_h, **auth})[0] == 401
        assert client.request("GET", media, headers={"Cookie": f"vidalign_token_{client.port}={token}"})[0] == 401
    status, h, page = client.request("GET", "/")
    assert h["content-type"].startswith("text/html") and b"invite link" in page  # a person gets told what to do
    assert store.labels(include_skips=True, include_undone=True) == []

    # the right token: by query (which sets the cookie), by cookie, by either header
    status, h, page = client.request("GET", f"/?token={SECRET}")
    assert status == 200 and b'id="choose-left"' in page
    cookie = h["set-cookie"].split(";")[0]
    assert cookie == f"vidalign_token_{client.port}={SECRET}" and "HttpOnly" in h["set-cookie"]
    assert client.request("GET", media, headers={"Cookie": cookie})[0] == 200
    assert client.request("GET", media, headers={"Cookie": cookie, "Range": "bytes=0-9"})[0] == 206
    assert client.request("GET", "/api/info", headers={"X-Vidalign-Token": SECRET})[0] == 200
    status, _, data = client.request("GET", "/api/info", headers={"Cookie": cookie})
    assert json.loads(data)["access"] == "token" and json.loads(data)["annotator"] is None  # a secret names no one
    status, _, data = client.request("POST", "/api/label", label, {**json_h, "Cookie": cookie})
    assert status == 200, data
    assert [(r["annotator"], r["pair_id"]) for r in store.labels()] == [("u", 1)]  # names are typed with a secret


def test_invites_bind_the_annotator_and_can_be_revoked(protected, tmp_path, capsys):
    db = tmp_path / "labels.sqlite"
    assert main(["annotate", "invite", "alice", "--db", str(db), "--base-url", "http://10.0.0.5:8765"]) == 0
    link = capsys.readouterr().out.strip()
    assert re.fullmatch(r"http://10\.0\.0\.5:8765/\?token=[A-Za-z0-9_-]{32}", link)
    token = link.split("token=")[1]
    bob = LabelStore(db).add_invite("bob")
    client, app, store = protected(require_invite=True)
    assert store.invites() == {"alice": 1, "bob": 1} and token not in db.read_bytes().decode("latin-1")  # hashed
    assert client.request("GET", "/api/info")[0] == 401
    status, h, data = client.request("GET", f"/api/info?token={token}")
    assert status == 200 and json.loads(data)["annotator"] == "alice"
    cookie = {"Cookie": h["set-cookie"].split(";")[0]}
    nxt = json.loads(client.request("GET", "/api/next", headers=cookie)[2])  # no name needed: the invite has it
    pid = nxt["pair"]["id"]
    body = {"pair_id": pid, "choice": "left"}
    json_h = {"Content-Type": "application/json", **cookie}
    status, _, data = client.request("POST", "/api/label", json.dumps({**body, "annotator": "bob"}), json_h)
    assert status == 403 and b"belongs to 'alice'" in data  # an invite cannot label for someone else
    assert client.request("GET", "/api/next?annotator=bob", headers=cookie)[0] == 403
    assert store.labels(include_skips=True, include_undone=True) == []
    assert client.request("POST", "/api/label", json.dumps(body), json_h)[0] == 200
    status, _, data = client.request("POST", "/api/label", json.dumps(body), {**json_h, "Cookie": ""})
    assert status == 401
    b_h = {"Content-Type": "application/json", "Authorization": f"Bearer {bob}"}
    assert client.request("POST", "/api/label", json.dumps({**body, "annotator": "bob"}), b_h)[0] == 200
    assert sorted((r["annotator"], r["pair_id"]) for r in store.labels()) == [("alice", pid), ("bob", pid)]
    assert client.request("GET", "/", headers={"Authorization": "Bearer " + SECRET})[0] == 401  # no secret set

    assert main(["annotate", "invite", "alice", "--db", str(db), "--revoke"]) == 0
    assert "revoked 1 invite(s) of alice" in capsys.readouterr().out
    assert client.request("GET", "/api/info", headers=cookie)[0] == 401  # checked on every request
    assert client.request("GET", "/api/info", headers={"X-Vidalign-Token": bob})[0] == 200
    with pytest.raises(ValueError, match="base-url must be"):
        invite_link("10.0.0.5:8765", "t")
    assert main(["annotate", "invite", "carol", "--db", str(db), "--base-url", "http://h:1/sub/"]) == 2


def test_non_loopback_needs_access_control(protected, tmp_path, gen_dir, capsys):
    src = load_pairs(gen_dir, tmp_path / "cache")
    store = LabelStore(tmp_path / "open.sqlite")
    store.sync_pairs(src.pairs, src.source, src.kind)
    for host in ("0.0.0.0", "192.168.1.5", "::"):
        with pytest.raises(ValueError, match="not a loopback address.*--secret.*invite"):
            make_server(AnnotateApp(store, src.roots), host, 0)  # refused before binding
    db = tmp_path / "cli.sqlite"
    assert main(["annotate", "serve", str(gen_dir), "--db", str(db), "--host", "0.0.0.0", "--port", "0"]) == 2
    assert "needs access control" in capsys.readouterr().err and not db.exists()  # nothing loaded or written
    assert main(["annotate", "serve", str(gen_dir), "--db", str(db), "--host", "0.0.0.0", "--secret", "short"]) == 2
    assert "at least 12" in capsys.readouterr().err and not db.exists()
    # with a secret the app binds all interfaces; there is no Host check there, the token is the check
    client, app, _ = protected(secret=SECRET, host="0.0.0.0")
    assert app.allowed_hosts is None
    assert client.request("GET", "/api/info")[0] == 401
    assert client.request("GET", f"/api/info?token={SECRET}")[0] == 200


def test_cli_serve_with_invites_on_all_interfaces(tmp_path, gen_dir, capsys):
    """``vidalign annotate serve --host 0.0.0.0 --require-invite`` in a subprocess: the link that
    ``annotate invite`` printed works, a request without it gets 401, labels carry the name."""
    db = tmp_path / "labels.sqlite"
    assert main(["annotate", "invite", "dana", "--db", str(db), "--base-url", "http://example.org:8765"]) == 0
    token = capsys.readouterr().out.strip().split("token=")[1]
    proc, client = start_server_process(gen_dir, db, extra_args=("--host", "0.0.0.0", "--require-invite"))
    try:
        assert client.request("GET", "/")[0] == 401
        status, h, _ = client.request("GET", f"/?token={token}")
        assert status == 200
        cookie = {"Cookie": h["set-cookie"].split(";")[0]}
        pid = json.loads(client.request("GET", "/api/next", headers=cookie)[2])["pair"]["id"]
        body = json.dumps({"pair_id": pid, "choice": "tie"})
        assert client.request("POST", "/api/label", body, {"Content-Type": "application/json"})[0] == 401
        assert client.request("POST", "/api/label", body, {"Content-Type": "application/json", **cookie})[0] == 200
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
    assert [(r["annotator"], r["choice"]) for r in LabelStore(db, create=False).labels()] == [("dana", "tie")]
