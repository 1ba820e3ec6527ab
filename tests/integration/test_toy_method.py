"""A method registered in the test, run through `flatd combine` and a rules file.

Adding a method touches the registry (flatd.stack.methods) and the kernel table
(flatd.stack.combine.REJECTIONS) and nothing else: config, cli and masters read the registry.
"trimmed k" drops the k lowest and the k highest values of each pixel (one copy each),
then takes the mean of the rest.
"""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits

from flatd.stack import combine, methods
from flatd.cli import main

TRIM = methods.Param("trim", int, 1, "values dropped at each end of a pixel's column", ge=0, le=50,
                     card="TRIMN", comment="values trimmed at each end", metavar="<k>")


def _trim(stack, r, c0, c1, params, keep):
    """Keep the values whose rank (ties by frame order) is in [k, n - k)."""
    n = stack.shape[0]
    k = int(params[0])
    for c in range(c1 - c0):
        for i in range(n):
            x = stack[i, r, c0 + c]
            rank = 0
            for j in range(n):
                y = stack[j, r, c0 + c]
                if y < x or (y == x and j < i):
                    rank += 1
            keep[i, c] = rank >= k and rank < n - k


@pytest.fixture
def trimmed(monkeypatch):
    monkeypatch.setitem(combine.REJECTIONS, "trim", combine.rejection_kernel(_trim))
    entry = methods.register(methods.Entry(
        "trimmed", "drop the k lowest and k highest values, then mean", params=(TRIM,),
        label=lambda v: f"Trimmed{v['trim']}", describe=lambda v: f"trimmed mean k={v['trim']}",
        reject="trim", estimator="mean", min_frames=lambda v: 2 * v["trim"] + 1,
        flags=("-tm", "--trimmed"), flag_param="trim"))
    yield entry
    methods.unregister("trimmed")


def _flats(tree, n=5, folder="captures/night1"):
    paths = [tree.flat(f"f{i:02d}.fits", level=20000 * (1 + 0.02 * i), folder=folder, cosmic=(i == 2))
             for i in range(n)]
    return [str(p) for p in paths]


def _trimmed_mean(files, k):
    stack = np.sort(np.array([fits.getdata(f).astype(np.float64) for f in files]), axis=0)
    return stack[k:len(files) - k].mean(axis=0).astype(np.float32)


def _check_master(path, files, k):
    with fits.open(path) as hdul:
        header, data = hdul[0].header, hdul[0].data
        assert hdul[0].verify_checksum() == 1
    np.testing.assert_array_equal(data, _trimmed_mean(files, k))  # integer data: the sums are exact
    h, w = data.shape
    assert data[h // 2, w // 2] < 30000  # the cosmic ray in one flat is trimmed away
    assert (header["COMBMETH"], header["TRIMN"], header["NCOMBINE"]) == (f"Trimmed{k}", k, len(files))
    assert header.comments["TRIMN"] == "values trimmed at each end"
    assert any(f"trimmed mean k={k}" in str(c) for c in header["COMMENT"])


@pytest.mark.parametrize("options", [["--method", "trimmed", "--param", "trim=2"], ["-tm", "2"], ["--trimmed", "2"]])
def test_flatd_combine_runs_a_registered_method(tree, trimmed, options):
    files = _flats(tree, n=7)
    out = tree.root / "master.fits"
    assert main(["combine", *options, "-rp", "--normalize", "none", "-o", str(out), *files]) == 0
    _check_master(out, files, 2)


def test_flatd_combine_checks_the_parameters(tree, trimmed, capsys):
    files = _flats(tree, n=3)
    out = str(tree.root / "m.fits")
    assert main(["combine", "--method", "trimmed", "--param", "trim=-1", "-o", out, *files]) == 2
    assert "trim=-1" in capsys.readouterr().err
    assert main(["combine", "--method", "trimmed", "--param", "sigma=2", "-o", out, *files]) == 2
    assert "a parameter of trimmed (trim)" in capsys.readouterr().err
    assert main(["combine", "--method", "trimmed", "--param", "trim=2", "-o", out, *files]) == 1  # needs 5 frames
    assert "trimmed mean k=2 needs at least 5 frames" in capsys.readouterr().out


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
  mode: none
combine:
  method: trimmed
  trim: {trim}
  normalize: none
stable: 0
state: {root}/state
"""


def test_rules_file_runs_a_registered_method(tree, trimmed):
    files = _flats(tree, n=6)
    config = tree.rules(RULES.format(root=tree.root, trim=1))
    assert main(["run-once", "--config", str(config)]) == 0
    (master,) = (tree.root / "captures" / "masters").glob("*.fits")
    assert "Trimmed1" in master.name  # {method} in the output name is the label
    _check_master(master, files, 1)


def test_rules_file_checks_the_parameters(tree, trimmed, capsys):
    _flats(tree, n=3)
    config = tree.rules(RULES.format(root=tree.root, trim=-1))
    assert main(["run-once", "--config", str(config)]) == 2
    assert "combine.trim': Input should be greater than or equal to 0" in capsys.readouterr().err


def test_unregistered_method_is_refused(tree, capsys):
    config = tree.rules(RULES.format(root=tree.root, trim=1))
    assert main(["run-once", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "combine.method': Input should be 'auto', 'mean', 'median', 'minmax', 'sigma'" in err
    assert "combine.trim': unknown key" in err
    assert main(["combine", "--method", "trimmed", "x.fits"]) == 2
