"""The rules file: one schema (pydantic), defaults, and errors with key paths and lines."""

from __future__ import annotations

import fnmatch
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, NoReturn, Optional, Union

import yaml
from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, ValidationError, field_validator,
                      model_validator)

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

# ------------------------------------------------------------------- sections


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _poll_mode(value: Any) -> Any:
    if value in ("auto", True, False):
        return value
    raise ValueError(f"{value!r}: poll is auto, true or false")


class CaptureFolder(Section):
    path: PathValue
    recursive: bool = True
    poll: Annotated[Union[str, bool], BeforeValidator(_poll_mode)] = "auto"
    # A symbolic link to a file outside every capture folder is not followed unless this is on.
    follow_symlinks: bool = False


class Output(Section):
    directory: PathValue = Path("masters")
    name: str = "FLAT-{filter}-{binning}-{size}-{method}-{date}-{temperature}C.fits"

    @field_validator("name")
    @classmethod
    def _known_fields(cls, name: str) -> str:
        from string import Formatter

        allowed = set(NAME_FIELDS)
        for _, field_name, _, _ in Formatter().parse(name):
            if field_name is not None and field_name not in allowed:
                raise ValueError(f"unknown field {{{field_name}}}; known: {', '.join(sorted(allowed))}")
        return name


NAME_FIELDS = ("filter", "binning", "size", "method", "date", "time", "datetime", "temperature",
               "exposure", "instrument", "telescope", "count", "group")


class Inputs(Section):
    ignore_type: bool = False
    move_to: Optional[str] = "originals-{date}"


class Grouping(Section):
    size: bool = True
    filter: bool = True
    temperature: Optional[float] = Field(1.0, ge=0.1, le=50)
    min_group_size: int = Field(5, ge=1)
    folder: bool = True  # flats in different folders (sessions) never share a group


class Precalibration(Section):
    mode: Literal["none", "pedestal", "file", "auto"] = "none"
    pedestal: float = 100.0
    file: Optional[PathValue] = None
    library: Optional[PathValue] = None
    recursive: bool = True
    bias_dark_only: bool = True
    policy: Literal["original", "exposure-match"] = "original"

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
    method: Literal["mean", "median", "minmax", "sigma"] = "sigma"
    sigma: float = Field(2.0, gt=0)
    minmax: int = Field(2, ge=1)
    normalize: Literal["none", "multiplicative"] = "multiplicative"


class Engine(Section):
    memory_limit: Size = 512 * 2**20
    workers: Optional[int] = Field(None, ge=1)


class Keywords(Section):
    """Header keywords tried first for each fact, before the built-in dialects."""

    imagetype: list[str] = []
    filter: list[str] = []
    exposure: list[str] = []
    temperature: list[str] = []
    xbinning: list[str] = []
    ybinning: list[str] = []
    date: list[str] = []
    instrument: list[str] = []
    telescope: list[str] = []


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

    path: Optional[str] = None
    instrument: Optional[MatchText] = None
    telescope: Optional[MatchText] = None
    filter: Optional[MatchText] = None
    header: dict[str, MatchText] = {}


class Rule(Section):
    name: Optional[str] = None
    match: Match
    output: Optional[dict[str, Any]] = None
    inputs: Optional[dict[str, Any]] = None
    grouping: Optional[dict[str, Any]] = None
    precalibration: Optional[dict[str, Any]] = None
    combine: Optional[dict[str, Any]] = None


OVERRIDABLE = ("output", "inputs", "grouping", "precalibration", "combine")


class Rules(Section):
    capture: list[CaptureFolder] = []
    output: Output = Output()
    inputs: Inputs = Inputs()
    grouping: Grouping = Grouping()
    precalibration: Precalibration = Precalibration()
    combine: CombineSettings = CombineSettings()
    engine: Engine = Engine()
    keywords: Keywords = Keywords()
    settle: Duration = 600.0
    stable: Duration = 5.0
    rescan: Duration = 300.0
    schedule: Optional[str] = None
    state: PathValue = Path("~/.local/state/flatd").expanduser()
    rules: list[Rule] = []
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
        from flatd.frames import KeywordMap

        return KeywordMap.from_mapping({k: v for k, v in self.keywords.model_dump().items() if v})


# ------------------------------------------------------------------- errors


@dataclass(frozen=True)
class ConfigProblem:
    key: str
    message: str
    line: Optional[int] = None


class ConfigError(Exception):
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
    return Effective(None, rules.output, rules.inputs, rules.grouping, rules.precalibration, rules.combine)
