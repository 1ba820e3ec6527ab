#!/usr/bin/env python3
"""Benchmark flatd against Siril and ccdproc on the same files (a script, not a test).

Generates flat stacks once into a cache folder, then runs each tool as its own process
and measures wall time and peak RSS (os.wait4's ru_maxrss of that process). Prints a
table per stack with the ratio of each time to Siril's time for the same kind of job.

    python bench/bench.py                      # 32 x 3264x2448, all tools found
    python bench/bench.py --big                # also 100 x 6252x4176, flatd only (memory bound)
    python bench/bench.py --inspect            # also flatd inspect vs ImageFileCollection on 2,000 files
    python bench/bench.py --dry-run            # also flatd run-once --dry-run on 300 flats (planning only)
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BIN = Path(sys.executable).parent


@dataclass
class Result:
    tool: str
    method: str
    seconds: float
    rss_mb: float
    ok: bool
    note: str = ""


def generate_stack(folder: Path, count: int, width: int, height: int, seed: int = 1) -> list[Path]:
    """uint16 (BZERO 32768) flats with vignetting, sky drift, noise and a few cosmic rays."""
    from astropy.io import fits

    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"flat_{i:04d}.fits" for i in range(count)]
    if all(p.exists() for p in paths):
        return paths
    rng = np.random.default_rng(seed)
    y = np.linspace(-1, 1, height, dtype=np.float32)[:, None]
    x = np.linspace(-1, 1, width, dtype=np.float32)[None, :]
    vignette = 1.0 - 0.3 * (x * x + y * y)
    for i, path in enumerate(paths):
        if path.exists():
            continue
        level = 20000.0 * (1 + 0.02 * (i % 7))
        data = vignette * level + rng.standard_normal((height, width), dtype=np.float32) * 120 + 500
        hits = rng.integers(0, [height, width], size=(20, 2))
        data[hits[:, 0], hits[:, 1]] = 65000
        hdu = fits.PrimaryHDU(np.clip(data, 0, 65535).astype(np.uint16))
        hdu.header.update(IMAGETYP="FLAT", FILTER="L", EXPTIME=1.5, EXPOSURE=1.5, XBINNING=1, YBINNING=1)
        hdu.header["CCD-TEMP"] = -10.0
        tmp = path.with_suffix(".tmp")
        hdu.writeto(tmp, overwrite=True)
        tmp.rename(path)
        print(f"  generated {path.name}", end="\r", flush=True)
    print()
    return paths


# Linux carries the parent's RSS high-water mark into a child's ru_maxrss across fork and
# exec, so this large benchmark process must not be the tool's parent: a bare launcher
# (about 7 MB, counted in every figure) forks the tool and reports its ru_maxrss.
LAUNCHER = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as out:
    out.write(str(usage.ru_maxrss))
os._exit(os.waitstatus_to_exitcode(status))
"""


def measure(cmd: list[str], cwd: Path | None = None, env: dict | None = None) -> tuple[float, float, int, str]:
    """Wall seconds, peak RSS (MB) and exit status of one process."""
    with tempfile.TemporaryFile() as log, tempfile.NamedTemporaryFile("r") as rss:
        start = time.perf_counter()
        # a file, not a pipe, for the output: a full pipe would block the tool
        proc = subprocess.run([sys.executable, "-S", "-c", LAUNCHER, rss.name, *cmd], cwd=cwd, env=env,
                              stdout=log, stderr=subprocess.STDOUT)
        seconds = time.perf_counter() - start
        log.seek(0)
        output = log.read().decode(errors="replace")
        peak_kb = int(rss.read() or 0)
    return seconds, peak_kb / 1024.0, proc.returncode, output


def best_of(repeat: int, cmd, **kw) -> tuple[float, float, int, str]:
    runs = [measure(cmd, **kw) for _ in range(repeat)]
    return min(runs, key=lambda r: r[0])


# ------------------------------------------------------------------------- tools

FLATD_METHODS = {"sigma": ["-s", "2.0"], "minmax": ["-mm", "2"], "median": ["-n"], "mean": ["-m"]}


def run_flatd(files: list[Path], out: Path, repeat: int, methods, memory_limit: str | None) -> list[Result]:
    results = []
    flatd = str(BIN / "flatd")
    # One untimed run so that numba's cache is warm, as it is for every run after the first.
    measure([flatd, "combine", "-rp", "-m", "-o", str(out / "warm.fits"), *map(str, files[:3])])
    for method in methods:
        for normalize in ("none", "multiplicative"):
            target = out / f"flatd-{method}-{normalize}.fits"
            cmd = [flatd, "combine", "-rp", "--normalize", normalize, *FLATD_METHODS[method], "-o", str(target)]
            if memory_limit:
                cmd += ["--memory-limit", memory_limit]
            secs, rss, code, text = best_of(repeat, cmd + [str(f) for f in files])
            label = method if normalize == "none" else f"{method} +norm"
            results.append(Result("flatd", label, secs, rss, code == 0, "" if code == 0 else text[-300:]))
            for p in out.glob("flatd-*.fits*"):
                p.unlink()
    return results


