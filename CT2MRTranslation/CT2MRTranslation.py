"""CT to MR Translation: a 3D Slicer front end of the ct2mr CycleGAN engine.

Supported: 3D Slicer 5.10 or newer (Python 3.12); on an older Slicer the module says so in one sentence and installs
nothing (``CT2MRTranslationLib/install.py``). The Widget (all Qt of the module lives here, wiring only) starts
translations and installs as background processes through ``CT2MRTranslationLogic`` and polls them with a
``QTimer`` / ``QProcess`` so the GUI never freezes. The Logic (``CT2MRTranslationLib/logic.py``) is Qt-free and
usable without the GUI::

    logic = CT2MRTranslationLogic()
    result = logic.translate(slicer.util.getNode("CT"), device="cpu", analysis=True)
    result.syntheticMR, result.roundTripCT, result.errorMap

This file, ``CT2MRTranslationLib/__init__.py`` and everything it imports at start-up run on Python 3.9 (Slicer 5.6
and 5.8), so that an old Slicer can show the version message (``Testing/Python/test_compatibility.py``).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import sys

import ctk  # noqa: F401  (the .ui's ctk widgets need the ctk Python wrappers loaded)
import numpy as np
import qt
import slicer
import vtk
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from CT2MRTranslationLib import install, views
from CT2MRTranslationLib.logic import CT2MRTranslationLogic, CT2MRTranslationResult  # noqa: F401  (re-export)
from CT2MRTranslationLib.options import optionSpec
from CT2MRTranslationLib.parameters import CT2MRTranslationParameters

__all__ = ["CT2MRTranslation", "CT2MRTranslationLogic", "CT2MRTranslationTest", "CT2MRTranslationWidget"]


def slicerVersionProblem() -> str:
    """One sentence when this 3D Slicer is older than the supported range (:mod:`install`), else ``""``."""
    return install.slicerVersionProblem((slicer.app.majorVersion, slicer.app.minorVersion), sys.version_info[:2])


def registerCompareLayouts() -> None:
    """Register the compare layouts in the application's layout node (at start-up, before any scene is loaded)."""
    if slicerVersionProblem():
        logging.warning(slicerVersionProblem())
        return
    views.registerCompareLayouts(slicer.mrmlScene)


#
# CT2MRTranslation
#


class CT2MRTranslation(ScriptedLoadableModule):
    """Module description shown in Slicer (title, category, help and acknowledgement)."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("CT to MR Translation")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Image Synthesis")]
        self.parent.dependencies = []
        self.parent.contributors = ["Nassim Arifette (ENS Paris-Saclay / BioMaps)"]
        self.parent.helpText = _("""
Turns a chest CT (HU) into a synthetic MR with a 3D CycleGAN, on the CT's own voxel grid
(same size, spacing, origin and direction; nothing is warped). Three volumes are added next to the input:
<ul>
<li><b>synthetic MR</b> G(x): the generator G (CT to MR) applied to the CT x; normalised MR intensity in [-1, 1];</li>
<li><b>round-trip CT</b> F(G(x)): the synthetic MR translated back by the generator F (MR to CT), in HU;</li>
<li><b>error map</b> |F(G(x)) - x| in HU: where the round trip does not give the CT back, the translation
lost or invented anatomy.</li>
</ul>
The translation runs in a separate process (sliding window, on the GPU when available); Cancel stops it.
Leave the model path empty to use the default model. Results are shown side by side (axial, coronal, sagittal).
Needs 3D Slicer 5.10 or newer.
""")
        self.parent.acknowledgementText = _("""
