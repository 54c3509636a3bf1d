"""The annotation app under load: concurrent annotators, bursts of simultaneous POSTs, kill -9.

    python -m bench.annotate_load [--annotators 16] [--seconds 5] [--bursts 30] [--kills 2] [--out FILE]

Runs ``vidalign annotate serve`` in a subprocess (``--per-pair 3``, a fresh database per phase)
over a few hundred pairs of tiny videos, and drives it with one thread per annotator, each
request on a fresh connection (the harshest case for the listen queue):

1. ``steady``: every annotator loops ``GET /api/next`` + ``POST /api/label`` for ``--seconds``:
   requests/s, connection resets, other errors.
2. ``bursts``: ``--bursts`` rounds in which every annotator POSTs at the same instant (a
   barrier): connection resets among ``annotators x bursts`` connections.
3. ``kills``: the annotators keep labelling while the server is killed with SIGKILL
   ``--kills`` times and restarted on the same port; afterwards every acknowledged label (a
   200) must be in the database with its pair, annotator and choice: ``lost`` labels.

``--code DIR`` serves the ``align`` package found in ``DIR`` (e.g. an older checkout made
with ``git archive``) instead of this one, to measure a change. ``tests/test_annotate_hardening.py``
runs a short version of phase 3 as an integration test.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from align.launch import free_port

REPO = Path(__file__).resolve().parents[1]
CHOICES = ("left", "right", "tie")
RESET_ERRORS = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError, http.client.RemoteDisconnected)


def make_pairs_dir(path: Path, prompts: int = 12, per_prompt: int = 8) -> Path:
    """A ``vidalign generate``-style folder: ``prompts`` x ``per_prompt`` copies of one tiny mp4
    (served as they are, never decoded), so ``prompts * per_prompt * (per_prompt - 1) / 2``
    pairs (336 by default)."""
    import numpy as np

    from align.data.video import write_video

    path.mkdir(parents=True, exist_ok=True)
    first = write_video(path / "0000.mp4", np.full((4, 16, 16, 3), 128, np.uint8), fps=8).read_bytes()
    rows = []
    for p in range(prompts):
        for s in range(per_prompt):
            i = p * per_prompt + s
            (path / f"{i:04d}.mp4").write_bytes(first)
            rows.append({"file": f"{i:04d}.mp4", "prompt": f"prompt {p}", "seed": i})
    (path / "index.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def start_server(pairs: Path, db: Path, port: int, code: Path = REPO, timeout: float = 60) -> subprocess.Popen:
    """``vidalign annotate serve PAIRS --db DB --port PORT --per-pair 3`` once it says it serves."""
    cmd = [sys.executable, "-m", "align.cli", "annotate", "serve", str(pairs), "--db", str(db)]
    proc = subprocess.Popen(
        [*cmd, "--port", str(port), "--per-pair", "3"],
        cwd=code,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    deadline = time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if re.match(r"serving on http://", line):
            threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep the pipe drained
            return proc
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise RuntimeError(f"the server did not start (exit {proc.poll()})")


class Tally:
    """Counts shared by the annotator threads: requests, errors by kind, acknowledged labels."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests = 0
        self.errors: dict[str, int] = {}
        #: (label_id, pair_id, annotator, choice as shown, url of the video shown on the left)
        self.acked: list[tuple[int, int, str, str, str]] = []

    def error(self, kind: str) -> None:
        with self.lock:
            self.errors[kind] = self.errors.get(kind, 0) + 1


def request(port: int, tally: Tally, method: str, path: str, body: dict | None = None):
    """One request on a fresh connection: ``(status, json)``, or ``None`` after a counted error."""
    con = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        data = None if body is None else json.dumps(body)
        con.request(method, path, body=data, headers={"Content-Type": "application/json"} if data else {})
        res = con.getresponse()
        answer = json.loads(res.read() or b"null")
        with tally.lock:
            tally.requests += 1
        if res.status not in (200, 409):
            tally.error(f"HTTP {res.status}")
        return res.status, answer
    except RESET_ERRORS:
        tally.error("reset")
    except ConnectionRefusedError:
        tally.error("refused")
    except (TimeoutError, OSError, ValueError) as e:
        tally.error(type(e).__name__)
    finally:
        con.close()
    return None


def annotate_once(port_of, name: str, tally: Tally) -> bool:
    """Ask for a pair and label it; ``False`` when no pair is left for ``name``."""
    got = request(port_of(), tally, "GET", f"/api/next?annotator={name}")
    if got is None or got[0] != 200:
        time.sleep(0.05)
        return True
    pair = got[1]["pair"]
    if pair is None:
        return False
    choice = CHOICES[(pair["id"] + len(name)) % 3]
    got = request(port_of(), tally, "POST", "/api/label", {"annotator": name, "pair_id": pair["id"], "choice": choice})
    if got is not None and got[0] == 200:
        with tally.lock:
            tally.acked.append((got[1]["label_id"], pair["id"], name, choice, pair["left"]["url"]))
    return True


