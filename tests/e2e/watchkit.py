"""Helpers for the end-to-end tests of the service: FITS flats, rules files, and `flatd watch` in a
subprocess whose JSON log lines the tests read while it runs."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
import pytest
from astropy.io import fits

# Generous: a loaded CI machine with two cores. Waits poll; nothing asserts a duration.
TIMEOUT = 60.0


def flat_bytes(value: float = 20000.0, shape=(40, 50), filt: Optional[str] = "R", temp: float = -10.0,
               exposure: float = 2.0, seed: Optional[int] = None, imagetyp: str = "FLAT") -> bytes:
    """A complete FITS flat (uint16) as bytes: constant `value`, or noisy around it with a seed."""
    if seed is None:
        data = np.full(shape, value, dtype=np.uint16)
    else:
        rng = np.random.default_rng(seed)
        data = np.clip(rng.normal(value, 50.0, shape), 0, 65535).astype(np.uint16)
    hdu = fits.PrimaryHDU(data)
    hdu.header["IMAGETYP"] = imagetyp
    if filt is not None:
        hdu.header["FILTER"] = filt
    hdu.header["EXPTIME"] = exposure
    hdu.header["CCD-TEMP"] = temp
    hdu.header["XBINNING"] = 1
    hdu.header["YBINNING"] = 1
    hdu.header["DATE-OBS"] = "2026-11-24T18:00:00.000"
    buffer = io.BytesIO()
    hdu.writeto(buffer)
    return buffer.getvalue()


def write_flat(path: Path, **kwargs) -> Path:
    """Write a flat the way a capture program does: straight to its final name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(flat_bytes(**kwargs))
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def rules_text(root: Path, captures: Iterable[str] = ("cap",), **settings) -> str:
    """A rules file with small timing knobs; keyword arguments replace top-level keys
    (given as YAML text; None drops the key)."""
    base = {
        "capture": "".join(f"\n  - path: {root / c}" for c in captures),
        "output": "{directory: masters}",
        "inputs": '{move_to: "originals-{date}"}',
        "grouping": "{min_group_size: 3}",
        "precalibration": "{mode: pedestal, pedestal: 100}",
        "combine": "{method: sigma, sigma: 3.0}",
        "engine": "{workers: 1}",
        "settle": "2s",
        "stable": "1s",
        "rescan": "5s",
        "state": str(root / "state"),
    }
    base.update(settings)
    return "".join(f"{key}: {value}\n" for key, value in base.items() if value is not None)


def write_rules(root: Path, name: str = "flatd.yaml", **settings) -> Path:
    path = root / name
    path.write_text(rules_text(root, **settings))
    return path


def wait_until(predicate: Callable[[], object], timeout: float = TIMEOUT, interval: float = 0.05,
               what: str = "condition"):
    """Poll until predicate() is truthy; return its value. Fails the test on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


def flatd_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "flatd.cli", *args]


def subprocess_env() -> dict:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("FLATD_CONFIG", None)
    env.pop("JOURNAL_STREAM", None)
    for key in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):  # no test talks to a real systemd
        env.pop(key, None)
    return env


class WatchProcess:
    """`flatd watch --log-format json` in a subprocess; its log lines as parsed events."""

    def __init__(self, config: Path, logdir: Path, name: str = "watch", prefix: Sequence[str] = (),
                 env: Optional[dict] = None):
        self.config = config
        self.stderr_path = logdir / f"{name}.stderr"
        self.stdout_path = logdir / f"{name}.stdout"
        self._stderr = open(self.stderr_path, "wb")
        self._stdout = open(self.stdout_path, "wb")
        self.proc = subprocess.Popen([*prefix, *flatd_command("watch", "--config", str(config), "--log-format", "json")],
                                     stdout=self._stdout, stderr=self._stderr, env={**subprocess_env(), **(env or {})},
                                     cwd=str(logdir))

    @property
    def pid(self) -> int:
        return self.proc.pid

    def text(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def events(self, name: Optional[str] = None) -> list[dict]:
        out = []
        for line in self.text().splitlines():
            try:
                item = json.loads(line)
            except ValueError:
                continue
            if isinstance(item, dict) and (name is None or item.get("event") == name):
                out.append(item)
        return out

    def wait_event(self, name: str, count: int = 1, timeout: float = TIMEOUT,
                   where: Callable[[dict], bool] = lambda e: True) -> list[dict]:
        def found():
            if self.proc.poll() is not None:
                raise AssertionError(f"flatd watch exited ({self.proc.returncode}) while waiting for {name}:\n"
                                     + self.text()[-4000:])
            items = [e for e in self.events(name) if where(e)]
            return items if len(items) >= count else None

        return wait_until(found, timeout, what=f"{count} x {name}")

    def started(self) -> "WatchProcess":
        self.wait_event("service_started")
        return self

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait_exit(self, timeout: float = TIMEOUT) -> int:
        return self.proc.wait(timeout)

    def stop(self, timeout: float = TIMEOUT) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(TIMEOUT)

    def close(self) -> None:
        self.kill()
        self._stderr.close()
        self._stdout.close()


@pytest.fixture
def watches(tmp_path) -> Iterable[Callable[..., WatchProcess]]:
    """Start `flatd watch` processes; every one is killed when the test ends, whatever happens."""
    started: list[WatchProcess] = []

    def start(config: Path, name: Optional[str] = None, prefix: Sequence[str] = (),
              env: Optional[dict] = None) -> WatchProcess:
        proc = WatchProcess(config, tmp_path, name or f"watch{len(started) + 1}", prefix, env)
        started.append(proc)
        return proc

    try:
        yield start
    finally:
        for proc in started:
            proc.close()


def run_flatd(*args: str, cwd: Optional[Path] = None, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run(flatd_command(*args), capture_output=True, text=True, env=subprocess_env(),
                          cwd=str(cwd) if cwd else None, timeout=timeout)


def files_under(root: Path, pattern: str = "*") -> list[Path]:
    return sorted(p for p in root.rglob(pattern) if p.is_file())


def temp_files(root: Path) -> list[Path]:
    """flatd's own temp files (masters and cross-filesystem moves) and any *.tmp; not
    the output folders' lock files, which stay by design."""
    return [p for p in files_under(root) if (p.name.startswith(".flatd") or p.name.endswith(".tmp"))
            and p.name != ".flatd.lock"]
