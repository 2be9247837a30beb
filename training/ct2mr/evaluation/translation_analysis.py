"""What a front end shows after one translation: the metrics table and the intensity histograms, as JSON.

``ct2mr translate --analysis`` computes them in the engine process (front ends such as the 3D Slicer module never
import torch or compute a metric themselves) on the input's own grid, inside the CT's body mask
(:func:`ct2mr.preprocessing.masks.body_mask` of x in HU with the model's CT window), writes ``OUT_DIR/analysis.json`` and puts the
same object in the ``done`` event:

- **metrics** (thesis section 5, E2, self-consistency; section 7, W1 of eq. 7.2): ``SSIM_cyc``, ``PSNR_cyc`` (dB),
  ``MAE_cyc`` and ``MAE_cyc (HU)`` of x against F(G(x)), both mapped to [-1, 1] through the model's CT window (data
  range 2), as ``ct2mr evaluate`` computes them on its 1 mm grid (:func:`ct2mr.evaluation.metrics.ssim3d`, ``psnr``,
  ``mae``); above :data:`MAX_SSIM_VOXELS` voxels SSIM is taken on every s-th voxel. With a reference MR, ``W1``
  between the synthetic MR's histogram (in the body mask) and the reference's (normalised like the engine's MR
  preprocessing, thesis eq. 4.4, inside its own body mask) on :data:`ct2mr.evaluation.metrics.HISTOGRAM_BINS` bins.
- **anatomy** (thesis section 5, P1/E2: G changes appearance, not anatomy): ``Edge correlation``, ``GMS`` and
  ``NMI`` of x and G(x) in the body mask (:func:`ct2mr.evaluation.anatomy.anatomy_metrics`); with the warp check, its values
  (``anatomy.json``) and ``Displacement mean (mm)``/``Displacement p95 (mm)``.
- **histogram**: :data:`HISTOGRAM_BINS` bins of [-1, 1], the percentage of voxels per bin of the synthetic MR (body
  mask) and of the reference MR.

The JSON (``ANALYSIS_VERSION`` 1)::

    {"version": 1, "ct_window": [-600.0, 1000.0],
     "histogram": {"bins": 128, "range": [-1.0, 1.0], "centres": [...],
                   "columns": {"Synthetic MR": [...], "Reference MR": [...]}},
     "metrics": {"ssim_cyc": ..., "psnr_cyc_db": ..., ...},
     "rows": [{"name": "SSIM_cyc", "key": "ssim_cyc", "value": 0.93, "unit": "", "definition": "..."}, ...],
     "error": ""}

``rows`` is the table in display order, only with finite values; ``error`` says why metrics are missing (the
histogram is always there). Arrays are NumPy (z, y, x).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

__all__ = [
    "ANALYSIS_FILE",
    "ANALYSIS_VERSION",
    "HISTOGRAM_BINS",
    "MAX_SSIM_VOXELS",
    "METRIC_ROWS",
    "analyze_outputs",
    "analyze_translation",
    "ct_window_of",
    "write_analysis",
]

ANALYSIS_FILE = "analysis.json"
"""File name of the analysis in OUT_DIR."""

ANALYSIS_VERSION = 1
"""Version of the analysis JSON layout."""

HISTOGRAM_BINS = 128
"""Bins of [-1, 1] of the displayed histograms (W1 uses :data:`ct2mr.evaluation.metrics.HISTOGRAM_BINS`)."""

MAX_SSIM_VOXELS = 8_000_000
"""Above this many voxels (the body mask's bounding box), SSIM is computed on every s-th voxel along each axis (the
smallest stride s that fits), to bound memory and time."""

DEFAULT_CT_WINDOW = (-600.0, 1000.0)
"""CT window (HU) of the thesis (section 4), used when the translation's record does not give one."""

