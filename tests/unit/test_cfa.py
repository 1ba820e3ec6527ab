"""flatd.stack.cfa: CFA channels of a mosaic, with offsets and row order, and per-channel figures."""

from __future__ import annotations

import numpy as np
import pytest

from flatd.errors import StackError
from flatd.stack.cfa import (CHANNELS, Layout, channel_levels, channel_masks, channel_means, channel_slices,
                             channel_sums, channel_values, common_layout, equalize, equalize_master, layout_of,
                             saturated_fractions)
from framefactory import make_frame


def mosaic(shape, layout: Layout, values=(100.0, 200.0, 50.0)) -> np.ndarray:
    """An image whose R, G and B pixels hold `values`."""
    image = np.zeros(shape, dtype=np.float32)
    for colour, mask in channel_masks(shape, layout).items():
        image[mask] = values[CHANNELS.index(colour)]
    return image


@pytest.mark.parametrize("pattern,offset,top_left", [
    ("RGGB", (0, 0), "RGGB"),
    ("RGGB", (1, 0), "GRBG"),  # the pattern starts one column in
    ("RGGB", (0, 1), "GBRG"),  # one row down
    ("RGGB", (1, 1), "BGGR"),
    ("GBRG", (0, 0), "GBRG"),
    ("BGGR", (1, 0), "GBRG"),
    ("RGGB", (3, 2), "GRBG"),  # only the parity counts
])
def test_colours_with_offsets(pattern, offset, top_left):
    assert "".join(Layout(pattern, offset).colours()) == top_left


def test_bottom_up_rows_count_from_the_top():
    # 4 rows stored bottom-up: stored row 0 is top-down row 3 (odd): G B
    assert "".join(Layout("RGGB", (0, 0), bottom_up=True, height=4).colours()) == "GBRG"
    # 5 rows: stored row 0 is top-down row 4 (even): R G
    assert "".join(Layout("RGGB", (0, 0), bottom_up=True, height=5).colours()) == "RGGB"


def test_masks_cover_every_pixel_once_and_green_twice_as_often():
    masks = channel_masks((6, 8), Layout("RGGB"))
    total = sum(m.astype(int) for m in masks.values())
    assert (total == 1).all()
    assert masks["R"].sum() == masks["B"].sum() == 12 and masks["G"].sum() == 24
    assert masks["R"][0, 0] and masks["G"][0, 1] and masks["G"][1, 0] and masks["B"][1, 1]


def test_band_rows_keep_the_image_parity():
    layout = Layout("RGGB", (1, 0))
    image = mosaic((10, 6), layout)
    for row0 in (0, 3, 7):
        band = image[row0:row0 + 3]
        values = channel_values(band, layout, row0)
        assert {c: set(v.tolist()) for c, v in values.items()} == {"R": {100.0}, "G": {200.0}, "B": {50.0}}
    slices = channel_slices(layout, 1)
    assert sum(len(parts) for parts in slices.values()) == 4


def test_per_channel_levels_means_and_sums():
    rng = np.random.default_rng(3)
    layout = Layout("GBRG")
    image = mosaic((200, 300), layout, (8000.0, 10000.0, 6000.0)) + rng.normal(0, 50, (200, 300)).astype(np.float32)
    image[5, 7] = np.nan  # a NaN pixel is left out
    levels = channel_levels(image, layout)
    means = channel_means(image, layout)
    for colour, expected in zip(CHANNELS, (8000.0, 10000.0, 6000.0)):
        assert levels[colour] == pytest.approx(expected, rel=2e-3)
        assert means[colour] == pytest.approx(expected, rel=2e-3)
    sums = channel_sums(image, layout)
    assert sum(n for _, n in sums.values()) == image.size - 1


def test_levels_resist_hot_pixels_in_one_channel():
    layout = Layout("RGGB")
    image = mosaic((100, 100), layout)
    image[0:20:2, 0:20:2] = 65535.0  # 100 hot R pixels of 2500
    assert channel_levels(image, layout)["R"] == pytest.approx(100.0)
    assert channel_means(image, layout)["R"] > 2000


def test_saturated_fractions():
    layout = Layout("RGGB")
    image = mosaic((10, 10), layout)
    image[1, 1] = image[3, 3] = 65535.0  # two of 25 B pixels
    image[0, 1] = 65535.0  # one of 50 G pixels
    assert saturated_fractions(image, layout, 65000.0) == {"R": 0.0, "G": 0.02, "B": 0.08}


def test_equalize_gives_one_mean_and_keeps_the_overall_mean():
    layout = Layout("RGGB", (0, 1))
    image = mosaic((64, 48), layout, (0.8, 1.0, 0.6)) * np.linspace(0.9, 1.1, 48, dtype=np.float32)
    before = float(image.mean(dtype=np.float64))
    factors = equalize(image, layout)
    means = channel_means(image, layout)
    assert max(means.values()) - min(means.values()) < 1e-6 * before
    assert image.mean(dtype=np.float64) == pytest.approx(before, rel=1e-6)
    assert factors["R"] == pytest.approx(0.85 / 0.8, rel=1e-2) and factors["B"] > factors["G"]


def test_equalize_refuses_a_channel_without_light():
    layout = Layout("RGGB")
    image = mosaic((8, 8), layout, (0.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="R pixels"):
        equalize(image, layout)
    frames = [make_frame("a.fits", bayer_pattern="RGGB", height=8, width=8)]
    with pytest.raises(StackError):
        equalize_master(frames, image)


def test_layouts_of_frames():
    colour = make_frame("a.fits", bayer_pattern="GRBG", bayer_offset=(1, 0), row_order="BOTTOM-UP", height=100)
    assert layout_of(colour) == Layout("GRBG", (1, 0), True, 100)
    assert layout_of(make_frame("m.fits")) is None
    assert common_layout([colour, colour]) == layout_of(colour)
    assert common_layout([colour, make_frame("b.fits", bayer_pattern="RGGB")]) is None


def test_equalize_master_notes():
    image = np.ones((4, 4), dtype=np.float32)
    assert "mono" in equalize_master([make_frame("m.fits")], image)[0]
    mixed = [make_frame("a.fits", bayer_pattern="RGGB"), make_frame("b.fits", bayer_pattern="GBRG")]
    assert "differ" in equalize_master(mixed, image)[0]
    assert (image == 1).all()
    colour = [make_frame("c.fits", bayer_pattern="RGGB", height=4, width=4)]
    lines = equalize_master(colour, mosaic((4, 4), Layout("RGGB")))
    assert all(len(line) <= 72 for line in lines) and "R x" in lines[1]


def test_equalize_master_after_a_trim_at_an_odd_pixel_follows_the_mosaic():
    # stored RGGB from (0, 0); the master starts at stored pixel (1, 0): its first is G, then R
    stored = mosaic((8, 9), Layout("RGGB"), (0.8, 1.0, 0.6))
    master = stored[:, 1:].copy()
    frames = [make_frame("c.fits", bayer_pattern="RGGB", height=8, width=9)]
    equalize_master(frames, master, origin=(1, 0))
    assert np.allclose(master, master.mean(), rtol=1e-6)
    wrong = stored[:, 1:].copy()
    equalize_master(frames, wrong)  # ignoring the trim mixes the channels up
    assert not np.allclose(wrong, wrong.mean(), rtol=1e-3)
