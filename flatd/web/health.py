"""/healthz: is the service doing its job? Observers running, the ledger writable.

Each check returns the reasons it found (an empty list: healthy). Writability is tried for
real, with a small file created and removed in the state folder: permission bits say
nothing to root, and a read-only mount or a full disk shows only when writing.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

from flatd.ledger import DB_NAME


def state_problems(state: Path) -> list[str]:
    """Why the ledger in `state` cannot be written now (an empty list: it can)."""
    state = Path(state)
    try:
        st = os.stat(state)
    except OSError as exc:
        return [f"the state folder {state} is not there: {exc.strerror or exc}"]
    if not stat.S_ISDIR(st.st_mode):
        return [f"the state folder {state} is not a folder"]
    problems = []
    ledger = state / DB_NAME
    try:
        if not stat.S_ISREG(os.stat(ledger).st_mode):
            problems.append(f"the ledger {ledger} is not a file")
    except OSError as exc:
        problems.append(f"the ledger {ledger} is not there: {exc.strerror or exc}")
    problem = _write_probe(state)
    return problems + ([problem] if problem else [])


def _write_probe(folder: Path) -> str:
    """Create, write and remove a small hidden file in `folder`; the reason it failed, or ''."""
    try:
        fd, name = tempfile.mkstemp(prefix=".flatd-health-", suffix=".tmp", dir=folder)
    except OSError as exc:
        return f"the state folder {folder} is not writable: {exc.strerror or exc}"
    try:
        os.write(fd, b"ok\n")
    except OSError as exc:
        return f"the state folder {folder} is not writable: {exc.strerror or exc}"
    finally:
        os.close(fd)
        try:
            os.unlink(name)
        except OSError:
            pass
    return ""


def observer_problems(folders, watches: dict) -> list[str]:
    """Capture folders (paths) without a running observer: not there, or not watchable."""
    problems = []
    for path in list(folders):
        watch = watches.get(path)
        if watch is None:
            problems.append(f"capture folder {path} is not watched (not there, or cannot be watched; "
                            "looked at again at each rescan)")
        elif not watch.alive():
            problems.append(f"the observer of capture folder {path} stopped")
    return problems


def service_problems(service) -> list[str]:
    """Every reason a running flatd.service.Service is not healthy."""
    if service.stop_requested.is_set():
        return ["stopping"]
    if not getattr(service, "ready", True):
        return ["starting"]
    folders = list(service.folders)
    if not folders:
        return ["no capture folder is configured"]
    return observer_problems(folders, dict(service.watches)) + state_problems(service.rules.state)
