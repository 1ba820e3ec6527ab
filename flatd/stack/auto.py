"""`method: auto`: the combine method and its thresholds, chosen from a group's number of frames.

`auto` is not a kernel: planning resolves it, group by group, into a registered method
(flatd.plan calls :func:`choose`), and the dry run and the master header say what was
chosen and why. Pure: imports neither numpy nor numba.

The choice is one table, :data:`TABLE`, read in order: the first row whose range holds
the number of frames wins. Thresholds the rules file gives (``combine.low``,
``combine.high``) replace the row's, where they are valid for its method. A row whose
method is not registered in this flatd falls back to :data:`FALLBACK`, and the reason
says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from flatd.stack import methods
from flatd.stack.methods import Method, format_z

AUTO = "auto"


@dataclass(frozen=True)
class Choice:
    """One row of the table: groups of `least` to `most` frames (None: no upper bound)."""

    least: int
    most: Optional[int]
    method: str
    params: Mapping[str, Any] = field(default_factory=dict)
    why: str = ""

    def holds(self, n: int) -> bool:
        return n >= self.least and (self.most is None or n <= self.most)

    @property
    def span(self) -> str:
        return f"{self.least}+ frames" if self.most is None else (
            f"{self.least} to {self.most} frames" if self.least > 1 else f"up to {self.most} frames")


# Chosen with the quality benchmark (bench/quality.py; its figures are in the README):
# for each group size, the method whose RMS error and worst pixel were both closest to
# the photon-noise floor across the scenarios of that size.
TABLE: tuple[Choice, ...] = (
    Choice(1, 4, "median", {},
           "too few values per pixel to estimate a spread: the median keeps the worst pixel lowest"),
    Choice(5, 7, "esd", {"esd_outliers": 0.3, "esd_significance": 0.08, "esd_low": 1.5},
           "a small stack: the generalized ESD test removes up to 30 % outliers, pixels hit twice included; "
           "significance 0.08 and low relaxation 1.5 gave the lowest worst pixel at the floor's RMS"),
    Choice(8, None, "winsorized", {"low": 4.0, "high": 4.0},
           "winsorized sigma clipping at 4 sigma: within 1-6 % of the photon-noise floor with cosmic rays, "
           "stars, gradients and clouds"),
)

# When a row's method is not registered: the median works for any number of frames.
FALLBACK = Choice(1, None, "median", {}, "")


def row_for(n_frames: int, table: tuple[Choice, ...] = TABLE) -> Choice:
    """The row of `table` for a group of n_frames."""
    for row in table:
        if row.holds(n_frames):
            return row
    raise ValueError(f"the auto table has no row for {n_frames} frames")


def params_text(method: Method) -> str:
    """The method and its parameters as the dry run shows them: "winsorized low 3.0 high 3.0"."""
    parts = [method.name]
    for key, value in method.params.items():
        parts.append(f"{key} {format_z(value) if isinstance(value, float) else value}")
    return " ".join(parts)


def choose(n_frames: int, settings: Any = None, table: tuple[Choice, ...] = TABLE) -> tuple[Method, str]:
    """(method, reason) for a group of n_frames. `settings`: the rules' combine section
    (CombineSettings): its low/high, when given (not None), replace the row's thresholds
    where the chosen method takes them and the value is valid for it."""
    row = row_for(n_frames, table)
    notes = []
    if row.method not in methods.names():
        notes.append(f"{row.method} is not available in this flatd: {FALLBACK.method} instead")
        row = Choice(row.least, row.most, FALLBACK.method, FALLBACK.params, row.why)
    entry = methods.get(row.method)
    values = dict(row.params)
    for key in ("low", "high"):
        given = getattr(settings, key, None) if settings is not None else None
        param = entry.param(key)
        if given is None or param is None:
            continue
        try:
            values[key] = param.validate(given)
        except ValueError as exc:
            notes.append(f"combine.{key} {given} does not suit {row.method} ({exc}): the table's kept")
        else:
            notes.append(f"{key} {format_z(values[key])} from the rules file")
    values = {k: v for k, v in values.items() if entry.param(k) is not None}
    method = Method(row.method, **values)
    reason = f"{n_frames} frames; {row.span}: {row.why}" + "".join(f"; {note}" for note in notes)
    return method, reason


def describe(method: Method, reason: str) -> str:
    """The dry run's line: "auto: winsorized low 3.0 high 3.0 (15 frames; ...)"."""
    return f"auto: {params_text(method)} ({reason})"
