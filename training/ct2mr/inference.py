"""Sliding-window translation of a CT: synthetic MR G(x), round trip F(G(x)) in HU and error map, on the input grid.

The path (DESIGN.md, thesis sections 4 and 5): read -> :func:`ct2mr.preprocessing.preprocess` (CT) -> G over the
padded 1 mm RAS volume with MONAI's sliding-window inferer (gaussian blending, autocast) -> F over G(x) without
re-reading or re-preprocessing -> :func:`ct2mr.preprocessing.restore_to_input_grid` for both. The error map is
``|F(G(x)) - clip(x, HU_min, HU_max)|`` in HU on the input grid: the input CT clipped to the window the networks saw,
so voxels outside the window do not count as errors.

Outputs keep exactly the input's size, spacing, origin and direction; the networks never warp geometry.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import SimpleITK as sitk
import torch

from .checkpoint import Checkpoint
from .preprocessing import denormalize_ct, preprocess, restore_to_input_grid

__all__ = [
    "PRECISIONS",
    "InferenceSettings",
    "TranslationResult",
    "ProgressCallback",
    "resolve_device",
    "resolve_precision",
    "sliding_window",
    "DIRECTIONS",
    "translate_volume",
    "translate_image",
    "translate_file",
    "write_outputs",
    "fit_harmonizer_for",
    "OUTPUT_NAMES",
]

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
#: Default sliding window (D, H, W) voxels when neither the settings nor the checkpoint give one.
DEFAULT_ROI = (96, 96, 96)
#: ``callback(stage, fraction_of_stage, message)``; stages: preprocess, G, F, postprocess.
ProgressCallback = Callable[[str, float, str], None]


@dataclass
class InferenceSettings:
    """Settings of sliding-window translation.

    Attributes:
        roi_size: window size (D, H, W) in voxels of the 1 mm grid; ``None`` uses the checkpoint's default
            (at least 96^3) or 96^3. Each side must be a multiple of 4.
        overlap: fraction of overlap between neighbouring windows, in [0, 1).
        sw_batch_size: windows per forward pass.
        precision: ``"auto"`` (bf16 on CUDA when supported, fp16 on older CUDA GPUs, fp32 on CPU), ``"fp32"``,
            ``"bf16"`` or ``"fp16"``.
        device: ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        blend: MONAI blend mode, ``"gaussian"`` or ``"constant"``.
    """

    roi_size: Sequence[int] | None = None
    overlap: float = 0.25
    sw_batch_size: int = 1
    precision: str = "auto"
    device: str = "auto"
    blend: str = "gaussian"

    def __post_init__(self) -> None:
        if not 0 <= self.overlap < 1:
            raise ValueError(f"overlap must be in [0, 1), got {self.overlap}.")
        if self.sw_batch_size < 1:
            raise ValueError(f"sw_batch_size must be >= 1, got {self.sw_batch_size}.")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}.")
        if self.blend not in ("gaussian", "constant"):
            raise ValueError(f"blend must be 'gaussian' or 'constant', got {self.blend!r}.")
        if self.roi_size is not None:
            roi = [int(v) for v in (self.roi_size if isinstance(self.roi_size, Sequence) else [self.roi_size])]
            roi = roi * 3 if len(roi) == 1 else roi
            if len(roi) != 3 or any(v < 4 or v % 4 for v in roi):
                raise ValueError(f"roi_size must be 1 or 3 positive multiples of 4 voxels, got {self.roi_size}.")
            self.roi_size = tuple(roi)


@dataclass
class TranslationResult:
    """The three outputs of a translation, each on the input CT's grid (size, spacing, origin, direction).

    Attributes:
        synthetic_mr: G(x), float32, normalised MR intensity in [-1, 1].
        roundtrip_ct: F(G(x)), float32, HU (within the CT window).
        error_map: |F(G(x)) - clip(x)|, float32, HU.
        info: timings (s), device, precision, window settings, the preprocessing record.
    """

    synthetic_mr: sitk.Image
    roundtrip_ct: sitk.Image
    error_map: sitk.Image
    info: dict[str, Any] = field(default_factory=dict)


def resolve_device(name: str = "auto") -> torch.device:
    """Turn a device choice into a torch device, falling back to CPU with a warning when CUDA is missing.

    Args:
        name: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.

    Returns:
        The device.

    Raises:
        ValueError: an unknown name, or a CUDA index beyond the GPUs present.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            warnings.warn("CUDA was requested but is not available (no NVIDIA GPU, or a CPU-only PyTorch); "
                          "running on the CPU instead.", RuntimeWarning, stacklevel=2)
            return torch.device("cpu")
        device = torch.device(name)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"{name} does not exist: this machine has {torch.cuda.device_count()} CUDA device(s).")
        return device
    raise ValueError(f"Unknown device {name!r}; choose auto, cpu, cuda or cuda:N.")


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """The autocast dtype for ``precision`` on ``device`` (``torch.float32`` means no autocast).

    Args:
        precision: one of :data:`PRECISIONS`.
        device: the compute device.

    Returns:
        ``torch.float32``, ``torch.bfloat16`` or ``torch.float16``.
    """
    if precision == "fp32":
        return torch.float32
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def _window_count(shape: Sequence[int], roi: Sequence[int], overlap: float) -> int:
    try:
        from monai.data.utils import dense_patch_slices
        from monai.inferers.utils import _get_scan_interval

        size = [max(s, r) for s, r in zip(shape, roi)]
        interval = _get_scan_interval(size, roi, len(roi), overlap)
        return len(dense_patch_slices(size, roi, interval))
    except Exception:  # private helper moved: estimate
        return int(np.prod([max(1, math.ceil((max(s, r) - r) / max(1, int(r * (1 - overlap)))) + 1)
                            for s, r in zip(shape, roi)]))


