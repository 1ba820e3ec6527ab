"""Master headers and atomic writes, plain and tile-compressed (flatd.output.masters)."""

from __future__ import annotations

import os
import warnings
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

import flatd
from flatd.output import masters
from flatd.calibration import Calibration
from flatd.config import Output
from flatd.ingest.frames import Kind, read_frame
from flatd.output.masters import cleanup_temp_files, master_header, unique_path, write_master
from flatd.output.naming import master_name, name_fields
from flatd.stack.methods import Method
from framefactory import make_frame

WHEN = datetime(2026, 11, 25, 1, 2, 3)
MEAN = Method("mean")


def temp_files(directory: Path) -> list[str]:
    return sorted(p.name for p in Path(directory).iterdir() if p.name.endswith(".tmp"))


# ------------------------------------------------------------------- header


def test_master_header_cards():
    frames = [
        make_frame("a.fits", exposure=2.0, temperature=-10.0, set_temperature=-10.0, date=datetime(2026, 11, 24, 18, 31)),
        make_frame("b.fits", exposure=3.0, temperature=-10.4, set_temperature=-10.0, date=datetime(2026, 11, 24, 18, 30)),
        make_frame("c.fits", exposure=4.0, temperature=-9.8, set_temperature=-10.0, filter="R"),
    ]
    dark = make_frame("master_dark_2s.fits", kind=Kind.DARK, path=Path("/lib/master_dark_2s.fits"))
    cals = [Calibration(mode="file", frame=dark), Calibration(mode="file", frame=dark),
            Calibration(mode="file", frame=dark)]
    header = master_header(frames, cals, Method("sigma", sigma=2.0), "multiplicative",
                           factors=[1.0, 0.95, 1.1], extra={"OBSERVER": ("Jane Dœ", "who took them")})
    assert header["IMAGETYP"] == "Master Flat"
    assert header["FILTER"] == "L"
    assert header["XBINNING"] == 1 and header["YBINNING"] == 1
    assert header["EXPTIME"] == pytest.approx(3.0)
    assert header["EXPOSURE"] == pytest.approx(3.0)
    assert header["CCD-TEMP"] == pytest.approx(-10.0667, abs=1e-3)
    assert header["SET-TEMP"] == pytest.approx(-10.0)
    assert header["DATE-OBS"].startswith("2026-11-24T18:30:00")
    assert header["INSTRUME"] == "ZWO ASI294MM Pro"
    assert header["TELESCOP"] == "RedCat 51"
    assert header["NCOMBINE"] == 3
    assert header["COMBMETH"] == "SigmaClip2.0"
    assert header["CLIPSIG"] == 2.0
    assert header["NORMALIZ"] == "multiplicative"
    assert header["CALMODE"] == "file"
    assert header["CREATOR"] == f"flatd {flatd.__version__}"
    assert header["OBSERVER"] == "Jane Doe"
    cards = [str(h) for h in header["HISTORY"]]
    assert all(len(c) <= 72 for c in cards)
    assert sum(c.startswith("input ") for c in cards) == 3  # one entry per input
    history = " ".join(c.strip() for c in cards)
    for frame, factor in zip(frames, ("1", "0.95", "1.1")):
        assert frame.path.name in history
        assert f"normalization factor {factor}" in history
    assert history.count("/lib/master_dark_2s.fits") == 3
    assert any("sigma clip" in str(c) for c in header["COMMENT"])


def test_master_header_parameters_and_modes():
    frames = [make_frame("a.fits", instrument="A"), make_frame("b.fits", instrument="B")]
    h = master_header(frames, [], Method("minmax", minmax=2), "none")
    assert h["CLIPN"] == 2
    assert h["CALMODE"] == "none"
    assert "INSTRUME" not in h  # inputs disagree
    h = master_header(frames, [Calibration(mode="pedestal", pedestal=100)] * 2, MEAN, "none")
    assert h["CALMODE"] == "pedestal" and h["PEDESTAL"] == 100
    assert "CLIPN" not in h and "CLIPSIG" not in h
    h = master_header(frames, [Calibration(mode="pedestal", pedestal=100), Calibration()], MEAN, "none")
    assert h["CALMODE"] == "mixed" and "PEDESTAL" not in h
    with pytest.raises(ValueError):
        master_header(frames, [Calibration()], MEAN, "none")
    with pytest.raises(ValueError):
        master_header(frames, [], MEAN, "none", factors=[1.0])


