"""Hooks (flatd.notify.hooks): running one command, and turning events into commands."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from flatd.config import ConfigError, hooks_for, parse_rules
from flatd.notify import events as E
from flatd.notify.hooks import OUTPUT_KEEP, HookCall, HookRunner, run_command
from flatd.notify.outcome import Gatherer, jsonable

PY = sys.executable


def _call(argv, timeout=10.0, document=None, env=None, kind="after_master") -> HookCall:
    return HookCall(kind, tuple(argv), document or {"x": 1}, env or {"FLATD_EVENT": kind}, timeout)


# --------------------------------------------------------------------------- one command


def test_a_command_reads_the_document_and_its_environment():
    code = "import json, os, sys; d = json.load(sys.stdin); print(d['x'], os.environ['FLATD_EVENT'])"
    result = run_command(_call([PY, "-c", code]))
    assert result.ok and result.returncode == 0
    assert result.stdout == "1 after_master"


def test_a_failing_command_gives_its_status_and_its_stderr():
    result = run_command(_call([PY, "-c", "import sys; print('no NAS', file=sys.stderr); sys.exit(3)"]))
    assert not result.ok and result.returncode == 3
    assert result.stderr == "no NAS"


def test_a_command_past_its_timeout_is_killed_with_its_process_group(tmp_path):
    pid_file = tmp_path / "child.pid"
    # The hook starts a child in its process group, then hangs: both must die.
    script = f"sleep 60 & echo $! > {pid_file}; echo started; sleep 60"
    began = time.monotonic()
    result = run_command(_call(["sh", "-c", script], timeout=0.5))
    assert result.timed_out and not result.ok and result.returncode is None
    assert time.monotonic() - began < 8
    assert result.stdout == "started"
    child = int(pid_file.read_text())
    for _ in range(50):
        if not _alive(child):
            break
        time.sleep(0.1)
    assert not _alive(child)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(")")[-1].split()[0] != "Z"  # a zombie is dead
    except FileNotFoundError:
        return False


def test_a_command_that_cannot_start_says_why():
    result = run_command(_call(["/nonexistent/flatd-hook"]))
    assert not result.ok and result.error and "No such file" in result.error


def test_a_command_that_ignores_its_stdin_is_fine():
    result = run_command(_call(["true"], document={"inputs": ["x" * 100] * 5000}))  # far more than a pipe holds
    assert result.ok


def test_long_output_keeps_its_end_only():
    result = run_command(_call([PY, "-c", "print('a' * 500000); print('the end')"]))
    assert result.ok
    assert result.stdout.endswith("the end")
    assert len(result.stdout) < OUTPUT_KEEP + 50 and "bytes before" in result.stdout


def test_no_shell_runs_the_command():
    result = run_command(_call(["echo", "$HOME", ";", "ls"]))
    assert result.stdout == "$HOME ; ls"


# --------------------------------------------------------------------------- the subscriber


def _rules(text: str):
    return parse_rules(text)


def _master(job="j1", rule=None, path="/m/FLAT-R.fits") -> E.MasterWritten:
    return E.MasterWritten(job, Path(path), 5, 1.0, group="R 1x1", rule=rule,
                           inputs=(Path("/c/a.fits"), Path("/c/b.fits")), calibration=("/cal/bias.fits", "none"))


def test_events_become_hook_calls_with_their_facts(tmp_path):
    out = tmp_path / "got.jsonl"
    record = [PY, "-c", f"import sys, os, json; d = json.load(sys.stdin); d['env'] = {{k: v for k, v in "
                        f"os.environ.items() if k.startswith('FLATD_')}}; "
                        f"open({str(out)!r}, 'a').write(json.dumps(d) + '\\n')"]
    rules = _rules(json.dumps({"hooks": {"after_master": [record], "on_failure": [record], "after_batch": [record]}}))
    runner = HookRunner(lambda: rules)
    runner(_master())
    runner(E.InputsMoved("j1", 2, Path("/c/originals")))
    runner(E.JobFailed("G 1x1", "no dark for it", job="j2", files=3, inputs=(Path("/c/g.fits"),)))
    runner(E.JobFailed("G 1x1", "failed before", job="j2", files=3, again=True))  # told already: no hook
    runner(E.BatchDone(Path("/c"), 1, 1, warn=1))
    runner.close()
    docs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [d["event"] for d in docs] == ["after_master", "on_failure", "after_batch"]
    master, failure, batch = docs
    assert master["master"] == "/m/FLAT-R.fits" and master["group"] == "R 1x1" and master["files"] == 5
    assert master["inputs"] == ["/c/a.fits", "/c/b.fits"] and master["calibration"] == ["/cal/bias.fits", "none"]
    assert master["moved_to"] == "/c/originals" and master["status"] == "done"
    assert master["env"]["FLATD_MASTER"] == "/m/FLAT-R.fits" and master["env"]["FLATD_JOB"] == "j1"
    assert master["env"]["FLATD_EVENT"] == "after_master" and master["env"]["FLATD_STATUS"] == "done"
    assert failure["reason"] == "no dark for it" and failure["env"]["FLATD_REASON"] == "no dark for it"
    assert failure["env"]["FLATD_STATUS"] == "failed" and failure["inputs"] == ["/c/g.fits"]
    assert batch["master_paths"] == ["/m/FLAT-R.fits"] and batch["failed_groups"] == ["G 1x1"]
    assert batch["env"]["FLATD_MASTERS"] == "1" and batch["env"]["FLATD_STATUS"] == "failed"
    assert (batch["warn"], batch["bad"]) == (1, 0)
    assert (batch["env"]["FLATD_WARN"], batch["env"]["FLATD_BAD"]) == ("1", "0")


def test_a_master_waits_for_its_verdict_before_its_hook():
    gatherer = Gatherer()
    assert gatherer.add(_master()) == []
    checked = E.MasterChecked("j1", Path("/m/FLAT-R.fits"), "warn", ("noisier than the last one",))
    assert gatherer.add(checked) == []
    done = gatherer.add(E.GroupPlanned("j2", "G", 5))  # the next job: j1 is complete
    assert len(done) == 1 and done[0].verdict == "warn"
    doc = done[0].document()
    assert doc["quality"]["status"] == "warn" and doc["quality"]["reasons"] == ["noisier than the last one"]
    json.dumps(doc)


def test_a_rule_overrides_the_hooks_of_its_masters():
    rules = _rules("""
