"""The long-running process (`flatd watch`): scheduler, signals, reload, batches.

`flatd watch` is `flatd run-once` plus watching and timing: the same Runner, the same
`process_capture` for each folder, the same ledger. What the service adds:

- observers push paths onto a queue (flatd.ingest.watcher); the main thread feeds them to the
  Intake (flatd.ingest.intake), which reads the header of each file that stood still for
  `stable` once (a file shorter than its header promises is not ready yet), records
  each new flat in the ledger and keeps its Frame for the batch;
- a capture folder whose last new flat became ready `settle` ago is processed by one
  worker thread (the main thread stays free for signals); a scan at start-up, a full
  rescan every `rescan`, and an optional cron `schedule` catch what events miss;
- SIGTERM/SIGINT stop between jobs; a job still stacking after a few seconds is
  abandoned at the next band (the ledger rolls it back; it is redone at the next
  start); SIGHUP reloads the rules file, keeping the old rules when the new file is
  invalid.

It writes nothing to the screen: everything it has to say is an event (flatd.notify.events).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import threading
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Callable, Optional

from flatd.config import Rules
from flatd.notify.events import BatchDone, emit, notice
from flatd.ingest.intake import Intake, stat_file
from flatd.ledger import JobState, Ledger, StateLock
from flatd.notify import start_subscribers
from flatd.sdnotify import Notifier

# After SIGTERM/SIGINT: a running job may finish within STOP_GRACE seconds; then it is
# abandoned at its next band; at STOP_DEADLINE the process exits whatever it is doing.
STOP_GRACE = 4.0
STOP_DEADLINE = 8.5
TICK = 0.5  # seconds between looks at the tracker when no event comes
SUBSCRIBERS_WAIT = 5.0  # at exit: seconds for a running hook or a notification still being sent


class JobAbandoned(BaseException):
    """Raised from the stacker's progress callback to cut a job short at a band boundary.

    A BaseException, so that no `except Exception` on the way marks the job failed: it
    stays "planned" in the ledger and recover() rolls it back.
    """


def _adopt_library_loggers() -> None:
    """watchdog's and APScheduler's warnings in flatd's log format (one line, or JSON)."""
    handlers = logging.getLogger("flatd").handlers
    if not handlers:
        return
    for name in ("watchdog", "apscheduler"):
        library = logging.getLogger(name)
        library.handlers[:] = list(handlers)
        library.setLevel(logging.WARNING)
        library.propagate = False
    inotify = logging.getLogger("watchdog.observers.inotify")
    if _not_a_stop_race not in inotify.filters:
        inotify.addFilter(_not_a_stop_race)


def _not_a_stop_race(record: logging.LogRecord) -> bool:
    # Stopping an inotify observer can log a spurious "queue_events() called when the
    # thread is inactive" error (a race inside watchdog): not worth a line.
    return "called when the thread is inactive" not in record.getMessage()


