"""The Dask engine on a LocalCluster of worker processes started by the test: the same
masters as the local engine, a worker killed mid-task, a scheduler that is down."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

distributed = pytest.importorskip("distributed", reason="the dask extra (distributed) is not installed")

from flatd import __version__  # noqa: E402
from flatd.cli import main  # noqa: E402
from flatd.config import Engine  # noqa: E402
from flatd.grouping import GroupOptions, group_frames  # noqa: E402
from flatd.ingest.frames import read_frame  # noqa: E402
from flatd.jobs import Job, StackInput  # noqa: E402
from flatd.stack import methods as registry  # noqa: E402
from flatd.stack.engines import StackError  # noqa: E402
from flatd.stack.engines.dask import DaskEngine, map_path, remote_job  # noqa: E402
from flatd.stack.engines.local import LocalEngine  # noqa: E402

from fitstree import write_fits  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                  worker_dashboard_address=None) as c:
        yield c


def _flats(folder: Path, n: int = 7, shape=(60, 80), seed: int = 1) -> list[Path]:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:shape[0], 0:shape[1]]
    pattern = 1.0 - 0.3 * (((x - shape[1] / 2) / shape[1]) ** 2 + ((y - shape[0] / 2) / shape[0]) ** 2)
    paths = []
    for i in range(n):
        data = rng.normal(20000 * (1 + 0.03 * i) * pattern, 150)
        data[rng.integers(0, shape[0]), rng.integers(0, shape[1])] = 60000  # a cosmic ray
        paths.append(write_fits(folder / f"flat_{i:02d}.fits", np.clip(data, 0, 65535).astype(np.uint16),
                                IMAGETYP="FLAT", FILTER="L", EXPTIME=2.0, CCD_TEMP=-10.0,
                                DATE_OBS=f"2026-11-24T18:{i:02d}:00"))
    return paths


def _job(paths, method: str, normalize: str = "multiplicative") -> Job:
    frames = [read_frame(p) for p in paths]
    (group,), _ = group_frames(frames, GroupOptions())
    m = registry.Method(method)
    return Job(f"job-{method}", group, None, m, normalize, tuple(StackInput(f) for f in group.frames),
               Path("/unused"), "m.fits", None)


def test_every_method_gives_the_local_engines_master_bit_for_bit(tmp_path, cluster):
    paths = _flats(tmp_path / "flats")
    dask_engine = DaskEngine(Engine(kind="dask", address=cluster.scheduler_address))
    local = LocalEngine(Engine())
    try:
        for name in registry.names():
            for normalize in ("none", "multiplicative"):
                job = _job(paths, name, normalize)
                remote, here = dask_engine.stack(job), local.stack(job)
                assert remote.image.tobytes() == here.image.tobytes(), (name, normalize)
                assert remote.factors == here.factors
                assert (remote.rejected is None) == (here.rejected is None)
                if here.rejected is not None:
                    assert (remote.rejected == here.rejected).all()
    finally:
        dask_engine.close()
    assert dask_engine.retries == 0


RULES = """
capture:
  - path: {root}/cap
