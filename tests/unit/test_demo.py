"""flatd.demo: the demo capture session, its calibration library and rules file."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from flatd.config import load_rules
from flatd.demo import (
    DEFAULT_PATTERN,
    INSTRUMENT,
    SOFTWARE,
    DemoSession,
    Pattern,
    Sensor,
    illumination,
    write_demo,
)
from flatd.ingest.frames import Kind, iter_fits_files, read_frame

NINA_FLAT_NAME = re.compile(r"^\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2}_[A-Za-z0-9]+_FLAT_\d+\.\d{2}s_\d{4}\.fits$")
NINA_KEYS = ("IMAGETYP", "EXPOSURE", "EXPTIME", "XBINNING", "YBINNING", "FILTER", "CCD-TEMP", "SET-TEMP",
             "DATE-OBS", "INSTRUME", "TELESCOP", "SWCREATE", "GAIN", "OFFSET", "FOCALLEN")


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> DemoSession:
    return write_demo(tmp_path_factory.mktemp("demo") / "demo")


def _relative_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _stack(paths) -> np.ndarray:
    return np.array([fits.getdata(p).astype(np.float64) for p in paths])


# --------------------------------------------------------------------------- the tree


def test_tree_layout(demo):
    root = demo.root
    assert demo.captures == root / "captures"
    assert demo.calibration == root / "calibration"
    assert demo.config == root / "flatd.yaml" and demo.config.is_file()
    nights = sorted(p.name for p in demo.captures.iterdir())
    assert nights == [n.isoformat() for n in demo.nights]
    for group in demo.groups:
        for path in group.files:
            assert path.parent == demo.captures / group.night.isoformat() / "FLAT"
            assert NINA_FLAT_NAME.match(path.name), path.name
            assert f"_{group.filter}_FLAT_{group.exposure:.2f}s_" in path.name
            assert path.is_file()
    names = [p.name for p in demo.flat_files]
    assert len(names) == len(set(names)), "file names are unique across the tree"
    written = set(iter_fits_files(demo.captures)) | {p for p in demo.others if p.suffix != ".fits"}
    assert written == set(demo.flat_files) | set(demo.others)


def test_session_content(demo):
    filters = {g.filter for g in demo.groups}
    assert {"L", "R", "Ha"} <= filters
    assert {g.binning for g in demo.groups} == {1, 2}
    assert {g.setpoint for g in demo.groups} == {0.0, -10.0}
    for group in demo.combinable:
        assert 6 <= group.count <= 10
    small = [g for g in demo.groups if g.too_few]
    assert [(g.filter, g.count) for g in small] == [("SII", 3)]
    assert demo.min_group_size == 5
    # Different filters have different levels and exposures.
    night1 = [g for g in demo.groups if g.setpoint == -10.0]
    assert len({g.exposure for g in night1}) == len(night1)
    assert len({g.level for g in night1}) == len(night1)
    # 2x2 frames are half the size of 1x1 frames.
    one = demo.group("L", 1, -10.0).shape
    two = demo.group("L", 2, 0.0).shape
    assert one == (480, 640) and two == (240, 320)
    # Two L 1x1 groups that only the temperature tells apart.
    assert {g.setpoint for g in demo.groups if g.filter == "L" and g.binning == 1} == {0.0, -10.0}


def test_every_flat_reads_with_its_facts(demo):
    for group in demo.groups:
        for path, temperature in zip(group.files, group.temperatures):
            frame = read_frame(path)
            assert frame.kind is Kind.FLAT
            assert frame.filter == group.filter
            assert (frame.xbin, frame.ybin) == (group.binning, group.binning)
            assert (frame.height, frame.width) == group.shape
            assert frame.exposure == group.exposure
            assert frame.temperature == temperature
            assert abs(frame.temperature - group.setpoint) <= 0.3 + 1e-9
            assert frame.set_temperature == group.setpoint
            assert frame.instrument == INSTRUMENT
            assert frame.software == SOFTWARE
            assert frame.date is not None and frame.date.date() == group.night
            assert frame.bitpix == 16 and frame.bzero == 32768


def test_nina_headers(demo):
    path = demo.group("Ha", 1, -10.0).files[0]
    header = fits.getheader(path)
    for key in NINA_KEYS:
        assert key in header, key
    assert header["IMAGETYP"] == "FLAT"
    assert header["EXPOSURE"] == header["EXPTIME"] == 12.0
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}", header["DATE-OBS"])
    assert header["SWCREATE"] == "N.I.N.A. 3.1.2.9001"
    assert header["INSTRUME"] == "ZWO ASI2600MM Pro"
    with fits.open(path) as hdul:
        assert hdul[0].data.dtype == np.uint16
        assert hdul[0].header["BITPIX"] == 16 and hdul[0].header["BZERO"] == 32768


def test_dates_are_in_time_order(demo):
    for night in demo.nights:
        frames = [read_frame(p) for g in demo.groups if g.night == night for p in g.files]
        dates = [f.date for f in frames]
        assert dates == sorted(dates) and len(set(dates)) == len(dates)


def test_files_left_out(demo):
    light = next(p for p in demo.others if p.suffix == ".fits")
    assert read_frame(light).kind is Kind.LIGHT
    notes = next(p for p in demo.others if p.name == "notes.txt")
    assert notes.parent.parent == demo.captures and notes.read_text().strip()


# --------------------------------------------------------------------------- library


def test_calibration_library_matches(demo):
    kinds = {"bias": Kind.BIAS, "dark": Kind.DARK, "dark-flat": Kind.DARK_FLAT}
    for cal in demo.calibration_files:
        assert cal.path.is_relative_to(demo.calibration)
        frame = read_frame(cal.path)
        assert frame.kind is kinds[cal.kind]
        assert (frame.height, frame.width) == cal.shape
        assert (frame.xbin, frame.ybin) == (cal.binning, cal.binning)
        assert frame.exposure == cal.exposure
        assert frame.temperature == cal.temperature and abs(cal.temperature - cal.setpoint) <= 0.3 + 1e-9
    for group in demo.groups:
        dark_flat = demo.dark_flat_for(group)
        assert dark_flat.shape == group.shape
        frame = read_frame(dark_flat.path)
        assert frame.filter == group.filter
        assert frame.set_temperature == group.setpoint
    for binning in (1, 2):
        for setpoint in (-10.0, 0.0):
            found = {c.kind for c in demo.calibration_files if c.binning == binning and c.setpoint == setpoint}
            assert {"bias", "dark"} <= found


def test_calibration_frames_hold_bias_and_dark(demo):
    group = demo.group("Ha", 1, -10.0)
    cal = demo.dark_flat_for(group)
    data = fits.getdata(cal.path).astype(np.float64)
    expected = demo.sensor.offset(group.shape, group.binning, cal.temperature, cal.exposure)
    residual = data - expected
    assert abs(residual.mean()) < 0.2
    assert residual.std() < 1.5 * demo.sensor.read_noise + 1
    assert 450 < np.median(data) < 560


# --------------------------------------------------------------------------- rules file


def test_rules_file_validates(demo):
    rules = load_rules(demo.config)
    assert [c.path for c in rules.capture] == [demo.root / "captures"]
    assert rules.capture[0].recursive is True
    pre = rules.precalibration
    assert pre.mode == "auto" and pre.library == demo.root / "calibration"
    assert rules.output.directory == Path("masters")
    assert rules.inputs.move_to == "originals-{date}"
    assert rules.state == demo.root / "state"
    assert rules.combine.method == "auto"
    assert rules.grouping.min_group_size == 5
    assert rules.settle <= 60


# --------------------------------------------------------------------------- determinism


def test_same_seed_same_bytes(demo, tmp_path):
    again = write_demo(tmp_path / "again", seed=demo.seed)
    first, second = _relative_files(demo.root), _relative_files(again.root)
    assert first.keys() == second.keys()
    for name in first:
        assert first[name] == second[name], name
    assert again.cosmic_rays == demo.cosmic_rays


def test_other_seed_other_data(demo, tmp_path):
    other = write_demo(tmp_path / "other", seed=demo.seed + 1)
    a = fits.getdata(demo.groups[0].files[0])
    b = fits.getdata(other.groups[0].files[0])
    assert not np.array_equal(a, b)


def test_refuses_a_folder_in_use(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        write_demo(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]
    with pytest.raises(ValueError):
        write_demo(tmp_path / "new", scale=0)


# --------------------------------------------------------------------------- the pattern


@pytest.mark.parametrize("shape,binning", [((480, 640), 1), ((240, 320), 2), ((100, 150), 1), ((50, 75), (2, 2))])
def test_pattern_normalized(shape, binning):
    pattern = illumination(shape, binning)
    assert pattern.shape == shape
    assert abs(pattern.mean() - 1.0) < 1e-12
    assert np.isfinite(pattern).all() and pattern.min() > 0.5 and pattern.max() < 1.5


def test_pattern_shape():
    p1 = illumination((480, 640), 1)
    p2 = illumination((240, 320), 2)
    binned = p1.reshape(240, 2, 320, 2).mean(axis=(1, 3))
    np.testing.assert_allclose(p2, binned / binned.mean(), rtol=1e-12)
    # Vignetting: the corners are darker than the centre.
    centre = p1[200:260, 300:380].mean()
    for corner in (p1[:20, :20], p1[:20, -20:], p1[-20:, :20], p1[-20:, -20:]):
        assert corner.mean() < 0.9 * centre
    # A dust donut: the ring is darker than just outside it.
    d = DEFAULT_PATTERN.donuts[0]
    cy, cx, r = int(d.y * 480), int(d.x * 640), d.radius * 640
    ring = p1[cy, int(cx + 0.75 * r)]
    outside = p1[cy, int(cx + 1.6 * r)]
    assert ring < outside * (1 - d.depth / 2)
    # The pattern is a pure function of its parameters.
    assert Pattern()((480, 640), 1).tobytes() == p1.tobytes()
    assert not np.array_equal(illumination((480, 640), 1, Pattern(donuts=())), p1)


def test_pattern_is_not_shared_state():
    a = illumination((48, 64))
    a[:] = 0
    assert illumination((48, 64)).mean() == pytest.approx(1.0)


def test_sensor_binning_consistent():
    sensor = Sensor(seed=7)
    b1, b2 = sensor.bias((480, 640), 1), sensor.bias((240, 320), 2)
    np.testing.assert_allclose(b2[0], b1[0].reshape(320, 2).mean(axis=1))
    d_cold = sensor.dark_current((480, 640), 1, -10.0)
    d_warm = sensor.dark_current((480, 640), 1, 0.0)
    np.testing.assert_allclose(d_warm / d_cold, 2 ** (10 / sensor.doubling))
    assert (d_warm > 1.0).sum() > 50  # hot pixels


# --------------------------------------------------------------------------- cosmic rays


def test_cosmic_rays_where_recorded(demo):
    hit_files = {p.name for p in demo.flat_files} & demo.cosmic_rays.keys()
    assert demo.cosmic_rays.keys() <= {p.name for p in demo.flat_files}
    assert 0.2 * len(demo.flat_files) < len(hit_files) < 0.8 * len(demo.flat_files)
    assert any(len(v) > 1 for v in demo.cosmic_rays.values()), "some hits are streaks"
    for path in demo.flat_files:
        data = fits.getdata(path)
        hits = demo.cosmic_rays.get(path.name, ())
        mask = np.zeros(data.shape, bool)
        for y, x in hits:
            assert data[y, x] >= 60000, (path.name, y, x)
            mask[y, x] = True
        if demo.faults.get(path) != "over-exposed":  # its sky is near 60000 anyway
            assert data[~mask].max() < 60000, path.name


# --------------------------------------------------------------------------- the numbers


def test_sky_level_drifts(demo):
    for group in demo.combinable:  # the flats combined (the problem night's over-exposed one is not)
        medians = np.array([np.median(fits.getdata(p)) for p in group.combined])
        spread = medians.max() / medians.min()
        assert 1.03 < spread < 1.2, group.label
        levels = np.array(group.combined_levels)
        assert levels.max() / levels.min() > 1.03


def _residual_z(demo: DemoSession, group, subtract: bool) -> tuple[np.ndarray, np.ndarray]:
    """(master / mean - pattern) in units of the expected noise, and per column."""
    stack = _stack(group.files)
    keep = np.ones(stack.shape, bool)
    for i, path in enumerate(group.files):
        for y, x in demo.cosmic_rays.get(path.name, ()):
            keep[i, y, x] = False
    if subtract:
        stack -= fits.getdata(demo.dark_flat_for(group).path).astype(np.float64)
    stack /= np.median(stack, axis=(1, 2), keepdims=True)
    master = np.nanmean(np.where(keep, stack, np.nan), axis=0)
    master /= master.mean()
    noise = demo.expected_noise(group)
    residual = master - demo.illumination(group)
    columns = residual.mean(axis=0) / (noise.mean() / np.sqrt(group.shape[0]))
    return residual / noise, columns


@pytest.mark.parametrize("key", [("L", 1, -10.0), ("Ha", 2, 0.0)])
def test_calibrated_master_matches_pattern(demo, key):
    group = demo.group(*key)
    z, columns = _residual_z(demo, group, subtract=True)
    assert abs(z.mean()) < 0.05
    assert 0.9 < z.std() < 1.1  # pure shot and read noise of N frames
    assert np.abs(columns).max() < 5.5
    # Without the dark-flat, the bias and its column pattern show.
    z_raw, columns_raw = _residual_z(demo, group, subtract=False)
    assert z_raw.std() > 1.05 * z.std()
    assert np.abs(columns_raw).max() > 10


@pytest.mark.slow
def test_scale(tmp_path):
    big = write_demo(tmp_path / "big", scale=2)
    assert big.group("L", 1, -10.0).shape == (960, 1280)
    assert big.group("L", 2, 0.0).shape == (480, 640)
    frame = read_frame(big.group("R", 2, 0.0).files[0])
    assert (frame.width, frame.height) == (640, 480)


# --------------------------------------------------------------------------- the colour rig


def test_colour_rig_as_an_asiair_writes_it(demo):
    from flatd.demo import BAYER_PATTERN, CFA_RESPONSE, COLOUR_INSTRUMENT, COLOUR_PIXEL_SIZE
    from flatd.stack.cfa import Layout, channel_means

    (group,) = demo.colour_groups
    assert group in demo.combinable and group not in demo.groups
    assert group.bayer == BAYER_PATTERN == "RGGB" and group.filter is None
    assert demo.group(None, 1) is group
    for path in group.files:
        assert path.suffix == ".fit" and path.parent.name == "Flat" and path.parent.parent.name == "Autorun"
        header = fits.getheader(path)
        assert "FILTER" not in header and "SET-TEMP" not in header
        assert header["XPIXSZ"] == COLOUR_PIXEL_SIZE == 2.4
        frame = read_frame(path)
        assert frame.kind is Kind.FLAT and frame.filter is None
        assert frame.bayer_pattern == "RGGB" and frame.bayer_offset == (0, 0)
        assert frame.instrument == COLOUR_INSTRUMENT and frame.gain is not None and frame.offset is not None
        assert (frame.height, frame.width) == group.shape
    data = fits.getdata(group.files[0]).astype(np.float64) - demo.sensor.bias_level
    means = channel_means(data, Layout("RGGB"))
    assert means["R"] / means["G"] == pytest.approx(CFA_RESPONSE[0] / CFA_RESPONSE[1], rel=0.02)
    assert means["B"] / means["G"] == pytest.approx(CFA_RESPONSE[2] / CFA_RESPONSE[1], rel=0.02)
    # its own bias and dark-flat in the library
    kinds = {c.kind for c in demo.calibration_files if c.shape == group.shape}
    assert kinds == {"bias", "dark-flat"}
    assert read_frame(demo.dark_flat_for(group).path).bayer_pattern == "RGGB"
