"""Sliding-window translation of a CT: synthetic MR G(x), round trip F(G(x)) in HU and error map, on the input grid.

The path (DESIGN.md, thesis sections 4 and 5): read -> :func:`ct2mr.preprocessing.pipeline.preprocess` (CT) -> G over the
padded 1 mm RAS volume with MONAI's sliding-window inferer (gaussian blending, autocast) -> F over G(x) without
re-reading or re-preprocessing -> :func:`ct2mr.preprocessing.pipeline.restore_to_input_grid` for both. The error map is
``|F(G(x)) - clip(x, HU_min, HU_max)|`` in HU on the input grid: the input CT clipped to the window the networks saw,
so voxels outside the window do not count as errors.

Outputs keep exactly the input's size, spacing, origin and direction; the networks never warp geometry.
"""

from __future__ import annotations

import json
import logging
import time
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence

import numpy as np
import SimpleITK as sitk
import torch

from ct2mr.models.checkpoint import Checkpoint
from ct2mr.preprocessing.pipeline import denormalize_ct, preprocess, restore_to_input_grid

__all__ = [
    "PRECISIONS",
    "InferenceSettings",
    "TranslationResult",
    "ProgressCallback",
    "resolve_device",
    "cluster_device",
    "resolve_precision",
    "scan_interval",
    "sliding_window",
    "MemoryPlan",
    "plan_memory",
    "DIRECTIONS",
    "translate_volume",
    "error_map_array",
    "translate_image",
    "TranslationExtension",
    "translate_file",
    "write_outputs",
    "fit_harmonizer_for",
    "OUTPUT_NAMES",
    "CPU_FP16_NOTE",
]

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
#: Default sliding window (D, H, W) voxels when neither the settings nor the checkpoint give one.
DEFAULT_ROI = (96, 96, 96)
#: ``callback(stage, fraction_of_stage, message)``; stages: preprocess, G, F, postprocess.
ProgressCallback = Callable[[str, float, str], None]
#: The note printed when fp16 is asked for on the CPU (no fp16 kernels there: emulated, several times slower).
CPU_FP16_NOTE = ("--precision fp16 on the CPU: the CPU has no fast float16 convolutions, so this runs several times "
                 "slower than fp32 and is less exact. Use --precision fp32 (or auto) on the CPU, bf16 on CPUs with "
                 "AVX-512 BF16 or AMX, fp16 on a GPU.")


@dataclass
class InferenceSettings:
    """Settings of sliding-window translation.

    Attributes:
        roi_size: window size (D, H, W) in voxels of the 1 mm grid; ``None`` uses the checkpoint's default
            (at least 96^3) or 96^3. Each side must be a multiple of 4.
        overlap: fraction of overlap between neighbouring windows, in [0, 1).
        sw_batch_size: windows per forward pass; ``None`` (default) chooses it from the free GPU memory
            (:func:`plan_memory`), 1 on the CPU.
        precision: ``"auto"`` (bf16 on CUDA when supported, fp16 on older CUDA GPUs, fp32 on CPU), ``"fp32"``,
            ``"bf16"`` or ``"fp16"``.
        device: ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        blend: MONAI blend mode, ``"gaussian"`` or ``"constant"``.
        fast: the fast path (:mod:`ct2mr.inference.fastpath` generators, memory plan, out-of-memory fallbacks); ``False``
            runs the modules as trained with a fixed window batch (the fp32 reference with ``precision="fp32"``).
        gpu_memory_gb: cap on the GPU memory this process may use (GiB), enforced through PyTorch's allocator;
            ``None``: all that is free.
    """

    roi_size: Sequence[int] | None = None
    overlap: float = 0.25
    sw_batch_size: int | None = None
    precision: str = "auto"
    device: str = "auto"
    blend: str = "gaussian"
    fast: bool = True
    gpu_memory_gb: float | None = None

    def __post_init__(self) -> None:
        from ct2mr.checks import validate_overlap, validate_roi_size

        self.overlap = validate_overlap(self.overlap)
        if self.gpu_memory_gb is not None and self.gpu_memory_gb <= 0:
            raise ValueError(f"gpu_memory_gb must be positive, got {self.gpu_memory_gb}.")
        if self.sw_batch_size is not None and self.sw_batch_size < 1:
            raise ValueError(f"sw_batch_size must be >= 1, got {self.sw_batch_size}.")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}.")
        if self.blend not in ("gaussian", "constant"):
            raise ValueError(f"blend must be 'gaussian' or 'constant', got {self.blend!r}.")
        if self.roi_size is not None:
            self.roi_size = validate_roi_size(self.roi_size)


@dataclass
class TranslationResult:
    """The three outputs of a translation, each on the input CT's grid (size, spacing, origin, direction).

    Attributes:
        synthetic_mr: G(x), float32, normalised MR intensity in [-1, 1].
        roundtrip_ct: F(G(x)), float32, HU (within the CT window).
        error_map: |F(G(x)) - clip(x)|, float32, HU.
        info: timings (s), device, precision, window settings, the preprocessing record.
        network_outputs: network-grid arrays kept for later steps (``translate_image(keep_network=True)``:
            ``{"synthetic_mr": (z, y, x) float32 G(x) in [-1, 1] on the padded 1 mm RAS grid}``); empty otherwise.
    """

    synthetic_mr: sitk.Image
    roundtrip_ct: sitk.Image
    error_map: sitk.Image
    info: dict[str, Any] = field(default_factory=dict)
    network_outputs: dict[str, np.ndarray] = field(default_factory=dict)


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


