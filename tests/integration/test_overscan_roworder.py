"""Overscan on the real Lowell frames, and a bottom-up bias with top-down flats, through `flatd run-once`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from flatd.cli import main

from fitstree import write_fits

REALDATA = Path(__file__).resolve().parents[2].parent / "shared" / "realdata"
LOWELL = REALDATA / "lowell-nasa42"
needs_lowell = pytest.mark.skipif(not LOWELL.is_dir(), reason="../shared/realdata is not beside the project")

RULES = """
capture:
  - path: {flats}
output: {{directory: {out}}}
inputs: {{move_to: null}}
grouping: {{min_group_size: 5}}
precalibration: {{mode: auto, library: {library}{extra}}}
combine: {{method: sigma, sigma: 2.0}}
stable: 0
state: {state}
"""


def _run_lowell(tmp_path: Path, extra: str = "") -> tuple[np.ndarray, fits.Header]:
    """The 7 VR sky flats with the bias library, read in place; the master and its header."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    rules = tmp_path / "flatd.yaml"
    rules.write_text(RULES.format(flats=LOWELL / "flat", library=LOWELL / "bias", out=tmp_path / "masters",
                                  state=tmp_path / "state", extra=extra))
    before = sorted(p.name for p in LOWELL.rglob("*"))
    assert main(["run-once", "--config", str(rules)]) == 0
    assert sorted(p.name for p in LOWELL.rglob("*")) == before  # nothing written beside the real data
    (master,) = sorted((tmp_path / "masters").glob("*.fits"))
    with fits.open(master) as hdul:
        data, header = hdul[0].data.astype(np.float64), hdul[0].header
    assert f"-{data.shape[1]}x{data.shape[0]}-" in master.name  # the name gives the master's own size
    return data, header


def _low_columns(data: np.ndarray) -> int:
    return int((np.median(data, axis=0) < 1000).sum())


@needs_lowell
def test_lowell_master_is_overscan_subtracted_and_trimmed(tmp_path):
    """BIASSEC [1388:1432,1:1370], TRIMSEC [18:1382,1:1370]: without overscan handling
    the master had 66 columns under 1,000 ADU and 23,380 zero pixels."""
    data, header = _run_lowell(tmp_path)
    assert data.shape == (1370, 1365) and (header["NAXIS1"], header["NAXIS2"]) == (1365, 1370)
    assert header["NCOMBINE"] == 7 and header["FILTER"] == "VR"
    assert int((data == 0).sum()) == 0 and _low_columns(data) == 0
    assert np.isfinite(data).all() and data.min() > 100
    assert header["OVERSCAN"] == "BIASSEC [1388:1432,1:1370]"
    assert header["TRIM"] == "TRIMSEC [18:1382,1:1370]"
    assert header["DATASEC"] == "[1:1365,1:1370]"
    assert "BIASSEC" not in header and "TRIMSEC" not in header
    history = "".join(str(card) for card in header["HISTORY"])
    assert "per-row median of BIASSEC [1388:1432,1:1370]" in history and "trimmed to TRIMSEC" in history


@needs_lowell
def test_overscan_off_keeps_the_stored_frames(tmp_path):
    """overscan: off (unquoted: YAML's false) is today's master, overscan strips and all;
    inside the data section it agrees with the trimmed master."""
    off, header = _run_lowell(tmp_path / "off", ", overscan: off")
    assert off.shape == (1370, 1432) and "OVERSCAN" not in header and "TRIM" not in header
    assert _low_columns(off) == 66 and int((off == 0).sum()) > 20000
    trimmed, _ = _run_lowell(tmp_path / "auto")
    core = (slice(50, -50), slice(50, -50))
    a, b = trimmed[core], off[:, 17:1382][core]
    assert np.median(np.abs(a / np.median(a) - b / np.median(b))) < 1e-3


def test_bottom_up_bias_with_top_down_flats(tmp_path):
    """A bias with a strong top-to-bottom ramp, written bottom-up by another program, is
    flipped before it is subtracted from top-down flats that carry the same ramp: the
    master comes out flat and keeps the flats' row order."""
    h, w = 40, 50
    ramp = 500 + 100.0 * np.arange(h)[:, None] * np.ones((1, w))
    rng = np.random.default_rng(2)
    for i in range(5):
        flat = ramp + 20000 * (1 + 0.03 * i) + rng.normal(0, 5, (h, w))
        write_fits(tmp_path / "captures" / f"flat_{i}.fits", flat.astype(np.uint16), IMAGETYP="FLAT", FILTER="R",
                   EXPTIME=2.0, CCD_TEMP=-10.0, DATE_OBS="2026-11-24T18:00:00", ROWORDER="TOP-DOWN")
    write_fits(tmp_path / "calib" / "bias_0.fits", ramp[::-1].astype(np.uint16), IMAGETYP="BIAS", EXPTIME=0.0,
               CCD_TEMP=-10.0, ROWORDER="BOTTOM-UP")
    rules = tmp_path / "flatd.yaml"
    rules.write_text(f"""
capture:
  - path: {tmp_path / 'captures'}
output: {{directory: {tmp_path / 'masters'}}}
inputs: {{move_to: null}}
grouping: {{min_group_size: 5, temperature: null}}
precalibration: {{mode: auto, library: {tmp_path / 'calib'}}}
combine: {{method: mean}}
stable: 0
state: {tmp_path / 'state'}
""")
    assert main(["run-once", "--config", str(rules)]) == 0
    (master,) = sorted((tmp_path / "masters").glob("*.fits"))
    data, header = fits.getdata(master).astype(np.float64), fits.getheader(master)
    rows = np.median(data, axis=1)
    assert np.ptp(rows) < 0.002 * np.median(rows)  # not flipped, the ramp would be 3,900 ADU twice
    assert header["ROWORDER"] == "TOP-DOWN"
    assert "bias_0.fits (BOTTOM-UP) flipped to the flats' TOP-DOWN" in "".join(str(c) for c in header["HISTORY"])


@needs_lowell
def test_a_flat_with_a_hostile_trimsec_is_left_out_naming_it(tmp_path, capsys):
    """Copies of the 7 VR flats, one with a TRIMSEC cut short: it is left out with the
    reason, the other six make the trimmed master."""
    import shutil

    flats = tmp_path / "flats"
    flats.mkdir()
    for n in (101, 110, 111, 112, 113, 114, 115):
        shutil.copy(LOWELL / "flat" / f"20190326.{n:04d}.fits", flats)
    fits.setval(flats / "20190326.0113.fits", "TRIMSEC", value="[18:1382,1:1370")
    rules = tmp_path / "flatd.yaml"
    rules.write_text(RULES.format(flats=flats, library=LOWELL / "bias", out=tmp_path / "masters",
                                  state=tmp_path / "state", extra=""))
    assert main(["run-once", "--config", str(rules)]) == 0
    out = capsys.readouterr().out
    assert "20190326.0113.fits" in out and "TRIMSEC '[18:1382,1:1370' is not a section" in out
    (master,) = sorted((tmp_path / "masters").glob("*.fits"))
    header = fits.getheader(master)
    assert header["NCOMBINE"] == 6 and (header["NAXIS1"], header["NAXIS2"]) == (1365, 1370)
    assert (flats / "20190326.0113.fits").exists()  # left where it is
