"""Checks on each master: its figures and a verdict, good, warn or bad, with reasons.

Pure: gets the master's pixels, the engine's figures (flatd.stack.engines.StackResult)
and the rejection (flatd.runner.Rejection); reads no file. The figures:

- **noise**: the master's pixel-scale noise (robust spread of the relative differences of
  same-colour neighbours, on the rows the engine kept of its first inputs) against what
  the inputs predict: their photon noise (gain: EGAIN when every input has the same, else
  photon transfer from the difference of two inputs), combined over the N frames by the
  method's own noise factor at N (measured like flatd.stack.baseline), plus the inputs'
  fixed pattern (pixel response non-uniformity: a single input's neighbour noise minus
  its photon part), which the master keeps whatever N;
- **rejection**: the fractions rejected low and high, above what the method rejects
  from clean data of N frames (flatd.stack.baseline);
- **pixels**: the counts of non-finite, zero (<= 0) and saturated pixels;
- **field**: the brightest-to-darkest ratio of the master's blocks (99th / 1st percentile
  of block means), robust to dust and single pixels;
- **previous**: the comparison with the previous master (flatd.qc.previous), when found.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

GOOD, WARN, BAD = "good", "warn", "bad"
_RANK = {GOOD: 0, WARN: 1, BAD: 2}
MAD_SIGMA = 1.4826
# A master pixel at or above this fraction of the inputs' full scale (times the smallest
# normalization factor) counts as saturated: a pedestal or dark leaves it a little below.
SATURATION_FRACTION = 0.98


@dataclass(frozen=True)
class Noise:
    """Relative pixel-scale noise of the master: measured, predicted, and their parts."""

    measured: float
    predicted: float  # sqrt(photon**2 + pattern**2)
    photon: float  # the inputs' photon noise combined by the method at N
    pattern: float  # the inputs' fixed pattern at pixel scale (kept by any master)
    gain: float  # e-/ADU used
    gain_source: str  # "EGAIN" | "photon transfer"

    @property
    def ratio(self) -> float:
        return self.measured / self.predicted if self.predicted > 0 else math.inf


@dataclass
class MasterQC:
    """A master's figures, its verdict (`status`) and the reasons for it."""

    status: str = GOOD
    reasons: list[str] = field(default_factory=list)
    pixels: int = 0
    nonfinite: int = 0
    zero: int = 0
    saturated: int = 0
    field_ratio: Optional[float] = None
    noise: Optional[Noise] = None
    rejected_low: Optional[float] = None
    rejected_high: Optional[float] = None
    rejection_baseline: Optional[float] = None
    previous: Any = None  # flatd.qc.previous.PreviousCheck
    notes: list[str] = field(default_factory=list)  # not reasons: said, never judged

    def judge(self, status: str, reason: str) -> None:
        """Add a reason; the verdict is the worst of them."""
        self.reasons.append(reason)
        if _RANK[status] > _RANK[self.status]:
            self.status = status

    @property
    def summary(self) -> str:
        return self.status if not self.reasons else f"{self.status}: " + "; ".join(self.reasons)

    def cards(self) -> dict[str, tuple[object, str]]:
        """Header cards: QCSTATUS and the figures (only those measured)."""
        out: dict[str, tuple[object, str]] = {"QCSTATUS": (self.status, "flatd master check: good, warn or bad")}
        if self.noise is not None:
            out["QCNOISE"] = (_round(self.noise.measured), "relative pixel-scale noise of the master")
            out["QCNOISEP"] = (_round(self.noise.predicted), "predicted: inputs' photon noise and pattern")
            out["QCNOISEX"] = (_round(self.noise.ratio), "noise measured / predicted")
            out["QCGAIN"] = (_round(self.noise.gain), f"[e-/ADU] {self.noise.gain_source}")
        if self.rejected_low is not None:
            out["QCREJLO"] = (_round(self.rejected_low), "fraction of values rejected low")
            out["QCREJHI"] = (_round(self.rejected_high), "fraction of values rejected high")
        if self.rejection_baseline is not None:
            out["QCREJBAS"] = (_round(self.rejection_baseline), "what the method rejects from clean data")
        out["QCNONFIN"] = (self.nonfinite, "non-finite pixels")
        out["QCZERO"] = (self.zero, "pixels <= 0")
        out["QCSAT"] = (self.saturated, "saturated pixels")
        if self.field_ratio is not None:
            out["QCFIELD"] = (_round(self.field_ratio), "brightest / darkest block (99th / 1st pct)")
        if self.previous is not None:
            out.update(self.previous.cards())
        return out

    def history(self) -> list[str]:
        """HISTORY lines: the reasons, the notes, then the dust blobs."""
        lines = [f"QC {self.status}: {r}" for r in self.reasons] + [f"QC note: {n}" for n in self.notes]
        if self.previous is not None:
            lines += self.previous.history()
        return lines


