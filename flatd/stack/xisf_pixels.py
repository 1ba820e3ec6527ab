"""Row bands of pixels from XISF files: `XisfPixelSource`, the XISF form of PixelSource.

An uncompressed image is read like a plain FITS one: positional reads of the band's
rows at the attached block's offset, nothing else held. A compressed image is decoded
once, when the source is opened, into an anonymous spool file in the system temp
folder (deleted when the source is closed); zlib and zstd are decoded in bounded
chunks, lz4 one (sub)block at a time, as its block format requires. Bands are then
read from the spool; a byte-shuffled block is un-shuffled band by band (one read per
byte plane). The band is converted to native byte order and goes through the same
fill kernel as FITS (``_fill_native``), so calibration, clipping and the
normalization factor are PixelSource's. XISF stores values, not FITS integers with an
offset: no BZERO/BSCALE is applied whatever the frame's cards say.
"""

from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path
from typing import Optional

import numpy as np

from flatd.errors import StackError
from flatd.ingest.frames import Frame, FrameError
from flatd.ingest.xisf import XisfImage, codec_module, read_xisf_header
from flatd.stack.pixels import CLIP_MAX, PixelSource, _fill_native, _same_cards

READ_CHUNK = 256 << 10  # compressed bytes read at a time
OUT_CHUNK = 1 << 20  # decoded bytes produced at a time (zlib, zstd)


