"""What planning hands to an engine: a Job and its inputs.

Plain dataclasses, imported by planning and by the engines alike (no numba, no astropy).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from flatd.calibration import Calibration
from flatd.ingest.frames import Frame

if TYPE_CHECKING:  # pragma: no cover
    from flatd.stack.methods import Method
    from flatd.grouping import Group


@dataclass(frozen=True)
class StackInput:
    """One flat and what is subtracted from it."""

    frame: Frame
    calibration: Calibration = field(default_factory=Calibration)


@dataclass(frozen=True)
class Job:
    """One group to combine into one master."""

    id: str
    group: "Group"
    rule: Optional[str]
    method: "Method"
    normalize: str
    inputs: tuple[StackInput, ...]
    output_dir: Path
    output_name: str
    move_to: Optional[str]
    # method: auto: why this method was chosen (None: the rules named the method)
    auto_reason: Optional[str] = None
    # output.rejection_map: the master gets the per-pixel rejection counts (REJMAP)
    rejection_map: bool = False
    # combine.rejection_warn: warn when the fraction rejected exceeds what the method
    # rejects from clean data at this number of frames (flatd.stack.baseline) by more
    # than this (None: never, and no baseline is measured)
    rejection_warn: Optional[float] = 0.005
    # output.carry: header keywords copied into the master when every input agrees
    # (None: flatd.output.carry.DEFAULT_CARRY)
    carry: Optional[tuple[str, ...]] = None
    # combine.equalize_cfa: a colour master's CFA channels scaled to one mean
    equalize_cfa: bool = False
    # precalibration.overscan: auto subtracts the overscan and trims frames that carry
    # BIASSEC and TRIMSEC/DATASEC (flatd.stack.geometry); off reads them as stored
    overscan: str = "auto"
    # the rules' quality section (flatd.config.Quality): the master checks' limits
    # (flatd.qc.masters); None: the defaults
    quality: Optional[Any] = None
    # output.previews: a PNG preview beside the master (flatd.qc.previews)
    previews: bool = True
    # grouping.min_group_size: fewer flats left after the flat checks (flatd.qc.flats,
    # which also read `quality`) and the group is not combined
    min_group_size: int = 1

    @property
    def label(self) -> str:
        return self.group.label

    @property
    def frames(self) -> tuple[Frame, ...]:
        return tuple(i.frame for i in self.inputs)
