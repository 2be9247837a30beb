"""CT2MRTranslationLogic: translate a CT volume node into a synthetic MR, a round-trip CT and an error map.

The Logic writes the input node to a temporary NRRD file, runs the engine (``python -m ct2mr translate ...
--progress json``) as a background process (:mod:`CT2MRTranslationLib.runner`), and loads its three outputs back
as volume nodes on the input's voxel grid (:mod:`CT2MRTranslationLib.nodes`), beside the input in subject
hierarchy, shown in the compare layout (:mod:`CT2MRTranslationLib.views`):

- synthetic MR ``G(x)``: normalised MR intensity in [-1, 1];
- round-trip CT ``F(G(x))``: HU;
- error map ``|F(G(x)) - x|``: HU, >= 0 (thesis, section 7, cycle-consistency analysis).

The Logic never touches Qt or ``slicer.app`` (DESIGN.md): it runs in Slicer and in plain Python with the
``slicer-core`` wheel ("Can be used without GUI widget"). The Widget uses :meth:`startTranslation`,
:meth:`CT2MRTranslationJob.update` from a timer and :meth:`finishTranslation`; scripts use :meth:`translate`.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import slicer

from . import export, nodes, views
from .runner import EngineEvent, ProcessFactory, TranslationProcess, TranslationProcessProtocol, engineCommand

try:  # In Slicer; absent from the slicer-core wheel.
    from slicer.ScriptedLoadableModule import ScriptedLoadableModuleLogic as _LogicBase
except ImportError:  # pragma: no cover - depends on the environment
    _LogicBase = object

__all__ = [
    "DEVICES",
    "OUTPUT_KEYS",
    "CT2MRTranslationJob",
    "CT2MRTranslationLogic",
    "CT2MRTranslationResult",
    "ProgressCallback",
]

DEVICES = ("auto", "cuda", "cpu")
"""``device`` values offered in the GUI: ``auto`` lets the engine pick CUDA when available, else the CPU.
``"cuda:N"`` (GPU number N) is accepted as well."""

OUTPUT_KEYS = {
    "synthetic_mr": ("synthetic_mr.nii.gz", "synthetic MR"),
    "roundtrip_ct": ("roundtrip_ct.nii.gz", "round-trip CT"),
    "error_map": ("error_map.nii.gz", "error map"),
}
"""Engine output key -> (file name in OUT_DIR, suffix of the node name)."""

ProgressCallback = Callable[[float, str], None]
"""``progressCallback(fraction, message)``: overall fraction in [0, 1] and a line for the user."""

_log = logging.getLogger(__name__)


@dataclass
class CT2MRTranslationResult:
    """What one translation added to the scene.

    Attributes:
        syntheticMR: synthetic MR G(x), normalised intensity in [-1, 1], on the input's voxel grid.
        roundTripCT: round-trip CT F(G(x)) in HU, on the input's voxel grid.
        errorMap: error map |F(G(x)) - x| in HU (>= 0), on the input's voxel grid.
        outputDir: folder that holds the engine's output files when an ``outputDirectory`` was given (kept);
            ``None`` when a temporary folder was used (removed after loading).
        log: every engine event of the run, in order (``start``, ``progress``, ``warning``, ``log``, ``done``).
        seconds: wall-clock time of the run (s).
        layoutId: ID of the compare layout that was set up, or ``None`` when it was not requested.
    """

    syntheticMR: slicer.vtkMRMLScalarVolumeNode
    roundTripCT: slicer.vtkMRMLScalarVolumeNode
    errorMap: slicer.vtkMRMLScalarVolumeNode
    outputDir: str | None = None
    log: list[EngineEvent] = field(default_factory=list)
    seconds: float = 0.0
    layoutId: int | None = None

    @property
    def volumeNodes(self) -> tuple[slicer.vtkMRMLScalarVolumeNode, ...]:
        """``(syntheticMR, roundTripCT, errorMap)``."""
        return (self.syntheticMR, self.roundTripCT, self.errorMap)


@dataclass
class CT2MRTranslationJob:
    """A translation running in the background.

    Call :meth:`update` regularly (the Widget does it from a ``QTimer``): it drains the engine's events, keeps the
    latest progress and calls the progress callback in the caller's thread. Then hand the job to
    :meth:`CT2MRTranslationLogic.finishTranslation` or :meth:`CT2MRTranslationLogic.cancel`.

    Attributes:
        inputVolumeNode: the CT volume node being translated.
        process: the running engine process.
        workDir: temporary folder holding the input file (and the outputs unless ``outputDir`` was given).
        outputDir: folder the engine writes to.
        keepOutputDir: ``outputDir`` was chosen by the caller and is kept after loading.
        progressCallback: optional ``progressCallback(fraction, message)``.
        setupLayout: set up the compare layout when the results are loaded.
        fraction: latest overall progress in [0, 1].
        message: latest progress or status message.
        log: every event received so far.
        doneEvent: the engine's ``done`` event once received.
        errorMessage: the engine's ``error`` message once received.
        startTime: ``time.monotonic()`` at start.
        state: ``"running"``, ``"finished"``, ``"failed"`` or ``"cancelled"``.
    """

    inputVolumeNode: slicer.vtkMRMLScalarVolumeNode
    process: TranslationProcessProtocol
    workDir: str
    outputDir: str
    keepOutputDir: bool = False
    progressCallback: ProgressCallback | None = None
    setupLayout: bool = True
    fraction: float = 0.0
    message: str = "Starting"
    log: list[EngineEvent] = field(default_factory=list)
    doneEvent: EngineEvent | None = None
    errorMessage: str | None = None
    startTime: float = field(default_factory=time.monotonic)
    state: str = "running"

    def update(self) -> bool:
        """Handle the events received since the last call.

        Returns:
            ``True`` once the engine process has ended and all its output is handled.
        """
        for event in self.process.events():
            self._handle(event)
        finished = self.process.poll() is not None
        if finished:
            for event in self.process.events():  # lines read between the two calls
                self._handle(event)
        return finished

    @property
    def isRunning(self) -> bool:
        """The engine process has not been finished or cancelled yet."""
        return self.state == "running"

    def _handle(self, event: EngineEvent) -> None:
        self.log.append(event)
        kind = event.get("event")
        if kind == "progress":
            try:
                self.fraction = min(max(float(event.get("fraction", self.fraction)), 0.0), 1.0)
            except (TypeError, ValueError):
                pass
            stage = event.get("stage")
            text = str(event.get("message") or "")
            self.message = f"{stage}: {text}" if stage and text else (text or str(stage or self.message))
            self._notify()
        elif kind == "start":
            self.message = f"Started on {event.get('device', 'unknown device')}"
            self._notify()
        elif kind == "warning":
            _log.warning("ct2mr: %s", event.get("message", ""))
        elif kind == "log":
            _log.info("ct2mr: %s", event.get("message", ""))
        elif kind == "done":
            self.doneEvent = event
            self.fraction = 1.0
            self.message = "Translation done, loading results"
            self._notify()
        elif kind == "error":
            self.errorMessage = str(event.get("message") or "unknown error")

    def _notify(self) -> None:
        if self.progressCallback is not None:
            self.progressCallback(self.fraction, self.message)


class CT2MRTranslationLogic(_LogicBase):
    """Translate CT volume nodes with the ``ct2mr`` engine. Can be used without the GUI widget.

    Args:
        pythonExecutable: interpreter that runs ``-m ct2mr``; ``None`` means ``PythonSlicer`` inside Slicer, else
            ``sys.executable`` (:func:`CT2MRTranslationLib.runner.defaultPythonExecutable`).

    Attributes:
        temporaryDirectory: parent folder of the per-run temporary folders; ``None`` means the system's.
            The Widget sets it to Slicer's temporary path.
    """

    def __init__(self, pythonExecutable: str | None = None) -> None:
        if _LogicBase is not object:
            _LogicBase.__init__(self)
        self.pythonExecutable = pythonExecutable
        self.temporaryDirectory: str | None = None

    # ------------------------------------------------------------------ synchronous

    def translate(
        self,
        inputVolumeNode: slicer.vtkMRMLScalarVolumeNode,
        modelPath: str | None = None,
        device: str = "auto",
        overlap: float | None = None,
        processFactory: ProcessFactory | None = None,
        progressCallback: ProgressCallback | None = None,
        outputDirectory: str | None = None,
        setupLayout: bool = True,
        extraArguments: Sequence[str] = (),
        timeout: float | None = None,
        pollInterval: float = 0.1,
    ) -> CT2MRTranslationResult:
        """Translate a CT volume and wait for the result.

        Args:
            inputVolumeNode: CT in HU (scalar volume node in a scene; arrays are (z, y, x)).
            modelPath: checkpoint file; ``None`` or ``""`` uses the engine's default model.
            device: one of :data:`DEVICES`, or ``"cuda:N"`` for GPU number N.
            overlap: sliding-window overlap in [0, 1); ``None`` uses the engine's default (0.5).
            processFactory: builds the process from the engine arguments; ``None`` runs ``python -m ct2mr``.
            progressCallback: ``progressCallback(fraction, message)``, called in this thread.
            outputDirectory: keep the engine's output files in this folder; ``None`` uses a temporary folder.
            setupLayout: show the results in the compare layout.
            extraArguments: further ``ct2mr translate`` options, e.g. ``["--roi-size", "96", "--precision", "fp32"]``.
            timeout: seconds after which the run is cancelled; ``None`` waits as long as it takes.
            pollInterval: seconds between progress checks.

        Returns:
            The three new volume nodes and the run's log.

        Raises:
            ValueError, FileNotFoundError: invalid arguments (see :meth:`startTranslation`).
            RuntimeError: the engine failed or timed out, or its outputs are not on the input's voxel grid; no node is
                added and the temporary files are removed.
        """
        job = self.startTranslation(
            inputVolumeNode, modelPath=modelPath, device=device, overlap=overlap, processFactory=processFactory,
            progressCallback=progressCallback, outputDirectory=outputDirectory, setupLayout=setupLayout,
            extraArguments=extraArguments,
        )
        deadline = None if timeout is None else time.monotonic() + timeout
        while not job.update():
            if deadline is not None and time.monotonic() > deadline:
                self.cancel(job)
                raise RuntimeError(
                    f"CT to MR translation did not finish within {timeout:g} s and was cancelled. Use a GPU "
                    "(device 'cuda'), a smaller overlap, or a longer timeout."
                )
            time.sleep(pollInterval)
        return self.finishTranslation(job)

    # ------------------------------------------------------------------ asynchronous

    def startTranslation(
        self,
        inputVolumeNode: slicer.vtkMRMLScalarVolumeNode,
        modelPath: str | None = None,
        device: str = "auto",
        overlap: float | None = None,
        processFactory: ProcessFactory | None = None,
        progressCallback: ProgressCallback | None = None,
        outputDirectory: str | None = None,
        setupLayout: bool = True,
        extraArguments: Sequence[str] = (),
    ) -> CT2MRTranslationJob:
        """Write the input to a temporary file and start the engine in the background.

        Args: as :meth:`translate`.

        Returns:
            The running job; poll it with :meth:`CT2MRTranslationJob.update`.

        Raises:
            ValueError: no input volume, a label map, a volume without image data or outside a scene; ``device``
                neither in :data:`DEVICES` nor ``"cuda:N"``; ``overlap`` outside [0, 1).
            FileNotFoundError: ``modelPath`` does not exist.
            RuntimeError: the input could not be written or the engine could not be started.
        """
        self._validateInput(inputVolumeNode)
        arguments = self._engineOptions(modelPath, device, overlap) + [str(a) for a in extraArguments]

        parent = self.temporaryDirectory
        if parent:
            os.makedirs(parent, exist_ok=True)
        workDir = tempfile.mkdtemp(prefix="CT2MR-", dir=parent or None)
        try:
            inputPath = nodes.writeVolumeNode(inputVolumeNode, os.path.join(workDir, "input.nrrd"))
            outputDir = os.path.abspath(outputDirectory) if outputDirectory else os.path.join(workDir, "output")
            os.makedirs(outputDir, exist_ok=True)
            engineArgs = ["translate", inputPath, "-o", outputDir, "--progress", "json", *arguments]
            factory = processFactory or self._defaultProcessFactory
            try:
                process = factory(engineArgs)
            except OSError as error:
                raise RuntimeError(
                    f"Could not start the CT to MR engine ({error}). Check that Python and the ct2mr package are "
                    "installed (pip install ct2mr, or the training/ folder of CT2MRTranslation)."
                ) from error
        except BaseException:
            shutil.rmtree(workDir, ignore_errors=True)
            raise
        _log.info("CT2MR translation started: %s", " ".join(engineArgs))
        job = CT2MRTranslationJob(
            inputVolumeNode=inputVolumeNode, process=process, workDir=workDir, outputDir=outputDir,
            keepOutputDir=bool(outputDirectory), progressCallback=progressCallback, setupLayout=setupLayout,
        )
        job._notify()
        return job

    def finishTranslation(self, job: CT2MRTranslationJob) -> CT2MRTranslationResult:
        """Wait for a job's engine process to end and load its outputs into the scene.

        On success the three volume nodes are named ``"<input> synthetic MR"``, ``"<input> round-trip CT"`` and
        ``"<input> error map"``, get the input's exact IJK-to-RAS matrix and parent transform, display settings
        (the input's window/level for the round-trip CT, a heat colour table for the error map), are placed beside
        the input in subject hierarchy and, if the job asks for it, shown in the compare layout.

        Args:
            job: a job from :meth:`startTranslation`.

        Returns:
            The result.

        Raises:
            RuntimeError: the job was cancelled, the engine failed (its message is included), or an output is not
                on the input's voxel grid. No node is added; the temporary folder is removed in every case.
        """
        if job.state != "running":
            raise RuntimeError(f"This translation job is {job.state}; start a new one.")
        try:
            job.process.wait()
            job.update()
            returnCode = job.process.returncode
            if returnCode != 0 or job.errorMessage is not None or job.doneEvent is None:
                raise RuntimeError(self._failureMessage(job, returnCode))
            outputNodes = self._loadOutputs(job)
            result = self._addToScene(job, outputNodes)
            job.state = "finished"
            return result
        except BaseException:
            job.state = "failed"
            if job.keepOutputDir:
                _log.info("CT2MR outputs kept in %s", job.outputDir)
            raise
        finally:
            shutil.rmtree(job.workDir, ignore_errors=True)

    def cancel(self, job: CT2MRTranslationJob) -> None:
        """Stop a running job, its engine process and every process it started, and remove its temporary files.

        Args:
            job: a job from :meth:`startTranslation`; finished or cancelled jobs are left as they are.
        """
        if job.state != "running":
            return
        try:
            job.process.cancel()
            job.update()
        finally:
            job.state = "cancelled"
            job.message = "Cancelled"
            shutil.rmtree(job.workDir, ignore_errors=True)

    # ------------------------------------------------------------------ label transfer

    @staticmethod
    def showSegmentationOver(segmentationNode, volumeNode) -> None:
        """Show the CT's segmentation over the synthetic MR in every view (:func:`export.showSegmentationOver`)."""
        export.showSegmentationOver(segmentationNode, volumeNode)

    @staticmethod
    def exportTrainingPair(syntheticMRNode, segmentationNode, outputFolder: str, caseId: str | None = None,
                           fmt: str = "nnunet") -> dict[str, str]:
        """Export (synthetic MR, segmentation) as an nnU-Net / MONAI training case (:func:`export.exportTrainingPair`)."""
        return export.exportTrainingPair(syntheticMRNode, segmentationNode, outputFolder, caseId, fmt)

    # ------------------------------------------------------------------ helpers

    def _defaultProcessFactory(self, engineArgs: Sequence[str]) -> TranslationProcess:
        return TranslationProcess(engineCommand(engineArgs, python=self.pythonExecutable))

    @staticmethod
    def _validateInput(inputVolumeNode: Any) -> None:
        if inputVolumeNode is None:
            raise ValueError("No input volume: select a CT volume.")
        if not inputVolumeNode.IsA("vtkMRMLScalarVolumeNode") or inputVolumeNode.IsA("vtkMRMLLabelMapVolumeNode"):
            raise ValueError(
                f"'{inputVolumeNode.GetName()}' is a {inputVolumeNode.GetClassName()}: select a scalar CT volume "
                "(HU), not a label map, segmentation or vector volume."
            )
        if inputVolumeNode.GetImageData() is None:
            raise ValueError(f"'{inputVolumeNode.GetName()}' has no image data: load the CT first.")
        if inputVolumeNode.GetScene() is None:
            raise ValueError(f"'{inputVolumeNode.GetName()}' is not in a scene: add it to the scene first.")

    @staticmethod
    def _engineOptions(modelPath: str | None, device: str, overlap: float | None) -> list[str]:
        if device not in DEVICES and not re.fullmatch(r"cuda:\d+", str(device)):
            raise ValueError(f"device must be one of {', '.join(DEVICES)} or cuda:N (GPU number N); got {device!r}.")
        options = ["--device", device]
        if modelPath:
            modelPath = os.path.abspath(os.path.expanduser(str(modelPath)))
            if not os.path.isfile(modelPath):
                raise FileNotFoundError(
                    f"Model file {modelPath} does not exist: choose a checkpoint file, or leave the path empty to use "
                    "the default model."
                )
            options += ["--model", modelPath]
        if overlap is not None:
            overlap = float(overlap)
            if not 0.0 <= overlap < 1.0:
                raise ValueError(
                    f"overlap must be in [0, 1) (fraction of the window shared by neighbours); got {overlap}."
                )
            options += ["--overlap", f"{overlap:g}"]
        return options

    @staticmethod
    def _failureMessage(job: CT2MRTranslationJob, returnCode: int | None) -> str:
        stderr = job.process.stderrTail.strip()
        if job.errorMessage is not None:
            message = job.errorMessage
        elif stderr:
            message = stderr.splitlines()[-1]
        elif returnCode == 0:
            message = "the engine ended without reporting its outputs (no 'done' event)"
        else:
            message = f"the engine exited with code {returnCode}"
        text = f"CT to MR translation failed: {message}"
        if "No module named" in stderr and "ct2mr" in stderr:
            text += (
                "\nThe ct2mr engine is not installed in the Python that runs it. Install it there "
                "(PythonSlicer -m pip install ct2mr, or pip install the training/ folder of CT2MRTranslation)."
            )
        if stderr and job.errorMessage is None:
            text += f"\n\nEngine output (stderr, last lines):\n{stderr}"
        return text

    def _loadOutputs(self, job: CT2MRTranslationJob) -> dict[str, slicer.vtkMRMLScalarVolumeNode]:
        inputNode = job.inputVolumeNode
        reported = (job.doneEvent or {}).get("outputs") or {}
        loaded = {}
        for key, (fileName, suffix) in OUTPUT_KEYS.items():
            path = reported.get(key) or os.path.join(job.outputDir, fileName)
            if not os.path.isabs(path):
                path = os.path.join(job.outputDir, path)
            if not os.path.isfile(path):
                raise RuntimeError(
                    f"The engine reported success but its {suffix} file {path} does not exist. Update the ct2mr "
                    "engine, or report this with the engine output."
                )
            node = nodes.readVolumeNode(path, f"{inputNode.GetName()} {suffix}")
            nodes.assertSameGeometry(node, inputNode, snap=True)
            loaded[key] = node
        return loaded

    def _addToScene(
        self, job: CT2MRTranslationJob, outputNodes: dict[str, slicer.vtkMRMLScalarVolumeNode]
    ) -> CT2MRTranslationResult:
        inputNode = job.inputVolumeNode
        scene = inputNode.GetScene()
        transformNodeID = inputNode.GetTransformNodeID()
        added = []
        try:
            for node in outputNodes.values():
                added.append(scene.AddNode(node))
                node.SetAndObserveTransformNodeID(transformNodeID)
                nodes.placeNextTo(node, inputNode)
            syntheticMR, roundTripCT, errorMap = (outputNodes[key] for key in OUTPUT_KEYS)
            self._setDisplay(inputNode, syntheticMR, roundTripCT, errorMap)
            layoutId = None
            if job.setupLayout:
                layoutId = views.setupCompareLayout(scene, [inputNode, syntheticMR, roundTripCT, errorMap])
        except BaseException:
            for node in added:
                scene.RemoveNode(node)
            raise
        return CT2MRTranslationResult(
            syntheticMR=syntheticMR,
            roundTripCT=roundTripCT,
            errorMap=errorMap,
            outputDir=job.outputDir if job.keepOutputDir else None,
            log=list(job.log),
            seconds=time.monotonic() - job.startTime,
            layoutId=layoutId,
        )

    @staticmethod
    def _setDisplay(inputNode, syntheticMR, roundTripCT, errorMap) -> None:
        scene = inputNode.GetScene()
        window, level = nodes.robustWindowLevel(syntheticMR, 0.5, 99.5)
        nodes.setVolumeDisplay(syntheticMR, window, level)
        # Same window/level as the input, so that x and F(G(x)) look alike where the round trip is faithful.
        inputDisplay = inputNode.GetDisplayNode()
        if inputDisplay is not None and inputDisplay.IsA("vtkMRMLScalarVolumeDisplayNode"):
            window, level = inputDisplay.GetWindow(), inputDisplay.GetLevel()
        else:
            window, level = nodes.robustWindowLevel(inputNode)
        nodes.setVolumeDisplay(roundTripCT, window, level)
        # Error map from 0 HU (black) to its 99th percentile (bright).
        high = max(nodes.volumePercentiles(errorMap, [99.0])[0], 1.0)
        nodes.setVolumeDisplay(errorMap, high, high / 2.0, nodes.findColorNodeID(scene))