class XisfPixelSource(PixelSource):
    """The pixels of one XISF frame, opened once; row bands on demand (thread-safe)."""

    def __init__(self, frame: Frame):
        self.frame = frame
        self.path = Path(frame.path)
        self.width = int(frame.width)
        self.height = int(frame.height)
        self._fd: Optional[int] = None
        self._hdul = None
        self._section = None
        self._lock = threading.Lock()
        self._base = 0
        self._shuffle = 0
        fd = self._open_fd()  # PixelSource's: opens, then self._check_planned(fd)
        image = self._image
        self.dtype = np.dtype(image.dtype)
        self.itemsize = image.itemsize
        if (image.width, image.height) != (self.width, self.height):
            os.close(fd)
            raise StackError(f"{self.path}: XISF image is {image.width}x{image.height}, "
                             f"planned as {self.width}x{self.height}", self.path)
        if image.codec is None:
            self._fd, self._base = fd, image.position
            return
        try:
            self._fd = self._decode(fd, image)
            self._shuffle = image.shuffle
        finally:
            os.close(fd)

    def float32_rows(self, r0: int, r1: int, scratch: Optional[np.ndarray] = None) -> Optional[np.ndarray]:
        """None: an XISF image is read through read_into (its own layout, codecs and byte order)."""
        return None

    # ---- opening
    def _check_planned(self, fd: int) -> None:
        """Parse the XISF header (self._image); refuse a file changed since it was planned."""
        from flatd.fsops import FileIdentity

        image, problem = None, None
        try:
            with os.fdopen(os.dup(fd), "rb") as handle:
                image = read_xisf_header(handle, self.path)
        except FrameError as exc:
            problem = exc.reason
        except OSError as exc:
            problem = f"read error: {exc.strerror or exc}"
        changes: list[str] = []
        if self.frame.inode or self.frame.file_size:  # inode 0 with a size: on a Dask worker
            planned = FileIdentity(self.frame.device, self.frame.inode, self.frame.file_size, self.frame.mtime)
            changes = planned.differences(os.fstat(fd))
            if not changes and problem:
                changes = [f"header unreadable: {problem}"]
            elif not changes and not _same_cards(dict(image.cards), self.frame.headers):
                changes = ["header rewritten"]
        if changes:
            raise StackError(f"{self.path} changed since it was planned ({', '.join(changes)}); "
                             "this group is not made and nothing is moved", self.path)
        if problem:
            raise StackError(f"{self.path}: {problem}", self.path)
        self._image: XisfImage = image

    def _decode(self, fd: int, image: XisfImage) -> int:
        """Decode the compressed block into an anonymous temp file; its descriptor."""
        self._check_temp_space(image.uncompressed_size)
        with tempfile.TemporaryFile(prefix="flatd-xisf-") as spool:
            blocks = image.subblocks or ((image.size, image.uncompressed_size),)
            position = image.position
            for stored, size in blocks:
                got = self._decode_block(_Range(fd, position, stored, self.path), image.codec, size, spool)
                if got != size:
                    raise StackError(f"{self.path}: XISF {image.codec} data decodes to {got} bytes, the header "
                                     f"says {size} (truncated or corrupt)", self.path)
                position += stored
            spool.flush()
            return os.dup(spool.fileno())

    def _check_temp_space(self, needed: int) -> None:
        folder = tempfile.gettempdir()
        try:
            st = os.statvfs(folder)
        except (OSError, AttributeError):
            return
        free = st.f_bavail * st.f_frsize
        if free < needed:
            raise StackError(f"{self.path}: decoding this compressed XISF needs {needed / 1e6:.1f} MB in "
                             f"{folder}, which has {free / 1e6:.1f} MB free", self.path)

    def _decode_block(self, src: "_Range", codec: str, size: int, out) -> int:
        """Decode one stream of `src` into `out`; the bytes written (never more than `size` + 1 chunk)."""
        module = _codec(codec, self.path)
        try:
            if codec == "zlib":
                return self._inflate(src, module, size, out)
            if codec == "zstd":
                reader = module.ZstdDecompressor().stream_reader(src, read_size=READ_CHUNK, read_across_frames=True)
                return self._copy(iter(lambda: reader.read(OUT_CHUNK), b""), size, out)
            data = module.decompress(src.read(src.length), uncompressed_size=size)  # lz4: one block
            return self._copy([data], size, out)
        except StackError:
            raise
        except Exception as exc:  # zlib.error, ZstdError, LZ4BlockError...
            raise StackError(f"{self.path}: corrupt XISF {codec} data: {exc}", self.path) from None

    def _inflate(self, src: "_Range", zlib, size: int, out) -> int:
        stream = zlib.decompressobj()

        def pieces():
            while not stream.eof:
                chunk = stream.unconsumed_tail or src.read(READ_CHUNK)
                if not chunk:
                    yield stream.flush()
                    return
                yield stream.decompress(chunk, OUT_CHUNK)

        return self._copy(pieces(), size, out)

    def _copy(self, pieces, size: int, out) -> int:
        total = 0
        for data in pieces:
            total += len(data)
            if total > size:
                raise StackError(f"{self.path}: XISF data decodes to more than the {size} bytes its header "
                                 "declares (a decompression bomb?); refused", self.path)
            out.write(data)
        return total

    # ---- reading
    def _native_band(self, r0: int, r1: int, scratch: Optional[np.ndarray]):
        """The band as a native array for the fill kernel; scale 1, zero 0."""
        rows = r1 - r0
        nbytes = self.raw_bytes(r0, r1)
        if scratch is None or scratch.nbytes < nbytes:
            scratch = np.empty(nbytes, dtype=np.uint8)
        buf = scratch[:nbytes]
        if self._shuffle:
            self._read_shuffled(r0, r1, buf)
        else:
            self._pread_exact(memoryview(buf), self._base + r0 * self.width * self.itemsize)
        values = buf.view(self.dtype)
        if not self.dtype.isnative:
            values.byteswap(inplace=True)
            values = values.view(self.dtype.newbyteorder("="))
        return _fill_native, values.reshape(rows, self.width), 1.0, 0.0

    def _read_shuffled(self, r0: int, r1: int, buf: np.ndarray) -> None:
        """Rows r0..r1 of a byte-shuffled block: byte k of item i is at k * items + i."""
        items = self.width * self.height
        first, count = r0 * self.width, (r1 - r0) * self.width
        plane = np.empty(count, dtype=np.uint8)
        interleaved = buf.reshape(count, self.itemsize)
        for k in range(self.itemsize):
            self._pread_exact(memoryview(plane), k * items + first)
            interleaved[:, k] = plane

    def sample_grid(self, step: int, pedestal: Optional[float] = None, cal: Optional[np.ndarray] = None,
                    chunk_rows: int = 8) -> np.ndarray:
        """PixelSource.sample_grid: the grid's rows read one at a time, `chunk_rows`
        held, then calibrated and clipped as there."""
        from flatd.stack.levels import grid_slices

        rows_sl, cols_sl = grid_slices(self.height, self.width, step)
        rows = range(*rows_sl.indices(self.height))
        cols = range(*cols_sl.indices(self.width))
        out = np.empty((len(rows), len(cols)), dtype=np.float32)
        chunk = max(1, min(chunk_rows, len(rows)))
        band = np.empty((chunk, self.width), dtype=np.float32)
        raw = np.empty(self.raw_bytes(0, 1), dtype=np.uint8)
        for k0 in range(0, len(rows), chunk):
            picked = rows[k0:k0 + chunk]
            for k, r in enumerate(picked):
                self.read_into(r, r + 1, band[k:k + 1], scratch=raw)
            out[k0:k0 + len(picked)] = band[: len(picked), cols_sl]
        if cal is not None:
            np.subtract(out, cal, out=out)
            np.clip(out, 0.0, CLIP_MAX, out=out)
        elif pedestal is not None:
            np.subtract(out, np.float32(pedestal), out=out)
            np.clip(out, 0.0, CLIP_MAX, out=out)
        return out


def _codec(codec: str, path: Path):
    try:
        return codec_module(codec, path)
    except FrameError as exc:
        raise StackError(str(exc), path) from None


class _Range:
    """A read-only stream over bytes [start, start + length) of a descriptor (pread)."""

    def __init__(self, fd: int, start: int, length: int, path: Path):
        self.fd, self.pos, self.end, self.length, self.path = fd, start, start + length, length, path

    def read(self, n: int = -1) -> bytes:
        want = self.end - self.pos if n is None or n < 0 else min(n, self.end - self.pos)
        parts = []
        while want > 0:
            data = os.pread(self.fd, min(want, 1 << 30), self.pos)
            if not data:
                raise StackError(f"{self.path}: file ended early (truncated while reading?)", self.path)
            parts.append(data)
            self.pos += len(data)
            want -= len(data)
        return b"".join(parts)
