#!/usr/bin/env python3
"""Benchmark flatd against Siril and ccdproc on the same files (a script, not a test).

Generates flat stacks once into a cache folder, then runs each tool as its own process
and measures wall time and peak RSS (os.wait4's ru_maxrss of that process). Prints a
table per stack with the ratio of each time to Siril's time for the same kind of job.

    python bench/bench.py                      # 32 x 3264x2448, all tools found
    python bench/bench.py --big                # also 100 x 6252x4176, flatd only (memory bound)
    python bench/bench.py --inspect            # also flatd inspect vs ImageFileCollection on 2,000 files
    python bench/bench.py --dry-run            # also flatd run-once --dry-run on 300 flats (planning only)
    python bench/bench.py --new winsorized,mad # only these of the rejection algorithms (default: all registered)

Besides the original four methods, each rejection algorithm of issue 9 that flatd's
registry holds when the script runs (sigma-iterative, winsorized, linear-fit, esd, mad,
percentile; a missing one is skipped with a note) runs with its default thresholds, with
and without normalization, against Siril's same algorithm with the same thresholds on
the same files (`stack ... rej {s|w|l|g|a|p} LOW HIGH -nonorm | -norm=mul`): the
"vs Siril same" column is flatd's time over that Siril run's.
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
    key: str = ""  # rows with the same key are the same job (algorithm, thresholds, normalization)


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


def best_of(repeat: int, cmd, enough: float | None = None, **kw) -> tuple[float, float, int, str]:
    """The fastest of `repeat` runs; none after a run slower than `enough` seconds (when given)."""
    runs = []
    for _ in range(repeat):
        runs.append(measure(cmd, **kw))
        if enough is not None and runs[-1][0] > enough:
            break
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
            results.append(Result("flatd", label, secs, rss, code == 0, "" if code == 0 else text[-300:], key=label))
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


def siril_isolated(folder: Path) -> tuple[dict, Path]:
    """Environment and -i config file for siril-cli runs that change no other run's settings.

    The file extension (setext) is a global preference that Siril saves in its config
    file. Siril 1.0.6 given `-i FILE` reads and saves FILE if it exists; if it does not,
    it saves its defaults to $XDG_CONFIG_HOME/siril/siril.config instead. With
    XDG_CONFIG_HOME in `folder` and FILE that very path, both cases stay in `folder`.
    """
    xdg = folder / "xdg"
    (xdg / "siril").mkdir(parents=True, exist_ok=True)
    return dict(os.environ, XDG_CONFIG_HOME=str(xdg)), xdg / "siril" / "siril.config"


def siril_sequence(files: list[Path], out: Path) -> tuple[str, Path, dict, Path] | None:
    """(siril-cli, the linked sequence's folder, env, config), or None without Siril."""
    siril = shutil.which("siril-cli")
    if not siril:
        return None
    env, config = siril_isolated(out)
    seq = files[0].parent / "siril-fit"  # linked with `setext fit` (an older "siril" folder is not reused)
    if not (seq / "flat_.seq").exists():
        seq.mkdir(exist_ok=True)
        script = out / "link.ssf"
        script.write_text(f"requires 1.0.0\nsetext fit\ncd {files[0].parent}\nlink flat_ -out={seq}\n")
        subprocess.run([siril, "-i", str(config), "-s", str(script)], check=True, capture_output=True, env=env)
    return siril, seq, env, config


def siril_stack(siril_run, out: Path, repeat: int, name: str, args: str) -> tuple[float, float, bool, str]:
    siril, seq, env, config = siril_run
    script = out / f"stack-{name}.ssf"
    target = out / f"siril-{name}"
    script.write_text(f"requires 1.0.0\nsetext fit\ncd {seq}\nstack flat_ {args} -out={target}\n")
    # Siril 1.0.6's MAD clipping takes minutes on 32 x 8 MP: one run of it is enough
    secs, rss, code, text = best_of(repeat, [siril, "-i", str(config), "-s", str(script)], enough=30.0, env=env)
    ok = code == 0 and "successfully" in text
    Path(str(target) + ".fit").unlink(missing_ok=True)
    return secs, rss, ok, "" if ok else text[-300:]


def siril_version() -> str:
    siril = shutil.which("siril-cli")
    out = subprocess.run([siril, "--version"], capture_output=True, text=True).stdout.strip() if siril else ""
    return out or "siril"


def run_siril(files: list[Path], out: Path, repeat: int, methods) -> list[Result]:
    siril_run = siril_sequence(files, out)
    if siril_run is None:
        return []
    version = siril_version()
    results = []
    stacks = {"sigma": "rej s 2 2 -nonorm", "median": "med -nonorm"}
    for method in [m for m in methods if m in stacks]:
        secs, rss, ok, note = siril_stack(siril_run, out, repeat, method, stacks[method])
        results.append(Result(version, method, secs, rss, ok, note, key=method))
    return results


# ------------------------------------------------------------- issue 9's rejection algorithms

# flatd's method -> Siril's rejection letter (Siril 1.0.6: `stack seq rej LETTER LOW HIGH`)
NEW_METHODS = {"sigma-iterative": "s", "winsorized": "w", "linear-fit": "l", "esd": "g", "mad": "a",
               "percentile": "p"}


def new_methods(wanted: list[str] | None) -> list[str]:
    """The rejection algorithms to measure: those registered now (a note for each missing one)."""
    try:
        from flatd.stack import methods as registry
    except ImportError:
        print("note: flatd's registry cannot be imported: no rejection algorithm measured")
        return []
    names = registry.names()
    chosen = []
    for name in wanted if wanted is not None else list(NEW_METHODS):
        if name not in NEW_METHODS:
            print(f"note: {name!r} has no Siril counterpart here; skipped")
        elif name not in names:
            print(f"note: flatd method {name!r} is not registered (yet); skipped")
        else:
            chosen.append(name)
    return chosen


# Siril's default thresholds, for a method whose own cannot be read off its parameters
SIRIL_DEFAULTS = {"s": (3, 3), "w": (3, 3), "l": (5, 5), "g": (0.3, 0.05), "a": (3, 3), "p": (0.2, 0.1)}


def thresholds(name: str) -> tuple[float, float]:
    """The method's default (low, high), as Siril takes them: for esd (fraction of
    outliers, significance), as Siril's GESDT."""
    from flatd.stack import methods as registry

    params = registry.Method(name).params
    if name == "esd":
        outliers = next((v for k, v in params.items() if "outlier" in k), None)
        significance = next((v for k, v in params.items() if "signif" in k), None)
        if outliers is not None and significance is not None:
            return outliers, significance
    elif "low" in params and "high" in params:
        return params["low"], params["high"]
    print(f"note: {name}'s thresholds are not low/high parameters: Siril runs with its own defaults")
    return SIRIL_DEFAULTS[NEW_METHODS[name]]


def run_new(files: list[Path], out: Path, repeat: int, names: list[str], peers: bool) -> list[Result]:
    """Each algorithm with and without normalization: flatd's run, then Siril's same job."""
    results = []
    flatd = str(BIN / "flatd")
    siril_run = siril_sequence(files, out) if peers else None
    version = siril_version() if siril_run else ""
    for name in names:
        lo, hi = thresholds(name)
        # one untimed run, so that numba's cache holds this method's kernel, as after the first run
        warm = out / f"warm-{name}.fits"
        measure([flatd, "combine", "-rp", "--method", name, "-o", str(warm), *map(str, files[:5])])
        warm.unlink(missing_ok=True)
        for normalize, siril_norm in (("none", "-nonorm"), ("multiplicative", "-norm=mul")):
            label = f"{name} {lo:g} {hi:g}" + (" +norm" if normalize != "none" else "")
            target = out / f"flatd-{name}-{normalize}.fits"
            cmd = [flatd, "combine", "-rp", "--normalize", normalize, "--method", name, "-o", str(target)]
            secs, rss, code, text = best_of(repeat, cmd + [str(f) for f in files])
            results.append(Result("flatd", label, secs, rss, code == 0, "" if code == 0 else text[-300:], key=label))
            target.unlink(missing_ok=True)
            if siril_run:
                letter = NEW_METHODS[name]
                secs, rss, ok, note = siril_stack(siril_run, out, repeat, f"{name}{siril_norm}",
                                                  f"rej {letter} {lo:g} {hi:g} {siril_norm}")
                results.append(Result(version, f"{label} (rej {letter})", secs, rss, ok, note, key=label))
    return results


# ------------------------------------------------------------------------- report


def print_table(title: str, results: list[Result]) -> None:
    """One row per run; "vs Siril same" is the time over Siril's run of the same job (same key)."""
    siril = {r.key: r.seconds for r in results if r.tool.startswith("siril") and r.ok and r.key}
    print(f"\n{title}\n")
    print("| tool | method | wall s | peak RSS MB | vs Siril sigma | vs Siril median | vs Siril same |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in results:
        vs_sigma = f"{r.seconds / siril['sigma']:.2f}x" if "sigma" in siril else ""
        vs_median = f"{r.seconds / siril['median']:.2f}x" if "median" in siril else ""
        vs_same = f"{r.seconds / siril[r.key]:.2f}x" if r.key in siril else ""
        status = "" if r.ok else f" FAILED: {r.note.strip()[:80]}"
        print(f"| {r.tool} | {r.method}{status} | {r.seconds:.2f} | {r.rss_mb:.0f} | {vs_sigma} | {vs_median} "
              f"| {vs_same} |")


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
    ap.add_argument("--new", default=None,
                    help="rejection algorithms of issue 9 to measure against Siril's (default: every registered one; "
                         "'' for none): " + ",".join(NEW_METHODS))
    args = ap.parse_args()

    methods = args.methods.split(",")
    new = new_methods(None if args.new is None else [m for m in args.new.split(",") if m])
    print(f"machine: {machine()}")
    files = generate_stack(args.cache / f"{args.frames}x{args.width}x{args.height}", args.frames, args.width, args.height)
    with tempfile.TemporaryDirectory(prefix="flatd-bench-") as tmp:
        out = Path(tmp)
        results = run_flatd(files, out, args.repeat, methods, None)
        if not args.no_peers:
            results += run_siril(files, out, args.repeat, methods)
            results += run_ccdproc(files, out, 1, methods)
        if new:
            results += run_new(files, out, args.repeat, new, not args.no_peers)
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
