"""Log lines: plain for people and journald, JSON for machines."""

import io
import json
import os
import re
import logging

import pytest

from flatd.log import LOGGER, event, printable, setup_logging


def _capture(fmt: str, **kw) -> io.StringIO:
    """A log going to a StringIO, without timestamps unless asked (they have tests of their own)."""
    stream = io.StringIO()
    kw.setdefault("timestamps", False)
    setup_logging(fmt, stream=stream, **kw)
    return stream


def test_plain_line_has_the_message_and_fields_once():
    stream = _capture("plain")
    event("master_written", "wrote /m/FLAT.fits", path="/m/FLAT.fits", files=7, group="1x1 R")
    line = stream.getvalue().strip()
    assert line == 'wrote /m/FLAT.fits files=7 group="1x1 R"'


def test_warnings_say_so_in_plain_lines():
    stream = _capture("plain")
    event("group_failed", "group R failed: no dark", logging.ERROR)
    assert stream.getvalue().startswith("error: group R failed")


def test_json_lines_carry_event_level_and_every_field():
    stream = _capture("json")
    event("frame_ready", "flat ready: /c/a.fits", path="/c/a.fits", exposure=1.5, filter=None)
    record = json.loads(stream.getvalue())
    assert record["event"] == "frame_ready" and record["level"] == "info"
    assert record["path"] == "/c/a.fits" and record["exposure"] == 1.5 and record["filter"] is None


def test_verbose_and_quiet_levels():
    _capture("plain", verbose=True)
    assert LOGGER.level == logging.DEBUG
    _capture("plain", quiet_on_terminal=True)  # a StringIO is no terminal: lines stay
    assert LOGGER.level == logging.INFO


# --------------------------------------------------------------------------- printable

ESC = "\x1b"


@pytest.mark.parametrize("text, shown", [
    (f"R{ESC}[31mRED{ESC}[0m", "RRED"),  # CSI colours
    (f"{ESC}[2J{ESC}[1;1HX", "X"),  # clear screen, cursor home
    ("\x9b31mC1", "C1"),  # 8-bit CSI
    (f"{ESC}]0;title\aA", "A"),  # OSC window title, ended by BEL
    (f"{ESC}]8;;http://x{ESC}\\link{ESC}]8;;{ESC}\\", "link"),  # OSC hyperlink, ended by ST
    (f"{ESC}P1$r{ESC}\\D", "D"),  # DCS
    (f"{ESC}(Bq{ESC}7", "q"),  # charset, save cursor
    (f"half{ESC}[31", "half31"),  # cut-off CSI: ESC [ goes, the digits are plain text
    ("a\tb\nc\r\nd\x0be\x0cf\x85g\u2028h", "a b c  d e f g h"),  # line breaks and tabs: spaces
    ("bell\a nul\x00 bs\x08 del\x7f", "bell nul bs del"),
    ("Hα 3nm, 10°C – Ø", "Hα 3nm, 10°C – Ø"),
    (None, "None"),
    (12.5, "12.5"),
])
def test_printable(text, shown):
    assert printable(text) == shown


def test_plain_line_has_no_escape_in_message_or_fields():
    stream = _capture("plain")
    event("frame_ready", f"flat ready: R{ESC}[31mRED", filter=f"G{ESC}]0;x\aREEN", note="two\nlines")
    line = stream.getvalue()
    assert ESC not in line and "\a" not in line
    assert line == 'flat ready: RRED filter=GREEN note="two lines"\n'


def test_json_line_escapes_control_characters_and_keeps_the_value():
    stream = _capture("json")
    text = f"R{ESC}[31mRED\x9b2J\x7f\n"
    event("frame_ready", text, filter=text)
    line = stream.getvalue()
    assert not any(c in line.rstrip("\n") for c in (ESC, "\x9b", "\x7f", "\n"))
    record = json.loads(line)
    assert record["message"] == text and record["filter"] == text


# --------------------------------------------------------------------------- fields never dropped by accident


def test_a_number_in_the_message_does_not_drop_a_field():
    stream = _capture("plain")
    event("group_planned", "combining 8 flats of 1x1 R, 480 s", files=8, exposure=480)
    assert stream.getvalue().strip() == "combining 8 flats of 1x1 R, 480 s files=8 exposure=480"


def test_a_value_inside_a_longer_word_does_not_drop_a_field():
    stream = _capture("plain")
    event("group_planned", "combining 3 flats of 1x1 -10.0C", files=3, rule="-", job="480")
    line = stream.getvalue().strip()
    assert line.endswith(" files=3 rule=- job=480")


def test_files_8_survives_480_in_the_message():
    stream = _capture("plain")
    event("master_written", "wrote /m/FLAT-480s.fits", path="/m/FLAT-480s.fits", files=8)
    assert stream.getvalue().strip() == "wrote /m/FLAT-480s.fits files=8"


def test_a_path_field_is_left_out_only_when_the_message_shows_that_whole_path():
    stream = _capture("plain")
    event("frame_ready", "flat ready: /c/a.fits.bak", path="/c/a.fits")
    assert stream.getvalue().strip() == "flat ready: /c/a.fits.bak path=/c/a.fits"


# --------------------------------------------------------------------------- timestamps


def test_plain_lines_carry_a_timestamp_away_from_a_terminal(monkeypatch):
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    stream = io.StringIO()
    setup_logging("plain", stream=stream)
    event("master_written", "wrote /m/F.fits")
    assert re.match(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d wrote /m/F.fits$", stream.getvalue().strip())


def test_no_timestamp_for_journald(monkeypatch, tmp_path):
    with open(tmp_path / "log", "w") as stream:
        st = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        setup_logging("plain", stream=stream)
        event("master_written", "wrote /m/F.fits")
    assert (tmp_path / "log").read_text() == "wrote /m/F.fits\n"


def test_no_timestamp_on_a_terminal():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    stream = Tty()
    setup_logging("plain", stream=stream)
    event("master_written", "wrote /m/F.fits")
    assert stream.getvalue() == "wrote /m/F.fits\n"


def test_same_destination(tmp_path):
    from flatd.log import same_destination

    with open(tmp_path / "a", "w") as a, open(tmp_path / "a", "a") as a2, open(tmp_path / "b", "w") as b:
        assert same_destination(a, a2)
        assert not same_destination(a, b)
    assert not same_destination(io.StringIO(), io.StringIO())
