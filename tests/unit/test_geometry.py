"""flatd.stack.geometry: IRAF sections, the overscan fit, row order, and the engine through them."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits

from flatd.calibration import Calibration
from flatd.errors import StackError
from flatd.ingest.frames import read_frame
from flatd.jobs import StackInput
from flatd.notify import events as E
from flatd.stack import geometry as G
from flatd.stack.combine import Method
from flatd.stack.engines.local import stack_frames
from flatd.stack.pixels import PixelSource

from framefactory import make_frame

H, W = 30, 40  # stored size; data section [3:34,1:30] -> 32 x 30, overscan columns 36:40
TRIMSEC, BIASSEC = "[3:34,1:30]", "[36:40,1:30]"


# --------------------------------------------------------------------------- sections


@pytest.mark.parametrize("text, expected", [
    ("[3:34,1:30]", G.Section(2, 34, 0, 30)),
    (" [ 3 : 34 , 1 : 30 ] ", G.Section(2, 34, 0, 30)),
    ("[34:3,30:1]", G.Section(2, 34, 0, 30)),  # reversed: the same pixels
    ("[*,5:5]", G.Section(0, 40, 4, 5)),
])
def test_sections_in_iraf_convention(text, expected):
    section = G.parse_section(text, W, H)
    assert section == expected
    assert G.parse_section(section.iraf(), W, H) == section


@pytest.mark.parametrize("value, words", [
    ("[0:10,1:30]", "outside the image's 1:40"),  # 1-based: 0 is out
    ("[1:41,1:30]", "outside"),
    ("[1:40,1:99999999999]", "outside the image's 1:30"),  # huge numbers
    ("[1:40,-3:5]", "outside"),
    ("[1:40]", "is not a section"),  # one axis
    ("1:40,1:30", "is not a section"),  # no brackets
    ("[a:b,1:30]", "is not a section"),
    ("[1:40,1:30] and more", "is not a section"),
    ("[1.5:40,1:30]", "is not a section"),
    ("", "is not a section"),
    ("[" + "1" * 200 + ":2,1:2]", "too long"),
    (1388, "is not a section"),  # a number, not text
    (True, "is not a section"),
])
def test_hostile_sections_are_refused_with_the_reason(value, words):
    with pytest.raises(G.SectionError, match=words):
        G.parse_section(value, W, H)


def _frame(**cards):
    return make_frame(width=W, height=H, headers={k.upper(): v for k, v in cards.items()})


def test_overscan_sections_prefer_trimsec_then_datasec():
    bias, data, key = G.overscan_sections(_frame(BIASSEC=BIASSEC, TRIMSEC=TRIMSEC, DATASEC="[1:34,1:30]"))
    assert (bias, data, key) == (G.Section(35, 40, 0, 30), G.Section(2, 34, 0, 30), "TRIMSEC")
    assert G.overscan_sections(_frame(BIASSEC=BIASSEC, DATASEC="[1:34,1:30]"))[2] == "DATASEC"
    assert G.overscan_sections(_frame(TRIMSEC=TRIMSEC)) == (None, None, "")  # no overscan: as stored


@pytest.mark.parametrize("cards, words", [
    ({"BIASSEC": BIASSEC}, "without TRIMSEC or DATASEC"),
    ({"BIASSEC": "[30:40,1:30]", "TRIMSEC": TRIMSEC}, "overlaps the columns of TRIMSEC"),
    ({"BIASSEC": "[36:40,1:10]", "TRIMSEC": TRIMSEC}, "does not span the rows"),
    ({"BIASSEC": "[36:40,1:30]", "TRIMSEC": "garbage"}, "^TRIMSEC 'garbage' is not a section"),
    ({"BIASSEC": "[36:50,1:30]", "TRIMSEC": TRIMSEC}, "^BIASSEC x range 36:50 is outside"),
])
def test_unusable_sections_name_the_keyword(cards, words):
    with pytest.raises(G.SectionError, match=words):
        G.overscan_sections(_frame(**cards))


def test_layout_flip_and_overscan_off():
    frame = _frame(BIASSEC=BIASSEC, TRIMSEC=TRIMSEC)
    assert G.frame_layout(frame, "TOP-DOWN").data == G.Section(2, 34, 0, 30)
    assert G.frame_layout(frame, "TOP-DOWN", "off") == G.Layout()
    assert G.frame_layout(frame, "BOTTOM-UP", "off") == G.Layout(flip=True)
    bad = G.frame_layout(_frame(BIASSEC="[9:1e9,1:30]", TRIMSEC=TRIMSEC), "TOP-DOWN")
    assert bad.plain and "BIASSEC" in bad.problem


# --------------------------------------------------------------------------- the overscan fit


def test_fit_follows_a_drift_and_ignores_outlying_rows():
    rng = np.random.default_rng(3)
    rows = np.arange(500)
    truth = 1600 + 0.02 * rows - 2e-5 * (rows - 250) ** 2
    levels = truth + rng.normal(0, 0.5, rows.size)
    levels[:15] -= np.linspace(1200, 50, 15)  # a read-out transient at the start
    levels[[100, 300, 301]] += 400  # cosmic rays in the strip
    levels[200] = np.nan  # a row without finite values
    fit = G.fit_overscan(levels)
    assert np.abs(fit - truth).max() < 0.5
    assert np.allclose(G.fit_overscan(np.full(7, 1625.0)), 1625.0)
    assert G.fit_overscan(np.array([5.0])).tolist() == [5.0]
    with pytest.raises(ValueError):
        G.fit_overscan(np.array([np.nan, np.nan]))


# --------------------------------------------------------------------------- the wrapper


def _stored(level: float, os_level: np.ndarray, rng) -> np.ndarray:
    """A stored frame: columns 0-1 prescan, 2:34 data at `level` + the row's overscan
    level, 34 a transition column, 35:40 overscan."""
    data = np.zeros((H, W))
    data[:, 2:34] = level + rng.normal(0, 2, (H, 32))
    data[:, 34:] = rng.normal(0, 1, (H, 6))
    data += os_level[:, None]
    data[:, 0:2] = 0  # prescan columns read as 0 in this camera
    return data


def _write(path, data, **cards):
    hdu = fits.PrimaryHDU(np.round(data).astype(np.uint16))
    for key, value in cards.items():
        hdu.header[key] = value
    hdu.writeto(path)
    return read_frame(path)


def test_source_subtracts_the_overscan_trims_and_flips(tmp_path):
    rng = np.random.default_rng(5)
    os_level = 1000 + 2.0 * np.arange(H)
    raw = np.round(_stored(5000, os_level, rng))
    frame = _write(tmp_path / "f.fits", raw, IMAGETYP="Flat", BIASSEC=BIASSEC, TRIMSEC=TRIMSEC, ROWORDER="BOTTOM-UP")
    layout = G.frame_layout(frame, "TOP-DOWN")
    with G.GeometrySource(PixelSource(frame), layout) as src:
        assert (src.width, src.height) == (32, 30)
        expected = (raw[:, 2:34] - src.level[:, None])[::-1].astype(np.float32)
        assert np.abs(src.level - os_level).max() < 1.0
        assert np.array_equal(src.rows(0, H), expected)
        band = np.empty((4, 32), np.float32)
        cal = np.full((4, 32), 100.0, np.float32)
        src.read_into(3, 7, band, cal=cal, factor=2.0)
        assert np.allclose(band, np.clip(expected[3:7] - 100, 0, 65535) * 2)
        src.read_into(3, 7, band, pedestal=4500.0)
        assert np.allclose(band, np.clip(expected[3:7] - 4500, 0, 65535))
        grid = src.sample_grid(3, pedestal=10.0)
        assert np.allclose(grid, np.clip(expected[1::3, 1::3] - 10, 0, 65535))


def test_flip_only_reads_through_the_kernel(tmp_path):
    ramp = np.repeat(np.arange(H, dtype=np.float64)[:, None] * 100 + 200, W, axis=1)
    frame = _write(tmp_path / "b.fits", ramp, IMAGETYP="Bias", ROWORDER="BOTTOM-UP")
    layout = G.frame_layout(frame, "TOP-DOWN")
    assert layout == G.Layout(flip=True)
    with G.GeometrySource(PixelSource(frame), layout) as src:
        assert np.array_equal(src.rows(0, H), ramp[::-1].astype(np.float32))
        out = np.empty((5, W), np.float32)
        cal = np.repeat(np.arange(5, dtype=np.float32)[:, None], W, axis=1)
        src.read_into(2, 7, out, cal=cal, factor=0.5)
        assert np.array_equal(out, (ramp[::-1][2:7] - cal) * np.float32(0.5))


def test_plain_frames_are_opened_as_they_are(tmp_path):
    """The fast path: no flip, no overscan, no wrapper."""
    frame = _write(tmp_path / "f.fits", np.full((H, W), 1000.0), IMAGETYP="Flat")
    layouts = G.Layouts([StackInput(frame)])
    assert layouts.plain and layouts.cards() is None
    with layouts.open(frame) as src:
        assert type(src) is PixelSource


# --------------------------------------------------------------------------- the engine


def _flats(tmp_path, n=4, **cards):
    rng = np.random.default_rng(7)
    frames = []
    for i in range(n):
        os_level = 900 + 40 * i + 1.5 * np.arange(H)  # the level drifts from frame to frame and row to row
        frames.append(_write(tmp_path / f"flat{i}.fits", _stored(8000 + 500 * i, os_level, rng),
                             IMAGETYP="Flat", **cards))
    return frames


def test_bottom_up_bias_is_flipped_before_subtraction(tmp_path):
    """A bias with a strong top-to-bottom ramp, written bottom-up, with top-down flats:
    subtracted the right way up, the master is flat; not flipped, it would carry the ramp twice."""
    ramp = 300 + 60.0 * np.arange(H)[:, None] * np.ones((1, W))
    bias = _write(tmp_path / "bias.fits", ramp[::-1], IMAGETYP="Bias", ROWORDER="BOTTOM-UP")
    flats = [_write(tmp_path / f"flat{i}.fits", ramp + 10000 + 1000 * i, IMAGETYP="Flat", ROWORDER="TOP-DOWN")
             for i in range(3)]
    inputs = [StackInput(f, Calibration(mode="file", frame=bias)) for f in flats]
    result = stack_frames(inputs, Method("mean"), workers=2)
    assert result.image.shape == (H, W)
    assert np.ptp(result.image) < 1e-3 * result.image.mean()
    assert ("ROWORDER", "TOP-DOWN", "row order of the flats") in result.geometry.cards
    assert any("bias.fits (BOTTOM-UP) flipped" in line for line in result.geometry.history)


def test_overscan_and_trim_in_the_engine(tmp_path):
    flats = _flats(tmp_path, BIASSEC=BIASSEC, TRIMSEC=TRIMSEC)
    rng = np.random.default_rng(9)
    bias = _write(tmp_path / "bias.fits", _stored(0, 700 + np.arange(H), rng), IMAGETYP="Bias",
                  BIASSEC=BIASSEC, TRIMSEC=TRIMSEC)
    inputs = [StackInput(f, Calibration(mode="file", frame=bias)) for f in flats]
    result = stack_frames(inputs, Method("mean"), normalize="none", workers=2)
    assert result.image.shape == (30, 32)
    # minus its own overscan, every flat is its level; the mean of 8000..9500 is 8750
    assert abs(float(np.median(result.image)) - 8750) < 5 and result.image.min() > 8600
    keys = {key: value for key, value, _ in result.geometry.cards}
    assert keys == {"OVERSCAN": f"BIASSEC {BIASSEC}", "TRIM": f"TRIMSEC {TRIMSEC}", "DATASEC": "[1:32,1:30]"}
    assert result.geometry.remove == ("BIASSEC", "TRIMSEC")
    header = fits.Header([("BIASSEC", BIASSEC), ("TRIMSEC", TRIMSEC)])
    result.geometry.apply(header)
    assert "BIASSEC" not in header and header["DATASEC"] == "[1:32,1:30]" and "overscan" in str(header["HISTORY"])
    off = stack_frames(inputs, Method("mean"), normalize="none", workers=2, overscan="off")
    assert off.image.shape == (H, W) and off.geometry is None


@pytest.fixture
def notices():
    seen = []
    unsubscribe = E.subscribe(seen.append)
    yield seen
    unsubscribe()


def test_one_flat_with_hostile_sections_fails_the_group_naming_it(tmp_path, notices):
    flats = _flats(tmp_path, BIASSEC=BIASSEC, TRIMSEC=TRIMSEC)
    bad = _write(tmp_path / "bad.fits", np.full((H, W), 9000.0), IMAGETYP="Flat", BIASSEC="[36:40,1:30]",
                 TRIMSEC="[3:34,1:99999999999]")
    words = r"bad\.fits is 40x30 \(not trimmed: TRIMSEC .* outside.*\) but flats are 32x30"
    with pytest.raises(StackError, match=words):
        stack_frames([StackInput(f) for f in [*flats, bad]], Method("mean"), workers=1)
    assert any(str(bad.path) in n.message and n.level == E.WARNING for n in notices)


def test_sections_unusable_on_every_frame_combine_untrimmed_with_a_warning(tmp_path, notices):
    flats = _flats(tmp_path, BIASSEC="[36:40,1:30]", TRIMSEC="[3:34;1:30]")
    result = stack_frames([StackInput(f) for f in flats], Method("mean"), workers=1)
    assert result.image.shape == (H, W) and result.geometry is None
    warned = [n for n in notices if getattr(n, "kind", "") == "overscan_unusable"]
    assert len(warned) == len(flats) and all("is not a section" in n.message for n in warned)


def test_screening_leaves_out_flats_that_would_not_fit_the_trimmed_master():
    good = [make_frame(f"f{i}.fits", width=W, height=H, headers={"BIASSEC": BIASSEC, "TRIMSEC": TRIMSEC})
            for i in range(3)]
    bad = make_frame("bad.fits", width=W, height=H, headers={"BIASSEC": BIASSEC, "TRIMSEC": "[3:34,1:300]"})
    bare = make_frame("bare.fits", width=W, height=H, headers={})
    kept, out = G.screen_flats([*good, bad, bare])
    assert kept == good
    assert [(f.path.name, "TRIMSEC y range 1:300 is outside" in why or "no BIASSEC" in why) for f, why in out] == [
        ("bad.fits", True), ("bare.fits", True)]
    assert G.screen_flats([*good, bad], "off") == ([*good, bad], [])
    assert G.screen_flats([bad, bare]) == ([bad, bare], [])  # none trimmed: all read as stored


def test_a_trim_at_an_odd_pixel_moves_the_bayer_offsets():
    frames = [make_frame(f"f{i}.fits", width=W, height=H, bayer_pattern="RGGB", bayer_offset=(0, 1),
                         headers={"BIASSEC": BIASSEC, "TRIMSEC": "[4:35,2:30]"}) for i in range(2)]
    cards = {k: v for k, v, _ in G.Layouts([StackInput(f) for f in frames]).cards().cards}
    assert (cards["XBAYROFF"], cards["YBAYROFF"]) == (1, 0)  # trimmed from x=4 (3 columns off), y=2 (1 row)


def test_an_overscan_without_finite_values_is_an_error_naming_the_file(tmp_path):
    data = np.full((H, W), 1000.0, dtype=np.float32)
    data[:, 35:] = np.nan
    path = tmp_path / "nan.fits"
    fits.PrimaryHDU(data, header=fits.Header([("BIASSEC", BIASSEC), ("TRIMSEC", TRIMSEC)])).writeto(path)
    frame = read_frame(path)
    with pytest.raises(StackError, match=r"nan\.fits: BIASSEC \[36:40,1:30\]: the overscan strip has no finite"):
        G.Layouts([StackInput(frame)]).open(frame)
