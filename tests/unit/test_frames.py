"""flatd.ingest.frames: header dialects, keyword fallbacks, bad input, header-only reads."""

from __future__ import annotations

import hashlib
import os
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flatd.ingest import frames
from flatd.config import parse_rules
from flatd.ingest.frames import (
    BLOCK,
    DEFAULT_KEYWORDS,
    Frame,
    FrameError,
    Kind,
    KeywordMap,
    frame_from_header_text,
    iter_fits_files,
    kind_from_imagetype,
    parse_binning,
    parse_card_value,
    parse_date,
    read_frame,
    read_frames,
)

REALDATA = Path(__file__).resolve().parents[3] / "shared" / "realdata"
needs_realdata = pytest.mark.skipif(not REALDATA.is_dir(), reason="../shared/realdata is not here")


def dt(text: str) -> datetime:
    return datetime.fromisoformat(text)


# ------------------------------------------------------------------ real frames
#
# One line per file of ../shared/realdata, read in place. Values checked against
# what astropy reads from the same files (see test_realdata_agrees_with_astropy).
# (kind, size, binning, filter, exposure, temperature, date)

LOWELL_BIAS_TIMES = ["01:04:25", "01:04:34.010", "01:04:43", "01:04:52.120", "01:05:01.160"]
LOWELL_FLATS = {  # number: (filter, exposure, UTC-OBS)
    "0100": ("V", 2.7, "02:02:50.580"),
    "0101": ("VR", 2.7, "02:03:35.990"),
    "0110": ("VR", 3.3, "02:05:40.290"),
    "0111": ("VR", 4.5, "02:06:07.790"),
    "0112": ("VR", 4.5, "02:06:21.350"),
    "0113": ("VR", 4.5, "02:06:34.870"),
    "0114": ("VR", 4.5, "02:06:48.390"),
    "0115": ("VR", 4.5, "02:07:01.940"),
}
MAXIM_TEMPS = {1: -35.0279865, 2: -34.86624375, 3: -35.15616, 4: -35.08596975, 5: -35.11648725}
MAXIM_DATES = {1: "2012-02-06T11:45:25", 2: "2012-02-06T03:04:58", 3: "2012-02-06T03:17:08",
               4: "2012-02-06T04:15:37", 5: "2012-02-06T07:01:33"}

REAL_FILES: dict[str, tuple] = {
    # Lowell LOIS: IMAGETYP='BIAS'/'SKYFLAT', filter in FILTNAME, temperature in DETTEMP,
    # binning in CCDSUM '3 3', DATE-OBS a date only (its time comes from UTC-OBS).
    **{
        f"lowell-nasa42/bias/20190326.000{i}.fits":
            (Kind.BIAS, (1432, 1370), (3, 3), "VR", 0.0, -102.125, dt(f"2019-03-26T{t}"))
        for i, t in enumerate(LOWELL_BIAS_TIMES, start=1)
    },
    **{
        f"lowell-nasa42/flat/20190326.{n}.fits":
            (Kind.FLAT, (1432, 1370), (3, 3), f, e, -101.75, dt(f"2019-03-26T{t}"))
        for n, (f, e, t) in LOWELL_FLATS.items()
    },
    # MaxIm DL / Apogee: FLAT, BIAS, DARK, LIGHT; float biases and darks.
    "maxim-apogee/aspen_trimmed.fit":
        (Kind.FLAT, (100, 100), (1, 1), "R", 1.0, -7.9147035, dt("2017-04-12T03:28:40")),
    **{
        f"maxim-apogee/biastest{i}.fit": (Kind.BIAS, (100, 100), (1, 1), None, 0.0, MAXIM_TEMPS[i], dt(MAXIM_DATES[i]))
        for i in range(1, 6)
    },
    **{
        f"maxim-apogee/darktest{i}.fit": (Kind.DARK, (100, 100), (1, 1), None, 30.0, MAXIM_TEMPS[i], dt(MAXIM_DATES[i]))
        for i in range(1, 6)
    },
    "maxim-apogee/celestron_nightscape_10100_astro_fx_v106.fit":
        (Kind.LIGHT, (16, 16), (1, 1), None, 60.0, -5.94, dt("2016-06-29T04:58:11")),
    "maxim-apogee/maximdl_6_18_header.fit":
        (Kind.LIGHT, (100, 100), (1, 1), "r", 90.0, -19.9847835, dt("2018-08-23T08:49:30")),
    # SBIG CCDOPS: no IMAGETYP, and nothing in the file name says what it is.
    "maxim-apogee/neon-on-dome-10-sec-high-res-though-scope.fit":
        (Kind.UNKNOWN, (765, 510), (1, 1), "None", 10.0, 4.455891600369, dt("2013-01-28T03:08:12")),
    # QHY268M twilight flats: 7-decimal DATE-OBS (kept to the microsecond).
    "qhy268m-twilight-B/flat1.fits":
        (Kind.FLAT, (1570, 1052), (4, 4), "B", 2.0, -4.9, dt("2023-01-06T00:17:06.584517")),
    "qhy268m-twilight-B/flat2.fits":
        (Kind.FLAT, (1570, 1052), (4, 4), "B", 2.82, -4.9, dt("2023-01-06T00:17:21.690049")),
    "qhy268m-twilight-B/flat3.fits":
        (Kind.FLAT, (1570, 1052), (4, 4), "B", 3.1, -5.1, dt("2023-01-06T00:17:35.804847")),
}

