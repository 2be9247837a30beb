"""Translations and batches as background engine processes: start, events, progress, cancel, result.

A :class:`CT2MRTranslationJob` is one ``ct2mr translate`` process: :meth:`~CT2MRTranslationJob.update` (called from
the Widget's ``QTimer`` or a script's loop) drains its JSON events without blocking, keeps the latest progress and
calls the progress callback in the caller's thread. A :class:`CT2MRTranslationBatch` runs several jobs one after
another (volumes, or the items of sequences, whose outputs become new sequences). The Logic
(:class:`CT2MRTranslationLib.logic.CT2MRTranslationLogic`) starts jobs, loads their outputs into the scene and
cancels them; :class:`CT2MRTranslationResult` is what one translation added to the scene.

No Qt here: runs inside Slicer and in plain Python with the ``slicer-core`` wheel.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import slicer
import vtk

from . import nodes
from .options import TranslationOptions
from .plots import AnalysisNodes
from .runner import EngineEvent, TranslationProcessProtocol

__all__ = [
    "CT2MRTranslationBatch",
    "CT2MRTranslationJob",
    "CT2MRTranslationResult",
    "JobRunner",
    "ProgressCallback",
    "validateInputNode",
]

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
        device: the device the engine ran on (``"cpu"``, ``"cuda:0"``, ...), from its ``done`` event.
        deviceMessage: why the device differs from the one asked for (CUDA missing), else ``""``.
        retryMessages: the engine's own out-of-memory retries (fewer windows per pass, CPU stitching), one line each.
        ctWindow: the CT window (HU) of the model that ran, from the ``done`` event.
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
    retryMessages: list[str] = field(default_factory=list)
    ctWindow: tuple[float, float] = (-600.0, 1000.0)
    analysis: AnalysisNodes | None = None
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
    latest progress and calls the progress callback in the caller's thread. Then hand the job to
    :meth:`CT2MRTranslationLogic.finishTranslation` or :meth:`CT2MRTranslationLogic.cancel`.

    Attributes:
        inputVolumeNode: the CT volume node being translated.
        process: the running engine process.
        workDir: temporary folder holding the input file (and the outputs unless ``outputDir`` was given).
        outputDir: folder the engine writes to.
        options: the validated translation options.
        engineArguments: the engine's full argument list.
        keepOutputDir: ``outputDir`` was chosen by the caller and is kept after loading.
        progressCallback: optional ``progressCallback(fraction, message)``.
        setupLayout: set up the compare layout when the results are loaded.
        referenceMRNode: reference MR (harmonisation, histogram, W1), or ``None``.
        fraction: latest overall progress in [0, 1].
        message: latest progress or status message.
        log: every event received so far.
        doneEvent: the engine's ``done`` event once received.
        errorMessage: the engine's ``error`` message once received.
        startTime: ``time.monotonic()`` at start.
        state: ``"running"``, ``"finished"``, ``"failed"`` or ``"cancelled"``.
        retryMessages: the engine's out-of-memory retry warnings.
        deviceMessage: the engine's CUDA fallback warning, if any.
    """

    inputVolumeNode: slicer.vtkMRMLScalarVolumeNode
    process: TranslationProcessProtocol
    workDir: str
    outputDir: str
    options: TranslationOptions = field(default_factory=TranslationOptions)
    engineArguments: list[str] = field(default_factory=list)
    keepOutputDir: bool = False
    progressCallback: ProgressCallback | None = None
    setupLayout: bool = True
    referenceMRNode: slicer.vtkMRMLScalarVolumeNode | None = None
    fraction: float = 0.0
    message: str = "Starting"
    log: list[EngineEvent] = field(default_factory=list)
    doneEvent: EngineEvent | None = None
    errorMessage: str | None = None
    startTime: float = field(default_factory=time.monotonic)
    state: str = "running"
    retryMessages: list[str] = field(default_factory=list)
    deviceMessage: str = ""

    def update(self) -> bool:
        """Handle the events received since the last call.

        Returns:
            ``True`` once the engine process has ended and all its output is handled.
        """
        for event in self.process.events():
            self.handle(event)
        finished = self.process.poll() is not None
        if finished:
            for event in self.process.events():  # lines read between the two calls
                self.handle(event)
        return finished

    @property
    def isRunning(self) -> bool:
        """The engine process has not been finished or cancelled yet."""
        return self.state == "running"

    def handle(self, event: EngineEvent) -> None:
        """Record one engine event: progress and status, warnings (CUDA fallback, out-of-memory retries), the
        ``done`` event, the ``error`` message."""
        self.log.append(event)
        kind = event.get("event")
        if kind == "progress":
            try:
                self.fraction = min(max(float(event.get("fraction", self.fraction)), self.fraction, 0.0), 1.0)
            except (TypeError, ValueError):
                pass
            stage = event.get("stage")
            text = str(event.get("message") or "")
            self.message = f"{stage}: {text}" if stage and text else (text or str(stage or self.message))
            self.notify()
        elif kind == "start":
            self.message = f"Started on {event.get('device', 'unknown device')}"
            self.notify()
        elif kind == "warning":
            message = str(event.get("message", ""))
            lowered = message.lower()
            if "cuda" in lowered and "not available" in lowered:
                self.deviceMessage = message
            if "out of memory" in lowered:
                self.retryMessages.append(message)
            _log.warning("ct2mr: %s", message)
        elif kind == "log":
            _log.info("ct2mr: %s", event.get("message", ""))
        elif kind == "done":
            self.doneEvent = event
            self.fraction = 1.0
            self.message = "Translation done, loading results"
            self.notify()
        elif kind == "error":
            self.errorMessage = str(event.get("message") or "unknown error")

    def notify(self) -> None:
        """Call the progress callback with the latest fraction and message."""
        if self.progressCallback is not None:
            self.progressCallback(self.fraction, self.message)


