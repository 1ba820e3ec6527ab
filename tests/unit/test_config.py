"""flatd.config: the rules file's schema, units, errors with key paths and lines, rules[]."""

from __future__ import annotations

import textwrap
import time
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from flatd.config import (
    MAX_RULES_BYTES,
    MAX_RULES_DEPTH,
    MAX_RULES_NODES,
    NAME_FIELDS,
    ConfigError,
    ConfigProblem,
    Rules,
    effective_for,
    find_config,
    load_rules,
    parse_duration,
    parse_rules,
    parse_size,
    rule_matches,
)
from flatd.ingest.frames import Frame, Kind
from flatd.stack import methods as _methods

# auto, then every registered method: 'auto', 'mean', 'median', 'minmax', 'sigma', ...
METHOD_CHOICES = "'auto', " + _methods.choices_text()
assert METHOD_CHOICES.startswith("'auto', 'mean', 'median', 'minmax', 'sigma'")

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "flatd.example.yaml"

# The rules file of DESIGN.md, verbatim.
DESIGN_RULES = """\
capture:                      # folders that receive flats
  - path: /data/captures
    recursive: true           # the default
    poll: auto                # auto | true | false: polling for network shares
output:
  directory: masters          # relative to the capture folder, or absolute
  name: "FLAT-{filter}-{binning}-{method}-{date}-{temperature}C.fits"
inputs:
  ignore_type: false          # treat every FITS as a flat
  move_to: "originals-{date}" # relative to each input's folder, or absolute; null leaves inputs in place
grouping:
  size: true
  filter: true
  temperature: 1.0            # mean-shift bandwidth in °C; null: no temperature grouping
  min_group_size: 5
precalibration:
  mode: auto                  # none | pedestal | file | auto
  pedestal: 100
  file: null
  library: /data/calibration
  recursive: true
  bias_dark_only: true
  policy: original            # original (|dT| + 3|dExp|) | exposure-match (WBPP-like)
combine:
  method: sigma               # mean | median | minmax | sigma
  sigma: 2.0
  minmax: 2
  normalize: multiplicative   # none | multiplicative
engine:
  memory_limit: 512MiB
settle: 10m                   # quiet time after the last new flat
stable: 5s                    # a file's size and mtime unchanged this long
rescan: 5m                    # full rescan, in case an event was missed
schedule: null                # optional cron line for a sweep, e.g. "0 9 * * *"
state: ~/.local/state/flatd   # ledger and lock
rules:                        # overrides for the flats a rule matches; first match wins
  - match: {path: "/data/captures/newt200/**", instrument: "ZWO ASI2600MM*"}
    combine: {method: median}
    precalibration: {library: /data/calibration/2600mm}
"""


def parse(text: str, path: str | Path = "/etc/flatd/flatd.yaml") -> Rules:
    return parse_rules(textwrap.dedent(text), Path(path))


def problems(text: str, path: str | Path = "/etc/flatd/flatd.yaml") -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(text, path)
    return info.value.render().splitlines()


def frame(path="/data/captures/newt200/2024-05-01/FLAT_Ha_001.fits", instrument="ZWO ASI2600MM Pro",
          filter="Ha", telescope="Newt 200", **headers) -> Frame:
    cards = {"INSTRUME": instrument, "FILTER": filter, "TELESCOP": telescope, **headers}
    return Frame(path=Path(path), kind=Kind.FLAT, width=6248, height=4176, filter=filter,
                 instrument=instrument, telescope=telescope, headers=cards)


# ------------------------------------------------------------------ every key parses


def test_design_example_parses_with_every_key():
    rules = parse(DESIGN_RULES)
    (capture,) = rules.capture
    assert (capture.path, capture.recursive, capture.poll) == (Path("/data/captures"), True, "auto")
    assert rules.output.directory == Path("masters")
    assert rules.output.name == "FLAT-{filter}-{binning}-{method}-{date}-{temperature}C.fits"
    assert (rules.inputs.ignore_type, rules.inputs.move_to) == (False, "originals-{date}")
    g = rules.grouping
    assert (g.size, g.filter, g.temperature, g.min_group_size) == (True, True, 1.0, 5)
    p = rules.precalibration
    assert (p.mode, p.pedestal, p.file, p.library) == ("auto", 100.0, None, Path("/data/calibration"))
    assert (p.recursive, p.bias_dark_only, p.policy) == (True, True, "original")
    c = rules.combine
    assert (c.method, c.sigma, c.minmax, c.normalize) == ("sigma", 2.0, 2, "multiplicative")
    assert rules.engine.memory_limit == 512 * 2**20
    assert (rules.settle, rules.stable, rules.rescan) == (600.0, 5.0, 300.0)
    assert rules.schedule is None
    assert rules.state == Path("~/.local/state/flatd").expanduser()
    (rule,) = rules.rules
    assert rule.match.path == "/data/captures/newt200/**"
    assert rule.match.instrument == "ZWO ASI2600MM*"
    assert rule.combine == {"method": "median"}
    assert rule.precalibration == {"library": "/data/calibration/2600mm"}


