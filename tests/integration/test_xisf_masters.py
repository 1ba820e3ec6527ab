"""XISF flats through run-once and combine; XISF masters; bands within the memory limit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

xisf = pytest.importorskip("xisf")

from flatd.cli import main  # noqa: E402
from flatd.ingest.frames import read_frame  # noqa: E402
from flatd.output.xisf import fits_value_text  # noqa: E402
from flatd.stack.pixels import read_image  # noqa: E402

from fitstree import Tree, pattern  # noqa: E402

RULES = """
capture:
  - path: {root}/captures
output:
  directory: masters
{format}
inputs:
  move_to: "originals-{{date}}"
grouping:
  min_group_size: 3
precalibration:
  mode: auto
  library: {root}/calib
combine:
  method: sigma
  sigma: 3.0
stable: 0
state: {root}/state
"""
CODECS = [(None, False), ("zlib", True), ("lz4", False), ("lz4hc", True), ("zstd", True)]
STRUCTURAL = {"SIMPLE", "BITPIX", "NAXIS", "NAXIS1", "NAXIS2", "EXTEND", "BZERO", "BSCALE"}


def to_xisf(path: Path, codec=None, shuffle=False) -> Path:
    """The FITS file at `path` as an XISF file (same pixels, its cards as FITS keywords); the FITS removed."""
    with fits.open(path) as hdul:
        data, header = hdul[0].data, hdul[0].header
        keywords = {c.keyword: [{"value": fits_value_text(c.value), "comment": c.comment}]
                    for c in header.cards if c.keyword not in STRUCTURAL}
        target = path.with_suffix(".xisf")
        xisf.XISF.write(str(target), data[:, :, None], image_metadata={"FITSKeywords": keywords},
                        codec=codec, shuffle=shuffle)
    path.unlink()
    return target


def session(tree: Tree, xisf_flats: bool, fmt: str = "", n: int = 5) -> Path:
    for i in range(n):
        flat = tree.flat(f"flat_{i:03d}.fits", level=20000 * (1 + 0.03 * i))
        if xisf_flats:
            to_xisf(flat, *CODECS[i % len(CODECS)])
    for i in range(2):
        tree.bias(f"bias_{i}.fits")
    return tree.rules(RULES.format(root=tree.root, format=f"  format: {fmt}" if fmt else ""))


def twins(tmp_path, fmt="") -> tuple[Tree, Tree]:
    """Two trees with the same pixels: FITS flats, and the same flats as XISF."""
    a, b = Tree(tmp_path / "fits", np.random.default_rng(7)), Tree(tmp_path / "xisf", np.random.default_rng(7))
    session(a, False)
    session(b, True, fmt)
    return a, b


def masters(tree: Tree, suffix: str) -> list[Path]:
    return sorted((tree.root / "captures" / "masters").glob(f"*{suffix}"))


def comparable(cards) -> dict:
    skip = STRUCTURAL | {"DATE", "FLATDJOB", "CHECKSUM", "DATASUM", "HISTORY", "COMMENT"}  # job id: from paths
    return {k: v for k, v in cards.items() if k not in skip}


def test_run_once_on_xisf_flats_makes_the_same_master(tmp_path, capsys):
    a, b = twins(tmp_path)
    assert main(["run-once", "--config", str(a.root / "flatd.yaml")]) == 0
    assert main(["run-once", "--config", str(b.root / "flatd.yaml")]) == 0
    [want], [got] = masters(a, ".fits"), masters(b, ".fits")
    assert np.array_equal(fits.getdata(got), fits.getdata(want))
    assert comparable(fits.getheader(got)) == comparable(fits.getheader(want))
    assert fits.getheader(got)["NCOMBINE"] == 5 and fits.getheader(got)["CALMODE"] == "file"
    night = b.root / "captures" / "night1"
    assert not list(night.glob("*.xisf")) and len(list(night.glob("originals-*/flat_*.xisf"))) == 5


def test_output_format_xisf_writes_an_xisf_master(tmp_path, capsys):
    a, b = twins(tmp_path, fmt="xisf")
    assert main(["run-once", "--config", str(a.root / "flatd.yaml")]) == 0
    assert main(["run-once", "--config", str(b.root / "flatd.yaml")]) == 0
    [want], [got] = masters(a, ".fits"), masters(b, ".xisf")
    assert got.stem == want.stem and not masters(b, ".fits")
    frame = read_frame(got)
    assert frame.kind.value == "master"  # never an input again
    assert np.array_equal(read_image(frame), fits.getdata(want))
    header = fits.getheader(want)
    assert comparable(frame.headers) == comparable(header)
    package = xisf.XISF(str(got))
    assert np.array_equal(package.read_image(0)[:, :, 0], fits.getdata(want))
    history = [e["comment"] for e in package.get_images_metadata()[0]["FITSKeywords"]["HISTORY"]]
    assert len(history) == len(header["HISTORY"])


def test_colour_flats_give_an_xisf_master_with_its_cfa(tmp_path, capsys):
    tree = Tree(tmp_path, np.random.default_rng(5))
    for i in range(5):
        flat = tree.flat(f"flat_{i:03d}.fits", level=20000 * (1 + 0.03 * i), filt=None)
        fits.setval(flat, "BAYERPAT", value="RGGB")
        fits.setval(flat, "YBAYROFF", value=1)
        to_xisf(flat, *CODECS[i % len(CODECS)])
    for i in range(2):
        to_xisf(tree.bias(f"bias_{i}.fits"), "zlib", True)  # XISF calibration frames too
    config = tree.rules(RULES.format(root=tree.root, format="  format: xisf"))
    assert main(["run-once", "--config", str(config)]) == 0
    [master] = masters(tree, ".xisf")
    frame = read_frame(master)
    assert frame.bayer_pattern == "RGGB" and frame.bayer_offset == (0, 1)
    assert frame.headers["CALMODE"] == "file"
    raw = master.read_bytes()
    header = raw[16:16 + int.from_bytes(raw[8:12], "little")]
    assert b'<ColorFilterArray pattern="GBRG" width="2" height="2"' in header  # RGGB from row 1


def test_combine_o_xisf(tree, capsys):
    files = [str(to_xisf(tree.flat(f"f{i}.fits", level=20000 * (1 + 0.02 * i)), "zstd", True)) for i in range(5)]
    out = tree.root / "master.xisf"
    assert main(["combine", "-s", "2.5", "-p", "500", "-o", str(out), *files]) == 0
    frame = read_frame(out)
    assert frame.headers["NCOMBINE"] == 5 and frame.headers["IMAGETYP"] == "Master Flat"
    data = read_image(frame)
    assert np.abs(data / data.mean() - pattern(*data.shape)).max() < 0.03


def test_installed_cli_run_once_on_xisf_flats(tmp_path):
    tree = Tree(tmp_path, np.random.default_rng(3))
    config = session(tree, True, "xisf")
    cli = Path(sys.executable).with_name("flatd")
    if not cli.exists():
        pytest.skip("flatd is not installed next to this interpreter")
    out = subprocess.run([str(cli), "run-once", "--config", str(config)], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "NO_COLOR": "1"})
    assert out.returncode == 0, out.stdout + out.stderr
    [master] = masters(tree, ".xisf")
    assert read_frame(master).headers["NCOMBINE"] == 5


MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, sys, tracemalloc
    from pathlib import Path
    from flatd.ingest.frames import read_frame
    from flatd.stack.combine import Method
    from flatd.jobs import StackInput
    from flatd.stack.engines.local import stack_frames
    from flatd.calibration import Calibration

    folder, limit = Path(sys.argv[1]), int(sys.argv[2])
    frames = [read_frame(p) for p in sorted(folder.glob("flat*.xisf"))]
    inputs = [StackInput(f, Calibration(mode="pedestal", pedestal=100.0)) for f in frames]
    stack_frames(inputs[:3], Method("sigma"), memory_limit=limit, workers=2)  # kernels loaded first
    tracemalloc.start()
    result = stack_frames(inputs, Method("sigma"), memory_limit=limit, workers=2)
    current, peak = tracemalloc.get_traced_memory()
    print(json.dumps({"peak": peak, "band_rows": result.band_rows, "mean": float(result.image.mean())}))
    """
)


@pytest.mark.slow
def test_xisf_bands_within_the_memory_limit(tmp_path):
    n, h, w = 16, 700, 700
    rng = np.random.default_rng(9)
    base = rng.normal(20000, 100, size=(h, w))
    for i in range(n):
        codec, shuffle = CODECS[i % len(CODECS)]
        data = (base * (1 + 0.01 * i)).astype(np.uint16)
        xisf.XISF.write(str(tmp_path / f"flat{i:02d}.xisf"), data[:, :, None], codec=codec, shuffle=shuffle)
    limit = 10 * 2**20
    out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(tmp_path), str(limit)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    stats = json.loads(out.stdout.strip().splitlines()[-1])
    assert 1 <= stats["band_rows"] < h  # bands smaller than the image
    assert stats["peak"] <= limit + 2 * 2**20, stats
    assert stats["mean"] > 0
