"""The service's intake: which files under the watched folders are ready flats.

Events, scans and polls `touch` paths; a path the folder filter wants is stat'ed and
fed to the StabilityTracker; a file that stood still for `stable` is judged once (its
header read once, or its verdict taken from the ledger) and a flat's `Frame` is kept
for the batch: a batch reads no header again and walks no folder.
"""

from __future__ import annotations

import logging
import os
import stat as S
import time
from pathlib import Path
from typing import Callable, Optional

from flatd.config import Rules
from flatd.notify.events import FrameLeftOut, emit, notice
from flatd.ingest.frames import Frame
from flatd.ledger import FrameVerdict as V

# A file still changing after this long no longer holds its folder's batch back.
MAX_PENDING = 6 * 3600.0


def stat_file(path: Path) -> Optional[os.stat_result]:
    """The stat of a regular file, or None when it is gone (or not a regular file)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st if S.S_ISREG(st.st_mode) else None


class Intake:
    """Stability tracking, verdicts and the Frames of ready flats, for every capture folder.

    `owner(path)` gives the FolderState a file belongs to (None: no capture folder);
    `ledger` is the main thread's connection, set once the service has opened it.
    """

    def __init__(self, rules: Rules, clock: Callable[[], float], owner: Callable[[Path], object]):
        from flatd.ingest.watcher import StabilityTracker

        self.rules = rules
        self.clock = clock
        self.owner = owner
        self.ledger = None
        self.tracker = StabilityTracker(rules.stable)
        self.filters: dict = {}  # capture path -> FolderFilter
        self.frames: dict[Path, Frame] = {}  # ready flats, read once
        self.unreadable: dict = {}  # capture path -> folders under it that could not be read
        self.verdicts: list[tuple] = []  # files judged this tick, saved in one transaction

    # ------------------------------------------------------------------ what happened to a path

    def touch(self, folder: Path, path: Path) -> None:
        """An event or a scan says something happened to `path`: record its stat."""
        folder_filter = self.filters.get(folder)
        if folder_filter is None or not folder_filter.wants(path):
            return
        self.observe(path, stat_file(path), self.clock())

    def observe(self, path: Path, st: Optional[os.stat_result], now: float) -> None:
        if self.tracker.observe(path, st, now):
            self.frames.pop(Path(path), None)  # new, changed or gone: read again when stable
            if st is None:
                self.gone(path)

    def gone(self, path: Path) -> None:
        if self.ledger.frame(path) is not None:
            self.ledger.forget_frame(path)
            notice("frame_gone", f"{path} went away before it was combined", logging.DEBUG, path=path)

    def drop_outside(self, folders) -> None:
        """Forget files under no folder in `folders` (a reload removed a capture folder)."""
        self.tracker.drop_outside(folders)
        self.frames = {p: f for p, f in self.frames.items() if p in self.tracker}

    def tracked_under(self, folder: Path) -> list[Path]:
        return self.tracker.unchecked(folder) + [Path(p) for p in self.tracker.stable_under(folder)]

    def walk(self, folder: Path, stop: Callable[[], bool]) -> bool:
        """Touch every candidate under a capture folder and every file tracked there
        (files that went away are noticed). False when `stop` cut the walk short."""
        from flatd.ingest.discover import Walk

        seen, walked = set(), Walk()
        for found in self.filters[folder].walk(seen=walked):
            if stop():
                return False  # a big share: SIGTERM does not wait for the walk
            seen.add(found)
            self.touch(folder, found)
        for tracked in self.tracked_under(folder):
            if tracked not in seen:
                self.touch(folder, tracked)
        self.report_unreadable(folder, walked.problems)
        return True

    def report_unreadable(self, folder: Path, problems: list[str]) -> None:
        """A folder that cannot be read is an error in the log, once until it is readable again."""
        from flatd.notify.events import FolderProblem

        for problem in sorted(set(problems) - self.unreadable.get(folder, set())):
            emit(FolderProblem(folder, problem))
        self.unreadable[folder] = set(problems)

    def poll_changing(self, now: float) -> None:
        """Stat the files not yet stable or incomplete: a slow writer sends no event on some shares."""
        for path in self.tracker.changing():
            self.observe(path, stat_file(path), now)

    # ------------------------------------------------------------------ verdicts

    def check_ready(self, now: float, interrupted: Callable[[], bool]) -> None:
        """Judge every file that stood still for `stable` (verdicts saved in one transaction)."""
        try:
            for path in self.tracker.ready(now):
                if interrupted():
                    return  # thousands of headers after a start: signals come first
                self._judge(path, now)
        finally:
            if self.verdicts:
                self.ledger.remember_verdicts(self.verdicts)
                self.verdicts = []

    def _judge(self, path: Path, now: float) -> None:
        entry = self.tracker.entry(path)
        st = stat_file(path)
        if st is None or (st.st_size, st.st_mtime) != (entry.size, entry.mtime):
            self.observe(path, st, now)  # gone, or changed after all: the clock starts again
            return
        self.tracker.mark(path, self.evaluate(path, st, now))

    def evaluate(self, path: Path, st: os.stat_result, now: float) -> str:
        """A stable file: its verdict (flat | other | incomplete | bad | own | consumed)."""
        from flatd.ingest.frames import FrameError, read_frame
        from flatd.plan import select_flats

        if self.ledger.is_master(path) or self.ledger.is_moved_input(path):
            return V.OWN
        if self.ledger.consumed(path, st.st_size, st.st_mtime):
            return V.CONSUMED
        known = self.ledger.seen_verdict(path, st.st_size, st.st_mtime)
        if known is not None:
            return known  # judged before a restart: its header is not read again
        try:
            frame = read_frame(path, self.rules.keyword_map())
        except FrameError as exc:
            if exc.reason.startswith("truncated"):
                # Still being written (a pause longer than `stable`): not ready yet.
                notice("frame_incomplete", f"{path} is not complete yet: {exc.reason}", logging.DEBUG, path=path)
                return V.INCOMPLETE
            emit(FrameLeftOut(path, exc.reason, bad=True))
            self.verdicts.append((path, st.st_size, st.st_mtime, V.BAD))
            return V.BAD
        chosen, _ = select_flats([frame], self.rules)
        if not chosen:
            notice("not_a_flat", f"{path}: {frame.kind.value}, not a flat", logging.DEBUG, path=path)
            self.verdicts.append((path, st.st_size, st.st_mtime, V.OTHER))
            return V.OTHER
        return self._flat(path, st, frame, now)

    def _flat(self, path: Path, st: os.stat_result, frame: Frame, now: float) -> str:
        state = self.owner(path)
        if state is None:
            return V.OTHER
        self.frames[Path(path)] = frame
        row = self.ledger.frame(path)
        if row is not None and row["size"] == st.st_size and row["mtime"] == st.st_mtime:
            return V.FLAT  # known before a restart: not new
        self.ledger.frame_ready(path, st.st_size, st.st_mtime, state.path, frame.kind.value)
        self.ledger.folder_ready(state.path, time.time())
        state.flat_ready(now)
        notice("frame_ready", f"flat ready: {path}", path=path, folder=state.path, bytes=st.st_size,
               filter=frame.filter or "-", exposure=frame.exposure, temperature=frame.temperature)
        return V.FLAT

    # ------------------------------------------------------------------ batches

    def blocked(self, folder: Path, now: float, settle: float) -> bool:
        """A file under the folder is still being written: its batch waits for it."""
        for path, entry in self.tracker.entries.items():
            if folder not in path.parents:
                continue
            if not entry.checked and now - entry.first_seen < MAX_PENDING:
                return True
            if entry.verdict == V.INCOMPLETE and now - entry.since < settle:
                return True
        return False

    def batch(self, folder: Path) -> list[Frame]:
        """The Frames of the flats the tracker saw stable under `folder`, as they were read:
        lights and other files (thousands, after months) are not read again."""
        frames = []
        for path in self.tracker.stable_under(folder):
            entry = self.tracker.entry(Path(path))
            frame = self.frames.get(Path(path))
            if entry is not None and entry.verdict == V.FLAT and frame is not None:
                frames.append(frame)
        return frames
