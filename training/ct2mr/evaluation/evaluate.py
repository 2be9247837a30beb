"""Evaluation without pairs (thesis section 5, E1-E2; section 7, Tables 6, 7, 9) and with pairs (Wolterink et al.).

``ct2mr evaluate`` (:func:`evaluate`) runs G and F over held-out CT volumes x and MR volumes y with the same
sliding-window path as ``ct2mr translate`` (:func:`ct2mr.inference.translate.translate_volume`) and measures, on the 1 mm RAS
network grid of each volume (intensities in the network's normalised [-1, 1]). The metric functions themselves
(pure functions of NumPy arrays) are in :mod:`ct2mr.evaluation.metrics`; this module loads, translates, samples
patches and writes the tables, figures and reports.

* **Distribution realism (E1)**, CT -> MR: {G(x_i)} against {y_j}; MR -> CT: {F(y_j)} against {x_i}:

  - FID (:func:`~ct2mr.evaluation.metrics.fid`): Frechet distance between Gaussian fits of patch features (Heusel et al. 2017), with
    ``scipy.linalg.sqrtm``;
  - KID (:func:`~ct2mr.evaluation.metrics.kid`): unbiased MMD^2 with the cubic polynomial kernel ``k(a, b) = (a.b / d + 1)^3``, averaged over
    random subsets (Binkowski et al. 2018), reported x 100 as the thesis's "KID (%)";
  - W1 (:func:`~ct2mr.evaluation.metrics.histogram_w1`): the thesis's eq. 7.2 on hard histograms, ``Delta * sum_k |H_a(k) - H_b(k)|`` with
    the CDFs ``H`` over :data:`~ct2mr.evaluation.metrics.HISTOGRAM_BINS` bins of [-1, 1] (``Delta = 2 / bins``): the 1-Wasserstein distance
    between intensity distributions inside the masks, in normalised intensity units.

  Patches (:func:`sample_patch_corners`): for each volume, ``patches_per_volume`` patch centres are drawn uniformly
  at random, without replacement, among the voxels of the evaluation mask whose ``patch_size``^3 patch lies inside
  the padded grid, with ``numpy.random.default_rng([seed, domain, index])`` (domain 0 for CT, 1 for MR). The same
  positions are used for a volume and its translation (x and G(x); y and F(y)). Features come from a
  :class:`ct2mr.evaluation.features.FeatureExtractor` (default: the fixed-seed random 3D network, see :mod:`ct2mr.evaluation.features`).

* **Self-consistency (E2)**: x against F(G(x)) and y against G(F(y)) inside the evaluation mask: SSIM-3D
  (:func:`~ct2mr.evaluation.metrics.ssim3d`; Gaussian window 11, sigma 1.5, K1 = 0.01, K2 = 0.03, data range 2), PSNR in dB on the [-1, 1]
  range (:func:`~ct2mr.evaluation.metrics.psnr`, data range 2, so for CT it equals PSNR in HU with the window width 1600 HU as peak) and MAE
  (:func:`~ct2mr.evaluation.metrics.mae`) in normalised units; for CT also in HU (MAE x (HU_max - HU_min) / 2).

* **Paired** (``--paired``: the i-th CT and the i-th MR are registered scans of one patient): the synthetic volume
  against the real target, on the CT's grid (the MR resampled there by its physical coordinates, trilinear), inside
  the CT's mask and the MR's footprint: MAE (in HU for MR -> CT, as Wolterink et al. 2017 report), PSNR, SSIM; per
  volume, with mean +- std, and paired t-tests between models in ``ct2mr compare`` (:func:`~ct2mr.evaluation.metrics.paired_ttest`).

* **Harmonisation** (thesis 7.6): the post-hoc methods of :mod:`ct2mr.inference.harmonization` applied to G(x), and the
  baseline "copy CT" (G = identity) with and without them, scored for realism like the model.

The evaluation mask (:mod:`ct2mr.preprocessing.masks`) is the body mask by default (``mask="none"``: every voxel but the padding).
Outputs (:func:`evaluate`): ``table.csv``/``table.md`` (thesis Table 6/7/9 columns, aggregated: FID, KID (%),
SSIM_cyc, PSNR_cyc (dB), MAE, MAE (HU), W1 with mean +- std over volumes), ``per_volume.csv``/``.md``,
``paired.csv``/``.md``, ``metrics.json`` (everything, with the extractor's identity and the sampling rule),
``figures/*.png`` and TensorBoard event files in ``tensorboard/``.

Arrays are NumPy (z, y, x); torch tensors (B, C, D, H, W).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import numpy as np
import torch

from ct2mr.evaluation.metrics import (HISTOGRAM_BINS, HISTOGRAM_RANGE, fid, histogram_w1, intensity_histogram, kid,
                                      mae, paired_ttest, psnr, ssim3d)
from ct2mr.provenance import software_versions

if TYPE_CHECKING:
    from ct2mr.inference.translate import InferenceSettings

__all__ = [
    "TABLE_COLUMNS",
    "PER_VOLUME_COLUMNS",
    "PAIRED_COLUMNS",
    "ANATOMY_COLUMNS",
    "sample_patch_corners",
    "extract_patches",
    "EvaluationConfig",
    "EvaluationResult",
    "evaluate",
    "load_evaluation",
    "compare",
    "markdown_table",
]

logger = logging.getLogger(__name__)


#: Aggregated table (thesis Tables 6, 7, 9, plus MAE in HU and the histogram distance): Markdown header.
TABLE_COLUMNS = ["Model", "Direction", "FID↓", "KID↓ (%)", "SSIM_cyc↑", "PSNR_cyc↑ (dB)", "MAE↓", "MAE (HU)↓", "W1↓",
                 "Volumes"]
#: Per-volume rows (CSV keys).
PER_VOLUME_COLUMNS = ["model", "variant", "direction", "volume", "ssim_cyc", "psnr_cyc_db", "mae", "mae_hu", "w1",
                      "patches", "edge_correlation", "gradient_magnitude_similarity", "gmsd", "nmi",
                      "displacement_mean_mm", "displacement_p95_mm"]
#: Anatomy metrics of the CT→MR model rows (:mod:`ct2mr.evaluation.anatomy`; the displacements only with ``warp_check``).
ANATOMY_COLUMNS = ["edge_correlation", "gradient_magnitude_similarity", "gmsd", "nmi", "displacement_mean_mm",
                   "displacement_p95_mm"]
#: Paired rows (CSV keys).
PAIRED_COLUMNS = ["model", "direction", "volume", "mae", "mae_hu", "psnr_db", "ssim", "voxels"]

SAMPLING_RULE = ("For each volume, N = patches_per_volume patch centres are drawn uniformly at random without "
                 "replacement among the voxels of the evaluation mask whose patch_size^3 patch lies inside the padded "
                 "1 mm RAS network grid (with replacement only when fewer candidates exist), using "
                 "numpy.random.default_rng([seed, domain, index]) with domain 0 for CT and 1 for MR and index the "
                 "volume's position in sorted path order. A volume and its translation share the positions (x and "
                 "G(x); y and F(y)). Patches are in the network's normalised intensity [-1, 1].")


# --- Patches ------------------------------------------------------------------------------------------------------

def sample_patch_corners(mask: np.ndarray, n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Draw patch positions uniformly inside a mask (see the module docstring for the exact rule).

    Args:
        mask: boolean (z, y, x) mask of allowed patch centres; every axis must be >= ``size``.
        n: number of patches.
        size: patch side in voxels.
        rng: the generator.

    Returns:
        int (n, 3) array of the patches' first corners (z, y, x).

    Raises:
        ValueError: the volume is smaller than a patch.
    """
    mask = np.asarray(mask, bool)
    if any(s < size for s in mask.shape):
        raise ValueError(f"Volume {mask.shape} is smaller than a {size}^3 patch.")
    half = size // 2
    interior = np.zeros_like(mask)
    interior[tuple(slice(half, s - size + half + 1) for s in mask.shape)] = True
    candidates = np.argwhere(mask & interior)
    if len(candidates) == 0:
        logger.warning("No mask voxel admits a whole %d^3 patch; sampling anywhere in the volume", size)
        candidates = np.argwhere(interior)
    chosen = rng.choice(len(candidates), size=n, replace=len(candidates) < n)
    return candidates[np.sort(chosen)] - half


