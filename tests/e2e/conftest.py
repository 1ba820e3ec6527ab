"""Fixtures for the end-to-end tests (helpers live in watchkit.py)."""

from watchkit import watches  # noqa: F401  (the fixture)
