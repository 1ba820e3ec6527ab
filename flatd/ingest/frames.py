"""Reading FITS headers into typed frames, without touching the pixels.

Headers are parsed from the raw 2880-byte blocks: it is an order of magnitude faster
than building an astropy Header, and it gives the byte offset of the data, which the
stacker needs to memory-map row bands. Tile-compressed files (`.fits.fz`) are
recognised by their ZIMAGE binary table; their pixels are read through astropy.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from pathlib import Path
from stat import S_ISDIR, S_ISREG
from typing import Iterable, Mapping, Optional, Sequence

from flatd.errors import FlatdError
from flatd.log import printable

BLOCK = 2880
CARD = 80
FITS_SUFFIXES = (".fit", ".fits", ".fts", ".fit.fz", ".fits.fz", ".fz", ".xisf")  # candidates: FITS and XISF
IGNORED_PATTERNS = (re.compile(r"^[.~]"), re.compile(r"\.(tmp|part|partial|crdownload)$", re.I))
# Headers longer than this are not FITS written by a camera; stop reading.
MAX_HEADER_BLOCKS = 200


class Kind(str, Enum):
    FLAT = "flat"
    DARK = "dark"
    BIAS = "bias"
    LIGHT = "light"
    DARK_FLAT = "dark-flat"
    MASTER = "master"
    UNKNOWN = "unknown"


class FrameError(FlatdError):
    """A file that cannot be used as a frame; carries the file and the reason."""

    def __init__(self, path: Path | str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)
        self.reason = reason


@dataclass(frozen=True)
class KeywordMap:
    """Header keywords tried in order for each fact; settable in the rules file."""

    imagetype: tuple[str, ...] = ("IMAGETYP", "FRAME", "FRAMETYP", "OBSTYPE")
    filter: tuple[str, ...] = ("FILTER", "FILTNAME", "FILTER1", "FILT-1")
    exposure: tuple[str, ...] = ("EXPOSURE", "EXPTIME", "EXP", "ITIME")
    temperature: tuple[str, ...] = ("CCD-TEMP", "CCDTEMP", "DETTEMP", "CCD_TEMP", "TEMPERAT", "SENSTEMP")
    xbinning: tuple[str, ...] = ("XBINNING", "CCDXBIN", "BINX", "XBIN")
    ybinning: tuple[str, ...] = ("YBINNING", "CCDYBIN", "BINY", "YBIN")
    date: tuple[str, ...] = ("DATE-OBS", "DATE-LOC", "DATE")
    instrument: tuple[str, ...] = ("INSTRUME", "CAMERA")
    telescope: tuple[str, ...] = ("TELESCOP",)
    # camera settings: EGAIN (e-/ADU) and PEDESTAL are not settings and are not read here
    gain: tuple[str, ...] = ("GAIN", "CAMGAIN", "ISOSPEED", "ISO")
    offset: tuple[str, ...] = ("OFFSET", "BLKLEVEL", "CAMOFFST", "BLACKLEV")
    readout: tuple[str, ...] = ("READOUTM", "READMODE", "READOUT", "CAMMODE")
    bayer: tuple[str, ...] = ("BAYERPAT", "COLORTYP", "CFA-PAT", "CFAPAT", "BAYPAT", "CFAIMAGE")
    xbayeroff: tuple[str, ...] = ("XBAYROFF", "BAYOFFX", "XBAYOFF")
    ybayeroff: tuple[str, ...] = ("YBAYROFF", "BAYOFFY", "YBAYOFF")
    roworder: tuple[str, ...] = ("ROWORDER",)

    @classmethod
    def from_mapping(cls, overrides: Mapping[str, Sequence[str]] | None) -> "KeywordMap":
        """Keywords given in the rules file are tried first, then the defaults."""
        if not overrides:
            return cls()
        base = cls()
        merged = {}
        for name, keys in overrides.items():
            default = getattr(base, name)
            extra = tuple(k.upper() for k in keys)
            merged[name] = extra + tuple(k for k in default if k not in extra)
        return cls(**merged)


DEFAULT_KEYWORDS = KeywordMap()


@dataclass(frozen=True)
class Frame:
    """Facts about one FITS image, read from its header."""

    path: Path
    kind: Kind
    width: int
    height: int
    xbin: int = 1
    ybin: int = 1
    filter: str | None = None
    exposure: float | None = None
    temperature: float | None = None
    set_temperature: float | None = None
    date: datetime | None = None
    local_date: datetime | None = None  # DATE-LOC: the observatory's local time (N.I.N.A., SGP)
    instrument: str | None = None
    telescope: str | None = None
    software: str | None = None
    gain: float | None = None
    offset: float | None = None
    readout_mode: str | None = None
    bayer_pattern: str | None = None  # 'RGGB', 'GBRG'...: a colour (CFA) sensor; None for mono
    bayer_offset: tuple[int, int] = (0, 0)  # XBAYROFF, YBAYROFF
    row_order: str = "TOP-DOWN"  # or 'BOTTOM-UP' (ROWORDER)
    bitpix: int = 16
    bzero: float = 0.0
    bscale: float = 1.0
    naxis: int = 2
    planes: int = 1
    hdu_index: int = 0
    compressed: bool = False
    data_offset: int = 0
    data_bytes: int = 0
    file_size: int = 0
    mtime: float = 0.0
    device: int = 0
    inode: int = 0
    headers: Mapping[str, object] = field(default_factory=dict, compare=False, repr=False)

    @property
    def binning(self) -> str:
        return f"{self.xbin}x{self.ybin}"

    @property
    def dimensions(self) -> str:
        return f"{self.width}x{self.height}"

    @property
    def size_key(self) -> tuple[int, int, int, int]:
        """Binning plus dimensions: frames with different keys never combine."""
        return (self.xbin, self.ybin, self.width, self.height)

    @property
    def required_bytes(self) -> int:
        """Bytes the file must hold for its data to be complete.

        The padding of the last block to 2880 bytes is not required: some writers leave
        it out, and the pixels are all there without it.
        """
        return self.data_offset + self.data_bytes

    def header_value(self, key: str) -> object:
        return self.headers.get(key.upper())


# --------------------------------------------------------------------------- parsing


def _padded(n: int) -> int:
    return -(-n // BLOCK) * BLOCK


_INTEGER = re.compile(r"[+-]?\d+\Z")


def parse_card_value(text: str) -> object:
    """The value of one card's value field (columns 11-80): str, bool, int or float."""
    text = text.lstrip()
    if text.startswith("'"):
        # A quote inside a string is written twice; the string ends at a lone quote.
        end = text.find("'", 1)
        while end != -1 and text.startswith("'", end + 1):
            end = text.find("'", end + 2)
        body = text[1:] if end == -1 else text[1:end]
        return body.replace("''", "'").rstrip()
    slash = text.find("/")
    value = (text if slash == -1 else text[:slash]).strip()
    if not value:
        return None
    if value == "T":
        return True
    if value == "F":
        return False
    if _INTEGER.match(value):
        return int(value)
    try:
        return float(value.replace("D", "E").replace("d", "e"))
    except ValueError:
        return value


