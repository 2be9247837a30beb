"""The preprocessing chain of the thesis (section 4, Algorithm 1) and its exact inverse.

Forward, for one 3D volume:

1. reorient to RAS from the direction cosines (axis permutations and flips only, no interpolation; section 4.1);
2. resample to ``target_spacing`` (1 mm) isotropic with trilinear interpolation, new size
   ``n'_d = round(n_d * s_d / t_d)`` (eq. 4.1), same origin and direction, and a robust background as default pixel
   value (median for floating-point images, minimum for integer images);
3. pad symmetrically to a multiple of ``K`` (eq. 4.2) with the volume's minimum intensity (section 4.2);
4. normalise to [-1, 1] (section 4.3): CT clipped to the HU window [-600, 1000] (eq. 4.3); MR clipped to the volume's
   own 1st-99th percentiles (eq. 4.4). A flat MR (P99 ~ P1) gives a warning, zeros, and ``flat=True``.

Optionally (``PreprocessingConfig(n4=True)``, MR only, thesis section 5: "MR bias-field correction and robust
scaling"), the MR is first corrected for the coil's smooth intensity bias with N4 (:func:`n4_bias_correction`), on
the input grid before reorientation and resampling.

Every parameter and every grid is recorded in a :class:`PreprocessRecord`, so that :func:`restore_to_input_grid`
puts any network output back onto the input's voxel grid exactly (same size, spacing, origin and direction).

Arrays are NumPy (z, y, x); sizes, spacings and origins in records are ITK's (x, y, z) order, in voxels and mm.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import numpy as np
import SimpleITK as sitk

__all__ = [
    "MODALITIES",
    "PreprocessingConfig",
    "PreprocessRecord",
    "PreprocessedVolume",
    "FlatVolumeWarning",
    "n4_bias_correction",
    "reorient_to_ras",
    "robust_background",
    "resample_isotropic",
    "pad_to_multiple",
    "normalize_ct",
    "normalize_mr",
    "denormalize_ct",
    "preprocess",
    "grid_image",
    "restore_to_input_grid",
]

logger = logging.getLogger(__name__)

MODALITIES = ("ct", "mr")
Modality = Literal["ct", "mr"]


class FlatVolumeWarning(UserWarning):
    """An MR volume has P99 ~ P1 (no contrast): it is set to zeros and flagged, and training skips it."""


@dataclass(frozen=True)
class PreprocessingConfig:
    """Parameters of the preprocessing chain (thesis section 4; defaults are the thesis's).

    Attributes:
        target_spacing: isotropic output spacing in mm (thesis: 1 mm).
        k: pad every axis to a multiple of ``k`` voxels (thesis: K = 16; must be >= 1).
        ct_window: CT clipping window in HU, (min, max) (thesis: [-600, 1000]).
        mr_percentiles: MR clipping percentiles, (low, high) in [0, 100] (thesis: 1st and 99th).
        orientation: anatomical orientation of the array axes after reorientation (thesis: RAS).
        flat_tolerance: an MR volume with P_high - P_low below this is flat.
        n4: correct MR volumes for the bias field with N4 before the chain (:func:`n4_bias_correction`); ignored for
            CT, so that one configuration serves both domains of a training run.
        n4_shrink: N4 fits the bias field on the image shrunk by this factor per axis (axes with few voxels are
            shrunk less), then applies it at full resolution (>= 1).
        n4_iterations: maximum iterations per fitting level; the number of values is the number of levels (>= 1).
    """

    target_spacing: float = 1.0
    k: int = 16
    ct_window: tuple[float, float] = (-600.0, 1000.0)
    mr_percentiles: tuple[float, float] = (1.0, 99.0)
    orientation: str = "RAS"
    flat_tolerance: float = 1e-6
    n4: bool = False
    n4_shrink: int = 4
    n4_iterations: tuple[int, ...] = (50, 50, 30, 20)

    def __post_init__(self) -> None:
        if not (self.target_spacing > 0 and math.isfinite(self.target_spacing)):
            raise ValueError(f"target_spacing must be a positive number of mm, got {self.target_spacing}.")
        if int(self.k) != self.k or self.k < 1:
            raise ValueError(f"k must be a positive integer, got {self.k}.")
        lo, hi = self.ct_window
        if not lo < hi:
            raise ValueError(f"ct_window must be (min, max) HU with min < max, got {self.ct_window}.")
        plo, phi = self.mr_percentiles
        if not 0 <= plo < phi <= 100:
            raise ValueError(f"mr_percentiles must satisfy 0 <= low < high <= 100, got {self.mr_percentiles}.")
        if len(self.orientation) != 3:
            raise ValueError(f"orientation must be a 3-letter code such as 'RAS', got {self.orientation!r}.")
        if not isinstance(self.n4, (bool, np.bool_)):
            raise ValueError(f"n4 must be True or False, got {self.n4!r}.")
        if int(self.n4_shrink) != self.n4_shrink or self.n4_shrink < 1:
            raise ValueError(f"n4_shrink must be a positive integer, got {self.n4_shrink}.")
        iterations = tuple(self.n4_iterations)
        if not iterations or any(int(i) != i or i < 1 for i in iterations):
            raise ValueError(f"n4_iterations must be one or more positive integers, got {self.n4_iterations}.")
        object.__setattr__(self, "n4", bool(self.n4))
        object.__setattr__(self, "n4_shrink", int(self.n4_shrink))
        object.__setattr__(self, "n4_iterations", tuple(int(i) for i in iterations))
        object.__setattr__(self, "ct_window", (float(lo), float(hi)))
        object.__setattr__(self, "mr_percentiles", (float(plo), float(phi)))
        object.__setattr__(self, "k", int(self.k))

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict of every parameter."""
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PreprocessingConfig":
        """Build from :meth:`to_dict` output; unknown keys raise ``ValueError``."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"Unknown preprocessing parameters {sorted(unknown)}; allowed: {sorted(names)}.")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**values)


def _grid(image: sitk.Image) -> dict[str, list]:
    return {"size": list(image.GetSize()), "spacing": list(image.GetSpacing()),
            "origin": list(image.GetOrigin()), "direction": list(image.GetDirection())}


@dataclass
class PreprocessRecord:
    """Everything needed to audit a preprocessing run and to invert it.

    Grids are dicts with ``size`` (voxels), ``spacing`` (mm), ``origin`` (mm, LPS) in ITK (x, y, z) order and
    ``direction`` (9 direction cosines, row-major).

    Attributes:
        modality: ``"ct"`` or ``"mr"``.
        config: the :class:`PreprocessingConfig` as a dict.
        input_grid: the input's grid; outputs are restored onto it.
        input_pixel_type: SimpleITK pixel type name of the input.
        resampled_grid: the RAS, isotropic grid before padding.
        padded_grid: the grid of the network array (after padding).
        pad_before: voxels added before the volume, (x, y, z).
        pad_after: voxels added after the volume, (x, y, z).
        default_value: the resampler's default pixel value (robust background, input units).
        pad_value: the value used for padding (the volume's minimum, input units).
        intensity_range: (low, high) input units mapped to -1 and 1 (CT window or MR percentiles).
        flat: the MR volume had no contrast and was set to zeros.
        extra: quality-control figures of the run: ``voxels`` (voxels of the resampled volume, padding excluded),
            ``clipped_low`` / ``clipped_high`` (how many of them lay below / above ``intensity_range`` and were
            clipped) and ``n4`` (whether N4 bias-field correction was applied).
    """

    modality: str
    config: dict[str, Any]
    input_grid: dict[str, list]
    input_pixel_type: str
    resampled_grid: dict[str, list]
    padded_grid: dict[str, list]
    pad_before: list[int]
    pad_after: list[int]
    default_value: float
    pad_value: float
    intensity_range: list[float]
    flat: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PreprocessRecord":
        """Inverse of :meth:`to_dict`."""
        return cls(**data)


@dataclass
class PreprocessedVolume:
    """A network-ready volume and its record.

    Attributes:
        array: float32 (z, y, x) in [-1, 1], every axis a multiple of ``K``.
        record: the :class:`PreprocessRecord` that inverts it.
    """

    array: np.ndarray
    record: PreprocessRecord


def reorient_to_ras(image: sitk.Image, orientation: str = "RAS") -> sitk.Image:
    """Permute and flip axes so that they point as close as possible to R, A, S (thesis section 4.1).

    Only axis permutations and flips: no interpolation, so voxel values are unchanged. An oblique residual rotation
    (e.g. a short-axis cardiac MR) stays in the direction cosines.

    Args:
        image: a 3D image.
        orientation: target code in ITK's DICOMOrient convention: ``"RAS"`` makes the first array axis (x) increase
            towards the patient's Right, the second (y) towards Anterior and the third (z) towards Superior.

    Returns:
        The reoriented image (same physical positions of every voxel).
    """
    return sitk.DICOMOrient(image, orientation)


def robust_background(image: sitk.Image, floating: bool | None = None) -> float:
    """The resampler's default pixel value: median for floating-point images, minimum for integer ones (section 4.1).

    Args:
        image: a scalar image.
        floating: decide as if the image were floating-point (``True``) or integer (``False``); ``None`` uses the
            image's own pixel type. (After N4 an integer MR is float, but keeps the integer rule.)

    Returns:
        The background value in the image's units (e.g. HU).
    """
    array = sitk.GetArrayViewFromImage(image)
    if floating is None:
        floating = bool(np.issubdtype(array.dtype, np.floating))
    if floating:
        return float(np.median(array))
    return float(array.min())


def _shrink_factors(size: Sequence[int], shrink: int, min_voxels: int = 8) -> list[int]:
    """Per-axis shrink factors: ``shrink``, reduced on axes that would keep fewer than ``min_voxels`` voxels."""
    return [max(1, min(shrink, n // min_voxels)) for n in size]


def n4_bias_correction(image: sitk.Image, shrink: int = 4, iterations: Sequence[int] = (50, 50, 30, 20)
                       ) -> sitk.Image:
    """Correct an MR volume for the smooth multiplicative bias field of the receive coils with N4 (SimpleITK).

    The bias field is fitted inside an Otsu foreground mask (positive voxels only) on the image shrunk by ``shrink``
    per axis (less along axes with few voxels, e.g. 12 cardiac slices), then evaluated on the full-resolution grid
    and divided out: ``corrected = image / exp(log_bias)``. The grid (size, spacing, origin, direction) is unchanged.
    Thesis section 5 ("MR bias-field correction and robust scaling"); Tustison et al., IEEE TMI 2010.

    Args:
        image: a 3D scalar MR image (any pixel type; arbitrary units).
        shrink: shrink factor of the fit (>= 1); 4 fits a 256x256x120 volume in about a second.
        iterations: maximum iterations per fitting level; the number of values is the number of levels.

    Returns:
        The corrected image, float32, on the input grid.

    Raises:
        ValueError: not a 3D image, or the foreground mask is empty (e.g. an all-zero volume).
    """
    if image.GetDimension() != 3:
        raise ValueError(f"N4 needs a 3D image, got {image.GetDimension()}D.")
    floats = sitk.Cast(image, sitk.sitkFloat32)
    mask = sitk.And(sitk.OtsuThreshold(floats, 0, 1, 200), sitk.BinaryThreshold(floats, 1e-6, 1e38, 1, 0))
    if not np.any(sitk.GetArrayViewFromImage(mask)):
        raise ValueError("N4 bias-field correction found no positive foreground in the volume; run without n4.")
    factors = _shrink_factors(image.GetSize(), int(shrink))
    small = sitk.Shrink(floats, factors)
    small_mask = sitk.Shrink(mask, factors)
    corrector = sitk.N4BiasFieldCorrectionImageFilter()
    corrector.SetMaximumNumberOfIterations([int(i) for i in iterations])
    corrector.Execute(small, small_mask)
    log_bias = corrector.GetLogBiasFieldAsImage(floats)
    corrected = sitk.Divide(floats, sitk.Exp(log_bias))
    corrected.CopyInformation(image)
    return sitk.Cast(corrected, sitk.sitkFloat32)


def resample_isotropic(image: sitk.Image, spacing: float = 1.0, default_value: float | None = None) -> sitk.Image:
    """Resample to isotropic spacing with trilinear interpolation (thesis eq. 4.1).

    The new size is ``round(n_d * s_d / spacing)`` along each axis; origin and direction are kept, so voxel (0, 0, 0)
    stays where it was.

    Args:
        image: a 3D image.
        spacing: target spacing in mm.
        default_value: value for points outside the input; ``None`` uses :func:`robust_background`.

    Returns:
        A float32 image on the new grid.
    """
    if default_value is None:
        default_value = robust_background(image)
    size = [max(1, int(round(n * s / spacing))) for n, s in zip(image.GetSize(), image.GetSpacing())]
    return sitk.Resample(image, size, sitk.Transform(), sitk.sitkLinear, image.GetOrigin(), (spacing,) * 3,
                         image.GetDirection(), float(default_value), sitk.sitkFloat32)


def pad_to_multiple(array: np.ndarray, k: int, value: float) -> tuple[np.ndarray, list[int], list[int]]:
    """Pad symmetrically so that every axis is a multiple of ``k`` (thesis eq. 4.2).

    When the padding of an axis is odd, the extra voxel goes after the volume.

    Args:
        array: (z, y, x) array.
        k: the multiple (>= 1).
        value: the padding value (the thesis uses the volume's minimum).

    Returns:
        ``(padded, pad_before, pad_after)``, the pads in (z, y, x) order.
    """
    target = [int(math.ceil(n / k) * k) for n in array.shape]
    before = [(t - n) // 2 for t, n in zip(target, array.shape)]
    after = [t - n - b for t, n, b in zip(target, array.shape, before)]
    padded = np.pad(array, list(zip(before, after)), mode="constant", constant_values=value)
    return padded, before, after


def normalize_ct(array: np.ndarray, window: Sequence[float] = (-600.0, 1000.0), out: np.ndarray | None = None
                 ) -> np.ndarray:
    """Clip HU to ``window`` and map linearly to [-1, 1] (thesis eq. 4.3).

    Args:
        array: CT in HU, any shape.
        window: (HU_min, HU_max).
        out: a float32 array of ``array``'s shape to write into (may be ``array`` itself, to save a copy).

    Returns:
        float32 array in [-1, 1].
    """
    lo, hi = float(window[0]), float(window[1])
    out = np.clip(array.astype(np.float32, copy=False), lo, hi, out=out)
    out -= lo
    out *= 2.0 / (hi - lo)
    out -= 1.0
    return out


def denormalize_ct(array: np.ndarray, window: Sequence[float] = (-600.0, 1000.0), out: np.ndarray | None = None
                   ) -> np.ndarray:
    """Map [-1, 1] back to HU in ``window`` (inverse of eq. 4.3 on the window).

    Args:
        array: normalised CT, any shape.
        window: (HU_min, HU_max).
        out: a float32 array of ``array``'s shape to write into (may be ``array`` itself, to save a copy).

    Returns:
        float32 array in HU.
    """
    lo, hi = float(window[0]), float(window[1])
    out = np.add(np.asarray(array, dtype=np.float32), np.float32(1.0), out=out)
    out *= np.float32(0.5 * (hi - lo))
    out += np.float32(lo)
    return out


def normalize_mr(array: np.ndarray, percentiles: Sequence[float] = (1.0, 99.0), flat_tolerance: float = 1e-6,
                 reference: np.ndarray | None = None) -> tuple[np.ndarray, float, float, bool]:
    """Clip to the volume's own percentiles and map linearly to [-1, 1] (thesis eq. 4.4).

    Args:
        array: MR intensities, any shape.
        percentiles: (low, high) in [0, 100].
        flat_tolerance: ``P_high - P_low`` below this marks the volume flat.
        reference: voxels to take the percentiles from (default: ``array``), e.g. the volume before padding.

    Returns:
        ``(normalised float32, P_low, P_high, flat)``; a flat volume gives zeros and a :class:`FlatVolumeWarning`.
    """
    source = array if reference is None else reference
    p_lo, p_hi = (float(v) for v in np.percentile(source, [percentiles[0], percentiles[1]]))
    if not p_hi - p_lo > flat_tolerance:
        warnings.warn(f"MR volume is flat (P{percentiles[0]:g} = {p_lo:g}, P{percentiles[1]:g} = {p_hi:g}): set to "
                      "zeros and flagged; training skips it.", FlatVolumeWarning, stacklevel=2)
        return np.zeros(array.shape, np.float32), p_lo, p_hi, True
    out = np.clip(array.astype(np.float32, copy=False), p_lo, p_hi)
    out -= p_lo
    out *= 2.0 / (p_hi - p_lo)
    out -= 1.0
    return out, p_lo, p_hi, False


def preprocess(image: sitk.Image, modality: Modality, config: PreprocessingConfig | None = None
               ) -> PreprocessedVolume:
    """Run the whole chain of thesis section 4 (Algorithm 1) on one 3D volume.

    Args:
        image: a 3D scalar image, CT in HU or MR in arbitrary units.
        modality: ``"ct"`` or ``"mr"``.
        config: parameters; ``None`` uses the thesis's defaults. ``config.n4`` corrects MR volumes with
            :func:`n4_bias_correction` first (CT volumes are never corrected).

    Returns:
        The network-ready (z, y, x) float32 array in [-1, 1] and the record that inverts it; ``record.extra`` holds
        the clipped-voxel counts for quality control.

    Raises:
        ValueError: unknown modality, a non-3D image, or N4 on an MR without positive foreground.
    """
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}.")
    if image.GetDimension() != 3:
        raise ValueError(f"preprocess needs a 3D image, got {image.GetDimension()}D.")
    config = config or PreprocessingConfig()
    input_grid = _grid(image)
    pixel_type = image.GetPixelIDTypeAsString()
    floating = bool(np.issubdtype(sitk.GetArrayViewFromImage(image).dtype, np.floating))
    n4 = modality == "mr" and config.n4
    if n4:
        image = n4_bias_correction(image, config.n4_shrink, config.n4_iterations)
    default_value = robust_background(image, floating)
    resampled = resample_isotropic(reorient_to_ras(image, config.orientation), config.target_spacing, default_value)
    array = sitk.GetArrayViewFromImage(resampled)  # a view: the 1 mm volume is held once (large CTs, issue 7)
    pad_value = float(array.min())
    padded, before_zyx, after_zyx = pad_to_multiple(array, config.k, pad_value)
    flat = False
    if modality == "ct":
        normalised = normalize_ct(padded, config.ct_window, out=padded if padded.dtype == np.float32 else None)
        intensity_range = list(config.ct_window)
    else:
        normalised, p_lo, p_hi, flat = normalize_mr(padded, config.mr_percentiles, config.flat_tolerance,
                                                    reference=array)
        intensity_range = [p_lo, p_hi]
    if flat:
        clipped_low = clipped_high = 0
    else:
        clipped_low = int(np.count_nonzero(array < intensity_range[0]))
        clipped_high = int(np.count_nonzero(array > intensity_range[1]))
    before = before_zyx[::-1]
    direction = np.asarray(resampled.GetDirection()).reshape(3, 3)
    shift = direction @ (np.asarray(before, float) * config.target_spacing)
    padded_grid = {"size": list(padded.shape[::-1]), "spacing": list(resampled.GetSpacing()),
                   "origin": list(np.asarray(resampled.GetOrigin()) - shift), "direction": list(resampled.GetDirection())}
    record = PreprocessRecord(
        modality=modality, config=config.to_dict(), input_grid=input_grid, input_pixel_type=pixel_type,
        resampled_grid=_grid(resampled), padded_grid=padded_grid, pad_before=before, pad_after=after_zyx[::-1],
        default_value=default_value, pad_value=pad_value, intensity_range=intensity_range, flat=flat,
        extra={"voxels": int(array.size), "clipped_low": clipped_low, "clipped_high": clipped_high, "n4": n4})
    logger.info("%s: %s -> %s voxels, range %s, pad %s/%s", modality, input_grid["size"], padded_grid["size"],
                intensity_range, record.pad_before, record.pad_after)
    return PreprocessedVolume(np.ascontiguousarray(normalised, dtype=np.float32), record)


def grid_image(array: np.ndarray, grid: dict[str, list]) -> sitk.Image:
    """Wrap a (z, y, x) array as a SimpleITK image on ``grid``.

    Args:
        array: (z, y, x) array whose shape matches ``grid["size"]`` reversed.
        grid: a grid dict of a :class:`PreprocessRecord`.

    Returns:
        The image with the grid's spacing, origin and direction.

    Raises:
        ValueError: the shape does not match the grid.
    """
    if tuple(array.shape[::-1]) != tuple(grid["size"]):
        raise ValueError(f"array shape (z, y, x) {array.shape} does not match the grid size (x, y, z) {grid['size']}.")
    image = sitk.GetImageFromArray(np.asarray(array))
    image.SetSpacing(tuple(float(v) for v in grid["spacing"]))
    image.SetOrigin(tuple(float(v) for v in grid["origin"]))
    image.SetDirection(tuple(float(v) for v in grid["direction"]))
    return image


def restore_to_input_grid(array: np.ndarray, record: PreprocessRecord, default_value: float | None = None,
                          interpolator: int = sitk.sitkLinear) -> sitk.Image:
    """Put a network-grid array back onto the input's voxel grid: the inverse of :func:`preprocess`'s geometry.

    The padded 1 mm RAS array is placed at its recorded physical position (which undoes the padding, the RAS
    permutation and the resampling at once) and resampled with trilinear interpolation onto the input grid. The
    result has exactly the input's size, spacing, origin and direction.

    Args:
        array: (z, y, x) array on ``record.padded_grid`` (e.g. a network output in [-1, 1]).
        record: the record of the forward run.
        default_value: value for input voxels outside the network grid; ``None`` uses the array's minimum.
        interpolator: a SimpleITK interpolator (default trilinear).

    Returns:
        A float32 image on the input grid.

    Raises:
        ValueError: the array does not have the padded grid's shape.
    """
    source = grid_image(np.asarray(array, dtype=np.float32), record.padded_grid)
    grid = record.input_grid
    if default_value is None:
        default_value = float(np.min(array))
    return sitk.Resample(source, [int(v) for v in grid["size"]], sitk.Transform(), interpolator,
                         tuple(float(v) for v in grid["origin"]), tuple(float(v) for v in grid["spacing"]),
                         tuple(float(v) for v in grid["direction"]), float(default_value), sitk.sitkFloat32)
