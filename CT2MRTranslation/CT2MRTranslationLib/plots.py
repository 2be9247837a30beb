"""Results analysis in the scene: intensity histograms as a plot chart, cycle metrics as a table.

- **Histogram** (thesis 7.4, figures 8 and 11): the synthetic MR's intensity distribution inside the CT's body mask,
  against an optional reference MR (normalised like the engine's MR preprocessing: clipped to its own 1st-99th
  percentiles and mapped to [-1, 1], thesis eq. 4.4, inside its own body mask), on :data:`HISTOGRAM_BINS` bins of
  [-1, 1], each as the percentage of its voxels. One ``vtkMRMLTableNode`` (columns ``Intensity``,
  ``Synthetic MR``, ``Reference MR``), one ``vtkMRMLPlotSeriesNode`` per curve, one ``vtkMRMLPlotChartNode``.
- **Metrics** (thesis section 5, E2, self-consistency; section 7, W1 of eq. 7.2): a ``vtkMRMLTableNode`` with rows
  ``SSIM_cyc``, ``PSNR_cyc``, ``MAE_cyc``, ``MAE_cyc (HU)`` and, with a reference MR, ``W1``. The cycle metrics
  compare the input x and the round trip F(G(x)) on the input's grid, inside the CT's body mask, both mapped to the
  network's [-1, 1] through the CT window (as ``ct2mr evaluate`` does on its 1 mm grid): SSIM-3D (Gaussian window
  11, sigma 1.5, data range 2), PSNR (dB, data range 2), MAE (normalised units, and in HU). The metric functions
  are the engine's (:mod:`ct2mr.evaluation`, which needs torch); histograms use NumPy only.
- **Anatomy** (thesis section 5, property P1, evaluation E2: G changes appearance, not anatomy): contrast-independent
  rows of the same table. ``Edge correlation`` (Pearson correlation of the gradient magnitudes of x and G(x)),
  ``GMS`` (mean gradient-magnitude similarity) and ``NMI`` (normalised mutual information of x and G(x)), inside
  the CT's body mask, on the input's grid, always; computed here with the engine's :mod:`ct2mr.anatomy` when it is
  importable, else taken from the engine's ``anatomy.json`` (warp check) when there is one. With the warp check,
  ``Displacement mean (mm)`` and ``Displacement p95 (mm)`` of the deformable registration of x to G(x) (B-spline,
  Mattes MI) inside the body, from ``anatomy.json``: ~0 mm when no structure moved.

Arrays are NumPy (z, y, x). No Qt here: runs inside Slicer and in plain Python with the ``slicer-core`` wheel.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import slicer
import vtk

__all__ = [
    "CT_WINDOW",
    "HISTOGRAM_BINS",
    "HISTOGRAM_COLUMNS",
    "ANATOMY_KEYS",
    "ANATOMY_ROWS",
    "METRIC_ROWS",
    "MAX_SSIM_VOXELS",
    "AnalysisNodes",
    "addAnalysis",
    "anatomyMetrics",
    "cycleMetrics",
    "histogramChartNode",
    "histogramTableNode",
    "metricsTableNode",
    "normalizedReferenceMR",
]

HISTOGRAM_BINS = 128
"""Bins of [-1, 1] in the histogram plot (W1 uses the engine's own bins, :data:`ct2mr.evaluation.HISTOGRAM_BINS`)."""

HISTOGRAM_COLUMNS = ("Intensity", "Synthetic MR", "Reference MR")
"""Columns of the histogram table: bin centre (normalised intensity), then % of voxels per bin."""

CT_WINDOW = (-600.0, 1000.0)
"""CT window (HU) mapped to [-1, 1] when the model does not say otherwise (thesis section 4)."""

ANATOMY_ROWS = ("Edge correlation", "GMS", "NMI", "Displacement mean (mm)", "Displacement p95 (mm)")
"""Anatomy rows of the metrics table (the displacement rows only when the warp check ran)."""

ANATOMY_KEYS = {
    "Edge correlation": "edge_correlation",
    "GMS": "gradient_magnitude_similarity",
    "NMI": "nmi",
    "Displacement mean (mm)": "displacement_mean_mm",
    "Displacement p95 (mm)": "displacement_p95_mm",
}
"""Anatomy row -> key of the engine's ``anatomy.json`` (``ct2mr translate --warp-check``)."""

METRIC_ROWS = ("SSIM_cyc", "PSNR_cyc", "MAE_cyc", "MAE_cyc (HU)", "W1", *ANATOMY_ROWS)
"""Rows of the metrics table, in order (``W1`` only with a reference MR; anatomy rows only when known)."""

_OPTIONAL_ROWS = frozenset(("W1", *ANATOMY_ROWS))

MAX_SSIM_VOXELS = 8_000_000
"""Above this many voxels (the body mask's bounding box), SSIM is computed on every s-th voxel along each axis
(the smallest stride s that fits), to bound memory and time in the Slicer process."""

_SERIES_COLORS = {"Synthetic MR": (0.85, 0.33, 0.10), "Reference MR": (0.0, 0.45, 0.74)}


@dataclass
class AnalysisNodes:
    """Nodes :func:`addAnalysis` added to the scene.

    Attributes:
        histogramTable: histogram table (``Intensity``, ``Synthetic MR`` [, ``Reference MR``]).
        chart: plot chart of the histograms.
        series: one plot series per histogram curve, in column order.
        metricsTable: metrics table, or ``None`` when the metrics could not be computed.
        metrics: the metric values by row name (NaN when not computable).
        metricsError: why the metrics are missing, else ``""``.
    """

    histogramTable: slicer.vtkMRMLTableNode
    chart: slicer.vtkMRMLPlotChartNode
    series: list[slicer.vtkMRMLPlotSeriesNode] = field(default_factory=list)
    metricsTable: slicer.vtkMRMLTableNode | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    metricsError: str = ""

    @property
    def nodes(self) -> list[slicer.vtkMRMLNode]:
        """Every node added (tables, chart, series)."""
        return [n for n in (self.histogramTable, self.chart, *self.series, self.metricsTable) if n is not None]


def normalizedReferenceMR(referenceNode: slicer.vtkMRMLScalarVolumeNode) -> np.ndarray:
    """The reference MR's voxels inside its body mask, normalised as the engine normalises MR (thesis eq. 4.4).

    Args:
        referenceNode: an MR volume (any units).

    Returns:
        1D float32 array of values in [-1, 1] (all voxels when the mask is empty; zeros for a flat volume).
    """
    from ct2mr.masks import body_mask
    from ct2mr.preprocessing import normalize_mr

    array = slicer.util.arrayFromVolume(referenceNode).astype(np.float32)  # (z, y, x)
    normalised, _, _, _ = normalize_mr(array)
    mask = body_mask(array, "mr", normalised=False) if array.ndim == 3 else np.ones(array.shape, bool)
    return normalised[mask]


def _bodyMask(ctArray: np.ndarray, window: Sequence[float]) -> np.ndarray:
    from ct2mr.masks import body_mask

    return body_mask(ctArray, "ct", normalised=False, ct_window=window)


def _histogram(values: np.ndarray, bins: int) -> np.ndarray:
    counts = np.histogram(np.clip(values, -1.0, 1.0), bins=bins, range=(-1.0, 1.0))[0].astype(np.float64)
    total = counts.sum()
    return 100.0 * counts / total if total > 0 else counts


def histogramTableNode(
    scene: slicer.vtkMRMLScene,
    syntheticMR: slicer.vtkMRMLScalarVolumeNode,
    referenceMR: slicer.vtkMRMLScalarVolumeNode | None = None,
    mask: np.ndarray | None = None,
    name: str | None = None,
    bins: int = HISTOGRAM_BINS,
) -> slicer.vtkMRMLTableNode:
    """Add a table of the synthetic MR's (and the reference MR's) intensity histogram.

    Args:
        scene: the scene.
        syntheticMR: synthetic MR G(x), normalised intensity in [-1, 1].
        referenceMR: optional real MR (any units; normalised by :func:`normalizedReferenceMR`).
        mask: boolean (z, y, x) mask of the synthetic MR's voxels to count (the CT's body mask); ``None``: all.
        name: table name; default ``"<synthetic MR> histogram"``.
        bins: number of bins of [-1, 1].

    Returns:
        The table node: ``Intensity`` (bin centres), ``Synthetic MR`` and, with a reference, ``Reference MR``
        (percent of voxels per bin, float64).
    """
    values = slicer.util.arrayFromVolume(syntheticMR)
    values = values[mask] if mask is not None else values.ravel()
    edges = np.linspace(-1.0, 1.0, bins + 1)
    columns = [0.5 * (edges[:-1] + edges[1:]), _histogram(values, bins)]
    names = list(HISTOGRAM_COLUMNS[:2])
    if referenceMR is not None:
        columns.append(_histogram(normalizedReferenceMR(referenceMR), bins))
        names.append(HISTOGRAM_COLUMNS[2])
    table = scene.AddNewNodeByClass("vtkMRMLTableNode", name or f"{syntheticMR.GetName()} histogram")
    slicer.util.updateTableFromArray(table, [np.ascontiguousarray(c, np.float64) for c in columns], names)
    for column in names:
        table.SetColumnUnitLabel(column, "normalised intensity" if column == "Intensity" else "%")
        table.SetColumnDescription(column, "bin centre in [-1, 1]" if column == "Intensity"
                                   else f"{column}: percentage of voxels per bin")
    return table


def histogramChartNode(
    scene: slicer.vtkMRMLScene, tableNode: slicer.vtkMRMLTableNode, name: str | None = None
) -> tuple[slicer.vtkMRMLPlotChartNode, list[slicer.vtkMRMLPlotSeriesNode]]:
    """Add a plot chart with one line series per histogram column of ``tableNode``.

    Args:
        scene: the scene.
        tableNode: from :func:`histogramTableNode`.
        name: chart name; default ``"<table> chart"``.

    Returns:
        ``(chart, series)``; the series' x column is ``Intensity``, their y column the curve's.
    """
    chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", name or f"{tableNode.GetName()} chart")
    chart.SetTitle("Intensity histogram (body mask)")
    chart.SetXAxisTitle("Normalised MR intensity")
    chart.SetYAxisTitle("Voxels (%)")
    chart.SetLegendVisibility(True)
    series = []
    for index in range(1, tableNode.GetNumberOfColumns()):
        column = tableNode.GetColumnName(index)
        seriesNode = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", f"{tableNode.GetName()}: {column}")
        seriesNode.SetAndObserveTableNodeID(tableNode.GetID())
        seriesNode.SetXColumnName(HISTOGRAM_COLUMNS[0])
        seriesNode.SetYColumnName(column)
        seriesNode.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
        seriesNode.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleNone)
        seriesNode.SetLineStyle(slicer.vtkMRMLPlotSeriesNode.LineStyleSolid)
        seriesNode.SetColor(*_SERIES_COLORS.get(column, (0.3, 0.3, 0.3)))
        chart.AddAndObservePlotSeriesNodeID(seriesNode.GetID())
        series.append(seriesNode)
    return chart, series


