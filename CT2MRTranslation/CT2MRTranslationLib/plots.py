"""The engine's analysis of a translation in the scene: histograms as a plot chart, the metrics as a table.

Every number here comes from the engine (``ct2mr translate --analysis``: ``ct2mr.evaluation.translation_analysis``, which
writes ``OUT_DIR/analysis.json`` and puts the same object in its ``done`` event); this module only turns that JSON
into MRML nodes. No metric, histogram or mask is computed in Slicer's process, and nothing here imports the engine
or torch (DESIGN.md: "Slicer's process never imports torch or runs engine science").

- **Histogram** (thesis 7.4, figures 8 and 11): the synthetic MR's intensity distribution inside the CT's body mask,
  against the reference MR's (normalised like the engine's MR preprocessing, thesis eq. 4.4), as the percentage of
  voxels per bin of [-1, 1]. One ``vtkMRMLTableNode`` (columns ``Intensity``, ``Synthetic MR`` [, ``Reference MR``]),
  one ``vtkMRMLPlotSeriesNode`` per curve, one ``vtkMRMLPlotChartNode``.
- **Metrics** (thesis section 5, E2; section 7, W1 of eq. 7.2; section 5, P1 for the anatomy rows): a
  ``vtkMRMLTableNode`` with the columns ``Metric``, ``Value``, ``Unit``, ``Definition`` and the engine's rows in its
  order (``SSIM_cyc``, ``PSNR_cyc``, ``MAE_cyc``, ``MAE_cyc (HU)``, ``W1``, ``Edge correlation``, ``GMS``, ``NMI``,
  ``Displacement mean (mm)``, ``Displacement p95 (mm)``; only those the engine could compute).

No Qt here: runs inside Slicer and in plain Python with the ``slicer-core`` wheel.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import slicer
import vtk

__all__ = [
    "HISTOGRAM_COLUMNS",
    "METRICS_COLUMNS",
    "AnalysisNodes",
    "addAnalysis",
    "appendMetricRows",
    "qaMetricRows",
    "trustMetricRows",
    "histogramChartNode",
    "histogramTableNode",
    "metricsTableNode",
    "useColumnTitlesAsHeader",
]

HISTOGRAM_COLUMNS = ("Intensity", "Synthetic MR", "Reference MR")
"""Columns of the histogram table: bin centre (normalised intensity), then % of voxels per bin."""

METRICS_COLUMNS = ("Metric", "Value", "Unit", "Definition")
"""Columns of the metrics table."""

_SERIES_COLORS = {"Synthetic MR": (0.85, 0.33, 0.10), "Reference MR": (0.0, 0.45, 0.74)}


@dataclass
class AnalysisNodes:
    """Nodes :func:`addAnalysis` added to the scene, and the values they show.

    Attributes:
        histogramTable: histogram table (``Intensity``, ``Synthetic MR`` [, ``Reference MR``]).
        chart: plot chart of the histograms.
        series: one plot series per histogram curve, in column order.
        metricsTable: metrics table, or ``None`` when the engine reported no metric.
        metrics: the engine's metric values by row name (``"SSIM_cyc"``, ``"MAE_cyc (HU)"``, ...).
        metricsError: why metrics are missing, from the engine, else ``""``.
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


def useColumnTitlesAsHeader(table: slicer.vtkMRMLTableNode) -> None:
    """Show the column titles as the table view's header, where this Slicer's table node can.

    ``SetUseColumnTitleAsColumnHeader`` exists from Slicer 5.8 on (5.6 had ``SetUseColumnNameAsColumnHeader``);
    a table node without either keeps its default header, it is never an error.
    """
    for method in ("SetUseColumnTitleAsColumnHeader", "SetUseColumnNameAsColumnHeader"):
        setter = getattr(table, method, None)
        if setter is not None:
            setter(True)
            return


