"""CT to MR Translation: a 3D Slicer front end of the ct2mr CycleGAN engine.

The Widget (all Qt of the module lives here) starts a translation in a background process through
``CT2MRTranslationLogic``, polls it with a ``QTimer`` so the GUI never freezes, shows progress from the engine's
events and can cancel it. The Logic (``CT2MRTranslationLib/logic.py``) is Qt-free and usable without the GUI::

    logic = CT2MRTranslationLogic()
    result = logic.translate(slicer.util.getNode("CT"), device="cpu")
    result.syntheticMR, result.roundTripCT, result.errorMap
"""

from __future__ import annotations

import importlib.util
import logging
import os
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

from CT2MRTranslationLib.logic import CT2MRTranslationLogic, CT2MRTranslationResult  # noqa: F401  (re-export)

__all__ = ["CT2MRTranslation", "CT2MRTranslationLogic", "CT2MRTranslationTest", "CT2MRTranslationWidget"]


#
# CT2MRTranslation
#


class CT2MRTranslation(ScriptedLoadableModule):
    """Module description shown in Slicer (title, category, help and acknowledgement)."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("CT to MR Translation")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Filtering")]
        self.parent.dependencies = []
        self.parent.contributors = ["CT2MRTranslation team"]
        self.parent.helpText = _("""
Translates a CT volume (HU) into a synthetic MR with a 3D CycleGAN, on the CT's own voxel grid
(same size, spacing, origin and direction; nothing is warped). Three volumes are added next to the input:
<ul>
<li><b>synthetic MR</b> G(x): the generator G (CT to MR) applied to the CT x; normalised MR intensity in [-1, 1];</li>
<li><b>round-trip CT</b> F(G(x)): the synthetic MR translated back by the generator F (MR to CT), in HU;</li>
<li><b>error map</b> |F(G(x)) - x| in HU: where the round trip does not give the CT back, the translation
lost or invented anatomy.</li>
</ul>
The translation runs in a separate process (sliding window, on the GPU when available); Cancel stops it.
Leave the model path empty to use the default model. Results are shown side by side (axial, coronal, sagittal).
""")
        self.parent.acknowledgementText = _("""
