"""Executing jobs: journal in the ledger, stack, write the master, move the inputs, recover.

This is the only module that moves input files. Each step is recorded in the ledger
before the next one starts, so that `recover()` can finish or roll back a job that a
crash interrupted: no duplicate master, no input lost or moved twice.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable, Optional, Sequence

from flatd import ledger as L
from flatd.calibration import LibraryCache
from flatd.config import CaptureFolder, Rules
from flatd.frames import Frame, FrameError, Skipped, iter_fits_files, read_frame, read_header_cards
from flatd.fsops import file_digest, move_file, resolve_move_dir
from flatd.log import event
from flatd.masters import cleanup_temp_files, master_header, write_master
from flatd.plan import Job, Plan, output_folders, plan_frames

JOB_CARD = "FLATDJOB"  # the job id, in every master's header: finds a master after a crash

ProgressFactory = Callable[[str, int], Callable[[int, int], None]]


@dataclass
class Outcome:
    """What happened to one job (or what would, in a dry run)."""

    job: Job
    state: str  # done | failed | skipped | would-run
    master: Optional[Path] = None
    moved: list[tuple[Path, Path]] = field(default_factory=list)  # (input, where it went / would go)
    reason: Optional[str] = None

    @property
    def failed(self) -> bool:
        return self.state == "failed"


@dataclass
class RunReport:
    plan: Plan = field(default_factory=Plan)
    outcomes: list[Outcome] = field(default_factory=list)
    recovered: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # e.g. a capture folder that is not there

    @property
    def exit_code(self) -> int:
        """0 when every group succeeded, 1 if any failed (too-small groups are not failures)."""
        return 1 if self.problems or self.plan.failed or any(o.failed for o in self.outcomes) else 0

    def extend(self, other: "RunReport") -> None:
        self.plan.extend(other.plan)
        self.outcomes.extend(other.outcomes)
        self.recovered.extend(other.recovered)
        self.problems.extend(other.problems)


def move_date(now: datetime) -> dict[str, str]:
    return {"date": now.strftime("%Y%m%d-%H%M%S"), "time": now.strftime("%H%M%S"), "day": now.strftime("%Y%m%d")}


class Runner:
    """Runs planned jobs; with a ledger, journals every step and can recover."""

    def __init__(self, ledger: Optional[L.Ledger] = None, progress: Optional[ProgressFactory] = None,
                 workers: Optional[int] = None, should_stop: Callable[[], bool] = lambda: False):
        self.ledger = ledger
        self.progress = progress
        self.workers = workers
        self.should_stop = should_stop

    # ------------------------------------------------------------------ run

    def run(self, plan: Plan, dry_run: bool = False, now: Optional[datetime] = None) -> RunReport:
        report = RunReport(plan=plan)
        now = now or datetime.now()
        for failed in plan.failed:
            event("group_failed", f"group {failed.label} failed: {failed.reason}", logging.ERROR,
                  group=failed.label, files=len(failed.frames))
        for job in plan.jobs:
            if self.should_stop():
                break
            if dry_run:
                planned = [(i.frame.path, d) for i, d in zip(job.inputs, self._move_dirs(job, now)) if d]
                report.outcomes.append(Outcome(job, "would-run", master=job.output_dir / job.output_name,
                                               moved=planned))
                continue
            report.outcomes.append(self.run_job(job, now))
        return report

    def run_job(self, job: Job, now: datetime) -> Outcome:
        """Stack, write and move for one job, journaling each step."""
        from flatd.stacker import StackError, stack_frames

        if self.ledger is not None:
            known = self.ledger.job(job.id)
            if known is not None and known.state == L.FAILED:
                return Outcome(job, "skipped", reason=f"failed before: {known.reason} (flatd retry {job.id})")
            if known is not None and known.state == L.DONE:
                return Outcome(job, "skipped", master=Path(known.master) if known.master else None, reason="already done")
        move_dirs = self._move_dirs(job, now)
        if self.ledger is not None:
            self.ledger.plan_job(
                job.id, job.label, job.rule, job.frames[0].path.parent, job.output_dir, job.output_name,
                [(i.frame.path, i.frame.file_size, i.frame.mtime, i.calibration.label, d) for i, d in zip(job.inputs, move_dirs)],
            )
        event("group_planned", f"combining {len(job.inputs)} flats of {job.label} with {job.method.description}",
              job=job.id, group=job.label, files=len(job.inputs), rule=job.rule or "-")
        started = time.monotonic()
        try:
            progress = self.progress(job.label, job.frames[0].height) if self.progress else None
            result = stack_frames(job.inputs, job.method, job.normalize, job.memory_limit, self.workers, progress)
            header = master_header(
                job.frames, [i.calibration for i in job.inputs], job.method.description, job.method.label,
                job.normalize, result.factors, extra={JOB_CARD: job.id},
            )
            self._state(job, L.WRITING)
            master = write_master(job.output_dir, job.output_name, result.image, header)
        except (StackError, FrameError, OSError, ValueError, MemoryError) as exc:
            reason = str(exc)
            self._state(job, L.FAILED, reason)
            event("group_failed", f"group {job.label} failed: {reason}", logging.ERROR, job=job.id, group=job.label)
            return Outcome(job, "failed", reason=reason)
        if self.ledger is not None:
            self.ledger.master_written(job.id, master, job.label, len(job.inputs))
        event("master_written", f"wrote {master}", job=job.id, path=master, files=len(job.inputs),
              seconds=round(time.monotonic() - started, 2))
        moved, problems = self._move_inputs(job.id, [(i.frame.path, d) for i, d in zip(job.inputs, move_dirs)])
        self._state(job, L.DONE, "; ".join(problems) or None)
        if problems:
            return Outcome(job, "failed", master, moved, "; ".join(problems))
        return Outcome(job, "done", master, moved)

    def _state(self, job: Job, state: str, reason: Optional[str] = None) -> None:
        if self.ledger is not None:
            self.ledger.set_state(job.id, state, reason)

    @staticmethod
    def _move_dirs(job: Job, now: datetime) -> list[Optional[Path]]:
        if not job.move_to:
            return [None] * len(job.inputs)
        fields = move_date(now)
        return [resolve_move_dir(job.move_to, i.frame.path, fields) for i in job.inputs]

    def _move_inputs(self, job_id: str, moves: Sequence[tuple[Path, Optional[Path]]]) -> tuple[list, list[str]]:
        """Move each input after its master is safe; a failed move leaves the file in place."""
        moved, problems = [], []
        for src, dest_dir in moves:
            if dest_dir is None:
                continue
            try:
                dest = move_file(src, dest_dir)
            except OSError as exc:
                problems.append(f"could not move {src}: {exc.strerror or exc}")
                event("move_failed", f"could not move {src}: {exc}", logging.ERROR, job=job_id, path=src)
                continue
            if self.ledger is not None:
                self.ledger.input_moved(job_id, src, dest)
            moved.append((src, dest))
        if moved:
            event("inputs_moved", f"moved {len(moved)} inputs to {moved[0][1].parent}", job=job_id, files=len(moved))
        if self.ledger is not None and not any(d for _, d in moves):
            self.ledger.inputs_consumed(job_id)
        return moved, problems

    # ------------------------------------------------------------------ recovery

    def recover(self) -> list[str]:
        """Finish or roll back every job that a crash left unfinished. Returns their ids."""
        if self.ledger is None:
            return []
        handled = []
        for row in self.ledger.jobs(L.UNFINISHED):
            cleanup_temp_files(Path(row.output_dir))
            master = Path(row.master) if row.master else find_master(Path(row.output_dir), row.id)
            inputs = self.ledger.inputs(row.id)
            if master is None or not master.exists():
                self.ledger.forget_job(row.id)
                event("job_rolled_back", f"interrupted job {row.id} ({row.label}) had no master yet; it will be redone",
                      logging.WARNING, job=row.id)
            else:
                if row.master is None:
                    self.ledger.master_written(row.id, master, row.label, len(inputs))
                problems = self._finish_moves(row.id, inputs)
                self.ledger.set_state(row.id, L.DONE, "; ".join(problems) or None)
                event("job_recovered", f"finished interrupted job {row.id} ({row.label}): {master}", logging.WARNING,
                      job=row.id)
            handled.append(row.id)
        return handled

    def _finish_moves(self, job_id: str, inputs: Sequence[L.InputRow]) -> list[str]:
        problems = []
        for row in inputs:
            if row.moved_to or not row.move_dir:
                continue
            src, dest_dir = Path(row.path), Path(row.move_dir)
            cleanup_temp_files(dest_dir) if dest_dir.exists() else None
            already = _already_moved(src, dest_dir, row.size, row.mtime)
            if already is not None:
                if src.exists():
                    src.unlink()  # a hard link of the same inode: the move was half done
                self.ledger.input_moved(job_id, src, already)
            elif src.exists():
                _, more = self._move_inputs(job_id, [(src, dest_dir)])
                problems.extend(more)
            else:
                problems.append(f"input {src} is missing")
        if not any(r.move_dir for r in inputs):
            self.ledger.inputs_consumed(job_id)
        return problems


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
    """The master a job wrote, found by the job id in its header."""
    if not directory.is_dir():
        return None
    for path in directory.iterdir():
        if path.name.startswith(".") or not path.is_file():
            continue
        try:
            cards, _ = read_header_cards(path)
        except FrameError:
            continue
        if cards.get(JOB_CARD) == job_id:
            return path
    return None


# ---------------------------------------------------------------------- batches


def own_output_patterns(rules: Rules) -> list[str]:
    """Folder-name globs of inputs.move_to templates, e.g. 'originals-*'."""
    import re

    patterns = []
    for template in [rules.inputs.move_to] + [r.inputs.get("move_to") for r in rules.rules if r.inputs]:
        if template and not os.path.isabs(os.path.expanduser(template)):
            for part in Path(template).parts:
                patterns.append(re.sub(r"\{[^}]*\}", "*", part))
    return patterns


def scan_folder(capture: CaptureFolder, rules: Rules, ledger: Optional[L.Ledger],
                now: float, stable: float,
                ready: Optional[Callable[[Path, os.stat_result], bool]] = None,
                list_others: bool = False) -> tuple[list[Frame], list[Skipped]]:
    """Ready frames under a capture folder, and every file left out with its reason.

    A file is left out when it is flatd's own output (masters, moved inputs), was
    already combined, is still being written, or is not a usable FITS image. `ready`
    (the service's stability tracker) replaces the mtime check when given.
    """
    exclude = output_folders(rules) + [rules.state]
    patterns = own_output_patterns(rules)
    keywords = rules.keyword_map()
    frames, skipped = [], []
    others: Optional[list[Path]] = [] if list_others else None
    for path in iter_fits_files(capture.path, capture.recursive, exclude, others):
        rel_parts = path.relative_to(capture.path).parts[:-1]
        if any(fnmatch.fnmatch(part, pat) for part in rel_parts for pat in patterns):
            continue  # a move_to folder: flatd's own
        if ledger is not None and (ledger.is_master(path) or ledger.is_moved_input(path)):
            continue
        try:
            st = path.stat()
        except OSError as exc:
            skipped.append(Skipped(path, f"cannot read: {exc.strerror or exc}"))
            continue
        if ready is not None:
            if not ready(path, st):
                continue  # the watcher has not seen this flat stable, or it is no flat
        elif now - st.st_mtime < stable:
            skipped.append(Skipped(path, f"still being written (changed {now - st.st_mtime:.0f} s ago)"))
            continue
        if ledger is not None:
            consumed = ledger.consumed(path, st.st_size, st.st_mtime)
            if consumed:
                continue  # combined before (inputs left in place)
        try:
            frames.append(read_frame(path, keywords))
        except FrameError as exc:
            skipped.append(Skipped(exc.path, exc.reason))
    for path in others or ():
        if not any(fnmatch.fnmatch(part, pat) for part in path.relative_to(capture.path).parts[:-1] for pat in patterns):
            skipped.append(Skipped(path, "not a FITS file name (.fit, .fits, .fts, .fz)"))
    return frames, skipped


def process_capture(capture: CaptureFolder, rules: Rules, runner: Runner, dry_run: bool = False,
                    stable: Optional[float] = None, libraries: Optional[LibraryCache] = None,
                    now: Optional[datetime] = None,
                    ready: Optional[Callable[[Path, os.stat_result], bool]] = None) -> RunReport:
    """Scan, plan and run one capture folder: the one code path of run-once and watch."""
    if not capture.path.is_dir():
        problem = f"capture folder {capture.path} does not exist or is not a folder (a share not mounted?)"
        event("capture_missing", problem, logging.ERROR, folder=capture.path)
        return RunReport(problems=[problem])
    now = now or datetime.now()
    libraries = libraries or LibraryCache()
    frames, bad = scan_folder(capture, rules, runner.ledger, time.time(), rules.stable if stable is None else stable,
                              ready, list_others=dry_run)
    for item in bad:
        event("file_left_out", f"left out {item.path}: {item.reason}", logging.WARNING, path=item.path)
    plan = plan_frames(frames, rules, capture.path, libraries, now)
    plan.left_out = bad + plan.left_out
    return runner.run(plan, dry_run=dry_run, now=now)
