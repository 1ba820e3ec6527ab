"""`flatd qc FILES... [--against PREVIOUS] [--pictures DIR]`: the quality checks on demand.

Flats (IMAGETYP flat) are grouped as flatd groups them (flatd.grouping, the rules'
grouping settings, every group checked whatever its size), calibrated as the rules say
(the library's match, else nothing), and their level samples read by the engine's own
reader (flatd.stack.samples); the flat checks (flatd.qc.flats) run per group with the
rules' quality settings. Masters (IMAGETYP master flat, or a FLATDJOB / NCOMBINE card)
get the master checks that need no inputs (pixel counts, field ratio; the noise from
the master's own QCNOISEX card, else n/a) and, with --against, the comparison with that
previous master. Nothing is written but the pictures (--pictures DIR); nothing is moved.

Exit: 0 all good; 1 a flat would be left out, a master is warn or bad, or a file could
not be checked; 2 usage errors (raised as flatd.cli.UsageError by the caller).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from flatd.errors import FlatdError


@dataclass
class FlatRow:
    """One flat's figures and what the checks say about it."""

    path: Path
    levels: dict  # {channel or None: fraction of full scale}
    saturated: float  # the largest fraction (over channels) at full scale
    odd: Optional[float] = None  # the odd-frame-out score (noise units); None: not scored
    tilt: Optional[float] = None  # the tilt against its neighbours' trend (fraction); None: not scored
    findings: list = field(default_factory=list)

    @property
    def verdict(self) -> str:
        if any(f.leaves_out for f in self.findings):
            return "leave-out"
        return "warn" if self.findings else "ok"


@dataclass
class Outcome:
    """What `flatd qc` found: a problem anywhere makes exit 1."""

    problems: int = 0
    pictures: list = field(default_factory=list)


class QcUsage(FlatdError):
    """A command-line mistake (missing file, --against unusable as a path): exit 2."""


# --------------------------------------------------------------------------- reading


def read_inputs(paths: Sequence[Path], keywords) -> tuple[list, list, list]:
    """(flats, masters, bad (path, reason)): every path read as a header, sorted by kind."""
    from flatd.ingest.frames import FrameError, Kind, read_frame

    flats, masters, bad = [], [], []
    for path in paths:
        try:
            frame = read_frame(path, keywords)
        except FrameError as exc:
            bad.append((Path(path), exc.reason))
            continue
        if is_master(frame):
            masters.append(frame)
        elif frame.kind == Kind.FLAT:
            flats.append(frame)
        else:
            bad.append((Path(path), f"type {frame.kind.value}: neither a flat nor a master flat"))
    return flats, masters, bad


def is_master(frame) -> bool:
    """A master flat: IMAGETYP master (flat), or written by flatd (FLATDJOB) or a stacker (NCOMBINE)."""
    from flatd.ingest.frames import Kind

    headers = frame.headers or {}
    return frame.kind == Kind.MASTER or "FLATDJOB" in headers or "NCOMBINE" in headers


# --------------------------------------------------------------------------- flats


def flat_groups(frames: Sequence, rules) -> tuple[list, list]:
    """(groups, skipped): the flats grouped by the rules' grouping settings (any size)."""
    from dataclasses import replace

    from flatd.grouping import GroupOptions, group_frames

    options = replace(GroupOptions.from_settings(rules.grouping), min_group_size=1)
    return group_frames(frames, options)


def calibrations(group, rules, libraries) -> tuple[list, Optional[str]]:
    """Each flat's calibration by the rules (flatd.plan.calibrations_for); none, with the
    reason, when the rules' library has no match."""
    from flatd.calibration import Calibration
    from flatd.config import effective_for
    from flatd.plan import calibrations_for

    try:
        return calibrations_for(group.frames, effective_for(rules, group.frames[0]), libraries,
                                rules.keyword_map()), None
    except (FlatdError, OSError, ValueError) as exc:  # no match: checked uncalibrated, and said so
        return [Calibration() for _ in group.frames], f"uncalibrated ({exc})"


