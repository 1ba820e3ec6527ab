"""`flatd qc` on the demo tree: last night's flats checked before combining them."""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from flatd.cli import main
from flatd.demo import write_demo

FLATD = shutil.which("flatd", path=str(Path(sys.executable).parent)) or "flatd"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return write_demo(tmp_path_factory.mktemp("qc") / "demo")


def _digests(paths):
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


def test_the_problem_nights_flats_are_named_with_their_reasons(demo, capsys):
    (group,) = demo.problem_groups
    before = _digests(group.files)
    code = main(["qc", *map(str, group.files), "--config", str(demo.config)])
    out = capsys.readouterr().out
    assert code == 1, out
    assert f"{len(group.files)} flat(s); calibration: " in out and "DARKFLAT" in out
    for path in group.files:
        verdict = "leave-out" if path in demo.faults else "ok"
        assert re.search(rf"{path.name}\s.*{verdict}", out), (path.name, out)
    over = next(p for p, f in demo.faults.items() if f == "over-exposed")
    assert re.search(rf"{over.name}: level 0\.9\d+ of full scale", out), out
    assert f"{over.name}: " in out and "at full scale (65535), above quality.max_saturated" in out
    for path, fault in demo.faults.items():
        if fault != "over-exposed":
            assert f"{path.name}: odd frame out" in out, (fault, out)
    assert _digests(group.files) == before
    assert all(p.exists() for p in group.files)


def test_installed_flatd_qc_on_a_clean_night(demo):
    (group,) = [g for g in demo.groups if (g.filter, g.binning, g.setpoint) == ("R", 1, -10.0)]
    proc = subprocess.run([FLATD, "qc", *map(str, group.files), "--config", str(demo.config)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "all good" in proc.stdout and "leave-out" not in proc.stdout
    assert all(path.name in proc.stdout for path in group.files)