def extract_patches(volume: np.ndarray, corners: np.ndarray, size: int) -> torch.Tensor:
    """Cut cubic patches out of a volume.

    Args:
        volume: (z, y, x) array.
        corners: (n, 3) first corners (z, y, x), from :func:`sample_patch_corners`.
        size: patch side in voxels.

    Returns:
        float32 tensor (n, 1, size, size, size).
    """
    patches = np.stack([volume[z:z + size, y:y + size, x:x + size] for z, y, x in np.asarray(corners)]) \
        if len(corners) else np.zeros((0, size, size, size), np.float32)
    return torch.from_numpy(np.ascontiguousarray(patches, dtype=np.float32))[:, None]


def _pad_to_patch(volume: np.ndarray, size: int, value: float) -> np.ndarray:
    """Pad a (z, y, x) volume at the far end of each axis shorter than ``size`` with ``value``."""
    pads = [(0, max(0, size - s)) for s in volume.shape]
    return np.pad(volume, pads, constant_values=value) if any(p[1] for p in pads) else volume


# --- Configuration and results -----------------------------------------------------------------------------------

@dataclass
class EvaluationConfig:
    """Settings of ``ct2mr evaluate``.

    Attributes:
        patch_size: side of the cubic patches for FID/KID, voxels of the 1 mm grid (>= 8).
        patches_per_volume: patches drawn per volume (>= 1).
        seed: seed of patch sampling, KID subsets and the random feature extractor.
        features: feature extractor, one of :data:`ct2mr.evaluation.features.FEATURE_EXTRACTORS`.
        feature_weights: ``"medicalnet"``: local file or URL of the weights.
        feature_sha256: their SHA-256 (required for a URL).
        kid_subsets: KID subsets.
        kid_subset_size: samples per KID subset (capped by the set sizes).
        mask: ``"body"`` or ``"none"`` (:data:`ct2mr.preprocessing.masks.MASK_MODES`).
        harmonize: post-hoc harmonisation methods evaluated on G(x) (subset of ``histogram``, ``nyul``, ``zscore``).
        reference_mr: reference MR paths for harmonisation; empty: the evaluation MR set itself (optimistic).
        baselines: also score "copy CT" (G = identity) and copy CT + each harmonisation.
        paired: the i-th CT and i-th MR are registered scans of one patient.
        figures: write PNG figures.
        figure_volumes: CT volumes that get tri-planar and round-trip figures.
        tensorboard: also write scalars and figures as TensorBoard events (when ``tensorboard`` is installed).
        warp_check: also run the anatomy warp check (B-spline registration of G(x) onto x, :mod:`ct2mr.evaluation.anatomy`) per
            CT volume and report its mean and p95 displacement (mm); slower (seconds to a minute per volume).

    Raises:
        ValueError: on construction, a patch size < 8, patches_per_volume < 1, an unknown feature extractor, mask
            mode or harmonisation method, kid_subsets < 1 or kid_subset_size < 2.
    """

    patch_size: int = 32
    patches_per_volume: int = 64
    seed: int = 0
    features: str = "random"
    feature_weights: str | None = None
    feature_sha256: str | None = None
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    mask: str = "body"
    harmonize: tuple[str, ...] = ("histogram", "nyul", "zscore")
    reference_mr: tuple[str, ...] = ()
    baselines: bool = True
    paired: bool = False
    figures: bool = True
    figure_volumes: int = 1
    tensorboard: bool = True
    warp_check: bool = False

    def __post_init__(self) -> None:
        """Check the settings (see Raises) and normalise ``harmonize`` and ``reference_mr`` to tuples."""
        from ct2mr.evaluation.features import FEATURE_EXTRACTORS
        from ct2mr.inference.harmonization import HARMONIZATION_METHODS
        from ct2mr.preprocessing.masks import MASK_MODES

        if int(self.patch_size) < 8:
            raise ValueError(f"patch_size must be >= 8 voxels, got {self.patch_size}.")
        if int(self.patches_per_volume) < 1:
            raise ValueError(f"patches_per_volume must be >= 1, got {self.patches_per_volume}.")
        if self.features not in FEATURE_EXTRACTORS:
            raise ValueError(f"features must be one of {FEATURE_EXTRACTORS}, got {self.features!r}.")
        if self.mask not in MASK_MODES:
            raise ValueError(f"mask must be one of {MASK_MODES}, got {self.mask!r}.")
        methods = tuple(m for m in (self.harmonize or ()) if m != "none")
        bad = [m for m in methods if m not in HARMONIZATION_METHODS]
        if bad:
            raise ValueError(f"harmonize must be among {HARMONIZATION_METHODS}, got {bad}.")
        self.harmonize = tuple(dict.fromkeys(methods))
        self.reference_mr = tuple(str(p) for p in (self.reference_mr or ()))
        if int(self.kid_subsets) < 1 or int(self.kid_subset_size) < 2:
            raise ValueError("kid_subsets must be >= 1 and kid_subset_size >= 2.")


@dataclass
class EvaluationResult:
    """What :func:`evaluate` measured and wrote.

    Attributes:
        out_dir: the output folder.
        aggregate: one dict per (variant, direction) row of the aggregated table.
        per_volume: one dict per (variant, direction, volume), keys :data:`PER_VOLUME_COLUMNS`.
        paired: paired rows (``--paired``), keys :data:`PAIRED_COLUMNS`.
        metrics: the full ``metrics.json`` content.
        files: every file written.
        markdown: the aggregated table as Markdown.
    """

    out_dir: Path
    aggregate: list[dict[str, Any]]
    per_volume: list[dict[str, Any]]
    paired: list[dict[str, Any]]
    metrics: dict[str, Any]
    files: list[Path] = field(default_factory=list)
    markdown: str = ""


# --- Tables -------------------------------------------------------------------------------------------------------

def _fmt(value: Any, digits: int = 4) -> str:
    """A table cell: ``digits`` decimals, "—" for None/NaN, "inf" for infinities."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:.{digits}f}"
    return str(value)


def _pm(mean: Any, std: Any, digits: int = 4) -> str:
    """A "mean ± std" table cell (the mean alone without a std, "—" without a mean)."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "—"
    if std is None or (isinstance(std, float) and math.isnan(std)):
        return _fmt(mean, digits)
    return f"{_fmt(mean, digits)} ± {_fmt(std, digits)}"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table (cells converted with ``str``)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _aggregate_cells(row: dict[str, Any]) -> list[str]:
    """The cells of one aggregated row in :data:`TABLE_COLUMNS` order."""
    return [row["model"], row["direction"], _fmt(row["fid"], 2), _pm(row["kid_percent"], row["kid_percent_std"], 4),
            _pm(row["ssim_cyc"], row["ssim_cyc_std"]), _pm(row["psnr_cyc_db"], row["psnr_cyc_db_std"], 2),
            _pm(row["mae"], row["mae_std"]), _pm(row["mae_hu"], row["mae_hu_std"], 1), _pm(row["w1"], row["w1_std"]),
            str(row["volumes"])]


