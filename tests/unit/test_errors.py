"""One base class for flatd's own errors; the runner fails a job with their message."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

import pytest

from flatd.errors import FlatdError, StackError


def test_every_error_flatd_raises_on_purpose_derives_from_flatd_error():
    from flatd.calibration import CalibrationError
    from flatd.cli import UsageError
    from flatd.config import ConfigError
    from flatd.ingest.frames import FrameError
    from flatd.fsops import FileChanged, MoveError
    from flatd.ledger import LedgerLocked, OutputBusy
    from flatd.output.masters import NoSpace
    from flatd.runner import JobFailed

    for cls in (CalibrationError, UsageError, ConfigError, FrameError, FileChanged, MoveError, LedgerLocked,
                OutputBusy, NoSpace, JobFailed, StackError):
        assert issubclass(cls, FlatdError), cls
    for cls in (NoSpace, MoveError, FileChanged):  # still OSErrors: callers catching OSError see them
        assert issubclass(cls, OSError), cls
    assert str(FrameError("/x/a.fits", "truncated")) == "/x/a.fits: truncated"


class _Engine:
    def __init__(self, exc: BaseException):
        self.exc = exc

    def stack(self, job):
        raise self.exc


def _job(tmp_path: Path):
    from flatd.ingest.frames import Frame, Kind
    from flatd.jobs import Job, StackInput
    from flatd.stack.methods import Method

    frame = Frame(path=tmp_path / "f.fits", kind=Kind.FLAT, width=4, height=3)
    group = SimpleNamespace(label="g1", frames=(frame,))
    return Job(id="j1", group=group, rule=None, method=Method("mean"), normalize="none", inputs=(StackInput(frame),),
               output_dir=tmp_path / "out", output_name="m.fits", move_to=None)


@pytest.mark.parametrize("exc, reason", [
    (StackError("/x/f.fits: truncated"), "/x/f.fits: truncated"),
    (FlatdError("a reason"), "a reason"),
    (MemoryError("no memory"), "no memory"),
    (OSError(5, "Input/output error", "/x/f.fits"), "/x/f.fits: Input/output error"),
    (KeyError("bug"), "internal error: KeyError: 'bug'"),
])
def test_runner_fails_the_job_with_the_reason(tmp_path, exc, reason):
    from flatd.runner import Runner

    outcome = Runner(engine=_Engine(exc)).run_job(_job(tmp_path), datetime(2026, 11, 24))
    assert outcome.state == "failed" and outcome.reason == reason
    assert not outcome.transient  # the flats' fault (or a bug): recorded as failed, tried again by `flatd retry`
    assert not (tmp_path / "out").exists()
