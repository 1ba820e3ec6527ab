"""The Dask engine's overhead on one machine, and the figures a scale-out model needs (issue 14).

A night of 12 groups (each its own filter and folder, flats made with flatd.demo's optics
and sensor) is combined by `flatd run-once` three ways, each from a fresh copy of the
night, alternating over --rounds:

1. the local engine, its default threads (one per core);
2. the local engine, one thread (what one Dask worker of one thread does with a group);
3. the Dask engine on a LocalCluster of 2 worker processes of 1 thread each, started
   here (the scheduler's start-up is not counted; the coordinator's connection is).

Then, per group, in this process: the stacking's CPU seconds (thread time, the local
engine, one thread), the bytes read (the flats' files) and the network bytes of the
Dask path (the pickled job sent, the pickled result returned). The Markdown goes to
stdout, progress to stderr:

    python bench/scale.py                  # 12 groups x 16 flats of 2048x1536, 3 rounds
    python bench/scale.py --groups 4 --frames 8 --width 640 --height 480 --rounds 1   # smoke run
"""

from __future__ import annotations

import argparse
import os
import pickle
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
FILTERS = ("L", "R", "G", "B", "Ha", "OIII", "SII", "L2", "R2", "G2", "B2", "Ha2", "S3", "O3", "H3", "L3")


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def make_night(folder: Path, groups: int, frames: int, shape: tuple[int, int], seed: int = 14) -> int:
    """`groups` folders of `frames` uint16 flats; the bytes written."""
    from astropy.io import fits

    from flatd.demo import Sensor, illumination

    rng = np.random.default_rng(seed)
    light = illumination(shape)
    sensor = Sensor()
    bias = sensor.bias(shape)
    total = 0
    for g in range(groups):
        night = folder / f"rig{g:02d}"
        night.mkdir(parents=True, exist_ok=True)
        for i in range(frames):
            level = 24000.0 * (1 - 0.01 * i)
            data = rng.poisson(light * level).astype(np.float64) + bias + rng.normal(0, 3.0, shape)
            hdu = fits.PrimaryHDU(np.clip(data, 0, 65535).astype(np.uint16))
            hdu.header.update(IMAGETYP="FLAT", FILTER=FILTERS[g % len(FILTERS)], EXPTIME=2.0, CCD_TEMP=-10.0,
                              INSTRUME=f"rig {g}", DATE_OBS=f"2026-11-24T17:{i:02d}:00")
            path = night / f"flat_{i:03d}.fits"
            hdu.writeto(path)
            total += path.stat().st_size
    return total


RULES = """
capture:
  - path: {captures}
output: {{directory: {masters}}}
inputs: {{move_to: null}}
grouping: {{min_group_size: 3}}
combine: {{method: sigma, sigma: 2.0, normalize: multiplicative}}
engine: {engine}
stable: 0
state: {state}
"""


def run_night(source: Path, work: Path, engine: str) -> float:
    """A fresh copy of the night, then `flatd run-once` on it: its wall seconds."""
    if work.exists():
        shutil.rmtree(work)
    shutil.copytree(source, work / "captures")
    config = work / "flatd.yaml"
    config.write_text(RULES.format(captures=work / "captures", masters=work / "masters", engine=engine,
                                   state=work / "state"))
    started = time.perf_counter()
    done = subprocess.run([str(BIN / "flatd"), "run-once", "--config", str(config)], capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"run-once failed ({engine}): {done.stdout[-800:]}{done.stderr[-800:]}")
    return seconds


