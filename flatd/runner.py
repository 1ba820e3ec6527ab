"""Executing jobs: journal in the ledger, stack, write the master, move the inputs, recover.

This is the only module that moves input files. Each step is recorded in the ledger
before the next one starts, so that `recover()` can finish or roll back a job that a
crash interrupted: no duplicate master, no input lost or moved twice.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from flatd import ledger as L
from flatd.calibration import LibraryCache
from flatd.config import CaptureFolder, Rules
from flatd.ingest.discover import scan_capture, still_candidates
from flatd.stack.engines import Engine, make_engine
from flatd.errors import FlatdError
from flatd.ingest.frames import FrameError, read_header_cards
from flatd.fsops import FileChanged, FileIdentity, file_digest, move_file, resolve_move_dir
from flatd.notify import events as E
from flatd.notify.events import emit
from flatd.plan import Job, Plan, plan_frames

JOB_CARD = "FLATDJOB"  # the job id, in every master's header: finds a master after a crash
# How long a run waits for another flatd's lock on an output folder before it skips it.
OUTPUT_LOCK_WAIT = 10.0

# Outcome states that leave something undone: the run exits 1.
NOT_DONE = ("failed", "failed-before", "busy", "moves-pending")


@dataclass
class Outcome:
    """What happened to one job (or what would, in a dry run)."""

    job: Job
    state: str  # done | failed | failed-before | busy | moves-pending | skipped | would-run
    master: Optional[Path] = None
    moved: list[tuple[Path, Path]] = field(default_factory=list)  # (input, where it went / would go)
    reason: Optional[str] = None
    # A failure of the place, not of the flats (no space, an output folder not writable):
    # nothing is recorded against the job, the next run tries it again by itself.
    transient: bool = False
    rejection: Optional["Rejection"] = None  # what the master's combine rejected (a master made now)
    qc: Optional[Any] = None  # the master checks' figures and verdict (flatd.qc.masters.MasterQC; made now)
    # the flat checks' findings (flatd.qc.flats.Finding): leave-out and warn; a dry run's from its screening
    findings: list = field(default_factory=list)
    checks_note: Optional[str] = None  # why a dry run did not screen the flats

    @property
    def failed(self) -> bool:
        return self.state in NOT_DONE


@dataclass
class RunReport:
    plan: Plan = field(default_factory=Plan)
    outcomes: list[Outcome] = field(default_factory=list)
    recovered: list[str] = field(default_factory=list)
    recovered_notes: list[str] = field(default_factory=list)  # what became of each, for the report
    problems: list[str] = field(default_factory=list)  # e.g. a capture folder that is not there
    pending_moves: list[str] = field(default_factory=list)  # inputs of earlier jobs still not moved

    @property
    def exit_code(self) -> int:
        """0 when every group succeeded, 1 if any failed (too-small groups are not failures)."""
        failed = self.problems or self.pending_moves or self.plan.failed or any(o.failed for o in self.outcomes)
        return 1 if failed else 0

    def marked(self, status: str) -> int:
        """Masters written in this run that the checks marked `status` (warn, bad)."""
        return sum(1 for o in self.outcomes if o.qc is not None and o.qc.status == status)

    def extend(self, other: "RunReport") -> None:
        self.plan.extend(other.plan)
        self.outcomes.extend(other.outcomes)
        self.recovered.extend(other.recovered)
        self.recovered_notes.extend(other.recovered_notes)
        self.problems.extend(other.problems)
        self.pending_moves.extend(other.pending_moves)


@dataclass(frozen=True)
class Rejection:
    """What a master's combine rejected: the fractions of all values rejected low and
    high, per input (path, low, high), the rules' warning threshold (None: never), and
    the baseline: the fractions the same method rejects low and high from clean Gaussian
    columns of the same number of frames (flatd.stack.baseline; one input's expected
    share is the same fraction). The warning is about rejection above the baseline."""

    low: float
    high: float
    frames: tuple[tuple[Path, float, float], ...]
    threshold: Optional[float] = None
    baseline_low: float = 0.0
    baseline_high: float = 0.0

    @property
    def total(self) -> float:
        return self.low + self.high

    @property
    def baseline(self) -> float:
        """The fraction of clean data's values the method rejects at this N (low + high)."""
        return self.baseline_low + self.baseline_high

    @property
    def limit(self) -> Optional[float]:
        """Above this fraction rejected (the master's, or one input's), a warning: the
        baseline plus the threshold (None: never)."""
        return None if self.threshold is None else self.baseline + self.threshold

    @property
    def warn(self) -> bool:
        """More rejected overall than clean data's baseline plus the threshold."""
        return self.limit is not None and self.total > self.limit

    def frames_above(self) -> list[tuple[Path, float, float]]:
        """The inputs that lost more of their values than the baseline plus the
        threshold, most first."""
        limit = self.limit
        if limit is None:
            return []
        above = [f for f in self.frames if f[1] + f[2] > limit]
        return sorted(above, key=lambda f: -(f[1] + f[2]))

    @classmethod
    def of(cls, job: Job, result) -> Optional["Rejection"]:
        overall = result.rejected_fractions()
        per_frame = result.frame_fractions()
        if overall is None or per_frame is None:
            return None
        base_low = base_high = 0.0
        if job.rejection_warn is not None:
            base_low, base_high = _clean_baseline(job)
        return cls(overall[0], overall[1],
                   tuple((i.frame.path, lo, hi) for i, (lo, hi) in zip(job.inputs, per_frame)),
                   job.rejection_warn, base_low, base_high)


