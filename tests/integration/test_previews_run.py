"""PNG previews beside the masters of `flatd run-once` and `flatd combine`, never ingested."""

from __future__ import annotations

import shutil

import numpy as np
from PIL import Image

from flatd.cli import main
from flatd.notify import events as E

RULES = """
capture:
  - path: {root}/captures
output:
  directory: masters
  previews: {previews}
inputs:
  move_to: {move_to}
grouping:
  min_group_size: 3
precalibration:
  mode: pedestal
  pedestal: 500
combine:
  method: mean
stable: 0
state: {root}/state
"""

SHAPE = (90, 120)


def _session(tree, previews="true", move_to='"originals-{date}"', filters=("R", "G"), n=3, folder="captures/night1"):
    for f in filters:
        for i in range(n):
            tree.flat(f"flat_{f}_{i:03d}.fits", filt=f, shape=SHAPE, folder=folder)
    return tree.rules(RULES.format(root=tree.root, previews=previews, move_to=move_to))


def _events(kind):
    seen = []
    unsubscribe = E.subscribe(lambda ev: seen.append(ev) if isinstance(ev, kind) else None)
    return seen, unsubscribe


def test_run_once_writes_a_preview_beside_each_master(tree, capsys):
    config = _session(tree)
    written, unsubscribe = _events(E.MasterWritten)
    try:
        assert main(["run-once", "--config", str(config)]) == 0
    finally:
        unsubscribe()
    out = tree.root / "captures" / "masters"
    masters = sorted(out.glob("*.fits"))
    assert len(masters) == 2
    for master in masters:
        preview = master.with_name(master.name[:-len(".fits")] + ".preview.png")
        with Image.open(preview) as im:
            assert im.format == "PNG" and im.mode == "L" and im.size == (SHAPE[1], SHAPE[0])
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".png") == sorted(
        m.name[:-5] + ".preview.png" for m in masters)
    assert not list(out.glob(".flatd-*"))  # no temp file left
    assert sorted(e.preview for e in written) == sorted(m.with_name(m.name[:-5] + ".preview.png") for m in masters)
    assert capsys.readouterr().out.count(".preview.png") == 2  # the report names them


def test_previews_false_writes_none(tree):
    config = _session(tree, previews="false")
    assert main(["run-once", "--config", str(config)]) == 0
    out = tree.root / "captures" / "masters"
    assert len(list(out.glob("*.fits"))) == 2
    assert not list(out.glob("*.png"))


def test_a_preview_failure_is_a_warning_not_a_failed_job(tree, monkeypatch, capsys):
    import flatd.qc.previews as P

    def broken(*a, **k):
        raise RuntimeError("no pictures today")

    monkeypatch.setattr(P, "master_preview", broken)
    config = _session(tree, filters=("R",))
    warnings, unsubscribe = _events(E.Notice)
    try:
        assert main(["run-once", "--config", str(config)]) == 0
    finally:
        unsubscribe()
    out = tree.root / "captures" / "masters"
    assert len(list(out.glob("*.fits"))) == 1 and not list(out.glob("*.png"))
    assert not list(out.glob(".flatd-*"))
    assert any(w.kind == "preview_failed" and "no pictures today" in w.text for w in warnings)


