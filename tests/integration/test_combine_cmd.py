"""`flatd combine`: the original program's command line, in-process."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits

from flatd.cli import main

from fitstree import BIAS_LEVEL, pattern, snapshot


def _flats(tree, n=5, **kw):
    return [str(tree.flat(f"f{i:02d}.fits", level=20000 * (1 + 0.02 * i), **kw)) for i in range(n)]


def test_one_master_to_output_file(tree, capsys):
    files = _flats(tree)
    out = tree.root / "master.fits"
    assert main(["combine", "-s", "2.5", "-o", str(out), *files]) == 0
    with fits.open(out) as hdul:
        header = hdul[0].header
        assert header["NCOMBINE"] == 5
        assert header["IMAGETYP"] == "Master Flat"
        assert hdul[0].data.dtype.kind == "f"
        assert hdul[0].verify_checksum() == 1


@pytest.mark.parametrize("flag", [["-m"], ["--mean"], ["-n"], ["--median"], ["-mm", "1"], ["--minmax", "2"],
                                  ["-s", "2"], ["--sigma", "0.5"]])
def test_each_method_short_and_long(tree, flag):
    files = _flats(tree)
    out = tree.root / "m.fits"
    assert main(["combine", *flag, "-p", str(BIAS_LEVEL), "-o", str(out), *files]) == 0
    data = fits.getdata(out)
    assert np.abs(data / data.mean() - pattern(*data.shape)).max() < 0.03


def test_bright_flats_do_not_wrap_around(tree):
    """The original wrote int16: values above 32767 became negative."""
    files = _flats(tree, level=50000.0) if False else [
        str(tree.flat(f"b{i}.fits", level=50000.0)) for i in range(3)]
    out = tree.root / "bright.fits"
    # ~0.77 of full scale: over quality.max_level, the flat checks would leave them out
    unchecked = tree.rules("grouping: {size: false, filter: false, temperature: null, min_group_size: 1}\n"
                           "quality: {enabled: false}\ninputs: {move_to: null}\n")
    assert main(["combine", "--config", str(unchecked), "-m", "-rp", "--normalize", "none", "-o", str(out),
                 *files]) == 0
    data = fits.getdata(out)
    assert data.min() > 32767


def test_minmax_needs_2n_plus_1_frames(tree, capsys):
    files = _flats(tree, n=4)
    assert main(["combine", "-mm", "2", "-o", str(tree.root / "x.fits"), *files]) == 1
    assert "needs at least 5 frames" in capsys.readouterr().out
    assert not (tree.root / "x.fits").exists()


def test_grouping_writes_one_master_per_group_into_od(tree, capsys):
    files = _flats(tree, n=3, filt="R") + [str(tree.flat(f"g{i}.fits", filt="g")) for i in range(3)]
    files += [str(tree.flat(f"G{i}.fits", filt="G")) for i in range(2)]  # same filter, other case
    od = tree.root / "out"
    assert main(["combine", "-gf", "-m", "-od", str(od), *files]) == 0
    masters = sorted(od.glob("*.fits"))
    assert len(masters) == 2
    assert sorted(fits.getheader(m)["NCOMBINE"] for m in masters) == [3, 5]


def test_groups_differing_only_in_size_get_distinct_names(tree):
    files = [str(tree.flat(f"a{i}.fits", shape=(40, 50))) for i in range(3)]
    files += [str(tree.flat(f"b{i}.fits", shape=(30, 50))) for i in range(3)]
    od = tree.root / "out"
    assert main(["combine", "-gs", "-m", "-od", str(od), *files]) == 0
    assert len(list(od.glob("*.fits"))) == 2


def test_minimum_group_size_skips_without_failing(tree, capsys):
    files = _flats(tree, n=3, filt="R") + [str(tree.flat("s.fits", filt="S"))]
    od = tree.root / "out"
    assert main(["combine", "-gf", "-mg", "2", "-m", "-od", str(od), *files]) == 0
    assert len(list(od.glob("*.fits"))) == 1
    assert "s.fits" in capsys.readouterr().out


def test_non_flats_are_refused_unless_ignore_type(tree, capsys):
    files = [str(tree.flat(f"l{i}.fits", imagetyp="LIGHT")) for i in range(3)]
    assert main(["combine", "-m", "-o", str(tree.root / "m.fits"), *files]) == 1
    assert "not a flat" in capsys.readouterr().out
    assert main(["combine", "-t", "-m", "-o", str(tree.root / "m.fits"), *files]) == 0
    assert (tree.root / "m.fits").exists()


def test_fixed_bias_of_other_size_is_an_error_for_the_group(tree, capsys):
    files = _flats(tree, n=3)
    bias = tree.bias("small.fits", shape=(20, 20))
    assert main(["combine", "-m", "-b", str(bias), "-o", str(tree.root / "m.fits"), *files]) == 1
    out = capsys.readouterr().out
    assert "small.fits" in out
    assert not (tree.root / "m.fits").exists()


def test_auto_calibration_reports_each_choice(tree, capsys):
    files = _flats(tree, n=3, exposure=2.0)
    tree.bias("bias.fits")
    tree.dark("dark2s.fits", exposure=2.0)
    tree.dark("dark300s.fits", exposure=300.0)
    assert main(["combine", "-m", "-a", str(tree.root / "calib"), "-ax", "-o", str(tree.root / "m.fits"), *files]) == 0
    out = capsys.readouterr().out
    assert out.count("dark2s.fits") >= 3
    history = "".join(card.strip() for card in fits.getheader(tree.root / "m.fits")["HISTORY"])
    assert history.count("dark2s.fits") == 3 and "dark300s" not in history


def test_auto_display_prints_no_terminal_escapes_from_file_names(tree, capsys):
    """-ax lines name each flat: a file name with an escape sequence is printed without it."""
    import os

    files = _flats(tree, n=3, exposure=2.0)
    hostile = os.path.join(os.path.dirname(files[0]), "f\x1b[2J\x1b]0;owned\x07.fits")
    os.rename(files[0], hostile)
    tree.dark("dark2s.fits", exposure=2.0)
    assert main(["combine", "-m", "-a", str(tree.root / "calib"), "-ax", "-o", str(tree.root / "m.fits"),
                 hostile, *files[1:]]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out
    assert out.count("dark2s.fits") >= 3


def test_move_inputs_after_success(tree):
    files = _flats(tree, n=3)
    before = {p: open(p, "rb").read() for p in files}
    assert main(["combine", "-m", "-v", str(tree.root / "done"), "-o", str(tree.root / "m.fits"), *files]) == 0
    for p, data in before.items():
        moved = tree.root / "done" / p.rsplit("/", 1)[1]
        assert moved.read_bytes() == data
        assert not (tree.root / p).exists()


def test_existing_output_is_never_overwritten(tree):
    files = _flats(tree, n=3)
    out = tree.root / "m.fits"
    out.write_bytes(b"precious")
    assert main(["combine", "-m", "-o", str(out), *files]) == 0
    assert out.read_bytes() == b"precious"
    assert (tree.root / "m-2.fits").exists()


def test_filter_name_cannot_escape_the_output_folder(tree):
    files = [str(tree.flat(f"e{i}.fits", filt="../../x")) for i in range(3)]
    od = tree.root / "out"
    before = set(tree.root.rglob("*"))
    assert main(["combine", "-gf", "-m", "-od", str(od), *files]) == 0
    new = set(tree.root.rglob("*")) - before
    assert new and all(od in p.parents or p == od for p in new)


def test_usage_errors_exit_2_without_traceback(tree, capsys):
    assert main(["combine"]) == 2
    assert main(["combine", "-mm", "x", "a.fits"]) == 2
    assert main(["combine", "-gf", "-o", "x.fits", *_flats(tree, n=1)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err


def test_unreadable_inputs_are_named_and_the_rest_goes_on(tree, capsys):
    files = _flats(tree, n=3)
    bad = tree.root / "bad.fits"
    bad.write_text("nope")
    assert main(["combine", "-m", "-o", str(tree.root / "m.fits"), str(bad), *files]) == 1
    assert "bad.fits" in capsys.readouterr().out
    assert (tree.root / "m.fits").exists()
    assert bad.read_text() == "nope"


def test_dry_run_combines_nothing(tree, capsys):
    files = _flats(tree, n=3)
    before = snapshot(tree.root)
    assert main(["combine", "-m", "--dry-run", "-o", str(tree.root / "m.fits"), *files]) == 0
    assert snapshot(tree.root) == before
    assert "would write" in capsys.readouterr().out


def test_all_groups_too_small_is_reported_not_failed(tree, capsys):
    files = _flats(tree, n=3)
    assert main(["combine", "-gf", "-mg", "5", "-m", "-od", str(tree.root / "out"), *files]) == 0
    assert capsys.readouterr().out.count("fewer than min_group_size 5") == 3
    assert not (tree.root / "out").exists()


def test_missing_file_is_named_once_and_fails(tree, capsys):
    files = _flats(tree, n=3)
    assert main(["combine", "-m", "-o", str(tree.root / "m.fits"), str(tree.root / "gone.fits"), *files]) == 1
    captured = capsys.readouterr()
    # once per destination: the report (stdout) and the log (stderr), never twice in one
    assert captured.out.count("gone.fits") == 1
    assert captured.err.count("gone.fits") == 1
    assert (tree.root / "m.fits").exists()


def _truncated(tree):
    whole = tree.flat("whole.fits", folder="other").read_bytes()
    path = tree.root / "truncated.fits"
    path.write_bytes(whole[: len(whole) // 2])
    return path


@pytest.mark.parametrize("make_bad", [
    lambda tree: tree.root / "gone.fits",
    lambda tree: (tree.root / "adir.fits").mkdir() or tree.root / "adir.fits",
    lambda tree: (tree.root / "text.fits").write_text("hello") and tree.root / "text.fits",
    lambda tree: (tree.root / "notes.txt").write_text("hello") and tree.root / "notes.txt",
    lambda tree: (tree.root / "empty.fits").write_bytes(b"") or tree.root / "empty.fits",
    _truncated,
], ids=["missing", "directory", "not-fits", "not-fits-name", "empty", "truncated"])
@pytest.mark.parametrize("dry_run", [[], ["--dry-run"]], ids=["run", "dry-run"])
def test_a_named_file_left_out_as_unusable_exits_1(tree, capsys, make_bad, dry_run):
    """One rule: a file named on the command line and left out as unusable makes the exit status 1."""
    files = _flats(tree, n=3)
    bad = make_bad(tree)
    out = tree.root / "m.fits"
    assert main(["combine", "-m", *dry_run, "-o", str(out), str(bad), *files]) == 1
    assert bad.name in capsys.readouterr().out
    assert out.exists() != bool(dry_run), "the rest of the files are combined all the same"


def test_only_unusable_files_exit_1(tree, capsys):
    (tree.root / "a.fits").write_text("x")
    assert main(["combine", "-m", "-o", str(tree.root / "m.fits"), str(tree.root / "a.fits")]) == 1


@pytest.mark.parametrize("destination", ["done.fits", "DONE.FIT", "existing"])
def test_move_inputs_to_a_file_is_refused(tree, capsys, destination):
    """The original's -v is "move inputs to"; a FITS file after it is a slip, not verbose."""
    files = _flats(tree, n=3)
    (tree.root / "existing").write_text("a file")
    before = snapshot(tree.root)
    target = str(tree.root / destination)
    assert main(["combine", "-m", "-v", target, "-o", str(tree.root / "m.fits"), *files]) == 2
    err = capsys.readouterr().err
    assert f"{target} is a file, not a folder" in err and "--verbose" in err
    assert snapshot(tree.root) == before


