"""Checks of the module's files that need no Slicer application: .ui vs Widget code, CMake lists, icon, layering."""

from __future__ import annotations

import ast
import re
import struct
import xml.etree.ElementTree as ET

import pytest
from CT2MRTranslationTestHelpers import MODULE_DIR

from CT2MRTranslationLib.logic import DEVICES

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
    assert {"inputSelector", "modelPathLineEdit", "deviceComboBox", "applyButton", "cancelButton", "progressBar",
            "statusLabel"} <= used
    missing = sorted(used - set(uiWidgets))
    assert not missing, f"used as self.ui.<name> in CT2MRTranslation.py but not in the .ui: {missing}"


def test_ui_widget_classes_and_properties(uiTree, uiWidgets):
    assert uiTree.get("version") == "4.0"
    top = uiTree.find("widget")
    assert (top.get("class"), top.get("name")) == ("qMRMLWidget", "CT2MRTranslation")
    expectedClasses = {
        "inputSelector": "qMRMLNodeComboBox",
        "modelPathLineEdit": "ctkPathLineEdit",
        "deviceComboBox": "QComboBox",
        "overlapSpinBox": "QDoubleSpinBox",
        "applyButton": "QPushButton",
        "cancelButton": "QPushButton",
        "progressBar": "QProgressBar",
        "statusLabel": "QLabel",
    }
    assert {name: uiWidgets[name].get("class") for name in expectedClasses} == expectedClasses
    nodeTypes = [s.text for s in uiWidgets["inputSelector"].findall("./property[@name='nodeTypes']/stringlist/string")]
    assert nodeTypes == ["vtkMRMLScalarVolumeNode"]
    devices = [s.text for s in uiWidgets["deviceComboBox"].findall("./item/property[@name='text']/string")]
    assert tuple(devices) == DEVICES
    assert uiWidgets["applyButton"].find("./property[@name='text']/string").text == "Translate"


def test_ui_custom_widgets_are_declared_and_scene_is_connected(uiTree, uiWidgets):
    declared = {c.findtext("class") for c in uiTree.iter("customwidget")}
    used = {w.get("class") for w in uiWidgets.values()}
    assert {c for c in used if not c.startswith("Q")} <= declared
    connections = {(c.findtext("sender"), c.findtext("signal"), c.findtext("receiver"), c.findtext("slot"))
                   for c in uiTree.iter("connection")}
    assert ("CT2MRTranslation", "mrmlSceneChanged(vtkMRMLScene*)", "inputSelector",
            "setMRMLScene(vtkMRMLScene*)") in connections
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
                   "CT to MRI Translation using CycleGAN for Medical Imaging Applications", "CT2MRTranslation team",
                   "tryWithErrorDisplay", "QTimer", "UI/CT2MRTranslation.ui"):
        assert phrase in text, phrase


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


@pytest.mark.parametrize("path", sorted(LIB_DIR.glob("*.py")), ids=lambda p: p.name)
def test_library_is_qt_free_and_documented(path):
    """DESIGN.md: CT2MRTranslationLib never imports qt or ctk and never uses slicer.app."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            assert not {a.name.split(".")[0] for a in node.names} & {"qt", "ctk", "PythonQt"}, path.name
        if isinstance(node, ast.ImportFrom):
            assert (node.module or "").split(".")[0] not in {"qt", "ctk", "PythonQt"}, path.name
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
