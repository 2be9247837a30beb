"""Anatomy checks (thesis section 5, P1/E2; ct2mr.evaluation.anatomy) on real shared CTs, hand values, and the CLI end to end.

The controls stand in for G: a known non-monotone intensity remap of the CT moves no anatomy (the warp check must
report near zero), a known smooth 3 mm warp of it moves everything by 3 mm (the check must report about 3 mm), and
blurring removes fine structure (edge agreement must drop).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import SimpleITK as sitk

from ct2mr.evaluation.anatomy import (GMS_C, LUNG_KEYS, METRIC_KEYS, WARP_KEYS, WarpCheckSettings, anatomy_metrics,
                           bspline_registration, check_same_grid, edge_correlation, gradient_magnitude,
                           gradient_magnitude_similarity, lung_mask, normalized_mutual_information, warp_check)
from ct2mr.preprocessing.masks import body_mask
from ct2mr_testdata import ABDOMEN_MR, THORAX_CT, need, run_ct2mr

#: Faster than the defaults (10000 samples, 30 iterations), for the tests: ~15 s per registration on 2 busy cores.
TEST_SETTINGS = WarpCheckSettings(samples=5000, iterations=20)
#: Bounds, measured on the 3 mm thorax with TEST_SETTINGS (seeds 1 and 7, with and without resolution matching and
#: coefficient bounds) and set with margin: the remap control gave mean 0.20-0.35 mm, p95 0.37-0.62 mm (bounds 0.75
#: and 1.0 mm); the 3 mm warp |u| mean 2.79-3.01 mm, median 2.80-3.05 mm (tolerance 1 mm), and a vector error
#: |u + d| of mean 0.95-1.11 mm (bound 1.5 mm: control points every 50 mm cannot follow the twist exactly).
REMAP_MEAN_BOUND_MM = 0.75
REMAP_P95_BOUND_MM = 1.0
WARP_TRUTH_MM = 3.0
WARP_TOLERANCE_MM = 1.0
WARP_VECTOR_ERROR_BOUND_MM = 1.5


def _image_like(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(np.ascontiguousarray(array, np.float32))
    image.CopyInformation(reference)
    return image


def _remap(ct: sitk.Image) -> sitk.Image:
    """Known non-monotone intensity map: cos(2.5 pi n), n = HU through [-1000, 1000] to [0, 1].

    Air (n = 0) -> 1, lung (-850 HU) -> 0.72, fat (-100 HU) -> -0.63, soft tissue (40 HU) -> -0.99, bone -> up again:
    several tissue pairs swap order, so no monotone relation links the two images, yet nothing moves.
    """
    n = (np.clip(sitk.GetArrayFromImage(ct).astype(np.float32), -1000, 1000) + 1000) / 2000
    return _image_like(np.cos(2.5 * np.pi * n), ct)


def _resample_iso(image: sitk.Image, spacing: float) -> sitk.Image:
    """Anti-aliased resampling of a real CT to an isotropic grid (keeps origin and direction)."""
    size = [int(round(n * s / spacing)) for n, s in zip(image.GetSize(), image.GetSpacing())]
    smooth = sitk.SmoothingRecursiveGaussian(sitk.Cast(image, sitk.sitkFloat32), 0.4 * spacing)
    return sitk.Resample(smooth, size, sitk.Transform(), sitk.sitkLinear, image.GetOrigin(), [spacing] * 3,
                         image.GetDirection(), -1024.0, sitk.sitkFloat32)


@pytest.fixture(scope="module")
def thorax_3mm() -> sitk.Image:
    """The whole real thorax CTA, resampled to 3 mm (117 x 84 x 96 voxels): fast registrations."""
    need(THORAX_CT)
    return _resample_iso(sitk.ReadImage(str(THORAX_CT), sitk.sitkFloat32), 3.0)


@pytest.fixture(scope="module")
def thorax_crop() -> sitk.Image:
    """30 axial slices (45 mm) of the real 1.5 mm thorax CTA through both lungs, the heart and the chest wall.

    The whole axial extent is kept: the body mask fills the lungs as holes enclosed by the chest wall."""
    need(THORAX_CT)
    ct = sitk.ReadImage(str(THORAX_CT), sitk.sitkFloat32)
    return ct[:, :, 90:120]


# --- hand values ----------------------------------------------------------------------------------------------------

def test_nmi_hand_values():
    a = np.array([0.0, 0.0, 1.0, 1.0])
    assert normalized_mutual_information(a, a, bins=2) == pytest.approx(2.0, abs=1e-12)
    # independent: H(A) = H(B) = ln 2, H(A, B) = ln 4
    assert normalized_mutual_information(a, np.array([0.0, 1.0, 0.0, 1.0]), bins=2) == pytest.approx(1.0, abs=1e-12)
    # joint (0,0) 1/2, (0,1) 1/4, (1,1) 1/4
    b = np.array([0.0, 0.0, 1.0, 1.0])
    c = np.array([0.0, 0.0, 0.0, 1.0])
    h_c = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    expected = (h_c + math.log(2)) / (1.5 * math.log(2))
    assert normalized_mutual_information(c, b, bins=2) == pytest.approx(expected, abs=1e-12)


def test_nmi_of_real_ct_with_itself_is_two_and_with_independent_noise_about_one(thorax_crop):
    x = sitk.GetArrayFromImage(thorax_crop)
    assert normalized_mutual_information(x, x) == pytest.approx(2.0, abs=1e-9)
    rng = np.random.default_rng(0)
    noise = rng.uniform(size=x.shape)
    assert 1.0 <= normalized_mutual_information(x, noise) < 1.01
    assert 1.0 <= normalized_mutual_information(rng.uniform(size=x.shape), noise) < 1.01
    shuffled = rng.permutation(x.ravel()).reshape(x.shape)
    assert normalized_mutual_information(x, shuffled) < 1.01


def test_gradient_magnitude_is_in_units_per_mm_on_anisotropic_grids():
    spacing = (2.0, 1.0, 0.5)  # z, y, x mm
    z, y, x = np.meshgrid(*(np.arange(n) * s for n, s in zip((20, 24, 28), spacing)), indexing="ij")
    ramp = 3.0 * z + 4.0 * y + 0.0 * x  # |grad| = 5 per mm everywhere
    grad = gradient_magnitude(ramp, spacing, sigma_mm=1.0)
    np.testing.assert_allclose(grad[4:-4, 6:-6, 8:-8], 5.0, rtol=1e-4)
    with pytest.raises(ValueError):
        gradient_magnitude(ramp[0], spacing)
    with pytest.raises(ValueError):
        gradient_magnitude(ramp, (1.0, 0.0, 1.0))


def test_edge_correlation_and_gms_of_identical_and_rescaled_images(thorax_crop):
    x = sitk.GetArrayFromImage(thorax_crop)
    spacing = thorax_crop.GetSpacing()[::-1]
    body = body_mask(x, "ct", normalised=False)
    assert edge_correlation(x, x, body, spacing) == pytest.approx(1.0, abs=1e-9)
    assert edge_correlation(x, -3.7 * x + 100.0, body, spacing) == pytest.approx(1.0, abs=1e-6)
    n = np.clip(x, -1000, 1000) / 1000
    gms, gmsd = gradient_magnitude_similarity(n, n, body, spacing)
    assert gms == pytest.approx(1.0, abs=1e-12) and gmsd == pytest.approx(0.0, abs=1e-12)
    gms_half, _ = gradient_magnitude_similarity(n, 0.5 * n, body, spacing)
    assert gms_half < 0.98  # GMS, unlike the correlation, sees a change of edge contrast
    # hand value on a ramp of 0.01 per mm (x in mm): GMS = (2 g g/2 + c) / (g^2 + g^2/4 + c), GMSD 0
    ramp = np.broadcast_to(0.01 * np.arange(40, dtype=np.float64) * 1.5, (10, 12, 40))
    inner = np.zeros(ramp.shape, bool)
    inner[3:-3, 3:-3, 3:-3] = True
    g, c = 0.01, GMS_C
    gms_ramp, gmsd_ramp = gradient_magnitude_similarity(ramp, 0.5 * ramp, inner, (1.5, 1.5, 1.5))
    assert gms_ramp == pytest.approx((g * g + c) / (1.25 * g * g + c), rel=1e-5) and gmsd_ramp < 1e-6
    with pytest.raises(ValueError, match="empty"):
        edge_correlation(x, x, np.zeros(x.shape, bool), spacing)
    with pytest.raises(ValueError, match="same shape"):
        edge_correlation(x, x[1:], None, spacing)


def test_grid_mismatch_raises_a_clear_value_error(thorax_crop):
    mr = _remap(thorax_crop)
    for change in ("size", "spacing", "origin", "direction"):
        other = mr[1:] if change == "size" else sitk.Image(mr)
        if change == "spacing":
            other.SetSpacing([1.0, 1.5, 1.5])
        elif change == "origin":
            other.SetOrigin([o + 3.0 for o in mr.GetOrigin()])
        elif change == "direction":
            other.SetDirection([-1, 0, 0, 0, 1, 0, 0, 0, 1])
        with pytest.raises(ValueError, match=f"same voxel grid.*{change}"):
            anatomy_metrics(thorax_crop, other)
        with pytest.raises(ValueError, match="same voxel grid"):
            check_same_grid(thorax_crop, other)
    with pytest.raises(ValueError, match="body mask shape"):
        anatomy_metrics(thorax_crop, mr, body=np.ones((2, 2, 2), bool))


# --- real CT controls -----------------------------------------------------------------------------------------------

def test_edge_agreement_and_nmi_drop_when_structures_are_blurred_away(thorax_crop):
    """G = remap keeps every edge in place; G = remap of a 4 mm-blurred CT loses the fine ones (vessels, fissures)."""
    remapped = _remap(thorax_crop)
    blurred = _remap(sitk.SmoothingRecursiveGaussian(thorax_crop, 4.0))
    sharp, _ = anatomy_metrics(thorax_crop, remapped, lung=True)
    soft, _ = anatomy_metrics(thorax_crop, blurred, lung=True)
    print("remap:", {k: round(v, 3) for k, v in sharp.items()}, "\nblurred remap:", {k: round(v, 3) for k, v in
                                                                                    soft.items()})
    assert set(METRIC_KEYS) | set(LUNG_KEYS) <= set(sharp)
    assert sharp["lung_voxels"] > 0.1 * np.prod(thorax_crop.GetSize())
    assert sharp["edge_correlation"] > 0.7
    assert soft["edge_correlation"] < sharp["edge_correlation"] - 0.2
    assert soft["gmsd"] > sharp["gmsd"] + 0.03  # measured 0.127 -> 0.177
    assert soft["edge_correlation_lung"] < sharp["edge_correlation_lung"] - 0.2  # measured 0.80 -> 0.31
    assert sharp["nmi"] > soft["nmi"] > 1.0
    # G = identity vs G = blur: the mean GMS drops too (flat regions, where both gradients are small, keep it high)
    def as_g(image: sitk.Image) -> sitk.Image:  # the CT itself as "G(x)", in [-1, 1] like the metrics' CT
        return _image_like(np.clip(sitk.GetArrayFromImage(image), -1000, 1000) / 1000, image)

    same, _ = anatomy_metrics(thorax_crop, as_g(thorax_crop))
    smooth, _ = anatomy_metrics(thorax_crop, as_g(sitk.SmoothingRecursiveGaussian(thorax_crop, 4.0)))
    print("identity:", {k: round(v, 3) for k, v in same.items()}, "\nblurred:", {k: round(v, 3) for k, v in
                                                                                  smooth.items()})
    assert same["edge_correlation"] == pytest.approx(1.0)
    assert same["gradient_magnitude_similarity"] == pytest.approx(1.0)
    assert smooth["edge_correlation"] < 0.8 and smooth["gradient_magnitude_similarity"] < 0.95  # measured 0.64, 0.92
    # the non-monotone remap keeps a strong dependence: NMI far above a shuffled "G(x)"
    noise = np.random.default_rng(1).permutation(sitk.GetArrayFromImage(remapped).ravel())
    shuffled, _ = anatomy_metrics(thorax_crop, _image_like(noise.reshape(remapped.GetSize()[::-1]), thorax_crop))
    assert sharp["nmi"] > 1.4 and shuffled["nmi"] < 1.02 and shuffled["edge_correlation"] < 0.2


def test_lung_mask_holds_the_lungs_with_their_vessels(thorax_crop):
    x = sitk.GetArrayFromImage(thorax_crop)
    body = body_mask(x, "ct", normalised=False)
    lungs = lung_mask(x, body)
    assert lungs.any() and not (lungs & ~body).any()
    assert np.median(x[lungs]) < -600  # aerated lung
    assert (x[lungs] > -400).mean() > 0.01  # vessels inside are filled in
    assert not lung_mask(np.full(x.shape, 40.0, np.float32), body).any()


@pytest.mark.slow
def test_warp_check_reports_near_zero_for_a_non_monotone_remap(thorax_3mm):
    remapped = _remap(thorax_3mm)
    magnitude, stats = warp_check(thorax_3mm, remapped, None, TEST_SETTINGS)
    print(f"remap control: mean {stats['displacement_mean_mm']:.3f} mm, p95 {stats['displacement_p95_mm']:.3f} mm, "
          f"max {stats['displacement_max_mm']:.3f} mm in {stats['warp_settings']['seconds']:.1f} s")
    assert set(WARP_KEYS) <= set(stats)
    for what in ("GetSize", "GetSpacing", "GetOrigin", "GetDirection"):
        assert getattr(magnitude, what)() == getattr(thorax_3mm, what)()
    assert magnitude.GetPixelID() == sitk.sitkFloat32
    assert stats["displacement_mean_mm"] < REMAP_MEAN_BOUND_MM
    assert stats["displacement_p95_mm"] < REMAP_P95_BOUND_MM


def test_resolution_matching_is_repeatable_and_keeps_a_sharp_g_unsmoothed(thorax_3mm):
    """The warp check smooths x to G(x)'s resolution; a sharp G(x) (a remap of x itself) must keep x unsmoothed, in
    every call. Regression: a NumPy view of a temporary SimpleITK image read freed memory in about half the
    processes (correlation 0.003 instead of 0.73 at sigma 0 on a real G(x), so x was smoothed by 3 mm and the
    displacement p95 of the default model read 5.5 mm instead of 1.2 mm)."""
    from ct2mr.evaluation.anatomy import _match_resolution

    mask = sitk.Cast(thorax_3mm > -500, sitk.sitkUInt8)
    moving = _remap(thorax_3mm)
    runs = []
    for _ in range(4):
        _, sigma, correlations = _match_resolution(thorax_3mm, moving, mask, (0.0, 1.5, 3.0, 6.0))
        junk = [np.random.default_rng(0).random(2_000_000) for _ in range(3)]  # reuse freed memory, as a run does
        runs.append((sigma, correlations))
        del junk
    print("resolution matching:", runs[0])
    assert all(run == runs[0] for run in runs)
    assert runs[0][0] == 0.0
    values = list(runs[0][1].values())  # finer to coarser: a sharp G(x) correlates less with every blur
    assert all(a > b for a, b in zip(values, values[1:])), runs[0][1]


def _twist_field(image: sitk.Image, amplitude_mm: float) -> np.ndarray:
    """(z, y, x, 3) displacement (x, y, z components, mm) of constant length ``amplitude_mm``, whose direction turns
    smoothly in the axial plane with z (wavelength 200 mm) and y (300 mm): not a translation, but smooth."""
    size, spacing = image.GetSize(), image.GetSpacing()
    z = np.arange(size[2])[:, None, None] * spacing[2]
    y = np.arange(size[1])[None, :, None] * spacing[1]
    theta = np.broadcast_to(2 * np.pi * (z / 200.0 + y / 300.0), (size[2], size[1], size[0]))
    field = np.zeros(theta.shape + (3,), np.float64)
    field[..., 0], field[..., 1] = amplitude_mm * np.cos(theta), amplitude_mm * np.sin(theta)
    return field


@pytest.mark.slow
def test_warp_check_reports_a_known_smooth_3mm_warp(thorax_3mm):
    remapped = _remap(thorax_3mm)
    body = body_mask(sitk.GetArrayFromImage(thorax_3mm), "ct", normalised=False)
    d = _twist_field(thorax_3mm, WARP_TRUTH_MM)
    field = sitk.GetImageFromArray(d, isVector=True)
    field.CopyInformation(thorax_3mm)
    # warped(p) = remapped(p + d(p)): the anatomy at p moved to p - d(p)
    background = float(np.median(sitk.GetArrayViewFromImage(remapped)[~body]))
    warped = sitk.Resample(remapped, remapped, sitk.DisplacementFieldTransform(field), sitk.sitkLinear, background)
    magnitude, stats = warp_check(thorax_3mm, warped, body, TEST_SETTINGS)
    transform, _ = bspline_registration(thorax_3mm, warped, body, TEST_SETTINGS)
    u = sitk.GetArrayFromImage(sitk.TransformToDisplacementField(
        transform, sitk.sitkVectorFloat64, thorax_3mm.GetSize(), thorax_3mm.GetOrigin(), thorax_3mm.GetSpacing(),
        thorax_3mm.GetDirection()))
    # deterministic (seeded sampling): the second registration is the first one again
    np.testing.assert_allclose(np.linalg.norm(u, axis=-1), sitk.GetArrayFromImage(magnitude), atol=1e-3)
    error = np.linalg.norm(u + d, axis=-1)[body]  # T(p) ~ p - d(p) recovers the warp
    print(f"3 mm warp: |u| mean {stats['displacement_mean_mm']:.3f} mm, p95 {stats['displacement_p95_mm']:.3f} mm; "
          f"|u + d| mean {error.mean():.3f} mm, p95 {np.percentile(error, 95):.3f} mm")
    assert abs(stats["displacement_mean_mm"] - WARP_TRUTH_MM) < WARP_TOLERANCE_MM
    assert abs(float(np.median(sitk.GetArrayViewFromImage(magnitude)[body])) - WARP_TRUTH_MM) < WARP_TOLERANCE_MM
    assert error.mean() < WARP_VECTOR_ERROR_BOUND_MM


def test_warp_check_settings_are_validated():
    with pytest.raises(ValueError):
        WarpCheckSettings(mesh_spacing_mm=0)
    with pytest.raises(ValueError):
        WarpCheckSettings(shrink_factors=(2, 1), smoothing_sigmas_mm=(1.0,))
    with pytest.raises(ValueError):
        WarpCheckSettings(samples=10)


# --- CLI end to end ---------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_translate_and_evaluate_warp_check_end_to_end(tiny_checkpoint, tmp_path):
    need(ABDOMEN_MR)
    from ct2mr.inference.translate import OUTPUT_NAMES

    crop = tmp_path / "ct_crop.nii.gz"
    ct = sitk.ReadImage(str(THORAX_CT))
    ct = ct[70:150, 40:110, 100:120]  # 120 x 105 x 30 mm around the heart and central lungs
    sitk.WriteImage(ct, str(crop))
    out = tmp_path / "out"
    proc = run_ct2mr("translate", str(crop), "-o", str(out), "--model", str(tiny_checkpoint), "--warp-check",
                     "--progress", "json", check=True)
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    done = events[-1]
    assert done["event"] == "done" and set(WARP_KEYS) <= set(done["anatomy"])
    assert sorted(p.name for p in out.iterdir()) == sorted([*OUTPUT_NAMES.values(), "displacement_mm.nii.gz",
                                                            "anatomy.json"])
    displacement = sitk.ReadImage(str(out / "displacement_mm.nii.gz"))
    assert displacement.GetPixelID() == sitk.sitkFloat32 and displacement.GetSize() == ct.GetSize()
    np.testing.assert_allclose(displacement.GetSpacing(), ct.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(displacement.GetOrigin(), ct.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(displacement.GetDirection(), ct.GetDirection(), atol=1e-6)
    anatomy = json.loads((out / "anatomy.json").read_text())
    assert set(METRIC_KEYS) | set(WARP_KEYS) | set(LUNG_KEYS) <= set(anatomy)
    assert {"mesh_spacing_mm", "working_spacing_mm", "iterations", "seconds"} <= set(anatomy["warp_settings"])
    # the statistics are over the body mask, the map covers the whole grid
    assert anatomy["displacement_max_mm"] <= float(sitk.GetArrayViewFromImage(displacement).max()) + 1e-3
    proc = run_ct2mr("translate", str(crop), "-o", str(tmp_path / "plain"), "--model", str(tiny_checkpoint),
                     "--progress", "none", check=True)
    assert "Anatomy" not in proc.stdout and not (tmp_path / "plain" / "anatomy.json").exists()

    mr = tmp_path / "mr.nii.gz"
    sitk.WriteImage(sitk.ReadImage(str(ABDOMEN_MR))[30:70, 20:60, 2:18], str(mr))
    run_ct2mr("evaluate", "--model", str(tiny_checkpoint), "--ct", str(crop), "--mr", str(mr), "--out",
              str(tmp_path / "eval"), "--warp-check", "--patches-per-volume", "4", "--patch-size", "16",
              "--kid-subsets", "2", "--harmonize", "none", "--no-baselines", "--no-figures", "--no-tensorboard",
              "--progress", "none", check=True)
    import csv

    rows = list(csv.DictReader((tmp_path / "eval" / "per_volume.csv").open()))
    ct_row = next(r for r in rows if r["direction"] == "CT→MR")
    for key in ("edge_correlation", "gradient_magnitude_similarity", "gmsd", "nmi"):
        assert ct_row[key] != "" and math.isfinite(float(ct_row[key]))
    # the tiny model's G(x) may leave the registration nothing to hold on to: then the displacement is empty (NaN)
    assert {"displacement_mean_mm", "displacement_p95_mm"} <= set(ct_row)
    table = list(csv.DictReader((tmp_path / "eval" / "table.csv").open()))
    assert {"edge_correlation", "nmi", "displacement_mean_mm", "displacement_p95_mm"} <= set(table[0])
    assert any(r["edge_correlation"] for r in table)
    assert "Anatomy preservation" in (tmp_path / "eval" / "table.md").read_text()