def run_annotators(port_of, n: int, seconds: float, tally: Tally) -> float:
    """``n`` annotator threads labelling for ``seconds``; returns the wall time."""
    stop = time.monotonic() + seconds

    def work(name: str) -> None:
        while time.monotonic() < stop and annotate_once(port_of, name, tally):
            pass

    threads = [threading.Thread(target=work, args=(f"ann{i:02d}",)) for i in range(n)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.monotonic() - t0


def run_bursts(port: int, n: int, rounds: int, tally: Tally) -> None:
    """``rounds`` times, ``n`` threads POST a label at the same instant (each on a fresh connection)."""
    barrier = threading.Barrier(n)

    def work(i: int) -> None:
        for r in range(rounds):
            barrier.wait()
            request(
                port, tally, "POST", "/api/label", {"annotator": f"burst{i:02d}", "pair_id": r + 1, "choice": "tie"}
            )

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def lost_labels(db: Path, acked: list) -> list:
    """The acknowledged labels that are not in ``db`` as acknowledged (pair, annotator, choice)."""
    con = sqlite3.connect(db)
    try:
        rows = {r[0]: r[1:] for r in con.execute("SELECT id, pair_id, annotator, choice, shown_left FROM labels")}
        media = {r[0]: r[1] for r in con.execute("SELECT id, media_a FROM pairs")}
    finally:
        con.close()
    lost = []
    for label_id, pair_id, name, choice, left_url in acked:
        left = "a" if left_url == "/media/" + media[pair_id] else "b"
        want = {"left": left, "right": "b" if left == "a" else "a", "tie": "tie"}[choice]
        if rows.get(label_id) != (pair_id, name, want, left):
            lost.append((label_id, pair_id, name, choice))
    return lost


def kill_phase(pairs: Path, db: Path, n: int, seconds: float, kills: int, code: Path = REPO) -> dict:
    """Annotators label while the server is killed (SIGKILL) ``kills`` times and restarted."""
    port = free_port()
    state = {"proc": start_server(pairs, db, port, code)}
    tally = Tally()
    done = threading.Event()

    def killer() -> None:
        for _ in range(kills):
            if done.wait(seconds / (kills + 1)):
                return
            state["proc"].send_signal(signal.SIGKILL)
            state["proc"].wait()
            state["proc"] = start_server(pairs, db, port, code)

    k = threading.Thread(target=killer)
    k.start()
    try:
        wall = run_annotators(lambda: port, n, seconds, tally)
    finally:
        done.set()
        k.join()
        state["proc"].send_signal(signal.SIGKILL)
        state["proc"].wait()
    lost = len(lost_labels(db, tally.acked))
    return {"seconds": round(wall, 2), "acked": len(tally.acked), "lost": lost, "errors": tally.errors}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--annotators", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=5.0, help="length of the steady and the kill phase")
    ap.add_argument("--bursts", type=int, default=30, help="rounds of simultaneous POSTs")
    ap.add_argument("--kills", type=int, default=2)
    ap.add_argument("--code", type=Path, default=REPO, help="the folder whose align package is served")
    ap.add_argument("--out", type=Path, help="write the figures here as JSON")
    args = ap.parse_args(argv)
    n = args.annotators
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        pairs = make_pairs_dir(tmp / "pairs")
        port = free_port()
        proc = start_server(pairs, tmp / "steady.sqlite", port, args.code)
        try:
            steady = Tally()
            wall = run_annotators(lambda: port, n, args.seconds, steady)
            bursts = Tally()
            t0 = time.monotonic()
            run_bursts(port, n, args.bursts, bursts)
            burst_wall = time.monotonic() - t0
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        lost_steady = len(lost_labels(tmp / "steady.sqlite", steady.acked))
        kills = kill_phase(pairs, tmp / "kills.sqlite", n, args.seconds, args.kills, args.code)
    figures = {
        "annotators": n,
        "steady": {
            "seconds": round(wall, 2),
            "requests": steady.requests,
            "requests_per_s": round(steady.requests / wall, 1),
            "labels_acked": len(steady.acked),
            "lost": lost_steady,
            "errors": steady.errors,
        },
        "bursts": {"connections": n * args.bursts, "seconds": round(burst_wall, 2), "errors": bursts.errors},
        "kills": {"kills": args.kills, **kills},
    }
    text = json.dumps(figures, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