def _clean_baseline(job: Job) -> tuple[float, float]:
    """(low, high): what the job's method rejects from clean data of its number of
    frames. numpy and the kernels: imported here, where a master is made (not by a dry run).
    A baseline that cannot be measured (a bug) is logged and taken as 0, as before it."""
    from flatd.stack.baseline import baseline

    try:
        b = baseline(job.method, len(job.inputs))
    except Exception as exc:  # noqa: BLE001 - the master is made; only the warning's reference is missing
        E.notice("rejection_baseline", f"no clean-data rejection baseline for {job.method.label} at "
                 f"{len(job.inputs)} frames ({type(exc).__name__}: {exc}): combine.rejection_warn compared with 0",
                 logging.WARNING, job=job.id)
        return 0.0, 0.0
    return b.low, b.high


class JobFailed(FlatdError):
    """A job that cannot be made; `transient` when the place is at fault, not the flats."""

    def __init__(self, reason: str, transient: bool = False):
        super().__init__(reason)
        self.transient = transient


def _emit_rejection_warning(job: Job, master: Path, rejection: Optional[Rejection]) -> None:
    """A warning when more of all values was rejected than the method rejects from clean
    data at this number of frames (the baseline) plus combine.rejection_warn; a note when
    only some inputs lost more than that of theirs (often a bad frame)."""
    if rejection is None or rejection.threshold is None:
        return
    above = rejection.frames_above()
    if rejection.warn or above:
        worst = above[0] if above else None
        emit(E.RejectionHigh(job.id, master, rejection.low, rejection.high, rejection.threshold,
                             overall=rejection.warn, frames=len(above),
                             worst=worst[0] if worst else None,
                             worst_fraction=(worst[1] + worst[2]) if worst else None,
                             baseline=rejection.baseline))


def move_date(now: datetime) -> dict[str, str]:
    return {"date": now.strftime("%Y%m%d-%H%M%S"), "time": now.strftime("%H%M%S"), "day": now.strftime("%Y%m%d")}


def input_identity(frame) -> FileIdentity:
    return FileIdentity(frame.device, frame.inode, frame.file_size, frame.mtime)


def row_identity(row: L.InputRow) -> FileIdentity:
    return FileIdentity(row.device or 0, row.inode or 0, row.size, row.mtime)


