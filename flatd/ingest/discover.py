"""Which files in a capture folder are candidates: one filter for the watcher and the scans.

The first scan, the watcher's events, the rescans and run-once all ask the same
`FolderFilter`. A file is never a candidate when it lies below an output folder or a
move folder of any rule (relative or absolute, whatever the ledger says), in a hidden
folder, or in the state folder; when it is hidden or temporary; when it is not named
like a FITS file; or when it is a symbolic link to a file outside every capture folder
(unless `capture[].follow_symlinks`). A folder that cannot be read is a problem to
report, never silence.
"""

from __future__ import annotations

import fnmatch
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

from flatd.config import CaptureFolder, Rules
from flatd.ingest.frames import Frame, FrameError, Skipped, is_fits_name, is_ignored_name, read_frame


def inside(path: Path, folder: Path) -> bool:
    """`path` is `folder` or lies below it (both absolute)."""
    return path == folder or folder in path.parents


def own_output_patterns(rules: Rules) -> list[str]:
    """Folder-name globs of relative inputs.move_to templates, e.g. 'originals-*'."""
    patterns = []
    for template in [rules.inputs.move_to] + [r.inputs.get("move_to") for r in rules.rules if r.inputs]:
        if template and not os.path.isabs(os.path.expanduser(template)):
            for part in Path(template).parts:
                patterns.append(re.sub(r"\{[^}]*\}", "*", part))
    return patterns


def _absolute_move_templates(rules: Rules) -> list[str]:
    templates = [rules.inputs.move_to] + [r.inputs.get("move_to") for r in rules.rules if r.inputs]
    return [os.path.expanduser(t) for t in templates if t and os.path.isabs(os.path.expanduser(t))]


def _absolute_move_dirs(rules: Rules) -> list[Path]:
    return [Path(t) for t in _absolute_move_templates(rules) if "{" not in t]


def _absolute_move_globs(rules: Rules) -> list[str]:
    return [re.sub(r"\{[^}]*\}", "*", t) for t in _absolute_move_templates(rules) if "{" in t]


@dataclass
class Walk:
    """What a walk met besides candidates: unreadable folders, links refused."""

    problems: list[str] = field(default_factory=list)
    refused: list[Skipped] = field(default_factory=list)


class FolderFilter:
    """Which paths under a capture folder may be flats: the same rules for every caller.

    FITS names only; no hidden or temporary files; nothing in a hidden folder, an output
    folder, a move_to folder (relative or absolute, of any rule) or the state folder;
    only direct children when the folder is not recursive; symbolic links only to files
    inside a capture folder, unless the folder follows links.
    """

    def __init__(self, capture: CaptureFolder, rules: Rules):
        from flatd.plan import output_folders

        self.capture = capture
        self.root = Path(os.path.abspath(capture.path))
        self.excluded = [Path(os.path.abspath(p)) for p in output_folders(rules) + [rules.state]]
        self.excluded += [Path(os.path.abspath(p)) for p in _absolute_move_dirs(rules)]
        self.patterns = own_output_patterns(rules)
        self.absolute_globs = _absolute_move_globs(rules)
        self.capture_roots = [Path(os.path.realpath(c.path)) for c in rules.capture]

    def excluded_dir(self, folder: Path) -> bool:
        folder = Path(os.path.abspath(folder))
        if any(inside(folder, ex) for ex in self.excluded):
            return True
        text = str(folder)
        return any(fnmatch.fnmatchcase(text, g) or any(fnmatch.fnmatchcase(str(p), g) for p in folder.parents)
                   for g in self.absolute_globs)

    def _own_rel_dirs(self, rel_dirs: tuple) -> bool:
        """Hidden folders and relative move_to folders below the capture folder."""
        return any(part.startswith(".") for part in rel_dirs) or any(
            fnmatch.fnmatch(part, pat) for part in rel_dirs for pat in self.patterns)

    def wants(self, path: Path) -> bool:
        path = Path(os.path.abspath(path))
        if not inside(path, self.root) or path == self.root:
            return False
        if not is_fits_name(path) or is_ignored_name(path):
            return False
        rel_dirs = path.relative_to(self.root).parts[:-1]
        if not self.capture.recursive and rel_dirs:
            return False
        if self._own_rel_dirs(rel_dirs) or self.excluded_dir(path.parent):
            return False
        return self.link_refused(path) is None

    def wants_dir(self, folder: Path) -> bool:
        """A folder that may hold flats (walked when it appears in one piece)."""
        folder = Path(os.path.abspath(folder))
        if not inside(folder, self.root):
            return False
        rel = folder.relative_to(self.root).parts
        if rel and not self.capture.recursive:
            return False
        if self._own_rel_dirs(rel):
            return False
        return not self.excluded_dir(folder)

    def link_refused(self, path: Path) -> Optional[str]:
        """Why a symbolic link is not followed, or None (not a link, or allowed)."""
        if self.capture.follow_symlinks or not os.path.islink(path):
            return None
        target = Path(os.path.realpath(path))
        if any(inside(target, root) for root in self.capture_roots):
            return None
        return (f"a symbolic link to {target}, outside every capture folder: not followed "
                "(capture[].follow_symlinks: true takes it)")

    def walk(self, under: Optional[Path] = None, seen: Optional[Walk] = None) -> Iterator[Path]:
        """Every candidate file under the capture folder (or one of its sub-folders).

        Folders are pruned with `wants_dir`, so a file met on the way needs only its
        name and link checked. Folders that cannot be read, files that are not FITS
        and refused links are noted in `seen` when given.
        """
        seen = seen if seen is not None else Walk()
        start = self.root if under is None else Path(os.path.abspath(under))
        if not self.wants_dir(start) and start != self.root:
            return

        def unreadable(exc: OSError) -> None:
            seen.problems.append(f"cannot read folder {exc.filename}: {exc.strerror or exc}")

        for dirpath, dirnames, filenames in os.walk(start, onerror=unreadable):
            here = Path(dirpath)
            dirnames[:] = sorted(d for d in dirnames if self.wants_dir(here / d))
            for name in sorted(filenames):
                candidate = here / name
                if is_ignored_name(candidate):
                    continue
                if not is_fits_name(candidate):
                    continue  # no candidate, and not listed: a dry run lists what the run does
                refused = self.link_refused(candidate)
                if refused:
                    seen.refused.append(Skipped(candidate, refused))
                else:
                    yield candidate
            if not self.capture.recursive and here == self.root:
                break