METRIC_ROWS: tuple[tuple[str, str, str, str], ...] = (
    ("SSIM_cyc", "ssim_cyc", "", "SSIM-3D of x and F(G(x)) in the body mask (window 11, sigma 1.5, range 2); "
     "1 = identical"),
    ("PSNR_cyc", "psnr_cyc_db", "dB", "PSNR of x and F(G(x)) in the body mask, range 2 (= the CT window)"),
    ("MAE_cyc", "mae_cyc", "normalised", "mean |F(G(x)) - x| in the body mask, intensities in [-1, 1]"),
    ("MAE_cyc (HU)", "mae_cyc_hu", "HU", "mean |F(G(x)) - x| in the body mask, in HU (x clipped to the CT window)"),
    ("W1", "w1", "normalised", "1-Wasserstein distance of the synthetic and reference MR histograms (thesis eq. 7.2)"),
    ("Edge correlation", "edge_correlation", "", "Pearson correlation of the gradient magnitudes of x and G(x) in "
     "the body mask; 1 = the same edges (contrast-independent, thesis 5 P1)"),
    ("GMS", "gradient_magnitude_similarity", "", "mean gradient-magnitude similarity of x and G(x) in the body mask, "
     "in [0, 1]; 1 = same edges"),
    ("NMI", "nmi", "", "normalised mutual information of x and G(x) in the body mask; higher = more shared "
     "structure"),
    ("Displacement mean (mm)", "displacement_mean_mm", "mm", "mean displacement of a B-spline registration (Mattes "
     "MI) of x to G(x) in the body; ~0 when G moved no anatomy"),
    ("Displacement p95 (mm)", "displacement_p95_mm", "mm", "95th percentile of that displacement in the body"),
)
"""The metrics table: (row name, key in ``metrics``, unit, definition), in display order."""

_ANATOMY_SIGMA_MM = 1.0
_ANATOMY_KEYS = ("edge_correlation", "gradient_magnitude_similarity", "nmi")
_WARP_KEYS = ("displacement_mean_mm", "displacement_p95_mm")

Report = Callable[[float, str], None]


def ct_window_of(info: Mapping[str, Any]) -> list[float]:
    """The CT window (HU) a translation used, from its ``info`` (``translate_file``'s preprocessing record).

    Args:
        info: ``translate_file(...)["info"]``.

    Returns:
        ``[HU_min, HU_max]``; the thesis's [-600, 1000] when the record has none.
    """
    record = info.get("preprocessing") or {}
    window = (record.get("config") or {}).get("ct_window")
    if window is None and record.get("modality") == "ct":
        window = record.get("intensity_range")
    return [float(v) for v in (window or DEFAULT_CT_WINDOW)]


def _percent_histogram(values: np.ndarray, bins: int) -> np.ndarray:
    """Percentage of ``values`` (clipped to [-1, 1]) per bin of ``bins`` equal bins of [-1, 1]."""
    counts = np.histogram(np.clip(values, -1.0, 1.0), bins=bins, range=(-1.0, 1.0))[0].astype(np.float64)
    total = counts.sum()
    return 100.0 * counts / total if total > 0 else counts


def _reference_values(paths: Sequence[str | os.PathLike], percentiles: Sequence[float]) -> np.ndarray:
    """The reference MRs' voxels inside their body masks, normalised like the engine's MR preprocessing."""
    import SimpleITK as sitk

    from ct2mr.io.images import read_image
    from ct2mr.preprocessing.masks import body_mask
    from ct2mr.preprocessing.pipeline import normalize_mr

    values = []
    for path in paths:
        array = sitk.GetArrayFromImage(read_image(path)).astype(np.float32)  # (z, y, x), any unit
        normalised, _, _, _ = normalize_mr(array, percentiles)
        mask = body_mask(array, "mr", normalised=False) if array.ndim == 3 else np.ones(array.shape, bool)
        values.append(normalised[mask])
    return np.concatenate(values) if values else np.zeros(0, np.float32)


