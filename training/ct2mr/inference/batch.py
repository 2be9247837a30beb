"""Batch and cluster translation: ``ct2mr translate`` over a folder, several paths or a list file.

One input that is a CT file or a DICOM series folder keeps the single-volume behaviour of
:func:`ct2mr.inference.translate.translate_file` (``OUT_DIR/synthetic_mr.nii.gz`` ...). Anything else is a batch
(:func:`is_single_input`): a folder of volumes (:func:`ct2mr.io.images.list_images`: image files and DICOM series
sub-folders), several paths, or a list file (:data:`LIST_SUFFIXES`, :func:`read_list_file`). A batch writes

* ``OUT_DIR/<case_id>/`` with the outputs of :func:`ct2mr.inference.translate.translate_file` (each on that input's voxel grid),
  with ``analysis=True`` also ``analysis.json`` (:func:`ct2mr.evaluation.translation_analysis.analyze_outputs`), and a
  done-marker :data:`DONE_MARKER` (input path, size and modification time, model SHA-256, inference settings);
* ``OUT_DIR/translate_summary.json`` (``translate_summary.rank{R}.json`` per process under ``torchrun``): per case the
  input, status (:data:`STATUSES`), seconds, error message and the timeline of its preparation and translation;
  rewritten atomically after every case.

How it runs (the "batch" part of the translate speed issue):

* the checkpoint is loaded once and kept, with G and F on the device, across volumes;
* a background thread (one worker) reads and preprocesses the next case (:func:`ct2mr.io.images.read_image`,
  :func:`ct2mr.preprocessing.pipeline.preprocess`) while the current one runs through the networks;
* resumable: a case whose outputs exist and whose marker matches is skipped (``overwrite=True`` recomputes); the
  outputs of a case are written all or nothing (:func:`ct2mr.inference.translate.write_outputs`) and the marker only after
  them, so a crash mid-case leaves the case to be recomputed, never half-written outputs taken as done;
* a failing case is recorded and the others go on.

Cluster: under ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` set) every process takes its shard of the
sorted case list (:func:`ct2mr.inference.cluster.shard`), runs on ``cuda:LOCAL_RANK`` when CUDA is available and
writes only its own cases and summary. No process group is created and no process waits for another, so multi-node runs
work the same way (or any scheduler that sets ``RANK``/``WORLD_SIZE``, e.g. a SLURM array).
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import json
import logging
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from ct2mr.checks import check_input_image, prepare_output_dir
from ct2mr.inference.cluster import shard, shard_position
from ct2mr.inference.translate import (OUTPUT_NAMES, InferenceSettings, ProgressCallback, cluster_device,
                                       fit_harmonizer_for, resolve_device, translate_file)
from ct2mr.io.images import ImageReadError, OutputWriteError, image_suffix, list_images, read_image, write_json
from ct2mr.io.preprocessed import source_stamp
from ct2mr.models.checkpoint import Checkpoint, load_checkpoint
from ct2mr.preprocessing.pipeline import preprocess
from ct2mr.evaluation.translation_analysis import analyze_outputs, ct_window_of

__all__ = [
    "LIST_SUFFIXES",
    "DONE_MARKER",
    "SUMMARY_NAME",
    "STATUSES",
    "Case",
    "CaseResult",
    "BatchTranslation",
    "CaseCallback",
    "is_list_file",
    "read_list_file",
    "is_single_input",
    "collect_cases",
    "case_ids",
    "summary_path",
    "translate_batch",
]

logger = logging.getLogger(__name__)

#: Suffixes of list files: one path per line (``#`` starts a comment line); ``.csv``: the first column.
LIST_SUFFIXES = (".txt", ".lst", ".csv")
#: Done-marker written into ``OUT_DIR/<case_id>/`` after the outputs (what :func:`translate_batch` resumes from).
DONE_MARKER = ".ct2mr_done.json"
#: The batch summary in ``OUT_DIR`` (one process); under ``torchrun``: ``translate_summary.rank{R}.json``.
SUMMARY_NAME = "translate_summary.json"
#: Outcomes of a case; ``pending`` only in a summary of an interrupted or still running batch.
STATUSES = ("done", "skipped", "failed", "pending")
#: Inference settings that do not change the outputs, left out of the done-marker comparison.
_RESOURCE_SETTINGS = {"device", "gpu_memory_gb"}
#: Header cells of a CSV list file's first row that mark it as a header (compared case-insensitively).
_CSV_HEADERS = {"path", "input", "image", "ct", "file", "filename"}


@dataclass
class Case:
    """One input of a batch.

    Attributes:
        case_id: output sub-folder name (unique within the batch, :func:`case_ids`).
        path: CT file or DICOM series folder.
        error: why the input cannot be used at all (a missing path or an empty folder): the case fails without
            being read; ``None`` for a usable input.
    """

    case_id: str
    path: Path
    error: str | None = None


@dataclass
class CaseResult:
    """What happened to one case.

    Attributes:
        case_id: output sub-folder name.
        input: the input path as listed.
        status: one of :data:`STATUSES`; ``"running"`` while a case is in progress (callbacks only).
        seconds: wall time this case held the main loop (waiting for its preparation, networks, writing), s.
        error: one-line error message of a failed case.
        outputs: ``{key: path}`` of the written (or, when skipped, existing) outputs.
        timeline: UNIX times (s) ``prepare_start``, ``prepare_end`` (read + preprocess, background thread),
            ``translate_start``, ``translate_end`` (networks + write, main thread) and, with the analysis,
            ``analysis_end`` of a computed case.
        info: what a front end shows of a finished case (not in the summary): for a computed case
            ``translate_file``'s ``info`` (``device``, ``precision``, ``model_name``, ``mean_error_hu``, stage
            ``seconds``, ``anatomy`` with the warp check, ...) plus ``ct_window`` (HU) and, with the analysis,
            ``analysis`` (the dictionary of ``analysis.json``); for a skipped case ``model_name`` and ``ct_window``
            only (its ``anatomy.json`` / ``analysis.json`` are in its folder).
    """

    case_id: str
    input: str
    status: str = "pending"
    seconds: float = 0.0
    error: str | None = None
    outputs: dict[str, str] = field(default_factory=dict)
    timeline: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form used in the summary (seconds rounded to ms)."""
        return {"case": self.case_id, "input": self.input, "status": self.status, "seconds": round(self.seconds, 3),
                "error": self.error, "outputs": self.outputs,
                "timeline": {k: round(v, 3) for k, v in self.timeline.items()}}


