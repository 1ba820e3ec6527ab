"""`output.name: ....fits.fz`: run-once writes lossless tile-compressed masters, records them
and never takes them as inputs."""

from __future__ import annotations

from astropy.io import fits

from flatd.cli import main
from flatd.ledger import Ledger

RULES = """
capture:
  - path: {root}/captures
output:
  name: "FLAT-{{filter}}-{{date}}-{{temperature}}C.fits.fz"
inputs: {{move_to: null}}
grouping: {{temperature: null, min_group_size: 3}}
precalibration: {{mode: pedestal, pedestal: 100}}
stable: 0
state: {root}/state
"""


def _masters(tree):
    return sorted(p for p in (tree.root / "captures" / "masters").iterdir()
                  if not p.name.startswith(".") and not p.name.endswith(".png"))  # previews aside


def test_run_once_writes_fits_fz_masters(tree, capsys):
    for i in range(3):
        tree.flat(f"flat_{i}.fits", level=20000 * (1 + 0.05 * i), temp=-10.04)
    config = tree.rules(RULES.format(root=tree.root))
    assert main(["run-once", "--config", str(config)]) == 0
    masters = _masters(tree)
    assert [m.name for m in masters] == ["FLAT-R-20261124-180000-10.0C.fits.fz"]
    with fits.open(masters[0], checksum=True) as hdul:
        assert isinstance(hdul[1], fits.CompImageHDU) and hdul[1].header["NCOMBINE"] == 3
    ledger = Ledger.open(tree.root / "state")
    assert [j.master for j in ledger.jobs()] == [str(masters[0])]
    ledger.close()
    # a second run finds nothing new: the master is not an input
    assert main(["run-once", "--config", str(config)]) == 0
    assert _masters(tree) == masters


def test_rules_file_with_an_unknown_extension_is_a_usage_error(tree, capsys):
    config = tree.rules(RULES.format(root=tree.root).replace(".fits.fz", ".tiff"))
    assert main(["run-once", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "output.name" in err and "cannot write '.tiff' files" in err
