#!/usr/bin/env python3
"""Quality checks benchmark (issue 12's targets): what the checks leave out, what they
catch, what they cost (a script, not a test).

    python bench/qc.py                         # all three parts (a few minutes)
    python bench/qc.py --parts clean,faults --seeds 2
    python bench/qc.py --parts time --rounds 5 --cache /tmp/benchcache/speed-32x3264x2448

Frames are seeded and written as uint16 FITS (400 x 300 by default), then taken through
the path a run takes, in process: flatd.stack.engines.local.stack_frames with the default
`quality:` settings (flatd.config.Quality()) and the default combine method (auto, by
group size), then the master checks as flatd.runner.check_job_master makes them
(flatd.qc.masters.check_master with the rejection and its clean-data baseline), and for
the second night of a rig the previous-master comparison (flatd.qc.previous.compare)
with the first night's master.

The model, per rig (camera + optics): the demo's optical model (flatd.demo.illumination
with a seeded Pattern: off-centre vignetting, a gradient, 3 to 5 dust donuts 2-8 % deep),
PRNU (0.5-1 %), mono or colour (RGGB, channel responses about 0.8 / 1.0 / 0.6), a gain
of 0.6-1.5 e-/ADU, read noise 3 ADU. Per frame: the brightest channel's mean level at a
third to a half of full scale (65,535), photon (Poisson) noise, 10-20 cosmic-ray hits.
Panel flats: the level steady (0.3 % jitter). Sky flats: the level drifts by 10-25 %
across the series, centred on the session's level, and a twilight gradient (1-2 % across
the field) whose strength and direction change mildly through the series.

1. clean: 2 nights of each of --rigs rigs (panel and sky, mono and colour, 5 to 40
   frames): flats left out, masters warn or bad (and why).
2. faults: one frame of a 5- or a 10-frame session given a fault (the others clean), at several
   strengths, over --seeds seeds (mono and colour, panel and sky): the fraction caught
   (that frame left out; for moved dust: the second night's master marked warn with dust
   found within 10 px of the moved donut), clean frames of those sessions left out, and
   how much the fault moves the master: the master made with the faulty frame, checks
   off, against the master made with the same frame unfaulted (the same noise draw),
   both / their median: max and RMS |deviation| in %. Here the photon noise is drawn in
   its Gaussian limit (sqrt(signal) x a fixed normal draw per frame) so that the two
   versions of a frame differ by the fault only.
3. time: the speed benchmark's 32 flats of 3264 x 2448 (--cache, read only: nothing
   here moves, writes or renames them), in process: the job without the checks
   (stack_frames, the master's header, write_master with its fsync) against the job with
   them (stack_frames with the flat checks, the previous master loaded from disk and
   compared, the master checks, the header with their cards, write_master, the two PNG
   previews); alternating rounds, the median of each; and the split.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import numpy as np

FULL = 65535.0
READ_NOISE = 3.0
WIDTH, HEIGHT = 400, 300
RESPONSE = (0.8, 1.0, 0.6)


# --------------------------------------------------------------------------- model


@dataclass
class Rig:
    seed: int
    colour: bool
    vignetting: object  # flatd.demo.Pattern without donuts
    donuts: tuple  # flatd.demo.Donut
    prnu: np.ndarray
    response: np.ndarray  # per pixel (1 for mono)
    gain: float

    def dust(self, shape, donuts=None) -> np.ndarray:
        from flatd.demo import Pattern, illumination

        return illumination(shape, 1, Pattern(center=(0.5, 0.5), falloff=(0.0, 0.0), gradient=(0.0, 0.0),
                                              donuts=tuple(self.donuts if donuts is None else donuts)))


def make_rig(seed: int, colour: bool, shape=(HEIGHT, WIDTH)) -> Rig:
    from flatd.demo import Donut, Pattern, cfa_response

    rng = np.random.default_rng([seed, 7])
    vignetting = Pattern(center=(rng.uniform(0.45, 0.55), rng.uniform(0.42, 0.58)),
                         falloff=(rng.uniform(0.15, 0.30), rng.uniform(0.03, 0.08)),
                         gradient=(rng.uniform(-0.04, 0.04), rng.uniform(-0.04, 0.04)), donuts=())
    donuts = tuple(Donut(rng.uniform(0.15, 0.85), rng.uniform(0.15, 0.85), rng.uniform(0.02, 0.05),
                         rng.uniform(0.02, 0.08)) for _ in range(rng.integers(3, 6)))
    prnu = 1 + rng.uniform(0.005, 0.01) * rng.standard_normal(shape)
    if colour:
        jitter = np.array(RESPONSE) * rng.uniform(0.9, 1.1, 3)
        jitter[1] = 1.0
        response = cfa_response(shape, "RGGB", tuple(jitter))
    else:
        response = np.ones(shape)
    return Rig(seed, colour, vignetting, donuts, prnu, response, float(rng.uniform(0.6, 1.5)))


@dataclass
class Session:
    rig: Rig
    sky: bool
    n: int
    seed: int
    level: float  # the brightest channel's mean, ADU, at the series' middle
    drift: float = 0.0
    shape: tuple = (HEIGHT, WIDTH)
    # per-frame overrides: index -> dict(kind=..., strength=...)
    faults: dict = field(default_factory=dict)
    donuts: Optional[tuple] = None  # this night's dust (None: the rig's)

    def levels(self) -> np.ndarray:
        rng = np.random.default_rng([self.seed, 1])
        t = np.linspace(-0.5, 0.5, self.n)
        if self.sky:
            return self.level * (1 - self.drift * t)  # falling through the series
        return self.level * (1 + 0.003 * rng.standard_normal(self.n))


def make_session(rig: Rig, sky: bool, n: int, seed: int) -> Session:
    rng = np.random.default_rng([seed, 2])
    return Session(rig, sky, n, seed, rng.uniform(1 / 3, 1 / 2) * FULL, rng.uniform(0.10, 0.25) if sky else 0.0)


def _grid(shape):
    h, w = shape
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    return (x + 0.5) / w, (y + 0.5) / h


def signal(session: Session, i: int, level: float, fault: Optional[dict]) -> np.ndarray:
    """The expected ADU of frame i (no noise), with its fault if any."""
    from flatd.demo import illumination

    rig, shape = session.rig, session.shape
    u, v = _grid(shape)
    vig_pattern = rig.vignetting
    kind = fault["kind"] if fault else None
    s = fault["strength"] if fault else 0.0
    if kind == "moved":  # the panel or camera moved: the vignetting shifts, the dust does not
        vig_pattern = replace(vig_pattern, center=(vig_pattern.center[0] + s, vig_pattern.center[1]))
    vig = illumination(shape, 1, vig_pattern)
    if kind == "rotated":  # the camera rotated 180 degrees: the optics' pattern turns on the sensor
        vig = vig[::-1, ::-1]
    image = vig * rig.dust(shape, session.donuts) * rig.prnu * rig.response
    if session.sky:
        t = i / max(1, session.n - 1)
        theta = 0.6 + 0.4 * t  # the twilight gradient turns and fades a little through the series
        g = 0.02 - 0.01 * t
        image = image * (1 + g * ((u - 0.5) * math.cos(theta) + (v - 0.5) * math.sin(theta)))
    if kind == "leak":  # a light leak: a glow from one corner
        image = image * (1 + s * np.exp(-np.hypot(u, v) / 0.3))
    elif kind == "cloud":  # a soft patch s darker
        d = np.hypot((u - 0.62) / 0.22, (v - 0.4) / 0.18)
        image = image * (1 - s / (1 + np.exp((d - 1) / 0.12)))
    bright = image[rig.response == rig.response.max()].mean()
    out = level * image / bright
    if kind == "over":
        out = out * (s * FULL / level)
    return out


def draw(session: Session, folder: Path, gaussian: bool = False, clean_twin: bool = False) -> list[Path]:
    """Write the session's frames (uint16 FITS); `gaussian`: photon noise as sqrt(S) x a
    fixed draw per frame; `clean_twin`: the faulty frames drawn without their fault."""
    from astropy.io import fits

    folder.mkdir(parents=True, exist_ok=True)
    rig = session.rig
    paths = []
    for i, level in enumerate(session.levels()):
        rng = np.random.default_rng([session.seed, 100 + i])
        fault = None if clean_twin else session.faults.get(i)
        s = signal(session, i, level, fault)
        electrons = s * rig.gain
        if gaussian:
            z = rng.standard_normal(s.shape)
            adu = (electrons + np.sqrt(electrons) * z) / rig.gain
        else:
            adu = rng.poisson(electrons) / rig.gain
        adu = adu + rng.normal(0, READ_NOISE, s.shape)
        h, w = s.shape
        for _ in range(rng.integers(10, 21)):  # cosmic rays: single pixels and short tracks
            r, c = rng.integers(1, h - 3), rng.integers(1, w - 3)
            length = rng.choice([1, 1, 2, 3])
            amp = math.exp(rng.uniform(math.log(300), math.log(30000)))
            if rng.random() < 0.5:
                adu[r:r + length, c] += amp
            else:
                adu[r, c:c + length] += amp
        data = np.clip(np.rint(adu), 0, FULL).astype(np.uint16)
        hdu = fits.PrimaryHDU(data)
        hdu.header.update(IMAGETYP="FLAT", FILTER="L", EXPTIME=1.0, XBINNING=1, YBINNING=1,
                          INSTRUME=f"rig{rig.seed}")
        hdu.header["DATE-OBS"] = f"2026-12-01T17:{i // 60:02d}:{i % 60:02d}.000"
        if rig.colour:
            hdu.header["BAYERPAT"] = "RGGB"
        path = folder / f"flat_{i:03d}.fits"
        hdu.writeto(path, overwrite=True)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------- the run's path


def limits(enabled: bool = True):
    from flatd.config import Quality

    return Quality() if enabled else Quality(enabled=False)


def stack(paths, quality=None):
    """(result, method, frames kept) through stack_frames with the default method (auto)."""
    from flatd.ingest.frames import read_frame
    from flatd.jobs import StackInput
    from flatd.stack.auto import choose
    from flatd.stack.engines.local import stack_frames

    inputs = [StackInput(read_frame(p)) for p in paths]
    method, _ = choose(len(inputs))
    result = stack_frames(inputs, method, quality=quality, min_group_size=3)
    kept = inputs if result.kept is None else [inputs[i] for i in result.kept]
    return result, method, kept


def master_checks(result, method, kept, quality, previous_image=None):
    """The master checks as flatd.runner.check_job_master makes them."""
    from flatd.qc.masters import check_master
    from flatd.qc.previous import PreviousCheck, _settings, compare
    from flatd.runner import Rejection
    from flatd.stack.cfa import common_layout

    job = SimpleNamespace(inputs=kept, method=method, rejection_warn=0.005, id="bench", label="bench")
    rejection = Rejection.of(job, result)
    previous = None
    if previous_image is not None and quality.previous:
        previous = PreviousCheck(Path("previous.fits"), compare(result.image, previous_image, **_settings(quality)))
    frames = [i.frame for i in kept]
    return check_master(result.image, quality, frames=frames, method=method, levels=result.levels,
                        factors=result.factors, patches=result.noise_patches, noise_rows=result.noise_rows,
                        colour=common_layout(frames) is not None, rejection=rejection,
                        baseline=rejection.baseline if rejection is not None else None, previous=previous)


# --------------------------------------------------------------------------- 1. clean sessions

SIZES = (5, 8, 12, 20, 30, 40, 6, 16, 25, 10)


def clean_part(rigs: int, tmp: Path) -> dict:
    from flatd.stack.engines.local import QcTooFew

    quality = limits()
    rows = []
    left_out, marked = [], []
    t0 = time.perf_counter()
    for k in range(rigs):
        colour, sky = bool(k % 2), bool((k // 2) % 2)
        rig = make_rig(1000 + k, colour)
        previous = None
        for night in range(2):
            n = SIZES[(2 * k + night) % len(SIZES)]
            session = make_session(rig, sky, n, 10_000 + 10 * k + night)
            folder = tmp / f"clean-{k}-{night}"
            paths = draw(session, folder)
            try:
                result, method, kept = stack(paths, quality)
            except QcTooFew as exc:
                left_out += [f.line() for f in exc.findings if f.leaves_out]
                rows.append((k, night, sky, colour, n, session, len(exc.findings), "not combined"))
                shutil.rmtree(folder)
                continue
            left_out += [f.line() for f in result.findings if f.leaves_out]
            qc = master_checks(result, method, kept, quality, previous)
            if qc.status != "good":
                marked.append(f"rig {k} night {night + 1} ({'sky' if sky else 'panel'}, "
                              f"{'colour' if colour else 'mono'}, {n}): {qc.summary}")
            rows.append((k, night, sky, colour, n, session, sum(f.leaves_out for f in result.findings), qc))
            previous = result.image
            shutil.rmtree(folder)
    seconds = time.perf_counter() - t0
    print(f"\n## 1. Clean sessions\n\n{len(rows)} seeded sessions ({rigs} rigs x 2 consecutive nights, the second "
          f"compared with the first's master), {WIDTH}x{HEIGHT}, default `quality:` settings, combine method auto "
          f"({seconds:.0f} s)\n")
    print("| kind | sessions | frames | levels (brightest channel, of full scale) | flats left out | "
          "masters warn | masters bad | previous compared |")
    print("|---|---:|---:|---|---:|---:|---:|---:|")
    for sky in (False, True):
        for colour in (False, True):
            sel = [r for r in rows if r[2] == sky and r[3] == colour]
            if not sel:
                continue
            lv = [lvl for r in sel for lvl in r[5].levels() / FULL]
            out = sum(r[6] for r in sel)
            qcs = [r[7] for r in sel if not isinstance(r[7], str)]
            warn = sum(q.status == "warn" for q in qcs)
            bad = sum(q.status == "bad" for q in qcs) + sum(isinstance(r[7], str) for r in sel)
            compared = sum(q.previous is not None for q in qcs)
            ns = sorted({r[4] for r in sel})
            print(f"| {'sky' if sky else 'panel'}, {'colour' if colour else 'mono'} | {len(sel)} | "
                  f"{ns[0]}-{ns[-1]} | {min(lv):.2f}-{max(lv):.2f} | {out} | {warn} | {bad} | {compared} |")
    total_frames = sum(r[4] for r in rows)
    print(f"| **all** | {len(rows)} | {total_frames} in all | | **{len(left_out)}** | "
          f"**{sum(1 for r in rows if not isinstance(r[7], str) and r[7].status == 'warn')}** | "
          f"**{sum(1 for r in rows if isinstance(r[7], str) or r[7].status == 'bad')}** | |")
    for line in left_out:
        print(f"\n- left out: {line}")
    for line in marked:
        print(f"\n- marked: {line}")
    low_colour(tmp, quality)
    # the master checks' figures, for the margins
    qcs = [r[7] for r in rows if not isinstance(r[7], str)]
    noise = [q.noise.ratio for q in qcs if q.noise is not None]
    field = [q.field_ratio for q in qcs if q.field_ratio]
    changed = [q.previous.comparison.changed_fraction for q in qcs if q.previous is not None]
    excess = [q.rejected_low + q.rejected_high - (q.rejection_baseline or 0) for q in qcs
              if q.rejected_low is not None]
    print(f"\nMargins on these sessions: noise / predicted {min(noise):.2f}-{max(noise):.2f} "
          f"(warn above {limits().noise_warn:g}); rejected above clean data {100 * min(excess):+.2f} to "
          f"{100 * max(excess):+.2f} % (warn above {100 * limits().master_rejection_warn:g} %); field ratio "
          f"{min(field):.2f}-{max(field):.2f} (warn above {limits().field_warn:g}); changed since the previous "
          f"master {100 * max(changed):.3f} % at most (warn above {100 * limits().previous_warn_fraction:g} %)")
    return {"left_out": len(left_out), "marked": len(marked), "sessions": len(rows)}


def low_colour(tmp: Path, quality, sessions: int = 8) -> None:
    """Colour sessions exposed on the low side (green at 0.2-0.3 of full scale, blue at
    about 0.6 x green): left out now (min_level on the brightest channel), and what a
    min_level on every channel would leave out (from each frame's channel medians)."""
    from astropy.io import fits

    from flatd.stack.engines.local import QcTooFew

    out = would = frames = 0
    lows = []
    for k in range(sessions):
        rig = make_rig(3000 + k, True)
        session = make_session(rig, bool(k % 2), SIZES[k % len(SIZES)], 30_000 + k)
        session.level = (0.2 + 0.1 * k / max(1, sessions - 1)) * FULL
        paths = draw(session, tmp / f"low-{k}")
        try:
            result, _, _ = stack(paths, quality)
            out += sum(f.leaves_out for f in result.findings)
        except QcTooFew as exc:
            out += sum(f.leaves_out for f in exc.findings)
        for path in paths:
            data = fits.getdata(path).astype(np.float32)
            medians = [float(np.median(data[py::2, px::2])) / FULL for py, px in ((0, 0), (0, 1), (1, 1))]
            lows.append(min(medians))
            would += min(medians) < quality.min_level
            frames += 1
        shutil.rmtree(tmp / f"low-{k}")
    print(f"\nColour flats exposed low ({sessions} more sessions, {frames} frames, green at 0.20-0.30 of full "
          f"scale, the weakest channel at {min(lows):.2f}-{max(lows):.2f}): {out} left out with min_level on the "
          f"brightest channel; a min_level of {quality.min_level:g} on every channel would leave out {would}.")


# --------------------------------------------------------------------------- 2. problem sessions

FAULTS = (
    ("over", "over-exposed frame (level of the brightest channel, clipped at full scale)", (0.8, 0.9, 0.95)),
    ("leak", "light leak (corner glow)", (0.005, 0.01, 0.02, 0.05)),
    ("cloud", "cloud on one frame of a sky series (patch darker)", (0.005, 0.01, 0.02, 0.05)),
    ("moved", "panel/camera moved (vignetting shifted, of the width)", (0.005, 0.01, 0.02, 0.05)),
    ("rotated", "camera rotated 180 degrees (one frame)", (1.0,)),
    ("dust", "dust donut moved since the previous master (depth)", (0.005, 0.01, 0.02)),
)


DEVIATION_BLOCK = 4  # px: the deviation is taken on means of 4 x 4 pixels


def deviation(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(max, RMS) % of a / b over its median, - 1, on means of DEVIATION_BLOCK-pixel
    blocks: what the fault does to the master's pattern, without the pixel-scale flips of
    the rejection that any change of one input's values brings (noise, not the fault)."""
    r = a.astype(np.float64) / b.astype(np.float64)
    k = DEVIATION_BLOCK
    h, w = r.shape[0] // k * k, r.shape[1] // k * k
    r = r[:h, :w].reshape(h // k, k, w // k, k).mean(axis=(1, 3))
    r = r[np.isfinite(r)]
    r = r / np.median(r) - 1
    return 100 * float(np.max(np.abs(r))), 100 * float(np.sqrt(np.mean(r * r)))


def fault_case(kind: str, strength: float, seed: int, tmp: Path, n: int = 10) -> dict:
    from flatd.demo import Donut
    from flatd.stack.engines.local import QcTooFew

    quality = limits()
    colour = bool(seed % 2)
    sky = kind == "cloud" or bool((seed // 2) % 2)
    rig = make_rig(5000 + seed, colour)
    session = make_session(rig, sky, n, 50_000 + 97 * seed + int(strength * 1000))
    bad = n // 2
    out = {"caught": False, "false": 0}
    folder = tmp / f"fault-{kind}-{seed}-{n}"
    if kind == "dust":
        # night 1: the rig's dust; night 2: its first donut moved (and given this depth)
        moved = Donut(min(0.85, rig.donuts[0].x + 0.25) if rig.donuts[0].x < 0.6 else rig.donuts[0].x - 0.25,
                      rig.donuts[0].y, 0.035, strength)
        first = replace(rig.donuts[0], depth=strength)
        night1 = replace(session, donuts=(first,) + rig.donuts[1:])
        night2 = replace(session, seed=session.seed + 1, donuts=(moved,) + rig.donuts[1:])
        twin = replace(night2, donuts=night1.donuts)  # the same night, the donut unmoved
        prev, _, _ = stack(draw(night1, folder / "n1", gaussian=True), quality)
        shutil.rmtree(folder / "n1")
        result, method, kept = stack(draw(night2, folder / "n2", gaussian=True), quality)
        qc = master_checks(result, method, kept, quality, prev.image)
        shutil.rmtree(folder / "n2")
        cx, cy = moved.x * WIDTH, moved.y * HEIGHT
        blobs = qc.previous.comparison.blobs if qc.previous is not None else []
        out["caught"] = qc.status != "good" and any(math.hypot(b.x - cx, b.y - cy) < 10 for b in blobs)
        out["false"] = sum(f.leaves_out for f in result.findings)
        a, _, _ = stack(draw(night2, folder / "a", gaussian=True), limits(False))
        b, _, _ = stack(draw(twin, folder / "b", gaussian=True), limits(False))
        out["max"], out["rms"] = deviation(a.image, b.image)
        shutil.rmtree(folder)
        return out
    session.faults[bad] = {"kind": kind, "strength": strength}
    paths = draw(session, folder / "f", gaussian=True)
    try:
        result, method, kept = stack(paths, quality)
        findings = result.findings
    except QcTooFew as exc:
        findings = exc.findings
    left = {f.path.name for f in findings if f.leaves_out}
    out["caught"] = paths[bad].name in left
    out["false"] = len(left - {paths[bad].name})
    a, _, _ = stack(paths, limits(False))
    b, _, _ = stack(draw(session, folder / "c", gaussian=True, clean_twin=True), limits(False))
    out["max"], out["rms"] = deviation(a.image, b.image)
    shutil.rmtree(folder)
    return out


def fault_part(seeds: int, tmp: Path, sizes=(5, 10)) -> list:
    t0 = time.perf_counter()
    table = []
    for kind, title, strengths in FAULTS:
        for strength in strengths:
            for n in sizes:
                cases = [fault_case(kind, strength, s, tmp, n) for s in range(seeds)]
                caught = sum(c["caught"] for c in cases)
                mx = max(c["max"] for c in cases)
                missed = max((c["max"] for c in cases if not c["caught"]), default=None)
                rms = statistics.median(c["rms"] for c in cases)
                table.append((title, kind, strength, n, caught, len(cases), sum(c["false"] for c in cases), mx, rms,
                              missed))
    print(f"\n## 2. Problem sessions\n\nOne frame of a group of {' or '.join(map(str, sizes))} with the fault (the "
          f"dust: the second night's master against the first's), {seeds} seeds each (mono and colour; panel and "
          f"sky), default settings "
          f"({time.perf_counter() - t0:.0f} s). Master moved: the master with the faulty frame (checks off) against "
          f"the master with that frame unfaulted, the same noise, on means of {DEVIATION_BLOCK}x{DEVIATION_BLOCK} px: "
          f"the largest |deviation| over the seeds, the median RMS, and the largest of the seeds whose "
          f"fault was not caught. Target: every fault that moves the master by more than 0.5 % is caught (met: no "
          f"missed fault moved it more).\n")
    print("| fault | strength | frames | caught | clean frames left out | master moved: max % | RMS % | "
          "missed ones: max % | target |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for title, kind, strength, n, caught, count, false, mx, rms, missed in table:
        what = {"over": f"{strength:g}", "rotated": "180°"}.get(kind, f"{100 * strength:g} %")
        verdict = "met" if missed is None or missed <= 0.5 else "**not met**"
        gone = "-" if missed is None else f"{missed:.2f}"
        print(f"| {title} | {what} | {n} | {caught}/{count} | {false} | {mx:.2f} | {rms:.3f} | {gone} | {verdict} |")
    missed = [row for row in table if row[9] is not None and row[9] > 0.5]
    print(f"\nRows where a fault that moved the master by more than 0.5 % went uncaught: {len(missed)} of {len(table)}"
          + "".join(f"\n- {r[0]}, {r[2]:g}, {r[3]} frames: {r[9]:.2f} %" for r in missed))
    return table


# --------------------------------------------------------------------------- 3. time


def time_part(cache: Path, rounds: int, tmp: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from flatd.ingest.frames import read_frame
    from flatd.jobs import StackInput
    from flatd.output.masters import add_checks, master_header, write_master
    from flatd.qc.masters import judge, measure_master
    from flatd.qc.previous import check_previous
    from flatd.runner import Rejection, _binned, _start_pictures, _write_previews
    from flatd.stack.auto import choose
    from flatd.stack.engines.local import stack_frames

    files = sorted(cache.glob("flat_*.fits"))[:32]
    if len(files) < 32:
        print(f"\n## 3. Time\n\n{cache}: fewer than 32 flats (bench/speed.py --parts floor makes them); skipped")
        return
    inputs = [StackInput(read_frame(p)) for p in files]  # read only: nothing here moves or writes them
    method, _ = choose(len(inputs))
    quality = limits()
    job = SimpleNamespace(inputs=inputs, method=method, rejection_warn=0.005, id="bench", label="bench")
    picture_job = SimpleNamespace(frames=[i.frame for i in inputs], id="bench", quality=quality, previews=True)
    frames = [i.frame for i in inputs]
    out = tmp / "masters"
    out.mkdir()
    # the previous night's master: the odd-numbered half of the flats (its own noise), on disk
    half = stack_frames(inputs[1::2], method)
    prev_path = write_master(out, "previous.fits", half.image,
                             master_header(frames[1::2], [i.calibration for i in inputs[1::2]], method,
                                           "multiplicative", half.factors))
    del half
    count = iter(range(10 ** 6))

    def header_of(result):
        return master_header(frames, [i.calibration for i in inputs], method, "multiplicative", result.factors,
                             rejected=result.frame_fractions())

    def write(result, qc=None) -> Path:
        header = header_of(result)
        if qc is not None:
            add_checks(header, qc.cards(), qc.history())
        return write_master(out, f"master-{next(count)}.fits", result.image, header)

    import flatd.stack.engines.local as engine

    flat_checks = []
    check_samples = engine.check_samples

    def timed_checks(*args, **kwargs):  # the flat checks themselves, inside the stack
        t = time.perf_counter()
        try:
            return check_samples(*args, **kwargs)
        finally:
            flat_checks.append(time.perf_counter() - t)

    engine.check_samples = timed_checks

    def checked() -> dict:
        split = {}
        t = time.perf_counter()
        flat_checks.clear()
        result = stack_frames(inputs, method, quality=quality, min_group_size=3)
        split["stack with the flat checks"] = time.perf_counter() - t
        split["_flat checks"] = sum(flat_checks)
        t = time.perf_counter()  # as the runner does: the master binned once, the previous master compared
        binned = _binned(picture_job, result)  # beside the figures
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(check_previous, result.image, header_of(result), out, None, "bench", quality,
                                  binned=binned)
            rejection = Rejection.of(job, result)
            qc = measure_master(result.image, frames=frames, method=method, levels=result.levels,
                                factors=result.factors, patches=result.noise_patches, noise_rows=result.noise_rows,
                                colour=False, rejection=rejection, baseline=rejection.baseline, binned=binned)
            split["_figures"] = time.perf_counter() - t
            qc.previous = previous = pending.result()
        judge(qc, quality)
        assert previous.path == prev_path, previous.skipped
        split["master checks and the previous master (beside them)"] = time.perf_counter() - t
        t = time.perf_counter()  # as the runner does: the pictures drawn while the master is written
        pictures = _start_pictures(picture_job, result.image, (0, 0), binned, previous.comparison)
        master = write(result, qc)
        split["write the master"] = time.perf_counter() - t
        t = time.perf_counter()
        assert len(_write_previews(picture_job, master, pictures)) == 2
        split["previews (2 PNG)"] = time.perf_counter() - t  # writing them, and waiting for the drawing if need be
        master.unlink()
        for png in out.glob("master-*.png"):
            png.unlink()
        split["_status"] = qc.summary
        split["_findings"] = len(result.findings)
        return split

    def plain() -> dict:
        t = time.perf_counter()
        result = stack_frames(inputs, method)
        t1 = time.perf_counter()
        write(result).unlink()
        return {"stack": t1 - t, "write the master": time.perf_counter() - t1}

    checked(), plain()  # warm: page cache, kernels, baselines
    off, on = [], []
    for _ in range(rounds):
        off.append(plain())
        on.append(checked())
    total = lambda d: sum(v for k, v in d.items() if not k.startswith("_"))  # noqa: E731
    b, c = statistics.median(map(total, off)), statistics.median(map(total, on))
    med = lambda rows, key: statistics.median(r[key] for r in rows)  # noqa: E731
    print(f"\n### In process, and where the time goes\n\n32 flats of 3264x2448 (uint16, {cache}, read only), combine method auto "
          f"({method.label}), default engine settings, {os.cpu_count()} cores, files in the page cache; the job in "
          f"process: stack_frames, the master's header and write_master (fsync), and with the checks: the flat "
          f"checks, the previous master (another master of these flats, found in the output folder, binned as it is "
          f"read) compared, the master checks, the 2 PNG previews (drawn in a thread while the master is written, "
          f"then written: the runner's order). {rounds} alternating rounds, median s. The checked master: "
          f"{on[-1]['_status']}; {on[-1]['_findings']} findings.\n")
    print("| run | s | added |\n|---|---:|---:|")
    print(f"| quality disabled, previews off | {b:.2f} | |")
    print(f"| quality enabled, previews on | {c:.2f} | {100 * (c - b) / b:+.1f} % |")
    for key, text in (("stack", "stack"), ("write the master", "write the master")):
        print(f"| {text}: without / with the checks | {med(off, key):.3f} / "
              f"{med(on, key if key != 'stack' else 'stack with the flat checks'):.3f} | |")
    for key in ("_flat checks", "master checks and the previous master (beside them)",
                "previews (2 PNG)"):  # the pictures' drawing overlaps the master's write: in neither
        v = med(on, key)
        print(f"| of which {key.lstrip('_')} | {v:.3f} | {100 * v / b:+.1f} % |")


def run_tree(files: list, root: Path, checks: bool) -> Path:
    """A capture folder of hard links to `files` (run-once moves the links, never the
    cached files) and its rules file: the checks and previews on or off. Returns the rules."""
    night = root / "captures" / "2026-11-30"
    night.mkdir(parents=True)
    for f in files:
        os.link(f, night / f.name)
    rules = root / "flatd.yaml"
    rules.write_text(f"capture:\n  - path: {json.dumps(str(root / 'captures'))}\n"
                     f"state: {json.dumps(str(root / 'state'))}\n"
                     "precalibration: {mode: none}\nstable: 0\n"
                     f"quality: {{enabled: {str(checks).lower()}}}\noutput: {{previews: {str(checks).lower()}}}\n")
    return rules


def run_once(rules: Path) -> tuple[float, float, list[Path]]:
    """(seconds, CPU seconds, masters written): one `flatd run-once` process, timed from
    outside (its CPU time: user + system of all its threads)."""
    import resource
    import subprocess

    flatd = Path(sys.executable).parent / "flatd"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    done = subprocess.run([str(flatd), "run-once", "--config", str(rules)], capture_output=True, text=True)
    elapsed = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    if done.returncode != 0:
        raise SystemExit(f"flatd run-once failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return elapsed, cpu, sorted(p for p in (rules.parent / "captures").rglob("masters/*.fits"))


def compiled() -> None:
    """flatd's modules compiled, as an install leaves them (`make install` runs compileall):
    where PYTHONDONTWRITEBYTECODE is set, a module edited since would be compiled again in
    every run, and only the checked runs import the checks' modules."""
    import compileall

    import flatd

    compileall.compile_dir(str(Path(flatd.__file__).parent), quiet=1)


def whole_run_part(cache: Path, rounds: int, tmp: Path) -> Optional[dict]:
    """`flatd run-once` on the 32 flats, as a user runs it: checks and previews off
    against on, with last night's master (a run on the odd-numbered half, checks on) in
    the output folder for the checked runs to find and compare with. Alternating rounds,
    after one untimed run of each (page cache)."""
    from astropy.io import fits

    files = sorted(cache.glob("flat_*.fits"))[:32]
    if len(files) < 32:
        return None
    compiled()
    _, _, masters = run_once(run_tree(files[1::2], tmp / "last-night", True))
    previous = masters[0]
    times: dict[bool, list] = {False: [], True: []}
    cpus: dict[bool, list] = {False: [], True: []}
    seen = None
    for r in range(rounds + 1):
        for checks in ((False, True) if r % 2 else (True, False)):  # each first in turn: an order effect cancels
            root = tmp / f"run-{r}-{int(checks)}"
            rules = run_tree(files, root, checks)
            if checks:
                folder = root / "captures" / "masters"  # where run-once writes: beside the night folders
                folder.mkdir()
                copy = folder / "FLAT-last-night.fits"
                shutil.copy2(previous, copy)
                os.utime(copy, (time.time() - 86400,) * 2)
            elapsed, cpu, made = run_once(rules)
            made = [m for m in made if m.name != "FLAT-last-night.fits"]
            if len(made) != 1:
                raise SystemExit(f"expected one master, got {made}")
            if checks:
                header = fits.getheader(made[0])
                if header.get("QCPREV") != "FLAT-last-night.fits":
                    raise SystemExit(f"the checked run did not compare with last night's master: {header.get('QCPREV')}")
                seen = (header.get("QCSTATUS"), len(list(made[0].parent.glob("*.png"))))
            if r:  # the first round warms the page cache
                times[checks].append(elapsed)
                cpus[checks].append(cpu)
            shutil.rmtree(root)
    off, on = statistics.median(times[False]), statistics.median(times[True])
    print(f"\n## 3. Time\n\n### A run\n\n`flatd run-once` on 32 flats of 3264x2448 (uint16, hard links to {cache} in a "
          f"fresh capture folder each run; the inputs' links are moved, the cached files never), {os.cpu_count()} cores, "
          f"files in the page cache, the whole process timed from outside: `quality.enabled: false` and "
          f"`output.previews: false` against the defaults, the checked runs finding last night's master (a run on "
          f"the odd-numbered half) in the output folder. {rounds} alternating rounds after an untimed one, median "
          f"s (range). The checked master: {seen[0]}, {seen[1]} PNG pictures.\n")
    cpu_off, cpu_on = statistics.median(cpus[False]), statistics.median(cpus[True])
    print("| run | s | range | added | CPU s | added |\n|---|---:|---|---:|---:|---:|")
    print(f"| checks off, previews off | {off:.2f} | {min(times[False]):.2f}-{max(times[False]):.2f} | | "
          f"{cpu_off:.2f} | |")
    print(f"| checks on, previews on (defaults) | {on:.2f} | {min(times[True]):.2f}-{max(times[True]):.2f} | "
          f"{100 * (on - off) / off:+.1f} % | {cpu_on:.2f} | {100 * (cpu_on - cpu_off) / cpu_off:+.1f} % |")
    # each round's checked run against its unchecked one (run just before or after it): the
    # machine's drift over the minutes of the benchmark cancels
    paired = sorted(100 * (b - a) / a for a, b in zip(times[False], times[True]))
    paired_cpu = sorted(100 * (b - a) / a for a, b in zip(cpus[False], cpus[True]))
    print(f"\nPer round, the checked run against the unchecked one beside it: median "
          f"{statistics.median(paired):+.1f} % (quartiles {_quartiles(paired)}), CPU {statistics.median(paired_cpu):+.1f} % "
          f"(quartiles {_quartiles(paired_cpu)}).")
    return {"off": off, "on": on}


def _quartiles(values: list) -> str:
    q = statistics.quantiles(values, n=4) if len(values) >= 2 else [values[0]] * 3
    return f"{q[0]:+.1f} / {q[2]:+.1f} %"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="clean,faults,time")
    ap.add_argument("--rigs", type=int, default=28, help="rigs of part 1 (2 sessions each; default 28)")
    ap.add_argument("--seeds", type=int, default=8, help="seeds per fault, strength and size (default 8)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--cache", type=Path, default=Path("/tmp/benchcache/speed-32x3264x2448"))
    args = ap.parse_args()
    parts = args.parts.split(",")
    started = time.perf_counter()
    import platform

    print(f"# flatd quality checks benchmark\n\n{platform.system()} {platform.machine()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}")
    with tempfile.TemporaryDirectory(prefix="flatd-qc-bench-") as tmp:
        tmp = Path(tmp)
        if "clean" in parts:
            clean_part(args.rigs, tmp)
            sys.stdout.flush()
        if "faults" in parts:
            fault_part(args.seeds, tmp)
            sys.stdout.flush()
        if "time" in parts:
            if whole_run_part(args.cache, args.rounds, tmp) is None:
                print(f"\n## 3. Time\n\n{args.cache}: fewer than 32 flats (bench/speed.py --parts floor makes them); "
                      "skipped")
            else:
                time_part(args.cache, args.rounds, tmp)
    print(f"\n(ran in {time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
