"""`flatd watch` runs hooks and sends notifications, and reads them again at SIGHUP."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

from watchkit import rules_text, wait_until, write_flat, write_rules

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from receiver import Receiver  # noqa: E402

RECORD = ("import json, os, sys; d = json.load(sys.stdin); d['tag'] = {tag!r}; "
          "open({out!r}, 'a').write(json.dumps(d) + chr(10))")


def _hooks(out: Path, tag: str) -> str:
    command = [sys.executable, "-c", RECORD.format(tag=tag, out=str(out))]
    return json.dumps({"after_master": [command], "after_batch": [command], "timeout": 30})


def _calls(out: Path) -> list[dict]:
    return [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []


def test_watch_runs_hooks_notifies_once_per_batch_and_reloads_them(tmp_path, watches):
    cap = tmp_path / "cap"
    out = tmp_path / "hooks.jsonl"
    with Receiver() as receiver:
        notify = json.dumps({"urls": [f"json://127.0.0.1:{receiver.port}/"], "retry_delay": 0.1})
        config = write_rules(tmp_path, rescan="1h", hooks=_hooks(out, "first"), notify=notify)
        w = watches(config).started()
        for i in range(3):
            write_flat(cap / "n1" / f"flat_{i}.fits", seed=i)
        calls = wait_until(lambda: len(_calls(out)) >= 2 and _calls(out), what="the first batch's hooks")
        assert [(c["event"], c["tag"]) for c in calls] == [("after_master", "first"), ("after_batch", "first")]
        assert Path(calls[0]["master"]).is_file() and calls[1]["master_paths"] == [calls[0]["master"]]
        wait_until(lambda: receiver.posts, what="the first batch's notification")
        assert "Made " + Path(calls[0]["master"]).name in receiver.posts[0].json()["message"]

        config.write_text(rules_text(tmp_path, rescan="1h", hooks=_hooks(out, "second"), notify=notify))
        w.signal(signal.SIGHUP)
        w.wait_event("rules_reloaded")
        for i in range(3):
            write_flat(cap / "n2" / f"flat_{i}.fits", seed=10 + i, filt="G")
        calls = wait_until(lambda: len(_calls(out)) >= 4 and _calls(out), what="the second batch's hooks")
        assert [c["tag"] for c in calls[2:]] == ["second", "second"]
        wait_until(lambda: len(receiver.posts) >= 2, what="the second batch's notification")
        assert w.stop() == 0
    assert len(receiver.posts) == 2, "one message per batch"
    assert not [e for e in w.events() if e["event"] in ("hook_failed", "hook_timeout", "notify_failed")]
