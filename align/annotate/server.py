"""The annotation web app: a standard-library HTTP server, one page, a JSON API and the videos.

Routes (everything else is 404):

- ``GET /`` the page; ``GET /static/app.js``, ``/static/style.css`` its script and style.
- ``GET /api/info``: number of pairs, labels per pair, aspects.
- ``GET /api/next?annotator=NAME``: the pair to show (``null`` when done) and progress.
- ``POST /api/label`` ``{"annotator", "pair_id", "choice", "aspects"?, "comment"?}``: ``choice``
  and each aspect are ``left | right | tie`` as the annotator saw them (``choice`` may also be
  ``skip``); the server maps them to the dataset's ``a``/``b`` with the side it chose. Answers
  200 only after the label is committed; 400 for a malformed request (the body included: not
  JSON, nested too deeply, a number too long, a lone surrogate), 404 for an unknown pair, 409
  for a second label of the same pair by the same annotator (``"reason": "duplicate"``) or for
  a pair that already has its ``per_pair`` labels from others (``"reason": "pair_complete"``).
  Nothing is written unless the answer is 200.
- ``POST /api/undo`` ``{"annotator"}``: undo that annotator's last label; 409 if there is none.
- ``GET /api/stats``: agreement statistics.
- ``GET /media/<root>/<path>``: a video of a pair, from the dataset root (``data``) or the
  cache (``cache``), with ``Range`` support (206) so that browsers can seek.

Media requests are refused (403) when a path segment is empty, ``.`` or ``..`` (after
percent-decoding), or when the path resolves, symlinks followed, outside its root; a path
inside the root that is not a video of some pair is 404. Bound to a loopback address the
server also checks the ``Host`` header (against DNS rebinding), and every POST must be
``application/json`` from the same origin (a cross-site form cannot post labels).

Bursts and slow clients. The listen queue holds :data:`LISTEN_BACKLOG` connections; at most
``max_connections`` (:data:`MAX_CONNECTIONS`) are served at once, each by a thread, and a
connection beyond that is answered 503 at once (``Retry-After: 1``) without a thread. A
request (its line, headers and body; on a kept-alive connection the wait for it too) must
arrive within ``request_timeout`` seconds (:data:`REQUEST_TIMEOUT`) in all, however slowly
it trickles in; otherwise the connection is closed (408 when the body was late), so idle or
slow clients, authenticated or not, cannot hold threads.

Access control. With a shared secret (``--secret``) or invite tokens required
(``--require-invite``; tokens from ``vidalign annotate invite NAME``, kept hashed in the
database) every request -- the page, its script, the videos, the API, label POSTs -- must
carry a valid token: ``Authorization: Bearer T`` or ``X-Vidalign-Token: T``, the query
parameter ``?token=T``, or the cookie the server sets (``HttpOnly; SameSite=Lax``, one name per
port) on the first request that brought a valid token some other way. A request without a
valid token is answered 401 before its body is read, and nothing is written. An invite
token names its annotator: the labels and the API calls made with it are that annotator's
(a request naming someone else is 403), and ``/api/info`` tells the page who it is. A shared
secret lets people type their names as on loopback. Binding anything but a loopback address
without access control is refused (:func:`make_server` raises ``ValueError``).
"""

from __future__ import annotations

import hmac
import io
import ipaddress
import json
import os
import re
import signal
import socket
import sys
import threading
import time
from http import HTTPStatus
from http.cookies import CookieError, SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

from align.annotate.pairs import inside
from align.annotate.stats import json_safe, store_stats
from align.annotate.storage import ASPECTS, DuplicateLabelError, LabelStore, PairCompleteError, UnknownPairError

