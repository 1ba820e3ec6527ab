"""The clean-data rejection baseline (flatd.stack.baseline) and the warning measured from it.

Robust methods reject some values of clean data by construction; combine.rejection_warn
is a margin above what the same method rejects from clean Gaussian columns of the same
number of frames. Everything here is deterministic (the noise stack is seeded); the
tolerances are standard errors measured on that stack, not timings.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from scipy import stats

from flatd.stack import baseline as B
from flatd.stack import combine as C
from flatd.stack.auto import TABLE, choose
from flatd.stack.methods import Method


def _column_counts(method: Method, n: int) -> tuple[np.ndarray, np.ndarray]:
    """On the baseline's own noise stack: the values rejected per column (low + high)
    and per frame (int64 (n, 2))."""
    stack = B.noise_stack(n)
    pixels = np.zeros((2, *stack.shape[1:]), dtype=np.uint16)
    frames = np.zeros((n, 2), dtype=np.int64)
    C.combine(stack, method, workers=1, frame_counts=frames, pixel_counts=pixels)
    return pixels.sum(axis=0, dtype=np.int64).ravel(), frames


def _standard_error(per_column: np.ndarray, n: int) -> float:
    """The standard error of the fraction of all values rejected: columns are independent,
    so it is the spread of the per-column counts over n sqrt(columns). At least the error
    of one rejected value in the whole stack, for the methods that reject (almost) none."""
    cols = per_column.size
    return max(float(per_column.std(ddof=1)) / (n * math.sqrt(cols)), 1.0 / (n * cols))


def test_the_noise_stack_is_seeded_float32_gaussian_of_the_stated_level():
    a, b = B.noise_stack(7), B.noise_stack(7)
    assert a.dtype == np.float32 and a.flags.c_contiguous
    assert a.shape[0] == 7 and a.shape[1] * a.shape[2] == B.columns_for(7) == B.COLUMNS
    np.testing.assert_array_equal(a, b)  # the same for the same N
    assert not np.array_equal(B.noise_stack(8)[:7], a)  # each N its own draw
    values = a.astype(np.float64).ravel()
    se_mean = B.SIGMA / math.sqrt(values.size)
    assert abs(values.mean() - B.LEVEL) < 5 * se_mean
    assert abs(values.std() - B.SIGMA) < 5 * B.SIGMA / math.sqrt(2 * values.size)


def test_big_groups_get_fewer_columns_and_stay_bounded():
    assert B.columns_for(1) == B.columns_for(20) == B.COLUMNS
    assert B.columns_for(40) == B.MAX_VALUES // 40
    assert B.columns_for(10_000) == B.MIN_COLUMNS
    for n in (1, 7, 40, 200, 1000):
        assert B.columns_for(n) % B.ROWS == 0 and n * B.columns_for(n) <= max(B.MAX_VALUES, n * B.MIN_COLUMNS)


@pytest.mark.parametrize("name", ["mean", "median"])
@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 40])
def test_mean_and_median_reject_nothing(name, n):
    b = B.baseline(Method(name), n)
    assert (b.low, b.high, b.total) == (0.0, 0.0, 0.0)
    assert b.n == n and b.values == n * B.columns_for(n)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_sigma_2_cannot_reject_below_6_frames(n):
    """With the population standard deviation no value of n is more than (n-1)/sqrt(n)
    sigmas from the mean: under 2 up to 5 frames."""
    assert (n - 1) / math.sqrt(n) <= 2
    assert B.baseline(Method("sigma", sigma=2.0), n).total == 0.0


@pytest.mark.parametrize("n", [7, 8, 15, 40, 200])
def test_sigma_2_rejects_the_exact_finite_sample_tail(n):
    """One value's z = |x - mean| / std (population std) of n Gaussian values exceeds 2
    with probability P(Beta(1/2, (n-2)/2) > 4/(n-1)) (the internally studentized residual);
    it tends to the Gaussian two-sided tail 4.55 % as n grows. The baseline is within five
    standard errors (measured on the stack) of it, low and high alike."""
    method = Method("sigma", sigma=2.0)
    b = B.baseline(method, n)
    per_column, _ = _column_counts(method, n)
    se = _standard_error(per_column, n)
    expected = float(stats.beta.sf(4.0 / (n - 1), 0.5, (n - 2) / 2))
    assert abs(b.total - expected) < 5 * se, (b.total, expected, se)
    assert abs(b.low - expected / 2) < 5 * se and abs(b.high - expected / 2) < 5 * se
    if n == 200:
        gaussian = 2 * stats.norm.sf(2.0)  # 4.55 %
        assert abs(expected - gaussian) < 0.001 and abs(b.total - gaussian) < 0.001 + 5 * se


@pytest.mark.parametrize("passes, n", [(1, 3), (2, 5), (2, 8), (3, 15), (2, 40)])
def test_minmax_rejects_2n_of_n_frames(passes, n):
    """Min/max clip drops every copy of a column's minimum and maximum, n passes: exactly
    passes/N low and high, a little more where float32 values tie (rare at sigma 100)."""
    b = B.baseline(Method("minmax", minmax=passes), n)
    for side in (b.low, b.high):
        assert passes / n <= side < passes / n + 1e-3


def test_the_baseline_is_what_combine_counts_on_that_stack():
    method = Method("esd", esd_outliers=0.3, esd_significance=0.05)
    b = B.baseline(method, 6)
    per_column, frames = _column_counts(method, 6)
    assert b.values == 6 * per_column.size
    assert (b.low, b.high) == (frames[:, 0].sum() / b.values, frames[:, 1].sum() / b.values)
    assert per_column.sum() == frames.sum()


def test_one_frame_of_clean_data_loses_the_same_fraction():
    """The frames are interchangeable: each one's share is the baseline, within its
    standard error (one frame's values are rejected or not independently across columns)."""
    method = Method("winsorized", low=3.0, high=3.0)
    n = 5
    b = B.baseline(method, n)
    _, frames = _column_counts(method, n)
    cols = B.columns_for(n)
    per_frame = frames.sum(axis=1) / cols
    se = math.sqrt(b.total * (1 - b.total) / cols)
    assert np.all(np.abs(per_frame - b.total) < 5 * se), (per_frame, b.total, se)
    assert per_frame.mean() == pytest.approx(b.total, rel=1e-12)


def test_cached_per_method_and_n_and_deterministic():
    method = Method("winsorized", low=4.0, high=4.0)
    first = B.baseline(method, 8)
    assert B.baseline(Method("winsorized", low=4.0, high=4.0), 8) is first  # equal Methods share it
    B.baseline.cache_clear()
    assert B.baseline(method, 8) == first  # measured again: the same
    assert B.baseline(Method("winsorized", low=3.0, high=3.0), 8).total > first.total  # its parameters count


@pytest.mark.parametrize("n", [0, -1, 2.0, True])
def test_a_bad_number_of_frames_is_refused(n):
    with pytest.raises(ValueError, match="whole number of frames"):
        B.baseline(Method("median"), n)


def test_the_auto_table_baselines():
    """What method: auto rejects from clean data, as the README's table says: median
    nothing; esd 0.3 0.08 (low relaxation 1.5) 0.7-1.2 % at 5 to 7 frames (above combine.rejection_warn's 0.5 %,
    the reason for the baseline); winsorized 4 4 under 0.5 % from 8 frames, falling."""
    got = {n: B.baseline(choose(n)[0], n) for n in (3, 4, 5, 7, 8, 15, 40)}
    assert [choose(n)[0].name for n in got] == ["median"] * 2 + ["esd"] * 2 + ["winsorized"] * 3
    assert TABLE[1].params == {"esd_outliers": 0.3, "esd_significance": 0.08, "esd_low": 1.5}
    assert got[3].total == got[4].total == 0.0
    assert 0.006 < got[5].total < 0.011 and 0.009 < got[7].total < 0.014
    assert 0.003 < got[8].total < 0.005 and got[8].total > got[15].total > got[40].total > 0


# --------------------------------------------------------------------------- the runner's Rejection


def _rejection(method: Method, per_frame: list[tuple[int, int]], size: int = 10_000, warn=0.005):
    """Rejection.of for a job of len(per_frame) inputs whose combine rejected these counts."""
    from flatd.runner import Rejection
    from flatd.stack.engines import StackResult

    n = len(per_frame)
    job = SimpleNamespace(id="j1", method=method, rejection_warn=warn,
                          inputs=tuple(SimpleNamespace(frame=SimpleNamespace(path=Path(f"/c/flat_{i}.fits")))
                                       for i in range(n)))
    result = StackResult(np.zeros((1, size), np.float32), [1.0] * n, [1.0] * n, 1,
                         rejected=np.array(per_frame, dtype=np.int64))
    return Rejection.of(job, result)


def test_rejection_measures_from_the_baseline():
    method = Method("esd", esd_outliers=0.3, esd_significance=0.05)
    base = B.baseline(method, 6)
    size = 10_000
    # every input loses its clean-data share plus 0.4 %: not above the margin of 0.5 %
    share = round((base.total + 0.004) * size)
    rej = _rejection(method, [(share // 2, share - share // 2)] * 6, size)
    assert (rej.baseline_low, rej.baseline_high) == (base.low, base.high) and rej.baseline == base.total
    assert rej.total > 0.005 and not rej.warn and rej.frames_above() == []  # the old rule warned here
    assert rej.limit == pytest.approx(base.total + 0.005)
    # one input loses 10 % more: it is named; overall 1.67 % above the baseline: a warning
    bad = share + 1000
    rej = _rejection(method, [(share // 2, share - share // 2)] * 5 + [(0, bad)], size)
    assert rej.warn and [f[0].name for f in rej.frames_above()] == ["flat_5.fits"]


def test_rejection_without_a_threshold_measures_no_baseline(monkeypatch):
    import flatd.stack.baseline as module

    def boom(*args):
        raise AssertionError("no baseline without combine.rejection_warn")

    monkeypatch.setattr(module, "baseline", boom)
    rej = _rejection(Method("sigma", sigma=2.0), [(500, 500)] * 8, warn=None)
    assert rej.threshold is None and rej.baseline == 0 and rej.limit is None
    assert not rej.warn and rej.frames_above() == []


def test_a_baseline_that_cannot_be_measured_is_a_notice_and_zero(monkeypatch):
    import flatd.stack.baseline as module
    from flatd.notify import events as E

    def boom(*args):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(module, "baseline", boom)
    seen = []
    unsubscribe = E.subscribe(seen.append)
    try:
        rej = _rejection(Method("sigma", sigma=2.0), [(50, 50)] * 8)
    finally:
        unsubscribe()
    assert rej.baseline == 0 and rej.warn  # 1 % > 0 + 0.5 %: compared as before the baseline
    (notice,) = [e for e in seen if e.name == "rejection_baseline"]
    assert notice.level == E.WARNING and "kernel exploded" in notice.message
