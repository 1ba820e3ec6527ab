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
  the robust rejections of issue 9 (``sigma-iterative``, ``winsorized``, ``linear-fit``,
  ``esd``, ``mad``, ``percentile``): see "robust rejections" below and the README;
- an estimator combines what was kept (ESTIMATORS, by name): ``mean``; ``median``
  (even count: the mean of the two middle values). A column where nothing is kept is NaN.

The keep-mask says how each value was decided: 1 kept, 0 rejected low (below the
column's centre), 2 rejected high; estimators read only 1. combine() and
combine_rows_into() count the rejections when asked: frame_counts (int64, (N, 2)) is
incremented by each frame's low and high rejections, pixel_counts (uint16, (2, rows,
cols)) set to each pixel's; without them the drivers do not count (no cost).

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

# --------------------------------------------------------------------------- signatures

_STACK = types.float32[:, :, ::1]
_OUT = types.float32[:, ::1]
_KEEP = types.uint8[:, ::1]
_NET = types.int64[:, ::1]
_I = types.intp
# reject(stack, r, c0, c1, params, keep): keep[i, c - c0] = 1 if stack[i, r, c] is kept, 0 if it
# is rejected low (below the column's centre), 2 if rejected high; estimators keep only 1
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
            if k[c] & 1:  # code 1: kept (0 and 2: rejected low, high)
                acc[c] += row[c]
        for c in range(w):  # a loop of its own: together they do not vectorize
            cnt[c] += k[c] & 1
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
            s[i, c] = row[c] if k[c] & 1 else inf
            cnt[c] += k[c] & 1
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
                inside = (x > nlo[c]) & (x < nhi[c])
                cnt[c] += inside
                if last:  # the last pass writes the mask on the way: 1 kept, 0 low, 2 high
                    k[c] = np.uint8(inside) + np.uint8(2) * np.uint8(x >= nhi[c])
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
                    if not clipped[c] or (x > lo[c] and x < hi[c]):
                        k[c] = 1
                    else:
                        k[c] = 0 if x <= lo[c] else 2


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
            out = fn * d * d > v[c]  # rejected: 0 below the mean, 2 above
            k[c] = np.uint8(1) - np.uint8(out) + np.uint8(2) * np.uint8(out & (d > 0))
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
            cnt[c] += k[c] == 1
    for c in range(w):
        if cnt[c] == 0:
            _minmax_keep(stack, r, c0 + c, c0 + c + 1, 2, keep, c)


# --------------------------------------------------------------------------- robust rejections
#
# The six robust rejections (Siril's and PixInsight's) work column by column: the N values
# of a column are insertion-sorted (stably: equal values in frame order) into a scratch
# array with their frame numbers, the algorithm runs on the sorted values in float64, and
# the codes go back to the frames. Four of them (sigma-iterative, winsorized, mad,
# percentile) reject by value about a centre, so what they keep is a range of the sorted
# column and every copy of a value is decided alike: they write the mask from the range's
# end values. linear-fit and esd decide by position in the sorted column.
# A pass that would reject every value left keeps the median value(s) of what was left
# (every copy of them) and stops.


@njit(nogil=True, cache=True)
def _net_from(params, off):
    """The sort network appended to params at `off` (see _with_network)."""
    m = (params.shape[0] - off) // 2
    net = np.empty((m, 2), np.int64)
    for t in range(m):
        net[t, 0] = np.int64(params[off + 2 * t])
        net[t, 1] = np.int64(params[off + 2 * t + 1])
    return net


@njit(nogil=True, cache=True)
def _sorted_tile(stack, r, c0, c1, net):
    """The tile's columns sorted ascending, (N, w): a sorting network on whole rows."""
    n = stack.shape[0]
    w = c1 - c0
    s = np.empty((n, w), np.float32)
    for i in range(n):
        row = stack[i, r, c0:c1]
        for c in range(w):
            s[i, c] = row[c]
    _compare_exchange(s, net)
    return s