REAL_HEADERS: dict[str, tuple] = {
    # Astro Pixel Processor integration (INTEGRAT) and master flat (CALFRAME='MasterFlat').
    "header_app.hdr": (Kind.MASTER, (4009, 2674), (1, 1), None, 900.0, None, dt("2018-08-20T11:28:45")),
    "header_app2.hdr": (Kind.MASTER, (4144, 2822), (1, 1), "HaOIII", 1.28, None, dt("2024-03-09T11:57:12")),
    # APT: 'Light Frame', EXPTIME only, SET-TEMP but no CCD-TEMP.
    "header_apt.hdr": (Kind.LIGHT, (4144, 2822), (1, 1), None, 240.0, None, dt("2018-09-17T21:04:46")),
    # DWARF II: no IMAGETYP, BINNING='2*2', exposure in EXP.
    "header_dwarflab.hdr": (Kind.UNKNOWN, (1920, 1080), (2, 2), None, 15.0, None, dt("2023-06-10T21:38:19.442")),
    # MaxIm DL 5.24: 'Light Frame', EXPTIME and EXPOSURE.
    "header_maximdl.hdr": (Kind.LIGHT, (4864, 3232), (1, 1), "SII", 300.0, -34.993802250000002,
                           dt("2018-07-04T14:03:03")),
    # N.I.N.A.: 'LIGHT', EXPOSURE and EXPTIME, DATE-OBS in UTC (DATE-LOC is local).
    "header_nina.hdr": (Kind.LIGHT, (4144, 2822), (1, 1), None, 30.0, -10.0, dt("2021-03-02T20:19:00.455")),
    # Seestar S50: a stack (STACKCNT=187) of colour planes (NAXIS=3).
    "header_seestar.hdr": (Kind.MASTER, (1080, 1920), (1, 1), "IRCUT", 10.0, 21.875, dt("2025-05-13T22:48:35.751879")),
    # SGP: 'LIGHT', EXPOSURE, CCDXBIN next to XBINNING.
    "header_sgp_fixed_wcs.hdr": (Kind.LIGHT, (4144, 2822), (1, 1), "HaOIII", 30.0, -17.5,
                                 dt("2020-05-30T00:22:49.096882")),
    "sgp_header.hdr": (Kind.LIGHT, (4144, 2822), (1, 1), "HaOIII", 30.0, -17.5, dt("2020-05-30T00:22:49.096882")),
    # SharpCap: no IMAGETYP; the name header_sharpcap.hdr says nothing either.
    "header_sharpcap.hdr": (Kind.UNKNOWN, (1936, 1088), (1, 1), None, 2.0, 12.7, dt("2019-04-29T20:25:29.821958")),
}


def assert_facts(frame: Frame, expected: tuple) -> None:
    kind, size, binning, filter_, exposure, temperature, date = expected
    assert frame.kind is kind
    assert (frame.width, frame.height) == size
    assert (frame.xbin, frame.ybin) == binning
    assert frame.filter == filter_
    assert frame.exposure == pytest.approx(exposure)
    if temperature is None:
        assert frame.temperature is None
    else:
        assert frame.temperature == pytest.approx(temperature)
    assert frame.date == date


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@needs_realdata
def test_every_real_file_is_in_the_table():
    on_disk = {p.relative_to(REALDATA).as_posix() for p in REALDATA.rglob("*") if p.suffix.lower() in (".fit", ".fits")}
    assert on_disk == set(REAL_FILES)
    headers = {p.name for p in (REALDATA / "headers").glob("*.hdr")}
    assert headers == set(REAL_HEADERS)


@needs_realdata
@pytest.mark.parametrize("name", sorted(REAL_FILES))
def test_real_file(name):
    path = REALDATA / name
    before = (digest(path), path.stat().st_mtime_ns)
    frame = read_frame(path)
    assert_facts(frame, REAL_FILES[name])
    assert frame.file_size == path.stat().st_size
    assert frame.required_bytes <= frame.file_size
    assert (digest(path), path.stat().st_mtime_ns) == before  # read in place, untouched


