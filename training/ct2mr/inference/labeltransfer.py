"""Label transfer: a labelled CT collection becomes a synthetic-MR training set with the same labels (thesis 1.2, E3).

Because ``ct2mr translate`` keeps the CT's voxel grid exactly (size, spacing, origin, direction), a CT's label map is
also the label map of its synthetic MR G(x). :func:`synthesize_dataset` pairs CTs and label maps by case id,
translates every CT with one loaded model, copies each label map unchanged (bit-identical when it is already
``.nii.gz``, voxel-identical otherwise) and writes an nnU-Net v2 raw dataset or a MONAI datalist
(:mod:`ct2mr.io.nnunet`). It is resumable (finished cases are skipped), shards cases over ``torchrun`` processes
(``RANK``/``WORLD_SIZE``), and records the model's name, version and SHA-256, the preprocessing and inference
parameters and the software version in ``ct2mr_dataset.json``.

Optional augmentation writes several synthetic MRs per CT with MR-like corruption (MONAI's ``RandBiasField`` for a
smooth multiplicative coil bias, then ``RandRicianNoise``), each with the same label map.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import SimpleITK as sitk

from ct2mr import __version__
from ct2mr.checks import prepare_output_dir, replace_nonfinite
from ct2mr.inference.cluster import shard
from ct2mr.io.images import ImageReadError, atomic_write, image_suffix, list_images, read_image, write_image
from ct2mr.io.nnunet import FORMATS, case_id, image_name, label_name, parse_label_names, write_json_atomic, write_layout_index

__all__ = [
    "GridMismatchError",
    "CaseResult",
    "SynthesisReport",
    "pair_cases",
    "check_same_grid",
    "copy_label",
    "augment_synthetic_mr",
    "synthesize_dataset",
]

logger = logging.getLogger(__name__)
RECORDS = ".ct2mr/cases"


class GridMismatchError(ValueError):
    """A label map is not on its CT's voxel grid; the message names what differs."""


@dataclass
class CaseResult:
    """What happened to one case: ``status`` is ``written``, ``skipped`` (up to date) or ``failed``."""

    case: str
    status: str
    message: str = ""
    outputs: list[str] = field(default_factory=list)


@dataclass
class SynthesisReport:
    """The outcome of :func:`synthesize_dataset`.

    Attributes:
        out: the dataset folder.
        results: one :class:`CaseResult` per processed case of this process's shard.
        unmatched_images: image paths without a label map.
        unmatched_labels: label paths without an image.
        index: the dataset.json / datalist.json written.
    """

    out: Path
    results: list[CaseResult]
    unmatched_images: list[str]
    unmatched_labels: list[str]
    index: Path | None = None

    @property
    def failed(self) -> list[CaseResult]:
        """The failed cases."""
        return [r for r in self.results if r.status == "failed"]

    def summary(self) -> str:
        """One paragraph for people."""
        counts = {s: sum(r.status == s for r in self.results) for s in ("written", "skipped", "failed")}
        lines = [f"{len(self.results)} case(s): {counts['written']} written, {counts['skipped']} up to date "
                 f"(skipped), {counts['failed']} failed -> {self.out}"]
        lines += [f"  failed {r.case}: {r.message}" for r in self.failed]
        if self.unmatched_images:
            lines.append(f"  {len(self.unmatched_images)} image(s) without a label map: "
                         + ", ".join(Path(p).name for p in self.unmatched_images))
        if self.unmatched_labels:
            lines.append(f"  {len(self.unmatched_labels)} label map(s) without an image: "
                         + ", ".join(Path(p).name for p in self.unmatched_labels))
        return "\n".join(lines)


def pair_cases(images: str | os.PathLike | Iterable, labels: str | os.PathLike | Iterable
               ) -> tuple[list[tuple[str, Path, Path]], list[Path], list[Path]]:
    """Pair CTs and label maps by case id (:func:`ct2mr.io.nnunet.case_id`).

    Args:
        images: CT files or folders (:func:`ct2mr.io.images.list_images`).
        labels: label-map files or folders.

    Returns:
        ``(pairs, unmatched_images, unmatched_labels)`` with ``pairs`` as ``(case, image, label)`` sorted by case.

    Raises:
        FileNotFoundError, ImageReadError: a path is missing or a folder holds no volume.
        ValueError: two images (or two labels) share a case id.
    """
    def index(paths: list[Path], kind: str) -> dict[str, Path]:
        """``{case id: path}``; a ``ValueError`` when two paths share a case id."""
        found: dict[str, Path] = {}
        for path in paths:
            case = case_id(path)
            if case in found:
                raise ValueError(f"Two {kind} files have the case id {case!r}: {found[case]} and {path}. Rename one.")
            found[case] = path
        return found

    image_index = index(list_images(images), "image")
    label_index = index(list_images(labels), "label")
    pairs = [(c, image_index[c], label_index[c]) for c in sorted(set(image_index) & set(label_index))]
    unmatched_images = [image_index[c] for c in sorted(set(image_index) - set(label_index))]
    unmatched_labels = [label_index[c] for c in sorted(set(label_index) - set(image_index))]
    return pairs, unmatched_images, unmatched_labels


