"""Checks on each flat before it joins a group: level, saturation, odd frame out.

Pure numpy, no I/O: every check works on the level samples the engine reads anyway
(flatd.stack.levels: a grid of every `step`-th pixel of every `step`-th row, about
50,000 per frame, calibrated), so the pixels are never read a second time.

* **Full scale** (:func:`full_scale`): DATAMAX, else SATURATE, else 2**bits - 1 for
  8- and 16-bit integer data, else 65,535 (32- and 64-bit integer files from cameras
  hold 16-bit values, and the engine clips calibrated values to 65,535 anyway). A card
  that is not a finite number in (0, 2**32) is passed over.
* **Level**: the calibrated level (mono: the robust IKSS level of the sample; colour:
  the median of each CFA channel's samples) as a fraction of full scale must lie in
  [quality.min_level, quality.max_level]. On a colour sensor, max_level holds for every
  channel (any channel can clip) and min_level for the brightest one: the exposure is set
  on it (capture programs aim the frame's mean or median at a third to a half, which the
  brightest channel carries), while the weaker channels sit where the light's and the
  filters' colour puts them (blue at 0.6 x green under a panel, almost nothing in green
  and blue through a narrowband or dual-band filter). A floor on each channel would leave
  out a well-exposed flat whose green is at 0.22 because its blue is at 0.13, and every
  flat through an H-alpha filter.
* **Saturation**: the fraction of samples (of each CFA channel) at full scale. The
  samples are calibrated, so a raw value of full scale reads full scale minus what was
  subtracted (dark, bias, pedestal, overscan). A sample counts as saturated at or above
  ``full scale - offset - tolerance``: `offset` the median of what was subtracted from
  that frame (handed in by the engine), `tolerance` 0.1 % of full scale or 5 times the
  spread of what was subtracted, whichever is more (the per-pixel bias noise). Pixels
  that close to full scale are past the linear range anyway.
* **Odd frame out** (:func:`odd_frames`): each frame's sample is divided by its level
  (per CFA channel on a colour sensor, so that a colour drift through twilight cancels)
  and, sample by sample, by the median of the other frames (of at most REFERENCE_FRAMES
  spread over the series): what is left, ``r = x / reference - 1``, is noise where the
  frame is like the others, and a cloud, a light leak or a shifted vignetting where it
  is not (the illumination pattern, dust and the CFA cancel). ``r`` is binned in blocks
  of about BLOCK_PIXELS (32) pixels (the median of their samples: cosmic rays and hot
  pixels drop out), then pooled 2 x 2, 4 x 4, ... (compact clusters of blocks, where the
  noise is lower). At each scale every frame's blocks are compared with the median of
  the other frames' blocks (taken anew at each scale: an odd frame's pull on the others'
  references cancels), its overall offset removed; and, from 2 x 2 blocks on, once more
  less a robustly fitted plane (a twilight gradient that drifts through a sky-flat
  series is a plane; a cloud or a leak is not). A block's noise is the larger of the
  spread over frames (1.4826 x the median |deviation| over the frames and the 3 x 3
  neighbouring blocks: real drifts) and the noise the frame's own blocks predict
  (the scatter of their second differences, / the scale, / sqrt of the light where the
  vignetting dims it). A frame is odd when some block deviates by more than
  quality.odd_sigma noise units and by more than quality.odd_min_deviation.
* **Tilt** (:func:`tilt_jumps`), the odd frame out by its plane: a panel or camera that
  moved shifts the vignetting, which on the frame's ratio is mostly a tilt, and a tilt
  is what the scores less a plane take out for the twilight gradient's sake. But a
  twilight gradient turns and fades smoothly through a series (and a panel's is
  steady), so each frame's tilt (its blocks over the consensus' blocks, a robust plane)
  is predicted by a straight line in time (DATE-OBS, else the order) through the
  TREND_NEIGHBOURS frames nearest to it; a frame whose tilt misses it by more than
  quality.odd_min_tilt from one corner to the opposite one, and by more than
  quality.odd_sigma times the noise of the fitted planes, is odd. It needs at least
  TREND_MIN_FRAMES frames.

The worst frame of both, each against its own limit, is taken out and the others
scored again without it. It needs at least ODD_MIN_FRAMES frames. bench/qc.py
measures what the checks catch and cost.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

LEAVE_OUT, WARN = "leave-out", "warn"
# Full scale when no card says it (16-bit cameras; the engine clips at this value).
DEFAULT_FULL_SCALE = 65535.0
# Block side of the odd-frame-out check, in pixels (at least 2 x 2 samples).
BLOCK_PIXELS = 32
# Fewer frames than this: no consensus to compare with, the odd check is skipped.
ODD_MIN_FRAMES = 3
# The tilt trend: at least this many frames (with fewer, a line through the others cannot
# tell the odd one from its neighbours), each predicted from this many nearest in time.
TREND_MIN_FRAMES = 5
TREND_NEIGHBOURS = 4
# Blocks of at most this many samples take their median by a compare-exchange network.
NETWORK_MEDIAN = 9
# The tilt's plane is fitted on blocks pooled 2 x 2 until fewer than twice this many a side.
TILT_BLOCKS = 24
# The sample-by-sample reference is the median of at most this many frames (the cost).
REFERENCE_FRAMES = 9
# Samples whose consensus is below this fraction of the level (overscan, unlit edges) are
# left out of the odd check: their ratios are noise over nothing.
DARK_LEVEL = 0.1
CHANNELS = ("R", "G", "B")


@dataclass(frozen=True)
class Finding:
    """One check a flat failed: the figure, the limit, a one-line reason and the action."""

    path: Path
    check: str  # level | saturation | odd | tilt (the odd frame out by its tilt)
    figure: float
    limit: float
    reason: str
    action: str = LEAVE_OUT
    channel: Optional[str] = None

    @property
    def leaves_out(self) -> bool:
        return self.action == LEAVE_OUT

    def line(self) -> str:
        """'name: reason' with what is done about it."""
        done = "left out" if self.leaves_out else "combined anyway (warn)"
        return f"{self.path.name}: {self.reason}; {done}"


# --------------------------------------------------------------------------- full scale


def _card_number(value) -> Optional[float]:
    """A header value usable as full scale: a finite number in (0, 2**32), not a bool."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return number if math.isfinite(number) and 0 < number < 2.0**32 else None


