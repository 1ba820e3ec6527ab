"""`flatd watch` and the flat checks: a left-out flat is never moved, never combined, and
not planned again at every rescan."""

from __future__ import annotations

import time

import pytest
from astropy.io import fits

from watchkit import run_flatd, sha256, wait_until, write_flat, write_rules

pytestmark = pytest.mark.timeout(300)


def test_a_left_out_flat_stays_in_place_and_is_not_planned_again(tmp_path, watches):
    cap = tmp_path / "cap"
    night = cap / "night1"
    night.mkdir(parents=True)
    config = write_rules(tmp_path, settle="2s", rescan="1s")
    w = watches(config).started()
    for i in range(4):
        write_flat(night / f"flat_{i}.fits", seed=i, value=20000 + 100 * i)
    hot = write_flat(night / "flat_hot.fits", seed=9, value=60000)  # 0.91 of full scale
    digest = sha256(hot)
    [rejected] = w.wait_event("flat_rejected_qc")
    assert rejected["path"] == str(hot) and rejected["check"] == "level" and rejected["action"] == "leave-out"
    assert rejected["figure"] > 0.75 == rejected["limit"]
    w.wait_event("master_written")
    wait_until(lambda: not list(night.glob("flat_[0-9].fits")), what="the others moved")
    time.sleep(5.0)  # several rescans (every 1 s) and settle periods
    assert hot.exists() and sha256(hot) == digest, "left where it is, unchanged"
    assert not list(night.glob("originals-*/flat_hot.fits"))
    [master] = sorted((cap / "masters").glob("*.fits"))
    header = fits.getheader(master)
    assert header["NCOMBINE"] == 4
    assert not any("flat_hot" in line for line in header["HISTORY"])
    assert len(w.events("group_planned")) == 1
    assert len(w.events("flat_rejected_qc")) == 1, "planned again"
    assert len(w.events("master_written")) == 1
    status = run_flatd("status", "--config", str(config))
    assert status.returncode == 0
    assert "left out by the quality checks" in status.stdout and "flat_hot.fits" in status.stdout
    assert "above quality.max_level 0.75" in status.stdout
    assert "flat(s) waiting" not in status.stdout
    assert w.stop() == 0