def _strided(arrays: Sequence[np.ndarray], mask: np.ndarray, maxVoxels: int
             ) -> tuple[list[np.ndarray], np.ndarray, int]:
    """Crop to the mask's bounding box (plus the SSIM window's half width) and take every s-th voxel."""
    index = np.nonzero(mask)
    if not index[0].size:
        return list(arrays), mask, 1
    box = tuple(slice(max(0, int(i.min()) - 5), min(n, int(i.max()) + 6)) for i, n in zip(index, mask.shape))
    size = int(np.prod([s.stop - s.start for s in box]))
    stride = max(1, math.ceil((size / maxVoxels) ** (1.0 / 3.0)))
    cut = tuple(slice(s.start, s.stop, stride) for s in box)
    return [a[cut] for a in arrays], mask[cut], stride


def cycleMetrics(
    inputCT: slicer.vtkMRMLScalarVolumeNode,
    roundTripCT: slicer.vtkMRMLScalarVolumeNode,
    syntheticMR: slicer.vtkMRMLScalarVolumeNode | None = None,
    referenceMR: slicer.vtkMRMLScalarVolumeNode | None = None,
    ctWindow: Sequence[float] = CT_WINDOW,
    mask: np.ndarray | None = None,
    maxSSIMVoxels: int = MAX_SSIM_VOXELS,
) -> dict[str, float]:
    """Cycle-consistency metrics of x against F(G(x)) and, with a reference MR, the histogram distance W1.

    Args:
        inputCT: the input x in HU.
        roundTripCT: F(G(x)) in HU, on the input's grid.
        syntheticMR: G(x) in [-1, 1] (for W1).
        referenceMR: real MR (for W1).
        ctWindow: (HU_min, HU_max) mapped to [-1, 1] (the model's CT window).
        mask: boolean (z, y, x) body mask; ``None`` computes the CT's body mask.
        maxSSIMVoxels: see :data:`MAX_SSIM_VOXELS`.

    Returns:
        ``{"SSIM_cyc", "PSNR_cyc" (dB), "MAE_cyc" (normalised), "MAE_cyc (HU)", "W1" (normalised; NaN without a
        reference), "voxels" (in the mask), "ssimStride"}``. SSIM is NaN when the masked region is smaller than the
        SSIM window (11 voxels).

    Raises:
        ImportError: the ct2mr engine (with torch) is not importable in this Python.
    """
    from ct2mr.evaluation import HISTOGRAM_BINS as W1_BINS
    from ct2mr.evaluation import histogram_w1, intensity_histogram, mae, psnr, ssim3d
    from ct2mr.preprocessing import normalize_ct

    ct = slicer.util.arrayFromVolume(inputCT).astype(np.float32)  # (z, y, x), HU
    roundTrip = slicer.util.arrayFromVolume(roundTripCT).astype(np.float32)
    if mask is None:
        mask = _bodyMask(ct, ctWindow)
    x, y = normalize_ct(ct, ctWindow), normalize_ct(roundTrip, ctWindow)
    metrics = {"voxels": float(mask.sum())}
    metrics["MAE_cyc"] = mae(x, y, mask)
    metrics["MAE_cyc (HU)"] = metrics["MAE_cyc"] * (ctWindow[1] - ctWindow[0]) / 2.0
    metrics["PSNR_cyc"] = psnr(x, y, 2.0, mask)
    (xs, ys), maskStrided, stride = _strided([x, y], mask, maxSSIMVoxels)
    metrics["ssimStride"] = float(stride)
    try:
        metrics["SSIM_cyc"] = ssim3d(xs, ys, 2.0, maskStrided)
    except ValueError:  # smaller than the SSIM window
        metrics["SSIM_cyc"] = float("nan")
    metrics["W1"] = float("nan")
    if syntheticMR is not None and referenceMR is not None:
        synthetic = slicer.util.arrayFromVolume(syntheticMR)[mask]
        metrics["W1"] = histogram_w1(intensity_histogram(synthetic, W1_BINS),
                                     intensity_histogram(normalizedReferenceMR(referenceMR), W1_BINS))
    return metrics


