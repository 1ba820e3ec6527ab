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

from flatd.ingest.frames import DEFAULT_KEYWORDS, Frame, FrameError, KeywordMap, iter_fits_files, read_frame
from flatd.log import printable
from flatd.output.naming import temperature_text

if TYPE_CHECKING:  # pragma: no cover
    from rich.console import Console


@dataclass(frozen=True)
class Row:
    """One line of the table: a frame, or the reason there is none."""

    path: Path
    frame: Frame | None
    error: str | None
    adu: float | None = None
    channels: dict[str, float] | None = None  # colour frames with --adu: mean of R, G and B


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


def _without_path(message: str, path: Path) -> str:
    """A reason without the "<path>: " the stacker's messages start with."""
    prefix = f"{path}: "
    return message[len(prefix):] if message.startswith(prefix) else message


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
    """Rows ordered by one column, ties by path.

    Frames without a value for the column come after those with one, and files that
    could not be read come last (except when sorting by path, which they have).
    """
    if key not in SORT_KEYS:
        raise ValueError(f"cannot sort by {key!r}; choose one of {', '.join(SORT_KEYS)}")

    def order(row: Row) -> tuple:
        value = _sort_value(row, key)
        unreadable = row.frame is None and key != "path"
        return (unreadable, value is None, value if value is not None else 0, str(row.path))

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
    mean: Callable[[Frame], float] | None = None
    if adu:
        from flatd.stack.pixels import mean_adu as mean  # reads pixels: numpy, only when asked
    rows: list[Row] = []
    for path in _candidates(paths, recursive):
        try:
            frame = read_frame(path, keywords)
        except FrameError as exc:
            rows.append(Row(path, None, exc.reason, None))
            continue
        value = None
        error = None
        channels = None
        if mean is not None:
            try:
                if frame.bayer_pattern:
                    value, channels = channel_adu(frame)
                else:
                    value = float(mean(frame))
            except Exception as exc:  # FlatdError, OSError...: a reason in the table
                error = "mean ADU: " + _without_path(str(getattr(exc, "reason", None) or exc), path)
        rows.append(Row(path, frame, error, value, channels))
    return sort_rows(rows, sort)


