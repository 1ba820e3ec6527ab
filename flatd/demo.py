"""`flatd demo DIR`: a realistic N.I.N.A. capture session and calibration library.

Everything comes from one seed: the same seed writes the same bytes. The tree is
small enough to be written in about a second, and it is made from known parts, so
tests can check what flatd makes of it:

* an illumination pattern (`illumination`, `Pattern`): radial vignetting, a gradient
  and a few dust donuts, normalized to mean 1.0;
* a sensor (`Sensor`): a bias level with a fixed column pattern, dark current with
  hot pixels that doubles every few degrees, read noise and shot noise, present
  alike in the flats and in the calibration library;
* flats in several filters, two binnings and two set-points, with a sky level that
  drifts from frame to frame (twilight), and cosmic-ray hits whose positions are
  recorded;
* a colour-camera rig as an ASIAIR writes it: an uncooled RGGB sensor with 2.4 µm
  pixels and no FILTER keyword, whose red, green and blue pixels see 0.8, 1.0 and 0.6
  of the light (`CFA_RESPONSE`), with its own bias and dark-flat in the library;
* a third night with problems (`problem_groups`): a twilight series of R flats with
  night 1's camera and optics, of which one is over-exposed (saturated), one has a light
  leak and one a cloud (`faults`: the flat checks leave them out), and whose illumination
  (`PROBLEM_PATTERN`) has one dust donut moved since night 1 (`moved_donut`: the
  comparison with night 1's R master finds one donut that went and one that appeared).

A master made from a group, calibrated with the library's matching dark-flat and
divided by its mean, matches `illumination(shape, binning)` within the shot noise of
the group's frames; an uncalibrated master does not (the 500 ADU bias and the column
pattern show).

Layout written under ROOT::

    captures/<night>/FLAT/<date>_<time>_<filter>_FLAT_<exp>s_<nnnn>.fits   (night 3: R, 3 faulty)
    captures/<night>/LIGHT/...LIGHT...fits        (left out: not a flat)
    captures/<night>/notes.txt                    (left out: not FITS)
    captures/<night 1>/Autorun/Flat/Flat_<exp>s_Bin1_183MC_gain<g>_<date>-<time>_<temp>C_<nnnn>.fit
    calibration/<date>/{BIAS,DARK,DARKFLAT}/...fits
    calibration/<date>/ASIAIR/{Bias,DarkFlat}_...fit
    flatd.yaml                                    (paths relative to ROOT)
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

# --------------------------------------------------------------------------- constants

INSTRUMENT = "ZWO ASI2600MM Pro"
TELESCOPE = "Sky-Watcher Esprit 100ED"
SOFTWARE = "N.I.N.A. 3.1.2.9001"
FOCAL_LENGTH = 550.0
PIXEL_SIZE = 3.76
GAIN = 100
OFFSET = 50
UTC_OFFSET = timedelta(hours=1)  # the observatory keeps Central European Time

BASE_SHAPE = (480, 640)  # rows, columns of a 1x1 frame at scale 1

# The colour rig: an uncooled one-shot-colour camera on a small refractor, run by an ASIAIR.
COLOUR_INSTRUMENT = "ZWO ASI183MC"
COLOUR_TELESCOPE = "William Optics RedCat 51"
COLOUR_SOFTWARE = "ZWO ASIAIR Plus"
COLOUR_PIXEL_SIZE = 2.4
COLOUR_FOCAL_LENGTH = 250.0
COLOUR_GAIN = 111
COLOUR_OFFSET = 10
BAYER_PATTERN = "RGGB"
CFA_RESPONSE = (0.8, 1.0, 0.6)  # R, G, B: the colour balance a master keeps
COLOUR_SHAPE = (300, 400)  # rows, columns at scale 1 (even: whole 2x2 cells)
COLOUR_TEMPERATURE = 18.0  # the sensor's temperature, uncooled
# (exposure, mean sky level over all pixels, count)
COLOUR_FLATS = (0.5, 20000.0, 8)
MIN_GROUP_SIZE = 5
FIRST_NIGHT = date(2026, 11, 24)  # the night written for the default seed
DEFAULT_SEED = 2026

Binning = Union[int, Sequence[int]]


# --------------------------------------------------------------------------- illumination


@dataclass(frozen=True)
class Donut:
    """The out-of-focus shadow of a dust mote: a dark ring with a lighter centre.

    x, y: centre as fractions of the sensor width and height; radius: outer radius as
    a fraction of the sensor width; depth: fraction of light lost in the ring.
    """

    x: float
    y: float
    radius: float
    depth: float
    hole: float = 0.45  # inner radius, as a fraction of the outer one
    hole_light: float = 0.6  # how much of the depth the lighter centre gets back


@dataclass(frozen=True)
class Pattern:
    """A flat field's illumination, in sensor coordinates (independent of size).

    value = (1 - a r^2 - b r^4) * (1 + gx (u - 1/2) + gy (v - 1/2)) * prod(1 - donut)
    with u, v the position as fractions of width and height, and r the distance from
    `center` in units of the half-diagonal; then normalized to mean 1.0.
    """

    center: tuple[float, float] = (0.53, 0.46)
    falloff: tuple[float, float] = (0.20, 0.06)
    gradient: tuple[float, float] = (0.04, -0.025)
    donuts: tuple[Donut, ...] = (
        Donut(0.28, 0.35, 0.045, 0.06),
        Donut(0.71, 0.62, 0.035, 0.05),
        Donut(0.62, 0.22, 0.025, 0.04),
        Donut(0.40, 0.78, 0.055, 0.03),
    )

    def __call__(self, shape: Sequence[int], binning: Binning = 1) -> np.ndarray:
        return illumination(shape, binning, self)


DEFAULT_PATTERN = Pattern()


def _bins(binning: Binning) -> tuple[int, int]:
    """(x, y) binning from 2, (2, 2) or "2x2"."""
    if isinstance(binning, str):
        x, _, y = binning.lower().partition("x")
        return int(x), int(y or x)
    if isinstance(binning, (int, np.integer)):
        return int(binning), int(binning)
    x, y = binning
    return int(x), int(y)


def _bin_mean(full: np.ndarray, xbin: int, ybin: int) -> np.ndarray:
    if xbin == 1 and ybin == 1:
        return full
    h, w = full.shape[0] // ybin, full.shape[1] // xbin
    return full[: h * ybin, : w * xbin].reshape(h, ybin, w, xbin).mean(axis=(1, 3))


@functools.lru_cache(maxsize=16)
def _illumination_cached(pattern: Pattern, shape: tuple[int, int], xbin: int, ybin: int) -> np.ndarray:
    rows, cols = shape[0] * ybin, shape[1] * xbin
    y = (np.arange(rows, dtype=np.float64) + 0.5)[:, None]
    x = (np.arange(cols, dtype=np.float64) + 0.5)[None, :]
    u, v = x / cols, y / rows
    cx, cy = pattern.center[0] * cols, pattern.center[1] * rows
    half_diagonal = math.hypot(cols, rows) / 2
    r2 = ((x - cx) ** 2 + (y - cy) ** 2) / half_diagonal**2
    a, b = pattern.falloff
    field_ = (1.0 - a * r2 - b * r2 * r2) * (1.0 + pattern.gradient[0] * (u - 0.5) + pattern.gradient[1] * (v - 0.5))
    for d in pattern.donuts:
        outer = d.radius * cols
        edge = max(0.06 * outer, 0.5)
        # Work only in the donut's bounding box: the shadow is nil beyond it.
        x0, x1 = int(max(0, d.x * cols - outer - 10 * edge)), int(min(cols, d.x * cols + outer + 10 * edge + 1))
        y0, y1 = int(max(0, d.y * rows - outer - 10 * edge)), int(min(rows, d.y * rows + outer + 10 * edge + 1))
        if x0 >= x1 or y0 >= y1:
            continue
        r = np.hypot(x[:, x0:x1] - d.x * cols, y[y0:y1, :] - d.y * rows)
        ring = 1.0 / (1.0 + np.exp((r - outer) / edge))
        hole = 1.0 / (1.0 + np.exp((r - d.hole * outer) / edge))
        field_[y0:y1, x0:x1] *= 1.0 - d.depth * (ring - d.hole_light * hole)
    binned = _bin_mean(field_, xbin, ybin)
    binned = binned / binned.mean()
    binned.setflags(write=False)
    return binned


def illumination(shape: Sequence[int], binning: Binning = 1, pattern: Pattern = DEFAULT_PATTERN) -> np.ndarray:
    """The illumination of a (rows, columns) frame at `binning`, normalized to mean 1.0.

    Computed on the unbinned sensor grid and averaged over each bin, so the 1x1 and
    2x2 patterns of the same optics agree. Returns a new float64 array.
    """
    xbin, ybin = _bins(binning)
    return np.array(_illumination_cached(pattern, (int(shape[0]), int(shape[1])), xbin, ybin))


# --------------------------------------------------------------------------- sensor


@dataclass(frozen=True)
class Sensor:
    """Bias, dark current and noise, the same in flats and in calibration frames.

    All in ADU. The fixed patterns (columns, hot pixels) are drawn from `seed` on the
    unbinned grid and averaged over each bin.
    """

    seed: int = DEFAULT_SEED
    bias_level: float = 500.0
    column_rms: float = 12.0  # fixed column pattern
    read_noise: float = 3.0
    egain: float = 0.78  # e-/ADU: shot noise variance is signal / egain
    dark_rate: float = 0.02  # ADU/s per pixel at 0 °C
    doubling: float = 6.0  # dark current doubles every this many °C
    hot_fraction: float = 0.0005
    hot_rate: tuple[float, float] = (2.0, 30.0)  # ADU/s at 0 °C

    def bias(self, shape: Sequence[int], binning: Binning = 1) -> np.ndarray:
        """The mean bias frame: level plus the fixed column pattern."""
        xbin, ybin = _bins(binning)
        columns, _ = _sensor_maps(self, int(shape[0]) * ybin, int(shape[1]) * xbin)
        binned = columns.reshape(-1, xbin).mean(axis=1) if xbin > 1 else columns
        return np.broadcast_to(self.bias_level + binned[None, :], (int(shape[0]), int(shape[1]))).astype(np.float64)

    def dark_current(self, shape: Sequence[int], binning: Binning = 1, temperature: float = 0.0) -> np.ndarray:
        """Dark current in ADU/s per pixel at `temperature` (°C), hot pixels included."""
        xbin, ybin = _bins(binning)
        _, rate = _sensor_maps(self, int(shape[0]) * ybin, int(shape[1]) * xbin)
        return _bin_mean(rate, xbin, ybin) * 2.0 ** (temperature / self.doubling)

    def offset(self, shape: Sequence[int], binning: Binning, temperature: float, exposure: float) -> np.ndarray:
        """What a dark frame records on average: bias plus dark current times exposure."""
        return self.bias(shape, binning) + self.dark_current(shape, binning, temperature) * exposure


@functools.lru_cache(maxsize=8)
def _sensor_maps(sensor: Sensor, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([sensor.seed, 0x5E45])
    x = np.arange(cols)
    columns = rng.normal(0.0, sensor.column_rms, cols) + 0.5 * sensor.column_rms * np.sin(2 * np.pi * x / 97.0)
    rate = np.full((rows, cols), sensor.dark_rate)
    hot = int(sensor.hot_fraction * rows * cols)
    flat_index = rng.choice(rows * cols, size=hot, replace=False)
    rate.flat[flat_index] = rng.uniform(*sensor.hot_rate, size=hot)
    columns.setflags(write=False)
    rate.setflags(write=False)
    return columns, rate


def cfa_response(shape: Sequence[int], bayer: str = BAYER_PATTERN,
                 response: Sequence[float] = CFA_RESPONSE) -> np.ndarray:
    """Each pixel's share of the light on a colour sensor: the R, G or B `response`."""
    from flatd.stack.cfa import CHANNELS, Layout, channel_masks

    out = np.zeros((int(shape[0]), int(shape[1])))
    for colour, mask in channel_masks(out.shape, Layout(bayer)).items():
        out[mask] = response[CHANNELS.index(colour)]
    return out