@needs_realdata
@pytest.mark.parametrize("name", sorted(REAL_FILES))
def test_realdata_agrees_with_astropy(name):
    """The raw parser finds what astropy finds: shape, type, scaling and data offset."""
    path = REALDATA / name
    frame = read_frame(path)
    with fits.open(path) as hdus:
        hdu = hdus[0]
        header = hdu.header
        assert (frame.width, frame.height) == (header["NAXIS1"], header["NAXIS2"])
        assert frame.bitpix == header["BITPIX"]
        assert frame.bzero == header.get("BZERO", 0)
        assert frame.bscale == header.get("BSCALE", 1)
        assert frame.data_offset == hdu._data_offset
        assert frame.data_bytes == header["NAXIS1"] * header["NAXIS2"] * abs(header["BITPIX"]) // 8
        assert -(-frame.data_bytes // BLOCK) * BLOCK == hdu._data_size  # astropy counts the padding
        assert frame.instrument == ((header.get("INSTRUME") or "").strip() or None)


@needs_realdata
@pytest.mark.filterwarnings("ignore::astropy.utils.exceptions.AstropyUserWarning")  # MaxIm wraps a comment
@pytest.mark.parametrize("name", sorted(REAL_HEADERS))
def test_real_header(name):
    text = (REALDATA / "headers" / name).read_text()
    frame = frame_from_header_text(text, name)
    assert_facts(frame, REAL_HEADERS[name])
    header = fits.Header.fromstring(text, sep="\n")
    assert frame.naxis == header["NAXIS"]


@needs_realdata
def test_real_header_details():
    def read(name: str) -> Frame:
        return frame_from_header_text((REALDATA / "headers" / name).read_text(), name)

    seestar = read("header_seestar.hdr")
    assert (seestar.naxis, seestar.planes) == (3, 3)
    assert seestar.header_value("STACKCNT") == 187
    assert read("header_apt.hdr").set_temperature == -15.0
    assert read("header_app2.hdr").instrument == "ZWO ASI294MC Pro"
    assert read("header_dwarflab.hdr").software == "DWARFLAB"
    assert read("header_maximdl.hdr").software.startswith("MaxIm DL Version 5.24")
    assert read("header_nina.hdr").software == "N.I.N.A. 1.10.2.90"
    assert read("sgp_header.hdr").software == "Sequence Generator Pro v3.1.0.479"


@needs_realdata
@pytest.mark.parametrize(
    "name, kind",
    [("Flat_0001.fits", Kind.FLAT), ("Dark_Flat_0001.fits", Kind.DARK_FLAT), ("Capture_00001.fits", Kind.UNKNOWN),
     ("Bias_0002.fits", Kind.BIAS), ("M31_Light_0003.fits", Kind.LIGHT)],
)
def test_sharpcap_kind_comes_from_the_file_name(name, kind):
    text = (REALDATA / "headers" / "header_sharpcap.hdr").read_text()
    assert frame_from_header_text(text, f"/captures/2019-04-29/{name}").kind is kind


# ------------------------------------------------------------------ dialects not in realdata


def write_fits(path: Path, cards: dict, shape=(8, 12), dtype=np.uint16, value=1000) -> Path:
    """A small FITS file written by astropy, with the given header cards."""
    header = fits.Header()
    for key, val in cards.items():
        header[key] = val
    data = np.full(shape, value, dtype=dtype)
    fits.PrimaryHDU(data, header).writeto(path)
    return path


DIALECTS = {
    # name: (cards, (kind, size, binning, filter, exposure, temperature, date))
    "nina": (
        {"IMAGETYP": "FLAT", "EXPOSURE": 2.5, "EXPTIME": 2.5, "XBINNING": 2, "YBINNING": 2, "FILTER": "Ha",
         "CCD-TEMP": -10.0, "SET-TEMP": -10.0, "DATE-OBS": "2024-03-01T19:02:03.123", "SWCREATE": "N.I.N.A. 3.0.0.9001"},
        (Kind.FLAT, (12, 8), (2, 2), "Ha", 2.5, -10.0, dt("2024-03-01T19:02:03.123")),
    ),
    "sgp": (
        {"IMAGETYP": "Flat Frame", "EXPOSURE": 1.25, "CCDXBIN": 2, "CCDYBIN": 2, "FILTER": "Lum",
         "CCD-TEMP": -15.2, "DATE-OBS": "2020-05-30T00:22:49.0968820", "CREATOR": "Sequence Generator Pro v3.1"},
        (Kind.FLAT, (12, 8), (2, 2), "Lum", 1.25, -15.2, dt("2020-05-30T00:22:49.096882")),
    ),
    "kstars-indi": (
        {"IMAGETYP": "Flat Frame", "FRAME": "Flat", "EXPTIME": 0.5, "XBINNING": 1, "YBINNING": 1,
         "FILTER": "Red", "CCD-TEMP": -9.87, "DATE-OBS": "2023-11-02T18:01:02.345", "INSTRUME": "ZWO CCD ASI533MM Pro"},
        (Kind.FLAT, (12, 8), (1, 1), "Red", 0.5, -9.87, dt("2023-11-02T18:01:02.345")),
    ),
    "apt": (
        {"IMAGETYP": "Flat Frame", "EXPTIME": 3.0, "XBINNING": 1, "YBINNING": 1, "CCD-TEMP": 0.5, "SET-TEMP": 0.0,
         "DATE-OBS": "2018-09-17T21:04:46", "SWCREATE": "Astro Photography Tool - APT v.3.54.1"},
        (Kind.FLAT, (12, 8), (1, 1), None, 3.0, 0.5, dt("2018-09-17T21:04:46")),
    ),
    "asiair": (
        {"IMAGETYP": "Flat", "EXPOSURE": 0.0123, "XBINNING": 1, "YBINNING": 1, "FILTER": "OIII", "CCD-TEMP": -20.0,
         "DATE-OBS": "2024-02-10T10:11:12.000000", "INSTRUME": "ZWO ASI2600MM Pro"},
        (Kind.FLAT, (12, 8), (1, 1), "OIII", 0.0123, -20.0, dt("2024-02-10T10:11:12")),
    ),
    "maxim": (
        {"IMAGETYP": "Flat Field", "EXPTIME": 5.0, "EXPOSURE": 5.0, "XBINNING": 3, "YBINNING": 3, "FILTER": "SII",
         "CCD-TEMP": -35.0, "DATE-OBS": "2018-07-04T14:03:03", "SWCREATE": "MaxIm DL Version 6.18"},
        (Kind.FLAT, (12, 8), (3, 3), "SII", 5.0, -35.0, dt("2018-07-04T14:03:03")),
    ),
    "theskyx": (
        {"PICTTYPE": 4, "EXPTIME": 1.0, "XBINNING": 1, "YBINNING": 1, "FILTER": "B", "CCD-TEMP": -5.0,
         "DATE-OBS": "2021-01-01T01:01:01.001", "SWCREATE": "TheSkyX Professional Edition"},
        (Kind.FLAT, (12, 8), (1, 1), "B", 1.0, -5.0, dt("2021-01-01T01:01:01.001")),
    ),
    "observatory": (
        {"IMAGETYP": "SKYFLAT", "OBSTYPE": "SKYFLAT", "EXPTIME": 4.5, "CCDSUM": "3 3", "FILTNAME": "VR",
         "DETTEMP": -101.75, "DATE-OBS": "2019-03-26", "UTC-OBS": "02:06:07.79", "CREATOR": "LOIS"},
        (Kind.FLAT, (12, 8), (3, 3), "VR", 4.5, -101.75, dt("2019-03-26T02:06:07.790")),
    ),
    "dome-flat": (
        {"IMAGETYP": "DOMEFLAT", "EXPTIME": 12.0, "CCDSUM": "2 2", "FILTNAME": "R", "DETTEMP": -110.0,
         "DATE-OBS": "2019-03-27"},
        (Kind.FLAT, (12, 8), (2, 2), "R", 12.0, -110.0, dt("2019-03-27T00:00:00")),
    ),
    "dwarf": (
        {"EXP": 0.2, "BINNING": "2*2", "DATE-OBS": "2023-06-10T21:38:19.442", "TELESCOP": "DWARFII"},
        (Kind.FLAT, (12, 8), (2, 2), None, 0.2, None, dt("2023-06-10T21:38:19.442")),
    ),
}


@pytest.mark.parametrize("dialect", sorted(DIALECTS))
def test_dialect(tmp_path, dialect):
    cards, expected = DIALECTS[dialect]
    # DWARF has no IMAGETYP: its kind comes from the file name.
    path = write_fits(tmp_path / f"{dialect}_flat_001.fits", cards)
    frame = read_frame(path)
    assert_facts(frame, expected)
    assert frame.bitpix == 16 and frame.bzero == 32768  # astropy's uint16 convention


@pytest.mark.parametrize(
    "imagetype, kind",
    [
        ("FLAT", Kind.FLAT), ("Flat", Kind.FLAT), ("Flat Frame", Kind.FLAT), ("Flat Field", Kind.FLAT),
        ("SKYFLAT", Kind.FLAT), ("DOMEFLAT", Kind.FLAT), ("Twilight Flat", Kind.FLAT),
        ("Dark Flat", Kind.DARK_FLAT), ("DARKFLAT", Kind.DARK_FLAT), ("Flat Dark", Kind.DARK_FLAT),
        ("Master Flat", Kind.MASTER), ("MASTERFLAT", Kind.MASTER), ("Master Dark", Kind.MASTER),
        ("Dark Frame", Kind.DARK), ("DARK", Kind.DARK), ("Bias Frame", Kind.BIAS), ("ZERO", Kind.BIAS),
        ("Offset", Kind.BIAS), ("Light Frame", Kind.LIGHT), ("OBJECT", Kind.LIGHT), ("LIGHT", Kind.LIGHT),
    ],
)
def test_imagetype_words(imagetype, kind):
    assert kind_from_imagetype(imagetype) is kind
    text = f"SIMPLE  = T\nBITPIX  = 16\nNAXIS   = 2\nNAXIS1  = 10\nNAXIS2  = 10\nIMAGETYP= '{imagetype}'\nEND"
    assert frame_from_header_text(text, "x.fits").kind is kind


@pytest.mark.parametrize(
    "pict, imagetype, kind",
    [(1, None, Kind.LIGHT), (2, None, Kind.BIAS), (3, None, Kind.DARK), (4, None, Kind.FLAT),
     (2, "Light Frame", Kind.BIAS),  # PICTTYPE first, as the original does
     (4, "Master Flat", Kind.MASTER), (3, "Dark Flat", Kind.DARK_FLAT)],
)
def test_theskyx_picttype(pict, imagetype, kind):
    lines = ["SIMPLE  = T", "BITPIX  = 16", "NAXIS   = 2", "NAXIS1  = 10", "NAXIS2  = 10", f"PICTTYPE= {pict}"]
    if imagetype:
        lines.append(f"IMAGETYP= '{imagetype}'")
    assert frame_from_header_text("\n".join(lines), "capture.fit").kind is kind


@pytest.mark.parametrize(
    "cards",
    [{"CREATOR": "flatd 0.1.0", "IMAGETYP": "Flat Frame"}, {"NCOMBINE": 20, "IMAGETYP": "Flat Frame"},
     {"CALFRAME": "MasterFlat", "IMAGETYP": "Flat"}, {"STACKCNT": 12, "IMAGETYP": "Flat"}],
)
def test_stacked_frames_are_masters(tmp_path, cards):
    frame = read_frame(write_fits(tmp_path / "stack.fits", cards))
    assert frame.kind is Kind.MASTER


def test_single_frame_ncombine_is_not_a_master(tmp_path):
    frame = read_frame(write_fits(tmp_path / "f.fits", {"IMAGETYP": "FLAT", "NCOMBINE": 1}))
    assert frame.kind is Kind.FLAT


# ------------------------------------------------------------------ keyword fallbacks


def test_keyword_map_from_mapping_puts_overrides_first():
    kmap = KeywordMap.from_mapping({"filter": ["fwheel"], "temperature": ["CCD-TEMP", "AMBTEMP"]})
    assert kmap.filter[0] == "FWHEEL"
    assert kmap.filter[1:] == DEFAULT_KEYWORDS.filter
    assert kmap.temperature[:2] == ("CCD-TEMP", "AMBTEMP")
    assert kmap.temperature.count("CCD-TEMP") == 1
    assert kmap.exposure == DEFAULT_KEYWORDS.exposure
    assert KeywordMap.from_mapping(None) == DEFAULT_KEYWORDS
    assert KeywordMap.from_mapping({}) == DEFAULT_KEYWORDS


def test_filter_in_fwheel_read_through_the_rules_file(tmp_path):
    path = write_fits(tmp_path / "flat.fits", {"IMAGETYP": "Flat", "FWHEEL": "Ha 7nm"})
    assert read_frame(path).filter is None
    rules = parse_rules("keywords:\n  filter: [FWHEEL]\n", tmp_path / "flatd.yaml")
    assert read_frame(path, rules.keyword_map()).filter == "Ha 7nm"
    assert read_frame(path, KeywordMap.from_mapping({"filter": ["FWHEEL"]})).filter == "Ha 7nm"


def test_keyword_override_wins_over_a_default_keyword(tmp_path):
    path = write_fits(tmp_path / "flat.fits", {"IMAGETYP": "Flat", "FILTER": "L", "FWHEEL": "Ha", "EXPTIME": 2.0,
                                               "EXPOSURE": 3.0, "FRAMETYP": "Dark"})
    assert read_frame(path).filter == "L"
    assert read_frame(path).exposure == 3.0  # EXPOSURE before EXPTIME, as the original
    rules = parse_rules("keywords:\n  filter: [FWHEEL]\n  exposure: [EXPTIME]\n  imagetype: [FRAMETYP]\n")
    frame = read_frame(path, rules.keyword_map())
    assert (frame.filter, frame.exposure, frame.kind) == ("Ha", 2.0, Kind.DARK)


# ------------------------------------------------------------------ small parsers


@pytest.mark.parametrize(
    "field, value",
    [("'SKYFLAT '", "SKYFLAT"), ("'O''Hara'  / name", "O'Hara"), ("''", ""), ("'a/b' / c", "a/b"),
     ("16 / bits", 16), ("-32", -32), ("2.82", 2.82), ("1.0D2", 100.0), ("3.00000000000E+002", 300.0),
     ("T", True), ("F / no", False), ("", None), ("/ comment only", None), ("32768.", 32768.0)],
)
def test_parse_card_value(field, value):
    parsed = parse_card_value(" " + field)
    assert parsed == value and type(parsed) is type(value)


@pytest.mark.parametrize(
    "text, expected",
    [("2019-03-26", dt("2019-03-26T00:00:00")), ("2023-01-06T00:17:06.5845178", dt("2023-01-06T00:17:06.584517")),
     ("2021-03-02T20:19:00.455", dt("2021-03-02T20:19:00.455")), ("2020-05-30 00:22:49", dt("2020-05-30T00:22:49")),
     ("04/07/18", None), ("2019-13-40", None), ("", None), (None, None)],
)
def test_parse_date(text, expected):
    assert parse_date(text) == expected


@pytest.mark.parametrize(
    "cards, binning",
    [({"XBINNING": 2, "YBINNING": 2}, (2, 2)), ({"XBINNING": 2}, (2, 2)), ({"CCDXBIN": 4, "CCDYBIN": 4}, (4, 4)),
     ({"CCDSUM": "3 3"}, (3, 3)), ({"CCDSUM": "1 2"}, (1, 2)), ({"BINNING": "2*2"}, (2, 2)),
     ({"BINNING": "2x2"}, (2, 2)), ({"BINNING": 3}, (3, 3)), ({}, (1, 1)),
     # nonsense factors count as missing
     ({"XBINNING": 0, "YBINNING": 0}, (1, 1)), ({"XBINNING": -2}, (1, 1)), ({"XBINNING": 1.5}, (1, 1)),
     ({"CCDSUM": "0 0"}, (1, 1)), ({"BINNING": True}, (1, 1)), ({"XBINNING": 0, "CCDSUM": "2 2"}, (2, 2))],
)
def test_parse_binning(cards, binning):
    assert parse_binning(cards) == binning


# ------------------------------------------------------------------ bad input


def card(key: str, value: str) -> str:
    return f"{key:<8}= {value:>20}".ljust(80)


def raw_fits(cards: list[str], data: bytes = b"", pad: bool = True) -> bytes:
    """Header cards (80-character strings) + END, padded, then the data."""
    header = "".join(c.ljust(80) for c in cards) + "END".ljust(80)
    header += " " * (-len(header) % BLOCK)
    body = data + (b"\0" * (-len(data) % BLOCK) if pad else b"")
    return header.encode("ascii") + body


def good_cards(**overrides: str) -> list[str]:
    values = {"SIMPLE": "T", "BITPIX": "16", "NAXIS": "2", "NAXIS1": "10", "NAXIS2": "4", "IMAGETYP": "'FLAT'"}
    values.update(overrides)
    return [card(k, v) for k, v in values.items()]


GOOD = raw_fits(good_cards(), b"\0" * 80)


def make_bad(tmp_path: Path, case: str) -> Path:
    path = tmp_path / "bad.fits"
    if case == "zero-length":
        path.write_bytes(b"")
    elif case == "truncated-header":
        path.write_bytes(GOOD[:1000])
    elif case == "header-without-end":
        path.write_bytes(b"".join(c.encode() for c in good_cards()) + b" " * (BLOCK * 3 - 480))
    elif case == "truncated-data":
        big = raw_fits(good_cards(NAXIS1="100", NAXIS2="100"), b"\1" * 20000)
        path.write_bytes(big[: BLOCK + 5000])
    elif case == "not-fits":
        path.write_text("These are my observing notes, not a FITS file.\n" * 100)
    elif case == "cube":
        fits.PrimaryHDU(np.zeros((3, 4, 5), dtype=np.uint16)).writeto(path)
    elif case == "bitpix-12":
        path.write_bytes(raw_fits(good_cards(BITPIX="12"), b"\0" * 80))
    elif case == "naxis1-string":
        path.write_bytes(raw_fits(good_cards(NAXIS1="'abc'"), b"\0" * 80))
    elif case == "naxis-float":
        path.write_bytes(raw_fits(good_cards(NAXIS="2.5"), b"\0" * 80))
    elif case == "naxis-missing":
        path.write_bytes(raw_fits([c for c in good_cards() if not c.startswith("NAXIS ")], b"\0" * 80))
    elif case == "naxis2-negative":
        path.write_bytes(raw_fits(good_cards(NAXIS2="-4"), b"\0" * 80))
    elif case == "no-pixels":
        path.write_bytes(raw_fits(good_cards(NAXIS1="0")))
    elif case == "no-image":
        path.write_bytes(raw_fits(good_cards(NAXIS="0")))
    elif case == "binary-garbage":
        path.write_bytes(b"SIMPLE  =                    T" + bytes(range(256)) * 40)
    elif case == "directory":
        path.mkdir()
    elif case == "missing":
        pass
    else:  # pragma: no cover
        raise AssertionError(case)
    return path


BAD_CASES = {
    "zero-length": "empty file",
    "truncated-header": "truncated header",
    "header-without-end": "truncated header",
    "truncated-data": "truncated data: header promises 22880 bytes, file has 7880",
    "not-fits": "not a FITS file",
    "cube": "3-D image (5x4x3)",
    "bitpix-12": "BITPIX = 12 is not a FITS data type",
    "naxis1-string": "NAXIS1 = 'abc' is not an integer",
    "naxis-float": "NAXIS = 2.5 is not an integer",
    "naxis-missing": "missing NAXIS keyword",
    "naxis2-negative": "NAXIS2 = -4 is negative",
    "no-pixels": "no pixels",
    "no-image": "no image data",
    "binary-garbage": "truncated header",
    "directory": "a directory",
    "missing": "No such file",
}


def snapshot(path: Path) -> tuple:
    if path.is_dir():
        return ("dir", sorted(os.listdir(path)), path.stat().st_mtime_ns)
    if not path.exists():
        return ("missing",)
    st = path.stat()
    return ("file", digest(path), st.st_size, st.st_mtime_ns, st.st_mode)


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_is_reported_and_left_alone(tmp_path, case):
    path = make_bad(tmp_path, case)
    before = snapshot(path)
    siblings = sorted(os.listdir(tmp_path))
    with pytest.raises(FrameError) as info:
        read_frame(path)
    assert BAD_CASES[case] in info.value.reason
    assert info.value.path == path
    assert str(path) in str(info.value)
    assert snapshot(path) == before
    assert sorted(os.listdir(tmp_path)) == siblings  # nothing moved, nothing added


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_permissions(tmp_path):
    path = tmp_path / "locked.fits"
    path.write_bytes(GOOD)
    path.chmod(0)
    try:
        with pytest.raises(FrameError, match="Permission denied"):
            read_frame(path)
        assert path.exists() and path.stat().st_mode & 0o777 == 0
    finally:
        path.chmod(0o644)
    assert path.read_bytes() == GOOD


def test_read_error_becomes_frame_error(tmp_path, monkeypatch):
    """An I/O error in the middle of the header (a share going away) is a FrameError too."""
    path = tmp_path / "f.fits"
    path.write_bytes(GOOD)

    class Failing:
        def __init__(self, handle):
            self.handle = handle

        def read(self, n=-1):
            raise OSError(5, "Input/output error")

        def seek(self, *args):
            return self.handle.seek(*args)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

    real_open = open
    monkeypatch.setattr(frames, "open", lambda p, mode="r": Failing(real_open(p, mode)), raising=False)
    with pytest.raises(FrameError, match="read error: Input/output error"):
        read_frame(path)


MUTABLE_KEYS = ("BITPIX", "NAXIS", "NAXIS1", "NAXIS2", "IMAGETYP", "EXPTIME", "XBINNING", "DATE-OBS", "CCD-TEMP")
VALUE_TEXT = st.one_of(
    st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=20),
    st.sampled_from(["'abc'", "-1", "0", "999", "1e400", "nan", "T", "''", "3.5", "99999999999999999999", "'1 2'"]),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(MUTABLE_KEYS), value=VALUE_TEXT, cut=st.integers(min_value=0, max_value=BLOCK + 200))
