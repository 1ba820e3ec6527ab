"""flatd.stack.levels: the robust level of a flat, on a dense grid over the whole frame."""

from __future__ import annotations

import math

import numpy as np
import pytest

from flatd.stack import levels as LV
from flatd.stack.combine import check_level


def vignetted(rng, level=20000.0, shape=(600, 800), noise=150.0):
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    vignette = 1 - 0.2 * (((xx - w / 2) / w) ** 2 + ((yy - h / 2) / h) ** 2)
    return rng.normal(level * vignette, noise).astype(np.float32)


def plain_ikss(values) -> float:
    """IKSS as written in the module's docstring, the plain way (np.median, no sorting tricks)."""
    x = np.array([v for v in np.asarray(values, np.float64).ravel() if math.isfinite(v)])
    s0 = math.inf
    m = float(np.median(x))
    for _ in range(LV.MAX_ROUNDS):
        m = float(np.median(x))
        mad = float(np.median(np.abs(x - m)))
        if mad <= 0:
            break
        u = (x - m) / (9 * mad)
        a = np.abs(u) < 1
        up = np.sum(((x - m) ** 2 * (1 - u ** 2) ** 4)[a])
        down = np.sum(((1 - u ** 2) * (1 - 5 * u ** 2))[a])
        s = math.sqrt(len(x) * up / down ** 2) if down else 0.0
        if s <= 0 or abs(s0 - s) <= LV.EPS * s:
            break
        s0 = s
        keep = (x >= m - LV.K * s) & (x <= m + LV.K * s)
        if keep.all() or not keep.any():
            break
        x = x[keep]
    return m


# --------------------------------------------------------------------------- the grid


@pytest.mark.parametrize("shape", [(1, 1), (37, 53), (500, 500), (501, 500), (1000, 1000), (2448, 3264),
                                   (4176, 6252), (1, 400_000), (3000, 7)])
def test_grid_step_is_the_largest_that_keeps_the_target(shape):
    h, w = shape
    step = LV.grid_step(h, w)
    rows, cols = LV.sample_shape(h, w, step)
    if h * w <= LV.LEVEL_SAMPLE:
        assert step == 1 and (rows, cols) == (h, w)
    else:
        assert rows * cols >= LV.LEVEL_SAMPLE
        r2, c2 = LV.sample_shape(h, w, step + 1)
        assert r2 * c2 < LV.LEVEL_SAMPLE
    image = np.zeros(shape, np.float32)
    assert LV.grid(image, step).shape == (rows, cols)


def test_grid_spans_the_whole_frame():
    assert LV.grid_step(2448, 3264) == 12
    rows, cols = LV.grid_slices(2448, 3264, 12)
    picked = range(2448)[rows]
    assert picked[0] == 6 and picked[-1] >= 2448 - 12
    assert range(3264)[cols][-1] >= 3264 - 12


# --------------------------------------------------------------------------- the estimator


def test_equals_a_plain_ikss():
    rng = np.random.default_rng(1)
    for trial in range(6):
        x = rng.normal(1000, 30, size=2000).astype(np.float32)
        x[rng.random(x.size) < 0.05 * trial] = rng.uniform(0, 60000)  # outliers, more each time
        assert LV.robust_level(x) == pytest.approx(plain_ikss(x), rel=1e-6), trial


def test_clean_sample_is_its_median_exactly():
    x = np.arange(1, 10001, dtype=np.float32)  # uniform: nothing lies beyond 4 s
    assert LV.robust_level(x) == 5000.5
    assert LV.robust_level(x[:-1]) == 5000.0


def test_order_and_input_do_not_matter():
    rng = np.random.default_rng(2)
    img = vignetted(rng, shape=(60, 70))
    copy = img.copy()
    a = LV.robust_level(img)
    assert np.array_equal(img, copy)  # not modified
    assert LV.robust_level(rng.permutation(img.ravel())) == a
    assert isinstance(a, float)


def test_stars_do_not_move_the_level():
    rng = np.random.default_rng(3)
    img = vignetted(rng)
    clean = LV.frame_level(img)
    stars = img.copy()
    stars[rng.random(img.shape) < 0.02] = 65000  # 2 % saturated: stars, hot pixels, cosmic rays
    assert abs(LV.frame_level(stars) / clean - 1) < 1e-3
    assert abs(float(stars.mean()) / float(img.mean()) - 1) > 0.03  # the mean is fooled


def test_a_passing_cloud_moves_the_level_little():
    rng = np.random.default_rng(4)
    img = vignetted(rng)
    clean = LV.frame_level(img)
    cloud = img.copy()
    cloud[:, :200] *= np.float32(0.8)  # a quarter of the frame 20 % darker
    assert abs(LV.frame_level(cloud) / clean - 1) < 0.01
    assert abs(float(cloud.mean()) / float(img.mean()) - 1) > 0.04


