#!/usr/bin/env python3
"""Speed at the floor (issue 10): every combine method against Siril's same job, and
against the cost of merely reading the files (a script, not a test).

    python bench/speed.py                          # 32 x 3264x2448, 3 rounds, with Siril
    python bench/speed.py --rounds 5 --methods median,winsorized,auto
    python bench/speed.py --no-siril --parts floor,startup
    python bench/speed.py --frames 5 --width 400 --height 300 --rounds 1   # smoke run

Four parts, in this order (--parts chooses among them); progress goes to stderr, the
Markdown tables (ready for the README) to stdout:

1. The stack: generated once into --cache (default bench/cache/speed-NxWxH): uint16 FITS
   (BZERO 32768) with flatd.demo's optics and sensor: `illumination(shape)` (vignetting,
   gradient, dust donuts) times a PRNU map (0.8 % rms), `Sensor()`'s bias with its fixed
   column pattern and its dark current with hot pixels (2 s at -10 C), a twilight level
   drifting from 26,000 down to 24,000 ADU through the session (+/-4 %, 0.6 % jitter),
   photon noise (Poisson variance, drawn as a Gaussian as flatd.demo does: at 18,000+ e-
   per pixel the two cannot be told apart), read noise, and on average 20 cosmic-ray
   tracks of 1-5 pixels per frame (more than a real 2 s flat gets, so the rejection has
   work to do). Seeded: the same arguments write the same bytes.

2. Whole process, alternating: one untimed warm-up run of each tool (page cache), then
   --rounds rounds; in each round, every method runs as `flatd combine -rp --normalize
   none --method NAME -o OUT FILES...` and right after it Siril's same job on the same
   files (`stack ... med -nonorm`; each robust algorithm as `rej {s|w|l|g|a|p} LOW HIGH
   -nonorm` with flatd's default thresholds; the original's mean, minmax and sigma as
   `rej s 2 2 -nonorm`; auto as the method auto picks for this number of frames). Both
   without normalization, so that both do the same job; the "+norm" rows (the robust
   algorithms and auto, --no-norm drops them) run flatd's default normalization,
   `--normalize multiplicative`, against Siril's `-norm=mul`. Reported: the median time
   of each tool over the rounds, their ratio, and each tool's peak RSS (the largest of
   the rounds; it includes bench.py's 7 MB launcher). A Siril job that takes longer than
   --siril-enough seconds (Siril 1.0.6's MAD takes minutes on 32 x 8 MP) is not run again.

3. The floor, in this process: open the same files and read every band with the
   stacker's own reader (PixelSource.read_into into a float32 (N, rows, W) band buffer,
   the engine's band height and number of threads) and sum each band with numpy; then
   each method's stacking in this process, warm, best of 3, the way `flatd combine`
   stacks (flatd.stack.engines.local.stack_frames with the default engine settings:
   level pass, then bands), as a multiple of that floor.

4. Start-up: what `flatd combine` and `flatd run-once` spend before the first band is
   combined. A wrapper runs flatd.cli.run() as the console script does, and
   timestamps (wall clock, against the time this script started the process) the
   interpreter being up, the engine being entered (stack_frames: imports, arguments,
   headers, planning are done), the level pass done, the first call of
   combine_rows_into, and stack_frames' return; the rest is writing the master, the
   report and exiting. The patches go in when flatd.stack.engines.local is imported (an
   import hook), so flatd imports what it imports when it does. `combine` runs with its
   defaults (sigma 2.0, multiplicative) and -rp; `run-once` with a rules file whose
   capture folder holds hard links to the same files (method auto, multiplicative,
   precalibration none, stable 0, its inputs moved after), a fresh tree for every run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench import (  # noqa: E402  (bench.py's helpers: one way to measure and to run Siril)
    BIN,
    NEW_METHODS,
    SIRIL_DEFAULTS,
    machine,
    measure,
    siril_sequence,
    siril_stack,
    siril_version,
)

PARTS = ("whole", "floor", "startup")
# The original program's methods: against Siril's sigma clipping, as bench.py compares them.
ORIGINAL = ("mean", "minmax", "sigma")


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------- the stack


def generate(folder: Path, count: int, width: int, height: int, seed: int = 10) -> list[Path]:
    """`count` flats of width x height as flat_NNNN.fits in `folder` (kept if all there)."""
    from astropy.io import fits

    from flatd.demo import GAIN, INSTRUMENT, OFFSET, PIXEL_SIZE, TELESCOPE, Sensor, illumination

    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"flat_{i:04d}.fits" for i in range(count)]
    if all(p.exists() for p in paths):
        return paths
    start = time.perf_counter()
    shape = (height, width)
    rng = np.random.default_rng([seed, count, width, height])
    sensor = Sensor()
    exposure, setpoint = 2.0, -10.0
    # What reaches each pixel per ADU of level: optics (mean 1) times the pixel's own response.
    response = illumination(shape).astype(np.float32)
    response *= 1 + np.float32(0.008) * rng.standard_normal(shape, dtype=np.float32)
    offset = sensor.offset(shape, 1, setpoint, exposure).astype(np.float32)  # bias, columns, dark, hot pixels
    dark_variance = (sensor.dark_current(shape, 1, setpoint) * exposure / sensor.egain).astype(np.float32)
    dark_variance += np.float32(sensor.read_noise**2)
    egain = np.float32(sensor.egain)
    drift = 0.04
    image = np.empty(shape, dtype=np.float32)
    sky = np.empty(shape, dtype=np.float32)
    for i, path in enumerate(paths):
        # every frame's draws, whether or not it is written now: the same bytes either way
        trend = drift - 2 * drift * i / max(count - 1, 1)
        level = 25000.0 * (1.0 + trend + float(rng.normal(0.0, 0.006)))
        noise = rng.standard_normal(shape, dtype=np.float32)
        tracks = []
        for _ in range(int(rng.poisson(20))):
            length = int(rng.integers(1, 6))
            dy, dx = [(0, 1), (1, 0), (1, 1), (1, -1)][int(rng.integers(0, 4))]
            y, x = int(rng.integers(0, height)), int(rng.integers(0, width))
            tracks.append((y, x, dy, dx, length, float(rng.uniform(2000, 40000))))
        temperature = round(setpoint + float(rng.uniform(-0.2, 0.2)), 1) + 0.0
        if path.exists():
            continue
        np.multiply(response, np.float32(level), out=sky)
        np.divide(sky, egain, out=image)
        image += dark_variance
        np.sqrt(image, out=image)
        image *= noise
        image += sky
        image += offset
        for y, x, dy, dx, length, energy in tracks:
            for k in range(length):
                r, c = y + k * dy, x + k * dx
                if 0 <= r < height and 0 <= c < width:
                    image[r, c] += energy
        data = np.clip(np.rint(image), 0, 65535).astype(np.uint16)
        hdu = fits.PrimaryHDU(data)  # uint16: stored as int16 with BZERO 32768
        seconds = 17 * 3600 + 5 * 60 + i * (exposure + 1.5)
        hdu.header.update(
            IMAGETYP="FLAT", EXPOSURE=exposure, EXPTIME=exposure, XBINNING=1, YBINNING=1, GAIN=GAIN,
            OFFSET=OFFSET, EGAIN=sensor.egain, XPIXSZ=PIXEL_SIZE, YPIXSZ=PIXEL_SIZE, INSTRUME=INSTRUMENT,
            TELESCOP=TELESCOPE, FILTER="L")
        hdu.header["DATE-OBS"] = (f"2026-11-30T{int(seconds // 3600):02d}:{int(seconds // 60 % 60):02d}:"
                                  f"{seconds % 60:06.3f}")
        hdu.header["SET-TEMP"] = setpoint
        hdu.header["CCD-TEMP"] = temperature
        tmp = path.with_suffix(".tmp")
        hdu.writeto(tmp, overwrite=True)
        tmp.rename(path)
        print(f"  generated {path.name}", end="\r", file=sys.stderr, flush=True)
    say(f"  generated {count} flats of {width}x{height} in {time.perf_counter() - start:.1f} s")
    return paths


# ------------------------------------------------------------------------- jobs


@dataclass
class Job:
    """One combine job: a flatd method and normalization, and Siril's same job."""

    name: str  # flatd's --method (a registry name or auto)
    normalize: str  # none | multiplicative
    label: str
    siril: Optional[str]  # Siril's stack arguments
    flatd_s: list[float] = field(default_factory=list)
    flatd_rss: list[float] = field(default_factory=list)
    siril_s: list[float] = field(default_factory=list)
    siril_rss: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    inprocess_s: Optional[float] = None


