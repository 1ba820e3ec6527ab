"""Calibration frames must share the flat's camera settings; flats group by them too."""

from __future__ import annotations

from pathlib import Path

import pytest

from flatd.calibration import CalibrationError, Library, calibration_for, mismatch
from flatd.config import Precalibration
from flatd.grouping import GroupOptions, camera_settings, group_frames
from flatd.ingest.frames import Kind, frame_from_header_text
from flatd.output.naming import master_name, name_fields, template_keywords

from framefactory import make_frame


def _cal(name, kind=Kind.BIAS, exposure=0.0, temperature=-10.0, **kw):
    return make_frame(name, kind=kind, exposure=exposure, temperature=temperature, **kw)


def _library(frames):
    return Library(Path("/lib"), list(frames), [])


# A library as a CMOS user keeps it: biases at two offsets and two gains, darks in two
# readout modes.
LIBRARY = [
    _cal("bias_g100_o10.fits", gain=100.0, offset=10.0),
    _cal("bias_g100_o30.fits", gain=100.0, offset=30.0),
    _cal("bias_g200_o10.fits", gain=200.0, offset=10.0),
    _cal("bias_g200_o30.fits", gain=200.0, offset=30.0),
    _cal("dark_fast.fits", kind=Kind.DARK, exposure=2.0, gain=100.0, offset=10.0, readout_mode="Fast"),
    _cal("dark_hq.fits", kind=Kind.DARK, exposure=2.0, gain=100.0, offset=10.0, readout_mode="High Quality"),
]


@pytest.mark.parametrize("gain, offset, expected", [
    (100.0, 10.0, "bias_g100_o10.fits"),
    (100.0, 30.0, "bias_g100_o30.fits"),
    (200.0, 10.0, "bias_g200_o10.fits"),
    (200.0, 30.0, "bias_g200_o30.fits"),
])
def test_each_flat_gets_the_bias_of_its_own_gain_and_offset(gain, offset, expected):
    flat = make_frame(gain=gain, offset=offset, exposure=5.0)
    # exposure-match: no dark of the flat's 5 s, so the bias of its settings
    assert _library(LIBRARY).choose(flat, "exposure-match").calibration.frame.path.name == expected


@pytest.mark.parametrize("mode, expected", [("Fast", "dark_fast.fits"), ("high quality", "dark_hq.fits")])
def test_each_flat_gets_the_dark_of_its_own_readout_mode(mode, expected):
    flat = make_frame(gain=100.0, offset=10.0, readout_mode=mode, exposure=2.0)
    choice = _library(LIBRARY).choose(flat, "exposure-match")
    assert choice.calibration.frame.path.name == expected


def test_the_closest_frame_ruled_out_is_named_with_the_setting():
    # The flat's exposure is the darks'; the Fast dark would score best, but its mode differs.
    flat = make_frame(gain=100.0, offset=10.0, readout_mode="High Quality", exposure=2.0, temperature=-10.0)
    lib = _library([LIBRARY[0], _cal("dark_fast.fits", kind=Kind.DARK, exposure=2.0, gain=100.0, offset=10.0,
                                     readout_mode="Fast")])
    why = lib.choose(flat).calibration.why
    assert why.startswith("bias /captures/bias_g100_o10.fits")
    assert "closer dark /captures/dark_fast.fits ruled out: readout 'fast', the flat's 'high quality'" in why


def test_no_matching_frame_fails_with_the_reason_never_a_wrong_frame():
    flat = make_frame(gain=300.0, offset=10.0, exposure=5.0)
    with pytest.raises(CalibrationError) as err:
        _library(LIBRARY).choose(flat)
    text = str(err.value)
    assert text.startswith(f"{flat.path}: no dark or bias in /lib of 1x1 4144x2822 has the flat's settings")
    assert "gain 300, offset 10" in text
    assert "has gain 100, the flat's 300" in text or "has gain 200, the flat's 300" in text


def test_a_setting_carried_by_one_side_only_does_not_rule_out():
    flat = make_frame(gain=None, offset=None, exposure=5.0)
    assert _library(LIBRARY[:1]).choose(flat).calibration.frame.path.name == "bias_g100_o10.fits"
    bias = _cal("bias.fits")
    assert _library([bias]).choose(make_frame(gain=120.0)).calibration.frame is bias


def test_match_can_name_extra_keywords_and_can_be_emptied():
    flat = make_frame(gain=100.0, headers={"USBLIMIT": 40})
    other = _cal("bias_usb80.fits", gain=100.0, headers={"USBLIMIT": 80})
    assert mismatch(flat, other, ("camera", "gain", "USBLIMIT")) == "USBLIMIT 80, the flat's 40"
    with pytest.raises(CalibrationError, match="USBLIMIT 80, the flat's 40"):
        _library([other]).choose(flat, match=("USBLIMIT",))
    stranger = _cal("bias_other_camera.fits", instrument="QHY268M", gain=0.0)
    assert _library([stranger]).choose(flat, match=()).calibration.frame is stranger