def parse_header_bytes(raw: bytes) -> dict[str, object] | None:
    """Cards of one header up to END, or None if END is not in `raw`."""
    cards: dict[str, object] = {}
    text = raw.decode("ascii", errors="replace")
    for start in range(0, len(text) - CARD + 1, CARD):
        card = text[start : start + CARD]
        key = card[:8].rstrip()
        if key == "END":
            return cards
        if card[8:10] == "= " and key not in cards:
            cards[key] = parse_card_value(card[10:])
    return None


def _has_end_card(block: bytes) -> bool:
    return any(block[i : i + 8] == b"END     " for i in range(0, BLOCK, CARD))


def read_raw_header(handle, path: Path, offset: int) -> tuple[dict[str, object], int]:
    """Parse the header that starts at `offset`; return its cards and the data offset."""
    handle.seek(offset)
    raw = b""
    for _ in range(MAX_HEADER_BLOCKS):
        block = handle.read(BLOCK)
        if len(block) < BLOCK:
            if not raw and offset == 0 and not block:
                raise FrameError(path, "empty file (zero length)")
            raise FrameError(path, "truncated header (file ends before END card)")
        raw += block
        if _has_end_card(block):
            return parse_header_bytes(raw) or {}, offset + len(raw)
    raise FrameError(path, f"no END card in the first {MAX_HEADER_BLOCKS} header blocks")


