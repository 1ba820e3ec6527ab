"""What a method rejects from clean data: the baseline `combine.rejection_warn` is measured from.

Robust rejections reject a fraction of perfectly clean data by construction (sigma 2
about 3-4.5 % of Gaussian values from 8 frames, esd and winsorized 0.6-2.2 % at 5 to 7
frames, min/max clip n exactly 2n of N), and how much depends on the number of frames. The baseline is that
fraction, measured rather than derived (and, from the same combine, the method's noise
against a plain mean's, for the master checks): the same method, with the same parameters, on a
seeded stack of pure Gaussian noise columns of the same N (level 10000, sigma 100,
float32, 20,000 columns; fewer above 20 frames, at most 400,000 values) through
:func:`flatd.stack.combine.combine`. Cached per (method, N): 1 to 10 milliseconds, once.

The frames of the noise stack are exchangeable, so one input's expected share of
rejected values is the same fraction: the baseline serves the master and each input.

numpy and the combine kernels (flatd.stack.combine): the runner imports this module
only where a master is made, never in a dry run.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from flatd.stack import combine as C
from flatd.stack.methods import Method

LEVEL = 10000.0
SIGMA = 100.0
COLUMNS = 20000  # pixel columns of N values each
MAX_VALUES = 400_000  # fewer columns above 20 frames: the cost stays bounded
MIN_COLUMNS = 2000
ROWS = 8  # the columns as ROWS rows of the noise image
SEED = 20261202


@dataclass(frozen=True)
class Baseline:
    """The fractions of all values of a clean stack the method rejected low and high."""

    low: float
    high: float
    n: int  # frames
    values: int  # values simulated (n x columns)
    noise_factor: float = 1.0  # the combined columns' spread over a plain mean's (SIGMA / sqrt n)

    @property
    def total(self) -> float:
        return self.low + self.high


def columns_for(n: int) -> int:
    """How many noise columns a stack of n frames gets."""
    return max(MIN_COLUMNS, min(COLUMNS, MAX_VALUES // max(n, 1))) // ROWS * ROWS


def noise_stack(n: int) -> np.ndarray:
    """The seeded clean stack of n frames: float32 (n, ROWS, columns_for(n) / ROWS),
    Gaussian around LEVEL with SIGMA; the same for the same n."""
    rng = np.random.default_rng([SEED, n])
    cols = columns_for(n)
    stack = rng.standard_normal((n, ROWS, cols // ROWS), dtype=np.float32)
    stack *= np.float32(SIGMA)
    stack += np.float32(LEVEL)
    return stack


@lru_cache(maxsize=128)
def baseline(method: Method, n: int) -> Baseline:
    """What `method` (with its parameters) rejects from clean Gaussian columns of n frames.
    ValueError when n < 1."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"a baseline needs a whole number of frames >= 1, got {n!r}")
    stack = noise_stack(n)
    counts = np.zeros((n, 2), dtype=np.int64)
    out = C.combine(stack, method, workers=1, frame_counts=counts)
    low, high = (int(x) for x in counts.sum(axis=0))
    total = stack.size
    spread = float(np.std(np.asarray(out, dtype=np.float64)))
    return Baseline(low / total, high / total, n, total, spread / (SIGMA / n ** 0.5) if spread > 0 else 1.0)
