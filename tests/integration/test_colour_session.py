"""A colour (CFA) session end to end through the installed `flatd run-once` and `flatd inspect --adu`."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from flatd.stack.cfa import CHANNELS, Layout, channel_masks, channel_means

from fitstree import BIAS_LEVEL, pattern, write_fits

FLATD = shutil.which("flatd", path=str(Path(sys.executable).parent)) or "flatd"
# GRBG starting one column in: the stored image starts R G / G B.
LAYOUT = Layout("GRBG", (1, 0))
RESPONSE = {"R": 0.8, "G": 1.0, "B": 0.6}
SHAPE = (60, 80)
CAMERA = dict(INSTRUME="ZWO ASI183MC", GAIN=111, OFFSET=10, XPIXSZ=2.4, YPIXSZ=2.4, BAYERPAT="GRBG", XBAYROFF=1,
              YBAYROFF=0, XBINNING=1, YBINNING=1, CCD_TEMP=18.0)

RULES = """
capture:
  - path: {root}/captures
output:
  directory: masters
inputs:
  move_to: null
grouping:
  min_group_size: 3
precalibration:
  mode: auto
  library: {root}/calib
combine:
  method: sigma
  sigma: 3.0
  equalize_cfa: {equalize}
stable: 0
state: {root}/state
"""


def flatd(*args) -> subprocess.CompletedProcess:
    proc = subprocess.run([FLATD, *map(str, args)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"flatd {args} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def response_mosaic() -> np.ndarray:
    out = np.zeros(SHAPE)
    for colour, mask in channel_masks(SHAPE, LAYOUT).items():
        out[mask] = RESPONSE[colour]
    return out


def colour_session(root: Path, equalize: bool, n: int = 5) -> Path:
    """n colour flats whose sky level drifts (twilight), two biases, and the rules."""
    rng = np.random.default_rng(11)
    light = pattern(*SHAPE) * response_mosaic()
    for i in range(n):
        signal = 20000.0 * (1 + 0.04 * i) * light
        data = rng.normal(signal, np.sqrt(signal)) + BIAS_LEVEL
        write_fits(root / "captures" / "night1" / f"Flat_{i:04d}.fit", np.clip(data, 0, 65535).astype(np.uint16),
                   IMAGETYP="Flat", EXPTIME=1.0, DATE_OBS=f"2026-11-24T16:50:{i:02d}.000", **CAMERA)
    for i in range(2):
        write_fits(root / "calib" / f"Bias_{i}.fit", rng.normal(BIAS_LEVEL, 3.0, SHAPE).astype(np.uint16),
                   IMAGETYP="Bias", EXPTIME=0.0, **CAMERA)
    config = root / "flatd.yaml"
    config.write_text(RULES.format(root=root, equalize=str(equalize).lower()))
    return config


def master_of(root: Path, equalize: bool):
    flatd("run-once", "--config", colour_session(root, equalize))
    (path,) = sorted((root / "captures" / "masters").glob("*.fits"))
    with fits.open(path) as hdul:
        return hdul[0].header, hdul[0].data.astype(np.float64)


def test_master_keeps_the_mosaic_its_layout_and_colour_balance(tmp_path):
    header, data = master_of(tmp_path, equalize=False)
    assert data.shape == SHAPE  # still a mosaic
    assert (header["BAYERPAT"], header["XBAYROFF"], header["YBAYROFF"]) == ("GRBG", 1, 0)
    assert (header["GAIN"], header["OFFSET"], header["XPIXSZ"]) == (111, 10, 2.4)
    means = channel_means(data, Layout(header["BAYERPAT"], (header["XBAYROFF"], header["YBAYROFF"])))
    # one normalization factor per frame: the channels keep the inputs' balance
    assert means["R"] / means["G"] == pytest.approx(0.8, rel=5e-3)
    assert means["B"] / means["G"] == pytest.approx(0.6, rel=5e-3)
    assert not any("equalize_cfa" in str(h) for h in header["HISTORY"])


def test_equalize_cfa_gives_channels_one_mean(tmp_path):
    header, data = master_of(tmp_path, equalize=True)
    layout = Layout(header["BAYERPAT"], (header["XBAYROFF"], header["YBAYROFF"]))
    means = channel_means(data, layout)
    assert max(means.values()) - min(means.values()) <= 1e-6 * means["G"]  # float32 precision
    # the illumination pattern is still there, within each channel
    r = data[channel_masks(SHAPE, layout)["R"]].reshape(SHAPE[0] // 2, SHAPE[1] // 2)
    assert r[15, 20] > 1.2 * r[0, 0]
    assert any("equalize_cfa" in str(h) for h in header["HISTORY"])


def test_inspect_adu_shows_r_g_b_for_colour_frames(tmp_path):
    colour_session(tmp_path, equalize=False)
    mono = write_fits(tmp_path / "mono" / "flat.fits", np.full(SHAPE, 1000, dtype=np.uint16), IMAGETYP="FLAT")
    flat = tmp_path / "captures" / "night1" / "Flat_0000.fit"
    out = flatd("inspect", "--adu", flat).stdout
    assert "mean R" in out and "mean G" in out and "mean B" in out
    row = next(line for line in out.splitlines() if "Flat_0000" in line)
    data = fits.getdata(flat).astype(np.float64)
    means = channel_means(data, LAYOUT)
    for colour in CHANNELS:
        assert f"{means[colour]:.1f}" in row, colour
    assert "mean R" not in flatd("inspect", "--adu", mono).stdout  # mono tables as before