def test_any_damaged_header_gives_a_frame_or_a_frame_error(tmp_path, key, value, cut):
    cards = [card(k, v) for k, v in {
        "SIMPLE": "T", "BITPIX": "16", "NAXIS": "2", "NAXIS1": "10", "NAXIS2": "4", "IMAGETYP": "'FLAT'",
        "EXPTIME": "1.5", "XBINNING": "2", "DATE-OBS": "'2024-01-01T00:00:00'", "CCD-TEMP": "-10.0"}.items()]
    cards = [card(key, value) if c.startswith(f"{key:<8}=") else c for c in cards]
    raw = raw_fits(cards, b"\0" * 80)
    path = tmp_path / "fuzz.fits"
    path.write_bytes(raw[: len(raw) - cut] if cut else raw)
    try:
        frame = read_frame(path)
    except FrameError as exc:
        assert exc.reason
    else:
        assert frame.width > 0 and frame.height > 0


def test_read_frames_collects_the_bad_and_goes_on(tmp_path):
    good1 = write_fits(tmp_path / "a.fits", {"IMAGETYP": "FLAT"})
    bad1 = tmp_path / "b.fits"
    bad1.write_bytes(b"")
    (tmp_path / "sub").mkdir()
    bad2 = make_bad(tmp_path / "sub", "not-fits")
    good2 = write_fits(tmp_path / "c.fits", {"IMAGETYP": "DARK"})
    found, skipped = read_frames([good1, bad1, bad2, good2])
    assert [f.path for f in found] == [good1, good2]
    assert [(s.path, s.reason) for s in skipped] == [
        (bad1, "empty file (zero length)"),
        (bad2, "not a FITS file (no SIMPLE card at the start)"),
    ]


