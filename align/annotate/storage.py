"""Labels in SQLite: WAL journal, ``synchronous=FULL``, one transaction per label.

A label is acknowledged to the browser only after its transaction has committed, and with
``synchronous=FULL`` a commit is on disk before it returns, so neither a killed server nor a
crashed machine loses an acknowledged label. Every call opens its own connection, so any
number of server threads (or processes) can share one database; writers take the write lock
up front (``BEGIN IMMEDIATE``) and wait for each other up to ``timeout`` seconds.

Tables:

- ``meta``: key/value (schema version, the seed of the left/right shuffle, the pair source).
- ``pairs``: the pairs, fixed when the database is first served.
- ``labels``: one row per decision: ``choice`` is ``a | b | tie | skip`` in the dataset's
  terms, ``shown_left`` records which video (``a`` or ``b``) was shown on the left, plus optional
  per-aspect choices and a comment. Undo marks the row ``undone_at``; nothing is deleted. A
  partial unique index allows one live row per (pair, annotator): no duplicated labels.
- ``leases``: which annotator was last handed which pair, and until when, so that two
  annotators working at once are handed different pairs while a pair still needs labels.
- ``invites``: per-annotator access tokens (``vidalign annotate invite NAME``), stored as their
  SHA-256 (the database does not hold the tokens themselves), with the annotator's name and an
  optional revocation time. The table is created on open, so older databases gain it too.
"""

from __future__ import annotations

import hashlib
import secrets
import sqlite3
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from align.annotate.pairs import Pair