def test_master_header_values_are_card_safe(tmp_path):
    frame = make_frame("ä\x07.fits", filter="Hα\x00\x1b[31m", instrument="Kamera™ ü", telescope="x" * 200, exposure=None,
                       temperature=None, set_temperature=None, date=None)
    h = master_header([frame], [], MEAN, "none")
    assert h["FILTER"] == "Ha [31m"
    assert "EXPTIME" not in h and "CCD-TEMP" not in h and "DATE-OBS" not in h
    for card in h.cards:
        assert str(card.value).isascii()
    # The header writes and verifies.
    path = write_master(tmp_path, "x.fits", np.ones((4, 4)), h)
    with fits.open(path, checksum=True) as hdul:
        assert hdul[0].header["INSTRUME"] == h["INSTRUME"]


def test_master_is_recognised_as_master_by_frames(tmp_path):
    h = master_header([make_frame(), make_frame("b.fits")], [], MEAN, "none")
    path = write_master(tmp_path, "m.fits", np.ones((8, 6), dtype=np.float32), h)
    assert read_frame(path).kind is Kind.MASTER


# ------------------------------------------------------------------- writing


def test_write_master_float32_checksum_and_round_trip(tmp_path):
    data = np.linspace(40000, 65535, 64 * 48).reshape(48, 64)
    data[0, 0] = 32768.0
    data[0, 1] = 65535.0
    header = master_header([make_frame()], [], MEAN, "none")
    path = write_master(tmp_path / "out", "m.fits", data, header)
    assert path == tmp_path / "out" / "m.fits"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a checksum mismatch would warn
        with fits.open(path, checksum=True) as hdul:
            hdu = hdul[0]
            assert hdu.header["BITPIX"] == -32
            assert "CHECKSUM" in hdu.header and "DATASUM" in hdu.header
            assert hdu.verify_checksum() == 1
            assert hdu.verify_datasum() == 1
            back = hdu.data
            assert back.dtype.kind == "f"
            np.testing.assert_array_equal(back, data.astype(np.float32))
            assert back.min() >= 32768.0  # nothing wrapped to negative, unlike the original's int16
            assert back[0, 1] == 65535.0
    assert temp_files(tmp_path / "out") == []


def test_write_master_corruption_is_detected(tmp_path):
    path = write_master(tmp_path, "m.fits", np.full((10, 10), 50000.0), fits.Header())
    raw = bytearray(path.read_bytes())
    raw[-10] ^= 0xFF
    path.write_bytes(bytes(raw))
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        with fits.open(path, checksum=False) as hdul:
            assert hdul[0].verify_datasum() == 0


def test_write_master_never_overwrites(tmp_path):
    existing = tmp_path / "m.fits"
    existing.write_bytes(b"not mine")
    first = write_master(tmp_path, "m.fits", np.ones((3, 3)), fits.Header())
    second = write_master(tmp_path, "m.fits", np.ones((3, 3)) * 2, fits.Header())
    assert first == tmp_path / "m-2.fits"
    assert second == tmp_path / "m-3.fits"
    assert existing.read_bytes() == b"not mine"
    assert fits.getdata(second)[0, 0] == 2.0
    assert temp_files(tmp_path) == []


def test_write_master_without_hard_links(tmp_path, monkeypatch):
    import errno

    def no_link(src, dst, *a, **k):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_link)
    (tmp_path / "m.fits").write_bytes(b"old")
    path = write_master(tmp_path, "m.fits", np.ones((3, 3)), fits.Header())
    assert path.name == "m-2.fits"
    assert (tmp_path / "m.fits").read_bytes() == b"old"
    assert temp_files(tmp_path) == []


