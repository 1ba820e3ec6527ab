"""The combine methods and normalization, on an in-memory stack of one band.

Pure numpy/numba, no I/O. A stack is a C-contiguous float32 array of shape
(N, rows, cols): N frames of one band. Every method reduces each pixel "column" of N
values to one float32 value, with the original MasterFlatMaker's semantics (in float):

- ``mean``; ``median`` (even N: the mean of the two middle values);
- ``minmax n``: per pass drop every copy of the column's minimum, then every copy of
  the maximum of what is left; n passes; mean of the rest. A pass that would empty the
  column is not made, so with d distinct values k = min(n, (d-1)//2) passes are made;
- ``sigma z``: one pass; column mean and population standard deviation; values with
  |x - mean| / std > z (strictly) are rejected (nothing when std == 0); mean of the
  rest; a column where everything is rejected (z < 1) falls back to min/max clip n=2.

The kernels work on tiles of one row by a few hundred columns and loop over the frames
on the outside and over the columns on the inside, so the work vectorizes across
pixels; column statistics are accumulated in float64. The median uses a pruned Batcher
sorting network applied to whole tile rows (compare-exchange of two frames' rows).
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional, Sequence, Union

import numpy as np
from numba import njit

METHODS = ("mean", "median", "minmax", "sigma")
_CODES = {"mean": 0, "median": 1, "minmax": 2, "sigma": 3}
CLIP_MAX = 65535.0
# Rows sampled to measure a frame's level: at most this many.
LEVEL_ROWS = 256


# --------------------------------------------------------------------------- method


@dataclass(frozen=True)
class Method:
    """A combine method and its parameter."""

    name: str
    sigma: float = 2.0
    minmax: int = 2

    def __post_init__(self):
        if self.name not in METHODS:
            raise ValueError(f"unknown combine method {self.name!r}; known: {', '.join(METHODS)}")
        if not (isinstance(self.sigma, (int, float)) and math.isfinite(self.sigma) and self.sigma > 0):
            raise ValueError(f"sigma clip z must be a positive number, got {self.sigma!r}")
        if isinstance(self.minmax, bool) or not isinstance(self.minmax, (int, np.integer)) or self.minmax < 1:
            raise ValueError(f"min/max clip n must be a whole number >= 1, got {self.minmax!r}")

    @classmethod
    def from_settings(cls, settings) -> "Method":
        """From a flatd.config.CombineSettings (or anything with method/sigma/minmax)."""
        return cls(name=settings.method, sigma=float(settings.sigma), minmax=int(settings.minmax))

    @property
    def label(self) -> str:
        """The original program's names: Mean, Median, MinMaxClip2, SigmaClip2.0."""
        if self.name == "mean":
            return "Mean"
        if self.name == "median":
            return "Median"
        if self.name == "minmax":
            return f"MinMaxClip{self.minmax}"
        return f"SigmaClip{_format_z(self.sigma)}"

    @property
    def description(self) -> str:
        if self.name == "minmax":
            return f"min/max clip n={self.minmax}"
        if self.name == "sigma":
            return f"sigma clip z={_format_z(self.sigma)}"
        return self.name

    @property
    def min_frames(self) -> int:
        """The original requires 2n+1 files for min/max clip."""
        return 2 * self.minmax + 1 if self.name == "minmax" else 1


def _format_z(z: float) -> str:
    text = f"{float(z):g}"
    if "." not in text and "e" not in text and "inf" not in text:
        text += ".0"
    return text


# --------------------------------------------------------------------------- kernels


@njit(nogil=True, cache=True)
def _tile_mean(stack, out, r, c0, c1):
    n = stack.shape[0]
    w = c1 - c0
    acc = np.zeros(w, np.float64)
    for i in range(n):
        row = stack[i, r, c0:c1]
        for c in range(w):
            acc[c] += row[c]
    orow = out[r, c0:c1]
    for c in range(w):
        orow[c] = acc[c] / n


@njit(nogil=True, cache=True)
def _tile_median(stack, out, r, c0, c1, net, m1, m2):
    n = stack.shape[0]
    w = c1 - c0
    s = np.empty((n, w), np.float32)
    for i in range(n):
        row = stack[i, r, c0:c1]
        for c in range(w):
            s[i, c] = row[c]
    for k in range(net.shape[0]):
        a = s[net[k, 0]]
        b = s[net[k, 1]]
        for c in range(w):
            x = a[c]
            y = b[c]
            if y < x:
                a[c] = y
                b[c] = x
    orow = out[r, c0:c1]
    lo = s[m1]
    hi = s[m2]
    for c in range(w):
        orow[c] = (np.float64(lo[c]) + np.float64(hi[c])) * 0.5