def test_empty_file_gives_the_defaults():
    for text in ("", "# nothing but a comment\n", "---\n"):
        rules = parse(text)
        assert rules.capture == [] and rules.rules == []
        assert rules.precalibration.mode == "none"
        assert rules.combine.method == "auto"  # issue 9: the rules file default
        assert rules.settle == 600.0
    assert load_rules(None) == Rules()


def test_schedule_cron_line():
    assert parse('schedule: "0 9 * * *"').schedule == "0 9 * * *"


# ------------------------------------------------------------------ units


@pytest.mark.parametrize(
    "value, seconds",
    [(90, 90.0), ("90", 90.0), ("90s", 90.0), ("10m", 600.0), ("1h", 3600.0), ("1.5h", 5400.0),
     ("2min", 120.0), ("1d", 86400.0), ("500ms", 0.5), (0, 0.0), (2.5, 2.5), (" 5 s ", 5.0), ("10M", 600.0)],
)
def test_durations(value, seconds):
    assert parse_duration(value) == pytest.approx(seconds)
    assert parse(f"settle: {value!r}" if isinstance(value, str) else f"settle: {value}").settle == pytest.approx(seconds)


@pytest.mark.parametrize("value", ["soon", "10 minutes", "-5s", "1h30m", "", True, -1, "5x"])
def test_bad_durations(value):
    with pytest.raises(ValueError):
        parse_duration(value)


@pytest.mark.parametrize(
    "value, size",
    [("512MiB", 512 * 2**20), ("2GB", 2 * 10**9), ("2GiB", 2 * 2**30), (1048576, 1048576), ("1048576", 1048576),
     ("64KiB", 65536), ("1.5GiB", int(1.5 * 2**30)), ("100kb", 100_000), ("300M", 300 * 10**6), ("4096B", 4096)],
)
def test_sizes(value, size):
    assert parse_size(value) == size
    text = f"engine: {{memory_limit: {value!r}}}" if isinstance(value, str) else f"engine: {{memory_limit: {value}}}"
    assert parse(text).engine.memory_limit == size


@pytest.mark.parametrize("value", ["lots", "0", 0, -5, "-1GB", "2 parsecs", True, "GB"])
def test_bad_sizes(value):
    with pytest.raises(ValueError):
        parse_size(value)


# ------------------------------------------------------------------ errors: key path and line