def sliding_window(net: torch.nn.Module, volume: torch.Tensor, settings: InferenceSettings, roi: Sequence[int],
                   device: torch.device, dtype: torch.dtype, progress: Callable[[float], None] | None = None
                   ) -> torch.Tensor:
    """Run ``net`` over a whole volume with MONAI's sliding-window inferer.

    Args:
        net: (B, 1, D, H, W) -> (B, 1, D, H, W) network, already on ``device``.
        volume: (1, 1, D, H, W) float32 tensor (on CPU or ``device``).
        settings: overlap, window batch, blend mode.
        roi: window size (D, H, W).
        device: where windows are computed; the stitched output stays on ``volume``'s device.
        dtype: autocast dtype (``torch.float32``: none).
        progress: called with the fraction of windows done.

    Returns:
        The stitched (1, 1, D, H, W) float32 output.
    """
    from monai.inferers import sliding_window_inference

    total = _window_count(volume.shape[2:], roi, settings.overlap)
    done = 0
    channels_last = device.type == "cuda"

    def predictor(batch: torch.Tensor) -> torch.Tensor:
        nonlocal done
        batch = batch.to(device, non_blocking=True)
        if channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last_3d)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = net(batch)
        done += batch.shape[0]
        if progress is not None:
            progress(min(1.0, done / total))
        return out.float()

    with torch.inference_mode():
        return sliding_window_inference(volume, list(roi), settings.sw_batch_size, predictor,
                                        overlap=settings.overlap, mode=settings.blend, sw_device=device,
                                        device=volume.device, padding_mode="replicate")


#: Translation directions of :func:`translate_volume`: ``"ct2mr"`` runs G then F, ``"mr2ct"`` runs F then G.
DIRECTIONS = ("ct2mr", "mr2ct")


