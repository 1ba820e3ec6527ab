"""Master headers and atomic, never-overwriting writes of master flats.

Names come from :mod:`flatd.output.naming`. A master is written to a hidden temp file in the
target folder, fsynced, then hard-linked to its final name, which fails instead of
overwriting (invariant 2); the temp name is removed afterwards. A name ending in
``.fits.fz`` gives a tile-compressed (lossless) master, ``.xisf`` an XISF one
(:mod:`flatd.output.xisf`), any other a plain one.
"""

from __future__ import annotations

import errno
import io
import os
import re
import textwrap
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
from astropy.io import fits

import flatd
from flatd.calibration import Calibration
from flatd.errors import FlatdError
from flatd.ingest.frames import Frame
from flatd.output.carry import DEFAULT_CARRY, carry as carry_verdicts
from flatd.fsops import TEMP_PREFIX, TEMP_SUFFIX, create_temp, fsync_dir, link_no_replace
from flatd.output.naming import (ascii_text, check_file_name, earliest, is_compressed_name, is_xisf_name,
                                 mean_as_written, mean_value,
                          most_common, numbered_name, safe_component)

# ------------------------------------------------------------------- header


def card_text(value: object, limit: int | None = 68) -> str:
    """Text safe for a FITS card: printable ASCII only, at most `limit` characters."""
    text = ascii_text(str(value)).replace("\ufffd", "?")
    text = "".join(ch if 32 <= ord(ch) < 127 else " " for ch in text)
    text = re.sub(r"\s+", " ", text).strip()
    return text[:limit] if limit else text


def _wrap_card(text: str, width: int = 72) -> list[str]:
    """Text for HISTORY/COMMENT cards, wrapped at spaces (astropy would cut words);
    continuation cards are indented by two spaces."""
    return textwrap.wrap(text, width=width, subsequent_indent="  ", break_on_hyphens=False) or [""]


def add_checks(header: fits.Header, cards: Mapping[str, tuple[object, str]], history: Sequence[str]) -> None:
    """The master checks' cards (QCSTATUS and the figures: flatd.qc.masters) and their
    HISTORY lines, made card-safe (ASCII, wrapped) so that no header text stops a write."""
    for key, (value, comment) in cards.items():
        value = _card_value(value)
        room = 80 - 10 - 3 - (len(str(value)) + 2 if isinstance(value, str) else 20)
        header[key] = (value, card_text(comment, max(room, 0)) if room > 0 else "")
    for line in history:
        for part in _wrap_card(card_text(line, limit=None)):
            header.add_history(part)


def _card_value(value: object) -> object:
    if isinstance(value, (bool, int, float, np.integer, np.floating)):
        return value
    if isinstance(value, datetime):
        return value.isoformat(timespec="milliseconds")
    return card_text(value)


def _calibration_text(cal: Calibration) -> str:
    if cal.mode == "file" and cal.frame is not None:
        return f"minus {cal.frame.kind.value} {cal.frame.path}"
    if cal.mode == "pedestal":
        return f"minus pedestal {cal.pedestal:g}"
    return "no calibration"


