"""The watcher's pure parts: stability with a fake clock, settle timers, mounts, the
observer fallback and the event handler."""

from __future__ import annotations

import errno
import logging
import os
import queue
from pathlib import Path
from types import SimpleNamespace

import pytest

from flatd.config import CaptureFolder
from flatd.ingest.watcher import (EnqueueHandler, FolderState, StabilityTracker, choose_polling,
                           filesystem_type, is_network_fs, parse_bsd_mount, parse_proc_mounts, start_watch)


def st(size: int, mtime: float):
    return SimpleNamespace(st_size=size, st_mtime=mtime)


# --------------------------------------------------------------------------- stability


def test_a_file_is_ready_only_after_standing_still_for_stable():
    t = StabilityTracker(stable=5)
    assert t.observe(Path("/c/a.fits"), st(100, 1.0), now=0.0)
    assert t.ready(4.9) == []
    assert t.ready(5.0) == [Path("/c/a.fits")]


def test_a_growing_file_restarts_its_clock_and_an_unchanged_stat_does_not():
    t = StabilityTracker(stable=5)
    p = Path("/c/a.fits")
    t.observe(p, st(100, 1.0), now=0.0)
    assert not t.observe(p, st(100, 1.0), now=3.0)  # same size and mtime: no reset
    assert t.observe(p, st(200, 1.0), now=4.0)  # grew
    assert t.ready(8.9) == []
    assert t.ready(9.0) == [p]
    t.observe(p, st(200, 2.0), now=9.5)  # touched: mtime changed
    assert t.ready(14.0) == []
    assert t.ready(14.5) == [p]


def test_a_checked_file_is_not_offered_again_until_it_changes():
    t = StabilityTracker(stable=1)
    p = Path("/c/a.fits")
    t.observe(p, st(100, 1.0), now=0.0)
    t.mark(p, "incomplete")
    assert t.ready(10.0) == []
    assert t.unchecked() == []
    assert t.changing() == [p]  # still looked at: the writer may go on
    t.observe(p, st(300, 2.0), now=11.0)  # the writer went on
    assert t.unchecked() == [p]
    assert t.entry(p).verdict is None
    assert t.ready(12.0) == [p]
    t.mark(p, "flat")
    assert t.stable_under(Path("/c")) == {"/c/a.fits": (300, 2.0)}
    assert t.stable_under(Path("/other")) == {}


def test_a_file_that_went_away_is_forgotten():
    t = StabilityTracker(stable=1)
    p = Path("/c/a.fits")
    t.observe(p, st(1, 1.0), now=0.0)
    assert t.observe(p, None, now=1.0) is True
    assert p not in t
    assert t.observe(p, None, now=2.0) is False


def test_drop_outside_keeps_only_files_under_the_folders():
    t = StabilityTracker(stable=1)
    for name in ("/a/x.fits", "/a/sub/y.fits", "/b/z.fits"):
        t.observe(Path(name), st(1, 1.0), now=0.0)
    t.drop_outside([Path("/a")])
    assert sorted(map(str, t.entries)) == ["/a/sub/y.fits", "/a/x.fits"]


# --------------------------------------------------------------------------- settle


def test_folder_settles_after_the_last_new_flat():
    f = FolderState(CaptureFolder(path=Path("/c")))
    assert not f.due(100.0, settle=10)  # nothing new
    f.flat_ready(0.0)
    f.flat_ready(8.0)  # a burst: the timer starts again
    assert f.settle_left(10.0, 10) == pytest.approx(8.0)
    assert not f.due(17.9, 10)
    assert f.due(18.0, 10)
    f.dispatched()
    assert not f.due(100.0, 10)


def test_a_forced_sweep_is_due_at_once_and_an_error_backs_off():
    f = FolderState(CaptureFolder(path=Path("/c")))
    f.flat_ready(0.0)
    f.force = True
    assert f.due(0.1, settle=600)
    f.dispatched()
    f.dirty, f.not_before = True, 50.0
    assert not f.due(20.0, 10)
    assert f.due(50.0, 10)


# --------------------------------------------------------------------------- file systems

MOUNTS = """\
/dev/sda1 / ext4 rw,relatime 0 0
server:/export /mnt/nas nfs4 rw,relatime 0 0
//pc/flats /mnt/pc cifs rw 0 0
user@host:/data /mnt/ssh fuse.sshfs rw 0 0
/dev/sdb1 /mnt/nas/local ext4 rw 0 0
/dev/sdc1 /media/My\\040Disk ext4 rw 0 0
"""


def test_proc_mounts_parsing_unescapes_spaces():
    mounts = parse_proc_mounts(MOUNTS)
    assert ("/media/My Disk", "ext4") in mounts
    assert ("/mnt/nas", "nfs4") in mounts


def test_longest_mount_point_prefix_wins():
    mounts = parse_proc_mounts(MOUNTS)
    assert filesystem_type(Path("/mnt/nas/captures"), mounts) == "nfs4"
    assert filesystem_type(Path("/mnt/nas/local/captures"), mounts) == "ext4"
    assert filesystem_type(Path("/mnt/nasty"), mounts) == "ext4"  # a prefix of the text, not of the path
    assert filesystem_type(Path("/home/me"), mounts) == "ext4"


