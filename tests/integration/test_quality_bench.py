"""bench/quality.py runs end to end on tiny frames (a smoke test: no quality or time threshold)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "quality.py"


@pytest.fixture
def quality():
    spec = importlib.util.spec_from_file_location("flatd_bench_quality", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


@pytest.mark.skipif(not (Path(sys.executable).parent / "flatd").exists(), reason="needs the installed flatd command")
def test_quality_script_prints_a_table_per_scenario(quality, capsys):
    assert quality.main(["--size", "48", "--scenarios", "b,e", "--methods", "mean,median", "--no-siril"]) == 0
    out = capsys.readouterr().out
    assert "### b:" in out and "### e:" in out
    assert "| flatd | mean |" in out and "| flatd | median |" in out
    assert "photon-noise floor" in out and "norm err %" in out
    assert "failed" not in out


def test_scores_of_the_truth_itself_are_zero(quality, tmp_path):
    stack = quality.make_stack(quality.SCENARIOS[1], 32, tmp_path)
    score = quality.score(stack.truth * 123.0, stack, quality.Score("x", "truth"))
    assert score.rms == pytest.approx(0, abs=1e-9) and score.worst == pytest.approx(0, abs=1e-9)
    assert len(stack.paths) == 7 and quality.floor_of(stack) > 0