@dataclass
class BatchTranslation:
    """The outcome of :func:`translate_batch` for this process.

    Attributes:
        out_dir: the output folder.
        summary: path of this process's summary JSON.
        results: one :class:`CaseResult` per case of this process's shard, in case order.
        rank: this process's rank; ``world_size``: number of processes sharing the case list.
        total_cases: cases in the whole (unsharded) list.
        device: the compute device used.
        seconds: wall time of the batch, s.
        summary_error: why the last update of the summary file failed (e.g. a full disk), ``None`` when the file on
            disk is up to date.
    """

    out_dir: Path
    summary: Path
    results: list[CaseResult]
    rank: int = 0
    world_size: int = 1
    total_cases: int = 0
    device: str = "cpu"
    seconds: float = 0.0
    summary_error: str | None = None

    def count(self, status: str) -> int:
        """Number of cases with ``status``."""
        return sum(r.status == status for r in self.results)

    @property
    def failed(self) -> list[CaseResult]:
        """The failed cases."""
        return [r for r in self.results if r.status == "failed"]

    def text(self) -> str:
        """A one-line account for people, e.g. ``3 case(s): 2 done, 1 skipped, 0 failed in 4.1 s on cpu ...``."""
        shard_note = ""
        if self.world_size > 1:
            shard_note = f" (rank {self.rank} of {self.world_size}, {self.total_cases} in all)"
        return (f"{len(self.results)} case(s){shard_note}: {self.count('done')} done, {self.count('skipped')} skipped, "
                f"{self.count('failed')} failed in {self.seconds:.1f} s on {self.device}. Outputs: {self.out_dir}/"
                f"<case>/, summary: {self.summary}")


