"""flatd.inspect: the file table of `flatd inspect`."""

from __future__ import annotations

import io
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from rich.console import Console

from flatd.ingest.frames import Frame, Kind
from flatd.inspect import SORT_KEYS, Row, inspect_paths, render_table, sort_rows


def write(path: Path, data: np.ndarray, **cards) -> Path:
    header = fits.Header()
    for key, value in cards.items():
        header[key.replace("_", "-")] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    fits.PrimaryHDU(data, header).writeto(path)
    return path


def flat(value: int, shape=(6, 8)) -> np.ndarray:
    return np.full(shape, value, dtype=np.uint16)


@pytest.fixture
def folder(tmp_path) -> Path:
    """Good frames with distinct facts, bad files, and files that are not frames at all."""
    root = tmp_path / "night"
    # name: (kind, size, binning, filter, exposure, temperature, date, mean value)
    write(root / "a_flat_L.fits", flat(30000), IMAGETYP="Flat Frame", FILTER="L", EXPTIME=2.0, CCD_TEMP=-10.0,
          XBINNING=1, YBINNING=1, DATE_OBS="2024-05-01T20:00:03")
    write(root / "b_flat_Ha.fits", flat(12000, (4, 4)), IMAGETYP="FLAT", FILTER="Ha", EXPTIME=8.0, CCD_TEMP=-20.0,
          XBINNING=2, YBINNING=2, DATE_OBS="2024-05-01T20:00:01")
    write(root / "sub" / "c_dark.fits", np.full((6, 8), 500.5, dtype=np.float32), IMAGETYP="Dark Frame",
          EXPTIME=0.5, CCD_TEMP=-5.0, XBINNING=1, YBINNING=1, DATE_OBS="2024-05-01T20:00:02")
    write(root / "d_bias.fits", flat(300, (10, 10)), IMAGETYP="Bias Frame", FILTER="b", EXPTIME=0.0,
          XBINNING=3, YBINNING=3)
    (root / "e_empty.fits").write_bytes(b"")
    (root / "f_notes.fits").write_text("not a FITS file\n" * 300)
    cut = root / "g_cut.fits"
    write(cut, flat(1, (100, 100)), IMAGETYP="FLAT")
    cut.write_bytes(cut.read_bytes()[:4000])
    # Never rows: hidden, temporary and non-FITS names.
    write(root / ".hidden.fits", flat(1), IMAGETYP="FLAT")
    write(root / "~partial.fits", flat(1), IMAGETYP="FLAT")
    (root / "h.fits.part").write_bytes(b"")
    (root / "readme.txt").write_text("x")
    return root


def names(rows: list[Row]) -> list[str]:
    return [row.path.name for row in rows]


GOOD = ["a_flat_L.fits", "b_flat_Ha.fits", "c_dark.fits", "d_bias.fits"]
BAD = ["e_empty.fits", "f_notes.fits", "g_cut.fits"]


def test_rows_for_good_and_bad_files(folder):
    rows = inspect_paths([folder])
    assert names(rows) == ["a_flat_L.fits", "b_flat_Ha.fits", "d_bias.fits", "e_empty.fits", "f_notes.fits",
                           "g_cut.fits", "c_dark.fits"]  # sorted by path: sub/ after the top-level files
    by_name = {row.path.name: row for row in rows}
    a = by_name["a_flat_L.fits"].frame
    assert (a.kind, a.dimensions, a.binning, a.filter, a.exposure, a.temperature) == (
        Kind.FLAT, "8x6", "1x1", "L", 2.0, -10.0)
    assert a.date == datetime(2024, 5, 1, 20, 0, 3)
    assert by_name["c_dark.fits"].frame.kind is Kind.DARK
    for name in GOOD:
        assert by_name[name].error is None and by_name[name].adu is None
    assert by_name["e_empty.fits"].error == "empty file (zero length)"
    assert by_name["f_notes.fits"].error == "not a FITS file (no SIMPLE card at the start)"
    assert by_name["g_cut.fits"].error.startswith("truncated data: header promises")
    for name in BAD:
        assert by_name[name].frame is None


def test_not_recursive(folder):
    assert "c_dark.fits" not in names(inspect_paths([folder], recursive=False))


def test_explicit_files_are_read_whatever_their_name(folder, tmp_path):
    odd = write(tmp_path / "export.dat", flat(7), IMAGETYP="Flat")
    hidden = folder / ".hidden.fits"
    missing = tmp_path / "gone.fits"
    rows = inspect_paths([odd, hidden, missing, folder / "readme.txt"])
    by_name = {row.path.name: row for row in rows}
    assert by_name["export.dat"].frame.kind is Kind.FLAT
    assert by_name[".hidden.fits"].frame.kind is Kind.FLAT
    assert "No such file or directory" in by_name["gone.fits"].error
    assert by_name["readme.txt"].error == "not a FITS file (no SIMPLE card at the start)"


