"""PNG previews of masters and of their ratio to the previous master (flatd.qc.previews)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flatd.demo import Donut, Pattern, illumination
from flatd.output.masters import NoSpace, cleanup_temp_files
from flatd.qc import previews as P
from flatd.stack.cfa import Layout, channel_masks


@dataclass
class Blob:  # stands in for flatd.qc.previous.Blob
    x: float
    y: float
    radius: float
    depth: float
    kind: str


def _flat(shape=(600, 800), donuts=(), falloff=(0.30, 0.08), noise=0.001, seed=1) -> np.ndarray:
    """A master-like flat: 25-35 % vignetting, the given donuts, relative noise, level 30000."""
    field_ = illumination(shape, 1, Pattern(falloff=falloff, donuts=tuple(donuts)))
    rng = np.random.default_rng(seed)
    return (30000 * field_ * (1 + rng.normal(0, noise, shape))).astype(np.float32)


def _roundtrip(tmp_path: Path, image: Image.Image) -> Image.Image:
    path = P.write_png(tmp_path / "x.preview.png", image)
    with Image.open(path) as im:
        im.load()
        assert im.format == "PNG"
        return im.copy()


# --------------------------------------------------------------------- names and writing


def test_preview_paths_sit_beside_the_master():
    for name, stem in (("FLAT-R-1x1.fits", "FLAT-R-1x1"), ("m.fits.fz", "m"), ("m.XISF", "m"), ("m.fit", "m")):
        preview, ratio = P.preview_paths(Path("/o") / name)
        assert preview == Path("/o") / f"{stem}.preview.png"
        assert ratio == Path("/o") / f"{stem}.ratio.png"


def test_write_png_is_atomic_and_leaves_no_temp(tmp_path):
    image = P.master_preview(_flat((60, 80)))
    path = P.write_png(tmp_path / "a.preview.png", image)
    assert path.exists() and [p.name for p in tmp_path.iterdir()] == ["a.preview.png"]
    P.write_png(path, image)  # a preview is replaced with its master
    assert [p.name for p in tmp_path.iterdir()] == ["a.preview.png"]


def test_write_png_temp_names_are_ignored_and_cleaned_up(tmp_path, monkeypatch):
    from flatd.ingest.frames import is_fits_name, is_ignored_name

    def broken_replace(src, dst):
        raise OSError(5, "I/O error")

    monkeypatch.setattr(P.os, "replace", broken_replace)
    seen = []
    real_fdopen = os.fdopen

    def spy(fd, *a, **k):
        seen.append(sorted(tmp_path.iterdir()))
        return real_fdopen(fd, *a, **k)

    monkeypatch.setattr(P.os, "fdopen", spy)
    with pytest.raises(OSError):
        P.write_png(tmp_path / "a.preview.png", P.master_preview(_flat((60, 80))))
    temp = seen[0][0]
    assert is_ignored_name(temp) and not is_fits_name(temp)
    assert list(tmp_path.iterdir()) == []  # removed on failure
    temp.write_bytes(b"x")  # as a crash would leave it
    assert cleanup_temp_files(tmp_path) == [temp]


def test_write_png_checks_free_space(tmp_path, monkeypatch):
    import flatd.output.masters as M

    monkeypatch.setattr(M, "free_bytes", lambda directory: 10)
    with pytest.raises(NoSpace):
        P.write_png(tmp_path / "a.preview.png", P.master_preview(_flat((60, 80))))
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------- the master preview


@pytest.mark.parametrize("shape,expected", [((2448, 3264), (816, 612)), ((480, 640), (640, 480)),
                                            ((5000, 300), (60, 1000)), ((1025, 7), (4, 513))])
def test_preview_size_at_most_1024_and_aspect_kept(tmp_path, shape, expected):
    image = np.ones(shape, np.float32) + np.linspace(0, 0.1, shape[1], dtype=np.float32)
    im = _roundtrip(tmp_path, P.master_preview(image))
    assert im.mode == "L" and im.size == expected and max(im.size) <= P.MAX_SIDE == 1024
    assert abs(im.size[0] / im.size[1] - shape[1] / shape[0]) < 0.05 * shape[1] / shape[0] + 2 / min(im.size)


def test_downsampling_is_an_area_average_not_a_decimation():
    image = np.zeros((2048, 2048), np.float32)
    image[::2] = 2.0  # every other row: decimation would see only one of them
    binned = P.bin_mean(image, P.bin_factor(image.shape))
    assert binned.shape == (1024, 1024) and np.allclose(binned, 1.0)


def _ring_contrast(picture: np.ndarray, cx: float, cy: float, inner: float, outer: float) -> float:
    """Mean grey of the annulus outside the donut minus that of its dark ring."""
    y, x = np.mgrid[0:picture.shape[0], 0:picture.shape[1]]
    r = np.hypot(x - cx, y - cy)
    ring = (r > 0.6 * inner) & (r < 0.95 * inner)
    around = (r > 1.5 * outer) & (r < 2.2 * outer)
    return float(picture[around].mean() - picture[ring].mean())


@pytest.mark.parametrize("depth,min_contrast", [(0.01, 35.0), (0.005, 15.0)])
def test_a_faint_dust_donut_shows_over_strong_vignetting(tmp_path, depth, min_contrast):
    shape = (1224, 1632)
    donut = Donut(0.30, 0.40, 0.02, depth)  # a ring of ~33 px radius, 1 % deep, on 25-35 % vignetting
    im = _roundtrip(tmp_path, P.master_preview(_flat(shape, [donut])))
    picture = np.asarray(im, dtype=np.float64)
    scale = shape[1] / im.size[0]
    outer = donut.radius * shape[1] / scale
    cx, cy = donut.x * shape[1] / scale, donut.y * shape[0] / scale
    assert _ring_contrast(picture, cx, cy, outer, outer) > min_contrast
    # the vignetting shows too: the corners are much darker than the centre
    h, w = picture.shape
    centre = picture[h // 2 - 20:h // 2 + 20, w // 2 - 20:w // 2 + 20].mean()
    corners = np.mean([picture[:20, :20].mean(), picture[-20:, -20:].mean()])
    assert centre - corners > 60
    # and a clean patch of the same field is calm: no donut where there is none
    assert abs(_ring_contrast(picture, w * 0.7, h * 0.7, outer, outer)) < 6


def test_colour_preview_of_a_neutral_mosaic_is_grey(tmp_path):
    shape = (600, 800)
    mosaic = _flat(shape, [Donut(0.3, 0.4, 0.04, 0.02)])
    layout = Layout("RGGB")
    response = {"R": 0.45, "G": 1.0, "B": 0.7}  # a colour sensor's unequal channels
    for colour, mask in channel_masks(shape, layout).items():
        mosaic[mask] *= response[colour]
    im = _roundtrip(tmp_path, P.master_preview(mosaic, layout))
    assert im.mode == "RGB" and im.size == (400, 300)
    rgb = np.asarray(im, dtype=np.float64)
    means = rgb.reshape(-1, 3).mean(axis=0)
    assert np.ptp(means) < 6, means  # balanced: a flat field is grey
    # the donut shows, in every channel
    cx, cy, outer = 0.3 * 400, 0.4 * 300, 0.04 * 400
    for c in range(3):
        assert _ring_contrast(rgb[..., c], cx, cy, outer, outer) > 20


def test_colour_layout_phase_is_followed():
    mosaic = np.ones((4, 4), np.float32)
    mosaic[0::2, 0::2] = 5.0  # the R pixels of RGGB
    planes = P._superpixels(mosaic, Layout("RGGB"))
    assert np.all(planes["R"] == 5) and np.all(planes["G"] == 1) and np.all(planes["B"] == 1)
    planes = P._superpixels(mosaic, Layout("BGGR"))
    assert np.all(planes["B"] == 5) and np.all(planes["R"] == 1)


def test_bottom_up_masters_are_shown_top_down():
    image = np.ones((100, 100), np.float32)
    image[:10] = 0.5  # stored first rows: the bottom of a BOTTOM-UP image
    top_down = np.asarray(P.master_preview(image))
    flipped = np.asarray(P.master_preview(image, bottom_up=True))
    assert np.array_equal(flipped, top_down[::-1])


@pytest.mark.parametrize("image", [
    np.zeros((50, 60), np.float32),
    np.full((50, 60), 7.0, np.float32),
    np.ones((1, 1), np.float32),
    np.ones((100000, 2), np.float32),
    np.ones((2, 100000), np.float32),
    np.where(np.arange(3000).reshape(50, 60) % 7 == 0, np.inf, 1.0).astype(np.float32),
    np.full((50, 60), np.nan, np.float32),
    np.full((50, 60), -3.0, np.float32),
    np.arange(3000, dtype=np.uint16).reshape(50, 60),
    np.linspace(-1e30, 1e30, 3000, dtype=np.float32).reshape(50, 60),
], ids=["zeros", "constant", "1x1", "100000x2", "2x100000", "inf", "all-nan", "negative", "uint16", "huge"])
def test_hostile_images_give_a_png_or_a_clear_error(tmp_path, image):
    for layout in (None, Layout("RGGB")):
        try:
            picture = P.master_preview(image, layout)
        except P.PreviewError as exc:
            assert str(exc)
            continue
        im = _roundtrip(tmp_path, picture)
        assert max(im.size) <= 1024 and min(im.size) >= 1


def test_the_masters_array_is_left_as_it_was():
    image = _flat((300, 400), [Donut(0.3, 0.4, 0.04, 0.02)])
    image[5, 5] = np.nan
    for copy in (image.copy(), np.nan_to_num(image)):
        before = copy.copy()
        P.master_preview(copy)
        P.master_preview(copy, Layout("RGGB"))
        P.ratio_preview(copy / np.nanmedian(copy), [])
        np.testing.assert_array_equal(copy, before)


def test_all_nan_is_a_clear_error():
    with pytest.raises(P.PreviewError, match="no finite pixel"):
        P.master_preview(np.full((20, 20), np.nan, np.float32))
    with pytest.raises(P.PreviewError, match="2-D"):
        P.master_preview(np.ones((2, 3, 4), np.float32))


# --------------------------------------------------------------------- the ratio preview


def test_ratio_preview_marks_blobs_at_their_place(tmp_path):
    shape = (1000, 1600)
    now = illumination(shape, 1, Pattern(falloff=(0, 0), gradient=(0, 0), donuts=(Donut(0.25, 0.3, 0.02, 0.01),)))
    before = illumination(shape, 1, Pattern(falloff=(0, 0), gradient=(0, 0), donuts=(Donut(0.7, 0.7, 0.02, 0.01),)))
    ratio = (now / before).astype(np.float32)
    blobs = [Blob(0.25 * 1600, 0.3 * 1000, 32, 1.0, "appeared"), Blob(0.7 * 1600, 0.7 * 1000, 32, 1.0, "went")]
    im = _roundtrip(tmp_path, P.ratio_preview(ratio, blobs))
    assert im.mode == "P" and im.size == (800, 500)  # a palette picture: written unfiltered, a third of the bytes
    rgb = np.asarray(im.convert("RGB"), dtype=np.int32)
    unmarked = np.asarray(P.ratio_preview(ratio, []).convert("RGB"), dtype=np.int32)
    changed = np.any(rgb != unmarked, axis=2)
    ys, xs = np.nonzero(changed)
    for blob in blobs:
        cx, cy = blob.x / 2, blob.y / 2
        near = (np.abs(xs - cx) < 60) & (np.abs(ys - cy) < 40)
        assert near.sum() > 50  # a circle drawn there
        # on the circle, 1.4 radius out: the mark goes round the blob
        assert changed[int(cy), int(cx + 1.4 * blob.radius / 2)]
        assert tuple(rgb[int(cy), int(cx + 1.4 * blob.radius / 2)]) == P.BLOB_COLOURS[blob.kind]  # in its colour
    assert not changed[:100, 600:].any()  # nothing drawn far from the blobs
    # the diverging stretch: darker now -> blue, brighter now -> red, unchanged -> white
    ring_now = rgb[int(0.3 * 500), int(0.25 * 800 + 0.7 * 16)]
    ring_before = rgb[int(0.7 * 500), int(0.7 * 800 + 0.7 * 16)]
    assert ring_now[2] > ring_now[0] + 40
    assert ring_before[0] > ring_before[2] + 40
    assert np.all(rgb[5, 400] > 240)


def test_ratio_preview_survives_odd_blobs_and_nan():
    ratio = np.ones((50, 80), np.float32)
    ratio[:10] = np.nan
    blobs = [Blob(np.nan, 3, 2, 1.0, "went"), Blob(1e9, -1e9, 1e9, float("inf"), "appeared"), Blob(5, 5, 0, 0.0, ""),
             Blob("x", None, 1, "deep", "went")]
    assert P.ratio_preview(ratio, blobs).size == (80, 50)
    with pytest.raises(P.PreviewError):
        P.ratio_preview(np.full((5, 5), np.nan), blobs)


# --------------------------------------------------------------------- the runner's hook


@dataclass
class Comparison:  # stands in for flatd.qc.previous.Comparison
    ratio: np.ndarray
    changed_fraction: float
    blobs: list


def test_write_previews_writes_both_pictures_beside_the_master(tmp_path):
    master = tmp_path / "FLAT-L.fits"
    image = _flat((200, 300))
    assert P.write_previews(master, image) == [tmp_path / "FLAT-L.preview.png"]
    comparison = Comparison(np.ones((200, 300), np.float32), 0.0, [Blob(50, 50, 5, 1.0, "appeared")])
    written = P.write_previews(master, image, None, comparison)
    assert written == [tmp_path / "FLAT-L.preview.png", tmp_path / "FLAT-L.ratio.png"]


def test_write_previews_never_raises(tmp_path):
    from flatd.notify import events as E

    seen = []
    unsubscribe = E.subscribe(seen.append)
    try:
        written = P.write_previews(tmp_path / "missing-folder" / "m.fits", np.full((5, 5), np.nan), job="j1")
        broken = Comparison(np.full((5, 5), np.nan), 0.0, [])
        written += P.write_previews(tmp_path / "m.fits", np.ones((5, 5)), None, broken, job="j1")
    finally:
        unsubscribe()
    assert written == [tmp_path / "m.preview.png"]  # the ratio could not be drawn: the preview still is
    failed = [e for e in seen if e.name == "preview_failed"]
    assert len(failed) == 2 and all(e.data["job"] == "j1" for e in failed)
    assert "no finite pixel" in failed[0].text


def _marked(ratio, blobs, **kw) -> np.ndarray:
    """Where the marks changed the picture."""
    marked = np.asarray(P.ratio_preview(ratio, blobs, **kw).convert("RGB"), dtype=np.int32)
    plain = np.asarray(P.ratio_preview(ratio, [], **kw).convert("RGB"), dtype=np.int32)
    return np.any(marked != plain, axis=2)


def test_ratio_marks_follow_the_comparisons_binning_and_the_row_order():
    ratio = np.ones((250, 400), np.float32)  # a 1000 x 1600 master compared at 4 x 4 pixels
    blob = Blob(400.0, 300.0, 40.0, 1.0, "appeared")  # master pixels: ratio pixel (100, 75)
    changed = _marked(ratio, [blob], binning=4)
    ys, xs = np.nonzero(changed)
    circle = xs <= 114  # the circle (radius 1.4 x 10), not the label on its right
    assert abs(xs[circle].mean() - 100) < 3 and abs(ys[circle].mean() - 75) < 3
    flipped = _marked(ratio, [blob], binning=4, bottom_up=True)
    ys, xs = np.nonzero(flipped)
    circle = xs <= 114
    assert abs(ys[circle].mean() - (250 - 75)) < 3


def test_ratio_preview_of_a_real_comparison_marks_the_moved_donut(tmp_path):
    previous = pytest.importorskip("flatd.qc.previous")
    shape = (1200, 1600)
    before = _flat(shape, [Donut(0.30, 0.40, 0.02, 0.02)], seed=1)
    now = _flat(shape, [Donut(0.65, 0.60, 0.02, 0.02)], seed=2)
    comparison = previous.compare(now, before)
    written = P.write_previews(tmp_path / "m.fits", now, None, comparison)
    assert [p.name for p in written] == ["m.preview.png", "m.ratio.png"]
    assert {b.kind for b in comparison.blobs} >= {"appeared", "went"}
    with Image.open(tmp_path / "m.ratio.png") as im:
        assert im.mode == "P" and max(im.size) <= 1024
    scale = shape[1] / P.ratio_preview(comparison.ratio, [], binning=comparison.binning).size[0] / comparison.binning
    changed = _marked(comparison.ratio, comparison.blobs, binning=comparison.binning)
    for x, y in ((0.65, 0.60), (0.30, 0.40)):  # a mark near where dust appeared, and where it went
        cx, cy = x * shape[1] / comparison.binning / scale, y * shape[0] / comparison.binning / scale
        r = 0.02 * shape[1] / comparison.binning / scale
        near = changed[int(cy - 2 * r):int(cy + 2 * r), int(cx - 2 * r):int(cx + 2 * r)]
        assert near.sum() > 20
