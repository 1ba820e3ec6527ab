"""Grouping flats by size, temperature and filter, as the original program does.

Nesting order: size (binning plus NAXIS1 x NAXIS2), then temperature (mean-shift
clustering of CCD-TEMP), then filter (case-insensitive, a missing filter is its own
group). Groups smaller than the minimum size are left out at each level, and every
frame left out is returned with the reason, naming its group.

Pure: no I/O. scikit-learn is imported only when temperatures must be clustered.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from typing import Iterable, Sequence

from flatd.ingest.frames import TEMPERATURE_LIMITS, Frame, Skipped
from flatd.output.naming import temperature_text

SizeKey = tuple[int, int, int, int]


@dataclass(frozen=True)
class GroupOptions:
    """How to split a batch of flats into groups."""

    size: bool = True
    filter: bool = True
    temperature: float | None = 1.0  # mean-shift bandwidth in °C; None: no temperature grouping
    min_group_size: int = 1

    def __post_init__(self) -> None:
        if self.temperature is not None:
            t = self.temperature
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
                raise ValueError(f"temperature bandwidth must be a positive number, not {t!r}")
        if isinstance(self.min_group_size, bool) or not isinstance(self.min_group_size, int) or self.min_group_size < 1:
            raise ValueError(f"min_group_size must be an integer of at least 1, not {self.min_group_size!r}")

    @classmethod
    def from_settings(cls, grouping) -> "GroupOptions":
        """From the rules file's `grouping` section (flatd.config.Grouping)."""
        return cls(
            size=bool(grouping.size),
            filter=bool(grouping.filter),
            temperature=None if grouping.temperature is None else float(grouping.temperature),
            min_group_size=int(grouping.min_group_size),
        )


@dataclass(frozen=True)
class Group:
    """Flats that are combined into one master.

    `size_key`, `temperature` and `filter` describe the criteria the group was formed
    by; each is None when that criterion was not used. `filter` is '' for the group of
    flats without a filter; `no_temperature` marks the group of flats without a
    temperature when grouping by temperature (its `temperature` is None).
    """

    frames: tuple[Frame, ...]  # sorted by date then path
    size_key: SizeKey | None  # (xbin, ybin, width, height) when grouped by size
    filter: str | None  # as written in the most common frame; '' when missing; None when not grouped by filter
    temperature: float | None  # mean of the members' temperatures when grouped by temperature
    no_temperature: bool = False  # the group of flats without a temperature (grouping by temperature)

    @property
    def label(self) -> str:
        """Human-readable, e.g. "1x1 4144x2822, -10.0 °C, filter Ha"."""
        return ", ".join(self._parts()) or "all flats"

    @property
    def common_filter(self) -> str | None:
        """The most common filter among the members as written (None if none has one)."""
        return most_common_filter(self.frames)

    @property
    def size(self) -> SizeKey:
        """The members' size key (all members always share one)."""
        return self.frames[0].size_key

    def __len__(self) -> int:
        return len(self.frames)

    def _parts(self) -> list[str]:
        if self.temperature is not None:
            temp = format_temperature(self.temperature)
        else:
            temp = "no temperature" if self.no_temperature else None
        return _describe(self.size_key, temp, self.filter)


# --------------------------------------------------------------------------- text


def format_size(key: SizeKey) -> str:
    """(1, 1, 4144, 2822) -> "1x1 4144x2822" (binning, then dimensions)."""
    xbin, ybin, width, height = key
    return f"{xbin}x{ybin} {width}x{height}"


def format_temperature(value: float) -> str:
    """-10.04 -> "-10.0 °C", rounded as in master names (naming.temperature_text)."""
    return f"{temperature_text(value)} °C"


def _describe(size_key: SizeKey | None, temperature: str | None, filter_: str | None) -> list[str]:
    parts = []
    if size_key is not None:
        parts.append(format_size(size_key))
    if temperature is not None:
        parts.append(temperature)
    if filter_ is not None:
        parts.append(f"filter {filter_}" if filter_ else "no filter")
    return parts


