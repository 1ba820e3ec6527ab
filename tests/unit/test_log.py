"""Log lines: plain for people and journald, JSON for machines."""

import io
import json
import logging

from flatd.log import LOGGER, event, setup_logging


def _capture(fmt: str, **kw) -> io.StringIO:
    stream = io.StringIO()
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
