"""Safe file operations: moving inputs away without ever overwriting or losing one.

The runner moves inputs only through :func:`move_file` (invariant 1): on one
filesystem a hard link to the new name then removal of the old one (a link fails
instead of overwriting); across filesystems a copy to a temp file in the target
folder, fsync, verification (size and blake2b), a no-overwrite link to the final
name, and only then removal of the source. Nothing else is ever deleted.
"""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Optional

from flatd.errors import FlatdError
from flatd.output.naming import format_fields

CHUNK = 1 << 20
TEMP_PREFIX = ".flatd-"
TEMP_SUFFIX = ".tmp"
MAX_TRIES = 10000

# os.link errors that mean "no hard links here" (FAT/exFAT, some SMB and FUSE mounts)
# or "not allowed" (fs.protected_hardlinks on a file owned by someone else): fall back
# to a rename after an existence check.
NO_HARDLINK_ERRNOS = frozenset(
    e for e in (errno.EPERM, errno.EACCES, getattr(errno, "ENOTSUP", None), getattr(errno, "EOPNOTSUPP", None),
                errno.ENOSYS, errno.EMLINK)
    if e is not None
)
# fsync on a folder is not supported everywhere (some network filesystems, Windows).
_FSYNC_UNSUPPORTED = frozenset(
    e for e in (errno.EINVAL, errno.EBADF, getattr(errno, "ENOTSUP", None), getattr(errno, "EOPNOTSUPP", None),
                errno.EACCES, errno.EPERM, errno.EISDIR)
    if e is not None
)


class MoveError(OSError, FlatdError):
    """A move that was not done; the source is still where it was."""


class FileChanged(MoveError):
    """The file at a path is not the one that was read: replaced, rewritten or gone."""


@dataclass(frozen=True)
class FileIdentity:
    """What makes a file the file that was read: its inode, size and mtime."""

    device: int
    inode: int
    size: int
    mtime: float

    @classmethod
    def of(cls, st: os.stat_result) -> "FileIdentity":
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime)

    def differences(self, st: os.stat_result) -> list[str]:
        """How `st` differs from this identity, in words; empty when it is the same file."""
        found = []
        if (self.device, self.inode) != (st.st_dev, st.st_ino) and self.inode:
            found.append("replaced by another file")
        if self.size != st.st_size:
            found.append(f"size {self.size} -> {st.st_size} bytes")
        if abs(self.mtime - st.st_mtime) >= 1e-3:
            found.append("modified")
        return found


