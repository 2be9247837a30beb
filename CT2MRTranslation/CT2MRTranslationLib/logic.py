"""CT2MRTranslationLogic: translate a CT volume node into a synthetic MR, a round-trip CT and an error map.

The Logic writes the input node to a temporary NRRD file, runs the engine (``python -m ct2mr translate ...
--progress json``) as a background process (:mod:`CT2MRTranslationLib.runner`), and loads its three outputs back
as volume nodes on the input's voxel grid (:mod:`CT2MRTranslationLib.nodes`), beside the input in subject
hierarchy, shown in the compare layout (:mod:`CT2MRTranslationLib.views`):

- synthetic MR ``G(x)``: normalised MR intensity in [-1, 1];
- round-trip CT ``F(G(x))``: HU;
- error map ``|F(G(x)) - x|``: HU, >= 0 (thesis, section 7, cycle-consistency analysis);
- with the warp check (``warpCheck``, ``ct2mr translate --warp-check``), a displacement map: the magnitude (mm) of
  a deformable registration of x to G(x) (B-spline, Mattes MI), which is ~0 where G moved no anatomy (thesis
  section 5, property P1, evaluation E2), with its mean/p95 in the engine's ``anatomy.json``.

On request it adds the histogram plot and the cycle metrics table (:mod:`CT2MRTranslationLib.plots`). When the GPU
runs out of memory, the run is retried with one window per forward pass and a smaller window, then reported. When
CUDA is asked for but missing, the engine runs on the CPU and the result says so. Several CT volumes (or the items
of a sequence) are translated one after another by :class:`CT2MRTranslationBatch`. Models come from the engine's
model list (:mod:`ct2mr.registry`): bundled, downloaded into the user cache (in a background process) or imported.

The Logic never touches Qt or ``slicer.app`` (DESIGN.md): it runs in Slicer and in plain Python with the
``slicer-core`` wheel ("Can be used without GUI widget"). The Widget uses :meth:`startBatch` (or
:meth:`startTranslation`) and ``update()`` from a timer; scripts use :meth:`translate` and :meth:`translateBatch`.
"""

from __future__ import annotations

import glob
import json
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
import vtk

from . import export, install, nodes, plots, views
from .parameters import CT2MRTranslationParameters, HARMONIZATIONS, PRECISIONS
from .runner import (
    EngineEvent,
    ProcessFactory,
    TranslationProcess,
    TranslationProcessProtocol,
    deviceQueryCommand,
    engineCommand,
)

try:  # In Slicer; absent from the slicer-core wheel.
    from slicer.ScriptedLoadableModule import ScriptedLoadableModuleLogic as _LogicBase
except ImportError:  # pragma: no cover - depends on the environment
    _LogicBase = object