def check_same_grid(image: sitk.Image, label: sitk.Image, tolerance: float = 1e-4, what: str = "label map") -> None:
    """Refuse a label map that is not on the image's voxel grid.

    Args:
        image: the CT.
        label: its label map.
        tolerance: largest accepted difference of spacing (mm), origin (mm) and direction cosines.
        what: how to call the label map in the message.

    Raises:
        GridMismatchError: size, spacing, origin or direction differ; the message gives both values.
    """
    checks = [("size", image.GetSize(), label.GetSize(), 0.0), ("spacing", image.GetSpacing(), label.GetSpacing(),
              tolerance), ("origin", image.GetOrigin(), label.GetOrigin(), tolerance),
              ("direction", image.GetDirection(), label.GetDirection(), tolerance)]
    for name, a, b, tol in checks:
        if len(a) != len(b) or np.max(np.abs(np.subtract(a, b))) > tol:
            raise GridMismatchError(
                f"The {what} is not on the CT's voxel grid: {name} {_fmt(b)} vs the CT's {_fmt(a)}. Resample the label map onto the CT (nearest neighbour), e.g. in 3D Slicer "
                "or with SimpleITK, then run again.")


def _fmt(values: Sequence[float]) -> str:
    """``(a, b, c)`` with each value in ``%g`` form, for grid messages."""
    return "(" + ", ".join(f"{float(v):g}" for v in values) + ")"


def copy_label(source: str | os.PathLike, destination: str | os.PathLike) -> Path:
    """Copy a label map to ``destination`` (``.nii.gz``) without changing a voxel, atomically.

    A ``.nii.gz`` source is copied byte for byte; any other format is rewritten as NIfTI with the same pixel type,
    voxel values and geometry.

    Returns:
        The destination path.
    """
    destination = Path(destination)
    with atomic_write(destination) as tmp:
        if image_suffix(source) == ".nii.gz":
            shutil.copyfile(source, tmp)
        else:
            sitk.WriteImage(read_image(source), str(tmp), True)
    return destination


def augment_synthetic_mr(array: np.ndarray, seed: int, bias_coeff: tuple[float, float] = (0.0, 0.3),
                         noise_std: float = 0.03) -> np.ndarray:
    """MR-like corruption of a synthetic MR for segmentation training (thesis section 8 perspectives).

    The [-1, 1] intensity is shifted to a magnitude in [0, 2], multiplied by a smooth random bias field (MONAI
    ``RandBiasField``, degree 3, coefficients in ``bias_coeff``), given Rician noise (MONAI ``RandRicianNoise``, std
    ``noise_std`` on that scale), shifted back and clipped to [-1, 1].

    Args:
        array: synthetic MR, (z, y, x) float32 in [-1, 1].
        seed: random seed (the same seed gives the same result).
        bias_coeff: range of the bias-field polynomial coefficients.
        noise_std: Rician noise standard deviation on the [0, 2] magnitude scale.

    Returns:
        The corrupted (z, y, x) float32 array.
    """
    from monai.transforms import RandBiasField, RandRicianNoise

    magnitude = (np.asarray(array, np.float32) + 1.0)[None]  # (1, z, y, x), >= 0
    bias = RandBiasField(degree=3, coeff_range=bias_coeff, prob=1.0)
    bias.set_random_state(seed)
    noise = RandRicianNoise(prob=1.0, std=noise_std, sample_std=False)
    noise.set_random_state(seed + 1)
    out = np.asarray(noise(bias(magnitude)))[0] - 1.0
    return np.clip(out, -1.0, 1.0).astype(np.float32)


