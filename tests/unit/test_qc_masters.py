"""Checks on each master (flatd.qc.masters): each check on a seeded case that trips it and one that does not."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

from flatd.config import Quality
from flatd.qc.masters import (BAD, GOOD, WARN, check_master, common_egain, field_ratio, full_scale,
                              method_noise_factor, noise_figures, pixel_counts)
from flatd.stack.methods import Method

H, W = 96, 128
LEVEL = 20000.0
ROWS = (8, 88)


def vignetting(depth: float = 0.3) -> np.ndarray:
    y, x = np.mgrid[0:H, 0:W]
    r2 = ((x - W / 2) / (W / 2)) ** 2 + ((y - H / 2) / (H / 2)) ** 2
    return 1.0 - depth * r2 / 2


def session(n: int = 8, prnu: float = 0.0, extra: float = 0.0, seed: int = 1, gain: float = 1.0):
    """n flats with photon noise (gain e-/ADU) over a pattern with `prnu`; the master (a
    mean), plus `extra` relative noise in the master; the noise patches and levels."""
    rng = np.random.default_rng(seed)
    pattern = vignetting() * (1 + prnu * rng.standard_normal((H, W)))
    levels = [LEVEL * (1 + 0.02 * i) for i in range(n)]
    frames = []
    for level in levels:
        electrons = rng.poisson(pattern * level * gain)
        frames.append((electrons / gain).astype(np.float32))
    stack = np.stack([f * (np.mean(levels) / lv) for f, lv in zip(frames, levels)])
    master = stack.mean(axis=0)
    master *= 1 + extra * rng.standard_normal(master.shape)
    patches = np.stack(frames[:4])[:, ROWS[0]:ROWS[1]]
    return master.astype(np.float32), patches, levels


def check(master, patches=None, levels=(), n=8, **kw):
    return check_master(master, Quality(), method=Method("mean"), levels=list(levels) or [LEVEL] * n,
                        factors=[1.0] * n, patches=patches, noise_rows=ROWS if patches is not None else None, **kw)


# --------------------------------------------------------------------------- noise


def test_noise_of_a_clean_master_matches_photon_statistics():
    master, patches, levels = session()
    qc = check(master, patches, levels)
    assert qc.noise is not None
    assert 0.85 < qc.noise.ratio < 1.2
    assert qc.noise.gain_source == "photon transfer" and 0.8 < qc.noise.gain < 1.25
    assert qc.status == GOOD, qc.reasons


def test_fixed_pattern_is_predicted_not_flagged():
    master, patches, levels = session(prnu=0.01)  # pattern far above the master's photon noise
    qc = check(master, patches, levels)
    assert qc.noise.pattern == pytest.approx(0.01, rel=0.2)
    assert qc.noise.ratio < 1.3 and qc.status == GOOD, qc.reasons


def test_noise_above_the_prediction_warns_then_is_bad():
    master, patches, levels = session(extra=0.006)  # photon noise of the master ~0.0027
    qc = check(master, patches, levels)
    assert qc.noise.ratio > 2 and qc.status in (WARN, BAD)
    assert any("noise" in r for r in qc.reasons)
    master, patches, levels = session(extra=0.02)
    assert check(master, patches, levels).status == BAD


def test_egain_is_used_when_every_input_has_it():
    frames = [SimpleNamespace(headers={"EGAIN": 1.0}, bitpix=16) for _ in range(8)]
    assert common_egain(frames) == 1.0
    assert common_egain(frames[:7] + [SimpleNamespace(headers={}, bitpix=16)]) is None
    master, patches, levels = session()
    qc = check(master, patches, levels, frames=frames)
    assert qc.noise.gain_source == "EGAIN" and qc.status == GOOD, qc.reasons
    # a header gain 10 x too high predicts too little noise: flagged
    wrong = [SimpleNamespace(headers={"EGAIN": 10.0}, bitpix=16) for _ in range(8)]
    assert check(master, patches, levels, frames=wrong).status in (WARN, BAD)


def test_no_patches_no_noise_figure():
    master, _, levels = session()
    assert noise_figures(master, None, None, levels, 8) is None
    assert check(master, None, levels).status == GOOD


def test_method_noise_factor():
    assert method_noise_factor(Method("mean"), 8) == pytest.approx(1.0, abs=0.03)
    assert 1.1 < method_noise_factor(Method("median"), 9) < 1.35


# --------------------------------------------------------------------------- pixels


def test_non_finite_pixels_make_a_bad_master():
    master, patches, levels = session()
    master[3, 4] = np.nan
    master[5, 6] = np.inf
    qc = check(master, patches, levels)
    assert qc.nonfinite == 2 and qc.status == BAD
    assert "2 non-finite pixel(s)" in qc.reasons[0]


def test_zero_pixels_warn_then_bad():
    master, patches, levels = session()
    assert check(master, patches, levels).zero == 0
    few = master.copy()
    few[0, :5] = 0  # 5 of 12288: 0.04 %
    qc = check(few, patches, levels)
    assert qc.zero == 5 and qc.status == WARN
    many = master.copy()
    many[:3] = 0  # 3 rows: 3 %
    assert check(many, patches, levels).status == BAD


def test_saturated_pixels_counted_against_full_scale():
    frames = [SimpleNamespace(headers={"SATURATE": 30000}, bitpix=16) for _ in range(8)]
    assert full_scale(frames) == 30000
    assert full_scale([SimpleNamespace(headers={}, bitpix=16)]) == 65535
    master, patches, levels = session()
    assert check(master, patches, levels, frames=frames).saturated == 0
    master[10:30, 10:30] = 30000  # 400 of 12288
    qc = check(master, patches, levels, frames=frames)
    assert qc.saturated == 400 and qc.status == BAD
    assert pixel_counts(master, None) == (0, 0, 0)


# --------------------------------------------------------------------------- field


def test_field_ratio_of_ordinary_vignetting_is_good():
    master, patches, levels = session()
    ratio = field_ratio(master)
    assert 1.2 < ratio < 1.6
    assert check(master, patches, levels).status == GOOD


def test_steep_field_warns_then_is_bad():
    master, _, _ = session()
    y, x = np.mgrid[0:H, 0:W]
    steep = master * np.exp(-3.0 * x / W)  # brightest / darkest about e^3 = 20
    qc = check(steep.astype(np.float32))
    assert qc.field_ratio > 10 and qc.status == BAD
    middling = master * np.exp(-1.6 * x / W)  # about 5
    qc = check(middling.astype(np.float32))
    assert 4 < qc.field_ratio < 10 and qc.status == WARN
    assert any("field" in r for r in qc.reasons)


# --------------------------------------------------------------------------- rejection


def rejection(low: float, high: float, baseline: float = 0.01):
    return SimpleNamespace(low=low, high=high, baseline=baseline)


def test_rejection_at_the_clean_baseline_is_good():
    master, patches, levels = session()
    qc = check(master, patches, levels, rejection=rejection(0.006, 0.007, 0.012))
    assert qc.status == GOOD and qc.rejected_low == 0.006


def test_high_rejection_warns_then_is_bad():
    master, patches, levels = session()
    qc = check(master, patches, levels, rejection=rejection(0.01, 0.04, 0.012))
    assert qc.status == WARN and "rejected" in qc.reasons[0]
    qc = check(master, patches, levels, rejection=rejection(0.01, 0.12, 0.012))
    assert qc.status == BAD


# --------------------------------------------------------------------------- cards


def test_cards_and_history_carry_the_verdict_and_figures():
    master, patches, levels = session()
    master[0, 0] = np.nan
    qc = check(master, patches, levels, rejection=rejection(0.0, 0.0, 0.0))
    cards = qc.cards()
    assert cards["QCSTATUS"][0] == BAD
    for key in ("QCNOISE", "QCNOISEX", "QCREJLO", "QCREJHI", "QCNONFIN", "QCZERO", "QCSAT", "QCFIELD"):
        assert key in cards
        value = cards[key][0]
        assert isinstance(value, (int, float)) and math.isfinite(value)
    assert any("non-finite" in line for line in qc.history())


def test_limits_come_from_the_quality_section():
    master, patches, levels = session(extra=0.006)
    lenient = Quality(noise_warn=10.0, noise_bad=20.0)
    qc = check_master(master, lenient, method=Method("mean"), levels=levels, factors=[1.0] * 8,
                      patches=patches, noise_rows=ROWS)
    assert qc.status == GOOD
