"""The registry of combine methods (flatd.stack.methods): entries, parameters, labels, cards."""

from __future__ import annotations

import math
import pickle
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from flatd.stack import methods
from flatd.config import CombineSettings, ConfigError, parse_rules
from flatd.stack.methods import Entry, Method, Param


@pytest.fixture
def toy():
    """A method registered for one test: parameter `width` (float, 0 < w <= 10, card TOYW)."""
    entry = methods.register(Entry(
        "toy-clip", "a toy", params=(Param("width", float, 1.5, "toy width", gt=0, le=10, card="TOYW",
                                           comment="toy width"),),
        label=lambda v: f"Toy{v['width']:g}", describe=lambda v: f"toy clip w={v['width']:g}",
        reject="toy", estimator="median", min_frames=lambda v: 3, flags=("--toy-clip",), flag_param="width"))
    yield entry
    methods.unregister("toy-clip")


# --------------------------------------------------------------------------- built-in entries


def test_builtin_methods_in_order():
    assert methods.names() == ("mean", "median", "minmax", "sigma", "sigma-iterative", "winsorized", "linear-fit",
                               "esd", "mad", "percentile")
    assert methods.choices_text() == ("'mean', 'median', 'minmax', 'sigma', 'sigma-iterative', 'winsorized', "
                                      "'linear-fit', 'esd', 'mad' or 'percentile'")


def test_labels_descriptions_min_frames():
    cases = [(Method("mean"), "Mean", "mean", 1), (Method("median"), "Median", "median", 1),
             (Method("minmax", minmax=2), "MinMaxClip2", "min/max clip n=2", 5),
             (Method("minmax", minmax=3), "MinMaxClip3", "min/max clip n=3", 7),
             (Method("sigma"), "SigmaClip2.0", "sigma clip z=2.0", 1),
             (Method("sigma", sigma=2.5), "SigmaClip2.5", "sigma clip z=2.5", 1),
             (Method("sigma", sigma=3), "SigmaClip3.0", "sigma clip z=3.0", 1)]
    for method, label, description, min_frames in cases:
        assert (method.label, method.description, method.min_frames) == (label, description, min_frames)


def test_cards():
    assert Method("sigma", sigma=2.5).cards == (("COMBMETH", "SigmaClip2.5", "combine method"),
                                                ("CLIPSIG", 2.5, "sigma clip threshold (z-score)"))
    assert Method("minmax", minmax=3).cards == (("COMBMETH", "MinMaxClip3", "combine method"),
                                                ("CLIPN", 3, "min/max clip passes"))
    assert Method("median").cards == (("COMBMETH", "Median", "combine method"),)
    assert type(Method("minmax", minmax=3.0).cards[1][1]) is int
    # the card holds the value itself, not the label's rounding of it
    assert Method("sigma", sigma=2.123456789).cards[1][1] == 2.123456789


def test_kernels_are_named():
    assert [(e.reject, e.estimator) for e in methods.entries()][:4] == [
        (None, "mean"), (None, "median"), ("minmax", "mean"), ("sigma", "mean")]


def test_every_entry_has_its_kernels():
    from flatd.stack import combine

    for entry in methods.entries():
        assert entry.estimator in combine.ESTIMATORS, entry.name
        assert entry.reject is None or entry.reject in combine.REJECTIONS, entry.name


def test_registry_imports_no_numerics():
    heavy = ("numpy", "flatd.stack._kernels", "astropy", "pydantic")
    code = f"import sys, flatd.stack.methods; print(','.join(m for m in {heavy!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""


# --------------------------------------------------------------------------- the Method value


def test_method_values_and_attributes():
    m = Method("minmax", minmax=3)
    assert (m.name, m.params, m.minmax) == ("minmax", {"minmax": 3}, 3)
    assert Method("sigma").params == {"sigma": 2.0}
    with pytest.raises(AttributeError):
        m.sigma  # not a parameter of minmax
    with pytest.raises(AttributeError):
        m.name = "mean"


def test_method_equality_hash_pickle_repr():
    a, b = Method("sigma", sigma=2), Method("sigma", sigma=2.0, minmax=2)  # minmax: another method's, checked, ignored
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert a != Method("sigma", sigma=2.5) and a != Method("mean") and a != "sigma"
    assert pickle.loads(pickle.dumps(a)) == a
    assert repr(Method("minmax", minmax=4)) == "Method('minmax', minmax=4)"


