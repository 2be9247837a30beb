"""Checks before the work: inputs that are not what the model expects, output folders, disk space and memory.

Everything here runs before any computing, in seconds, and fails with one message that says what is wrong and what
to do (issue 15: "nothing lost, nothing silently wrong").

**Inputs** (:func:`check_input_image`; ``ct2mr translate`` for its CT, ``ct2mr train`` for ``--ct`` and ``--mr``
through :func:`ct2mr.preprocessing.collections.load_domain` inside :func:`input_checks`; other readers of training data, e.g.
``ct2mr evaluate``, get rules 1 and 2 only). Arrays are (z, y, x) NumPy views of SimpleITK images; CT
intensities in HU, MR in arbitrary units, spacing in mm.

1. *Spacing*: every voxel spacing must lie in :data:`SPACING_RANGE_MM` (0.1 to 20 mm). Outside it the 1 mm network
   grid of the preprocessing (thesis section 4) collapses (0.01 mm: the whole volume becomes a few voxels and the
   output is constant) or explodes (50 mm: a 50-fold larger grid per axis). Refused, even with ``--force``.
2. *Non-finite voxels* (NaN, +-inf, float images only): counted, reported as a warning and replaced by
   :data:`NONFINITE_FILL` (CT: -1024 HU, air, what scanners store outside the reconstruction; MR: 0, no signal).
3. *Constant volume*: every voxel the same value. Refused (``--force`` overrides for a CT; a flat MR is skipped by
   the training data loader, as before).
4. *Is it a CT in HU?* (:func:`intensity_stats`, :func:`ct_problems`), on at most :data:`STATS_MAX_VOXELS` voxels
   taken with a regular stride, after leaving out field-of-view padding (the voxels at the volume's minimum when that
   minimum is below -1100 HU, e.g. -2048 or -3024):

   * at least :data:`MIN_LOW_FRACTION` (0.2 %) of the voxels clearly below water, :data:`LOW_HU` (-1100..-30 HU:
     air near -1000 around the body, lungs -900..-500, fat -150..-30); the five shared CTs hold 52-75 %, crops
     inside the abdomen 25-48 % (fat), a 60x60x45 mm crop inside the contrast-filled heart 0.85 %, the shared MRs
     0.003 % and 0 % (MR magnitudes are >= 0);
   * at least :data:`MIN_SOFT_FRACTION` (5 %) at water and soft-tissue values :data:`SOFT_TISSUE_HU` (-100..100 HU;
     the shared CTs 26-46 %);
   * at least :data:`MIN_CT_RANGE_FRACTION` (95 %) inside the CT range :data:`CT_RANGE_HU` (-1200..4000 HU).

   A CT must pass all three; an MR, a constant or an unscaled volume (air stored at 0 instead of -1000 HU) fails and
   is refused unless ``--force``. A volume smaller than :data:`MIN_CHECK_EXTENT_MM` (50 mm) along every axis is too
   small for these statistics (a 3 cm cube inside the contrast-filled heart holds neither air nor fat): only the
   constant-volume rule applies to it. The share at air/lung values :data:`AIR_LUNG_HU` (-1100..-400 HU; the shared CTs
   37-65 %) is reported too: an MR given to training (``--mr``) is refused the other way round when it passes all
   three rules *and* holds at least :data:`CT_AS_MR_AIR_FRACTION` (5 %) of air/lung values, i.e. it is a CT in HU.

**Outputs** (:func:`prepare_output_dir`, :func:`check_free_space`): the output folder is created and a probe file
written into it before anything else, so ``-o`` naming a file, a read-only folder or ``/proc/...`` fails at once;
the disk must hold the expected outputs (:func:`expected_output_bytes`: float32 on the input grid, uncompressed,
since gzip barely shrinks float32 images: 86 % on the shared heart CT).

**Memory**: a translation's peak memory is estimated from the input and network grids
(:func:`estimate_translation_bytes`), a training step's from a probe of the configured networks
(:func:`estimate_training_memory`), and compared with the memory this process can use
(:func:`available_memory_bytes`, :func:`device_memory_bytes`); too large a ``--patch-size`` is refused with the
largest one that fits.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import errno
import logging
import math
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import SimpleITK as sitk

from ct2mr.io.images import human_bytes

logger = logging.getLogger(__name__)

__all__ = [
    "InputCheckError",
    "ResourceCheckError",
    "OutputCheckError",
    "SPACING_RANGE_MM",
    "AIR_LUNG_HU",
    "LOW_HU",
    "SOFT_TISSUE_HU",
    "CT_RANGE_HU",
    "MIN_LOW_FRACTION",
    "CT_AS_MR_AIR_FRACTION",
    "MIN_SOFT_FRACTION",
    "MIN_CT_RANGE_FRACTION",
    "NONFINITE_FILL",
    "STATS_MAX_VOXELS",
    "MIN_CHECK_EXTENT_MM",
    "MIN_GRID_VOXELS",
    "IntensityStats",
    "InputReport",
    "check_spacing",
    "replace_nonfinite",
    "intensity_stats",
    "ct_problems",
    "check_input_image",
    "input_checks",
    "input_checks_mode",
    "validate_overlap",
    "validate_roi_size",
    "prepare_output_dir",
    "existing_outputs",
    "check_free_space",
    "expected_output_bytes",
    "available_memory_bytes",
    "device_memory_bytes",
    "network_grid_zyx",
    "estimate_translation_bytes",
    "check_translation_resources",
    "TrainingMemory",
    "TRAINING_BASE_BYTES",
    "estimate_training_memory",
    "training_device",
    "check_training_memory",
    "check_training_inputs",
    "human_bytes",
]

#: Accepted voxel spacing along every axis, mm (inclusive).
SPACING_RANGE_MM = (0.1, 20.0)
#: Air and lung intensities, HU.
AIR_LUNG_HU = (-1100.0, -400.0)
#: Everything clearly below water: air, lung and fat, HU.
LOW_HU = (-1100.0, -30.0)
#: Water, blood and soft tissue intensities, HU.
SOFT_TISSUE_HU = (-100.0, 100.0)
#: The range of a CT in HU (air -1000, dense bone and contrast up to ~3000, some metal beyond).
CT_RANGE_HU = (-1200.0, 4000.0)
#: Smallest share of voxels in :data:`LOW_HU` (air, lung or fat) for a CT.
MIN_LOW_FRACTION = 0.002
#: A volume given as MR that is a plausible CT with at least this share of air/lung voxels is refused as a CT.
CT_AS_MR_AIR_FRACTION = 0.05
#: Smallest share of voxels at soft-tissue values for a CT.
MIN_SOFT_FRACTION = 0.05
#: Smallest share of voxels inside :data:`CT_RANGE_HU` for a CT.
MIN_CT_RANGE_FRACTION = 0.95
#: What NaN and infinite voxels are replaced by, per modality (CT: air in HU; MR: no signal).
NONFINITE_FILL = {"ct": -1024.0, "mr": 0.0}
#: Voxels the intensity statistics look at (a regular stride through the volume beyond this).
STATS_MAX_VOXELS = 2_000_000
#: Smallest extent along any axis of the 1 mm network grid (before padding), voxels = mm.
MIN_GRID_VOXELS = 8
#: Volumes smaller than this along every axis (mm) get only the constant-volume rule of the plausibility check.
MIN_CHECK_EXTENT_MM = 50.0
#: Minimum value treated as field-of-view padding when below this, HU.
_PADDING_BELOW_HU = -1100.0

_INPUT_CHECKS: contextvars.ContextVar[str | None] = contextvars.ContextVar("ct2mr_input_checks", default=None)


class InputCheckError(ValueError):
    """An input volume is refused before any computing: wrong spacing, constant, or not the expected modality."""


class ResourceCheckError(RuntimeError):
    """The machine cannot hold the work (disk space or memory); the message gives the estimate and what to change."""


class OutputCheckError(OSError):
    """The output folder cannot be created or written; found before any computing (``errno`` says why)."""

    def __str__(self) -> str:
        return str(self.strerror) if self.strerror else super().__str__()


def _pct(fraction: float) -> str:
    """A share as a percentage with enough digits to tell small ones from zero, e.g. ``"0.0033%"``."""
    value = 100 * fraction
    return "0%" if value == 0 else f"{value:.2g}%" if value < 1 else f"{value:.1f}%"


# ---- inputs ---------------------------------------------------------------------------------------------------
@dataclass
class IntensityStats:
    """Intensity statistics of one volume (:func:`intensity_stats`); fractions are of the non-padding voxels.

    Attributes:
        voxels: voxels in the volume.
        sampled: voxels the statistics were taken from (a regular stride).
        padding_value: the field-of-view padding value left out (HU), ``None`` when there is none.
        padding_fraction: share of the sampled voxels at ``padding_value``.
        minimum, maximum: extreme values (padding excluded).
        p1, median, p99: percentiles.
        air_fraction: share in :data:`AIR_LUNG_HU`.
        low_fraction: share in :data:`LOW_HU` (air, lung, fat).
        soft_fraction: share in :data:`SOFT_TISSUE_HU`.
        ct_range_fraction: share in :data:`CT_RANGE_HU`.
    """

    voxels: int
    sampled: int
    padding_value: float | None
    padding_fraction: float
    minimum: float
    maximum: float
    p1: float
    median: float
    p99: float
    air_fraction: float
    low_fraction: float
    soft_fraction: float
    ct_range_fraction: float

    @property
    def constant(self) -> bool:
        """Every (non-padding) voxel has the same value."""
        return self.maximum == self.minimum

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (floats rounded)."""
        return {k: (round(v, 5) if isinstance(v, float) else v) for k, v in dataclasses.asdict(self).items()}