class Runner:
    """Runs planned jobs; with a ledger, journals every step and can recover."""

    def __init__(self, ledger: Optional[L.Ledger] = None, engine: Optional[Engine] = None,
                 should_stop: Callable[[], bool] = lambda: False, lock_wait: float = OUTPUT_LOCK_WAIT):
        """`engine` stacks each job (flatd.stack.engines.make_engine); default: the local engine
        with the default engine settings."""
        self.ledger = ledger
        self._engine = engine
        self.should_stop = should_stop
        self.lock_wait = lock_wait
        self._flat_findings: dict[str, list] = {}  # per job id, the flat checks' findings (flatd.qc.flats)

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = make_engine()
        return self._engine

    # ------------------------------------------------------------------ run

    def run(self, plan: Plan, dry_run: bool = False, now: Optional[datetime] = None) -> RunReport:
        report = RunReport(plan=plan)
        now = now or datetime.now()
        for failed in plan.failed:
            emit(E.JobFailed(failed.label, failed.reason, files=len(failed.frames), rule=failed.rule,
                             inputs=tuple(f.path for f in failed.frames)))
        if not dry_run:
            self._prepare(plan.jobs)
        for job in plan.jobs:
            if self.should_stop():
                break
            outcome = self._dry_outcome(job, now) if dry_run else self.run_job(job, now)
            self._note_flat_checks(report, outcome, dry_run)
            report.outcomes.append(outcome)
        return report

    def _prepare(self, jobs) -> None:
        """Hand an engine that can run jobs side by side (the Dask engine) the batch's jobs
        that will be stacked: not done, not failed before."""
        prepare = getattr(self._engine, "prepare", None)
        if prepare is None:
            return
        known = (lambda j: self.ledger.job(j.id)) if self.ledger is not None else (lambda j: None)
        todo = [j for j in jobs if (row := known(j)) is None or row.state not in (L.DONE, L.MOVES_PENDING, L.FAILED)]
        if todo:
            prepare(todo)

    def _dry_outcome(self, job: Job, now: datetime) -> Outcome:
        known = self.ledger.job(job.id) if self.ledger is not None else None
        if known is not None and known.state == L.FAILED:
            return self._failed_before(job, known)
        planned = [(i.frame.path, d) for i, d in zip(job.inputs, self._move_dirs(job, now)) if d]
        existing = find_master(job.output_dir, job.id) if self.ledger is not None else None
        if existing is not None:
            return Outcome(job, "would-run", master=existing, moved=planned,
                           reason=f"a master of these inputs is already there: {existing}; it would be recorded")
        return Outcome(job, "would-run", master=job.output_dir / job.output_name, moved=planned)

    @staticmethod
    def _failed_before(job: Job, known: L.JobRow) -> Outcome:
        return Outcome(job, "failed-before",
                       reason=f"failed before: {known.reason}; not tried again until `flatd retry {job.id}`")

    def run_job(self, job: Job, now: datetime) -> Outcome:
        """Stack, write and move for one job, journaling each step, under the output
        folder's lock."""
        if self.ledger is not None:
            known = self.ledger.job(job.id)
            if known is not None and known.state == L.FAILED:
                outcome = self._failed_before(job, known)
                # still not done: said at every run, not only counted (a log is all cron keeps)
                emit(E.JobFailed(job.label, outcome.reason, job=job.id, files=len(job.inputs), again=True,
                                 rule=job.rule, inputs=job_facts(job)["inputs"]))
                return outcome
            if known is not None and known.state in (L.DONE, L.MOVES_PENDING):
                return Outcome(job, "skipped", master=Path(known.master) if known.master else None,
                               reason="already done")
        if self.ledger is None:
            # flatd combine: the original's command line makes a new master every time
            # (never overwriting); the locks and the FLATDJOB look-up serve the ledger.
            return self._make_and_move(job, now)
        try:
            lock = L.OutputLock(job.output_dir, f"state folder {self.ledger.path.parent}").acquire(self.lock_wait)
        except L.OutputBusy as exc:
            E.notice("output_busy", str(exc), logging.WARNING, job=job.id, folder=job.output_dir)
            return Outcome(job, "busy", reason=str(exc))
        except OSError as exc:
            return self._fail(job, JobFailed(f"cannot use the output folder {job.output_dir}: {exc.strerror or exc}",
                                             transient=True))
        with lock:
            return self._make_and_move(job, now)

    def _make_and_move(self, job: Job, now: datetime) -> Outcome:
        move_dirs = self._move_dirs(job, now)
        if self.ledger is not None:
            self.ledger.plan_job(
                job.id, job.label, job.rule, job.frames[0].path.parent, job.output_dir, job.output_name,
                [(i.frame.path, i.frame.file_size, i.frame.mtime, i.calibration.label, d, i.frame.device,
                  i.frame.inode) for i, d in zip(job.inputs, move_dirs)],
            )
        started = time.monotonic()
        master = find_master(job.output_dir, job.id) if self.ledger is not None else None
        rejection = qc = None
        if master is not None:
            job, move_dirs = self._drop_left_out(job, move_dirs)
            emit(E.MasterWritten(job.id, master, len(job.inputs), found=True, preview=preview_of(job, master),
                                 **job_facts(job)))
        else:
            emit(E.GroupPlanned(job.id, job.label, len(job.inputs), job.method.description, job.rule or "-"))
            try:
                master, rejection, qc = self._make_master(job)
            except JobFailed as exc:
                return self._fail(job, exc)
            job, move_dirs = self._drop_left_out(job, move_dirs)
            emit(E.MasterWritten(job.id, master, len(job.inputs), round(time.monotonic() - started, 2),
                                 rejected_low=rejection.low if rejection else None,
                                 rejected_high=rejection.high if rejection else None,
                                 preview=preview_of(job, master), **job_facts(job)))
            _emit_rejection_warning(job, master, rejection)
            _emit_checked(job, master, qc)
        if self.ledger is not None:
            self.ledger.master_written(job.id, master, job.label, len(job.inputs))
            if qc is not None:
                self.ledger.master_checked(master, qc.status, qc.reasons, _previous_path(qc))
        if keeps_inputs(job, qc):  # quality.bad_keeps_inputs: a bad master's inputs stay where they are
            move_dirs = self._keep_inputs(job)
        moves = [(i.frame.path, d, input_identity(i.frame)) for i, d in zip(job.inputs, move_dirs)]
        moved, problems, owed = self._move_inputs(job.id, moves)
        if owed:
            self._state(job, L.MOVES_PENDING, "; ".join(problems))
            return Outcome(job, "moves-pending", master, moved,
                           f"{len(owed)} input(s) not moved yet, tried again at every run: " + "; ".join(problems),
                           rejection=rejection, qc=qc)
        self._state(job, L.DONE, "; ".join(problems) or None)
        if problems:
            return Outcome(job, "failed", master, moved, "; ".join(problems), rejection=rejection, qc=qc)
        return Outcome(job, "done", master, moved, rejection=rejection, qc=qc)

    def _make_master(self, job: Job) -> tuple[Path, Optional[Rejection], Optional[Any]]:
        """Stack, check and write; JobFailed says why not (transient when the output is at
        fault). Returns the master's path, what its combine rejected and its checks (a bad
        master is written under its own name: master_name_for)."""
        from flatd.output.masters import NoSpace, master_header, write_master  # astropy: only when a master is made
        from flatd.stack.cfa import equalize_master

        ahead = self._read_ahead(job)
        try:
            result = self._stack(job)
            job = self._without_left_out(job, result)  # the flat checks' leave-outs are not in the master
            rejection = Rejection.of(job, result)
            geometry = getattr(result, "geometry", None)
            origin = geometry.origin if geometry is not None else (0, 0)
            cfa_notes = equalize_master(job.frames, result.image, origin) if job.equalize_cfa else []
            binned = _binned(job, result)
            header = master_header(
                job.frames, [i.calibration for i in job.inputs], job.method,
                job.normalize, result.factors, extra={JOB_CARD: job.id},
                rejected=result.frame_fractions(), auto_reason=job.auto_reason, carry=job.carry,
            )
            for note in cfa_notes:
                header.add_history(note)
            if geometry is not None:
                geometry.apply(header)  # flipped, overscan, trimmed: flatd.stack.geometry
            qc = self._check_master(job, result, rejection, header, ahead, binned)
        except OSError as exc:
            raise JobFailed(f"{exc.filename}: {exc.strerror}" if exc.filename else str(exc.strerror or exc)) from None
        except (FlatdError, MemoryError) as exc:  # the flats' fault: the job fails with the reason
            raise JobFailed(str(exc)) from None
        except Exception as exc:  # noqa: BLE001 - a bug must not stop the other groups
            raise JobFailed(f"internal error: {type(exc).__name__}: {exc}") from None
        self._writing(job)
        pictures = _start_pictures(job, result.image, origin, binned, _comparison(qc)) if job.previews else None
        try:
            master = write_master(job.output_dir, master_name_for(job, qc), result.image, header,
                                  rejection_map=result.rejection_map if job.rejection_map else None)
        except NoSpace as exc:
            raise JobFailed(exc.strerror, transient=True) from None
        except OSError as exc:
            raise JobFailed(f"cannot write the master in {job.output_dir}: {exc.strerror or exc}",
                            transient=True) from None
        except Exception as exc:  # noqa: BLE001
            raise JobFailed(f"cannot write the master in {job.output_dir}: {type(exc).__name__}: {exc}",
                            transient=True) from None
        if pictures is not None:
            _write_previews(job, master, pictures)
        return master, rejection, qc

    def _keep_inputs(self, job: Job) -> list[None]:
        """A bad master's inputs left in place (quality.bad_keeps_inputs), noted in the ledger."""
        if self.ledger is not None:
            for item in job.inputs:
                self.ledger.input_not_moved(job.id, item.frame.path,
                                            "kept in place: its master is bad (quality.bad_keeps_inputs)")
        return [None] * len(job.inputs)

    def _read_ahead(self, job: Job):
        """With quality.previous: a thread that reads the previous master the job will most
        likely be compared with, binned, while the job stacks (flatd.qc.previous.read_ahead;
        the candidates are listed here, where the ledger is used). A Future, or None."""
        from flatd.config import Quality

        limits = job.quality or Quality()
        if not (limits.enabled and limits.previous):
            return None
        from flatd.qc.previous import candidates, read_ahead, setup_cards

        paths = candidates(job.output_dir, self.ledger, job.id)
        if not paths:
            return None

        return _in_thread("flatd-read-ahead", lambda: (paths, read_ahead(setup_cards(job.frames), paths, job.id)))

    def _check_master(self, job: Job, result, rejection: Optional[Rejection], header, ahead=None,
                      binned=None) -> Optional[Any]:
        """The master checks (flatd.qc.masters, flatd.qc.previous), their cards and HISTORY
        added to `header`; None when quality.enabled is false. `ahead`: _read_ahead's;
        `binned`: _binned's. A failure of the checks themselves is a warning, never the job's."""
        from flatd.config import Quality

        limits = job.quality or Quality()
        if not limits.enabled:
            return None
        from flatd.output.masters import add_checks

        try:
            qc = check_job_master(job, result, rejection, header, limits, self.ledger, ahead, binned)
            add_checks(header, qc.cards(), qc.history())
        except Exception as exc:  # noqa: BLE001 - a bug in a check must not lose the master
            E.notice("master_checks_failed", f"{job.label}: master not checked: {type(exc).__name__}: {exc}",
                     logging.WARNING, job=job.id)
            return None
        return qc

    # ------------------------------------------------------------------ the flat checks (flatd.qc.flats)

    def _stack(self, job: Job):
        """The engine's result; the flat checks' findings kept for the job (and emitted),
        also when too few flats are left (the engine's error carries them)."""
        try:
            result = self.engine.stack(job)
        except FlatdError as exc:
            self._checked(job, getattr(exc, "findings", None) or [])
            raise
        self._checked(job, getattr(result, "findings", None) or [])
        return result

    def _checked(self, job: Job, findings: list) -> None:
        self._flat_findings[job.id] = list(findings)
        for f in findings:
            emit(E.FlatRejectedQc(f.path, f.check, f.figure, f.limit, f.reason, f.action, job=job.id,
                                  group=job.label))

    def _left_out_of(self, job: Job) -> list[tuple[Path, str]]:
        return [(f.path, f.reason) for f in self._flat_findings.get(job.id, []) if f.leaves_out]

    @staticmethod
    def _without_left_out(job: Job, result) -> Job:
        """The job with only the inputs the engine combined (result.kept)."""
        kept = getattr(result, "kept", None)
        if kept is None or len(kept) == len(job.inputs):
            return job
        return replace(job, inputs=tuple(job.inputs[i] for i in kept))

    def _writing(self, job: Job) -> None:
        """State writing, with the inputs the flat checks left out, in one transaction:
        once a master can be on disk, the ledger knows which inputs it must never move."""
        left = self._left_out_of(job)
        if self.ledger is not None and left:
            self.ledger.inputs_left_out(job.id, left, L.WRITING)
        else:
            self._state(job, L.WRITING)

    def _record_left_out(self, job: Job) -> None:
        """A failed job's left-out inputs, in the ledger (never planned again until they change)."""
        left = self._left_out_of(job)
        if self.ledger is not None and left and self.ledger.job(job.id) is not None:
            self.ledger.inputs_left_out(job.id, left)

    def _drop_left_out(self, job: Job, move_dirs: list) -> tuple[Job, list]:
        """The job and its move folders without the inputs the flat checks left out (now,
        or in the run that wrote the master found): those stay where they are."""
        out = {str(p) for p, _ in self._left_out_of(job)}
        if self.ledger is not None:
            out |= self.ledger.left_out_paths(job.id)
        if not out:
            return job, move_dirs
        pairs = [(i, d) for i, d in zip(job.inputs, move_dirs) if str(i.frame.path) not in out]
        return replace(job, inputs=tuple(i for i, _ in pairs)), [d for _, d in pairs]

    def _note_flat_checks(self, report: RunReport, outcome: Outcome, dry_run: bool) -> None:
        """The outcome's flat-check findings (a dry run screens the job's samples now); the
        flats left out join the report's left-out list with the figure that failed."""
        from flatd.ingest.frames import Skipped

        job = outcome.job
        findings = self._flat_findings.pop(job.id, [])
        if dry_run and outcome.state == "would-run" and outcome.reason is None:
            from flatd.stack.samples import screen_job

            findings, outcome.checks_note = screen_job(job)
            left = {f.path for f in findings if f.leaves_out}
            need = max(int(getattr(job, "min_group_size", 1) or 1), job.method.min_frames)
            if left and len(job.inputs) - len(left) < need:
                outcome.state = "would-fail"
                outcome.reason = (f"{len(left)} flat(s) would be left out by the quality checks, "
                                  f"{len(job.inputs) - len(left)} left: fewer than {need}; nothing would be combined")
        outcome.findings = findings
        report.plan.left_out.extend(Skipped(f.path, f"quality: {f.reason}") for f in findings if f.leaves_out)

    def _fail(self, job: Job, exc: JobFailed) -> Outcome:
        """Record a failed job: kept as failed (flatd retry), or rolled back when transient."""
        reason = str(exc)
        self._record_left_out(job)
        if self.ledger is not None:
            if exc.transient:
                self.ledger.forget_job(job.id)
            else:
                self.ledger.set_state(job.id, L.FAILED, reason)
        retry = "; tried again at the next run" if exc.transient else ""
        emit(E.JobFailed(job.label, reason, job=job.id, files=len(job.inputs), retried=exc.transient,
                         rule=job.rule, inputs=job_facts(job)["inputs"]))
        return Outcome(job, "failed", reason=reason + retry, transient=exc.transient)

    def _state(self, job: Job, state: str, reason: Optional[str] = None) -> None:
        if self.ledger is not None:
            self.ledger.set_state(job.id, state, reason)

    @staticmethod
    def _move_dirs(job: Job, now: datetime) -> list[Optional[Path]]:
        if not job.move_to:
            return [None] * len(job.inputs)
        fields = move_date(now)
        return [resolve_move_dir(job.move_to, i.frame.path, fields) for i in job.inputs]

    def _move_inputs(self, job_id: str, moves: Sequence[tuple[Path, Optional[Path], Optional[FileIdentity]]]
                     ) -> tuple[list, list[str], int]:
        """Move each input after its master is safe. A file that is no longer the one that
        was read stays in place for good; any other failed move is tried again later.
        Returns what moved, the problems, and the moves still owed (also among the problems)."""
        moved, problems, owed = [], [], []
        for src, dest_dir, identity in moves:
            if dest_dir is None:
                continue
            try:
                dest = move_file(src, dest_dir, expect=identity)
            except FileChanged as exc:
                note = f"{src} {exc.strerror}: not moved"
                problems.append(note)
                emit(E.MoveProblem(job_id, src, note, refused=True))
                if self.ledger is not None:
                    self.ledger.input_not_moved(job_id, src, exc.strerror)
                continue
            except OSError as exc:
                owed.append(f"could not move {src}: {exc.strerror or exc}")
                problems.append(owed[-1])
                emit(E.MoveProblem(job_id, src, f"could not move {src}: {exc}"))
                continue
            if self.ledger is not None:
                self.ledger.input_moved(job_id, src, dest)
            moved.append((src, dest))
        if moved:
            emit(E.InputsMoved(job_id, len(moved), moved[0][1].parent))
        if self.ledger is not None and moves and not any(d for _, d, _ in moves):
            self.ledger.inputs_consumed(job_id)
        return moved, problems, owed

    # ------------------------------------------------------------------ moves left from earlier runs

    def retry_pending_moves(self, dry_run: bool = False) -> list[str]:
        """Move the inputs that earlier runs could not move. Returns what is still not
        moved, one line per input (empty when every move is done)."""
        if self.ledger is None:
            return []
        left: list[str] = []
        by_job: dict[str, list[L.InputRow]] = {}
        for row in self.ledger.pending_moves():
            by_job.setdefault(row.job_id, []).append(row)
        for job_id, rows in by_job.items():
            if dry_run:
                left += [f"{row.path}: would be moved to {row.move_dir} (job {job_id}, left from an earlier run)"
                         for row in rows]
                continue
            problems, owed = self._finish_moves(job_id, rows)
            if owed:
                left += [line + f" (job {job_id}; tried again at the next run)" for line in owed]
                self.ledger.set_state(job_id, L.MOVES_PENDING, "; ".join(problems))
            else:
                self.ledger.set_state(job_id, L.DONE, "; ".join(problems) or None)
                emit(E.MovesFinished(job_id, len(rows)))
        return left

    # ------------------------------------------------------------------ recovery

    def recover(self) -> list[str]:
        """Finish or roll back every job that a crash left unfinished. Returns their ids."""
        if self.ledger is None:
            return []
        handled = []
        for row in self.ledger.jobs(L.UNFINISHED):
            _cleanup_temp_files(Path(row.output_dir))
            master = Path(row.master) if row.master else find_master(Path(row.output_dir), row.id)
            inputs = self.ledger.inputs(row.id)
            if master is None or not master.exists():
                self.ledger.forget_job(row.id)
                emit(E.JobRecovered(row.id, row.label))
            else:
                if row.master is None:
                    self.ledger.master_written(row.id, master, row.label, len(inputs))
                problems, owed = self._finish_moves(row.id, inputs)
                state = L.MOVES_PENDING if owed else L.DONE
                self.ledger.set_state(row.id, state, "; ".join(problems) or None)
                emit(E.JobRecovered(row.id, row.label, master))
            handled.append(row.id)
        return handled

    def _finish_moves(self, job_id: str, inputs: Sequence[L.InputRow]) -> tuple[list[str], list[str]]:
        """The moves a job still owes: half-done ones (after a crash) are completed, the
        others are done now. Returns the problems and the moves still owed."""
        problems, todo = [], []
        for row in inputs:
            if not row.move_pending:
                continue
            src, dest_dir = Path(row.path), Path(row.move_dir)
            _cleanup_temp_files(dest_dir) if dest_dir.exists() else None
            already = _already_moved(src, dest_dir, row.size, row.mtime)
            if already is not None:
                if src.exists():
                    src.unlink()  # a hard link of the same inode: the move was half done
                self.ledger.input_moved(job_id, src, already)
            elif src.exists():
                todo.append((src, dest_dir, row_identity(row)))
            else:
                problems.append(f"input {src} is missing")
                self.ledger.input_not_moved(job_id, src, "gone before it was moved")
        _, more, owed = self._move_inputs(job_id, todo)
        if not any(r.move_dir for r in inputs):
            self.ledger.inputs_consumed(job_id)
        return problems + more, owed


