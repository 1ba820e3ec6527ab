"""flatd.ingest.discover: which paths are candidates, for the watcher and the scans alike."""

from __future__ import annotations

from flatd.config import parse_rules
from flatd.ingest.discover import FolderFilter


def _rules(tmp_path, extra=""):
    text = f"""
capture:
  - path: {tmp_path}/cap
output: {{directory: masters}}
inputs: {{move_to: "done/originals-{{date}}"}}
state: {tmp_path}/cap/.state
{extra}
"""
    return parse_rules(text, base=tmp_path)


def test_filter_skips_own_outputs_hidden_and_temporary_files(tmp_path):
    rules = _rules(tmp_path)
    f = FolderFilter(rules.capture[0], rules)
    cap = tmp_path / "cap"
    assert f.wants(cap / "night1" / "flat_001.fits")
    assert f.wants(cap / "flat.fit")
    assert not f.wants(cap / "night1" / "notes.txt")
    for name in (".flat.fits", "~flat.fits", "flat.fits.tmp", "flat.fits.part"):
        assert not f.wants(cap / name), name
    assert not f.wants(cap / "masters" / "FLAT-R.fits")
    assert not f.wants(cap / "night1" / "done" / "originals-20260101-000000" / "flat_001.fits")
    assert not f.wants(cap / ".state" / "x.fits")
    assert not f.wants(cap / ".hidden" / "flat.fits")
    assert not f.wants(tmp_path / "elsewhere" / "flat.fits")
    assert not f.wants_dir(cap / "masters")
    assert f.wants_dir(cap / "night2")


def test_filter_non_recursive_and_absolute_move_to(tmp_path):
    rules = parse_rules(f"""
capture:
  - path: {tmp_path}/cap
    recursive: false
inputs: {{move_to: "{tmp_path}/cap/archive/{{date}}"}}
state: {tmp_path}/state
""", base=tmp_path)
    f = FolderFilter(rules.capture[0], rules)
    cap = tmp_path / "cap"
    assert f.wants(cap / "flat.fits")
    assert not f.wants(cap / "night1" / "flat.fits")
    assert not f.wants_dir(cap / "night1")
    rules = parse_rules(f"""
capture:
  - path: {tmp_path}/cap
inputs: {{move_to: "{tmp_path}/cap/archive/{{date}}"}}
state: {tmp_path}/state
""", base=tmp_path)
    f = FolderFilter(rules.capture[0], rules)
    assert f.wants(cap / "night1" / "flat.fits")
    assert not f.wants(cap / "archive" / "20260101" / "flat.fits")


def test_walk_finds_the_candidates(tmp_path):
    rules = _rules(tmp_path)
    cap = tmp_path / "cap"
    for rel in ("night1/a.fits", "night1/b.fits.part", "masters/M.fits", "night1/done/originals-1/c.fits",
                ".state/d.fits", "e.fits"):
        (cap / rel).parent.mkdir(parents=True, exist_ok=True)
        (cap / rel).write_bytes(b"x")
    f = FolderFilter(rules.capture[0], rules)
    assert sorted(p.relative_to(cap).as_posix() for p in f.walk()) == ["e.fits", "night1/a.fits"]
    assert [p.name for p in f.walk(cap / "night1")] == ["a.fits"]


def test_stable_wait_also_waits_for_files_that_arrive_meanwhile(tmp_path):
    """The folders are walked again once the first files are ready: a flat that
    arrived during the wait is waited for too, on a clock the test moves."""
    import os
    import time

    from flatd.ingest.discover import StableWait

    rules = _rules(tmp_path)
    cap = tmp_path / "cap"
    cap.mkdir()
    first = cap / "a.fits"
    first.write_bytes(b"x")
    start = time.time()
    os.utime(first, (start, start))
    now = [start]
    late = cap / "b.fits"

    def sleep(seconds):
        now[0] += seconds
        if not late.exists():
            late.write_bytes(b"x")
            os.utime(late, (now[0], now[0]))

    said = []
    waiter = StableWait(1.0, clock=lambda: now[0])
    assert waiter.wait([FolderFilter(rules.capture[0], rules)], 10.0, said.append, sleep) == []
    assert len(said) == 1 and "1 file(s) still being written" in said[0]
    assert now[0] - start >= 1.25  # b.fits arrived at +0.25 s and stood still for 1 s
    assert waiter.ready(late, late.stat())
