"""The level sample of every flat of a job, and the flat checks on it.

The engine (flatd.stack.engines.local) reads each flat's calibrated sample grid
(flatd.stack.levels) once; its levels and the flat checks (flatd.qc.flats) both work on
it. The dry run screens a job through :func:`screen_job`, by the same reader: only the
grid's rows are read, in numpy, without the compiled kernels (and without astropy); a
job whose files need them (tile-compressed, XISF, overscan to trim) is not screened in a
dry run, and says so.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from flatd.errors import FlatdError
from flatd.stack import levels as LV

# Rows of the level sample read at a time, per worker.
LEVEL_CHUNK_ROWS = 8


def _spread(values: np.ndarray) -> tuple[float, float]:
    """(median, 1.4826 MAD) of the finite values of a calibration grid."""
    values = values[np.isfinite(values)]
    if not values.size:
        return 0.0, 0.0
    median = float(np.median(values))
    return median, 1.4826 * float(np.median(np.abs(values - median)))


def _subtracted(item, source, cal_stats: Optional[tuple[float, float]]) -> tuple[float, float]:
    """(median, spread) of what calibration subtracts from a flat: the calibration file's
    grid or the pedestal, plus the overscan level of a trimmed frame."""
    offset, spread = cal_stats or (0.0, 0.0)
    if item.calibration.mode == "pedestal":
        offset = float(item.calibration.pedestal)
    level = getattr(source, "level", None)  # flatd.stack.geometry.GeometrySource: the overscan per row
    if isinstance(level, np.ndarray) and np.isfinite(level).any():
        offset += float(np.nanmedian(level))
    return offset, spread


def read_samples(inputs, flats, cals: dict, cal_keys: Sequence[Optional[Path]], step: int,
                 run: Callable, offsets: bool = False) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """(samples float32 (N, S), subtracted): each input's calibrated grid of `step`, raveled,
    and with `offsets`, per input (median, spread) of what its calibration subtracted (the
    saturation check's threshold). Inputs are taken calibration file by calibration file,
    so one calibration grid is held at a time; `run(fn, indices)` reads frames (in threads)."""
    height, width = flats[0].height, flats[0].width
    rows, cols = LV.sample_shape(height, width, step)
    samples = np.empty((len(inputs), rows * cols), dtype=np.float32)
    subtracted: list[tuple[float, float]] = [(0.0, 0.0)] * len(inputs)
    by_cal: dict[Optional[Path], list[int]] = {}
    for i, key in enumerate(cal_keys):
        by_cal.setdefault(key, []).append(i)
    for key, indices in by_cal.items():
        cal = cals[key].sample_grid(step, chunk_rows=LEVEL_CHUNK_ROWS) if key is not None else None
        stats = _spread(cal) if offsets and cal is not None else None

        def read(i: int, cal=cal) -> None:
            pedestal = float(inputs[i].calibration.pedestal) if inputs[i].calibration.mode == "pedestal" else None
            samples[i] = flats[i].sample_grid(step, pedestal=pedestal, cal=cal, chunk_rows=LEVEL_CHUNK_ROWS).ravel()

        run(read, indices)
        if offsets:
            for i in indices:
                subtracted[i] = _subtracted(inputs[i], flats[i], stats)
        del cal
    return samples, subtracted


def own_levels(samples: np.ndarray, run: Callable) -> list[float]:
    """Each row's robust level (flatd.stack.levels.robust_level)."""
    return list(run(lambda i: LV.robust_level(samples[i]), range(samples.shape[0])))


def check_samples(inputs, samples: np.ndarray, own: Sequence[float], subtracted, step: int, quality,
                  shape: tuple[int, int], origin: tuple[int, int] = (0, 0), height: Optional[int] = None) -> list:
    """flatd.qc.flats.check_flats on the samples (N, S) of `inputs`, each (rows, cols) = `shape`."""
    from flatd.qc.flats import FlatSample, check_flats

    flats = [FlatSample(item.frame, samples[i].reshape(shape), own[i], *subtracted[i],
                        calibration=item.calibration.label if item.calibration.mode != "none" else None)
             for i, item in enumerate(inputs)]
    return check_flats(flats, step, quality, origin, height)


def dry_step(height: int, width: int, colour: bool) -> int:
    """The grid step the engine takes unless its memory limit asks for a coarser grid
    (flatd.stack.engines.local.level_plan): odd for a colour sensor."""
    step = LV.grid_step(height, width)
    return step - 1 if colour and step % 2 == 0 else step


def screenable(job) -> Optional[str]:
    """Why a dry run cannot read a job's samples without the kernels (None: it can)."""
    from flatd.stack.sections import frame_layout

    frames = [i.frame for i in job.inputs] + [i.calibration.frame for i in job.inputs
                                               if i.calibration.mode == "file" and i.calibration.frame is not None]
    for frame in frames:
        name = str(frame.path).lower()
        if not name.endswith((".fits", ".fit", ".fts")):
            return f"{frame.path.name} is not a plain FITS file"
        if not frame_layout(frame, job.frames[0].row_order, getattr(job, "overscan", "auto")).plain:
            return f"{frame.path.name} is flipped or trimmed"
    return None


def read_group(inputs) -> tuple[np.ndarray, list, list, int, tuple]:
    """(samples (N, S), own levels, subtracted, step, sample shape) of a group's inputs,
    read one after another on the dry run's grid (dry_step), for the dry run and `flatd qc`."""
    from flatd.stack.pixels import open_pixels

    opened, cals = [], {}
    try:
        for item in inputs:
            opened.append(open_pixels(item.frame))
            if item.calibration.mode == "file":
                key = Path(os.path.abspath(item.calibration.frame.path))
                if key not in cals:
                    cals[key] = open_pixels(item.calibration.frame)
        keys = [Path(os.path.abspath(i.calibration.frame.path)) if i.calibration.mode == "file" else None
                for i in inputs]
        height, width = opened[0].height, opened[0].width
        step = dry_step(height, width, any(i.frame.bayer_pattern for i in inputs))
        serial = lambda fn, items: [fn(i) for i in items]  # noqa: E731
        samples, subtracted = read_samples(inputs, opened, cals, keys, step, serial, offsets=True)
        return samples, own_levels(samples, serial), subtracted, step, LV.sample_shape(height, width, step)
    finally:
        for src in (*opened, *cals.values()):
            src.close()


def screen_job(job) -> tuple[list, Optional[str]]:
    """(findings, why not screened): the flat checks of a job as its run would make them,
    for the dry run. Reads only the sample grids."""
    quality = getattr(job, "quality", None)
    if quality is None or not quality.enabled:
        return [], None
    why = screenable(job)
    if why:
        return [], f"flat checks run when the master is made ({why}: the dry run reads plain FITS only)"
    inputs = list(job.inputs)
    try:
        samples, own, subtracted, step, shape = read_group(inputs)
        return check_samples(inputs, samples, own, subtracted, step, quality, shape), None
    except (OSError, ValueError, FlatdError) as exc:
        return [], f"flat checks not run in the dry run: {exc}"
