#!/usr/bin/env python3
"""The combine kernels alone, in this process (a script, not a test).

Times `flatd.stack.combine.combine()` on an in-memory float32 stack for every method
of the registry that needs no more frames than the stack has, with default
parameters, on all CPUs; best of --repeat runs after one warm-up (numba's cache).

    python bench/kernels.py                    # 32 x 1224 x 3264 (half an 8 MP frame)
    python bench/kernels.py --frames 64 --rows 512
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from flatd.stack import combine, methods


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=32)
    ap.add_argument("--rows", type=int, default=1224)
    ap.add_argument("--cols", type=int, default=3264)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    rng = np.random.default_rng(1)
    stack = rng.standard_normal((args.frames, args.rows, args.cols), dtype=np.float32) * 120 + 20000
    print(f"{args.frames} x {args.rows}x{args.cols} float32, {combine.default_workers()} threads, best of {args.repeat}")
    print("| method | ms |\n|---|---:|")
    for name in methods.names():
        method = methods.Method(name)
        if method.min_frames > args.frames:
            continue
        combine.combine(stack[:, :8], method)
        best = min(_timed(lambda: combine.combine(stack, method)) for _ in range(args.repeat))
        print(f"| {method.label} | {best * 1000:.1f} |")


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
