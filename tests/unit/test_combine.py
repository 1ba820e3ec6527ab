"""flatd.stack.combine against a plain per-column reference written here, literally.

The reference loops over pixel columns in pure Python and follows the original
program's rules word for word. Sigma clipping decides |x - mean| / std > z in exact
rational arithmetic (squared: (x - mean)^2 > z^2 * var, both sides exact), so a value
exactly on the threshold -- common with small integers -- has one right answer.
"""

from __future__ import annotations

import math
import statistics
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from flatd.stack.combine import (
    Combiner,
    Method,
    combine,
    median_network,
    normalization_factors,
    normalize,
)
from flatd.config import CombineSettings

# --------------------------------------------------------------------------- reference


def ref_mean(col):
    return math.fsum(col) / len(col)


def ref_median(col):
    s = sorted(col)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def ref_minmax(col, n):
    values = list(col)
    for _ in range(n):
        low = min(values)
        without_low = [v for v in values if v != low]  # every copy of the minimum
        if not without_low:
            break  # this pass would empty the column: back off
        high = max(without_low)
        without_both = [v for v in without_low if v != high]  # every copy of the maximum
        if not without_both:
            break
        values = without_both
    return ref_mean(values)


def ref_sigma(col, z, tie=None):
    """tie: None decides exactly; "keep" or "reject" decides values within 1e-9
    (relative) of the threshold that way -- floating point may fall on either side, and
    may split values tied on both sides of the mean ("reject-low", "reject-high")."""
    exact = [Fraction(float(x)) for x in col]
    mean = sum(exact) / len(exact)
    var = sum((x - mean) ** 2 for x in exact) / len(exact)  # population variance
    if var == 0:
        kept = list(col)
    else:
        zz = Fraction(float(z)) ** 2

        def rejected(e):
            lhs, rhs = (e - mean) ** 2, zz * var
            if tie is not None and abs(lhs - rhs) <= rhs / 10**9:
                # "reject-low"/"reject-high": rounding split the tied values by side
                return tie == "reject" or (tie == "reject-low" and e < mean) or (tie == "reject-high" and e > mean)
            return lhs > rhs

        kept = [x for x, e in zip(col, exact) if not rejected(e)]
    if not kept:
        return ref_minmax(col, 2)
    return ref_mean(kept)


def reference(stack: np.ndarray, method: Method, tie=None) -> np.ndarray:
    n, rows, cols = stack.shape
    out = np.empty((rows, cols), dtype=np.float64)
    for r in range(rows):
        for c in range(cols):
            col = [float(v) for v in stack[:, r, c]]
            if method.name == "mean":
                out[r, c] = ref_mean(col)
            elif method.name == "median":
                out[r, c] = ref_median(col)
            elif method.name == "minmax":
                out[r, c] = ref_minmax(col, method.minmax)
            else:
                out[r, c] = ref_sigma(col, method.sigma, tie)
    return out


def assert_matches(got: np.ndarray, stack: np.ndarray, method: Method, near_ties: bool = False) -> None:
    """got equals the reference to 1e-6 relative. near_ties: for a value within rounding
    of the sigma threshold, either decision is right."""
    wants = [reference(stack, method)]
    if near_ties:
        wants += [reference(stack, method, tie) for tie in ("keep", "reject", "reject-low", "reject-high")]
    want = wants[0]
    assert got.dtype == np.float32
    assert got.shape == want.shape
    scale = np.max(np.abs(stack), axis=0) if stack.size else 0
    bad = np.ones(got.shape, dtype=bool)
    for w in wants:
        tol = 1e-6 * np.maximum(np.abs(w), scale) + 1e-30
        bad &= np.abs(got.astype(np.float64) - w) > tol
    if bad.any():
        r, c = map(int, np.argwhere(bad)[0])
        raise AssertionError(
            f"{method.description}: column {stack[:, r, c].tolist()} -> {got[r, c]!r}, reference {want[r, c]!r}"
        )


# --------------------------------------------------------------------------- strategies

