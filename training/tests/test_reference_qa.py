"""QA against a registered reference MR (issue 16): MS-SSIM, the paired metrics and `ct2mr qa`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy import ndimage

from ct2mr.evaluation.metrics import ssim3d
from ct2mr.evaluation.reference_qa import (MS_SSIM_WEIGHTS, QA_FILES, ms_ssim3d, normalise_reference, paired_metrics,
                                same_grid)

from ct2mr_testdata import ABDOMEN_MR, HEART_CT, need, run_ct2mr, assert_on_grid


def _smooth(shape, seed, sigma=2.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    a = ndimage.gaussian_filter(rng.normal(size=shape), sigma).astype(np.float32)
    return a / np.abs(a).max()


def test_ms_ssim_of_identical_volumes_is_one_and_it_falls_with_noise():
    a = _smooth((40, 48, 36), 0)
    assert ms_ssim3d(a, a) == pytest.approx(1.0, abs=1e-6)
    values = [ms_ssim3d(a, np.clip(a + level * _smooth(a.shape, 1, 1.0), -1, 1)) for level in (0.1, 0.3, 1.0)]
    assert values[0] > values[1] > values[2] > 0
    assert ms_ssim3d(a, np.clip(a + 0.3 * _smooth(a.shape, 1, 1.0), -1, 1)) == pytest.approx(
        ms_ssim3d(np.clip(a + 0.3 * _smooth(a.shape, 1, 1.0), -1, 1), a), abs=1e-9)  # symmetric


def test_single_scale_ms_ssim_inside_the_border_is_the_engines_ssim():
    """With one scale, MS-SSIM is SSIM; away from the border (replicate vs valid filtering) both agree exactly."""
    a = _smooth((40, 40, 40), 2)
    b = np.clip(a + 0.4 * _smooth(a.shape, 3, 1.0), -1, 1)
    mask = np.zeros(a.shape, bool)
    mask[8:30, 10:32, 6:28] = True
    assert ms_ssim3d(a, b, mask=mask, weights=(1.0,), shift=0.0) == pytest.approx(ssim3d(a, b, 2.0, mask), abs=1e-5)


@pytest.mark.parametrize(("noise", "tolerance"), [(0.3, 0.005), (1.0, 0.03)])
def test_ms_ssim_agrees_with_monai(noise, tolerance):
    """MONAI's MultiScaleSSIMMetric on [0, 2]: the same up to the border, which MONAI leaves out at every scale
    (valid filtering: at the third scale of a 64^3 volume only the central 6^3 of 16^3 voxels) and ms_ssim3d
    keeps (replicate padding); the more the volumes differ, the more that matters."""
    from monai.metrics import MultiScaleSSIMMetric

    a = _smooth((64, 64, 64), 4)
    b = np.clip(a + noise * _smooth(a.shape, 5, 1.0), -1, 1)
    weights = (0.2, 0.3, 0.5)
    metric = MultiScaleSSIMMetric(spatial_dims=3, data_range=2.0, weights=weights)
    reference = float(metric(torch.from_numpy(b + 1)[None, None], torch.from_numpy(a + 1)[None, None]).mean())
    assert ms_ssim3d(a, b, weights=weights) == pytest.approx(reference, abs=tolerance)


def test_ms_ssim_with_a_mask_ignores_what_lies_outside():
    a = _smooth((48, 48, 48), 6)
    b = a.copy()
    b[:, :, :16] = -a[:, :, :16]  # wrong outside the mask only
    mask = np.zeros(a.shape, bool)
    mask[4:44, 4:44, 30:44] = True
    fill = np.where(mask, a, -1), np.where(mask, b, -1)
    assert ms_ssim3d(*fill, mask=mask) == pytest.approx(1.0, abs=1e-6)
    assert ms_ssim3d(a, b) < 0.9


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"weights": ()}, "at least one"), ({"mask": np.zeros((20, 20, 20), bool)}, "empty"),
])
def test_ms_ssim_refuses_bad_input(kwargs, message):
    a = np.zeros((20, 20, 20), np.float32)
    with pytest.raises(ValueError, match=message):
        ms_ssim3d(a, a, **kwargs)
    with pytest.raises(ValueError, match="too small"):
        ms_ssim3d(np.zeros((8, 40, 40)), np.zeros((8, 40, 40)), weights=MS_SSIM_WEIGHTS)


def test_reference_normalisation_is_the_models_mr_preprocessing():
    ramp = np.arange(101, dtype=np.float32).reshape(1, 1, 101)  # percentiles of 0..100 are the values themselves
    out, (lo, hi) = normalise_reference(ramp, (1, 99))
    assert (lo, hi) == (pytest.approx(1.0), pytest.approx(99.0))
    assert out[0, 0, 0] == -1 and out[0, 0, 100] == 1 and out[0, 0, 50] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="flat"):
        normalise_reference(np.ones((3, 3, 3)))
    with pytest.raises(ValueError, match="increasing"):
        normalise_reference(ramp, (99, 1))


def test_paired_metrics_have_known_values():
    a = _smooth((32, 32, 32), 7) * 0.5
    mask = np.zeros(a.shape, bool)
    mask[4:28, 4:28, 4:28] = True
    same = paired_metrics(a, a, mask)
    assert same["mae"] == 0 and same["psnr_db"] == math.inf and same["ssim"] == pytest.approx(1.0)
    assert same["ms_ssim"] == pytest.approx(1.0) and same["voxels"] == 24 ** 3
    offset = paired_metrics(a + 0.1, a, mask)
    assert offset["mae"] == pytest.approx(0.1, abs=1e-6)
    assert offset["psnr_db"] == pytest.approx(10 * math.log10(4 / 0.01), abs=1e-3)
    assert offset["ssim"] < 1 and offset["ms_ssim"] < 1
    clipped = paired_metrics(np.full(a.shape, 5.0, np.float32), np.ones(a.shape, np.float32), mask)
    assert clipped["mae"] == 0  # both clipped to [-1, 1]


def test_same_grid_names_what_differs():
    a = sitk.Image(10, 10, 10, sitk.sitkFloat32)
    assert same_grid(a, a) is None
    b = sitk.Image(10, 10, 11, sitk.sitkFloat32)
    assert "size" in same_grid(a, b)
    c = sitk.Image(a)
    c.SetSpacing((1, 1, 1.1))
    assert "spacing" in same_grid(a, c)
    d = sitk.Image(a)
    d.SetOrigin((0, 0, 0.5))
    assert "origin" in same_grid(a, d)
    e = sitk.Image(a)
    e.SetDirection((0, 1, 0, 1, 0, 0, 0, 0, 1))
    assert "direction" in same_grid(a, e)


@pytest.fixture()
def mr_pair(tmp_path) -> tuple[Path, Path, np.ndarray]:
    """A real MR as the reference and a 'synthetic MR' on its grid: its normalised intensities, blurred, + 0.05."""
    need(ABDOMEN_MR)
    reference = sitk.ReadImage(str(ABDOMEN_MR))
    normalised, _ = normalise_reference(sitk.GetArrayFromImage(reference).astype(np.float32))
    synthetic = np.clip(ndimage.gaussian_filter(normalised, 1.0) + 0.05, -1, 1).astype(np.float32)
    image = sitk.GetImageFromArray(synthetic)
    image.CopyInformation(reference)
    path = tmp_path / "synthetic_mr.nii.gz"
    sitk.WriteImage(image, str(path))
    return path, ABDOMEN_MR, synthetic - normalised


def test_qa_command_writes_the_difference_and_the_table(mr_pair, tmp_path):
    synthetic, reference, expected_difference = mr_pair
    out = tmp_path / "qa"
    proc = run_ct2mr("qa", str(synthetic), str(reference), "-o", str(out), "--progress", "json", check=True)
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    assert events[0]["event"] == "start" and events[-1]["event"] == "done"
    assert sorted(p.name for p in out.iterdir()) == sorted(QA_FILES.values())
    difference = assert_on_grid(out / QA_FILES["difference"], sitk.ReadImage(str(reference)))
    np.testing.assert_allclose(difference, expected_difference, atol=1e-5)
    table = json.loads((out / QA_FILES["metrics_json"]).read_text())
    metrics = table["metrics"]
    assert metrics == events[-1]["metrics"]
    assert 0.03 < metrics["mae"] < 0.3 and 10 < metrics["psnr_db"] < 40
    assert 0 < metrics["ssim"] < 1 and 0 < metrics["ms_ssim"] < 1
    assert "Otsu" in table["mask"]["source"] and table["mask"]["voxels"] > 1000
    assert table["reference_normalisation"]["percentiles"] == [1.0, 99.0]
    for key in ("mae", "psnr_db", "ssim", "ms_ssim", "difference", "mask"):
        assert table["definitions"][key]
    markdown = (out / QA_FILES["metrics_md"]).read_text()
    assert "| MAE (normalised) | PSNR (dB) | SSIM | MS-SSIM | voxels |" in markdown and "clipped" in markdown


def test_qa_of_a_reference_against_itself_is_perfect(tmp_path):
    need(ABDOMEN_MR)
    out = tmp_path / "qa"
    reference = sitk.ReadImage(str(ABDOMEN_MR))
    normalised, _ = normalise_reference(sitk.GetArrayFromImage(reference).astype(np.float32))
    image = sitk.GetImageFromArray(normalised)
    image.CopyInformation(reference)
    sitk.WriteImage(image, str(tmp_path / "same.nii.gz"))
    run_ct2mr("qa", str(tmp_path / "same.nii.gz"), str(ABDOMEN_MR), "-o", str(out), check=True)
    metrics = json.loads((out / QA_FILES["metrics_json"]).read_text())["metrics"]
    assert metrics["mae"] == pytest.approx(0, abs=1e-6) and metrics["psnr_db"] is None  # inf is written as null
    assert metrics["ssim"] == pytest.approx(1.0, abs=1e-5) and metrics["ms_ssim"] == pytest.approx(1.0, abs=1e-5)


def test_qa_refuses_a_reference_on_another_grid_and_writes_nothing(mr_pair, tmp_path):
    synthetic, _, _ = mr_pair
    need(HEART_CT)
    out = tmp_path / "qa"
    proc = run_ct2mr("qa", str(synthetic), str(HEART_CT), "-o", str(out))
    assert proc.returncode == 1 and "not on the synthetic MR's grid" in proc.stderr and "size" in proc.stderr
    assert not out.exists(), "a folder the failed run created is removed again"
    proc = run_ct2mr("qa", str(synthetic), str(ABDOMEN_MR), "--ct", str(HEART_CT), "-o", str(out))
    assert proc.returncode == 1 and "The CT is not on the synthetic MR's grid" in proc.stderr


def test_qa_with_a_label_map_uses_exactly_its_voxels(mr_pair, tmp_path):
    synthetic, reference, _ = mr_pair
    ref_image = sitk.ReadImage(str(reference))
    label = np.zeros(sitk.GetArrayViewFromImage(ref_image).shape, np.uint8)
    label[5:15, 30:60, 30:80] = 1
    label_image = sitk.GetImageFromArray(label)
    label_image.CopyInformation(ref_image)
    sitk.WriteImage(label_image, str(tmp_path / "label.nrrd"))
    out = tmp_path / "qa"
    run_ct2mr("qa", str(synthetic), str(reference), "--mask", str(tmp_path / "label.nrrd"), "-o", str(out),
              check=True)
    table = json.loads((out / QA_FILES["metrics_json"]).read_text())
    assert table["mask"]["voxels"] == int(label.sum()) and table["mask"]["source"].startswith("label map")


def test_qa_with_the_ct_uses_the_cts_body_mask(tmp_path):
    """The usual case: CT, its synthetic MR and the registered MR share the CT's grid; the CT gives the body mask."""
    need(HEART_CT)
    from ct2mr.preprocessing.masks import body_mask

    ct = sitk.ReadImage(str(HEART_CT))
    hu = sitk.GetArrayFromImage(ct).astype(np.float32)
    images = {}
    for name, values in (("synthetic", np.tanh(hu / 400.0)), ("reference", 100.0 + 0.3 * np.clip(hu, -200, 400))):
        image = sitk.GetImageFromArray(values.astype(np.float32))
        image.CopyInformation(ct)
        images[name] = tmp_path / f"{name}.nii.gz"
        sitk.WriteImage(image, str(images[name]))
    out = tmp_path / "qa"
    run_ct2mr("qa", str(images["synthetic"]), str(images["reference"]), "--ct", str(HEART_CT), "-o", str(out),
              check=True)
    table = json.loads((out / QA_FILES["metrics_json"]).read_text())
    assert table["mask"]["source"].startswith("body mask of the CT")
    assert table["mask"]["voxels"] == int(body_mask(hu, "ct", normalised=False).sum())
    assert table["mask"]["volume_ml"] == pytest.approx(table["mask"]["voxels"] * 1.5 ** 3 / 1000, rel=1e-3)
    assert_on_grid(out / QA_FILES["difference"], ct)
    assert 0 < table["metrics"]["ms_ssim"] < 1
