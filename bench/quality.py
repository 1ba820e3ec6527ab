#!/usr/bin/env python3
"""Quality benchmark: how close each combine method's master comes to the truth (a script, not a test).

Seeded synthetic scenarios with a known illumination pattern T (vignetting x dust donuts x
PRNU, mean 1). Frame i holds, in electrons (gain 1 e-/ADU, so in ADU too),

    S_i(p) = L_i * T(p) * A_i(p) + stars_i(p)

(L_i its true level, A_i a multiplicative disturbance: gradient or cloud, 1 elsewhere),
drawn with Poisson photon noise, plus Gaussian read noise (RN = 5 e-), plus cosmic-ray
hits (150 per 512x512 frame: single pixels or tracks of 2-3, log-uniform 300-40,000 ADU
above the sky), rounded and written as uint16 FITS with BZERO 32768, as capture programs
write them. No bias pedestal: every tool combines the files as they are (`flatd combine
-rp`). Levels are about 22,000 ADU (panels) and 21,000 ADU (sky, +-4 %).

Scenarios (512x512 by default):

    a   panel flats, 16 frames, single cosmic-ray hits (no pixel hit twice)
    b   small stack, 7 frames, single hits plus 400 pixels hit in two frames
    c   twilight sky flats, 20 frames, stars at other positions in each frame, sky level
        falling from 30,000 to 12,000 ADU (normalization matters)
    d1  sky flats, 20 frames, a gradient whose direction and strength change from frame
        to frame (they cancel over the stack)
    d2  sky flats, 20 frames, one gradient shared by all frames (cannot be removed)
    e   sky flats, 20 frames, a cloud (20-32 % darker, soft edge) passing in 3 of them
    n3, n5, n8, n15, n40   panel flats with cosmic rays, groups of 3 .. 40 frames (for the
        choice of `method: auto` by group size)

Methods: every method in flatd's registry (flatd.stack.methods.names() when the script
runs), with its default parameters, through the installed CLI, whole process:

    .venv/bin/flatd combine -rp --normalize multiplicative --method NAME -o out.fits FILES

(`auto` too, if the CLI accepts it); skipped where the group is smaller than the
method's minimum (minmax: 2n+1). Siril (siril-cli, if installed): `stack seq rej X lo hi
-norm=mul` for X in s (sigma), m (median sigma), w (winsorized), l (linear fit), g
(GESDT), a (MAD), p (percentile), with Siril's default thresholds (SIRIL_REJECTIONS below),
and `stack seq med -norm=mul`; one siril-cli process per scenario, with its own config
file (-i, see siril_isolated) and `setext fit` in its script, so that runs do not
change each other or the user's Siril settings.

Scores, in % (whole frame): the master M is brought to the truth's scale by a robust
global factor s = median(M / T); the error is E = M / (s T) - 1;

    RMS %    = 100 sqrt(mean over pixels of E^2)
    worst %  = 100 max over pixels of |E|

The photon-noise floor is the RMS error (%) that a perfect combine would have: the
plain mean of the normalized frames that are clean at each pixel (no cosmic ray, no
star above 0.1 sigma of the noise, no cloud above 0.1 sigma), computed from the model,
not from the drawn noise:

    floor % = 100 sqrt( mean over pixels p of  sum_{i clean at p} v_i(p) / Nc(p)^2 )
    v_i(p)  = (S_i(p) + RN^2 + 1/12) / (L_i T(p))^2

the relative variance of a clean normalized frame (photons, read noise, rounding) over
the number Nc(p) of clean frames at p. With equal levels this is sqrt(mean v / Nc).
RMS/floor says how far a method is from it. For d2 (a gradient that every frame
shares) the floor is printed but RMS/floor is "n/a": no combine can remove a shared
gradient. The "oracle" row of each table is that perfect combine done on the drawn
frames (the frames clean at each pixel, each divided by its true level): its RMS is the
floor give or take this draw's luck (a method may land a little below the floor by luck
too), and its worst % is the worst pixel that photon noise alone makes.

Normalization (issue 9, item 4): for c, d1, d2 and e the tables also give "norm err %",
the largest |f_i / t_i / median_j(f_j / t_j) - 1| over frames, where f_i is the factor
flatd applied to frame i (from the master's HISTORY cards) and t_i = 1 / L_i the true
one (a common scale does not matter); a line per scenario lists it frame by frame.
For e, "cloud RMS %" is the RMS error over the cloud's footprint only.

    python bench/quality.py                        # everything, 512x512 (a few minutes)
    python bench/quality.py --scenarios a,e --methods median,sigma --no-siril
    python bench/quality.py --size 64 --methods mean,median    # a quick smoke run
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import siril_isolated  # noqa: E402  (the one way both benchmarks isolate Siril)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BIN = Path(sys.executable).parent
FLATD = BIN / "flatd"

GAIN = 1.0  # e-/ADU
READ_NOISE = 5.0  # e-
CLEAN_SIGMA = 0.1  # a disturbance below this fraction of the noise leaves a pixel clean

# Siril's rejections: (letter, low, high), its default thresholds (GUI and documentation).
SIRIL_REJECTIONS = {
    "sigma": ("s", 3, 3),
    "median-sigma": ("m", 3, 3),
    "winsorized": ("w", 3, 3),
    "linear-fit": ("l", 5, 5),
    "gesdt": ("g", 0.3, 0.05),
    "mad": ("a", 3, 3),
    "percentile": ("p", 0.2, 0.1),
}


# --------------------------------------------------------------------------- model


@dataclass
class Scenario:
    key: str
    title: str
    frames: int
    kind: str  # panel | twilight | gradient | shared-gradient | cloud
    seed: int
    double_hits: int = 0  # pixels hit in two frames (scenario b)


SCENARIOS = [
    Scenario("a", "panel flats, single cosmic-ray hits", 16, "panel", 11),
    Scenario("b", "small stack, pixels hit by cosmic rays in two frames", 7, "panel", 12, double_hits=400),
    Scenario("c", "twilight sky flats, stars at other positions in each frame, falling sky level", 20, "twilight", 13),
    Scenario("d1", "sky flats, gradient changing direction and strength from frame to frame", 20, "gradient", 14),
    Scenario("d2", "sky flats, one gradient shared by all frames", 20, "shared-gradient", 15),
    Scenario("e", "sky flats, a cloud passing in 3 of 20 frames", 20, "cloud", 16),
] + [Scenario(f"n{n}", f"panel flats with cosmic rays, {n} frames", n, "panel", 100 + n) for n in (3, 5, 8, 15, 40)]
GROUP_KEYS = ["n3", "n5", "n8", "n15", "a", "n40"]  # a is the group of 16
NORM_KEYS = {"c", "d1", "d2", "e"}


@dataclass
class Stack:
    scenario: Scenario
    truth: np.ndarray  # T, mean 1
    levels: np.ndarray  # L_i
    floor_var: np.ndarray  # per-pixel relative variance of a perfect combine (nan: no clean frame)
    paths: list[Path]
    region: Optional[np.ndarray] = None  # cloud footprint
    region_name: str = ""
    floor_applies: bool = True
    clean: Optional[np.ndarray] = None  # (frames, H, W): where each frame is clean


def illumination(rng: np.random.Generator, size: int) -> np.ndarray:
    """Vignetting x dust donuts x PRNU, mean 1."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    x = (xx + 0.5) / size * 2 - 1 - 0.08
    y = (yy + 0.5) / size * 2 - 1 + 0.05
    vignette = 1.0 - 0.32 * (x * x + y * y)
    dust = np.ones((size, size))
    scale = size / 512
    for _ in range(7):
        cx, cy = rng.uniform(0.1, 0.9, 2) * size
        radius = rng.uniform(6, 40) * scale + 1.5
        depth = rng.uniform(0.02, 0.12)
        edge = max(0.6, 0.08 * radius)
        r = np.hypot(xx - cx, yy - cy)
        disc = 1 / (1 + np.exp((r - radius) / edge))
        hole = 1 / (1 + np.exp((r - 0.4 * radius) / edge))
        dust *= 1 - depth * (disc - 0.7 * hole)
    prnu = 1 + 0.008 * rng.standard_normal((size, size))
    t = vignette * dust * prnu
    return t / t.mean()


