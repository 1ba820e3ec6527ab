"""Flats left out by the flat checks (flatd.qc.flats) through `flatd run-once`: never
moved, never combined, reported by name with the figure, in the dry run and in status."""

from __future__ import annotations

import re

import pytest
from astropy.io import fits

from flatd.cli import main
from flatd.ledger import Ledger

from fitstree import snapshot

RULES = """
capture:
  - path: {root}/captures
output:
  directory: masters
inputs:
  move_to: "originals-{{date}}"
grouping:
  temperature: 1.0
  min_group_size: {min_group}
precalibration:
  mode: auto
  library: {root}/calib
combine:
  method: sigma
  sigma: 3.0
stable: 0
state: {root}/state
{extra}
"""

HOT = "flat_R_hot.fits"
FIGURE = re.compile(r"level 0\.8\d* of full scale \(65535\), above quality\.max_level 0\.75")


def _night(tree, n=6, min_group=3, extra=""):
    for i in range(n):
        tree.flat(f"flat_R_{i:03d}.fits", level=20000 * (1 + 0.02 * i), filt="R")
    tree.flat(HOT, level=52000, filt="R")  # ~0.79 of full scale after the bias
    for i in range(2):
        tree.bias(f"bias_{i}.fits")
    return tree.rules(RULES.format(root=tree.root, min_group=min_group, extra=extra))


def _masters(root):
    return sorted((root / "captures" / "masters").glob("*.fits"))


def _night1(tree):
    return tree.root / "captures" / "night1"


def test_over_exposed_flat_is_left_out_in_place_and_reported(tree, capsys):
    config = _night(tree)
    assert main(["run-once", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    (master,) = _masters(tree.root)
    header = fits.getheader(master)
    assert header["NCOMBINE"] == 6
    assert not any(HOT in line for line in header["HISTORY"])
    assert (_night1(tree) / HOT).exists(), "a left-out flat stays where it is"
    assert not list(_night1(tree).glob("flat_R_0*.fits")), "the others are moved"
    assert not list(_night1(tree).glob(f"originals-*/{HOT}"))
    line = next(line for line in out.splitlines() if HOT in line)
    assert "left out" in line and FIGURE.search(line), line

    ledger = Ledger.open_readonly(tree.root / "state")
    (row,) = ledger.left_out_inputs()
    assert row["path"].endswith(HOT) and "above quality.max_level" in row["qc"]
    ledger.close()

    assert main(["status", "--config", str(config)]) == 0
    status = capsys.readouterr().out
    assert "left out by the quality checks" in status
    assert HOT in status and "above quality.max_level 0.75" in status

    # never planned again while it is unchanged: a second run finds nothing to do
    before = snapshot(tree.root / "captures")
    assert main(["run-once", "--config", str(config)]) == 0
    assert snapshot(tree.root / "captures") == before
    assert len(_masters(tree.root)) == 1


def test_dry_run_reports_the_same_and_changes_nothing(tree, capsys):
    config = _night(tree)
    before = snapshot(tree.root)
    assert main(["run-once", "--dry-run", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert snapshot(tree.root) == before
    assert "would write" in out
    line = next(line for line in out.splitlines() if HOT in line and "left out" in line)
    assert "quality: " in line and FIGURE.search(line), line


def test_group_too_small_after_the_checks_is_reported_not_combined(tree, capsys):
    config = _night(tree, n=3, min_group=4)
    before = snapshot(_night1(tree))
    assert main(["run-once", "--dry-run", "--config", str(config)]) == 0
    dry = capsys.readouterr().out
    assert "would be left out by the quality checks" in dry and HOT in dry
    assert main(["run-once", "--config", str(config)]) == 1
    out = capsys.readouterr().out
    assert _masters(tree.root) == []
    assert snapshot(_night1(tree)) == before, "nothing combined, nothing moved"
    assert "left out by the quality checks, 3 left: fewer than min_group_size 4; nothing combined" in out
    assert HOT in out and "above quality.max_level 0.75" in out


def test_warn_action_combines_and_warns(tree, capsys):
    config = _night(tree, extra="quality: {level_action: warn}")
    assert main(["run-once", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    (master,) = _masters(tree.root)
    assert fits.getheader(master)["NCOMBINE"] == 7
    assert not (_night1(tree) / HOT).exists()
    line = next(line for line in out.splitlines() if HOT in line)
    assert "warning" in line and "above quality.max_level 0.75" in line and "combined" in line


def test_disabled_checks_combine_everything(tree, capsys):
    config = _night(tree, extra="quality: {enabled: false}")
    assert main(["run-once", "--config", str(config)]) == 0
    (master,) = _masters(tree.root)
    assert fits.getheader(master)["NCOMBINE"] == 7


@pytest.mark.parametrize("crash_at", ["master_written", "moves"])
def test_a_crash_after_the_master_never_moves_the_left_out_flat(tree, monkeypatch, capsys, crash_at):
    """The ledger records the left-out flats with the state `writing`, before the master is
    on disk: recovery finishes the job's moves and leaves them in place."""
    from flatd import ledger as L
    from flatd import runner as R

    config = _night(tree)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    if crash_at == "master_written":
        monkeypatch.setattr(L.Ledger, "master_written", crash)
    else:
        monkeypatch.setattr(R.Runner, "_move_inputs", crash)
    assert main(["run-once", "--config", str(config)]) != 0  # "flatd: interrupted"
    monkeypatch.undo()
    assert len(_masters(tree.root)) == 1
    assert main(["run-once", "--config", str(config)]) == 0
    assert len(_masters(tree.root)) == 1, "no second master"
    assert (_night1(tree) / HOT).exists()
    assert not list(_night1(tree).glob("flat_R_0*.fits"))
    assert len(list(_night1(tree).glob("originals-*/flat_R_0*.fits"))) == 6