VALID_BITPIX = (8, 16, 32, 64, -32, -64)


def _integer_card(cards: Mapping[str, object], key: str, path: Path, default: int | None = None) -> int:
    """A structural keyword that must hold an integer; a clear FrameError otherwise."""
    value = cards.get(key, default)
    if value is None:
        raise FrameError(path, f"missing {key} keyword")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FrameError(path, f"{key} = {value!r} is not an integer")
    if isinstance(value, float):
        if not value.is_integer():
            raise FrameError(path, f"{key} = {value!r} is not an integer")
        value = int(value)
    return value


def check_structure(cards: Mapping[str, object], path: Path, prefix: str = "") -> None:
    """BITPIX, NAXIS and NAXISn present and of the right type, as the standard requires.

    `prefix` is "Z" for the image keywords of a tile-compressed extension.
    """
    bitpix = _integer_card(cards, f"{prefix}BITPIX", path)
    if bitpix not in VALID_BITPIX:
        raise FrameError(path, f"{prefix}BITPIX = {bitpix} is not a FITS data type (8, 16, 32, 64, -32, -64)")
    naxis = _integer_card(cards, f"{prefix}NAXIS", path)
    if not 0 <= naxis <= 999:
        raise FrameError(path, f"{prefix}NAXIS = {naxis} is out of range (0..999)")
    for i in range(1, naxis + 1):
        length = _integer_card(cards, f"{prefix}NAXIS{i}", path)
        if length < 0:
            raise FrameError(path, f"{prefix}NAXIS{i} = {length} is negative")
    if not prefix:
        if _integer_card(cards, "PCOUNT", path, 0) < 0:
            raise FrameError(path, "PCOUNT is negative")
        if _integer_card(cards, "GCOUNT", path, 1) < 0:
            raise FrameError(path, "GCOUNT is negative")


def _data_bytes(cards: Mapping[str, object]) -> int:
    """Size of the data that follows a header (checked by check_structure first)."""
    naxis = int(cards.get("NAXIS", 0) or 0)
    if naxis == 0:
        return 0
    n = abs(int(cards.get("BITPIX", 8))) // 8
    for i in range(1, naxis + 1):
        n *= int(cards.get(f"NAXIS{i}", 0) or 0)
    gcount = int(cards.get("GCOUNT", 1) or 1)
    pcount = int(cards.get("PCOUNT", 0) or 0)
    return gcount * (n + pcount)


def read_header_cards(path: Path) -> tuple[dict[str, object], dict]:
    """Cards of the image header (primary, or the first image/compressed extension).

    Returns the merged cards (primary first, the image extension's on top) and the
    layout: hdu index, data offset, data bytes, compressed flag, BITPIX and axes.
    A name ending in .xisf is read as XISF (flatd.ingest.xisf), into the same cards.
    """
    path = Path(path)
    if path.name.lower().endswith(".xisf"):
        from flatd.ingest.xisf import read_xisf_cards

        return read_xisf_cards(path)
    try:
        handle = open(path, "rb")
    except OSError as exc:
        raise FrameError(path, f"cannot open: {exc.strerror or exc}") from None
    try:
        with handle:
            return _read_header_cards(handle, path)
    except OSError as exc:
        raise FrameError(path, f"read error: {exc.strerror or exc}") from None


def read_header_from(fd: int, path: Path) -> tuple[dict[str, object], dict]:
    """read_header_cards on an already open descriptor, which stays open (its offset
    moves; pixels are read with pread)."""
    with os.fdopen(os.dup(fd), "rb") as handle:
        try:
            return _read_header_cards(handle, Path(path))
        except OSError as exc:
            raise FrameError(path, f"read error: {exc.strerror or exc}") from None


