"""The level of a calibrated flat, for multiplicative normalization: robust, over the whole frame.

Pure numpy, no numba, no I/O. The engine reads the sample (:func:`grid`) straight from
the files; the reference Combiner takes it from the whole frame in memory; both call
:func:`robust_level` on the same values, so they agree exactly.

The sample is a dense regular grid over the whole frame: every `step`-th pixel of every
`step`-th row, starting half a step in, with `step` the largest whole number that still
leaves at least LEVEL_SAMPLE (50,000) pixels (step 1, every pixel, for frames of up to
50,000 pixels). A 3264x2448 frame gives step 12 (55,488 pixels), a 6252x4176 one step
22 (53,960). That is enough because the level that normalization uses is the relative
level (below), which does not depend on the frame's own level, and whose precision is
that of a median of about 50,000 ratios or more: noise / ~200, 4-5e-5 for flats of 20,000 ADU
(the grid of 250,000 pixels this replaced gave the same: its relative levels took
about half of the own level's sampling error, see below).

The estimator is an iterative k-sigma location in the manner of IKSS (Siril's and
PixInsight's "iterative k-sigma estimator of location and scale"):

1. take the finite values of the sample (NaN or infinite pixels of a float frame are
   left out), sorted;
2. m = their median; MAD = the median of |x - m|; s = sqrt(BWMV), the biweight
   midvariance about m with the usual tuning constant 9 x MAD;
3. keep the values within m +/- 4 s and go to 2, until s changes by less than 1e-5
   relatively (or after 20 rounds, or when s = 0);
4. the level is the median m of what is left.

Stars, hot pixels and cosmic rays lie beyond 4 s and are dropped, and the median of the
rest is not pulled by what is left of them. On a vignetted frame (tests/unit/test_levels.py):
2 % of the pixels saturated move the level by < 0.1 % (the mean: 3 %); a cloud 20 % deep
over a quarter of the frame by < 1 % (the mean: 5 %); a +-5 % ramp across it by 0.6 %.
Relative levels (:func:`relative_levels`, what normalization uses): a cloud over a third
of one frame, or a gradient, shifts that frame's own location, because the frame's
values spread over the whole vignetting pattern and the cloud hides inside that spread.
So each frame is compared with the others, position by position: every sample is
divided by its frame's own level, a frame's reference is the per-position median over
the other frames (a cloud in a minority of frames does not reach it), and the frame's
level is its own level times the mode of its ratio to its reference
(:func:`ratio_location`). The illumination pattern cancels in the ratio, so the ratio of
a clear frame is 1 plus noise, and a cloud 10 % deep stands 10 % away from that mode.
The frame's own level cancels too (own x mode(x / own / reference) = mode(x /
reference)): its sampling error and a cloud's pull on it do not reach its relative
level. (A median over all the frames, itself included, would: where the frame is the
median, its ratio is exactly 1, and that spike held the mode at its own level.) An
error in a frame's own level moves the others' relative levels by about 1/(N-1) of it
(it is one of the N-1 values of their references). The mode is sought from
the median by a window of +-3 noise units, where the noise unit comes from differences
of neighbouring samples (1.4826 MAD / sqrt 2: a cloud's smooth edge does not inflate
it, as it inflates the spread of the ratio itself): the median of what is inside the
window, repeated until it stops moving. The level follows the clear part of the frame.
With one frame the ratio is 1 and the level is the frame's own; with two, each frame's
reference is the other. Positions where any frame's sample is NaN are left out of
every ratio. The samples are sorted per position once (:func:`_ratios_to_others`: the
median of any N-1 of N sorted values is one or the mean of two of the middle three), and
the mode sought on each ratio sorted once (every window a slice of it).

Unlike Siril's IKSS, whose first scale is compared with 1 (on data in ADU rather than
scaled to 0..1 it stops after the first round), the rounds go on until the scale settles. A frame whose sample
has no finite value has level NaN, and one of zeros level 0: check_level refuses both.
"""

from __future__ import annotations

import math