def _write_csv(path: Path, rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> Path:
    """Write ``rows`` (dicts) as CSV with ``columns`` (None as empty cells); return the path."""
    import io

    from ct2mr.io.images import write_text

    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
    return write_text(path, buffer.getvalue())


def _write_text(path: Path, text: str) -> Path:
    """Write a text file (:func:`ct2mr.io.images.write_text`); return the path."""
    from ct2mr.io.images import write_text

    return write_text(path, text)


AGGREGATE_KEYS = ["model", "variant", "direction", "fid", "kid_percent", "kid_percent_std", "ssim_cyc", "ssim_cyc_std",
                  "psnr_cyc_db", "psnr_cyc_db_std", "mae", "mae_std", "mae_hu", "mae_hu_std", "w1", "w1_std",
                  "w1_pooled", "volumes", "patches"] + [f"{k}{s}" for k in ANATOMY_COLUMNS for s in ("", "_std")]


def _mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample std (ddof 1) of the finite values; (None, None) without any, std None with one."""
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not vals:
        return None, None
    return float(np.mean(vals)), (float(np.std(vals, ddof=1)) if len(vals) > 1 else None)


# --- Evaluation ---------------------------------------------------------------------------------------------------

@dataclass
class _Domain:
    """Per-domain accumulators of one variant (the synthetic set of one direction, or a real set)."""

    features: list[np.ndarray] = field(default_factory=list)
    histograms: dict[str, np.ndarray] = field(default_factory=dict)

    def add(self, name: str, features: np.ndarray, values: np.ndarray) -> None:
        """Add one volume: its patch features (N, d) and the histogram of its masked intensities."""
        self.features.append(features)
        self.histograms[name] = intensity_histogram(values)

    def stacked(self) -> np.ndarray:
        """All patch features, (sum N, d); (0, 1) when none."""
        return np.concatenate(self.features) if self.features else np.zeros((0, 1))

    def pooled(self) -> np.ndarray:
        """The summed histogram of every volume, (HISTOGRAM_BINS,)."""
        return np.sum(list(self.histograms.values()), axis=0) if self.histograms else np.zeros(HISTOGRAM_BINS)


def _resample_between(array: np.ndarray, source_grid: dict, target_grid: dict) -> np.ndarray:
    """Resample a network-grid array onto another grid by physical coordinates (trilinear; NaN outside)."""
    import SimpleITK as sitk

    from ct2mr.preprocessing.pipeline import grid_image

    image = grid_image(np.asarray(array, np.float32), source_grid)
    out = sitk.Resample(image, [int(v) for v in target_grid["size"]], sitk.Transform(), sitk.sitkLinear,
                        tuple(float(v) for v in target_grid["origin"]), tuple(float(v) for v in target_grid["spacing"]),
                        tuple(float(v) for v in target_grid["direction"]), float("nan"), sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out)


def _crop_to(volume: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """The (z, y, x) bounding box of ``valid`` cut out of ``volume``."""
    idx = np.nonzero(valid)
    return volume[tuple(slice(int(i.min()), int(i.max()) + 1) for i in idx)]


def _slices(volume: np.ndarray, valid: np.ndarray, mask: np.ndarray) -> list[tuple[str, np.ndarray, float]]:
    """Tri-planar slices of a volume without its padding, crossing at the mask's centroid."""
    from ct2mr.evaluation.figures import triplanar_slices

    cropped, cropped_mask = _crop_to(volume, valid), _crop_to(mask, valid)
    centre = [int(round(c.mean())) for c in np.nonzero(cropped_mask)] if cropped_mask.any() else None
    return triplanar_slices(cropped, (1.0, 1.0, 1.0), centre)


def _tensorboard(out_dir: Path, enabled: bool):
    """A TensorBoard ``SummaryWriter`` into ``out_dir/tensorboard``, or None (disabled or not installed)."""
    if not enabled:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        logger.warning("tensorboard is not installed: no TensorBoard events are written (pip install tensorboard)")
        return None
    return SummaryWriter(log_dir=str(out_dir / "tensorboard"))


def _log_figure(writer, tag: str, path: Path) -> None:
    """Add a written PNG to TensorBoard (nothing without a writer)."""
    if writer is None:
        return
    import matplotlib.image as mpimg

    image = mpimg.imread(str(path))
    writer.add_image(tag, image[..., :3], 0, dataformats="HWC")


def _json_default(value: Any) -> Any:
    """JSON form of NumPy scalars and arrays, paths and anything else (as text)."""
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    return str(value)


def _clean(value: Any) -> Any:
    """Replace NaN/inf floats by None (JSON null) recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


@dataclass
class _Run:
    """One :func:`evaluate` call: its loaded inputs and settings, and what its volume loops accumulate."""

    checkpoint: Any
    config: EvaluationConfig
    settings: Any
    extractor: Any
    model_name: str
    cts: list[Any]
    mrs: list[Any]
    ct_masks: list[np.ndarray]
    mr_masks: list[np.ndarray]
    harmonizers: dict[str, Any]
    reference_note: str
    report: Callable[[str, float, str], None]
    variants: dict[str, _Domain] = field(default_factory=dict)
    real_mr: _Domain = field(default_factory=_Domain)
    real_ct: _Domain = field(default_factory=_Domain)
    synthetic_ct: _Domain = field(default_factory=_Domain)
    per_volume: list[dict[str, Any]] = field(default_factory=list)
    paired_rows: list[dict[str, Any]] = field(default_factory=list)
    figure_data: dict[str, Any] = field(default_factory=dict)

    @property
    def window(self) -> tuple[float, ...]:
        """The model's CT window (HU_min, HU_max), mapped to [-1, 1] by its preprocessing."""
        return tuple(self.checkpoint.preprocessing.ct_window)

    @property
    def hu_per_unit(self) -> float:
        """HU per normalised CT unit: (HU_max - HU_min) / 2."""
        return (self.window[1] - self.window[0]) / 2.0

    @property
    def total(self) -> int:
        """Volumes to translate (CT and MR), at least 1: the denominator of the progress."""
        return max(1, len(self.cts) + len(self.mrs))

    def stage_report(self, done: int, label: str, first: str) -> Callable[[str, float, str], None]:
        """Map translate_volume's two passes (first, then the other) onto this volume's share of the progress."""
        def inner(stage: str, fraction: float, message: str) -> None:
            step = 0.5 * min(1.0, fraction) + (0.0 if stage == first else 0.5)
            self.report("evaluate", 0.05 + 0.85 * (done + step) / self.total, f"{label}: {message}")
        return inner


def evaluate(model: str | os.PathLike | None, ct_inputs: Sequence[str | os.PathLike],
             mr_inputs: Sequence[str | os.PathLike], out_dir: str | os.PathLike,
             config: EvaluationConfig | None = None, settings: InferenceSettings | None = None,
             progress: Callable[[str, float, str], None] | None = None, name: str | None = None) -> EvaluationResult:
    """Evaluate a checkpoint on held-out CT and MR volumes and write tables, figures and TensorBoard events.

    Every metric is computed on each volume's 1 mm RAS network grid, NumPy (z, y, x), intensities in the network's
    normalised [-1, 1] (see the module docstring for the definitions and sources, and
    :mod:`ct2mr.evaluation.metrics` for the metric functions).

    Args:
        model: a ct2mr checkpoint; ``None``: the bundled default model.
        ct_inputs: CT files or folders (raw in HU, or outputs of ``ct2mr preprocess``).
        mr_inputs: MR files or folders (4D series split into 3D volumes).
        out_dir: output folder (created).
        config: evaluation settings.
        settings: :class:`ct2mr.inference.translate.InferenceSettings` of the sliding window.
        progress: ``callback(stage, fraction, message)`` with stage ``"evaluate"`` and the overall fraction.
        name: model name in the tables (default: the checkpoint's name).

    Returns:
        The :class:`EvaluationResult`.

    Raises:
        FileNotFoundError, ct2mr.io.images.ImageReadError, ct2mr.models.checkpoint.CheckpointError, ValueError, RuntimeError:
        unreadable inputs, bad settings (e.g. ``paired`` with different numbers of CT and MR volumes), missing
        feature weights, or out of memory.
    """
    from ct2mr.checks import prepare_output_dir
    from ct2mr.inference.translate import InferenceSettings

    config = config or EvaluationConfig()
    settings = settings or InferenceSettings()
    report = progress or (lambda stage, fraction, message: None)
    started = time.perf_counter()
    out_dir = Path(out_dir)
    prepare_output_dir(out_dir, "output folder (--out)")  # before any work: created and proved writable
    report("evaluate", 0.0, "Loading the model and the volumes")
    run = _load_run(model, ct_inputs, mr_inputs, config, settings, report, name)
    writer = _tensorboard(out_dir, config.tensorboard)
    for i in range(len(run.cts)):
        _score_ct_volume(run, i)
    for j in range(len(run.mrs)):
        _score_mr_volume(run, j)
    report("evaluate", 0.92, "FID, KID and histogram distances")
    aggregate = _realism_rows(run)
    report("evaluate", 0.95, "Writing tables and figures")
    files, table_md = _write_evaluation_outputs(run, out_dir, aggregate, writer)
    metrics = _metrics_record(run, aggregate, started)
    files.append(_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2, default=_json_default)))
    report("evaluate", 1.0, f"Wrote {out_dir}")
    return EvaluationResult(out_dir, metrics["aggregate"], metrics["per_volume"], metrics["paired"], metrics, files,
                            table_md)


