"""The flat checks (flatd.qc.flats) on seeded level samples: each trips on its fault and
stays quiet on clean sessions."""

from __future__ import annotations

import math
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from flatd.config import Quality
from flatd.qc import flats as Q
from flatd.stack.levels import robust_level

ROWS, COLS = 120, 160  # samples: a 1440 x 1920 frame at step 12
STEP = 12


def frame(i: int = 0, bayer=None, **headers) -> SimpleNamespace:
    return SimpleNamespace(path=Path(f"/captures/flat_{i:03d}.fits"), headers=headers, bitpix=16,
                           bayer_pattern=bayer, bayer_offset=(0, 0), row_order="TOP-DOWN", height=ROWS * STEP)


def _grid(rows=ROWS, cols=COLS):
    y, x = np.mgrid[0:rows, 0:cols]
    return y, x, (x - cols / 2) / (cols / 2), (y - rows / 2) / (rows / 2)


def session(seed: int, n: int, level: float = 25000.0, sky: bool = False, colour: bool = False,
            step: int = STEP) -> list[np.ndarray]:
    """n calibrated samples of one session: vignetting, PRNU, dust donuts, photon noise,
    cosmic rays; sky flats with a 15 % level drift and a twilight gradient that fades; a
    colour mosaic whose colour drifts."""
    rng = np.random.default_rng(seed)
    y, x, xx, yy = _grid()
    base = (1 - 0.25 * (xx ** 2 + yy ** 2)) * (1 + 0.005 * rng.standard_normal((ROWS, COLS)))
    for _ in range(4):
        cy, cx, rad = rng.uniform(8, ROWS - 8), rng.uniform(8, COLS - 8), rng.uniform(2, 5)
        d = np.hypot(y - cy, x - cx)
        base *= 1 - 0.05 * ((d < rad) & (d > rad / 2))
    channels = Q.sample_channels(Q.presented_layout(frame(0, "RGGB")), (ROWS, COLS), step) if colour else None
    out = []
    for i in range(n):
        t = i / max(1, n - 1)
        img = base.copy()
        if sky:
            img *= 1 + (0.02 - 0.015 * t) * (0.95 * xx + 0.3 * yy)
        if colour:
            img *= (np.array([0.6, 1.0, 0.8]) * (1 + np.array([0.05, 0.0, -0.05]) * t))[channels]
        mean = level * (1 - 0.15 * t if sky else 1 + 0.002 * rng.standard_normal()) * img
        s = rng.poisson(mean) + rng.normal(0, 3, mean.shape)
        hits = rng.integers(0, ROWS * COLS, 10)
        s.ravel()[hits] += rng.uniform(1000, 30000, 10)
        out.append(s.astype(np.float32))
    return out


def check(samples, bayer=None, quality=None, step=STEP, **headers):
    items = [Q.FlatSample(frame(i, bayer, **headers), s, robust_level(s)) for i, s in enumerate(samples)]
    return Q.check_flats(items, step, quality or Quality())


def names(findings, check_name=None) -> set[str]:
    return {f.path.name for f in findings if check_name is None or f.check == check_name}


# --------------------------------------------------------------------------- full scale


@pytest.mark.parametrize("headers, expected", [
    ({}, 65535.0),
    ({"DATAMAX": 16383}, 16383.0),
    ({"SATURATE": 60000.0}, 60000.0),
    ({"DATAMAX": 4095, "SATURATE": 60000}, 4095.0),
    ({"DATAMAX": "abc"}, 65535.0),
    ({"DATAMAX": "abc", "SATURATE": 50000}, 50000.0),
    ({"DATAMAX": -5}, 65535.0),
    ({"DATAMAX": 0}, 65535.0),
    ({"DATAMAX": 1e300}, 65535.0),
    ({"DATAMAX": float("nan")}, 65535.0),
    ({"DATAMAX": float("inf")}, 65535.0),
    ({"DATAMAX": True}, 65535.0),
    ({"SATURATE": None}, 65535.0),
    ({"DATAMAX": [1, 2]}, 65535.0),
    ({"DATAMAX": "12000"}, 12000.0),
])
def test_full_scale_from_the_header_or_a_fallback(headers, expected):
    assert Q.full_scale(frame(**headers)) == expected