def test_camera_gain_and_offset_compare_as_numbers_and_without_case():
    flat = make_frame(gain=120.0, instrument="ZWO ASI294MC Pro")
    assert mismatch(flat, _cal("b.fits", gain=120.0000001, instrument="zwo asi294mc pro ")) is None
    assert mismatch(flat, _cal("b.fits", gain=121.0, instrument="ZWO ASI294MC Pro")) == "gain 121, the flat's 120"


def test_a_fixed_file_with_other_settings_is_refused(tmp_path):
    flat = make_frame(gain=100.0, offset=30.0)
    fixed = _cal("bias_g100_o10.fits", gain=100.0, offset=10.0, width=4144, height=2822)
    settings = Precalibration(mode="file", file=tmp_path / "unused.fits")
    with pytest.raises(CalibrationError, match="does not match flat .*: offset 10, the flat's 30"):
        calibration_for(flat, settings, None, fixed)
    assert calibration_for(flat, Precalibration(mode="file", file=tmp_path / "x.fits", match=[]), None,
                           fixed).frame is fixed


# --------------------------------------------------------------------------- grouping


def _flats(n, **kw):
    return [make_frame(f"flat_{kw.get('gain')}_{kw.get('offset')}_{kw.get('readout_mode')}_"
                       f"{kw.get('bayer_pattern')}_{kw.get('row_order')}_{i}.fits",
                       **{k: v for k, v in kw.items() if v is not None}) for i in range(n)]


@pytest.mark.parametrize("other", [
    dict(gain=200.0), dict(offset=50.0), dict(readout_mode="Fast"), dict(bayer_pattern="RGGB"),
    dict(row_order="BOTTOM-UP"),
])
def test_flats_never_share_a_group_across_camera_settings(other):
    base = dict(gain=100.0, offset=10.0)
    frames = _flats(3, **base) + _flats(3, **{**base, **other})
    groups, skipped = group_frames(frames, GroupOptions(min_group_size=3))
    assert skipped == [] and len(groups) == 2
    assert {len(g) for g in groups} == {3}
    assert any(camera_settings(g.frames[0])[-1] in g.label for g in groups)


def test_group_label_names_the_settings():
    groups, _ = group_frames(_flats(2, gain=120.0, offset=30.0, bayer_pattern="RGGB"), GroupOptions())
    assert groups[0].label == "1x1 4144x2822, -10.0 °C, filter L, gain 120, offset 30, RGGB"


def test_too_small_settings_group_is_left_out_with_the_settings_named():
    frames = _flats(3, gain=100.0) + _flats(1, gain=200.0)
    groups, skipped = group_frames(frames, GroupOptions(min_group_size=2))
    assert len(groups) == 1 and len(skipped) == 1
    assert skipped[0].reason == "group gain 200 has 1 flat, fewer than min_group_size 2"


def _with(key, values):
    return [make_frame(f"flat_{i}.fits", headers={key: v}) for i, v in enumerate(values)]


def test_keywords_with_a_tolerance_group_nearby_values():
    frames = _with("FOCALLEN", [250.0, 250.4, 250.9, 530.0, 530.2])
    groups, _ = group_frames(frames, GroupOptions(keywords=(("FOCALLEN", 1.0),)))
    assert [len(g) for g in groups] == [3, 2]
    assert groups[0].label.endswith("FOCALLEN 250..250.9")
    exact, _ = group_frames(frames, GroupOptions(keywords=(("FOCALLEN", None),)))
    assert len(exact) == 5


def test_keyword_text_compares_without_case_and_missing_is_its_own_group():
    frames = _with("OPTIC", ["RedCat", "redcat ", "Esprit"]) + [make_frame("flat_none.fits")]
    groups, _ = group_frames(frames, GroupOptions(keywords=(("OPTIC", None),)))
    assert sorted(len(g) for g in groups) == [1, 1, 2]
    assert any(g.label.endswith("no OPTIC") for g in groups)


@pytest.mark.parametrize("hostile", [float("nan"), float("inf"), "", True, "x" * 10_000, 1e308, -1e308])
def test_hostile_keyword_values_never_crash_grouping(hostile):
    frames = _with("FOCALLEN", [250.0, hostile, 250.5])
    groups, skipped = group_frames(frames, GroupOptions(keywords=(("FOCALLEN", 1.0),)))
    assert sum(len(g) for g in groups) + len(skipped) == 3


# --------------------------------------------------------------------------- names


def test_name_template_uses_settings_and_header_keywords():
    frames = [make_frame(gain=120.0, offset=30.0, bayer_pattern="RGGB", headers={"FOCALLEN": 250.0})]
    template = "FLAT-{gain}-{offset}-{bayer}-{readout}-{FOCALLEN}.fits"
    assert template_keywords(template) == ["FOCALLEN"]
    fields = name_fields(frames, "Mean", "g", __import__("datetime").datetime(2026, 1, 1), template_keywords(template))
    assert master_name(template, fields) == "FLAT-120-30-RGGB-na-250.fits"


# --------------------------------------------------------------------------- dialects


HEADERS = Path(__file__).resolve().parents[2].parent / "shared" / "realdata" / "headers"


