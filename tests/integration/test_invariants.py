"""DESIGN.md's invariants 1-3, at the exact moments a crash can hit a job.

A "crash" here is an exception that escapes the runner at a chosen step (nothing
below it runs, as with kill -9); then a fresh process state (new ledger connection,
new Runner) recovers. tests/e2e/test_service.py does the same with real kill -9.
"""

from __future__ import annotations

import hashlib
import os

import pytest
from astropy.io import fits

import flatd.ingest.discover as discover_module
import flatd.runner as runner_module
from flatd.cli import main
from flatd.config import load_rules
from flatd.ledger import DONE, UNFINISHED, WRITING, Ledger
from flatd.runner import Runner, process_capture

RULES = """
capture:
  - path: {root}/captures
output: {{directory: masters}}
inputs: {{move_to: "originals"}}
grouping: {{min_group_size: 3}}
combine: {{method: median}}
state: {root}/state
"""


class Crash(BaseException):
    """Stands for the process dying: not an error the runner handles."""


def _setup(tree, n=4):
    paths = [tree.flat(f"flat_{i}.fits") for i in range(n)]
    config = tree.rules(RULES.format(root=tree.root))
    digests = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}
    return load_rules(config), digests


def _run(rules, ledger):
    return process_capture(rules.capture[0], rules, Runner(ledger), stable=0.0)


def _recover_and_finish(tree, rules):
    """The next start: recover, then a normal pass over the folder."""
    ledger = Ledger.open(rules.state)
    Runner(ledger).recover()
    _run(rules, ledger)
    return ledger


def _check_end_state(tree, digests, ledger):
    masters = sorted((tree.root / "captures" / "masters").glob("*.fits"))
    assert len(masters) == 1, masters
    everywhere = [p for p in (tree.root / "captures").rglob("*") if p.is_file() and p.parent.name != "masters"]
    assert sorted(p.name for p in everywhere) == sorted(digests), everywhere  # each input exactly once
    for p in everywhere:
        assert hashlib.sha256(p.read_bytes()).hexdigest() == digests[p.name]
    assert not [p for p in (tree.root / "captures").rglob(".flatd-*")], "temp files left behind"
    assert ledger.jobs(UNFINISHED) == []
    assert [j.state for j in ledger.jobs()] == [DONE]


def test_crash_while_stacking_is_redone(tree, monkeypatch):
    rules, digests = _setup(tree)
    import flatd.stack.engines.local

    def dying_stack(*args, **kwargs):
        raise Crash()

    monkeypatch.setattr(flatd.stack.engines.local, "stack_frames", dying_stack)
    with pytest.raises(Crash):
        _run(rules, Ledger.open(rules.state))
    monkeypatch.undo()
    _check_end_state(tree, digests, _recover_and_finish(tree, rules))


def test_crash_after_the_master_is_linked_but_not_recorded(tree, monkeypatch):
    rules, digests = _setup(tree)
    monkeypatch.setattr(Ledger, "master_written", lambda *a, **k: (_ for _ in ()).throw(Crash()))
    with pytest.raises(Crash):
        _run(rules, Ledger.open(rules.state))
    monkeypatch.undo()
    assert Ledger.open(rules.state).jobs()[0].state == WRITING
    assert len(list((tree.root / "captures" / "masters").glob("*.fits"))) == 1
    _check_end_state(tree, digests, _recover_and_finish(tree, rules))


def test_crash_during_the_write_leaves_no_master_and_no_temp(tree, monkeypatch):
    rules, digests = _setup(tree)
    real_fsync = os.fsync

    def dying_fsync(fd):
        if any(p.name.startswith(".flatd-") for p in (tree.root / "captures" / "masters").glob(".*")):
            raise Crash()
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", dying_fsync)
    with pytest.raises(Crash):
        _run(rules, Ledger.open(rules.state))
    monkeypatch.undo()
    masters = tree.root / "captures" / "masters"
    assert not list(masters.glob("*.fits"))
    # An exception lets write_master remove its temp file; kill -9 would not.
    (masters / ".flatd-FLAT-R-1x1-0123abcd.tmp").write_bytes(b"SIMPLE  =  half a master")
    assert Ledger.open(rules.state).jobs()[0].state == WRITING
    _check_end_state(tree, digests, _recover_and_finish(tree, rules))