def check_job_master(job: Job, result, rejection: Optional[Rejection], header, limits, ledger=None, ahead=None,
                     binned=None):
    """A job's master checked: its figures, the previous master (when quality.previous;
    `ahead`: a Future of (candidates, flatd.qc.previous.ReadAhead)), the verdict
    (flatd.qc.masters.MasterQC). `binned`: _binned's, shared by both."""
    from flatd.qc.masters import judge, measure_master
    from flatd.stack.cfa import common_layout

    # the comparison with the previous master (a file read, numpy) runs beside the figures
    previous = (_in_thread("flatd-previous",
                           lambda: _previous_of(result.image, header, job, ledger, limits, ahead, binned))
                if limits.previous else None)
    if rejection is not None and rejection.threshold is None:
        baseline = sum(_clean_baseline(job))  # not measured for the warning: measured here
    else:
        baseline = rejection.baseline if rejection is not None else None
    try:
        qc = measure_master(result.image, frames=job.frames, method=job.method, levels=result.levels,
                            factors=result.factors, patches=getattr(result, "noise_patches", None),
                            noise_rows=getattr(result, "noise_rows", None),
                            colour=common_layout(job.frames) is not None, rejection=rejection, baseline=baseline,
                            binned=binned)
    finally:
        compared = previous.result() if previous is not None else None  # never left running behind a failure
    qc.previous = compared
    judge(qc, limits)
    return qc


