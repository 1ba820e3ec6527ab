"""Typed events, the bus, and the log and report subscribers."""

import io
import json
import logging
from pathlib import Path

from flatd.notify import events as E
from flatd.log import setup_logging


def _log(fmt="plain") -> io.StringIO:
    stream = io.StringIO()
    setup_logging(fmt, stream=stream, timestamps=False)
    return stream


def test_the_six_events_of_the_design_have_their_names():
    names = {cls.name for cls in (E.FrameLeftOut, E.GroupPlanned, E.MasterWritten, E.InputsMoved, E.JobFailed,
                                  E.BatchDone)}
    assert names == {"frame_left_out", "group_planned", "master_written", "inputs_moved", "job_failed", "batch_done"}


def test_a_subscriber_gets_every_event_until_it_leaves():
    bus = E.Bus()
    got = []
    leave = bus.subscribe(got.append)
    ev = E.InputsMoved("j1", 3, Path("/c/originals"))
    bus.emit(ev)
    leave()
    bus.emit(ev)
    assert got == [ev]


def test_a_failing_subscriber_does_not_stop_the_others():
    bus = E.Bus()
    got = []

    def broken(ev):
        raise RuntimeError("boom")

    bus.subscribe(broken)
    bus.subscribe(got.append)
    stream = _log()
    bus.emit(E.MovesFinished("j1", 2))
    assert len(got) == 1
    assert "subscriber failed on moves_finished: boom" in stream.getvalue()


def test_the_log_subscriber_writes_one_line_with_the_event_name_and_fields():
    stream = _log("json")
    E.emit(E.MasterWritten("j1", Path("/m/F.fits"), 8, 1.5))
    record = json.loads(stream.getvalue())
    assert record["event"] == "master_written" and record["message"] == "wrote /m/F.fits"
    assert record["job"] == "j1" and record["files"] == 8 and record["seconds"] == 1.5


def test_plain_lines_of_typed_events_keep_every_field():
    stream = _log()
    E.emit(E.GroupPlanned("j1", "1x1 50x40, -10.0 °C, filter R", 8, "median", "-"))
    assert stream.getvalue().strip() == ('combining 8 flats of 1x1 50x40, -10.0 °C, filter R with median '
                                         'job=j1 group="1x1 50x40, -10.0 °C, filter R" files=8 rule=-')


def test_levels_follow_what_happened():
    assert E.FrameLeftOut(Path("/a"), "type light, not a flat", quiet=True).level == logging.DEBUG
    assert E.FrameLeftOut(Path("/a"), "truncated", bad=True).level == logging.WARNING
    assert E.JobFailed("R", "no dark").level == logging.ERROR
    assert E.MasterWritten("j", Path("/m"), 3, found=True).level == logging.WARNING


def test_recovery_and_move_events_keep_their_log_names():
    assert E.JobRecovered("j1", "R").name == "job_rolled_back"
    assert E.JobRecovered("j1", "R", Path("/m/F.fits")).name == "job_recovered"
    assert E.MoveProblem("j1", Path("/a"), "x", refused=True).name == "move_refused"
    assert E.MoveProblem("j1", Path("/a"), "x").name == "move_failed"
    assert E.FolderProblem(Path("/c"), "gone", missing=True).name == "capture_missing"


def test_the_report_subscriber_gathers_a_one_shot_run():
    with E.ReportSubscriber() as report:
        E.emit(E.MasterWritten("j1", Path("/m/F.fits"), 5))
        E.emit(E.JobFailed("G", "no dark", job="j2"))
        E.emit(E.FrameLeftOut(Path("/c/l.fits"), "type light, not a flat", quiet=True))
        E.emit(E.FrameLeftOut(Path("/c/b.fits"), "truncated", bad=True))
    E.emit(E.MasterWritten("j3", Path("/m/G.fits"), 5))  # after it left
    summary = report.summary()
    assert (summary.masters, summary.failed, summary.left_out) == (1, 1, 1)
    assert summary.message == "run-once: 1 master(s) written, 1 group(s) failed, 1 file(s) left out"
    assert (summary.warn, summary.bad) == (0, 0)


