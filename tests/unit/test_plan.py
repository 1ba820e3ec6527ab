"""The planner: which frames are flats, one job per group, stable ids, distinct names."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from flatd.calibration import LibraryCache
from flatd.config import parse_rules
from flatd.ingest.frames import Frame, Kind
from flatd.plan import FailedGroup, Job, job_id, output_folders, plan_frames, select_flats

NOW = datetime(2026, 11, 25, 6, 0, 0)


def frame(name: str, kind=Kind.FLAT, filt="R", temp=-10.0, size=(100, 80), folder="/cap/night1",
          instrument="ZWO ASI2600MM Pro", mtime=1.0) -> Frame:
    return Frame(path=Path(folder) / name, kind=kind, width=size[0], height=size[1], filter=filt,
                 temperature=temp, exposure=1.0, instrument=instrument, file_size=1000, mtime=mtime)


def rules(text: str = ""):
    base = "capture: [{path: /cap}]\n" + ("" if "grouping" in text else "grouping: {min_group_size: 2}\n")
    return parse_rules(base + text, Path("/etc/flatd.yaml"))


def plan(frames, text=""):
    return plan_frames(frames, rules(text), Path("/cap"), LibraryCache(), NOW)


def test_only_flats_unless_ignore_type_and_never_masters():
    frames = [frame("a.fits"), frame("d.fits", Kind.DARK), frame("m.fits", Kind.MASTER), frame("u.fits", Kind.UNKNOWN)]
    chosen, left = select_flats(frames, rules())
    assert [f.path.name for f, _ in chosen] == ["a.fits"]
    assert {s.path.name for s in left} == {"d.fits", "m.fits", "u.fits"}
    chosen, left = select_flats(frames, rules("inputs: {ignore_type: true}"))
    assert sorted(f.path.name for f, _ in chosen) == ["a.fits", "d.fits", "u.fits"]
    assert [s.path.name for s in left] == ["m.fits"]


def test_one_job_per_group_into_the_capture_folders_output():
    p = plan([frame(f"r{i}.fits") for i in range(3)] + [frame(f"g{i}.fits", filt="G") for i in range(2)])
    assert len(p.jobs) == 2 and not p.failed
    assert all(isinstance(j, Job) and j.output_dir == Path("/cap/masters") for j in p.jobs)
    assert sorted(len(j.inputs) for j in p.jobs) == [2, 3]


def test_flats_in_different_folders_never_share_a_group_unless_told():
    frames = [frame(f"a{i}.fits", folder="/cap/n1") for i in range(2)] + [frame(f"b{i}.fits", folder="/cap/n2") for i in range(2)]
    assert len(plan(frames).jobs) == 2
    assert len(plan(frames, "grouping: {min_group_size: 2, folder: false}").jobs) == 1


def test_minmax_with_too_few_frames_is_a_failed_group_not_a_crash():
    p = plan([frame(f"r{i}.fits") for i in range(4)], "combine: {method: minmax, minmax: 2}")
    (failed,) = p.failed
    assert isinstance(failed, FailedGroup) and "needs at least 5 frames" in failed.reason and not p.jobs


def test_missing_calibration_library_fails_the_group_with_the_reason():
    p = plan([frame(f"r{i}.fits") for i in range(2)], "precalibration: {mode: auto, library: /no/such/lib}")
    (failed,) = p.failed
    assert "/no/such/lib" in failed.reason


def test_job_id_depends_on_inputs_and_settings_not_order():
    a, b = frame("a.fits"), frame("b.fits")
    assert job_id([a, b], "x") == job_id([b, a], "x")
    assert job_id([a, b], "x") != job_id([a, b], "y")
    assert job_id([a, b], "x") != job_id([a, frame("b.fits", mtime=2.0)], "x")


def test_same_planned_name_gets_a_number():
    text = 'output: {name: "FLAT-{filter}.fits"}\ngrouping: {min_group_size: 2, temperature: null}'
    frames = [frame(f"a{i}.fits", size=(100, 80)) for i in range(2)] + [frame(f"b{i}.fits", size=(50, 40)) for i in range(2)]
    names = sorted(j.output_name for j in plan(frames, text).jobs)
    assert names == ["FLAT-R-2.fits", "FLAT-R.fits"]


def test_a_rule_changes_the_method_for_the_flats_it_matches():
    text = ('combine: {method: sigma}\n'  # the default is auto (which takes the median for 2 frames)
            'rules:\n  - name: rig2\n    match: {instrument: "QHY*"}\n    combine: {method: median}\n')
    frames = [frame(f"z{i}.fits") for i in range(2)] + [frame(f"q{i}.fits", instrument="QHY268M") for i in range(2)]
    jobs = {j.rule: j for j in plan(frames, text).jobs}
    assert jobs["rig2"].method.name == "median" and jobs[None].method.name == "sigma"


def test_output_folders_inside_capture_folders_are_known():
    assert Path("/cap/masters") in output_folders(rules())
    assert Path("/srv/m") in output_folders(rules("output: {directory: /srv/m}"))


# --------------------------------------------------------------------------- method: auto (issue 9)


def test_auto_is_resolved_per_group_from_its_number_of_frames():
    from flatd.stack import auto

    frames = ([frame(f"r{i}.fits") for i in range(3)] + [frame(f"g{i}.fits", filt="G") for i in range(15)]
              + [frame(f"b{i}.fits", filt="B") for i in range(40)])
    p = plan(frames)  # the rules file's default is auto
    assert not p.failed and len(p.jobs) == 3
    by_size = {len(j.inputs): j for j in p.jobs}
    for n, job in by_size.items():
        want, reason = auto.choose(n)
        assert job.method == want and job.auto_reason == reason
        assert job.method.label in job.output_name  # {method} names the chosen method
    assert by_size[3].method.name == "median"
    assert by_size[15].method.name == "winsorized" and "15 frames" in by_size[15].auto_reason


def test_a_named_method_has_no_auto_reason_and_keeps_its_job_id():
    frames = [frame(f"r{i}.fits") for i in range(3)]
    (job,) = plan(frames, "combine: {method: sigma}").jobs
    assert job.auto_reason is None
    (auto_job,) = plan(frames).jobs
    assert auto_job.auto_reason is not None and auto_job.id != job.id
    # a named median and an auto median are different products (the header says auto)
    (median,) = plan(frames, "combine: {method: median}").jobs
    assert auto_job.method == median.method and auto_job.id != median.id


def test_auto_takes_the_rules_files_thresholds():
    frames = [frame(f"r{i}.fits") for i in range(15)]
    (job,) = plan(frames, "combine: {method: auto, low: 2.5, high: 4}").jobs
    assert (job.method.name, job.method.params["low"], job.method.params["high"]) == ("winsorized", 2.5, 4.0)
    assert "from the rules file" in job.auto_reason


def test_a_rule_may_ask_for_auto_and_its_settings_reach_the_job():
    frames = [frame(f"r{i}.fits") for i in range(8)] + [frame(f"h{i}.fits", filt="Ha") for i in range(8)]
    text = ("combine: {method: sigma, rejection_warn: 0.01}\noutput: {rejection_map: true}\n"
            "rules:\n  - match: {filter: Ha}\n    combine: {method: auto, rejection_warn: null}\n")
    jobs = {j.frames[0].filter: j for j in plan(frames, text).jobs}
    assert jobs["R"].method.name == "sigma" and jobs["R"].auto_reason is None
    assert jobs["Ha"].method.name == "winsorized" and jobs["Ha"].auto_reason  # 8 frames
    assert (jobs["R"].rejection_warn, jobs["Ha"].rejection_warn) == (0.01, None)
    assert jobs["R"].rejection_map and jobs["Ha"].rejection_map
    plain = plan(frames[:8]).jobs[0]
    assert plain.rejection_map is False and plain.rejection_warn == 0.005
