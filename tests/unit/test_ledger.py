"""The ledger: job states committed step by step, consumed inputs, the state lock."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from flatd import ledger as L


def _plan(ledger, job_id="job1", paths=("a.fits", "b.fits"), move_dir=None):
    ledger.plan_job(job_id, "1x1 R", None, Path("/cap"), Path("/cap/masters"), "M.fits",
                    [(Path(p), 100, 1.5, "none", move_dir, 1, i) for i, p in enumerate(paths)])


def test_job_goes_through_its_states(tmp_path):
    ledger = L.Ledger.open(tmp_path)
    _plan(ledger)
    assert ledger.job("job1").state == L.PLANNED
    ledger.set_state("job1", L.WRITING)
    ledger.master_written("job1", Path("/cap/masters/M.fits"), "1x1 R", 2)
    row = ledger.job("job1")
    assert row.state == L.WRITTEN and row.master == "/cap/masters/M.fits"
    assert ledger.is_master(Path("/cap/masters/M.fits"))
    ledger.input_moved("job1", Path("a.fits"), Path("/cap/orig/a.fits"))
    assert ledger.is_moved_input(Path("/cap/orig/a.fits"))
    assert not ledger.is_moved_input(Path("a.fits"))
    ledger.set_state("job1", L.DONE)
    assert [j.id for j in ledger.jobs([L.DONE])] == ["job1"]
    assert ledger.jobs(L.UNFINISHED) == []


def test_state_survives_reopening(tmp_path):
    ledger = L.Ledger.open(tmp_path)
    _plan(ledger)
    ledger.set_state("job1", L.WRITING)
    ledger.close()
    again = L.Ledger.open(tmp_path)
    assert again.job("job1").state == L.WRITING
    assert [r.path for r in again.inputs("job1")] == ["a.fits", "b.fits"]


def test_consumed_only_after_master_is_written(tmp_path):
    ledger = L.Ledger.open(tmp_path)
    _plan(ledger)
    assert ledger.consumed(Path("a.fits"), 100, 1.5) is None
    ledger.master_written("job1", Path("/m.fits"), "x", 2)
    assert ledger.consumed(Path("a.fits"), 100, 1.5) == "/m.fits"
    # The same path with other bytes (a new flat under an old name) is not consumed.
    assert ledger.consumed(Path("a.fits"), 101, 1.5) is None


def test_retry_removes_failed_jobs_only(tmp_path):
    ledger = L.Ledger.open(tmp_path)
    _plan(ledger, "job1")
    _plan(ledger, "job2", ("c.fits",))
    ledger.set_state("job1", L.FAILED, "no dark matches")
    assert ledger.retry() == 1
    assert ledger.job("job1") is None and ledger.job("job2") is not None
    assert ledger.retry("job2") == 0


def test_replanning_counts_attempts(tmp_path):
    ledger = L.Ledger.open(tmp_path)
    _plan(ledger)
    _plan(ledger)
    assert ledger.job("job1").attempts == 2


def test_readonly_ledger_reads_while_writer_is_open(tmp_path):
    writer = L.Ledger.open(tmp_path)
    _plan(writer)
    reader = L.Ledger.open_readonly(tmp_path)
    assert reader.job("job1").state == L.PLANNED
    assert L.Ledger.open_readonly(tmp_path / "none") is None


def test_second_lock_is_refused_and_released_on_exit(tmp_path):
    with L.StateLock(tmp_path):
        with pytest.raises(L.LedgerLocked, match=str(os.getpid())):
            L.StateLock(tmp_path).acquire()
    L.StateLock(tmp_path).acquire().release()


def test_lock_dies_with_its_process(tmp_path):
    script = textwrap.dedent(f"""
        import os
        from flatd.ledger import StateLock
        StateLock({str(tmp_path)!r}).acquire()
        os._exit(0)   # no clean-up: the kernel drops the flock
    """)
    subprocess.run([sys.executable, "-c", script], check=True)
    L.StateLock(tmp_path).acquire().release()


def test_verdicts_hold_for_the_same_file_and_the_same_rules(tmp_path):
    ledger = L.Ledger.open(tmp_path)
    ledger.keep_verdicts_for("rules-1")
    ledger.remember_verdicts([(Path("/c/light.fits"), 10, 1.0, "other"), (Path("/c/bad.fits"), 5, 2.0, "bad")])
    assert ledger.seen_verdict(Path("/c/light.fits"), 10, 1.0) == "other"
    assert ledger.seen_verdict(Path("/c/light.fits"), 11, 1.0) is None  # the file changed
    ledger.keep_verdicts_for("rules-1")
    assert ledger.seen_verdict(Path("/c/bad.fits"), 5, 2.0) == "bad"
    ledger.keep_verdicts_for("rules-2")  # other rules may judge otherwise
    assert ledger.seen_verdict(Path("/c/bad.fits"), 5, 2.0) is None


def test_a_ledger_from_flatd_0_1_gains_the_new_columns(tmp_path):
    """Inputs planned by an older flatd have no inode and no note; they still move."""
    import sqlite3

    old = sqlite3.connect(tmp_path / L.DB_NAME)
    old.executescript(L.SCHEMA.replace("    device INTEGER,\n    inode INTEGER,\n    note TEXT,\n", ""))
    old.execute("INSERT INTO jobs(id, state, label, output_dir, output_name, created_at, updated_at) "
                "VALUES ('j', 'written', 'x', '/o', 'm.fits', 0, 0)")
    old.execute("INSERT INTO job_inputs(job_id, path, size, mtime, move_dir) VALUES ('j', 'a.fits', 1, 2.0, '/d')")
    old.commit()
    old.close()
    ledger = L.Ledger.open(tmp_path)
    (row,) = ledger.inputs("j")
    assert (row.device, row.inode, row.note) == (None, None, None) and row.move_pending
    ledger.set_state("j", L.MOVES_PENDING)
    assert [r.path for r in ledger.pending_moves()] == ["a.fits"]
    ledger.input_not_moved("j", Path("a.fits"), "gone before it was moved")
    assert ledger.pending_moves() == []


# --------------------------------------------------------------------------- states as enums


def test_job_states_are_an_enum_stored_as_their_text(tmp_path):
    import sqlite3

    ledger = L.Ledger.open(tmp_path)
    _plan(ledger)
    ledger.set_state("job1", L.JobState.MOVES_PENDING)
    row = ledger.job("job1")
    assert row.state is L.JobState.MOVES_PENDING and row.state == "moves-pending"
    ledger.close()
    raw = sqlite3.connect(tmp_path / L.DB_NAME).execute("SELECT state FROM jobs").fetchone()[0]
    assert raw == "moves-pending" and type(raw) is str


def test_every_job_state_is_one_something_sets():
    """`moved` was never set by anything: it is gone, and no ledger can hold it."""
    assert {s.value for s in L.JobState} == {"planned", "writing", "written", "moves-pending", "done", "failed"}
    assert not hasattr(L, "MOVED")
    assert set(L.UNFINISHED) == {L.JobState.PLANNED, L.JobState.WRITING, L.JobState.WRITTEN}


def test_frame_verdicts_are_an_enum():
    assert {v.value for v in L.FrameVerdict} == {"flat", "other", "incomplete", "bad", "own", "consumed"}
    assert L.FrameVerdict("bad") is L.FrameVerdict.BAD


def test_jobs_like_finds_a_job_by_the_start_of_its_id(tmp_path):
    ledger = L.Ledger.open(tmp_path)
    _plan(ledger, "abc123")
    assert [j.id for j in ledger.jobs_like("abc")] == ["abc123"]
    assert ledger.jobs_like("zzz") == []


def test_retry_and_jobs_like_take_the_prefix_literally(tmp_path):
    """`%` and `_` are characters of a job id, never SQL wildcards; "" names no job."""
    ledger = L.Ledger.open(tmp_path)
    ledger.plan_job("abc123", "1x1 R", None, tmp_path, tmp_path / "m", "M.fits", [])
    ledger.set_state("abc123", L.FAILED, "no dark")
    for prefix in ("%", "_", "a%", "ab_", ""):
        assert ledger.retry(prefix) == 0, prefix
        if prefix:
            assert ledger.jobs_like(prefix) == [], prefix
    assert [j.id for j in ledger.jobs_like("ABC")] == ["abc123"]
    assert ledger.retry("abc") == 1
