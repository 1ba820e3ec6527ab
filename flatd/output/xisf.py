"""Master flats as monolithic XISF 1.0 files (PixInsight's format).

One Float32 gray image, little-endian, attached right after the XML header; its
keywords are the FITS master's (the same astropy Header, as <FITSKeyword> elements,
less the structural and checksum cards), plus a <ColorFilterArray> element when the
header has BAYERPAT (the pattern as seen from the image origin, XBAYROFF/YBAYROFF
applied). Uncompressed by default; zlib, lz4, lz4hc or zstd, with optional byte
shuffling, on request. :func:`xisf_payload` gives the size and a writer; the atomic
write and the free-space check are :func:`flatd.output.masters.write_master`'s.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from datetime import datetime, timezone
from typing import Callable, Optional

import numpy as np
from astropy.io import fits

import flatd

NAMESPACE = "http://www.pixinsight.com/xisf"
SIGNATURE = b"XISF0100"
# cards the XISF image itself says (geometry, sample format) or that only FITS needs
STRUCTURAL = {"SIMPLE", "BITPIX", "NAXIS", "NAXIS1", "NAXIS2", "NAXIS3", "EXTEND", "BZERO", "BSCALE", "BLANK",
              "CHECKSUM", "DATASUM", "PCOUNT", "GCOUNT", "END", ""}
WRITE_ROWS = 256
CLIP_MAX = 65535.0


def fits_value_text(value: object) -> str:
    """A card value as FITS writes it: 'quoted text', T/F, integers, floats with E."""
    if isinstance(value, (bool, np.bool_)):
        return "T" if value else "F"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return repr(float(value)).upper().replace("INF", "Inf").replace("NAN", "NaN")
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    return ""


def cfa_pattern(header: fits.Header) -> Optional[str]:
    """BAYERPAT as seen from the image origin (XBAYROFF/YBAYROFF applied), or None."""
    pattern = str(header.get("BAYERPAT", "") or "").strip().upper().replace(" ", "")
    if not re.fullmatch(r"[RGB]{4}", pattern):
        return None
    xoff, yoff = (_parity(header.get(k)) for k in ("XBAYROFF", "YBAYROFF"))
    return "".join(pattern[((r + yoff) % 2) * 2 + (c + xoff) % 2] for r in range(2) for c in range(2))


def _parity(value: object) -> int:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return 0
    return int(number) % 2 if number.is_integer() and abs(number) < 1e9 else 0


def _bounds(array: np.ndarray) -> str:
    """The range the float samples represent: 0:65535 (ADU), widened to the data."""
    finite = array[np.isfinite(array)] if array.size else array
    low = min(0.0, float(finite.min())) if finite.size else 0.0
    high = max(CLIP_MAX, float(finite.max())) if finite.size else CLIP_MAX
    return f"{low:g}:{high:g}"


def _compress(raw: bytes, codec: str, shuffle: bool, itemsize: int) -> bytes:
    from flatd.ingest.xisf import codec_module

    if shuffle:
        raw = np.frombuffer(raw, np.uint8).reshape(-1, itemsize).T.tobytes()
    module = codec_module(codec, "master")
    if codec == "zlib":
        return module.compress(raw, 6)
    if codec == "zstd":
        return module.ZstdCompressor(level=3).compress(raw)
    mode = "high_compression" if codec == "lz4hc" else "default"
    return module.compress(raw, mode=mode, store_size=False)


def header_xml(width: int, height: int, header: fits.Header, position: int, size: int, bounds: str,
               compression: Optional[str] = None) -> bytes:
    """The XML header for one Float32 gray image whose data block is at `position`."""
    root = ET.Element("xisf", {"version": "1.0", "xmlns": NAMESPACE})
    attrs = {"id": "image", "geometry": f"{width}:{height}:1", "sampleFormat": "Float32", "bounds": bounds,
             "colorSpace": "Gray", "imageType": "MasterFlat", "location": f"attachment:{position}:{size}"}
    if compression:
        attrs["compression"] = compression
    image = ET.SubElement(root, "Image", attrs)
    for card in header.cards:
        key = card.keyword
        if key in STRUCTURAL:
            continue
        if key in ("COMMENT", "HISTORY"):
            ET.SubElement(image, "FITSKeyword", {"name": key, "value": "", "comment": str(card.value)})
        else:
            ET.SubElement(image, "FITSKeyword", {"name": key, "value": fits_value_text(card.value),
                                                 "comment": str(card.comment or "")})
    pattern = cfa_pattern(header)
    if pattern:
        ET.SubElement(image, "ColorFilterArray", {"pattern": pattern, "width": "2", "height": "2"})
    meta = ET.SubElement(root, "Metadata")
    now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    for ident, text in (("XISF:CreationTime", now), ("XISF:CreatorApplication", f"flatd {flatd.__version__}")):
        ET.SubElement(meta, "Property", {"id": ident, "type": "String"}).text = text
    return b'<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="utf-8", xml_declaration=False)


def _placed_header(width, height, header, size, bounds, compression) -> bytes:
    """The XML header with the data block's position right after it (a fixed point:
    the position's digits lengthen the header, which can only move it further)."""
    position = 0
    while True:
        xml = header_xml(width, height, header, position, size, bounds, compression)
        if position == len(SIGNATURE) + 8 + len(xml):
            return xml
        position = len(SIGNATURE) + 8 + len(xml)


def xisf_payload(array: np.ndarray, header: fits.Header, codec: Optional[str] = None,
                 shuffle: bool = False) -> tuple[int, Callable]:
    """(bytes needed, writer(handle)) for a Float32 XISF master of `array` (H, W)."""
    array = np.asarray(array, dtype=np.float32)
    if array.ndim != 2:
        raise ValueError(f"a master must be a 2-D image, not {array.ndim}-D")
    height, width = array.shape
    little = np.dtype("<f4")
    block, compression = None, None
    if codec is not None:
        raw = np.ascontiguousarray(array, dtype=little).tobytes()
        packed = _compress(raw, codec, shuffle, 4)
        if len(packed) < len(raw):
            block = packed
            compression = f"{codec}+sh:{len(raw)}:4" if shuffle else f"{codec}:{len(raw)}"
        del raw
    size = len(block) if block is not None else array.size * 4
    xml = _placed_header(width, height, header, size, _bounds(array), compression)
    preamble = SIGNATURE + len(xml).to_bytes(4, "little") + bytes(4)

    def write(handle) -> None:
        handle.write(preamble)
        handle.write(xml)
        if block is not None:
            handle.write(block)
            return
        for r0 in range(0, height, WRITE_ROWS):
            handle.write(np.ascontiguousarray(array[r0:r0 + WRITE_ROWS], dtype=little).tobytes())

    return len(preamble) + len(xml) + size, write