CCDPROC_SCRIPT = """
import sys, numpy as np
from ccdproc import combine
method, out, files = sys.argv[1], sys.argv[2], sys.argv[3:]
if method == "sigma":
    img = combine(files, method="average", sigma_clip=True, sigma_clip_low_thresh=2, sigma_clip_high_thresh=2,
                  sigma_clip_func=np.ma.mean, sigma_clip_dev_func=np.ma.std, unit="adu", dtype=np.float32)
else:
    img = combine(files, method="median", unit="adu", dtype=np.float32)
img.write(out, overwrite=True)
"""


def run_ccdproc(files: list[Path], out: Path, repeat: int, methods) -> list[Result]:
    try:
        import ccdproc  # noqa: F401
    except ImportError:
        return []
    results = []
    for method in [m for m in methods if m in ("sigma", "median")]:
        target = out / f"ccdproc-{method}.fits"
        secs, rss, code, text = best_of(repeat, [sys.executable, "-c", CCDPROC_SCRIPT, method, str(target), *map(str, files)])
        results.append(Result("ccdproc", method, secs, rss, code == 0, "" if code == 0 else text[-300:]))
        target.unlink(missing_ok=True)
    return results


def run_siril(files: list[Path], out: Path, repeat: int, methods) -> list[Result]:
    siril = shutil.which("siril-cli")
    if not siril:
        return []
    seq = files[0].parent / "siril"
    if not (seq / "flat_.seq").exists():
        seq.mkdir(exist_ok=True)
        script = out / "link.ssf"
        script.write_text(f"requires 1.0.0\nsetext fits\ncd {files[0].parent}\nlink flat_ -out={seq}\n")
        subprocess.run([siril, "-s", str(script)], check=True, capture_output=True)
    version = subprocess.run([siril, "--version"], capture_output=True, text=True).stdout.strip()
    results = []
    stacks = {"sigma": "rej s 2 2 -nonorm", "median": "med -nonorm"}
    for method in [m for m in methods if m in stacks]:
        script = out / f"stack-{method}.ssf"
        target = out / f"siril-{method}"
        script.write_text(f"requires 1.0.0\nsetext fits\ncd {seq}\nstack flat_ {stacks[method]} -out={target}\n")
        secs, rss, code, text = best_of(repeat, [siril, "-s", str(script)])
        ok = code == 0 and "successfully" in text
        results.append(Result(version or "siril", method, secs, rss, ok, "" if ok else text[-300:]))
        Path(str(target) + ".fits").unlink(missing_ok=True)
    return results


# ------------------------------------------------------------------------- report


def print_table(title: str, results: list[Result]) -> None:
    siril = {r.method: r.seconds for r in results if r.tool.startswith("siril") and r.ok}
    print(f"\n{title}\n")
    print("| tool | method | wall s | peak RSS MB | vs Siril sigma | vs Siril median |")
    print("|---|---|---:|---:|---:|---:|")
    for r in results:
        vs_sigma = f"{r.seconds / siril['sigma']:.2f}x" if "sigma" in siril else ""
        vs_median = f"{r.seconds / siril['median']:.2f}x" if "median" in siril else ""
        status = "" if r.ok else f" FAILED: {r.note.strip()[:80]}"
        print(f"| {r.tool} | {r.method}{status} | {r.seconds:.2f} | {r.rss_mb:.0f} | {vs_sigma} | {vs_median} |")


def machine() -> str:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores ({cpu}), {mem:.0f} GiB, Python {platform.python_version()}"


