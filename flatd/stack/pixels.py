"""Reading row bands of pixels from FITS files (`PixelSource`): for the engines and `inspect --adu`.

Uncompressed files are read with positional reads (``os.preadv``) straight into a
per-worker buffer: the reads release the GIL, nothing stays mapped (a file-backed
memory map would count every page read towards the resident size, and a file
truncated under a map kills the process with SIGBUS; a short read is just an error).
Big-endian integers are swapped and scaled in a compiled kernel (_kernels.c), which also subtracts the
dark, bias or pedestal, clips to [0, 65535] and applies the normalization factor.
Tile-compressed files (``.fits.fz``) are read through astropy's section interface,
one band at a time.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Optional

import numpy as np

from flatd.errors import StackError
from flatd.ingest.frames import Frame

CLIP_MAX = 65535.0

_BITPIX_DTYPES = {8: ">u1", 16: ">i2", 32: ">i4", 64: ">i8", -32: ">f4", -64: ">f8"}


# --------------------------------------------------------------------------- kernels

# _kernels.fill's kinds: FITS big-endian int16, then native arrays by dtype
_BE16 = 0
_NATIVE_KINDS = {"u1": 1, "i1": 2, "u2": 3, "i2": 4, "u4": 5, "i4": 6, "u8": 7, "i8": 8, "f4": 9, "f8": 10}


def _fill(kind: int, raw: np.ndarray, out: np.ndarray, scale, zero, mode, cal, ped, factor) -> None:
    # imported here: the sample grid of a plain FITS file is read without the kernels (the dry run's checks)
    from flatd.stack import _kernels

    rows, w = out.shape
    if raw.shape != (rows, w) or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"fill: raw {raw.shape} and out {out.shape} {out.dtype} do not match")
    _kernels.fill(kind, np.ascontiguousarray(raw), out, rows, w, float(scale), float(zero), int(mode),
                  cal if mode == 2 else None, float(ped), float(factor))


def _fill_be16(raw, out, scale, zero, mode, cal, ped, factor) -> None:
    """out = calibrate(float32(int16_be(raw) * scale + zero)); raw: native uint16 view.
    calibrate: mode 1 minus `ped`, mode 2 minus `cal` (out's shape), then clipped to
    [0, 65535]; mode 0 neither; then times `factor` (float32 arithmetic)."""
    _fill(_BE16, raw, out, scale, zero, mode, cal, ped, factor)


def _fill_native(raw, out, scale, zero, mode, cal, ped, factor) -> None:
    """out = calibrate(float32(float64(raw) * scale + zero)); raw: any native numeric array."""
    kind = _NATIVE_KINDS.get(f"{raw.dtype.kind}{raw.dtype.itemsize}") if raw.dtype.isnative else None
    if kind is None:
        raw, kind = raw.astype(np.float64), _NATIVE_KINDS["f8"]
    _fill(kind, raw, out, scale, zero, mode, cal, ped, factor)


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
        from flatd.ingest.frames import FrameError, read_header_from
        from flatd.fsops import FileIdentity

        if not self.frame.inode and not self.frame.file_size:
            return  # a frame not read from a file (tests, header dumps)
        # inode 0 with a size: a frame opened on a Dask worker (flatd.stack.engines.dask),
        # checked by size, mtime and header (FileIdentity skips device and inode then)
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

    def float32_rows(self, r0: int, r1: int, scratch: Optional[np.ndarray] = None) -> Optional[np.ndarray]:
        """Rows r0..r1 as a native float32 (r1-r0, W) view of `scratch` (byte-swapped in
        place: no copy), for a plain 32-bit float file without BSCALE/BZERO (a master);
        None for any other file (read_into then)."""
        if self._section is not None or self.frame.bitpix != -32 or float(self.frame.bscale) != 1.0 \
                or float(self.frame.bzero) != 0.0 or not (0 <= r0 <= r1 <= self.height):
            return None
        _, native, _, _ = self._native_plain(self._read_plain(r0, r1, scratch), r1 - r0)
        return native

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

    def sample_grid(self, step: int, pedestal: Optional[float] = None, cal: Optional[np.ndarray] = None,
                    chunk_rows: int = 8) -> np.ndarray:
        """The level sample grid (flatd.stack.levels.grid_slices) as float32, calibrated
        like read_into: minus `cal` (a grid of the same shape) or `pedestal`, clipped to
        [0, 65535] when anything was subtracted. Rows are read `chunk_rows` at a time, so
        the memory is the grid plus chunk_rows x W x (itemsize + 4) bytes (itemsize + 8
        with a step of 1). Uncompressed rows are read raw and only the grid's columns
        converted, in numpy (no kernel): float32(float64(value) * BSCALE + BZERO), the
        fill kernels' arithmetic."""
        from flatd.stack.levels import grid_slices

        rows_sl, cols_sl = grid_slices(self.height, self.width, step)
        rows = range(*rows_sl.indices(self.height))
        cols = range(*cols_sl.indices(self.width))
        out = np.empty((len(rows), len(cols)), dtype=np.float32)
        chunk = max(1, min(chunk_rows, len(rows)))
        if self._section is not None:
            buf = np.empty((chunk, self.width), dtype=np.float32)
            for k0 in range(0, len(rows), chunk):
                picked = rows[k0:k0 + chunk]
                band = buf[: len(picked)]
                for k, r in enumerate(picked):
                    self.read_into(r, r + 1, band[k:k + 1])
                out[k0:k0 + len(picked)] = band[:, cols_sl]
        else:
            row_bytes = self.raw_bytes(0, 1)
            raw = np.empty(chunk * row_bytes, np.uint8)
            view = memoryview(raw)
            scale, zero = float(self.frame.bscale), float(self.frame.bzero)
            wide = np.empty((chunk, len(cols)), dtype=np.float64)
            for k0 in range(0, len(rows), chunk):
                picked = rows[k0:k0 + chunk]
                for k, r in enumerate(picked):
                    self._pread_exact(view[k * row_bytes:(k + 1) * row_bytes], self.frame.data_offset + r * row_bytes)
                values = raw[: len(picked) * row_bytes].view(self.dtype).reshape(len(picked), self.width)[:, cols_sl]
                w = wide[: len(picked)]
                np.multiply(values, scale, out=w)
                np.add(w, zero, out=w)
                out[k0:k0 + len(picked)] = w
        if cal is not None:
            np.subtract(out, cal, out=out)
            np.clip(out, 0.0, CLIP_MAX, out=out)
        elif pedestal is not None:
            np.subtract(out, np.float32(pedestal), out=out)
            np.clip(out, 0.0, CLIP_MAX, out=out)
        return out


def _same_cards(a, b) -> bool:
    """Header cards equal, NaN values included."""
    if a.keys() != b.keys():
        return False
    return all(x == y or (x != x and y != y) for x, y in ((a[k], b[k]) for k in a))


def open_pixels(frame: Frame) -> PixelSource:
    """Open a frame's pixels once; .rows(r0, r1) gives float32 bands; .close().
    An .xisf frame gets an XisfPixelSource (flatd.stack.xisf_pixels), same interface."""
    if str(frame.path).lower().endswith(".xisf"):
        from flatd.stack.xisf_pixels import XisfPixelSource

        return XisfPixelSource(frame)
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