import numpy as np

# At least this many pixels in the sample (all of them in smaller frames).
LEVEL_SAMPLE = 50_000
# IKSS: clipping at K scale units; stop when the scale changes by less than EPS (relative).
K = 4.0
EPS = 1e-5
MAX_ROUNDS = 20
# Values handled at a time in the biweight sums (bounds the temporaries).
CHUNK = 16384


def grid_step(height: int, width: int, target: int = LEVEL_SAMPLE) -> int:
    """The step of the sample grid: the largest whole number leaving >= target pixels."""
    pixels = max(0, int(height)) * max(0, int(width))
    if pixels <= target:
        return 1
    step = max(1, math.isqrt(pixels // target))
    while step > 1 and _count(height, step) * _count(width, step) < target:
        step -= 1
    return step


def _count(n: int, step: int) -> int:
    return len(range(step // 2, n, step)) if n > 0 else 0


def grid_slices(height: int, width: int, step: int) -> tuple[slice, slice]:
    """The rows and the columns of the sample grid (a step of 1: every pixel)."""
    return slice(step // 2, max(0, height), step), slice(step // 2, max(0, width), step)


def sample_shape(height: int, width: int, step: int) -> tuple[int, int]:
    return _count(height, step), _count(width, step)


def sample_bytes(height: int, width: int, step: int) -> int:
    """Memory robust_level needs for a sample of this grid: the sample, its sorted copy
    (and the mask of finite values), and the chunked temporaries of the biweight sums."""
    rows, cols = sample_shape(height, width, step)
    return 3 * rows * cols * 4 + 6 * min(CHUNK, rows * cols) * 8


def grid(image: np.ndarray, step: int) -> np.ndarray:
    """The sample grid of a whole (H, W) frame in memory (a view)."""
    rows, cols = grid_slices(image.shape[0], image.shape[1], step)
    return image[rows, cols]


def frame_level(image: np.ndarray, step: int | None = None) -> float:
    """The robust level of a whole calibrated (H, W) frame (see the module's docstring)."""
    image = np.asarray(image)
    if image.ndim != 2:
        raise ValueError(f"a frame is 2-D, got shape {image.shape}")
    if step is None:
        step = grid_step(*image.shape)
    return robust_level(grid(image, step))


def robust_level(sample: np.ndarray) -> float:
    """The IKSS-style location of the sample's values (see the module's docstring)."""
    x = np.asarray(sample, dtype=np.float32).ravel()
    if x.size == 0:
        raise ValueError("no pixels to measure a level from")
    finite = np.isfinite(x)
    x = x[finite] if not finite.all() else x.copy()
    if x.size == 0:
        return float("nan")
    x.sort()
    return ikss_location(x)


def ikss_location(x: np.ndarray) -> float:
    """Iterative k-sigma location of sorted finite float32 values x (not modified)."""
    lo, hi = 0, x.size
    s0 = math.inf
    m = _median_sorted(x)
    for _ in range(MAX_ROUNDS):
        part = x[lo:hi]
        m = _median_sorted(part)
        mad = _mad_sorted(part, m)
        s = math.sqrt(_bwmv(part, m, mad))
        if s <= 0.0 or abs(s0 - s) <= EPS * s:
            break
        s0 = s
        new_lo = int(np.searchsorted(part, m - K * s, side="left")) + lo
        new_hi = int(np.searchsorted(part, m + K * s, side="right")) + lo
        if (new_lo, new_hi) == (lo, hi) or new_hi <= new_lo:
            break
        lo, hi = new_lo, new_hi
    return float(m)


def _mad_sorted(x: np.ndarray, m: float) -> float:
    """The median of |x - m| for sorted x, without sorting the deviations: they are two
    sorted runs (m - x below m, read backwards; x - m from m up), and the k-th smallest
    of two sorted runs is found by bisection in O(log n)."""
    n = x.size
    p = int(np.searchsorted(x, m, side="left"))
    below = lambda i: m - float(x[p - 1 - i])  # ascending in i, i < p
    above = lambda j: float(x[p + j]) - m  # ascending in j, j < n - p
    return 0.5 * (_kth(below, p, above, n - p, (n - 1) // 2) + _kth(below, p, above, n - p, n // 2))


def _kth(a, na: int, b, nb: int, k: int) -> float:
    """The k-th smallest (0-based) of two ascending runs a(0..na-1), b(0..nb-1)."""
    lo, hi = max(0, k + 1 - nb), min(k + 1, na)
    while lo < hi:  # the number i of values taken from a among the k+1 smallest
        i = (lo + hi) // 2
        if a(i) < b(k - i):
            lo = i + 1
        else:
            hi = i
    i = lo
    j = k + 1 - i
    return max(a(i - 1) if i > 0 else -math.inf, b(j - 1) if j > 0 else -math.inf)


def _median_sorted(x: np.ndarray) -> float:
    n = x.size
    return (float(x[(n - 1) // 2]) + float(x[n // 2])) * 0.5


def _bwmv(x: np.ndarray, m: float, mad: float) -> float:
    """Biweight midvariance of sorted x about m, tuning 9 x MAD (0 when the MAD is 0):
    n * sum(d^2 (1 - u^2)^4) / sum((1 - u^2)(1 - 5 u^2))^2 over |u| < 1, u = d / (9 MAD),
    d = x - m. Terms and dot products in float32 by chunks of CHUNK values, the chunks
    added in float64 (a scale for the clipping: 1e-6 relative is plenty), over the
    values with |u| < 1 only (a slice of the sorted values)."""
    if mad <= 0.0 or x.size == 0:
        return 0.0
    c = 9.0 * mad
    a = int(np.searchsorted(x, m - c, side="right"))
    b = int(np.searchsorted(x, m + c, side="left"))
    up = down = 0.0
    fm, inv = np.float32(m), np.float32(1.0 / c)
    for i in range(a, b, CHUNK):
        d = x[i:min(b, i + CHUNK)] - fm
        u2 = d * inv
        u2 *= u2
        w = np.float32(1.0) - u2
        down += float(np.dot(w, np.float32(1.0) - np.float32(5.0) * u2))
        t = d * w * w
        up += float(np.dot(t, t))
    if down == 0.0:
        return 0.0
    return x.size * up / (down * down)


def relative_levels(samples: np.ndarray, mapper=None, own=None) -> list[float]:
    """The level of each frame of `samples` (float32, shape (N, S): each frame's sample
    grid, raveled) on the scale of the others (see the module's docstring).
    `mapper(fn, indices)` returns [fn(i) for i in indices], in threads if it likes (the
    engine's pool). The rows of `samples` are divided by their own levels in place.
    `own`: each row's robust_level, when already measured (the flat checks use them)."""
    mapper = mapper or (lambda fn, indices: [fn(i) for i in indices])
    samples = np.asarray(samples)
    if samples.ndim != 2 or samples.dtype != np.float32:
        raise ValueError("samples must be a float32 (frames, pixels) array")
    if own is None:
        own = list(mapper(lambda i: robust_level(samples[i]), range(samples.shape[0])))
    own = list(own)
    usable = [i for i, level in enumerate(own) if math.isfinite(level) and level > 0]
    if len(usable) < 2:
        return own
    for i in usable:
        samples[i] /= np.float32(own[i])
    # the references and the ratios on every stride-th sample; frames that cannot be
    # normalized (check_level refuses them later) stay out of the references
    stride = max(1, -(-samples.shape[1] // MODE_SAMPLE))
    _ratios_to_others(samples, usable, stride)

    def level(i: int) -> float:
        return own[i] * ratio_location(samples[i, ::stride])

    levels = list(own)
    for i, value in zip(usable, mapper(level, usable)):
        levels[i] = value
    return levels


# The mode of a ratio is sought on every k-th sample, at most this many: every sample of
# grid_step's grid when it holds no more (always from step 8 on, frames of 3.2 MP and
# more: 50,000 to 63,300 samples; and most smaller frames), every 2nd or so otherwise.
# The median's precision, noise / ~200, is far below any normalization error that matters.
MODE_SAMPLE = 65536
# Window of the mode search, in noise units; rounds; stop when it moves less than this (noise units).
WINDOW = 3.0
MODE_ROUNDS = 50
MODE_EPS = 1e-4


def ratio_location(ratio: np.ndarray) -> float:
    """The mode of a frame's ratio to the reference (finite values of a raveled grid,
    in grid order), sought from the median (see the module's docstring)."""
    r = np.asarray(ratio, dtype=np.float32).ravel()
    r = r[np.isfinite(r)]
    if r.size == 0:
        return float("nan")
    if r.size < 3:
        return float(np.median(r))
    # sorted once: every window is then a slice, its median two look-ups
    steps = np.diff(r)
    np.abs(steps, out=steps)
    steps.sort()
    unit = 1.4826 * _median_sorted(steps) / math.sqrt(2.0)
    r.sort()
    m = _median_sorted(r)
    if not unit > 0:
        return m
    for _ in range(MODE_ROUNDS):
        lo = int(np.searchsorted(r, m - WINDOW * unit, side="left"))
        hi = int(np.searchsorted(r, m + WINDOW * unit, side="right"))
        if hi <= lo:
            break
        moved = _median_sorted(r[lo:hi])
        if abs(moved - m) <= MODE_EPS * unit:
            m = moved
            break
        m = moved
    return m


# Columns of the samples whose median is taken at a time (bounds the copies).
REFERENCE_CHUNK = 4096


def reference_bytes(frames: int) -> int:
    """Memory the references need besides the samples: a chunk of the samples and its
    transposed sorted copy, and a few chunk-sized temporaries."""
    return 2 * frames * REFERENCE_CHUNK * 4 + 8 * REFERENCE_CHUNK * 4


def _ratios_to_others(samples: np.ndarray, rows: list[int], stride: int) -> None:
    """Every stride-th sample of each of `rows` (n >= 2 frames, their samples divided by
    their own levels) divided, in place, by the median of the other n - 1 frames' samples
    at the same position; NaN at positions where any of them is NaN (NaN sorts last). A
    chunk of positions at a time: sorted once, as a contiguous transposed copy along its
    rows (several times faster than down the columns), and the median of any n - 1 of
    the n sorted values is one or the mean of two of the middle three."""
    n = len(rows)
    count = len(range(0, samples.shape[1], stride))
    rows = np.asarray(rows)
    for k0 in range(0, count, REFERENCE_CHUNK):
        k1 = min(count, k0 + REFERENCE_CHUNK)
        cols = slice(k0 * stride, (k1 - 1) * stride + 1, stride)
        t = np.ascontiguousarray(samples[rows, cols].T)
        t.sort(axis=1)
        middle = t[:, n // 2 - 1:n // 2 + 1 + n % 2]
        void = np.isnan(t[:, -1])
        for i in rows:
            x = samples[i, cols]
            reference = _median_of_others(x, middle)
            reference[void] = np.nan
            with np.errstate(divide="ignore", invalid="ignore"):
                np.divide(x, reference, out=x)


def _median_of_others(x: np.ndarray, middle: np.ndarray) -> np.ndarray:
    """Per position, the median of n sorted values but x (one of them), from their middle
    values (`middle`: the sorted values n//2 - 1 to n//2 + 1, n odd, or n/2 - 1 and n/2,
    n even): n even, the lower middle value if x is above it, else the upper; n odd, the
    mean of the two middle values of the other n - 1 (float32, like np.median)."""
    half = np.float32(0.5)
    if middle.shape[1] == 2:
        lo, hi = middle[:, 0], middle[:, 1]
        return np.where(x <= lo, hi, lo)
    lo, mid, hi = middle[:, 0], middle[:, 1], middle[:, 2]
    return np.where(x < mid, (mid + hi) * half, np.where(x > mid, (lo + mid) * half, (lo + hi) * half))
