"""The rules file: one schema (pydantic), defaults, and errors with key paths and lines."""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, NoReturn, Optional, Union

import yaml
from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, ValidationError, field_validator,
                      model_validator)

from flatd.errors import FlatdError
from flatd.output.carry import DEFAULT_CARRY, check_carry_key

DEFAULT_CONFIG_PATHS = (
    Path("~/.config/flatd/flatd.yaml").expanduser(),
    Path("/etc/flatd/flatd.yaml"),
)

# Bounds on a rules file, so that a hostile or mistaken one cannot exhaust the machine.
# A real rules file is a few KiB, a few hundred YAML nodes and about 6 levels deep.
MAX_RULES_BYTES = 2**20  # 1 MiB; the file is never read further than this
MAX_RULES_NODES = 20_000  # keys, values and list items; composing this many takes about 0.4 s
MAX_RULES_DEPTH = 50  # levels of nested mappings and lists

# ------------------------------------------------------------------- units

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|min|h|d)?\s*$", re.I)
_DURATION_UNITS = {None: 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.I)
_SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
               "t": 10**12, "tb": 10**12, "ki": 2**10, "kib": 2**10, "mi": 2**20, "mib": 2**20,
               "gi": 2**30, "gib": 2**30, "ti": 2**40, "tib": 2**40}


def parse_duration(value: Any) -> float:
    """Seconds from `90`, `90s`, `10m`, `1h`, `1d`."""
    if isinstance(value, bool):
        raise ValueError("a duration such as 90, 90s, 10m or 1h")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    match = _DURATION.match(str(value))
    if not match:
        raise ValueError(f"{value!r} is not a duration such as 90, 90s, 10m or 1h")
    unit = match.group(2).lower() if match.group(2) else None
    return float(match.group(1)) * _DURATION_UNITS[unit]


def parse_size(value: Any) -> int:
    """Bytes from `512MiB`, `2GB`, `1048576`."""
    if isinstance(value, bool):
        raise ValueError("a size such as 512MiB, 2GB or a number of bytes")
    if isinstance(value, (int, float)):
        if value <= 0:
            raise ValueError("a size must be positive")
        return int(value)
    match = _SIZE.match(str(value))
    if not match:
        raise ValueError(f"{value!r} is not a size such as 512MiB, 2GB or a number of bytes")
    number = float(match.group(1)) * _SIZE_UNITS[(match.group(2) or "").lower()]
    if number <= 0:
        raise ValueError("a size must be positive")
    return int(number)


Duration = Annotated[float, BeforeValidator(parse_duration)]
Size = Annotated[int, BeforeValidator(parse_size)]


def _expand_path(value: Any) -> Any:
    if isinstance(value, str):
        return Path(os.path.expandvars(os.path.expanduser(value)))
    return value


PathValue = Annotated[Path, BeforeValidator(_expand_path)]

_KEYWORD = re.compile(r"^[A-Z0-9_-]{1,8}$")


def _match_key(value: Any) -> Any:
    """A matching setting: camera, gain, offset, readout, or a FITS keyword (upper-cased)."""
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not a setting name or header keyword")
    if value.lower() in ("camera", "gain", "offset", "readout"):
        return value.lower()
    key = value.strip().upper()
    if not _KEYWORD.match(key):
        raise ValueError(f"{value!r} is not camera, gain, offset, readout or a FITS keyword "
                         "(1-8 of A-Z, 0-9, '-', '_')")
    return key


MatchKey = Annotated[str, BeforeValidator(_match_key)]
CarryKey = Annotated[str, BeforeValidator(check_carry_key)]