def soft_disc(size: int, cx: float, cy: float, rx: float, ry: float, edge: float) -> np.ndarray:
    """1 inside an ellipse, 0 outside, a smooth edge (exactly 0 beyond 4 edges)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    d = (np.hypot((xx - cx) / rx, (yy - cy) / ry) - 1) * min(rx, ry) / edge
    out = 1 / (1 + np.exp(np.clip(d, -50, 50)))
    out[d > 8] = 0.0
    return out


def cosmic_hits(rng, size: int, count: int, exclude: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Hits (rows, cols, ADU): single pixels and short tracks, amplitudes log-uniform
    300..40,000 ADU, never on a pixel in `exclude` (which is updated)."""
    hits = []
    made = 0
    while made < count:
        r, c = rng.integers(1, size - 3, 2)
        length = rng.choice([1, 1, 1, 2, 3])
        vertical = rng.random() < 0.5
        rows = np.array([r + k if vertical else r for k in range(length)])
        cols = np.array([c if vertical else c + k for k in range(length)])
        if exclude[rows, cols].any():
            continue
        exclude[rows, cols] = True
        amp = math.exp(rng.uniform(math.log(300), math.log(40000)))
        hits.append((rows, cols, amp * rng.uniform(0.4, 1.0, length)))
        made += 1
    return hits


