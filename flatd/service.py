"""run-once, and the long-running process: scheduler, signals, reload, status.

`flatd watch` is `flatd run-once` plus watching and timing: the same Runner, the same
`process_capture` for each folder, the same ledger. What the service adds:

- observers push paths onto a queue (flatd.watcher); the main thread feeds them to a
  StabilityTracker, reads the header of each file that stood still for `stable` (a
  file shorter than its header promises is not ready yet), and records each new flat
  in the ledger;
- a capture folder whose last new flat became ready `settle` ago is processed by one
  worker thread (the main thread stays free for signals); a scan at start-up, a full
  rescan every `rescan`, and an optional cron `schedule` catch what events miss;
- SIGTERM/SIGINT stop between jobs; a job still stacking after a few seconds is
  abandoned at the next band (the ledger rolls it back; it is redone at the next
  start); SIGHUP reloads the rules file, keeping the old rules when the new file is
  invalid.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import sqlite3
import threading
import time
import traceback
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Callable, Optional

from flatd.config import Rules
from flatd.ledger import MOVES_PENDING, Ledger, StateLock
from flatd.log import event

# After SIGTERM/SIGINT: a running job may finish within STOP_GRACE seconds; then it is
# abandoned at its next band; at STOP_DEADLINE the process exits whatever it is doing.
STOP_GRACE = 4.0
STOP_DEADLINE = 8.5
TICK = 0.5  # seconds between looks at the tracker when no event comes
# A file still changing after this long no longer holds its folder's batch back.
MAX_PENDING = 6 * 3600.0


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
    was combined before, and changes nothing on disk.
    """
    from flatd.calibration import LibraryCache
    from flatd.discover import FolderFilter, StableWait
    from flatd.runner import RunReport, Runner, process_capture

    report = RunReport()
    libraries = LibraryCache()
    waiter = None
    if wait and rules.stable > 0:
        waiter = StableWait(rules.stable)
        present = [FolderFilter(c, rules) for c in rules.capture if c.path.is_dir()]
        waiter.wait(present, rules.stable + MAX_WAIT, say or (lambda text: event("waiting", text)))

    def each_capture(runner: Runner) -> None:
        now = datetime.now()
        for capture in rules.capture:
            report.extend(process_capture(capture, rules, runner, dry_run, 0.0, libraries, now, waiter=waiter))

    if dry_run:
        ledger = Ledger.open_readonly(rules.state)
        runner = Runner(ledger, progress, rules.engine.workers)
        report.pending_moves = runner.retry_pending_moves(dry_run=True)
        each_capture(runner)
        return report
    with StateLock(rules.state):
        ledger = Ledger.open(rules.state)
        try:
            runner = Runner(ledger, progress, rules.engine.workers)
            report.recovered = runner.recover()
            report.pending_moves = runner.retry_pending_moves()
            each_capture(runner)
        finally:
            ledger.close()
    return report


# =========================================================================== the service


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


def _stat(path: Path) -> Optional[os.stat_result]:
    """The stat of a regular file, or None when it is gone (or not a regular file)."""
    import stat as S

    try:
        st = os.stat(path)
    except OSError:
        return None
    return st if S.S_ISREG(st.st_mode) else None