def _previous_of(image, header, job: Job, ledger, limits, ahead, binned=None):
    """check_previous, with what _read_ahead read (its candidates, and the likely previous
    master binned) when it could, and the master binned (`binned`)."""
    from flatd.qc.previous import check_previous

    try:
        paths, read = ahead.result() if ahead is not None else (None, None)
    except Exception:  # noqa: BLE001 - the read-ahead is only a head start
        paths, read = None, None
    return check_previous(image, header, job.output_dir, None if paths is not None else ledger, job.id, limits,
                          ahead=read, paths=paths, binned=binned)


def master_name_for(job: Job, qc) -> str:
    """The job's output name; a bad master's gets -QCBAD before its extension."""
    if qc is None or qc.status != "bad":
        return job.output_name
    from flatd.output.naming import split_name

    stem, ext = split_name(job.output_name)
    return f"{stem}-QCBAD{ext}"


def keeps_inputs(job: Job, qc) -> bool:
    """quality.bad_keeps_inputs and a bad master: its inputs stay in place."""
    return qc is not None and qc.status == "bad" and bool(getattr(job.quality, "bad_keeps_inputs", False))


def _comparison(qc):
    previous = getattr(qc, "previous", None)
    return previous.comparison if previous is not None else None


def _previous_path(qc) -> Optional[Path]:
    previous = getattr(qc, "previous", None)
    return previous.path if previous is not None else None


