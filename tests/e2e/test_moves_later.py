"""`flatd watch` moves the inputs a full move folder refused, once there is room again."""

from __future__ import annotations

import os
import subprocess

import pytest

from watchkit import files_under, sha256, wait_until, write_flat, write_rules

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounts a small tmpfs (CI runs as root)")


def test_watch_retries_the_moves_a_full_folder_refused(tmp_path, watches):
    night = tmp_path / "cap" / "night1"
    flats = [write_flat(night / f"flat_{i}.fits", seed=i) for i in range(5)]
    digests = {p.name: sha256(p) for p in flats}
    away = tmp_path / "away"
    away.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24k", "tmpfs", str(away)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        config = write_rules(tmp_path, inputs=f"{{move_to: {away}}}", rescan="1s")
        w = watches(config).started()
        w.wait_event("master_written")
        w.wait_event("move_failed")
        assert 0 < len(list(night.glob("flat_*.fits"))) < 5
        subprocess.run(["mount", "-o", "remount,size=1m", str(away)], check=True)
        w.wait_event("moves_finished")
        wait_until(lambda: not list(night.glob("flat_*.fits")), what="every input moved")
        assert {p.name: sha256(p) for p in files_under(away, "flat_*.fits")} == digests
        assert len(files_under(tmp_path / "cap" / "masters", "*.fits")) == 1
        assert w.stop() == 0
    finally:
        subprocess.run(["umount", "-l", str(away)], check=False)