def anatomyMetrics(
    inputCT: slicer.vtkMRMLScalarVolumeNode,
    syntheticMR: slicer.vtkMRMLScalarVolumeNode,
    mask: np.ndarray | None = None,
    anatomy: dict | None = None,
    ctWindow: Sequence[float] = CT_WINDOW,
) -> dict[str, float]:
    """Contrast-independent anatomy metrics of x against G(x) (thesis section 5, P1/E2), by row of the table.

    Edge correlation, GMS and NMI are computed here, on the input's grid inside ``mask``, with the engine's
    :mod:`ct2mr.anatomy` when it is importable; otherwise they are taken from ``anatomy`` (the engine's
    ``anatomy.json``). The displacement rows always come from ``anatomy`` (the warp check's registration).

    Args:
        inputCT: x in HU.
        syntheticMR: G(x), normalised intensity in [-1, 1], on the input's grid.
        mask: boolean (z, y, x) body mask; ``None`` computes the CT's body mask.
        anatomy: the engine's anatomy metrics (keys of :data:`ANATOMY_KEYS`), or ``None``.
        ctWindow: (HU_min, HU_max) of the model (for the body mask).

    Returns:
        ``{row: value}`` for the rows of :data:`ANATOMY_ROWS` that are known (edge correlation and NMI unitless,
        GMS in [0, 1], displacements in mm), plus ``"anatomySource"``: 1.0 when computed here, 0.0 when read from
        ``anatomy``.
    """
    anatomy = anatomy or {}
    values: dict[str, float] = {}
    try:
        values.update(_engineAnatomyMetrics(inputCT, syntheticMR, mask, ctWindow))
        values["anatomySource"] = 1.0
    except ImportError:
        for row in ANATOMY_ROWS[:3]:
            value = _number(anatomy.get(ANATOMY_KEYS[row]))
            if value is not None:
                values[row] = value
        values["anatomySource"] = 0.0
    for row in ANATOMY_ROWS[3:]:
        value = _number(anatomy.get(ANATOMY_KEYS[row]))
        if value is not None:
            values[row] = value
    return values