SMALL_INTS = st.sampled_from([0.0, 1.0, 2.0, 3.0, 5.0, 8.0])
FLOATS = st.floats(min_value=0, max_value=65535, width=32, allow_nan=False)


@st.composite
def stacks(draw, elements=SMALL_INTS, max_frames=12, max_cols=12):
    n = draw(st.integers(1, max_frames))
    rows = draw(st.integers(1, 3))
    cols = draw(st.integers(1, max_cols))
    return draw(arrays(np.float32, (n, rows, cols), elements=elements))


# dyadic thresholds: z^2 is exact, so with integer data every tie is decided exactly
DYADIC_Z = st.sampled_from([0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0])
# any threshold, some below 1: a tie can then be off by a rounding either way
Z_VALUES = DYADIC_Z | st.floats(0.1, 5.0)

PROPS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------- properties


@PROPS
@given(stacks())
def test_mean_matches_reference(stack):
    assert_matches(combine(stack, Method("mean")), stack, Method("mean"))


@PROPS
@given(stacks() | stacks(elements=FLOATS))
def test_median_matches_reference(stack):
    assert_matches(combine(stack, Method("median")), stack, Method("median"))


@PROPS
@given(stacks(max_frames=14) | stacks(elements=FLOATS), st.integers(1, 8))
def test_minmax_matches_reference(stack, n):
    method = Method("minmax", minmax=n)
    assert_matches(combine(stack, method), stack, method)


@PROPS
@given(stacks(), DYADIC_Z)
def test_sigma_matches_reference_with_exact_ties(stack, z):
    method = Method("sigma", sigma=z)
    assert_matches(combine(stack, method), stack, method)


@PROPS
@given(stacks(), Z_VALUES)
def test_sigma_matches_reference_with_any_z(stack, z):
    method = Method("sigma", sigma=z)
    assert_matches(combine(stack, method), stack, method, near_ties=True)


@PROPS
@given(stacks(elements=FLOATS), Z_VALUES)
def test_sigma_matches_reference_floats(stack, z):
    method = Method("sigma", sigma=z)
    assert_matches(combine(stack, method), stack, method, near_ties=True)


def test_sigma_structural_tie_with_floats():
    # [1, e, e, e, e]: the z-score of e is exactly 0.5 for every e; with e = 1e-9 float64
    # rounding may put it either side of z = 0.5 (kept: e; all rejected: min/max -> 0.2)
    stack = column([1.0, 1e-9, 1e-9, 1e-9, 1e-9])
    assert ref_sigma([1.0] + [float(np.float32(1e-9))] * 4, 0.5) == pytest.approx(1e-9)
    assert_matches(combine(stack, Method("sigma", sigma=0.5)), stack, Method("sigma", sigma=0.5), near_ties=True)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 70), st.integers(0, 2**32 - 1))
def test_median_network_any_size(n, seed):
    rng = np.random.default_rng(seed)
    stack = rng.integers(0, 6, size=(n, 2, 9)).astype(np.float32)
    np.testing.assert_array_equal(combine(stack, Method("median")), np.median(stack, axis=0).astype(np.float32))


@pytest.mark.parametrize("n", range(1, 13))
def test_median_network_sorts_middle_of_every_0_1_input(n):
    """0-1 principle: a comparator network that places the middle of every 0/1 input
    places the middle of every input."""
    net, m1, m2 = median_network(n)
    codes = np.arange(2**n)
    bits = ((codes[:, None] >> np.arange(n)) & 1).astype(np.int8)  # (2^n, n)
    for a, b in net:
        lo = np.minimum(bits[:, a], bits[:, b])
        hi = np.maximum(bits[:, a], bits[:, b])
        bits[:, a], bits[:, b] = lo, hi
    ones = ((codes[:, None] >> np.arange(n)) & 1).sum(axis=1)
    # sorted ascending: position p holds a 1 iff p >= n - ones
    np.testing.assert_array_equal(bits[:, m1], (m1 >= n - ones).astype(np.int8))
    np.testing.assert_array_equal(bits[:, m2], (m2 >= n - ones).astype(np.int8))