@dataclass
class InputReport:
    """What :func:`check_input_image` found.

    Attributes:
        name: the input's name in messages (usually its path).
        modality: ``"ct"`` or ``"mr"``.
        nonfinite: NaN and infinite voxels that were replaced by :data:`NONFINITE_FILL`.
        stats: the intensity statistics.
        problems: reasons the volume does not look like its modality (empty when it does).
        forced: ``problems`` were overridden (``--force``).
    """

    name: str
    modality: str
    nonfinite: int = 0
    stats: IntensityStats | None = None
    problems: list[str] = field(default_factory=list)
    forced: bool = False

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {"name": self.name, "modality": self.modality, "nonfinite": self.nonfinite,
                "stats": self.stats.to_dict() if self.stats else None, "problems": list(self.problems),
                "forced": self.forced}


def check_spacing(image: sitk.Image, name: str = "the volume") -> None:
    """Refuse a voxel spacing outside :data:`SPACING_RANGE_MM` along any axis.

    Args:
        image: a 3D image; ``GetSpacing()`` in mm, (x, y, z).
        name: how the volume is named in the message.

    Raises:
        InputCheckError: a spacing < 0.1 mm or > 20 mm (or not finite), with the reason.
    """
    spacing = tuple(float(s) for s in image.GetSpacing()[:3])
    lo, hi = SPACING_RANGE_MM
    bad = [(axis, s) for axis, s in zip("xyz", spacing) if not (math.isfinite(s) and lo <= s <= hi)]
    if not bad:
        return
    axis, value = bad[0]
    if not math.isfinite(value) or value < lo:
        why = (f"below {lo} mm: resampled to the networks' 1 mm grid the volume would span only "
               f"{max(1, round(image.GetSize()[('xyz').index(axis)] * value))} voxel(s) along {axis}, and the output "
               "would be meaningless")
    else:
        why = (f"above {hi} mm: resampled to the networks' 1 mm grid every voxel would become {value:.0f} voxels "
               f"along {axis}")
    raise InputCheckError(
        f"{name} has a voxel spacing of {spacing[0]:g} x {spacing[1]:g} x {spacing[2]:g} mm (x, y, z); {value:g} mm is "
        f"{why}. Accepted: {lo} to {hi} mm per axis. Check the spacing in the file's header (a scale or unit error, "
        "e.g. metres or micrometres instead of mm, or a missing slice spacing).")