def test_a_gradient_shifts_it_no_more_than_the_pixels():
    rng = np.random.default_rng(5)
    img = vignetted(rng)
    clean = LV.frame_level(img)
    ramp = np.linspace(0.95, 1.05, img.shape[1], dtype=np.float32)  # +-5 % across the frame
    # the median of a vignetted frame under a ramp moves by a fraction of the ramp's reach
    assert abs(LV.frame_level(img * ramp) / clean - 1) < 0.01


def test_non_finite_values_are_left_out():
    x = np.arange(1, 101, dtype=np.float32)
    with_bad = np.concatenate([x, np.float32([np.nan, np.inf, -np.inf])])
    assert LV.robust_level(with_bad) == LV.robust_level(x)
    assert math.isnan(LV.robust_level(np.full(5, np.nan, np.float32)))
    assert check_level(LV.robust_level(np.full(5, np.nan, np.float32)))


def test_levels_that_cannot_normalize_are_still_refused():
    assert LV.frame_level(np.zeros((10, 10), np.float32)) == 0.0
    assert check_level(LV.frame_level(np.zeros((10, 10), np.float32)))
    assert check_level(LV.frame_level(np.full((10, 10), 500.0, np.float32))) is None  # all equal: s = 0
    assert LV.frame_level(np.full((10, 10), 500.0, np.float32)) == 500.0
    with pytest.raises(ValueError, match="no pixels"):
        LV.robust_level(np.zeros(0, np.float32))
    with pytest.raises(ValueError):
        LV.frame_level(np.zeros(5, np.float32))


def test_sample_memory_is_bounded():
    # the biggest sample: ~LEVEL_SAMPLE pixels whatever the frame
    for h, w in ((2448, 3264), (4176, 6252), (10000, 14000)):
        step = LV.grid_step(h, w)
        assert LV.sample_bytes(h, w, step) <= 3 * 4 * 2 * LV.LEVEL_SAMPLE + 6 * LV.CHUNK * 8


# --------------------------------------------------------------------------- the engine reads the same sample


def test_engine_grid_equals_the_grid_of_the_calibrated_frame(tmp_path):
    from flatd.ingest.frames import read_frame
    from flatd.stack.pixels import open_pixels, read_image

    from pixelfiles import flat_data, write

    rng = np.random.default_rng(6)
    data = flat_data(rng, 9000, (41, 57))
    dark_data = rng.normal(300, 30, size=(41, 57))
    dark_data[2, 2] = 60000
    plain = read_frame(write(tmp_path / "f.fits", data.astype(np.uint16)))
    packed = read_frame(write(tmp_path / "f.fits.fz", data.astype(np.uint16), compressed=True))
    floats = read_frame(write(tmp_path / "g.fits", data.astype(np.float32)))
    dark = read_frame(write(tmp_path / "d.fits", dark_data.astype(np.uint16)))
    dark_image = read_image(dark)
    for step in (1, 2, 3, 7):
        with open_pixels(dark) as src:
            cal = src.sample_grid(step, chunk_rows=3)
        assert np.array_equal(cal, LV.grid(dark_image, step))
        for frame in (plain, packed, floats):
            image = read_image(frame)
            with open_pixels(frame) as src:
                got = src.sample_grid(step, chunk_rows=3)
                assert np.array_equal(got, LV.grid(image, step))
                got = src.sample_grid(step, cal=cal, chunk_rows=3)
                want = np.clip(image - dark_image, 0, 65535)
                assert np.array_equal(got, LV.grid(want, step))
                got = src.sample_grid(step, pedestal=123.5)
                want = np.clip(image - np.float32(123.5), 0, 65535)
                assert np.array_equal(got, LV.grid(want, step))


def test_mad_of_sorted_values_equals_the_plain_one():
    rng = np.random.default_rng(8)
    for n in (1, 2, 3, 4, 5, 10, 11, 100, 1001):
        for trial in range(20):
            x = np.sort(rng.integers(0, 7, n).astype(np.float32) if trial % 2 else
                        rng.normal(0, 5, n).astype(np.float32))
            m = LV._median_sorted(x)
            want = float(np.median(np.abs(x.astype(np.float64) - m)))
            assert LV._mad_sorted(x, m) == want, (n, trial)
            # about another centre too (the IKSS rounds use the median, but the runs hold for any)
            c = float(x[0]) - 1.0
            assert LV._mad_sorted(x, c) == float(np.median(np.abs(x.astype(np.float64) - c)))


# --------------------------------------------------------------------------- relative levels


def plain_mode(r) -> float:
    """The mode search of ratio_location, the plain way."""
    r = np.array([v for v in np.asarray(r, np.float64) if math.isfinite(v)])
    m = float(np.median(r))
    unit = 1.4826 * float(np.median(np.abs(np.diff(r)))) / math.sqrt(2)
    for _ in range(LV.MODE_ROUNDS):
        moved = float(np.median(r[np.abs(r - m) <= LV.WINDOW * unit]))
        done = abs(moved - m) <= LV.MODE_EPS * unit
        m = moved
        if done:
            break
    return m


def _frames(rng, levels, shape=(300, 400)):
    base = vignetted(rng, level=1.0, shape=shape, noise=0.0)
    return np.stack([rng.normal(base * lv, 0.01 * lv).astype(np.float32) for lv in levels])