def _read_header_cards(handle, path: Path) -> tuple[dict[str, object], dict]:
    first = handle.read(10)
    if not first:
        raise FrameError(path, "empty file (zero length)")
    if not first.startswith(b"SIMPLE  ="):
        raise FrameError(path, "not a FITS file (no SIMPLE card at the start)")
    primary, data_offset = read_raw_header(handle, path, 0)
    check_structure(primary, path)
    layout = _image_layout(primary, 0, data_offset, compressed=False)
    if primary["NAXIS"] != 0 or not primary.get("EXTEND", False):
        return primary, layout
    ext_offset = data_offset + _padded(_data_bytes(primary))
    handle.seek(ext_offset)
    if not handle.read(1):
        return primary, layout
    ext, ext_data = read_raw_header(handle, path, ext_offset)
    xtension = str(ext.get("XTENSION", "")).strip().upper()
    if xtension in ("BINTABLE", "IMAGE"):
        check_structure(ext, path)
    if xtension == "BINTABLE" and ext.get("ZIMAGE") is True:
        check_structure(ext, path, prefix="Z")
        merged = {**primary, **{k: v for k, v in ext.items() if not k.startswith("NAXIS") and k != "BITPIX"}}
        merged["BITPIX"] = ext["ZBITPIX"]
        merged["NAXIS"] = ext["ZNAXIS"]
        for i in range(1, ext["ZNAXIS"] + 1):
            merged[f"NAXIS{i}"] = ext[f"ZNAXIS{i}"]
        return merged, _image_layout(merged, 1, ext_data, compressed=True, stored=_data_bytes(ext))
    if xtension == "IMAGE":
        merged = {**primary, **ext}
        return merged, _image_layout(merged, 1, ext_data, compressed=False)
    return primary, layout


def _image_layout(cards, hdu, offset, compressed, stored=None) -> dict:
    return {
        "hdu_index": hdu,
        "data_offset": offset,
        "data_bytes": stored if stored is not None else _data_bytes(cards),
        "compressed": compressed,
    }


# --------------------------------------------------------------------------- facts


def _first(cards: Mapping[str, object], keys: Iterable[str]) -> object:
    return _first_card(cards, keys)[1]


def _first_card(cards: Mapping[str, object], keys: Iterable[str]) -> tuple[str | None, object]:
    """The first keyword of `keys` with a value, and that value; (None, None) if none has one."""
    for key in keys:
        value = cards.get(key)
        if value is not None and value != "":
            return key, value
    return None, None


def _as_number(value: object) -> float | None:
    """A value read as a number, NaN and infinities included; None if it is not one."""
    if value is None or isinstance(value, bool):
        return None
    try:
        return float(str(value).strip().replace(",", "."))
    except ValueError:
        return None


def _as_float(value: object) -> float | None:
    number = _as_number(value)
    return number if number is not None and math.isfinite(number) else None


def _as_text(value: object) -> str | None:
    """Header text without control characters or terminal escape sequences."""
    if value is None:
        return None
    text = printable(value).strip()
    return text or None


@dataclass(frozen=True)
class Limits:
    """The values a physical fact can take; anything else is a broken header."""

    low: float
    high: float
    unit: str

    def __contains__(self, value: float) -> bool:
        return self.low <= value <= self.high  # False for NaN too

    def __str__(self) -> str:
        sign = "+" if self.low < 0 < self.high else ""
        return f"{self.low:,g}..{sign}{self.high:,g} {self.unit}"


# Camera gains run 0..~5000 (ISO up to 409600 on cameras written by DSLR tools).
GAIN_LIMITS = Limits(0.0, 1_000_000.0, "")
OFFSET_LIMITS = Limits(-100_000.0, 100_000.0, "ADU")
# Liquid-nitrogen-cooled CCDs run near -100 °C (Lowell's LOIS writes DETTEMP = -102.125).
TEMPERATURE_LIMITS = Limits(-200.0, 60.0, "°C")
EXPOSURE_LIMITS = Limits(0.0, 100_000.0, "s")


def _show(value: object) -> str:
    """A header value as it appears in a reason: numbers plain, text quoted."""
    return f"'{printable(value)}'" if isinstance(value, str) else printable(value)


