"""PNG pictures beside each master: the master auto-stretched, and its ratio to the previous one.

A master flat is smooth vignetting (20-40 % from centre to corner) with dust donuts of
0.5-2 % on top; a plain linear stretch shows the first and hides the second. The preview
is therefore two layers added together: the large-scale shape, stretched between robust
percentiles, and the local detail (the image over its own smoothed self), amplified at a
fixed gain so that a 1 % donut is some 40 grey levels deep whatever the vignetting.

Colour (CFA) masters are debayered by 2x2 superpixel (R, mean of the Gs, B), each
channel divided by its own level, so a neutral flat looks grey and colour dust shows.

Pure numpy and Pillow; the only I/O is :func:`write_png`, atomic like a master: a hidden
temp name in the same folder (".flatd-*.tmp", which the candidate filter ignores and
`cleanup_temp_files` removes), fsync, rename.
"""

from __future__ import annotations

import errno
import logging
import math
import os
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
from PIL import Image

from flatd.errors import FlatdError
from flatd.qc.blocks import block_sums

MAX_SIDE = 1024  # the long side of a preview, at most (half the pixels of 1,200 px, and of the time)
COARSE = 256  # the large-scale shape is found on a grid of at most this many px (long side)
DETAIL_SPAN = 0.02  # local detail of +-2 % fills +-DETAIL_GAIN of the grey range
DETAIL_GAIN = 0.45
DETAIL_NOISE = 6.0  # ... or +-6 noise sigmas, whichever is larger (noisy masters stay calm)
SHAPE_WEIGHT = 0.55  # the large-scale shape's share of the grey range
RATIO_SPAN = 0.01  # the ratio preview: 1 +- 1 % (or +-6 sigma) spans the colours
PREVIEW_SUFFIX = ".preview.png"
RATIO_SUFFIX = ".ratio.png"
MASTER_SUFFIXES = (".fits.fz", ".fit.fz", ".fits", ".fit", ".fts", ".fz", ".xisf")


class PreviewError(FlatdError, ValueError):
    """An image a preview cannot be made of (no finite pixel, not 2-D)."""


# --------------------------------------------------------------------- names


def preview_paths(master_path: Path) -> tuple[Path, Path]:
    """(preview, ratio) beside a master: FLAT-x.fits -> FLAT-x.preview.png, FLAT-x.ratio.png."""
    master_path = Path(master_path)
    name = master_path.name
    stem = next((name[: -len(s)] for s in MASTER_SUFFIXES if name.lower().endswith(s)), name)
    return master_path.with_name(stem + PREVIEW_SUFFIX), master_path.with_name(stem + RATIO_SUFFIX)


def master_layout(frames: Sequence, shape: Sequence[int], origin: tuple[int, int] = (0, 0)):
    """The CFA Layout of a master of `frames` (None: mono, or layouts that differ), its
    phase moved by the trim `origin` as :func:`flatd.stack.cfa.equalize_master` does."""
    from dataclasses import replace

    from flatd.stack.cfa import common_layout

    layout = common_layout(frames)
    if layout is None or tuple(origin) == (0, 0):
        return layout
    return replace(layout, offset=((layout.offset[0] + origin[0]) % 2, (layout.offset[1] + origin[1]) % 2),
                   height=int(shape[0]))


# --------------------------------------------------------------------- array helpers


def _as_image(image: np.ndarray) -> np.ndarray:
    """A 2-D float32 array (the caller's array is never changed; no copy when it is
    float32 already); PreviewError otherwise. Infinities are left to bin_mean."""
    array = np.asarray(image)
    if array.ndim != 2 or array.size == 0:
        raise PreviewError(f"a preview needs a non-empty 2-D image, got shape {array.shape}")
    if array.dtype.kind not in "fiub":
        raise PreviewError(f"a preview needs numbers, got {array.dtype}")
    with np.errstate(over="ignore", invalid="ignore"):
        return np.ascontiguousarray(array, dtype=np.float32)


def _nan_for_infinite(array: np.ndarray) -> np.ndarray:
    """The array with its infinities as NaN (itself when every value is finite)."""
    if _all_finite(array):
        return array
    return np.where(np.isfinite(array), array, np.float32(np.nan))


