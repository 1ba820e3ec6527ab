"""The combine kernels and normalization, on an in-memory stack of one band.

Pure numpy/numba, no I/O. A stack is a C-contiguous float32 array of shape
(N, rows, cols): N frames of one band. Every method (flatd.stack.methods) reduces each pixel
"column" of N values to one float32 value in two stages, with the original
MasterFlatMaker's semantics (in float):

- rejection decides which values of a column are kept (REJECTIONS, by name):
  ``minmax n``: per pass drop every copy of the column's minimum, then every copy of
  the maximum of what is left; n passes. A pass that would empty the column is not
  made, so with d distinct values k = min(n, (d-1)//2) passes are made;
  ``sigma z``: one pass; column mean and population standard deviation; values with
  |x - mean| / std > z (strictly) are rejected (nothing when std == 0); a column where
  everything is rejected (z < 1) falls back to min/max clip n=2;
- an estimator combines what was kept (ESTIMATORS, by name): ``mean``; ``median``
  (even count: the mean of the two middle values). A column where nothing is kept is NaN.

A method without rejection (mean, median) skips the keep-mask entirely.

The kernels work on tiles of one row by a few hundred columns (up to 1024) and loop
over the frames on the outside and over the columns on the inside, so the work
vectorizes across pixels; column statistics are accumulated in float64. The median
uses a pruned Batcher sorting network applied to whole tile rows (compare-exchange of
two frames' rows). A rejection kernel writes a uint8 keep-mask of (N, tile width) that
the estimator reads. Kernels are passed to the row drivers as first-class functions of
fixed signatures (REJECT_SIG, ESTIMATE_SIG, ESTIMATE_KEPT_SIG), which keeps numba's
on-disk cache usable.
"""

from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
from numba import njit, types
from numba.core.types import WrapperAddressProtocol

try:  # numba's lookup of a compiled function's address (not public API: a fallback below)
    from numba.experimental.function_type import _get_wrapper_address
except ImportError:  # pragma: no cover
    _get_wrapper_address = None

from flatd.stack.methods import Method  # noqa: F401  (re-exported: from flatd.stack.combine import Method)

CLIP_MAX = 65535.0
# Rows sampled to measure a frame's level: at most this many.
LEVEL_ROWS = 256

# --------------------------------------------------------------------------- signatures

_STACK = types.float32[:, :, ::1]
_OUT = types.float32[:, ::1]
_KEEP = types.uint8[:, ::1]
_NET = types.int64[:, ::1]
_I = types.intp
# reject(stack, r, c0, c1, params, keep): keep[i, c - c0] = 1 if stack[i, r, c] is kept, else 0
REJECT_SIG = types.void(_STACK, _I, _I, _I, types.float64[::1], _KEEP)
# estimate(stack, out, r, c0, c1, net): out[r, c0:c1] from every value
ESTIMATE_SIG = types.void(_STACK, _OUT, _I, _I, _I, _NET)
# estimate_kept(stack, keep, out, r, c0, c1, net): out[r, c0:c1] from the kept values
ESTIMATE_KEPT_SIG = types.void(_STACK, _KEEP, _OUT, _I, _I, _I, _NET)


class Kernel:
    """A numba function of a fixed signature, compiled (or loaded from numba's cache)
    at its first use, so that importing this module compiles nothing."""

    def __init__(self, signature, func: Callable, cache: bool = True):
        self.signature, self.func, self.cache = signature, func, cache
        self._compiled = None
        self._lock = threading.Lock()

    @property
    def compiled(self):
        with self._lock:
            if self._compiled is None:
                self._compiled = njit(self.signature, nogil=True, cache=self.cache)(self.func)
                self._pointer = (_Pointer(self._compiled, self.signature) if _get_wrapper_address
                                 else self._compiled)
            return self._compiled

    @property
    def pointer(self) -> "_Pointer":
        """The kernel as a first-class function argument of a driver."""
        self.compiled
        return self._pointer


