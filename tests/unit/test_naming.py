"""Output names from templates, made safe (flatd.output.naming)."""

from __future__ import annotations

import math
from datetime import datetime
from pathlib import Path

import pytest

from flatd.config import NAME_FIELDS, Output
from flatd.ingest.frames import frame_from_header_text
from flatd.output.naming import (check_output_template, is_compressed_name, master_name, mean_as_written, name_fields,
                                 numbered_name, safe_component, session_time, split_name, temperature_text)
from framefactory import make_frame

WHEN = datetime(2026, 11, 25, 1, 2, 3)
REALDATA = Path(__file__).resolve().parents[2].parent / "shared" / "realdata"


# ------------------------------------------------------------------- safe_component


@pytest.mark.parametrize(
    "text, expected",
    [
        ("../../x", "x"),
        ("a/b", "a_b"),
        ("a\\b", "a_b"),
        ("..", "none"),
        (".", "none"),
        ("", "none"),
        (None, "none"),
        ("Hα", "Ha"),
        ("OIII", "OIII"),
        ("R G B", "R_G_B"),
        ("C:\\Windows", "C_Windows"),
        ("a\x00b\nc", "a_b_c"),
        (".hidden", "hidden"),
        ("__x__", "x"),
        ("-10.0", "-10.0"),
        ("SigmaClip2.0", "SigmaClip2.0"),
        ("a..b", "a.b"),
        ("CON", "CON_"),
        ("  ", "none"),
    ],
)
def test_safe_component(text, expected):
    assert safe_component(text) == expected


def test_safe_component_fallback_and_length():
    assert safe_component("///", fallback="nofilter") == "nofilter"
    long = safe_component("x" * 1000)
    assert long == "x" * 64
    assert len(safe_component("ab/" * 100)) <= 64


@pytest.mark.parametrize("text", ["../../x", "..", "/", "a/../../b", "..\\..\\x", "\x00", "....//....//", "é/è", "../" * 40])
def test_safe_component_never_a_path(text):
    out = safe_component(text)
    assert "/" not in out and "\\" not in out and "\0" not in out
    assert out not in (".", "..")
    assert not out.startswith(".")
    assert Path(out).name == out
    assert out.isascii()


# ------------------------------------------------------------------- names


def fields(**kw):
    base = name_fields([make_frame()], "SigmaClip2.0", "g1", WHEN)
    base.update(kw)
    return base


def test_name_fields_cover_config():
    values = name_fields([make_frame(), make_frame("b.fits", temperature=-10.2, exposure=3.0)], "SigmaClip2.0", "g1", WHEN)
    assert set(values) == set(NAME_FIELDS)
    assert values["filter"] == "L"
    assert values["binning"] == "1x1"
    assert values["size"] == "4144x2822"
    assert values["method"] == "SigmaClip2.0"
    assert values["date"] == "20261124-183000"  # earliest DATE-OBS, not the time of combining
    assert values["time"] == "183000"
    assert values["datetime"] == "20261124T183000"
    assert values["temperature"] == "-10.1"
    assert values["exposure"] == "2.5"
    assert values["instrument"] == "ZWO ASI294MM Pro"
    assert values["count"] == "2"
    assert values["group"] == "g1"


def test_name_fields_missing_values():
    frame = make_frame(filter=None, temperature=None, exposure=None, date=None, instrument=None, telescope=None)
    values = name_fields([frame], "Mean", "", WHEN)
    assert values["filter"] == "nofilter"
    assert values["temperature"] == "na"
    assert values["exposure"] == "na"
    assert values["date"] == "20261125-010203"  # no DATE-OBS: the time given
    assert values["instrument"] == "none"


def test_name_fields_most_common_filter_and_no_negative_zero():
    frames = [make_frame(filter="R"), make_frame(filter="G"), make_frame(filter="G"),
              make_frame(temperature=-0.04)]
    values = name_fields(frames[:3], "Median", "g", WHEN)
    assert values["filter"] == "G"
    assert name_fields([frames[3]], "Median", "g", WHEN)["temperature"] == "0.0"


def test_default_name_signs_the_temperature_in_place_of_the_dash():
    name = master_name(Output().name, fields())
    assert name == "FLAT-L-1x1-4144x2822-SigmaClip2.0-20261124-183000-10.0C.fits"
    assert master_name(Output().name, fields(temperature="20.0")).endswith("-183000+20.0C.fits")
    assert master_name(Output().name, fields(temperature="0.0")).endswith("-183000+0.0C.fits")
    assert master_name(Output().name, fields(temperature="na")).endswith("-183000-naC.fits")
    # elsewhere a temperature is written as it is
    assert master_name("T{temperature}_{temperature}", fields(temperature="20.0")) == "T20.0_20.0.fits"
    assert master_name("T-{temperature:.0f}C", fields()) == "T-10C.fits"


