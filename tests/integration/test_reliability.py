"""Issue 7: the faults a hostile test campaign found, each reproduced, each survived.

Full disks are real tmpfs mounts (root only: CI runs as root); unreadable folders are
real permissions, read by a flatd without the capabilities that let root ignore them.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

import flatd.runner as runner_module
from flatd.cli import main
from flatd.config import load_rules
from flatd.ledger import DONE, FAILED, MOVES_PENDING, Ledger, OutputLock
from flatd.runner import Runner, process_capture

from fitstree import write_fits

IS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT, reason="mounts a small tmpfs (CI runs as root)")

RULES = """
capture:
  - path: {root}/captures
output: {{directory: {output}}}
inputs: {{move_to: {move_to}}}
grouping: {{min_group_size: 3}}
combine: {{method: median}}
stable: 0
state: {root}/{state}
"""


def _rules(tree, output="masters", move_to='"originals"', state="state", extra=""):
    return tree.rules(RULES.format(root=tree.root, output=output, move_to=move_to, state=state) + extra)


def _flats(tree, n=4, filt="R", shape=(40, 50), folder="captures/night1"):
    return [tree.flat(f"flat_{filt}_{i}.fits", filt=filt, shape=shape, folder=folder) for i in range(n)]


def _digests(paths):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


def _run_once(config, *extra):
    return main(["run-once", "--config", str(config), *extra])


@contextlib.contextmanager
def small_filesystem(path: Path, size: str):
    """A tmpfs of `size` mounted at `path` for the test's duration."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _resize(path: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True)


# ---------------------------------------------------------------------- 1. a full disk while a master is written


@needs_root
def test_a_full_output_disk_fails_that_group_only_and_a_rerun_makes_it(tree, capsys):
    big = _flats(tree, filt="L", shape=(300, 400))  # a master of 480 kB
    small = _flats(tree, filt="R")  # a master of 14 kB
    out = tree.root / "out"
    with small_filesystem(out, "96k"):
        config = _rules(tree, output=out, move_to="null")
        assert _run_once(config) == 1
        text = capsys.readouterr().out
        assert f"no space left on {out}: needs 0.5 MB, has 0.1 MB" in text
        assert [fits.getheader(m)["FILTER"] for m in out.glob("*.fits")] == ["R"]  # the group that fits
        assert not list(out.glob(".flatd-*")), "no temp file stays"
        ledger = Ledger.open(tree.root / "state")
        assert [j.state for j in ledger.jobs()] == [DONE]  # the full-disk job is not stuck in `writing`
        _resize(out, "2m")
        assert _run_once(config) == 0
        assert sorted(fits.getheader(m)["FILTER"] for m in out.glob("*.fits")) == ["L", "R"]
        assert all(p.exists() for p in big + small)  # move_to null: in place


@needs_root
def test_enospc_in_the_middle_of_a_write_is_the_same_clear_failure(tree, capsys, monkeypatch):
    """The free-space check can be beaten by another writer: the write itself then
    fails with ENOSPC, which astropy's writer used to turn into an AttributeError."""
    _flats(tree, filt="L", shape=(300, 400))
    out = tree.root / "out"
    monkeypatch.setattr("flatd.output.masters.free_bytes", lambda directory: 10**12)
    with small_filesystem(out, "96k"):
        assert _run_once(_rules(tree, output=out, move_to="null")) == 1
        text = capsys.readouterr().out
        assert f"no space left on {out}: needs 0.5 MB" in text and "AttributeError" not in text
        assert not list(out.iterdir()) or [p.name for p in out.iterdir()] == [OutputLock.NAME]


# ---------------------------------------------------------------------- 2. inputs that failed to move are moved later


