"""IRAF sections (BIASSEC, TRIMSEC, DATASEC) and each frame's layout: pure, no numpy.

Planning (a dry run included) reads a group's sections here to leave out flats that
would not fit their master and to name the master's trimmed size; the pixels are
handled by :mod:`flatd.stack.geometry`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Sequence

from flatd.ingest.frames import Frame

TOP_DOWN, BOTTOM_UP = "TOP-DOWN", "BOTTOM-UP"
OVERSCAN_MODES = ("auto", "off")
# The overscan model: a Legendre polynomial of this degree along the rows, fitted to the
# per-row medians of BIASSEC with iterative clipping at CLIP robust sigmas (IRAF ccdproc
# and astropy ccdproc's subtract_overscan(median=True, model=...) do the same).
OVERSCAN_DEGREE = 3
OVERSCAN_CLIP = 3.0
OVERSCAN_ITERATIONS = 5
# Rows read at a time while measuring the overscan
OVERSCAN_CHUNK_ROWS = 64
_MAX_SECTION_TEXT = 80
_AXIS = r"\s*(\*|[+-]?\d{1,12}\s*:\s*[+-]?\d{1,12})\s*"
_SECTION = re.compile(r"\[" + _AXIS + "," + _AXIS + r"\]")


class SectionError(ValueError):
    """A section keyword that cannot be used; the message says which and why."""


# --------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class Section:
    """A rectangle of stored pixels: 0-based, half-open columns x0:x1 and rows y0:y1."""

    x0: int
    x1: int
    y0: int
    y1: int

    @property
    def width(self) -> int:
        return self.x1 - self.x0

    @property
    def height(self) -> int:
        return self.y1 - self.y0

    def iraf(self) -> str:
        """The IRAF spelling: '[x1:x2,y1:y2]', 1-based and inclusive."""
        return f"[{self.x0 + 1}:{self.x1},{self.y0 + 1}:{self.y1}]"


def _axis(text: str, size: int, name: str) -> tuple[int, int]:
    if text == "*":
        return 0, size
    a, b = (int(part) for part in text.split(":"))
    lo, hi = min(a, b), max(a, b)  # a reversed range names the same pixels
    if lo < 1 or hi > size:
        raise SectionError(f"{name} range {a}:{b} is outside the image's 1:{size}")
    return lo - 1, hi


def parse_section(value: object, width: int, height: int) -> Section:
    """An IRAF section '[x1:x2,y1:y2]' (1-based, inclusive; '*' for a whole axis; a
    reversed range names the same pixels) inside a `width` x `height` image.
    SectionError says why not (not text, not a section, outside the image)."""
    if not isinstance(value, str):
        raise SectionError(f"{value!r} is not a section '[x1:x2,y1:y2]'")
    text = value.strip()
    if len(text) > _MAX_SECTION_TEXT:
        raise SectionError(f"{text[:20]!r}... is too long for a section")
    match = _SECTION.fullmatch(text)
    if match is None:
        raise SectionError(f"{text!r} is not a section '[x1:x2,y1:y2]'")
    (x0, x1), (y0, y1) = _axis(match[1].replace(" ", ""), width, "x"), _axis(match[2].replace(" ", ""), height, "y")
    return Section(x0, x1, y0, y1)


# --------------------------------------------------------------------------- layouts


@dataclass(frozen=True)
class Layout:
    """How one frame is presented: flipped or not, its overscan strip and data section."""

    flip: bool = False
    bias: Optional[Section] = None
    data: Optional[Section] = None
    data_key: str = ""
    problem: Optional[str] = None  # why the sections were not used

    @property
    def plain(self) -> bool:
        return not self.flip and self.data is None


def overscan_sections(frame: Frame) -> tuple[Optional[Section], Optional[Section], str]:
    """(BIASSEC, data section, its keyword) of `frame`; (None, None, '') without BIASSEC.
    The data section is TRIMSEC, else DATASEC. SectionError names the keyword at fault."""
    biassec = frame.header_value("BIASSEC")
    if biassec is None:
        return None, None, ""
    data_key = "TRIMSEC" if frame.header_value("TRIMSEC") is not None else "DATASEC"
    datasec = frame.header_value(data_key)
    if datasec is None:
        raise SectionError("BIASSEC without TRIMSEC or DATASEC: the data section is not known")
    sections = []
    for key, value in (("BIASSEC", biassec), (data_key, datasec)):
        try:
            sections.append(parse_section(value, frame.width, frame.height))
        except SectionError as exc:
            raise SectionError(f"{key} {exc}") from None
    bias, data = sections
    if bias.x1 > data.x0 and bias.x0 < data.x1:
        raise SectionError(f"BIASSEC {bias.iraf()} overlaps the columns of {data_key} {data.iraf()}")
    if bias.y0 > data.y0 or bias.y1 < data.y1:
        raise SectionError(f"BIASSEC {bias.iraf()} does not span the rows of {data_key} {data.iraf()} "
                           "(only an overscan of columns, fitted along the rows, is supported)")
    return bias, data, data_key


def frame_layout(frame: Frame, row_order: str, overscan: str = "auto") -> Layout:
    """The presentation of `frame` in a job whose flats have `row_order`."""
    flip = frame.row_order != row_order
    if overscan == "off":
        return Layout(flip=flip)
    try:
        bias, data, data_key = overscan_sections(frame)
    except SectionError as exc:
        return Layout(flip=flip, problem=str(exc))
    return Layout(flip=flip, bias=bias, data=data, data_key=data_key)


def screen_flats(frames: Sequence[Frame], overscan: str = "auto") -> tuple[list[Frame], list[tuple[Frame, str]]]:
    """(kept, left out with the reason): when some flats of a group are trimmed, the
    others (sections unusable, or missing) would not fit their master and are left out;
    when none is, all are kept and read as stored (the engine warns of unusable sections)."""
    if overscan == "off":
        return list(frames), []
    layouts = [frame_layout(f, f.row_order, overscan) for f in frames]
    trimmed = sum(layout.data is not None for layout in layouts)
    if trimmed == 0 or trimmed == len(frames):
        return list(frames), []
    kept, out = [], []
    for frame, layout in zip(frames, layouts):
        if layout.data is not None:
            kept.append(frame)
        else:
            why = layout.problem or "no BIASSEC"
            out.append((frame, f"overscan sections unusable ({why}) while {trimmed} flat(s) of its group "
                               "are trimmed by theirs"))
    return kept, out