class Service:
    """`flatd watch`: one process, one ledger, one job at a time."""

    def __init__(self, config_path: Optional[Path], rules: Rules, *,
                 clock: Callable[[], float] = time.monotonic,
                 make_native: Optional[Callable[[], object]] = None,
                 make_polling: Optional[Callable[[], object]] = None):
        from flatd.watcher import StabilityTracker, native_observer, polling_observer

        self.config_path = Path(config_path) if config_path else None
        self.rules = rules
        self.clock = clock
        self.make_native = make_native or native_observer
        # A polling observer walks the whole tree each round: on a NAS, once per `stable`
        # (1-30 s) is soon enough for files that must stay unchanged that long anyway.
        self.make_polling = make_polling or (lambda: polling_observer(max(1.0, min(self.rules.stable, 30.0))))
        self.queue: "queue.SimpleQueue" = queue.SimpleQueue()
        self.tracker = StabilityTracker(rules.stable)
        self.folders: dict = {}  # capture path -> FolderState
        self.filters: dict = {}  # capture path -> FolderFilter
        self.watches: dict = {}  # capture path -> Watch
        self.missing: set = set()  # capture folders not there (yet): tried again at each rescan
        self.unreadable: dict = {}  # capture path -> folders under it that could not be read
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
        self.verdicts: list[tuple] = []  # files judged this tick, saved in one transaction

    # ------------------------------------------------------------------ life cycle

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT. LedgerLocked propagates (exit 2 in the CLI)."""
        lock = StateLock(self.rules.state).acquire()
        _adopt_library_loggers()
        previous = self._install_signals()
        try:
            self.ledger = Ledger.open(self.rules.state)
            self.job_ledger = Ledger.open(self.rules.state)
            self.ledger.keep_verdicts_for(_fingerprint(self.rules))
            recovered = self._runner().recover()
            if recovered:
                event("recovered", f"{len(recovered)} interrupted job(s) finished or rolled back", jobs=len(recovered))
            self._runner().retry_pending_moves()
            self._forget_vanished_frames()
            self.failed_jobs = {j.id for j in self.ledger.jobs(["failed"])}
            self._configure(initial=True)
            event("service_started", f"watching {len(self.rules.capture)} capture folder(s); settle "
                  f"{self.rules.settle:g} s, stable {self.rules.stable:g} s, rescan {self.rules.rescan:g} s",
                  pid=os.getpid(), state=self.rules.state, folders=len(self.rules.capture))
            self._loop()
            return self._shutdown()
        finally:
            self._restore_signals(previous)
            self._stop_watches()
            if self.scheduler is not None:
                self.scheduler.shutdown(wait=False)
                self.scheduler = None
            for ledger in (self.ledger, self.job_ledger):
                if ledger is not None:
                    ledger.close()
            self.ledger = self.job_ledger = None
            lock.release()

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
                os.write(2, b"flatd: second interrupt, exiting now; the next start recovers\n")
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
            st = _stat(Path(row["path"]))
            if st is None or st.st_size != row["size"] or st.st_mtime != row["mtime"]:
                self.ledger.forget_frame(Path(row["path"]))

    def _runner(self):
        from flatd.runner import Runner

        return Runner(self.job_ledger, progress=self._progress, workers=self.rules.engine.workers,
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
        from flatd.discover import FolderFilter
        from flatd.watcher import FolderState

        now = self.clock()
        wall = time.time()
        known = {row["path"]: row for row in self.ledger.folders()}
        wanted = {}
        for capture in self.rules.capture:
            path = capture.path
            if path in wanted:
                continue
            wanted[path] = capture
            self.filters[path] = FolderFilter(capture, self.rules)
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
            self.filters.pop(path, None)
        self.tracker.stable = self.rules.stable
        self.tracker.drop_outside(wanted)
        # Observers: restart those whose settings changed, stop those no longer wanted.
        for path, watch in list(self.watches.items()):
            capture = wanted.get(path)
            if capture is None or capture.recursive != watch.capture.recursive or capture.poll != watch.capture.poll:
                watch.stop()
                del self.watches[path]
        self.missing &= set(wanted)
        for path, capture in wanted.items():
            if path not in self.watches:
                self._start_watch(capture)
        self._start_scheduler()
        self.next_rescan = now  # scan everything at once (start-up, reload)

    def _start_watch(self, capture) -> None:
        from flatd.watcher import EnqueueHandler, choose_polling, filesystem_type, start_watch

        path = capture.path
        if not path.is_dir():
            if path not in self.missing:
                event("folder_missing", f"capture folder {path} does not exist (yet); looking again every "
                      f"{self.rules.rescan:g} s", logging.WARNING, folder=path)
            self.missing.add(path)
            return
        polling = choose_polling(path, capture.poll)
        try:
            watch = start_watch(capture, EnqueueHandler(self.queue, path), polling,
                                make_native=self.make_native, make_polling=self.make_polling)
        except OSError as exc:
            if path not in self.missing:
                event("watch_failed", f"cannot watch {path}: {exc.strerror or exc}; relying on rescans every "
                      f"{self.rules.rescan:g} s and trying again", logging.ERROR, folder=path)
            self.missing.add(path)
            return
        self.missing.discard(path)
        self.watches[path] = watch
        fstype = filesystem_type(path) or "?"
        why = "forced" if capture.poll in (True, False) else f"auto, {fstype}"
        if watch.polling and not polling:
            why = "the inotify limit was reached"
        event("watching", f"watching {path} ({watch.mode} events, {why}; "
              f"{'recursive' if capture.recursive else 'top level only'})",
              folder=path, mode=watch.mode, fstype=fstype, recursive=capture.recursive)

    def _stop_watches(self) -> None:
        watches = list(self.watches.values())
        self.watches.clear()
        for watch in watches:
            try:
                watch.observer.stop()
            except Exception:  # noqa: BLE001
                pass
        for watch in watches:
            try:
                watch.observer.join(1.0)
            except Exception:  # noqa: BLE001
                pass

    def _start_scheduler(self) -> None:
        if self.scheduler is not None:
            self.scheduler.shutdown(wait=False)
            self.scheduler = None
        if not self.rules.schedule:
            return
        from apscheduler.schedulers.background import BackgroundScheduler
        from apscheduler.triggers.cron import CronTrigger

        scheduler = BackgroundScheduler(daemon=True)
        # The scheduler's thread only asks; the main loop does the sweep.
        scheduler.add_job(self.request_sweep, CronTrigger.from_crontab(self.rules.schedule), id="sweep",
                          coalesce=True, max_instances=1, misfire_grace_time=3600)
        scheduler.start()
        self.scheduler = scheduler
        job = scheduler.get_job("sweep")
        when = getattr(job, "next_run_time", None)
        event("schedule", f"scheduled sweeps: '{self.rules.schedule}' (next {when:%Y-%m-%d %H:%M})" if when
              else f"scheduled sweeps: '{self.rules.schedule}'", schedule=self.rules.schedule)

    # ------------------------------------------------------------------ the main loop

    def _loop(self) -> None:
        errors = 0
        while not self.stop_requested.is_set():
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
                    self.moves_due = bool(self.ledger.jobs([MOVES_PENDING]))
                self._poll_unchecked(now)
                self._check_ready(self.clock())
                self._dispatch(self.clock())
                errors = 0
            except Exception as exc:  # noqa: BLE001 - a service keeps going; say what went wrong
                errors += 1
                event("service_error", f"unexpected error in the main loop: {exc}", logging.ERROR,
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
            self._touch(item[1], Path(os.path.abspath(item[2])))
        elif kind == "dir":
            folder_filter = self.filters.get(item[1])
            if folder_filter is not None and folder_filter.wants_dir(Path(item[2])):
                for path in folder_filter.walk(Path(item[2])):
                    self._touch(item[1], path)
        elif kind == "gone-dir":
            gone = Path(os.path.abspath(item[2]))
            for path in self.tracker.unchecked(gone) + list(self.tracker.stable_under(gone)):
                self._touch(item[1], Path(path))
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

    def _touch(self, folder: Path, path: Path) -> None:
        """An event or a scan says something happened to `path`: record its stat."""
        folder_filter = self.filters.get(folder)
        if folder_filter is None or not folder_filter.wants(path):
            return
        st = _stat(path)
        if st is None:
            if self.tracker.observe(path, None, self.clock()):
                self._gone(path)
            return
        self.tracker.observe(path, st, self.clock())

    def _report_unreadable(self, folder: Path, problems: list[str]) -> None:
        """A folder that cannot be read is an error in the log, once until it is readable again."""
        fresh = set(problems) - self.unreadable.get(folder, set())
        for problem in sorted(fresh):
            event("folder_unreadable", problem, logging.ERROR, folder=folder)
        self.unreadable[folder] = set(problems)

    def _gone(self, path: Path) -> None:
        if self.ledger.frame(path) is not None:
            self.ledger.forget_frame(path)
            event("frame_gone", f"{path} went away before it was combined", logging.DEBUG, path=path)

    def _rescan(self) -> None:
        """Walk every capture folder: find what events missed, notice what went away."""
        from flatd.discover import Walk

        started = self.clock()
        for path, capture in [(p, s.capture) for p, s in self.folders.items()]:
            if not path.is_dir():
                # Gone (an unmounted share, a deleted folder): watch again when it is back.
                old = self.watches.pop(path, None)
                if old is not None:
                    old.stop()
                if path not in self.missing:
                    event("folder_missing", f"capture folder {path} is not there; looking again every "
                          f"{self.rules.rescan:g} s", logging.WARNING, folder=path)
                    self.missing.add(path)
                for tracked in self.tracker.unchecked(path) + [Path(p) for p in self.tracker.stable_under(path)]:
                    self._touch(path, tracked)
                continue
            if path in self.missing or path not in self.watches or not self.watches[path].alive():
                old = self.watches.pop(path, None)
                if old is not None:
                    old.stop()
                self._start_watch(capture)
            seen = set()
            walked = Walk()
            for found in self.filters[path].walk(seen=walked):
                if self.stop_requested.is_set():
                    return  # a big share: SIGTERM does not wait for the walk
                seen.add(found)
                self._touch(path, found)
            for tracked in self.tracker.unchecked(path) + [Path(p) for p in self.tracker.stable_under(path)]:
                if tracked not in seen:
                    self._touch(path, tracked)
            self._report_unreadable(path, walked.problems)
        # `flatd retry` removed failed jobs: look at the folders again.
        failed = {j.id for j in self.ledger.jobs(["failed"])}
        if self.failed_jobs - failed:
            event("retry_seen", f"{len(self.failed_jobs - failed)} failed job(s) put back; looking again")
            for state in self.folders.values():
                state.dirty = True
        self.failed_jobs = failed
        event("rescan", f"rescanned {len(self.folders)} folder(s) in {self.clock() - started:.2f} s", logging.DEBUG,
              tracked=len(self.tracker))

    def _poll_unchecked(self, now: float) -> None:
        """Stat the files not yet stable or incomplete: a slow writer sends no event on some shares."""
        for path in self.tracker.changing():
            st = _stat(path)
            if st is None:
                if self.tracker.observe(path, None, now):
                    self._gone(path)
            else:
                self.tracker.observe(path, st, now)

    def _owner(self, path: Path):
        """The capture folder a file belongs to (the deepest one that holds it)."""
        best = None
        for folder, state in self.folders.items():
            if folder in path.parents and (best is None or len(folder.parts) > len(best.path.parts)):
                best = state
        return best

    def _check_ready(self, now: float) -> None:
        try:
            self._judge_ready_files(now)
        finally:
            if self.verdicts:
                self.ledger.remember_verdicts(self.verdicts)
                self.verdicts = []

    def _judge_ready_files(self, now: float) -> None:
        for path in self.tracker.ready(now):
            if self.stop_requested.is_set() or self.reload_requested.is_set():
                return  # thousands of headers after a start: signals come first
            entry = self.tracker.entry(path)
            st = _stat(path)
            if st is None:
                if self.tracker.observe(path, None, now):
                    self._gone(path)
                continue
            if (st.st_size, st.st_mtime) != (entry.size, entry.mtime):
                self.tracker.observe(path, st, now)  # changed after all: the clock starts again
                continue
            self.tracker.mark(path, self._evaluate(path, st, now))

    def _evaluate(self, path: Path, st: os.stat_result, now: float) -> str:
        """A stable file: its verdict (flat | other | incomplete | bad | own | consumed)."""
        from flatd.frames import FrameError, read_frame
        from flatd.plan import select_flats

        if self.ledger.is_master(path) or self.ledger.is_moved_input(path):
            return "own"
        if self.ledger.consumed(path, st.st_size, st.st_mtime):
            return "consumed"
        known = self.ledger.seen_verdict(path, st.st_size, st.st_mtime)
        if known is not None:
            return known  # judged before a restart: its header is not read again
        try:
            frame = read_frame(path, self.rules.keyword_map())
        except FrameError as exc:
            if exc.reason.startswith("truncated"):
                # Still being written (a pause longer than `stable`): not ready yet.
                event("frame_incomplete", f"{path} is not complete yet: {exc.reason}", logging.DEBUG, path=path)
                return "incomplete"
            event("file_left_out", f"left out {path}: {exc.reason}", logging.WARNING, path=path)
            self.verdicts.append((path, st.st_size, st.st_mtime, "bad"))
            return "bad"
        chosen, _ = select_flats([frame], self.rules)
        if not chosen:
            event("not_a_flat", f"{path}: {frame.kind.value}, not a flat", logging.DEBUG, path=path)
            self.verdicts.append((path, st.st_size, st.st_mtime, "other"))
            return "other"
        state = self._owner(path)
        if state is None:
            return "other"
        row = self.ledger.frame(path)
        if row is not None and row["size"] == st.st_size and row["mtime"] == st.st_mtime:
            return "flat"  # known before a restart: not new
        wall = time.time()
        self.ledger.frame_ready(path, st.st_size, st.st_mtime, state.path, frame.kind.value)
        self.ledger.folder_ready(state.path, wall)
        state.flat_ready(now)
        event("frame_ready", f"flat ready: {path}", path=path, folder=state.path, bytes=st.st_size,
              filter=frame.filter or "-", exposure=frame.exposure, temperature=frame.temperature)
        return "flat"

    def _blocked(self, state, now: float) -> bool:
        """A file under the folder is still being written: its batch waits for it."""
        for path, entry in self.tracker.entries.items():
            if state.path not in path.parents:
                continue
            if not entry.checked and now - entry.first_seen < MAX_PENDING:
                return True
            if entry.verdict == "incomplete" and now - entry.since < self.rules.settle:
                return True
        return False

    def _dispatch(self, now: float) -> None:
        if self.worker is not None and self.worker.is_alive():
            return
        self.worker = None
        batches = []
        for state in self.folders.values():
            if not state.due(now, self.rules.settle) or self._blocked(state, now):
                continue
            # Only the flats the tracker has seen stable: lights and other files in the
            # capture folder (thousands, after months) are not read again for each batch.
            accepted = {p: v for p, v in self.tracker.stable_under(state.path).items()
                        if (e := self.tracker.entry(Path(p))) is not None and e.verdict == "flat"}
            reason = "scheduled sweep" if state.force else "settled"
            state.dispatched()
            flats = len(accepted)
            if not flats:
                continue  # nothing that could make a master
            event("session_settled", f"{state.path}: {reason}, {flats} flat(s) ready; processing",
                  folder=state.path, flats=flats, reason=reason)
            batches.append((state.capture, accepted))
        if batches or self.moves_due:
            # With no batch, the worker only moves the inputs earlier jobs could not move.
            self.moves_due = False
            self.worker = threading.Thread(target=self._work, args=(self.rules, batches), name="flatd-job",
                                           daemon=True)
            self.worker.start()

    def _sweep(self) -> None:
        event("sweep", "scheduled sweep of every capture folder")
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
            event("batch_error", f"moving inputs left by earlier jobs failed: {exc}", logging.ERROR,
                  error=type(exc).__name__)
        for capture, accepted in batches:
            if self.stop_requested.is_set():
                return

            def ready(path: Path, st: os.stat_result, accepted=accepted) -> bool:
                return accepted.get(str(path)) == (st.st_size, st.st_mtime)

            try:
                report = process_capture(capture, rules, runner, stable=rules.stable, libraries=libraries,
                                         ready=ready)
            except JobAbandoned as exc:
                self.abandoned = True
                event("job_abandoned", f"stopping: the job for {exc} was cut short; it is rolled back and "
                      "redone at the next start", logging.WARNING, folder=capture.path)
                self.queue.put(("abandoned", capture.path))
                return
            except Exception as exc:  # noqa: BLE001 - report, keep serving
                event("batch_error", f"processing {capture.path} failed: {exc}", logging.ERROR, folder=capture.path,
                      error=type(exc).__name__,
                      traceback=traceback.format_exc(limit=8).strip().replace("\n", " | "))
                self.queue.put(("error", capture.path))
                continue
            self.queue.put(("done", capture.path, report))

    def _batch_done(self, folder: Path, report) -> None:
        """In the main thread: note in the ledger what the batch left and why (for status)."""
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
                event("group_left_out", f"{folder}: {entry['files']} flat(s) left in place: {entry['reason']}; "
                      "considered again when more flats arrive", logging.WARNING, folder=folder, files=entry["files"])
        done = sum(1 for o in report.outcomes if o.state == "done")
        self.ledger.folder_processed(folder, time.time(), json.dumps({"failed": failed, "left_out": left,
                                                                      "masters": done}))
        self.failed_jobs = {j.id for j in self.ledger.jobs(["failed"])}
        event("batch_done", f"{folder}: {done} master(s) written, {len(failed)} group(s) failed",
              folder=folder, masters=done, failed=len(failed))

    # ------------------------------------------------------------------ reload, stop

    def _reload(self) -> None:
        from flatd.config import ConfigError, load_rules

        if self.config_path is None:
            event("reload_failed", "SIGHUP: no rules file to read again", logging.WARNING)
            return
        try:
            rules = load_rules(self.config_path)
        except ConfigError as exc:
            problems = exc.render().splitlines()
            event("reload_failed", f"SIGHUP: the rules file {self.config_path} is invalid; the old rules stay in force: "
                  + " | ".join(problems), logging.ERROR, path=self.config_path, errors=len(problems))
            return
        if not rules.capture:
            event("reload_failed", f"SIGHUP: {self.config_path} names no capture folder; the old rules stay in force",
                  logging.ERROR, path=self.config_path)
            return
        if Path(rules.state) != Path(self.rules.state):
            event("reload_state_ignored", f"the state folder cannot change while running ({self.rules.state} stays; "
                  "restart flatd to use the new one)", logging.WARNING)
            rules.__dict__["state"] = self.rules.state
        self.rules = rules
        self.ledger.keep_verdicts_for(_fingerprint(rules))
        self._configure()
        event("rules_reloaded", f"rules file {self.config_path} read again: {len(rules.capture)} capture folder(s)",
              path=self.config_path, folders=len(rules.capture))

    def _shutdown(self) -> int:
        """Stop observers, let the running job finish or abandon it, exit within ~10 s."""
        event("service_stopping", "stopping" + (": waiting for the running job" if self._busy() else ""))
        for watch in list(self.watches.values()):
            try:
                watch.observer.stop()
            except Exception:  # noqa: BLE001
                pass
        if self.scheduler is not None:
            self.scheduler.shutdown(wait=False)
            self.scheduler = None
        stop_at = self.stop_at if self.stop_at is not None else self.clock()
        while self._busy():
            elapsed = self.clock() - stop_at
            if elapsed >= STOP_GRACE and not self.abandon.is_set():
                self.abandon.set()  # cut the job short at its next band
            if elapsed >= STOP_DEADLINE:
                event("job_abandoned", "the running job did not stop in time; exiting now. The next start finishes "
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
        event("service_stopped", "stopped")
        return 0

    def _busy(self) -> bool:
        return self.worker is not None and self.worker.is_alive()


# =========================================================================== status


def _fingerprint(rules: Rules) -> str:
    """Identifies the rules a file's verdict (flat or not) depends on."""
    import hashlib

    return hashlib.sha256(rules.model_dump_json().encode()).hexdigest()[:16]


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
    from flatd.ledger import LOCK_NAME

    try:
        text = (Path(state) / LOCK_NAME).read_text().strip()
        pid = int(text)
    except (OSError, ValueError):
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
    from rich.markup import escape

    state = Path(state)
    pid, alive = service_pid(state)
    if alive:
        console.print(f"flatd watch: [green]running[/green] (pid {pid}); state {escape(str(state))}")
    else:
        console.print(f"flatd watch: not running; state {escape(str(state))}")
    ledger = Ledger.open_readonly(state)
    if ledger is None:
        console.print("no ledger yet: nothing has been seen or made")
        return 0
    try:
        _print_status(ledger, rules, console, alive)
    except sqlite3.OperationalError as exc:  # the very first start is still creating the tables
        console.print(f"the ledger cannot be read yet ({exc}); try again in a moment")
        return 1
    finally:
        ledger.close()
    return 0