def _stat(path: Path) -> list:
    """``[size, mtime_ns]`` of a file, ``[file count, latest mtime_ns]`` of a folder (what a case record compares)."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file())
        return [len(files), max((p.stat().st_mtime_ns for p in files), default=0)]
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def _label_values(label: sitk.Image, path: Path) -> list[int]:
    """The label values present; an ``ImageReadError`` when a float label map holds non-integer values."""
    array = sitk.GetArrayViewFromImage(label)
    if not np.issubdtype(array.dtype, np.integer):
        if not np.all(np.mod(array, 1) == 0):
            raise ImageReadError(f"{path} holds non-integer values; a label map must hold integer labels.")
    return [int(v) for v in np.unique(array)]


def synthesize_dataset(images: str | os.PathLike | Iterable, labels: str | os.PathLike | Iterable,
                       out: str | os.PathLike, model: str | os.PathLike | None = None, fmt: str = "nnunet",
                       label_names: str | os.PathLike | dict | None = None, settings: Any = None, augment: int = 0,
                       name: str = "CT2MRSynthetic", progress: Callable[[int, int, str], None] | None = None,
                       rank: int | None = None, world_size: int | None = None) -> SynthesisReport:
    """Translate a labelled CT collection into a synthetic-MR training set with the same labels.

    Args:
        images: CT files or folders (HU), any format :func:`ct2mr.io.images.read_image` reads.
        labels: label-map files or folders, paired with the CTs by case id.
        out: dataset folder (``imagesTr``, ``labelsTr``, ``dataset.json`` or ``datalist.json``,
            ``ct2mr_dataset.json``).
        model: ct2mr checkpoint; ``None`` uses the default model.
        fmt: ``"nnunet"`` or ``"monai"``.
        label_names: JSON file or mapping of label names (:func:`ct2mr.io.nnunet.parse_label_names`); ``None`` names
            the values found ``label_<value>``.
        settings: :class:`ct2mr.inference.translate.InferenceSettings`.
        augment: extra synthetic MRs per CT with :func:`augment_synthetic_mr` (cases ``<case>_augN``).
        name: dataset name.
        progress: ``callback(done, total, case)`` after each case.
        rank, world_size: shard (:func:`ct2mr.inference.cluster.shard`; default: ``RANK``/``WORLD_SIZE`` from
            ``torchrun``, else all cases).

    Returns:
        The :class:`SynthesisReport`; failed cases (unreadable files, mismatched grids) are reported, not raised.

    Raises:
        ValueError: unknown format, negative ``augment``, or no pair at all.
        FileNotFoundError, CheckpointError: missing inputs or an unusable model (before anything is written).
    """
    from ct2mr.models.checkpoint import load_checkpoint
    from ct2mr.inference.translate import InferenceSettings

    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}.")
    if augment < 0:
        raise ValueError(f"augment must be >= 0, got {augment}.")
    pairs, unmatched_images, unmatched_labels = pair_cases(images, labels)
    if not pairs:
        raise ValueError(f"No CT has a label map with the same case id ({len(unmatched_images)} image(s), "
                         f"{len(unmatched_labels)} label map(s)). Name them alike, e.g. case01.nii.gz in both "
                         "folders, or case01_0000.nii.gz and case01.nii.gz.")
    settings = settings or InferenceSettings()
    checkpoint = load_checkpoint(model)
    job = _Job(Path(out), checkpoint, settings, augment,
               {str(p.resolve()) for _, image, label in pairs for p in (image, label)})
    prepare_output_dir(job.out, "dataset folder (--out)")  # created and proved writable before any translation
    for sub in ("imagesTr", "labelsTr", RECORDS):
        (job.out / sub).mkdir(parents=True, exist_ok=True)
    model_info = _model_info(checkpoint)

    results: list[CaseResult] = []
    mine = shard(pairs, rank, world_size)
    for done, (case, image_path, label_path) in enumerate(mine, start=1):
        cases, outputs = job.case_outputs(case)
        if any(str(p.resolve()) in job.inputs for p in outputs):
            results.append(CaseResult(case, "failed", "an output would overwrite an input; choose another --out"))
            continue
        results.append(_run_case(job, case, image_path, label_path, cases, outputs))
        if progress:
            progress(done, len(mine), case)

    index = _write_index(job.out, fmt, label_names, name, model_info, checkpoint, settings, unmatched_images,
                         unmatched_labels)
    return SynthesisReport(job.out, results, [str(p) for p in unmatched_images], [str(p) for p in unmatched_labels],
                           index)


@dataclass
class _Job:
    """What every case of a :func:`synthesize_dataset` run shares.

    Attributes:
        out: the dataset folder.
        checkpoint: the loaded model.
        settings: the inference settings.
        augment: extra augmented synthetic MRs per CT.
        inputs: resolved paths of every image and label map (no output may be one of them).
    """

    out: Path
    checkpoint: Any
    settings: Any
    augment: int
    inputs: set[str]

    def case_outputs(self, case: str) -> tuple[list[str], list[Path]]:
        """``(cases, outputs)``: the case and its ``_augN`` copies, then their image and label-map paths."""
        cases = [case] + [f"{case}_aug{k}" for k in range(1, self.augment + 1)]
        outputs = [self.out / "imagesTr" / image_name(c) for c in cases] + [self.out / "labelsTr" / label_name(c)
                                                                            for c in cases]
        return cases, outputs


def _model_info(checkpoint: Any) -> dict[str, Any]:
    """The model's name, version, SHA-256 and file name, from the model list when it is registered."""
    from ct2mr.models.checkpoint import registry_entry

    entry = registry_entry(checkpoint.sha256) or {}
    return {"name": entry.get("name", checkpoint.name), "version": entry.get("version", "unregistered"),
            "sha256": checkpoint.sha256, "file": checkpoint.path.name if checkpoint.path else None}


