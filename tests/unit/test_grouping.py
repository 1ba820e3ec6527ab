"""Grouping by size, temperature (mean shift) and filter, minimum group size."""

from __future__ import annotations

import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from flatd.config import Grouping
from flatd.ingest.frames import Frame, Kind
from flatd.grouping import (
    Group,
    GroupOptions,
    cluster_temperatures,
    filter_key,
    format_temperature,
    group_frames,
    most_common_filter,
)

MANUAL_TEMPERATURES = (0.1, -9.9, -15.07, -0.1, -10, -15, 0, -10.2, -15.2)
T0 = datetime(2024, 3, 1, 20, 0, 0)

_counter = iter(range(10**6))


def flat(temperature=-10.0, filter="R", size=(1, 1, 100, 100), name=None, date=None, exposure=2.0):
    n = next(_counter)
    xbin, ybin, width, height = size
    return Frame(
        path=Path(f"/captures/{name or f'flat_{n:05d}.fits'}"),
        kind=Kind.FLAT,
        width=width,
        height=height,
        xbin=xbin,
        ybin=ybin,
        filter=filter,
        exposure=exposure,
        temperature=temperature,
        date=date if date is not None else T0 + timedelta(seconds=n),
    )


def temps(groups):
    return [sorted(f.temperature for f in g.frames) for g in groups]


# --------------------------------------------------------------------------- options


def test_options_from_settings():
    opts = GroupOptions.from_settings(Grouping(size=False, filter=True, temperature=2.5, min_group_size=3))
    assert opts == GroupOptions(size=False, filter=True, temperature=2.5, min_group_size=3)
    assert GroupOptions.from_settings(Grouping(temperature=None)).temperature is None


def test_defaults_from_rules_file_defaults():
    opts = GroupOptions.from_settings(Grouping())
    assert opts.size and opts.filter and opts.temperature == 1.0 and opts.min_group_size == 5


@pytest.mark.parametrize("bad", [dict(temperature=0), dict(temperature=-1.0), dict(temperature=float("nan")),
                                 dict(min_group_size=0)])
def test_options_reject_nonsense(bad):
    with pytest.raises(ValueError):
        GroupOptions(**bad)


# --------------------------------------------------------------------------- temperature


def test_manual_nine_temperatures_form_three_groups():
    frames = [flat(t) for t in MANUAL_TEMPERATURES]
    groups, skipped = group_frames(frames, GroupOptions(temperature=1.0))
    assert skipped == []
    assert temps(groups) == [[-0.1, 0, 0.1], [-10.2, -10, -9.9], [-15.2, -15.07, -15]]
    # Cluster centre: the mean of the members, warmest first.
    assert [round(g.temperature, 3) for g in groups] == [0.0, -10.033, -15.09]
    assert [g.label for g in groups] == [
        "1x1 100x100, 0.0 °C, filter R",
        "1x1 100x100, -10.0 °C, filter R",
        "1x1 100x100, -15.1 °C, filter R",
    ]


def test_cluster_labels_warmest_first():
    assert cluster_temperatures(list(MANUAL_TEMPERATURES), 1.0) == [0, 1, 2, 0, 1, 2, 0, 1, 2]


@pytest.mark.parametrize("bandwidth, count", [(0.5, 3), (1.0, 3), (2.0, 3), (5.0, 2), (10.0, 1), (50.0, 1)])
def test_bandwidth_sets_number_of_groups(bandwidth, count):
    frames = [flat(t) for t in MANUAL_TEMPERATURES]
    groups, skipped = group_frames(frames, GroupOptions(temperature=bandwidth))
    assert len(groups) == count and not skipped
    assert sum(len(g) for g in groups) == 9


def test_small_bandwidth_splits_more():
    frames = [flat(t) for t in MANUAL_TEMPERATURES]
    groups, _ = group_frames(frames, GroupOptions(temperature=0.1))
    assert len(groups) > 3


