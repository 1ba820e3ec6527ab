"""`flatd run-once --dry-run` plans without the engine: its kernels (and astropy) stay unloaded."""

from __future__ import annotations

import numpy as np

from fitstree import write_fits

RULES = """
capture:
  - path: {root}/captures
grouping: {{temperature: null, min_group_size: 3}}
precalibration: {{mode: pedestal, pedestal: 100}}
stable: 0
state: {root}/state
"""


def test_dry_run_on_300_flats_loads_no_engine(tmp_path, modules_loaded_by):
    data = np.full((6, 8), 20000, dtype=np.uint16)
    for i in range(300):
        write_fits(tmp_path / "captures" / "night1" / f"flat_{i:03d}.fits", data, IMAGETYP="FLAT", FILTER="RGB"[i % 3],
                   EXPTIME=0.4, CCD_TEMP=-10.0, DATE_OBS="2026-11-24T18:00:00")
    config = tmp_path / "flatd.yaml"
    config.write_text(RULES.format(root=tmp_path))
    loaded, rc, out = modules_loaded_by(["run-once", "--config", str(config), "--dry-run"])
    assert rc == 0
    assert out.count("-> would write") == 3 and out.count("group 1x1 8x6, filter") == 3
    assert not loaded & {"flatd.stack._kernels", "flatd.stack.engines.local", "astropy"}
    assert not (tmp_path / "captures" / "masters").exists()  # a dry run writes nothing