def _run_case(job: _Job, case: str, image_path: Path, label_path: Path, cases: list[str], outputs: list[Path]
              ) -> CaseResult:
    """One case: skipped when its record matches, else translated and written; failures become its result."""
    record_path = job.out / RECORDS / f"{case}.json"
    settings = job.settings
    wanted = {"image": str(image_path), "label": str(label_path), "image_stat": _stat(image_path),
              "label_stat": _stat(label_path), "model_sha256": job.checkpoint.sha256, "augment": job.augment,
              "settings": {"roi_size": settings.roi_size, "overlap": settings.overlap,
                           "precision": settings.precision}}
    wanted = json.loads(json.dumps(wanted))  # as stored: tuples become lists
    if record_path.is_file() and all(p.is_file() for p in outputs):
        record = json.loads(record_path.read_text())
        if all(record.get(k) == v for k, v in wanted.items()):
            return CaseResult(case, "skipped", outputs=[str(p) for p in outputs])
    try:
        _make_case(job, case, image_path, label_path, cases, wanted, record_path)
        return CaseResult(case, "written", outputs=[str(p) for p in outputs])
    except (OSError, ValueError, RuntimeError) as exc:  # ImageReadError and GridMismatchError are ValueErrors
        logger.error("%s: %s", case, exc)
        return CaseResult(case, "failed", str(exc))


def _make_case(job: _Job, case: str, image_path: Path, label_path: Path, cases: list[str], wanted: dict[str, Any],
               record_path: Path) -> None:
    """Translate the CT, write its synthetic MR(s) and label copies, then the case's record (last: "done")."""
    from ct2mr.inference.translate import translate_image

    ct, _ = replace_nonfinite(read_image(image_path), "ct", str(image_path))  # NaN/inf -> -1024 HU
    label = read_image(label_path)
    check_same_grid(ct, label)
    values = _label_values(label, label_path)
    result = translate_image(ct, job.checkpoint, job.settings)
    synthetic = result.synthetic_mr
    array = sitk.GetArrayFromImage(synthetic)
    for k, c in enumerate(cases):
        image_out = synthetic
        if k:
            image_out = sitk.GetImageFromArray(augment_synthetic_mr(array, seed=zlib.crc32(f"{case}:{k}".encode())))
            image_out.CopyInformation(synthetic)
        write_image(image_out, job.out / "imagesTr" / image_name(c))
        copy_label(label_path, job.out / "labelsTr" / label_name(c))
    write_json_atomic({**wanted, "cases": cases, "label_values": values,
                       "seconds": result.info.get("seconds"), "written": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                        time.gmtime())},
                      record_path)


def _write_index(out: Path, fmt: str, label_names: Any, name: str, model_info: dict, checkpoint: Any, settings: Any,
                 unmatched_images: list[Path], unmatched_labels: list[Path]) -> Path | None:
    """(Re)write dataset.json / datalist.json and ct2mr_dataset.json from every finished case's record."""
    records = [json.loads(p.read_text()) for p in sorted((out / RECORDS).glob("*.json"))]
    if not records:
        return None
    cases = [c for r in records for c in r["cases"]]
    values = sorted({v for r in records for v in r["label_values"]})
    labels = parse_label_names(label_names, values)
    description = (f"Synthetic MR made by ct2mr {__version__} with model {model_info['name']} "
                   f"(SHA-256 {model_info['sha256']}) from labelled CTs; labels copied unchanged.")
    index = write_layout_index(out, cases, labels, fmt, name, description)
    write_json_atomic({"ct2mr_version": __version__, "format": fmt, "model": model_info,
                       "preprocessing": checkpoint.preprocessing.to_dict(),
                       "inference": {"roi_size": settings.roi_size, "overlap": settings.overlap,
                                     "sw_batch_size": settings.sw_batch_size, "precision": settings.precision},
                       "labels": labels, "cases": {r["cases"][0]: r for r in records},
                       "unmatched_images": [str(p) for p in unmatched_images],
                       "unmatched_labels": [str(p) for p in unmatched_labels]}, out / "ct2mr_dataset.json")
    return index
