"""Typed events and their subscribers: the one stream the runner, run-once and the service speak.

Producers call `emit(SomeEvent(...))`; they never print or log. Subscribers turn the
stream into a destination: `LogSubscriber` (always on) makes one log line per event
through flatd.log; `ReportSubscriber` gathers what a one-shot command ran into; the
notification hooks and metrics subscribe the same way.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable, ClassVar, Optional

DEBUG, INFO, WARNING, ERROR = logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR


@dataclass(frozen=True)
class Event:
    """One thing that happened. `name` is stable (log `event`, hooks); `message` reads well."""

    name: ClassVar[str] = "event"

    @property
    def level(self) -> int:
        return INFO

    @property
    def message(self) -> str:
        return self.name

    def fields(self) -> dict:
        """The event's data, as log fields (None and message-only values left out)."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.metadata.get("log", True) and getattr(self, f.name) is not None}


def _quiet():
    """A dataclass field that is not a log field (the message already says it)."""
    return field(default=None, metadata={"log": False})


# --------------------------------------------------------------------------- the six of the design


@dataclass(frozen=True)
class FrameLeftOut(Event):
    """A file left where it is, with why (not a flat, unreadable, too few for a group...)."""

    name: ClassVar[str] = "frame_left_out"
    path: Path
    reason: str = field(default="", metadata={"log": False})
    quiet: bool = field(default=False, metadata={"log": False})  # not a flat: a debug line
    bad: bool = field(default=False, metadata={"log": False})  # unusable file: a warning

    @property
    def level(self) -> int:
        return DEBUG if self.quiet else WARNING if self.bad else INFO

    @property
    def message(self) -> str:
        return f"left out {self.path}: {self.reason}"


@dataclass(frozen=True)
class FlatRejectedQc(Event):
    """A flat that failed a flat check (flatd.qc.flats): left out of its master, in place
    (`action` leave-out), or combined all the same (warn); with the figure and the limit."""

    name: ClassVar[str] = "flat_rejected_qc"
    path: Path
    check: str  # level | saturation | odd
    figure: float
    limit: float
    reason: str = field(default="", metadata={"log": False})
    action: str = "leave-out"
    job: Optional[str] = None
    group: Optional[str] = _quiet()

    @property
    def level(self) -> int:
        return WARNING

    @property
    def message(self) -> str:
        if self.action == "leave-out":
            return f"left out {self.path} (not combined, not moved): {self.reason}"
        return f"{self.path}: {self.reason}; combined all the same (warn)"


@dataclass(frozen=True)
class GroupPlanned(Event):
    name: ClassVar[str] = "group_planned"
    job: str
    group: str
    files: int
    method: str = field(default="", metadata={"log": False})
    rule: str = "-"

    @property
    def message(self) -> str:
        return f"combining {self.files} flats of {self.group} with {self.method}"


@dataclass(frozen=True)
class MasterWritten(Event):
    name: ClassVar[str] = "master_written"
    job: str
    path: Path
    files: int
    seconds: float = 0.0
    found: bool = field(default=False, metadata={"log": False})  # made earlier (a crash), recorded now
    # fractions of all values of the stack rejected low and high (None: not counted)
    rejected_low: Optional[float] = None
    rejected_high: Optional[float] = None
    preview: Optional[Path] = None  # the PNG preview beside it (output.previews)
    # the job's facts for hooks and notifications (flatd.notify.hooks): not log fields
    group: Optional[str] = _quiet()
    rule: Optional[str] = _quiet()
    inputs: tuple = field(default=(), metadata={"log": False})  # the input flats' paths
    calibration: tuple = field(default=(), metadata={"log": False})  # what was subtracted, per input

    @property
    def level(self) -> int:
        return WARNING if self.found else INFO

    @property
    def message(self) -> str:
        if self.found:
            return f"a master of these inputs is already there: {self.path}; recorded, not made again"
        if self.rejected_low is not None and self.rejected_high is not None:
            return (f"wrote {self.path} (rejected {percent(self.rejected_low)} low, "
                    f"{percent(self.rejected_high)} high)")
        return f"wrote {self.path}"


def percent(fraction: float) -> str:
    """A fraction as a percentage that shows small ones: 0.00123 -> '0.123 %'."""
    value = 100.0 * float(fraction)
    return f"{value:.3g} %" if value >= 0.01 or value == 0 else f"{value:.2g} %"