def _samples(frames):
    return np.stack([f.ravel() for f in frames]).astype(np.float32)


def test_relative_levels_follow_the_plain_definition():
    rng = np.random.default_rng(11)
    frames = _frames(rng, [20000, 21000, 19500, 20500, 22000])
    frames[2, :, :150] *= np.float32(0.75)
    samples = _samples(frames)
    own = [plain_ikss(f) for f in frames]
    ratios = frames / np.array(own, np.float32)[:, None, None]
    stride = -(-ratios[0].size // LV.MODE_SAMPLE)
    expected = []
    for i in range(len(frames)):
        reference = np.median(np.delete(ratios, i, axis=0), axis=0)  # the others' median
        expected.append(own[i] * plain_mode((ratios[i] / reference).ravel()[::stride]))
    got = LV.relative_levels(samples)
    assert got == pytest.approx(expected, rel=2e-6)


@pytest.mark.parametrize("n", [2, 3, 4, 7, 8])
def test_the_median_of_the_others_is_the_plain_one(n):
    rng = np.random.default_rng(15)
    samples = rng.integers(0, 5, size=(n, 3000)).astype(np.float32)  # ties too
    samples[:, :500] = rng.normal(1, 0.1, size=(n, 500))
    samples[rng.integers(0, n), 7] = np.nan
    for stride in (1, 3):
        ratios = samples.copy()
        LV._ratios_to_others(ratios, list(range(n)), stride)
        for i in range(n):
            with np.errstate(divide="ignore", invalid="ignore"):  # zeros among the integers
                want = samples[i, ::stride] / np.median(np.delete(samples, i, axis=0), axis=0).astype(np.float32)[::stride]
            got = ratios[i, ::stride]
            if stride == 1:
                assert np.isnan(got[7])  # a position with a NaN anywhere is left out for every frame
                got, want = np.delete(got, 7), np.delete(want, 7)
            assert np.array_equal(got, want, equal_nan=True), (i, stride)
        if stride == 3:  # the other samples are left alone
            assert np.array_equal(np.delete(ratios, np.s_[::3], axis=1), np.delete(samples, np.s_[::3], axis=1),
                                  equal_nan=True)


def test_a_frame_s_own_level_does_not_leak_into_its_relative_level(monkeypatch):
    # each frame is compared with the median of the others, so an error in its own level
    # (the sampling noise of the grid) cancels: own x ratio to the others does not depend on it
    # (it moves the others' by about 1/(N-1) of it: it is one of the N-1 in their reference)
    rng = np.random.default_rng(16)
    frames = _frames(rng, [20000, 21000, 19500, 20500, 22000, 20800, 21500, 19800, 20200])
    exact = LV.relative_levels(_samples(frames))
    robust_level = LV.robust_level
    monkeypatch.setattr(LV, "robust_level", lambda x: robust_level(x) * (1.002 if x[0] == frames[2].flat[0] else 1))
    off = LV.relative_levels(_samples(frames))
    assert abs(off[2] / exact[2] - 1) < 1e-5  # not 2e-3, nor half of it
    for i in (0, 1, 3, 4, 5, 6, 7, 8):
        assert abs(off[i] / exact[i] - 1) < 1.5 * 2e-3 / 8


@pytest.mark.parametrize("depth", [0.9, 0.8, 0.6])
def test_a_cloud_over_a_third_of_one_frame_does_not_move_its_relative_level(depth):
    rng = np.random.default_rng(12)
    truth = [20000.0 * (1 - 0.04 * i) for i in range(12)]  # a falling twilight sky
    frames = _frames(rng, truth)
    frames[5, :, :140] *= np.float32(depth)  # the cloud, over 35 % of frame 5
    rel = LV.relative_levels(_samples(frames))
    scale = np.median(np.array(rel) / np.array(truth))
    assert abs(rel[5] / truth[5] / scale - 1) < 1e-3  # the clear part decides
    for i in range(12):
        assert abs(rel[i] / truth[i] / scale - 1) < 1e-3


def test_a_gradient_in_one_frame_moves_its_relative_level_by_its_mean_only():
    rng = np.random.default_rng(13)
    truth = [20000.0] * 8
    frames = _frames(rng, truth)
    ramp = np.linspace(0.97, 1.03, frames.shape[2], dtype=np.float32)  # mean 1 across the frame
    frames[3] *= ramp
    rel = LV.relative_levels(_samples(frames))
    assert abs(rel[3] / np.median(rel) - 1) < 2e-3


def test_relative_levels_leave_unusable_frames_to_check_level():
    rng = np.random.default_rng(14)
    frames = _frames(rng, [100.0, 120.0, 110.0])
    frames[1] = 0.0
    rel = LV.relative_levels(_samples(frames))
    assert rel[1] == 0.0 and check_level(rel[1])
    assert check_level(rel[0]) is None and check_level(rel[2]) is None
    one = LV.relative_levels(_samples(frames[:1]))
    assert one == [LV.robust_level(frames[0])]