@needs_root
def test_inputs_that_could_not_move_are_moved_by_later_runs(tree, capsys):
    flats = _flats(tree, n=5)
    digests = _digests(flats)
    away = tree.root / "away"
    with small_filesystem(away, "24k"):  # room for two inputs of 8.6 kB
        config = _rules(tree, move_to=str(away))
        assert _run_once(config) == 1
        first = capsys.readouterr().out
        assert "not moved yet" in first or "input(s) not moved yet" in first
        masters = list((tree.root / "captures" / "masters").glob("*.fits"))
        assert len(masters) == 1
        ledger = Ledger.open(tree.root / "state")
        (job,) = ledger.jobs()
        assert job.state == MOVES_PENDING
        left = sorted(p.name for p in (tree.root / "captures" / "night1").glob("flat_*.fits"))
        assert 0 < len(left) < 5

        # status names the job; another run does not combine the inputs again and exits 1
        assert main(["status", "--config", str(config)]) == 0
        assert "Inputs not moved yet" in capsys.readouterr().out
        assert _run_once(config) == 1
        again = capsys.readouterr().out
        assert "not moved yet" in again and "no groups to combine" not in again
        assert len(list((tree.root / "captures" / "masters").glob("*.fits"))) == 1

        _resize(away, "1m")
        assert _run_once(config) == 0
        capsys.readouterr()
        assert Ledger.open(tree.root / "state").job(job.id).state == DONE
        assert not list((tree.root / "captures" / "night1").glob("flat_*.fits"))
        assert _digests(sorted(away.glob("flat_*.fits"))) == digests  # every input once, unchanged
        assert len(list((tree.root / "captures" / "masters").glob("*.fits"))) == 1


# ---------------------------------------------------------------------- 3. unreadable folders


def _flatd_without_root_powers(*args: str) -> subprocess.CompletedProcess:
    """The installed flatd; as root, without the capabilities that bypass file permissions."""
    command = [sys.executable, "-m", "flatd.cli", *args]
    if IS_ROOT:
        command = ["setpriv", "--inh-caps=-dac_override,-dac_read_search",
                   "--bounding-set=-dac_override,-dac_read_search", "--", *command]
    env = {k: v for k, v in os.environ.items() if k != "FLATD_CONFIG"}
    return subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)


@pytest.mark.parametrize("dry_run", [False, True])
@pytest.mark.parametrize("which", ["capture", "sub"])
def test_an_unreadable_folder_is_an_error_not_silence(tree, which, dry_run):
    _flats(tree)
    config = _rules(tree)
    folder = tree.root / "captures" if which == "capture" else tree.root / "captures" / "night1"
    folder.chmod(0)
    try:
        result = _flatd_without_root_powers("run-once", "--config", str(config), *(["--dry-run"] if dry_run else []))
    finally:
        folder.chmod(0o755)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"cannot read folder {folder}: Permission denied" in result.stdout
    assert "no groups to combine" not in result.stdout


# ---------------------------------------------------------------------- 4. the file must be the file that was planned


def _replace_after_planning(monkeypatch, path: Path, make):
    real = runner_module.plan_frames

    def plan_then_replace(*args, **kwargs):
        plan = real(*args, **kwargs)
        temp = path.with_name("replacement.tmp")
        make(temp)
        os.replace(temp, path)
        return plan

    monkeypatch.setattr(runner_module, "plan_frames", plan_then_replace)


@pytest.mark.parametrize("replacement", ["light", "other-size"])
def test_a_flat_replaced_after_planning_fails_its_group_and_nothing_moves(tree, capsys, monkeypatch, replacement):
    flats = _flats(tree)
    config = _rules(tree)
    victim = flats[1]
    if replacement == "light":
        make = lambda p: write_fits(p, np.full((40, 50), 9000, np.uint16), IMAGETYP="LIGHT", FILTER="R")  # noqa: E731
    else:
        make = lambda p: write_fits(p, np.full((20, 25), 9000, np.uint16), IMAGETYP="FLAT", FILTER="R")  # noqa: E731
    _replace_after_planning(monkeypatch, victim, make)
    assert _run_once(config) == 1
    text = capsys.readouterr().out
    assert f"{victim} changed since it was planned" in text and "nothing is moved" in text
    assert not list((tree.root / "captures").rglob("masters/*.fits"))
    assert all(p.exists() for p in flats) and not (victim.parent / "originals").exists()
    (job,) = Ledger.open(tree.root / "state").jobs()
    assert job.state == FAILED


