"""`flatd status`: what the service is doing, read from the ledger without the lock."""

from __future__ import annotations

import json
import os
import sqlite3
import time
from datetime import datetime
from pathlib import Path
from typing import Optional

from rich.markup import escape

from flatd.config import Rules
from flatd.ledger import FAILED, LOCK_NAME, MOVES_PENDING, Ledger
from flatd.log import printable


def safe(value) -> str:
    """Text from file names and headers, fit for rich: no control characters, no markup."""
    return escape(printable(value))


def _ago(seconds: float) -> str:
    return _duration(seconds) + " ago"


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    if seconds < 86400:
        return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
    return f"{seconds // 86400} d {seconds % 86400 // 3600} h"


def _when(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M:%S")


def service_pid(state: Path) -> tuple[Optional[int], bool]:
    """The pid written in the lock file, and whether a flatd process with it is alive."""
    try:
        text = (Path(state) / LOCK_NAME).read_text().strip().splitlines()[0]
        pid = int(text)
    except (OSError, ValueError, IndexError):
        return None, False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return pid, False
    except PermissionError:
        return pid, True
    cmdline = Path(f"/proc/{pid}/cmdline")
    if cmdline.exists():
        try:
            return pid, b"flatd" in cmdline.read_bytes()
        except OSError:
            pass
    return pid, True


def print_status(state: Path, rules: Optional[Rules], console) -> int:
    """Flats waiting per capture folder and the time left before they settle, the last
    masters made, failed groups with their reasons. Reads the ledger without the lock."""
    state = Path(state)
    pid, alive = service_pid(state)
    if alive:
        console.print(f"flatd watch: [green]running[/green] (pid {pid}); state {safe(state)}")
    else:
        console.print(f"flatd watch: not running; state {safe(state)}")
    ledger = Ledger.open_readonly(state)
    if ledger is None:
        console.print("no ledger yet: nothing has been seen or made")
        return 0
    try:
        _print_status(ledger, rules, console, alive)
    except sqlite3.OperationalError as exc:  # the very first start is still creating the tables
        console.print(f"the ledger cannot be read yet ({safe(exc)}); try again in a moment")
        return 1
    finally:
        ledger.close()
    return 0


def _print_pending_moves(ledger: Ledger, console) -> None:
    """Jobs whose master is made but some inputs could not be moved yet."""
    try:
        jobs = ledger.jobs([MOVES_PENDING])
        pending = ledger.pending_moves()
    except sqlite3.OperationalError:  # a ledger from before this state
        return
    if not jobs:
        return
    console.print("\n[bold]Inputs not moved yet[/bold] (tried again at every run)")
    for job in jobs:
        count = sum(1 for row in pending if row.job_id == job.id)
        console.print(f"  {_when(job.updated_at)}  {safe(job.label)}: {count} input(s) still in place, master "
                      f"{safe(job.master or '?')}: {safe(job.reason or '')}")


def _print_status(ledger: Ledger, rules: Optional[Rules], console, alive: bool) -> None:
    failed_jobs = ledger.jobs([FAILED])
    _print_waiting(ledger, rules, console, alive, failed_jobs)
    _print_masters(ledger, console)
    left = _print_failed(ledger, console, failed_jobs)
    _print_pending_moves(ledger, console)
    _print_left_out_flats(ledger, console)
    if left:
        console.print("\n[bold]Left in place by the last batch[/bold]")
        console.print("\n".join(left))


def _print_waiting(ledger: Ledger, rules: Optional[Rules], console, alive: bool, failed_jobs) -> None:
    now = time.time()
    settle = rules.settle if rules is not None else None
    waiting: dict[str, list] = {}
    for row in ledger.waiting_frames():
        waiting.setdefault(row["folder"] or "?", []).append(row)
    folders = {row["path"]: row for row in ledger.folders()}
    captures = [str(c.path) for c in rules.capture] if rules is not None else []
    names = list(dict.fromkeys(captures + sorted(waiting)))
    failed_inputs = {row.path for job in failed_jobs for row in ledger.inputs(job.id)}

    console.print("\n[bold]Waiting flats[/bold]")
    if not names:
        console.print("  none")
    for name in names:
        rows = waiting.get(name, [])
        info = folders.get(name)
        if not rows:
            console.print(f"  {safe(name)}: no flats waiting")
            continue
        last_ready = max((r["ready_at"] or r["seen_at"]) for r in rows)
        if info is not None and info["last_ready"]:
            last_ready = max(last_ready, info["last_ready"])
        processed = info["processed_at"] if info is not None else None
        in_failed = sum(1 for r in rows if r["path"] in failed_inputs)
        text = f"  {safe(name)}: {len(rows)} flat(s) waiting"
        if in_failed:
            text += f" ({in_failed} of them in failed groups)"
        text += f", last new flat {_ago(now - last_ready)}"
        if processed is not None and processed >= last_ready:
            text += "; left after the last batch (see below); considered again when more flats arrive"
        elif settle is not None:
            left = last_ready + settle - now
            if left > 0:
                text += f"; settles in {_duration(left)}" + ("" if alive else " (once flatd watch runs)")
            else:
                text += "; settled, processing due" if alive else "; settled (processed when flatd watch runs)"
        console.print(text)


def _print_left_out_flats(ledger: Ledger, console, limit: int = 20) -> None:
    """Flats the flat checks left out (in place, never combined), with the figure that failed."""
    rows = ledger.left_out_inputs(limit=limit)
    if not rows:
        return
    console.print("\n[bold]Flats left out by the quality checks[/bold] (left in place; a changed file is "
                  "considered again)")
    for row in rows:
        console.print(f"  {_when(row['updated_at'])}  {safe(row['path'])} ({safe(row['label'])}): {safe(row['qc'])}")


def _print_masters(ledger: Ledger, console) -> None:
    console.print("\n[bold]Last masters made[/bold]")
    masters = ledger.recent_masters(10)
    if not masters:
        console.print("  none yet")
    for row in masters:
        console.print(f"  {_when(row['created_at'])}  {_verdict(row)}  {safe(row['path'])}  ({safe(row['label'])}, "
                      f"{row['ncombine']} flats)")
        reasons = row["qc_reasons"] if "qc_reasons" in row.keys() else None
        if reasons:
            console.print(f"      {safe(reasons)}")


def _verdict(row) -> str:
    """The master checks' verdict, as a column: good, warn, bad, or - (not checked)."""
    status = row["qc_status"] if "qc_status" in row.keys() else None
    colour = {"good": "green", "warn": "yellow", "bad": "red"}.get(status or "")
    text = f"{safe(status or '-'):4}"
    return f"[{colour}]{text}[/{colour}]" if colour else text


def _print_failed(ledger: Ledger, console, failed_jobs) -> list[str]:
    """Failed groups (jobs kept as failed, and what the last batches noted); returns the
    lines about files left in place."""
    console.print("\n[bold]Failed groups[/bold]")
    lines, left = [], []
    for job in failed_jobs:
        lines.append(f"  {_when(job.updated_at)}  {safe(job.label)} in {safe(job.folder or '?')}: "
                     f"{safe(job.reason or 'no reason recorded')}  (flatd retry {job.id})")
    for name, info in {row["path"]: row for row in ledger.folders()}.items():
        try:
            notes = json.loads(info["notes"] or "{}")
        except ValueError:
            continue
        when = _when(info["processed_at"]) if info["processed_at"] else "?"
        for item in notes.get("failed", []):
            if item.get("job"):
                continue  # a failed job: listed above from the jobs table
            count = f" ({item['files']} flats)" if item.get("files") else ""
            lines.append(f"  {when}  {safe(item['label'])} in {safe(name)}: {safe(item['reason'])}{count}")
        for item in notes.get("left_out", []):
            left.append(f"  {when}  {safe(name)}: {item['files']} file(s): {safe(item['reason'])}")
    console.print("\n".join(lines) if lines else "  none")
    return left
