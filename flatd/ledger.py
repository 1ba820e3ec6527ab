"""The SQLite state: frames seen, jobs and their states, inputs moved, masters made.

Every state change is its own committed transaction, so that after a crash the next
start knows exactly how far each job got. One process at a time holds the ledger (a
lock file with flock, released by the kernel when the process dies); `flatd status`
reads it without the lock.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Iterable, Optional, Sequence

from flatd.errors import FlatdError

DB_NAME = "flatd.sqlite"
LOCK_NAME = "flatd.lock"

class JobState(str, Enum):
    """A job's state, stored in the ledger as its value."""

    PLANNED = "planned"  # recorded with its inputs; nothing written yet
    WRITING = "writing"  # stacked; the master is being written
    WRITTEN = "written"  # the master is on disk under its final name; inputs not moved yet
    # The master is made and recorded, but some inputs could not be moved yet: every
    # later run tries those moves again; the inputs are never combined again.
    MOVES_PENDING = "moves-pending"
    DONE = "done"
    FAILED = "failed"  # kept until `flatd retry`

    def __str__(self) -> str:
        return self.value


class FrameVerdict(str, Enum):
    """What the watcher made of a stable file; `bad` and `other` are stored (table seen)."""

    FLAT = "flat"
    OTHER = "other"  # a light, a dark...: not a flat under the rules
    INCOMPLETE = "incomplete"  # shorter than its header says: still being written
    BAD = "bad"  # not a usable FITS image
    OWN = "own"  # a master or a moved input
    CONSUMED = "consumed"  # already combined (inputs left in place)

    def __str__(self) -> str:
        return self.value


PLANNED, WRITING, WRITTEN = JobState.PLANNED, JobState.WRITING, JobState.WRITTEN
DONE, FAILED, MOVES_PENDING = JobState.DONE, JobState.FAILED, JobState.MOVES_PENDING
UNFINISHED = (PLANNED, WRITING, WRITTEN)
# States in which a job's inputs are in a master: never combined again.
COMBINED = (WRITTEN, MOVES_PENDING, DONE)

SCHEMA = """
CREATE TABLE IF NOT EXISTS frames (
    path TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    mtime REAL NOT NULL,
    folder TEXT,
    kind TEXT,
    seen_at REAL NOT NULL,
    ready_at REAL
);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    label TEXT NOT NULL,
    rule TEXT,
    folder TEXT,
    output_dir TEXT NOT NULL,
    output_name TEXT NOT NULL,
    master TEXT,
    reason TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS job_inputs (
    job_id TEXT NOT NULL REFERENCES jobs(id),
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime REAL NOT NULL,
    calibration TEXT,
    move_dir TEXT,
    moved_to TEXT,
    device INTEGER,
    inode INTEGER,
    note TEXT,
    qc TEXT,
    PRIMARY KEY (job_id, path)
);
CREATE INDEX IF NOT EXISTS job_inputs_path ON job_inputs(path);
CREATE INDEX IF NOT EXISTS job_inputs_moved ON job_inputs(moved_to);
CREATE TABLE IF NOT EXISTS seen (
    path TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    mtime REAL NOT NULL,
    verdict TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT
);
CREATE TABLE IF NOT EXISTS masters (
    path TEXT PRIMARY KEY,
    job_id TEXT NOT NULL,
    label TEXT NOT NULL,
    ncombine INTEGER NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS folders (
    path TEXT PRIMARY KEY,
    last_ready REAL,
    processed_at REAL,
    notes TEXT
);
"""


# masters: the verdict of the master checks, its reasons, the previous master compared with
MASTER_QC_COLUMNS = ("qc_status", "qc_reasons", "qc_previous")


class LedgerLocked(FlatdError):
    """Another flatd process holds the ledger."""


@dataclass(frozen=True)
class JobRow:
    id: str
    state: str
    label: str
    rule: Optional[str]
    folder: Optional[str]
    output_dir: str
    output_name: str
    master: Optional[str]
    reason: Optional[str]
    attempts: int
    created_at: float
    updated_at: float

    def __post_init__(self):
        try:
            object.__setattr__(self, "state", JobState(self.state))
        except ValueError:
            pass  # a state of a newer flatd: kept as its text


@dataclass(frozen=True)
class InputRow:
    job_id: str
    path: str
    size: int
    mtime: float
    calibration: Optional[str]
    move_dir: Optional[str]
    moved_to: Optional[str]
    device: Optional[int] = None
    inode: Optional[int] = None
    note: Optional[str] = None  # why a move is no longer tried (the file changed, or is gone)
    qc: Optional[str] = None  # left out by the flat checks (the reason): never moved, never combined

    @property
    def move_pending(self) -> bool:
        return bool(self.move_dir) and not self.moved_to and not self.note and not self.qc


