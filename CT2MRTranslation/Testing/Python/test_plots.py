"""Histogram table + plot chart and metrics table from the engine's analysis JSON, on a real scene (exact values).

Nothing is computed here: the nodes must show the engine's numbers as they are (``ct2mr.evaluation.translation_analysis``).
"""

from __future__ import annotations

import numpy as np
import pytest
import slicer
from CT2MRTranslationTestHelpers import addSyntheticVolume

from CT2MRTranslationLib import plots

CENTRES = [-0.75, -0.25, 0.25, 0.75]
ROWS = [
    {"name": "SSIM_cyc", "key": "ssim_cyc", "value": 0.93, "unit": "", "definition": "SSIM-3D of x and F(G(x))"},
    {"name": "MAE_cyc (HU)", "key": "mae_cyc_hu", "value": 41.5, "unit": "HU", "definition": "mean |F(G(x)) - x|"},
    {"name": "W1", "key": "w1", "value": 0.125, "unit": "normalised", "definition": "1-Wasserstein distance"},
]


def analysisJson(reference=True, rows=ROWS, error=""):
    columns = {"Synthetic MR": [10.0, 20.0, 30.0, 40.0]}
    if reference:
        columns["Reference MR"] = [40.0, 30.0, 20.0, 10.0]
    return {"version": 1, "ct_window": [-600.0, 1000.0], "histogram": {"bins": 4, "range": [-1, 1],
            "centres": CENTRES, "columns": columns}, "metrics": {}, "rows": rows, "error": error}


def tableColumn(table, name) -> np.ndarray:
    return slicer.util.arrayFromTableColumn(table, name).copy()


def test_histogram_table_and_chart(mrml):
    scene = mrml.scene
    table = plots.histogramTableNode(scene, analysisJson()["histogram"], "CT histogram")
    assert table.GetName() == "CT histogram" and table.GetNumberOfRows() == 4
    assert [table.GetColumnName(i) for i in range(table.GetNumberOfColumns())] == list(plots.HISTOGRAM_COLUMNS)
    np.testing.assert_array_equal(tableColumn(table, "Intensity"), CENTRES)
    np.testing.assert_array_equal(tableColumn(table, "Synthetic MR"), [10, 20, 30, 40])
    np.testing.assert_array_equal(tableColumn(table, "Reference MR"), [40, 30, 20, 10])
    assert table.GetColumnUnitLabel("Synthetic MR") == "%"
    assert table.GetColumnUnitLabel("Intensity") == "normalised intensity"

    chart, series = plots.histogramChartNode(scene, table)
    assert chart.IsA("vtkMRMLPlotChartNode") and chart.GetNumberOfPlotSeriesNodes() == 2
    assert [chart.GetNthPlotSeriesNodeID(i) for i in range(2)] == [s.GetID() for s in series]
    assert [(s.GetXColumnName(), s.GetYColumnName(), s.GetTableNodeID()) for s in series] == [
        ("Intensity", "Synthetic MR", table.GetID()), ("Intensity", "Reference MR", table.GetID())]
    assert all(s.GetPlotType() == slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter for s in series)
    assert chart.GetXAxisTitle() == "Normalised MR intensity" and chart.GetYAxisTitle() == "Voxels (%)"

    single = plots.histogramTableNode(scene, analysisJson(reference=False)["histogram"], "one curve")
    assert single.GetNumberOfColumns() == 2 and len(plots.histogramChartNode(scene, single)[1]) == 1


def test_metrics_table_shows_the_engines_rows(mrml):
    table = plots.metricsTableNode(mrml.scene, ROWS, "CT metrics")
    assert [table.GetColumnName(i) for i in range(4)] == list(plots.METRICS_COLUMNS)
    assert [table.GetCellText(r, 0) for r in range(table.GetNumberOfRows())] == ["SSIM_cyc", "MAE_cyc (HU)", "W1"]
    assert [table.GetTable().GetValue(r, 1).ToDouble() for r in range(3)] == [0.93, 41.5, 0.125]
    assert table.GetCellText(1, 2) == "HU" and table.GetCellText(2, 3) == "1-Wasserstein distance"
    assert table.GetUseColumnTitleAsColumnHeader()


def test_column_header_setting_is_guarded(mrml):
    class OldTableNode:  # a table node of a Slicer without SetUseColumnTitleAsColumnHeader (5.6 had another name)
        def __init__(self):
            self.calls = []

        def SetUseColumnNameAsColumnHeader(self, value):
            self.calls.append(value)

    old = OldTableNode()
    plots.useColumnTitlesAsHeader(old)
    assert old.calls == [True]
    plots.useColumnTitlesAsHeader(object())  # neither method: no error, the default header stays


def test_addAnalysis_nodes(mrml):
    scene = mrml.scene
    ct = addSyntheticVolume(scene, "Heart CT")
    analysis = plots.addAnalysis(ct, analysisJson())
    assert analysis.metricsError == "" and analysis.metrics == {"SSIM_cyc": 0.93, "MAE_cyc (HU)": 41.5, "W1": 0.125}
    assert [n.GetName() for n in (analysis.histogramTable, analysis.chart, analysis.metricsTable)] == [
        "Heart CT histogram", "Heart CT histogram chart", "Heart CT metrics"]
    assert len(analysis.series) == 2 and len(analysis.nodes) == 5
    assert all(node.GetScene() is scene for node in analysis.nodes)

    without = plots.addAnalysis(ct, analysisJson(rows=[], error="ValueError: The body mask is empty."))
    assert without.metricsTable is None and without.metricsError == "ValueError: The body mask is empty."
    assert plots.addAnalysis(ct, analysisJson(rows=[])).metricsError == "the engine reported no metric"


@pytest.mark.parametrize("broken", ["no histogram", "short column"])
def test_a_broken_analysis_leaves_nothing(mrml, broken):
    scene = mrml.scene
    ct = addSyntheticVolume(scene, "CT")
    before = scene.GetNumberOfNodes()
    analysis = analysisJson()
    if broken == "no histogram":
        del analysis["histogram"]
    else:
        analysis["histogram"]["columns"]["Reference MR"] = [1.0, 2.0]
    with pytest.raises(ValueError, match="no histogram|has 2 values for 4 bins"):
        plots.addAnalysis(ct, analysis)
    assert scene.GetNumberOfNodes() == before
