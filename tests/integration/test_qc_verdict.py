"""The master checks through `flatd run-once`: the verdict in the header, the ledger,
`flatd status` and the report; a second night compared with the first; bad masters."""

from __future__ import annotations

import re

import numpy as np
from astropy.io import fits

from flatd.cli import main
from flatd.ledger import DONE, Ledger
from flatd.notify import events as E

from fitstree import BIAS_LEVEL, pattern, write_fits

SHAPE = (120, 160)
RULES = """
capture:
  - path: {root}/captures
output:
  directory: masters
inputs:
  move_to: "originals"
grouping:
  min_group_size: 3
precalibration:
  mode: pedestal
  pedestal: {bias}
combine:
  method: median
stable: 0
state: {root}/state
quality:
{quality}
"""


def night(tree, folder: str, donut: tuple[float, float], n: int = 6, date: str = "2026-11-24") -> None:
    """n flats with one dust donut at (x, y), radius 8, 5 % deep; photon noise."""
    h, w = SHAPE
    y, x = np.mgrid[0:h, 0:w]
    ring = np.exp(-((np.hypot(x - donut[0], y - donut[1]) - 8) / 3.0) ** 2)
    signal_shape = pattern(h, w) * (1 - 0.05 * ring)
    for i in range(n):
        signal = 20000 * (1 + 0.02 * i) * signal_shape
        data = tree.rng.normal(signal, np.sqrt(signal)) + BIAS_LEVEL
        write_fits(tree.root / "captures" / folder / f"flat_{i:03d}.fits",
                   np.clip(data, 0, 65535).astype(np.uint16), IMAGETYP="FLAT", EXPTIME=2.0, CCD_TEMP=-10.0,
                   XBINNING=1, YBINNING=1, FILTER="R", INSTRUME="ZWO ASI2600MM Pro",
                   DATE_OBS=f"{date}T18:00:00.000")


def rules(tree, quality: str = "  enabled: true"):
    return tree.rules(RULES.format(root=tree.root, bias=BIAS_LEVEL, quality=quality))


def masters(tree):
    return sorted((tree.root / "captures" / "masters").glob("*.fits"))


