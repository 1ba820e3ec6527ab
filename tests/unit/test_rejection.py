"""The robust rejections (issue 9) and the rejection counts, against plain per-column
references written here from the published definitions (Siril's stacking documentation,
PixInsight's ImageIntegration, Rosner 1983).

Each reference works on one column as a Python list of floats (float64), in the order of
operations the definition states: sums in sorted (or frame) order, the median of an even
count as the mean of the two middle values, sample standard deviations (N - 1). The
kernels do the same arithmetic, so their decisions -- the keep codes 1 kept, 0 rejected
low, 2 rejected high -- must match exactly, ties and knife edges included; only the ESD
test compares against scipy's Student t, and skips the rare column whose statistic is
within 1e-9 of a critical value. Where a pass would reject every value left, the
reference (like the kernels) keeps the median value(s) of what was left, every copy.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from flatd.stack import combine as C
from flatd.stack.methods import Method

# --------------------------------------------------------------------------- helpers


def seq_sum(xs) -> float:
    total = 0.0
    for x in xs:
        total += x
    return total


def med(v) -> float:
    """Median of a sorted list: the mean of the two middle values for an even count."""
    m = len(v)
    return (v[(m - 1) // 2] + v[m // 2]) * 0.5


def sample_sd(v) -> float:
    m = len(v)
    mean = seq_sum(v) / m
    q = 0.0
    for x in v:
        d = x - mean
        q += d * d
    return math.sqrt(q / (m - 1))


def clip(v, centre, dlow, dhigh):
    """The values kept: centre - x <= dlow and x - centre <= dhigh."""
    return [x for x in v if not centre - x > dlow and not x - centre > dhigh]


def middle(v):
    """What an emptied pass keeps: the median value(s) of v (sorted)."""
    m = len(v)
    return [v[(m - 1) // 2], v[m // 2]]


def by_interval(col, kept):
    """Codes of a rejection by value: below every kept value 0, above 2."""
    lo, hi = min(kept), max(kept)
    return [0 if x < lo else 2 if x > hi else 1 for x in col]


# --------------------------------------------------------------------------- references, one column

KNIFE = 1e-9  # relative: decisions this close to their threshold are not compared


def near(a: float, b: float) -> bool:
    """a and b within KNIFE of each other, relative to their size."""
    return abs(a - b) < KNIFE * max(abs(a), abs(b))




def ref_sigma_iterative(col, low, high):
    """Siril's sigma clipping: centre the median, sigma the sample standard deviation of
    the values still kept; reject centre - x > low sigma, x - centre > high sigma; repeat
    until a pass rejects nothing. None (not compared) at a knife edge: the kernel sums
    in one pass, rounding differently in the last bits."""
    v = sorted(col)
    while len(v) >= 2:
        c, s = med(v), sample_sd(v)
        if any(near(c - x, low * s) or near(x - c, high * s) for x in v):
            return None  # a knife edge: the kernel's one-pass sd rounds differently
        kept = clip(v, c, low * s, high * s)
        if not kept:
            v = middle(v)
            break
        if len(kept) == len(v):
            break
        v = kept
    return by_interval(col, v)


def ref_winsorized(col, low, high):
    """Winsorized sigma clipping (Huber; Siril, PixInsight): sigma from the sample sd,
    then repeatedly winsorize (clip to median +- 1.5 sigma, the clipped set kept) and
    sigma = 1.134 sd(winsorized) until |sigma - sigma_prev| <= 5e-4 sigma_prev; reject
    about the median; repeat on what is kept until nothing more is rejected.

    The kernel sums the winsorized values from prefix sums (one pass, then O(1) per
    iteration), which rounds differently in the last bits: None (not compared) when a
    convergence test or a rejection is within KNIFE of its threshold."""
    v = sorted(col)
    while len(v) >= 2:
        c = med(v)
        sigma = sample_sd(v)
        w = list(v)
        for _ in range(C.WINSOR_ITERATIONS):
            lo, hi = c - 1.5 * sigma, c + 1.5 * sigma
            w = [min(hi, max(lo, x)) for x in w]
            sigma0 = sigma
            sigma = 1.134 * sample_sd(w)
            if near(abs(sigma - sigma0), sigma0 * 0.0005):
                return None
            if not abs(sigma - sigma0) > sigma0 * 0.0005:
                break
        if any(near(c - x, low * sigma) or near(x - c, high * sigma) for x in v):
            return None
        kept = clip(v, c, low * sigma, high * sigma)
        if not kept:
            v = middle(v)
            break
        if len(kept) == len(v):
            break
        v = kept
    return by_interval(col, v)


def ref_mad(col, low, high):
    """MAD clipping: sigma = 1.4826 median(|x - median|); iterated like sigma clipping."""
    v = sorted(col)
    while len(v) >= 2:
        c = med(v)
        sigma = 1.4826 * med(sorted(abs(x - c) for x in v))
        kept = clip(v, c, low * sigma, high * sigma)
        if not kept:
            v = middle(v)
            break
        if len(kept) == len(v):
            break
        v = kept
    return by_interval(col, v)


def ref_percentile(col, low, high):
    """Siril's percentile clipping, one pass: reject median - x > low median and
    x - median > high median (nothing when the median is not positive)."""
    v = sorted(col)
    c = med(v)
    if not c > 0:
        return [1] * len(col)
    kept = clip(v, c, c * low, c * high) or middle(v)
    return by_interval(col, kept)


def ref_linear_fit(col, low, high):
    """Linear fit clipping: the kept values sorted (stably), y_j against j = 0..m-1;
    least-squares line; sigma = mean |y_j - line_j|; reject line - y > low sigma (low),
    y - line > high sigma (high); repeat while something is rejected and 3 or more are kept.
    None (not compared) at a knife edge: the kernel's sums run in four chains, rounding
    differently in the last bits; an exact fit (every residual 0) is exact in both."""
    n = len(col)
    order = sorted(range(n), key=lambda i: (col[i], i))
    code = {i: 1 for i in order}
    while True:
        kept = [i for i in order if code[i] == 1]
        m = len(kept)
        if m < 3:
            break
        y = [col[i] for i in kept]
        xm = (m - 1) * 0.5
        ym = seq_sum(y) / m
        sxy = sxx = 0.0
        for j in range(m):
            dx = j - xm
            sxy += dx * (y[j] - ym)
            sxx += dx * dx
        slope = sxy / sxx
        icpt = ym - slope * xm
        sigma = seq_sum(abs(y[j] - (slope * j + icpt)) for j in range(m)) / m
        gone = 0
        for j in range(m):
            line = slope * j + icpt
            if sigma > 0 and (near(line - y[j], low * sigma) or near(y[j] - line, high * sigma)):
                return None
        for j, i in enumerate(kept):
            line = slope * j + icpt
            if line - y[j] > low * sigma:
                code[i], gone = 0, gone + 1
            elif y[j] - line > high * sigma:
                code[i], gone = 2, gone + 1
        if gone == m:
            for j in range((m - 1) // 2, m // 2 + 1):
                code[kept[j]] = 1
            break
        if gone == 0:
            break
    return [code[i] for i in range(n)]


def ref_esd(col, outliers, alpha, relax):
    """Rosner's generalized ESD: up to r = min(floor(n * outliers), n - 2) times remove
    the value farthest from the mean (low deviations divided by relax; a tie goes to the
    low end), R_i = deviation / sample sd; lambda_i from Student's t (scipy); the
    outliers are the first k removed, k the largest i with R_i > lambda_i. The mean and
    variance of each step come from running sums of x - shift (shift the middle value),
    as the kernel computes them. Returns the codes, or None when some R_i is within 1e-9
    of lambda_i (a knife edge)."""
    from scipy.stats import t as student

    n = len(col)
    order = sorted(range(n), key=lambda i: (col[i], i))
    v = [col[i] for i in order]
    r = max(0, min(int(n * outliers), n - 2))
    shift = v[(n - 1) // 2]
    total = seq_sum(x - shift for x in v)
    sq = seq_sum((x - shift) * (x - shift) for x in v)
    lo, hi = 0, n - 1
    removed, k = [], 0
    for i in range(1, r + 1):
        m = hi - lo + 1
        mean = shift + total / m
        var = (sq - total * total / m) / (m - 1)
        sd = math.sqrt(var) if var > 0 else 0.0
        dlow, dhigh = (mean - v[lo]) / relax, v[hi] - mean
        if dhigh > dlow:
            dev, side, j, x = dhigh, 2, order[hi], v[hi] - shift
            hi -= 1
        else:
            dev, side, j, x = dlow, 0, order[lo], v[lo] - shift
            lo += 1
        total -= x
        sq -= x * x
        removed.append((j, side))
        ni = n - i + 1
        tq = student.ppf(1 - alpha / (2 * ni), ni - 2)
        lam = (ni - 1) * tq / math.sqrt((ni - 2 + tq * tq) * ni)
        if sd > 0:
            if abs(dev / sd - lam) <= 1e-9 * lam:
                return None
            if dev / sd > lam:
                k = i
    codes = [1] * n
    for j, side in removed[:k]:
        codes[j] = side
    return codes


def ref_minmax(col, passes):
    values = list(col)
    for _ in range(passes):
        low = min(values)
        without_low = [v for v in values if v != low]
        if not without_low:
            break
        high = max(without_low)
        without_both = [v for v in without_low if v != high]
        if not without_both:
            break
        values = without_both
    return by_interval(col, values)


def ref_sigma(col, z):
    """The original single-pass sigma clip, decided exactly; all rejected: min/max 2."""
    exact = [Fraction(x) for x in col]
    mean = sum(exact) / len(exact)
    var = sum((x - mean) ** 2 for x in exact) / len(exact)
    if var == 0:
        return [1] * len(col)
    zz = Fraction(z) ** 2
    codes = [1 if not (e - mean) ** 2 > zz * var else (2 if e > mean else 0) for e in exact]
    return codes if 1 in codes else ref_minmax(col, 2)


def ref_codes(col, method: Method):
    p = method.params
    name = method.name
    if name in ("mean", "median"):
        return [1] * len(col)
    if name == "minmax":
        return ref_minmax(col, p["minmax"])
    if name == "sigma":
        return ref_sigma(col, p["sigma"])
    if name == "esd":
        return ref_esd(col, p["esd_outliers"], p["esd_significance"], p["esd_low"])
    fn = {"sigma-iterative": ref_sigma_iterative, "winsorized": ref_winsorized, "mad": ref_mad,
          "percentile": ref_percentile, "linear-fit": ref_linear_fit}[name]
    return fn(col, p["low"], p["high"])


def reference(stack: np.ndarray, method: Method):
    """(codes (N, rows, cols) uint8 or None where a knife edge was met, master float64)."""
    n, rows, cols = stack.shape
    codes = np.ones(stack.shape, np.uint8)
    master = np.empty((rows, cols))
    for r in range(rows):
        for c in range(cols):
            col = [float(x) for x in stack[:, r, c]]
            got = ref_codes(col, method)
            if got is None:
                return None, None
            codes[:, r, c] = got
            kept = [x for x, k in zip(col, got) if k == 1]
            master[r, c] = seq_sum(kept) / len(kept)
    return codes, master


def counts_of(codes):
    frame = np.stack([(codes == 0).sum(axis=(1, 2)), (codes == 2).sum(axis=(1, 2))], axis=1).astype(np.int64)
    pixel = np.stack([(codes == 0).sum(axis=0), (codes == 2).sum(axis=0)]).astype(np.uint16)
    return frame, pixel


def check(stack: np.ndarray, method: Method) -> None:
    want_codes, want = reference(stack, method)
    assume(want_codes is not None)
    got_codes = C.reject_codes(stack, method)
    if not np.array_equal(got_codes, want_codes):
        i, r, c = map(int, np.argwhere(got_codes != want_codes)[0])
        raise AssertionError(f"{method!r}: column {stack[:, r, c].tolist()}: codes {got_codes[:, r, c].tolist()}, "
                             f"reference {want_codes[:, r, c].tolist()}")
    fc = np.zeros((stack.shape[0], 2), np.int64)
    pc = np.zeros((2,) + stack.shape[1:], np.uint16)
    got = C.combine(stack, method, workers=1, frame_counts=fc, pixel_counts=pc)
    np.testing.assert_allclose(got, want.astype(np.float32), rtol=2e-7, atol=0)
    want_fc, want_pc = counts_of(want_codes)
    np.testing.assert_array_equal(fc, want_fc)
    np.testing.assert_array_equal(pc, want_pc)


# --------------------------------------------------------------------------- strategies

LEVELS = st.sampled_from([20000.0, 20000.0, 20010.0, 19990.0, 20250.0, 19000.0, 26000.0, 5000.0, 64000.0])
NOISY = st.floats(19000, 21000, width=32)
WIDE = st.floats(100, 65000, width=32)


@st.composite
def flat_stacks(draw, min_frames=3, max_frames=64):
    """Stacks of realistic flat levels: Gaussian noise with outliers (cosmic rays, dead or
    shadowed values) at a few fractions of the level, drawn from a seed; or values drawn
    by hypothesis from a few levels (ties) or from a range; sometimes an all-equal column."""
    n = draw(st.integers(min_frames, max_frames))
    rows = draw(st.integers(1, 2))
    cols = draw(st.integers(1, 6))
    kind = draw(st.sampled_from(["gauss", "gauss", "gauss", "levels", "mixed", "wide"]))
    if kind == "gauss":
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        level = draw(st.sampled_from([1500.0, 12000.0, 20000.0, 45000.0]))
        noise = level * draw(st.sampled_from([0.001, 0.005, 0.02]))
        stack = rng.normal(level, noise, (n, rows, cols))
        hit = rng.random((n, rows, cols)) < draw(st.sampled_from([0.0, 0.02, 0.1, 0.3]))
        stack[hit] = level * (1 + rng.choice([-1, 1], hit.sum()) * rng.uniform(0.01, 0.8, hit.sum()))
        stack = stack.astype(np.float32)
    else:
        elements = {"levels": LEVELS, "mixed": NOISY | LEVELS, "wide": NOISY | WIDE}[kind]
        stack = draw(arrays(np.float32, (n, rows, cols), elements=elements))
    if draw(st.booleans()):  # an all-equal column
        stack[:, 0, 0] = stack[0, 0, 0]
    return stack


KAPPA = st.sampled_from([0.1, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.0, 4.0, 5.0]) | st.floats(0.05, 6.0) | st.floats(2.0, 4.0)
FRACTION = st.sampled_from([0.001, 0.01, 0.05, 0.1, 0.2, 0.5]) | st.floats(0.0005, 0.9)
PROPS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------- properties


@pytest.mark.parametrize("name", ["sigma-iterative", "winsorized", "mad", "linear-fit"])
@PROPS
@given(stack=flat_stacks(), low=KAPPA, high=KAPPA)
def test_kappa_methods_match_reference(name, stack, low, high):
    check(stack, Method(name, low=low, high=high))


@PROPS
@given(stack=flat_stacks(), low=FRACTION, high=FRACTION)
def test_percentile_matches_reference(stack, low, high):
    check(stack, Method("percentile", low=low, high=high))


@PROPS
@given(stack=flat_stacks(), outliers=st.sampled_from([0.1, 0.3, 0.5, 0.9]) | st.floats(0.01, 1.0),
       alpha=st.sampled_from([0.01, 0.05, 0.2]) | st.floats(0.001, 0.5),
       relax=st.sampled_from([1.0, 1.5, 3.0]))
def test_esd_matches_reference(stack, outliers, alpha, relax):
    check(stack, Method("esd", esd_outliers=outliers, esd_significance=alpha, esd_low=relax))


@PROPS
@given(stack=flat_stacks(min_frames=1, max_frames=24), name=st.sampled_from(["mean", "median", "minmax", "sigma"]),
       minmax=st.integers(1, 4), z=st.floats(0.3, 3.0))
def test_counts_of_the_original_methods(stack, name, minmax, z):
    method = Method(name, minmax=minmax, sigma=z)
    assume(stack.shape[0] >= method.min_frames)
    want_codes, _ = reference(stack, method)
    np.testing.assert_array_equal(C.reject_codes(stack, method), want_codes)
    fc = np.full((stack.shape[0], 2), 7, np.int64)  # incremented, not set
    pc = np.full((2,) + stack.shape[1:], 9, np.uint16)  # set
    C.combine(stack, method, workers=1, frame_counts=fc, pixel_counts=pc)
    want_fc, want_pc = counts_of(want_codes)
    np.testing.assert_array_equal(fc, want_fc + 7)
    np.testing.assert_array_equal(pc, want_pc)


def test_all_values_rejected_keeps_the_median_values():
    col = np.array([10.0, 10.0, 20.0, 20.0, 30.0, 30.0], np.float32).reshape(6, 1, 1) + 20000
    for method in (Method("sigma-iterative", low=0.05, high=0.05), Method("mad", low=0.01, high=0.01),
                   Method("winsorized", low=0.01, high=0.01), Method("percentile", low=1e-6, high=1e-6)):
        codes = C.reject_codes(col, method)[:, 0, 0].tolist()
        assert codes == [0, 0, 1, 1, 2, 2], method
        assert C.combine(col, method)[0, 0] == 20020.0


def test_an_outlier_is_rejected_high_and_low():
    rng = np.random.default_rng(3)
    stack = (rng.normal(20000, 50, (20, 1, 4))).astype(np.float32)
    stack[4, 0, 1] = 40000  # a cosmic ray
    stack[7, 0, 2] = 2000  # a dead value
    for name in ("sigma-iterative", "winsorized", "linear-fit", "esd", "mad", "percentile"):
        codes = C.reject_codes(stack, Method(name))
        assert codes[4, 0, 1] == 2 and codes[7, 0, 2] == 0, name


@pytest.mark.parametrize("name", ["minmax", "sigma", "sigma-iterative", "winsorized", "linear-fit", "esd",
                                  "mad", "percentile", "median"])
def test_threads_count_as_one_thread(name):
    rng = np.random.default_rng(5)
    stack = rng.normal(20000, 100, (16, 64, 160)).astype(np.float32)
    stack[rng.integers(0, 16, 300), rng.integers(0, 64, 300), rng.integers(0, 160, 300)] = 50000
    method = Method(name)
    counts = []
    for workers in (1, 2):
        fc = np.zeros((16, 2), np.int64)
        pc = np.zeros((2, 64, 160), np.uint16)
        out = C.combine(stack, method, workers=workers, frame_counts=fc, pixel_counts=pc)
        counts.append((out, fc, pc))
    for a, b in zip(counts[0], counts[1]):
        np.testing.assert_array_equal(a, b)
    # the counts agree with the codes, and the uncounted master is the same
    codes = C.reject_codes(stack, method)
    want_fc, want_pc = counts_of(codes)
    np.testing.assert_array_equal(counts[0][1], want_fc)
    np.testing.assert_array_equal(counts[0][2], want_pc)
    np.testing.assert_array_equal(C.combine(stack, method, workers=2), counts[0][0])


@pytest.mark.parametrize("name", ["sigma", "winsorized", "esd", "mean"])
def test_rows_into_counts_its_rows(name):
    rng = np.random.default_rng(6)
    stack = rng.normal(20000, 100, (9, 10, 40)).astype(np.float32)
    stack[2, 5, 3] = 40000
    method = Method(name)
    out = np.zeros((10, 40), np.float32)
    fc = np.zeros((9, 2), np.int64)
    pc = np.zeros((2, 4, 40), np.uint16)
    C.combine_rows_into(stack, method, out, 3, 7, frame_counts=fc, pixel_counts=pc)
    want_fc, want_pc = counts_of(C.reject_codes(stack[:, 3:7], method))
    np.testing.assert_array_equal(fc, want_fc)
    np.testing.assert_array_equal(pc, want_pc)
    fc2 = np.zeros((9, 2), np.int64)
    C.combine_rows_into(stack, method, out, 3, 7, frame_counts=fc2)  # frames only
    np.testing.assert_array_equal(fc2, want_fc)
    with pytest.raises(ValueError, match="pixel_counts"):
        C.combine_rows_into(stack, method, out, 3, 7, pixel_counts=np.zeros((2, 10, 40), np.uint16))
    with pytest.raises(ValueError, match="frame_counts"):
        C.combine(stack, method, frame_counts=np.zeros((9, 2), np.int32))


def test_streamed_equals_whole_stack():
    rng = np.random.default_rng(7)
    stack = rng.normal(20000, 100, (11, 12, 50)).astype(np.float32)
    stack[3, 4, 5] = 60000
    for name in ("sigma-iterative", "winsorized", "linear-fit", "esd", "mad", "percentile"):
        method = Method(name)
        whole = C.combine(stack, method, workers=1)
        banded = np.zeros_like(whole)
        for r0 in range(0, 12, 5):
            band = np.ascontiguousarray(stack[:, r0:r0 + 5])
            C.combine_rows_into(band, method, banded[r0:r0 + 5])
        np.testing.assert_array_equal(banded, whole)


# --------------------------------------------------------------------------- Student's t


@pytest.mark.parametrize("df", [1, 2, 3, 4, 5, 7, 10, 20, 30, 62, 100, 500])
@pytest.mark.parametrize("p", [0.5, 0.6, 0.9, 0.95, 0.975, 0.99, 0.999, 0.9999, 1 - 0.05 / 128, 0.025, 0.1])
def test_t_quantile_against_scipy(p, df):
    from scipy.stats import t as student

    want = student.ppf(p, df)
    assert C.t_ppf(p, float(df)) == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_esd_critical_values():
    # Rosner (1983) / NIST's example: n = 54, alpha = 0.05, lambda_1..lambda_10
    lam = C.esd_critical(54, 10 / 54 + 1e-9, 0.05)
    want = [3.158, 3.151, 3.143, 3.136, 3.128, 3.120, 3.111, 3.103, 3.094, 3.085]  # as NIST prints them
    assert lam == pytest.approx(want, abs=1e-3)
    assert C.esd_critical(3, 0.3, 0.05) == [] and len(C.esd_critical(10, 1.0, 0.05)) == 8
