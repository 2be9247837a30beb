"""Reading and writing volumes with their geometry.

Every reader returns a 3D :class:`SimpleITK.Image`, which carries the voxel grid that the rest of the engine
keeps exact: size (x, y, z voxels), spacing (mm), origin (mm, LPS physical space as ITK uses it) and the direction
cosines. NumPy arrays taken from such an image are in (z, y, x) order.

Supported inputs (thesis section 4, "Inputs & metadata"):

* HDF5 (``.h5``, ``.hdf5``, ``.hdf``): a dataset ``volume`` in (z, y, x) order; spacing in mm from the attribute
  ``spacing_zyx`` or ``spacing`` (both (z, y, x), the array's own order) or ``spacing_xyz``; else 1 mm with a
  warning. Optional ``origin`` / ``origin_xyz`` (x, y, z, mm) and ``direction`` (9 values, row-major, ITK order).
* NIfTI (``.nii``, ``.nii.gz``), NRRD (``.nrrd``, ``.nhdr``), MetaImage (``.mha``, ``.mhd``) through SimpleITK.
* A folder holding one DICOM series (the first series found, with a warning when there are several).

4D inputs (cardiac phases, respiratory gates) are split into 3D volumes by :func:`read_volumes`.

Every file the engine writes goes through :func:`atomic_writes` (or its one-file form :func:`atomic_write`, and
:func:`write_image`, :func:`write_hdf5`, :func:`write_json`, :func:`write_text`, :func:`write_bytes` built on it):
a hidden temporary file in the same folder, flushed and fsynced, read back (:func:`verify_file`), given the user's
normal mode (umask), and only then renamed onto its final name. A failed or short write raises
:class:`OutputWriteError` naming the folder and its free space, and leaves nothing under the final name; temporary
files of a killed earlier run are removed by the next write into that folder (:func:`remove_stale_temps`).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import random
import re
import shutil
import socket
import threading
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import SimpleITK as sitk

__all__ = [
    "sha256sum",
    "IMAGE_SUFFIXES",
    "HDF5_SUFFIXES",
    "ImageReadError",
    "SpacingWarning",
    "read_image",
    "read_volumes",
    "read_hdf5",
    "write_image",
    "write_hdf5",
    "list_images",
    "image_suffix",
    "atomic_path",
    "atomic_write",
    "atomic_writes",
    "verify_file",
    "write_bytes",
    "write_text",
    "write_json",
    "remove_stale_temps",
    "output_mode",
    "OutputWriteError",
    "TEMP_MARKER",
]

logger = logging.getLogger(__name__)

HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf")
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd") + HDF5_SUFFIXES
WRITE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")


class ImageReadError(ValueError):
    """A file or folder could not be read as a 3D medical volume; the message says why and what to do."""


class SpacingWarning(UserWarning):
    """An HDF5 volume carries no usable spacing attribute and 1 mm was assumed (thesis section 4)."""


def image_suffix(path: str | os.PathLike) -> str:
    """Return the lower-case image suffix of ``path``, handling the double suffix ``.nii.gz``.

    Args:
        path: file name or path.

    Returns:
        e.g. ``".nii.gz"``, ``".nrrd"``, ``".h5"``; ``""`` when there is none.
    """
    name = Path(path).name.lower()
    for suffix in IMAGE_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return Path(name).suffix


def _dicom_series_ids(path: Path) -> tuple[str, ...]:
    """Series UIDs in a folder, without ITK's warning for folders that hold none."""
    previous = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        return tuple(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path)))
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(previous)


def _is_dicom_folder(path: Path) -> bool:
    return path.is_dir() and bool(_dicom_series_ids(path))


