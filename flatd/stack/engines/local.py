"""The local engine: a group of flats streamed through calibration and combine, in row bands.

Two passes over the files:

1. (levels) every input's level is measured on the sample grid of
   :mod:`flatd.stack.levels` (a dense grid over the whole frame, read a few rows at a
   time), after its calibration, by its robust estimator; with multiplicative
   normalization the factors follow.
   With the flat checks (`quality`, flatd.qc.flats) the samples are read even with
   normalize "none", and the checks run on them before any band is combined: the flats
   they leave out are not read again.
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
from concurrent.futures import ThreadPoolExecutor, wait
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
from flatd.stack.samples import LEVEL_CHUNK_ROWS, check_samples, own_levels, read_samples

if TYPE_CHECKING:  # pragma: no cover
    from flatd.stack.methods import Method
    from flatd.config import Engine as EngineSettings
    from flatd.jobs import Job

DEFAULT_MEMORY_LIMIT = 512 * 2**20
# Memory not in any accounted buffer (numba scratch, Python objects; level samples of small frames).
RESERVE_BYTES = 4 * 2**20
# Band height cap: beyond this, bigger bands only cost cache and parallelism.
MAX_BAND_ROWS = 32


class QcTooFew(StackError):
    """The flat checks left too few flats to combine; `findings` says which and why."""

    def __init__(self, reason: str, findings: Optional[list] = None):
        super().__init__(reason)
        self.findings = list(findings or [])

    def __reduce__(self):  # pickled whole (the dask engine)
        return (type(self), (str(self), self.findings))


class LocalEngine:
    """The streaming stacker in this process, within `settings.memory_limit`."""

    def __init__(self, settings: "EngineSettings", progress: Optional[ProgressFactory] = None):
        self.settings = settings
        self.progress = progress

    def stack(self, job: "Job") -> StackResult:
        progress = self.progress(job.label, job.frames[0].height) if self.progress else None
        return stack_frames(job.inputs, job.method, job.normalize, self.settings.memory_limit,
                            self.settings.workers, progress, rejection_map=getattr(job, "rejection_map", False),
                            overscan=getattr(job, "overscan", "auto"), quality=getattr(job, "quality", None),
                            min_group_size=getattr(job, "min_group_size", 1))


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


def level_bytes(width: int, height: int, step: int, max_itemsize: int = 8) -> int:
    """Memory one worker needs to measure one frame's level on the grid of `step`: the
    grid, robust_level's work arrays, and the row chunk it is read through."""
    return LV.sample_bytes(height, width, step) + LEVEL_CHUNK_ROWS * width * (max_itemsize + 4)


def level_plan(width: int, height: int, memory_limit: int, workers: int, max_itemsize: int = 8,
               n: int = 1, raw_width: Optional[int] = None, odd: bool = False,
               checks: bool = False) -> tuple[int, int]:
    """(grid step, workers) for the level phase: the step of flatd.stack.levels (at least
    LEVEL_SAMPLE pixels) unless the memory limit asks for a coarser grid. Held at once:
    one calibration grid, and per worker level_bytes. Nothing else is allocated then, so
    the budget is the whole limit but half the reserve (the level sample was the
    reserve's to hold before it was planned: samples of small frames still fit there).
    The samples of all `n` frames are held together (levels are relative). `raw_width`:
    the stored width when frames are trimmed (rows are read whole). `odd`: an odd step,
    for a colour (CFA) sensor, so that the grid samples every colour of the mosaic (an
    even step lands on one colour only, and the level would be that colour's). `checks`:
    the flat checks (flatd.qc.flats) run on the samples too, with QC_SAMPLE_COPIES more
    copies of them at their peak."""
    budget = memory_limit - RESERVE_BYTES // 2
    step = LV.grid_step(height, width)
    if odd and step % 2 == 0:
        step -= 1  # finer: still at least LEVEL_SAMPLE pixels
    workers = max(1, workers)

    def need(step: int, workers: int) -> int:
        rows, cols = LV.sample_shape(height, width, step)
        # every frame's sample (n of them), the reference, one calibration grid, and per worker its work
        return ((n + 1 + (QC_SAMPLE_COPIES * n if checks else 0)) * rows * cols * 4 + LV.reference_bytes(n)
                + workers * (level_bytes(max(width, raw_width or 0), height, step, max_itemsize)
                             + 2 * LV.MODE_SAMPLE * 4))

    while need(step, workers) > budget and workers > 1:
        workers -= 1
    while need(step, workers) > budget and step < max(height, width):
        step += 2 if odd else 1
    return step, workers


