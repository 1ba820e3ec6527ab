"""Hostile header values: absurd numbers leave the file out with a reason, text is made printable."""

from __future__ import annotations

from pathlib import Path

import pytest

from flatd.calibration import CalibrationError, Library, calibration_for
from flatd.cli import main
from flatd.config import Precalibration
from flatd.ingest.frames import BLOCK, CARD, FrameError, frame_from_cards, read_frame, read_frames

ESC = "\x1b"


def card(key: str, value: str) -> str:
    """One 80-character card with the value field written as given (bare NAN, ESC...)."""
    return f"{key:<8}= {value:>20}".ljust(CARD)[:CARD]


def write_raw_fits(path: Path, cards: dict[str, str], width: int = 5, height: int = 4) -> Path:
    """A 16-bit FITS file written byte by byte: astropy refuses NaN and control characters."""
    structure = {"SIMPLE": "T", "BITPIX": "16", "NAXIS": "2", "NAXIS1": str(width), "NAXIS2": str(height)}
    text = "".join(card(k, v) for k, v in {**structure, **cards}.items()) + "END".ljust(CARD)
    header = text.encode("latin-1")
    header += b" " * (-len(header) % BLOCK)
    data = bytes(2 * width * height)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header + data + bytes(-len(data) % BLOCK))
    return path


FLAT = {"IMAGETYP": "'FLAT'", "FILTER": "'R'", "EXPTIME": "2.0", "CCD-TEMP": "-10.0"}


# ------------------------------------------------------------------ absurd numbers


HOSTILE = {
    "temperature 1E+308": ({"CCD-TEMP": "1E+308"}, "CCD-TEMP = 1e+308 is outside -200..+60 °C"),
    "temperature -1E+308": ({"CCD-TEMP": "-1E+308"}, "CCD-TEMP = -1e+308 is outside -200..+60 °C"),
    "temperature NaN token": ({"CCD-TEMP": "NAN"}, "CCD-TEMP = nan is not a number"),
    "temperature NaN text": ({"CCD-TEMP": "'NAN'"}, "CCD-TEMP = 'NAN' is not a number"),
    "temperature inf": ({"CCD-TEMP": "inf"}, "CCD-TEMP = inf is outside -200..+60 °C"),
    "temperature overflowing to inf": ({"CCD-TEMP": "1E+400"}, "CCD-TEMP = inf is outside"),
    "temperature in a fallback keyword": ({"CCD-TEMP": "''", "DETTEMP": "9E+99"}, "DETTEMP = 9e+99 is outside"),
    "temperature in Kelvin": ({"CCD-TEMP": "173.15"}, "CCD-TEMP = 173.15 is outside -200..+60 °C"),
    "set-point 1E+308": ({"SET-TEMP": "1E+308"}, "SET-TEMP = 1e+308 is outside -200..+60 °C"),
    "set-point NaN": ({"SET-TEMP": "NAN"}, "SET-TEMP = nan is not a number"),
    "huge exposure": ({"EXPTIME": "1E+6"}, "EXPTIME = 1000000.0 is outside 0..100,000 s"),
    "negative exposure": ({"EXPTIME": "-1"}, "EXPTIME = -1 is outside 0..100,000 s"),
    "exposure inf": ({"EXPTIME": "-INF"}, "EXPTIME = -inf is outside 0..100,000 s"),
    "exposure NaN": ({"EXPTIME": "NaN"}, "EXPTIME = nan is not a number"),
    "BSCALE 0": ({"BSCALE": "0"}, "BSCALE = 0 would make every pixel equal to BZERO"),
    "BSCALE 0.0": ({"BSCALE": "0.0"}, "BSCALE = 0 would make every pixel equal to BZERO"),
    "BSCALE NaN": ({"BSCALE": "NAN"}, "BSCALE = nan is not a finite number"),
    "BSCALE inf": ({"BSCALE": "INF"}, "BSCALE = inf is not a finite number"),
    "BSCALE text": ({"BSCALE": "'abc'"}, "BSCALE = 'abc' is not a finite number"),
    "BZERO NaN": ({"BZERO": "NAN"}, "BZERO = nan is not a finite number"),
    "BZERO text NaN": ({"BZERO": "'NaN'"}, "BZERO = 'NaN' is not a finite number"),
}


@pytest.mark.parametrize("cards, reason", HOSTILE.values(), ids=HOSTILE.keys())
def test_absurd_value_is_a_frame_error_naming_keyword_and_value(tmp_path, cards, reason):
    path = write_raw_fits(tmp_path / "flat.fits", {**FLAT, **cards})
    with pytest.raises(FrameError) as caught:
        read_frame(path)
    assert caught.value.path == path
    assert reason in caught.value.reason


def test_absurd_values_leave_only_their_file_out(tmp_path):
    good = [write_raw_fits(tmp_path / f"good{i}.fits", FLAT) for i in range(3)]
    bad = [write_raw_fits(tmp_path / f"bad_{name}.fits", {**FLAT, **cards})
           for name, (cards, _) in list(HOSTILE.items())[:6]]
    frames, skipped = read_frames(sorted(tmp_path.iterdir()))
    assert sorted(f.path for f in frames) == good
    assert sorted(s.path for s in skipped) == sorted(bad)


def test_frame_from_cards_checks_values_too():
    with pytest.raises(FrameError, match=r"CCD-TEMP = 1e\+308 is outside"):
        frame_from_cards({"NAXIS": 2, "NAXIS1": 5, "NAXIS2": 4, "CCD-TEMP": 1e308}, "f.fits")