def _tolerance(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{value!r}: a tolerance is a number of 0 or more (or null for exact)")
    return float(value)


Tolerance = Annotated[float, BeforeValidator(_tolerance)]

# ------------------------------------------------------------------- sections


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _poll_mode(value: Any) -> Any:
    if value in ("auto", True, False):
        return value
    raise ValueError(f"{value!r}: poll is auto, true or false")


class CaptureFolder(Section):
    """A folder that receives flats."""

    path: PathValue = Field(description="the folder; relative to the rules file's folder, or absolute")
    recursive: bool = Field(True, description="look in sub-folders too")
    poll: Annotated[Union[str, bool], BeforeValidator(_poll_mode)] = Field(
        "auto", description="auto (native events, polling on network shares), true (always poll) or false")
    follow_symlinks: bool = Field(
        False, description="take symbolic links to files outside every capture folder (the link is moved)")


class Output(Section):
    """Where the master flats go and what they are called."""

    directory: PathValue = Field(Path("masters"), description="relative to each capture folder, or absolute")
    name: str = Field("FLAT-{filter}-{binning}-{size}-{method}-{date}-{temperature}C.fits",
                      description="the file name of each master, with {fields} from its group")
    format: Optional[Literal["fits", "fits.fz", "xisf"]] = Field(None, description=(
        "how masters are written: fits, fits.fz (tile-compressed, lossless) or xisf (PixInsight); it replaces "
        "the extension of the name; null: the name's extension decides"))
    rejection_map: bool = Field(False, description=(
        "add to each master an image extension REJMAP: per pixel, how many values were rejected low "
        "(plane 1) and high (plane 2), uint16; it costs 4 bytes a pixel of memory and of disk"))
    carry: list[CarryKey] = Field(list(DEFAULT_CARRY), description=(
        "header keywords copied from the inputs into each master when they all agree (numbers: within "
        "half a unit of the coarser printed precision); a keyword the inputs disagree on, or that some "
        "lack, is left out with a HISTORY line saying so"))
    previews: bool = Field(True, description=(
        "beside each master a PNG preview (auto-stretched, at most 1,200 px; in colour for a colour sensor) and, "
        "when there is a previous master, a PNG of their ratio with the changed dust marked"))

    @field_validator("name")
    @classmethod
    def _known_extension(cls, name: str) -> str:
        from flatd.output.naming import check_output_template

        return check_output_template(name, "the name")

    @field_validator("name")
    @classmethod
    def _known_fields(cls, name: str) -> str:
        from string import Formatter

        allowed = set(NAME_FIELDS)
        for _, field_name, _, _ in Formatter().parse(name):
            if field_name is not None and field_name not in allowed and not _KEYWORD.match(field_name):
                raise ValueError(f"unknown field {{{field_name}}}; known: {', '.join(sorted(allowed))}, "
                                 "or a header keyword in capitals ({FOCALLEN})")
        return name


NAME_FIELDS = ("filter", "binning", "size", "method", "date", "time", "datetime", "temperature",
               "exposure", "instrument", "telescope", "count", "group", "gain", "offset", "readout", "bayer")


class Inputs(Section):
    """What is done with the input flats."""

    ignore_type: bool = Field(False, description="treat every FITS file as a flat, whatever its IMAGETYP")
    move_to: Optional[str] = Field("originals-{date}", description=(
        "folder the inputs are moved to once their master is on disk, relative to each input's folder, "
        "or absolute; null leaves them in place"))


class Grouping(Section):
    """How flats are split into groups; one master per group."""

    size: bool = Field(True, description="separate flats of different binning or image size")
    filter: bool = Field(True, description="separate flats of different filters")
    temperature: Optional[float] = Field(1.0, ge=0.1, le=50, description=(
        "mean-shift bandwidth in °C for temperature groups; null: no temperature grouping"))
    min_group_size: int = Field(5, ge=1, description="groups with fewer flats are left out and reported")
    folder: bool = Field(True, description="flats in different folders (sessions) never share a group")
    keywords: dict[MatchKey, Optional[Tolerance]] = Field({}, description=(
        "header keywords whose values flats of one group must share, each with a numeric tolerance or null "
        "(exact), e.g. {FOCALLEN: 1.0, ROTATANG: 2.0}; a list means exact. Gain, offset, readout mode, "
        "CFA pattern and row order always separate groups"))

    @field_validator("keywords", mode="before")
    @classmethod
    def _list_means_exact(cls, value: Any) -> Any:
        if isinstance(value, list):
            return {key: None for key in value}
        return value

    @field_validator("keywords")
    @classmethod
    def _keywords_only(cls, value: dict) -> dict:
        named = [k for k in value if k in ("camera", "gain", "offset", "readout")]
        if named:
            raise ValueError(f"{', '.join(named)}: always separate groups; list header keywords here")
        return value


class Precalibration(Section):
    """What is subtracted from each flat before combining."""

    mode: Literal["none", "pedestal", "file", "auto"] = Field("none", description=(
        "none, pedestal, file or auto; without a mode: auto when a library is given, file when a file is"))
    pedestal: float = Field(100.0, description="the constant for mode pedestal, in ADU")
    file: Optional[PathValue] = Field(None, description="the dark or bias frame for mode file")
    library: Optional[PathValue] = Field(None, description="the folder of darks and biases for mode auto")
    recursive: bool = Field(True, description="look in the library's sub-folders too")
    bias_dark_only: bool = Field(True, description="consider only library files typed BIAS or DARK")
    policy: Literal["original", "exposure-match"] = Field("original", description=(
        "original: lowest |dT| + 3 |dExposure|; exposure-match: a dark of the flat's own exposure first"))
    match: list[MatchKey] = Field(["camera", "gain", "offset", "readout"], description=(
        "settings a dark or bias must share with its flat wherever both carry them: camera, gain, offset, "
        "readout (read through keywords:), or any header keyword; size and binning always"))
    overscan: Literal["auto", "off"] = Field("auto", description=(
        "auto: a frame (flat, dark or bias) with BIASSEC and TRIMSEC or DATASEC has its overscan subtracted "
        "(per-row median of BIASSEC, robust polynomial fit along the rows) and is trimmed to TRIMSEC, else "
        "DATASEC, before the bias or dark is subtracted; the master has the trimmed size. off: frames are "
        "used as stored"))

    @field_validator("overscan", mode="before")
    @classmethod
    def _overscan_word(cls, value: Any) -> Any:
        """YAML reads an unquoted off as false (and on as true)."""
        return {False: "off", True: "auto"}.get(value, value) if isinstance(value, bool) else value

    @model_validator(mode="before")
    @classmethod
    def _mode_from_source(cls, data: Any) -> Any:
        """Without a mode, a library means auto and a file means file; else none."""
        if isinstance(data, dict) and "mode" not in data:
            if data.get("library") is not None:
                return {**data, "mode": "auto"}
            if data.get("file") is not None:
                return {**data, "mode": "file"}
        return data

    @model_validator(mode="after")
    def _needs_source(self) -> "Precalibration":
        if self.mode == "file" and self.file is None:
            raise ValueError("mode 'file' needs precalibration.file")
        if self.mode == "auto" and self.library is None:
            raise ValueError("mode 'auto' needs precalibration.library")
        return self


class CombineSettings(Section):
    """How a group is combined. Besides method and normalize, the section takes the
    parameters of every method in the registry (flatd.stack.methods: sigma, minmax...), each
    with its default; a key that no method has is refused."""

    @staticmethod
    def _parameters_schema(schema: dict) -> None:
        from flatd.stack import methods

        properties = schema.setdefault("properties", {})
        for p in methods.parameters().values():
            bounds = {"exclusiveMinimum": p.gt, "minimum": p.ge, "maximum": p.le}
            kind = "integer" if p.kind is int else "number"
            properties[p.name] = {"type": kind if p.default is not None else [kind, "null"], "default": p.default,
                                  "description": p.description, **{k: v for k, v in bounds.items() if v is not None}}

    model_config = ConfigDict(extra="allow", validate_assignment=True, json_schema_extra=_parameters_schema)

    method: str = Field("auto", description="combine method: auto (chosen per group from its number of frames, "
                                            "see flatd.stack.auto), mean, median, minmax (min/max clip), sigma "
                                            "(sigma clip), or another method of the registry")
    normalize: Literal["none", "multiplicative"] = Field(
        "multiplicative", description="scale the flats to a common level before rejecting: none | multiplicative")
    equalize_cfa: bool = Field(False, description=(
        "colour (CFA) sensors: scale the master's R, G and B pixels so that each channel has the mean of the "
        "whole master, for calibration tools that do not equalize the channels themselves; false keeps the "
        "flat's colour balance (mono masters are never changed)"))
    rejection_warn: Optional[float] = Field(
        0.005, ge=0, le=1, allow_inf_nan=False,
        description="warn when the fraction of all values of a master that was rejected (0..1) exceeds by "
                    "more than this what the same method, with the same parameters, rejects from clean "
                    "Gaussian data of the same number of frames (robust methods reject some clean values "
                    "by construction, more at few frames); likewise for one input's values; null: never "
                    "warn (0.005: Siril's 0.5 % guidance)")

    @classmethod
    def parameter_fields(cls) -> dict:
        """The registry's method parameters as pydantic FieldInfo, by key (for the docs and
        tools that walk model_fields: the parameters are not fields of this model)."""
        from pydantic.fields import FieldInfo

        from flatd.stack import methods

        return {p.name: FieldInfo.from_annotated_attribute(
                    p.kind if p.default is not None else Optional[p.kind],
                    Field(p.default, description=p.description, gt=p.gt, ge=p.ge, le=p.le))
                for p in methods.parameters().values()}

    @field_validator("method", mode="before")
    @classmethod
    def _known_method(cls, value: Any) -> Any:
        from pydantic_core import PydanticCustomError

        problem = cls._method_problem(value)
        if problem:
            raise PydanticCustomError("combine_method", problem)
        return value

    @model_validator(mode="before")
    @classmethod
    def _method_parameters(cls, data: Any) -> Any:
        """Check each parameter key against the registry (at validation time, so methods
        registered later count) and fill in the defaults of those not given."""
        from flatd.stack import methods

        if not isinstance(data, dict):
            return data
        known = methods.parameters()
        data = dict(data)
        errors = []
        for key in [k for k in data if k not in cls.model_fields]:
            message = None
            if key not in known:
                message = (f"unknown key: no combine method has a parameter {str(key)[:40]!r} "
                           f"(parameters: {', '.join(sorted(known)) or 'none'})")
            else:
                try:
                    data[key] = methods.check_setting(key, data[key], data.get("method"))
                except ValueError as exc:
                    message = str(exc)
            if message:
                errors.append(cls._parameter_error(key, data[key], message))
        if errors:  # the field validators will not run: report an unknown method too
            problem = cls._method_problem(data.get("method", "auto"))
            if problem:
                errors.insert(0, cls._parameter_error("method", data["method"], problem))
            raise ValidationError.from_exception_data(cls.__name__, errors)
        for name, param in known.items():
            data.setdefault(name, param.default)
        return data

    @staticmethod
    def _method_problem(value: Any) -> Optional[str]:
        from flatd.stack import methods

        if not isinstance(value, str) or (value not in methods.names() and value != "auto"):
            return f"Input should be 'auto', {methods.choices_text()}"
        return None

    @staticmethod
    def _parameter_error(key: Any, value: Any, message: str) -> dict:
        """A pydantic line error for one key of the combine section."""
        from pydantic_core import PydanticCustomError

        return {"type": PydanticCustomError("combine_parameter", message), "loc": (str(key),), "input": value}


def _scheduler_address(value: Any) -> Any:
    if value is None:
        return None
    if not isinstance(value, str) or not re.match(r"^(tcp|tls|inproc|ws|wss|ucx)://\S{1,250}$", value):
        raise ValueError(f"{value!r} is not a Dask scheduler address such as tcp://scheduler:8786")
    return value


def _path_map(value: Any) -> Any:
    if not isinstance(value, dict):
        return value
    for key, target in value.items():
        for what in (key, target):
            if not isinstance(what, str) or not what.startswith("/") or "\0" in what or len(what) > 4096:
                raise ValueError(f"{what!r}: path_map maps absolute paths to absolute paths")
    return value


class Engine(Section):
    """Which engine stacks the groups: this process, or a Dask cluster."""

    kind: Literal["local", "dask"] = Field("local", description=(
        "the engine that stacks: local (in this process) or dask (each group a task on a Dask cluster; "
        "pip install 'flatd[dask]')"))
    address: Annotated[Optional[str], BeforeValidator(_scheduler_address)] = Field(None, description=(
        "kind dask: the scheduler, e.g. tcp://scheduler:8786"))
    fallback: Literal["local", "fail"] = Field("local", description=(
        "kind dask, when the scheduler cannot be reached or no worker runs this flatd version: local stacks in "
        "this process (and says so); fail fails the job with the reason"))
    path_map: Annotated[dict[str, str], BeforeValidator(_path_map)] = Field({}, description=(
        "kind dask: where workers mount the capture and calibration folders elsewhere, {coordinator prefix: "
        "worker prefix}, e.g. {/data: /mnt/nas/data}"))
    connect_timeout: Duration = Field(10.0, description="kind dask: how long to wait for the scheduler")
    memory_limit: Size = Field(512 * 2**20, description="memory the stacking may use for pixel bands, "
                                                     "whatever the number and size of flats (512MiB, 2GB, bytes)")
    workers: Optional[int] = Field(None, ge=1, description="threads that combine bands; null: one per CPU "
                                                           "this process may use")

    @model_validator(mode="after")
    def _dask_needs_address(self) -> "Engine":
        if self.kind == "dask" and self.address is None:
            raise ValueError("kind 'dask' needs engine.address (tcp://scheduler:8786)")
        return self


class Keywords(Section):
    """Header keywords tried first for each fact, before the built-in dialects."""

    imagetype: list[str] = Field([], description="keywords for the frame type")
    filter: list[str] = Field([], description="keywords for the filter name")
    exposure: list[str] = Field([], description="keywords for the exposure in seconds")
    temperature: list[str] = Field([], description="keywords for the sensor temperature")
    xbinning: list[str] = Field([], description="keywords for the horizontal binning")
    ybinning: list[str] = Field([], description="keywords for the vertical binning")
    date: list[str] = Field([], description="keywords for the date of the exposure")
    instrument: list[str] = Field([], description="keywords for the camera")
    telescope: list[str] = Field([], description="keywords for the telescope")
    gain: list[str] = Field([], description="keywords for the camera gain setting (not EGAIN, e-/ADU)")
    offset: list[str] = Field([], description="keywords for the camera offset (black level) setting")
    readout: list[str] = Field([], description="keywords for the readout mode")
    bayer: list[str] = Field([], description="keywords for the colour filter array pattern (RGGB...)")
    xbayeroff: list[str] = Field([], description="keywords for the CFA pattern's column offset")
    ybayeroff: list[str] = Field([], description="keywords for the CFA pattern's row offset")
    roworder: list[str] = Field([], description="keywords for the row order (TOP-DOWN or BOTTOM-UP)")


def _scalar_text(value: Any) -> Any:
    """Header values in a match may be written as YAML numbers or booleans (GAIN: 120)."""
    if isinstance(value, bool):
        return "T" if value else "F"
    if isinstance(value, (int, float)):
        return str(value)
    return value


MatchText = Annotated[str, BeforeValidator(_scalar_text)]


class Match(Section):
    """Which flats a rule applies to: a path glob and header values (globs, any case)."""

    path: Optional[str] = Field(None, description='glob on the flat\'s absolute path; "dir/**" is everything below dir')
    instrument: Optional[MatchText] = Field(None, description="glob on the camera (INSTRUME)")
    telescope: Optional[MatchText] = Field(None, description="glob on the telescope (TELESCOP)")
    filter: Optional[MatchText] = Field(None, description="glob on the filter name")
    header: dict[str, MatchText] = Field({}, description="header keywords and the glob each value must match")


QcAction = Literal["leave-out", "warn"]


class Quality(Section):
    """Checks on every flat before it joins a group, and on every master (flatd.qc)."""

    enabled: bool = Field(True, description="run the checks; false: combine whatever arrives, as before")
    # ---- flat checks (flatd.qc.flats), on the level sample the stacker reads anyway
    min_level: float = Field(0.15, ge=0, le=1, description=(
        "lowest calibrated median of a flat, as a fraction of the sensor's full scale (DATAMAX, SATURATE or "
        "the bit depth, else 65535), of its brightest CFA channel on a colour sensor (the weaker channels sit "
        "where the light's colour puts them); the manual asks for a third to a half"))
    max_level: float = Field(0.75, gt=0, le=1, description="highest calibrated median, as a fraction of full scale (of each CFA channel)")
    level_action: QcAction = Field("leave-out", description="leave-out: the flat is not combined and stays where "
                                   "it is; warn: it is combined and reported")
    max_saturated: float = Field(0.001, ge=0, le=1, description=(
        "largest fraction of a flat's pixels (of each CFA channel) at full scale"))
    saturation_action: QcAction = Field("leave-out", description="what a flat over max_saturated gets")
    odd_sigma: float = Field(8.0, gt=0, le=1000, description=(
        "a flat whose normalized large-scale pattern (binned blocks) differs from the group's consensus by more "
        "than this many times the blocks' own noise is the odd frame out (a cloud, a light leak, a moved panel)"))
    odd_min_deviation: float = Field(0.002, ge=0, le=1, description=(
        "and by at least this fraction of the level (clean sessions with very quiet blocks never trip it)"))
    odd_min_tilt: float = Field(0.02, gt=0, le=1, description=(
        "a flat (of a group of 5 or more) whose tilt differs from the straight-line trend of the frames taken "
        "around it by more than this fraction from one corner of the field to the opposite one is the odd frame "
        "out too (a panel or camera that moved; a twilight gradient turns and fades, but not quite smoothly: "
        "real dithered sky flats stray from the trend by up to 1.4 %)"))
    odd_action: QcAction = Field("leave-out", description="what the odd frame out gets (by its blocks or its tilt)")
    # ---- master checks (flatd.qc.masters, flatd.qc.previous)
    noise_warn: float = Field(2.0, gt=0, description=(
        "a master whose pixel-scale noise is more than this many times what its inputs predict (their photon "
        "noise combined over N frames, plus their fixed pattern) is marked warn"))
    noise_bad: float = Field(4.0, gt=0, description="...and bad above this many times")
    master_rejection_warn: float = Field(0.03, ge=0, le=1, description=(
        "warn when the combine rejected more of all values than the method rejects from clean data of the same "
        "number of frames, by more than this fraction"))
    master_rejection_bad: float = Field(0.10, ge=0, le=1, description="...bad above this fraction")
    zero_warn: float = Field(0.0001, ge=0, le=1, description=(
        "fraction of a master's pixels at or below zero above which it is marked warn (any non-finite pixel "
        "makes it bad)"))
    zero_bad: float = Field(0.01, ge=0, le=1, description="...bad above this fraction")
    saturated_warn: float = Field(0.001, ge=0, le=1, description=(
        "fraction of a master's pixels at the inputs' full scale above which it is marked warn"))
    saturated_bad: float = Field(0.01, ge=0, le=1, description="...bad above this fraction")
    field_warn: float = Field(4.0, gt=1, description=(
        "brightest-to-darkest ratio of a master's blocks (99th over 1st percentile of 1/16-size blocks) above "
        "which it is marked warn: vignetting this deep is seldom meant"))
    field_bad: float = Field(10.0, gt=1, description="...bad above this ratio")
    previous: bool = Field(True, description=(
        "compare each master with the previous one of the same camera, filter, binning and optics (from the "
        "ledger, else the output folder)"))
    previous_sigma: float = Field(5.0, gt=0, description=(
        "a pixel of the ratio new / previous (large-scale shape matched) has changed when it is more than this "
        "many times the ratio's noise from 1; also the significance of a dust blob"))
    previous_warn_fraction: float = Field(0.01, ge=0, le=1, description=(
        "warn when more than this fraction of the pixels changed since the previous master"))
    dust_min_depth: float = Field(0.005, gt=0, le=1, description=(
        "shallowest dust change listed, as a fraction of the level (on the ratio smoothed at dust_scale)"))
    dust_scale: float = Field(5.0, ge=1, le=1000, description="[pixels] smoothing of the ratio before dust is "
                              "looked for: about a small donut's ring")
    dust_warn: bool = Field(True, description="dust that appeared, moved or went since the previous master "
                            "makes a warn")
    bad_keeps_inputs: bool = Field(False, description=(
        "a master judged bad is written under its own name either way; true also leaves its inputs in place"))


_HOST = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252})$")
_TOKEN = re.compile(r"^[A-Za-z0-9._~-]{16,512}$")
LISTEN_HINT = "a host:port such as 127.0.0.1:8765, or [::1]:8765 for IPv6"