@pytest.mark.skipif(not HEADERS.is_dir(), reason="realdata not available")
@pytest.mark.parametrize("name, gain, offset, readout, bayer", [
    ("header_nina.hdr", 120.0, 30.0, None, "RGGB"),
    ("sgp_header.hdr", 120.0, 30.0, None, None),
    ("header_seestar.hdr", 80.0, None, None, "GRBG"),
    ("header_dwarflab.hdr", 110.0, None, None, "GBRG"),
    ("header_maximdl.hdr", None, None, "Monochrome", None),
    ("header_apt.hdr", 120.0, None, None, None),
])
def test_real_headers_give_each_dialects_settings(name, gain, offset, readout, bayer):
    frame = frame_from_header_text((HEADERS / name).read_text(errors="replace"), HEADERS / name)
    assert (frame.gain, frame.offset, frame.readout_mode, frame.bayer_pattern) == (gain, offset, readout, bayer)


@pytest.mark.parametrize("card, attr, expected", [
    ("GAIN    = 'high'", "gain", None),
    ("GAIN    = -5", "gain", None),
    ("GAIN    = 1E300", "gain", None),
    ("OFFSET  = 'NaN'", "offset", None),
    ("BAYERPAT= 'RGGBX'", "bayer_pattern", None),
    ("BAYERPAT= 'NONE'", "bayer_pattern", None),
    ("BAYERPAT= 'gggg'", "bayer_pattern", None),
    ("BAYERPAT= 'bggr'", "bayer_pattern", "BGGR"),
    ("XBAYROFF= 1E300", "bayer_offset", (0, 0)),
    ("XBAYROFF= 3", "bayer_offset", (1, 0)),
    ("ROWORDER= 'bottom-up'", "row_order", "BOTTOM-UP"),
    ("ROWORDER= 42", "row_order", "TOP-DOWN"),
    ("READOUTM= '" + "x" * 60 + "'", "readout_mode", "x" * 60),
])
def test_hostile_setting_values_are_read_as_missing_or_sane(card, attr, expected):
    frame = frame_from_header_text(f"SIMPLE  = T\nBITPIX  = 16\nNAXIS   = 2\nNAXIS1  = 10\nNAXIS2  = 10\n{card}")
    assert getattr(frame, attr) == expected


# --------------------------------------------------------------------------- rules file


def _problems(text: str) -> list[str]:
    from flatd.config import ConfigError, parse_rules

    try:
        parse_rules(text, Path("/etc/flatd/flatd.yaml"))
    except ConfigError as exc:
        return exc.render().splitlines()
    return []


def test_rules_file_settings_reach_matching_and_grouping():
    from flatd.config import parse_rules

    rules = parse_rules("precalibration:\n  match: [camera, Gain, usblimit]\n"
                        "grouping:\n  keywords: {focallen: 1.5, OPTIC: null}\n", Path("/x.yaml"))
    assert rules.precalibration.match == ["camera", "gain", "USBLIMIT"]
    options = GroupOptions.from_settings(rules.grouping)
    assert options.keywords == (("FOCALLEN", 1.5), ("OPTIC", None))
    listed = parse_rules("grouping:\n  keywords: [FOCALLEN]\n", Path("/x.yaml"))
    assert GroupOptions.from_settings(listed.grouping).keywords == (("FOCALLEN", None),)


@pytest.mark.parametrize("text, expected", [
    ("precalibration:\n  match: [42]\n", "at 'precalibration.match[0]': 42 is not a setting name or header keyword"),
    ("precalibration:\n  match: [TOO-LONG-KEYWORD]\n", "at 'precalibration.match[0]': 'TOO-LONG-KEYWORD' is not"),
    ("precalibration:\n  match: [\"GA IN\"]\n", "at 'precalibration.match[0]': 'GA IN' is not"),
    ("precalibration:\n  match: camera\n", "at 'precalibration.match': Input should be a valid list"),
    ("grouping:\n  keywords: {FOCALLEN: -1}\n", "at 'grouping.keywords.FOCALLEN': -1: a tolerance is a number of 0"),
    ("grouping:\n  keywords: {FOCALLEN: wide}\n", "at 'grouping.keywords.FOCALLEN': 'wide': a tolerance"),
    ("grouping:\n  keywords: {FOCALLEN: .nan}\n", "at 'grouping.keywords.FOCALLEN': nan: a tolerance"),
    ("grouping:\n  keywords: {FOCALLEN: true}\n", "at 'grouping.keywords.FOCALLEN': True: a tolerance"),
    ("grouping:\n  keywords: {gain: 1}\n", "at 'grouping.keywords': gain: always separate groups"),
    ("grouping:\n  keywords: 5\n", "at 'grouping.keywords': Input should be a valid dictionary"),
    ("output:\n  name: 'FLAT-{focallen}.fits'\n", "at 'output.name': unknown field {focallen}"),
])
def test_hostile_matching_and_grouping_settings_name_the_key(text, expected):
    found = _problems(text)
    assert len(found) == 1 and expected in found[0], found