@pytest.mark.parametrize("fstype,network", [
    ("nfs", True), ("nfs4", True), ("cifs", True), ("smb3", True), ("smbfs", True), ("fuse.sshfs", True),
    ("fuse", True), ("fuseblk", True), ("9p", True), ("ext4", False), ("xfs", False), ("btrfs", False),
    ("tmpfs", False), (None, False),
])
def test_network_and_fuse_file_systems(fstype, network):
    assert is_network_fs(fstype) is network


def test_choose_polling_auto_and_forced():
    mounts = parse_proc_mounts(MOUNTS)
    assert choose_polling(Path("/mnt/pc/flats"), "auto", mounts) is True
    assert choose_polling(Path("/mnt/ssh/x"), "auto", mounts) is True
    assert choose_polling(Path("/home/me/flats"), "auto", mounts) is False
    assert choose_polling(Path("/home/me/flats"), True, mounts) is True
    assert choose_polling(Path("/mnt/nas/flats"), False, mounts) is False


def test_bsd_mount_output():
    text = ("/dev/disk3s1 on / (apfs, local, journaled)\n"
            "//me@nas/flats on /Volumes/flats (smbfs, nodev, nosuid, mounted by me)\n")
    mounts = parse_bsd_mount(text)
    assert mounts == [("/", "apfs"), ("/Volumes/flats", "smbfs")]
    assert choose_polling(Path("/Volumes/flats/night1"), "auto", mounts) is True


# --------------------------------------------------------------------------- observers


class FakeObserver:
    def __init__(self, fail_on=None, errno_=errno.ENOSPC):
        self.fail_on, self.errno_ = fail_on, errno_
        self.scheduled, self.started, self.stopped = [], False, False

    def create(self):
        if self.fail_on == "create":
            raise OSError(self.errno_, "inotify instance limit reached")
        return self

    def schedule(self, handler, path, recursive=False):
        if self.fail_on == "schedule":
            raise OSError(self.errno_, os.strerror(self.errno_))
        self.scheduled.append((path, recursive))

    def start(self):
        if self.fail_on == "start":
            raise OSError(self.errno_, "inotify watch limit reached")
        self.started = True

    def unschedule_all(self):
        self.scheduled.clear()

    def is_alive(self):
        return self.started and not self.stopped

    def stop(self):
        self.stopped = True

    def join(self, timeout=None):
        pass


@pytest.mark.parametrize("where", ["create", "schedule", "start"])
@pytest.mark.parametrize("code,sysctl", [(errno.ENOSPC, "fs.inotify.max_user_watches"),
                                         (errno.EMFILE, "fs.inotify.max_user_instances")])
def test_inotify_limit_falls_back_to_polling_and_names_the_sysctl(where, code, sysctl, caplog):
    native, polling = FakeObserver(fail_on=where, errno_=code), FakeObserver()
    capture = CaptureFolder(path=Path("/data/captures"), recursive=True)
    with caplog.at_level(logging.WARNING, logger="flatd"):
        logging.getLogger("flatd").propagate = True
        try:
            watch = start_watch(capture, object(), polling=False, make_native=lambda: native.create(),
                                make_polling=lambda: polling)
        finally:
            logging.getLogger("flatd").propagate = False
    assert watch.polling and watch.observer is polling and polling.started
    assert polling.scheduled == [("/data/captures", True)]
    assert any(sysctl in r.getMessage() and "/data/captures" in r.getMessage() for r in caplog.records)


def test_other_observer_errors_propagate():
    native = FakeObserver(fail_on="start", errno_=errno.ENOENT)
    with pytest.raises(FileNotFoundError):
        start_watch(CaptureFolder(path=Path("/nope")), object(), polling=False, make_native=lambda: native,
                    make_polling=FakeObserver)


def test_forced_polling_never_builds_a_native_observer():
    def native():
        raise AssertionError("native observer built")

    watch = start_watch(CaptureFolder(path=Path("/c"), recursive=False), object(), polling=True,
                        make_native=native, make_polling=FakeObserver)
    assert watch.polling and watch.observer.scheduled == [("/c", False)]


def _event(kind, src, dest=None, directory=False):
    return SimpleNamespace(event_type=kind, src_path=src, dest_path=dest, is_directory=directory)


def test_handler_only_enqueues_paths():
    q = queue.SimpleQueue()
    h = EnqueueHandler(q, "K")
    h.dispatch(_event("created", "/c/a.fits"))
    h.dispatch(_event("modified", "/c/a.fits"))
    h.dispatch(_event("opened", "/c/a.fits"))  # our own header reads: ignored
    h.dispatch(_event("closed_no_write", "/c/a.fits"))
    h.dispatch(_event("moved", "/c/a.tmp", "/c/b.fits"))
    h.dispatch(_event("created", "/c/night2", directory=True))
    h.dispatch(_event("moved", "/c/old", "/c/new", directory=True))
    h.dispatch(_event("deleted", "/c/night1", directory=True))
    h.dispatch(_event("modified", "/c", directory=True))
    items = []
    while not q.empty():
        items.append(q.get_nowait())
    assert items == [
        ("path", "K", "/c/a.fits"), ("path", "K", "/c/a.fits"),
        ("path", "K", "/c/a.tmp"), ("path", "K", "/c/b.fits"),
        ("dir", "K", "/c/night2"),
        ("gone-dir", "K", "/c/old"), ("dir", "K", "/c/new"),
        ("gone-dir", "K", "/c/night1"),
    ]
