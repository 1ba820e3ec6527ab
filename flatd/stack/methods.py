"""The registry of combine methods: one entry per method, read by config, cli and masters.

An entry holds the method's name (as in the rules file and on the command line), its
parameters with their validation, its label (the original program's Mean, Median,
MinMaxClip2, SigmaClip2.0), its description, its header cards, its minimum number of
frames, its command-line options, and its kernel: a rejection stage that decides which
values of a pixel column are kept (None: all of them) and an estimator ("mean" or
"median") that combines what was kept. The kernels live in flatd.stack.combine, looked up by
these names, so that this module imports neither numba nor numpy.

Adding a method: register an Entry here and its rejection kernel in flatd.stack.combine.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

# Keys of the rules file's combine section that are not method parameters.
RESERVED = ("method", "normalize")
_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,39}$")


# --------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class Param:
    """One parameter of a method: a whole or real number with bounds.

    `card` and `comment` name the FITS card the master header gets for it (none if
    `card` is None); `metavar` is shown by the command-line help.
    """

    name: str
    kind: type  # int or float
    default: Any
    description: str
    gt: Optional[float] = None
    ge: Optional[float] = None
    le: Optional[float] = None
    card: Optional[str] = None
    comment: str = ""
    metavar: str = "VALUE"

    def validate(self, value: Any) -> Any:
        """The value as self.kind, or ValueError saying what is wrong (pydantic's wording)."""
        number = _number(value, self.kind is int)
        if self.kind is int and isinstance(number, float):
            if not number.is_integer():
                raise ValueError("Input should be a valid integer, got a number with a fractional part")
            number = int(number)
        elif self.kind is not int:
            try:
                number = float(number)
            except OverflowError:
                raise ValueError("Input should be a finite number") from None
        self._check_bounds(number)
        return number

    def _check_bounds(self, number) -> None:
        if self.gt is not None and not number > self.gt:
            raise ValueError(f"Input should be greater than {_bound(self.gt)}")
        if self.ge is not None and not number >= self.ge:
            raise ValueError(f"Input should be greater than or equal to {_bound(self.ge)}")
        if self.le is not None and not number <= self.le:
            raise ValueError(f"Input should be less than or equal to {_bound(self.le)}")


def _number(value: Any, whole: bool):
    """An int or a finite float from a number or numeric text; booleans are refused."""
    what = "a valid integer" if whole else "a valid number"
    if isinstance(value, bool):
        raise ValueError(f"Input should be {what}, not a boolean")
    if isinstance(value, str):
        value = _parse_text(value.strip(), whole, what)
    elif hasattr(value, "item") and not isinstance(value, (int, float)):  # numpy scalars
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"Input should be {what}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("Input should be a finite number")
    return value


def _parse_text(text: str, whole: bool, what: str):
    try:
        return int(text) if whole and re.fullmatch(r"[+-]?\d{1,4000}", text) else float(text)
    except ValueError:
        unit = "an integer" if whole else "a number"
        raise ValueError(f"Input should be {what}, unable to parse string as {unit}") from None


def _bound(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def format_z(z: float) -> str:
    """A threshold as the original wrote it in labels: 2.0, 2.5, 3.0."""
    text = f"{float(z):g}"
    if "." not in text and "e" not in text and "inf" not in text:
        text += ".0"
    return text


# --------------------------------------------------------------------------- entries


@dataclass(frozen=True)
class Entry:
    """One combine method.

    summary: one line for `flatd combine --help` and the docs. label, describe and
    min_frames take the method's parameter values (a mapping).
    reject names a rejection kernel in flatd.stack.combine (None: every value is kept);
    estimator names the estimator there ("mean" or "median"). flags are `flatd
    combine` options that choose the method; their value sets `flag_param` (a switch
    when None).
    """

    name: str
    summary: str
    label: Callable[[Mapping[str, Any]], str]
    describe: Callable[[Mapping[str, Any]], str]
    params: tuple[Param, ...] = ()
    reject: Optional[str] = None
    estimator: str = "mean"
    min_frames: Callable[[Mapping[str, Any]], int] = lambda values: 1
    flags: tuple[str, ...] = ()
    flag_param: Optional[str] = None

    def param(self, name: str) -> Optional[Param]:
        return next((p for p in self.params if p.name == name), None)


_REGISTRY: dict[str, Entry] = {}


def register(entry: Entry) -> Entry:
    """Add a method; ValueError when its name, a parameter or a flag clashes."""
    if not _NAME.match(entry.name):
        raise ValueError(f"method name {entry.name!r}: lower-case letters, digits, '-' and '_', 40 at most")
    if entry.name in _REGISTRY:
        raise ValueError(f"combine method {entry.name!r} is registered already")
    shared = parameters()
    for p in entry.params:
        if p.name in RESERVED or not _NAME.match(p.name):
            raise ValueError(f"method {entry.name}: {p.name!r} cannot be a parameter name")
        if p.kind not in (int, float):
            raise ValueError(f"method {entry.name}: parameter {p.name!r} must be an int or a float")
        if p.name in shared and shared[p.name] != p:
            raise ValueError(f"method {entry.name}: parameter {p.name!r} differs from the one of the same name "
                             "another method has (the rules file has one key for both)")
        p.validate(p.default)
    if entry.flag_param is not None and entry.param(entry.flag_param) is None:
        raise ValueError(f"method {entry.name}: flag_param {entry.flag_param!r} is not one of its parameters")
    taken = {flag for other in _REGISTRY.values() for flag in other.flags}
    if taken & set(entry.flags):
        raise ValueError(f"method {entry.name}: option(s) {', '.join(sorted(taken & set(entry.flags)))} taken")
    _REGISTRY[entry.name] = entry
    return entry


def unregister(name: str) -> Entry:
    """Remove a method (tests register toy methods and remove them afterwards)."""
    return _REGISTRY.pop(name)


def get(name: str) -> Entry:
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown combine method {_short(name)}; known: {', '.join(names())}") from None


def names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def entries() -> tuple[Entry, ...]:
    return tuple(_REGISTRY.values())


def parameters() -> dict[str, Param]:
    """Every parameter of every method, by name (methods that share one share its key)."""
    return {p.name: p for entry in _REGISTRY.values() for p in entry.params}


def choices_text() -> str:
    """The known names as pydantic lists choices: 'mean', 'median', 'minmax' or 'sigma'."""
    quoted = [repr(n) for n in names()]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]


# --------------------------------------------------------------------------- method


class Method:
    """A configured method: an entry and its parameter values. Immutable, hashable.

    Method("sigma", sigma=2.5). Parameters of other methods are checked and ignored,
    as in the rules file's combine section, where every method's keys may be given.
    The values read as attributes too: Method("minmax", minmax=3).minmax == 3.
    """

    __slots__ = ("entry", "params")

    def __init__(self, name: str, **values: Any):
        entry = get(name)
        object.__setattr__(self, "entry", entry)
        object.__setattr__(self, "params", _validated(entry, values))

    @classmethod
    def from_settings(cls, settings) -> "Method":
        """From a flatd.config.CombineSettings (or anything with .method and parameter attributes)."""
        entry = get(settings.method)
        values = {p.name: getattr(settings, p.name) for p in entry.params if hasattr(settings, p.name)}
        return cls(entry.name, **values)

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def label(self) -> str:
        """The original program's name: Mean, Median, MinMaxClip2, SigmaClip2.0."""
        return self.entry.label(self.params)

    @property
    def description(self) -> str:
        return self.entry.describe(self.params)

    @property
    def min_frames(self) -> int:
        return int(self.entry.min_frames(self.params))

    @property
    def cards(self) -> tuple[tuple[str, Any, str], ...]:
        """Header cards (keyword, value, comment): COMBMETH, then one per parameter that has a card."""
        cards = [("COMBMETH", self.label, "combine method")]
        cards += [(p.card, self.params[p.name], p.comment) for p in self.entry.params if p.card]
        return tuple(cards)

    def __getattr__(self, name: str) -> Any:
        if name in Method.__slots__:
            raise AttributeError(name)
        try:
            return self.params[name]
        except KeyError:
            raise AttributeError(f"combine method {self.entry.name} has no parameter {name!r}") from None

    def __setattr__(self, name, value):
        raise AttributeError("a Method is immutable")

    def __eq__(self, other) -> bool:
        return isinstance(other, Method) and (self.name, self.params) == (other.name, other.params)

    def __hash__(self) -> int:
        return hash((self.name, tuple(sorted(self.params.items()))))

    def __repr__(self) -> str:
        args = "".join(f", {k}={v!r}" for k, v in self.params.items())
        return f"Method({self.name!r}{args})"

    def __reduce__(self):
        return _make_method, (self.name, dict(self.params))


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _make_method(name: str, values: dict) -> Method:
    return Method(name, **values)


def _validated(entry: Entry, values: Mapping[str, Any]) -> dict[str, Any]:
    """The entry's parameter values (defaults filled in); ValueError names the parameter."""
    known = parameters()
    for key, value in values.items():
        spec = entry.param(key) or known.get(key)
        if spec is None:
            own = ", ".join(p.name for p in entry.params) or "none"
            raise ValueError(f"combine method {entry.name} has no parameter {key!r} (its parameters: {own})")
        try:
            spec.validate(value)
        except ValueError as exc:
            raise ValueError(f"{entry.name} {key}={_short(value)}: {exc}") from None
    return {p.name: p.validate(values.get(p.name, p.default)) for p in entry.params}


# --------------------------------------------------------------------------- built-in methods

SIGMA = Param("sigma", float, 2.0, "sigma clip threshold: values with |x - mean| / std above it are dropped",
              gt=0, le=1000, card="CLIPSIG", comment="sigma clip threshold (z-score)", metavar="<threshold>")
MINMAX = Param("minmax", int, 2, "min/max clip passes: each drops the lowest and the highest value of a pixel",
               ge=1, le=1000, card="CLIPN", comment="min/max clip passes", metavar="<# values to clip>")

register(Entry("mean", "simple mean", label=lambda v: "Mean", describe=lambda v: "mean",
               estimator="mean", flags=("-m", "--mean")))
register(Entry("median", "simple median", label=lambda v: "Median", describe=lambda v: "median",
               estimator="median", flags=("-n", "--median")))
register(Entry("minmax", "min/max clip n values, then mean", params=(MINMAX,),
               label=lambda v: f"MinMaxClip{v['minmax']}", describe=lambda v: f"min/max clip n={v['minmax']}",
               reject="minmax", estimator="mean",
               min_frames=lambda v: 2 * v["minmax"] + 1,  # the original requires 2n+1 files
               flags=("-mm", "--minmax"), flag_param="minmax"))
register(Entry("sigma", "drop values with z-score above threshold, then mean", params=(SIGMA,),
               label=lambda v: f"SigmaClip{format_z(v['sigma'])}",
               describe=lambda v: f"sigma clip z={format_z(v['sigma'])}",
               reject="sigma", estimator="mean", flags=("-s", "--sigma"), flag_param="sigma"))