def test_wide_bandwidth_joins_two_clusters():
    frames = [flat(t) for t in MANUAL_TEMPERATURES]
    groups, _ = group_frames(frames, GroupOptions(temperature=5.0))
    assert temps(groups) == [[-0.1, 0, 0.1], [-15.2, -15.07, -15, -10.2, -10, -9.9]]


def test_single_frame_and_equal_temperatures_skip_meanshift(monkeypatch):
    import flatd.grouping as grouping

    # Make sure sklearn is not needed: poison the import.
    monkeypatch.setitem(sys.modules, "sklearn.cluster", None)
    assert grouping.cluster_temperatures([-10.0], 1.0) == [0]
    assert grouping.cluster_temperatures([-10.0] * 4, 1.0) == [0] * 4
    assert grouping.cluster_temperatures([], 1.0) == []
    groups, _ = group_frames([flat(-10.0) for _ in range(4)], GroupOptions())
    assert len(groups) == 1 and groups[0].temperature == -10.0


def test_values_within_a_bandwidth_skip_meanshift(monkeypatch):
    import flatd.grouping as grouping

    monkeypatch.setitem(sys.modules, "sklearn.cluster", None)
    assert grouping.cluster_temperatures([-10.0, -10.3, -9.8, -10.1], 1.0) == [0] * 4
    with pytest.raises(ImportError):  # a spread of a bandwidth or more needs the mean shift
        grouping.cluster_temperatures([-10.0, -9.0], 1.0)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-0.999, 0.0), min_size=2, max_size=40), st.floats(-40, 20), st.sampled_from([0.5, 1.0, 2.5]))