def _load_run(model: str | os.PathLike | None, ct_inputs: Sequence[str | os.PathLike],
              mr_inputs: Sequence[str | os.PathLike], config: EvaluationConfig, settings: InferenceSettings,
              report: Callable[[str, float, str], None], name: str | None) -> _Run:
    """Load the checkpoint, the volumes and their evaluation masks, the feature extractor and the harmonisers."""
    from ct2mr.evaluation.features import build_feature_extractor
    from ct2mr.inference.translate import resolve_device
    from ct2mr.models.checkpoint import load_checkpoint
    from ct2mr.preprocessing.masks import evaluation_mask
    from ct2mr.preprocessing.collections import load_domain

    checkpoint = load_checkpoint(model)
    cts = load_domain(ct_inputs, "ct", checkpoint.preprocessing)
    mrs = load_domain(mr_inputs, "mr", checkpoint.preprocessing)
    if config.paired and len(cts) != len(mrs):
        raise ValueError(f"--paired needs as many CT as MR volumes (the i-th of each registered), got {len(cts)} CT "
                         f"and {len(mrs)} MR volumes.")
    extractor = build_feature_extractor(config.features, config.feature_weights, config.feature_sha256, config.seed,
                                        resolve_device(settings.device))
    ct_masks = [evaluation_mask(v.array, "ct", v.record, config.mask) for v in cts]
    mr_masks = [evaluation_mask(v.array, "mr", v.record, config.mask) for v in mrs]
    harmonizers, reference_note = _fit_harmonizers(config, checkpoint.preprocessing, mrs, mr_masks)
    return _Run(checkpoint, config, settings, extractor, name or checkpoint.name, cts, mrs, ct_masks, mr_masks,
                harmonizers, reference_note, report, variants=_new_variants(harmonizers, config.baselines))


def _fit_harmonizers(config: EvaluationConfig, preprocessing: Any, mrs: list[Any], mr_masks: list[np.ndarray]
                     ) -> tuple[dict[str, Any], str]:
    """Harmonisers fitted on the reference MRs (or the evaluation MR set), and the note that says which."""
    from ct2mr.inference.harmonization import fit_harmonizer, load_reference_mrs

    if config.reference_mr:
        ref_arrays, ref_masks, ref_names = load_reference_mrs(list(config.reference_mr), preprocessing, config.mask)
        reference_note = "reference MR: " + ", ".join(ref_names)
    else:
        ref_arrays, ref_masks, ref_names = [v.array for v in mrs], mr_masks, [v.name for v in mrs]
        reference_note = "reference MR: the evaluation MR set itself (optimistic)"
    return {m: fit_harmonizer(m, ref_arrays, ref_masks, ref_names) for m in config.harmonize}, reference_note


def _new_variants(harmonizers: dict[str, Any], baselines: bool) -> dict[str, _Domain]:
    """Empty accumulators of the CT→MR variants: model, model + each method, and (baselines) copy CT with them."""
    variants: dict[str, _Domain] = {"model": _Domain()}
    for m in harmonizers:
        variants[f"model+{m}"] = _Domain()
    if baselines:
        variants["identity"] = _Domain()
        for m in harmonizers:
            variants[f"identity+{m}"] = _Domain()
    return variants


def _score_ct_volume(run: _Run, i: int) -> None:
    """CT volume i: G(x) and F(G(x)); cycle, anatomy and paired rows, patch features, figure slices into ``run``."""
    from ct2mr.inference.translate import translate_volume

    vol, mask, config = run.cts[i], run.ct_masks[i], run.config
    x = vol.array
    fake_mr, rec_ct, _ = translate_volume(x, run.checkpoint, "ct2mr", run.settings,
                                          run.stage_report(i, f"CT {vol.name}", "G"))
    valid = _valid(vol)
    ssim_value = ssim3d(x, rec_ct, 2.0, mask)
    mae_value = mae(x, rec_ct, mask)
    row = {"model": run.model_name, "variant": "model", "direction": "CT→MR", "volume": vol.name,
           "ssim_cyc": ssim_value, "psnr_cyc_db": psnr(x, rec_ct, 2.0, mask), "mae": mae_value,
           "mae_hu": mae_value * run.hu_per_unit, "patches": int(config.patches_per_volume)}
    row.update(_anatomy_row(x, fake_mr, mask, vol.record, run.window, config.warp_check))
    run.per_volume.append(row)
    harmonised = _add_ct_patches(run, i, x, fake_mr)
    if config.paired:
        target = _resample_between(run.mrs[i].array, run.mrs[i].record.padded_grid, vol.record.padded_grid)
        run.paired_rows.append(_paired_row(run.model_name, "CT→MR", vol.name, fake_mr, target, mask, None))
    if config.figures and i < config.figure_volumes:
        error_hu = np.abs(rec_ct - x) * run.hu_per_unit
        run.figure_data[f"ct{i}"] = {"name": vol.name, "ct": _slices(x, valid, mask),
                                     "synthetic_mr": _slices(fake_mr, valid, mask),
                                     "roundtrip_ct": _slices(rec_ct, valid, mask),
                                     "error_hu": _slices(error_hu, valid, mask),
                                     "harmonised": {m: _slices(h, valid, mask) for m, h in harmonised.items()},
                                     "error_max": float(max(1.0, np.percentile(error_hu[mask], 99)))}
    run.report("evaluate", 0.05 + 0.85 * (i + 1) / run.total, f"CT {vol.name} done")


def _add_ct_patches(run: _Run, i: int, x: np.ndarray, fake_mr: np.ndarray) -> dict[str, np.ndarray]:
    """Features and histograms of x, G(x), G(x) + each harmonisation and copy CT; returns the harmonised G(x)."""
    vol, mask, config, extractor = run.cts[i], run.ct_masks[i], run.config, run.extractor
    size = int(config.patch_size)
    rng = np.random.default_rng([config.seed, 0, i])
    x_p, fake_p = _pad_to_patch(x, size, -1.0), _pad_to_patch(fake_mr, size, -1.0)
    mask_p = _pad_to_patch(mask, size, False)
    corners = sample_patch_corners(mask_p, int(config.patches_per_volume), size, rng)
    run.real_ct.add(vol.name, extractor(extract_patches(x_p, corners, size)), x[mask])
    run.variants["model"].add(vol.name, extractor(extract_patches(fake_p, corners, size)), fake_mr[mask])
    harmonised = {}
    for m, harmonizer in run.harmonizers.items():
        harmonised[m] = harmonizer.apply(fake_mr, mask)
        run.variants[f"model+{m}"].add(vol.name, extractor(extract_patches(_pad_to_patch(harmonised[m], size, -1.0),
                                                                           corners, size)), harmonised[m][mask])
    if config.baselines:
        run.variants["identity"].add(vol.name, run.real_ct.features[-1], x[mask])
        for m, harmonizer in run.harmonizers.items():
            copy = harmonizer.apply(x, mask)
            run.variants[f"identity+{m}"].add(vol.name, extractor(extract_patches(_pad_to_patch(copy, size, -1.0),
                                                                                  corners, size)), copy[mask])
    return harmonised


def _score_mr_volume(run: _Run, j: int) -> None:
    """MR volume j: F(y) and G(F(y)); cycle and paired rows, patch features, figure slices into ``run``."""
    from ct2mr.inference.translate import translate_volume

    vol, mask, config = run.mrs[j], run.mr_masks[j], run.config
    done = len(run.cts) + j
    y = vol.array
    fake_ct, rec_mr, _ = translate_volume(y, run.checkpoint, "mr2ct", run.settings,
                                          run.stage_report(done, f"MR {vol.name}", "F"))
    size, n_patches = int(config.patch_size), int(config.patches_per_volume)
    run.per_volume.append({"model": run.model_name, "variant": "model", "direction": "MR→CT", "volume": vol.name,
                           "ssim_cyc": ssim3d(y, rec_mr, 2.0, mask), "psnr_cyc_db": psnr(y, rec_mr, 2.0, mask),
                           "mae": mae(y, rec_mr, mask), "mae_hu": None, "patches": n_patches})
    rng = np.random.default_rng([config.seed, 1, j])
    y_p, fake_p = _pad_to_patch(y, size, -1.0), _pad_to_patch(fake_ct, size, -1.0)
    corners = sample_patch_corners(_pad_to_patch(mask, size, False), n_patches, size, rng)
    run.real_mr.add(vol.name, run.extractor(extract_patches(y_p, corners, size)), y[mask])
    run.synthetic_ct.add(vol.name, run.extractor(extract_patches(fake_p, corners, size)), fake_ct[mask])
    if config.paired:
        ct_vol = run.cts[j]
        on_ct = _resample_between(fake_ct, vol.record.padded_grid, ct_vol.record.padded_grid)
        run.paired_rows.append(_paired_row(run.model_name, "MR→CT", ct_vol.name, on_ct, ct_vol.array,
                                           run.ct_masks[j], run.hu_per_unit))
    if config.figures and j == 0:
        valid = _valid(vol)
        run.figure_data["mr0"] = {"name": vol.name, "mr": _slices(y, valid, mask)}
    run.report("evaluate", 0.05 + 0.85 * (done + 1) / run.total, f"MR {vol.name} done")


