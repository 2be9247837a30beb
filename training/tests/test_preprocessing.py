"""The preprocessing chain (thesis section 4) and its exact inverse onto the input grid."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import SimpleITK as sitk

from ct2mr.io.images import read_image
from ct2mr.preprocessing.pipeline import (FlatVolumeWarning, PreprocessingConfig, normalize_ct, normalize_mr, pad_to_multiple,
                                 preprocess, resample_isotropic, restore_to_input_grid, robust_background)

from ct2mr_testdata import CARDIAC_MR, LUNG_CT, THORAX_CT, need


def _same_grid(a: sitk.Image, b: sitk.Image) -> None:
    assert a.GetSize() == b.GetSize()
    assert a.GetSpacing() == b.GetSpacing()
    assert a.GetOrigin() == b.GetOrigin()
    assert a.GetDirection() == b.GetDirection()


@pytest.mark.parametrize("path, modality", [(THORAX_CT, "ct"), (LUNG_CT, "ct"), (CARDIAC_MR, "mr")],
                         ids=["axis-aligned CT", "thick-slice CT", "oblique cardiac MR"])
def test_forward_then_inverse_returns_the_input_grid_exactly(path, modality):
    need(path)
    image = read_image(path)
    pre = preprocess(image, modality)
    assert pre.array.dtype == np.float32
    assert all(n % 16 == 0 for n in pre.array.shape)
    assert pre.array.min() == pytest.approx(-1.0) and pre.array.max() == pytest.approx(1.0)
    restored = restore_to_input_grid(pre.array, pre.record)
    _same_grid(restored, image)
    # intensities survive the 1 mm round trip up to interpolation
    x = sitk.GetArrayFromImage(image).astype(np.float32)
    ref = normalize_ct(x) if modality == "ct" else normalize_mr(x, reference=x)[0]
    error = np.abs(sitk.GetArrayFromImage(restored) - ref)
    assert error.mean() < 0.05


def test_oblique_mr_is_reoriented_to_ras_without_interpolating_its_axes():
    need(CARDIAC_MR)
    pre = preprocess(read_image(CARDIAC_MR), "mr")
    direction = np.asarray(pre.record.padded_grid["direction"]).reshape(3, 3)
    # RAS in LPS physical space: first axis towards -x (right), second towards -y (anterior), third +z (superior)
    assert direction[0, 0] < 0 and direction[1, 1] < 0 and direction[2, 2] > 0
    code = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(pre.record.padded_grid["direction"])
    assert code == "RAS"
    # no interpolation across the oblique axes: the spacing is isotropic and the residual rotation is kept
    assert pre.record.resampled_grid["direction"] == pre.record.padded_grid["direction"]
    assert not np.allclose(np.abs(direction), np.eye(3))


def test_rounding_rule_and_record_on_the_thick_slice_ct():
    need(LUNG_CT)
    image = read_image(LUNG_CT)  # 512 x 512 x 61 at 0.627 x 0.627 x 5 mm
    pre = preprocess(image, "ct")
    expected = [round(512 * 0.6269531), round(512 * 0.6269531), round(61 * 5.0)]
    assert pre.record.resampled_grid["size"] == expected == [321, 321, 305]
    assert pre.record.resampled_grid["spacing"] == [1.0, 1.0, 1.0]
    assert pre.record.padded_grid["size"] == [336, 336, 320]
    assert pre.record.pad_before == [7, 7, 7] and pre.record.pad_after == [8, 8, 8]
    assert pre.record.default_value == float(sitk.GetArrayViewFromImage(image).min())  # integer image: minimum
    assert pre.record.config == PreprocessingConfig().to_dict()


@pytest.mark.parametrize("shape, k, before, after", [
    ((10, 16, 17), 16, [3, 0, 7], [3, 0, 8]),
    ((1, 5, 32), 8, [3, 1, 0], [4, 2, 0]),
])
def test_padding_is_symmetric_to_a_multiple_of_k(shape, k, before, after):
    array = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    padded, b, a = pad_to_multiple(array, k, value=array.min())
    assert (b, a) == (before, after)
    assert all(n % k == 0 for n in padded.shape)
    inner = padded[tuple(slice(x, x + n) for x, n in zip(b, shape))]
    np.testing.assert_array_equal(inner, array)
    assert padded[0, 0, 0] == array.min() or b == [0, 0, 0]


def test_ct_window_maps_to_minus_one_and_one():
    hu = np.array([-2000, -600, 200, 1000, 3000], np.float32)
    np.testing.assert_allclose(normalize_ct(hu), [-1, -1, 0, 1, 1], atol=1e-6)
    np.testing.assert_allclose(normalize_ct(hu, (-1000, 1000)), [-1, -0.6, 0.2, 1, 1], atol=1e-6)


def test_mr_percentiles_map_to_minus_one_and_one_and_flat_volume_is_flagged():
    values = np.arange(101, dtype=np.float32)  # P1 = 1, P99 = 99
    out, lo, hi, flat = normalize_mr(values)
    assert (lo, hi, flat) == (1.0, 99.0, False)
    assert out[0] == -1 and out[1] == -1 and out[50] == pytest.approx(0.0) and out[100] == 1
    with pytest.warns(FlatVolumeWarning, match="flat"):
        out, lo, hi, flat = normalize_mr(np.full(50, 7.0, np.float32))
    assert flat and not out.any()


def test_flat_mr_volume_gives_zeros_and_flag():
    image = sitk.Image(20, 20, 20, sitk.sitkFloat32) + 5.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FlatVolumeWarning)
        pre = preprocess(image, "mr")
    assert pre.record.flat and not pre.array.any()


def test_robust_background_is_median_for_float_and_minimum_for_integer():
    ints = sitk.GetImageFromArray(np.array([[[-1024, 0, 50, 60]]], np.int16))
    floats = sitk.Cast(ints, sitk.sitkFloat32)
    assert robust_background(ints) == -1024.0
    assert robust_background(floats) == 25.0


def test_resampling_keeps_origin_and_direction():
    image = sitk.Image(10, 10, 4, sitk.sitkInt16)
    image.SetSpacing((0.5, 0.5, 3.0))
    image.SetOrigin((10.0, 20.0, 30.0))
    out = resample_isotropic(image, 1.0)
    assert out.GetSize() == (5, 5, 12)
    assert out.GetOrigin() == image.GetOrigin() and out.GetDirection() == image.GetDirection()


@pytest.mark.parametrize("kwargs, match", [
    ({"k": 0}, "k must be"), ({"ct_window": (1000, -600)}, "ct_window"), ({"mr_percentiles": (99, 1)}, "percentiles"),
    ({"target_spacing": -1}, "target_spacing"), ({"n4_shrink": 0}, "n4_shrink"),
    ({"n4_iterations": ()}, "n4_iterations"), ({"n4": "yes"}, "n4 must be"),
])
def test_bad_parameters_are_refused_up_front(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PreprocessingConfig(**kwargs)


def test_unknown_modality_is_refused():
    with pytest.raises(ValueError, match="modality must be one of"):
        preprocess(sitk.Image(8, 8, 8, sitk.sitkFloat32), "pet")


def test_config_round_trips_through_its_dict_and_old_dicts_get_the_defaults():
    config = PreprocessingConfig(k=32, mr_percentiles=(0.5, 99.5), n4=True, n4_shrink=2, n4_iterations=(20, 10))
    assert PreprocessingConfig.from_dict(config.to_dict()) == config
    assert config.to_dict()["n4_iterations"] == [20, 10]
    old = {"target_spacing": 1.0, "k": 16, "ct_window": [-600.0, 1000.0], "mr_percentiles": [1.0, 99.0],
           "orientation": "RAS", "flat_tolerance": 1e-06}  # a checkpoint written before N4 existed
    assert PreprocessingConfig.from_dict(old) == PreprocessingConfig()


def test_n4_applies_to_mr_only():
    image = sitk.Image(24, 24, 24, sitk.sitkFloat32) + 100.0
    pre = preprocess(image, "ct", PreprocessingConfig(n4=True))
    assert pre.record.extra["n4"] is False and pre.record.config["n4"] is True
