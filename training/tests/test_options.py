"""The translate options schema (ct2mr/translate_options.json) against the CLI parser and InferenceSettings."""

from __future__ import annotations

import json

import pytest

from ct2mr import options
from ct2mr.cli import build_parser
from ct2mr.inference.harmonization import HARMONIZATION_METHODS
from ct2mr.inference.translate import PRECISIONS, InferenceSettings


def translate_actions() -> dict:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    translate = sub.choices["translate"]
    return {flag: action for action in translate._actions for flag in action.option_strings}


def test_schema_file_is_valid_json_with_known_keys():
    document = json.loads(options.TRANSLATE_OPTIONS_FILE.read_text())
    assert document["command"] == "translate" and document["version"] == 1
    allowed = {"name", "flag", "type", "default", "choices", "pattern", "minimum", "maximum", "multiple_of", "step",
               "needs_reference", "description"}
    names = [o["name"] for o in document["options"]]
    assert names == ["device", "overlap", "roi_size", "sw_batch_size", "precision", "harmonize", "warp_check",
                     "analysis", "uncertainty", "uncertainty_passes", "ood"]
    for option in document["options"]:
        assert set(option) <= allowed, option["name"]
        assert len(option["description"]) > 20


@pytest.mark.parametrize("option", options.translate_options(), ids=lambda o: o["name"])
def test_every_option_matches_the_cli(option):
    actions = translate_actions()
    action = actions[option["flag"]]
    assert action.dest == option["name"]
    if option["type"] == "boolean":
        assert action.default is False and action.nargs == 0 and option["default"] is False
        return
    assert action.default == option["default"], option["name"]
    if option.get("choices") and not option.get("pattern"):
        assert tuple(action.choices) == tuple(option["choices"])
    if option["type"] == "integer":
        assert action.type is int
    if option["type"] == "number":
        assert action.type is float


def test_vocabularies_are_the_engines():
    from ct2mr.inference.uncertainty import DEFAULT_TTA_PASSES, UNCERTAINTY_MODES

    assert tuple(options.translate_option("uncertainty")["choices"]) == UNCERTAINTY_MODES
    assert options.translate_option("uncertainty_passes")["default"] == DEFAULT_TTA_PASSES
    assert tuple(options.translate_option("precision")["choices"]) == PRECISIONS
    assert tuple(options.translate_option("harmonize")["choices"]) == HARMONIZATION_METHODS
    assert set(options.translate_option("harmonize")["needs_reference"]) == {"histogram", "nyul"}


def test_the_engine_accepts_every_value_of_the_ranges():
    overlap = options.translate_option("overlap")
    roi = options.translate_option("roi_size")
    batch = options.translate_option("sw_batch_size")
    for value in (overlap["minimum"], overlap["default"], overlap["maximum"]):
        InferenceSettings(overlap=value)
    for value in range(roi["minimum"], roi["maximum"] + 1, roi["multiple_of"]):
        assert InferenceSettings(roi_size=value).roi_size == (value,) * 3
    for value in (batch["minimum"], batch["maximum"]):
        InferenceSettings(sw_batch_size=value)
    for precision in options.translate_option("precision")["choices"]:
        InferenceSettings(precision=precision)
    from ct2mr.inference.uncertainty import tta_augmentations

    passes = options.translate_option("uncertainty_passes")
    for value in (passes["minimum"], passes["maximum"]):
        assert len(tta_augmentations(value)) == value


@pytest.mark.parametrize(("name", "value", "expected"), [
    ("overlap", "0.5", 0.5), ("roi_size", 64.0, 64), ("roi_size", None, None), ("device", "cuda:3", "cuda:3"),
    ("harmonize", "nyul", "nyul"), ("warp_check", True, True),
])
def test_check_option_accepts(name, value, expected):
    assert options.check_option(name, value) == expected


@pytest.mark.parametrize(("name", "value", "message"), [
    ("overlap", 0.99, r"overlap must be in \[0.0, 0.95\]"),
    ("overlap", "half", "overlap must be of type number"),
    ("roi_size", 50, "roi_size must be a multiple of 16"),
    ("roi_size", 1024, r"roi_size must be in \[16, 512\]"),
    ("roi_size", 64.5, "whole number"),
    ("sw_batch_size", 0, r"sw_batch_size must be in \[1, 64\]"),
    ("device", "gpu", "device must be one of auto, cuda, cpu"),
    ("precision", "int8", "precision must be one of auto, fp32, bf16, fp16"),
    ("overlap", None, "needs a value"),
    ("warp_check", "yes", "true or false"),
])
def test_check_option_refuses(name, value, message):
    with pytest.raises(ValueError, match=message):
        options.check_option(name, value)
    with pytest.raises(KeyError, match="known: device, overlap"):
        options.translate_option("window")