@njit(nogil=True, cache=True)
def _tile_minmax(stack, out, r, c0, c1, passes):
    n = stack.shape[0]
    w = c1 - c0
    inf = np.float32(np.inf)
    lo = np.full(w, -inf, np.float32)
    hi = np.full(w, inf, np.float32)
    nlo = np.empty(w, np.float32)
    nhi = np.empty(w, np.float32)
    acc = np.zeros(w, np.float64)
    cnt = np.zeros(w, np.int64)
    res = np.empty(w, np.float64)
    for i in range(n):
        row = stack[i, r, c0:c1]
        for c in range(w):
            acc[c] += row[c]
    for c in range(w):
        res[c] = acc[c] / n
    for _ in range(passes):
        for c in range(w):
            nlo[c] = inf
            nhi[c] = -inf
            acc[c] = 0.0
            cnt[c] = 0
        # the smallest value left: every copy of it goes
        for i in range(n):
            row = stack[i, r, c0:c1]
            for c in range(w):
                x = row[c]
                if x > lo[c] and x < hi[c] and x < nlo[c]:
                    nlo[c] = x
        # the largest of what is left: every copy of it goes
        for i in range(n):
            row = stack[i, r, c0:c1]
            for c in range(w):
                x = row[c]
                if x > nlo[c] and x < hi[c] and x > nhi[c]:
                    nhi[c] = x
        for i in range(n):
            row = stack[i, r, c0:c1]
            for c in range(w):
                x = row[c]
                if x > nlo[c] and x < nhi[c]:
                    acc[c] += x
                    cnt[c] += 1
        changed = 0
        for c in range(w):
            if cnt[c] > 0:  # else the pass would empty the column: keep the previous one
                lo[c] = nlo[c]
                hi[c] = nhi[c]
                res[c] = acc[c] / cnt[c]
                changed += 1
        if changed == 0:
            break
    orow = out[r, c0:c1]
    for c in range(w):
        orow[c] = res[c]


@njit(nogil=True, cache=True)
def _tile_sigma(stack, out, r, c0, c1, z):
    # |x - mean| / std > z  <=>  N * D^2 > z^2 * sum_j D_j^2   with D = N*x - sum(x)
    # (exact for integer data; two-pass accuracy for any data; std == 0 rejects nothing)
    n = stack.shape[0]
    w = c1 - c0
    fn = np.float64(n)
    z2 = np.float64(z) * np.float64(z)
    s = np.zeros(w, np.float64)
    v = np.zeros(w, np.float64)
    acc = np.zeros(w, np.float64)
    cnt = np.zeros(w, np.int64)
    for i in range(n):
        row = stack[i, r, c0:c1]
        for c in range(w):
            s[c] += row[c]
    for i in range(n):
        row = stack[i, r, c0:c1]
        for c in range(w):
            d = fn * row[c] - s[c]
            v[c] += d * d
    for c in range(w):
        v[c] *= z2
    for i in range(n):
        row = stack[i, r, c0:c1]
        for c in range(w):
            x = row[c]
            d = fn * x - s[c]
            if not (fn * d * d > v[c]):
                acc[c] += x
                cnt[c] += 1
    orow = out[r, c0:c1]
    for c in range(w):
        if cnt[c] > 0:
            orow[c] = acc[c] / cnt[c]
        else:  # everything rejected: the original falls back to min/max clip n=2
            _tile_minmax(stack, out, r, c0 + c, c0 + c + 1, 2)


@njit(nogil=True, cache=True)
def _tile(stack, out, r, c0, c1, code, z, passes, net, m1, m2):
    if code == 0:
        _tile_mean(stack, out, r, c0, c1)
    elif code == 1:
        _tile_median(stack, out, r, c0, c1, net, m1, m2)
    elif code == 2:
        _tile_minmax(stack, out, r, c0, c1, passes)
    else:
        _tile_sigma(stack, out, r, c0, c1, z)


@njit(nogil=True, cache=True)
def _combine_rows(stack, out, r0, r1, code, z, passes, net, m1, m2, tile):
    """Combine rows r0..r1 of `stack` into `out`, in this thread (GIL released)."""
    ncols = stack.shape[2]
    for r in range(r0, r1):
        for c0 in range(0, ncols, tile):
            _tile(stack, out, r, c0, min(ncols, c0 + tile), code, z, passes, net, m1, m2)


# --------------------------------------------------------------------------- median network


