"""`flatd inspect`: the original program's file table, for folders and files.

Headers only (fast: thousands of files a second), unless the mean ADU is asked for,
which reads every pixel. Files that cannot be read are rows too, with the reason.

Keep this module light: no numpy or astropy at import time.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from flatd.frames import DEFAULT_KEYWORDS, Frame, FrameError, KeywordMap, iter_fits_files, read_frame

if TYPE_CHECKING:  # pragma: no cover
    from rich.console import Console


@dataclass(frozen=True)
class Row:
    """One line of the table: a frame, or the reason there is none."""

    path: Path
    frame: Frame | None
    error: str | None
    adu: float | None = None


SORT_KEYS = ("path", "kind", "size", "binning", "filter", "exposure", "temperature", "date", "adu")


def _candidates(paths: Sequence[Path], recursive: bool) -> list[Path]:
    """Files to read: directories scanned for FITS files, explicit files as given.

    An explicit file is read whatever its suffix; a path that does not exist stays in
    the list so that it is reported. Each file appears once.
    """
    out: list[Path] = []
    seen: set[str] = set()

    def add(path: Path) -> None:
        key = os.path.abspath(path)
        if key not in seen:
            seen.add(key)
            out.append(path)

    for given in paths:
        given = Path(given)
        if given.is_dir():
            for found in iter_fits_files(given, recursive=recursive):
                add(found)
        else:
            add(given)
    return out


def _sort_value(row: Row, key: str) -> object:
    """The value a row sorts by for `key`, or None when it has none."""
    frame = row.frame
    if key == "path":
        return str(row.path)
    if key == "adu":
        return row.adu
    if frame is None:
        return None
    if key == "kind":
        return frame.kind.value
    if key == "size":
        return (frame.width, frame.height)
    if key == "binning":
        return (frame.xbin, frame.ybin)
    if key == "filter":
        return frame.filter.lower() if frame.filter else None
    if key == "exposure":
        return frame.exposure
    if key == "temperature":
        return frame.temperature
    if key == "date":
        return frame.date
    raise ValueError(key)


def sort_rows(rows: Sequence[Row], key: str = "path") -> list[Row]:
    """Rows ordered by one column; rows without a value for it come last, by path."""
    if key not in SORT_KEYS:
        raise ValueError(f"cannot sort by {key!r}; choose one of {', '.join(SORT_KEYS)}")

    def order(row: Row) -> tuple:
        value = _sort_value(row, key)
        return (value is None, value if value is not None else 0, str(row.path))

    return sorted(rows, key=order)


def inspect_paths(
    paths: Sequence[Path],
    adu: bool = False,
    sort: str = "path",
    recursive: bool = True,
    keywords: KeywordMap = DEFAULT_KEYWORDS,
) -> list[Row]:
    """A row for every FITS file under `paths` (and every explicit file), sorted."""
    if sort not in SORT_KEYS:
        raise ValueError(f"cannot sort by {sort!r}; choose one of {', '.join(SORT_KEYS)}")
    mean: Callable[[Frame], float] | None = _mean_adu_function() if adu else None
    rows: list[Row] = []
    for path in _candidates(paths, recursive):
        try:
            frame = read_frame(path, keywords)
        except FrameError as exc:
            rows.append(Row(path, None, exc.reason, None))
            continue
        value = None
        error = None
        if mean is not None:
            try:
                value = float(mean(frame))
            except FrameError as exc:
                error = f"mean ADU: {exc.reason}"
            except (OSError, ValueError) as exc:
                error = f"mean ADU: cannot read the pixels ({exc})"
        rows.append(Row(path, frame, error, value))
    return sort_rows(rows, sort)


# ------------------------------------------------------------------- mean ADU


def _mean_adu_function() -> Callable[[Frame], float]:
    """The mean-ADU reader (imported only when asked for: it needs numpy)."""
    return _mean_adu


_DTYPES = {8: "u1", 16: ">i2", 32: ">i4", 64: ">i8", -32: ">f4", -64: ">f8"}
_CHUNK_VALUES = 4 * 2**20


def _mean_adu(frame: Frame) -> float:
    """Mean physical value (BZERO + BSCALE x stored) of the frame's finite pixels.

    Uncompressed data are memory-mapped and summed in bands, so memory stays small
    whatever the image size; tile-compressed data are decompressed by astropy.
    """
    import numpy as np

    if frame.compressed:
        from astropy.io import fits

        with fits.open(frame.path, memmap=False) as hdus:
            data = np.asarray(hdus[frame.hdu_index].data, dtype=np.float64)
        finite = data[np.isfinite(data)]
        if finite.size == 0:
            raise FrameError(frame.path, "no finite pixel values")
        return float(finite.mean())

    count = frame.width * frame.height * frame.planes
    data = np.memmap(frame.path, dtype=np.dtype(_DTYPES[frame.bitpix]), mode="r",
                     offset=frame.data_offset, shape=(count,))
    total = 0.0
    n = 0
    floating = frame.bitpix < 0
    try:
        for start in range(0, count, _CHUNK_VALUES):
            chunk = data[start : start + _CHUNK_VALUES]
            if floating:
                chunk = chunk[np.isfinite(chunk)]
            total += float(chunk.sum(dtype=np.float64))
            n += chunk.size
    finally:
        del data
    if n == 0:
        raise FrameError(frame.path, "no finite pixel values")
    return frame.bzero + frame.bscale * (total / n)


# ------------------------------------------------------------------- rendering


def _fmt_number(value: float | None, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def render_table(rows: list[Row], console: "Console", adu: bool) -> None:
    """Print the rows as a table; files that could not be read are listed below it."""
    from rich.table import Table
    from rich.text import Text

    table = Table(show_header=True, header_style="bold", box=None, pad_edge=False)
    table.add_column("path", overflow="fold")
    table.add_column("kind")
    table.add_column("size", justify="right")
    table.add_column("binning", justify="right")
    table.add_column("filter")
    table.add_column("exposure", justify="right")
    table.add_column("temperature", justify="right")
    table.add_column("date")
    if adu:
        table.add_column("mean ADU", justify="right")

    problems: list[Row] = []
    counts: dict[str, int] = {}
    for row in rows:
        frame = row.frame
        if frame is None:
            problems.append(row)
            continue
        if row.error:
            problems.append(row)
        counts[frame.kind.value] = counts.get(frame.kind.value, 0) + 1
        cells = [
            Text(str(row.path)),
            Text(frame.kind.value, style=None if frame.kind.value == "flat" else "dim"),
            Text(frame.dimensions),
            Text(frame.binning),
            Text(frame.filter or ""),
            Text(_fmt_number(frame.exposure, "g") + ("s" if frame.exposure is not None else "")),
            Text(_fmt_number(frame.temperature, ".1f") + ("°C" if frame.temperature is not None else "")),
            Text(frame.date.isoformat(sep=" ", timespec="seconds") if frame.date else ""),
        ]
        if adu:
            cells.append(Text(_fmt_number(row.adu, ".1f") if row.adu is not None else "—"))
        table.add_row(*cells)

    if table.row_count:
        console.print(table)
    unreadable = sum(1 for row in rows if row.frame is None)
    summary = ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items()))
    line = f"{len(rows)} file{'s' if len(rows) != 1 else ''}"
    if summary:
        line += f": {summary}"
    if unreadable:
        line += f"{',' if summary else ':'} {unreadable} unreadable"
    console.print(Text(line, style="bold"))
    if problems:
        console.print(Text("Problems:", style="bold red"))
        for row in problems:
            message = Text("  ")
            message.append(str(row.path), style="red")
            message.append(f": {row.error}")
            console.print(message)