def list_images(inputs: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """Expand files and folders into the list of volumes they hold.

    A folder that holds a DICOM series counts as one volume; any other folder is searched (not recursively) for
    files with a supported suffix (:data:`IMAGE_SUFFIXES`) and for sub-folders that hold a DICOM series.

    Args:
        inputs: one path or several.

    Returns:
        Sorted, de-duplicated paths, files and DICOM folders.

    Raises:
        FileNotFoundError: a path does not exist.
        ImageReadError: a folder holds no readable volume.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if not path.exists():
            raise FileNotFoundError(f"No such file or folder: {path}. Check the path and try again.")
        if path.is_file():
            found.append(path)
        elif _is_dicom_folder(path):
            found.append(path)
        else:
            children = sorted(p for p in path.iterdir() if (p.is_file() and image_suffix(p) in IMAGE_SUFFIXES)
                              or _is_dicom_folder(p))
            if not children:
                raise ImageReadError(
                    f"The folder {path} holds no volume ({', '.join(IMAGE_SUFFIXES)} files or a DICOM series).")
            found.extend(children)
    unique: dict[str, Path] = {}
    for p in found:
        unique.setdefault(str(p.resolve()), p)
    return sorted(unique.values())


def read_hdf5(path: str | os.PathLike) -> sitk.Image:
    """Read an HDF5 volume with the thesis's conventions (section 4, "Inputs & metadata").

    Args:
        path: an HDF5 file with a dataset ``volume`` of shape (z, y, x) (or (t, z, y, x) for a 4D series).

    Returns:
        A SimpleITK image whose spacing (mm) comes from the attribute ``spacing_zyx`` or ``spacing`` (both read in
        (z, y, x) order and reversed to ITK's (x, y, z)) or ``spacing_xyz``; when none is present, 1 mm with a
        :class:`SpacingWarning`. 4D datasets become 4D images with the first axis as the 4th dimension.

    Raises:
        ImageReadError: not an HDF5 file, no ``volume`` dataset, or a spacing attribute of the wrong length.
    """
    import h5py

    path = Path(path)
    try:
        handle = h5py.File(path, "r")
    except OSError as exc:
        raise ImageReadError(f"{path} is not a readable HDF5 file ({exc}). Is it truncated or of another format?") \
            from exc
    with handle as f:
        if "volume" not in f:
            raise ImageReadError(
                f"{path} has no dataset 'volume' (found: {', '.join(f.keys()) or 'nothing'}). The thesis format stores "
                "the volume in (z, y, x) order in a dataset named 'volume'.")
        data = np.asarray(f["volume"][()])
        attrs = {**f.attrs, **f["volume"].attrs}
    if data.ndim not in (3, 4):
        raise ImageReadError(f"{path}: dataset 'volume' has shape {data.shape}; a 3D (z, y, x) volume is needed.")
    spatial_ndim = 3
    spacing_xyz: list[float] | None = None
    for key, reverse in (("spacing_zyx", True), ("spacing", True), ("spacing_xyz", False)):
        if key in attrs:
            value = [float(v) for v in np.ravel(attrs[key])]
            if len(value) != spatial_ndim or not all(np.isfinite(value)) or min(value) <= 0:
                raise ImageReadError(f"{path}: attribute {key!r} = {value} is not three positive spacings in mm.")
            spacing_xyz = value[::-1] if reverse else value
            break
    if spacing_xyz is None:
        warnings.warn(f"{path}: no spacing attribute ('spacing', 'spacing_zyx' or 'spacing_xyz'); assuming 1 mm "
                      "isotropic voxels.", SpacingWarning, stacklevel=2)
        spacing_xyz = [1.0, 1.0, 1.0]
    image = sitk.GetImageFromArray(data, isVector=False)
    if data.ndim == 4:
        image.SetSpacing(tuple(spacing_xyz) + (1.0,))
    else:
        image.SetSpacing(tuple(spacing_xyz))
        for key in ("origin_xyz", "origin"):
            if key in attrs:
                image.SetOrigin(tuple(float(v) for v in np.ravel(attrs[key])))
                break
        if "direction" in attrs:
            image.SetDirection(tuple(float(v) for v in np.ravel(attrs["direction"])))
    return image


def _nifti_data_end(header: bytes) -> int | None:
    """Bytes a NIfTI-1/-2 file must hold (``vox_offset`` + voxel data) according to its header; ``None`` if unknown."""
    import struct

    for endian in "<>":
        if len(header) >= 348 and struct.unpack(endian + "i", header[:4])[0] == 348:
            dims = struct.unpack(endian + "8h", header[40:56])
            bitpix = struct.unpack(endian + "h", header[72:74])[0]
            vox_offset = int(struct.unpack(endian + "f", header[108:112])[0])
            break
        if len(header) >= 540 and struct.unpack(endian + "i", header[:4])[0] == 540:
            bitpix = struct.unpack(endian + "h", header[14:16])[0]
            dims = struct.unpack(endian + "8q", header[16:80])
            vox_offset = int(struct.unpack(endian + "q", header[168:176])[0])
            break
    else:
        return None
    if not 1 <= dims[0] <= 7 or bitpix <= 0:
        return None
    voxels = 1
    for n in dims[1: dims[0] + 1]:
        voxels *= max(int(n), 1)
    return vox_offset + voxels * bitpix // 8


def _nifti_completeness(path: Path, compressed: bool) -> tuple[int | None, int | None, str]:
    """How many data bytes a NIfTI file's header announces and how many it holds.

    Uncompressed files are measured by their size; ``.nii.gz`` files by the gzip trailer's ISIZE (the uncompressed
    size modulo 2**32), and only when that disagrees, by decompressing the stream.

    Returns:
        ``(expected, actual, problem)``: ``expected`` is ``None`` when there is no NIfTI header; ``actual`` is ``None``
        when the file is complete (ISIZE matched); ``problem`` names an unreadable header or a broken stream ("" when
        none).
    """
    import gzip
    import zlib

    try:
        opener = gzip.open if compressed else open
        with opener(path, "rb") as f:
            header = f.read(544)
    except (OSError, EOFError, zlib.error) as exc:
        return None, None, f"no readable NIfTI header ({exc})"
    expected = _nifti_data_end(header)
    if expected is None:
        return None, None, ""
    if not compressed:
        return expected, path.stat().st_size, ""
    with open(path, "rb") as f:
        f.seek(-4, os.SEEK_END)
        if int.from_bytes(f.read(4), "little") == expected % 2**32:
            return expected, None, ""
    actual = 0
    try:
        with gzip.open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                actual += len(chunk)
    except (OSError, EOFError, zlib.error):
        return expected, actual, f"its compressed data end after about {actual} of the {expected} bytes its header " \
                                 "announces"
    return expected, actual, ""


def _check_nifti_complete(path: Path) -> None:
    """Raise :class:`ImageReadError` for a truncated NIfTI file, which ITK would silently fill with zeros."""
    expected, actual, problem = _nifti_completeness(path, image_suffix(path) == ".nii.gz")
    if problem.startswith("no readable"):
        raise ImageReadError(f"{path} could not be read as a medical image ({problem[len('no readable NIfTI header ('):-1]}"
                             "). Is the file truncated or of another kind?")
    if problem:
        raise ImageReadError(f"{path} is truncated or corrupt: {problem}. Copy or export it again.")
    if expected is not None and actual is not None and actual < expected:
        raise ImageReadError(f"{path} is truncated: its header announces {expected} bytes but it holds {actual}. "
                             "Copy or export it again.")


def _read_any(path: Path) -> sitk.Image:
    if not path.exists():
        raise FileNotFoundError(f"No such file or folder: {path}. Check the path and try again.")
    if path.is_dir():
        series = _dicom_series_ids(path)
        if not series:
            raise ImageReadError(f"The folder {path} holds no DICOM series. Pass a file (NIfTI, NRRD, MHA, HDF5) "
                                 "or a folder of DICOM slices.")
        if len(series) > 1:
            warnings.warn(f"{path} holds {len(series)} DICOM series; reading the first ({series[0]}).", stacklevel=3)
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path), series[0]))
        try:
            return reader.Execute()
        except RuntimeError as exc:
            raise ImageReadError(f"Could not read the DICOM series in {path}: {exc}") from exc
    if image_suffix(path) in HDF5_SUFFIXES:
        return read_hdf5(path)
    nifti = image_suffix(path) in (".nii", ".nii.gz")
    if nifti:
        _check_nifti_complete(path)
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        first_line = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unknown error"
        raise ImageReadError(
            f"{path} could not be read as a medical image ({first_line}). Supported: NIfTI, NRRD, MHA, HDF5 "
            "(dataset 'volume') and DICOM series folders. Is the file truncated or of another kind?") from exc
    return _restore_nifti_nonfinite(path, image) if nifti else image


def _restore_nifti_nonfinite(path: Path, image: sitk.Image) -> sitk.Image:
    """Put back the NaN/inf voxels of a float NIfTI file, which ITK's NIfTI reader silently turns into 0.

    A NaN read as 0 is water in HU: the CT checks (:func:`ct2mr.checks.check_input_image`) could neither count nor
    replace it. The raw float data are scanned (once more, in 4 MiB chunks) only for float32/float64 files; the
    voxel order of the file is the order of ``sitk.GetArrayFromImage`` (ITK does not reorder NIfTI voxels).
    """
    import gzip
    import struct

    opener = gzip.open if image_suffix(path) == ".nii.gz" else open
    with opener(path, "rb") as f:
        header = f.read(544)
    for endian in "<>":
        if len(header) >= 348 and struct.unpack(endian + "i", header[:4])[0] == 348:
            datatype = struct.unpack(endian + "h", header[70:72])[0]
            offset = int(struct.unpack(endian + "f", header[108:112])[0])
            break
        if len(header) >= 540 and struct.unpack(endian + "i", header[:4])[0] == 540:
            datatype = struct.unpack(endian + "h", header[12:14])[0]
            offset = int(struct.unpack(endian + "q", header[168:176])[0])
            break
    else:
        return image
    dtype = {16: np.dtype(endian + "f4"), 64: np.dtype(endian + "f8")}.get(datatype)
    if dtype is None or image.GetNumberOfComponentsPerPixel() != 1:
        return image
    indices: list[np.ndarray] = []
    values: list[np.ndarray] = []
    chunk = (4 << 20) // dtype.itemsize * dtype.itemsize
    start = 0
    with opener(path, "rb") as f:
        f.seek(offset)
        while block := f.read(chunk):
            data = np.frombuffer(block[: len(block) // dtype.itemsize * dtype.itemsize], dtype)
            found = np.flatnonzero(~np.isfinite(data))
            if found.size:
                indices.append(found + start)
                values.append(data[found])
            start += data.size
    if not indices:
        return image
    array = sitk.GetArrayFromImage(image)
    if not np.issubdtype(array.dtype, np.floating):
        return image
    flat = array.reshape(-1)
    where, what = np.concatenate(indices), np.concatenate(values)
    keep = where < flat.size
    flat[where[keep]] = what[keep].astype(array.dtype)
    restored = sitk.GetImageFromArray(array, isVector=False)
    restored.CopyInformation(image)
    return restored


def read_image(path: str | os.PathLike) -> sitk.Image:
    """Read one 3D volume with its geometry.

    Args:
        path: a NIfTI, NRRD, MHA or HDF5 file, or a folder holding a DICOM series.

    Returns:
        The 3D image, in its stored pixel type, with spacing (mm), origin and direction cosines.

    Raises:
        FileNotFoundError: the path does not exist.
        ImageReadError: unreadable, not an image, 2D, 4D (use :func:`read_volumes`) or vector-valued.
    """
    path = Path(path)
    image = _read_any(path)
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ImageReadError(f"{path} has {image.GetNumberOfComponentsPerPixel()} components per voxel (colour or "
                             "vector image); a scalar CT or MR volume is needed.")
    dim = image.GetDimension()
    size = image.GetSize()
    if dim == 4 and size[3] == 1:
        return _extract_3d(image, 0)
    if dim == 4:
        raise ImageReadError(f"{path} is a 4D series of {size[3]} volumes; pick one with `ct2mr preprocess --select` "
                             "or read all of them with ct2mr.io.images.read_volumes.")
    if dim != 3 or min(size) < 2:
        raise ImageReadError(f"{path} is a {dim}D image of size {size}; a 3D volume (at least 2 voxels along each "
                             "axis) is needed, e.g. a CT series, not a single slice.")
    return image


def _extract_3d(image: sitk.Image, index: int) -> sitk.Image:
    size = list(image.GetSize())
    size[3] = 0
    return sitk.Extract(image, size, [0, 0, 0, index], sitk.ExtractImageFilter.DIRECTIONCOLLAPSETOSUBMATRIX)


def read_volumes(path: str | os.PathLike, select: Sequence[int] | None = None) -> list[tuple[str, sitk.Image]]:
    """Read a file as one or more 3D volumes, splitting 4D series (cardiac phases, respiratory gates).

    Args:
        path: any input :func:`read_image` accepts, or a 4D NIfTI/NRRD/MHA/HDF5 series.
        select: 0-based indices along the 4th axis to keep; ``None`` keeps all.

    Returns:
        ``[(name, image), ...]``: for a 3D file one entry named after the file stem; for a 4D series one per kept
        index, named ``<stem>_t<index:03d>``.

    Raises:
        FileNotFoundError, ImageReadError: as :func:`read_image`; also an index in ``select`` out of range.
    """
    path = Path(path)
    stem = path.name[: -len(image_suffix(path))] if image_suffix(path) else path.name
    image = _read_any(path)
    if image.GetDimension() == 4:
        count = image.GetSize()[3]
        indices = list(range(count)) if select is None else list(select)
        for i in indices:
            if not 0 <= i < count:
                raise ImageReadError(f"{path}: index {i} is outside the 4D series of {count} volumes (0..{count - 1}).")
        return [(f"{stem}_t{i:03d}", _extract_3d(image, i)) for i in indices]
    return [(stem, read_image(path))]


# ---- verified atomic writes ---------------------------------------------------------------------------------
#: Marker in the names of this module's temporary files: ``.<final name>.ct2mr-<host>-<pid>-<8 random>.tmp<suffix>``.
TEMP_MARKER = ".ct2mr-"
_TEMP_RE = re.compile(r"^\.(?P<final>.+)\.ct2mr-(?P<host>[A-Za-z0-9_]*)-(?P<pid>\d+)-[a-z0-9_]{8}\.tmp"
                      r"(?P<suffix>\.[A-Za-z0-9.]+)?$")
#: Temporary names of earlier ct2mr versions: ``mkstemp``'s ``.<name>.<8 random>.tmp<suffix>`` (every atomic write)
#: and the run folder's ``.state.json.tmp``, ``.config.yaml.tmp``, ``.log.jsonl.tmp``, ``.split.json.tmp``. No owner is
#: recorded in them; :func:`remove_stale_temps` removes them whenever it finds them.
_LEGACY_TEMP_RE = re.compile(r"^\.(?P<final>.+?)\.[a-z0-9_]{8}\.tmp(\.[A-Za-z0-9.]+)?$"
                             r"|^\.(?P<run>state\.json|config\.yaml|log\.jsonl|split\.json)\.tmp$")
#: A temporary file of a process on another machine (shared file system) counts as abandoned after this long, s.
FOREIGN_TEMP_SECONDS = 24 * 3600
_CLEANED: set[str] = set()
_CLEANED_LOCK = threading.Lock()


class OutputWriteError(OSError):
    """An output file could not be written completely.

    Nothing was left under the final name (the temporary file is removed). The message names the file, the folder,
    its free space (:func:`shutil.disk_usage`) and the likely cause (disk full, file-size limit, permissions).
    ``errno`` is the cause's error number (``ENOSPC``, ``EFBIG``, ``EIO`` for a short write ...).
    """

    def __str__(self) -> str:
        return str(self.strerror) if self.strerror else super().__str__()


def _host_tag() -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())[:32]


def _umask() -> int:
    """The process's umask, read without changing it (``/proc/self/status``; else set-and-restore)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def output_mode() -> int:
    """The permission bits a new output file gets: ``0o666 & ~umask`` (``0o644`` with the usual umask 022).

    Temporary files (``mkstemp``) are created ``0o600``; outputs are set to this mode before they are renamed, so
    they are readable as the user's other files are.
    """
    return 0o666 & ~_umask()


def _owner_gone(match: re.Match, path: Path) -> bool:
    """Whether the process that created a temporary file named like :data:`_TEMP_RE` no longer runs."""
    pid = int(match["pid"])
    if match["host"] != _host_tag():
        try:
            return time.time() - path.stat().st_mtime > FOREIGN_TEMP_SECONDS
        except OSError:
            return False
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # exists, owned by another user
        return False
    return False


def remove_stale_temps(folder: str | os.PathLike, final_name: str | None = None) -> list[Path]:
    """Remove the hidden temporary files that an earlier, killed ct2mr run left in ``folder``.

    A temporary file of :func:`atomic_writes` records its host and process id in its name
    (``.<final>.ct2mr-<host>-<pid>-<random>.tmp<suffix>``); it is removed when that process no longer runs (on
    another host: when it is older than :data:`FOREIGN_TEMP_SECONDS`), so concurrent writers into one folder are
    safe. Temporary names of earlier ct2mr versions (no owner recorded: ``.<name>.<8 random>.tmp<suffix>`` and the
    run folder's ``.state.json.tmp``, ``.config.yaml.tmp``, ``.log.jsonl.tmp``, ``.split.json.tmp``) are always
    removed. No other file is touched.

    Args:
        folder: the folder to clean (a missing folder is fine).
        final_name: only the temporary files of this final file name; ``None``: all of them.

    Returns:
        The removed paths.
    """
    folder = Path(folder)
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        name = entry.name
        if not name.startswith(".") or not entry.is_file(follow_symlinks=False):
            continue
        match = _TEMP_RE.match(name)
        legacy = None if match else _LEGACY_TEMP_RE.match(name)
        if match is None and legacy is None:
            continue
        final = match["final"] if match is not None else (legacy["final"] or legacy["run"])
        if final_name is not None and final != final_name:
            continue
        path = folder / name
        if match is not None and not _owner_gone(match, path):
            continue
        try:
            path.unlink()
            removed.append(path)
        except OSError:
            pass
    if removed:
        logger.info("Removed %d temporary file(s) of an earlier interrupted run in %s", len(removed), folder)
    return removed


def _clean_once(folder: Path) -> None:
    """:func:`remove_stale_temps` for ``folder``, the first time this process writes there."""
    key = os.path.abspath(folder)
    with _CLEANED_LOCK:
        if key in _CLEANED:
            return
        _CLEANED.add(key)
    remove_stale_temps(folder)


def atomic_path(final: str | os.PathLike) -> Path:
    """Create an empty temporary file next to ``final`` with the same suffix, for write-then-rename.

    The name is hidden and records this host and process (``.<final>.ct2mr-<host>-<pid>-<random>.tmp<suffix>``), so
    that :func:`remove_stale_temps` can tell an abandoned one from one being written. Prefer :func:`atomic_write` /
    :func:`atomic_writes`, which also verify, fsync, set the mode and clean up.

    Args:
        final: the path the file will finally have; its folder must exist.

    Returns:
        The temporary path (created, empty, mode ``0o600``); the caller removes or renames it.
    """
    final = Path(final)
    suffix = image_suffix(final) or final.suffix
    stem = final.name if len(final.name) <= 150 else final.name[:150]
    for _ in range(100):
        token = "".join(random.choices("abcdefghijklmnopqrstuvwxyz0123456789_", k=8))
        tmp = final.parent / f".{stem}{TEMP_MARKER}{_host_tag()}-{os.getpid()}-{token}.tmp{suffix}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f"Could not create a temporary file next to {final}.")


def _free_space_note(folder: Path) -> str:
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        usage = shutil.disk_usage(probe)
    except OSError:
        return f"the free space of {folder} could not be read"
    return f"{folder} has {human_bytes(usage.free)} free of {human_bytes(usage.total)}"


def human_bytes(n: float) -> str:
    """``n`` bytes as text in binary units, e.g. ``"1.5 GiB"``."""
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def _write_error(finals: Sequence[Path], exc: BaseException) -> OutputWriteError:
    """An :class:`OutputWriteError` for ``finals`` caused by ``exc``, naming the folder and its free space."""
    folder = finals[0].parent
    names = ", ".join(p.name for p in finals)
    errno_ = getattr(exc, "errno", None)
    text = getattr(exc, "strerror", None) if isinstance(exc, OSError) and exc.strerror else str(exc)
    text = " ".join(str(text).split()) or type(exc).__name__
    if errno_ is None:  # a writer's own exception type: "... (os error 28)", "[Errno 28] ..."
        found = re.search(r"(?:os error|Errno) (\d+)", text)
        errno_ = int(found.group(1)) if found else None
    if errno_ in (errno.ENOSPC, errno.EDQUOT) or "No space left" in text:
        cause = "the disk is full or over quota"
    elif "incomplete after writing" in text or "wrote only" in text or "unexpected pos" in text:
        cause = ("the file came out incomplete although the writer reported no error, most likely because the disk "
                 "is full, over quota or at a file-size limit")
    elif errno_ == errno.EFBIG or "File too large" in text:
        cause = "the file exceeds this process's file-size limit (ulimit -f) or the file system's largest file"
    elif errno_ in (errno.EACCES, errno.EPERM, errno.EROFS):
        cause = "the folder is not writable"
    else:
        cause = "the write failed"
    return OutputWriteError(
        errno_ or errno.EIO,
        f"Could not write {names} in {folder}: {cause} ({text}). {_free_space_note(folder)}. Nothing was left "
        "under the final name(s); free some space or write to another folder, then run the command again.")


def _incomplete(name: str, detail: str) -> OSError:
    return OSError(errno.EIO, f"{name} is incomplete after writing: {detail}")


def verify_file(path: str | os.PathLike, kind: str | None = None, expected_size: int | None = None,
                name: str | None = None) -> None:
    """Read back a freshly written file and raise unless it is complete.

    What is checked, by ``kind`` (default: the suffix of ``path``):

    * NIfTI (``.nii``, ``.nii.gz``): the header's dimensions and data type give the bytes the file must hold; an
      uncompressed file is compared with its size, a gzip stream with its trailer (ISIZE), and by decompressing when
      that disagrees (SimpleITK's NIfTI writer only prints "wrote only 0 of ... bytes" on a full disk, it does not
      raise).
    * NRRD, MetaImage: read back with SimpleITK.
    * HDF5: dataset ``volume`` read back completely with h5py (every compressed chunk).
    * safetensors: the 8-byte header length + JSON header + the largest tensor end offset = the file size, exactly.
    * PyTorch files (``.pt``, ``.pth``, ``.ckpt``) and ``.npz``: a ZIP whose central directory is intact and whose
      last member ends inside the file.
    * JSON: parses.
    * any file with ``expected_size``: exactly that many bytes.

    Args:
        path: the written file.
        kind: a suffix (e.g. ``".nii.gz"``) naming the format; ``None``: from ``path``.
        expected_size: the exact size in bytes, when the writer knows it.
        name: the file's name in messages (e.g. the final name of a temporary file); ``None``: ``path``'s.

    Raises:
        OSError: ``EIO``, ``"<name> is incomplete after writing: <what is missing>"``.
    """
    path = Path(path)
    name = name or path.name
    kind = (kind or image_suffix(path) or path.suffix).lower()
    size = path.stat().st_size
    try:
        if expected_size is not None and size != expected_size:
            raise _incomplete(name, f"{size} of {expected_size} bytes")
        if kind in (".nii", ".nii.gz"):
            _verify_nifti(path, kind, size, name)
        elif kind in (".nrrd", ".nhdr", ".mha", ".mhd"):
            sitk.ReadImage(str(path))
        elif kind in HDF5_SUFFIXES:
            import h5py

            with h5py.File(path, "r") as f:
                if "volume" in f:
                    f["volume"][()]
        elif kind == ".safetensors":
            _verify_safetensors(path, size, name)
        elif kind in (".pt", ".pth", ".ckpt", ".npz"):
            _verify_zip(path, size, name)
        elif kind == ".json":
            json.loads(path.read_bytes().decode("utf-8"))
    except OSError:
        raise
    except Exception as exc:  # RuntimeError (ITK), h5py errors, BadZipFile, JSON errors
        raise _incomplete(name, " ".join(str(exc).split()) or type(exc).__name__) from exc


def _verify_nifti(path: Path, kind: str, size: int, name: str) -> None:
    expected, actual, problem = _nifti_completeness(path, kind == ".nii.gz")
    if problem:
        raise _incomplete(name, problem if not problem.startswith("no readable") else
                          f"no readable NIfTI header in its {size} bytes")
    if expected is None:
        raise _incomplete(name, f"no NIfTI header in its {size} bytes")
    if actual is not None and actual < expected:
        raise _incomplete(name, f"{actual} of the {expected} bytes its header announces")


def _verify_safetensors(path: Path, size: int, name: str) -> None:
    import struct

    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _incomplete(name, f"{size} bytes, no safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > size:
            raise _incomplete(name, f"a header of {n} bytes in a file of {size}")
        header = json.loads(f.read(n).decode("utf-8"))
    end = max([int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"] or [0])
    if 8 + n + end != size:
        raise _incomplete(name, f"{size} of the {8 + n + end} bytes its header announces")


def _verify_zip(path: Path, size: int, name: str) -> None:
    import zipfile

    with zipfile.ZipFile(path) as zf:
        infos = zf.infolist()
    if infos:
        last = max(infos, key=lambda i: i.header_offset)
        if last.header_offset + last.compress_size > size:
            raise _incomplete(name, f"its last member ends beyond its {size} bytes")


def _fsync_path(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_writes(finals: Sequence[str | os.PathLike], verify: bool = True,
                  expected_sizes: Sequence[int | None] | None = None) -> Iterator[list[Path]]:
    """Write several files all or nothing: the one helper behind every file the engine writes.

    Yields one temporary path per final path (same folder, same suffix, hidden, see :func:`atomic_path`). When the
    block ends without an error, every temporary file is flushed to the disk (``fsync``), read back
    (:func:`verify_file`: header and size, or the exact byte count), given the user's normal mode
    (:func:`output_mode`), and only then renamed onto its final name (``os.replace``, atomic within a folder); the
    folder is fsynced after the renames. On any error or interruption every temporary file is removed and no final
    name is touched; write errors (a full disk, a file-size limit, a read-only folder, a short write that the writer
    did not report) become one :class:`OutputWriteError` naming the folder and its free space. The first write into
    a folder also removes the temporary files that a killed earlier run left there (:func:`remove_stale_temps`).

    Args:
        finals: the paths the files will finally have; their folders must exist.
        verify: read each file back before the rename (``False``: fsync and size only; for writers that verify
            their own output).
        expected_sizes: the exact byte count of each file when the writer knows it (``None`` entries: unknown).

    Yields:
        The temporary paths, in the order of ``finals``.

    Raises:
        OutputWriteError: a file could not be written completely (nothing left under a final name).
        Exception: any other error raised inside the block, after the temporary files are removed.
    """
    paths = [Path(p) for p in finals]
    sizes = list(expected_sizes) if expected_sizes is not None else [None] * len(paths)
    temps: list[Path] = []
    failing = paths  # the files an error is about: all while the caller writes, one while verifying
    try:
        for folder in {p.parent for p in paths}:
            _clean_once(folder)
        for final in paths:
            temps.append(atomic_path(final))
        yield temps
        mode = output_mode()
        for tmp, final, size in zip(temps, paths, sizes):
            failing = [final]
            _fsync_path(tmp)
            if verify:
                verify_file(tmp, image_suffix(final) or final.suffix, size, final.name)
            elif size is not None and tmp.stat().st_size != size:
                raise _incomplete(final.name, f"{tmp.stat().st_size} of {size} bytes")
            os.chmod(tmp, mode)
        failing = paths
        for tmp, final in zip(temps, paths):
            os.replace(tmp, final)
        for folder in {p.parent for p in paths}:
            try:
                _fsync_path(folder, directory=True)
            except OSError:  # some file systems cannot fsync a folder; the renames are done
                pass
    except OutputWriteError:
        _remove(temps)
        raise
    except Exception as exc:
        _remove(temps)
        if not isinstance(exc, OSError) and not _is_writer_failure(exc):
            raise  # not about writing (e.g. tensors a writer refuses, a value JSON cannot hold): as it is
        raise _write_error(failing, exc) from exc
    except BaseException:
        _remove(temps)
        raise


def _is_writer_failure(exc: BaseException) -> bool:
    """Whether a writer's own exception (SimpleITK's RuntimeError, h5py's, safetensors' SafetensorError, torch.save's
    "unexpected pos" of a short ZIP write) reports a failed write rather than a caller's mistake."""
    text = str(exc)
    return any(key in text for key in ("ITK ERROR", "rite", "No space", "too large", "I/O error", "os error",
                                       "Errno", "unexpected pos", "inline_container"))


def _remove(paths: Iterable[Path]) -> None:
    for path in paths:
        try:
            path.unlink(missing_ok=True)
        except OSError:
            pass


@contextmanager
def atomic_write(final: str | os.PathLike, verify: bool = True, expected_size: int | None = None
                 ) -> Iterator[Path]:
    """Write one file atomically and verified: :func:`atomic_writes` for a single path.

    Args:
        final: the path the file will finally have; its folder must exist.
        verify: read the file back before the rename (:func:`verify_file`).
        expected_size: the exact byte count, when known.

    Yields:
        The temporary path to write to (same folder and suffix).

    Raises:
        OutputWriteError: the file could not be written completely; ``final`` is left as it was.
    """
    with atomic_writes([final], verify, [expected_size]) as temps:
        yield temps[0]


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically, fsynced and checked byte for byte (:func:`atomic_write`).

    Raises:
        OutputWriteError: the file could not be written completely (nothing left under ``path``).
    """
    path = Path(path)
    with atomic_write(path, expected_size=len(data)) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
        if hashlib.sha256(tmp.read_bytes()).digest() != hashlib.sha256(data).digest():
            raise _incomplete(path.name, "its bytes differ from those written")
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 text to ``path`` atomically and verified (:func:`write_bytes`)."""
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, value: Any, indent: int | None = 2, **dumps: Any) -> Path:
    """Write ``value`` as JSON (with a final newline) atomically and verified (:func:`write_bytes`).

    Args:
        path: destination; its folder must exist.
        value: a JSON-serialisable value.
        indent: ``json.dumps`` indentation.
        **dumps: further ``json.dumps`` arguments (e.g. ``default=str``).

    Raises:
        OutputWriteError: the file could not be written completely.
        TypeError: ``value`` is not JSON-serialisable.
    """
    return write_text(path, json.dumps(value, indent=indent, **dumps) + "\n")


def write_image(image: sitk.Image, path: str | os.PathLike, compress: bool = True) -> Path:
    """Write a volume atomically and verified (:func:`atomic_write`: temporary file, fsync, read back, rename).

    Args:
        image: the image to write; its geometry is written as is.
        path: destination ending in ``.nii.gz``, ``.nii``, ``.nrrd`` or ``.mha``. The folder must exist.
        compress: compress the pixel data.

    Returns:
        The destination path.

    Raises:
        ValueError: unsupported suffix.
        OutputWriteError: the folder is not writable or the disk is full (nothing left under ``path``).
    """
    path = Path(path)
    if image_suffix(path) not in WRITE_SUFFIXES:
        raise ValueError(f"Cannot write {path}: use one of {', '.join(WRITE_SUFFIXES)}.")
    with atomic_write(path) as tmp:
        sitk.WriteImage(image, str(tmp), compress)
    return path


def write_hdf5(array: np.ndarray, path: str | os.PathLike, attrs: dict | None = None) -> Path:
    """Write a preprocessed volume in the thesis's HDF5 layout, atomically and verified (:func:`atomic_write`).

    Args:
        array: float32 volume, (z, y, x).
        path: destination ``.h5`` file; its folder must exist.
        attrs: attributes to store; dicts and lists of mixed types are stored as JSON strings.

    Returns:
        The destination path.

    The file is built in memory and written as bytes (HDF5's own file driver can crash the process on a failed
    write), then read back completely (every compressed chunk) before the rename.

    Raises:
        OutputWriteError: the disk is full or the folder not writable (nothing left under ``path``).
    """
    import io

    import h5py

    path = Path(path)
    buffer = io.BytesIO()  # HDF5's own file driver can crash on a failed write; the bytes are written here instead
    with h5py.File(buffer, "w") as f:
        f.create_dataset("volume", data=np.asarray(array, dtype=np.float32), compression="gzip",
                         compression_opts=4, shuffle=True)
        for key, value in (attrs or {}).items():
            if isinstance(value, dict) or (isinstance(value, (list, tuple)) and value
                                           and not all(isinstance(v, (int, float)) for v in value)):
                value = json.dumps(value)
            elif value is None:
                value = "null"
            f.attrs[key] = value
    data = buffer.getbuffer()
    with atomic_write(path, expected_size=len(data)) as tmp:
        with open(tmp, "wb") as out:
            out.write(data)
    return path
