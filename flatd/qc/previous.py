"""A new master against the previous one of the same camera, filter, binning and optics.

As BANZAI does: the ratio new / previous, its large-scale shape matched out (each CFA
colour to its median, then a low-order 2-D polynomial surface fitted to block medians,
robustly), and the fraction of pixels whose ratio differs by more than N sigma of its
own pixel noise. Dust that appeared, moved or went shows as blobs on the ratio smoothed
at dust scale: darker now (appeared) or brighter now (went); a moved donut is one of
each. numpy only.

`compare(master, previous) -> Comparison` is the seam the previews use (the ratio PNG
marks the blobs). `find_previous` looks in the ledger's masters of done jobs, then in the
output folder; a previous master that cannot be used (another size, unreadable,
truncated, no data, mostly non-finite) is reported and skipped, never fatal.
"""

from __future__ import annotations

import math
import os
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Optional, Sequence

import numpy as np

from flatd.qc.blocks import NONFINITE, NONPOSITIVE, Blocks, fold

MAD_SIGMA = 1.4826
MAX_SIDE = 1024  # the ratio is binned (b x b) until its longer side is at most this
MAX_FLAGGED = 200_000  # more changed pixels than this: too widespread to list as blobs
MAX_BLOBS = 50
MAX_TRIES = 5  # previous masters tried, newest first, before giving up
IDENTITY = ("INSTRUME", "FILTER", "XBINNING", "YBINNING", "TELESCOP", "FOCALLEN")
OPTICS = ("TELESCOP", "FOCALLEN")  # compared when both masters have them


@dataclass(frozen=True)
class Blob:
    """A place where dust appeared (darker now) or went (brighter now): centre (x, y) and
    radius in master pixels, depth in % of the level."""

    x: float
    y: float
    radius: float
    depth: float
    kind: str  # "appeared" | "went"


@dataclass
class Comparison:
    """`ratio`: new / previous with the large-scale shape matched out (about 1.0), at
    `binning` master pixels per ratio pixel; `changed_fraction`: of its finite pixels,
    those more than `nsigma` x `sigma` from 1; `blobs`: the dust that changed."""

    ratio: np.ndarray
    changed_fraction: float
    blobs: list[Blob]
    sigma: float = math.nan
    binning: int = 1
    nsigma: float = 5.0
    widespread: bool = False  # too many changed pixels to list blobs


# --------------------------------------------------------------------------- the comparison


def compare(master, previous, sigma: float = 5.0, min_depth: float = 0.005,
            scale: float = 5.0) -> Comparison:
    """Compare two masters of one size: arrays, or Binned (binned_master, read_binned) when
    both are finite and positive throughout. ValueError (with the reason) when they cannot
    be: another size, or too few pixels finite and positive in both."""
    if isinstance(master, Binned) and isinstance(previous, Binned):
        if master.shape != previous.shape or master.binning != previous.binning:
            raise ValueError(f"previous master is {_size(previous)}, this one {_size(master)}")
        return _compared(_ratio_of_binned(master, previous), sigma, min_depth, scale, master.binning)
    master, previous = np.asarray(master), np.asarray(previous)
    if master.shape != previous.shape or master.ndim != 2:
        raise ValueError(f"previous master is {_size(previous)}, this one {_size(master)}")
    b = binning_for(master.shape)
    if b > 1:  # binned as the file reader bins them, when every pixel of both is finite and positive
        new, old = binned_master(master), binned_master(previous)
        if new.positive and old.positive:
            return _compared(_ratio_of_binned(new, old), sigma, min_depth, scale, b)
    return _compared(bin_image(raw_ratio(master, previous), b), sigma, min_depth, scale, b)


