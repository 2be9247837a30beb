"""Translations and batches as background engine processes: start, events, progress, cancel, result.

A :class:`CT2MRTranslationJob` is one translation: for a single volume its own ``ct2mr translate`` process, whose
JSON events :meth:`~CT2MRTranslationJob.update` (called from the Widget's ``QTimer`` or a script's loop) drains
without blocking, keeping the latest progress and calling the progress callback in the caller's thread. A
:class:`CT2MRTranslationBatch` translates several volumes (or the items of sequences, whose outputs become new
sequences) in ONE engine process (``ct2mr translate LIST_FILE``: model loaded once, next CT prefetched), with one
job per item fed from that process's per-case events. The Logic
(:class:`CT2MRTranslationLib.logic.CT2MRTranslationLogic`) starts engines, loads their outputs into the scene and
cancels them; :class:`CT2MRTranslationResult` is what one translation added to the scene.

No Qt here: runs inside Slicer and in plain Python with the ``slicer-core`` wheel.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import slicer
import vtk

from . import engine, nodes
from .options import TranslationOptions
from .plots import AnalysisNodes
from .runner import EngineEvent, ProcessFactory, TranslationProcessProtocol

__all__ = [
    "CT2MRTranslationBatch",
    "CT2MRTranslationJob",
    "CT2MRTranslationResult",
    "JobRunner",
    "ProgressCallback",
    "caseIdFor",
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
        uncertaintyMap: with ``uncertainty="tta"``, the voxel-wise standard deviation of G(x) under test-time
            augmentation (normalised MR units, >= 0) on the input's voxel grid; else ``None``.
        uncertainty: the engine's ``uncertainty`` block of the ``done`` event (mode, extra passes, cost, body
            mean/p50/p95/max), else ``{}``.
        ood: the out-of-distribution assessment (``done`` event / ``ood.json``) when the check ran, else ``{}``.
        oodWarning: one line (score and the feature that exceeded) when the check warned, else ``""``.
        trustTable: without the analysis, a metrics table of the OOD score and the uncertainty summary when
            reported (with it, those rows join ``analysis.metricsTable``), else ``None``.
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
    uncertaintyMap: slicer.vtkMRMLScalarVolumeNode | None = None
    uncertainty: dict[str, Any] = field(default_factory=dict)
    ood: dict[str, Any] = field(default_factory=dict)
    oodWarning: str = ""
    trustTable: slicer.vtkMRMLTableNode | None = None

    @property
    def volumeNodes(self) -> tuple[slicer.vtkMRMLScalarVolumeNode, ...]:
        """``(syntheticMR, roundTripCT, errorMap)``: the compare layout's outputs."""
        return (self.syntheticMR, self.roundTripCT, self.errorMap)

    @property
    def outputVolumeNodes(self) -> tuple[slicer.vtkMRMLScalarVolumeNode, ...]:
        """:attr:`volumeNodes` and, when computed, the displacement map and the uncertainty map."""
        return (*self.volumeNodes, *(node for node in (self.displacementMap, self.uncertaintyMap) if node is not None))

    @property
    def nodes(self) -> list[slicer.vtkMRMLNode]:
        """Every node the translation added (volumes, and the analysis' tables, chart and series)."""
        return [*self.outputVolumeNodes, *(self.analysis.nodes if self.analysis else []),
                *((self.trustTable,) if self.trustTable is not None else ())]