#: ``callback(index, total, result)``: ``index`` 1-based within this process's cases; called with status
#: ``"running"`` when a computed case starts and once more with its final status (done, skipped or failed).
CaseCallback = Callable[[int, int, CaseResult], None]


def is_list_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an existing list file (suffix in :data:`LIST_SUFFIXES`, case-insensitive)."""
    path = Path(path)
    return path.suffix.lower() in LIST_SUFFIXES and path.is_file()


def read_list_file(path: str | os.PathLike) -> list[Path]:
    """The paths a list file names, in its order.

    One path per line; empty lines and lines starting with ``#`` are ignored; surrounding whitespace is stripped.
    A ``.csv`` file contributes its first column (a first row whose first cell is ``path``, ``input``, ``image``,
    ``ct``, ``file`` or ``filename`` is a header). Relative paths are relative to the list file's folder; ``~`` is
    expanded and ``..`` folded (symbolic links are kept).

    Args:
        path: the list file.

    Returns:
        The listed paths (not checked for existence).

    Raises:
        OSError: the file cannot be read.
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8-sig")
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    if path.suffix.lower() == ".csv":
        rows = [row for row in csv.reader(lines) if row and row[0].strip()]
        lines = [row[0].strip() for row in rows]
        if lines and lines[0].lower() in _CSV_HEADERS and not (path.parent / lines[0]).exists():
            lines = lines[1:]
    return [Path(os.path.normpath(path.parent / Path(line).expanduser())) for line in lines]


def is_single_input(inputs: Sequence[str | os.PathLike]) -> bool:
    """Whether ``inputs`` is one volume (single mode) rather than a batch.

    Single: exactly one path that is not a list file and is either not a folder (a CT file, or a path that does not
    exist, left to :func:`ct2mr.inference.translate.translate_file` to report) or a folder that is itself one DICOM series.

    Args:
        inputs: the command line's input paths.

    Returns:
        ``True`` for single mode.
    """
    if len(inputs) != 1:
        return False
    path = Path(inputs[0])
    if is_list_file(path):
        return False
    if not path.is_dir():
        return True
    try:
        return list_images(path) == [path]
    except (ImageReadError, OSError):  # an empty folder: the batch path reports it
        return False


def _case_stem(path: Path) -> str:
    """A case's natural id: a file's name without its image suffix, a folder's name (``case`` when empty)."""
    if path.is_dir():
        return path.name or "case"
    suffix = image_suffix(path)
    return (path.name[: -len(suffix)] if suffix else path.name) or "case"


def case_ids(paths: Sequence[Path]) -> list[str]:
    """Unique output folder names for ``paths``: the file name without its image suffix (a folder: its name).

    Collisions (``a/ct.nii.gz`` and ``b/ct.nii.gz``, or ``ct.nii.gz`` and ``ct.nrrd``) are resolved in list order:
    the first keeps the name, the next get ``_2``, ``_3`` ... (never a name another input has by itself), so the same
    sorted list always gives the same ids, on every rank.

    Args:
        paths: the inputs, in their (sorted) batch order.

    Returns:
        One id per path.
    """
    stems = [_case_stem(p) for p in paths]
    natural, taken, ids = set(stems), set(), []
    for stem in stems:
        case, n = stem, 1
        while case in taken or (n > 1 and case in natural):
            n += 1
            case = f"{stem}_{n}"
        taken.add(case)
        ids.append(case)
    return ids


