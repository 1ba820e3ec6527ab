#!/usr/bin/env python3
"""Figures for issue 7 (a script, not a test): hostile rules files and run-once's wait.

    python bench/reliability.py

1. `flatd config check` and `flatd run-once` on hostile rules files (an alias bomb of
   9 levels, a 2 MiB file, a 50 MB file, 10,000 levels of nesting, too many nodes, not
   UTF-8): wall time, peak RSS (through /usr/bin/time) and the exit code.
2. What run-once's wait for `stable` costs a capture program that calls it right after
   its last flat: run-once on five flats written just now, with `stable: 2s`, against
   `--no-wait`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from astropy.io import fits

FLATD = [sys.executable, "-m", "flatd.cli"]


def timed(args: list[str]) -> tuple[float, float, int]:
    """Wall seconds, peak RSS in MB and exit code of one process (killed after 60 s)."""
    with tempfile.NamedTemporaryFile("r") as report:
        started = time.monotonic()
        try:
            proc = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", report.name, *args],
                                  capture_output=True, timeout=60)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            return 60.0, float("nan"), -9
        seconds = time.monotonic() - started
        lines = [line for line in Path(report.name).read_text().splitlines() if line.strip().isdigit()]
        return seconds, int(lines[-1]) / 1024 if lines else float("nan"), code


def hostile_rules(folder: Path) -> dict[str, Path]:
    files = {}
    bomb = ['a: &a ["x","x","x","x","x","x","x","x","x"]']
    for level, name in enumerate("bcdefghi"):
        previous = "abcdefghi"[level]
        bomb.append(f"{name}: &{name} [" + ",".join([f"*{previous}"] * 9) + "]")
    files["alias bomb, 9 levels"] = bomb
    files["2 MiB of comments"] = ["# " + "x" * 1000] * 2100
    files["50 MB of comments"] = ["# " + "x" * 1000] * 52000
    files["10,000 levels of ["] = ["capture: " + "[" * 10000 + "]" * 10000]
    files["150,000 list items"] = ["rules:"] + ["  - 1"] * 150000
    out = {}
    for name, lines in files.items():
        path = folder / (name.replace(" ", "_").replace(",", "") + ".yaml")
        path.write_text("\n".join(lines) + "\n")
        out[name] = path
    latin = folder / "latin1.yaml"
    latin.write_bytes("capture:\n  - path: /data/caméra\n".encode("latin-1"))
    out["not UTF-8 (latin-1)"] = latin
    return out


def flats_just_written(root: Path, n: int = 5) -> Path:
    night = root / "cap" / "night1"
    night.mkdir(parents=True)
    for i in range(n):
        hdu = fits.PrimaryHDU(np.full((400, 600), 20000 + 100 * i, np.uint16))
        hdu.header.update(IMAGETYP="FLAT", FILTER="R", EXPTIME=2.0)
        hdu.writeto(night / f"flat_{i}.fits")
    return night


def run_once_wait(root: Path, wait: bool) -> float:
    case = root / ("wait" if wait else "nowait")
    flats_just_written(case)
    config = case / "flatd.yaml"
    config.write_text(f"capture: [{{path: {case / 'cap'}}}]\nstable: 2s\nstate: {case / 'state'}\n"
                      "precalibration: {mode: none}\ngrouping: {min_group_size: 3}\n")
    seconds, _, code = timed(FLATD + ["run-once", "--config", str(config)] + ([] if wait else ["--no-wait"]))
    assert code == 0, code
    return seconds


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        print("Hostile rules files (limits: 1 MiB, 20,000 nodes, 50 levels, no aliases)\n")
        print(f"| rules file | bytes | command | exit | wall s | peak RSS MB |")
        print("|---|---:|---|---:|---:|---:|")
        for name, path in hostile_rules(folder).items():
            for command in (["config", "check", str(path)], ["run-once", "--config", str(path)]):
                seconds, rss, code = timed(FLATD + command)
                print(f"| {name} | {path.stat().st_size} | {command[0]} | {code} | {seconds:.2f} | {rss:.0f} |")
        print("\nrun-once right after the last flat, stable: 2s (5 flats of 600x400)\n")
        nowait = min(run_once_wait(folder / f"a{i}", wait=False) for i in range(3))
        waited = min(run_once_wait(folder / f"b{i}", wait=True) for i in range(3))
        print(f"| run-once | wall s |\n|---|---:|\n| --no-wait | {nowait:.2f} |\n| waiting for stable | {waited:.2f} |")
        print(f"\nthe wait cost {waited - nowait:.2f} s (stable is 2 s)")


if __name__ == "__main__":
    os.environ.pop("FLATD_CONFIG", None)
    main()