def _resolved(name: str, frames: int):
    """The Method a `--method name` run stacks with (auto: what it picks for `frames`)."""
    from flatd.config import Rules
    from flatd.stack import auto
    from flatd.stack.methods import Method

    if name == "auto":
        return auto.choose(frames, Rules().combine)[0]
    return Method(name)


def _short(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _siril_args(method, normalize: str) -> tuple[Optional[str], str]:
    """(Siril's stack arguments, their short form) for flatd's `method`; None without a counterpart."""
    norm = "-nonorm" if normalize == "none" else "-norm=mul"
    if method.name == "median":
        return f"med {norm}", "med"
    if method.name in ORIGINAL:
        return f"rej s 2 2 {norm}", "rej s 2 2"
    letter = NEW_METHODS.get(method.name)
    if letter is None:
        return None, ""
    params = method.params
    if method.name == "esd":
        low, high = params.get("esd_outliers"), params.get("esd_significance")
    else:
        low, high = params.get("low"), params.get("high")
    if low is None or high is None:
        low, high = SIRIL_DEFAULTS[letter]
    return f"rej {letter} {low:g} {high:g} {norm}", f"rej {letter} {low:g} {high:g}"


def make_jobs(names: list[str], frames: int, norm_rows: bool) -> list[Job]:
    """Every method without normalization; the robust algorithms and auto again with it."""
    jobs = []
    for normalize in ("none", "multiplicative"):
        for name in names:
            if normalize != "none" and not (norm_rows and (name in NEW_METHODS or name == "auto")):
                continue
            method = _resolved(name, frames)
            params = " ".join(_short(v) for v in method.params.values())
            label = f"{method.name} {params}".strip()
            if name == "auto":
                label = f"auto ({label})"
            siril, siril_short = _siril_args(method, normalize)
            if normalize != "none":
                label += " +norm"
            jobs.append(Job(name, normalize, label, siril, notes=[siril_short] if siril else []))
    return jobs


# ------------------------------------------------------------------------- part 2: whole process


def whole_process(files: list[Path], jobs: list[Job], rounds: int, out: Path, use_siril: bool,
                  siril_enough: float) -> Optional[str]:
    """Fills each job's flatd_* and siril_* lists; returns Siril's version (None: no Siril)."""
    flatd = str(BIN / "flatd")
    siril_run = siril_sequence(files, out) if use_siril else None
    version = siril_version() if siril_run else None
    if use_siril and siril_run is None:
        say("note: siril-cli not found: flatd only")
    say("warm-up (untimed): flatd combine --method mean" + (", Siril med" if siril_run else ""))
    warm = out / "warm.fits"
    secs, _, code, text = measure([flatd, "combine", "-rp", "--method", "mean", "-o", str(warm), *map(str, files)])
    warm.unlink(missing_ok=True)
    if code != 0:
        raise SystemExit(f"flatd combine failed in the warm-up:\n{text[-2000:]}")
    if siril_run:
        siril_stack(siril_run, out, 1, "warm", "med -nonorm")
    for r in range(rounds):
        for k, job in enumerate(jobs):
            target = out / f"flatd-{k}.fits"
            cmd = [flatd, "combine", "-rp", "--normalize", job.normalize, "--method", job.name, "-o", str(target)]
            secs, rss, code, text = measure(cmd + [str(f) for f in files])
            target.unlink(missing_ok=True)
            if code != 0:
                job.notes.append(f"flatd FAILED: {text.strip()[-200:]}")
            else:
                job.flatd_s.append(secs)
                job.flatd_rss.append(rss)
            line = f"round {r + 1}/{rounds}  {job.label:<36} flatd {secs:6.2f} s"
            if siril_run and job.siril and not (job.siril_s and max(job.siril_s) > siril_enough):
                s_secs, s_rss, ok, note = siril_stack(siril_run, out, 1, f"job{k}", job.siril)
                if ok:
                    job.siril_s.append(s_secs)
                    job.siril_rss.append(s_rss)
                else:
                    job.notes.append(f"Siril FAILED: {note.strip()[-200:]}")
                line += f"   Siril {s_secs:6.2f} s"
            say(line)
    return version


# ------------------------------------------------------------------------- part 3: the floor


def _engine_settings():
    from flatd.config import Rules

    return Rules().engine


def floor_and_inprocess(files: list[Path], jobs: list[Job], best: int = 3) -> dict:
    """The read (+ sum) floor and each job's in-process stacking time (best of `best`)."""
    from flatd.ingest.frames import read_frames
    from flatd.jobs import StackInput
    from flatd.stack.combine import default_workers
    from flatd.stack.engines import local as L
    from flatd.stack.pixels import open_pixels

    settings = _engine_settings()
    frames, bad = read_frames(files)
    if bad:
        raise SystemExit(f"unreadable: {bad[0].path}: {bad[0].reason}")
    n, width, height = len(frames), frames[0].width, frames[0].height
    itemsize = abs(frames[0].bitpix) // 8
    workers_wanted = int(settings.workers or default_workers())
    band_rows, workers = L.plan_bands(n, 0, width, height, int(settings.memory_limit), workers_wanted, itemsize)

    def read_all(threads: int, add: bool) -> float:
        start = time.perf_counter()
        sources = [open_pixels(f) for f in frames]
        try:
            image = np.empty((height, width), dtype=np.float32)
            local = threading.local()

            def band(r0: int) -> None:
                r1 = min(height, r0 + band_rows)
                rows = r1 - r0
                if not hasattr(local, "stack"):
                    local.stack = np.empty(n * band_rows * width, dtype=np.float32)
                    local.raw = np.empty(band_rows * width * itemsize, dtype=np.uint8)
                stack = local.stack[: n * rows * width].reshape(n, rows, width)
                for i, src in enumerate(sources):
                    src.read_into(r0, r1, stack[i], scratch=local.raw)
                if add:
                    np.sum(stack, axis=0, out=image[r0:r1])

            if threads > 1:
                with ThreadPoolExecutor(max_workers=threads) as pool:
                    list(pool.map(band, range(0, height, band_rows)))
            else:
                for r0 in range(0, height, band_rows):
                    band(r0)
        finally:
            for src in sources:
                src.close()
        return time.perf_counter() - start

    def best_time(fn) -> float:
        return min(fn() for _ in range(best))

    read_all(workers, True)  # untimed: page cache, first allocations
    floors = {
        "read": best_time(lambda: read_all(workers, False)),
        "read+sum": best_time(lambda: read_all(workers, True)),
        "read+sum 1": best_time(lambda: read_all(1, True)),
    }
    say(f"floor: read {floors['read']:.3f} s, read + sum {floors['read+sum']:.3f} s "
        f"({workers} threads, bands of {band_rows} rows); 1 thread {floors['read+sum 1']:.3f} s")

    inputs = [StackInput(f) for f in frames]
    first = True
    for job in jobs:
        method = _resolved(job.name, n)

        def stack() -> float:
            start = time.perf_counter()
            L.stack_frames(inputs, method, job.normalize, int(settings.memory_limit), settings.workers)
            return time.perf_counter() - start

        if first:
            stack()  # untimed: the kernels' first call
            first = False
        job.inprocess_s = best_time(stack)
        say(f"in process  {job.label:<36} {job.inprocess_s:6.3f} s  ({job.inprocess_s / floors['read+sum']:.1f}x floor)")
    return dict(floors, workers=workers, band_rows=band_rows)


# ------------------------------------------------------------------------- part 4: start-up

# Runs flatd as its console script does (flatd.cli.run), appending "mark wall-time" lines to
# argv[1]: python (the interpreter is up), engine (stack_frames entered), levels (level pass
# done), band (first combine_rows_into call), done (stack_frames returned).
WRAPPER = r'''
import sys, time
MARKS = sys.argv[1]

def mark(name, _t=time.time):
    t = _t()
    with open(MARKS, "a") as f:
        f.write(f"{name} {t!r}\n")

mark("python")
import importlib.util
import threading

TARGET = "flatd.stack.engines.local"

def patch(module):
    stack_frames, measure_levels, combine = module.stack_frames, module._measure_levels, module.combine_rows_into
    lock, first = threading.Lock(), []

    def stack_frames_marked(*args, **kwargs):
        mark("engine")
        try:
            return stack_frames(*args, **kwargs)
        finally:
            mark("done")

    def measure_levels_marked(*args, **kwargs):
        try:
            return measure_levels(*args, **kwargs)
        finally:
            mark("levels")

    def combine_marked(*args, **kwargs):
        if not first:
            with lock:
                if not first:
                    first.append(True)
                    mark("band")
        return combine(*args, **kwargs)

    module.stack_frames = stack_frames_marked
    module._measure_levels = measure_levels_marked
    module.combine_rows_into = combine_marked

class Hook:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name != TARGET:
            return None
        sys.meta_path.remove(Hook)
        spec = importlib.util.find_spec(name)
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            patch(module)

        spec.loader.exec_module = exec_and_patch
        return spec

sys.meta_path.insert(0, Hook)
sys.argv = ["flatd", *sys.argv[2:]]
from flatd.cli import run
run()
'''

PHASES = ("python", "engine", "levels", "band", "done")


def timed_marks(cmd: list[str], marks: Path, cwd: Optional[Path] = None) -> tuple[dict, float, int, str]:
    """Marks relative to the spawn (s), total wall s, exit status, output."""
    marks.unlink(missing_ok=True)
    with tempfile.TemporaryFile() as log:
        t0 = time.time()
        proc = subprocess.run(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
        total = time.time() - t0
        log.seek(0)
        output = log.read().decode(errors="replace")
    got = {}
    if marks.exists():
        for line in marks.read_text().splitlines():
            name, _, value = line.partition(" ")
            got.setdefault(name, float(value) - t0)
    return got, total, proc.returncode, output


def runonce_tree(files: list[Path], parent: Path) -> Path:
    """A capture folder of links to `files` and a rules file for it; returns the rules file."""
    root = Path(tempfile.mkdtemp(prefix="speed-run-once-", dir=parent))
    night = root / "captures" / "2026-11-30"
    night.mkdir(parents=True)
    follow = False
    for f in files:
        try:
            os.link(f, night / f.name)
        except OSError:
            os.symlink(f.resolve(), night / f.name)
            follow = True
    rules = root / "flatd.yaml"
    rules.write_text(
        f"capture:\n  - path: {json.dumps(str(root / 'captures'))}\n"
        + ("    follow_symlinks: true\n" if follow else "")
        + f"state: {json.dumps(str(root / 'state'))}\n"
        "precalibration: {mode: none}\n"
        "stable: 0\n")
    return rules


def top_imports(cmd: list[str], least: float = 0.02) -> list[tuple[str, float]]:
    """The imports `python -X importtime` sees made from no other import (flatd's lazy imports
    inside functions among them) that took `least` seconds or more, cumulative, slowest first."""
    proc = subprocess.run([sys.executable, "-X", "importtime", *cmd], stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    found = []
    for line in proc.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _, cumulative, name = line.split("|", 2)
        name = name[1:]
        if not name.startswith(" ") and int(cumulative) >= least * 1e6:
            found.append((name.strip(), int(cumulative) / 1e6))
    return sorted(found, key=lambda item: -item[1])


def startup(files: list[Path], rounds: int, out: Path, link_parent: Path) -> dict[str, list[tuple[dict, float]]]:
    wrapper = out / "flatd_marked.py"
    wrapper.write_text(WRAPPER)
    marks = out / "marks.txt"
    results: dict[str, list[tuple[dict, float]]] = {"python -c pass": [], "flatd combine": [], "flatd run-once": []}
    py = sys.executable
    for r in range(rounds):
        start = time.time()
        subprocess.run([py, "-c", "pass"], check=True)
        results["python -c pass"].append(({}, time.time() - start))

        target = out / "startup.fits"
        got, total, code, text = timed_marks([py, str(wrapper), str(marks), "combine", "-rp", "-o", str(target),
                                              *map(str, files)], marks)
        target.unlink(missing_ok=True)
        if code != 0 or "band" not in got:
            raise SystemExit(f"flatd combine (start-up) failed, exit {code}:\n{text[-2000:]}")
        results["flatd combine"].append((got, total))

        rules = runonce_tree(files, link_parent)
        try:
            got, total, code, text = timed_marks([py, str(wrapper), str(marks), "run-once", "--config", str(rules)],
                                                 marks)
        finally:
            shutil.rmtree(rules.parent, ignore_errors=True)
        if code != 0 or "band" not in got:
            raise SystemExit(f"flatd run-once (start-up) failed, exit {code}:\n{text[-2000:]}")
        results["flatd run-once"].append((got, total))
        say(f"start-up round {r + 1}/{rounds}: combine first band at {results['flatd combine'][-1][0]['band']:.3f} s, "
            f"run-once at {got['band']:.3f} s")
    # one more run of each with -X importtime (slower than the runs above): where the imports go
    target = out / "startup.fits"
    results["imports"] = {"flatd combine": top_imports([str(BIN / "flatd"), "combine", "-rp", "-o", str(target),
                                                        *map(str, files)])}
    target.unlink(missing_ok=True)
    rules = runonce_tree(files, link_parent)
    try:
        results["imports"]["flatd run-once"] = top_imports([str(BIN / "flatd"), "run-once", "--config", str(rules)])
    finally:
        shutil.rmtree(rules.parent, ignore_errors=True)
    return results


# ------------------------------------------------------------------------- report


def med(values: list[float]) -> Optional[float]:
    return statistics.median(values) if values else None


def fmt(value: Optional[float], digits: int = 2, suffix: str = "") -> str:
    return "" if value is None else f"{value:.{digits}f}{suffix}"


def spread(values: list[float]) -> str:
    if not values:
        return ""
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.median(values):.2f} ({min(values):.2f}–{max(values):.2f})"


def print_whole(jobs: list[Job], rounds: int, version: Optional[str], shape: str) -> None:
    siril = version or "Siril"
    print(f"\n{shape}, whole process (read, combine, write), rounds: {rounds}, each round flatd then "
          f"{siril} on the same job; median (min–max) seconds, peak RSS the largest of the rounds:\n")
    print(f"| flatd method | flatd s | {siril} same | {siril} s | flatd / Siril | flatd MB | Siril MB |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for job in jobs:
        f, s = med(job.flatd_s), med(job.siril_s)
        ratio = f"{f / s:.2f}" if f is not None and s else ""
        same = job.notes[0] if job.siril and job.notes else ""
        problems = [n for n in job.notes if "FAILED" in n]
        label = job.label + (f" — {'; '.join(p[:80] for p in problems)}" if problems else "")
        runs = f" ({len(job.siril_s)} run{'s' if len(job.siril_s) != 1 else ''})" if 0 < len(job.siril_s) < rounds else ""
        print(f"| {label} | {spread(job.flatd_s)} | {same} | {spread(job.siril_s)}{runs} | {ratio} "
              f"| {fmt(max(job.flatd_rss) if job.flatd_rss else None, 0)} "
              f"| {fmt(max(job.siril_rss) if job.siril_rss else None, 0)} |")


def print_floor(jobs: list[Job], floor: dict, shape: str, n: int) -> None:
    base = floor["read+sum"]
    print(f"\n{shape}, in this process, warm, best of 3. The floor: open the {n} files and read every band "
          f"with flatd's reader (PixelSource.read_into, float32, {floor['band_rows']}-row bands on "
          f"{floor['workers']} threads, as the engine does), and sum each band with numpy:\n")
    print("| floor | s |")
    print("|---|---:|")
    print(f"| read every band ({floor['workers']} threads) | {floor['read']:.3f} |")
    print(f"| read and sum every band ({floor['workers']} threads): **the floor** | {base:.3f} |")
    print(f"| read and sum every band (1 thread) | {floor['read+sum 1']:.3f} |")
    print("\nEach method stacked in this process (stack_frames, default engine settings: level pass, then bands), "
          "and the same job as a whole process (part 2's median):\n")
    print("| flatd method | stacking s | × floor | whole process s | whole − stacking s |")
    print("|---|---:|---:|---:|---:|")
    for job in jobs:
        if job.inprocess_s is None:
            continue
        whole = med(job.flatd_s)
        rest = fmt(whole - job.inprocess_s) if whole is not None else ""
        print(f"| {job.label} | {job.inprocess_s:.3f} | {job.inprocess_s / base:.1f} | {fmt(whole)} | {rest} |")


def print_startup(results: dict, shape: str) -> None:
    imports = results.pop("imports", {})
    rounds = len(next(iter(results.values())))
    print(f"\nStart-up, {shape}: seconds from starting the process (median of {rounds}); "
          "combine: `flatd combine -rp -o OUT FILES` (sigma 2.0, multiplicative); run-once: method auto, "
          "multiplicative, precalibration none, inputs moved after:\n")
    print("| command | to first band | Python up | imports, arguments, headers, plan | level pass "
          "| first band read | bands | master written, exit | total |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, runs in results.items():
        totals = [t for _, t in runs]
        if not runs[0][0]:
            print(f"| `{name}` | | | | | | | | {med(totals):.3f} |")
            continue

        def at(key: str) -> float:
            return med([m[key] for m, _ in runs])

        def between(a: str, b: str) -> float:
            return med([m[b] - m[a] for m, _ in runs])

        print(f"| `{name}` | **{at('band'):.3f}** | {at('python'):.3f} | {between('python', 'engine'):.3f} "
              f"| {between('engine', 'levels'):.3f} | {between('levels', 'band'):.3f} | {between('band', 'done'):.3f} "
              f"| {med([t - m['done'] for m, t in runs]):.3f} | {med(totals):.3f} |")
    if imports:
        print("\nImports made from no other import (flatd's lazy ones included) of 20 ms or more, cumulative, "
              "one run under `python -X importtime` (which slows imports somewhat):\n")
        print("| command | imports, ms |")
        print("|---|---|")
        for name, found in imports.items():
            print(f"| `{name}` | {', '.join(f'{m} {t * 1000:.0f}' for m, t in found)} |")


# ------------------------------------------------------------------------- main


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3, help="rounds of the whole-process runs and of the start-up runs")
    ap.add_argument("--cache", type=Path, default=HERE / "cache", help="folder for the generated stack")
    ap.add_argument("--frames", type=int, default=32)
    ap.add_argument("--width", type=int, default=3264)
    ap.add_argument("--height", type=int, default=2448)
    ap.add_argument("--methods", default=None,
                    help="comma-separated flatd methods (default: every registered one, then auto)")
    ap.add_argument("--no-siril", action="store_true", help="flatd only")
    ap.add_argument("--no-norm", action="store_true",
                    help="without the +norm rows (robust algorithms and auto with multiplicative normalization)")
    ap.add_argument("--siril-enough", type=float, default=30.0,
                    help="a Siril job slower than this (s) is not run again in later rounds")
    ap.add_argument("--parts", default=",".join(PARTS), help="which parts to run: " + ",".join(PARTS))
    args = ap.parse_args(argv)

    from flatd.stack import methods as registry

    names = list(registry.names()) + ["auto"] if args.methods is None else [m for m in args.methods.split(",") if m]
    unknown = [m for m in names if m != "auto" and m not in registry.names()]
    parts = [p for p in args.parts.split(",") if p]
    if unknown or any(p not in PARTS for p in parts) or args.rounds < 1:
        ap.error(f"unknown method {unknown} (registered: {', '.join(registry.names())}, auto)" if unknown
                 else f"--parts: {', '.join(PARTS)}; --rounds: 1 or more")

    shape = f"{args.frames} flats of {args.width}x{args.height} uint16"
    say(f"machine: {machine()}")
    folder = args.cache / f"speed-{args.frames}x{args.width}x{args.height}"
    files = generate(folder, args.frames, args.width, args.height)
    jobs = make_jobs(names, args.frames, not args.no_norm)
    print(f"machine: {machine()}")
    version = None
    with tempfile.TemporaryDirectory(prefix="flatd-speed-") as tmp:
        out = Path(tmp)
        if "whole" in parts:
            version = whole_process(files, jobs, args.rounds, out, not args.no_siril, args.siril_enough)
            print_whole(jobs, args.rounds, version, shape)
        start_results = startup(files, args.rounds, out, args.cache) if "startup" in parts else None
        if "floor" in parts:
            floor = floor_and_inprocess(files, jobs)
            print_floor(jobs, floor, shape, args.frames)
        if start_results:
            print_startup(start_results, shape)
    return 0


if __name__ == "__main__":
    sys.exit(main())
