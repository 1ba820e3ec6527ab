"""XISF: headers into frames, pixels through the band reader, masters written and read back."""

from __future__ import annotations

import sys
import zlib
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

xisf = pytest.importorskip("xisf")
XISF = xisf.XISF

from flatd.errors import StackError  # noqa: E402
from flatd.ingest.frames import FrameError, is_fits_name, read_frame  # noqa: E402
from flatd.ingest.xisf import keyword_value  # noqa: E402
from flatd.output.masters import write_master  # noqa: E402
from flatd.output.naming import master_name, with_format  # noqa: E402
from flatd.output.xisf import cfa_pattern, xisf_payload  # noqa: E402
from flatd.stack.pixels import open_pixels, read_image  # noqa: E402

CODECS = ["zlib", "lz4", "lz4hc", "zstd"]
FORMATS = [np.uint8, np.uint16, np.uint32, np.float32, np.float64]
KEYWORDS = {"IMAGETYP": "'Flat Field'", "EXPTIME": "2.5", "FILTER": "'Ha'", "CCD-TEMP": "-10.2", "GAIN": "100",
            "OFFSET": "50", "READOUTM": "'High Gain'", "XBINNING": "2", "YBINNING": "2", "INSTRUME": "'ZWO ASI2600MC'",
            "BAYERPAT": "'RGGB'", "XBAYROFF": "1", "DATE-OBS": "'2026-11-24T18:00:00.123'", "SET-TEMP": "-10.0"}