def _round(value: float) -> float:
    return float(f"{value:.5g}") if math.isfinite(value) else -1.0


# --------------------------------------------------------------------------- noise


def second_difference(image: np.ndarray, stride: int, keep_shape: bool = False) -> np.ndarray:
    """Relative second differences of same-colour horizontal neighbours (`stride` 2 on a
    colour mosaic): (2 b - a - c) / mean(a, b, c), where all three are finite and
    positive (a slope cancels), flat; `keep_shape`: NaN elsewhere, as an image. Its
    variance is 6 times a pixel's white part."""
    img = np.asarray(image, dtype=np.float32)  # relative differences of some 1e-2: float32 holds them to 1e-7
    if img.shape[1] <= 2 * stride:
        return np.empty((img.shape[0], 0)) if keep_shape else np.empty(0)
    a, b, c = img[:, : -2 * stride], img[:, stride:-stride], img[:, 2 * stride:]
    with np.errstate(all="ignore"):
        d = 3 * (2 * b - a - c) / (a + b + c)
        ok = np.isfinite(d) & (a > 0) & (b > 0) & (c > 0)
    return np.where(ok, d, np.nan) if keep_shape else d[ok]


def common_pattern2(a: np.ndarray, b: np.ndarray, stride: int = 1) -> float:
    """The relative variance of the pixel-scale pattern two frames share (PRNU): the
    covariance of their second differences over 6 (their photon noise is independent)."""
    da, db = second_difference(a, stride, True), second_difference(b, stride, True)
    ok = np.isfinite(da) & np.isfinite(db)
    if not ok.any():
        return math.nan
    x, y = da[ok], db[ok]
    spread = 5 * math.sqrt(robust_var(x) + robust_var(y))  # cosmic rays, hot edges: not the pattern
    keep = (np.abs(x) < spread) & (np.abs(y) < spread)
    return float(np.mean(x[keep] * y[keep]) / 6) if keep.any() else math.nan


# Robust figures from at most about this many values, evenly spread (the MAD to 0.5 %).
ROBUST_VALUES = 100_000


def _spread_sample(values: np.ndarray) -> np.ndarray:
    values = values.ravel()
    step = values.size // ROBUST_VALUES
    return values[::step] if step > 1 else values


def robust_var(values: np.ndarray) -> float:
    """(1.4826 MAD)**2: the variance of the Gaussian part (of at most about
    ROBUST_VALUES of the values); NaN when empty."""
    if values.size == 0:
        return math.nan
    values = _spread_sample(values)
    med = np.median(values)
    return float((MAD_SIGMA * np.median(np.abs(values - med))) ** 2)


def pixel_noise2(image: np.ndarray, stride: int = 1) -> float:
    """The relative variance of a pixel's white (pixel-to-pixel) part: a sixth of the
    robust variance of the relative second differences of same-colour neighbours."""
    return robust_var(second_difference(image, stride)) / 6


def pair_noise2(a: np.ndarray, b: np.ndarray, stride: int = 1, levels: Optional[tuple[float, float]] = None) -> float:
    """v_a + v_b: the summed relative photon variances of two frames of the same pattern,
    from the neighbour differences of their relative difference (pattern, vignetting and
    slow gradients cancel). `levels`: their _median_level, when known."""
    la, lb = levels or (_median_level(a), _median_level(b))
    x, y = a / la, b / lb
    with np.errstate(divide="ignore", invalid="ignore"):
        q = 2 * (x - y) / (x + y)
    q = np.where(np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0), q, np.nan)
    if q.shape[1] <= 2 * stride:
        return math.nan
    d = (2 * q[:, stride:-stride] - q[:, : -2 * stride] - q[:, 2 * stride:]).ravel()
    return robust_var(d[np.isfinite(d)]) / 6