def test_missing_padding_is_not_truncation(tmp_path):
    """Some writers leave out the padding of the last block: every pixel is there."""
    path = tmp_path / "unpadded.fits"
    path.write_bytes(raw_fits(good_cards(), b"\0" * 80, pad=False))
    frame = read_frame(path)
    assert frame.file_size == BLOCK + 80 == frame.required_bytes


# ------------------------------------------------------------------ compressed and extensions


def test_tile_compressed_fz(tmp_path):
    data = np.arange(40 * 60, dtype=np.uint16).reshape(40, 60)
    header = fits.Header({"IMAGETYP": "Flat Frame", "FILTER": "R", "EXPTIME": 2.0, "XBINNING": 2, "YBINNING": 2})
    path = tmp_path / "flat.fits.fz"
    fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(data, header)]).writeto(path)
    frame = read_frame(path)
    assert (frame.kind, frame.width, frame.height, frame.binning) == (Kind.FLAT, 60, 40, "2x2")
    assert frame.compressed and frame.hdu_index == 1 and frame.bitpix == 16
    assert (frame.filter, frame.exposure) == ("R", 2.0)
    assert list(iter_fits_files(tmp_path)) == [path]

    cut = tmp_path / "cut.fits.fz"
    cut.write_bytes(path.read_bytes()[: frame.data_offset + 10])
    with pytest.raises(FrameError, match="truncated compressed data"):
        read_frame(cut)