def smooth(dtype, shape=(37, 53)) -> np.ndarray:
    """A compressible image of `dtype` that uses the top of its range."""
    y, x = np.mgrid[0:shape[0], 0:shape[1]]
    base = (x * 7 + y * 3) % 200
    if np.issubdtype(dtype, np.floating):
        return (base * 101.5 + 0.25).astype(dtype)
    top = np.iinfo(dtype).max
    data = (top - base * (top // 400)).astype(dtype)
    data[0, 0], data[0, 1] = top, 0
    return data


def package_file(path: Path, data: np.ndarray, codec=None, shuffle=False, keywords=KEYWORDS, properties=None) -> Path:
    meta = {"FITSKeywords": {k: [{"value": v, "comment": ""}] for k, v in keywords.items()},
            "XISFProperties": properties or {}}
    XISF.write(str(path), data[:, :, None], image_metadata=meta, codec=codec, shuffle=shuffle)
    return path


def raw_file(path: Path, attrs: dict, children: str = "", data: bytes = b"", header_len: int | None = None,
             xml: bytes | None = None) -> Path:
    """A hand-made XISF: the header in 4080 bytes, the data block at 4096."""
    attrs = {"geometry": "4:3:1", "sampleFormat": "UInt16", "location": f"attachment:4096:{len(data)}", **attrs}
    text = " ".join(f'{k}="{v}"' for k, v in attrs.items() if v is not None)
    if xml is None:
        xml = (f'<?xml version="1.0" encoding="UTF-8"?><xisf version="1.0" xmlns="http://www.pixinsight.com/xisf">'
               f'<Image {text}>{children}</Image><Metadata/></xisf>').encode()
    xml = xml.ljust(4080, b" ")
    preamble = b"XISF0100" + (header_len or len(xml)).to_bytes(4, "little") + bytes(4)
    path.write_bytes(preamble + xml + data)
    return path


def facts(frame) -> dict:
    skip = {"path", "compressed", "data_offset", "data_bytes", "file_size", "mtime", "device", "inode", "headers"}
    return {k: v for k, v in asdict(frame).items() if k not in skip}


# --------------------------------------------------------------------------- reading


@pytest.mark.parametrize("dtype", FORMATS, ids=lambda d: d.__name__)
@pytest.mark.parametrize("codec,shuffle", [(None, False)] + [(c, s) for c in CODECS for s in (False, True)])
def test_package_files_read_with_identical_pixels(tmp_path, dtype, codec, shuffle):
    data = smooth(dtype)
    frame = read_frame(package_file(tmp_path / "f.xisf", data, codec, shuffle))
    assert frame.compressed == (codec is not None)
    want = data.astype(np.float32)
    assert np.array_equal(read_image(frame), want)
    with open_pixels(frame) as src:
        assert (src.width, src.height, src.itemsize) == (53, 37, data.itemsize)
        assert src.raw_bytes(3, 8) == 5 * 53 * data.itemsize
        assert np.array_equal(src.rows(35, 37), want[35:37])
        out = np.empty((4, 53), np.float32)
        src.read_into(10, 14, out, scratch=np.empty(src.raw_bytes(0, 4), np.uint8))
        assert np.array_equal(out, want[10:14])


def test_facts_equal_those_of_the_same_fits(tmp_path):
    data = smooth(np.uint16)
    frame = read_frame(package_file(tmp_path / "flat.xisf", data, "lz4hc", True))
    hdu = fits.PrimaryHDU(data)
    for key, value in KEYWORDS.items():
        hdu.header[key] = keyword_value(value)
    hdu.writeto(tmp_path / "flat.fits")
    twin = read_frame(tmp_path / "flat.fits")
    assert facts(frame) == facts(twin)
    assert (frame.gain, frame.offset, frame.readout_mode, frame.bayer_pattern) == (100, 50, "High Gain", "RGGB")
    assert (frame.bitpix, frame.bzero, frame.xbin, frame.bayer_offset) == (16, 32768, 2, (1, 0))


@pytest.mark.parametrize("dtype,bitpix,bzero", [(np.uint8, 8, 0), (np.uint16, 16, 32768),
                                                (np.uint32, 32, 2147483648), (np.float32, -32, 0),
                                                (np.float64, -64, 0)])
def test_sample_formats_map_to_bitpix(tmp_path, dtype, bitpix, bzero):
    frame = read_frame(package_file(tmp_path / "f.xisf", smooth(dtype)))
    assert (frame.bitpix, frame.bzero, frame.bscale) == (bitpix, bzero, 1.0)


def test_properties_fill_missing_keywords(tmp_path):
    props = {
        "Instrument:ExposureTime": ("Float32", "3.5"), "Instrument:Sensor:Temperature": ("Float32", "-15.5"),
        "Instrument:Filter:Name": ("String", "OIII"), "Instrument:Camera:Gain": ("Float32", "120"),
        "Instrument:Camera:Name": ("String", "ZWO ASI294MC Pro"), "Instrument:Camera:XBinning": ("Int32", "2"),
        "Instrument:Camera:YBinning": ("Int32", "2"), "Observation:Time:Start": ("TimePoint", "2026-11-24T18:01:02Z"),
        "PCL:CFASourcePattern": ("String", "GBRG"), "Instrument:Telescope:FocalLength": ("Float32", "0.53"),
    }
    children = "".join(f'<Property id="{k}" type="{t}" value="{v}"/>' if t != "String"
                       else f'<Property id="{k}" type="{t}">{v}</Property>' for k, (t, v) in props.items())
    path = raw_file(tmp_path / "p.xisf", {"imageType": "Flat"}, children, bytes(24))
    frame = read_frame(path)
    assert frame.kind.value == "flat"
    assert (frame.exposure, frame.temperature, frame.filter) == (3.5, -15.5, "OIII")
    # the XISF camera gain is in e-/DN: FITS's EGAIN, not the gain setting flats are matched by
    assert frame.gain is None and frame.header_value("EGAIN") == 120
    assert (frame.instrument, frame.xbin, frame.ybin, frame.bayer_pattern) == ("ZWO ASI294MC Pro", 2, 2, "GBRG")
    assert frame.date.isoformat() == "2026-11-24T18:01:02"
    assert frame.header_value("FOCALLEN") == pytest.approx(530)


def test_keywords_win_over_properties_and_cfa_element(tmp_path):
    children = ('<FITSKeyword name="EXPOSURE" value="1.5" comment=""/>'
                '<FITSKeyword name="FILTER" value="\'R\'" comment=""/>'
                '<Property id="Instrument:ExposureTime" type="Float32" value="9"/>'
                '<Property id="Instrument:Filter:Name" type="String">Ha</Property>'
                '<ColorFilterArray pattern="BGGR" width="2" height="2"/>')
    frame = read_frame(raw_file(tmp_path / "k.xisf", {}, children, bytes(24)))
    assert (frame.exposure, frame.filter, frame.bayer_pattern) == (1.5, "R", "BGGR")
    assert "EXPTIME" not in frame.headers


def test_big_endian_and_values_above_32767(tmp_path):
    values = np.array([[0, 1, 32767, 32768], [40000, 65535, 2, 3], [4, 5, 6, 7]], dtype=">u2")
    frame = read_frame(raw_file(tmp_path / "be.xisf", {"byteOrder": "big"}, data=values.tobytes()))
    assert np.array_equal(read_image(frame), values.astype(np.float32))


def test_calibration_and_factor_as_for_fits(tmp_path):
    data = smooth(np.uint16)
    frame = read_frame(package_file(tmp_path / "f.xisf", data, "zstd", True))
    fits.PrimaryHDU(data).writeto(tmp_path / "f.fits")
    twin = read_frame(tmp_path / "f.fits")
    cal = np.full((6, 53), 30000, np.float32)
    with open_pixels(frame) as a, open_pixels(twin) as b:
        for kwargs in ({"cal": cal, "factor": 1.3}, {"pedestal": 65000.0}, {"factor": 0.7}):
            out_a, out_b = np.empty((6, 53), np.float32), np.empty((6, 53), np.float32)
            a.read_into(4, 10, out_a, **kwargs)
            b.read_into(4, 10, out_b, **kwargs)
            assert np.array_equal(out_a, out_b)
        for step in (1, 3):
            assert np.array_equal(a.sample_grid(step, pedestal=100.0, chunk_rows=2),
                                  b.sample_grid(step, pedestal=100.0, chunk_rows=2))


def test_compressed_image_spooled_in_temp_and_removed(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    frame = read_frame(package_file(tmp_path / "f.xisf", smooth(np.uint16), "zlib", True))
    with open_pixels(frame) as src:
        assert src.rows(0, 1).shape == (1, 53)
    assert list((tmp_path / "tmp").iterdir()) == []


def test_candidates_include_xisf():
    assert is_fits_name(Path("a/flat_001.xisf")) and is_fits_name(Path("F.XISF"))


# --------------------------------------------------------------------------- hostile files


def _reason(path: Path) -> str:
    with pytest.raises(FrameError) as info:
        read_frame(path)
    assert info.value.path == path
    return info.value.reason


def test_truncated_files(tmp_path):
    good = package_file(tmp_path / "good.xisf", smooth(np.uint16)).read_bytes()
    cases = {"empty": b"", "preamble": good[:12], "header": good[:200], "data": good[:-10]}
    for name, content in cases.items():
        path = tmp_path / f"{name}.xisf"
        path.write_bytes(content)
        reason = _reason(path)
        assert reason.startswith(("truncated", "empty")), (name, reason)  # intake waits on "truncated"


def test_not_xisf_and_bad_xml(tmp_path):
    (tmp_path / "fits.xisf").write_bytes(b"SIMPLE  =" + bytes(100))
    assert "signature" in _reason(tmp_path / "fits.xisf")
    assert "bad XML" in _reason(raw_file(tmp_path / "x.xisf", {}, xml=b"<xisf><Image geometry='1:1:1'"))
    bomb = b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaa">]><xisf>&a;</xisf>'
    assert "DTD" in _reason(raw_file(tmp_path / "dtd.xisf", {}, xml=bomb))
    assert "<Image>" in _reason(raw_file(tmp_path / "none.xisf", {}, xml=b'<xisf version="1.0"><Metadata/></xisf>'))
    assert "header length" in _reason(raw_file(tmp_path / "len.xisf", {}, header_len=2**31))


@pytest.mark.parametrize("geometry,words", [("1000000000:1000000000:1", "out of range"), ("4:3:3", "3 channels"),
                                            ("4:3:2:1", "3-D"), ("4:x:1", "whole numbers"), ("0:3:1", "out of range")])
def test_absurd_geometry(tmp_path, geometry, words):
    assert words in _reason(raw_file(tmp_path / "g.xisf", {"geometry": geometry}, data=bytes(24)))


def test_attachment_beyond_end_of_file(tmp_path):
    reason = _reason(raw_file(tmp_path / "a.xisf", {"location": "attachment:4096:24"}, data=bytes(10)))
    assert "beyond the end of the file" in reason
    assert "overlaps the header" in _reason(raw_file(tmp_path / "o.xisf", {"location": "attachment:20:24"},
                                                     data=bytes(24)))
    assert "only attached" in _reason(raw_file(tmp_path / "i.xisf", {"location": "inline:base64"}, data=bytes(24)))
    assert "needs 24" in _reason(raw_file(tmp_path / "s.xisf", {"location": "attachment:4096:20"}, data=bytes(24)))


def test_unknown_codec_and_sample_format(tmp_path):
    assert "unknown XISF compression codec 'brotli'" in _reason(
        raw_file(tmp_path / "c.xisf", {"compression": "brotli:24"}, data=bytes(24)))
    assert "sample format 'Complex32'" in _reason(
        raw_file(tmp_path / "f.xisf", {"sampleFormat": "Complex32"}, data=bytes(24)))
    assert "byteOrder" in _reason(raw_file(tmp_path / "b.xisf", {"byteOrder": "middle"}, data=bytes(24)))


@pytest.mark.parametrize("prop", [
    '<Property id="Instrument:ExposureTime" type="Float32" value="two seconds"/>',
    '<Property id="Instrument:Camera:XBinning" type="Int32" value="1.5"/>',
    '<Property id="Instrument:Sensor:Temperature" type="String">cold</Property>',
    '<Property id="Instrument:Filter:Name" type="Float64" value="1"/>',
])
def test_wrong_property_types(tmp_path, prop):
    assert "XISF property" in _reason(raw_file(tmp_path / "p.xisf", {}, prop, bytes(24)))


def test_decompression_bomb_refused(tmp_path):
    packed = zlib.compress(bytes(10**7))
    declared = _reason(raw_file(tmp_path / "big.xisf", {"compression": f"zlib:{10**7}"}, data=packed))
    assert "uncompressed size 10000000 does not match" in declared
    # the size declared fits the geometry, the stream holds far more: stopped while decoding
    path = raw_file(tmp_path / "lie.xisf", {"compression": "zlib:24"}, data=packed)
    with pytest.raises(StackError, match="decompression bomb") as info:
        open_pixels(read_frame(path))
    assert info.value.path == path


@pytest.mark.parametrize("codec", ["zlib", "lz4", "zstd"])
def test_corrupt_or_short_compressed_data(tmp_path, codec):
    good = package_file(tmp_path / "g.xisf", smooth(np.uint16), codec)
    raw = bytearray(good.read_bytes())
    frame_size = read_frame(good).data_bytes
    start = len(raw) - frame_size
    raw[start:start + 40] = bytes(range(40, 80))
    (tmp_path / "bad.xisf").write_bytes(bytes(raw))
    with pytest.raises(StackError, match=r"bad\.xisf: (corrupt|XISF)"):
        open_pixels(read_frame(tmp_path / "bad.xisf"))


def test_missing_codec_package_names_it(tmp_path, monkeypatch):
    path = package_file(tmp_path / "f.xisf", smooth(np.uint16), "lz4")
    monkeypatch.setitem(sys.modules, "lz4.block", None)
    assert "pip install lz4" in _reason(path)
    path = package_file(tmp_path / "z.xisf", smooth(np.uint16), "zstd")
    monkeypatch.setitem(sys.modules, "zstandard", None)
    assert "pip install zstandard" in _reason(path)


def test_file_changed_since_planned(tmp_path):
    path = package_file(tmp_path / "f.xisf", smooth(np.uint16))
    frame = read_frame(path)
    package_file(tmp_path / "f.xisf.new", smooth(np.uint16), keywords={**KEYWORDS, "IMAGETYP": "'LIGHT'"})
    (tmp_path / "f.xisf.new").replace(path)
    with pytest.raises(StackError, match="changed since it was planned"):
        open_pixels(frame)


# --------------------------------------------------------------------------- writing


def master_fits_header() -> fits.Header:
    h = fits.Header()
    h["IMAGETYP"] = ("Master Flat", "type of image")
    h["FILTER"] = "L'x"
    h["EXPTIME"] = (1.5, "[s] mean exposure")
    h["NCOMBINE"] = 7
    h["COMBAUTO"] = True
    h["REJLOW"] = 1.25e-7
    h["BAYERPAT"] = "RGGB"
    h["XBAYROFF"] = 1
    h["CREATOR"] = "flatd 0.1.0"
    h.add_comment("a comment")
    h.add_history("input 1/7: flat_001.fits; minus bias")
    return h


@pytest.mark.parametrize("codec,shuffle", [(None, False)] + [(c, s) for c in CODECS for s in (False, True)])
def test_round_trip_values_and_keywords(tmp_path, codec, shuffle):
    data = smooth(np.float32) / 3
    needed, write = xisf_payload(data, master_fits_header(), codec=codec, shuffle=shuffle)
    with open(tmp_path / "m.xisf", "wb") as handle:
        write(handle)
    assert (tmp_path / "m.xisf").stat().st_size == needed
    frame = read_frame(tmp_path / "m.xisf")
    assert frame.compressed == (codec is not None)
    assert np.array_equal(read_image(frame), data)
    header = master_fits_header()
    for key in ("IMAGETYP", "FILTER", "EXPTIME", "NCOMBINE", "COMBAUTO", "REJLOW", "BAYERPAT", "XBAYROFF", "CREATOR"):
        assert frame.headers[key] == header[key], key
    assert frame.kind.value == "master" and frame.bayer_pattern == "RGGB" and frame.bayer_offset == (1, 0)


def test_write_master_xisf_read_by_the_package(tmp_path):
    data = smooth(np.float32)
    header = master_fits_header()
    path = write_master(tmp_path / "out", "FLAT-L.xisf", data, header)
    assert path.name == "FLAT-L.xisf" and not [p for p in path.parent.iterdir() if p != path]
    ours = XISF(str(path))
    meta = ours.get_images_metadata()[0]
    assert np.array_equal(ours.read_image(0)[:, :, 0], data)
    assert meta["sampleFormat"] == "Float32" and meta["geometry"] == (53, 37, 1)
    keywords = meta["FITSKeywords"]
    fits_master = write_master(tmp_path / "out", "FLAT-L.fits", data, header)
    written = fits.getheader(fits_master)
    skip = {"SIMPLE", "BITPIX", "NAXIS", "NAXIS1", "NAXIS2", "EXTEND", "CHECKSUM", "DATASUM", "COMMENT", "HISTORY"}
    assert set(keywords) - {"COMMENT", "HISTORY"} == {k for k in written if k not in skip}
    # FITS doubles a quote inside a string; the package only strips the outer ones
    assert keywords["FILTER"][0]["value"] == "L''x" and keywords["NCOMBINE"][0]["value"] == "7"
    assert [e["comment"] for e in keywords["HISTORY"]] == list(written["HISTORY"])
    cfa = ET_find(path, "ColorFilterArray")
    assert cfa is not None and cfa.get("pattern") == "GRBG"  # RGGB seen from column 1
    assert write_master(tmp_path / "out", "FLAT-L.xisf", data, header).name == "FLAT-L-2.xisf"


def ET_find(path: Path, tag: str):
    import xml.etree.ElementTree as ET

    raw = path.read_bytes()
    length = int.from_bytes(raw[8:12], "little")
    root = ET.fromstring(raw[16:16 + length])
    return root.find(f"{{http://www.pixinsight.com/xisf}}Image/{{http://www.pixinsight.com/xisf}}{tag}")


def test_cfa_pattern_offsets():
    h = fits.Header()
    assert cfa_pattern(h) is None
    h["BAYERPAT"] = "RGGB"
    assert cfa_pattern(h) == "RGGB"
    h["YBAYROFF"] = 1
    assert cfa_pattern(h) == "GBRG"
    h["XBAYROFF"] = 1
    assert cfa_pattern(h) == "BGGR"


def test_output_format_names():
    assert with_format("FLAT-{filter}.fits", "xisf") == "FLAT-{filter}.xisf"
    assert with_format("FLAT-{filter}.fits.fz", "fits") == "FLAT-{filter}.fits"
    assert with_format("FLAT-{filter}", "fits.fz") == "FLAT-{filter}.fits.fz"
    assert with_format("FLAT.xisf", None) == "FLAT.xisf"
    assert master_name("FLAT-{filter}.xisf", {"filter": "Ha"}) == "FLAT-Ha.xisf"


def test_output_format_setting():
    from flatd.config import Output

    assert Output().format is None
    assert Output(format="xisf").format == "xisf"
    with pytest.raises(ValueError):
        Output(format="tiff")
    assert Output(name="M-{filter}.xisf").name.endswith(".xisf")


def test_crash_recovery_finds_an_xisf_master_by_its_job_id(tmp_path):
    from flatd.runner import find_master

    header = master_fits_header()
    header["FLATDJOB"] = "0123456789abcdef"
    path = write_master(tmp_path, "M.xisf", smooth(np.float32), header)
    assert find_master(tmp_path, "0123456789abcdef") == path


@pytest.mark.parametrize("codec", ["zlib", "zstd"])
def test_streaming_decode_holds_little_memory(tmp_path, codec):
    """zlib and zstd are decoded in bounded chunks: opening a 16 MB image costs what a
    4 MB one does, a few MB (lz4's block format is decoded whole, one (sub)block at a time)."""
    import tracemalloc

    peaks = []
    for rows in (1000, 4000):
        data = np.tile(smooth(np.uint16, (1, 2000)), (rows, 1))
        frame = read_frame(package_file(tmp_path / f"big{rows}.xisf", data, codec, True))
        tracemalloc.start()
        try:
            with open_pixels(frame) as src:
                band = src.rows(rows - 4, rows)
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
        assert np.array_equal(band, data[-4:].astype(np.float32))
    assert peaks[1] < 4 * 2**20 and peaks[1] < peaks[0] + 2**19, peaks