def parse_listen(value: Any) -> tuple[str, int]:
    """(host, port) from "127.0.0.1:8765", "[::1]:8765" or "name:8765"; ValueError otherwise.
    Port 0 takes any free port (the log says which)."""
    import ipaddress

    if not isinstance(value, str) or len(value) > 300:
        raise ValueError(f"{str(value)[:40]!r} is not {LISTEN_HINT}")
    host, sep, port = value.strip().rpartition(":")
    if not sep or not host:
        raise ValueError(f"{value[:40]!r} is not {LISTEN_HINT}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host[:40]!r} in brackets is not an IPv6 address") from None
    elif ":" in host:
        raise ValueError(f"{value[:40]!r}: write an IPv6 address in brackets, e.g. [::1]:8765")
    elif not _HOST.match(host):
        raise ValueError(f"{host[:40]!r} is not a host name or address")
    if not port.isdigit() or len(port) > 5 or int(port) > 65535:
        raise ValueError(f"port {port[:40]!r} is not a number from 0 to 65535")
    return host, int(port)


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and localhost; any other name or address reaches the network."""
    import ipaddress

    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Http(Section):
    """The optional HTTP endpoint of flatd watch: /healthz, /metrics and a status page."""

    listen: Optional[str] = Field(None, description=(
        "host:port the endpoint listens on, e.g. 127.0.0.1:8765, [::1]:8765 (IPv6 in brackets), 0.0.0.0:8765 "
        "(every interface: needs http.token); port 0 takes any free port; null: no endpoint"))
    token: Optional[str] = Field(None, description=(
        "a secret every request must carry (Authorization: Bearer TOKEN, or ?token=TOKEN): 16 to 512 of "
        "A-Z a-z 0-9 . _ ~ -; required when listen is not a loopback address; null: no token"))
    refresh: Duration = Field(30.0, description="seconds between the status page's own reloads (1 s to 1 h)")

    @field_validator("listen", mode="before")
    @classmethod
    def _listen(cls, value: Any) -> Optional[str]:
        if value is None:
            return None
        host, port = parse_listen(value)
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    @field_validator("token")
    @classmethod
    def _token(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and not _TOKEN.match(value):
            raise ValueError("a token is 16 to 512 of A-Z a-z 0-9 . _ ~ - (make one with: python3 -c "
                             "'import secrets; print(secrets.token_urlsafe(32))')")
        return value

    @field_validator("refresh")
    @classmethod
    def _refresh(cls, value: float) -> float:
        if not 1.0 <= value <= 3600.0:
            raise ValueError(f"{value:g} s: the page reloads every 1 s to 1 h")
        return value

    @model_validator(mode="before")
    @classmethod
    def _token_beyond_loopback(cls, data: Any) -> Any:
        """A listen address off loopback without a token is refused, at 'http.listen'."""
        from pydantic_core import PydanticCustomError

        if not isinstance(data, dict) or data.get("token") is not None:
            return data
        try:
            host, _ = parse_listen(data.get("listen"))
        except ValueError:
            return data  # None, or the field validator says what is wrong
        if is_loopback(host):
            return data
        message = (f"{host} is not a loopback address: anyone on the network could reach the endpoint; set "
                   "http.token, or listen on 127.0.0.1")
        raise ValidationError.from_exception_data(cls.__name__, [
            {"type": PydanticCustomError("http_token", message), "loc": ("listen",), "input": data.get("listen")}])


MAX_HOOK_TIMEOUT = 86400.0  # a day: a hook is killed at its timeout, and this is the longest one


def _command(value: Any) -> list[str]:
    """A hook command: a list of arguments, or a string split as a shell would (shlex), run without one."""
    import shlex

    if isinstance(value, str):
        try:
            argv = shlex.split(value)
        except ValueError as exc:
            raise ValueError(f"{value[:60]!r}: cannot split this command: {exc}") from None
    elif isinstance(value, list) and all(isinstance(a, (str, int, float)) and not isinstance(a, bool) for a in value):
        argv = [str(a) for a in value]
    else:
        raise ValueError("a command is a string (split like a shell would, but run without one) "
                         "or a list of arguments")
    if not argv or not argv[0].strip():
        raise ValueError("an empty command")
    if any("\0" in a for a in argv):
        raise ValueError("a command cannot hold a NUL character")
    return argv


def _commands(value: Any) -> Any:
    """A single command (a string) stands for a list of one."""
    return [value] if isinstance(value, str) else value


Command = Annotated[list[str], BeforeValidator(_command)]
Commands = Annotated[list[Command], BeforeValidator(_commands)]


class Hooks(Section):
    """Commands run after each master, failed group and batch (flatd.notify.hooks): each gets a JSON
    document on stdin and FLATD_* environment variables; none is run through a shell."""

    after_master: Commands = Field([], description=(
        "commands run after each master is written, e.g. [cp, -n, ...] or \"rsync -a ...\"; "
        "the master's path is in $FLATD_MASTER (write sh -c '...' to use it in an argument)"))
    on_failure: Commands = Field([], description="commands run after a group failed to make a master")
    after_batch: Commands = Field([], description=(
        "commands run once a batch is over: a capture folder's settled session (watch), or the whole run-once"))
    timeout: Duration = Field(60.0, gt=0, le=MAX_HOOK_TIMEOUT, description=(
        "how long a command may run; then it is killed, with its process group, and the failure is logged "
        "(jobs never wait for hooks)"))


def _url_list(value: Any) -> Any:
    if not isinstance(value, list):
        raise ValueError("a list of Apprise URLs, e.g. [\"json://localhost:8000/flatd\", \"tgram://bot/chat\"]")
    return value


def _apprise_url(value: Any) -> Any:
    """A URL Apprise can read (Apprise is imported only when notify.urls lists some)."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError("an Apprise URL is a non-empty string such as json://host:port/path")
    try:
        import apprise
    except ImportError:
        raise ValueError("notifications need Apprise, which is not installed: pip install 'flatd[notify]'") from None
    if apprise.Apprise.instantiate(value.strip()) is None:
        raise ValueError("Apprise cannot read this URL (a service it knows, such as json://, mailto://, tgram://, "
                         "ntfy://; see https://github.com/caronc/apprise/wiki)")
    return value.strip()