def _strided(arrays: Sequence[np.ndarray], mask: np.ndarray, max_voxels: int
             ) -> tuple[list[np.ndarray], np.ndarray, int]:
    """Crop to the mask's bounding box (plus the SSIM window's half width) and take every s-th voxel."""
    index = np.nonzero(mask)
    if not index[0].size:
        return list(arrays), mask, 1
    box = tuple(slice(max(0, int(i.min()) - 5), min(n, int(i.max()) + 6)) for i, n in zip(index, mask.shape))
    size = int(np.prod([s.stop - s.start for s in box]))
    stride = max(1, math.ceil((size / max_voxels) ** (1.0 / 3.0)))
    cut = tuple(slice(s.start, s.stop, stride) for s in box)
    return [a[cut] for a in arrays], mask[cut], stride


def _cycle_metrics(ct: np.ndarray, roundtrip: np.ndarray, mask: np.ndarray, window: Sequence[float],
                   max_ssim_voxels: int) -> dict[str, float]:
    """MAE (normalised and HU), PSNR and SSIM of x and F(G(x)) (HU arrays) in the window's [-1, 1], in the mask."""
    from ct2mr.evaluation.metrics import mae, psnr, ssim3d
    from ct2mr.preprocessing.pipeline import normalize_ct

    x, y = normalize_ct(ct, window), normalize_ct(roundtrip, window)
    metrics = {"voxels": float(mask.sum())}
    metrics["mae_cyc"] = mae(x, y, mask)
    metrics["mae_cyc_hu"] = metrics["mae_cyc"] * (window[1] - window[0]) / 2.0
    metrics["psnr_cyc_db"] = psnr(x, y, 2.0, mask)
    (xs, ys), mask_strided, stride = _strided([x, y], mask, max_ssim_voxels)
    metrics["ssim_stride"] = float(stride)
    try:
        metrics["ssim_cyc"] = ssim3d(xs, ys, 2.0, mask_strided)
    except ValueError:  # smaller than the SSIM window
        metrics["ssim_cyc"] = float("nan")
    return metrics


def _anatomy(ct: np.ndarray, synthetic: np.ndarray, mask: np.ndarray, spacing_zyx: Sequence[float]
             ) -> dict[str, float]:
    """Edge correlation, GMS and NMI on the mask's bounding box plus the gradients' support (same values as on the
    whole grid, less memory)."""
    import SimpleITK as sitk

    from ct2mr.evaluation.anatomy import anatomy_metrics

    spacing = np.asarray(spacing_zyx, float)
    margin = np.ceil(3.0 * _ANATOMY_SIGMA_MM / spacing).astype(int) + 2
    index = np.nonzero(mask)
    box = tuple(slice(max(0, int(i.min()) - m), min(n, int(i.max()) + m + 1))
                for i, m, n in zip(index, margin, mask.shape))
    images = []
    for array in (ct[box], synthetic[box]):
        image = sitk.GetImageFromArray(np.ascontiguousarray(array, np.float32))
        image.SetSpacing(tuple(float(s) for s in spacing[::-1]))  # origin and direction do not change the values
        images.append(image)
    metrics, _ = anatomy_metrics(images[0], images[1], body=mask[box], sigma_mm=_ANATOMY_SIGMA_MM)
    return {key: float(metrics[key]) for key in _ANATOMY_KEYS}