class JobRunner(Protocol):
    """What a batch needs from the Logic (:class:`CT2MRTranslationLib.logic.CT2MRTranslationLogic`)."""

    def startTranslation(self, inputVolumeNode: Any, options: TranslationOptions | None = None, **keywords: Any
                         ) -> CT2MRTranslationJob:
        """Start one translation."""
        ...

    def finishTranslation(self, job: CT2MRTranslationJob) -> CT2MRTranslationResult:
        """Load a finished translation into the scene."""
        ...

    def cancel(self, job: CT2MRTranslationJob) -> None:
        """Stop a running translation."""
        ...


@dataclass
class _BatchItem:
    label: str
    inputNode: Any = None
    sequenceNode: Any = None
    itemIndex: int = -1


def validateInputNode(inputVolumeNode: Any, what: str = "input") -> None:
    """Check that a node can be translated (or used as reference MR).

    Raises:
        ValueError: no node, a label map, segmentation or vector volume, no image data, or not in a scene; the
            message says what to select.
    """
    if inputVolumeNode is None:
        raise ValueError(f"No {what} volume: select a {'CT' if what == 'input' else 'MR'} volume.")
    if not inputVolumeNode.IsA("vtkMRMLScalarVolumeNode") or inputVolumeNode.IsA("vtkMRMLLabelMapVolumeNode"):
        raise ValueError(
            f"'{inputVolumeNode.GetName()}' is a {inputVolumeNode.GetClassName()}: select a scalar "
            f"{'CT volume (HU)' if what == 'input' else 'MR volume'}, not a label map, segmentation or vector volume."
        )
    if inputVolumeNode.GetImageData() is None:
        raise ValueError(f"'{inputVolumeNode.GetName()}' has no image data: load it first.")
    if inputVolumeNode.GetScene() is None:
        raise ValueError(f"'{inputVolumeNode.GetName()}' is not in a scene: add it to the scene first.")


class CT2MRTranslationBatch:
    """Several translations run one after another (the Widget's Translate, scripts' ``translateBatch``).

    Inputs are scalar volume nodes and sequence nodes (each item of a sequence is one translation; its outputs go
    into three new sequences ``"<sequence> synthetic MR"`` etc., a fourth ``"<sequence> displacement (mm)"`` with
    the warp check, with the same index values, placed next to the input sequence and added to the browsers that
    show it; sequence items get no layout and no analysis). Overall progress is ``(i + fraction of item i) / n``.
    A failed item is recorded and the batch goes on (unless ``stopOnError``); :meth:`cancel` stops the running
    engine and skips the rest: the finished items stay, the running one leaves no node or file, partly filled
    output sequences are removed.

    Args:
        logic: the Logic (:class:`JobRunner`).
        inputNodes: scalar volume nodes and/or sequence nodes of scalar volumes.
        options: the translation options of every item.
        progressCallback: ``progressCallback(fraction, message)`` with the overall fraction.
        stopOnError: stop at the first failed item.
        keywords: further keyword arguments of ``startTranslation`` (``referenceMRNode``, ``setupLayout``,
            ``processFactory``, ``outputDirectory``).

    Attributes:
        results: one result per finished volume item (sequence items are moved into the output sequences).
        failures: ``(label, message)`` per failed item.
        events: ``(label, event)`` for every engine event of every item, in order (for a log view).
        outputSequences: input sequence ID -> ``(synthetic MR, round-trip CT, error map[, displacement (mm)])``
            sequence nodes.
        state: ``"running"``, ``"finished"``, ``"failed"`` or ``"cancelled"``.

    Raises:
        ValueError: no input, or an input that is neither a scalar volume nor a sequence.
    """

    def __init__(self, logic: JobRunner, inputNodes: Sequence[Any], options: TranslationOptions | None = None,
                 progressCallback: ProgressCallback | None = None, stopOnError: bool = False,
                 **keywords: Any) -> None:
        self.logic = logic
        self.options = options if options is not None else TranslationOptions()
        self.progressCallback = progressCallback
        self.stopOnError = stopOnError
        self.keywords = keywords
        self.items: list[_BatchItem] = []
        for node in inputNodes or ():
            if node is not None and node.IsA("vtkMRMLSequenceNode"):
                for index in range(node.GetNumberOfDataNodes()):
                    value = node.GetNthIndexValue(index)
                    self.items.append(_BatchItem(f"{node.GetName()} [{value}]", None, node, index))
            else:
                validateInputNode(node)
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
                options, keywords = self.options, dict(self.keywords)
                if item.sequenceNode is not None:  # no per-item layout or analysis for sequence items
                    options = TranslationOptions.fromKeywords(options, analysis=False)
                    keywords["setupLayout"] = False
                self._collected = 0
                self.job = self.logic.startTranslation(
                    inputNode, options, progressCallback=lambda fraction, message: self._notify(message), **keywords)
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
            suffixes = [suffix for _, suffix in nodes.OUTPUT_KEYS.values()]
            if result.displacementMap is not None:
                suffixes.append(nodes.DISPLACEMENT_OUTPUT[2])
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
