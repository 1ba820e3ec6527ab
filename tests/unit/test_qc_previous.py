"""The comparison with the previous master (flatd.qc.previous): moved dust found at its
place, clean pairs quiet, hostile previous masters reported and skipped."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from flatd.config import Quality
from flatd.ledger import DONE, Ledger
from flatd.qc.previous import Blob, Comparison, PreviousCheck, check_previous, compare, same_setup

H, W = 200, 260


def flat(seed: int, donuts=(), tilt: float = 0.0, noise: float = 0.002, cfa=(1.0, 1.0, 1.0, 1.0)) -> np.ndarray:
    """A master: vignetting, an optional tilt, dust donuts (x, y, radius, depth), noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:H, 0:W]
    image = (1 - 0.3 * (((x - W / 2) / W) ** 2 + ((y - H / 2) / H) ** 2) * 4) * (1 + tilt * x / W)
    for cx, cy, r, depth in donuts:
        ring = np.exp(-((np.hypot(x - cx, y - cy) - r) / (r / 3)) ** 2)
        image *= 1 - depth * ring
    for (py, px), gain in zip(((0, 0), (0, 1), (1, 0), (1, 1)), cfa):
        image[py::2, px::2] *= gain
    image *= 1 + noise * rng.standard_normal((H, W))
    return (20000 * image).astype(np.float32)


def test_moved_donut_is_one_went_and_one_appeared_at_the_right_places():
    before = flat(1, donuts=[(60, 70, 10, 0.03)])
    after = flat(2, donuts=[(190, 130, 10, 0.03)], tilt=0.05)  # and the large scale changed a little
    c = compare(after, before)
    assert isinstance(c, Comparison) and c.ratio.shape == (H, W)
    kinds = sorted(b.kind for b in c.blobs)
    assert kinds == ["appeared", "went"], c.blobs
    went = next(b for b in c.blobs if b.kind == "went")
    appeared = next(b for b in c.blobs if b.kind == "appeared")
    assert abs(went.x - 60) <= 3 and abs(went.y - 70) <= 3
    assert abs(appeared.x - 190) <= 3 and abs(appeared.y - 130) <= 3
    assert 1.0 < appeared.depth < 3.5 and 8 <= appeared.radius <= 20
    assert isinstance(appeared, Blob)


def test_clean_pair_gives_no_blobs_and_nothing_changed():
    same = [(60, 70, 10, 0.03), (150, 50, 6, 0.02)]
    c = compare(flat(3, donuts=same, tilt=0.1), flat(4, donuts=same))
    assert c.blobs == []
    assert c.changed_fraction < 1e-3
    assert abs(float(np.nanmedian(c.ratio)) - 1) < 1e-3


def test_colour_balance_change_is_matched_out():
    c = compare(flat(5, cfa=(1.1, 1.0, 1.0, 0.8)), flat(6))
    assert c.blobs == [] and c.changed_fraction < 1e-3


def test_a_shallow_donut_below_min_depth_is_not_listed():
    c = compare(flat(7, donuts=[(100, 100, 10, 0.003)]), flat(8))
    assert c.blobs == []


def test_other_size_or_all_nan_is_a_reason_not_a_crash():
    with pytest.raises(ValueError, match="previous master is"):
        compare(flat(1), flat(2)[:100])
    with pytest.raises(ValueError, match="finite and positive"):
        compare(flat(1), np.full((H, W), np.nan, dtype=np.float32))


# --------------------------------------------------------------------------- finding it


CARDS = {"IMAGETYP": "Master Flat", "FILTER": "R", "INSTRUME": "ZWO ASI2600MM Pro", "XBINNING": 1,
         "YBINNING": 1, "FLATDJOB": "old"}


def write_master(path: Path, data, age: float = 0.0, **cards) -> Path:
    header = fits.Header()
    for key, value in {**CARDS, **cards}.items():
        header[key] = value
    fits.PrimaryHDU(data, header=header).writeto(path)
    when = 1_700_000_000 - age
    os.utime(path, (when, when))
    return path


def test_setup_must_match_and_optics_when_both_say():
    assert same_setup(CARDS, dict(CARDS))
    assert not same_setup(CARDS, {**CARDS, "FILTER": "G"})
    assert not same_setup(CARDS, {**CARDS, "XBINNING": 2})
    assert same_setup({**CARDS, "TELESCOP": "RASA 8"}, CARDS)
    assert not same_setup({**CARDS, "TELESCOP": "RASA 8"}, {**CARDS, "TELESCOP": "Esprit 100"})
    assert not same_setup({**CARDS, "FOCALLEN": 400}, {**CARDS, "FOCALLEN": 620})


