"""Batch preprocessing of CT and MR collections into training-ready HDF5 volumes: ``ct2mr preprocess``.

Thesis section 4 (Algorithm 1) applied to whole collections. Each 3D volume (4D series are split, e.g. cardiac
phases or respiratory gates) becomes one file of the preprocessed format of section 4.6, described, read and
recognised by :mod:`ct2mr.io.preprocessed`; this module is the command around it: planning, parallel worker
processes, the run log and the summary.

The batch is re-runnable: a volume whose output exists and records the same source (path, size, modification time)
and the same parameters is skipped. Outputs are written atomically (temporary file, then rename); an input is never
overwritten, and neither is a file that is not a ct2mr output. A volume that fails (unreadable, truncated, ...) is
reported with its error while the others are processed. Each run appends one JSON line per volume to
``OUT_DIR/preprocess_log.jsonl``.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime as _dt
import json
import logging
import multiprocessing
import os
import platform
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import SimpleITK as sitk

from ct2mr.checks import prepare_output_dir, replace_nonfinite
from ct2mr.provenance import git_commit, software_versions
from ct2mr.io.images import HDF5_SUFFIXES, ImageReadError, image_suffix, list_images, read_volumes, write_hdf5
from ct2mr.io.preprocessed import (PREPROCESSED_ATTR, output_name, parameter_hash, preprocessed_attributes,
                                   read_attributes, source_stamp, volume_stem)
from ct2mr.preprocessing.pipeline import MODALITIES, PreprocessingConfig, preprocess

__all__ = [
    "LOG_NAME",
    "STATUSES",
    "VolumeResult",
    "BatchSummary",
    "preprocess_batch",
    "default_jobs",
]

logger = logging.getLogger(__name__)

#: The run log written in the output folder (one JSON object per volume and run).
LOG_NAME = "preprocess_log.jsonl"
#: Outcomes of one volume.
STATUSES = ("ok", "skipped", "failed")


@dataclass
class VolumeResult:
    """The outcome of one 3D volume of the batch.

    Attributes:
        name: volume name (file stem, ``_tNNN`` appended for a volume of a 4D series).
        source: the input path as given.
        output: the HDF5 path (written, or up to date).
        status: ``"ok"`` (written), ``"skipped"`` (already up to date) or ``"failed"``.
        message: the error for a failure; a short description otherwise.
        seconds: wall time spent on this volume (reading is shared by the volumes of a 4D file).
        flat: the MR volume was flat (P99 ~ P1): written as zeros, flagged, skipped by training.
        warnings: warning messages raised while reading or preprocessing it (e.g. 1 mm spacing assumed).
    """

    name: str
    source: str
    output: str
    status: str
    message: str = ""
    seconds: float = 0.0
    flat: bool = False
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        return dataclasses.asdict(self)


@dataclass
class BatchSummary:
    """Everything a batch did.

    Attributes:
        out_dir: the output folder.
        results: one :class:`VolumeResult` per volume, in input order.
        seconds: wall time of the whole batch.
        log: the run log (``OUT_DIR/preprocess_log.jsonl``).
    """

    out_dir: Path
    results: list[VolumeResult]
    seconds: float
    log: Path

    def count(self, status: str) -> int:
        """Number of volumes with ``status`` (one of :data:`STATUSES`)."""
        return sum(r.status == status for r in self.results)

    @property
    def failed(self) -> list[VolumeResult]:
        """The failed volumes."""
        return [r for r in self.results if r.status == "failed"]

    @property
    def flagged(self) -> list[VolumeResult]:
        """The flat (flagged) volumes written or found up to date."""
        return [r for r in self.results if r.flat and r.status != "failed"]

    def text(self) -> str:
        """A human-readable summary: counts, then one line per failure and per flagged volume."""
        lines = [f"{len(self.results)} volume(s) in {self.seconds:.1f} s: {self.count('ok')} written, "
                 f"{self.count('skipped')} up to date (skipped), {self.count('failed')} failed, "
                 f"{len(self.flagged)} flagged flat -> {self.out_dir}"]
        lines += [f"  FAILED  {r.name} ({r.source}): {r.message}" for r in self.failed]
        lines += [f"  FLAGGED {r.name}: flat volume (P99 ~ P1), stored as zeros and skipped by training"
                  for r in self.flagged]
        return "\n".join(lines)


def default_jobs() -> int:
    """The default number of parallel worker processes: ``min(4, CPU count)``."""
    return max(1, min(4, os.cpu_count() or 1))


def _series_length(path: Path) -> int | None:
    """Number of volumes along the 4th axis of a 4D file, ``None`` for a 3D input (header only, no pixel data)."""
    if path.is_dir():
        return None
    if image_suffix(path) in HDF5_SUFFIXES:
        import h5py

        try:
            with h5py.File(path, "r") as f:
                shape = f["volume"].shape if "volume" in f else ()
        except OSError as exc:
            raise ImageReadError(f"{path} is not a readable HDF5 file ({exc}). Is it truncated or of another "
                                 "format?") from exc
        return int(shape[0]) if len(shape) == 4 else None
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        last = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unknown error"
        raise ImageReadError(f"{path} could not be read as a medical image ({last}). Is the file truncated or of "
                             "another kind?") from exc
    if reader.GetDimension() == 4:
        return int(reader.GetSize()[3])
    return None


def _process_task(task: dict[str, Any]) -> list[VolumeResult]:
    """Read one input (all its wanted volumes), preprocess and write each; never raises."""
    path = Path(task["path"])
    config = PreprocessingConfig.from_dict(task["config"])
    wanted: list[tuple[str, int | None, str]] = task["volumes"]
    results: list[VolumeResult] = []
    start = time.perf_counter()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            indices = [i for _, i, _ in wanted if i is not None]
            volumes = read_volumes(path, select=indices if task["series_length"] is not None else None)
        read_warnings = [str(w.message) for w in caught]
    except Exception as exc:  # noqa: BLE001 - every failure becomes a result; the batch goes on
        message = _error_message(exc)
        return [VolumeResult(name, task["source"], out, "failed", message, time.perf_counter() - start)
                for name, _, out in wanted]
    read_seconds = (time.perf_counter() - start) / max(1, len(wanted))
    for (name, index, out), (_, image) in zip(wanted, volumes):
        t0 = time.perf_counter()
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                image, _ = replace_nonfinite(image, task["modality"], name)  # NaN/inf: counted, warned, replaced
                pre = preprocess(image, task["modality"], config)
                write_hdf5(pre.array, out, _attributes(pre, image, task, name, index))
            messages = read_warnings + [str(w.message) for w in caught]
            record = pre.record
            results.append(VolumeResult(
                name, task["source"], out, "ok",
                f"{record.input_grid['size']} -> {record.padded_grid['size']} voxels (x, y, z), range "
                f"{[round(v, 3) for v in record.intensity_range]}", read_seconds + time.perf_counter() - t0,
                bool(record.flat), messages))
            logger.info("%s: %s", name, results[-1].message)
            del pre
        except Exception as exc:  # noqa: BLE001
            results.append(VolumeResult(name, task["source"], out, "failed", _error_message(exc),
                                        read_seconds + time.perf_counter() - t0, False, read_warnings))
    return results


def _attributes(pre: Any, image: sitk.Image, task: dict[str, Any], name: str, index: int | None) -> dict[str, Any]:
    """The output attributes of one volume of ``task`` (:func:`ct2mr.io.preprocessed.preprocessed_attributes`)."""
    return preprocessed_attributes(
        pre.record, pre.array, image, name=name, source=task["source"], path=task["path"], stamp=task["stamp"],
        index=index, series_length=task["series_length"], params_hash=task["params_hash"], select=task["select"],
        command=task["command"], software=task["software"], git_commit=task["git_commit"])


def _error_message(exc: BaseException) -> str:
    """One line for a failed volume: the message, with the exception type unless it is a reading or input error."""
    text = str(exc).strip() or type(exc).__name__
    if isinstance(exc, MemoryError):
        text = "out of memory; run with fewer --jobs"
    if not isinstance(exc, (ImageReadError, FileNotFoundError, ValueError)):
        text = f"{type(exc).__name__}: {text}"
    return text


def _init_worker(threads: int) -> None:
    """Worker-process set-up: SimpleITK threads shared fairly between the workers."""
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(max(1, threads))
    logging.basicConfig(level=logging.WARNING)


def _mp_context() -> multiprocessing.context.BaseContext:
    """``fork`` on Linux (workers start at once and need no ``if __name__ == "__main__"`` guard in scripts; ITK's
    thread pool is fork-safe), ``spawn`` elsewhere (macOS, Windows: call from under such a guard)."""
    if platform.system() == "Linux":
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


def _up_to_date(out: Path, abspath: str, stamp: dict[str, int], params_hash: str) -> tuple[bool, dict | None]:
    """``(up_to_date, attrs)`` of an existing output; ``attrs`` is ``None`` for a file that is not a ct2mr output."""
    attrs = read_attributes(out)
    if attrs is None or attrs.get(PREPROCESSED_ATTR) != 1:
        return False, None
    same = (attrs.get("source_abspath") == abspath and attrs.get("source_size") == stamp["size"]
            and attrs.get("source_mtime_ns") == stamp["mtime_ns"] and attrs.get("params_hash") == params_hash)
    return same, attrs


def _append_log(log: Path, run: str, results: Iterable[VolumeResult]) -> None:
    """Append one JSON line per result, tagged with the run's start time, to the run log."""
    with open(log, "a", encoding="utf-8") as f:
        for result in results:
            f.write(json.dumps({"run": run, **result.to_dict()}) + "\n")


