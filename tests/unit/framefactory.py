"""A Frame with typical values, for tests that need header facts but no file."""

from datetime import datetime
from pathlib import Path

from flatd.ingest.frames import Frame, Kind


def make_frame(name="flat_001.fits", **kw) -> Frame:
    values = dict(
        path=Path("/captures") / name,
        kind=Kind.FLAT,
        width=4144,
        height=2822,
        xbin=1,
        ybin=1,
        filter="L",
        exposure=2.0,
        temperature=-10.0,
        set_temperature=-10.0,
        date=datetime(2026, 11, 24, 18, 30, 0),
        instrument="ZWO ASI294MM Pro",
        telescope="RedCat 51",
    )
    values.update(kw)
    return Frame(**values)