def test_write_master_failure_leaves_nothing(tmp_path, monkeypatch):
    def broken_fsync(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError):
        write_master(tmp_path, "m.fits", np.ones((3, 3)), fits.Header())
    assert list(tmp_path.iterdir()) == []


def test_write_master_failure_while_linking_leaves_nothing(tmp_path, monkeypatch):
    def broken_link(src, dst, *a, **k):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "link", broken_link)
    with pytest.raises(OSError):
        write_master(tmp_path, "m.fits", np.ones((3, 3)), fits.Header())
    assert list(tmp_path.iterdir()) == []


def test_write_master_directory_fsync_failure_removes_final(tmp_path, monkeypatch):
    import flatd.output.masters as m

    def broken_dir_sync(path):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(m, "fsync_dir", broken_dir_sync)
    with pytest.raises(OSError):
        write_master(tmp_path, "m.fits", np.ones((3, 3)), fits.Header())
    assert list(tmp_path.iterdir()) == []


def test_write_master_temp_name_is_hidden_in_target(tmp_path, monkeypatch):
    seen = []
    real_fsync = os.fsync

    def spy(fd):
        seen.append(sorted(p.name for p in tmp_path.iterdir()))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    write_master(tmp_path, "m.fits", np.ones((3, 3)), fits.Header())
    names = seen[0]
    assert len(names) == 1
    assert names[0].startswith(".flatd-") and names[0].endswith(".tmp")


def test_write_master_rejects_bad_names(tmp_path):
    for bad in ("../m.fits", "a/m.fits", ".m.fits", "", ".."):
        with pytest.raises(ValueError):
            write_master(tmp_path, bad, np.ones((3, 3)), fits.Header())
    with pytest.raises(ValueError):
        write_master(tmp_path, "m.fits", np.ones(3), fits.Header())
    assert list(tmp_path.iterdir()) == []


def test_hostile_filter_ends_up_inside_output_folder(tmp_path):
    """Invariant 8, end to end: FILTER='../../x' in a real file's header."""
    capture = tmp_path / "capture" / "night"
    capture.mkdir(parents=True)
    hdu = fits.PrimaryHDU(np.full((6, 8), 30000, dtype=np.uint16))
    hdu.header["IMAGETYP"] = "Flat Field"
    hdu.header["FILTER"] = "../../x"
    hdu.header["INSTRUME"] = "/etc/passwd"
    hdu.header["CCD-TEMP"] = -10.0
    hdu.header["EXPTIME"] = 1.5
    hdu.header["DATE-OBS"] = "2026-11-24T18:30:00.1234567"
    source = capture / "flat_001.fits"
    hdu.writeto(source)
    frame = read_frame(source)
    assert frame.filter == "../../x"

    out = tmp_path / "capture" / "night" / "masters"
    for template in (Output().name, "{filter}", "{instrument}-{filter}.fits"):
        name = master_name(template, name_fields([frame], "Mean", "g", WHEN))
        header = master_header([frame], [], MEAN, "none")
        path = write_master(out, name, np.ones((6, 8)), header)
        assert path.parent == out
        assert os.path.realpath(path).startswith(os.path.realpath(out) + os.sep)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["FLAT-x-1x1-8x6-Mean-20261124-183000-10.0C.fits", "x.fits", "etc_passwd-x.fits"])
    assert not (tmp_path / "x").exists() and not (tmp_path / "capture" / "x").exists()


def test_unique_path(tmp_path):
    target = tmp_path / "m.fits"
    assert unique_path(target) == target
    target.write_bytes(b"")
    assert unique_path(target) == tmp_path / "m-2.fits"
    (tmp_path / "m-2.fits").write_bytes(b"")
    assert unique_path(target) == tmp_path / "m-3.fits"
    folder = tmp_path / "originals-20261125-010203"
    folder.mkdir()
    assert unique_path(folder) == tmp_path / "originals-20261125-010203-2"


