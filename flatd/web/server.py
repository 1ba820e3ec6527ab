"""The HTTP server: the standard library's ThreadingHTTPServer, hardened a little.

Each request runs in a thread of its own, so a slow client never holds the service (nor
another client): sockets time out, connections are capped, one request per connection.
GET and HEAD only; every request carries the token when one is set.
"""

from __future__ import annotations

import hmac
import os
import re
import socket
import socketserver
import sqlite3
import stat
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable, Optional
from urllib.parse import parse_qs, quote, urlsplit

from flatd.errors import FlatdError

REQUEST_TIMEOUT = 10.0  # seconds a client may take between two reads of its request
MAX_CONNECTIONS = 32  # at once; more are closed unanswered
MAX_TARGET = 2048  # characters of the request target (path and query)
MAX_HEADER_BYTES = 16384  # of all the request's headers together
MAX_PREVIEW_BYTES = 32 * 2**20
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JOB_ID = re.compile(r"^/preview/([0-9a-f]{8,64})$")
SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; "
                               "frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
}


class WebError(FlatdError):
    """The endpoint cannot start (the address is taken, not this machine's...)."""


@dataclass
class Response:
    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: dict = field(default_factory=dict)


def text(status: int, message: str, **headers) -> Response:
    return Response(status, (message.rstrip("\n") + "\n").encode(), headers=headers)


# ---------------------------------------------------------------------- the application


class WebApp:
    """Routes a request to its answer: /, /healthz, /metrics, /preview/<job id>.

    `rules()` gives the rules in force (state folder, settle, http settings), `health()`
    the reasons the service is not healthy (an empty list: it is)."""

    ENDPOINTS = {"/": "page", "/healthz": "healthz", "/metrics": "metrics"}

    def __init__(self, rules: Callable, health: Callable[[], list], metrics):
        self.rules = rules
        self.health = health
        self.metrics = metrics

    def answer(self, target: str, headers) -> tuple[str, Response]:
        """(endpoint label, response) for a GET of `target` with `headers`."""
        if len(target) > MAX_TARGET:
            return "other", text(414, "request target too long")
        try:
            parts = urlsplit(target)
            query = parse_qs(parts.query, max_num_fields=10)
        except ValueError:
            return "other", text(400, "bad request target")
        path = parts.path
        if not self.authorized(headers, query):
            return "denied", text(401, "a token is required: Authorization: Bearer TOKEN, or ?token=TOKEN",
                                  **{"WWW-Authenticate": 'Bearer realm="flatd"'})
        link = self._linker(query)
        endpoint = self.ENDPOINTS.get(path) or ("preview" if path.startswith("/preview/") else "other")
        if endpoint == "page":
            return endpoint, self.page(link)
        if endpoint == "healthz":
            return endpoint, self.healthz()
        if endpoint == "metrics":
            return endpoint, self.metrics_text()
        if endpoint == "preview":
            return endpoint, self.preview(path)
        return endpoint, text(404, "not found")

    def authorized(self, headers, query: dict) -> bool:
        """True without a token; else when the header or ?token= carries it."""
        token = self.rules().http.token
        if not token:
            return True
        given = []
        auth = headers.get("Authorization", "") or ""
        if auth[:7].lower() == "bearer ":
            given.append(auth[7:].strip())
        given.extend(query.get("token", [])[:1])
        return any(hmac.compare_digest(g.encode("utf-8", "replace"), token.encode()) for g in given)

    def _linker(self, query: dict) -> Callable[[str], str]:
        """Links on the page keep ?token= when the page was asked for with it."""
        token = self.rules().http.token
        carried = token and query.get("token", [None])[0] == token
        return (lambda path: f"{path}?token={quote(token, safe='')}") if carried else (lambda path: path)

    def page(self, link) -> Response:
        from flatd.web.page import context, render

        rules = self.rules()
        html = render(context(rules, self.metrics, link, rules.http.refresh, self.health()))
        return Response(200, html.encode("utf-8"), "text/html; charset=utf-8")

    def healthz(self) -> Response:
        problems = self.health()
        if not problems:
            return text(200, "ok")
        return text(503, "unhealthy: " + "; ".join(problems))

    def metrics_text(self) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        from flatd.web.page import open_ledger

        ledger = open_ledger(self.rules().state)
        try:
            self.metrics.refresh_from(ledger)
        except sqlite3.Error:
            pass  # the very first start is still creating the tables: the counters all the same
        finally:
            if ledger is not None:
                ledger.close()
        return Response(200, self.metrics.exposition(), CONTENT_TYPE_LATEST)

    def preview(self, path: str) -> Response:
        """The PNG recorded beside the master of a job; nothing else is ever read."""
        from flatd.web.page import master_of, open_ledger, preview_path

        match = JOB_ID.match(path)
        if match is None:
            return text(404, "not found")
        ledger = open_ledger(self.rules().state)
        if ledger is None:
            return text(404, "no such master")
        try:
            master = master_of(ledger, match.group(1))
        finally:
            ledger.close()
        data = read_png(preview_path(master)) if master is not None else None
        if data is None:
            return text(404, "no preview for this job")
        return Response(200, data, "image/png")


