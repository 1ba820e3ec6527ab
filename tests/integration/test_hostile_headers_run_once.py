"""`flatd run-once` with hostile header values: bad files are left out, the rest is combined."""

from __future__ import annotations

from pathlib import Path

import pytest
from astropy.io import fits

from flatd.cli import main

from test_run_once import RULES  # the run-once tests' session: auto calibration, sigma 3

CARD = 80
ESC = "\x1b"


def set_card(path: Path, key: str, value: str) -> Path:
    """Overwrite the value of `key` in place with raw text (astropy refuses NaN and ESC)."""
    raw = bytearray(path.read_bytes())
    start = next(i for i in range(0, len(raw), CARD) if raw[i:i + 8] == key.ljust(8).encode())
    raw[start:start + CARD] = f"{key:<8}= {value:>20}".ljust(CARD).encode("latin-1")
    path.write_bytes(bytes(raw))
    return path


def _masters(root: Path) -> list[Path]:
    return sorted((root / "captures" / "masters").glob("*.fits"))


def test_two_flats_at_1e308_degrees_are_left_out_and_five_combined(tree, capsys):
    flats = [tree.flat(f"flat_R_{i:03d}.fits", level=20000 * (1 + 0.03 * i)) for i in range(7)]
    hot = [set_card(flats[i], "CCD-TEMP", "1E+308") for i in (2, 5)]
    tree.bias("bias_0.fits")
    tree.bias("bias_1.fits")
    set_card(tree.bias("bias_hot.fits"), "CCD-TEMP", "1E+308")  # the library's bad file is left out too
    config = tree.rules(RULES.format(root=tree.root))

    assert main(["run-once", "--config", str(config)]) == 0
    captured = capsys.readouterr()

    (master,) = _masters(tree.root)
    header = fits.getheader(master)
    assert header["NCOMBINE"] == 5
    history = " ".join(header["HISTORY"])
    assert "bias_0.fits" in history or "bias_1.fits" in history
    assert "bias_hot.fits" not in history
    for path in hot:
        assert path.exists(), "a file left out stays where it is"
        left_out = f"left out {path}: CCD-TEMP = 1e+308 is outside -200..+60 °C"
        assert left_out in captured.out
        assert left_out in captured.err  # the log line says it too
    moved = sorted(p.name for p in (tree.root / "captures" / "night1").glob("originals-*/*.fits"))
    assert moved == sorted(f.name for f in flats if f not in hot)


@pytest.mark.parametrize("log_format", ["plain", "json"])
def test_escape_sequence_in_filter_never_reaches_the_output(tree, capsys, log_format):
    for i in range(5):
        set_card(tree.flat(f"flat_{i:03d}.fits"), "FILTER", f"'R{ESC}[31mRED'")
    tree.bias("bias_0.fits")
    config = tree.rules(RULES.format(root=tree.root))

    assert main(["run-once", "--config", str(config), "--log-format", log_format, "--verbose"]) == 0
    captured = capsys.readouterr()

    assert ESC not in captured.out and ESC not in captured.err
    assert "filter RRED" in captured.out
    assert "RRED" in captured.err  # the log lines name the group too
    (master,) = _masters(tree.root)
    assert ESC not in master.name
    assert fits.getheader(master)["FILTER"] == "RRED"
