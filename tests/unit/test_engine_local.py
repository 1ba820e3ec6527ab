"""flatd.stack.engines.local: streamed bands equal the whole stack in memory, within the memory limit."""

from __future__ import annotations

import math

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from flatd.calibration import Calibration
from flatd.stack.combine import Combiner, Method
from flatd.stack.engines import local as S
from flatd.stack.engines.local import plan_bands, stack_frames
from flatd.errors import StackError
from flatd.ingest.frames import read_frame
from flatd.jobs import StackInput
from flatd.stack.pixels import read_image

from pixelfiles import H, W, flat_data, make_files, write

# the original four with non-default parameters, then every method of the registry (the
# robust ones of issue 9 included) with its defaults: bands of 5 rows, which do not divide H
METHODS = [Method("mean"), Method("median"), Method("minmax", minmax=2), Method("sigma", sigma=1.5)] + [
    Method(name) for name in ("sigma-iterative", "winsorized", "linear-fit", "esd", "mad", "percentile")]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return make_files(tmp_path_factory.mktemp("stack"))


def calibrations(kind, files, n):
    if kind == "none":
        return [Calibration()] * n
    if kind == "pedestal":
        return [Calibration(mode="pedestal", pedestal=100.0 + 7 * i) for i in range(n)]
    return [Calibration(mode="file", frame=files["dark"])] * n


def reference(inputs, method, normalize):
    images = [read_image(item.frame) for item in inputs]
    cals = []
    for item in inputs:
        cal = item.calibration
        cals.append(None if cal.mode == "none" else cal.pedestal if cal.mode == "pedestal" else read_image(cal.frame))
    comb = Combiner(images, cals, normalize=normalize)
    return comb.combine(method), comb


def limit_for(band_rows, n, n_cal, workers, width=W, height=H, itemsize=4):
    """The memory limit at which plan_bands picks `band_rows` (itemsize: the widest
    pixel type among the files; float32 in the fixture)."""
    per_row = width * (4 * (n + n_cal) + itemsize + 8)
    return height * width * 4 + S.RESERVE_BYTES + band_rows * per_row * workers


def assert_close(got, want):
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * float(np.max(np.abs(want))))


# --------------------------------------------------------------------------- tiled == whole


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.label)
@pytest.mark.parametrize("normalize", ["none", "multiplicative"])
@pytest.mark.parametrize("cal", ["none", "pedestal", "dark"])
def test_bands_equal_whole_stack(files, method, normalize, cal):
    flats = files["flats"]
    inputs = [StackInput(f, c) for f, c in zip(flats, calibrations(cal, files, len(flats)))]
    want, comb = reference(inputs, method, normalize)
    n_cal = 1 if cal == "dark" else 0
    result = stack_frames(inputs, method, normalize=normalize, memory_limit=limit_for(5, len(flats), n_cal, 1), workers=1)
    assert result.band_rows == 5
    assert_close(result.image, want)
    if normalize == "none":  # nothing uses them: not measured
        assert all(math.isnan(level) for level in result.levels) and len(result.levels) == len(flats)
    else:
        assert result.levels == pytest.approx(comb.levels, rel=1e-12)
    assert result.factors == pytest.approx(comb.factors, rel=1e-7)
    if normalize == "none":
        assert result.factors == [1.0] * len(flats)
    # several workers, other band heights
    for rows, workers in ((3, 2), (7, 3)):
        other = stack_frames(inputs, method, normalize=normalize,
                             memory_limit=limit_for(rows, len(flats), n_cal, workers), workers=workers)
        assert other.band_rows == rows
        assert_close(other.image, want)


def test_three_frames_and_one_row(tmp_path):
    rng = np.random.default_rng(4)
    frames = [read_frame(write(tmp_path / f"r{i}.fits", flat_data(rng, 5000 * (i + 1), (1, 300)).astype(np.uint16)))
              for i in range(3)]
    inputs = [StackInput(f) for f in frames]
    for method in (Method("mean"), Method("median"), Method("minmax", minmax=1), Method("sigma", sigma=1.0)):
        want, _ = reference(inputs, method, "multiplicative")
        result = stack_frames(inputs, method, workers=2)
        assert result.image.shape == (1, 300)
        assert result.band_rows == 1
        assert_close(result.image, want)