def master_header(
    frames: Sequence[Frame],
    calibrations: Sequence[Calibration],
    method: flatd.stack.methods.Method,
    normalization: str,
    factors: Sequence[float] | None = None,
    extra: Mapping[str, object] | None = None,
    rejected: Sequence[tuple[float, float]] | None = None,
    auto_reason: str | None = None,
    carry: Sequence[str] | None = None,
) -> fits.Header:
    """The header of a master flat (see DESIGN "Master FITS").

    IMAGETYP='Master Flat', FILTER (most common), XBINNING/YBINNING, EXPTIME and
    EXPOSURE (mean, to the inputs' precision: naming.mean_as_written), CCD-TEMP and SET-TEMP (means, when known), DATE-OBS (earliest
    input), INSTRUME/TELESCOP (when every input agrees), NCOMBINE, the cards of `method`
    (COMBMETH, then one per parameter, such as CLIPSIG or CLIPN), NORMALIZ, CALMODE
    (none|pedestal|file, "mixed" when inputs differ) and PEDESTAL when one pedestal
    was used, a COMMENT with the method's description, one HISTORY line per input (file,
    what was subtracted, normalization factor), CREATOR "flatd <version>" and DATE
    (time written, UTC). `calibrations` and `factors` are per input, in the order of
    `frames`; an empty `calibrations` means none. `extra` adds or replaces cards:
    KEY -> value or (value, comment). Every text value is made card-safe (ASCII).
    CHECKSUM/DATASUM are added by :func:`write_master`.

    `rejected`, per input in the order of `frames`: the fractions of its values rejected
    low and high. With it the header gets REJLOW and REJHIGH (the fractions of all values
    of the stack, the inputs weighing alike: every input has as many values) and each
    input's HISTORY line its own two fractions (one line per input, whatever their
    number: no indexed cards). `auto_reason` (method: auto): COMBAUTO = T and a COMMENT
    saying why this method was chosen.

    `carry` (output.carry; None: its default list): keywords copied from the inputs when
    they all agree (:mod:`flatd.output.carry`); each one not carried gets a HISTORY line.
    The cards flatd writes itself keep flatd's value, except INSTRUME, TELESCOP and
    SET-TEMP: when some input has that card, the inputs' cards decide (no mean of
    different set-points, no CAMERA fallback over a disagreeing INSTRUME).
    """
    if not frames:
        raise ValueError("a master needs at least one input frame")
    cals = list(calibrations) if calibrations else [Calibration()] * len(frames)
    if len(cals) != len(frames):
        raise ValueError(f"{len(cals)} calibrations for {len(frames)} frames")
    if factors is not None and len(factors) != len(frames):
        raise ValueError(f"{len(factors)} normalization factors for {len(frames)} frames")
    if rejected is not None and len(rejected) != len(frames):
        raise ValueError(f"{len(rejected)} rejection fractions for {len(frames)} frames")

    header = fits.Header()
    header["IMAGETYP"] = ("Master Flat", "type of image")
    filt = most_common(f.filter for f in frames)
    if filt is not None:
        header["FILTER"] = (card_text(filt), "most common filter of the inputs")
    xbin, ybin = most_common((f.xbin, f.ybin) for f in frames)
    header["XBINNING"] = (int(xbin), "binning factor, x")
    header["YBINNING"] = (int(ybin), "binning factor, y")
    exposure = mean_as_written(f.exposure for f in frames)
    if exposure is not None:
        header["EXPTIME"] = (exposure, "[s] mean exposure of the inputs")
        header["EXPOSURE"] = (exposure, "[s] mean exposure of the inputs")
    temperature = mean_value(f.temperature for f in frames)
    if temperature is not None:
        header["CCD-TEMP"] = (round(temperature, 3), "[C] mean sensor temperature of the inputs")
    set_temperature = mean_value(f.set_temperature for f in frames)
    if set_temperature is not None:
        header["SET-TEMP"] = (round(set_temperature, 3), "[C] mean set-point of the inputs")
    first = earliest(frames)
    if first is not None:
        header["DATE-OBS"] = (first.isoformat(timespec="milliseconds"), "start of the earliest input")
    for key, attr in (("INSTRUME", "instrument"), ("TELESCOP", "telescope")):
        values = {getattr(f, attr) for f in frames}
        if len(values) == 1 and None not in values:
            header[key] = card_text(values.pop())
    header["NCOMBINE"] = (len(frames), "number of frames combined")
    for key, value, comment in method.cards:
        header[key] = (_card_value(value), card_text(comment))
    if auto_reason is not None:
        header["COMBAUTO"] = (True, "method chosen by auto from the number of frames")
    if rejected is not None:
        header["REJLOW"] = (float(sum(lo for lo, _ in rejected) / len(rejected)), "fraction of all values rejected low")
        header["REJHIGH"] = (float(sum(hi for _, hi in rejected) / len(rejected)),
                             "fraction of all values rejected high")
    header["NORMALIZ"] = (card_text(normalization), "normalization of the inputs before combining")
    modes = {c.mode for c in cals}
    header["CALMODE"] = (modes.pop() if len(modes) == 1 else "mixed", "precalibration of the inputs")
    pedestals = {c.pedestal for c in cals if c.mode == "pedestal"}
    if len(pedestals) == 1 and all(c.mode == "pedestal" for c in cals):
        header["PEDESTAL"] = (float(pedestals.pop()), "pedestal subtracted from every input")
    carry_notes = _add_carried(header, frames, DEFAULT_CARRY if carry is None else carry)
    header["CREATOR"] = (f"flatd {flatd.__version__}", "software that made this master")
    header["DATE"] = (datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"), "UTC time this file was written")
    if method.description:
        for part in _wrap_card(card_text(method.description, limit=None)):
            header.add_comment(part)
    if auto_reason is not None:
        for part in _wrap_card(card_text(f"method auto: {auto_reason}", limit=None)):
            header.add_comment(part)
    for index, (frame, cal) in enumerate(zip(frames, cals), start=1):
        line = f"input {index}/{len(frames)}: {frame.path.name}; {_calibration_text(cal)}"
        if factors is not None:
            line += f"; normalization factor {float(factors[index - 1]):.6g}"
        if rejected is not None:
            low, high = rejected[index - 1]
            line += f"; rejected {float(low):.4e} low, {float(high):.4e} high"
        for part in _wrap_card(card_text(line, limit=None)):
            header.add_history(part)
    for note in carry_notes:
        for part in _wrap_card(card_text(note, limit=None)):
            header.add_history(part)
    for key, value in (extra or {}).items():
        comment = None
        if isinstance(value, tuple):
            value, comment = value
        header[card_text(key).upper()] = (_card_value(value), card_text(comment)) if comment else _card_value(value)
    return header


# Cards master_header computes from the frames' facts that output.carry may decide instead.
CARRY_DECIDES = frozenset({"INSTRUME", "TELESCOP", "SET-TEMP"})


def _add_carried(header: fits.Header, frames: Sequence[Frame], keys: Sequence[str]) -> list[str]:
    """Write the carried cards into `header`; return the notes on those not carried."""
    notes = []
    for verdict in carry_verdicts(keys, [f.headers for f in frames]):
        own = verdict.key in header and verdict.key not in CARRY_DECIDES
        if verdict.carried and not own:
            value = _card_value(verdict.value)
            fits_comment = not isinstance(value, str) or len(value) <= 30  # else astropy cuts it, warning
            header[verdict.key] = (value, "from the inputs, which all agree") if fits_comment else value
        elif not verdict.carried:
            if verdict.key in CARRY_DECIDES:
                header.remove(verdict.key, ignore_missing=True)
            notes.append(verdict.note)
    return notes


# ------------------------------------------------------------------- writing


def _numbered(path: Path, n: int) -> Path:
    """name.fits -> name-2.fits, m.fits.fz -> m-2.fits.fz (n >= 2)."""
    return path.with_name(numbered_name(path.name, n))


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


class NoSpace(OSError, FlatdError):
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


def _compressed_bytes(array: np.ndarray, header: fits.Header, rejection_map: np.ndarray | None = None) -> bytes:
    """The bytes of a tile-compressed master: an empty primary HDU, then the image,
    GZIP_2 without quantization (lossless: float32 bit for bit) with CHECKSUM/DATASUM;
    then the rejection map, if any, tile-compressed (lossless for integers)."""
    hdu = fits.CompImageHDU(array, header=header, compression_type="GZIP_2", quantize_level=0.0)
    hdu.add_checksum()
    hdus = [fits.PrimaryHDU(), hdu]
    if rejection_map is not None:
        ext = fits.CompImageHDU(rejection_map, header=_rejection_map_header(), compression_type="GZIP_2")
        ext.add_checksum()
        hdus.append(ext)
    buffer = io.BytesIO()
    fits.HDUList(hdus).writeto(buffer)
    return buffer.getvalue()


REJMAP = "REJMAP"


def _rejection_map_header() -> fits.Header:
    header = fits.Header()
    header["EXTNAME"] = (REJMAP, "rejection counts per pixel")
    header["PLANE1"] = ("low", "plane 1: values rejected low at this pixel")
    header["PLANE2"] = ("high", "plane 2: values rejected high at this pixel")
    return header


def _rejection_map_hdu(rejection_map: np.ndarray) -> fits.ImageHDU:
    """The REJMAP extension: (2, H, W) uint16, stored as FITS does unsigned 16-bit
    (BITPIX 16, BZERO 32768), with CHECKSUM/DATASUM."""
    rejection_map = np.asarray(rejection_map)
    if rejection_map.ndim != 3 or rejection_map.shape[0] != 2 or rejection_map.dtype != np.uint16:
        raise ValueError(f"a rejection map is uint16 (2, H, W), got {rejection_map.dtype} {rejection_map.shape}")
    hdu = fits.ImageHDU(rejection_map, header=_rejection_map_header())
    hdu.add_checksum()
    return hdu


def _write_extension(handle, hdu: fits.ImageHDU) -> None:
    """An unsigned 16-bit extension, converted a few rows at a time (x - 32768 as
    big-endian int16: the BZERO convention)."""
    handle.write(hdu.header.tostring().encode("ascii"))
    data = hdu.data
    flat = data.reshape(-1, data.shape[-1])
    for r0 in range(0, flat.shape[0], WRITE_ROWS):
        chunk = flat[r0:r0 + WRITE_ROWS] ^ np.uint16(0x8000)
        handle.write(chunk.view(np.int16).astype(">i2").tobytes())
    handle.write(b"\0" * (_padded(data.nbytes) - data.nbytes))


def _master_payload(array: np.ndarray, header: fits.Header, compressed: bool,
                    rejection_map: np.ndarray | None = None):
    """(bytes needed, writer(handle)) for a plain or a tile-compressed master."""
    # read only: astropy's checksum then swaps a copy, not the caller's array in place (the
    # previews are drawn from that array in another thread while the master is written)
    array = np.asarray(array).view()
    array.flags.writeable = False
    if compressed:
        payload = _compressed_bytes(array, header, rejection_map)
        return len(payload), lambda handle: handle.write(payload)
    hdu = fits.PrimaryHDU(array, header=header)
    if rejection_map is not None:
        hdu.header["EXTEND"] = (True, "the rejection map follows")
    hdu.add_checksum()
    ext = _rejection_map_hdu(rejection_map) if rejection_map is not None else None
    needed = master_bytes(hdu) + (len(ext.header.tostring()) + _padded(ext.data.nbytes) if ext is not None else 0)

    def write(handle) -> None:
        _write_hdu(handle, hdu)
        if ext is not None:
            _write_extension(handle, ext)

    return needed, write


def write_master(directory: Path, name: str, data: np.ndarray, header: fits.Header,
                 rejection_map: np.ndarray | None = None) -> Path:
    """Write a master atomically and without overwriting; return its final path.

    32-bit float primary HDU with CHECKSUM/DATASUM; for a name ending in .fits.fz (any
    case), an empty primary HDU and the image tile-compressed, losslessly (see
    :func:`_compressed_bytes`). The free space is checked first
    (NoSpace names the folder, what is needed and what is free). The file is written
    under a hidden temp name in `directory` (".flatd-<name>-<random>.tmp", which
    watchers ignore), flushed and fsynced, then linked to `name`, or name-2, name-3 ...
    when taken, and the folder is fsynced. On any failure the temp file is removed and
    nothing stands under a final name. `directory` is created when missing.
    `rejection_map` (uint16 (2, H, W): values rejected low, high per pixel) is written
    after the image as an IMAGE extension named REJMAP, in the same file and the same
    atomic write (its bytes are counted in the free-space check). A name ending in
    .xisf gives an XISF master (Float32, the same keywords; no rejection map).
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
    if is_xisf_name(name):  # no rejection map in XISF
        from flatd.output.xisf import xisf_payload

        needed, write = xisf_payload(array.astype(np.float32, copy=False), clean)
    else:
        needed, write = _master_payload(array.astype(np.float32, copy=False), clean, is_compressed_name(name),
                                        rejection_map)
    check_free_space(directory, needed)

    temp, fd = create_temp(directory, safe_component(name, "master"))
    final: Path | None = None
    try:
        try:
            with os.fdopen(fd, "wb") as handle:
                write(handle)
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
