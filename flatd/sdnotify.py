"""systemd's notify protocol (sd_notify(3)) without a dependency: READY=1, STATUS=...,
WATCHDOG=1 and STOPPING=1 as datagrams on the AF_UNIX socket named by $NOTIFY_SOCKET.

Without $NOTIFY_SOCKET (not under systemd, or Type= other than notify) every call does
nothing. The watchdog is pinged by `Notifier.watchdog()`, which the service's main loop
calls on each turn: a loop that hangs stops pinging, and systemd restarts the service.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Callable, Mapping, Optional


def socket_address(value: Optional[str]) -> Optional[str]:
    """The address to send to: a path, or an abstract name ('@x' -> '\\0x'); None when unusable."""
    if not value or value[0] not in "/@":
        return None  # unset, or a vsock address (vsock:...) this tiny client does not speak
    return "\0" + value[1:] if value.startswith("@") else value


def watchdog_interval(env: Mapping[str, str], pid: Optional[int] = None) -> Optional[float]:
    """Seconds between pings (half of $WATCHDOG_USEC), or None when no watchdog is asked
    for this process ($WATCHDOG_PID, when set, names another process)."""
    owner = env.get("WATCHDOG_PID")
    if owner and owner.strip() != str(os.getpid() if pid is None else pid):
        return None
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 2e6 if usec > 0 else None


class Notifier:
    """One process's messages to systemd; safe to call when systemd is not listening."""

    def __init__(self, env: Optional[Mapping[str, str]] = None, clock: Callable[[], float] = time.monotonic):
        env = os.environ if env is None else env
        self.address = socket_address(env.get("NOTIFY_SOCKET"))
        self.interval = watchdog_interval(env) if self.address else None
        self.clock = clock
        self.last_ping: Optional[float] = None
        self._socket: Optional[socket.socket] = None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *lines: str) -> bool:
        """Send `lines` as one datagram ("KEY=value" each); False when it could not be sent."""
        if self.address is None:
            return False
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)  # not inherited (PEP 446)
            self._socket.sendto("\n".join(lines).encode("utf-8", "replace"), self.address)
            return True
        except OSError:
            return False  # systemd gone or the socket unusable: nothing the service can do

    def ready(self, status: str = "") -> bool:
        """The service is up (observers running): READY=1, with a STATUS= line."""
        self.last_ping = self.clock()
        return self.send("READY=1", *self._status(status), f"MAINPID={os.getpid()}")

    def status(self, text: str) -> bool:
        return self.send(*self._status(text))

    def stopping(self, status: str = "stopping") -> bool:
        return self.send("STOPPING=1", *self._status(status))

    def watchdog(self) -> bool:
        """WATCHDOG=1 when half of WatchdogSec= went by since the last ping; True when sent."""
        if self.interval is None:
            return False
        now = self.clock()
        if self.last_ping is not None and now - self.last_ping < self.interval:
            return False
        self.last_ping = now
        return self.send("WATCHDOG=1")

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    @staticmethod
    def _status(text: str) -> list[str]:
        """A STATUS= line on one line (a file name may hold a newline)."""
        text = " ".join(str(text).split())
        return [f"STATUS={text[:400]}"] if text else []
