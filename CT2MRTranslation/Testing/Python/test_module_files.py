"""Checks of the module's files that need no Slicer application: .ui vs Widget code, the .ui / parameter node / CLI
agreement on the engine's options schema, CMake lists, icon, layering (no Qt, no torch in the library)."""

from __future__ import annotations

import ast
import re
import struct
import xml.etree.ElementTree as ET

import pytest
from CT2MRTranslationTestHelpers import MODULE_DIR

from CT2MRTranslationLib.options import TranslationOptions, loadSchema, optionSpec
from CT2MRTranslationLib.parameters import CT2MRTranslationParameters

MODULE_SCRIPT = MODULE_DIR / "CT2MRTranslation.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "CT2MRTranslation.ui"
ICON_FILE = MODULE_DIR / "Resources" / "Icons" / "CT2MRTranslation.png"
LIB_DIR = MODULE_DIR / "CT2MRTranslationLib"


@pytest.fixture(scope="module")
def uiTree() -> ET.Element:
    return ET.parse(UI_FILE).getroot()


@pytest.fixture(scope="module")
def uiWidgets(uiTree) -> dict[str, ET.Element]:
    return {widget.get("name"): widget for widget in uiTree.iter("widget")}


def widgetNamesUsedByTheWidget() -> set[str]:
    return set(re.findall(r"\bself\.ui\.([A-Za-z_]\w*)", MODULE_SCRIPT.read_text()))


def test_every_ui_attribute_of_the_widget_exists_in_the_ui_file(uiWidgets):
    used = widgetNamesUsedByTheWidget()
    assert {"inputSelector", "referenceMRSelector", "modelComboBox", "modelPathLineEdit", "deviceComboBox",
            "overlapSpinBox", "roiSizeSpinBox", "swBatchSizeSpinBox", "precisionComboBox", "harmonizeComboBox",
            "batchInputsSelector", "batchModeCheckBox", "warpCheckCheckBox", "downloadModelButton", "importModelButton",
            "installDependenciesButton", "applyButton", "progressBar", "statusLabel", "logTextEdit"} <= used
    missing = sorted(used - set(uiWidgets))
    assert not missing, f"used as self.ui.<name> in CT2MRTranslation.py but not in the .ui: {missing}"
    # widgets of the .ui the Widget never touches (labels, layouts' helpers and sections excepted) are dead weight
    unused = sorted(name for name, widget in uiWidgets.items() if name not in used and widget.get("class") not in (
        "QLabel", "ctkCollapsibleButton", "qMRMLWidget") or name == "cancelButton")
    assert not unused, f"in the .ui but never used by the Widget: {unused}"


def test_every_parameter_is_written_from_and_shown_in_the_gui():
    text = MODULE_SCRIPT.read_text()
    writes = set(re.findall(r"\bp\.(\w+) = ", text)) | set(re.findall(r"p\.(\w+), p\.(\w+) = ", text)[0])
    names = {p.name for p in CT2MRTranslationParameters.parameters()} | {"inputVolume", "referenceMR", "segmentation",
                                                                        "batchInputs"}
    assert names <= writes, f"never written from the GUI: {sorted(names - writes)}"
    for name in names:
        shown = text.split("def updateGUIFromParameterNode")[1].split("def updateParameterNodeFromGUI")[0]
        assert f"p.{name}" in shown, f"{name} is never shown in the GUI"


def test_ui_parameter_node_and_cli_agree_on_the_engines_options(uiWidgets):
    """One definition (ct2mr/translate_options.json): the .ui offers only what the parameter node accepts, which is
    what the schema allows, and the engine's own argument parser reads the flags back as the same values."""
    def items(name):
        return tuple(s.text for s in uiWidgets[name].findall("./item/property[@name='text']/string"))

    def number(name, propertyName):
        return float(uiWidgets[name].find(f"./property[@name='{propertyName}']/*").text)

    P = CT2MRTranslationParameters
    assert items("precisionComboBox") == optionSpec("precision").choices == tuple(P.precision.choices)
    assert items("harmonizeComboBox") == optionSpec("harmonize").choices == tuple(P.harmonize.choices)
    assert items("deviceComboBox") == optionSpec("device").choices
    overlap = optionSpec("overlap")
    assert (number("overlapSpinBox", "minimum"), number("overlapSpinBox", "maximum")) == (overlap.minimum,
                                                                                          overlap.maximum)
    assert number("overlapSpinBox", "singleStep") == overlap.step
    roi, batch = optionSpec("roi_size"), optionSpec("sw_batch_size")
    # 0 is the spin boxes' special value ("model default", "auto"): the engine decides
    assert (number("roiSizeSpinBox", "minimum"), number("roiSizeSpinBox", "maximum")) == (0, roi.maximum)
    assert number("roiSizeSpinBox", "singleStep") == roi.multipleOf and roi.minimum == roi.multipleOf
    assert (number("swBatchSizeSpinBox", "minimum"), number("swBatchSizeSpinBox", "maximum")) == (0, batch.maximum)
    for widgetName, parameter in (("overlapSpinBox", P.overlap), ("roiSizeSpinBox", P.roiSize),
                                  ("swBatchSizeSpinBox", P.swBatchSize)):
        assert (number(widgetName, "minimum"), number(widgetName, "maximum")) == (parameter.minimum, parameter.maximum)
        assert number(widgetName, "value") == parameter.default
    # every value a spin box steps to is one the parameter node and the schema accept
    for value in range(0, int(roi.maximum) + 1, int(roi.multipleOf)):
        P.roiSize.validate(value)
    warpCheck = uiWidgets["warpCheckCheckBox"]
    checked = warpCheck.find("./property[@name='checked']/bool").text == "true"
    assert checked is P.warpCheck.default is optionSpec("warp_check").default

    from ct2mr.cli import build_parser  # argparse only: the engine's command line

    options = TranslationOptions(device="cuda:1", overlap=0.5, roiSize=64, swBatchSize=2, precision="bf16",
                                 harmonize="zscore", warpCheck=True, analysis=True)
    parsed = build_parser().parse_args(["translate", "in.nrrd", "-o", "out", *options.engineArguments()])
    assert (parsed.device, parsed.overlap, parsed.roi_size, parsed.sw_batch_size, parsed.precision, parsed.harmonize,
            parsed.warp_check, parsed.analysis) == ("cuda:1", 0.5, [64], 2, "bf16", "zscore", True, True)
    defaults = build_parser().parse_args(["translate", "in.nrrd", "-o", "out", *TranslationOptions().engineArguments()])
    for spec in loadSchema().values():
        assert getattr(defaults, spec.name) == spec.default, spec.name