def collect_cases(inputs: Iterable[str | os.PathLike]) -> list[Case]:
    """Expand files, folders and list files into the sorted, de-duplicated case list of a batch.

    Folders are expanded with :func:`ct2mr.io.images.list_images` (image files and DICOM series sub-folders, not
    recursively; a folder that is a DICOM series is one case); list files with :func:`read_list_file`, whose entries
    may again be files or folders. An entry that does not exist, or a folder that holds no volume, becomes a case
    that fails (``Case.error``) instead of stopping the batch.

    Args:
        inputs: paths as given on the command line.

    Returns:
        Cases sorted by absolute path (the same order however a path was written), with ids from
        :func:`case_ids`.

    Raises:
        ValueError: nothing at all to translate (e.g. only empty list files).
        OSError: a list file cannot be read.
    """
    entries: list[Path] = []
    for item in inputs:
        path = Path(item)
        entries.extend(read_list_file(path) if is_list_file(path) else [path])
    found: dict[str, tuple[Path, str | None]] = {}
    for entry in entries:
        try:
            paths, error = list_images(entry), None
        except (FileNotFoundError, ImageReadError) as exc:
            paths, error = [entry], str(exc)
        for path in paths:
            found.setdefault(str(path.resolve()), (path, error))
    if not found:
        raise ValueError("No input volume: the list file(s) name no path. Give CT files, folders or a list file "
                         f"({', '.join(LIST_SUFFIXES)}) with one path per line.")
    ordered = sorted(found.values(), key=lambda item: os.path.abspath(item[0]))
    ids = case_ids([path for path, _ in ordered])
    return [Case(case, path, error) for case, (path, error) in zip(ids, ordered)]


def summary_path(out_dir: str | os.PathLike, rank: int = 0, world_size: int = 1) -> Path:
    """``OUT_DIR/translate_summary.json``, or ``OUT_DIR/translate_summary.rank{R}.json`` when ``world_size > 1``."""
    name = SUMMARY_NAME if world_size == 1 else SUMMARY_NAME.replace(".json", f".rank{rank}.json")
    return Path(out_dir) / name


def _one_line(exc: BaseException) -> str:
    """The error of a failed case on one line, with the exception type unless it is an input or output error."""
    from ct2mr.checks import OutputCheckError

    text = " ".join(str(exc).split()) or type(exc).__name__
    if not isinstance(exc, (ImageReadError, FileNotFoundError, FileExistsError, ValueError, RuntimeError,
                            OutputWriteError, OutputCheckError)):
        text = f"{type(exc).__name__}: {text}"
    return text


def _fingerprint(case: Case, checkpoint: Checkpoint, settings: InferenceSettings, options: dict[str, Any]
                 ) -> dict[str, Any]:
    """What a done-marker must match for a case to be skipped (as stored in JSON: tuples become lists)."""
    stamp = source_stamp(case.path)
    record = {"input": str(case.path.resolve()), "size": stamp["size"], "mtime_ns": stamp["mtime_ns"],
              "model_sha256": checkpoint.sha256,
              "settings": {k: v for k, v in dataclasses.asdict(settings).items() if k not in _RESOURCE_SETTINGS},
              "options": options}
    return json.loads(json.dumps(record, default=str))