def test_image_extension(tmp_path):
    path = tmp_path / "ext.fits"
    hdu = fits.ImageHDU(np.zeros((5, 7), dtype=np.float32), fits.Header({"IMAGETYP": "FLAT"}))
    fits.HDUList([fits.PrimaryHDU(), hdu]).writeto(path)
    frame = read_frame(path)
    assert (frame.kind, frame.width, frame.height, frame.bitpix, frame.hdu_index) == (Kind.FLAT, 7, 5, -32, 1)


# ------------------------------------------------------------------ header-only reads


class CountingFile:
    def __init__(self, handle):
        self.handle = handle
        self.bytes_read = 0

    def read(self, n=-1):
        data = self.handle.read(n)
        self.bytes_read += len(data)
        return data

    def seek(self, *args):
        return self.handle.seek(*args)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.close()


@pytest.fixture
def counted_reads(monkeypatch):
    handles: list[CountingFile] = []
    real_open = open

    def counting_open(path, mode="r", *args, **kwargs):
        handle = CountingFile(real_open(path, mode, *args, **kwargs))
        handles.append(handle)
        return handle

    monkeypatch.setattr(frames, "open", counting_open, raising=False)
    return handles


def test_header_only_read_of_a_2gb_sparse_file(tmp_path, counted_reads):
    """A 2 GiB image (sparse on disk) is read by its header alone."""
    path = tmp_path / "huge.fits"
    header = raw_fits(good_cards(NAXIS1="32768", NAXIS2="32768"))
    with open(path, "wb") as handle:
        handle.write(header)
        handle.truncate(len(header) + 32768 * 32768 * 2)
    frame = read_frame(path)
    assert (frame.width, frame.height, frame.data_bytes) == (32768, 32768, 2**31)
    assert frame.file_size == len(header) + 2**31
    assert sum(h.bytes_read for h in counted_reads) <= frame.data_offset + 10
    assert frame.data_offset == BLOCK