def test_advanced_section_layout(uiWidgets):
    batchTypes = [s.text for s in uiWidgets["batchInputsSelector"].findall(
        "./property[@name='nodeTypes']/stringlist/string")]
    assert batchTypes == ["vtkMRMLScalarVolumeNode", "vtkMRMLSequenceNode"]
    assert uiWidgets["advancedCollapsibleButton"].find("./property[@name='collapsed']/bool").text == "true"
    # the warp check sits in Advanced and its tooltip says what it costs
    advanced = {w.get("name") for w in uiWidgets["advancedCollapsibleButton"].iter("widget")}
    assert {"warpCheckCheckBox", "restoreViewsButton"} <= advanced
    tooltip = uiWidgets["warpCheckCheckBox"].find("./property[@name='toolTip']/string").text
    assert "displacement" in tooltip and "mm" in tooltip and "time" in tooltip
    dependencies = {w.get("name") for w in uiWidgets["dependenciesCollapsibleButton"].iter("widget")}
    assert "wheelFolderPathLineEdit" in dependencies


def test_ui_widget_classes_and_properties(uiTree, uiWidgets):
    assert uiTree.get("version") == "4.0"
    top = uiTree.find("widget")
    assert (top.get("class"), top.get("name")) == ("qMRMLWidget", "CT2MRTranslation")
    expectedClasses = {
        "inputSelector": "qMRMLNodeComboBox",
        "referenceMRSelector": "qMRMLNodeComboBox",
        "batchInputsSelector": "qMRMLCheckableNodeComboBox",
        "modelComboBox": "QComboBox",
        "modelPathLineEdit": "ctkPathLineEdit",
        "deviceComboBox": "QComboBox",
        "overlapSpinBox": "QDoubleSpinBox",
        "roiSizeSpinBox": "QSpinBox",
        "swBatchSizeSpinBox": "QSpinBox",
        "precisionComboBox": "QComboBox",
        "harmonizeComboBox": "QComboBox",
        "warpCheckCheckBox": "QCheckBox",
        "advancedCollapsibleButton": "ctkCollapsibleButton",
        "applyButton": "QPushButton",
        "progressBar": "QProgressBar",
        "statusLabel": "QLabel",
        "logTextEdit": "QPlainTextEdit",
    }
    assert {name: uiWidgets[name].get("class") for name in expectedClasses} == expectedClasses
    nodeTypes = [s.text for s in uiWidgets["inputSelector"].findall("./property[@name='nodeTypes']/stringlist/string")]
    assert nodeTypes == ["vtkMRMLScalarVolumeNode"]
    assert uiWidgets["applyButton"].find("./property[@name='text']/string").text == "Translate"


def test_ui_custom_widgets_are_declared_and_scene_is_connected(uiTree, uiWidgets):
    declared = {c.findtext("class") for c in uiTree.iter("customwidget")}
    used = {w.get("class") for w in uiWidgets.values()}
    assert {c for c in used if not c.startswith("Q")} <= declared
    connections = {(c.findtext("sender"), c.findtext("signal"), c.findtext("receiver"), c.findtext("slot"))
                   for c in uiTree.iter("connection")}
    for selector in ("inputSelector", "referenceMRSelector", "batchInputsSelector", "segmentationSelector"):
        assert ("CT2MRTranslation", "mrmlSceneChanged(vtkMRMLScene*)", selector,
                "setMRMLScene(vtkMRMLScene*)") in connections, selector
    names = [w.get("name") for w in uiTree.iter("widget")]
    assert len(names) == len(set(names)), "object names in the .ui must be unique"


