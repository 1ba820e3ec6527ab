"""Streaming a group of flats through calibration and combine, in row bands.

Two passes over the files:

1. (levels) every input's level is measured on the rows that ``combine.level_rows``
   picks, after its calibration; with multiplicative normalization the factors follow.
2. (bands) the image is cut into bands of rows; a worker thread fills a float32
   (N, rows, W) stack from each file's band (BZERO/BSCALE, minus the dark, bias or
   pedestal, clipped to [0, 65535] when something was subtracted, times the factor),
   combines it, and writes the rows into the output image. `workers` bands are in
   flight at once; the band height follows from the memory limit.

Uncompressed files are read with positional reads (``os.preadv``) straight into a
per-worker buffer: the reads release the GIL, nothing stays mapped (a file-backed
memory map would count every page read towards the resident size, and a file
truncated under a map kills the process with SIGBUS; a short read is just an error).
Big-endian integers are swapped and scaled in a numba kernel. Tile-compressed files
(``.fits.fz``) are read through astropy's section interface, one band at a time.
"""

from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
from numba import njit

from flatd.calibration import Calibration
from flatd.combine import (Method, check_level, combine_rows_into, default_workers, frame_level, level_rows,
                           normalization_factors)
from flatd.frames import Frame

CLIP_MAX = 65535.0
DEFAULT_MEMORY_LIMIT = 512 * 2**20
# Memory not in any accounted buffer (level samples, numba scratch, Python objects).
RESERVE_BYTES = 4 * 2**20
# Band height cap: beyond this, bigger bands only cost cache and parallelism.
MAX_BAND_ROWS = 32

_BITPIX_DTYPES = {8: ">u1", 16: ">i2", 32: ">i4", 64: ">i8", -32: ">f4", -64: ">f8"}


class StackError(Exception):
    """A group that cannot be stacked; the message names the file and the reason."""

    def __init__(self, message: str, path: Optional[Path] = None):
        super().__init__(message)
        self.path = Path(path) if path is not None else None


@dataclass(frozen=True)
class StackInput:
    frame: Frame
    calibration: Calibration = field(default_factory=Calibration)


@dataclass
class StackResult:
    image: np.ndarray  # (H, W) float32
    levels: list[float]  # per input, after calibration, before normalization
    factors: list[float]  # normalization factors applied (all 1.0 for "none")
    band_rows: int


# --------------------------------------------------------------------------- kernels


@njit(nogil=True, cache=True)
def _calibrate_row(dst, mode, cal_row, ped, factor):
    w = dst.shape[0]
    if mode == 1:
        for c in range(w):
            x = dst[c] - ped
            if x < 0:
                x = np.float32(0.0)
            elif x > CLIP_MAX:
                x = np.float32(CLIP_MAX)
            dst[c] = x
    elif mode == 2:
        for c in range(w):
            x = dst[c] - cal_row[c]
            if x < 0:
                x = np.float32(0.0)
            elif x > CLIP_MAX:
                x = np.float32(CLIP_MAX)
            dst[c] = x
    if factor != 1.0:
        for c in range(w):
            dst[c] = dst[c] * factor


@njit(nogil=True, cache=True)
def _fill_be16(raw, out, scale, zero, mode, cal, ped, factor):
    """out = calibrate(float32(int16_be(raw) * scale + zero)); raw: native uint16 view."""
    rows, w = out.shape
    for r in range(rows):
        src = raw[r]
        dst = out[r]
        for c in range(w):
            u = np.int32(src[c])
            v = ((u & 0xFF) << 8) | (u >> 8)
            v = v - ((v & 0x8000) << 1)
            dst[c] = np.float32(v * scale + zero)
        _calibrate_row(dst, mode, cal[r], ped, factor)


@njit(nogil=True, cache=True)
def _fill_native(raw, out, scale, zero, mode, cal, ped, factor):
    """out = calibrate(float32(raw * scale + zero)); raw: any native numeric array."""
    rows, w = out.shape
    for r in range(rows):
        src = raw[r]
        dst = out[r]
        for c in range(w):
            dst[c] = np.float32(np.float64(src[c]) * scale + zero)
        _calibrate_row(dst, mode, cal[r], ped, factor)