def check_identity(path: Path, expected: FileIdentity, when: str = "since it was read") -> None:
    """Raise FileChanged unless `path` is still the file `expected` describes."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FileChanged(errno.ENOENT, f"gone {when}", str(path)) from None
    changes = expected.differences(st)
    if changes:
        raise FileChanged(errno.ESTALE, f"changed {when} ({', '.join(changes)})", str(path))


def file_digest(path: Path) -> str:
    """blake2b hex digest of a file, read in 1 MiB chunks."""
    digest = hashlib.blake2b()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_dir(path: Path) -> None:
    """Make a folder's entries (new, renamed, removed names) durable.

    A no-op where folders cannot be fsynced (Windows, some network filesystems);
    real I/O errors are raised.
    """
    if os.name == "nt":
        return
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as exc:
        if exc.errno in _FSYNC_UNSUPPORTED:
            return
        raise
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in _FSYNC_UNSUPPORTED:
            raise
    finally:
        os.close(fd)


def prefixed_names(path: Path, limit: int = MAX_TRIES) -> Iterator[Path]:
    """path, then 1_name, 2_name ... in the same folder (the original's clash rule)."""
    path = Path(path)
    yield path
    for n in range(1, limit):
        yield path.with_name(f"{n}_{path.name}")


def link_no_replace(source: Path, candidates: Iterable[Path]) -> Path:
    """Give `source` the first free name among `candidates`, never overwriting one.

    os.link fails when the name is taken, and the next candidate is tried; the source
    name is then removed (a failure to remove it is ignored: it is flatd's own temp
    name, which cleanup removes later). Without hard links: os.rename after an
    existence check (a tiny race, accepted there). Meant for flatd's temp files, whose
    names nobody else uses. Returns the name used.
    """
    for candidate in candidates:
        try:
            os.link(source, candidate)
        except FileExistsError:
            continue
        except OSError as exc:
            if exc.errno not in NO_HARDLINK_ERRNOS and exc.errno != errno.EXDEV:
                raise
            if os.path.lexists(candidate):
                continue
            try:
                os.rename(source, candidate)
            except FileExistsError:  # Windows refuses to replace
                continue
            return Path(candidate)
        try:
            os.unlink(source)
        except OSError:
            pass
        return Path(candidate)
    raise FileExistsError(errno.EEXIST, "no free name", str(source))


def create_temp(directory: Path, label: str) -> tuple[Path, int]:
    """A new, exclusive, hidden temp file in `directory` (".flatd-<label>-<random>.tmp",
    which watchers and scans ignore); returns its path and an open descriptor."""
    stem = "".join(ch if ch.isalnum() or ch in "._+-" else "_" for ch in label)[:40]
    for _ in range(100):
        temp = directory / f"{TEMP_PREFIX}{stem}-{secrets.token_hex(4)}{TEMP_SUFFIX}"
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        except FileExistsError:
            continue
        return temp, fd
    raise FileExistsError(errno.EEXIST, "cannot create a temp file", str(directory))


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def move_file(src: Path, dest_dir: Path, expect: Optional[FileIdentity] = None) -> Path:
    """Move `src` into `dest_dir` (created if missing) without ever overwriting.

    A name clash gets a numeric prefix, as in the original: "1_name.fits",
    "2_name.fits" ... Same filesystem: os.link to the new name (fails rather than
    overwrite), then the source name is removed; without hard links, os.rename after
    an existence check. Across filesystems (st_dev differs or EXDEV): copy to a temp
    file in `dest_dir` while hashing the source, fsync, check the source did not
    change meanwhile, verify size and blake2b of the copy, link it to the final name,
    fsync the folder, then unlink the source. On failure the source stays where it
    was, and no copy is left behind. A file already in `dest_dir` stays as it is.
    With `expect`, a file that is no longer the one read (FileIdentity) is not moved
    (FileChanged). A symbolic link is moved as a link; its target is never touched.
    Returns the final path.
    """
    src = Path(src)
    dest_dir = Path(dest_dir)
    if expect is not None:
        check_identity(src, expect)
    info = os.stat(src)
    if not stat.S_ISREG(info.st_mode):
        raise MoveError(errno.EINVAL, "not a regular file", str(src))
    dest_dir.mkdir(parents=True, exist_ok=True)
    if os.path.samefile(src.parent, dest_dir):
        return src
    if os.path.islink(src):
        return _move_link(src, dest_dir)
    if os.stat(dest_dir).st_dev == info.st_dev:
        try:
            return _move_same_fs(src, dest_dir)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
    return _move_across(src, dest_dir)


def _move_same_fs(src: Path, dest_dir: Path) -> Path:
    for candidate in prefixed_names(dest_dir / src.name):
        try:
            os.link(src, candidate)
        except FileExistsError:
            continue
        except OSError as exc:
            if exc.errno not in NO_HARDLINK_ERRNOS:
                raise  # EXDEV included: the caller copies instead
            if os.path.lexists(candidate):
                continue
            try:
                os.rename(src, candidate)
            except FileExistsError:
                continue
        else:
            try:
                os.unlink(src)
            except OSError:
                os.unlink(candidate)  # the second name of the same file; src stays
                raise
        fsync_dir(dest_dir)
        fsync_dir(src.parent)
        return candidate
    raise MoveError(errno.EEXIST, f"no free name in {dest_dir}", str(src))


def _move_link(src: Path, dest_dir: Path) -> Path:
    """A symbolic link moves as a new link to the same target; the target stays as it is."""
    target = os.readlink(src)
    if not os.path.isabs(target):  # relative to the link's folder, which changes
        target = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(src)), target))
    for candidate in prefixed_names(dest_dir / src.name):
        try:
            os.symlink(target, candidate)
        except FileExistsError:
            continue
        try:
            os.unlink(src)
        except OSError:
            os.unlink(candidate)
            raise
        fsync_dir(dest_dir)
        fsync_dir(src.parent)
        return candidate
    raise MoveError(errno.EEXIST, f"no free name in {dest_dir}", str(src))


def _move_across(src: Path, dest_dir: Path) -> Path:
    before = os.stat(src)
    temp, fd = create_temp(dest_dir, "move-" + src.name)
    try:
        digest = hashlib.blake2b()
        with open(src, "rb") as source, os.fdopen(fd, "wb") as copy:
            while chunk := source.read(CHUNK):
                digest.update(chunk)
                copy.write(chunk)
            copy.flush()
            try:
                shutil.copystat(src, temp)
            except OSError:
                pass  # times and mode are a courtesy; some shares refuse them
            os.fsync(copy.fileno())
        after = os.stat(src)
        if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
            raise MoveError(errno.EAGAIN, "source changed while it was copied", str(src))
        size = os.stat(temp).st_size
        if size != before.st_size:
            raise MoveError(errno.EIO, f"copy has {size} bytes, source {before.st_size}", str(src))
        if file_digest(temp) != digest.hexdigest():
            raise MoveError(errno.EIO, "copy does not match the source (blake2b)", str(src))
        final = link_no_replace(temp, prefixed_names(dest_dir / src.name))
    except BaseException:
        _unlink_quietly(temp)
        raise
    try:
        fsync_dir(dest_dir)
        os.unlink(src)
    except BaseException:
        _unlink_quietly(final)  # our verified copy; the source is still in place
        raise
    fsync_dir(src.parent)
    return final


def resolve_move_dir(template: str, input_path: Path, fields: Mapping[str, object]) -> Path:
    """The folder an input is moved to (inputs.move_to).

    `template` is relative to the input's own folder, or absolute ("~" expands);
    "{field}" values are sanitized with naming.safe_component, so a header value can
    never add a separator or "..": "originals-{date}" ->
    <input folder>/originals-20261125-010203. Unknown fields raise ValueError.
    """
    if not template or not template.strip():
        raise ValueError("empty move_to template")
    text = format_fields(os.path.expanduser(template), fields)
    if "\0" in text:
        raise ValueError(f"move_to {template!r} holds a NUL character")
    target = Path(text)
    if not target.is_absolute():
        target = Path(input_path).parent / target
    return target