def _measured(cards: Mapping[str, object], keys: Iterable[str], limits: Limits, path: Path) -> float | None:
    """A physical fact from the first of `keys` that has a value.

    Missing, or text that is no number at all ('N/A'), is None; a number that is NaN,
    infinite or outside `limits` is a FrameError naming the keyword and the value, so
    that the file is left out with the reason rather than crashing what follows.
    """
    key, value = _first_card(cards, keys)
    number = _as_number(value)
    if number is None:
        return None
    if math.isnan(number):
        raise FrameError(path, f"{key} = {_show(value)} is not a number")
    if number not in limits:
        raise FrameError(path, f"{key} = {_show(value)} is outside {limits}")
    return number


def _setting(cards: Mapping[str, object], keys: Iterable[str], limits: Limits) -> float | None:
    """A camera setting (gain, offset): a number within `limits`, else None (not known).

    A broken setting does not make the frame unusable; it only stops it from being
    told apart by that setting, and matching treats it as missing.
    """
    number = _as_float(_first(cards, keys))
    return number if number is not None and number in limits else None


_BAYER = re.compile(r"^[RGB]{4}$")


def parse_bayer(cards: Mapping[str, object], keywords: "KeywordMap") -> str | None:
    """The CFA pattern ('RGGB', 'GBRG', ...) of a colour sensor; None for mono or nonsense."""
    text = _as_text(_first(cards, keywords.bayer))
    if text is None:
        return None
    text = text.upper().replace(" ", "")
    return text if _BAYER.match(text) and set(text) == {"R", "G", "B"} else None


def _bayer_offset(cards: Mapping[str, object], keys: Iterable[str]) -> int:
    """XBAYROFF/YBAYROFF: only the parity matters; anything not a whole number is 0."""
    number = _as_float(_first(cards, keys))
    return int(number) % 2 if number is not None and number.is_integer() and abs(number) < 1e9 else 0


def parse_row_order(cards: Mapping[str, object], keywords: "KeywordMap") -> str:
    text = (_as_text(_first(cards, keywords.roworder)) or "").upper().replace("_", "-").replace(" ", "-")
    return "BOTTOM-UP" if text in ("BOTTOM-UP", "BOTTOMUP") else "TOP-DOWN"


def _scaling(cards: Mapping[str, object], path: Path) -> tuple[float, float]:
    """BSCALE and BZERO (1 and 0 when missing): finite numbers, BSCALE not 0."""
    bscale = _scaling_card(cards, "BSCALE", 1.0, path)
    if bscale == 0:
        raise FrameError(path, "BSCALE = 0 would make every pixel equal to BZERO")
    return bscale, _scaling_card(cards, "BZERO", 0.0, path)


def _scaling_card(cards: Mapping[str, object], key: str, default: float, path: Path) -> float:
    value = cards.get(key)
    if value is None:
        return default
    number = _as_number(value)
    if number is None or not math.isfinite(number):
        raise FrameError(path, f"{key} = {_show(value)} is not a finite number")
    return number


_BINNING_PAIR = re.compile(r"^\s*(\d+)\s*[x*X ,]\s*(\d+)\s*$")


def _binning_factor(value: object) -> int | None:
    """A binning factor: a whole number from 1 up; anything else counts as missing."""
    number = _as_float(value)
    if number is None or not number.is_integer() or not 1 <= number <= 1024:
        return None
    return int(number)


def parse_binning(cards: Mapping[str, object], keywords: KeywordMap = DEFAULT_KEYWORDS) -> tuple[int, int]:
    """XBINNING/YBINNING, else CCDXBIN/CCDYBIN, else CCDSUM '3 3', else BINNING '2*2'."""
    xb = _binning_factor(_first(cards, keywords.xbinning))
    yb = _binning_factor(_first(cards, keywords.ybinning))
    if xb is None:
        for key in ("CCDSUM", "BINNING"):
            match = _BINNING_PAIR.match(str(cards.get(key, "")))
            if match:
                pair = _binning_factor(match.group(1)), _binning_factor(match.group(2))
                if pair[0] is not None and pair[1] is not None:
                    return pair
        single = cards.get("BINNING")
        if isinstance(single, int) and not isinstance(single, bool) and _binning_factor(single):
            return single, single
        return 1, 1
    return xb, yb if yb is not None else xb


