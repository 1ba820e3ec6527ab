"""Keywords carried from the input flats into their master (``output.carry``).

Pure: no numpy, no astropy. :func:`carry` compares one keyword's raw values across the
inputs (``Frame.headers``) and says whether the master gets it, and with which value.

* Text agrees when it is the same once control characters and surrounding blanks are
  gone (``'RGGB    '`` and ``'RGGB'`` agree).
* Numbers agree when they differ by at most half a unit of the coarser precision they
  were written with: 4.63 and 4.630 agree, 2.9 and 2.90000009536743 agree (to 0.05), 120
  and 121 do not. The reader keeps no trailing zeros, so the precision of a number is that
  of its shortest form (4.630 counts as 4.63). The master gets the value written with the
  coarsest precision (2.9, not 2.90000009536743).
* Text that reads as a number (GAIN = '120' in one file, 120 in another) counts as that
  number when every input's value is a number; otherwise every value is compared as text.
* A keyword that some inputs lack, that the inputs disagree on, or whose number is NaN or
  infinite, is not carried: a HISTORY line names it and the values (never an arbitrary
  pick). A keyword that no input has is left out silently.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Iterable, Mapping, Optional, Sequence

from flatd.log import printable

# The default of output.carry: camera settings, sensor geometry and CFA layout, optics,
# and the observatory's location in the spellings capture programs use.
CAMERA_KEYS = ("GAIN", "OFFSET", "READOUTM", "XPIXSZ", "YPIXSZ", "FOCALLEN", "BAYERPAT", "XBAYROFF", "YBAYROFF",
               "ROWORDER", "INSTRUME", "TELESCOP", "SET-TEMP")
SITE_KEYS = ("SITENAME", "OBSERVAT", "SITELAT", "SITELONG", "SITEELEV", "OBSGEO-B", "OBSGEO-L", "OBSGEO-H",
             "OBSGEO-X", "OBSGEO-Y", "OBSGEO-Z", "LAT-OBS", "LONG-OBS", "ALT-OBS")
DEFAULT_CARRY = CAMERA_KEYS + SITE_KEYS

# Cards that describe the file's structure or checksum: never copied from an input.
STRUCTURAL = frozenset({"SIMPLE", "BITPIX", "NAXIS", "EXTEND", "BZERO", "BSCALE", "BLANK", "PCOUNT", "GCOUNT",
                        "XTENSION", "END", "CHECKSUM", "DATASUM", "HISTORY", "COMMENT", "CONTINUE", "EXTNAME",
                        "ZIMAGE", "ZCMPTYPE", "ZBITPIX", "ZNAXIS", "ZTILE", "ZQUANTIZ", "ZDITHER0"})
_KEYWORD = re.compile(r"^[A-Z0-9_-]{1,8}$")
_STRUCTURAL_PATTERN = re.compile(r"^(NAXIS|ZNAXIS|ZTILE|ZNAME|ZVAL)\d+$")
_NUMBER_TEXT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")
# Values shown in a HISTORY line, each cut to this many characters.
SHOW_CHARS = 24
SHOW_VALUES = 4
# Integers beyond 64 bits do not fit a FITS integer card everywhere.
MAX_INTEGER = 2**63 - 1


def check_carry_key(value: object) -> str:
    """A keyword for output.carry, upper-cased; ValueError for a non-keyword or a structural one."""
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not a FITS keyword")
    key = value.strip().upper()
    if not _KEYWORD.match(key):
        raise ValueError(f"{value!r} is not a FITS keyword (1-8 of A-Z, 0-9, '-', '_')")
    if key in STRUCTURAL or _STRUCTURAL_PATTERN.match(key):
        raise ValueError(f"{key} describes the file itself and cannot be carried")
    return key


@dataclass(frozen=True)
class Carried:
    """The verdict on one keyword: `value` to write (None: not carried) and why not."""

    key: str
    value: object = None
    note: Optional[str] = None

    @property
    def carried(self) -> bool:
        return self.value is not None


def _number(value: object) -> Optional[tuple[float, int, object]]:
    """(number, decimal exponent of its printed precision, value to write) or None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return float(value) if abs(value) <= MAX_INTEGER else math.inf, 0, value
    if isinstance(value, float):
        text = repr(value)
    elif isinstance(value, str) and _NUMBER_TEXT.match(value.strip()):
        text = value.strip()
    else:
        return None
    if not math.isfinite(float(text)):
        return float(text), 0, value
    try:
        exponent = Decimal(text).as_tuple().exponent
    except InvalidOperation:  # pragma: no cover - the pattern admits only decimals
        return None
    return float(text), int(exponent), value if not isinstance(value, str) else text