class Service:
    """`flatd watch`: one process, one ledger, one job at a time."""

    def __init__(self, config_path: Optional[Path], rules: Rules, *,
                 clock: Callable[[], float] = time.monotonic,
                 make_native: Optional[Callable[[], object]] = None,
                 make_polling: Optional[Callable[[], object]] = None):
        from flatd.ingest.watcher import Observers, native_observer, polling_observer

        self.config_path = Path(config_path) if config_path else None
        self.rules = rules
        self.clock = clock
        self.queue: "queue.SimpleQueue" = queue.SimpleQueue()
        # A polling observer walks the whole tree each round: on a NAS, once per `stable`
        # (1-30 s) is soon enough for files that must stay unchanged that long anyway.
        self.observers = Observers(
            self.queue, lambda: self.rules.rescan, make_native or native_observer,
            make_polling or (lambda: polling_observer(max(1.0, min(self.rules.stable, 30.0)))))
        self.intake = Intake(rules, clock, self._owner)
        self.folders: dict = {}  # capture path -> FolderState
        self.moves_due = False  # jobs wait for moves: the worker tries them at each rescan
        self.worker: Optional[threading.Thread] = None
        self.scheduler = None
        self.ledger: Optional[Ledger] = None  # the main thread's connection
        self.job_ledger: Optional[Ledger] = None  # the worker's connection
        self.stop_requested = threading.Event()
        self.abandon = threading.Event()
        self.reload_requested = threading.Event()
        self.stop_at: Optional[float] = None
        self.next_rescan = 0.0
        self.failed_jobs: set[str] = set()
        self.abandoned = False
        self.ready = False  # observers started: /healthz and systemd's READY=1
        self.web = None  # the HTTP endpoint (flatd.web), when http.listen is set
        self.systemd = Notifier()  # READY, STATUS, WATCHDOG, STOPPING when $NOTIFY_SOCKET is set

    @property
    def tracker(self):
        return self.intake.tracker

    @property
    def watches(self) -> dict:
        return self.observers.watches

    @property
    def missing(self) -> set:
        """Capture folders not there (yet), or not watchable: tried again at each rescan."""
        return self.observers.missing

    # ------------------------------------------------------------------ life cycle

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT. LedgerLocked propagates (exit 2 in the CLI)."""
        lock = StateLock(self.rules.state).acquire()
        _adopt_library_loggers()
        previous = self._install_signals()
        close_subscribers = start_subscribers(lambda: self.rules)  # hooks, notifications: rules reloaded too
        try:
            self.ledger = self.intake.ledger = Ledger.open(self.rules.state)
            self.job_ledger = Ledger.open(self.rules.state)
            self.ledger.keep_verdicts_for(_fingerprint(self.rules))
            recovered = self._runner().recover()
            if recovered:
                notice("recovered", f"{len(recovered)} interrupted job(s) finished or rolled back", jobs=len(recovered))
            self._runner().retry_pending_moves()
            self._forget_vanished_frames()
            self.failed_jobs = {j.id for j in self.ledger.jobs([JobState.FAILED])}
            self._configure(initial=True)
            self._start_web()
            notice("service_started", f"watching {len(self.rules.capture)} capture folder(s); settle "
                   f"{self.rules.settle:g} s, stable {self.rules.stable:g} s, rescan {self.rules.rescan:g} s",
                   pid=os.getpid(), state=self.rules.state, folders=len(self.rules.capture))
            self.ready = True
            self.systemd.ready(f"watching {len(self.folders)} capture folder(s)")
            self._loop()
            return self._shutdown()
        finally:
            self._restore_signals(previous)
            close_subscribers(SUBSCRIBERS_WAIT)
            if self.web is not None:
                self.web.stop()
                self.web = None
            self.systemd.close()
            self.observers.stop_all()
            if self.scheduler is not None:
                self.scheduler.shutdown(wait=False)
                self.scheduler = None
            for ledger in (self.ledger, self.job_ledger):
                if ledger is not None:
                    ledger.close()
            self.ledger = self.job_ledger = self.intake.ledger = None
            lock.release()

    def _start_web(self) -> None:
        """The HTTP endpoint, when http.listen is set; WebError when it cannot listen."""
        if self.rules.http.listen:
            from flatd.web import start_for

            self.web = start_for(self)

    def _install_signals(self) -> dict:
        previous = {}
        if threading.current_thread() is not threading.main_thread():
            return previous  # in-process tests: stop() instead
        for sig in (signal.SIGTERM, signal.SIGINT, getattr(signal, "SIGHUP", None)):
            if sig is not None:
                previous[sig] = signal.signal(sig, self._on_signal)
        return previous

    @staticmethod
    def _restore_signals(previous: dict) -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    def _on_signal(self, signum, _frame) -> None:
        # Runs in the main thread between two bytecodes: set flags, wake the loop, return.
        if hasattr(signal, "SIGHUP") and signum == signal.SIGHUP:
            self.reload_requested.set()
        else:
            if self.stop_requested.is_set() and signum == signal.SIGINT:
                notice("interrupted", "second interrupt, exiting now; the next start recovers", logging.WARNING)
                for handler in logging.getLogger("flatd").handlers:
                    handler.flush()
                os._exit(130)
            self.request_stop()
        self.queue.put(("wake",))

    def request_stop(self) -> None:
        if not self.stop_requested.is_set():
            self.stop_at = self.clock()
            self.stop_requested.set()
        self.queue.put(("wake",))

    def request_sweep(self) -> None:
        self.queue.put(("sweep",))

    def _forget_vanished_frames(self) -> None:
        """Waiting flats deleted or changed while flatd was not running leave the list."""
        for row in self.ledger.waiting_frames():
            st = stat_file(Path(row["path"]))
            if st is None or st.st_size != row["size"] or st.st_mtime != row["mtime"]:
                self.ledger.forget_frame(Path(row["path"]))

    def _runner(self):
        from flatd.stack.engines import make_engine
        from flatd.runner import Runner

        return Runner(self.job_ledger, make_engine(self.rules.engine, self._progress),
                      should_stop=self.stop_requested.is_set)

    def _progress(self, label: str, total: int):
        """The stacker calls this after every band: the place to cut a job short safely."""
        def update(done: int, total_rows: int) -> None:
            if self.abandon.is_set():
                raise JobAbandoned(label)

        return update

    # ------------------------------------------------------------------ folders, observers, scheduler

    def _configure(self, initial: bool = False) -> None:
        """(Re)build folder states, filters and observers from self.rules."""
        from flatd.ingest.discover import FolderFilter
        from flatd.ingest.watcher import FolderState

        now = self.clock()
        wall = time.time()
        known = {row["path"]: row for row in self.ledger.folders()}
        wanted = {}
        for capture in self.rules.capture:
            path = capture.path
            if path in wanted:
                continue
            wanted[path] = capture
            self.intake.filters[path] = FolderFilter(capture, self.rules)
            state = self.folders.get(path)
            if state is None:
                state = FolderState(capture)
                row = known.get(str(path))
                if row is not None and row["last_ready"] is not None:
                    state.last_ready = now - max(0.0, wall - row["last_ready"])
                state.dirty = True  # look at every folder once: waiting flats, jobs rolled back
                self.folders[path] = state
            else:
                state.capture = capture
        for path in [p for p in self.folders if p not in wanted]:
            del self.folders[path]
            self.intake.filters.pop(path, None)
        self.intake.rules = self.rules
        self.tracker.stable = self.rules.stable
        self.intake.drop_outside(wanted)
        self.observers.keep(wanted)
        self._start_scheduler()
        self.next_rescan = now  # scan everything at once (start-up, reload)

    def _start_scheduler(self) -> None:
        if self.scheduler is not None:
            self.scheduler.shutdown(wait=False)
            self.scheduler = None
        if self.rules.schedule:
            self.scheduler = start_scheduler(self.rules.schedule, self.request_sweep)

    # ------------------------------------------------------------------ the main loop

    def _loop(self) -> None:
        errors = 0
        while not self.stop_requested.is_set():
            self.systemd.watchdog()  # from this loop only: a hung loop stops the pings
            try:
                self._drain(TICK)
                if self.stop_requested.is_set():
                    break
                if self.reload_requested.is_set():
                    self.reload_requested.clear()
                    self._reload()
                now = self.clock()
                if now >= self.next_rescan:
                    self._rescan()
                    self.next_rescan = self.clock() + self.rules.rescan
                    self.moves_due = bool(self.ledger.jobs([JobState.MOVES_PENDING]))
                self.intake.poll_changing(now)
                self.intake.check_ready(self.clock(), self._interrupted)
                self._dispatch(self.clock())
                errors = 0
            except Exception as exc:  # noqa: BLE001 - a service keeps going; say what went wrong
                errors += 1
                notice("service_error", f"unexpected error in the main loop: {exc}", logging.ERROR,
                       error=type(exc).__name__, traceback=traceback.format_exc(limit=5).strip().replace("\n", " | "))
                self.stop_requested.wait(min(60.0, 2.0 * errors))

    def _drain(self, timeout: float) -> None:
        """Handle everything on the queue; wait up to `timeout` for the first item."""
        try:
            item = self.queue.get(timeout=timeout)
        except queue.Empty:
            return
        while True:
            self._handle(item)
            try:
                item = self.queue.get_nowait()
            except queue.Empty:
                return

    def _handle(self, item: tuple) -> None:
        kind = item[0]
        if kind == "path":
            self.intake.touch(item[1], Path(os.path.abspath(item[2])))
        elif kind == "dir":
            folder_filter = self.intake.filters.get(item[1])
            if folder_filter is not None and folder_filter.wants_dir(Path(item[2])):
                for path in folder_filter.walk(Path(item[2])):
                    self.intake.touch(item[1], path)
        elif kind == "gone-dir":
            for path in self.intake.tracked_under(Path(os.path.abspath(item[2]))):
                self.intake.touch(item[1], path)
        elif kind == "sweep":
            self._sweep()
        elif kind == "done":
            self._batch_done(item[1], item[2])
        elif kind in ("abandoned", "error"):
            state = self.folders.get(item[1])
            if state is not None and kind == "error":
                state.dirty = True
                state.not_before = self.clock() + max(self.rules.settle, 60.0)
        # "wake": nothing to do

    def _rescan(self) -> None:
        """Walk every capture folder: find what events missed, notice what went away."""
        started = self.clock()
        for path, capture in [(p, s.capture) for p, s in self.folders.items()]:
            if not path.is_dir():
                self.observers.gone(path)
                for tracked in self.intake.tracked_under(path):
                    self.intake.touch(path, tracked)  # files that went with it leave the tracker
                continue
            self.observers.ensure(capture)
            if not self.intake.walk(path, self._walk_stop):
                return
        # `flatd retry` removed failed jobs: look at the folders again.
        failed = {j.id for j in self.ledger.jobs([JobState.FAILED])}
        if self.failed_jobs - failed:
            notice("retry_seen", f"{len(self.failed_jobs - failed)} failed job(s) put back; looking again")
            for state in self.folders.values():
                state.dirty = True
        self.failed_jobs = failed
        notice("rescan", f"rescanned {len(self.folders)} folder(s) in {self.clock() - started:.2f} s", logging.DEBUG,
               tracked=len(self.intake.tracker))

    def _owner(self, path: Path):
        """The capture folder a file belongs to (the deepest one that holds it)."""
        best = None
        for folder, state in self.folders.items():
            if folder in path.parents and (best is None or len(folder.parts) > len(best.path.parts)):
                best = state
        return best

    def _walk_stop(self) -> bool:
        """A long walk (a big share) is still the main loop at work: it pings the watchdog."""
        self.systemd.watchdog()
        return self.stop_requested.is_set()

    def _interrupted(self) -> bool:
        self.systemd.watchdog()  # thousands of headers after a start: the loop is at work
        return self.stop_requested.is_set() or self.reload_requested.is_set()

    def _dispatch(self, now: float) -> None:
        if self.worker is not None and self.worker.is_alive():
            return
        self.worker = None
        batches = []
        for state in self.folders.values():
            if not state.due(now, self.rules.settle) or self.intake.blocked(state.path, now, self.rules.settle):
                continue
            accepted = self.intake.batch(state.path)  # the Frames as the intake read them
            reason = "scheduled sweep" if state.force else "settled"
            state.dispatched()
            flats = len(accepted)
            if not flats:
                continue  # nothing that could make a master
            notice("session_settled", f"{state.path}: {reason}, {flats} flat(s) ready; processing",
                   folder=state.path, flats=flats, reason=reason)
            batches.append((state.capture, accepted))
        if batches:
            self.systemd.status(f"processing {len(batches)} capture folder(s)")
        if batches or self.moves_due:
            # With no batch, the worker only moves the inputs earlier jobs could not move.
            self.moves_due = False
            self.worker = threading.Thread(target=self._work, args=(self.rules, batches), name="flatd-job",
                                           daemon=True)
            self.worker.start()

    def _sweep(self) -> None:
        notice("sweep", "scheduled sweep of every capture folder")
        self._rescan()
        self.next_rescan = self.clock() + self.rules.rescan
        for state in self.folders.values():
            state.dirty = True
            state.force = True

    # ------------------------------------------------------------------ the worker

    def _work(self, rules: Rules, batches: list) -> None:
        """In the worker thread: the same process_capture as run-once, folder by folder."""
        from flatd.calibration import LibraryCache
        from flatd.runner import process_capture

        runner = self._runner()
        libraries = LibraryCache()  # one per batch: darks added to the library are seen
        try:
            runner.retry_pending_moves()  # inputs an earlier batch could not move
        except Exception as exc:  # noqa: BLE001 - report, keep serving
            notice("batch_error", f"moving inputs left by earlier jobs failed: {exc}", logging.ERROR,
                   error=type(exc).__name__)
        for capture, accepted in batches:
            if self.stop_requested.is_set():
                return
            try:
                report = process_capture(capture, rules, runner, stable=rules.stable, libraries=libraries,
                                         frames=accepted)
            except JobAbandoned as exc:
                self.abandoned = True
                notice("job_abandoned", f"stopping: the job for {exc} was cut short; it is rolled back and "
                       "redone at the next start", logging.WARNING, folder=capture.path)
                self.queue.put(("abandoned", capture.path))
                return
            except Exception as exc:  # noqa: BLE001 - report, keep serving
                notice("batch_error", f"processing {capture.path} failed: {exc}", logging.ERROR, folder=capture.path,
                       error=type(exc).__name__,
                       traceback=traceback.format_exc(limit=8).strip().replace("\n", " | "))
                self.queue.put(("error", capture.path))
                continue
            self.queue.put(("done", capture.path, report))

    def _batch_done(self, folder: Path, report) -> None:
        """In the main thread: note in the ledger what the batch left and why (for status)."""
        notes = batch_notes(folder, report)
        self.ledger.folder_processed(folder, time.time(), json.dumps(notes))
        self.failed_jobs = {j.id for j in self.ledger.jobs([JobState.FAILED])}
        emit(BatchDone(folder, notes["masters"], len(notes["failed"]), warn=report.marked("warn"),
                       bad=report.marked("bad")))
        self.systemd.status(f"watching {len(self.folders)} capture folder(s); last batch {folder}: "
                            f"{notes['masters']} master(s), {len(notes['failed'])} failed")

    # ------------------------------------------------------------------ reload, stop

    def _reload(self) -> None:
        from flatd.config import ConfigError, load_rules

        if self.config_path is None:
            notice("reload_failed", "SIGHUP: no rules file to read again", logging.WARNING)
            return
        try:
            rules = load_rules(self.config_path)
        except ConfigError as exc:
            problems = exc.render().splitlines()
            notice("reload_failed", f"SIGHUP: the rules file {self.config_path} is invalid; the old rules stay in force: "
                   + " | ".join(problems), logging.ERROR, path=self.config_path, errors=len(problems))
            return
        if not rules.capture:
            notice("reload_failed", f"SIGHUP: {self.config_path} names no capture folder; the old rules stay in force",
                   logging.ERROR, path=self.config_path)
            return
        if Path(rules.state) != Path(self.rules.state):
            notice("reload_state_ignored", f"the state folder cannot change while running ({self.rules.state} stays; "
                   "restart flatd to use the new one)", logging.WARNING)
            rules.__dict__["state"] = self.rules.state
        if rules.http != self.rules.http:
            notice("reload_http_ignored", "the http settings cannot change while running (the old ones stay; "
                   "restart flatd to use the new ones)", logging.WARNING)
            rules.__dict__["http"] = self.rules.http
        self.rules = rules
        self.ledger.keep_verdicts_for(_fingerprint(rules))
        self._configure()
        notice("rules_reloaded", f"rules file {self.config_path} read again: {len(rules.capture)} capture folder(s)",
               path=self.config_path, folders=len(rules.capture))

    def _shutdown(self) -> int:
        """Stop observers, let the running job finish or abandon it, exit within ~10 s."""
        notice("service_stopping", "stopping" + (": waiting for the running job" if self._busy() else ""))
        self.systemd.stopping("stopping" + (": waiting for the running job" if self._busy() else ""))
        self.observers.signal_stop()
        if self.scheduler is not None:
            self.scheduler.shutdown(wait=False)
            self.scheduler = None
        stop_at = self.stop_at if self.stop_at is not None else self.clock()
        while self._busy():
            elapsed = self.clock() - stop_at
            if elapsed >= STOP_GRACE and not self.abandon.is_set():
                self.abandon.set()  # cut the job short at its next band
            if elapsed >= STOP_DEADLINE:
                notice("job_abandoned", "the running job did not stop in time; exiting now. The next start finishes "
                       "or rolls it back from the ledger", logging.WARNING)
                for handler in logging.getLogger("flatd").handlers:
                    handler.flush()
                os._exit(0)
            self.worker.join(0.1)
        # Handle what the worker reported last (a finished batch, for status).
        while True:
            try:
                item = self.queue.get_nowait()
            except queue.Empty:
                break
            if item[0] == "done":
                self._batch_done(item[1], item[2])
        if self.abandoned:
            self._runner().recover()  # roll the cut-short job back now (the next start would too)
        notice("service_stopped", "stopped")
        return 0

    def _busy(self) -> bool:
        return self.worker is not None and self.worker.is_alive()


# =========================================================================== helpers


def _fingerprint(rules: Rules) -> str:
    """Identifies the rules a file's verdict (flat or not) depends on."""
    import hashlib

    return hashlib.sha256(rules.model_dump_json().encode()).hexdigest()[:16]


