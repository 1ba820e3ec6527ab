"""One log line per event that matters, on stderr: plain for people and journald, or JSON."""

from __future__ import annotations

import json
import logging
import re
import sys
import time

LOGGER = logging.getLogger("flatd")

# Terminal escape sequences, in their 7-bit (ESC ...) and 8-bit (C1) forms: CSI
# (colours, cursor moves), the string commands OSC, DCS, SOS, PM and APC (titles,
# hyperlinks, clipboard) up to their terminator, and the short ESC sequences.
_ESCAPE_SEQUENCE = re.compile(
    r"(?:\x1b\[|\x9b)[0-?]*[ -/]*[@-~]"
    r"|(?:\x1b[\]PX^_]|[\x90\x98\x9d\x9e\x9f]).*?(?:\x07|\x1b\\|\x9c|\Z)"
    r"|\x1b[ -/]*[0-~]",
    re.DOTALL,
)
_LINE_BREAKING = re.compile(r"[\t\n\v\f\r\x85\u2028\u2029]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def printable(text: object) -> str:
    """`text` as a string safe to print on a terminal or in a log line.

    Escape sequences and control characters are removed; tabs and line breaks become
    spaces, so that header text stays on its line. Other characters ('Hα') are kept.
    """
    text = _ESCAPE_SEQUENCE.sub("", str(text))
    return _CONTROL.sub("", _LINE_BREAKING.sub(" ", text))


class PlainFormatter(logging.Formatter):
    """`event key=value ...`; journald adds its own timestamp, a terminal gets one here."""

    def __init__(self, timestamps: bool):
        super().__init__()
        self.timestamps = timestamps

    def format(self, record: logging.LogRecord) -> str:
        text = printable(record.getMessage())
        # A value the message already shows (a path, most often) is not repeated.
        fields = {k: printable(v) for k, v in getattr(record, "fields", {}).items()}
        fields = {k: v for k, v in fields.items() if v not in text}
        if fields:
            text += " " + " ".join(f"{k}={_plain(v)}" for k, v in fields.items())
        if record.levelno >= logging.WARNING:
            text = f"{record.levelname.lower()}: {text}"
        if self.timestamps:
            text = time.strftime("%Y-%m-%d %H:%M:%S ", time.localtime(record.created)) + text
        return text


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "event": getattr(record, "event", None) or record.getMessage(),
            "message": record.getMessage(),
        }
        payload.update({k: _json(v) for k, v in getattr(record, "fields", {}).items()})
        return _C1_OR_DEL.sub(_escaped, json.dumps(payload, ensure_ascii=False))


# json.dumps escapes C0 controls (ESC among them) but writes DEL and the C1 range raw,
# and a UTF-8 terminal takes U+009B for CSI. They can only be inside JSON strings.
_C1_OR_DEL = re.compile(r"[\x7f-\x9f]")


def _escaped(match: re.Match) -> str:
    return f"\\u{ord(match.group()):04x}"


def _plain(value) -> str:
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if (" " in text or not text) else text


def _json(value):
    return value if isinstance(value, (int, float, bool, type(None))) else str(value)


def setup_logging(fmt: str = "plain", verbose: bool = False, stream=None, quiet_on_terminal: bool = False) -> None:
    """Configure the 'flatd' logger once per process.

    One-shot commands print a report of their own; on a terminal (and without
    --verbose) their event lines would only repeat it, so `quiet_on_terminal` mutes them.
    """
    stream = stream or sys.stderr
    handler = logging.StreamHandler(stream)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        journald = not stream.isatty() and "JOURNAL_STREAM" in __import__("os").environ
        handler.setFormatter(PlainFormatter(timestamps=not journald and fmt == "plain-time"))
    LOGGER.handlers[:] = [handler]
    if verbose:
        LOGGER.setLevel(logging.DEBUG)
    elif quiet_on_terminal and stream.isatty() and fmt != "json":
        LOGGER.setLevel(logging.CRITICAL)
    else:
        LOGGER.setLevel(logging.INFO)
    LOGGER.propagate = False


def event(name: str, message: str = "", level: int = logging.INFO, **fields) -> None:
    """Log one event: `name` is a stable identifier, `message` reads well for people."""
    LOGGER.log(level, message or name, extra={"event": name, "fields": fields})