def cluster_device(device: str = "auto") -> str:
    """The device of this process: ``cuda:LOCAL_RANK`` under ``torchrun`` when CUDA is available.

    Args:
        device: the requested device (``auto``, ``cpu``, ``cuda`` or ``cuda:N``). Only ``auto`` and ``cuda`` are
            mapped; an explicit ``cuda:N`` or ``cpu`` is kept.

    Returns:
        ``cuda:{LOCAL_RANK mod GPU count}`` when ``LOCAL_RANK`` is set, CUDA is available and ``device`` is ``auto``
        or ``cuda``; otherwise ``device`` unchanged.
    """
    local = os.environ.get("LOCAL_RANK")
    if local is not None and device in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{int(local) % torch.cuda.device_count()}"
    return device


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


def scan_interval(image_size: Sequence[int], roi: Sequence[int], overlap: float) -> tuple[int, ...]:
    """The step between neighbouring sliding windows along each axis, as MONAI's sliding-window inferer takes it.

    Our copy of the rule in ``monai.inferers.utils._get_scan_interval`` (MONAI 1.x, a private helper): for each axis,
    the window itself when it spans the whole axis, else ``int(roi * (1 - overlap))``, at least 1 voxel.

    Args:
        image_size: (D, H, W) voxels of the volume as the inferer sees it (each axis at least ``roi``: MONAI pads a
            smaller axis up to the window first).
        roi: window size (D, H, W) voxels.
        overlap: fraction of overlap between neighbouring windows, in [0, 1).

    Returns:
        The step (D, H, W) in voxels.

    Raises:
        ValueError: ``image_size`` and ``roi`` have different lengths.
    """
    if len(image_size) != len(roi):
        raise ValueError(f"image_size {tuple(image_size)} and roi {tuple(roi)} have different numbers of axes.")
    return tuple(int(r) if r == s else max(int(r * (1 - overlap)), 1) for s, r in zip(image_size, roi))


def _window_count(shape: Sequence[int], roi: Sequence[int], overlap: float) -> int:
    """Number of windows MONAI's sliding-window inferer runs over a (D, H, W) volume (for the progress fraction)."""
    from monai.data.utils import dense_patch_slices

    size = [max(s, r) for s, r in zip(shape, roi)]
    return len(dense_patch_slices(size, roi, scan_interval(size, roi, overlap)))


def sliding_window(net: torch.nn.Module, volume: torch.Tensor, settings: InferenceSettings, roi: Sequence[int],
                   device: torch.device, dtype: torch.dtype, progress: Callable[[float], None] | None = None,
                   sw_batch_size: int | None = None, stitch_device: torch.device | None = None) -> torch.Tensor:
    """Run ``net`` over a whole volume with MONAI's sliding-window inferer.

    Args:
        net: (B, 1, D, H, W) -> (B, 1, D, H, W) network, already on ``device``.
        volume: (1, 1, D, H, W) float32 tensor (on CPU or ``device``).
        settings: overlap, window batch, blend mode.
        roi: window size (D, H, W).
        device: where windows are computed.
        dtype: autocast dtype (``torch.float32``: none).
        progress: called with the fraction of windows done.
        sw_batch_size: windows per forward pass; ``None``: ``settings.sw_batch_size`` or 1.
        stitch_device: where the stitched output (and MONAI's weight map) lives; ``None``: ``volume``'s device.
            A CPU stitching buffer lets volumes larger than the GPU's memory through, windows still run on the GPU.

    Returns:
        The stitched (1, 1, D, H, W) float32 output on ``stitch_device``.

    Raises:
        torch.OutOfMemoryError: the device ran out of memory (:func:`translate_volume` retries smaller).
    """
    from monai.inferers import sliding_window_inference

    total = _window_count(volume.shape[2:], roi, settings.overlap)
    done = 0
    channels_last = device.type == "cuda"
    batch_size = sw_batch_size or settings.sw_batch_size or 1

    def predictor(batch: torch.Tensor) -> torch.Tensor:
        """``net`` on a (B, 1, D, H, W) window batch on ``device`` under autocast; float32, progress counted."""
        nonlocal done
        batch = batch.to(device, non_blocking=True)
        if channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last_3d)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = net(batch)
        done += batch.shape[0]
        if progress is not None:
            progress(min(1.0, done / total))
        return out.float().contiguous()

    with torch.inference_mode():
        return sliding_window_inference(volume, list(roi), batch_size, predictor, overlap=settings.overlap,
                                        mode=settings.blend, sw_device=device,
                                        device=stitch_device or volume.device, padding_mode="replicate")


@dataclass
class MemoryPlan:
    """How a volume is run: windows per pass and where the stitching buffer lives (:func:`plan_memory`).

    Attributes:
        sw_batch_size: windows per forward pass.
        stitch_device: device of the stitched output and weight map (the GPU when the volume fits, else the CPU).
        window_bytes: measured peak device memory of one window's forward pass (0 on CPU: not measured).
        free_bytes: device memory available to this run when planned (0 on CPU).
        reason: one line saying why, for logs and the progress stream.
    """

    sw_batch_size: int
    stitch_device: torch.device
    window_bytes: int = 0
    free_bytes: int = 0
    reason: str = ""


