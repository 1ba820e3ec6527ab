"""Hooks: the commands the rules file runs after each master, failed group and batch.

`hooks.after_master`, `hooks.on_failure` and `hooks.after_batch` (per rule too) list
commands. Each gets its event's JSON document on stdin and the main facts as FLATD_*
environment variables; none goes through a shell (write `sh -c '...'` for one). They
run one after another in a thread of their own, after the master's inputs are moved,
so a job never waits for them and nothing they do rolls one back. Each may run for
`hooks.timeout`; then it is killed, with its process group. What a command printed
(the end of its stdout and stderr) is logged with its exit status.
"""

from __future__ import annotations

import json
import os
import queue
import shlex
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

from flatd import __version__
from flatd.notify import events as E
from flatd.notify.outcome import Gatherer, MasterOutcome, failure_document, jsonable, of_folder

OUTPUT_KEEP = 2000  # bytes of a hook's stdout and of its stderr kept for the log: the last ones
KILL_GRACE = 2.0  # seconds between SIGTERM and SIGKILL to a hook past its timeout
KINDS = ("after_master", "on_failure", "after_batch")


@dataclass(frozen=True)
class HookCall:
    """One command to run, with what it is told."""

    kind: str
    argv: tuple[str, ...]
    document: dict
    env: dict
    timeout: float

    @property
    def shown(self) -> str:
        """The command as a line for the log (shortened)."""
        text = shlex.join(self.argv)
        return text if len(text) <= 200 else text[:199] + "…"


@dataclass(frozen=True)
class HookResult:
    returncode: Optional[int]  # None: it did not start, or was killed at its timeout
    seconds: float
    stdout: str = ""
    stderr: str = ""
    timed_out: bool = False
    error: Optional[str] = None  # why it could not start

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


# --------------------------------------------------------------------------- running one command


class _Tail:
    """Reads a pipe to its end in a thread, keeping only its last `keep` bytes."""

    def __init__(self, stream, keep: int = OUTPUT_KEEP):
        self.keep, self.data, self.total = keep, bytearray(), 0
        self.thread = threading.Thread(target=self._read, args=(stream,), daemon=True, name="flatd-hook-output")
        self.thread.start()

    def _read(self, stream) -> None:
        try:
            while chunk := os.read(stream.fileno(), 65536):
                self.total += len(chunk)
                self.data += chunk
                del self.data[:-self.keep]
        except (OSError, ValueError):
            pass
        finally:
            stream.close()

    def text(self, wait: float = 1.0) -> str:
        self.thread.join(wait)  # a child that kept the pipe open (setsid, daemonized) is not waited for
        text = bytes(self.data).decode("utf-8", "replace").strip()
        cut = self.total - len(self.data)
        return f"[…{cut} bytes before] {text}" if cut > 0 else text


def _feed(stream, data: bytes) -> None:
    """Write the document to the hook's stdin; a hook that does not read it is fine."""
    try:
        stream.write(data)
    except (BrokenPipeError, OSError, ValueError):
        pass
    finally:
        try:
            stream.close()
        except (BrokenPipeError, OSError):
            pass


def kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the hook's process group, SIGKILL after KILL_GRACE (to what is left too)."""
    for sig, wait in ((signal.SIGTERM, KILL_GRACE), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            continue


def run_command(call: HookCall, started: Callable[[subprocess.Popen], None] = lambda p: None) -> HookResult:
    """Run one hook command to its end or its timeout; never raises."""
    begin = time.monotonic()
    env = {**os.environ, **{k: str(v).replace("\0", "") for k, v in call.env.items()}}
    try:
        proc = subprocess.Popen(list(call.argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=env, start_new_session=True, close_fds=True)
    except (OSError, ValueError) as exc:
        return HookResult(None, 0.0, error=getattr(exc, "strerror", None) or str(exc))
    started(proc)
    out, err = _Tail(proc.stdout), _Tail(proc.stderr)
    threading.Thread(target=_feed, args=(proc.stdin, json.dumps(call.document).encode()), daemon=True,
                     name="flatd-hook-input").start()
    timed_out = False
    try:
        proc.wait(call.timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        kill_group(proc)
    code = None if timed_out else proc.returncode
    return HookResult(code, round(time.monotonic() - begin, 2), out.text(), err.text(), timed_out)


def log_result(call: HookCall, result: HookResult, stopping: bool = False) -> None:
    """One log line per command run: its exit status and the end of what it printed."""
    fields = {"hook": call.kind, "command": call.shown, "seconds": result.seconds}
    fields.update({k: v for k, v in (("stdout", result.stdout), ("stderr", result.stderr)) if v})
    if stopping and not result.ok:
        E.notice("hook_killed", f"{call.kind} hook killed with its process group: flatd is stopping", E.WARNING,
                 **fields)
    elif result.error is not None:
        E.notice("hook_failed", f"{call.kind} hook could not start: {call.argv[0]}: {result.error}", E.WARNING,
                 **fields)
    elif result.timed_out:
        E.notice("hook_timeout", f"{call.kind} hook ran past hooks.timeout ({call.timeout:g} s) and was killed "
                 "with its process group", E.WARNING, **fields)
    elif result.returncode != 0:
        E.notice("hook_failed", f"{call.kind} hook exited with status {result.returncode}", E.WARNING,
                 status=result.returncode, **fields)
    else:
        E.notice("hook_done", f"{call.kind} hook done", E.INFO, **fields)


# --------------------------------------------------------------------------- what each event runs


def master_call_facts(outcome: MasterOutcome) -> tuple[dict, dict]:
    """The after_master document and environment of a master."""
    doc = outcome.document()
    ev = outcome.written
    env = {"FLATD_STATUS": "found" if ev.found else "done", "FLATD_JOB": ev.job, "FLATD_MASTER": ev.path,
           "FLATD_GROUP": ev.group or "", "FLATD_RULE": ev.rule or "", "FLATD_FILES": ev.files,
           "FLATD_PREVIEW": (doc["previews"] or [""])[0], "FLATD_QC": outcome.verdict or "",
           "FLATD_MOVED_TO": outcome.moved_to or ""}
    return {"status": env["FLATD_STATUS"], **doc}, env


def failure_call_facts(ev: E.JobFailed) -> tuple[dict, dict]:
    env = {"FLATD_STATUS": "failed", "FLATD_JOB": ev.job or "", "FLATD_GROUP": ev.group,
           "FLATD_RULE": ev.rule or "", "FLATD_FILES": ev.files if ev.files is not None else "",
           "FLATD_REASON": ev.reason}
    return {"status": "failed", **failure_document(ev)}, env


def batch_call_facts(ev: E.BatchDone, masters: list[E.MasterWritten], failures: list[E.JobFailed]) -> tuple[dict, dict]:
    status = "failed" if ev.failed else "ok"
    doc = {"status": status, "folder": jsonable(ev.folder), "masters": ev.masters, "failed": ev.failed,
           "left_out": ev.left_out, "warn": ev.warn, "bad": ev.bad, "master_paths": [str(m.path) for m in masters],
           "failed_groups": [f.group for f in failures]}
    env = {"FLATD_STATUS": status, "FLATD_FOLDER": ev.folder or "", "FLATD_MASTERS": ev.masters,
           "FLATD_FAILED": ev.failed, "FLATD_LEFT_OUT": ev.left_out, "FLATD_WARN": ev.warn, "FLATD_BAD": ev.bad}
    return doc, env


class HookRunner:
    """The bus subscriber that runs hooks: it turns events into HookCalls (quickly, in the
    emitting thread) and runs them one at a time in its own thread."""

    def __init__(self, rules: Callable[[], object]):
        """`rules`: returns the Rules in force (the service's change at a reload)."""
        self.rules = rules
        self.gatherer = Gatherer()
        self.masters: list[E.MasterWritten] = []  # the batch's masters and failed groups, for after_batch
        self.failures: list[E.JobFailed] = []
        self.calls: "queue.Queue[Optional[HookCall]]" = queue.Queue()
        self.lock = threading.Lock()
        self.thread: Optional[threading.Thread] = None
        self.current: Optional[subprocess.Popen] = None
        self.abandon = threading.Event()

    def __call__(self, ev: E.Event) -> None:
        with self.lock:
            for outcome in self.gatherer.add(ev):
                self.masters.append(outcome.written)
                self._queue("after_master", outcome.written.rule, lambda o=outcome: master_call_facts(o))
            if isinstance(ev, E.JobFailed) and not ev.again:
                self.failures.append(ev)
                self._queue("on_failure", ev.rule, lambda: failure_call_facts(ev))
            elif isinstance(ev, E.BatchDone):
                masters, self.masters = of_folder(self.masters, ev.folder, lambda m: m.inputs)
                failures, self.failures = of_folder(self.failures, ev.folder, lambda f: f.inputs)
                self._queue("after_batch", None, lambda: batch_call_facts(ev, masters, failures))

    def _queue(self, kind: str, rule: Optional[str], facts: Callable[[], tuple[dict, dict]]) -> None:
        """Queue the commands of hooks.<kind> in force for `rule`, with the facts (document, environment)."""
        from flatd.config import hooks_for

        hooks = hooks_for(self.rules(), rule)
        commands = getattr(hooks, kind)
        if not commands:
            return
        document, env = facts()
        env = {"FLATD_EVENT": kind, "FLATD_VERSION": __version__, **{k: str(v) for k, v in env.items()}}
        document = {"event": kind, "flatd_version": __version__, **document}
        for argv in commands:
            self.calls.put(HookCall(kind, tuple(argv), document, env, hooks.timeout))
            self._start()

    def _start(self) -> None:
        if self.thread is None or not self.thread.is_alive():
            self.thread = threading.Thread(target=self._work, daemon=True, name="flatd-hooks")
            self.thread.start()

    def _work(self) -> None:
        while (call := self.calls.get()) is not None:
            if self.abandon.is_set():
                E.notice("hook_skipped", f"{call.kind} hook not run: flatd is stopping", E.WARNING,
                         hook=call.kind, command=call.shown)
                continue
            try:
                result = run_command(call, self._started)
                log_result(call, result, stopping=self.abandon.is_set())
            except Exception as exc:  # noqa: BLE001 - a bug loses this hook, not the next ones
                E.notice("hook_failed", f"{call.kind} hook: {type(exc).__name__}: {exc}", E.WARNING,
                         hook=call.kind, command=call.shown)
            self.current = None

    def _started(self, proc: subprocess.Popen) -> None:
        self.current = proc
        if self.abandon.is_set():
            kill_group(proc)

    def close(self, wait: Optional[float] = None) -> None:
        """Run what is queued (a master's last events first), waiting at most `wait`
        seconds (None: until every hook has run or timed out); then kill the running one."""
        with self.lock:
            for outcome in self.gatherer.close():
                self._queue("after_master", outcome.written.rule, lambda o=outcome: master_call_facts(o))
        self.calls.put(None)
        if self.thread is None:
            return
        self.thread.join(wait)
        if self.thread.is_alive():
            self.abandon.set()
            if self.current is not None:
                kill_group(self.current)
            self.thread.join(KILL_GRACE + 1.0)


def start(rules: Callable[[], object], bus: E.Bus = E.BUS) -> tuple[HookRunner, Callable[[], None]]:
    """Subscribe a HookRunner; returns it and the function that unsubscribes it."""
    runner = HookRunner(rules)
    return runner, bus.subscribe(runner)