STATIC = Path(__file__).parent / "static"
STATIC_FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/static/style.css": ("style.css", "text/css; charset=utf-8"),
}
MIME = {".mp4": "video/mp4", ".webm": "video/webm", ".gif": "image/gif"}
MAX_BODY = 64 * 1024
MAX_COMMENT = 2000
MAX_NAME = 64
CHUNK = 256 * 1024
SIDES = ("left", "right", "tie")
MIN_SECRET = 12
COOKIE_PREFIX = "vidalign_token_"  # + the port: cookies are per host, not per port
COOKIE_MAX_AGE = 30 * 24 * 3600
LISTEN_BACKLOG = 128  # connections the kernel queues while the server accepts (a team's bursts)
MAX_CONNECTIONS = 256  # connections served at once (one thread each; a browser keeps a few open); more: 503
REQUEST_TIMEOUT = 20.0  # seconds for a whole request to arrive, and per write to a slow reader
_BUSY_BODY = b'{"ok": false, "error": "the server is busy; try again in a moment"}'
BUSY_RESPONSE = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
    b"Cache-Control: no-store\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY)
)
UNAUTHORIZED_PAGE = (
    "<!doctype html><meta charset='utf-8'><title>vidalign annotate</title>"
    "<h1>This annotation app needs an invite link</h1>"
    "<p>Open the link you were sent (it ends in <code>?token=...</code>). "
    "The person running the study makes one with <code>vidalign annotate invite YOUR_NAME --db DB</code>.</p>"
)


class BadRequest(Exception):
    """A request the client got wrong: answered with ``status`` and ``message`` (and a
    machine-readable ``reason`` when the page acts on it), nothing written."""

    def __init__(self, status: int, message: str, reason: str | None = None):
        super().__init__(message)
        self.status, self.message, self.reason = status, message, reason

    def body(self) -> dict:
        """The JSON answer: ``{"ok": false, "error": message[, "reason": reason]}``."""
        return {"ok": False, "error": self.message, **({"reason": self.reason} if self.reason else {})}


