"""The local engine: a group of flats streamed through calibration and combine, in row bands.

Two passes over the files:

1. (levels) every input's level is measured on the sample grid of
   :mod:`flatd.stack.levels` (a dense grid over the whole frame, read a few rows at a
   time), after its calibration, by its robust estimator; with multiplicative
   normalization the factors follow.
2. (bands) the image is cut into bands of rows; a worker thread fills a float32
   (N, rows, W) stack from each file's band (BZERO/BSCALE, minus the dark, bias or
   pedestal, clipped to [0, 65535] when something was subtracted, times the factor),
   combines it, counting the values each frame had rejected low and high (and, with
   `rejection_map`, per pixel), and writes the rows into the output image. `workers`
   bands are in flight at once; the band height follows from the memory limit.

Pixels are read by :mod:`flatd.stack.pixels`.
"""

from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Sequence

import numpy as np

from flatd.stack import levels as LV
from flatd.stack.combine import check_level, combine_rows_into, default_workers, normalization_factors
from flatd.stack.engines import ProgressFactory, StackResult
from flatd.errors import StackError
from flatd.ingest.frames import Frame
from flatd.jobs import StackInput
from flatd.stack.geometry import Layouts
from flatd.stack.pixels import PixelSource, open_pixels

if TYPE_CHECKING:  # pragma: no cover
    from flatd.stack.methods import Method
    from flatd.config import Engine as EngineSettings
    from flatd.jobs import Job

DEFAULT_MEMORY_LIMIT = 512 * 2**20
# Memory not in any accounted buffer (numba scratch, Python objects; level samples of small frames).
RESERVE_BYTES = 4 * 2**20
# Band height cap: beyond this, bigger bands only cost cache and parallelism.
MAX_BAND_ROWS = 32


class LocalEngine:
    """The streaming stacker in this process, within `settings.memory_limit`."""

    def __init__(self, settings: "EngineSettings", progress: Optional[ProgressFactory] = None):
        self.settings = settings
        self.progress = progress

    def stack(self, job: "Job") -> StackResult:
        progress = self.progress(job.label, job.frames[0].height) if self.progress else None
        return stack_frames(job.inputs, job.method, job.normalize, self.settings.memory_limit,
                            self.settings.workers, progress, rejection_map=getattr(job, "rejection_map", False),
                            overscan=getattr(job, "overscan", "auto"))


# --------------------------------------------------------------------------- stacking


def _shape_text(frame: Frame, layouts: Optional[Layouts] = None) -> str:
    width, height = layouts.size(frame) if layouts is not None else (frame.width, frame.height)
    return f"{width}x{height}"


def _validate(inputs: Sequence[StackInput], method: Method, layouts: Optional[Layouts] = None) -> None:
    """The inputs can be stacked: enough of them, one size as presented (`layouts`:
    flipped, trimmed), calibrations that make sense."""
    if not inputs:
        raise StackError("no frames to stack")
    if len(inputs) < method.min_frames:
        raise StackError(f"{method.description} needs at least {method.min_frames} frames, got {len(inputs)}")
    first = inputs[0].frame
    shape = _shape_text(first, layouts)
    note = layouts.note if layouts is not None else (lambda frame: "")
    for item in inputs:
        frame = item.frame
        if _shape_text(frame, layouts) != shape:
            raise StackError(
                f"flat {frame.path} is {_shape_text(frame, layouts)}{note(frame)} but flats are {shape} "
                f"(as {first.path}{note(first)})",
                frame.path,
            )
        cal = item.calibration
        if cal.mode == "file":
            if cal.frame is None:
                raise StackError(f"flat {frame.path}: calibration mode 'file' without a frame", frame.path)
            if _shape_text(cal.frame, layouts) != shape:
                word = "bias" if cal.frame.kind.value == "bias" else "dark"
                raise StackError(
                    f"{word} {cal.frame.path} is {_shape_text(cal.frame, layouts)}{note(cal.frame)} "
                    f"but flats are {shape}{note(first)}",
                    cal.frame.path,
                )
        elif cal.mode == "pedestal":
            if not math.isfinite(float(cal.pedestal)):
                raise StackError(f"flat {frame.path}: pedestal {cal.pedestal} is not a number", frame.path)
        elif cal.mode != "none":
            raise StackError(f"flat {frame.path}: unknown calibration mode {cal.mode!r}", frame.path)


