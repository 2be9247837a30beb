"""Anatomy preservation checks that do not depend on contrast (thesis section 5, property P1, evaluation E2).

The thesis's central claim is an appearance-only mapping: the generator G (CT -> MR) changes intensities but must not
move vessels, fissures or the chest wall (P1). Cycle metrics cannot show it, because G and F could warp and unwarp
again. These checks compare the input CT x with its translation G(x) directly, in ways that do not assume any
particular intensity relation between CT and MR:

* **Edge agreement** (:func:`edge_correlation`, :func:`gradient_magnitude_similarity`): the Pearson correlation of the
  gradient magnitudes of x and G(x), and the gradient-magnitude similarity (GMS, mean and deviation GMSD; Xue et al.
  2014, "Gradient magnitude similarity deviation", IEEE TIP 23(2)), inside the body mask (and optionally a lung mask).
  Gradients are Gaussian derivatives in mm (:func:`gradient_magnitude`), so anisotropic grids are handled.
* **Dependence without monotonicity** (:func:`normalized_mutual_information`): ``(H(A) + H(B)) / H(A, B)`` (Studholme
  et al. 1999, "An overlap invariant entropy measure of 3D medical image alignment", Pattern Recognition 32(1)), in
  [1, 2]: 2 when either image is a one-to-one function of the other, 1 when they are independent.
* **Warp check** (:func:`warp_check`): a deformable registration of G(x) onto x with a multi-modal metric (Mattes
  mutual information) and a coarse B-spline (control points every ~50 mm: the regularisation), on a ~3 mm working
  grid, after smoothing x to G(x)'s resolution. An appearance-only G leaves nothing to register, so the displacement
  is near zero; a G that moves anatomy shows up as displacement (mm) where it moved it.

:func:`anatomy_metrics` runs them all on a CT (HU) and its synthetic MR (normalised [-1, 1]) on the same grid and
returns the keys of :data:`METRIC_KEYS` (``ct2mr translate --warp-check``, ``ct2mr evaluate``, the Slicer module).

What "near zero" is, measured (``benchmarks/RESULTS.md``, section "Anatomy checks (issue 9)"; default settings, 2
busy CPU cores, 15-45 s per whole chest CT, registration included):

* a known non-monotone intensity remap of the CT (``cos(2.5 pi n)``, ``n`` the CT through [-1000, 1000] HU to [0, 1],
  so air, lung, fat, soft tissue and bone change order), which moves nothing by construction: mean 0.28-0.42 mm,
  p95 0.52-0.74 mm, max 0.8-1.2 mm inside the body (thorax CTA 1.5 mm, lung2 CT 0.63 x 0.63 x 5 mm). This is the
  registration's own noise floor: **near zero = p95 below about 1 mm** for a G(x) as sharp as x;
* the same remap blurred by a 4 mm Gaussian (still moves nothing, but loses fine structure): mean 1.5-2.0 mm, p95
  3.2-3.9 mm, even with the CT smoothed to G(x)'s resolution first (``match_resolution_mm``); without that matching
  3.2-3.6 mm mean. So for a blurry G(x) the floor rises to a p95 of about 4 mm: read the displacement together with
  NMI and edge correlation (both low when G(x) keeps little of x's structure, and then the registration has little to
  hold on to);
* a known smooth warp of 3 mm (tests): reported as 2.8-3.0 mm mean, vector error 0.9-1.1 mm mean;
* the default model v0.2 (``ct2mr translate --warp-check``): edge correlation 0.15-0.17, NMI 1.08, mean 3.7-4.4 mm,
  p95 6.8-8.7 mm: above both controls, with little structure shared (blurry G(x), lung vessels lost) - not shown to
  preserve anatomy at the millimetre level.

Arrays are NumPy (z, y, x); spacings are given in (z, y, x) order in mm unless stated; SimpleITK images carry their
own (x, y, z) geometry.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np
import SimpleITK as sitk

from ct2mr.evaluation.metrics import checked_mask

logger = logging.getLogger(__name__)

__all__ = [
    "METRIC_KEYS",
    "WARP_KEYS",
    "LUNG_KEYS",
    "GMS_C",
    "LUNG_THRESHOLD_HU",
    "WarpCheckSettings",
    "gradient_magnitude",
    "edge_correlation",
    "gradient_magnitude_similarity",
    "normalized_mutual_information",
    "lung_mask",
    "check_same_grid",
    "bspline_registration",
    "warp_check",
    "anatomy_metrics",
    "DISPLACEMENT_NAME",
    "ANATOMY_NAME",
    "translation_anatomy",
    "describe",
]

#: Keys of :func:`anatomy_metrics` always present.
METRIC_KEYS = ("edge_correlation", "gradient_magnitude_similarity", "gmsd", "nmi")
#: Keys added by the warp check (mm).
WARP_KEYS = ("displacement_mean_mm", "displacement_p95_mm", "displacement_max_mm")
#: Keys added with the lung mask.
LUNG_KEYS = ("edge_correlation_lung", "gradient_magnitude_similarity_lung")

#: GMS stability constant for intensities in [-1, 1] and gradients per mm: Xue et al.'s c = 170 for [0, 255] images
#: and per-pixel Prewitt gradients, scaled by (2 / 255)^2 to the range 2 (about 0.0105).
GMS_C = 170.0 * (2.0 / 255.0) ** 2
#: Lung threshold in HU (inside the body): aerated lung is below, soft tissue and vessels above.
LUNG_THRESHOLD_HU = -400.0
#: Window (HU) that maps the CT to [-1, 1] for GMS and the registration: air to bone.
DEFAULT_CT_WINDOW = (-1000.0, 1000.0)


def _as_spacing(spacing: Sequence[float] | float, ndim: int = 3) -> tuple[float, ...]:
    """A spacing as ``ndim`` positive floats (mm, (z, y, x)); a scalar is repeated."""
    values = [float(spacing)] * ndim if np.isscalar(spacing) else [float(s) for s in spacing]
    if len(values) != ndim or any(not (s > 0) for s in values):
        raise ValueError(f"spacing must be {ndim} positive values in mm (z, y, x order), got {spacing}.")
    return tuple(values)


def _check_pair(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None, volumes: bool = True
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Arrays of one shape ((z, y, x) when ``volumes``) and a non-empty mask of it (``None``: all voxels)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or (volumes and a.ndim != 3):
        what = "(z, y, x) volumes" if volumes else "arrays"
        raise ValueError(f"Need two {what} of the same shape, got {a.shape} and {b.shape}.")
    mask = np.ones(a.shape, bool) if mask is None else mask
    return a, b, checked_mask(mask, a.shape)


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two flat arrays (NaN when either is constant)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    a, b = a - a.mean(), b - b.mean()
    denom = math.sqrt(float(a @ a) * float(b @ b))
    return float(a @ b / denom) if denom > 0 else float("nan")


def _gms(ma: np.ndarray, mb: np.ndarray, c: float) -> tuple[float, float]:
    """Mean and std of the gradient-magnitude similarity map of two magnitude arrays (Xue et al. 2014)."""
    ma, mb = np.asarray(ma, np.float64), np.asarray(mb, np.float64)
    gms = (2.0 * ma * mb + c) / (ma * ma + mb * mb + c)
    return float(gms.mean()), float(gms.std())


def gradient_magnitude(array: np.ndarray, spacing_zyx: Sequence[float] | float = 1.0, sigma_mm: float = 1.0
                       ) -> np.ndarray:
    """Gradient magnitude in intensity units per mm, by Gaussian derivatives with a sigma given in mm.

    ``|grad I| = sqrt(sum_i (d(G_sigma * I) / d x_i)^2)``: the volume is smoothed with ``scipy.ndimage.gaussian_filter``
    (sigma ``sigma_mm / spacing_i`` voxels along axis ``i``, truncated at 3 sigma, edge mode ``nearest``), then each
    derivative is a central difference divided by twice the spacing (exact on linear ramps, also where sigma is below
    a voxel), so the result does not depend on the grid's voxel size.

    Args:
        array: (z, y, x) volume.
        spacing_zyx: voxel spacing (z, y, x) in mm, or one value for isotropic grids.
        sigma_mm: Gaussian scale in mm (> 0); 1 mm keeps fine vessels and fissures.

    Returns:
        float32 (z, y, x) gradient magnitude, in the array's intensity unit per mm.

    Raises:
        ValueError: not a 3D array, or non-positive spacing or sigma.
    """
    from scipy import ndimage

    array = np.asarray(array, np.float32)
    if array.ndim != 3:
        raise ValueError(f"gradient_magnitude needs a (z, y, x) array, got shape {array.shape}.")
    spacing = _as_spacing(spacing_zyx)
    if not sigma_mm > 0:
        raise ValueError(f"sigma_mm must be > 0, got {sigma_mm}.")
    smooth = ndimage.gaussian_filter(array, [sigma_mm / s for s in spacing], mode="nearest", truncate=3.0)
    out = np.zeros(array.shape, np.float32)
    for axis in range(3):
        d = ndimage.correlate1d(smooth, [-0.5 / spacing[axis], 0.0, 0.5 / spacing[axis]], axis, mode="nearest")
        out += d * d
    return np.sqrt(out, out=out)


def edge_correlation(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None,
                     spacing_zyx: Sequence[float] | float = 1.0, sigma_mm: float = 1.0) -> float:
    """Pearson correlation of the gradient magnitudes of two volumes inside a mask (edge agreement, thesis E2).

    Invariant to any linear rescaling of either volume (gain and offset, including a sign flip), so it compares
    where the edges are and how they rank in strength, not the contrast itself.

    Args:
        a: (z, y, x) volume, e.g. the CT x (any unit).
        b: (z, y, x) volume of the same shape, e.g. G(x) (any unit).
        mask: boolean (z, y, x) mask of the voxels used (e.g. the body mask); ``None``: all voxels.
        spacing_zyx: voxel spacing (z, y, x) in mm.
        sigma_mm: Gaussian derivative scale in mm (:func:`gradient_magnitude`).

    Returns:
        The correlation in [-1, 1]; 1 for identical edges; NaN when a gradient map is constant in the mask.

    Raises:
        ValueError: different shapes, a mask of another shape, or an empty mask.
    """
    a, b, mask = _check_pair(a, b, mask)
    return _pearson(gradient_magnitude(a, spacing_zyx, sigma_mm)[mask],
                    gradient_magnitude(b, spacing_zyx, sigma_mm)[mask])


def gradient_magnitude_similarity(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None,
                                  spacing_zyx: Sequence[float] | float = 1.0, c: float = GMS_C,
                                  sigma_mm: float = 1.0) -> tuple[float, float]:
    """Mean gradient-magnitude similarity and its deviation (GMSD) inside a mask (Xue et al. 2014).

    ``GMS(p) = (2 m_a(p) m_b(p) + c) / (m_a(p)^2 + m_b(p)^2 + c)`` with ``m`` the gradient magnitudes
    (:func:`gradient_magnitude`, per mm); the score is the mean of the map in the mask (1: equal edges) and GMSD its
    standard deviation (0: equal edges, or edges that differ by the same factor everywhere).

    Scaling: both volumes must be in [-1, 1] (the CT through a window, the synthetic MR as the networks write it), so
    that the constant ``c`` keeps Xue et al.'s meaning; the default :data:`GMS_C` is their ``c = 170`` for [0, 255]
    images, scaled to the range 2. Unlike :func:`edge_correlation`, GMS compares edge strengths, so it also drops when
    G changes the contrast of an edge (e.g. bone/soft tissue) while keeping it in place.

    Args:
        a, b: (z, y, x) volumes of the same shape, in [-1, 1].
        mask: boolean (z, y, x) mask; ``None``: all voxels.
        spacing_zyx: voxel spacing (z, y, x) in mm.
        c: stability constant in (intensity / mm)^2 (> 0).
        sigma_mm: Gaussian derivative scale in mm.

    Returns:
        ``(gms_mean, gmsd)``: mean in (0, 1], deviation >= 0.

    Raises:
        ValueError: different shapes, a bad mask, or ``c`` <= 0.
    """
    a, b, mask = _check_pair(a, b, mask)
    if not c > 0:
        raise ValueError(f"c must be > 0, got {c}.")
    return _gms(gradient_magnitude(a, spacing_zyx, sigma_mm)[mask],
                gradient_magnitude(b, spacing_zyx, sigma_mm)[mask], c)


def normalized_mutual_information(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None, bins: int = 64
                                  ) -> float:
    """Normalised mutual information ``(H(A) + H(B)) / H(A, B)`` inside a mask (Studholme et al. 1999).

    Entropies (natural log) of the ``bins`` x ``bins`` joint histogram of the masked values, each axis spanning its
    volume's min..max in the mask. 2 when one volume is a one-to-one function of the other at this binning (e.g. any
    non-monotone but invertible remap, or the volume with itself), about 1 for independent volumes (slightly above
    1 from the finite sample). Contrast-independent: it needs dependence, not a monotone relation.

    Args:
        a, b: (z, y, x) (or any equal-shape) arrays, any units.
        mask: boolean mask of the voxels used; ``None``: all.
        bins: histogram bins per axis (>= 2).

    Returns:
        NMI in [1, 2]; 2 when the joint entropy is 0 (both constant).

    Raises:
        ValueError: different shapes, an empty mask or ``bins`` < 2.
    """
    a, b, mask = _check_pair(a, b, mask, volumes=False)
    if int(bins) < 2:
        raise ValueError(f"bins must be >= 2, got {bins}.")
    va, vb = a[mask].astype(np.float64), b[mask].astype(np.float64)

    def edges(v: np.ndarray) -> np.ndarray:
        lo, hi = float(v.min()), float(v.max())
        return np.linspace(lo, hi if hi > lo else lo + 1.0, int(bins) + 1)

    joint = np.histogram2d(va, vb, bins=[edges(va), edges(vb)])[0]
    p = joint / joint.sum()

    def entropy(q: np.ndarray) -> float:
        q = q[q > 0]
        return float(-(q * np.log(q)).sum())

    h_joint = entropy(p)
    if h_joint <= 0:
        return 2.0
    return float((entropy(p.sum(1)) + entropy(p.sum(0))) / h_joint)


def lung_mask(ct_hu: np.ndarray, body: np.ndarray, threshold_hu: float = LUNG_THRESHOLD_HU,
              min_fraction: float = 0.1) -> np.ndarray:
    """The lungs, simply: CT below ``threshold_hu`` inside the body, largest components, vessels filled in.

    Voxels of the body mask below :data:`LUNG_THRESHOLD_HU` (-400 HU: aerated lung; soft tissue and vessels are
    above); the two largest 3D connected components, the second kept only when it has at least ``min_fraction`` of the
    first's voxels (left and right lung, or one component when they touch); then holes filled slice by slice in the
    axial plane, so vessels and fissures inside the lungs belong to the mask. Bowel gas or the trachea may be kept
    when they are larger than a lung (a crop without lungs); the mask is empty when nothing is below the threshold.

    Args:
        ct_hu: (z, y, x) CT in HU.
        body: boolean (z, y, x) body mask (:func:`ct2mr.preprocessing.masks.body_mask`).
        threshold_hu: lung threshold in HU.
        min_fraction: size of the second component relative to the first for it to be kept.

    Returns:
        Boolean (z, y, x) mask.

    Raises:
        ValueError: mismatching shapes.
    """
    from scipy import ndimage

    ct_hu, body = np.asarray(ct_hu), np.asarray(body, bool)
    if ct_hu.shape != body.shape or ct_hu.ndim != 3:
        raise ValueError(f"ct_hu and body must be (z, y, x) of the same shape, got {ct_hu.shape} and {body.shape}.")
    candidate = (ct_hu < threshold_hu) & body
    labels, count = ndimage.label(candidate)
    if count == 0:
        return candidate
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    order = np.argsort(sizes)[::-1]
    keep = [order[0]] + [k for k in order[1:2] if sizes[k] >= min_fraction * sizes[order[0]]]
    mask = np.isin(labels, keep)
    for z in range(mask.shape[0]):
        if mask[z].any():
            mask[z] = ndimage.binary_fill_holes(mask[z])
    return mask & body


def check_same_grid(a: sitk.Image, b: sitk.Image, names: tuple[str, str] = ("CT", "synthetic MR"),
                    tolerance: float = 1e-4) -> None:
    """Raise ``ValueError`` unless two images share size, spacing, origin and direction.

    Args:
        a, b: the images.
        names: how the message calls them.
        tolerance: relative tolerance of spacing and origin (of the spacing), absolute of direction cosines.

    Raises:
        ValueError: the grids differ (the message names what differs and both values).
    """
    if a.GetDimension() != 3 or b.GetDimension() != 3:
        raise ValueError(f"Anatomy checks need 3D images, got {a.GetDimension()}D {names[0]} and "
                         f"{b.GetDimension()}D {names[1]}.")
    spacing = np.asarray(a.GetSpacing())
    checks = [("size", a.GetSize(), b.GetSize(), lambda u, v: tuple(u) == tuple(v)),
              ("spacing", a.GetSpacing(), b.GetSpacing(),
               lambda u, v: np.allclose(u, v, rtol=tolerance, atol=0)),
              ("origin", a.GetOrigin(), b.GetOrigin(),
               lambda u, v: np.allclose(u, v, rtol=0, atol=tolerance * float(spacing.max()))),
              ("direction", a.GetDirection(), b.GetDirection(), lambda u, v: np.allclose(u, v, atol=tolerance))]
    for what, u, v, same in checks:
        if not same(u, v):
            raise ValueError(f"The {names[0]} and the {names[1]} must be on the same voxel grid, but their {what} "
                             f"differ: {tuple(round(float(t), 6) for t in u)} vs "
                             f"{tuple(round(float(t), 6) for t in v)}."
                             " Pass G(x) on the CT's grid (as ct2mr translate writes it).")


@dataclass
class WarpCheckSettings:
    """Settings of :func:`warp_check`.

    Attributes:
        working_spacing_mm: isotropic spacing (mm) of the grid the registration runs on (the images are smoothed
            and resampled there; finer is slower).
        mesh_spacing_mm: B-spline control-point spacing (mm): the regularisation (coarser = smoother, stiffer).
        iterations: LBFGS-B iterations per resolution level (at most twice as many metric evaluations).
        shrink_factors: multi-resolution shrink factors of the working grid, coarse to fine.
        smoothing_sigmas_mm: Gaussian smoothing per level (mm).
        histogram_bins: Mattes mutual information bins.
        samples: metric sample points per resolution level, drawn at random inside the dilated body mask (the
            time per iteration grows linearly with it).
        seed: seed of the metric's random sampling (deterministic results), >= 1 (SimpleITK reads 0 as "seed from
            the wall clock").
        ct_window: HU window the CT is clipped to before registration.
        threads: ITK threads (0: ITK's default); results are deterministic for a given thread count.
        match_resolution_mm: Gaussian sigmas (mm) tried on the CT before registration; the one whose gradient
            magnitudes correlate best with G(x)'s (in the mask, on the working grid) is used, so that a G(x) blurrier
            than x is compared with an equally blurry x. Mutual information is biased towards deforming a sharp image
            onto a blurry one (measured: a 4 mm blur of the remap control, which moves nothing, read 3.6 mm mean
            without this matching). ``(0.0,)``: no matching.

    Raises:
        ValueError: on construction, a non-positive spacing, iterations < 1, shrink factors and smoothing sigmas of
            different (or zero) lengths, seed < 1, samples < 100 or a negative match_resolution_mm.
    """

    working_spacing_mm: float = 3.0
    mesh_spacing_mm: float = 50.0
    iterations: int = 30
    shrink_factors: tuple[int, ...] = (2, 1)
    smoothing_sigmas_mm: tuple[float, ...] = (3.0, 0.0)
    histogram_bins: int = 32
    samples: int = 10000
    seed: int = 1
    ct_window: tuple[float, float] = DEFAULT_CT_WINDOW
    threads: int = 0
    match_resolution_mm: tuple[float, ...] = (0.0, 1.5, 3.0, 4.5, 6.0)

    def __post_init__(self) -> None:
        """Check the settings (see Raises) and normalise the sequences to tuples of numbers."""
        if not (self.working_spacing_mm > 0 and self.mesh_spacing_mm > 0):
            raise ValueError("working_spacing_mm and mesh_spacing_mm must be > 0.")
        if int(self.iterations) < 1:
            raise ValueError(f"iterations must be >= 1, got {self.iterations}.")
        if len(self.shrink_factors) != len(self.smoothing_sigmas_mm) or not self.shrink_factors:
            raise ValueError("shrink_factors and smoothing_sigmas_mm need the same (non-zero) number of levels.")
        if int(self.seed) < 1:
            raise ValueError(f"seed must be >= 1 (0 would seed from the wall clock), got {self.seed}.")
        if int(self.samples) < 100:
            raise ValueError(f"samples must be >= 100, got {self.samples}.")
        self.shrink_factors = tuple(int(v) for v in self.shrink_factors)
        self.smoothing_sigmas_mm = tuple(float(v) for v in self.smoothing_sigmas_mm)
        self.ct_window = (float(self.ct_window[0]), float(self.ct_window[1]))
        self.match_resolution_mm = tuple(float(v) for v in self.match_resolution_mm) or (0.0,)
        if any(v < 0 for v in self.match_resolution_mm):
            raise ValueError(f"match_resolution_mm must be >= 0, got {self.match_resolution_mm}.")


def _working_grid(image: sitk.Image, mask: np.ndarray, spacing_mm: float, margin_mm: float) -> sitk.Image:
    """A reference image of isotropic ``spacing_mm`` covering the mask's bounding box plus a margin (image axes)."""
    idx = np.nonzero(mask)
    lo = np.array([int(i.min()) for i in idx][::-1], float)  # x, y, z
    hi = np.array([int(i.max()) for i in idx][::-1], float)
    spacing = np.asarray(image.GetSpacing())
    pad = margin_mm / spacing
    size_img = np.asarray(image.GetSize())
    lo = np.maximum(0.0, lo - pad)
    hi = np.minimum(size_img - 1.0, hi + pad)
    extent = (hi - lo) * spacing
    size = [max(8, int(math.ceil(e / spacing_mm)) + 1) for e in extent]
    ref = sitk.Image(size, sitk.sitkFloat32)
    ref.SetSpacing([spacing_mm] * 3)
    ref.SetDirection(image.GetDirection())
    ref.SetOrigin(image.TransformContinuousIndexToPhysicalPoint([float(v) for v in lo]))
    return ref


def _to_working(image: sitk.Image, reference: sitk.Image, spacing_mm: float, default: float) -> sitk.Image:
    """Anti-aliased resampling onto the working grid (Gaussian sigma 0.4 x working spacing where the input is finer)."""
    image = sitk.Cast(image, sitk.sitkFloat32)
    sigmas = [max(0.0, 0.4 * math.sqrt(max(0.0, spacing_mm ** 2 - s ** 2))) for s in image.GetSpacing()]
    if max(sigmas) > 0:
        image = sitk.SmoothingRecursiveGaussian(image, [max(s, 1e-3) for s in sigmas])
    return sitk.Resample(image, reference, sitk.Transform(), sitk.sitkLinear, default, sitk.sitkFloat32)


def _body_or_default(ct: sitk.Image, body: np.ndarray | None) -> np.ndarray:
    """The given (z, y, x) body mask, checked against the CT, or the CT's own body mask when ``None``."""
    from ct2mr.preprocessing.masks import body_mask

    shape = sitk.GetArrayViewFromImage(ct).shape
    if body is None:
        body = body_mask(sitk.GetArrayFromImage(ct).astype(np.float32), "ct", normalised=False)
    return checked_mask(body, shape, "body mask", "the CT's (z, y, x) shape", "The body mask is empty.")


#: Bound (mm) of every B-spline coefficient: keeps a poorly constrained registration (small crops, a G(x) with little
#: contrast) from stepping out of the image; far above any displacement an appearance-only G could explain.
_MAX_COEFFICIENT_MM = 20.0


def _match_resolution(fixed: sitk.Image, moving: sitk.Image, mask: sitk.Image, sigmas: Sequence[float]
                      ) -> tuple[sitk.Image, float, dict[str, float]]:
    """The CT smoothed with the sigma (mm) whose gradient magnitudes correlate best with the moving image's."""
    inside = sitk.GetArrayViewFromImage(mask) > 0
    target = sitk.GetArrayFromImage(sitk.GradientMagnitude(moving))[inside]
    best, best_sigma, correlations = fixed, 0.0, {}
    best_value = -np.inf
    for sigma in sigmas:
        candidate = sitk.SmoothingRecursiveGaussian(fixed, sigma) if sigma > 0 else fixed
        # a copy: a view of a temporary image reads freed memory once the image is collected (seen: correlation
        # 0.003 instead of 0.73 in about half the processes, and a 5.5 mm instead of 1.2 mm displacement p95)
        value = _pearson(sitk.GetArrayFromImage(sitk.GradientMagnitude(candidate))[inside], target)
        correlations[f"{sigma:g}"] = round(value, 4)
        if value > best_value:
            best, best_sigma, best_value = candidate, float(sigma), value
    return best, best_sigma, correlations


def bspline_registration(fixed_ct: sitk.Image, moving_translated: sitk.Image, body: np.ndarray | None = None,
                         settings: WarpCheckSettings | None = None) -> tuple[sitk.Transform, dict[str, Any]]:
    """Register G(x) (moving) onto the CT x (fixed) with Mattes MI and a coarse B-spline; the transform itself.

    The registration of :func:`warp_check` (see there for the method and the convention), without turning the
    transform into a displacement map: ``T`` maps a physical point ``p`` of the CT to the point ``T(p)`` of G(x) that
    matches it, so ``T(p) - p`` is the displacement (mm) at ``p``.

    Args:
        fixed_ct: 3D CT x in HU.
        moving_translated: G(x) on exactly the CT's grid (any intensity).
        body: boolean (z, y, x) body mask on the CT's grid; ``None``: :func:`ct2mr.preprocessing.masks.body_mask` of the CT.
        settings: :class:`WarpCheckSettings`; ``None``: the defaults.

    Returns:
        ``(transform, info)``: the B-spline transform and the settings with ``mesh_size`` (control-point intervals per
        axis), ``working_grid_size``, ``metric_value``, ``optimizer_stop`` and ``seconds``.

    Raises:
        ValueError: the images are not on the same grid, or the body mask has another shape or is empty.
    """
    settings = settings or WarpCheckSettings()
    check_same_grid(fixed_ct, moving_translated)
    started = time.perf_counter()
    body = _body_or_default(fixed_ct, body)
    spacing = settings.working_spacing_mm
    reference = _working_grid(fixed_ct, body, spacing, margin_mm=15.0)
    lo, hi = settings.ct_window
    fixed = _to_working(sitk.Clamp(sitk.Cast(fixed_ct, sitk.sitkFloat32), sitk.sitkFloat32, lo, hi), reference,
                        spacing, lo)
    outside = sitk.GetArrayViewFromImage(moving_translated)[~body]
    moving = _to_working(moving_translated, reference, spacing, float(np.median(outside)) if outside.size else 0.0)
    mask_img = sitk.GetImageFromArray(body.astype(np.uint8))
    mask_img.CopyInformation(fixed_ct)
    mask_work = sitk.Resample(mask_img, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    mask_work = sitk.BinaryDilate(mask_work, [2, 2, 2])
    fixed, fixed_sigma, correlations = _match_resolution(fixed, moving, mask_work, settings.match_resolution_mm)

    extent = [(n - 1) * s for n, s in zip(reference.GetSize(), reference.GetSpacing())]
    mesh_size = [max(1, int(round(e / settings.mesh_spacing_mm))) for e in extent]
    transform = sitk.BSplineTransformInitializer(fixed, mesh_size, 3)

    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=int(settings.histogram_bins))
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    # ITK draws percentage x voxels of each level's grid and keeps those inside the mask: aim at `samples` kept
    inside = float(sitk.GetArrayViewFromImage(mask_work).mean())
    voxels = float(np.prod(reference.GetSize()))
    reg.SetMetricSamplingPercentagePerLevel(
        [min(1.0, settings.samples / max(1.0, inside * voxels / f ** 3)) for f in settings.shrink_factors],
        int(settings.seed))
    reg.SetMetricFixedMask(mask_work)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-5, numberOfIterations=int(settings.iterations),
                             maximumNumberOfCorrections=5,
                             maximumNumberOfFunctionEvaluations=2 * int(settings.iterations),
                             costFunctionConvergenceFactor=1e7, lowerBound=-_MAX_COEFFICIENT_MM,
                             upperBound=_MAX_COEFFICIENT_MM)
    reg.SetShrinkFactorsPerLevel(list(settings.shrink_factors))
    reg.SetSmoothingSigmasPerLevel(list(settings.smoothing_sigmas_mm))
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    reg.SetInitialTransform(transform, inPlace=True)
    if settings.threads:
        reg.SetNumberOfThreads(int(settings.threads))
    reg.Execute(fixed, moving)
    info = {**asdict(settings), "mesh_size": mesh_size, "working_grid_size": list(reference.GetSize()),
            "metric": "Mattes mutual information", "transform": "cubic B-spline", "optimizer": "LBFGS-B",
            "convention": "fixed = CT x, moving = G(x); displacement |T(p) - p| on x's grid",
            "fixed_smoothing_mm": fixed_sigma, "edge_correlation_by_smoothing": correlations,
            "metric_value": float(reg.GetMetricValue()), "optimizer_stop": reg.GetOptimizerStopConditionDescription(),
            "seconds": round(time.perf_counter() - started, 3)}
    return transform, info


