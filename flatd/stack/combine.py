"""The combine methods' kernels and normalization, on an in-memory stack of one band.

No I/O. A stack is a C-contiguous float32 array of shape (N, rows, cols): N frames of
one band. Every method (flatd.stack.methods) reduces each pixel "column" of N values to
one float32 value in two stages, with the original MasterFlatMaker's semantics (in float):

- rejection decides which values of a column are kept (REJECTIONS, by name):
  ``minmax n``: per pass drop every copy of the column's minimum, then every copy of
  the maximum of what is left; n passes. A pass that would empty the column is not
  made, so with d distinct values k = min(n, (d-1)//2) passes are made;
  ``sigma z``: one pass; column mean and population standard deviation; values with
  |x - mean| / std > z (strictly) are rejected (nothing when std == 0); a column where
  everything is rejected (z < 1) falls back to min/max clip n=2;
  the robust rejections of issue 9 (``sigma-iterative``, ``winsorized``, ``linear-fit``,
  ``esd``, ``mad``, ``percentile``): see _kernels_body.h and the README;
- an estimator combines what was kept (ESTIMATORS, by name): ``mean``; ``median``
  (even count: the mean of the two middle values). A column where nothing is kept is NaN.

The keep-mask says how each value was decided: 1 kept, 0 rejected low (below the
column's centre), 2 rejected high; estimators read only 1. combine() and
combine_rows_into() count the rejections when asked: frame_counts (int64, (N, 2)) is
incremented by each frame's low and high rejections, pixel_counts (uint16, (2, rows,
cols)) set to each pixel's; without them the drivers do not count (no cost).

The kernels are C (_kernels.c and _kernels_body.h, built by the install; compiled for the
baseline instruction set and for AVX2, chosen at import). They work on tiles of one row
by up to 1024 columns and loop over the frames outside and the columns inside, so the
work vectorizes across pixels; column statistics are accumulated in float64. The median
is a pruned Batcher sorting network applied to whole tile rows; the robust rejections
sort each tile with a full network, then run per column on the sorted values. A method
without rejection (mean, median) skips the keep-mask entirely. A rejection may also be
a Python function (rejection_kernel): its keep codes are computed in Python and handed
to the same driver.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

from flatd.stack import _kernels
from flatd.stack.methods import Method  # noqa: F401  (re-exported: from flatd.stack.combine import Method)

CLIP_MAX = 65535.0
WINSOR_ITERATIONS = _kernels.WINSOR_ITERATIONS  # Huber's winsorization converges in a few; a bound against cycles


# --------------------------------------------------------------------------- kernel tables


@dataclass(frozen=True)
class Rejection:
    """A rejection kernel: a compiled one by its number in _kernels.c, or a Python
    function ``func(stack, r, c0, c1, params, keep)`` that sets keep[i, c - c0] to 1
    (kept), 0 (rejected low) or 2 (rejected high) for each value stack[i, r, c] (a
    method added from outside the package: slow, but any code will do)."""

    code: int = 0
    func: Optional[Callable] = None


@dataclass(frozen=True)
class Estimator:
    """An estimator: its number in _kernels.c, the network (int64 pairs) it needs for N
    frames, and the values in a tile (N x columns) it runs fastest on: the median sorts
    a copy of the tile, best in L1; the mean streams, larger tiles cost less per call."""

    code: int
    network: Callable[[int, bool], np.ndarray]
    tile_values: int


GIVEN = _kernels.REJECTIONS["given"]  # keep codes computed in Python


def rejection_kernel(func: Callable) -> Rejection:
    """A rejection for REJECTIONS from a plain Python function (see Rejection)."""
    return Rejection(func=func)


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b) (modified Lentz continued fraction)."""
    return _kernels.betainc(float(a), float(b), float(x))


def t_ppf(p: float, df: float) -> float:
    """The p-quantile of Student's t with df degrees of freedom: P(T <= t) = p.

    For t > 0, P(T > t) = I_x(df/2, 1/2) / 2 with x = df / (df + t^2); x is found by
    bisection (on log x, 200 steps), then t = sqrt(df (1 - x) / x)."""
    return _kernels.t_ppf(float(p), float(df))


