"""A hostile rules file cannot exhaust the machine: `flatd config check` and `run-once` answer, exit 2."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flatd.config import MAX_RULES_BYTES, MAX_RULES_DEPTH, MAX_RULES_NODES

FLATD = Path(sys.executable).with_name("flatd")
TWO_MIB = 2 * 2**20
RUNAWAY = 20  # seconds; only stops a runaway, the answer is expected in well under one
COMMANDS = {"config check": ["config", "check"], "config show": ["config", "show"], "run-once": ["run-once", "--config"]}

pytestmark = pytest.mark.skipif(not FLATD.exists(), reason="the flatd script is not installed next to python")


def alias_bomb() -> bytes:
    """9 levels of 9 aliases: 9**9 strings from a few hundred bytes."""
    names = "abcdefghi"
    lines = ['a: &a ["x","x","x","x","x","x","x","x","x"]']
    lines += [f"{name}: &{name} [{','.join([f'*{prev}'] * 9)}]" for prev, name in zip(names, names[1:])]
    return ("\n".join(lines) + "\n").encode()


def flow_list(count: int, item: str = "x") -> bytes:
    return ("keywords:\n  filter: [" + ",".join(f"{item}{i}" for i in range(count)) + "]\n").encode()


HOSTILE = {
    # name: (file content, what stderr says after "<file>")
    "alias bomb": (alias_bomb(), ":2: at '(syntax)': YAML aliases (*a) are not allowed in a rules file"),
    "2 MiB": (b"settle: 1m\n" + b"#" * (TWO_MIB - 12) + b"\n",
              f": at '(file)': too large: {TWO_MIB} bytes, over the limit of {MAX_RULES_BYTES} bytes (1 MiB)"),
    "deep nesting": (b"settle: " + b"[" * 10_000 + b"]" * 10_000 + b"\n",
                     f":1: at '(syntax)': nested more than {MAX_RULES_DEPTH} levels deep"),
    "too many nodes": (flow_list(MAX_RULES_NODES), f":2: at '(syntax)': more than {MAX_RULES_NODES} YAML nodes"),
    "latin-1": ("settle: 10m\nname: café\n".encode("latin-1"), ": at '(file)': not UTF-8 text (byte 0xe9 at offset 21)"),
    "binary": (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 4, ": at '(file)': not UTF-8 text (byte 0x89 at offset 0)"),
    "NUL byte": (b"settle: 10m\nname: a\x00b\n", ":2: at '(syntax)': character #x0000: special characters are not allowed"),
}


def run_flatd(args: list[str], home: Path) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "HOME": str(home), "NO_COLOR": "1"}
    env.pop("FLATD_CONFIG", None)
    started = time.perf_counter()
    result = subprocess.run([str(FLATD), *args], capture_output=True, text=True, env=env, timeout=RUNAWAY)
    return result, time.perf_counter() - started


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("case", HOSTILE)
def test_a_hostile_rules_file_is_refused(tmp_path, record_property, command, case):
    content, expected = HOSTILE[case]
    rules = tmp_path / "flatd.yaml"
    rules.write_bytes(content)
    result, seconds = run_flatd([*COMMANDS[command], str(rules)], tmp_path)
    record_property("wall_seconds", round(seconds, 3))
    assert result.returncode == 2, result.stderr
    assert f"{rules}{expected}" in result.stderr
    assert "Traceback" not in result.stderr


def test_many_nodes_under_the_limit_are_still_valid(tmp_path, record_property):
    rules = tmp_path / "flatd.yaml"
    rules.write_bytes(b"capture: [{path: captures}]\n" + flow_list(MAX_RULES_NODES - 20, item="FILT"))
    result, seconds = run_flatd(["config", "check", str(rules)], tmp_path)
    record_property("wall_seconds", round(seconds, 3))
    assert result.returncode == 0, result.stderr
    assert f"{rules}: valid" in result.stdout


def test_an_empty_rules_file_says_what_run_once_would_say(tmp_path):
    """Valid YAML, but nothing to run: `config check` does not call it valid."""
    rules = tmp_path / "flatd.yaml"
    rules.write_bytes(b"")
    check, _ = run_flatd(["config", "check", str(rules)], tmp_path)
    run_once, _ = run_flatd(["run-once", "--config", str(rules)], tmp_path)
    assert check.returncode == run_once.returncode == 2
    assert "valid" not in check.stdout
    assert "names no capture folder" in check.stderr and "names no capture folder" in run_once.stderr
    shown, _ = run_flatd(["config", "show", str(rules)], tmp_path)
    assert shown.returncode == 0 and "capture: []" in shown.stdout