class _Pointer(WrapperAddressProtocol):
    """A compiled kernel's address, looked up once: numba otherwise looks it up at
    every call of a driver that takes the kernel as an argument (~50 us each)."""

    def __init__(self, dispatcher, signature):
        self.dispatcher = dispatcher  # keeps the machine code alive
        self.sig = signature
        self.address = _get_wrapper_address(dispatcher, signature)

    def __wrapper_address__(self):
        return self.address

    def signature(self):
        return self.sig


def _kernel_of(signature):
    return lambda func: Kernel(signature, func)


def rejection_kernel(func: Callable, cache: bool = True) -> Kernel:
    """A rejection kernel (REJECT_SIG) for REJECTIONS, from a plain Python function."""
    return Kernel(REJECT_SIG, func, cache)


# --------------------------------------------------------------------------- estimators


@_kernel_of(ESTIMATE_SIG)
def _mean(stack, out, r, c0, c1, net):
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


@njit(nogil=True, cache=True, inline="always")
def _compare_exchange(s, net):
    """Apply a sorting network to whole rows of s: after it, s[k] holds the k-th
    smallest value of each column (for the outputs the network was pruned to)."""
    w = s.shape[1]
    for k in range(net.shape[0]):
        a = s[net[k, 0]]
        b = s[net[k, 1]]
        for c in range(w):
            x = a[c]
            y = b[c]
            if y < x:
                a[c] = y
                b[c] = x