# --------------------------------------------------------------------------- pixel sources


class PixelSource:
    """The pixels of one frame, opened once; row bands on demand (thread-safe)."""

    def __init__(self, frame: Frame):
        self.frame = frame
        self.path = Path(frame.path)
        self.width = int(frame.width)
        self.height = int(frame.height)
        if frame.bitpix not in _BITPIX_DTYPES:
            raise StackError(f"{self.path}: unsupported BITPIX {frame.bitpix}", self.path)
        self.dtype = np.dtype(_BITPIX_DTYPES[frame.bitpix])
        self.itemsize = self.dtype.itemsize
        self._fd: Optional[int] = None
        self._hdul = None
        self._section = None
        self._lock = threading.Lock()
        if frame.compressed:
            self._open_compressed()
        else:
            self._open_plain()

    # ---- opening
    def _open_fd(self) -> int:
        try:
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        except OSError as exc:
            raise StackError(f"{self.path}: cannot open: {exc.strerror or exc}", self.path) from None
        try:
            self._check_planned(fd)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _check_planned(self, fd: int) -> None:
        """The open file is the one that was planned: same inode, size and mtime, and the
        same header. A file replaced or rewritten since (a LIGHT, another size) is refused."""
        from flatd.frames import FrameError, read_header_from
        from flatd.fsops import FileIdentity

        if not self.frame.inode:
            return  # a frame not read from a file (tests, header dumps)
        planned = FileIdentity(self.frame.device, self.frame.inode, self.frame.file_size, self.frame.mtime)
        changes = planned.differences(os.fstat(fd))
        if not changes:
            try:
                cards, _ = read_header_from(fd, self.path)
            except FrameError as exc:
                changes = [f"header unreadable: {exc.reason}"]
            else:
                if not _same_cards(cards, self.frame.headers):
                    changes = ["header rewritten"]
        if changes:
            raise StackError(f"{self.path} changed since it was planned ({', '.join(changes)}); "
                             "this group is not made and nothing is moved", self.path)

    def _open_plain(self) -> None:
        self._fd = self._open_fd()
        need = self.frame.data_offset + self.width * self.height * self.itemsize
        size = os.fstat(self._fd).st_size
        if size < need:
            self.close()
            raise StackError(f"{self.path}: truncated: the image needs {need} bytes, the file has {size}", self.path)

    def _open_compressed(self) -> None:
        from astropy.io import fits

        fd = self._open_fd()
        try:
            self._hdul = fits.open(os.fdopen(fd, "rb"), memmap=False, lazy_load_hdus=True)
            hdu = self._hdul[self.frame.hdu_index]
            self._section = hdu.section
            shape = hdu.shape
        except Exception as exc:  # astropy raises many kinds
            self.close()
            raise StackError(f"{self.path}: cannot read compressed image: {exc}", self.path) from None
        if tuple(shape[-2:]) != (self.height, self.width):
            self.close()
            raise StackError(f"{self.path}: compressed image is {shape}, header says {self.width}x{self.height}", self.path)
        self._planes = len(shape) == 3

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._hdul is not None:
            self._hdul.close()
            self._hdul = None
            self._section = None

    def __enter__(self) -> "PixelSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- reading
    def raw_bytes(self, r0: int, r1: int) -> int:
        return (r1 - r0) * self.width * self.itemsize

    def _read_plain(self, r0: int, r1: int, scratch: Optional[np.ndarray]) -> np.ndarray:
        nbytes = self.raw_bytes(r0, r1)
        if scratch is None or scratch.nbytes < nbytes:
            scratch = np.empty(nbytes, dtype=np.uint8)
        buf = scratch[:nbytes]
        self._pread_exact(memoryview(buf), self.frame.data_offset + r0 * self.width * self.itemsize)
        return buf

    def _pread_exact(self, view: memoryview, offset: int) -> None:
        nbytes = len(view)
        done = 0
        while done < nbytes:
            if self._fd is None:
                raise StackError(f"{self.path}: read after close", self.path)
            try:
                got = os.preadv(self._fd, [view[done:]], offset + done)
            except OSError as exc:
                raise StackError(f"{self.path}: read error: {exc.strerror or exc}", self.path) from None
            if got <= 0:
                raise StackError(f"{self.path}: file ended early (truncated while reading?)", self.path)
            done += got

    def _native_band(self, r0: int, r1: int, scratch: Optional[np.ndarray]):
        """The band as a native array for a fill kernel, and the kernel, scale and zero."""
        rows = r1 - r0
        if self._section is not None:
            with self._lock:
                try:
                    data = self._section[0, r0:r1, :] if self._planes else self._section[r0:r1, :]
                except Exception as exc:
                    raise StackError(f"{self.path}: cannot decompress rows {r0}-{r1}: {exc}", self.path) from None
            data = np.ascontiguousarray(data)
            if data.dtype.byteorder not in ("=", "|"):
                data = data.astype(data.dtype.newbyteorder("="))
            return _fill_native, data.reshape(rows, self.width), 1.0, 0.0
        return self._native_plain(self._read_plain(r0, r1, scratch), rows)

    def _native_plain(self, buf: np.ndarray, rows: int):
        scale, zero = float(self.frame.bscale), float(self.frame.bzero)
        if self.frame.bitpix == 16:
            return _fill_be16, buf.view(np.uint16).reshape(rows, self.width), scale, zero
        if self.frame.bitpix == 8:
            return _fill_native, buf.reshape(rows, self.width), scale, zero
        native = buf.view(self.dtype)
        native.byteswap(inplace=True)
        return _fill_native, native.view(self.dtype.newbyteorder("=")).reshape(rows, self.width), scale, zero

    def read_into(self, r0: int, r1: int, out: np.ndarray, pedestal: Optional[float] = None,
                  cal: Optional[np.ndarray] = None, factor: float = 1.0,
                  scratch: Optional[np.ndarray] = None) -> None:
        """Fill the float32 (r1-r0, W) `out` with the band's values, minus `cal` (an
        array of the band's shape) or `pedestal`, clipped to [0, 65535] if anything
        was subtracted, times `factor`. `scratch`: a uint8 buffer for the raw bytes."""
        if not (0 <= r0 <= r1 <= self.height):
            raise ValueError(f"rows {r0}:{r1} outside 0:{self.height}")
        if r1 == r0:
            return
        kernel, raw, scale, zero = self._native_band(r0, r1, scratch)
        if cal is not None:
            mode, cal_arr, ped = 2, cal, np.float32(0.0)
        elif pedestal is not None:
            mode, cal_arr, ped = 1, out, np.float32(pedestal)
        else:
            mode, cal_arr, ped = 0, out, np.float32(0.0)
        kernel(raw, out, scale, zero, mode, cal_arr, ped, np.float32(factor))

    def rows(self, r0: int, r1: int) -> np.ndarray:
        """Rows r0..r1 as float32 (r1-r0, W), BZERO/BSCALE applied."""
        out = np.empty((r1 - r0, self.width), dtype=np.float32)
        self.read_into(r0, r1, out)
        return out

    def sample_rows(self, rows: slice, pedestal: Optional[float] = None, cal: Optional[np.ndarray] = None,
                    scratch: Optional[np.ndarray] = None) -> np.ndarray:
        """The rows a slice picks, as float32 (k, W), calibrated like read_into."""
        indices = range(*rows.indices(self.height))
        out = np.empty((len(indices), self.width), dtype=np.float32)
        if rows.step in (None, 1):
            if len(indices):
                self.read_into(indices[0], indices[-1] + 1, out, pedestal, cal, scratch=scratch)
            return out
        if self._section is None and len(indices):
            # One pread per row into one buffer, then one conversion: the per-row
            # Python overhead of read_into would dominate for 256 rows x many frames.
            row_bytes = self.raw_bytes(0, 1)
            buf = np.empty(len(indices) * row_bytes, dtype=np.uint8)
            view = memoryview(buf)
            for k, r in enumerate(indices):
                self._pread_exact(view[k * row_bytes:(k + 1) * row_bytes], self.frame.data_offset + r * row_bytes)
            kernel, raw, scale, zero = self._native_plain(buf, len(indices))
            mode, cal_arr, ped = (2, cal, np.float32(0.0)) if cal is not None else (
                (1, out, np.float32(pedestal)) if pedestal is not None else (0, out, np.float32(0.0)))
            kernel(raw, out, scale, zero, mode, cal_arr, ped, np.float32(1.0))
            return out
        for k, r in enumerate(indices):
            self.read_into(r, r + 1, out[k : k + 1], pedestal, None if cal is None else cal[k : k + 1], scratch=scratch)
        return out