def replace_nonfinite(image: sitk.Image, modality: str, name: str = "the volume") -> tuple[sitk.Image, int]:
    """Replace NaN and infinite voxels by :data:`NONFINITE_FILL` and say how many there were.

    Args:
        image: a 3D scalar image (integer images are returned unchanged).
        modality: ``"ct"`` (fill -1024 HU) or ``"mr"`` (fill 0).
        name: how the volume is named in the warning.

    Returns:
        ``(image, count)``: a new image with the same geometry when ``count > 0``, else ``image`` itself.

    Warns:
        RuntimeWarning: when voxels were replaced, with their count and the fill value.
    """
    array = sitk.GetArrayViewFromImage(image)
    if not np.issubdtype(array.dtype, np.floating):
        return image, 0
    finite = np.isfinite(array)
    count = int(finite.size - np.count_nonzero(finite))
    if count == 0:
        return image, 0
    fill = NONFINITE_FILL[modality]
    nan = int(np.count_nonzero(np.isnan(array)))
    fixed = np.where(finite, array, np.asarray(fill, dtype=array.dtype))
    out = sitk.GetImageFromArray(fixed)
    out.CopyInformation(image)
    unit = " HU (air)" if modality == "ct" else " (no signal)"
    warnings.warn(f"{name}: {count} voxel(s) are not finite ({nan} NaN, {count - nan} infinite) of "
                  f"{finite.size}; replaced by {fill:g}{unit}.", RuntimeWarning, stacklevel=2)
    return out, count


def intensity_stats(array: np.ndarray) -> IntensityStats:
    """Intensity statistics used to tell a CT in HU from other volumes (see the module docstring).

    Args:
        array: (z, y, x) intensities (HU for a CT), any dtype; non-finite values are ignored.

    Returns:
        The :class:`IntensityStats` of at most :data:`STATS_MAX_VOXELS` voxels (a regular stride), field-of-view
        padding (the minimum value when below -1100 HU) excluded.
    """
    flat = np.asarray(array).reshape(-1)
    stride = max(1, math.ceil(flat.size / STATS_MAX_VOXELS))
    sample = flat[::stride].astype(np.float64)
    sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        sample = np.zeros(1)
    padding_value = None
    padding_fraction = 0.0
    low = float(sample.min())
    if low < _PADDING_BELOW_HU:
        at_low = sample == low
        padding_fraction = float(np.mean(at_low))
        if padding_fraction < 1.0:
            padding_value = low
            sample = sample[~at_low]
        else:
            padding_fraction = 0.0
    p1, median, p99 = (float(v) for v in np.percentile(sample, [1, 50, 99]))

    def share(lo: float, hi: float) -> float:
        return float(np.mean((sample >= lo) & (sample <= hi)))

    return IntensityStats(voxels=int(flat.size), sampled=int(sample.size), padding_value=padding_value,
                          padding_fraction=padding_fraction, minimum=float(sample.min()), maximum=float(sample.max()),
                          p1=p1, median=median, p99=p99, air_fraction=share(*AIR_LUNG_HU),
                          low_fraction=share(*LOW_HU), soft_fraction=share(*SOFT_TISSUE_HU),
                          ct_range_fraction=share(*CT_RANGE_HU))


def ct_problems(stats: IntensityStats) -> list[str]:
    """Why a volume with these statistics is not a plausible CT in HU (empty list: plausible).

    Args:
        stats: from :func:`intensity_stats`.

    Returns:
        One sentence per failed rule (constant volume; too few air/lung/fat voxels; too few soft-tissue voxels; too
        many voxels outside the CT range), with the measured share and the expected one.
    """
    if stats.constant:
        return [f"it is a constant volume (every voxel is {stats.minimum:g})"]
    problems = []
    if stats.low_fraction < MIN_LOW_FRACTION:
        problems.append(f"only {_pct(stats.low_fraction)} of its voxels are at air, lung or fat values "
                        f"({LOW_HU[0]:g} to {LOW_HU[1]:g} HU; chest and body CTs have 50-75%, at least "
                        f"{100 * MIN_LOW_FRACTION:g}% is needed)")
    if stats.soft_fraction < MIN_SOFT_FRACTION:
        problems.append(f"only {_pct(stats.soft_fraction)} are at soft-tissue values ({SOFT_TISSUE_HU[0]:g} to "
                        f"{SOFT_TISSUE_HU[1]:g} HU; at least {100 * MIN_SOFT_FRACTION:g}% is needed)")
    if stats.ct_range_fraction < MIN_CT_RANGE_FRACTION:
        problems.append(f"{_pct(1 - stats.ct_range_fraction)} are outside the CT range ({CT_RANGE_HU[0]:g} to "
                        f"{CT_RANGE_HU[1]:g} HU; at most {100 * (1 - MIN_CT_RANGE_FRACTION):g}% may be)")
    return problems


def _summary(stats: IntensityStats) -> str:
    return (f"values {stats.minimum:g} to {stats.maximum:g}, median {stats.median:g}, 1st-99th percentile "
            f"{stats.p1:g} to {stats.p99:g}")