def full_scale(frame) -> float:
    """The sensor's full scale in ADU: DATAMAX, SATURATE, the bit depth, else 65535."""
    headers = getattr(frame, "headers", None) or {}
    for key in ("DATAMAX", "SATURATE"):
        number = _card_number(headers.get(key))
        if number is not None:
            return number
    bitpix = getattr(frame, "bitpix", None)
    if bitpix == 8:
        return 255.0
    return DEFAULT_FULL_SCALE


# --------------------------------------------------------------------------- CFA positions


def sample_channels(layout, shape: tuple[int, int], step: int) -> Optional[np.ndarray]:
    """Per sample of the grid (flatd.stack.levels.grid_slices), its channel 0, 1, 2 (R, G,
    B) for a colour `layout` (flatd.stack.cfa.Layout of the presented frame); None for mono."""
    if layout is None:
        return None
    colours = layout.colours(0)
    rows = (step // 2 + step * np.arange(shape[0])) % 2
    cols = (step // 2 + step * np.arange(shape[1])) % 2
    table = np.array([CHANNELS.index(c) for c in colours], dtype=np.int8).reshape(2, 2)
    return table[rows[:, None], cols[None, :]]


def presented_layout(frame, origin: tuple[int, int] = (0, 0), height: Optional[int] = None):
    """The CFA layout of `frame` as the engine presents it (trimmed at `origin`); None for mono."""
    from dataclasses import replace

    from flatd.stack.cfa import layout_of

    layout = layout_of(frame)
    if layout is None or origin == (0, 0):
        return layout
    return replace(layout, offset=((layout.offset[0] + origin[0]) % 2, (layout.offset[1] + origin[1]) % 2),
                   height=height or layout.height)


def _parts(sample: np.ndarray, channels: Optional[np.ndarray]) -> list[tuple[Optional[str], np.ndarray]]:
    """(channel, its samples): one part (None) for mono, R, G, B for colour (a channel
    the grid does not sample, as with an even step, left out)."""
    if channels is None:
        return [(None, sample.ravel())]
    parts = [(name, sample[channels == k]) for k, name in enumerate(CHANNELS)]
    return [(name, values) for name, values in parts if values.size]


# --------------------------------------------------------------------------- level and saturation


def channel_levels(sample: np.ndarray, channels: Optional[np.ndarray], level: Optional[float] = None) -> dict:
    """{channel: level}: mono, {None: `level`} (the robust level, when given); colour, each
    channel's median (finite samples)."""
    if channels is None and level is not None:
        return {None: float(level)}
    out = {}
    for name, values in _parts(sample, channels):
        values = values[np.isfinite(values)]
        out[name] = float(np.median(values)) if values.size else math.nan
    return out


def check_level(path: Path, levels: dict, full: float, quality, calibration: Optional[str] = None) -> list[Finding]:
    """The level of each channel as a fraction of full scale, at most max_level, and the
    brightest channel's at least min_level (colour: see the module; a channel whose level
    is not finite, or not above 0, fails either way); a level too low names the
    `calibration` subtracted (a wrong dark or bias empties a flat)."""
    out = []
    why = f" (calibration: {calibration})" if calibration else ""
    finite = [v for v in levels.values() if math.isfinite(v)]
    brightest = max(finite) if len(finite) == len(levels) and finite else math.nan
    for channel, level in levels.items():
        fraction = level / full if math.isfinite(level) else math.nan
        what = f"level{' ' + channel if channel else ''} {fraction:.3g} of full scale ({full:.0f})"
        low = not fraction >= quality.min_level and (len(levels) == 1 or not level < brightest or not level > 0)
        if low:
            out.append(Finding(path, "level", fraction, quality.min_level,
                               f"{what}, below quality.min_level {quality.min_level:g}{why}", quality.level_action,
                               channel))
        elif fraction > quality.max_level:
            out.append(Finding(path, "level", fraction, quality.max_level,
                               f"{what}, above quality.max_level {quality.max_level:g}", quality.level_action, channel))
    return out


def saturation_threshold(full: float, offset: float = 0.0, spread: float = 0.0) -> float:
    """The calibrated value at and above which a sample counts as saturated (see the module)."""
    return full - offset - max(0.001 * full, 5.0 * spread)


def check_saturation(path: Path, sample: np.ndarray, channels: Optional[np.ndarray], threshold: float,
                     full: float, quality) -> list[Finding]:
    """The fraction of samples (per channel) at or above `threshold`, at most max_saturated."""
    out = []
    for channel, values in _parts(sample, channels):
        if not values.size:
            continue
        fraction = float(np.count_nonzero(values >= threshold)) / values.size
        if fraction > quality.max_saturated:
            where = f" of the {channel} pixels" if channel else ""
            out.append(Finding(path, "saturation", fraction, quality.max_saturated,
                               f"{fraction * 100:.3g} %{where} at full scale ({full:.0f}), above "
                               f"quality.max_saturated {quality.max_saturated * 100:g} %",
                               quality.saturation_action, channel))
    return out


# --------------------------------------------------------------------------- odd frame out


def block_side(step: int) -> int:
    """Samples per side of a block of about BLOCK_PIXELS pixels (at least 2)."""
    return max(2, int(round(BLOCK_PIXELS / max(1, step))))


def normalized(sample: np.ndarray, channels: Optional[np.ndarray], levels: dict) -> np.ndarray:
    """The sample divided by its level (each channel by its own on a colour sensor), float32."""
    out = np.array(sample, dtype=np.float32, copy=True)
    if channels is None:
        out /= np.float32(levels[None])
        return out
    for k, name in enumerate(CHANNELS):
        level = levels.get(name, math.nan)
        out[channels == k] /= np.float32(level) if level and math.isfinite(level) else np.float32(math.nan)
    return out


# Compare-exchange pairs that leave the median of 9 values at index 4 (Paeth's network, 19 steps).
_MEDIAN9 = ((1, 2), (4, 5), (7, 8), (0, 1), (3, 4), (6, 7), (1, 2), (4, 5), (7, 8), (0, 3), (5, 8), (4, 7),
            (3, 6), (1, 4), (2, 5), (4, 7), (4, 2), (6, 4), (4, 2))


def _sorted_by_network(values: list) -> list:
    """The element-wise sorted values of same-shape arrays, by odd-even transposition
    (n rounds of compare-exchange with np.minimum / np.maximum, no sort): for a few values
    per place, a partition's per-row overhead is the whole cost."""
    v = list(values)
    n = len(v)
    for i in range(n):
        for j in range(i % 2, n - 1, 2):
            v[j], v[j + 1] = np.minimum(v[j], v[j + 1]), np.maximum(v[j], v[j + 1])
    return v


def _median_by_network(values: list) -> np.ndarray:
    """The element-wise median of 3 to 9 same-shape arrays (even counts: the mean of the
    middle two), by compare-exchange steps."""
    v = list(values)
    if len(v) == 9:
        for a, b in _MEDIAN9:
            v[a], v[b] = np.minimum(v[a], v[b]), np.maximum(v[a], v[b])
        return v[4]
    v = _sorted_by_network(v)
    n = len(v)
    return v[n // 2] if n % 2 else 0.5 * (v[n // 2 - 1] + v[n // 2])


def _blocks(x: np.ndarray, b: int) -> np.ndarray:
    """(N, by, bx): the median of each b x b block of samples of x (N, rows, cols), NaN
    left out (a block of NaN only is NaN)."""
    n, rows, cols = x.shape
    by, bx = rows // b, cols // b
    if b * b <= NETWORK_MEDIAN and not np.isnan(x).any():
        return _median_by_network([x[:, i: by * b: b, j: bx * b: b] for i in range(b) for j in range(b)])
    cut = x[:, :by * b, :bx * b].reshape(n, by, b, bx, b).transpose(0, 1, 3, 2, 4).reshape(n, by, bx, b * b)
    if np.isnan(cut).any():
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nanmedian(cut, axis=-1)
    k = b * b // 2
    if b * b % 2:
        cut.partition(k, axis=-1)
        return cut[..., k].copy()
    cut.partition((k - 1, k), axis=-1)
    return 0.5 * (cut[..., k - 1] + cut[..., k])


def _pool(x: np.ndarray) -> np.ndarray:
    """2 x 2 means of (N, by, bx) (an odd last row or column dropped)."""
    n, by, bx = x.shape
    x = x[:, : by // 2 * 2, : bx // 2 * 2]
    return 0.25 * (x[:, 0::2, 0::2] + x[:, 1::2, 0::2] + x[:, 0::2, 1::2] + x[:, 1::2, 1::2])


def _local_median(a: np.ndarray) -> np.ndarray:
    """(by, bx): the median over the 3 x 3 neighbouring blocks (edges repeated) of the
    median of `a` (N, by, bx) over the frames: a spread that a chance of five close values
    does not shrink, and that one odd frame does not inflate."""
    n, by, bx = a.shape
    per_block = np.median(np.ascontiguousarray(a.reshape(n, -1).T), axis=1).reshape(by, bx)
    padded = np.pad(per_block, 1, mode="edge")
    near = [padded[dy:dy + by, dx:dx + bx] for dy in range(3) for dx in range(3)]
    if np.isnan(per_block).any():
        return np.median(np.stack(near, axis=-1), axis=-1)
    return _median_by_network(near)


def _middle(x: np.ndarray) -> np.ndarray:
    """(P, 2 or 3): per place of x (N >= 3, ...), its sorted values N//2 - 1 to N//2 (N
    even) or N//2 + 1 (N odd) over the frames (NaN sorts last), by a partial sort."""
    n = x.shape[0]
    kth = list(range(n // 2 - 1, n // 2 + 1 + n % 2))
    if n <= NETWORK_MEDIAN and not np.isnan(x).any():
        ordered = _sorted_by_network([x[i].ravel() for i in range(n)])
        return np.stack([ordered[k] for k in kth], axis=1)
    t = np.ascontiguousarray(x.reshape(n, -1).T)
    t.partition(kth, axis=1)
    return t[:, kth[0]:kth[-1] + 1]


def _reference_frames(n: int) -> list[int]:
    """At most REFERENCE_FRAMES frames of n, spread over the series: the references' own."""
    return sorted(set(np.linspace(0, n - 1, min(n, REFERENCE_FRAMES)).round().astype(int).tolist()))


def _consensus(x: np.ndarray) -> tuple[list[int], np.ndarray, np.ndarray]:
    """(reference frames, their middle values per place (_middle), their median per place
    (x.shape[1:])) of x (N, ...)."""
    ref = _reference_frames(x.shape[0])
    middle = _middle(x[ref])
    common = middle[:, 1] if len(ref) % 2 else 0.5 * (middle[:, 0] + middle[:, 1])
    return ref, middle, common.reshape(x.shape[1:])


def _others(x: np.ndarray) -> np.ndarray:
    """(N, ...): per place, the median of the other reference frames' values (all the
    reference frames' for a frame that is not one of them)."""
    from flatd.stack.levels import _median_of_others

    n = x.shape[0]
    ref, middle, common = _consensus(x)
    out = np.empty_like(x)
    for i in range(n):
        out[i] = _median_of_others(x[i].ravel(), middle).reshape(x.shape[1:]) if i in ref else common
    return out


def _block_means(x: np.ndarray, b: int) -> np.ndarray:
    """(..., by, bx): the means of the b x b blocks of samples of x (..., rows, cols), as
    float64 (sums of rows, then of columns: a pass over the samples, no sort)."""
    *lead, rows, cols = x.shape
    by, bx = rows // b, cols // b
    band = x[..., 0: by * b: b, : bx * b].astype(np.float64)
    for i in range(1, b):
        band += x[..., i: by * b: b, : bx * b]
    out = band[..., 0::b].copy()
    for j in range(1, b):
        out += band[..., j::b]
    return out / (b * b)


def _ratio_blocks(norm: np.ndarray, b: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x, consensus, own): per frame, the median over each b x b block of its samples
    over the median of the other frames' at the same place, minus 1 (N, by, bx; 0 where
    not finite); that median (rows, cols); and each frame's own block means (N, by, bx;
    for its tilt against one reference for all: a robust plane fit drops the blocks that
    a cosmic ray or a hot pixel lifts, and a mean is the quieter estimate, with no sort).
    The reference frames are at most REFERENCE_FRAMES, spread over the series; each is
    left out of its own reference (the median frame would read exactly 0 otherwise). The
    ratio cancels vignetting, dust and the CFA. All frames at once (the ratios are one
    more copy of the samples: QC_SAMPLE_COPIES in the engine's memory plan)."""
    from flatd.stack.levels import _median_of_others

    ref, middle, consensus = _consensus(norm)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.divide(norm, consensus[None])
        for i in ref:
            np.divide(norm[i], _median_of_others(norm[i].ravel(), middle).reshape(consensus.shape), out=r[i])
    r -= np.float32(1.0)
    if not np.isfinite(r.sum(dtype=np.float64)):  # one reduction tells the usual case: all finite
        r[~np.isfinite(r)] = 0.0
    unlit = ~(consensus >= DARK_LEVEL)
    if unlit.any():
        r[:, unlit] = 0.0  # overscan strips, unlit edges: no pattern to compare
    return _blocks(r, b), consensus, _block_means(norm, b).astype(np.float32)


def _to_others(x: np.ndarray) -> np.ndarray:
    """(N, by, bx): each frame's blocks less the median of the other frames' at the same
    place, less its median over the blocks. Taken at each scale, so that the pull of an
    odd frame on the others' sample references (it is one of their others) cancels."""
    n = x.shape[0]
    r = x - _others(x)
    r[~np.isfinite(r)] = 0.0
    r -= np.median(r.reshape(n, -1), axis=1)[:, None, None]
    return r


def _noise(r: np.ndarray) -> np.ndarray:
    """Per frame, the block-to-block noise of its ratio map r (N, by, bx): 1.4826 MAD of
    second differences along the rows / sqrt 6 (a ramp, as from a shifted vignetting or a
    gradient, does not inflate it; first differences would read its slope as noise)."""
    d = np.abs(np.diff(r, n=2, axis=2)).reshape(r.shape[0], -1)
    sigma = 1.4826 * np.median(d, axis=1) / math.sqrt(6.0) if d.shape[1] else np.zeros(r.shape[0])
    return np.where(np.isfinite(sigma), sigma, 0.0)


def _design(by: int, bx: int) -> np.ndarray:
    """(by * bx, 3): 1, x, y over a block grid, x and y in field widths/heights from its centre."""
    yy, xx = np.mgrid[0:by, 0:bx]
    return np.stack([np.ones(by * bx), (xx.ravel() - (bx - 1) / 2) / bx, (yy.ravel() - (by - 1) / 2) / by], axis=1)


def _planes(x: np.ndarray, mask: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(coef (N, 3), residual (N, by, bx), noise of the tilt coefficients (N,)): each
    frame's plane a + b x + c y fitted robustly to x (N, by, bx) over `mask` (by, bx;
    default all); fit, clip what stands out (a fault, a dust block), fit again, all frames
    at once."""
    n, by, bx = x.shape
    design = _design(by, bx)
    values = x.reshape(n, -1).astype(np.float64)
    keep = np.ones(by * bx) if mask is None else mask.reshape(-1).astype(np.float64)
    weights = np.broadcast_to(keep, values.shape)
    outer = (design[:, :, None] * design[:, None, :]).reshape(-1, 9)
    for _ in range(2):
        normal = (weights @ outer).reshape(n, 3, 3) + 1e-12 * np.eye(3)
        coef = np.linalg.solve(normal, ((weights * values) @ design)[..., None])[..., 0]
        resid = values - coef @ design.T
        mad = np.median(np.abs(resid[:, keep > 0]), axis=1) if keep.any() else np.zeros(n)
        weights = keep * np.where((np.abs(resid) <= 3 * 1.4826 * mad[:, None]) | (mad[:, None] <= 0), 1.0, 0.0)
    inverse = np.linalg.inv(normal)
    se = 1.4826 * mad * np.sqrt(np.maximum(inverse[:, 1, 1], inverse[:, 2, 2]))
    return coef, resid.reshape(n, by, bx).astype(x.dtype), se


def _without_planes(x: np.ndarray) -> np.ndarray:
    """(N, by, bx) less each frame's robustly fitted plane a + b x + c y (a twilight
    gradient that drifts through the series; a cloud or a leak stays in the residual)."""
    return _planes(x)[1]


@dataclass(frozen=True)
class OddScore:
    """A frame's worst block: deviation from the group (fraction), in noise units, where."""

    z: float
    deviation: float
    x: int  # pixels, the block's corner in the presented frame
    y: int
    size: int  # the block's side in pixels


def _score(r: np.ndarray, expected: np.ndarray, min_deviation: float) -> np.ndarray:
    """|r| over its noise (the spread over frames and neighbours, at least `expected`);
    0 where |r| <= min_deviation."""
    spread = 1.4826 * _local_median(np.abs(r))
    z = np.abs(r) / np.maximum(np.maximum(spread[None], expected), 1e-12)
    z[np.abs(r) <= min_deviation] = 0.0
    return z


def odd_scores(norm: np.ndarray, step: int, min_deviation: float,
               times: Optional[Sequence[float]] = None) -> tuple[list[OddScore], list[TiltJump]]:
    """Per frame of `norm` (N >= 3, rows, cols: samples divided by their levels), its worst
    block over the scales b, 2b, 4b... samples, as it is and less a fitted plane, among the
    blocks deviating by more than `min_deviation` (z 0 if none); and its tilt against the
    trend of its neighbours in `times` (default: the order given)."""
    n = norm.shape[0]
    b = block_side(step)
    x, consensus, own = _ratio_blocks(norm, b)
    base = _to_others(x)
    sigma = _noise(base)  # the base blocks' noise, per frame
    light = _blocks(consensus[None], b)[0]
    reference = _block_means(np.where(np.isfinite(consensus), consensus, 0.0), b)
    lit = reference >= DARK_LEVEL
    with np.errstate(divide="ignore", invalid="ignore"):
        tilts = tilt_jumps(np.where(lit & np.isfinite(own), own / reference - 1, 0.0),
                           range(n) if times is None else times, lit & np.isfinite(own).all(axis=0))
    light = np.clip(light / np.nanmedian(light), 0.05, None)  # photon noise grows where the light falls
    light[~np.isfinite(light)] = 1.0
    best = [OddScore(0.0, 0.0, 0, 0, 0)] * n
    size = 1
    while min(x.shape[1:]) >= 1:
        expected = sigma[:, None, None] / size / np.sqrt(light)[None]
        r = base if size == 1 else _to_others(x)
        # less a plane at the pooled scales (at the finest, noise hides a twilight gradient)
        views = [r, _without_planes(r)] if size > 1 and min(r.shape[1:]) >= 3 else [r]
        for view in views:
            z = _score(view, expected, min_deviation).reshape(n, -1)
            worst = np.argmax(z, axis=1)
            for i in np.flatnonzero(z[np.arange(n), worst] > np.array([s.z for s in best])):
                k = int(worst[i])
                by, bx = divmod(k, view.shape[2])
                side = b * size * step
                best[i] = OddScore(float(z[i, k]), float(view[i].flat[k]), step // 2 + bx * side,
                                   step // 2 + by * side, side)
        if min(x.shape[1:]) < 4:
            break
        x, light = _pool(x), _pool(light[None])[0]
        size *= 2
    return best, tilts


@dataclass(frozen=True)
class TiltJump:
    """A frame's tilt against what its neighbours in time predict: the difference from
    one corner of the field to the opposite one (fraction), and in noise units."""

    jump: float
    z: float
    tilt: float  # the frame's own tilt, corner to corner, against the consensus
    expected: float  # what the neighbours' trend predicts for it


def _trend_weights(times: np.ndarray, i: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices, weights): the TREND_NEIGHBOURS frames nearest to frame i in time (not i)
    and the weights of their straight-line fit's value at times[i]."""
    others = np.array([k for k in np.argsort(np.abs(times - times[i]), kind="stable") if k != i][:TREND_NEIGHBOURS])
    t = times[others] - times[i]
    spread = t - t.mean()
    sxx = float(spread @ spread)
    if sxx <= 0:
        return others, np.full(len(others), 1.0 / len(others))
    return others, 1.0 / len(others) - t.mean() * spread / sxx


def tilt_jumps(x: np.ndarray, times: Sequence[float], mask: Optional[np.ndarray] = None) -> list[TiltJump]:
    """Per frame of the ratio blocks x (N >= TREND_MIN_FRAMES, by, bx; each frame against
    the same reference; `mask`: the blocks to fit, by, bx), its tilt against
    the straight-line trend in time of its nearest neighbours' tilts. A twilight gradient
    turns and fades smoothly through a sky series (and a panel's is steady), so the
    neighbours predict it; a panel or camera that moved tilts one frame alone. The tilt
    that such a shift gives is a plane, which the block scores take out for the gradient's
    sake: this is where it is seen."""
    n = x.shape[0]
    if n < TREND_MIN_FRAMES or min(x.shape[1:]) < 3:
        return [TiltJump(0.0, 0.0, 0.0, 0.0)] * n
    while min(x.shape[1:]) >= 2 * TILT_BLOCKS:  # a plane needs few blocks: pooled (means of means), the cost
        x = _pool(x)
        mask = None if mask is None else _pool(mask[None].astype(np.float32))[0] >= 1.0
    coef, _, se = _planes(x, mask)
    tilts = coef[:, 1:3]
    times = np.asarray(times, dtype=np.float64)
    out = []
    for i in range(n):
        others, w = _trend_weights(times, i)
        expected = w @ tilts[others]
        d = tilts[i] - expected
        jump = float(np.abs(d).sum())  # from one corner to the opposite one
        noise = math.sqrt(se[i] ** 2 + float((w ** 2) @ (se[others] ** 2))) * 2.0
        z = jump / noise if noise > 0 else (math.inf if jump > 0 else 0.0)
        out.append(TiltJump(jump, z, float(np.abs(tilts[i]).sum()), float(np.abs(expected).sum())))
    return out


def _odd_finding(path: Path, score: OddScore, quality) -> Finding:
    return Finding(path, "odd", score.z, quality.odd_sigma,
                   f"odd frame out: {score.size}x{score.size} px at x={score.x}, y={score.y} is "
                   f"{score.deviation * 100:+.2g} % off the group's pattern, {score.z:.1f} times its "
                   f"noise (quality.odd_sigma {quality.odd_sigma:g})", quality.odd_action)


def _tilt_finding(path: Path, tilt: TiltJump, quality) -> Finding:
    return Finding(path, "tilt", tilt.jump, quality.odd_min_tilt,
                   f"odd frame out: tilted {tilt.jump * 100:.2g} % across the field against the trend of the "
                   f"frames taken around it ({tilt.z:.0f} times its noise; a panel or camera that moved; "
                   f"quality.odd_min_tilt {quality.odd_min_tilt * 100:g} %)", quality.odd_action)


def _tilt_trips(tilt: TiltJump, quality) -> bool:
    return tilt.jump > quality.odd_min_tilt and tilt.z > quality.odd_sigma


def odd_frames(paths: Sequence[Path], norm: np.ndarray, step: int, quality,
               times: Optional[Sequence[float]] = None) -> list[Finding]:
    """The frames whose large-scale pattern differs from the group's (see the module),
    by their blocks or by their tilt against the trend of the frames around them in
    `times` (default: the order given): the worst one, each against its own limit, is
    taken out and the rest scored again without it (an odd frame pulls the others'
    reference its way), until none is left or fewer than ODD_MIN_FRAMES remain."""
    b = block_side(step)
    if min(norm.shape[1] // b, norm.shape[2] // b) < 2:
        return []  # a frame too small for 2 x 2 blocks: nothing large-scale to compare
    times = list(range(len(paths))) if times is None else list(times)
    out = []
    left = list(range(len(paths)))
    while len(left) >= ODD_MIN_FRAMES:
        scores, tilts = odd_scores(norm[left] if len(left) < len(paths) else norm, step, quality.odd_min_deviation,
                                   [times[k] for k in left])
        badness = [max(scores[k].z / quality.odd_sigma,
                       tilts[k].jump / quality.odd_min_tilt if _tilt_trips(tilts[k], quality) else 0.0)
                   for k in range(len(left))]
        j = max(range(len(left)), key=badness.__getitem__)
        if scores[j].z > quality.odd_sigma and scores[j].z / quality.odd_sigma >= badness[j]:
            out.append(_odd_finding(paths[left[j]], scores[j], quality))
        elif _tilt_trips(tilts[j], quality):
            out.append(_tilt_finding(paths[left[j]], tilts[j], quality))
        else:
            break
        del left[j]
    return out


# --------------------------------------------------------------------------- all checks


@dataclass
class FlatSample:
    """What the engine hands over for one flat: its calibrated sample grid (rows, cols),
    its robust level (None: measured here), and what was subtracted (median, spread)."""

    frame: object
    sample: np.ndarray
    level: Optional[float] = None
    offset: float = 0.0
    spread: float = 0.0
    calibration: Optional[str] = None  # what was subtracted (named when the level is too low)


def check_flats(flats: Sequence[FlatSample], step: int, quality, origin: tuple[int, int] = (0, 0),
                height: Optional[int] = None) -> list[Finding]:
    """Every check on every flat of a group (quality: flatd.config.Quality; disabled: none).
    `origin`/`height`: where the presented frames start in the stored ones (the CFA phase)."""
    if quality is None or not quality.enabled or not flats:
        return []
    findings: list[Finding] = []
    kept: list[Path] = []
    norms = np.empty((len(flats), *np.shape(flats[0].sample)), dtype=np.float32)
    for item in flats:
        frame, sample = item.frame, np.asarray(item.sample, dtype=np.float32)
        channels = sample_channels(presented_layout(frame, origin, height), sample.shape, step)
        full = full_scale(frame)
        levels = channel_levels(sample, channels, item.level)
        found = check_level(frame.path, levels, full, quality, item.calibration)
        found += check_saturation(frame.path, sample, channels,
                                  saturation_threshold(full, item.offset, item.spread), full, quality)
        findings += found
        if not any(f.leaves_out for f in found) and all(math.isfinite(v) and v > 0 for v in levels.values()):
            norms[len(kept)] = normalized(sample, channels, levels)
            kept.append(frame.path)
    if len(kept) >= ODD_MIN_FRAMES:
        dates = {item.frame.path: item.frame for item in flats}
        findings += odd_frames(kept, norms[:len(kept)], step, quality,
                               series_times([dates[path] for path in kept]))
    return findings


def series_times(frames: Sequence) -> list[float]:
    """The frames' times in seconds (DATE-OBS), for the tilt trend; their order when a
    frame has no date, or two share one (a date without a time of day: Lowell's LOIS)."""
    dates = [getattr(f, "date", None) for f in frames]
    if any(d is None for d in dates) or len(set(dates)) < len(dates):
        return [float(i) for i in range(len(frames))]
    return [(d - dates[0]).total_seconds() for d in dates]


def left_out_paths(findings: Sequence[Finding]) -> set:
    """The paths of the flats that a leave-out finding keeps out of the master."""
    return {f.path for f in findings if f.leaves_out}