def warp_check(fixed_ct: sitk.Image, moving_translated: sitk.Image, body: np.ndarray | None = None,
               settings: WarpCheckSettings | None = None) -> tuple[sitk.Image, dict[str, Any]]:
    """Deformable registration of G(x) onto x; displacement magnitude (mm) on the CT's grid and its statistics.

    Convention: the CT x is the fixed image and G(x) the moving one; the registration finds the B-spline transform
    ``T`` with ``G(x)(T(p)) ~ x(p)`` under Mattes mutual information, and ``u(p) = T(p) - p`` says where the anatomy at
    CT point ``p`` sits in G(x). An appearance-only G gives ``u ~ 0``. The map ``|u|`` (mm) lives on x's grid.

    Method (:func:`bspline_registration`, SimpleITK ``ImageRegistrationMethod``): both images are smoothed
    (anti-aliasing) and resampled to an isotropic working grid of ``settings.working_spacing_mm`` over the body's
    bounding box plus 15 mm, the CT clipped to ``settings.ct_window``; the metric is Mattes mutual information
    (``histogram_bins``) at ``samples`` random points per level (fixed ``seed``) inside the body mask dilated by two
    working voxels (so the skin line counts); the transform a cubic B-spline with control points every
    ``mesh_spacing_mm`` (the light regularisation: it cannot represent deformations finer than about half that),
    starting at identity; the optimiser LBFGS-B with ``iterations`` per level over the levels ``shrink_factors`` /
    ``smoothing_sigmas_mm``, every coefficient bounded to +-20 mm. Before registering, the CT is smoothed to G(x)'s
    resolution (``match_resolution_mm``). The transform is turned into a displacement field on the CT's full grid
    (``TransformToDisplacementField``), whose magnitude is returned.

    Args:
        fixed_ct: 3D CT x in HU.
        moving_translated: G(x) on exactly the CT's grid (any intensity; e.g. normalised MR in [-1, 1]).
        body: boolean (z, y, x) body mask on the CT's grid; ``None``: :func:`ct2mr.preprocessing.masks.body_mask` of the CT.
        settings: :class:`WarpCheckSettings`; ``None``: the defaults.

    Returns:
        ``(magnitude, stats)``: float32 ``|u|`` in mm on the CT's grid (size, spacing, origin, direction), and
        ``{"displacement_mean_mm", "displacement_p95_mm", "displacement_max_mm"}`` over the body mask plus
        ``"warp_settings"`` (:func:`bspline_registration`'s info, ``seconds`` including the displacement map).

        When the registration itself fails (ITK error, e.g. a G(x) without contrast in the body), a warning is
        logged, the map is NaN and the statistics are NaN with the message in ``warp_settings["error"]``.

    Raises:
        ValueError: the images are not on the same grid, or the body mask has another shape or is empty.
    """
    started = time.perf_counter()
    body = _body_or_default(fixed_ct, body)
    try:
        transform, info = bspline_registration(fixed_ct, moving_translated, body, settings)
    except RuntimeError as error:  # ITK: e.g. a G(x) without any contrast in the body ("all samples map outside")
        message = str(error).strip().splitlines()[-1][:300]
        logger.warning("Warp check failed, displacement not measured: %s", message)
        magnitude = sitk.Image(fixed_ct.GetSize(), sitk.sitkFloat32)
        magnitude.CopyInformation(fixed_ct)
        magnitude = sitk.Add(magnitude, float("nan"))
        return magnitude, {**{key: float("nan") for key in WARP_KEYS},
                           "warp_settings": {**asdict(settings or WarpCheckSettings()), "error": message,
                                             "seconds": round(time.perf_counter() - started, 3)}}
    field = sitk.TransformToDisplacementField(transform, sitk.sitkVectorFloat32, fixed_ct.GetSize(),
                                              fixed_ct.GetOrigin(), fixed_ct.GetSpacing(), fixed_ct.GetDirection())
    magnitude = sitk.Cast(sitk.VectorMagnitude(field), sitk.sitkFloat32)
    del field
    magnitude.CopyInformation(fixed_ct)
    values = sitk.GetArrayViewFromImage(magnitude)[body].astype(np.float64)
    info["seconds"] = round(time.perf_counter() - started, 3)
    return magnitude, {"displacement_mean_mm": float(values.mean()),
                       "displacement_p95_mm": float(np.percentile(values, 95)),
                       "displacement_max_mm": float(values.max()), "warp_settings": info}