def histogramTableNode(scene: slicer.vtkMRMLScene, histogram: Mapping[str, Any], name: str) -> slicer.vtkMRMLTableNode:
    """Add the table of the engine's histograms.

    Args:
        scene: the scene.
        histogram: the analysis' ``histogram``: ``centres`` (bin centres in [-1, 1]) and ``columns``
            (``{"Synthetic MR": [% per bin], "Reference MR": [...]}``).
        name: table name.

    Returns:
        The table: ``Intensity`` then one column per curve (percent of voxels per bin, float64).

    Raises:
        ValueError: a column does not have one value per bin.
    """
    centres = np.asarray(histogram.get("centres") or [], np.float64)
    names, columns = [HISTOGRAM_COLUMNS[0]], [centres]
    for column, values in (histogram.get("columns") or {}).items():
        values = np.asarray(values, np.float64)
        if values.shape != centres.shape:
            raise ValueError(f"The engine's histogram column {column!r} has {values.size} values for "
                             f"{centres.size} bins.")
        names.append(str(column))
        columns.append(values)
    table = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
    slicer.util.updateTableFromArray(table, [np.ascontiguousarray(c) for c in columns], names)
    for column in names:
        table.SetColumnUnitLabel(column, "normalised intensity" if column == HISTOGRAM_COLUMNS[0] else "%")
        table.SetColumnDescription(column, "bin centre in [-1, 1]" if column == HISTOGRAM_COLUMNS[0]
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


def metricsTableNode(scene: slicer.vtkMRMLScene, rows: Sequence[Mapping[str, Any]], name: str
                     ) -> slicer.vtkMRMLTableNode:
    """Add the metrics table: columns :data:`METRICS_COLUMNS`, one row per engine row, in its order.

    Args:
        scene: the scene.
        rows: the analysis' ``rows`` (``name``, ``value``, ``unit``, ``definition``).
        name: node name.
    """
    table = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
    columns = [vtk.vtkStringArray(), vtk.vtkDoubleArray(), vtk.vtkStringArray(), vtk.vtkStringArray()]
    for array, columnName in zip(columns, METRICS_COLUMNS):
        array.SetName(columnName)
    for row in rows:
        columns[0].InsertNextValue(str(row["name"]))
        columns[1].InsertNextValue(float(row["value"]))
        columns[2].InsertNextValue(str(row.get("unit", "")))
        columns[3].InsertNextValue(str(row.get("definition", "")))
    for array in columns:
        table.AddColumn(array)
    useColumnTitlesAsHeader(table)
    return table


def addAnalysis(inputCT: slicer.vtkMRMLScalarVolumeNode, analysis: Mapping[str, Any]) -> AnalysisNodes:
    """Add the histogram table, plot chart (and series) and metrics table of one translation's analysis.

    Args:
        inputCT: the translated CT (names ``"<CT> histogram"``, ``"<CT> histogram chart"``, ``"<CT> metrics"``).
        analysis: the engine's analysis (``done`` event or ``analysis.json``; see ``ct2mr.evaluation.translation_analysis``).

    Returns:
        The nodes. Without metric rows ``metricsTable`` is ``None`` and ``metricsError`` says why.

    Raises:
        ValueError: the analysis has no histogram; nothing is left in the scene then.
    """
    scene = inputCT.GetScene()
    histogram = analysis.get("histogram")
    if not isinstance(histogram, Mapping) or not histogram.get("centres"):
        raise ValueError("The engine's analysis has no histogram: update the ct2mr engine.")
    added: list[slicer.vtkMRMLNode] = []
    try:
        table = histogramTableNode(scene, histogram, f"{inputCT.GetName()} histogram")
        added.append(table)
        chart, series = histogramChartNode(scene, table, f"{inputCT.GetName()} histogram chart")
        added += [chart, *series]
        rows = [row for row in analysis.get("rows") or [] if isinstance(row, Mapping) and "value" in row]
        nodes = AnalysisNodes(table, chart, series, metrics={str(r["name"]): float(r["value"]) for r in rows},
                              metricsError=str(analysis.get("error") or ""))
        if rows:
            nodes.metricsTable = metricsTableNode(scene, rows, f"{inputCT.GetName()} metrics")
            added.append(nodes.metricsTable)
        elif not nodes.metricsError:
            nodes.metricsError = "the engine reported no metric"
        return nodes
    except BaseException:
        for node in added:
            scene.RemoveNode(node)
        raise


def appendMetricRows(table: slicer.vtkMRMLTableNode, rows: Sequence[Mapping[str, Any]]) -> None:
    """Add rows (``name``, ``value``, ``unit``, ``definition``) at the end of a metrics table
    (:func:`metricsTableNode`)."""
    for row in rows:
        index = table.AddEmptyRow()
        table.SetCellText(index, 0, str(row["name"]))
        table.GetTable().SetValue(index, 1, vtk.vtkVariant(float(row["value"])))
        table.SetCellText(index, 2, str(row.get("unit", "")))
        table.SetCellText(index, 3, str(row.get("definition", "")))
    table.Modified()


def trustMetricRows(ood: Mapping[str, Any] | None, uncertainty: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """The metrics table's rows of the trust signals the engine reported (issue 16), no number computed here.

    Args:
        ood: the ``done`` event's ``ood`` block (``score``, ``threshold``); ``None``/``{}`` or a ``None`` score (a
            checkpoint without training statistics): no row.
        uncertainty: the ``done`` event's ``uncertainty`` block (``body``: mean/p95 inside the body mask).

    Returns:
        ``[{"name": "OOD score", ...}, {"name": "Uncertainty mean (body)", ...}, {"name": "Uncertainty p95 (body)",
        ...}]``, the rows that apply.
    """
    rows: list[dict[str, Any]] = []
    if ood and ood.get("score") is not None:
        threshold = ood.get("threshold")
        rows.append({"name": "OOD score", "key": "ood_score", "value": float(ood["score"]), "unit": "z",
                     "definition": "largest |x - mean| / sqrt(SD^2 + tolerance^2) of the CT's summary statistics "
                                   "against the model's training CTs (ct2mr.inference.ood); warning above "
                                   f"{threshold if threshold is not None else 3:g}"})
    body = (uncertainty or {}).get("body") or {}
    for key, label in (("mean", "Uncertainty mean (body)"), ("p95", "Uncertainty p95 (body)")):
        if body.get(key) is not None:
            rows.append({"name": label, "key": f"uncertainty_{key}", "value": float(body[key]),
                         "unit": "normalised", "definition": f"{key} of the SD of G(x) ({uncertainty.get('mode')}, "
                                                              f"{uncertainty.get('extra_passes')} extra passes of G) "
                                                              "inside the body mask"})
    return rows


QA_ROWS = (("mae", "MAE", "normalised"), ("psnr_db", "PSNR", "dB"), ("ssim", "SSIM", ""), ("ms_ssim", "MS-SSIM", ""),
           ("voxels", "Voxels in mask", "voxels"))
"""``qa_metrics.json`` metric key -> (row name, unit) of the QA table, in order."""


def qaMetricRows(qa: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The QA table's rows from the engine's ``qa_metrics.json`` (``ct2mr qa``): MAE, PSNR, SSIM, MS-SSIM, voxels,
    each with the engine's own definition (mask, range, clipping); metrics the engine reported as ``None`` (not
    finite) are left out."""
    metrics = qa.get("metrics") or {}
    definitions = qa.get("definitions") or {}
    rows = []
    for key, name, unit in QA_ROWS:
        value = metrics.get(key)
        if isinstance(value, (int, float)) and value == value:
            rows.append({"name": name, "key": key, "value": float(value), "unit": unit,
                         "definition": str(definitions.get(key) or definitions.get(name.lower()) or "")})
    return rows