@njit(nogil=True, cache=True)
def _sorted_tile_frames(stack, r, c0, c1, net):
    """The tile's columns sorted by (value, frame), and the frame of each sorted value:
    the order of a stable sort."""
    n = stack.shape[0]
    w = c1 - c0
    s = np.empty((n, w), np.float32)
    f = np.empty((n, w), np.int32)
    for i in range(n):
        row = stack[i, r, c0:c1]
        for c in range(w):
            s[i, c] = row[c]
            f[i, c] = i
    for k in range(net.shape[0]):
        a = s[net[k, 0]]
        b = s[net[k, 1]]
        fa = f[net[k, 0]]
        fb = f[net[k, 1]]
        for c in range(w):
            x = a[c]
            y = b[c]
            ix = fa[c]
            iy = fb[c]
            swap = y < x or (y == x and iy < ix)
            a[c] = y if swap else x
            b[c] = x if swap else y
            fa[c] = iy if swap else ix
            fb[c] = ix if swap else iy
    return s, f


@njit(nogil=True, cache=True, inline="always")
def _median_sorted(v, a, b):
    m = b - a
    return (np.float64(v[a + (m - 1) // 2]) + np.float64(v[a + m // 2])) * 0.5


@njit(nogil=True, cache=True, inline="always")
def _sd_sorted(v, a, b):
    """Sample standard deviation (N - 1) of v[a:b], summed in order in float64."""
    m = b - a
    s = 0.0
    for j in range(a, b):
        s += np.float64(v[j])
    mean = s / m
    q = 0.0
    for j in range(a, b):
        d = np.float64(v[j]) - mean
        q += d * d
    return math.sqrt(q / (m - 1))


@njit(nogil=True, cache=True, inline="always")
def _clip_range(v, a, b, centre, dlow, dhigh):
    """The range of v[a:b] (sorted) with centre - x <= dlow and x - centre <= dhigh."""
    na = a
    while na < b and centre - np.float64(v[na]) > dlow:
        na += 1
    nb = b
    while nb > na and np.float64(v[nb - 1]) - centre > dhigh:
        nb -= 1
    return na, nb


@njit(nogil=True, cache=True, inline="always")
def _middle(a, b):
    """The median position(s) of a..b as a range: what an emptied column keeps."""
    m = b - a
    return a + (m - 1) // 2, a + m // 2 + 1


@njit(nogil=True, cache=True)
def _write_ranges(stack, r, c0, c1, lo, hi, keep):
    """keep: 0 below lo, 2 above hi, else 1 (per column of the tile)."""
    w = c1 - c0
    for i in range(stack.shape[0]):
        row = stack[i, r, c0:c1]
        k = keep[i]
        for c in range(w):
            x = row[c]
            k[c] = np.uint8(1) - np.uint8(x < lo[c]) + np.uint8(x > hi[c])


@njit(nogil=True, cache=True)
def _sigma_iterative_range(v, n, low, high):
    a, b = 0, n
    while b - a >= 2:
        centre = _median_sorted(v, a, b)
        sd = _sd_sorted(v, a, b)
        na, nb = _clip_range(v, a, b, centre, low * sd, high * sd)
        if na == nb:
            return _middle(a, b)
        if na == a and nb == b:
            break
        a, b = na, nb
    return a, b


@njit(nogil=True, cache=True)
def _mad_range(v, n, low, high):
    a, b = 0, n
    while b - a >= 2:
        m = b - a
        centre = _median_sorted(v, a, b)
        # the median of |x - centre|: merge the two runs that grow outwards from the centre
        p = a
        while p < b and np.float64(v[p]) < centre:
            p += 1
        left, right = p - 1, p
        d1 = d2 = 0.0
        for t in range(m // 2 + 1):
            if right < b and (left < a or np.float64(v[right]) - centre <= centre - np.float64(v[left])):
                d = np.float64(v[right]) - centre
                right += 1
            else:
                d = centre - np.float64(v[left])
                left -= 1
            if t == (m - 1) // 2:
                d1 = d
            if t == m // 2:
                d2 = d
        sigma = 1.4826 * ((d1 + d2) * 0.5)
        na, nb = _clip_range(v, a, b, centre, low * sigma, high * sigma)
        if na == nb:
            return _middle(a, b)
        if na == a and nb == b:
            break
        a, b = na, nb
    return a, b


@njit(nogil=True, cache=True)
def _winsorized_range(v, n, low, high, wv):
    a, b = 0, n
    while b - a >= 2:
        m = b - a
        centre = _median_sorted(v, a, b)
        sigma = _sd_sorted(v, a, b)
        for j in range(m):
            wv[j] = np.float64(v[a + j])
        for _ in range(WINSOR_ITERATIONS):
            lo = centre - 1.5 * sigma
            hi = centre + 1.5 * sigma
            total = 0.0  # winsorize and sum in one pass (the sums of _sd_sorted, in order)
            for j in range(m):
                x = min(hi, max(lo, wv[j]))
                wv[j] = x
                total += x
            mean = total / m
            q = 0.0
            for j in range(m):
                d = wv[j] - mean
                q += d * d
            sigma0 = sigma
            sigma = 1.134 * math.sqrt(q / (m - 1))
            if not abs(sigma - sigma0) > sigma0 * 0.0005:
                break
        na, nb = _clip_range(v, a, b, centre, low * sigma, high * sigma)
        if na == nb:
            return _middle(a, b)
        if na == a and nb == b:
            break
        a, b = na, nb
    return a, b


@njit(nogil=True, cache=True)
def _percentile_range(v, n, low, high):
    centre = _median_sorted(v, 0, n)
    if not centre > 0:
        return 0, n
    na, nb = _clip_range(v, 0, n, centre, centre * low, centre * high)
    if na == nb:
        return _middle(0, n)
    return na, nb


@njit(nogil=True, cache=True)
def _ranged(stack, r, c0, c1, params, keep, kind):
    n = stack.shape[0]
    w = c1 - c0
    v = np.empty(n, np.float32)
    wv = np.empty(n, np.float64)
    lo = np.empty(w, np.float32)
    hi = np.empty(w, np.float32)
    low = params[0]
    high = params[1]
    s = _sorted_tile(stack, r, c0, c1, _net_from(params, 2))
    for c in range(w):
        for j in range(n):
            v[j] = s[j, c]
        if kind == 0:
            a, b = _sigma_iterative_range(v, n, low, high)
        elif kind == 1:
            a, b = _winsorized_range(v, n, low, high, wv)
        elif kind == 2:
            a, b = _mad_range(v, n, low, high)
        else:
            a, b = _percentile_range(v, n, low, high)
        lo[c] = v[a]
        hi[c] = v[b - 1]
    _write_ranges(stack, r, c0, c1, lo, hi, keep)


@_kernel_of(REJECT_SIG)
def _reject_sigma_iterative(stack, r, c0, c1, params, keep):
    _ranged(stack, r, c0, c1, params, keep, 0)


@_kernel_of(REJECT_SIG)
def _reject_winsorized(stack, r, c0, c1, params, keep):
    _ranged(stack, r, c0, c1, params, keep, 1)


@_kernel_of(REJECT_SIG)
def _reject_mad(stack, r, c0, c1, params, keep):
    _ranged(stack, r, c0, c1, params, keep, 2)


@_kernel_of(REJECT_SIG)
def _reject_percentile(stack, r, c0, c1, params, keep):
    _ranged(stack, r, c0, c1, params, keep, 3)


@_kernel_of(REJECT_SIG)
def _reject_linear_fit(stack, r, c0, c1, params, keep):
    n = stack.shape[0]
    w = c1 - c0
    v = np.empty(n, np.float32)
    idx = np.empty(n, np.int64)
    code = np.empty(n, np.uint8)  # by sorted position
    y = np.empty(n, np.float64)
    pos = np.empty(n, np.int64)
    low = params[0]
    high = params[1]
    s, f = _sorted_tile_frames(stack, r, c0, c1, _net_from(params, 2))
    for c in range(w):
        for j in range(n):
            v[j] = s[j, c]
            idx[j] = f[j, c]
            code[j] = 1
        while True:
            m = 0
            for j in range(n):
                if code[j] == 1:
                    y[m] = v[j]
                    pos[m] = j
                    m += 1
            if m < 3:
                break
            # least squares y = slope * x + icpt, x = rank among the values kept
            xm = (m - 1) * 0.5
            ym = 0.0
            for j in range(m):
                ym += y[j]
            ym /= m
            sxy = 0.0
            sxx = 0.0
            for j in range(m):
                dx = j - xm
                sxy += dx * (y[j] - ym)
                sxx += dx * dx
            slope = sxy / sxx
            icpt = ym - slope * xm
            sigma = 0.0
            for j in range(m):
                sigma += abs(y[j] - (slope * j + icpt))
            sigma /= m
            dlow = low * sigma
            dhigh = high * sigma
            gone = 0
            for j in range(m):
                line = slope * j + icpt
                if line - y[j] > dlow:
                    code[pos[j]] = 0
                    gone += 1
                elif y[j] - line > dhigh:
                    code[pos[j]] = 2
                    gone += 1
            if gone == m:  # everything: keep the median value(s) of what was left
                ma, mb = _middle(0, m)
                for j in range(ma, mb):
                    code[pos[j]] = 1
                break
            if gone == 0:
                break
        for j in range(n):
            keep[idx[j], c] = code[j]


@_kernel_of(REJECT_SIG)
def _reject_esd(stack, r, c0, c1, params, keep):
    # params: outliers fraction, significance, low relaxation, r, lambda_1..lambda_r, sort network
    n = stack.shape[0]
    w = c1 - c0
    relax = params[2]
    nmax = int(params[3])
    v = np.empty(n, np.float32)
    idx = np.empty(n, np.int64)
    side = np.empty(max(nmax, 1), np.uint8)
    s, f = _sorted_tile_frames(stack, r, c0, c1, _net_from(params, 4 + nmax))
    for c in range(w):
        for j in range(n):
            v[j] = s[j, c]
            idx[j] = f[j, c]
        lo, hi = 0, n - 1
        k = 0
        # running sums of x - shift (shift: a middle value, against cancellation): each
        # step's mean and sample sd in O(1)
        shift = np.float64(v[(n - 1) // 2])
        total = 0.0
        sq = 0.0
        for j in range(n):
            x = np.float64(v[j]) - shift
            total += x
            sq += x * x
        for i in range(nmax):
            m = hi - lo + 1
            mean = shift + total / m
            var = (sq - total * total / m) / (m - 1)
            sd = math.sqrt(var) if var > 0 else 0.0
            dlow = (mean - np.float64(v[lo])) / relax
            dhigh = np.float64(v[hi]) - mean
            if dhigh > dlow:
                dev = dhigh
                side[i] = 2
                x = np.float64(v[hi]) - shift
                hi -= 1
            else:
                dev = dlow
                side[i] = 0
                x = np.float64(v[lo]) - shift
                lo += 1
            total -= x
            sq -= x * x
            if sd > 0 and dev / sd > params[4 + i]:
                k = i + 1
        for j in range(n):
            keep[idx[j], c] = 1
        lo, hi = 0, n - 1
        for i in range(k):
            if side[i] == 2:
                keep[idx[hi], c] = 2
                hi -= 1
            else:
                keep[idx[lo], c] = 0
                lo += 1


WINSOR_ITERATIONS = 100  # Huber's winsorization converges in a few; a bound against cycles


# --------------------------------------------------------------------------- Student's t (for esd)


@njit(nogil=True, cache=True)
def _betacf(a, b, x):
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    qab = a + b
    qap = a + 1.0
    qam = a - 1.0
    c = 1.0
    d = 1.0 - qab * x / qap
    if abs(d) < tiny:
        d = tiny
    d = 1.0 / d
    h = d
    for m in range(1, 10000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        if abs(d) < tiny:
            d = tiny
        c = 1.0 + aa / c
        if abs(c) < tiny:
            c = tiny
        d = 1.0 / d
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        if abs(d) < tiny:
            d = tiny
        c = 1.0 + aa / c
        if abs(c) < tiny:
            c = tiny
        d = 1.0 / d
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-16:
            break
    return h


@njit(nogil=True, cache=True)
def betainc(a, b, x):
    """The regularized incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    lbt = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(lbt) * _betacf(a, b, x) / a
    return 1.0 - math.exp(lbt) * _betacf(b, a, 1.0 - x) / b


@njit(nogil=True, cache=True)
def t_ppf(p, df):
    """The p-quantile of Student's t with df degrees of freedom: P(T <= t) = p.

    For t > 0, P(T > t) = I_x(df/2, 1/2) / 2 with x = df / (df + t^2); x is found by
    bisection (on log x, 200 steps), then t = sqrt(df (1 - x) / x)."""
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -t_ppf(1.0 - p, df)
    q = 2.0 * (1.0 - p)
    lo = -745.0  # log x
    hi = 0.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if betainc(0.5 * df, 0.5, math.exp(mid)) < q:
            lo = mid
        else:
            hi = mid
    x = math.exp(0.5 * (lo + hi))
    return math.sqrt(df * (1.0 - x) / x)


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


def _with_network(params: np.ndarray, n: int) -> np.ndarray:
    """params, then the pairs of the sort network for N values (as float64)."""
    return np.concatenate([params, sort_network(n).ravel().astype(np.float64)])


def _esd_params(params: np.ndarray, n: int) -> np.ndarray:
    lam = esd_critical(n, float(params[0]), float(params[1]))
    return _with_network(np.concatenate([params, [float(len(lam))], np.array(lam, np.float64)]), n)


# Rejections whose kernel needs more than the method's parameters (computed once per N).
PARAMS_FOR_N: dict[str, Callable[[np.ndarray, int], np.ndarray]] = {
    "esd": _esd_params, "sigma-iterative": _with_network, "winsorized": _with_network,
    "linear-fit": _with_network, "mad": _with_network, "percentile": _with_network}


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
REJECTIONS: dict[str, Kernel] = {
    "minmax": _reject_minmax, "sigma": _reject_sigma,
    "sigma-iterative": _reject_sigma_iterative, "winsorized": _reject_winsorized,
    "linear-fit": _reject_linear_fit, "esd": _reject_esd, "mad": _reject_mad, "percentile": _reject_percentile,
}
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


@_kernel_of(types.void(_STACK, _OUT, _I, _I, types.FunctionType(REJECT_SIG), types.float64[::1],
                       types.FunctionType(ESTIMATE_KEPT_SIG), _NET, _I, types.int64[:, ::1],
                       types.uint16[:, :, ::1], _I, types.boolean))
def _rows_kept_counted(stack, out, r0, r1, reject, params, estimate, net, tile, frame_counts, pixel_counts,
                       prow0, pixels):
    """_rows_kept, counting the rejections: frame_counts[i] += (low, high) of frame i;
    if `pixels`, pixel_counts[:, r - prow0, c] = (low, high) of pixel (r, c)."""
    n = stack.shape[0]
    ncols = stack.shape[2]
    keep = np.empty((n, tile), np.uint8)
    lo = np.empty(tile, np.uint16)
    hi = np.empty(tile, np.uint16)
    for r in range(r0, r1):
        for c0 in range(0, ncols, tile):
            c1 = min(ncols, c0 + tile)
            w = c1 - c0
            reject(stack, r, c0, c1, params, keep)
            estimate(stack, keep, out, r, c0, c1, net)
            for c in range(w):
                lo[c] = 0
                hi[c] = 0
            for i in range(n):
                k = keep[i]
                nl = 0
                nh = 0
                for c in range(w):
                    x = k[c]
                    nl += x == 0
                    nh += x == 2
                    lo[c] += x == 0
                    hi[c] += x == 2
                frame_counts[i, 0] += nl
                frame_counts[i, 1] += nh
            if pixels:
                pl = pixel_counts[0, r - prow0]
                ph = pixel_counts[1, r - prow0]
                for c in range(w):
                    pl[c0 + c] = lo[c]
                    ph[c0 + c] = hi[c]


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


def _kernel(method: Method, n: int, counted: bool = False) -> tuple[Any, tuple]:
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
    if entry.reject in PARAMS_FOR_N:
        params = PARAMS_FOR_N[entry.reject](params, n)
    driver = _rows_kept_counted if counted else _rows_kept
    return driver.compiled, (reject.pointer, params, estimator.kept.pointer, estimator.network(n, True),
                             _tile_width(n, estimator.tile_values))


_NO_PIXELS = np.zeros((2, 1, 1), dtype=np.uint16)


def _check_counts(frame_counts, pixel_counts, n: int, shape: tuple) -> None:
    if frame_counts is not None and (not isinstance(frame_counts, np.ndarray) or frame_counts.dtype != np.int64
                                     or frame_counts.shape != (n, 2) or not frame_counts.flags.c_contiguous
                                     or not frame_counts.flags.writeable):
        raise ValueError(f"frame_counts must be a writeable C-contiguous int64 array of shape {(n, 2)}")
    if pixel_counts is not None and (not isinstance(pixel_counts, np.ndarray) or pixel_counts.dtype != np.uint16
                                     or pixel_counts.shape != shape or not pixel_counts.flags.c_contiguous
                                     or not pixel_counts.flags.writeable):
        raise ValueError(f"pixel_counts must be a writeable C-contiguous uint16 array of shape {shape}")


def _run_rows(stack, method, out, r0, r1, kernel, frame_counts, pixel_counts, prow0) -> None:
    """Rows r0..r1 through `kernel` (from _kernel); counting if either array is given."""
    driver, args = kernel
    if frame_counts is None and pixel_counts is None:
        driver(stack, out, r0, r1, *args)
    elif method.entry.reject is None:  # nothing is rejected
        driver(stack, out, r0, r1, *args)
        if pixel_counts is not None:
            pixel_counts[:, r0 - prow0:r1 - prow0] = 0
    else:
        fc = frame_counts if frame_counts is not None else np.zeros((stack.shape[0], 2), np.int64)
        pc = pixel_counts if pixel_counts is not None else _NO_PIXELS
        driver(stack, out, r0, r1, *args, fc, pc, prow0, pixel_counts is not None)


def combine_rows_into(stack: np.ndarray, method: Method, out: np.ndarray, r0: int = 0, r1: Optional[int] = None,
                      frame_counts: Optional[np.ndarray] = None, pixel_counts: Optional[np.ndarray] = None) -> None:
    """Combine rows r0..r1 of a float32 C-contiguous (N, rows, cols) stack into the
    float32 C-contiguous (rows, cols) `out`, in the calling thread (the GIL is released).

    frame_counts: int64 (N, 2), incremented by the values of each frame rejected low
    ([:, 0]) and high ([:, 1]) in these rows. pixel_counts: uint16 (2, r1 - r0, cols), set
    to the low and high rejections of each pixel of these rows. None: not counted."""
    if r1 is None:
        r1 = stack.shape[1]
    n = stack.shape[0]
    _check_counts(frame_counts, pixel_counts, n, (2, max(r1 - r0, 0), stack.shape[2]))
    if r1 <= r0 or stack.shape[2] == 0:
        return
    counted = frame_counts is not None or pixel_counts is not None
    _run_rows(stack, method, out, r0, r1, _kernel(method, n, counted), frame_counts, pixel_counts, r0)


def reject_codes(stack: np.ndarray, method: Method) -> np.ndarray:
    """The keep-mask of every value, (N, rows, cols) uint8: 1 kept, 0 rejected low, 2
    rejected high (all 1 for a method without rejection). For tests and diagnostics:
    the rejection kernel on whole rows, one thread."""
    stack = _as_stack(stack)
    n, rows, cols = stack.shape
    codes = np.ones((n, rows, cols), dtype=np.uint8)
    entry = method.entry
    if entry.reject is None or cols == 0:
        return codes
    params = np.array([float(method.params[p.name]) for p in entry.params], dtype=np.float64)
    if entry.reject in PARAMS_FOR_N:
        params = PARAMS_FOR_N[entry.reject](params, n)
    kernel = REJECTIONS[entry.reject].compiled
    keep = np.empty((n, cols), dtype=np.uint8)
    for r in range(rows):
        kernel(stack, r, 0, cols, params, keep)
        codes[:, r] = keep
    return codes


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
    elif out.shape != (rows, cols) or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous float32 array of shape {(rows, cols)}")
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
    counted = frame_counts is not None or pixel_counts is not None
    kernel = _kernel(method, n, counted)
    spans = [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    # each chunk counts into its own array (summed below); pixel rows do not overlap
    own = [np.zeros((n, 2), np.int64) if frame_counts is not None else None for _ in spans]
    with ThreadPoolExecutor(max_workers=min(workers, chunks)) as pool:
        futures = [pool.submit(_run_rows, stack, method, out, a, b, kernel, fc, pixel_counts, 0)
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

