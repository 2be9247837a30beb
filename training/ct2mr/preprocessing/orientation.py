"""Left-right orientation check between CT and MR collections (thesis section 4.1, "anatomical sidedness").

Reorientation to RAS trusts the direction cosines. A header that disagrees with the pixel data (a mirrored export, a
converter that drops a flip) puts the patient's heart on the wrong side of the RAS grid, silently; in unpaired
training the two collections then teach mirrored anatomy. The thesis verifies sidedness anatomically (e.g. the
heart's position); this module does that automatically on preprocessed volumes.

What :func:`heart_side` measures (one number per volume, ``offset_mm``):

1. Axial slices (third RAS axis) of the unpadded 1 mm RAS volume. Foreground: CT above -400 HU (from the stored
   window; the whole window when it starts above -400 HU), MR above the volume's Otsu threshold. The body is the
   largest connected foreground component, filled along both in-plane axes (so the lungs are inside it).
2. "Lung" voxels: background inside the filled body. A slice is *thoracic* when such voxels make up at least 5 % of
   the body's cross-section on each side of the body's centre line (both lungs present) and none of them touches the
   lateral edges of the field of view (lungs not cut).
3. In each thoracic slice and each row along the R-L axis, the *mediastinal span* runs from the outermost lung voxel
   on one side to the outermost on the other. The slice's offset is the R-L distance from the centre of that span to
   the centroid of the non-lung tissue inside it (heart, great vessels, spine, in mm along the patient's right).
4. ``offset_mm`` is the median over the thoracic slices, ``agreement`` the fraction of slices with its sign.

With the heart on the patient's left (situs solitus) the offset is negative: side ``"left"``. A left-right flip of the
pixel data relative to its header makes it positive (``"right"``). It is ``"indeterminate"`` with fewer than
``min_slices`` thoracic slices (default 30, i.e. 3 cm of chest with both lungs), ``|offset_mm| < min_offset_mm``
(3 mm) or ``agreement < min_agreement`` (65 %).

Limits, stated plainly: it needs both lungs and the whole chest width in the field of view. Abdominal volumes and
short MR slabs are usually indeterminate. A crop centred on the heart (e.g. ``thorax_cta_heart_crop_1p5mm``) or an
MR whose field of view is centred on the heart (cardiac short-axis cine with a circular field of view and coil
shading) can give a confident but wrong side, so a flag is a prompt to look at the volume, not a verdict. True
mediastinal shift (pneumothorax, atelectasis, pneumonectomy) and dextrocardia give a genuine ``"right"``. It checks
the R-L axis only; anterior-posterior and superior-inferior flips are not detected.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import SimpleITK as sitk

from ct2mr.preprocessing.pipeline import PreprocessRecord

__all__ = ["SIDES", "EXPECTED_SIDE", "SideIndicator", "OrientationReport", "heart_side", "check_orientation"]

#: Values of :attr:`SideIndicator.side`.
SIDES = ("left", "right", "indeterminate")
#: The heart's side in situs solitus, the anatomical prior every determinate volume is compared with.
EXPECTED_SIDE = "left"


@dataclass
class SideIndicator:
    """Where the mediastinum (heart) of one volume falls along the patient's R-L axis.

    Attributes:
        side: ``"left"``, ``"right"`` or ``"indeterminate"``.
        offset_mm: median per-slice offset of the mediastinal tissue from the centre of the span between the lungs,
            mm, positive towards the patient's right; ``None`` without thoracic slices.
        agreement: fraction of thoracic slices whose offset has the median's sign (0..1).
        slices: number of thoracic slices used.
        reason: why the side is indeterminate (empty otherwise).
    """

    side: str
    offset_mm: float | None
    agreement: float | None
    slices: int
    reason: str = ""


@dataclass
class OrientationReport:
    """The orientation check of several collections.

    Attributes:
        majority: per collection, the majority side of its determinate volumes (``"indeterminate"`` when none).
        votes: per collection, counts of ``left`` / ``right`` / ``indeterminate`` volumes.
        flagged_volumes: ``(collection, name, reason)`` for each volume whose side is not :data:`EXPECTED_SIDE`.
        flagged_collections: ``{collection: reason}`` for each collection whose majority contradicts the anatomical
            prior or the majority of another collection.
    """

    majority: dict[str, str]
    votes: dict[str, dict[str, int]]
    flagged_volumes: list[tuple[str, str, str]] = field(default_factory=list)
    flagged_collections: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """No volume and no collection flagged."""
        return not self.flagged_volumes and not self.flagged_collections


def _largest_component(mask: np.ndarray) -> np.ndarray:
    if not mask.any():
        return mask
    labels = sitk.RelabelComponent(sitk.ConnectedComponent(sitk.GetImageFromArray(mask.astype(np.uint8))),
                                   sortByObjectSize=True)
    return sitk.GetArrayViewFromImage(labels) == 1


def _between(mask: np.ndarray, axis: int) -> np.ndarray:
    """Voxels between the first and the last ``True`` along ``axis`` (inclusive)."""
    counts = np.cumsum(mask, axis=axis, dtype=np.int32)
    total = np.take(counts, [-1], axis=axis)
    return ((counts > 0) & (counts < total)) | mask


def _foreground(volume: np.ndarray, modality: str, intensity_range: Sequence[float]) -> np.ndarray:
    if modality == "ct":
        lo, hi = float(intensity_range[0]), float(intensity_range[1])
        threshold_hu = max(-400.0, lo)
        threshold = 2.0 * (threshold_hu - lo) / (hi - lo) - 1.0
        return volume > threshold + (1e-6 if threshold_hu == lo else 0.0)
    otsu = sitk.OtsuThreshold(sitk.GetImageFromArray(np.ascontiguousarray(volume, dtype=np.float32)), 0, 1)
    return sitk.GetArrayViewFromImage(otsu) > 0


def heart_side(array: np.ndarray, record: PreprocessRecord, min_offset_mm: float = 3.0,
               min_agreement: float = 0.65, min_slices: int = 30) -> SideIndicator:
    """The left-right indicator of one preprocessed volume (see the module's description for what it measures).

    Args:
        array: the preprocessed float32 (z, y, x) volume in [-1, 1] on ``record.padded_grid`` (1 mm RAS, padded).
        record: its :class:`~ct2mr.preprocessing.pipeline.PreprocessRecord` (padding, intensity range, grid).
        min_offset_mm: smaller median offsets (mm) are indeterminate.
        min_agreement: lower fractions of slices agreeing in sign are indeterminate.
        min_slices: fewer thoracic slices are indeterminate.

    Returns:
        The :class:`SideIndicator`.

    Raises:
        ValueError: the array does not have the shape of ``record.padded_grid``.
    """
    if tuple(array.shape[::-1]) != tuple(record.padded_grid["size"]):
        raise ValueError(f"array shape (z, y, x) {array.shape} does not match the record's padded grid "
                         f"{record.padded_grid['size']} (x, y, z).")
    if record.flat:
        return SideIndicator("indeterminate", None, None, 0, "flat volume")
    before = record.pad_before[::-1]
    size = record.resampled_grid["size"][::-1]
    volume = array[tuple(slice(b, b + n) for b, n in zip(before, size))]
    foreground = _foreground(volume, record.modality, record.intensity_range)
    body = _largest_component(foreground)
    filled = _between(body, 2) & _between(body, 1)
    lungs = filled & ~foreground
    area = np.maximum(filled.sum(axis=(1, 2)), 1)
    xs = np.arange(volume.shape[2])
    centre = (filled.sum(axis=1) * xs).sum(axis=1) / area
    low_side = xs[None, None, :] < centre[:, None, None]
    low = (lungs & low_side).sum(axis=(1, 2)) / area
    high = (lungs & ~low_side).sum(axis=(1, 2)) / area
    cut = lungs[:, :, :2].any(axis=(1, 2)) | lungs[:, :, -2:].any(axis=(1, 2))  # lungs cut by the field of view
    thoracic = np.nonzero((low >= 0.05) & (high >= 0.05) & ~cut)[0]
    span = _between(lungs, 2)
    offsets = []
    for z in thoracic:
        tissue = span[z] & foreground[z]
        if tissue.sum() < 50:
            continue
        offsets.append(np.nonzero(tissue)[1].mean() - np.nonzero(span[z])[1].mean())
    if len(offsets) < min_slices:
        return SideIndicator("indeterminate", None, None, len(offsets),
                             f"{len(offsets)} thoracic slice(s) with both lungs (needs {min_slices})")
    # array x in the RAS grid: its direction's R component converts voxels to mm towards the patient's right
    direction = np.asarray(record.padded_grid["direction"], float).reshape(3, 3)
    to_right_mm = -direction[0, 0] * float(record.padded_grid["spacing"][0])
    values = np.asarray(offsets) * to_right_mm
    median = float(np.median(values))
    agreement = float(np.mean(np.sign(values) == np.sign(median))) if median else 0.0
    if abs(median) < min_offset_mm:
        return SideIndicator("indeterminate", median, agreement, len(values),
                             f"offset {median:+.1f} mm is below {min_offset_mm} mm")
    if agreement < min_agreement:
        return SideIndicator("indeterminate", median, agreement, len(values),
                             f"only {agreement:.0%} of slices agree (needs {min_agreement:.0%})")
    return SideIndicator("right" if median > 0 else "left", median, agreement, len(values))


def check_orientation(collections: Mapping[str, Sequence[tuple[str, SideIndicator]]]) -> OrientationReport:
    """Compare the sides of several collections (e.g. ``{"ct": [...], "mr": [...]}``) and flag disagreements.

    A volume is flagged when it is determinate and not on :data:`EXPECTED_SIDE` (the heart on the patient's left).
    A collection is flagged when the majority of its determinate volumes is on the other side. The anatomical prior
    is the anchor: when the CT and the MR majorities disagree, the one with the heart on the right is flagged (and the
    message names the other), rather than both.

    Args:
        collections: per collection name, ``(volume name, indicator)`` pairs.

    Returns:
        The :class:`OrientationReport`.
    """
    majority: dict[str, str] = {}
    votes: dict[str, dict[str, int]] = {}
    flagged_volumes: list[tuple[str, str, str]] = []
    for label, items in collections.items():
        counts = Counter(ind.side for _, ind in items)
        votes[label] = {side: int(counts.get(side, 0)) for side in SIDES}
        left, right = counts.get("left", 0), counts.get("right", 0)
        majority[label] = "left" if left > right else "right" if right > left else "indeterminate"
        for name, ind in items:
            if ind.side not in ("indeterminate", EXPECTED_SIDE):
                flagged_volumes.append((label, name, f"heart/mediastinum on the patient's {ind.side} "
                                        f"({ind.offset_mm:+.1f} mm, {ind.agreement:.0%} of {ind.slices} slices): "
                                        "possible left-right flip"))
    flagged_collections: dict[str, str] = {}
    for label, side in majority.items():
        if side in ("indeterminate", EXPECTED_SIDE):
            continue
        others = [o for o, s in majority.items() if o != label and s == EXPECTED_SIDE]
        flagged_collections[label] = (f"most determinate volumes have the heart on the patient's {side}"
                                      + (f", unlike the majority of {', '.join(others)}" if others else "")
                                      + ": check for a left-right flip between the collections")
    return OrientationReport(majority, votes, flagged_volumes, flagged_collections)
