"""The preprocessed-volume file format: one HDF5 file per 3D volume, written by ``ct2mr preprocess``.

Thesis section 4.6. A file holds

* ``volume``: float32 (z, y, x) in [-1, 1] on the 1 mm RAS grid padded to a multiple of K;
* attributes (:func:`preprocessed_attributes`): ``ct2mr_preprocessed`` = 1 (:data:`PREPROCESSED_ATTR`), the source
  (path as given, absolute path, size, modification time, 4D index, DICOM identifiers when available), the final
  shape, spacing, origin and direction (readable back by :func:`ct2mr.io.images.read_hdf5`), the padding (for
  de-padding), every preprocessing parameter, the quality-control counts (clipped voxels) and a raw-intensity
  histogram, the full :class:`~ct2mr.preprocessing.pipeline.PreprocessRecord` and configuration as JSON, software
  versions, git commit and an ISO 8601 UTC timestamp.

This module recognises (:func:`is_preprocessed`), reads (:func:`read_preprocessed`, :func:`read_attributes`) and lays
out (:func:`preprocessed_attributes`, :func:`output_name`) such files, and says what makes one up to date
(:func:`source_stamp`, :func:`parameter_hash`). The batch command that writes them is
:mod:`ct2mr.preprocessing.batch`; training (:mod:`ct2mr.preprocessing.collections`) and ``ct2mr qc`` read them.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import SimpleITK as sitk

from ct2mr import __version__
from ct2mr.io.images import HDF5_SUFFIXES, ImageReadError, image_suffix
from ct2mr.preprocessing.pipeline import PreprocessingConfig, PreprocessRecord

__all__ = [
    "PREPROCESSED_ATTR",
    "FORMAT_VERSION",
    "RAW_HISTOGRAM_BINS",
    "PreprocessedFile",
    "output_name",
    "volume_stem",
    "parameter_hash",
    "source_stamp",
    "read_attributes",
    "is_preprocessed",
    "read_preprocessed",
    "preprocessed_attributes",
]

#: Attribute that marks an HDF5 file as a ct2mr preprocessing output (value 1).
PREPROCESSED_ATTR = "ct2mr_preprocessed"
#: Version of the output layout; part of the parameter hash, so a new layout re-processes old outputs.
FORMAT_VERSION = 1
#: Bins of the raw-intensity histogram stored with every volume (for `ct2mr qc`, thesis figures 14 and 16).
RAW_HISTOGRAM_BINS = 128

_DICOM_IDS = {"0010|0020": "patient_id", "0020|000d": "study_instance_uid", "0020|000e": "series_instance_uid"}


@dataclass
class PreprocessedFile:
    """A ct2mr preprocessing output read back (:func:`read_preprocessed`).

    Attributes:
        path: the HDF5 file.
        name: the volume name stored at preprocessing time.
        modality: ``"ct"`` or ``"mr"``.
        array: float32 (z, y, x) in [-1, 1] (``None`` when read without the array).
        record: the :class:`~ct2mr.preprocessing.pipeline.PreprocessRecord` (grids, padding, intensity range, flat
            flag).
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


def output_name(stem: str, index: int | None = None) -> str:
    """File name of a volume's output: ``<stem>.h5``, or ``<stem>_tNNN.h5`` for index NNN of a 4D series.

    Args:
        stem: the input's name without its image suffix (:func:`volume_stem`).
        index: 0-based index along the 4th axis, ``None`` for a 3D input.

    Returns:
        The file name (no folder).
    """
    return f"{stem}.h5" if index is None else f"{stem}_t{index:03d}.h5"


def volume_stem(path: str | os.PathLike) -> str:
    """The name a source gives its volumes: a file's name without its image suffix, a folder's name as it is.

    Args:
        path: an input file or DICOM series folder.

    Returns:
        The stem (``heart.nii.gz`` -> ``heart``; a folder ``series1`` -> ``series1``).
    """
    path = Path(path)
    suffix = image_suffix(path)
    return path.name[: -len(suffix)] if suffix and path.is_file() else path.name


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


def read_attributes(path: str | os.PathLike) -> dict[str, Any] | None:
    """The attributes of any HDF5 file, JSON strings decoded into dicts and lists, NumPy values into Python ones.

    Args:
        path: an HDF5 file (a ct2mr output or not).

    Returns:
        ``{name: value}``, or ``None`` when the file cannot be opened as HDF5 (missing, truncated, another format).
    """
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
    attrs = read_attributes(path)
    return bool(attrs and attrs.get(PREPROCESSED_ATTR) == 1)


def read_preprocessed(path: str | os.PathLike, load_array: bool = True) -> PreprocessedFile:
    """Read a ct2mr preprocessing output: the volume, its record and every attribute.

    Args:
        path: an HDF5 file written by :func:`ct2mr.preprocessing.batch.preprocess_batch`.
        load_array: read the ``volume`` dataset too (``False``: attributes and record only).

    Returns:
        The :class:`PreprocessedFile`; ``array`` is float32 (z, y, x) in [-1, 1].

    Raises:
        ct2mr.io.images.ImageReadError: not an HDF5 file, or not a ct2mr preprocessing output.
    """
    import h5py

    path = Path(path)
    attrs = read_attributes(path)
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
    return PreprocessedFile(path, str(attrs.get("name", volume_stem(path))), record.modality, array, record, attrs)


