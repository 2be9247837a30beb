"""Body and foreground masks for evaluation and intensity harmonisation (thesis sections 5 E1-E2 and 7.6).

Metrics "inside a mask" (Wolterink et al. 2017: MAE within a head mask that excludes surrounding air) and the
harmonisation statistics of thesis section 7.6 (median/MAD "using lung mask statistics", Nyul landmarks) are taken
inside a body mask, so that the air around the patient and the padding of the network grid do not dominate them.

* CT: voxels above ``-500 HU``, holes filled slice by slice in the axial plane (so the lungs, enclosed by the chest
  wall, are inside), then the largest 3D connected component (drops the table and loose objects).
* MR: voxels above the Otsu threshold of the volume, then the same hole filling and largest component.

Arrays are NumPy (z, y, x). Functions take either input units (HU for CT) or the network's normalised [-1, 1]
intensities, as stated by their ``normalised`` argument.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["MASK_MODES", "CT_BODY_THRESHOLD_HU", "body_mask", "valid_mask", "evaluation_mask"]

#: How metrics are restricted: ``"body"`` (body mask and no padding) or ``"none"`` (every voxel but the padding).
MASK_MODES = ("body", "none")
#: CT body threshold in HU: soft tissue and bone are above, air and most lung parenchyma below.
CT_BODY_THRESHOLD_HU = -500.0


def _otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of a 1D sample (maximises the between-class variance of a ``bins``-bin histogram)."""
    counts, edges = np.histogram(values, bins=bins)
    centres = 0.5 * (edges[:-1] + edges[1:])
    weight_low = np.cumsum(counts).astype(np.float64)
    weight_high = weight_low[-1] - weight_low
    cum_mean = np.cumsum(counts * centres)
    mean_low = cum_mean / np.maximum(weight_low, 1)
    mean_high = (cum_mean[-1] - cum_mean) / np.maximum(weight_high, 1)
    between = weight_low * weight_high * (mean_low - mean_high) ** 2
    return float(edges[int(np.argmax(between[:-1])) + 1])


def _fill_and_keep_largest(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    filled = np.empty_like(mask)
    for z in range(mask.shape[0]):
        filled[z] = ndimage.binary_fill_holes(mask[z])
    labels, count = ndimage.label(filled)
    if count <= 1:
        return filled
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def body_mask(volume: np.ndarray, modality: str, normalised: bool = True,
              ct_window: Sequence[float] = (-600.0, 1000.0), valid: np.ndarray | None = None) -> np.ndarray:
    """The patient's body: threshold, axial hole filling, largest connected component.

    Args:
        volume: (z, y, x) CT or MR.
        modality: ``"ct"`` (threshold :data:`CT_BODY_THRESHOLD_HU`) or ``"mr"`` (Otsu threshold).
        normalised: ``True`` when ``volume`` is in the network's [-1, 1] (CT through ``ct_window``); ``False`` for
            input units (HU for CT; any unit for MR, where Otsu needs none).
        ct_window: the CT window (HU) that maps to [-1, 1], used to place the threshold when ``normalised``.
        valid: voxels that may belong to the mask (e.g. :func:`valid_mask`, excluding padding); default all.

    Returns:
        Boolean (z, y, x) mask. When the threshold leaves nothing, the ``valid`` voxels (all voxels) are returned,
        so that metrics never run on an empty set.

    Raises:
        ValueError: unknown modality or a non-3D array.
    """
    if modality not in ("ct", "mr"):
        raise ValueError(f"modality must be 'ct' or 'mr', got {modality!r}.")
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise ValueError(f"body_mask needs a (z, y, x) volume, got shape {volume.shape}.")
    allowed = np.ones(volume.shape, bool) if valid is None else np.asarray(valid, bool)
    if modality == "ct":
        threshold = CT_BODY_THRESHOLD_HU
        if normalised:
            lo, hi = float(ct_window[0]), float(ct_window[1])
            threshold = (CT_BODY_THRESHOLD_HU - lo) * 2.0 / (hi - lo) - 1.0
    else:
        values = volume[allowed]
        threshold = _otsu_threshold(values) if values.size and np.ptp(values) > 0 else np.inf
    mask = (volume > threshold) & allowed
    if not mask.any():
        return allowed.copy()
    return _fill_and_keep_largest(mask) & allowed


def valid_mask(shape: Sequence[int], pad_before: Sequence[int], pad_after: Sequence[int]) -> np.ndarray:
    """Voxels of a padded network-grid volume that are not padding.

    Args:
        shape: (z, y, x) shape of the padded volume.
        pad_before: padding before the volume, (x, y, z) as :class:`ct2mr.preprocessing.pipeline.PreprocessRecord` stores it.
        pad_after: padding after the volume, (x, y, z).

    Returns:
        Boolean (z, y, x) mask, ``True`` inside the resampled volume.
    """
    mask = np.zeros(tuple(int(s) for s in shape), bool)
    before = [int(v) for v in pad_before][::-1]
    after = [int(v) for v in pad_after][::-1]
    mask[tuple(slice(b, n - a) for b, a, n in zip(before, after, mask.shape))] = True
    return mask


def evaluation_mask(volume: np.ndarray, modality: str, record, mode: str = "body") -> np.ndarray:
    """The mask metrics use on a preprocessed network-grid volume.

    Args:
        volume: (z, y, x) preprocessed volume in [-1, 1].
        modality: ``"ct"`` or ``"mr"``.
        record: its :class:`ct2mr.preprocessing.pipeline.PreprocessRecord` (padding, CT window).
        mode: one of :data:`MASK_MODES`.

    Returns:
        Boolean (z, y, x) mask.

    Raises:
        ValueError: unknown mode.
    """
    if mode not in MASK_MODES:
        raise ValueError(f"mask must be one of {MASK_MODES}, got {mode!r}.")
    valid = valid_mask(volume.shape, record.pad_before, record.pad_after)
    if mode == "none":
        return valid
    window = record.config.get("ct_window", (-600.0, 1000.0))
    return body_mask(volume, modality, normalised=True, ct_window=window, valid=valid)