def test_a_file_named_twice_is_one_row(folder):
    rows = inspect_paths([folder, folder / "a_flat_L.fits", folder / "sub" / ".." / "a_flat_L.fits"])
    assert names(rows).count("a_flat_L.fits") == 1


@pytest.mark.parametrize(
    "key, order",
    [
        ("kind", ["d_bias.fits", "c_dark.fits", "a_flat_L.fits", "b_flat_Ha.fits"]),
        ("size", ["b_flat_Ha.fits", "a_flat_L.fits", "c_dark.fits", "d_bias.fits"]),
        ("binning", ["a_flat_L.fits", "c_dark.fits", "b_flat_Ha.fits", "d_bias.fits"]),
        ("filter", ["d_bias.fits", "b_flat_Ha.fits", "a_flat_L.fits", "c_dark.fits"]),  # no case; no filter last
        ("exposure", ["d_bias.fits", "c_dark.fits", "a_flat_L.fits", "b_flat_Ha.fits"]),
        ("temperature", ["b_flat_Ha.fits", "a_flat_L.fits", "c_dark.fits", "d_bias.fits"]),  # d: none
        ("date", ["b_flat_Ha.fits", "c_dark.fits", "a_flat_L.fits", "d_bias.fits"]),  # d: no date
        ("adu", ["d_bias.fits", "c_dark.fits", "b_flat_Ha.fits", "a_flat_L.fits"]),
    ],
)
def test_sorting_by_each_key(folder, key, order):
    rows = inspect_paths([folder], adu=(key == "adu"), sort=key)
    assert names(rows)[: len(GOOD)] == order
    assert sorted(names(rows)[len(GOOD):]) == BAD  # unreadable rows have no value: last, by path
    assert names(rows)[len(GOOD):] == BAD


def test_sorting_by_path_mixes_good_and_bad(folder):
    rows = inspect_paths([folder], sort="path")
    assert names(rows) == ["a_flat_L.fits", "b_flat_Ha.fits", "d_bias.fits", "e_empty.fits", "f_notes.fits",
                           "g_cut.fits", "c_dark.fits"]


def test_every_sort_key_is_tested():
    assert set(SORT_KEYS) == {"path", "kind", "size", "binning", "filter", "exposure", "temperature", "date", "adu"}


def test_unknown_sort_key(folder):
    with pytest.raises(ValueError, match="cannot sort by 'colour'"):
        inspect_paths([folder], sort="colour")
    with pytest.raises(ValueError):
        sort_rows([], "colour")


def test_mean_adu_of_known_data(folder, tmp_path):
    data = np.arange(6 * 8, dtype=np.uint16).reshape(6, 8) * 1000  # uint16 through BZERO 32768
    ramp = write(tmp_path / "ramp.fits", data, IMAGETYP="FLAT")
    floats = write(tmp_path / "floats.fits", np.linspace(-5, 5, 35, dtype=np.float32).reshape(5, 7) + 100,
                   IMAGETYP="FLAT")
    signed = write(tmp_path / "signed.fits", np.array([[-3, 7], [100, 0]], dtype=np.int32), IMAGETYP="FLAT")
    packed = tmp_path / "packed.fits.fz"
    fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(data, fits.Header({"IMAGETYP": "FLAT"}))]).writeto(packed)

    rows = {row.path.name: row for row in inspect_paths([folder, ramp, floats, signed, packed], adu=True)}
    assert rows["a_flat_L.fits"].adu == pytest.approx(30000)
    assert rows["b_flat_Ha.fits"].adu == pytest.approx(12000)
    assert rows["c_dark.fits"].adu == pytest.approx(500.5)
    assert rows["d_bias.fits"].adu == pytest.approx(300)
    assert rows["ramp.fits"].adu == pytest.approx(data.mean())
    assert rows["floats.fits"].adu == pytest.approx(100, abs=1e-5)
    assert rows["signed.fits"].adu == pytest.approx(26)
    assert rows["packed.fits.fz"].adu == pytest.approx(data.mean())
    for name in BAD:
        assert rows[name].adu is None and rows[name].error


def test_mean_adu_failure_is_a_reason(folder, monkeypatch):
    import flatd.stack.pixels

    def broken(frame):
        raise flatd.stack.pixels.StackError(f"{frame.path}: read error: Input/output error", frame.path)

    monkeypatch.setattr(flatd.stack.pixels, "mean_adu", broken)
    rows = {row.path.name: row for row in inspect_paths([folder], adu=True)}
    row = rows["a_flat_L.fits"]
    assert row.frame is not None and row.adu is None
    assert row.error == "mean ADU: read error: Input/output error"

    out = render(list(rows.values()), adu=True)
    assert "a_flat_L.fits: mean ADU: read error: Input/output error" in out


# ------------------------------------------------------------------ rendering


def render(rows: list[Row], adu: bool, width: int = 200, terminal: bool = False) -> str:
    buffer = io.StringIO()
    console = Console(file=buffer, width=width, color_system=None, force_terminal=terminal)
    render_table(rows, console, adu=adu)
    return buffer.getvalue()