# --------------------------------------------------------------------------- session


@dataclass(frozen=True)
class FlatGroup:
    """One flat sequence written: the frames flatd should combine into one master."""

    filter: Optional[str]
    binning: int
    setpoint: float
    exposure: float
    level: float  # mean sky level (ADU above bias and dark) the sequence started at
    night: date
    shape: tuple[int, int]  # rows, columns
    files: tuple[Path, ...]
    levels: tuple[float, ...]  # mean sky level of each file
    temperatures: tuple[float, ...]  # CCD-TEMP of each file
    bayer: Optional[str] = None  # colour rig: the CFA pattern (None: mono)
    response: tuple[float, float, float] = (1.0, 1.0, 1.0)  # R, G, B pixels' share of the light
    pattern: Optional[Pattern] = None  # its own illumination (None: the session's)
    faults: tuple[tuple[Path, str], ...] = ()  # (file, fault) the flat checks must leave out

    @property
    def count(self) -> int:
        return len(self.files)

    @property
    def left_out(self) -> tuple[Path, ...]:
        """The faulty flats: never combined, never moved."""
        return tuple(path for path, _ in self.faults)

    @property
    def combined(self) -> tuple[Path, ...]:
        """The flats its master is made of."""
        return tuple(p for p in self.files if p not in self.left_out)

    @property
    def combined_levels(self) -> tuple[float, ...]:
        return tuple(v for p, v in zip(self.files, self.levels) if p not in self.left_out)

    @property
    def binning_label(self) -> str:
        return f"{self.binning}x{self.binning}"

    @property
    def too_few(self) -> bool:
        """Below the demo rules' min_group_size: reported, not combined."""
        return self.count < MIN_GROUP_SIZE

    @property
    def label(self) -> str:
        return f"{self.filter} {self.binning_label} {self.setpoint:g}C {self.exposure:g}s"


