"""Output names from templates, made safe (pure: no astropy, no numba).

Header values never become paths unchecked (invariant 8): every value that goes into a
file or folder name passes through :func:`safe_component`, and the formatted name is
checked to be one plain file name. The template's own extension, never a header value,
says how a master is written: ``.fits``/``.fit``/``.fts`` plain, ``.fits.fz``
tile-compressed, ``.xisf`` XISF; none gets ``.fits``; any other is refused.
"""

from __future__ import annotations

import math
import os
import re
import unicodedata
from collections import Counter
from datetime import datetime
from decimal import ROUND_HALF_UP, Decimal
from string import Formatter
from typing import TYPE_CHECKING, Iterable, Mapping, Optional, Sequence

if TYPE_CHECKING:  # pragma: no cover
    from flatd.ingest.frames import Frame

MAX_COMPONENT = 64
# A file name is at most 255 bytes on the usual filesystems; keep room for "-NN".
MAX_NAME_BYTES = 240
PLAIN_SUFFIXES = (".fits", ".fit", ".fts")
COMPRESSED_SUFFIXES = (".fits.fz",)
XISF_SUFFIXES = (".xisf",)
MASTER_SUFFIXES = COMPRESSED_SUFFIXES + PLAIN_SUFFIXES + XISF_SUFFIXES  # longest first
# output.format: the extension each format gives a master's name
FORMAT_SUFFIXES = {"fits": ".fits", "fits.fz": ".fits.fz", "xisf": ".xisf"}
DATE_FORMAT = "%Y%m%d-%H%M%S"
TIME_FORMAT = "%H%M%S"
DATETIME_FORMAT = "%Y%m%dT%H%M%S"
# What reads as a file extension at the end of a template: ".png", ".tif", ".gz"
# (not ".5" or ".0C", which end numbers).
_EXTENSION = re.compile(r"\.[A-Za-z][A-Za-z0-9]{0,9}$")

# Letters astronomers put in filter names, and a few others, spelt in ASCII.
_TRANSLIT = {
    "α": "a", "β": "b", "γ": "g", "δ": "d", "ε": "e", "η": "h", "λ": "l", "μ": "u", "µ": "u",
    "Α": "A", "Β": "B", "Γ": "G", "Δ": "D", "Λ": "L", "°": "", "º": "", "ß": "ss", "æ": "ae",
    "Æ": "AE", "œ": "oe", "Œ": "OE", "ø": "o", "Ø": "O", "ð": "d", "þ": "th", "ł": "l", "Ł": "L",
}
_ALLOWED = re.compile(r"[A-Za-z0-9._+-]")
_WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)), *(f"LPT{i}" for i in range(1, 10))}
# Characters a file name cannot hold on Windows / SMB shares, plus separators.
_BAD_NAME_CHARS = set('/\\<>:"|?*')


# ------------------------------------------------------------------- numbers as text


def temperature_text(value: float) -> str:
    """A temperature to 0.1 °C, as names and `inspect` show it: halves away from zero
    on the decimal value (0.05 -> "0.1", -10.25 -> "-10.3"), never "-0.0"; "na" when
    not a number. The value is first rounded to 9 decimals, so that a mean such as
    0.04999999999999999 counts as 0.05."""
    value = float(value)
    if not math.isfinite(value):
        return "na"
    tenths = Decimal(repr(round(value, 9))).quantize(Decimal("0.1"), rounding=ROUND_HALF_UP)
    return "0.0" if tenths == 0 else str(tenths)


def _decimals(value: float) -> int:
    """Decimals of a number as written (its shortest repr): 0.4 -> 1, 2.0 -> 1, 1e-05 -> 5."""
    exponent = Decimal(repr(float(value))).as_tuple().exponent
    return min(max(0, -exponent), 15) if isinstance(exponent, int) else 0


def mean_as_written(values: Iterable[Optional[float]]) -> Optional[float]:
    """The mean of the known values, rounded to the most decimals any of them has:
    three exposures of 0.4 give 0.4, not 0.39999999999999997. None when none is known."""
    numbers = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not numbers:
        return None
    return round(sum(numbers) / len(numbers), max(_decimals(v) for v in numbers))


# ------------------------------------------------------------------- extensions


def master_suffix(name: str) -> Optional[str]:
    """The master extension `name` ends with, as written (".fits", ".FITS.FZ"...), or None."""
    lower = name.lower()
    for suffix in MASTER_SUFFIXES:
        if lower.endswith(suffix):
            return name[len(name) - len(suffix):]
    return None


