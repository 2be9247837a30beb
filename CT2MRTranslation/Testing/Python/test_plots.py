"""Histogram table + plot chart, cycle metrics and their table, on a real scene with exact expected values."""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
import slicer
from CT2MRTranslationTestHelpers import addSyntheticVolume, dataFile

from CT2MRTranslationLib import plots

SHAPE = (16, 24, 24)
ENGINE_ANATOMY = importlib.util.find_spec("ct2mr.anatomy") is not None  # edge/GMS/NMI rows computed in Slicer


def volumeLike(scene, reference, array, name):
    node = addSyntheticVolume(scene, name, shape=SHAPE)
    node.CopyOrientation(reference)
    slicer.util.updateVolumeFromArray(node, np.asarray(array, np.float32))
    return node


def tableColumn(table, name) -> np.ndarray:
    return slicer.util.arrayFromTableColumn(table, name).copy()


def test_histogram_table_and_chart(mrml):
    scene = mrml.scene
    ct = addSyntheticVolume(scene, "CT", shape=SHAPE)
    values = np.linspace(-1.0, 1.0, int(np.prod(SHAPE)), endpoint=False).reshape(SHAPE)  # uniform over [-1, 1)
    synthetic = volumeLike(scene, ct, values, "CT synthetic MR")
    reference = volumeLike(scene, ct, 100.0 + 50.0 * np.random.default_rng(0).random(SHAPE), "Real MR")

    table = plots.histogramTableNode(scene, synthetic, reference, bins=16)
    assert table.GetName() == "CT synthetic MR histogram" and table.GetNumberOfRows() == 16
    assert [table.GetColumnName(i) for i in range(table.GetNumberOfColumns())] == list(plots.HISTOGRAM_COLUMNS)
    np.testing.assert_allclose(tableColumn(table, "Intensity"), np.linspace(-1 + 1 / 16, 1 - 1 / 16, 16))
    np.testing.assert_allclose(tableColumn(table, "Synthetic MR"), np.full(16, 100.0 / 16))  # uniform: 6.25 % per bin
    referenceColumn = tableColumn(table, "Reference MR")
    assert referenceColumn.sum() == pytest.approx(100.0) and referenceColumn.min() >= 0
    assert table.GetColumnUnitLabel("Synthetic MR") == "%"

    chart, series = plots.histogramChartNode(scene, table)
    assert chart.IsA("vtkMRMLPlotChartNode") and chart.GetNumberOfPlotSeriesNodes() == 2
    assert [chart.GetNthPlotSeriesNodeID(i) for i in range(2)] == [s.GetID() for s in series]
    assert [(s.GetXColumnName(), s.GetYColumnName(), s.GetTableNodeID()) for s in series] == [
        ("Intensity", "Synthetic MR", table.GetID()), ("Intensity", "Reference MR", table.GetID())]
    assert all(s.GetPlotType() == slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter for s in series)
    assert chart.GetXAxisTitle() == "Normalised MR intensity" and chart.GetYAxisTitle() == "Voxels (%)"

    # without a reference: one curve
    table = plots.histogramTableNode(scene, synthetic, mask=values > 0, bins=4, name="half")
    assert table.GetNumberOfColumns() == 2
    np.testing.assert_allclose(tableColumn(table, "Synthetic MR"), [0, 0, 50, 50], atol=0.05)  # float32 edges
    assert len(plots.histogramChartNode(scene, table)[1]) == 1