def _same_cards(a, b) -> bool:
    """Header cards equal, NaN values included."""
    if a.keys() != b.keys():
        return False
    return all(x == y or (x != x and y != y) for x, y in ((a[k], b[k]) for k in a))


def open_pixels(frame: Frame) -> PixelSource:
    """Open a frame's pixels once; .rows(r0, r1) gives float32 bands; .close()."""
    return PixelSource(frame)


def read_image(frame: Frame) -> np.ndarray:
    """The whole image as float32 (H, W) with BZERO/BSCALE applied (for small uses)."""
    with open_pixels(frame) as src:
        return src.rows(0, src.height)


def mean_adu(frame: Frame, chunk_bytes: int = 8 * 2**20) -> float:
    """The mean pixel value (BZERO/BSCALE applied), read in bands of bounded size."""
    with open_pixels(frame) as src:
        step = max(1, chunk_bytes // max(1, src.width * 4))
        total = 0.0
        scratch = None
        out = np.empty((min(step, src.height), src.width), dtype=np.float32)
        for r0 in range(0, src.height, step):
            r1 = min(src.height, r0 + step)
            if scratch is None:
                scratch = np.empty(src.raw_bytes(r0, r1), dtype=np.uint8)
            band = out[: r1 - r0]
            src.read_into(r0, r1, band, scratch=scratch)
            total += float(np.sum(band, dtype=np.float64))
        return total / (src.width * src.height)


# --------------------------------------------------------------------------- stacking


def _shape_text(frame: Frame) -> str:
    return f"{frame.width}x{frame.height}"


def _validate(inputs: Sequence[StackInput], method: Method) -> None:
    if not inputs:
        raise StackError("no frames to stack")
    if len(inputs) < method.min_frames:
        raise StackError(f"{method.description} needs at least {method.min_frames} frames, got {len(inputs)}")
    first = inputs[0].frame
    for item in inputs:
        frame = item.frame
        if (frame.width, frame.height) != (first.width, first.height):
            raise StackError(
                f"flat {frame.path} is {_shape_text(frame)} but flats are {_shape_text(first)} (as {first.path})",
                frame.path,
            )
        cal = item.calibration
        if cal.mode == "file":
            if cal.frame is None:
                raise StackError(f"flat {frame.path}: calibration mode 'file' without a frame", frame.path)
            if (cal.frame.width, cal.frame.height) != (first.width, first.height):
                word = "bias" if cal.frame.kind.value == "bias" else "dark"
                raise StackError(
                    f"{word} {cal.frame.path} is {_shape_text(cal.frame)} but flats are {_shape_text(first)}",
                    cal.frame.path,
                )
        elif cal.mode == "pedestal":
            if not math.isfinite(float(cal.pedestal)):
                raise StackError(f"flat {frame.path}: pedestal {cal.pedestal} is not a number", frame.path)
        elif cal.mode != "none":
            raise StackError(f"flat {frame.path}: unknown calibration mode {cal.mode!r}", frame.path)


def plan_bands(n: int, n_cal: int, width: int, height: int, memory_limit: int, workers: int,
               max_itemsize: int = 8) -> tuple[int, int]:
    """(band_rows, workers) so that the buffers fit in `memory_limit`.

    Per worker and per row of band: the float32 stack N*W*4, each calibration band
    W*4, the raw read buffer W*itemsize and a conversion temporary W*8. Fixed: the
    output image H*W*4 and a small reserve.
    """
    per_row = width * (4 * (n + n_cal) + max_itemsize + 8)
    budget = memory_limit - height * width * 4 - RESERVE_BYTES
    workers = max(1, min(workers, height))
    rows = budget // (per_row * workers) if budget > 0 else 0
    if rows < 1:
        workers = 1
        rows = budget // per_row if budget > 0 else 0
    if rows < 1:
        need = height * width * 4 + RESERVE_BYTES + per_row
        raise StackError(
            f"memory limit {memory_limit / 2**20:.1f} MiB is too small to stack {n} frames of "
            f"{width}x{height}: at least {need / 2**20:.1f} MiB are needed"
        )
    rows = min(rows, MAX_BAND_ROWS, height)
    # enough bands that every worker has work
    if workers > 1 and height // rows < 2 * workers:
        rows = max(1, -(-height // (2 * workers)))
    return int(rows), int(workers)


class _Sources:
    """Every file opened once: flats, and each distinct calibration file."""

    def __init__(self, inputs: Sequence[StackInput]):
        self.flats: list[PixelSource] = []
        self.cals: dict[Path, PixelSource] = {}
        try:
            for item in inputs:
                self.flats.append(open_pixels(item.frame))
                cal = item.calibration
                if cal.mode == "file":
                    key = Path(os.path.abspath(cal.frame.path))
                    if key not in self.cals:
                        self.cals[key] = open_pixels(cal.frame)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for src in self.flats:
            src.close()
        for src in self.cals.values():
            src.close()


def _raise_fd_limit(needed: int) -> None:
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = needed + 256
        if soft != resource.RLIM_INFINITY and soft < want:
            new = want if hard == resource.RLIM_INFINITY else min(hard, want)
            if new > soft:
                resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    except (ImportError, ValueError, OSError):
        pass


def stack_frames(
    inputs: Sequence[StackInput],
    method: Method,
    normalize: str = "multiplicative",
    memory_limit: int = DEFAULT_MEMORY_LIMIT,
    workers: Optional[int] = None,
    progress: Optional[Callable[[int, int], None]] = None,
) -> StackResult:
    """Calibrate, normalize and combine `inputs` band by band within `memory_limit`.

    Equals flatd.combine.Combiner on the whole stack (to float rounding). Levels are
    measured for every input (they cost little); with "multiplicative" normalization a
    level <= 0 is an error naming the file.
    """
    if normalize not in ("none", "multiplicative"):
        raise StackError(f"normalize is 'none' or 'multiplicative', got {normalize!r}")
    inputs = list(inputs)
    _validate(inputs, method)
    n = len(inputs)
    width, height = inputs[0].frame.width, inputs[0].frame.height
    workers = int(workers or default_workers())
    _raise_fd_limit(2 * n)

    sources = _Sources(inputs)
    try:
        cal_keys = [
            Path(os.path.abspath(item.calibration.frame.path)) if item.calibration.mode == "file" else None
            for item in inputs
        ]
        itemsizes = [s.itemsize for s in sources.flats] + [s.itemsize for s in sources.cals.values()]
        band_rows, workers = plan_bands(n, len(sources.cals), width, height, int(memory_limit), workers,
                                        max(itemsizes))
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="flatd-stack") if workers > 1 else None
        try:
            levels = _measure_levels(inputs, sources, cal_keys, height, pool)
            if normalize == "multiplicative":
                for item, level in zip(inputs, levels):
                    problem = check_level(level)
                    if problem:
                        raise StackError(
                            f"flat {item.frame.path}: {problem} (calibration: {item.calibration.label}); "
                            "cannot normalize", item.frame.path)
                factors = normalization_factors(levels)
            else:
                factors = np.ones(n, dtype=np.float32)
            image = np.empty((height, width), dtype=np.float32)
            _combine_bands(inputs, sources, cal_keys, factors, method, image, band_rows, pool, progress)
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
    finally:
        sources.close()
    return StackResult(image=image, levels=[float(x) for x in levels],
                       factors=[float(f) for f in factors], band_rows=band_rows)


def _calibration_args(item: StackInput):
    if item.calibration.mode == "pedestal":
        return float(item.calibration.pedestal)
    return None


def _run(pool: Optional[ThreadPoolExecutor], fn, jobs, on_done=None) -> list:
    """fn(job) for every job, on the pool if any; results in order; first error raised."""
    if pool is None:
        results = []
        for job in jobs:
            results.append(fn(job))
            if on_done:
                on_done(results[-1])
        return results
    futures = [pool.submit(fn, job) for job in jobs]
    results = []
    try:
        for fut in futures:
            results.append(fut.result())
            if on_done:
                on_done(results[-1])
    except BaseException:
        for fut in futures:
            fut.cancel()
        raise
    return results


def _measure_levels(inputs, sources: _Sources, cal_keys, height: int, pool) -> list[float]:
    """Each input's level on the sampled rows, after its calibration. Inputs are taken
    calibration file by calibration file, so one calibration sample is held at a time."""
    sample = level_rows(height)
    levels = [0.0] * len(inputs)
    by_cal: dict[Optional[Path], list[int]] = {}
    for i, key in enumerate(cal_keys):
        by_cal.setdefault(key, []).append(i)
    for key, indices in by_cal.items():
        cal = sources.cals[key].sample_rows(sample) if key is not None else None

        def level_of(i: int, cal=cal) -> float:
            rows = sources.flats[i].sample_rows(sample, pedestal=_calibration_args(inputs[i]), cal=cal)
            return frame_level(rows)

        for i, level in zip(indices, _run(pool, level_of, indices)):
            levels[i] = level
        del cal
    return levels


def _combine_bands(inputs, sources: _Sources, cal_keys, factors, method: Method, image: np.ndarray,
                   band_rows: int, pool, progress) -> None:
    n = len(inputs)
    height, width = image.shape
    local = threading.local()
    max_raw = band_rows * width * max([s.itemsize for s in sources.flats] + [s.itemsize for s in sources.cals.values()])
    pedestals = [_calibration_args(item) for item in inputs]
    cal_index = {key: k for k, key in enumerate(sources.cals)}
    cal_list = list(sources.cals.values())

    def buffers():
        if not hasattr(local, "stack"):
            local.stack = np.empty(n * band_rows * width, dtype=np.float32)
            local.cals = np.empty(len(cal_list) * band_rows * width, dtype=np.float32)
            local.raw = np.empty(max_raw, dtype=np.uint8)
        return local.stack, local.cals, local.raw

    def band(r0: int) -> int:
        r1 = min(height, r0 + band_rows)
        rows = r1 - r0
        flat_buf, cal_buf, raw = buffers()
        stack = flat_buf[: n * rows * width].reshape(n, rows, width)
        cals = cal_buf[: len(cal_list) * rows * width].reshape(len(cal_list), rows, width)
        for k, src in enumerate(cal_list):
            src.read_into(r0, r1, cals[k], scratch=raw)
        for i, src in enumerate(sources.flats):
            key = cal_keys[i]
            src.read_into(r0, r1, stack[i], pedestal=pedestals[i],
                          cal=cals[cal_index[key]] if key is not None else None,
                          factor=float(factors[i]), scratch=raw)
        combine_rows_into(stack, method, image[r0:r1])
        return rows

    done = [0]

    def report(rows: int) -> None:
        done[0] += rows
        if progress is not None:
            progress(done[0], height)

    _run(pool, band, range(0, height, band_rows), report)