def bench_inspect(cache: Path, count: int = 2000) -> None:
    folder = cache / f"inspect-{count}"
    if not (folder / f"f{count - 1:05d}.fits").exists():
        from astropy.io import fits

        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            hdu = fits.PrimaryHDU(np.zeros((16, 16), np.uint16))
            hdu.header.update(IMAGETYP="FLAT" if i % 3 else "LIGHT", FILTER="LRGB"[i % 4], EXPTIME=1.0 + i % 5)
            hdu.header["CCD-TEMP"] = -10 + (i % 3) * 0.1
            hdu.writeto(folder / f"f{i:05d}.fits", overwrite=True)
    flatd_secs, flatd_rss, code, _ = best_of(3, [str(BIN / "flatd"), "inspect", str(folder)])
    script = ("import sys\nfrom ccdproc import ImageFileCollection\n"
              "c = ImageFileCollection(sys.argv[1], keywords=['imagetyp','filter','exptime','ccd-temp','naxis1','naxis2'])\n"
              "print(c.summary)\n")
    try:
        import ccdproc  # noqa: F401

        ifc_secs, ifc_rss, _, _ = best_of(3, [sys.executable, "-c", script, str(folder)])
    except ImportError:
        ifc_secs = float("nan")
    print(f"\nflatd inspect of {count} files: {flatd_secs:.2f} s ({flatd_rss:.0f} MB); "
          f"ImageFileCollection: {ifc_secs:.2f} s; ratio {ifc_secs / flatd_secs:.1f}x (whole processes)")


def bench_dry_run(cache: Path, count: int = 300) -> None:
    """run-once --dry-run plans without the engine: its time, memory and heavy imports."""
    root = cache / f"dry-run-{count}"
    folder = root / "captures" / "night1"
    if not (folder / f"flat_{count - 1:04d}.fits").exists():
        from astropy.io import fits

        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            hdu = fits.PrimaryHDU(np.full((32, 48), 20000, np.uint16))
            hdu.header.update(IMAGETYP="FLAT", FILTER="LRG"[i % 3], EXPTIME=1.5, XBINNING=1, YBINNING=1,
                              DATE_OBS=f"2026-11-30T20:{i // 60 % 60:02d}:{i % 60:02d}")
            hdu.header["CCD-TEMP"] = -10.0
            hdu.writeto(folder / f"flat_{i:04d}.fits", overwrite=True)
    rules = root / "flatd.yaml"
    rules.write_text(f"capture:\n  - path: {root / 'captures'}\nstate: {root / 'state'}\n"
                     "precalibration: {mode: none}\nstable: 0\n")
    probe = ("import sys\nfrom flatd.cli import main\nrc = main(sys.argv[1:])\n"
             "print('heavy modules loaded:', [m for m in ('numba', 'astropy') if m in sys.modules] or 'none')\n"
             "sys.exit(rc)\n")
    secs, rss, code, text = best_of(3, [sys.executable, "-c", probe, "run-once", "--config", str(rules), "--dry-run"])
    loaded = next((line for line in text.splitlines() if line.startswith("heavy modules")), "?")
    print(f"\nflatd run-once --dry-run of {count} flats: {secs:.2f} s ({rss:.0f} MB), exit {code}; {loaded}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=32)
    ap.add_argument("--width", type=int, default=3264)
    ap.add_argument("--height", type=int, default=2448)
    ap.add_argument("--repeat", type=int, default=2, help="runs per measurement; the fastest is kept")
    ap.add_argument("--methods", default="sigma,minmax,median,mean")
    ap.add_argument("--cache", type=Path, default=HERE / "cache")
    ap.add_argument("--big", action="store_true", help="also 100 x 6252x4176 (5.2 GB of files), flatd only")
    ap.add_argument("--inspect", action="store_true", help="also flatd inspect vs ImageFileCollection")
    ap.add_argument("--dry-run", action="store_true", help="also run-once --dry-run on 300 flats")
    ap.add_argument("--no-peers", action="store_true", help="flatd only")
    args = ap.parse_args()

    methods = args.methods.split(",")
    print(f"machine: {machine()}")
    files = generate_stack(args.cache / f"{args.frames}x{args.width}x{args.height}", args.frames, args.width, args.height)
    with tempfile.TemporaryDirectory(prefix="flatd-bench-") as tmp:
        out = Path(tmp)
        results = run_flatd(files, out, args.repeat, methods, None)
        if not args.no_peers:
            results += run_siril(files, out, args.repeat, methods)
            results += run_ccdproc(files, out, 1, methods)
        print_table(f"{args.frames} flats of {args.width}x{args.height} uint16, whole process "
                    f"(read, combine, write); best of {args.repeat}", results)
        if args.big:
            big = generate_stack(args.cache / "100x6252x4176", 100, 6252, 4176)
            results = run_flatd(big, out, 1, ["sigma"], "512MiB")
            print_table("100 flats of 6252x4176 uint16, memory_limit 512MiB (target: peak RSS <= 512 MiB + 250 MB)", results)
    if args.inspect:
        bench_inspect(args.cache)
    if args.dry_run:
        bench_dry_run(args.cache)
    return 0


if __name__ == "__main__":
    sys.exit(main())