def is_compressed_name(name: str) -> bool:
    """True when `name` asks for a tile-compressed master (.fits.fz, any case)."""
    return name.lower().endswith(COMPRESSED_SUFFIXES)


def is_xisf_name(name: str) -> bool:
    """True when `name` asks for an XISF master (.xisf, any case)."""
    return name.lower().endswith(XISF_SUFFIXES)


def with_format(template: str, fmt: Optional[str]) -> str:
    """The template with the extension of output.format `fmt` in place of its own
    master extension (or added); `fmt` None leaves the template as it is."""
    if fmt is None:
        return template
    tail = _template_tail(template).rstrip()
    suffix = master_suffix(tail)
    stem = template.rstrip()[: len(template.rstrip()) - len(suffix)] if suffix else template.rstrip()
    return stem + FORMAT_SUFFIXES[fmt]


def split_name(name: str) -> tuple[str, str]:
    """(stem, extension), a master extension whole: "m.fits.fz" -> ("m", ".fits.fz")."""
    suffix = master_suffix(name)
    if suffix is not None:
        return name[: len(name) - len(suffix)], suffix
    return os.path.splitext(name)


def numbered_name(name: str, n: int) -> str:
    """name.fits -> name-2.fits, m.fits.fz -> m-2.fits.fz (n >= 2)."""
    stem, ext = split_name(name)
    return f"{stem}-{n}{ext}"


def _template_tail(template: str) -> str:
    """The template's own text after its last {field}."""
    try:
        parsed = list(Formatter().parse(template))
    except ValueError:
        return template
    if not parsed:
        return ""
    literal, key = parsed[-1][0], parsed[-1][1]
    return literal if key is None else ""


def check_output_template(template: str, what: str = "output.name") -> str:
    """Raise ValueError when the template ends with an extension flatd cannot write.

    `what` names the setting or option in the message (output.name, -o)."""
    tail = _template_tail(template).rstrip()
    if master_suffix(tail) is None:
        match = _EXTENSION.search(tail)
        if match:
            raise ValueError(
                f"{what} {template!r}: flatd cannot write {match.group(0)!r} files; a master is "
                f"{', '.join(PLAIN_SUFFIXES)} (plain FITS), .fits.fz (tile-compressed FITS, lossless) or .xisf")
    return template


# ------------------------------------------------------------------- components


def ascii_text(text: str) -> str:
    """Text with non-ASCII letters spelt in ASCII where possible ("Hα" -> "Ha", "é" -> "e")."""
    out = []
    for ch in text:
        if ord(ch) < 128:
            out.append(ch)
        elif ch in _TRANSLIT:
            out.append(_TRANSLIT[ch])
        else:
            base = unicodedata.normalize("NFKD", ch)
            base = "".join(c for c in base if ord(c) < 128 and not unicodedata.combining(c))
            out.append(base if base else "\ufffd")
    return "".join(out)


def safe_component(text: object, fallback: str = "none") -> str:
    """A piece of a file name made from an untrusted value (a header value).

    Keeps ``[A-Za-z0-9._+-]``; anything else (separators, spaces, control characters,
    ``:`` ...) becomes ``_``. Runs of ``_`` and of ``.`` collapse to one, leading dots
    and underscores and trailing dots, underscores and spaces are stripped, the length
    is limited to 64 characters. The result never contains a path separator and is
    never ``.``, ``..`` or a hidden name; an empty result gives `fallback`.
    ``"../../x"`` -> ``"x"``, ``"R G B"`` -> ``"R_G_B"``, ``"Hα"`` -> ``"Ha"``.
    """
    if text is None:
        return fallback
    raw = ascii_text(str(text))
    cleaned = "".join(ch if _ALLOWED.fullmatch(ch) else "_" for ch in raw)
    cleaned = re.sub(r"_+", "_", cleaned)
    cleaned = re.sub(r"\.+", ".", cleaned)
    cleaned = cleaned.lstrip("._")
    cleaned = cleaned[:MAX_COMPONENT].rstrip("._")
    if not cleaned:
        return fallback
    if cleaned.split(".")[0].upper() in _WINDOWS_RESERVED:
        cleaned = cleaned + "_"
    return cleaned


_FALLBACKS = {"filter": "nofilter", "temperature": "na", "exposure": "na"}


def _default_text(key: str, value: object) -> str | None:
    """A field value as text with flatd's default formats; None stays None."""
    if value is None:
        return None
    if isinstance(value, datetime):
        if key == "time":
            return value.strftime(TIME_FORMAT)
        if key == "datetime":
            return value.strftime(DATETIME_FORMAT)
        return value.strftime(DATE_FORMAT)
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        if key == "temperature":
            return temperature_text(value)
        return f"{value:g}"
    return str(value)