def _emit_checked(job: Job, master: Path, qc) -> None:
    if qc is None:
        return
    comparison = _comparison(qc)
    emit(E.MasterChecked(job.id, master, qc.status, tuple(qc.reasons), _previous_path(qc),
                         len(comparison.blobs) if comparison is not None else 0))


def _binned(job: Job, result):
    """The master binned once (flatd.qc.previous.binned_master, one pass, at the checks'
    saturation limit): the comparison's bins, the preview's, and what the master checks'
    pixel counts and field blocks need. None when neither the checks nor the previews
    run, or when it cannot be made (each then reads the master itself)."""
    from flatd.config import Quality

    if not ((job.quality or Quality()).enabled or job.previews):
        return None
    try:
        from flatd.qc.masters import saturation_limit
        from flatd.qc.previous import binned_master

        limit = saturation_limit(job.frames, result.factors)
        return binned_master(result.image, limit if limit is not None else math.inf)
    except Exception:  # noqa: BLE001 - a head start only
        return None


def _start_pictures(job: Job, image, origin=(0, 0), binned=None, comparison=None) -> list:
    """output.previews: the master's PNG picture and, with a previous-master comparison,
    the ratio's, each drawn in a thread of its own while the master is written (numpy,
    zlib and Pillow let go of the GIL; the write's fsync leaves the CPU idle; drawn beside
    the checks instead, they only contend with them); the master's from `binned`
    (_binned's) when it holds the picture's bins. Futures of flatd.qc.previews'
    render_master / render_ratio (kind, PNG bytes or the exception), for _write_previews."""
    def layout():
        from flatd.qc.previews import master_layout

        return master_layout(job.frames, image.shape, origin)

    def master() -> tuple:
        from flatd.qc.previews import render_master

        return render_master(image, layout(), _bottom_up(job), binned)

    def ratio() -> tuple:
        from flatd.qc.previews import render_ratio

        return render_ratio(comparison, layout(), _bottom_up(job))

    pictures = [_in_thread("flatd-preview", master)]
    if comparison is not None:
        pictures.append(_in_thread("flatd-ratio-picture", ratio))
    return pictures