def test_full_scale_of_8_bit_data():
    f = frame()
    f.bitpix = 8
    assert Q.full_scale(f) == 255.0
    f.bitpix = 32  # 16-bit cameras written as 32-bit integers: still 16-bit values
    assert Q.full_scale(f) == 65535.0


# --------------------------------------------------------------------------- level


def test_level_too_high_and_too_low_are_left_out_with_the_figure():
    clean = session(1, 6)
    samples = [s.copy() for s in clean]
    samples[1] = samples[1] * (0.91 * 65535 / robust_level(samples[1]))
    samples[2] = samples[2] * (0.05 * 65535 / robust_level(samples[2]))
    findings = check(samples)
    level = [f for f in findings if f.check == "level"]
    assert names(level) == {"flat_001.fits", "flat_002.fits"}
    high = next(f for f in level if f.path.name == "flat_001.fits")
    assert high.reason == "level 0.91 of full scale (65535), above quality.max_level 0.75"
    assert high.figure == pytest.approx(0.91, abs=0.005) and high.limit == 0.75 and high.leaves_out
    low = next(f for f in level if f.path.name == "flat_002.fits")
    assert "below quality.min_level 0.15" in low.reason and low.figure == pytest.approx(0.05, abs=0.005)


def test_level_within_the_limits_passes_and_datamax_sets_the_scale():
    samples = session(2, 5, level=25000)  # 0.38 of 65535
    assert check(samples) == []
    # the same values from a 14-bit camera (DATAMAX 16383): over the top, and saturated
    found = check(samples, DATAMAX=16383)
    everyone = {f"flat_{i:03d}.fits" for i in range(5)}
    assert names(found, "level") == names(found, "saturation") == everyone
    assert "(16383)" in found[0].reason


def test_level_per_cfa_channel():
    samples = session(3, 5, colour=True, step=11)
    assert check(samples, "RGGB", step=11) == []
    channels = Q.sample_channels(Q.presented_layout(frame(0, "RGGB")), samples[0].shape, 11)
    # too bright: max_level holds for every channel (here red alone over the top)
    hot = samples[0].copy()
    hot[channels == 0] *= 0.8 * 65535 / np.median(hot[channels == 0])
    found = check([hot] + samples[1:], "RGGB", step=11)
    level = [f for f in found if f.check == "level"]
    assert [(f.path.name, f.channel) for f in level] == [("flat_000.fits", "R")]
    assert level[0].reason.startswith("level R 0.8")


def test_min_level_of_a_colour_flat_is_the_brightest_channels():
    """A colour flat exposed on its green at 0.22 of full scale, blue at 0.6 x green (0.13)
    and red almost nothing (a narrowband filter): kept. The same flat under-exposed (green
    at 0.1): left out, by its brightest channel. A channel at 0 fails whatever the others."""
    samples = session(3, 5, colour=True, step=11)
    channels = Q.sample_channels(Q.presented_layout(frame(0, "RGGB")), samples[0].shape, 11)

    def balanced(sample, green, red, blue):
        out = sample.copy()
        for k, target in enumerate((red, green, blue)):
            out[channels == k] *= target * 65535 / np.median(out[channels == k])
        return out

    kept = [balanced(s, 0.22, 0.02, 0.6 * 0.22) for s in samples]
    assert check(kept, "RGGB", step=11) == []
    dim = [balanced(s, 0.10, 0.08, 0.06) for s in samples]
    level = [f for f in check(dim, "RGGB", step=11) if f.check == "level"]
    assert [(f.path.name, f.channel) for f in level] == [(f"flat_{i:03d}.fits", "G") for i in range(5)]
    assert level[0].reason.startswith("level G 0.1 of full scale") and "below quality.min_level 0.15" in level[0].reason
    empty = kept[0].copy()
    empty[channels == 2] = 0.0  # blue emptied (a wrong dark)
    level = [f for f in check([empty] + kept[1:], "RGGB", step=11) if f.check == "level"]
    assert [(f.path.name, f.channel) for f in level] == [("flat_000.fits", "B")]


