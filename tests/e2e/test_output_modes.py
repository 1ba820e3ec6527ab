"""The installed `flatd` with its output sent to different places: every error reaches
every destination the user looks at (a file, a terminal, stderr alone)."""

from __future__ import annotations

import os
import pty
import select
import shutil
import subprocess
import sys
from pathlib import Path

from flatd.demo import write_demo

FLATD = shutil.which("flatd", path=str(Path(sys.executable).parent)) or "flatd"


def _env() -> dict:
    return {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}


def _with_hostile_files(session) -> Path:
    """A not-FITS file among the demo's flats; returns it."""
    flat_dir = session.flat_files[0].parent
    bad = flat_dir / "notfits_FLAT_0098.fits"
    bad.write_text("hello\n")
    return bad


def _read_all(fd: int) -> str:
    chunks = []
    while True:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if not ready:
            break
        try:
            data = os.read(fd, 65536)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks).decode(errors="replace")


def _run_with_terminal_stderr(args, stdout_path: Path, cwd=None) -> tuple[int, str]:
    """flatd with stdout into a file and stderr on a terminal (`flatd ... > f`)."""
    master, slave = pty.openpty()
    try:
        with open(stdout_path, "wb") as out:
            proc = subprocess.Popen([FLATD, *map(str, args)], stdout=out, stderr=slave, stdin=subprocess.DEVNULL,
                                    env=_env(), cwd=cwd)
            os.close(slave)
            slave = -1
            chunks = []
            while proc.poll() is None:
                chunks.append(_read_all(master))
            chunks.append(_read_all(master))
            return proc.wait(timeout=300), "".join(chunks)
    finally:
        if slave >= 0:
            os.close(slave)
        os.close(master)


def test_combine_with_only_stderr_kept_names_every_file_left_out(tmp_path):
    """`flatd combine ... 2> log > /dev/null`: the unreadable file is in the log."""
    session = write_demo(tmp_path / "session")
    bad = _with_hostile_files(session)
    flats = [p for p in session.flat_files if p.parent == bad.parent][:5]
    log = tmp_path / "combine.log"
    with open(log, "wb") as err:
        rc = subprocess.run([FLATD, "combine", *map(str, flats), str(bad), str(tmp_path / "missing.fits"),
                             "-o", str(tmp_path / "m.fits")],
                            stdout=subprocess.DEVNULL, stderr=err, env=_env(), timeout=300).returncode
    text = log.read_text()
    assert rc == 1, text
    assert str(bad) in text and "not a FITS file" in text, text
    assert "missing.fits" in text and "no such file" in text, text


def test_run_once_to_a_file_from_a_terminal_shows_errors_on_the_terminal(tmp_path):
    """`flatd run-once > f` typed at a terminal: the failed groups are in f and on the screen."""
    session = write_demo(tmp_path / "session")
    bad = _with_hostile_files(session)
    masters = session.captures / "masters"
    masters.write_text("a file where the output folder should be\n")
    out = tmp_path / "out.txt"
    rc, screen = _run_with_terminal_stderr(["run-once", "--config", session.config], out)
    report = out.read_text()
    assert rc == 1, (report, screen)
    assert "failed" in report and "failed" in screen, (report, screen)
    assert str(bad) in report and str(bad) in screen, (report, screen)


def test_combine_to_a_file_from_a_terminal_shows_left_out_files_on_the_terminal(tmp_path):
    session = write_demo(tmp_path / "session")
    bad = _with_hostile_files(session)
    flats = [p for p in session.flat_files if p.parent == bad.parent][:5]
    out = tmp_path / "out.txt"
    rc, screen = _run_with_terminal_stderr(["combine", *flats, bad, "-o", tmp_path / "m.fits"], out)
    report = out.read_text()
    assert rc == 1, (report, screen)
    assert str(bad) in report and str(bad) in screen, (report, screen)


def test_run_once_into_one_log_names_the_groups_that_failed_before(tmp_path):
    """`>> run-once.log 2>&1`: a group kept as failed is named in the log at every run,
    not only counted in the summary line."""
    session = write_demo(tmp_path / "session")
    config = Path(session.config)
    config.write_text(config.read_text().replace("memory_limit: 256MiB", "memory_limit: 1MiB"))
    log = tmp_path / "run-once.log"
    for _ in range(2):
        log.write_text("")
        with open(log, "ab") as out:
            rc = subprocess.run([FLATD, "run-once", "--config", str(config)], stdout=out,
                                stderr=subprocess.STDOUT, env=_env(), timeout=300).returncode
        text = log.read_text()
        assert rc == 1, text
        assert "memory limit 1.0 MiB is too small" in text, text
        assert "filter Ha" in text, text
