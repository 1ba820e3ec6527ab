"""Reading the header of a monolithic XISF file (PixInsight, N.I.N.A.) into FITS-like cards.

An XISF file is a 16-byte preamble ("XISF0100", the header length as a little-endian
uint32, 4 reserved bytes), an XML header, then attached data blocks at absolute file
offsets. The first <Image> element is the frame: its <FITSKeyword> elements become the
cards that :func:`flatd.ingest.frames.frame_from_cards` reads, as from a FITS header;
XISF properties (Instrument:ExposureTime, Instrument:Camera:Gain...), the
<ColorFilterArray> element and the imageType attribute fill the facts no keyword gives.
The structural cards (BITPIX, NAXISn, BZERO) are those of the equivalent FITS image:
UInt16 is BITPIX 16 with BZERO 32768, as a camera's FITS would be, although XISF
stores the values themselves (little-endian unless byteOrder="big", no offset).

Only 2-D single-channel images stored as attachments are read, uncompressed or
compressed with zlib, lz4, lz4hc or zstd, with or without byte shuffling. Everything
else, and every inconsistency (a block beyond the end of the file, an uncompressed
size the geometry does not allow), is a FrameError naming the file and the reason.
Pure standard library: no numpy.
"""

from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Mapping, Optional

from flatd.ingest.frames import DEFAULT_KEYWORDS, FrameError, parse_card_value

SIGNATURE = b"XISF0100"
PREAMBLE = 16
MAX_HEADER_BYTES = 32 * 2**20
MAX_SIDE = 1 << 20
MAX_PIXELS = 1 << 32

# sample format: (item size, numpy kind, BITPIX, BZERO of the equivalent FITS image)
SAMPLE_FORMATS = {
    "UInt8": (1, "u1", 8, 0),
    "UInt16": (2, "u2", 16, 32768),
    "UInt32": (4, "u4", 32, 2147483648),
    "Float32": (4, "f4", -32, 0),
    "Float64": (8, "f8", -64, 0),
}
# codec: the Python package that decodes it (None: the standard library)
CODECS = {"zlib": None, "lz4": "lz4", "lz4hc": "lz4", "zstd": "zstandard"}
_PACKAGES = {"lz4": "lz4.block", "zstandard": "zstandard"}


@dataclass(frozen=True)
class XisfImage:
    """The first image of an XISF file: geometry, data block and header cards."""

    width: int
    height: int
    sample_format: str
    byte_order: str  # "<" or ">"
    position: int
    size: int  # bytes stored in the file
    codec: Optional[str] = None
    uncompressed_size: int = 0
    shuffle: int = 0  # item size of byte shuffling, 0 for none
    subblocks: tuple = ()  # ((compressed, uncompressed), ...), () for one stream
    cards: Mapping[str, object] = field(default_factory=dict, repr=False)

    @property
    def itemsize(self) -> int:
        return SAMPLE_FORMATS[self.sample_format][0]

    @property
    def dtype(self) -> str:
        """The stored samples as a numpy dtype string ('<u2', '>f4'...)."""
        return self.byte_order + SAMPLE_FORMATS[self.sample_format][1]

    @property
    def image_bytes(self) -> int:
        return self.width * self.height * self.itemsize


def is_xisf_name(path: Path | str) -> bool:
    return str(path).lower().endswith(".xisf")


def codec_module(codec: str, path: Path):
    """The module that decodes `codec` ('zlib', 'lz4', 'lz4hc', 'zstd'); a FrameError
    naming the package to install when it is missing."""
    import importlib

    package = CODECS[codec]
    if package is None:
        return importlib.import_module("zlib")
    try:
        return importlib.import_module(_PACKAGES[package])
    except ImportError:
        raise FrameError(path, f"{codec}-compressed XISF needs the Python package '{package}': "
                               f"pip install {package} (or flatd[xisf])") from None


# --------------------------------------------------------------------------- reading