def preprocess_batch(inputs: str | os.PathLike | Iterable[str | os.PathLike], out_dir: str | os.PathLike,
                     modality: str, config: PreprocessingConfig | None = None, select: Sequence[int] | None = None,
                     jobs: int | None = None, force: bool = False,
                     progress: Callable[[int, int, VolumeResult], None] | None = None,
                     command: str | None = None) -> BatchSummary:
    """Preprocess every volume of a collection into ``out_dir`` (thesis section 4, Algorithm 1; section 4.6).

    Each input file or DICOM folder gives one output per 3D volume (the format of :mod:`ct2mr.io.preprocessed`,
    named by :func:`ct2mr.io.preprocessed.output_name`); 4D series are split into their volumes (``select`` keeps
    some). Volumes run in parallel worker processes; an output that is up to date (same source path, size,
    modification time and parameter hash) is skipped; every failure is recorded while the other volumes go on.

    Args:
        inputs: files and folders (:func:`ct2mr.io.images.list_images`: NIfTI, NRRD, MHA, HDF5, DICOM series folders).
        out_dir: output folder, created if missing.
        modality: ``"ct"`` or ``"mr"``.
        config: preprocessing parameters (the thesis's defaults when ``None``); ``n4=True`` needs ``modality="mr"``.
        select: 0-based indices along the 4th axis to keep from 4D series (``None``: all); 3D inputs ignore it.
        jobs: worker processes (default :func:`default_jobs`; 1 runs in this process).
        force: re-process volumes even when their outputs are up to date.
        progress: ``callback(done, total, result)`` after each volume (skipped ones included).
        command: the command line to record in each output's ``config`` attribute.

    Returns:
        The :class:`BatchSummary`; check :attr:`BatchSummary.failed`.

    Raises:
        ValueError: unknown modality, ``n4`` for CT, a bad ``select`` or ``jobs``, two volumes that would write the
            same output, or an output path that is one of the inputs.
        FileNotFoundError: an input path does not exist.
        ct2mr.io.images.ImageReadError: an input folder holds no volume.
    """
    config, select, jobs = _check_arguments(modality, config, select, jobs)
    start = time.perf_counter()
    out_dir = Path(out_dir)
    paths = list_images(inputs)
    prepare_output_dir(out_dir, "output folder (--out)")  # created, probed, stale temporary files removed
    params_hash = parameter_hash(modality, config)
    common = {"modality": modality, "config": config.to_dict(), "select": select, "command": command,
              "params_hash": params_hash, "software": software_versions("numpy", "SimpleITK", "h5py"),
              "git_commit": git_commit()}
    plan = _Plan(out_dir, {str(p.resolve()) for p in paths}, force)
    for p_index, path in enumerate(paths):
        _plan_input(plan, p_index, path, select, params_hash, common)
    report = _Reporter(out_dir / LOG_NAME, len(plan.order), progress)
    report([plan.results[k] for k in plan.order if k in plan.results])
    _run_tasks(plan.tasks, jobs, plan.results, report)
    summary = BatchSummary(out_dir, [plan.results[k] for k in plan.order], time.perf_counter() - start, report.log)
    logger.info("%s", summary.text())
    return summary


