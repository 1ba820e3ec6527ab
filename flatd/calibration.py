"""The dark/bias library and the choice of a calibration frame for each flat."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Literal, Optional

from flatd.errors import FlatdError
from flatd.ingest.frames import (
    DEFAULT_KEYWORDS,
    Frame,
    FrameError,
    KeywordMap,
    Kind,
    Skipped,
    iter_fits_files,
    kind_from_imagetype,
    kind_from_name,
    read_frame,
    read_frames,
)


@dataclass(frozen=True)
class Calibration:
    """What is subtracted from one flat before combining."""

    mode: Literal["none", "pedestal", "file"] = "none"
    pedestal: float = 0.0
    frame: Optional[Frame] = None
    why: str = ""

    @property
    def label(self) -> str:
        """Short text for logs, dry runs and HISTORY cards."""
        if self.mode == "pedestal":
            return f"pedestal {self.pedestal:g}"
        if self.mode == "file" and self.frame is not None:
            return str(self.frame.path)
        return "none"


NO_CALIBRATION = Calibration()


# =========================================================================== library

POLICIES = ("original", "exposure-match")
EXPOSURE_WEIGHT = 3.0  # the original's score: |dT| + 3.0 x |dExposure|
EXPOSURE_TOLERANCE = 0.5  # seconds, policy "exposure-match"
CALIBRATION_KINDS = (Kind.BIAS, Kind.DARK, Kind.DARK_FLAT)
_PICTTYPE_CAL = {2: Kind.BIAS, 3: Kind.DARK, 4: Kind.FLAT, 1: Kind.LIGHT}


class CalibrationError(FlatdError):
    """No usable dark/bias for a flat; the message names the flat and the reason."""


# =========================================================================== matching

# The camera settings a dark or bias must share with its flat wherever both carry them
# (precalibration.match). Any other name in that list is a header keyword.
MATCH_FACTS = ("camera", "gain", "offset", "readout")
DEFAULT_MATCH = MATCH_FACTS


def _fact(frame: Frame, name: str) -> object:
    """One matching fact of a frame: a number, lower-case text, or None when not carried."""
    if name == "camera":
        return _camera(frame) or None
    if name == "gain":
        return frame.gain
    if name == "offset":
        return frame.offset
    if name == "readout":
        return (frame.readout_mode or "").strip().lower() or None
    value = frame.header_value(name)
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, (int, float)):
        return float(value)
    return str(value).strip().lower() or None


def _same(a: object, b: object) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= 1e-6 * max(1.0, abs(a), abs(b))
    return a == b


def _shown(value: object) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return repr(value) if isinstance(value, str) else str(value)


def mismatch(flat: Frame, candidate: Frame, match: tuple[str, ...] = DEFAULT_MATCH) -> Optional[str]:
    """The first setting of `match` on which `candidate` and `flat` disagree, as text
    ('gain 200, the flat's 120'); None when they agree wherever both carry the setting."""
    for name in match:
        mine, theirs = _fact(flat, name), _fact(candidate, name)
        if mine is not None and theirs is not None and not _same(mine, theirs):
            return f"{name} {_shown(theirs)}, the flat's {_shown(mine)}"
    return None


def _text(value: object) -> str:
    return "" if value is None else str(value).strip()


def master_type(frame: Frame, keywords: KeywordMap = DEFAULT_KEYWORDS) -> Kind | None:
    """What a master (or other stacked frame) calibrates: BIAS, DARK, DARK_FLAT, FLAT, LIGHT.

    Read from CALFRAME ('Master Dark'), IMAGETYP and its fallbacks ('Master Dark',
    'MasterBias', 'Master Dark Flat', 'Dark Frame' with NCOMBINE > 1), PICTTYPE, then
    the file name. None when nothing tells.
    """
    texts = [_text(frame.header_value("CALFRAME"))]
    texts += [_text(frame.header_value(key)) for key in keywords.imagetype]
    for text in texts:
        if not text:
            continue
        rest = text.upper().replace("MASTER", " ")
        kind = kind_from_imagetype(rest)
        if kind is not None and kind not in (Kind.MASTER,):
            return kind
    pict = frame.header_value("PICTTYPE")
    if isinstance(pict, (int, float)) and not isinstance(pict, bool) and int(pict) in _PICTTYPE_CAL:
        return _PICTTYPE_CAL[int(pict)]
    kind = kind_from_name(frame.path)
    return None if kind is Kind.UNKNOWN else kind


def calibration_kind(frame: Frame, keywords: KeywordMap = DEFAULT_KEYWORDS) -> Kind | None:
    """BIAS, DARK or DARK_FLAT for a frame typed so (masters included), else None."""
    kind = frame.kind
    if kind is Kind.MASTER:
        kind = master_type(frame, keywords)
    return kind if kind in CALIBRATION_KINDS else None


def _role(frame: Frame, keywords: KeywordMap = DEFAULT_KEYWORDS) -> Kind:
    """How a candidate is treated when choosing: BIAS, DARK or DARK_FLAT.

    Frames of unknown type (a library scanned without bias_dark_only) count as a bias
    when their exposure is 0 or missing, else as a dark.
    """
    kind = calibration_kind(frame, keywords)
    if kind is not None:
        return kind
    return Kind.BIAS if not frame.exposure else Kind.DARK


def _exposure(frame: Frame, keywords: KeywordMap = DEFAULT_KEYWORDS) -> float:
    """Exposure in seconds: a bias is 0; missing is 0, as in the original."""
    if _role(frame, keywords) is Kind.BIAS:
        return 0.0
    return float(frame.exposure or 0.0)


def _temperature(frame: Frame) -> float:
    """Missing temperature counts as 0, as in the original."""
    return float(frame.temperature) if frame.temperature is not None else 0.0


def _num(value: float) -> str:
    """0.2 -> '0.2', 0 -> '0.0', 0.375 -> '0.375'."""
    text = f"{value:.3f}".rstrip("0")
    return text + "0" if text.endswith(".") else text


def _size_text(frame: Frame) -> str:
    return f"{frame.binning} {frame.dimensions}"


_ROLE_WORD = {Kind.BIAS: "bias", Kind.DARK: "dark", Kind.DARK_FLAT: "dark-flat"}


@dataclass(frozen=True)
class Choice:
    """The calibration frame chosen for one flat, and why."""

    flat: Frame
    calibration: Calibration  # mode "file" with .frame set and .why filled
    score: Optional[float]  # policy "original": |dT| + 3|dExp|; None for "exposure-match"


@dataclass
class Library:
    """The dark/bias frames of one folder, read from their headers."""

    folder: Path
    frames: list[Frame]  # candidates
    skipped: list[Skipped]  # unreadable files and files that are not darks or biases
    keywords: KeywordMap = field(default=DEFAULT_KEYWORDS, repr=False)
    recursive: bool = True

    @classmethod
    def scan(cls, folder: Path, recursive: bool = True, bias_dark_only: bool = True,
             keywords: KeywordMap = DEFAULT_KEYWORDS) -> "Library":
        """Read the headers of every FITS file in `folder` (and below, if recursive).

        With `bias_dark_only`, only frames typed BIAS, DARK or dark-flat (masters of
        those included) are candidates, as the original's "Dark & Bias files only".
        Without it, every readable frame that is not a flat or a light is a candidate
        (masters only when they are dark/bias masters).
        """
        folder = Path(folder)
        if not folder.exists():
            raise CalibrationError(f"calibration library {folder}: no such folder")
        if not folder.is_dir():
            raise CalibrationError(f"calibration library {folder}: not a folder")
        frames, skipped = read_frames(iter_fits_files(folder, recursive=recursive), keywords)
        candidates: list[Frame] = []
        for frame in frames:
            kind = calibration_kind(frame, keywords)
            if kind is not None:
                candidates.append(frame)
                continue
            if frame.kind is Kind.MASTER:
                what = master_type(frame, keywords)
                skipped.append(Skipped(frame.path, f"master {what.value if what else 'of unknown type'}, "
                                                   "not a dark or bias"))
            elif bias_dark_only:
                skipped.append(Skipped(frame.path, f"typed {frame.kind.value}, not BIAS or DARK "
                                                   "(bias_dark_only)"))
            elif frame.kind in (Kind.FLAT, Kind.LIGHT):
                skipped.append(Skipped(frame.path, f"typed {frame.kind.value}, not a dark or bias"))
            else:
                candidates.append(frame)
        candidates.sort(key=lambda f: str(f.path))
        skipped.sort(key=lambda s: str(s.path))
        return cls(folder, candidates, skipped, keywords, recursive)

    def _name(self, frame: Frame) -> str:
        """The frame's path relative to the library folder when inside it."""
        try:
            relative = os.path.relpath(frame.path, self.folder)
        except ValueError:  # another drive on Windows
            return str(frame.path)
        return str(frame.path) if relative.startswith("..") else relative

    def role(self, frame: Frame) -> Kind:
        """BIAS, DARK or DARK_FLAT: how a candidate is treated when choosing."""
        return _role(frame, self.keywords)

    def exposure(self, frame: Frame) -> float:
        return _exposure(frame, self.keywords)

    def same_size(self, flat: Frame) -> list[Frame]:
        """Candidates of exactly the flat's width, height and binning (never the flat itself)."""
        return [f for f in self.frames if f.size_key == flat.size_key and f.path != flat.path]

    def matching(self, flat: Frame, match: tuple[str, ...] = DEFAULT_MATCH) -> list[Frame]:
        """Candidates of the flat's size and binning whose camera settings (`match`)
        agree with the flat's wherever both carry them."""
        return [f for f in self.same_size(flat) if mismatch(flat, f, match) is None]

    def choose(self, flat: Frame, policy: str = "original", match: tuple[str, ...] = DEFAULT_MATCH) -> Choice:
        """The best dark or bias for `flat`; raise CalibrationError when none fits.

        Only frames whose settings match are chosen, never a closer one that does not;
        the reason names the frame that would otherwise have been chosen and the setting
        that ruled it out.
        """
        if policy not in POLICIES:
            raise ValueError(f"unknown calibration policy {policy!r}; known: {', '.join(POLICIES)}")
        same_size = self.same_size(flat)
        if not same_size:
            sizes = Counter(_size_text(f) for f in self.frames)
            has = ", ".join(f"{size} ×{n}" for size, n in sorted(sizes.items(), key=lambda kv: (-kv[1], kv[0])))
            raise CalibrationError(
                f"{flat.path}: no dark or bias in {self.folder} matches {_size_text(flat)} "
                f"(library has: {has or 'no darks or biases'}){self._below_hint}"
            )
        candidates = [f for f in same_size if mismatch(flat, f, match) is None]
        closest = self._choose_by(policy, flat, same_size).calibration.frame
        ruled_out = mismatch(flat, closest, match)
        if not candidates:
            raise CalibrationError(
                f"{flat.path}: no dark or bias in {self.folder} of {_size_text(flat)} has the flat's settings "
                f"({_settings_text(flat, match)}); the closest, {self._describe(closest)}, has {ruled_out}"
                f"{_others_text(len(same_size) - 1)}")
        choice = self._choose_by(policy, flat, candidates)
        if ruled_out is None:
            return choice
        note = f"; closer {self._describe(closest)} ruled out: {ruled_out}"
        cal = choice.calibration
        return Choice(flat, Calibration("file", frame=cal.frame, why=cal.why + note), choice.score)

    def _choose_by(self, policy: str, flat: Frame, candidates: list[Frame]) -> Choice:
        if policy == "original":
            return self._choose_original(flat, candidates)
        return self._choose_exposure_match(flat, candidates)

    @cached_property
    def _below_hint(self) -> str:
        """For an empty top level searched alone: the sub-folders that hold FITS files (walked once)."""
        if self.frames or self.recursive:
            return ""
        below = sum(1 for p in iter_fits_files(self.folder, recursive=True) if p.parent != self.folder)
        if not below:
            return ""
        return (f"; its sub-folders hold {below} FITS file(s), searched with -ar "
                "(precalibration.recursive: true in a rules file)")

    def _describe(self, frame: Frame) -> str:
        return f"{_ROLE_WORD[self.role(frame)]} {self._name(frame)}"

    def _choose_original(self, flat: Frame, candidates: list[Frame]) -> Choice:
        t, e = _temperature(flat), float(flat.exposure or 0.0)

        def score(f: Frame) -> tuple[float, float, float]:
            dt, de = abs(_temperature(f) - t), abs(self.exposure(f) - e)
            return dt + EXPOSURE_WEIGHT * de, dt, de

        best = min(candidates, key=lambda f: (round(score(f)[0], 9), str(f.path)))
        total, dt, de = score(best)
        notes = _missing_notes(flat, best, self.role(best))
        why = (f"{self._describe(best)}: |dT| {_num(dt)} + 3x|dExp| {_num(de)} = {_num(total)}"
               f"{notes}, lowest of {len(candidates)} (policy original)")
        return Choice(flat, Calibration("file", frame=best, why=why), total)

    def _choose_exposure_match(self, flat: Frame, candidates: list[Frame]) -> Choice:
        t, e = _temperature(flat), float(flat.exposure or 0.0)
        darks = [f for f in candidates if self.role(f) in (Kind.DARK, Kind.DARK_FLAT)]
        biases = [f for f in candidates if self.role(f) is Kind.BIAS]

        def dt(f: Frame) -> float:
            return abs(_temperature(f) - t)

        def de(f: Frame) -> float:
            return abs(self.exposure(f) - e)

        matched = [f for f in darks if de(f) <= EXPOSURE_TOLERANCE + 1e-9]
        if matched:
            best = min(matched, key=lambda f: (round(dt(f), 9), round(de(f), 9), str(f.path)))
            reason = (f"exposure {_num(self.exposure(best))} s matches the flat's {_num(e)} s within "
                      f"{_num(EXPOSURE_TOLERANCE)} s; |dT| {_num(dt(best))}, closest temperature of "
                      f"{len(matched)} matching")
        elif biases:
            best = min(biases, key=lambda f: (round(dt(f), 9), str(f.path)))
            reason = (f"no dark within {_num(EXPOSURE_TOLERANCE)} s of the flat's {_num(e)} s; "
                      f"|dT| {_num(dt(best))}, closest temperature of {len(biases)} "
                      f"bias{'es' if len(biases) != 1 else ''}")
        else:
            best = min(darks, key=lambda f: (round(de(f), 9), round(dt(f), 9), str(f.path)))
            reason = (f"no dark within {_num(EXPOSURE_TOLERANCE)} s of the flat's {_num(e)} s and no bias; "
                      f"closest exposure {_num(self.exposure(best))} s (|dExp| {_num(de(best))}), "
                      f"|dT| {_num(dt(best))}")
        why = f"{self._describe(best)}: {reason}{_missing_notes(flat, best, self.role(best))} (policy exposure-match)"
        return Choice(flat, Calibration("file", frame=best, why=why), None)


def _missing_notes(flat: Frame, chosen: Frame, role: Kind) -> str:
    missing = []
    if flat.temperature is None:
        missing.append("flat")
    if chosen.temperature is None:
        missing.append(_ROLE_WORD[role])
    if not missing:
        return ""
    return f" ({' and '.join(missing)} without temperature, taken as 0)"


def _settings_text(flat: Frame, match: tuple[str, ...]) -> str:
    known = [f"{name} {_shown(_fact(flat, name))}" for name in match if _fact(flat, name) is not None]
    return ", ".join(known) or "none carried"


def _others_text(n: int) -> str:
    return f" (and {n} other{'s' if n != 1 else ''} ruled out too)" if n > 0 else ""


def check_same_settings(flat: Frame, calibration: Frame, match: tuple[str, ...] = DEFAULT_MATCH) -> None:
    """A fixed dark/bias must have the flat's camera settings (where both carry them)."""
    differs = mismatch(flat, calibration, match)
    if differs:
        raise CalibrationError(f"dark/bias {calibration.path} does not match flat {flat.path}: {differs} "
                               "(precalibration.match)")


def check_same_geometry(flat: Frame, calibration: Frame) -> None:
    """A dark/bias must have the flat's width, height and binning."""
    if calibration.size_key != flat.size_key:
        raise CalibrationError(
            f"dark/bias {calibration.path} is {calibration.dimensions} {calibration.binning} "
            f"but flat {flat.path} is {flat.dimensions} {flat.binning}"
        )


def calibration_for(flat: Frame, settings, library: Optional[Library], fixed: Optional[Frame],
                    keywords: KeywordMap = DEFAULT_KEYWORDS) -> Calibration:
    """What to subtract from `flat` under `settings` (flatd.config.Precalibration).

    mode none: nothing; pedestal: a constant; file: the fixed frame (read from
    settings.file when `fixed` is None), which must have the flat's size and binning;
    auto: the library's choice (scanned from settings.library when `library` is None).
    Raises CalibrationError naming the flat and the reason.
    """
    mode = settings.mode
    if mode == "none":
        return NO_CALIBRATION
    if mode == "pedestal":
        return Calibration("pedestal", pedestal=float(settings.pedestal),
                           why=f"pedestal {float(settings.pedestal):g}")
    if mode == "file":
        if fixed is None:
            if settings.file is None:
                raise CalibrationError(f"{flat.path}: precalibration mode 'file' but no file is set")
            try:
                fixed = read_frame(settings.file, keywords)
            except FrameError as exc:
                raise CalibrationError(f"{flat.path}: dark/bias {exc.path}: {exc.reason}") from None
        check_same_geometry(flat, fixed)
        check_same_settings(flat, fixed, _match(settings))
        kind = calibration_kind(fixed, keywords)
        word = _ROLE_WORD.get(kind, "dark/bias") if kind else "dark/bias"
        return Calibration("file", frame=fixed, why=f"fixed {word} {fixed.path}")
    if mode == "auto":
        if library is None:
            if settings.library is None:
                raise CalibrationError(f"{flat.path}: precalibration mode 'auto' but no library is set")
            library = Library.scan(settings.library, settings.recursive, settings.bias_dark_only, keywords)
        return library.choose(flat, settings.policy, _match(settings)).calibration
    raise ValueError(f"unknown precalibration mode {mode!r}")


def _match(settings) -> tuple[str, ...]:
    match = getattr(settings, "match", None)
    return DEFAULT_MATCH if match is None else tuple(match)


def _camera(frame: Frame) -> str:
    return (frame.instrument or "").strip().lower()


class LibraryCache:
    """Library.scan once per (folder, recursive, bias_dark_only, keywords) for one run.

    A failed scan (missing folder) is remembered too and raised again.
    """

    def __init__(self) -> None:
        self._libraries: dict[tuple, Library | CalibrationError] = {}

    def get(self, folder: Path, recursive: bool = True, bias_dark_only: bool = True,
            keywords: KeywordMap = DEFAULT_KEYWORDS) -> Library:
        key = (Path(os.path.abspath(folder)), bool(recursive), bool(bias_dark_only), keywords)
        if key not in self._libraries:
            try:
                self._libraries[key] = Library.scan(Path(folder), recursive, bias_dark_only, keywords)
            except CalibrationError as exc:
                self._libraries[key] = exc
        found = self._libraries[key]
        if isinstance(found, CalibrationError):
            raise CalibrationError(str(found))
        return found

    def for_settings(self, settings, keywords: KeywordMap = DEFAULT_KEYWORDS) -> Optional[Library]:
        """The library of a Precalibration section in mode auto, else None."""
        if settings.mode != "auto" or settings.library is None:
            return None
        return self.get(settings.library, settings.recursive, settings.bias_dark_only, keywords)

    def __len__(self) -> int:
        return len(self._libraries)

    def clear(self) -> None:
        self._libraries.clear()
