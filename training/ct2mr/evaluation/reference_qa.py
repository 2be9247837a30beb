"""Quality assurance of a synthetic MR against a registered reference MR (issue 16; ``ct2mr qa``).

When the user has a real MR of the same patient, registered onto the CT (so onto the synthetic MR's grid), the
synthetic MR can be scored voxel by voxel. :func:`reference_qa` writes the signed difference map and a metrics
table, with definitions that state the mask, the range and the clipping, so that the numbers compare with published
ones (SynthRAD2025 reports MAE, PSNR and MS-SSIM inside the body mask; Wolterink et al. 2017 MAE and PSNR inside a
head mask):

* **Units.** The synthetic MR is in the network's normalised MR units. The reference MR is brought to the same units
  the way the model's MR preprocessing does it (thesis section 4): clipped to its own 1st-99th percentiles over all
  its voxels and mapped linearly to [-1, 1] (``reference_units="raw"``, the default; ``percentiles`` changes the
  pair); ``"normalised"`` takes a reference already in [-1, 1]. Both are then **clipped to [-1, 1]** (a harmonised
  synthetic MR can leave it), so the data range of every metric is 2.
* **Mask.** The body mask (:func:`ct2mr.preprocessing.masks.body_mask`): of the CT that was translated when it is given
  (above -500 HU, axial holes filled, largest component), otherwise of the reference MR (Otsu threshold, same
  filling), or a label map given by the user (non-zero voxels). Voxels outside the mask are set to -1 (the range's
  minimum) in both images before any filtering, as SynthRAD2025 does, so that background outside the mask does not
  enter the local statistics of SSIM and MS-SSIM.
* **MAE** = mean |s - r| over the mask (:func:`ct2mr.evaluation.metrics.mae`), normalised units (0..2).
* **PSNR** = 10 log10(2^2 / MSE) over the mask, dB (:func:`ct2mr.evaluation.metrics.psnr`, data range 2).
* **SSIM** = the engine's 3D SSIM (:func:`ct2mr.evaluation.metrics.ssim3d`: Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03,
  data range 2, valid filtering, mean of the map over the mask).
* **MS-SSIM** (:func:`ms_ssim3d`; Wang, Simoncelli and Bovik 2003, *Multiscale structural similarity for image
  quality assessment*, eq. 7 with their weights 0.0448, 0.2856, 0.3001, 0.2363, 0.1333 over 5 scales): both images
  shifted to [0, 2] (the luminance term assumes non-negative intensities; SynthRAD2025 shifts HU by +1024 likewise),
  at each scale the contrast-structure map (and at the coarsest also the luminance map) of the same Gaussian window
  with replicate padding at the border (so that a thick-slice volume of 20 slices still has 5 scales), averaged over
  the mask (down-sampled with the images: 2 x 2 x 2 mean, kept where at least half of the voxels are inside), each
  scale's mean clipped at 0, then ``prod_j cs_j^w_j`` with the coarsest scale's full SSIM in place of its cs.
* **Difference map** ``difference.nii.gz``: s - r (clipped, normalised units, signed: positive where the synthetic
  MR is brighter), every voxel, on exactly the synthetic MR's grid (the CT's).

What it cannot tell: a registration error reads as a synthesis error (the metrics assume a perfect registration);
the reference's own percentile normalisation makes the scores insensitive to a global gain but sensitive to the
reference's field of view (its percentiles change with it); a reference of another MR contrast than the model's
target (e.g. bSSFP against a UTE model) measures the contrast difference, not the synthesis quality.

Arrays are NumPy (z, y, x); torch tensors (B, C, D, H, W).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import SimpleITK as sitk
import torch

from ct2mr.evaluation.metrics import checked_mask, mae, psnr, ssim3d
from ct2mr.losses.ssim import gaussian_filter3d, gaussian_window

__all__ = [
    "MS_SSIM_WEIGHTS",
    "QA_FILES",
    "REFERENCE_UNITS",
    "ms_ssim3d",
    "normalise_reference",
    "same_grid",
    "paired_metrics",
    "reference_qa",
    "metrics_markdown",
    "METRIC_DEFINITIONS",
]

#: Weights of the 5 scales of MS-SSIM (Wang et al. 2003, section 3.2), finest first.
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
#: Files ``ct2mr qa`` writes.
QA_FILES = {"difference": "difference.nii.gz", "metrics_json": "qa_metrics.json", "metrics_md": "qa_metrics.md"}
#: ``reference_units`` choices.
REFERENCE_UNITS = ("raw", "normalised")
#: Largest relative disagreement of spacing, origin and direction accepted as "the same grid".
GRID_TOLERANCE = 1e-4

METRIC_DEFINITIONS = {
    "mae": "mean |s - r| over the mask; s, r clipped to [-1, 1] (normalised MR units, range 2)",
    "psnr_db": "10 log10(2^2 / mean (s - r)^2) over the mask, dB",
    "ssim": "3D SSIM, Gaussian window 11 / sigma 1.5, K1 0.01, K2 0.03, data range 2, valid filtering, mean of the "
            "map over the mask; voxels outside the mask set to -1 in both images first",
    "ms_ssim": "MS-SSIM (Wang et al. 2003 eq. 7), 5 scales, weights 0.0448 0.2856 0.3001 0.2363 0.1333, images "
               "shifted to [0, 2], Gaussian window 11 / sigma 1.5 with replicate padding, 2x2x2 mean down-sampling, "
               "per-scale means over the (down-sampled) mask clipped at 0; outside the mask -1 before the shift",
    "difference": "s - r on every voxel (clipped, normalised units), the synthetic MR's grid",
    "reference_normalisation": "raw reference: clipped to its own P_low-P_high over all its voxels, mapped to "
                               "[-1, 1] (the model's MR preprocessing, thesis section 4)",
}


def _gaussian_filter_same(volume: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian filtering of a (1, 1, D, H, W) tensor with replicate padding: output of the same size."""
    half = window.numel() // 2
    return gaussian_filter3d(torch.nn.functional.pad(volume, (half,) * 6, mode="replicate"), window)