Built on the method of N. Arifette, "CT to MRI Translation using CycleGAN for Medical Imaging Applications"
(internship thesis, ENS Paris-Saclay / BioMaps): 3D CycleGAN, thoracic preprocessing, round-trip error analysis.
""")
        # The compare layouts exist before any scene is loaded, so that a saved scene reopens in them.
        slicer.app.connect("startupCompleted()", registerCompareLayouts)


#
# CT2MRTranslationWidget
#


class CT2MRTranslationWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Module panel: inputs, model list, device, Advanced settings, batch, label transfer, dependencies; Translate
    (which turns into Cancel while running), progress bar, status and log.

    Wiring only: every choice is kept in the module's parameter node (saved and restored with the scene);
    translations, model downloads and the CUDA device listing run as background processes through the Logic, polled
    by a ``QTimer``; installs run command after command in a ``QProcess`` (the plan and its failure messages come
    from ``CT2MRTranslationLib.install``). The GUI never freezes and never loads torch.
    """

    POLL_INTERVAL_MS = 200

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic: CT2MRTranslationLogic | None = None
        self.batch = None
        self.downloadJob = None
        self.deviceQuery = None
        self.installRun: install.InstallRun | None = None
        self.installPlan: install.InstallPlan | None = None
        self.installProcess = None
        self.qualityJob = None
        self.versionProblem = ""
        self.devices: list[tuple[str, str]] = []
        self.timer: qt.QTimer | None = None
        self._parameterNode = None
        self._parameters: CT2MRTranslationParameters | None = None
        self._updatingGUIFromParameterNode = False
        self._dependenciesChecked = False
        self._loggedEvents = 0
        self._lastStage = None

    def setup(self) -> None:
        """Build the panel from ``Resources/UI/CT2MRTranslation.ui`` and connect it; on an unsupported Slicer, only
        say so."""
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/CT2MRTranslation.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.versionProblem = slicerVersionProblem()
        if self.versionProblem:
            logging.warning(self.versionProblem)
            for name in ("inputsCollapsibleButton", "advancedCollapsibleButton", "batchCollapsibleButton",
                         "qualityCollapsibleButton", "labelTransferCollapsibleButton", "dependenciesCollapsibleButton",
                         "applyButton"):
                getattr(self.ui, name).enabled = False
            self.ui.progressBar.visible = False
            self.ui.statusLabel.text = self.versionProblem
            return

        self.logic = CT2MRTranslationLogic()
        self.logic.temporaryDirectory = os.path.join(slicer.app.temporaryPath, "CT2MRTranslation")
        self.logic.registerLayouts(slicer.mrmlScene)
        self.applyEngineSchema()

        self.timer = qt.QTimer()
        self.timer.setInterval(self.POLL_INTERVAL_MS)
        self.timer.connect("timeout()", self.onPollTimer)

        # GUI -> parameter node
        for selector in (self.ui.inputSelector, self.ui.referenceMRSelector, self.ui.segmentationSelector,
                         self.ui.qualitySyntheticSelector, self.ui.qualityReferenceSelector):
            selector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateParameterNodeFromGUI)
        self.ui.batchInputsSelector.connect("checkedNodesChanged()", self.updateParameterNodeFromGUI)
        for comboBox in (self.ui.modelComboBox, self.ui.deviceComboBox, self.ui.precisionComboBox,
                         self.ui.harmonizeComboBox, self.ui.uncertaintyComboBox):
            comboBox.connect("currentIndexChanged(int)", self.updateParameterNodeFromGUI)
        self.ui.overlapSpinBox.connect("valueChanged(double)", self.updateParameterNodeFromGUI)
        for spinBox in (self.ui.roiSizeSpinBox, self.ui.swBatchSizeSpinBox, self.ui.uncertaintyPassesSpinBox):
            spinBox.connect("valueChanged(int)", self.updateParameterNodeFromGUI)
        for checkBox in (self.ui.computeMetricsCheckBox, self.ui.warpCheckCheckBox, self.ui.oodCheckBox,
                         self.ui.showLayoutCheckBox,
                         self.ui.batchModeCheckBox, self.ui.exportPairCheckBox):
            checkBox.connect("toggled(bool)", self.updateParameterNodeFromGUI)
        for pathLineEdit in (self.ui.modelPathLineEdit, self.ui.exportFolderPathLineEdit):
            # typed paths are written when editing is finished (no write-back while typing: the cursor stays);
            # a path picked with the browse button is written at once
            pathLineEdit.comboBox().lineEdit().connect("editingFinished()", self.updateParameterNodeFromGUI)
            pathLineEdit.connect("currentPathChanged(QString)", self.onPathPicked)

        # actions
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.restoreViewsButton.connect("clicked(bool)", self.onRestoreViewsButton)
        self.ui.qualityButton.connect("clicked(bool)", self.onQualityButton)
        self.ui.downloadModelButton.connect("clicked(bool)", self.onDownloadModelButton)
        self.ui.importModelButton.connect("clicked(bool)", self.onImportModelButton)
        self.ui.clearModelsButton.connect("clicked(bool)", self.onClearModelsButton)
        self.ui.checkDependenciesButton.connect("clicked(bool)", self.onCheckDependenciesButton)
        self.ui.installDependenciesButton.connect("clicked(bool)", self.onInstallDependenciesButton)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.refreshModelList()
        self.startDeviceQuery()
        self.initializeParameterNode()
        self.setRunning(False)
        self.ui.statusLabel.text = _("Select a CT volume and click Translate.")

    def applyEngineSchema(self) -> None:
        """Give the Advanced widgets the engine's vocabularies and ranges (``ct2mr/translate_options.json``): spin
        boxes offer only valid values, combo boxes only the engine's choices."""
        overlap = optionSpec("overlap")
        self.ui.overlapSpinBox.setRange(overlap.minimum, overlap.maximum)
        self.ui.overlapSpinBox.singleStep = overlap.step or 0.05
        roi, batch = optionSpec("roi_size"), optionSpec("sw_batch_size")
        self.ui.roiSizeSpinBox.setRange(0, int(roi.maximum))  # 0: the model's own window ("model default")
        self.ui.roiSizeSpinBox.singleStep = int(roi.multipleOf or 1)
        self.ui.swBatchSizeSpinBox.setRange(0, int(batch.maximum))  # 0: the engine sizes it ("auto")
        for spinBox in (self.ui.overlapSpinBox, self.ui.roiSizeSpinBox, self.ui.swBatchSizeSpinBox):
            spinBox.keyboardTracking = False  # valueChanged when editing is finished, not at every key
        passes = optionSpec("uncertainty_passes")
        self.ui.uncertaintyPassesSpinBox.setRange(int(passes.minimum), int(passes.maximum))
        self.ui.uncertaintyPassesSpinBox.keyboardTracking = False
        for comboBox, name in ((self.ui.precisionComboBox, "precision"), (self.ui.harmonizeComboBox, "harmonize"),
                               (self.ui.uncertaintyComboBox, "uncertainty")):
            wasBlocked = comboBox.blockSignals(True)
            comboBox.clear()
            for choice in optionSpec(name).choices:
                if name == "uncertainty" and choice == "ensemble":  # needs several models: the command line's
                    continue
                comboBox.addItem(choice)
            comboBox.blockSignals(wasBlocked)

    def cleanup(self) -> None:
        """Stop a running translation, download or install (and its process) when the module is destroyed."""
        if self.versionProblem:
            return
        self.cancelJob()
        if self.deviceQuery is not None and self.deviceQuery.poll() is None:
            self.deviceQuery.cancel()
        if self.installProcess is not None:
            self.installProcess.kill()
        if self.timer is not None:
            self.timer.stop()
        self.removeObservers()

    def enter(self) -> None:
        """The module is shown: make sure a parameter node exists and the GUI shows it."""
        if not self.versionProblem:
            self.initializeParameterNode()

    def exit(self) -> None:
        """The module is hidden: stop following the parameter node (a running translation goes on)."""
        if self._parameterNode is not None:
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)

    def onReload(self) -> None:
        """Reload the module together with its library (CT2MRTranslationLib), without ``imp``."""
        self.cancelJob()
        for name in [name for name in sys.modules if name.split(".")[0] == "CT2MRTranslationLib"]:
            del sys.modules[name]
        ScriptedLoadableModuleWidget.onReload(self)

    def onSceneStartClose(self, caller, event) -> None:
        """The input node is about to disappear: stop the translation and forget the parameter node."""
        if self.batch is not None or self.downloadJob is not None:
            self.cancelJob()
            self.ui.statusLabel.text = _("Translation cancelled: the scene was closed.")
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        """A new, empty scene: create its parameter node when the module is shown."""
        if self.parent.isEntered:
            self.initializeParameterNode()

    # ------------------------------------------------------------------ parameter node

    def initializeParameterNode(self) -> None:
        """Use the scene's parameter node (created with the defaults when missing); pick a first input CT."""
        self.setParameterNode(self.logic.getParameters(slicer.mrmlScene).node)
        if self._parameters.inputVolume is None:
            firstVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolume is not None and not firstVolume.IsA("vtkMRMLLabelMapVolumeNode"):
                self._parameters.inputVolume = firstVolume

    def setParameterNode(self, parameterNode) -> None:
        """Follow ``parameterNode`` (or none): observe it and show its values."""
        if self._parameterNode is not None:
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self._parameterNode = parameterNode
        self._parameters = CT2MRTranslationParameters(parameterNode) if parameterNode is not None else None
        if parameterNode is not None:
            self.addObserver(parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self.updateGUIFromParameterNode()

    @staticmethod
    def _showPath(pathLineEdit, path: str) -> None:
        if pathLineEdit.currentPath != path:  # no write-back of what is being typed: the cursor stays
            pathLineEdit.currentPath = path

    def updateGUIFromParameterNode(self, caller=None, event=None) -> None:
        """Show the parameter node's values in the widgets (without writing them back)."""
        if self._parameters is None or self._updatingGUIFromParameterNode:
            return
        self._updatingGUIFromParameterNode = True
        try:
            p = self._parameters
            self.ui.inputSelector.setCurrentNode(p.inputVolume)
            self.ui.referenceMRSelector.setCurrentNode(p.referenceMR)
            self.ui.segmentationSelector.setCurrentNode(p.segmentation)
            self.ui.qualitySyntheticSelector.setCurrentNode(p.qualitySyntheticMR)
            self.ui.qualityReferenceSelector.setCurrentNode(p.qualityReferenceMR)
            checked = {node.GetID() for node in p.batchInputs}
            for index in range(self.ui.batchInputsSelector.nodeCount()):
                node = self.ui.batchInputsSelector.nodeFromIndex(index)
                self.ui.batchInputsSelector.setCheckState(node, qt.Qt.Checked if node.GetID() in checked
                                                          else qt.Qt.Unchecked)
            self.ui.batchModeCheckBox.checked = p.batchMode
            modelIndex = self.ui.modelComboBox.findData(f"{p.modelName}|{p.modelVersion}")
            self.ui.modelComboBox.setCurrentIndex(max(modelIndex, 0))
            self._showPath(self.ui.modelPathLineEdit, p.modelPath)
            deviceIndex = self.ui.deviceComboBox.findData(p.device)
            if deviceIndex < 0:
                deviceIndex = self.ui.deviceComboBox.findText(p.device)
            self.ui.deviceComboBox.setCurrentIndex(max(deviceIndex, 0))
            self.ui.overlapSpinBox.value = p.overlap
            self.ui.roiSizeSpinBox.value = p.roiSize
            self.ui.swBatchSizeSpinBox.value = p.swBatchSize
            self.ui.precisionComboBox.setCurrentIndex(max(self.ui.precisionComboBox.findText(p.precision), 0))
            self.ui.harmonizeComboBox.setCurrentIndex(max(self.ui.harmonizeComboBox.findText(p.harmonize), 0))
            self.ui.computeMetricsCheckBox.checked = p.computeMetrics
            self.ui.warpCheckCheckBox.checked = p.warpCheck
            self.ui.uncertaintyComboBox.setCurrentIndex(max(self.ui.uncertaintyComboBox.findText(p.uncertainty), 0))
            self.ui.uncertaintyPassesSpinBox.value = p.uncertaintyPasses
            self.ui.uncertaintyPassesSpinBox.enabled = p.uncertainty != "none"
            self.ui.oodCheckBox.checked = p.oodCheck
            self.ui.showLayoutCheckBox.checked = p.showCompareLayout
            self.ui.exportPairCheckBox.checked = p.exportPair
            self._showPath(self.ui.exportFolderPathLineEdit, p.exportFolder)
        finally:
            self._updatingGUIFromParameterNode = False
        self.updateModelInfo()
        self.updateButtons()

    def updateParameterNodeFromGUI(self, *_args) -> None:
        """Write the widgets' values into the parameter node (one Modified event)."""
        if self._parameters is None or self._updatingGUIFromParameterNode:
            return
        p = self._parameters
        wasModifying = self._parameterNode.StartModify()
        try:
            p.inputVolume = self.ui.inputSelector.currentNode()
            p.referenceMR = self.ui.referenceMRSelector.currentNode()
            p.segmentation = self.ui.segmentationSelector.currentNode()
            p.qualitySyntheticMR = self.ui.qualitySyntheticSelector.currentNode()
            p.qualityReferenceMR = self.ui.qualityReferenceSelector.currentNode()
            p.batchInputs = list(self.ui.batchInputsSelector.checkedNodes())
            p.batchMode = self.ui.batchModeCheckBox.checked
            name, _, version = str(self.ui.modelComboBox.currentData or "|").partition("|")
            p.modelName, p.modelVersion = name, version
            p.modelPath = self.ui.modelPathLineEdit.currentPath.strip()
            p.device = str(self.ui.deviceComboBox.currentData or self.ui.deviceComboBox.currentText)
            p.overlap = self.ui.overlapSpinBox.value
            roiSize = self.ui.roiSizeSpinBox.value  # snapped to the engine's multiple (the GUI shows it back)
            p.roiSize = optionSpec("roi_size").nearestValid(roiSize) if roiSize else 0
            p.swBatchSize = self.ui.swBatchSizeSpinBox.value
            p.precision = self.ui.precisionComboBox.currentText
            p.harmonize = self.ui.harmonizeComboBox.currentText
            p.computeMetrics = self.ui.computeMetricsCheckBox.checked
            p.warpCheck = self.ui.warpCheckCheckBox.checked
            p.uncertainty = self.ui.uncertaintyComboBox.currentText or "none"
            p.uncertaintyPasses = self.ui.uncertaintyPassesSpinBox.value
            p.oodCheck = self.ui.oodCheckBox.checked
            p.showCompareLayout = self.ui.showLayoutCheckBox.checked
            p.exportPair = self.ui.exportPairCheckBox.checked
            p.exportFolder = self.ui.exportFolderPathLineEdit.currentPath.strip()
        finally:
            self._parameterNode.EndModify(wasModifying)
        self.updateModelInfo()
        self.updateButtons()

    def onPathPicked(self, _path: str) -> None:
        """A path field changed: write it now when it came from the browse button, not while the user types."""
        typing = any(edit.comboBox().lineEdit().hasFocus()
                     for edit in (self.ui.modelPathLineEdit, self.ui.exportFolderPathLineEdit))
        if not typing:
            self.updateParameterNodeFromGUI()

    # ------------------------------------------------------------------ models and devices

    def refreshModelList(self) -> None:
        """Fill the model list (name, version, status) from the engine's model lists and the user cache."""
        self._modelRows = {}
        wasBlocked = self.ui.modelComboBox.blockSignals(True)
        self.ui.modelComboBox.clear()
        self.ui.modelComboBox.addItem(_("default model"), "|")
        try:
            rows = self.logic.modelList()
        except Exception as error:  # ct2mr not installed yet: only the default entry
            logging.info("CT2MR model list unavailable: %s", error)
            rows = []
        for row in rows:
            key = f"{row['name']}|{row['version']}"
            self._modelRows[key] = row
            self.ui.modelComboBox.addItem(f"{row['name']} {row['version']} ({row['status']})", key)
        self.ui.modelComboBox.blockSignals(wasBlocked)
        self.updateGUIFromParameterNode()

    def selectedModelRow(self) -> dict | None:
        """The model list's row of the selected model, or ``None`` for the default model."""
        return getattr(self, "_modelRows", {}).get(str(self.ui.modelComboBox.currentData or "|"))

    def updateModelInfo(self) -> None:
        """Describe the selected model (training data, licence, size, SHA-256) and enable its buttons."""
        row = self.selectedModelRow()
        if row is None:
            self.ui.modelInfoLabel.text = _("The bundled default model (always available).")
            self.ui.downloadModelButton.enabled = False
            return
        self.ui.modelInfoLabel.text = _(
            "{description}\nTraining data: {data}\nLicence: {licence}. Size: {size:.1f} MB. SHA-256: {sha}...\n{where}"
        ).format(description=row.get("description", ""), data=row.get("training_data", ""),
                 licence=row.get("licence", ""), size=row["size"] / 1e6, sha=row["sha256"][:16],
                 where=row.get("path") or row.get("url") or "")
        self.ui.downloadModelButton.enabled = row["status"] == "downloadable" and not self.isBusy

    def selectedModelPath(self) -> str | None:
        """The checkpoint to run: the checkpoint file when given, else the selected model's local file.

        Raises:
            ValueError: the selected model is not downloaded yet.
        """
        p = self._parameters
        if p.modelPath:
            return p.modelPath
        if not p.modelName:
            return None
        try:
            return self.logic.modelPath(p.modelName, p.modelVersion or None)
        except ValueError as error:
            raise ValueError(_("{error}\nIn this panel: select the model and click Download, or Import file... on a "
                               "computer without internet.").format(error=error)) from error

    def startDeviceQuery(self) -> None:
        """List the CUDA devices in a background process; the device list is filled when it answers."""
        if not self.logic.engineInstalled():
            return  # before the install: auto, cuda and cpu stay
        try:
            self.deviceQuery = self.logic.startDeviceQuery()
        except Exception as error:  # noqa: BLE001 - no Python/torch yet: auto, cuda and cpu stay
            logging.info("CT2MR device query not started: %s", error)
            self.deviceQuery = None
            return
        self.timer.start()

    def updateDevices(self) -> None:
        """Fill the device list once the device query has answered: auto, each CUDA GPU by name, CPU."""
        query, self.deviceQuery = self.deviceQuery, None
        found = self.logic.deviceQueryResult(query)
        self.devices = self.logic.deviceLabels(found["devices"])
        wasBlocked = self.ui.deviceComboBox.blockSignals(True)
        self.ui.deviceComboBox.clear()
        for device, label in self.devices:
            self.ui.deviceComboBox.addItem(label, device)
        self.ui.deviceComboBox.blockSignals(wasBlocked)
        if found["error"]:
            self.ui.deviceComboBox.toolTip = _("PyTorch could not list the GPUs ({error}); install the dependencies "
                                               "(Dependencies section).").format(error=found["error"])
        elif not found["devices"]:
            self.ui.deviceComboBox.toolTip = _("No CUDA GPU found (PyTorch {torch}): the translation runs on the "
                                               "CPU.").format(torch=found["torch"])
        self.updateGUIFromParameterNode()

    # ------------------------------------------------------------------ state

    @property
    def isBusy(self) -> bool:
        """A translation, a download or an install is running."""
        return self.batch is not None or self.downloadJob is not None or self.installRun is not None

    def setRunning(self, running: bool) -> None:
        """While a translation, download or install runs, the inputs are locked; Translate turns into Cancel (it
        stays disabled during an install)."""
        for widget in (self.ui.inputsCollapsibleButton, self.ui.advancedCollapsibleButton,
                       self.ui.batchCollapsibleButton, self.ui.labelTransferCollapsibleButton,
                       self.ui.dependenciesCollapsibleButton):
            widget.enabled = not running
        self.ui.applyButton.text = _("Cancel") if running else _("Translate")
        self.ui.progressBar.visible = running
        if running:
            self.ui.progressBar.value = 0
        self.updateButtons()

    def inputNodes(self) -> list:
        """What Translate works on: the checked batch inputs in batch mode, else the input CT."""
        p = self._parameters
        if p is None:
            return []
        if p.batchMode:
            return list(p.batchInputs)
        return [p.inputVolume] if p.inputVolume is not None else []

    def updateButtons(self, *_args) -> None:
        """Translate needs an input and no install running (Cancel is always enabled while a translation runs)."""
        if self.installRun is not None:  # Translate is available when the installs are done; until then: Cancel
            self.ui.applyButton.enabled = True
            self.ui.applyButton.text = _("Cancel installation")
            self.ui.applyButton.toolTip = _("Stop installing the dependencies (Translate is available when they are "
                                            "installed).")
            return
        running = self.batch is not None or self.downloadJob is not None
        count = len(self.inputNodes())
        self.ui.applyButton.enabled = running or count > 0
        if running:
            self.ui.applyButton.toolTip = _("Stop the running process and every process it started; no partial "
                                            "result is kept.")
        elif count == 0:
            self.ui.applyButton.toolTip = _("Select an input CT volume (or check volumes in Batch).")
        else:
            self.ui.applyButton.toolTip = _("Translate {count} input(s) into a synthetic MR, a round-trip CT and an "
                                            "error map.").format(count=count)
        self.ui.restoreViewsButton.enabled = views.hasPreviousViews(slicer.mrmlScene)
        self.ui.qualityButton.enabled = self.qualityJob is not None or (
            self.ui.qualitySyntheticSelector.currentNode() is not None
            and self.ui.qualityReferenceSelector.currentNode() is not None)
        self.ui.qualityButton.text = _("Cancel QA") if self.qualityJob is not None else _("Compute QA")

    def onProgress(self, fraction: float, message: str) -> None:
        """Progress callback of the Logic (called from the timer, in the GUI thread)."""
        self.ui.progressBar.value = int(round(100 * fraction))
        self.ui.statusLabel.text = message

    def appendLog(self, batch) -> None:
        """Add the batch's new engine events to the log (progress lines only when the stage changes)."""
        for label, event in batch.events[self._loggedEvents:]:
            kind = event.get("event")
            if kind == "progress":
                if (label, event.get("stage")) == self._lastStage:
                    continue
                self._lastStage = (label, event.get("stage"))
                line = f"{event.get('stage')}: {event.get('message', '')}"
            elif kind == "start":
                line = f"start on {event.get('device', '?')} (model: {event.get('model') or 'default'})"
            elif kind == "done":
                line = f"done in {event.get('seconds', '?')} s on {event.get('device', '?')}"
            else:
                line = f"{kind}: {event.get('message', '')}"
            self.ui.logTextEdit.appendPlainText(f"[{label}] {line}" if label else line)  # "": the engine's own
        self._loggedEvents = len(batch.events)

    # ------------------------------------------------------------------ dependencies

    def ensureDependencies(self, force: bool = False) -> bool:
        """Check the engine's dependencies (once per session); when something is missing, ask once and start the
        install in the background.

        Returns:
            ``True`` when everything is installed; ``False`` when an install started, was declined or is blocked.
        """
        if self.installRun is not None:
            return False
        if self._dependenciesChecked and not force:
            return True
        plan = self.logic.dependencyPlan()
        self.ui.dependencyStatusLabel.text = "\n".join(status.describe() for status in plan.statuses)
        if plan.nothingToDo:
            self._dependenciesChecked = True
            return True
        text = install.confirmationText(plan)
        if plan.blockers:
            slicer.util.errorDisplay(text, windowTitle=_("CT to MR Translation: dependencies"))
            return False
        if slicer.util.confirmOkCancelDisplay(text, windowTitle=_("CT to MR Translation: install dependencies")):
            self.startInstall(plan)
        return False

    def startInstall(self, plan: install.InstallPlan) -> None:
        """Run the plan's commands one after another in a ``QProcess`` (Translate stays disabled meanwhile)."""
        wheelFolder = self.ui.wheelFolderPathLineEdit.currentPath.strip() or None
        python = shutil.which("PythonSlicer") or sys.executable
        self.installPlan = plan
        self.installRun = install.InstallRun(plan.commands(python, wheelFolder), wheelFolder)
        self._installOutput = ""
        self.installProcess = qt.QProcess()
        self.installProcess.setProcessChannelMode(qt.QProcess.MergedChannels)
        self.installProcess.connect("readyReadStandardOutput()", self.onInstallOutput)
        self.installProcess.connect("finished(int,QProcess::ExitStatus)", self.onInstallCommandFinished)
        self.installProcess.connect("errorOccurred(QProcess::ProcessError)", self.onInstallProcessError)
        self.ui.logTextEdit.clear()
        self.setRunning(True)
        self.startNextInstallCommand()

    def startNextInstallCommand(self) -> None:
        """Start the next command of the install, or finish it."""
        run = self.installRun
        command = run.nextCommand()
        self.ui.progressBar.value = int(round(100 * run.fraction))
        self.ui.statusLabel.text = run.message
        if command is None:
            self.finishInstall()
            return
        self.ui.logTextEdit.appendPlainText("$ " + " ".join(command.argv))
        self._installOutput = ""
        self.installProcess.start(command.argv[0], list(command.argv[1:]))

    @staticmethod
    def _decode(data) -> str:
        raw = data.data() if hasattr(data, "data") else data  # QByteArray in PythonQt, or bytes
        return bytes(raw).decode("utf-8", "replace") if isinstance(raw, (bytes, bytearray)) else str(raw)

    def onInstallOutput(self) -> None:
        """Show what pip prints, as it prints it."""
        text = self._decode(self.installProcess.readAllStandardOutput())
        self._installOutput += text
        for line in text.splitlines():
            if line.strip():
                self.ui.logTextEdit.appendPlainText(line)

    def onInstallCommandFinished(self, exitCode, exitStatus) -> None:
        """One install command ended: go on, or stop with the failure message."""
        if self.installRun is None:
            return
        self.onInstallOutput()
        crashed = exitStatus != qt.QProcess.NormalExit
        self.installRun.commandFinished(-1 if crashed else int(exitCode), self._installOutput)
        self.startNextInstallCommand()

    def onInstallProcessError(self, error) -> None:
        """The command could not be started (no PythonSlicer): stop with the failure message."""
        if self.installRun is not None and error == qt.QProcess.FailedToStart:
            self.installRun.commandFinished(None, self.installProcess.errorString())
            self.startNextInstallCommand()

    def finishInstall(self) -> None:
        """The install ended: report it; ask for a restart when an imported package was upgraded."""
        run, plan = self.installRun, self.installPlan
        self.installRun, self.installPlan = None, None
        self.setRunning(False)
        if not run.succeeded:
            self.ui.statusLabel.text = run.message
            if not run.cancelled:
                slicer.util.errorDisplay(run.error, windowTitle=_("CT to MR Translation: install failed"))
            return
        self._dependenciesChecked = False
        self.onCheckDependenciesButton()
        self.refreshModelList()
        self.startDeviceQuery()
        if plan.restartNeeded:
            self.ui.statusLabel.text = _("Dependencies installed: restart Slicer to use them.")
            if slicer.util.confirmYesNoDisplay(_("The dependencies are installed. A package that was already loaded "
                                                 "was upgraded: restart Slicer now?")):
                slicer.util.restart()
            return
        self.ui.statusLabel.text = _("Dependencies installed: click Translate.")

    def onCheckDependenciesButton(self) -> None:
        """Show what is installed and what is missing."""
        with slicer.util.tryWithErrorDisplay(_("Failed to check the dependencies."), waitCursor=True):
            plan = self.logic.dependencyPlan()
            self.ui.dependencyStatusLabel.text = "\n".join(status.describe() for status in plan.statuses) + (
                "\n" + _("Everything is installed.") if plan.nothingToDo else "")

    def onInstallDependenciesButton(self) -> None:
        """Install what is missing (after one confirmation), in the background."""
        with slicer.util.tryWithErrorDisplay(_("Failed to install the dependencies."), waitCursor=False):
            if self.ensureDependencies(force=True):
                self.ui.statusLabel.text = _("Every dependency is installed.")

    # ------------------------------------------------------------------ actions

    def onApplyButton(self) -> None:
        """Translate (in the background), or cancel what is running (a translation, a download, an install)."""
        if self.installRun is not None:
            self.installRun.cancel()
            self.installProcess.kill()  # finished() follows and ends the install
            return
        if self.batch is not None or self.downloadJob is not None:
            self.onCancel()
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to start the CT to MR translation."), waitCursor=True):
            if not self.ensureDependencies():
                return
            keywords = self._parameters.translateKeywords(self.selectedModelPath())
            self.ui.logTextEdit.clear()
            self._loggedEvents, self._lastStage = 0, None
            self.batch = self.logic.startBatch(self.inputNodes(), progressCallback=self.onProgress, **keywords)
            if self._parameters.modelPath:
                self.ui.modelPathLineEdit.addCurrentPathToHistory()
            self.setRunning(True)
            self.timer.start()

    def onRestoreViewsButton(self) -> None:
        """Bring back the layout and crosshair from before the compare layout."""
        self.logic.restorePreviousViews(slicer.mrmlScene)
        self.updateButtons()

    def fitCompareViews(self) -> None:
        """Fit each compare view to its volume once the layout manager has built the views (their real size)."""
        layoutManager = slicer.app.layoutManager()
        if layoutManager is None:
            return
        for column in views.COMPARE_COLUMNS:
            for orientation, _color in views.COMPARE_ORIENTATIONS:
                sliceWidget = layoutManager.sliceWidget(views.compareViewName(column, orientation))
                if sliceWidget is not None:
                    sliceWidget.sliceLogic().FitSliceToAll()

    def onPollTimer(self) -> None:
        """Drive the device query, the download and the batch; load results as translations end."""
        if self.deviceQuery is not None and self.deviceQuery.poll() is not None:
            self.updateDevices()
        if self.downloadJob is not None:
            self.pollDownload()
        if self.batch is not None:
            self.pollBatch()
        if self.qualityJob is not None:
            self.pollQuality()
        if self.batch is None and self.downloadJob is None and self.deviceQuery is None and self.qualityJob is None:
            self.timer.stop()

    def pollBatch(self) -> None:
        """One step of the running batch."""
        batch = self.batch
        try:
            with slicer.util.tryWithErrorDisplay(_("Could not complete the CT to MR translation."), waitCursor=False):
                done = batch.update()
                self.appendLog(batch)
                if not done:
                    return
                self.batch = None
                self.setRunning(False)
                if any(result.layoutId is not None for result in batch.results):
                    qt.QTimer.singleShot(0, self.fitCompareViews)
                self.reportBatch(batch)
        except Exception:
            # The dialog shows the details; the log keeps them (also when testing, where no dialog is shown).
            logging.exception("CT to MR translation failed")
            self.cancelJob()
            finished = batch.message + "\n" if batch.state != "running" else ""
            self.ui.statusLabel.text = finished + _("Translation failed; see the error message.")

    def reportBatch(self, batch) -> None:
        """Status line, device and retry messages, label transfer; raise for failed items (shown as a dialog)."""
        lines = [batch.message, *batch.notes]
        for result in batch.results:
            if result.oodWarning:  # issue 16: the input differs from the model's training CTs
                lines.insert(0, result.oodWarning)
            if result.deviceMessage:
                lines.append(result.deviceMessage)
            lines += result.retryMessages
            if result.anatomy.get("displacement_p95_mm") is not None:
                lines.append(_("Warp check: displacement mean {mean:.2f} mm, p95 {p95:.2f} mm inside the body.").format(
                    mean=float(result.anatomy.get("displacement_mean_mm", float("nan"))),
                    p95=float(result.anatomy["displacement_p95_mm"])))
            if result.analysis is not None and result.analysis.metricsError:
                lines.append(_("Metrics incomplete: {error}").format(error=result.analysis.metricsError))
        self.ui.statusLabel.text = "\n".join(dict.fromkeys(lines))
        if len(batch.results) == 1 and not batch.outputSequences:
            self.ui.qualitySyntheticSelector.setCurrentNode(batch.results[0].syntheticMR)
            self.transferLabels(batch.results[0])
        if batch.failures:
            raise RuntimeError("\n\n".join(f"{label}: {message}" for label, message in batch.failures))

    def onQualityButton(self) -> None:
        """Start QA of the synthetic MR against the registered reference MR in a background engine process (or
        cancel the running one)."""
        if self.qualityJob is not None:
            job, self.qualityJob = self.qualityJob, None
            job.cancel()
            self.ui.statusLabel.text = _("QA cancelled.")
            self.updateButtons()
            return
        with slicer.util.tryWithErrorDisplay(_("Could not start QA against the reference."), waitCursor=True):
            self.qualityJob = self.logic.startQuality(
                self.ui.qualitySyntheticSelector.currentNode(), self.ui.qualityReferenceSelector.currentNode(),
                self._parameters.inputVolume if self._parameters is not None else None,
                progressCallback=self.onProgress)
            self.timer.start()
        self.updateButtons()

    def pollQuality(self) -> None:
        """One step of the running QA; when it ends, show the difference map and the metrics."""
        job = self.qualityJob
        try:
            with slicer.util.tryWithErrorDisplay(_("QA against the reference failed."), waitCursor=False):
                if not job.update():
                    return
                self.qualityJob = None
                result = job.finish()
                slicer.util.setSliceViewerLayers(background=result.differenceMap, fit=True)
                metrics = result.metrics
                self.ui.statusLabel.text = _("QA against the reference: MAE {mae:.4f}, PSNR {psnr:.2f} dB, "
                                             "SSIM {ssim:.4f}, MS-SSIM {msssim:.4f} (table '{table}').").format(
                    mae=float(metrics.get("mae") or float("nan")), psnr=float(metrics.get("psnr_db") or float("nan")),
                    ssim=float(metrics.get("ssim") or float("nan")),
                    msssim=float(metrics.get("ms_ssim") or float("nan")), table=result.metricsTable.GetName())
        except Exception:
            logging.exception("CT2MR QA failed")
            self.qualityJob = None
        finally:
            self.updateButtons()

    def transferLabels(self, result: CT2MRTranslationResult) -> None:
        """Show the CT's segmentation over the synthetic MR and, if asked, export the pair as training data."""
        segmentationNode = self._parameters.segmentation
        if segmentationNode is None:
            return
        self.logic.showSegmentationOver(segmentationNode, result.syntheticMR)
        if not self._parameters.exportPair:
            return
        folder = self._parameters.exportFolder
        if not folder:
            raise ValueError(_("Choose a dataset folder to export the training pair to."))
        paths = self.logic.exportTrainingPair(result.syntheticMR, segmentationNode, folder)
        self.ui.exportFolderPathLineEdit.addCurrentPathToHistory()
        self.ui.statusLabel.text += " " + _("Exported {image} and {label}.").format(
            image=os.path.basename(paths["image"]), label=os.path.basename(paths["label"]))

    def onDownloadModelButton(self) -> None:
        """Download the selected model into the user cache in the background."""
        row = self.selectedModelRow()
        if row is None:
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to start the model download."), waitCursor=True):
            if not self.ensureDependencies():
                return
            self.ui.logTextEdit.appendPlainText(f"download: {row['url']} ({row['size'] / 1e6:.1f} MB)")
            self.downloadJob = self.logic.startModelDownload(row["name"], row["version"],
                                                             progressCallback=self.onProgress)
            self.setRunning(True)
            self.timer.start()

    def pollDownload(self) -> None:
        """One step of the running download."""
        job = self.downloadJob
        with slicer.util.tryWithErrorDisplay(_("The model download failed."), waitCursor=False):
            if not job.update():
                return
            self.downloadJob = None
            self.setRunning(False)
            try:
                path = self.logic.finishModelDownload(job)
            finally:
                self.refreshModelList()
            self.ui.statusLabel.text = _("Downloaded {name} {version} to {path}.").format(
                name=job.name, version=job.version or "", path=path)

    def onImportModelButton(self) -> None:
        """Import a checkpoint file into the user cache (offline computers) and select it."""
        path = qt.QFileDialog.getOpenFileName(slicer.util.mainWindow(), _("Import a ct2mr checkpoint"), "",
                                              _("Model checkpoints (*.safetensors)"))
        if not path:
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to import the checkpoint."), waitCursor=True):
            if not self.ensureDependencies():
                return
            imported = self.logic.importModel(path)
            self._parameters.modelName, self._parameters.modelVersion = imported["name"], imported["version"]
            self.refreshModelList()
            self.ui.statusLabel.text = _("Imported {name} {version} into {path}.").format(**imported)

    def onClearModelsButton(self) -> None:
        """Remove the old versions of downloaded and imported models (after a confirmation)."""
        if not slicer.util.confirmOkCancelDisplay(_("Remove every downloaded or imported model version older than "
                                                    "the newest of its model? The default model is kept.")):
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to clear the model cache."), waitCursor=True):
            removed = self.logic.clearModels(keepLatest=True)
            self.refreshModelList()
            self.ui.statusLabel.text = _("Removed {count} old model version(s).").format(count=len(removed))

    def onCancel(self) -> None:
        """Kill the running process tree and forget the job."""
        with slicer.util.tryWithErrorDisplay(_("Failed to cancel."), waitCursor=True):
            self.cancelJob()
            self.ui.statusLabel.text = _("Cancelled: no partial result was kept.")

    def cancelJob(self) -> None:
        """Cancel the running batch or download, if any, and reset the panel."""
        batch, self.batch = self.batch, None
        download, self.downloadJob = self.downloadJob, None
        quality, self.qualityJob = self.qualityJob, None
        if batch is not None:
            batch.cancel()
        if quality is not None:
            quality.cancel()
        if download is not None and self.logic is not None:
            self.logic.cancelModelDownload(download)
        if hasattr(self, "ui") and not self.versionProblem:
            self.setRunning(self.installRun is not None)


#
# CT2MRTranslationTest
#


class CT2MRTranslationTest(ScriptedLoadableModuleTest):
    """Self-test run inside Slicer: translate a CT and check the three outputs (needs the ct2mr engine)."""

    CT_RELATIVE_PATH = os.path.join("ct", "thorax_cta_1p5mm.nii.gz")

    def setUp(self) -> None:
        """Start from an empty scene."""
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        """Run all tests."""
        self.setUp()
        self.test_SupportedSlicer()
        self.setUp()
        self.test_CT2MRTranslation1()

    def test_SupportedSlicer(self) -> None:
        """This Slicer is in the supported range and the compare layouts were registered at start-up."""
        self.assertEqual(slicerVersionProblem(), "")
        from CT2MRTranslationLib import views

        layoutNode = slicer.app.layoutManager().layoutLogic().GetLayoutNode() if slicer.app.layoutManager() else None
        if layoutNode is not None:
            self.assertTrue(layoutNode.IsLayoutDescription(views.COMPARE_LAYOUT_ID))
            self.assertTrue(layoutNode.IsLayoutDescription(views.COMPARE_ANALYSIS_LAYOUT_ID))

    def sharedDataDirectory(self) -> str:
        """``<repository>/../shared/data`` next to a source checkout (absent in an installed extension)."""
        repositoryRoot = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        return os.path.join(os.path.dirname(repositoryRoot), "shared", "data")

    def loadInputCT(self):
        """Load the thorax CT of the shared data folder, or make a synthetic CT (HU) on an oblique grid."""
        path = os.path.join(self.sharedDataDirectory(), self.CT_RELATIVE_PATH)
        if os.path.isfile(path):
            return slicer.util.loadVolume(path, {"name": "Thorax CT"})
        self.delayDisplay(f"{path} not found: using a synthetic CT")
        z, y, x = np.indices((48, 64, 64))  # (z, y, x)
        body = (x - 32) ** 2 + ((y - 32) * 1.3) ** 2 < 26 ** 2
        lungs = ((x - 20) ** 2 + (y - 30) ** 2 < 9 ** 2) | ((x - 44) ** 2 + (y - 30) ** 2 < 9 ** 2)
        hu = np.where(body, 40.0, -1000.0)
        hu[lungs & body] = -850.0
        hu += 5.0 * np.sin(z / 4.0)
        ijkToRAS = np.array([[-1.2, 0.1, 0.0, 80.0], [-0.1, -1.2, 0.0, 95.0], [0.0, 0.0, 2.0, -40.0], [0, 0, 0, 1]])
        return slicer.util.addVolumeFromArray(hu.astype(np.int16), ijkToRAS=ijkToRAS, name="Synthetic CT")

    def test_CT2MRTranslation1(self) -> None:
        """Translate a CT with the real engine; outputs must lie on the input's grid with finite values."""
        if importlib.util.find_spec("ct2mr") is None:
            self.skipTest("The ct2mr engine is not installed in Slicer's Python (PythonSlicer -m pip install ct2mr).")
        self.delayDisplay("Loading the input CT")
        inputNode = self.loadInputCT()
        self.assertIsNotNone(inputNode)
        inputMatrix = vtk.vtkMatrix4x4()
        inputNode.GetIJKToRASMatrix(inputMatrix)
        inputDimensions = inputNode.GetImageData().GetDimensions()

        self.delayDisplay("Translating (this takes a while on a CPU)")
        fractions = []
        logic = CT2MRTranslationLogic()
        result = logic.translate(inputNode, progressCallback=lambda fraction, message: fractions.append(fraction),
                                 analysis=True)
        self.assertNotIn("torch", sys.modules)  # the engine and its science ran in their own process
        self.assertNotIn("ct2mr.evaluation.evaluate", sys.modules)

        shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
        inputParent = shNode.GetItemParent(shNode.GetItemByDataNode(inputNode))
        suffixes = ("synthetic MR", "round-trip CT", "error map")
        self.assertEqual(len(result.volumeNodes), len(suffixes))
        for node, suffix in zip(result.volumeNodes, suffixes):
            self.assertIsNotNone(node)
            self.assertEqual(node.GetName(), f"{inputNode.GetName()} {suffix}")
            self.assertIsNotNone(slicer.mrmlScene.GetNodeByID(node.GetID()))
            matrix = vtk.vtkMatrix4x4()
            node.GetIJKToRASMatrix(matrix)
            for row in range(4):
                for column in range(4):
                    self.assertEqual(matrix.GetElement(row, column), inputMatrix.GetElement(row, column))
            self.assertEqual(node.GetImageData().GetDimensions(), inputDimensions)
            self.assertTrue(np.isfinite(slicer.util.arrayFromVolume(node)).all(), node.GetName())
            self.assertEqual(shNode.GetItemParent(shNode.GetItemByDataNode(node)), inputParent)
        self.assertGreaterEqual(float(slicer.util.arrayFromVolume(result.errorMap).min()), 0.0)
        self.assertEqual(fractions[-1], 1.0)
        self.assertEqual(fractions, sorted(fractions))

        self.delayDisplay("Checking the analysis and the compare layout")
        from CT2MRTranslationLib import views

        analysis = result.analysis
        self.assertIsNotNone(analysis)
        self.assertEqual(analysis.histogramTable.GetColumnName(1), "Synthetic MR")
        self.assertEqual(analysis.chart.GetNumberOfPlotSeriesNodes(), 1)
        self.assertEqual(analysis.metricsError, "")
        self.assertEqual(analysis.metricsTable.GetCellText(0, 0), "SSIM_cyc")
        layoutNode = slicer.mrmlScene.GetSingletonNode("vtkMRMLLayoutNode", "vtkMRMLLayoutNode")
        self.assertEqual(layoutNode.GetViewArrangement(), views.COMPARE_ANALYSIS_LAYOUT_ID)
        layoutManager = slicer.app.layoutManager()
        if layoutManager is not None:  # absent with --no-main-window
            slicer.app.processEvents()
            for column in views.COMPARE_COLUMNS:
                for orientation, _color in views.COMPARE_ORIENTATIONS:
                    self.assertIsNotNone(layoutManager.sliceWidget(views.compareViewName(column, orientation)))

        self.delayDisplay("Restoring the views from before the compare layout")
        self.assertTrue(views.hasPreviousViews(slicer.mrmlScene))
        self.assertTrue(logic.restorePreviousViews())
        self.assertNotEqual(layoutNode.GetViewArrangement(), views.COMPARE_ANALYSIS_LAYOUT_ID)

        self.delayDisplay("Checking that the parameters are saved with the scene")
        parameters = logic.getParameters()
        parameters.inputVolume = inputNode
        parameters.overlap = 0.5
        self.assertEqual(logic.getParameterNode().GetParameter("Overlap"), "0.5")  # Slicer's own parameter node
        self.delayDisplay("Test passed")
