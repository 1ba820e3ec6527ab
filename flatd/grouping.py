"""Grouping flats by size, temperature and filter, as the original program does.

Nesting order: camera settings (gain, offset, readout mode, CFA pattern, row order,
and the header keywords of grouping.keywords, each with its tolerance), then size
(binning plus NAXIS1 x NAXIS2), then temperature (mean-shift clustering of CCD-TEMP),
then filter (case-insensitive, a missing filter is its own group). Groups smaller than the minimum size are left out at each level, and every
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
    keywords: tuple[tuple[str, float | None], ...] = ()  # header keywords that must agree, each with a tolerance

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
            keywords=tuple((key.upper(), tol) for key, tol in (getattr(grouping, "keywords", None) or {}).items()),
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
    settings: tuple[str, ...] = ()  # the camera settings the members share, as text ('gain 120', 'RGGB')

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
        return _describe(self.size_key, temp, self.filter) + list(self.settings)


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
    settings: tuple[str, ...] = ()

    def describe(self) -> str:
        temp = format_temperature(self.temperature) if self.temperature is not None else (
            "no temperature" if self.no_temperature else None)
        return ", ".join(_describe(self.size_key, temp, self.filter) + list(self.settings)) or "of all flats"


# --------------------------------------------------------------------------- camera settings


def _number_text(value: float) -> str:
    return f"{value:g}"


def camera_settings(frame: Frame) -> tuple[str, ...]:
    """The settings a flat never shares a group across, as text: gain, offset, readout
    mode, CFA pattern (with its offsets) and a bottom-up row order; missing ones left out."""
    parts = []
    if frame.gain is not None:
        parts.append(f"gain {_number_text(frame.gain)}")
    if frame.offset is not None:
        parts.append(f"offset {_number_text(frame.offset)}")
    if frame.readout_mode:
        parts.append(f"readout {frame.readout_mode.strip()}")
    if frame.bayer_pattern:
        dx, dy = frame.bayer_offset
        parts.append(frame.bayer_pattern + (f" (offset {dx},{dy})" if (dx, dy) != (0, 0) else ""))
    if frame.row_order != "TOP-DOWN":
        parts.append(f"rows {frame.row_order.lower()}")
    return tuple(parts)


def _settings_key(frame: Frame) -> tuple:
    """camera_settings compared without case (a readout mode 'Fast' is 'fast')."""
    return tuple(part.casefold() for part in camera_settings(frame))


def _split_by_settings(p: "_Partial") -> list["_Partial"]:
    groups: dict[tuple, list[Frame]] = {}
    for f in p.frames:
        groups.setdefault(_settings_key(f), []).append(f)
    return [_Partial(groups[k], settings=p.settings + camera_settings(groups[k][0])) for k in sorted(groups)]


def _keyword_value(frame: Frame, key: str) -> object:
    """A header value for grouping: a finite number, folded text, or None when missing."""
    value = frame.header_value(key)
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(value) else str(value)
    text = str(value).strip()
    return text.casefold() or None


def _split_by_keyword(p: "_Partial", key: str, tolerance: float | None) -> list["_Partial"]:
    """Frames whose `key` agrees: text exactly (any case); numbers within `tolerance` of
    the first (lowest) value of their run; a missing value is a group of its own."""
    numbers = sorted((v, i) for i, f in enumerate(p.frames)
                     if isinstance(v := _keyword_value(f, key), float))
    runs: list[tuple[float, list[int]]] = []
    for value, i in numbers:
        if runs and value - runs[-1][0] <= (tolerance or 0.0):
            runs[-1][1].append(i)
        else:
            runs.append((value, [i]))
    parts: list[tuple[str, list[Frame]]] = []
    for value, members in runs:
        frames = [p.frames[i] for i in sorted(members)]
        values = [_keyword_value(f, key) for f in frames]
        shown = _number_text(value) if max(values) == value else f"{_number_text(value)}..{_number_text(max(values))}"
        parts.append((f"{key} {shown}", frames))
    texts: dict[object, list[Frame]] = {}
    for f in p.frames:
        v = _keyword_value(f, key)
        if not isinstance(v, float):
            texts.setdefault(v, []).append(f)
    for v in sorted(texts, key=lambda v: (v is None, str(v))):
        written = str(texts[v][0].header_value(key)).strip() if v is not None else None
        parts.append((f"{key} {written}" if v is not None else f"no {key}", texts[v]))
    return [_Partial(frames, settings=p.settings + (text,)) for text, frames in parts]


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

    # Level 0: camera settings, then the header keywords of grouping.keywords.
    level = _split_by_settings(_Partial(ordered))
    for key, tolerance in options.keywords:
        level = [q for p in level for q in _split_by_keyword(p, key, tolerance)]
    level = [p for p in level if not _too_small(p, minimum, skipped)]

    # Level 1: size.
    next_level = []
    for p in level:
        if options.size:
            by_size: dict[SizeKey, list[Frame]] = {}
            for f in p.frames:
                by_size.setdefault(f.size_key, []).append(f)
            next_level += [_Partial(by_size[k], size_key=k, settings=p.settings) for k in sorted(by_size)]
        else:
            next_level.append(_Partial(_majority_size(p.frames, skipped), settings=p.settings))
    level = [p for p in next_level if not _too_small(p, minimum, skipped)]

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
                next_level.append(_Partial(members, p.size_key, centre, settings=p.settings))
            if unknown:
                next_level.append(_Partial(unknown, p.size_key, None, no_temperature=True, settings=p.settings))
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
                next_level.append(_Partial(members, p.size_key, temp, p.no_temperature, written, p.settings))
        level = [p for p in next_level if not _too_small(p, minimum, skipped)]

    groups = []
    for p in level:
        groups.append(Group(tuple(sorted(p.frames, key=_frame_order)), p.size_key, p.filter,
                            p.temperature, p.no_temperature, p.settings))
    groups.sort(key=_group_order)
    return groups, skipped


def _majority_size(frames: list[Frame], skipped: list[Skipped]) -> list[Frame]:
    """Without size grouping: the frames of the majority size (ties: the earliest frame's);
    the others are left out with the reason."""
    counts = Counter(f.size_key for f in frames)
    majority = max(counts, key=lambda k: (counts[k], -next(i for i, f in enumerate(frames) if f.size_key == k)))
    for f in frames:
        if f.size_key != majority:
            skipped.append(Skipped(
                f.path,
                f"size {format_size(f.size_key)} differs from the group's {format_size(majority)}; "
                "enable size grouping",
            ))
    return [f for f in frames if f.size_key == majority]


def _group_order(group: Group) -> tuple:
    temp = group.temperature
    return (
        group.size_key or (0, 0, 0, 0),
        temp is None,  # the no-temperature group after the clusters
        -(temp if temp is not None else 0.0),
        filter_key(group.filter),
        group.settings,
        str(group.frames[0].path) if group.frames else "",
    )