def _identifiers(path: Path, image: sitk.Image) -> dict[str, str]:
    """Patient / study / series identifiers of the source, when the format carries them (DICOM, some headers)."""
    found: dict[str, str] = {}
    keys = set(image.GetMetaDataKeys())
    for tag, name in _DICOM_IDS.items():
        if tag in keys and image.GetMetaData(tag).strip():
            found[name] = image.GetMetaData(tag).strip()
    if path.is_dir() and len(found) < len(_DICOM_IDS):
        found.update({k: v for k, v in _dicom_folder_identifiers(path).items() if k not in found})
    elif image_suffix(path) in HDF5_SUFFIXES:
        attrs = read_attributes(path) or {}
        for name in ("patient_id", "study_id", "study_instance_uid", "series_instance_uid", "subject_id"):
            if name in attrs and not isinstance(attrs[name], (dict, list)):
                found.setdefault(name, str(attrs[name]))
    return found


def _dicom_folder_identifiers(path: Path) -> dict[str, str]:
    """The identifiers in the header of the first file of a DICOM series folder (empty when unreadable)."""
    found: dict[str, str] = {}
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
    return found


def _raw_histogram(image: sitk.Image) -> tuple[list[int], list[float]]:
    """Histogram of the raw input intensities (native grid, input units) over [min, max] in 128 bins."""
    array = sitk.GetArrayViewFromImage(image)
    lo, hi = float(array.min()), float(array.max())
    if not hi > lo:
        hi = lo + 1.0
    counts, edges = np.histogram(array, bins=RAW_HISTOGRAM_BINS, range=(lo, hi))
    return [int(c) for c in counts], [float(e) for e in edges]


def preprocessed_attributes(record: PreprocessRecord, array: np.ndarray, image: sitk.Image, *, name: str,
                            source: str, path: str | os.PathLike, stamp: Mapping[str, int], index: int | None,
                            series_length: int | None, params_hash: str, select: Sequence[int] | None,
                            command: str | None, software: Mapping[str, Any], git_commit: str | None
                            ) -> dict[str, Any]:
    """Every HDF5 attribute of one output (thesis section 4.6), to write with :func:`ct2mr.io.images.write_hdf5`.

    Args:
        record: the volume's preprocessing record (:func:`ct2mr.preprocessing.pipeline.preprocess`).
        array: the preprocessed float32 (z, y, x) volume (its shape is recorded).
        image: the raw 3D input volume (identifiers and the raw-intensity histogram, input units).
        name: the volume name (:func:`volume_stem`, ``_tNNN`` appended for a volume of a 4D series).
        source: the input path as given; ``path``: the same path, resolved here to an absolute one.
        stamp: :func:`source_stamp` of the input.
        index: 0-based index along the 4th axis, ``None`` for a 3D input (stored as -1).
        series_length: volumes of the 4D series, ``None`` for a 3D input (stored as -1).
        params_hash: :func:`parameter_hash` of the modality and parameters.
        select: the 4D indices asked for (recorded in ``config``).
        command: the command line (recorded in ``config``).
        software: ``{package: version}`` (:func:`ct2mr.provenance.software_versions`).
        git_commit: the source tree's commit (:func:`ct2mr.provenance.git_commit`), ``None`` outside a checkout.

    Returns:
        ``{attribute: value}``: plain numbers, strings and lists, dicts and lists of dicts (JSON when written).
        ``spacing`` is (z, y, x) mm as :func:`ct2mr.io.images.read_hdf5` expects; ``origin`` (mm) and
        ``direction`` are SimpleITK's (x, y, z) of the padded grid.
    """
    config = record.config
    source_path = Path(path)
    return {
        PREPROCESSED_ATTR: 1,
        "format_version": FORMAT_VERSION,
        "name": name,
        "modality": record.modality,
        # source and identifiers
        "source": source,
        "source_abspath": str(source_path.resolve()),
        "source_size": stamp["size"],
        "source_mtime_ns": stamp["mtime_ns"],
        "series_index": -1 if index is None else int(index),
        "series_length": -1 if series_length is None else int(series_length),
        "identifiers": _identifiers(source_path, image),
        **_geometry_attributes(record, array),
        **_parameter_attributes(record, image),
        "record": record.to_dict(),
        "config": {"modality": record.modality, "preprocessing": config, "select": select,
                   "command": command, "params_hash": params_hash},
        "params_hash": params_hash,
        # provenance
        "ct2mr_version": __version__,
        "software_versions": software,
        "git_commit": git_commit,
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _geometry_attributes(record: PreprocessRecord, array: np.ndarray) -> dict[str, Any]:
    """The final grid and padding; ``spacing`` is (z, y, x) as the thesis's loaders and ``read_hdf5`` expect."""
    grid = record.padded_grid
    return {
        "shape": [int(n) for n in array.shape],
        "spacing": [float(s) for s in grid["spacing"][::-1]],
        "spacing_zyx": [float(s) for s in grid["spacing"][::-1]],
        "origin": [float(v) for v in grid["origin"]],
        "direction": [float(v) for v in grid["direction"]],
        "pad_before_zyx": [int(v) for v in record.pad_before[::-1]],
        "pad_after_zyx": [int(v) for v in record.pad_after[::-1]],
        "input_size": [int(v) for v in record.input_grid["size"]],
        "input_spacing": [float(v) for v in record.input_grid["spacing"]],
    }


def _parameter_attributes(record: PreprocessRecord, image: sitk.Image) -> dict[str, Any]:
    """The preprocessing parameters and their outcome: range, flat flag, clipped counts, raw histogram."""
    config = record.config
    counts, edges = _raw_histogram(image)
    return {
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
    }
