"""flatd.sdnotify: systemd's notify protocol, received on sockets made here."""

from __future__ import annotations

import os
import socket
import tempfile
import uuid

import pytest

from flatd.sdnotify import Notifier, socket_address, watchdog_interval


@pytest.fixture
def listener():
    """An AF_UNIX datagram socket at a short path (the limit is 108 bytes) and its env."""
    folder = tempfile.mkdtemp(prefix="sdn-", dir="/tmp")
    path = os.path.join(folder, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(2.0)
    yield sock, {"NOTIFY_SOCKET": path}
    sock.close()
    os.unlink(path)
    os.rmdir(folder)


def received(sock: socket.socket) -> list[str]:
    """The lines of every datagram waiting on `sock`."""
    lines = []
    sock.settimeout(0.2)
    try:
        while True:
            lines.extend(sock.recv(4096).decode().split("\n"))
    except socket.timeout:
        return lines


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_ready_status_stopping(listener):
    sock, env = listener
    notifier = Notifier(env)
    assert notifier.enabled
    assert notifier.ready("watching 2 capture folder(s)")
    assert notifier.status("processing\nnight 1")
    assert notifier.stopping()
    lines = received(sock)
    assert lines[:2] == ["READY=1", "STATUS=watching 2 capture folder(s)"]
    assert f"MAINPID={os.getpid()}" in lines
    assert "STATUS=processing night 1" in lines  # one line, whatever a folder name holds
    assert lines[-2:] == ["STOPPING=1", "STATUS=stopping"]
    notifier.close()


def test_abstract_socket():
    name = f"flatd-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    try:
        notifier = Notifier({"NOTIFY_SOCKET": "@" + name})
        assert notifier.ready()
        assert received(sock)[0] == "READY=1"
    finally:
        sock.close()


def test_watchdog_pings_at_half_the_interval(listener):
    sock, env = listener
    clock = Clock()
    notifier = Notifier({**env, "WATCHDOG_USEC": "4000000"}, clock=clock)
    assert notifier.interval == 2.0
    notifier.ready()
    assert not notifier.watchdog()  # just said READY
    clock.now += 1.9
    assert not notifier.watchdog()
    clock.now += 0.2
    assert notifier.watchdog()
    assert not notifier.watchdog()
    clock.now += 2.0
    assert notifier.watchdog()
    assert received(sock).count("WATCHDOG=1") == 2


def test_no_watchdog_without_usec_or_for_another_pid(listener):
    sock, env = listener
    assert Notifier(env).watchdog() is False
    assert watchdog_interval({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid() + 1)}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid())}) == 0.5
    assert watchdog_interval({"WATCHDOG_USEC": "nope"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert received(sock) == []


def test_without_systemd_nothing_is_sent():
    notifier = Notifier({})
    assert not notifier.enabled
    assert notifier.ready() is False and notifier.watchdog() is False and notifier.stopping() is False
    assert socket_address("vsock:2:1234") is None
    assert socket_address("@x") == "\0x" and socket_address("/run/x") == "/run/x"


def test_a_socket_that_went_away_is_no_error(tmp_path):
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone"), "WATCHDOG_USEC": "1"})
    assert notifier.ready() is False
    assert notifier.watchdog() is False