LIMITS_AND_USUAL = {
    "coldest": ({"CCD-TEMP": "-200"}, "temperature", -200.0),
    "liquid nitrogen (Lowell LOIS)": ({"CCD-TEMP": "-102.125"}, "temperature", -102.125),
    "warmest": ({"CCD-TEMP": "60"}, "temperature", 60.0),
    "comma decimal in text": ({"CCD-TEMP": "'-10,5'"}, "temperature", -10.5),
    "bias exposure": ({"EXPTIME": "0"}, "exposure", 0.0),
    "longest exposure": ({"EXPTIME": "100000"}, "exposure", 100000.0),
    "negative BSCALE": ({"BSCALE": "-1"}, "bscale", -1.0),
    "BZERO of unsigned 16-bit": ({"BZERO": "32768"}, "bzero", 32768.0),
}


@pytest.mark.parametrize("cards, fact, value", LIMITS_AND_USUAL.values(), ids=LIMITS_AND_USUAL.keys())
def test_values_within_the_limits_read(tmp_path, cards, fact, value):
    frame = read_frame(write_raw_fits(tmp_path / "flat.fits", {**FLAT, **cards}))
    assert getattr(frame, fact) == value


NOT_NUMBERS = {
    "temperature 'abc'": ({"CCD-TEMP": "'abc'"}, "temperature"),
    "temperature 'N/A'": ({"CCD-TEMP": "'N/A'"}, "temperature"),
    "temperature T": ({"CCD-TEMP": "T"}, "temperature"),
    "set-point 'abc'": ({"SET-TEMP": "'abc'"}, "set_temperature"),
    "exposure 'abc'": ({"EXPTIME": "'abc'"}, "exposure"),
}


@pytest.mark.parametrize("cards, fact", NOT_NUMBERS.values(), ids=NOT_NUMBERS.keys())
def test_text_that_is_no_number_counts_as_missing(tmp_path, cards, fact):
    """Placeholders such as 'N/A' (a camera without a sensor) say nothing: the fact is missing."""
    frame = read_frame(write_raw_fits(tmp_path / "flat.fits", {**FLAT, **cards}))
    assert getattr(frame, fact) is None


def test_missing_keywords_stay_allowed(tmp_path):
    frame = read_frame(write_raw_fits(tmp_path / "flat.fits", {"IMAGETYP": "'FLAT'"}))
    assert (frame.temperature, frame.set_temperature, frame.exposure) == (None, None, None)
    assert (frame.bscale, frame.bzero) == (1.0, 0.0)


# ------------------------------------------------------------------ calibration library


def test_absurd_dark_or_bias_is_left_out_of_the_library(tmp_path):
    library = tmp_path / "calib"
    write_raw_fits(library / "bias_good.fits", {"IMAGETYP": "'BIAS'", "CCD-TEMP": "-10"})
    write_raw_fits(library / "bias_hot.fits", {"IMAGETYP": "'BIAS'", "CCD-TEMP": "1E+308"})
    write_raw_fits(library / "dark_nan.fits", {"IMAGETYP": "'DARK'", "EXPTIME": "NAN"})
    scanned = Library.scan(library)
    assert [f.path.name for f in scanned.frames] == ["bias_good.fits"]
    reasons = {s.path.name: s.reason for s in scanned.skipped}
    assert "CCD-TEMP = 1e+308 is outside" in reasons["bias_hot.fits"]
    assert "EXPTIME = nan is not a number" in reasons["dark_nan.fits"]


def test_absurd_fixed_dark_is_a_calibration_error_with_the_reason(tmp_path):
    flat = read_frame(write_raw_fits(tmp_path / "flat.fits", FLAT))
    dark = write_raw_fits(tmp_path / "dark.fits", {"IMAGETYP": "'DARK'", "BSCALE": "0"})
    with pytest.raises(CalibrationError, match="BSCALE = 0"):
        calibration_for(flat, Precalibration(mode="file", file=dark), None, None)


# ------------------------------------------------------------------ control characters


def test_escape_sequences_do_not_enter_the_facts(tmp_path):
    path = write_raw_fits(tmp_path / "flat.fits", {
        **FLAT,
        "FILTER": f"'R{ESC}[31mRED'",
        "INSTRUME": f"'{ESC}]0;pwned\a ASI 2600'",
        "TELESCOP": "'RC8\tf/8'",
    })
    frame = read_frame(path)
    assert frame.filter == "RRED"
    assert frame.instrument == "ASI 2600"
    assert frame.telescope == "RC8 f/8"


def test_ordinary_unicode_is_kept_in_the_facts():
    frame = frame_from_cards({"NAXIS": 2, "NAXIS1": 5, "NAXIS2": 4, "FILTER": "Hα 3nm"}, "f.fits")
    assert frame.filter == "Hα 3nm"


def test_filter_made_only_of_an_escape_sequence_is_no_filter(tmp_path):
    frame = read_frame(write_raw_fits(tmp_path / "flat.fits", {**FLAT, "FILTER": f"'{ESC}[0m'"}))
    assert frame.filter is None


def test_inspect_prints_no_escape_byte(tmp_path, capsys):
    write_raw_fits(tmp_path / "flat_red.fits", {**FLAT, "FILTER": f"'R{ESC}[31mRED'"})
    write_raw_fits(tmp_path / "flat_hot.fits", {**FLAT, "CCD-TEMP": "1E+308"})
    main(["inspect", str(tmp_path)])
    captured = capsys.readouterr()
    output = captured.out + captured.err
    assert ESC not in output
    assert "RRED" in output
    assert "flat_hot.fits" in output and "CCD-TEMP = 1e+308 is outside -200..+60 °C" in output