def test_cleanup_temp_files(tmp_path):
    ours = [tmp_path / ".flatd-m.fits-abcd.tmp", tmp_path / ".flatd-move-x.fits-1234.tmp"]
    for p in ours:
        p.write_bytes(b"half")
    others = [tmp_path / "m.fits", tmp_path / ".other.tmp", tmp_path / "flatd-m.tmp", tmp_path / ".flatd-m.fits"]
    for p in others:
        p.write_bytes(b"keep")
    (tmp_path / ".flatd-dir.tmp").mkdir()
    removed = cleanup_temp_files(tmp_path)
    assert sorted(removed) == sorted(ours)
    assert all(p.exists() for p in others)
    assert (tmp_path / ".flatd-dir.tmp").is_dir()
    assert cleanup_temp_files(tmp_path / "missing") == []


def test_cleanup_temp_files_spares_fresh_ones(tmp_path):
    fresh = tmp_path / ".flatd-m.fits-abcd.tmp"
    fresh.write_bytes(b"")
    assert cleanup_temp_files(tmp_path, min_age=3600) == []
    assert fresh.exists()
    old = os.stat(fresh).st_mtime - 7200
    os.utime(fresh, (old, old))
    assert cleanup_temp_files(tmp_path, min_age=3600) == [fresh]


def test_method_cards_come_from_the_registry():
    h = master_header([make_frame()], [], Method("sigma", sigma=2.5), "none")
    assert (h["COMBMETH"], h["CLIPSIG"]) == ("SigmaClip2.5", 2.5)
    assert h.comments["COMBMETH"] == "combine method"
    assert h.comments["CLIPSIG"] == "sigma clip threshold (z-score)"
    h = master_header([make_frame()], [], Method("minmax", minmax=3), "none")
    assert (h["COMBMETH"], h["CLIPN"]) == ("MinMaxClip3", 3) and isinstance(h["CLIPN"], int)
    assert h.comments["CLIPN"] == "min/max clip passes"
    h = master_header([make_frame()], [], Method("median"), "none")
    assert h["COMBMETH"] == "Median" and "CLIPN" not in h and "CLIPSIG" not in h


# ------------------------------------------------------------------- .fits.fz, EXPTIME


@pytest.mark.parametrize("name", ["m.fits.fz", "M.FITS.FZ"])
def test_write_compressed_master_is_lossless(tmp_path, name):
    rng = np.random.default_rng(5)
    data = rng.normal(1.0, 0.02, size=(50, 70)).astype(np.float32)
    data[3, 4] = np.nan
    data[5, 6] = 1e-30
    header = master_header([make_frame(), make_frame("b.fits")], [], MEAN, "none", extra={"FLATDJOB": "j1"})
    path = write_master(tmp_path, name, data, header)
    assert path == tmp_path / name
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a checksum mismatch would warn
        with fits.open(path, checksum=True) as hdul:
            assert isinstance(hdul[1], fits.CompImageHDU)
            assert hdul[1].header["IMAGETYP"] == "Master Flat"
            back = hdul[1].data
            assert back.dtype == np.float32
            np.testing.assert_array_equal(back, data)  # bit for bit, NaN included
    assert path.stat().st_size < data.nbytes + 2 * 2880 * 3
    frame = read_frame(path)  # flatd reads it back as a master (never an input)
    assert frame.compressed and frame.kind is Kind.MASTER and frame.headers["FLATDJOB"] == "j1"
    assert temp_files(tmp_path) == []


def test_compressed_master_never_overwrites_and_numbers_before_the_extension(tmp_path):
    (tmp_path / "m.fits.fz").write_bytes(b"not mine")
    path = write_master(tmp_path, "m.fits.fz", np.ones((4, 4)), fits.Header())
    assert path.name == "m-2.fits.fz"
    assert (tmp_path / "m.fits.fz").read_bytes() == b"not mine"
    assert unique_path(tmp_path / "m.fits.fz") == tmp_path / "m-3.fits.fz"


