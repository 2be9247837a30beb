"""Out-of-distribution score (issue 16): training-CT statistics, the score against them, and translate --ood."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from ct2mr.models.checkpoint import MODELS_DIR, load_checkpoint, save_checkpoint
from ct2mr.preprocessing.collections import load_domain
from ct2mr.inference.ood import (FEATURES, OOD_NAME, OOD_THRESHOLD, STATISTICS_VERSION, TOLERANCES, assess, ct_statistics,
                       ood_score, reference_for, training_ct_statistics)
from ct2mr.preprocessing.pipeline import preprocess

from ct2mr_testdata import ABDOMEN_CT, HEART_CT, LUNG_CT, THORAX_CT, need, run_ct2mr, assert_on_grid


def _reference(**features: tuple[float, float]) -> dict:
    return {"version": STATISTICS_VERSION, "volumes": 3,
            "features": {f: {"mean": m, "std": s, "min": m, "max": m} for f, (m, s) in features.items()}}


@pytest.mark.parametrize(("value", "mean", "std", "feature"), [
    (0.02, 0.2, 0.0, "lung_fraction"), (0.2, 0.2, 0.1, "lung_fraction"), (150.0, 330.0, 20.0, "extent_lr_mm"),
    (500.0, 300.0, 0.0, "tissue_p95_hu"),
])
def test_score_is_the_standardised_deviation(value, mean, std, feature):
    result = ood_score({feature: value}, _reference(**{feature: (mean, std)}))
    expected = abs(value - mean) / math.hypot(std, TOLERANCES[feature])
    assert result["score"] == pytest.approx(expected, abs=1e-3)
    assert result["ood_warning"] is (expected > OOD_THRESHOLD)
    assert result["features"][feature]["tolerance"] == TOLERANCES[feature]


def test_score_is_the_largest_feature_and_names_it():
    result = ood_score({"lung_fraction": 0.0, "extent_lr_mm": 330.0, "tissue_mean_hu": 100.0},
                       _reference(lung_fraction=(0.2, 0.0), extent_lr_mm=(330.0, 10.0), tissue_mean_hu=(0.0, 0.0)))
    assert result["top_features"][:2] == ["lung_fraction", "tissue_mean_hu"]
    assert result["score"] == pytest.approx(4.0) and result["ood_warning"] is True
    assert result["features"]["extent_lr_mm"]["z"] == 0.0


def test_reference_of_another_version_is_refused():
    with pytest.raises(ValueError, match="version"):
        ood_score({"lung_fraction": 0.1}, {"version": 0, "features": {}})
    with pytest.raises(ValueError, match="no feature"):
        ood_score({"lung_fraction": 0.1}, _reference(extent_lr_mm=(1.0, 1.0)))


def test_statistics_of_a_real_ct_are_physical():
    need(HEART_CT)
    pre = preprocess(sitk.ReadImage(str(HEART_CT)), "ct")
    stats = ct_statistics(pre.array, pre.record)
    assert list(stats) == list(FEATURES)
    assert 0 <= stats["lung_fraction"] < 0.1  # a crop around the heart: the lungs touch the border, few enclosed
    assert 0.2 < stats["dense_fraction"] < 0.3  # contrast-filled heart and aorta
    assert stats["extent_lr_mm"] == pytest.approx(122 * 1.5, abs=4)  # the crop's field of view (2 mm stride)
    assert stats["extent_si_mm"] == pytest.approx(112 * 1.5, abs=4)
    assert stats["slice_thickness_mm"] == 1.5
    assert -600 <= stats["tissue_mean_hu"] <= 1000 and stats["tissue_p95_hu"] <= 1000


def test_training_statistics_are_the_same_from_paths_and_from_the_trainers_volumes():
    """The trainer passes its DomainVolumes; translate computes from the input: both must give the same numbers."""
    need(HEART_CT, ABDOMEN_CT)
    from_paths = training_ct_statistics([HEART_CT, ABDOMEN_CT])
    from_domain = training_ct_statistics(load_domain([HEART_CT, ABDOMEN_CT], "ct"))
    assert from_paths["volumes"] == from_domain["volumes"] == 2
    for f in FEATURES:
        for key in ("mean", "std", "min", "max"):
            assert from_paths["features"][f][key] == pytest.approx(from_domain["features"][f][key], rel=1e-6), f
    assert len(json.dumps(from_paths)) < 3000  # small enough for a safetensors header
    with pytest.raises(ValueError, match="at least one"):
        training_ct_statistics([])
    with pytest.raises(TypeError, match="preprocessed volumes"):
        training_ct_statistics([42])


@pytest.fixture(scope="module")
def chest_reference() -> dict:
    """Statistics of the shared full-field chest CTs: the references of a chest-trained model."""
    need(THORAX_CT, LUNG_CT)
    return training_ct_statistics([THORAX_CT, LUNG_CT])


def _head_sized_crop(image: sitk.Image) -> sitk.Image:
    """A head-sized box (about 150 x 195 x 210 mm) from the middle of a 1.5 mm chest CT."""
    sx, sy, sz = image.GetSize()
    x0, y0 = (sx - 100) // 2, (sy - 130) // 2
    return image[x0:x0 + 100, y0:y0 + 130, sz - 140:sz]


def _score(image: sitk.Image, reference: dict) -> dict:
    pre = preprocess(image, "ct")
    return ood_score(ct_statistics(pre.array, pre.record), reference)


@pytest.mark.slow
def test_abdomen_and_head_sized_volumes_exceed_the_threshold_chest_cts_do_not(chest_reference):
    need(ABDOMEN_CT)
    thorax = sitk.ReadImage(str(THORAX_CT))
    scores = {"thorax": _score(thorax, chest_reference),
              "lung2": _score(sitk.ReadImage(str(LUNG_CT)), chest_reference),
              # the same chest scanned 20 % shorter: a different scan of the same region, not out of distribution
              "thorax_shorter": _score(thorax[:, :, 19:172], chest_reference),
              "abdomen": _score(sitk.ReadImage(str(ABDOMEN_CT)), chest_reference),
              "head_sized": _score(_head_sized_crop(thorax), chest_reference)}
    for name in ("thorax", "lung2", "thorax_shorter"):
        assert scores[name]["score"] < OOD_THRESHOLD and not scores[name]["ood_warning"], (name, scores[name])
    assert scores["abdomen"]["ood_warning"] and scores["abdomen"]["top_features"][0] == "lung_fraction"
    assert scores["head_sized"]["ood_warning"]
    assert scores["head_sized"]["top_features"][0] in ("axial_area_cm2", "extent_lr_mm")


@pytest.fixture(scope="module")
def bare_checkpoint(tiny_checkpoint, tmp_path_factory) -> Path:
    """The tiny checkpoint without training-CT statistics, as checkpoints of earlier trainers are."""
    checkpoint = load_checkpoint(tiny_checkpoint)
    training = {k: v for k, v in checkpoint.training.items() if k != "ct_statistics"}
    path = tmp_path_factory.mktemp("bare_model") / "bare.safetensors"
    return save_checkpoint(path, {"G": checkpoint.G, "F": checkpoint.F}, checkpoint.architecture,
                           checkpoint.preprocessing, checkpoint.inference, training)


def test_the_trainer_records_its_training_ct_statistics(tiny_checkpoint):
    reference, note = reference_for(load_checkpoint(tiny_checkpoint))
    assert reference["names"] == ["thorax_cta_heart_crop_1p5mm"] and reference["volumes"] == 1
    assert set(reference["features"]) == set(FEATURES) and "recorded in the checkpoint" in note


def test_reference_comes_from_the_checkpoint_the_bundled_file_or_nowhere(bare_checkpoint, tmp_path):
    default = load_checkpoint(None)  # v1.5: its trainer recorded the statistics
    reference, note = reference_for(default)
    assert reference["volumes"] == 4 and "recorded in the checkpoint" in note
    assert set(reference["names"]) == set(default.training["ct_volumes"])
    older = load_checkpoint(MODELS_DIR / "ct2mr-default-v0.2.safetensors")  # predates that: the bundled file
    reference, note = reference_for(older)
    assert reference["volumes"] == 4 and "bundled reference statistics" in note
    assert set(reference["names"]) == set(older.training["ct_volumes"])
    tiny = load_checkpoint(bare_checkpoint)
    reference, note = reference_for(tiny)
    assert reference is None and "no out-of-distribution score" in note
    stored = _reference(lung_fraction=(0.2, 0.05))
    tiny.training["ct_statistics"] = stored
    assert reference_for(tiny) == (stored, "training CTs recorded in the checkpoint (3 volumes)")


def test_assess_without_reference_gives_no_score(bare_checkpoint):
    need(HEART_CT)
    pre = preprocess(sitk.ReadImage(str(HEART_CT)), "ct")
    result = assess(pre.array, pre.record, load_checkpoint(bare_checkpoint))
    assert result["score"] is None and result["ood_warning"] is None
    assert list(result["statistics"]) == list(FEATURES) and "no out-of-distribution score" in result["reference"]


@pytest.fixture(scope="module")
def chest_checkpoint(tiny_checkpoint, chest_reference, tmp_path_factory) -> Path:
    """The tiny checkpoint with the chest references stored as a trainer will store them."""
    checkpoint = load_checkpoint(tiny_checkpoint)
    path = tmp_path_factory.mktemp("chest_model") / "chest.safetensors"
    return save_checkpoint(path, {"G": checkpoint.G, "F": checkpoint.F}, checkpoint.architecture,
                           checkpoint.preprocessing, checkpoint.inference,
                           {**checkpoint.training, "ct_statistics": chest_reference})


@pytest.mark.slow
def test_translate_ood_warns_for_a_head_sized_volume(chest_checkpoint, tmp_path):
    ct_path = tmp_path / "head_sized.nii.gz"
    sitk.WriteImage(_head_sized_crop(sitk.ReadImage(str(THORAX_CT))), str(ct_path))
    out = tmp_path / "out"
    proc = run_ct2mr("translate", str(ct_path), "-o", str(out), "--model", str(chest_checkpoint), "--ood",
                     "--progress", "json", "--device", "cpu", check=True)
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    names = [e["event"] for e in events]
    ood_event = events[names.index("ood")]
    assert not any(e["event"] == "progress" and e["stage"] == "G" for e in events[:names.index("ood")])
    assert ood_event["ood_warning"] is True and ood_event["score"] > OOD_THRESHOLD
    assert any(e["event"] == "warning" and "differs from the model's training CTs" in e["message"] for e in events)
    done = events[-1]
    assert done["event"] == "done" and done["ood"]["score"] == ood_event["score"]
    assert done["outputs"]["ood"] == str(out / OOD_NAME)
    written = json.loads((out / OOD_NAME).read_text())
    assert written["ood_warning"] is True and written["reference_volumes"] == 2
    assert set(written["features"]) == set(FEATURES) and "warning above 3" in written["definition"]
    ct = sitk.ReadImage(str(ct_path))
    for name in ("synthetic_mr.nii.gz", "roundtrip_ct.nii.gz", "error_map.nii.gz"):
        assert_on_grid(out / name, ct)


def test_translate_ood_without_reference_says_so(bare_checkpoint, tmp_path):
    need(HEART_CT)
    ct_path = tmp_path / "crop.nii.gz"
    sitk.WriteImage(sitk.ReadImage(str(HEART_CT))[30:70, 30:70, 30:62], str(ct_path))
    out = tmp_path / "out"
    proc = run_ct2mr("translate", str(ct_path), "-o", str(out), "--model", str(bare_checkpoint), "--ood",
                     "--progress", "none", "--device", "cpu", check=True)
    assert "Out-of-distribution score: not available" in proc.stdout + proc.stderr
    written = json.loads((out / OOD_NAME).read_text())
    assert written["score"] is None and "holds no training-CT statistics" in written["reference"]
    assert np.isfinite(list(written["statistics"].values())).all()