class OutputBusy(FlatdError):
    """Another flatd process holds an output folder's lock."""


def _try_flock(path: Path) -> Optional[int]:
    """An open descriptor holding an exclusive flock on `path`, or None when another
    process holds it. The kernel releases it when the process dies."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _holder(path: Path) -> str:
    """'pid N' of the process that wrote the lock file, with its note when there is one."""
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        lines = []
    pid = lines[0] if lines and lines[0].isdigit() else "?"
    return f"pid {pid}" + (f", {lines[1]}" if len(lines) > 1 and lines[1] else "")


class _FileLock:
    """An exclusive flock on a file, with our pid (and state folder) written in it."""

    def __init__(self, path: Path, note: str = ""):
        self.path = Path(path)
        self.note = note
        self._fd: Optional[int] = None

    def _take(self) -> bool:
        fd = _try_flock(self.path)
        if fd is None:
            return False
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n{self.note}\n".encode(), 0)
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class StateLock(_FileLock):
    """An exclusive flock on <state>/flatd.lock, held for the life of the process."""

    def __init__(self, state_dir: Path):
        super().__init__(Path(state_dir) / LOCK_NAME)

    def acquire(self) -> "StateLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self._take():
            raise LedgerLocked(
                f"another flatd ({_holder(self.path)}) is using the state folder {self.path.parent}"
            ) from None
        return self

    def __enter__(self) -> "StateLock":
        return self.acquire()


class OutputLock(_FileLock):
    """An exclusive flock on <output folder>/.flatd.lock while a job writes there: two
    flatd processes with different state folders never make the same master twice."""

    NAME = ".flatd.lock"

    def __init__(self, directory: Path, note: str = ""):
        super().__init__(Path(directory) / self.NAME, note)

    def acquire(self, wait: float = 0.0) -> "OutputLock":
        """Take the lock, waiting up to `wait` seconds; OutputBusy names the holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + wait
        while not self._take():
            if time.monotonic() >= deadline:
                raise OutputBusy(f"the output folder {self.path.parent} is in use by another flatd "
                                 f"({_holder(self.path)}); skipped, tried again at the next run")
            time.sleep(0.1)
        return self


def _now() -> float:
    return time.time()