class AnnotateApp:
    """What the handler needs: the store, the served roots and the set of servable videos."""

    def __init__(
        self,
        store: LabelStore,
        roots: dict[str, Path],
        per_pair: int = 1,
        secret: str | None = None,
        require_invite: bool = False,
    ):
        if per_pair < 1:
            raise ValueError(f"labels per pair must be >= 1, got {per_pair}")
        check_secret(secret)
        self.secret = secret
        #: whether every request needs a token (the shared secret or an invite of ``store``)
        self.protected = secret is not None or require_invite
        self.store = store
        self.roots = {k: Path(os.path.realpath(v)) for k, v in roots.items()}
        self.per_pair = per_pair
        self.pairs = {p["id"]: p for p in store.pairs()}
        self.media = {m for p in self.pairs.values() for m in (p["media_a"], p["media_b"])}
        self.allowed_hosts: set[str] | None = None  # set by make_server for loopback binds
        store.set_meta(per_pair=str(per_pair))

    # ------------------------------------------------------------------------------------
    # API

    def info(self, bound: str | None = None) -> dict:
        """Pairs, labels per pair, aspects; ``annotator``: the name an invite token binds (else null)."""
        return {
            "pairs": len(self.pairs),
            "per_pair": self.per_pair,
            "aspects": list(ASPECTS),
            "access": "token" if self.protected else "open",
            "annotator": bound,
        }

    def check_token(self, token: str) -> tuple[bool, str | None]:
        """``(valid, annotator)``: the shared secret is valid without a name, a live invite token
        with its annotator's name; anything else is invalid."""
        if self.secret is not None and hmac.compare_digest(token.encode(), self.secret.encode()):
            return True, None
        name = self.store.invite_annotator(token)
        return name is not None, name

    def display(self, pair: dict, annotator: str) -> dict:
        """A pair as the annotator sees it: the left/right sides chosen for them."""
        left = self.store.left_video(annotator, pair["id"])
        right = "b" if left == "a" else "a"
        return {
            "id": pair["id"],
            "prompt": pair["prompt"],
            "left": self._video(pair[f"media_{left}"]),
            "right": self._video(pair[f"media_{right}"]),
        }

    @staticmethod
    def _video(media: str) -> dict:
        return {"url": "/media/" + media, "type": MIME.get(Path(media).suffix.lower(), "application/octet-stream")}

    def next(self, annotator: str) -> dict:
        """The pair to show ``annotator`` next and their progress."""
        pair, progress = self.store.next_pair(annotator, self.per_pair)
        return {"pair": self.display(pair, annotator) if pair else None, "progress": progress}

    def label(self, body: dict, bound: str | None = None) -> dict:
        """Validate a label request completely, then write it (one transaction). ``bound`` is
        the annotator of the request's invite token, if any."""
        annotator = _annotator(body.get("annotator"), bound)
        _only(body, {"annotator", "pair_id", "choice", "aspects", "comment"})
        pid = body.get("pair_id")
        if not isinstance(pid, int) or isinstance(pid, bool):
            raise BadRequest(400, f"pair_id must be an integer, got {pid!r}")
        choice = body.get("choice")
        if choice not in (*SIDES, "skip"):
            raise BadRequest(400, f"choice must be one of left, right, tie, skip; got {choice!r}")
        aspects = body.get("aspects") or {}
        if not isinstance(aspects, dict):
            raise BadRequest(400, "aspects must be an object")
        for k, v in aspects.items():
            if k not in ASPECTS:
                raise BadRequest(400, f"unknown aspect {k!r}; aspects are {list(ASPECTS)}")
            if v is not None and v not in SIDES:
                raise BadRequest(400, f"aspect {k} must be left, right, tie or null; got {v!r}")
        comment = body.get("comment", "")
        if not isinstance(comment, str) or len(comment) > MAX_COMMENT:
            raise BadRequest(400, f"comment must be a string of at most {MAX_COMMENT} characters")
        if pid not in self.pairs:
            raise BadRequest(404, f"no pair with id {pid}")
        left = self.store.left_video(annotator, pid)
        right = "b" if left == "a" else "a"
        side = {"left": left, "right": right, "tie": "tie", "skip": "skip", None: None}
        try:
            label_id = self.store.add_label(
                annotator,
                pid,
                side[choice],
                left,
                {k: side[v] for k, v in aspects.items()},
                comment.strip(),
                per_pair=self.per_pair,
            )
        except DuplicateLabelError as e:
            raise BadRequest(409, str(e), "duplicate") from None
        except PairCompleteError as e:
            raise BadRequest(409, str(e), "pair_complete") from None
        except UnknownPairError as e:
            raise BadRequest(404, str(e)) from None
        except ValueError as e:  # text the database cannot store
            raise BadRequest(400, str(e)) from None
        return {"ok": True, "label_id": label_id, "progress": self.store.progress(annotator, self.per_pair)}

    def undo(self, body: dict, bound: str | None = None) -> dict:
        """Undo the annotator's last label; the pair comes back with the same sides."""
        annotator = _annotator(body.get("annotator"), bound)
        _only(body, {"annotator"})
        undone = self.store.undo_last(annotator)
        if undone is None:
            raise BadRequest(409, f"{annotator} has no label to undo")
        pair = self.pairs[undone["pair_id"]]
        return {
            "ok": True,
            "undone": {"label_id": undone["id"], "pair_id": undone["pair_id"]},
            "pair": self.display(pair, annotator),
            "progress": self.store.progress(annotator, self.per_pair),
        }

    def stats(self) -> dict:
        return json_safe(store_stats(self.store))

    # ------------------------------------------------------------------------------------
    # media

    def media_file(self, path: str) -> Path:
        """The file behind ``/media/<root>/<path>`` (``path`` percent-decoded), or BadRequest."""
        root_name, _, rel = path.partition("/")
        root = self.roots.get(root_name)
        if root is None:
            raise BadRequest(404, "no such media root")
        parts = rel.split("/")
        if any(p in ("", ".", "..") or "\\" in p or "\0" in p for p in parts):
            raise BadRequest(403, "refused: media paths are relative, without '.', '..' or empty segments")
        real = inside(root.joinpath(*parts), root)
        if real is None:
            raise BadRequest(403, "refused: the path leads outside the media root")
        if f"{root_name}/{real.relative_to(root).as_posix()}" not in self.media or not real.is_file():
            raise BadRequest(404, "not a video of any pair")
        return real


def check_secret(secret: str | None) -> None:
    """Raise ``ValueError`` for a shared secret too short or with spaces or control characters."""
    if secret is not None and (len(secret) < MIN_SECRET or any(not c.isprintable() or c.isspace() for c in secret)):
        raise ValueError(
            f"--secret must be at least {MIN_SECRET} printable characters without spaces "
            '(make one with: python -c "import secrets; print(secrets.token_urlsafe())")'
        )