def input_checks(force: bool = False) -> contextlib.AbstractContextManager[None]:
    """Inside the block, the training data loader checks the plausibility of every raw volume it reads.

    ``ct2mr train`` runs :func:`ct2mr.training.trainer.train_run` inside it: :func:`ct2mr.preprocessing.collections.load_domain` then refuses a
    ``--ct`` volume that is not a plausible CT and an ``--mr`` volume that is a CT in HU (:func:`check_input_image`),
    or only warns with ``force=True`` (``--force``). Outside it, the loader applies the spacing rule and replaces
    non-finite voxels only, as other readers of training data (``ct2mr evaluate``, harmonisation references) want.

    Args:
        force: let implausible volumes through with a warning. Spacings outside :data:`SPACING_RANGE_MM` stay
            refused.
    """

    @contextlib.contextmanager
    def block() -> Iterator[None]:
        token = _INPUT_CHECKS.set("force" if force else "strict")
        try:
            yield
        finally:
            _INPUT_CHECKS.reset(token)

    return block()


def input_checks_mode() -> str | None:
    """``"strict"`` or ``"force"`` inside :func:`input_checks`, else ``None``."""
    return _INPUT_CHECKS.get()


def check_input_image(image: sitk.Image, modality: str, name: str = "the volume", force: bool | None = None,
                      constant_mr: str = "refuse", plausibility: bool = True) -> tuple[sitk.Image, InputReport]:
    """Check one input volume before any computing (see the module docstring for the rules).

    Args:
        image: a 3D scalar image: a CT in HU or an MR in arbitrary units; spacing in mm.
        modality: ``"ct"`` or ``"mr"``: what the volume is given as.
        name: how the volume is named in messages (its path).
        force: let an implausible volume through with a warning (``--force``); ``None``: as the surrounding
            :func:`input_checks` block says (``False`` outside one).
        constant_mr: ``"refuse"`` a constant MR, or ``"allow"`` it (the training loader skips flat MRs itself).
        plausibility: apply rules 3 and 4 (constant volume, CT or not); ``False``: spacing and non-finite voxels
            only.

    Returns:
        ``(image, report)``: the image with non-finite voxels replaced (:func:`replace_nonfinite`; the same object when
        there were none) and the :class:`InputReport`.

    Raises:
        InputCheckError: spacing outside :data:`SPACING_RANGE_MM`; or, unless forced, a CT that fails
            :func:`ct_problems`, or an MR that passes it (a CT given as MR) or is constant.
        ValueError: ``modality`` is not ``"ct"`` or ``"mr"``.
    """
    if modality not in ("ct", "mr"):
        raise ValueError(f"modality must be 'ct' or 'mr', got {modality!r}.")
    force = input_checks_mode() == "force" if force is None else force
    check_spacing(image, name)
    image, nonfinite = replace_nonfinite(image, modality, name)
    stats = intensity_stats(sitk.GetArrayViewFromImage(image))
    report = InputReport(name, modality, nonfinite, stats)
    if not plausibility:
        return image, report
    problems = ct_problems(stats)
    extent = [n * s for n, s in zip(image.GetSize(), image.GetSpacing())]
    if max(extent) < MIN_CHECK_EXTENT_MM and not stats.constant:  # too small to judge by its statistics
        problems = []
        logger.info("%s spans only %s mm: the HU plausibility check is skipped", name, [round(e) for e in extent])
    if modality == "ct":
        if problems:
            report.problems = problems
            message = (f"{name} does not look like a CT in Hounsfield units: {'; '.join(problems)} "
                       f"({_summary(stats)}). "
                       "Is it an MR or another kind of image? A CT stored without its rescale slope/intercept (air at "
                       "0 instead of -1000 HU) fails too: convert it to HU first.")
            if not force:
                raise InputCheckError(message + " If it really is a CT in HU, pass --force to use it anyway.")
            report.forced = True
            warnings.warn(message + " Going on because of --force.", RuntimeWarning, stacklevel=2)
    else:
        if stats.constant and constant_mr == "refuse":
            report.problems = [f"it is a constant volume (every voxel is {stats.minimum:g})"]
        elif not problems and not stats.constant and stats.air_fraction >= CT_AS_MR_AIR_FRACTION \
                and max(extent) >= MIN_CHECK_EXTENT_MM:
            report.problems = [f"{_pct(stats.air_fraction)} of its voxels are at air/lung values in HU "
                               f"({AIR_LUNG_HU[0]:g} to {AIR_LUNG_HU[1]:g}) and {_pct(stats.soft_fraction)} at "
                               "soft-tissue values: it looks like a CT, and MR intensities are not negative"]
        if report.problems:
            message = f"{name}, given as an MR, is refused: {'; '.join(report.problems)} ({_summary(stats)})."
            if not force:
                raise InputCheckError(message + " Give CTs with --ct and MRs with --mr; pass --force to use it "
                                      "anyway.")
            report.forced = True
            warnings.warn(message + " Going on because of --force.", RuntimeWarning, stacklevel=2)
    return image, report


# ---- settings shared by the command line and checkpoints ----------------------------------------------------
def validate_overlap(value: Any, where: str = "overlap") -> float:
    """The sliding-window overlap as a float in [0, 1) (the rule of ``--overlap``).

    Raises:
        ValueError: not a number in [0, 1).
    """
    try:
        overlap = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where} must be a number in [0, 1), got {value!r}.") from None
    if not 0 <= overlap < 1:
        raise ValueError(f"{where} must be in [0, 1), got {value}.")
    return overlap


def validate_roi_size(value: Any, where: str = "roi_size") -> tuple[int, int, int]:
    """The sliding-window size (D, H, W) in voxels (the rule of ``--roi-size``): 1 or 3 positive multiples of 4.

    Raises:
        ValueError: anything else (e.g. ``[0, 0, 0]``, ``[30]``, two values).
    """
    try:
        roi = [int(v) for v in (value if isinstance(value, Sequence) and not isinstance(value, str) else [value])]
        if any(float(v) != int(float(v)) for v in (value if isinstance(value, Sequence) and not isinstance(value, str)
                                                    else [value])):
            raise ValueError
    except (TypeError, ValueError):
        raise ValueError(f"{where} must be 1 or 3 positive multiples of 4 voxels, got {value!r}.") from None
    roi = roi * 3 if len(roi) == 1 else roi
    if len(roi) != 3 or any(v < 4 or v % 4 for v in roi):
        raise ValueError(f"{where} must be 1 or 3 positive multiples of 4 voxels, got {value}.")
    return roi[0], roi[1], roi[2]