def _bottom_up(job: Job) -> bool:
    return job.frames[0].row_order == "BOTTOM-UP"


def _in_thread(name: str, fn: Callable):
    """fn() in a thread of its own, named `name`; a Future of its result (the thread ends
    with it: nothing waits for it unless its result is asked for)."""
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
    try:
        return pool.submit(fn)
    finally:
        pool.shutdown(wait=False)


def _write_previews(job: Job, master: Path, pictures) -> list[Path]:
    """The pictures started by _start_pictures, written beside the master just written; a
    failure (Pillow missing, a picture that cannot be drawn or written) is a warning,
    never the job's."""
    try:
        from flatd.qc.previews import write_rendered

        return write_rendered(master, pictures, job=job.id)
    except Exception as exc:  # noqa: BLE001
        E.notice("preview_failed", f"no preview of {master}: {type(exc).__name__}: {exc}", logging.WARNING,
                 job=job.id)
        return []


def job_facts(job: Job) -> dict:
    """What hooks and notifications are told of a job besides its master (flatd.notify.hooks)."""
    return {"group": job.label, "rule": job.rule, "inputs": tuple(i.frame.path for i in job.inputs),
            "calibration": tuple(i.calibration.label for i in job.inputs)}


def preview_of(job: Job, master: Optional[Path]) -> Optional[Path]:
    """The preview beside a master, when output.previews wrote one."""
    if not job.previews or master is None:
        return None
    from flatd.qc.previews import preview_paths

    preview = preview_paths(master)[0]
    return preview if preview.exists() else None