def _realism(domain: _Domain, real_features: np.ndarray, real_hist: np.ndarray, config: EvaluationConfig
             ) -> dict[str, Any]:
    """FID, KID (%) and W1 (per volume, mean ± std, pooled) of a synthetic set against the real target set."""
    feats = domain.stacked()
    k_mean, k_std = kid(feats, real_features, config.kid_subsets, config.kid_subset_size, config.seed)
    w1s = {n: histogram_w1(h, real_hist) for n, h in domain.histograms.items()}
    w1_mean, w1_std = _mean_std(list(w1s.values()))
    return {"fid": fid(feats, real_features), "kid_percent": 100.0 * k_mean, "kid_percent_std": 100.0 * k_std,
            "w1": w1_mean, "w1_std": w1_std, "w1_pooled": histogram_w1(domain.pooled(), real_hist),
            "patches": int(len(feats)), "per_volume_w1": w1s}


def _realism_rows(run: _Run) -> list[dict[str, Any]]:
    """Aggregated rows of every CT→MR variant and of MR→CT; adds the per-volume W1 to ``run.per_volume`` and sorts it."""
    per_volume, n_patches = run.per_volume, int(run.config.patches_per_volume)
    real_mr_features, real_mr_hist = run.real_mr.stacked(), run.real_mr.pooled()
    labels = {"model": run.model_name, "identity": "copy CT (identity)"}
    aggregate: list[dict[str, Any]] = []
    for variant, domain in run.variants.items():
        base, _, method = variant.partition("+")
        label = labels[base] + (f" + {method}" if method else "")
        scores = _realism(domain, real_mr_features, real_mr_hist, run.config)
        cyc = [r for r in per_volume if r["variant"] == variant and r["direction"] == "CT→MR"]
        aggregate.append(_aggregate_row(label, variant, "CT→MR", scores, cyc, len(domain.histograms)))
        if variant != "model":
            for name_, w in scores["per_volume_w1"].items():
                per_volume.append({"model": label, "variant": variant, "direction": "CT→MR", "volume": name_,
                                   "ssim_cyc": None, "psnr_cyc_db": None, "mae": None, "mae_hu": None, "w1": w,
                                   "patches": n_patches})
        else:
            for r in cyc:
                r["w1"] = scores["per_volume_w1"].get(r["volume"])
    scores = _realism(run.synthetic_ct, run.real_ct.stacked(), run.real_ct.pooled(), run.config)
    cyc = [r for r in per_volume if r["variant"] == "model" and r["direction"] == "MR→CT"]
    for r in cyc:
        r["w1"] = scores["per_volume_w1"].get(r["volume"])
    aggregate.append(_aggregate_row(run.model_name, "model", "MR→CT", scores, cyc, len(run.synthetic_ct.histograms)))
    variants = run.variants
    per_volume.sort(key=lambda r: (r["direction"], list(variants).index(r["variant"]) if r["variant"] in variants
                                   else 0, r["volume"]))
    return aggregate


def _write_evaluation_outputs(run: _Run, out_dir: Path, aggregate: list[dict[str, Any]], writer
                              ) -> tuple[list[Path], str]:
    """Tables (CSV, Markdown), figures, figure data and TensorBoard events; returns (files, table Markdown)."""
    config = run.config
    files: list[Path] = []
    table_md = _aggregate_markdown(aggregate, run.model_name, run.extractor.identity, config, run.reference_note)
    files.append(_write_csv(out_dir / "table.csv", aggregate, AGGREGATE_KEYS))
    files.append(_write_text(out_dir / "table.md", table_md))
    files.append(_write_csv(out_dir / "per_volume.csv", run.per_volume, PER_VOLUME_COLUMNS))
    files.append(_write_text(out_dir / "per_volume.md", _per_volume_markdown(run.per_volume)))
    if config.paired:
        files.append(_write_csv(out_dir / "paired.csv", run.paired_rows, PAIRED_COLUMNS))
        files.append(_write_text(out_dir / "paired.md", _paired_markdown(run.paired_rows)))
    histograms = {"edges": np.linspace(*HISTOGRAM_RANGE, HISTOGRAM_BINS + 1), "real_mr": run.real_mr.pooled(),
                  "real_ct": run.real_ct.pooled(), "synthetic_ct": run.synthetic_ct.pooled(),
                  **{f"synthetic_mr/{v}": d.pooled() for v, d in run.variants.items()}}
    if config.figures:
        files += _evaluation_figures(out_dir, run.model_name, run.figure_data, histograms, aggregate,
                                     run.reference_note, writer)
        files.append(_save_figure_data(out_dir / "figure_data.npz", run.figure_data, histograms))
    if writer is not None:
        for row in aggregate:
            for key in ("fid", "kid_percent", "ssim_cyc", "psnr_cyc_db", "mae", "mae_hu", "w1"):
                if row.get(key) is not None and math.isfinite(float(row[key])):
                    tag = f"{row['direction'].replace('→', '2')}/{row['variant']}/{key}"
                    writer.add_scalar(tag, float(row[key]), 0)
        writer.add_text("table", table_md, 0)
        writer.flush()
        writer.close()
        files += sorted((out_dir / "tensorboard").glob("events.*"))
    return files, table_md


def _metric_definitions(hu_per_unit: float, window: Sequence[float]) -> dict[str, str]:
    """The ``metric_definitions`` of ``metrics.json``: one line per metric key."""
    return {
        "fid": "Frechet distance of Gaussian fits of patch features (scipy.linalg.sqrtm)",
        "kid_percent": "100 x unbiased MMD^2, kernel (a.b/d + 1)^3, mean (std) over subsets",
        "ssim_cyc": "3D SSIM, Gaussian window 11 / sigma 1.5, data range 2, mean in the mask",
        "psnr_cyc_db": "10 log10(2^2 / MSE) on [-1, 1] in the mask",
        "mae": "mean |a - b| on [-1, 1] in the mask", "mae_hu": f"mae x {hu_per_unit:g} HU (CT window {window})",
        "w1": f"Delta sum |CDF_a - CDF_b|, {HISTOGRAM_BINS} bins on [-1, 1], per volume vs the pooled real set",
        "w1_pooled": "W1 of the pooled synthetic set vs the pooled real set",
        "edge_correlation": "Pearson correlation of the gradient magnitudes (Gaussian derivatives, sigma 1 mm) "
                            "of x (HU through [-1000, 1000] to [-1, 1]) and G(x) in the mask (ct2mr.evaluation.anatomy)",
        "gradient_magnitude_similarity": "mean GMS (Xue et al. 2014), c = 170 (2/255)^2, in the mask; gmsd: "
                                         "its std",
        "nmi": "(H(x) + H(G(x))) / H(x, G(x)), 64 x 64 bins, in the mask (Studholme et al. 1999), in [1, 2]",
        "displacement_mean_mm": "--warp-check: mean |T(p) - p| (mm) in the mask of a B-spline registration "
                                "(Mattes MI, 50 mm control points, 3 mm working grid) of G(x) onto x",
        "displacement_p95_mm": "95th percentile of that displacement (mm) in the mask"}


def _metrics_record(run: _Run, aggregate: list[dict[str, Any]], started: float) -> dict[str, Any]:
    """The content of ``metrics.json``: inputs, settings, extractor, definitions and every row (NaN/inf as null)."""
    checkpoint, config = run.checkpoint, run.config
    return _clean({
        "model": {"name": run.model_name, "path": str(checkpoint.path), "sha256": checkpoint.sha256},
        "inputs": {"ct": [v.source for v in run.cts], "mr": [v.source for v in run.mrs]},
        "config": asdict(config), "inference": {k: (list(v) if isinstance(v, tuple) else v)
                                               for k, v in asdict(run.settings).items()},
        "feature_extractor": run.extractor.identity, "patch_sampling": SAMPLING_RULE,
        "metric_definitions": _metric_definitions(run.hu_per_unit, run.window),
        "mask": config.mask, "harmonization": {m: h.to_dict() for m, h in run.harmonizers.items()},
        "harmonization_reference": run.reference_note,
        "aggregate": aggregate, "per_volume": run.per_volume, "paired": run.paired_rows,
        "seconds": round(time.perf_counter() - started, 3),
        "software": software_versions("torch", "monai", "numpy", "scipy")})


