"""`flatd run-once` with a CMOS library: each flat gets the bias of its own gain and
offset, groups never mix settings, and a flat with no matching frame fails with the reason."""

from __future__ import annotations

import numpy as np
from astropy.io import fits

from flatd.cli import main

from fitstree import BIAS_LEVEL, pattern, write_fits

RULES = """
capture:
  - path: {root}/captures
output:
  directory: masters
  name: "FLAT-{{filter}}-g{{gain}}-o{{offset}}.fits"
inputs:
  move_to: null
grouping:
  min_group_size: 3
precalibration:
  mode: auto
  library: {root}/calib
combine:
  method: mean
stable: 0
state: {root}/state
"""

SHAPE = (30, 40)
CAMERA = "ZWO ASI2600MM Pro"


def _bias_level(gain: float, offset: float) -> float:
    """On a CMOS camera the bias level follows offset and gain."""
    return BIAS_LEVEL + 10 * offset + gain


def _flat(root, name, gain, offset, rng, folder="captures/night1"):
    signal = 20000 * pattern(*SHAPE)
    data = rng.normal(signal, np.sqrt(signal)) + _bias_level(gain, offset)
    return write_fits(root / folder / name, np.clip(data, 0, 65535).astype(np.uint16), IMAGETYP="FLAT",
                      EXPTIME=2.0, CCD_TEMP=-10.0, FILTER="L", INSTRUME=CAMERA, GAIN=gain, OFFSET=offset,
                      DATE_OBS="2026-11-24T18:00:00")


def _bias(root, name, gain, offset, rng, temp=-10.0):
    data = rng.normal(_bias_level(gain, offset), 3.0, SHAPE)
    return write_fits(root / "calib" / name, data.astype(np.uint16), IMAGETYP="BIAS", EXPTIME=0.0,
                      CCD_TEMP=temp, INSTRUME=CAMERA, GAIN=gain, OFFSET=offset)


def _library(root, rng):
    # The wrong biases are the closest in temperature: only the settings keep them out.
    for gain in (100, 200):
        for offset in (10, 30):
            _bias(root, f"bias_g{gain}_o{offset}.fits", gain, offset, rng, temp=-12.0)
    _bias(root, "bias_g0_o0_closest.fits", 0, 0, rng, temp=-10.0)


def _masters(root):
    return {p.name: p for p in (root / "captures" / "masters").glob("*.fits")}


def test_each_group_gets_the_bias_of_its_settings_and_a_group_without_one_fails(tmp_path, capsys):
    rng = np.random.default_rng(3)
    _library(tmp_path, rng)
    for gain, offset in ((100, 10), (200, 30), (300, 10)):
        for i in range(3):
            _flat(tmp_path, f"flat_g{gain}_o{offset}_{i}.fits", gain, offset, rng)
    config = tmp_path / "flatd.yaml"
    config.write_text(RULES.format(root=tmp_path))

    assert main(["run-once", "--config", str(config), "--dry-run"]) == 1
    dry = capsys.readouterr().out
    assert "bias_g100_o10.fits" in dry and "bias_g200_o30.fits" in dry
    assert "ruled out: gain 0, the flat's 100" in " ".join(dry.split())

    assert main(["run-once", "--config", str(config)]) == 1
    out = " ".join(capsys.readouterr().out.split())
    masters = _masters(tmp_path)
    assert sorted(masters) == ["FLAT-L-g100-o10.fits", "FLAT-L-g200-o30.fits"]
    for name, (gain, offset) in (("FLAT-L-g100-o10.fits", (100, 10)), ("FLAT-L-g200-o30.fits", (200, 30))):
        with fits.open(masters[name]) as hdul:
            assert f"bias_g{gain}_o{offset}.fits" in str(hdul[0].header)
            data = hdul[0].data
        # the right bias leaves the pattern alone; a wrong one would shift it by hundreds of ADU
        ratio = data / pattern(*SHAPE)
        assert np.std(ratio) / np.mean(ratio) < 0.02
    assert "flat_g300_o10_0.fits" in out
    assert "has the flat's settings (camera 'zwo asi2600mm pro', gain 300, offset 10)" in out
    # the group that failed is left where it is
    assert len(list((tmp_path / "captures" / "night1").glob("flat_g300_*.fits"))) == 3


def test_autodisplay_says_which_setting_ruled_out_the_closest_frame(tmp_path, capsys):
    rng = np.random.default_rng(4)
    _library(tmp_path, rng)
    flats = [_flat(tmp_path, f"flat_{i}.fits", 200, 10, rng) for i in range(3)]
    code = main(["combine", "-ax", "-a", str(tmp_path / "calib"), "-od", str(tmp_path / "out"),
                 *map(str, flats)])
    out = " ".join(capsys.readouterr().out.split())
    assert code == 0, out
    assert "bias_g200_o10.fits" in out
    assert "ruled out: gain 0, the flat's 200" in out
