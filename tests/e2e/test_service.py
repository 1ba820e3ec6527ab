"""`flatd watch` end to end: a real subprocess, real file-system events, real signals.

Every wait is a bounded polling loop with a generous timeout; nothing asserts a
duration. Timing knobs are small (stable 1 s, settle 2-3 s) so the file runs quickly.
"""

from __future__ import annotations

import signal
import sqlite3
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from watchkit import (TIMEOUT, files_under, flat_bytes, rules_text, run_flatd, sha256, temp_files, wait_until,
                      write_flat, write_rules)

pytestmark = pytest.mark.timeout(300)


def masters_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.fits") if not p.name.startswith("."))


def under(path: str, folder: Path) -> bool:
    return Path(path) == folder or folder in Path(path).parents


# --------------------------------------------------------------------------- ready files


def test_a_slowly_written_flat_is_read_only_when_complete(tmp_path, watches):
    cap = tmp_path / "cap"
    night = cap / "night1"
    night.mkdir(parents=True)
    # flats this dark (1000-2000 ADU) would be left out by the flat checks (quality.min_level)
    config = write_rules(tmp_path, grouping="{min_group_size: 5}", precalibration="{mode: none}",
                         combine="{method: mean, normalize: none}", rescan="1h", quality="{enabled: false}")
    w = watches(config).started()
    shape = (200, 300)
    for i in range(4):
        write_flat(night / f"flat_{i}.fits", value=1000, shape=shape)
    slow = night / "flat_slow.fits"
    data = flat_bytes(value=2000, shape=shape)
    header, body = data[:2880], data[2880:]
    pieces = [body[i:i + len(body) // 6 + 1] for i in range(0, len(body), len(body) // 6 + 1)]
    with open(slow, "wb") as handle:
        handle.write(header)
        handle.flush()
        for k, piece in enumerate(pieces):
            # Pauses shorter and (once) longer than `stable`: a truncated file that stands
            # still is "not ready yet", never a frame.
            time.sleep(1.6 if k == 2 else 0.5)
            assert all(e["path"] != str(slow) for e in w.events("frame_ready")), \
                "the growing file was taken for a frame before it was complete"
            handle.write(piece)
            handle.flush()
    assert slow.read_bytes() == data
    w.wait_event("master_written")
    [master] = masters_in(cap / "masters")
    with fits.open(master) as hdul:
        assert hdul[0].header["NCOMBINE"] == 5
        image = hdul[0].data
    # mean of four flats at 1000 and the complete slow one at 2000
    assert np.allclose(image, 1200.0)
    ready = [e for e in w.events("frame_ready") if e["path"] == str(slow)]
    assert len(ready) == 1 and ready[0]["bytes"] == len(data)
    assert w.stop() == 0


def test_bursts_with_pauses_shorter_than_settle_make_one_master_per_group_once(tmp_path, watches):
    cap = tmp_path / "cap"
    night = cap / "night1"
    night.mkdir(parents=True)
    config = write_rules(tmp_path, settle="3s", rescan="1h")
    w = watches(config).started()
    inputs = {}
    for burst in range(3):
        for filt in ("R", "G"):
            for i in range(2):
                path = write_flat(night / f"flat_{filt}_{burst}{i}.fits", filt=filt, seed=burst * 10 + i,
                                  value=20000 + 300 * i)
                inputs[path.name] = sha256(path)
        time.sleep(0.8)
    w.wait_event("master_written", count=2)
    wait_until(lambda: not list(night.glob("flat_*.fits")), what="inputs moved")
    time.sleep(4.0)  # longer than settle + stable: anything left to do would be done by now
    masters = masters_in(cap / "masters")
    assert len(masters) == 2
    headers = [fits.getheader(m) for m in masters]
    assert sorted(h["FILTER"] for h in headers) == ["G", "R"]
    assert all(h["NCOMBINE"] == 6 for h in headers)
    assert len(w.events("master_written")) == 2 and len(w.events("group_planned")) == 2
    moved = files_under(night, "flat_*.fits")
    assert sorted(p.name for p in moved) == sorted(inputs)
    assert {p.name: sha256(p) for p in moved} == inputs
    assert w.stop() == 0


def test_forced_polling_observer(tmp_path, watches):
    cap = tmp_path / "cap"
    cap.mkdir()
    config = write_rules(tmp_path, capture=f"\n  - path: {cap}\n    poll: true", rescan="1h")
    w = watches(config).started()
    [watching] = w.events("watching")
    assert watching["mode"] == "polling"
    for i in range(2):
        write_flat(cap / "night2" / f"flat_{i}.fits", seed=i)  # a folder made after the start
    # written under a temporary name, then renamed into place
    part = write_flat(cap / "night2" / "flat_2.fits.part", seed=2)
    part.rename(cap / "night2" / "flat_2.fits")
    w.wait_event("master_written")
    assert len(masters_in(cap / "masters")) == 1
    assert sorted(Path(e["path"]).name for e in w.events("frame_ready")) == ["flat_0.fits", "flat_1.fits",
                                                                             "flat_2.fits"]
    assert w.stop() == 0


# In a user namespace of its own, flatd can be given no inotify instance at all
# (/proc/sys/user/max_inotify_instances, the per-namespace form of the sysctl).
NO_INOTIFY = ["unshare", "--user", "--map-root-user", "sh", "-c",
              'echo 0 > /proc/sys/user/max_inotify_instances && exec "$@"', "sh"]


def _can_limit_inotify() -> bool:
    import shutil
    import subprocess

    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(NO_INOTIFY + ["true"], capture_output=True, timeout=30)
    return probe.returncode == 0


def test_the_inotify_limit_is_reported_and_the_folder_is_polled(tmp_path, watches):
    if not _can_limit_inotify():
        pytest.skip("no unprivileged user namespaces here to lower the inotify limit")
    cap = tmp_path / "cap"
    cap.mkdir()
    config = write_rules(tmp_path, rescan="1h")
    w = watches(config, prefix=NO_INOTIFY).started()
    [limit] = w.events("watch_limit")
    assert "fs.inotify.max_user_instances" in limit["message"] and str(cap) in limit["message"]
    [watching] = w.events("watching")
    assert watching["mode"] == "polling"
    for i in range(3):
        write_flat(cap / "night1" / f"flat_{i}.fits", seed=i)
    w.wait_event("master_written")
    assert w.stop() == 0


# --------------------------------------------------------------------------- crash safety


def test_kill_9_while_combining_then_restart(tmp_path, watches):
    """kill -9 at several moments of a run; each start finishes or redoes the job."""
    kill_9_rounds(tmp_path, watches, "{memory_limit: 9MiB, workers: 1}")


def kill_9_rounds(tmp_path, watches, engine: str) -> None:
    """The kill -9 rounds with `engine` (the rules' engine section; tests/e2e/test_dask_service.py
    runs them with the Dask engine)."""
    cap = tmp_path / "cap"
    night = cap / "night1"
    night.mkdir(parents=True)
    # Big enough frames and a tiny memory limit: the stack runs in many bands.
    config = write_rules(tmp_path, engine=engine, grouping="{min_group_size: 3}")
    inputs = {}
    for filt in ("R", "G"):
        for i in range(8):
            path = write_flat(night / f"flat_{filt}_{i}.fits", filt=filt, shape=(1000, 1000), seed=i,
                              value=20000 + 200 * i)
            inputs[path.name] = sha256(path)
    masters_dir = cap / "masters"

    def done() -> bool:
        return len(masters_in(masters_dir)) >= 2 and not list(night.glob("flat_*.fits"))

    # Kill points, each a log event (the n-th of the round) and a delay after it: while
    # stacking, right after a master is written (moves under way), between two jobs...
    points = [("group_planned", 1, 0.05), ("master_written", 1, 0.0), ("inputs_moved", 1, 0.0),
              ("group_planned", 2, 0.02), ("master_written", 1, 0.003), ("group_planned", 1, 0.15)]
    kills = []
    for round_, (name, nth, delay) in enumerate(points):
        if done():
            break
        w = watches(config, name=f"round{round_}")
        wait_until(lambda: done() or len(w.events(name)) >= nth, interval=0.003, what=f"{name} #{nth}")
        if done():
            w.kill()
            break
        time.sleep(delay)
        w.kill()  # SIGKILL: no handler runs
        kills.append(f"{name}#{nth}+{delay}s")
    final = watches(config, name="final").started()
    wait_until(done, what="every group done after the restarts")
    started = time.monotonic()
    assert final.stop() == 0
    print(f"\nkill -9 at: {', '.join(kills)}; SIGTERM exit after {time.monotonic() - started:.2f} s")

    masters = masters_in(masters_dir)
    assert len(masters) == 2, [m.name for m in masters]
    headers = [fits.getheader(m) for m in masters]
    assert sorted(h["FILTER"] for h in headers) == ["G", "R"]
    assert all(h["NCOMBINE"] == 8 for h in headers)
    found = [p for p in files_under(cap, "flat_*.fits")]
    assert sorted(p.name for p in found) == sorted(inputs), "every input exactly once"
    assert {p.name: sha256(p) for p in found} == inputs, "inputs byte-identical"
    assert temp_files(cap) == []

    from flatd.ledger import Ledger, UNFINISHED
    ledger = Ledger.open_readonly(tmp_path / "state")
    try:
        assert ledger.jobs(UNFINISHED) == []
        assert len(ledger.jobs(["done"])) == 2
    finally:
        ledger.close()


# --------------------------------------------------------------------------- signals


def test_sighup_reloads_valid_rules_and_keeps_the_old_ones_when_invalid(tmp_path, watches):
    cap, cap2 = tmp_path / "cap", tmp_path / "cap2"
    cap.mkdir()
    cap2.mkdir()
    config = write_rules(tmp_path, rescan="1h")
    w = watches(config).started()

    config.write_text(rules_text(tmp_path, rescan="1h", combine="{method: bogus}", colour="blue"))
    w.signal(signal.SIGHUP)
    [failed] = w.wait_event("reload_failed")
    assert "combine.method" in failed["message"] and "colour" in failed["message"]
    assert failed["level"] == "error"
    # The old rules stay in force.
    for i in range(3):
        write_flat(cap / "n1" / f"flat_{i}.fits", seed=i)
    w.wait_event("master_written")
    [first] = masters_in(cap / "masters")
    assert fits.getheader(first)["COMBMETH"].lower().startswith("sigma")

    config.write_text(rules_text(tmp_path, captures=("cap", "cap2"), rescan="1h", combine="{method: median}"))
    w.signal(signal.SIGHUP)
    w.wait_event("rules_reloaded")
    w.wait_event("watching", where=lambda e: e["folder"] == str(cap2))
    for i in range(3):
        write_flat(cap2 / "n1" / f"flat_{i}.fits", seed=10 + i)
    w.wait_event("master_written", count=2)
    [second] = masters_in(cap2 / "masters")
    assert fits.getheader(second)["COMBMETH"].lower().startswith("median")
    assert w.proc.poll() is None
    assert w.stop() == 0


def test_masters_and_moved_inputs_inside_the_watched_folder_are_never_ingested(tmp_path, watches):
    cap = tmp_path / "cap"
    night = cap / "night1"
    night.mkdir(parents=True)
    out = cap / "out" / "masters"
    state = cap / "state"
    config = write_rules(tmp_path, output=f"{{directory: {out}}}", inputs='{move_to: "originals-{date}", ignore_type: true}',
                         grouping="{min_group_size: 1, filter: false}", state=str(state), rescan="1s")
    w = watches(config).started()
    for i in range(3):
        write_flat(night / f"flat_{i}.fits", seed=i)
    w.wait_event("master_written")
    wait_until(lambda: not list(night.glob("flat_*.fits")), what="inputs moved")
    time.sleep(4.0)  # several rescans (every 1 s) and settle periods
    assert len(masters_in(out)) == 1
    assert len(w.events("group_planned")) == 1
    for e in w.events("frame_ready"):
        assert night in Path(e["path"]).parents and "originals-" not in e["path"], e["path"]
    assert len(w.events("frame_ready")) == 3
    assert w.stop() == 0


def test_a_second_flatd_on_the_same_state_is_refused(tmp_path, watches):
    (tmp_path / "cap").mkdir()
    config = write_rules(tmp_path)
    w = watches(config).started()
    second = run_flatd("watch", "--config", str(config))
    assert second.returncode == 2
    assert "another flatd" in second.stderr and str(w.pid) in second.stderr
    once = run_flatd("run-once", "--config", str(config))
    assert once.returncode == 2 and "another flatd" in once.stderr
    assert w.proc.poll() is None
    assert w.stop() == 0


def test_status_while_watch_runs(tmp_path, watches):
    cap = tmp_path / "cap"
    bad = cap / "bad"
    rules = dict(settle="10m", rescan="1h",
                 rules=f'\n  - match: {{path: "{bad}/**"}}\n    precalibration: {{mode: pedestal, pedestal: 60000}}'
                       '\n    quality: {enabled: false}')  # the flat checks would fail it first (level 0)
    config = write_rules(tmp_path, **rules)
    # A failed group first, from run-once on the same ledger: after a pedestal above the
    # flats' level nothing is left to normalize.
    for i in range(3):
        write_flat(bad / f"flat_{i}.fits", seed=i)
    wait_until(lambda: time.time() - max(p.stat().st_mtime for p in bad.iterdir()) > 1.2, what="stable")
    once = run_flatd("run-once", "--config", str(config))
    assert once.returncode == 1, once.stdout + once.stderr
    w = watches(config).started()
    for i in range(3):
        write_flat(cap / "night1" / f"flat_{i}.fits", seed=i)
    w.wait_event("frame_ready", count=6)  # the three good flats and the three of the failed group
    status = run_flatd("status", "--config", str(config))
    assert status.returncode == 0, status.stderr
    text = status.stdout
    assert "running" in text and str(w.pid) in text
    assert f"{cap}: 6 flat(s) waiting" in text
    assert "settles in" in text
    assert "Failed groups" in text and "normalize" in text and "flatd retry" in text
    assert w.stop() == 0
    stopped = run_flatd("status", "--config", str(config))
    assert "not running" in stopped.stdout


# --------------------------------------------------------------------------- stopping mid-job (in process)


def test_stop_abandons_a_long_job_at_a_band_and_rolls_it_back(tmp_path, monkeypatch):
    """SIGTERM's path without the signal: a job still stacking after the grace period is
    cut short at its next band, rolled back, and the inputs stay as they were."""
    import flatd.service as service_module
    import flatd.stack.engines.local as stacker
    from flatd.config import load_rules
    from flatd.ledger import Ledger

    cap = tmp_path / "cap"
    night = cap / "night1"
    inputs = {}
    for i in range(3):
        path = write_flat(night / f"flat_{i}.fits", seed=i)
        inputs[path.name] = sha256(path)
    config = write_rules(tmp_path, settle="0s", stable="0.5s", rescan="1h")
    real = stacker.stack_frames
    bands = []

    def slow_stack(inputs_, method, normalize, memory_limit, workers, progress, **options):
        for band in range(600):  # a minute of "stacking" unless cut short
            time.sleep(0.1)
            bands.append(band)
            progress(band + 1, 600)
        return real(inputs_, method, normalize, memory_limit, workers, progress, **options)

    monkeypatch.setattr(stacker, "stack_frames", slow_stack)
    monkeypatch.setattr(service_module, "STOP_GRACE", 0.5)
    service = service_module.Service(config, load_rules(config))
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("rc", service.run()), daemon=True)
    thread.start()
    wait_until(lambda: len(bands) > 3, what="the job to be stacking")
    service.request_stop()
    thread.join(TIMEOUT)
    assert not thread.is_alive()
    assert result["rc"] == 0
    assert len(bands) < 600
    assert service.abandoned
    ledger = Ledger.open_readonly(tmp_path / "state")
    try:
        assert ledger.jobs() == []  # rolled back: redone at the next start
    finally:
        ledger.close()
    assert {p.name: sha256(p) for p in night.glob("flat_*.fits")} == inputs
    assert masters_in(cap / "masters") == []
    assert temp_files(cap) == []


class InProcess:
    """Service.run() in a thread of the test process (no signals: request_stop())."""

    def __init__(self, config: Path):
        from flatd.config import load_rules
        from flatd.service import Service

        self.service = Service(config, load_rules(config))
        self.result: dict = {}
        self.thread = threading.Thread(target=lambda: self.result.setdefault("rc", self.service.run()), daemon=True)
        self.thread.start()

    def stop(self) -> int:
        self.service.request_stop()
        self.thread.join(TIMEOUT)
        assert not self.thread.is_alive()
        return self.result["rc"]


def _waiting(state: Path) -> int:
    from flatd.ledger import Ledger

    ledger = Ledger.open_readonly(state)
    if ledger is None:
        return 0
    try:
        return len(ledger.waiting_frames())
    except sqlite3.OperationalError:  # the service is still creating the tables
        return 0
    finally:
        ledger.close()


def test_a_scheduled_sweep_processes_folders_before_they_settle(tmp_path):
    cap = tmp_path / "cap"
    config = write_rules(tmp_path, settle="1h", stable="0.5s", rescan="1h", schedule='"0 9 * * *"')
    for i in range(3):
        write_flat(cap / "night1" / f"flat_{i}.fits", seed=i)
    running = InProcess(config)
    try:
        wait_until(lambda: _waiting(tmp_path / "state") == 3, what="three flats waiting")
        wait_until(lambda: running.service.scheduler is not None, what="the scheduler")
        job = running.service.scheduler.get_job("sweep")
        assert "hour='9'" in str(job.trigger) and "minute='0'" in str(job.trigger)
        assert masters_in(cap / "masters") == []  # an hour of settle to go
        job.func()  # what the scheduler thread does at 09:00: only asks the main loop
        wait_until(lambda: len(masters_in(cap / "masters")) == 1, what="the sweep's master")
    finally:
        assert running.stop() == 0


def test_a_capture_folder_that_appears_later_is_watched(tmp_path):
    cap = tmp_path / "cap"
    config = write_rules(tmp_path, stable="0.5s", settle="1s", rescan="0.5s")
    running = InProcess(config)
    try:
        wait_until(lambda: running.service.missing == {cap}, what="the folder noted missing")
        cap.mkdir()
        wait_until(lambda: cap in running.service.watches, what="the folder watched")
        for i in range(3):
            write_flat(cap / "night1" / f"flat_{i}.fits", seed=i)
        wait_until(lambda: len(masters_in(cap / "masters")) == 1, what="a master")
    finally:
        assert running.stop() == 0


def test_a_group_too_small_waits_in_place_for_more_flats(tmp_path):
    import json

    from flatd.ledger import Ledger

    cap = tmp_path / "cap"
    night = cap / "night1"
    night.mkdir(parents=True)
    config = write_rules(tmp_path, stable="0.5s", settle="1s", rescan="1h")
    running = InProcess(config)
    try:
        wait_until(lambda: cap in running.service.watches, what="start-up")
        for i in range(2):
            write_flat(night / f"flat_{i}.fits", seed=i)

        def notes():
            ledger = Ledger.open_readonly(tmp_path / "state")
            if ledger is None:
                return None
            try:
                rows = [r for r in ledger.folders() if r["notes"]]
                return json.loads(rows[0]["notes"]) if rows else None
            except sqlite3.OperationalError:  # the service is still creating the tables
                return None
            finally:
                ledger.close()

        reported = wait_until(notes, what="the batch's report")
        assert any("min_group_size" in item["reason"] and item["files"] == 2 for item in reported["left_out"])
        assert sorted(p.name for p in night.glob("flat_*.fits")) == ["flat_0.fits", "flat_1.fits"]
        write_flat(night / "flat_2.fits", seed=2)
        wait_until(lambda: len(masters_in(cap / "masters")) == 1, what="a master once the third flat came")
        assert fits.getheader(masters_in(cap / "masters")[0])["NCOMBINE"] == 3
    finally:
        assert running.stop() == 0


def test_a_restart_does_not_read_the_lights_again(tmp_path, monkeypatch):
    """Months of lights in a capture folder: their verdict is kept in the ledger, so a
    restart reads only files it has not judged, unless the rules changed."""
    import flatd.ingest.frames

    cap = tmp_path / "cap"
    for i in range(4):
        write_flat(cap / "night1" / f"light_{i}.fits", seed=i, imagetyp="LIGHT")
    config = write_rules(tmp_path, stable="0.2s", settle="1h", rescan="1h")
    reads: list[str] = []
    real_read = flatd.ingest.frames.read_frame
    monkeypatch.setattr(flatd.ingest.frames, "read_frame", lambda path, *a, **k: reads.append(Path(path).name) or real_read(path, *a, **k))

    def judged(n):
        from flatd.ledger import Ledger

        ledger = Ledger.open_readonly(tmp_path / "state")
        try:
            return ledger is not None and len(ledger.db.execute("SELECT path FROM seen").fetchall()) == n
        except sqlite3.OperationalError:
            return False
        finally:
            if ledger is not None:
                ledger.close()

    running = InProcess(config)
    try:
        wait_until(lambda: judged(4), what="four lights judged")
    finally:
        assert running.stop() == 0
    assert sorted(reads) == [f"light_{i}.fits" for i in range(4)]
    reads.clear()
    write_flat(cap / "night1" / "flat_new.fits", seed=9)
    running = InProcess(config)
    try:
        wait_until(lambda: _waiting(tmp_path / "state") == 1, what="the new flat")
    finally:
        assert running.stop() == 0
    assert reads == ["flat_new.fits"]


# --------------------------------------------------------------------------- one discovery, one header read


def test_a_batch_reuses_the_frames_the_watcher_read(tmp_path, monkeypatch):
    """Between its arrival and its master, each flat's header is read once (by the
    intake, when it stood still); the batch walks no folder and reads no header again."""
    from collections import Counter

    import flatd.ingest.discover as discover
    import flatd.ingest.frames as frames
    import flatd.runner as runner

    reads: Counter = Counter()
    real_read = frames.read_frame

    def counting_read(path, *args, **kwargs):
        reads[Path(path).name] += 1
        return real_read(path, *args, **kwargs)

    scans = []
    real_scan = runner.scan_capture

    def counting_scan(*args, **kwargs):
        scans.append(args[0])
        return real_scan(*args, **kwargs)

    monkeypatch.setattr(frames, "read_frame", counting_read)
    monkeypatch.setattr(discover, "read_frame", counting_read)
    monkeypatch.setattr(runner, "scan_capture", counting_scan)
    cap = tmp_path / "cap"
    (cap / "night1").mkdir(parents=True)
    config = write_rules(tmp_path, settle="0.5s", stable="0.5s", rescan="1h")
    running = InProcess(config)
    try:
        wait_until(lambda: running.service.ledger is not None, what="the service to start")
        for i in range(3):
            write_flat(cap / "night1" / f"flat_{i}.fits", seed=i)
        wait_until(lambda: len(masters_in(cap / "masters")) == 1, what="the master")
        wait_until(lambda: not list((cap / "night1").glob("flat_*.fits")), what="the inputs to be moved")
    finally:
        assert running.stop() == 0
    assert {name: n for name, n in reads.items() if name.startswith("flat_")} == {f"flat_{i}.fits": 1 for i in range(3)}
    assert scans == []