def test_a_flat_changed_after_stacking_is_not_moved(tree, capsys, monkeypatch):
    flats = _flats(tree)
    config = _rules(tree)
    victim = flats[2]
    import flatd.output.masters as masters_module  # the runner imports it when it writes

    real_write = masters_module.write_master

    def write_then_touch(*args, **kwargs):
        master = real_write(*args, **kwargs)
        with open(victim, "r+b") as fh:  # a tool rewrites the file in place
            fh.seek(-10, os.SEEK_END)
            fh.write(b"0123456789")
        os.utime(victim, (1e9, 1e9))
        return master

    monkeypatch.setattr(masters_module, "write_master", write_then_touch)
    assert _run_once(config) == 1
    assert f"{victim} changed since it was read" in capsys.readouterr().out
    assert victim.exists()  # left in place
    moved = sorted(p.name for p in (victim.parent / "originals").glob("*.fits"))
    assert moved == sorted(p.name for p in flats if p != victim)
    monkeypatch.undo()
    assert _run_once(config) == 0  # the changed file is a new file now; alone, too few for a group
    assert len(list((tree.root / "captures" / "masters").glob("*.fits"))) == 1


# ---------------------------------------------------------------------- 6. run-once and files still being written


def test_run_once_leaves_out_a_file_still_changing_after_its_wait(tree, capsys, monkeypatch):
    """A file whose mtime keeps moving is not read; the wait is bounded."""
    import flatd.runonce as service  # run-once lives in flatd.runonce

    flats = _flats(tree)
    config = _rules(tree).read_text().replace("stable: 0", "stable: 1s")
    (tree.root / "flatd.yaml").write_text(config)
    monkeypatch.setattr(service, "MAX_WAIT", 0.5)
    for p in flats:
        os.utime(p, None)  # just written: all wait
    busy = flats[0]
    stop = []

    import threading

    def keep_touching():
        while not stop:
            os.utime(busy, None)
            threading.Event().wait(0.1)

    toucher = threading.Thread(target=keep_touching)
    toucher.start()
    try:
        code = _run_once(tree.root / "flatd.yaml")
    finally:
        stop.append(1)
        toucher.join()
    out = capsys.readouterr().out
    assert code == 0
    assert f"left out {busy}: still being written" in out
    (master,) = (tree.root / "captures" / "masters").glob("*.fits")
    assert fits.getheader(master)["NCOMBINE"] == 3


# ---------------------------------------------------------------------- 8. exit codes


def test_a_group_that_failed_before_is_not_all_done(tree, capsys):
    flats = _flats(tree)
    config = _rules(tree, extra="quality: {enabled: false}\n")  # the flat checks would leave the zero flat out
    with fits.open(flats[0], mode="update") as hdul:
        hdul[0].data[:] = 0  # a level of zero cannot be normalized: the group fails
    assert _run_once(config) == 1
    assert "failed" in capsys.readouterr().out
    assert _run_once(config) == 1
    text = capsys.readouterr().out
    assert "not done" in text and "flatd retry" in text
    assert Ledger.open(tree.root / "state").jobs()[0].state == FAILED


# ---------------------------------------------------------------------- 9. the output folder is a source of truth


def test_a_lost_ledger_does_not_make_a_second_master(tree, capsys):
    flats = _flats(tree)
    config = _rules(tree, move_to="null")
    assert _run_once(config) == 0
    shutil.rmtree(tree.root / "state")
    capsys.readouterr()
    assert _run_once(config) == 0
    masters = list((tree.root / "captures" / "masters").glob("*.fits"))
    assert len(masters) == 1, masters
    (job,) = Ledger.open(tree.root / "state").jobs()
    assert job.state == DONE and job.master == str(masters[0])
    assert all(p.exists() for p in flats)
    assert _run_once(config) == 0  # and the next run knows the inputs are combined
    assert "no groups to combine" in capsys.readouterr().out


def test_inputs_moved_into_an_absolute_folder_inside_the_capture_are_never_taken_again(tree, capsys):
    _flats(tree)
    archive = tree.root / "captures" / "archive"
    config = _rules(tree, move_to=f'"{archive}/{{date}}"')
    assert _run_once(config) == 0
    moved = list(archive.rglob("*.fits"))
    assert len(moved) == 4
    for state in ("state", "state2"):  # the ledger lost, or a fresh state folder
        shutil.rmtree(tree.root / "state", ignore_errors=True)
        capsys.readouterr()
        assert _run_once(_rules(tree, move_to=f'"{archive}/{{date}}"', state=state)) == 0
        assert "no groups to combine" in capsys.readouterr().out
    assert sorted(archive.rglob("*.fits")) == sorted(moved)
    assert len(list((tree.root / "captures" / "masters").glob("*.fits"))) == 1


