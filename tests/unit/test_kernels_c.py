"""The compiled kernels' own seams (flatd/stack/_kernels.c): hostile calls are refused
with a clear error instead of reading or writing out of bounds, and the baseline build
(no AVX2) gives the same masters as the AVX2 one, bit for bit."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from flatd.stack import _kernels
from flatd.stack import combine as C
from flatd.stack.methods import Method, names

N, ROWS, COLS = 5, 4, 37


def _args(**change):
    """A valid combine_rows call (mean, no rejection), with some arguments replaced."""
    stack = np.ones((N, ROWS, COLS), np.float32)
    args = dict(stack=stack, n=N, rows=ROWS, cols=COLS, out=np.empty((ROWS, COLS), np.float32), r0=0, r1=ROWS,
                reject=0, params=np.zeros(0), estimator=0, enet=np.zeros((0, 2), np.int64),
                rnet=np.zeros((0, 2), np.int64), tile=16, frame_counts=None, pixel_counts=None, prow0=0,
                given=None, g0=0)
    args.update(change)
    return list(args.values())


def test_a_valid_call_combines():
    out = np.empty((ROWS, COLS), np.float32)
    _kernels.combine_rows(*_args(out=out))
    assert (out == 1).all()


@pytest.mark.parametrize("change, message", [
    (dict(stack=np.ones(10, np.float32)), "stack"),
    (dict(out=np.empty((1, COLS), np.float32)), "out"),
    (dict(r1=ROWS + 1), "bad dimensions"),
    (dict(r0=3, r1=2), "bad dimensions"),
    (dict(n=0), "bad dimensions"),
    (dict(tile=0), "bad dimensions"),
    (dict(reject=99), "bad dimensions or kernel"),
    (dict(estimator=7), "bad dimensions or kernel"),
    (dict(reject=1, params=np.zeros(0)), "too few parameters"),
    (dict(reject=8, params=np.array([0.3, 0.05, 1.0, 1e12])), "too few parameters"),
    (dict(reject=8, params=np.array([0.3, 0.05, 1.0, float("nan")])), "too few parameters"),
    (dict(estimator=1, enet=np.array([[0, N]], np.int64)), "estimator network: index"),
    (dict(reject=3, params=np.array([3.0, 3.0]), rnet=np.array([[-1, 2]], np.int64)), "rejection network: index"),
    (dict(enet=np.zeros(3, np.int64)), "pairs expected"),
    (dict(frame_counts=np.zeros((N - 1, 2), np.int64)), "frame_counts"),
    (dict(reject=1, params=np.array([1.0]), pixel_counts=np.zeros((2, 1, COLS), np.uint16)), "pixel_counts"),
    (dict(reject=9, params=np.zeros(0)), "keep codes required"),
    (dict(reject=9, params=np.zeros(0), given=np.ones((N, 1, COLS), np.uint8)), "keep codes: rows"),
])
def test_hostile_calls_are_refused(change, message):
    with pytest.raises(ValueError, match=message):
        _kernels.combine_rows(*_args(**change))


def test_read_only_output_is_refused():
    out = np.empty((ROWS, COLS), np.float32)
    out.flags.writeable = False
    with pytest.raises((BufferError, TypeError, ValueError)):
        _kernels.combine_rows(*_args(out=out))


@pytest.mark.parametrize("args, message", [
    ((0, np.zeros(3, np.uint16), np.empty((2, 4), np.float32), 2, 4, 1.0, 0.0, 0, None, 0.0, 1.0), "raw"),
    ((0, np.zeros(8, np.uint16), np.empty(3, np.float32), 2, 4, 1.0, 0.0, 0, None, 0.0, 1.0), "out"),
    ((0, np.zeros(8, np.uint16), np.empty((2, 4), np.float32), 2, 4, 1.0, 0.0, 2, None, 0.0, 1.0), "cal"),
    ((0, np.zeros(8, np.uint16), np.empty((2, 4), np.float32), 2, 4, 1.0, 0.0, 2, np.zeros(3, np.float32), 0.0,
      1.0), "cal"),
    ((11, np.zeros(8, np.uint16), np.empty((2, 4), np.float32), 2, 4, 1.0, 0.0, 0, None, 0.0, 1.0), "bad kind"),
    ((0, np.zeros(8, np.uint16), np.empty((2, 4), np.float32), 2, 4, 1.0, 0.0, 3, None, 0.0, 1.0), "bad kind"),
    ((0, np.zeros(8, np.uint16), np.empty((2, 4), np.float32), -2, 4, 1.0, 0.0, 0, None, 0.0, 1.0), "bad kind"),
])
def test_hostile_fills_are_refused(args, message):
    with pytest.raises((ValueError, TypeError), match=message):
        _kernels.fill(*args)


def test_hostile_reject_row_is_refused():
    stack = np.ones((N, ROWS, COLS), np.float32)
    keep = np.empty((N, COLS), np.uint8)
    with pytest.raises(ValueError, match="bad dimensions"):
        _kernels.reject_row(stack, N, ROWS, COLS, ROWS, 2, np.array([2.0]), np.zeros((0, 2), np.int64), keep)
    with pytest.raises(ValueError, match="keep"):
        _kernels.reject_row(stack, N, ROWS, COLS, 0, 2, np.array([2.0]), np.zeros((0, 2), np.int64), keep[:1])


_MASTERS = """
import json, sys
import numpy as np
from flatd.stack import _kernels, combine as C
from flatd.stack.methods import Method, names
rng = np.random.default_rng(5)
stack = (rng.normal(20000, 150, (23, 9, 131)) * rng.uniform(0.9, 1.1, (23, 1, 1))).astype(np.float32)
stack[3, 2, 7] = 65000
stack[:, 4, 9] = 20000.0  # an all-equal column
out = {}
for name in names():
    if Method(name).min_frames <= 23:
        fc = np.zeros((23, 2), np.int64)
        master = C.combine(stack, Method(name), workers=1, frame_counts=fc)
        out[name] = [master.tobytes().hex(), fc.tolist()]
print(json.dumps({"isa": _kernels.ISA, "masters": out}))
"""


def _masters(env_extra: dict) -> dict:
    env = dict(os.environ, **env_extra)
    text = subprocess.run([sys.executable, "-c", _MASTERS], capture_output=True, text=True, check=True,
                          env=env).stdout
    return json.loads(text)


def test_the_baseline_build_equals_the_default_one():
    default = _masters({})
    baseline = _masters({"FLATD_BASELINE_KERNELS": "1"})
    assert baseline["isa"] == "baseline" and default["isa"] in ("avx2", "baseline")
    assert set(default["masters"]) == {n for n in names() if Method(n).min_frames <= 23}
    for name, (master, counts) in default["masters"].items():
        assert baseline["masters"][name] == [master, counts], name


def test_the_plans():
    plan = C._kernel(Method("esd"), 23)
    assert plan.params[3] == len(C.esd_critical(23, 0.3, 0.05))  # r, then the lambdas
    assert C._kernel(Method("winsorized"), 32).tile <= 8192 // 32