def _annotator(name, bound: str | None = None) -> str:
    """The annotator a request acts for: ``bound`` (an invite token's name) when set, and then
    ``name`` must be absent or the same; otherwise ``name``, checked."""
    if bound is not None:
        if name is None or (isinstance(name, str) and name.strip() in ("", bound)):
            return bound
        raise BadRequest(403, f"this invite belongs to {bound!r}; it cannot act for {name!r}")
    if not isinstance(name, str) or not name.strip():
        raise BadRequest(400, "annotator must be a non-empty name")
    name = name.strip()
    if len(name) > MAX_NAME or any(not c.isprintable() for c in name):
        raise BadRequest(400, f"annotator names are at most {MAX_NAME} printable characters")
    return name


def _only(body: dict, keys: set[str]) -> None:
    extra = sorted(set(body) - keys)
    if extra:
        raise BadRequest(400, f"unknown field(s) {extra}")


def _split_url(raw: str):
    """``urlsplit(raw)``; a malformed URL (e.g. ``//[x``) is a 400, not a traceback."""
    try:
        return urlsplit(raw)
    except ValueError:
        raise BadRequest(400, "malformed request path") from None


class _DeadlineReader(io.RawIOBase):
    """A connection's reading side that gives each request until its handler's ``deadline``
    (``time.monotonic()``) in all: every read waits at most the time left, so a client that
    trickles a byte at a time cannot stretch a request beyond it (a plain socket timeout is
    per read). Past the deadline a read raises ``TimeoutError``."""

    def __init__(self, sock: socket.socket, handler: Handler):
        super().__init__()
        self._sock, self._handler = sock, handler

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        left = self._handler.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request did not arrive in time")
        self._sock.settimeout(left)
        try:
            return self._sock.recv_into(buffer)
        finally:
            self._sock.settimeout(self._handler.timeout)  # writes: per write, as usual


def parse_range(header: str | None, size: int) -> tuple[int, int] | None | str:
    """``(first, last)`` byte positions (inclusive) of a single ``bytes=`` range, ``None`` to
    send the whole file (no header, or one this server does not honour such as several
    ranges, which HTTP allows), or ``"unsatisfiable"`` (answer 416)."""
    if not header:
        return None
    m = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", header)
    if not m or (not m[1] and not m[2]):
        return None
    if not m[1]:  # the last N bytes
        n = int(m[2])
        return (max(0, size - n), size - 1) if n > 0 and size > 0 else "unsatisfiable"
    first = int(m[1])
    last = min(int(m[2]), size - 1) if m[2] else size - 1
    if m[2] and int(m[2]) < first:
        return None  # syntactically invalid: ignore the header
    return (first, last) if first < size else "unsatisfiable"