def _cleanup_temp_files(directory: Path) -> None:
    from flatd.output.masters import cleanup_temp_files

    cleanup_temp_files(directory)


def _already_moved(src: Path, dest_dir: Path, size: int, mtime: float) -> Optional[Path]:
    """The copy of `src` in `dest_dir` from a move a crash interrupted, if there is one.

    A same-filesystem move links first (same inode); a cross-filesystem move copies
    (same size and content). A clash prefix ("1_name") may have been added.
    """
    if not dest_dir.is_dir():
        return None
    src_stat = src.stat() if src.exists() else None
    for candidate in dest_dir.iterdir():
        if candidate.name.startswith(".") or not (candidate.name == src.name or candidate.name.endswith("_" + src.name)):
            continue
        st = candidate.stat()
        if src_stat is None:
            if st.st_size == size and abs(st.st_mtime - mtime) < 1e-3:
                return candidate
        elif (st.st_ino, st.st_dev) == (src_stat.st_ino, src_stat.st_dev):
            return candidate
        elif st.st_size == src_stat.st_size and file_digest(candidate) == file_digest(src):
            return candidate
    return None


def find_master(directory: Path, job_id: str) -> Optional[Path]:
    """The master a job wrote, found by the job id in its header (FLATDJOB): after a
    crash, or when the ledger was lost or another flatd made it."""
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except OSError:
        return None
    for entry in entries:
        if entry.name.startswith("."):
            continue
        try:
            if not entry.is_file():
                continue
            cards, _ = read_header_cards(Path(entry.path))
        except (FrameError, OSError):
            continue
        if cards.get(JOB_CARD) == job_id:
            return Path(entry.path)
    return None


# ---------------------------------------------------------------------- batches


def process_capture(capture: CaptureFolder, rules: Rules, runner: Runner, dry_run: bool = False,
                    stable: Optional[float] = None, libraries: Optional[LibraryCache] = None,
                    now: Optional[datetime] = None,
                    ready: Optional[Callable[[Path, os.stat_result], bool]] = None,
                    waiter=None, frames: Optional[Sequence] = None) -> RunReport:
    """Scan, plan and run one capture folder: the one code path of run-once and watch.

    `ready`: the service's verdicts (only the flats its watcher saw stable); `waiter`:
    run-once's StableWait (files not yet stable are left out with the reason); `frames`:
    the Frames the service's watcher already read (no walk, no second header read)."""
    if not capture.path.is_dir():
        problem = f"capture folder {capture.path} does not exist or is not a folder (a share not mounted?)"
        emit(E.FolderProblem(capture.path, problem, missing=True))
        return RunReport(problems=[problem])
    now = now or datetime.now()
    libraries = libraries or LibraryCache()
    if frames is not None:
        frames, bad, problems = still_candidates(frames, runner.ledger), [], []
    else:
        frames, bad, problems = scan_capture(capture, rules, runner.ledger, time.time(),
                                             rules.stable if stable is None else stable, ready, waiter)
    for problem in problems:
        emit(E.FolderProblem(capture.path, problem))
    for item in bad:
        emit(E.FrameLeftOut(item.path, item.reason, bad=True))
    plan = plan_frames(frames, rules, capture.path, libraries, now)
    for item in plan.left_out:
        emit(E.FrameLeftOut(item.path, item.reason, quiet=not_a_flat(item.reason)))
    plan.left_out = bad + plan.left_out
    report = runner.run(plan, dry_run=dry_run, now=now)
    report.problems.extend(problems)
    return report


def not_a_flat(reason: str) -> bool:
    """A file left out for its type (a light, a master): a debug line, not news."""
    return "not a flat" in reason or "never an input" in reason
