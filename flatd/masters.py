"""Output names, master headers and atomic, never-overwriting writes of master flats.

Header values never become paths unchecked (invariant 8): every value that goes into a
file or folder name passes through :func:`safe_component`, and the formatted name is
checked to be one plain file name. A master is written to a hidden temp file in the
target folder, fsynced, then hard-linked to its final name, which fails instead of
overwriting (invariant 2); the temp name is removed afterwards.
"""

from __future__ import annotations

import errno
import os
import re
import textwrap
import time
import unicodedata
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from string import Formatter
from typing import Iterable, Mapping, Sequence

import numpy as np
from astropy.io import fits

import flatd
from flatd.calibration import Calibration
from flatd.frames import Frame
from flatd.fsops import TEMP_PREFIX, TEMP_SUFFIX, create_temp, fsync_dir, link_no_replace

MAX_COMPONENT = 64
# A file name is at most 255 bytes on the usual filesystems; keep room for "-NN".
MAX_NAME_BYTES = 240
MASTER_SUFFIXES = (".fits", ".fit", ".fts")
DATE_FORMAT = "%Y%m%d-%H%M%S"
TIME_FORMAT = "%H%M%S"
DATETIME_FORMAT = "%Y%m%dT%H%M%S"

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


# ------------------------------------------------------------------- names


def _ascii(text: str) -> str:
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
    raw = _ascii(str(text))
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
            return _temperature_text(value)
        return f"{value:g}"
    return str(value)


