"""Trust signals in Slicer (issue 16): the uncertainty map as a volume on the CT's grid with a colour map and a fifth
compare column, the out-of-distribution warning line and score, and QA against a registered reference MR.

Real MRML scene, real subprocesses: the fake engine (``fake_ct2mr.py``, which reports the same fields and files as
``ct2mr translate --uncertainty tta --ood`` and ``ct2mr qa``) for the Logic; a fresh Python process checks that
torch stays out of the calling process, with the real engine when it is installed (marked ``engine``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import slicer
from CT2MRTranslationTestHelpers import FAKE_ENGINE, MODULE_DIR, TESTS_DIR, addSyntheticVolume, dataFile

from CT2MRTranslationLib import engine, nodes, views
from CT2MRTranslationLib.logic import CT2MRTranslationLogic
from CT2MRTranslationLib.options import TranslationOptions
from CT2MRTranslationLib.parameters import CT2MRTranslationParameters

from fake_ct2mr import OOD_SCORE, OOD_WARNING_SCORE, fakeUncertainty


@pytest.fixture
def logic(tmp_path):
    logic = CT2MRTranslationLogic()
    logic.temporaryDirectory = str(tmp_path / "temporary")
    return logic


def sameGrid(node, reference) -> bool:
    return (nodes.volumeDimensions(node) == nodes.volumeDimensions(reference)
            and np.array_equal(nodes.ijkToRASMatrixAsNumpy(node), nodes.ijkToRASMatrixAsNumpy(reference)))


def tableValues(table) -> dict[str, float]:
    return {table.GetCellText(r, 0): table.GetTable().GetValue(r, 1).ToDouble() for r in range(table.GetNumberOfRows())}


def startArguments(log) -> list[str]:
    return next(e for e in log if e.get("event") == "start")["argv"]


# --- options ---------------------------------------------------------------------------------------------------------


def test_uncertainty_flags_only_when_the_map_is_on():
    plain = TranslationOptions(device="cpu").engineArguments()
    assert "--uncertainty" not in plain and "--uncertainty-passes" not in plain and "--ood" not in plain
    tta = TranslationOptions(device="cpu", uncertainty="tta", uncertaintyPasses=2, ood=True).engineArguments()
    assert tta[tta.index("--uncertainty") + 1] == "tta" and tta[tta.index("--uncertainty-passes") + 1] == "2"
    assert "--ood" in tta


@pytest.mark.parametrize(("values", "message"), [
    ({"uncertainty": "ensemble"}, "several models"),
    ({"uncertainty": "mc"}, "uncertainty must be one of none, tta, ensemble"),
    ({"uncertainty": "tta", "uncertaintyPasses": 0}, r"uncertaintyPasses must be in \[1, 16\]"),
])
def test_uncertainty_options_refused(values, message):
    with pytest.raises(ValueError, match=message):
        TranslationOptions(**values).validated()


def test_parameter_node_holds_the_trust_options(mrml):
    parameters = CT2MRTranslationParameters.get(mrml.scene)
    assert (parameters.uncertainty, parameters.uncertaintyPasses, parameters.oodCheck) == ("none", 4, True)
    parameters.uncertainty, parameters.uncertaintyPasses, parameters.oodCheck = "tta", 3, False
    options = parameters.translationOptions()
    assert (options.uncertainty, options.uncertaintyPasses, options.ood) == ("tta", 3, False)
    with pytest.raises(ValueError):
        parameters.uncertaintyPasses = 99


# --- the uncertainty map ---------------------------------------------------------------------------------------------


def test_uncertainty_map_is_a_volume_on_the_cts_exact_grid(mrml, logic, fakeEngineFactory):
    scene = mrml.scene
    ctNode = addSyntheticVolume(scene, "Chest CT", shape=(14, 22, 18))
    shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    study = shNode.CreateStudyItem(shNode.CreateSubjectItem(shNode.GetSceneItemID(), "Patient"), "Study")
    shNode.CreateItem(study, ctNode)
    result = logic.translate(ctNode, device="cpu", uncertainty="tta", uncertaintyPasses=2,
                             processFactory=fakeEngineFactory("ok"))
    argv = startArguments(result.log)
    assert argv[argv.index("--uncertainty") + 1] == "tta" and argv[argv.index("--uncertainty-passes") + 1] == "2"
    uncertaintyMap = result.uncertaintyMap
    assert uncertaintyMap is not None and uncertaintyMap.GetName() == "Chest CT uncertainty"
    assert sameGrid(uncertaintyMap, ctNode)
    synthetic = slicer.util.arrayFromVolume(result.syntheticMR)
    np.testing.assert_allclose(slicer.util.arrayFromVolume(uncertaintyMap), fakeUncertainty(synthetic), atol=1e-6)
    display = uncertaintyMap.GetDisplayNode()
    assert display.GetColorNodeID() == nodes.findColorNodeID(scene, nodes.UNCERTAINTY_COLOR_NODE_NAMES)
    assert display.GetWindow() == pytest.approx(1.5 * result.uncertainty["body"]["p95"], rel=1e-4)
    assert shNode.GetItemParent(shNode.GetItemByDataNode(uncertaintyMap)) == study
    assert uncertaintyMap in result.outputVolumeNodes and uncertaintyMap in result.nodes
    assert result.uncertainty["extra_passes"] == 2
    # the compare layout's fifth column shows it; its summary rows are in the table view of the analysis row
    assert result.layoutId == views.COMPARE_UNCERTAINTY_ANALYSIS_LAYOUT_ID
    tableView = scene.GetSingletonNode(views.TABLE_VIEW_NAME, "vtkMRMLTableViewNode")
    assert tableView.GetTableNodeID() == result.trustTable.GetID()
    for orientation, _ in views.COMPARE_ORIENTATIONS:
        sliceNode = scene.GetSingletonNode(views.compareViewName(views.UNCERTAINTY_COLUMN, orientation),
                                           "vtkMRMLSliceNode")
        composite = slicer.vtkMRMLSliceLogic.GetSliceCompositeNode(sliceNode)
        assert composite.GetBackgroundVolumeID() == uncertaintyMap.GetID()
    assert views.compareLayoutDescription(withUncertainty=True).count("CT2MR_Uncertainty_") == 3


def test_without_uncertainty_the_layout_keeps_four_columns(mrml, logic, fakeEngineFactory):
    result = logic.translate(addSyntheticVolume(mrml.scene), device="cpu", processFactory=fakeEngineFactory("ok"))
    assert result.uncertaintyMap is None and result.layoutId == views.COMPARE_LAYOUT_ID
    assert "--uncertainty" not in startArguments(result.log) and result.ood == {} and result.oodWarning == ""


# --- the out-of-distribution check -----------------------------------------------------------------------------------


def test_ood_warning_line_for_an_ood_done_event(mrml, logic, fakeEngineFactory):
    ctNode = addSyntheticVolume(mrml.scene, "Head CT")
    result = logic.translate(ctNode, device="cpu", ood=True, analysis=True, processFactory=fakeEngineFactory("ood"))
    assert "--ood" in startArguments(result.log)
    done = next(e for e in result.log if e.get("event") == "done")
    assert done["ood"]["ood_warning"] is True
    assert result.oodWarning.startswith(f"Out-of-distribution warning: score {OOD_WARNING_SCORE:.2f} > 3")
    assert "cross_section_cm2" in result.oodWarning and "\n" not in result.oodWarning
    metrics = tableValues(result.analysis.metricsTable)
    assert metrics["OOD score"] == pytest.approx(OOD_WARNING_SCORE) and "MAE_cyc (HU)" in metrics


def test_ood_within_range_gives_a_score_and_no_warning(mrml, logic, fakeEngineFactory):
    result = logic.translate(addSyntheticVolume(mrml.scene), device="cpu", ood=True, uncertainty="tta",
                             processFactory=fakeEngineFactory("ok"))
    assert result.oodWarning == "" and result.ood["score"] == pytest.approx(OOD_SCORE)
    assert result.analysis is None and result.trustTable is not None and result.trustTable in result.nodes
    metrics = tableValues(result.trustTable)
    assert metrics["OOD score"] == pytest.approx(OOD_SCORE)
    assert metrics["Uncertainty mean (body)"] == pytest.approx(result.uncertainty["body"]["mean"])


def test_warning_line_of_the_engine_fields():
    assert engine.oodWarningLine({"ood_warning": False, "score": 1.0}) == ""
    assert engine.oodWarningLine({}) == "" and engine.oodWarningLine(None) == ""
    line = engine.oodWarningLine({"ood_warning": True, "score": 3.42, "threshold": 3.0,
                                  "top_features": ["lung_fraction"], "features": {"lung_fraction": {"value": 0.02, "mean": 0.2, "z": 3.42}}})
    assert line.startswith("Out-of-distribution warning: score 3.42 > 3 (lung_fraction 0.02 vs 0.2 in training, z 3.4)")


# --- the Widget's path: a batch --------------------------------------------------------------------------------------


def test_a_batch_of_one_volume_runs_the_trust_signals_on_that_ct(mrml, logic, fakeEngineFactory):
    parameters = logic.getParameters(mrml.scene)
    parameters.inputVolume = addSyntheticVolume(mrml.scene, "Chest CT")
    parameters.device, parameters.uncertainty, parameters.uncertaintyPasses = "cpu", "tta", 2
    parameters.computeMetrics = True
    batch = logic.translateBatch([parameters.inputVolume], processFactory=fakeEngineFactory("ood"),
                                 **parameters.translateKeywords())
    assert batch.failures == [] and len(batch.results) == 1, batch.failures
    result = batch.results[0]
    assert not batch.engineArguments[1].endswith(".txt") and "--ood" in batch.engineArguments
    assert sameGrid(result.uncertaintyMap, parameters.inputVolume)
    assert "5.97" in result.oodWarning
    assert {"OOD score", "Uncertainty p95 (body)"} <= set(tableValues(result.analysis.metricsTable))


def test_a_batch_of_several_volumes_leaves_the_ood_check_out(mrml, logic, fakeEngineFactory):
    volumes = [addSyntheticVolume(mrml.scene, f"CT {i}") for i in range(2)]
    batch = logic.translateBatch(volumes, device="cpu", ood=True, processFactory=fakeEngineFactory("ok"))
    assert batch.failures == [] and len(batch.results) == 2
    assert "--ood" not in batch.engineArguments and batch.notes and "one CT volume at a time" in batch.notes[0]
    refused = logic.translateBatch(volumes, device="cpu", uncertainty="tta", processFactory=fakeEngineFactory("ok"))
    assert len(refused.failures) == 2 and "one CT volume at a time" in refused.failures[0][1]


# --- QA against a reference ------------------------------------------------------------------------------------------


def test_quality_loads_the_difference_map_and_the_metrics_table(mrml, logic, fakeEngineFactory):
    scene = mrml.scene
    ctNode = addSyntheticVolume(scene, "Chest CT")
    result = logic.translate(ctNode, device="cpu", setupLayout=False, processFactory=fakeEngineFactory("ok"))
    referenceNode = addSyntheticVolume(scene, "Registered MR")  # the CT's grid, other intensities
    slicer.util.updateVolumeFromArray(referenceNode, slicer.util.arrayFromVolume(referenceNode) * -1.0)
    qa = logic.runQuality(result.syntheticMR, referenceNode, ctNode, processFactory=fakeEngineFactory("ok"),
                          timeout=120)
    assert qa.differenceMap.GetName() == "Chest CT synthetic MR difference to reference"
    assert sameGrid(qa.differenceMap, result.syntheticMR) and qa.differenceMap.GetScene() is scene
    rows = tableValues(qa.metricsTable)
    assert set(rows) == {"MAE", "PSNR", "SSIM", "MS-SSIM", "Voxels in mask"}
    assert rows["MAE"] == pytest.approx(qa.metrics["mae"]) and rows["SSIM"] == 0.5
    assert qa.metricsTable.GetCellText(0, 3) == "fake mean |s - r|"
    arguments = next(e for e in qa.log if e["event"] == "start")
    assert arguments["command"] == "qa"
    assert not os.listdir(logic.temporaryDirectory)  # the temporary folder is gone


def test_quality_refuses_a_reference_on_another_grid_and_adds_nothing(mrml, logic, fakeEngineFactory):
    scene = mrml.scene
    ctNode = addSyntheticVolume(scene, "Chest CT")
    result = logic.translate(ctNode, device="cpu", setupLayout=False, processFactory=fakeEngineFactory("ok"))
    other = addSyntheticVolume(scene, "Unregistered MR", shape=(10, 20, 16))
    before = scene.GetNumberOfNodes()
    with pytest.raises(RuntimeError, match="QA against the reference failed: The reference MR is not on"):
        logic.runQuality(result.syntheticMR, other, ctNode, processFactory=fakeEngineFactory("ok"), timeout=120)
    assert scene.GetNumberOfNodes() == before


# --- torch stays out of the calling process --------------------------------------------------------------------------

SCRIPT = textwrap.dedent('''
    import json, pathlib, sys
    sys.path[:0] = [sys.argv[1], sys.argv[2]]
    from CT2MRTranslationTestHelpers import addSyntheticVolume, closeScene, makeScene
    work = pathlib.Path(sys.argv[3])
    fixture = makeScene(work / "home", withLayoutLogic=True)
    from CT2MRTranslationLib.logic import CT2MRTranslationLogic
    from CT2MRTranslationLib.runner import TranslationProcess

    fake = sys.argv[4]
    factory = (lambda mode: (lambda args: TranslationProcess([sys.executable, fake, "--mode", mode, *args]))) \\
        if fake != "-" else (lambda mode: None)
    logic = CT2MRTranslationLogic()
    logic.temporaryDirectory = str(work / "temporary")
    parameters = logic.getParameters(fixture.scene)
    if len(sys.argv) > 5:
        parameters.inputVolume = fixture.loadVolume(sys.argv[5], "CT")
        parameters.referenceMR = fixture.loadVolume(sys.argv[5], "Reference")
    else:
        parameters.inputVolume = addSyntheticVolume(fixture.scene, "CT")
        parameters.referenceMR = addSyntheticVolume(fixture.scene, "Reference")
    parameters.device, parameters.uncertainty, parameters.uncertaintyPasses = "cpu", "tta", 1
    parameters.computeMetrics = False
    batch = logic.translateBatch([parameters.inputVolume], processFactory=factory("ood"),
                                 **parameters.translateKeywords())
    result = batch.results[0] if batch.results else None
    qa = logic.runQuality(result.syntheticMR, parameters.referenceMR, parameters.inputVolume,
                          processFactory=factory("ok")) if result else None
    report = {
        "failures": batch.failures,
        "uncertainty": bool(result and result.uncertaintyMap is not None),
        "ood": result.ood.get("score") if result else None,
        "qaRows": qa.metricsTable.GetNumberOfRows() if qa else 0,
        "loaded": sorted(name for name in sys.modules if name == "torch" or name.startswith(("torch.", "ct2mr",
                                                                                               "monai", "scipy"))),
    }
    closeScene(fixture)
    print("REPORT " + json.dumps(report))
''')


def runScript(tmp_path, *arguments: str) -> dict:
    environment = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    completed = subprocess.run([sys.executable, "-c", SCRIPT, str(TESTS_DIR), str(MODULE_DIR), str(tmp_path),
                                *arguments], capture_output=True, text=True, timeout=900, env=environment)
    lines = [line for line in completed.stdout.splitlines() if line.startswith("REPORT ")]
    assert completed.returncode == 0 and lines, completed.stdout[-3000:] + completed.stderr[-3000:]
    return json.loads(lines[-1][len("REPORT "):])


def test_trust_signals_and_qa_leave_torch_out_of_the_calling_process(tmp_path):
    report = runScript(tmp_path, str(FAKE_ENGINE))
    assert report["failures"] == [] and report["uncertainty"] and report["ood"] == OOD_WARNING_SCORE
    assert report["qaRows"] == 5
    assert "torch" not in report["loaded"] and not [n for n in report["loaded"] if n.startswith(("monai", "scipy"))]


@pytest.mark.slow
@pytest.mark.engine
def test_real_engine_trust_signals_and_qa_leave_torch_out(tmp_path):
    if importlib.util.find_spec("ct2mr") is None:
        pytest.skip("the ct2mr engine is not installed")
    import SimpleITK as sitk

    crop = tmp_path / "crop.nrrd"
    sitk.WriteImage(sitk.ReadImage(str(dataFile("ct/thorax_cta_heart_crop_1p5mm.nii.gz")))[10:42, 10:42, 30:54],
                    str(crop))
    report = runScript(tmp_path, "-", str(crop))
    assert report["failures"] == [] and report["uncertainty"] and report["ood"] is not None
    assert report["qaRows"] >= 4
    assert "torch" not in report["loaded"] and "ct2mr.evaluation.evaluate" not in report["loaded"]
    assert set(report["loaded"]) <= {"ct2mr", "ct2mr.models.registry", "ct2mr.io.sampledata"}, report["loaded"]
