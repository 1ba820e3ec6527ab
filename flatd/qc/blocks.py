"""Block sums of an image in one pass (flatd's compiled kernel), by the parity of each
pixel's row and column offset in its block: what the previous-master comparison needs to
scale each CFA position afterwards (flatd.qc.previous.Binned), summed over the parities
the previews' area averages (flatd.qc.previews) and the master checks' field blocks
(flatd.qc.masters); and, in the same pass, whether any pixel is not finite, not above 0,
or at or above a limit (the master checks' pixel counts)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from flatd.stack import _kernels

NONFINITE = _kernels.FOLD_FLAGS["nonfinite"]
NONPOSITIVE = _kernels.FOLD_FLAGS["nonpositive"]
LIMIT = _kernels.FOLD_FLAGS["limit"]


def fold(band: np.ndarray, b: int, out: np.ndarray, row0: int = 0, limit: float = math.inf) -> int:
    """Add the float32 rows `band` (row 0 being row `row0` of the image) into `out`
    (float32 (2, 2, ny, nx)): out[ci, cj, Y, X] += the pixels of b x b block (Y, X) whose
    row and column offsets in it have the parities ci, cj; rows and columns beyond ny and
    nx blocks left out (a last, partial block counts what there is). Returns what the
    band holds, as bits: NONFINITE, NONPOSITIVE (a finite value <= 0), LIMIT (a finite
    value >= `limit`)."""
    band = np.ascontiguousarray(band, dtype=np.float32)
    if band.ndim != 2 or out.dtype != np.float32 or out.ndim != 4 or out.shape[:2] != (2, 2) \
            or not out.flags.c_contiguous or not out.flags.writeable or b < 1 or row0 < 0:
        raise ValueError("fold: a 2-D band, a block side >= 1 and a writable C-contiguous float32 "
                         "(2, 2, ny, nx) out are needed")
    rows, width = band.shape
    limit = float(limit)
    if math.isnan(limit) or limit > 3.4e38:
        limit = math.inf
    return _kernels.block_sums(band, rows, width, int(row0), int(b), out, out.shape[2], out.shape[3], limit)


@dataclass
class Blocks:
    """An image's sums over b x b blocks by parity (2, 2, ny, nx) and what it holds (fold's bits)."""

    shape: tuple[int, int]
    binning: int
    sums: np.ndarray
    flags: int

    @property
    def finite(self) -> bool:
        return not self.flags & NONFINITE

    def total(self) -> np.ndarray:
        """(ny, nx): the sums over every pixel of each block."""
        return self.sums.sum(axis=(0, 1), dtype=np.float32)


def block_sums(image: np.ndarray, b: int, partial: bool = True, limit: float = math.inf) -> Blocks:
    """A 2-D image's Blocks in one pass; `partial`: the last, partial block of a row or
    column counts (ceil), else it is left out (floor)."""
    h, w = np.shape(image)
    ny, nx = (-(-h // b), -(-w // b)) if partial else (h // b, w // b)
    out = np.zeros((2, 2, ny, nx), dtype=np.float32)
    return Blocks((h, w), b, out, fold(image, b, out, limit=limit))
