"""output.carry: keywords copied from the inputs into the master when they all agree."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import yaml
from astropy.io import fits

from flatd.config import Output, Rules, parse_rules as parse
from flatd.ingest.frames import frame_from_header_text
from flatd.output.carry import DEFAULT_CARRY, carry, carry_one, check_carry_key
from flatd.output.masters import master_header, write_master
from flatd.stack.methods import Method
from framefactory import make_frame

MEAN = Method("mean")
EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "flatd.example.yaml"


def card(key: str, value: str) -> str:
    """One header line as a capture program writes it (value field as given)."""
    return f"{key:<8}= {value:>20} / written by a capture program"


def frame_of(name: str, *cards: str):
    """A frame parsed from header lines, as read from a file."""
    text = "\n".join([card("SIMPLE", "T"), card("BITPIX", "16"), card("NAXIS", "2"), card("NAXIS1", "8"),
                      card("NAXIS2", "6"), card("IMAGETYP", "'FLAT'"), *cards])
    return frame_from_header_text(text, Path("/captures") / name)


def header_of(*headers: dict, keys=None) -> fits.Header:
    frames = [make_frame(f"f{i}.fits", headers=h) for i, h in enumerate(headers)]
    return master_header(frames, [], MEAN, "none", carry=keys)


def history(header: fits.Header) -> str:
    return " ".join(str(h).strip() for h in header.get("HISTORY", []))


def count(header: fits.Header, key: str) -> int:
    return sum(1 for c in header.cards if c.keyword == key)


# ------------------------------------------------------------------- agreement


def test_printed_precision_decides_numeric_agreement():
    a = frame_of("a.fits", card("XPIXSZ", "4.63"), card("YPIXSZ", "2.9"), card("GAIN", "120"),
                 card("FOCALLEN", "400"))
    b = frame_of("b.fits", card("XPIXSZ", "4.630"), card("YPIXSZ", "2.90000009536743"), card("GAIN", "120"),
                 card("FOCALLEN", "400.0"))
    h = master_header([a, b], [], MEAN, "none")
    assert h["XPIXSZ"] == 4.63
    assert h["YPIXSZ"] == 2.9  # the coarser value, not 2.90000009536743
    assert h["GAIN"] == 120 and isinstance(h["GAIN"], int)
    assert h["FOCALLEN"] == 400
    assert "not carried" not in history(h)


@pytest.mark.parametrize("values,agree", [
    ((4.63, 4.634), True),        # within half a unit of 0.01
    ((4.63, 4.64), False),        # a whole unit apart
    ((2.9, 2.94), True),          # 2.9 is printed to 0.1: +-0.05
    ((2.9, 2.96), False),
    ((120, 121), False),          # integers: exact
    ((120, 120.4), True),         # 120 is printed to 1: +-0.5
    ((-35.0, -35.000000000000000), True),
    ((1e20, 1.2e20), True),       # 1e+20 is printed to 1e20
])
def test_numeric_tolerance(values, agree):
    verdict = carry_one("K", [{"K": v} for v in values])
    assert verdict.carried is agree, verdict


def test_text_agrees_without_blanks_and_controls():
    verdict = carry_one("BAYERPAT", [{"BAYERPAT": "RGGB    "}, {"BAYERPAT": "RGGB"}, {"BAYERPAT": " RGGB\x00"}])
    assert verdict.value == "RGGB"
    assert not carry_one("BAYERPAT", [{"BAYERPAT": "RGGB"}, {"BAYERPAT": "rggb"}]).carried


# ------------------------------------------------------------------- not carried


def test_disagreement_is_a_history_line_never_a_pick():
    h = header_of({"GAIN": 120, "OFFSET": 30}, {"GAIN": 139, "OFFSET": 30}, {"GAIN": 120, "OFFSET": 30})
    assert "GAIN" not in h
    assert h["OFFSET"] == 30
    text = history(h)
    assert "GAIN not carried: the inputs disagree: 120 (2 inputs), 139 (1 input)" in text
    assert all(len(str(c)) <= 72 for c in h["HISTORY"])


def test_missing_from_some_inputs_is_not_carried():
    h = header_of({"READOUTM": "High Gain"}, {}, {"READOUTM": "High Gain"})
    assert "READOUTM" not in h
    assert "READOUTM not carried: missing from 1 of 3 inputs (others: 'High Gain' (2 inputs))" in history(h)


def test_missing_from_every_input_is_silent():
    h = header_of({}, {})
    assert "not carried" not in history(h)
    assert "GAIN" not in h


def test_set_temp_of_different_set_points_is_not_their_mean():
    frames = [make_frame("a.fits", set_temperature=-10.0, headers={"SET-TEMP": -10.0}),
              make_frame("b.fits", set_temperature=-15.0, headers={"SET-TEMP": -15.0})]
    h = master_header(frames, [], MEAN, "none")
    assert "SET-TEMP" not in h
    assert "SET-TEMP not carried: the inputs disagree" in history(h)


def test_cards_flatd_writes_appear_once():
    headers = {"INSTRUME": "ZWO ASI294MC Pro", "TELESCOP": "RedCat 51", "SET-TEMP": -10.0, "ROWORDER": "TOP-DOWN",
               "FILTER": "L", "EXPTIME": 2.0, "NCOMBINE": 1, "IMAGETYP": "FLAT"}
    frames = [make_frame(f"{i}.fits", instrument="ZWO ASI294MC Pro", headers=headers) for i in range(3)]
    keys = list(DEFAULT_CARRY) + ["FILTER", "EXPTIME", "NCOMBINE", "IMAGETYP"]
    h = master_header(frames, [], MEAN, "none", carry=keys)
    for key in ("INSTRUME", "TELESCOP", "SET-TEMP", "ROWORDER", "FILTER", "EXPTIME", "NCOMBINE", "IMAGETYP"):
        assert count(h, key) == 1, key
    assert h["IMAGETYP"] == "Master Flat" and h["NCOMBINE"] == 3  # flatd's own cards keep flatd's value
    assert h["SET-TEMP"] == -10.0 and h["INSTRUME"] == "ZWO ASI294MC Pro"


def test_instrument_from_camera_fallback_stays_when_no_input_has_instrume():
    frames = [make_frame(f"{i}.fits", instrument="Atik 460EX", headers={"CAMERA": "Atik 460EX"}) for i in range(2)]
    assert master_header(frames, [], MEAN, "none")["INSTRUME"] == "Atik 460EX"


def test_carry_list_is_settable():
    h = header_of({"GAIN": 120, "ROTATANG": 12.5}, {"GAIN": 120, "ROTATANG": 12.5}, keys=["ROTATANG"])
    assert h["ROTATANG"] == 12.5 and "GAIN" not in h
    assert "GAIN" not in header_of({"GAIN": 120}, {"GAIN": 120}, keys=[])


# ------------------------------------------------------------------- hostile values


def test_hostile_values(tmp_path):
    huge = "x" * 10000
    headers = [
        {"OBSERVAT": huge, "SITENAME": "Obs\x1b[31m\x07 \u03b1", "XPIXSZ": float("nan"), "YPIXSZ": float("inf"),
         "GAIN": "120", "OFFSET": "thirty", "FOCALLEN": True, "SITEELEV": 10**30, "SITELAT": "51 3 0.000"},
        {"OBSERVAT": huge, "SITENAME": "Obs\x1b[31m\x07 \u03b1", "XPIXSZ": float("nan"), "YPIXSZ": 4.63,
         "GAIN": 120, "OFFSET": 30, "FOCALLEN": 1, "SITEELEV": 10**30, "SITELAT": 51.05},
    ]
    h = header_of(*headers)
    assert h["OBSERVAT"] == "x" * 68  # cut to one card
    assert h["SITENAME"] == "Obs a"  # no escape sequence, printable ASCII only
    assert h["GAIN"] == 120  # '120' and 120: the same number; a number card wins
    text = history(h)
    for key in ("XPIXSZ", "YPIXSZ", "OFFSET", "FOCALLEN", "SITEELEV", "SITELAT"):
        assert key not in h, key
        assert f"{key} not carried" in text, key
    assert "not a finite number" in text
    assert "'thirty' (1 input), 30 (1 input)" in text
    assert huge not in text
    for c in h.cards:
        assert str(c.value).isascii()
    path = write_master(tmp_path, "m.fits", np.ones((4, 4)), h)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with fits.open(path, checksum=True) as hdul:
            assert hdul[0].header["GAIN"] == 120
            hdul.verify("exception")


def test_numeric_text_in_every_input_stays_text():
    assert carry_one("SITELAT", [{"SITELAT": "51.0367"}, {"SITELAT": "51.03670"}]).value == "51.0367"


def test_keys_once_each_and_structural_keys_skipped():
    headers = [{"GAIN": 1, "BITPIX": 16, "NAXIS1": 8}] * 2
    assert [v.key for v in carry(["gain", "GAIN", "BITPIX", "NAXIS1"], headers)] == ["GAIN"]


# ------------------------------------------------------------------- the setting


def test_config_default_and_validation():
    assert Output().carry == list(DEFAULT_CARRY)
    assert Rules().output.carry == list(DEFAULT_CARRY)
    assert parse("output:\n  carry: [gain, rotatang]\n").output.carry == ["GAIN", "ROTATANG"]
    for bad in ("BITPIX", "NAXIS2", "CHECKSUM", "HISTORY", "TOO-LONG-KEY", "a b"):
        with pytest.raises(ValueError):
            check_carry_key(bad)
    with pytest.raises(Exception, match="output.carry"):
        parse("output:\n  carry: [BZERO]\n")


def test_example_lists_the_default_carry():
    assert yaml.safe_load(EXAMPLE.read_text())["output"]["carry"] == list(DEFAULT_CARRY)


def test_default_carry_holds_what_the_issue_asks():
    for key in ("GAIN", "OFFSET", "READOUTM", "XPIXSZ", "YPIXSZ", "FOCALLEN", "BAYERPAT", "XBAYROFF", "YBAYROFF",
                "ROWORDER", "INSTRUME", "TELESCOP", "SET-TEMP", "SITELAT", "SITELONG", "SITEELEV", "OBSGEO-B",
                "OBSGEO-L", "OBSGEO-H"):
        assert key in DEFAULT_CARRY, key