def test_compressed_master_checks_free_space_first(tmp_path, monkeypatch):
    monkeypatch.setattr(masters, "free_bytes", lambda directory: 100)
    with pytest.raises(masters.NoSpace, match="no space left on"):
        write_master(tmp_path, "m.fits.fz", np.ones((64, 64)), fits.Header())
    assert list(tmp_path.iterdir()) == []


def test_errors_derive_from_one_base():
    from flatd.errors import FlatdError

    assert issubclass(masters.NoSpace, FlatdError) and issubclass(masters.NoSpace, OSError)


def test_exptime_is_rounded_to_the_inputs_precision():
    frames = [make_frame(f"{i}.fits", exposure=0.4) for i in range(3)]
    assert sum(f.exposure for f in frames) / 3 != 0.4  # 0.4000000000000001 today
    header = master_header(frames, [], MEAN, "none")
    assert header["EXPTIME"] == 0.4 and header["EXPOSURE"] == 0.4
    assert "EXPTIME =                  0.4" in header.tostring()
    header = master_header([make_frame(exposure=1.25), make_frame(exposure=1.5)], [], MEAN, "none")
    assert header["EXPTIME"] == 1.38  # (1.25 + 1.5) / 2 = 1.375, to 2 decimals



# ------------------------------------------------------------------- rejection reported, auto (issue 9)


def _lines(cards) -> list[str]:
    """HISTORY/COMMENT cards with their wrapped continuations (two spaces) joined."""
    lines: list[str] = []
    for card in (str(c) for c in cards):
        if card.startswith("  ") and lines:
            lines[-1] += " " + card.strip()
        else:
            lines.append(card)
    return lines


def _text(cards) -> str:
    return " ".join(_lines(cards))


def _fits_legal(header: fits.Header) -> None:
    """Every card 80 characters of printable ASCII, keywords at most 8, and astropy's verify."""
    text = header.tostring()
    assert len(text) % 80 == 0
    for k in range(0, len(text), 80):
        card = text[k:k + 80]
        assert all(32 <= ord(ch) < 127 for ch in card), card
    for card in header.cards:
        assert len(card.keyword) <= 8, card.keyword
    hdu = fits.PrimaryHDU(np.zeros((2, 2), np.float32), header=header)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hdu.verify("exception")


def test_rejection_fractions_in_the_header():
    frames = [make_frame(f"f{i}.fits") for i in range(3)]
    rejected = [(0.001, 0.002), (0.0, 0.0), (0.05, 0.125)]
    header = master_header(frames, [], MEAN, "multiplicative", factors=[1.0, 1.0, 1.0], rejected=rejected)
    assert header["REJLOW"] == pytest.approx((0.001 + 0.0 + 0.05) / 3, rel=1e-15)
    assert header["REJHIGH"] == pytest.approx((0.002 + 0.0 + 0.125) / 3, rel=1e-15)
    history = _lines(header["HISTORY"])
    assert "rejected 1.0000e-03 low, 2.0000e-03 high" in history[0]
    assert "rejected 5.0000e-02 low, 1.2500e-01 high" in " ".join(history)
    assert "COMBAUTO" not in header
    plain = master_header(frames, [], MEAN, "none")
    assert "REJLOW" not in plain and "rejected" not in _text(plain["HISTORY"])
    with pytest.raises(ValueError, match="2 rejection fractions for 3 frames"):
        master_header(frames, [], MEAN, "none", rejected=rejected[:2])


def test_auto_in_the_header():
    frames = [make_frame(f"f{i}.fits") for i in range(15)]
    reason = "15 frames; 10 to 19 frames: winsorized sigma clipping, a robust spread"
    header = master_header(frames, [], Method("median"), "multiplicative", auto_reason=reason)
    assert header["COMBAUTO"] is True
    assert header["COMBMETH"] == "Median"
    comments = _text(header["COMMENT"])
    assert "method auto: 15 frames; 10 to 19 frames: winsorized sigma clipping, a robust spread" in comments
    _fits_legal(header)