def esd_critical(n: int, outliers: float, alpha: float) -> list[float]:
    """Rosner's critical values lambda_1..lambda_r of the generalized ESD test for n
    values: r = min(floor(n * outliers), n - 2) and, with n_i = n - i + 1 values left,
    lambda_i = (n_i - 1) t / sqrt((n_i - 2 + t^2) n_i), t = t_ppf(1 - alpha / (2 n_i), n_i - 2)."""
    r = max(0, min(int(n * outliers), n - 2))
    lam = []
    for i in range(1, r + 1):
        ni = n - i + 1
        t = t_ppf(1.0 - alpha / (2.0 * ni), float(ni - 2))
        lam.append((ni - 1) * t / math.sqrt((ni - 2 + t * t) * ni))
    return lam


def _esd_params(params: np.ndarray, n: int) -> np.ndarray:
    """outliers, significance, low relaxation, then r and lambda_1..lambda_r."""
    lam = _esd_lambdas(n, float(params[0]), float(params[1]))
    return np.concatenate([params, [float(len(lam))], np.array(lam, np.float64)])


@lru_cache(maxsize=256)
def _esd_lambdas(n: int, outliers: float, alpha: float) -> tuple[float, ...]:
    return tuple(esd_critical(n, outliers, alpha))


# Rejections whose kernel needs more than the method's parameters (computed once per N).
PARAMS_FOR_N: dict[str, Callable[[np.ndarray, int], np.ndarray]] = {"esd": _esd_params}
# Rejections that sort each column (a sort network for N values), on tiles of about
# SORTED_TILE_VALUES values (32 KB: the sorted tile stays in L1 while its columns are read).
SORTED = {"sigma-iterative", "winsorized", "linear-fit", "esd", "mad", "percentile"}
SORTED_TILE_VALUES = 8192


def _no_network(n: int, kept: bool) -> np.ndarray:
    return _EMPTY_NET


def _median_networks(n: int, kept: bool) -> np.ndarray:
    return sort_network(n) if kept else median_network(n)[0]


# flatd.stack.methods entries name these: Entry.reject and Entry.estimator
REJECTIONS: dict[str, Rejection] = {name: Rejection(code) for name, code in _kernels.REJECTIONS.items()
                                     if name != "given"}
ESTIMATORS: dict[str, Estimator] = {
    "mean": Estimator(_kernels.ESTIMATORS["mean"], _no_network, tile_values=32768),
    "median": Estimator(_kernels.ESTIMATORS["median"], _median_networks, tile_values=8192),
}


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


@dataclass(frozen=True)
class KernelPlan:
    """What _kernels.combine_rows runs for a method on N frames: the rejection's number
    (0: none, no keep-mask at all), its parameters and sort network, the estimator's
    number and network, the tile width; `func` for a rejection written in Python."""

    reject: int
    params: np.ndarray
    rnet: np.ndarray
    estimator: int
    enet: np.ndarray
    tile: int
    func: Optional[Callable] = field(default=None, compare=False)


def _rejection_params(method: Method, n: int) -> np.ndarray:
    entry = method.entry
    params = np.array([float(method.params[p.name]) for p in entry.params], dtype=np.float64)
    if entry.reject in PARAMS_FOR_N:
        params = PARAMS_FOR_N[entry.reject](params, n)
    return params


def _kernel(method: Method, n: int) -> KernelPlan:
    """The kernel plan for `method` on N frames."""
    entry = method.entry
    estimator = ESTIMATORS.get(entry.estimator)
    if estimator is None:
        raise ValueError(f"combine method {entry.name}: no estimator kernel {entry.estimator!r}")
    tile = _tile_width(n, estimator.tile_values)
    if entry.reject is None:
        return KernelPlan(0, _NO_PARAMS, _EMPTY_NET, estimator.code, estimator.network(n, False), tile)
    rejection = REJECTIONS.get(entry.reject)
    if rejection is None:
        raise ValueError(f"combine method {entry.name}: no rejection kernel {entry.reject!r}")
    rnet = _EMPTY_NET
    if entry.reject in SORTED:
        # the sorted tile is read column by column: in L1 it costs a third less than in L2
        rnet, tile = sort_network(n), min(tile, _tile_width(n, SORTED_TILE_VALUES))
    return KernelPlan(rejection.code if rejection.func is None else GIVEN, _rejection_params(method, n), rnet,
                      estimator.code, estimator.network(n, True), tile, rejection.func)


