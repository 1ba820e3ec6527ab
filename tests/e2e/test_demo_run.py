"""The installed `flatd` on a generated session with a known illumination pattern."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from flatd.demo import write_demo

FLATD = shutil.which("flatd", path=str(Path(sys.executable).parent)) or "flatd"


def flatd(*args, cwd=None, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.run([FLATD, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"flatd {' '.join(map(str, args))} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def _digests(paths):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo") / "session"
    session = write_demo(root)
    before = _digests(session.flat_files)
    proc = flatd("run-once", "--config", session.config)
    masters = sorted(session.captures.rglob("masters/*.fits"))
    return session, before, proc, masters


def _master_of(group, masters):
    """The master of a demo group: its filter, binning, set-point and night (DATE-OBS)."""
    (master,) = [m for m in masters
                 if fits.getheader(m).get("FILTER") == group.filter and fits.getheader(m)["XBINNING"] == group.binning
                 and abs(fits.getheader(m)["CCD-TEMP"] - group.setpoint) < 2
                 and fits.getheader(m)["DATE-OBS"][:10] == group.night.isoformat()]
    return master


def test_one_master_per_combinable_group(demo_run):
    session, _, proc, masters = demo_run
    assert len(masters) == len(session.combinable)
    labels = {(fits.getheader(m).get("FILTER"), fits.getheader(m)["XBINNING"], round(fits.getheader(m)["CCD-TEMP"]))
              for m in masters}
    assert labels == {(g.filter, g.binning, round(g.setpoint)) for g in session.combinable}
    assert {_master_of(g, masters) for g in session.combinable} == set(masters)


def test_masters_match_the_illumination_within_the_noise(demo_run):
    session, _, _, masters = demo_run
    for group in session.combinable:
        master = _master_of(group, masters)
        data = fits.getdata(master).astype(np.float64)
        residual = data / data.mean() - session.illumination(group)
        noise = session.expected_noise(group)
        z = residual / noise
        # Sigma clipping at 2 trims the tails a little: the spread is at most that of a plain mean.
        assert np.sqrt(np.mean(z**2)) < 1.3, group.label
        assert np.abs(z).max() < 8, group.label


def test_cosmic_ray_hits_are_gone_with_sigma_clip(demo_run):
    session, _, _, masters = demo_run
    assert session.cosmic_rays, "the demo should have cosmic-ray hits"
    for group in session.combinable:
        master = _master_of(group, masters)
        data = fits.getdata(master).astype(np.float64)
        expected = data.mean() * session.illumination(group)
        noise = session.expected_noise(group) * data.mean()
        for path in group.combined:
            for row, col in session.cosmic_rays.get(path.name, ()):
                assert abs(data[row, col] - expected[row, col]) < 6 * noise[row, col], (path.name, row, col)


def test_inputs_moved_byte_identical_and_others_left(demo_run):
    session, before, proc, _ = demo_run
    moved = [p for p in session.captures.rglob("originals-*/*") if p.is_file()]
    combined = {p.name for g in session.combinable for p in g.combined}
    assert {p.name for p in moved} == combined
    after = _digests(moved)
    assert all(after[name] == before[name] for name in combined)
    for group in session.groups:
        if group.too_few:
            assert all(p.exists() for p in group.files)
    assert session.faults and all(p.exists() for p in session.faults)  # left out: never moved
    for other in session.others:
        assert other.exists()
    assert "left out" in proc.stdout


def test_second_run_makes_nothing_and_exits_0(demo_run):
    session, _, _, masters = demo_run
    proc = flatd("run-once", "--config", session.config)
    assert sorted(session.captures.rglob("masters/*.fits")) == masters
    assert "wrote" not in proc.stdout


def test_inspect_lists_the_masters_as_masters(demo_run):
    session, _, _, masters = demo_run
    proc = flatd("inspect", masters[0].parent, "--adu", "--sort", "filter")
    assert proc.stdout.count("master") >= len(masters)


def test_help_and_usage_errors(tmp_path):
    assert flatd("--help").returncode == 0
    bad = flatd("combine", "--sigma", "abc", "x.fits", check=False)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    missing = flatd("run-once", "--config", tmp_path / "nope.yaml", check=False)
    assert missing.returncode == 2 and "does not exist" in missing.stderr


def test_config_check_reports_every_error_with_line(tmp_path):
    rules = tmp_path / "r.yaml"
    rules.write_text("capture:\n  - path: /x\n    poll: sometimes\ncombine:\n  method: average\n")
    proc = flatd("config", "check", rules, check=False)
    assert proc.returncode == 2
    assert f"{rules}:3: at 'capture[0].poll'" in proc.stderr
    assert f"{rules}:5: at 'combine.method'" in proc.stderr
    ok = flatd("config", "check", Path(__file__).parents[2] / "config" / "flatd.example.yaml")
    assert "valid" in ok.stdout


def test_run_once_into_one_log_file_says_each_thing_once(tmp_path):
    """`flatd run-once >> run-once.log 2>&1` (cron, a N.I.N.A. batch file): timestamped
    log lines, each master and each left-out file once, one summary line; no report
    repeating them."""
    import os
    import re

    session = write_demo(tmp_path / "session")
    log = tmp_path / "run-once.log"
    log.write_text("")
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    with open(log, "ab") as out:
        rc = subprocess.run([FLATD, "run-once", "--config", str(session.config)], stdout=out,
                            stderr=subprocess.STDOUT, env=env, timeout=300).returncode
    text = log.read_text()
    assert rc == 0, text
    lines = text.splitlines()
    stamp = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ")
    assert lines and all(stamp.match(line) for line in lines), text
    messages = [stamp.sub("", line) for line in lines]
    assert len(messages) == len(set(messages)), text
    masters = sorted(session.captures.rglob("masters/*.fits"))
    assert masters
    for master in masters:
        assert text.count(str(master)) == 1, text
    (summary,) = [m for m in messages if m.startswith("run-once: ")]
    from astropy.io import fits

    warned = sum(1 for m in masters if fits.getheader(m).get("QCSTATUS") == "warn")  # the moved dust donut
    assert warned >= 1
    assert summary.startswith(f"run-once: {len(masters)} master(s) written ({warned} warn by the checks), "
                              "0 group(s) failed")
    assert f" masters={len(masters)} failed=0" in summary and f" warn={warned} bad=0" in summary


def test_colour_master_keeps_its_mosaic_and_balance(demo_run):
    from flatd.demo import CFA_RESPONSE
    from flatd.stack.cfa import Layout, channel_means

    session, _, _, masters = demo_run
    (master,) = [m for m in masters if "BAYERPAT" in fits.getheader(m)]
    header = fits.getheader(master)
    assert (header["BAYERPAT"], header["XBAYROFF"], header["YBAYROFF"]) == ("RGGB", 0, 0)
    assert "FILTER" not in header and header["XPIXSZ"] == 2.4
    means = channel_means(fits.getdata(master).astype(np.float64), Layout("RGGB"))
    assert means["R"] / means["G"] == pytest.approx(CFA_RESPONSE[0], rel=0.01)
    assert means["B"] / means["G"] == pytest.approx(CFA_RESPONSE[2], rel=0.01)


def test_the_problem_night_is_caught(demo_run):
    """Night 3: the over-exposed flat, the light leak and the cloud are left out by name
    with their reasons, and its R master reports the moved donut against night 1's."""
    import re

    session, _, proc, masters = demo_run
    out = proc.stdout
    reasons = {path: [line for line in out.splitlines() if line.startswith(f"left out {path}: quality: ")]
               for path in session.faults}
    assert len(reasons) == 3
    width = session.problem_groups[0].shape[1]
    height = session.problem_groups[0].shape[0]
    for path, fault in session.faults.items():
        text = " ".join(reasons[path])
        if fault == "over-exposed":
            assert "above quality.max_level" in text and "at full scale" in text, text
            continue
        assert "odd frame out" in text, (fault, text)
        x, y = map(int, re.search(r"at x=(\d+), y=(\d+)", text).groups())
        if fault == "light leak":  # the top-right corner
            assert x > width / 2 and y < height / 2, text
        else:  # the cloud, over the lower left
            assert x < width / 2 and y > height / 3, text
    problem = _master_of(session.problem_groups[0], masters)
    (first,) = [g for g in session.groups if (g.filter, g.binning, g.setpoint) == ("R", 1, -10.0)]
    night1 = _master_of(first, masters)
    assert fits.getheader(problem)["QCSTATUS"] == "warn"
    assert f"against {night1.name}:" in out
    blobs = {kind: (float(x), float(y)) for kind, x, y in re.findall(r"dust (went|appeared) at x=(\d+) y=(\d+)", out)}
    went, appeared = session.moved_donut
    assert np.hypot(*np.subtract(blobs["went"], went)) < 4, blobs
    assert np.hypot(*np.subtract(blobs["appeared"], appeared)) < 4, blobs
