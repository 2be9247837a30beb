"""The one options object (CT2MRTranslationLib.options) and the engine's schema it reads (ct2mr/translate_options.json),
from the bundled wheel, the source tree or the installed package, never by importing the engine."""

from __future__ import annotations

import json
import zipfile

import pytest
from CT2MRTranslationTestHelpers import MODULE_DIR, REPO_ROOT

from CT2MRTranslationLib import options

ENGINE_SCHEMA = REPO_ROOT / "training" / "ct2mr" / "translate_options.json"


def test_the_schema_is_the_engines(tmp_path):
    location = options.findSchemaFile()
    assert location == (ENGINE_SCHEMA, None)  # a source checkout: the repository's engine
    schema = options.loadSchema()
    document = json.loads(ENGINE_SCHEMA.read_text())
    assert list(schema) == [o["name"] for o in document["options"]]
    for item in document["options"]:
        spec = schema[item["name"]]
        assert (spec.flag, spec.type, spec.default) == (item["flag"], item["type"], item.get("default"))
        assert spec.choices == (tuple(item["choices"]) if "choices" in item else None)
    from ct2mr.options import translate_options  # the engine's own reader agrees

    assert [o["name"] for o in translate_options()] == list(schema)


def test_a_bundled_wheel_is_read_first(tmp_path):
    module = tmp_path / "CT2MRTranslation"
    engine = module / "Resources" / "Engine"
    engine.mkdir(parents=True)
    changed = json.loads(ENGINE_SCHEMA.read_text())
    changed["options"][1]["maximum"] = 0.75
    with zipfile.ZipFile(engine / "ct2mr-9.9.9-py3-none-any.whl", "w") as wheel:
        wheel.writestr("ct2mr/translate_options.json", json.dumps(changed))
    location = options.findSchemaFile(module)
    assert location == (engine / "ct2mr-9.9.9-py3-none-any.whl", "ct2mr/translate_options.json")
    assert options.loadSchema(location)["overlap"].maximum == 0.75
    # without a bundled engine: the installed ct2mr package (found, not imported)
    installed = options.findSchemaFile(tmp_path / "elsewhere" / "CT2MRTranslation")
    assert installed is not None and installed[0].name == "translate_options.json"
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"command": "train"}))
    with pytest.raises(ValueError, match="not a schema of ct2mr translate options"):
        options.loadSchema(broken)


def test_defaults_come_from_the_schema():
    defaults = options.TranslationOptions()
    for spec in options.loadSchema().values():
        assert getattr(defaults, spec.attribute) == spec.default, spec.name
    assert defaults.modelPath is None and defaults.extraArguments == ()
    assert options.camelCase("sw_batch_size") == "swBatchSize" and options.optionSpec("roiSize").name == "roi_size"
    with pytest.raises(KeyError, match="known: device, overlap"):
        options.optionSpec("window")


def test_keywords_validation_and_engine_arguments(tmp_path):
    model = tmp_path / "m.safetensors"
    model.write_bytes(b"weights")
    chosen = options.TranslationOptions.fromKeywords(modelPath=str(model), device="cuda:0", overlap="0.5",
                                                     roiSize=0, swBatchSize=0, computeMetrics=True,
                                                     extraArguments=["--gpu-memory-gb", 8])
    checked = chosen.validated()
    assert (checked.overlap, checked.roiSize, checked.swBatchSize, checked.analysis) == (0.5, None, None, True)
    assert checked.extraArguments == ("--gpu-memory-gb", "8")
    assert chosen.engineArguments("/tmp/ref.nrrd") == [
        "--device", "cuda:0", "--overlap", "0.5", "--precision", "auto", "--harmonize", "none", "--analysis",
        "--model", str(model), "--reference-mr", "/tmp/ref.nrrd", "--gpu-memory-gb", "8"]
    assert options.TranslationOptions(harmonize="nyul").needsReference
    assert not options.TranslationOptions(harmonize="zscore").needsReference
    with pytest.raises(TypeError, match="Unknown translation option 'overlapp'"):
        options.TranslationOptions.fromKeywords(overlapp=0.5)
    with pytest.raises(FileNotFoundError, match="leave the path empty"):
        options.TranslationOptions(modelPath=str(tmp_path / "absent.safetensors")).validated()


@pytest.mark.parametrize(("name", "typed", "expected"), [
    ("roi_size", 50, 48), ("roi_size", 5, 16), ("roi_size", 700, 512), ("overlap", 0.97, 0.95),
    ("sw_batch_size", 0, 1),
])
def test_spin_box_values_snap_to_valid_ones(name, typed, expected):
    spec = options.optionSpec(name)
    assert spec.nearestValid(typed) == expected
    assert spec.check(spec.nearestValid(typed)) == expected


def test_the_module_ships_no_copy_of_the_schema():
    """One definition: the front end has no translate_options.json of its own."""
    assert not list(MODULE_DIR.rglob(options.SCHEMA_FILE_NAME))