def _check_arguments(modality: str, config: PreprocessingConfig | None, select: Sequence[int] | None,
                     jobs: int | None) -> tuple[PreprocessingConfig, list[int] | None, int]:
    """``(config, select, jobs)`` with their defaults; a ``ValueError`` for a bad modality, n4, select or jobs."""
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}.")
    config = config or PreprocessingConfig()
    if config.n4 and modality != "mr":
        raise ValueError("N4 bias-field correction (n4) applies to MR only; drop it for --modality ct.")
    if select is not None:
        select = [int(i) for i in select]
        if not select or min(select) < 0:
            raise ValueError(f"select must list 0-based indices (>= 0) along the 4th axis, got {select}.")
    jobs = default_jobs() if jobs is None else int(jobs)
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {jobs}.")
    return config, select, jobs


@dataclass
class _Plan:
    """What a batch does, decided before any volume is read.

    Attributes:
        out_dir: the output folder.
        input_paths: resolved paths of every input (an output must not be one of them).
        force: re-process up-to-date volumes.
        order: ``(input index, volume index)`` of every volume, in input order.
        results: the outcomes known up front (skipped, failed), by key.
        tasks: one task per input with volumes to process (the worker's argument, :func:`_process_task`).
        owners: resolved output path -> the input that writes it (two inputs must not share an output).
    """

    out_dir: Path
    input_paths: set[str]
    force: bool
    order: list[tuple[int, int]] = field(default_factory=list)
    results: dict[tuple[int, int], VolumeResult] = field(default_factory=dict)
    tasks: list[dict[str, Any]] = field(default_factory=list)
    owners: dict[str, str] = field(default_factory=dict)


