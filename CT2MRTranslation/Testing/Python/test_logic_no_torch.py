"""No science in Slicer's process: a full translation with analysis through the Logic, on a real MRML scene with the
real engine, leaves torch and the engine's science out of the calling process.

The check runs in a fresh Python process (what Slicer's process is to the module): in pytest's own process other
tests' imports would already have loaded torch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from CT2MRTranslationTestHelpers import MODULE_DIR, TESTS_DIR, dataFile

SCRIPT = textwrap.dedent('''
    import json, pathlib, sys
    sys.path[:0] = [sys.argv[1], sys.argv[2]]
    from CT2MRTranslationTestHelpers import closeScene, makeScene
    import SimpleITK as sitk
    work = pathlib.Path(sys.argv[3])
    sitk.WriteImage(sitk.ReadImage(sys.argv[4])[10:58, 10:58, 30:62], str(work / "crop.nrrd"))
    fixture = makeScene(work / "home", withLayoutLogic=True)
    from CT2MRTranslationLib.logic import CT2MRTranslationLogic

    logic = CT2MRTranslationLogic()
    logic.temporaryDirectory = str(work / "temporary")
    parameters = logic.getParameters(fixture.scene)
    parameters.inputVolume = fixture.loadVolume(work / "crop.nrrd", "Heart crop")
    parameters.referenceMR = fixture.loadVolume(sys.argv[5], "Abdomen MR")
    parameters.device, parameters.computeMetrics, parameters.warpCheck = "cpu", True, False
    rows = logic.modelList()  # the engine's registry, read in this process: no torch
    plan = logic.dependencyPlan()  # package metadata only
    batch = logic.translateBatch([parameters.inputVolume], **parameters.translateKeywords())
    result = batch.results[0] if batch.results else None
    report = {
        "failures": batch.failures,
        "rows": [result.analysis.metricsTable.GetCellText(r, 0)
                 for r in range(result.analysis.metricsTable.GetNumberOfRows())] if result else [],
        "histogramColumns": result.analysis.histogramTable.GetNumberOfColumns() if result else 0,
        "ctWindow": list(result.ctWindow) if result else None,
        "layout": result.layoutId if result else None,
        "models": len(rows), "planChecked": len(plan.statuses),
        "loaded": sorted(name for name in sys.modules if name == "torch" or name.startswith(("torch.", "ct2mr",
                                                                                               "monai", "scipy"))),
    }
    closeScene(fixture)
    print("REPORT " + json.dumps(report))
''')


@pytest.mark.slow
@pytest.mark.engine
def test_a_translation_with_analysis_leaves_torch_out_of_the_calling_process(tmp_path):
    ct = dataFile("ct/thorax_cta_heart_crop_1p5mm.nii.gz")
    mr = dataFile("mr/upper_abdomen_mr_3mm.nii.gz")
    environment = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    completed = subprocess.run([sys.executable, "-c", SCRIPT, str(TESTS_DIR), str(MODULE_DIR), str(tmp_path), str(ct),
                                str(mr)], capture_output=True, text=True, timeout=900, env=environment)
    lines = [line for line in completed.stdout.splitlines() if line.startswith("REPORT ")]
    assert completed.returncode == 0 and lines, completed.stdout[-3000:] + completed.stderr[-3000:]
    report = json.loads(lines[-1][len("REPORT "):])
    assert report["failures"] == []
    assert {"SSIM_cyc", "MAE_cyc (HU)", "W1", "Edge correlation", "GMS", "NMI"} <= set(report["rows"])
    assert report["histogramColumns"] == 3 and report["ctWindow"] == [-1000.0, 1000.0] and report["layout"]
    assert report["models"] >= 1 and report["planChecked"] > 0
    assert "torch" not in report["loaded"] and "ct2mr.evaluation.evaluate" not in report["loaded"]
    assert not [name for name in report["loaded"] if name.startswith(("torch", "monai", "scipy"))]
    # the registry and what it needs: light packages (docstrings only) and standard-library modules
    light = {"ct2mr", "ct2mr.io", "ct2mr.io.cache", "ct2mr.io.sampledata", "ct2mr.models", "ct2mr.models.registry"}
    assert set(report["loaded"]) <= light, report["loaded"]
