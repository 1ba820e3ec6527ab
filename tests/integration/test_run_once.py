"""`flatd run-once` in-process on seeded capture trees."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits

from flatd.cli import main
from flatd.ledger import DONE, Ledger, StateLock

from fitstree import BIAS_LEVEL, pattern, snapshot

RULES = """
capture:
  - path: {root}/captures
output:
  directory: masters
inputs:
  move_to: "originals-{{date}}"
grouping:
  size: true
  filter: true
  temperature: 1.0
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


def _session(tree, n=5, filters=("R", "G")):
    for f in filters:
        for i in range(n):
            tree.flat(f"flat_{f}_{i:03d}.fits", level=20000 * (1 + 0.03 * i), filt=f)
    for i in range(2):
        tree.bias(f"bias_{i}.fits")
    return tree.rules(RULES.format(root=tree.root))


def _masters(root):
    return sorted((root / "captures" / "masters").glob("*.fits"))


def test_run_once_makes_one_master_per_group_and_moves_inputs(tree, capsys):
    config = _session(tree)
    assert main(["run-once", "--config", str(config)]) == 0
    masters = _masters(tree.root)
    assert len(masters) == 2
    filters = sorted(fits.getheader(m)["FILTER"] for m in masters)
    assert filters == ["G", "R"]
    night = tree.root / "captures" / "night1"
    assert not list(night.glob("flat_*.fits")), "inputs should have been moved"
    moved = list(night.glob("originals-*/flat_*.fits"))
    assert len(moved) == 10
    for master in masters:
        with fits.open(master) as hdul:
            data = hdul[0].data
            assert data.dtype == np.dtype(">f4")
            assert hdul[0].header["NCOMBINE"] == 5
            assert len(hdul[0].header["HISTORY"]) >= 5
        normalized = data / data.mean()
        # 5 frames of ~20000 e-: relative noise ~ 1/sqrt(5*20000) per pixel; allow 6 sigma.
        assert np.abs(normalized - pattern(*data.shape)).max() < 6 / np.sqrt(5 * 20000 * 0.5)
    ledger = Ledger.open_readonly(tree.root / "state")
    assert {j.state for j in ledger.jobs()} == {DONE}


def test_second_run_finds_nothing_new(tree, capsys):
    config = _session(tree)
    assert main(["run-once", "--config", str(config)]) == 0
    before = snapshot(tree.root / "captures")
    assert main(["run-once", "--config", str(config)]) == 0
    assert snapshot(tree.root / "captures") == before


def test_inputs_left_in_place_are_not_combined_twice(tree):
    config = _session(tree)
    config.write_text(config.read_text().replace('move_to: "originals-{date}"', "move_to: null"))
    assert main(["run-once", "--config", str(config)]) == 0
    assert main(["run-once", "--config", str(config)]) == 0
    assert len(_masters(tree.root)) == 2
    assert len(list((tree.root / "captures" / "night1").glob("flat_*.fits"))) == 10