def read_xisf_cards(path: Path) -> tuple[dict[str, object], dict]:
    """The cards and data layout of an XISF file, as read_header_cards gives for FITS."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            image = read_xisf_header(handle, path)
    except OSError as exc:
        raise FrameError(path, f"cannot read: {exc.strerror or exc}") from None
    return dict(image.cards), xisf_layout(image)


def xisf_layout(image: XisfImage) -> dict:
    return {"hdu_index": 0, "data_offset": image.position, "data_bytes": image.size,
            "compressed": image.codec is not None}


def read_xisf_header(handle, path: Path) -> XisfImage:
    """Parse the preamble and XML header of an open binary file (its offset moves)."""
    handle.seek(0)
    preamble = handle.read(PREAMBLE)
    if not preamble:
        raise FrameError(path, "empty file (zero length)")
    if not SIGNATURE.startswith(preamble[:8]):
        raise FrameError(path, "not a monolithic XISF 1.0 file (no XISF0100 signature)")
    if len(preamble) < PREAMBLE:
        raise FrameError(path, "truncated XISF file (ends inside the preamble)")
    length = int.from_bytes(preamble[8:12], "little")
    file_size = os.fstat(handle.fileno()).st_size
    if not 0 < length <= MAX_HEADER_BYTES:
        raise FrameError(path, f"XISF header length {length} is out of range (1..{MAX_HEADER_BYTES})")
    raw = handle.read(length)
    if len(raw) < length:
        raise FrameError(path, f"truncated XISF header: {length} bytes announced, {len(raw)} in the file")
    element = _first_image(_parse_xml(raw, path), path)
    return _image(element, path, PREAMBLE + length, file_size)


def _parse_xml(raw: bytes, path: Path) -> ET.Element:
    raw = raw.rstrip(b"\0 \t\r\n")
    if b"<!DOCTYPE" in raw or b"<!ENTITY" in raw:
        raise FrameError(path, "XISF header declares a DTD or entities, which XISF does not use")
    try:
        return ET.fromstring(raw)
    except ET.ParseError as exc:
        raise FrameError(path, f"bad XML in the XISF header: {exc}") from None


def _local(tag: object) -> str:
    return tag.rsplit("}", 1)[-1] if isinstance(tag, str) else ""


def _first_image(root: ET.Element, path: Path) -> ET.Element:
    if _local(root.tag) != "xisf":
        raise FrameError(path, f"XISF header root is <{_local(root.tag)}>, not <xisf>")
    for child in root:
        if _local(child.tag) == "Image":
            return child
    raise FrameError(path, "no <Image> element in the XISF header")


def _integers(text: str, what: str, count: Optional[int], path: Path) -> list[int]:
    parts = text.split(":")
    if (count is not None and len(parts) != count) or not all(re.fullmatch(r"\d{1,20}", p) for p in parts):
        raise FrameError(path, f"XISF {what} {text!r} is not {count or 'a list of'} whole numbers separated by ':'")
    return [int(p) for p in parts]


def _image(el: ET.Element, path: Path, header_end: int, file_size: int) -> XisfImage:
    width, height, channels = _geometry(el.get("geometry", ""), path)
    fmt = el.get("sampleFormat", "")
    if fmt not in SAMPLE_FORMATS:
        raise FrameError(path, f"XISF sample format {fmt!r} is not supported ({', '.join(SAMPLE_FORMATS)})")
    order = {"little": "<", "big": ">"}.get(el.get("byteOrder", "little"))
    if order is None:
        raise FrameError(path, f"XISF byteOrder {el.get('byteOrder')!r} is neither little nor big")
    position, size = _attachment(el.get("location", ""), path, header_end, file_size)
    image = XisfImage(width, height, fmt, order, position, size)
    image = _compression(el, image, path)
    return replace(image, cards=image_cards(el, image, path))


def _geometry(text: str, path: Path) -> tuple[int, int, int]:
    parts = text.split(":")
    if not text:
        raise FrameError(path, "XISF image has no geometry attribute")
    if len(parts) != 3:
        dims = max(0, len(parts) - 1)
        raise FrameError(path, f"XISF geometry {text!r}: a {dims}-D image; only 2-D images can be combined")
    width, height, channels = _integers(text, "geometry", 3, path)
    if channels != 1:
        raise FrameError(path, f"XISF image has {channels} channels; only single-channel (2-D) images can be combined")
    if not (1 <= width <= MAX_SIDE and 1 <= height <= MAX_SIDE) or width * height > MAX_PIXELS:
        raise FrameError(path, f"XISF geometry {width}x{height} is out of range (sides 1..{MAX_SIDE}, "
                               f"at most {MAX_PIXELS} pixels)")
    return width, height, channels


def _attachment(text: str, path: Path, header_end: int, file_size: int) -> tuple[int, int]:
    kind = text.split(":", 1)[0]
    if kind != "attachment":
        raise FrameError(path, f"XISF image location {text[:40]!r} is not supported: only attached data blocks")
    position, size = _integers(text.split(":", 1)[1] if ":" in text else "", "location", 2, path)
    if position < header_end:
        raise FrameError(path, f"XISF image data at byte {position} overlaps the header (ends at {header_end})")
    if position + size > file_size:
        raise FrameError(path, f"truncated: the XISF image data (bytes {position}..{position + size}) "
                               f"lies beyond the end of the file ({file_size} bytes)")
    return position, size


def _compression(el: ET.Element, image: XisfImage, path: Path) -> XisfImage:
    text = el.get("compression")
    if text is None:
        if image.size != image.image_bytes:
            raise FrameError(path, f"XISF image data holds {image.size} bytes; a {image.width}x{image.height} "
                                   f"{image.sample_format} image needs {image.image_bytes}")
        return image
    parts = text.split(":")
    codec, shuffled = parts[0].removesuffix("+sh"), parts[0].endswith("+sh")
    if codec not in CODECS:
        raise FrameError(path, f"unknown XISF compression codec {parts[0]!r} (known: zlib, lz4, lz4hc, zstd, "
                               "each optionally +sh)")
    numbers = _integers(":".join(parts[1:]), "compression sizes", None, path)
    if len(numbers) not in ((2,) if shuffled else (1, 2)):
        raise FrameError(path, f"XISF compression {text!r} is not codec:size{':itemsize' if shuffled else ''}")
    usize, item = numbers[0], (numbers[1] if shuffled else 0)
    if usize != image.image_bytes:
        raise FrameError(path, f"XISF compression {text!r}: uncompressed size {usize} does not match the "
                               f"{image.width}x{image.height} {image.sample_format} image ({image.image_bytes} "
                               "bytes); refused (a decompression bomb or a broken header)")
    if shuffled and item != image.itemsize:
        raise FrameError(path, f"XISF compression {text!r}: shuffle item size {item}, samples are "
                               f"{image.itemsize} bytes")
    subblocks = _subblocks(el.get("subblocks"), image.size, usize, path)
    codec_module(codec, path)
    return replace(image, codec=codec, uncompressed_size=usize, shuffle=item if item > 1 else 0,
                   subblocks=subblocks)


def _subblocks(text: Optional[str], stored: int, usize: int, path: Path) -> tuple:
    if not text:
        return ()
    blocks = []
    for part in text.split(":"):
        pair = part.split(",")
        if len(pair) != 2 or not all(re.fullmatch(r"\d{1,20}", p) for p in pair):
            raise FrameError(path, f"XISF subblocks {text[:60]!r} are not compressed,uncompressed pairs")
        blocks.append((int(pair[0]), int(pair[1])))
    if sum(c for c, _ in blocks) != stored or sum(u for _, u in blocks) != usize:
        raise FrameError(path, f"XISF subblocks do not add up to the data block ({stored} bytes stored, "
                               f"{usize} uncompressed)")
    return tuple(blocks)


# --------------------------------------------------------------------------- facts


def keyword_value(text: str) -> object:
    """A <FITSKeyword> value: a quoted string, T/F, an integer, a float, or bare text."""
    text = (text or "").strip()
    if not text:
        return None
    if text.startswith("'"):
        return parse_card_value(text)
    if "/" in text:
        return text
    value = parse_card_value(text)
    return text if isinstance(value, str) else value


# property id: (card, fact in KeywordMap whose keywords make it unneeded, numeric, scale)
PROPERTY_CARDS = {
    "Instrument:ExposureTime": ("EXPTIME", "exposure", True, 1.0),
    "Instrument:Sensor:Temperature": ("CCD-TEMP", "temperature", True, 1.0),
    "Instrument:Sensor:TargetTemperature": ("SET-TEMP", None, True, 1.0),
    # the XISF spec's camera gain is in electrons per data number: FITS's EGAIN, not the
    # gain setting (GAIN) that calibration frames are matched by
    "Instrument:Camera:Gain": ("EGAIN", None, True, 1.0),
    "Instrument:Camera:XBinning": ("XBINNING", "xbinning", True, 1.0),
    "Instrument:Camera:YBinning": ("YBINNING", "ybinning", True, 1.0),
    "Instrument:Sensor:XPixelSize": ("XPIXSZ", None, True, 1.0),
    "Instrument:Sensor:YPixelSize": ("YPIXSZ", None, True, 1.0),
    "Instrument:Telescope:FocalLength": ("FOCALLEN", None, True, 1000.0),  # metres -> mm
    "Instrument:Filter:Name": ("FILTER", "filter", False, 1.0),
    "Instrument:Camera:Name": ("INSTRUME", "instrument", False, 1.0),
    "Instrument:Telescope:Name": ("TELESCOP", "telescope", False, 1.0),
    "Observation:Time:Start": ("DATE-OBS", "date", False, 1.0),
    "PCL:CFASourcePattern": ("BAYERPAT", "bayer", False, 1.0),
}
_INTEGER_TYPES = {"Int8", "Int16", "Int32", "Int64", "UInt8", "UInt16", "UInt32", "UInt64", "Byte", "Short",
                  "UShort", "Int", "UInt"}
_FLOAT_TYPES = {"Float32", "Float64", "Float", "Double"}
_TEXT_TYPES = {"String", "TimePoint"}


def image_cards(el: ET.Element, image: XisfImage, path: Path) -> dict[str, object]:
    """FITS keywords, then properties and CFA where no keyword gives the fact, then the
    structural cards of the equivalent FITS image."""
    cards: dict[str, object] = {}
    for child in el:
        if _local(child.tag) == "FITSKeyword":
            name = (child.get("name") or "").strip().upper()
            if name and name not in ("COMMENT", "HISTORY") and name not in cards:
                cards[name] = keyword_value(child.get("value", ""))
    _add_cfa(el, cards)
    for child in el:
        if _local(child.tag) == "Property" and child.get("id") in PROPERTY_CARDS:
            _add_property(child, cards, path)
    imagetype = el.get("imageType")
    if imagetype and not _has_fact(cards, "imagetype"):
        cards["IMAGETYP"] = imagetype.strip().upper()
    _, _, bitpix, bzero = SAMPLE_FORMATS[image.sample_format]
    cards.update({"SIMPLE": True, "BITPIX": bitpix, "NAXIS": 2, "NAXIS1": image.width, "NAXIS2": image.height})
    cards.pop("NAXIS3", None)
    cards["BZERO"], cards["BSCALE"] = bzero, 1
    return cards


def _has_fact(cards: Mapping[str, object], fact: Optional[str], card: str = "") -> bool:
    keys = getattr(DEFAULT_KEYWORDS, fact) if fact else (card,)
    return any(cards.get(k) not in (None, "") for k in keys)


def _add_cfa(el: ET.Element, cards: dict) -> None:
    for child in el:
        if _local(child.tag) == "ColorFilterArray" and not _has_fact(cards, "bayer"):
            pattern = (child.get("pattern") or "").strip().upper()
            if child.get("width", "2") == "2" and child.get("height", "2") == "2" and len(pattern) == 4:
                cards["BAYERPAT"] = pattern


def _add_property(prop: ET.Element, cards: dict, path: Path) -> None:
    ident = prop.get("id")
    card, fact, numeric, scale = PROPERTY_CARDS[ident]
    if _has_fact(cards, fact, card):
        return
    kind = prop.get("type", "")
    text = prop.get("value")
    if text is None:
        text = prop.text or ""
    if numeric:
        value = _number(ident, kind, text, path)
        cards[card] = value * scale if scale != 1.0 else value
    elif kind not in _TEXT_TYPES:
        raise FrameError(path, f"XISF property {ident} has type {kind or 'none'!r}, not String")
    elif text.strip():
        cards[card] = text.strip()


def _number(ident: str, kind: str, text: str, path: Path) -> float | int:
    text = text.strip()
    try:
        if kind in _INTEGER_TYPES:
            return int(text)
        if kind in _FLOAT_TYPES:
            return float(text)
    except ValueError:
        raise FrameError(path, f"XISF property {ident} = {text[:40]!r} is not a {kind}") from None
    raise FrameError(path, f"XISF property {ident} has type {kind or 'none'!r}, not a number")