def test_a_group_of_one_flat_warns(tree, capsys):
    files = _flats(tree, n=3, filt="R") + [str(tree.flat("ha.fits", filt="Ha"))]
    assert main(["combine", "-gf", "-m", "-od", str(tree.root / "out"), *files]) == 0
    err = capsys.readouterr().err
    assert err.count("a master of one flat is no master") == 1 and "filter Ha has one flat" in err


def test_auto_library_with_frames_only_below_suggests_ar(tree, capsys):
    files = _flats(tree, n=3)
    tree.bias("bias.fits", folder="calib/2026")
    out = tree.root / "m.fits"
    assert main(["combine", "-m", "-a", str(tree.root / "calib"), "-o", str(out), *files]) == 1
    said = capsys.readouterr().out
    assert "sub-folders hold 1 FITS file(s), searched with -ar" in said
    assert main(["combine", "-m", "-a", str(tree.root / "calib"), "-ar", "-o", str(out), *files]) == 0
    assert "searched with -ar" not in capsys.readouterr().out


def test_rules_with_recursive_false_get_the_same_hint(tree, capsys):
    files = _flats(tree, n=3)
    tree.bias("bias.fits", folder="calib/2026")
    rules = tree.rules(f"precalibration:\n  library: {tree.root}/calib\n  recursive: false\n"
                       "grouping: {min_group_size: 1}\n")
    assert main(["combine", "-m", "--config", str(rules), "-od", str(tree.root / "out"), *files]) == 1
    assert "precalibration.recursive: true" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["master.fits.fz", "Master.FITS.FZ"])