def _with_spec(key: str, value: object, spec: str) -> str:
    """`value` formatted with a template's format spec, e.g. {temperature:.0f}."""
    try:
        return format(value, spec)
    except (ValueError, TypeError):
        pass
    if isinstance(value, str):
        for convert in (int, float, lambda v: datetime.strptime(v, DATE_FORMAT)):
            try:
                return format(convert(value), spec)
            except (ValueError, TypeError):
                continue
    raise ValueError(f"field {{{key}}}: format {spec!r} does not apply to {value!r}")


def format_fields(template: str, fields: Mapping[str, object]) -> str:
    """`template` with every {field} replaced by its sanitized value.

    Only field values are sanitized (they come from headers); the template's own text
    is the user's and is kept as written. Unknown fields raise ValueError.
    """
    out: list[str] = []
    try:
        parsed = list(Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"bad name template {template!r}: {exc}") from None
    for literal, key, spec, conversion in parsed:
        out.append(literal)
        if key is None:
            continue
        if key == "" or key not in fields:
            known = ", ".join(sorted(fields))
            raise ValueError(f"unknown field {{{key}}} in {template!r}; known: {known}")
        value = fields[key]
        if conversion == "r":
            value = repr(value)
        elif conversion == "s" or conversion == "a":
            value = str(value) if conversion == "s" else ascii(value)
        if value is None:
            text = None
        elif spec:
            text = _with_spec(key, value, spec)
        else:
            text = _default_text(key, value)
        text = safe_component(text, _FALLBACKS.get(key, "none"))
        if key == "temperature":
            text = _signed_after_dash(out, text)
        out.append(text)
    return "".join(out)


def _signed_after_dash(out: list[str], text: str) -> str:
    """A temperature right after a "-" of the template takes the dash's place, with its
    sign: "-{temperature}C" gives "-10.0C" at -10 °C and "+20.0C" at +20 °C, not
    "--10.0C" and a "-20.0C" that would read as below zero. `out` loses the dash."""
    if not out or not out[-1].endswith("-"):
        return text
    try:
        float(text)
    except ValueError:
        return text  # "na"
    out[-1] = out[-1][:-1]
    return text if text.startswith(("-", "+")) else "+" + text


def check_file_name(name: str) -> str:
    """Raise ValueError unless `name` is one plain, visible file name."""
    if not name or name in (".", ".."):
        raise ValueError(f"{name!r} is not a file name")
    bad = sorted({ch for ch in name if ch in _BAD_NAME_CHARS or ord(ch) < 32 or ord(ch) == 127})
    if bad:
        raise ValueError(f"{name!r} is not a plain file name (contains {' '.join(repr(c) for c in bad)})")
    if name.startswith("."):
        raise ValueError(f"{name!r} would be a hidden file")
    if name != name.strip() or name.endswith("."):
        raise ValueError(f"{name!r} starts or ends with a space or ends with a dot")
    return name


def master_name(template: str, fields: Mapping[str, object]) -> str:
    """The file name of a master: `template` (output.name) with sanitized fields.

    Each value goes through :func:`safe_component`; without a format spec a float
    temperature is written as :func:`temperature_text` gives it (signed in place of a
    "-" before it), other floats "%g", a datetime as YYYYmmdd-HHMMSS ({time}: HHMMSS,
    {datetime}: YYYYmmddTHHMMSS). Missing values: filter "nofilter", temperature and
    exposure "na", others "none". The template's own extension decides the format
    (.fits/.fit/.fts, .fits.fz, .xisf); without one ".fits" is appended, whatever the field
    values end with; an over-long name is shortened (before the extension).
    Raises ValueError for an unknown field or extension, or a template that does not
    give one plain file name (a '/', '\\', ':' ... in the template's own text, a
    hidden name).
    """
    check_output_template(template)
    ext = master_suffix(_template_tail(template).rstrip())
    name = format_fields(template, fields).strip()
    if ext is None:
        ext = ".fits"
        name += ext
    check_file_name(name)
    stem = name[: len(name) - len(ext)]
    if len(name.encode("utf-8")) > MAX_NAME_BYTES:
        budget = MAX_NAME_BYTES - len(ext.encode("utf-8"))
        stem = stem.encode("utf-8")[:budget].decode("utf-8", errors="ignore").rstrip(" ._")
        name = stem + ext
        check_file_name(name)
    if not stem:
        raise ValueError(f"template {template!r} gives an empty file name")
    return name