@needs_realdata
def test_header_only_read_of_real_frames(counted_reads):
    path = REALDATA / "lowell-nasa42" / "flat" / "20190326.0100.fits"
    frame = read_frame(path)
    assert frame.data_offset == 14400
    assert sum(h.bytes_read for h in counted_reads) <= frame.data_offset + 10 < frame.file_size / 100


def test_header_only_read_of_a_compressed_file(tmp_path, counted_reads):
    path = tmp_path / "f.fits.fz"
    data = np.random.default_rng(0).integers(0, 60000, size=(200, 300)).astype(np.uint16)
    fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(data)]).writeto(path)
    frame = read_frame(path)
    assert sum(h.bytes_read for h in counted_reads) <= frame.data_offset + 11
    assert frame.data_bytes > 10 * BLOCK


# ------------------------------------------------------------------ finding files


def test_iter_fits_files_skips_hidden_temporary_and_excluded(tmp_path):
    names = ["a.fits", "b.FIT", "c.fts", "d.fits.fz", ".hidden.fits", "~lock.fits", "e.fits.tmp",
             "f.fits.part", "g.tmp", "notes.txt", "h.fits.crdownload", "sub/i.fits", "sub/deeper/j.fit",
             ".cache/k.fits", "masters/FLAT-L.fits", "originals-2024/l.fits"]
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "folder.fits").mkdir()  # a directory with a FITS name is not a file

    def rel(paths):
        return [p.relative_to(tmp_path).as_posix() for p in paths]

    assert rel(iter_fits_files(tmp_path)) == [
        "a.fits", "b.FIT", "c.fts", "d.fits.fz", "masters/FLAT-L.fits", "originals-2024/l.fits",
        "sub/i.fits", "sub/deeper/j.fit",
    ]
    assert rel(iter_fits_files(tmp_path, recursive=False)) == ["a.fits", "b.FIT", "c.fts", "d.fits.fz"]
    excluded = [tmp_path / "masters", tmp_path / "originals-2024"]
    assert rel(iter_fits_files(tmp_path, exclude=excluded)) == [
        "a.fits", "b.FIT", "c.fts", "d.fits.fz", "sub/i.fits", "sub/deeper/j.fit",
    ]
    assert rel(iter_fits_files(tmp_path / "a.fits")) == ["a.fits"]
    assert rel(iter_fits_files(tmp_path / "~lock.fits")) == []


def test_a_nul_in_the_name_is_a_frame_error():
    with pytest.raises(FrameError, match="cannot read: embedded null byte"):
        read_frame("flat\0.fits")