AppriseUrl = Annotated[str, BeforeValidator(_apprise_url)]


class Notify(Section):
    """Notifications through Apprise (flatd.notify.apprise_notify): one message per batch."""

    urls: Annotated[list[AppriseUrl], BeforeValidator(_url_list)] = Field([], description=(
        "Apprise URLs to notify (json://, form://, mailto://, tgram://, ntfy://, ...); empty: no notifications "
        "(pip install 'flatd[notify]')"))
    on: list[Literal["master", "failure", "quality"]] = Field(["master", "failure", "quality"], description=(
        "what a batch's message tells: master (masters made), failure (groups that failed), quality "
        "(warnings on a master: rejection, quality checks); a batch with none of these sends nothing"))
    attach_preview: bool = Field(True, description=(
        "attach each master's PNG preview where the service takes attachments"))
    retries: int = Field(3, ge=0, le=10, description="attempts after a failed delivery, then the failure is logged")
    retry_delay: Duration = Field(2.0, le=600, description="wait before the first retry; doubled at each one")

    @model_validator(mode="before")
    @classmethod
    def _on_is_a_word(cls, data: Any) -> Any:
        """YAML 1.1 reads an unquoted `on:` key as true: it means on."""
        if isinstance(data, dict) and True in data and "on" not in data:
            data = {("on" if k is True else k): v for k, v in data.items()}
        return data