class Handler(BaseHTTPRequestHandler):
    """Routes requests to the :class:`AnnotateApp` in ``self.server.app``."""

    server_version = "vidalign-annotate"
    protocol_version = "HTTP/1.1"

    @property
    def app(self) -> AnnotateApp:
        return self.server.app  # type: ignore[attr-defined]

    def setup(self) -> None:
        """The socket timeout (writes) and the per-request deadline on reads (see
        :class:`_DeadlineReader`), from the server's ``request_timeout``."""
        self.timeout = getattr(self.server, "request_timeout", REQUEST_TIMEOUT)
        self.deadline = time.monotonic() + self.timeout
        super().setup()
        self.rfile.close()  # the plain reader; the socket stays open
        self.rfile = io.BufferedReader(_DeadlineReader(self.connection, self))

    def handle_one_request(self) -> None:
        """One request, which (its wait on a kept-alive connection included) must arrive
        within ``timeout`` seconds; a late one closes the connection (the base class)."""
        self.deadline = time.monotonic() + self.timeout
        super().handle_one_request()

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the base class's name)
        if getattr(self.server, "verbose", False):
            super().log_message(format, *args)

    # ------------------------------------------------------------------------------------

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._handle(head=False)

    def do_HEAD(self) -> None:  # noqa: N802
        self._handle(head=True)

    def do_POST(self) -> None:  # noqa: N802
        self._cookie = None
        try:
            path = _split_url(self.path).path
            self._check_host()
            bound = self._authorize()  # before the body is read: an unauthorised one is never parsed
            body = self._json_body()
            if path == "/api/label":
                self._send_json(200, self.app.label(body, bound))
            elif path == "/api/undo":
                self._send_json(200, self.app.undo(body, bound))
            else:
                raise BadRequest(404, "no such endpoint")
        except BadRequest as e:
            self._send_json(e.status, e.body())
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True  # the client went away, or reads our answer too slowly
        except Exception as e:  # a bug or a locked database: 500, never a silent success
            self.close_connection = True
            self._send_json(500, {"ok": False, "error": f"{type(e).__name__}: {e}"})
            raise

    def _handle(self, head: bool) -> None:
        self._cookie = None
        path = None
        try:
            url = _split_url(self.path)
            path = url.path
            self._check_host()
            bound = self._authorize()
            if path in STATIC_FILES:
                name, ctype = STATIC_FILES[path]
                self._send_bytes(200, (STATIC / name).read_bytes(), ctype, head)
            elif path == "/api/info":
                self._send_json(200, self.app.info(bound), head)
            elif path == "/api/next":
                names = parse_qs(url.query).get("annotator", [])
                self._send_json(200, self.app.next(_annotator(names[0] if names else None, bound)), head)
            elif path == "/api/stats":
                self._send_json(200, self.app.stats(), head)
            elif path.startswith("/media/"):
                self._send_file(self.app.media_file(unquote(path[len("/media/") :])), head)
            else:
                raise BadRequest(404, "not found")
        except BadRequest as e:
            if e.status == 401 and path == "/":  # a person opened the page without a link: say what to do
                self._send_bytes(401, UNAUTHORIZED_PAGE.encode(), "text/html; charset=utf-8", head)
            else:
                self._send_json(e.status, e.body(), head)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True  # the browser stopped reading (e.g. seeking a video), or too slowly
        except Exception as e:  # a bug or a locked database: 500, then the traceback on stderr
            self.close_connection = True
            self._send_json(500, {"ok": False, "error": f"{type(e).__name__}: {e}"}, head)
            raise

    # ------------------------------------------------------------------------------------

    def _check_host(self) -> None:
        allowed = self.app.allowed_hosts
        if allowed is not None and (self.headers.get("Host") or "").lower() not in allowed:
            raise BadRequest(403, "Host not allowed (the app answers only to its loopback address)")

    def _authorize(self) -> str | None:
        """Check the request's token when the app is protected (raise 401 without a valid one);
        return the annotator its invite names (``None`` for the shared secret or an open app).
        A token that came by header or query is set as the cookie on the response."""
        if not self.app.protected:
            return None
        token, source = self._token()
        if token is None:
            self.close_connection = True  # a POST body stays unread: this connection cannot go on
            raise BadRequest(401, "this app needs an access token (open the invite link you were sent)")
        ok, name = self.app.check_token(token)
        if not ok:
            self.close_connection = True
            raise BadRequest(401, "invalid or revoked access token")
        if source != "cookie":
            self._cookie = token
        return name

    def _token(self) -> tuple[str | None, str | None]:
        """``(token, where it came from)``: a header first, then ``?token=``, then the cookie."""
        auth = self.headers.get("Authorization") or ""
        if auth[:7].lower() == "bearer " and auth[7:].strip():
            return auth[7:].strip(), "header"
        if self.headers.get("X-Vidalign-Token"):
            return self.headers["X-Vidalign-Token"].strip(), "header"
        query = parse_qs(_split_url(self.path).query).get("token")
        if query:
            return query[0], "query"
        try:
            cookie = SimpleCookie(self.headers.get("Cookie") or "").get(self._cookie_name())
        except CookieError:
            cookie = None
        return (cookie.value, "cookie") if cookie is not None and cookie.value else (None, None)

    def _cookie_name(self) -> str:
        return f"{COOKIE_PREFIX}{self.server.server_address[1]}"

    def _common_headers(self) -> None:
        """Headers of every response: the token cookie to set, if any; 401's challenge."""
        if getattr(self, "_cookie", None):
            self.send_header(
                "Set-Cookie",
                f"{self._cookie_name()}={self._cookie}; Path=/; Max-Age={COOKIE_MAX_AGE}; HttpOnly; SameSite=Lax",
            )

    def _json_body(self) -> dict:
        """The POST body as a JSON object; every way it can be wrong is a 4xx (:class:`BadRequest`)."""
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        length = self.headers.get("Content-Length")
        if length is None or not (length.isascii() and length.isdigit()):
            self.close_connection = True
            raise BadRequest(411, "a Content-Length is required")
        n = int(length)
        if n > MAX_BODY:
            self.close_connection = True  # the body is not read: this connection cannot go on
            raise BadRequest(413, f"request body over {MAX_BODY} bytes")
        try:
            raw = self.rfile.read(n)
        except TimeoutError:
            self.close_connection = True
            raise BadRequest(408, f"the request body did not arrive within {self.timeout:g} s") from None
        if len(raw) < n:
            self.close_connection = True
            raise BadRequest(400, f"the body ended after {len(raw)} of its {n} bytes")
        if ctype != "application/json":
            raise BadRequest(415, "POST bodies must be application/json")
        origin = self.headers.get("Origin")
        if origin is not None and _origin_host(origin) != (self.headers.get("Host") or "").lower():
            raise BadRequest(403, "cross-origin request refused")
        return parse_json_object(raw)

    def _send_json(self, status: int, obj, head: bool = False) -> None:
        data = json.dumps(json_safe(obj), allow_nan=False).encode()
        self._send_bytes(status, data, "application/json", head)

    def _send_bytes(self, status: int, data: bytes, ctype: str, head: bool = False) -> None:
        self.send_response(status)
        if status == 401:
            self.send_header("WWW-Authenticate", 'Bearer realm="vidalign-annotate"')
        else:
            self._common_headers()
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if not head:
            self.wfile.write(data)

    def _send_file(self, path: Path, head: bool) -> None:
        size = path.stat().st_size
        rng = parse_range(self.headers.get("Range"), size)
        if rng == "unsatisfiable":
            self.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
            self.send_header("Content-Range", f"bytes */{size}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        first, last = rng if rng else (0, size - 1)
        length = last - first + 1 if size else 0
        self.send_response(206 if rng else 200)
        self._common_headers()
        self.send_header("Content-Type", MIME.get(path.suffix.lower(), "application/octet-stream"))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(length))
        self.send_header("X-Content-Type-Options", "nosniff")
        if rng:
            self.send_header("Content-Range", f"bytes {first}-{last}/{size}")
        self.end_headers()
        if head:
            return
        with open(path, "rb") as f:
            f.seek(first)
            left = length
            while left > 0:
                chunk = f.read(min(CHUNK, left))
                if not chunk:
                    break
                self.wfile.write(chunk)
                left -= len(chunk)