@dataclass(frozen=True)
class CalibrationFile:
    """One frame of the calibration library."""

    kind: str  # "bias", "dark" or "dark-flat" (frames.Kind values)
    binning: int
    setpoint: float
    temperature: float
    exposure: float
    filter: Optional[str]
    shape: tuple[int, int]
    path: Path


@dataclass
class DemoSession:
    """What `write_demo` wrote, with the parameters tests need to check results."""

    root: Path
    captures: Path
    calibration: Path
    config: Path
    state: Path
    seed: int
    scale: int
    nights: tuple[date, ...]
    groups: list[FlatGroup]
    calibration_files: list[CalibrationFile]
    others: list[Path]  # files in the capture folder that are not flats
    cosmic_rays: dict[str, tuple[tuple[int, int], ...]]  # file name -> (row, column) hits
    pattern: Pattern = DEFAULT_PATTERN
    sensor: Sensor = field(default_factory=Sensor)
    min_group_size: int = MIN_GROUP_SIZE
    colour_groups: list[FlatGroup] = field(default_factory=list)  # the colour rig's (not in `groups`)
    # the night with problems (not in `groups`): faulty flats and a moved dust donut
    problem_groups: list[FlatGroup] = field(default_factory=list)
    # the moved donut, in pixels of the problem night's frames: (went (x, y), appeared (x, y))
    moved_donut: Optional[tuple[tuple[float, float], tuple[float, float]]] = None

    @property
    def all_groups(self) -> list[FlatGroup]:
        return self.groups + self.colour_groups + self.problem_groups

    @property
    def faults(self) -> dict[Path, str]:
        """Every flat the checks must leave out, with its fault."""
        return {path: fault for g in self.all_groups for path, fault in g.faults}

    @property
    def flat_files(self) -> list[Path]:
        return [p for g in self.all_groups for p in g.files]

    @property
    def combinable(self) -> list[FlatGroup]:
        """Groups that should become masters (at least min_group_size flats), colour ones too."""
        return [g for g in self.all_groups if not g.too_few]

    def group(self, filter: Optional[str], binning: int = 1, setpoint: Optional[float] = None) -> FlatGroup:
        found = [g for g in self.all_groups if g.filter == filter and g.binning == binning
                 and (setpoint is None or g.setpoint == setpoint)]
        if len(found) != 1:
            raise LookupError(f"{len(found)} groups with filter {filter}, {binning}x{binning}, set-point {setpoint}")
        return found[0]

    def illumination(self, group: FlatGroup) -> np.ndarray:
        """The pattern a calibrated master of `group`, divided by its mean, should show
        (for the colour rig, times each pixel's colour response)."""
        field_ = illumination(group.shape, group.binning, group.pattern or self.pattern)
        if group.bayer:
            field_ *= cfa_response(group.shape, group.bayer, group.response)
            field_ /= field_.mean()
        return field_

    def dark_flat_for(self, group: FlatGroup) -> CalibrationFile:
        """The library frame that matches `group` exactly (binning, set-point, exposure)."""
        for c in self.calibration_files:
            if (c.kind == "dark-flat" and c.binning == group.binning and c.setpoint == group.setpoint
                    and c.exposure == group.exposure):
                return c
        raise LookupError(f"no dark-flat for {group.label}")

    def expected_noise(self, group: FlatGroup) -> np.ndarray:
        """Per-pixel relative noise of the mean of the group's combined frames (shot + read)."""
        sky = float(np.mean(group.combined_levels)) * self.illumination(group)
        variance = sky / self.sensor.egain + self.sensor.read_noise**2
        return np.sqrt(variance / len(group.combined)) / sky