class Ledger:
    """Access to the state database. Use `Ledger.open()` as the single writer."""

    def __init__(self, path: Path, readonly: bool = False):
        self.path = Path(path)
        if readonly:
            self.db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=5, check_same_thread=False)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.executescript(SCHEMA)
            self._add_missing_columns()
        self.db.row_factory = sqlite3.Row

    def _add_missing_columns(self) -> None:
        """A ledger made by an older flatd gains the columns added since."""
        have = {row[1] for row in self.db.execute("PRAGMA table_info(job_inputs)")}
        for column, kind in (("device", "INTEGER"), ("inode", "INTEGER"), ("note", "TEXT"), ("qc", "TEXT")):
            if column not in have:
                self.db.execute(f"ALTER TABLE job_inputs ADD COLUMN {column} {kind}")
        have = {row[1] for row in self.db.execute("PRAGMA table_info(masters)")}
        for column in MASTER_QC_COLUMNS:  # the master checks' verdict (flatd.qc.masters)
            if column not in have:
                self.db.execute(f"ALTER TABLE masters ADD COLUMN {column} TEXT")

    @classmethod
    def open(cls, state_dir: Path) -> "Ledger":
        return cls(Path(state_dir) / DB_NAME)

    @classmethod
    def open_readonly(cls, state_dir: Path) -> Optional["Ledger"]:
        path = Path(state_dir) / DB_NAME
        return cls(path, readonly=True) if path.exists() else None

    def close(self) -> None:
        self.db.close()

    def _write_many(self, statements: Iterable[tuple[str, Sequence]]) -> None:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            for sql, args in statements:
                self.db.execute(sql, args)
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    # ------------------------------------------------------------------ frames

    def frame_ready(self, path: Path, size: int, mtime: float, folder: Path, kind: str) -> None:
        self._write_many([(
            "INSERT INTO frames(path, size, mtime, folder, kind, seen_at, ready_at) VALUES (?,?,?,?,?,?,?) "
            "ON CONFLICT(path) DO UPDATE SET size=excluded.size, mtime=excluded.mtime, folder=excluded.folder, "
            "kind=excluded.kind, ready_at=excluded.ready_at",
            (str(path), size, mtime, str(folder), kind, _now(), _now()),
        )])

    def forget_frame(self, path: Path) -> None:
        self._write_many([("DELETE FROM frames WHERE path=?", (str(path),))])

    def waiting_frames(self) -> list[sqlite3.Row]:
        return list(self.db.execute("SELECT * FROM frames ORDER BY folder, path"))

    def frame(self, path: Path) -> Optional[sqlite3.Row]:
        return self.db.execute("SELECT * FROM frames WHERE path=?", (str(path),)).fetchone()

    # ------------------------------------------------------------------ capture folders (the service's settle timers)

    def folder_ready(self, folder: Path, at: float) -> None:
        """A new flat became ready under a capture folder at `at` (wall clock)."""
        self._write_many([(
            "INSERT INTO folders(path, last_ready) VALUES (?,?) ON CONFLICT(path) DO UPDATE SET last_ready=excluded.last_ready",
            (str(folder), at),
        )])

    def folder_processed(self, folder: Path, at: float, notes: Optional[str]) -> None:
        """A capture folder's settled batch was processed; `notes`: what was left and why (JSON)."""
        self._write_many([(
            "INSERT INTO folders(path, processed_at, notes) VALUES (?,?,?) "
            "ON CONFLICT(path) DO UPDATE SET processed_at=excluded.processed_at, notes=excluded.notes",
            (str(folder), at, notes),
        )])

    def folders(self) -> list[sqlite3.Row]:
        try:
            return list(self.db.execute("SELECT * FROM folders ORDER BY path"))
        except sqlite3.OperationalError:  # a read-only look at a ledger older than this table
            return []

    # ------------------------------------------------------------------ verdicts

    def seen_verdict(self, path: Path, size: int, mtime: float) -> Optional[str]:
        """What the watcher decided about this exact file (a light, a bad file...) before."""
        row = self.db.execute("SELECT verdict FROM seen WHERE path=? AND size=? AND mtime=?",
                              (str(path), size, mtime)).fetchone()
        return None if row is None else row["verdict"]

    def remember_verdicts(self, rows: Sequence[tuple[Path, int, float, str]]) -> None:
        """Many verdicts in one transaction (thousands of lights after a start)."""
        self._write_many([("INSERT OR REPLACE INTO seen(path, size, mtime, verdict) VALUES (?,?,?,?)",
                           (str(p), size, mtime, verdict)) for p, size, mtime, verdict in rows])

    def keep_verdicts_for(self, rules_fingerprint: str) -> None:
        """Verdicts hold for the rules that made them: other rules (ignore_type,
        keywords, a rule's match) may judge the same files otherwise."""
        row = self.db.execute("SELECT value FROM meta WHERE key='verdict_rules'").fetchone()
        if row is None or row["value"] != rules_fingerprint:
            self._write_many([
                ("DELETE FROM seen", ()),
                ("INSERT OR REPLACE INTO meta(key, value) VALUES ('verdict_rules', ?)", (rules_fingerprint,)),
            ])

    # ------------------------------------------------------------------ jobs

    def consumed(self, path: Path, size: int, mtime: float) -> Optional[str]:
        """The job that already combined this exact file (path, size, mtime), if any. The
        flats the flat checks left out of a master count too: never planned again until
        they change (those of a group that failed wait with it, as its other flats do)."""
        row = self.db.execute(
            "SELECT j.id, j.master FROM job_inputs i JOIN jobs j ON j.id=i.job_id "
            f"WHERE i.path=? AND i.size=? AND abs(i.mtime-?)<1e-3 AND j.state IN ({','.join('?' * len(COMBINED))})",
            (str(path), size, mtime, *COMBINED),
        ).fetchone()
        return None if row is None else (row["master"] or row["id"])

    def left_out_inputs(self, job_id: Optional[str] = None, limit: int = 50) -> list[sqlite3.Row]:
        """Inputs the flat checks left out (of one job, or the latest of all), with the job's
        label and state, newest first."""
        try:
            return list(self.db.execute(
                "SELECT i.path, i.qc, j.id AS job_id, j.label, j.state, j.updated_at FROM job_inputs i "
                "JOIN jobs j ON j.id=i.job_id WHERE i.qc IS NOT NULL" + (" AND j.id=?" if job_id else "")
                + " ORDER BY j.updated_at DESC, i.path LIMIT ?", ((job_id,) if job_id else ()) + (int(limit),)))
        except sqlite3.OperationalError:  # a read-only look at a ledger from before the column
            return []

    def is_moved_input(self, path: Path) -> bool:
        """True for a file that flatd itself moved away after combining it."""
        return self.db.execute("SELECT 1 FROM job_inputs WHERE moved_to=? LIMIT 1", (str(path),)).fetchone() is not None

    def is_master(self, path: Path) -> bool:
        return self.db.execute("SELECT 1 FROM masters WHERE path=?", (str(path),)).fetchone() is not None

    def job(self, job_id: str) -> Optional[JobRow]:
        row = self.db.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        return None if row is None else JobRow(**dict(row))

    def jobs(self, states: Sequence[str] = (), limit: Optional[int] = None) -> list[JobRow]:
        sql = "SELECT * FROM jobs"
        args: list = []
        if states:
            sql += f" WHERE state IN ({','.join('?' * len(states))})"
            args.extend(states)
        sql += " ORDER BY updated_at DESC"
        if limit:
            sql += f" LIMIT {int(limit)}"
        return [JobRow(**dict(r)) for r in self.db.execute(sql, args)]

    def jobs_like(self, prefix: str) -> list[JobRow]:
        """The jobs whose id starts with `prefix` (taken literally: `%` and `_` are no wildcards)."""
        return [JobRow(**dict(r)) for r in self.db.execute("SELECT * FROM jobs WHERE substr(id, 1, ?) = ?",
                                                           (len(prefix), prefix.lower()))]

    def inputs(self, job_id: str) -> list[InputRow]:
        return [InputRow(**dict(r)) for r in self.db.execute("SELECT * FROM job_inputs WHERE job_id=? ORDER BY path", (job_id,))]

    def plan_job(self, job_id: str, label: str, rule: Optional[str], folder: Optional[Path], output_dir: Path,
                 output_name: str, inputs: Sequence[tuple[Path, int, float, str, Optional[Path], int, int]]) -> None:
        """Record a job and its inputs in state planned (again, if it was tried before)."""
        now = _now()
        statements = [
            ("INSERT INTO jobs(id, state, label, rule, folder, output_dir, output_name, created_at, updated_at, attempts) "
             "VALUES (?,?,?,?,?,?,?,?,?,1) ON CONFLICT(id) DO UPDATE SET state=excluded.state, reason=NULL, "
             "output_dir=excluded.output_dir, output_name=excluded.output_name, updated_at=excluded.updated_at, "
             "attempts=jobs.attempts+1",
             (job_id, PLANNED, label, rule, str(folder) if folder else None, str(output_dir), output_name, now, now)),
            ("DELETE FROM job_inputs WHERE job_id=?", (job_id,)),
        ]
        # inputs the flat checks left out before (a master written, then a crash) stay left out
        known = {r["path"]: r["qc"] for r in self.db.execute(
            "SELECT path, qc FROM job_inputs WHERE job_id=? AND qc IS NOT NULL", (job_id,))}
        for path, size, mtime, calibration, move_dir, device, inode in inputs:
            statements.append((
                "INSERT INTO job_inputs(job_id, path, size, mtime, calibration, move_dir, device, inode, qc) "
                "VALUES (?,?,?,?,?,?,?,?,?)",
                (job_id, str(path), size, mtime, calibration, str(move_dir) if move_dir else None, device, inode,
                 known.get(str(path))),
            ))
        self._write_many(statements)

    def set_state(self, job_id: str, state: str, reason: Optional[str] = None) -> None:
        self._write_many([("UPDATE jobs SET state=?, reason=?, updated_at=? WHERE id=?", (state, reason, _now(), job_id))])

    def inputs_left_out(self, job_id: str, left: Sequence[tuple[Path, str]], state: Optional[str] = None,
                        reason: Optional[str] = None) -> None:
        """The flat checks left these inputs (path, why) out of the job: recorded in one
        transaction with the job's next `state` (writing: before its master is written, so
        that no crash ever moves them with the others)."""
        statements = [("UPDATE job_inputs SET qc=? WHERE job_id=? AND path=?", (why, job_id, str(path)))
                      for path, why in left]
        if state is not None:
            statements.append(("UPDATE jobs SET state=?, reason=?, updated_at=? WHERE id=?",
                               (state, reason, _now(), job_id)))
        self._write_many(statements)

    def left_out_paths(self, job_id: str) -> set[str]:
        """The paths of a job's inputs that the flat checks left out."""
        return {r["path"] for r in self.db.execute(
            "SELECT path FROM job_inputs WHERE job_id=? AND qc IS NOT NULL", (job_id,))}

    def master_written(self, job_id: str, master: Path, label: str, ncombine: int) -> None:
        now = _now()
        self._write_many([
            ("UPDATE jobs SET state=?, master=?, updated_at=? WHERE id=?", (WRITTEN, str(master), now, job_id)),
            # flats left out by the checks leave the waiting list with the master (they stay in place)
            ("DELETE FROM frames WHERE path IN (SELECT path FROM job_inputs WHERE job_id=? AND qc IS NOT NULL)",
             (job_id,)),
            ("INSERT OR REPLACE INTO masters(path, job_id, label, ncombine, created_at) VALUES (?,?,?,?,?)",
             (str(master), job_id, label, ncombine, now)),
        ])

    def input_moved(self, job_id: str, path: Path, dest: Path) -> None:
        self._write_many([
            ("UPDATE job_inputs SET moved_to=? WHERE job_id=? AND path=?", (str(dest), job_id, str(path))),
            ("DELETE FROM frames WHERE path=?", (str(path),)),
        ])

    def input_not_moved(self, job_id: str, path: Path, note: str) -> None:
        """An input that will not be moved after all (it changed since it was read, or is gone)."""
        self._write_many([("UPDATE job_inputs SET note=? WHERE job_id=? AND path=?", (note, job_id, str(path)))])

    def pending_moves(self) -> list[InputRow]:
        """Inputs of combined jobs still waiting to be moved away."""
        rows = self.db.execute(
            "SELECT i.* FROM job_inputs i JOIN jobs j ON j.id=i.job_id WHERE j.state=? "
            "AND i.move_dir IS NOT NULL AND i.moved_to IS NULL AND i.note IS NULL AND i.qc IS NULL "
            "ORDER BY i.job_id, i.path",
            (MOVES_PENDING,))
        return [InputRow(**dict(r)) for r in rows]

    def inputs_consumed(self, job_id: str) -> None:
        """Inputs left in place: they leave the waiting list but stay recorded as consumed."""
        self._write_many([
            ("DELETE FROM frames WHERE path IN (SELECT path FROM job_inputs WHERE job_id=?)", (job_id,)),
        ])

    def forget_job(self, job_id: str) -> None:
        """Drop an interrupted job that never wrote its master: it will be planned anew."""
        self._write_many([("DELETE FROM job_inputs WHERE job_id=?", (job_id,)), ("DELETE FROM jobs WHERE id=?", (job_id,))])

    def retry(self, job_id: Optional[str] = None) -> int:
        """Put failed jobs (one, or all) back to be planned again. Returns how many."""
        if job_id == "":
            return 0  # no job: never "all of them"
        if job_id is not None:  # a prefix, literally (`%` and `_` are no wildcards)
            rows = self.db.execute("SELECT id FROM jobs WHERE state=? AND substr(id, 1, ?) = ?",
                                   (FAILED, len(job_id), job_id.lower())).fetchall()
        else:
            rows = self.db.execute("SELECT id FROM jobs WHERE state=?", (FAILED,)).fetchall()
        ids = [r["id"] for r in rows]
        self._write_many([("DELETE FROM job_inputs WHERE job_id=?", (i,)) for i in ids]
                         + [("DELETE FROM jobs WHERE id=?", (i,)) for i in ids])
        return len(ids)

    def master_checked(self, master: Path, status: str, reasons: Sequence[str],
                       previous: Optional[Path] = None) -> None:
        """Record a master's verdict (good, warn, bad), its reasons and the previous master."""
        self._write_many([("UPDATE masters SET qc_status=?, qc_reasons=?, qc_previous=? WHERE path=?",
                           (status, "; ".join(reasons) or None, str(previous) if previous else None,
                            str(master)))])

    def done_masters(self, exclude: Optional[str] = None, limit: int = 500) -> list[str]:
        """Paths of the masters of done jobs (all inputs moved, or owed), newest first, at
        most `limit`; `exclude`: a job id left out."""
        rows = self.db.execute(
            "SELECT m.path FROM masters m JOIN jobs j ON j.id=m.job_id WHERE j.state IN (?, ?) AND m.job_id != ? "
            "ORDER BY m.created_at DESC LIMIT ?", (DONE, MOVES_PENDING, exclude or "", int(limit)))
        return [r["path"] if isinstance(r, sqlite3.Row) else r[0] for r in rows]

    def recent_masters(self, limit: int = 10) -> list[sqlite3.Row]:
        return list(self.db.execute("SELECT * FROM masters ORDER BY created_at DESC LIMIT ?", (limit,)))