def _temperature_text(value: float) -> str:
    text = f"{value:.1f}"
    return "0.0" if text == "-0.0" else text


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
        out.append(safe_component(text, _FALLBACKS.get(key, "none")))
    return "".join(out)


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
    temperature is written "%.1f", other floats "%g", a datetime as YYYYmmdd-HHMMSS
    ({time}: HHMMSS, {datetime}: YYYYmmddTHHMMSS). Missing values: filter "nofilter",
    temperature and exposure "na", others "none". ".fits" is appended unless the name
    ends in .fits/.fit/.fts; an over-long name is shortened (before the extension).
    Raises ValueError for an unknown field or a template that does not give one plain
    file name (a '/', '\\', ':' ... in the template's own text, a hidden name).
    """
    name = format_fields(template, fields).strip()
    if not name.lower().endswith(MASTER_SUFFIXES):
        name += ".fits"
    check_file_name(name)
    stem, ext = os.path.splitext(name)
    if len(name.encode("utf-8")) > MAX_NAME_BYTES:
        budget = MAX_NAME_BYTES - len(ext.encode("utf-8"))
        stem = stem.encode("utf-8")[:budget].decode("utf-8", errors="ignore").rstrip(" ._")
        name = stem + ext
        check_file_name(name)
    if not stem:
        raise ValueError(f"template {template!r} gives an empty file name")
    return name


def _most_common(values: Iterable[object]) -> object | None:
    """The most common non-None value (ties: the first seen), or None."""
    counts = Counter(v for v in values if v is not None and v != "")
    if not counts:
        return None
    return counts.most_common(1)[0][0]


def _mean(values: Iterable[float | None]) -> float | None:
    numbers = [float(v) for v in values if v is not None]
    return sum(numbers) / len(numbers) if numbers else None


def _earliest(frames: Sequence[Frame]) -> datetime | None:
    dates = [f.date for f in frames if f.date is not None]
    return min(dates) if dates else None


def session_time(frames: Sequence[Frame], when: datetime) -> datetime:
    """The time that names a master: the earliest DATE-OBS of its inputs, else `when`.

    The original named masters after the moment of combining. flatd uses the
    observation time instead: the name then says when the flats were taken, and the
    same inputs always give the same name (a re-run after a crash plans the same file,
    which unique naming turns into name-2 rather than a new date). `when` (the time
    of combining) is used only when no input has a date. Header dates are written as
    they are (usually UTC); `when` as given.
    """
    return _earliest(frames) or when


def name_fields(frames: Sequence[Frame], method_label: str, group_label: str, when: datetime) -> dict[str, str]:
    """The values of config.NAME_FIELDS for a group, as text (not yet sanitized).

    filter: most common FILTER ("nofilter" when none has one); binning "2x2"; size
    "4144x2822"; method: the original's label (Mean, Median, MinMaxClip2,
    SigmaClip2.0); date "YYYYmmdd-HHMMSS", time "HHMMSS", datetime "YYYYmmddTHHMMSS",
    all of :func:`session_time`; temperature: mean CCD-TEMP "%.1f" ("na" when
    unknown); exposure: mean exposure "%g" ("na"); instrument, telescope: most common
    ("none"); count: number of frames; group: `group_label`.
    """
    if not frames:
        raise ValueError("name_fields needs at least one frame")
    stamp = session_time(frames, when)
    temperature = _mean(f.temperature for f in frames)
    exposure = _mean(f.exposure for f in frames)
    return {
        "filter": str(_most_common(f.filter for f in frames) or "nofilter"),
        "binning": str(_most_common(f.binning for f in frames)),
        "size": str(_most_common(f.dimensions for f in frames)),
        "method": method_label,
        "date": stamp.strftime(DATE_FORMAT),
        "time": stamp.strftime(TIME_FORMAT),
        "datetime": stamp.strftime(DATETIME_FORMAT),
        "temperature": "na" if temperature is None else _temperature_text(temperature),
        "exposure": "na" if exposure is None else f"{exposure:g}",
        "instrument": str(_most_common(f.instrument for f in frames) or "none"),
        "telescope": str(_most_common(f.telescope for f in frames) or "none"),
        "count": str(len(frames)),
        "group": group_label or "none",
    }


# ------------------------------------------------------------------- header


def card_text(value: object, limit: int | None = 68) -> str:
    """Text safe for a FITS card: printable ASCII only, at most `limit` characters."""
    text = _ascii(str(value)).replace("\ufffd", "?")
    text = "".join(ch if 32 <= ord(ch) < 127 else " " for ch in text)
    text = re.sub(r"\s+", " ", text).strip()
    return text[:limit] if limit else text


def _wrap_card(text: str, width: int = 72) -> list[str]:
    """Text for HISTORY/COMMENT cards, wrapped at spaces (astropy would cut words);
    continuation cards are indented by two spaces."""
    return textwrap.wrap(text, width=width, subsequent_indent="  ", break_on_hyphens=False) or [""]


def _card_value(value: object) -> object:
    if isinstance(value, (bool, int, float, np.integer, np.floating)):
        return value
    if isinstance(value, datetime):
        return value.isoformat(timespec="milliseconds")
    return card_text(value)


_METHOD_PARAMS = (
    (re.compile(r"^SigmaClip([0-9.]+)$", re.I), "CLIPSIG", float, "sigma clip threshold (z-score)"),
    (re.compile(r"^MinMaxClip(\d+)$", re.I), "CLIPN", int, "min/max clip passes"),
)


def method_parameter(method_label: str) -> tuple[str, object, str] | None:
    """The parameter card for a method label: ("CLIPSIG", 2.0, ...) or ("CLIPN", 2, ...)."""
    for pattern, key, kind, comment in _METHOD_PARAMS:
        match = pattern.match(method_label.strip())
        if match:
            try:
                return key, kind(match.group(1)), comment
            except ValueError:
                return None
    return None


def _calibration_text(cal: Calibration) -> str:
    if cal.mode == "file" and cal.frame is not None:
        return f"minus {cal.frame.kind.value} {cal.frame.path}"
    if cal.mode == "pedestal":
        return f"minus pedestal {cal.pedestal:g}"
    return "no calibration"


def master_header(
    frames: Sequence[Frame],
    calibrations: Sequence[Calibration],
    method_description: str,
    method_label: str,
    normalization: str,
    factors: Sequence[float] | None = None,
    extra: Mapping[str, object] | None = None,
) -> fits.Header:
    """The header of a master flat (see DESIGN "Master FITS").

    IMAGETYP='Master Flat', FILTER (most common), XBINNING/YBINNING, EXPTIME and
    EXPOSURE (mean), CCD-TEMP and SET-TEMP (means, when known), DATE-OBS (earliest
    input), INSTRUME/TELESCOP (when every input agrees), NCOMBINE, COMBMETH and the
    method's parameter (CLIPSIG or CLIPN, parsed from the label), NORMALIZ, CALMODE
    (none|pedestal|file, "mixed" when inputs differ) and PEDESTAL when one pedestal
    was used, a COMMENT with `method_description`, one HISTORY line per input (file,
    what was subtracted, normalization factor), CREATOR "flatd <version>" and DATE
    (time written, UTC). `calibrations` and `factors` are per input, in the order of
    `frames`; an empty `calibrations` means none. `extra` adds or replaces cards:
    KEY -> value or (value, comment). Every text value is made card-safe (ASCII).
    CHECKSUM/DATASUM are added by :func:`write_master`.
    """
    if not frames:
        raise ValueError("a master needs at least one input frame")
    cals = list(calibrations) if calibrations else [Calibration()] * len(frames)
    if len(cals) != len(frames):
        raise ValueError(f"{len(cals)} calibrations for {len(frames)} frames")
    if factors is not None and len(factors) != len(frames):
        raise ValueError(f"{len(factors)} normalization factors for {len(frames)} frames")

    header = fits.Header()
    header["IMAGETYP"] = ("Master Flat", "type of image")
    filt = _most_common(f.filter for f in frames)
    if filt is not None:
        header["FILTER"] = (card_text(filt), "most common filter of the inputs")
    xbin, ybin = _most_common((f.xbin, f.ybin) for f in frames)
    header["XBINNING"] = (int(xbin), "binning factor, x")
    header["YBINNING"] = (int(ybin), "binning factor, y")
    exposure = _mean(f.exposure for f in frames)
    if exposure is not None:
        header["EXPTIME"] = (exposure, "[s] mean exposure of the inputs")
        header["EXPOSURE"] = (exposure, "[s] mean exposure of the inputs")
    temperature = _mean(f.temperature for f in frames)
    if temperature is not None:
        header["CCD-TEMP"] = (round(temperature, 3), "[C] mean sensor temperature of the inputs")
    set_temperature = _mean(f.set_temperature for f in frames)
    if set_temperature is not None:
        header["SET-TEMP"] = (round(set_temperature, 3), "[C] mean set-point of the inputs")
    first = _earliest(frames)
    if first is not None:
        header["DATE-OBS"] = (first.isoformat(timespec="milliseconds"), "start of the earliest input")
    for key, attr in (("INSTRUME", "instrument"), ("TELESCOP", "telescope")):
        values = {getattr(f, attr) for f in frames}
        if len(values) == 1 and None not in values:
            header[key] = card_text(values.pop())
    header["NCOMBINE"] = (len(frames), "number of frames combined")
    header["COMBMETH"] = (card_text(method_label), "combine method")
    param = method_parameter(method_label)
    if param is not None:
        key, value, comment = param
        header[key] = (value, comment)
    header["NORMALIZ"] = (card_text(normalization), "normalization of the inputs before combining")
    modes = {c.mode for c in cals}
    header["CALMODE"] = (modes.pop() if len(modes) == 1 else "mixed", "precalibration of the inputs")
    pedestals = {c.pedestal for c in cals if c.mode == "pedestal"}
    if len(pedestals) == 1 and all(c.mode == "pedestal" for c in cals):
        header["PEDESTAL"] = (float(pedestals.pop()), "pedestal subtracted from every input")
    header["CREATOR"] = (f"flatd {flatd.__version__}", "software that made this master")
    header["DATE"] = (datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"), "UTC time this file was written")
    if method_description:
        for part in _wrap_card(card_text(method_description, limit=None)):
            header.add_comment(part)
    for index, (frame, cal) in enumerate(zip(frames, cals), start=1):
        line = f"input {index}/{len(frames)}: {frame.path.name}; {_calibration_text(cal)}"
        if factors is not None:
            line += f"; normalization factor {float(factors[index - 1]):.6g}"
        for part in _wrap_card(card_text(line, limit=None)):
            header.add_history(part)
    for key, value in (extra or {}).items():
        comment = None
        if isinstance(value, tuple):
            value, comment = value
        header[card_text(key).upper()] = (_card_value(value), card_text(comment)) if comment else _card_value(value)
    return header


# ------------------------------------------------------------------- writing


def _numbered(path: Path, n: int) -> Path:
    """name.fits -> name-2.fits (n >= 2)."""
    return path.with_name(f"{path.stem}-{n}{path.suffix}")


def unique_path(path: Path) -> Path:
    """`path`, or path-2, path-3 ... (before the extension), whichever does not exist."""
    path = Path(path)
    if not os.path.lexists(path):
        return path
    n = 2
    while os.path.lexists(_numbered(path, n)):
        n += 1
    return _numbered(path, n)


def _candidates(path: Path, limit: int = 10000) -> Iterable[Path]:
    yield path
    for n in range(2, limit):
        yield _numbered(path, n)


class NoSpace(OSError):
    """The output folder's filesystem cannot hold the master."""


