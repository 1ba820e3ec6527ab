"""Turning frames and rules into Jobs, and explaining what is left out and why.

Pure: reads no pixels and writes nothing. The calibration library is reached through
a cache handed in by the caller (it reads headers once per run).
"""

from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Iterable, Optional, Sequence

from flatd.calibration import Calibration, CalibrationError, Library, LibraryCache, calibration_for
from flatd.config import Effective, Rules, effective_for
from flatd.ingest.frames import DEFAULT_KEYWORDS, Frame, KeywordMap, Kind, Skipped
from flatd.grouping import Group, GroupOptions, group_frames
from flatd.jobs import Job, StackInput
from flatd.stack.auto import AUTO, choose as choose_auto
from flatd.stack.methods import Method
from flatd.output.naming import master_name, name_fields, numbered_name, template_keywords, with_format

# Kinds that are never combined into a master flat, even with ignore_type.
NEVER_INPUTS = (Kind.MASTER,)


@dataclass(frozen=True)
class FailedGroup:
    """A group that cannot be combined (calibration missing, too few for min/max...)."""

    label: str
    frames: tuple[Frame, ...]
    reason: str
    rule: Optional[str] = None


@dataclass
class Plan:
    jobs: list[Job] = field(default_factory=list)
    failed: list[FailedGroup] = field(default_factory=list)
    left_out: list[Skipped] = field(default_factory=list)

    def extend(self, other: "Plan") -> None:
        self.jobs.extend(other.jobs)
        self.failed.extend(other.failed)
        self.left_out.extend(other.left_out)


def job_id(frames: Iterable[Frame], settings: str) -> str:
    """Stable identity of a job: its inputs (path, size, mtime) and its settings."""
    digest = hashlib.sha256(settings.encode())
    for f in sorted(frames, key=lambda f: str(f.path)):
        digest.update(f"{os.path.abspath(f.path)}\0{f.file_size}\0{f.mtime:.6f}\n".encode())
    return digest.hexdigest()[:16]


def select_flats(frames: Sequence[Frame], rules: Rules) -> tuple[list[tuple[Frame, Effective]], list[Skipped]]:
    """Flats with the settings that apply to each; every other frame with its reason."""
    chosen, left_out = [], []
    for frame in frames:
        eff = effective_for(rules, frame)
        if frame.kind in NEVER_INPUTS:
            left_out.append(Skipped(frame.path, "a master or stacked image, never an input"))
        elif frame.kind != Kind.FLAT and not eff.inputs.ignore_type:
            left_out.append(Skipped(frame.path, f"type {frame.kind.value}, not a flat (inputs.ignore_type, or -t, takes it)"))
        else:
            chosen.append((frame, eff))
    return chosen, left_out


def _partition(chosen: Sequence[tuple[Frame, Effective]], by_folder: bool) -> dict:
    """Flats that can share a group: same rule, and the same folder unless told otherwise."""
    parts: dict[tuple, list[tuple[Frame, Effective]]] = defaultdict(list)
    for frame, eff in chosen:
        folder = str(frame.path.parent) if by_folder and eff.grouping.folder else ""
        parts[(eff.rule or "", folder)].append((frame, eff))
    return parts


def plan_frames(
    frames: Sequence[Frame],
    rules: Rules,
    capture_root: Optional[Path],
    libraries: LibraryCache,
    now: datetime,
    output_dir: Optional[Path] = None,
    output_name: Optional[str] = None,
    by_folder: bool = True,
) -> Plan:
    """Plan the jobs for a batch of frames from one capture folder (or one command line).

    `output_dir` / `output_name` override the rules (flatd combine's -od / -o).
    """
    plan = Plan()
    chosen, plan.left_out = select_flats(frames, rules)
    for (_, _), members in sorted(_partition(chosen, by_folder).items()):
        eff = members[0][1]
        groups, skipped = group_frames([f for f, _ in members], GroupOptions.from_settings(eff.grouping))
        plan.left_out.extend(skipped)
        for group in groups:
            group, unfit = _fitting_geometry(group, eff)
            plan.left_out.extend(unfit)
            if group is None:
                continue
            outcome = plan_group(group, eff, capture_root, libraries, now, output_dir, output_name,
                                 rules.keyword_map())
            (plan.jobs if isinstance(outcome, Job) else plan.failed).append(outcome)
    _make_names_distinct(plan.jobs)
    return plan


def _fitting_geometry(group: Group, eff: Effective) -> tuple[Optional[Group], list[Skipped]]:
    """The group without the flats whose overscan sections are unusable while the others
    are trimmed (flatd.stack.geometry.screen_flats), and those left out with the reason.
    A group left with fewer than min_group_size flats is left out whole."""
    from flatd.stack.sections import screen_flats

    kept, unfit = screen_flats(group.frames, eff.precalibration.overscan)
    left_out = [Skipped(f.path, why) for f, why in unfit]
    if not unfit:
        return group, []
    if len(kept) < eff.grouping.min_group_size:
        return None, left_out + [Skipped(f.path, f"group {group.label} has {len(kept)} flat(s) with usable overscan "
                                                 f"sections, fewer than min_group_size {eff.grouping.min_group_size}")
                                 for f in kept]
    return replace(group, frames=tuple(kept)), left_out


