"""Ingest: from a capture folder to typed `Frame`s.

`frames` reads a header into a Frame; `discover` decides which files are candidates
(for the scans and the watcher alike); `watcher` runs the watchdog observers;
`intake` tracks files until they are stable and complete, for the service.
"""