def filter_key(value: str | None) -> str:
    """Filters compare case-insensitively, ignoring surrounding whitespace; missing is ''."""
    return (value or "").strip().casefold()


def most_common_filter(frames: Iterable[Frame]) -> str | None:
    """The filter of the most common key, as written most often (ties: first in order)."""
    frames = list(frames)
    keys = Counter(filter_key(f.filter) for f in frames)
    if not keys:
        return None
    best = max(keys.items(), key=lambda kv: (kv[1], -_first_index(frames, kv[0])))[0]
    if best == "":
        return None
    spellings = Counter((f.filter or "").strip() for f in frames if filter_key(f.filter) == best)
    order = [(f.filter or "").strip() for f in frames]
    return max(spellings.items(), key=lambda kv: (kv[1], -order.index(kv[0])))[0]


def _first_index(frames: list[Frame], key: str) -> int:
    for i, f in enumerate(frames):
        if filter_key(f.filter) == key:
            return i
    return len(frames)


def _frame_order(frame: Frame) -> tuple:
    """By date, then path; frames without a date last."""
    return (frame.date is None, frame.date or datetime.min, str(frame.path))


# --------------------------------------------------------------------------- temperature


def cluster_temperatures(values: Sequence[float], bandwidth: float) -> list[int]:
    """Cluster labels for each temperature by mean shift with the given bandwidth.

    Labels are numbered by cluster centre, warmest first. Values that all lie within
    less than one bandwidth of each other (a single value, all-equal values, the usual
    night of a cooled camera) form one cluster without calling scikit-learn. A value outside TEMPERATURE_LIMITS is a ValueError:
    group_frames leaves such frames out before.
    """
    if not values:
        return []
    for value in values:
        if value not in TEMPERATURE_LIMITS:  # mean shift fails or overflows on these
            raise ValueError(f"temperature {value!r} is outside {TEMPERATURE_LIMITS}")
    if max(values) - min(values) < bandwidth:
        # Every window of the mean shift then holds every value: one cluster, as
        # scikit-learn finds (tests/unit/test_grouping.py), without its import (~1 s).
        return [0] * len(values)
    import warnings

    import numpy as np
    from sklearn.cluster import MeanShift  # lazy: importing sklearn takes about a second

    data = np.asarray(values, dtype=float).reshape(-1, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        labels = MeanShift(bandwidth=float(bandwidth)).fit(data).labels_
    # Renumber by the mean of the members, warmest first, for a deterministic order.
    members: dict[int, list[float]] = {}
    for label, value in zip(labels, values):
        members.setdefault(int(label), []).append(value)
    order = sorted(members, key=lambda lab: -sum(members[lab]) / len(members[lab]))
    renumber = {old: new for new, old in enumerate(order)}
    return [renumber[int(label)] for label in labels]


# --------------------------------------------------------------------------- grouping


def _plausible(frames: Iterable[Frame], skipped: list[Skipped]) -> list[Frame]:
    """The frames whose temperature is missing or physically possible.

    read_frame already leaves out the others; this keeps a Frame made elsewhere from
    crashing mean shift (1e308 overflows its arithmetic) or averaging into a master.
    """
    kept = []
    for f in frames:
        if f.temperature is None or f.temperature in TEMPERATURE_LIMITS:
            kept.append(f)
        else:
            skipped.append(Skipped(f.path, f"temperature {f.temperature:g} is outside {TEMPERATURE_LIMITS}"))
    return kept


@dataclass
class _Partial:
    frames: list[Frame]
    size_key: SizeKey | None = None
    temperature: float | None = None
    no_temperature: bool = False
    filter: str | None = None

    def describe(self) -> str:
        temp = format_temperature(self.temperature) if self.temperature is not None else (
            "no temperature" if self.no_temperature else None)
        return ", ".join(_describe(self.size_key, temp, self.filter)) or "of all flats"


def _too_small(partial: _Partial, minimum: int, skipped: list[Skipped]) -> bool:
    if len(partial.frames) >= minimum:
        return False
    count = len(partial.frames)
    reason = (f"group {partial.describe()} has {count} flat{'s' if count != 1 else ''}, "
              f"fewer than min_group_size {minimum}")
    skipped.extend(Skipped(f.path, reason) for f in partial.frames)
    return True


def group_frames(frames: Sequence[Frame], options: GroupOptions) -> tuple[list[Group], list[Skipped]]:
    """Split flats into groups: size, then temperature, then filter.

    Returns the groups (sorted by size key, temperature descending, filter) and every
    frame left out with the reason.
    """
    skipped: list[Skipped] = []
    ordered = sorted(_plausible(frames, skipped), key=_frame_order)
    if not ordered:
        return [], skipped
    minimum = options.min_group_size

    # Level 1: size.
    if options.size:
        by_size: dict[SizeKey, list[Frame]] = {}
        for f in ordered:
            by_size.setdefault(f.size_key, []).append(f)
        level = [_Partial(by_size[k], size_key=k) for k in sorted(by_size)]
    else:
        counts = Counter(f.size_key for f in ordered)
        # The majority size; ties go to the size of the earliest frame.
        majority = max(counts, key=lambda k: (counts[k], -next(i for i, f in enumerate(ordered) if f.size_key == k)))
        for f in ordered:
            if f.size_key != majority:
                skipped.append(Skipped(
                    f.path,
                    f"size {format_size(f.size_key)} differs from the group's {format_size(majority)}; "
                    "enable size grouping",
                ))
        level = [_Partial([f for f in ordered if f.size_key == majority])]
    level = [p for p in level if not _too_small(p, minimum, skipped)]

    # Level 2: temperature.
    if options.temperature is not None:
        next_level = []
        for p in level:
            known = [f for f in p.frames if f.temperature is not None]
            unknown = [f for f in p.frames if f.temperature is None]
            labels = cluster_temperatures([f.temperature for f in known], options.temperature)
            clusters: dict[int, list[Frame]] = {}
            for label, f in zip(labels, known):
                clusters.setdefault(label, []).append(f)
            for label in sorted(clusters):
                members = clusters[label]
                centre = sum(f.temperature for f in members) / len(members)
                next_level.append(_Partial(members, p.size_key, centre))
            if unknown:
                next_level.append(_Partial(unknown, p.size_key, None, no_temperature=True))
        level = [p for p in next_level if not _too_small(p, minimum, skipped)]

    # Level 3: filter.
    if options.filter:
        next_level = []
        for p in level:
            by_filter: dict[str, list[Frame]] = {}
            for f in p.frames:
                by_filter.setdefault(filter_key(f.filter), []).append(f)
            for key in sorted(by_filter):
                members = by_filter[key]
                written = most_common_filter(members) if key else ""
                # the group's own mean, as its master's name and CCD-TEMP give it
                temp = None if p.temperature is None else sum(f.temperature for f in members) / len(members)
                next_level.append(_Partial(members, p.size_key, temp, p.no_temperature, written))
        level = [p for p in next_level if not _too_small(p, minimum, skipped)]

    groups = []
    for p in level:
        groups.append(Group(tuple(sorted(p.frames, key=_frame_order)), p.size_key, p.filter,
                            p.temperature, p.no_temperature))
    groups.sort(key=_group_order)
    return groups, skipped


def _group_order(group: Group) -> tuple:
    temp = group.temperature
    return (
        group.size_key or (0, 0, 0, 0),
        temp is None,  # the no-temperature group after the clusters
        -(temp if temp is not None else 0.0),
        filter_key(group.filter),
        str(group.frames[0].path) if group.frames else "",
    )