@pytest.mark.parametrize("moved_before_crash", [0, 2])
def test_crash_between_link_and_unlink_of_a_move(tree, monkeypatch, moved_before_crash):
    """A same-filesystem move links the input into place, then unlinks the original:
    a crash in between leaves the file in two places; recovery keeps one."""
    rules, digests = _setup(tree)
    real_move = runner_module.move_file
    calls = []

    def move_then_die(src, dest_dir, expect=None):
        calls.append(src)
        if len(calls) <= moved_before_crash:
            return real_move(src, dest_dir, expect)
        dest_dir.mkdir(parents=True, exist_ok=True)
        os.link(src, dest_dir / src.name)
        raise Crash()

    monkeypatch.setattr(runner_module, "move_file", move_then_die)
    with pytest.raises(Crash):
        _run(rules, Ledger.open(rules.state))
    monkeypatch.undo()
    _check_end_state(tree, digests, _recover_and_finish(tree, rules))


def test_crash_after_a_cross_filesystem_copy_before_the_unlink(tree, monkeypatch):
    rules, digests = _setup(tree)

    def copy_then_die(src, dest_dir, expect=None):
        dest_dir.mkdir(parents=True, exist_ok=True)
        (dest_dir / src.name).write_bytes(src.read_bytes())  # another inode: a copy
        raise Crash()

    monkeypatch.setattr(runner_module, "move_file", copy_then_die)
    with pytest.raises(Crash):
        _run(rules, Ledger.open(rules.state))
    monkeypatch.undo()
    _check_end_state(tree, digests, _recover_and_finish(tree, rules))


def test_inputs_stay_when_the_master_cannot_be_written(tree, capsys):
    rules, digests = _setup(tree)
    (tree.root / "captures" / "masters").write_text("a file where the folder should be")
    assert main(["run-once", "--config", str(tree.root / "flatd.yaml")]) == 1
    assert "failed" in capsys.readouterr().out
    night = tree.root / "captures" / "night1"
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in night.glob("flat_*.fits")} == digests
    assert not (night / "originals").exists()


def test_a_master_never_overwrites_and_never_stands_half_written(tree):
    rules, _ = _setup(tree)
    masters = tree.root / "captures" / "masters"
    masters.mkdir(parents=True)
    ledger = Ledger.open(rules.state)
    report = _run(rules, ledger)
    (outcome,) = report.outcomes
    planned = outcome.job.output_dir / outcome.job.output_name
    assert outcome.master == planned
    # Same name planned again (new flats, same night): the old master is kept.
    before = planned.read_bytes()
    for i in range(4):
        tree.flat(f"flat_again_{i}.fits")
    report = _run(rules, ledger)
    (again,) = report.outcomes
    assert planned.read_bytes() == before
    assert again.master != planned and again.master.exists()
    with fits.open(again.master) as hdul:
        assert hdul[0].verify_checksum() == 1


def test_a_service_batch_reads_only_the_flats_the_watcher_accepted(tree, monkeypatch):
    """After months a capture folder holds thousands of lights: a batch must not read
    their headers again. `ready` (the watcher's verdicts) decides before any read."""
    rules, _ = _setup(tree)
    for i in range(5):
        tree.flat(f"light_{i}.fits", imagetyp="LIGHT")
    flats = {str(p) for p in (tree.root / "captures").rglob("flat_*.fits")}
    read = []
    real_read = discover_module.read_frame
    monkeypatch.setattr(discover_module, "read_frame", lambda path, kw: read.append(path) or real_read(path, kw))
    frames, skipped, _ = discover_module.scan_capture(rules.capture[0], rules, None, 0.0, 0.0,
                                                     ready=lambda path, st: str(path) in flats)
    assert {str(p) for p in read} == flats
    assert len(frames) == len(flats) and skipped == []


def test_crash_while_moving_inputs_an_earlier_run_could_not_move(tree, monkeypatch):
    """A run moves some inputs and fails on others (moves-pending); the next run dies
    halfway through one of those moves; the run after that finishes cleanly."""
    import errno

    from flatd.ledger import MOVES_PENDING

    rules, digests = _setup(tree)
    real_move = runner_module.move_file

    def refuse_two(src, dest_dir, expect=None):
        if src.name in ("flat_2.fits", "flat_3.fits"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_move(src, dest_dir, expect)

    monkeypatch.setattr(runner_module, "move_file", refuse_two)
    (outcome,) = _run(rules, Ledger.open(rules.state)).outcomes
    assert outcome.state == "moves-pending"

    def link_then_die(src, dest_dir, expect=None):
        dest_dir.mkdir(parents=True, exist_ok=True)
        os.link(src, dest_dir / src.name)
        raise Crash()

    monkeypatch.setattr(runner_module, "move_file", link_then_die)
    with pytest.raises(Crash):
        Runner(Ledger.open(rules.state)).retry_pending_moves()
    monkeypatch.undo()
    ledger = Ledger.open(rules.state)
    assert ledger.jobs()[0].state == MOVES_PENDING
    runner = Runner(ledger)
    runner.recover()
    assert runner.retry_pending_moves() == []
    _run(rules, ledger)
    _check_end_state(tree, digests, ledger)