@pytest.mark.parametrize(
    "text, expected",
    [
        ("grouping:\n  size: true\n  temperature: 0\n",
         "/etc/flatd/flatd.yaml:3: at 'grouping.temperature': Input should be greater than or equal to 0.1"),
        ("grouping:\n  temperature: 60\n",
         "/etc/flatd/flatd.yaml:2: at 'grouping.temperature': Input should be less than or equal to 50"),
        ("\n\ngrouping:\n  temperature: warm\n",
         "/etc/flatd/flatd.yaml:4: at 'grouping.temperature': Input should be a valid number, "
         "unable to parse string as a number"),
        ("grouping:\n  min_group_size: 0\n",
         "/etc/flatd/flatd.yaml:2: at 'grouping.min_group_size': Input should be greater than or equal to 1"),
        ("combine:\n  method: average\n",
         f"/etc/flatd/flatd.yaml:2: at 'combine.method': Input should be {METHOD_CHOICES}"),
        ("combine:\n  sigma: -1\n", "/etc/flatd/flatd.yaml:2: at 'combine.sigma': Input should be greater than 0"),
        ("settle: soon\n",
         "/etc/flatd/flatd.yaml:1: at 'settle': 'soon' is not a duration such as 90, 90s, 10m or 1h"),
        ("engine:\n  memory_limit: lots\n",
         "/etc/flatd/flatd.yaml:2: at 'engine.memory_limit': 'lots' is not a size such as 512MiB, 2GB or a number "
         "of bytes"),
        ("capture:\n  - path: /a\n  - path: /b\n    poll: sometimes\n",
         "/etc/flatd/flatd.yaml:4: at 'capture[1].poll': 'sometimes': poll is auto, true or false"),
        ("capture:\n  - recursive: false\n", "/etc/flatd/flatd.yaml:2: at 'capture[0].path': Field required"),
        ("precalibration:\n  mode: file\n",
         "/etc/flatd/flatd.yaml:1: at 'precalibration': mode 'file' needs precalibration.file"),
        ("precalibration:\n  mode: auto\n",
         "/etc/flatd/flatd.yaml:1: at 'precalibration': mode 'auto' needs precalibration.library"),
        ("precalibration:\n  mode: flat\n  library: /x\n",
         "/etc/flatd/flatd.yaml:2: at 'precalibration.mode': Input should be 'none', 'pedestal', 'file' or 'auto'"),
        ("schedule: '0 9 * *'\n",
         "/etc/flatd/flatd.yaml:1: at 'schedule': '0 9 * *' is not a cron line of 5 fields "
         "(minute hour day month weekday)"),
        ("output:\n  name: 'FLAT-{filtre}.fits'\n",
         "/etc/flatd/flatd.yaml:2: at 'output.name': unknown field {filtre}; known: " + ", ".join(sorted(NAME_FIELDS))
         + ", or a header keyword in capitals ({FOCALLEN})"),
        ("inputs:\n  ignore_type: perhaps\n",
         "/etc/flatd/flatd.yaml:2: at 'inputs.ignore_type': Input should be a valid boolean, unable to interpret input"),
        ("keywords:\n  filter: FWHEEL\n", "/etc/flatd/flatd.yaml:2: at 'keywords.filter': Input should be a valid list"),
    ],
)
def test_invalid_value_names_key_and_line(text, expected):
    assert problems(text) == [expected]


def test_schedule_out_of_range():
    (line,) = problems("schedule: '0 25 * * *'\n")
    assert line.startswith("/etc/flatd/flatd.yaml:1: at 'schedule': '0 25 * * *': ")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("grouping:\n  temprature: 1.0\n", "/etc/flatd/flatd.yaml:2: at 'grouping.temprature': unknown key"),
        ("combin:\n  method: mean\n", "/etc/flatd/flatd.yaml:1: at 'combin': unknown key"),
        ("capture:\n  - path: /a\n    recurse: true\n", "/etc/flatd/flatd.yaml:3: at 'capture[0].recurse': unknown key"),
        ("rules:\n  - match: {filtre: Ha}\n", "/etc/flatd/flatd.yaml:2: at 'rules[0].match.filtre': unknown key"),
        ("rules:\n  - match: {}\n    engine: {memory_limit: 1GB}\n",
         "/etc/flatd/flatd.yaml:3: at 'rules[0].engine': unknown key"),
    ],
)
def test_unknown_keys(text, expected):
    assert problems(text) == [expected]


def test_several_errors_are_all_reported_in_line_order():
    text = """\
        capture:
          - path: /data/captures
            poll: never
        grouping:
          temperature: 0
          colour: true
        combine:
          method: mean
          sigma: zero
        settle: later
        rules:
          - match: {filter: Ha}
            combine: {method: best}
    """
    assert problems(text) == [
        "/etc/flatd/flatd.yaml:3: at 'capture[0].poll': 'never': poll is auto, true or false",
        "/etc/flatd/flatd.yaml:5: at 'grouping.temperature': Input should be greater than or equal to 0.1",
        "/etc/flatd/flatd.yaml:6: at 'grouping.colour': unknown key",
        "/etc/flatd/flatd.yaml:9: at 'combine.sigma': Input should be a valid number, unable to parse string as a number",
        "/etc/flatd/flatd.yaml:10: at 'settle': 'later' is not a duration such as 90, 90s, 10m or 1h",
        f"/etc/flatd/flatd.yaml:13: at 'rules[0].combine.method': Input should be {METHOD_CHOICES}",
    ]


def test_error_holds_each_problem():
    with pytest.raises(ConfigError) as info:
        parse("settle: x\nstable: y\n")
    assert info.value.path == Path("/etc/flatd/flatd.yaml")
    assert info.value.problems == [
        ConfigProblem("settle", "'x' is not a duration such as 90, 90s, 10m or 1h", 1),
        ConfigProblem("stable", "'y' is not a duration such as 90, 90s, 10m or 1h", 2),
    ]
    assert str(info.value) == info.value.render()