def _master_size(frames, overscan: str) -> Optional[str]:
    """The master's size when its flats are trimmed to their data section, as '1365x1370'."""
    from flatd.stack.sections import frame_layout

    if overscan == "off" or not frames:
        return None
    data = frame_layout(frames[0], frames[0].row_order, overscan).data
    return f"{data.width}x{data.height}" if data is not None else None


def plan_group(
    group: Group,
    eff: Effective,
    capture_root: Optional[Path],
    libraries: LibraryCache,
    now: datetime,
    output_dir: Optional[Path],
    output_name: Optional[str],
    keywords: KeywordMap = DEFAULT_KEYWORDS,
) -> Job | FailedGroup:
    """A Job for one group, or the reason it cannot be made. `method: auto` is resolved
    here, from the group's number of frames (flatd.stack.auto)."""
    auto_reason = None
    if eff.combine.method == AUTO:
        method, auto_reason = choose_auto(len(group.frames), eff.combine)
    else:
        method = Method.from_settings(eff.combine)
    if len(group.frames) < method.min_frames:
        return FailedGroup(
            group.label, group.frames,
            f"{method.description} needs at least {method.min_frames} frames, the group has {len(group.frames)}",
            eff.rule,
        )
    try:
        calibrations = calibrations_for(group.frames, eff, libraries, keywords)
    except CalibrationError as exc:
        return FailedGroup(group.label, group.frames, str(exc), eff.rule)
    directory = output_dir or resolve_output_dir(eff.output.directory, capture_root, group.frames[0].path.parent)
    template = output_name or with_format(eff.output.name, eff.output.format)
    fields = name_fields(group.frames, method.label, group.label, now, template_keywords(template))
    fields["size"] = _master_size(group.frames, eff.precalibration.overscan) or fields["size"]
    try:
        name = master_name(template, fields)
    except ValueError as exc:  # a template that gives no plain file name
        return FailedGroup(group.label, group.frames, f"output name: {exc}", eff.rule)
    settings = f"{method.description}|{eff.combine.normalize}|{[c.label for c in calibrations]}"
    if auto_reason is not None:
        settings += "|auto"
    if eff.output.rejection_map:
        settings += "|rejection_map"
    if eff.precalibration.overscan != "auto":
        settings += f"|overscan {eff.precalibration.overscan}"
    if eff.combine.equalize_cfa:
        settings += "|equalize_cfa"
    settings += flat_checks_settings(eff.quality)
    return Job(
        id=job_id(group.frames, settings),
        group=group,
        rule=eff.rule,
        method=method,
        normalize=eff.combine.normalize,
        inputs=tuple(StackInput(f, c) for f, c in zip(group.frames, calibrations)),
        output_dir=directory,
        output_name=name,
        move_to=eff.inputs.move_to,
        auto_reason=auto_reason,
        rejection_map=eff.output.rejection_map,
        rejection_warn=eff.combine.rejection_warn,
        overscan=eff.precalibration.overscan,
        carry=tuple(eff.output.carry),
        equalize_cfa=eff.combine.equalize_cfa,
        quality=eff.quality,
        previews=eff.output.previews,
        min_group_size=eff.grouping.min_group_size,
    )


def flat_checks_settings(quality) -> str:
    """The flat checks' part of a job's settings: only the limits of checks that leave
    flats out (they change which flats are combined; `warn` ones change nothing)."""
    if quality is None or not quality.enabled:
        return ""
    parts = []
    if quality.level_action == "leave-out":
        parts.append(f"level {quality.min_level:g}-{quality.max_level:g}")
    if quality.saturation_action == "leave-out":
        parts.append(f"saturated {quality.max_saturated:g}")
    if quality.odd_action == "leave-out":
        parts.append(f"odd {quality.odd_sigma:g}/{quality.odd_min_deviation:g}")
    return f"|flat checks {', '.join(parts)}" if parts else ""


def calibrations_for(frames: Sequence[Frame], eff: Effective, libraries: LibraryCache,
                     keywords: KeywordMap = DEFAULT_KEYWORDS) -> list[Calibration]:
    """The calibration of each flat, by the rule's precalibration settings."""
    pre = eff.precalibration
    library: Optional[Library] = libraries.for_settings(pre, keywords)
    fixed: Optional[Frame] = None
    if pre.mode == "file" and frames:
        fixed = calibration_for(frames[0], pre, None, None, keywords).frame
    return [calibration_for(f, pre, library, fixed, keywords) for f in frames]


def resolve_output_dir(directory: Path, capture_root: Optional[Path], fallback: Path) -> Path:
    """output.directory: absolute, or relative to the capture folder the flats came from."""
    if directory.is_absolute():
        return directory
    return (capture_root or fallback) / directory


def _make_names_distinct(jobs: list[Job]) -> None:
    """Two jobs planned to the same file get -2, -3...: a master never overwrites another."""
    seen: dict[Path, int] = defaultdict(int)
    for i, job in enumerate(jobs):
        target = job.output_dir / job.output_name
        seen[target] += 1
        if seen[target] > 1:
            jobs[i] = replace(job, output_name=numbered_name(job.output_name, seen[target]))


def output_folders(rules: Rules) -> list[Path]:
    """Folders that hold flatd's own outputs inside capture folders: never scanned."""
    folders = []
    for capture in rules.capture:
        for eff_out in [rules.output] + [
            type(rules.output).model_validate({**rules.output.model_dump(), **r.output}) for r in rules.rules if r.output
        ]:
            folders.append(resolve_output_dir(eff_out.directory, capture.path, capture.path))
    return folders
