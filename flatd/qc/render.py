"""What `flatd qc` prints (flatd.qc.command): rich tables of flats, master figures, verdicts."""

from __future__ import annotations

import math
from pathlib import Path

from flatd.log import printable

_STYLE = {"ok": "green", "good": "green", "warn": "yellow", "leave-out": "red", "bad": "red"}


def _name(path: Path) -> str:
    return printable(Path(path).name)


def bad_file(console, path: Path, reason: str) -> None:
    """A file that could not be checked: its name and why."""
    from rich.text import Text

    console.print(Text.assemble((printable(str(path)), "red"), f": {printable(reason)}"))


def _level_text(levels: dict) -> str:
    parts = []
    for channel, value in levels.items():
        figure = f"{value:.3f}" if math.isfinite(value) else "n/a"
        parts.append(f"{channel} {figure}" if channel else figure)
    return " ".join(parts)


def flat_table(console, group, rows, note: str, quality) -> None:
    """A group's flats: level, saturated fraction, odd score, tilt, verdict and reasons."""
    from rich.table import Table

    table = Table(title=f"{printable(group.label)}: {len(rows)} flat(s); {printable(note)}", title_justify="left",
                  caption=f"limits: level {quality.min_level:g}-{quality.max_level:g} of full scale, saturated "
                          f"{quality.max_saturated * 100:g} %, odd score {quality.odd_sigma:g}, tilt "
                          f"{quality.odd_min_tilt * 100:g} % (against the frames around it, 5 flats or more)",
                  caption_justify="left", show_edge=False, pad_edge=False)
    table.add_column("file", no_wrap=True)
    for name in ("level", "saturated", "odd", "tilt"):
        table.add_column(name, justify="right", no_wrap=True)
    table.add_column("verdict", no_wrap=True)
    for row in rows:
        verdict = row.verdict
        checks = ", ".join(dict.fromkeys(f.check for f in row.findings))
        odd = "n/a" if row.odd is None else f"{row.odd:.1f}"
        tilt = "n/a" if row.tilt is None else f"{row.tilt * 100:.2f} %"
        table.add_row(_name(row.path), _level_text(row.levels), f"{row.saturated * 100:.3g} %", odd, tilt,
                      f"[{_STYLE[verdict]}]{verdict}[/]" + (f" ({checks})" if checks else ""))
    console.print(table)
    for row in rows:
        for finding in row.findings:
            console.print(f"  {_name(row.path)}: [{_STYLE[row.verdict]}]{printable(finding.reason)}[/]")
    out = [r for r in rows if r.verdict == "leave-out"]
    if out:
        console.print(f"{len(out)} flat(s) would be left out: " + ", ".join(_name(r.path) for r in out))


def master_report(console, report) -> None:
    """A master's figures, the comparison with --against, the verdict with reasons."""
    qc = report.qc
    console.print(f"[bold]{printable(str(report.path))}[/]: master {'colour' if report.layout else 'mono'} "
                  f"{report.image.shape[1]}x{report.image.shape[0]}")
    console.print(f"  pixels: {qc.nonfinite} non-finite, {qc.zero} <= 0 (saturated: n/a without the inputs)")
    console.print("  field brightest/darkest: " + ("n/a" if qc.field_ratio is None else f"{qc.field_ratio:.3f}"))
    noise = "n/a (needs the inputs)" if report.header_noise is None else \
        f"{report.header_noise:.2f} x the predicted (QCNOISEX, when it was made)"
    console.print(f"  noise: {noise}")
    if report.against is not None:
        _comparison(console, report)
    style = _STYLE[qc.status]
    console.print(f"  verdict: [{style}]{qc.status}[/]" + ("" if qc.reasons else " (no reasons to doubt it)"))
    for reason in qc.reasons:
        console.print(f"    - {printable(reason)}")


def _comparison(console, report) -> None:
    c = report.comparison
    if c is None:
        console.print(f"  against {_name(report.against)}: not compared ({printable(report.against_error or '')})")
        return
    console.print(f"  against {_name(report.against)}: {c.changed_fraction * 100:.3g} % of pixels changed "
                  f"beyond {c.nsigma:g} sigma; {len(c.blobs)} dust blob(s)"
                  + (" (too widespread to list)" if c.widespread else ""))
    for blob in c.blobs:
        console.print(f"    dust {blob.kind} at x={blob.x:.0f} y={blob.y:.0f} r={blob.radius:.0f} "
                      f"depth {blob.depth:.2f} %")


def summary(console, out) -> None:
    """The pictures written and the overall verdict line."""
    for path in out.pictures:
        console.print(f"picture: {printable(str(path))}")
    console.print("[green]all good[/]" if not out.problems else
                  f"[red]{out.problems} problem(s)[/]: see above")