def _median_level(patch: np.ndarray) -> float:
    patch = _spread_sample(patch)
    values = patch[np.isfinite(patch) & (patch > 0)]
    return float(np.median(values)) if values.size else math.nan


def method_noise_factor(method, n: int) -> float:
    """The method's noise at N frames relative to a plain mean's (1 for a mean, about
    1.2 for a median): measured on flatd.stack.baseline's clean Gaussian stack, by the
    same (cached) combine that gives the method's clean rejection baseline."""
    from flatd.stack import baseline as B

    try:
        return B.baseline(method, n).noise_factor
    except Exception:  # noqa: BLE001 - a method that cannot combine n: the mean's factor
        return 1.0


def common_egain(frames: Sequence) -> Optional[float]:
    """EGAIN (e-/ADU) when every input has the same positive one; else None."""
    values = set()
    for frame in frames:
        value = (getattr(frame, "headers", None) or {}).get("EGAIN")
        try:
            value = float(value)
        except (TypeError, ValueError):
            return None
        if not (math.isfinite(value) and value > 0):
            return None
        values.add(round(value, 6))
    return values.pop() if len(values) == 1 else None


def noise_figures(master: np.ndarray, patches: Optional[np.ndarray], rows: Optional[tuple[int, int]],
                  levels: Sequence[float], n: int, stride: int = 1, egain: Optional[float] = None,
                  method_factor: float = 1.0) -> Optional[Noise]:
    """The master's noise on `rows` against the prediction from the inputs' `patches`
    (the same rows of the first k >= 2 inputs, calibrated: StackResult.noise_patches).
    None when there is nothing to measure."""
    if patches is None or rows is None or len(patches) < 2 or n < 1:
        return None
    k = len(patches) // 2 * 2
    medians = [_median_level(p) for p in patches[:k]]
    if not all(math.isfinite(m) and m > 0 for m in medians):
        return None
    gains, shared = [], []
    for i in range(0, k, 2):
        v = pair_noise2(patches[i], patches[i + 1], stride, (medians[i], medians[i + 1]))
        if not (math.isfinite(v) and v > 0):
            continue
        gains.append((1 / medians[i] + 1 / medians[i + 1]) / v)
        shared.append(common_pattern2(patches[i], patches[i + 1], stride))
    if not gains:
        return None
    gain, source = (egain, "EGAIN") if egain else (float(np.median(gains)), "photon transfer")
    pattern2 = max(0.0, float(np.nanmean(shared))) if np.isfinite(shared).any() else 0.0
    centre = _central_levels(medians[0], levels, n)
    photon2 = method_factor ** 2 * sum(1 / (gain * c) for c in centre) / n ** 2
    r0, r1 = rows
    measured2 = pixel_noise2(master[r0:r1], stride)
    if not math.isfinite(measured2):
        return None
    return Noise(math.sqrt(max(measured2, 0.0)), math.sqrt(photon2 + pattern2), math.sqrt(photon2),
                 math.sqrt(pattern2), gain, source)


def _central_levels(first: float, levels: Sequence[float], n: int) -> list[float]:
    """Each input's level on the noise rows, in ADU: the first input's, scaled by the
    engine's relative levels (all the first's when the levels were not measured)."""
    levels = [float(x) for x in levels][:n]
    if len(levels) != n or not all(math.isfinite(x) and x > 0 for x in levels):
        return [first] * n
    return [first * x / levels[0] for x in levels]


# --------------------------------------------------------------------------- pixels and field


def full_scale(frames: Sequence) -> float:
    """The inputs' full scale: the smallest DATAMAX or SATURATE, else the bit depth's
    largest value (8 or 16 bit), else 65535."""
    scales = []
    for frame in frames:
        headers = getattr(frame, "headers", None) or {}
        value = None
        for key in ("DATAMAX", "SATURATE"):
            try:
                value = float(headers.get(key))
            except (TypeError, ValueError):
                continue
            if math.isfinite(value) and value > 0:
                break
            value = None
        if value is None:
            value = 255.0 if getattr(frame, "bitpix", 16) == 8 else 65535.0
        scales.append(value)
    return min(scales) if scales else 65535.0


def saturation_limit(frames: Sequence, factors: Sequence[float] = ()) -> Optional[float]:
    """The master's value at and above which a pixel counts as saturated: SATURATION_FRACTION
    of the inputs' full scale, times the smallest normalization factor; None without frames."""
    return SATURATION_FRACTION * full_scale(frames) * min(factors or [1.0]) if frames else None