def _finite(value: Any) -> float | None:
    """``value`` as a float when it is a finite number, else None."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def analyze_translation(ct, synthetic_mr, roundtrip_ct, ct_window: Sequence[float] = DEFAULT_CT_WINDOW,
                        reference_mr: Sequence[str | os.PathLike] | None = None,
                        mr_percentiles: Sequence[float] = (1.0, 99.0), anatomy: Mapping[str, Any] | None = None,
                        progress: Report | None = None, bins: int = HISTOGRAM_BINS,
                        max_ssim_voxels: int = MAX_SSIM_VOXELS) -> dict[str, Any]:
    """Metrics table and histograms of one translation (see the module docstring for the JSON layout).

    Args:
        ct: the input x, ``SimpleITK.Image`` in HU.
        synthetic_mr: G(x) on x's grid, normalised MR intensity in [-1, 1] (``SimpleITK.Image``).
        roundtrip_ct: F(G(x)) on x's grid, HU (``SimpleITK.Image``).
        ct_window: the model's CT window (HU) mapped to [-1, 1] (:func:`ct_window_of`).
        reference_mr: reference MR file(s) for the histogram and W1; ``None``: none.
        mr_percentiles: the model's MR percentiles (thesis eq. 4.4) for normalising the reference.
        anatomy: the warp check's metrics (``anatomy.json``); its edge correlation, GMS, NMI and displacements are
            used as they are; without it edge correlation, GMS and NMI are computed here.
        progress: ``progress(fraction, message)``.
        bins: histogram bins of [-1, 1].
        max_ssim_voxels: see :data:`MAX_SSIM_VOXELS`.

    Returns:
        The analysis dictionary (JSON-ready: NaN and infinities become ``None``).

    Raises:
        ValueError: the synthetic MR is not on the CT's grid. A failure of the reference MR, the cycle or the anatomy
            metrics raises nothing: it is reported in ``"error"`` and the histogram still comes back.
    """
    import SimpleITK as sitk

    from ct2mr.preprocessing.masks import body_mask

    report = progress or (lambda fraction, message: None)
    window = [float(ct_window[0]), float(ct_window[1])]
    x = sitk.GetArrayFromImage(ct).astype(np.float32)  # (z, y, x), HU
    g = sitk.GetArrayFromImage(synthetic_mr).astype(np.float32)
    if g.shape != x.shape:
        raise ValueError(f"The synthetic MR {g.shape} is not on the CT's grid {x.shape}.")
    report(0.0, "Body mask")
    mask = body_mask(x, "ct", normalised=False, ct_window=window)
    edges = np.linspace(-1.0, 1.0, bins + 1)
    columns = {"Synthetic MR": _percent_histogram(g[mask], bins)}
    reference = None
    errors = []
    if reference_mr:
        report(0.1, "Reference MR histogram")
        try:
            reference = _reference_values(list(reference_mr), mr_percentiles)
            columns["Reference MR"] = _percent_histogram(reference, bins)
        except Exception as error:  # noqa: BLE001 - reported in the JSON, the translation stands
            errors.append(f"reference MR: {type(error).__name__}: {error}")
    metrics, error = _translation_metrics(ct, x, g, roundtrip_ct, mask, window, reference, anatomy, max_ssim_voxels,
                                          report)
    if error:
        errors.append(error)
    rows = _metric_rows(metrics)
    report(1.0, "Analysis done")
    return {
        "version": ANALYSIS_VERSION,
        "ct_window": window,
        "histogram": {"bins": bins, "range": [-1.0, 1.0], "mask": "body mask of the CT",
                      "centres": [float(c) for c in 0.5 * (edges[:-1] + edges[1:])],
                      "columns": {name: [float(v) for v in values] for name, values in columns.items()}},
        "metrics": {key: (_finite(value) if isinstance(value, (int, float)) else value)
                    for key, value in metrics.items()},
        "rows": rows,
        "error": "; ".join(errors),
    }


def _translation_metrics(ct, x: np.ndarray, g: np.ndarray, roundtrip_ct, mask: np.ndarray, window: Sequence[float],
                         reference: np.ndarray | None, anatomy: Mapping[str, Any] | None, max_ssim_voxels: int,
                         report: Report) -> tuple[dict[str, Any], str]:
    """Cycle metrics, W1 to the reference and anatomy metrics: (what was computed, the error that stopped it or "")."""
    import SimpleITK as sitk

    from ct2mr.evaluation.metrics import HISTOGRAM_BINS as W1_BINS
    from ct2mr.evaluation.metrics import histogram_w1, intensity_histogram

    metrics: dict[str, Any] = {}
    try:
        report(0.3, "Cycle metrics (SSIM, PSNR, MAE)")
        roundtrip = sitk.GetArrayFromImage(roundtrip_ct).astype(np.float32)
        metrics.update(_cycle_metrics(x, roundtrip, mask, window, max_ssim_voxels))
        del roundtrip
        if reference is not None and reference.size:
            metrics["w1"] = histogram_w1(intensity_histogram(g[mask], W1_BINS), intensity_histogram(reference, W1_BINS))
        report(0.6, "Anatomy metrics (edge correlation, GMS, NMI)")
        given = dict(anatomy or {})
        if all(_finite(given.get(key)) is not None for key in _ANATOMY_KEYS):
            metrics.update({key: float(given[key]) for key in _ANATOMY_KEYS})
            metrics["anatomy_source"] = "warp check (anatomy.json)"
        elif mask.any():
            metrics.update(_anatomy(x, g, mask, ct.GetSpacing()[::-1]))
            metrics["anatomy_source"] = "translation analysis"
        for key in _WARP_KEYS:
            if _finite(given.get(key)) is not None:
                metrics[key] = float(given[key])
    except (ValueError, RuntimeError, MemoryError) as error:
        return metrics, f"{type(error).__name__}: {error}"
    return metrics, ""


def _metric_rows(metrics: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The ``rows`` of the analysis: :data:`METRIC_ROWS` in display order, only those with a finite value."""
    rows = []
    for name, key, unit, definition in METRIC_ROWS:
        value = _finite(metrics.get(key))
        if value is not None:
            rows.append({"name": name, "key": key, "value": value, "unit": unit, "definition": definition})
    return rows


