"""Post-hoc intensity harmonisation (thesis 7.6): histogram matching, Nyul landmarks, median/MAD, and the
translate-time option on real shared volumes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from ct2mr.evaluation.metrics import histogram_w1, intensity_histogram
from ct2mr.inference.harmonization import (HARMONIZATION_METHODS, MAD_TO_STD, NYUL_PERCENTILES, Harmonizer, fit_harmonizer,
                                 histogram_match, nyul_apply, nyul_fit, nyul_landmarks, robust_standardize)

from ct2mr_testdata import CARDIAC_MR, HEART_CT, need, run_ct2mr


def _volumes():
    rng = np.random.default_rng(0)
    source = rng.gamma(2.0, 1.0, (20, 24, 28))
    reference = rng.normal(0.3, 0.2, (18, 20, 22))
    return source, reference


def test_histogram_matching_gives_the_reference_quantiles_and_keeps_order():
    source, reference = _volumes()
    matched = histogram_match(source, reference)
    levels = np.linspace(0.02, 0.98, 25)
    assert np.allclose(np.quantile(matched, levels), np.quantile(reference, levels), atol=0.01)
    order = np.argsort(source.ravel())
    assert np.all(np.diff(matched.ravel()[order]) >= -1e-6)  # monotone: anatomy's intensity order is kept
    assert matched.dtype == np.float32 and matched.shape == source.shape


def test_histogram_matching_takes_statistics_inside_the_masks_only():
    source, reference = _volumes()
    mask = np.zeros(source.shape, bool)
    mask[5:15] = True
    changed = source.copy()
    changed[~mask] = 1000.0  # outside the mask: must not move the mapping
    a, b = histogram_match(source, reference, mask), histogram_match(changed, reference, mask)
    assert np.allclose(a[mask], b[mask])
    ref_mask = reference > 0.3
    upper = histogram_match(source, reference, None, ref_mask)
    assert upper.min() >= reference[ref_mask].min() - 1e-6


def test_harmonisation_keeps_simpleitk_geometry():
    source, reference = _volumes()
    image = sitk.GetImageFromArray(source.astype(np.float32))
    image.SetSpacing((0.7, 0.8, 2.5))
    image.SetOrigin((10.0, -5.0, 3.0))
    image.SetDirection((0, 1, 0, 1, 0, 0, 0, 0, -1))
    for out in (histogram_match(image, reference), robust_standardize(image),
                nyul_apply(image, nyul_fit([reference]))):
        assert isinstance(out, sitk.Image)
        assert out.GetSpacing() == image.GetSpacing() and out.GetOrigin() == image.GetOrigin()
        assert out.GetDirection() == image.GetDirection()


def test_nyul_maps_the_landmarks_onto_the_standard_scale():
    rng = np.random.default_rng(1)
    references = [rng.normal(m, s, (16, 16, 16)) for m, s in ((0.0, 1.0), (2.0, 3.0), (-1.0, 0.5))]
    standard = nyul_fit(references, scale=(0.0, 100.0))
    assert standard[0] == pytest.approx(0.0) and standard[-1] == pytest.approx(100.0)
    assert np.all(np.diff(standard) > 0)
    # each reference, rescaled to P1 -> 0 and P99 -> 100, averaged landmark by landmark
    own = [nyul_landmarks(r) for r in references]
    expected = np.mean([(l - l[0]) * 100 / (l[-1] - l[0]) for l in own], axis=0)
    assert np.allclose(standard, expected)
    volume = rng.gamma(2.0, 2.0, (20, 20, 20))
    out = nyul_apply(volume, standard)
    assert np.allclose(nyul_landmarks(out), standard, atol=0.05)
    # default scale: the references' own mean P1 and P99 (the output stays in their units)
    default = nyul_fit(references)
    assert default[0] == pytest.approx(np.mean([l[0] for l in own]))
    with pytest.raises(ValueError, match="increasing"):
        nyul_landmarks(volume, percentiles=[50, 10])
    with pytest.raises(ValueError, match="flat"):
        nyul_fit([np.ones((4, 4, 4))])


def test_median_mad_standardisation_inside_a_mask():
    source, reference = _volumes()
    mask = source > 1.0
    out = robust_standardize(source, mask, target_median=0.25, target_mad=0.1)
    median = np.median(out[mask])
    assert median == pytest.approx(0.25, abs=1e-5)
    assert np.median(np.abs(out[mask] - median)) == pytest.approx(0.1, abs=1e-5)
    z = robust_standardize(source, mask)  # robust z-scores: median 0, 1.4826 MAD = 1
    assert np.median(z[mask]) == pytest.approx(0.0, abs=1e-5)
    assert MAD_TO_STD * np.median(np.abs(z[mask])) == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="MAD = 0"):
        robust_standardize(np.ones((4, 4, 4)))
    with pytest.raises(ValueError, match="no voxels"):
        robust_standardize(source, np.zeros(source.shape, bool))


def test_fit_harmonizer_validates_and_clips_to_the_normalised_range():
    source, reference = _volumes()
    with pytest.raises(ValueError, match=r"one of \('none', 'histogram', 'nyul', 'zscore'\)"):
        fit_harmonizer("gamma")
    with pytest.raises(ValueError, match="--reference-mr"):
        fit_harmonizer("histogram")
    with pytest.raises(ValueError, match="one of"):
        Harmonizer("ltsa")
    for method in HARMONIZATION_METHODS:
        harmonizer = fit_harmonizer(method, [np.clip(reference, -1, 1)], names=["ref"])
        out = harmonizer.apply(source)
        if method == "none":
            assert out is source
            continue
        assert out.min() >= -1 and out.max() <= 1
        assert json.dumps(harmonizer.to_dict())  # JSON-ready record
    assert fit_harmonizer("zscore").clip is None  # robust z-scores are not clipped
    assert fit_harmonizer("nyul", [reference]).to_dict()["percentiles"] == list(NYUL_PERCENTILES)


# --- translate-time harmonisation on real volumes -----------------------------------------------------------------

@pytest.fixture(scope="module")
def small_case(tmp_path_factory):
    """A tiny in-process checkpoint, a crop of the real heart CT and a real reference MR."""
    need(HEART_CT, CARDIAC_MR)
    from ct2mr.models.checkpoint import save_checkpoint
    from ct2mr.networks import build_generator
    from ct2mr.preprocessing.pipeline import PreprocessingConfig

    root = tmp_path_factory.mktemp("harmonize")
    spec = {"name": "resnet", "base_channels": 2, "n_blocks": 1, "norm": "instance"}
    torch.manual_seed(0)
    model = save_checkpoint(root / "tiny.safetensors", {"G": build_generator(spec), "F": build_generator(spec)},
                            {"generator": spec, "discriminator": {}}, PreprocessingConfig(), {"roi_size": [32, 32, 32]},
                            {"name": "tiny"})
    ct = sitk.ReadImage(str(HEART_CT))[30:51, 30:51, 40:61]
    sitk.WriteImage(ct, str(root / "ct.nii.gz"))
    mr = sitk.ReadImage(str(CARDIAC_MR))[80:176, 80:176, 2:10]  # heart and lung bases, 8 of 12 slices
    sitk.WriteImage(mr, str(root / "cardiac_crop.nii.gz"))
    return {"model": model, "ct": root / "ct.nii.gz", "reference": root / "cardiac_crop.nii.gz", "root": root}


def test_translate_harmonised_synthetic_mr_is_closer_to_the_reference(small_case, tmp_path):
    from ct2mr.inference.harmonization import load_reference_mrs
    from ct2mr.inference.translate import translate_file
    from ct2mr.preprocessing.masks import body_mask

    plain = translate_file(small_case["ct"], tmp_path / "plain", small_case["model"])
    matched = translate_file(small_case["ct"], tmp_path / "hist", small_case["model"], harmonize="histogram",
                             reference_mr=small_case["reference"])
    assert plain["info"]["harmonization"] is None
    assert matched["info"]["harmonization"]["method"] == "histogram"
    assert matched["info"]["harmonization"]["references"] == ["cardiac_crop"]
    refs, masks, _ = load_reference_mrs([small_case["reference"]])
    real = intensity_histogram(refs[0][masks[0]])
    ct = sitk.ReadImage(str(small_case["ct"]))
    mask = body_mask(sitk.GetArrayFromImage(ct).astype(np.float32), "ct", normalised=False)
    scores = {}
    for key, result in (("plain", plain), ("histogram", matched)):
        image = sitk.ReadImage(result["outputs"]["synthetic_mr"])
        assert image.GetSize() == ct.GetSize() and image.GetSpacing() == pytest.approx(ct.GetSpacing())
        array = sitk.GetArrayFromImage(image)
        assert array.min() >= -1 and array.max() <= 1
        scores[key] = histogram_w1(intensity_histogram(array[mask]), real)
    assert scores["histogram"] < 0.5 * scores["plain"]
    # the round trip and error map do not depend on the harmonisation
    for key in ("roundtrip_ct", "error_map"):
        a = sitk.GetArrayFromImage(sitk.ReadImage(plain["outputs"][key]))
        b = sitk.GetArrayFromImage(sitk.ReadImage(matched["outputs"][key]))
        assert np.array_equal(a, b)


def test_translate_refuses_bad_harmonisation_before_writing(small_case, tmp_path):
    from ct2mr.inference.translate import translate_file

    with pytest.raises(ValueError, match="harmonize must be one of"):
        translate_file(small_case["ct"], tmp_path / "a", small_case["model"], harmonize="gamma")
    with pytest.raises(ValueError, match="--reference-mr"):
        translate_file(small_case["ct"], tmp_path / "b", small_case["model"], harmonize="nyul")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.slow
def test_cli_translate_with_harmonisation(small_case, tmp_path):
    proc = run_ct2mr("translate", str(small_case["ct"]), "-o", str(tmp_path / "out"), "--model",
                     str(small_case["model"]), "--harmonize", "nyul", "--reference-mr", str(small_case["reference"]),
                     "--progress", "json", check=True)
    done = json.loads(proc.stdout.splitlines()[-1])
    assert done["event"] == "done"
    array = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "synthetic_mr.nii.gz")))
    assert array.min() >= -1 and array.max() <= 1
    proc = run_ct2mr("translate", str(small_case["ct"]), "-o", str(tmp_path / "bad"), "--harmonize", "histogram",
                     "--progress", "none")
    assert proc.returncode == 1 and "--reference-mr" in proc.stderr and not (tmp_path / "bad").exists()
