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
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import SimpleITK as sitk

__all__ = [
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


def _check_nifti_complete(path: Path) -> None:
    """Raise :class:`ImageReadError` for a truncated NIfTI file, which ITK would silently fill with zeros.

    Uncompressed files are checked against their size; ``.nii.gz`` files against the gzip trailer's ISIZE (the
    uncompressed size modulo 2**32), and only when that disagrees, by decompressing the stream.
    """
    import gzip
    import zlib

    compressed = image_suffix(path) == ".nii.gz"
    try:
        if compressed:
            with gzip.open(path, "rb") as f:
                header = f.read(544)
        else:
            with open(path, "rb") as f:
                header = f.read(544)
    except (OSError, EOFError, zlib.error) as exc:
        raise ImageReadError(f"{path} could not be read as a medical image ({exc}). Is the file truncated or of "
                             "another kind?") from exc
    expected = _nifti_data_end(header)
    if expected is None:
        return  # not a NIfTI header: let ITK report it
    if not compressed:
        actual = path.stat().st_size
    else:
        with open(path, "rb") as f:
            f.seek(-4, os.SEEK_END)
            if int.from_bytes(f.read(4), "little") == expected % 2**32:
                return
        actual = 0
        try:
            with gzip.open(path, "rb") as f:
                while chunk := f.read(1 << 16):
                    actual += len(chunk)
        except (OSError, EOFError, zlib.error):
            raise ImageReadError(f"{path} is truncated or corrupt: its compressed data end before the end of the "
                                 f"stream (after about {actual} of the {expected} bytes its header announces). Copy "
                                 "or export it again.") from None
    if actual < expected:
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
    if image_suffix(path) in (".nii", ".nii.gz"):
        _check_nifti_complete(path)
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as exc:
        first_line = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unknown error"
        raise ImageReadError(
            f"{path} could not be read as a medical image ({first_line}). Supported: NIfTI, NRRD, MHA, HDF5 "
            "(dataset 'volume') and DICOM series folders. Is the file truncated or of another kind?") from exc


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
                             "or read all of them with ct2mr.io.read_volumes.")
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


def atomic_path(final: str | os.PathLike) -> Path:
    """Return a temporary path next to ``final`` with the same suffix, for write-then-rename.

    Args:
        final: the path the file will finally have.

    Returns:
        A path in the same folder (so ``os.replace`` is atomic) that does not exist yet.
    """
    final = Path(final)
    suffix = image_suffix(final) or final.suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=f".tmp{suffix}", dir=final.parent)
    os.close(fd)
    return Path(tmp)


@contextmanager
def atomic_write(final: str | os.PathLike) -> Iterator[Path]:
    """Write a file atomically: yield a temporary path next to ``final``, rename it to ``final`` on success.

    On any error (or interruption) inside the block the temporary file is deleted and ``final`` is left as it was.

    Args:
        final: the path the file will finally have; its folder must exist.

    Yields:
        The temporary path to write to (same folder and suffix, see :func:`atomic_path`).
    """
    final = Path(final)
    tmp = atomic_path(final)
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def write_image(image: sitk.Image, path: str | os.PathLike, compress: bool = True) -> Path:
    """Write a volume atomically (temporary file in the same folder, then rename).

    Args:
        image: the image to write; its geometry is written as is.
        path: destination ending in ``.nii.gz``, ``.nii``, ``.nrrd`` or ``.mha``. The folder must exist.
        compress: compress the pixel data.

    Returns:
        The destination path.

    Raises:
        ValueError: unsupported suffix.
        OSError: the folder does not exist or is not writable.
    """
    path = Path(path)
    if image_suffix(path) not in WRITE_SUFFIXES:
        raise ValueError(f"Cannot write {path}: use one of {', '.join(WRITE_SUFFIXES)}.")
    with atomic_write(path) as tmp:
        sitk.WriteImage(image, str(tmp), compress)
    return path


def write_hdf5(array: np.ndarray, path: str | os.PathLike, attrs: dict | None = None) -> Path:
    """Write a preprocessed volume in the thesis's HDF5 layout, atomically.

    Args:
        array: float32 volume, (z, y, x).
        path: destination ``.h5`` file; its folder must exist.
        attrs: attributes to store; dicts and lists of mixed types are stored as JSON strings.

    Returns:
        The destination path.
    """
    import h5py

    path = Path(path)
    with atomic_write(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("volume", data=np.asarray(array, dtype=np.float32), compression="gzip",
                         compression_opts=4, shuffle=True)
        for key, value in (attrs or {}).items():
            if isinstance(value, dict) or (isinstance(value, (list, tuple)) and value
                                           and not all(isinstance(v, (int, float)) for v in value)):
                value = json.dumps(value)
            elif value is None:
                value = "null"
            f.attrs[key] = value
    return path