def test_the_batch_summary_counts_the_masters_the_checks_marked():
    with E.ReportSubscriber() as report:
        for job, status in (("j1", "good"), ("j2", "warn"), ("j3", "bad"), ("j4", "warn")):
            E.emit(E.MasterWritten(job, Path(f"/m/{job}.fits"), 5))
            E.emit(E.MasterChecked(job, Path(f"/m/{job}.fits"), status))
    summary = report.summary()
    assert (summary.masters, summary.warn, summary.bad) == (4, 2, 1)
    assert summary.message == "run-once: 4 master(s) written (2 warn, 1 bad by the checks), 0 group(s) failed"


# --------------------------------------------------------------------------- rejection reported (issue 9)


def test_master_written_says_what_was_rejected():
    from pathlib import Path

    from flatd.notify import events as E

    ev = E.MasterWritten("j1", Path("/m/master.fits"), 20, 1.5, rejected_low=0.0012, rejected_high=0.00003)
    assert ev.message == "wrote /m/master.fits (rejected 0.12 % low, 0.003 % high)"
    assert ev.fields()["rejected_low"] == 0.0012 and ev.level == E.INFO
    assert E.MasterWritten("j1", Path("/m/master.fits"), 20).message == "wrote /m/master.fits"
    assert E.percent(0) == "0 %" and E.percent(0.005) == "0.5 %" and E.percent(0.25) == "25 %"


def test_rejection_high_warns_overall_and_notes_frames():
    from pathlib import Path

    from flatd.notify import events as E

    ev = E.RejectionHigh("j1", Path("/m/master.fits"), 0.004, 0.003, 0.005, overall=True, frames=2,
                         worst=Path("/c/flat_07.fits"), worst_fraction=0.031)
    assert ev.name == "rejection_high" and ev.level == E.WARNING
    assert ev.message == ("master.fits: rejected 0.7 % of all values (0.4 % low, 0.3 % high; clean data at this "
                          "N: 0 %), more than combine.rejection_warn 0.5 % above it; most from flat_07.fits "
                          "(3.1 %): often a bad frame")
    assert "path" not in ev.fields() and ev.fields()["worst"] == Path("/c/flat_07.fits")
    frames_only = E.RejectionHigh("j1", Path("/m/master.fits"), 0.001, 0.001, 0.005, overall=False, frames=1,
                                  worst=Path("/c/flat_07.fits"), worst_fraction=0.02)
    assert frames_only.level == E.INFO
    assert frames_only.message.startswith("master.fits: 1 input(s) lost more than 0.5 % of their values")


def test_rejection_high_says_the_clean_data_baseline():
    """The warning is measured from what the method rejects from clean data at this N,
    and says so: the baseline, the threshold above it, and (inputs) their sum."""
    from pathlib import Path

    from flatd.notify import events as E

    ev = E.RejectionHigh("j1", Path("/m/master.fits"), 0.012, 0.011, 0.005, baseline=0.011)
    assert ev.message == ("master.fits: rejected 2.3 % of all values (1.2 % low, 1.1 % high; clean data at this "
                          "N: 1.1 %), more than combine.rejection_warn 0.5 % above it")
    assert ev.fields()["baseline"] == 0.011 and ev.level == E.WARNING
    frames_only = E.RejectionHigh("j1", Path("/m/master.fits"), 0.008, 0.008, 0.005, overall=False, frames=1,
                                  worst=Path("/c/flat_07.fits"), worst_fraction=0.25, baseline=0.0158)
    assert frames_only.level == E.INFO
    assert frames_only.message == ("master.fits: 1 input(s) lost more than 2.08 % of their values (clean data at "
                                   "this N: 1.58 %, plus combine.rejection_warn 0.5 %); most from flat_07.fits "
                                   "(25 %): often a bad frame")
