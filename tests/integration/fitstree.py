"""Small seeded FITS trees: flats with a known illumination pattern, darks and biases."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.io import fits

BIAS_LEVEL = 500.0


def pattern(height: int, width: int) -> np.ndarray:
    """Vignetting plus a gradient, mean 1."""
    y, x = np.mgrid[0:height, 0:width]
    r2 = ((x - width / 2) / width) ** 2 + ((y - height / 2) / height) ** 2
    p = (1.0 - 0.8 * r2) * (1.0 + 0.1 * x / width)
    return p / p.mean()


def write_fits(path: Path, data: np.ndarray, **cards) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if data.dtype == np.uint16 or np.issubdtype(data.dtype, np.floating):
        hdu = fits.PrimaryHDU(data)
    else:
        hdu = fits.PrimaryHDU(data.astype(np.uint16))
    for key, value in cards.items():
        hdu.header[key.replace("_", "-")] = value
    hdu.writeto(path)
    return path


@dataclass
class Tree:
    root: Path
    rng: np.random.Generator

    def flat(self, name: str, level: float = 20000.0, filt: str | None = "R", temp: float = -10.0,
             exposure: float = 2.0, binning: int = 1, shape=(40, 50), imagetyp: str = "FLAT",
             folder: str = "captures/night1", cosmic: bool = False) -> Path:
        h, w = shape
        signal = level * pattern(h, w)
        data = self.rng.normal(signal, np.sqrt(signal)) + BIAS_LEVEL
        if cosmic:
            data[h // 2, w // 2] = 65000
        cards = dict(IMAGETYP=imagetyp, EXPTIME=exposure, EXPOSURE=exposure, CCD_TEMP=temp,
                     XBINNING=binning, YBINNING=binning, DATE_OBS="2026-11-24T18:00:00.000",
                     INSTRUME="ZWO ASI2600MM Pro")
        if filt is not None:
            cards["FILTER"] = filt
        return write_fits(self.root / folder / name, np.clip(data, 0, 65535).astype(np.uint16), **cards)

    def bias(self, name: str, shape=(40, 50), temp: float = -10.0, binning: int = 1, folder: str = "calib") -> Path:
        data = self.rng.normal(BIAS_LEVEL, 3.0, shape)
        return write_fits(self.root / folder / name, data.astype(np.uint16), IMAGETYP="BIAS", EXPTIME=0.0,
                          CCD_TEMP=temp, XBINNING=binning, YBINNING=binning)

    def dark(self, name: str, exposure: float, shape=(40, 50), temp: float = -10.0, folder: str = "calib") -> Path:
        data = self.rng.normal(BIAS_LEVEL + 5, 3.0, shape)
        return write_fits(self.root / folder / name, data.astype(np.uint16), IMAGETYP="DARK", EXPTIME=exposure,
                          CCD_TEMP=temp, XBINNING=1, YBINNING=1)

    def rules(self, text: str) -> Path:
        path = self.root / "flatd.yaml"
        path.write_text(text)
        return path




def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under root with its bytes, by path relative to root."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
