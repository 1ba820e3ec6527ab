"""combine.rejection_warn is measured from what the method rejects from clean data at the
group's number of frames: a healthy small group does not warn, a bad frame still does.

Through the commands, as a user runs them (`flatd run-once`, `flatd combine`), on seeded
capture trees. The flats are 120 x 150: one input's rejected fraction then varies by about
0.1 % from frame to frame, well inside the 0.5 % margin (at 40 x 50 a clean frame could
cross it by chance).
"""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits

from flatd.cli import main
from flatd.stack.auto import choose
from flatd.stack.baseline import baseline
from flatd.stack.methods import Method

SHAPE = (120, 150)

RULES = """
capture:
  - path: {root}/captures
output:
  directory: masters
inputs:
  move_to: null
grouping:
  min_group_size: 3
combine:
{combine}
  rejection_warn: 0.005
quality:
  enabled: false  # these flats' blobs are for the rejection report; the checks would leave them out
stable: 0
state: {root}/state
"""

# (rules' combine keys, the method they resolve to for n frames)
METHODS = {
    "auto": ("  method: auto", lambda n: choose(n)[0]),
    "winsorized": ("  method: winsorized\n  low: 3.0\n  high: 3.0", lambda n: Method("winsorized", low=3.0, high=3.0)),
}
CASES = [("auto", 5), ("auto", 6), ("auto", 7), ("winsorized", 5), ("winsorized", 7)]


def _flats(tree, n):
    return [tree.flat(f"flat_R_{i:03d}.fits", level=20000 * (1 + 0.03 * i), shape=SHAPE) for i in range(n)]


def _blob(path, radius: float, gain: float = 1.25):
    """A bright disc on a flat (a cloud lit from below, a light leak): `gain` times the
    value within `radius` (a fraction of the shorter side) of a point off the centre."""
    data = fits.getdata(path).astype(np.float64)
    h, w = data.shape
    y, x = np.mgrid[0:h, 0:w]
    inside = (y - 0.4 * h) ** 2 + (x - 0.6 * w) ** 2 <= (radius * min(h, w)) ** 2
    data[inside] *= gain
    fits.writeto(path, np.clip(data, 0, 65535).astype(np.uint16), fits.getheader(path), overwrite=True)
    return float(inside.mean())


def _run(tree, kind):
    config = tree.rules(RULES.format(root=tree.root, combine=METHODS[kind][0]))
    assert main(["run-once", "--config", str(config)]) == 0
    (master,) = sorted((tree.root / "captures" / "masters").glob("*.fits"))
    header = fits.getheader(master)
    return header["REJLOW"] + header["REJHIGH"], header


@pytest.mark.parametrize("kind, n", CASES)
def test_a_healthy_small_group_does_not_warn(tree, capsys, kind, n):
    _flats(tree, n)
    total, header = _run(tree, kind)
    captured = capsys.readouterr()
    out, err = captured.out.replace("\n", " "), captured.err
    base = baseline(METHODS[kind][1](n), n)
    assert header["COMBMETH"].startswith("ESD" if kind == "auto" else "WinsorizedSigma")
    # the premise: clean flats lose more than 0.5 %, as clean Gaussian data does at this N
    assert total > 0.005 and base.total > 0.005
    assert abs(total - base.total) < 0.003
    assert "clean data at this N: " in out
    assert "warning" not in out and "rejected most" not in out
    assert "rejection_high" not in err and "combine.rejection_warn" not in err


@pytest.mark.parametrize("kind, n", CASES)
def test_a_bad_frame_still_warns_and_is_named(tree, capsys, kind, n):
    paths = _flats(tree, n)
    area = _blob(paths[n // 2], radius=0.3)  # a quarter of the frame 25 % brighter
    assert 0.2 < area < 0.3
    total, _ = _run(tree, kind)
    captured = capsys.readouterr()
    out, err = captured.out.replace("\n", " "), captured.err
    base = baseline(METHODS[kind][1](n), n)
    assert total > base.total + 0.005
    assert "warning" in out and "more than combine.rejection_warn 0.5 % above it" in out
    assert f"(clean data at this N: " in out
    assert f"rejected most {paths[n // 2].name}" in out
    assert "rejected most" not in out.replace(f"rejected most {paths[n // 2].name}", "")  # only the bad one
    assert "more than combine.rejection_warn 0.5 % above it" in err and paths[n // 2].name in err


def test_a_small_blob_on_one_frame_is_a_note_not_a_warning(tree, capsys):
    """One input that lost 2 % more than clean data is named; the master as a whole lost
    less than 0.5 % more: no warning."""
    paths = _flats(tree, 6)
    area = _blob(paths[2], radius=0.08)
    assert 0.015 < area < 0.03
    total, _ = _run(tree, "auto")
    captured = capsys.readouterr()
    out = captured.out.replace("\n", " ")
    base = baseline(METHODS["auto"][1](6), 6)
    assert total < base.total + 0.005
    assert "warning" not in out and f"rejected most {paths[2].name}" in out
    assert "1 input(s) lost more than" in captured.err and "more than combine.rejection_warn" not in captured.err


@pytest.mark.parametrize("bad", [False, True])
def test_flatd_combine_measures_from_the_baseline_too(tree, capsys, bad):
    paths = _flats(tree, 6)
    if bad:
        _blob(paths[4], radius=0.3)
    out_path = tree.root / "master.fits"
    assert main(["combine", "--method", "winsorized", "--low", "3", "--high", "3", "-rp",
                 "-o", str(out_path), *map(str, paths)]) == 0
    captured = capsys.readouterr()
    out = captured.out.replace("\n", " ")
    header = fits.getheader(out_path)
    assert header["REJLOW"] + header["REJHIGH"] > 0.005  # what the rule before the baseline warned about
    assert "clean data at this N: " in out
    if bad:
        assert "warning" in out and f"rejected most {paths[4].name}" in out
    else:
        assert "warning" not in out and "rejected most" not in out