def _plan_input(plan: _Plan, p_index: int, path: Path, select: list[int] | None, params_hash: str,
                common: dict[str, Any]) -> None:
    """Add one input's volumes to ``plan``: a task for those to process, results for the others."""
    source = str(path)
    stem = volume_stem(path)
    try:
        length = _series_length(path)
        stamp = source_stamp(path)
    except Exception as exc:  # noqa: BLE001 - an unreadable header fails this input only
        key = (p_index, 0)
        plan.order.append(key)
        plan.results[key] = VolumeResult(stem, source, str(plan.out_dir / output_name(stem)), "failed",
                                         _error_message(exc))
        return
    indices: list[int | None] = [None] if length is None else (list(range(length)) if select is None
                                                                 else list(select))
    wanted = []
    for v_index, index in enumerate(indices):
        key = (p_index, v_index)
        plan.order.append(key)
        volume = _plan_volume(plan, key, path, stem, index, length, stamp, params_hash)
        if volume is not None:
            wanted.append(volume)
    if wanted:
        plan.tasks.append({**common, "path": str(path), "source": source, "stamp": stamp, "series_length": length,
                           "volumes": [(n, i, o) for n, i, o, _ in wanted], "keys": [k for *_, k in wanted]})


def _plan_volume(plan: _Plan, key: tuple[int, int], path: Path, stem: str, index: int | None, length: int | None,
                 stamp: dict[str, int], params_hash: str) -> tuple[str, int | None, str, tuple[int, int]] | None:
    """``(name, index, output, key)`` of a volume to process, or ``None`` with its outcome put in ``plan.results``.

    Raises:
        ValueError: the output would overwrite an input, or another input writes it too.
    """
    source = str(path)
    name = stem if index is None else f"{stem}_t{index:03d}"
    out = plan.out_dir / output_name(stem, index)
    _claim_output(plan, out, path)
    if length is not None and index >= length:
        plan.results[key] = VolumeResult(name, source, str(out), "failed",
                                         f"{path}: index {index} is outside the 4D series of {length} volumes "
                                         f"(0..{length - 1}).")
        return None
    if out.exists():
        fresh, attrs = _up_to_date(out, str(path.resolve()), stamp, params_hash)
        if attrs is None:
            plan.results[key] = VolumeResult(name, source, str(out), "failed",
                                             f"{out} exists and is not a ct2mr output; it is left untouched. "
                                             "Move it or choose another --out folder.")
            return None
        if fresh and not plan.force:
            plan.results[key] = VolumeResult(name, source, str(out), "skipped", "up to date",
                                             flat=bool(attrs.get("flat", False)))
            return None
    return name, index, str(out), key


