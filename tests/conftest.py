"""Shared test settings."""

import os
import subprocess
import sys

import pytest
from hypothesis import settings

# In CI, property tests draw the same examples every run, so that a submission's
# result does not depend on luck; locally they explore new examples each time.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


HEAVY = ("numpy", "flatd.stack._kernels", "flatd.stack.engines.local", "astropy", "sklearn", "pydantic", "scipy")


def _run_and_list_modules(argv: list[str]) -> tuple[set[str], object, str]:
    """Run flatd's main(argv) in a fresh interpreter: the heavy modules it loaded, its
    exit code (None when it exited through SystemExit) and what it printed."""
    code = (
        "import sys\n"
        "from flatd.cli import main\n"
        f"try:\n    rc = main({argv!r})\nexcept SystemExit:\n    rc = None\n"
        f"print('LOADED:' + ','.join(m for m in {HEAVY!r} if m in sys.modules), 'RC:' + str(rc))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    last = [line for line in out.splitlines() if line.startswith("LOADED:")][-1]
    loaded, rc = last.removeprefix("LOADED:").split(" RC:")
    return set(filter(None, loaded.split(","))), None if rc == "None" else int(rc), out


@pytest.fixture
def modules_loaded_by():
    """modules_loaded_by(argv) -> (heavy modules loaded, exit code, output)."""
    return _run_and_list_modules
