"""Uncertainty map of the synthetic MR: the spread of G(x) under test-time augmentation or over an ensemble (issue 16).

A synthetic MR is a guess; where the generator's answer changes when nothing about the anatomy changes, the guess is
weak. ``ct2mr translate --uncertainty tta|ensemble`` writes ``uncertainty.nii.gz``: the voxel-wise standard deviation
of M predictions of G(x), on the CT's exact grid, in the synthetic MR's own normalised units ([-1, 1] scale, so a
value of 0.1 is 5 % of the full MR range).

* ``tta`` (test-time augmentation; Wang et al. 2019, *Aleatoric uncertainty estimation with test-time augmentation
  for medical image segmentation*, Neurocomputing 338): the predictions are G(x) itself and G on ``N`` transformed
  copies of the network-grid CT (:func:`tta_augmentations`), each transformed back before aggregation. The transforms
  are those a 3D CycleGAN generator is *not* invariant to: flips along the left-right, anterior-posterior and
  superior-inferior axes (the networks see mirrored anatomy) combined with an integer shift of 1-``max_shift`` voxels
  (mm) per axis, which is not a multiple of the generators' stride (4 for the ResNets, 16 for U-Net++), so that the
  down-sampling phase and the sliding-window tiling move against the anatomy. A shift pads the volume at its start
  with its edge values (``numpy.pad`` mode ``"edge"``, as the sliding window's ``"replicate"`` padding) and is undone
  by cropping; flips are undone by flipping back. Both are exact on the voxel grid (no interpolation).
* ``ensemble`` (Lakshminarayanan et al. 2017, *Simple and scalable predictive uncertainty estimation using deep
  ensembles*, NeurIPS): the predictions are G(x) of every checkpoint given (``--model A --model B ...``), which must
  share the preprocessing parameters (the same network-grid input).

Aggregation: the population standard deviation (ddof 0) over the M = N + 1 (tta) or M = number of models (ensemble)
predictions, per voxel of the 1 mm network grid, accumulated with Welford's algorithm (two float32 buffers, whatever
M), then put back onto the input grid with the same trilinear resampling as the synthetic MR
(:func:`ct2mr.preprocessing.pipeline.restore_to_input_grid`; voxels outside the network grid get 0). The first prediction is
the G(x) that ``translate`` already computed, so the **cost is N extra passes of G** (tta) or one G pass per extra
model (ensemble); F is not run again. Post-hoc harmonisation (``--harmonize``) is not applied to the predictions:
the map is in the unharmonised units. On a GPU the passes run in bf16/fp16 autocast by default, whose rounding
(the fast path is within 0.005 mean of fp32, README "Speed and memory") adds a floor to the spread;
``--precision fp32`` removes it.

What it cannot tell: a high spread marks where G is unstable, not where it is wrong; a generator that is
consistently wrong (the same error under every flip and shift, or in every member of an ensemble trained on the same
data) has a low spread there. Whether high uncertainty marks high error is measured on the known-mapping benchmark
(issue 16's calibration step), not assumed.

Arrays are NumPy (z, y, x).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

__all__ = [
    "UNCERTAINTY_MODES",
    "UNCERTAINTY_NAME",
    "DEFAULT_TTA_PASSES",
    "DEFAULT_MAX_SHIFT",
    "Augmentation",
    "tta_augmentations",
    "RunningStd",
    "tta_std",
    "ensemble_std",
    "uncertainty_summary",
    "UncertaintyOutput",
    "stage_weights",
    "describe",
]

#: ``--uncertainty`` choices.
UNCERTAINTY_MODES = ("none", "tta", "ensemble")
#: Output file name.
UNCERTAINTY_NAME = "uncertainty.nii.gz"
#: Default number of augmented passes of ``tta`` (each costs one more pass of G).
DEFAULT_TTA_PASSES = 4
#: Largest shift per axis, voxels (mm on the 1 mm network grid).
DEFAULT_MAX_SHIFT = 3
#: Flip sets cycled through by :func:`tta_augmentations`: array axes (0 = z / S, 1 = y / A, 2 = x / R).
_FLIPS = ((2,), (1,), (0,), (1, 2), (0, 2), (0, 1), (0, 1, 2))

Progress = Callable[[str, float, str], None]


@dataclass(frozen=True)
class Augmentation:
    """One test-time transform of a (z, y, x) volume: flip some axes, then shift by padding at the start.

    Attributes:
        flip: array axes to flip (0 = z, 1 = y, 2 = x); ``()`` for none.
        shift: voxels of edge padding added before the volume per axis (z, y, x), each >= 0: the content moves by
            that many voxels against the sliding-window tiling and the networks' stride.
    """

    flip: tuple[int, ...] = ()
    shift: tuple[int, int, int] = (0, 0, 0)

    def apply(self, volume: np.ndarray) -> np.ndarray:
        """The transformed copy of a (z, y, x) volume (shape grows by ``shift``)."""
        out = np.flip(volume, self.flip) if self.flip else volume
        if any(self.shift):
            out = np.pad(out, [(int(s), 0) for s in self.shift], mode="edge")
        return np.ascontiguousarray(out, dtype=np.float32)

    def undo(self, volume: np.ndarray) -> np.ndarray:
        """Map a prediction on the transformed grid back onto the original (z, y, x) grid (exact inverse)."""
        out = volume[tuple(slice(int(s), None) for s in self.shift)]
        return np.flip(out, self.flip) if self.flip else out

    def describe(self) -> str:
        """E.g. ``"flip x, shift (2, 1, 3)"`` (z, y, x voxels)."""
        axes = ",".join("zyx"[a] for a in self.flip)
        return f"flip {axes or 'none'}, shift {tuple(int(s) for s in self.shift)}"


def tta_augmentations(n: int = DEFAULT_TTA_PASSES, max_shift: int = DEFAULT_MAX_SHIFT, seed: int = 0
                      ) -> list[Augmentation]:
    """The ``n`` deterministic test-time transforms of ``tta``.

    Pass ``i`` flips the axes of ``_FLIPS[i mod 7]`` (x, then y, then z, then pairs, then all three) and shifts by
    integers drawn from ``numpy.random.default_rng(seed)`` uniformly in ``1..max_shift`` per axis (never 0, and with
    ``max_shift <= 3`` never a multiple of the generators' stride 4).

    Args:
        n: number of augmented passes, >= 1.
        max_shift: largest shift per axis in voxels, >= 1 (0: flips only).
        seed: seed of the shifts.

    Returns:
        ``n`` :class:`Augmentation` objects.

    Raises:
        ValueError: ``n < 1`` or ``max_shift < 0``.
    """
    if int(n) < 1:
        raise ValueError(f"The number of test-time augmentation passes must be >= 1, got {n}.")
    if int(max_shift) < 0:
        raise ValueError(f"max_shift must be >= 0 voxels, got {max_shift}.")
    rng = np.random.default_rng(seed)
    out = []
    for i in range(int(n)):
        shift = tuple(int(v) for v in rng.integers(1, max_shift + 1, size=3)) if max_shift else (0, 0, 0)
        out.append(Augmentation(_FLIPS[i % len(_FLIPS)], shift))
    return out


class RunningStd:
    """Voxel-wise mean and population standard deviation of a stream of equal-shape arrays (Welford 1962).

    Two float32 buffers whatever the number of arrays; ``add`` updates ``mean`` and ``M2`` in place.
    """

    def __init__(self) -> None:
        self.count = 0
        self.mean: np.ndarray | None = None
        self._m2: np.ndarray | None = None

    def add(self, value: np.ndarray) -> None:
        """Add one (z, y, x) array.

        Raises:
            ValueError: a shape different from the first array's.
        """
        value = np.asarray(value, dtype=np.float32)
        if self.mean is None:
            self.mean, self._m2 = value.copy(), np.zeros_like(value)
            self.count = 1
            return
        if value.shape != self.mean.shape:
            raise ValueError(f"RunningStd: shape {value.shape} differs from {self.mean.shape}.")
        self.count += 1
        delta = value - self.mean
        self.mean += delta / self.count
        self._m2 += delta * (value - self.mean)

    def std(self) -> np.ndarray:
        """The population standard deviation (ddof 0), float32, same shape; zeros after one array.

        Raises:
            ValueError: nothing was added.
        """
        if self._m2 is None:
            raise ValueError("RunningStd: no array was added.")
        return np.sqrt(np.maximum(self._m2 / self.count, 0.0)).astype(np.float32)


def _g_pass(volume: np.ndarray, checkpoint: Any, settings: Any, progress: Callable[[float], None]) -> np.ndarray:
    from ct2mr.inference.translate import translate_volume

    fake, _, _ = translate_volume(volume, checkpoint, "ct2mr", settings,
                                  lambda stage, fraction, message: progress(fraction), roundtrip=False)
    return fake


def tta_std(volume: np.ndarray, checkpoint: Any, settings: Any = None, n: int = DEFAULT_TTA_PASSES,
            max_shift: int = DEFAULT_MAX_SHIFT, seed: int = 0, base: np.ndarray | None = None,
            progress: Progress | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """Voxel-wise standard deviation of G(x) under test-time augmentation, on the network grid.

    Args:
        volume: (z, y, x) float32 preprocessed CT in [-1, 1] (:func:`ct2mr.preprocessing.pipeline.preprocess`).
        checkpoint: the loaded :class:`ct2mr.models.checkpoint.Checkpoint` (its G).
        settings: :class:`ct2mr.inference.translate.InferenceSettings` of the sliding window (``None``: defaults).
        n: augmented passes (the cost: ``n`` extra passes of G).
        max_shift: largest shift per axis (voxels).
        seed: seed of the shifts (:func:`tta_augmentations`).
        base: G(x) on the same grid when already computed (``translate`` passes its own); ``None``: one more pass.
        progress: ``callback("uncertainty", fraction, message)``.

    Returns:
        ``(std, info)``: float32 (z, y, x) in normalised MR units (>= 0), and ``{"mode": "tta", "extra_passes",
        "predictions", "transforms", "seconds", "cost"}``.

    Raises:
        ValueError: ``n < 1``, a non-3D volume or a ``base`` of another shape.
        RuntimeError: out of memory (see :func:`ct2mr.inference.translate.translate_volume`).
    """
    volume = np.asarray(volume, dtype=np.float32)
    if volume.ndim != 3:
        raise ValueError(f"tta_std needs a (z, y, x) volume, got shape {volume.shape}.")
    augmentations = tta_augmentations(n, max_shift, seed)
    report = progress or (lambda stage, fraction, message: None)
    started = time.perf_counter()
    running = RunningStd()
    total = len(augmentations) + (1 if base is None else 0)
    done = 0
    if base is None:
        base = _g_pass(volume, checkpoint, settings, lambda f: report("uncertainty", f / total, "G(x)"))
        done = 1
    if np.shape(base) != volume.shape:
        raise ValueError(f"base G(x) has shape {np.shape(base)}, the volume {volume.shape}.")
    running.add(base)
    for i, aug in enumerate(augmentations):
        message = f"Uncertainty (TTA): pass {i + 1} of {len(augmentations)} ({aug.describe()})"
        prediction = _g_pass(aug.apply(volume), checkpoint, settings,
                             lambda f, k=done + i, m=message: report("uncertainty", (k + f) / total, m))
        running.add(aug.undo(prediction))
        del prediction
    seconds = time.perf_counter() - started
    info = {"mode": "tta", "extra_passes": len(augmentations), "predictions": running.count,
            "transforms": ["identity"] + [a.describe() for a in augmentations], "max_shift_voxels": int(max_shift),
            "seed": int(seed), "seconds": round(seconds, 3),
            "cost": f"{len(augmentations)} extra passes of G ({seconds:.1f} s)"}
    report("uncertainty", 1.0, f"Uncertainty (TTA): {len(augmentations)} extra passes in {seconds:.1f} s")
    return running.std(), info


def _same_preprocessing(checkpoints: Sequence[Any]) -> None:
    first = checkpoints[0].preprocessing.to_dict()
    for other in checkpoints[1:]:
        theirs = other.preprocessing.to_dict()
        changed = sorted(k for k in set(first) | set(theirs) if first.get(k) != theirs.get(k))
        if changed:
            raise ValueError(f"Ensemble members must share the preprocessing; {other.name} differs from "
                             f"{checkpoints[0].name} in {', '.join(changed)}.")


def ensemble_std(volume: np.ndarray, checkpoints: Sequence[Any], settings: Any = None,
                 base: np.ndarray | None = None, progress: Progress | None = None
                 ) -> tuple[np.ndarray, dict[str, Any]]:
    """Voxel-wise standard deviation of G(x) over several checkpoints, on the network grid.

    Args:
        volume: (z, y, x) float32 preprocessed CT in [-1, 1] (with the members' shared preprocessing).
        checkpoints: two or more loaded checkpoints; the first is the one whose G(x) is ``base``.
        settings: inference settings.
        base: G(x) of ``checkpoints[0]`` when already computed; ``None``: computed here.
        progress: ``callback("uncertainty", fraction, message)``.

    Returns:
        ``(std, info)`` as :func:`tta_std`, with ``info["models"]`` (name and SHA-256 of each member).

    Raises:
        ValueError: fewer than two checkpoints, members with different preprocessing, a non-3D volume.
    """
    volume = np.asarray(volume, dtype=np.float32)
    if volume.ndim != 3:
        raise ValueError(f"ensemble_std needs a (z, y, x) volume, got shape {volume.shape}.")
    if len(checkpoints) < 2:
        raise ValueError("--uncertainty ensemble needs at least two models (--model A --model B ...).")
    _same_preprocessing(checkpoints)
    report = progress or (lambda stage, fraction, message: None)
    started = time.perf_counter()
    running = RunningStd()
    members = list(checkpoints) if base is None else list(checkpoints[1:])
    if base is not None:
        running.add(base)
    for i, member in enumerate(members):
        message = f"Uncertainty (ensemble): {member.name} ({i + 1} of {len(members)})"
        running.add(_g_pass(volume, member, settings,
                            lambda f, k=i, m=message: report("uncertainty", (k + f) / len(members), m)))
    seconds = time.perf_counter() - started
    extra = len(checkpoints) - 1 if base is not None else len(checkpoints)
    info = {"mode": "ensemble", "extra_passes": extra, "predictions": running.count,
            "models": [{"name": c.name, "sha256": c.sha256} for c in checkpoints], "seconds": round(seconds, 3),
            "cost": f"{extra} extra passes of G, one per further model ({seconds:.1f} s)"}
    report("uncertainty", 1.0, f"Uncertainty (ensemble): {extra} extra passes in {seconds:.1f} s")
    return running.std(), info


def uncertainty_summary(std: np.ndarray, mask: np.ndarray | None = None) -> dict[str, float]:
    """Mean, median, 95th percentile and maximum of an uncertainty map, inside ``mask``.

    Args:
        std: (z, y, x) uncertainty (normalised MR units).
        mask: boolean (z, y, x) mask of the same shape (e.g. the body mask); ``None``: all voxels.

    Returns:
        ``{"mean", "p50", "p95", "max"}`` rounded to 5 decimals; all 0 for an empty mask.
    """
    values = np.asarray(std)[np.asarray(mask, bool)] if mask is not None else np.asarray(std).ravel()
    if values.size == 0:
        return {"mean": 0.0, "p50": 0.0, "p95": 0.0, "max": 0.0}
    p50, p95 = np.percentile(values, [50, 95])
    return {"mean": round(float(values.mean(dtype=np.float64)), 5), "p50": round(float(p50), 5),
            "p95": round(float(p95), 5), "max": round(float(values.max()), 5)}


def stage_weights(extra_passes: int) -> dict[str, float]:
    """Progress weights of a translation with ``extra_passes`` more G passes (for :func:`ct2mr.progress.make_reporter`).

    G and F count 0.4 each of a plain translation (:data:`ct2mr.progress.STAGE_WEIGHTS`); each extra pass of G
    another 0.4; the weights are then scaled to sum to 1.
    """
    from ct2mr.progress import STAGE_WEIGHTS

    weights = dict(STAGE_WEIGHTS)
    write = weights.pop("write")
    weights["uncertainty"] = STAGE_WEIGHTS["G"] * max(0, int(extra_passes))
    weights["write"] = write
    total = sum(weights.values())
    return {k: v / total for k, v in weights.items()}


class UncertaintyOutput:
    """The ``--uncertainty`` step of :func:`ct2mr.inference.translate.translate_file` (its ``extensions``).

    After the translation, computes the spread of G(x) (:func:`tta_std` or :func:`ensemble_std`) from the
    network-grid G(x) the translation kept, and returns ``uncertainty.nii.gz`` on the input's grid to the same
    all-or-nothing write as the other outputs.

    Args:
        mode: ``"tta"`` or ``"ensemble"``.
        passes: augmented passes of ``tta``.
        members: further loaded checkpoints of ``ensemble`` (the translating checkpoint is the first member).
        settings: inference settings of the passes.
        max_shift, seed: of :func:`tta_augmentations`.

    Raises:
        ValueError: an unknown mode, ``ensemble`` without members, ``tta`` with ``passes < 1``.
    """

    key = "uncertainty"
    names = (UNCERTAINTY_NAME,)

    def __init__(self, mode: str, passes: int = DEFAULT_TTA_PASSES, members: Sequence[Any] = (), settings: Any = None,
                 max_shift: int = DEFAULT_MAX_SHIFT, seed: int = 0) -> None:
        if mode not in ("tta", "ensemble"):
            raise ValueError(f"uncertainty must be 'tta' or 'ensemble', got {mode!r}.")
        if mode == "ensemble" and not members:
            raise ValueError("--uncertainty ensemble needs at least two models: give --model more than once.")
        if mode == "tta":
            tta_augmentations(passes, max_shift, seed)  # validates n and max_shift now, before any work
        self.mode, self.passes, self.members, self.settings = mode, int(passes), list(members), settings
        self.max_shift, self.seed = int(max_shift), int(seed)

    @property
    def extra_passes(self) -> int:
        """Extra passes of G this step costs."""
        return self.passes if self.mode == "tta" else len(self.members)

    def before(self, image: Any, checkpoint: Any, preprocessed: Any, progress: Progress | None) -> None:
        """Check the ensemble members against the translating checkpoint before any pass (nothing for tta)."""
        if self.mode == "ensemble":
            _same_preprocessing([checkpoint, *self.members])

    def after(self, image: Any, checkpoint: Any, preprocessed: Any, result: Any, progress: Progress | None
              ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Compute the map; returns ``(info, {UNCERTAINTY_NAME: sitk.Image on the input grid})``."""
        from ct2mr.preprocessing.masks import evaluation_mask
        from ct2mr.preprocessing.pipeline import restore_to_input_grid

        base = result.network_outputs.get("synthetic_mr")
        if self.mode == "tta":
            std, info = tta_std(preprocessed.array, checkpoint, self.settings, self.passes, self.max_shift,
                                self.seed, base, progress)
        else:
            std, info = ensemble_std(preprocessed.array, [checkpoint, *self.members], self.settings, base, progress)
        mask = evaluation_mask(preprocessed.array, "ct", preprocessed.record)
        info["body"] = uncertainty_summary(std, mask)
        info["units"] = "standard deviation of G(x), normalised MR units ([-1, 1] scale), unharmonised"
        image = restore_to_input_grid(std, preprocessed.record, default_value=0.0)
        del std
        return info, {UNCERTAINTY_NAME: image}


def describe(info: Mapping[str, Any]) -> str:
    """One line for people: mode, cost and the map's mean and p95 inside the body."""
    body = info.get("body") or {}
    return (f"Uncertainty ({info['mode']}, {info['predictions']} predictions, cost {info['cost']}): mean "
            f"{body.get('mean', float('nan')):.4f}, p95 {body.get('p95', float('nan')):.4f} in the body "
            "(std of G(x), normalised MR units)")