def write_frame(path: Path, adu: np.ndarray, index: int) -> None:
    from astropy.io import fits

    data = np.clip(np.rint(adu), 0, 65535).astype(np.uint16)
    hdu = fits.PrimaryHDU(data)  # astropy writes uint16 as int16 with BZERO 32768
    hdu.header.update(IMAGETYP="FLAT", FILTER="L", EXPTIME=2.0, EXPOSURE=2.0, XBINNING=1, YBINNING=1,
                      GAIN=GAIN, DATE_OBS=f"2026-12-01T17:{index // 60:02d}:{index % 60:02d}.000")
    hdu.header["CCD-TEMP"] = -10.0
    hdu.header.rename_keyword("DATE_OBS", "DATE-OBS")
    hdu.writeto(path, overwrite=True)


def make_stack(sc: Scenario, size: int, folder: Path) -> Stack:
    rng = np.random.default_rng(sc.seed)
    truth = illumination(np.random.default_rng(1), size)  # the same optics in every scenario
    n = sc.frames
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    x = (xx + 0.5) / size * 2 - 1
    y = (yy + 0.5) / size * 2 - 1
    if sc.kind == "twilight":
        levels = 30000.0 * (12000 / 30000) ** (np.arange(n) / max(1, n - 1))
    elif sc.kind == "panel":
        levels = 22000.0 * (1 + 0.01 * rng.standard_normal(n))
    else:
        levels = 21000.0 * (1 + 0.04 * np.sin(np.arange(n) * 0.9))
    folder.mkdir(parents=True, exist_ok=True)
    sum_v = np.zeros((size, size))
    clean_n = np.zeros((size, size))
    region = np.zeros((size, size), bool) if sc.kind == "cloud" else None
    hit_mask = [np.zeros((size, size), bool) for _ in range(n)]
    hits_of: list[list] = [[] for _ in range(n)]
    scale = (size / 512) ** 2
    if sc.kind == "panel":
        taken = np.zeros((size, size), bool)
        for _ in range(int(round(sc.double_hits * scale))):  # the same pixels hit in two frames
            for _attempt in range(100):
                r, c = rng.integers(1, size - 1, 2)
                if not taken[r, c]:
                    break
            taken[r, c] = True
            i, j = rng.choice(n, 2, replace=False)
            for k in (i, j):
                amp = math.exp(rng.uniform(math.log(300), math.log(40000)))
                hits_of[k].append((np.array([r]), np.array([c]), np.array([amp])))
        for k in range(n):
            hits_of[k] += cosmic_hits(rng, size, max(1, int(round(150 * scale))), taken)
        for k in range(n):
            for rows, cols, _ in hits_of[k]:
                hit_mask[k][rows, cols] = True
    cloud_frames = {n // 2 - 1: 0.25, n // 2: 0.32, n // 2 + 1: 0.20} if sc.kind == "cloud" else {}
    paths = []
    clean_masks = np.zeros((n, size, size), bool)
    for i in range(n):
        expected = levels[i] * truth
        disturbed = np.zeros((size, size), bool)
        if sc.kind == "gradient":
            theta = 2 * math.pi * i / n
            strength = (0.01, 0.03, 0.02, 0.015, 0.025)[i % 5] if n % 2 == 0 else 0.02
            expected = expected * (1 + strength * (x * math.cos(theta) + y * math.sin(theta)))
        elif sc.kind == "shared-gradient":
            expected = expected * (1 + 0.03 * (x * math.cos(0.5) + y * math.sin(0.5)))
        elif i in cloud_frames:
            k = i - (n // 2 - 1)
            cloud = soft_disc(size, size * (0.3 + 0.2 * k), size * (0.45 + 0.05 * k), size * 0.16, size * 0.11,
                              size * 0.015)
            attenuation = cloud_frames[i] * cloud
            sigma_rel = np.sqrt(expected + READ_NOISE ** 2) / expected
            disturbed = attenuation > CLEAN_SIGMA * sigma_rel
            region |= disturbed
            expected = expected * (1 - attenuation)
        stars = np.zeros((size, size))
        if sc.kind == "twilight":
            for _ in range(int(round(150 * scale)) or 1):
                cx, cy = rng.uniform(0, size, 2)
                peak = math.exp(rng.uniform(math.log(30), math.log(30000)))
                s = rng.uniform(1.0, 1.8)
                r0, r1 = max(0, int(cy - 6 * s)), min(size, int(cy + 6 * s) + 1)
                c0, c1 = max(0, int(cx - 6 * s)), min(size, int(cx + 6 * s) + 1)
                g = peak * np.exp(-((yy[r0:r1, c0:c1] - cy) ** 2 + (xx[r0:r1, c0:c1] - cx) ** 2) / (2 * s * s))
                stars[r0:r1, c0:c1] += g * truth[r0:r1, c0:c1]
            disturbed = stars > CLEAN_SIGMA * np.sqrt(expected + READ_NOISE ** 2)
        electrons = rng.poisson(expected + stars).astype(np.float64)
        adu = (electrons + rng.normal(0.0, READ_NOISE, (size, size))) / GAIN
        for rows, cols, amp in hits_of[i]:
            adu[rows, cols] += amp
        clean = ~(disturbed | hit_mask[i])
        clean_masks[i] = clean
        # relative variance of this frame, normalized, where it is clean
        v = (expected + READ_NOISE ** 2 + 1 / 12) / (levels[i] * truth) ** 2
        sum_v += np.where(clean, v, 0.0)
        clean_n += clean
        path = folder / f"flat_{i:04d}.fits"
        write_frame(path, adu, i)
        paths.append(path)
    with np.errstate(invalid="ignore", divide="ignore"):
        floor_var = np.where(clean_n > 0, sum_v / clean_n ** 2, np.nan)
    return Stack(sc, truth, levels, floor_var, paths, region, "cloud" if region is not None else "",
                 floor_applies=sc.kind != "shared-gradient", clean=clean_masks)


# --------------------------------------------------------------------------- scoring


@dataclass
class Score:
    tool: str  # flatd | siril
    method: str
    rms: float = float("nan")
    worst: float = float("nan")
    region_rms: float = float("nan")
    norm_err: float = float("nan")
    norm_frames: Optional[np.ndarray] = None
    seconds: float = float("nan")
    note: str = ""

    @property
    def ok(self) -> bool:
        return not self.note


def score(master: np.ndarray, stack: Stack, result: Score) -> Score:
    m = np.asarray(master, dtype=np.float64)
    ratio = m / stack.truth
    s = float(np.median(ratio[np.isfinite(ratio)]))
    err = ratio / s - 1
    result.rms = 100 * math.sqrt(float(np.mean(err * err)))
    result.worst = 100 * float(np.max(np.abs(err)))
    if stack.region is not None and stack.region.any():
        result.region_rms = 100 * math.sqrt(float(np.mean(err[stack.region] ** 2)))
    return result


def oracle(stack: Stack) -> Score:
    """The perfect combine, with this draw of the noise: the mean over the frames clean at
    each pixel, each divided by its true level (the floor is its expected RMS)."""
    from astropy.io import fits

    total = np.zeros(stack.truth.shape)
    for path, level, clean in zip(stack.paths, stack.levels, stack.clean):
        total += np.where(clean, fits.getdata(path).astype(np.float64) / level, 0.0)
    master = total / np.maximum(stack.clean.sum(axis=0), 1)
    return score(master, stack, Score("oracle", "clean frames, true levels"))


def floor_of(stack: Stack, mask: Optional[np.ndarray] = None) -> float:
    v = stack.floor_var if mask is None else stack.floor_var[mask]
    return 100 * math.sqrt(float(np.nanmean(v)))


def factors_from_header(header) -> Optional[np.ndarray]:
    """The per-frame normalization factors flatd wrote in the HISTORY cards (None if absent)."""
    text = " ".join(str(h) for h in header.get("HISTORY", []))
    text = re.sub(r"\s+", " ", text)
    found = re.findall(r"input (\d+)/(\d+): .*?normalization factor ([-+0-9.eE]+)", text)
    if not found:
        return None
    total = int(found[0][1])
    factors = np.full(total, np.nan)
    for index, _, value in found:
        factors[int(index) - 1] = float(value.rstrip("."))
    return factors


def norm_errors(factors: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Per frame, % : how far flatd's factor is from the true one (1/L), a common scale aside."""
    r = factors * levels
    return 100 * (r / np.median(r) - 1)


# --------------------------------------------------------------------------- tools


def flatd_methods(wanted: Optional[list[str]], probe_dir: Path, env: dict) -> list[str]:
    from flatd.stack import methods

    names = list(methods.names())
    if "auto" not in names and cli_accepts_auto(probe_dir, env):
        names.append("auto")
    if wanted:
        for w in wanted:
            if w not in names:
                print(f"note: flatd method {w!r} is not registered; skipped")
        names = [w for w in wanted if w in names]
    return names


def cli_accepts_auto(folder: Path, env: dict) -> bool:
    """Whether `flatd combine --method auto` works (auto may live outside the registry)."""
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(3):
        files.append(folder / f"probe_{i}.fits")
        write_frame(files[-1], np.full((8, 8), 20000.0 + i), i)
    proc = subprocess.run([str(FLATD), "combine", "-rp", "--method", "auto", "-o", str(folder / "auto.fits"),
                           *map(str, files)], capture_output=True, text=True, env=env)
    shutil.rmtree(folder, ignore_errors=True)
    return proc.returncode == 0


def min_frames(name: str) -> int:
    from flatd.stack import methods

    try:
        return methods.Method(name).min_frames
    except ValueError:
        return 1


def run_flatd(stack: Stack, name: str, out: Path, env: dict) -> Score:
    from astropy.io import fits

    result = Score("flatd", name)
    if len(stack.paths) < min_frames(name):
        result.note = f"needs {min_frames(name)} frames"
        return result
    target = out / f"flatd-{stack.scenario.key}-{name}.fits"
    cmd = [str(FLATD), "combine", "-rp", "--normalize", "multiplicative", "--method", name, "-o", str(target),
           *map(str, stack.paths)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    result.seconds = time.perf_counter() - start
    if proc.returncode != 0 or not target.exists():
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-1:] or ["?"]
        result.note = f"failed (exit {proc.returncode}): {tail[0][:100]}"
        return result
    with fits.open(target) as hdul:
        master = hdul[0].data
        factors = factors_from_header(hdul[0].header)
        score(master, stack, result)
    if factors is not None and len(factors) == len(stack.levels):
        result.norm_frames = norm_errors(factors, stack.levels)
        result.norm_err = float(np.max(np.abs(result.norm_frames)))
    target.unlink()
    return result


def siril_version(siril: str) -> str:
    out = subprocess.run([siril, "--version"], capture_output=True, text=True).stdout.strip()
    return out or "siril"


def run_siril_all(stack: Stack, out: Path, siril: str) -> list[Score]:
    """One siril-cli process per scenario: link the files into a sequence, then every stack."""
    from astropy.io import fits

    key = stack.scenario.key
    work = out / f"siril-{key}"
    work.mkdir()
    # Siril links every FITS file of the folder: the scenario's folder holds only its frames.
    seq = work / "seq"
    seq.mkdir()
    env, config = siril_isolated(work)
    jobs = [(f"{name} ({letter} {lo} {hi})", f"rej {letter} {lo} {hi} -norm=mul")
            for name, (letter, lo, hi) in SIRIL_REJECTIONS.items()]
    jobs.append(("median", "med -norm=mul"))
    lines = ["requires 1.0.0", "setext fit", f"cd {stack.paths[0].parent}", f"link flat_ -out={seq}", f"cd {seq}"]
    for i, (_, args) in enumerate(jobs):
        lines.append(f"stack flat_ {args} -out={work / f'm{i}'}")
    script = work / "stack.ssf"
    script.write_text("\n".join(lines) + "\n")
    start = time.perf_counter()
    proc = subprocess.run([siril, "-i", str(config), "-s", str(script)], capture_output=True, text=True, cwd=work,
                          env=env)
    seconds = (time.perf_counter() - start) / len(jobs)
    log = proc.stdout + proc.stderr
    results = []
    for i, (label, _) in enumerate(jobs):
        result = Score("siril", label, seconds=seconds)
        path = work / f"m{i}.fit"
        if not path.exists():
            result.note = f"no output (exit {proc.returncode}): {log.strip().splitlines()[-1][:100] if log.strip() else '?'}"
        else:
            with fits.open(path) as hdul:
                score(hdul[0].data, stack, result)
        results.append(result)
    shutil.rmtree(work, ignore_errors=True)
    return results


# --------------------------------------------------------------------------- report


def fmt(value: float, digits: int = 2) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def print_scenario(stack: Stack, scores: list[Score], siril_name: str) -> None:
    sc = stack.scenario
    floor = floor_of(stack)
    region_floor = floor_of(stack, stack.region) if stack.region is not None and stack.region.any() else None
    print(f"\n### {sc.key}: {sc.title} ({sc.frames} frames)\n")
    floor_text = f"photon-noise floor {floor:.3f} %"
    if not stack.floor_applies:
        floor_text += " (does not apply: the gradient every frame shares cannot be removed; RMS/floor n/a)"
    if region_floor is not None:
        floor_text += f"; over the {stack.region_name} footprint ({100 * stack.region.mean():.1f} % of the frame) {region_floor:.3f} %"
    print(floor_text + "\n")
    cols = ["tool", "method", "RMS %", "worst %", "RMS/floor"]
    if region_floor is not None:
        cols += [f"{stack.region_name} RMS %", f"{stack.region_name} RMS/floor"]
    norm = sc.key in NORM_KEYS
    if norm:
        cols.append("norm err %")
    print("| " + " | ".join(cols) + " |")
    print("|---|---|" + "---:|" * (len(cols) - 2))
    for s in scores:
        tool = {"flatd": "flatd", "siril": siril_name}.get(s.tool, s.tool)
        if not s.ok:
            print(f"| {tool} | {s.method} | {s.note} |" + " |" * (len(cols) - 3))
            continue
        ratio = fmt(s.rms / floor) if stack.floor_applies else "n/a"
        row = [tool, s.method, fmt(s.rms, 3), fmt(s.worst), ratio]
        if region_floor is not None:
            row += [fmt(s.region_rms, 3), fmt(s.region_rms / region_floor)]
        if norm:
            row.append(fmt(s.norm_err, 3) if s.tool == "flatd" else "")
        print("| " + " | ".join(row) + " |")
    if norm:
        first = next((s for s in scores if s.tool == "flatd" and s.norm_frames is not None), None)
        if first is not None:
            per = " ".join(f"{v:+.2f}" for v in first.norm_frames)
            print(f"\nflatd's normalization factor vs the true one, per frame, % ({first.method}): {per}")
        else:
            print("\nflatd's normalization factors: not found in the master header")


def best(scores: list[Score], tool: str, key: Callable[[Score], float]) -> Optional[Score]:
    # auto is one of the others under another name: the best is a method, auto is judged against it
    ok = [s for s in scores if s.tool == tool and s.ok and s.method != "auto" and math.isfinite(key(s))]
    return min(ok, key=key) if ok else None


def label(s: Optional[Score], value: Callable[[Score], float]) -> str:
    return "-" if s is None else f"{s.method} ({value(s):.3f})"


def print_summary(stacks: dict[str, Stack], all_scores: dict[str, list[Score]], have_siril: bool) -> None:
    """Best per scenario; `auto` beside the floor and beside Siril's best (ratios: below 1 is better)."""
    print("\n## Summary: best method per scenario (lowest RMS %; lowest worst %)\n")
    print("oracle worst %: the worst pixel of the perfect combine (photon noise alone). "
          "auto / Siril best: auto's RMS and worst over the best Siril figure of the scenario.\n")
    cols = ["scenario", "frames", "floor %", "oracle worst %", "flatd best RMS", "flatd best worst"]
    if have_siril:
        cols += ["Siril best RMS", "Siril best worst"]
    cols += ["auto RMS % (/floor)", "auto worst %"]
    if have_siril:
        cols.append("auto / Siril best: RMS, worst")
    print("| " + " | ".join(cols) + " |")
    numeric = {"frames", "floor %", "oracle worst %", "auto worst %"}
    print("|" + "|".join("---:" if c in numeric else "---" for c in cols) + "|")
    rms = lambda s: s.rms  # noqa: E731
    worst = lambda s: s.worst  # noqa: E731
    for key, scores in all_scores.items():
        stack = stacks[key]
        floor = floor_of(stack)
        oracle_score = next((s for s in scores if s.tool == "oracle"), None)
        row = [key, str(stack.scenario.frames), fmt(floor, 3) + ("" if stack.floor_applies else " (n/a)"),
               fmt(oracle_score.worst if oracle_score else float("nan")),
               label(best(scores, "flatd", rms), rms), label(best(scores, "flatd", worst), worst)]
        siril_rms, siril_worst = best(scores, "siril", rms), best(scores, "siril", worst)
        if have_siril:
            row += [label(siril_rms, rms), label(siril_worst, worst)]
        auto = next((s for s in scores if s.tool == "flatd" and s.method == "auto" and s.ok), None)
        if auto is None:
            row += ["-", "-"] + (["-"] if have_siril else [])
        else:
            ratio = f" ({auto.rms / floor:.2f})" if stack.floor_applies else " (n/a)"
            row += [f"{auto.rms:.3f}{ratio}", fmt(auto.worst)]
            if have_siril:
                row.append("-" if siril_rms is None or siril_worst is None else
                           f"{auto.rms / siril_rms.rms:.2f}, {auto.worst / siril_worst.worst:.2f}")
        print("| " + " | ".join(row) + " |")
    groups = [k for k in GROUP_KEYS if k in all_scores]
    if groups:
        print("\n## By group size (panel flats with cosmic rays): flatd methods ranked by RMS %\n")
        print("| frames | floor % | flatd, by RMS % (worst %) |")
        print("|---:|---:|---|")
        for key in groups:
            stack = stacks[key]
            ranked = sorted((s for s in all_scores[key] if s.tool == "flatd" and s.ok), key=lambda s: s.rms)
            text = ", ".join(f"{s.method} {s.rms:.3f} ({s.worst:.2f})" for s in ranked)
            print(f"| {stack.scenario.frames} | {floor_of(stack):.3f} | {text} |")


def machine() -> str:
    import platform

    return f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=512, help="frame width and height (default 512)")
    ap.add_argument("--scenarios", default="", help="comma-separated keys (default: all): "
                    + ",".join(s.key for s in SCENARIOS))
    ap.add_argument("--methods", default="", help="flatd methods (default: every registered one, and auto)")
    ap.add_argument("--no-siril", action="store_true", help="flatd only")
    args = ap.parse_args(argv)

    keys = [k for k in args.scenarios.split(",") if k] or [s.key for s in SCENARIOS]
    unknown = set(keys) - {s.key for s in SCENARIOS}
    if unknown:
        ap.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    siril = None if args.no_siril else shutil.which("siril-cli")
    siril_name = siril_version(siril) if siril else ""
    started = time.perf_counter()
    stacks: dict[str, Stack] = {}
    all_scores: dict[str, list[Score]] = {}
    with tempfile.TemporaryDirectory(prefix="flatd-quality-") as tmp:
        tmp_path = Path(tmp)
        rules = tmp_path / "flatd.yaml"  # not the user's rules file: only the options given count
        rules.write_text(f"state: {tmp_path / 'state'}\n")
        env = dict(os.environ, FLATD_CONFIG=str(rules))
        names = flatd_methods([m for m in args.methods.split(",") if m] or None, tmp_path / "probe", env)
        print(f"machine: {machine()}; frames {args.size}x{args.size}; flatd methods: {', '.join(names)}; "
              f"{siril_name or 'Siril: not run' + ('' if args.no_siril else ' (siril-cli not found)')}")
        for sc in (s for s in SCENARIOS if s.key in keys):
            stack = make_stack(sc, args.size, tmp_path / sc.key)
            scores = [oracle(stack)] + [run_flatd(stack, name, tmp_path, env) for name in names]
            if siril:
                scores += run_siril_all(stack, tmp_path, siril)
            stacks[sc.key] = stack
            all_scores[sc.key] = scores
            print_scenario(stack, scores, siril_name)
            sys.stdout.flush()
            shutil.rmtree(tmp_path / sc.key, ignore_errors=True)
    print_summary(stacks, all_scores, bool(siril))
    print(f"\n(ran in {time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