def test_render_lists_names_facts_and_reasons(folder):
    rows = inspect_paths([folder])
    out = render(rows, adu=False)
    lines = out.splitlines()
    assert lines[0].split() == ["path", "kind", "size", "binning", "filter", "exposure", "temperature", "date"]
    assert "mean ADU" not in out
    for name in GOOD:
        assert name in out
    a_line = next(line for line in lines if "a_flat_L.fits" in line and "flat" in line.split())
    assert a_line.split()[1:] == ["flat", "8x6", "1x1", "L", "2s", "-10.0°C", "2024-05-01", "20:00:03"]
    d_line = next(line for line in lines if "d_bias.fits" in line)
    assert d_line.split()[1:] == ["bias", "10x10", "3x3", "b", "0s"]
    assert "7 files: 1 bias, 1 dark, 2 flat, 3 unreadable" in out
    assert f"{folder / 'e_empty.fits'}: empty file (zero length)" in out
    assert f"{folder / 'f_notes.fits'}: not a FITS file (no SIMPLE card at the start)" in out
    assert f"{folder / 'g_cut.fits'}: truncated data: header promises" in out
    # the table comes first, the problems after it
    assert out.index("d_bias.fits") < out.index("Problems:") < out.index("e_empty.fits")


def test_render_with_adu_column(folder):
    out = render(inspect_paths([folder], adu=True), adu=True)
    header = out.splitlines()[0]
    assert header.rstrip().endswith("mean ADU")
    a_line = next(line for line in out.splitlines() if "a_flat_L.fits" in line)
    assert a_line.rstrip().endswith("30000.0")
    c_line = next(line for line in out.splitlines() if "c_dark.fits" in line)
    assert c_line.rstrip().endswith("500.5")


def test_columns_line_up(folder):
    out = render(inspect_paths([folder]), adu=False)
    header, *rows = out.splitlines()[: 1 + len(GOOD)]
    kind_at, date_at = header.index("kind"), header.index("date")
    assert [row[kind_at:].split()[0] for row in rows] == ["flat", "flat", "bias", "dark"]
    assert [row[date_at:date_at + 4] for row in rows] == ["2024", "2024", "", "2024"]


def test_render_is_literal_and_folds_long_paths(tmp_path):
    odd = write(tmp_path / "[bold]x[/bold] Ha.fits", flat(5), IMAGETYP="FLAT", FILTER="[red]Ha")
    deep = write(tmp_path / ("very-long-folder-name-" * 4) / "flat.fits", flat(5), IMAGETYP="FLAT")
    rows = inspect_paths([odd, deep])
    wide = render(rows, adu=False, width=300)
    assert any(line.startswith(str(odd) + " ") for line in wide.splitlines())  # markup-like names, as they are
    assert "[red]Ha" in wide
    piped = render(rows, adu=False, width=60)  # a file or a pipe: one line per row, however long
    assert len(piped.splitlines()) == 4 and str(deep) in piped and str(odd) in piped
    out = render(rows, adu=False, width=100, terminal=True)
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= 100
    path_width = lines[0].index("kind") - 2
    assert path_width < len(str(deep))  # too long: folded onto continuation lines
    table = lines[1:-1]
    assert len(table) > len(rows)
    folded = "".join(line[:path_width] for line in table).replace(" ", "")
    assert str(deep) in folded and str(odd).replace(" ", "") in folded


def test_render_empty_and_only_bad(tmp_path):
    assert render([], adu=False).strip() == "0 files"
    bad = tmp_path / "x.fits"
    bad.write_bytes(b"")
    out = render(inspect_paths([bad]), adu=False)
    assert out.splitlines()[0] == "1 file: 1 unreadable"
    assert f"{bad}: empty file (zero length)" in out


def test_a_newline_in_a_file_name_stays_on_its_line(tmp_path):
    strange = write(tmp_path / "two\nlines.fits", flat(5), IMAGETYP="FLAT")
    out = render(inspect_paths([strange]), adu=False)
    assert "two?lines.fits" in out
    assert len(out.splitlines()) == 3  # header, the row, the summary


def test_header_text_reaches_the_table_without_escape_sequences(tmp_path):
    """Frames from read_frame are clean already; the table does not count on it."""
    frame = Frame(path=tmp_path / "red.fits", kind=Kind.FLAT, width=8, height=6,
                  filter="R\x1b[31mRED\x1b]0;title\a\tx", exposure=2.0, temperature=-10.0)
    rows = [Row(frame.path, frame, None), Row(tmp_path / "bad.fits", None, "FILTER = 'a\x1b[2Jb\nc' is odd")]
    out = render(rows, adu=False)
    assert "\x1b" not in out and "\a" not in out
    assert "RRED x" in out
    assert f"{tmp_path / 'bad.fits'}: FILTER = 'ab c' is odd" in out
    assert len(out.splitlines()) == 5  # header, the row, the summary, "Problems:", the problem


def test_inspect_imports_neither_numpy_nor_astropy():
    code = "import sys, flatd.inspect; print(sorted(m for m in ('numpy', 'astropy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