#: Fraction of the free GPU memory the plan may use (the rest is the allocator's and cuDNN's workspace).
GPU_MEMORY_FRACTION = 0.8
#: Largest automatic window batch (beyond it a GPU gains nothing but latency per progress step).
MAX_AUTO_SW_BATCH = 16


def plan_memory(net: torch.nn.Module, volume_shape: Sequence[int], roi: Sequence[int], device: torch.device,
                dtype: torch.dtype, settings: InferenceSettings) -> MemoryPlan:
    """Choose the window batch and the stitching device from the free memory (issue 7's fast path).

    On CUDA one probe window is run (which also lets cuDNN's benchmark mode pick its kernels) to measure the peak
    memory of one forward pass; the stitching buffers (input, output and MONAI's count map, float32, each
    ``prod(volume_shape)`` voxels) stay on the GPU when they fit in :data:`GPU_MEMORY_FRACTION` of the free memory
    next to one window batch, else on the CPU. The batch is the free remainder over the window's peak, between 1 and
    :data:`MAX_AUTO_SW_BATCH`, unless ``settings.sw_batch_size`` fixes it. On the CPU the batch is
    ``settings.sw_batch_size`` or 1 (a larger batch brings no speed there, only memory) and stitching is on the CPU.

    Args:
        net: the network to run, on ``device``.
        volume_shape: (D, H, W) voxels of the volume.
        roi: window size (D, H, W).
        device: the compute device.
        dtype: the autocast dtype.
        settings: the inference settings (``sw_batch_size``, ``gpu_memory_gb``).

    Returns:
        The :class:`MemoryPlan`.
    """
    cpu = torch.device("cpu")
    if device.type != "cuda":
        return MemoryPlan(settings.sw_batch_size or 1, cpu, reason="CPU: windows and stitching in RAM")
    torch.cuda.synchronize(device)
    free, _ = torch.cuda.mem_get_info(device)
    if settings.gpu_memory_gb:
        limit = int(settings.gpu_memory_gb * 2 ** 30)
        free = min(free, limit - torch.cuda.memory_reserved(device))
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    probe = torch.zeros((1, 1, *roi), device=device).contiguous(memory_format=torch.channels_last_3d)
    with torch.inference_mode(), torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        net(probe)
    torch.cuda.synchronize(device)
    window = max(1, torch.cuda.max_memory_allocated(device) - before)
    del probe
    budget = int(free * GPU_MEMORY_FRACTION)
    stitch_bytes = 4 * 4 * int(np.prod(volume_shape))  # input, output, count map, one slack copy (float32)
    on_gpu = stitch_bytes + window <= budget
    remainder = budget - stitch_bytes if on_gpu else budget
    batch = settings.sw_batch_size or int(max(1, min(MAX_AUTO_SW_BATCH, remainder // window)))
    where = "on the GPU" if on_gpu else "on the CPU (the volume's buffers do not fit next to the windows)"
    reason = (f"{free / 2 ** 30:.1f} GiB free on {device}, {window / 2 ** 20:.0f} MiB per window: {batch} window(s) "
              f"per pass, stitching {where}")
    return MemoryPlan(batch, device if on_gpu else cpu, window, free, reason)


def _fast_networks(checkpoint: Checkpoint, device: torch.device, fast: bool) -> dict[str, torch.nn.Module]:
    """G and F ready on ``device``: the fast-path copies (cached on the checkpoint) or the plain modules."""
    if not fast:
        return {"G": checkpoint.G.to(device).eval(), "F": checkpoint.F.to(device).eval()}
    from ct2mr.inference.fastpath import optimize_for_inference

    cache = checkpoint.__dict__.setdefault("_fast_networks", {})
    key = str(device)
    if key not in cache:
        cache.clear()  # one device at a time: do not keep copies on a GPU that is no longer used
        cache[key] = {name: optimize_for_inference(getattr(checkpoint, name), device) for name in ("G", "F")}
    return cache[key]


def _run_pass(net: torch.nn.Module, current: torch.Tensor, settings: InferenceSettings, roi: Sequence[int],
              device: torch.device, dtype: torch.dtype, plan: MemoryPlan, progress: Callable[[float], None]
              ) -> torch.Tensor:
    """One sliding-window pass with the out-of-memory fallbacks: halve the window batch, then stitch on the CPU."""
    while True:
        try:
            return sliding_window(net, current.to(plan.stitch_device), settings, roi, device, dtype, progress,
                                  sw_batch_size=plan.sw_batch_size, stitch_device=plan.stitch_device)
        except torch.OutOfMemoryError:
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if plan.sw_batch_size > 1:
                smaller = max(1, plan.sw_batch_size // 2)
                warnings.warn(f"Out of memory on {device} with {plan.sw_batch_size} windows per pass; retrying with "
                              f"{smaller}.", RuntimeWarning, stacklevel=2)
                plan.sw_batch_size = smaller
            elif plan.stitch_device.type != "cpu":
                warnings.warn(f"Out of memory on {device} with the stitching buffer on the GPU; retrying with the "
                              "stitching buffer in CPU memory (slower, windows still on the GPU).",
                              RuntimeWarning, stacklevel=2)
                plan.stitch_device = torch.device("cpu")
                current = current.cpu()
            else:
                raise


#: Translation directions of :func:`translate_volume`: ``"ct2mr"`` runs G then F, ``"mr2ct"`` runs F then G.
DIRECTIONS = ("ct2mr", "mr2ct")


def translate_volume(volume: np.ndarray, checkpoint: Checkpoint, direction: str = "ct2mr",
                     settings: InferenceSettings | None = None, progress: ProgressCallback | None = None,
                     roundtrip: bool = True) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
    """Translate a preprocessed volume on the network grid, and back (thesis eq. 5.4, cycle consistency).

    ``"ct2mr"``: ``G(x)`` then ``F(G(x))``; ``"mr2ct"``: ``F(y)`` then ``G(F(y))``. Both passes use
    :func:`sliding_window` with the same settings; the second pass runs on the first's output where it already is
    (on the GPU when stitching there), without re-reading, re-normalising or a trip through the CPU.

    With ``settings.fast`` (default) the generators are the :func:`ct2mr.inference.fastpath.optimize_for_inference` copies,
    the window batch and stitching device come from :func:`plan_memory`, and out-of-memory errors fall back to a
    smaller window batch, then to CPU stitching, with a warning each. ``fast=False`` with ``precision="fp32"`` is
    the plain fp32 reference path (the module as trained, MONAI's inferer, one window per pass).

    Args:
        volume: (z, y, x) float32 array in [-1, 1] on the 1 mm RAS padded grid (:func:`ct2mr.preprocessing.pipeline.preprocess`
            with modality ``"ct"`` for ``"ct2mr"``, ``"mr"`` for ``"mr2ct"``).
        checkpoint: a loaded checkpoint; its generators are moved to the settings' device.
        direction: one of :data:`DIRECTIONS`.
        settings: inference settings; ``None`` uses the defaults.
        progress: ``callback(stage, fraction_of_stage, message)`` with stages ``"G"`` and ``"F"``.
        roundtrip: also run the second generator (``False``: the second output is ``None``).

    Returns:
        ``(translated, reconstructed, info)``: (z, y, x) float32 arrays in [-1, 1] on the same grid, and
        ``{"device", "precision", "roi_size", "sw_batch_size", "stitch_device", "fast", "memory_plan",
        "seconds": {"G", "F"}}``.

    Raises:
        ValueError: unknown direction, bad settings or not a 3D array.
        RuntimeError: out of memory on the device even with one window per pass and CPU stitching (the message
            suggests a smaller window or CPU).
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}.")
    volume = np.asarray(volume, dtype=np.float32)
    if volume.ndim != 3:
        raise ValueError(f"translate_volume needs a (z, y, x) array, got shape {volume.shape}.")
    settings = settings or InferenceSettings()
    report = progress or (lambda stage, fraction, message: None)
    device, dtype = _device_and_precision(settings)
    roi = settings.roi_size or tuple(checkpoint.inference.get("roi_size") or DEFAULT_ROI)
    nets = _fast_networks(checkpoint, device, settings.fast)
    passes = _passes(direction, roundtrip)
    try:
        if settings.fast:
            plan = plan_memory(nets[passes[0][0]], volume.shape, roi, device, dtype, settings)
        else:
            plan = MemoryPlan(settings.sw_batch_size or 1, device if device.type == "cuda" else torch.device("cpu"),
                              reason="reference path: fixed window batch")
        logger.info("%s", plan.reason)
        outputs, seconds = _run_passes(nets, passes, volume, settings, roi, device, dtype, plan, report)
    except torch.OutOfMemoryError as exc:
        raise RuntimeError(f"Out of memory on {device} while translating a {list(volume.shape)} volume, even with "
                           "one window per pass and CPU stitching. Try a smaller --roi-size, or --device cpu."
                           ) from exc
    info = {"device": str(device), "precision": str(dtype).replace("torch.", ""), "roi_size": list(roi),
            "sw_batch_size": plan.sw_batch_size, "stitch_device": str(plan.stitch_device), "fast": settings.fast,
            "memory_plan": plan.reason, "seconds": seconds}
    if device.type == "cuda":
        info["gpu_peak_mib"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 20, 1)
    return outputs[0], (outputs[1] if roundtrip else None), info


def _device_and_precision(settings: InferenceSettings) -> tuple[torch.device, torch.dtype]:
    """The compute device and autocast dtype of ``settings``; on CUDA also cuDNN benchmark and the memory cap."""
    device = resolve_device(settings.device)
    dtype = resolve_precision(settings.precision, device)
    if device.type == "cpu" and dtype == torch.float16:
        warnings.warn(CPU_FP16_NOTE, RuntimeWarning, stacklevel=3)  # pointing at translate_volume's caller
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        if settings.gpu_memory_gb:
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, settings.gpu_memory_gb * 2 ** 30 / total), device)
    return device, dtype


def _passes(direction: str, roundtrip: bool) -> list[tuple[str, str]]:
    """``[(generator, progress message), ...]`` of ``direction``: both generators, or the first one only."""
    passes = [("G", "Synthetic MR G(x)"), ("F", "Round trip F(G(x))")]
    if direction == "mr2ct":
        passes = [("F", "Synthetic CT F(y)"), ("G", "Round trip G(F(y))")]
    return passes if roundtrip else passes[:1]


def _run_passes(nets: Mapping[str, torch.nn.Module], passes: Sequence[tuple[str, str]], volume: np.ndarray,
                settings: InferenceSettings, roi: Sequence[int], device: torch.device, dtype: torch.dtype,
                plan: MemoryPlan, report: ProgressCallback) -> tuple[list[np.ndarray], dict[str, float]]:
    """Run the passes one after the other, each on the last one's output where it is: arrays and seconds."""
    current = torch.from_numpy(volume)[None, None].to(plan.stitch_device)
    outputs, seconds = [], {}
    for stage, message in passes:
        t = time.perf_counter()
        current = _run_pass(nets[stage], current, settings, roi, device, dtype, plan,
                            lambda f, stage=stage, message=message: report(stage, f, message))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds[stage] = time.perf_counter() - t
        outputs.append(current[0, 0].cpu().numpy())
    return outputs, seconds


def error_map_array(roundtrip_ct: sitk.Image, ct: sitk.Image, window: Sequence[float]) -> np.ndarray:
    """``|F(G(x)) - clip(x, window)|`` in HU, computed slice by slice (no full-volume temporaries).

    Args:
        roundtrip_ct: F(G(x)) in HU on the input grid.
        ct: the input CT x in HU (any pixel type), same grid.
        window: (HU_min, HU_max) the networks saw.

    Returns:
        (z, y, x) float32 array in HU.
    """
    roundtrip = sitk.GetArrayViewFromImage(roundtrip_ct)
    x = sitk.GetArrayViewFromImage(ct)
    error = np.empty(roundtrip.shape, np.float32)
    lo, hi = float(window[0]), float(window[1])
    for z in range(error.shape[0]):
        np.subtract(roundtrip[z], np.clip(x[z].astype(np.float32), lo, hi), out=error[z])
        np.abs(error[z], out=error[z])
    return error


def translate_image(ct: sitk.Image, checkpoint: Checkpoint, settings: InferenceSettings | None = None,
                    progress: ProgressCallback | None = None, harmonizer: Any = None,
                    preprocessed: Any = None, keep_network: bool = False) -> TranslationResult:
    """Translate one CT: synthetic MR, round-trip CT in HU and error map, all on the input's grid.

    Args:
        ct: a 3D CT in HU (any orientation, spacing and pixel type).
        checkpoint: a loaded checkpoint; its G and F are moved to the settings' device.
        settings: inference settings; ``None`` uses the defaults.
        progress: ``callback(stage, fraction_of_stage, message)``.
        harmonizer: a fitted :class:`ct2mr.inference.harmonization.Harmonizer` applied to the synthetic MR on the input grid,
            with its statistics inside the CT's body mask (thesis 7.6, post-hoc harmonisation); ``None`` (default)
            leaves G(x) as it is. The round trip and error map always use the unharmonised G(x).
        preprocessed: the :class:`ct2mr.preprocessing.pipeline.PreprocessedVolume` of ``preprocess(ct, "ct",
            checkpoint.preprocessing)`` when the caller already computed it (batch mode prepares the next volume
            while this one runs); ``None`` computes it here.
        keep_network: keep the network-grid G(x) in ``result.network_outputs["synthetic_mr"]`` (the uncertainty
            step of issue 16 reuses it instead of running G once more); ``False`` frees it as soon as it is restored.

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

    record, network_grid = pre.record, list(pre.array.shape)
    fake_mr_np, roundtrip_np, run = translate_volume(pre.array, checkpoint, "ct2mr", settings, report)
    if preprocessed is None:
        del pre  # the network-grid input is no longer needed
    timings.update(run["seconds"])

    t = time.perf_counter()
    report("postprocess", 0.0, "Resampling the outputs back onto the input grid")
    # one network-grid or input-grid volume at a time (a 512 x 512 x 600 CT within 6 GB, issue 7)
    synthetic_mr = restore_to_input_grid(fake_mr_np, record, default_value=-1.0)
    network_outputs = {"synthetic_mr": fake_mr_np} if keep_network else {}
    del fake_mr_np
    roundtrip_ct = restore_to_input_grid(denormalize_ct(roundtrip_np, window, out=roundtrip_np), record,
                                         default_value=window[0])
    del roundtrip_np
    error = error_map_array(roundtrip_ct, ct, window)
    mean_error = float(error.mean(dtype=np.float64))
    error_map = sitk.GetImageFromArray(error)
    del error
    error_map.CopyInformation(ct)
    harmonization = None
    if harmonizer is not None and harmonizer.method != "none":
        from ct2mr.preprocessing.masks import body_mask

        report("postprocess", 0.5, f"Harmonising the synthetic MR ({harmonizer.method})")
        x = sitk.GetArrayViewFromImage(ct).astype(np.float32)
        mask = body_mask(x, "ct", normalised=False)
        synthetic_mr = harmonizer.apply(synthetic_mr, mask)
        harmonization = harmonizer.to_dict()
    timings["postprocess"] = time.perf_counter() - t
    report("postprocess", 1.0, "Done")
    info = {"device": run["device"], "precision": run["precision"], "roi_size": run["roi_size"],
            "overlap": settings.overlap, "sw_batch_size": run["sw_batch_size"], "stitch_device": run["stitch_device"],
            "fast": run["fast"], "memory_plan": run["memory_plan"], "gpu_peak_mib": run.get("gpu_peak_mib"),
            "seconds": timings,
            "network_grid_zyx": network_grid, "preprocessing": record.to_dict(),
            "mean_error_hu": mean_error, "harmonization": harmonization}
    return TranslationResult(synthetic_mr, roundtrip_ct, error_map, info, network_outputs)


OUTPUT_NAMES = {"synthetic_mr": "synthetic_mr.nii.gz", "roundtrip_ct": "roundtrip_ct.nii.gz",
                "error_map": "error_map.nii.gz"}


class TranslationExtension(Protocol):
    """A further step of :func:`translate_file` whose files join the same all-or-nothing write (issue 16).

    Implemented by :class:`ct2mr.inference.uncertainty.UncertaintyOutput` (uncertainty map) and
    :class:`ct2mr.inference.ood.OodCheck` (OOD score).

    Attributes:
        key: its entry in the translation's ``info``.
        names: the files it writes (refused like the others without ``overwrite``).
    """

    key: str
    names: Sequence[str]

    def before(self, image: sitk.Image, checkpoint: Checkpoint, preprocessed: Any,
               progress: ProgressCallback | None) -> None:
        """Called after the checks and the preprocessing, before the networks run."""

    def after(self, image: sitk.Image, checkpoint: Checkpoint, preprocessed: Any, result: TranslationResult,
              progress: ProgressCallback | None) -> tuple[Any, dict[str, Any]]:
        """Called after the translation: ``(info, {file name: sitk.Image or JSON value})``."""


def translate_file(input_path: str | Path, out_dir: str | Path, model: str | Path | None = None,
                   settings: InferenceSettings | None = None, progress: ProgressCallback | None = None,
                   harmonize: str = "none", reference_mr: str | Path | Sequence[str | Path] | None = None,
                   checkpoint: Checkpoint | None = None, image: sitk.Image | None = None, preprocessed: Any = None,
                   harmonizer: Any = None, warp_check: bool = False, overwrite: bool = True,
                   force: bool = False, extensions: Sequence[TranslationExtension] = ()) -> dict[str, Any]:
    """Translate a CT file or DICOM folder and write the three outputs, all or nothing.

    Checks before the work (:mod:`ct2mr.checks`), in this order, each failing in seconds with one message: the
    output folder is created and a probe file written into it; with ``overwrite=False`` a folder that already holds
    outputs is refused; the CT is read and checked (spacing 0.1-20 mm, NaN/inf voxels replaced by -1024 HU, the HU
    plausibility of :func:`ct2mr.checks.check_input_image`); the model is loaded (every tensor checked); the network
    grid, the estimated memory and the free disk space are checked (:func:`ct2mr.checks.check_translation_resources`).
    The outputs are then written by :func:`write_outputs` (verified, all or nothing), so a failure leaves no partial
    output (and an ``out_dir`` this call created is removed again when empty).

    Args:
        input_path: the CT (NIfTI, NRRD, MHA, HDF5 or a DICOM series folder), HU.
        out_dir: output folder (created when missing); receives :data:`OUTPUT_NAMES`.
        model: a ct2mr checkpoint; ``None`` uses the bundled default model.
        settings: inference settings.
        progress: ``callback(stage, fraction_of_stage, message)``; the stage ``write`` is added here.
        harmonize: post-hoc harmonisation of the synthetic MR (thesis 7.6; :mod:`ct2mr.inference.harmonization`):
            ``"none"`` (default), ``"histogram"`` (quantile mapping), ``"nyul"`` (Nyul landmarks) or ``"zscore"``
            (median/MAD in the CT's body mask; without a reference: robust z-scores, no longer in [-1, 1]).
        reference_mr: reference MR file(s) or folder(s) for ``harmonize``; they go through the model's MR
            preprocessing, so the harmonised synthetic MR is in the same normalised intensity, in [-1, 1].
        checkpoint: an already loaded checkpoint, used instead of loading ``model`` (batch mode keeps one loaded,
            with G and F on the device, across volumes: :mod:`ct2mr.inference.batch`).
        image: the CT already read from ``input_path`` and checked (``None``: read and check it here).
        preprocessed: ``preprocess(image, "ct", checkpoint.preprocessing)`` already computed (``None``: here).
        harmonizer: an already fitted harmonizer (:func:`fit_harmonizer_for`), used instead of fitting one from
            ``harmonize`` and ``reference_mr``.
        warp_check: also run the anatomy checks (:func:`ct2mr.evaluation.anatomy.translation_anatomy`: edge correlation, GMS,
            NMI, a B-spline registration of G(x) onto x) and write ``displacement_mm.nii.gz`` (float32, mm, on the
            input's grid) and ``anatomy.json`` with the other outputs; the metrics go to ``info["anatomy"]``.
        overwrite: replace outputs already in ``out_dir`` (``False``: refuse such a folder before any work; the
            single-file ``ct2mr translate`` without ``--overwrite``).
        force: translate a CT that fails the HU plausibility check (an MR, a constant volume), with a warning.
        extensions: further steps (:class:`TranslationExtension`) whose files join the same write; with any, the CT
            is preprocessed here once and the network-grid G(x) is kept for them.

    Returns:
        ``{"outputs": {key: path}, "info": {...}}``; ``info["checks"]`` holds the input report and the resource
        estimates.

    Raises:
        FileNotFoundError, ct2mr.io.images.ImageReadError, ct2mr.models.checkpoint.CheckpointError, ValueError, RuntimeError:
            bad input, checkpoint or settings, or out of memory; nothing is written then.
        FileExistsError: ``overwrite=False`` and ``out_dir`` already holds outputs.
        ct2mr.checks.InputCheckError: the input is refused (spacing, not a CT, too thin).
        ct2mr.checks.OutputCheckError: ``out_dir`` cannot be created or written.
        ct2mr.checks.ResourceCheckError: not enough memory or disk space for this CT.
        ct2mr.io.images.OutputWriteError: an output could not be written completely (nothing left under its name).
    """
    from ct2mr.checks import prepare_output_dir

    input_path, out_dir, extensions = Path(input_path), Path(out_dir), list(extensions or ())
    names = _output_names(input_path, out_dir, warp_check, extensions)
    settings = settings or InferenceSettings()
    _check_harmonize(harmonize)
    created = prepare_output_dir(out_dir, "output folder (-o)")
    try:
        if not overwrite:
            _refuse_existing_outputs(out_dir, names)
        image, report, checkpoint, resources = _checked_inputs(input_path, out_dir, image, checkpoint, model,
                                                               settings, force, warp_check, extensions)
        if harmonizer is None:
            harmonizer = fit_harmonizer_for(harmonize, reference_mr, checkpoint)
        result, extra = _translate_with_extras(image, checkpoint, settings, progress, harmonizer, preprocessed,
                                               warp_check, extensions)
        finals = write_outputs(result, out_dir, progress, extra)
    except BaseException:
        if created and out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()
        raise
    info = {**result.info, "checks": {"input": report.to_dict() if report else None, **resources},
            "input": str(input_path), "model": str(checkpoint.path), "model_name": checkpoint.name,
            "model_sha256": checkpoint.sha256}
    return {"outputs": {key: str(path) for key, path in finals.items()}, "info": info}


def _output_names(input_path: Path, out_dir: Path, warp_check: bool, extensions: Sequence[TranslationExtension]
                  ) -> list[str]:
    """The file names :func:`translate_file` writes; a ``ValueError`` when one of them is the input."""
    from ct2mr.evaluation.anatomy import ANATOMY_NAME, DISPLACEMENT_NAME

    names = list(OUTPUT_NAMES.values()) + ([DISPLACEMENT_NAME, ANATOMY_NAME] if warp_check else [])
    names += [name for ext in extensions for name in ext.names]  # issue 16: uncertainty map, OOD score
    resolved_input = input_path.resolve()
    if any((out_dir / name).resolve() == resolved_input for name in names):
        raise ValueError(f"The output folder {out_dir} would overwrite the input {input_path}; choose another -o.")
    return names


def _check_harmonize(harmonize: str) -> None:
    """A ``ValueError`` for a ``harmonize`` that is not one of the harmonisation methods."""
    from ct2mr.inference.harmonization import HARMONIZATION_METHODS

    if harmonize not in HARMONIZATION_METHODS:
        raise ValueError(f"harmonize must be one of {HARMONIZATION_METHODS}, got {harmonize!r}.")


def _refuse_existing_outputs(out_dir: Path, names: Sequence[str]) -> None:
    """A ``FileExistsError`` when ``out_dir`` already holds one of ``names`` (``translate`` without --overwrite)."""
    from ct2mr.checks import existing_outputs

    existing = existing_outputs(out_dir, names)
    if existing:
        raise FileExistsError(f"The output folder {out_dir} already holds "
                              f"{', '.join(p.name for p in existing)}; pass --overwrite to replace them, or "
                              "choose another -o.")


def _checked_inputs(input_path: Path, out_dir: Path, image: sitk.Image | None, checkpoint: Checkpoint | None,
                    model: str | Path | None, settings: InferenceSettings, force: bool, warp_check: bool,
                    extensions: Sequence[TranslationExtension]) -> tuple[sitk.Image, Any, Checkpoint, dict]:
    """Read and check the CT, load the model, check memory and disk: ``(image, input report, checkpoint, resources)``.

    The input report is ``None`` when ``image`` was given (checked by the caller).
    """
    from ct2mr.checks import check_input_image, check_translation_resources
    from ct2mr.io.images import read_image
    from ct2mr.models.checkpoint import load_checkpoint

    report = None
    if image is None:
        image, report = check_input_image(read_image(input_path), "ct", str(input_path), force)
    checkpoint = load_checkpoint(model) if checkpoint is None else checkpoint
    prep = checkpoint.preprocessing
    roi = settings.roi_size or tuple(checkpoint.inference.get("roi_size") or DEFAULT_ROI)
    width = int((checkpoint.architecture.get("generator") or {}).get("base_channels", 64))
    volumes = len(OUTPUT_NAMES) + (1 if warp_check else 0) + sum(
        1 for ext in extensions for name in ext.names if name.endswith((".nii.gz", ".nii", ".nrrd", ".mha")))
    resources = check_translation_resources(image, prep.target_spacing, prep.k, out_dir, volumes, width, roi,
                                            settings.sw_batch_size, str(input_path), prep.orientation)
    return image, report, checkpoint, resources


def _translate_with_extras(image: sitk.Image, checkpoint: Checkpoint, settings: InferenceSettings,
                           progress: ProgressCallback | None, harmonizer: Any, preprocessed: Any, warp_check: bool,
                           extensions: Sequence[TranslationExtension]
                           ) -> tuple[TranslationResult, dict[str, Any] | None]:
    """Translate, with the anatomy checks and the extensions around it: ``(result, extra files or None)``."""
    prep_seconds = 0.0
    if extensions and preprocessed is None:  # issue 16: one preprocessing shared with the extensions
        t0 = time.perf_counter()
        (progress or (lambda *a: None))("preprocess", 0.0, "Reorienting, resampling to 1 mm and normalising the CT")
        preprocessed = preprocess(image, "ct", checkpoint.preprocessing)
        prep_seconds = time.perf_counter() - t0
    for ext in extensions:
        ext.before(image, checkpoint, preprocessed, progress)
    result = translate_image(image, checkpoint, settings, progress, harmonizer, preprocessed=preprocessed,
                             keep_network=bool(extensions))
    result.info["seconds"]["preprocess"] = result.info["seconds"].get("preprocess", 0.0) + prep_seconds
    extra = None
    if warp_check:  # anatomy checks (thesis 5, P1/E2): two more files in the same all-or-nothing write
        from ct2mr.evaluation.anatomy import translation_anatomy

        result.info["anatomy"], extra = translation_anatomy(image, result.synthetic_mr, progress)
    for ext in extensions:
        result.info[ext.key], files = ext.after(image, checkpoint, preprocessed, result, progress)
        extra = {**(extra or {}), **files}
    result.network_outputs.clear()
    return result, extra


def fit_harmonizer_for(harmonize: str, reference_mr: str | Path | Sequence[str | Path] | None,
                       checkpoint: Checkpoint) -> Any:
    """The harmonizer ``translate_file`` applies for ``--harmonize`` / ``--reference-mr`` (thesis 7.6).

    Args:
        harmonize: one of :data:`ct2mr.inference.harmonization.HARMONIZATION_METHODS`.
        reference_mr: reference MR file(s) or folder(s), read through ``checkpoint``'s MR preprocessing.
        checkpoint: the loaded checkpoint (its preprocessing parameters).

    Returns:
        A fitted :class:`ct2mr.inference.harmonization.Harmonizer`, or ``None`` for ``"none"`` without references.

    Raises:
        ValueError, FileNotFoundError, ct2mr.io.images.ImageReadError: an unknown method or unreadable references.
    """
    if harmonize == "none" and not reference_mr:
        return None
    from ct2mr.inference.harmonization import fit_harmonizer, load_reference_mrs

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

    Every file goes to a temporary name in ``out_dir`` first and is fsynced and read back
    (:func:`ct2mr.io.images.atomic_writes`); only when all are complete are they renamed to their final names. On any error
    or interruption the temporary files are removed, and an ``out_dir`` this call created is removed again when it
    stayed empty.

    Args:
        result: the translation (:data:`OUTPUT_NAMES` files: synthetic MR, round-trip CT, error map, NIfTI gzip).
        out_dir: output folder, created when missing.
        progress: ``callback(stage, fraction_of_stage, message)`` with stage ``"write"``.
        extra: more files of the same all-or-nothing step, ``{file name: sitk.Image (written as an image) or a
            JSON-serialisable value}``; their keys in the returned mapping are the names without suffix.

    Returns:
        ``{key: final path}`` for :data:`OUTPUT_NAMES` and ``extra``.

    Raises:
        ct2mr.io.images.OutputWriteError: the folder or a file cannot be written completely (a full disk, a file-size limit,
            a read-only folder), naming the folder and its free space; nothing is left behind then.
    """
    from ct2mr.io.images import atomic_writes, image_suffix

    out_dir = Path(out_dir)
    report = progress or (lambda stage, fraction, message: None)
    items = [(key, out_dir / name, getattr(result, key)) for key, name in OUTPUT_NAMES.items()]
    items += [(name[: -len(image_suffix(name))] if image_suffix(name) else name, out_dir / name, value)
              for name, value in (extra or {}).items()]
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_writes([final for _, final, _ in items]) as temps:
            for i, ((key, final, value), tmp) in enumerate(zip(items, temps)):
                report("write", i / len(items), f"Writing {final.name}")
                if isinstance(value, sitk.Image):
                    sitk.WriteImage(value, str(tmp), True)
                else:
                    tmp.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")
        report("write", 1.0, f"Wrote {out_dir}")
    except BaseException:
        if created and out_dir.exists() and not any(out_dir.iterdir()):
            out_dir.rmdir()
        raise
    return {key: final for key, final, _ in items}