SCHEMA_VERSION = "1"
CHOICES = ("a", "b", "tie", "skip")
ASPECTS = ("visual_quality", "motion", "text_alignment")
ASPECT_CHOICES = ("a", "b", "tie")
LEASE_SECONDS = 600.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS pairs (
    id INTEGER PRIMARY KEY,
    key TEXT NOT NULL UNIQUE,
    prompt TEXT NOT NULL,
    media_a TEXT NOT NULL,
    media_b TEXT NOT NULL,
    video_a TEXT,
    video_b TEXT,
    source_row INTEGER
);
CREATE TABLE IF NOT EXISTS labels (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    pair_id INTEGER NOT NULL REFERENCES pairs(id),
    annotator TEXT NOT NULL,
    choice TEXT NOT NULL CHECK (choice IN ('a', 'b', 'tie', 'skip')),
    shown_left TEXT NOT NULL CHECK (shown_left IN ('a', 'b')),
    visual_quality TEXT CHECK (visual_quality IN ('a', 'b', 'tie')),
    motion TEXT CHECK (motion IN ('a', 'b', 'tie')),
    text_alignment TEXT CHECK (text_alignment IN ('a', 'b', 'tie')),
    comment TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    undone_at REAL
);
CREATE UNIQUE INDEX IF NOT EXISTS labels_live ON labels (pair_id, annotator) WHERE undone_at IS NULL;
CREATE TABLE IF NOT EXISTS leases (
    pair_id INTEGER NOT NULL REFERENCES pairs(id),
    annotator TEXT NOT NULL,
    expires_at REAL NOT NULL,
    PRIMARY KEY (pair_id, annotator)
);
CREATE TABLE IF NOT EXISTS invites (
    token_sha256 TEXT PRIMARY KEY,
    annotator TEXT NOT NULL,
    created_at REAL NOT NULL,
    revoked_at REAL
);
"""


class UnknownPairError(LookupError):
    """A label or lookup named a pair id the database does not hold."""


class DuplicateLabelError(Exception):
    """The annotator already has a live label (or skip) for this pair."""


class PairCompleteError(Exception):
    """The pair already has its ``per_pair`` live labels from other annotators."""


class LabelStore:
    """The annotation database at ``path``. ``create=False`` refuses a missing file (for
    ``stats`` and ``export``, which must not create an empty database by a typo)."""

    def __init__(self, path: str | Path, create: bool = True, timeout: float = 30.0):
        self.path = Path(path)
        self.timeout = timeout
        if not self.path.exists():
            if not create:
                raise FileNotFoundError(f"annotation database {self.path}: no such file")
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            con = sqlite3.connect(self.path, timeout=timeout, isolation_level=None)
            try:
                con.execute("PRAGMA journal_mode=WAL")
                con.executescript(_SCHEMA)
                con.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (SCHEMA_VERSION,))
                con.execute("INSERT OR IGNORE INTO meta VALUES ('seed', ?)", (secrets.token_hex(16),))
                version = con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0]
            finally:
                con.close()
        except sqlite3.DatabaseError as e:
            raise ValueError(f"annotation database {self.path}: not a usable SQLite database ({e})") from None
        if version != SCHEMA_VERSION:
            raise ValueError(f"annotation database {self.path}: schema version {version}, expected {SCHEMA_VERSION}")
        self._seed = self.meta("seed")

    # ----------------------------------------------------------------------------------------
    # connections and transactions

    @contextmanager
    def _tx(self, write: bool = False) -> Iterator[sqlite3.Connection]:
        """A connection inside one transaction: committed on success, rolled back on error."""
        con = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None)
        con.row_factory = sqlite3.Row
        try:
            con.execute("PRAGMA synchronous=FULL")
            con.execute("PRAGMA foreign_keys=ON")
            con.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield con
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")
        finally:
            con.close()

    def meta(self, key: str, default: str | None = None) -> str | None:
        with self._tx() as con:
            row = con.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else default

    def set_meta(self, **values: str) -> None:
        with self._tx(write=True) as con:
            con.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", [(k, str(v)) for k, v in values.items()])

    # ----------------------------------------------------------------------------------------
    # pairs

    def sync_pairs(self, pairs: list[Pair], source: str, kind: str) -> None:
        """Store ``pairs`` on first use; later, check that they are the ones already stored.

        Labels refer to pair ids, so a database stays bound to one set of pairs. A different
        set is an error naming the first difference, not a silent remapping."""
        new = [(p.key, p.prompt, p.media_a, p.media_b) for p in pairs]
        with self._tx(write=True) as con:
            old = [tuple(r) for r in con.execute("SELECT key, prompt, media_a, media_b FROM pairs ORDER BY id")]
            if not old:
                con.executemany(
                    "INSERT INTO pairs (id, key, prompt, media_a, media_b, video_a, video_b, source_row) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    [
                        (i + 1, p.key, p.prompt, p.media_a, p.media_b, p.video_a, p.video_b, p.source_row)
                        for i, p in enumerate(pairs)
                    ],
                )
            elif old != new:
                first = next((i for i, (o, n) in enumerate(zip(old, new)) if o != n), min(len(old), len(new)))
                was = old[first] if first < len(old) else "nothing"
                now = new[first] if first < len(new) else "nothing"
                raise ValueError(
                    f"annotation database {self.path} holds {len(old)} pairs from "
                    f"{self.meta_in(con, 'source')}, but these pairs ({len(new)}, from {source}) differ "
                    f"at pair {first + 1}: stored {was}, now {now}. Use a new --db for different pairs."
                )
            else:  # same pairs: refresh the source files' locations (the dataset may have moved)
                con.executemany(
                    "UPDATE pairs SET video_a = ?, video_b = ?, source_row = ? WHERE id = ?",
                    [(p.video_a, p.video_b, p.source_row, i + 1) for i, p in enumerate(pairs)],
                )
            con.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", [("source", source), ("source_kind", kind)])

    @staticmethod
    def meta_in(con: sqlite3.Connection, key: str) -> str | None:
        row = con.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def pairs(self) -> list[dict]:
        with self._tx() as con:
            return [dict(r) for r in con.execute("SELECT * FROM pairs ORDER BY id")]

    def pair(self, pair_id: int) -> dict:
        with self._tx() as con:
            row = con.execute("SELECT * FROM pairs WHERE id = ?", (pair_id,)).fetchone()
        if row is None:
            raise UnknownPairError(f"no pair with id {pair_id}")
        return dict(row)

    def left_video(self, annotator: str, pair_id: int) -> str:
        """Which video (``a`` or ``b``) this annotator sees on the left: a fair coin per
        (annotator, pair), derived from the database's random seed so that it is the same on
        every reload and restart, and independent of the pair's content and order."""
        h = hashlib.sha256(f"{self._seed}\0{annotator}\0{pair_id}".encode()).digest()
        return "a" if h[0] & 1 == 0 else "b"

    # ----------------------------------------------------------------------------------------
    # assignment and progress

    def next_pair(self, annotator: str, per_pair: int, now: float | None = None) -> tuple[dict | None, dict]:
        """The pair to show ``annotator`` next (or ``None`` when nothing is left) and progress.

        A pair is open while it has fewer than ``per_pair`` labels (skips do not count) and
        this annotator has neither labelled nor skipped it. Preference: a pair already leased
        to this annotator (most recent lease first: a reload or an undo shows the same pair
        again), then the pair with the most labels (finish pairs before starting new ones),
        then a per-annotator shuffle. Pairs whose open slots are all leased to other
        annotators are handed out only when nothing else is open."""
        now = time.time() if now is None else now
        with self._tx(write=True) as con:
            con.execute("DELETE FROM leases WHERE expires_at <= ?", (now,))
            st = self._state(con, annotator, per_pair)
            mine = st["my_leases"]
            others = st["other_leases"]
            free = [p for p in st["open"] if p in mine or st["counts"][p] + others[p] < per_pair]
            candidates = free or st["open"]
            if not candidates:
                return None, self._progress(st, per_pair)
            pid = min(candidates, key=lambda p: (-mine.get(p, 0.0), -st["counts"][p], self._order(annotator, p)))
            con.execute(
                "INSERT INTO leases VALUES (?, ?, ?) ON CONFLICT (pair_id, annotator) DO UPDATE SET expires_at = ?",
                (pid, annotator, now + LEASE_SECONDS, max(now + LEASE_SECONDS, mine.get(pid, 0.0))),
            )
            row = dict(con.execute("SELECT * FROM pairs WHERE id = ?", (pid,)).fetchone())
        return row, self._progress(st, per_pair)

    def progress(self, annotator: str, per_pair: int) -> dict:
        with self._tx() as con:
            return self._progress(self._state(con, annotator, per_pair), per_pair)

    def _order(self, annotator: str, pair_id: int) -> bytes:
        return hashlib.sha256(f"{self._seed}\0order\0{annotator}\0{pair_id}".encode()).digest()

    @staticmethod
    def _state(con: sqlite3.Connection, annotator: str, per_pair: int) -> dict:
        ids = [r[0] for r in con.execute("SELECT id FROM pairs ORDER BY id")]
        counts = Counter(
            dict(
                con.execute(
                    "SELECT pair_id, COUNT(*) FROM labels WHERE undone_at IS NULL AND choice != 'skip' GROUP BY pair_id"
                ).fetchall()
            )
        )
        done = dict(
            con.execute(
                "SELECT pair_id, choice FROM labels WHERE annotator = ? AND undone_at IS NULL", (annotator,)
            ).fetchall()
        )
        my_leases, other_leases = {}, Counter()
        for pid, who, expires in con.execute("SELECT pair_id, annotator, expires_at FROM leases"):
            if who == annotator:
                if pid not in done:
                    my_leases[pid] = expires
            else:
                other_leases[pid] += 1
        open_ = [p for p in ids if p not in done and counts[p] < per_pair]
        return {
            "ids": ids,
            "counts": counts,
            "done": done,
            "open": open_,
            "my_leases": my_leases,
            "other_leases": other_leases,
        }

    @staticmethod
    def _progress(st: dict, per_pair: int) -> dict:
        skipped = sum(1 for c in st["done"].values() if c == "skip")
        done = len(st["done"])
        return {
            "done": done,
            "labelled": done - skipped,
            "skipped": skipped,
            "remaining": len(st["open"]),
            "total": done + len(st["open"]),
            "pairs_complete": sum(1 for p in st["ids"] if st["counts"][p] >= per_pair),
            "pairs_total": len(st["ids"]),
            "per_pair": per_pair,
        }

    # ----------------------------------------------------------------------------------------
    # labels

    def add_label(
        self,
        annotator: str,
        pair_id: int,
        choice: str,
        shown_left: str,
        aspects: dict[str, str] | None = None,
        comment: str = "",
        now: float | None = None,
        per_pair: int | None = None,
    ) -> int:
        """Record one decision in its own transaction and return its id (after the commit).

        ``choice`` and ``aspects`` values are in the dataset's terms (``a``/``b``/``tie``;
        ``choice`` may also be ``skip``); ``shown_left`` is the video shown on the left. With
        ``per_pair`` a label (not a skip) of a pair that already has ``per_pair`` live labels
        from other annotators is refused: checked and written in one transaction, so
        simultaneous requests cannot overfill a pair. Raises :class:`UnknownPairError`,
        :class:`DuplicateLabelError`, :class:`PairCompleteError` or ``ValueError`` (also for
        text that is not valid Unicode, such as a lone surrogate); then nothing is written."""
        aspects = dict(aspects or {})
        for what, text in (("annotator", annotator), ("comment", comment)):
            if not isinstance(text, str) or not _encodable(text):
                raise ValueError(f"{what} must be valid Unicode text (no lone surrogates)")
        if choice not in CHOICES:
            raise ValueError(f"choice must be one of {CHOICES}, got {choice!r}")
        if shown_left not in ("a", "b"):
            raise ValueError(f"shown_left must be 'a' or 'b', got {shown_left!r}")
        for k, v in aspects.items():
            if k not in ASPECTS:
                raise ValueError(f"unknown aspect {k!r}; aspects are {ASPECTS}")
            if v is not None and v not in ASPECT_CHOICES:
                raise ValueError(f"aspect {k} must be one of {ASPECT_CHOICES} or null, got {v!r}")
        now = time.time() if now is None else now
        with self._tx(write=True) as con:
            if con.execute("SELECT 1 FROM pairs WHERE id = ?", (pair_id,)).fetchone() is None:
                raise UnknownPairError(f"no pair with id {pair_id}")
            if per_pair is not None and choice != "skip":
                (others,) = con.execute(
                    "SELECT COUNT(*) FROM labels WHERE pair_id = ? AND annotator != ? AND undone_at IS NULL "
                    "AND choice != 'skip'",
                    (pair_id, annotator),
                ).fetchone()
                if others >= per_pair:
                    raise PairCompleteError(
                        f"pair {pair_id} already has its {per_pair} label{'s' if per_pair > 1 else ''} from other "
                        "annotators; this label was not recorded"
                    )
            try:
                cur = con.execute(
                    "INSERT INTO labels (pair_id, annotator, choice, shown_left, visual_quality, motion, "
                    "text_alignment, comment, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (pair_id, annotator, choice, shown_left, *(aspects.get(k) for k in ASPECTS), comment, now),
                )
            except sqlite3.IntegrityError as e:
                if "UNIQUE" in str(e):
                    raise DuplicateLabelError(f"{annotator} has already labelled pair {pair_id}") from None
                raise
            con.execute("DELETE FROM leases WHERE pair_id = ? AND annotator = ?", (pair_id, annotator))
            return int(cur.lastrowid)

    def undo_last(self, annotator: str, now: float | None = None) -> dict | None:
        """Mark the annotator's most recent live label (or skip) undone and lease its pair back
        to them, so it is shown next. Returns the undone label, or ``None`` if there is none."""
        now = time.time() if now is None else now
        with self._tx(write=True) as con:
            row = con.execute(
                "SELECT * FROM labels WHERE annotator = ? AND undone_at IS NULL ORDER BY id DESC LIMIT 1", (annotator,)
            ).fetchone()
            if row is None:
                return None
            con.execute("UPDATE labels SET undone_at = ? WHERE id = ?", (now, row["id"]))
            # the newest lease of this annotator: shown before any pair leased earlier
            newest = con.execute("SELECT MAX(expires_at) FROM leases WHERE annotator = ?", (annotator,)).fetchone()[0]
            expires = max(now + LEASE_SECONDS, (newest or 0.0) + 1e-3)
            con.execute(
                "INSERT INTO leases VALUES (?, ?, ?) ON CONFLICT (pair_id, annotator) DO UPDATE SET expires_at = ?",
                (row["pair_id"], annotator, expires, expires),
            )
            return dict(row)

    def labels(self, include_skips: bool = False, include_undone: bool = False) -> list[dict]:
        """Label rows (joined with nothing), oldest first."""
        where = []
        if not include_skips:
            where.append("choice != 'skip'")
        if not include_undone:
            where.append("undone_at IS NULL")
        sql = "SELECT * FROM labels" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY id"
        with self._tx() as con:
            return [dict(r) for r in con.execute(sql)]

    # ----------------------------------------------------------------------------------------
    # invites (per-annotator access tokens)

    def add_invite(self, annotator: str, now: float | None = None) -> str:
        """A new random token for ``annotator`` (URL-safe, 192 bits); only its hash is stored.
        Earlier tokens of the same name stay valid until :meth:`revoke_invites`."""
        if not isinstance(annotator, str) or not annotator.strip():
            raise ValueError("an invite needs a non-empty annotator name")
        name = annotator.strip()
        if len(name) > 64 or any(not c.isprintable() for c in name):
            raise ValueError(f"annotator names are at most 64 printable characters, got {annotator!r}")
        token = secrets.token_urlsafe(24)
        now = time.time() if now is None else now
        with self._tx(write=True) as con:
            con.execute("INSERT INTO invites VALUES (?, ?, ?, NULL)", (token_hash(token), name, now))
        return token

    def invite_annotator(self, token: str) -> str | None:
        """The annotator a live (unrevoked) invite token belongs to, or ``None``."""
        with self._tx() as con:
            row = con.execute(
                "SELECT annotator FROM invites WHERE token_sha256 = ? AND revoked_at IS NULL", (token_hash(token),)
            ).fetchone()
        return row[0] if row else None

    def revoke_invites(self, annotator: str, now: float | None = None) -> int:
        """Revoke every live token of ``annotator``; returns how many there were."""
        now = time.time() if now is None else now
        with self._tx(write=True) as con:
            cur = con.execute(
                "UPDATE invites SET revoked_at = ? WHERE annotator = ? AND revoked_at IS NULL", (now, annotator)
            )
            return cur.rowcount

    def invites(self) -> dict[str, int]:
        """Annotator name -> number of live invite tokens."""
        with self._tx() as con:
            rows = con.execute(
                "SELECT annotator, COUNT(*) FROM invites WHERE revoked_at IS NULL GROUP BY annotator ORDER BY annotator"
            )
            return dict(rows.fetchall())


def _encodable(text: str) -> bool:
    """Whether ``text`` is valid Unicode (SQLite stores UTF-8: a lone surrogate cannot be)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def token_hash(token: str) -> str:
    """The SHA-256 (hex) an invite token is stored and looked up by."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()