class Rule(Section):
    """Overrides for the flats a rule matches; the first rule that matches wins."""

    name: Optional[str] = Field(None, description="a label for logs and dry runs; default rules[N]")
    match: Match = Field(description="the conditions, all of which must hold")
    output: Optional[dict[str, Any]] = Field(None, description="keys of output to override")
    inputs: Optional[dict[str, Any]] = Field(None, description="keys of inputs to override")
    grouping: Optional[dict[str, Any]] = Field(None, description="keys of grouping to override")
    precalibration: Optional[dict[str, Any]] = Field(None, description="keys of precalibration to override")
    combine: Optional[dict[str, Any]] = Field(None, description="keys of combine to override")
    quality: Optional[dict[str, Any]] = Field(None, description="keys of quality to override")
    hooks: Optional[dict[str, Any]] = Field(None, description="keys of hooks to override")


OVERRIDABLE = ("output", "inputs", "grouping", "precalibration", "combine", "quality", "hooks")


class Rules(Section):
    """The rules file."""

    capture: list[CaptureFolder] = Field([], description="folders that receive flats")
    output: Output = Field(Output(), description=Output.__doc__)
    inputs: Inputs = Field(Inputs(), description=Inputs.__doc__)
    grouping: Grouping = Field(Grouping(), description=Grouping.__doc__)
    precalibration: Precalibration = Field(Precalibration(), description=Precalibration.__doc__)
    combine: CombineSettings = Field(CombineSettings(), description="how each group is combined into a master")
    quality: Quality = Field(Quality(), description=Quality.__doc__)
    hooks: Hooks = Field(Hooks(), description=Hooks.__doc__)
    notify: Notify = Field(Notify(), description=Notify.__doc__)
    engine: Engine = Field(Engine(), description="memory and workers of the combine")
    keywords: Keywords = Field(Keywords(), description=Keywords.__doc__)
    http: Http = Field(Http(), description=Http.__doc__)
    settle: Duration = Field(600.0, description="quiet time after the last new flat before its session is combined")
    stable: Duration = Field(5.0, description="a file is complete once its size and mtime are unchanged this long")
    rescan: Duration = Field(300.0, description="full rescan of the capture folders, in case an event was missed")
    schedule: Optional[str] = Field(None, description="an optional cron line for a sweep at fixed times")
    state: PathValue = Field(Path("~/.local/state/flatd").expanduser(),
                             description="folder for the ledger and the lock")
    rules: list[Rule] = Field([], description="overrides for the flats a rule matches; first match wins")
    # The folder relative paths are resolved against (the rules file's); None: cwd.
    _base_dir: Optional[Path] = PrivateAttr(None)

    @field_validator("schedule")
    @classmethod
    def _cron(cls, value: Optional[str]) -> Optional[str]:
        if value is None:
            return None
        fields = value.split()
        if len(fields) != 5:
            raise ValueError(f"{value!r} is not a cron line of 5 fields (minute hour day month weekday)")
        from apscheduler.triggers.cron import CronTrigger

        try:
            CronTrigger.from_crontab(value)
        except ValueError as exc:
            raise ValueError(f"{value!r}: {exc}") from None
        return value

    def keyword_map(self):
        from flatd.ingest.frames import KeywordMap

        return KeywordMap.from_mapping({k: v for k, v in self.keywords.model_dump().items() if v})


