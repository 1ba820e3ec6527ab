"""Moving inputs away safely (flatd.fsops)."""

from __future__ import annotations

import errno
import os
from datetime import datetime
from pathlib import Path

import pytest

from flatd import fsops
from flatd.fsops import MoveError, file_digest, fsync_dir, move_file, resolve_move_dir

CONTENT = b"SIMPLE  =                    T" + bytes(range(256)) * 50


def write(path: Path, data: bytes = CONTENT) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


@pytest.fixture
def cross_device(monkeypatch):
    """os.link / os.rename of anything outside the target folder fail with EXDEV."""
    real_link, real_rename = os.link, os.rename
    calls = {"link": 0, "rename": 0}

    def fake(real, kind):
        def wrapper(src, dst, *a, **k):
            if Path(src).parent != Path(dst).parent:
                calls[kind] += 1
                raise OSError(errno.EXDEV, "Invalid cross-device link")
            return real(src, dst, *a, **k)
        return wrapper

    monkeypatch.setattr(os, "link", fake(real_link, "link"))
    monkeypatch.setattr(os, "rename", fake(real_rename, "rename"))
    return calls


def test_file_digest(tmp_path):
    a = write(tmp_path / "a", b"x" * (3 << 20))
    b = write(tmp_path / "b", b"x" * (3 << 20))
    c = write(tmp_path / "c", b"x" * (3 << 20 - 1) + b"y")
    assert file_digest(a) == file_digest(b) != file_digest(c)
    assert len(file_digest(a)) == 128


def test_fsync_dir(tmp_path):
    fsync_dir(tmp_path)  # no error


def test_move_within_filesystem(tmp_path):
    src = write(tmp_path / "night" / "flat_001.fits")
    mtime = os.stat(src).st_mtime_ns
    dest = tmp_path / "night" / "originals-x"
    final = move_file(src, dest)
    assert final == dest / "flat_001.fits"
    assert final.read_bytes() == CONTENT
    assert os.stat(final).st_mtime_ns == mtime
    assert not src.exists()
    assert leftovers(dest) == []


def test_name_clash_never_overwrites(tmp_path):
    dest = tmp_path / "originals"
    taken = write(dest / "flat.fits", b"first")
    write(dest / "1_flat.fits", b"second")
    src = write(tmp_path / "flat.fits")
    final = move_file(src, dest)
    assert final == dest / "2_flat.fits"
    assert final.read_bytes() == CONTENT
    assert taken.read_bytes() == b"first"
    assert (dest / "1_flat.fits").read_bytes() == b"second"
    assert not src.exists()


def test_move_without_hard_links(tmp_path, monkeypatch):
    def no_link(src, dst, *a, **k):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_link)
    dest = tmp_path / "originals"
    write(dest / "flat.fits", b"first")
    src = write(tmp_path / "flat.fits")
    final = move_file(src, dest)
    assert final == dest / "1_flat.fits"
    assert final.read_bytes() == CONTENT
    assert (dest / "flat.fits").read_bytes() == b"first"
    assert not src.exists()