def test_output_fits_fz_is_a_lossless_tile_compressed_master(tree, name):
    files = _flats(tree)
    plain, packed = tree.root / "plain.fits", tree.root / name
    assert main(["combine", "-m", "-o", str(plain), *files]) == 0
    assert main(["combine", "-m", "-o", str(packed), *files]) == 0
    masters = sorted(p.name for p in tree.root.iterdir() if p.is_file() and not p.name.endswith(".preview.png"))
    assert masters == sorted(["plain.fits", name])  # beside each, its preview (output.previews)
    with fits.open(packed, checksum=True) as hdul:
        assert isinstance(hdul[1], fits.CompImageHDU)
        assert hdul[1].header["NCOMBINE"] == 5
        np.testing.assert_array_equal(hdul[1].data, fits.getdata(plain))


@pytest.mark.parametrize("name", ["master.tif", "master.png", "master.fits.gz", "master.fz"])
def test_output_with_an_unknown_extension_is_refused(tree, capsys, name):
    files = _flats(tree, n=3)
    assert main(["combine", "-m", "-o", str(tree.root / name), *files]) == 2
    err = capsys.readouterr().err
    assert f"-o '{name}': flatd cannot write" in err and ".fits, .fit, .fts" in err and ".fits.fz" in err
    assert "Traceback" not in err
    assert not list(tree.root.glob("master*"))