def test_names_differ_for_groups_differing_only_in_size():
    template = Output().name
    a = name_fields([make_frame(width=4144, height=2822)], "Mean", "g", WHEN)
    b = name_fields([make_frame(width=2072, height=1411)], "Mean", "g", WHEN)
    assert master_name(template, a) != master_name(template, b)


def test_master_name_sanitizes_every_field():
    name = master_name("{filter}_{instrument}_{telescope}.fits",
                       fields(filter="../../x", instrument="a/b\\c", telescope=".."))
    assert name == "x_a_b_c_none.fits"
    assert Path(name).name == name


def test_master_name_raw_values_and_format_specs():
    raw = {"filter": None, "temperature": -9.96, "date": WHEN, "exposure": 1.5, "count": 7}
    assert master_name("{filter}_{temperature}_{date}_{exposure}_{count}", raw) == \
        "nofilter_-10.0_20261125-010203_1.5_7.fits"
    assert master_name("{temperature:.0f}_{count:03d}_{date:%Y-%m-%d}", fields(count="7")) == \
        "-10_007_2026-11-24.fits"


@pytest.mark.parametrize("template", ["x.fit", "x.fts", "x.FITS", "x.fits"])
def test_master_name_keeps_fits_extension(template):
    assert master_name(template, fields()) == template


def test_master_name_appends_fits():
    assert master_name("FLAT-{filter}", fields()) == "FLAT-L.fits"
    assert master_name("FLAT-{filter}-{exposure}", fields(exposure="2.5")) == "FLAT-L-2.5.fits"
    assert master_name("flat v1.2", fields()) == "flat v1.2.fits"


@pytest.mark.parametrize("value", ["x.fits.fz", "x.png", "x.FITS", "x.xisf"])
def test_a_header_value_never_chooses_the_format(value):
    assert master_name("FLAT-{filter}", fields(filter=value)) == f"FLAT-{value}.fits"


@pytest.mark.parametrize("template", ["sub/{filter}.fits", "../{filter}.fits", "/abs/{filter}.fits",
                                      "a\\{filter}.fits", ".{filter}.fits", "a:{filter}.fits", "{nope}.fits"])
def test_master_name_rejects_non_plain_templates(template):
    with pytest.raises(ValueError):
        master_name(template, fields())


def test_master_name_limits_length():
    long = {k: "y" * 64 for k in NAME_FIELDS}
    name = master_name("{" + "}-{".join(NAME_FIELDS) + "}", long)
    assert name.endswith(".fits")
    assert len(name.encode()) <= 240


# ------------------------------------------------------------------- extensions


@pytest.mark.parametrize("template, ext", [
    ("m.fits", ".fits"), ("m.fit", ".fit"), ("m.FTS", ".FTS"), ("m.fits.fz", ".fits.fz"),
    ("m-{filter}.FITS.FZ", ".FITS.FZ"),
])
def test_master_name_keeps_a_master_extension(template, ext):
    name = master_name(template, fields())
    assert name.endswith(ext) and not name.endswith(ext + ".fits")
    assert is_compressed_name(name) == ext.lower().endswith(".fz")


@pytest.mark.parametrize("template", ["master.png", "FLAT-{filter}.png", "m.fits.gz", "m.fz", "m.fit.fz",
                                      "m.jpeg ", "{filter}.tiff"])
def test_unknown_extensions_are_refused(template):
    with pytest.raises(ValueError, match=r"-o .*cannot write '\.\w+' files; a master is \.fits, \.fit, \.fts "
                                         r"\(plain FITS\), \.fits\.fz .* or \.xisf"):
        check_output_template(template, "-o")
    with pytest.raises(ValueError, match="output.name"):
        master_name(template, fields())


def test_unknown_extension_in_the_rules_file():
    from flatd.config import ConfigError, parse_rules

    with pytest.raises(ConfigError, match=r"output.name.*cannot write '.tif' files"):
        parse_rules('output: {name: "FLAT-{filter}.tif"}')
    assert parse_rules('output: {name: "FLAT-{filter}.xisf"}').output.name.endswith(".xisf")
    assert parse_rules('output: {name: "FLAT-{filter}.fits.fz"}').output.name.endswith(".fits.fz")


def test_long_compressed_name_keeps_its_extension():
    name = master_name("{" + "}-{".join(NAME_FIELDS) + "}.fits.fz", {k: "y" * 64 for k in NAME_FIELDS})
    assert name.endswith("y.fits.fz") and len(name.encode()) <= 240


