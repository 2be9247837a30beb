"""Post-hoc intensity harmonisation of synthetic MR (thesis section 7.6, "Immediate practical recommendations").

The thesis finds that every CycleGAN variant preserves anatomy but misses the MR intensity law (global shift and
scale drift, collapsed modes, saturation; section 7.4, figures 8 and 11) and recommends, as a fallback that needs no
retraining, harmonising the synthetic MR at inference. Three methods are provided, each a function on NumPy (z, y, x)
arrays or SimpleITK images (the result has the input's type and grid):

* ``"histogram"``: histogram matching by quantile mapping (:func:`histogram_match`): every voxel value is moved to the
  reference value at the same quantile, the quantiles taken inside the masks at :data:`HISTOGRAM_QUANTILES` evenly
  spaced levels and interpolated linearly in between. Output units: the reference's.
* ``"nyul"``: Nyul-Udupa landmark standardisation (Nyul and Udupa, MRM 1999; Nyul et al., IEEE TMI 2000;
  :func:`nyul_fit`, :func:`nyul_apply`): the landmarks are the percentiles :data:`NYUL_PERCENTILES` (1, 10, 20, ...,
  90, 99) inside the mask; the standard scale is the mean over the reference volumes of their landmarks, each
  reference first mapped linearly so that its P1 and P99 land on the standard range ``(s1, s2)``; a volume is mapped
  piecewise linearly from its own landmarks onto the standard landmarks (linear extrapolation of the first and last
  segments outside P1-P99). Output units: the standard scale's (by default the references' own mean P1-P99 range).
* ``"zscore"``: robust standardisation inside a mask (:func:`robust_standardize`):
  ``(v - median) / MAD * target_MAD + target_median``, MAD the median absolute deviation (unscaled). With no target
  the output is ``(v - median) / (1.4826 MAD)``: robust z-scores, unitless (1.4826 MAD estimates the standard
  deviation of a Gaussian).

Statistics come from the voxels inside the masks only; the mapping is applied to every voxel. In ct2mr the synthetic
MR and the reference MR are both in the network's normalised MR intensity (MR volumes clipped to their own P1-P99 and
mapped to [-1, 1], thesis eq. 4.4); :class:`Harmonizer` then clips its output to [-1, 1] so that the synthetic MR
keeps that contract (robust z-scores without a reference excepted).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import SimpleITK as sitk

if TYPE_CHECKING:
    from ct2mr.preprocessing.pipeline import PreprocessingConfig

__all__ = [
    "HARMONIZATION_METHODS",
    "HISTOGRAM_QUANTILES",
    "NYUL_PERCENTILES",
    "MAD_TO_STD",
    "histogram_match",
    "nyul_landmarks",
    "nyul_fit",
    "nyul_apply",
    "robust_standardize",
    "Harmonizer",
    "fit_harmonizer",
    "load_reference_mrs",
]

#: Accepted ``--harmonize`` values; ``"none"`` leaves the synthetic MR as the generator made it.
HARMONIZATION_METHODS = ("none", "histogram", "nyul", "zscore")
#: Quantile levels of histogram matching (evenly spaced in [0, 1]).
HISTOGRAM_QUANTILES = 1024
#: Nyul landmarks: percentiles P1, P10, ..., P90, P99.
NYUL_PERCENTILES = (1.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 99.0)
#: 1 / Phi^-1(3/4): MAD times this estimates a Gaussian's standard deviation.
MAD_TO_STD = 1.4826


def _array(volume: np.ndarray | sitk.Image) -> np.ndarray:
    if isinstance(volume, sitk.Image):
        return sitk.GetArrayFromImage(volume).astype(np.float64)
    return np.asarray(volume, dtype=np.float64)


def _like(result: np.ndarray, original: np.ndarray | sitk.Image) -> np.ndarray | sitk.Image:
    result = result.astype(np.float32)
    if isinstance(original, sitk.Image):
        image = sitk.GetImageFromArray(result)
        image.CopyInformation(original)
        return image
    return result


def _values(array: np.ndarray, mask: np.ndarray | sitk.Image | None) -> np.ndarray:
    if mask is None:
        values = array.ravel()
    else:
        m = sitk.GetArrayViewFromImage(mask) if isinstance(mask, sitk.Image) else np.asarray(mask)
        if m.shape != array.shape:
            raise ValueError(f"mask shape {m.shape} does not match the volume shape {array.shape}.")
        values = array[m.astype(bool)]
    values = values[np.isfinite(values)]
    if values.size == 0:
        raise ValueError("The mask selects no voxels; harmonisation needs statistics from at least one voxel.")
    return values


def _monotone_map(values: np.ndarray, source_points: np.ndarray, target_points: np.ndarray,
                  extrapolate: bool) -> np.ndarray:
    """Piecewise-linear map through (source_points, target_points); repeated source points are merged."""
    source_points, index = np.unique(source_points, return_inverse=True)
    sums = np.bincount(index, weights=target_points)
    target_points = sums / np.bincount(index)
    if source_points.size == 1:
        return values - source_points[0] + target_points[0]
    out = np.interp(values, source_points, target_points)
    if extrapolate:
        low, high = values < source_points[0], values > source_points[-1]
        slope_low = (target_points[1] - target_points[0]) / (source_points[1] - source_points[0])
        slope_high = (target_points[-1] - target_points[-2]) / (source_points[-1] - source_points[-2])
        out[low] = target_points[0] + (values[low] - source_points[0]) * slope_low
        out[high] = target_points[-1] + (values[high] - source_points[-1]) * slope_high
    return out


def histogram_match(source: np.ndarray | sitk.Image, reference: np.ndarray | sitk.Image | Sequence[np.ndarray],
                    source_mask: np.ndarray | sitk.Image | None = None,
                    reference_mask: np.ndarray | sitk.Image | Sequence[np.ndarray] | None = None,
                    quantiles: int = HISTOGRAM_QUANTILES) -> np.ndarray | sitk.Image:
    """Match the intensity histogram of ``source`` to ``reference`` by quantile mapping (thesis 7.6).

    ``q_s(l)`` and ``q_r(l)`` are the source's and reference's quantiles at ``quantiles`` levels ``l`` evenly spaced
    in [0, 1], inside their masks; every source voxel ``v`` becomes ``interp(v, q_s, q_r)``. Values below the
    source's minimum or above its maximum (outside the mask) take the reference's extremes.

    Args:
        source: (z, y, x) volume to harmonise (array or SimpleITK image), any units.
        reference: the reference volume(s) (their voxels are pooled), in the units the output should have.
        source_mask: boolean (z, y, x) mask of ``source`` for the statistics; ``None``: every voxel.
        reference_mask: mask(s) of ``reference``, one per reference volume; ``None``: every voxel.
        quantiles: number of quantile levels (>= 2).

    Returns:
        The matched volume, float32, same type and grid as ``source``, in the reference's units.

    Raises:
        ValueError: ``quantiles`` < 2, mismatching mask shapes or an empty mask.
    """
    if int(quantiles) < 2:
        raise ValueError(f"quantiles must be >= 2, got {quantiles}.")
    src = _array(source)
    references = list(reference) if isinstance(reference, (list, tuple)) else [reference]
    masks = list(reference_mask) if isinstance(reference_mask, (list, tuple)) else [reference_mask] * len(references)
    if len(masks) != len(references):
        raise ValueError(f"{len(references)} reference volumes but {len(masks)} reference masks.")
    ref_values = np.concatenate([_values(_array(r), m) for r, m in zip(references, masks)])
    levels = np.linspace(0.0, 1.0, int(quantiles))
    q_source = np.quantile(_values(src, source_mask), levels)
    q_reference = np.quantile(ref_values, levels)
    return _like(_monotone_map(src, q_source, q_reference, extrapolate=False), source)


def nyul_landmarks(volume: np.ndarray | sitk.Image, mask: np.ndarray | sitk.Image | None = None,
                   percentiles: Sequence[float] = NYUL_PERCENTILES) -> np.ndarray:
    """The Nyul landmarks of one volume: its intensity percentiles inside ``mask``.

    Args:
        volume: (z, y, x) volume, any units.
        mask: boolean (z, y, x) mask; ``None``: every voxel.
        percentiles: increasing percentiles in [0, 100] (default :data:`NYUL_PERCENTILES`).

    Returns:
        float64 array of the landmark intensities, in the volume's units.

    Raises:
        ValueError: fewer than 2 percentiles, or not increasing.
    """
    percentiles = np.asarray(percentiles, float)
    if percentiles.size < 2 or np.any(np.diff(percentiles) <= 0) or percentiles[0] < 0 or percentiles[-1] > 100:
        raise ValueError(f"percentiles must be >= 2 increasing values in [0, 100], got {list(percentiles)}.")
    return np.percentile(_values(_array(volume), mask), percentiles)


def nyul_fit(references: Sequence[np.ndarray | sitk.Image], masks: Sequence[np.ndarray | None] | None = None,
             percentiles: Sequence[float] = NYUL_PERCENTILES, scale: tuple[float, float] | None = None
             ) -> np.ndarray:
    """Learn the Nyul standard scale from reference volumes.

    Each reference's landmarks are mapped linearly so that its first and last landmarks (P1, P99) land on
    ``scale = (s1, s2)``; the standard landmarks are the mean of the mapped landmarks over the references.

    Args:
        references: reference (z, y, x) volumes (e.g. real MR in normalised [-1, 1]).
        masks: one boolean mask per reference, or ``None`` for every voxel.
        percentiles: landmark percentiles (default :data:`NYUL_PERCENTILES`).
        scale: the standard range ``(s1, s2)``; ``None`` uses the references' mean first and last landmarks, so
            the output stays in the references' units.

    Returns:
        The standard landmarks, float64, one per percentile.

    Raises:
        ValueError: no references, a flat reference (P1 = P99), or a bad scale.
    """
    references = list(references)
    if not references:
        raise ValueError("Nyul standardisation needs at least one reference volume.")
    masks = list(masks) if masks is not None else [None] * len(references)
    landmarks = np.stack([nyul_landmarks(r, m, percentiles) for r, m in zip(references, masks)])
    if np.any(landmarks[:, -1] - landmarks[:, 0] <= 0):
        raise ValueError("A reference volume is flat inside its mask (P1 = P99); Nyul standardisation cannot use it.")
    if scale is None:
        scale = (float(landmarks[:, 0].mean()), float(landmarks[:, -1].mean()))
    s1, s2 = float(scale[0]), float(scale[1])
    if not s1 < s2:
        raise ValueError(f"scale must be (s1, s2) with s1 < s2, got {scale}.")
    lo, hi = landmarks[:, :1], landmarks[:, -1:]
    return (s1 + (landmarks - lo) * (s2 - s1) / (hi - lo)).mean(axis=0)


def nyul_apply(volume: np.ndarray | sitk.Image, standard: Sequence[float], mask: np.ndarray | sitk.Image | None = None,
               percentiles: Sequence[float] = NYUL_PERCENTILES) -> np.ndarray | sitk.Image:
    """Map a volume piecewise linearly from its own landmarks onto the standard landmarks (Nyul et al. 2000).

    Args:
        volume: (z, y, x) volume (array or SimpleITK image), any units.
        standard: standard landmarks from :func:`nyul_fit` (same number as ``percentiles``).
        mask: boolean (z, y, x) mask for the volume's landmarks; ``None``: every voxel.
        percentiles: the landmark percentiles used by :func:`nyul_fit`.

    Returns:
        The standardised volume, float32, same type and grid as ``volume``, in the standard scale's units.

    Raises:
        ValueError: ``standard`` and ``percentiles`` differ in length.
    """
    standard = np.asarray(standard, float)
    if standard.size != len(percentiles):
        raise ValueError(f"{standard.size} standard landmarks for {len(percentiles)} percentiles.")
    array = _array(volume)
    own = nyul_landmarks(array, mask, percentiles)
    return _like(_monotone_map(array, own, standard, extrapolate=True), volume)


def robust_standardize(volume: np.ndarray | sitk.Image, mask: np.ndarray | sitk.Image | None = None,
                       target_median: float | None = None, target_mad: float | None = None
                       ) -> np.ndarray | sitk.Image:
    """Median/MAD standardisation inside a mask (thesis 7.6 (i), "robust standardization").

    ``out = (v - median) / MAD * target_mad + target_median`` with median and MAD (median absolute deviation,
    unscaled) of the volume inside ``mask``. Without targets, ``out = (v - median) / (1.4826 MAD)``: robust z-scores.

    Args:
        volume: (z, y, x) volume (array or SimpleITK image), any units.
        mask: boolean (z, y, x) mask for the statistics; ``None``: every voxel.
        target_median: the median the output should have (e.g. a reference MR's); ``None``: 0.
        target_mad: the MAD the output should have; ``None``: ``1 / 1.4826`` (unit robust standard deviation).

    Returns:
        The standardised volume, float32, same type and grid as ``volume``.

    Raises:
        ValueError: the volume is constant inside the mask (MAD = 0), or ``target_mad`` <= 0.
    """
    array = _array(volume)
    values = _values(array, mask)
    median = float(np.median(values))
    mad = float(np.median(np.abs(values - median)))
    if not mad > 0:
        raise ValueError("The volume is (nearly) constant inside the mask (MAD = 0); it cannot be standardised.")
    target_median = 0.0 if target_median is None else float(target_median)
    target_mad = 1.0 / MAD_TO_STD if target_mad is None else float(target_mad)
    if not target_mad > 0:
        raise ValueError(f"target_mad must be > 0, got {target_mad}.")
    return _like((array - median) / mad * target_mad + target_median, volume)


@dataclass
class Harmonizer:
    """A fitted harmonisation, applied to synthetic MR volumes (``ct2mr translate --harmonize``, ``ct2mr evaluate``).

    Attributes:
        method: one of :data:`HARMONIZATION_METHODS`.
        reference_quantiles: ``"histogram"``: the pooled reference quantiles at :data:`HISTOGRAM_QUANTILES` levels.
        standard: ``"nyul"``: the standard landmarks at ``percentiles``.
        percentiles: ``"nyul"``: the landmark percentiles.
        target_median: ``"zscore"``: the reference's median (``None``: robust z-scores).
        target_mad: ``"zscore"``: the reference's MAD.
        clip: output range after harmonisation, ``None`` for none.
        references: names of the reference volumes.
    """

    method: str = "none"
    reference_quantiles: np.ndarray | None = None
    standard: np.ndarray | None = None
    percentiles: tuple[float, ...] = NYUL_PERCENTILES
    target_median: float | None = None
    target_mad: float | None = None
    clip: tuple[float, float] | None = (-1.0, 1.0)
    references: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.method not in HARMONIZATION_METHODS:
            raise ValueError(f"harmonisation method must be one of {HARMONIZATION_METHODS}, got {self.method!r}.")

    def apply(self, volume: np.ndarray | sitk.Image, mask: np.ndarray | sitk.Image | None = None
              ) -> np.ndarray | sitk.Image:
        """Harmonise one (z, y, x) volume (array or SimpleITK image; same type back), statistics inside ``mask``."""
        if self.method == "none":
            return volume
        if self.method == "histogram":
            out = histogram_match(volume, np.asarray(self.reference_quantiles), mask, None,
                                  quantiles=len(self.reference_quantiles))
        elif self.method == "nyul":
            out = nyul_apply(volume, self.standard, mask, self.percentiles)
        else:
            out = robust_standardize(volume, mask, self.target_median, self.target_mad)
        if self.clip is None:
            return out
        if isinstance(out, sitk.Image):
            return sitk.Clamp(out, sitk.sitkFloat32, float(self.clip[0]), float(self.clip[1]))
        return np.clip(out, self.clip[0], self.clip[1]).astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description (method, parameters, references)."""
        out: dict[str, Any] = {"method": self.method, "clip": list(self.clip) if self.clip else None,
                               "references": list(self.references)}
        if self.method == "nyul":
            out.update(percentiles=list(self.percentiles), standard=[round(float(v), 6) for v in self.standard])
        elif self.method == "zscore":
            out.update(target_median=self.target_median, target_mad=self.target_mad)
        elif self.method == "histogram":
            out.update(quantile_levels=len(self.reference_quantiles))
        return out


def fit_harmonizer(method: str, references: Sequence[np.ndarray] = (), masks: Sequence[np.ndarray | None] | None = None,
                   names: Sequence[str] = (), clip: tuple[float, float] | None = (-1.0, 1.0)) -> Harmonizer:
    """Fit a :class:`Harmonizer` on reference MR volumes.

    Args:
        method: one of :data:`HARMONIZATION_METHODS`.
        references: reference (z, y, x) MR volumes in the units the output should have (ct2mr: normalised [-1, 1]);
            required by ``"histogram"`` and ``"nyul"``, optional for ``"zscore"`` (without: robust z-scores, and no
            clipping).
        masks: one boolean mask per reference (``None``: every voxel).
        names: names of the references, recorded.
        clip: output range (the normalised MR range by default).

    Returns:
        The fitted harmonizer.

    Raises:
        ValueError: unknown method, or a method that needs references got none.
    """
    if method not in HARMONIZATION_METHODS:
        raise ValueError(f"harmonisation method must be one of {HARMONIZATION_METHODS}, got {method!r}.")
    references = list(references)
    masks = list(masks) if masks is not None else [None] * len(references)
    if method in ("histogram", "nyul") and not references:
        raise ValueError(f"--harmonize {method} needs at least one reference MR (--reference-mr PATH).")
    names = list(names)
    if method == "none":
        return Harmonizer("none", clip=None, references=names)
    if method == "histogram":
        pooled = np.concatenate([_values(_array(r), m) for r, m in zip(references, masks)])
        quantiles = np.quantile(pooled, np.linspace(0.0, 1.0, HISTOGRAM_QUANTILES))
        return Harmonizer("histogram", reference_quantiles=quantiles, clip=clip, references=names)
    if method == "nyul":
        return Harmonizer("nyul", standard=nyul_fit(references, masks), clip=clip, references=names)
    if not references:
        return Harmonizer("zscore", clip=None, references=names)
    pooled = np.concatenate([_values(_array(r), m) for r, m in zip(references, masks)])
    median = float(np.median(pooled))
    mad = float(np.median(np.abs(pooled - median)))
    if not mad > 0:
        raise ValueError("The reference MR is constant inside its mask (MAD = 0); choose another reference.")
    return Harmonizer("zscore", target_median=median, target_mad=mad, clip=clip, references=names)


def load_reference_mrs(paths: Sequence[str] | str, config: PreprocessingConfig | None = None, mask: str = "body"
                       ) -> tuple[list[np.ndarray], list[np.ndarray], list[str]]:
    """Read reference MR volumes and bring them into the network's normalised MR intensity.

    Every volume goes through the thesis's preprocessing chain (:func:`ct2mr.preprocessing.pipeline.preprocess`, modality
    ``"mr"``, 4D series split; outputs of ``ct2mr preprocess`` are used as they are;
    :func:`ct2mr.preprocessing.collections.load_domain`), so that its intensities are those the synthetic MR is
    compared with: [-1, 1] after clipping to its own P1-P99.

    Args:
        paths: MR files or folders.
        config: the :class:`ct2mr.preprocessing.pipeline.PreprocessingConfig` of the model (``None``: thesis defaults).
        mask: ``"body"`` (MR body mask, :func:`ct2mr.preprocessing.masks.body_mask`) or ``"none"`` (every non-padding voxel).

    Returns:
        ``(volumes, masks, names)``: (z, y, x) float32 arrays in [-1, 1] on their 1 mm RAS grids, boolean masks,
        volume names.

    Raises:
        FileNotFoundError, ct2mr.io.images.ImageReadError, ValueError: unreadable or unusable references.
    """
    from ct2mr.preprocessing.collections import load_domain
    from ct2mr.preprocessing.masks import evaluation_mask

    volumes = load_domain(paths, "mr", config)
    arrays = [v.array for v in volumes]
    masks = [evaluation_mask(v.array, "mr", v.record, mask) for v in volumes]
    return arrays, masks, [v.name for v in volumes]