def test_previous_found_in_the_output_folder_newest_of_the_same_setup(tmp_path):
    write_master(tmp_path / "old.fits", flat(1, donuts=[(60, 70, 10, 0.03)]), age=200)
    write_master(tmp_path / "other-filter.fits", flat(2), age=10, FILTER="G")
    (tmp_path / "old.preview.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    new = flat(3, donuts=[(190, 130, 10, 0.03)])
    check = check_previous(new, {**CARDS, "FLATDJOB": "new"}, tmp_path, None, "new", Quality())
    assert check.path == tmp_path / "old.fits"
    assert sorted(b.kind for b in check.comparison.blobs) == ["appeared", "went"]
    cards = check.cards()
    assert cards["QCPREV"][0] == "old.fits" and cards["QCNDUST"][0] == 2
    assert any("dust appeared" in line for line in check.history())
    reasons = check.judge(Quality())
    assert reasons and reasons[-1][0] == "warn" and "1 appeared, 1 went" in reasons[-1][1]
    assert all("dust" not in reason for _, reason in check.judge(Quality(dust_warn=False)))


def test_hostile_previous_masters_are_reported_and_skipped(tmp_path):
    write_master(tmp_path / "good-old.fits", flat(1), age=500)
    write_master(tmp_path / "other-size.fits", flat(2)[:100], age=40)
    write_master(tmp_path / "nan.fits", np.full((H, W), np.nan, dtype=np.float32), age=30)
    truncated = write_master(tmp_path / "truncated.fits", flat(3), age=20)
    with open(truncated, "r+b") as handle:
        handle.truncate(truncated.stat().st_size // 2)
    os.utime(truncated, (1_700_000_000 - 20,) * 2)
    write_master(tmp_path / "nodata.fits", None, age=10)
    check = check_previous(flat(4), {**CARDS, "FLATDJOB": "new"}, tmp_path, None, "new", Quality())
    skipped = "\n".join(check.skipped)
    for name in ("other-size.fits", "nan.fits", "truncated.fits", "nodata.fits"):
        assert name in skipped
    assert check.path == tmp_path / "good-old.fits"
    assert check.comparison.blobs == []


def test_nothing_usable_is_no_previous(tmp_path):
    write_master(tmp_path / "other-size.fits", flat(2)[:100])
    check = check_previous(flat(4), CARDS, tmp_path, None, "new", Quality())
    assert check.path is None and check.cards() == {} and check.judge(Quality()) == []
    assert check_previous(flat(4), CARDS, tmp_path / "missing", None, "new").path is None


def test_previous_comes_from_the_ledger_first(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    from_ledger = write_master(elsewhere / "ledger.fits", flat(1), age=100)
    write_master(out / "folder.fits", flat(2), age=1)
    ledger = Ledger(tmp_path / "state" / "flatd.db")
    try:
        ledger.plan_job("old", "R", None, tmp_path, elsewhere, "ledger.fits", [])
        ledger.master_written("old", from_ledger, "R", 5)
        ledger.set_state("old", DONE)
        assert ledger.done_masters(exclude="new") == [str(from_ledger)]
        assert ledger.done_masters(exclude="old") == []
        check = check_previous(flat(3), CARDS, out, ledger, "new", Quality())
        assert check.path == from_ledger
        ledger.master_checked(from_ledger, "warn", ["a reason"], None)
        row = ledger.recent_masters(1)[0]
        assert row["qc_status"] == "warn" and row["qc_reasons"] == "a reason"
    finally:
        ledger.close()


def test_a_bad_previous_master_is_not_the_reference(tmp_path):
    write_master(tmp_path / "bad.fits", flat(1), QCSTATUS="bad")
    assert check_previous(flat(2), CARDS, tmp_path, None, "new").path is None
    assert isinstance(PreviousCheck(), PreviousCheck)


# --------------------------------------------------------------------------- binned as read


def big_flat(seed: int, shape, donuts=(), cfa=(1.0, 0.8, 0.8, 0.6)) -> np.ndarray:
    """A colour master large enough to be compared binned (binning_for > 1)."""
    rng = np.random.default_rng(seed)
    h, w = shape
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    image = 1 - 1.2 * (((x - w / 2) / w) ** 2 + ((y - h / 2) / h) ** 2)
    for cx, cy, r, depth in donuts:
        image *= 1 - depth * np.exp(-((np.hypot(x - cx, y - cy) - r) / (r / 3)) ** 2)
    for (py, px), gain in zip(((0, 0), (0, 1), (1, 0), (1, 1)), cfa):
        image[py::2, px::2] *= gain
    image *= 1 + 0.003 * rng.standard_normal(shape, dtype=np.float32)
    return (20000 * image).astype(np.float32)


@pytest.mark.parametrize("shape", [(1101, 1500), (1301, 2100), (1200, 3264)])  # binned 2, 3 (odd), 4
def test_a_previous_master_binned_as_read_compares_like_the_whole_images(tmp_path, shape, monkeypatch):
    from flatd.qc import previous as P

    monkeypatch.setattr(P, "BAND_BYTES", 1 << 20)  # many bands, a partial last one
    old = big_flat(1, shape, donuts=[(300, 400, 40, 0.03)])
    new = big_flat(2, shape, donuts=[(900, 500, 40, 0.03)], cfa=(1.1, 0.8, 0.8, 0.5))  # another colour balance
    path = write_master(tmp_path / "old.fits", old)
    assert P.binning_for(shape) > 1
    whole = compare(new, old)
    binned = P.compare_with_file(new, path)
    assert binned.binning == whole.binning and binned.ratio.shape == whole.ratio.shape
    np.testing.assert_allclose(binned.ratio, whole.ratio, rtol=2e-6)
    assert binned.changed_fraction == whole.changed_fraction
    assert [(b.kind, b.x, b.y) for b in binned.blobs] == [(b.kind, b.x, b.y) for b in whole.blobs]
    assert sorted(b.kind for b in binned.blobs) == ["appeared", "went"]


def test_a_previous_master_with_a_nan_is_compared_from_the_whole_file(tmp_path, monkeypatch):
    from flatd.qc import previous as P

    shape = (1101, 1500)
    old = big_flat(1, shape)
    old[500, 700] = np.nan
    path = write_master(tmp_path / "old.fits", old)
    loads = []
    monkeypatch.setattr(P, "load_master", lambda p: loads.append(p) or (None, fits.getdata(p)))
    c = P.compare_with_file(big_flat(2, shape), path)
    assert loads == [path] and c.blobs == [] and c.changed_fraction < 1e-4


def test_hostile_previous_masters_binned_as_read_are_reasons(tmp_path):
    from flatd.qc import previous as P

    shape = (1101, 1500)
    truncated = write_master(tmp_path / "truncated.fits", big_flat(1, shape))
    with open(truncated, "r+b") as handle:
        handle.truncate(truncated.stat().st_size // 2)
    other = write_master(tmp_path / "other.fits", big_flat(1, (1100, 1500)))
    junk = tmp_path / "junk.fits"
    junk.write_bytes(b"SIMPLE  = T" + b"\0" * 5000)
    for path, reason in ((truncated, "truncated"), (other, "1500x1100"), (junk, "header")):
        with pytest.raises(ValueError, match=reason):
            P.read_binned(path, shape)


# --------------------------------------------------------------------------- read ahead


def test_the_previous_master_read_ahead_is_used_when_unchanged(tmp_path, monkeypatch):
    from flatd.qc import previous as P

    shape = (1101, 1500)
    old = write_master(tmp_path / "old.fits", big_flat(1, shape, donuts=[(300, 400, 40, 0.03)]), age=100)
    write_master(tmp_path / "other-filter.fits", big_flat(2, shape), age=10, FILTER="G")
    paths = P.candidates(tmp_path)
    ahead = P.read_ahead({**CARDS, "FLATDJOB": "new"}, paths, "new")
    assert ahead is not None and ahead.path == old  # the newest of the same setup, not the other filter
    reads = []
    real = P.read_binned
    monkeypatch.setattr(P, "read_binned", lambda *a: reads.append(a) or real(*a))
    new = big_flat(3, shape, donuts=[(900, 500, 40, 0.03)])
    check = P.check_previous(new, {**CARDS, "FLATDJOB": "new"}, tmp_path, None, "new", Quality(), ahead=ahead,
                             paths=paths)
    assert reads == [] and check.path == old
    assert sorted(b.kind for b in check.comparison.blobs) == ["appeared", "went"]
    whole = P.check_previous(new, {**CARDS, "FLATDJOB": "new"}, tmp_path, None, "new", Quality())
    assert len(reads) == 1 and whole.comparison.blobs == check.comparison.blobs


def test_a_previous_master_changed_since_it_was_read_ahead_is_read_again(tmp_path):
    from flatd.qc import previous as P

    shape = (1101, 1500)
    path = write_master(tmp_path / "old.fits", big_flat(1, shape), age=100)
    ahead = P.read_ahead({**CARDS, "FLATDJOB": "new"}, P.candidates(tmp_path), "new")
    assert ahead is not None
    path.unlink()  # replaced meanwhile (another master under the same name, with a donut)
    write_master(path, big_flat(1, shape, donuts=[(300, 400, 40, 0.04)]), age=50)
    check = P.check_previous(big_flat(2, shape), {**CARDS, "FLATDJOB": "new"}, tmp_path, None, "new", Quality(),
                             ahead=ahead)
    assert check.path == path and [b.kind for b in check.comparison.blobs] == ["went"]


def test_a_read_ahead_that_fails_leaves_the_reason_to_the_check(tmp_path):
    from flatd.qc import previous as P

    shape = (1101, 1500)
    truncated = write_master(tmp_path / "truncated.fits", big_flat(1, shape), age=100)
    with open(truncated, "r+b") as handle:
        handle.truncate(truncated.stat().st_size // 2)
    assert P.read_ahead({**CARDS, "FLATDJOB": "new"}, P.candidates(tmp_path), "new") is None
    check = P.check_previous(big_flat(2, shape), {**CARDS, "FLATDJOB": "new"}, tmp_path, None, "new", Quality())
    assert check.path is None and "truncated.fits" in check.skipped[0] and "truncated" in check.skipped[0]


@pytest.mark.parametrize("frames", [
    dict(filter="Ha", instrument="ZWO ASI2600MM Pro", telescope="Esprit 100", headers={"FOCALLEN": 550.0}),
    dict(filter=None, instrument=None, telescope=None, headers={}),
    dict(filter="L", xbin=2, ybin=2, instrument="QHY268M", telescope=None, headers={"FOCALLEN": 400}),
])
def test_the_read_aheads_setup_is_the_masters(frames):
    import sys

    from flatd.calibration import Calibration
    from flatd.output.masters import master_header
    from flatd.qc.previous import identity, setup_cards
    from flatd.stack.methods import Method

    sys.path.insert(0, str(Path(__file__).parent))
    from framefactory import make_frame

    inputs = [make_frame(f"flat_{i}.fits", **frames) for i in range(3)]
    header = master_header(inputs, [Calibration()] * 3, Method("median"), "multiplicative", [1.0] * 3)
    assert identity(setup_cards(inputs)) == identity(header)


@pytest.mark.parametrize("kind", ["float32", "uint16", "xisf"])
def test_a_master_binned_as_read_is_the_master_binned_in_memory(tmp_path, kind, monkeypatch):
    """A float FITS master's bytes are swapped in place and folded (no float copy); any
    other file (an XISF master: little-endian, its own layout) goes through the reader's
    fill: all give binned_master's sums and samples."""
    from flatd.qc import previous as P

    monkeypatch.setattr(P, "BAND_BYTES", 1 << 20)  # bands that start inside blocks of rows
    image = big_flat(3, (1203, 2100))
    if kind == "uint16":
        image = np.clip(image, 0, 65535).astype(np.uint16).astype(np.float32)
        fits.PrimaryHDU(image.astype(np.uint16)).writeto(tmp_path / "m.fits")  # BZERO 32768
        path = tmp_path / "m.fits"
    elif kind == "xisf":
        from flatd.output.masters import write_master as write_any

        path = write_any(tmp_path, "m.xisf", image, fits.Header({"IMAGETYP": "Master Flat"}))
    else:
        path = write_master(tmp_path / "m.fits", image)
    read, held = P.read_binned(path, image.shape), P.binned_master(image)
    np.testing.assert_allclose(read.sums, held.sums, rtol=1e-6)
    assert read.flags == held.flags == 0
    for py in (0, 1):
        for px in (0, 1):
            np.testing.assert_array_equal(read.samples[py][px], held.samples[py][px])
