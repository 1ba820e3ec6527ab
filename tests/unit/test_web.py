"""flatd.web: the HTTP endpoint of flatd watch, served in-process on 127.0.0.1:0 against a
ledger made here: /healthz, /metrics, the status page, previews, tokens, hostile requests."""

from __future__ import annotations

import http.client
import os
import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from flatd.config import parse_rules
from flatd.ledger import Ledger
from flatd.notify import events as E
from flatd.web import WebApp, WebServer
from flatd.web import server as web_server
from flatd.web.health import observer_problems, service_problems, state_problems
from flatd.web.metrics import REASON_KINDS, Metrics, reason_kind
from flatd.web.page import quality_verdict

GOOD_JOB = "abcdef0123456789"
FAILED_JOB = "0123456789abcdef"
TOKEN = "s3cret-token-for-tests_0123456789"


# --------------------------------------------------------------------------- set-up


def png_bytes(size=(8, 6)) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", size, 128).save(buffer, format="PNG")
    return buffer.getvalue()


def make_ledger(root: Path) -> Path:
    """A state folder with one master (and its preview), one failed job, two flats waiting."""
    state, cap = root / "state", root / "cap"
    masters = cap / "masters"
    masters.mkdir(parents=True)
    ledger = Ledger.open(state)
    try:
        ledger.plan_job(GOOD_JOB, "R 1x1 -10C", None, cap, masters, "FLAT-R.fits", [])
        ledger.master_written(GOOD_JOB, masters / "FLAT-R.fits", "R 1x1 -10C", 7)
        ledger.set_state(GOOD_JOB, "done")
        (masters / "FLAT-R.fits").write_bytes(b"SIMPLE")
        (masters / "FLAT-R.preview.png").write_bytes(png_bytes())
        ledger.plan_job(FAILED_JOB, "G 1x1 -10C", None, cap, masters, "FLAT-G.fits", [])
        ledger.set_state(FAILED_JOB, "failed", "nothing left to normalize after the pedestal")
        for i in range(2):
            ledger.frame_ready(cap / "night" / f"flat_{i}.fits", 100, 1.0, cap, "flat")
        ledger.folder_ready(cap, time.time())
    finally:
        ledger.close()
    return state


def make_rules(root: Path, token=None, refresh=30):
    text = f"capture:\n  - path: {root / 'cap'}\nstate: {root / 'state'}\nsettle: 10m\n" \
           f"http: {{listen: '127.0.0.1:0', refresh: {refresh}" + (f", token: {token}" if token else "") + "}\n"
    return parse_rules(text)