_NO_PARAMS = np.zeros(0, dtype=np.float64)


def _check_counts(frame_counts, pixel_counts, n: int, shape: tuple) -> None:
    if frame_counts is not None and (not isinstance(frame_counts, np.ndarray) or frame_counts.dtype != np.int64
                                     or frame_counts.shape != (n, 2) or not frame_counts.flags.c_contiguous
                                     or not frame_counts.flags.writeable):
        raise ValueError(f"frame_counts must be a writeable C-contiguous int64 array of shape {(n, 2)}")
    if pixel_counts is not None and (not isinstance(pixel_counts, np.ndarray) or pixel_counts.dtype != np.uint16
                                     or pixel_counts.shape != shape or not pixel_counts.flags.c_contiguous
                                     or not pixel_counts.flags.writeable):
        raise ValueError(f"pixel_counts must be a writeable C-contiguous uint16 array of shape {shape}")


def _python_codes(stack: np.ndarray, plan: KernelPlan, r0: int, r1: int) -> np.ndarray:
    """The keep codes of rows r0..r1, (N, r1 - r0, cols), from a Python rejection."""
    n, _, cols = stack.shape
    codes = np.empty((n, r1 - r0, cols), dtype=np.uint8)
    keep = np.empty((n, cols), dtype=np.uint8)
    for r in range(r0, r1):
        plan.func(stack, r, 0, cols, plan.params, keep)
        codes[:, r - r0] = keep
    return codes


def _run_rows(stack, out, r0, r1, plan: KernelPlan, frame_counts, pixel_counts, prow0) -> None:
    """Rows r0..r1 through the compiled driver; counting into whichever array is given."""
    n, rows, cols = stack.shape
    given = _python_codes(stack, plan, r0, r1) if plan.func is not None else None
    if plan.reject == 0 and pixel_counts is not None:  # nothing is rejected
        pixel_counts[:, r0 - prow0:r1 - prow0] = 0
        pixel_counts = None
    _kernels.combine_rows(stack, n, rows, cols, out, r0, r1, plan.reject, plan.params, plan.estimator, plan.enet,
                          plan.rnet, plan.tile, frame_counts, pixel_counts, prow0, given, r0)


def _check_out(out, shape: tuple) -> None:
    if not isinstance(out, np.ndarray) or out.shape != shape or out.dtype != np.float32 \
            or not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError(f"out must be a writeable C-contiguous float32 array of shape {shape}")


def combine_rows_into(stack: np.ndarray, method: Method, out: np.ndarray, r0: int = 0, r1: Optional[int] = None,
                      frame_counts: Optional[np.ndarray] = None, pixel_counts: Optional[np.ndarray] = None) -> None:
    """Combine rows r0..r1 of a float32 C-contiguous (N, rows, cols) stack into the
    float32 C-contiguous (rows, cols) `out`, in the calling thread (the GIL is released).

    frame_counts: int64 (N, 2), incremented by the values of each frame rejected low
    ([:, 0]) and high ([:, 1]) in these rows. pixel_counts: uint16 (2, r1 - r0, cols), set
    to the low and high rejections of each pixel of these rows. None: not counted."""
    if not isinstance(stack, np.ndarray) or stack.ndim != 3 or stack.dtype != np.float32 \
            or not stack.flags.c_contiguous or stack.shape[0] == 0:
        raise ValueError("stack must be a C-contiguous float32 array of shape (frames > 0, rows, cols)")
    n, rows, cols = stack.shape
    if r1 is None:
        r1 = rows
    _check_out(out, (rows, cols))
    _check_counts(frame_counts, pixel_counts, n, (2, max(r1 - r0, 0), cols))
    if r1 <= r0 or cols == 0:
        return
    if not (0 <= r0 and r1 <= rows):
        raise ValueError(f"rows {r0}:{r1} outside 0:{rows}")
    _run_rows(stack, out, r0, r1, _kernel(method, n), frame_counts, pixel_counts, r0)


