"""`flatd watch` with its HTTP endpoint and systemd's notify protocol, end to end: a real
subprocess, real requests, a socket standing in for systemd, and a real browser
(headless Chromium) on the status page."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from flatd.ledger import Ledger

from watchkit import TIMEOUT, run_flatd, wait_until, write_flat, write_rules

pytestmark = pytest.mark.timeout(300)
TOKEN = "e2e-token_0123456789abcdef"


# --------------------------------------------------------------------------- helpers


def get(url: str, token: str | None = None) -> tuple[int, bytes, dict]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


def endpoint_url(w) -> str:
    """The address `flatd watch` says it listens on (it took any free port)."""
    [event] = w.wait_event("http_listening")
    return f"http://127.0.0.1:{event['port']}"


def samples(body: bytes) -> dict:
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def metric(url: str, name: str, token: str | None = None, **labels) -> float:
    status, body, _ = get(url + "/metrics", token)
    assert status == 200
    return samples(body).get((name, tuple(sorted(labels.items()))), 0.0)


def abstract_listener() -> tuple[socket.socket, str]:
    """A datagram socket in the abstract namespace, standing in for systemd's."""
    name = f"flatd-e2e-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    return sock, "@" + name


class Messages:
    """Everything flatd sends to the notify socket, gathered by a thread."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.lines: list[tuple[float, str]] = []
        self.sock.settimeout(0.2)
        self.running = True
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        while self.running:
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                continue
            except OSError:
                return
            now = time.monotonic()
            self.lines.extend((now, line) for line in data.decode().split("\n"))

    def count(self, line: str) -> int:
        return sum(1 for _, text in list(self.lines) if text == line)

    def times(self, line: str) -> list[float]:
        return [when for when, text in list(self.lines) if text == line]

    def close(self) -> None:
        self.running = False
        self.thread.join(2)
        self.sock.close()


# --------------------------------------------------------------------------- /healthz and /metrics


def test_healthz_and_metrics_while_flatd_watch_runs(tmp_path, watches):
    cap = tmp_path / "cap"
    (cap / "night1").mkdir(parents=True)
    config = write_rules(tmp_path, http="{listen: '127.0.0.1:0'}", rescan="1h")
    w = watches(config).started()
    url = endpoint_url(w)
    status, body, _ = get(url + "/healthz")
    assert (status, body) == (200, b"ok\n")
    assert metric(url, "flatd_masters_total") == 0

    for i in range(3):
        write_flat(cap / "night1" / f"flat_{i}.fits", seed=i)
    w.wait_event("master_written")
    wait_until(lambda: metric(url, "flatd_masters_total") == 1, what="the masters counter to move")
    assert metric(url, "flatd_frames_seen_total") == 3
    assert metric(url, "flatd_job_duration_seconds_count") == 1
    ledger = Ledger.open_readonly(tmp_path / "state")
    try:
        made = ledger.db.execute("SELECT max(created_at) FROM masters").fetchone()[0]
    finally:
        ledger.close()
    assert metric(url, "flatd_last_success_timestamp_seconds") == pytest.approx(made)  # the ledger's master
    wait_until(lambda: metric(url, "flatd_queue_depth") == 0, what="the queue to empty")
    assert metric(url, "flatd_jobs_failed_total") == 0

    # The state folder becomes unusable (swapped for a file: root writes through modes).
    state = tmp_path / "state"
    state.rename(tmp_path / "state.away")
    state.write_text("not a folder any more")
    try:
        status, body, _ = get(url + "/healthz")
        assert status == 503 and b"not a folder" in body, body
    finally:
        state.unlink()
        (tmp_path / "state.away").rename(state)
    assert get(url + "/healthz")[0] == 200
    assert w.proc.poll() is None
    assert w.stop() == 0
    assert w.events("service_stopped")
    with pytest.raises(OSError):  # the endpoint went with the process
        urllib.request.urlopen(url + "/healthz", timeout=5)


def test_healthz_is_503_while_a_capture_folder_is_missing(tmp_path, watches):
    (tmp_path / "cap").mkdir()
    config = write_rules(tmp_path, captures=("cap", "share"), http="{listen: '127.0.0.1:0'}", rescan="1h")
    w = watches(config).started()
    status, body, _ = get(endpoint_url(w) + "/healthz")
    assert status == 503 and b"share is not watched" in body
    assert w.stop() == 0


def test_the_token_is_asked_for_on_any_address(tmp_path, watches):
    (tmp_path / "cap").mkdir()
    config = write_rules(tmp_path, http=f"{{listen: '0.0.0.0:0', token: {TOKEN}}}", rescan="1h")
    w = watches(config).started()
    url = endpoint_url(w)
    assert get(url + "/healthz")[0] == 401
    assert get(url + "/healthz", "wrong-token-0123456789")[0] == 401
    assert get(url + "/healthz", TOKEN)[0] == 200
    assert get(url + f"/?token={TOKEN}")[0] == 200
    assert w.stop() == 0


# --------------------------------------------------------------------------- refused at start-up


def test_a_bind_beyond_loopback_without_a_token_is_refused_at_start_up(tmp_path):
    (tmp_path / "cap").mkdir()
    config = write_rules(tmp_path, http="{listen: '0.0.0.0:8765'}")
    result = run_flatd("watch", "--config", str(config))
    assert result.returncode == 2
    assert "at 'http.listen'" in result.stderr and "http.token" in result.stderr, result.stderr
    assert not (tmp_path / "state").exists()  # refused before anything was touched
    check = run_flatd("config", "check", str(config))
    assert check.returncode == 2 and "http.token" in check.stderr


def test_a_port_in_use_is_refused_at_start_up(tmp_path):
    (tmp_path / "cap").mkdir()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        config = write_rules(tmp_path, http=f"{{listen: '127.0.0.1:{port}'}}")
        result = run_flatd("watch", "--config", str(config))
    assert result.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr and "http.listen" in result.stderr, result.stderr


# --------------------------------------------------------------------------- systemd


def test_sd_notify_ready_watchdog_and_stopping(tmp_path, watches):
    (tmp_path / "cap").mkdir()
    config = write_rules(tmp_path, rescan="1h")
    sock, address = abstract_listener()
    messages = Messages(sock)
    try:
        w = watches(config, env={"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "600000"}).started()
        wait_until(lambda: messages.count("READY=1"), what="READY=1")
        assert messages.count(f"MAINPID={w.pid}") == 1
        assert any(text.startswith("STATUS=watching 1 capture folder") for _, text in messages.lines)
        wait_until(lambda: messages.count("WATCHDOG=1") >= 3, what="three watchdog pings")
        pings = messages.times("WATCHDOG=1")
        assert messages.times("READY=1")[0] <= pings[0]
        assert all(b - a >= 0.2 for a, b in zip(pings, pings[1:]))  # at half the interval, not flooding
        assert messages.count("STOPPING=1") == 0
        w.signal(signal.SIGTERM)
        assert w.wait_exit() == 0
        wait_until(lambda: messages.count("STOPPING=1"), timeout=5, what="STOPPING=1")
    finally:
        messages.close()


def test_no_watchdog_pings_without_watchdog_usec(tmp_path, watches):
    (tmp_path / "cap").mkdir()
    config = write_rules(tmp_path, rescan="1h")
    sock, address = abstract_listener()
    messages = Messages(sock)
    try:
        w = watches(config, env={"NOTIFY_SOCKET": address}).started()
        wait_until(lambda: messages.count("READY=1"), what="READY=1")
        time.sleep(1.5)
        assert messages.count("WATCHDOG=1") == 0
        assert w.stop() == 0
        wait_until(lambda: messages.count("STOPPING=1"), timeout=5, what="STOPPING=1")
    finally:
        messages.close()


def test_a_hung_main_loop_stops_the_watchdog_pings(tmp_path, monkeypatch):
    """In process: the pings come from the main loop, so a loop stuck in a step stops them
    (systemd would then restart flatd), while the other threads run on."""
    from flatd.config import load_rules
    from flatd.service import Service

    (tmp_path / "cap").mkdir()
    config = write_rules(tmp_path, rescan="1h")
    sock, address = abstract_listener()
    messages = Messages(sock)
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    service = Service(config, load_rules(config))
    hang, release = threading.Event(), threading.Event()
    poll = service.intake.poll_changing

    def poll_changing(now):
        if hang.is_set():
            release.wait(TIMEOUT)
        return poll(now)

    service.intake.poll_changing = poll_changing
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("rc", service.run()), daemon=True)
    thread.start()
    try:
        wait_until(lambda: messages.count("WATCHDOG=1") >= 3, what="pings")
        hang.set()
        time.sleep(1.0)  # the loop is now stuck in poll_changing
        stuck = messages.count("WATCHDOG=1")
        time.sleep(1.5)
        assert messages.count("WATCHDOG=1") == stuck, "pings went on while the main loop hung"
        release.set()
        hang.clear()
        wait_until(lambda: messages.count("WATCHDOG=1") > stuck, what="pings again")
    finally:
        release.set()
        service.request_stop()
        thread.join(TIMEOUT)
        messages.close()
    assert result["rc"] == 0


# --------------------------------------------------------------------------- the status page in a browser


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


def browse(url: str, workdir: Path, *args: str) -> subprocess.CompletedProcess:
    """Headless Chromium on `url` (no sandbox: tests may run as root)."""
    command = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--no-first-run", "--hide-scrollbars", f"--user-data-dir={workdir / 'chromium-profile'}",
               *args, url]
    env = {**os.environ, "HOME": str(workdir)}
    return subprocess.run(command, capture_output=True, text=True, timeout=120, env=env, cwd=str(workdir))


@pytest.mark.skipif(chromium() is None, reason="Chromium is not installed (Debian: apt-get install chromium; "
                                               "make test installs it where it can)")
def test_the_status_page_in_a_real_browser(tmp_path, watches):
    from PIL import Image

    cap = tmp_path / "cap"
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the bad group's output folder should be")
    rules = (f'\n  - match: {{path: "{cap / "bad"}/**"}}\n    output: {{directory: {blocked}}}')
    config = write_rules(tmp_path, http="{listen: '127.0.0.1:0'}", rescan="1h", rules=rules)
    w = watches(config).started()
    url = endpoint_url(w)
    for i in range(3):
        write_flat(cap / "night1" / f"flat_{i}.fits", seed=i, filt="R")
        write_flat(cap / "bad" / f"flat_{i}.fits", seed=10 + i, filt="G")
    [made] = w.wait_event("master_written")
    w.wait_event("job_failed")
    w.wait_event("batch_done")
    master = Path(made["path"])
    preview = ensure_preview(master)

    shot = tmp_path / "status.png"
    result = browse(url + "/", tmp_path, f"--screenshot={shot}", "--window-size=1280,1600")
    assert result.returncode == 0 and shot.is_file(), result.stderr[-2000:]
    with Image.open(shot) as picture:
        assert picture.size == (1280, 1600)
        assert len(picture.convert("L").getcolors(256)) > 8  # a page, not a blank
    dom = browse(url + "/", tmp_path, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    assert master.name in html  # the master
    job = made["job"]
    assert f'<img src="/preview/{job}"' in html  # its preview
    assert 'class="failed-group"' in html and "G" in html and "cannot use the output folder" in html
    assert "Flats waiting" in html and "Left in place by the last batch" in html
    status, body, headers = get(f"{url}/preview/{job}")
    assert status == 200 and headers["Content-Type"] == "image/png" and body == preview.read_bytes()
    # The browser itself fetched the picture (the endpoint counts what it served).
    assert metric(url, "flatd_http_requests_total", endpoint="preview", code="200") >= 2
    assert w.stop() == 0


def ensure_preview(master: Path) -> Path:
    """The PNG beside the master: made by the run (output.previews); written here from the
    master when this flatd does not make previews yet."""
    from flatd.web.page import preview_path

    path = preview_path(master)
    if not path.is_file():
        from astropy.io import fits
        from PIL import Image

        import numpy as np

        data = fits.getdata(master).astype(np.float32)
        scaled = (255 * (data - data.min()) / max(float(np.ptp(data)), 1e-6)).astype(np.uint8)
        Image.fromarray(scaled, mode="L").save(path, format="PNG")
    return path
