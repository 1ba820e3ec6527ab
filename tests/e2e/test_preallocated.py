"""A writer that sets a file's full size first, then fills it in chunks (some copy tools
do): neither `flatd run-once` nor `flatd watch` reads it before it is filled."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
from astropy.io import fits

from watchkit import flat_bytes, run_flatd, write_flat, write_rules

SHAPE = (200, 300)


def _preallocating_writer(path: Path, data: bytes, pieces: int = 6, pause: float = 0.3) -> threading.Thread:
    """Start a thread that makes `path` its full size at once, then writes `data` into it
    piece by piece; the file holds zeros until the last piece lands."""
    with open(path, "wb") as handle:
        handle.truncate(len(data))
    step = -(-len(data) // pieces)

    def fill():
        fd = os.open(path, os.O_WRONLY)
        try:
            for offset in range(0, len(data), step):
                time.sleep(pause)
                os.pwrite(fd, data[offset:offset + step], offset)
        finally:
            os.close(fd)

    thread = threading.Thread(target=fill)
    thread.start()
    return thread


def _session(tmp_path: Path) -> tuple[Path, Path]:
    night = tmp_path / "cap" / "night1"
    night.mkdir(parents=True)
    for i in range(4):
        write_flat(night / f"flat_{i}.fits", value=1000, shape=SHAPE)
    # flats this dark (1000-2000 ADU) would be left out by the flat checks (quality.min_level)
    config = write_rules(tmp_path, grouping="{min_group_size: 5}", precalibration="{mode: none}",
                         combine="{method: mean, normalize: none}", rescan="1h", settle="1s",
                         quality="{enabled: false}")
    return night, config


def _check_master(cap: Path) -> None:
    (master,) = sorted((cap / "masters").glob("*.fits"))
    with fits.open(master) as hdul:
        assert hdul[0].header["NCOMBINE"] == 5
        # the mean of four flats at 1000 and the complete fifth at 2000: no zeros read
        assert np.allclose(hdul[0].data, 1200.0)


def test_run_once_waits_for_a_preallocated_file_to_be_filled(tmp_path):
    night, config = _session(tmp_path)
    data = flat_bytes(value=2000, shape=SHAPE)
    slow = night / "flat_slow.fits"
    writer = _preallocating_writer(slow, data)
    try:
        result = run_flatd("run-once", "--config", str(config))
    finally:
        writer.join()
    assert result.returncode == 0, result.stdout + result.stderr
    _check_master(tmp_path / "cap")
    moved = list(night.glob("originals-*/flat_slow.fits"))
    assert len(moved) == 1 and moved[0].read_bytes() == data


def test_watch_waits_for_a_preallocated_file_to_be_filled(tmp_path, watches):
    night, config = _session(tmp_path)
    w = watches(config).started()
    data = flat_bytes(value=2000, shape=SHAPE)
    slow = night / "flat_slow.fits"
    _preallocating_writer(slow, data).join()
    w.wait_event("master_written")
    _check_master(tmp_path / "cap")
    assert w.stop() == 0
