"""run-once, and the long-running process: scheduler, signals, reload, status."""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path
from typing import Optional

from flatd.config import Rules
from flatd.ledger import Ledger, StateLock


def run_once(rules: Rules, dry_run: bool = False, progress=None, stable: float = 0.0):
    """Every capture folder, now: recover interrupted jobs, then scan, plan, run.

    "Settled" is "now": a file is taken as soon as it is complete (its size is what
    its header promises), whatever its age, so that a capture program can call
    run-once right after its last flat. `stable` is for the watcher.

    A dry run takes no lock, opens the ledger read-only (if there is one) to know what
    was combined before, and changes nothing on disk.
    """
    from flatd.calibration import LibraryCache
    from flatd.runner import RunReport, Runner, process_capture

    report = RunReport()
    libraries = LibraryCache()
    now = datetime.now()
    if dry_run:
        ledger = Ledger.open_readonly(rules.state)
        runner = Runner(ledger, progress, rules.engine.workers)
        for capture in rules.capture:
            report.extend(process_capture(capture, rules, runner, True, stable, libraries, now))
        return report
    with StateLock(rules.state):
        ledger = Ledger.open(rules.state)
        try:
            runner = Runner(ledger, progress, rules.engine.workers)
            report.recovered = runner.recover()
            for capture in rules.capture:
                report.extend(process_capture(capture, rules, runner, False, stable, libraries, now))
        finally:
            ledger.close()
    return report