_DATE_RE = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})(?:[T ](\d{2}):(\d{2})(?::(\d{2})(?:\.(\d+))?)?)?"
)


def parse_date(value: object) -> datetime | None:
    """FITS dates: a date alone, or with a time and any number of decimals."""
    match = _DATE_RE.match(str(value or "").strip())
    if not match:
        return None
    y, mo, d, h, mi, s, frac = match.groups()
    micro = int((frac or "0")[:6].ljust(6, "0"))
    try:
        return datetime(int(y), int(mo), int(d), int(h or 0), int(mi or 0), int(s or 0), micro)
    except ValueError:
        return None


# Where a date-only DATE-OBS (Lowell LOIS: '2019-03-26') finds its time of day.
_TIME_KEYS = ("TIME-OBS", "UTC-OBS", "UTCSTART", "UT", "TIME-BEG")
_TIME_RE = re.compile(r"^\s*(\d{1,2}):(\d{2})(?::(\d{2})(?:\.(\d+))?)?\s*$")


def observation_date(cards: Mapping[str, object], keywords: KeywordMap = DEFAULT_KEYWORDS) -> datetime | None:
    """The date keyword (DATE-OBS...), completed by a separate time card when it has no time."""
    value = _first(cards, keywords.date)
    date = parse_date(value)
    if date is None or "T" in str(value) or ":" in str(value):
        return date
    for key in _TIME_KEYS:
        match = _TIME_RE.match(str(cards.get(key) or ""))
        if match:
            h, mi, sec, frac = match.groups()
            micro = int((frac or "0")[:6].ljust(6, "0"))
            try:
                return date.replace(hour=int(h), minute=int(mi), second=int(sec or 0), microsecond=micro)
            except ValueError:
                return date
    return date


# TheSkyX PICTTYPE codes.
_PICTTYPE = {1: Kind.LIGHT, 2: Kind.BIAS, 3: Kind.DARK, 4: Kind.FLAT}
_DARK_FLAT = re.compile(r"DARK[\s_-]*FLAT|FLAT[\s_-]*DARK")
_KIND_WORDS = (("BIAS", Kind.BIAS), ("ZERO", Kind.BIAS), ("OFFSET", Kind.BIAS), ("DARK", Kind.DARK),
               ("FLAT", Kind.FLAT), ("LIGHT", Kind.LIGHT), ("OBJECT", Kind.LIGHT), ("SCIENCE", Kind.LIGHT))
_NAME_WORDS = (("darkflat", Kind.DARK_FLAT), ("flatdark", Kind.DARK_FLAT), ("bias", Kind.BIAS),
               ("dark", Kind.DARK), ("flat", Kind.FLAT), ("light", Kind.LIGHT))


def kind_from_imagetype(text: str) -> Kind | None:
    """IMAGETYP, upper-cased and matched as a substring, as the original does, plus
    masters and dark-flats, which the original took for plain flats or darks."""
    upper = text.upper()
    if "MASTER" in upper:
        return Kind.MASTER
    if _DARK_FLAT.search(upper):
        return Kind.DARK_FLAT
    for word, kind in _KIND_WORDS:
        if word in upper:
            return kind
    return None


def kind_from_name(path: Path) -> Kind:
    name = path.name.lower().replace("-", "").replace("_", "").replace(" ", "")
    for word, kind in _NAME_WORDS:
        if word in name:
            return kind
    return Kind.UNKNOWN


_STACK_COUNTS = ("NCOMBINE", "NUMFRAME", "STACKCNT", "NFRAMES")


def is_stacked(cards: Mapping[str, object]) -> bool:
    """A master or integration written by flatd or another stacker: never an input."""
    if str(cards.get("CREATOR", "")).startswith("flatd"):
        return True
    if "MASTER" in str(cards.get("CALFRAME", "")).upper() or "INTEGRAT" in cards:
        return True
    for key in _STACK_COUNTS:
        count = cards.get(key)
        if isinstance(count, (int, float)) and not isinstance(count, bool) and count > 1:
            return True
    return False


