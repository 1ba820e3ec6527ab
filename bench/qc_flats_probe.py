#!/usr/bin/env python3
"""What the flat checks (flatd.qc.flats) cost and catch (a script, not a test).

    python bench/qc_flats_probe.py                       # both parts
    python bench/qc_flats_probe.py --parts cost --rounds 5
    python bench/qc_flats_probe.py --parts catch --sessions 20

1. cost: flatd.stack.engines.local.stack_frames on the speed benchmark's 32 flats of
   3264 x 2448 (--cache, made by bench/speed.py), sigma clipping, the default engine
   settings, warm, alternating rounds: without the checks, with them (quality defaults),
   and with normalize none (the checks force the sample pass then). Reported: the median
   time of each and the overhead in % of the run without the checks.
2. catch: seeded level samples (the grid the engine reads: 204 x 272 samples of a
   3264 x 2448 frame at step 12; colour at step 11), clean sessions of panel and sky
   flats (mono, colour; 5 to 40 frames; vignetting, PRNU, dust donuts, cosmic rays, a
   fading twilight gradient and a 15 % level drift) and the same sessions with one frame
   given a fault at several strengths (a cloud, a light leak in a corner, a vignetting
   shifted by a moved panel, a gradient): the fraction of sessions in which some frame
   had any finding (level, saturation, odd), and at each strength the fraction of faults
   found odd, and how many clean frames of those sessions were found odd.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

HERE = Path(__file__).resolve().parent


def cost(cache: Path, rounds: int) -> None:
    from flatd.config import Quality
    from flatd.ingest.frames import read_frame
    from flatd.jobs import StackInput
    from flatd.stack.engines.local import stack_frames
    from flatd.stack.methods import Method

    files = sorted(cache.glob("flat_*.fits"))[:32]
    if len(files) < 32:
        sys.exit(f"{cache}: fewer than 32 flats (make them with bench/speed.py --parts floor)")
    inputs = [StackInput(read_frame(p)) for p in files]
    method = Method("sigma")
    runs = {
        "multiplicative, no checks": dict(normalize="multiplicative", quality=None),
        "multiplicative, checks": dict(normalize="multiplicative", quality=Quality()),
        "none, no checks": dict(normalize="none", quality=None),
        "none, checks (sample pass forced)": dict(normalize="none", quality=Quality()),
    }
    times: dict[str, list[float]] = {k: [] for k in runs}
    found = {}
    for name, kw in runs.items():  # warm-up: page cache, kernels
        found[name] = stack_frames(inputs, method, **kw).findings
    for _ in range(rounds):
        for name, kw in runs.items():
            t0 = time.perf_counter()
            stack_frames(inputs, method, **kw)
            times[name].append(time.perf_counter() - t0)
    print(f"\n32 x 3264x2448, sigma clipping, {rounds} rounds (median s)\n")
    print("| run | time | overhead |\n|---|---|---|")
    for base, checked in (("multiplicative, no checks", "multiplicative, checks"),
                          ("none, no checks", "none, checks (sample pass forced)")):
        b, c = statistics.median(times[base]), statistics.median(times[checked])
        print(f"| {base} | {b:.2f} | |")
        print(f"| {checked} | {c:.2f} | {100 * (c - b) / b:+.1f} % |")
    print(f"\nfindings on these flats: {len(found['multiplicative, checks'])}")
    for f in found["multiplicative, checks"]:
        print("  ", f.line())


# --------------------------------------------------------------------------- catch


def _frame(i, bayer=None):
    return SimpleNamespace(path=Path(f"/x/flat_{i:03d}.fits"), headers={}, bitpix=16, bayer_pattern=bayer,
                           bayer_offset=(0, 0), row_order="TOP-DOWN", height=2448)


def _session(rng, n, sky, colour, rows=204, cols=272):
    from flatd.qc import flats as Q

    step = 11 if colour else 12
    y, x = np.mgrid[0:rows, 0:cols]
    xx, yy = (x - cols / 2) / (cols / 2), (y - rows / 2) / (rows / 2)
    base = (1 - 0.25 * (xx ** 2 + yy ** 2)) * (1 + 0.005 * rng.standard_normal((rows, cols)))
    for _ in range(5):
        cy, cx, rad = rng.uniform(10, rows - 10), rng.uniform(10, cols - 10), rng.uniform(2, 6)
        d = np.hypot(y - cy, x - cx)
        base *= 1 - 0.05 * ((d < rad) & (d > rad / 2))
    ch = Q.sample_channels(Q.presented_layout(_frame(0, "RGGB")), (rows, cols), step) if colour else None
    level = rng.uniform(25000, 40000)  # the red of a colour sensor (x 0.6) stays over quality.min_level
    out = []
    for i in range(n):
        t = i / max(1, n - 1)
        img = base.copy()
        if sky:
            img *= 1 + (0.02 - 0.015 * t) * (0.955 * xx + 0.296 * yy)
        if colour:
            img *= (np.array([0.6, 1.0, 0.8]) * (1 + (np.array([0.05, 0, -0.05]) * t if sky else 0)))[ch]
        mean = level * (1 - 0.15 * t if sky else 1 + 0.002 * rng.standard_normal()) * img
        s = rng.poisson(mean) + rng.normal(0, 3, mean.shape)
        hits = rng.integers(0, rows * cols, 20)
        s.ravel()[hits] += rng.uniform(1000, 30000, 20)
        out.append(s.astype(np.float32))
    return out, step, (xx, yy, y, x, rows, cols)


def _fault(kind, s, strength, grid):
    xx, yy, y, x, rows, cols = grid
    if kind == "cloud":
        return s * (1 - strength * np.exp(-(((y - rows * 0.3) / (rows * 0.25)) ** 2
                                            + ((x - cols * 0.6) / (cols * 0.2)) ** 2)))
    if kind == "leak":
        return s * (1 + strength * np.exp(-np.hypot(y, x) / (rows * 0.3)))
    if kind == "shift":
        return s * (1 - 0.25 * ((xx - 2 * strength) ** 2 + yy ** 2)) / (1 - 0.25 * (xx ** 2 + yy ** 2))
    return s * (1 + strength * xx)  # gradient


def _check(samples, step, colour):
    from flatd.config import Quality
    from flatd.qc import flats as Q
    from flatd.stack.levels import robust_level

    items = [Q.FlatSample(_frame(i, "RGGB" if colour else None), s, robust_level(s)) for i, s in enumerate(samples)]
    return Q.check_flats(items, step, Quality())


def catch(sessions: int) -> None:
    kinds = (("cloud", (0.003, 0.005, 0.01, 0.02, 0.05)), ("leak", (0.003, 0.005, 0.01, 0.02, 0.05)),
             ("shift", (0.002, 0.005, 0.01, 0.02)), ("gradient", (0.002, 0.005, 0.01, 0.02)))
    kinds_of_session = [(sky, colour) for sky in (False, True) for colour in (False, True)]
    sizes = (5, 8, 20, 40)
    rng = np.random.default_rng(2026)
    false = 0
    t0 = time.perf_counter()
    for k in range(sessions):
        sky, colour = kinds_of_session[k % 4]
        samples, step, _ = _session(rng, sizes[(k // 4) % 4], sky, colour)
        false += bool(_check(samples, step, colour))  # any finding: level, saturation, odd
    print(f"\nclean sessions: {false} of {sessions} with any finding (level, saturation, odd) "
          f"({time.perf_counter() - t0:.0f} s)\n")
    print("| fault | strength | panel caught | sky caught | clean frames flagged |\n|---|---|---|---|---|")
    for kind, strengths in kinds:
        for strength in strengths:
            caught = {False: 0, True: 0}
            tried = {False: 0, True: 0}
            wrong = 0
            for k in range(max(4, sessions // 4)):
                sky, colour = kinds_of_session[k % 4]
                n = (5, 8, 20)[k % 3]
                samples, step, grid = _session(rng, n, sky, colour)
                samples[n // 2] = _fault(kind, samples[n // 2], strength, grid).astype(np.float32)
                found = {f.path.name for f in _check(samples, step, colour) if f.check == "odd"}
                tried[sky] += 1
                caught[sky] += f"flat_{n // 2:03d}.fits" in found
                wrong += len(found - {f"flat_{n // 2:03d}.fits"})
            print(f"| {kind} | {strength * 100:g} % | {caught[False]}/{tried[False]} | {caught[True]}/{tried[True]} "
                  f"| {wrong} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", default="cost,catch")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/benchcache/speed-32x3264x2448"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sessions", type=int, default=52)
    args = parser.parse_args()
    parts = args.parts.split(",")
    if "cost" in parts:
        cost(args.cache, args.rounds)
    if "catch" in parts:
        catch(args.sessions)


if __name__ == "__main__":
    main()
