"""Batch preprocessing of CT and MR collections into training-ready HDF5 volumes: ``ct2mr preprocess``.

Thesis section 4 (Algorithm 1) applied to whole collections, with the output format of section 4.6: one HDF5 file
per 3D volume (4D series are split, e.g. cardiac phases or respiratory gates), holding

* ``volume``: float32 (z, y, x) in [-1, 1] on the 1 mm RAS grid padded to a multiple of K;
* attributes: ``ct2mr_preprocessed`` = 1, the source (path as given, absolute path, size, modification time, 4D
  index, DICOM identifiers when available), the final shape, spacing, origin and direction (readable back by
  :func:`ct2mr.io.images.read_hdf5`), the padding (for de-padding), every preprocessing parameter, the quality-control
  counts (clipped voxels) and a raw-intensity histogram, the full :class:`~ct2mr.preprocessing.pipeline.PreprocessRecord`
  and configuration as JSON, software versions, git commit and an ISO 8601 UTC timestamp.

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
import hashlib
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

import numpy as np
import SimpleITK as sitk

from ct2mr import __version__
from ct2mr.checks import prepare_output_dir, replace_nonfinite
from ct2mr.provenance import git_commit, software_versions
from ct2mr.io.images import HDF5_SUFFIXES, ImageReadError, image_suffix, list_images, read_volumes, write_hdf5
from ct2mr.preprocessing.pipeline import MODALITIES, PreprocessingConfig, PreprocessRecord, preprocess

__all__ = [
    "PREPROCESSED_ATTR",
    "FORMAT_VERSION",
    "LOG_NAME",
    "STATUSES",
    "VolumeResult",
    "BatchSummary",
    "PreprocessedFile",
    "preprocess_batch",
    "output_name",
    "parameter_hash",
    "source_stamp",
    "is_preprocessed",
    "read_preprocessed",
    "default_jobs",
]

logger = logging.getLogger(__name__)

#: Attribute that marks an HDF5 file as a ct2mr preprocessing output (value 1).
PREPROCESSED_ATTR = "ct2mr_preprocessed"
#: Version of the output layout; part of the parameter hash, so a new layout re-processes old outputs.
FORMAT_VERSION = 1
#: The run log written in the output folder (one JSON object per volume and run).
LOG_NAME = "preprocess_log.jsonl"
#: Outcomes of one volume.
STATUSES = ("ok", "skipped", "failed")
#: Bins of the raw-intensity histogram stored with every volume (for `ct2mr qc`, thesis figures 14 and 16).
RAW_HISTOGRAM_BINS = 128

_DICOM_IDS = {"0010|0020": "patient_id", "0020|000d": "study_instance_uid", "0020|000e": "series_instance_uid"}


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


@dataclass
class PreprocessedFile:
    """A ct2mr preprocessing output read back.

    Attributes:
        path: the HDF5 file.
        name: the volume name stored at preprocessing time.
        modality: ``"ct"`` or ``"mr"``.
        array: float32 (z, y, x) in [-1, 1] (``None`` when read without the array).
        record: the :class:`~ct2mr.preprocessing.pipeline.PreprocessRecord` (grids, padding, intensity range, flat flag).
        attrs: every attribute, JSON strings decoded into dicts and lists.
    """

    path: Path
    name: str
    modality: str
    array: np.ndarray | None
    record: PreprocessRecord
    attrs: dict[str, Any]

    @property
    def flat(self) -> bool:
        """Whether the volume was flagged flat (zeros; skipped by training)."""
        return bool(self.record.flat)


def default_jobs() -> int:
    """The default number of parallel worker processes: ``min(4, CPU count)``."""
    return max(1, min(4, os.cpu_count() or 1))


def output_name(stem: str, index: int | None = None) -> str:
    """File name of a volume's output: ``<stem>.h5``, or ``<stem>_tNNN.h5`` for index NNN of a 4D series.

    Args:
        stem: the input's name without its image suffix.
        index: 0-based index along the 4th axis, ``None`` for a 3D input.

    Returns:
        The file name (no folder).
    """
    return f"{stem}.h5" if index is None else f"{stem}_t{index:03d}.h5"


def parameter_hash(modality: str, config: PreprocessingConfig) -> str:
    """A short SHA-256 of everything that determines an output besides the source: modality, parameters, layout.

    Args:
        modality: ``"ct"`` or ``"mr"``.
        config: the preprocessing parameters.

    Returns:
        16 hexadecimal characters.
    """
    payload = json.dumps({"modality": modality, "config": config.to_dict(), "format": FORMAT_VERSION},
                         sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _stem(path: Path) -> str:
    suffix = image_suffix(path)
    return path.name[: -len(suffix)] if suffix and path.is_file() else path.name


def source_stamp(path: str | os.PathLike) -> dict[str, int]:
    """What the up-to-date check compares: the size and modification time of a source.

    Args:
        path: an input file, or a DICOM series folder (its files: total size and latest modification time).

    Returns:
        ``{"size": bytes, "mtime_ns": nanoseconds since the epoch}``.

    Raises:
        OSError: the path cannot be read.
    """
    path = Path(path)
    if path.is_dir():
        files = [p.stat() for p in path.iterdir() if p.is_file()]
        return {"size": int(sum(s.st_size for s in files)), "mtime_ns": int(max((s.st_mtime_ns for s in files),
                                                                                 default=0))}
    stat = path.stat()
    return {"size": int(stat.st_size), "mtime_ns": int(stat.st_mtime_ns)}


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


def _read_attrs(path: Path) -> dict[str, Any] | None:
    """Attributes of an HDF5 file (JSON strings decoded), ``None`` when it cannot be opened as HDF5."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            raw = dict(f.attrs)
    except (OSError, ValueError):
        return None
    attrs: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(value, bytes):
            value = value.decode()
        if isinstance(value, str) and value[:1] in "{[":
            try:
                value = json.loads(value)
            except ValueError:
                pass
        elif isinstance(value, np.ndarray):
            value = value.tolist()
        elif isinstance(value, np.generic):
            value = value.item()
        attrs[key] = value
    return attrs