def _origin_host(origin: str) -> str | None:
    """The ``host[:port]`` of an ``Origin`` header, lower-cased; ``None`` when it is malformed."""
    try:
        return urlsplit(origin).netloc.lower()
    except ValueError:
        return None


def parse_json_object(raw: bytes) -> dict:
    """``raw`` (UTF-8 JSON) as a dict, or ``BadRequest(400)`` saying what is wrong: not UTF-8
    or not JSON, nested too deeply, a number too long to read (over Python's 4,300 digits), a
    string with a lone surrogate (not storable), or not an object."""
    try:
        body = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadRequest(400, f"body is not JSON: {e}") from None
    except RecursionError:
        raise BadRequest(400, "body is nested too deeply") from None
    except ValueError:  # int() of a number over sys.get_int_max_str_digits() digits
        raise BadRequest(400, "body holds a number too long to read") from None
    try:
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest(400, "body holds a lone surrogate (e.g. \\ud800): text must be valid Unicode") from None
    except (RecursionError, ValueError):
        raise BadRequest(400, "body is nested too deeply") from None
    if not isinstance(body, dict):
        raise BadRequest(400, "body must be a JSON object")
    return body


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class AnnotateHTTPServer(ThreadingHTTPServer):
    """The threading server with a team-sized listen queue, at most ``max_connections``
    connections served at once (a thread each; beyond that a 503 at once, no thread) and
    ``request_timeout`` (read by :class:`Handler`) for each request to arrive."""

    request_queue_size = LISTEN_BACKLOG
    daemon_threads = True

    def __init__(
        self,
        address,
        handler,
        max_connections: int = MAX_CONNECTIONS,
        request_timeout: float = REQUEST_TIMEOUT,
    ):
        if max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, got {max_connections}")
        if not request_timeout > 0:
            raise ValueError(f"request_timeout must be > 0 seconds, got {request_timeout}")
        self.max_connections, self.request_timeout = max_connections, float(request_timeout)
        self._slots = threading.BoundedSemaphore(max_connections)
        super().__init__(address, handler)

    def process_request(self, request, client_address) -> None:
        """A thread for the connection while fewer than ``max_connections`` are served, else 503."""
        if not self._slots.acquire(blocking=False):
            self._refuse_busy(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread started: give the slot back
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def _refuse_busy(self, request: socket.socket) -> None:
        """Answer 503 and close, in the accepting thread (the answer fits a socket buffer)."""
        try:
            request.setblocking(False)
            try:  # take what has arrived: closing with unread data would reset the connection
                request.recv(MAX_BODY + 16 * 1024)
            except OSError:
                pass
            request.settimeout(1.0)
            request.sendall(BUSY_RESPONSE)
        except OSError:
            pass
        self.shutdown_request(request)

    def handle_error(self, request, client_address) -> None:
        """A client that went away or was too slow is no error of the server's: not printed."""
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return
        super().handle_error(request, client_address)


class _AnnotateHTTPServerV6(AnnotateHTTPServer):
    address_family = socket.AF_INET6


def host_warning(host: str) -> str | None:
    """The warning to print when binding ``host`` exposes the (protected) app beyond this machine."""
    if is_loopback(host):
        return None
    return (
        f"warning: --host {host} is not a loopback address: the app is reachable from the network over plain "
        "HTTP, so tokens, videos and labels travel unencrypted (beyond a trusted network, put it behind an "
        "HTTPS reverse proxy)"
    )


def access_error(host: str) -> str:
    """Why ``host`` may not be bound without access control, and what to pass instead."""
    return (
        f"--host {host} is not a loopback address: anyone who can reach this machine could watch the videos "
        "and add labels. Serving beyond loopback needs access control: --secret S (a shared secret; links are "
        "http://HOST:PORT/?token=S) or per-annotator invites (`vidalign annotate invite NAME --db DB` prints "
        "each person's link; serve with --require-invite)"
    )


def make_server(
    app: AnnotateApp,
    host: str = "127.0.0.1",
    port: int = 0,
    verbose: bool = False,
    max_connections: int = MAX_CONNECTIONS,
    request_timeout: float = REQUEST_TIMEOUT,
) -> AnnotateHTTPServer:
    """A threading HTTP server for ``app`` bound to ``host:port`` (0: any free port); not started.
    ``max_connections`` and ``request_timeout``: see :class:`AnnotateHTTPServer`. Raises
    ``ValueError`` (before binding) for a non-loopback ``host`` when ``app`` is not protected."""
    if not is_loopback(host) and not app.protected:
        raise ValueError(access_error(host))
    server_class = _AnnotateHTTPServerV6 if ":" in host else AnnotateHTTPServer
    server = server_class((host, port), Handler, max_connections, request_timeout)
    server.app = app  # type: ignore[attr-defined]
    server.verbose = verbose  # type: ignore[attr-defined]
    port = server.server_address[1]
    if is_loopback(host):
        app.allowed_hosts = {f"{h}:{port}" for h in ("127.0.0.1", "localhost", "[::1]")}
    return server


def start_in_thread(server: AnnotateHTTPServer) -> threading.Thread:
    """Serve in a daemon thread (tests, notebooks); stop with ``server.shutdown()``."""
    t = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True, name="vidalign-annotate")
    t.start()
    return t


