"""`flatd run-once` with hooks: one that succeeds, one that fails, one that hangs past its
limit and one that reads the JSON. The jobs' outcome is the same in every case."""

from __future__ import annotations

import json
import sys
import time

import pytest

from flatd.cli import main
from flatd.ledger import DONE, Ledger
from flatd.notify import events as E

PY = sys.executable

RULES = """
capture:
  - path: {root}/captures
grouping: {{min_group_size: 3}}
precalibration: {{mode: auto, library: {root}/calib}}
combine: {{method: sigma, sigma: 3.0}}
stable: 0
state: {root}/state
"""

# the document and the FLATD_ variables, one JSON line per call, in {out}
RECORD = ("import json, os, sys; d = {{'doc': json.load(sys.stdin), 'env': {{k: v for k, v in os.environ.items() "
          "if k.startswith('FLATD_')}}}}; open({out!r}, 'a').write(json.dumps(d) + chr(10))")

HOOKS = {
    "none": None,
    "succeeds": ([["true"]], "hook_done"),
    "fails": ([[PY, "-c", "import sys; print('rsync: connection refused', file=sys.stderr); sys.exit(3)"]],
              "hook_failed"),
    "hangs": ([["sleep", "60"]], "hook_timeout"),
    "reads-json": ([[PY, "-c", RECORD]], "hook_done"),
}


def _session(tree, hooks=None, filters=("R", "G"), n=5):
    for f in filters:
        for i in range(n):
            tree.flat(f"flat_{f}_{i:03d}.fits", level=20000 * (1 + 0.03 * i), filt=f)
    for i in range(2):
        tree.bias(f"bias_{i}.fits")
    text = RULES.format(root=tree.root)
    if hooks is not None:
        text += "hooks: " + json.dumps(hooks) + "\n"
    return tree.rules(text)


def _run(config) -> tuple[int, E.ReportSubscriber]:
    with E.ReportSubscriber() as seen:
        code = main(["run-once", "--config", str(config)])
    return code, seen


def _outcome(root, code) -> dict:
    """What the run did: its exit code, the masters' names, the inputs left and moved, the jobs' states."""
    night = root / "captures" / "night1"
    return {"code": code,
            "masters": sorted(p.name for p in (root / "captures" / "masters").glob("*.fits")),
            "left": sorted(p.name for p in night.glob("flat_*.fits")),
            "moved": sorted(p.name for p in night.glob("originals-*/flat_*.fits")),
            "jobs": sorted(j.state for j in Ledger.open_readonly(root / "state").jobs())}


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """The outcome of the same session without hooks."""
    import numpy as np
    from fitstree import Tree

    tree = Tree(tmp_path_factory.mktemp("baseline"), np.random.default_rng(7))
    code, _ = _run(_session(tree))
    return _outcome(tree.root, code)


@pytest.mark.parametrize("case", [c for c in HOOKS if c != "none"])
def test_the_outcome_is_the_same_whatever_the_hook_does(tree, case, baseline, capsys):
    commands, logged = HOOKS[case]
    out = tree.root / "hook.jsonl"
    commands = [[a.format(out=str(out)) if a is RECORD else a for a in c] for c in commands]
    config = _session(tree, {"after_master": commands, "timeout": 1})
    began = time.monotonic()
    code, seen = _run(config)
    assert time.monotonic() - began < 30
    assert _outcome(tree.root, code) == baseline
    assert baseline["code"] == 0 and len(baseline["masters"]) == 2 and baseline["jobs"] == [DONE, DONE]
    notices = [ev for ev in seen.of(E.Notice) if ev.kind.startswith("hook_")]
    assert [ev.kind for ev in notices] == [logged, logged], "one line per master's hook"
    err = capsys.readouterr().err
    if case == "fails":
        assert notices[0].data["status"] == 3
        assert "exited with status 3" in err and "rsync: connection refused" in err
    if case == "hangs":
        assert "ran past hooks.timeout (1 s) and was killed" in err


def test_a_hook_reads_the_json_document_of_each_master(tree, capsys):
    out = tree.root / "hook.jsonl"
    record = [PY, "-c", RECORD.format(out=str(out))]
    config = _session(tree, {"after_master": [record], "after_batch": [record]})
    assert main(["run-once", "--config", str(config)]) == 0
    calls = [json.loads(line) for line in out.read_text().splitlines()]
    assert [c["doc"]["event"] for c in calls] == ["after_master", "after_master", "after_batch"]
    masters = sorted((tree.root / "captures" / "masters").glob("*.fits"))
    for call in calls[:2]:
        doc, env = call["doc"], call["env"]
        master = tree.root / "captures" / "masters" / doc["master"].rsplit("/", 1)[-1]
        assert master in masters and env["FLATD_MASTER"] == doc["master"]
        assert doc["status"] == "done" and env["FLATD_STATUS"] == "done" and env["FLATD_EVENT"] == "after_master"
        assert doc["files"] == 5 and len(doc["inputs"]) == 5 and env["FLATD_FILES"] == "5"
        assert all("/captures/night1/flat_" in p for p in doc["inputs"])
        assert all(c.endswith("bias_0.fits") or c.endswith("bias_1.fits") for c in doc["calibration"])
        assert doc["group"] == env["FLATD_GROUP"] and "filter" in doc["group"]
        assert doc["job"] == env["FLATD_JOB"]
        assert doc["moved_to"] and "/originals-" in doc["moved_to"]
        assert doc["previews"] and doc["previews"][0].endswith(".preview.png") and env["FLATD_PREVIEW"]
        if doc["quality"] is not None:  # the master checks' verdict (flatd.qc)
            assert doc["quality"]["status"] == env["FLATD_QC"]
    batch = calls[2]
    assert batch["doc"]["masters"] == 2 and batch["doc"]["failed"] == 0 and batch["env"]["FLATD_STATUS"] == "ok"
    assert sorted(batch["doc"]["master_paths"]) == [str(m) for m in masters]


def test_failure_and_batch_hooks_and_a_rules_own_hooks(tree, capsys):
    out = tree.root / "hook.jsonl"
    record = [PY, "-c", RECORD.format(out=str(out))]
    config = _session(tree, {"after_master": [record], "on_failure": [record], "after_batch": [record]},
                      filters=("R",), n=3)
    for i in range(5):
        tree.flat(f"flat_G_{i:03d}.fits", filt="G")
    text = config.read_text().replace("method: sigma, sigma: 3.0", "method: minmax, minmax: 2")
    config.write_text(text + "rules:\n  - name: green\n    match: {filter: G}\n    hooks: {after_master: [[true]]}\n"
                      .replace("[[true]]", json.dumps([["touch", str(tree.root / "green-hook")]])))
    assert main(["run-once", "--config", str(config)]) == 1
    calls = [json.loads(line) for line in out.read_text().splitlines()]
    assert [c["doc"]["event"] for c in calls] == ["on_failure", "after_batch"]  # G's master: the rule's hook
    failure = calls[0]
    assert "needs at least 5 frames" in failure["doc"]["reason"] and failure["env"]["FLATD_STATUS"] == "failed"
    assert "filter R" in failure["env"]["FLATD_GROUP"] and len(failure["doc"]["inputs"]) == 3
    assert calls[1]["env"]["FLATD_STATUS"] == "failed" and calls[1]["doc"]["failed_groups"] == [failure["doc"]["group"]]
    assert (tree.root / "green-hook").exists()
