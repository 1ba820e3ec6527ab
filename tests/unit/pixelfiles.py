"""Small FITS files of every storage for the pixel and engine tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from astropy.io import fits

from flatd.ingest.frames import read_frame

H, W = 37, 53  # bands of 5 rows leave a band of 2 at the bottom


def write(path: Path, data: np.ndarray, compressed: bool = False, **header) -> Path:
    if compressed:
        hdul = fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(data)])
    else:
        hdul = fits.HDUList([fits.PrimaryHDU(data)])
    for key, value in header.items():
        hdul[-1].header[key] = value
    hdul.writeto(path)
    return path


def flat_data(rng, level, shape=(H, W)):
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    vignette = 1 - 0.2 * (((xx - w / 2) / w) ** 2 + ((yy - h / 2) / h) ** 2)
    data = rng.normal(level * vignette, 40)
    data[rng.random(shape) < 0.01] = 65000  # hot pixels and cosmic rays to reject
    return data.clip(0, 65535)


def make_files(d: Path) -> dict:
    """7 flats of mixed storage (uint16 with BZERO, int16, float32, tile-compressed) and a dark, in `d`."""
    rng = np.random.default_rng(11)
    flats = []
    kinds = ["uint16", "uint16", "int16", "float32", "fz", "uint16", "fz"]
    for i, kind in enumerate(kinds):
        data = flat_data(rng, 8000 + 2500 * i)
        if kind == "uint16":
            path = write(d / f"flat{i}.fits", data.astype(np.uint16), IMAGETYP="Flat Field")
        elif kind == "int16":
            path = write(d / f"flat{i}.fits", (data / 4).astype(np.int16), IMAGETYP="Flat Field")
        elif kind == "float32":
            data[5, :7] = 80000.0  # above the 16-bit range: clipped to 65535 when calibrated
            path = write(d / f"flat{i}.fits", data.astype(np.float32), IMAGETYP="Flat Field")
        else:
            path = write(d / f"flat{i}.fits.fz", data.astype(np.uint16), compressed=True, IMAGETYP="Flat Field")
        flats.append(read_frame(path))
    dark = rng.normal(300, 30, size=(H, W))
    dark[3, 4] = 60000  # brighter than the flats there: the subtraction clips at 0
    dark_frame = read_frame(write(d / "dark.fits", dark.astype(np.uint16), IMAGETYP="Dark Frame"))
    return {"dir": d, "flats": flats, "dark": dark_frame}