def test_module_script_structure():
    tree = ast.parse(MODULE_SCRIPT.read_text())
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
    assert {"CT2MRTranslation", "CT2MRTranslationWidget", "CT2MRTranslationTest"} <= set(classes)
    assert [b.id for b in classes["CT2MRTranslationTest"].bases] == ["ScriptedLoadableModuleTest"]
    imports = {(node.module, alias.name) for node in tree.body if isinstance(node, ast.ImportFrom)
               for alias in node.names}
    assert ("CT2MRTranslationLib.logic", "CT2MRTranslationLogic") in imports
    text = MODULE_SCRIPT.read_text()
    for phrase in ("CT to MR Translation", "F(G(x))", "|F(G(x)) - x|", "Arifette",
                   "CT to MRI Translation using CycleGAN for Medical Imaging Applications", "Image Synthesis",
                   "tryWithErrorDisplay", "QTimer", "QProcess", "UI/CT2MRTranslation.ui", "slicerVersionProblem",
                   "startupCompleted()", "registerCompareLayouts", "restorePreviousViews", "editingFinished()",
                   "keyboardTracking", "startBatch", "startModelDownload", "startDeviceQuery",
                   "updateGUIFromParameterNode", "updateParameterNodeFromGUI", "analysis=True", "install.InstallRun"):
        assert phrase in text, phrase
    # installs never run in the GUI thread, torch is never loaded into Slicer's process
    for phrase in ("pip_install(", "installTorch(", "import torch", "processEvents"):
        assert phrase not in text.split("class CT2MRTranslationTest")[0], phrase
    contributors = re.search(r"parent\.contributors = \[(.*?)\]", text).group(1)
    assert re.fullmatch(r'"[A-Z][\w. -]+ \([^)]+\)"', contributors.strip())  # "Name (Affiliation)"


def cmakeList(variable: str) -> list[str]:
    text = (MODULE_DIR / "CMakeLists.txt").read_text()
    match = re.search(rf"set\({variable}\s+(.*?)\)", text, re.S)
    assert match, variable
    return [item.replace("${MODULE_NAME}", "CT2MRTranslation") for item in match.group(1).split()]


def test_cmake_lists_every_script_and_resource():
    scripts = cmakeList("MODULE_PYTHON_SCRIPTS")
    resources = cmakeList("MODULE_PYTHON_RESOURCES")
    onDisk = {"CT2MRTranslation.py"} | {f"CT2MRTranslationLib/{p.name}" for p in LIB_DIR.glob("*.py")}
    assert set(scripts) == onDisk
    assert set(resources) == {"Resources/Icons/CT2MRTranslation.png", "Resources/UI/CT2MRTranslation.ui"}
    for path in scripts + resources:
        assert (MODULE_DIR / path).is_file(), path
    text = (MODULE_DIR / "CMakeLists.txt").read_text()
    assert "WITH_GENERIC_TESTS" in text and "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text


def test_icon_is_a_128_pixel_png():
    data = ICON_FILE.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    assert struct.unpack(">II", data[16:24]) == (128, 128)


NO_SCIENCE = {"torch", "monai", "scipy", "h5py", "safetensors"}
"""Never imported by the library: the engine process does the science (DESIGN.md)."""

ENGINE_MODULES_ALLOWED = {"ct2mr.models.registry", "ct2mr.io.nnunet"}
"""The engine's torch-free modules the library may use in Slicer's process: the model list and the dataset layout."""


@pytest.mark.parametrize("path", sorted(LIB_DIR.glob("*.py")), ids=lambda p: p.name)
def test_library_is_qt_free_torch_free_and_documented(path):
    """DESIGN.md: CT2MRTranslationLib never imports qt or ctk, never uses slicer.app, never imports torch or engine
    science (only the engine's torch-free registry and dataset layout)."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = {a.name for a in node.names}
            assert not {n.split(".")[0] for n in names} & ({"qt", "ctk", "PythonQt"} | NO_SCIENCE), path.name
            assert not [n for n in names if n.startswith("ct2mr") and n not in ENGINE_MODULES_ALLOWED]
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            assert module.split(".")[0] not in {"qt", "ctk", "PythonQt"} | NO_SCIENCE, path.name
            if module.split(".")[0] == "ct2mr":  # the module itself, or modules imported from its package
                assert module in ENGINE_MODULES_ALLOWED or {f"{module}.{a.name}" for a in node.names} \
                    <= ENGINE_MODULES_ALLOWED, path.name
        if isinstance(node, ast.Attribute) and node.attr == "app":
            assert not (isinstance(node.value, ast.Name) and node.value.id == "slicer"), f"slicer.app in {path.name}"
    assert ast.get_docstring(tree), f"{path.name} has no module docstring"
    assert "from __future__ import annotations" in path.read_text()
    exported = next((ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign)
                     and any(isinstance(t, ast.Name) and t.id == "__all__" for t in n.targets)), None)
    assert exported is not None, f"{path.name} has no __all__"
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
            assert node.name in exported, f"{node.name} missing from __all__ of {path.name}"
            assert ast.get_docstring(node), f"{node.name} in {path.name} has no docstring"