def _print_pending_moves(ledger: Ledger, console) -> None:
    """Jobs whose master is made but some inputs could not be moved yet."""
    from rich.markup import escape

    from flatd.ledger import MOVES_PENDING

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
        console.print(f"  {_when(job.updated_at)}  {escape(job.label)}: {count} input(s) still in place, master "
                      f"{escape(job.master or '?')}: {escape(job.reason or '')}")


def _print_status(ledger: Ledger, rules: Optional[Rules], console, alive: bool) -> None:
    from rich.markup import escape

    now = time.time()
    settle = rules.settle if rules is not None else None
    waiting: dict[str, list] = {}
    for row in ledger.waiting_frames():
        waiting.setdefault(row["folder"] or "?", []).append(row)
    folders = {row["path"]: row for row in ledger.folders()}
    captures = [str(c.path) for c in rules.capture] if rules is not None else []
    names = list(dict.fromkeys(captures + sorted(waiting)))

    failed_jobs = ledger.jobs(["failed"])
    failed_inputs = {row.path for job in failed_jobs for row in ledger.inputs(job.id)}

    console.print("\n[bold]Waiting flats[/bold]")
    if not names:
        console.print("  none")
    for name in names:
        rows = waiting.get(name, [])
        info = folders.get(name)
        if not rows:
            console.print(f"  {escape(name)}: no flats waiting")
            continue
        last_ready = max((r["ready_at"] or r["seen_at"]) for r in rows)
        if info is not None and info["last_ready"]:
            last_ready = max(last_ready, info["last_ready"])
        processed = info["processed_at"] if info is not None else None
        in_failed = sum(1 for r in rows if r["path"] in failed_inputs)
        text = f"  {escape(name)}: {len(rows)} flat(s) waiting"
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

    console.print("\n[bold]Last masters made[/bold]")
    masters = ledger.recent_masters(10)
    if not masters:
        console.print("  none yet")
    for row in masters:
        console.print(f"  {_when(row['created_at'])}  {escape(row['path'])}  ({escape(row['label'])}, "
                      f"{row['ncombine']} flats)")

    console.print("\n[bold]Failed groups[/bold]")
    lines, left = [], []
    for job in failed_jobs:
        lines.append(f"  {_when(job.updated_at)}  {escape(job.label)} in {escape(job.folder or '?')}: "
                     f"{escape(job.reason or 'no reason recorded')}  (flatd retry {job.id})")
    for name, info in folders.items():
        try:
            notes = json.loads(info["notes"] or "{}")
        except ValueError:
            continue
        when = _when(info["processed_at"]) if info["processed_at"] else "?"
        for item in notes.get("failed", []):
            if item.get("job"):
                continue  # a failed job: listed above from the jobs table
            count = f" ({item['files']} flats)" if item.get("files") else ""
            lines.append(f"  {when}  {escape(item['label'])} in {escape(name)}: {escape(item['reason'])}{count}")
        for item in notes.get("left_out", []):
            left.append(f"  {when}  {escape(name)}: {item['files']} file(s): {escape(item['reason'])}")
    console.print("\n".join(lines) if lines else "  none")
    _print_pending_moves(ledger, console)
    if left:
        console.print("\n[bold]Left in place by the last batch[/bold]")
        console.print("\n".join(left))
