"""`flatd run-once`: every capture folder, now, by the same code path as the service."""

from __future__ import annotations

from datetime import datetime
from typing import Callable, Optional

from flatd.notify import events as E
from flatd.config import Rules
from flatd.ledger import Ledger, StateLock
from flatd.notify import start_subscribers

# run-once waits at most this long for files still being written (beyond `stable`).
MAX_WAIT = 120.0


def run_once(rules: Rules, dry_run: bool = False, progress=None, wait: bool = True,
             say: Optional[Callable[[str], None]] = None):
    """Every capture folder, now: recover interrupted jobs, move the inputs earlier runs
    could not move, wait for files still being written, then scan, plan, run.

    "Settled" is "now", once every candidate has been unchanged for `stable` (by its
    mtime, or watched): a capture program that calls run-once right after its last flat
    waits at most `stable`. A file still changing after `stable` + MAX_WAIT is left
    out. `wait=False` (--no-wait) takes every complete file at once.

    A dry run takes no lock, opens the ledger read-only (if there is one) to know what
    was combined before, and changes nothing on disk. A real run ends with a
    `batch_done` event summing it up.
    """
    from flatd.calibration import LibraryCache
    from flatd.ingest.discover import FolderFilter, StableWait
    from flatd.stack.engines import make_engine
    from flatd.runner import RunReport, Runner, process_capture

    report = RunReport()
    libraries = LibraryCache()
    waiter = None
    if wait and rules.stable > 0:
        waiter = StableWait(rules.stable)
        present = [FolderFilter(c, rules) for c in rules.capture if c.path.is_dir()]
        waiter.wait(present, rules.stable + MAX_WAIT, say or (lambda text: E.notice("waiting", text)))

    def each_capture(runner: Runner) -> None:
        now = datetime.now()
        for capture in rules.capture:
            report.extend(process_capture(capture, rules, runner, dry_run, 0.0, libraries, now, waiter=waiter))

    if dry_run:
        ledger = Ledger.open_readonly(rules.state)
        runner = Runner(ledger)  # stacks nothing: no engine is made (numba stays unloaded)
        report.pending_moves = runner.retry_pending_moves(dry_run=True)
        each_capture(runner)
        return report
    close_subscribers = start_subscribers(lambda: rules)  # hooks and notifications
    try:
        with StateLock(rules.state):
            ledger = Ledger.open(rules.state)
            try:
                runner = Runner(ledger, make_engine(rules.engine, progress))
                with E.ReportSubscriber() as seen:
                    report.recovered = runner.recover()
                report.recovered_notes = [ev.message for ev in seen.of(E.JobRecovered)]
                report.pending_moves = runner.retry_pending_moves()
                each_capture(runner)
            finally:
                ledger.close()
        E.emit(summary(report))
    finally:
        close_subscribers(None)  # each hook within hooks.timeout; the message within CLOSE_WAIT
    return report


def summary(report) -> E.BatchDone:
    """A run's report as one `batch_done` event: masters written (and how many the checks
    marked warn or bad), groups failed, files left out."""
    from flatd.runner import not_a_flat

    masters = sum(1 for o in report.outcomes if o.state == "done")
    failed = sum(1 for o in report.outcomes if o.failed) + len(report.plan.failed) + len(report.problems)
    left = sum(1 for s in report.plan.left_out if not not_a_flat(s.reason))
    return E.BatchDone(None, masters, failed, left, report.marked("warn"), report.marked("bad"))