def flat_rows(inputs, samples, own, subtracted, step: int, shape, quality) -> list[FlatRow]:
    """Per flat: its levels and saturated fraction, the odd score, and its findings."""
    from flatd.qc import flats as F
    from flatd.stack.samples import check_samples

    rows, norms = [], []
    for i, item in enumerate(inputs):
        sample = samples[i].reshape(shape)
        channels = F.sample_channels(F.presented_layout(item.frame), shape, step)
        full = F.full_scale(item.frame)
        levels = F.channel_levels(sample, channels, own[i])
        threshold = F.saturation_threshold(full, *subtracted[i])
        saturated = max((float(np.count_nonzero(v >= threshold)) / v.size for _, v in F._parts(sample, channels)
                         if v.size), default=0.0)
        rows.append(FlatRow(item.frame.path, {k: v / full for k, v in levels.items()}, saturated))
        ok = all(math.isfinite(v) and v > 0 for v in levels.values())
        norms.append(F.normalized(sample, channels, levels) if ok else None)
    findings = check_samples(inputs, samples, own, subtracted, step, quality, shape)
    for row in rows:
        row.findings = [f for f in findings if f.path == row.path]
    _odd_scores(rows, norms, step, quality, [item.frame for item in inputs])
    return rows


def _odd_scores(rows: list[FlatRow], norms: list, step: int, quality, frames: list) -> None:
    """Each flat's odd-frame-out score and tilt against the others that pass level and saturation."""
    from flatd.qc import flats as F

    kept = [i for i, n in enumerate(norms) if n is not None
            and not any(f.leaves_out and f.check not in ("odd", "tilt") for f in rows[i].findings)]
    b = F.block_side(step)
    if len(kept) < F.ODD_MIN_FRAMES or min(norms[kept[0]].shape[0] // b, norms[kept[0]].shape[1] // b) < 2:
        return
    scores, tilts = F.odd_scores(np.stack([norms[i] for i in kept]), step, quality.odd_min_deviation,
                                 times=F.series_times([frames[i] for i in kept]))
    for i, score, tilt in zip(kept, scores, tilts):
        # a left-out frame: the figure it was left out with (the others were scored again without it)
        found = {f.check: f.figure for f in rows[i].findings}
        rows[i].odd = found.get("odd", score.z)
        if len(kept) >= F.TREND_MIN_FRAMES:
            rows[i].tilt = found.get("tilt", tilt.jump)


# --------------------------------------------------------------------------- masters


@dataclass
class MasterReport:
    """A master's checks: the MasterQC, the noise from its header, the comparison."""

    path: Path
    qc: object  # flatd.qc.masters.MasterQC
    image: np.ndarray
    layout: object = None
    header_noise: Optional[float] = None
    against: Optional[Path] = None
    comparison: object = None  # flatd.qc.previous.Comparison
    against_error: Optional[str] = None


def check_one_master(frame, quality, previous: Optional[tuple[Path, dict, np.ndarray]]) -> MasterReport:
    """The checks that need no inputs, and the comparison with `previous` (path, cards, pixels)."""
    from flatd.qc.masters import check_master
    from flatd.qc.previous import PreviousCheck, _settings, compare, load_master
    from flatd.qc.previews import master_layout

    cards, image = load_master(frame.path)
    layout = master_layout([frame], image.shape)
    report = MasterReport(frame.path, None, image, layout, _card_float(cards.get("QCNOISEX")))
    check = None
    if previous is not None:
        report.against = previous[0]
        try:
            report.comparison = compare(image, previous[2], **_settings(quality))
            check = PreviousCheck(previous[0], report.comparison)
        except (ValueError, MemoryError) as exc:
            report.against_error = str(exc)
    report.qc = check_master(image, quality, colour=layout is not None, previous=check)
    if report.against_error:
        report.qc.judge("warn", f"not compared with {previous[0].name}: {report.against_error}")
    return report


def _card_float(value) -> Optional[float]:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and number >= 0 else None


def load_against(path: Path) -> tuple[Path, dict, np.ndarray]:
    """(path, cards, pixels) of the --against master; ValueError with the reason."""
    from flatd.qc.previous import load_master

    if os.path.isdir(path):
        raise ValueError("a directory, not a master file")
    cards, pixels = load_master(Path(path))
    return Path(path), cards, pixels


# --------------------------------------------------------------------------- pictures


def write_pictures(report: MasterReport, directory: Path) -> list[Path]:
    """The master's preview (and the ratio picture after a comparison) in `directory`."""
    from flatd.qc.previews import master_preview, preview_paths, ratio_preview, write_png

    preview, ratio = (directory / p.name for p in preview_paths(report.path))
    flip = bool(report.layout.bottom_up) if report.layout is not None else False
    written = [write_png(preview, master_preview(report.image, report.layout, flip))]
    c = report.comparison
    if c is not None:
        written.append(write_png(ratio, ratio_preview(c.ratio, c.blobs, flip, binning=c.binning)))
    return written


# --------------------------------------------------------------------------- the command


def run_qc(paths: Sequence[Path], rules, console, against: Optional[Path] = None,
           pictures: Optional[Path] = None) -> int:
    """Check `paths` (flats and masters), print the figures and verdicts; the exit code."""
    from flatd.calibration import LibraryCache
    from flatd.qc import render

    check_usage(paths, against, pictures)
    quality = rules.quality
    flats, masters, bad = read_inputs(paths, rules.keyword_map())
    out = Outcome(problems=len(bad))
    for path, reason in bad:
        render.bad_file(console, path, reason)
    if flats:
        groups, skipped = flat_groups(flats, rules)
        for item in skipped:
            render.bad_file(console, item.path, item.reason)
        out.problems += len(skipped)
        libraries = LibraryCache()
        for group in groups:
            out.problems += _check_group(group, rules, quality, libraries, console)
    previous = _previous(against, console, out) if masters else None
    for frame in masters:
        out.problems += _check_master(frame, quality, previous, pictures, console, out)
    if not (flats or masters) and not bad:
        console.print("no flats or masters to check")
    render.summary(console, out)
    return 1 if out.problems else 0


def check_usage(paths: Sequence[Path], against: Optional[Path], pictures: Optional[Path]) -> None:
    """QcUsage for a path that does not exist, or a --pictures that is not a folder."""
    for path in [*paths, *([against] if against is not None else [])]:
        if not os.path.lexists(path):
            raise QcUsage(f"{path}: no such file")
    if pictures is not None and os.path.exists(pictures) and not os.path.isdir(pictures):
        raise QcUsage(f"--pictures {pictures}: exists and is not a folder")


def _check_group(group, rules, quality, libraries, console) -> int:
    """Read and check one group of flats, print its table; the number of flats left out."""
    from flatd.jobs import StackInput
    from flatd.qc import render
    from flatd.stack.samples import read_group

    cals, note = calibrations(group, rules, libraries)
    inputs = [StackInput(f, c) for f, c in zip(group.frames, cals)]
    try:
        samples, own, subtracted, step, shape = read_group(inputs)
    except (OSError, ValueError, FlatdError) as exc:
        render.bad_file(console, group.frames[0].path.parent, f"group {group.label}: cannot read: {exc}")
        return len(inputs)
    rows = flat_rows(inputs, samples, own, subtracted, step, shape, quality)
    render.flat_table(console, group, rows, note or _calibration_note(cals), quality)
    return sum(1 for r in rows if r.verdict == "leave-out")


def _calibration_note(cals) -> str:
    labels = sorted({c.label for c in cals})
    return "calibration: " + ", ".join(Path(x).name if os.sep in x else x for x in labels)


def _previous(against: Optional[Path], console, out: Outcome):
    """The --against master, or None (an unusable one is said and counted)."""
    from flatd.qc import render

    if against is None:
        return None
    try:
        return load_against(against)
    except ValueError as exc:
        render.bad_file(console, against, f"--against: {exc}")
        out.problems += 1
        return None


def _check_master(frame, quality, previous, pictures: Optional[Path], console, out: Outcome) -> int:
    """Check one master, print it, write its pictures; 1 when it is not good."""
    from flatd.qc import render

    try:
        report = check_one_master(frame, quality, previous)
    except ValueError as exc:
        render.bad_file(console, frame.path, str(exc))
        return 1
    render.master_report(console, report)
    if pictures is not None:
        Path(pictures).mkdir(parents=True, exist_ok=True)
        try:
            out.pictures += write_pictures(report, Path(pictures))
        except (OSError, ValueError, FlatdError) as exc:
            render.bad_file(console, frame.path, f"picture not written: {exc}")
    return 0 if report.qc.status == "good" else 1
