"""/metrics: Prometheus figures fed by the event bus (counters) and the ledger (gauges).

`Metrics` is an event subscriber with its own CollectorRegistry (never the global one, so
two services in one test process do not mix). It also keeps the last flats left out, for
the status page.
"""

from __future__ import annotations

import collections
import threading
import time
from pathlib import Path
from typing import Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from flatd.notify import events as E

# A flat left out, by kind: the label of flatd_flats_left_out_total.
REASON_KINDS = ("not-a-flat", "unreadable", "too-few", "quality", "size", "calibration", "other")
VERDICTS = ("good", "warn", "bad", "other")  # the label of flatd_masters_checked_total
DURATION_BUCKETS = (1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)
RECENT_LEFT_OUT = 50  # flats left out kept for the status page


def reason_kind(event: E.FrameLeftOut) -> str:
    """One of REASON_KINDS for a flat left out (adapt here when the events carry a kind)."""
    declared = getattr(event, "kind", None) or getattr(event, "check", None)
    if isinstance(declared, str) and declared in REASON_KINDS:
        return declared
    reason = (event.reason or "").lower()
    if "not a flat" in reason or "never an input" in reason:
        return "not-a-flat"
    if event.bad or reason.startswith(("cannot read", "truncated", "not a fits", "unreadable")):
        return "unreadable"
    if "min_group_size" in reason:
        return "too-few"
    if getattr(event, "quality", None) or any(word in reason for word in (
            "quality", "level", "saturat", "odd frame", "odd_sigma", "too dark", "too bright")):
        return "quality"
    if reason.startswith("size ") or "overscan" in reason or "section" in reason:
        return "size"
    if "calibration" in reason or "dark" in reason or "bias" in reason:
        return "calibration"
    return "other"


class Metrics:
    """The service's Prometheus figures; call it with events (subscribe it to the bus)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.frames_seen = Counter("flatd_frames_seen", "flats that became ready (stable, complete) in a "
                                   "capture folder", registry=r)
        self.left_out = Counter("flatd_flats_left_out", "files left where they are, by kind of reason",
                                ["reason"], registry=r)
        self.masters = Counter("flatd_masters", "master flats written", registry=r)
        self.checked = Counter("flatd_masters_checked", "masters judged by the quality checks, by verdict",
                               ["verdict"], registry=r)
        self.failed = Counter("flatd_jobs_failed", "groups that made no master", registry=r)
        self.batches = Counter("flatd_batches", "capture-folder batches processed", registry=r)
        self.duration = Histogram("flatd_job_duration_seconds", "time to stack and write one master",
                                  buckets=DURATION_BUCKETS, registry=r)
        self.queue_depth = Gauge("flatd_queue_depth", "flats waiting in the ledger to be combined", registry=r)
        self.last_success = Gauge("flatd_last_success_timestamp_seconds", "Unix time of the last master "
                                  "written (0: none yet)", registry=r)
        self.failed_kept = Gauge("flatd_failed_groups", "failed jobs kept in the ledger until flatd retry",
                                 registry=r)
        self.requests = Counter("flatd_http_requests", "requests to this endpoint, by endpoint and status",
                                ["endpoint", "code"], registry=r)
        for kind in REASON_KINDS:
            self.left_out.labels(reason=kind)
        for verdict in VERDICTS:
            self.checked.labels(verdict=verdict)
        self.recent_left_out: collections.deque = collections.deque(maxlen=RECENT_LEFT_OUT)
        self._lock = threading.Lock()

    def __call__(self, event: E.Event) -> None:
        """An event subscriber: count what happened."""
        if isinstance(event, E.Notice) and event.name == "frame_ready":
            self.frames_seen.inc()
        elif isinstance(event, E.FrameLeftOut):
            self._left_out(event.path, event.reason, reason_kind(event))
        elif event.name == "flat_rejected_qc" and getattr(event, "action", "leave-out") == "leave-out":
            self._left_out(event.path, getattr(event, "reason", ""), "quality")  # flatd.qc.flats
        elif isinstance(event, E.MasterWritten) and not event.found:
            self.masters.inc()
            self.duration.observe(max(0.0, float(event.seconds or 0.0)))
            self.last_success.set(time.time())
        elif isinstance(event, E.JobFailed):
            if not getattr(event, "again", False):  # a failure of an earlier run, told again
                self.failed.inc()
        elif event.name == "master_checked":
            status = str(getattr(event, "status", ""))
            self.checked.labels(verdict=status if status in VERDICTS else "other").inc()
        elif isinstance(event, E.BatchDone):
            self.batches.inc()

    def _left_out(self, path, reason: str, kind: str) -> None:
        self.left_out.labels(reason=kind).inc()
        if kind != "not-a-flat":
            with self._lock:
                self.recent_left_out.appendleft((time.time(), Path(path), reason, kind))

    def left_out_list(self) -> list[tuple]:
        """(time, path, reason, kind) of the last flats left out, newest first."""
        with self._lock:
            return list(self.recent_left_out)

    def refresh_from(self, ledger) -> None:
        """The gauges from the ledger (a read-only connection; None: no ledger yet)."""
        if ledger is None:
            self.queue_depth.set(0)
            return
        db = ledger.db
        self.queue_depth.set(db.execute("SELECT count(*) FROM frames").fetchone()[0])
        self.failed_kept.set(db.execute("SELECT count(*) FROM jobs WHERE state='failed'").fetchone()[0])
        last: Optional[float] = db.execute("SELECT max(created_at) FROM masters").fetchone()[0]
        if last is not None:
            self.last_success.set(float(last))

    def exposition(self) -> bytes:
        """The Prometheus text format of every figure."""
        return generate_latest(self.registry)
