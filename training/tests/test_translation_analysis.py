"""ct2mr.evaluation.translation_analysis: the metrics table and histograms a front end shows, with exact values, and through
`ct2mr translate --analysis` (real engine run)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import SimpleITK as sitk

from ct2mr.evaluation import translation_analysis as ta
from ct2mr_testdata import ABDOMEN_MR, HEART_CT, need, run_ct2mr

SHAPE = (16, 24, 24)


def image(array, spacing=(0.8, 0.7, 2.5)) -> sitk.Image:
    result = sitk.GetImageFromArray(np.asarray(array, np.float32))
    result.SetSpacing(spacing)
    return result


def synthetic_ct() -> np.ndarray:
    """A body (40 HU with a gradient along z) in air, (z, y, x)."""
    z, y, x = np.indices(SHAPE)
    body = (y - 12) ** 2 + (x - 12) ** 2 < 8 ** 2
    return np.where(body, 40.0 + 10.0 * z, -1000.0).astype(np.float32)


def test_identical_round_trip_and_shift():
    ct = synthetic_ct()
    synthetic = np.clip((ct + 600) / 800 - 1, -1, 1)
    same = ta.analyze_translation(image(ct), image(synthetic), image(ct))
    assert same["version"] == 1 and same["ct_window"] == [-600.0, 1000.0] and same["error"] == ""
    metrics = same["metrics"]
    assert metrics["ssim_cyc"] == pytest.approx(1.0) and metrics["mae_cyc"] == 0.0
    assert metrics["psnr_cyc_db"] is None  # infinite: JSON has no infinity
    rows = {row["name"]: row for row in same["rows"]}
    assert "PSNR_cyc" not in rows and "W1" not in rows  # not finite / no reference
    assert {"SSIM_cyc", "MAE_cyc", "MAE_cyc (HU)", "Edge correlation", "GMS", "NMI"} <= set(rows)
    assert rows["MAE_cyc (HU)"]["unit"] == "HU"
    json.dumps(same, allow_nan=False)  # JSON-ready

    shifted = ta.analyze_translation(image(ct), image(synthetic), image(ct + 80.0))
    assert shifted["metrics"]["mae_cyc_hu"] == pytest.approx(80.0, abs=1e-3)
    assert shifted["metrics"]["mae_cyc"] == pytest.approx(0.1, abs=1e-6)  # 80 HU of a 1600 HU window -> width 2
    assert shifted["metrics"]["psnr_cyc_db"] == pytest.approx(10 * math.log10(4 / 0.01), abs=1e-3)
    strided = ta.analyze_translation(image(ct), image(synthetic), image(ct + 80.0), max_ssim_voxels=500)
    assert strided["metrics"]["ssim_stride"] >= 2 and strided["metrics"]["ssim_cyc"] is None  # below 11 voxels


def test_histogram_columns_and_warp_check_values():
    ct = synthetic_ct()
    body = ct > -500
    synthetic = np.where(body, 0.5, -1.0)  # every body voxel in one bin
    anatomy = {"edge_correlation": 0.875, "gradient_magnitude_similarity": 0.8125, "nmi": 1.25,
               "displacement_mean_mm": 0.25, "displacement_p95_mm": 0.75}
    result = ta.analyze_translation(image(ct), image(synthetic), image(ct), ct_window=(-1000, 1000), anatomy=anatomy,
                                    bins=8)
    histogram = result["histogram"]
    assert histogram["bins"] == 8 and histogram["centres"] == pytest.approx(np.linspace(-0.875, 0.875, 8))
    assert list(histogram["columns"]) == ["Synthetic MR"]
    assert histogram["columns"]["Synthetic MR"] == pytest.approx([0, 0, 0, 0, 0, 0, 100, 0])
    rows = {row["name"]: row["value"] for row in result["rows"]}
    assert rows["Edge correlation"] == 0.875 and rows["NMI"] == 1.25 and rows["Displacement p95 (mm)"] == 0.75
    assert result["metrics"]["anatomy_source"] == "warp check (anatomy.json)"
    assert result["ct_window"] == [-1000.0, 1000.0]
    assert [r["name"] for r in result["rows"]] == [name for name, *_ in ta.METRIC_ROWS if name in rows]


def test_ct_window_of_reads_the_record():
    assert ta.ct_window_of({"preprocessing": {"config": {"ct_window": [-1000, 500]}}}) == [-1000.0, 500.0]
    assert ta.ct_window_of({}) == [-600.0, 1000.0]


def test_a_missing_reference_is_reported_not_raised(tmp_path):
    ct = synthetic_ct()
    result = ta.analyze_translation(image(ct), image(np.zeros(SHAPE)), image(ct),
                                    reference_mr=[tmp_path / "absent.nii.gz"])
    assert "reference MR" in result["error"] and "Reference MR" not in result["histogram"]["columns"]
    assert result["rows"]  # the cycle metrics are still there
    path = ta.write_analysis(result, tmp_path)
    assert json.loads(path.read_text()) == result and [p.name for p in tmp_path.iterdir()] == ["analysis.json"]


@pytest.mark.slow
def test_translate_analysis_with_the_real_engine(tmp_path):
    need(HEART_CT, ABDOMEN_MR)
    crop = tmp_path / "crop.nrrd"
    sitk.WriteImage(sitk.ReadImage(str(HEART_CT))[10:58, 10:58, 30:62], str(crop))
    out = tmp_path / "out"
    proc = run_ct2mr("translate", str(crop), "-o", str(out), "--device", "cpu", "--progress", "json", "--analysis",
                     "--reference-mr", str(ABDOMEN_MR), check=True)
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    done = events[-1]
    assert done["event"] == "done" and done["ct_window"] == [-1000.0, 1000.0]  # the default model v1.5
    analysis = json.loads((out / "analysis.json").read_text())
    assert done["analysis"] == analysis and done["outputs"]["analysis"] == str(out / "analysis.json")
    assert analysis["error"] == "" and list(analysis["histogram"]["columns"]) == ["Synthetic MR", "Reference MR"]
    for column in analysis["histogram"]["columns"].values():
        assert sum(column) == pytest.approx(100.0)
    names = [row["name"] for row in analysis["rows"]]
    assert names[:5] == ["SSIM_cyc", "PSNR_cyc", "MAE_cyc", "MAE_cyc (HU)", "W1"]
    assert {"Edge correlation", "GMS", "NMI"} <= set(names)
    stages = [e.get("stage") for e in events if e["event"] == "progress"]
    assert stages.index("analysis") > stages.index("write")
