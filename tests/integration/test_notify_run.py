"""`flatd run-once` with notifications, delivered to a real HTTP receiver on loopback (Apprise's
json:// and form:// targets); a receiver that is down changes nothing for the jobs."""

from __future__ import annotations

import time

from flatd.cli import main
from flatd.ledger import DONE, Ledger
from flatd.notify import events as E

from receiver import Receiver, closed_port

PNG = b"\x89PNG\r\n\x1a\n"

RULES = """
capture:
  - path: {root}/captures
grouping: {{min_group_size: 3}}
precalibration: {{mode: auto, library: {root}/calib}}
combine: {{method: sigma, sigma: 3.0}}
stable: 0
state: {root}/state
notify:
  urls: ["{url}"]
  on: [master, failure, quality]
  retries: 2
  retry_delay: 0.05
"""


def _session(tree, url, filters=("R", "G"), n=5):
    for f in filters:
        for i in range(n):
            tree.flat(f"flat_{f}_{i:03d}.fits", level=20000 * (1 + 0.03 * i), filt=f)
    for i in range(2):
        tree.bias(f"bias_{i}.fits")
    return tree.rules(RULES.format(root=tree.root, url=url))


def _masters(root):
    return sorted((root / "captures" / "masters").glob("*.fits"))


def _run(config) -> tuple[int, E.ReportSubscriber]:
    with E.ReportSubscriber() as seen:
        code = main(["run-once", "--config", str(config)])
    return code, seen


def _notices(seen, kind):
    return [ev for ev in seen.of(E.Notice) if ev.kind == kind]


def test_one_json_message_per_batch_with_every_master_and_its_preview(tree, capsys):
    with Receiver() as receiver:
        config = _session(tree, f"json://127.0.0.1:{receiver.port}/flatd")
        code, seen = _run(config)
    assert code == 0
    masters = _masters(tree.root)
    assert len(masters) == 2
    assert len(receiver.posts) == 1, "one message for the batch, not one per master"
    post = receiver.posts[0]
    assert post.path == "/flatd"
    payload = post.json()
    assert payload["title"] == "flatd: 2 master flats made"
    assert payload["type"] == "success"
    for master in masters:
        assert f"Made {master.name} from 5 flats" in payload["message"]
    attached = dict(post.attachments())
    assert sorted(attached) == sorted(m.name.replace(".fits", ".preview.png") for m in masters)
    assert all(data.startswith(PNG) for data in attached.values())
    for master in masters:
        assert attached[master.name.replace(".fits", ".preview.png")] == \
            master.with_name(master.name.replace(".fits", ".preview.png")).read_bytes()
    assert len(_notices(seen, "notified")) == 1


def test_a_form_message_carries_the_text_and_the_preview_as_multipart(tree, capsys):
    with Receiver() as receiver:
        config = _session(tree, f"form://127.0.0.1:{receiver.port}/hook", filters=("R",))
        code, _ = _run(config)
    assert code == 0
    (post,) = receiver.posts
    assert post.content_type.startswith("multipart/form-data")
    fields, files = post.form()
    (master,) = _masters(tree.root)
    assert f"Made {master.name} from 5 flats" in fields["message"]
    (name, data), = files.values()
    assert name == master.name.replace(".fits", ".preview.png") and data.startswith(PNG)


def test_a_failed_group_is_told_with_its_reason(tree, capsys):
    with Receiver() as receiver:
        config = _session(tree, f"json://127.0.0.1:{receiver.port}/", filters=("R",), n=3)
        for i in range(5):
            tree.flat(f"flat_G_{i:03d}.fits", filt="G")
        config.write_text(config.read_text().replace("method: sigma, sigma: 3.0", "method: minmax, minmax: 2"))
        code, _ = _run(config)
    assert code == 1
    payload = receiver.posts[0].json()
    assert payload["type"] == "failure"
    assert payload["title"] == "flatd: 1 master flat made, 1 group failed"
    first = payload["message"].splitlines()[0]
    assert first.startswith("Failed: group ") and "needs at least 5 frames" in first


def test_a_receiver_that_is_down_changes_nothing_for_the_jobs(tree, capsys):
    config = _session(tree, f"json://127.0.0.1:{closed_port()}/")
    began = time.monotonic()
    code, seen = _run(config)
    assert time.monotonic() - began < 30
    assert code == 0
    assert len(_masters(tree.root)) == 2
    night = tree.root / "captures" / "night1"
    assert not list(night.glob("flat_*.fits")) and len(list(night.glob("originals-*/flat_*.fits"))) == 10
    assert {j.state for j in Ledger.open_readonly(tree.root / "state").jobs()} == {DONE}
    (failed,) = _notices(seen, "notify_failed")
    assert "after 3 attempt(s)" in failed.message and "127.0.0.1" in failed.message
    assert "not delivered after 3 attempt(s)" in capsys.readouterr().err  # in the log
