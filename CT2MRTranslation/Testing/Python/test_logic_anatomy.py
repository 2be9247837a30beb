"""Anatomy preservation in Slicer (thesis section 5, P1/E2): the warp check's displacement map as a fourth output, and
the contrast-independent rows of the metrics table (edge correlation, GMS, NMI, displacement mean/p95).

Real scene, real subprocesses: the fake engine (``fake_ct2mr.py --warp-check``) for the Logic, the real ``ct2mr`` for
the test marked ``engine``. Every anatomy number comes from the engine (``anatomy.json`` / the ``analysis`` of its
``done`` event); the Slicer process computes none.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import slicer
from CT2MRTranslationTestHelpers import addSyntheticVolume, dataFile

from CT2MRTranslationLib import nodes, plots
from CT2MRTranslationLib.logic import CT2MRTranslationLogic
from CT2MRTranslationLib.nodes import DISPLACEMENT_COLOR_NODE_NAMES, MIN_DISPLACEMENT_WINDOW_MM
from CT2MRTranslationLib.options import TranslationOptions
from CT2MRTranslationLib.parameters import CT2MRTranslationParameters
from CT2MRTranslationLib.runner import TranslationProcess

from fake_ct2mr import ANATOMY as FAKE_ANATOMY  # the tests' folder is on sys.path, like the helpers

ROWS_FROM_JSON = {"Edge correlation": "edge_correlation", "GMS": "gradient_magnitude_similarity", "NMI": "nmi"}


@pytest.fixture
def logic(tmp_path):
    logic = CT2MRTranslationLogic()
    logic.temporaryDirectory = str(tmp_path / "temporary")
    return logic


def startArguments(result) -> list[str]:
    return next(e for e in result.log if e["event"] == "start")["argv"]


def tableValues(table) -> dict[str, float]:
    return {table.GetCellText(r, 0): table.GetTable().GetValue(r, 1).ToDouble() for r in range(table.GetNumberOfRows())}


def sameGrid(node, reference) -> bool:
    return (nodes.volumeDimensions(node) == nodes.volumeDimensions(reference)
            and np.array_equal(nodes.ijkToRASMatrixAsNumpy(node), nodes.ijkToRASMatrixAsNumpy(reference)))


def fakeDisplacement(ct: np.ndarray) -> np.ndarray:
    """What the fake engine writes: 0.1 mm per slice index inside the body (> -500 HU), 0 outside."""
    return np.where(ct > -500.0, 0.1 * np.indices(ct.shape)[0], 0.0)


# --- the Logic with the fake engine -----------------------------------------------------------------------------------


def test_warp_check_off_keeps_three_outputs(mrml, logic, fakeEngineFactory):
    volumesBefore = mrml.scene.GetNumberOfNodesByClass("vtkMRMLVolumeNode")
    result = logic.translate(addSyntheticVolume(mrml.scene), processFactory=fakeEngineFactory("ok"),
                             setupLayout=False)
    assert "--warp-check" not in startArguments(result)
    assert result.displacementMap is None and result.anatomy == {}
    assert result.outputVolumeNodes == result.volumeNodes and len(result.nodes) == 3
    assert mrml.scene.GetNumberOfNodesByClass("vtkMRMLVolumeNode") == volumesBefore + 1 + 3


def test_warp_check_adds_the_displacement_map_and_the_anatomy_rows(mrml, logic, fakeEngineFactory, tmp_path):
    scene = mrml.scene
    ctNode = addSyntheticVolume(scene, "Chest CT", shape=(16, 24, 24))
    shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    study = shNode.CreateStudyItem(shNode.CreateSubjectItem(shNode.GetSceneItemID(), "Patient"), "Study")
    shNode.CreateItem(study, ctNode)
    outputDir = tmp_path / "kept"

    result = logic.translate(ctNode, warpCheck=True, computeMetrics=True, processFactory=fakeEngineFactory("ok"),
                             outputDirectory=str(outputDir), setupLayout=False)

    assert "--warp-check" in startArguments(result)
    displacement = result.displacementMap
    assert displacement is not None and displacement.GetName() == "Chest CT displacement (mm)"
    assert displacement.GetScene() is scene and sameGrid(displacement, ctNode)
    ct = slicer.util.arrayFromVolume(ctNode).astype(np.float32)
    np.testing.assert_allclose(slicer.util.arrayFromVolume(displacement), fakeDisplacement(ct), atol=1e-6)
    assert shNode.GetItemParent(shNode.GetItemByDataNode(displacement)) == study
    assert displacement in result.outputVolumeNodes and displacement in result.nodes
    assert result.volumeNodes == (result.syntheticMR, result.roundTripCT, result.errorMap)  # the compare layout's

    anatomy = json.loads((outputDir / "anatomy.json").read_text())
    assert result.anatomy == anatomy
    assert {"edge_correlation", "gradient_magnitude_similarity", "gmsd", "nmi", "displacement_mean_mm",
            "displacement_p95_mm", "displacement_max_mm"} <= set(anatomy)
    # colour map from 0 mm to max(p95, 1 mm), with a colour table of the preferred list (the wheel has no
    # ColdToHotRainbow file: PET-Heat then)
    display = displacement.GetDisplayNode()
    high = max(anatomy["displacement_p95_mm"], MIN_DISPLACEMENT_WINDOW_MM)
    assert display.GetWindow() == pytest.approx(high) and display.GetLevel() == pytest.approx(high / 2)
    assert display.GetColorNode().GetName() in DISPLACEMENT_COLOR_NODE_NAMES

    values = tableValues(result.analysis.metricsTable)
    rows = [result.analysis.metricsTable.GetCellText(r, 0) for r in range(len(values))]
    assert rows == ["MAE_cyc", "MAE_cyc (HU)", "Edge correlation", "GMS", "NMI", "Displacement mean (mm)",
                    "Displacement p95 (mm)"]
    assert values["Displacement mean (mm)"] == pytest.approx(anatomy["displacement_mean_mm"])
    assert values["Displacement p95 (mm)"] == pytest.approx(anatomy["displacement_p95_mm"])
    for row, key in ROWS_FROM_JSON.items():  # the engine's values, shown as they are
        assert values[row] == pytest.approx(anatomy[key])
    assert os.listdir(logic.temporaryDirectory) == []


def test_anatomy_from_the_json_file_when_the_done_event_has_none(mrml, logic, fakeEngineFactory):
    ctNode = addSyntheticVolume(mrml.scene)
    result = logic.translate(ctNode, warpCheck=True, analysis=True, processFactory=fakeEngineFactory("anatomyfile"),
                             setupLayout=False)
    assert "anatomy" not in result.log[-1] and "analysis" not in result.log[-1]
    assert result.analysis.metrics["NMI"] == FAKE_ANATOMY["nmi"]  # analysis.json read from OUT_DIR
    assert {k: result.anatomy[k] for k in FAKE_ANATOMY} == FAKE_ANATOMY
    ct = slicer.util.arrayFromVolume(ctNode).astype(np.float32)
    inside = fakeDisplacement(ct)[ct > -500.0]
    assert result.anatomy["displacement_mean_mm"] == pytest.approx(inside.mean(), rel=1e-6)
    assert result.anatomy["displacement_p95_mm"] == pytest.approx(np.percentile(inside, 95), rel=1e-6)


def test_parameters_turn_the_warp_check_on(mrml, logic, fakeEngineFactory):
    parameters = CT2MRTranslationParameters.get(mrml.scene)
    parameters.warpCheck = True
    parameters.computeMetrics = False
    parameters.showCompareLayout = False
    keywords = parameters.translateKeywords()
    assert keywords["options"].warpCheck is True and keywords["options"].analysis is False
    result = logic.translate(addSyntheticVolume(mrml.scene), processFactory=fakeEngineFactory("ok"), **keywords)
    assert result.displacementMap is not None and result.analysis is None


def test_engine_options_and_retries_keep_the_warp_check(mrml, logic, fakeEngineFactory):
    assert "--warp-check" in TranslationOptions(warpCheck=True).engineArguments()
    assert "--warp-check" not in TranslationOptions().engineArguments()
    result = logic.translate(addSyntheticVolume(mrml.scene), warpCheck=True, device="cuda", swBatchSize=4,
                             processFactory=fakeEngineFactory("oom"), setupLayout=False)
    assert len(result.retryMessages) == 1 and result.displacementMap is not None  # the engine's own retry
    assert all("--warp-check" in e["argv"] for e in result.log if e["event"] == "start")


def test_cancel_leaves_no_displacement_map(mrml, logic, fakeEngineFactory):
    scene = mrml.scene
    ctNode = addSyntheticVolume(scene)
    before = scene.GetNumberOfNodes()
    job = logic.startTranslation(ctNode, warpCheck=True, processFactory=fakeEngineFactory("sleep"))
    deadline = time.monotonic() + 30
    while job.fraction < 0.1:
        assert not job.update() and time.monotonic() < deadline
        time.sleep(0.05)
    logic.cancel(job)
    assert job.state == "cancelled" and scene.GetNumberOfNodes() == before
    assert not [n for n in scene.GetNodesByClass("vtkMRMLVolumeNode") if "displacement" in n.GetName()]
    assert os.listdir(logic.temporaryDirectory) == []


def test_a_missing_displacement_file_fails_cleanly(mrml, logic, fakeEngineFactory):
    """An engine that ignores the warp check: no node at all is added (the three others are removed too)."""
    scene = mrml.scene
    ctNode = addSyntheticVolume(scene)
    before = scene.GetNumberOfNodes()

    def withoutWarpCheck(engineArgs):
        return fakeEngineFactory("ok")([a for a in engineArgs if a != "--warp-check"])

    with pytest.raises(RuntimeError, match="displacement \\(mm\\) file .* does not exist"):
        logic.translate(ctNode, warpCheck=True, computeMetrics=True, processFactory=withoutWarpCheck)
    assert scene.GetNumberOfNodes() == before and os.listdir(logic.temporaryDirectory) == []


def test_an_engine_without_the_warp_check_is_explained(mrml, logic):
    script = ("import sys; sys.stderr.write('usage: ct2mr translate [-h] ...\\nct2mr: error: unrecognized "
              "arguments: --warp-check\\n'); sys.exit(2)")
    with pytest.raises(RuntimeError, match="does not know --warp-check: it is older than this module"):
        logic.translate(addSyntheticVolume(mrml.scene), warpCheck=True,
                        processFactory=lambda args: TranslationProcess([sys.executable, "-c", script]))


def addSequence(scene, name, count):
    sequence = scene.AddNewNodeByClass("vtkMRMLSequenceNode", name)
    for index in range(count):
        volume = addSyntheticVolume(scene, f"frame {index}")
        sequence.SetDataNodeAtValue(volume, str(index))
        scene.RemoveNode(volume)
    return sequence


def test_sequences_get_a_displacement_sequence(mrml, logic, fakeEngineFactory):
    scene = mrml.scene
    sequence = addSequence(scene, "Cine CT", 2)
    batch = logic.translateBatch([sequence], processFactory=fakeEngineFactory("ok"), warpCheck=True)
    assert batch.state == "finished" and not batch.failures
    outputs = batch.outputSequences[sequence.GetID()]
    assert [o.GetName() for o in outputs] == ["Cine CT synthetic MR", "Cine CT round-trip CT", "Cine CT error map",
                                              "Cine CT displacement (mm)"]
    frame = slicer.util.arrayFromVolume(sequence.GetNthDataNode(1)).astype(np.float32)
    assert outputs[3].GetNumberOfDataNodes() == 2
    np.testing.assert_allclose(slicer.util.arrayFromVolume(outputs[3].GetNthDataNode(1)), fakeDisplacement(frame),
                               atol=1e-6)
    assert not [n for n in scene.GetNodesByClass("vtkMRMLScalarVolumeNode") if "displacement" in n.GetName()]


# --- the table's anatomy rows ---------------------------------------------------------------------------------------


def test_the_table_shows_the_engines_anatomy_rows_as_they_are(mrml):
    scene = mrml.scene
    ct = addSyntheticVolume(scene, "CT")
    rows = [{"name": "Edge correlation", "value": 0.875, "unit": "", "definition": "edges"},
            {"name": "Displacement p95 (mm)", "value": 0.75, "unit": "mm", "definition": "B-spline registration"}]
    analysis = {"histogram": {"centres": [-0.5, 0.5], "columns": {"Synthetic MR": [25.0, 75.0]}}, "rows": rows,
                "error": ""}
    nodesAdded = plots.addAnalysis(ct, analysis)
    assert tableValues(nodesAdded.metricsTable) == {"Edge correlation": 0.875, "Displacement p95 (mm)": 0.75}
    assert nodesAdded.metricsTable.GetCellText(1, 2) == "mm" and "B-spline" in nodesAdded.metricsTable.GetCellText(1, 3)


# --- the real engine --------------------------------------------------------------------------------------------------


def engineHasWarpCheck() -> bool:
    if importlib.util.find_spec("ct2mr") is None:
        return False
    completed = subprocess.run([sys.executable, "-m", "ct2mr", "translate", "--help"], capture_output=True, text=True,
                               timeout=120)
    return "--warp-check" in completed.stdout


@pytest.mark.slow
@pytest.mark.engine
def test_real_engine_warp_check(mrml, logic, tmp_path):
    if not engineHasWarpCheck():
        pytest.skip("the installed ct2mr engine has no 'translate --warp-check' yet")
    import SimpleITK as sitk

    image = sitk.ReadImage(str(dataFile("ct/thorax_cta_heart_crop_1p5mm.nii.gz")))
    # 80 x 80 x 48 voxels (120 x 120 x 72 mm): on a 40-voxel crop the registration's few control points sometimes
    # diverge ("All samples map outside moving image buffer"); this size is stable and takes ~20 s on a CPU
    sitk.WriteImage(image[10:90, 10:90, 30:78], str(tmp_path / "crop.nrrd"))
    ctNode = mrml.loadVolume(tmp_path / "crop.nrrd", "Heart crop")

    result = logic.translate(ctNode, device="cpu", warpCheck=True, analysis=True, setupLayout=False)

    displacement = result.displacementMap
    assert displacement is not None and sameGrid(displacement, ctNode)
    values = slicer.util.arrayFromVolume(displacement)
    assert np.isfinite(values).all() and values.min() >= 0.0
    anatomy = result.anatomy
    assert anatomy["displacement_max_mm"] >= anatomy["displacement_p95_mm"] >= 0.0
    assert -1.0 <= anatomy["edge_correlation"] <= 1.0 and 1.0 <= anatomy["nmi"] <= 2.0
    table = tableValues(result.analysis.metricsTable)
    assert {"Edge correlation", "GMS", "NMI", "Displacement mean (mm)", "Displacement p95 (mm)"} <= set(table)
    assert table["Displacement p95 (mm)"] == pytest.approx(anatomy["displacement_p95_mm"])
    for row, key in ROWS_FROM_JSON.items():  # the warp check's values, as the engine reported them
        assert table[row] == pytest.approx(anatomy[key])
    assert os.listdir(logic.temporaryDirectory) == []
