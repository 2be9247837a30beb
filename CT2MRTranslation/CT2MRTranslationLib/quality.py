"""QA against a reference (issue 16): a synthetic MR scored against a registered reference MR by the engine.

The user supplies a real MR of the same patient, registered and resampled onto the CT's grid. The synthetic MR, the
reference and (for the body mask) the CT are written to a temporary folder and ``ct2mr qa SYNTHETIC REFERENCE --ct CT
-o OUT_DIR --progress json`` runs as a background engine process (:func:`CT2MRTranslationLib.engine.qaArguments`):
MAE, PSNR, SSIM and MS-SSIM inside the body mask, with the definitions (mask, range, clipping) stated by the engine
(``ct2mr/evaluation/reference_qa.py``). Its ``difference.nii.gz`` (synthetic - reference, normalised units) becomes a volume node
on the synthetic MR's exact grid and ``qa_metrics.json`` a table node, both next to the synthetic MR in subject
hierarchy. Nothing is computed in Slicer's process, which never imports torch; a reference on another grid is refused
by the engine with a message naming what differs.

No Qt here: runs inside Slicer and in plain Python with the ``slicer-core`` wheel.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import slicer

from . import engine, nodes, plots
from .runner import TranslationProcessProtocol

__all__ = ["QA_DIFFERENCE_FILE", "QA_METRICS_FILE", "CT2MRQualityJob", "CT2MRQualityResult"]

QA_DIFFERENCE_FILE = "difference.nii.gz"
"""The engine's difference map in OUT_DIR (synthetic - reference, normalised MR units)."""

QA_METRICS_FILE = "qa_metrics.json"
"""The engine's metrics and their definitions in OUT_DIR."""

EngineEvent = dict[str, Any]


@dataclass
class CT2MRQualityResult:
    """What a QA run added to the scene.

    Attributes:
        differenceMap: synthetic - reference (normalised MR units, clipped inputs) on the synthetic MR's grid.
        metricsTable: table node of MAE, PSNR (dB), SSIM, MS-SSIM and the mask's voxel count, with definitions.
        qa: the engine's ``qa_metrics.json`` (metrics, mask, definitions, reference normalisation).
        log: every engine event of the run.
        seconds: wall-clock time (s).
    """

    differenceMap: slicer.vtkMRMLScalarVolumeNode
    metricsTable: slicer.vtkMRMLTableNode
    qa: dict[str, Any] = field(default_factory=dict)
    log: list[EngineEvent] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def metrics(self) -> dict[str, Any]:
        """The engine's metrics (``mae``, ``psnr_db``, ``ssim``, ``ms_ssim``, ``voxels``)."""
        return dict(self.qa.get("metrics") or {})

    @property
    def nodes(self) -> list[slicer.vtkMRMLNode]:
        """The nodes the run added."""
        return [self.differenceMap, self.metricsTable]