def test_output_without_extension_gets_fits(tree):
    files = _flats(tree, n=3)
    assert main(["combine", "-m", "-o", str(tree.root / "master"), *files]) == 0
    assert (tree.root / "master.fits").is_file()


def test_output_in_a_parent_folder_goes_exactly_there(tree):
    """-o is the user's own path (as in the original): ../x.fits is the folder above, no further."""
    files = _flats(tree, n=3)
    work = tree.root / "a" / "b"
    work.mkdir(parents=True)
    import os

    old = os.getcwd()
    os.chdir(work)
    try:
        assert main(["combine", "-m", "-o", "../x.fits", *files]) == 0
    finally:
        os.chdir(old)
    assert sorted(p.name for p in (tree.root / "a").iterdir() if p.is_file()) == ["x.fits", "x.preview.png"]


@pytest.mark.parametrize("output, message", [
    ("..", "-o: '..' is not a file name (-od names a folder)"),
    ("/", "-o: '' is not a file name (-od names a folder)"),
    (".hidden.fits", "-o: '.hidden.fits' would be a hidden file"),
    ("a:b.fits", "-o: 'a:b.fits' is not a plain file name"),
])
def test_output_that_is_no_file_name_is_a_usage_error(tree, capsys, output, message):
    files = _flats(tree, n=3)
    before = snapshot(tree.root)
    assert main(["combine", "-m", "-o", output, *files]) == 2
    assert message in capsys.readouterr().err
    assert snapshot(tree.root) == before



# --------------------------------------------------------------------------- issue 9: the default, auto, rejection


def test_without_a_method_option_or_rules_file_the_method_stays_sigma(tree, capsys):
    files = _flats(tree, n=15)
    out = tree.root / "m.fits"
    assert main(["combine", "-p", str(BIAS_LEVEL), "-o", str(out), *files]) == 0
    header = fits.getheader(out)
    assert header["COMBMETH"] == "SigmaClip2.0" and header["CLIPSIG"] == 2.0
    assert "COMBAUTO" not in header
    assert 0 < header["REJLOW"] + header["REJHIGH"] < 0.2  # rejection is reported by combine too
    assert "rejected " in capsys.readouterr().out


def test_a_rules_file_without_a_method_means_auto(tree, capsys):
    files = _flats(tree, n=15)
    config = tree.rules("combine: {normalize: multiplicative}\n"
                        "grouping: {size: false, filter: false, temperature: null, min_group_size: 1}\n"
                        "inputs: {move_to: null}\n")
    out = tree.root / "m.fits"
    assert main(["combine", "--config", str(config), "-p", str(BIAS_LEVEL), "--dry-run", "-o", str(out), *files]) == 0
    assert "auto: winsorized low 4.0 high 4.0 (15 frames; " in capsys.readouterr().out.replace("\n", " ")
    assert main(["combine", "--config", str(config), "-p", str(BIAS_LEVEL), "-o", str(out), *files]) == 0
    header = fits.getheader(out)
    assert header["COMBAUTO"] is True and header["COMBMETH"].startswith("WinsorizedSigma")
    # an option still names the method
    assert main(["combine", "--config", str(config), "-n", "-p", str(BIAS_LEVEL), "-o", str(tree.root / "n.fits"),
                 *files]) == 0
    assert fits.getheader(tree.root / "n.fits")["COMBMETH"] == "Median"


def test_method_auto_on_the_command_line(tree, capsys):
    files = _flats(tree, n=4)
    out = tree.root / "m.fits"
    assert main(["combine", "--method", "auto", "-p", str(BIAS_LEVEL), "-o", str(out), *files]) == 0
    header = fits.getheader(out)
    assert header["COMBAUTO"] is True and header["COMBMETH"] == "Median"  # 4 frames: the median
    assert main(["combine", "--method", "auto", "--param", "low=2", "-o", str(out), *files]) == 2
    assert "the method is auto" in capsys.readouterr().err