@settings(max_examples=100, deadline=None)
@given(st.lists(SMALL_INTS, min_size=1, max_size=15), st.integers(1, 8))
def test_minmax_passes_follow_distinct_count(col, n):
    """Net effect of the back-off: k = min(n, (d-1)//2) passes over d distinct values."""
    d = sorted(set(col))
    k = min(n, (len(d) - 1) // 2)
    kept = [v for v in col if d[k] <= v <= d[len(d) - 1 - k]]
    assert ref_minmax(col, n) == pytest.approx(ref_mean(kept))
    got = combine(np.array(col, dtype=np.float32).reshape(-1, 1, 1), Method("minmax", minmax=n))
    assert float(got[0, 0]) == pytest.approx(ref_mean(kept), rel=1e-6)


# --------------------------------------------------------------------------- examples and edges


def column(values) -> np.ndarray:
    return np.array(values, dtype=np.float32).reshape(-1, 1, 1)


def test_documented_examples():
    assert combine(column([1, 1, 2, 3, 3]), Method("minmax", minmax=1))[0, 0] == 2.0
    assert combine(column([0, 10]), Method("sigma", sigma=0.5))[0, 0] == 5.0
    # the literal rule with statistics.pstdev agrees
    assert abs(0 - statistics.fmean([0, 10])) / statistics.pstdev([0, 10]) > 0.5


def test_median_even_is_mean_of_middle_two():
    assert combine(column([4, 1, 3, 10]), Method("median"))[0, 0] == 3.5


def test_all_equal_columns():
    stack = np.full((7, 2, 3), 1234.5, dtype=np.float32)
    for method in (Method("mean"), Method("median"), Method("minmax", minmax=3), Method("sigma", sigma=0.1)):
        np.testing.assert_array_equal(combine(stack, method), np.full((2, 3), 1234.5, np.float32))


def test_sigma_strictly_greater():
    # [0, 0, 10]: mean 10/3, std 4.714; z-score of 10 is exactly sqrt(2)... use [0, 10]:
    # both z-scores are exactly 1: z = 1 keeps both (not strictly greater)
    assert combine(column([0, 10]), Method("sigma", sigma=1.0))[0, 0] == 5.0
    # [0, 0, 0, 12]: mean 3, std 5.196; z-score of 12 is 1.732 > 1.5: rejected
    assert combine(column([0, 0, 0, 12]), Method("sigma", sigma=1.5))[0, 0] == 0.0


def test_sigma_all_rejected_falls_back_to_minmax_2():
    # mean 6, std 4.52: z-scores 1.33, 1.11, 0.66, 0.89, 0.89, all > 0.5
    col = [0, 1, 9, 10, 10]
    mean, std = statistics.fmean(col), statistics.pstdev(col)
    assert all(abs(x - mean) / std > 0.5 for x in col)
    # min/max clip n=2 on 4 distinct values makes one pass: [1, 9] -> 5 (the mean is 6)
    assert ref_sigma(col, 0.5) == ref_minmax(col, 2) == 5.0
    assert combine(column(col), Method("sigma", sigma=0.5))[0, 0] == 5.0
    # a z-score of 0 is never rejected
    assert combine(column([0, 0, 10, 10, 20, 20]), Method("sigma", sigma=0.1))[0, 0] == 10.0


def test_wide_rows_cross_tile_boundaries():
    rng = np.random.default_rng(7)
    stack = rng.integers(0, 9, size=(40, 2, 1100)).astype(np.float32)
    stack[:, :, ::3] = rng.normal(3000, 50, size=(40, 2, 367)).astype(np.float32)
    for method in (Method("mean"), Method("median"), Method("minmax", minmax=2), Method("sigma", sigma=1.5)):
        assert_matches(combine(stack, method), stack, method)


def test_combine_does_not_modify_input_and_takes_any_layout():
    rng = np.random.default_rng(1)
    base = rng.normal(100, 10, size=(5, 4, 6))
    stack = base.astype(np.float32)
    before = stack.copy()
    for method in (Method("median"), Method("sigma"), Method("minmax", minmax=1)):
        out = combine(stack, method)
        np.testing.assert_array_equal(stack, before)
        np.testing.assert_array_equal(combine(base, method), out)  # float64 in: same
        view = np.asfortranarray(stack)
        np.testing.assert_array_equal(combine(view, method), out)
        np.testing.assert_array_equal(combine(stack, method, workers=1), out)
        np.testing.assert_array_equal(combine(stack, method, workers=3), out)


def test_combine_bad_shapes():
    with pytest.raises(ValueError):
        combine(np.zeros((3, 4), np.float32), Method("mean"))
    with pytest.raises(ValueError):
        combine(np.zeros((0, 4, 4), np.float32), Method("mean"))
    assert combine(np.zeros((3, 0, 4), np.float32), Method("mean")).shape == (0, 4)


# --------------------------------------------------------------------------- method


def test_method_labels_and_descriptions():
    assert Method("mean").label == "Mean"
    assert Method("median").label == "Median"
    assert Method("minmax", minmax=2).label == "MinMaxClip2"
    assert Method("sigma", sigma=2.0).label == "SigmaClip2.0"
    assert Method("sigma", sigma=2.5).label == "SigmaClip2.5"
    assert Method("sigma", sigma=3).label == "SigmaClip3.0"
    assert Method("sigma", sigma=2.0).description == "sigma clip z=2.0"
    assert Method("minmax", minmax=2).description == "min/max clip n=2"
    assert Method("mean").description == "mean"
    assert Method("median").description == "median"
    assert Method("minmax", minmax=3).min_frames == 7
    assert Method("sigma").min_frames == 1


def test_method_from_settings():
    assert Method.from_settings(CombineSettings(method="sigma")) == Method("sigma", sigma=2.0, minmax=2)
    with pytest.raises(ValueError, match="'auto'"):  # the default: resolved per group (flatd.stack.auto)
        Method.from_settings(CombineSettings())
    m = Method.from_settings(CombineSettings(method="minmax", minmax=3))
    assert (m.name, m.minmax, m.label) == ("minmax", 3, "MinMaxClip3")


@pytest.mark.parametrize("kwargs", [dict(name="average"), dict(name="sigma", sigma=0), dict(name="sigma", sigma=float("nan")),
                                    dict(name="minmax", minmax=0), dict(name="minmax", minmax=1.5)])
def test_method_rejects_bad_parameters(kwargs):
    with pytest.raises(ValueError):
        Method(**kwargs)


# --------------------------------------------------------------------------- normalization


def test_normalization_factors():
    f = normalization_factors([100.0, 200.0, 300.0])
    assert f.dtype == np.float32
    np.testing.assert_allclose(f, [2.0, 1.0, 2 / 3], rtol=1e-7)
    with pytest.raises(ValueError, match="frame 1.*must be > 0"):
        normalization_factors([100.0, 0.0])
    with pytest.raises(ValueError, match="frame 0"):
        normalization_factors([-5.0, 10.0])
    with pytest.raises(ValueError):
        normalization_factors([float("nan"), 10.0])


def test_normalize_in_place():
    stack = np.ones((3, 2, 2), np.float32)
    normalize(stack, [1.0, 2.0, 0.5])
    assert stack[0, 0, 0] == 1 and stack[1, 1, 1] == 2 and stack[2, 0, 1] == 0.5


def test_combiner_calibrates_clips_normalizes():
    rng = np.random.default_rng(3)
    images = [rng.normal(level, 5, size=(20, 8)).astype(np.float32) for level in (1000, 2000, 4000)]
    dark = np.full((20, 8), 100.0, np.float32)
    dark[0, 0] = 70000  # subtracting it clips at 0
    comb = Combiner(images, [dark, 50.0, None], normalize="multiplicative")
    out = comb.combine(Method("mean"))
    cal = [np.clip(images[0] - dark, 0, 65535), np.clip(images[1] - np.float32(50), 0, 65535), images[2]]
    # the level is the relative one of flatd.stack.levels: 160 pixels, all in the sample
    from flatd.stack.levels import relative_levels

    levels = relative_levels(np.stack([c.ravel() for c in cal]).astype(np.float32))
    assert comb.levels == levels
    factors = normalization_factors(levels)
    assert comb.factors == [float(f) for f in factors]
    want = np.mean([c * f for c, f in zip(cal, factors)], axis=0, dtype=np.float64)
    np.testing.assert_allclose(out, want, rtol=1e-6)
    assert cal[0][0, 0] == 0
    plain = Combiner(images).combine(Method("median"))
    np.testing.assert_array_equal(plain, np.median(np.array(images), axis=0).astype(np.float32))


# --------------------------------------------------------------------------- stages: rejection apart from the estimator


def ref_sigma_kept(col, z):
    """The values sigma clipping keeps (the min/max clip n=2 fallback included), exactly."""
    exact = [Fraction(float(x)) for x in col]
    mean = sum(exact) / len(exact)
    var = sum((x - mean) ** 2 for x in exact) / len(exact)
    kept = list(col) if var == 0 else [x for x, e in zip(col, exact) if not (e - mean) ** 2 > Fraction(float(z)) ** 2 * var]
    if kept:
        return kept
    values = sorted(set(col))
    k = min(2, (len(values) - 1) // 2)
    return [v for v in col if values[k] <= v <= values[len(values) - 1 - k]]


@pytest.fixture
def staged_methods(monkeypatch):
    """sigma rejection with the median estimator, and a rejection that keeps nothing."""
    from flatd.stack import combine as kernels
    from flatd.stack import methods

    def keep_none(stack, r, c0, c1, params, keep):
        for i in range(stack.shape[0]):
            for c in range(c1 - c0):
                keep[i, c] = 0

    monkeypatch.setitem(kernels.REJECTIONS, "test-none", kernels.rejection_kernel(keep_none))
    added = [
        methods.Entry("test-sigma-median", "x", lambda v: "X", lambda v: "x", params=(methods.SIGMA,),
                      reject="sigma", estimator="median"),
        methods.Entry("test-none-mean", "x", lambda v: "X", lambda v: "x", reject="test-none", estimator="mean"),
        methods.Entry("test-none-median", "x", lambda v: "X", lambda v: "x", reject="test-none", estimator="median"),
        methods.Entry("test-missing", "x", lambda v: "X", lambda v: "x", reject="no-such-kernel"),
    ]
    for entry in added:
        methods.register(entry)
    yield
    for entry in added:
        methods.unregister(entry.name)


@settings(PROPS, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(stacks(), DYADIC_Z)
def test_median_of_what_sigma_keeps(staged_methods, stack, z):  # the fixture holds for every example
    got = combine(stack, Method("test-sigma-median", sigma=z))
    for r in range(stack.shape[1]):
        for c in range(stack.shape[2]):
            assert got[r, c] == np.float32(ref_median(ref_sigma_kept([float(v) for v in stack[:, r, c]], z)))


def test_nothing_kept_is_nan(staged_methods):
    stack = np.arange(24, dtype=np.float32).reshape(3, 2, 4)
    assert np.isnan(combine(stack, Method("test-none-mean"))).all()
    assert np.isnan(combine(stack, Method("test-none-median"))).all()


def test_a_method_without_its_kernel(staged_methods):
    with pytest.raises(ValueError, match="no rejection kernel 'no-such-kernel'"):
        combine(np.ones((3, 2, 2), np.float32), Method("test-missing"))


@pytest.mark.parametrize("n", range(1, 40))
def test_sort_network_sorts(n):
    from flatd.stack.combine import sort_network

    values = np.random.default_rng(n).integers(0, 5, size=(n, 50))
    for a, b in sort_network(n):
        lo, hi = np.minimum(values[a], values[b]), np.maximum(values[a], values[b])
        values[a], values[b] = lo, hi
    assert (np.diff(values, axis=0) >= 0).all()


def test_no_rejection_makes_no_mask():
    from flatd.stack.combine import _kernel

    for name in ("mean", "median"):
        assert _kernel(Method(name), 5).reject == 0  # the driver skips the keep-mask
    assert _kernel(Method("sigma"), 5).reject != 0
