"""Shared test settings."""

import os

from hypothesis import settings

# In CI, property tests draw the same examples every run, so that a submission's
# result does not depend on luck; locally they explore new examples each time.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")