# ------------------------------------------------------------------- errors


@dataclass(frozen=True)
class ConfigProblem:
    key: str
    message: str
    line: Optional[int] = None


class ConfigError(FlatdError):
    """The rules file is invalid; holds every problem found."""

    def __init__(self, path: Optional[Path], problems: list[ConfigProblem]):
        self.path = path
        self.problems = problems
        super().__init__(self.render())

    def render(self) -> str:
        where = str(self.path) if self.path else "<rules>"
        lines = []
        for p in self.problems:
            place = f"{where}:{p.line}" if p.line else where
            lines.append(f"{place}: at '{p.key}': {p.message}")
        return "\n".join(lines)


def _key_path(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("function-after", "function-before") or str(part).startswith(("function-", "lax-or-strict", "union[")):
            continue
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _line_index(node: yaml.Node, prefix: tuple = (), index: Optional[dict] = None,
                duplicates: Optional[list] = None) -> dict:
    """Map each key path (tuple) in a composed YAML document to its 1-based line.

    Keys given twice in one mapping are appended to `duplicates` as ConfigProblems:
    YAML would silently keep the last one. The node is a bounded tree (_BoundedLoader
    refuses aliases), so the walk ends within MAX_RULES_NODES steps.
    """
    index = {} if index is None else index
    index.setdefault(prefix, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        seen: set = set()
        for key_node, value_node in node.value:
            key = key_node.value
            line = key_node.start_mark.line + 1
            if key in seen and duplicates is not None:
                duplicates.append(ConfigProblem(_key_path(prefix + (key,)), "key given twice (only the last would count)", line))
            seen.add(key)
            index[prefix + (key,)] = line
            _line_index(value_node, prefix + (key,), index, duplicates)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            index[prefix + (i,)] = item.start_mark.line + 1
            _line_index(item, prefix + (i,), index, duplicates)
    return index


def _line_for(loc: tuple, lines: dict) -> Optional[int]:
    loc = tuple(p for p in loc if not (isinstance(p, str) and p.startswith(("function-", "union["))))
    while loc:
        if loc in lines:
            return lines[loc]
        loc = loc[:-1]
    return lines.get(())


def _problems_from(exc: ValidationError, lines: dict) -> list[ConfigProblem]:
    problems = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        message = err["msg"]
        if err["type"] == "extra_forbidden":
            message = "unknown key"
        message = message.removeprefix("Value error, ")
        problems.append(ConfigProblem(_key_path(loc), message, _line_for(loc, lines)))
    return problems


def _rule_override_problems(data: dict, lines: dict) -> list[ConfigProblem]:
    """Check each rule's section overrides as they will be applied: on top of the base."""
    problems: list[ConfigProblem] = []
    rules = data.get("rules")
    if not isinstance(rules, list):
        return problems
    for i, rule in enumerate(rules):
        if not isinstance(rule, dict):
            continue
        for section in OVERRIDABLE:
            override = rule.get(section)
            if not isinstance(override, dict):
                continue
            model = Rules.model_fields[section].annotation
            base = data.get(section) if isinstance(data.get(section), dict) else {}
            try:
                model.model_validate({**base, **override})
            except ValidationError as exc:
                for err in exc.errors():
                    loc = tuple(err["loc"])
                    if loc and loc[0] not in override:
                        continue
                    full = ("rules", i, section) + loc
                    message = "unknown key" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
                    problems.append(ConfigProblem(_key_path(full), message, _line_for(full, lines)))
    return problems


# ------------------------------------------------------------------- loading


class _BoundedLoader(yaml.SafeLoader):
    """A SafeLoader that refuses aliases and stops past MAX_RULES_NODES nodes or MAX_RULES_DEPTH levels.

    The bounds are checked while composing, node by node, before any Python object is built;
    with aliases refused the node graph is a tree, so nothing is walked twice.
    """

    def __init__(self, stream: str):
        super().__init__(stream)
        self.node_count = 0
        self.depth = 0

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            _refuse(event, f"YAML aliases (*{event.anchor}) are not allowed in a rules file; write the value out in full")
        self.node_count += 1
        if self.node_count > MAX_RULES_NODES:
            _refuse(event, f"more than {MAX_RULES_NODES} YAML nodes (keys, values, list items); "
                           "a rules file is refused beyond that")
        if self.depth >= MAX_RULES_DEPTH:
            _refuse(event, f"nested more than {MAX_RULES_DEPTH} levels deep; a rules file is refused beyond that")
        self.depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_object(self, node, deep=False):
        """A value YAML accepts but Python cannot build (month 13, 5000 digits) is a YAML error at its line."""
        try:
            return super().construct_object(node, deep)
        except ValueError as exc:
            raise yaml.constructor.ConstructorError(None, None, f"cannot read this value: {exc}",
                                                    node.start_mark) from None


def _refuse(event: yaml.Event, message: str) -> NoReturn:
    raise yaml.composer.ComposerError(None, None, message, event.start_mark)


def _compose_and_construct(text: str) -> tuple[Optional[yaml.Node], Any]:
    """The document's node tree (within the bounds) and the data built from it, in one parse."""
    loader = _BoundedLoader(text)
    try:
        node = loader.get_single_node()
        return node, (loader.construct_document(node) if node is not None else None)
    finally:
        loader.dispose()


def _syntax_problem(exc: yaml.YAMLError, text: str) -> ConfigProblem:
    """One line for a YAML error: what is wrong, at which line."""
    if isinstance(exc, yaml.reader.ReaderError):
        line = text.count("\n", 0, exc.position) + 1
        code = exc.character if isinstance(exc.character, int) else ord(exc.character)
        return ConfigProblem("(syntax)", f"character #x{code:04x}: {exc.reason}", line)
    mark = getattr(exc, "problem_mark", None)
    line = mark.line + 1 if mark else None
    return ConfigProblem("(syntax)", str(getattr(exc, "problem", exc)), line)


def parse_rules(text: str, path: Optional[Path] = None, base: Optional[Path] = None) -> Rules:
    """Validate rules text; raise ConfigError with every problem and its line."""
    try:
        node, data = _compose_and_construct(text)
    except yaml.YAMLError as exc:
        raise ConfigError(path, [_syntax_problem(exc, text)]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(path, [ConfigProblem("(top level)", "the rules file must be a mapping of keys", 1)])
    duplicates: list[ConfigProblem] = []
    lines = _line_index(node, duplicates=duplicates) if node is not None else {}
    problems = duplicates + _rule_override_problems(data, lines)
    try:
        rules = Rules.model_validate(data)
    except ValidationError as exc:
        problems = _problems_from(exc, lines) + problems
    if problems:
        problems.sort(key=lambda p: p.line or 0)
        raise ConfigError(path, problems)
    return resolve_relative_paths(rules, base or (path.absolute().parent if path else Path.cwd()))


def resolve_relative_paths(rules: Rules, base: Path) -> Rules:
    """Capture folders, library, file and state relative to the rules file's folder.

    output.directory and inputs.move_to stay relative: they are relative to each
    capture folder / input folder by design.
    """
    base = Path(os.path.abspath(base))

    def absolute(p: Optional[Path]) -> Optional[Path]:
        return None if p is None else (p if p.is_absolute() else (base / p))

    for folder in rules.capture:
        folder.path = absolute(folder.path)
    pre = rules.precalibration
    pre.__dict__["library"] = absolute(pre.library)
    pre.__dict__["file"] = absolute(pre.file)
    rules.__dict__["state"] = absolute(rules.state)
    for rule in rules.rules:
        # A rule's library/file override and its path glob: relative to the same folder.
        override = rule.precalibration or {}
        for key in ("library", "file"):
            value = override.get(key)
            if isinstance(value, str):
                override[key] = str(absolute(_expand_path(value)))
        pattern = rule.match.path
        if pattern and not pattern.startswith(("*", "?", "[")):
            expanded = os.path.expandvars(os.path.expanduser(pattern))
            if not os.path.isabs(expanded):
                rule.match.__dict__["path"] = str(base / expanded)
    rules._base_dir = base
    return rules


def find_config(explicit: Optional[Path]) -> Optional[Path]:
    """The rules file named, else $FLATD_CONFIG, else the first default that exists."""
    if explicit is not None:
        return Path(explicit)
    env = os.environ.get("FLATD_CONFIG")
    if env:
        return Path(env)
    for candidate in DEFAULT_CONFIG_PATHS:
        if candidate.exists():
            return candidate
    return None


def load_rules(path: Optional[Path]) -> Rules:
    """Read and validate a rules file; no file means the built-in defaults."""
    if path is None:
        return Rules()
    path = Path(path)
    return parse_rules(_read_rules_text(path), path)


def _read_rules_text(path: Path) -> str:
    """The file's UTF-8 text, never reading more than MAX_RULES_BYTES + 1 bytes of it."""
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size > MAX_RULES_BYTES:
                raise _file_problem(path, f"too large: {size} bytes, over the limit of {MAX_RULES_BYTES} bytes (1 MiB)")
            data = handle.read(MAX_RULES_BYTES + 1)
    except OSError as exc:
        raise _file_problem(path, f"cannot read: {exc.strerror or exc}") from None
    if len(data) > MAX_RULES_BYTES:  # a device or a file still growing: its size said less
        raise _file_problem(path, f"too large: more than the limit of {MAX_RULES_BYTES} bytes (1 MiB)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _file_problem(path, f"not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})") from None


def _file_problem(path: Path, message: str) -> ConfigError:
    return ConfigError(path, [ConfigProblem("(file)", message)])


# ------------------------------------------------------------------- per-rule overrides


def _glob_match(pattern: str, value: Optional[str]) -> bool:
    return value is not None and fnmatch.fnmatchcase(value.strip().lower(), pattern.strip().lower())


def _path_match(pattern: str, path: Path) -> bool:
    pattern = os.path.expanduser(pattern)
    text = str(path)
    if fnmatch.fnmatchcase(text, pattern):
        return True
    # "dir/**" also matches files directly in dir and at any depth below.
    if pattern.endswith("/**"):
        root = pattern[:-3]
        return fnmatch.fnmatchcase(text, root + "/*") or text.startswith(root.rstrip("*") + "/") and "*" not in root
    return False


def rule_matches(rule: Rule, frame) -> bool:
    """True when every condition of the rule's match holds for the frame."""
    m = rule.match
    if m.path is not None and not _path_match(m.path, Path(os.path.abspath(frame.path))):
        return False
    if m.instrument is not None and not _glob_match(m.instrument, frame.instrument):
        return False
    if m.telescope is not None and not _glob_match(m.telescope, frame.telescope):
        return False
    if m.filter is not None and not _glob_match(m.filter, frame.filter):
        return False
    for key, pattern in m.header.items():
        value = frame.header_value(key)
        if not _glob_match(pattern, None if value is None else str(value)):
            return False
    return True


@dataclass(frozen=True)
class Effective:
    """The settings in force for one flat: the base rules with a rule's overrides."""

    rule: Optional[str]
    output: Output
    inputs: Inputs
    grouping: Grouping
    precalibration: Precalibration
    combine: CombineSettings
    quality: Quality = dataclasses.field(default_factory=Quality)
    hooks: Hooks = dataclasses.field(default_factory=Hooks)


def rule_label(rule: Rule, index: int) -> str:
    return rule.name or f"rules[{index}]"


def effective_for(rules: Rules, frame) -> Effective:
    """The first rule that matches the frame wins; otherwise the base settings."""
    for index, rule in enumerate(rules.rules):
        if rule_matches(rule, frame):
            sections = {}
            for name in OVERRIDABLE:
                base = getattr(rules, name)
                override = getattr(rule, name)
                sections[name] = type(base).model_validate({**base.model_dump(), **override}) if override else base
            pre = sections["precalibration"]
            if rule.precalibration:
                base_dir = rules._base_dir or Path.cwd()
                for key in ("library", "file"):
                    value = getattr(pre, key)
                    if value is not None and not value.is_absolute():
                        pre.__dict__[key] = base_dir / value
            return Effective(rule_label(rule, index), **sections)
    return Effective(None, rules.output, rules.inputs, rules.grouping, rules.precalibration, rules.combine,
                     rules.quality, rules.hooks)


def hooks_for(rules: Rules, label: Optional[str]) -> Hooks:
    """The hooks in force for a job of the rule labelled `label` (None: the base hooks)."""
    for index, rule in enumerate(rules.rules):
        if label is not None and rule_label(rule, index) == label:
            return Hooks.model_validate({**rules.hooks.model_dump(), **rule.hooks}) if rule.hooks else rules.hooks
    return rules.hooks