# The flat checks' peak, in copies of the samples: the normalized samples, their ratios
# to the reference, and the block medians' working arrays (flatd.qc.flats.odd_scores;
# measured with tracemalloc: 3.3 copies for 32 frames; more for a handful, whose samples
# are small), and the copy the levels are measured on beside them (_levels_beside).
QC_SAMPLE_COPIES = 5


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
    quality=None,
    min_group_size: int = 1,
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

    `quality` (flatd.config.Quality, enabled): the flat checks (flatd.qc.flats) run on the
    level samples, read then even with normalize "none", before any band is combined;
    flats with a leave-out finding are not combined (the result's `findings` and `kept`
    say which), and QcTooFew is raised when fewer than `min_group_size` or the method's
    minimum remain.
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
                                         raw_width, odd=any(item.frame.bayer_pattern for item in inputs),
                                         checks=quality is not None and quality.enabled)
        workers = band_workers
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="flatd-stack") if workers > 1 else None
        try:
            levels = [math.nan] * n
            checks = quality is not None and quality.enabled
            findings: list = []
            kept = None  # all of them
            all_levels = None
            if normalize == "multiplicative" or checks:
                # fewer workers than the bands (a tight memory limit): one frame at a time
                level_pool = pool if level_workers >= workers else None
                run = lambda fn, items: _run(level_pool, fn, list(items))  # noqa: E731
                samples, subtracted = read_samples(inputs, sources.flats, sources.cals, cal_keys, step, run, checks)
                own = own_levels(samples, run)
                if checks:
                    geometry = layouts.cards()
                    beside = _levels_beside(samples, own) if normalize == "multiplicative" else None
                    try:
                        findings = check_samples(inputs, samples, own, subtracted, step, quality,
                                                 LV.sample_shape(height, width, step),
                                                 geometry.origin if geometry is not None else (0, 0), height)
                        kept = _kept(inputs, findings, method, min_group_size)
                    except BaseException:
                        if beside is not None:
                            wait([beside])  # never left running on the pool being shut down
                        raise
                    all_levels = beside.result() if beside is not None else None
                    if len(kept) == n:
                        kept = None
                    else:
                        inputs, cal_keys, samples, own = _subset(kept, inputs, sources, cal_keys, samples, own)
                        n = len(inputs)
                        levels = [math.nan] * n
            if normalize == "multiplicative":
                levels = (all_levels if kept is None and all_levels is not None
                          else LV.relative_levels(samples, mapper=run, own=own))
                for item, level in zip(inputs, levels):
                    problem = check_level(level)
                    if problem:
                        raise StackError(
                            f"flat {item.frame.path}: {problem} (calibration: {item.calibration.label}); "
                            "cannot normalize", item.frame.path)
                factors = normalization_factors(levels)
            else:
                factors = np.ones(n, dtype=np.float32)
            samples = None  # freed before the bands (their memory is planned without it)
            patches, noise_rows = _noise_patches(inputs, sources, cal_keys, height, width)
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
                       factors=[float(f) for f in factors], band_rows=band_rows, findings=findings, kept=kept,
                       rejected=rejected, rejection_map=rejmap, geometry=layouts.cards(),
                       noise_patches=patches, noise_rows=noise_rows)