def serve(
    pairs: str | Path,
    db: str | Path,
    host: str = "127.0.0.1",
    port: int = 8765,
    per_pair: int = 1,
    root: str | Path | None = None,
    cache_format: str = "webm",
    verbose: bool = False,
    secret: str | None = None,
    require_invite: bool = False,
    max_connections: int | None = None,
    request_timeout: float | None = None,
) -> None:
    """Load ``pairs`` into the database ``db`` (first time) or check them (later), then serve
    until interrupted. Converted videos go to ``<db name>.videos/`` beside the database.
    ``secret`` / ``require_invite`` turn on access control (see the module docstring); a
    non-loopback ``host`` without either is refused before anything is loaded.
    ``max_connections`` / ``request_timeout`` (default: ``$VIDALIGN_ANNOTATE_MAX_CONNECTIONS``,
    ``$VIDALIGN_ANNOTATE_TIMEOUT``, else :data:`MAX_CONNECTIONS`, :data:`REQUEST_TIMEOUT`): see
    :class:`AnnotateHTTPServer`."""
    from align.annotate.pairs import load_pairs

    check_secret(secret)
    if max_connections is None:
        max_connections = int(_env_number("VIDALIGN_ANNOTATE_MAX_CONNECTIONS", MAX_CONNECTIONS, int))
    if request_timeout is None:
        request_timeout = _env_number("VIDALIGN_ANNOTATE_TIMEOUT", REQUEST_TIMEOUT, float)
    if not is_loopback(host) and secret is None and not require_invite:
        raise ValueError(access_error(host))
    warning = host_warning(host)
    if warning:
        print(warning, file=sys.stderr)
    db = Path(db)
    cache = db.parent / f"{db.stem}.videos"
    source = load_pairs(pairs, cache, root=root, cache_format=cache_format)
    store = LabelStore(db)
    store.sync_pairs(source.pairs, source.source, source.kind)
    app = AnnotateApp(store, source.roots, per_pair, secret=secret, require_invite=require_invite)
    server = make_server(app, host, port, verbose, max_connections, request_timeout)
    shown = f"[{host}]" if ":" in host else host
    base = f"http://{shown}:{server.server_address[1]}/"
    print(f"{len(app.pairs)} pairs, {per_pair} label(s) each; labels in {db}", flush=True)
    if app.protected:
        invited = store.invites()
        print(f"access control on: every request needs a token; {len(invited)} annotator(s) invited", flush=True)
        if secret is not None:
            print(f"team link (shared secret): {base}?token={quote(secret, safe='')}", flush=True)
        if not invited and secret is None:
            print(f"no invites yet: `vidalign annotate invite NAME --db {db}` prints a link", file=sys.stderr)
    print(f"serving on {base}  (Ctrl-C to stop)", flush=True)
    if threading.current_thread() is threading.main_thread():
        # Ctrl-C / SIGINT stops the server also when it was started with SIGINT ignored (a
        # background job of a script inherits that; Python then installs no KeyboardInterrupt
        # handler, and SIGINT would do nothing)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def _env_number(name: str, default: float, cast: type = float) -> float:
    """The positive number in the environment variable ``name`` (``default`` when unset);
    anything else is a ``ValueError`` naming the variable."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = cast(raw)
    except ValueError:
        value = None
    if value is None or not value > 0:
        raise ValueError(f"{name}={raw!r}: expected a positive {'integer' if cast is int else 'number'}")
    return value


def invite_link(base_url: str | None, token: str) -> str:
    """The link an invited annotator opens: ``BASE/?token=TOKEN`` (default base: this machine's
    host name on the default port; pass the address annotators really reach)."""
    base = base_url or f"http://{socket.gethostname()}:8765"
    url = urlsplit(base)
    if url.scheme not in ("http", "https") or not url.netloc or url.path not in ("", "/") or url.query:
        raise ValueError(
            f"--base-url must be http(s)://HOST:PORT, the app's own root (it serves absolute paths), got {base!r}"
        )
    return f"{url.scheme}://{url.netloc}/?token={quote(token, safe='')}"