def _valid(volume) -> np.ndarray:
    """The (z, y, x) mask of a loaded volume's voxels that are not padding."""
    from ct2mr.preprocessing.masks import valid_mask

    return valid_mask(volume.array.shape, volume.record.pad_before, volume.record.pad_after)


def _paired_row(model: str, direction: str, volume: str, synthetic: np.ndarray, target: np.ndarray,
                mask: np.ndarray, hu_per_unit: float | None) -> dict[str, Any]:
    """Paired MAE (and HU), PSNR and SSIM of a synthetic volume vs its registered target in mask and footprint."""
    footprint = mask & np.isfinite(synthetic) & np.isfinite(target)
    if not footprint.any():
        raise ValueError(f"--paired: {volume} and its MR do not overlap in space; are they registered?")
    a, b = np.nan_to_num(synthetic, nan=-1.0), np.nan_to_num(target, nan=-1.0)
    error = mae(a, b, footprint)
    return {"model": model, "direction": direction, "volume": volume, "mae": error,
            "mae_hu": error * hu_per_unit if hu_per_unit else None, "psnr_db": psnr(a, b, 2.0, footprint),
            "ssim": ssim3d(a, b, 2.0, footprint), "voxels": int(footprint.sum())}


def _aggregate_row(label: str, variant: str, direction: str, scores: dict[str, Any], cyc: list[dict[str, Any]],
                   volumes: int) -> dict[str, Any]:
    """One aggregated row: realism scores plus mean ± std of the per-volume cycle and anatomy metrics."""
    row = {"model": label, "variant": variant, "direction": direction, "volumes": volumes,
           **{k: scores[k] for k in ("fid", "kid_percent", "kid_percent_std", "w1", "w1_std", "w1_pooled", "patches")}}
    for key in ("ssim_cyc", "psnr_cyc_db", "mae", "mae_hu", *ANATOMY_COLUMNS):
        row[key], row[f"{key}_std"] = _mean_std([r.get(key) for r in cyc])
    return row


def _anatomy_row(x: np.ndarray, fake_mr: np.ndarray, mask: np.ndarray, record, window: Sequence[float],
                 warp: bool) -> dict[str, Any]:
    """Anatomy metrics of x and G(x) on the 1 mm network grid (:func:`ct2mr.evaluation.anatomy.anatomy_metrics`).

    x goes back to HU through the model's CT window; both are cropped to the mask's bounding box plus 20 mm (more than
    the gradients' support, and the warp check's 15 mm margin), which leaves the metrics unchanged.
    """
    import SimpleITK as sitk

    from ct2mr.evaluation.anatomy import anatomy_metrics
    from ct2mr.preprocessing.pipeline import denormalize_ct

    idx = np.nonzero(mask)
    box = tuple(slice(max(0, int(i.min()) - 20), min(n, int(i.max()) + 21)) for i, n in zip(idx, mask.shape))
    spacing = tuple(float(v) for v in record.padded_grid["spacing"])
    images = []
    for array in (denormalize_ct(x[box], window), fake_mr[box]):
        image = sitk.GetImageFromArray(np.ascontiguousarray(array, np.float32))
        image.SetSpacing(spacing)
        images.append(image)
    metrics, _ = anatomy_metrics(images[0], images[1], warp=warp, body=mask[box])
    return {k: metrics.get(k) for k in ANATOMY_COLUMNS}


def _aggregate_markdown(aggregate: list[dict[str, Any]], model: str, identity: dict[str, Any],
                        config: EvaluationConfig, reference_note: str) -> str:
    """``table.md``: the aggregated table (thesis Tables 6, 7, 9), its notes, and the anatomy table."""
    text = f"# Evaluation of {model} (thesis Tables 6, 7, 9 layout)\n\n"
    text += markdown_table(TABLE_COLUMNS, [_aggregate_cells(r) for r in aggregate])
    text += (f"\nFID/KID: {config.patches_per_volume} patches of {config.patch_size}^3 voxels per volume inside the "
             f"{config.mask} mask, features `{identity['name']}` ({identity.get('dim')} values, weights SHA-256 "
             f"{identity.get('weights_sha256', '')[:16]}...); comparable only between runs with the same extractor. "
             "KID (%) = 100 x unbiased MMD^2 (mean ± std over subsets). Cycle metrics: CT→MR rows compare x with "
             "F(G(x)), MR→CT rows y with G(F(y)); SSIM/PSNR/MAE on the [-1, 1] range (PSNR data range 2), mean ± "
             "std over volumes; MAE (HU) for the CT cycle. W1: histogram distance (thesis eq. 7.2) of each "
             "synthetic volume to the pooled real target domain, in [-1, 1] units. Harmonised rows (thesis 7.6) "
             f"change G(x) after the fact, so they have no cycle metrics; {reference_note}.\n")
    rows = [r for r in aggregate if r.get("edge_correlation") is not None]
    if rows:
        text += ("\n## Anatomy preservation (thesis 5, P1/E2)\n\n"
                 + markdown_table(["Model", "Direction", "Edge corr↑", "GMS↑", "GMSD↓", "NMI↑", "Disp. mean (mm)↓",
                                   "Disp. p95 (mm)↓"],
                                  [[r["model"], r["direction"],
                                    _pm(r["edge_correlation"], r["edge_correlation_std"], 3),
                                    _pm(r["gradient_magnitude_similarity"], r["gradient_magnitude_similarity_std"], 3),
                                    _pm(r["gmsd"], r["gmsd_std"], 3), _pm(r["nmi"], r["nmi_std"], 3),
                                    _pm(r["displacement_mean_mm"], r["displacement_mean_mm_std"], 2),
                                    _pm(r["displacement_p95_mm"], r["displacement_p95_mm_std"], 2)] for r in rows])
                 + "\nx vs G(x), contrast-independent: correlation and similarity (GMS, Xue et al. 2014) of gradient "
                   "magnitudes, normalised mutual information (Studholme et al. 1999), mean ± std over volumes; "
                   "displacement (--warp-check): B-spline registration (Mattes MI) of G(x) onto x, mm in the mask.\n")
    return text


def _per_volume_markdown(rows: list[dict[str, Any]]) -> str:
    """``per_volume.md``: one row per (variant, direction, volume)."""
    header = ["Model", "Direction", "Volume", "SSIM_cyc↑", "PSNR_cyc↑ (dB)", "MAE↓", "MAE (HU)↓", "W1↓",
              "Edge corr↑", "GMS↑", "NMI↑", "Disp. mean (mm)↓", "Disp. p95 (mm)↓"]
    cells = [[r["model"], r["direction"], r["volume"], _fmt(r.get("ssim_cyc")), _fmt(r.get("psnr_cyc_db"), 2),
              _fmt(r.get("mae")), _fmt(r.get("mae_hu"), 1), _fmt(r.get("w1")), _fmt(r.get("edge_correlation"), 3),
              _fmt(r.get("gradient_magnitude_similarity"), 3), _fmt(r.get("nmi"), 3),
              _fmt(r.get("displacement_mean_mm"), 2), _fmt(r.get("displacement_p95_mm"), 2)] for r in rows]
    return ("# Per-volume metrics\n\n" + markdown_table(header, cells)
            + "\nAnatomy (CT→MR model rows, thesis 5 P1/E2; :mod:`ct2mr.evaluation.anatomy`): edge correlation and GMS of the "
              "gradient magnitudes of x and G(x), NMI of x and G(x), in the mask on the 1 mm grid; displacement of a "
              "B-spline registration of G(x) onto x (only with --warp-check), ~0 mm when G moved no anatomy.\n")