@dataclass(frozen=True)
class RejectionHigh(Event):
    """A master whose combine rejected more of all values than `baseline` (what the
    method rejects from clean data at this number of frames) plus combine.rejection_warn
    (`overall`), or some of whose inputs lost more than that of theirs (often a bad
    frame: `worst` lost the most)."""

    name: ClassVar[str] = "rejection_high"
    job: str
    path: Path = field(metadata={"log": False})  # the master: its master_written line names it in full
    low: float
    high: float
    threshold: float
    overall: bool = True
    frames: int = 0  # inputs above the baseline plus the threshold
    worst: Optional[Path] = None
    worst_fraction: Optional[float] = None
    baseline: float = 0.0  # the fraction of clean data's values the method rejects at this N

    @property
    def level(self) -> int:
        return WARNING if self.overall else INFO

    @property
    def message(self) -> str:
        clean = f"clean data at this N: {percent(self.baseline)}"
        if self.overall:
            text = (f"{self.path.name}: rejected {percent(self.low + self.high)} of all values "
                    f"({percent(self.low)} low, {percent(self.high)} high; {clean}), more than "
                    f"combine.rejection_warn {percent(self.threshold)} above it")
        else:
            text = (f"{self.path.name}: {self.frames} input(s) lost more than "
                    f"{percent(self.baseline + self.threshold)} of their values ({clean}, plus "
                    f"combine.rejection_warn {percent(self.threshold)})")
        if self.worst is not None and self.worst_fraction is not None:
            text += f"; most from {self.worst.name} ({percent(self.worst_fraction)}): often a bad frame"
        return text


@dataclass(frozen=True)
class MasterChecked(Event):
    """A master's checks (flatd.qc.masters): its verdict good, warn or bad, with the reasons;
    warn and bad at WARNING."""

    name: ClassVar[str] = "master_checked"
    job: str
    path: Path = field(metadata={"log": False})
    status: str
    reasons: tuple[str, ...] = field(default=(), metadata={"log": False})
    previous: Optional[Path] = field(default=None, metadata={"log": False})  # the message names it
    dust: int = 0  # blobs of dust that appeared or went since the previous master

    @property
    def level(self) -> int:
        return INFO if self.status == "good" else WARNING

    @property
    def message(self) -> str:
        text = f"{self.path.name}: checks {self.status}"
        if self.reasons:
            text += ": " + "; ".join(self.reasons)
        if self.previous is not None:
            text += f" (compared with {self.previous.name})"
        return text


@dataclass(frozen=True)
class InputsMoved(Event):
    name: ClassVar[str] = "inputs_moved"
    job: str
    files: int
    folder: Path

    @property
    def message(self) -> str:
        return f"moved {self.files} inputs to {self.folder}"


@dataclass(frozen=True)
class JobFailed(Event):
    """A group that made no master (job None: it failed at planning)."""

    name: ClassVar[str] = "job_failed"
    group: str
    reason: str = field(default="", metadata={"log": False})
    job: Optional[str] = None
    files: Optional[int] = None
    retried: bool = field(default=False, metadata={"log": False})  # transient: tried again at the next run
    # failed at an earlier run and not tried again: hooks and notifications told of it then
    again: bool = field(default=False, metadata={"log": False})
    rule: Optional[str] = _quiet()
    inputs: tuple = field(default=(), metadata={"log": False})  # the group's flats' paths

    @property
    def level(self) -> int:
        return ERROR

    @property
    def message(self) -> str:
        return f"group {self.group} failed: {self.reason}" + ("; tried again at the next run" if self.retried else "")


@dataclass(frozen=True)
class BatchDone(Event):
    """A capture folder's batch (service) or a whole run-once is over."""

    name: ClassVar[str] = "batch_done"
    folder: Optional[Path]
    masters: int
    failed: int
    left_out: int = 0
    warn: int = 0  # masters the checks marked warn (flatd.qc.masters), and bad
    bad: int = 0

    @property
    def message(self) -> str:
        where = f"{self.folder}: " if self.folder is not None else "run-once: "
        marked = [f"{n} {status}" for n, status in ((self.warn, "warn"), (self.bad, "bad")) if n]
        return (f"{where}{self.masters} master(s) written"
                + (f" ({', '.join(marked)} by the checks)" if marked else "")
                + f", {self.failed} group(s) failed"
                + (f", {self.left_out} file(s) left out" if self.left_out else ""))


# --------------------------------------------------------------------------- recovery and moves


@dataclass(frozen=True)
class JobRecovered(Event):
    """A job a crash interrupted: finished (master there) or rolled back (redone later)."""

    job: str
    label: str = field(default="", metadata={"log": False})
    master: Optional[Path] = field(default=None, metadata={"log": False})

    @property
    def name(self) -> str:  # type: ignore[override]
        return "job_recovered" if self.master is not None else "job_rolled_back"

    @property
    def level(self) -> int:
        return WARNING

    @property
    def message(self) -> str:
        if self.master is None:
            return f"interrupted job {self.job} ({self.label}) had no master yet; it will be redone"
        return f"finished interrupted job {self.job} ({self.label}): {self.master}"


