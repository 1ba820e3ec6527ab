"""Notifications through Apprise: one message per batch, sent from a thread of its own.

`notify.urls` lists Apprise URLs (json://, form://, mailto://, tgram://, ntfy://...).
The subscriber gathers a batch's masters, failures and quality warnings (as
`notify.on` asks) until its `batch_done`, then hands one message to a sender thread:
the jobs never wait for it. The message says in a line or two per item what was made
or what failed, and why; each master's preview is attached where the service takes
attachments. A delivery that fails is tried again `notify.retries` times, after
`notify.retry_delay`, doubled each time; then the failure is logged. Apprise is
imported only when notify.urls lists some (pip install 'flatd[notify]').
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from flatd.notify import events as E
from flatd.notify.outcome import Gatherer, MasterOutcome, of_folder

MAX_LINES = 30  # lines of a message's body; the rest is counted
MAX_ATTACHMENTS = 10
CLOSE_WAIT = 30.0  # seconds a one-shot command waits at exit for its message to go out


@dataclass(frozen=True)
class Message:
    title: str
    body: str
    kind: str  # an Apprise NotifyType: info, success, warning or failure
    attachments: tuple[Path, ...] = ()


@dataclass
class Batch:
    """What one batch has to tell, as notify.on asks."""

    masters: list[MasterOutcome] = field(default_factory=list)
    failures: list[E.JobFailed] = field(default_factory=list)
    flats: list[E.Event] = field(default_factory=list)  # FlatRejectedQc: flats the flat checks flagged

    def empty(self) -> bool:
        return not self.masters and not self.failures and not self.flats


# --------------------------------------------------------------------------- the message


def master_line(o: MasterOutcome) -> str:
    """`Made FLAT-R….fits from 20 flats (R 1x1 -10C); checks good`."""
    ev = o.written
    text = f"Made {ev.path.name} from {ev.files} flats" + (f" ({ev.group})" if ev.group else "")
    if ev.found:
        text = f"Recorded {ev.path.name}, made before an interruption"
    return text + (f"; checks {o.verdict}" if o.verdict else "")


def quality_lines(o: MasterOutcome) -> list[str]:
    """The warnings on a master: its checks (warn or bad, with why) and a high rejection."""
    lines = [f"Quality: {o.checked.message}"] if o.checked is not None and o.verdict not in (None, "good") else []
    if o.rejection is not None:
        lines.append(f"Quality: {o.rejection.message}")
    return lines


def flat_lines(flats: list[E.Event]) -> list[str]:
    """The flat checks' findings, a line per group and check: how many flats, and the first one's why."""
    found: dict[tuple, list] = {}
    for ev in flats:
        found.setdefault((getattr(ev, "group", None), ev.check, ev.action), []).append(ev)
    lines = []
    for (group, _, action), items in found.items():
        what = "left out" if action == "leave-out" else "combined with a warning"
        lines.append(f"Quality: {len(items)} flat(s){f' of {group}' if group else ''} {what}: "
                     f"{items[0].path.name}: {items[0].reason}")
    return lines


def failure_lines(batch: Batch) -> list[str]:
    lines = [f"Failed: {ev.message}" for ev in batch.failures]
    for o in batch.masters:
        lines += [f"Not moved: {p}" for p in o.move_problems]
    return lines


def compose(batch: Batch, on: list[str], attach: bool, folder: Optional[Path] = None) -> Optional[Message]:
    """The batch's one message (None: nothing in it that notify.on asks for)."""
    lines, kind = [], "success"
    if "master" in on:
        lines += [master_line(o) for o in batch.masters]
    if "failure" in on and (failed := failure_lines(batch)):
        lines, kind = failed + lines, "failure"
    warned = [line for o in batch.masters for line in quality_lines(o)] + flat_lines(batch.flats)
    if "quality" in on and warned:
        lines += warned
        kind = "warning" if kind == "success" else kind
    if not lines:
        return None
    if len(lines) > MAX_LINES:
        lines = lines[:MAX_LINES - 1] + [f"… and {len(lines) - MAX_LINES + 1} more (see the log)"]
    shown = batch.masters if "master" in on else [o for o in batch.masters if "quality" in on and quality_lines(o)]
    previews = [o.previews()[:1] for o in shown] if attach else []
    return Message(title(batch, folder), "\n".join(lines), kind,
                   tuple(p for found in previews for p in found)[:MAX_ATTACHMENTS])


def title(batch: Batch, folder: Optional[Path]) -> str:
    made = sum(1 for o in batch.masters if not o.written.found)
    parts = [f"{made} master flat{'s' if made != 1 else ''} made"]
    if batch.failures:
        parts.append(f"{len(batch.failures)} group{'s' if len(batch.failures) != 1 else ''} failed")
    return f"flatd{f' ({folder.name})' if folder is not None else ''}: " + ", ".join(parts)


# --------------------------------------------------------------------------- delivery


def shown_url(url: str) -> str:
    """The URL with its secrets masked, for the log."""
    import apprise

    service = apprise.Apprise.instantiate(url)
    return service.url(privacy=True).split("?", 1)[0] if service is not None else url.split(":", 1)[0] + "://…"