def _claim_output(plan: _Plan, out: Path, path: Path) -> None:
    """Record that ``path`` writes ``out``; a ``ValueError`` when ``out`` is an input or another input's output."""
    resolved = str(out.resolve())
    if resolved in plan.input_paths:
        raise ValueError(f"The output {out} would overwrite the input {path}; choose another --out folder.")
    if resolved in plan.owners:
        raise ValueError(f"{plan.owners[resolved]} and {path} would both write {out}; rename one of them or "
                         "preprocess them into different folders.")
    plan.owners[resolved] = str(path)


class _Reporter:
    """Appends finished volumes to the run log and calls ``progress(done, total, result)`` for each."""

    def __init__(self, log: Path, total: int, progress: Callable[[int, int, VolumeResult], None] | None) -> None:
        self.log, self.total, self.progress, self.done = log, total, progress, 0
        self.run = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")

    def __call__(self, new: Sequence[VolumeResult]) -> None:
        """Report the newly finished ``new``."""
        _append_log(self.log, self.run, new)
        for result in new:
            self.done += 1
            if self.progress:
                self.progress(self.done, self.total, result)


def _run_tasks(tasks: list[dict[str, Any]], jobs: int, results: dict[tuple[int, int], VolumeResult],
               report: _Reporter) -> None:
    """Process every task, in this process (one worker) or in a pool of ``jobs`` worker processes."""
    n_workers = min(jobs, len(tasks))
    if n_workers <= 1:
        for task in tasks:
            new = _process_task(task)
            results.update(zip(task["keys"], new))
            report(new)
        return
    threads = max(1, (os.cpu_count() or 1) // n_workers)
    context = _mp_context()
    with concurrent.futures.ProcessPoolExecutor(n_workers, mp_context=context, initializer=_init_worker,
                                                initargs=(threads,)) as pool:
        futures = {pool.submit(_process_task, task): task for task in tasks}
        for future in concurrent.futures.as_completed(futures):
            task = futures[future]
            try:
                new = future.result()
            except Exception as exc:  # noqa: BLE001 - a worker that died (e.g. killed for memory)
                new = [VolumeResult(n, task["source"], o, "failed", f"worker process failed: "
                                    f"{_error_message(exc)}") for n, _, o in task["volumes"]]
            results.update(zip(task["keys"], new))
            report(new)
