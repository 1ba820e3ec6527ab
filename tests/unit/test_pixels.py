"""flatd.stack.pixels: row bands of every storage, as astropy reads them; truncated and replaced files refused."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from astropy.io import fits

from flatd.errors import FlatdError
from flatd.ingest.frames import read_frame
from flatd.stack.pixels import StackError, mean_adu, open_pixels, read_image

from pixelfiles import W, make_files, write


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return make_files(tmp_path_factory.mktemp("stack"))


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
        read_image(dataclasses.replace(frame, inode=0, file_size=0))
    # on a Dask worker (no device or inode that mean anything there): size, mtime and header
    with pytest.raises(StackError, match=r"t.fits changed since it was planned \(size "):
        read_image(dataclasses.replace(frame, device=0, inode=0))


def test_pixel_errors_are_flatd_errors(tmp_path):
    """The runner fails the job with the message (FlatdError), not as an internal error."""
    frame = read_frame(write(tmp_path / "gone.fits", np.ones((4, 5), np.uint16)))
    (tmp_path / "gone.fits").unlink()
    with pytest.raises(FlatdError, match="gone.fits: cannot open") as info:
        read_image(frame)
    assert isinstance(info.value, StackError) and info.value.path == frame.path