def test_even_grid_of_a_colour_frame_samples_one_channel_and_is_not_refused():
    samples = session(4, 5)  # step 12 on a colour frame: every sample is the same colour
    assert check(samples, "RGGB") == []


# --------------------------------------------------------------------------- saturation


def test_saturated_fraction_is_left_out():
    samples = session(5, 5)
    rng = np.random.default_rng(0)
    hot = samples[3].copy()
    hot.ravel()[rng.choice(hot.size, hot.size // 100, replace=False)] = 65535.0
    found = check(samples[:3] + [hot] + samples[4:])
    sat = [f for f in found if f.check == "saturation"]
    assert names(sat) == {"flat_003.fits"}
    assert sat[0].figure == pytest.approx(0.01, rel=0.05) and sat[0].limit == 0.001
    assert "at full scale (65535), above quality.max_saturated 0.1 %" in sat[0].reason


def test_a_few_saturated_pixels_pass():
    samples = session(6, 5)
    s = samples[0]
    s.ravel()[:5] = 65535.0  # 5 of 19,200: 0.026 %
    assert names(check(samples), "saturation") == set()


def test_saturation_per_cfa_channel_after_calibration():
    """Raw full scale minus a pedestal of 100 still counts as saturated; one channel alone
    can be over the limit."""
    samples = session(7, 5, colour=True, step=11)
    channels = Q.sample_channels(Q.presented_layout(frame(0, "RGGB")), samples[0].shape, 11)
    bright = samples[2].copy()
    blue = np.flatnonzero(channels.ravel() == 2)
    bright.ravel()[blue[: blue.size // 50]] = 65535.0 - 100.0
    items = [Q.FlatSample(frame(i, "RGGB"), s, robust_level(s), offset=100.0)
             for i, s in enumerate(samples[:2] + [bright] + samples[3:])]
    found = [f for f in Q.check_flats(items, 11, Quality()) if f.check == "saturation"]
    assert [(f.path.name, f.channel) for f in found] == [("flat_002.fits", "B")]
    assert "of the B pixels" in found[0].reason


def test_saturation_threshold_follows_what_was_subtracted():
    assert Q.saturation_threshold(65535.0) == pytest.approx(65535.0 - 65.535)
    assert Q.saturation_threshold(65535.0, 500.0, 30.0) == pytest.approx(65535.0 - 500.0 - 150.0)


# --------------------------------------------------------------------------- odd frame out


def _cloud(s, depth):
    y, x, _, _ = _grid()
    return (s * (1 - depth * np.exp(-(((y - 40) / 30) ** 2 + ((x - 100) / 32) ** 2))))


def _leak(s, strength):
    y, x, _, _ = _grid()
    return s * (1 + strength * np.exp(-np.hypot(y, x) / 36))


def _shifted_vignetting(s, shift):
    _, _, xx, yy = _grid()
    moved = 1 - 0.25 * ((xx - 2 * shift) ** 2 + yy ** 2)
    return s * moved / (1 - 0.25 * (xx ** 2 + yy ** 2))


@pytest.mark.parametrize("fault, make", [
    ("a cloud 2 % deep", lambda s: _cloud(s, 0.02)),
    ("a light leak in a corner", lambda s: _leak(s, 0.03)),
    ("a panel moved by 2 % of the width", lambda s: _shifted_vignetting(s, 0.02)),
])
@pytest.mark.parametrize("sky", [False, True])
def test_odd_frame_out_is_caught(fault, make, sky):
    samples = session(11, 8, sky=sky)
    samples[4] = make(samples[4]).astype(np.float32)
    found = check(samples)
    assert names(found) == {"flat_004.fits"}, (fault, [f.reason for f in found])
    odd = found[0]
    assert odd.reason.startswith("odd frame out: ") and odd.leaves_out
    if odd.check == "odd":
        assert odd.figure > odd.limit == 8.0 and "times its noise (quality.odd_sigma 8)" in odd.reason
    else:  # the moved panel, by its tilt against the frames around it
        assert odd.check == "tilt" and odd.figure > odd.limit == 0.02 and "quality.odd_min_tilt 2 %" in odd.reason


def _tilt(s, amount):
    """s tilted by `amount` from one corner to the opposite one (half along x, half along y)."""
    _, _, xx, yy = _grid()
    return s * (1 + amount / 4 * (xx + yy))


def test_a_moved_panel_in_a_short_sky_series_is_caught_by_its_tilt():
    # a shifted vignetting is mostly a tilt, which a twilight gradient also gives: the blocks
    # less a plane miss it in 5 frames; the trend of the frames around it does not
    samples = session(21, 5, sky=True)
    samples[2] = _shifted_vignetting(samples[2], 0.03).astype(np.float32)
    found = check(samples)
    assert names(found) == {"flat_002.fits"}, [f.reason for f in found]
    assert found[0].check == "tilt" and found[0].figure > 0.02
    assert "against the trend of the frames taken around it" in found[0].reason


def test_a_turning_twilight_gradient_is_not_a_tilt():
    # the gradient grows from -2 % to +3 % across the field through the series: a trend
    samples = session(22, 9, sky=True)
    samples = [_tilt(s, -0.02 + 0.05 * i / 8).astype(np.float32) for i, s in enumerate(samples)]
    assert check(samples) == []


def test_a_tilt_below_odd_min_tilt_passes_and_one_above_it_does_not():
    samples = session(23, 7, sky=True)
    small = list(samples)
    small[3] = _tilt(samples[3], 0.012).astype(np.float32)  # what real dithered sky flats do
    assert check(small) == []
    big = list(samples)
    big[3] = _tilt(samples[3], 0.035).astype(np.float32)
    assert names(check(big), "tilt") == {"flat_003.fits"}
    assert check(big, quality=Quality(odd_min_tilt=0.05)) == []
    assert names(check(small, quality=Quality(odd_min_tilt=0.005)), "tilt") == {"flat_003.fits"}


def test_the_tilt_trend_follows_the_frames_times_not_their_order():
    # frames named out of time order: flat_000 is the latest; its tilt fits its time
    samples = session(24, 6, sky=True)
    tilted = [_tilt(s, 0.008 * i).astype(np.float32) for i, s in enumerate(samples)]
    order = [5, 0, 1, 2, 3, 4]  # file i holds exposure order[i]
    items = [Q.FlatSample(SimpleNamespace(**vars(frame(i)), date=datetime(2026, 12, 1, 17, order[i])),
                          tilted[order[i]], robust_level(tilted[order[i]])) for i in range(6)]
    assert Q.check_flats(items, STEP, Quality()) == []
    undated = [Q.FlatSample(frame(i), item.sample, item.level) for i, item in enumerate(items)]
    assert "flat_000.fits" in names(Q.check_flats(undated, STEP, Quality()), "tilt")


def test_fewer_than_five_frames_get_no_tilt_check():
    samples = session(25, 4, sky=True)
    samples[2] = _tilt(samples[2], 0.03).astype(np.float32)
    assert names(check(samples), "tilt") == set()


def test_odd_frame_out_in_a_colour_session():
    samples = session(12, 8, colour=True, sky=True, step=11)
    samples[2] = _cloud(samples[2], 0.03).astype(np.float32)
    assert names(check(samples, "RGGB", step=11)) == {"flat_002.fits"}


def test_two_odd_frames_are_both_caught():
    samples = session(13, 10)
    samples[1] = _cloud(samples[1], 0.03).astype(np.float32)
    samples[7] = _leak(samples[7], 0.05).astype(np.float32)
    assert names(check(samples), "odd") == {"flat_001.fits", "flat_007.fits"}


def test_a_faint_cloud_below_the_limits_passes():
    samples = session(14, 8, sky=True)
    samples[3] = _cloud(samples[3], 0.0005).astype(np.float32)
    assert check(samples) == []


@pytest.mark.parametrize("n", [5, 8, 20, 40])
@pytest.mark.parametrize("sky, colour", [(False, False), (True, False), (True, True)])
def test_clean_sessions_never_trip(n, sky, colour):
    step = 11 if colour else STEP
    for seed in range(2):
        samples = session(100 * n + seed, n, sky=sky, colour=colour, step=step)
        assert check(samples, "RGGB" if colour else None, step=step) == []


def test_warn_action_reports_without_leaving_out():
    samples = session(15, 6)
    samples[0] = _cloud(samples[0], 0.05).astype(np.float32)
    found = check(samples, quality=Quality(odd_action="warn"))
    assert [(f.path.name, f.action, f.leaves_out) for f in found] == [("flat_000.fits", "warn", False)]
    assert Q.left_out_paths(found) == set()


def test_disabled_checks_find_nothing():
    samples = session(16, 5)
    samples[0] = samples[0] * 2.5
    assert check(samples, quality=Quality(enabled=False)) == []


def test_too_few_frames_for_the_odd_check():
    samples = session(17, 2)
    samples[0] = _cloud(samples[0], 0.2).astype(np.float32)
    assert check(samples) == []


def test_nan_samples_do_not_break_the_checks():
    samples = session(18, 6)
    samples[2][10:20, 10:20] = np.nan
    found = check(samples)
    assert all(math.isfinite(f.figure) for f in found)
    assert names(found) == set()


# --------------------------------------------------------------------------- in the engine


def _engine_flats(tmp_path, n=6, shape=(240, 320), hot=None, level=20000.0):
    from astropy.io import fits

    from flatd.ingest.frames import read_frame
    from flatd.jobs import StackInput

    rng = np.random.default_rng(5)
    y, x = np.mgrid[0:shape[0], 0:shape[1]]
    vignetting = 1 - 0.3 * (((x - shape[1] / 2) / shape[1]) ** 2 + ((y - shape[0] / 2) / shape[0]) ** 2)
    inputs = []
    for i in range(n):
        value = (hot if i == 1 and hot else level) * vignetting
        data = np.clip(rng.normal(value, np.sqrt(value)), 0, 65535).astype(np.uint16)
        path = tmp_path / f"flat_{i}.fits"
        fits.PrimaryHDU(data).writeto(path)
        inputs.append(StackInput(read_frame(path)))
    return inputs


@pytest.mark.parametrize("normalize", ["multiplicative", "none"])
def test_engine_leaves_out_before_combining(tmp_path, normalize):
    """The checks run on the level samples (read even with normalize none): the left-out
    flat is in the findings, not in `kept`, and not in the master."""
    from flatd.stack.engines.local import stack_frames
    from flatd.stack.methods import Method

    inputs = _engine_flats(tmp_path, hot=55000.0)
    result = stack_frames(inputs, Method("mean"), normalize=normalize, quality=Quality())
    assert [(f.path.name, f.check) for f in result.findings] == [("flat_1.fits", "level")]
    assert result.kept == [0, 2, 3, 4, 5] and len(result.levels) == len(result.factors) == 5
    assert result.rejected.shape == (5, 2)
    assert float(np.median(result.image)) < 25000  # the 55,000 flat is not in the mean
    plain = stack_frames(inputs, Method("mean"), normalize=normalize)
    assert plain.findings == [] and plain.kept is None and len(plain.factors) == 6
    if normalize == "multiplicative":  # the levels measured beside the checks are of all six: measured again
        alone = stack_frames([inputs[i] for i in result.kept], Method("mean"))
        assert result.levels == alone.levels and result.factors == alone.factors


def test_engine_levels_beside_the_checks_are_the_levels_without_them(tmp_path):
    """No flat left out: the levels measured in a thread beside the checks are the ones
    the engine measures without checks, to the bit, and so is the master."""
    from flatd.stack.engines.local import stack_frames
    from flatd.stack.methods import Method

    inputs = _engine_flats(tmp_path)
    checked = stack_frames(inputs, Method("mean"), quality=Quality())
    plain = stack_frames(inputs, Method("mean"))
    assert checked.findings == [] and checked.kept is None
    assert checked.levels == plain.levels and checked.factors == plain.factors
    assert np.array_equal(checked.image, plain.image)


def test_engine_refuses_a_group_left_too_small(tmp_path):
    from flatd.stack.engines.local import QcTooFew, stack_frames
    from flatd.stack.methods import Method

    inputs = _engine_flats(tmp_path, n=3, hot=55000.0)
    with pytest.raises(QcTooFew, match="1 flat\\(s\\) left out by the quality checks, 2 left: fewer than "
                                       "min_group_size 3; nothing combined") as caught:
        stack_frames(inputs, Method("mean"), quality=Quality(), min_group_size=3)
    assert [f.path.name for f in caught.value.findings] == ["flat_1.fits"]
    import pickle

    again = pickle.loads(pickle.dumps(caught.value))  # the dask engine sends it back whole
    assert str(again) == str(caught.value) and len(again.findings) == 1


MEMORY_SCRIPT = """
import json, sys, tracemalloc
from pathlib import Path
from flatd.calibration import Calibration
from flatd.config import Quality
from flatd.ingest.frames import read_frame
from flatd.jobs import StackInput
from flatd.stack.engines.local import stack_frames
from flatd.stack.methods import Method

folder, limit = Path(sys.argv[1]), int(sys.argv[2])
dark = read_frame(folder / "dark.fits")
inputs = [StackInput(read_frame(p), Calibration(mode="file", frame=dark)) for p in sorted(folder.glob("flat*.fits"))]
stack_frames(inputs[:5], Method("sigma"), memory_limit=limit, workers=2, quality=Quality())  # warm
tracemalloc.start()
result = stack_frames(inputs, Method("sigma"), memory_limit=limit, workers=2, quality=Quality())
print(json.dumps({"peak": tracemalloc.get_traced_memory()[1], "findings": len(result.findings)}))
"""


def test_engine_with_checks_stays_under_the_memory_limit(tmp_path):
    import json
    import subprocess
    import sys

    from astropy.io import fits

    rng = np.random.default_rng(9)
    base = rng.normal(20000, 100, size=(1000, 1000))
    for i in range(40):
        fits.PrimaryHDU((base * (1 + 0.005 * i)).astype(np.uint16)).writeto(tmp_path / f"flat{i:02d}.fits")
    fits.PrimaryHDU(np.full((1000, 1000), 200, np.uint16)).writeto(tmp_path / "dark.fits")
    limit = 16 * 2**20
    out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(tmp_path), str(limit)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    stats = json.loads(out.stdout.strip().splitlines()[-1])
    assert stats["peak"] <= limit + 2 * 2**20, stats
    assert stats["findings"] == 0


def test_frames_too_small_for_blocks_skip_the_odd_check(recwarn):
    rng = np.random.default_rng(3)
    samples = [rng.normal(20000, 140, (30, 50)).astype(np.float32) for _ in range(4)]
    samples[0][:10] *= 1.5
    assert check(samples, step=1) == []
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]