def test_duplicate_keys_are_errors():
    assert problems("combine:\n  method: mean\ncombine:\n  method: median\n") == [
        "/etc/flatd/flatd.yaml:3: at 'combine': key given twice (only the last would count)",
    ]
    assert problems("grouping:\n  size: true\n  size: false\n") == [
        "/etc/flatd/flatd.yaml:3: at 'grouping.size': key given twice (only the last would count)",
    ]


def test_yaml_syntax_error_has_a_line():
    (line,) = problems("grouping:\n  size: true\n   filter: [unclosed\n")
    assert line.startswith("/etc/flatd/flatd.yaml:3: at '(syntax)': ")


def test_top_level_must_be_a_mapping():
    assert problems("- capture\n- output\n") == [
        "/etc/flatd/flatd.yaml:1: at '(top level)': the rules file must be a mapping of keys",
    ]


def test_render_without_a_file_name():
    with pytest.raises(ConfigError) as info:
        parse_rules("settle: x\n")
    assert info.value.render() == "<rules>:1: at 'settle': 'x' is not a duration such as 90, 90s, 10m or 1h"


def test_unreadable_rules_file(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_rules(tmp_path / "missing.yaml")
    assert info.value.render() == f"{tmp_path / 'missing.yaml'}: at '(file)': cannot read: No such file or directory"


# ------------------------------------------------------------------ bounds on the rules file


def alias_bomb(levels: int = 9) -> str:
    """A billion-laughs document: 9 levels of 9 aliases each stand for 9**9 strings."""
    names = "abcdefghijklmnopqrstuvwxyz"[:levels]
    lines = ['a: &a ["x","x","x","x","x","x","x","x","x"]']
    lines += [f"{name}: &{name} [{','.join([f'*{prev}'] * 9)}]" for prev, name in zip(names, names[1:])]
    return "\n".join(lines) + "\n"


def test_aliases_are_refused_at_their_line():
    assert problems("a: &base {sigma: 3}\ncombine: *base\n") == [
        "/etc/flatd/flatd.yaml:2: at '(syntax)': YAML aliases (*base) are not allowed in a rules file; "
        "write the value out in full",
    ]


def test_merge_keys_are_aliases_too():
    assert "YAML aliases (*base)" in problems("x: &base {sigma: 3}\ncombine:\n  <<: *base\n")[0]


def test_an_alias_bomb_is_refused_quickly(tmp_path):
    """A SIGHUP reload calls load_rules: it must answer, not build 9**9 strings."""
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(alias_bomb())
    started = time.perf_counter()
    with pytest.raises(ConfigError) as info:
        load_rules(bomb)
    assert time.perf_counter() - started < 5  # was: minutes and gigabytes
    assert info.value.render() == (f"{bomb}:2: at '(syntax)': YAML aliases (*a) are not allowed in a rules file; "
                                   "write the value out in full")


def test_too_many_nodes_are_refused():
    text = "keywords:\n  filter: [" + ",".join(["x"] * MAX_RULES_NODES) + "]\n"
    assert problems(text) == [
        f"/etc/flatd/flatd.yaml:2: at '(syntax)': more than {MAX_RULES_NODES} YAML nodes (keys, values, list items); "
        "a rules file is refused beyond that",
    ]


def test_many_nodes_under_the_limit_are_fine():
    names = [f"FILT{i}" for i in range(MAX_RULES_NODES - 10)]
    rules = parse("keywords:\n  filter: [" + ",".join(names) + "]\n")
    assert len(rules.keywords.filter) == len(names)


def test_deep_nesting_is_refused_without_recursing():
    text = "settle: " + "[" * 10_000 + "]" * 10_000 + "\n"
    assert problems(text) == [
        f"/etc/flatd/flatd.yaml:1: at '(syntax)': nested more than {MAX_RULES_DEPTH} levels deep; "
        "a rules file is refused beyond that",
    ]


def test_values_python_cannot_build_are_errors_with_a_line():
    assert problems("settle: 10m\nstable: 2024-13-01\n") == [
        "/etc/flatd/flatd.yaml:2: at '(syntax)': cannot read this value: month must be in 1..12",
    ]
    assert "cannot read this value: Exceeds the limit" in problems("stable: " + "1" * 5000 + "\n")[0]


def test_control_characters_are_one_line_with_the_line():
    assert problems("settle: 10m\nname: a\x00b\n") == [
        "/etc/flatd/flatd.yaml:2: at '(syntax)': character #x0000: special characters are not allowed",
    ]


def test_a_rules_file_over_the_size_limit_is_not_read(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text("# comment\n" * (MAX_RULES_BYTES // 10 + 1))
    size = big.stat().st_size
    with pytest.raises(ConfigError) as info:
        load_rules(big)
    assert info.value.render() == (f"{big}: at '(file)': too large: {size} bytes, "
                                   f"over the limit of {MAX_RULES_BYTES} bytes (1 MiB)")


def test_a_rules_file_whose_size_says_nothing_is_read_only_to_the_limit(tmp_path):
    zero = Path("/dev/zero")
    if not zero.exists():
        pytest.skip("no /dev/zero")
    with pytest.raises(ConfigError) as info:
        load_rules(zero)
    assert info.value.render() == f"{zero}: at '(file)': too large: more than the limit of {MAX_RULES_BYTES} bytes (1 MiB)"


def test_a_rules_file_at_the_size_limit_is_read(tmp_path):
    exact = tmp_path / "exact.yaml"
    head = "settle: 10m\n"
    exact.write_text(head + "#" * (MAX_RULES_BYTES - len(head) - 1) + "\n")
    assert exact.stat().st_size == MAX_RULES_BYTES
    assert load_rules(exact).settle == 600.0


def test_a_rules_file_that_is_not_utf8_names_the_byte(tmp_path):
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("settle: 10m\nname: café\n".encode("latin-1"))
    with pytest.raises(ConfigError) as info:
        load_rules(latin1)
    assert info.value.render() == f"{latin1}: at '(file)': not UTF-8 text (byte 0xe9 at offset 21)"


def test_an_empty_rules_file_means_the_defaults(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_bytes(b"")
    assert load_rules(empty).model_dump() == Rules().model_dump()


# ------------------------------------------------------------------ rules[] overrides


def test_rule_overrides_are_checked_against_the_base():
    text = """\
        precalibration:
          mode: none
        rules:
          - match: {filter: Ha}
            precalibration: {mode: auto}
          - match: {filter: OIII}
            combine:
              method: minmax
              minmax: 0
          - match: {filter: SII}
            grouping: {temperature: 0.01, bogus: 1}
    """
    assert problems(text) == [
        "/etc/flatd/flatd.yaml:5: at 'rules[0].precalibration': mode 'auto' needs precalibration.library",
        "/etc/flatd/flatd.yaml:9: at 'rules[1].combine.minmax': Input should be greater than or equal to 1",
        "/etc/flatd/flatd.yaml:11: at 'rules[2].grouping.temperature': Input should be greater than or equal to 0.1",
        "/etc/flatd/flatd.yaml:11: at 'rules[2].grouping.bogus': unknown key",
    ]


def test_rule_override_completed_by_the_base_is_valid():
    rules = parse("""\
        precalibration: {mode: auto, library: /data/calibration}
        rules:
          - match: {filter: Ha}
            precalibration: {policy: exposure-match}
          - match: {filter: L}
            precalibration: {mode: file, file: /data/calibration/bias.fits}
    """)
    assert len(rules.rules) == 2


def test_rule_needs_a_match():
    assert problems("rules:\n  - combine: {method: mean}\n") == [
        "/etc/flatd/flatd.yaml:2: at 'rules[0].match': Field required",
    ]


# ------------------------------------------------------------------ rule matching

MATCHING = """\
    combine: {method: sigma, sigma: 2.5}
    rules:
      - name: newt200-2600
        match: {path: "/data/captures/newt200/**", instrument: "ZWO ASI2600MM*"}
        combine: {method: median}
        precalibration: {mode: pedestal, pedestal: 50}
      - name: any-2600
        match: {instrument: "zwo asi2600mm*"}
        combine: {method: mean}
      - name: ha
        match: {filter: "H[ae]*"}
        grouping: {temperature: null}
      - name: gain
        match: {header: {GAIN: 100, OBSERVER: "Ann*"}}
        output: {directory: /srv/masters}
      - name: scope
        match: {telescope: "Refractor*"}
        inputs: {move_to: null}
"""


@pytest.fixture
def matching() -> Rules:
    return parse(MATCHING)


def test_path_and_instrument_globs(matching):
    rule = matching.rules[0]
    assert rule_matches(rule, frame())
    assert rule_matches(rule, frame(path="/data/captures/newt200/flat.fits"))  # directly in the folder
    assert not rule_matches(rule, frame(path="/data/captures/refractor/flat.fits"))
    assert not rule_matches(rule, frame(instrument="ZWO ASI294MC Pro"))
    assert not rule_matches(rule, frame(instrument=None))


def test_first_match_wins(matching):
    first = effective_for(matching, frame())
    assert first.rule == "newt200-2600"
    assert first.combine.method == "median"
    assert first.combine.sigma == 2.5  # not overridden: the base value
    assert (first.precalibration.mode, first.precalibration.pedestal) == ("pedestal", 50.0)
    assert first.grouping == matching.grouping

    elsewhere = effective_for(matching, frame(path="/data/captures/refractor/a.fits"))
    assert elsewhere.rule == "any-2600"  # instrument compared without regard to case
    assert elsewhere.combine.method == "mean"
    assert elsewhere.precalibration == matching.precalibration


def test_filter_header_and_telescope_matches(matching):
    other = dict(path="/elsewhere/x.fits", instrument="QHY268M")
    assert effective_for(matching, frame(filter="Ha", **other)).rule == "ha"
    assert effective_for(matching, frame(filter="He", **other)).grouping.temperature is None
    assert effective_for(matching, frame(filter="OIII", GAIN=100, OBSERVER="Anna", **other)).rule == "gain"
    assert effective_for(matching, frame(filter="OIII", GAIN=100, OBSERVER="Anna", **other)).output.directory == \
        Path("/srv/masters")
    assert effective_for(matching, frame(filter="OIII", GAIN=120, OBSERVER="Anna", **other)).rule is None
    assert effective_for(matching, frame(filter="OIII", GAIN=100, **other)).rule is None
    assert effective_for(matching, frame(filter="L", telescope="Refractor 80", **other)).inputs.move_to is None


def test_no_match_gives_the_base(matching):
    eff = effective_for(matching, frame(path="/x/y.fits", instrument="QHY", filter="L"))
    assert eff.rule is None
    assert (eff.output, eff.inputs, eff.grouping, eff.precalibration, eff.combine) == (
        matching.output, matching.inputs, matching.grouping, matching.precalibration, matching.combine)


def test_unnamed_rule_is_labelled_by_index():
    rules = parse("rules:\n  - match: {filter: R}\n  - match: {filter: L}\n")
    assert effective_for(rules, frame(filter="L")).rule == "rules[1]"


# ------------------------------------------------------------------ relative paths


def test_relative_paths_resolve_against_the_rules_file_folder(tmp_path, monkeypatch):
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "flatd.yaml").write_text(textwrap.dedent("""\
        capture:
          - path: captures
          - path: /abs/captures
        output: {directory: masters}
        inputs: {move_to: "originals-{date}"}
        precalibration: {mode: auto, library: calibration}
        state: state
        rules:
          - match: {path: "captures/newt200/**"}
            precalibration: {library: calibration/2600mm, file: bias.fits}
          - match: {path: "*/refractor/**"}
            precalibration: {mode: file, file: ../shared/bias.fits}
    """))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    rules = load_rules(Path("../conf/flatd.yaml"))
    assert rules.capture[0].path == conf / "captures"
    assert rules.capture[1].path == Path("/abs/captures")
    assert rules.precalibration.library == conf / "calibration"
    assert rules.state == conf / "state"
    assert rules.output.directory == Path("masters")  # relative to each capture folder, by design
    assert rules.inputs.move_to == "originals-{date}"

    eff = effective_for(rules, frame(path=conf / "captures" / "newt200" / "flat.fits"))
    assert eff.rule == "rules[0]"
    assert eff.precalibration.library == conf / "calibration" / "2600mm"
    assert eff.precalibration.file == conf / "bias.fits"

    eff = effective_for(rules, frame(path="/data/refractor/flat.fits"))
    assert eff.rule == "rules[1]"  # a pattern that starts with a wildcard stays as it is
    assert eff.precalibration.file.resolve() == (tmp_path / "shared" / "bias.fits")


def test_home_is_expanded(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    rules = parse("capture:\n  - path: ~/captures\nstate: ~/state\n")
    assert rules.capture[0].path == tmp_path / "captures"
    assert rules.state == tmp_path / "state"


def test_find_config(tmp_path, monkeypatch):
    monkeypatch.setenv("FLATD_CONFIG", str(tmp_path / "env.yaml"))
    assert find_config(tmp_path / "given.yaml") == tmp_path / "given.yaml"
    assert find_config(None) == tmp_path / "env.yaml"


def test_keyword_map_from_rules():
    kmap = parse("keywords:\n  filter: [FWHEEL]\n  temperature: [ambtemp]\n").keyword_map()
    assert kmap.filter[0] == "FWHEEL" and "FILTER" in kmap.filter
    assert kmap.temperature[0] == "AMBTEMP"
    assert Rules().keyword_map().filter[0] == "FILTER"


# ------------------------------------------------------------------ the example file


def test_example_config_parses():
    rules = load_rules(EXAMPLE)
    assert rules.capture and rules.rules
    assert rules.precalibration.mode == "auto"


def _model_keys(model: type[BaseModel]) -> set[str]:
    # the combine section also takes every registered method's parameters
    return set(model.model_fields) | set(getattr(model, "parameter_fields", dict)())


def test_example_config_shows_every_key():
    data = yaml.safe_load(EXAMPLE.read_text())
    assert set(data) == _model_keys(Rules)
    from flatd.config import (CaptureFolder, CombineSettings, Engine, Grouping, Inputs, Keywords, Match, Output,
                              Precalibration, Rule)

    sections = {"output": Output, "inputs": Inputs, "grouping": Grouping, "precalibration": Precalibration,
                "combine": CombineSettings, "engine": Engine, "keywords": Keywords}
    for name, model in sections.items():
        assert set(data[name]) == _model_keys(model), name
    assert set().union(*(set(c) for c in data["capture"])) == _model_keys(CaptureFolder)
    assert set().union(*(set(r) for r in data["rules"])) == _model_keys(Rule)
    assert set().union(*(set(r["match"]) for r in data["rules"])) == _model_keys(Match)


def test_example_config_lists_every_name_field():
    text = EXAMPLE.read_text()
    for field in NAME_FIELDS:
        assert "{" + field + "}" in text, field


# --------------------------------------------------------------------------- one schema (A8)


def _schema_keys(model: type[BaseModel] = Rules, prefix: str = "") -> dict[str, tuple]:
    """Every key the schema knows, as a path ("capture[].poll"), with its model and field."""
    import typing

    keys = {}
    for name, info in {**model.model_fields, **getattr(model, "parameter_fields", dict)()}.items():
        path = f"{prefix}{name}"
        keys[path] = (model, name, info)
        inner = info.annotation
        if typing.get_origin(inner) is list:
            inner, path = typing.get_args(inner)[0], path + "[]"
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            keys.update(_schema_keys(inner, path + "."))
    return keys


def _comment_of(lines: list[str], number: int) -> str:
    """The comment on a key's line and the comment lines right above it (1-based line)."""
    import re

    def comment(line: str) -> str:
        found = re.search(r"(?:^|\s)#\s?(.*)$", line)
        return found.group(1) if found else ""

    above = []
    for line in reversed(lines[:number - 1]):
        if not re.match(r"^\s*(?:-\s*)?#", line):
            break
        above.insert(0, comment(line))
    return "\n".join(above + [comment(lines[number - 1])]).strip()


def _example_keys() -> dict[str, list[str]]:
    """Each key of the example, as a schema path, with the comments found for it."""
    from flatd.config import _compose_and_construct, _line_index

    text = EXAMPLE.read_text()
    node, _ = _compose_and_construct(text)
    lines = text.splitlines()
    keys: dict[str, list[str]] = {}
    for loc, number in _line_index(node).items():
        if loc and isinstance(loc[-1], str):
            path = "".join("[]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".").replace(".[]", "[]")
            keys.setdefault(path, []).append(_comment_of(lines, number))
    return keys


def _stated_default(comment: str):
    """The value of a "Default: X" statement, X read as YAML (None when none is stated)."""
    import re

    found = re.search(r"\bDefault: (.+?)(?: \(|\.?$)", comment, re.M)
    return (True, yaml.safe_load(found.group(1))) if found else (False, None)


def test_every_schema_key_is_in_the_example_and_documented():
    import re

    example = _example_keys()
    for path in _schema_keys():
        assert path in example, f"{path} is not in {EXAMPLE.name}"
        parent, _, name = path.rpartition(".")
        in_parent = re.compile(rf"\b{name.removesuffix('[]')}\b").search
        documented = any(example[path]) or any(map(in_parent, example.get(parent.removesuffix("[]"), [])))
        assert documented, f"{path} has no comment in {EXAMPLE.name}"


def test_every_default_stated_in_the_example_is_the_real_default():
    from pydantic import TypeAdapter
    from typing import Annotated

    schema = _schema_keys()
    checked = 0
    for path, comments in _example_keys().items():
        for comment in comments:
            stated, value = _stated_default(comment)
            if not stated:
                continue
            assert path in schema, f"{path}: a default is stated for a key the schema does not know"
            _, name, info = schema[path]
            kind = Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
            assert TypeAdapter(kind).validate_python(value) == info.get_default(call_default_factory=True), path
            checked += 1
    assert checked >= 30


def test_every_field_has_a_description():
    for path, (_, _, info) in _schema_keys().items():
        assert info.description, f"{path} has no description"


def test_the_stated_default_reader():
    assert _stated_default("Look in sub-folders. Default: true") == (True, True)
    assert _stated_default("Default: null (no sweep)") == (True, None)
    assert _stated_default('Default: "FLAT-{filter}.fits"') == (True, "FLAT-{filter}.fits")
    assert _stated_default("no statement here, default is lower case") == (False, None)


# --------------------------------------------------------------------------- issue 9: auto, rejection_warn, rejection_map


def test_auto_is_the_default_method_and_a_valid_value():
    assert parse("").combine.method == "auto"
    assert parse("combine: {method: auto}").combine.method == "auto"
    assert parse("combine: {method: sigma}").combine.method == "sigma"
    rules = parse("rules:\n  - match: {filter: Ha}\n    combine: {method: auto}\n")
    assert rules.rules[0].combine == {"method": "auto"}


def test_rejection_warn_and_map_defaults():
    rules = parse("")
    assert rules.combine.rejection_warn == 0.005
    assert rules.output.rejection_map is False
    assert parse("combine: {rejection_warn: null}").combine.rejection_warn is None
    assert parse("combine: {rejection_warn: 0}").combine.rejection_warn == 0
    assert parse("combine: {rejection_warn: 1}").combine.rejection_warn == 1
    assert parse("combine: {rejection_warn: '0.02'}").combine.rejection_warn == 0.02
    assert parse("output: {rejection_map: true}").output.rejection_map is True


def test_rejection_warn_is_a_field_not_a_method_parameter():
    from flatd.config import CombineSettings
    from flatd.stack import methods

    assert "rejection_warn" in CombineSettings.model_fields
    assert "rejection_warn" not in methods.parameters()
    assert "rejection_warn" in methods.RESERVED  # no method may take the name
    settings = parse("combine: {rejection_warn: 0.01}").combine
    assert "rejection_warn" not in (settings.model_extra or {})


@pytest.mark.parametrize("text, where, says", [
    ("combine: {rejection_warn: 2}", "combine.rejection_warn", "less than or equal to 1"),
    ("combine: {rejection_warn: -0.1}", "combine.rejection_warn", "greater than or equal to 0"),
    ("combine: {rejection_warn: .nan}", "combine.rejection_warn", "finite number"),
    ("combine: {rejection_warn: .inf}", "combine.rejection_warn", ""),
    ("combine: {rejection_warn: lots}", "combine.rejection_warn", "valid number"),
    ("combine: {rejection_warn: [0.1]}", "combine.rejection_warn", "valid number"),
    ("combine: {rejection_warn: {a: 1}}", "combine.rejection_warn", "valid number"),
    ("output: {rejection_map: maybe}", "output.rejection_map", "valid boolean"),
    ("output: {rejection_map: 2}", "output.rejection_map", "valid boolean"),
    ("output: {rejection_map: [true]}", "output.rejection_map", "valid boolean"),
    ("combine: {method: AUTO}", "combine.method", "'auto'"),
    ("combine: {method: [auto]}", "combine.method", "'auto'"),
    ("combine: {method: null}", "combine.method", "'auto'"),
    ("rules:\n  - match: {filter: Ha}\n    combine: {rejection_warn: 7}\n", "rules[0].combine.rejection_warn",
     "less than or equal to 1"),
    ("rules:\n  - match: {filter: Ha}\n    output: {rejection_map: sometimes}\n", "rules[0].output.rejection_map",
     "valid boolean"),
])
def test_hostile_values_of_the_new_keys(text, where, says):
    (line,) = problems(text)
    assert f"at '{where}'" in line and says in line, line
