"""CT2MRTranslationLogic: translate a CT volume node into a synthetic MR, a round-trip CT and an error map.

The Logic is the module's small public face. It writes the input node to a temporary NRRD file, starts the engine
(``python -m ct2mr translate ... --progress json``) as a background process (:mod:`.jobs`, :mod:`.runner`, with the
command line of :mod:`.engine` and the options of :mod:`.options`), and loads its outputs back as volume nodes on the
input's voxel grid, beside the input in subject hierarchy (:mod:`.nodes`), shown in the compare layout
(:mod:`.views`):

- synthetic MR ``G(x)``: normalised MR intensity in [-1, 1];
- round-trip CT ``F(G(x))``: HU;
- error map ``|F(G(x)) - x|``: HU, >= 0 (thesis, section 7, cycle-consistency analysis);
- with the warp check (``warpCheck``), a displacement map: the magnitude (mm) of a deformable registration of x to
  G(x), ~0 where G moved no anatomy (thesis section 5, property P1, evaluation E2);
- with ``uncertainty="tta"``, an uncertainty map: the spread of G(x) under test-time flips and shifts (normalised MR
  units, a colour map and a fifth compare column; issue 16).

With ``ood`` the engine scores the CT against the model's training CTs before the networks run; the score joins the
metrics table and, above the threshold, ``result.oodWarning`` holds one line for the panel. :meth:`runQuality`
scores a synthetic MR against a registered reference MR with ``ct2mr qa`` in an engine process (:mod:`.quality`):
the difference map as a volume and the metrics as a table.

With ``analysis`` the engine also computes the metrics table and histograms (``ct2mr translate --analysis``), which
become table and plot nodes (:mod:`.plots`); nothing of it is computed in Slicer's process, which never imports torch.
Out of memory, the engine retries with fewer windows and CPU stitching itself; when CUDA is asked for but missing it
runs on the CPU and the result says so. Several CT volumes (or the items of a sequence) are translated by
:class:`~.jobs.CT2MRTranslationBatch` in one engine process (the model loaded once, the next CT read while the
current one is translated), each loaded as soon as it is done. Models come from the engine's registry
(:mod:`.models`).

The Logic never touches Qt or ``slicer.app`` (DESIGN.md): it runs in Slicer and in plain Python with the
``slicer-core`` wheel ("Can be used without GUI widget"). The Widget uses :meth:`startBatch` and ``update()`` from a
timer; scripts use :meth:`translate` and :meth:`translateBatch`::

    logic = CT2MRTranslationLogic()
    result = logic.translate(ctNode, device="cpu", analysis=True)
    result.syntheticMR, result.roundTripCT, result.errorMap, result.analysis.metricsTable
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import slicer

from . import engine, export, install, models, nodes, plots, quality, views
from .jobs import (
    CT2MRTranslationBatch,
    CT2MRTranslationJob,
    CT2MRTranslationResult,
    ProgressCallback,
    validateInputNode,
)
from .options import TranslationOptions
from .parameters import CT2MRTranslationParameters
from .runner import (
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
    "CT2MRModelDownloadJob",
    "CT2MRTranslationBatch",
    "CT2MRTranslationJob",
    "CT2MRTranslationLogic",
    "CT2MRTranslationResult",
    "ProgressCallback",
    "TranslationOptions",
]

CT2MRModelDownloadJob = models.CT2MRModelDownloadJob

_log = logging.getLogger(__name__)


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
        options: TranslationOptions | None = None,
        *,
        referenceMRNode: slicer.vtkMRMLScalarVolumeNode | None = None,
        outputDirectory: str | None = None,
        setupLayout: bool = True,
        progressCallback: ProgressCallback | None = None,
        processFactory: ProcessFactory | None = None,
        timeout: float | None = None,
        pollInterval: float = 0.1,
        **optionValues: Any,
    ) -> CT2MRTranslationResult:
        """Translate a CT volume and wait for the result.

        Args:
            inputVolumeNode: CT in HU (scalar volume node in a scene; arrays are (z, y, x)).
            options: the translation options (:class:`TranslationOptions`: model, device, overlap, window size,
                windows per pass, precision, harmonisation, warp check, analysis); ``None``: the engine's defaults.
            referenceMRNode: reference MR volume: passed to the engine for harmonisation and, with the analysis,
                for the histogram and W1.
            outputDirectory: keep the engine's output files in this folder; ``None`` uses a temporary folder.
            setupLayout: show the results in the compare layout.
            progressCallback: ``progressCallback(fraction, message)``, called in this thread.
            processFactory: builds the process from the engine arguments; ``None`` runs ``python -m ct2mr``.
            timeout: seconds after which the run is cancelled; ``None`` waits as long as it takes.
            pollInterval: seconds between progress checks.
            optionValues: changes to ``options`` by name (``device="cpu"``, ``analysis=True``, ``warpCheck=True``).

        Returns:
            The new nodes and the run's log.

        Raises:
            ValueError, FileNotFoundError, TypeError: invalid arguments (see :meth:`startTranslation`).
            RuntimeError: the engine failed or timed out, or its outputs are not on the input's voxel grid; no node
                is added and the temporary files are removed.
        """
        job = self.startTranslation(inputVolumeNode, options, referenceMRNode=referenceMRNode,
                                    outputDirectory=outputDirectory, setupLayout=setupLayout,
                                    progressCallback=progressCallback, processFactory=processFactory, **optionValues)
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
        options: TranslationOptions | None = None,
        *,
        progressCallback: ProgressCallback | None = None,
        shouldCancel: Callable[[], bool] | None = None,
        stopOnError: bool = False,
        pollInterval: float = 0.1,
        timeout: float | None = None,
        **keywords: Any,
    ) -> CT2MRTranslationBatch:
        """Translate several CT volumes (or the items of sequences) in one engine process, and wait.

        The inputs are written once, one ``ct2mr translate`` process loads the model once and translates them all
        (the next CT prefetched), and each item's nodes are added as soon as it is done
        (:class:`~.jobs.CT2MRTranslationBatch`).

        Args:
            inputNodes: scalar volume nodes and/or sequence nodes.
            options: the translation options of every item.
            progressCallback: ``progressCallback(fraction, message)`` with the overall fraction ``(i + f) / n``.
            shouldCancel: polled; returning ``True`` cancels the running translation and skips the rest.
            stopOnError: stop at the first failure (the engine is stopped; else failures are recorded and the
                batch goes on).
            pollInterval: seconds between progress checks.
            timeout: seconds after which the batch is cancelled.
            keywords: ``referenceMRNode``, ``setupLayout``, ``processFactory``, ``outputDirectory`` (keep the
                outputs in ``<outputDirectory>/<case>/``, with the engine's ``translate_summary.json``) and option
                changes by name (``device="cpu"``, ``warpCheck=True``).

        Returns:
            The finished (or cancelled) batch: ``results``, ``failures``, ``outputSequences``, ``state``.

        Raises:
            ValueError: no input, or an input that is not a scalar volume or a sequence.
        """
        options, keywords = self._splitKeywords(options, keywords)
        batch = CT2MRTranslationBatch(self, inputNodes, options, progressCallback, stopOnError, **keywords)
        return batch.run(pollInterval, shouldCancel, timeout)

    # ------------------------------------------------------------------ asynchronous

    @staticmethod
    def _splitKeywords(options: TranslationOptions | None, keywords: dict[str, Any]
                       ) -> tuple[TranslationOptions, dict[str, Any]]:
        run = {"referenceMRNode", "setupLayout", "processFactory", "outputDirectory"}
        optionValues = {k: v for k, v in keywords.items() if k not in run}
        return (TranslationOptions.fromKeywords(options, **optionValues),
                {k: v for k, v in keywords.items() if k in run})

    def startBatch(self, inputNodes: Sequence[Any], options: TranslationOptions | None = None, *,
                   progressCallback: ProgressCallback | None = None, stopOnError: bool = False,
                   **keywords: Any) -> CT2MRTranslationBatch:
        """Start a batch in the background; drive it with :meth:`CT2MRTranslationBatch.update` from a timer.

        Args: as :meth:`translateBatch`.

        Returns:
            The running batch (its first inputs written; it starts the engine once all are).
        """
        options, keywords = self._splitKeywords(options, keywords)
        return CT2MRTranslationBatch(self, inputNodes, options, progressCallback, stopOnError, **keywords).start()

    def startTranslation(
        self,
        inputVolumeNode: slicer.vtkMRMLScalarVolumeNode,
        options: TranslationOptions | None = None,
        *,
        referenceMRNode: slicer.vtkMRMLScalarVolumeNode | None = None,
        outputDirectory: str | None = None,
        setupLayout: bool = True,
        progressCallback: ProgressCallback | None = None,
        processFactory: ProcessFactory | None = None,
        **optionValues: Any,
    ) -> CT2MRTranslationJob:
        """Write the input (and reference MR) to temporary files and start the engine in the background.

        Args: as :meth:`translate`.

        Returns:
            The running job; poll it with :meth:`CT2MRTranslationJob.update`.

        Raises:
            ValueError: no input volume, a label map, a volume without image data or outside a scene; an option
                outside the engine's schema (the message names the allowed values); histogram or Nyul harmonisation
                without a reference MR.
            FileNotFoundError: the model file does not exist.
            TypeError: an unknown option name.
            RuntimeError: the input could not be written or the engine could not be started.
        """
        validateInputNode(inputVolumeNode)
        if referenceMRNode is not None:
            validateInputNode(referenceMRNode, "reference MR")
        options = TranslationOptions.fromKeywords(options, **optionValues).validated()
        if options.needsReference and referenceMRNode is None:
            raise ValueError(f"Harmonisation '{options.harmonize}' needs a reference MR: select one, or choose 'none' "
                             "or 'zscore'.")
        options.engineArguments()  # validates before anything is written

        workDir = self.makeWorkDirectory()
        try:
            inputPath = nodes.writeVolumeNode(inputVolumeNode, os.path.join(workDir, "input.nrrd"))
            referencePath = None
            if referenceMRNode is not None and (options.harmonize != "none" or options.analysis):
                referencePath = nodes.writeVolumeNode(referenceMRNode, os.path.join(workDir, "reference_mr.nrrd"))
            outputDir = os.path.abspath(outputDirectory) if outputDirectory else os.path.join(workDir, "output")
            os.makedirs(outputDir, exist_ok=True)
            arguments = engine.translateArguments(inputPath, outputDir, options.engineArguments(referencePath),
                                                  overwrite=bool(outputDirectory))
            process = self.startEngine(arguments, processFactory)
        except BaseException:
            shutil.rmtree(workDir, ignore_errors=True)
            raise
        job = CT2MRTranslationJob(
            inputVolumeNode=inputVolumeNode, process=process, workDir=workDir, outputDir=outputDir, options=options,
            engineArguments=arguments, keepOutputDir=bool(outputDirectory), progressCallback=progressCallback,
            setupLayout=setupLayout, referenceMRNode=referenceMRNode,
        )
        job.notify()
        return job

    def finishTranslation(self, job: CT2MRTranslationJob) -> CT2MRTranslationResult:
        """Wait for a job's engine process to end and load its outputs into the scene.

        On success the three volume nodes are named ``"<input> synthetic MR"``, ``"<input> round-trip CT"`` and
        ``"<input> error map"``, get the input's exact IJK-to-RAS matrix and parent transform, display settings
        (:func:`nodes.setOutputDisplays`), are placed beside the input in subject hierarchy and, if the job asks for
        them, get the engine's histogram chart and metrics table and are shown in the compare layout. With the warp
        check a fourth node ``"<input> displacement (mm)"`` joins them, and the engine's anatomy metrics become
        ``result.anatomy``. With the uncertainty map ``"<input> uncertainty"`` joins them (a colour map, a fifth
        compare column); with the OOD check, ``result.ood`` and ``result.oodWarning``; their summary rows join the
        metrics table.

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
            while not job.update():
                job.process.wait()
            returnCode = job.process.returncode
            if returnCode != 0 or job.errorMessage is not None or job.doneEvent is None:
                raise RuntimeError(engine.failureMessage(job.errorMessage, job.process.stderrTail, returnCode))
            return self.loadTranslation(job)
        except BaseException:
            job.state = "failed"
            if job.keepOutputDir:
                _log.info("CT2MR outputs kept in %s", job.outputDir)
            raise
        finally:
            shutil.rmtree(job.workDir, ignore_errors=True)

    def loadTranslation(self, job: CT2MRTranslationJob) -> CT2MRTranslationResult:
        """Load the outputs the engine reported for one translation (its ``done`` event) into the scene.

        :meth:`finishTranslation` does it once a single translation's process has ended; a batch
        (:class:`~.jobs.CT2MRTranslationBatch`) does it for each item as soon as the engine reports that case done
        (its ``case_done`` event), while the process goes on with the next. The nodes are those described in
        :meth:`finishTranslation`; the job's files are left where they are.

        Args:
            job: a job whose ``doneEvent`` holds the engine's ``outputs`` (in ``job.outputDir``), ``device``,
                ``ct_window`` and, when asked for, ``anatomy`` and ``analysis`` (else read from
                ``anatomy.json`` / ``analysis.json`` in ``job.outputDir``).

        Returns:
            The result; ``job.state`` becomes ``"finished"``.

        Raises:
            RuntimeError: no ``done`` event, an output file missing, unreadable or not on the input's voxel grid,
                or an analysis asked for but not reported. No node is added.
        """
        if job.doneEvent is None:
            raise RuntimeError("CT to MR translation failed: the engine reported no outputs for "
                               f"'{job.inputVolumeNode.GetName()}' (no 'done' event).")
        outputNodes = nodes.loadOutputNodes(job.outputDir, job.doneEvent.get("outputs"), job.inputVolumeNode,
                                            job.options.warpCheck, job.options.uncertainty != "none")
        result = self._addToScene(job, outputNodes)
        job.state = "finished"
        return result

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

    def _addToScene(self, job: CT2MRTranslationJob, outputNodes: dict[str, slicer.vtkMRMLScalarVolumeNode]
                    ) -> CT2MRTranslationResult:
        inputNode = job.inputVolumeNode
        scene = inputNode.GetScene()
        anatomy = engine.readReportedJson(job.doneEvent, "anatomy", job.outputDir, engine.ANATOMY_FILE) \
            if job.options.warpCheck else {}
        analysisJson = engine.readReportedJson(job.doneEvent, "analysis", job.outputDir, engine.ANALYSIS_FILE) \
            if job.options.analysis else {}
        ood = engine.readReportedJson(job.doneEvent, "ood", job.outputDir, engine.OOD_FILE) if job.options.ood else {}
        uncertainty = dict(job.doneEvent.get("uncertainty") or {}) if job.options.uncertainty != "none" else {}
        trustRows = plots.trustMetricRows(ood, uncertainty)
        trustTable = None
        added = []
        try:
            for node in outputNodes.values():
                added.append(scene.AddNode(node))
                node.SetAndObserveTransformNodeID(inputNode.GetTransformNodeID())
                nodes.placeNextTo(node, inputNode)
            syntheticMR, roundTripCT, errorMap = (outputNodes[key] for key in nodes.OUTPUT_KEYS)
            nodes.setOutputDisplays(inputNode, syntheticMR, roundTripCT, errorMap)
            displacementMap = outputNodes.get(nodes.DISPLACEMENT_OUTPUT[0])
            if displacementMap is not None:
                nodes.setDisplacementDisplay(displacementMap, anatomy)
            uncertaintyMap = outputNodes.get(nodes.UNCERTAINTY_OUTPUT[0])
            if uncertaintyMap is not None:
                nodes.setUncertaintyDisplay(uncertaintyMap, uncertainty)
            analysis = None
            if job.options.analysis:
                if not analysisJson:
                    raise RuntimeError("The engine reported no analysis (metrics and histograms): update the ct2mr "
                                       "engine (Dependencies > Install missing...), or turn the analysis off.")
                analysis = plots.addAnalysis(inputNode, analysisJson)
                added += analysis.nodes
                for node in analysis.nodes:
                    if not node.IsA("vtkMRMLPlotSeriesNode"):
                        nodes.placeNextTo(node, inputNode)
                if analysis.metricsError:
                    _log.warning("CT2MR metrics incomplete: %s", analysis.metricsError)
            if trustRows and analysis is not None and analysis.metricsTable is not None:
                plots.appendMetricRows(analysis.metricsTable, trustRows)
                analysis.metrics.update({row["name"]: row["value"] for row in trustRows})
            elif trustRows:  # no analysis: the trust signals get a metrics table of their own
                trustTable = plots.metricsTableNode(scene, trustRows, f"{inputNode.GetName()} metrics")
                added.append(trustTable)
                nodes.placeNextTo(trustTable, inputNode)
            layoutId = None
            if job.setupLayout:
                layoutId = views.setupCompareLayout(
                    scene, [inputNode, syntheticMR, roundTripCT, errorMap, uncertaintyMap],
                    plotChartNode=analysis.chart if analysis else None,
                    tableNode=analysis.metricsTable if analysis else trustTable)
        except BaseException:
            for node in added:
                if node.GetScene() is not None:
                    scene.RemoveNode(node)
            raise
        device = str(job.doneEvent.get("device") or "")
        deviceMessage = job.deviceMessage
        requested = str(job.options.device or "auto")
        if not deviceMessage and requested.startswith("cuda") and device == "cpu":
            deviceMessage = f"{requested} was requested but CUDA is not available: the translation ran on the CPU."
        return CT2MRTranslationResult(
            syntheticMR=syntheticMR, roundTripCT=roundTripCT, errorMap=errorMap,
            outputDir=job.outputDir if job.keepOutputDir else None, log=list(job.log),
            seconds=time.monotonic() - job.startTime, layoutId=layoutId, device=device, deviceMessage=deviceMessage,
            retryMessages=list(job.retryMessages), ctWindow=engine.ctWindowOf(job.doneEvent), analysis=analysis,
            displacementMap=displacementMap, anatomy=dict(anatomy), uncertaintyMap=uncertaintyMap,
            uncertainty=uncertainty, ood=dict(ood), oodWarning=engine.oodWarningLine(ood), trustTable=trustTable,
        )

    def _defaultProcessFactory(self, engineArgs: Sequence[str]) -> TranslationProcess:
        return TranslationProcess(engineCommand(engineArgs, python=self.pythonExecutable))

    def makeWorkDirectory(self) -> str:
        """Create a new temporary folder ``CT2MR-*`` for one run's files (inputs, reference MR, outputs).

        Returns:
            Its path, under :attr:`temporaryDirectory` (created when missing), else the system's temporary folder;
            the caller removes it.
        """
        parent = self.temporaryDirectory
        if parent:
            os.makedirs(parent, exist_ok=True)
        return tempfile.mkdtemp(prefix="CT2MR-", dir=parent or None)

    def startEngine(self, arguments: Sequence[str], processFactory: ProcessFactory | None = None
                    ) -> TranslationProcessProtocol:
        """Start the engine in the background: ``python -m ct2mr ARGUMENTS`` with this Logic's Python.

        Args:
            arguments: the engine's arguments (:func:`engine.translateArguments`: one CT, or a list file of them).
            processFactory: builds the process from the arguments instead (tests inject a real small process).

        Returns:
            The running process (:class:`TranslationProcessProtocol`).

        Raises:
            RuntimeError: the process could not be started (the message says to install the dependencies).
        """
        factory = processFactory or self._defaultProcessFactory
        try:
            process = factory(arguments)
        except OSError as error:
            raise RuntimeError(
                f"Could not start the CT to MR engine ({error}). Install the dependencies (Dependencies > "
                "Install missing...)."
            ) from error
        _log.info("CT2MR engine started: %s", " ".join(str(a) for a in arguments))
        return process

    # ------------------------------------------------------------------ QA against a reference (issue 16)

    def startQuality(self, syntheticMRNode: slicer.vtkMRMLScalarVolumeNode,
                     referenceMRNode: slicer.vtkMRMLScalarVolumeNode,
                     ctNode: slicer.vtkMRMLScalarVolumeNode | None = None, *,
                     processFactory: ProcessFactory | None = None,
                     progressCallback: ProgressCallback | None = None) -> quality.CT2MRQualityJob:
        """Start ``ct2mr qa`` in a background engine process (:mod:`.quality`); never in Slicer's process.

        Args:
            syntheticMRNode: the synthetic MR (normalised units) on the CT's grid.
            referenceMRNode: a real MR of the same patient, registered and resampled onto that grid.
            ctNode: the translated CT for the body mask; ``None``: the reference's own body mask.
            processFactory: builds the process from the engine arguments; ``None`` runs ``python -m ct2mr``.
            progressCallback: ``progressCallback(fraction, message)``.

        Returns:
            The running job; poll :meth:`CT2MRQualityJob.update`, then :meth:`CT2MRQualityJob.finish`.

        Raises:
            ValueError: a node is missing or has no image data.
            RuntimeError: the inputs could not be written or the engine could not be started.
        """
        return quality.CT2MRQualityJob.start(
            syntheticMRNode, referenceMRNode, ctNode, self.makeWorkDirectory(),
            lambda arguments: self.startEngine(arguments, processFactory), progressCallback)

    def runQuality(self, syntheticMRNode: slicer.vtkMRMLScalarVolumeNode,
                   referenceMRNode: slicer.vtkMRMLScalarVolumeNode,
                   ctNode: slicer.vtkMRMLScalarVolumeNode | None = None, *, timeout: float | None = None,
                   pollInterval: float = 0.1, **keywords: Any) -> quality.CT2MRQualityResult:
        """QA against a reference and wait: the difference map (a volume on the synthetic MR's grid) and the
        metrics table (MAE, PSNR, SSIM, MS-SSIM inside the body mask), next to the synthetic MR.

        Args: as :meth:`startQuality`; ``timeout``: seconds after which the run is cancelled.

        Raises:
            RuntimeError: the engine failed (e.g. the reference is not on the CT's grid: the message says what
                differs) or timed out; no node is added.
        """
        job = self.startQuality(syntheticMRNode, referenceMRNode, ctNode, **keywords)
        deadline = None if timeout is None else time.monotonic() + timeout
        while not job.update():
            if deadline is not None and time.monotonic() > deadline:
                job.cancel()
                raise RuntimeError(f"QA against the reference did not finish within {timeout:g} s and was cancelled.")
            time.sleep(pollInterval)
        return job.finish()

    # ------------------------------------------------------------------ views

    @staticmethod
    def registerLayouts(scene: slicer.vtkMRMLScene | None = None) -> None:
        """Register the compare layouts in the scene's layout node (the module does it when Slicer starts)."""
        views.registerCompareLayouts(scene or slicer.mrmlScene)

    @staticmethod
    def restorePreviousViews(scene: slicer.vtkMRMLScene | None = None) -> bool:
        """Bring back the layout and crosshair from before the compare layout (:func:`views.restorePreviousViews`)."""
        return views.restorePreviousViews(scene or slicer.mrmlScene)

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

    def modelList(self) -> list[dict[str, Any]]:
        """Every model version known (:func:`models.modelList`)."""
        return models.modelList(self.registryFiles)

    def modelPath(self, name: str | None = None, version: str | None = None) -> str:
        """The local file of a model of the list (:func:`models.modelPath`).

        Raises:
            ValueError: unknown model, or not downloaded yet (the message says how to download or import it).
        """
        return models.modelPath(name, version, self.registryFiles)

    def importModel(self, path: str, name: str | None = None, version: str | None = None) -> dict[str, Any]:
        """Copy a local checkpoint into the user cache with the engine (:func:`models.importModel`)."""
        return models.importModel(path, name, version, self.pythonExecutable)

    @staticmethod
    def clearModels(name: str | None = None, version: str | None = None, keepLatest: bool = False) -> list[str]:
        """Remove cached model versions, never the bundled model (:func:`models.clearModels`)."""
        return models.clearModels(name, version, keepLatest)

    def startModelDownload(self, name: str, version: str | None = None, processFactory: ProcessFactory | None = None,
                           progressCallback: ProgressCallback | None = None) -> models.CT2MRModelDownloadJob:
        """Download a model of the list into the user cache in a background process (SHA-256 checked).

        Args:
            name: model name.
            version: version; ``None``: the newest listed.
            processFactory: builds the process from the engine arguments; ``None`` runs ``python -m ct2mr``.
            progressCallback: ``progressCallback(fraction, message)``.

        Returns:
            The running job; poll it, then :meth:`finishModelDownload` or :meth:`cancelModelDownload`.
        """
        arguments = models.CT2MRModelDownloadJob.arguments(name, version, self.registryFiles)
        process = (processFactory or self._defaultProcessFactory)(arguments)
        return models.CT2MRModelDownloadJob(name, version or None, process, progressCallback)

    @staticmethod
    def finishModelDownload(job: models.CT2MRModelDownloadJob) -> str:
        """Wait for a download to end and return the model file (:meth:`models.CT2MRModelDownloadJob.finish`)."""
        return job.finish()

    @staticmethod
    def cancelModelDownload(job: models.CT2MRModelDownloadJob) -> None:
        """Stop a download; the engine removes its partial file (:meth:`models.CT2MRModelDownloadJob.cancel`)."""
        job.cancel()

    # ------------------------------------------------------------------ dependencies

    @staticmethod
    def dependencyPlan() -> install.InstallPlan:
        """Check the engine's dependencies in this Python and plan what to install (:mod:`install`)."""
        return install.installPlan(install.checkDependencies(), install.engineSource())

    @staticmethod
    def engineInstalled() -> bool:
        """Whether the ``ct2mr`` package is importable in this Python (found, not imported)."""
        return importlib.util.find_spec("ct2mr") is not None

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
