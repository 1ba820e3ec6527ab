"""Notify: the typed event stream and its subscribers (log, report; hooks,
notifications and metrics join here)."""

from __future__ import annotations

import time
from typing import Callable, Optional


def start_subscribers(rules: Callable[[], object]) -> Callable[[Optional[float]], None]:
    """Subscribe the hooks (flatd.notify.hooks) and the notifications
    (flatd.notify.apprise_notify) to the event bus, reading the rules in force through
    `rules`; returns the function that unsubscribes them and waits at most its argument
    (seconds; None: as long as the hooks' timeouts allow) for what they still have to do."""
    from flatd.notify import apprise_notify, hooks

    hook_runner, stop_hooks = hooks.start(rules)
    notifier, stop_notifier = apprise_notify.start(lambda: rules().notify)

    def close(wait: Optional[float] = None) -> None:
        stop_hooks()
        stop_notifier()
        deadline = time.monotonic() + (apprise_notify.CLOSE_WAIT if wait is None else wait)
        hook_runner.close(wait)  # the notifier's thread sends meanwhile
        notifier.close(max(0.0, deadline - time.monotonic()))

    return close