def anatomy_metrics(ct_image: sitk.Image, synthetic_mr_image: sitk.Image, warp: bool = False, lung: bool = False,
                    body: np.ndarray | None = None, ct_window: Sequence[float] = DEFAULT_CT_WINDOW,
                    sigma_mm: float = 1.0, nmi_bins: int = 64, warp_settings: WarpCheckSettings | None = None
                    ) -> tuple[dict[str, Any], sitk.Image | None]:
    """All anatomy checks of a CT and its synthetic MR (thesis section 5, P1 / E2).

    Edge agreement and NMI use the CT clipped to ``ct_window`` and mapped to [-1, 1] (so GMS's constant applies and
    metal or contrast beyond the window does not dominate) and G(x) as given (normalised MR in [-1, 1]); they are taken
    inside the body mask, and with ``lung`` also inside :func:`lung_mask`.

    Args:
        ct_image: 3D CT x in HU.
        synthetic_mr_image: G(x) on exactly the CT's grid, normalised MR intensity in [-1, 1].
        warp: also run :func:`warp_check` (seconds to a minute) and return the displacement magnitude map.
        lung: also compute edge correlation and GMS inside the lung mask (NaN when the CT has no lungs).
        body: boolean (z, y, x) body mask on the CT's grid; ``None``: :func:`ct2mr.preprocessing.masks.body_mask` of the CT in HU.
        ct_window: HU window mapped to [-1, 1] for the metrics.
        sigma_mm: Gaussian derivative scale (mm) of the gradients.
        nmi_bins: bins per axis of the NMI histogram.
        warp_settings: :class:`WarpCheckSettings` of the warp check (its ``ct_window`` is kept as given there).

    Returns:
        ``(metrics, displacement)``: ``metrics`` has the keys :data:`METRIC_KEYS` (``"edge_correlation"``,
        ``"gradient_magnitude_similarity"``, ``"gmsd"``, ``"nmi"``), with ``warp`` also :data:`WARP_KEYS`
        (``"displacement_mean_mm"``, ``"displacement_p95_mm"``, ``"displacement_max_mm"``) and ``"warp_settings"``,
        with ``lung`` also :data:`LUNG_KEYS` (``"edge_correlation_lung"``, ``"gradient_magnitude_similarity_lung"``)
        and ``"lung_voxels"``; ``displacement`` is the float32 ``|u|`` map (mm) on the CT's grid, or ``None`` without
        ``warp``.

    Raises:
        ValueError: the images are not on the same grid, or the body mask has another shape or is empty.
    """
    check_same_grid(ct_image, synthetic_mr_image)
    body = _body_or_default(ct_image, body)
    ct_hu = sitk.GetArrayFromImage(ct_image).astype(np.float32)
    fake = sitk.GetArrayFromImage(synthetic_mr_image).astype(np.float32)
    spacing = tuple(float(s) for s in ct_image.GetSpacing()[::-1])
    lo, hi = float(ct_window[0]), float(ct_window[1])
    ct_n = (np.clip(ct_hu, lo, hi) - lo) * (2.0 / (hi - lo)) - 1.0
    fake = np.nan_to_num(fake, nan=-1.0)
    grad_ct = gradient_magnitude(ct_n, spacing, sigma_mm)
    grad_mr = gradient_magnitude(fake, spacing, sigma_mm)

    def edges(mask: np.ndarray) -> tuple[float, float, float]:
        ga, gb = grad_ct[mask], grad_mr[mask]
        return (_pearson(ga, gb), *_gms(ga, gb, GMS_C))

    corr, gms_mean, gmsd = edges(body)
    out: dict[str, Any] = {"edge_correlation": corr, "gradient_magnitude_similarity": gms_mean, "gmsd": gmsd,
                           "nmi": normalized_mutual_information(ct_n, fake, body, nmi_bins)}
    if lung:
        lungs = lung_mask(ct_hu, body)
        out["lung_voxels"] = int(lungs.sum())
        if lungs.any():
            out["edge_correlation_lung"], out["gradient_magnitude_similarity_lung"], _ = edges(lungs)
        else:
            out["edge_correlation_lung"] = out["gradient_magnitude_similarity_lung"] = float("nan")
    displacement = None
    if warp:
        displacement, stats = warp_check(ct_image, synthetic_mr_image, body, warp_settings)
        out.update(stats)
    return out, displacement