BLOCK = 2880
# Rows converted to big-endian at a time: bounded memory whatever the master's size.
WRITE_ROWS = 256


def _padded(n: int) -> int:
    return -(-n // BLOCK) * BLOCK


def master_bytes(hdu: fits.PrimaryHDU) -> int:
    """The size of the master file: header plus data, each padded to 2880 bytes."""
    return len(hdu.header.tostring()) + _padded(hdu.data.nbytes)


def free_bytes(directory: Path) -> int:
    """Bytes an unprivileged writer may still use on `directory`'s filesystem."""
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize


def _megabytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def no_space(directory: Path, needed: int) -> NoSpace:
    try:
        has = _megabytes(free_bytes(directory))
    except OSError:
        has = "?"
    return NoSpace(errno.ENOSPC, f"no space left on {directory}: needs {_megabytes(needed)}, has {has}")


def check_free_space(directory: Path, needed: int) -> None:
    """Raise NoSpace before writing when `directory` cannot hold `needed` bytes."""
    try:
        free = free_bytes(directory)
    except OSError:
        return  # no figure (some network filesystems): the write itself will tell
    if free < needed:
        raise no_space(directory, needed)


def _write_hdu(handle, hdu: fits.PrimaryHDU) -> None:
    """The HDU's bytes, written by flatd: astropy's writer hides ENOSPC behind an
    AttributeError, and this one converts the rows to big-endian a band at a time."""
    header = hdu.header.tostring().encode("ascii")
    handle.write(header)
    data = hdu.data
    big = np.dtype(data.dtype).newbyteorder(">")
    for r0 in range(0, data.shape[0], WRITE_ROWS):
        handle.write(np.ascontiguousarray(data[r0:r0 + WRITE_ROWS], dtype=big).tobytes())
    handle.write(b"\0" * (_padded(data.nbytes) - data.nbytes))


def write_master(directory: Path, name: str, data: np.ndarray, header: fits.Header) -> Path:
    """Write a master atomically and without overwriting; return its final path.

    32-bit float primary HDU with CHECKSUM/DATASUM. The free space is checked first
    (NoSpace names the folder, what is needed and what is free). The file is written
    under a hidden temp name in `directory` (".flatd-<name>-<random>.tmp", which
    watchers ignore), flushed and fsynced, then linked to `name`, or name-2, name-3 ...
    when taken, and the folder is fsynced. On any failure the temp file is removed and
    nothing stands under a final name. `directory` is created when missing.
    """
    check_file_name(name)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    array = np.asarray(data)
    if array.ndim != 2:
        raise ValueError(f"a master must be a 2-D image, not {array.ndim}-D")
    clean = header.copy()
    for key in ("BZERO", "BSCALE", "BLANK", "CHECKSUM", "DATASUM"):
        clean.remove(key, ignore_missing=True, remove_all=True)
    hdu = fits.PrimaryHDU(array.astype(np.float32, copy=False), header=clean)
    hdu.add_checksum()
    needed = master_bytes(hdu)
    check_free_space(directory, needed)

    temp, fd = create_temp(directory, safe_component(name, "master"))
    final: Path | None = None
    try:
        try:
            with os.fdopen(fd, "wb") as handle:
                _write_hdu(handle, hdu)
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise no_space(directory, needed) from None
            raise
        final = link_no_replace(temp, _candidates(directory / name))
        try:
            fsync_dir(directory)
        except OSError:
            os.unlink(final)
            raise
        return final
    except BaseException:
        try:
            os.unlink(temp)
        except FileNotFoundError:
            pass
        except OSError:
            pass
        raise


def is_temp_name(name: str) -> bool:
    return name.startswith(TEMP_PREFIX) and name.endswith(TEMP_SUFFIX)


def cleanup_temp_files(directory: Path, min_age: float = 0.0) -> list[Path]:
    """Remove flatd's leftover temp files (".flatd-*.tmp") in `directory` (not below).

    For crash recovery at start-up. Only regular files whose name flatd makes are
    touched; `min_age` (seconds since the last change) spares a temp file that another
    flatd process may still be writing. Returns the files removed.
    """
    directory = Path(directory)
    removed: list[Path] = []
    try:
        entries = list(os.scandir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return removed
    now = time.time()
    for entry in entries:
        if not is_temp_name(entry.name):
            continue
        try:
            if not entry.is_file(follow_symlinks=False):
                continue
            if min_age and now - entry.stat(follow_symlinks=False).st_mtime < min_age:
                continue
            os.unlink(entry.path)
        except FileNotFoundError:
            continue
        removed.append(Path(entry.path))
    return removed
