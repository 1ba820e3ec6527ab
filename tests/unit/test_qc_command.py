"""`flatd qc FILES... [--against PREVIOUS] [--pictures DIR]` on small seeded files (flatd.qc.command)."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from PIL import Image

from flatd.cli import main
from flatd.demo import DEFAULT_PATTERN, Donut, Pattern, illumination

SHAPE = (192, 256)
RULES = "precalibration:\n  mode: none\ngrouping:\n  min_group_size: 3\n"


def _cards(kind: str, i: int = 0, **extra) -> dict:
    return {"IMAGETYP": kind, "FILTER": "L", "XBINNING": 1, "YBINNING": 1, "EXPTIME": 1.5, "CCD-TEMP": -10.0,
            "INSTRUME": "ZWO ASI2600MM Pro", "TELESCOP": "Esprit 100", "FOCALLEN": 550.0,
            "DATE-OBS": f"2026-11-24T16:40:{10 + 3 * i:02d}", **extra}


def write_fits(path: Path, data: np.ndarray, **cards) -> Path:
    hdu = fits.PrimaryHDU(data)
    for key, value in cards.items():
        hdu.header[key] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    hdu.writeto(path)
    return path


def write_flats(folder: Path, n: int = 6, level: float = 25000.0, seed: int = 1, over: dict = {}) -> list[Path]:
    """n uint16 flats of the demo's pattern with photon noise and a drifting level;
    `over`: {index: level} for flats exposed otherwise."""
    rng = np.random.default_rng(seed)
    illum = illumination(SHAPE, 1, DEFAULT_PATTERN)
    paths = []
    for i in range(n):
        sky = over.get(i, level * (1.03 - 0.01 * i)) * illum
        data = np.clip(np.rint(sky + rng.normal(0, 1, SHAPE) * np.sqrt(sky / 0.78 + 9)), 0, 65535).astype(np.uint16)
        paths.append(write_fits(folder / f"L_FLAT_{i + 1:04d}.fits", data, **_cards("FLAT", i)))
    return paths


def write_master(path: Path, pattern: Pattern, seed: int = 3, shape=SHAPE) -> Path:
    rng = np.random.default_rng(seed)
    data = (illumination(shape, 1, pattern) * (1 + 0.001 * rng.standard_normal(shape))).astype(np.float32)
    return write_fits(path, data, **_cards("Master Flat", NCOMBINE=8, FLATDJOB="abc"))


MOVED = Pattern(donuts=(Donut(0.20, 0.70, 0.06, 0.06), *DEFAULT_PATTERN.donuts[1:]))
OLD = Pattern(donuts=(Donut(0.28, 0.35, 0.06, 0.06), *DEFAULT_PATTERN.donuts[1:]))


@pytest.fixture
def rules(tmp_path) -> Path:
    path = tmp_path / "rules.yaml"
    path.write_text(RULES)
    return path


def _digests(folder: Path) -> dict:
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def qc(capsys, *args) -> tuple[int, str]:
    code = main(["qc", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out + out.err


def test_clean_group_exits_0_with_its_table(tmp_path, rules, capsys):
    paths = write_flats(tmp_path / "night")
    before = _digests(tmp_path / "night")
    code, out = qc(capsys, *paths, "--config", rules)
    assert code == 0, out
    for path in paths:
        assert re.search(rf"{path.name}\s.*0\.\d+ .* ok", out), out
    assert "level" in out and "saturated" in out and "odd" in out and "all good" in out
    assert _digests(tmp_path / "night") == before  # never modifies or moves anything


def test_over_exposed_flat_exits_1_and_is_named_with_its_figure(tmp_path, rules, capsys):
    paths = write_flats(tmp_path / "night", over={2: 0.93 * 65535})
    code, out = qc(capsys, *paths, "--config", rules)
    assert code == 1, out
    bad = paths[2].name
    assert re.search(rf"{bad}\s.*leave-out", out), out
    assert re.search(rf"{bad}: level 0\.9\d* of full scale", out), out
    assert f"{bad}: " in out and "at full scale" in out  # saturation too
    assert "1 flat(s) would be left out: " + bad in out
    for path in paths[:2] + paths[3:]:
        assert re.search(rf"{path.name}\s.* ok", out), out


def test_master_against_previous_finds_the_moved_donut(tmp_path, capsys):
    new = write_master(tmp_path / "new" / "master.fits", MOVED)
    old = write_master(tmp_path / "old" / "master.fits", OLD, seed=4)
    code, out = qc(capsys, new, "--against", old)
    assert code == 1, out  # dust changed: warn
    assert "verdict: warn" in out and "1 appeared, 1 went" in out
    blobs = {k: (float(x), float(y)) for k, x, y in re.findall(r"dust (went|appeared) at x=(\d+) y=(\d+)", out)}
    h, w = SHAPE
    assert np.hypot(blobs["went"][0] - 0.28 * w, blobs["went"][1] - 0.35 * h) < 4, out
    assert np.hypot(blobs["appeared"][0] - 0.20 * w, blobs["appeared"][1] - 0.70 * h) < 4, out
    assert "field brightest/darkest" in out and "noise: n/a" in out


def test_a_master_alone_is_good(tmp_path, capsys):
    code, out = qc(capsys, write_master(tmp_path / "m.fits", OLD))
    assert code == 0, out
    assert "verdict: good" in out


def test_pictures_go_into_dir_only(tmp_path, capsys):
    new = write_master(tmp_path / "new" / "master.fits", MOVED)
    old = write_master(tmp_path / "old" / "master.fits", OLD, seed=4)
    before = _digests(tmp_path)
    pictures = tmp_path / "pics"
    code, out = qc(capsys, new, "--against", old, "--pictures", pictures)
    assert code == 1, out
    written = sorted(p.name for p in pictures.iterdir())
    assert written == ["master.preview.png", "master.ratio.png"]
    for name in written:
        with Image.open(pictures / name) as image:
            image.verify()
    assert _digests(tmp_path) == {**before, **{pictures / n: _digests(pictures)[pictures / n] for n in written}}


def test_hostile_inputs_are_named_and_the_rest_go_on(tmp_path, capsys):
    notfits = tmp_path / "notes.fits"
    notfits.write_text("not a FITS file\n")
    good = write_master(tmp_path / "m" / "master.fits", OLD)
    truncated = tmp_path / "trunc.fits"
    truncated.write_bytes(good.read_bytes()[:8000])
    other = write_master(tmp_path / "small.fits", OLD, shape=(96, 128))
    folder = tmp_path / "a-folder"
    folder.mkdir()
    code, out = qc(capsys, notfits, truncated, folder, good, "--against", other)
    assert code == 1, out
    assert f"{notfits}: not a FITS file" in out
    assert f"{truncated}: truncated" in out
    assert f"{folder}: a directory" in out
    assert "not compared" in out and "128x96" in out and "256x192" in out  # another size for --against
    assert "field brightest/darkest" in out  # the good master was checked all the same
    assert "Traceback" not in out


@pytest.mark.parametrize("args, message", [
    (["missing.fits"], "no such file"),
    (["{good}", "--against", "missing.fits"], "no such file"),
    (["{good}", "--pictures", "{good}"], "not a folder"),
    (["{good}", "--bogus"], "unrecognized arguments"),
])
def test_usage_errors_exit_2(tmp_path, capsys, args, message):
    good = write_master(tmp_path / "master.fits", OLD)
    code, out = qc(capsys, *[a.format(good=good) for a in args])
    assert code == 2 and message in out, out


def test_colour_flats_show_each_channel(tmp_path, rules, capsys):
    from flatd.demo import cfa_response

    rng = np.random.default_rng(5)
    sky = 20000 * illumination(SHAPE, 1, DEFAULT_PATTERN) * cfa_response(SHAPE)
    paths = []
    for i in range(4):
        data = np.clip(np.rint(sky * (1 - 0.01 * i) + rng.normal(0, 100, SHAPE)), 0, 65535).astype(np.uint16)
        paths.append(write_fits(tmp_path / f"c{i}.fits", data, **_cards("FLAT", i, BAYERPAT="RGGB")))
    code, out = qc(capsys, *paths, "--config", rules)
    assert code == 0, out
    assert re.search(r"R 0\.2\d+ G 0\.3\d+ B 0\.1\d+", out), out
