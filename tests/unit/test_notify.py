"""Notifications (flatd.notify.apprise_notify): the message of a batch, its delivery, the rules."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest

from flatd.config import ConfigError, parse_rules
from flatd.notify import events as E
from flatd.notify.apprise_notify import Batch, Notifier, compose, deliver
from flatd.notify.outcome import MasterOutcome


def _written(name="FLAT-R.fits", job="j1", folder=Path("/m"), **kw) -> E.MasterWritten:
    return E.MasterWritten(job, folder / name, 12, 1.0, group="1x1 R -10 °C", **kw)


def _settings(**kw):
    return SETTINGS.model_copy(update=kw)


SETTINGS = parse_rules("notify: {urls: ['json://127.0.0.1:9/']}").notify


# --------------------------------------------------------------------------- the message


def test_a_message_says_what_was_made_and_what_failed_and_why():
    batch = Batch([MasterOutcome(_written())], [E.JobFailed("1x1 G", "no dark or bias of 50x40 in /cal")])
    message = compose(batch, ["master", "failure", "quality"], attach=False, folder=Path("/data/night1"))
    assert message.title == "flatd (night1): 1 master flat made, 1 group failed"
    lines = message.body.splitlines()
    assert lines == ["Failed: group 1x1 G failed: no dark or bias of 50x40 in /cal",
                     "Made FLAT-R.fits from 12 flats (1x1 R -10 °C)"]
    assert message.kind == "failure"


def test_quality_warnings_and_the_verdict_are_told():
    outcome = MasterOutcome(_written(), checked=E.MasterChecked("j1", Path("/m/FLAT-R.fits"), "warn", ("noisy",)))
    message = compose(Batch([outcome]), ["master", "quality"], attach=False)
    assert message.body.splitlines() == ["Made FLAT-R.fits from 12 flats (1x1 R -10 °C); checks warn",
                                         "Quality: FLAT-R.fits: checks warn: noisy"]
    assert message.kind == "warning"


def test_on_chooses_what_is_told_and_nothing_sends_nothing():
    batch = Batch([MasterOutcome(_written())])
    assert compose(batch, ["failure"], attach=False) is None
    assert compose(Batch(), ["master", "failure", "quality"], attach=False) is None


def test_the_preview_is_attached_when_it_is_there(tmp_path):
    master = tmp_path / "FLAT-R.fits"
    master.write_bytes(b"x")
    (tmp_path / "FLAT-R.preview.png").write_bytes(b"png")
    outcome = MasterOutcome(_written(folder=tmp_path))
    assert compose(Batch([outcome]), ["master"], attach=True).attachments == (tmp_path / "FLAT-R.preview.png",)
    assert compose(Batch([outcome]), ["master"], attach=False).attachments == ()
    lone = MasterOutcome(_written("FLAT-G.fits", folder=tmp_path))
    assert compose(Batch([lone]), ["master"], attach=True).attachments == ()


def test_a_long_batch_is_cut_with_a_count():
    batch = Batch([MasterOutcome(_written(f"F{i}.fits", job=f"j{i}")) for i in range(50)])
    lines = compose(batch, ["master"], attach=False).body.splitlines()
    assert len(lines) == 30 and lines[-1] == "… and 21 more (see the log)"


# --------------------------------------------------------------------------- delivery


def test_delivery_retries_with_a_doubling_backoff_then_says_why():
    tries = []

    def send(url, message):
        tries.append(time.monotonic())
        return False, "connection refused"

    reason = deliver("json://x/", None, retries=3, delay=0.05, stop=threading.Event(), send=send)
    assert reason == "connection refused" and len(tries) == 4
    gaps = [b - a for a, b in zip(tries, tries[1:])]
    assert gaps[0] >= 0.04 and gaps[1] >= 0.09 and gaps[2] >= 0.19


def test_delivery_stops_retrying_when_it_works():
    answers = iter([(False, "503"), (True, "")])
    assert deliver("json://x/", None, 5, 0.01, threading.Event(), lambda u, m: next(answers)) is None


def test_a_batch_is_one_message_sent_without_blocking_the_emitter():
    sent, release = [], threading.Event()

    def send(url, message):
        release.wait(5)
        sent.append((url, message))
        return True, ""

    settings = _settings()
    notifier = Notifier(lambda: settings)
    notifier.send = send
    for job in ("j1", "j2", "j3"):
        notifier(_written(f"{job}.fits", job=job))
    notifier(E.JobFailed("G", "too few", job="j4"))
    began = time.monotonic()
    notifier(E.BatchDone(Path("/c"), 3, 1))
    assert time.monotonic() - began < 0.5
    release.set()
    notifier.close(5)
    assert len(sent) == 1
    assert sent[0][1].body.count("Made ") == 3 and "too few" in sent[0][1].body


def test_an_undelivered_message_is_logged_after_its_retries():
    seen = E.ReportSubscriber()
    notifier = Notifier(lambda: _settings(retries=2, retry_delay=0.01))
    notifier.send = lambda url, message: (False, "Connection refused")
    with seen:
        notifier(_written())
        notifier(E.BatchDone(None, 1, 0))
        notifier.close(5)
    failed = [ev for ev in seen.of(E.Notice) if ev.kind == "notify_failed"]
    assert len(failed) == 1
    assert "after 3 attempt(s): Connection refused" in failed[0].message


def test_a_failure_told_before_is_not_told_again():
    sent = []
    notifier = Notifier(lambda: _settings())
    notifier.send = lambda url, message: (sent.append(message), (True, ""))[1]
    notifier(E.JobFailed("G", "failed before", job="j4", again=True))
    notifier(E.BatchDone(None, 0, 1))
    notifier.close(5)
    assert sent == []


# --------------------------------------------------------------------------- the rules file


@pytest.mark.parametrize("text, key, words", [
    ("notify: {urls: 'json://localhost/'}", "notify.urls", "a list of Apprise URLs"),
    ("notify: {urls: ['nonsense://x']}", "notify.urls[0]", "Apprise cannot read this URL"),
    ("notify: {urls: ['json://ok/', 'json://']}", "notify.urls[1]", "Apprise cannot read this URL"),
    ("notify: {urls: [42]}", "notify.urls[0]", "non-empty string"),
    ("notify: {on: [masters]}", "notify.on[0]", "'master', 'failure' or 'quality'"),
    ("notify: {retries: -1}", "notify.retries", "greater than or equal to 0"),
    ("notify: {retries: 1000}", "notify.retries", "less than or equal to 10"),
    ("notify: {retry_delay: -2}", "notify.retry_delay", "negative"),
])
def test_hostile_notify_settings_are_refused_with_their_key(text, key, words):
    with pytest.raises(ConfigError) as caught:
        parse_rules(text)
    problems = {p.key: p.message for p in caught.value.problems}
    assert key in problems and words in problems[key], problems


def test_an_unquoted_on_key_is_read_as_on():
    assert parse_rules("notify:\n  on: [failure]\n").notify.on == ["failure"]


def test_urls_without_apprise_installed_name_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "apprise", None)  # import apprise raises ImportError
    with pytest.raises(ConfigError) as caught:
        parse_rules("notify: {urls: ['json://localhost/']}")
    assert "pip install 'flatd[notify]'" in caught.value.render()
    assert parse_rules("notify: {on: [master]}").notify.urls == []  # no URL: Apprise is not needed


def test_every_notify_key_has_a_description_and_a_default():
    from flatd.config import Notify

    for name, info in Notify.model_fields.items():
        assert info.description and not info.is_required(), name


def test_each_capture_folders_batch_tells_only_its_own_masters():
    """The service's worker may finish the next folder's jobs before the first folder's
    batch_done is emitted: each message keeps to its folder."""
    sent = []
    settings = _settings()
    notifier = Notifier(lambda: settings)
    notifier.send = lambda url, message: (sent.append(message), (True, ""))[1]
    notifier(_written("A.fits", job="a", inputs=(Path("/cap1/n1/f.fits"),)))
    notifier(_written("B.fits", job="b", inputs=(Path("/cap2/n1/f.fits"),)))
    notifier(E.BatchDone(Path("/cap1"), 1, 0))
    notifier(E.BatchDone(Path("/cap2"), 1, 0))
    notifier.close(5)
    assert [m.body for m in sent] == ["Made A.fits from 12 flats (1x1 R -10 °C)",
                                      "Made B.fits from 12 flats (1x1 R -10 °C)"]
    assert [m.title for m in sent] == ["flatd (cap1): 1 master flat made", "flatd (cap2): 1 master flat made"]


def test_flats_the_checks_left_out_are_told_as_quality_a_line_per_group_and_check():
    flats = [E.FlatRejectedQc(Path(f"/c/n1/flat_{i}.fits"), "level", 0.05, 0.15,
                              "level 0.05 of full scale, below quality.min_level 0.15", job="j1", group="1x1 R")
             for i in range(3)]
    message = compose(Batch(flats=flats), ["quality"], attach=False)
    assert message.body == ("Quality: 3 flat(s) of 1x1 R left out: flat_0.fits: level 0.05 of full scale, "
                            "below quality.min_level 0.15")
    assert message.kind == "warning"
    assert compose(Batch(flats=flats), ["master", "failure"], attach=False) is None
