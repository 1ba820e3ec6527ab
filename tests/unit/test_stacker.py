"""flatd.stacker: streamed bands equal the whole stack in memory, within the memory limit."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from flatd import stacker as S
from flatd.calibration import Calibration
from flatd.combine import Combiner, Method
from flatd.frames import read_frame
from flatd.stacker import StackError, StackInput, mean_adu, open_pixels, plan_bands, read_image, stack_frames

METHODS = [Method("mean"), Method("median"), Method("minmax", minmax=2), Method("sigma", sigma=1.5)]
H, W = 37, 53  # bands of 5 rows leave a band of 2 at the bottom


def write(path: Path, data: np.ndarray, compressed: bool = False, **header) -> Path:
    if compressed:
        hdul = fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(data)])
    else:
        hdul = fits.HDUList([fits.PrimaryHDU(data)])
    for key, value in header.items():
        hdul[-1].header[key] = value
    hdul.writeto(path)
    return path


def flat_data(rng, level, shape=(H, W)):
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    vignette = 1 - 0.2 * (((xx - w / 2) / w) ** 2 + ((yy - h / 2) / h) ** 2)
    data = rng.normal(level * vignette, 40)
    data[rng.random(shape) < 0.01] = 65000  # hot pixels and cosmic rays to reject
    return data.clip(0, 65535)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """7 flats of mixed storage (uint16 with BZERO, int16, float32, tile-compressed) and a dark."""
    d = tmp_path_factory.mktemp("stack")
    rng = np.random.default_rng(11)
    flats = []
    kinds = ["uint16", "uint16", "int16", "float32", "fz", "uint16", "fz"]
    for i, kind in enumerate(kinds):
        data = flat_data(rng, 8000 + 2500 * i)
        if kind == "uint16":
            path = write(d / f"flat{i}.fits", data.astype(np.uint16), IMAGETYP="Flat Field")
        elif kind == "int16":
            path = write(d / f"flat{i}.fits", (data / 4).astype(np.int16), IMAGETYP="Flat Field")
        elif kind == "float32":
            data[5, :7] = 80000.0  # above the 16-bit range: clipped to 65535 when calibrated
            path = write(d / f"flat{i}.fits", data.astype(np.float32), IMAGETYP="Flat Field")
        else:
            path = write(d / f"flat{i}.fits.fz", data.astype(np.uint16), compressed=True, IMAGETYP="Flat Field")
        flats.append(read_frame(path))
    dark = rng.normal(300, 30, size=(H, W))
    dark[3, 4] = 60000  # brighter than the flats there: the subtraction clips at 0
    dark_frame = read_frame(write(d / "dark.fits", dark.astype(np.uint16), IMAGETYP="Dark Frame"))
    return {"dir": d, "flats": flats, "dark": dark_frame}


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


# --------------------------------------------------------------------------- reading


def test_read_image_matches_astropy(files):
    for frame in files["flats"] + [files["dark"]]:
        want = fits.getdata(frame.path, ext=frame.hdu_index).astype(np.float32)
        np.testing.assert_array_equal(read_image(frame), want)


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.uint16, np.int32, np.float32, np.float64])
def test_every_bitpix_and_bscale(tmp_path, dtype):
    rng = np.random.default_rng(2)
    data = (rng.random((9, 11)) * 200).astype(dtype)
    path = write(tmp_path / "x.fits", data)
    frame = read_frame(path)
    np.testing.assert_array_equal(read_image(frame), fits.getdata(path).astype(np.float32))
    with open_pixels(frame) as src:
        np.testing.assert_array_equal(src.rows(3, 7), fits.getdata(path)[3:7].astype(np.float32))
    scaled = write(tmp_path / "s.fits", (data.astype(np.int32) if dtype != np.float64 else data), BSCALE=0.5, BZERO=10.0)
    frame = read_frame(scaled)
    assert frame.bscale == 0.5
    np.testing.assert_allclose(read_image(frame), fits.getdata(scaled).astype(np.float32), rtol=1e-7)


def test_three_d_single_plane(tmp_path):
    data = np.arange(4 * 5, dtype=np.uint16).reshape(1, 4, 5) * 100
    frame = read_frame(write(tmp_path / "cube.fits", data))
    assert frame.naxis == 3
    np.testing.assert_array_equal(read_image(frame), data[0].astype(np.float32))


def test_mean_adu_streams(files):
    for frame in files["flats"][:5]:
        want = float(np.mean(fits.getdata(frame.path, ext=frame.hdu_index), dtype=np.float64))
        assert mean_adu(frame, chunk_bytes=3 * W * 4) == pytest.approx(want, rel=1e-12)


def test_truncated_file_is_an_error_naming_it(tmp_path):
    path = write(tmp_path / "t.fits", np.ones((20, 30), np.uint16))
    frame = read_frame(path)
    with open(path, "r+b") as fh:
        fh.truncate(frame.data_offset + 100)
    with pytest.raises(StackError, match=r"t.fits changed since it was planned \(size .*nothing is moved"):
        read_image(frame)
    with pytest.raises(StackError, match="t.fits: truncated"):  # no identity to compare: the size check
        read_image(dataclasses.replace(frame, inode=0))


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
    assert result.levels[1] == 0.0


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
    from flatd.frames import read_frame
    from flatd.combine import Method
    from flatd.stacker import StackInput, stack_frames
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