def test_from_settings():
    assert Method.from_settings(CombineSettings(method="sigma")) == Method("sigma", sigma=2.0)
    assert Method.from_settings(CombineSettings(method="minmax", minmax=4)) == Method("minmax", minmax=4)
    plain = SimpleNamespace(method="sigma", sigma=2.5, minmax=3)  # anything with the attributes
    assert Method.from_settings(plain).label == "SigmaClip2.5"
    assert Method.from_settings(SimpleNamespace(method="sigma")).sigma == 2.0  # missing: the default


def test_unknown_method_and_parameter():
    with pytest.raises(ValueError, match="unknown combine method 'average'; known: mean, median, minmax, sigma"):
        Method("average")
    with pytest.raises(ValueError, match="unknown combine method"):
        Method(["sigma"])
    with pytest.raises(ValueError) as caught:
        Method("x" * 10000)
    assert len(str(caught.value)) < 200
    with pytest.raises(ValueError, match="combine method sigma has no parameter 'z' .its parameters: sigma."):
        Method("sigma", z=2)
    with pytest.raises(ValueError, match="its parameters: none"):
        Method("mean", width=2)
    with pytest.raises(ValueError, match=r"mean minmax=0: Input should be greater than or equal to 1"):
        Method("mean", minmax=0)  # another method's parameter is still checked


# --------------------------------------------------------------------------- hostile parameter values

BAD_SIGMA = [
    (float("nan"), "finite"), (float("inf"), "finite"), (-float("inf"), "finite"), (0, "greater than 0"),
    (-1.5, "greater than 0"), (1e300, "less than or equal to 1000"), (10**400, "finite"), ("abc", "unable to parse"),
    ("", "unable to parse"), ("nan", "finite"), ("1e999", "finite"), (True, "not a boolean"), (False, "not a boolean"),
    (np.bool_(True), "valid number"), (None, "valid number"), ([2.0], "valid number"), ({"z": 2}, "valid number"),
    (1j, "valid number"), (b"2", "valid number"),
]
BAD_MINMAX = [
    (0, "greater than or equal to 1"), (-3, "greater than or equal to 1"), (1.5, "fractional part"),
    ("1.5", "fractional part"), ("two", "unable to parse string as an integer"),
    (10**400, "less than or equal to 1000"),
    ("9" * 5000, "finite"), (float("nan"), "finite"), (True, "not a boolean"), (1001, "less than or equal to 1000"),
]


@pytest.mark.parametrize("value, message", BAD_SIGMA, ids=lambda v: repr(v)[:20])
def test_hostile_sigma(value, message):
    with pytest.raises(ValueError, match=message) as caught:
        Method("sigma", sigma=value)
    assert len(str(caught.value)) < 200  # a huge value is not echoed in full


@pytest.mark.parametrize("value, message", BAD_MINMAX, ids=lambda v: repr(v)[:20])
def test_hostile_minmax(value, message):
    with pytest.raises(ValueError, match=message):
        Method("minmax", minmax=value)


def test_accepted_parameter_forms():
    assert Method("sigma", sigma="2.5").sigma == 2.5  # command-line text
    assert Method("sigma", sigma=" 3 ").sigma == 3.0 and type(Method("sigma", sigma=3).sigma) is float
    assert Method("sigma", sigma=np.float32(1.5)).sigma == 1.5
    assert Method("minmax", minmax="4").minmax == 4 and Method("minmax", minmax=4.0).minmax == 4
    assert Method("minmax", minmax=np.int64(2)).minmax == 2 and type(Method("minmax", minmax=np.int64(2)).minmax) is int
    assert Method("sigma", sigma=1000).sigma == 1000.0 and Method("minmax", minmax=1000).minmax == 1000


def test_param_messages_match_pydantic_wording():
    p = Param("k", int, 1, "k", ge=1, le=9)
    for value, message in [(0, "Input should be greater than or equal to 1"),
                           (10, "Input should be less than or equal to 9"),
                           ("x", "Input should be a valid integer, unable to parse string as an integer")]:
        with pytest.raises(ValueError) as caught:
            p.validate(value)
        assert str(caught.value) == message
    with pytest.raises(ValueError) as caught:
        Param("z", float, 1.0, "z", gt=0.5).validate(0.5)
    assert str(caught.value) == "Input should be greater than 0.5"


# --------------------------------------------------------------------------- registering


