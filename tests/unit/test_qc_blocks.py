"""One pass over a master for the checks and the previews (flatd.qc.blocks, the compiled
block_sums kernel), against numpy references; and its users giving what they gave
without it."""

from __future__ import annotations

import math

import numpy as np
import pytest

from flatd.qc import blocks as B


def _reference(image: np.ndarray, b: int, ny: int, nx: int) -> np.ndarray:
    """(2, 2, ny, nx) sums by the parity of the row and column offset in each block."""
    out = np.zeros((2, 2, ny, nx), np.float64)
    h, w = image.shape
    for y in range(min(h, ny * b)):
        for x in range(min(w, nx * b)):
            out[(y % b) % 2, (x % b) % 2, y // b, x // b] += image[y, x]
    return out


@pytest.mark.parametrize("shape,b,partial", [((37, 53), 4, True), ((37, 53), 4, False), ((30, 21), 3, True),
                                             ((16, 16), 1, True), ((5, 9), 8, True), ((1, 1), 2, True)])
def test_sums_equal_the_reference(shape, b, partial):
    image = np.random.default_rng(1).random(shape, dtype=np.float32) + 0.5
    got = B.block_sums(image, b, partial)
    ny, nx = got.sums.shape[2:]
    assert (ny, nx) == ((-(-shape[0] // b), -(-shape[1] // b)) if partial else (shape[0] // b, shape[1] // b))
    np.testing.assert_allclose(got.sums, _reference(image, b, ny, nx), rtol=1e-5)
    assert got.flags == 0 and got.finite


def test_bands_at_any_rows_add_up_to_the_whole():
    image = np.random.default_rng(2).random((103, 50), dtype=np.float32)
    whole = np.zeros((2, 2, 26, 13), np.float32)
    B.fold(image, 4, whole)
    banded = np.zeros_like(whole)
    for r0 in range(0, 103, 7):  # bands that start and end inside blocks
        B.fold(image[r0:r0 + 7], 4, banded, r0)
    np.testing.assert_allclose(banded, whole, rtol=1e-6)


@pytest.mark.parametrize("value,flags", [(np.nan, B.NONFINITE), (np.inf, B.NONFINITE), (-np.inf, B.NONFINITE),
                                         (0.0, B.NONPOSITIVE), (-3.0, B.NONPOSITIVE), (-0.0, B.NONPOSITIVE),
                                         (1e-38, 0), (2.0, B.LIMIT), (3e38, B.LIMIT)])
def test_what_the_pass_says_of_one_odd_pixel(value, flags):
    image = np.ones((40, 30), np.float32)
    for y, x in ((0, 0), (39, 29), (20, 13)):  # a corner, the far corner beyond whole blocks, the middle
        odd = image.copy()
        odd[y, x] = value
        assert B.block_sums(odd, 8, partial=False, limit=2.0).flags == flags, (value, y, x)


def test_no_limit_and_hostile_limits_count_nothing_as_high():
    image = np.full((4, 4), 3e38, np.float32)
    for limit in (math.inf, math.nan, 1e300):
        assert B.block_sums(image, 2, limit=limit).flags == 0


def test_bad_arguments_are_refused_not_written_past():
    image = np.ones((8, 8), np.float32)
    with pytest.raises(ValueError):
        B.fold(image, 0, np.zeros((2, 2, 2, 2), np.float32))
    with pytest.raises(ValueError):
        B.fold(image, 4, np.zeros((2, 2, 2, 2), np.float64))
    with pytest.raises(ValueError):
        B.fold(image, 4, np.zeros((2, 2, 4), np.float32))
    with pytest.raises(ValueError):
        B.fold(image[None], 4, np.zeros((2, 2, 2, 2), np.float32))
    with pytest.raises(ValueError):
        B.fold(image, 4, np.zeros((2, 2, 2, 2), np.float32), row0=-1)
    frozen = np.zeros((2, 2, 2, 2), np.float32)
    frozen.flags.writeable = False
    with pytest.raises(ValueError):
        B.fold(image, 4, frozen)
    empty = np.zeros((2, 2, 0, 0), np.float32)
    assert B.fold(np.ones((0, 5), np.float32), 4, empty) == 0  # nothing to add, nothing said


# --------------------------------------------------------------------------- its users


def _master(shape=(600, 800), seed=3):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:shape[0], 0:shape[1]]
    vignetting = 1 - 0.3 * (((x - shape[1] / 2) / shape[1]) ** 2 + ((y - shape[0] / 2) / shape[0]) ** 2)
    return (vignetting * (1 + 0.003 * rng.standard_normal(shape))).astype(np.float32)


def test_master_figures_from_the_binning_are_the_figures_without_it():
    from flatd.qc.masters import measure_master
    from flatd.qc.previous import binned_master

    image = _master((2048, 3000))
    plain = measure_master(image)
    shared = measure_master(image, binned=binned_master(image))
    assert (shared.nonfinite, shared.zero, shared.saturated) == (0, 0, 0)
    assert shared.field_ratio == pytest.approx(plain.field_ratio, rel=2e-3)


def test_master_figures_count_the_pixels_the_binning_flagged():
    from flatd.qc.masters import measure_master
    from flatd.qc.previous import binned_master

    image = _master((2048, 3000))
    image[10, 10], image[20, 20], image[30, 30] = np.nan, 0.0, 1e9
    frames = []
    for binned in (None, binned_master(image), binned_master(image, limit=0.5)):  # a limit not the checks': unused
        qc = measure_master(image, frames=frames, binned=binned)
        assert (qc.nonfinite, qc.zero) == (1, 1)


@pytest.mark.parametrize("pattern", [None, "RGGB", "GBRG"])
def test_previews_from_the_binning_are_the_previews_without_it(pattern):
    from flatd.qc.previews import _from_blocks, master_preview
    from flatd.qc.previous import binned_master
    from flatd.stack.cfa import Layout

    image = _master((2448, 3264))
    layout = Layout(pattern) if pattern else None
    binned = binned_master(image)
    assert _from_blocks(binned, image.shape, layout, 1024) is not None
    plain = np.asarray(master_preview(image, layout), dtype=np.int32)
    shared = np.asarray(master_preview(image, layout, blocks=binned), dtype=np.int32)
    assert plain.shape == shared.shape and np.abs(plain - shared).max() <= 1  # float32 sums in another order
    image[5, 5] = np.nan  # a NaN: the binning is not used, the preview still made
    assert _from_blocks(binned_master(image), image.shape, layout, 1024) is None
    assert master_preview(image, layout, blocks=binned_master(image)).size == master_preview(image, layout).size
