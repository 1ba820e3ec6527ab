"""Watching capture folders: observers (native or polling), stability tracking, settle timers.

Nothing here combines or moves anything. Observers run in their own (daemon) threads
and only push paths onto a queue; the service's main loop feeds those paths to a
`StabilityTracker`, decides which files are ready, and keeps one `FolderState` (the
settle timer) per capture folder. Events are hints only: the service also scans every
folder at start-up and every `rescan`.
"""

from __future__ import annotations

import errno
import logging
import os
import queue
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

from watchdog.events import FileSystemEventHandler

from flatd.config import CaptureFolder
from flatd.ingest.discover import inside
from flatd.notify.events import notice

# --------------------------------------------------------------------------- file systems

# File systems on which inotify/FSEvents do not see changes made by other machines.
NETWORK_FS = frozenset({
    "nfs", "nfs4", "cifs", "smb", "smb2", "smb3", "smbfs", "ncpfs", "afs", "9p", "ceph", "glusterfs",
    "lustre", "gpfs", "beegfs", "davfs", "webdav", "virtiofs", "vboxsf", "vmhgfs", "prl_fs", "sshfs",
    "afpfs", "orangefs",
})

_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


def _unescape_mount(text: str) -> str:
    """/proc/mounts writes a space in a mount point as \\040, a tab as \\011..."""
    return _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), text)


def parse_proc_mounts(text: str) -> list[tuple[str, str]]:
    """(mount point, file system type) for each line of /proc/mounts."""
    mounts = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 3:
            mounts.append((_unescape_mount(parts[1]), parts[2]))
    return mounts


_BSD_MOUNT = re.compile(r"^.+? on (.+) \(([\w.-]+)")


def parse_bsd_mount(text: str) -> list[tuple[str, str]]:
    """(mount point, type) from the output of `mount` on macOS/BSD: 'dev on /p (smbfs, ...)'."""
    mounts = []
    for line in text.splitlines():
        match = _BSD_MOUNT.match(line)
        if match:
            mounts.append((match.group(1), match.group(2)))
    return mounts