# ---- outputs --------------------------------------------------------------------------------------------------
def prepare_output_dir(path: str | os.PathLike, what: str = "output folder") -> bool:
    """Create the output folder and prove it writable before any computing.

    The folder (and its parents) is created; a hidden probe file is created, written, fsynced and removed in it;
    temporary files of a killed earlier run are removed (:func:`ct2mr.io.images.remove_stale_temps`).

    Args:
        path: the output folder.
        what: how the folder is named in messages (e.g. ``"output folder (-o)"``).

    Returns:
        Whether this call created the folder (a caller that fails later may remove it again when empty).

    Raises:
        OutputCheckError: ``path`` is a file, cannot be created (e.g. under ``/proc``), or is not writable
            (read-only file system, permissions, full disk), with the reason.
    """
    from ct2mr.io.images import atomic_path, remove_stale_temps

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputCheckError(errno.ENOTDIR, f"The {what} {path} is a file, not a folder. Give a folder (it is "
                                              "created when missing), e.g. -o results/.")
    created = not path.exists()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputCheckError(exc.errno or errno.EIO, f"Cannot create the {what} {path}: "
                               f"{exc.strerror or exc}. Choose a folder you can write to.") from exc
    probe = None
    try:
        probe = atomic_path(path / ".ct2mr-write-probe")
        with open(probe, "wb") as f:
            f.write(b"ct2mr write probe\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        raise OutputCheckError(exc.errno or errno.EIO, f"Cannot write into the {what} {path}: "
                               f"{exc.strerror or exc}. Choose a folder you can write to (not a read-only or "
                               "full file system).") from exc
    finally:
        if probe is not None:
            with contextlib.suppress(OSError):
                probe.unlink()
    remove_stale_temps(path)
    return created


def existing_outputs(out_dir: str | os.PathLike, names: Sequence[str]) -> list[Path]:
    """The files among ``names`` that already exist in ``out_dir``."""
    out_dir = Path(out_dir)
    return [out_dir / n for n in names if (out_dir / n).exists()]


def check_free_space(folder: str | os.PathLike, needed_bytes: int, what: str = "the outputs") -> int:
    """Refuse to start when ``folder``'s file system has less free space than ``needed_bytes``.

    Args:
        folder: an existing folder.
        needed_bytes: the expected size of what will be written there, bytes.
        what: what will be written, for the message.

    Returns:
        The free bytes.

    Raises:
        ResourceCheckError: not enough free space, with both numbers.
    """
    free = shutil.disk_usage(folder).free
    if free < needed_bytes:
        raise ResourceCheckError(
            f"Not enough free disk space in {folder}: {what} need about {human_bytes(needed_bytes)}, "
            f"{human_bytes(free)} free. Free some space or choose another output folder (-o).")
    return free


def expected_output_bytes(image: sitk.Image, outputs: int = 3) -> int:
    """Expected size of ``outputs`` float32 volumes on ``image``'s grid, bytes (uncompressed + 64 KiB headers).

    gzip barely shrinks float32 network outputs (86 % of the raw size on the shared heart CT), so the uncompressed
    size is the estimate.
    """
    voxels = int(np.prod(image.GetSize()))
    return outputs * voxels * 4 + 65536


# ---- memory ---------------------------------------------------------------------------------------------------
def available_memory_bytes() -> int | None:
    """Memory this process can still use, bytes: ``MemAvailable`` of ``/proc/meminfo``, capped by a cgroup v2
    limit (``memory.max - memory.current``) when the process runs in one; ``None`` when unknown (not Linux)."""
    available = None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError):
        return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        current = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
        if limit != "max":
            cap = int(limit) - current
            available = cap if available is None else min(available, cap)
    except (OSError, ValueError):
        pass
    return available