#: Files ``ct2mr translate --warp-check`` adds to OUT_DIR: the displacement magnitude map and the metrics.
DISPLACEMENT_NAME = "displacement_mm.nii.gz"
ANATOMY_NAME = "anatomy.json"


def translation_anatomy(ct_image: sitk.Image, synthetic_mr_image: sitk.Image, progress: Any = None,
                        settings: WarpCheckSettings | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The warp check of ``ct2mr translate --warp-check``: metrics and the two extra output files.

    Runs :func:`anatomy_metrics` with ``warp=True`` and ``lung=True`` on the input CT and its synthetic MR (both on
    the input's grid).

    Args:
        ct_image: the input CT x in HU.
        synthetic_mr_image: G(x) on the input's grid.
        progress: ``callback(stage, fraction_of_stage, message)`` (reported as the end of ``"postprocess"``), or
            ``None``.
        settings: :class:`WarpCheckSettings`; ``None``: the defaults.

    Returns:
        ``(metrics, files)``: the metrics (JSON-ready: NaN as ``None``; the keys of :func:`anatomy_metrics` plus
        ``"seconds"``, ``"ct_window"``, ``"sigma_mm"``, ``"nmi_bins"``, ``"units"``), and ``{DISPLACEMENT_NAME:
        float32 |u| image in mm on the input's grid, ANATOMY_NAME: metrics}`` for
        :func:`ct2mr.inference.translate.write_outputs`.

    Raises:
        ValueError: the images are not on the same grid.
    """
    report = progress or (lambda stage, fraction, message: None)
    started = time.perf_counter()
    report("postprocess", 1.0, "Anatomy checks: edges, NMI and a B-spline registration of G(x) onto x")
    metrics, displacement = anatomy_metrics(ct_image, synthetic_mr_image, warp=True, lung=True,
                                            warp_settings=settings)
    metrics = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
    metrics.update({"seconds": round(time.perf_counter() - started, 3), "ct_window": list(DEFAULT_CT_WINDOW),
                    "sigma_mm": 1.0, "nmi_bins": 64,
                    "units": "displacement in mm (inside the CT's body mask); the other metrics are unitless"})
    report("postprocess", 1.0, f"Displacement mean {metrics['displacement_mean_mm']:.2f} mm, "
                           f"p95 {metrics['displacement_p95_mm']:.2f} mm")
    return metrics, {DISPLACEMENT_NAME: displacement, ANATOMY_NAME: metrics}


def describe(metrics: dict[str, Any]) -> str:
    """One line of anatomy metrics for people, e.g. for ``ct2mr translate --warp-check``.

    Args:
        metrics: a dict of :func:`anatomy_metrics` (missing or ``None`` values are left out).

    Returns:
        ``"Anatomy:       edge corr 0.81, GMS 0.88 (GMSD 0.13), NMI 1.35, displacement mean 0.25 / p95 0.45 mm"``.
    """
    def value(key: str, digits: int = 3) -> str | None:
        v = metrics.get(key)
        return None if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{float(v):.{digits}f}"

    parts = []
    if value("edge_correlation"):
        parts.append(f"edge corr {value('edge_correlation')}")
    if value("gradient_magnitude_similarity"):
        parts.append(f"GMS {value('gradient_magnitude_similarity')} (GMSD {value('gmsd')})")
    if value("nmi"):
        parts.append(f"NMI {value('nmi')}")
    if value("displacement_mean_mm"):
        parts.append(f"displacement mean {value('displacement_mean_mm', 2)} / p95 {value('displacement_p95_mm', 2)} mm"
                     f" (max {value('displacement_max_mm', 2)})")
    return "Anatomy:       " + ", ".join(parts)