class Endpoint:
    """A WebServer in this process, and small clients for it."""

    def __init__(self, root: Path, token=None, health=None, max_connections=32):
        self.root = root
        self.rules = make_rules(root, token)
        self.metrics = Metrics()
        self.unsubscribe = E.subscribe(self.metrics)
        health = health or (lambda: state_problems(self.rules.state))
        self.server = WebServer("127.0.0.1", 0, WebApp(lambda: self.rules, health, self.metrics),
                                max_connections=max_connections).start()
        self.port = self.server.address[1]

    def get(self, path: str, headers=None, method="GET") -> tuple[int, dict, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request(method, path, headers=headers or {})
            response = conn.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            conn.close()

    def raw(self, data: bytes, timeout=10.0) -> bytes:
        """Send bytes as they are; everything the server answers until it closes."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as sock:
            try:
                sock.sendall(data)
            except OSError:
                pass  # it may close before reading it all
            return _read_all(sock)

    def close(self) -> None:
        self.unsubscribe()
        self.server.stop()


def _read_all(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, socket.timeout):
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def status_of(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1]) if raw.startswith(b"HTTP/") else 0


@pytest.fixture
def endpoint(tmp_path):
    make_ledger(tmp_path)
    made = []

    def start(**kwargs) -> Endpoint:
        made.append(Endpoint(tmp_path, **kwargs))
        return made[-1]

    yield start
    for e in made:
        e.close()


def samples(body: bytes) -> dict:
    """{(name, labels as sorted tuple): value} from the Prometheus text format."""
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


# --------------------------------------------------------------------------- /healthz


def test_healthz_is_ok_while_the_state_folder_is_writable(endpoint, tmp_path):
    e = endpoint()
    status, headers, body = e.get("/healthz")
    assert (status, body) == (200, b"ok\n")
    assert headers["Content-Type"].startswith("text/plain")
    assert not [p for p in (tmp_path / "state").iterdir() if p.name.startswith(".flatd-health")], "probe left behind"


def test_healthz_is_503_when_the_state_folder_is_replaced_by_a_file(endpoint, tmp_path):
    """Permission bits do not stop root (CI): the folder is swapped for a file instead."""
    e = endpoint()
    state = tmp_path / "state"
    state.rename(tmp_path / "state.away")
    state.write_text("not a folder")
    status, _, body = e.get("/healthz")
    assert status == 503 and b"not a folder" in body and str(state).encode() in body
    state.unlink()
    (tmp_path / "state.away").rename(state)
    assert e.get("/healthz")[0] == 200


def test_healthz_is_503_when_the_ledger_is_not_a_file(endpoint, tmp_path):
    e = endpoint()
    ledger = tmp_path / "state" / "flatd.sqlite"
    ledger.rename(tmp_path / "ledger.away")
    ledger.mkdir()
    status, _, body = e.get("/healthz")
    assert status == 503 and b"is not a file" in body


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a folder of mode 0500 all the same")
def test_healthz_is_503_when_the_state_folder_is_read_only(endpoint, tmp_path):
    e = endpoint()
    state = tmp_path / "state"
    state.chmod(0o500)
    try:
        status, _, body = e.get("/healthz")
    finally:
        state.chmod(0o755)
    assert status == 503 and b"not writable" in body


def test_healthz_says_every_reason_it_is_given(endpoint):
    e = endpoint(health=lambda: ["capture folder /x is not watched", "stopping"])
    status, _, body = e.get("/healthz")
    assert status == 503
    assert body == b"unhealthy: capture folder /x is not watched; stopping\n"


def test_service_problems(tmp_path):
    make_ledger(tmp_path)
    rules = make_rules(tmp_path)
    alive = SimpleNamespace(alive=lambda: True)
    dead = SimpleNamespace(alive=lambda: False)
    cap, other = tmp_path / "cap", tmp_path / "other"
    service = SimpleNamespace(stop_requested=threading.Event(), ready=True, rules=rules,
                              folders={cap: None}, watches={cap: alive})
    assert service_problems(service) == []
    service.watches = {cap: dead}
    assert service_problems(service) == [f"the observer of capture folder {cap} stopped"]
    service.ready = False
    assert service_problems(service) == ["starting"]
    service.ready = True
    service.stop_requested.set()
    assert service_problems(service) == ["stopping"]
    assert "is not watched" in observer_problems([other], {})[0]


# --------------------------------------------------------------------------- /metrics


def _made_at(state) -> float:
    """When the ledger's newest master was recorded (the gauge's source)."""
    ledger = Ledger.open_readonly(state)
    try:
        return float(ledger.db.execute("SELECT max(created_at) FROM masters").fetchone()[0])
    finally:
        ledger.close()


def test_metrics_parse_and_move_with_the_events(endpoint, tmp_path):
    e = endpoint()
    status, headers, body = e.get("/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=")
    before = samples(body)
    assert before[("flatd_masters_total", ())] == 0
    assert before[("flatd_queue_depth", ())] == 2  # the two flats waiting in the ledger
    assert before[("flatd_failed_groups", ())] == 1
    assert before[("flatd_last_success_timestamp_seconds", ())] == pytest.approx(_made_at(tmp_path / "state"))
    for kind in REASON_KINDS:
        assert before[("flatd_flats_left_out_total", (("reason", kind),))] == 0

    E.emit(E.Notice("frame_ready", "flat ready", data={}))
    E.emit(E.GroupPlanned(GOOD_JOB, "R", 5, "sigma"))
    E.emit(E.MasterWritten(GOOD_JOB, tmp_path / "m.fits", 5, 3.5))
    E.emit(E.MasterWritten(GOOD_JOB, tmp_path / "m.fits", 5, found=True))  # recorded, not made
    E.emit(E.JobFailed("G", "nothing left", job=FAILED_JOB))
    E.emit(E.FrameLeftOut(tmp_path / "a.fits", "truncated: 10 of 20 bytes", bad=True))
    E.emit(E.FrameLeftOut(tmp_path / "b.fits", "type light, not a flat", quiet=True))
    E.emit(E.FrameLeftOut(tmp_path / "c.fits", "group R has 2 flats, fewer than min_group_size 3"))
    E.emit(E.BatchDone(tmp_path, 1, 1))
    if hasattr(E, "MasterChecked"):
        E.emit(E.MasterChecked(GOOD_JOB, tmp_path / "m.fits", "warn", ("noise up",)))
    quality_left_out = 0
    if hasattr(E, "FlatRejectedQc"):  # flatd.qc.flats' own event for a flat left out
        E.emit(E.FlatRejectedQc(tmp_path / "d.fits", "level", 0.01, 0.15, "level 0.01, below quality.min_level"))
        E.emit(E.FlatRejectedQc(tmp_path / "e.fits", "level", 0.01, 0.15, "level 0.01", action="warn"))
        quality_left_out = 1
    after = samples(e.get("/metrics")[2])
    if hasattr(E, "MasterChecked"):
        assert after[("flatd_masters_checked_total", (("verdict", "warn"),))] == 1
    assert after[("flatd_frames_seen_total", ())] == 1
    assert after[("flatd_masters_total", ())] == 1
    assert after[("flatd_jobs_failed_total", ())] == 1
    assert after[("flatd_batches_total", ())] == 1
    assert after[("flatd_job_duration_seconds_count", ())] == 1
    assert after[("flatd_job_duration_seconds_sum", ())] == 3.5
    left = {kind: after[("flatd_flats_left_out_total", (("reason", kind),))] for kind in REASON_KINDS}
    assert left == {**dict.fromkeys(REASON_KINDS, 0), "unreadable": 1, "not-a-flat": 1, "too-few": 1,
                    "quality": quality_left_out}
    assert after[("flatd_http_requests_total", (("code", "200"), ("endpoint", "metrics")))] >= 1


def test_each_endpoint_has_its_own_registry(endpoint):
    first, second = endpoint(), endpoint()
    E.emit(E.JobFailed("G", "x"))
    for e in (first, second):
        assert samples(e.get("/metrics")[2])[("flatd_jobs_failed_total", ())] == 1


def test_metrics_without_a_ledger(tmp_path):
    metrics = Metrics()
    metrics.refresh_from(None)
    assert samples(metrics.exposition())[("flatd_queue_depth", ())] == 0


@pytest.mark.parametrize("reason, bad, quiet, kind", [
    ("type light, not a flat (inputs.ignore_type, or -t, takes it)", False, True, "not-a-flat"),
    ("a master or stacked image, never an input", False, True, "not-a-flat"),
    ("not a FITS file", True, False, "unreadable"),
    ("group R 1x1 has 2 flats, fewer than min_group_size 5", False, False, "too-few"),
    ("level 0.05 of full scale is below quality.min_level 0.15", False, False, "quality"),
    ("0.8 % of pixels saturated", False, False, "quality"),
    ("size 100x80 differs from the group's 200x160; enable size grouping", False, False, "size"),
    ("no dark or bias matches this flat", False, False, "calibration"),
    ("something new", False, False, "other"),
])
def test_reason_kinds(reason, bad, quiet, kind):
    assert reason_kind(E.FrameLeftOut(Path("/x.fits"), reason, quiet=quiet, bad=bad)) == kind


# --------------------------------------------------------------------------- the page


def test_the_page_shows_waiting_masters_previews_and_failed_groups(endpoint, tmp_path):
    e = endpoint()
    E.emit(E.FrameLeftOut(tmp_path / "cap" / "odd.fits", "truncated: 10 of 20 bytes", bad=True))
    status, headers, body = e.get("/")
    html = body.decode()
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    assert '<meta http-equiv="refresh" content="30">' in html
    assert "<script" not in html
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    assert f"<td>{tmp_path / 'cap'}</td>" in html and "settles in" in html
    assert "FLAT-R.fits" in html and "7 flats" in html
    assert f'<img src="/preview/{GOOD_JOB}"' in html
    assert "G 1x1 -10C" in html and "nothing left to normalize after the pedestal" in html
    assert f"flatd retry {FAILED_JOB}" in html
    assert "odd.fits" in html and "truncated: 10 of 20 bytes" in html
    assert "not judged" in html  # no verdict in this ledger


def test_the_page_escapes_what_files_and_headers_say(endpoint, tmp_path):
    e = endpoint()
    E.emit(E.FrameLeftOut(tmp_path / "cap" / "<img src=x onerror=alert(1)>.fits", "<b>bad</b>\x1b[31m", bad=True))
    html = e.get("/")[2].decode()
    assert "<img src=x" not in html and "&lt;img src=x onerror=alert(1)&gt;.fits" in html
    assert "&lt;b&gt;bad&lt;/b&gt;" in html and "\x1b" not in html


def test_the_page_shows_a_quality_verdict_when_the_ledger_has_one(endpoint, tmp_path):
    import sqlite3

    ledger = Ledger.open(tmp_path / "state")
    for column in ("qc_status", "qc_reasons"):  # added by flatd.ledger itself once the checks record them
        try:
            ledger.db.execute(f"ALTER TABLE masters ADD COLUMN {column} TEXT")
        except sqlite3.OperationalError:
            pass
    ledger.db.execute("UPDATE masters SET qc_status='warn', qc_reasons='noise 30 % above the previous master'")
    ledger.close()
    html = endpoint().get("/")[2].decode()
    assert '<span class="verdict warn">warn</span>' in html
    assert "noise 30 % above the previous master" in html


def test_quality_verdict_accessor():
    assert quality_verdict({"qc_status": "good"}) == "good"
    assert quality_verdict({"verdict": '{"verdict": "bad", "noise": 0.1}'}) == "bad"
    assert quality_verdict(None, {"label": "x"}, SimpleNamespace(verdict="warn")) == "warn"
    assert quality_verdict({"qc_status": None}, {}) is None


def test_the_page_without_a_ledger(tmp_path):
    (tmp_path / "cap").mkdir()
    rules = make_rules(tmp_path)
    app = WebApp(lambda: rules, lambda: ["starting"], Metrics())
    _, response = app.answer("/", {})
    assert response.status == 200 and b"No ledger yet" in response.body and b"starting" in response.body


# --------------------------------------------------------------------------- previews


def test_a_preview_is_served_for_its_job(endpoint, tmp_path):
    status, headers, body = endpoint().get(f"/preview/{GOOD_JOB}")
    assert status == 200 and headers["Content-Type"] == "image/png"
    assert body == (tmp_path / "cap" / "masters" / "FLAT-R.preview.png").read_bytes()
    assert endpoint().get(f"/preview/{GOOD_JOB}", method="HEAD")[2] == b""


@pytest.mark.parametrize("path", [
    "/preview/../../etc/passwd",
    "/preview/..%2f..%2f..%2fetc%2fpasswd",
    "/preview/%2e%2e/%2e%2e/etc/passwd",
    "/preview/%2E%2E%2F%2E%2E%2Fetc%2Fpasswd",
    f"/preview/{GOOD_JOB}/../../../../etc/passwd",
    f"/preview/{GOOD_JOB}%00",
    f"/preview/{GOOD_JOB}/",
    f"/preview/{GOOD_JOB.upper()}",
    f"/preview/{FAILED_JOB}",  # a job without a master
    "/preview/0000000000000000",  # no such job
    "/preview/",
    "/preview",
    "/preview//etc/passwd",
    "/preview/%2Fetc%2Fpasswd",
    "/../../../../etc/passwd",
    "/%2e%2e/%2e%2e/etc/passwd",
    "/state/flatd.sqlite",
    "/preview/" + "a" * 1500,
])
def test_no_file_but_a_recorded_preview_is_ever_served(endpoint, path):
    status, _, body = endpoint().get(path)
    assert status == 404, (path, status)
    assert b"root:" not in body and b"SQLite" not in body


def test_a_huge_preview_url_is_refused(endpoint):
    status, _, _ = endpoint().get("/preview/" + "0" * 5000)
    assert status == 414


def test_a_preview_replaced_by_a_link_or_not_a_png_is_not_served(endpoint, tmp_path):
    e = endpoint()
    preview = tmp_path / "cap" / "masters" / "FLAT-R.preview.png"
    secret = tmp_path / "secret.png"
    secret.write_bytes(png_bytes())
    preview.unlink()
    preview.symlink_to(secret)
    assert e.get(f"/preview/{GOOD_JOB}")[0] == 404
    preview.unlink()
    preview.write_text("root:x:0:0:root:/root:/bin/bash\n")
    status, _, body = e.get(f"/preview/{GOOD_JOB}")
    assert status == 404 and b"root:" not in body
    preview.unlink()
    os.mkfifo(preview)  # a FIFO must not hang the request
    assert e.get(f"/preview/{GOOD_JOB}")[0] == 404
    html = e.get("/")[2].decode()
    assert "no preview" in html or "<img" in html


def test_a_master_without_preview_shows_none(endpoint, tmp_path):
    (tmp_path / "cap" / "masters" / "FLAT-R.preview.png").unlink()
    e = endpoint()
    html = e.get("/")[2].decode()
    assert "<img" not in html and "no preview" in html
    assert e.get(f"/preview/{GOOD_JOB}")[0] == 404


# --------------------------------------------------------------------------- the token


def test_without_the_token_nothing_is_served(endpoint):
    e = endpoint(token=TOKEN)
    for path in ("/", "/healthz", "/metrics", f"/preview/{GOOD_JOB}", "/nope"):
        status, headers, body = e.get(path)
        assert status == 401, path
        assert headers["WWW-Authenticate"].startswith("Bearer")
        assert b"FLAT-R" not in body
    for wrong in ({"Authorization": "Bearer nope"}, {"Authorization": f"Basic {TOKEN}"},
                  {"Authorization": f"Bearer {TOKEN}x"}, {"Authorization": f"Bearer {TOKEN[:-1]}"}):
        assert e.get("/healthz", wrong)[0] == 401, wrong
    assert e.get("/healthz?token=nope")[0] == 401
    assert e.get("/healthz?token=" + "%C3%A9" * 20)[0] == 401
    assert status_of(e.raw("GET /healthz?token=é HTTP/1.0\r\n\r\n".encode())) == 401


def test_the_token_in_the_header_or_the_query(endpoint):
    e = endpoint(token=TOKEN)
    assert e.get("/healthz", {"Authorization": f"Bearer {TOKEN}"})[0] == 200
    assert e.get("/metrics", {"Authorization": f"bearer {TOKEN}"})[0] == 200
    status, _, body = e.get(f"/?token={TOKEN}")
    assert status == 200
    assert f'<img src="/preview/{GOOD_JOB}?token={TOKEN}"' in body.decode()  # the links carry it on
    assert e.get(f"/preview/{GOOD_JOB}?token={TOKEN}")[0] == 200
    header_page = e.get("/", {"Authorization": f"Bearer {TOKEN}"})[2].decode()
    assert TOKEN not in header_page  # never written into a page that was asked for without it


# --------------------------------------------------------------------------- hostile requests


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
def test_only_get_and_head(endpoint, method):
    status, headers, _ = endpoint().get("/healthz", method=method)
    assert status == 405 and headers["Allow"] == "GET, HEAD"


def test_unknown_methods_and_paths(endpoint):
    e = endpoint()
    assert status_of(e.raw(b"BREW /healthz HTTP/1.0\r\n\r\n")) == 501
    assert e.get("/nope")[0] == 404
    assert e.get("/healthz/")[0] == 404
    assert e.get("/healthz?x=1")[0] == 200
    assert status_of(e.raw(b"GET /healthz?" + b"&".join(b"a=%d" % i for i in range(50)) + b" HTTP/1.0\r\n\r\n")) == 400


def test_long_urls_are_refused(endpoint):
    e = endpoint()
    assert e.get("/" + "a" * 3000)[0] == 414
    assert status_of(e.raw(b"GET /" + b"a" * 70000 + b" HTTP/1.0\r\n\r\n")) == 414


def test_huge_headers_are_refused(endpoint):
    e = endpoint()
    assert status_of(e.raw(b"GET /healthz HTTP/1.0\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n")) == 431
    many = b"".join(b"X-%d: 1\r\n" % i for i in range(150))
    assert status_of(e.raw(b"GET /healthz HTTP/1.0\r\n" + many + b"\r\n")) == 431
    big = b"".join(b"X-%d: " % i + b"b" * 4000 + b"\r\n" for i in range(6))
    assert status_of(e.raw(b"GET /healthz HTTP/1.0\r\n" + big + b"\r\n")) == 431
    assert status_of(e.raw(b"\x16\x03\x01\x02\x00garbage\r\n\r\n")) in (0, 400)  # TLS hello, or noise
    assert e.get("/healthz")[0] == 200  # and it still answers


def test_a_slow_client_blocks_nobody_and_is_dropped(endpoint, monkeypatch):
    monkeypatch.setattr(web_server.Handler, "timeout", 1.0)
    e = endpoint()
    slow = socket.create_connection(("127.0.0.1", e.port), timeout=10)
    try:
        slow.sendall(b"GET /healthz HT")  # and nothing more
        started = time.monotonic()
        assert e.get("/healthz")[0] == 200
        assert e.get("/")[0] == 200
        assert _read_all(slow) == b""  # closed after its timeout, unanswered
        assert time.monotonic() - started < 9
    finally:
        slow.close()


def test_connections_beyond_the_cap_are_closed(endpoint, monkeypatch):
    monkeypatch.setattr(web_server.Handler, "timeout", 5.0)
    e = endpoint(max_connections=2)
    held = [socket.create_connection(("127.0.0.1", e.port), timeout=10) for _ in range(2)]
    try:
        for sock in held:
            sock.sendall(b"GET /")
        time.sleep(0.3)
        assert e.raw(b"GET /healthz HTTP/1.0\r\n\r\n") == b""  # closed at once
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + 10
    while e.raw(b"GET /healthz HTTP/1.0\r\n\r\n") == b"" and time.monotonic() < deadline:
        time.sleep(0.1)  # slots come back as the held connections end
    assert status_of(e.raw(b"GET /healthz HTTP/1.0\r\n\r\n")) == 200


def test_a_failing_page_answers_500_and_the_server_goes_on(endpoint, monkeypatch):
    import flatd.web.page as page

    e = endpoint()
    monkeypatch.setattr(page, "context", lambda *a, **k: 1 / 0)
    status, _, body = e.get("/")
    assert status == 500 and b"ZeroDivision" not in body
    assert e.get("/healthz")[0] == 200


def test_stop_is_prompt_and_frees_the_port(tmp_path):
    make_ledger(tmp_path)
    e = Endpoint(tmp_path)
    slow = socket.create_connection(("127.0.0.1", e.port), timeout=10)
    slow.sendall(b"GET /")
    started = time.monotonic()
    e.close()
    assert time.monotonic() - started < 3  # never waits for the slow client
    slow.close()
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", e.port))


def test_a_taken_port_is_a_clear_error(endpoint):
    from flatd.web import WebError

    e = endpoint()
    with pytest.raises(WebError, match=r"at 'http.listen': cannot listen on 127.0.0.1:\d+"):
        WebServer("127.0.0.1", e.port, e.server.httpd.app)


def test_ipv6_loopback(tmp_path):
    if not socket.has_ipv6:
        pytest.skip("no IPv6 here")
    make_ledger(tmp_path)
    rules = make_rules(tmp_path)
    try:
        server = WebServer("::1", 0, WebApp(lambda: rules, lambda: [], Metrics())).start()
    except Exception as exc:  # noqa: BLE001 - a container without ::1
        pytest.skip(f"no IPv6 loopback here: {exc}")
    try:
        assert server.url.startswith("http://[::1]:")
        conn = http.client.HTTPConnection("::1", server.address[1], timeout=10)
        conn.request("GET", "/healthz")
        assert conn.getresponse().status == 200
    finally:
        server.stop()


# --------------------------------------------------------------------------- the rules file's http section


@pytest.mark.parametrize("text, where, says", [
    ("http: {listen: '127.0.0.1:99999'}", "http.listen", "0 to 65535"),
    ("http: {listen: abc}", "http.listen", "host:port"),
    ("http: {listen: 8765}", "http.listen", "host:port"),
    ("http: {listen: ':8765'}", "http.listen", "host:port"),
    ("http: {listen: '::1:8765'}", "http.listen", "brackets"),
    ("http: {listen: '[nope]:8765'}", "http.listen", "IPv6"),
    ("http: {listen: 'a b:80'}", "http.listen", "host name"),
    ("http: {listen: '0.0.0.0:80'}", "http.listen", "http.token"),
    ("http: {listen: '[::]:80'}", "http.listen", "http.token"),
    ("http: {listen: '192.168.1.5:8765'}", "http.listen", "http.token"),
    ("http: {listen: 'nas.local:8765'}", "http.listen", "http.token"),
    ("http: {listen: '0.0.0.0:80', token: ''}", "http.token", "16 to 512"),
    ("http: {token: 'short'}", "http.token", "16 to 512"),
    ("http: {token: 'has a space in it, sixteen+'}", "http.token", "16 to 512"),
    ("http: {refresh: 0}", "http.refresh", "1 s to 1 h"),
    ("http: {refresh: 1d}", "http.refresh", "1 s to 1 h"),
    ("http: {refresh: soon}", "http.refresh", "duration"),
    ("http: {port: 80}", "http.port", "unknown key"),
])
def test_hostile_http_settings(text, where, says):
    from flatd.config import ConfigError

    with pytest.raises(ConfigError) as info:
        parse_rules(text)
    (line,) = info.value.render().splitlines()
    assert f"at '{where}'" in line and says in line, line


@pytest.mark.parametrize("listen, normal", [
    ("127.0.0.1:8765", "127.0.0.1:8765"),
    ("localhost:0", "localhost:0"),
    ("[::1]:8765", "[::1]:8765"),
    (" 127.0.0.2:80 ", "127.0.0.2:80"),
])
def test_loopback_needs_no_token(listen, normal):
    assert parse_rules(f"http: {{listen: '{listen}'}}").http.listen == normal


def test_any_address_with_a_token():
    rules = parse_rules(f"http: {{listen: '0.0.0.0:8765', token: {TOKEN}, refresh: 1m}}")
    assert (rules.http.listen, rules.http.token, rules.http.refresh) == ("0.0.0.0:8765", TOKEN, 60.0)
    assert parse_rules("").http.listen is None