@dataclass
class CT2MRTranslationJob:
    """A translation running in the background.

    Call :meth:`update` regularly (the Widget does it from a ``QTimer``): it drains the engine's events, keeps the
    latest progress and calls the progress callback in the caller's thread. Then hand the job to
    :meth:`CT2MRTranslationLogic.finishTranslation` or :meth:`CT2MRTranslationLogic.cancel`. An item of a
    :class:`CT2MRTranslationBatch` is a job too, fed by the batch from its shared process (:meth:`handle`); the
    batch loads it with :meth:`CT2MRTranslationLogic.loadTranslation`.

    Attributes:
        inputVolumeNode: the CT volume node being translated (a sequence item's: set when its outputs are loaded).
        process: the running engine process (a batch item: the batch's).
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

    def makeWorkDirectory(self) -> str:
        """Create a new temporary folder for one run's files (the caller removes it)."""
        ...

    def startEngine(self, arguments: Sequence[str], processFactory: ProcessFactory | None = None
                    ) -> TranslationProcessProtocol:
        """Start ``ct2mr ARGUMENTS`` in the background."""
        ...

    def loadTranslation(self, job: CT2MRTranslationJob) -> CT2MRTranslationResult:
        """Load the outputs the engine reported for one translation (its ``done`` event) into the scene."""
        ...


@dataclass
class _BatchItem:
    label: str
    inputNode: Any = None
    sequenceNode: Any = None
    itemIndex: int = -1
    caseId: str = ""  # the engine's case (OUT_DIR/<caseId>/) once the input is written
    finished: bool = False  # translated and loaded, or failed


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


def caseIdFor(position: int, count: int, label: str) -> str:
    """The engine's case name (and file stem) of a batch item: ``"0003_CT_chest"``.

    Zero-padded positions keep the engine's order (it sorts its inputs by path) the order of the items; the label's
    letters, digits, ``_`` and ``-`` (at most 40) make ``OUT_DIR/<case>/`` readable.

    Args:
        position: 1-based position of the item in the batch.
        count: number of items (sets the padding, at least 4 digits).
        label: the item's label (node name, or ``"<sequence> [<index value>]"``).
    """
    name = re.sub(r"[^A-Za-z0-9_-]+", "_", label).strip("_")[:40] or "volume"
    return f"{position:0{max(4, len(str(count)))}d}_{name}"