def _show(value: object) -> str:
    text = repr(value) if isinstance(value, float) else printable(value).strip()
    text = text if isinstance(value, (int, float)) else f"'{text}'"
    return text if len(text) <= SHOW_CHARS else text[:SHOW_CHARS - 3] + "..."


def _values_text(values: Sequence[object]) -> str:
    counts = Counter(_show(v) for v in values)
    parts = [f"{text} ({n} input{'s' if n > 1 else ''})" for text, n in counts.most_common(SHOW_VALUES)]
    if len(counts) > SHOW_VALUES:
        parts.append(f"{len(counts) - SHOW_VALUES} more")
    return ", ".join(parts)


def _carry_numbers(key: str, values: Sequence[object], numbers: list[tuple[float, int, object]]) -> Carried:
    bad = [v for v, (x, _, _) in zip(values, numbers) if not math.isfinite(x)]
    if bad:
        return Carried(key, note=f"{key} not carried: not a finite number (or out of range) in {len(bad)} of "
                                 f"{len(values)} inputs ({_values_text(bad)})")
    coarsest = max(numbers, key=lambda n: n[1])
    spread = max(x for x, _, _ in numbers) - min(x for x, _, _ in numbers)
    if spread <= 0.5 * 10.0 ** coarsest[1] * (1 + 1e-9):
        return Carried(key, _as_written(coarsest[2], any(not isinstance(v, str) for v in values)))
    return Carried(key, note=f"{key} not carried: the inputs disagree: {_values_text(values)}")


def _as_written(value: object, as_number: bool) -> object:
    """A number card's value, or a number text converted when some input wrote a number card."""
    if not isinstance(value, str) or not as_number:
        return value
    return int(value) if re.fullmatch(r"[+-]?\d+", value) else float(value)


def _carry_texts(key: str, values: Sequence[object]) -> Carried:
    texts = {(type(v) is bool, printable(v).strip()) for v in values}
    if len(texts) == 1:
        flag, text = texts.pop()
        return Carried(key, values[0] if flag else text)
    return Carried(key, note=f"{key} not carried: the inputs disagree: {_values_text(values)}")


def carry_one(key: str, headers: Sequence[Mapping[str, object]]) -> Optional[Carried]:
    """The verdict on `key` over the inputs' raw cards; None when no input has it."""
    values = [h.get(key) for h in headers]
    present = [v for v in values if v is not None and not (isinstance(v, str) and not printable(v).strip())]
    if not present:
        return None
    if len(present) < len(values):
        return Carried(key, note=f"{key} not carried: missing from {len(values) - len(present)} of "
                                 f"{len(values)} inputs (others: {_values_text(present)})")
    numbers = [_number(v) for v in present]
    if all(n is not None for n in numbers):
        return _carry_numbers(key, present, numbers)
    return _carry_texts(key, present)


def carry(keys: Iterable[str], headers: Sequence[Mapping[str, object]]) -> list[Carried]:
    """A verdict for each of `keys` (once each, in order) that some input has."""
    out: list[Carried] = []
    seen: set[str] = set()
    for raw in keys:
        key = str(raw).upper()
        if key in seen or key in STRUCTURAL or _STRUCTURAL_PATTERN.match(key):
            continue
        seen.add(key)
        verdict = carry_one(key, headers)
        if verdict is not None:
            out.append(verdict)
    return out