def _batcher_pairs(n: int) -> list[tuple[int, int]]:
    """Batcher's odd-even merge sort network for a power of two n."""
    pairs = []
    p = 1
    while p < n:
        k = p
        while k >= 1:
            for j in range(k % p, n - k, 2 * k):
                for i in range(min(k, n - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p):
                        pairs.append((i + j, i + j + k))
            k //= 2
        p *= 2
    return pairs


@lru_cache(maxsize=64)
def median_network(n: int) -> tuple[np.ndarray, int, int]:
    """Compare-exchange pairs (int64, shape (M, 2)) that put the median(s) of n values
    in place, and the indices of the two middle values (equal for odd n).

    Batcher's network for the next power of two, with the padding (thought of as +inf
    above index n-1) dropped, pruned backwards to what the middle outputs depend on.
    """
    size = 1
    while size < n:
        size *= 2
    pairs = [(a, b) for a, b in _batcher_pairs(size) if b < n]
    m1, m2 = (n - 1) // 2, n // 2
    needed = {m1, m2}
    kept = []
    for a, b in reversed(pairs):
        if a in needed or b in needed:
            kept.append((a, b))
            needed.add(a)
            needed.add(b)
    kept.reverse()
    net = np.array(kept, dtype=np.int64).reshape(-1, 2)
    return net, m1, m2


# --------------------------------------------------------------------------- entry points


def _tile_width(n: int) -> int:
    """Columns per tile: keep a tile's N rows (and the median's copy) in L1/L2."""
    return int(min(1024, max(128, (8192 // max(n, 1)) // 16 * 16)))


def _kernel_args(method: Method, n: int) -> tuple:
    if method.name == "median":
        net, m1, m2 = median_network(n)
    else:
        net, m1, m2 = _EMPTY_NET, 0, 0
    return (_CODES[method.name], float(method.sigma), int(method.minmax), net, m1, m2, _tile_width(n))


_EMPTY_NET = np.zeros((0, 2), dtype=np.int64)


def combine_rows_into(stack: np.ndarray, method: Method, out: np.ndarray, r0: int = 0, r1: Optional[int] = None) -> None:
    """Combine rows r0..r1 of a float32 C-contiguous (N, rows, cols) stack into the
    float32 (rows, cols) `out`, in the calling thread (the GIL is released)."""
    if r1 is None:
        r1 = stack.shape[1]
    if r1 <= r0 or stack.shape[2] == 0:
        return
    _combine_rows(stack, out, r0, r1, *_kernel_args(method, stack.shape[0]))


def _as_stack(stack) -> np.ndarray:
    stack = np.asarray(stack)
    if stack.ndim != 3:
        raise ValueError(f"a stack has shape (frames, rows, cols); got shape {stack.shape}")
    if stack.shape[0] == 0:
        raise ValueError("cannot combine an empty stack (no frames)")
    stack = np.ascontiguousarray(stack, dtype=np.float32)
    if not stack.flags.writeable:  # numba would compile the kernels again for read-only arrays
        stack = stack.copy()
    return stack


def default_workers() -> int:
    """The CPUs this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def combine(stack: np.ndarray, method: Method, workers: Optional[int] = None, out: Optional[np.ndarray] = None) -> np.ndarray:
    """Combine a (N, rows, cols) float32 stack into a (rows, cols) float32 image.

    The stack is not modified. Rows are shared between `workers` threads (default: the
    number of CPUs); the kernels release the GIL.
    """
    stack = _as_stack(stack)
    n, rows, cols = stack.shape
    if out is None:
        out = np.empty((rows, cols), dtype=np.float32)
    elif out.shape != (rows, cols) or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous float32 array of shape {(rows, cols)}")
    if rows == 0 or cols == 0:
        return out
    workers = workers or default_workers()
    # enough chunks to balance the threads, each at least a few rows' worth of work
    chunks = min(rows, workers * 4) if workers > 1 and rows * cols * n >= 1 << 16 else 1
    if chunks <= 1:
        combine_rows_into(stack, method, out)
        return out
    bounds = np.linspace(0, rows, chunks + 1).astype(int)
    args = _kernel_args(method, n)
    with ThreadPoolExecutor(max_workers=min(workers, chunks)) as pool:
        futures = [pool.submit(_combine_rows, stack, out, int(a), int(b), *args)
                   for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
        for f in futures:
            f.result()
    return out


# --------------------------------------------------------------------------- normalization


def level_rows(height: int) -> slice:
    """Rows sampled to measure a frame's level: every step-th row, at most 256 of them,
    spread over the whole height."""
    if height <= 0:
        return slice(0, 0)
    step = -(-height // LEVEL_ROWS)
    return slice(step // 2, height, step)


def frame_level(rows: np.ndarray) -> float:
    """The level of a calibrated frame from its sampled rows: their float64 mean."""
    # contiguous, so that the summation order (hence the rounding) does not depend on
    # whether the rows came as a strided view or as a copy
    rows = np.ascontiguousarray(rows)
    if rows.size == 0:
        raise ValueError("no pixels to measure a level from")
    return float(np.mean(rows, dtype=np.float64))


def check_level(level: float) -> Optional[str]:
    """Why a level cannot be normalized (None if it can)."""
    if not math.isfinite(level):
        return f"level is {level} (not a finite number)"
    if level <= 0:
        return f"level is {level:.6g} ADU after calibration (must be > 0 to normalize)"
    return None


def normalization_factors(levels: Sequence[float]) -> np.ndarray:
    """Multiplicative factors mean(levels) / level_i, as float32, one per frame."""
    levels = [float(x) for x in levels]
    if not levels:
        raise ValueError("no levels to normalize")
    for i, level in enumerate(levels):
        problem = check_level(level)
        if problem:
            raise ValueError(f"frame {i}: {problem}")
    mean = math.fsum(levels) / len(levels)
    return np.array([mean / level for level in levels], dtype=np.float32)


def normalize(stack: np.ndarray, factors) -> None:
    """In place: stack[i] *= factors[i] (float32)."""
    factors = np.asarray(factors, dtype=np.float32)
    if factors.shape != (stack.shape[0],):
        raise ValueError(f"{factors.shape[0] if factors.ndim else 1} factors for {stack.shape[0]} frames")
    for i, f in enumerate(factors):
        if f != 1.0:
            stack[i] *= f


# --------------------------------------------------------------------------- reference combiner


Calib = Union[None, float, int, np.ndarray]


class Combiner:
    """Whole frames in memory, ccdproc style: the reference the streaming stacker equals.

    images: a (N, H, W) array or a list of (H, W) arrays (already scaled by BZERO/BSCALE).
    calibrations: per frame, None (nothing subtracted), a scalar pedestal or an (H, W)
    array (dark or bias); or one of those for every frame.
    normalize: "none" or "multiplicative".

    combine(method) subtracts each calibration, clips to [0, 65535] where something was
    subtracted, measures each frame's level on level_rows(), normalizes (multiplicative:
    x * mean(levels) / level) and combines. Afterwards .levels and .factors hold what
    was measured and applied.
    """

    def __init__(self, images, calibrations: Union[Calib, Sequence[Calib]] = None, normalize: str = "none"):
        if normalize not in ("none", "multiplicative"):
            raise ValueError(f"normalize is 'none' or 'multiplicative', got {normalize!r}")
        stack = np.array([np.asarray(im, dtype=np.float32) for im in images], dtype=np.float32)
        if stack.ndim != 3:
            raise ValueError("images must all be 2-D and of the same shape")
        self.stack = stack
        n = stack.shape[0]
        if calibrations is None or np.isscalar(calibrations) or (isinstance(calibrations, np.ndarray) and calibrations.ndim == 2):
            calibrations = [calibrations] * n
        if len(calibrations) != n:
            raise ValueError(f"{len(calibrations)} calibrations for {n} images")
        self.calibrations = list(calibrations)
        self.normalize = normalize
        self.levels: list[float] = []
        self.factors: list[float] = []

    def calibrated(self) -> np.ndarray:
        stack = self.stack.copy()
        for i, cal in enumerate(self.calibrations):
            if cal is None:
                continue
            if np.isscalar(cal):
                stack[i] -= np.float32(cal)
            else:
                cal = np.asarray(cal, dtype=np.float32)
                if cal.shape != stack.shape[1:]:
                    raise ValueError(f"calibration {i} has shape {cal.shape}, images {stack.shape[1:]}")
                stack[i] -= cal
            np.clip(stack[i], 0.0, CLIP_MAX, out=stack[i])
        return stack

    def combine(self, method: Method) -> np.ndarray:
        stack = self.calibrated()
        sample = level_rows(stack.shape[1])
        self.levels = [frame_level(stack[i, sample]) for i in range(stack.shape[0])]
        if self.normalize == "multiplicative":
            factors = normalization_factors(self.levels)
            normalize(stack, factors)
        else:
            factors = np.ones(stack.shape[0], dtype=np.float32)
        self.factors = [float(f) for f in factors]
        return combine(stack, method)