def batch_notes(folder: Path, report) -> dict:
    """What a batch left and why, as the ledger keeps it for `flatd status`: failed
    groups, files left out by reason, masters made."""
    failed = [{"label": f.label, "reason": f.reason, "files": len(f.frames)} for f in report.plan.failed]
    # Jobs kept as failed are listed from the jobs table; the others only from here.
    failed += [{"label": o.job.label, "reason": o.reason, "files": len(o.job.inputs),
                **({"job": o.job.id} if o.state in ("failed", "failed-before") and not o.transient else {})}
               for o in report.outcomes if o.failed]
    failed += [{"label": "error", "reason": p, "files": 0} for p in report.problems]
    reasons = Counter(item.reason for item in report.plan.left_out)
    left = [{"reason": r, "files": n} for r, n in reasons.most_common(20)]
    for entry in left:
        if "min_group_size" in entry["reason"]:
            notice("group_left_out", f"{folder}: {entry['files']} flat(s) left in place: {entry['reason']}; "
                   "considered again when more flats arrive", logging.WARNING, folder=folder, files=entry["files"])
    done = sum(1 for o in report.outcomes if o.state == "done")
    return {"failed": failed, "left_out": left, "masters": done}


def start_scheduler(schedule: str, sweep: Callable[[], None]):
    """A background scheduler calling `sweep` at each time of the cron line `schedule`;
    its thread only asks, the main loop does the sweep."""
    from apscheduler.schedulers.background import BackgroundScheduler
    from apscheduler.triggers.cron import CronTrigger

    scheduler = BackgroundScheduler(daemon=True)
    scheduler.add_job(sweep, CronTrigger.from_crontab(schedule), id="sweep",
                      coalesce=True, max_instances=1, misfire_grace_time=3600)
    scheduler.start()
    when = getattr(scheduler.get_job("sweep"), "next_run_time", None)
    notice("schedule", f"scheduled sweeps: '{schedule}' (next {when:%Y-%m-%d %H:%M})" if when
           else f"scheduled sweeps: '{schedule}'", schedule=schedule)
    return scheduler