def test_a_preview_in_a_capture_folder_is_never_ingested(tree, capsys):
    config = _session(tree, move_to="null")  # inputs left in place: the folder is scanned again
    assert main(["run-once", "--config", str(config)]) == 0
    preview = next((tree.root / "captures" / "masters").glob("*.preview.png"))
    night = tree.root / "captures" / "night1"
    # a user copies previews next to the flats, under names a FITS reader might like
    for name in ("copied.preview.png", "flat_R_999.fits.preview.png", "FLAT.ratio.png"):
        shutil.copy(preview, night / name)
    for i in range(3):  # and new flats arrive, so a batch runs
        tree.flat(f"flat_B_{i:03d}.fits", filt="B", shape=SHAPE)
    before = {p.name: p.read_bytes() for p in night.glob("*.png")}
    capsys.readouterr()
    assert main(["run-once", "--config", str(config)]) == 0
    report = capsys.readouterr().out
    assert ".png" not in report.replace(".preview.png  ", "").split("wrote")[0]  # not listed as left out
    for line in report.splitlines():
        assert not ("left out" in line and ".png" in line)
    assert {p.name: p.read_bytes() for p in night.glob("*.png")} == before  # untouched, not moved
    masters = sorted((tree.root / "captures" / "masters").glob("*.fits"))
    assert len(masters) == 3  # R, G, then B: nothing made of a picture
    from astropy.io import fits

    assert all(fits.getheader(m)["NCOMBINE"] == 3 for m in masters)
    dry = main(["run-once", "--config", str(config), "--dry-run"])
    assert dry == 0 and ".png" not in capsys.readouterr().out


def test_the_watch_intake_never_tracks_a_preview(tree):
    from flatd.config import load_rules
    from flatd.ingest.discover import FolderFilter
    from flatd.ingest.intake import Intake

    config = _session(tree, filters=("R",))
    assert main(["run-once", "--config", str(config)]) == 0
    preview = next((tree.root / "captures" / "masters").glob("*.preview.png"))
    night = tree.root / "captures" / "night1"
    shutil.copy(preview, night / "copied.preview.png")
    tree.flat("flat_X_000.fits", filt="X", shape=SHAPE)
    rules = load_rules(config)
    capture = rules.capture[0]
    intake = Intake(rules, clock=lambda: 0.0, owner=lambda path: None)
    intake.filters[capture.path] = FolderFilter(capture, rules)
    assert intake.walk(capture.path, stop=lambda: False)
    for event_path in (night / "copied.preview.png", preview):  # as a watcher event would name them
        intake.touch(capture.path, event_path)
        assert event_path not in intake.tracker
    assert night / "flat_X_000.fits" in intake.tracker  # the intake does track new flats


def test_combine_writes_a_preview_beside_its_master(tree, capsys):
    files = [str(tree.flat(f"f{i:02d}.fits", shape=SHAPE)) for i in range(3)]
    out = tree.root / "master.fits"
    assert main(["combine", "-m", "-o", str(out), *files]) == 0
    with Image.open(tree.root / "master.preview.png") as im:
        assert im.format == "PNG" and im.size == (SHAPE[1], SHAPE[0])
    assert "master.preview.png" in capsys.readouterr().out


def test_colour_master_gets_a_colour_preview(tree):
    rng = np.random.default_rng(3)
    from fitstree import write_fits

    folder = tree.root / "captures" / "night1"
    y, x = np.mgrid[0:SHAPE[0], 0:SHAPE[1]]
    gain = np.where((y % 2 == 0) & (x % 2 == 0), 0.5, np.where((y % 2 == 1) & (x % 2 == 1), 0.7, 1.0))
    for i in range(3):
        data = rng.normal(30000 * gain, 50) + 500  # every channel well inside quality.min_level..max_level
        write_fits(folder / f"c{i}.fits", np.clip(data, 0, 65535).astype(np.uint16), IMAGETYP="FLAT",
                   EXPTIME=1.0, BAYERPAT="RGGB", FILTER="L", DATE_OBS="2026-11-24T18:00:00.000")
    config = tree.rules(RULES.format(root=tree.root, previews="true", move_to="null"))
    assert main(["run-once", "--config", str(config)]) == 0
    preview = next((tree.root / "captures" / "masters").glob("*.preview.png"))
    with Image.open(preview) as im:
        assert im.mode == "RGB" and im.size == (SHAPE[1] // 2, SHAPE[0] // 2)
        means = np.asarray(im, dtype=float).reshape(-1, 3).mean(axis=0)
    assert np.ptp(means) < 8  # balanced per channel: grey