def _number(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _engineAnatomyMetrics(inputCT, syntheticMR, mask, ctWindow) -> dict[str, float]:
    """Edge correlation, GMS and NMI with :func:`ct2mr.anatomy.anatomy_metrics` on the input's grid (cropped to the
    mask's bounding box plus the gradients' support, which leaves the values unchanged). ImportError when the engine
    has no anatomy module."""
    try:
        from ct2mr.anatomy import anatomy_metrics
    except Exception as error:  # noqa: BLE001 - missing or broken: "not importable", use anatomy.json
        raise ImportError(f"ct2mr.anatomy could not be imported: {error}") from error
    import SimpleITK as sitk

    ct = slicer.util.arrayFromVolume(inputCT).astype(np.float32)  # (z, y, x), HU
    mr = slicer.util.arrayFromVolume(syntheticMR).astype(np.float32)  # (z, y, x), [-1, 1]
    if mask is None:
        mask = _bodyMask(ct, ctWindow)
    if not mask.any():
        raise ValueError("The body mask is empty: no anatomy metrics.")
    spacing = np.asarray(inputCT.GetSpacing(), float)[::-1]  # (z, y, x) mm
    margin = np.ceil(3.0 * _ANATOMY_SIGMA_MM / spacing).astype(int) + 2  # Gaussian derivative support, in voxels
    index = np.nonzero(mask)
    box = tuple(slice(max(0, int(i.min()) - m), min(n, int(i.max()) + m + 1))
                for i, m, n in zip(index, margin, mask.shape))
    images = []
    for array in (ct[box], mr[box]):
        image = sitk.GetImageFromArray(np.ascontiguousarray(array))
        image.SetSpacing(tuple(float(s) for s in spacing[::-1]))  # direction and origin do not change the values
        images.append(image)
    metrics, _ = anatomy_metrics(images[0], images[1], body=mask[box], sigma_mm=_ANATOMY_SIGMA_MM)
    return {row: float(metrics[ANATOMY_KEYS[row]]) for row in ANATOMY_ROWS[:3]}


_ANATOMY_SIGMA_MM = 1.0
"""Gaussian derivative scale (mm) of the edge metrics (the engine's default)."""


_METRIC_INFO = {
    "SSIM_cyc": ("", "SSIM-3D of x and F(G(x)) in the body mask (window 11, sigma 1.5, range 2); 1 = identical"),
    "PSNR_cyc": ("dB", "PSNR of x and F(G(x)) in the body mask, range 2 (= the 1600 HU window)"),
    "MAE_cyc": ("normalised", "mean |F(G(x)) - x| in the body mask, intensities in [-1, 1]"),
    "MAE_cyc (HU)": ("HU", "mean |F(G(x)) - x| in the body mask, in HU (x clipped to the CT window)"),
    "W1": ("normalised", "1-Wasserstein distance of the synthetic and reference MR histograms (thesis eq. 7.2)"),
    "Edge correlation": ("", "Pearson correlation of the gradient magnitudes of x and G(x) in the body mask; "
                             "1 = the same edges (contrast-independent, thesis 5 P1)"),
    "GMS": ("", "mean gradient-magnitude similarity of x and G(x) in the body mask, in [0, 1]; 1 = same edges"),
    "NMI": ("", "normalised mutual information of x and G(x) in the body mask; higher = more shared structure"),
    "Displacement mean (mm)": ("mm", "mean displacement of a B-spline registration (Mattes MI) of x to G(x) in "
                                     "the body; ~0 when G moved no anatomy"),
    "Displacement p95 (mm)": ("mm", "95th percentile of that displacement in the body"),
}


def metricsTableNode(scene: slicer.vtkMRMLScene, metrics: dict[str, float], name: str) -> slicer.vtkMRMLTableNode:
    """Add a table of metrics: columns ``Metric``, ``Value``, ``Unit``, ``Definition``; rows :data:`METRIC_ROWS`
    present in ``metrics`` (``W1`` and the anatomy rows only when they are numbers).

    Args:
        scene: the scene.
        metrics: from :func:`cycleMetrics` and :func:`anatomyMetrics`.
        name: node name.
    """
    table = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
    columns = [vtk.vtkStringArray(), vtk.vtkDoubleArray(), vtk.vtkStringArray(), vtk.vtkStringArray()]
    for array, columnName in zip(columns, ("Metric", "Value", "Unit", "Definition")):
        array.SetName(columnName)
    for row in METRIC_ROWS:
        value = metrics.get(row)
        if value is None or (row in _OPTIONAL_ROWS and not np.isfinite(value)):
            continue
        unit, definition = _METRIC_INFO[row]
        columns[0].InsertNextValue(row)
        columns[1].InsertNextValue(float(value))
        columns[2].InsertNextValue(unit)
        columns[3].InsertNextValue(definition)
    for array in columns:
        table.AddColumn(array)
    table.SetUseColumnTitleAsColumnHeader(True)
    return table


def addAnalysis(
    inputCT: slicer.vtkMRMLScalarVolumeNode,
    syntheticMR: slicer.vtkMRMLScalarVolumeNode,
    roundTripCT: slicer.vtkMRMLScalarVolumeNode,
    referenceMR: slicer.vtkMRMLScalarVolumeNode | None = None,
    ctWindow: Sequence[float] = CT_WINDOW,
    computeMetrics: bool = True,
    anatomy: dict | None = None,
) -> AnalysisNodes:
    """Add the histogram table, plot chart (and series) and the metrics table of one translation.

    Args:
        inputCT: x (HU).
        syntheticMR: G(x) in [-1, 1].
        roundTripCT: F(G(x)) (HU).
        referenceMR: optional real MR for the histogram and W1.
        ctWindow: the model's CT window (HU).
        computeMetrics: also compute the metrics table (needs the ct2mr engine with torch in this Python): cycle
            and anatomy rows (:func:`anatomyMetrics`).
        anatomy: the engine's anatomy metrics (``anatomy.json`` of the warp check), or ``None``.

    Returns:
        The nodes. When the metrics cannot be computed (engine missing, odd volume), ``metricsTable`` is ``None``
        and ``metricsError`` says why; the histogram is always added.

    Raises:
        Exception: anything raised while building the histogram; nothing is left in the scene then.
    """
    scene = inputCT.GetScene()
    added: list[slicer.vtkMRMLNode] = []
    try:
        ct = slicer.util.arrayFromVolume(inputCT).astype(np.float32)
        mask = _bodyMask(ct, ctWindow)
        table = histogramTableNode(scene, syntheticMR, referenceMR, mask, f"{inputCT.GetName()} histogram")
        added.append(table)
        chart, series = histogramChartNode(scene, table, f"{inputCT.GetName()} histogram chart")
        added += [chart, *series]
        analysis = AnalysisNodes(table, chart, series)
        if computeMetrics:
            try:
                analysis.metrics = cycleMetrics(inputCT, roundTripCT, syntheticMR, referenceMR, ctWindow, mask)
                analysis.metrics.update(anatomyMetrics(inputCT, syntheticMR, mask, anatomy, ctWindow))
            except (ImportError, ValueError, RuntimeError) as error:
                analysis.metricsError = f"{type(error).__name__}: {error}"
            else:
                analysis.metricsTable = metricsTableNode(scene, analysis.metrics, f"{inputCT.GetName()} metrics")
                added.append(analysis.metricsTable)
        return analysis
    except BaseException:
        for node in added:
            scene.RemoveNode(node)
        raise