def _all_finite(array: np.ndarray) -> bool:
    """Every value finite: two reductions (a NaN or an infinity shows in the min or the
    max), no full-size temporary."""
    return array.size == 0 or (math.isfinite(float(np.min(array))) and math.isfinite(float(np.max(array))))


def bin_factor(shape: Sequence[int], max_side: int = MAX_SIDE) -> int:
    """The smallest integer factor that brings the long side to at most `max_side`."""
    return max(1, math.ceil(max(shape) / max_side))


def _block_counts(n: int, factor: int) -> np.ndarray:
    counts = np.full(-(-n // factor), factor, dtype=np.float32)
    counts[-1] = n - (counts.size - 1) * factor
    return counts


def bin_mean(image: np.ndarray, factor: int) -> np.ndarray:
    """Area average over factor x factor blocks (not a decimation), NaNs left out (NaN where
    a block has none; infinities count as NaN); the edge blocks are partial blocks, so no
    row or column is lost."""
    if factor == 1:
        return _nan_for_infinite(image)
    blocks = block_sums(image, factor)  # the pass also tells whether every pixel is finite
    if blocks.finite:
        return blocks.total() / np.outer(_block_counts(image.shape[0], factor), _block_counts(image.shape[1], factor))
    finite = np.isfinite(image)
    sums = block_sums(np.where(finite, image, np.float32(0)), factor).total()
    counts = block_sums(finite.astype(np.float32), factor).total()
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, np.float32(1)), np.float32(np.nan))


def _box_1d(values: np.ndarray, weights: np.ndarray, radius: int, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Running sums of values and weights over 2 radius + 1 along `axis` (clipped at the edges)."""
    def run(a: np.ndarray) -> np.ndarray:
        a = np.moveaxis(a, axis, 0)
        c = np.concatenate([np.zeros((1,) + a.shape[1:]), np.cumsum(a, axis=0, dtype=np.float64)])
        n = a.shape[0]
        hi = np.minimum(np.arange(n) + radius + 1, n)
        lo = np.maximum(np.arange(n) - radius, 0)
        return np.moveaxis(c[hi] - c[lo], 0, axis)

    return run(values), run(weights)


def smooth(image: np.ndarray, radius: int, passes: int = 3) -> np.ndarray:
    """A near-Gaussian blur (`passes` box blurs of 2 radius + 1) that ignores NaNs and
    keeps its level at the edges (each pixel is the mean of what its box holds)."""
    finite = np.isfinite(image)
    values = np.where(finite, image, 0).astype(np.float64)
    weights = finite.astype(np.float64)
    for _ in range(passes):
        for axis in (0, 1):
            values, weights = _box_1d(values, weights, radius, axis)
        with np.errstate(invalid="ignore", divide="ignore"):
            values = np.where(weights > 0, values / np.maximum(weights, 1e-300), 0)
        weights = (weights > 0).astype(np.float64)
    return np.where(weights > 0, values, np.nan).astype(np.float32)


SAMPLE = 100_000  # robust figures from at most this many values


def _finite_sample(values: np.ndarray) -> np.ndarray:
    flat = values.ravel()
    flat = flat[:: max(1, flat.size // SAMPLE)]
    return flat[np.isfinite(flat)]


def robust_level(values: np.ndarray) -> float:
    """The median of the finite values, from a regular sample (NaN when there is none)."""
    finite = _finite_sample(values)
    return float(np.median(finite)) if finite.size else math.nan


def _robust_sigma(values: np.ndarray) -> float:
    finite = _finite_sample(values)
    if finite.size < 2:
        return 0.0
    return 1.4826 * float(np.median(np.abs(finite - np.median(finite))))


def _percentiles(values: np.ndarray, low: float, high: float) -> tuple[float, float]:
    finite = _finite_sample(values)
    if not finite.size:
        return 0.0, 1.0
    lo, hi = (float(v) for v in np.percentile(finite, [low, high]))
    return lo, hi


def _to_grey(values: np.ndarray) -> np.ndarray:
    """0..1 (NaN: black) to uint8."""
    return (np.nan_to_num(np.clip(values, 0.0, 1.0), nan=0.0) * 255.0 + 0.5).astype(np.uint8)


# --------------------------------------------------------------------- the stretch


def _relative(binned: np.ndarray) -> np.ndarray:
    """The binned image divided by its level (a flat is then ~1); PreviewError when it has
    no finite pixel. A level that is zero or negative leaves the image as it is, offset to 1."""
    level = robust_level(binned)
    if not math.isfinite(level):
        raise PreviewError("the image has no finite pixel")
    if level > 0:
        return binned / np.float32(level)
    return binned - np.float32(level) + np.float32(1.0)


def _polynomial_surface(image: np.ndarray, degree: int = 4, cells: int = 48) -> np.ndarray:
    """A smooth 2-D polynomial fitted to the cell medians of `image` (about `cells` cells on
    the long side): the vignetting, with no edge bias. Zeros when too few cells are finite."""
    h, w = image.shape
    step = max(1, max(h, w) // cells)
    hb, wb = -(-h // step), -(-w // step)
    padded = np.full((hb * step, wb * step), np.nan, dtype=np.float32)
    padded[:h, :w] = image
    cells_ = padded.reshape(hb, step, wb, step).transpose(0, 2, 1, 3).reshape(hb, wb, -1)
    with np.errstate(invalid="ignore"), _quiet():
        medians = np.median(cells_, axis=2) if not np.isnan(padded[:h, :w]).any() else np.nanmedian(cells_, axis=2)
    yc, xc = np.mgrid[0:hb, 0:wb]
    u, v = (xc.ravel() + 0.5) * step / w * 2 - 1, (yc.ravel() + 0.5) * step / h * 2 - 1
    terms = [(i, j) for i in range(degree + 1) for j in range(degree + 1 - i)]
    ok = np.isfinite(medians.ravel())
    if ok.sum() < 2 * len(terms):
        return np.zeros_like(image)
    design = np.stack([u[ok] ** i * v[ok] ** j for i, j in terms], axis=1)
    try:  # normal equations: 15 x 15, far quicker than lstsq's SVD on a busy machine
        coef = np.linalg.solve(design.T @ design, design.T @ medians.ravel()[ok].astype(np.float64))
    except np.linalg.LinAlgError:
        return np.zeros_like(image)
    x = (np.arange(w) + 0.5) / w * 2 - 1
    y = (np.arange(h) + 0.5) / h * 2 - 1
    powers = np.arange(degree + 1)
    table = np.zeros((degree + 1, degree + 1))  # table[j, i] = coefficient of x^i y^j
    for (i, j), c in zip(terms, coef):
        table[j, i] = c
    rows = (x[None, :] ** powers[:, None])  # (degree + 1, w)
    cols = (y[:, None] ** powers[None, :])  # (h, degree + 1)
    return (cols @ (table @ rows)).astype(np.float32)


class _quiet:
    """Silence numpy's warnings about all-NaN slices."""

    def __enter__(self):
        import warnings

        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc):
        self._catch.__exit__(*exc)