def _paired_markdown(rows: list[dict[str, Any]]) -> str:
    """``paired.md``: the paired rows with mean ± SD per direction (Wolterink et al. 2017, Table 1)."""
    header = ["Model", "Direction", "Volume", "MAE↓", "MAE (HU)↓", "PSNR↑ (dB)", "SSIM↑"]
    cells = [[r["model"], r["direction"], r["volume"], _fmt(r["mae"]), _fmt(r.get("mae_hu"), 1),
              _fmt(r["psnr_db"], 2), _fmt(r["ssim"])] for r in rows]
    for direction in sorted({r["direction"] for r in rows}):
        sel = [r for r in rows if r["direction"] == direction]
        stats = {k: _mean_std([r.get(k) for r in sel]) for k in ("mae", "mae_hu", "psnr_db", "ssim")}
        cells.append([sel[0]["model"], direction, "**Average ± SD**", _pm(*stats["mae"]), _pm(*stats["mae_hu"], 1),
                      _pm(*stats["psnr_db"], 2), _pm(*stats["ssim"])])
    return ("# Synthetic vs real target in registered pairs (Wolterink et al. 2017, Table 1 layout)\n\n"
            + markdown_table(header, cells)
            + "\nInside the CT's evaluation mask and the MR's footprint, on the CT's 1 mm grid. MAE (HU) for MR→CT "
              "(synthetic CT vs real CT); CT→MR values are in normalised MR units. PSNR: data range 2 on [-1, 1].\n")


def _evaluation_figures(out_dir: Path, model: str, figure_data: dict[str, Any], histograms: dict[str, np.ndarray],
                        aggregate: list[dict[str, Any]], reference_note: str, writer) -> list[Path]:
    """Tri-planar, round-trip and histogram figures of one evaluation (thesis figs. 5, 6, 8, 10, 11)."""
    from ct2mr.evaluation.figures import plot_histogram_overlay, plot_triplanar_panels

    figures = out_dir / "figures"
    figures.mkdir(exist_ok=True)
    files = []
    mr = figure_data.get("mr0")
    for key, data in sorted((k, v) for k, v in figure_data.items() if k.startswith("ct")):
        panels = [("CT x [-1, 1]", data["ct"], (-1, 1), "gray"), (f"synthetic MR G(x)\n{model}", data["synthetic_mr"],
                                                                    (-1, 1), "gray")]
        panels += [(f"G(x) + {m}", s, (-1, 1), "gray") for m, s in data["harmonised"].items()]
        if mr is not None:
            panels.append((f"real MR reference\n{mr['name']}", mr["mr"], (-1, 1), "gray"))
        path = plot_triplanar_panels(figures / f"triplanar_{data['name']}.png", panels,
                                     f"CT → MR: {data['name']} (thesis figs. 5, 10)",
                                     "normalised intensities [-1, 1]; the real MR is another subject")
        files.append(path)
        _log_figure(writer, f"figures/triplanar_{data['name']}", path)
        panels = [("CT x [-1, 1]", data["ct"], (-1, 1), "gray"),
                  ("round trip F(G(x)) [-1, 1]", data["roundtrip_ct"], (-1, 1), "gray"),
                  ("|F(G(x)) - x| (HU)", data["error_hu"], (0, data["error_max"]), "magma")]
        path = plot_triplanar_panels(figures / f"roundtrip_{data['name']}.png", panels,
                                     f"Cycle consistency: {data['name']} (thesis fig. 6)",
                                     "error map clipped at its 99th percentile in the mask "
                                     f"({data['error_max']:.0f} HU)")
        files.append(path)
        _log_figure(writer, f"figures/roundtrip_{data['name']}", path)
    def w1_label(label: str, value: float | None) -> str:
        return label + (f" (W1 {value:.4f})" if value is not None and math.isfinite(value) else "")

    w1 = {r["variant"]: r["w1_pooled"] for r in aggregate if r["direction"] == "CT→MR"}
    synthetic = [(w1_label("synthetic MR G(x)" if v == "model" else v.replace("model+", "G(x) + "), w1[v]),
                  histograms[f"synthetic_mr/{v}"]) for v in w1 if v.startswith("model")]
    if "identity" in w1:
        synthetic.append((w1_label("copy CT (identity)", w1["identity"]), histograms["synthetic_mr/identity"]))
    path = plot_histogram_overlay(figures / "histogram_ct2mr.png", histograms["edges"],
                                  ("real MR", histograms["real_mr"]), synthetic,
                                  f"CT → MR intensity distributions in the masks: {model} (thesis figs. 8, 11)",
                                  note="W1: pooled synthetic vs pooled real MR")
    files.append(path)
    _log_figure(writer, "figures/histogram_ct2mr", path)
    w1_ct = next((r["w1_pooled"] for r in aggregate if r["direction"] == "MR→CT"), None)
    path = plot_histogram_overlay(figures / "histogram_mr2ct.png", histograms["edges"],
                                  ("real CT", histograms["real_ct"]),
                                  [(w1_label("synthetic CT F(y)", w1_ct), histograms["synthetic_ct"])],
                                  f"MR → CT intensity distributions in the masks: {model}",
                                  xlabel="normalised CT intensity [-1, 1] (CT window)")
    files.append(path)
    _log_figure(writer, "figures/histogram_mr2ct", path)
    return files


def _save_figure_data(path: Path, figure_data: dict[str, Any], histograms: dict[str, np.ndarray]) -> Path:
    """Slices and histograms that ``ct2mr compare`` draws side by side (plain arrays, no pickles)."""
    arrays: dict[str, np.ndarray] = {f"hist/{k}": np.asarray(v) for k, v in histograms.items()}
    names: dict[str, Any] = {}
    for key, data in figure_data.items():
        names[key] = data["name"]
        for kind in ("ct", "synthetic_mr", "mr"):
            if kind in data:
                for plane, image, aspect in data[kind]:
                    arrays[f"{key}/{kind}/{plane}"] = np.asarray(image, np.float32)
                    arrays[f"{key}/{kind}/{plane}/aspect"] = np.asarray(aspect)
    arrays["names_json"] = np.asarray(json.dumps(names))
    from ct2mr.io.images import atomic_write

    with atomic_write(path) as tmp:
        np.savez_compressed(tmp, **arrays)
    return path


# --- Comparison ---------------------------------------------------------------------------------------------------

def load_evaluation(run: str | os.PathLike) -> dict[str, Any]:
    """Read the ``metrics.json`` of an ``ct2mr evaluate`` output folder (or the file itself).

    Raises:
        FileNotFoundError: no ``metrics.json``; the message says to run ``ct2mr evaluate`` first.
    """
    path = Path(run)
    if path.is_dir():
        path = path / "metrics.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run} holds no metrics.json: run `ct2mr evaluate --out {run} ...` first, or pass a "
                                "checkpoint together with --ct and --mr.")
    return json.loads(path.read_text())


