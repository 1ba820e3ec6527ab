"""The systemd units and the launchd agent shipped in systemd/ and launchd/."""

from __future__ import annotations

import os
import plistlib
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SYSTEMD = ROOT / "systemd"
LAUNCHD = ROOT / "launchd"
UNITS = ("flatd.service", "flatd-user.service", "flatd-run-once.service", "flatd-run-once.timer")


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """Sections -> key -> values (systemd allows a key several times)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"{path.name}: {raw!r} before any section"
        assert "=" in line, f"{path.name}: {raw!r} is not key=value"
        key, value = line.split("=", 1)
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def one(unit, section, key) -> str:
    values = unit[section][key]
    assert len(values) == 1, (section, key, values)
    return values[0]


def test_system_service():
    unit = parse_unit(SYSTEMD / "flatd.service")
    service = unit["Service"]
    assert one(unit, "Service", "User") == "flatd"
    assert one(unit, "Service", "ExecStart") == "/usr/local/bin/flatd watch --config /etc/flatd/flatd.yaml"
    assert one(unit, "Service", "ExecReload") == "/bin/kill -HUP $MAINPID"
    assert one(unit, "Service", "Restart") == "on-failure"
    assert "RestartSec" in service
    assert one(unit, "Service", "KillSignal") == "SIGTERM"
    assert one(unit, "Service", "TimeoutStopSec") == "20"
    assert one(unit, "Service", "StateDirectory") == "flatd"
    assert one(unit, "Service", "NoNewPrivileges") == "yes"
    assert one(unit, "Service", "ProtectSystem") == "strict"
    assert one(unit, "Service", "ProtectHome") == "read-only"
    assert one(unit, "Service", "PrivateTmp") == "yes"
    assert one(unit, "Service", "Nice") == "10"
    assert "IOSchedulingClass" in service
    assert service["ReadWritePaths"], "the capture folders must be writable"
    assert one(unit, "Service", "MemoryDenyWriteExecute") == "yes"  # kernels built at install: no JIT
    assert "NUMBA_CACHE_DIR" not in open(SYSTEMD / "flatd.service").read()
    assert one(unit, "Install", "WantedBy") == "multi-user.target"
    _notify_and_watchdog(unit)


def test_user_service():
    unit = parse_unit(SYSTEMD / "flatd-user.service")
    assert "User" not in unit["Service"]
    assert one(unit, "Service", "ExecStart").startswith("%h/.local/bin/flatd watch")
    assert one(unit, "Service", "ExecReload") == "/bin/kill -HUP $MAINPID"
    assert one(unit, "Service", "Restart") == "on-failure"
    assert one(unit, "Install", "WantedBy") == "default.target"
    _notify_and_watchdog(unit)
    text = (SYSTEMD / "flatd-user.service").read_text()
    assert "/etc/" not in text.split("[Service]", 1)[1]


def _notify_and_watchdog(unit) -> None:
    """Type=notify (flatd says READY=1 once the folders are watched), the main process
    only, and a watchdog long enough for a rescan of a big share between two pings."""
    from flatd.service import TICK

    assert one(unit, "Service", "Type") == "notify"
    assert one(unit, "Service", "NotifyAccess") == "main"
    watchdog = one(unit, "Service", "WatchdogSec")
    seconds = int(watchdog.removesuffix("min")) * 60 if watchdog.endswith("min") else int(watchdog.rstrip("s"))
    assert seconds / 2 > 10 * TICK  # configured values, nothing timed: ten missed pings (one a TICK) before a restart
    assert one(unit, "Service", "Restart") == "on-failure"  # a watchdog timeout is a failure
    families = unit["Service"].get("RestrictAddressFamilies")
    assert families is None or "AF_UNIX" in families[0].split()  # $NOTIFY_SOCKET is an AF_UNIX socket


def test_run_once_timer():
    service = parse_unit(SYSTEMD / "flatd-run-once.service")
    assert one(service, "Service", "Type") == "oneshot"
    assert one(service, "Service", "ExecStart") == "/usr/local/bin/flatd run-once --config /etc/flatd/flatd.yaml"
    assert "Install" not in service, "started by the timer, not enabled itself"
    timer = parse_unit(SYSTEMD / "flatd-run-once.timer")
    assert one(timer, "Timer", "OnCalendar") == "*-*-* 09:00"
    assert one(timer, "Timer", "Persistent") == "true"
    assert one(timer, "Timer", "Unit") == "flatd-run-once.service"
    assert one(timer, "Install", "WantedBy") == "timers.target"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_verify(tmp_path):
    # verify insists that ExecStart's program exists: point it at a stand-in.
    stub = tmp_path / "bin" / "flatd"
    stub.parent.mkdir()
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    units = tmp_path / "units"
    units.mkdir()
    for name in UNITS:
        text = (SYSTEMD / name).read_text()
        text = text.replace("/usr/local/bin/flatd", str(stub)).replace("%h/.local/bin/flatd", str(stub))
        (units / name).write_text(text)
    for name in UNITS:
        result = subprocess.run(["systemd-analyze", "verify", str(units / name)], capture_output=True,
                                text=True, cwd=units, env={**os.environ, "SYSTEMD_LOG_LEVEL": "notice"})
        problems = [line for line in result.stderr.splitlines() if name in line or "Unknown" in line]
        assert result.returncode == 0 and not problems, result.stderr


def test_launch_agent():
    path = LAUNCHD / "org.flatd.watch.plist"
    with path.open("rb") as handle:
        agent = plistlib.load(handle)
    assert agent["Label"] == path.stem == "org.flatd.watch"
    program = agent["ProgramArguments"]
    assert Path(program[0]).name == "flatd" and program[0].startswith("/")
    assert program[1:3] == ["watch", "--config"] and program[3].endswith("/.config/flatd/flatd.yaml")
    assert agent["RunAtLoad"] is True
    assert agent["KeepAlive"] == {"SuccessfulExit": False}
    assert agent["ProcessType"] == "Background"
    assert isinstance(agent["Nice"], int) and agent["Nice"] > 0
    for key in ("StandardOutPath", "StandardErrorPath"):
        assert "/Library/Logs/flatd/" in agent[key] and agent[key].startswith("/Users/YOU/")
    # launchd expands neither ~ nor $HOME: every path is absolute, named /Users/YOU.
    for value in [*program, agent["StandardOutPath"], agent["StandardErrorPath"], agent["WorkingDirectory"]]:
        assert "~" not in value and "$" not in value


def test_launch_agent_install_command():
    """The documented sed puts the home folder in and leaves a valid plist."""
    text = (LAUNCHD / "org.flatd.watch.plist").read_text().replace("/Users/YOU", "/Users/ann")
    agent = plistlib.loads(text.encode())
    assert agent["ProgramArguments"][0] == "/Users/ann/.local/bin/flatd"
    assert "YOU" not in repr(agent)