def test_the_shortcut_agrees_with_meanshift(offsets, base, bandwidth):
    """Values spread over less than one bandwidth: scikit-learn's mean shift finds one cluster too."""
    import warnings

    from sklearn.cluster import MeanShift

    values = [base + o * bandwidth for o in offsets]
    assume(max(values) - min(values) < bandwidth and len(set(values)) > 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        labels = MeanShift(bandwidth=bandwidth).fit(np.asarray(values).reshape(-1, 1)).labels_
    assert set(labels.tolist()) == {0}
    assert cluster_temperatures(values, bandwidth) == [0] * len(values)


@pytest.mark.parametrize("absurd", [1e308, -1e308, float("inf"), float("-inf"), float("nan"), 61.0, -201.0])
@pytest.mark.parametrize("bandwidth", [1.0, None])
def test_absurd_temperature_is_left_out_not_a_crash(absurd, bandwidth):
    """read_frame never makes such a Frame; grouping does not trust that."""
    good = [flat(-10.0), flat(-10.2), flat(-15.0)]
    bad = [flat(absurd), flat(absurd)]
    groups, skipped = group_frames(good + bad, GroupOptions(temperature=bandwidth))
    assert sorted(f.path for g in groups for f in g.frames) == sorted(f.path for f in good)
    assert [s.path for s in skipped] == [f.path for f in bad]
    assert all("is outside -200..+60 °C" in s.reason for s in skipped)


@pytest.mark.parametrize("absurd", [1e308, float("inf"), float("nan")])
def test_cluster_temperatures_refuses_absurd_values_clearly(absurd):
    with pytest.raises(ValueError, match="outside -200..\\+60 °C"):
        cluster_temperatures([-10.0, absurd], 1.0)


def test_frames_without_temperature_form_their_own_group():
    frames = [flat(-10.0), flat(-10.1), flat(None), flat(None)]
    groups, skipped = group_frames(frames, GroupOptions())
    assert not skipped
    assert [len(g) for g in groups] == [2, 2]
    assert groups[1].temperature is None and groups[1].no_temperature
    assert groups[1].label == "1x1 100x100, no temperature, filter R"
    assert not groups[0].no_temperature


def test_no_temperature_grouping_keeps_everything_together():
    frames = [flat(t) for t in MANUAL_TEMPERATURES] + [flat(None)]
    groups, _ = group_frames(frames, GroupOptions(temperature=None))
    assert len(groups) == 1 and groups[0].temperature is None and not groups[0].no_temperature
    assert groups[0].label == "1x1 100x100, filter R"


def test_sklearn_is_not_imported_by_importing_grouping():
    code = "import sys, flatd.grouping; print('sklearn' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --------------------------------------------------------------------------- filter


def test_filters_compare_case_insensitively_and_strip():
    frames = [flat(filter="Ha"), flat(filter="HA"), flat(filter=" ha "), flat(filter="OIII")]
    groups, _ = group_frames(frames, GroupOptions())
    assert [len(g) for g in groups] == [3, 1]
    assert groups[0].filter == "Ha"  # the most common spelling... all different: the first frame's
    assert groups[1].filter == "OIII"


def test_filter_written_as_in_most_common_frame():
    frames = [flat(filter="lum"), flat(filter="Lum"), flat(filter="Lum")]
    groups, _ = group_frames(frames, GroupOptions())
    assert len(groups) == 1 and groups[0].filter == "Lum"


def test_missing_filter_is_its_own_group():
    frames = [flat(filter=None), flat(filter=""), flat(filter="  "), flat(filter="R")]
    groups, _ = group_frames(frames, GroupOptions())
    assert [(g.filter, len(g)) for g in groups] == [("", 3), ("R", 1)]
    assert groups[0].label == "1x1 100x100, -10.0 °C, no filter"


def test_without_filter_grouping_filters_mix():
    frames = [flat(filter="R"), flat(filter="G"), flat(filter="R")]
    groups, _ = group_frames(frames, GroupOptions(filter=False))
    assert len(groups) == 1 and groups[0].filter is None
    assert groups[0].common_filter == "R"


def test_filter_helpers():
    assert filter_key(" Ha ") == filter_key("HA") == "ha"
    assert filter_key(None) == ""
    assert most_common_filter([flat(filter=None)]) is None
    assert most_common_filter([flat(filter="b"), flat(filter="B"), flat(filter="B")]) == "B"
    assert format_temperature(-0.04) == "0.0 °C"
    assert format_temperature(-10.04) == "-10.0 °C"


# --------------------------------------------------------------------------- size


def test_size_filter_temperature_combined_and_ordered():
    small = (2, 2, 50, 50)
    big = (1, 1, 100, 100)
    frames = (
        [flat(-10.0, "R", big) for _ in range(2)]
        + [flat(-10.2, "g", big) for _ in range(2)]
        + [flat(-20.0, "G", big) for _ in range(2)]
        + [flat(-9.9, "R", small) for _ in range(3)]
        + [flat(0.0, "R", small)]
    )
    groups, skipped = group_frames(frames, GroupOptions())
    assert not skipped
    assert [g.label for g in groups] == [
        "1x1 100x100, -10.0 °C, filter R",
        "1x1 100x100, -10.2 °C, filter g",
        "1x1 100x100, -20.0 °C, filter G",
        "2x2 50x50, 0.0 °C, filter R",
        "2x2 50x50, -9.9 °C, filter R",
    ]
    assert [len(g) for g in groups] == [2, 2, 2, 1, 3]
    assert groups[0].size_key == (1, 1, 100, 100)
    # The temperature cluster is formed before the filter split (-10.0 and -10.2 are one
    # cluster), but each group shows its own members' mean, as its master's name does.
    assert groups[0].temperature == pytest.approx(-10.0)
    assert groups[1].temperature == pytest.approx(-10.2)
    for g in groups:
        assert len({f.size_key for f in g.frames}) == 1


def test_binning_alone_separates_sizes():
    frames = [flat(size=(1, 1, 100, 100)), flat(size=(2, 2, 100, 100))]
    groups, _ = group_frames(frames, GroupOptions())
    assert [g.size_key for g in groups] == [(1, 1, 100, 100), (2, 2, 100, 100)]


def test_mixed_sizes_without_size_grouping_are_skipped():
    frames = [flat(size=(1, 1, 100, 100)) for _ in range(3)] + [flat(size=(2, 2, 50, 50), name="odd.fits")]
    groups, skipped = group_frames(frames, GroupOptions(size=False))
    assert len(groups) == 1 and len(groups[0]) == 3 and groups[0].size_key is None
    assert groups[0].size == (1, 1, 100, 100)
    assert [(s.path.name, s.reason) for s in skipped] == [
        ("odd.fits", "size 2x2 50x50 differs from the group's 1x1 100x100; enable size grouping")
    ]


def test_nothing_grouped_label():
    groups, _ = group_frames([flat(), flat()], GroupOptions(size=False, filter=False, temperature=None))
    assert groups[0].label == "all flats"
    assert groups[0].size_key is None and groups[0].filter is None and groups[0].temperature is None


# --------------------------------------------------------------------------- minimum size


def test_min_group_size_skips_small_groups_with_reason():
    frames = [flat(-10.0, "R", name=f"r{i}.fits") for i in range(3)] + [flat(-10.0, "G") for _ in range(5)]
    groups, skipped = group_frames(frames, GroupOptions(min_group_size=5))
    assert [g.label for g in groups] == ["1x1 100x100, -10.0 °C, filter G"]
    assert sorted(s.path.name for s in skipped) == ["r0.fits", "r1.fits", "r2.fits"]
    assert {s.reason for s in skipped} == {
        "group 1x1 100x100, -10.0 °C, filter R has 3 flats, fewer than min_group_size 5"
    }


def test_min_group_size_at_size_level():
    frames = [flat(size=(2, 2, 50, 50)) for _ in range(2)] + [flat() for _ in range(4)]
    groups, skipped = group_frames(frames, GroupOptions(min_group_size=3))
    assert [len(g) for g in groups] == [4]
    assert {s.reason for s in skipped} == {"group 2x2 50x50 has 2 flats, fewer than min_group_size 3"}


def test_min_group_size_at_temperature_level():
    frames = [flat(-20.0, "R"), flat(-20.0, "G")] + [flat(-10.0, "R") for _ in range(3)]
    groups, skipped = group_frames(frames, GroupOptions(min_group_size=3))
    assert [len(g) for g in groups] == [3]
    assert {s.reason for s in skipped} == {"group 1x1 100x100, -20.0 °C has 2 flats, fewer than min_group_size 3"}


def test_min_group_size_single_flat_wording_and_all_flats():
    groups, skipped = group_frames([flat()], GroupOptions(size=False, filter=False, temperature=None,
                                                          min_group_size=2))
    assert groups == []
    assert skipped[0].reason == "group of all flats has 1 flat, fewer than min_group_size 2"


def test_every_frame_accounted_for():
    frames = ([flat(t, f, s) for t in MANUAL_TEMPERATURES for f in ("R", "g", None)
               for s in ((1, 1, 100, 100), (2, 2, 50, 50))] + [flat(None, "R")])
    groups, skipped = group_frames(frames, GroupOptions(min_group_size=4))
    seen = [f.path for g in groups for f in g.frames] + [s.path for s in skipped]
    assert sorted(seen) == sorted(f.path for f in frames)
    assert len(set(seen)) == len(seen)


# --------------------------------------------------------------------------- order


def test_frames_sorted_by_date_then_path_and_output_deterministic():
    a = flat(name="b.fits", date=T0)
    b = flat(name="a.fits", date=T0)
    c = flat(name="c.fits", date=T0 - timedelta(hours=1))
    d = flat(name="0.fits", date=None)
    groups, _ = group_frames([a, b, c, d], GroupOptions())
    assert [f.path.name for f in groups[0].frames] == ["c.fits", "a.fits", "b.fits", "0.fits"]
    shuffled, _ = group_frames([d, b, a, c], GroupOptions())
    assert shuffled == groups


def test_empty_input():
    assert group_frames([], GroupOptions()) == ([], [])


def test_group_is_hashable_and_frozen():
    groups, _ = group_frames([flat()], GroupOptions())
    assert isinstance(groups[0], Group)
    hash(groups[0])
    with pytest.raises(Exception):
        groups[0].filter = "x"