def _compared(ratio: np.ndarray, sigma: float, min_depth: float, scale: float, b: int) -> Comparison:
    """The comparison of a binned ratio new / previous (CFA positions scaled alike)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = ratio / large_scale(ratio)
    r = ratio - 1.0
    finite = np.isfinite(r)
    noise = robust_std(r[finite])
    changed = float(np.count_nonzero(np.abs(r[finite]) > sigma * noise) / max(finite.sum(), 1))
    blobs, widespread = find_blobs(r, noise, sigma, min_depth, max(3.0, scale / b), b)
    return Comparison(ratio.astype(np.float32), changed, blobs, noise, b, sigma, widespread)


def _size(a) -> str:
    return "x".join(str(s) for s in a.shape[::-1])


# --------------------------------------------------------------------------- binned as read

BAND_BYTES = 8 * 2**20  # a previous master is read in bands of about this many bytes
SAMPLE_VALUES = 20_000  # per CFA position, for the median ratio of the positions (to ~1e-4 at 0.5 % noise)


@dataclass
class Binned(Blocks):
    """A master reduced for the comparison in one pass (flatd.qc.blocks.fold): its Blocks
    (per b x b block, the sums of its pixels by the parity of their row and column offset
    in the block, so that each CFA position can be scaled afterwards; fold's bits: a pixel
    not finite, not above 0, at or above `limit`); and every `step`-th pixel of each CFA
    position (2, 2, ...) for the positions' median ratio. `positive`: every pixel finite
    and above 0 (if not: compare the full images, raw_ratio)."""

    samples: list = field(default_factory=list)
    limit: float = math.inf

    @property
    def positive(self) -> bool:
        return not self.flags & (NONFINITE | NONPOSITIVE)

    @property
    def below_limit(self) -> bool:
        """Every pixel finite, above 0 and below `limit`."""
        return not self.flags


def sample_step(shape: tuple[int, int]) -> int:
    """Every step-th row and column of a CFA position: about SAMPLE_VALUES of them."""
    h, w = shape
    return max(1, int(math.sqrt((h // 2) * (w // 2) / SAMPLE_VALUES)))


def _empty_binned(shape: tuple[int, int], b: int, limit: float = math.inf) -> Binned:
    h, w = shape
    return Binned((h, w), b, np.zeros((2, 2, h // b, w // b), dtype=np.float32), 0,
                  samples=[[[], []], [[], []]], limit=limit)


def _add_band(out: Binned, band: np.ndarray, r0: int) -> None:
    """Fold the rows r0.. of a master (band: rows x W) into `out`."""
    step = 2 * sample_step(out.shape)
    for py in (0, 1):  # the CFA positions' samples: rows py, py + step, ... and columns px, px + step, ...
        first = (py - r0) % step
        for px in (0, 1):
            if first < band.shape[0]:  # copied: a band read from a file is overwritten by the next
                out.samples[py][px].append(band[first::step, px::step].copy())
    out.flags |= fold(band, out.binning, out.sums, r0, out.limit)


def _finish(out: Binned) -> Binned:
    out.samples = [[np.concatenate(out.samples[py][px], axis=0) if out.samples[py][px] else np.empty((0, 0),
                    np.float32) for px in (0, 1)] for py in (0, 1)]
    return out


def binned_master(image: np.ndarray, limit: float = math.inf) -> Binned:
    """A master in memory, binned for the comparison (no copy of it) in one pass, which
    also tells whether any pixel is at or above `limit` (the master checks' saturation)."""
    image = np.asarray(image, dtype=np.float32)
    out = _empty_binned(image.shape, binning_for(image.shape), limit)
    _add_band(out, image, 0)
    return _finish(out)


def read_binned(path: Path, shape: tuple[int, int]) -> Binned:
    """A master file binned for the comparison with a master of `shape`, read in bands of
    about BAND_BYTES into one buffer (never the whole image in memory). ValueError with
    the reason when it is unreadable or of another size."""
    from flatd.ingest.frames import FrameError, read_frame
    from flatd.stack.pixels import open_pixels

    try:
        frame = read_frame(path)
        if (frame.height, frame.width) != tuple(shape):
            raise ValueError(f"previous master is {frame.width}x{frame.height}, this one {shape[1]}x{shape[0]}")
        out = _empty_binned(tuple(shape), binning_for(shape))
        with open_pixels(frame) as src:
            rows = max(out.binning, BAND_BYTES // max(1, 4 * src.width) // out.binning * out.binning)
            band = np.empty((min(rows, src.height), src.width), dtype=np.float32)
            scratch = np.empty(src.raw_bytes(0, band.shape[0]), dtype=np.uint8)
            for r0 in range(0, src.height, rows):
                r1 = min(src.height, r0 + rows)
                native = src.float32_rows(r0, r1, scratch)  # a float FITS master: its bytes swapped in place
                if native is None:
                    src.read_into(r0, r1, band[: r1 - r0], scratch=scratch)
                    native = band[: r1 - r0]
                _add_band(out, native, r0)
    except FrameError as exc:
        raise ValueError(getattr(exc, "reason", None) or str(exc)) from None
    except ValueError:
        raise
    except Exception as exc:  # noqa: BLE001 - any unreadable file: a reason, never a crash
        raise ValueError(f"unreadable: {type(exc).__name__}: {exc}") from None
    return _finish(out)


def _ratio_of_binned(a: Binned, p: Binned) -> np.ndarray:
    """bin(a) / bin(p with each CFA position scaled by its median ratio a / p): the ratio
    raw_ratio would give, binned (the large-scale shape and the dust are far larger than a
    block; the pixel pattern both masters share cancels in either), with no full-size
    temporary."""
    b = a.binning
    ny, nx = a.sums.shape[2:]
    scale = np.ones((2, 2))
    for py in (0, 1):
        for px in (0, 1):
            sa, sp = a.samples[py][px], p.samples[py][px]
            if sa.size and sa.shape == sp.shape:
                with np.errstate(invalid="ignore", divide="ignore"):
                    med = float(np.median(sa / sp))
                if math.isfinite(med) and med > 0:
                    scale[py, px] = med
    top = a.total()
    bottom = np.zeros((ny, nx), dtype=np.float32)
    # the CFA position of offset (ci, cj) in block (Y, X) is (Y b + ci, X b + cj) mod 2: with an
    # even b the same in every block, with an odd one it alternates with the block's parity
    parities = ((0, 0),) if b % 2 == 0 else ((0, 0), (0, 1), (1, 0), (1, 1))
    step = 1 if b % 2 == 0 else 2
    for qy, qx in parities:
        part = bottom[qy::step, qx::step]
        for ci in (0, 1):
            for cj in (0, 1):
                part += p.sums[ci, cj, qy::step, qx::step] * np.float32(scale[(qy + ci) % 2, (qx + cj) % 2])
    with np.errstate(invalid="ignore", divide="ignore"):
        return top / bottom


def raw_ratio(master: np.ndarray, previous: np.ndarray) -> np.ndarray:
    """new / previous where both are finite and positive (NaN elsewhere), each CFA
    position (row and column parity) scaled to median 1. ValueError when under half of
    the pixels can be compared."""
    a, b = np.asarray(master, np.float32), np.asarray(previous, np.float32)
    with np.errstate(all="ignore"):
        ratio = a / b
        ok = np.isfinite(ratio)
        ok &= a > 0
        ok &= b > 0
    count = int(np.count_nonzero(ok))
    if count < 0.5 * a.size or count < 16:
        raise ValueError(f"only {count} of {a.size} pixels are finite and positive in both masters")
    if count < a.size:
        ratio[~ok] = np.nan
    scale = np.ones((2, 2), dtype=np.float32)
    for py in (0, 1):
        for px in (0, 1):
            part = ratio[py::2, px::2]
            step = max(1, int(math.sqrt(part.size / 60_000)))
            sample = part[::step, ::step]
            sample = sample[np.isfinite(sample)]
            med = float(np.median(sample)) if sample.size else math.nan
            if math.isfinite(med) and med > 0:
                scale[py, px] = 1.0 / med
    h, w = ratio.shape
    if h % 2 == 0 and w % 2 == 0:  # one pass over the pixels, each CFA position by its own
        ratio.reshape(h // 2, 2, w // 2, 2).__imul__(scale[None, :, None, :])
    else:
        for py in (0, 1):
            for px in (0, 1):
                ratio[py::2, px::2] *= scale[py, px]
    return ratio


def binning_for(shape) -> int:
    return max(1, math.ceil(max(shape) / MAX_SIDE))


def bin_image(image: np.ndarray, b: int) -> np.ndarray:
    """Means of b x b blocks of finite pixels (NaN when none); b == 1 returns the image."""
    if b == 1:
        return image
    h, w = image.shape
    if np.isfinite(image).all():  # all finite (the usual case): strided sums, row by row then column by column
        rows = image[0: h // b * b: b, : w // b * b].astype(np.float32, copy=True)
        for i in range(1, b):
            rows += image[i: h // b * b: b, : w // b * b]
        out = rows[:, 0::b].copy()
        for j in range(1, b):
            out += rows[:, j::b]
        out /= np.float32(b * b)
        return out
    cut = image[: h // b * b, : w // b * b].reshape(h // b, b, w // b, b)
    good = np.isfinite(cut)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(good, cut, 0).sum(axis=(1, 3), dtype=np.float64) / good.sum(axis=(1, 3))


def robust_std(values: np.ndarray) -> float:
    """1.4826 MAD; of at most about 100,000 of the values, evenly spread (to 0.5 %)."""
    if values.size == 0:
        return math.nan
    values = values.ravel()
    step = max(1, values.size // 100_000)
    if step > 1:
        values = values[::step]
    return float(MAD_SIGMA * np.median(np.abs(values - np.median(values))))


def large_scale(ratio: np.ndarray, blocks: int = 16, rounds: int = 3) -> np.ndarray:
    """The ratio's large-scale shape: a 2-D polynomial (degree 3 with enough blocks, else
    lower) fitted to block medians, blocks beyond 3 sigma of the fit left out."""
    h, w = ratio.shape
    by, bx = max(1, h // blocks), max(1, w // blocks)
    ny, nx = h // by, w // bx
    thin = 2 if min(by, bx) >= 8 else 1  # every other row and column of a large block: its median as well
    cut = ratio[: ny * by, : nx * bx].reshape(ny, by, nx, bx)[:, ::thin, :, ::thin]
    cut = cut.transpose(0, 2, 1, 3).reshape(ny, nx, -1)
    if not np.isnan(cut).any():
        med = np.median(cut, axis=2)  # one partition of all blocks (nanmedian goes block by block)
    else:
        with np.errstate(all="ignore"):
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                med = np.nanmedian(cut, axis=2)
    yc = (np.arange(ny) + 0.5) * by
    xc = (np.arange(nx) + 0.5) * bx
    yy, xx = np.meshgrid(yc, xc, indexing="ij")
    keep = np.isfinite(med)
    degree = 3 if keep.sum() >= 40 else 2 if keep.sum() >= 15 else 1 if keep.sum() >= 3 else 0
    coef = None
    for _ in range(rounds):
        if keep.sum() < _terms(degree):
            break
        coef = np.linalg.lstsq(_design(xx[keep], yy[keep], w, h, degree), med[keep], rcond=None)[0]
        resid = med - _design(xx.ravel(), yy.ravel(), w, h, degree).dot(coef).reshape(med.shape)
        spread = robust_std(resid[keep])
        if not spread > 0:
            break
        keep = np.isfinite(med) & (np.abs(resid) < 3 * spread)
    if coef is None:
        level = np.nanmedian(med) if np.isfinite(med).any() else 1.0
        return np.full(ratio.shape, level)
    u = 2 * (np.arange(w) + 0.5) / w - 1
    v = 2 * (np.arange(h) + 0.5) / h - 1
    terms = [(i, j) for i in range(degree + 1) for j in range(degree + 1 - i)]
    along = np.zeros((degree + 1, w))  # per power j of v: the polynomial in u that multiplies it
    for c, (i, j) in zip(coef, terms):
        along[j] += c * u ** i
    # separable: (h x degree + 1) @ (degree + 1 x w), one product, no (pixels x terms) matrix
    return np.power.outer(v, np.arange(degree + 1)) @ along


def _terms(degree: int) -> int:
    return (degree + 1) * (degree + 2) // 2


def _design(x: np.ndarray, y: np.ndarray, w: int, h: int, degree: int) -> np.ndarray:
    u, v = 2 * x / w - 1, 2 * y / h - 1
    cols = [u ** i * v ** j for i in range(degree + 1) for j in range(degree + 1 - i)]
    return np.stack(cols, axis=-1)


# --------------------------------------------------------------------------- blobs


def box(image: np.ndarray, size: int) -> np.ndarray:
    """The mean over a size x size box of the finite pixels around each (0 when none), in
    float32 (a ratio's deviations are some 1e-3: its 7 digits are plenty)."""
    size = max(1, int(size))
    image = np.asarray(image, dtype=np.float32)
    good = np.isfinite(image)
    if good.all():  # the usual case: the count of a box is the product of its two 1-D counts
        h, w = image.shape
        rows = _box_sum(np.ones((h, 1), np.float32), size)
        cols = _box_sum(np.ones((1, w), np.float32), size)
        out = _box_sum(image, size)
        out /= rows
        out /= cols
        return out
    return _box_sum(np.where(good, image, np.float32(0)), size) / np.maximum(_box_sum(good.astype(np.float32), size), 1)


SHIFTED_BOX = 7  # boxes up to this side are summed by shifted adds, longer ones by cumulative sums


def _box_sum(a: np.ndarray, size: int) -> np.ndarray:
    """Sums over a size x size box around each pixel (zeros beyond the edges), by shifted
    adds (short boxes) or cumulative sums."""
    if size <= SHIFTED_BOX:
        return _shifted_box_sum(a, size)
    lo, hi = size // 2, size - size // 2
    out = a
    for axis in (0, 1):
        pad = [(0, 0), (0, 0)]
        pad[axis] = (lo + 1, hi)
        c = np.cumsum(np.pad(out, pad), axis=axis)
        n = out.shape[axis]
        out = c[size:size + n] - c[:n] if axis == 0 else c[:, size:size + n] - c[:, :n]
    return out


def _shifted_box_sum(a: np.ndarray, size: int) -> np.ndarray:
    """_box_sum by adding the array to itself shifted by -size//2 .. size - size//2 - 1
    along each axis (the same windows), in the array's float type."""
    lo = size // 2
    out = np.asarray(a, dtype=a.dtype if a.dtype.kind == "f" else np.float64)
    for axis in (0, 1):
        n = out.shape[axis]
        acc = out.copy()
        for shift in range(-lo, size - lo):
            if shift == 0 or abs(shift) >= n:
                continue
            if axis == 0:
                (acc[:n - shift] if shift > 0 else acc[-shift:])[...] += out[shift:] if shift > 0 else out[:n + shift]
            else:
                (acc[:, :n - shift] if shift > 0 else acc[:, -shift:])[...] += (
                    out[:, shift:] if shift > 0 else out[:, :n + shift])
        out = acc
    return out


def find_blobs(r: np.ndarray, noise: float, nsigma: float, min_depth: float, scale: float,
               binning: int = 1) -> tuple[list[Blob], bool]:
    """Blobs of the relative ratio `r` smoothed over `scale` pixels beyond
    max(min_depth, nsigma x its smoothed noise); single wild pixels are clipped first.
    Returns (blobs, widespread)."""
    size = int(round(scale)) | 1
    clip = max(5 * noise, 4 * min_depth) if math.isfinite(noise) else 4 * min_depth
    detect = box(np.clip(r, -clip, clip), size)
    depth = None  # the unclipped mean, where there are blobs to measure
    finite = np.isfinite(detect)
    threshold = max(min_depth, nsigma * robust_std(detect[finite]))
    blobs: list[Blob] = []
    flagged = 0
    for kind, mask in (("appeared", detect < -threshold), ("went", detect > threshold)):
        flagged += int(mask.sum())
        if flagged > MAX_FLAGGED:
            return [], True
        for pixels in components(mask):
            if len(pixels[0]) < size:
                continue
            depth = box(r, size) if depth is None else depth
            blobs.append(_blob(pixels, depth, kind, binning))
    blobs.sort(key=lambda blob: -blob.depth)
    return blobs[:MAX_BLOBS], False


def _blob(pixels: tuple[np.ndarray, np.ndarray], depth: np.ndarray, kind: str, b: int) -> Blob:
    ys, xs = pixels
    values = depth[ys, xs]
    weights = np.abs(np.nan_to_num(values)) + 1e-12
    y = float((ys * weights).sum() / weights.sum())
    x = float((xs * weights).sum() / weights.sum())
    radius = max(xs.max() - xs.min() + 1, ys.max() - ys.min() + 1) / 2 * b
    extreme = float(np.nanmin(values) if kind == "appeared" else np.nanmax(values))
    return Blob(round((x + 0.5) * b - 0.5, 1), round((y + 0.5) * b - 0.5, 1), round(float(radius), 1),
                round(abs(extreme) * 100, 3), kind)


def components(mask: np.ndarray) -> Iterable[tuple[np.ndarray, np.ndarray]]:
    """The 8-connected regions of `mask`: (rows, cols) of each."""
    seen = np.zeros(mask.shape, dtype=bool)
    h, w = mask.shape
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        queue, ys, xs = deque([(y0, x0)]), [], []
        while queue:
            y, x = queue.popleft()
            ys.append(y)
            xs.append(x)
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    v, u = y + dy, x + dx
                    if 0 <= v < h and 0 <= u < w and mask[v, u] and not seen[v, u]:
                        seen[v, u] = True
                        queue.append((v, u))
        yield np.array(ys), np.array(xs)


# --------------------------------------------------------------------------- finding the previous master


def identity(cards: Mapping[str, object]) -> dict[str, Optional[str]]:
    """What makes two masters comparable: camera, filter, binning, optics (as text)."""
    out = {}
    for key in IDENTITY:
        value = cards.get(key)
        out[key] = None if value is None or str(value).strip() == "" else str(value).strip().lower()
    for key in ("XBINNING", "YBINNING"):
        out[key] = out[key] or "1"
    return out


def same_setup(new: Mapping[str, object], old: Mapping[str, object]) -> bool:
    """Same camera, filter and binning; same optics when both say."""
    a, b = identity(new), identity(old)
    for key in IDENTITY:
        if key in OPTICS and (a[key] is None or b[key] is None):
            continue
        if a[key] != b[key]:
            return False
    return True


def is_master_flat(cards: Mapping[str, object]) -> bool:
    return str(cards.get("IMAGETYP", "")).strip().lower() == "master flat"


def candidates(output_dir: Optional[Path], ledger=None, job_id: Optional[str] = None) -> list[Path]:
    """Earlier masters, newest first: the ledger's of done jobs, else the output folder's."""
    paths: list[Path] = []
    if ledger is not None:
        try:
            paths = [Path(p) for p in ledger.done_masters(exclude=job_id)]
        except Exception:  # noqa: BLE001 - a ledger of an older flatd: the folder
            paths = []
        paths = [p for p in paths if p.exists()]
    if not paths and output_dir is not None:
        paths = _folder_masters(Path(output_dir))
    return paths


def _folder_masters(directory: Path) -> list[Path]:
    try:
        entries = [e for e in os.scandir(directory) if not e.name.startswith(".") and e.is_file()]
    except OSError:
        return []
    entries.sort(key=lambda e: -e.stat().st_mtime)
    return [Path(e.path) for e in entries]


@dataclass
class PreviousCheck:
    """What the comparison with the previous master found (`path` None: none usable)."""

    path: Optional[Path] = None
    comparison: Optional[Comparison] = None
    skipped: list[str] = field(default_factory=list)  # earlier masters that could not be used, why

    def cards(self) -> dict[str, tuple[object, str]]:
        if self.path is None or self.comparison is None:
            return {}
        from flatd.output.naming import ascii_text

        c = self.comparison
        name = ascii_text(self.path.name)[:68].replace("'", "_")
        comment = "previous master compared with"
        return {
            "QCPREV": (name, comment if len(name) + len(comment) <= 80 - 15 else ""),
            "QCCHANGE": (float(f"{c.changed_fraction:.4g}"), f"fraction of pixels beyond {c.nsigma:g} sigma"),
            "QCNDUST": (len(c.blobs), "dust blobs that appeared or went"),
        }

    def history(self) -> list[str]:
        lines = [f"QC previous master skipped: {s}" for s in self.skipped]
        if self.comparison is not None:
            for blob in self.comparison.blobs:
                lines.append(f"QC dust {blob.kind} at x={blob.x:.0f} y={blob.y:.0f} r={blob.radius:.0f} "
                             f"depth {blob.depth:.2f} %")
        return lines

    def judge(self, limits) -> list[tuple[str, str]]:
        """(status, reason) pairs: a warning when much changed, or dust appeared or went."""
        c = self.comparison
        if c is None:
            return []
        out = []
        if c.changed_fraction > limits.previous_warn_fraction:
            out.append(("warn", f"{100 * c.changed_fraction:.3g} % of pixels changed beyond {c.nsigma:g} sigma "
                                f"since {self.path.name}"))
        if limits.dust_warn and (c.blobs or c.widespread):
            appeared = sum(1 for b in c.blobs if b.kind == "appeared")
            went = len(c.blobs) - appeared
            what = "changes too widespread to list" if c.widespread else f"{appeared} appeared, {went} went"
            out.append(("warn", f"dust changed since {self.path.name}: {what}"))
        return out


def load_master(path: Path) -> tuple[dict, np.ndarray]:
    """(cards, pixels) of a master file; ValueError with the reason when unusable."""
    from flatd.ingest.frames import FrameError, read_frame, read_header_cards
    from flatd.stack.pixels import read_image

    try:
        cards, _ = read_header_cards(path)
        image = read_image(read_frame(path))
    except FrameError as exc:
        raise ValueError(getattr(exc, "reason", None) or str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - any unreadable file: a reason, never a crash
        raise ValueError(f"unreadable: {type(exc).__name__}: {exc}") from None
    return cards, image


def _comparable(paths: Iterable[Path], cards: Mapping[str, object], job_id: Optional[str]) -> Iterator[Path]:
    """The masters of `paths` whose headers say they can be compared with a master of
    `cards`: master flats of the same setup, not this job's, not marked bad."""
    from flatd.ingest.frames import FrameError, read_header_cards

    for path in paths:
        try:
            old, _ = read_header_cards(path)
        except (FrameError, OSError, ValueError):
            continue  # not a FITS/XISF at all (a preview, a note): not a master
        if not is_master_flat(old) or (job_id and old.get("FLATDJOB") == job_id):
            continue
        if str(old.get("QCSTATUS", "")).strip().lower() == "bad" or not same_setup(cards, old):
            continue
        yield path


@dataclass
class ReadAhead:
    """The previous master a job will most likely be compared with, binned as it was read
    while the job stacked (read_ahead); used when check_previous picks the same file,
    unchanged since."""

    path: Path
    stamp: tuple
    binned: Binned


def _stamp(path: Path) -> tuple:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns, st.st_ino


def setup_cards(frames: Sequence) -> dict:
    """The cards of IDENTITY that a master of `frames` will most likely carry, from the
    frames' facts, without making its header (flatd.output.masters.master_header decides;
    this is the read-ahead's guess, and a wrong guess only costs the head start)."""
    from collections import Counter

    cards: dict = {"IMAGETYP": "Master Flat"}
    filters = Counter(f.filter for f in frames if f.filter is not None)
    if filters:
        cards["FILTER"] = filters.most_common(1)[0][0]
    cards["XBINNING"], cards["YBINNING"] = Counter((f.xbin, f.ybin) for f in frames).most_common(1)[0][0]
    for key, attr in (("INSTRUME", "instrument"), ("TELESCOP", "telescope")):
        values = {getattr(f, attr) for f in frames}
        if len(values) == 1 and None not in values:
            cards[key] = values.pop()
    values = {str((getattr(f, "headers", None) or {}).get("FOCALLEN")) for f in frames}
    if len(values) == 1 and values != {"None"}:
        cards["FOCALLEN"] = values.pop()
    return cards


def read_ahead(cards: Mapping[str, object], paths: Sequence[Path], job_id: Optional[str] = None) -> Optional[ReadAhead]:
    """The first comparable master of `paths` (candidates()), binned at its own size, for a
    thread to read while the new master is stacked; None when there is none or it cannot
    be read (check_previous then says why)."""
    from flatd.ingest.frames import read_frame

    for path in _comparable(paths, cards, job_id):
        try:
            stamp = _stamp(path)
            frame = read_frame(path)
            shape = (frame.height, frame.width)
            if binning_for(shape) == 1:
                return None  # small: read whole when compared
            binned = read_binned(path, shape)
            return ReadAhead(path, stamp, binned) if _stamp(path) == stamp else None
        except Exception:  # noqa: BLE001 - check_previous reads it again and says why
            return None
    return None


def check_previous(master: np.ndarray, cards: Mapping[str, object], output_dir: Optional[Path], ledger=None,
                   job_id: Optional[str] = None, limits=None, ahead: Optional[ReadAhead] = None,
                   paths: Optional[Sequence[Path]] = None, binned: Optional[Binned] = None) -> PreviousCheck:
    """Find the newest usable previous master of the same setup and compare with it
    (`paths`: the candidates, if already listed; `ahead`: one read ahead; `binned`: the
    master's binned_master, when already made). Unusable ones
    (another size, unreadable, truncated, no data, NaN) are skipped with the reason;
    earlier bad (QCSTATUS) masters and other setups are passed over quietly."""
    check = PreviousCheck()
    tries = 0
    for path in _comparable(candidates(output_dir, ledger, job_id) if paths is None else paths, cards, job_id):
        tries += 1
        try:
            check.comparison = compare_with_file(master, path, limits, _ahead_for(ahead, path, np.shape(master)),
                                                 binned)
        except (ValueError, MemoryError) as exc:
            check.skipped.append(f"{path.name}: {exc}")
            if tries >= MAX_TRIES:
                break
            continue
        check.path = path
        break
    return check


def _ahead_for(ahead: Optional[ReadAhead], path: Path, shape) -> Optional[Binned]:
    """The read-ahead's binned pixels if they are of `path`, unchanged, and of `shape`."""
    if ahead is None or ahead.path != path or ahead.binned.shape != tuple(shape):
        return None
    try:
        return ahead.binned if _stamp(path) == ahead.stamp else None
    except OSError:
        return None


def compare_with_file(master: np.ndarray, path: Path, limits=None, old: Optional[Binned] = None,
                      new: Optional[Binned] = None) -> Comparison:
    """The comparison of a master in memory with a master file: binned as it is read
    (read_binned; `old`: already read so; `new`: the master's binned_master, if made)
    when the ratio is binned and both are finite and positive throughout, else from the
    whole file (load_master). ValueError with the reason."""
    settings = _settings(limits)
    if binning_for(np.shape(master)) > 1:
        old = old if old is not None else read_binned(path, np.shape(master))
        if old.positive:
            new = new if new is not None and new.shape == np.shape(master) else binned_master(master)
            if new.positive:
                return compare(new, old, **settings)
    _, pixels = load_master(path)
    return compare(master, pixels, **settings)


def _settings(limits) -> dict:
    if limits is None:
        return {}
    return {"sigma": limits.previous_sigma, "min_depth": limits.dust_min_depth, "scale": limits.dust_scale}