# --------------------------------------------------------------------------- scans


Ready = Callable[[Path, os.stat_result], bool]


def scan_capture(capture: CaptureFolder, rules: Rules, ledger, now: float, stable: float,
                 ready: Optional[Ready] = None,
                 waiter: Optional["StableWait"] = None) -> tuple[list[Frame], list[Skipped], list[str]]:
    """Ready frames under a capture folder, every file left out with its reason, and the
    folders that could not be read.

    A file is left out when it is flatd's own output (masters, moved inputs), was
    already combined, is still being written, or is not a usable FITS image. `ready`
    (the service's stability tracker) or `waiter` (run-once's) replaces the mtime
    check when given.
    """
    seen = Walk()
    keywords = rules.keyword_map()
    frames, skipped = [], []
    for path in FolderFilter(capture, rules).walk(seen=seen):
        if ledger is not None and (ledger.is_master(path) or ledger.is_moved_input(path)):
            continue
        try:
            st = path.stat()
        except OSError as exc:
            skipped.append(Skipped(path, f"cannot read: {exc.strerror or exc}"))
            continue
        if ready is not None:
            if not ready(path, st):
                continue  # the watcher has not seen this flat stable, or it is no flat
        elif (waiter is not None and not waiter.ready(path, st)) or (waiter is None and now - st.st_mtime < stable):
            skipped.append(Skipped(path, f"still being written (changed {now - st.st_mtime:.0f} s ago)"))
            continue
        if ledger is not None and ledger.consumed(path, st.st_size, st.st_mtime):
            continue  # combined before (inputs left in place)
        try:
            frames.append(read_frame(path, keywords))
        except FrameError as exc:
            skipped.append(Skipped(exc.path, exc.reason))
    skipped += seen.refused  # files without a FITS name are no candidates: not listed, dry run or not
    return frames, skipped, seen.problems


def still_candidates(frames: list[Frame], ledger) -> list[Frame]:
    """The Frames a watcher read earlier that may still go into a batch: the file is
    unchanged since (size and mtime, by a stat), and not combined or made by flatd."""
    kept = []
    for frame in frames:
        try:
            st = frame.path.stat()
        except OSError:
            continue  # gone meanwhile
        if (st.st_size, st.st_mtime) != (frame.file_size, frame.mtime):
            continue  # changed: the watcher reads it again once it is stable
        if ledger is not None and (ledger.is_master(frame.path) or ledger.is_moved_input(frame.path)
                                   or ledger.consumed(frame.path, st.st_size, st.st_mtime)):
            continue
        kept.append(frame)
    return kept


# --------------------------------------------------------------------------- run-once's wait


class StableWait:
    """run-once's `stable`: a candidate is ready when it has not changed for `stable`
    seconds, by its mtime or, where clocks disagree (a share), by watching it."""

    def __init__(self, stable: float, clock: Callable[[], float] = time.time):
        self.stable = stable
        self.clock = clock
        self.first_seen: dict[Path, tuple[float, int, float]] = {}  # path -> (since, size, mtime)

    def ready(self, path: Path, st: os.stat_result) -> bool:
        now = self.clock()
        known = self.first_seen.get(path)
        if known is None or known[1:] != (st.st_size, st.st_mtime):
            self.first_seen[path] = known = (now, st.st_size, st.st_mtime)
        return now - st.st_mtime >= self.stable or now - known[0] >= self.stable

    def not_ready(self, paths) -> list[Path]:
        """The paths that are not ready yet (a file that went away is no longer waited for)."""
        young = []
        for path in paths:
            try:
                st = path.stat()
            except OSError:
                continue
            if not self.ready(path, st):
                young.append(path)
        return young

    def wait(self, filters: list[FolderFilter], limit: float, say: Callable[[str], None],
             sleep: Callable[[float], None] = time.sleep) -> list[Path]:
        """Wait, at most `limit` seconds, until no candidate changed for `stable`.
        Returns the files still changing when the limit was reached.

        The folders are walked once, then only the files still changing are looked at;
        when they are all ready, one more walk catches files that arrived meanwhile."""
        def walk_all() -> list[Path]:
            return self.not_ready(path for folder_filter in filters for path in folder_filter.walk())

        deadline = self.clock() + limit
        young = walk_all()
        if young:
            say(f"waiting up to {limit:.0f} s for {len(young)} file(s) still being written "
                f"(unchanged for {self.stable:g} s counts as done; --no-wait skips this)")
        while young and self.clock() < deadline:
            sleep(min(0.25, max(0.0, deadline - self.clock())))
            young = self.not_ready(young) or walk_all()
        return young