@dataclass
class CT2MRQualityJob:
    """``ct2mr qa`` running in the background; :meth:`update` from a timer, then :meth:`finish` or :meth:`cancel`.

    Attributes:
        syntheticMR: the synthetic MR node scored (its grid is the outputs' grid).
        referenceMR: the registered reference MR node.
        process: the engine process.
        workDir: temporary folder (inputs and outputs), removed by :meth:`finish` / :meth:`cancel`.
        outputDir: the engine's OUT_DIR.
        engineArguments: the engine's arguments.
        progressCallback: ``progressCallback(fraction, message)``.
    """

    syntheticMR: slicer.vtkMRMLScalarVolumeNode
    referenceMR: slicer.vtkMRMLScalarVolumeNode
    process: TranslationProcessProtocol
    workDir: str
    outputDir: str
    engineArguments: list[str] = field(default_factory=list)
    progressCallback: Callable[[float, str], None] | None = None
    log: list[EngineEvent] = field(default_factory=list)
    doneEvent: EngineEvent | None = None
    errorMessage: str | None = None
    fraction: float = 0.0
    message: str = "Starting QA"
    state: str = "running"
    startTime: float = field(default_factory=time.monotonic)

    @staticmethod
    def start(syntheticMR, referenceMR, ctNode, workDir: str,
              startEngine: Callable[[Sequence[str]], TranslationProcessProtocol],
              progressCallback: Callable[[float, str], None] | None = None) -> CT2MRQualityJob:
        """Write the inputs into ``workDir`` and start ``ct2mr qa``.

        Args:
            syntheticMR: the synthetic MR node (normalised units).
            referenceMR: the reference MR node, registered and resampled onto the same grid.
            ctNode: the translated CT for the body mask, or ``None`` (the reference's own mask); a CT that is not on
                the synthetic MR's grid is not used (the reference's own mask then).
            workDir: an empty temporary folder; removed on failure.
            startEngine: ``startEngine(arguments)`` -> process (the Logic's :meth:`startEngine`).
            progressCallback: ``progressCallback(fraction, message)``.

        Raises:
            ValueError: a node is missing or has no image data.
            RuntimeError: the inputs could not be written or the engine could not be started.
        """
        for node, what in ((syntheticMR, "synthetic MR"), (referenceMR, "reference MR")):
            if node is None or node.GetImageData() is None:
                raise ValueError(f"QA needs a {what} volume with image data: select one.")
        if ctNode is not None and (
                ctNode.GetImageData() is None or nodes.volumeDimensions(ctNode) != nodes.volumeDimensions(syntheticMR)
                or nodes.geometryDifference(ctNode, syntheticMR) > nodes.GEOMETRY_TOLERANCE):
            ctNode = None
        try:
            synthetic = nodes.writeVolumeNode(syntheticMR, os.path.join(workDir, "synthetic_mr.nrrd"))
            reference = nodes.writeVolumeNode(referenceMR, os.path.join(workDir, "reference_mr.nrrd"))
            ct = nodes.writeVolumeNode(ctNode, os.path.join(workDir, "ct.nrrd")) if ctNode is not None else None
            outputDir = os.path.join(workDir, "qa")
            arguments = engine.qaArguments(synthetic, reference, outputDir, ct)
            process = startEngine(arguments)
        except BaseException:
            shutil.rmtree(workDir, ignore_errors=True)
            raise
        job = CT2MRQualityJob(syntheticMR, referenceMR, process, workDir, outputDir, arguments, progressCallback)
        job._notify()
        return job

    def _notify(self) -> None:
        if self.progressCallback is not None:
            self.progressCallback(self.fraction, self.message)

    def handle(self, event: EngineEvent) -> None:
        """Record one engine event (progress, ``done``, ``error``)."""
        self.log.append(event)
        kind = event.get("event")
        if kind == "progress":
            try:
                self.fraction = min(max(float(event.get("fraction", 0.0)), self.fraction), 1.0)
            except (TypeError, ValueError):
                pass
            self.message = f"QA: {event.get('message') or event.get('stage') or ''}".strip()
            self._notify()
        elif kind == "done":
            self.doneEvent, self.fraction, self.message = event, 1.0, "QA done, loading results"
            self._notify()
        elif kind == "error":
            self.errorMessage = str(event.get("message") or "unknown error")

    def update(self) -> bool:
        """Handle the events received so far; ``True`` once the engine process has ended and all are handled."""
        for event in self.process.events():
            self.handle(event)
        finished = self.process.poll() is not None
        if finished:
            for event in self.process.events():
                self.handle(event)
        return finished

    def finish(self) -> CT2MRQualityResult:
        """Wait for the engine, then load the difference map and the metrics table next to the synthetic MR.

        Returns:
            The result.

        Raises:
            RuntimeError: the engine failed (its message: e.g. the reference is not on the synthetic MR's grid), or
                its outputs are missing or not on the synthetic MR's grid. No node is added; the temporary folder is
                removed in every case.
        """
        if self.state != "running":
            raise RuntimeError(f"This QA job is {self.state}; start a new one.")
        scene = self.syntheticMR.GetScene()
        added: list[slicer.vtkMRMLNode] = []
        try:
            while not self.update():
                self.process.wait()
            if self.process.returncode != 0 or self.errorMessage is not None or self.doneEvent is None:
                raise RuntimeError(engine.failureMessage(self.errorMessage, self.process.stderrTail,
                                                         self.process.returncode).replace(
                    "CT to MR translation failed", "QA against the reference failed", 1))
            outputs = dict(self.doneEvent.get("outputs") or {})
            differencePath = outputs.get("difference") or os.path.join(self.outputDir, QA_DIFFERENCE_FILE)
            metricsPath = outputs.get("metrics_json") or os.path.join(self.outputDir, QA_METRICS_FILE)
            with open(metricsPath, encoding="utf-8") as file:
                qa = json.load(file)
            difference = nodes.readVolumeNode(differencePath, f"{self.syntheticMR.GetName()} difference to reference")
            nodes.assertSameGeometry(difference, self.syntheticMR, snap=True)
            added.append(scene.AddNode(difference))
            difference.SetAndObserveTransformNodeID(self.syntheticMR.GetTransformNodeID())
            nodes.placeNextTo(difference, self.syntheticMR)
            high = max(abs(v) for v in nodes.volumePercentiles(difference, [1.0, 99.0])) or 1.0
            nodes.setVolumeDisplay(difference, 2.0 * high, 0.0,
                                   nodes.findColorNodeID(scene, ("ColdToHotRainbow", "DivergingBlueRed", "Grey")))
            rows = plots.qaMetricRows(qa)
            if not rows:
                raise RuntimeError(f"The engine's {metricsPath} has no metric: update the ct2mr engine.")
            table = plots.metricsTableNode(scene, rows, f"{self.syntheticMR.GetName()} QA metrics")
            added.append(table)
            nodes.placeNextTo(table, self.syntheticMR)
            self.state = "finished"
            return CT2MRQualityResult(difference, table, qa, list(self.log), time.monotonic() - self.startTime)
        except BaseException:
            self.state = "failed"
            for node in added:
                if node.GetScene() is not None:
                    scene.RemoveNode(node)
            raise
        finally:
            shutil.rmtree(self.workDir, ignore_errors=True)

    def cancel(self) -> None:
        """Stop the engine process tree and remove the temporary files."""
        if self.state != "running":
            return
        try:
            self.process.cancel()
        finally:
            self.state, self.message = "cancelled", "Cancelled"
            shutil.rmtree(self.workDir, ignore_errors=True)