@_kernel_of(ESTIMATE_SIG)
def _median(stack, out, r, c0, c1, net):
    n = stack.shape[0]
    w = c1 - c0
    s = np.empty((n, w), np.float32)
    for i in range(n):
        row = stack[i, r, c0:c1]
        for c in range(w):
            s[i, c] = row[c]
    _compare_exchange(s, net)
    orow = out[r, c0:c1]
    lo = s[(n - 1) // 2]
    hi = s[n // 2]
    for c in range(w):
        orow[c] = (np.float64(lo[c]) + np.float64(hi[c])) * 0.5


@_kernel_of(ESTIMATE_KEPT_SIG)
def _mean_kept(stack, keep, out, r, c0, c1, net):
    n = stack.shape[0]
    w = c1 - c0
    acc = np.zeros(w, np.float64)
    cnt = np.zeros(w, np.int32)
    for i in range(n):
        row = stack[i, r, c0:c1]
        k = keep[i]
        for c in range(w):
            if k[c]:
                acc[c] += row[c]
        for c in range(w):  # a loop of its own: together they do not vectorize
            cnt[c] += k[c]
    orow = out[r, c0:c1]
    for c in range(w):
        orow[c] = acc[c] / cnt[c] if cnt[c] > 0 else np.nan


@_kernel_of(ESTIMATE_KEPT_SIG)
def _median_kept(stack, keep, out, r, c0, c1, net):
    # rejected values become +inf and sort last; `net` sorts the whole column
    n = stack.shape[0]
    w = c1 - c0
    s = np.empty((n, w), np.float32)
    cnt = np.zeros(w, np.int64)
    inf = np.float32(np.inf)
    for i in range(n):
        row = stack[i, r, c0:c1]
        k = keep[i]
        for c in range(w):
            s[i, c] = row[c] if k[c] else inf
            cnt[c] += k[c]
    _compare_exchange(s, net)
    orow = out[r, c0:c1]
    for c in range(w):
        m = cnt[c]
        if m > 0:
            orow[c] = (np.float64(s[(m - 1) // 2, c]) + np.float64(s[m // 2, c])) * 0.5
        else:
            orow[c] = np.nan


# --------------------------------------------------------------------------- rejections


@njit(nogil=True, cache=True)
def _minmax_keep(stack, r, c0, c1, passes, keep, k0):
    """Min/max clip of columns c0..c1 of row r into keep[:, k0:k0 + c1 - c0]."""
    n = stack.shape[0]
    w = c1 - c0
    inf = np.float32(np.inf)
    lo = np.full(w, -inf, np.float32)
    hi = np.full(w, inf, np.float32)
    nlo = np.empty(w, np.float32)
    nhi = np.empty(w, np.float32)
    cnt = np.zeros(w, np.int64)
    clipped = np.zeros(w, np.bool_)  # a pass was made: keep lo < x < hi (else keep all)
    written = np.zeros(w, np.bool_)  # the mask holds the column's last successful pass
    for p in range(passes):
        for c in range(w):
            nlo[c] = inf
            nhi[c] = -inf
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
        last = p == passes - 1
        for i in range(n):
            row = stack[i, r, c0:c1]
            k = keep[i, k0:k0 + w]
            for c in range(w):
                x = row[c]
                inside = x > nlo[c] and x < nhi[c]
                cnt[c] += inside
                if last:  # the last pass writes the mask on the way
                    k[c] = inside
        changed = 0
        for c in range(w):
            if cnt[c] > 0:  # else the pass would empty the column: keep the previous one
                lo[c] = nlo[c]
                hi[c] = nhi[c]
                clipped[c] = True
                written[c] = last
                changed += 1
        if changed == 0:
            break
    # columns whose last pass was not made (few distinct values): their mask from lo, hi
    todo = 0
    for c in range(w):
        todo += not written[c]
    if todo:
        for i in range(n):
            row = stack[i, r, c0:c1]
            k = keep[i, k0:k0 + w]
            for c in range(w):
                if not written[c]:
                    x = row[c]
                    k[c] = (x > lo[c] and x < hi[c]) or not clipped[c]


@_kernel_of(REJECT_SIG)
def _reject_minmax(stack, r, c0, c1, params, keep):
    _minmax_keep(stack, r, c0, c1, int(params[0]), keep, 0)


@_kernel_of(REJECT_SIG)
def _reject_sigma(stack, r, c0, c1, params, keep):
    # |x - mean| / std > z  <=>  N * D^2 > z^2 * sum_j D_j^2   with D = N*x - sum(x)
    # (exact for integer data; two-pass accuracy for any data; std == 0 rejects nothing)
    n = stack.shape[0]
    w = c1 - c0
    fn = np.float64(n)
    z2 = params[0] * params[0]
    s = np.zeros(w, np.float64)
    v = np.zeros(w, np.float64)
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
        k = keep[i]
        for c in range(w):
            d = fn * row[c] - s[c]
            k[c] = not (fn * d * d > v[c])
    # Some |x - mean| <= std in every column, so only z < 1 can reject a whole column
    # (rounding is ~n * 1e-16 relative, far inside the margin): only then is it looked for.
    if z2 < 1.0001:
        _minmax_where_none_kept(stack, r, c0, c1, keep)


@njit(nogil=True, cache=True)
def _minmax_where_none_kept(stack, r, c0, c1, keep):
    """Columns where nothing is kept: the original falls back to min/max clip n=2."""
    w = c1 - c0
    cnt = np.zeros(w, np.int32)
    for i in range(stack.shape[0]):
        k = keep[i]
        for c in range(w):
            cnt[c] += k[c]
    for c in range(w):
        if cnt[c] == 0:
            _minmax_keep(stack, r, c0 + c, c0 + c + 1, 2, keep, c)


# --------------------------------------------------------------------------- tables and drivers


@dataclass(frozen=True)
class Estimator:
    """An estimator's kernels: on every value, on the kept values; the network (int64
    pairs) each needs for N frames; and the values in a tile (N x columns) it runs
    fastest on: the median sorts a copy of the tile, best in L1; for the mean, larger
    tiles in L2 measured faster (less work done once per tile, such as the calls)."""

    every: Kernel
    kept: Kernel
    network: Callable[[int, bool], np.ndarray]
    tile_values: int


def _no_network(n: int, kept: bool) -> np.ndarray:
    return _EMPTY_NET


def _median_networks(n: int, kept: bool) -> np.ndarray:
    return sort_network(n) if kept else median_network(n)[0]


# flatd.stack.methods entries name these: Entry.reject and Entry.estimator
REJECTIONS: dict[str, Kernel] = {"minmax": _reject_minmax, "sigma": _reject_sigma}
ESTIMATORS: dict[str, Estimator] = {
    "mean": Estimator(_mean, _mean_kept, _no_network, tile_values=32768),
    "median": Estimator(_median, _median_kept, _median_networks, tile_values=8192),
}

@_kernel_of(types.void(_STACK, _OUT, _I, _I, types.FunctionType(ESTIMATE_SIG), _NET, _I))
def _rows_every(stack, out, r0, r1, estimate, net, tile):
    """Rows r0..r1, every value estimated, in this thread (GIL released)."""
    ncols = stack.shape[2]
    for r in range(r0, r1):
        for c0 in range(0, ncols, tile):
            estimate(stack, out, r, c0, min(ncols, c0 + tile), net)


@_kernel_of(types.void(_STACK, _OUT, _I, _I, types.FunctionType(REJECT_SIG), types.float64[::1],
                       types.FunctionType(ESTIMATE_KEPT_SIG), _NET, _I))
def _rows_kept(stack, out, r0, r1, reject, params, estimate, net, tile):
    """Rows r0..r1: rejection, then the estimate of what was kept, tile by tile."""
    ncols = stack.shape[2]
    keep = np.empty((stack.shape[0], tile), np.uint8)
    for r in range(r0, r1):
        for c0 in range(0, ncols, tile):
            c1 = min(ncols, c0 + tile)
            reject(stack, r, c0, c1, params, keep)
            estimate(stack, keep, out, r, c0, c1, net)


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


@lru_cache(maxsize=64)
def sort_network(n: int) -> np.ndarray:
    """Compare-exchange pairs (int64, shape (M, 2)) that sort n values ascending:
    Batcher's network for the next power of two without the padding (+inf)."""
    size = 1
    while size < n:
        size *= 2
    return np.array([(a, b) for a, b in _batcher_pairs(size) if b < n], dtype=np.int64).reshape(-1, 2)


# --------------------------------------------------------------------------- entry points


def _tile_width(n: int, budget: int) -> int:
    """Columns per tile: about `budget` values (the estimator's) in a tile of N rows."""
    return int(min(1024, max(128, (budget // max(n, 1)) // 16 * 16)))


_EMPTY_NET = np.zeros((0, 2), dtype=np.int64)


def _kernel(method: Method, n: int) -> tuple[Any, tuple]:
    """The row driver for `method` on N frames and its arguments after (stack, out, r0, r1)."""
    entry = method.entry
    estimator = ESTIMATORS.get(entry.estimator)
    if estimator is None:
        raise ValueError(f"combine method {entry.name}: no estimator kernel {entry.estimator!r}")
    if entry.reject is None:
        return _rows_every.compiled, (estimator.every.pointer, estimator.network(n, False),
                                      _tile_width(n, estimator.tile_values))
    reject = REJECTIONS.get(entry.reject)
    if reject is None:
        raise ValueError(f"combine method {entry.name}: no rejection kernel {entry.reject!r}")
    params = np.array([float(method.params[p.name]) for p in entry.params], dtype=np.float64)
    return _rows_kept.compiled, (reject.pointer, params, estimator.kept.pointer, estimator.network(n, True),
                                 _tile_width(n, estimator.tile_values))


def combine_rows_into(stack: np.ndarray, method: Method, out: np.ndarray, r0: int = 0, r1: Optional[int] = None) -> None:
    """Combine rows r0..r1 of a float32 C-contiguous (N, rows, cols) stack into the
    float32 C-contiguous (rows, cols) `out`, in the calling thread (the GIL is released)."""
    if r1 is None:
        r1 = stack.shape[1]
    if r1 <= r0 or stack.shape[2] == 0:
        return
    driver, args = _kernel(method, stack.shape[0])
    driver(stack, out, r0, r1, *args)


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
    driver, args = _kernel(method, n)
    with ThreadPoolExecutor(max_workers=min(workers, chunks)) as pool:
        futures = [pool.submit(driver, stack, out, int(a), int(b), *args)
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