def plan_bands(n: int, n_cal: int, width: int, height: int, memory_limit: int, workers: int,
               max_itemsize: int = 8, rejection_map: bool = False,
               raw_width: Optional[int] = None) -> tuple[int, int]:
    """(band_rows, workers) so that the buffers fit in `memory_limit`.

    Per worker and per row of band: the float32 stack N*W*4, each calibration band
    W*4, the raw read buffer W*itemsize and a conversion temporary W*8 (with
    `rejection_map`, the band's (2, rows, W) uint16 counts W*4). Fixed: the output
    image H*W*4, with `rejection_map` the (2, H, W) uint16 map H*W*4 more, and a small
    reserve. (The level phase runs before any of these exist and is planned
    apart: level_plan.) `raw_width`: the stored width when frames are trimmed (the raw
    buffer and the conversion temporary hold whole stored rows).
    """
    raw_width = max(width, raw_width or 0)
    per_row = width * (4 * (n + n_cal) + (4 if rejection_map else 0)) + raw_width * (max_itemsize + 8)
    fixed = height * width * 4 * (2 if rejection_map else 1)
    budget = memory_limit - fixed - RESERVE_BYTES
    workers = max(1, min(workers, height))
    rows = budget // (per_row * workers) if budget > 0 else 0
    if rows < 1:
        workers = 1
        rows = budget // per_row if budget > 0 else 0
    if rows < 1:
        need = fixed + RESERVE_BYTES + per_row
        raise StackError(
            f"memory limit {memory_limit / 2**20:.1f} MiB is too small to stack {n} frames of "
            f"{width}x{height}" + (" with a rejection map" if rejection_map else "")
            + f": at least {need / 2**20:.1f} MiB are needed"
        )
    rows = min(rows, MAX_BAND_ROWS, height)
    # enough bands that every worker has work
    if workers > 1 and height // rows < 2 * workers:
        rows = max(1, -(-height // (2 * workers)))
    return int(rows), int(workers)


# Rows of the level sample read at a time, per worker.
LEVEL_CHUNK_ROWS = 8


def level_bytes(width: int, height: int, step: int, max_itemsize: int = 8) -> int:
    """Memory one worker needs to measure one frame's level on the grid of `step`: the
    grid, robust_level's work arrays, and the row chunk it is read through."""
    return LV.sample_bytes(height, width, step) + LEVEL_CHUNK_ROWS * width * (max_itemsize + 4)


def level_plan(width: int, height: int, memory_limit: int, workers: int, max_itemsize: int = 8,
               n: int = 1, raw_width: Optional[int] = None, odd: bool = False) -> tuple[int, int]:
    """(grid step, workers) for the level phase: the step of flatd.stack.levels (at least
    LEVEL_SAMPLE pixels) unless the memory limit asks for a coarser grid. Held at once:
    one calibration grid, and per worker level_bytes. Nothing else is allocated then, so
    the budget is the whole limit but half the reserve (the level sample was the
    reserve's to hold before it was planned: samples of small frames still fit there).
    The samples of all `n` frames are held together (levels are relative). `raw_width`:
    the stored width when frames are trimmed (rows are read whole). `odd`: an odd step,
    for a colour (CFA) sensor, so that the grid samples every colour of the mosaic (an
    even step lands on one colour only, and the level would be that colour's)."""
    budget = memory_limit - RESERVE_BYTES // 2
    step = LV.grid_step(height, width)
    if odd and step % 2 == 0:
        step -= 1  # finer: still at least LEVEL_SAMPLE pixels
    workers = max(1, workers)

    def need(step: int, workers: int) -> int:
        rows, cols = LV.sample_shape(height, width, step)
        # every frame's sample (n of them), the reference, one calibration grid, and per worker its work
        return ((n + 1) * rows * cols * 4 + LV.reference_bytes(n)
                + workers * (level_bytes(max(width, raw_width or 0), height, step, max_itemsize)
                             + 2 * LV.MODE_SAMPLE * 4))

    while need(step, workers) > budget and workers > 1:
        workers -= 1
    while need(step, workers) > budget and step < max(height, width):
        step += 2 if odd else 1
    return step, workers


class _Sources:
    """Every file opened once: flats, and each distinct calibration file, as `layouts`
    presents them (flipped, trimmed; as stored without)."""

    def __init__(self, inputs: Sequence[StackInput], layouts: Optional[Layouts] = None):
        self.flats: list[PixelSource] = []
        self.cals: dict[Path, PixelSource] = {}
        opener = layouts.open if layouts is not None and not layouts.plain else open_pixels
        try:
            for item in inputs:
                self.flats.append(opener(item.frame))
                cal = item.calibration
                if cal.mode == "file":
                    key = Path(os.path.abspath(cal.frame.path))
                    if key not in self.cals:
                        self.cals[key] = opener(cal.frame)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for src in self.flats:
            src.close()
        for src in self.cals.values():
            src.close()


def _raise_fd_limit(needed: int) -> None:
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = needed + 256
        if soft != resource.RLIM_INFINITY and soft < want:
            new = want if hard == resource.RLIM_INFINITY else min(hard, want)
            if new > soft:
                resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    except (ImportError, ValueError, OSError):
        pass


def stack_frames(
    inputs: Sequence[StackInput],
    method: Method,
    normalize: str = "multiplicative",
    memory_limit: int = DEFAULT_MEMORY_LIMIT,
    workers: Optional[int] = None,
    progress: Optional[Callable[[int, int], None]] = None,
    rejection_map: bool = False,
    overscan: str = "auto",
) -> StackResult:
    """Calibrate, normalize and combine `inputs` band by band within `memory_limit`.

    Equals flatd.stack.combine.Combiner on the whole stack (to float rounding). With
    "multiplicative" normalization each input's level is measured (a level <= 0 is an
    error naming the file); with "none" nothing uses them and the level pass is skipped
    (the result's levels are NaN). The result holds, per input, the values
    rejected low and high (`rejected`, int64 (N, 2)), and with `rejection_map` the
    per-pixel counts (uint16 (2, H, W): low, high), counted in the memory limit.
    Frames are presented by flatd.stack.geometry: a calibration frame of another row
    order flipped; with `overscan` 'auto', frames with BIASSEC and TRIMSEC/DATASEC
    overscan-subtracted and trimmed (the master has the trimmed size).
    """
    if normalize not in ("none", "multiplicative"):
        raise StackError(f"normalize is 'none' or 'multiplicative', got {normalize!r}")
    inputs = list(inputs)
    layouts = Layouts(inputs, overscan)
    _warn_unusable_sections(layouts)
    _validate(inputs, method, layouts)
    n = len(inputs)
    width, height = layouts.size(inputs[0].frame)
    workers = int(workers or default_workers())
    _raise_fd_limit(2 * n)

    sources = _Sources(inputs, layouts)
    try:
        cal_keys = [
            Path(os.path.abspath(item.calibration.frame.path)) if item.calibration.mode == "file" else None
            for item in inputs
        ]
        itemsizes = [s.itemsize for s in sources.flats] + [s.itemsize for s in sources.cals.values()]
        raw_width = max(f.width for f in (*layouts.flats, *layouts.cals.values()))
        band_rows, band_workers = plan_bands(n, len(sources.cals), width, height, int(memory_limit), workers,
                                             max(itemsizes), rejection_map, raw_width)
        step, level_workers = level_plan(width, height, int(memory_limit), band_workers, max(itemsizes), n,
                                         raw_width, odd=any(item.frame.bayer_pattern for item in inputs))
        workers = band_workers
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="flatd-stack") if workers > 1 else None
        try:
            levels = [math.nan] * n
            if normalize == "multiplicative":
                # fewer workers than the bands (a tight memory limit): one frame at a time
                levels = _measure_levels(inputs, sources, cal_keys, step,
                                         pool if level_workers >= workers else None)
                for item, level in zip(inputs, levels):
                    problem = check_level(level)
                    if problem:
                        raise StackError(
                            f"flat {item.frame.path}: {problem} (calibration: {item.calibration.label}); "
                            "cannot normalize", item.frame.path)
                factors = normalization_factors(levels)
            else:
                factors = np.ones(n, dtype=np.float32)
            image = np.empty((height, width), dtype=np.float32)
            rejmap = np.zeros((2, height, width), dtype=np.uint16) if rejection_map else None
            rejected = _combine_bands(inputs, sources, cal_keys, factors, method, image, band_rows, pool, progress,
                                      rejmap)
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
    finally:
        sources.close()
    return StackResult(image=image, levels=[float(x) for x in levels],
                       factors=[float(f) for f in factors], band_rows=band_rows,
                       rejected=rejected, rejection_map=rejmap, geometry=layouts.cards())


def _warn_unusable_sections(layouts: Layouts) -> None:
    """A warning naming each file whose overscan sections cannot be used (read as stored)."""
    from flatd.notify.events import WARNING, notice

    for path, problem in layouts.problems():
        notice("overscan_unusable", f"{path}: overscan not subtracted, frame not trimmed: {problem}",
               WARNING, path=str(path))


def _calibration_args(item: StackInput):
    if item.calibration.mode == "pedestal":
        return float(item.calibration.pedestal)
    return None


def _run(pool: Optional[ThreadPoolExecutor], fn, jobs, on_done=None) -> list:
    """fn(job) for every job, on the pool if any; results in order; first error raised."""
    if pool is None:
        results = []
        for job in jobs:
            results.append(fn(job))
            if on_done:
                on_done(results[-1])
        return results
    futures = [pool.submit(fn, job) for job in jobs]
    results = []
    try:
        for fut in futures:
            results.append(fut.result())
            if on_done:
                on_done(results[-1])
    except BaseException:
        for fut in futures:
            fut.cancel()
        raise
    return results


def _measure_levels(inputs, sources: _Sources, cal_keys, step: int, pool) -> list[float]:
    """Each input's level (flatd.stack.levels.relative_levels) on the sample grid of
    `step`, after its calibration. Inputs are taken calibration file by calibration
    file, so one calibration grid is held at a time; the pool's workers read frames at
    once into one (N, S) array of samples."""
    height, width = sources.flats[0].height, sources.flats[0].width
    rows, cols = LV.sample_shape(height, width, step)
    samples = np.empty((len(inputs), rows * cols), dtype=np.float32)
    by_cal: dict[Optional[Path], list[int]] = {}
    for i, key in enumerate(cal_keys):
        by_cal.setdefault(key, []).append(i)
    for key, indices in by_cal.items():
        cal = sources.cals[key].sample_grid(step, chunk_rows=LEVEL_CHUNK_ROWS) if key is not None else None

        def read(i: int, cal=cal) -> None:
            samples[i] = sources.flats[i].sample_grid(step, pedestal=_calibration_args(inputs[i]), cal=cal,
                                                      chunk_rows=LEVEL_CHUNK_ROWS).ravel()

        _run(pool, read, indices)
        del cal
    return LV.relative_levels(samples, mapper=lambda fn, items: _run(pool, fn, list(items)))


def _combine_bands(inputs, sources: _Sources, cal_keys, factors, method: Method, image: np.ndarray,
                   band_rows: int, pool, progress, rejmap: Optional[np.ndarray] = None) -> np.ndarray:
    """Every band into `image` (and `rejmap`); returns the values each input had
    rejected low and high, int64 (N, 2), summed over the bands and the threads."""
    n = len(inputs)
    height, width = image.shape
    local = threading.local()
    max_raw = max(s.raw_bytes(0, band_rows) for s in (*sources.flats, *sources.cals.values()))
    pedestals = [_calibration_args(item) for item in inputs]
    cal_index = {key: k for k, key in enumerate(sources.cals)}
    cal_list = list(sources.cals.values())

    totals: list[np.ndarray] = []  # one (N, 2) count per thread, summed at the end
    totals_lock = threading.Lock()

    def buffers():
        if not hasattr(local, "stack"):
            local.stack = np.empty(n * band_rows * width, dtype=np.float32)
            local.cals = np.empty(len(cal_list) * band_rows * width, dtype=np.float32)
            local.raw = np.empty(max_raw, dtype=np.uint8)
            local.counts = np.zeros((n, 2), dtype=np.int64)
            local.pixels = np.empty(2 * band_rows * width, dtype=np.uint16) if rejmap is not None else None
            with totals_lock:
                totals.append(local.counts)
        return local.stack, local.cals, local.raw

    def band(r0: int) -> int:
        r1 = min(height, r0 + band_rows)
        rows = r1 - r0
        flat_buf, cal_buf, raw = buffers()
        stack = flat_buf[: n * rows * width].reshape(n, rows, width)
        cals = cal_buf[: len(cal_list) * rows * width].reshape(len(cal_list), rows, width)
        for k, src in enumerate(cal_list):
            src.read_into(r0, r1, cals[k], scratch=raw)
        for i, src in enumerate(sources.flats):
            key = cal_keys[i]
            src.read_into(r0, r1, stack[i], pedestal=pedestals[i],
                          cal=cals[cal_index[key]] if key is not None else None,
                          factor=float(factors[i]), scratch=raw)
        # counted into this thread's (N, 2) totals; the map through a contiguous band buffer
        pixels = local.pixels[: 2 * rows * width].reshape(2, rows, width) if rejmap is not None else None
        combine_rows_into(stack, method, image[r0:r1], frame_counts=local.counts, pixel_counts=pixels)
        if pixels is not None:
            rejmap[:, r0:r1] = pixels
        return rows

    done = [0]

    def report(rows: int) -> None:
        done[0] += rows
        if progress is not None:
            progress(done[0], height)

    _run(pool, band, range(0, height, band_rows), report)
    rejected = np.zeros((n, 2), dtype=np.int64)
    for counts in totals:
        rejected += counts
    return rejected
