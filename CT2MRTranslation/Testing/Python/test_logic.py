"""CT2MRTranslationLogic end to end on a real scene, with the fake engine as a real subprocess.

The fake engine (``fake_ct2mr.py``) honours the ``ct2mr translate --progress json`` contract with arithmetic in place
of the networks; a last test runs the real engine when the ``ct2mr`` package is installed.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time

import numpy as np
import pytest
import slicer
from CT2MRTranslationTestHelpers import addSyntheticVolume, dataFile, processIsGone

from CT2MRTranslationLib import nodes, views
from CT2MRTranslationLib.logic import CT2MRTranslationLogic, CT2MRTranslationResult
from CT2MRTranslationLib.options import optionSpec
from CT2MRTranslationLib.runner import TranslationProcess


@pytest.fixture
def logic(tmp_path):
    logic = CT2MRTranslationLogic()
    logic.temporaryDirectory = str(tmp_path / "temporary")
    return logic


def volumeNodeCount(scene) -> int:
    return scene.GetNumberOfNodesByClass("vtkMRMLVolumeNode")


def assertOnInputGrid(result: CT2MRTranslationResult, inputNode) -> None:
    inputMatrix = nodes.ijkToRASMatrixAsNumpy(inputNode)
    for node in result.volumeNodes:
        np.testing.assert_array_equal(nodes.ijkToRASMatrixAsNumpy(node), inputMatrix, err_msg=node.GetName())
        assert nodes.volumeDimensions(node) == nodes.volumeDimensions(inputNode)


def test_translate_real_ct(mrml, logic, fakeEngineFactory):
    scene = mrml.scene
    ctNode = mrml.loadVolume(dataFile("ct/thorax_cta_heart_crop_1p5mm.nii.gz"), "Heart CT")
    shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    study = shNode.CreateStudyItem(shNode.CreateSubjectItem(shNode.GetSceneItemID(), "Patient"), "Study")
    shNode.CreateItem(study, ctNode)
    progress = []

    result = logic.translate(ctNode, device="cpu", processFactory=fakeEngineFactory("ok"),
                             progressCallback=lambda fraction, message: progress.append((fraction, message)))

    assert [node.GetName() for node in result.volumeNodes] == [
        "Heart CT synthetic MR", "Heart CT round-trip CT", "Heart CT error map"]
    assert volumeNodeCount(scene) == 4
    for node in result.volumeNodes:
        assert node.GetScene() is scene and node.IsA("vtkMRMLScalarVolumeNode")
        assert node.GetStorageNode() is None  # the scene must not point to a deleted temporary file
        assert shNode.GetItemParent(shNode.GetItemByDataNode(node)) == study
    assertOnInputGrid(result, ctNode)

    ct = slicer.util.arrayFromVolume(ctNode).astype(np.float32)  # (z, y, x), HU
    syntheticMR = slicer.util.arrayFromVolume(result.syntheticMR)
    roundTrip = slicer.util.arrayFromVolume(result.roundTripCT)
    error = slicer.util.arrayFromVolume(result.errorMap)
    assert np.isfinite(syntheticMR).all() and syntheticMR.min() >= -1.0 and syntheticMR.max() <= 1.0
    np.testing.assert_allclose(error, np.abs(roundTrip - ct), atol=1e-3)  # the fake engine's arithmetic, voxel by voxel
    assert error.min() >= 0.0 and error.max() > 0.0  # values above 1000 HU are clipped by the round trip

    fractions = [fraction for fraction, _ in progress]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and len(set(fractions)) >= 5
    assert any("G(x)" in message for _, message in progress)
    assert [event["event"] for event in result.log][0] == "start" and result.log[-1]["event"] == "done"
    assert any(event["event"] == "log" for event in result.log)  # plain stdout lines are kept
    assert result.outputDir is None and result.seconds > 0
    assert os.listdir(logic.temporaryDirectory) == []

    # display: round-trip CT with the input's window/level, error map with a heat colour table
    inputDisplay = ctNode.GetDisplayNode()
    roundTripDisplay = result.roundTripCT.GetDisplayNode()
    assert roundTripDisplay.GetWindow() == inputDisplay.GetWindow()
    assert roundTripDisplay.GetLevel() == inputDisplay.GetLevel()
    errorColor = scene.GetNodeByID(result.errorMap.GetDisplayNode().GetColorNodeID())
    assert errorColor.GetName() in nodes.HEAT_COLOR_NODE_NAMES
    assert result.errorMap.GetDisplayNode().GetWindow() >= 1.0
    assert result.syntheticMR.GetDisplayNode().GetWindow() <= 2.0 + 1e-6  # spans part of [-1, 1]

    # compare layout
    assert result.layoutId == views.COMPARE_LAYOUT_ID
    assert views.getOrCreateLayoutNode(scene).GetViewArrangement() == views.COMPARE_LAYOUT_ID
    for column, node in zip(views.COMPARE_COLUMNS, (ctNode, *result.volumeNodes), strict=True):
        sliceNode = scene.GetSingletonNode(views.compareViewName(column, "Coronal"), "vtkMRMLSliceNode")
        assert slicer.vtkMRMLSliceLogic.GetSliceCompositeNode(sliceNode).GetBackgroundVolumeID() == node.GetID()


def test_engine_arguments_and_kept_output_directory(mrml, logic, fakeEngineFactory, tmp_path):
    inputNode = addSyntheticVolume(mrml.scene, "Oblique CT")
    transform = mrml.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "Table shift")
    inputNode.SetAndObserveTransformNodeID(transform.GetID())
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"weights")
    outputDirectory = tmp_path / "results"

    result = logic.translate(inputNode, modelPath=str(model), device="cuda:1", overlap=0.25,
                             processFactory=fakeEngineFactory("ok"), outputDirectory=str(outputDirectory),
                             setupLayout=False, extraArguments=["--precision", "fp32"])

    argv = result.log[0]["argv"]
    assert argv[0] == "translate" and os.path.basename(argv[1]) == "input.nrrd"
    assert os.path.commonpath([argv[1], logic.temporaryDirectory]) == logic.temporaryDirectory
    assert argv[argv.index("-o") + 1] == str(outputDirectory)
    assert argv[argv.index("--progress") + 1] == "json"
    assert argv[argv.index("--device") + 1] == "cuda:1"
    assert argv[argv.index("--model") + 1] == str(model)
    assert argv[argv.index("--overlap") + 1] == "0.25"
    assert "--overwrite" in argv  # a folder the caller chose may hold an earlier run's outputs
    assert argv[-2:] == ["--precision", "fp32"]
    assert result.outputDir == str(outputDirectory)
    assert sorted(os.listdir(outputDirectory)) == ["error_map.nii.gz", "roundtrip_ct.nii.gz", "synthetic_mr.nii.gz"]
    assert os.listdir(logic.temporaryDirectory) == []
    assert result.layoutId is None
    assertOnInputGrid(result, inputNode)  # oblique, anisotropic grid kept exactly
    assert all(node.GetTransformNodeID() == transform.GetID() for node in result.volumeNodes)


def test_default_engine_options_are_the_schemas(mrml, logic, fakeEngineFactory):
    result = logic.translate(addSyntheticVolume(mrml.scene), processFactory=fakeEngineFactory("ok"), setupLayout=False)
    argv = result.log[0]["argv"]
    assert argv[argv.index("--device") + 1] == optionSpec("device").default == "auto"
    assert argv[argv.index("--overlap") + 1] == f"{optionSpec('overlap').default:g}"
    # options whose default is null are left to the engine; flags that are off are not passed
    assert not {"--model", "--roi-size", "--sw-batch-size", "--warp-check", "--analysis", "--reference-mr",
                "--overwrite"} & set(argv)


@pytest.mark.parametrize(
    ("mode", "message"),
    [
        ("fail", "fake failure: the model does not fit this input"),
        ("crash", "MemoryError: fake CUDA out of memory"),
        ("shifted", "IJK-to-RAS"),
        ("resized", "voxels but the input has"),
        ("nodone", "no 'done' event"),
    ],
)
def test_failure_adds_no_node_and_leaves_no_file(mrml, logic, fakeEngineFactory, mode, message):
    inputNode = addSyntheticVolume(mrml.scene)
    before = volumeNodeCount(mrml.scene), mrml.scene.GetNumberOfNodes()
    with pytest.raises(RuntimeError, match="CT to MR translation failed|IJK-to-RAS|voxels") as error:
        logic.translate(inputNode, processFactory=fakeEngineFactory(mode))
    assert message in str(error.value)
    assert (volumeNodeCount(mrml.scene), mrml.scene.GetNumberOfNodes()) == before
    assert os.listdir(logic.temporaryDirectory) == []


def test_missing_engine_explains_how_to_install(mrml, logic):
    inputNode = addSyntheticVolume(mrml.scene)

    def factory(args):
        return TranslationProcess([sys.executable, "-m", "ct2mr_not_installed_anywhere", *args])

    with pytest.raises(RuntimeError, match="No module named(.|\n)*The ct2mr engine is not installed"):
        logic.translate(inputNode, processFactory=factory)
    assert os.listdir(logic.temporaryDirectory) == []


def test_cancel_stops_the_engine_and_cleans_up(mrml, logic, fakeEngineFactory):
    inputNode = addSyntheticVolume(mrml.scene)
    before = mrml.scene.GetNumberOfNodes()
    job = logic.startTranslation(inputNode, processFactory=fakeEngineFactory("sleep"))
    assert job.isRunning and os.path.isfile(os.path.join(job.workDir, "input.nrrd"))
    deadline = time.monotonic() + 20
    while job.fraction < 0.1 and time.monotonic() < deadline:
        assert not job.update()
        time.sleep(0.05)
    childPid = job.log[-1]["child_pid"]

    logic.cancel(job)

    assert job.state == "cancelled" and not job.isRunning
    assert processIsGone(job.process.pid)
    deadline = time.monotonic() + 5
    while not processIsGone(childPid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert processIsGone(childPid)
    assert not os.path.exists(job.workDir) and os.listdir(logic.temporaryDirectory) == []
    assert mrml.scene.GetNumberOfNodes() == before
    with pytest.raises(RuntimeError, match="cancelled"):
        logic.finishTranslation(job)
    logic.cancel(job)  # a second cancel does nothing


def test_timeout_cancels(mrml, logic, fakeEngineFactory):
    with pytest.raises(RuntimeError, match="did not finish within 0.5 s"):
        logic.translate(addSyntheticVolume(mrml.scene), processFactory=fakeEngineFactory("sleep"), timeout=0.5)
    assert os.listdir(logic.temporaryDirectory) == []


@pytest.mark.parametrize(
    ("case", "error", "message"),
    [
        ("none", ValueError, "No input volume"),
        ("labelmap", ValueError, "not a label map"),
        ("empty", ValueError, "no image data"),
        ("outside scene", ValueError, "not in a scene"),
        ("device", ValueError, "device must be one of auto, cuda, cpu or cuda:N"),
        ("overlap", ValueError, r"overlap must be in \[0, 0.95\]"),
        ("model", FileNotFoundError, "leave the path empty to use the default model"),
    ],
)
def test_invalid_arguments(mrml, logic, fakeEngineFactory, tmp_path, case, error, message):
    scene = mrml.scene
    inputNode = addSyntheticVolume(scene)
    kwargs = {}
    if case == "none":
        inputNode = None
    elif case == "labelmap":
        inputNode = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
        slicer.util.updateVolumeFromArray(inputNode, np.zeros((2, 3, 4), np.uint8))
    elif case == "empty":
        inputNode = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    elif case == "outside scene":
        inputNode = slicer.vtkMRMLScalarVolumeNode()
        slicer.util.updateVolumeFromArray(inputNode, np.zeros((2, 3, 4), np.int16))
    elif case == "device":
        kwargs["device"] = "gpu"
    elif case == "overlap":
        kwargs["overlap"] = 1.0
    elif case == "model":
        kwargs["modelPath"] = str(tmp_path / "absent.safetensors")
    with pytest.raises(error, match=message):
        logic.translate(inputNode, processFactory=fakeEngineFactory("ok"), **kwargs)
    assert not os.path.exists(logic.temporaryDirectory) or os.listdir(logic.temporaryDirectory) == []
    assert optionSpec("device").choices == ("auto", "cuda", "cpu")


@pytest.mark.engine
@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("ct2mr") is None, reason="the ct2mr engine package is not installed")
def test_translate_with_the_real_engine(mrml, logic):
    ctNode = mrml.loadVolume(dataFile("ct/thorax_cta_heart_crop_1p5mm.nii.gz"), "Heart CT")
    result = logic.translate(ctNode, device="cpu")  # python -m ct2mr, the default model
    assertOnInputGrid(result, ctNode)
    syntheticMR = slicer.util.arrayFromVolume(result.syntheticMR)
    error = slicer.util.arrayFromVolume(result.errorMap)
    assert np.isfinite(syntheticMR).all() and syntheticMR.min() >= -1.0 - 1e-5 and syntheticMR.max() <= 1.0 + 1e-5
    assert np.isfinite(error).all() and error.min() >= 0.0
    assert result.log[-1]["event"] == "done"
    assert os.listdir(logic.temporaryDirectory) == []