def _finished(case_dir: Path, fingerprint: dict[str, Any]) -> dict[str, str] | None:
    """The outputs of a finished case whose marker matches ``fingerprint``; ``None`` when it must be computed."""
    try:
        marker = json.loads((case_dir / DONE_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or any(marker.get(k) != v for k, v in fingerprint.items()):
        return None
    outputs = {key: str(case_dir / name) for key, name in OUTPUT_NAMES.items()}
    outputs.update({k: str(case_dir / Path(p).name) for k, p in (marker.get("outputs") or {}).items()})
    return outputs if all(Path(p).is_file() for p in outputs.values()) else None


def _analyze_case(case: Case, image: Any, outputs: dict[str, str], info: dict[str, Any], case_dir: Path,
                  references: Sequence[str | os.PathLike], progress: ProgressCallback | None) -> dict[str, Any]:
    """``analysis.json`` of one computed case (adds ``outputs["analysis"]``); an incomplete one warns."""
    report = (lambda fraction, message: progress("analysis", 1.0, message)) if progress is not None else None
    result = analyze_outputs(image, outputs, info, case_dir, list(references) or None, report)
    if result["error"]:
        warnings.warn(f"{case.case_id}: analysis incomplete: {result['error']}", RuntimeWarning, stacklevel=2)
    return result


def translate_batch(inputs: Sequence[str | os.PathLike], out_dir: str | os.PathLike,
                    model: str | os.PathLike | None = None, settings: InferenceSettings | None = None,
                    progress: ProgressCallback | None = None, on_case: CaseCallback | None = None,
                    overwrite: bool = False, harmonize: str = "none",
                    reference_mr: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
                    rank: int | None = None, world_size: int | None = None, prefetch: bool = True,
                    command: str | None = None, force: bool = False, analysis: bool = False,
                    **translate_options: Any) -> BatchTranslation:
    """Translate every CT of a collection into ``OUT_DIR/<case_id>/``, resumably, sharded under ``torchrun``.

    The checkpoint is loaded once (G and F stay on the device); while a case runs through G and F, a background
    thread reads and preprocesses the next one (``prefetch``). Each case is written by
    :func:`ct2mr.inference.translate.translate_file` (all or nothing, on the input's voxel grid), then its
    :data:`DONE_MARKER`. See the module docstring for the layout.

    Args:
        inputs: CT files, folders (:func:`ct2mr.io.images.list_images`) and list files (:func:`read_list_file`).
        out_dir: output folder, created when missing.
        model: a ct2mr checkpoint; ``None`` uses the bundled default model.
        settings: inference settings; ``device`` ``auto``/``cuda`` becomes ``cuda:LOCAL_RANK`` under ``torchrun``
            (:func:`ct2mr.inference.translate.cluster_device`).
        progress: ``callback(stage, fraction_of_stage, message)`` of the current case (stages preprocess, G, F,
            postprocess, write).
        on_case: :data:`CaseCallback`, for an overall display over cases.
        overwrite: recompute cases that are already done.
        harmonize: post-hoc harmonisation of the synthetic MR (as :func:`ct2mr.inference.translate.translate_file`); the
            harmonizer is fitted once for the batch.
        reference_mr: reference MR file(s) or folder(s) for ``harmonize``.
        rank: this process's shard (default: ``RANK`` from the environment, else 0).
        world_size: number of shards (default: ``WORLD_SIZE`` from the environment, else 1).
        prefetch: prepare the next case in a background thread (``False``: one case after the other).
        command: the command line, recorded in the summary.
        force: translate CTs that fail the HU plausibility check (:func:`ct2mr.checks.check_input_image`) with a
            warning instead of failing the case.
        analysis: also write ``OUT_DIR/<case_id>/analysis.json`` per case (``translate --analysis``: metrics table
            and histograms, :func:`ct2mr.evaluation.translation_analysis.analyze_outputs`, with ``reference_mr`` for the
            reference histogram and W1), listed in the case's outputs and kept in ``CaseResult.info["analysis"]``;
            recorded in the done-marker, so a case done without it is recomputed. An incomplete analysis is a
            warning, not a failure.
        **translate_options: further keyword arguments of :func:`ct2mr.inference.translate.translate_file` (e.g.
            ``warp_check=True``); recorded in the done-marker, so changing them recomputes.

    Returns:
        The :class:`BatchTranslation` of this process; failed cases are in it, not raised. A case whose outputs
        cannot be written (a full disk) fails with the message of :class:`ct2mr.io.images.OutputWriteError` and leaves no
        file under a final name; the summary records it. When the summary itself cannot be written,
        ``summary_error`` says why.

    Raises:
        ValueError: nothing to translate, bad settings, an unknown ``harmonize``, a rank outside the world size.
        FileNotFoundError, ct2mr.models.checkpoint.CheckpointError: unusable model or references (before any case runs).
        ct2mr.checks.OutputCheckError: ``out_dir`` cannot be created or written (before the model is loaded).
    """
    run = _open_batch(inputs, out_dir, model, settings, harmonize, reference_mr, rank, world_size, on_case, command,
                      analysis, translate_options)
    todo = _plan_cases(run, overwrite)
    run.write_summary()  # once for all up-front outcomes, then after every computed case
    _translate_cases(run, todo, progress, prefetch, force)
    return run.outcome()


@dataclass
class _BatchRun:
    """One :func:`translate_batch` call in progress: what it runs with, this process's cases and the summary.

    Attributes:
        inputs, command: as given (recorded in the summary).
        out_dir: the output folder.
        settings: the inference settings, ``device`` resolved.
        device: the compute device.
        checkpoint: the model, loaded once.
        harmonize, harmonizer: the harmonisation method and its fitted harmonizer (``None`` for none).
        references: the reference MR paths as given.
        translate_options: further :func:`ct2mr.inference.translate.translate_file` arguments.
        options: what the done-marker records besides the settings (harmonisation, references, options, analysis).
        analysis: write ``analysis.json`` per case.
        rank, world_size: this process's shard; ``total_cases``: cases in the whole list.
        mine: this process's cases, in order.
        on_case: the :data:`CaseCallback`, or ``None``.
        start: ``time.perf_counter()`` at the start; ``started``: the ISO 8601 UTC start time.
        summary: this process's summary file; ``results``: one :class:`CaseResult` per case of ``mine``.
        summary_error: why the last summary update failed, ``None`` when it is up to date.
    """

    inputs: Sequence[str | os.PathLike]
    command: str | None
    out_dir: Path
    settings: InferenceSettings
    device: Any
    checkpoint: Checkpoint
    harmonize: str
    harmonizer: Any
    references: list
    translate_options: dict[str, Any]
    options: dict[str, Any]
    analysis: bool
    rank: int
    world_size: int
    total_cases: int
    mine: list[Case]
    on_case: CaseCallback | None
    start: float
    started: str
    summary: Path = field(init=False)
    results: list[CaseResult] = field(init=False)
    summary_error: str | None = None

    def __post_init__(self) -> None:
        """The summary path and one pending result per case."""
        self.summary = summary_path(self.out_dir, self.rank, self.world_size)
        self.results = [CaseResult(case.case_id, str(case.path)) for case in self.mine]
        self._index = {case.case_id: i for i, case in enumerate(self.mine)}

    @property
    def ct_window(self) -> list[float]:
        """The model's CT window (HU), shown by front ends."""
        return [float(v) for v in self.checkpoint.preprocessing.ct_window]

    def result(self, case: Case) -> CaseResult:
        """The result of ``case``."""
        return self.results[self._index[case.case_id]]

    def notify(self, case: Case) -> None:
        """Call ``on_case(index, total, result)`` for ``case``."""
        if self.on_case is not None:
            self.on_case(self._index[case.case_id] + 1, len(self.mine), self.result(case))

    def write_summary(self) -> None:
        """Rewrite the summary file; a failure (a full disk) is kept in ``summary_error`` and logged, not raised."""
        counts = {status: sum(r.status == status for r in self.results) for status in STATUSES}
        checkpoint = self.checkpoint
        payload = {"command": self.command, "inputs": [str(p) for p in self.inputs], "out_dir": str(self.out_dir),
                   "model": str(checkpoint.path), "model_name": checkpoint.name, "model_sha256": checkpoint.sha256,
                   "settings": dataclasses.asdict(self.settings), "options": self.options, "device": str(self.device),
                   "rank": self.rank, "world_size": self.world_size, "total_cases": self.total_cases,
                   "started": self.started, "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                   "seconds": round(time.perf_counter() - self.start, 3), "counts": counts,
                   "cases": [r.to_dict() for r in self.results]}
        try:
            write_json(self.summary, payload, default=str)
            self.summary_error = None
        except OSError as exc:  # a full disk: the cases go on (their failures are in the results), reported at the end
            self.summary_error = _one_line(exc)
            logger.warning("Could not update %s: %s", self.summary, self.summary_error)

    def finish(self, case: Case, status: str, error: str | None = None, outputs: dict | None = None,
               write: bool = True) -> None:
        """Record a case's final ``status``, update the summary (``write``) and tell ``on_case``."""
        result = self.result(case)
        result.status, result.error, result.outputs = status, error, dict(outputs or {})
        if error:
            logger.info("%s failed: %s", case.case_id, error)
        if write:
            self.write_summary()
        self.notify(case)

    def close(self) -> None:
        """Mark a case interrupted mid-run as pending again and write the summary a last time."""
        for result in self.results:
            if result.status == "running":
                result.status = "pending"
        self.write_summary()

    def outcome(self) -> BatchTranslation:
        """The :class:`BatchTranslation` of this process."""
        return BatchTranslation(self.out_dir, self.summary, self.results, self.rank, self.world_size,
                                self.total_cases, str(self.device), time.perf_counter() - self.start,
                                self.summary_error)


def _open_batch(inputs: Sequence[str | os.PathLike], out_dir: str | os.PathLike, model: str | os.PathLike | None,
                settings: InferenceSettings | None, harmonize: str, reference_mr: Any, rank: int | None,
                world_size: int | None, on_case: CaseCallback | None, command: str | None, analysis: bool,
                translate_options: dict[str, Any]) -> _BatchRun:
    """Check the arguments, shard the cases, prepare the folder, load the model and fit the harmonizer, in order."""
    from ct2mr.inference.harmonization import HARMONIZATION_METHODS

    start = time.perf_counter()
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    if harmonize not in HARMONIZATION_METHODS:
        raise ValueError(f"harmonize must be one of {HARMONIZATION_METHODS}, got {harmonize!r}.")
    rank, world_size = shard_position(rank, world_size)
    cases = collect_cases(inputs)
    mine = shard(cases, rank, world_size)
    settings = dataclasses.replace(settings or InferenceSettings())
    out_dir = Path(out_dir)
    prepare_output_dir(out_dir, "output folder (-o)")  # before any work: a file, read-only or /proc path fails here
    device = resolve_device(cluster_device(settings.device))
    settings.device = str(device)  # resolved once: a CUDA fallback warns once, not per case
    checkpoint = load_checkpoint(model)
    harmonizer = fit_harmonizer_for(harmonize, reference_mr, checkpoint)
    references = [reference_mr] if isinstance(reference_mr, (str, os.PathLike)) else list(reference_mr or [])
    options = {"harmonize": harmonize, "reference_mr": [str(Path(p).resolve()) for p in references],
               **translate_options, **({"analysis": True} if analysis else {})}
    return _BatchRun(inputs, command, out_dir, settings, device, checkpoint, harmonize, harmonizer, references,
                     translate_options, options, analysis, rank, world_size, len(cases), mine, on_case, start,
                     started)


def _plan_cases(run: _BatchRun, overwrite: bool) -> list[tuple[Case, dict[str, Any]]]:
    """Settle unusable and already-done cases up front; ``(case, fingerprint)`` of those to compute."""
    todo: list[tuple[Case, dict[str, Any]]] = []
    for case in run.mine:
        if case.error:
            run.finish(case, "failed", case.error, write=False)
            continue
        try:
            fingerprint = _fingerprint(case, run.checkpoint, run.settings, run.options)
        except OSError as exc:
            run.finish(case, "failed", _one_line(exc), write=False)
            continue
        done = None if overwrite else _finished(run.out_dir / case.case_id, fingerprint)
        if done is not None:
            run.result(case).info = {"model_name": run.checkpoint.name, "ct_window": run.ct_window}
            run.finish(case, "skipped", outputs=done, write=False)
        else:
            todo.append((case, fingerprint))
    return todo


def _prepare_case(case: Case, checkpoint: Checkpoint, force: bool) -> tuple[Any, Any, dict[str, float]]:
    """Read, check and preprocess one CT: ``(image, preprocessed, timeline)`` (runs in the prefetch thread)."""
    t0 = time.time()
    image, _ = check_input_image(read_image(case.path), "ct", str(case.path), force)
    pre = preprocess(image, "ct", checkpoint.preprocessing)
    return image, pre, {"prepare_start": t0, "prepare_end": time.time()}


def _translate_cases(run: _BatchRun, todo: list[tuple[Case, dict[str, Any]]], progress: ProgressCallback | None,
                     prefetch: bool, force: bool) -> None:
    """Compute the cases in order, the next one prepared in a background thread while one runs (``prefetch``)."""
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="ct2mr-prefetch")
    try:
        future = pool.submit(_prepare_case, todo[0][0], run.checkpoint, force) if todo and prefetch else None
        for i, (case, fingerprint) in enumerate(todo):
            t_case = time.perf_counter()
            run.result(case).status = "running"
            run.notify(case)
            try:
                image, pre, timeline = future.result() if prefetch else _prepare_case(case, run.checkpoint, force)
                error = None
            except Exception as exc:  # unreadable or corrupt input: this case fails, the others go on
                error = _one_line(exc)
            following = todo[i + 1][0] if i + 1 < len(todo) else None
            future = (pool.submit(_prepare_case, following, run.checkpoint, force)
                      if prefetch and following is not None else None)
            if error is not None:
                run.result(case).seconds = time.perf_counter() - t_case
                run.finish(case, "failed", error)
                continue
            _translate_case(run, case, fingerprint, image, pre, timeline, t_case, progress)
            del image, pre  # before the next case is taken
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        run.close()  # interrupted: the case in progress is still to do


def _translate_case(run: _BatchRun, case: Case, fingerprint: dict[str, Any], image: Any, pre: Any,
                    timeline: dict[str, float], t_case: float, progress: ProgressCallback | None) -> None:
    """Translate one prepared case into ``OUT_DIR/<case_id>/``, then its done-marker; a failure is recorded."""
    result = run.result(case)
    case_dir = run.out_dir / case.case_id
    (case_dir / DONE_MARKER).unlink(missing_ok=True)  # outputs replaced below are no longer "done"
    timeline["translate_start"] = time.time()
    try:
        written = translate_file(case.path, case_dir, settings=run.settings, progress=progress,
                                 harmonize=run.harmonize, checkpoint=run.checkpoint, image=image, preprocessed=pre,
                                 harmonizer=run.harmonizer, overwrite=True, **run.translate_options)
        timeline["translate_end"] = time.time()
        outputs = {key: str(path) for key, path in written["outputs"].items()}
        info = {**written["info"], "ct_window": ct_window_of(written["info"])}
        if run.analysis:
            info["analysis"] = _analyze_case(case, image, outputs, written["info"], case_dir, run.references,
                                             progress)
            timeline["analysis_end"] = time.time()
        result.timeline, result.seconds, result.info = timeline, time.perf_counter() - t_case, info
        marker = {**fingerprint, "case": case.case_id, "outputs": {k: Path(p).name for k, p in outputs.items()},
                  "seconds": round(result.seconds, 3), "device": written["info"].get("device"),
                  "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        write_json(case_dir / DONE_MARKER, marker, default=str)  # after the outputs: only then "done"
    except Exception as exc:  # out of memory, a full disk ...: recorded, the batch goes on
        timeline.setdefault("translate_end", time.time())
        result.timeline, result.seconds = timeline, time.perf_counter() - t_case
        run.finish(case, "failed", _one_line(exc))
        return
    run.finish(case, "done", outputs=outputs)