@pytest.mark.parametrize("name, numbered", [
    ("m.fits", "m-2.fits"), ("m.fits.fz", "m-2.fits.fz"), ("M.FITS.FZ", "M-2.FITS.FZ"),
    ("originals-20261125", "originals-20261125-2"), ("a.b.fit", "a.b-2.fit"),
])
def test_numbered_name(name, numbered):
    assert numbered_name(name, 2) == numbered
    assert "".join(split_name(name)) == name


# ------------------------------------------------------------------- numbers


@pytest.mark.parametrize("value, text", [
    (-10.0, "-10.0"), (-10.04, "-10.0"), (-10.05, "-10.1"), (-10.25, "-10.3"), (0.05, "0.1"), (0.15, "0.2"),
    (0.25, "0.3"), (-0.05, "-0.1"), (-0.04, "0.0"), (-0.0, "0.0"), (0.04999999999999999, "0.1"),
    (0.05000000000000001, "0.1"), (20, "20.0"), (math.nan, "na"), (math.inf, "na"),
])
def test_temperature_text(value, text):
    assert temperature_text(value) == text


def test_name_and_inspect_round_a_temperature_alike():
    from flatd.inspect import Row, _cells

    for value in (0.05, 0.15, -0.05, -10.25, 0.04999999999999999):
        frame = make_frame(temperature=value)
        shown = _cells(Row(frame.path, frame, None), adu=False)[6]
        assert shown == name_fields([frame], "Mean", "g", WHEN)["temperature"] + "°C"


@pytest.mark.parametrize("values, mean", [
    ([0.4, 0.4, 0.4], 0.4), ([2.0, 3.0, 4.0], 3.0), ([1.5, 2.25], 1.88), ([1e-05, 1e-05, 1e-05], 1e-05),
    ([0.001, 0.002, 0.004], 0.002), ([0.1, 0.2], 0.2), ([None, 0.4], 0.4), ([math.nan, 0.4], 0.4),
    ([30, 30, 31], 30.3),  # a whole number of seconds counts as written "30.0"
])
def test_mean_as_written(values, mean):
    assert mean_as_written(values) == mean


def test_mean_as_written_of_nothing():
    assert mean_as_written([]) is None and mean_as_written([None, math.inf]) is None


# ------------------------------------------------------------------- dates


def test_date_is_the_local_date_when_the_header_gives_one():
    frames = [make_frame(date=datetime(2026, 11, 25, 1, 30), local_date=datetime(2026, 11, 24, 19, 30)),
              make_frame(date=datetime(2026, 11, 25, 1, 20), local_date=datetime(2026, 11, 24, 19, 20))]
    assert session_time(frames, WHEN) == datetime(2026, 11, 24, 19, 20)
    values = name_fields(frames, "Mean", "g", WHEN)
    assert values["date"] == "20261124-192000" and values["time"] == "192000"
    # no DATE-LOC: the UTC date; no date at all: the time given
    assert name_fields([make_frame(date=datetime(2026, 11, 25, 1, 20))], "Mean", "g", WHEN)["date"] == "20261125-012000"
    assert session_time([make_frame(date=None)], WHEN) == WHEN


@pytest.mark.parametrize("card", ["DATE-LOC= '9999-99-99T99:99:99'", "DATE-LOC= '2021-02-30T10:00:00'",
                                  "DATE-LOC= 20210302", "DATE-LOC= '../../etc'", "DATE-LOC= T",
                                  "DATE-LOC= '" + "9" * 60 + "'"])
def test_absurd_local_dates_are_ignored(card):
    text = "\n".join(["SIMPLE  = T", "BITPIX  = 16", "NAXIS   = 2", "NAXIS1  = 8", "NAXIS2  = 6",
                      "IMAGETYP= 'FLAT'", "DATE-OBS= '2021-03-02T20:19:00.455'", card, "END"])
    frame = frame_from_header_text(text)
    assert frame.local_date is None
    assert name_fields([frame], "Mean", "g", WHEN)["date"] == "20210302-201900"


@pytest.mark.skipif(not (REALDATA / "headers").is_dir(), reason="realdata not available")
def test_nina_header_names_the_local_evening():
    text = (REALDATA / "headers" / "header_nina.hdr").read_text(errors="replace")
    frame = frame_from_header_text(text, "nina.fits")
    assert frame.local_date == datetime(2021, 3, 2, 21, 19, 0, 455000)
    assert name_fields([frame], "Mean", "g", WHEN)["datetime"] == "20210302T211900"
