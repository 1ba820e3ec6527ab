"""Colour (CFA) sensors: which pixels of a mosaic belong to which colour, and per-channel figures.

Pure numpy, no I/O. A colour frame stays a mosaic all the way through flatd (the stacker
works pixel by pixel); this module is for what looks at it by colour: ``inspect --adu``,
the quality checks, and ``combine.equalize_cfa``.

Conventions (those of N.I.N.A., Siril and PixInsight): the pattern (BAYERPAT 'RGGB', read
left to right, top to bottom) starts at pixel (XBAYROFF, YBAYROFF) of the image as seen
top-down, so pixel (x, y) has colour ``pattern[2 * ((y + yoff) % 2) + (x + xoff) % 2]``.
A BOTTOM-UP array (ROWORDER) stores the top row last: its stored row r is top-down row
height - 1 - r. The two greens are one channel, G.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import numpy as np

CHANNELS = ("R", "G", "B")


@dataclass(frozen=True)
class Layout:
    """Where the colours are in a stored mosaic: the pattern and offsets as written, the
    row order and the image height (which a BOTTOM-UP array needs)."""

    pattern: str
    offset: tuple[int, int] = (0, 0)
    bottom_up: bool = False
    height: int = 0

    def colours(self, row0: int = 0) -> tuple[str, str, str, str]:
        """The colours of stored pixels (row0 + dr, dc) for dr, dc in 0, 1: (00, 01, 10, 11)."""
        xoff, yoff = self.offset
        out = []
        for dr in (0, 1):
            row = row0 + dr
            top_down = (self.height - 1 - row) if self.bottom_up else row
            for dc in (0, 1):
                out.append(self.pattern[2 * ((top_down + yoff) % 2) + (dc + xoff) % 2])
        return tuple(out)


def layout_of(frame) -> Optional[Layout]:
    """The Layout of a Frame's mosaic; None for a mono frame."""
    if not frame.bayer_pattern:
        return None
    return Layout(frame.bayer_pattern, tuple(frame.bayer_offset), frame.row_order == "BOTTOM-UP", frame.height)


def common_layout(frames: Iterable) -> Optional[Layout]:
    """The one Layout all `frames` share; None when mono, or when they differ."""
    layouts = {layout_of(f) for f in frames}
    return layouts.pop() if len(layouts) == 1 else None


def channel_slices(layout: Layout, row0: int = 0) -> dict[str, list[tuple[slice, slice]]]:
    """Per channel, the (rows, columns) slices of a band whose first row is image row `row0`."""
    out: dict[str, list[tuple[slice, slice]]] = {c: [] for c in CHANNELS}
    for index, colour in enumerate(layout.colours(row0)):
        out[colour].append((slice(index // 2, None, 2), slice(index % 2, None, 2)))
    return out


def channel_masks(shape: Sequence[int], layout: Layout, row0: int = 0) -> dict[str, np.ndarray]:
    """Per channel, a boolean mask of a (rows, columns) band starting at image row `row0`."""
    masks = {c: np.zeros(tuple(shape), dtype=bool) for c in CHANNELS}
    for colour, parts in channel_slices(layout, row0).items():
        for rows, cols in parts:
            masks[colour][rows, cols] = True
    return masks


def channel_values(image: np.ndarray, layout: Layout, row0: int = 0) -> dict[str, np.ndarray]:
    """Per channel, its pixels of `image` (a band from row `row0`), raveled."""
    image = np.asarray(image)
    return {c: np.concatenate([image[r, k].ravel() for r, k in parts]) if parts else np.empty(0, image.dtype)
            for c, parts in channel_slices(layout, row0).items()}


def channel_sums(image: np.ndarray, layout: Layout, row0: int = 0) -> dict[str, tuple[float, int]]:
    """Per channel, (sum, count) of its finite pixels in a band: add them up band by band."""
    out = {}
    for colour, values in channel_values(image, layout, row0).items():
        finite = values[np.isfinite(values)] if values.dtype.kind == "f" else values
        out[colour] = (float(np.sum(finite, dtype=np.float64)), int(finite.size))
    return out


def channel_means(image: np.ndarray, layout: Layout, row0: int = 0) -> dict[str, float]:
    """Per channel, the mean of its finite pixels (NaN when it has none)."""
    return {c: (s / n if n else math.nan) for c, (s, n) in channel_sums(image, layout, row0).items()}


def channel_levels(image: np.ndarray, layout: Layout, row0: int = 0) -> dict[str, float]:
    """Per channel, the robust (IKSS) level of its pixels (flatd.stack.levels.robust_level)."""
    from flatd.stack.levels import LEVEL_SAMPLE, robust_level

    out = {}
    for colour, values in channel_values(image, layout, row0).items():
        step = max(1, values.size // LEVEL_SAMPLE)
        out[colour] = robust_level(values[::step]) if values.size else math.nan
    return out


def saturated_fractions(image: np.ndarray, layout: Layout, saturation: float, row0: int = 0) -> dict[str, float]:
    """Per channel, the fraction of its pixels at or above `saturation` (ADU)."""
    return {c: (float(np.count_nonzero(v >= saturation)) / v.size if v.size else 0.0)
            for c, v in channel_values(image, layout, row0).items()}


def equalize(image: np.ndarray, layout: Layout) -> dict[str, float]:
    """Scale each channel of a whole master in place so that it has the mean of the whole
    image; return the factors. ValueError when a channel's mean is not positive."""
    means = channel_means(image, layout)
    for colour, mean in means.items():
        if not (math.isfinite(mean) and mean > 0):
            raise ValueError(f"the {colour} pixels have mean {mean:g}; a channel needs a positive mean to be equalized")
    counts = {c: n for c, (_, n) in channel_sums(image, layout).items()}
    target = sum(means[c] * counts[c] for c in CHANNELS) / sum(counts.values())
    factors = {c: target / means[c] for c in CHANNELS}
    for colour, parts in channel_slices(layout).items():
        for rows, cols in parts:
            image[rows, cols] *= np.asarray(factors[colour], dtype=image.dtype)
    return factors


def equalize_master(frames: Sequence, image: np.ndarray, origin: tuple[int, int] = (0, 0)) -> list[str]:
    """combine.equalize_cfa on a master of `frames`, in place: HISTORY lines saying what
    was done. `origin`: the stored pixel (x0, y0) that is the master's first when the
    inputs were trimmed (the mosaic's phase moves with it). StackError when a channel
    cannot be scaled."""
    from dataclasses import replace

    from flatd.errors import StackError

    if not any(f.bayer_pattern for f in frames):
        return ["equalize_cfa: a mono master, left as it is"]
    layout = common_layout(frames)
    if layout is None:
        return ["equalize_cfa: not applied, the inputs' CFA layouts differ"]
    if origin != (0, 0):
        layout = replace(layout, offset=((layout.offset[0] + origin[0]) % 2, (layout.offset[1] + origin[1]) % 2),
                         height=image.shape[0])
    try:
        factors = equalize(image, layout)
    except ValueError as exc:
        raise StackError(f"equalize_cfa: {exc}") from None
    return ["equalize_cfa: CFA channels scaled to the master's mean:",
            "  " + ", ".join(f"{c} x{factors[c]:.6g}" for c in CHANNELS)]
