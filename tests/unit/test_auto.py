"""flatd.stack.auto: `method: auto` resolved from a group's number of frames."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import pytest

from flatd.stack import auto, methods
from flatd.stack.methods import Method

# What auto chooses, as the README says it (issue 9: "auto's choice for 3, 5, 8, 15 and
# 40 frames is what the README says it is"). PROVISIONAL, as the table is: when the
# quality benchmark settles it, this list, auto.TABLE and the README's table change together.
EXPECTED = {
    3: ("median", {}),
    5: ("esd", {"esd_outliers": 0.3, "esd_significance": 0.08, "esd_low": 1.5}),
    8: ("winsorized", {"low": 4.0, "high": 4.0}),
    15: ("winsorized", {"low": 4.0, "high": 4.0}),
    40: ("winsorized", {"low": 4.0, "high": 4.0}),
}
README = Path(__file__).resolve().parents[2] / "README.md"


def _readme_auto_table() -> list[tuple[int, Optional[int], str, dict]]:
    """The rows of the README's `method: auto` table: (least, most, method, params)."""
    text = README.read_text()
    section = text[text.index("### `method: auto`"):]
    rows = []
    for line in section.splitlines()[1:]:
        if line.startswith("#"):
            break
        cells = [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[0][:1].isdigit():
            continue
        least, _, most = cells[0].replace("–", "-").partition("-")
        params = {}
        for part in filter(None, (p.strip() for p in cells[2].replace("—", "").split(","))):
            key, value = part.split()
            params[key] = float(value)
        rows.append((int(least.rstrip("+")), int(most) if most else None, cells[1], params))
    return rows


def test_the_readme_table_is_the_table():
    assert _readme_auto_table() == [(r.least, r.most, r.method, dict(r.params)) for r in auto.TABLE]


@pytest.mark.parametrize("n", sorted(EXPECTED))
def test_the_readme_says_what_auto_chooses(n):
    (row,) = [r for r in _readme_auto_table() if r[0] <= n and (r[1] is None or n <= r[1])]
    assert (row[2], row[3]) == EXPECTED[n]


@pytest.mark.parametrize("n", sorted(EXPECTED))
def test_choice_is_the_documented_one(n):
    name, params = EXPECTED[n]
    method, reason = auto.choose(n)
    row = auto.row_for(n)
    assert (row.method, dict(row.params)) == (name, params)  # the table says so...
    if name in methods.names():
        assert method == Method(name, **params)  # ...and so does the choice
        assert f"{n} frames" in reason and row.why in reason
    else:  # pragma: no cover - a method not registered yet
        assert method.name == auto.FALLBACK.method and "not available" in reason


def test_table_covers_every_group_size_once():
    for n in range(1, 2000):
        rows = [row for row in auto.TABLE if row.holds(n)]
        assert len(rows) == 1, n
        assert rows[0].method in methods.names() or rows[0].method == auto.FALLBACK.method, rows[0]
        method, _ = auto.choose(n)
        assert n >= method.min_frames, (n, method)
    with pytest.raises(ValueError):
        auto.row_for(0)


def test_the_rules_files_thresholds_override_the_tables():
    settings = SimpleNamespace(low=2.5, high=4.0)
    method, reason = auto.choose(15, settings)
    assert method == Method("winsorized", low=2.5, high=4.0)
    assert "low 2.5 from the rules file" in reason and "high 4.0 from the rules file" in reason
    only_high = SimpleNamespace(low=None, high=6.0)
    assert auto.choose(40, only_high)[0] == Method("winsorized", low=4.0, high=6.0)
    # median has no thresholds: nothing to override, nothing said
    method, reason = auto.choose(3, settings)
    assert method == Method("median") and "rules file" not in reason


def test_a_threshold_that_does_not_suit_the_method_keeps_the_tables():
    table = (auto.Choice(1, None, "percentile", {"low": 0.2, "high": 0.1}, "why"),)
    method, reason = auto.choose(8, SimpleNamespace(low=3.0, high=None), table=table)  # a fraction <= 1
    assert method == Method("percentile", low=0.2, high=0.1)
    assert "combine.low 3.0 does not suit percentile" in reason


def test_a_method_not_registered_falls_back_with_a_reason():
    table = (auto.Choice(1, None, "no-such-method", {"low": 1.0}, "because"),)
    method, reason = auto.choose(12, table=table)
    assert method == Method(auto.FALLBACK.method)
    assert "no-such-method is not available in this flatd: median instead" in reason


def test_settings_from_the_rules_file():
    from flatd.config import parse_rules

    comb = parse_rules("combine: {method: auto}").combine
    method, reason = auto.choose(15, comb)
    assert method.name == "winsorized" and "rules file" not in reason


def test_dry_run_text():
    method, reason = auto.choose(15)
    assert auto.describe(method, reason).startswith("auto: winsorized low 4.0 high 4.0 (15 frames; 8+ frames: ")
    assert auto.params_text(Method("median")) == "median"


def test_auto_is_no_method_name():
    with pytest.raises(ValueError, match="registered already"):
        methods.register(methods.Entry("auto", "x", label=lambda v: "X", describe=lambda v: "x"))