def test_register_and_unregister(toy):
    assert "toy-clip" in methods.names() and methods.get("toy-clip") is toy
    m = Method("toy-clip", width="2.5")
    assert (m.label, m.description, m.min_frames, m.width) == ("Toy2.5", "toy clip w=2.5", 3, 2.5)
    assert m.cards == (("COMBMETH", "Toy2.5", "combine method"), ("TOYW", 2.5, "toy width"))
    assert methods.parameters()["width"] is toy.params[0]
    assert Method("sigma", width=3).params == {"sigma": 2.0}  # a registered parameter of another method


def test_unregistered_is_unknown(toy):
    methods.unregister("toy-clip")
    try:
        with pytest.raises(ValueError, match="unknown combine method 'toy-clip'"):
            Method("toy-clip")
    finally:
        methods.register(toy)


def _entry(name="toy-x", **kw):
    base = dict(summary="x", label=lambda v: "X", describe=lambda v: "x")
    return Entry(name, **{**base, **kw})


@pytest.mark.parametrize("entry, message", [
    (_entry("sigma"), "registered already"),
    (_entry("Bad Name"), "lower-case letters"),
    (_entry("x" * 41), "40 at most"),
    (_entry(params=(Param("sigma", int, 3, "another sigma", gt=0),)), "differs in kind or option"),
    (_entry(params=(Param("low", float, 3.0, "another low", gt=0),)), "differs in kind or option"),  # no --low
    (_entry(params=(Param("method", int, 1, "m"),)), "cannot be a parameter name"),
    (_entry(params=(Param("normalize", int, 1, "m"),)), "cannot be a parameter name"),
    (_entry(params=(Param("k", int, 0, "k", ge=1),)), "greater than or equal to 1"),  # a bad default
    (_entry(params=(Param("k", str, "a", "k"),)), "must be an int or a float"),
    (_entry(flags=("-s",)), "taken"),
    (_entry(flag_param="k"), "not one of its parameters"),
])
def test_register_refuses_clashes(entry, message):
    with pytest.raises(ValueError, match=message):
        methods.register(entry)
    assert entry.name not in methods.names() or entry.name == "sigma"


def test_a_method_may_share_a_parameter():
    entry = methods.register(_entry("sigma-twice", params=(methods.SIGMA,)))
    try:
        assert Method("sigma-twice", sigma=3).params == {"sigma": 3.0}
    finally:
        methods.unregister(entry.name)


# --------------------------------------------------------------------------- the rules file reads the registry


def _problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_rules(text)
    return [f"{p.key}: {p.message}" for p in caught.value.problems]


def test_rules_parameters_from_the_registry(toy):
    rules = parse_rules("combine:\n  method: toy-clip\n  width: 2.5\n")
    assert (rules.combine.method, rules.combine.width, rules.combine.sigma) == ("toy-clip", 2.5, 2.0)
    assert Method.from_settings(rules.combine) == Method("toy-clip", width=2.5)
    assert CombineSettings().width == 1.5  # every registered parameter has its default
    assert _problems("combine:\n  width: 11\n") == ["combine.width: Input should be less than or equal to 10"]
    assert "'toy-clip'" in _problems("combine:\n  method: nope\n")[0]


def test_rules_refuse_parameters_no_method_has(toy):
    assert _problems("combine:\n  widht: 2\n") == [
        "combine.widht: unknown key: no combine method has a parameter 'widht' (parameters: esd_low, esd_outliers, "
        "esd_significance, high, low, minmax, sigma, width)"]
    methods.unregister("toy-clip")
    try:
        assert _problems("combine:\n  width: 2\n")[0].startswith("combine.width: unknown key")
        assert _problems("combine:\n  method: toy-clip\n") == [
            "combine.method: Input should be 'auto', 'mean', 'median', 'minmax', 'sigma', 'sigma-iterative', "
            "'winsorized', 'linear-fit', 'esd', 'mad' or 'percentile'"]
    finally:
        methods.register(toy)


@pytest.mark.parametrize("value", ["nan", ".nan", ".inf", "-1", "true", "[1]", "{a: 1}", "null", "1e400"])
def test_rules_hostile_sigma(value):
    (problem,) = _problems(f"combine:\n  sigma: {value}\n")
    assert problem.startswith("combine.sigma: Input should be")


def test_rules_schema_lists_the_parameters(toy):
    schema = CombineSettings.model_json_schema()["properties"]
    assert schema["sigma"]["default"] == 2.0 and schema["sigma"]["exclusiveMinimum"] == 0
    assert schema["minmax"]["type"] == "integer" and schema["width"]["description"] == "toy width"
    fields = CombineSettings.parameter_fields()
    assert fields["minmax"].default == 2 and fields["width"].description == "toy width"