output: {{directory: masters}}
inputs: {{move_to: "originals"}}
grouping: {{min_group_size: 3}}
combine: {{method: {method}}}
engine: {engine}
stable: 0
state: {root}/state
"""


def _run_once(root: Path, engine: str, method: str = "auto") -> tuple[int, list[Path]]:
    config = root / "flatd.yaml"
    config.write_text(RULES.format(root=root, engine=engine, method=method))
    code = main(["run-once", "--config", str(config)])
    return code, sorted((root / "cap" / "masters").glob("*.fits"))


def test_run_once_on_the_cluster_writes_the_same_master_and_moves_the_inputs(tmp_path, cluster, capsys):
    for where in ("local", "dask"):  # two groups: submitted to the cluster at once
        _flats(tmp_path / where / "cap" / "night1")
        _flats(tmp_path / where / "cap" / "night2", seed=2)
    code, local = _run_once(tmp_path / "local", "{kind: local}")
    assert code == 0 and len(local) == 2
    code, remote = _run_once(tmp_path / "dask", f"{{kind: dask, address: '{cluster.scheduler_address}'}}")
    assert code == 0 and len(remote) == 2, capsys.readouterr().out
    for here, there in zip(local, remote):
        assert fits.getdata(there).tobytes() == fits.getdata(here).tobytes()
        assert fits.getheader(there)["NCOMBINE"] == 7
    assert not list((tmp_path / "dask" / "cap" / "night1").glob("flat_*.fits"))
    assert len(list((tmp_path / "dask" / "cap" / "night1" / "originals").glob("flat_*.fits"))) == 7


def test_engine_option_overrides_the_rules(tmp_path, cluster, capsys):
    paths = _flats(tmp_path / "flats", n=5)
    out = tmp_path / "m.fits"
    assert main(["combine", "-m", "--engine", cluster.scheduler_address, "-o", str(out), *map(str, paths)]) == 0
    local = tmp_path / "l.fits"
    assert main(["combine", "-m", "--engine", "local", "-o", str(local), *map(str, paths)]) == 0
    assert fits.getdata(out).tobytes() == fits.getdata(local).tobytes()
    assert main(["combine", "-m", "--engine", "carrier-pigeon", "-o", str(out), *map(str, paths)]) == 2
    assert "--engine 'carrier-pigeon'" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("fallback", ["local", "fail"])
def test_a_scheduler_that_is_down(tmp_path, fallback, capsys):
    _flats(tmp_path / "cap" / "night1")
    address = f"tcp://127.0.0.1:{_free_port()}"
    code, masters = _run_once(tmp_path, f"{{kind: dask, address: '{address}', fallback: {fallback}, "
                                        "connect_timeout: 1}")
    out = " ".join(capsys.readouterr().out.split())
    if fallback == "local":
        assert code == 0 and len(masters) == 1
    else:
        assert code == 1 and masters == []
        assert f"engine.address {address}: scheduler not reachable" in out and "(engine.fallback: fail)" in out
        assert len(list((tmp_path / "cap" / "night1").glob("flat_*.fits"))) == 7, "nothing moved"


def test_the_fallback_is_said_in_the_log(tmp_path, caplog):
    paths = _flats(tmp_path / "flats", n=5)
    engine = DaskEngine(Engine(kind="dask", address=f"tcp://127.0.0.1:{_free_port()}", connect_timeout=1))
    with caplog.at_level("WARNING", logger="flatd"):
        result = engine.stack(_job(paths, "median"))
    assert result.image.shape == (60, 80)
    assert "scheduler not reachable" in caplog.text and "stacking in this process" in caplog.text
    with pytest.raises(StackError, match="engine.fallback: fail"):
        DaskEngine(Engine(kind="dask", address=engine.settings.address, fallback="fail",
                          connect_timeout=1)).stack(_job(paths, "median"))


def test_workers_of_another_flatd_version_get_no_task(tmp_path, cluster):
    paths = _flats(tmp_path / "flats", n=5)
    client = distributed.Client(cluster.scheduler_address, set_as_default=False)
    odd = sorted(client.scheduler_info()["workers"])[0]

    def pretend(version):
        import flatd

        flatd.__version__ = version

    try:
        client.run(pretend, "0.0.1-other", workers=[odd])
        engine = DaskEngine(Engine(kind="dask", address=cluster.scheduler_address, fallback="fail"))
        assert odd not in engine.compatible_workers() and len(engine.compatible_workers()) == 1
        engine.stack(_job(paths, "median"))
        engine.close()
        client.run(pretend, "0.0.1-other")  # every worker now
        engine = DaskEngine(Engine(kind="dask", address=cluster.scheduler_address, fallback="fail"))
        with pytest.raises(StackError, match=f"no worker runs flatd {__version__}"):
            engine.stack(_job(paths, "median"))
        engine.close()
    finally:
        client.run(pretend, __version__)
        client.close()


def test_engine_check_lists_the_workers(tmp_path, cluster, capsys):
    (tmp_path / "cap").mkdir()
    config = tmp_path / "flatd.yaml"
    config.write_text(RULES.format(root=tmp_path, method="mean",
                                   engine=f"{{kind: dask, address: '{cluster.scheduler_address}'}}"))
    assert main(["engine", "check", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert f"2 worker(s); this flatd {__version__}" in out and out.count(": ok") == 2
    config.write_text(RULES.format(root=tmp_path, method="mean", engine=(
        f"{{kind: dask, address: '{cluster.scheduler_address}', path_map: {{{tmp_path}: /nowhere}}}}")))
    assert main(["engine", "check", "--config", str(config)]) == 1
    assert "does not see /nowhere/cap" in capsys.readouterr().out
    assert main(["engine", "check", "--config", str(config), "--engine", f"tcp://127.0.0.1:{_free_port()}"]) == 2


def test_a_worker_killed_mid_task_and_the_job_still_finishes(tmp_path, cluster):
    """Big enough to take a while on one thread; the worker running it is killed with
    SIGKILL (its nanny starts a new one); the scheduler runs the task elsewhere."""
    paths = _flats(tmp_path / "flats", n=16, shape=(1200, 1600), seed=5)
    settings = Engine(kind="dask", address=cluster.scheduler_address, workers=1, memory_limit=16 * 2**20)
    engine = DaskEngine(settings)
    job = _job(paths, "linear-fit")
    client = distributed.Client(cluster.scheduler_address, set_as_default=False)
    pids = client.run(os.getpid)
    done: dict = {}
    runner = threading.Thread(target=lambda: done.update(result=engine.stack(job)))
    runner.start()
    deadline = time.monotonic() + 30
    killed = None
    while killed is None and time.monotonic() < deadline and runner.is_alive():
        busy = [w for w, tasks in client.processing().items() if tasks]
        if busy:
            killed = busy[0]
            os.kill(pids[killed], signal.SIGKILL)
        time.sleep(0.005)
    runner.join(120)
    client.close()
    assert killed is not None, "the task finished before a worker could be killed"
    assert "result" in done
    assert done["result"].image.tobytes() == LocalEngine(settings).stack(job).image.tobytes()
    assert engine.retries >= 1
    engine.close()


def test_paths_map_to_where_the_workers_mount_them(tmp_path):
    mapping = {"/data": "/mnt/nas/data", "/data/special": "/srv/special"}
    assert map_path(Path("/data/night1/f.fits"), mapping) == Path("/mnt/nas/data/night1/f.fits")
    assert map_path(Path("/data/special/f.fits"), mapping) == Path("/srv/special/f.fits")
    assert map_path(Path("/database/f.fits"), mapping) == Path("/database/f.fits")
    assert map_path(Path("/other/f.fits"), {"/": "/mnt/"}) == Path("/mnt/other/f.fits")
    paths = _flats(tmp_path / "flats", n=3)
    job = remote_job(_job(paths, "mean"), {str(tmp_path): "/mnt/x"})
    assert all(str(i.frame.path).startswith("/mnt/x/flats/") and i.frame.inode == 0 for i in job.inputs)
    assert all(i.frame.file_size > 0 for i in job.inputs), "checked there by size, mtime and header"


@pytest.mark.parametrize("engine, message", [
    ("{kind: dask}", "kind 'dask' needs engine.address"),
    ("{kind: dask, address: 'http://x'}", "is not a Dask scheduler address"),
    ("{kind: dask, address: 42}", "is not a Dask scheduler address"),
    ("{kind: cloud}", "Input should be 'local' or 'dask'"),
    ("{kind: dask, address: 'tcp://x:1', fallback: maybe}", "Input should be 'local' or 'fail'"),
    ("{kind: dask, address: 'tcp://x:1', path_map: {relative: /x}}", "path_map maps absolute paths"),
    ("{kind: dask, address: 'tcp://x:1', path_map: [1, 2]}", "valid dictionary"),
    ("{kind: dask, address: 'tcp://x:1', connect_timeout: soon}", "is not a duration"),
])
def test_hostile_engine_settings_name_the_key(tmp_path, engine, message, capsys):
    config = tmp_path / "flatd.yaml"
    config.write_text(RULES.format(root=tmp_path, method="mean", engine=engine))
    assert main(["config", "check", str(config)]) == 2
    out = capsys.readouterr()
    assert "at 'engine" in out.out + out.err and message in out.out + out.err