def detect_kind(cards: Mapping[str, object], path: Path, keywords: KeywordMap = DEFAULT_KEYWORDS) -> Kind:
    """PICTTYPE first, then IMAGETYP (or its fallbacks), then the file name."""
    if is_stacked(cards):
        return Kind.MASTER
    pict = cards.get("PICTTYPE")
    if isinstance(pict, (int, float)) and not isinstance(pict, bool) and int(pict) in _PICTTYPE:
        kind = _PICTTYPE[int(pict)]
        imagetype = _as_text(_first(cards, keywords.imagetype))
        if imagetype and kind_from_imagetype(imagetype) in (Kind.MASTER, Kind.DARK_FLAT):
            return kind_from_imagetype(imagetype)
        return kind
    imagetype = _as_text(_first(cards, keywords.imagetype))
    if imagetype:
        kind = kind_from_imagetype(imagetype)
        if kind is not None:
            return kind
    return kind_from_name(path)


def frame_from_cards(
    cards: Mapping[str, object],
    path: Path | str,
    layout: Mapping[str, object] | None = None,
    keywords: KeywordMap = DEFAULT_KEYWORDS,
    stat: os.stat_result | None = None,
) -> Frame:
    """A Frame from already-parsed header cards (no file access)."""
    path = Path(path)
    layout = layout or {}

    def integer(key: str, default: int) -> int:
        return _integer_card(cards, key, path, default) if cards.get(key) is not None else default

    naxis = integer("NAXIS", 0)
    xbin, ybin = parse_binning(cards, keywords)
    bscale, bzero = _scaling(cards, path)
    software = _as_text(_first(cards, ("SWCREATE", "CREATOR", "PROGRAM", "SOFTWARE", "ORIGIN")))
    return Frame(
        path=path,
        kind=detect_kind(cards, path, keywords),
        width=integer("NAXIS1", 0) if naxis >= 1 else 0,
        height=integer("NAXIS2", 0) if naxis >= 2 else 0,
        xbin=xbin,
        ybin=ybin,
        filter=_as_text(_first(cards, keywords.filter)),
        exposure=_measured(cards, keywords.exposure, EXPOSURE_LIMITS, path),
        temperature=_measured(cards, keywords.temperature, TEMPERATURE_LIMITS, path),
        set_temperature=_measured(cards, ("SET-TEMP",), TEMPERATURE_LIMITS, path),
        date=observation_date(cards, keywords),
        local_date=parse_date(cards.get("DATE-LOC")),
        instrument=_as_text(_first(cards, keywords.instrument)),
        telescope=_as_text(_first(cards, keywords.telescope)),
        software=software,
        gain=_setting(cards, keywords.gain, GAIN_LIMITS),
        offset=_setting(cards, keywords.offset, OFFSET_LIMITS),
        readout_mode=_as_text(_first(cards, keywords.readout)),
        bayer_pattern=parse_bayer(cards, keywords),
        bayer_offset=(_bayer_offset(cards, keywords.xbayeroff), _bayer_offset(cards, keywords.ybayeroff)),
        row_order=parse_row_order(cards, keywords),
        bitpix=integer("BITPIX", 16),
        bzero=bzero,
        bscale=bscale,
        naxis=naxis,
        planes=integer("NAXIS3", 1) if naxis >= 3 else 1,
        hdu_index=int(layout.get("hdu_index", 0)),
        compressed=bool(layout.get("compressed", False)),
        data_offset=int(layout.get("data_offset", 0)),
        data_bytes=int(layout.get("data_bytes", 0)),
        file_size=stat.st_size if stat else 0,
        mtime=stat.st_mtime if stat else 0.0,
        device=stat.st_dev if stat else 0,
        inode=stat.st_ino if stat else 0,
        headers=dict(cards),
    )


def frame_from_header_text(text: str, path: Path | str = "header.hdr", keywords: KeywordMap = DEFAULT_KEYWORDS) -> Frame:
    """A Frame from a header dump with one card a line (as in realdata/headers)."""
    padded = "".join(line.rstrip("\r\n").ljust(CARD)[:CARD] for line in text.splitlines())
    cards = parse_header_bytes(padded.encode("ascii", errors="replace") + b"END".ljust(CARD))
    return frame_from_cards(cards or {}, path, keywords=keywords)