def system_mounts() -> list[tuple[str, str]]:
    """The mounted file systems of this machine (empty when they cannot be read)."""
    try:
        with open("/proc/mounts", encoding="utf-8", errors="replace") as handle:
            return parse_proc_mounts(handle.read())
    except OSError:
        pass
    if sys.platform == "darwin" or "bsd" in sys.platform:
        try:
            out = subprocess.run(["mount"], capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return []
        return parse_bsd_mount(out)
    return []


def filesystem_type(path: Path, mounts: Optional[list[tuple[str, str]]] = None) -> Optional[str]:
    """The type of the file system holding `path`: the mount point that is the longest
    prefix of the path wins (later lines win ties: the last mount over a point is the
    visible one)."""
    mounts = system_mounts() if mounts is None else mounts
    target = os.path.abspath(os.path.realpath(path) if os.path.exists(path) else path)
    best: Optional[tuple[int, str]] = None
    for point, fstype in mounts:
        point = point.rstrip("/") or "/"
        covers = target == point or target.startswith(point + "/") or point == "/"
        if covers and (best is None or len(point) >= best[0]):
            best = (len(point), fstype)
    return None if best is None else best[1]


def is_network_fs(fstype: Optional[str]) -> bool:
    """nfs, cifs/smb, sshfs and other network file systems, and any FUSE file system."""
    if not fstype:
        return False
    kind = fstype.lower()
    if kind.startswith("fuse") or kind.startswith("nfs") or kind.startswith("smb"):
        return True
    return kind in NETWORK_FS or kind.split(".")[-1] in NETWORK_FS


def choose_polling(path: Path, poll, mounts: Optional[list[tuple[str, str]]] = None) -> bool:
    """`poll: auto` polls on network and FUSE file systems; `true`/`false` force it."""
    if poll is True or poll is False:
        return poll
    return is_network_fs(filesystem_type(path, mounts))


# --------------------------------------------------------------------------- stability


@dataclass
class Entry:
    """What the tracker knows of one file."""

    size: int
    mtime: float
    since: float  # when this (size, mtime) was first seen
    first_seen: float  # when the file was first seen at all
    checked: bool = False  # evaluated (header read) at this (size, mtime)
    verdict: Optional[str] = None  # flat | other | incomplete | bad | own


class StabilityTracker:
    """Files are ready when their size and mtime have not changed for `stable` seconds.

    Pure: the clock is passed in. `observe()` records what a stat said; `ready()` lists
    the files stable long enough and not yet checked; `mark()` records the check's
    verdict, which holds until the file's size or mtime changes again.
    """

    def __init__(self, stable: float):
        self.stable = float(stable)
        self.entries: dict[Path, Entry] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, path) -> bool:
        return Path(path) in self.entries

    def observe(self, path: Path, stat: Optional[os.stat_result], now: float) -> bool:
        """Record a stat (None: the file is gone). True when the file is new or changed."""
        path = Path(path)
        if stat is None:
            return self.entries.pop(path, None) is not None
        size, mtime = stat.st_size, stat.st_mtime
        entry = self.entries.get(path)
        if entry is None:
            self.entries[path] = Entry(size, mtime, now, now)
            return True
        if entry.size != size or entry.mtime != mtime:
            entry.size, entry.mtime, entry.since = size, mtime, now
            entry.checked, entry.verdict = False, None
            return True
        return False

    def entry(self, path: Path) -> Optional[Entry]:
        return self.entries.get(Path(path))

    def ready(self, now: float) -> list[Path]:
        """Files unchanged for `stable` seconds that have not been checked yet."""
        return sorted(p for p, e in self.entries.items() if not e.checked and now - e.since >= self.stable)

    def mark(self, path: Path, verdict: str) -> None:
        entry = self.entries.get(Path(path))
        if entry is not None:
            entry.checked, entry.verdict = True, verdict

    def unchecked(self, under: Optional[Path] = None) -> list[Path]:
        """Files still changing, or not yet stable long enough (under a folder, or all)."""
        return sorted(p for p, e in self.entries.items() if not e.checked and (under is None or inside(p, under)))

    def changing(self) -> list[Path]:
        """Files to stat at every look: not yet stable, or stable but incomplete (a writer
        that pauses for longer than `stable`)."""
        return sorted(p for p, e in self.entries.items() if not e.checked or e.verdict == "incomplete")

    def stable_under(self, folder: Path) -> dict[str, tuple[int, float]]:
        """path -> (size, mtime) of every checked file under `folder`: what a batch may take."""
        return {str(p): (e.size, e.mtime) for p, e in self.entries.items() if e.checked and inside(p, folder)}

    def drop_outside(self, folders: Iterable[Path]) -> None:
        """Forget files under no folder in `folders` (after a reload removed a folder)."""
        folders = list(folders)
        for path in [p for p in self.entries if not any(inside(p, f) for f in folders)]:
            del self.entries[path]


# --------------------------------------------------------------------------- settle timers


@dataclass
class FolderState:
    """The settle timer of one capture folder (monotonic clock).

    `dirty`: a new flat became ready since the folder was last processed (or the folder
    must be looked at again: start-up, a retry, a scheduled sweep). The folder is due when
    it is dirty and no new flat became ready for `settle` seconds; `force` (a scheduled
    sweep) makes it due at once.
    """

    capture: CaptureFolder
    last_ready: Optional[float] = None
    dirty: bool = False
    force: bool = False
    not_before: float = 0.0  # after an unexpected error: do not try again before this

    @property
    def path(self) -> Path:
        return self.capture.path

    def flat_ready(self, now: float) -> None:
        self.last_ready = now
        self.dirty = True

    def settle_left(self, now: float, settle: float) -> float:
        if self.last_ready is None:
            return 0.0
        return max(0.0, self.last_ready + settle - now)

    def due(self, now: float, settle: float) -> bool:
        if not self.dirty or now < self.not_before:
            return False
        return self.force or self.settle_left(now, settle) <= 0.0

    def dispatched(self) -> None:
        self.dirty = False
        self.force = False