def per_group_figures(source: Path, address: str) -> dict:
    """CPU seconds, bytes read and network bytes of one group, in this process."""
    from flatd.config import Engine
    from flatd.grouping import GroupOptions, group_frames
    from flatd.ingest.frames import read_frame
    from flatd.jobs import Job, StackInput
    from flatd.stack.engines.dask import remote_job
    from flatd.stack.engines.local import LocalEngine
    from flatd.stack.methods import Method

    cpu, read, sent, back = [], [], [], []
    for folder in sorted(p for p in source.iterdir() if p.is_dir()):
        frames = [read_frame(p) for p in sorted(folder.glob("*.fits"))]
        (group,), _ = group_frames(frames, GroupOptions())
        job = Job(folder.name, group, None, Method("sigma"), "multiplicative",
                  tuple(StackInput(f) for f in group.frames), folder, "m.fits", None)
        engine = LocalEngine(Engine(workers=1))
        started = time.thread_time()
        result = engine.stack(job)
        cpu.append(time.thread_time() - started)
        read.append(sum(f.file_size for f in frames))
        sent.append(len(pickle.dumps((remote_job(job, {}), Engine(kind="dask", address=address)))))
        back.append(len(pickle.dumps(result)))
    return {"cpu": statistics.median(cpu), "read": statistics.median(read), "sent": statistics.median(sent),
            "back": statistics.median(back), "groups": len(cpu)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--groups", type=int, default=12)
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--height", type=int, default=1536)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cache", type=Path, default=None, help="folder for the night (kept between runs)")
    args = ap.parse_args()
    from distributed import LocalCluster

    cache = args.cache or ROOT / "bench" / "cache" / f"scale-{args.groups}x{args.frames}x{args.width}x{args.height}"
    if not (cache / "done").exists():
        say(f"writing the night into {cache}")
        shutil.rmtree(cache, ignore_errors=True)
        cache.mkdir(parents=True)
        make_night(cache / "night", args.groups, args.frames, (args.height, args.width))
        (cache / "done").write_text("")
    source = cache / "night"
    nbytes = sum(p.stat().st_size for p in source.rglob("*.fits"))
    times: dict[str, list[float]] = {"local": [], "local, 1 thread": [], "dask, 2 workers x 1 thread": []}
    with tempfile.TemporaryDirectory(prefix="flatd-scale-") as tmp, \
            LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                         worker_dashboard_address=None) as cluster:
        engines = {"local": "{kind: local}", "local, 1 thread": "{kind: local, workers: 1}",
                   "dask, 2 workers x 1 thread": f"{{kind: dask, address: '{cluster.scheduler_address}', "
                                                 "fallback: fail, workers: 1}"}
        for r in range(args.rounds):
            for label, engine in engines.items():
                seconds = run_night(source, Path(tmp) / "work", engine)
                times[label].append(seconds)
                say(f"round {r + 1}/{args.rounds}  {label:28s} {seconds:6.2f} s")
        figures = per_group_figures(source, cluster.scheduler_address)
    print(f"machine: {platform.system()} {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    print()
    print(f"A night of {args.groups} groups x {args.frames} flats of {args.width}x{args.height} uint16 "
          f"({nbytes / 1e6:.0f} MB), sigma 2 normalized, `flatd run-once` whole process, median of "
          f"{args.rounds} (min-max):")
    print()
    print("| engine | night s | per group s |")
    print("|---|---:|---:|")
    for label, values in times.items():
        med = statistics.median(values)
        print(f"| {label} | {med:.2f} ({min(values):.2f}-{max(values):.2f}) | {med / args.groups:.3f} |")
    local1 = statistics.median(times["local, 1 thread"])
    dask = statistics.median(times["dask, 2 workers x 1 thread"])
    print()
    ideal = local1 / 2  # two workers of one thread each, with nothing lost
    print(f"Two Dask workers of one thread against one local thread: {local1 / dask:.2f} x as fast (ideal 2). "
          f"The cluster path's overhead against that ideal: {dask - ideal:+.2f} s a night, "
          f"{(dask - ideal) / args.groups:+.3f} s a group (importing distributed and connecting included).")
    print()
    mp = args.width * args.height * args.frames / 1e6
    print("Per group, in one process (median over the groups):")
    print()
    print("| figure | value |")
    print("|---|---:|")
    print(f"| stacking CPU s (one thread) | {figures['cpu']:.3f} |")
    print(f"| CPU s per megapixel-frame | {figures['cpu'] / mp * 1000:.2f} ms |")
    print(f"| bytes read (the flats) | {figures['read'] / 1e6:.1f} MB |")
    print(f"| network: job to the worker (pickled) | {figures['sent'] / 1e3:.1f} kB |")
    print(f"| network: result to the coordinator (pickled) | {figures['back'] / 1e6:.1f} MB |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
