"""`flatd run-once --dry-run` plans without the engine: numba (and astropy) stay unloaded."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

from fitstree import write_fits

HEAVY = ("numba", "astropy")

RULES = """
capture:
  - path: {root}/captures
grouping: {{temperature: null, min_group_size: 3}}
precalibration: {{mode: pedestal, pedestal: 100}}
stable: 0
state: {root}/state
"""


def _modules_after(argv: list[str]) -> tuple[set[str], str, str]:
    code = (
        "import sys\n"
        "from flatd.cli import main\n"
        f"rc = main({argv!r})\n"
        f"print('LOADED:' + ','.join(m for m in {HEAVY!r} if m in sys.modules), 'RC:' + str(rc))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    last = [line for line in out.splitlines() if line.startswith("LOADED:")][-1]
    loaded, rc = last.split(" RC:")
    return set(filter(None, loaded.removeprefix("LOADED:").split(","))), rc, out


def test_dry_run_on_300_flats_loads_no_engine(tmp_path):
    data = np.full((6, 8), 20000, dtype=np.uint16)
    for i in range(300):
        write_fits(tmp_path / "captures" / "night1" / f"flat_{i:03d}.fits", data, IMAGETYP="FLAT", FILTER="RGB"[i % 3],
                   EXPTIME=0.4, CCD_TEMP=-10.0, DATE_OBS="2026-11-24T18:00:00")
    config = tmp_path / "flatd.yaml"
    config.write_text(RULES.format(root=tmp_path))
    loaded, rc, out = _modules_after(["run-once", "--config", str(config), "--dry-run"])
    assert rc == "0"
    assert out.count("-> would write") == 3 and out.count("group 1x1 8x6, filter") == 3
    assert loaded == set()
    assert not (tmp_path / "captures" / "masters").exists()  # a dry run writes nothing