def read_png(path: Path) -> Optional[bytes]:
    """A regular file's bytes when it is a PNG of sensible size (no link followed, no FIFO
    waited on); None otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_PREVIEW_BYTES:
            return None
        with os.fdopen(os.dup(fd), "rb") as handle:
            data = handle.read(MAX_PREVIEW_BYTES + 1)
    except OSError:
        return None
    finally:
        os.close(fd)
    return data if data.startswith(PNG_SIGNATURE) and len(data) <= MAX_PREVIEW_BYTES else None


# ---------------------------------------------------------------------- HTTP


class Handler(BaseHTTPRequestHandler):
    """One request: checks of size and method, then WebApp.answer()."""

    server_version = "flatd"
    sys_version = ""
    protocol_version = "HTTP/1.0"  # one request per connection: no idle keep-alive threads
    timeout = REQUEST_TIMEOUT

    def do_GET(self) -> None:
        self._serve(head=False)

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def _not_allowed(self) -> None:
        self._send("other", text(405, "read-only: GET and HEAD only", Allow="GET, HEAD"), False)

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_TRACE = do_CONNECT = _not_allowed

    def _serve(self, head: bool) -> None:
        if sum(len(k) + len(v) + 4 for k, v in self.headers.items()) > MAX_HEADER_BYTES:
            return self._send("other", text(431, "request headers too large"), head)
        try:
            endpoint, response = self.server.app.answer(self.path, self.headers)
        except Exception as exc:  # noqa: BLE001 - a bug answers 500, the service goes on
            from flatd.notify.events import WARNING, notice

            notice("http_error", f"the HTTP endpoint failed on a request: {type(exc).__name__}: {exc}", WARNING,
                   error=type(exc).__name__)
            endpoint, response = "other", text(500, "internal error")
        self._send(endpoint, response, head)

    def _send(self, endpoint: str, response: Response, head: bool) -> None:
        self.send_response(response.status)
        headers = {**SECURITY_HEADERS, "Content-Type": response.content_type,
                   "Content-Length": str(len(response.body)), **response.headers}
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if not head:
            self.wfile.write(response.body)
        metrics = getattr(self.server.app, "metrics", None)
        if metrics is not None:
            metrics.requests.labels(endpoint=endpoint, code=str(response.status)).inc()

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
        """Requests are not logged line by line (a scraper every 15 s would flood the journal)."""


class Server(ThreadingHTTPServer):
    """ThreadingHTTPServer with a cap on connections and no reverse DNS at bind."""

    daemon_threads = True
    block_on_close = False  # stopping never waits for a slow client
    allow_reuse_address = True
    request_queue_size = 16

    def __init__(self, address: tuple, family: int, app: WebApp, max_connections: int = MAX_CONNECTIONS):
        self.address_family = family
        self.app = app
        self.slots = threading.BoundedSemaphore(max_connections)
        super().__init__(address, Handler)

    def server_bind(self) -> None:
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])

    def process_request(self, request, client_address) -> None:
        if not self.slots.acquire(blocking=False):
            self.shutdown_request(request)  # too many at once: closed unanswered
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def handle_error(self, request, client_address) -> None:
        """A client that went away is no news; anything else is one log line (never a
        traceback on stderr, where the service's log lines go)."""
        import sys

        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):
            return
        from flatd.notify.events import WARNING, notice

        notice("http_error", f"the HTTP endpoint failed on a request: {type(exc).__name__}: {exc}", WARNING,
               error=type(exc).__name__)


def resolve(host: str, port: int) -> tuple[int, tuple]:
    """(address family, socket address) for `host`:`port`; WebError when it does not resolve."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (OSError, UnicodeError) as exc:
        raise WebError(f"at 'http.listen': cannot resolve {host}: {getattr(exc, 'strerror', None) or exc}") from None
    family, _, _, _, address = infos[0]
    return family, address[:2]


class WebServer:
    """The endpoint's life: bind at start (WebError says why it cannot), serve in a thread, stop."""

    def __init__(self, host: str, port: int, app: WebApp, max_connections: int = MAX_CONNECTIONS):
        self.on_stop: list[Callable[[], None]] = []  # called first at stop()
        family, address = resolve(host, port)
        try:
            self.httpd = Server(address, family, app, max_connections)
        except OSError as exc:
            raise WebError(f"at 'http.listen': cannot listen on {format_address(host, port)}: "
                           f"{exc.strerror or exc}") from None
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                       name="flatd-http", daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.httpd.server_address[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        return f"http://{format_address(*self.address)}/"

    def start(self) -> "WebServer":
        self.thread.start()
        return self

    def stop(self) -> None:
        """Stop serving (within about half a second) and close the socket."""
        while self.on_stop:
            self.on_stop.pop()()
        if self.thread.is_alive():
            self.httpd.shutdown()
            self.thread.join(5.0)
        self.httpd.server_close()


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