def is_preprocessed(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a ct2mr preprocessing output (an HDF5 file with ``ct2mr_preprocessed`` = 1).

    Args:
        path: any path.

    Returns:
        ``True`` for a ct2mr output; ``False`` for anything else (other files, folders, unreadable files).
    """
    path = Path(path)
    if not path.is_file() or image_suffix(path) not in HDF5_SUFFIXES:
        return False
    attrs = _read_attrs(path)
    return bool(attrs and attrs.get(PREPROCESSED_ATTR) == 1)


def read_preprocessed(path: str | os.PathLike, load_array: bool = True) -> PreprocessedFile:
    """Read a ct2mr preprocessing output: the volume, its record and every attribute.

    Args:
        path: an HDF5 file written by :func:`preprocess_batch`.
        load_array: read the ``volume`` dataset too (``False``: attributes and record only).

    Returns:
        The :class:`PreprocessedFile`; ``array`` is float32 (z, y, x) in [-1, 1].

    Raises:
        ct2mr.io.images.ImageReadError: not an HDF5 file, or not a ct2mr preprocessing output.
    """
    import h5py

    path = Path(path)
    attrs = _read_attrs(path)
    if attrs is None:
        raise ImageReadError(f"{path} is not a readable HDF5 file. Is it truncated or of another format?")
    if attrs.get(PREPROCESSED_ATTR) != 1 or not isinstance(attrs.get("record"), dict):
        raise ImageReadError(f"{path} is not a ct2mr preprocessing output (no '{PREPROCESSED_ATTR}' attribute with "
                             "a stored record). Preprocess it with `ct2mr preprocess` first.")
    array = None
    if load_array:
        with h5py.File(path, "r") as f:
            array = np.asarray(f["volume"][()], dtype=np.float32)
    record = PreprocessRecord.from_dict(attrs["record"])
    return PreprocessedFile(path, str(attrs.get("name", _stem(path))), record.modality, array, record, attrs)


def _identifiers(path: Path, image: sitk.Image) -> dict[str, str]:
    """Patient / study / series identifiers of the source, when the format carries them (DICOM, some headers)."""
    found: dict[str, str] = {}
    keys = set(image.GetMetaDataKeys())
    for tag, name in _DICOM_IDS.items():
        if tag in keys and image.GetMetaData(tag).strip():
            found[name] = image.GetMetaData(tag).strip()
    if path.is_dir() and len(found) < len(_DICOM_IDS):
        try:
            series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path))
            first = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path), series[0])[0]
            reader = sitk.ImageFileReader()
            reader.SetFileName(first)
            reader.ReadImageInformation()
            for tag, name in _DICOM_IDS.items():
                if reader.HasMetaDataKey(tag) and reader.GetMetaData(tag).strip():
                    found.setdefault(name, reader.GetMetaData(tag).strip())
        except (RuntimeError, IndexError):
            pass
    elif image_suffix(path) in HDF5_SUFFIXES:
        attrs = _read_attrs(path) or {}
        for name in ("patient_id", "study_id", "study_instance_uid", "series_instance_uid", "subject_id"):
            if name in attrs and not isinstance(attrs[name], (dict, list)):
                found.setdefault(name, str(attrs[name]))
    return found


def _raw_histogram(image: sitk.Image) -> tuple[list[int], list[float]]:
    """Histogram of the raw input intensities (native grid, input units) over [min, max] in 128 bins."""
    array = sitk.GetArrayViewFromImage(image)
    lo, hi = float(array.min()), float(array.max())
    if not hi > lo:
        hi = lo + 1.0
    counts, edges = np.histogram(array, bins=RAW_HISTOGRAM_BINS, range=(lo, hi))
    return [int(c) for c in counts], [float(e) for e in edges]


def _attributes(record: PreprocessRecord, array: np.ndarray, image: sitk.Image, task: dict[str, Any], name: str,
                index: int | None) -> dict[str, Any]:
    """Every HDF5 attribute of one output (thesis section 4.6)."""
    grid = record.padded_grid
    config = record.config
    counts, edges = _raw_histogram(image)
    source = Path(task["path"])
    return {
        PREPROCESSED_ATTR: 1,
        "format_version": FORMAT_VERSION,
        "name": name,
        "modality": record.modality,
        # source and identifiers
        "source": task["source"],
        "source_abspath": str(source.resolve()),
        "source_size": task["stamp"]["size"],
        "source_mtime_ns": task["stamp"]["mtime_ns"],
        "series_index": -1 if index is None else int(index),
        "series_length": -1 if task["series_length"] is None else int(task["series_length"]),
        "identifiers": _identifiers(source, image),
        # final geometry; `spacing` is (z, y, x) as the thesis's loaders (and ct2mr.io.images.read_hdf5) expect
        "shape": [int(n) for n in array.shape],
        "spacing": [float(s) for s in grid["spacing"][::-1]],
        "spacing_zyx": [float(s) for s in grid["spacing"][::-1]],
        "origin": [float(v) for v in grid["origin"]],
        "direction": [float(v) for v in grid["direction"]],
        "pad_before_zyx": [int(v) for v in record.pad_before[::-1]],
        "pad_after_zyx": [int(v) for v in record.pad_after[::-1]],
        "input_size": [int(v) for v in record.input_grid["size"]],
        "input_spacing": [float(v) for v in record.input_grid["spacing"]],
        # parameters and their outcome
        "target_spacing": float(config["target_spacing"]),
        "k": int(config["k"]),
        "ct_window": [float(v) for v in config["ct_window"]],
        "mr_percentiles": [float(v) for v in config["mr_percentiles"]],
        "n4": bool(record.extra.get("n4", False)),
        "intensity_range": [float(v) for v in record.intensity_range],
        "default_value": float(record.default_value),
        "pad_value": float(record.pad_value),
        "flat": bool(record.flat),
        "voxels": int(record.extra.get("voxels", 0)),
        "clipped_low": int(record.extra.get("clipped_low", 0)),
        "clipped_high": int(record.extra.get("clipped_high", 0)),
        "raw_histogram_counts": counts,
        "raw_histogram_edges": edges,
        "record": record.to_dict(),
        "config": {"modality": record.modality, "preprocessing": config, "select": task["select"],
                   "command": task["command"], "params_hash": task["params_hash"]},
        "params_hash": task["params_hash"],
        # provenance
        "ct2mr_version": __version__,
        "software_versions": task["software"],
        "git_commit": task["git_commit"],
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


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
                attrs = _attributes(pre.record, pre.array, image, task, name, index)
                write_hdf5(pre.array, out, attrs)
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


def _error_message(exc: BaseException) -> str:
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
    attrs = _read_attrs(out)
    if attrs is None or attrs.get(PREPROCESSED_ATTR) != 1:
        return False, None
    same = (attrs.get("source_abspath") == abspath and attrs.get("source_size") == stamp["size"]
            and attrs.get("source_mtime_ns") == stamp["mtime_ns"] and attrs.get("params_hash") == params_hash)
    return same, attrs


def _append_log(log: Path, run: str, results: Iterable[VolumeResult]) -> None:
    with open(log, "a", encoding="utf-8") as f:
        for result in results:
            f.write(json.dumps({"run": run, **result.to_dict()}) + "\n")


def preprocess_batch(inputs: str | os.PathLike | Iterable[str | os.PathLike], out_dir: str | os.PathLike,
                     modality: str, config: PreprocessingConfig | None = None, select: Sequence[int] | None = None,
                     jobs: int | None = None, force: bool = False,
                     progress: Callable[[int, int, VolumeResult], None] | None = None,
                     command: str | None = None) -> BatchSummary:
    """Preprocess every volume of a collection into ``out_dir`` (thesis section 4, Algorithm 1; section 4.6).

    Each input file or DICOM folder gives one output per 3D volume (see :func:`output_name`); 4D series are split
    into their volumes (``select`` keeps some). Volumes run in parallel worker processes; an output that is up to
    date (same source path, size, modification time and parameter hash) is skipped; every failure is recorded while
    the other volumes go on.

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
    start = time.perf_counter()
    out_dir = Path(out_dir)
    paths = list_images(inputs)
    prepare_output_dir(out_dir, "output folder (--out)")  # created, probed, stale temporary files removed
    input_paths = {str(p.resolve()) for p in paths}
    params_hash = parameter_hash(modality, config)
    common = {"modality": modality, "config": config.to_dict(), "select": select, "command": command,
              "params_hash": params_hash, "software": software_versions("numpy", "SimpleITK", "h5py"),
              "git_commit": git_commit()}

    # plan: which volume goes where, which are up to date
    results: dict[tuple[int, int], VolumeResult] = {}
    tasks: list[tuple[int, dict[str, Any]]] = []
    owners: dict[str, str] = {}
    order: list[tuple[int, int]] = []
    for p_index, path in enumerate(paths):
        source = str(path)
        stem = _stem(path)
        try:
            length = _series_length(path)
            stamp = source_stamp(path)
        except Exception as exc:  # noqa: BLE001 - an unreadable header fails this input only
            key = (p_index, 0)
            order.append(key)
            results[key] = VolumeResult(stem, source, str(out_dir / output_name(stem)), "failed",
                                        _error_message(exc))
            continue
        indices: list[int | None] = [None] if length is None else (list(range(length)) if select is None
                                                                     else list(select))
        wanted = []
        for v_index, index in enumerate(indices):
            name = stem if index is None else f"{stem}_t{index:03d}"
            out = out_dir / output_name(stem, index)
            key = (p_index, v_index)
            order.append(key)
            resolved = str(out.resolve())
            if resolved in input_paths:
                raise ValueError(f"The output {out} would overwrite the input {path}; choose another --out folder.")
            if resolved in owners:
                raise ValueError(f"{owners[resolved]} and {path} would both write {out}; rename one of them or "
                                 "preprocess them into different folders.")
            owners[resolved] = str(path)
            if length is not None and index >= length:
                results[key] = VolumeResult(name, source, str(out), "failed",
                                            f"{path}: index {index} is outside the 4D series of {length} volumes "
                                            f"(0..{length - 1}).")
                continue
            if out.exists():
                fresh, attrs = _up_to_date(out, str(path.resolve()), stamp, params_hash)
                if attrs is None:
                    results[key] = VolumeResult(name, source, str(out), "failed",
                                                f"{out} exists and is not a ct2mr output; it is left untouched. "
                                                "Move it or choose another --out folder.")
                    continue
                if fresh and not force:
                    results[key] = VolumeResult(name, source, str(out), "skipped", "up to date",
                                                flat=bool(attrs.get("flat", False)))
                    continue
            wanted.append((name, index, str(out), key))
        if wanted:
            task = {**common, "path": str(path), "source": source, "stamp": stamp, "series_length": length,
                    "volumes": [(n, i, o) for n, i, o, _ in wanted], "keys": [k for *_, k in wanted]}
            tasks.append((p_index, task))

    total = len(order)
    done = 0
    log = out_dir / LOG_NAME
    run = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")

    def report(new: Sequence[VolumeResult]) -> None:
        nonlocal done
        _append_log(log, run, new)
        for result in new:
            done += 1
            if progress:
                progress(done, total, result)

    report([results[k] for k in order if k in results])
    n_workers = min(jobs, len(tasks))
    if n_workers <= 1:
        for _, task in tasks:
            new = _process_task(task)
            results.update(zip(task["keys"], new))
            report(new)
    else:
        threads = max(1, (os.cpu_count() or 1) // n_workers)
        context = _mp_context()
        with concurrent.futures.ProcessPoolExecutor(n_workers, mp_context=context, initializer=_init_worker,
                                                    initargs=(threads,)) as pool:
            futures = {pool.submit(_process_task, task): task for _, task in tasks}
            for future in concurrent.futures.as_completed(futures):
                task = futures[future]
                try:
                    new = future.result()
                except Exception as exc:  # noqa: BLE001 - a worker that died (e.g. killed for memory)
                    new = [VolumeResult(n, task["source"], o, "failed", f"worker process failed: "
                                        f"{_error_message(exc)}") for n, _, o in task["volumes"]]
                results.update(zip(task["keys"], new))
                report(new)
    summary = BatchSummary(out_dir, [results[k] for k in order], time.perf_counter() - start, log)
    logger.info("%s", summary.text())
    return summary