class CT2MRTranslationBatch:
    """Several translations in one background engine process (the Widget's Translate, scripts' ``translateBatch``).

    The inputs are written to files once (a share per :meth:`update` call, so that the GUI stays responsive), then
    ONE ``ct2mr translate LIST_FILE -o OUT_DIR --progress json`` process translates them all: the model is loaded
    once and the next CT is read and preprocessed while the current one runs through G and F
    (``ct2mr.inference.batch``). Its per-case events (``case``, ``progress``, ``case_done``) drive the overall
    progress, and each case's outputs are loaded into the scene as soon as that case is done, as the same nodes a
    single translation adds (:meth:`CT2MRTranslationLogic.loadTranslation`).

    Inputs are scalar volume nodes and sequence nodes (each item of a sequence is one translation; its outputs go
    into three new sequences ``"<sequence> synthetic MR"`` etc., a fourth ``"<sequence> displacement (mm)"`` with
    the warp check, with the same index values, placed next to the input sequence and added to the browsers that
    show it; sequence items get no layout and no analysis nodes: with the analysis on, the engine, which runs every
    case with the same options, analyses them too, but only volume items show it). Overall progress is
    ``(i + fraction of item i) / n``. A failed item is recorded and the batch goes on (unless ``stopOnError``: then
    the engine is stopped); :meth:`cancel` stops the engine's whole process tree and skips the rest: the finished
    items stay, the running one leaves no node, partly filled output sequences are removed, and so are the
    temporary files.

    Args:
        logic: the Logic (:class:`JobRunner`).
        inputNodes: scalar volume nodes and/or sequence nodes of scalar volumes.
        options: the translation options of every item.
        progressCallback: ``progressCallback(fraction, message)`` with the overall fraction.
        stopOnError: stop at the first failed item.
        keywords: ``referenceMRNode``, ``setupLayout``, ``processFactory`` (builds the process from the engine
            arguments), ``outputDirectory`` (keep the engine's outputs there, one ``<case>/`` folder per item and
            ``translate_summary.json``; cases already there are recomputed).

    Attributes:
        results: one result per finished volume item (sequence items are moved into the output sequences).
        failures: ``(label, message)`` per failed item.
        events: ``(label, event)``: each item's events as a single translation reports them (``start``,
            ``progress``, ``warning``, ``log``, ``done``; ``error`` for a failure), and ``("", event)`` for the
            engine's messages outside any case (for a log view).
        outputSequences: input sequence ID -> ``(synthetic MR, round-trip CT, error map[, displacement (mm)])``
            sequence nodes.
        state: ``"running"``, ``"finished"``, ``"failed"`` or ``"cancelled"``.
        index: items finished (loaded or failed) so far.
        job: the running item's :class:`CT2MRTranslationJob` (its ``process`` is the batch's; the batch drives it,
            do not call its ``update``), else ``None``.
        process: the batch's one engine process, once started.
        workDir: temporary folder of the written inputs (``inputs/``, ``inputs.txt``), the reference MR and, without
            ``outputDirectory``, the engine's outputs; removed when the batch ends.
        outputDir: the engine's OUT_DIR.
        engineArguments: the engine's argument list.
        engineLog: every event of the engine process, unchanged, in order.
        summaryPath: the engine's ``translate_summary.json`` (from its final ``done`` event), else ``None``.
        notes: what the batch left out, one line each (the OOD check of a batch of several volumes).

    The uncertainty map and the out-of-distribution check (issue 16) run on one CT at a time (the engine's batch
    mode refuses them): with them on, a batch of one volume runs the engine on that CT alone (``ct2mr translate
    CT -o OUT_DIR/<case>``, its ``start`` / ``done`` / ``error`` events read as the case's); in a batch of several
    volumes or sequence items the OOD check is left out (:attr:`notes`) and the uncertainty map is refused.

    Raises:
        ValueError: no input, or an input that is neither a scalar volume nor a sequence.
    """

    exportSeconds = 0.5
    """Seconds of input writing per :meth:`update` call before control returns to the caller (the GUI)."""

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
        self.outputSequences: dict[str, tuple[Any, ...]] = {}
        self.index = 0
        self.job: CT2MRTranslationJob | None = None
        self.state = "running"
        self.message = "Starting"
        self.process: TranslationProcessProtocol | None = None
        self.workDir: str | None = None
        self.outputDir: str | None = None
        self.engineArguments: list[str] = []
        self.engineLog: list[EngineEvent] = []
        self.summaryPath: str | None = None
        self.startTime = time.monotonic()
        self._temporaryInput = None
        self._exported = 0
        self._cases: dict[str, _BatchItem] = {}
        self._current: _BatchItem | None = None
        self._caseDone: dict[str, EngineEvent] = {}
        self._engineOptions: TranslationOptions | None = None
        self._engineStart: EngineEvent = {}
        self._engineError: str | None = None
        self._deviceMessage = ""
        self._singleCase: str | None = None
        self.notes: list[str] = []

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

    # ------------------------------------------------------------------ inputs

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

    def _itemOptions(self, item: _BatchItem) -> tuple[TranslationOptions, bool]:
        """An item's options and whether it sets up the compare layout (sequence items: no analysis, no layout)."""
        options = self._engineOptions or self.options
        if item.sequenceNode is not None:
            return TranslationOptions.fromKeywords(options, analysis=False), False
        return options, bool(self.keywords.get("setupLayout", True))

    def _validate(self) -> None:
        """Check the options and the reference MR once for the batch (as ``startTranslation`` does per volume)."""
        reference = self.keywords.get("referenceMRNode")
        if reference is not None:
            validateInputNode(reference, "reference MR")
        options = TranslationOptions.fromKeywords(self.options).validated()
        if options.needsReference and reference is None:
            raise ValueError(f"Harmonisation '{options.harmonize}' needs a reference MR: select one, or choose 'none' "
                             "or 'zscore'.")
        if options.analysis and all(item.sequenceNode is not None for item in self.items):
            options = TranslationOptions.fromKeywords(options, analysis=False)  # no item would show it
        if options.singleCT and (self.count > 1 or self.items[0].sequenceNode is not None):
            if options.uncertainty != "none":
                raise ValueError("The uncertainty map is computed for one CT volume at a time: translate the volumes "
                                 "one by one, or set Uncertainty map to 'none' for a batch.")
            options = TranslationOptions.fromKeywords(options, ood=False)
            self.notes.append("The out-of-distribution check runs on one CT volume at a time: it was left out of "
                              "this batch.")
        options.engineArguments()  # validates before anything is written
        self._engineOptions = options

    def _writeInputs(self) -> bool:
        """Write the next inputs (for at most :attr:`exportSeconds`); ``True`` once every input is written."""
        if self.workDir is None:
            try:
                self._validate()
                self.workDir = self.logic.makeWorkDirectory()
                os.makedirs(os.path.join(self.workDir, "inputs"))
            except Exception as error:  # noqa: BLE001 - every item fails with it, reported by the caller
                self._failRemaining(error)
                return False
        deadline = time.monotonic() + self.exportSeconds
        while self.isRunning and self._exported < self.count:
            item = self.items[self._exported]
            self._exported += 1
            caseId = caseIdFor(self._exported, self.count, item.label)
            try:
                nodes.writeVolumeNode(self._inputFor(item), self._inputPath(caseId))
            except Exception as error:  # noqa: BLE001 - recorded, reported by the caller
                self._itemFinished(item)
                self._recordFailure(item, error)
            else:
                item.caseId = caseId
                self._cases[caseId] = item
            finally:
                self._removeTemporaryInput()
            if time.monotonic() > deadline:
                break
        if self.isRunning and self._exported < self.count:
            self._notify(f"Writing the inputs: {self._exported} of {self.count}")
            return False
        return self.isRunning

    def _inputPath(self, caseId: str) -> str:
        return os.path.join(str(self.workDir), "inputs", f"{caseId}.nrrd")

    # ------------------------------------------------------------------ the engine process

    def _startEngine(self) -> None:
        todo = [item for item in self.items if item.caseId and not item.finished]
        if not todo:
            self._finish()
            return
        try:
            options = self._engineOptions or self.options
            reference = self.keywords.get("referenceMRNode")
            referencePath = None
            if reference is not None and (options.harmonize != "none" or options.analysis):
                referencePath = nodes.writeVolumeNode(reference, os.path.join(str(self.workDir), "reference_mr.nrrd"))
            outputDirectory = self.keywords.get("outputDirectory")
            self.outputDir = os.path.abspath(outputDirectory) if outputDirectory else os.path.join(str(self.workDir),
                                                                                                 "output")
            os.makedirs(self.outputDir, exist_ok=True)
            if options.singleCT and len(todo) == 1:  # the engine runs --uncertainty / --ood on one CT, not in a batch
                self._singleCase = todo[0].caseId
                self.engineArguments = engine.translateArguments(
                    self._inputPath(todo[0].caseId), os.path.join(self.outputDir, todo[0].caseId),
                    options.engineArguments(referencePath), overwrite=bool(outputDirectory))
            else:
                listFile = os.path.join(str(self.workDir), "inputs.txt")
                with open(listFile, "w", encoding="utf-8") as file:
                    file.write("".join(f"{self._inputPath(item.caseId)}\n" for item in todo))
                self.engineArguments = engine.translateArguments(listFile, self.outputDir,
                                                                 options.engineArguments(referencePath),
                                                                 overwrite=bool(outputDirectory))
            self.process = self.logic.startEngine(self.engineArguments, self.keywords.get("processFactory"))
        except Exception as error:  # noqa: BLE001 - every item fails with it, reported by the caller
            self._failRemaining(error)
            return
        self._notify(f"Translating {len(todo)} volume{'s' if len(todo) > 1 else ''} in one engine process")

    def _handle(self, event: EngineEvent) -> None:
        """Route one engine event: a case starts, reports, is done (load it) or failed; or the batch's own."""
        self.engineLog.append(event)
        kind = event.get("event")
        if self._singleCase is not None and kind in ("start", "done", "error"):
            self._handleSingle(event)
        elif kind in ("case", "case_done"):
            item = self._cases.get(str(event.get("case")))
            if item is None or item.finished:
                _log.warning("CT2MR batch: an event of an unknown case: %s", event)
            elif kind == "case_done":
                self._caseDone[item.caseId] = event  # loaded with the case's final status, which follows
            elif event.get("status") == "running":
                self._beginCase(item, event)
            elif event.get("status") in ("done", "skipped"):
                self._finishCase(item, self._caseDone.pop(item.caseId, None) or event)
            elif event.get("status") == "failed":
                self._failCase(item, str(event.get("error") or "unknown error"))
        elif kind == "start":
            self._engineStart = event
        elif kind == "done":
            self.summaryPath = event.get("summary")
        elif self.job is not None and self._current is not None:
            self._caseEvent(self._current, event)
        else:  # the engine's own messages (a CUDA fallback, a whole-batch error) before, between or after cases
            message = str(event.get("message", ""))
            if kind == "error":
                self._engineError = message or "unknown error"
            elif kind == "warning":
                lowered = message.lower()
                if "cuda" in lowered and "not available" in lowered:
                    self._deviceMessage = message
                _log.warning("ct2mr: %s", message)
            elif kind == "log":
                _log.info("ct2mr: %s", message)
            self.events.append(("", event))

    def _handleSingle(self, event: EngineEvent) -> None:
        """An event of the engine run on one CT (:attr:`_singleCase`): its ``start``, ``done`` and ``error`` are the
        case's ``case`` (running), ``case_done`` and ``case`` (failed)."""
        item = self._cases.get(str(self._singleCase))
        kind = event.get("event")
        if item is None or item.finished:
            _log.warning("CT2MR: an event after the translation ended: %s", event)
        elif kind == "start":
            self._engineStart = event
            self._beginCase(item, event)
        elif kind == "done":
            if self._current is not item:
                self._beginCase(item, event)
            self._finishCase(item, event)
        else:
            self._failCase(item, str(event.get("message") or "unknown error"))

    def _caseEvent(self, item: _BatchItem, event: EngineEvent) -> None:
        assert self.job is not None
        self.job.handle(event)
        self.events.append((item.label, event))

    def _beginCase(self, item: _BatchItem, event: EngineEvent) -> None:
        options, setupLayout = self._itemOptions(item)
        self._current = item
        self.job = CT2MRTranslationJob(
            inputVolumeNode=item.inputNode, process=self.process, workDir=str(self.workDir),
            outputDir=os.path.join(str(self.outputDir), item.caseId), options=options,
            engineArguments=self.engineArguments, keepOutputDir=bool(self.keywords.get("outputDirectory")),
            progressCallback=lambda fraction, message: self._notify(message), setupLayout=setupLayout,
            referenceMRNode=self.keywords.get("referenceMRNode"), deviceMessage=self._deviceMessage)
        self._caseEvent(item, {"event": "start", "case": item.caseId, "input": event.get("input"),
                               "device": self._engineStart.get("device"), "model": self._engineStart.get("model")})

    def _finishCase(self, item: _BatchItem, doneEvent: EngineEvent) -> None:
        if self._current is not item:  # a case the engine skipped without running it
            self._beginCase(item, doneEvent)
        job = self.job
        assert job is not None
        self._caseEvent(item, {**doneEvent, "event": "done"})
        try:
            if item.sequenceNode is not None:
                job.inputVolumeNode = self._inputFor(item)
            result = self.logic.loadTranslation(job)
        except Exception as error:  # noqa: BLE001 - recorded, reported by the caller
            job.state = "failed"
            self._removeTemporaryInput()
            self._itemFinished(item)
            self._recordFailure(item, error)
        else:
            if item.sequenceNode is not None:
                self._storeSequenceItem(item, result)
            else:
                self.results.append(result)
            self._removeTemporaryInput()
            self._itemFinished(item)
        finally:
            if not job.keepOutputDir:  # loaded: the files are no longer needed
                shutil.rmtree(job.outputDir, ignore_errors=True)

    def _failCase(self, item: _BatchItem, error: str) -> None:
        if self._current is item and self.job is not None:
            self.job.errorMessage = error
            self.job.state = "failed"
        self._itemFinished(item)
        self._recordFailure(item, RuntimeError(engine.failureMessage(error, "", None)))

    def _engineEnded(self) -> None:
        """The engine process has ended and its events are handled: items it never reported fail with its error."""
        assert self.process is not None
        pending = [item for item in self.items if item.caseId and not item.finished]
        if pending:
            message = engine.failureMessage(self._engineError, self.process.stderrTail, self.process.returncode)
            for item in pending:
                if not self.isRunning:
                    return
                if self._current is item and self.job is not None:
                    self.job.state = "failed"
                self._itemFinished(item)
                self._recordFailure(item, RuntimeError(message))
        if self.isRunning:
            self._finish()

    def _itemFinished(self, item: _BatchItem) -> None:
        item.finished = True
        self.index += 1
        if self._current is item:
            self._current, self.job = None, None

    def _failRemaining(self, error: BaseException) -> None:
        """Every item not finished yet fails with ``error`` (the batch could not be set up or started)."""
        for item in self.items:
            if not self.isRunning:
                return
            if not item.finished:
                self._itemFinished(item)
                self._recordFailure(item, error)
        if self.isRunning:
            self._finish()

    def _recordFailure(self, item: _BatchItem, error: BaseException) -> None:
        _log.error("CT2MR batch: %s failed: %s", item.label, error)
        self.failures.append((item.label, str(error)))
        self.events.append((item.label, {"event": "error", "message": str(error)}))
        if self.stopOnError and self.isRunning:
            self.state = "failed"
            self._stop()
            self._removePartialSequences()

    def _stop(self) -> None:
        """Stop the engine process tree (if any) and remove the temporary files."""
        if self.job is not None:
            self.job.state = "cancelled" if self.state == "cancelled" else "failed"
            self.job.message = "Cancelled" if self.state == "cancelled" else self.job.message
        self._current, self.job = None, None
        if self.process is not None:
            self.process.cancel()
        self._removeTemporaryInput()
        self._removeWorkDir()

    def _removeWorkDir(self) -> None:
        if self.workDir is not None:
            shutil.rmtree(self.workDir, ignore_errors=True)

    # ------------------------------------------------------------------ driving

    def start(self) -> CT2MRTranslationBatch:
        """Begin: write the first inputs and, once all are written, start the engine (``update`` goes on).

        Returns:
            ``self``.
        """
        if self.isRunning and self.process is None:
            self.update()
        return self

    def update(self) -> bool:
        """Write inputs, start the engine, handle its events: load each case as it is done, record failures.

        Returns:
            ``True`` once every item is done (or the batch was cancelled or stopped at an error).
        """
        if not self.isRunning:
            return True
        if self.process is None:
            if self._writeInputs():
                self._startEngine()
            return not self.isRunning
        for event in self.process.events():
            self._handle(event)
            if not self.isRunning:
                return True
        if self.process.poll() is not None:
            for event in self.process.events():  # lines read between the two calls
                self._handle(event)
                if not self.isRunning:
                    return True
            self._engineEnded()
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
        self.job, self._current = None, None
        self.state = "finished"
        self._removeWorkDir()
        self._finishSequences()
        done = self.count - len(self.failures)
        self._notify(f"Done: {done} of {self.count} translated in {time.monotonic() - self.startTime:.1f} s"
                     + (f"; {len(self.failures)} failed" if self.failures else "") + ".", final=True)

    def cancel(self) -> None:
        """Stop the engine's process tree (the running item leaves no node; the temporary files are removed) and
        skip the remaining items; the finished items stay, partly filled output sequences are removed."""
        if not self.isRunning:
            return
        self.state = "cancelled"
        self._stop()
        self._removePartialSequences()
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
