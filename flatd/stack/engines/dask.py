"""The Dask engine: each group's combine is one task on a Dask ``distributed`` cluster.

A worker runs the same streaming stacker (:class:`flatd.stack.engines.local.LocalEngine`)
on the files, which it reaches through the same paths or through ``engine.path_map``
(a worker that mounts the share elsewhere). The master's pixels come back to this
process, the coordinator, which writes the master, records it and moves the inputs as
with the local engine: the ledger, the locks and the moves never leave it.

- A worker that dies mid-task makes the scheduler run the task again elsewhere; the
  number of such retries is counted (``DaskEngine.retries``) and said in the log.
- A scheduler that cannot be reached: ``engine.fallback: local`` stacks in this process
  and says so once; ``fail`` fails the job (so the batch) with the reason.
- Workers with another flatd version are refused: tasks go only to workers whose version
  is this one's (``flatd engine check`` lists them).

``distributed`` is an optional dependency (``pip install flatd[dask]``), imported only
when this engine is made.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Optional, Sequence

from flatd import __version__
from flatd.errors import FlatdError, StackError
from flatd.stack.engines import ProgressFactory, StackResult

if TYPE_CHECKING:  # pragma: no cover
    from flatd.config import Engine as EngineSettings
    from flatd.jobs import Job

# How long a worker death may keep a task from finishing before the scheduler gives up
# on it (distributed's allowed-failures): the task then fails with the reason.
ALLOWED_FAILURES = 3


class EngineUnavailable(FlatdError):
    """The cluster cannot be used: no scheduler, no compatible worker, no distributed."""


def _import_distributed():
    try:
        import distributed
    except ImportError:
        raise EngineUnavailable("engine.kind dask needs the 'distributed' package: pip install 'flatd[dask]'") from None
    return distributed


# --------------------------------------------------------------------------- paths


def map_path(path: Path, path_map: Mapping[str, str]) -> Path:
    """`path` as a worker sees it: the longest key of `path_map` that is a whole leading
    part of the path replaced by its value; unchanged when none is."""
    text = str(path)
    for prefix in sorted(path_map, key=len, reverse=True):
        head = prefix.rstrip("/")
        if text == head or text.startswith(head + "/"):
            return Path(path_map[prefix].rstrip("/") + text[len(head):])
    return path


def _remote_frame(frame, path_map: Mapping[str, str]):
    """The frame as a worker opens it: its mapped path; checked there by size, mtime and
    header (another machine's device and inode numbers mean nothing here)."""
    return dataclasses.replace(frame, path=map_path(Path(frame.path), path_map), device=0, inode=0)


def remote_job(job: "Job", path_map: Mapping[str, str]) -> "Job":
    """The job with every flat and calibration frame as a worker opens it."""
    inputs = []
    for item in job.inputs:
        cal = item.calibration
        if cal.frame is not None:
            cal = dataclasses.replace(cal, frame=_remote_frame(cal.frame, path_map))
        inputs.append(dataclasses.replace(item, frame=_remote_frame(item.frame, path_map), calibration=cal))
    return dataclasses.replace(job, inputs=tuple(inputs))


# --------------------------------------------------------------------------- on the worker


def stack_on_worker(job: "Job", settings: "EngineSettings", version: str) -> StackResult:
    """The task: this worker's streaming stacker on the job; refused by a worker of
    another flatd version (its master could differ)."""
    from flatd import __version__ as mine
    from flatd.stack.engines.local import LocalEngine

    if mine != version:
        raise StackError(f"worker runs flatd {mine}, the coordinator {version}: refused")
    return LocalEngine(settings).stack(job)


def worker_facts(paths: Sequence[str] = ()) -> dict:
    """What `flatd engine check` asks every worker: its flatd version and which of the
    (mapped) capture paths it sees."""
    import platform

    from flatd import __version__ as mine

    return {"version": mine, "host": platform.node(), "cpus": os.cpu_count(),
            "paths": {p: os.path.isdir(p) for p in paths}}


# --------------------------------------------------------------------------- the engine


class DaskEngine:
    """Group combines as tasks on the cluster at `settings.address` (see the module)."""

    def __init__(self, settings: "EngineSettings", progress: Optional[ProgressFactory] = None):
        self.settings = settings
        self.progress = progress
        self.retries = 0  # tasks run again because a worker died
        self._client = None
        self._local = None
        self._compatible: Optional[list[str]] = None
        self._lock = threading.Lock()
        self._fell_back = False
        self._pending: dict[str, tuple[object, str]] = {}  # job id -> (future, key): submitted ahead

    # ---- connecting
    def client(self):
        """The connected client (made once); EngineUnavailable when the scheduler cannot be reached."""
        with self._lock:
            if self._client is None:
                distributed = _import_distributed()
                try:
                    self._client = distributed.Client(self.settings.address, timeout=self.settings.connect_timeout,
                                                      set_as_default=False)
                except (OSError, TimeoutError) as exc:
                    raise EngineUnavailable(f"engine.address {self.settings.address}: scheduler not reachable "
                                            f"({exc.__class__.__name__}: {exc})") from None
            return self._client

    def compatible_workers(self) -> list[str]:
        """Addresses of the workers that run this flatd version (asked once, again after a refusal)."""
        if self._compatible is None:
            facts = self.client().run(worker_facts)
            self._compatible = sorted(a for a, f in facts.items() if f.get("version") == __version__)
            refused = sorted(set(facts) - set(self._compatible))
            if refused:
                logging.getLogger("flatd").warning(
                    "engine: workers %s run another flatd version and get no task", ", ".join(refused))
        if not self._compatible:
            raise EngineUnavailable(f"engine.address {self.settings.address}: no worker runs flatd {__version__}")
        return self._compatible

    def prepare(self, jobs: Sequence["Job"]) -> None:
        """Submit every job of a batch at once, so that the workers stack them side by side
        while this process writes the masters one after another; `stack` then waits for
        its job's task. Nothing is submitted when the cluster cannot be used (`stack`
        falls back then, job by job)."""
        try:
            workers = self.compatible_workers()
        except EngineUnavailable:
            return
        for job in jobs:
            if job.id not in self._pending:
                self._pending[job.id] = self._submit(job, workers)

    def close(self) -> None:
        for future, _ in self._pending.values():
            future.cancel()
        self._pending.clear()
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    # ---- stacking
    def stack(self, job: "Job") -> StackResult:
        submitted = self._pending.pop(job.id, None)
        if submitted is not None:
            return self._result(*submitted)
        try:
            workers = self.compatible_workers()
        except EngineUnavailable as exc:
            return self._fall_back(job, exc)
        return self._result(*self._submit(job, workers))

    def _fall_back(self, job: "Job", exc: EngineUnavailable) -> StackResult:
        if self.settings.fallback != "local":
            raise StackError(f"{exc} (engine.fallback: fail)") from None
        if not self._fell_back:
            logging.getLogger("flatd").warning("engine: %s; stacking in this process (engine.fallback: local)", exc)
            self._fell_back = True
        if self._local is None:
            from flatd.stack.engines.local import LocalEngine

            self._local = LocalEngine(self.settings, self.progress)
        self._compatible = None  # ask again next time: the cluster may be back
        with self._lock:
            self._client = None
        return self._local.stack(job)

    def _submit(self, job: "Job", workers: list[str]) -> tuple[object, str]:
        key = f"flatd-stack-{job.id}-{os.urandom(4).hex()}"
        future = self.client().submit(stack_on_worker, remote_job(job, self.settings.path_map), self.settings,
                                      __version__, key=key, pure=False, workers=workers,
                                      allow_other_workers=False)
        return future, key

    def _result(self, future, key: str) -> StackResult:
        client = self.client()
        try:
            result = future.result()
        except StackError:
            raise
        except FlatdError as exc:
            raise StackError(str(exc)) from None
        except Exception as exc:  # a worker killed too often, a lost connection
            raise StackError(f"the cluster did not finish the job: {exc.__class__.__name__}: {exc}") from None
        finally:
            self._count_retries(client, key)
            future.release()
        return result

    def _count_retries(self, client, key: str) -> None:
        """Add the times the scheduler re-ran the task because its worker died."""
        try:
            suspicious = client.run_on_scheduler(_suspicious, key=key)
        except Exception:  # the scheduler is gone: nothing to count
            return
        if suspicious:
            self.retries += suspicious
            logging.getLogger("flatd").warning("engine: %s ran again %d time(s) after a worker died", key, suspicious)


def _suspicious(dask_scheduler=None, key: str = "") -> int:
    """On the scheduler: how many workers died while running `key`."""
    state = dask_scheduler.tasks.get(key)
    return int(getattr(state, "suspicious", 0) or 0) if state is not None else 0


# --------------------------------------------------------------------------- flatd engine check


def check_cluster(settings: "EngineSettings", capture_paths: Sequence[Path]) -> tuple[list[str], int]:
    """Lines for `flatd engine check` and its exit code: 0 every worker usable, 1 some or
    all not (another version, a folder not seen, no worker), 2 no scheduler."""
    engine = DaskEngine(settings)
    try:
        client = engine.client()
    except EngineUnavailable as exc:
        return [f"engine: {exc}"], 2
    try:
        mapped = [str(map_path(Path(p), settings.path_map)) for p in capture_paths]
        facts = client.run(worker_facts, mapped)
    finally:
        engine.close()
    lines = [f"scheduler {settings.address}: {len(facts)} worker(s); this flatd {__version__}"]
    usable = 0
    for address in sorted(facts):
        fact = facts[address]
        problems = []
        if fact.get("version") != __version__:
            problems.append(f"flatd {fact.get('version')}: refused (not {__version__})")
        problems += [f"does not see {p}" for p, seen in fact.get("paths", {}).items() if not seen]
        usable += not problems
        state = "; ".join(problems) if problems else "ok"
        lines.append(f"  {address}  {fact.get('host')}  {fact.get('cpus')} CPU(s)  flatd {fact.get('version')}: {state}")
    return lines, 0 if facts and usable == len(facts) else 1