def _load_slices(run_dir: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The names and arrays of a run's ``figure_data.npz`` (empty without one)."""
    path = run_dir / "figure_data.npz"
    if not path.is_file():
        return {}, {}
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    names = json.loads(str(arrays.pop("names_json")))
    return names, arrays


def _planes(arrays: dict[str, np.ndarray], prefix: str) -> list[tuple[str, np.ndarray, float]] | None:
    """The three (plane, image, aspect) slices stored under ``prefix``, or None when one is missing."""
    out = []
    for plane in ("axial", "coronal", "sagittal"):
        key = f"{prefix}/{plane}"
        if key not in arrays:
            return None
        out.append((plane, arrays[key], float(arrays[f"{key}/aspect"])))
    return out


def compare(runs: Sequence[str | os.PathLike], out_dir: str | os.PathLike, ct_inputs: Sequence[str] | None = None,
            mr_inputs: Sequence[str] | None = None, config: EvaluationConfig | None = None,
            settings: InferenceSettings | None = None, progress: Callable[[str, float, str], None] | None = None
            ) -> dict[str, Any]:
    """Compare two or more models side by side: one table, paired t-tests, tri-planar and histogram figures.

    Each run is an ``ct2mr evaluate`` output folder, or a checkpoint (``.safetensors``) that is evaluated first into
    ``out_dir/runs/<stem>`` with ``ct_inputs``, ``mr_inputs`` and ``config``. Paired t-tests
    (:func:`ct2mr.evaluation.metrics.paired_ttest`, as Wolterink et al. 2017) compare every run with the first on the
    per-volume metrics of the volumes both scored (cycle SSIM, PSNR, MAE, W1 of the model rows, and the paired
    metrics when present).

    Args:
        runs: two or more evaluation folders or checkpoints.
        out_dir: output folder (created): ``compare.csv``/``.md``, ``ttests.csv``/``.md``,
            ``figures/compare_triplanar.png``, ``figures/compare_histogram.png``, ``tensorboard/``.
        ct_inputs, mr_inputs: evaluation sets for checkpoints.
        config: evaluation settings for checkpoints.
        settings: inference settings for checkpoints.
        progress: ``callback(stage, fraction, message)``.

    Returns:
        ``{"table": rows, "ttests": rows, "files": [paths], "markdown": text}``.

    Raises:
        ValueError: fewer than two runs, or a checkpoint without ``ct_inputs``/``mr_inputs``.
        FileNotFoundError: a folder without ``metrics.json``.
    """
    if len(runs) < 2:
        raise ValueError("compare needs at least two runs (evaluation folders or checkpoints).")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = progress or (lambda stage, fraction, message: None)
    run_dirs = _compare_run_dirs(runs, out_dir, ct_inputs, mr_inputs, config, settings, report)
    metrics = [load_evaluation(d) for d in run_dirs]
    labels = _run_labels(run_dirs, metrics)
    table = []
    for label, m in zip(labels, metrics):
        for row in m["aggregate"]:
            table.append({**row, "run": label, "model": row["model"] if row["variant"] != "model" else label})
    ttests = _ttests(labels, metrics)
    md = _compare_markdown(table, ttests, metrics)
    files: list[Path] = []
    files.append(_write_csv(out_dir / "compare.csv", table, ["run"] + AGGREGATE_KEYS))
    files.append(_write_text(out_dir / "compare.md", md))
    files.append(_write_csv(out_dir / "ttests.csv", ttests, ["run", "reference", "direction", "metric", "n", "mean_a",
                                                              "mean_b", "mean_diff", "t", "p"]))
    writer = _tensorboard(out_dir, config.tensorboard if config else True)
    files += _compare_figures(out_dir, labels, run_dirs, writer)
    if writer is not None:
        for r in table:
            for key in ("fid", "kid_percent", "ssim_cyc", "psnr_cyc_db", "mae", "w1"):
                if r.get(key) is not None:
                    writer.add_scalar(f"{r['direction'].replace('→', '2')}/{r['variant']}/{key}/{r['run']}",
                                      float(r[key]), 0)
        writer.add_text("compare", md, 0)
        writer.close()
        files += sorted((out_dir / "tensorboard").glob("events.*"))
    report("compare", 1.0, f"Wrote {out_dir}")
    return {"table": table, "ttests": ttests, "files": files, "markdown": md}


def _compare_run_dirs(runs: Sequence[str | os.PathLike], out_dir: Path, ct_inputs: Sequence[str] | None,
                      mr_inputs: Sequence[str] | None, config: EvaluationConfig | None,
                      settings: InferenceSettings | None, report: Callable[[str, float, str], None]) -> list[Path]:
    """The evaluation folder of each run: a folder as given, a checkpoint evaluated first into ``out_dir/runs``."""
    run_dirs: list[Path] = []
    for k, run in enumerate(runs):
        path = Path(run)
        if path.is_file() and path.suffix == ".safetensors":
            if not ct_inputs or not mr_inputs:
                raise ValueError(f"{path} is a checkpoint: pass --ct and --mr so that compare can evaluate it, or "
                                 "pass the folders written by `ct2mr evaluate`.")
            target = out_dir / "runs" / f"{k}_{path.stem}"
            report("compare", k / len(runs), f"Evaluating {path.name}")
            evaluate(path, ct_inputs, mr_inputs, target, config, settings,
                     lambda s, f, m, k=k: report("compare", (k + f) / len(runs), m))
            run_dirs.append(target)
        else:
            run_dirs.append(path)
    return run_dirs


def _run_labels(run_dirs: list[Path], metrics: list[dict[str, Any]]) -> list[str]:
    """One label per run: its model's name, with the folder's name after a repeated one."""
    labels: list[str] = []
    for d, m in zip(run_dirs, metrics):
        label = m["model"]["name"]
        labels.append(label if labels.count(label) == 0 else f"{label} ({d.name})")
    return labels


def _compare_markdown(table: list[dict[str, Any]], ttests: list[dict[str, Any]], metrics: list[dict[str, Any]]
                      ) -> str:
    """``compare.md``: the side-by-side table, a warning when the extractors differ, and the paired t-tests."""
    md = "# Model comparison\n\n" + markdown_table(["Run"] + TABLE_COLUMNS, [[r["run"]] + _aggregate_cells(r)
                                                                            for r in table])
    extractors = {json.dumps(m["feature_extractor"], sort_keys=True) for m in metrics}
    if len(extractors) > 1:
        md += "\n**Warning**: the runs used different feature extractors; their FID/KID are not comparable.\n"
    md += ("\nPaired t-tests (two-sided, each run vs the first, on the volumes both scored):\n\n"
           + markdown_table(["Run", "vs", "Direction", "Metric", "n", "mean (run)", "mean (first)", "t", "p"],
                            [[t["run"], t["reference"], t["direction"], t["metric"], t["n"], _fmt(t["mean_a"]),
                              _fmt(t["mean_b"]), _fmt(t["t"], 3), _fmt(t["p"], 4)] for t in ttests]))
    return md


def _ttests(labels: list[str], metrics: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Paired t-tests of every run against the first, per direction and per-volume metric."""
    def by_volume(m: dict[str, Any], rows_key: str, metric: str) -> dict[tuple[str, str], float]:
        rows = m.get(rows_key) or []
        return {(r["direction"], r["volume"]): r[metric] for r in rows
                if r.get("variant", "model") == "model" and r.get(metric) is not None}

    out = []
    candidates = [("per_volume", k) for k in ("ssim_cyc", "psnr_cyc_db", "mae", "w1")]
    candidates += [("paired", k) for k in ("mae", "mae_hu", "psnr_db", "ssim")]
    for k in range(1, len(metrics)):
        for rows_key, metric in candidates:
            first, other = by_volume(metrics[0], rows_key, metric), by_volume(metrics[k], rows_key, metric)
            for direction in sorted({d for d, _ in first} & {d for d, _ in other}):
                keys = sorted(v for d, v in set(first) & set(other) if d == direction)
                if not keys:
                    continue
                test = paired_ttest([other[(direction, v)] for v in keys], [first[(direction, v)] for v in keys])
                out.append({"run": labels[k], "reference": labels[0], "direction": direction,
                            "metric": ("paired " if rows_key == "paired" else "") + metric, **test})
    return out


def _compare_figures(out_dir: Path, labels: list[str], run_dirs: list[Path], writer) -> list[Path]:
    """Side-by-side tri-planar and histogram figures of the runs that kept their figure data."""
    from ct2mr.evaluation.figures import plot_histogram_overlay, plot_triplanar_panels

    figures = out_dir / "figures"
    figures.mkdir(exist_ok=True)
    loaded = [_load_slices(d) for d in run_dirs]
    files = []
    panels, real_mr, ct_names = [], None, set()
    for label, (names, arrays) in zip(labels, loaded):
        if not arrays:
            logger.warning("%s has no figure_data.npz (evaluated with --no-figures?); left out of the figures", label)
            continue
        if not panels and _planes(arrays, "ct0/ct") is not None:
            panels.append((f"CT {names.get('ct0', '')}", _planes(arrays, "ct0/ct"), (-1, 1), "gray"))
        slices = _planes(arrays, "ct0/synthetic_mr")
        if slices is not None:
            ct_names.add(names.get("ct0"))
            panels.append((f"G(x): {label}", slices, (-1, 1), "gray"))
        if real_mr is None and _planes(arrays, "mr0/mr") is not None:
            real_mr = (f"real MR reference\n{names.get('mr0', '')}", _planes(arrays, "mr0/mr"), (-1, 1), "gray")
    if real_mr is not None:
        panels.append(real_mr)
    if len(panels) > 1:
        note = "normalised intensities [-1, 1]"
        if len(ct_names) > 1:
            note += f"; WARNING: the runs show different CTs ({', '.join(sorted(map(str, ct_names)))})"
        path = plot_triplanar_panels(figures / "compare_triplanar.png", panels,
                                     "Side-by-side comparison (thesis figs. 5, 10)", note)
        files.append(path)
        _log_figure(writer, "figures/compare_triplanar", path)
    hists = [(label, arrays) for label, (_, arrays) in zip(labels, loaded) if "hist/real_mr" in arrays]
    if hists:
        edges = hists[0][1]["hist/edges"]
        path = plot_histogram_overlay(figures / "compare_histogram.png", edges,
                                      ("real MR", hists[0][1]["hist/real_mr"]),
                                      [(f"G(x): {label}", a["hist/synthetic_mr/model"]) for label, a in hists],
                                      "Synthetic vs real MR intensity distributions (thesis figs. 8, 11)")
        files.append(path)
        _log_figure(writer, "figures/compare_histogram", path)
    return files