def pixel_counts(master: np.ndarray, saturation: Optional[float],
                 extremes: Optional[tuple[float, float]] = None) -> tuple[int, int, int]:
    """(non-finite, <= 0, >= saturation) pixels of the master (`extremes`: its
    _extremes, when known)."""
    low, high = extremes or _extremes(master)
    if low > 0 and math.isfinite(high) and not (saturation and high >= saturation):
        return 0, 0, 0  # the usual master: two reductions tell, no full-size temporaries
    finite = np.isfinite(master)
    nonfinite = int(master.size - np.count_nonzero(finite))
    values = master[finite] if nonfinite else master
    zero = int(np.count_nonzero(values <= 0))
    saturated = int(np.count_nonzero(values >= saturation)) if saturation else 0
    return nonfinite, zero, saturated


def _extremes(image: np.ndarray) -> tuple[float, float]:
    """(min, max) of the image; NaN when it holds a NaN."""
    if image.size == 0:
        return math.nan, math.nan
    return float(np.min(image)), float(np.max(image))


def block_means(image: np.ndarray, blocks: int = 16, extremes: Optional[tuple[float, float]] = None) -> np.ndarray:
    """Means of about `blocks` x `blocks` blocks (finite positive pixels; NaN when none)."""
    h, w = image.shape
    by, bx = max(1, h // blocks), max(1, w // blocks)
    ny, nx = h // by, w // bx
    low, high = extremes or _extremes(image)
    if low > 0 and math.isfinite(high):  # every pixel counts: sums of rows, then of columns
        rows = image[: ny * by].reshape(ny, by, w).sum(axis=1, dtype=np.float64)
        return rows[:, : nx * bx].reshape(ny, nx, bx).sum(axis=2) / (by * bx)
    cut = image[: ny * by, : nx * bx].reshape(ny, by, nx, bx)
    with np.errstate(invalid="ignore"):
        good = np.isfinite(cut) & (cut > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(good, cut, 0).sum(axis=(1, 3), dtype=np.float64) / good.sum(axis=(1, 3))


def field_ratio(image: np.ndarray, extremes: Optional[tuple[float, float]] = None) -> Optional[float]:
    """Brightest-to-darkest: 99th over 1st percentile of the block means; None when it
    cannot be told (too few positive blocks)."""
    return _spread_of_means(block_means(image, extremes=extremes))


def binned_block_means(binned, shape: tuple[int, int], blocks: int = 16) -> np.ndarray:
    """block_means of a master of `shape` from its binned sums (flatd.qc.previous.Binned,
    every pixel finite and positive): the same blocks, their edges on the nearest bin
    edges (within half a bin; the pixels of a last, partial bin left out)."""
    sums = binned.total().astype(np.float64)
    b = binned.binning
    edges = []
    for size, bins in zip(shape, sums.shape):
        side = max(1, size // blocks)
        cut = np.unique(np.clip(np.round(np.arange(size // side + 1) * side / b), 0, bins).astype(int))
        edges.append(cut if cut.size >= 2 else np.array([0, bins]))
    (ry, rx) = edges
    total = np.add.reduceat(np.add.reduceat(sums[: ry[-1], : rx[-1]], ry[:-1], axis=0), rx[:-1], axis=1)
    return total / (np.outer(np.diff(ry), np.diff(rx)) * b * b)


def _spread_of_means(means: np.ndarray) -> Optional[float]:
    means = means[np.isfinite(means) & (means > 0)]
    if means.size < 4:
        return None
    low, high = np.percentile(means, [1, 99])
    return float(high / low) if low > 0 else None


# --------------------------------------------------------------------------- verdict


def check_master(master: np.ndarray, limits, *, frames: Sequence = (), method=None, levels: Sequence[float] = (),
                 factors: Sequence[float] = (), patches: Optional[np.ndarray] = None,
                 noise_rows: Optional[tuple[int, int]] = None, colour: bool = False,
                 rejection=None, baseline: Optional[float] = None, previous=None) -> MasterQC:
    """Every figure of a master and the verdict. `limits`: the rules' quality section
    (flatd.config.Quality); `rejection`: flatd.runner.Rejection (None: not counted);
    `baseline`: clean data's rejected fraction for the method at N (else the rejection's);
    `previous`: a flatd.qc.previous.PreviousCheck."""
    qc = measure_master(master, frames=frames, method=method, levels=levels, factors=factors, patches=patches,
                        noise_rows=noise_rows, colour=colour, rejection=rejection, baseline=baseline)
    qc.previous = previous
    judge(qc, limits)
    return qc


def measure_master(master: np.ndarray, *, frames: Sequence = (), method=None, levels: Sequence[float] = (),
                   factors: Sequence[float] = (), patches: Optional[np.ndarray] = None,
                   noise_rows: Optional[tuple[int, int]] = None, colour: bool = False,
                   rejection=None, baseline: Optional[float] = None, binned=None) -> MasterQC:
    """check_master's figures, with no previous master and no verdict yet (the runner
    compares with the previous master meanwhile, then judges). `binned`: the master's
    flatd.qc.previous.binned_master with saturation_limit, when made: its pass stands in
    for the pixel counts' and the field blocks'."""
    qc = MasterQC(pixels=int(master.size))
    n = len(frames) or len(levels) or 1
    threshold = saturation_limit(frames, factors)
    if binned is not None and binned.below_limit and binned.shape == master.shape \
            and binned.limit == (threshold or math.inf):  # the binning's pass said: no pixel to count
        qc.nonfinite = qc.zero = qc.saturated = 0
        qc.field_ratio = _spread_of_means(binned_block_means(binned, master.shape))
    else:
        extremes = _extremes(master)  # one pair of reductions for both
        qc.nonfinite, qc.zero, qc.saturated = pixel_counts(master, threshold, extremes)
        qc.field_ratio = field_ratio(master, extremes)
    factor = method_noise_factor(method, n) if method is not None else 1.0
    qc.noise = noise_figures(master, patches, noise_rows, levels, n, 2 if colour else 1,
                             common_egain(frames), factor)
    if rejection is not None:
        qc.rejected_low, qc.rejected_high = rejection.low, rejection.high
        qc.rejection_baseline = baseline if baseline is not None else rejection.baseline
    return qc


def judge(qc: MasterQC, limits) -> None:
    """The verdict from the figures, by the quality section's limits."""
    _judge_pixels(qc, limits)
    _judge_level(qc, "noise", qc.noise.ratio if qc.noise else None, limits.noise_warn, limits.noise_bad,
                 lambda v: f"noise {v:.2f} x the predicted ({_pct(qc.noise.measured)} against "
                           f"{_pct(qc.noise.predicted)})")
    if qc.rejected_low is not None:
        excess = qc.rejected_low + qc.rejected_high - (qc.rejection_baseline or 0.0)
        _judge_level(qc, "rejection", excess, limits.master_rejection_warn, limits.master_rejection_bad,
                     lambda v: f"rejected {_pct(qc.rejected_low + qc.rejected_high)} of all values "
                               f"({_pct(v)} above clean data's {_pct(qc.rejection_baseline or 0.0)})")
    _judge_level(qc, "field", qc.field_ratio, limits.field_warn, limits.field_bad,
                 lambda v: f"field brightest/darkest {v:.2f}")
    if qc.previous is not None:
        for status, reason in qc.previous.judge(limits):
            qc.judge(status, reason)


def _judge_pixels(qc: MasterQC, limits) -> None:
    if qc.nonfinite:
        qc.judge(BAD, f"{qc.nonfinite} non-finite pixel(s)")
    size = max(qc.pixels, 1)
    for count, what, warn, bad in ((qc.zero, "pixel(s) <= 0", limits.zero_warn, limits.zero_bad),
                                   (qc.saturated, "saturated pixel(s)", limits.saturated_warn,
                                    limits.saturated_bad)):
        _judge_level(qc, what, count / size, warn, bad, lambda v, c=count, w=what: f"{c} {w} ({_pct(v)})")


def _judge_level(qc: MasterQC, what: str, value: Optional[float], warn: Optional[float], bad: Optional[float],
                 text) -> None:
    """bad above `bad`, warn above `warn` (None: never)."""
    if value is None or not math.isfinite(value):
        return
    if bad is not None and value > bad:
        qc.judge(BAD, text(value))
    elif warn is not None and value > warn:
        qc.judge(WARN, text(value))


def _pct(fraction: float) -> str:
    value = 100.0 * float(fraction)
    return f"{value:.3g} %" if value >= 0.01 or value == 0 else f"{value:.2g} %"