def read_frame(path: Path | str, keywords: KeywordMap = DEFAULT_KEYWORDS) -> Frame:
    """Read a file's header into a Frame; raise FrameError for anything unusable."""
    path = Path(path)
    try:
        stat = path.stat()
    except OSError as exc:
        raise FrameError(path, f"cannot read: {exc.strerror or exc}") from None
    except ValueError as exc:  # a NUL byte in the name
        raise FrameError(path, f"cannot read: {exc}") from None
    if not S_ISREG(stat.st_mode):
        raise FrameError(path, "a directory, not a file" if S_ISDIR(stat.st_mode) else "not a regular file")
    try:
        cards, layout = read_header_cards(path)
        frame = frame_from_cards(cards, path, layout, keywords, stat)
    except FrameError:
        raise
    except (ValueError, TypeError, OverflowError, UnicodeError, OSError) as exc:
        # A header this reader did not foresee: still a reason, never a traceback.
        raise FrameError(path, f"unreadable header: {exc}") from None
    check_usable(frame)
    if stat.st_size < frame.required_bytes:
        what = "compressed data" if frame.compressed else "data"
        raise FrameError(
            path,
            f"truncated {what}: header promises {frame.required_bytes} bytes, file has {stat.st_size}",
        )
    return frame


def check_usable(frame: Frame) -> None:
    """Reject images flatd cannot combine: not 2-D, empty, or of an unknown data type."""
    if frame.naxis == 0:
        raise FrameError(frame.path, "no image data in the primary HDU or first extension")
    if frame.naxis != 2 and not (frame.naxis == 3 and frame.planes == 1):
        shape = "x".join(str(frame.header_value(f"NAXIS{i}")) for i in range(1, frame.naxis + 1))
        raise FrameError(frame.path, f"{frame.naxis}-D image ({shape}); only 2-D images can be combined")
    if frame.width <= 0 or frame.height <= 0:
        raise FrameError(frame.path, f"image has no pixels ({frame.width}x{frame.height})")
    if frame.bitpix not in (8, 16, 32, 64, -32, -64):
        raise FrameError(frame.path, f"unsupported BITPIX {frame.bitpix}")


def is_fits_name(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith(FITS_SUFFIXES)


def is_ignored_name(path: Path) -> bool:
    """Hidden and temporary files: never frames."""
    return any(p.search(path.name) for p in IGNORED_PATTERNS)


def iter_fits_files(root: Path, recursive: bool = True, exclude: Sequence[Path] = (),
                    others: Optional[list] = None) -> Iterable[Path]:
    """FITS files under `root`, skipping hidden/temporary files and excluded folders.

    Other visible files met on the way are appended to `others`, when given (a dry run
    says why each file was left out).
    """
    root = Path(root)
    excluded = {Path(os.path.abspath(p)) for p in exclude}
    if root.is_file():
        if is_fits_name(root) and not is_ignored_name(root):
            yield root
        return
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(
            d for d in dirnames
            if not d.startswith(".") and Path(os.path.abspath(here / d)) not in excluded
        )
        for name in sorted(filenames):
            candidate = here / name
            if is_fits_name(candidate) and not is_ignored_name(candidate):
                yield candidate
            elif others is not None and not is_ignored_name(candidate):
                others.append(candidate)
        if not recursive:
            break


@dataclass(frozen=True)
class Skipped:
    """A file left out, and why."""

    path: Path
    reason: str


def read_frames(paths: Iterable[Path], keywords: KeywordMap = DEFAULT_KEYWORDS) -> tuple[list[Frame], list[Skipped]]:
    """Read many headers; unreadable files are collected with their reason."""
    frames: list[Frame] = []
    bad: list[Skipped] = []
    for path in paths:
        try:
            frames.append(read_frame(path, keywords))
        except FrameError as exc:
            bad.append(Skipped(exc.path, exc.reason))
    return frames, bad