# --------------------------------------------------------------------------- observers


class EnqueueHandler(FileSystemEventHandler):
    """A watchdog event handler that only puts paths on a queue (never does real work).

    Items: ("path", key, path) for a file that appeared, changed, moved in or
    went away; ("dir", key, path) for a folder that appeared (moved in whole,
    its files send no events of their own); ("gone-dir", key, path) for a
    folder that went away. `key` names the capture folder (its path).
    """

    IGNORED_EVENTS = ("opened", "closed_no_write")  # our own header reads cause these

    def __init__(self, out: "queue.SimpleQueue", key):
        super().__init__()
        self.out = out
        self.key = key

    def dispatch(self, ev) -> None:
        kind = ev.event_type
        if kind in self.IGNORED_EVENTS:
            return
        src = os.fsdecode(ev.src_path)
        dest = os.fsdecode(ev.dest_path) if getattr(ev, "dest_path", None) else None
        if ev.is_directory:
            if kind in ("moved", "deleted"):
                self.out.put(("gone-dir", self.key, src))
            if kind == "created":
                self.out.put(("dir", self.key, src))
            if kind == "moved" and dest:
                self.out.put(("dir", self.key, dest))
            return
        self.out.put(("path", self.key, src))
        if dest:
            self.out.put(("path", self.key, dest))


WATCH_LIMIT_ERRNOS = (errno.ENOSPC, errno.EMFILE)


def watch_limit_message(exc: OSError, folder: Path) -> str:
    if exc.errno == errno.EMFILE:
        sysctl = "fs.inotify.max_user_instances"
    else:
        sysctl = "fs.inotify.max_user_watches"
    return (f"inotify limit reached while watching {folder} ({exc.strerror or exc}); "
            f"falling back to polling. Raise the limit with: sudo sysctl {sysctl}=<larger value> "
            f"(and set it in /etc/sysctl.d/ to keep it)")


def native_observer():
    from watchdog.observers import Observer

    return Observer()


def polling_observer(timeout: float = 1.0):
    from watchdog.observers.polling import PollingObserver

    return PollingObserver(timeout=timeout)


@dataclass
class Watch:
    """One observer over one capture folder."""

    capture: CaptureFolder
    observer: object
    polling: bool

    @property
    def mode(self) -> str:
        return "polling" if self.polling else "native"

    def alive(self) -> bool:
        """The observer and every emitter still run (a polling emitter stops when its
        folder goes away)."""
        if not getattr(self.observer, "is_alive", lambda: False)():
            return False
        emitters = getattr(self.observer, "emitters", None)
        return emitters is None or all(e.is_alive() for e in emitters)

    def stop(self, timeout: float = 2.0) -> None:
        try:
            self.observer.stop()
            self.observer.join(timeout)
        except Exception:  # noqa: BLE001 - an observer that failed to start has nothing to stop
            pass


def start_watch(capture: CaptureFolder, handler, polling: bool,
                make_native: Callable[[], object] = native_observer,
                make_polling: Callable[[], object] = polling_observer) -> Watch:
    """Schedule and start an observer for a capture folder.

    The native observer falls back to polling when the inotify limits are reached, with
    a log line naming the sysctl to raise. Other errors (a folder that does not exist)
    propagate.
    """
    path = str(capture.path)
    if not polling:
        observer = None
        try:
            observer = make_native()  # watchdog may open its inotify instance here already
            observer.schedule(handler, path, recursive=capture.recursive)
            observer.start()
            return Watch(capture, observer, False)
        except OSError as exc:
            if observer is not None:
                _stop_quietly(observer)
            if exc.errno not in WATCH_LIMIT_ERRNOS:
                raise
            notice("watch_limit", watch_limit_message(exc, capture.path), logging.WARNING, folder=capture.path,
                   errno=errno.errorcode.get(exc.errno, exc.errno))
    observer = make_polling()
    observer.schedule(handler, path, recursive=capture.recursive)
    observer.start()
    return Watch(capture, observer, True)