def channel_adu(frame: Frame, chunk_bytes: int = 8 * 2**20) -> tuple[float, dict[str, float]]:
    """A colour frame's mean ADU and the mean of each CFA channel (R, G, B), read in
    bands of bounded size (flatd.stack.cfa: the pattern, offsets and row order)."""
    import numpy as np

    from flatd.stack import cfa
    from flatd.stack.pixels import open_pixels

    layout = cfa.layout_of(frame)
    totals = {c: [0.0, 0] for c in cfa.CHANNELS}
    with open_pixels(frame) as src:
        step = max(2, chunk_bytes // max(1, src.width * 4)) // 2 * 2
        out = np.empty((min(step, src.height), src.width), dtype=np.float32)
        scratch = None
        for r0 in range(0, src.height, step):
            r1 = min(src.height, r0 + step)
            if scratch is None:
                scratch = np.empty(src.raw_bytes(r0, r1), dtype=np.uint8)
            band = out[: r1 - r0]
            src.read_into(r0, r1, band, scratch=scratch)
            for colour, (total, count) in cfa.channel_sums(band, layout, r0).items():
                totals[colour][0] += total
                totals[colour][1] += count
    pixels = sum(n for _, n in totals.values())
    overall = sum(t for t, _ in totals.values()) / pixels if pixels else float("nan")
    return overall, {c: (t / n if n else float("nan")) for c, (t, n) in totals.items()}


# ------------------------------------------------------------------- rendering


def _fmt_number(value: float | None, fmt: str, unit: str = "") -> str:
    return "" if value is None else format(value, fmt) + unit


# Control characters (a newline in a file name...) would break the table's lines; a
# path keeps a "?" in their place, header text loses them whole (see log.printable).
_PRINTABLE = {i: "?" for i in range(32)} | {i: "?" for i in range(127, 160)}
_PATH_MIN_WIDTH = 16


CFA_CHANNELS = ("R", "G", "B")


def _cells(row: Row, adu: bool, colour: bool = False) -> list[str]:
    frame = row.frame
    assert frame is not None
    facts = [
        frame.kind.value,
        frame.dimensions,
        frame.binning,
        frame.filter or "",
        _fmt_number(frame.exposure, "g", "s"),
        "" if frame.temperature is None else temperature_text(frame.temperature) + "°C",
        frame.date.isoformat(sep=" ", timespec="seconds") if frame.date else "",
    ]
    if adu:
        facts.append(_fmt_number(row.adu, ".1f") or "—")
    if colour:
        facts += [_fmt_number((row.channels or {}).get(c), ".1f") for c in CFA_CHANNELS]
    return [str(row.path).translate(_PRINTABLE), *map(printable, facts)]


def render_table(rows: list[Row], console: "Console", adu: bool) -> None:
    """Print the rows as a table; files that could not be read are listed below it.

    The columns are laid out here and printed as one rich Text (bold header, other
    kinds than flat dimmed, problems in red): rich's own Table measures and renders
    every cell apart, which takes more than a second for 2,000 files. On a terminal,
    paths longer than the room left by the other columns are folded onto
    continuation lines; into a file or a pipe each row is one line.
    """
    from rich.cells import cell_len, chop_cells
    from rich.text import Span, Text

    headers = ["path", "kind", "size", "binning", "filter", "exposure", "temperature", "date"]
    right = [False, False, True, True, False, True, True, False]
    if adu:
        headers.append("mean ADU")
        right.append(True)
    colour = adu and any(row.channels for row in rows)
    if colour:  # colour frames: a column per CFA channel (none for mono-only tables)
        headers += [f"mean {c}" for c in CFA_CHANNELS]
        right += [True] * len(CFA_CHANNELS)

    good = [row for row in rows if row.frame is not None]
    problems = [row for row in rows if row.error]
    table_rows = [_cells(row, adu, colour) for row in good]

    pieces: list[str] = []
    spans: list[Span] = []
    position = 0

    def emit(parts: list[tuple[str, str | None]]) -> None:
        nonlocal position
        last = len(parts) - 1
        for index, (text, style) in enumerate(parts):
            if index == last:
                text = text.rstrip()
            if style and text:
                spans.append(Span(position, position + len(text), style))
            pieces.append(text)
            position += len(text)
        pieces.append("\n")
        position += 1

    if table_rows:
        widths = [cell_len(h) for h in headers]
        for cells in table_rows:
            for i, cell in enumerate(cells):
                width = cell_len(cell)
                if width > widths[i]:
                    widths[i] = width
        if console.is_terminal:
            # Fold long paths to the room the terminal leaves; into a file or a pipe
            # (grep, sort), every row stays on one line whatever its length.
            room = console.width - sum(widths[1:]) - 2 * (len(headers) - 1)
            widths[0] = max(_PATH_MIN_WIDTH, min(widths[0], room))

        def pad(text: str, i: int) -> str:
            gap = " " * max(0, widths[i] - cell_len(text))
            return gap + text if right[i] else text + gap

        def line(cells: list[str]) -> list[tuple[str, str | None]]:
            parts: list[tuple[str, str | None]] = []
            for i, cell in enumerate(cells):
                style = "dim" if i == 1 and cell != "flat" else None
                parts.append((pad(cell, i), style))
                if i < len(cells) - 1:
                    parts.append(("  ", None))
            return parts

        emit([("  ".join(pad(h, i) for i, h in enumerate(headers)), "bold")])
        for cells in table_rows:
            path = cells[0]
            folded = [path] if cell_len(path) <= widths[0] else chop_cells(path, widths[0])
            emit(line([folded[0], *cells[1:]]))
            for more in folded[1:]:
                emit([(more, None)])

    counts: dict[str, int] = {}
    for row in good:
        counts[row.frame.kind.value] = counts.get(row.frame.kind.value, 0) + 1
    unreadable = len(rows) - len(good)
    parts = [f"{n} {kind}" for kind, n in sorted(counts.items())]
    if unreadable:
        parts.append(f"{unreadable} unreadable")
    summary = f"{len(rows)} file{'' if len(rows) == 1 else 's'}" + (": " + ", ".join(parts) if parts else "")
    emit([(summary, "bold")])
    if problems:
        emit([("Problems:", "bold red")])
        for row in problems:
            emit([("  ", None), (str(row.path).translate(_PRINTABLE), "red"), (f": {printable(row.error)}", None)])

    text = Text("".join(pieces).rstrip("\n"), spans=spans)
    console.print(text, soft_wrap=True, highlight=False)