def test_format_z():
    assert [methods.format_z(z) for z in (2, 2.5, 0.1, 1e-7, math.inf)] == ["2.0", "2.5", "0.1", "1e-07", "inf"]


# --------------------------------------------------------------------------- shared parameters: low, high


def test_robust_methods_labels_and_cards():
    cases = [(Method("sigma-iterative"), "SigmaIterative3.0-3.0"), (Method("winsorized", low=4, high=2.5),
             "WinsorizedSigma4.0-2.5"), (Method("linear-fit"), "LinearFit5.0-5.0"), (Method("esd"), "ESD0.3-0.05"),
             (Method("mad"), "MADClip3.0-3.0"), (Method("percentile"), "Percentile0.2-0.1")]
    for method, label in cases:
        assert method.label == label and method.min_frames == 3
        assert all(len(k) <= 8 and k.isupper() for k, _, _ in method.cards)
    assert Method("winsorized", low=4, high=2.5).cards[1:] == (
        ("CLIPLOW", 4.0, "low rejection threshold"),
        ("CLIPHIGH", 2.5, "high rejection threshold"))
    assert [k for k, _, _ in Method("esd").cards] == ["COMBMETH", "ESDOUTL", "ESDALPHA", "ESDRELAX"]


def test_low_high_are_each_methods_own():
    assert (Method("winsorized").low, Method("linear-fit").low, Method("percentile").low) == (3.0, 5.0, 0.2)
    assert Method("percentile", low=None, high=None).params == {"low": 0.2, "high": 0.1}  # None: the own default
    with pytest.raises(ValueError, match="percentile low=2: Input should be less than or equal to 1"):
        Method("percentile", low=2)
    assert Method("winsorized", low=20).low == 20.0
    assert Method("sigma", low=4).params == {"sigma": 2.0}  # another method's key: checked, ignored
    with pytest.raises(ValueError, match="valid number"):
        Method("sigma", sigma=None)  # None stands for a default only where the key is shared
    key = methods.parameters()["low"]
    assert key.default is None and key.option == "--low" and key.le == 100


def test_rules_low_high_apply_to_the_chosen_method():
    rules = parse_rules("combine:\n  method: percentile\n")
    assert (rules.combine.low, rules.combine.high) == (None, None)
    assert Method.from_settings(rules.combine) == Method("percentile", low=0.2, high=0.1)
    rules = parse_rules("combine:\n  method: winsorized\n  low: 4\n  high: 2.5\n")
    assert Method.from_settings(rules.combine).label == "WinsorizedSigma4.0-2.5"
    assert Method.from_settings(parse_rules("combine:\n  method: linear-fit\n  high: 3\n").combine).label == \
        "LinearFit5.0-3.0"
    assert _problems("combine:\n  method: percentile\n  low: 2\n") == [
        "combine.low: Input should be less than or equal to 1"]
    assert _problems("combine:\n  method: winsorized\n  low: -1\n") == ["combine.low: Input should be greater than 0"]
    assert parse_rules("combine:\n  method: sigma\n  low: 50\n").combine.low == 50  # not sigma's: loosest bounds
    schema = CombineSettings.model_json_schema()["properties"]
    assert schema["low"]["default"] is None and schema["low"]["type"] == ["number", "null"]
    assert schema["esd_outliers"]["default"] == 0.3


def test_combine_options_low_high():
    from flatd import cli
    from flatd.cli import UsageError

    parser = cli.build_parser()

    def choice(*argv, configured="sigma"):
        return cli._method_choice(parser.parse_args(["combine", *argv, "x.fits"]), configured)

    assert choice("--method", "winsorized", "--low", "4", "--high", "2.5") == {
        "method": "winsorized", "low": 4.0, "high": 2.5}
    assert choice("--method", "percentile", "--high", "0.05") == {"method": "percentile", "high": 0.05}
    with pytest.raises(UsageError, match="--low 2: Input should be less than or equal to 1"):
        choice("--method", "percentile", "--low", "2")
    with pytest.raises(UsageError, match="the method sigma has no parameter low"):
        choice("-s", "2.5", "--low", "3")
    with pytest.raises(UsageError, match="given twice"):
        choice("--method", "mad", "--low", "3", "--param", "low=2")