def send_once(url: str, message: Message) -> tuple[bool, str]:
    """One attempt at one URL: (delivered, why not)."""
    import apprise

    service = apprise.Apprise()
    if not service.add(url):
        return False, "Apprise cannot read this URL"
    attachments = apprise.AppriseAttachment()
    for path in message.attachments:
        if path.is_file():
            attachments.add(str(path))
    with apprise.LogCapture(level=logging.WARNING, fmt="%(message)s") as captured:
        ok = service.notify(body=message.body, title=message.title, notify_type=message.kind,
                            attach=attachments if len(attachments) else None)
        said = captured.getvalue().strip().splitlines()
    return bool(ok), (said[-1] if said else "the service refused the message")


def deliver(url: str, message: Message, retries: int, delay: float, stop: threading.Event,
            send: Callable[[str, Message], tuple[bool, str]] = send_once) -> Optional[str]:
    """Send with retries and a doubling backoff; None when delivered, else why not."""
    reason = "not tried"
    for attempt in range(retries + 1):
        if attempt and stop.wait(delay * 2 ** (attempt - 1)):
            return f"{reason}; flatd stopped before the next attempt"
        try:
            ok, reason = send(url, message)
        except Exception as exc:  # noqa: BLE001 - a plugin's bug is one more failed attempt
            ok, reason = False, f"{type(exc).__name__}: {exc}"
        if ok:
            return None
    return reason


# --------------------------------------------------------------------------- the subscriber


class Notifier:
    """The bus subscriber: gathers a batch, composes its message at `batch_done`, and
    sends it from a thread of its own."""

    def __init__(self, settings: Callable[[], object]):
        """`settings`: returns the notify section in force (the service's changes at a reload)."""
        self.settings = settings
        self.gatherer = Gatherer()
        self.batch = Batch()
        self.lock = threading.Lock()
        self.messages: "queue.Queue[Optional[tuple]]" = queue.Queue()
        self.stop = threading.Event()
        self.thread: Optional[threading.Thread] = None
        self.send = send_once  # one attempt at one URL (tests put a fake here)
        library = logging.getLogger("apprise")
        if not any(isinstance(h, logging.NullHandler) for h in library.handlers):
            library.addHandler(logging.NullHandler())  # its lines only through ours (LogCapture)

    def __call__(self, ev: E.Event) -> None:
        with self.lock:
            self.batch.masters += self.gatherer.add(ev)
            if isinstance(ev, E.JobFailed) and not ev.again:
                self.batch.failures.append(ev)
            elif ev.name == "flat_rejected_qc":
                self.batch.flats.append(ev)
            elif isinstance(ev, E.BatchDone):
                self._send(ev.folder)

    def _send(self, folder: Optional[Path]) -> None:
        """Queue the gathered batch of `folder` for the sender (under the lock)."""
        masters, later = of_folder(self.batch.masters, folder, lambda o: o.written.inputs)
        failures, failing_later = of_folder(self.batch.failures, folder, lambda f: f.inputs)
        flats, flats_later = of_folder(self.batch.flats, folder, lambda f: (f.path,))
        batch, self.batch = Batch(masters, failures, flats), Batch(later, failing_later, flats_later)
        settings = self.settings()
        if not settings.urls or batch.empty():
            return
        self.messages.put((batch, folder, settings))
        if self.thread is None or not self.thread.is_alive():
            self.thread = threading.Thread(target=self._work, daemon=True, name="flatd-notify")
            self.thread.start()

    def _work(self) -> None:
        while (item := self.messages.get()) is not None:
            try:
                self._deliver(*item)
            except Exception as exc:  # noqa: BLE001 - a bug loses this message, not the next ones
                E.notice("notify_failed", f"notification not sent: {type(exc).__name__}: {exc}", E.ERROR)

    def _deliver(self, batch: Batch, folder: Optional[Path], settings) -> None:
        message = compose(batch, list(settings.on), settings.attach_preview, folder)
        for url in settings.urls if message is not None else []:
            reason = deliver(url, message, settings.retries, settings.retry_delay, self.stop, self.send)
            self._log(url, message, reason, settings.retries)

    @staticmethod
    def _log(url: str, message: Message, reason: Optional[str], retries: int) -> None:
        where = shown_url(url)
        if reason is None:
            E.notice("notified", f"notification sent to {where}: {message.title}", E.INFO)
        else:
            E.notice("notify_failed", f"notification to {where} not delivered after {retries + 1} attempt(s): "
                     f"{reason}", E.ERROR, title=message.title)

    def close(self, wait: float = CLOSE_WAIT) -> None:
        """Send what was gathered and not sent yet, wait at most `wait` seconds for the
        sender, then stop its retries."""
        with self.lock:
            self.batch.masters += self.gatherer.close()
            self._send(None)
        self.messages.put(None)
        if self.thread is not None:
            self.thread.join(wait)
            if self.thread.is_alive():
                self.stop.set()
                self.thread.join(1.0)  # a request under way ends at Apprise's own timeouts


def start(settings: Callable[[], object], bus: E.Bus = E.BUS) -> tuple[Notifier, Callable[[], None]]:
    """Subscribe a Notifier; returns it and the function that unsubscribes it."""
    notifier = Notifier(settings)
    return notifier, bus.subscribe(notifier)
