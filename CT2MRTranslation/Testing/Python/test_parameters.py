"""Parameter node: defaults, validation, node references, and a save/restore round trip through a .mrml file."""

from __future__ import annotations

import logging

import pytest
import slicer
from CT2MRTranslationTestHelpers import addSyntheticVolume

from CT2MRTranslationLib.logic import CT2MRTranslationLogic
from CT2MRTranslationLib.options import TranslationOptions
from CT2MRTranslationLib.parameters import MODULE_NAME, CT2MRTranslationParameters, getParameterNode


def test_parameter_node_is_the_module_singleton_with_defaults(mrml):
    node = getParameterNode(mrml.scene)
    assert node.IsA("vtkMRMLScriptedModuleNode") and node.GetScene() is mrml.scene
    assert node.GetSingletonTag() == MODULE_NAME and node.GetAttribute("ModuleName") == MODULE_NAME
    assert getParameterNode(mrml.scene) is node  # one per scene
    parameters = CT2MRTranslationLogic.getParameters(mrml.scene)
    assert parameters.node is node
    assert parameters.toDict() == {
        "batchMode": False, "modelName": "", "modelVersion": "", "modelPath": "", "device": "auto", "overlap": 0.25,
        "roiSize": 0, "swBatchSize": 0, "precision": "auto", "harmonize": "none", "computeMetrics": True,
        "warpCheck": False, "uncertainty": "none", "uncertaintyPasses": 4, "oodCheck": True,
        "showCompareLayout": True, "exportPair": False, "exportFolder": "",
        "inputVolume": None, "batchInputs": [], "referenceMR": None, "segmentation": None,
        "qualitySyntheticMR": None, "qualityReferenceMR": None,
    }
    # stored as strings in the node, so that the scene file keeps them
    assert node.GetParameter("Overlap") == "0.25" and node.GetParameter("ComputeMetrics") == "true"


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("overlap", 0.99, "overlap must be in \\[0, 0.95\\]"),
        ("overlap", -0.1, "overlap must be in \\[0, 0.95\\]"),
        ("overlap", "half", "overlap must be a number"),
        ("device", "gpu", "device must be one of auto, cuda, cpu or cuda:N"),
        ("precision", "fp8", "precision must be one of auto, fp32, bf16, fp16"),
        ("harmonize", "magic", "harmonize must be one of none, histogram, nyul, zscore"),
        ("swBatchSize", -1, "swBatchSize must be in \\[1, 64\\]; got -1. \\(0: the engine decides\\)"),
        ("roiSize", 1024, "roiSize must be in \\[16, 512\\]"),
        ("roiSize", 50, "roiSize must be a multiple of 16"),
        ("computeMetrics", "maybe", "computeMetrics must be true or false"),
        ("warpCheck", "sometimes", "warpCheck must be true or false"),
    ],
)
def test_invalid_values_are_refused(mrml, name, value, message):
    parameters = CT2MRTranslationParameters.get(mrml.scene)
    with pytest.raises(ValueError, match=message):
        setattr(parameters, name, value)


def test_values_and_references_survive_saving_and_reloading_the_scene(mrml, tmp_path):
    scene = mrml.scene
    ct = addSyntheticVolume(scene, "CT 1")
    ct2 = addSyntheticVolume(scene, "CT 2")
    mr = addSyntheticVolume(scene, "Reference MR")
    parameters = CT2MRTranslationParameters.get(scene)
    parameters.inputVolume = ct
    parameters.batchInputs = [ct2, ct]
    parameters.referenceMR = mr
    parameters.batchMode = True
    parameters.modelName, parameters.modelVersion = "ct2mr-m1", "1.0"
    parameters.device = "cuda:1"
    parameters.overlap = 0.5
    parameters.roiSize = 64
    parameters.swBatchSize = 4
    parameters.precision = "bf16"
    parameters.harmonize = "histogram"
    parameters.computeMetrics = False
    parameters.warpCheck = True
    parameters.exportFolder = str(tmp_path / "Dataset501")
    expected = parameters.toDict()
    assert expected["batchInputs"] == [ct2.GetID(), ct.GetID()] and expected["device"] == "cuda:1"
    assert parameters.node.GetParameter("WarpCheck") == "true" and expected["warpCheck"] is True

    scene.SetURL(str(tmp_path / "scene.mrml"))
    assert scene.Commit()
    restored = slicer.vtkMRMLScene()
    restored.SetURL(str(tmp_path / "scene.mrml"))
    assert restored.Import()
    node = restored.GetSingletonNode(MODULE_NAME, "vtkMRMLScriptedModuleNode")
    assert node is not None and node.GetAttribute("ModuleName") == MODULE_NAME
    again = CT2MRTranslationParameters(node)
    assert again.toDict() == expected
    assert again.inputVolume.GetName() == "CT 1" and [n.GetName() for n in again.batchInputs] == ["CT 2", "CT 1"]
    assert getParameterNode(restored) is node  # the restored node is reused, not duplicated
    restored.Clear(True)


def test_translate_keywords_follow_the_parameters(mrml):
    parameters = CT2MRTranslationParameters.get(mrml.scene)
    mr = addSyntheticVolume(mrml.scene, "MR")
    parameters.referenceMR = mr
    parameters.roiSize = 0
    parameters.harmonize = "zscore"
    assert parameters.translateKeywords() == {
        "options": TranslationOptions(modelPath=None, device="auto", overlap=0.25, roiSize=None, swBatchSize=None,
                                      precision="auto", harmonize="zscore", warpCheck=False, analysis=True,
                                      uncertainty="none", uncertaintyPasses=4, ood=True),
        "referenceMRNode": mr, "setupLayout": True}
    parameters.roiSize, parameters.swBatchSize = 64, 2
    parameters.modelPath = "/models/m1.safetensors"
    options = parameters.translationOptions()
    assert (options.roiSize, options.swBatchSize, options.modelPath) == (64, 2, "/models/m1.safetensors")
    assert parameters.translationOptions("/models/other.safetensors").modelPath == "/models/other.safetensors"
    parameters.inputVolume = mr
    parameters.inputVolume = None
    assert parameters.inputVolume is None


def test_a_damaged_value_falls_back_to_the_default(mrml, caplog):
    parameters = CT2MRTranslationParameters.get(mrml.scene)
    parameters.node.SetParameter("Overlap", "lots")
    parameters.node.SetParameter("Device", "tpu")
    with caplog.at_level(logging.WARNING):
        assert parameters.overlap == 0.25 and parameters.device == "auto"
    assert "using the default" in caplog.text
    parameters.node.SetParameter("Overlap", "")
    assert parameters.overlap == 0.25
    parameters.overlap = 0.3
    parameters.setDefaults(overwrite=True)
    assert parameters.overlap == 0.25


def test_wrapper_needs_a_scripted_module_node(mrml):
    with pytest.raises(ValueError, match="vtkMRMLScriptedModuleNode"):
        CT2MRTranslationParameters(mrml.scene.AddNewNodeByClass("vtkMRMLTableNode"))