@dataclass(frozen=True)
class MoveProblem(Event):
    """An input not moved: tried again later, or `refused` (it changed since it was read)."""

    job: str
    path: Path
    reason: str = field(default="", metadata={"log": False})
    refused: bool = field(default=False, metadata={"log": False})

    @property
    def name(self) -> str:  # type: ignore[override]
        return "move_refused" if self.refused else "move_failed"

    @property
    def level(self) -> int:
        return ERROR

    @property
    def message(self) -> str:
        return self.reason


@dataclass(frozen=True)
class MovesFinished(Event):
    name: ClassVar[str] = "moves_finished"
    job: str
    files: int

    @property
    def message(self) -> str:
        return f"job {self.job}: the {self.files} input(s) left by an earlier run are moved"


@dataclass(frozen=True)
class FolderProblem(Event):
    """A capture folder (or one below it) that is not there or cannot be read."""

    folder: Path
    problem: str = field(default="", metadata={"log": False})
    missing: bool = field(default=False, metadata={"log": False})

    @property
    def name(self) -> str:  # type: ignore[override]
        return "capture_missing" if self.missing else "folder_unreadable"

    @property
    def level(self) -> int:
        return ERROR

    @property
    def message(self) -> str:
        return self.problem


# --------------------------------------------------------------------------- the service's life


@dataclass(frozen=True)
class Notice(Event):
    """An operational line of the service or run-once (watching, waiting, settled, reload...):
    for the log only, so it is typed by its name and fields, not by a class of its own."""

    kind: str = ""
    text: str = ""
    severity: int = INFO
    data: dict = field(default_factory=dict)

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.kind

    @property
    def level(self) -> int:
        return self.severity

    @property
    def message(self) -> str:
        return self.text or self.kind

    def fields(self) -> dict:
        return dict(self.data)


def notice(kind: str, text: str = "", severity: int = INFO, **data) -> None:
    """Emit a Notice."""
    emit(Notice(kind, text, severity, data))


# --------------------------------------------------------------------------- the bus


Subscriber = Callable[[Event], None]


class Bus:
    """Delivers each event to every subscriber, in order; a failing subscriber is logged
    and never stops the producer."""

    def __init__(self):
        self._subscribers: list[Subscriber] = []
        self._lock = threading.Lock()

    def subscribe(self, fn: Subscriber) -> Callable[[], None]:
        """Add a subscriber; returns the function that removes it."""
        with self._lock:
            self._subscribers.append(fn)
        return lambda: self.unsubscribe(fn)

    def unsubscribe(self, fn: Subscriber) -> None:
        with self._lock:
            if fn in self._subscribers:
                self._subscribers.remove(fn)

    def emit(self, ev: Event) -> None:
        with self._lock:
            subscribers = list(self._subscribers)
        for fn in subscribers:
            try:
                fn(ev)
            except Exception as exc:  # noqa: BLE001 - a subscriber's bug is not the job's
                from flatd.log import event

                event("subscriber_failed", f"an event subscriber failed on {ev.name}: {exc}", WARNING,
                      error=type(exc).__name__)


BUS = Bus()


def emit(ev: Event) -> None:
    BUS.emit(ev)


def subscribe(fn: Subscriber) -> Callable[[], None]:
    return BUS.subscribe(fn)


# --------------------------------------------------------------------------- subscribers


class LogSubscriber:
    """One log line per event (flatd.log decides the format and where it goes)."""

    def __call__(self, ev: Event) -> None:
        from flatd.log import event

        event(ev.name, ev.message, ev.level, **ev.fields())


class ReportSubscriber:
    """Gathers the events of a one-shot command (a context manager): what its final
    report or summary line is made of, and what a test can count."""

    def __init__(self, bus: Bus = BUS):
        self.bus = bus
        self.events: list[Event] = []
        self._unsubscribe: Optional[Callable[[], None]] = None

    def __call__(self, ev: Event) -> None:
        self.events.append(ev)

    def __enter__(self) -> "ReportSubscriber":
        self._unsubscribe = self.bus.subscribe(self)
        return self

    def __exit__(self, *exc) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None

    def of(self, kind: type) -> list:
        return [ev for ev in self.events if isinstance(ev, kind)]

    def summary(self) -> BatchDone:
        """Masters written, groups failed and files left out, as one event."""
        checked = [e.status for e in self.of(MasterChecked)]
        return BatchDone(None, len([e for e in self.of(MasterWritten) if not e.found]), len(self.of(JobFailed)),
                         len([e for e in self.of(FrameLeftOut) if not e.quiet])
                         + len([e for e in self.of(FlatRejectedQc) if e.action == "leave-out"]),
                         checked.count("warn"), checked.count("bad"))


BUS.subscribe(LogSubscriber())