__all__ = [
    "ANATOMY_FILE",
    "DEFAULT_ROI_SIZE",
    "DEVICES",
    "DISPLACEMENT_OUTPUT",
    "MIN_ROI_SIZE",
    "OUTPUT_KEYS",
    "CT2MRModelDownloadJob",
    "CT2MRTranslationBatch",
    "CT2MRTranslationJob",
    "CT2MRTranslationLogic",
    "CT2MRTranslationResult",
    "ProgressCallback",
    "isOutOfMemoryMessage",
    "smallerRoiSize",
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

DISPLACEMENT_OUTPUT = ("displacement_mm", "displacement_mm.nii.gz", "displacement (mm)")
"""The warp check's output: (engine output key, file name in OUT_DIR, suffix of the node name). Its companion
``anatomy.json`` in OUT_DIR (also the ``done`` event's ``anatomy``) holds the anatomy metrics
(``edge_correlation``, ``gradient_magnitude_similarity``, ``gmsd``, ``nmi``, ``displacement_mean_mm``,
``displacement_p95_mm``, ``displacement_max_mm``)."""

ANATOMY_FILE = "anatomy.json"
"""The warp check's anatomy metrics in OUT_DIR (JSON object; see :data:`DISPLACEMENT_OUTPUT`)."""

DISPLACEMENT_COLOR_NODE_NAMES = ("ColdToHotRainbow", "Inferno", "PET-Heat", "Red")
"""Colour tables tried, in order, for the displacement map (blue: no displacement, red: large)."""

MIN_DISPLACEMENT_WINDOW_MM = 1.0
"""The displacement map is shown from 0 to max(its p95, this) mm, so that sub-millimetre registration noise of a
faithful translation stays dark."""

DEFAULT_ROI_SIZE = 96
"""Window side (voxels) the engine uses when neither the user nor the model gives one (``ct2mr.inference``)."""

MIN_ROI_SIZE = 32
"""Smallest window side (voxels) an out-of-memory retry goes down to."""

ProgressCallback = Callable[[float, str], None]
"""``progressCallback(fraction, message)``: overall fraction in [0, 1] and a line for the user."""

_log = logging.getLogger(__name__)


def isOutOfMemoryMessage(text: str | None) -> bool:
    """True when an engine error or stderr text reports that the device ran out of memory."""
    text = (text or "").lower()
    return "out of memory" in text or "outofmemoryerror" in text


def smallerRoiSize(roiSize: int | None) -> int | None:
    """The window side for the next out-of-memory retry: two thirds, down to a multiple of 16, at least
    :data:`MIN_ROI_SIZE`; ``None`` when the window cannot shrink further.

    Args:
        roiSize: the current side in voxels; ``None`` means the engine's default (:data:`DEFAULT_ROI_SIZE`).
    """
    current = int(roiSize or DEFAULT_ROI_SIZE)
    smaller = max(MIN_ROI_SIZE, (current * 2 // 3) // 16 * 16)
    return smaller if smaller < current else None


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
        device: the device the engine ran on (``"cpu"``, ``"cuda:0"``, ...), from its ``done`` event.
        deviceMessage: why the device differs from the one asked for (CUDA missing), else ``""``.
        attempts: engine runs needed (more than 1 after out-of-memory retries).
        retryMessages: one line per out-of-memory retry.
        analysis: histogram chart and metrics table when requested (:class:`plots.AnalysisNodes`), else ``None``.
        displacementMap: with the warp check, the displacement magnitude (mm, >= 0) of the registration of x to
            G(x), on the input's voxel grid; else ``None``.
        anatomy: the engine's anatomy metrics (``anatomy.json`` / the ``done`` event) when the warp check ran,
            else ``{}``.
    """

    syntheticMR: slicer.vtkMRMLScalarVolumeNode
    roundTripCT: slicer.vtkMRMLScalarVolumeNode
    errorMap: slicer.vtkMRMLScalarVolumeNode
    outputDir: str | None = None
    log: list[EngineEvent] = field(default_factory=list)
    seconds: float = 0.0
    layoutId: int | None = None
    device: str = ""
    deviceMessage: str = ""
    attempts: int = 1
    retryMessages: list[str] = field(default_factory=list)
    analysis: plots.AnalysisNodes | None = None
    displacementMap: slicer.vtkMRMLScalarVolumeNode | None = None
    anatomy: dict[str, Any] = field(default_factory=dict)

    @property
    def volumeNodes(self) -> tuple[slicer.vtkMRMLScalarVolumeNode, ...]:
        """``(syntheticMR, roundTripCT, errorMap)``: the compare layout's outputs."""
        return (self.syntheticMR, self.roundTripCT, self.errorMap)

    @property
    def outputVolumeNodes(self) -> tuple[slicer.vtkMRMLScalarVolumeNode, ...]:
        """:attr:`volumeNodes` and, with the warp check, the displacement map."""
        return (*self.volumeNodes, *((self.displacementMap,) if self.displacementMap is not None else ()))

    @property
    def nodes(self) -> list[slicer.vtkMRMLNode]:
        """Every node the translation added (volumes, and the analysis' tables, chart and series)."""
        return [*self.outputVolumeNodes, *(self.analysis.nodes if self.analysis else [])]


@dataclass
class CT2MRTranslationJob:
    """A translation running in the background.

    Call :meth:`update` regularly (the Widget does it from a ``QTimer``): it drains the engine's events, keeps the
    latest progress, calls the progress callback in the caller's thread and restarts the engine with smaller
    windows after an out-of-memory failure. Then hand the job to :meth:`CT2MRTranslationLogic.finishTranslation` or
    :meth:`CT2MRTranslationLogic.cancel`.

    Attributes:
        inputVolumeNode: the CT volume node being translated.
        process: the running engine process (replaced by a retry).
        workDir: temporary folder holding the input file (and the outputs unless ``outputDir`` was given).
        outputDir: folder the engine writes to.
        keepOutputDir: ``outputDir`` was chosen by the caller and is kept after loading.
        progressCallback: optional ``progressCallback(fraction, message)``.
        setupLayout: set up the compare layout when the results are loaded.
        fraction: latest overall progress in [0, 1].
        message: latest progress or status message.
        log: every event received so far (all attempts).
        doneEvent: the engine's ``done`` event once received.
        errorMessage: the engine's ``error`` message once received.
        startTime: ``time.monotonic()`` at start.
        state: ``"running"``, ``"finished"``, ``"failed"`` or ``"cancelled"``.
        options: the engine options of the current attempt (see :meth:`CT2MRTranslationLogic.engineOptions`).
        baseArguments: ``["translate", INPUT, "-o", OUT_DIR, "--progress", "json"]``.
        processFactory: builds the engine process from its arguments (used again by retries).
        oomRetries: how many out-of-memory retries are left.
        attempts: engine runs started so far.
        retryMessages: one line per out-of-memory retry.
        deviceMessage: the engine's CUDA fallback warning, if any.
        referenceMRNode: reference MR (harmonisation, histogram, W1).
        computeMetrics: add the histogram chart and metrics table when the results are loaded.
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
    options: dict[str, Any] = field(default_factory=dict)
    baseArguments: list[str] = field(default_factory=list)
    processFactory: ProcessFactory | None = None
    oomRetries: int = 0
    attempts: int = 1
    retryMessages: list[str] = field(default_factory=list)
    deviceMessage: str = ""
    referenceMRNode: slicer.vtkMRMLScalarVolumeNode | None = None
    computeMetrics: bool = False

    def update(self) -> bool:
        """Handle the events received since the last call; retry after an out-of-memory failure.

        Returns:
            ``True`` once the engine process has ended (and will not be retried) and all its output is handled.
        """
        for event in self.process.events():
            self._handle(event)
        finished = self.process.poll() is not None
        if finished:
            for event in self.process.events():  # lines read between the two calls
                self._handle(event)
            if self._retryAfterOutOfMemory():
                return False
        return finished

    @property
    def isRunning(self) -> bool:
        """The engine process has not been finished or cancelled yet."""
        return self.state == "running"

    @property
    def engineArguments(self) -> list[str]:
        """The full engine argument list of the current attempt."""
        return [*self.baseArguments, *CT2MRTranslationLogic.engineOptions(**self.options)]

    def _retryAfterOutOfMemory(self) -> bool:
        if self.state != "running" or self.oomRetries <= 0 or self.processFactory is None:
            return False
        if self.process.returncode == 0 and self.errorMessage is None:
            return False
        if not isOutOfMemoryMessage(self.errorMessage) and not isOutOfMemoryMessage(self.process.stderrTail):
            return False
        roiSize = smallerRoiSize(self.options.get("roiSize"))
        if roiSize is None and self.options.get("swBatchSize") in (None, 1):
            return False
        self.oomRetries -= 1
        if roiSize is not None:
            self.options["roiSize"] = roiSize
        self.options["swBatchSize"] = 1
        text = (f"Out of memory on the device (attempt {self.attempts}); retrying with 1 window per pass"
                + (f" and a {roiSize}-voxel window" if roiSize is not None else "") + ".")
        self.retryMessages.append(text)
        self.log.append({"event": "warning", "message": text, "retry": self.attempts})
        _log.warning("ct2mr: %s", text)
        self.errorMessage, self.doneEvent = None, None
        self.attempts += 1
        self.process = self.processFactory(self.engineArguments)
        self.message = text
        self._notify()
        return True

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
            message = str(event.get("message", ""))
            if "cuda" in message.lower() and "not available" in message.lower():
                self.deviceMessage = message
            _log.warning("ct2mr: %s", message)
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


@dataclass
class _BatchItem:
    label: str
    inputNode: Any = None
    sequenceNode: Any = None
    itemIndex: int = -1


class CT2MRTranslationBatch:
    """Several translations run one after another (the Widget's Translate, scripts' :meth:`translateBatch`).

    Inputs are scalar volume nodes and sequence nodes (each item of a sequence is one translation; its outputs go
    into three new sequences ``"<sequence> synthetic MR"`` etc., a fourth ``"<sequence> displacement (mm)"`` with
    the warp check, with the same index values, placed next to the input sequence and added to the browsers that
    show it). Overall progress is ``(i + fraction of item i) / n``.
    A failed item is recorded and the batch goes on (unless ``stopOnError``); :meth:`cancel` stops the running
    engine and skips the rest: the finished items stay, the running one leaves no node or file, partly filled
    output sequences are removed.

    Args:
        logic: the Logic.
        inputNodes: scalar volume nodes and/or sequence nodes of scalar volumes.
        progressCallback: ``progressCallback(fraction, message)`` with the overall fraction.
        stopOnError: stop at the first failed item.
        options: keyword arguments of :meth:`CT2MRTranslationLogic.startTranslation`.

    Attributes:
        results: one result per finished volume item (sequence items are moved into the output sequences).
        failures: ``(label, message)`` per failed item.
        events: ``(label, event)`` for every engine event of every item, in order (for a log view).
        outputSequences: input sequence ID -> ``(synthetic MR, round-trip CT, error map[, displacement (mm)])``
            sequence nodes.
        state: ``"running"``, ``"finished"`` or ``"cancelled"``.

    Raises:
        ValueError: no input, or an input that is neither a scalar volume nor a sequence.
    """

    def __init__(self, logic: CT2MRTranslationLogic, inputNodes: Sequence[Any],
                 progressCallback: ProgressCallback | None = None, stopOnError: bool = False, **options: Any) -> None:
        self.logic = logic
        self.progressCallback = progressCallback
        self.stopOnError = stopOnError
        self.options = options
        self.items: list[_BatchItem] = []
        for node in inputNodes or ():
            if node is not None and node.IsA("vtkMRMLSequenceNode"):
                for index in range(node.GetNumberOfDataNodes()):
                    value = node.GetNthIndexValue(index)
                    self.items.append(_BatchItem(f"{node.GetName()} [{value}]", None, node, index))
            else:
                CT2MRTranslationLogic._validateInput(node)
                self.items.append(_BatchItem(node.GetName(), node))
        if not self.items:
            raise ValueError("No input: select at least one CT volume or a sequence of CT volumes.")
        self.results: list[CT2MRTranslationResult] = []
        self.failures: list[tuple[str, str]] = []
        self.events: list[tuple[str, EngineEvent]] = []
        self._collected = 0
        self.outputSequences: dict[str, tuple[Any, ...]] = {}
        self.index = 0
        self.job: CT2MRTranslationJob | None = None
        self.state = "running"
        self.message = "Starting"
        self._temporaryInput = None
        self.startTime = time.monotonic()

    @property
    def count(self) -> int:
        """Number of translations in the batch (sequence items counted one by one)."""
        return len(self.items)

    @property
    def fraction(self) -> float:
        """Overall progress ``(finished items + fraction of the running one) / count``."""
        current = self.job.fraction if self.job is not None else 0.0
        return min(1.0, (self.index + current) / self.count)

    @property
    def isRunning(self) -> bool:
        """Items are left and the batch was not cancelled."""
        return self.state == "running"

    def _notify(self, message: str, final: bool = False) -> None:
        prefix = f"[{min(self.index + 1, self.count)}/{self.count}] " if self.count > 1 and not final else ""
        self.message = prefix + message
        if self.progressCallback is not None:
            self.progressCallback(self.fraction, self.message)

    def _inputFor(self, item: _BatchItem):
        if item.sequenceNode is None:
            return item.inputNode
        dataNode = item.sequenceNode.GetNthDataNode(item.itemIndex)
        if dataNode is None or not dataNode.IsA("vtkMRMLScalarVolumeNode") or dataNode.GetImageData() is None:
            raise ValueError(f"{item.label} is not a scalar volume with image data.")
        scene = item.sequenceNode.GetScene()
        node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", item.label)
        matrix = vtk.vtkMatrix4x4()
        dataNode.GetIJKToRASMatrix(matrix)
        node.SetIJKToRASMatrix(matrix)
        node.SetAndObserveImageData(dataNode.GetImageData())
        self._temporaryInput = node
        return node

    def _removeTemporaryInput(self) -> None:
        node, self._temporaryInput = self._temporaryInput, None
        if node is not None and node.GetScene() is not None:
            node.GetScene().RemoveNode(node)

    def start(self) -> CT2MRTranslationBatch:
        """Start the first translation (``update`` does it too). Returns ``self``."""
        if self.job is None and self.isRunning:
            self._startNext()
        return self

    def _startNext(self) -> None:
        while self.index < self.count:
            item = self.items[self.index]
            try:
                inputNode = self._inputFor(item)
                options = dict(self.options)
                if item.sequenceNode is not None:  # no per-item layout or analysis for sequence items
                    options.update(setupLayout=False, computeMetrics=False)
                self._collected = 0
                self.job = self.logic.startTranslation(
                    inputNode, progressCallback=lambda fraction, message: self._notify(message), **options)
                return
            except Exception as error:  # noqa: BLE001 - recorded, reported by the caller
                self._removeTemporaryInput()
                self._recordFailure(item, error)
                if not self.isRunning:
                    return
                self.index += 1
        self._finish()

    def _collectEvents(self, item: _BatchItem, job: CT2MRTranslationJob | None) -> None:
        if job is not None:
            self.events += [(item.label, event) for event in job.log[self._collected:]]
            self._collected = len(job.log)

    def _recordFailure(self, item: _BatchItem, error: BaseException) -> None:
        _log.error("CT2MR batch: %s failed: %s", item.label, error)
        self.failures.append((item.label, str(error)))
        self.events.append((item.label, {"event": "error", "message": str(error)}))
        if self.stopOnError:
            self.state = "failed"
            self._removePartialSequences()

    def update(self) -> bool:
        """Drive the running translation; load it when it ends and start the next one.

        Returns:
            ``True`` once every item is done (or the batch was cancelled or stopped at an error).
        """
        if not self.isRunning:
            return True
        if self.job is None:
            self._startNext()
            return not self.isRunning
        item = self.items[self.index]
        finished = self.job.update()
        self._collectEvents(item, self.job)
        if not finished:
            return False
        job, self.job = self.job, None
        try:
            result = self.logic.finishTranslation(job)
        except Exception as error:  # noqa: BLE001 - recorded, reported by the caller
            self._removeTemporaryInput()
            self._recordFailure(item, error)
            if not self.isRunning:
                return True
        else:
            if item.sequenceNode is not None:
                self._storeSequenceItem(item, result)
            else:
                self.results.append(result)
        self._removeTemporaryInput()
        self.index += 1
        self._startNext()
        return not self.isRunning

    def _storeSequenceItem(self, item: _BatchItem, result: CT2MRTranslationResult) -> None:
        sequence = item.sequenceNode
        scene = sequence.GetScene()
        outputs = self.outputSequences.get(sequence.GetID())
        if outputs is None:
            created = []
            suffixes = [suffix for _, suffix in OUTPUT_KEYS.values()]
            if result.displacementMap is not None:
                suffixes.append(DISPLACEMENT_OUTPUT[2])
            for suffix in suffixes:
                output = scene.AddNewNodeByClass("vtkMRMLSequenceNode", f"{sequence.GetName()} {suffix}")
                output.SetIndexName(sequence.GetIndexName())
                output.SetIndexUnit(sequence.GetIndexUnit())
                output.SetIndexType(sequence.GetIndexType())
                created.append(output)
            outputs = self.outputSequences[sequence.GetID()] = tuple(created)
        value = sequence.GetNthIndexValue(item.itemIndex)
        for output, node in zip(outputs, result.outputVolumeNodes):
            output.SetDataNodeAtValue(node, value)  # a copy: the scene's node is removed below
        for node in result.nodes:
            for index in range(node.GetNumberOfDisplayNodes()) if node.IsA("vtkMRMLDisplayableNode") else ():
                display = node.GetNthDisplayNode(index)
                if display is not None:
                    scene.RemoveNode(display)
            scene.RemoveNode(node)

    def _finishSequences(self) -> None:
        for sequenceID, outputs in self.outputSequences.items():
            sequence = outputs[0].GetScene().GetNodeByID(sequenceID)
            if sequence is None:
                continue
            for output in outputs:
                nodes.placeNextTo(output, sequence)
            scene = sequence.GetScene()
            for browser in scene.GetNodesByClass("vtkMRMLSequenceBrowserNode"):
                if browser.IsSynchronizedSequenceNodeID(sequenceID, True):
                    for output in outputs:
                        browser.AddSynchronizedSequenceNodeID(output.GetID())

    def _removePartialSequences(self) -> None:
        for outputs in self.outputSequences.values():
            for output in outputs:
                if output.GetScene() is not None:
                    output.GetScene().RemoveNode(output)
        self.outputSequences.clear()

    def _finish(self) -> None:
        self.job = None
        self.state = "finished"
        self._finishSequences()
        done = self.count - len(self.failures)
        self._notify(f"Done: {done} of {self.count} translated in {time.monotonic() - self.startTime:.1f} s"
                     + (f"; {len(self.failures)} failed" if self.failures else "") + ".", final=True)

    def cancel(self) -> None:
        """Stop the running engine (no partial node or file is left) and skip the remaining items."""
        if not self.isRunning:
            return
        job, self.job = self.job, None
        if job is not None:
            self.logic.cancel(job)
        self._removeTemporaryInput()
        self._removePartialSequences()
        self.state = "cancelled"
        self._notify(f"Cancelled after {len(self.results)} of {self.count}.", final=True)

    def run(self, pollInterval: float = 0.1, shouldCancel: Callable[[], bool] | None = None,
            timeout: float | None = None) -> CT2MRTranslationBatch:
        """Run the whole batch in this thread.

        Args:
            pollInterval: seconds between progress checks.
            shouldCancel: called at each check; when it returns ``True`` the batch is cancelled.
            timeout: seconds after which the batch is cancelled; ``None`` waits as long as it takes.

        Returns:
            ``self`` (see ``results``, ``failures``, ``state``).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        self.start()
        while not self.update():
            if (shouldCancel is not None and shouldCancel()) or (deadline is not None and time.monotonic() > deadline):
                self.cancel()
                break
            time.sleep(pollInterval)
        return self


@dataclass
class CT2MRModelDownloadJob:
    """A model download running in the background (``python -m ct2mr models download NAME --progress json``).

    Attributes:
        name: model name.
        version: model version (``None``: the newest listed).
        process: the engine process.
        progressCallback: ``progressCallback(fraction, message)``.
        fraction: latest progress in [0, 1].
        message: latest message.
        path: the downloaded file, once done.
        errorMessage: the engine's error, if any.
        state: ``"running"``, ``"finished"``, ``"failed"`` or ``"cancelled"``.
        log: every event.
    """

    name: str
    version: str | None
    process: TranslationProcessProtocol
    progressCallback: ProgressCallback | None = None
    fraction: float = 0.0
    message: str = "Starting the download"
    path: str | None = None
    errorMessage: str | None = None
    state: str = "running"
    log: list[EngineEvent] = field(default_factory=list)

    def update(self) -> bool:
        """Handle new events; ``True`` once the process has ended."""
        finished = self.process.poll() is not None
        for event in self.process.events():
            self.log.append(event)
            kind = event.get("event")
            if kind == "progress":
                self.fraction = min(max(float(event.get("fraction") or 0.0), 0.0), 1.0)
                self.message = f"Downloading {self.name}: {event.get('message', '')}"
            elif kind == "start" and event.get("version"):
                self.version = str(event["version"])
            elif kind == "done":
                self.path, self.fraction, self.message = event.get("path"), 1.0, f"Downloaded {self.name}"
            elif kind == "error":
                self.errorMessage = str(event.get("message") or "unknown error")
            if self.progressCallback is not None and kind in ("progress", "done"):
                self.progressCallback(self.fraction, self.message)
        return finished


class CT2MRTranslationLogic(_LogicBase):
    """Translate CT volume nodes with the ``ct2mr`` engine. Can be used without the GUI widget.

    Args:
        pythonExecutable: interpreter that runs ``-m ct2mr``; ``None`` means ``PythonSlicer`` inside Slicer, else
            ``sys.executable`` (:func:`CT2MRTranslationLib.runner.defaultPythonExecutable`).

    Attributes:
        temporaryDirectory: parent folder of the per-run temporary folders; ``None`` means the system's.
            The Widget sets it to Slicer's temporary path.
        registryFiles: extra model lists (besides the engine's own and ``$CT2MR_MODEL_REGISTRY``).
    """

    def __init__(self, pythonExecutable: str | None = None) -> None:
        if _LogicBase is not object:
            _LogicBase.__init__(self)
        self.pythonExecutable = pythonExecutable
        self.temporaryDirectory: str | None = None
        self.registryFiles: list[str] = []

    # ------------------------------------------------------------------ parameters

    @staticmethod
    def getParameters(scene: slicer.vtkMRMLScene | None = None) -> CT2MRTranslationParameters:
        """The module's parameters of ``scene`` (default ``slicer.mrmlScene``), saved with the scene."""
        return CT2MRTranslationParameters.get(scene or slicer.mrmlScene)

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
        roiSize: int | None = None,
        swBatchSize: int | None = None,
        precision: str | None = None,
        harmonize: str | None = None,
        referenceMRNode: slicer.vtkMRMLScalarVolumeNode | None = None,
        computeMetrics: bool = False,
        oomRetries: int = 2,
        warpCheck: bool = False,
    ) -> CT2MRTranslationResult:
        """Translate a CT volume and wait for the result.

        Args:
            inputVolumeNode: CT in HU (scalar volume node in a scene; arrays are (z, y, x)).
            modelPath: checkpoint file; ``None`` or ``""`` uses the engine's default model (see :meth:`modelPath`
                for models of the list).
            device: one of :data:`DEVICES`, or ``"cuda:N"`` for GPU number N. Without CUDA the engine runs on the
                CPU and ``result.deviceMessage`` says so.
            overlap: sliding-window overlap in [0, 1); ``None`` uses the engine's default (0.25).
            processFactory: builds the process from the engine arguments; ``None`` runs ``python -m ct2mr``.
            progressCallback: ``progressCallback(fraction, message)``, called in this thread.
            outputDirectory: keep the engine's output files in this folder; ``None`` uses a temporary folder.
            setupLayout: show the results in the compare layout.
            extraArguments: further ``ct2mr translate`` options.
            timeout: seconds after which the run is cancelled; ``None`` waits as long as it takes.
            pollInterval: seconds between progress checks.
            roiSize: sliding-window side in voxels (multiple of 4); ``None``: the model's default.
            swBatchSize: windows per forward pass; ``None``: the engine chooses (from the free GPU memory; 1 on CPU).
            precision: one of :data:`parameters.PRECISIONS`; ``None``: the engine's default (auto).
            harmonize: one of :data:`parameters.HARMONIZATIONS`; ``None`` or ``"none"``: no harmonisation.
            referenceMRNode: reference MR volume: passed to the engine for harmonisation, and used for the
                histogram and W1 when ``computeMetrics``.
            computeMetrics: add the histogram plot and the metrics table (:mod:`plots`): cycle metrics, anatomy
                metrics (edge correlation, GMS, NMI of x and G(x)) and, with ``warpCheck``, the displacement.
            oomRetries: out-of-memory retries with 1 window per pass and a smaller window (0: none).
            warpCheck: also run the engine's warp check (``--warp-check``): a deformable registration of x to
                G(x) whose displacement magnitude (mm) becomes ``result.displacementMap`` and whose statistics
                become ``result.anatomy`` (thesis section 5, P1/E2). Adds the registration's time to the run.

        Returns:
            The new nodes and the run's log.

        Raises:
            ValueError, FileNotFoundError: invalid arguments (see :meth:`startTranslation`).
            RuntimeError: the engine failed (also after the out-of-memory retries) or timed out, or its outputs are
                not on the input's voxel grid; no node is added and the temporary files are removed.
        """
        job = self.startTranslation(
            inputVolumeNode, modelPath=modelPath, device=device, overlap=overlap, processFactory=processFactory,
            progressCallback=progressCallback, outputDirectory=outputDirectory, setupLayout=setupLayout,
            extraArguments=extraArguments, roiSize=roiSize, swBatchSize=swBatchSize, precision=precision,
            harmonize=harmonize, referenceMRNode=referenceMRNode, computeMetrics=computeMetrics, oomRetries=oomRetries,
            warpCheck=warpCheck,
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

    def translateBatch(
        self,
        inputNodes: Sequence[Any],
        progressCallback: ProgressCallback | None = None,
        shouldCancel: Callable[[], bool] | None = None,
        stopOnError: bool = False,
        pollInterval: float = 0.1,
        timeout: float | None = None,
        **options: Any,
    ) -> CT2MRTranslationBatch:
        """Translate several CT volumes (or the items of sequences) one after another, and wait.

        Args:
            inputNodes: scalar volume nodes and/or sequence nodes.
            progressCallback: ``progressCallback(fraction, message)`` with the overall fraction ``(i + f) / n``.
            shouldCancel: polled; returning ``True`` cancels the running translation and skips the rest.
            stopOnError: stop at the first failure (else failures are recorded and the batch goes on).
            pollInterval: seconds between progress checks.
            timeout: seconds after which the batch is cancelled.
            options: keyword arguments of :meth:`translate` (``modelPath``, ``device``, ``overlap``, ...).

        Returns:
            The finished (or cancelled) batch: ``results``, ``failures``, ``outputSequences``, ``state``.

        Raises:
            ValueError: no input, or an input that is not a scalar volume or a sequence.
        """
        batch = CT2MRTranslationBatch(self, inputNodes, progressCallback, stopOnError, **options)
        return batch.run(pollInterval, shouldCancel, timeout)

    # ------------------------------------------------------------------ asynchronous

    def startBatch(self, inputNodes: Sequence[Any], progressCallback: ProgressCallback | None = None,
                   stopOnError: bool = False, **options: Any) -> CT2MRTranslationBatch:
        """Start a batch in the background; drive it with :meth:`CT2MRTranslationBatch.update` from a timer.

        Args: as :meth:`translateBatch`.

        Returns:
            The running batch (its first translation started).
        """
        return CT2MRTranslationBatch(self, inputNodes, progressCallback, stopOnError, **options).start()

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
        roiSize: int | None = None,
        swBatchSize: int | None = None,
        precision: str | None = None,
        harmonize: str | None = None,
        referenceMRNode: slicer.vtkMRMLScalarVolumeNode | None = None,
        computeMetrics: bool = False,
        oomRetries: int = 2,
        warpCheck: bool = False,
    ) -> CT2MRTranslationJob:
        """Write the input (and reference MR) to temporary files and start the engine in the background.

        Args: as :meth:`translate`.

        Returns:
            The running job; poll it with :meth:`CT2MRTranslationJob.update`.

        Raises:
            ValueError: no input volume, a label map, a volume without image data or outside a scene; ``device``
                neither in :data:`DEVICES` nor ``"cuda:N"``; ``overlap`` outside [0, 1); ``roiSize`` not a multiple
                of 4 in [16, 512]; ``swBatchSize`` < 1; unknown ``precision`` or ``harmonize``; histogram or Nyul
                harmonisation without a reference MR.
            FileNotFoundError: ``modelPath`` does not exist.
            RuntimeError: the input could not be written or the engine could not be started.
        """
        self._validateInput(inputVolumeNode)
        if referenceMRNode is not None:
            self._validateInput(referenceMRNode, "reference MR")
        if harmonize in ("histogram", "nyul") and referenceMRNode is None:
            raise ValueError(f"Harmonisation '{harmonize}' needs a reference MR: select one, or choose 'none' or "
                             "'zscore'.")
        options = {"modelPath": modelPath, "device": device, "overlap": overlap, "roiSize": roiSize,
                   "swBatchSize": swBatchSize, "precision": precision, "harmonize": harmonize,
                   "referencePath": None, "warpCheck": bool(warpCheck),
                   "extraArguments": [str(a) for a in extraArguments]}
        self.engineOptions(**options)  # validates before anything is written

        parent = self.temporaryDirectory
        if parent:
            os.makedirs(parent, exist_ok=True)
        workDir = tempfile.mkdtemp(prefix="CT2MR-", dir=parent or None)
        try:
            inputPath = nodes.writeVolumeNode(inputVolumeNode, os.path.join(workDir, "input.nrrd"))
            if referenceMRNode is not None and harmonize not in (None, "none"):
                options["referencePath"] = nodes.writeVolumeNode(referenceMRNode,
                                                                 os.path.join(workDir, "reference_mr.nrrd"))
            outputDir = os.path.abspath(outputDirectory) if outputDirectory else os.path.join(workDir, "output")
            os.makedirs(outputDir, exist_ok=True)
            baseArguments = ["translate", inputPath, "-o", outputDir, "--progress", "json"]
            factory = processFactory or self._defaultProcessFactory
            engineArgs = [*baseArguments, *self.engineOptions(**options)]
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
            options=options, baseArguments=baseArguments, processFactory=factory, oomRetries=max(0, int(oomRetries)),
            referenceMRNode=referenceMRNode, computeMetrics=computeMetrics,
        )
        job._notify()
        return job

    def finishTranslation(self, job: CT2MRTranslationJob) -> CT2MRTranslationResult:
        """Wait for a job's engine process to end and load its outputs into the scene.

        On success the three volume nodes are named ``"<input> synthetic MR"``, ``"<input> round-trip CT"`` and
        ``"<input> error map"``, get the input's exact IJK-to-RAS matrix and parent transform, display settings
        (robust window/level for the synthetic MR, the input's window/level for the round-trip CT, a heat colour
        table for the error map), are placed beside the input in subject hierarchy and, if the job asks for it, get
        the histogram chart and metrics table and are shown in the compare layout. With the warp check a fourth
        node ``"<input> displacement (mm)"`` (colour map from 0 mm to the displacement's p95) joins them, and the
        engine's ``anatomy.json`` becomes ``result.anatomy`` (its displacement rows enter the metrics table).

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
            while not job.update():  # also runs the out-of-memory retries
                job.process.wait()
            returnCode = job.process.returncode
            if returnCode != 0 or job.errorMessage is not None or job.doneEvent is None:
                raise RuntimeError(self._failureMessage(job, returnCode))
            outputNodes = self._loadOutputs(job)
            result = self._addToScene(job, outputNodes, self._readAnatomy(job))
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
        job.oomRetries = 0
        try:
            job.process.cancel()
            job.update()
        finally:
            job.state = "cancelled"
            job.message = "Cancelled"
            shutil.rmtree(job.workDir, ignore_errors=True)

    # ------------------------------------------------------------------ devices

    def startDeviceQuery(self, processFactory: Callable[[Sequence[str]], TranslationProcessProtocol] | None = None
                         ) -> TranslationProcessProtocol:
        """Start listing the CUDA devices in a background process (the GUI process never initialises CUDA).

        Args:
            processFactory: builds the process from a full command line; ``None`` runs
                :func:`runner.deviceQueryCommand` with this Logic's Python.

        Returns:
            The process; pass it to :meth:`deviceQueryResult` once ``poll()`` is not ``None``.
        """
        command = deviceQueryCommand(self.pythonExecutable)
        return (processFactory or TranslationProcess)(command)

    @staticmethod
    def deviceQueryResult(process: TranslationProcessProtocol) -> dict[str, Any]:
        """Read the outcome of :meth:`startDeviceQuery`.

        Returns:
            ``{"devices": [{"device": "cuda:0", "name": ..., "memoryGiB": ...}, ...], "torch": version or None,
            "cuda": CUDA version or None, "error": message or ""}``; ``devices`` is empty without CUDA.
        """
        result: dict[str, Any] = {"devices": [], "torch": None, "cuda": None, "error": ""}
        for event in process.events():
            if event.get("event") == "done":
                result.update(devices=list(event.get("devices") or []), torch=event.get("torch"),
                              cuda=event.get("cuda"))
            elif event.get("event") == "error":
                result["error"] = str(event.get("message"))
        if process.returncode not in (0, None) and not result["error"]:
            result["error"] = process.stderrTail.strip().splitlines()[-1] if process.stderrTail.strip() else (
                f"the device query exited with code {process.returncode}")
        return result

    def cudaDevices(self, timeout: float = 120.0) -> dict[str, Any]:
        """List the CUDA devices and wait (see :meth:`deviceQueryResult`)."""
        process = self.startDeviceQuery()
        try:
            process.wait(timeout)
        except Exception:  # noqa: BLE001 - a hung query is reported, not raised
            process.cancel()
            return {"devices": [], "torch": None, "cuda": None, "error": f"no answer within {timeout:g} s"}
        return self.deviceQueryResult(process)

    @staticmethod
    def deviceLabels(devices: Sequence[dict[str, Any]]) -> list[tuple[str, str]]:
        """The device choices of the GUI: ``[(device, label), ...]``: auto, each CUDA device by name, the CPU."""
        labels = [("auto", "auto (CUDA when available, else CPU)")]
        for device in devices:
            memory = f", {device['memoryGiB']:g} GiB" if device.get("memoryGiB") else ""
            labels.append((str(device["device"]), f"{device['device']}: {device.get('name', 'GPU')}{memory}"))
        labels.append(("cpu", "cpu"))
        return labels

    # ------------------------------------------------------------------ models

    def _registry(self):
        from ct2mr import registry

        return registry, registry.load_registry(self.registryFiles)

    def modelList(self) -> list[dict[str, Any]]:
        """Every model version known (:func:`ct2mr.registry.list_models`): name, version, description, training
        data, licence, URL, SHA-256, size, ``status`` (bundled, cached, imported, downloadable), ``path``."""
        registry, listed = self._registry()
        return registry.list_models(listed)

    def modelPath(self, name: str | None = None, version: str | None = None) -> str:
        """The local file of a model of the list (``None``: the default model).

        Raises:
            ValueError: unknown model, or not downloaded yet (the message says how to download or import it).
        """
        registry, listed = self._registry()
        return str(registry.model_path(name or None, version or None, listed))

    def importModel(self, path: str, name: str | None = None, version: str | None = None) -> dict[str, Any]:
        """Copy a local checkpoint into the user cache (offline machines), checked as a ct2mr checkpoint.

        Returns:
            The cached model's entry with its ``path``.

        Raises:
            FileNotFoundError, ValueError: no such file, not a ct2mr checkpoint, or an invalid name/version.
        """
        from ct2mr import registry

        cached = registry.import_checkpoint(path, name or None, version or None)
        return {**cached.entry.to_dict(), "path": str(cached.path), "status": "imported"}

    def clearModels(self, name: str | None = None, version: str | None = None, keepLatest: bool = False) -> list[str]:
        """Remove cached model versions (never the bundled model); returns the folders removed."""
        from ct2mr import registry

        return [str(p) for p in registry.clear(name or None, version or None, keepLatest)]

    def startModelDownload(self, name: str, version: str | None = None, processFactory: ProcessFactory | None = None,
                           progressCallback: ProgressCallback | None = None) -> CT2MRModelDownloadJob:
        """Download a model of the list into the user cache in a background process (SHA-256 checked).

        Args:
            name: model name.
            version: version; ``None``: the newest listed.
            processFactory: builds the process from the engine arguments; ``None`` runs ``python -m ct2mr``.
            progressCallback: ``progressCallback(fraction, message)``.

        Returns:
            The running job; poll it, then :meth:`finishModelDownload` or :meth:`cancelModelDownload`.
        """
        arguments = ["models"]
        for path in self.registryFiles:
            arguments += ["--registry", str(path)]
        arguments += ["download", name, "--progress", "json"]
        if version:
            arguments += ["--version", version]
        process = (processFactory or self._defaultProcessFactory)(arguments)
        return CT2MRModelDownloadJob(name, version or None, process, progressCallback)

    def finishModelDownload(self, job: CT2MRModelDownloadJob) -> str:
        """Wait for a download to end and return the model file.

        Raises:
            RuntimeError: the download failed (unreachable server, wrong SHA-256: nothing is kept) or was cancelled.
        """
        if job.state != "running":
            raise RuntimeError(f"This download is {job.state}.")
        job.process.wait()
        job.update()
        if job.process.returncode != 0 or job.path is None:
            job.state = "failed"
            message = job.errorMessage or (job.process.stderrTail.strip().splitlines() or ["unknown error"])[-1]
            raise RuntimeError(f"Downloading model {job.name} failed: {message}")
        job.state = "finished"
        return job.path

    def cancelModelDownload(self, job: CT2MRModelDownloadJob) -> None:
        """Stop a download and remove its partial file (and the version's folder when the download created it)."""
        if job.state != "running":
            return
        job.process.cancel()
        job.state = "cancelled"
        from ct2mr import registry

        base = registry.models_cache_dir() / job.name
        for part in glob.glob(str(base / "*" / ".*.part")):
            os.remove(part)
        for folder in glob.glob(str(base / "*")):
            if os.path.isdir(folder) and not os.listdir(folder):
                os.rmdir(folder)
        if base.is_dir() and not os.listdir(base):
            os.rmdir(base)

    # ------------------------------------------------------------------ dependencies

    @staticmethod
    def dependencyPlan() -> install.InstallPlan:
        """Check the engine's dependencies in this Python and plan what to install (:mod:`install`)."""
        import importlib.util

        statuses = install.checkDependencies()
        hasPyTorchUtils = importlib.util.find_spec("PyTorchUtils") is not None
        return install.installPlan(statuses, hasPyTorchUtils, install.engineSource())

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
    def _validateInput(inputVolumeNode: Any, what: str = "input") -> None:
        if inputVolumeNode is None:
            raise ValueError(f"No {what} volume: select a {'CT' if what == 'input' else 'MR'} volume.")
        if not inputVolumeNode.IsA("vtkMRMLScalarVolumeNode") or inputVolumeNode.IsA("vtkMRMLLabelMapVolumeNode"):
            raise ValueError(
                f"'{inputVolumeNode.GetName()}' is a {inputVolumeNode.GetClassName()}: select a scalar "
                f"{'CT volume (HU)' if what == 'input' else 'MR volume'}, not a label map, segmentation or vector "
                "volume."
            )
        if inputVolumeNode.GetImageData() is None:
            raise ValueError(f"'{inputVolumeNode.GetName()}' has no image data: load it first.")
        if inputVolumeNode.GetScene() is None:
            raise ValueError(f"'{inputVolumeNode.GetName()}' is not in a scene: add it to the scene first.")

    @staticmethod
    def engineOptions(
        modelPath: str | None = None,
        device: str = "auto",
        overlap: float | None = None,
        roiSize: int | None = None,
        swBatchSize: int | None = None,
        precision: str | None = None,
        harmonize: str | None = None,
        referencePath: str | None = None,
        extraArguments: Sequence[str] = (),
        warpCheck: bool = False,
    ) -> list[str]:
        """Validate the translation options and turn them into ``ct2mr translate`` options.

        Options left at ``None`` are not passed (the engine's defaults apply).

        Returns:
            e.g. ``["--device", "cuda", "--overlap", "0.5", "--roi-size", "64", "--sw-batch-size", "1"]``.

        Raises:
            ValueError: see :meth:`startTranslation`.
            FileNotFoundError: ``modelPath`` does not exist.
        """
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
        if roiSize:
            roiSize = int(roiSize)
            if roiSize % 4 or not 16 <= roiSize <= 512:
                raise ValueError(f"roiSize must be a multiple of 4 in [16, 512] voxels; got {roiSize}.")
            options += ["--roi-size", str(roiSize)]
        if swBatchSize is not None:
            if int(swBatchSize) < 1:
                raise ValueError(f"swBatchSize must be at least 1; got {swBatchSize}.")
            options += ["--sw-batch-size", str(int(swBatchSize))]
        if precision is not None:
            if precision not in PRECISIONS:
                raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}.")
            options += ["--precision", precision]
        if harmonize not in (None, "none"):
            if harmonize not in HARMONIZATIONS:
                raise ValueError(f"harmonize must be one of {', '.join(HARMONIZATIONS)}; got {harmonize!r}.")
            options += ["--harmonize", harmonize]
            if referencePath:
                options += ["--reference-mr", str(referencePath)]
        if warpCheck:
            options.append("--warp-check")
        return options + [str(a) for a in extraArguments]

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
        if isOutOfMemoryMessage(message) or isOutOfMemoryMessage(stderr):
            tried = f" after {job.attempts} attempts ({'; '.join(job.retryMessages)})" if job.retryMessages else ""
            text += (f"\nThe device ran out of memory{tried}. Choose the CPU as device (slower, limited only by the "
                     "computer's memory), or a smaller window size in Advanced.")
        if "--warp-check" in stderr and "unrecognized arguments" in stderr:
            text += ("\nThe installed ct2mr engine has no warp check. Update the engine (the training/ folder of "
                     "CT2MRTranslation), or turn the warp check off in Advanced.")
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
        expected = dict(OUTPUT_KEYS)
        if job.options.get("warpCheck"):
            expected[DISPLACEMENT_OUTPUT[0]] = DISPLACEMENT_OUTPUT[1:]
        for key, (fileName, suffix) in expected.items():
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

    @staticmethod
    def _readAnatomy(job: CT2MRTranslationJob) -> dict[str, Any]:
        """The warp check's anatomy metrics: the ``done`` event's ``anatomy``, else OUT_DIR/anatomy.json; ``{}``
        without the warp check (or when the engine wrote neither, with a warning)."""
        if not job.options.get("warpCheck"):
            return {}
        reported = (job.doneEvent or {}).get("anatomy")
        if isinstance(reported, dict):
            return dict(reported)
        path = os.path.join(job.outputDir, ANATOMY_FILE)
        try:
            with open(path, encoding="utf-8") as file:
                anatomy = json.load(file)
            if isinstance(anatomy, dict):
                return anatomy
            _log.warning("CT2MR warp check: %s is not a JSON object; no displacement statistics.", path)
        except (OSError, ValueError) as error:
            _log.warning("CT2MR warp check: no anatomy metrics (%s).", error)
        return {}

    @staticmethod
    def _ctWindow(modelPath: str | None) -> tuple[float, float]:
        """The model's CT window (HU) from its metadata, else the thesis default."""
        try:
            from ct2mr.checkpoint import default_model_path, read_metadata

            window = read_metadata(modelPath or default_model_path())["preprocessing"].get("ct_window")
            return (float(window[0]), float(window[1])) if window else plots.CT_WINDOW
        except Exception:  # noqa: BLE001 - engine missing or odd metadata: the default window
            return plots.CT_WINDOW

    def _addToScene(
        self, job: CT2MRTranslationJob, outputNodes: dict[str, slicer.vtkMRMLScalarVolumeNode],
        anatomy: dict[str, Any] | None = None,
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
            displacementMap = outputNodes.get(DISPLACEMENT_OUTPUT[0])
            if displacementMap is not None:
                self._setDisplacementDisplay(displacementMap, anatomy or {})
            analysis = None
            if job.computeMetrics:
                analysis = plots.addAnalysis(inputNode, syntheticMR, roundTripCT, job.referenceMRNode,
                                             self._ctWindow(job.options.get("modelPath")), anatomy=anatomy)
                added += analysis.nodes
                for node in analysis.nodes:
                    if not node.IsA("vtkMRMLPlotSeriesNode"):
                        nodes.placeNextTo(node, inputNode)
                if analysis.metricsError:
                    _log.warning("CT2MR metrics not computed: %s", analysis.metricsError)
            layoutId = None
            if job.setupLayout:
                layoutId = views.setupCompareLayout(
                    scene, [inputNode, syntheticMR, roundTripCT, errorMap],
                    plotChartNode=analysis.chart if analysis else None,
                    tableNode=analysis.metricsTable if analysis else None)
        except BaseException:
            for node in added:
                if node.GetScene() is not None:
                    scene.RemoveNode(node)
            raise
        device = str((job.doneEvent or {}).get("device") or "")
        deviceMessage = job.deviceMessage
        requested = str(job.options.get("device") or "auto")
        if not deviceMessage and requested.startswith("cuda") and device == "cpu":
            deviceMessage = f"{requested} was requested but CUDA is not available: the translation ran on the CPU."
        return CT2MRTranslationResult(
            syntheticMR=syntheticMR,
            roundTripCT=roundTripCT,
            errorMap=errorMap,
            outputDir=job.outputDir if job.keepOutputDir else None,
            log=list(job.log),
            seconds=time.monotonic() - job.startTime,
            layoutId=layoutId,
            device=device,
            deviceMessage=deviceMessage,
            attempts=job.attempts,
            retryMessages=list(job.retryMessages),
            analysis=analysis,
            displacementMap=displacementMap,
            anatomy=dict(anatomy or {}),
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

    @staticmethod
    def _setDisplacementDisplay(displacementMap, anatomy: dict[str, Any]) -> None:
        """Colour map from 0 mm to max(p95, :data:`MIN_DISPLACEMENT_WINDOW_MM`): the engine's p95 inside the body
        when reported, else the map's own 95th percentile."""
        try:
            high = float(anatomy.get("displacement_p95_mm"))
        except (TypeError, ValueError):
            high = float("nan")
        if not high > 0.0:  # also NaN
            high = nodes.volumePercentiles(displacementMap, [95.0])[0]
        high = max(high, MIN_DISPLACEMENT_WINDOW_MM)
        nodes.setVolumeDisplay(displacementMap, high, high / 2.0,
                               nodes.findColorNodeID(displacementMap.GetScene(), DISPLACEMENT_COLOR_NODE_NAMES))