def _stop_quietly(observer) -> None:
    try:
        observer.unschedule_all()
    except Exception:  # noqa: BLE001
        pass
    try:
        if observer.is_alive():
            observer.stop()
    except Exception:  # noqa: BLE001
        pass


# --------------------------------------------------------------------------- the service's observers


class Observers:
    """One Watch per capture folder, fed into `out`; a folder not there (yet), or that
    cannot be watched, is noted in `missing` (one log line) and tried again later.
    `rescan()` gives the rescan interval, for the messages."""

    def __init__(self, out: "queue.SimpleQueue", rescan: Callable[[], float],
                 make_native: Callable[[], object] = native_observer,
                 make_polling: Callable[[], object] = polling_observer):
        self.out = out
        self.rescan = rescan
        self.make_native = make_native
        self.make_polling = make_polling
        self.watches: dict[Path, Watch] = {}
        self.missing: set[Path] = set()

    def keep(self, wanted: dict) -> None:
        """Watch exactly the capture folders in `wanted` (path -> CaptureFolder):
        observers whose settings changed are restarted, the others stopped."""
        for path, watch in list(self.watches.items()):
            capture = wanted.get(path)
            if capture is None or capture.recursive != watch.capture.recursive or capture.poll != watch.capture.poll:
                watch.stop()
                del self.watches[path]
        self.missing &= set(wanted)
        for path, capture in wanted.items():
            if path not in self.watches:
                self.start(capture)

    def ensure(self, capture: CaptureFolder) -> None:
        """At a rescan: a folder back after it was missing, or whose observer died, is watched anew."""
        path = capture.path
        if path in self.missing or path not in self.watches or not self.watches[path].alive():
            self._drop(path)
            self.start(capture)

    def gone(self, path: Path) -> None:
        """The folder went away (an unmounted share): watched again when it is back."""
        self._drop(path)
        self._missing(path, "folder_missing", f"capture folder {path} is not there; looking again every "
                      f"{self.rescan():g} s", logging.WARNING)

    def start(self, capture: CaptureFolder) -> None:
        path = capture.path
        if not path.is_dir():
            self._missing(path, "folder_missing", f"capture folder {path} does not exist (yet); looking again "
                          f"every {self.rescan():g} s", logging.WARNING)
            return
        polling = choose_polling(path, capture.poll)
        try:
            watch = start_watch(capture, EnqueueHandler(self.out, path), polling,
                                make_native=self.make_native, make_polling=self.make_polling)
        except OSError as exc:
            self._missing(path, "watch_failed", f"cannot watch {path}: {exc.strerror or exc}; relying on rescans "
                          f"every {self.rescan():g} s and trying again", logging.ERROR)
            return
        self.missing.discard(path)
        self.watches[path] = watch
        fstype = filesystem_type(path) or "?"
        why = "forced" if capture.poll in (True, False) else f"auto, {fstype}"
        if watch.polling and not polling:
            why = "the inotify limit was reached"
        notice("watching", f"watching {path} ({watch.mode} events, {why}; "
               f"{'recursive' if capture.recursive else 'top level only'})",
               folder=path, mode=watch.mode, fstype=fstype, recursive=capture.recursive)

    def signal_stop(self) -> None:
        """Ask every observer to stop (no waiting)."""
        for watch in list(self.watches.values()):
            try:
                watch.observer.stop()
            except Exception:  # noqa: BLE001
                pass

    def stop_all(self) -> None:
        self.signal_stop()
        watches = list(self.watches.values())
        self.watches.clear()
        for watch in watches:
            try:
                watch.observer.join(1.0)
            except Exception:  # noqa: BLE001
                pass

    def _drop(self, path: Path) -> None:
        old = self.watches.pop(path, None)
        if old is not None:
            old.stop()

    def _missing(self, path: Path, kind: str, text: str, level: int) -> None:
        if path not in self.missing:
            notice(kind, text, level, folder=path)
        self.missing.add(path)