Built on the method of N. Arifette, "CT to MRI Translation using CycleGAN for Medical Imaging Applications"
(internship thesis, ENS Paris-Saclay / BioMaps): 3D CycleGAN, thoracic preprocessing, round-trip error analysis.
""")


#
# CT2MRTranslationWidget
#


class CT2MRTranslationWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Module panel: input CT, model, device; Translate, Cancel, progress.

    The translation runs as a background process; a ``QTimer`` polls it every ``POLL_INTERVAL_MS`` milliseconds.
    """

    POLL_INTERVAL_MS = 200

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic: CT2MRTranslationLogic | None = None
        self.job = None
        self.timer: qt.QTimer | None = None

    def setup(self) -> None:
        """Build the panel from ``Resources/UI/CT2MRTranslation.ui`` and connect it."""
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/CT2MRTranslation.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = CT2MRTranslationLogic()
        self.logic.temporaryDirectory = os.path.join(slicer.app.temporaryPath, "CT2MRTranslation")

        self.timer = qt.QTimer()
        self.timer.setInterval(self.POLL_INTERVAL_MS)
        self.timer.connect("timeout()", self.onPollTimer)

        self.ui.inputSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateButtons)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancelButton)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)

        self.setRunning(False)
        self.ui.statusLabel.text = _("Select a CT volume and click Translate.")

    def cleanup(self) -> None:
        """Stop a running translation (and its process) when the module is destroyed."""
        self.cancelJob()
        if self.timer is not None:
            self.timer.stop()
        self.removeObservers()

    def onReload(self) -> None:
        """Reload the module together with its library (CT2MRTranslationLib), without ``imp``."""
        self.cancelJob()
        for name in [name for name in sys.modules if name.split(".")[0] == "CT2MRTranslationLib"]:
            del sys.modules[name]
        ScriptedLoadableModuleWidget.onReload(self)

    def onSceneStartClose(self, caller, event) -> None:
        """The input node is about to disappear: stop the translation."""
        self.cancelJob()
        self.ui.statusLabel.text = _("Translation cancelled: the scene was closed.")

    # ------------------------------------------------------------------ state

    def setRunning(self, running: bool) -> None:
        """Enable the controls that make sense while a translation runs (or not)."""
        for widget in (self.ui.inputSelector, self.ui.modelPathLineEdit, self.ui.deviceComboBox,
                       self.ui.overlapSpinBox, self.ui.segmentationSelector, self.ui.exportPairCheckBox,
                       self.ui.exportFolderPathLineEdit):
            widget.enabled = not running
        self.ui.cancelButton.enabled = running
        self.ui.progressBar.visible = running
        if running:
            self.ui.progressBar.value = 0
        self.updateButtons()

    def updateButtons(self, *_args) -> None:
        """Translate needs an input volume and no running translation."""
        hasInput = self.ui.inputSelector.currentNode() is not None
        self.ui.applyButton.enabled = hasInput and self.job is None
        self.ui.applyButton.toolTip = (
            _("Translate the selected CT into a synthetic MR, a round-trip CT and an error map.")
            if hasInput else _("Select an input CT volume.")
        )

    def onProgress(self, fraction: float, message: str) -> None:
        """Progress callback of the Logic (called from the timer, in the GUI thread)."""
        self.ui.progressBar.value = int(round(100 * fraction))
        self.ui.statusLabel.text = message

    # ------------------------------------------------------------------ actions

    def onApplyButton(self) -> None:
        """Start the translation in the background."""
        with slicer.util.tryWithErrorDisplay(_("Failed to start the CT to MR translation."), waitCursor=True):
            self.job = self.logic.startTranslation(
                self.ui.inputSelector.currentNode(),
                modelPath=self.ui.modelPathLineEdit.currentPath.strip() or None,
                device=self.ui.deviceComboBox.currentText,
                overlap=self.ui.overlapSpinBox.value,
                progressCallback=self.onProgress,
            )
            self.ui.modelPathLineEdit.addCurrentPathToHistory()
            self.setRunning(True)
            self.timer.start()

    def onPollTimer(self) -> None:
        """Handle the engine's events; load the results once the process has ended."""
        job = self.job
        if job is None:
            self.timer.stop()
            return
        try:
            with slicer.util.tryWithErrorDisplay(_("Could not complete the CT to MR translation."), waitCursor=False):
                if not job.update():
                    return
                self.timer.stop()
                self.job = None
                result = self.logic.finishTranslation(job)
                self.setRunning(False)
                slicer.util.resetSliceViews()
                self.ui.statusLabel.text = _("Done in {seconds:.1f} s: {names}.").format(
                    seconds=result.seconds, names=", ".join(node.GetName() for node in result.volumeNodes))
                self.transferLabels(result)
        except Exception:
            # The dialog shows the details; the log keeps them (also when testing, where no dialog is shown).
            logging.exception("CT to MR translation failed")
            self.cancelJob()
            self.ui.statusLabel.text = _("Translation failed; see the error message.")

    def transferLabels(self, result: CT2MRTranslationResult) -> None:
        """Show the CT's segmentation over the synthetic MR and, if asked, export the pair as training data."""
        segmentationNode = self.ui.segmentationSelector.currentNode()
        if segmentationNode is None:
            return
        self.logic.showSegmentationOver(segmentationNode, result.syntheticMR)
        if not self.ui.exportPairCheckBox.checked:
            return
        folder = self.ui.exportFolderPathLineEdit.currentPath.strip()
        if not folder:
            raise ValueError(_("Choose a dataset folder to export the training pair to."))
        paths = self.logic.exportTrainingPair(result.syntheticMR, segmentationNode, folder)
        self.ui.exportFolderPathLineEdit.addCurrentPathToHistory()
        self.ui.statusLabel.text += " " + _("Exported {image} and {label}.").format(
            image=os.path.basename(paths["image"]), label=os.path.basename(paths["label"]))

    def onCancelButton(self) -> None:
        """Kill the engine process tree and forget the job."""
        with slicer.util.tryWithErrorDisplay(_("Failed to cancel the translation."), waitCursor=True):
            self.cancelJob()
            self.ui.statusLabel.text = _("Translation cancelled.")

    def cancelJob(self) -> None:
        """Cancel the running job, if any, and reset the panel."""
        if self.timer is not None:
            self.timer.stop()
        job, self.job = self.job, None
        if job is not None and self.logic is not None:
            self.logic.cancel(job)
        if hasattr(self, "ui"):
            self.setRunning(False)


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
        self.test_CT2MRTranslation1()

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
        result = logic.translate(inputNode, progressCallback=lambda fraction, message: fractions.append(fraction))

        shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
        inputParent = shNode.GetItemParent(shNode.GetItemByDataNode(inputNode))
        suffixes = ("synthetic MR", "round-trip CT", "error map")
        for node, suffix in zip(result.volumeNodes, suffixes, strict=True):
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
        self.delayDisplay("Test passed")