def _shape_and_detail(relative: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The large-scale shape, the detail (image / shape - 1) and the coarse shape of a relative image. The
    shape, found on a grid of at most COARSE px and resampled bilinearly, is a polynomial
    surface plus the residual smoothed over about a tenth of the short side, the pixels
    that stand out (dust) left out of a second smoothing: no halo at the edges or around
    the donuts."""
    step = max(1, math.ceil(max(relative.shape) / COARSE))
    small = bin_mean(relative, step)
    surface = _polynomial_surface(small)
    residual = small - surface
    radius = max(1, min(small.shape) // 30)  # 3 passes: an effective width of ~ short side / 10
    shape = surface + np.nan_to_num(smooth(residual, radius))
    with np.errstate(invalid="ignore", divide="ignore"):
        outliers = np.abs(small / shape - 1.0) > max(3 * _robust_sigma(small / shape - 1.0), 0.002)
    if outliers.any():  # grown by 2 cells: the soft edges of a donut pull too
        outliers = smooth(outliers.astype(np.float32), 2, passes=1) > 0
        shape = surface + np.nan_to_num(smooth(np.where(outliers, np.nan, residual), radius))
    coarse, shape = shape, _upsample(shape, relative.shape, step)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        detail = np.divide(relative, shape, dtype=np.float32)
    detail -= np.float32(1.0)
    return shape, detail, coarse


def _upsample(small: np.ndarray, shape: Sequence[int], step: int) -> np.ndarray:
    """A coarse grid (cells of `step` px, the last ones partial) back to `shape`, bilinearly."""
    if step == 1:
        return small.astype(np.float32, copy=False)
    h, w = shape
    picture = Image.fromarray(np.ascontiguousarray(small, dtype=np.float32))
    return np.asarray(picture.resize((w, h), Image.Resampling.BILINEAR, box=(0, 0, w / step, h / step)))


def _soft(x: np.ndarray) -> np.ndarray:
    """In place: linear near 0, compressed beyond 1 (x / (1 + |x| / 2)): deep dust keeps its shading."""
    scale = np.abs(x)
    scale *= np.float32(0.5)
    scale += np.float32(1.0)
    x /= scale
    return x


def _stretch_planes(planes: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Channels, each relative to its own level, to 0..1 with one common stretch (so a
    channel that vignettes more shows as a tint): the large-scale shape between the 0.5
    and 99.5 percentiles of the channels' mean shape, plus the detail at a fixed gain
    (softly limited, so that a deep donut keeps its lighter centre)."""
    split = [_shape_and_detail(p) for p in planes]
    with _quiet():
        coarse = split[0][2] if len(split) == 1 else np.nanmean(np.stack([c for _, _, c in split]), axis=0)
    lo, hi = _percentiles(coarse, 0.5, 99.5)
    span = hi - lo if hi > lo else 1.0
    noise = max(_robust_sigma(d) for _, d, _ in split)
    detail_span = max(DETAIL_SPAN, DETAIL_NOISE * noise)
    out = []
    for shape, detail, _ in split:  # a NaN pixel stays NaN (black)
        value = shape - np.float32(lo)
        value *= np.float32(SHAPE_WEIGHT / span)
        value += np.float32((1 - SHAPE_WEIGHT) / 2)
        detail *= np.float32(1 / detail_span)
        value += np.float32(DETAIL_GAIN) * _soft(detail)
        out.append(value)
    return out


def _superpixels(image: np.ndarray, layout) -> dict[str, np.ndarray]:
    """R, G (mean of the two), B planes of half size from a mosaic, by `layout`'s colours."""
    h, w = (image.shape[0] // 2) * 2, (image.shape[1] // 2) * 2
    if h == 0 or w == 0:
        raise PreviewError(f"a colour preview needs at least 2 x 2 pixels, got {image.shape[1]} x {image.shape[0]}")
    parts: dict[str, list[np.ndarray]] = {"R": [], "G": [], "B": []}
    for index, colour in enumerate(layout.colours(0)):
        parts[colour].append(image[index // 2:h:2, index % 2:w:2])
    if not all(parts.values()):
        raise PreviewError(f"the CFA pattern {layout.pattern!r} lacks a colour")
    return {c: _mean_of(p) for c, p in parts.items()}


def _mean_of(planes: list[np.ndarray]) -> np.ndarray:
    """The mean of one or two planes; where one is NaN, the other."""
    if len(planes) == 1:
        return planes[0]
    if len(planes) > 2:  # an odd pattern such as "RGGG"
        with _quiet():
            return np.nanmean(np.stack(planes), axis=0)
    a, b = planes
    mean = (a + b) * np.float32(0.5)
    bad = ~np.isfinite(mean)
    if bad.any():
        mean[bad] = np.where(np.isfinite(a[bad]), a[bad], b[bad])
    return mean


def _display_rows(array: np.ndarray, bottom_up: bool) -> np.ndarray:
    return np.ascontiguousarray(array[::-1] if bottom_up else array)


def _from_blocks(blocks, shape: tuple[int, int], layout, max_side: int) -> Optional[list[np.ndarray]]:
    """The binned plane(s) master_preview would make, from a master's block sums by parity
    (`blocks`: flatd.qc.blocks.Blocks, e.g. flatd.qc.previous.Binned) when they are of its
    bins: every pixel finite, whole blocks of the preview's size. Mono: [plane]; colour:
    [R, G, B]. None otherwise."""
    if blocks is None or not blocks.finite:
        return None
    h, w = shape
    b = blocks.binning
    factor = bin_factor(shape, max_side) if layout is None else 2 * bin_factor((h // 2, w // 2), max_side)
    if b != factor or h % b or w % b or blocks.sums.shape[2:] != (h // b, w // b):
        return None
    if layout is None:
        return [blocks.total() / np.float32(b * b)]
    if b % 2:
        return None
    parts: dict[str, list[np.ndarray]] = {"R": [], "G": [], "B": []}
    for index, colour in enumerate(layout.colours(0)):
        parts[colour].append(blocks.sums[index // 2, index % 2])
    if not all(parts.values()):
        return None
    cells = np.float32((b // 2) ** 2)
    return [sum(parts[c][1:], parts[c][0].copy()) / (cells * len(parts[c])) for c in ("R", "G", "B")]


def master_preview(image: np.ndarray, layout=None, bottom_up: Optional[bool] = None,
                   max_side: int = MAX_SIDE, blocks=None) -> Image.Image:
    """A master flat as a picture: mode "L" (mono) or "RGB" (a CFA master, `layout` being a
    flatd.stack.cfa.Layout), at most `max_side` px on the long side (area average),
    auto-stretched so that vignetting and dust donuts both show. Rows are shown top-down
    (a BOTTOM-UP master flipped: `bottom_up`, default the layout's). `blocks`: the
    master's block sums, when made (_from_blocks: no pass over the master). PreviewError
    when no picture can be made (no finite pixel, not 2-D)."""
    array = _as_image(image)
    bottom_up = _flip(layout, bottom_up)
    ready = _from_blocks(blocks, array.shape, layout, max_side)
    if layout is None:
        binned = ready[0] if ready else bin_mean(array, bin_factor(array.shape, max_side))
        grey = _to_grey(_stretch_planes([_relative(binned)])[0])
        return Image.fromarray(_display_rows(grey, bottom_up))
    if ready:
        binned = ready
    else:
        planes = _superpixels(array, layout)
        factor = bin_factor(planes["R"].shape, max_side)
        binned = [bin_mean(planes[c].astype(np.float32), factor) for c in ("R", "G", "B")]
    usable = [np.isfinite(p).any() for p in binned]
    if not any(usable):
        raise PreviewError("the image has no finite pixel")
    stretched = iter(_stretch_planes([_relative(p) for p, ok in zip(binned, usable) if ok]))
    rgb = [_to_grey(next(stretched)) if ok else np.zeros(p.shape, np.uint8) for p, ok in zip(binned, usable)]
    return Image.fromarray(_display_rows(np.dstack(rgb), bottom_up))


# --------------------------------------------------------------------- the ratio


DIVERGING_STEPS = 125  # steps of the diverging scale on each side of white (1.6 grey levels each)
NOT_FINITE = 2 * DIVERGING_STEPS + 1  # the palette's grey


# the marks take the colour of what they mark: new dust darkens (blue), dust gone brightens (red)
BLOB_COLOURS = {"appeared": (0, 30, 170), "went": (170, 0, 0), "moved": (130, 0, 150)}
MARK_INDEX = {kind: NOT_FINITE + 1 + k for k, kind in enumerate(BLOB_COLOURS)}
OTHER_MARK = 255  # black: a blob of another kind


def _diverging_palette() -> list[int]:
    """The ratio picture's palette, 256 RGB entries: the colours of -1..1 in
    2 DIVERGING_STEPS + 1 steps, blue (darker now) - white - red (brighter now); grey (not
    finite); the marks' colours; black."""
    t = np.linspace(-1.0, 1.0, 2 * DIVERGING_STEPS + 1)
    neg, pos = np.clip(-t, 0, 1), np.clip(t, 0, 1)
    rgb = np.stack([1.0 - 0.8 * neg, 1.0 - 0.75 * neg - 0.8 * pos, 1.0 - 0.8 * pos], axis=1)
    scale = _to_grey(np.vstack([rgb, [0.5, 0.5, 0.5]])).ravel().tolist()
    marks = [v for colour in BLOB_COLOURS.values() for v in colour]
    return scale + marks + [0, 0, 0] * (256 - len(scale) // 3 - len(BLOB_COLOURS))


_DIVERGING = _diverging_palette()


def _diverging(values: np.ndarray) -> Image.Image:
    """-1..1 to a palette picture ("P"): blue (darker now) - white - red (brighter now); not
    finite: grey. Each value's step of the scale (an RGB image is three times the bytes
    to write, and PNG filters them row by row: a palette picture is written unfiltered,
    in a sixth of the time)."""
    index = np.clip(values, -1.0, 1.0)
    index += 1.0
    index *= DIVERGING_STEPS
    index += 0.5
    index[~np.isfinite(values)] = NOT_FINITE
    picture = Image.fromarray(index.astype(np.uint8))
    picture.putpalette(_DIVERGING)
    return picture


def _marks(draw, blobs: Iterable, scale: float, size: tuple[int, int],
           flip_rows: Optional[float]) -> None:
    """A circle and a short label ("appeared 1.2%") around each blob: x, y, radius in master
    pixels, `scale` master pixels per picture pixel, depth in % of the level; `flip_rows`:
    the picture's height in (fractional) pixels when it is shown flipped."""
    width, height = size
    for blob in blobs:
        try:
            x, y = (float(blob.x) + 0.5) / scale, (float(blob.y) + 0.5) / scale  # continuous coordinates
            radius, depth = float(blob.radius) / scale, float(getattr(blob, "depth", math.nan))
        except (TypeError, ValueError):
            continue
        if not all(math.isfinite(v) for v in (x, y, radius)):
            continue
        if flip_rows is not None:
            y = flip_rows - y
        x, y = x - 0.5, y - 0.5
        r = min(max(radius * 1.4, 6.0), 2.0 * max(width, height))
        kind = str(getattr(blob, "kind", "") or "changed")
        colour = MARK_INDEX.get(kind, OTHER_MARK)
        draw.ellipse([x - r, y - r, x + r, y + r], outline=colour, width=2)
        label = f"{kind} {depth:.1f}%" if math.isfinite(depth) else kind
        tx = min(max(0.0, x + r + 2), max(0.0, width - 6.0 * len(label)))
        ty = min(max(0.0, y - 6), max(0.0, height - 12.0))
        draw.text((tx, ty), label, fill=colour)


def ratio_preview(ratio: np.ndarray, blobs: Iterable = (), bottom_up: bool = False,
                  max_side: int = MAX_SIDE, binning: int = 1) -> Image.Image:
    """The ratio new / previous master (large-scale shapes already matched) as a palette
    picture ("P", flatd's colours): white at 1 (and within 3 noise sigmas of it), red
    where the new master is brighter, blue where darker, full colour at 1 +- 1 % (or +-6
    noise sigmas), grey where unknown. `binning`: master pixels per ratio pixel (Comparison.binning). Each
    blob (any object with x, y, radius in master pixels, depth in %, and kind:
    "appeared" / "went") is circled and labelled. PreviewError when the ratio has no
    finite pixel."""
    array = _as_image(ratio)
    factor = bin_factor(array.shape, max_side)
    binned = bin_mean(array, factor)
    level = robust_level(binned)
    if not math.isfinite(level):
        raise PreviewError("the ratio has no finite pixel")
    relative = binned / np.float32(level) - np.float32(1.0) if level > 0 else binned - np.float32(level)
    noise = _robust_sigma(relative)
    span = max(RATIO_SPAN, DETAIL_NOISE * noise)
    # within 3 noise sigmas of 1: plain white (clean to look at, and a small PNG)
    dead = min(3 * noise / span, 0.5)
    t = np.clip(relative / np.float32(span), -1, 1)
    t = np.sign(t) * np.maximum(np.abs(t) - np.float32(dead), 0) / np.float32(1 - dead)
    picture = _diverging(_display_rows(t, bottom_up))
    blobs = list(blobs)
    if not blobs:
        return picture
    from PIL import ImageDraw  # with its fonts: only when there is dust to mark

    _marks(ImageDraw.Draw(picture), blobs, float(factor * max(1, int(binning))), picture.size,
           array.shape[0] / factor if bottom_up else None)
    return picture


# --------------------------------------------------------------------- writing


def png_bytes(image: Image.Image) -> bytes:
    """The PNG file of `image`, deflated with zlib's run-length strategy: twice as fast as
    the default on a grainy flat, and smaller on the ratio picture's plain white."""
    import io
    import zlib

    buffer = io.BytesIO()
    # named: Pillow then loads its PNG writer alone (a format given loads five of them)
    buffer.name = "preview.png"
    image.save(buffer, compress_level=1, compress_type=zlib.Z_RLE)
    return buffer.getvalue()


def write_png(path: Path, image) -> Path:
    """Write `image` (a Pillow image, or its PNG bytes) as a PNG at `path`, atomically: a hidden temp file in the same folder
    (".flatd-<name>-<random>.tmp"), fsynced, renamed over `path` (a preview belongs to its
    master and is replaced with it), the folder fsynced. The free space is checked first
    (NoSpace); on any failure the temp file is removed."""
    from flatd.fsops import create_temp, fsync_dir
    from flatd.output.masters import check_free_space, no_space

    path = Path(path)
    data = image if isinstance(image, bytes) else png_bytes(image)
    check_free_space(path.parent, len(data))
    temp, fd = create_temp(path.parent, path.name)
    try:
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise no_space(path.parent, len(data)) from None
            raise
        os.replace(temp, path)
    except BaseException:
        try:
            os.unlink(temp)
        except OSError:
            pass
        raise
    fsync_dir(path.parent)
    return path


def _flip(layout, bottom_up: Optional[bool]) -> bool:
    return bool(layout.bottom_up) if bottom_up is None and layout is not None else bool(bottom_up)


def _drawn(kind: str, make) -> tuple:
    """(kind, PNG bytes), or (kind, the exception that stopped it): a picture never fails a job."""
    try:
        return kind, png_bytes(make())
    except Exception as exc:  # noqa: BLE001
        return kind, exc


def render_master(image: np.ndarray, layout=None, bottom_up: Optional[bool] = None, blocks=None) -> tuple:
    """("preview", PNG bytes or the exception): the master's picture, no file (`blocks`:
    see master_preview)."""
    flip = _flip(layout, bottom_up)
    return _drawn("preview", lambda: master_preview(image, layout, flip, blocks=blocks))


def render_ratio(comparison, layout=None, bottom_up: Optional[bool] = None) -> Optional[tuple]:
    """("ratio", PNG bytes or the exception): the ratio picture of a previous-master
    comparison (`.ratio`, `.blobs`, `.binning`); None without one."""
    if comparison is None or getattr(comparison, "ratio", None) is None:
        return None
    flip = _flip(layout, bottom_up)
    blobs = getattr(comparison, "blobs", None) or ()
    binning = getattr(comparison, "binning", 1) or 1
    return _drawn("ratio", lambda: ratio_preview(comparison.ratio, blobs, flip, binning=binning))


def render_previews(image: np.ndarray, layout=None, comparison=None, bottom_up: Optional[bool] = None) -> list:
    """[(kind, PNG bytes or the exception that stopped it)]: the master's preview, and the
    ratio picture when the previous-master comparison ran. Pure computation (no file):
    the runner draws each in a thread of its own (flatd.runner._start_pictures)."""
    ratio = render_ratio(comparison, layout, bottom_up)
    return [render_master(image, layout, bottom_up)] + ([ratio] if ratio is not None else [])


def write_rendered(master_path: Path, rendered, **fields) -> list[Path]:
    """Write render_previews' pictures beside the master just written (preview_paths).
    `rendered`: its list; an item may be a Future of one (drawn in a thread: waited for
    here). Returns the files written; a picture that could not be made or written is a
    warning (event `preview_failed`, with `fields`, e.g. job=...) and is skipped:
    previews never fail a job."""
    preview, ratio_png = preview_paths(master_path)
    paths = {"preview": preview, "ratio": ratio_png}
    written = []
    for item in rendered:
        try:
            item = item.result() if hasattr(item, "result") else item
        except Exception as exc:  # noqa: BLE001 - the drawing thread's own failure
            _warn(preview, exc, fields)
            continue
        if item is None:  # render_ratio's: no ratio to draw
            continue
        kind, data = item
        try:
            if isinstance(data, Exception):
                raise data
            written.append(write_png(paths[kind], data))
        except Exception as exc:  # noqa: BLE001 - a picture must never fail a job
            _warn(paths[kind], exc, fields)
    return written


def write_previews(master_path: Path, image: np.ndarray, layout=None, comparison=None,
                   bottom_up: Optional[bool] = None, **fields) -> list[Path]:
    """The preview of a master just written, and the ratio picture when the previous-master
    comparison ran: render_previews then write_rendered (the same warnings)."""
    return write_rendered(master_path, render_previews(image, layout, comparison, bottom_up), **fields)


def _warn(path: Path, exc: Exception, fields: dict) -> None:
    from flatd.notify import events as E

    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else f"{type(exc).__name__}: {exc}"
    E.notice("preview_failed", f"no preview {path}: {reason} (the master is written)", logging.WARNING,
             path=path, **fields)
