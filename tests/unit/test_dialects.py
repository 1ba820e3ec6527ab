"""Real headers from each capture program: camera settings and CFA layout parse to the right values."""

from __future__ import annotations

from pathlib import Path

import pytest

from flatd.ingest.frames import frame_from_header_text
from flatd.output.carry import DEFAULT_CARRY, carry

HEADERS = Path(__file__).resolve().parents[3] / "shared" / "realdata" / "headers"
pytestmark = pytest.mark.skipif(not HEADERS.is_dir(), reason="../shared/realdata is not here")

# file: (instrument, gain, offset, readout mode, Bayer pattern, Bayer offset)
EXPECTED = {
    "header_nina.hdr": ("ZWO ASI294MC Pro", 120.0, 30.0, None, "RGGB", (0, 0)),
    "header_seestar.hdr": ("Seestar S50", 80.0, None, None, "GRBG", (0, 0)),
    "header_dwarflab.hdr": ("DWARFII", 110.0, None, None, "GBRG", (0, 0)),
    "header_sgp_fixed_wcs.hdr": ("ZWO ASI294MC Pro", 120.0, 30.0, None, None, (0, 0)),
    "sgp_header.hdr": ("ZWO ASI294MC Pro", 120.0, 30.0, None, None, (0, 0)),
    "header_maximdl.hdr": ("Apogee USB/Net", None, None, "Monochrome", None, (0, 0)),
    "header_apt.hdr": ("ZWO ASI294MC Pro", 120.0, None, None, None, (0, 0)),
    "header_app.hdr": (None, 0.0, None, None, None, (0, 0)),  # CFAIMAGE = 'no': mono
    "header_app2.hdr": ("ZWO ASI294MC Pro", 120.0, None, None, "RGGB", (0, 0)),  # CFAIMAGE = 'RGGB'
    "header_sharpcap.hdr": ("ZWO ASI290MM Mini", None, None, None, None, (0, 0)),
}


def read(name: str):
    path = HEADERS / name
    return frame_from_header_text(path.read_text(encoding="ascii", errors="replace"), path)


def test_every_stored_header_is_covered():
    assert {p.name for p in HEADERS.glob("*.hdr")} <= set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_camera_settings_and_cfa(name):
    if not (HEADERS / name).is_file():
        pytest.skip(f"{name} is not here")
    frame = read(name)
    facts = (frame.instrument, frame.gain, frame.offset, frame.readout_mode, frame.bayer_pattern, frame.bayer_offset)
    assert facts == EXPECTED[name]
    assert frame.row_order == "TOP-DOWN"


def test_egain_is_not_the_gain():
    """EGAIN (e-/ADU) is a conversion factor, not the camera's gain setting."""
    assert read("header_sgp_fixed_wcs.hdr").gain == 120.0
    assert read("header_apt.hdr").gain == 120.0


def test_carried_values_of_two_nina_frames():
    """Two N.I.N.A. flats of one session: every carried key agrees and keeps its value."""
    a, b = read("header_nina.hdr"), read("header_nina.hdr")
    carried = {v.key: v.value for v in carry(DEFAULT_CARRY, [a.headers, b.headers])}
    assert carried["GAIN"] == 120 and carried["OFFSET"] == 30
    assert carried["XPIXSZ"] == 4.63 and carried["BAYERPAT"] == "RGGB"
    assert carried["XBAYROFF"] == 0 and carried["YBAYROFF"] == 0
    assert carried["ROWORDER"] == "TOP-DOWN" and carried["SET-TEMP"] == -10.0


def test_seestar_and_sharpcap_pixel_size_precision():
    """2.90000009536743 (a float32 written in full) agrees with 2.9; the master gets 2.9."""
    seestar = read("header_seestar.hdr")
    (verdict,) = carry(["XPIXSZ"], [seestar.headers, {**seestar.headers, "XPIXSZ": 2.9}])
    assert verdict.value == 2.9
