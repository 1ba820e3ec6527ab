"""One log line per event that matters, on stderr: plain for people and journald, or JSON."""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Optional

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


# Fields whose value a message often shows in full (a path): left out of a plain line
# when the message has that very value as a word. Any other field is always written.
SHOWN_KEYS = frozenset({"path", "folder"})


def _shown(value: str, text: str) -> bool:
    """`value` is a whole word of `text` (not a part of one: "8" is not shown by "480")."""
    return bool(value) and re.search(r"(?:^|(?<=[\s(]))" + re.escape(value) + r"(?=$|[\s:;,)])", text) is not None


class PlainFormatter(logging.Formatter):
    """`message key=value ...`, with a timestamp when asked (files, pipes; not journald)."""

    def __init__(self, timestamps: bool):
        super().__init__()
        self.timestamps = timestamps

    def format(self, record: logging.LogRecord) -> str:
        text = printable(record.getMessage())
        fields = {k: printable(v) for k, v in getattr(record, "fields", {}).items()}
        fields = {k: v for k, v in fields.items() if not (k in SHOWN_KEYS and _shown(v, text))}
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


def is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def under_journald(stream) -> bool:
    """systemd sets JOURNAL_STREAM to the device:inode of the stream it reads."""
    import os

    value = os.environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(stream.fileno())
    except (AttributeError, OSError, ValueError):
        return bool(value)
    return value == f"{st.st_dev}:{st.st_ino}"


def same_destination(a, b) -> bool:
    """Two streams that end in the same file, pipe or terminal (`>> log 2>&1`)."""
    import os

    try:
        sa, sb = os.fstat(a.fileno()), os.fstat(b.fileno())
    except (AttributeError, OSError, ValueError):
        return a is b
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def setup_logging(fmt: str = "plain", verbose: bool = False, stream=None, quiet_on_terminal: bool = False,
                  timestamps: Optional[bool] = None, quiet: bool = False) -> None:
    """Configure the 'flatd' logger once per process.

    Plain lines carry a timestamp when they go neither to a terminal nor to journald
    (`timestamps` forces it either way; `plain-time` asks for it on a terminal too).
    One-shot commands print a report of their own; where their event lines would only
    repeat it (a terminal without --verbose: `quiet_on_terminal`, or the same file:
    `quiet`) the lines are muted.
    """
    stream = stream or sys.stderr
    handler = logging.StreamHandler(stream)
    terminal = is_terminal(stream)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        if timestamps is None:
            timestamps = not under_journald(stream) and (fmt == "plain-time" or not terminal)
        handler.setFormatter(PlainFormatter(timestamps=timestamps))
    LOGGER.handlers[:] = [handler]
    if verbose:
        LOGGER.setLevel(logging.DEBUG)
    elif quiet or (quiet_on_terminal and terminal and fmt != "json"):
        LOGGER.setLevel(logging.CRITICAL)
    else:
        LOGGER.setLevel(logging.INFO)
    LOGGER.propagate = False


def event(name: str, message: str = "", level: int = logging.INFO, **fields) -> None:
    """Log one event: `name` is a stable identifier, `message` reads well for people."""
    LOGGER.log(level, message or name, extra={"event": name, "fields": fields})