# Flat sequences: (filter, binning, set-point, exposure, sky level, count).
# Night 1: the camera at -10 °C, 1x1; SII gets only 3 flats (too few: reported).
# Night 2: the camera at 0 °C, 2x2 (exposures 4x shorter: the bins are summed) and
# one 1x1 L set that only temperature tells apart from night 1's.
_NIGHTS = (
    (
        ("L", 1, -10.0, 1.5, 30000.0, 8),
        ("R", 1, -10.0, 3.0, 26000.0, 7),
        ("Ha", 1, -10.0, 12.0, 21000.0, 9),
        ("SII", 1, -10.0, 15.0, 19000.0, 3),
    ),
    (
        ("L", 2, 0.0, 0.4, 29000.0, 8),
        ("R", 2, 0.0, 0.8, 25000.0, 6),
        ("Ha", 2, 0.0, 3.0, 22000.0, 7),
        ("L", 1, 0.0, 1.5, 28000.0, 10),
    ),
)
_LIBRARY_DARK_EXPOSURE = 300.0

# Night 3, the night with problems: a twilight series of R flats with night 1's camera
# settings and optics, so that night 1's R 1x1 master is the one earlier master of the
# same camera, filter, binning and optics (night 2's R is 2x2; an L night would meet
# night 2's L 1x1 first): (filter, binning, set-point, exposure, sky level, count).
# Three flats are faulty (`_FAULTS`, by index): over-exposed (a median of 0.93 of full
# scale, some 8 % of its pixels saturated), a light leak (a bright corner, +5 %), a
# cloud (a patch 4 % darker). The first donut's dust mote has moved (PROBLEM_PATTERN).
_PROBLEM_NIGHT = ("R", 1, -10.0, 3.0, 26000.0, 9)
_FAULTS = {2: "over-exposed", 4: "light leak", 6: "cloud"}
OVER_EXPOSED_LEVEL = 0.92 * 65535.0  # the mean sky level
LEAK_STRENGTH, CLOUD_DEPTH = 0.05, 0.04
MOVED_DONUT = Donut(0.20, 0.70, 0.045, 0.06)  # was DEFAULT_PATTERN.donuts[0], at (0.28, 0.35)
PROBLEM_PATTERN = Pattern(donuts=(MOVED_DONUT, *DEFAULT_PATTERN.donuts[1:]))


def _fits_time(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}"


def _name_time(t: datetime) -> str:
    return t.strftime("%Y-%m-%d_%H-%M-%S")