def _downsample(volume: torch.Tensor) -> torch.Tensor:
    """2 x 2 x 2 mean of a (1, 1, D, H, W) tensor (an odd side is first extended by replicating its last voxel)."""
    pads = []
    for size in reversed(volume.shape[2:]):
        pads += [0, size % 2]
    if any(pads):
        volume = torch.nn.functional.pad(volume, tuple(pads), mode="replicate")
    return torch.nn.functional.avg_pool3d(volume, 2)


def ms_ssim3d(a: np.ndarray, b: np.ndarray, data_range: float = 2.0, mask: np.ndarray | None = None,
              weights: Sequence[float] = MS_SSIM_WEIGHTS, win_size: int = 11, sigma: float = 1.5, k1: float = 0.01,
              k2: float = 0.03, shift: float = 1.0) -> float:
    """Multi-scale SSIM of two 3D volumes (Wang, Simoncelli and Bovik 2003), optionally inside a mask.

    ``MS-SSIM = SSIM_M^w_M * prod_{j<M} cs_j^w_j``: at scale ``j`` the contrast-structure term
    ``cs = (2 s_ab + C2) / (s_a^2 + s_b^2 + C2)`` and at the coarsest scale ``M`` the full SSIM ``l * cs`` with
    ``l = (2 m_a m_b + C1) / (m_a^2 + m_b^2 + C1)``; local statistics from a separable Gaussian window with
    replicate padding; each scale's mean (over the mask) is clipped at 0 before the power; between scales both images
    and the mask are down-sampled by a 2 x 2 x 2 mean (the mask kept where the mean is >= 0.5). ``C1 = (k1 R)^2``,
    ``C2 = (k2 R)^2``. Inputs are shifted by ``shift`` first (default +1: [-1, 1] -> [0, 2]) because the
    luminance term assumes non-negative intensities. Voxels outside ``mask`` are **not** changed here; callers that
    want the SynthRAD2025 convention set them to the range minimum first (:func:`paired_metrics` does).

    Args:
        a, b: (z, y, x) volumes of the same shape, e.g. clipped to [-1, 1].
        data_range: ``R`` (2 for [-1, 1]).
        mask: boolean (z, y, x) mask; ``None``: every voxel. The volumes are cropped to the mask's bounding box plus
            a margin of the coarsest window (start aligned to ``2^(M-1)`` so the down-sampling grid is unchanged).
        weights: per-scale exponents, finest first (default :data:`MS_SSIM_WEIGHTS`; ``M = len(weights)``).
        win_size: Gaussian window taps (odd).
        sigma: Gaussian standard deviation (voxels).
        k1, k2: SSIM constants.
        shift: added to both volumes before the computation.

    Returns:
        MS-SSIM in [0, 1]; 1 for identical volumes.

    Raises:
        ValueError: mismatching shapes, an empty mask, no weights, or a side shorter than ``2^(M-1)`` voxels.
    """
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    if a.shape != b.shape or a.ndim != 3:
        raise ValueError(f"ms_ssim3d needs two (z, y, x) volumes of the same shape, got {a.shape} and {b.shape}.")
    weights = [float(w) for w in weights]
    if not weights:
        raise ValueError("ms_ssim3d needs at least one scale weight.")
    levels = len(weights)
    factor = 2 ** (levels - 1)
    if min(a.shape) < factor:
        raise ValueError(f"Volume {a.shape} is too small for {levels}-scale MS-SSIM: every side needs at least "
                         f"{factor} voxels.")
    if mask is not None:
        mask = checked_mask(mask, a.shape, empty="The MS-SSIM mask is empty.")
        box = _ms_ssim_box(mask, (win_size // 2 + 1) * factor, factor)
        a, b, mask = a[box], b[box], mask[box]
    x = torch.from_numpy(np.ascontiguousarray(a + shift))[None, None]
    y = torch.from_numpy(np.ascontiguousarray(b + shift))[None, None]
    m = None if mask is None else torch.from_numpy(mask.astype(np.float32))[None, None]
    return _ms_ssim_scales(x, y, m, weights, gaussian_window(win_size, sigma), (k1 * data_range) ** 2,
                           (k2 * data_range) ** 2)


def _ms_ssim_box(mask: np.ndarray, margin: int, factor: int) -> tuple[slice, ...]:
    """The (z, y, x) bounding box of a non-empty mask plus ``margin`` voxels, its start a multiple of ``factor``."""
    box = []
    for i, n in zip(np.nonzero(mask), mask.shape):
        start = max(0, int(i.min()) - margin) // factor * factor
        stop = min(n, int(i.max()) + margin + 1)
        if stop - start < factor:
            start = max(0, min(start, n - factor) // factor * factor)
            stop = min(n, max(stop, start + factor))
        box.append(slice(start, stop))
    return tuple(box)


def _ms_ssim_scales(x: torch.Tensor, y: torch.Tensor, m: torch.Tensor | None, weights: Sequence[float],
                    window: torch.Tensor, c1: float, c2: float) -> float:
    """``prod_j max(mean cs_j, 0)^w_j`` (SSIM at the coarsest) of (1, 1, D, H, W) tensors over the mask ``m``."""
    levels = len(weights)
    value = 1.0
    with torch.inference_mode():
        for level, weight in enumerate(weights):
            mu_x, mu_y = _gaussian_filter_same(x, window), _gaussian_filter_same(y, window)
            var_x = _gaussian_filter_same(x * x, window) - mu_x ** 2
            var_y = _gaussian_filter_same(y * y, window) - mu_y ** 2
            cov = _gaussian_filter_same(x * y, window) - mu_x * mu_y
            term = (2 * cov + c2) / (var_x + var_y + c2)
            if level == levels - 1:
                term = term * (2 * mu_x * mu_y + c1) / (mu_x ** 2 + mu_y ** 2 + c1)
            del mu_x, mu_y, var_x, var_y, cov
            if m is not None and bool((m >= 0.5).any()):
                mean = float(term[m >= 0.5].double().mean())
            else:
                mean = float(term.double().mean())
            value *= max(mean, 0.0) ** weight
            if level < levels - 1:
                x, y = _downsample(x), _downsample(y)
                m = None if m is None else _downsample(m)
    return float(value)


def normalise_reference(array: np.ndarray, percentiles: Sequence[float] = (1.0, 99.0)
                        ) -> tuple[np.ndarray, tuple[float, float]]:
    """A raw reference MR in the model's normalised MR units: clip to its percentiles, map linearly to [-1, 1].

    Args:
        array: (z, y, x) MR in any units.
        percentiles: (low, high) percentiles over all voxels (thesis section 4: 1 and 99).

    Returns:
        ``(normalised float32 (z, y, x) in [-1, 1], (P_low, P_high) in the input units)``.

    Raises:
        ValueError: percentiles not increasing in [0, 100], or a flat reference (P_high ~ P_low).
    """
    low, high = (float(p) for p in percentiles)
    if not 0.0 <= low < high <= 100.0:
        raise ValueError(f"percentiles must be increasing within [0, 100], got {percentiles}.")
    values = np.asarray(array, np.float32)
    p_lo, p_hi = (float(v) for v in np.percentile(values, [low, high]))
    if not p_hi - p_lo > 1e-6 * max(1.0, abs(p_hi)):
        raise ValueError(f"The reference MR is flat (P{low:g} = {p_lo:g}, P{high:g} = {p_hi:g}); nothing to compare.")
    out = (np.clip(values, p_lo, p_hi) - p_lo) * (2.0 / (p_hi - p_lo)) - 1.0
    return out.astype(np.float32), (p_lo, p_hi)


def same_grid(a: sitk.Image, b: sitk.Image, tolerance: float = GRID_TOLERANCE) -> str | None:
    """``None`` when two images share the voxel grid, else what differs (size, spacing, origin or direction).

    Spacing and origin are compared relative to the spacing (``tolerance`` x spacing), direction cosines absolutely.
    """
    if a.GetSize() != b.GetSize():
        return f"size {a.GetSize()} vs {b.GetSize()}"
    spacing = np.asarray(a.GetSpacing())
    if np.any(np.abs(spacing - np.asarray(b.GetSpacing())) > tolerance * spacing):
        return f"spacing {a.GetSpacing()} vs {b.GetSpacing()}"
    if np.any(np.abs(np.asarray(a.GetOrigin()) - np.asarray(b.GetOrigin())) > tolerance * spacing.max() + 1e-6):
        return f"origin {a.GetOrigin()} vs {b.GetOrigin()}"
    if np.any(np.abs(np.asarray(a.GetDirection()) - np.asarray(b.GetDirection())) > tolerance):
        return f"direction {a.GetDirection()} vs {b.GetDirection()}"
    return None


def paired_metrics(synthetic: np.ndarray, reference: np.ndarray, mask: np.ndarray) -> dict[str, Any]:
    """MAE, PSNR, SSIM and MS-SSIM of a synthetic against a reference volume inside ``mask`` (see METRIC_DEFINITIONS).

    Args:
        synthetic: (z, y, x) synthetic MR, normalised units (clipped to [-1, 1] here).
        reference: (z, y, x) reference MR in the same units (clipped to [-1, 1] here).
        mask: boolean (z, y, x) mask, not empty.

    Returns:
        ``{"mae", "psnr_db", "ssim", "ms_ssim", "voxels"}`` (``ssim``/``ms_ssim`` ``None`` when the masked region is
        smaller than their windows, with ``"notes"`` saying so).

    Raises:
        ValueError: mismatching shapes or an empty mask.
    """
    s = np.clip(np.asarray(synthetic, np.float32), -1.0, 1.0)
    r = np.clip(np.asarray(reference, np.float32), -1.0, 1.0)
    mask = np.asarray(mask, bool)
    if s.shape != r.shape or mask.shape != s.shape:
        raise ValueError(f"Shapes differ: synthetic {s.shape}, reference {r.shape}, mask {mask.shape}.")
    mask = checked_mask(mask, s.shape, empty="The QA mask is empty: nothing to compare.")
    s = np.where(mask, s, -1.0).astype(np.float32)
    r = np.where(mask, r, -1.0).astype(np.float32)
    out: dict[str, Any] = {"mae": mae(s, r, mask), "psnr_db": psnr(s, r, 2.0, mask), "voxels": int(mask.sum())}
    notes = []
    try:
        out["ssim"] = ssim3d(s, r, 2.0, mask)
    except ValueError as exc:
        out["ssim"] = None
        notes.append(f"SSIM: {exc}")
    try:
        out["ms_ssim"] = ms_ssim3d(s, r, 2.0, mask)
    except ValueError as exc:
        out["ms_ssim"] = None
        notes.append(f"MS-SSIM: {exc}")
    if notes:
        out["notes"] = notes
    return out


def _fmt(value: Any, digits: int = 4) -> str:
    """A table cell: ``digits`` decimals, "n/a" for None, "inf"/"nan" for non-finite values."""
    if value is None:
        return "n/a"
    if isinstance(value, float) and not math.isfinite(value):
        return "inf" if value > 0 else "nan"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def metrics_markdown(result: dict[str, Any]) -> str:
    """The metrics table and the definitions as Markdown (``qa_metrics.md``)."""
    m = result["metrics"]
    lines = ["# QA of the synthetic MR against a reference MR", "",
             f"Synthetic MR: `{result['synthetic_mr']}`  ", f"Reference MR: `{result['reference_mr']}`  ",
             f"Mask: {result['mask']['source']} ({result['mask']['voxels']} voxels, "
             f"{result['mask']['volume_ml']:.1f} mL)", "",
             "| MAE (normalised) | PSNR (dB) | SSIM | MS-SSIM | voxels |", "|---|---|---|---|---|",
             f"| {_fmt(m['mae'])} | {_fmt(m['psnr_db'], 2)} | {_fmt(m['ssim'])} | {_fmt(m['ms_ssim'])} | "
             f"{m['voxels']} |", "", "Definitions (s: synthetic MR, r: reference MR):", ""]
    lines += [f"- **{k}**: {v}" for k, v in result["definitions"].items()]
    for note in m.get("notes", []):
        lines.append(f"- note: {note}")
    return "\n".join(lines) + "\n"


def _mask_from(mask: str | Path | sitk.Image | None, ct: sitk.Image | None, reference_normalised: np.ndarray,
               grid: sitk.Image) -> tuple[np.ndarray, str]:
    """The boolean (z, y, x) QA mask (label map, CT body mask or reference body mask) and what it is."""
    from ct2mr.io.images import read_image
    from ct2mr.preprocessing.masks import body_mask

    if mask is not None:
        image = read_image(mask) if not isinstance(mask, sitk.Image) else mask
        problem = same_grid(grid, image)
        if problem:
            raise ValueError(f"The mask is not on the synthetic MR's grid ({problem}); resample it first.")
        return sitk.GetArrayViewFromImage(image) != 0, f"label map {mask if not isinstance(mask, sitk.Image) else ''}"
    if ct is not None:
        problem = same_grid(grid, ct)
        if problem:
            raise ValueError(f"The CT is not on the synthetic MR's grid ({problem}); give the CT that was translated.")
        hu = sitk.GetArrayViewFromImage(ct).astype(np.float32)
        return body_mask(hu, "ct", normalised=False), "body mask of the CT (above -500 HU, axial holes filled, " \
                                                         "largest component)"
    return body_mask(reference_normalised, "mr"), "body mask of the reference MR (Otsu threshold, axial holes " \
                                                  "filled, largest component)"


def reference_qa(synthetic_mr: str | Path | sitk.Image, reference_mr: str | Path | sitk.Image,
                 out_dir: str | Path, ct: str | Path | sitk.Image | None = None,
                 mask: str | Path | sitk.Image | None = None, reference_units: str = "raw",
                 percentiles: Sequence[float] = (1.0, 99.0),
                 progress: Callable[[str, float, str], None] | None = None) -> dict[str, Any]:
    """Score a synthetic MR against a registered reference MR; write the difference map and the metrics table.

    Args:
        synthetic_mr: the synthetic MR (``ct2mr translate``'s ``synthetic_mr.nii.gz``, normalised units), a file or
            an image; its grid (the CT's) is the grid of every output.
        reference_mr: the real MR of the same patient, registered and resampled onto that grid.
        out_dir: output folder (created); receives :data:`QA_FILES`, written all or nothing and verified
            (:func:`ct2mr.io.images.atomic_writes`).
        ct: the translated CT (HU, same grid) for the body mask; ``None``: the reference MR's own body mask.
        mask: a label map on the same grid (non-zero = inside) used instead of a body mask.
        reference_units: ``"raw"`` (normalise the reference by ``percentiles``) or ``"normalised"`` (already [-1, 1]).
        percentiles: (low, high) of the raw reference's normalisation.
        progress: ``callback("qa", fraction, message)``.

    Returns:
        ``{"synthetic_mr", "reference_mr", "grid", "mask": {"source", "voxels", "volume_ml"}, "metrics",
        "reference_normalisation", "definitions", "outputs": {key: path}, "seconds"}`` (also in ``qa_metrics.json``).

    Raises:
        FileNotFoundError, ct2mr.io.images.ImageReadError: unreadable inputs.
        ValueError: images on different grids (the message says which property differs), a non-3D image, an unknown
            ``reference_units``, a flat reference, an empty mask.
        ct2mr.io.images.OutputWriteError: an output could not be written completely (nothing left under its name).
    """
    from ct2mr.checks import prepare_output_dir

    if reference_units not in REFERENCE_UNITS:
        raise ValueError(f"reference_units must be one of {REFERENCE_UNITS}, got {reference_units!r}.")
    report = progress or (lambda stage, fraction, message: None)
    started = time.perf_counter()
    out_dir = Path(out_dir)
    created = prepare_output_dir(out_dir, "output folder (-o)")
    try:
        return _reference_qa(synthetic_mr, reference_mr, out_dir, ct, mask, reference_units, percentiles, report,
                             started)
    except BaseException:
        if created and out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()  # a folder this call created stays only with the outputs in it
        raise


def _reference_qa(synthetic_mr: Any, reference_mr: Any, out_dir: Path, ct: Any, mask: Any, reference_units: str,
                  percentiles: Sequence[float], report: Callable[[str, float, str], None], started: float
                  ) -> dict[str, Any]:
    """The body of :func:`reference_qa` once the output folder is prepared: read, score, write."""
    from ct2mr.io.images import atomic_writes, read_image

    report("qa", 0.0, "Reading the synthetic and the reference MR")
    names = {}
    images = []
    for label, value in (("synthetic MR", synthetic_mr), ("reference MR", reference_mr)):
        image = value if isinstance(value, sitk.Image) else read_image(value)
        if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
            raise ValueError(f"The {label} must be a 3D scalar volume.")
        names[label] = "<image>" if isinstance(value, sitk.Image) else str(value)
        images.append(image)
    synthetic, reference = images
    problem = same_grid(synthetic, reference)
    if problem:
        raise ValueError(f"The reference MR is not on the synthetic MR's grid ({problem}). Register it to the CT and "
                         "resample it onto the CT's grid first (e.g. with 3D Slicer's General Registration or "
                         "SimpleITK), then run ct2mr qa again.")
    ct_image = None if ct is None else (ct if isinstance(ct, sitk.Image) else read_image(ct))
    s = sitk.GetArrayFromImage(sitk.Cast(synthetic, sitk.sitkFloat32))
    r_raw = sitk.GetArrayFromImage(sitk.Cast(reference, sitk.sitkFloat32))
    if reference_units == "raw":
        r, (p_lo, p_hi) = normalise_reference(r_raw, percentiles)
        normalisation = {"units": "raw", "percentiles": [float(p) for p in percentiles], "p_low": p_lo,
                         "p_high": p_hi}
    else:
        r = np.asarray(r_raw, np.float32)
        normalisation = {"units": "normalised", "note": "taken as given (already in [-1, 1]), clipped"}
    del r_raw
    report("qa", 0.2, "Body mask")
    body, source = _mask_from(mask, ct_image, r, synthetic)
    body = np.asarray(body, bool)
    voxel_ml = float(np.prod(synthetic.GetSpacing())) / 1000.0
    report("qa", 0.3, "MAE, PSNR, SSIM and MS-SSIM inside the mask")
    metrics = paired_metrics(s, r, body)
    difference = np.clip(s, -1.0, 1.0) - np.clip(r, -1.0, 1.0)
    diff_image = sitk.GetImageFromArray(difference.astype(np.float32))
    diff_image.CopyInformation(synthetic)
    del difference
    finals = {key: out_dir / name for key, name in QA_FILES.items()}
    result = {"synthetic_mr": names["synthetic MR"], "reference_mr": names["reference MR"],
              "ct": None if ct is None else ("<image>" if isinstance(ct, sitk.Image) else str(ct)),
              "grid": {"size": list(synthetic.GetSize()), "spacing": list(synthetic.GetSpacing()),
                       "origin": list(synthetic.GetOrigin()), "direction": list(synthetic.GetDirection())},
              "mask": {"source": source, "voxels": int(body.sum()), "volume_ml": round(body.sum() * voxel_ml, 2)},
              "metrics": metrics, "reference_normalisation": normalisation,
              "definitions": {**METRIC_DEFINITIONS, "mask": source},
              "outputs": {key: str(path) for key, path in finals.items()},
              "seconds": round(time.perf_counter() - started, 3)}
    report("qa", 0.9, "Writing the difference map and the metrics table")
    with atomic_writes(list(finals.values())) as temps:
        tmp = dict(zip(finals, temps))
        sitk.WriteImage(diff_image, str(tmp["difference"]), True)
        tmp["metrics_json"].write_text(json.dumps(_finite(result), indent=2, default=_json_default) + "\n",
                                       encoding="utf-8")
        tmp["metrics_md"].write_text(metrics_markdown(result), encoding="utf-8")
    report("qa", 1.0, f"Wrote {out_dir}")
    return result


def _finite(value: Any) -> Any:
    """JSON-safe copy: non-finite floats (PSNR of identical images is inf) become ``None``."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _json_default(value: Any) -> Any:
    """JSON form of NumPy scalars (anything else is a TypeError)."""
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")