def test_move_across_filesystems(tmp_path, cross_device, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    src = write(tmp_path / "night" / "flat.fits")
    mtime = os.stat(src).st_mtime_ns
    dest = tmp_path / "elsewhere"
    write(dest / "flat.fits", b"clash")
    final = move_file(src, dest)
    assert cross_device["link"] >= 1  # the direct link was refused: the copy path ran
    assert final == dest / "1_flat.fits"
    assert final.read_bytes() == CONTENT
    assert os.stat(final).st_mtime_ns == mtime
    assert (dest / "flat.fits").read_bytes() == b"clash"
    assert not src.exists()
    assert leftovers(dest) == []
    assert len(synced) >= 2  # the copy and the folder


def test_move_across_filesystems_by_st_dev(tmp_path, monkeypatch):
    """Different st_dev goes straight to the copy path."""
    src = write(tmp_path / "a" / "flat.fits")
    dest = tmp_path / "b"
    dest.mkdir()
    real_stat = os.stat
    dest_key = str(dest)

    class FakeStat:
        def __init__(self, st):
            self._st = st

        def __getattr__(self, name):
            if name == "st_dev":
                return self._st.st_dev + 1
            return getattr(self._st, name)

    def fake_stat(path, *a, **k):
        st = real_stat(path, *a, **k)
        return FakeStat(st) if str(path) == dest_key else st

    def forbidden(*a, **k):
        raise AssertionError("same-filesystem path used")

    monkeypatch.setattr(os, "stat", fake_stat)
    monkeypatch.setattr(fsops, "_move_same_fs", forbidden)
    final = move_file(src, dest)
    assert final.read_bytes() == CONTENT and not src.exists()


def test_verification_failure_leaves_source(tmp_path, cross_device, monkeypatch):
    monkeypatch.setattr(fsops, "file_digest", lambda path: "0" * 128)
    src = write(tmp_path / "night" / "flat.fits")
    dest = tmp_path / "elsewhere"
    with pytest.raises(MoveError, match="does not match"):
        move_file(src, dest)
    assert src.read_bytes() == CONTENT
    assert list(dest.iterdir()) == []


def test_short_copy_leaves_source(tmp_path, cross_device, monkeypatch):
    real_fdopen = os.fdopen

    class Short:
        def __init__(self, handle):
            self.handle = handle

        def write(self, chunk):
            return self.handle.write(chunk[:-1])

        def __getattr__(self, name):
            return getattr(self.handle, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.handle.__exit__(*exc)

    monkeypatch.setattr(os, "fdopen", lambda fd, mode: Short(real_fdopen(fd, mode)))
    src = write(tmp_path / "night" / "flat.fits")
    dest = tmp_path / "elsewhere"
    with pytest.raises(MoveError):
        move_file(src, dest)
    assert src.read_bytes() == CONTENT
    assert list(dest.iterdir()) == []


def test_copy_failure_leaves_source(tmp_path, cross_device, monkeypatch):
    def broken_fsync(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    src = write(tmp_path / "night" / "flat.fits")
    dest = tmp_path / "elsewhere"
    with pytest.raises(OSError):
        move_file(src, dest)
    assert src.read_bytes() == CONTENT
    assert list(dest.iterdir()) == []


@pytest.mark.parametrize("across_filesystems", [True, False])
def test_failure_to_remove_source_keeps_one_copy(tmp_path, monkeypatch, request, across_filesystems):
    if across_filesystems:
        request.getfixturevalue("cross_device")
    real_unlink = os.unlink
    src = write(tmp_path / "night" / "flat.fits")

    def unlink(path, *a, **k):
        if Path(path) == src:
            raise OSError(errno.EACCES, "Permission denied")
        return real_unlink(path, *a, **k)

    monkeypatch.setattr(os, "unlink", unlink)
    dest = tmp_path / ("elsewhere" if across_filesystems else "originals")
    with pytest.raises(OSError):
        move_file(src, dest)
    assert src.read_bytes() == CONTENT
    assert list(dest.iterdir()) == []


def test_move_into_own_folder_is_a_no_op(tmp_path):
    src = write(tmp_path / "flat.fits")
    assert move_file(src, tmp_path) == src
    assert src.read_bytes() == CONTENT
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flat.fits"]


def test_move_refuses_non_files(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(OSError):
        move_file(tmp_path / "d", tmp_path / "out")
    with pytest.raises(FileNotFoundError):
        move_file(tmp_path / "missing.fits", tmp_path / "out")


# ------------------------------------------------------------------- resolve_move_dir


RUN = {"date": "20261125-010203", "filter": "L"}


def test_resolve_move_dir_relative(tmp_path):
    src = tmp_path / "night1" / "flat.fits"
    assert resolve_move_dir("originals-{date}", src, RUN) == tmp_path / "night1" / "originals-20261125-010203"


def test_resolve_move_dir_absolute(tmp_path):
    target = resolve_move_dir(str(tmp_path / "archive" / "{date}" / "{filter}"), Path("/x/night/flat.fits"), RUN)
    assert target == tmp_path / "archive" / "20261125-010203" / "L"


def test_resolve_move_dir_home():
    assert resolve_move_dir("~/originals", Path("/x/f.fits"), RUN) == Path.home() / "originals"


def test_resolve_move_dir_datetime_value(tmp_path):
    fields = {"date": datetime(2026, 11, 25, 1, 2, 3)}
    assert resolve_move_dir("originals-{date}", tmp_path / "f.fits", fields).name == "originals-20261125-010203"


@pytest.mark.parametrize("value", ["../../x", "/etc", "..", "a/../../b", "C:\\x"])
def test_resolve_move_dir_sanitized(tmp_path, value):
    src = tmp_path / "night" / "flat.fits"
    target = resolve_move_dir("originals-{filter}", src, {**RUN, "filter": value})
    assert target.parent == tmp_path / "night"
    assert "/" not in target.name and ".." not in target.parts
    target = resolve_move_dir("{filter}", src, {**RUN, "filter": value})
    assert target.parent == tmp_path / "night"
    assert target.name not in ("", ".", "..")


def test_resolve_move_dir_unknown_field(tmp_path):
    with pytest.raises(ValueError):
        resolve_move_dir("originals-{nope}", tmp_path / "f.fits", RUN)
    with pytest.raises(ValueError):
        resolve_move_dir("", tmp_path / "f.fits", RUN)
