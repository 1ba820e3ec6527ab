"""The dark/bias library, the choice of a calibration frame, and the dispatch by mode."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from flatd.calibration import (
    NO_CALIBRATION,
    Calibration,
    CalibrationError,
    Choice,
    Library,
    LibraryCache,
    calibration_for,
    calibration_kind,
    master_type,
)
from flatd.config import Precalibration
from flatd.ingest.frames import Frame, Kind, read_frame

REALDATA = Path(__file__).resolve().parents[2].parent / "shared" / "realdata"
LOWELL = REALDATA / "lowell-nasa42"
MAXIM = REALDATA / "maxim-apogee"


def write_fits(path: Path, imagetyp: str | None = "Dark Frame", exptime: float | None = 0.0,
               temp: float | None = -10.0, size=(100, 100), binning=(1, 1), filter: str | None = None,
               **extra) -> Path:
    """A tiny FITS file; size is (width, height)."""
    width, height = size
    hdu = fits.PrimaryHDU(np.zeros((height, width), np.uint16))
    if imagetyp is not None:
        hdu.header["IMAGETYP"] = imagetyp
    if exptime is not None:
        hdu.header["EXPTIME"] = exptime
    if temp is not None:
        hdu.header["CCD-TEMP"] = temp
    hdu.header["XBINNING"], hdu.header["YBINNING"] = binning
    if filter is not None:
        hdu.header["FILTER"] = filter
    for key, value in extra.items():
        hdu.header[key] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    hdu.writeto(path)
    return path


def make_flat(tmp_path: Path, exptime=2.0, temp=-10.0, size=(100, 100), binning=(1, 1), name="flat.fits") -> Frame:
    return read_frame(write_fits(tmp_path / "flats" / name, "Flat Field", exptime, temp, size, binning, "R"))


# --------------------------------------------------------------------------- types


@pytest.mark.parametrize("imagetyp, extra, expected", [
    ("Master Dark", {}, Kind.DARK),
    ("MasterBias", {}, Kind.BIAS),
    ("MASTER OFFSET", {}, Kind.BIAS),
    ("Master Dark Flat", {}, Kind.DARK_FLAT),
    ("Master FlatDark", {}, Kind.DARK_FLAT),
    ("Master Flat", {}, Kind.FLAT),
    ("Dark Frame", {"NCOMBINE": 20}, Kind.DARK),  # stacked by other software
    ("Master", {"CALFRAME": "Master Bias"}, Kind.BIAS),
    ("Master", {"PICTTYPE": 3}, Kind.DARK),
])
def test_master_type(tmp_path, imagetyp, extra, expected):
    frame = read_frame(write_fits(tmp_path / "m.fits", imagetyp, 10.0, **extra))
    assert frame.kind is Kind.MASTER
    assert master_type(frame) is expected
    assert calibration_kind(frame) is (expected if expected is not Kind.FLAT else None)


def test_master_type_from_file_name(tmp_path):
    frame = read_frame(write_fits(tmp_path / "master_dark_300s.fits", "Master", 300.0))
    assert master_type(frame) is Kind.DARK


def test_calibration_kind_of_plain_frames(tmp_path):
    assert calibration_kind(read_frame(write_fits(tmp_path / "a.fits", "Bias Frame"))) is Kind.BIAS
    assert calibration_kind(read_frame(write_fits(tmp_path / "b.fits", "Dark Frame"))) is Kind.DARK
    assert calibration_kind(read_frame(write_fits(tmp_path / "c.fits", "DARKFLAT"))) is Kind.DARK_FLAT
    assert calibration_kind(read_frame(write_fits(tmp_path / "d.fits", "Light Frame"))) is None
    assert calibration_kind(read_frame(write_fits(tmp_path / "e.fits", "Flat Field"))) is None


# --------------------------------------------------------------------------- scan


@pytest.fixture
def mixed_library(tmp_path) -> Path:
    lib = tmp_path / "lib"
    write_fits(lib / "bias.fits", "Bias Frame", 0.0)
    write_fits(lib / "dark_10s.fits", "Dark Frame", 10.0)
    write_fits(lib / "masters" / "MasterDark_60s.fits", "Master Dark", 60.0, NCOMBINE=25)
    write_fits(lib / "masters" / "MasterFlat_R.fits", "Master Flat", 2.0, filter="R")
    write_fits(lib / "flat.fits", "Flat Field", 2.0)
    write_fits(lib / "light.fits", "Light Frame", 300.0)
    write_fits(lib / "mystery.fits", None, 5.0)
    (lib / "broken.fits").write_bytes(b"SIMPLE  =                    T" + b" " * 50)
    (lib / "notes.txt").write_text("not a fits file")
    return lib


def names(frames):
    return sorted(f.path.name for f in frames)


def test_scan_bias_dark_only_recursive(mixed_library):
    lib = Library.scan(mixed_library)
    assert names(lib.frames) == ["MasterDark_60s.fits", "bias.fits", "dark_10s.fits"]
    reasons = {s.path.name: s.reason for s in lib.skipped}
    assert set(reasons) == {"MasterFlat_R.fits", "flat.fits", "light.fits", "mystery.fits", "broken.fits"}
    assert reasons["MasterFlat_R.fits"] == "master flat, not a dark or bias"
    assert reasons["light.fits"] == "typed light, not BIAS or DARK (bias_dark_only)"
    assert reasons["mystery.fits"] == "typed unknown, not BIAS or DARK (bias_dark_only)"
    assert "truncated" in reasons["broken.fits"]


def test_scan_not_recursive(mixed_library):
    lib = Library.scan(mixed_library, recursive=False)
    assert names(lib.frames) == ["bias.fits", "dark_10s.fits"]
    assert not any("masters" in str(s.path) for s in lib.skipped)


def test_scan_all_files_keeps_unknown_but_never_flats_or_lights(mixed_library):
    lib = Library.scan(mixed_library, bias_dark_only=False)
    assert names(lib.frames) == ["MasterDark_60s.fits", "bias.fits", "dark_10s.fits", "mystery.fits"]
    reasons = {s.path.name: s.reason for s in lib.skipped}
    assert reasons["flat.fits"] == "typed flat, not a dark or bias"
    assert reasons["MasterFlat_R.fits"] == "master flat, not a dark or bias"


def test_scan_missing_folder(tmp_path):
    with pytest.raises(CalibrationError, match="no such folder"):
        Library.scan(tmp_path / "nope")


def test_library_of_master_darks_is_usable(tmp_path):
    lib_dir = tmp_path / "lib"
    write_fits(lib_dir / "MasterDark_2s.fits", "Master Dark", 2.0, -10.0)
    write_fits(lib_dir / "MasterBias.fits", "MasterBias", 0.0, -10.0)
    lib = Library.scan(lib_dir)
    choice = lib.choose(make_flat(tmp_path, exptime=2.0, temp=-10.0))
    assert choice.calibration.frame.path.name == "MasterDark_2s.fits"
    assert choice.calibration.why.startswith("dark MasterDark_2s.fits:")


# --------------------------------------------------------------------------- policies


@pytest.fixture
def policy_library(tmp_path) -> Library:
    lib = tmp_path / "lib"
    write_fits(lib / "biases" / "b_m10.fits", "Bias Frame", 0.0, -10.0)
    write_fits(lib / "darks" / "d_1s_m15.fits", "Dark Frame", 1.0, -15.0)
    write_fits(lib / "darks" / "d_1.3s_m13.fits", "Dark Frame", 1.3, -13.0)
    write_fits(lib / "darks" / "d_30s_m10.fits", "Dark Frame", 30.0, -10.0)
    write_fits(lib / "darks" / "d_2s_m10.fits", "Dark Frame", 2.0, -10.2, size=(200, 200))  # other size
    return Library.scan(lib)


def test_original_policy_worked_example(tmp_path, policy_library):
    # Flat 1.0 s at -10 °C. Scores |dT| + 3|dExp|:
    #   bias b_m10       0 + 3*1.0 = 3.0   <- lowest
    #   dark d_1.3s_m13  3 + 3*0.3 = 3.9
    #   dark d_1s_m15    5 + 3*0   = 5.0
    #   dark d_30s_m10   0 + 3*29  = 87.0
    flat = make_flat(tmp_path, exptime=1.0, temp=-10.0)
    choice = policy_library.choose(flat)
    assert isinstance(choice, Choice) and choice.flat == flat
    assert choice.calibration.mode == "file"
    assert choice.calibration.frame.path.name == "b_m10.fits"
    assert choice.score == pytest.approx(3.0)
    assert choice.calibration.why == (
        "bias biases/b_m10.fits: |dT| 0.0 + 3x|dExp| 1.0 = 3.0, lowest of 4 (policy original)"
    )


def test_original_policy_prefers_close_dark(tmp_path, policy_library):
    flat = make_flat(tmp_path, exptime=1.2, temp=-12.8)
    # d_1.3s_m13: 0.2 + 0.3 = 0.5; bias: 2.8 + 3.6 = 6.4; d_1s_m15: 2.2 + 0.6 = 2.8
    choice = policy_library.choose(flat, "original")
    assert choice.calibration.frame.path.name == "d_1.3s_m13.fits"
    assert choice.score == pytest.approx(0.5)
    assert choice.calibration.why == (
        "dark darks/d_1.3s_m13.fits: |dT| 0.2 + 3x|dExp| 0.1 = 0.5, lowest of 4 (policy original)"
    )


def test_exposure_match_worked_example(tmp_path, policy_library):
    # Same flat, 1.0 s at -10 °C: darks within 0.5 s are d_1s_m15 (|dT| 5) and
    # d_1.3s_m13 (|dT| 3): the closest temperature wins, although the bias scores better
    # under the original policy.
    flat = make_flat(tmp_path, exptime=1.0, temp=-10.0)
    choice = policy_library.choose(flat, "exposure-match")
    assert choice.calibration.frame.path.name == "d_1.3s_m13.fits"
    assert choice.score is None
    assert choice.calibration.why == (
        "dark darks/d_1.3s_m13.fits: exposure 1.3 s matches the flat's 1.0 s within 0.5 s; "
        "|dT| 3.0, closest temperature of 2 matching (policy exposure-match)"
    )


def test_exposure_match_falls_back_to_bias(tmp_path, policy_library):
    flat = make_flat(tmp_path, exptime=5.0, temp=-10.0)
    choice = policy_library.choose(flat, "exposure-match")
    assert choice.calibration.frame.path.name == "b_m10.fits"
    assert "no dark within 0.5 s of the flat's 5.0 s" in choice.calibration.why


def test_exposure_match_falls_back_to_closest_exposure(tmp_path):
    lib = tmp_path / "lib"
    write_fits(lib / "d_10s.fits", "Dark Frame", 10.0, -10.0)
    write_fits(lib / "d_4s_warm.fits", "Dark Frame", 4.0, 0.0)
    write_fits(lib / "d_4s_cold.fits", "Dark Frame", 4.0, -9.0)
    flat = make_flat(tmp_path, exptime=2.0, temp=-10.0)
    choice = Library.scan(lib).choose(flat, "exposure-match")
    assert choice.calibration.frame.path.name == "d_4s_cold.fits"
    assert "no bias; closest exposure 4.0 s (|dExp| 2.0), |dT| 1.0" in choice.calibration.why


def test_dark_flat_counts_as_dark_for_exposure_match(tmp_path):
    lib = tmp_path / "lib"
    write_fits(lib / "darkflat_2s.fits", "DARKFLAT", 2.0, -10.0)
    write_fits(lib / "bias.fits", "Bias Frame", 0.0, -10.0)
    choice = Library.scan(lib).choose(make_flat(tmp_path, exptime=2.0), "exposure-match")
    assert choice.calibration.frame.path.name == "darkflat_2s.fits"
    assert choice.calibration.why.startswith("dark-flat darkflat_2s.fits:")


def test_tie_broken_by_path(tmp_path):
    lib = tmp_path / "lib"
    for name in ("c.fits", "a.fits", "b.fits"):
        write_fits(lib / name, "Bias Frame", 0.0, -10.0)
    flat = make_flat(tmp_path)
    assert Library.scan(lib).choose(flat).calibration.frame.path.name == "a.fits"
    assert Library.scan(lib).choose(flat, "exposure-match").calibration.frame.path.name == "a.fits"


def test_missing_temperature_counts_as_zero(tmp_path):
    lib = tmp_path / "lib"
    write_fits(lib / "warm.fits", "Bias Frame", 0.0, -1.0)
    write_fits(lib / "cold.fits", "Bias Frame", 0.0, -20.0)
    flat = make_flat(tmp_path, temp=None)
    choice = Library.scan(lib).choose(flat)
    assert choice.calibration.frame.path.name == "warm.fits"
    assert "(flat without temperature, taken as 0)" in choice.calibration.why


def test_bias_exposure_is_zero_even_if_header_says_otherwise(tmp_path):
    lib = tmp_path / "lib"
    write_fits(lib / "bias.fits", "Bias Frame", 0.001, -10.0)
    choice = Library.scan(lib).choose(make_flat(tmp_path, exptime=1.0))
    assert choice.score == pytest.approx(3.0)


def test_unknown_policy(tmp_path, policy_library):
    with pytest.raises(ValueError, match="policy"):
        policy_library.choose(make_flat(tmp_path), "closest")


def test_no_match_error_lists_library_sizes(tmp_path):
    lib = tmp_path / "lib"
    for i in range(3):
        write_fits(lib / f"b{i}.fits", "Bias Frame", 0.0, binning=(2, 2), size=(50, 50))
    flat = make_flat(tmp_path)
    with pytest.raises(CalibrationError) as info:
        Library.scan(lib).choose(flat)
    assert str(info.value) == (
        f"{flat.path}: no dark or bias in {lib} matches 1x1 100x100 (library has: 2x2 50x50 ×3)"
    )


def test_no_match_binning_only_differs(tmp_path):
    lib = tmp_path / "lib"
    write_fits(lib / "b.fits", "Bias Frame", 0.0, binning=(2, 2))
    with pytest.raises(CalibrationError, match=r"matches 1x1 100x100 \(library has: 2x2 100x100 ×1\)"):
        Library.scan(lib).choose(make_flat(tmp_path))


def test_no_match_in_empty_library(tmp_path):
    (tmp_path / "lib").mkdir()
    with pytest.raises(CalibrationError, match=r"library has: no darks or biases"):
        Library.scan(tmp_path / "lib").choose(make_flat(tmp_path))


# --------------------------------------------------------------------------- dispatch


def test_mode_none_and_pedestal(tmp_path):
    flat = make_flat(tmp_path)
    assert calibration_for(flat, Precalibration(mode="none"), None, None) == NO_CALIBRATION
    cal = calibration_for(flat, Precalibration(mode="pedestal", pedestal=250), None, None)
    assert cal == Calibration("pedestal", pedestal=250.0, why="pedestal 250")
    assert cal.label == "pedestal 250"


def test_mode_file_fixed_frame(tmp_path):
    flat = make_flat(tmp_path)
    bias_path = write_fits(tmp_path / "bias.fits", "Bias Frame", 0.0)
    settings = Precalibration(mode="file", file=bias_path)
    cal = calibration_for(flat, settings, None, read_frame(bias_path))
    assert cal.mode == "file" and cal.frame.path == bias_path
    assert cal.why == f"fixed bias {bias_path}"
    # Without a frame given, the file is read from the settings.
    assert calibration_for(flat, settings, None, None).frame.path == bias_path


def test_mode_file_size_mismatch(tmp_path):
    flat = make_flat(tmp_path, size=(200, 200))
    dark_path = write_fits(tmp_path / "dark.fits", "Dark Frame", 2.0)
    with pytest.raises(CalibrationError) as info:
        calibration_for(flat, Precalibration(mode="file", file=dark_path), None, read_frame(dark_path))
    assert str(info.value) == f"dark/bias {dark_path} is 100x100 1x1 but flat {flat.path} is 200x200 1x1"


def test_mode_file_binning_mismatch(tmp_path):
    flat = make_flat(tmp_path, binning=(2, 2))
    dark_path = write_fits(tmp_path / "dark.fits", "Dark Frame", 2.0)
    with pytest.raises(CalibrationError, match="is 100x100 1x1 but flat .* is 100x100 2x2"):
        calibration_for(flat, Precalibration(mode="file", file=dark_path), None, None)


def test_mode_file_unreadable(tmp_path):
    flat = make_flat(tmp_path)
    bad = tmp_path / "bad.fits"
    bad.write_text("nonsense")
    with pytest.raises(CalibrationError, match="not a FITS file"):
        calibration_for(flat, Precalibration(mode="file", file=bad), None, None)


def test_mode_auto(tmp_path, policy_library):
    flat = make_flat(tmp_path, exptime=1.0, temp=-10.0)
    original = Precalibration(mode="auto", library=policy_library.folder)
    assert calibration_for(flat, original, policy_library, None).frame.path.name == "b_m10.fits"
    wbpp = Precalibration(mode="auto", library=policy_library.folder, policy="exposure-match")
    assert calibration_for(flat, wbpp, policy_library, None).frame.path.name == "d_1.3s_m13.fits"
    # Without a library given, it is scanned from the settings.
    assert calibration_for(flat, original, None, None).frame.path.name == "b_m10.fits"
    shallow = Precalibration(mode="auto", library=policy_library.folder, recursive=False)
    with pytest.raises(CalibrationError, match="library has: no darks or biases"):
        calibration_for(flat, shallow, None, None)


def test_library_cache(tmp_path, policy_library, monkeypatch):
    calls = []
    real_scan = Library.scan.__func__

    def counting_scan(cls, *args, **kwargs):
        calls.append(args)
        return real_scan(cls, *args, **kwargs)

    monkeypatch.setattr(Library, "scan", classmethod(counting_scan))
    cache = LibraryCache()
    folder = policy_library.folder
    first = cache.get(folder)
    assert cache.get(folder) is first
    assert cache.get(Path(str(folder) + "/")) is first
    assert cache.get(folder, recursive=False) is not first
    assert cache.get(folder, bias_dark_only=False) is not first
    assert len(calls) == 3
    settings = Precalibration(mode="auto", library=folder)
    assert cache.for_settings(settings) is first
    assert cache.for_settings(Precalibration(mode="none")) is None
    with pytest.raises(CalibrationError, match="no such folder"):
        cache.get(tmp_path / "missing")
    with pytest.raises(CalibrationError, match="no such folder"):
        cache.get(tmp_path / "missing")
    assert len(calls) == 4


# --------------------------------------------------------------------------- real frames


@pytest.mark.skipif(not LOWELL.is_dir(), reason="realdata not available")
def test_real_lowell_biases_for_real_flats():
    lib = Library.scan(LOWELL / "bias")
    assert len(lib.frames) == 5 and lib.skipped == []
    assert {f.size_key for f in lib.frames} == {(3, 3, 1432, 1370)}  # binning from CCDSUM
    for path in sorted((LOWELL / "flat").glob("*.fits")):
        flat = read_frame(path)
        for policy in ("original", "exposure-match"):
            choice = lib.choose(flat, policy)
            # All five biases are alike (-102.125 °C): the tie goes to the first path.
            assert choice.calibration.frame.path.name == "20190326.0001.fits"
            assert choice.calibration.why.startswith("bias 20190326.0001.fits:")
        expected = abs(flat.temperature - (-102.125)) + 3.0 * flat.exposure
        assert lib.choose(flat).score == pytest.approx(expected)
    first = lib.choose(read_frame(LOWELL / "flat" / "20190326.0100.fits"))
    assert first.calibration.why == (
        "bias 20190326.0001.fits: |dT| 0.375 + 3x|dExp| 2.7 = 8.475, lowest of 5 (policy original)"
    )


@pytest.mark.skipif(not MAXIM.is_dir(), reason="realdata not available")
def test_real_maxim_biases_and_darks_for_aspen_flat():
    flat = read_frame(MAXIM / "aspen_trimmed.fit")
    assert flat.kind is Kind.FLAT and flat.size_key == (1, 1, 100, 100)
    lib = Library.scan(MAXIM)
    assert names(lib.frames) == [f"biastest{i}.fit" for i in range(1, 6)] + [f"darktest{i}.fit" for i in range(1, 6)]
    skipped = {s.path.name for s in lib.skipped}
    assert {"aspen_trimmed.fit", "maximdl_6_18_header.fit", "celestron_nightscape_10100_astro_fx_v106.fit",
            "neon-on-dome-10-sec-high-res-though-scope.fit"} <= skipped
    # The flat is from an Apogee Aspen, the biases and darks from an Alta: another
    # camera is never used, and the reason names the frame that would have been chosen.
    with pytest.raises(CalibrationError, match=r"the closest, bias biastest2.fit, has camera 'apogee alta', "
                                               r"the flat's 'apogee aspen cg16m' \(and 9 others ruled out too\)"):
        lib.choose(flat)
    # Told to ignore the camera: 1 s at -7.9 °C; darks are 30 s at about -35 °C, so a
    # bias wins on both policies: the one closest in temperature, biastest2 (-34.87 °C).
    any_camera = ("gain", "offset", "readout")
    original = lib.choose(flat, match=any_camera)
    assert original.calibration.frame.path.name == "biastest2.fit"
    assert original.score == pytest.approx(abs(flat.temperature + 34.86624375) + 3.0)
    matched = lib.choose(flat, "exposure-match", match=any_camera)
    assert matched.calibration.frame.path.name == "biastest2.fit"
    assert "no dark within 0.5 s of the flat's 1.0 s" in matched.calibration.why
    # Without bias_dark_only the untyped SBIG frame becomes a candidate, but its size differs.
    everything = Library.scan(MAXIM, bias_dark_only=False)
    assert "neon-on-dome-10-sec-high-res-though-scope.fit" in names(everything.frames)
    assert everything.choose(flat, match=any_camera).calibration.frame.path.name == "biastest2.fit"


@pytest.mark.skipif(not MAXIM.is_dir() or not LOWELL.is_dir(), reason="realdata not available")
def test_real_flat_against_library_of_other_size():
    lib = Library.scan(LOWELL / "bias")
    with pytest.raises(CalibrationError, match=r"matches 1x1 100x100 \(library has: 3x3 1432x1370 ×5\)"):
        lib.choose(read_frame(MAXIM / "aspen_trimmed.fit"))


def test_darks_from_the_flats_own_camera_are_preferred(tmp_path):
    """Two cameras of the same size in one library: the flat's own camera wins even
    where another camera's frame scores better; with none of its own, the flat fails."""
    import numpy as np
    from astropy.io import fits

    from flatd.ingest.frames import read_frame

    def write(name, imagetyp, exptime, temp, camera):
        hdu = fits.PrimaryHDU(np.zeros((8, 10), np.uint16))
        hdu.header.update(IMAGETYP=imagetyp, EXPTIME=exptime, XBINNING=1, YBINNING=1, INSTRUME=camera)
        hdu.header["CCD-TEMP"] = temp
        path = tmp_path / name
        hdu.writeto(path)
        return path

    lib = tmp_path / "lib"
    lib.mkdir()
    write("lib/other_bias.fits", "BIAS", 0.0, -10.0, "Camera B")
    write("lib/own_bias.fits", "BIAS", 0.0, -5.0, "Camera A")
    flat = read_frame(write("flat.fits", "FLAT", 1.0, -10.0, "Camera A"))
    stranger = read_frame(write("flat_c.fits", "FLAT", 1.0, -10.0, "Camera C"))
    library = Library.scan(lib)
    own = library.choose(flat).calibration
    assert own.frame.path.name == "own_bias.fits"
    assert "closer bias other_bias.fits ruled out: camera 'camera b', the flat's 'camera a'" in own.why
    # A camera with no frame of its own gets none: never another camera's, silently.
    with pytest.raises(CalibrationError, match="flat_c.fits: no dark or bias .* has the flat's settings "
                                               r"\(camera 'camera c'\); the closest, bias other_bias.fits"):
        library.choose(stranger)