def test_progress_reports_every_band(files):
    inputs = [StackInput(f) for f in files["flats"]]
    seen = []
    stack_frames(inputs, Method("mean"), memory_limit=limit_for(4, len(inputs), 0, 2), workers=2,
                 progress=lambda done, total: seen.append((done, total)))
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert len(seen) == -(-H // 4) and seen[-1] == (H, H) and all(t == H for _, t in seen)


def test_shared_calibration_file_opened_once(files, monkeypatch):
    opened = []
    real = S.open_pixels

    def counting(frame):
        opened.append(Path(frame.path).name)
        return real(frame)

    monkeypatch.setattr(S, "open_pixels", counting)
    flats = files["flats"]
    inputs = [StackInput(f, Calibration(mode="file", frame=files["dark"])) for f in flats]
    stack_frames(inputs, Method("median"), workers=2)
    assert opened.count("dark.fits") == 1
    assert len(opened) == len(flats) + 1


# --------------------------------------------------------------------------- errors


def test_flat_shape_mismatch_names_the_file(files, tmp_path):
    odd = read_frame(write(tmp_path / "odd.fits", np.ones((H + 1, W), np.uint16)))
    inputs = [StackInput(f) for f in files["flats"][:3]] + [StackInput(odd)]
    with pytest.raises(StackError, match=rf"odd\.fits is {W}x{H + 1} but flats are {W}x{H}") as info:
        stack_frames(inputs, Method("mean"))
    assert info.value.path == odd.path


def test_dark_shape_mismatch_names_the_file(files, tmp_path):
    dark = read_frame(write(tmp_path / "bigdark.fits", np.ones((10, 10), np.uint16), IMAGETYP="Dark Frame"))
    inputs = [StackInput(f, Calibration(mode="file", frame=dark)) for f in files["flats"][:3]]
    with pytest.raises(StackError, match=rf"dark .*bigdark\.fits is 10x10 but flats are {W}x{H}"):
        stack_frames(inputs, Method("mean"))


def test_too_few_frames_for_minmax(files):
    inputs = [StackInput(f) for f in files["flats"][:3]]
    with pytest.raises(StackError, match="min/max clip n=2 needs at least 5 frames, got 3"):
        stack_frames(inputs, Method("minmax", minmax=2))


def test_level_not_positive_names_the_file(files):
    flats = files["flats"][:3]
    inputs = [StackInput(flats[0]), StackInput(flats[1], Calibration(mode="pedestal", pedestal=70000)), StackInput(flats[2])]
    with pytest.raises(StackError, match=rf"{flats[1].path.name}: level is 0 ADU after calibration") as info:
        stack_frames(inputs, Method("mean"))
    assert info.value.path == flats[1].path
    result = stack_frames(inputs, Method("mean"), normalize="none")  # nothing to divide by: fine
    assert result.factors == [1.0, 1.0, 1.0] and np.isfinite(result.image).all()


def test_memory_limit_too_small(files):
    inputs = [StackInput(f) for f in files["flats"]]
    with pytest.raises(StackError, match="memory limit .* too small"):
        stack_frames(inputs, Method("mean"), memory_limit=H * W * 4)


def test_plan_bands():
    # 32 frames of 8 MP with the default limit: bands capped, two workers
    rows, workers = plan_bands(32, 0, 3264, 2448, 512 * 2**20, 2, 2)
    assert workers == 2 and 1 <= rows <= S.MAX_BAND_ROWS
    # 100 frames of 26 MP with 512 MiB: the output alone is 104 MB
    rows, workers = plan_bands(100, 1, 6252, 4176, 512 * 2**20, 2, 2)
    per_row = 6252 * (4 * 101 + 2 + 8)
    assert 6252 * 4176 * 4 + rows * workers * per_row <= 512 * 2**20
    # tight limit: fewer workers rather than no band
    rows, workers = plan_bands(10, 0, 1000, 100, 100 * 1000 * 4 + S.RESERVE_BYTES + 1000 * 56, 4, 8)
    assert (rows, workers) == (1, 1)


# --------------------------------------------------------------------------- memory bound

MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys, tracemalloc
    from pathlib import Path
    import numpy as np
    from flatd.ingest.frames import read_frame
    from flatd.stack.combine import Method
    from flatd.jobs import StackInput
    from flatd.stack.engines.local import stack_frames
    from flatd.calibration import Calibration

    folder, limit = Path(sys.argv[1]), int(sys.argv[2])
    frames = [read_frame(p) for p in sorted(folder.glob("flat*.fits"))]
    dark = read_frame(folder / "dark.fits")
    inputs = [StackInput(f, Calibration(mode="file", frame=dark)) for f in frames]
    # load the kernels first, so their one-off memory is not counted
    stack_frames(inputs[:5], Method("sigma"), memory_limit=limit, workers=2)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    tracemalloc.start()
    result = stack_frames(inputs, Method("sigma"), memory_limit=limit, workers=2)
    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"peak": peak, "rss_growth": rss1 - rss0, "band_rows": result.band_rows,
                      "mean": float(result.image.mean())}))
    """
)


def test_memory_stays_under_the_limit(tmp_path):
    n, h, w = 40, 1000, 1000
    rng = np.random.default_rng(9)
    base = rng.normal(20000, 100, size=(h, w))
    for i in range(n):
        write(tmp_path / f"flat{i:02d}.fits", (base * (1 + 0.01 * i)).astype(np.uint16))
    write(tmp_path / "dark.fits", np.full((h, w), 200, np.uint16))
    limit = 16 * 2**20
    out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(tmp_path), str(limit)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    stats = json.loads(out.stdout.strip().splitlines()[-1])
    assert 1 <= stats["band_rows"] < h
    assert stats["peak"] <= limit + 2 * 2**20, stats
    # ru_maxrss is a high-water mark: whatever it grew by was allocated during the stack
    assert stats["rss_growth"] <= limit + 16 * 2**20, stats
    assert stats["mean"] > 0


class Abandon(BaseException):
    pass


def test_progress_can_cut_a_job_short(files, monkeypatch):
    """The service raises a BaseException from the progress callback to abandon a job:
    it propagates, no band starts after it, and every file is closed."""
    sources = []
    real = S.open_pixels

    def tracking(frame):
        sources.append(real(frame))
        return sources[-1]

    monkeypatch.setattr(S, "open_pixels", tracking)
    calls = []

    def progress(done, total):
        calls.append(done)
        if len(calls) == 2:
            raise Abandon()

    inputs = [StackInput(f) for f in files["flats"]]
    with pytest.raises(Abandon):
        stack_frames(inputs, Method("median"), memory_limit=limit_for(3, len(inputs), 0, 2), workers=2, progress=progress)
    assert len(calls) == 2
    assert sources and all(s._fd is None and s._hdul is None for s in sources)


# --------------------------------------------------------------------------- the engine seam


def _job(inputs, method, normalize="multiplicative"):
    from types import SimpleNamespace

    from flatd.jobs import Job

    group = SimpleNamespace(label="g1", frames=tuple(i.frame for i in inputs))
    return Job(id="j1", group=group, rule=None, method=method, normalize=normalize, inputs=tuple(inputs),
               output_dir=Path("."), output_name="m.fits", move_to=None)


def test_engine_stacks_a_job_with_its_settings(files):
    from flatd.config import Engine
    from flatd.stack.engines import make_engine

    inputs = [StackInput(f) for f in files["flats"]]
    calls = []

    def progress(label, rows):
        calls.append((label, rows))
        return lambda done, total: calls.append((done, total))

    settings = Engine(memory_limit=limit_for(3, len(inputs), 0, 2), workers=2)
    engine = make_engine(settings, progress)
    assert isinstance(engine, S.LocalEngine)
    result = engine.stack(_job(inputs, Method("median")))
    want = stack_frames(inputs, Method("median"), memory_limit=settings.memory_limit, workers=2)
    assert result.band_rows == 3
    np.testing.assert_array_equal(result.image, want.image)
    assert calls[0] == ("g1", H) and calls[-1] == (H, H)


def test_engine_errors_name_the_file(files, tmp_path):
    from flatd.stack.engines import make_engine

    odd = read_frame(write(tmp_path / "odd.fits", np.ones((H + 1, W), np.uint16)))
    inputs = [StackInput(f) for f in files["flats"][:3]] + [StackInput(odd)]
    with pytest.raises(StackError, match=r"odd\.fits is"):
        make_engine().stack(_job(inputs, Method("mean")))


def test_unknown_engine_kind_is_refused():
    from flatd.config import Engine
    from flatd.stack.engines import make_engine
    from flatd.errors import FlatdError

    with pytest.raises(FlatdError, match="engine.kind 'cloud' is not known; the engines are: local, dask"):
        make_engine(Engine.model_construct(kind="cloud", memory_limit=2**20, workers=1))


def test_engine_kind_in_the_rules_file():
    from flatd.config import ConfigError, parse_rules

    assert parse_rules("engine: {kind: local}").engine.kind == "local"
    with pytest.raises(ConfigError, match="engine.kind"):
        parse_rules("engine: {kind: ../../bin/sh}")


# --------------------------------------------------------------------------- rejection counted (issue 9)


def normalized_stack(inputs, normalize="multiplicative"):
    """The calibrated, normalized whole stack, as the reference Combiner makes it."""
    from flatd.stack.combine import normalization_factors, normalize as apply

    _, comb = reference(inputs, Method("mean"), normalize)
    stack = comb.calibrated()
    if normalize == "multiplicative":
        apply(stack, normalization_factors(comb.levels))
    return stack


def plain_sigma_codes(stack, z):
    """The original's one-pass sigma clip, per column, in float64: 0 rejected below the
    mean, 2 above, 1 kept (z >= 1: no column is emptied, so no min/max fallback)."""
    x = stack.astype(np.float64)
    mean = x.mean(axis=0)
    std = x.std(axis=0)
    out = np.abs(x - mean) > z * std
    codes = np.ones(x.shape, np.uint8)
    codes[out & (x < mean)] = 0
    codes[out & (x > mean)] = 2
    return codes


@pytest.mark.parametrize("cal", ["none", "dark"])
def test_rejections_are_counted_per_frame_and_per_pixel(files, cal):
    flats = files["flats"]
    inputs = [StackInput(f, c) for f, c in zip(flats, calibrations(cal, files, len(flats)))]
    codes = plain_sigma_codes(normalized_stack(inputs), 1.5)
    want_frames = np.stack([(codes == 0).sum(axis=(1, 2)), (codes == 2).sum(axis=(1, 2))], axis=1)
    want_map = np.stack([(codes == 0).sum(axis=0), (codes == 2).sum(axis=0)]).astype(np.uint16)
    assert want_frames.sum() > 0
    n_cal = 1 if cal == "dark" else 0
    for rows, workers in ((5, 1), (3, 2), (7, 3)):
        limit = limit_for(rows, len(flats), n_cal, workers) + 2 * H * W * 4 + rows * W * 4 * workers
        result = stack_frames(inputs, Method("sigma", sigma=1.5), memory_limit=limit, workers=workers,
                              rejection_map=True)
        assert result.rejected.dtype == np.int64 and result.rejected.shape == (len(flats), 2)
        np.testing.assert_array_equal(result.rejected, want_frames)
        assert result.rejection_map.dtype == np.uint16 and result.rejection_map.shape == (2, H, W)
        np.testing.assert_array_equal(result.rejection_map, want_map)
        low, high = result.rejected_fractions()
        assert low == want_frames[:, 0].sum() / (len(flats) * H * W)
        assert high == want_frames[:, 1].sum() / (len(flats) * H * W)
        assert result.frame_fractions()[2] == (want_frames[2, 0] / (H * W), want_frames[2, 1] / (H * W))
    plain = stack_frames(inputs, Method("sigma", sigma=1.5))  # no map asked: counted all the same
    assert plain.rejection_map is None
    np.testing.assert_array_equal(plain.rejected, want_frames)


def test_a_method_without_rejection_rejects_nothing(files):
    inputs = [StackInput(f) for f in files["flats"]]
    result = stack_frames(inputs, Method("median"), rejection_map=True)
    assert not result.rejected.any() and not result.rejection_map.any()
    assert result.rejected_fractions() == (0.0, 0.0)


def test_plan_bands_counts_the_rejection_map():
    n, w, h = 10, 1000, 400
    per_row = w * (4 * n + 2 + 8)
    limit = h * w * 4 + S.RESERVE_BYTES + 8 * per_row
    rows, _ = plan_bands(n, 0, w, h, limit, 1, 2)
    assert rows == 8
    # the map: H*W*4 more, fixed, and 4 bytes a pixel of each band
    rows, _ = plan_bands(n, 0, w, h, limit + h * w * 4 + 8 * w * 4, 1, 2, rejection_map=True)
    assert rows == 8
    rows, _ = plan_bands(n, 0, w, h, limit + h * w * 4 + 8 * w * 4 - 1, 1, 2, rejection_map=True)
    assert rows == 7
    with pytest.raises(StackError, match="with a rejection map"):
        plan_bands(n, 0, w, h, limit, 1, 2, rejection_map=True)


def test_level_plan_stays_in_the_limit():
    from flatd.stack import levels as LV

    # the default: the levels' own step, every worker
    step, workers = S.level_plan(3264, 2448, 512 * 2**20, 2, 2)
    assert (step, workers) == (LV.grid_step(2448, 3264), 2)
    # a tight limit: fewer workers, then a coarser grid, never beyond the limit
    for limit in (6 * 2**20, 8 * 2**20, 16 * 2**20):
        step, workers = S.level_plan(3264, 2448, limit, 4, 2)
        rows, cols = LV.sample_shape(2448, 3264, step)
        need = rows * cols * 4 + workers * S.level_bytes(3264, 2448, step, 2)
        assert need <= limit - S.RESERVE_BYTES // 2, (limit, step, workers)
        assert step >= LV.grid_step(2448, 3264)


def test_memory_stays_under_the_limit_with_a_rejection_map(tmp_path):
    n, h, w = 40, 1000, 1000
    rng = np.random.default_rng(10)
    base = rng.normal(20000, 100, size=(h, w))
    for i in range(n):
        write(tmp_path / f"flat{i:02d}.fits", (base * (1 + 0.01 * i)).astype(np.uint16))
    write(tmp_path / "dark.fits", np.full((h, w), 200, np.uint16))
    limit = 20 * 2**20
    measured = 'result = stack_frames(inputs, Method("sigma"), memory_limit=limit, workers=2)'
    assert MEMORY_SCRIPT.count(measured) == 1
    script = MEMORY_SCRIPT.replace(measured, measured[:-1] + ", rejection_map=True)")
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path), str(limit)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    stats = json.loads(out.stdout.strip().splitlines()[-1])
    assert 1 <= stats["band_rows"] < h
    assert stats["peak"] <= limit + 2 * 2**20, stats
    assert stats["rss_growth"] <= limit + 16 * 2**20, stats


def test_level_grid_of_a_colour_sensor_samples_every_colour():
    """An even step lands on one colour of the mosaic only; a colour group's step is odd."""
    from flatd.stack import levels as LV

    even = LV.grid_step(2448, 3264)
    assert even % 2 == 0  # the case that matters: 12 on this sensor
    step, _ = S.level_plan(3264, 2448, 512 * 2**20, 2, 2, odd=True)
    assert step % 2 == 1 and step <= even
    rows, cols = LV.grid_slices(2448, 3264, step)
    parities = {(r % 2, c % 2) for r in range(2448)[rows][:2] for c in range(3264)[cols][:2]}
    assert parities == {(0, 0), (0, 1), (1, 0), (1, 1)}
    for limit in (6 * 2**20, 16 * 2**20):  # a tight limit coarsens the grid, and it stays odd
        assert S.level_plan(3264, 2448, limit, 4, 2, odd=True)[0] % 2 == 1