def most_common(values: Iterable[object]) -> object | None:
    """The most common non-None value (ties: the first seen), or None."""
    counts = Counter(v for v in values if v is not None and v != "")
    if not counts:
        return None
    return counts.most_common(1)[0][0]


def mean_value(values: Iterable[float | None]) -> float | None:
    numbers = [float(v) for v in values if v is not None]
    return sum(numbers) / len(numbers) if numbers else None


def earliest(frames: Sequence["Frame"]) -> datetime | None:
    """The earliest observation date (DATE-OBS, as written: usually UTC), or None."""
    dates = [f.date for f in frames if f.date is not None]
    return min(dates) if dates else None


def session_time(frames: Sequence["Frame"], when: datetime) -> datetime:
    """The time that names a master: the earliest local observation time of its inputs
    (DATE-LOC, which N.I.N.A. and SGP write), else the earliest DATE-OBS (UTC), else `when`.

    The original named masters after the moment of combining. flatd uses the
    observation time instead: the name then says when the flats were taken, and the
    same inputs always give the same name (a re-run after a crash plans the same file,
    which unique naming turns into name-2 rather than a new date). `when` (the time
    of combining) is used only when no input has a date. The local time is preferred
    because a night's flats then share the evening's date, not the next UTC day's.
    """
    local = [f.local_date for f in frames if f.local_date is not None]
    return min(local) if local else earliest(frames) or when


def template_keywords(template: str) -> list[str]:
    """The header keywords a name template uses as fields ({FOCALLEN}): capitals only."""
    try:
        parsed = list(Formatter().parse(template))
    except ValueError:
        return []
    return [key for _, key, _, _ in parsed if key and key.upper() == key and re.match(r"^[A-Z0-9_-]{1,8}$", key)]


def _keyword_text(frames: Sequence["Frame"], key: str) -> str:
    value = most_common(f.header_value(key) for f in frames)
    if isinstance(value, float):
        return f"{value:g}"
    return "na" if value is None or str(value).strip() == "" else str(value).strip()


def name_fields(frames: Sequence["Frame"], method_label: str, group_label: str, when: datetime,
                keywords: Sequence[str] = ()) -> dict[str, str]:
    """The values of config.NAME_FIELDS for a group, as text (not yet sanitized).

    filter: most common FILTER ("nofilter" when none has one); binning "2x2"; size
    "4144x2822"; method: the original's label (Mean, Median, MinMaxClip2,
    SigmaClip2.0); date "YYYYmmdd-HHMMSS", time "HHMMSS", datetime "YYYYmmddTHHMMSS",
    all of :func:`session_time`; temperature: mean CCD-TEMP by :func:`temperature_text`
    ("na" when unknown); exposure: mean exposure (:func:`mean_as_written`) "%g" ("na");
    instrument, telescope: most common
    ("none"); count: number of frames; group: `group_label`; gain, offset, readout,
    bayer: the camera settings ("na"); and each header keyword of `keywords` by its
    name, most common value ("na").
    """
    if not frames:
        raise ValueError("name_fields needs at least one frame")
    stamp = session_time(frames, when)
    temperature = mean_value(f.temperature for f in frames)
    exposure = mean_as_written(f.exposure for f in frames)
    return {
        "filter": str(most_common(f.filter for f in frames) or "nofilter"),
        "binning": str(most_common(f.binning for f in frames)),
        "size": str(most_common(f.dimensions for f in frames)),
        "method": method_label,
        "date": stamp.strftime(DATE_FORMAT),
        "time": stamp.strftime(TIME_FORMAT),
        "datetime": stamp.strftime(DATETIME_FORMAT),
        "temperature": "na" if temperature is None else temperature_text(temperature),
        "exposure": "na" if exposure is None else f"{exposure:g}",
        "instrument": str(most_common(f.instrument for f in frames) or "none"),
        "telescope": str(most_common(f.telescope for f in frames) or "none"),
        "count": str(len(frames)),
        "group": group_label or "none",
        "gain": _setting_text(most_common(f.gain for f in frames)),
        "offset": _setting_text(most_common(f.offset for f in frames)),
        "readout": str(most_common(f.readout_mode for f in frames) or "na"),
        "bayer": str(most_common(f.bayer_pattern for f in frames) or "na"),
        **{key: _keyword_text(frames, key) for key in keywords},
    }


def _setting_text(value: object) -> str:
    return "na" if value is None else f"{value:g}"