def translate_volume(volume: np.ndarray, checkpoint: Checkpoint, direction: str = "ct2mr",
                     settings: InferenceSettings | None = None, progress: ProgressCallback | None = None,
                     roundtrip: bool = True) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
    """Translate a preprocessed volume on the network grid, and back (thesis eq. 5.4, cycle consistency).

    ``"ct2mr"``: ``G(x)`` then ``F(G(x))``; ``"mr2ct"``: ``F(y)`` then ``G(F(y))``. Both passes use
    :func:`sliding_window` with the same settings; the second pass runs on the first's output without re-reading or
    re-normalising it.

    Args:
        volume: (z, y, x) float32 array in [-1, 1] on the 1 mm RAS padded grid (:func:`ct2mr.preprocessing.preprocess`
            with modality ``"ct"`` for ``"ct2mr"``, ``"mr"`` for ``"mr2ct"``).
        checkpoint: a loaded checkpoint; its generators are moved to the settings' device.
        direction: one of :data:`DIRECTIONS`.
        settings: inference settings; ``None`` uses the defaults.
        progress: ``callback(stage, fraction_of_stage, message)`` with stages ``"G"`` and ``"F"``.
        roundtrip: also run the second generator (``False``: the second output is ``None``).

    Returns:
        ``(translated, reconstructed, info)``: (z, y, x) float32 arrays in [-1, 1] on the same grid, and
        ``{"device", "precision", "roi_size", "seconds": {"G", "F"}}``.

    Raises:
        ValueError: unknown direction, bad settings or not a 3D array.
        RuntimeError: out of memory on the device (the message suggests a smaller window or CPU).
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}.")
    volume = np.asarray(volume, dtype=np.float32)
    if volume.ndim != 3:
        raise ValueError(f"translate_volume needs a (z, y, x) array, got shape {volume.shape}.")
    settings = settings or InferenceSettings()
    report = progress or (lambda stage, fraction, message: None)
    device = resolve_device(settings.device)
    dtype = resolve_precision(settings.precision, device)
    roi = settings.roi_size or tuple(checkpoint.inference.get("roi_size") or DEFAULT_ROI)
    G = checkpoint.G.to(device).eval()
    F = checkpoint.F.to(device).eval()
    if device.type == "cuda":
        G, F = (m.to(memory_format=torch.channels_last_3d) for m in (G, F))
        torch.backends.cudnn.benchmark = True
    passes = [("G", G, "Synthetic MR G(x)"), ("F", F, "Round trip F(G(x))")]
    if direction == "mr2ct":
        passes = [("F", F, "Synthetic CT F(y)"), ("G", G, "Round trip G(F(y))")]
    if not roundtrip:
        passes = passes[:1]
    stitch_device = device if device.type == "cuda" else torch.device("cpu")
    current = torch.from_numpy(volume)[None, None].to(stitch_device)
    outputs, seconds = [], {}
    try:
        for stage, net, message in passes:
            t = time.perf_counter()
            current = sliding_window(net, current, settings, roi, device, dtype,
                                     lambda f, stage=stage, message=message: report(stage, f, message))
            seconds[stage] = time.perf_counter() - t
            outputs.append(current[0, 0].cpu().numpy())
    except torch.OutOfMemoryError as exc:
        raise RuntimeError(f"Out of memory on {device} while translating a {list(volume.shape)} volume. Try a "
                           "smaller --roi-size or --sw-batch-size, or --device cpu.") from exc
    info = {"device": str(device), "precision": str(dtype).replace("torch.", ""), "roi_size": list(roi),
            "seconds": seconds}
    return outputs[0], (outputs[1] if roundtrip else None), info


def translate_image(ct: sitk.Image, checkpoint: Checkpoint, settings: InferenceSettings | None = None,
                    progress: ProgressCallback | None = None, harmonizer: Any = None,
                    preprocessed: Any = None) -> TranslationResult:
    """Translate one CT: synthetic MR, round-trip CT in HU and error map, all on the input's grid.

    Args:
        ct: a 3D CT in HU (any orientation, spacing and pixel type).
        checkpoint: a loaded checkpoint; its G and F are moved to the settings' device.
        settings: inference settings; ``None`` uses the defaults.
        progress: ``callback(stage, fraction_of_stage, message)``.
        harmonizer: a fitted :class:`ct2mr.harmonization.Harmonizer` applied to the synthetic MR on the input grid,
            with its statistics inside the CT's body mask (thesis 7.6, post-hoc harmonisation); ``None`` (default)
            leaves G(x) as it is. The round trip and error map always use the unharmonised G(x).
        preprocessed: the :class:`ct2mr.preprocessing.PreprocessedVolume` of ``preprocess(ct, "ct",
            checkpoint.preprocessing)`` when the caller already computed it (batch mode prepares the next volume
            while this one runs); ``None`` computes it here.

    Returns:
        The :class:`TranslationResult`.

    Raises:
        ValueError: bad settings or a non-3D image.
        RuntimeError: out of memory on the device (the message suggests a smaller window or CPU).
    """
    settings = settings or InferenceSettings()
    report = progress or (lambda stage, fraction, message: None)
    window = checkpoint.preprocessing.ct_window
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    report("preprocess", 0.0, "Reorienting, resampling to 1 mm and normalising the CT")
    pre = preprocessed if preprocessed is not None else preprocess(ct, "ct", checkpoint.preprocessing)
    timings["preprocess"] = time.perf_counter() - t0
    report("preprocess", 1.0, f"Network grid {list(pre.array.shape)} (z, y, x) voxels")

    fake_mr_np, roundtrip_np, run = translate_volume(pre.array, checkpoint, "ct2mr", settings, report)
    timings.update(run["seconds"])

    t = time.perf_counter()
    report("postprocess", 0.0, "Resampling the outputs back onto the input grid")
    roundtrip_hu = denormalize_ct(roundtrip_np, window)
    synthetic_mr = restore_to_input_grid(fake_mr_np, pre.record, default_value=-1.0)
    roundtrip_ct = restore_to_input_grid(roundtrip_hu, pre.record, default_value=window[0])
    x = sitk.GetArrayViewFromImage(ct).astype(np.float32)
    error = np.abs(sitk.GetArrayViewFromImage(roundtrip_ct) - np.clip(x, window[0], window[1]))
    error_map = sitk.GetImageFromArray(error.astype(np.float32))
    error_map.CopyInformation(ct)
    harmonization = None
    if harmonizer is not None and harmonizer.method != "none":
        from .masks import body_mask

        report("postprocess", 0.5, f"Harmonising the synthetic MR ({harmonizer.method})")
        mask = body_mask(x, "ct", normalised=False)
        synthetic_mr = harmonizer.apply(synthetic_mr, mask)
        harmonization = harmonizer.to_dict()
    timings["postprocess"] = time.perf_counter() - t
    report("postprocess", 1.0, "Done")
    info = {"device": run["device"], "precision": run["precision"], "roi_size": run["roi_size"],
            "overlap": settings.overlap, "sw_batch_size": settings.sw_batch_size, "seconds": timings,
            "network_grid_zyx": list(pre.array.shape), "preprocessing": pre.record.to_dict(),
            "mean_error_hu": float(error.mean()), "harmonization": harmonization}
    return TranslationResult(synthetic_mr, roundtrip_ct, error_map, info)


OUTPUT_NAMES = {"synthetic_mr": "synthetic_mr.nii.gz", "roundtrip_ct": "roundtrip_ct.nii.gz",
                "error_map": "error_map.nii.gz"}


def translate_file(input_path: str | Path, out_dir: str | Path, model: str | Path | None = None,
                   settings: InferenceSettings | None = None, progress: ProgressCallback | None = None,
                   harmonize: str = "none", reference_mr: str | Path | Sequence[str | Path] | None = None,
                   checkpoint: Checkpoint | None = None, image: sitk.Image | None = None, preprocessed: Any = None,
                   harmonizer: Any = None, warp_check: bool = False) -> dict[str, Any]:
    """Translate a CT file or DICOM folder and write the three outputs, all or nothing.

    The input is read and the model loaded before anything is written; the outputs are written to temporary files
    in ``out_dir`` and renamed only when all three are complete, so a failure leaves no partial output (and an
    ``out_dir`` this call created is removed again).

    Args:
        input_path: the CT (NIfTI, NRRD, MHA, HDF5 or a DICOM series folder), HU.
        out_dir: output folder (created when missing); receives :data:`OUTPUT_NAMES`.
        model: a ct2mr checkpoint; ``None`` uses the bundled default model.
        settings: inference settings.
        progress: ``callback(stage, fraction_of_stage, message)``; the stage ``write`` is added here.
        harmonize: post-hoc harmonisation of the synthetic MR, one of
            :data:`ct2mr.harmonization.HARMONIZATION_METHODS` (thesis 7.6): ``"none"`` (default), ``"histogram"``
            (quantile mapping to the reference MR), ``"nyul"`` (landmarks learned from the reference MRs) or
            ``"zscore"`` (median/MAD in the CT's body mask, matched to the reference's median/MAD; without a
            reference: robust z-scores, no longer in [-1, 1]).
        reference_mr: reference MR file(s) or folder(s) for ``harmonize``; they go through the model's MR
            preprocessing, so the harmonised synthetic MR is in the same normalised intensity, in [-1, 1].
        checkpoint: an already loaded checkpoint, used instead of loading ``model`` (batch mode keeps one loaded,
            with G and F on the device, across volumes: :mod:`ct2mr.translate_batch`).
        image: the CT already read from ``input_path`` (``None``: read it here).
        preprocessed: ``preprocess(image, "ct", checkpoint.preprocessing)`` already computed (``None``: here).
        harmonizer: an already fitted harmonizer (:func:`fit_harmonizer_for`), used instead of fitting one from
            ``harmonize`` and ``reference_mr``.
        warp_check: also run the anatomy checks (:func:`ct2mr.anatomy.translation_anatomy`: edge correlation, GMS,
            NMI, a B-spline registration of G(x) onto x) and write ``displacement_mm.nii.gz`` (float32, mm, on the
            input's grid) and ``anatomy.json`` with the other outputs; the metrics go to ``info["anatomy"]``.

    Returns:
        ``{"outputs": {key: path}, "info": {...}}``.

    Raises:
        FileNotFoundError, ct2mr.io.ImageReadError, ct2mr.checkpoint.CheckpointError, ValueError, RuntimeError:
        bad input, checkpoint or settings, or out of memory; nothing is written then.
    """
    from .checkpoint import load_checkpoint
    from .io import read_image

    input_path, out_dir = Path(input_path), Path(out_dir)
    finals = {key: out_dir / name for key, name in OUTPUT_NAMES.items()}
    resolved_input = input_path.resolve()
    if any(p.resolve() == resolved_input for p in finals.values()):
        raise ValueError(f"The output folder {out_dir} would overwrite the input {input_path}; choose another -o.")
    settings = settings or InferenceSettings()
    from .harmonization import HARMONIZATION_METHODS

    if harmonize not in HARMONIZATION_METHODS:
        raise ValueError(f"harmonize must be one of {HARMONIZATION_METHODS}, got {harmonize!r}.")
    image = read_image(input_path) if image is None else image
    checkpoint = load_checkpoint(model) if checkpoint is None else checkpoint
    if harmonizer is None:
        harmonizer = fit_harmonizer_for(harmonize, reference_mr, checkpoint)
    result = translate_image(image, checkpoint, settings, progress, harmonizer, preprocessed=preprocessed)
    extra = None
    if warp_check:  # anatomy checks (thesis 5, P1/E2): two more files in the same all-or-nothing write
        from .anatomy import translation_anatomy

        result.info["anatomy"], extra = translation_anatomy(image, result.synthetic_mr, progress)
    finals = write_outputs(result, out_dir, progress, extra)
    info = dict(result.info)
    info.update({"input": str(input_path), "model": str(checkpoint.path), "model_name": checkpoint.name,
                 "model_sha256": checkpoint.sha256})
    return {"outputs": {key: str(path) for key, path in finals.items()}, "info": info}


def fit_harmonizer_for(harmonize: str, reference_mr: str | Path | Sequence[str | Path] | None,
                       checkpoint: Checkpoint) -> Any:
    """The harmonizer ``translate_file`` applies for ``--harmonize`` / ``--reference-mr`` (thesis 7.6).

    Args:
        harmonize: one of :data:`ct2mr.harmonization.HARMONIZATION_METHODS`.
        reference_mr: reference MR file(s) or folder(s), read through ``checkpoint``'s MR preprocessing.
        checkpoint: the loaded checkpoint (its preprocessing parameters).

    Returns:
        A fitted :class:`ct2mr.harmonization.Harmonizer`, or ``None`` for ``"none"`` without references.

    Raises:
        ValueError, FileNotFoundError, ct2mr.io.ImageReadError: an unknown method or unreadable references.
    """
    if harmonize == "none" and not reference_mr:
        return None
    from .harmonization import fit_harmonizer, load_reference_mrs

    references: list = []
    masks: list = []
    names: list = []
    if reference_mr:
        paths = [reference_mr] if isinstance(reference_mr, (str, Path)) else list(reference_mr)
        references, masks, names = load_reference_mrs(paths, checkpoint.preprocessing)
    return fit_harmonizer(harmonize, references, masks, names)


def write_outputs(result: TranslationResult, out_dir: str | Path, progress: ProgressCallback | None = None,
                  extra: Mapping[str, Any] | None = None) -> dict[str, Path]:
    """Write a translation's outputs into ``out_dir``, all or nothing.

    Every file goes to a temporary name in ``out_dir`` first (:func:`ct2mr.io.atomic_path`); only when all are
    complete are they renamed to their final names. On any error or interruption the temporary files are removed,
    and an ``out_dir`` this call created is removed again when it stayed empty.

    Args:
        result: the translation (:data:`OUTPUT_NAMES` files: synthetic MR, round-trip CT, error map, NIfTI gzip).
        out_dir: output folder, created when missing.
        progress: ``callback(stage, fraction_of_stage, message)`` with stage ``"write"``.
        extra: more files of the same all-or-nothing step, ``{file name: sitk.Image (written as an image) or a
            JSON-serialisable value}``; their keys in the returned mapping are the names without suffix.

    Returns:
        ``{key: final path}`` for :data:`OUTPUT_NAMES` and ``extra``.

    Raises:
        OSError: the folder or a file cannot be written (nothing is left behind then).
    """
    from .io import atomic_path, image_suffix

    out_dir = Path(out_dir)
    report = progress or (lambda stage, fraction, message: None)
    items = [(key, out_dir / name, getattr(result, key)) for key, name in OUTPUT_NAMES.items()]
    items += [(name[: -len(image_suffix(name))] if image_suffix(name) else name, out_dir / name, value)
              for name, value in (extra or {}).items()]
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    temps: list[tuple[Path, Path]] = []
    try:
        for i, (key, final, value) in enumerate(items):
            report("write", i / len(items), f"Writing {final.name}")
            tmp = atomic_path(final)
            temps.append((tmp, final))
            if isinstance(value, sitk.Image):
                sitk.WriteImage(value, str(tmp), True)
            else:
                tmp.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")
        for tmp, final in temps:
            os.replace(tmp, final)
        report("write", 1.0, f"Wrote {out_dir}")
    except BaseException:
        for tmp, _ in temps:
            tmp.unlink(missing_ok=True)
        if created and out_dir.exists() and not any(out_dir.iterdir()):
            out_dir.rmdir()
        raise
    return {key: final for key, final, _ in items}