def device_memory_bytes(device: Any) -> int | None:
    """Free memory of a torch device, bytes: ``torch.cuda.mem_get_info`` on CUDA, :func:`available_memory_bytes`
    on the CPU; ``None`` when unknown."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except Exception:  # noqa: BLE001 - no driver or device
            return None
    return available_memory_bytes()


def network_grid_zyx(image: sitk.Image, target_spacing: float = 1.0, k: int = 16, orientation: str = "RAS"
                     ) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """The network grid a volume becomes in preprocessing (thesis section 4), without resampling it.

    The axis permutation of the reorientation (:func:`ct2mr.preprocessing.pipeline.reorient_to_ras`, ITK's DICOMOrient) is
    found on a 2x3x4-voxel image with the same direction cosines; resampling gives ``round(n * s / target_spacing)``
    voxels per axis (:func:`ct2mr.preprocessing.pipeline.resample_isotropic`); padding rounds each up to a multiple of ``k``.

    Args:
        image: a 3D image (size (x, y, z) voxels, spacing mm, direction cosines).
        target_spacing: the network grid's spacing, mm.
        k: the padding multiple.
        orientation: the preprocessing's orientation code.

    Returns:
        ``(resampled_zyx, padded_zyx)`` in voxels, (z, y, x) order of the reoriented grid.
    """
    probe = sitk.Image([2, 3, 4], sitk.sitkUInt8)
    probe.SetDirection(image.GetDirection())
    order = [int(n) - 2 for n in sitk.DICOMOrient(probe, orientation).GetSize()]  # new axis j <- old axis order[j]
    sizes = [max(1, int(round(image.GetSize()[i] * image.GetSpacing()[i] / target_spacing))) for i in order]
    resampled = (sizes[2], sizes[1], sizes[0])
    padded = tuple(int(math.ceil(n / k) * k) for n in resampled)
    return resampled, padded  # type: ignore[return-value]


#: Fixed memory of a translation process (Python, torch, MONAI, SimpleITK, the model), bytes.
TRANSLATION_BASE_BYTES = 512 * 2**20


def estimate_translation_bytes(image: sitk.Image, padded_zyx: Sequence[int], base_channels: int = 64,
                               roi: Sequence[int] = (96, 96, 96), sw_batch_size: int = 1) -> int:
    """Estimated peak memory of one ``ct2mr translate`` run on the CPU, bytes.

    ``max(network stage, postprocessing) + 512 MiB`` where the network stage holds the input image, the network-grid
    volume, MONAI's output and weight buffers for both passes and G(x) (18 bytes per network-grid voxel) and the
    activations of the windows (``6 x base_channels`` float32 maps per window voxel); postprocessing holds the input
    image, three float32 outputs and a float32 copy on the input grid and one network-grid volume. Measured against
    the peak RSS of ``benchmarks/translate_speed.py`` (issue 7): 1.35 GB estimated for ``chest_ct_lung2.nrrd``
    (1.26 GiB measured), 3.6 GiB for a 512x512x600 CT (3.67 GiB measured).

    Args:
        image: the input CT (its size and pixel type).
        padded_zyx: the padded network grid (:func:`network_grid_zyx`).
        base_channels: the generator's base width (its full-resolution feature maps).
        roi: sliding-window size (D, H, W).
        sw_batch_size: windows per pass.

    Returns:
        Bytes.
    """
    n_in = int(np.prod(image.GetSize()))
    b_in = int(image.GetSizeOfPixelComponent()) * int(image.GetNumberOfComponentsPerPixel())
    n_grid = int(np.prod(padded_zyx))
    windows = int(np.prod(roi)) * int(base_channels) * 4 * 6 * max(1, int(sw_batch_size))
    network = 18 * n_grid + n_in * b_in + windows
    postprocess = n_in * (b_in + 16) + 4 * n_grid
    return TRANSLATION_BASE_BYTES + max(network, postprocess)


def check_translation_resources(image: sitk.Image, target_spacing: float = 1.0, k: int = 16,
                                out_dir: str | os.PathLike | None = None, outputs: int = 3,
                                base_channels: int = 64, roi: Sequence[int] = (96, 96, 96),
                                sw_batch_size: int | None = None, name: str = "the CT",
                                orientation: str = "RAS") -> dict[str, Any]:
    """Check the network grid, the memory and the disk space of one translation before it starts.

    Args:
        image: the input CT.
        target_spacing, k: the checkpoint's preprocessing (network grid spacing in mm, padding multiple).
        out_dir: the output folder (its free space is checked); ``None``: no disk check.
        outputs: float32 volumes that will be written on the input grid.
        base_channels: the generator's base width.
        roi: sliding-window size (D, H, W).
        sw_batch_size: windows per pass (``None``: 1).
        name: how the input is named in messages.
        orientation: the preprocessing's orientation code.

    Returns:
        ``{"network_grid_zyx", "padded_grid_zyx", "memory_bytes", "available_memory_bytes", "output_bytes"}``.

    Raises:
        InputCheckError: the 1 mm grid is thinner than :data:`MIN_GRID_VOXELS` along an axis.
        ResourceCheckError: the estimated memory exceeds what is available, or the disk cannot hold the outputs.
    """
    grid, padded = network_grid_zyx(image, target_spacing, k, orientation)
    if min(grid) < MIN_GRID_VOXELS:
        raise InputCheckError(
            f"{name} spans only {list(grid)} voxels (z, y, x) on the networks' {target_spacing:g} mm grid; at least "
            f"{MIN_GRID_VOXELS} are needed along every axis ({MIN_GRID_VOXELS * target_spacing:g} mm of anatomy). "
            "Is it a single slice or a thin slab?")
    needed = estimate_translation_bytes(image, padded, base_channels, roi, sw_batch_size or 1)
    available = available_memory_bytes()
    if available is not None and needed > available:
        raise ResourceCheckError(
            f"Translating {name} needs about {human_bytes(needed)} of memory (input {list(image.GetSize())} voxels "
            f"(x, y, z), network grid {list(padded)} (z, y, x) at {target_spacing:g} mm); {human_bytes(available)} "
            "are available. Close other programs, use a machine with more memory, or crop the CT to the region of "
            "interest.")
    output_bytes = expected_output_bytes(image, outputs)
    if out_dir is not None:
        check_free_space(out_dir, output_bytes, f"the {outputs} outputs ({outputs} float32 volumes of "
                                                f"{'x'.join(str(s) for s in image.GetSize())} voxels)")
    return {"network_grid_zyx": list(grid), "padded_grid_zyx": list(padded), "memory_bytes": needed,
            "available_memory_bytes": available, "output_bytes": output_bytes}


# ---- training -------------------------------------------------------------------------------------------------
@dataclass
class TrainingMemory:
    """Estimated memory of one training step (:func:`estimate_training_memory`).

    Attributes:
        patch_size: the patch (D, H, W) voxels the estimate is for.
        fixed_bytes: weights, gradients and the two Adam moments of every network (4 float32 copies of each
            parameter) plus the process's base (:data:`TRAINING_BASE_BYTES`).
        activation_bytes: the tensors autograd holds for the backward pass of one step (every generator and
            discriminator pass, times the batch size).
        total_bytes: ``fixed_bytes + activation_bytes``.
        detail: the numbers behind it (parameters, passes, saved bytes per patch voxel of G and D, batch, factor).
    """

    patch_size: tuple[int, int, int]
    fixed_bytes: int
    activation_bytes: int
    total_bytes: int
    detail: dict[str, Any] = field(default_factory=dict)


#: Base memory of a training process besides the networks (Python, torch, the data loader's buffers), bytes.
TRAINING_BASE_BYTES = 512 * 2**20
#: The suggested largest patch leaves this share of the free memory to the step (the rest: the training volumes).
TRAINING_SUGGESTION_FRACTION = 0.8


def _saved_bytes(net: Any, x: Any) -> int:
    """Bytes of the tensors autograd keeps for the backward pass of ``net(x)``, plus the output's.

    Works on the ``meta`` device (shapes only, nothing allocated), where every saved tensor counts once per tensor
    object; on a real device the same sum is taken over distinct storages.
    """
    import torch

    seen: dict[Any, int] = {}
    keep: list[Any] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.device.type == "meta":
            keep.append(t)
            seen[id(t)] = t.numel() * t.element_size()
        else:
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = net(x)
    return sum(seen.values()) + out.numel() * out.element_size()


class _TrainingProbe:
    """The configured G and D built on the ``meta`` device (no memory), to measure a step's activations."""

    def __init__(self, config: Any, device: Any) -> None:
        import torch

        from ct2mr.inference.translate import resolve_precision
        from ct2mr.networks import build_discriminator, build_generator

        m, t = config.model, config.train
        self.config = config
        self.multiple = int(getattr(m.generator, "multiple", 1) or 1)
        try:
            with torch.device("meta"):
                self.G, self.D = build_generator(m.generator.to_spec()), build_discriminator(m.discriminator.to_spec())
            self.probe_device = "meta"
        except Exception:  # noqa: BLE001 - a network that cannot be built without memory: probe on the CPU
            self.G, self.D = build_generator(m.generator.to_spec()), build_discriminator(m.discriminator.to_spec())
            self.probe_device = "cpu"
        self.G.train(), self.D.train()
        self.params_g = sum(p.numel() for p in self.G.parameters())
        self.params_d = sum(p.numel() for p in self.D.parameters())
        self.paired = bool(getattr(m.paired, "enabled", False))
        self.n_g = 4 + (2 if m.lambda_id > 0 else 0) + (4 if self.paired else 0)
        adversarial = str(m.adversarial).lower()
        self.n_d = 4 if ("gp" in adversarial or "wgan" in adversarial) else 2
        device = torch.device(device)
        self.factor = 0.6 if device.type == "cuda" and resolve_precision(t.precision, device) != torch.float32 else 1.0
        self.checkpointing = bool(getattr(t, "grad_checkpointing", False))
        self.batch = int(config.data.batch_size)
        networks = 2 * self.params_g + (4 if self.paired else 2) * self.params_d
        self.fixed = int(networks * 4 * 4 + TRAINING_BASE_BYTES)

    def estimate(self, patch: Sequence[int]) -> TrainingMemory:
        """The :class:`TrainingMemory` of one step at ``patch`` (D, H, W) voxels.

        Raises:
            RuntimeError, ValueError: the networks cannot run on a patch of this size.
        """
        import torch

        patch = tuple(int(p) for p in patch)
        voxels = float(np.prod(patch))
        x = torch.zeros((1, 1, *patch), device=self.probe_device)
        a_g = _saved_bytes(self.G, x) / voxels
        a_d = _saved_bytes(self.D, x) / voxels
        if self.checkpointing:
            a_g *= 0.5
        activations = int(self.batch * voxels * (self.n_g * a_g + self.n_d * a_d) * self.factor)
        detail = {"params_G": self.params_g, "params_D": self.params_d, "generator_passes": self.n_g,
                  "discriminator_passes": self.n_d, "G_bytes_per_voxel": round(a_g, 1),
                  "D_bytes_per_voxel": round(a_d, 1), "batch_size": self.batch, "precision_factor": self.factor,
                  "probe_device": self.probe_device}
        return TrainingMemory(patch, self.fixed, activations,  # type: ignore[arg-type]
                              self.fixed + activations, detail)

    def largest(self, available: int, patch: Sequence[int], minimum: int = 16) -> tuple[int, int, int] | None:
        """The largest patch of ``patch``'s proportions (sides multiples of the generator's) that fits."""
        m = self.multiple
        longest = max(patch)

        def scaled(side: int) -> tuple[int, int, int]:
            return tuple(max(m, int(p * side / longest) // m * m) for p in patch)  # type: ignore[return-value]

        def estimate(side: int) -> TrainingMemory | None:
            try:
                return self.estimate(scaled(side))
            except (RuntimeError, ValueError):  # too small for the networks (e.g. a norm over one voxel)
                return None

        lo = max(minimum, m) // m * m or m
        while lo < longest and estimate(lo) is None:
            lo += m
        first = estimate(lo)
        if first is None or first.total_bytes > available:
            return None
        hi = longest
        while hi - lo > m:
            mid = (lo + hi) // 2 // m * m
            if mid <= lo:
                break
            found = estimate(mid)
            lo, hi = (mid, hi) if found is not None and found.total_bytes <= available else (lo, mid)
        return scaled(lo)


def estimate_training_memory(config: Any, device: Any = "cpu", patch_size: Sequence[int] | None = None
                             ) -> TrainingMemory:
    """Estimate one ``ct2mr train`` step's memory by tracing the configured networks at the patch size.

    The generator and discriminator of ``config`` are built on PyTorch's ``meta`` device (shapes only: nothing is
    allocated, a 256^3 probe takes milliseconds) and run once with gradients on a patch of ``patch_size``; the
    tensors autograd saves for the backward pass are summed (``torch.autograd.graph.saved_tensors_hooks``). A step
    holds::

        fixed + batch x (n_G x S_G + n_D x S_D) x precision factor

    with ``S_G``, ``S_D`` the saved bytes of one generator and one discriminator pass, ``n_G`` = 4 generator passes
    (G(x), F(y), F(G(x)), G(F(y))), + 2 with the identity loss, + 4 in paired mode; ``n_D`` = 2 discriminator passes
    back-propagated into the generators (4 with a gradient penalty); gradient checkpointing halves ``S_G``; bf16/fp16
    autocast (CUDA) counts 60 %. ``fixed`` is 4 float32 copies of every parameter (weights, gradients, two Adam
    moments) plus :data:`TRAINING_BASE_BYTES`. The training volumes held in RAM are not counted. Checked against the
    peak RSS of ``benchmarks/train_speed.py`` (benchmarks/RESULTS.md, M1 at full width 64 on the CPU): 3.7 GB
    estimated vs 2.8 GB measured at 32^3, 9.2 GB vs 8.4 GB at 64^3 (an over-estimate, by less at larger patches).

    Args:
        config: a :class:`ct2mr.training.config.RunConfig`.
        device: where training runs (``"cpu"``, ``"cuda"``, ``"cuda:N"`` or a torch device): its precision factor.
        patch_size: the patch (D, H, W) voxels to estimate for; ``None``: ``config.patch_size``.

    Returns:
        The :class:`TrainingMemory`.

    Raises:
        RuntimeError, ValueError: the networks cannot run on a patch of this size.
    """
    probe = _TrainingProbe(config, device)
    return probe.estimate(patch_size or config.patch_size)


def training_device(config: Any) -> Any:
    """The ``torch.device`` a run of ``config`` trains on: ``config.train.device`` (under ``torchrun`` ``auto`` and
    ``cuda`` are ``cuda:LOCAL_RANK``), ``auto`` CUDA when available, CUDA falling back to the CPU when missing.

    Raises:
        RuntimeError: ``config.train.device`` is not a device name torch knows.
    """
    import torch

    from ct2mr.inference.translate import cluster_device

    name = cluster_device(str(config.train.device))
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device(name)


def check_training_memory(config: Any, device: Any = None) -> TrainingMemory:
    """Refuse a training configuration whose step will not fit in the device's memory (before any data is read).

    Args:
        config: a :class:`ct2mr.training.config.RunConfig`.
        device: the training device; ``None``: ``config.train.device`` (``auto``: CUDA when available; under
            ``torchrun`` ``cuda:LOCAL_RANK``).

    Returns:
        The estimate (:func:`estimate_training_memory`).

    Raises:
        ResourceCheckError: the estimated step exceeds the free memory (:func:`device_memory_bytes`), with the
            largest patch of the same proportions whose step fits in 80 % of it (the training volumes need room
            too), or, when not even 16^3 does, what else to reduce.
    """
    import torch

    device = torch.device(device) if device is not None else training_device(config)
    probe = _TrainingProbe(config, device)
    try:
        estimate = probe.estimate(config.patch_size)
    except (RuntimeError, ValueError):  # the networks refuse this patch size; the trainer reports it
        return TrainingMemory(tuple(config.patch_size), probe.fixed, 0, probe.fixed)  # type: ignore[arg-type]
    available = device_memory_bytes(device)
    if available is None or estimate.total_bytes <= available:
        return estimate
    patch = " ".join(str(p) for p in estimate.patch_size)
    where = f"{device}" if device.type == "cuda" else "the CPU (RAM)"
    largest = probe.largest(int(available * TRAINING_SUGGESTION_FRACTION), estimate.patch_size)
    if largest is not None:
        fits = " ".join(str(p) for p in (largest[:1] if len(set(largest)) == 1 else largest))
        hint = (f"The largest patch that fits is --patch-size {fits} "
                f"({human_bytes(probe.estimate(largest).total_bytes)}); or reduce --width or --batch-size.")
    else:
        hint = ("Not even a 16^3 patch fits: reduce --width (base channels), --batch-size or --blocks, or train on a "
                "GPU.")
    d = estimate.detail
    raise ResourceCheckError(
        f"--patch-size {patch} needs about {human_bytes(estimate.total_bytes)} per training step on {where} "
        f"({human_bytes(estimate.fixed_bytes)} for the networks and optimiser, "
        f"{human_bytes(estimate.activation_bytes)} "
        f"for the activations of {d['generator_passes']} generator and {d['discriminator_passes']} discriminator "
        f"passes at batch {d['batch_size']}); {human_bytes(available)} are free. {hint}")


def check_training_inputs(config: Any) -> None:
    """Refuse training data whose CT and MR sets share a file (an MR given as ``--ct`` or the reverse).

    Compares the resolved paths of ``data.ct``, ``data.val_ct``, ``data.paired_ct`` with those of ``data.mr``,
    ``data.val_mr``, ``data.paired_mr`` (folders expanded with :func:`ct2mr.io.images.list_images`). The intensities of each
    volume are checked when it is loaded (:func:`check_input_image` through :func:`ct2mr.preprocessing.collections.load_domain`).

    Args:
        config: a :class:`ct2mr.training.config.RunConfig`.

    Raises:
        InputCheckError: a file is in both sets.
        FileNotFoundError, ct2mr.io.images.ImageReadError: a path is missing or a folder holds no volume.
    """
    from ct2mr.io.images import list_images

    d = config.data

    def expand(keys: Sequence[str]) -> dict[str, str]:
        found: dict[str, str] = {}
        for key in keys:
            for item in getattr(d, key, None) or []:
                for path in list_images(item):
                    found.setdefault(os.path.realpath(path), f"{path} (data.{key})")
        return found

    ct = expand(("ct", "val_ct", "paired_ct"))
    mr = expand(("mr", "val_mr", "paired_mr"))
    both = sorted(set(ct) & set(mr))
    if both:
        first = both[0]
        raise InputCheckError(
            f"{len(both)} file(s) are given both as CT and as MR, e.g. {ct[first]} and {mr[first]}. Unpaired training "
            "needs CTs in --ct and MRs in --mr; remove the file from one of them.")
