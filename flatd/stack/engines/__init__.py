"""The engine seam: the runner asks an engine for a master, ``engine.stack(job) -> StackResult``.

Engine settings (``engine:`` in the rules file: kind, memory_limit, workers) travel in
one object, :class:`flatd.config.Engine`, handed to :func:`make_engine`. ``local`` is
the streaming stacker (:mod:`flatd.stack.engines.local`); ``dask`` hands each group to a
Dask cluster (:mod:`flatd.stack.engines.dask`).
Light: the engine itself (numpy, the compiled kernels) is imported only when one is made.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Optional, Protocol

from flatd.errors import FlatdError, StackError

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

    from flatd.config import Engine as EngineSettings
    from flatd.jobs import Job
    from flatd.stack.geometry import GeometryCards

__all__ = ["Engine", "ProgressFactory", "StackError", "StackResult", "make_engine"]

# progress(label, rows) -> update(rows_done, rows): called after every band. A
# BaseException raised from update cuts the job short (the service's stop).
ProgressFactory = Callable[[str, int], Callable[[int, int], None]]


@dataclass
class StackResult:
    """A master's pixels and what the engine measured on the way."""

    image: "np.ndarray"  # (H, W) float32
    levels: list[float]  # per input, after calibration, before normalization
    factors: list[float]  # normalization factors applied (all 1.0 for "none")
    band_rows: int
    # per input, the values rejected low ([:, 0]) and high ([:, 1]): int64 (N, 2); None if not counted
    rejected: Optional["np.ndarray"] = None
    # per pixel, how many values were rejected low ([0]) and high ([1]): uint16 (2, H, W); None unless asked
    rejection_map: Optional["np.ndarray"] = None
    # what the master's header says of its geometry (row order, overscan, trim): flatd.stack.geometry
    geometry: Optional["GeometryCards"] = None
    # the same central rows (noise_rows: r0, r1) of the first few inputs (up to 4), calibrated,
    # not normalized: float32 (k, rows, W); the master checks' photon-transfer noise (flatd.qc.masters)
    noise_patches: Optional["np.ndarray"] = None
    noise_rows: Optional[tuple[int, int]] = None
    # the flat checks (flatd.qc.flats.Finding), leave-out and warn alike, and the indices of
    # the inputs combined (None: all of them); levels, factors and rejected are of those
    findings: list = field(default_factory=list)
    kept: Optional[list[int]] = None

    def rejected_fractions(self) -> Optional[tuple[float, float]]:
        """The fractions of all values (N x H x W) rejected low and high; None if not counted."""
        if self.rejected is None:
            return None
        total = len(self.levels) * self.image.size
        low, high = (int(x) for x in self.rejected.sum(axis=0))
        return (low / total, high / total) if total else (0.0, 0.0)

    def frame_fractions(self) -> Optional[list[tuple[float, float]]]:
        """Per input, the fractions of its values rejected low and high; None if not counted."""
        if self.rejected is None:
            return None
        size = self.image.size or 1
        return [(int(lo) / size, int(hi) / size) for lo, hi in self.rejected]


class Engine(Protocol):
    def stack(self, job: "Job") -> StackResult:
        """Calibrate, normalize and combine the job's inputs; StackError says why not."""


def make_engine(settings: Optional["EngineSettings"] = None, progress: Optional[ProgressFactory] = None) -> Engine:
    """The engine `settings` (the rules' ``engine:``; defaults when None) asks for."""
    if settings is None:
        from flatd.config import Engine as EngineSettings

        settings = EngineSettings()
    if settings.kind == "local":
        from flatd.stack.engines.local import LocalEngine

        return LocalEngine(settings, progress)
    if settings.kind == "dask":
        from flatd.stack.engines.dask import DaskEngine

        return DaskEngine(settings, progress)
    raise FlatdError(f"engine.kind {settings.kind!r} is not known; the engines are: local, dask")