def test_verdict_in_header_ledger_status_and_report(tree, capsys):
    night(tree, "night1", (50, 40))
    config = rules(tree)
    assert main(["run-once", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    [master] = masters(tree)
    header = fits.getheader(master)
    assert header["QCSTATUS"] == "good"
    assert 0.7 < header["QCNOISEX"] < 1.5
    for key in ("QCNOISE", "QCREJLO", "QCREJHI", "QCNONFIN", "QCZERO", "QCSAT", "QCFIELD"):
        assert key in header
    assert "QCPREV" not in header  # the first master of this setup
    assert "checks: good" in out
    ledger = Ledger.open(tree.root / "state")
    try:
        assert ledger.recent_masters(1)[0]["qc_status"] == "good"
    finally:
        ledger.close()
    assert main(["status", "--config", str(config)]) == 0
    status = capsys.readouterr().out
    assert re.search(r"good\s+\S*" + re.escape(master.name), status)


def test_second_night_with_a_moved_donut_is_compared_with_the_first(tree, capsys):
    night(tree, "night1", (50, 40))
    config = rules(tree)
    assert main(["run-once", "--config", str(config)]) == 0
    [first] = masters(tree)
    capsys.readouterr()
    night(tree, "night2", (110, 80), date="2026-11-25")
    with E.ReportSubscriber() as seen:
        assert main(["run-once", "--config", str(config)]) == 0
    captured = capsys.readouterr()
    out = captured.out
    [second] = [m for m in masters(tree) if m != first]
    header = fits.getheader(second)
    assert header["QCPREV"] == first.name
    assert header["QCNDUST"] == 2
    assert header["QCSTATUS"] == "warn"
    dust = [str(line) for line in header["HISTORY"] if str(line).startswith("QC dust")]
    places = {}
    for line in dust:
        kind, x, y = re.match(r"QC dust (\w+) at x=(\d+) y=(\d+)", line).groups()
        places[kind] = (int(x), int(y))
    assert abs(places["went"][0] - 50) <= 3 and abs(places["went"][1] - 40) <= 3
    assert abs(places["appeared"][0] - 110) <= 3 and abs(places["appeared"][1] - 80) <= 3
    assert "1 appeared, 1 went" in out and f"against {first.name}" in out
    [event] = seen.of(E.MasterChecked)
    assert event.status == "warn" and event.previous == first and event.dust == 2
    assert event.level == E.WARNING
    assert re.search(r"warning: \S+: checks warn: .*dust changed", captured.err)
    [done] = seen.of(E.BatchDone)  # the run's last line counts it
    assert (done.masters, done.warn, done.bad) == (1, 1, 0)
    assert "run-once: 1 master(s) written (1 warn by the checks), 0 group(s) failed" in captured.err
    assert main(["status", "--config", str(config)]) == 0
    assert "dust changed" in capsys.readouterr().out


def test_a_bad_master_is_written_under_its_own_name_and_its_inputs_moved(tree, capsys):
    night(tree, "night1", (50, 40))
    config = rules(tree, "  field_warn: 1.1\n  field_bad: 1.2")  # the vignetting is ~1.6: bad
    assert main(["run-once", "--config", str(config)]) == 0
    [master] = masters(tree)
    assert master.name.endswith("-QCBAD.fits")
    assert fits.getheader(master)["QCSTATUS"] == "bad"
    folder = tree.root / "captures" / "night1"
    assert not list(folder.glob("flat_*.fits"))
    assert len(list((folder / "originals").glob("flat_*.fits"))) == 6
    captured = capsys.readouterr()
    assert "checks: bad" in captured.out
    assert "run-once: 1 master(s) written (1 bad by the checks)" in captured.err


def test_bad_keeps_inputs_leaves_them_in_place_and_not_combined_again(tree, capsys):
    night(tree, "night1", (50, 40))
    config = rules(tree, "  field_warn: 1.1\n  field_bad: 1.2\n  bad_keeps_inputs: true")
    assert main(["run-once", "--config", str(config)]) == 0
    [master] = masters(tree)
    assert master.name.endswith("-QCBAD.fits")
    folder = tree.root / "captures" / "night1"
    assert len(list(folder.glob("flat_*.fits"))) == 6
    assert not (folder / "originals").exists()
    assert "inputs kept in place" in capsys.readouterr().out
    ledger = Ledger.open(tree.root / "state")
    try:
        [job] = ledger.jobs()
        assert job.state == DONE and ledger.pending_moves() == []
    finally:
        ledger.close()
    assert main(["run-once", "--config", str(config)]) == 0
    assert masters(tree) == [master]


def test_checks_off_write_no_verdict(tree):
    night(tree, "night1", (50, 40))
    assert main(["run-once", "--config", str(rules(tree, "  enabled: false"))]) == 0
    [master] = masters(tree)
    assert "QCSTATUS" not in fits.getheader(master)


def test_a_large_previous_master_is_read_ahead_while_the_job_stacks(tree, capsys, monkeypatch):
    # a master wider than 1024 px is compared binned; the previous one is read (binned as it
    # is read) in a thread while the new one is stacked, and not read again by the check
    import threading

    from flatd.qc import previous as P

    monkeypatch.setattr("test_qc_verdict.SHAPE", (640, 1300))
    night(tree, "night1", (300, 200), n=4)
    config = rules(tree)
    assert main(["run-once", "--config", str(config)]) == 0
    [first] = masters(tree)
    reads = []
    real = P.read_binned
    monkeypatch.setattr(P, "read_binned", lambda *a: reads.append(threading.current_thread().name) or real(*a))
    night(tree, "night2", (900, 400), n=4, date="2026-11-25")
    capsys.readouterr()
    assert main(["run-once", "--config", str(config)]) == 0
    [second] = [m for m in masters(tree) if m != first]
    header = fits.getheader(second)
    assert header["QCPREV"] == first.name and header["QCNDUST"] == 2
    assert len(reads) == 1 and reads[0].startswith("flatd-read-ahead"), reads