def test_cycle_metrics_exact_values(mrml):
    scene = mrml.scene
    ct = addSyntheticVolume(scene, "CT", shape=SHAPE)
    x = slicer.util.arrayFromVolume(ct).astype(np.float32)
    mask = plots._bodyMask(x, plots.CT_WINDOW)
    assert 0 < mask.sum() < mask.size

    same = plots.cycleMetrics(ct, volumeLike(scene, ct, x, "same"))
    assert same["SSIM_cyc"] == pytest.approx(1.0) and math.isinf(same["PSNR_cyc"])
    assert same["MAE_cyc"] == 0.0 and math.isnan(same["W1"]) and same["voxels"] == mask.sum()

    shifted = plots.cycleMetrics(ct, volumeLike(scene, ct, x + 80.0, "shifted"))  # body stays inside the window
    assert shifted["MAE_cyc (HU)"] == pytest.approx(80.0, abs=1e-3)
    assert shifted["MAE_cyc"] == pytest.approx(0.1, abs=1e-6)  # 80 HU of a 1600 HU window mapped to width 2
    assert shifted["PSNR_cyc"] == pytest.approx(10 * math.log10(4 / 0.01), abs=1e-3)
    assert 0.0 < shifted["SSIM_cyc"] < 1.0 and shifted["ssimStride"] == 1.0

    strided = plots.cycleMetrics(ct, volumeLike(scene, ct, x + 80.0, "strided"), maxSSIMVoxels=500)
    assert strided["ssimStride"] >= 2 and math.isnan(strided["SSIM_cyc"])  # too small for the 11-voxel window
    assert strided["MAE_cyc"] == shifted["MAE_cyc"]  # only SSIM is subsampled


def test_w1_and_metrics_table(mrml):
    scene = mrml.scene
    ct = addSyntheticVolume(scene, "CT", shape=SHAPE)
    x = slicer.util.arrayFromVolume(ct).astype(np.float32)
    synthetic = volumeLike(scene, ct, np.clip((x + 600) / 800 - 1, -1, 1), "CT synthetic MR")
    reference = volumeLike(scene, ct, x + 2000.0, "MR")  # any units: normalised by its own percentiles
    metrics = plots.cycleMetrics(ct, volumeLike(scene, ct, x, "rt"), synthetic, reference)
    assert 0.0 <= metrics["W1"] < 2.0

    table = plots.metricsTableNode(scene, metrics, "CT metrics")
    assert [table.GetColumnName(i) for i in range(4)] == ["Metric", "Value", "Unit", "Definition"]
    rows = [table.GetCellText(r, 0) for r in range(table.GetNumberOfRows())]
    assert rows == list(plots.METRIC_ROWS[:5])  # no anatomy values given: no anatomy rows
    values = {table.GetCellText(r, 0): table.GetTable().GetValue(r, 1).ToDouble() for r in range(len(rows))}
    assert values["SSIM_cyc"] == pytest.approx(1.0) and values["W1"] == pytest.approx(metrics["W1"])
    assert table.GetCellText(1, 2) == "dB" and table.GetCellText(3, 2) == "HU"

    without = plots.metricsTableNode(scene, {**metrics, "W1": float("nan")}, "no reference")
    assert without.GetNumberOfRows() == 4


def test_addAnalysis_on_the_real_heart_ct(mrml):
    scene = mrml.scene
    ct = mrml.loadVolume(dataFile("ct/thorax_cta_heart_crop_1p5mm.nii.gz"), "Heart CT")
    x = slicer.util.arrayFromVolume(ct).astype(np.float32)
    synthetic = slicer.util.addVolumeFromArray(np.clip((x + 600) / 800 - 1, -1, 1).astype(np.float32),
                                               name="Heart CT synthetic MR")
    synthetic.CopyOrientation(ct)
    roundTrip = slicer.util.addVolumeFromArray(np.clip(x, -600, 1000) + 20.0, name="Heart CT round-trip CT")
    roundTrip.CopyOrientation(ct)
    reference = mrml.loadVolume(dataFile("mr/upper_abdomen_mr_3mm.nii.gz"), "Abdomen MR")

    analysis = plots.addAnalysis(ct, synthetic, roundTrip, reference)
    assert analysis.metricsError == ""
    assert analysis.histogramTable.GetNumberOfColumns() == 3 and len(analysis.series) == 2
    assert analysis.metrics["MAE_cyc (HU)"] == pytest.approx(20.0, abs=0.5)  # ~20 HU, less where x > 980 HU
    assert analysis.metricsTable.GetNumberOfRows() == (8 if ENGINE_ANATOMY else 5)  # + edge correlation, GMS, NMI
    assert all(node.GetScene() is scene for node in analysis.nodes) and len(analysis.nodes) == 5

    withoutMetrics = plots.addAnalysis(ct, synthetic, roundTrip, computeMetrics=False)
    assert withoutMetrics.metricsTable is None and len(withoutMetrics.series) == 1