def reject_codes(stack: np.ndarray, method: Method) -> np.ndarray:
    """The keep-mask of every value, (N, rows, cols) uint8: 1 kept, 0 rejected low, 2
    rejected high (all 1 for a method without rejection). For tests and diagnostics:
    the rejection kernel on whole rows, one thread."""
    stack = _as_stack(stack)
    n, rows, cols = stack.shape
    codes = np.ones((n, rows, cols), dtype=np.uint8)
    plan = _kernel(method, n)
    if plan.reject == 0 or cols == 0:
        return codes
    if plan.func is not None:
        return _python_codes(stack, plan, 0, rows)
    keep = np.empty((n, cols), dtype=np.uint8)
    for r in range(rows):
        _kernels.reject_row(stack, n, rows, cols, r, plan.reject, plan.params, plan.rnet, keep)
        codes[:, r] = keep
    return codes


def _as_stack(stack) -> np.ndarray:
    stack = np.asarray(stack)
    if stack.ndim != 3:
        raise ValueError(f"a stack has shape (frames, rows, cols); got shape {stack.shape}")
    if stack.shape[0] == 0:
        raise ValueError("cannot combine an empty stack (no frames)")
    return np.ascontiguousarray(stack, dtype=np.float32)


def default_workers() -> int:
    """The CPUs this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def combine(stack: np.ndarray, method: Method, workers: Optional[int] = None, out: Optional[np.ndarray] = None,
            frame_counts: Optional[np.ndarray] = None, pixel_counts: Optional[np.ndarray] = None) -> np.ndarray:
    """Combine a (N, rows, cols) float32 stack into a (rows, cols) float32 image.

    The stack is not modified. Rows are shared between `workers` threads (default: the
    number of CPUs); the kernels release the GIL. frame_counts (int64 (N, 2)) is
    incremented by the values of each frame rejected low and high; pixel_counts (uint16
    (2, rows, cols)) is set to each pixel's low and high rejections (see combine_rows_into).
    """
    stack = _as_stack(stack)
    n, rows, cols = stack.shape
    if out is None:
        out = np.empty((rows, cols), dtype=np.float32)
    else:
        _check_out(out, (rows, cols))
    _check_counts(frame_counts, pixel_counts, n, (2, rows, cols))
    if rows == 0 or cols == 0:
        return out
    workers = workers or default_workers()
    # enough chunks to balance the threads, each at least a few rows' worth of work
    chunks = min(rows, workers * 4) if workers > 1 and rows * cols * n >= 1 << 16 else 1
    if chunks <= 1:
        combine_rows_into(stack, method, out, frame_counts=frame_counts, pixel_counts=pixel_counts)
        return out
    bounds = np.linspace(0, rows, chunks + 1).astype(int)
    plan = _kernel(method, n)
    spans = [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    # each chunk counts into its own array (summed below); pixel rows do not overlap
    own = [np.zeros((n, 2), np.int64) if frame_counts is not None else None for _ in spans]
    with ThreadPoolExecutor(max_workers=min(workers, chunks)) as pool:
        futures = [pool.submit(_run_rows, stack, out, a, b, plan, fc, pixel_counts, 0)
                   for (a, b), fc in zip(spans, own)]
        for f in futures:
            f.result()
    if frame_counts is not None:
        for fc in own:
            frame_counts += fc
    return out


# --------------------------------------------------------------------------- normalization


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
    subtracted, measures each frame's level (flatd.stack.levels.frame_level), normalizes (multiplicative:
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
        from flatd.stack import levels as LV  # the engine's estimator, on the same grid

        n, height, width = stack.shape
        step = LV.grid_step(height, width)
        samples = np.stack([LV.grid(stack[i], step).ravel() for i in range(n)]).astype(np.float32)
        self.levels = LV.relative_levels(samples)
        if self.normalize == "multiplicative":
            factors = normalization_factors(self.levels)
            normalize(stack, factors)
        else:
            factors = np.ones(stack.shape[0], dtype=np.float32)
        self.factors = [float(f) for f in factors]
        return combine(stack, method)