def test_dry_run_changes_nothing_and_explains(tree, capsys):
    config = _session(tree)
    (tree.root / "captures" / "night1" / "notes.fits").write_text("not a fits file")
    (tree.root / "captures" / "night1" / "session.txt").write_text("N.I.N.A. notes")
    tree.flat("dark_0001.fits", imagetyp="DARK")
    before = snapshot(tree.root)
    assert main(["run-once", "--config", str(config), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert snapshot(tree.root) == before
    assert not (tree.root / "state").exists()
    assert out.count("would write") == 2
    assert out.count(f"would move the inputs to {tree.root}/captures/night1/originals-") == 2
    assert "flat_R_000.fits" in out and "bias_" in out
    assert "notes.fits" in out and "not a FITS file" in out
    assert "dark_0001.fits" in out and "not a flat" in out
    assert "session.txt" not in out, "a file without a FITS name is no candidate, as in the real run"


def _listed(out: str) -> tuple[set, set]:
    """The group labels and the "left out" lines a report prints."""
    import re

    labels = set(re.findall(r"^(?:group |wrote \S+  \(\d+ flats, )(.+?)(?::| \(rule|\)$)", out, re.M))
    return labels, {line for line in out.splitlines() if line.startswith("left out")}


def test_dry_run_and_run_list_the_same_groups_and_files(tree, capsys):
    """A dry run goes through the real run's code: same labels, same files left out."""
    config = _session(tree)
    (tree.root / "captures" / "night1" / "notes.txt").write_text("N.I.N.A. notes")
    (tree.root / "captures" / "night1" / "bad.fits").write_text("not a fits file")
    assert main(["run-once", "--config", str(config), "--dry-run"]) == 0
    dry = capsys.readouterr()
    assert main(["run-once", "--config", str(config)]) == 0
    real = capsys.readouterr()
    assert _listed(dry.out) == _listed(real.out)
    labels, left_out = _listed(real.out)
    assert len(labels) == 2 and any("bad.fits" in line for line in left_out)
    assert "notes.txt" not in dry.out + dry.err + real.out + real.err


def test_bad_files_are_reported_and_left_alone(tree, capsys):
    config = _session(tree, filters=("R",))
    night = tree.root / "captures" / "night1"
    (night / "empty.fits").write_bytes(b"")
    (night / "text.fits").write_text("hello")
    good = (night / "flat_R_000.fits").read_bytes()
    (night / "truncated.fits").write_bytes(good[: len(good) // 2])
    bad_before = {p.name: p.read_bytes() for p in night.glob("*.fits") if not p.name.startswith("flat_")}
    assert main(["run-once", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert len(_masters(tree.root)) == 1
    for name, data in bad_before.items():
        assert (night / name).read_bytes() == data
        assert name in out
    assert "zero length" in out and "truncated" in out


def test_too_few_for_minmax_fails_that_group_only(tree, capsys):
    config = _session(tree, n=3, filters=("R",))
    for i in range(7):
        tree.flat(f"flat_G_{i:03d}.fits", filt="G")
    config.write_text(config.read_text().replace("method: sigma", "method: minmax\n  minmax: 2"))
    assert main(["run-once", "--config", str(config)]) == 1
    out = capsys.readouterr().out
    assert "needs at least 5 frames" in out
    assert len(_masters(tree.root)) == 1
    assert len(list((tree.root / "captures" / "night1").glob("flat_R_*.fits"))) == 3


def test_small_group_is_left_in_place_and_not_a_failure(tree, capsys):
    config = _session(tree, filters=("R",))
    tree.flat("flat_SII_000.fits", filt="SII")
    assert main(["run-once", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "flat_SII_000.fits" in out and "min_group_size" in out
    assert (tree.root / "captures" / "night1" / "flat_SII_000.fits").exists()


def test_rules_choose_settings_per_rig_and_dry_run_names_the_rule(tree, capsys):
    config = _session(tree, filters=("R",))
    for i in range(5):
        tree.flat(f"other_{i}.fits", filt="R", folder="captures/newt200")
    config.write_text(config.read_text() + f"""
rules:
  - name: newt
    match: {{path: "{tree.root}/captures/newt200/**"}}
    combine: {{method: median}}
""")
    assert main(["run-once", "--config", str(config), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "rule newt" in out and "median" in out
    assert "sigma clip" in out


def test_master_outside_calibration_library_fails_clearly(tree, capsys):
    config = _session(tree, filters=("R",))
    for p in (tree.root / "calib").glob("*.fits"):
        p.unlink()
    tree.bias("small_bias.fits", shape=(20, 20))
    assert main(["run-once", "--config", str(config)]) == 1
    out = capsys.readouterr().out
    assert "flat_R_000.fits" in out or "R" in out
    assert len(_masters(tree.root)) == 0
    assert len(list((tree.root / "captures" / "night1").glob("flat_*.fits"))) == 5


def test_invalid_rules_file_exits_2_with_key_and_line(tree, capsys):
    config = tree.rules("capture:\n  - path: /x\ngrouping:\n  temperature: 99\n")
    assert main(["run-once", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"{config}:4: at 'grouping.temperature'" in err


def test_second_process_is_refused_while_the_ledger_is_held(tree, capsys):
    config = _session(tree, filters=("R",))
    with StateLock(tree.root / "state"):
        assert main(["run-once", "--config", str(config)]) == 2
    assert "another flatd" in capsys.readouterr().err


def _block_means(a, k=5):
    h, w = a.shape[0] // k * k, a.shape[1] // k * k
    return a[:h, :w].reshape(h // k, k, w // k, k).mean(axis=(1, 3))


def test_calibrated_master_matches_pattern_but_uncalibrated_does_not(tree):
    """The bias level left in an uncalibrated master flattens the illumination."""
    for i in range(5):
        tree.flat(f"flat_R_{i:03d}.fits", level=5000.0, filt="R")
    # flats this dark (~0.085 of full scale) would be left out by quality.min_level
    config = tree.rules(RULES.format(root=tree.root).replace("mode: auto", "mode: none")
                        + "quality: {min_level: 0.05}\n")
    assert main(["run-once", "--config", str(config)]) == 0
    (master,) = _masters(tree.root)
    data = fits.getdata(master).astype(np.float64)
    p = pattern(*data.shape)
    # Per pixel noise of 5 frames at ~4000 e- is ~0.007; 5x5 block means bring it to ~0.0014.
    calibrated = data - BIAS_LEVEL
    assert np.abs(_block_means(calibrated / calibrated.mean() - p)).max() < 0.008
    assert np.abs(_block_means(data / data.mean() - p)).max() > 0.02


def test_outputs_inside_watched_folder_are_never_inputs(tree):
    config = _session(tree, filters=("R",))
    config.write_text(config.read_text().replace("move_to: \"originals-{date}\"", "move_to: null"))
    assert main(["run-once", "--config", str(config)]) == 0
    (master,) = _masters(tree.root)
    # A master copied back beside the flats is recognised as a master, not a flat.
    (tree.root / "captures" / "night1" / "copy_of_master.fits").write_bytes(master.read_bytes())
    for i in range(5):
        tree.flat(f"flat_R_new_{i}.fits", filt="R")
    assert main(["run-once", "--config", str(config)]) == 0
    masters = _masters(tree.root)
    assert len(masters) == 2
    newest = max(masters, key=lambda p: p.stat().st_mtime_ns)
    assert fits.getheader(newest)["NCOMBINE"] == 5


def test_flats_written_a_moment_ago_are_taken(tree):
    """A capture program calls run-once right after its last flat: no `stable` wait."""
    config = _session(tree, filters=("R",))
    config.write_text(config.read_text().replace("stable: 0\n", ""))
    assert "stable" not in config.read_text()
    assert main(["run-once", "--config", str(config)]) == 0
    (master,) = _masters(tree.root)
    assert fits.getheader(master)["NCOMBINE"] == 5


def test_a_missing_capture_folder_is_an_error_not_silence(tree, capsys):
    config = _session(tree, filters=("R",))
    config.write_text(config.read_text().replace("capture:\n", f"capture:\n  - path: {tree.root}/unmounted\n"))
    assert main(["run-once", "--config", str(config)]) == 1
    out = capsys.readouterr().out
    assert f"capture folder {tree.root}/unmounted does not exist" in out
    assert len(_masters(tree.root)) == 1  # the other folder was processed all the same


def test_rich_markup_in_file_names_is_printed_as_text(tree, capsys):
    """`flat[/x].fits` (a folder "flat[" and a file "x].fits") reaches the report, the
    dry run and status as it is, without a MarkupError."""
    for i in range(3):
        tree.flat(f"x{i}].fits", folder="captures/night1/flat[", filt="R")
    (tree.root / "captures" / "night1" / "flat[" / "bad].fits").write_bytes(b"not a FITS file")
    for i in range(2):
        tree.bias(f"bias_{i}.fits")
    config = tree.rules(RULES.format(root=tree.root))
    assert main(["run-once", "--config", str(config), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "flat[/x0].fits" in out
    assert "left out" in out and "flat[/bad].fits" in out
    assert main(["run-once", "--config", str(config)]) == 0  # a bad file is left out, no failure
    out = capsys.readouterr().out
    assert "wrote " in out and "left out" in out and "flat[/bad].fits" in out
    assert main(["status", "--config", str(config)]) == 0
    assert "Last masters made" in capsys.readouterr().out


# --------------------------------------------------------------------------- rejection reported (issue 9)

REJECTION_RULES = """
capture:
  - path: {root}/captures
output:
  directory: masters
  rejection_map: true
inputs:
  move_to: null
grouping:
  min_group_size: 3
combine:
  method: sigma
  sigma: 2.0
  rejection_warn: 0.005
stable: 0
state: {root}/state
"""


def _plain_sigma_counts(paths, z):
    """Counts of values rejected low and high, per frame and per pixel, by a plain
    reference: the frames as read, normalized by flatd's level, then the original's
    one-pass sigma clip per pixel column in float64."""
    from flatd.stack import levels as LV
    from flatd.stack.combine import normalization_factors

    stack = np.array([fits.getdata(p).astype(np.float32) for p in paths])
    step = LV.grid_step(*stack.shape[1:])
    samples = np.stack([LV.grid(im, step).ravel() for im in stack]).astype(np.float32)
    factors = normalization_factors(LV.relative_levels(samples))
    stack = stack * factors[:, None, None]  # float32, as the engine multiplies
    x = stack.astype(np.float64)
    mean, std = x.mean(axis=0), x.std(axis=0)
    out = np.abs(x - mean) > z * std
    low, high = out & (x < mean), out & (x > mean)
    return (np.stack([low.sum(axis=(1, 2)), high.sum(axis=(1, 2))], axis=1),
            np.stack([low.sum(axis=0), high.sum(axis=0)]).astype(np.uint16))


def test_master_reports_its_rejections_in_the_header_the_map_and_the_report(tree, capsys):
    import re

    paths = [tree.flat(f"flat_R_{i:03d}.fits", level=20000 * (1 + 0.03 * i), cosmic=(i == 2)) for i in range(8)]
    bad = tree.flat("flat_R_bad.fits", level=20000)
    data = fits.getdata(bad).astype(np.int64)
    data[:, :10] = 60000  # a bad frame: a quarter of it saturated
    fits.writeto(bad, data.astype(np.uint16), fits.getheader(bad), overwrite=True)
    paths.append(bad)
    paths.sort()
    frames, pixels = _plain_sigma_counts(paths, 2.0)
    config = tree.rules(REJECTION_RULES.format(root=tree.root))
    assert main(["run-once", "--config", str(config)]) == 0
    (master,) = _masters(tree.root)
    n, size = len(paths), pixels.shape[1] * pixels.shape[2]
    with fits.open(master, checksum=True) as hdul:
        header = hdul[0].header
        assert header["REJLOW"] == pytest.approx(frames[:, 0].sum() / (n * size), rel=1e-12)
        assert header["REJHIGH"] == pytest.approx(frames[:, 1].sum() / (n * size), rel=1e-12)
        history = " ".join(str(h).strip() for h in header["HISTORY"])
        for k, path in enumerate(paths):
            found = re.search(rf"{path.name}; .*?rejected (\S+) low, (\S+) high", history)
            assert found, path.name
            assert float(found.group(1)) == pytest.approx(frames[k, 0] / size, rel=1e-3, abs=1e-12)
            assert float(found.group(2)) == pytest.approx(frames[k, 1] / size, rel=1e-3, abs=1e-12)
        np.testing.assert_array_equal(hdul["REJMAP"].data, pixels)
        assert "COMBAUTO" not in header
    report = capsys.readouterr().out
    total = frames.sum() / (n * size)
    # one-pass sigma 2 rejects ~3.3 % of clean Gaussian values at 9 frames: that alone is no
    # warning; the bad frame's quarter adds ~2.8 % (1/9 of the values of its columns)
    from flatd.notify.events import percent
    from flatd.stack.baseline import baseline
    from flatd.stack.methods import Method

    clean = baseline(Method("sigma", sigma=2.0), n).total
    assert 0.02 < clean < 0.045 and total > clean + 0.005
    assert "rejected " in report and "warning" in report and "combine.rejection_warn 0.5 %" in report
    assert f"clean data at this N: {percent(clean)}" in report
    assert "rejected most flat_R_bad.fits" in report.replace("\n", " ")


def test_auto_master_says_so_and_the_dry_run_says_why(tree, capsys):
    for i in range(6):
        tree.flat(f"flat_R_{i:03d}.fits", level=20000 * (1 + 0.03 * i))
    for i in range(2):
        tree.bias(f"bias_{i}.fits")
    config = tree.rules(RULES.format(root=tree.root).replace("  method: sigma\n  sigma: 3.0\n", "  method: auto\n"))
    assert main(["run-once", "--config", str(config), "--dry-run"]) == 0
    out = capsys.readouterr().out.replace("\n", " ")
    assert "auto: esd esd_outliers 0.3 esd_significance 0.08 esd_low 1.5 (6 frames; 5 to 7 frames: " in out
    assert main(["run-once", "--config", str(config)]) == 0
    (master,) = _masters(tree.root)
    header = fits.getheader(master)
    assert header["COMBAUTO"] is True and header["COMBMETH"].startswith("ESD")
    assert "method auto: 6 frames" in " ".join(str(c) for c in header["COMMENT"])
    assert "REJLOW" in header and "REJMAP" not in [h.name for h in fits.open(master)]


def test_rejection_warn_null_never_warns(tree, capsys):
    for i in range(8):  # sigma 2 rejects nothing in 5 frames (|z| <= 4 / sqrt(5))
        tree.flat(f"flat_R_{i:03d}.fits", level=20000 * (1 + 0.03 * i))
    text = REJECTION_RULES.format(root=tree.root).replace("rejection_warn: 0.005", "rejection_warn: null")
    config = tree.rules(text.replace("rejection_map: true", "rejection_map: false"))
    assert main(["run-once", "--config", str(config)]) == 0
    captured = capsys.readouterr()
    assert "rejected " in captured.out and "warning" not in captured.out and "rejected most" not in captured.out
    assert "rejection_high" not in captured.err and "more than combine.rejection_warn" not in captured.err
    (master,) = _masters(tree.root)
    with fits.open(master) as hdul:
        assert len(hdul) == 1 and hdul[0].header["REJLOW"] > 0
