"""What hooks and notifications are told: a master's events merged into one outcome, as JSON.

The runner emits a master's facts as several events, in this order: `master_written`,
then `rejection_high` and `master_checked` (the quality verdict), then `inputs_moved` (or
`move_failed`). A `Gatherer` merges them into one `MasterOutcome`, complete when its
inputs are moved, or when the next job or the batch's end comes.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from flatd.notify import events as E

# Events that close every master still gathering: another job began, or the batch is over.
_CLOSING = (E.GroupPlanned, E.JobFailed, E.BatchDone, E.MovesFinished)


def jsonable(value: Any) -> Any:
    """`value` as JSON data: paths as text, tuples as lists, dataclasses as objects, NaN as null."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        try:
            return jsonable(value.item())
        except (TypeError, ValueError):
            pass
    return str(value)


def event_data(ev: E.Event, *leave_out: str) -> dict:
    """Every field of an event as JSON data (log-only or not), but those named."""
    return {f.name: jsonable(getattr(ev, f.name)) for f in dataclasses.fields(ev) if f.name not in leave_out}


@dataclass
class MasterOutcome:
    """A master and what followed it: its checks, a rejection warning, where its inputs went."""

    written: E.MasterWritten
    checked: Optional[E.Event] = None  # MasterChecked (flatd.qc)
    rejection: Optional[E.RejectionHigh] = None
    moved_to: Optional[Path] = None
    move_problems: list[str] = field(default_factory=list)
    flats_rejected: list[E.Event] = field(default_factory=list)  # FlatRejectedQc: the flat checks' findings

    @property
    def verdict(self) -> Optional[str]:
        """good, warn or bad (None: not checked)."""
        status = getattr(self.checked, "status", None)
        return str(status) if status is not None else None

    def previews(self) -> list[Path]:
        """The preview pictures beside the master that are there (flatd.qc.previews)."""
        found = [self.written.preview] if self.written.preview is not None else []
        try:
            from flatd.qc.previews import preview_paths

            found += list(preview_paths(self.written.path))
        except Exception:  # noqa: BLE001 - no previews module: the event's own preview only
            pass
        unique = list(dict.fromkeys(Path(p) for p in found))
        return [p for p in unique if p.is_file()]

    def document(self) -> dict:
        """The JSON document of this master (after_master hooks)."""
        doc = event_data(self.written)
        doc["master"] = doc.pop("path")
        doc["previews"] = jsonable(self.previews())
        doc["quality"] = event_data(self.checked, "job", "path") if self.checked is not None else None
        doc["verdict"] = self.verdict
        doc["rejection_high"] = event_data(self.rejection, "job", "path") if self.rejection is not None else None
        doc["moved_to"] = jsonable(self.moved_to)
        doc["move_problems"] = list(self.move_problems)
        doc["flats_rejected"] = [event_data(ev, "job", "group") for ev in self.flats_rejected]
        return doc


def failure_document(ev: E.JobFailed) -> dict:
    """The JSON document of a group that made no master (on_failure hooks)."""
    return event_data(ev)


class Gatherer:
    """Merges each master's events into one MasterOutcome; `add` returns those complete."""

    def __init__(self):
        self.pending: dict[str, MasterOutcome] = {}
        self.flats: dict[str, list[E.Event]] = {}  # the flat checks' findings, by job, before its master

    def add(self, ev: E.Event) -> list[MasterOutcome]:
        if isinstance(ev, E.MasterWritten):
            done = self._close(lambda job: job != ev.job)
            self.pending[ev.job] = MasterOutcome(ev, flats_rejected=self.flats.pop(ev.job, []))
            return done
        if ev.name == "flat_rejected_qc" and getattr(ev, "job", None):
            self.flats.setdefault(ev.job, []).append(ev)
            return []
        if isinstance(ev, _CLOSING):
            if isinstance(ev, E.BatchDone):
                self.flats.clear()
            return self.close()
        outcome = self.pending.get(getattr(ev, "job", None) or "")
        if outcome is None:
            return []
        if isinstance(ev, E.RejectionHigh):
            outcome.rejection = ev
        elif ev.name == "master_checked":
            outcome.checked = ev
        elif isinstance(ev, E.MoveProblem):
            outcome.move_problems.append(ev.message)
        elif isinstance(ev, E.InputsMoved):
            outcome.moved_to = ev.folder
            return [self.pending.pop(ev.job)]
        return []

    def close(self) -> list[MasterOutcome]:
        """Every master still gathering, complete now."""
        return self._close(lambda job: True)

    def _close(self, which) -> list[MasterOutcome]:
        done = [job for job in self.pending if which(job)]
        return [self.pending.pop(job) for job in done]


def of_folder(items: list, folder: Optional[Path], inputs_of) -> tuple[list, list]:
    """`items` split into those of the batch of capture folder `folder` (by their inputs;
    all when folder is None or an item's inputs are not known) and the others, which
    belong to a batch not over yet (the service's worker may be at the next folder)."""
    if folder is None:
        return list(items), []
    mine, others = [], []
    for item in items:
        inputs = inputs_of(item)
        inside = not inputs or Path(inputs[0]).is_relative_to(folder)
        (mine if inside else others).append(item)
    return mine, others
