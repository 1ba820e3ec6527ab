"""The geometry layer on the pixel sources: row order and overscan.

A frame is *presented* to the engine as the flats of its job see it:

* **row order** — a frame whose ROWORDER differs from the job's (its first flat's) is
  flipped vertically, so a bottom-up bias is subtracted the right way up from top-down
  flats; the master keeps the flats' row order;
* **overscan** (``precalibration.overscan: auto``) — a frame that carries BIASSEC and
  TRIMSEC or DATASEC (IRAF sections, 1-based, inclusive) has its overscan level
  subtracted row by row (:func:`fit_overscan`) and is trimmed to TRIMSEC, else DATASEC.

:class:`GeometrySource` wraps whatever :func:`flatd.stack.pixels.open_pixels` returns
and has its interface (width, height, read_into, sample_grid, ...), in the presented
geometry. A frame that needs neither is opened as it is (:meth:`Layouts.open`), so the
fast path costs nothing. Unusable sections (garbage, reversed beyond the image, out of
it) are reported naming the file, and that frame is read without overscan; if that
leaves it a different size from the rest of its job, the job fails saying why.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Optional, Sequence

import numpy as np

from flatd.errors import StackError
from flatd.ingest.frames import Frame

if TYPE_CHECKING:  # pragma: no cover
    from flatd.jobs import StackInput

from flatd.stack.sections import (  # noqa: F401  (re-exported)
    BOTTOM_UP,
    Layout,
    OVERSCAN_CHUNK_ROWS,
    OVERSCAN_CLIP,
    OVERSCAN_DEGREE,
    OVERSCAN_ITERATIONS,
    OVERSCAN_MODES,
    Section,
    SectionError,
    TOP_DOWN,
    frame_layout,
    overscan_sections,
    parse_section,
    screen_flats,
)


# --------------------------------------------------------------------------- the overscan fit


def _robust_sigma(values: np.ndarray) -> float:
    return 1.4826 * float(np.median(np.abs(values - np.median(values))))


def fit_overscan(levels: np.ndarray, degree: int = OVERSCAN_DEGREE, clip: float = OVERSCAN_CLIP,
                 iterations: int = OVERSCAN_ITERATIONS) -> np.ndarray:
    """The overscan model along the rows, from `levels` (the per-row medians of the
    strip; NaN for a row without finite values): a Legendre polynomial of `degree`
    fitted by least squares, refitted without the rows beyond `clip` robust sigmas (1.4826
    MAD of the residuals) until nothing changes, as IRAF's ccdproc and astropy's
    ccdproc.subtract_overscan(median=True, model=Legendre1D) do. The per-row medians
    keep hot or dead overscan columns out; the fit keeps the read noise of a narrow
    strip, and a row hit by a cosmic ray, out of the level. Returns float64 per row."""
    levels = np.asarray(levels, dtype=np.float64)
    x = np.linspace(-1.0, 1.0, len(levels)) if len(levels) > 1 else np.zeros(len(levels))
    keep = np.isfinite(levels)
    if not keep.any():
        raise ValueError("the overscan strip has no finite values")
    coef = np.array([np.median(levels[keep])])
    for _ in range(iterations):
        deg = max(0, min(degree, int(keep.sum()) - 1))
        coef = np.polynomial.legendre.legfit(x[keep], levels[keep], deg)
        resid = levels - np.polynomial.legendre.legval(x, coef)
        sigma = _robust_sigma(resid[keep])
        new = np.isfinite(levels) & (np.abs(resid) <= clip * sigma if sigma > 0 else resid == 0)
        if new.sum() <= deg or np.array_equal(new, keep):
            break
        keep = new
    return np.polynomial.legendre.legval(x, coef)


def measure_overscan(source, bias: Section, chunk_rows: int = OVERSCAN_CHUNK_ROWS) -> np.ndarray:
    """Per stored row, the fitted overscan level of `source` (float32, NaN outside the
    strip's rows): the strip's per-row medians, then :func:`fit_overscan`. Read
    `chunk_rows` full rows at a time."""
    medians = np.full(bias.height, np.nan)
    buf = np.empty((min(chunk_rows, bias.height), source.width), dtype=np.float32)
    for r0 in range(bias.y0, bias.y1, chunk_rows):
        r1 = min(bias.y1, r0 + chunk_rows)
        band = buf[: r1 - r0]
        source.read_into(r0, r1, band)
        strip = band[:, bias.x0:bias.x1]
        finite = np.isfinite(strip).any(axis=1)
        if finite.any():
            medians[r0 - bias.y0:r1 - bias.y0][finite] = np.nanmedian(strip[finite], axis=1)
    level = np.full(source.height, np.nan, dtype=np.float32)
    level[bias.y0:bias.y1] = fit_overscan(medians)
    return level


# --------------------------------------------------------------------------- the wrapper


def _calibrate(out: np.ndarray, pedestal: Optional[float], cal: Optional[np.ndarray], factor: float) -> None:
    """What the fill kernels do after converting: minus `cal` or `pedestal`, clipped to
    [0, 65535] when anything was subtracted, times `factor` (float32 arithmetic)."""
    from flatd.stack.pixels import CLIP_MAX

    if cal is not None:
        np.subtract(out, cal, out=out)
        np.clip(out, 0.0, CLIP_MAX, out=out)
    elif pedestal is not None:
        np.subtract(out, np.float32(pedestal), out=out)
        np.clip(out, 0.0, CLIP_MAX, out=out)
    if factor != 1.0:
        np.multiply(out, np.float32(factor), out=out)


class GeometrySource:
    """A pixel source presented flipped and/or overscan-subtracted and trimmed.

    The interface of :class:`flatd.stack.pixels.PixelSource`: `width` and `height` are
    the presented (trimmed) size, row r of a flipped source is stored row H-1-r (of
    the data section), and read_into / sample_grid calibrate like the kernels."""

    def __init__(self, inner, layout: Layout):
        self.inner = inner
        self.layout = layout
        self.frame, self.path, self.itemsize = inner.frame, inner.path, inner.itemsize
        self.data = layout.data or Section(0, inner.width, 0, inner.height)
        self.width, self.height = self.data.width, self.data.height
        self._local = threading.local()
        self.level = None
        if layout.bias is not None:
            try:
                self.level = measure_overscan(inner, layout.bias)
            except ValueError as exc:
                raise StackError(f"{self.path}: BIASSEC {layout.bias.iraf()}: {exc}", self.path) from None

    def __getattr__(self, name: str):
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def close(self) -> None:
        self.inner.close()

    def __enter__(self) -> "GeometrySource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def raw_bytes(self, r0: int, r1: int) -> int:
        return self.inner.raw_bytes(r0, r1)

    def _stored(self, r0: int, r1: int) -> tuple[int, int]:
        """The stored rows of presented rows r0:r1."""
        if self.layout.flip:
            r0, r1 = self.height - r1, self.height - r0
        return self.data.y0 + r0, self.data.y0 + r1

    def _full(self, rows: int) -> np.ndarray:
        """This thread's full-width float32 buffer of `rows` rows."""
        buf = getattr(self._local, "buf", None)
        if buf is None or buf.shape[0] < rows:
            buf = self._local.buf = np.empty((rows, self.inner.width), dtype=np.float32)
        return buf[:rows]

    def read_into(self, r0: int, r1: int, out: np.ndarray, pedestal: Optional[float] = None,
                  cal: Optional[np.ndarray] = None, factor: float = 1.0,
                  scratch: Optional[np.ndarray] = None) -> None:
        """PixelSource.read_into in the presented geometry."""
        if not (0 <= r0 <= r1 <= self.height):
            raise ValueError(f"rows {r0}:{r1} outside 0:{self.height}")
        if r1 == r0:
            return
        s0, s1 = self._stored(r0, r1)
        if self.layout.data is None:  # a flip only: the kernel calibrates, flipped back after
            flipped = np.ascontiguousarray(cal[::-1]) if cal is not None else None
            self.inner.read_into(s0, s1, out, pedestal=pedestal, cal=flipped, factor=factor, scratch=scratch)
            out[:] = out[::-1]
            return
        full = self._full(s1 - s0)
        self.inner.read_into(s0, s1, full, scratch=scratch)
        band = full[:, self.data.x0:self.data.x1]
        if self.level is not None:
            np.subtract(band, self.level[s0:s1, None], out=band)
        out[:] = band[::-1] if self.layout.flip else band
        _calibrate(out, pedestal, cal, factor)

    def rows(self, r0: int, r1: int) -> np.ndarray:
        out = np.empty((r1 - r0, self.width), dtype=np.float32)
        self.read_into(r0, r1, out)
        return out

    def sample_grid(self, step: int, pedestal: Optional[float] = None, cal: Optional[np.ndarray] = None,
                    chunk_rows: int = 8) -> np.ndarray:
        """PixelSource.sample_grid in the presented geometry (rows read one at a time)."""
        from flatd.stack.levels import grid_slices

        rows_sl, cols_sl = grid_slices(self.height, self.width, step)
        rows = range(*rows_sl.indices(self.height))
        out = np.empty((len(rows), len(range(*cols_sl.indices(self.width)))), dtype=np.float32)
        line = np.empty((1, self.width), dtype=np.float32)
        for k, r in enumerate(rows):
            self.read_into(r, r + 1, line)
            out[k] = line[0, cols_sl]
        _calibrate(out, pedestal, cal, 1.0)
        return out


# --------------------------------------------------------------------------- a job's layouts


@dataclass
class GeometryCards:
    """What the master's header says about its geometry (see :meth:`apply`)."""

    cards: list = field(default_factory=list)  # (key, value, comment)
    history: list = field(default_factory=list)
    remove: tuple = ()
    origin: tuple = (0, 0)  # (x0, y0): the stored pixel that is the master's first, after a trim

    def apply(self, header) -> None:
        """Write the cards into an astropy header: keys removed, cards set, HISTORY added."""
        for key in self.remove:
            header.remove(key, ignore_missing=True, remove_all=True)
        for key, value, comment in self.cards:
            header[key] = (value, comment)
        for line in self.history:
            header.add_history(line)


def _key(frame: Frame) -> str:
    return os.path.abspath(frame.path)


class Layouts:
    """The layout of every frame of a job (its flats and their calibration frames)."""

    def __init__(self, inputs: Sequence["StackInput"], overscan: str = "auto"):
        if overscan not in OVERSCAN_MODES:
            raise ValueError(f"overscan is 'auto' or 'off', got {overscan!r}")
        self.row_order = inputs[0].frame.row_order if inputs else TOP_DOWN
        self.flats = [i.frame for i in inputs]
        self.cals = {_key(i.calibration.frame): i.calibration.frame for i in inputs
                     if i.calibration.mode == "file" and i.calibration.frame is not None}
        self.by_path = {_key(f): frame_layout(f, self.row_order, overscan)
                        for f in [*self.flats, *self.cals.values()]}

    def of(self, frame: Frame) -> Layout:
        return self.by_path.get(_key(frame)) or Layout()

    @property
    def plain(self) -> bool:
        return all(layout.plain for layout in self.by_path.values())

    def size(self, frame: Frame) -> tuple[int, int]:
        """(width, height) of `frame` as presented."""
        data = self.of(frame).data
        return (data.width, data.height) if data is not None else (frame.width, frame.height)

    def note(self, frame: Frame) -> str:
        """Why `frame` was not trimmed, for an error about its size ('' if nothing)."""
        problem = self.of(frame).problem
        return f" (not trimmed: {problem})" if problem else ""

    def problems(self) -> Iterable[tuple[Path, str]]:
        for frame in [*self.flats, *self.cals.values()]:
            problem = self.of(frame).problem
            if problem:
                yield frame.path, problem

    def open(self, frame: Frame):
        """The frame's pixel source as presented; open_pixels' own when nothing applies."""
        from flatd.stack.pixels import open_pixels

        source = open_pixels(frame)
        layout = self.of(frame)
        if layout.plain:
            return source
        try:
            return GeometrySource(source, layout)
        except BaseException:
            source.close()
            raise

    def cards(self) -> Optional[GeometryCards]:
        """The master's geometry cards; None when no frame was flipped or trimmed and no
        flat says its row order."""
        out = GeometryCards()
        if any("ROWORDER" in f.headers for f in self.flats):
            out.cards.append(("ROWORDER", self.row_order, "row order of the flats"))
        for frame in self.cals.values():
            if self.of(frame).flip:
                out.history.append(f"{frame.path.name} ({frame.row_order}) flipped to the flats' {self.row_order}")
        self._overscan_cards(out)
        return out if (out.cards or out.history) else None

    def _overscan_cards(self, out: GeometryCards) -> None:
        trimmed = [(f, self.of(f)) for f in self.flats if self.of(f).data is not None]
        if not trimmed:
            return
        frame, layout = trimmed[0]
        w, h = layout.data.width, layout.data.height
        kinds = sorted({(lay.bias.iraf(), lay.data_key, lay.data.iraf()) for _, lay in trimmed})
        same = len(kinds) == 1
        out.remove = ("BIASSEC", "TRIMSEC")
        out.cards += [
            ("OVERSCAN", f"BIASSEC {layout.bias.iraf()}" if same else "BIASSEC of each input",
             "overscan subtracted, per-row fit"),
            ("TRIM", f"{layout.data_key} {layout.data.iraf()}" if same else "data section of each input",
             "inputs trimmed to"),
            ("DATASEC", f"[1:{w},1:{h}]", "the whole master is data"),
        ]
        if same:
            out.origin = (layout.data.x0, layout.data.y0)
        if frame.bayer_pattern and same:  # the mosaic's phase moves with the trim's first pixel
            xoff, yoff = frame.bayer_offset
            out.cards += [("XBAYROFF", (xoff + layout.data.x0) % 2, "Bayer x offset, after the trim"),
                          ("YBAYROFF", (yoff + layout.data.y0) % 2, "Bayer y offset, after the trim")]
        for bias, key, data in kinds:
            out.history.append(f"overscan: per-row median of BIASSEC {bias}, Legendre degree {OVERSCAN_DEGREE} "
                               f"fit clipped at {OVERSCAN_CLIP:g} sigma, subtracted; trimmed to {key} {data}")
