"""Unpaired estimation of a per-voxel intensity law between two modalities (CT -> MR and MR -> CT).

Why: a CycleGAN starts from a generator that is close to the identity, and CT -> UTE MR is not monotone in HU (fat,
at -100 HU, is the brightest tissue of a UTE image; cortical bone, the brightest of a CT, is faint). Gradient descent
on the adversarial, cycle and structure losses has to carry fat across the intensity of muscle to get there, and
every one of those losses has a barrier where the fat/muscle contrast passes through zero; on the known-mapping
benchmark (``benchmarks/known_mapping.py``) no recipe crossed it in an hour of CPU training (issue 13). This module
estimates the law *before* the GAN, by a global search that has no such barrier, and the trainer starts the
generators' intensity curve from it (``model.law.enabled``; the ``law`` preset).

Method (ours, written for this project; the ingredients are standard):

- The law is a piecewise-linear curve ``f`` with ``K`` knots evenly spaced on the source's normalised [-1, 1]
  scale; for a source volume ``x``, ``f(x) = sum_k v_k phi_k(x)`` with hat functions ``phi_k``.
- Features of a voxel: ``f(x)`` itself, its Gaussian blurs at a few scales (default 3, 8 and 20 mm) and the gradient
  magnitude of ``f(x)`` blurred at 1.5 mm. The same features of the target modality's volumes ``y``. Blur and
  gradient are linear, so each feature is linear in the knot values ``v`` (the gradient magnitude is the norm of a
  linear vector): the blurred hat maps are computed once, and a candidate law costs one matrix product.
- The distance between the two sets of feature vectors (voxels sampled inside the body masks) is the sliced
  Wasserstein distance (Rabin et al., SSVM 2011; Bonneel et al., JMIV 2015): the mean squared difference of sorted
  1D projections on random directions. Matching the joint distribution of a voxel and its surroundings, not only
  the 1D histogram, is what separates the laws that a histogram cannot: a monotone law reproduces the MR histogram
  as well as the true one, but not where bright voxels sit (fat under the skin, not in bone).
- The law's output is degraded before its features are compared, as an acquisition degrades the target: a
  smooth multiplicative field (a receive bias; sigma 30 mm) and white noise, their two amplitudes fitted with the
  law (``degradation``). A bare law has neither, and without them the law closest to a biased, noisy MR is a
  distorted one, not the conditional mean E[MR | CT]: on the benchmark the simulator's own law was 4x farther from
  its MRs than the fitted law, and the fit made cortical bone (500-800 HU) brighter than muscle (see below).
- For an MR target the features are compared as :func:`relative_features` (``relative``, the default): the
  log-ratio of each blur to the widest one, the widest blur itself, the gradient over the widest blur. A smooth
  receive bias multiplies a voxel and its surroundings alike and cancels in these ratios; in the raw features it
  spreads every tissue's intensity, and the fit bent the law to make up that spread (fifth session: the law alone
  SSIM 0.67 -> 0.73 on the benchmark's held-out case).
- ``v`` is optimised with Adam plus a small second-difference smoothness penalty, from the identity curve and from
  many smooth random curves (restarts), by successive halving: every start gets a short screen and the best few
  the full optimisation; the curve with the lowest distance wins. The random starts are the global part.
- The wide blurs (8 and 20 mm) are computed on a coarser grid (:func:`blurred_at`), so the features of 81 knots
  cost less than those of 41 did on the full grid.

Measured on the known-mapping benchmark (benchmarks/RESULTS.md), second session: the laws alone (the ``law``
preset's step-0 snapshot) scored SSIM 0.49 / MAE 0.17 on the held-out case before any GAN step, against
0.08-0.12 / 0.41-0.51 for the SC and M1 recipes after 30 minutes; with 16 random starts instead of 32, 0.36; with
the intensity and its blurs alone (no gradient feature) the identity start wins, i.e. a monotone law, at 0.13.
Fourth session (81 knots, coarse-grid blurs, fitted degradation; the fit alone applied to the held-out CT): 41
knots 0.60 / 0.133, 81 knots 0.63 / 0.121, with the degradation 0.67 / 0.114 (the paired lookup: 0.79 / 0.091);
through the trainer (``ct2mr translate`` of the step-0 snapshot), 81 knots without the degradation 0.67 / 0.114,
with it 0.70 / 0.106. Fifth session (``relative`` features): the fit alone 0.735 / 0.099; through the trainer
0.766 / 0.091 at step 0 (the paired lookup's MAE: 0.091), 0.754 / 0.091 after 40 minutes.
What it cannot do: model effects that are not a function of intensity (blur, bias, susceptibility); the GAN's
ResNet branch is there for those. The distance of the true law is not always the lowest (the benchmark's MR has
blur, bias and noise that no pointwise law reproduces), so the result is a starting point, not an answer.

Arrays are NumPy (z, y, x) in the network's normalised [-1, 1] units, on an isotropic grid of ``voxel_mm``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from scipy import ndimage

__all__ = ["IntensityLaw", "read_intensity_laws", "law_knots", "hat_basis", "blurred_at", "field_features",
           "estimate_noise_sigma", "source_features", "target_features", "relative_features", "fit_intensity_law",
           "inverse_intensity_law"]


#: Sigma (mm) of the smooth random field that stands for a receive bias in the fit (:class:`_SlicedObjective`).
BIAS_SIGMA_MM = 30.0
#: Offset (normalised units, on the ``value + 1`` scale) inside the logarithms of :func:`relative_features`: keeps
#: them bounded where the MR is dark (air, lung), where a receive bias changes little anyway.
RELATIVE_OFFSET = 0.25


def law_knots(count: int) -> np.ndarray:
    """``count`` knots evenly spaced on [-1, 1] (float64, shape (count,)).

    Raises:
        ValueError: fewer than 2 knots.
    """
    if count < 2:
        raise ValueError(f"An intensity law needs at least 2 knots, got {count}.")
    return np.linspace(-1.0, 1.0, int(count))


def hat_basis(volume: np.ndarray, knots: np.ndarray, k: int) -> np.ndarray:
    """The k-th piecewise-linear hat function of ``volume`` (float32, same shape): 1 at ``knots[k]``, 0 at its
    neighbours; values outside [-1, 1] count as the end knots. ``sum_k hat_basis(x, knots, k) == 1``."""
    step = float(knots[1] - knots[0])
    x = np.clip(volume, knots[0], knots[-1])
    return np.clip(1.0 - np.abs(x - knots[k]) / step, 0.0, None).astype(np.float32)


@dataclass
class IntensityLaw:
    """A fitted piecewise-linear intensity law ``f: [-1, 1] -> [-1, 1]`` (normalised units of both modalities).

    Attributes:
        knots: (K,) knot positions on the source scale.
        values: (K,) law values at the knots on the target scale.
        distance: sliced Wasserstein distance of the winning restart (squared normalised units).
        restarts: distance of every start after the screen, the identity start first.
        seconds: wall-clock time of the fit.
        source, target: modality names (``"ct"``, ``"mr"``).
        noise: sigma of the white noise the fit added to the law's output (target units; 0: none).
        bias: amplitude (standard deviation) of the smooth multiplicative bias the fit applied to it (0: none).
    """

    knots: np.ndarray
    values: np.ndarray
    distance: float
    restarts: list[float] = field(default_factory=list)
    seconds: float = 0.0
    source: str = "ct"
    target: str = "mr"
    noise: float = 0.0
    bias: float = 0.0

    def __call__(self, volume: np.ndarray) -> np.ndarray:
        """The law applied voxel by voxel (float32, same shape as ``volume``)."""
        return np.interp(np.clip(volume, -1.0, 1.0), self.knots, self.values).astype(np.float32)

    def to_dict(self) -> dict:
        """JSON-ready record (what the trainer writes as ``intensity_law_<source>_to_<target>.json``)."""
        return {"source": self.source, "target": self.target, "knots": [round(float(v), 5) for v in self.knots],
                "values": [round(float(v), 5) for v in self.values], "distance": self.distance,
                "restarts": self.restarts, "seconds": round(self.seconds, 2), "noise": round(self.noise, 5),
                "bias": round(self.bias, 5)}

    @classmethod
    def from_dict(cls, record: dict) -> "IntensityLaw":
        """The law of a :meth:`to_dict` record (one entry of a run's ``intensity_law.json``).

        Raises:
            ValueError: knots and values missing, of different lengths, not increasing, or outside [-1, 1].
        """
        try:
            knots = np.asarray(record["knots"], np.float64)
            values = np.asarray(record["values"], np.float64)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"An intensity law needs 'knots' and 'values' lists of numbers ({exc}).") from None
        if knots.ndim != 1 or knots.shape != values.shape or len(knots) < 2 or np.any(np.diff(knots) <= 0) \
                or np.abs(knots).max() > 1 + 1e-6 or np.abs(values).max() > 1 + 1e-6:
            raise ValueError("An intensity law needs as many values as knots (>= 2), increasing knots, and both "
                             "within [-1, 1].")
        return cls(knots, values, float(record.get("distance", float("nan"))), list(record.get("restarts", [])),
                   float(record.get("seconds", 0.0)), str(record.get("source", "ct")), str(record.get("target", "mr")),
                   float(record.get("noise", 0.0)), float(record.get("bias", 0.0)))


def read_intensity_laws(path: str | os.PathLike) -> dict[str, IntensityLaw]:
    """The laws of a run's ``intensity_law.json``: ``{"G": CT -> MR law, "F": MR -> CT law}`` (plain JSON, no code).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not JSON, or without valid ``G`` and ``F`` laws.
    """
    import json

    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not JSON ({exc}).") from None
    if not isinstance(document, dict) or not {"G", "F"} <= set(document):
        raise ValueError(f"{path} holds no 'G' and 'F' laws: give the intensity_law.json a law run wrote.")
    return {name: IntensityLaw.from_dict(document[name]) for name in ("G", "F")}


def _subsample(volume: np.ndarray, voxel_mm: float, spacing_mm: float) -> tuple[np.ndarray, float]:
    stride = max(1, int(round(spacing_mm / voxel_mm)))
    return np.ascontiguousarray(volume[::stride, ::stride, ::stride]), voxel_mm * stride


def _body_grids(volumes: Sequence[np.ndarray], modality: str, voxel_mm: float, spacing_mm: float, max_volumes: int,
                ct_window: Sequence[float], caller: str):  # noqa: ANN202 (a generator of tuples)
    """(subsampled volume, its spacing in mm, its body mask) of the first ``max_volumes`` of ``volumes``.

    Raises:
        ValueError: a volume that is not 3D (the message names ``caller``).
    """
    from ct2mr.preprocessing.masks import body_mask

    for volume in list(volumes)[:max_volumes]:
        if volume.ndim != 3:
            raise ValueError(f"{caller} needs (z, y, x) volumes, got shape {volume.shape}.")
        small, mm = _subsample(volume, voxel_mm, spacing_mm)
        yield small, mm, body_mask(small, modality, normalised=True, ct_window=ct_window)


def _sample(mask: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    index = np.flatnonzero(mask)
    if len(index) == 0:
        index = np.arange(mask.size)
    return rng.choice(index, min(count, len(index)), replace=False)


def blurred_at(volume: np.ndarray, sigma_vox: float, index: np.ndarray) -> np.ndarray:
    """The Gaussian blur of ``volume`` at the flat voxel ``index`` (float32, shape (N,)); sigma in voxels.

    A wide blur (sigma >= 4 voxels) is computed on a grid ``r = floor(sigma / 2)`` times coarser: block means of
    ``r^3`` voxels (variance (r^2 - 1) / 12 per axis), the Gaussian of the remaining variance there (about 2 coarse
    voxels), then trilinear interpolation at the voxels' positions. An approximation: the block mean aliases what
    is finer than ``r`` voxels, and the edge padding differs from scipy's reflection within about 2 sigma of the
    faces. Away from the faces, on a worst case (the hat map of 2-voxel speckle), it correlates 0.999 with the
    full-grid blur (mean error 3-5 % of the feature's spread); on the benchmark the fitted law did not change
    measurably (the law alone SSIM 0.604 against 0.605 with full-grid blurs; benchmarks/RESULTS.md). The cost
    falls 3x (sigma 4) to 25x (sigma 10), which is what lets a fit have 81 knots (issue 13). Both sides of the
    fit use this function, so the source and target features are blurred alike. ``sigma_vox <= 0`` returns the
    voxels themselves.
    """
    if sigma_vox <= 0:
        return volume.ravel()[index].astype(np.float32)
    r = int(sigma_vox // 2) if sigma_vox >= 4 else 1
    if r < 2:
        return ndimage.gaussian_filter(volume, sigma_vox).ravel()[index].astype(np.float32)
    pad = [(0, (-n) % r) for n in volume.shape]
    padded = np.pad(volume, pad, mode="edge")
    shape = [n // r for n in padded.shape]
    coarse = padded.reshape(shape[0], r, shape[1], r, shape[2], r).mean(axis=(1, 3, 5))
    coarse = ndimage.gaussian_filter(coarse, np.sqrt(max(sigma_vox ** 2 - (r * r - 1) / 12.0, 0.0)) / r)
    points = (np.stack(np.unravel_index(index, volume.shape)).astype(np.float64) - (r - 1) / 2.0) / r
    return ndimage.map_coordinates(coarse, points, order=1, mode="nearest").astype(np.float32)


def source_features(volume: np.ndarray, mask: np.ndarray, voxel_mm: float, knots: np.ndarray,
                    scales_mm: Sequence[float], gradient_sigma_mm: float, count: int, rng: np.random.Generator
                    ) -> np.ndarray:
    """Per-knot features of sampled source voxels: the hat maps, their blurs and blurred gradients.

    Args:
        volume: (z, y, x) source in [-1, 1] on an isotropic grid of ``voxel_mm``.
        mask: (z, y, x) bool, the voxels to sample (body).
        voxel_mm: grid spacing (mm).
        knots: (K,) law knots.
        scales_mm: Gaussian sigmas (mm) of the blurred features; 0 is the voxel itself.
        gradient_sigma_mm: sigma (mm) of the blur before the gradient.
        count: voxels to sample.
        rng: random generator of the sample.

    Returns:
        float32 (len(scales_mm) + 3, K, N): for a law ``v`` (K,), ``einsum("fkn,k->nf", B, v)`` gives each voxel's
        blurred law values followed by the three gradient components (per mm) of the law.
    """
    return _basis_at(volume, knots, _sample(mask, count, rng), voxel_mm, scales_mm, gradient_sigma_mm)


def _basis_at(volume: np.ndarray, knots: np.ndarray, index: np.ndarray, voxel_mm: float,
              scales_mm: Sequence[float], gradient_sigma_mm: float) -> np.ndarray:
    """:func:`field_features` of every hat map of ``volume`` at the flat voxel ``index``: float32 (F, K, N)."""
    return np.stack([field_features(hat_basis(volume, knots, k), index, voxel_mm, scales_mm, gradient_sigma_mm)
                     for k in range(len(knots))], 1)


def field_features(field: np.ndarray, index: np.ndarray, voxel_mm: float, scales_mm: Sequence[float],
                   gradient_sigma_mm: float) -> np.ndarray:
    """The fit's linear features of one field at the flat voxel ``index``: its blurs at ``scales_mm`` and the three
    components (per mm, z, y, x) of its gradient after a ``gradient_sigma_mm`` blur; float32 (len(scales_mm) + 3, N).
    Linear in ``field``: what :func:`source_features` computes per hat map and the fit per unit noise field."""
    out = np.empty((len(scales_mm) + 3, len(index)), np.float32)
    for s, sigma in enumerate(scales_mm):
        out[s] = blurred_at(field, sigma / voxel_mm, index)
    smooth = ndimage.gaussian_filter(field, gradient_sigma_mm / voxel_mm)
    for a, grad in enumerate(np.gradient(smooth, voxel_mm)):
        out[len(scales_mm) + a] = grad.ravel()[index]
    return out


def estimate_noise_sigma(volume: np.ndarray, mask: np.ndarray) -> float:
    """Robust standard deviation of white noise in ``volume`` (z, y, x) inside ``mask`` (same units as the volume).

    The residual of each voxel against the mean of its 6 face neighbours is, for white noise of sigma ``s``, normal
    with variance ``s^2 (1 + 1/6)``; its median absolute deviation (x 1.4826) is robust to the few voxels on
    tissue edges. Anatomy smooth at the voxel scale adds little; the estimate is an upper bound where it is not.
    Returns 0 for an empty mask or a volume under 3 voxels along an axis.
    """
    if min(volume.shape) < 3 or not mask.any():
        return 0.0
    v = volume.astype(np.float32)
    core = v[1:-1, 1:-1, 1:-1]
    neighbours = (v[:-2, 1:-1, 1:-1] + v[2:, 1:-1, 1:-1] + v[1:-1, :-2, 1:-1] + v[1:-1, 2:, 1:-1]
                  + v[1:-1, 1:-1, :-2] + v[1:-1, 1:-1, 2:]) / 6.0
    residual = (core - neighbours)[mask[1:-1, 1:-1, 1:-1]]
    if residual.size == 0:
        return 0.0
    mad = np.median(np.abs(residual - np.median(residual)))
    return float(1.4826 * mad / np.sqrt(7.0 / 6.0))


def target_features(volume: np.ndarray, mask: np.ndarray, voxel_mm: float, scales_mm: Sequence[float],
                    gradient_sigma_mm: float, count: int, rng: np.random.Generator) -> np.ndarray:
    """The features of sampled target voxels: blurs at ``scales_mm`` and the gradient magnitude (per mm).

    Returns:
        float32 (N, len(scales_mm) + 1); see :func:`source_features` for the arguments.
    """
    linear = field_features(volume, _sample(mask, count, rng), voxel_mm, scales_mm, gradient_sigma_mm)
    magnitude = np.sqrt(np.square(linear[len(scales_mm):]).sum(0, keepdims=True))
    return np.concatenate([linear[:len(scales_mm)], magnitude]).T.astype(np.float32)


def fit_intensity_law(sources: Sequence[np.ndarray], targets: Sequence[np.ndarray], source_modality: str = "ct",
                      target_modality: str = "mr", voxel_mm: float = 1.0, *, knots: int = 41,
                      spacing_mm: float = 2.0, scales_mm: Sequence[float] = (0.0, 3.0, 8.0, 20.0),
                      gradient_sigma_mm: float = 1.5, samples: int = 10000, restarts: int = 16,
                      iterations: int = 300, screen_iterations: int = 60, finalists: int = 3,
                      control_points: int = 6, projections: int = 16, smoothness: float = 1e-4,
                      gradient_weight: float = 4.0, max_volumes: int = 8, seed: int = 0,
                      ct_window: Sequence[float] = (-1000.0, 1000.0), starts: Sequence[Sequence[float]] = (),
                      noise: float | None = None, degradation: bool = True, relative: bool = True,
                      progress: Callable[[int, int, str], None] | None = None) -> IntensityLaw:
    """Fit the law ``source -> target`` from unpaired volumes (module docstring: the method).

    Args:
        sources, targets: (z, y, x) float32 volumes in [-1, 1] on isotropic ``voxel_mm`` grids (the trainer's
            preprocessed arrays); unpaired, any number (the first ``max_volumes`` of each are used).
        source_modality, target_modality: ``"ct"`` or ``"mr"`` (for the body masks).
        voxel_mm: spacing of the input grids (mm).
        knots: K, knots of the law.
        spacing_mm: the volumes are subsampled to about this spacing (mm) first (speed).
        scales_mm: blur sigmas (mm) of the features; 0 is the voxel (any order: they are sorted, finest first).
        gradient_sigma_mm: blur (mm) before the gradient-magnitude feature.
        samples: voxels sampled per volume.
        restarts: optimisation starts (the identity curve, then smooth random curves), besides ``starts``.
        iterations: Adam steps of a finalist (in all).
        screen_iterations: Adam steps of every start before the best ``finalists`` are optimised further
            (successive halving: many starts are what finds the right basin, few need the full optimisation).
        finalists: starts optimised for the full ``iterations``.
        control_points: values drawn uniformly in [-1, 1] at this many evenly spaced points make a random start
            (linear in between): smooth random laws, not per-knot noise.
        projections: random directions per step (64 for the final score of each start).
        smoothness: weight of the squared second difference of the knot values.
        gradient_weight: scale of the gradient feature (mm; brings it to the range of the intensity features).
        max_volumes: cap on the volumes per modality.
        seed: seed of the sampling, the starts and the directions (same inputs and seed: same law).
        ct_window: the CT window (HU) behind the normalised CT (for its body mask).
        starts: further starting curves (K values each), tried after the identity and before the random starts
            (e.g. an earlier model's law); with ``iterations=0`` their distances are only measured.
        noise: sigma (target units) of white noise added to the law's output before its features are compared
            (``None``: the targets' own noise, :func:`estimate_noise_sigma`; 0: none). The target is noisy and a
            law is not: without it the fit bends the law to make up the missing spread and gradient (issue 13).
            With ``degradation`` this is where the fitted sigma starts.
        degradation: fit, with the law, the target's noise sigma and the amplitude of a smooth multiplicative
            bias field (a receive coil's), both applied to the law's output before the comparison
            (:class:`_SlicedObjective`); ``False`` keeps the sigma at ``noise`` and models no bias.
        relative: with an MR target, compare the bias-invariant :func:`relative_features` (a CT has no receive
            field: a CT target always uses the features themselves).
        progress: ``progress(done, total, message)`` per restart.

    Returns:
        The :class:`IntensityLaw` of the best restart.

    Raises:
        ValueError: no source or no target volume, or a volume that is not 3D.
    """
    if not sources or not targets:
        raise ValueError("fit_intensity_law needs at least one source and one target volume.")
    start = time.perf_counter()
    scales_mm = tuple(sorted(scales_mm))  # finest first: relative_features takes the last as the widest
    grid = law_knots(knots)
    given = [np.asarray(v, np.float32) for v in starts]
    if any(v.shape != (len(grid),) for v in given):
        raise ValueError(f"Every starting curve needs {len(grid)} values (one per knot).")
    basis, unit, field, target, estimated = _feature_matrices(
        sources, targets, (source_modality, target_modality), voxel_mm, grid, spacing_mm, scales_mm,
        gradient_sigma_mm, samples, max_volumes, ct_window, np.random.default_rng(seed))
    sigma = estimated if noise is None else max(0.0, float(noise))
    objective = _SlicedObjective(basis, target, len(scales_mm), gradient_weight, projections, smoothness, seed,
                                 unit, field if degradation else None, (sigma, 0.05 if degradation else 0.0),
                                 degradation, relative and target_modality == "mr" and len(scales_mm) > 1)
    inits = [grid.astype(np.float32), *given, *_random_curves(grid, restarts - 1, control_points, objective.generator)]
    best, screened = _successive_halving(objective, inits, iterations, screen_iterations, finalists,
                                         f"intensity law {source_modality}->{target_modality}", progress)
    k = len(grid)
    return IntensityLaw(grid, best[1][:k], best[0], [round(score, 6) for score, _ in screened],
                        time.perf_counter() - start, source_modality, target_modality, float(best[1][k]),
                        float(best[1][k + 1]))


def inverse_intensity_law(law: IntensityLaw, sources: Sequence[np.ndarray], voxel_mm: float = 1.0, *,
                          spacing_mm: float = 2.0, samples: int = 20000, max_volumes: int = 8, seed: int = 0,
                          smoothness: float = 1e-3, ct_window: Sequence[float] = (-1000.0, 1000.0)) -> IntensityLaw:
    """The per-voxel law that best undoes ``law`` on its own source volumes: F's start when G's law is given.

    The piecewise-linear ``g`` on ``len(law.knots)`` evenly spaced knots of the target scale that minimises
    ``sum_i (g(law(x_i)) - x_i)^2 + smoothness * N * |D2 g|^2`` over body voxels ``x_i`` of ``sources`` (linear
    least squares; ``D2`` the second difference, which also fills knots no voxel reaches), i.e. the piecewise-linear
    approximation of ``E[x | law(x)]``. This is what the cycle loss ``|F(G(x)) - x|`` asks of F's curve, reached
    without an unpaired MR -> CT fit (CycleGAN's cycle consistency: Zhu et al., ICCV 2017, eq. 2). Where ``law`` is
    not one to one (fat and bone both bright in a UTE-like MR) the inverse averages the tissues it merges; F's ResNet
    branch then has to tell them apart from context.

    Args:
        law: the fitted source -> target law (G's).
        sources: (z, y, x) float32 source volumes in [-1, 1] on isotropic ``voxel_mm`` grids (the training CTs).
        voxel_mm: spacing of the grids (mm).
        spacing_mm: the volumes are subsampled to about this spacing first (speed).
        samples: body voxels sampled per volume.
        max_volumes: cap on the volumes used.
        seed: seed of the voxel sample.
        smoothness: weight of the squared second difference (per voxel sampled).
        ct_window: the CT window (HU) behind a normalised CT source (for its body mask).

    Returns:
        An :class:`IntensityLaw` ``target -> source`` (``distance``: the mean squared residual).

    Raises:
        ValueError: no source volume, or a volume that is not 3D.
    """
    if not sources:
        raise ValueError("inverse_intensity_law needs at least one source volume.")
    start, rng = time.perf_counter(), np.random.default_rng(seed)
    values = [small.ravel()[_sample(mask, samples, rng)] for small, _, mask in _body_grids(
        [np.asarray(v, np.float32) for v in sources], law.source, voxel_mm, spacing_mm, max_volumes, ct_window,
        "inverse_intensity_law")]
    x = np.clip(np.concatenate(values).astype(np.float64), -1.0, 1.0)
    grid = law_knots(len(law.knots))
    mapped = np.clip(np.interp(x, law.knots, law.values), -1.0, 1.0)
    design = np.stack([hat_basis(mapped, grid, k) for k in range(len(grid))], 1).astype(np.float64)
    curvature = np.diff(np.eye(len(grid)), 2, axis=0) * np.sqrt(smoothness * len(x))
    solution = np.linalg.lstsq(np.vstack([design, curvature]), np.concatenate([x, np.zeros(len(curvature))]),
                               rcond=None)[0]
    residual = float(np.mean((design @ solution - x) ** 2))
    return IntensityLaw(grid, np.clip(solution, -1.0, 1.0), residual, [], time.perf_counter() - start, law.target,
                        law.source)


def _successive_halving(objective: "_SlicedObjective", inits: Sequence[np.ndarray], iterations: int,
                        screen_iterations: int, finalists: int, name: str,
                        progress: Callable[[int, int, str], None] | None) -> tuple[tuple[float, np.ndarray], list]:
    """Every start gets a short screen, the best ``finalists`` the full optimisation; returns (the best (distance,
    state (K + 2,)), the screened (distance, state) of every start)."""
    screened = []
    for r, init in enumerate(inits):
        screened.append(objective.optimise(init, min(iterations, screen_iterations)))
        if progress is not None:
            progress(r + 1, len(inits) + finalists, f"{name}: start {r + 1}, distance {screened[-1][0]:.5f}")
    best: tuple[float, np.ndarray] | None = None
    for i, index in enumerate(np.argsort([score for score, _ in screened])[:max(1, finalists)]):
        score, state = objective.optimise(screened[index][1], max(0, iterations - screen_iterations))
        if best is None or score < best[0]:
            best = (score, state.astype(np.float64))
        if progress is not None:
            progress(len(inits) + i + 1, len(inits) + finalists, f"{name}: finalist {i + 1}, distance {score:.5f}")
    assert best is not None
    return best, screened


def _feature_matrices(sources: Sequence[np.ndarray], targets: Sequence[np.ndarray], modalities: tuple[str, str],
                      voxel_mm: float, grid: np.ndarray, spacing_mm: float, scales_mm: Sequence[float],
                      gradient_sigma_mm: float, samples: int, max_volumes: int, ct_window: Sequence[float],
                      rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float]:
    """The source basis (F, K, N) of :func:`source_features`, the features (F, N) of a unit white-noise field at the
    same voxels, a unit smooth random field (N,) there (sigma ``BIAS_SIGMA_MM``), the target rows (M, S + 1) of
    :func:`target_features`, and the median noise sigma of the targets (:func:`estimate_noise_sigma`), over the
    first ``max_volumes`` volumes of each side, subsampled to ``spacing_mm``.

    Raises:
        ValueError: a volume that is not 3D.
    """
    def grids(volumes: Sequence[np.ndarray], modality: str):  # noqa: ANN202 (a generator of tuples)
        return _body_grids(volumes, modality, voxel_mm, spacing_mm, max_volumes, ct_window, "fit_intensity_law")

    basis, noise, fields, target, sigmas = [], [], [], [], []
    for small, mm, mask in grids(sources, modalities[0]):
        index = _sample(mask, samples, rng)
        basis.append(_basis_at(small, grid, index, mm, scales_mm, gradient_sigma_mm))
        unit = rng.standard_normal(small.shape).astype(np.float32)
        noise.append(field_features(unit, index, mm, scales_mm, gradient_sigma_mm))
        smooth = blurred_at(rng.standard_normal(small.shape).astype(np.float32), BIAS_SIGMA_MM / mm, index)
        fields.append((smooth - smooth.mean()) / max(float(smooth.std()), 1e-12))
    for small, mm, mask in grids(targets, modalities[1]):
        target.append(target_features(small, mask, mm, scales_mm, gradient_sigma_mm, samples, rng))
        sigmas.append(estimate_noise_sigma(small, mask))
    return (np.concatenate(basis, 2), np.concatenate(noise, 1), np.concatenate(fields), np.concatenate(target, 0),
            float(np.median(sigmas)))


def relative_features(rows, n_scales: int, offset: float = RELATIVE_OFFSET):  # noqa: ANN001, ANN201 (torch)
    """Features of the fit that a smooth multiplicative bias leaves (almost) unchanged.

    A receive field ``b(r)`` smooth on the scale of the widest blur multiplies an MR ``u`` and, to first order,
    each of its blurs and its gradient alike: ``blur_s(b u) ~ b blur_s(u)``. Hence the log-ratio of each finer
    blur to the widest one, and the gradient magnitude over the widest blur, do not see ``b``; the widest blur
    itself is kept as it is, so the law's absolute level still enters (once, not in every feature). On the
    benchmark the simulated MR's bias (a random quadratic, +-20 %) made the fit prefer a distorted law to the
    simulator's own (distance 0.0018 against 0.00077 at 1 mm); with these features the law alone rose from SSIM
    0.67 to 0.73 on the held-out case (benchmarks/RESULTS.md, fifth session). The ratio is that of
    homomorphic bias correction (e.g. Sled et al., IEEE TMI 1998, on which N4 builds), taken here between scales.

    Args:
        rows: torch (N, S + 1): ``S`` blurred intensities in [-1, 1] (finest first, widest last) then the gradient
            magnitude (any positive scale), as :func:`target_features` returns them.
        n_scales: S (at least 2).
        offset: added to ``value + 1`` inside the logarithms (clamped at 0.02 from below: noise may push a value
            under -1).

    Returns:
        torch (N, S + 1): the ``S - 1`` log-ratios, the widest blur, the gradient magnitude over ``widest + 1 +
        offset``.

    Raises:
        ValueError: fewer than two scales (nothing to take the ratio against).
    """
    import torch

    if n_scales < 2:
        raise ValueError(f"relative_features needs at least two blur scales, got {n_scales}.")
    shifted = (rows[:, :n_scales] + 1.0 + offset).clamp(min=0.02)
    logs = torch.log(shifted)
    ratios, widest = logs[:, :-1] - logs[:, -1:], rows[:, n_scales - 1:n_scales]
    return torch.cat([ratios, widest, rows[:, n_scales:] / shifted[:, -1:]], 1)


def _random_curves(grid: np.ndarray, count: int, control_points: int, generator) -> list[np.ndarray]:  # noqa: ANN001
    """``count`` smooth random starts: uniform values in [-1, 1] at a few control points, linear in between."""
    import torch

    coarse = np.linspace(-1.0, 1.0, max(2, min(len(grid), control_points)))
    curves = []
    for _ in range(max(0, count)):
        control = torch.rand(len(coarse), generator=generator).numpy() * 2.0 - 1.0
        curves.append(np.interp(grid, coarse, control).astype(np.float32))
    return curves


class _SlicedObjective:
    """The fit's objective: sliced Wasserstein distance between the law's source features and the target's, plus
    the curvature penalty; Adam over the knot values and, with ``degradation``, two degradation amplitudes
    (module docstring).

    The law's output is degraded before its features are compared, as an acquisition degrades the target: times
    ``1 + b g(r)`` (``g`` a smooth zero-mean unit-variance field: a receive bias, on the ``value + 1`` scale so that
    the -1 background stays dark) plus white noise of sigma ``s``. A law alone has neither; without them the closest
    law to a noisy, biased target is a wider, distorted one, not the conditional mean (issue 13).

    Args:
        basis: (F, K, N) source features per knot (:func:`source_features`).
        target: (M, S + 1) target features (:func:`target_features`).
        n_scales: S, the blurred-intensity features (the rest are gradient components).
        gradient_weight, projections, smoothness, seed: see :func:`fit_intensity_law`.
        noise: (F, N) features of a unit white-noise field at the source voxels, or ``None``.
        field: (N,) a unit smooth field ``g`` at the source voxels, or ``None``.
        degradation: ``(s, b)`` where the amplitudes start; ``learn``: whether Adam fits them (else they stay).
        relative: compare :func:`relative_features` of both sides instead of the features themselves.
    """

    def __init__(self, basis: np.ndarray, target: np.ndarray, n_scales: int, gradient_weight: float,
                 projections: int, smoothness: float, seed: int, noise: np.ndarray | None = None,
                 field: np.ndarray | None = None, degradation: tuple[float, float] = (0.0, 0.0),
                 learn: bool = False, relative: bool = False) -> None:
        import torch

        self.B = torch.from_numpy(basis)
        self.B[n_scales:] *= gradient_weight
        self.noise = torch.from_numpy(np.ascontiguousarray(noise.T, np.float32)) if noise is not None else None
        if self.noise is not None:
            self.noise[:, n_scales:] *= gradient_weight
        self.field = torch.from_numpy(np.asarray(field, np.float32))[:, None] if field is not None else None
        self.degradation, self.learn = np.asarray(degradation, np.float32), learn
        self.Y = torch.from_numpy(target)
        self.Y[:, n_scales] *= gradient_weight
        self.relative = bool(relative)
        if self.relative:
            self.Y = relative_features(self.Y, n_scales)
        self.n_scales, self.projections, self.smoothness = n_scales, projections, smoothness
        self.generator = torch.Generator().manual_seed(seed)
        self.count = min(self.B.shape[2], self.Y.shape[0])

    def distance(self, values, n_dirs: int, degradation=None):  # noqa: ANN001, ANN201 (torch tensors)
        """Sliced W2^2 between the law ``values`` (K,) applied to the source features, degraded by
        ``degradation`` = (noise sigma, bias amplitude) (a tensor (2,); ``None``: the starting amplitudes), and the
        target features."""
        import torch

        if degradation is None:
            degradation = torch.from_numpy(self.degradation)
        rows = torch.einsum("fkn,k->nf", self.B, values)
        if self.field is not None:
            scale = 1.0 + degradation[1].abs() * self.field
            rows = torch.cat([(rows[:, :self.n_scales] + 1.0) * scale - 1.0, rows[:, self.n_scales:] * scale], 1)
        if self.noise is not None:
            rows = rows + degradation[0].abs() * self.noise
        rows = torch.cat([rows[:, :self.n_scales], rows[:, self.n_scales:].norm(dim=1, keepdim=True)], 1)
        if self.relative:
            rows = relative_features(rows, self.n_scales)
        rows = rows[torch.randperm(rows.shape[0], generator=self.generator)[:self.count]]
        other = self.Y[torch.randperm(self.Y.shape[0], generator=self.generator)[:self.count]]
        dirs = torch.randn(rows.shape[1], n_dirs, generator=self.generator)
        dirs = dirs / dirs.norm(dim=0, keepdim=True)
        a = torch.sort((rows @ dirs).t().contiguous(), 1).values
        b = torch.sort((other @ dirs).t().contiguous(), 1).values
        return (a - b).square().mean()

    def optimise(self, state0: np.ndarray, steps: int) -> tuple[float, np.ndarray]:
        """Adam from ``state0`` for ``steps``: the curve (K,) or the curve followed by the two degradation amplitudes
        (K + 2,; a bare curve starts them at ``degradation``). Returns (distance over 4 x 64 directions, state
        (K + 2,): the curve clamped to [-1, 1], then ``|s|``, ``|b|``)."""
        import torch

        state0 = np.asarray(state0, np.float32)
        k = self.B.shape[1]
        if state0.shape == (k,):
            state0 = np.concatenate([state0, self.degradation])
        values = torch.tensor(state0[:k]).requires_grad_(True)
        degradation = torch.tensor(state0[k:]).requires_grad_(self.learn)
        groups = [{"params": [values], "lr": 0.05}] + ([{"params": [degradation], "lr": 0.005}] if self.learn else [])
        optimiser = torch.optim.Adam(groups)
        for _ in range(steps):
            curve = values.clamp(-1.0, 1.0)
            loss = self.distance(curve, self.projections, degradation)
            if self.smoothness > 0 and len(curve) > 2:
                loss = loss + self.smoothness * (curve[2:] - 2 * curve[1:-1] + curve[:-2]).square().sum()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        with torch.no_grad():
            curve = values.clamp(-1.0, 1.0)
            score = float(np.mean([self.distance(curve, 64, degradation).item() for _ in range(4)]))
            return score, np.concatenate([curve.numpy(), degradation.abs().numpy()])