# ---------------------------------------------------------------------- 10. two flatd processes, two state folders


def test_an_output_folder_held_by_another_flatd_is_skipped_with_the_reason(tree):
    _flats(tree)
    rules = load_rules(_rules(tree))
    out = tree.root / "captures" / "masters"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from flatd.ledger import OutputLock; "
         f"OutputLock({str(out)!r}, 'state folder /elsewhere').acquire(); print('held', flush=True); time.sleep(30)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        report = process_capture(rules.capture[0], rules, Runner(Ledger.open(rules.state), lock_wait=0.3), stable=0)
    finally:
        holder.kill()
        holder.wait()
    (outcome,) = report.outcomes
    assert outcome.state == "busy" and report.exit_code == 1
    assert f"in use by another flatd (pid {holder.pid}, state folder /elsewhere)" in outcome.reason
    assert not list(out.glob("*.fits"))
    # The holder died: the kernel released its lock; the next run makes the master.
    report = process_capture(rules.capture[0], rules, Runner(Ledger.open(rules.state), lock_wait=0.3), stable=0)
    assert [o.state for o in report.outcomes] == ["done"]


def test_two_state_folders_on_one_capture_folder_make_one_master(tree, capsys):
    _flats(tree)
    first = _rules(tree, move_to="null", state="stateA")
    assert _run_once(first) == 0
    second = _rules(tree, move_to="null", state="stateB")
    assert _run_once(second) == 0
    assert len(list((tree.root / "captures" / "masters").glob("*.fits"))) == 1
    (job,) = Ledger.open(tree.root / "stateB").jobs()
    assert job.state == DONE


# ---------------------------------------------------------------------- 11. symbolic links


def test_a_link_to_a_file_outside_the_capture_folders_is_not_followed(tree, capsys):
    _flats(tree)
    outside = tree.flat("elsewhere.fits", folder="private")
    link = tree.root / "captures" / "night1" / "flat_R_9.fits"
    link.symlink_to(outside)
    config = _rules(tree, extra="")
    assert _run_once(config) == 0
    out = capsys.readouterr().out
    assert f"left out {link}: a symbolic link to {outside}, outside every capture folder" in out
    (master,) = (tree.root / "captures" / "masters").glob("*.fits")
    assert fits.getheader(master)["NCOMBINE"] == 4
    assert link.is_symlink() and outside.exists()


def test_with_follow_symlinks_the_link_moves_and_its_target_stays(tree, capsys):
    _flats(tree)
    outside = tree.flat("elsewhere.fits", folder="private")
    before = outside.read_bytes()
    inode = outside.stat().st_ino
    link = tree.root / "captures" / "night1" / "flat_R_9.fits"
    link.symlink_to(Path("../../private/elsewhere.fits"))  # relative, as people make them
    text = RULES.format(root=tree.root, output="masters", move_to='"originals"', state="state")
    text = text.replace(f"  - path: {tree.root}/captures", f"  - path: {tree.root}/captures\n    follow_symlinks: true")
    assert _run_once(tree.rules(text)) == 0
    (master,) = (tree.root / "captures" / "masters").glob("*.fits")
    assert fits.getheader(master)["NCOMBINE"] == 5
    moved = tree.root / "captures" / "night1" / "originals" / "flat_R_9.fits"
    assert moved.is_symlink() and moved.resolve() == outside
    assert outside.read_bytes() == before and outside.stat().st_ino == inode and outside.stat().st_nlink == 1


def test_the_report_names_the_jobs_a_crash_interrupted(tree, capsys):
    """The report is all a terminal shows (log lines are muted there) and all that
    `> f 2>/dev/null` keeps: a job finished or rolled back after a crash is in it."""
    _flats(tree)
    config = _rules(tree)
    ledger = Ledger.open(tree.root / "state")
    ledger.plan_job("dead0123beef4567", "1x1 40x50, filter R", None, tree.root / "captures" / "night1",
                    tree.root / "captures" / "masters", "M.fits", [])  # killed before its master was written
    ledger.close()
    assert _run_once(config) == 0
    out = capsys.readouterr().out
    assert "dead0123beef4567" in out and "1x1 40x50, filter R" in out, out
