"""Real frames from real cameras, read in place from ../shared/realdata."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from flatd.cli import main

REALDATA = Path(__file__).resolve().parents[2].parent / "shared" / "realdata"
pytestmark = pytest.mark.skipif(not REALDATA.is_dir(), reason="../shared/realdata is not beside the project")


def _normalized(data: np.ndarray) -> np.ndarray:
    data = np.asarray(data, dtype=np.float64)
    return data / np.median(data)


def test_lowell_sky_flats_with_the_bias_library(tmp_path, capsys):
    """Sky flats whose level falls as the sky darkens, FILTNAME/DETTEMP/CCDSUM dialect."""
    rules = tmp_path / "flatd.yaml"
    rules.write_text(f"""
capture:
  - path: {REALDATA / 'lowell-nasa42' / 'flat'}
output: {{directory: {tmp_path / 'masters'}}}
inputs: {{move_to: null}}
grouping: {{min_group_size: 5}}
precalibration: {{mode: auto, library: {REALDATA / 'lowell-nasa42' / 'bias'}}}
combine: {{method: sigma, sigma: 2.0}}
state: {tmp_path / 'state'}
""")
    assert main(["run-once", "--config", str(rules)]) == 0
    out = capsys.readouterr().out
    (master,) = sorted((tmp_path / "masters").glob("*.fits"))
    header = fits.getheader(master)
    assert header["FILTER"] == "VR" and header["XBINNING"] == 3 and header["NCOMBINE"] == 7
    history = "".join(card.strip() for card in header["HISTORY"])
    assert "20190326.0001.fits" in history  # the bias chosen from the library
    assert "20190326.0100.fits" in out and "min_group_size" in out  # the lone V flat
    data = fits.getdata(master)
    assert np.isfinite(data).all()
    # The master has the shape of every input flat (bias-subtracted, normalized), trimmed
    # to their TRIMSEC [18:1382,1:1370] (precalibration.overscan: auto).
    trim = (slice(None), slice(17, 1382))
    bias = fits.getdata(REALDATA / "lowell-nasa42" / "bias" / "20190326.0001.fits").astype(np.float64)[trim]
    m = _normalized(data)[100:-100, 100:-100]
    for name in ("20190326.0110.fits", "20190326.0115.fits"):
        flat = fits.getdata(REALDATA / "lowell-nasa42" / "flat" / name).astype(np.float64)[trim] - bias
        f = _normalized(flat)[100:-100, 100:-100]
        assert np.corrcoef(m.ravel(), f.ravel())[0, 1] > 0.9
    # Nothing was moved or written beside the real data.
    assert sorted(p.name for p in (REALDATA / "lowell-nasa42" / "flat").iterdir()) == [
        f"20190326.{n:04d}.fits" for n in (100, 101, 110, 111, 112, 113, 114, 115)]


def test_qhy_twilight_flats_need_scaling_before_rejection(tmp_path):
    """Three twilight flats at 17016, 21777 and 22625 ADU: without normalization, sigma
    clipping with z below 1 throws away whole frames pixel by pixel and the master's
    noise rises; scaled first, the three agree and are averaged."""
    files = sorted(str(p) for p in (REALDATA / "qhy268m-twilight-B").glob("*.fits"))
    results = {}
    for normalize in ("none", "multiplicative"):
        out = tmp_path / f"{normalize}.fits"
        assert main(["combine", "-s", "0.9", "-rp", "--normalize", normalize, "-o", str(out), *files]) == 0
        results[normalize] = _normalized(fits.getdata(out))
    mean_of_scaled = np.mean([_normalized(fits.getdata(f)) for f in files], axis=0)
    core = (slice(100, -100), slice(100, -100))
    err = {k: np.std((v - mean_of_scaled)[core]) for k, v in results.items()}
    assert err["multiplicative"] < err["none"] / 2


def test_maxim_flat_with_another_cameras_bias_fails_clearly(tmp_path, capsys):
    """The MaxIm test biases (Apogee Alta, ~35855 ADU) match the Aspen flat's size but
    not its camera (~1327 ADU): subtracting one empties the flat. flatd refuses the other
    camera's bias and names both files; told to ignore the camera (precalibration.match),
    the empty flat is still caught. Either way it writes nothing and exits 1; without
    calibration the flat combines."""
    flat = REALDATA / "maxim-apogee" / "aspen_trimmed.fit"
    out = tmp_path / "m.fits"
    assert main(["combine", "-m", "-a", str(REALDATA / "maxim-apogee"), "-ab", "-ax", "-o", str(out), str(flat)]) == 1
    text = " ".join(capsys.readouterr().out.split())
    assert "aspen_trimmed.fit" in text and "biastest2.fit" in text
    assert "has camera 'apogee alta', the flat's 'apogee aspen cg16m'" in text
    rules = tmp_path / "flatd.yaml"
    rules.write_text("precalibration:\n  match: [gain, offset]\n")
    assert main(["combine", "-c", str(rules), "-m", "-a", str(REALDATA / "maxim-apogee"), "-ab", "-ax",
                 "-mg", "1", "-od", str(tmp_path / "masters"), str(flat)]) == 1
    text = capsys.readouterr().out
    # the flat checks find the emptied flat first (quality.min_level), naming the bias
    assert "aspen_trimmed.fit" in text and "biastest2.fit" in text
    assert "level is 0" in text or "level 0 of full scale (65535), below quality.min_level 0.15" in text
    assert not out.exists() and not list((tmp_path / "masters").glob("*.fits"))
    # ~1327 ADU is 2 % of full scale: the flat checks leave it out unless told otherwise
    unchecked = tmp_path / "unchecked.yaml"
    unchecked.write_text("grouping: {size: false, filter: false, temperature: null}\nquality: {enabled: false}\n"
                         "inputs: {move_to: null}\n")  # the shared real data is never moved
    assert main(["combine", "-c", str(unchecked), "-m", "-rp", "-mg", "1", "-o", str(out), str(flat)]) == 0
    assert fits.getheader(out)["NCOMBINE"] == 1
    assert np.median(fits.getdata(out)) == pytest.approx(1327, abs=1)


def test_inspect_real_frames_with_mean_adu(capsys):
    assert main(["inspect", str(REALDATA / "qhy268m-twilight-B"), "--adu", "--sort", "adu"]) == 0
    out = capsys.readouterr().out
    assert out.index("flat1.fits") < out.index("flat2.fits") < out.index("flat3.fits")