def analyze_outputs(ct, outputs: dict[str, str], info: Mapping[str, Any], out_dir: str | os.PathLike,
                    reference_mr: Sequence[str | os.PathLike] | None = None, progress: Report | None = None
                    ) -> dict[str, Any]:
    """Analyse one written translation and write ``OUT_DIR/analysis.json`` (``ct2mr translate --analysis``; in a
    batch, per case into ``OUT_DIR/<case>/``).

    Args:
        ct: the input x that was translated, ``SimpleITK.Image`` in HU.
        outputs: ``translate_file(...)["outputs"]`` (``{key: path}``); gains ``"analysis"``: the written file.
        info: ``translate_file(...)["info"]``: the model's CT window and MR percentiles (thesis section 4,
            eq. 4.4) and, with the warp check, ``anatomy``.
        out_dir: folder of ``analysis.json`` (the translation's output folder).
        reference_mr: reference MR file(s) for the histogram and W1; ``None``: none.
        progress: ``progress(fraction, message)``.

    Returns:
        The analysis dictionary (:func:`analyze_translation`; ``error`` says why metrics are missing).
    """
    import SimpleITK as sitk

    percentiles = ((info.get("preprocessing") or {}).get("config") or {}).get("mr_percentiles") or (1.0, 99.0)
    analysis = analyze_translation(ct, sitk.ReadImage(str(outputs["synthetic_mr"])),
                                   sitk.ReadImage(str(outputs["roundtrip_ct"])), ct_window_of(info), reference_mr,
                                   percentiles, info.get("anatomy"), progress)
    outputs["analysis"] = str(write_analysis(analysis, out_dir))
    return analysis


def write_analysis(analysis: Mapping[str, Any], out_dir: str | os.PathLike) -> Path:
    """Write ``OUT_DIR/analysis.json`` atomically (a temporary file renamed into place).

    Args:
        analysis: the analysis dictionary (:func:`analyze_translation`), JSON-ready.
        out_dir: an existing folder.

    Returns:
        The file's path.

    Raises:
        ValueError: a NaN or infinite number in ``analysis`` (``allow_nan=False``); nothing is left behind.
        OSError: the file cannot be written; the temporary file is removed.
    """
    from ct2mr.io.images import atomic_path

    final = Path(out_dir) / ANALYSIS_FILE
    tmp = atomic_path(final)
    try:
        tmp.write_text(json.dumps(analysis, indent=1, allow_nan=False) + "\n", encoding="utf-8")
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return final
