"""flatd's own errors: one base class, so that callers catch flatd's reasons apart from bugs.

Every error flatd raises on purpose (a bad frame, a missing calibration, a group that
cannot be stacked, an invalid rules file, a full disk, a busy lock...) derives from
:class:`FlatdError`; its message is meant for the user. Anything else is a bug.
Pure: imports nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional


class FlatdError(Exception):
    """A reason flatd gives on purpose; the message names the file or setting at fault."""


class StackError(FlatdError):
    """A group that cannot be stacked; the message names the file and the reason."""

    def __init__(self, message: str, path: Optional[Path] = None):
        super().__init__(message)
        self.path = Path(path) if path is not None else None
