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
RESERVED = ("method", "normalize", "rejection_warn")
_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,39}$")


# --------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class Param:
    """One parameter of a method: a whole or real number with bounds.

    `card` and `comment` name the FITS card the master header gets for it (none if
    `card` is None); `metavar` is shown by the command-line help; `option` is a long
    option of `flatd combine` that sets it for whichever method is chosen (--low).

    Methods may share a parameter name with their own defaults and bounds (low, high):
    the rules file then has one key for it, null by default (each method's own).
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
    option: Optional[str] = None

    def validate(self, value: Any) -> Any:
        """The value as self.kind, or ValueError saying what is wrong (pydantic's wording).
        None is accepted only by a parameter whose default is None (a shared key of the
        rules file: "each method's own")."""
        if value is None and self.default is None:
            return None
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
    if entry.name in _REGISTRY or entry.name == "auto":  # auto: chosen at planning (flatd.stack.auto)
        raise ValueError(f"combine method {entry.name!r} is registered already")
    shared = parameters()
    for p in entry.params:
        if p.name in RESERVED or not _NAME.match(p.name):
            raise ValueError(f"method {entry.name}: {p.name!r} cannot be a parameter name")
        if p.kind not in (int, float):
            raise ValueError(f"method {entry.name}: parameter {p.name!r} must be an int or a float")
        if p.default is None:
            raise ValueError(f"method {entry.name}: parameter {p.name!r} needs a default")
        other = shared.get(p.name)
        if other is not None and (other.kind is not p.kind or other.option != p.option):
            raise ValueError(f"method {entry.name}: parameter {p.name!r} differs in kind or option from the one "
                             "of the same name another method has (the rules file has one key for both)")
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
    """Every parameter of every method, by name: the rules file's keys. Methods that share
    a name share its key; where their Params differ (low, high), the key is a Param with
    default None ("each method's own") and the loosest of their bounds."""
    specs: dict[str, list[Param]] = {}
    for entry in _REGISTRY.values():
        for p in entry.params:
            specs.setdefault(p.name, [])
            if p not in specs[p.name]:
                specs[p.name].append(p)
    return {name: ps[0] if len(ps) == 1 else _merged(ps) for name, ps in specs.items()}


def _merged(ps: list[Param]) -> Param:
    def loosest(values, pick):
        return None if any(v is None for v in values) else pick(values)

    own = "; ".join(f"{m.name}: {m.param(ps[0].name).default}" for m in _REGISTRY.values()
                    if m.param(ps[0].name) is not None)
    return Param(ps[0].name, ps[0].kind, None,
                 f"{ps[0].description.split(':')[0]}; null: each method's own default ({own})",
                 gt=loosest([p.gt for p in ps], min), ge=loosest([p.ge for p in ps], min),
                 le=loosest([p.le for p in ps], max), metavar=ps[0].metavar, option=ps[0].option)


def check_setting(name: str, value: Any, method: Any = None) -> Any:
    """A value of the rules file's combine key `name`, validated against the parameter of
    `method` (a method name) when that method has one, else against the key's Param;
    ValueError as Param.validate. None (null) stands for the method's own default where
    the key is shared by methods of different defaults."""
    key = parameters()[name]
    if value is None and key.default is None:
        return None
    own = _REGISTRY[method].param(name) if isinstance(method, str) and method in _REGISTRY else None
    return (own or key).validate(value)


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
    values = {k: v for k, v in values.items() if not (v is None and k in known and known[k].default is None)}
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


# --------------------------------------------------------------------------- robust rejections (issue 9)
# Each rejects per pixel column of the normalized stack with a low and a high threshold,
# then takes the mean of what is kept. `low`/`high` are one key of the rules file and one
# option of `flatd combine` (--low, --high) for all of them, with each method's own
# defaults and bounds. The formulas are in flatd.stack.combine and the README.


def _clip(name: str, side: str, default: float, what: str, le: float = 100.0, card: Optional[str] = None) -> Param:
    return Param(name, float, default, f"{side} threshold: {what}", gt=0, le=le,
                 card=card or ("CLIPLOW" if name == "low" else "CLIPHIGH"),
                 comment=f"{side} rejection threshold", metavar="X", option="--" + name)


def _kappa(default_low: float, default_high: float, what: str) -> tuple[Param, Param]:
    return (_clip("low", "low", default_low, f"{what}, below the centre"),
            _clip("high", "high", default_high, f"{what}, above the centre"))


def _pair(v: Mapping[str, Any], a: str = "low", b: str = "high") -> str:
    return f"{format_z(v[a])}-{format_z(v[b])}"


def _robust(name: str, summary: str, label: str, params: tuple[Param, ...], describe: str,
            pair: tuple[str, str] = ("low", "high")) -> Entry:
    return register(Entry(
        name, summary, params=params, label=lambda v: f"{label}{_pair(v, *pair)}",
        describe=lambda v: f"{describe} " + ", ".join(f"{p.name}={v[p.name]:g}" for p in params),
        reject=name, estimator="mean", min_frames=lambda v: 3))


_robust("sigma-iterative",
        "kappa-sigma clip about the median, repeated until nothing more is rejected, then mean "
        "(Siril's sigma clipping; defaults low 3, high 3 as Siril's)",
        "SigmaIterative", _kappa(3.0, 3.0, "kappa in standard deviations"), "iterative sigma clip")
_robust("winsorized",
        "winsorized sigma clipping: Huber's winsorized sigma, reject about the median, repeat; then mean "
        "(Siril, PixInsight; defaults low 3, high 3 as Siril's)",
        "WinsorizedSigma", _kappa(3.0, 3.0, "kappa in winsorized standard deviations"), "winsorized sigma clip")
_robust("linear-fit",
        "linear fit clipping: a line through the sorted column, reject by mean absolute deviation from it, "
        "repeat; then mean (Siril, PixInsight; defaults low 5, high 5 as Siril's)",
        "LinearFit", _kappa(5.0, 5.0, "kappa in mean absolute deviations from the line"), "linear fit clip")
_robust("esd",
        "generalized extreme Studentized deviate test (Rosner 1983), then mean "
        "(Siril's GESDT, PixInsight's ESD; defaults outliers 0.3, significance 0.05)",
        "ESD",
        (Param("esd_outliers", float, 0.3, "esd: the largest fraction of a column that may be outliers",
               gt=0, le=1, card="ESDOUTL", comment="ESD max outlier fraction", metavar="F"),
         Param("esd_significance", float, 0.05, "esd: significance (alpha) of the test",
               gt=0, le=1, card="ESDALPHA", comment="ESD significance", metavar="ALPHA"),
         Param("esd_low", float, 1.0, "esd: low relaxation: deviations below the mean are divided by it "
               "(PixInsight's; 1: none, as Siril)", ge=1, le=100, card="ESDRELAX",
               comment="ESD low relaxation", metavar="R")),
        "ESD test", pair=("esd_outliers", "esd_significance"))
_robust("mad",
        "k x MAD clipping about the median (sigma = 1.4826 MAD), repeated until nothing more is "
        "rejected, then mean (Siril's MAD clipping; defaults low 3, high 3 as Siril's)",
        "MADClip", _kappa(3.0, 3.0, "kappa in 1.4826 x MAD"), "MAD clip")
_robust("percentile",
        "percentile clipping: reject below median x (1 - low) and above median x (1 + high), one pass, "
        "then mean (Siril's; defaults low 0.2, high 0.1)",
        "Percentile",
        (_clip("low", "low", 0.2, "fraction of the median, below it", le=1.0),
         _clip("high", "high", 0.1, "fraction of the median, above it", le=100.0)),
        "percentile clip")