# The master checks' noise patches: the same central rows of the first NOISE_FRAMES inputs,
# at most NOISE_BYTES of pixels in all (a few rows of a few frames: a read of well under 1 %).
NOISE_FRAMES = 4
NOISE_BYTES = 2**20
NOISE_MAX_ROWS = 64


def _noise_patches(inputs, sources: _Sources, cal_keys, height: int, width: int):
    """(patches float32 (k, rows, W), (r0, r1)): central rows of the first k inputs,
    calibrated, not normalized, for flatd.qc.masters' photon-transfer noise; (None, None)
    with fewer than 2 inputs."""
    k = min(NOISE_FRAMES, len(inputs))
    if k < 2:
        return None, None
    rows = max(2, min(NOISE_MAX_ROWS, height, NOISE_BYTES // (4 * width * (k + 1))))
    r0 = max(0, (height - rows) // 2) // 2 * 2  # an even start: the CFA phase of the master
    r1 = min(height, r0 + rows)
    patches = np.empty((k, r1 - r0, width), dtype=np.float32)
    scratch = np.empty(max(s.raw_bytes(r0, r1) for s in (*sources.flats[:k], *sources.cals.values())),
                       dtype=np.uint8)
    for i in range(k):
        cal = None
        if cal_keys[i] is not None:
            cal = np.empty((r1 - r0, width), dtype=np.float32)
            sources.cals[cal_keys[i]].read_into(r0, r1, cal, scratch=scratch)
        sources.flats[i].read_into(r0, r1, patches[i], pedestal=_calibration_args(inputs[i]), cal=cal,
                                   scratch=scratch)
    return patches, (r0, r1)


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
    `step`, after its calibration (flatd.stack.samples.read_samples: the pool's workers
    read frames at once into one (N, S) array of samples)."""
    run = lambda fn, items: _run(pool, fn, list(items))  # noqa: E731
    samples, _ = read_samples(inputs, sources.flats, sources.cals, cal_keys, step, run)
    return LV.relative_levels(samples, mapper=run)


def _kept(inputs, findings, method: Method, min_group_size: int) -> list[int]:
    """The indices of the inputs no leave-out finding keeps out; QcTooFew when fewer than
    `min_group_size` or the method's minimum are left (nothing is combined then)."""
    from flatd.qc.flats import left_out_paths

    out = left_out_paths(findings)
    kept = [i for i, item in enumerate(inputs) if item.frame.path not in out]
    if len(kept) < len(inputs):
        need = max(int(min_group_size or 1), method.min_frames)
        if len(kept) < need:
            if not kept:
                short = "none left"
            elif min_group_size >= method.min_frames:
                short = f"{len(kept)} left: fewer than min_group_size {min_group_size}"
            else:
                short = f"{len(kept)} left: {method.description} needs {method.min_frames}"
            raise QcTooFew(f"{len(inputs) - len(kept)} flat(s) left out by the quality checks, {short}; "
                           "nothing combined", findings)
    return kept


def _levels_beside(samples: np.ndarray, own):
    """Every frame's relative level, measured on a copy of the samples (relative_levels
    divides them in place) in one thread while the flat checks run on the main thread (two
    threads, one per core on a small machine: the pool's would only contend). The levels
    are the same unless a frame is left out (then they are measured again on the frames
    kept). The copy is one of the checks' QC_SAMPLE_COPIES. A Future of the levels."""
    copy = samples.copy()
    thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flatd-levels")
    try:
        return thread.submit(LV.relative_levels, copy, own=own)
    finally:
        thread.shutdown(wait=False)


def _subset(kept: list[int], inputs, sources: _Sources, cal_keys, samples: np.ndarray, own):
    """The inputs, calibration keys, samples and own levels of `kept`; the other flats'
    files are closed."""
    keep = set(kept)
    for i, src in enumerate(sources.flats):
        if i not in keep:
            src.close()
    sources.flats = [sources.flats[i] for i in kept]
    return ([inputs[i] for i in kept], [cal_keys[i] for i in kept], np.ascontiguousarray(samples[kept]),
            [own[i] for i in kept])


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