def test_header_of_500_inputs_with_rejections_is_fits_legal():
    frames = [make_frame(f"flat_{i:04d}_with_a_rather_long_name_from_the_capture_program.fits") for i in range(500)]
    cals = [Calibration(mode="pedestal", pedestal=100.0)] * 500
    rejected = [(i / 1e5, (500 - i) / 1e5) for i in range(500)]
    header = master_header(frames, cals, MEAN, "multiplicative", factors=[1.0] * 500, rejected=rejected,
                           auto_reason="x " * 100)
    _fits_legal(header)
    history = _text(header["HISTORY"])
    for i in (0, 250, 499):
        assert f"input {i + 1}/500: flat_{i:04d}" in history
    assert history.count("rejected ") == 500


@pytest.mark.parametrize("name", ["m.fits", "m.fits.fz"])
def test_rejection_map_is_an_image_extension(tmp_path, name):
    rng = np.random.default_rng(7)
    image = rng.random((23, 31)).astype(np.float32)
    rejmap = rng.integers(0, 9, size=(2, 23, 31)).astype(np.uint16)
    rejmap[0, 0, 0], rejmap[1, 22, 30] = 65535, 40000  # the whole uint16 range survives
    header = master_header([make_frame()], [], MEAN, "none", rejected=[(0.01, 0.02)])
    path = write_master(tmp_path, name, image, header, rejection_map=rejmap)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with fits.open(path, checksum=True) as hdul:
            hdul.verify("exception")
            ext = hdul["REJMAP"]
            assert ext.data.dtype == np.uint16 and np.array_equal(ext.data, rejmap)
            assert (ext.header["PLANE1"], ext.header["PLANE2"]) == ("low", "high")
            primary = hdul[1] if name.endswith(".fz") else hdul[0]
            assert np.array_equal(primary.data, image) and primary.header["REJLOW"] == 0.01
            assert ext.header["DATASUM"]
    assert temp_files(tmp_path) == []
    # a master is still recognised as a master
    assert read_frame(path).kind == Kind.MASTER


def test_rejection_map_counts_in_the_free_space_check(tmp_path, monkeypatch):
    image = np.ones((64, 64), np.float32)
    rejmap = np.zeros((2, 64, 64), np.uint16)
    plain = len(fits.PrimaryHDU(image).header.tostring()) + 64 * 64 * 4
    need_map = -(-(64 * 64 * 4) // 2880) * 2880
    # room for the image alone, not for the map
    monkeypatch.setattr(masters, "free_bytes", lambda directory: plain + 2880 * 2 + 100)
    write_master(tmp_path, "ok.fits", image, fits.Header())
    with pytest.raises(masters.NoSpace, match="no space left on"):
        write_master(tmp_path, "m.fits", image, fits.Header(), rejection_map=rejmap)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.fits"]
    assert need_map > 2880


def test_rejection_map_of_the_wrong_shape_is_refused(tmp_path):
    with pytest.raises(ValueError, match="rejection map"):
        write_master(tmp_path, "m.fits", np.ones((4, 4)), fits.Header(), rejection_map=np.zeros((4, 4), np.uint16))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["m.fits", "m.fits.fz"])
def test_writing_a_master_never_changes_its_array_meanwhile(tmp_path, name):
    # the runner draws the previews from the array in another thread while the master is written
    import threading

    image = (1000 + np.arange(2048 * 1024, dtype=np.float32).reshape(2048, 1024) % 977)
    expected = image[::64, ::64].copy()
    seen, stop = [], threading.Event()

    def watch() -> None:
        while not stop.is_set():
            seen.append(np.array_equal(image[::64, ::64], expected))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for i in range(3):
            write_master(tmp_path, f"{i}-{name}", image, fits.Header())
    finally:
        stop.set()
        watcher.join()
    assert seen and all(seen), f"{seen.count(False)} of {len(seen)} looks saw the array changed"
    assert image.flags.writeable and np.array_equal(image[::64, ::64], expected)
