"""Notify: the typed event stream and its subscribers (log, report; hooks,
notifications and metrics join here)."""