class _Writer:
    def __init__(self, root: Path, seed: int, scale: int, sensor: Sensor, pattern: Pattern):
        self.root = root
        self.seed = seed
        self.sensor = sensor
        self.pattern = pattern
        self.rng = np.random.default_rng([seed, 1])
        self.files_written = 0
        self.shape1 = (BASE_SHAPE[0] * scale, BASE_SHAPE[1] * scale)

    def shape(self, binning: int) -> tuple[int, int]:
        return (self.shape1[0] // binning, self.shape1[1] // binning)

    def noise_rng(self) -> np.random.Generator:
        """A stream per file, so one file's noise never depends on another's size."""
        self.files_written += 1
        return np.random.default_rng([self.seed, 2, self.files_written])

    # ------------------------------------------------------------------ pixels

    def frame(self, shape, binning, temperature, exposure, sky: Optional[np.ndarray], rng) -> np.ndarray:
        """Bias + dark + sky, with shot and read noise, as float32 (not yet rounded)."""
        s = self.sensor
        dark = (s.dark_current(shape, binning, temperature) * exposure).astype(np.float32)
        mean = s.bias(shape, binning).astype(np.float32) + dark
        variance = dark / np.float32(s.egain) + np.float32(s.read_noise**2)
        if sky is not None:
            mean += sky
            variance += sky / np.float32(s.egain)
        noise = rng.standard_normal(shape, dtype=np.float32)
        return mean + noise * np.sqrt(variance)

    def cosmic_rays(self, image: np.ndarray, rng) -> tuple[tuple[int, int], ...]:
        """Hit about half the frames with 1-3 single pixels or short streaks at 60000+."""
        if rng.random() >= 0.5:
            return ()
        rows, cols = image.shape
        hits: list[tuple[int, int]] = []
        for _ in range(int(rng.integers(1, 4))):
            length = int(rng.integers(1, 6))
            dy, dx = [(0, 1), (1, 0), (1, 1), (1, -1)][int(rng.integers(0, 4))]
            y = int(rng.integers(8, rows - 8))
            x = int(rng.integers(8, cols - 8))
            for k in range(length):
                pos = (y + k * dy, x + k * dx)
                if pos not in hits:
                    hits.append(pos)
                image[pos] = float(rng.integers(60000, 65536))
        return tuple(hits)

    # ------------------------------------------------------------------ headers

    def header(self, imagetyp: str, exposure: float, start: datetime, binning: int, setpoint: float,
               temperature: float, filter_: Optional[str], extra: Sequence[tuple] = ()) -> list[tuple]:
        cards = [
            ("IMAGETYP", imagetyp, "Type of exposure"),
            ("EXPOSURE", float(exposure), "[s] Exposure duration"),
            ("EXPTIME", float(exposure), "[s] Exposure duration"),
            ("DATE-LOC", _fits_time(start), "Time of observation (local)"),
            ("DATE-OBS", _fits_time(start - UTC_OFFSET), "Time of observation (UTC)"),
            ("XBINNING", binning, "X axis binning factor"),
            ("YBINNING", binning, "Y axis binning factor"),
            ("GAIN", GAIN, "Sensor gain"),
            ("OFFSET", OFFSET, "Sensor gain offset"),
            ("EGAIN", self.sensor.egain, "[e-/ADU] Electrons per A/D unit"),
            ("XPIXSZ", PIXEL_SIZE * binning, "[um] Pixel X axis size"),
            ("YPIXSZ", PIXEL_SIZE * binning, "[um] Pixel Y axis size"),
            ("INSTRUME", INSTRUMENT, "Imaging instrument name"),
            ("SET-TEMP", float(setpoint), "[degC] CCD temperature setpoint"),
            ("CCD-TEMP", float(temperature), "[degC] CCD temperature"),
            ("READOUTM", "Normal", "Sensor readout mode"),
            ("USBLIMIT", 40, "Camera-specific USB setting"),
            ("TELESCOP", TELESCOPE, "Name of telescope"),
            ("FOCALLEN", FOCAL_LENGTH, "[mm] Focal length"),
            ("FOCRATIO", 5.5, "Focal ratio"),
            ("SITEELEV", 112.0, "[m] Observation site elevation"),
            ("SITELAT", 50.1109, "[deg] Observation site latitude"),
            ("SITELONG", 8.6821, "[deg] Observation site longitude"),
        ]
        if filter_ is not None:
            cards += [
                ("FWHEEL", "ZWO Filter Wheel #1", "Filter Wheel name"),
                ("FILTER", filter_, "Active filter name"),
            ]
        cards += [
            ("FOCNAME", "ZWO Focuser", "Focusing equipment name"),
            ("FOCPOS", 18234, "[step] Focuser position"),
            ("FOCUSPOS", 18234, "[step] Focuser position"),
            ("FOCUSSZ", 1.0, "[um] Focuser step size"),
            ("FOCTEMP", 3.2, "[degC] Focuser temperature"),
            ("FOCUSTEM", 3.2, "[degC] Focuser temperature"),
            *extra,
            ("ROWORDER", "TOP-DOWN", "FITS Image Orientation"),
            ("EQUINOX", 2000.0, "Equinox of celestial coordinate system"),
            ("SWCREATE", SOFTWARE, "Software that created this file"),
        ]
        return cards

    def write(self, path: Path, image: np.ndarray, cards: Sequence[tuple]) -> None:
        from astropy.io import fits

        data = np.clip(np.rint(image), 0, 65535).astype(np.uint16)
        hdu = fits.PrimaryHDU(data)
        for key, value, comment in cards:
            hdu.header[key] = (value, comment)
        path.parent.mkdir(parents=True, exist_ok=True)
        hdu.writeto(path)

    def temperature(self, setpoint: float) -> float:
        return round(setpoint + float(self.rng.uniform(-0.3, 0.3)), 1) + 0.0  # no -0.0


def write_demo(root: Path, seed: int = DEFAULT_SEED, scale: int = 1) -> DemoSession:
    """Write the demo capture session, calibration library and rules file under `root`.

    `root` must not exist or be empty: the demo never overwrites anything. `scale`
    multiplies the frame size (1x1 frames are 640x480 * scale, 2x2 half that).
    """
    root = Path(root)
    if int(scale) != scale or scale < 1:
        raise ValueError(f"scale must be a whole number >= 1, not {scale!r}")
    scale = int(scale)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise FileExistsError(f"{root}: exists and is not an empty folder; the demo writes only into a new one")
    root.mkdir(parents=True, exist_ok=True)

    sensor = Sensor(seed=seed)
    pattern = DEFAULT_PATTERN
    w = _Writer(root, seed, scale, sensor, pattern)
    captures, calibration = root / "captures", root / "calibration"
    first_night = FIRST_NIGHT + timedelta(days=(seed - DEFAULT_SEED) % 60)
    nights = tuple(first_night + timedelta(days=i) for i in range(len(_NIGHTS) + 1))  # + the problem night

    groups: list[FlatGroup] = []
    cosmic: dict[str, tuple[tuple[int, int], ...]] = {}
    others: list[Path] = []

    for night, sequences in zip(nights, _NIGHTS):  # nights[-1], the problem night, is written last
        folder = captures / night.isoformat() / "FLAT"
        # Dusk flats start a little after sunset; the flat wizard walks the filters.
        t = datetime(night.year, night.month, night.day, 16, 38, 0) + timedelta(
            seconds=float(w.rng.uniform(0, 300)))
        for filter_, binning, setpoint, exposure, level, count in sequences:
            shape = w.shape(binning)
            illum = illumination(shape, binning, pattern).astype(np.float32)
            # Twilight: the sky darkens through the sequence by a few percent overall,
            # with some jitter from frame to frame.
            start_drift = float(w.rng.uniform(0.03, 0.05))
            files, levels, temps = [], [], []
            for i in range(count):
                trend = start_drift - 2 * start_drift * i / max(count - 1, 1)
                frame_level = level * (1.0 + trend + float(w.rng.normal(0.0, 0.006)))
                temperature = w.temperature(setpoint)
                t = t.replace(microsecond=int(w.rng.integers(0, 1000)) * 1000)
                name = f"{_name_time(t)}_{filter_}_FLAT_{exposure:.2f}s_{i + 1:04d}.fits"
                rng = w.noise_rng()
                image = w.frame(shape, binning, temperature, exposure, np.float32(frame_level) * illum, rng)
                hits = w.cosmic_rays(image, rng)
                if hits:
                    cosmic[name] = hits
                cards = w.header("FLAT", exposure, t, binning, setpoint, temperature, filter_)
                w.write(folder / name, image, cards)
                files.append(folder / name)
                levels.append(frame_level)
                temps.append(temperature)
                t += timedelta(seconds=exposure + float(w.rng.uniform(1.1, 1.9)))
            groups.append(FlatGroup(filter_, binning, setpoint, exposure, level, night, shape,
                                    tuple(files), tuple(levels), tuple(temps)))
            t += timedelta(seconds=float(w.rng.uniform(20, 60)))  # filter change, exposure search

    # Night 1 also holds a light frame and the observer's notes: both are left out.
    night = nights[0]
    t = datetime(night.year, night.month, night.day, 18, 42, 10, int(w.rng.integers(0, 1000)) * 1000)
    light = captures / night.isoformat() / "LIGHT" / f"{_name_time(t)}_L_LIGHT_300.00s_0001.fits"
    shape = w.shape(1)
    sky = np.float32(850.0) * illumination(shape, 1, pattern).astype(np.float32)
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    for _ in range(40):  # a few stars
        sy, sx = w.rng.uniform(0, shape[0]), w.rng.uniform(0, shape[1])
        peak, sigma = float(w.rng.uniform(500, 20000)), float(w.rng.uniform(1.2, 2.2))
        box = (slice(max(0, int(sy) - 10), int(sy) + 11), slice(max(0, int(sx) - 10), int(sx) + 11))
        sky[box] += peak * np.exp(-((yy[box] - sy) ** 2 + (xx[box] - sx) ** 2) / (2 * sigma**2))
    temperature = w.temperature(-10.0)
    image = w.frame(shape, 1, temperature, 300.0, sky, w.noise_rng())
    w.write(light, image, w.header("LIGHT", 300.0, t, 1, -10.0, temperature, "L", extra=(
        ("OBJECT", "NGC 1499", "Name of the object of interest"),
        ("OBJCTRA", "04 03 18", "[H M S] RA of imaged object"),
        ("OBJCTDEC", "+36 25 18", "[D M S] Declination of imaged object"),
    )))
    notes = captures / night.isoformat() / "notes.txt"
    notes.write_text(
        f"{night.isoformat()}  Esprit 100 + ASI2600MM Pro, -10 C\n"
        "Dusk flats L R Ha with the flat wizard; SII cut short by cloud (3 frames).\n"
        "NGC 1499 from 18:40, 300 s L. Clouded out at 19:05.\n",
        encoding="utf-8",
    )
    others += [light, notes]

    calibration_files = _write_library(w, calibration, first_night - timedelta(days=4), groups)
    colour_groups = [_write_colour_rig(w, captures, nights[0], scale, cosmic)]
    calibration_files += _write_colour_library(w, calibration, first_night - timedelta(days=4), colour_groups[0])
    problem_groups = [_write_problem_night(w, captures, nights[-1], cosmic)]  # night 1's dark-flat fits it
    config = root / "flatd.yaml"
    config.write_text(_rules_text(seed), encoding="utf-8")
    return DemoSession(
        root=root,
        captures=captures,
        calibration=calibration,
        config=config,
        state=root / "state",
        seed=seed,
        scale=scale,
        nights=nights,
        groups=groups,
        calibration_files=calibration_files,
        others=others,
        cosmic_rays=cosmic,
        pattern=pattern,
        sensor=sensor,
        colour_groups=colour_groups,
        problem_groups=problem_groups,
        moved_donut=_moved_donut(problem_groups[0].shape),
    )


def _fault(kind: str, sky: np.ndarray) -> np.ndarray:
    """The sky of a faulty flat: a light leak brightens the top-right corner (fading over
    0.4 of the diagonal); a cloud dims a soft patch over the lower left."""
    rows, cols = sky.shape
    y = (np.arange(rows, dtype=np.float32) + 0.5)[:, None] / rows
    x = (np.arange(cols, dtype=np.float32) + 0.5)[None, :] / cols
    if kind == "light leak":
        d = np.hypot((1.0 - x) * cols, y * rows) / (0.4 * math.hypot(cols, rows))
        return sky * (1.0 + LEAK_STRENGTH * np.clip(1.0 - d, 0.0, None) ** 2)
    if kind == "cloud":
        d = np.hypot((x - 0.3) * cols, (y - 0.65) * rows) / (0.22 * cols)
        return sky * (1.0 - CLOUD_DEPTH / (1.0 + np.exp((d - 1.0) / 0.15)))
    return sky


def _moved_donut(shape: tuple[int, int]) -> tuple[tuple[float, float], tuple[float, float]]:
    """(went (x, y), appeared (x, y)) in pixels of a 1x1 frame of `shape`."""
    old, new = DEFAULT_PATTERN.donuts[0], MOVED_DONUT
    return (old.x * shape[1], old.y * shape[0]), (new.x * shape[1], new.y * shape[0])


def _write_problem_night(w: _Writer, captures: Path, night: date,
                         cosmic: dict[str, tuple[tuple[int, int], ...]]) -> FlatGroup:
    """Night 3's twilight R series (`_PROBLEM_NIGHT`): three faulty flats, the moved donut."""
    filter_, binning, setpoint, exposure, level, count = _PROBLEM_NIGHT
    folder = captures / night.isoformat() / "FLAT"
    shape = w.shape(binning)
    illum = illumination(shape, binning, PROBLEM_PATTERN).astype(np.float32)
    t = datetime(night.year, night.month, night.day, 16, 41, 0) + timedelta(seconds=float(w.rng.uniform(0, 300)))
    drift = float(w.rng.uniform(0.03, 0.05))
    files, levels, temps, faults = [], [], [], []
    for i in range(count):
        fault = _FAULTS.get(i)
        frame_level = level * (1.0 + drift - 2 * drift * i / (count - 1) + float(w.rng.normal(0.0, 0.006)))
        if fault == "over-exposed":
            frame_level = OVER_EXPOSED_LEVEL
        temperature = w.temperature(setpoint)
        t = t.replace(microsecond=int(w.rng.integers(0, 1000)) * 1000)
        name = f"{_name_time(t)}_{filter_}_FLAT_{exposure:.2f}s_{i + 1:04d}.fits"
        rng = w.noise_rng()
        sky = _fault(fault or "", np.float32(frame_level) * illum)
        image = w.frame(shape, binning, temperature, exposure, sky, rng)
        hits = w.cosmic_rays(image, rng)
        if hits:
            cosmic[name] = hits
        w.write(folder / name, image, w.header("FLAT", exposure, t, binning, setpoint, temperature, filter_))
        files.append(folder / name)
        levels.append(frame_level)
        temps.append(temperature)
        if fault:
            faults.append((folder / name, fault))
        t += timedelta(seconds=exposure + float(w.rng.uniform(1.1, 1.9)))
    return FlatGroup(filter_, binning, setpoint, exposure, level, night, shape, tuple(files), tuple(levels),
                     tuple(temps), pattern=PROBLEM_PATTERN, faults=tuple(faults))


def _colour_header(imagetyp: str, exposure: float, start: datetime, temperature: float) -> list[tuple]:
    """An ASIAIR-style header: camera settings and the CFA layout, no FILTER, no set-point."""
    return [
        ("EXPOSURE", float(exposure), "[s] Exposure time"),
        ("EXPTIME", float(exposure), "[s] Exposure time"),
        ("DATE-OBS", _fits_time(start - UTC_OFFSET), "UTC date of observation start"),
        ("IMAGETYP", imagetyp, "Type of image"),
        ("XBINNING", 1, "X binning"),
        ("YBINNING", 1, "Y binning"),
        ("GAIN", COLOUR_GAIN, "Gain"),
        ("OFFSET", COLOUR_OFFSET, "Offset"),
        ("CCD-TEMP", float(temperature), "[C] Sensor temperature"),
        ("XPIXSZ", COLOUR_PIXEL_SIZE, "[um] Pixel width"),
        ("YPIXSZ", COLOUR_PIXEL_SIZE, "[um] Pixel height"),
        ("BAYERPAT", BAYER_PATTERN, "Bayer pattern"),
        ("XBAYROFF", 0, "Bayer pattern X offset"),
        ("YBAYROFF", 0, "Bayer pattern Y offset"),
        ("INSTRUME", COLOUR_INSTRUMENT, "Camera"),
        ("TELESCOP", COLOUR_TELESCOPE, "Telescope"),
        ("FOCALLEN", COLOUR_FOCAL_LENGTH, "[mm] Focal length"),
        ("SITELAT", 50.1109, "[deg] Site latitude"),
        ("SITELONG", 8.6821, "[deg] Site longitude"),
        ("SWCREATE", COLOUR_SOFTWARE, "Software"),
    ]


def _colour_time(t: datetime) -> str:
    return t.strftime("%Y%m%d-%H%M%S")


def _write_colour_rig(w: _Writer, captures: Path, night: date, scale: int,
                      cosmic: dict[str, tuple[tuple[int, int], ...]]) -> FlatGroup:
    """The colour rig's dusk flats, in the ASIAIR's Autorun/Flat folder."""
    exposure, level, count = COLOUR_FLATS
    shape = (COLOUR_SHAPE[0] * scale, COLOUR_SHAPE[1] * scale)
    response = cfa_response(shape)
    light = (illumination(shape, 1, w.pattern) * response / response.mean()).astype(np.float32)
    folder = captures / night.isoformat() / "Autorun" / "Flat"
    t = datetime(night.year, night.month, night.day, 16, 52, 0) + timedelta(seconds=float(w.rng.uniform(0, 120)))
    drift = float(w.rng.uniform(0.03, 0.05))
    files, levels, temps = [], [], []
    for i in range(count):
        frame_level = level * (1.0 + drift - 2 * drift * i / max(count - 1, 1) + float(w.rng.normal(0.0, 0.006)))
        temperature = w.temperature(COLOUR_TEMPERATURE)
        name = f"Flat_{exposure:.1f}s_Bin1_183MC_gain{COLOUR_GAIN}_{_colour_time(t)}_{temperature:.1f}C_{i + 1:04d}.fit"
        rng = w.noise_rng()
        image = w.frame(shape, 1, temperature, exposure, np.float32(frame_level) * light, rng)
        hits = w.cosmic_rays(image, rng)
        if hits:
            cosmic[name] = hits
        w.write(folder / name, image, _colour_header("Flat", exposure, t, temperature))
        files.append(folder / name)
        levels.append(frame_level)
        temps.append(temperature)
        t += timedelta(seconds=exposure + float(w.rng.uniform(1.1, 1.9)))
    return FlatGroup(None, 1, COLOUR_TEMPERATURE, exposure, level, night, shape, tuple(files), tuple(levels),
                     tuple(temps), bayer=BAYER_PATTERN, response=CFA_RESPONSE)


def _write_colour_library(w: _Writer, folder: Path, day: date, group: FlatGroup) -> list[CalibrationFile]:
    """A bias and a dark-flat (the flats' exposure) for the colour rig."""
    written = []
    t = datetime(day.year, day.month, day.day, 21, 15, 0)
    for kind, imagetyp, exposure in (("bias", "Bias", 0.0), ("dark-flat", "DarkFlat", group.exposure)):
        temperature = w.temperature(group.setpoint)
        path = folder / day.isoformat() / "ASIAIR" / f"{imagetyp}_{exposure:.1f}s_Bin1_183MC_{_colour_time(t)}_0001.fit"
        image = w.frame(group.shape, 1, temperature, exposure, None, w.noise_rng())
        w.write(path, image, _colour_header(imagetyp, exposure, t, temperature))
        written.append(CalibrationFile(kind, 1, group.setpoint, temperature, exposure, None, group.shape, path))
        t += timedelta(seconds=exposure + 5.0)
    return written


def _write_library(w: _Writer, folder: Path, day: date, groups: list[FlatGroup]) -> list[CalibrationFile]:
    """A bias and a 300 s dark for each binning and set-point, and a dark-flat for each
    flat sequence (same binning, set-point and exposure), taken with the cap on."""
    written: list[CalibrationFile] = []
    t = datetime(day.year, day.month, day.day, 10, 5, 0)
    wanted: list[tuple[str, int, float, float, Optional[str]]] = []
    for binning in (1, 2):
        for setpoint in (-10.0, 0.0):
            wanted.append(("bias", binning, setpoint, 0.0, None))
            wanted.append(("dark", binning, setpoint, _LIBRARY_DARK_EXPOSURE, None))
            for g in groups:
                if g.binning == binning and g.setpoint == setpoint:
                    wanted.append(("dark-flat", binning, setpoint, g.exposure, g.filter))
    imagetyp = {"bias": "BIAS", "dark": "DARK", "dark-flat": "DARKFLAT"}
    for kind, binning, setpoint, exposure, filter_ in wanted:
        shape = w.shape(binning)
        temperature = w.temperature(setpoint)
        t = t.replace(microsecond=int(w.rng.integers(0, 1000)) * 1000)
        label = imagetyp[kind]
        prefix = f"{filter_}_" if filter_ else ""
        name = f"{_name_time(t)}_{prefix}{label}_{setpoint:.0f}C_{binning}x{binning}_{exposure:.2f}s_0001.fits"
        path = folder / day.isoformat() / label / name
        image = w.frame(shape, binning, temperature, exposure, None, w.noise_rng())
        w.write(path, image, w.header(label, exposure, t, binning, setpoint, temperature, filter_))
        written.append(CalibrationFile(kind, binning, setpoint, temperature, exposure, filter_, shape, path))
        t += timedelta(seconds=exposure + float(w.rng.uniform(30, 90)))
    return written


def _rules_text(seed: int) -> str:
    return f"""\
# flatd rules for the demo tree written by `flatd demo` (seed {seed}).
# Relative paths are relative to this file's folder, so the tree can be moved.
# Try:  flatd run-once --config flatd.yaml --dry-run
capture:
  - path: captures              # N.I.N.A. writes captures/<night>/FLAT/...
    recursive: true
    poll: auto
output:
  directory: masters            # relative to the capture folder: captures/masters
inputs:
  ignore_type: false            # the LIGHT frame is left out by its IMAGETYP
  move_to: "originals-{{date}}"   # next to each input: captures/<night>/FLAT/originals-<date>
grouping:
  size: true
  filter: true
  temperature: 1.0              # night 1 is at -10 C, night 2 at 0 C
  min_group_size: {MIN_GROUP_SIZE}             # the 3 SII flats are too few
precalibration:
  mode: auto
  library: calibration          # bias, darks and dark-flats
  recursive: true
  bias_dark_only: true
  policy: original
combine:
  method: auto                  # chosen per group from its number of flats (README)
  normalize: multiplicative     # the twilight sky level drifts from flat to flat
engine:
  memory_limit: 256MiB
settle: 20s                     # short, for trying `flatd watch` on the demo
stable: 0s                      # the demo's files are complete when written, so
                                # `flatd run-once` can follow `flatd demo` at once;
                                # on a real capture folder keep the default 5s
rescan: 1m
state: state
"""