hooks:
  after_master: [echo base]
  timeout: 30
rules:
  - name: newt
    match: {filter: R}
    hooks: {after_master: ["echo newt"], timeout: 5}
""")
    assert hooks_for(rules, None).after_master == [["echo", "base"]]
    newt = hooks_for(rules, "newt")
    assert newt.after_master == [["echo", "newt"]] and newt.timeout == 5
    assert hooks_for(rules, "other").timeout == 30


def test_a_hook_that_fails_or_hangs_is_logged_and_the_next_one_runs(tmp_path):
    seen = E.ReportSubscriber()
    rules = _rules(json.dumps({"hooks": {"after_batch": [[PY, "-c", "import sys; sys.exit(3)"], ["sleep", "30"],
                                                         ["touch", str(tmp_path / "ran")]], "timeout": 0.5}}))
    runner = HookRunner(lambda: rules)
    with seen:
        began = time.monotonic()
        runner(E.BatchDone(None, 0, 0))
        assert time.monotonic() - began < 0.5  # the emitter never waits
        runner.close()
    kinds = [(ev.kind, ev.data.get("status")) for ev in seen.of(E.Notice)]
    assert kinds == [("hook_failed", 3), ("hook_timeout", None), ("hook_done", None)]
    assert (tmp_path / "ran").exists()


def test_close_with_a_limit_kills_the_running_hook_and_skips_the_rest():
    seen = E.ReportSubscriber()
    rules = _rules(json.dumps({"hooks": {"after_batch": [["sleep", "30"], ["true"]], "timeout": 60}}))
    runner = HookRunner(lambda: rules)
    with seen:
        runner(E.BatchDone(None, 0, 0))
        time.sleep(0.2)
        began = time.monotonic()
        runner.close(0.3)
        assert time.monotonic() - began < 6
    assert [ev.kind for ev in seen.of(E.Notice)] == ["hook_killed", "hook_skipped"]


def test_jsonable_makes_json_of_paths_tuples_and_nan():
    assert jsonable({"p": Path("/x"), "t": (1, float("nan")), "n": None}) == {"p": "/x", "t": [1, None], "n": None}


# --------------------------------------------------------------------------- the rules file


@pytest.mark.parametrize("text, key, words", [
    ("hooks: {timeout: -1}", "hooks.timeout", "negative"),
    ("hooks: {timeout: 1000d}", "hooks.timeout", "less than or equal"),
    ("hooks: {timeout: .inf}", "hooks.timeout", "less than or equal"),
    ("hooks: {timeout: 0}", "hooks.timeout", "greater than 0"),
    ("hooks: {after_master: ['']}", "hooks.after_master[0]", "empty command"),
    ("hooks: {after_master: [[]]}", "hooks.after_master[0]", "empty command"),
    ("hooks: {on_failure: ['echo \"unclosed']}", "hooks.on_failure[0]", "cannot split"),
    ("hooks: {after_batch: [{run: x}]}", "hooks.after_batch[0]", "a command is"),
    ("hooks: {after_batch: [[true]]}", "hooks.after_batch[0]", "a command is"),
    ("hooks: {before_master: [x]}", "hooks.before_master", "unknown key"),
    ("rules: [{match: {filter: R}, hooks: {timeout: -5}}]", "rules[0].hooks.timeout", "negative"),
])
def test_hostile_hooks_are_refused_with_their_key(text, key, words):
    with pytest.raises(ConfigError) as caught:
        parse_rules(text)
    problems = {p.key: p.message for p in caught.value.problems}
    assert key in problems and words in problems[key], problems


def test_a_command_is_a_string_split_without_a_shell_or_a_list():
    rules = parse_rules("hooks: {after_master: [\"rsync -a '/my masters/' nas:/flats\", [cp, '-n', x, y]], "
                        "after_batch: 'echo done'}")
    assert rules.hooks.after_master == [["rsync", "-a", "/my masters/", "nas:/flats"], ["cp", "-n", "x", "y"]]
    assert rules.hooks.after_batch == [["echo", "done"]]
    assert rules.hooks.timeout == 60.0


def test_every_hooks_key_has_a_description_and_a_default():
    from flatd.config import Hooks

    for name, info in Hooks.model_fields.items():
        assert info.description and not info.is_required(), name


def test_a_masters_document_lists_the_flats_its_checks_flagged():
    gatherer = Gatherer()
    flagged = E.FlatRejectedQc(Path("/c/odd.fits"), "odd", 12.0, 8.0, "a cloud", action="leave-out", job="j1")
    gatherer.add(flagged)
    gatherer.add(_master())
    (outcome,) = gatherer.close()
    (flat,) = outcome.document()["flats_rejected"]
    assert flat["path"] == "/c/odd.fits" and flat["check"] == "odd" and flat["reason"] == "a cloud"
