"""Pure metric functions of the evaluation (thesis section 5, E1-E2; section 7, eq. 7.2; Wolterink et al. 2017).

Everything here is a function of NumPy arrays (volumes (z, y, x), feature sets (N, d), histograms (bins,)) and
returns plain floats; nothing reads files, runs a model or writes a report (that is :mod:`ct2mr.evaluation.evaluate`,
:mod:`ct2mr.evaluation.reference_qa` and :mod:`ct2mr.evaluation.translation_analysis`). Intensities are the network's
normalised [-1, 1] unless a docstring says otherwise.

* Distribution distances (E1): :func:`frechet_distance` / :func:`fid` (Heusel et al. 2017), :func:`mmd2_unbiased` /
  :func:`kid` (Binkowski et al. 2018), :func:`histogram_w1` on :func:`intensity_histogram` counts (thesis eq. 7.2).
* Voxel-wise agreement (E2, paired): :func:`ssim3d` (Wang et al. 2004, in 3D; its core is
  :func:`ct2mr.losses.ssim.ssim_map`), :func:`psnr`, :func:`mae` (Wolterink et al. 2017, eq. 4), each inside an
  optional boolean mask checked by :func:`checked_mask`.
* Statistics: :func:`paired_ttest` (``scipy.stats.ttest_rel``).

torch is imported only inside :func:`ssim3d`, so importing this module loads NumPy alone.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

__all__ = [
    "HISTOGRAM_BINS",
    "HISTOGRAM_RANGE",
    "checked_mask",
    "frechet_distance",
    "fid",
    "mmd2_unbiased",
    "kid",
    "ssim3d",
    "psnr",
    "mae",
    "intensity_histogram",
    "histogram_w1",
    "paired_ttest",
]

#: Bins of the intensity histograms over [-1, 1] (W1 and the histogram figures).
HISTOGRAM_BINS = 256
#: Range of those bins: the network's normalised intensities.
HISTOGRAM_RANGE = (-1.0, 1.0)


def checked_mask(mask: np.ndarray, shape: Sequence[int], name: str = "mask", of: str = "the volume shape",
                 empty: str = "The mask is empty.") -> np.ndarray:
    """A boolean mask after checking that it has ``shape`` and at least one voxel inside.

    The one place of the "mask must match the volume / must not be empty" checks of the evaluation metrics
    (:func:`ssim3d`, :func:`psnr`, :func:`mae`, :func:`ct2mr.evaluation.reference_qa.ms_ssim3d`,
    :mod:`ct2mr.evaluation.anatomy`); the words of both messages are the caller's.

    Args:
        mask: any array, read as boolean (non-zero = inside), e.g. (z, y, x).
        shape: the shape it must have, e.g. the volume's (z, y, x).
        name: what the mask is, first words of the shape message (``"mask"``, ``"body mask"``).
        of: what ``shape`` is, in the shape message (``"the volume shape"``, ``"the CT's (z, y, x) shape"``).
        empty: the whole message for an empty mask.

    Returns:
        ``mask`` as a boolean array of ``shape`` (a view when it already was boolean).

    Raises:
        ValueError: ``"{name} shape {mask.shape} does not match {of} {shape}."``, or ``empty``.
    """
    mask = np.asarray(mask, bool)
    shape = tuple(shape)
    if mask.shape != shape:
        raise ValueError(f"{name} shape {mask.shape} does not match {of} {shape}.")
    if not mask.any():
        raise ValueError(empty)
    return mask


# --- Distribution distances ---------------------------------------------------------------------------------------

def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet distance between two Gaussians: ``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))`` (Heusel et al. 2017).

    The matrix square root is ``scipy.linalg.sqrtm``; when it is not finite (near-singular covariances), ``1e-6``
    is added to both diagonals, as in the reference FID implementation (pytorch-fid); a negligible imaginary part is
    dropped.

    Args:
        mu1, mu2: means, shape (d,).
        sigma1, sigma2: covariances, shape (d, d).

    Returns:
        The distance (>= 0 up to rounding), in squared feature units.

    Raises:
        ValueError: mismatching shapes, or an imaginary part that is not negligible.
    """
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(f"Shapes do not match: mu {mu1.shape}/{mu2.shape}, sigma {sigma1.shape}/{sigma2.shape}.")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * 1e-6
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3 * max(1.0, float(np.abs(covmean).max()))):
            raise ValueError(f"sqrtm(S1 S2) has a large imaginary part ({np.abs(covmean.imag).max():g}).")
        covmean = covmean.real
    return float(max(0.0, diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean)))


def _feature_pair(features_a: np.ndarray, features_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two float64 (N, d) feature sets with the same d, or a ValueError."""
    a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"Feature sets must be (N, d) with the same d, got {a.shape} and {b.shape}.")
    return a, b


def fid(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Frechet distance between Gaussian fits (mean, unbiased covariance) of two feature sets (FID; Heusel et al. 2017).

    Args:
        features_a: (N_a, d) features, e.g. of synthetic patches.
        features_b: (N_b, d) features, e.g. of real patches.

    Returns:
        The FID in squared feature units, or NaN when a set has fewer than 2 samples.

    Raises:
        ValueError: sets that are not (N, d) with the same d.
    """
    a, b = _feature_pair(features_a, features_b)
    if len(a) < 2 or len(b) < 2:
        return float("nan")
    return frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


def _polynomial_kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The cubic polynomial kernel matrix ``(a b^T / d + 1)^3`` of (m, d) and (n, d) features: (m, n)."""
    return (a @ b.T / a.shape[1] + 1.0) ** 3


def mmd2_unbiased(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Unbiased MMD^2 with the cubic polynomial kernel ``k(a, b) = (a.b / d + 1)^3`` (Binkowski et al. 2018).

    ``MMD^2_u = 1/(m(m-1)) sum_{i!=j} k(a_i, a_j) + 1/(n(n-1)) sum_{i!=j} k(b_i, b_j) - 2/(mn) sum_{i,j} k(a_i, b_j)``.

    Args:
        features_a: (m, d), m >= 2.
        features_b: (n, d), n >= 2.

    Returns:
        The estimate, dimensionless (may be slightly negative: it is unbiased).
    """
    a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    m, n = len(a), len(b)
    kaa, kbb, kab = _polynomial_kernel(a, a), _polynomial_kernel(b, b), _polynomial_kernel(a, b)
    return float((kaa.sum() - np.trace(kaa)) / (m * (m - 1)) + (kbb.sum() - np.trace(kbb)) / (n * (n - 1))
                 - 2.0 * kab.mean())


def kid(features_a: np.ndarray, features_b: np.ndarray, n_subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance: :func:`mmd2_unbiased` averaged over random subsets (Binkowski et al. 2018).

    Each of ``n_subsets`` draws takes ``min(subset_size, N_a, N_b)`` samples of each set without replacement
    (``numpy.random.default_rng(seed)``). When the subset covers both sets entirely, one draw is made (every draw
    would give the same value).

    Args:
        features_a: (N_a, d) features.
        features_b: (N_b, d) features.
        n_subsets: number of subsets (>= 1).
        subset_size: samples per subset.
        seed: subset sampling seed.

    Returns:
        ``(mean, std)`` over subsets (the thesis reports the mean x 100 as "KID (%)"); NaN when a set has < 2 samples,
        and a NaN std when a single draw covers both sets.

    Raises:
        ValueError: sets that are not (N, d) with the same d, or ``n_subsets`` < 1.
    """
    a, b = _feature_pair(features_a, features_b)
    if n_subsets < 1:
        raise ValueError(f"n_subsets must be >= 1, got {n_subsets}.")
    size = min(int(subset_size), len(a), len(b))
    if size < 2:
        return float("nan"), float("nan")
    if size == len(a) == len(b):
        return mmd2_unbiased(a, b), float("nan")
    rng = np.random.default_rng(seed)
    values = [mmd2_unbiased(a[rng.choice(len(a), size, replace=False)], b[rng.choice(len(b), size, replace=False)])
              for _ in range(int(n_subsets))]
    return float(np.mean(values)), float(np.std(values))


# --- Voxel-wise agreement -----------------------------------------------------------------------------------------

def ssim3d(a: np.ndarray, b: np.ndarray, data_range: float = 2.0, mask: np.ndarray | None = None,
           win_size: int = 11, sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> float:
    """3D SSIM with a Gaussian window (Wang et al. 2004), as MONAI's ``SSIMMetric(spatial_dims=3)`` computes it.

    Local means, variances and covariance come from a separable Gaussian filter (``win_size`` taps, ``sigma``
    voxels) applied in 'valid' mode (:func:`ct2mr.losses.ssim.ssim_map` on (1, 1, D, H, W) tensors), so the SSIM map
    covers the voxels at least ``win_size // 2`` from the border; ``C1 = (k1 R)^2``, ``C2 = (k2 R)^2`` with
    ``R = data_range``. The score is the map's mean, or its mean over the voxels of ``mask`` (cropped like the map).
    Computed in float32 (as MONAI) on the mask's bounding box plus a margin, which keeps a whole-thorax volume within
    a few GB.

    Args:
        a: (z, y, x) volume, e.g. the input x in [-1, 1].
        b: (z, y, x) volume of the same shape, e.g. the round trip F(G(x)).
        data_range: ``R``, the intensity range (2 for [-1, 1]).
        mask: boolean (z, y, x) mask; ``None``: every voxel of the map.
        win_size: window taps per axis (odd).
        sigma: Gaussian standard deviation in voxels.
        k1, k2: SSIM constants.

    Returns:
        SSIM in [-1, 1], dimensionless; 1 for identical volumes.

    Raises:
        ValueError: mismatching shapes, a mask of another shape, a volume smaller than the window, or an empty mask.
    """
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    if a.shape != b.shape or a.ndim != 3:
        raise ValueError(f"ssim3d needs two (z, y, x) volumes of the same shape, got {a.shape} and {b.shape}.")
    half = win_size // 2
    if mask is not None:
        mask = checked_mask(mask, a.shape, empty="The SSIM mask is empty.")
        idx = np.nonzero(mask)
        box = tuple(slice(max(0, int(i.min()) - half), min(n, int(i.max()) + half + 1)) for i, n in zip(idx, a.shape))
        a, b, mask = a[box], b[box], mask[box]
    if min(a.shape) < win_size:
        raise ValueError(f"Volume {a.shape} is smaller than the SSIM window ({win_size}).")
    import torch

    from ct2mr.losses.ssim import ssim_map

    x, y = torch.from_numpy(np.ascontiguousarray(a))[None, None], torch.from_numpy(np.ascontiguousarray(b))[None, None]
    with torch.inference_mode():
        local = ssim_map(x, y, data_range, win_size, sigma, k1, k2)[0, 0].numpy()
    if mask is None:
        return float(local.mean(dtype=np.float64))
    inner = mask[tuple(slice(half, n - half) for n in mask.shape)]
    if not inner.any():
        return float(local.mean(dtype=np.float64))
    return float(local[inner].mean(dtype=np.float64))


def _masked_diff(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """``a - b`` (float64) at the voxels of ``mask`` (all when ``None``), flattened; shape and emptiness checked."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"Shapes differ: {a.shape} and {b.shape}.")
    diff = a - b
    if mask is not None:
        diff = diff[checked_mask(mask, a.shape)]
    if diff.size == 0:
        raise ValueError("The mask is empty.")
    return diff


def psnr(a: np.ndarray, b: np.ndarray, data_range: float = 2.0, mask: np.ndarray | None = None) -> float:
    """Peak signal-to-noise ratio ``10 log10(R^2 / MSE)`` in dB, inside ``mask``.

    Args:
        a, b: arrays of the same shape (e.g. (z, y, x) in [-1, 1]).
        data_range: ``R`` (2 for [-1, 1]; 1600 for HU in the thesis's CT window gives the same number).
        mask: boolean mask of the voxels to use, shape of ``a``; ``None``: all.

    Returns:
        PSNR in dB (``inf`` for identical inputs).

    Raises:
        ValueError: different shapes, a mask of another shape, or no voxel to compare.
    """
    mse = float(np.mean(_masked_diff(a, b, mask) ** 2))
    return float("inf") if mse == 0 else float(10.0 * math.log10(data_range ** 2 / mse))


def mae(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Mean absolute error inside ``mask``, in the inputs' units (Wolterink et al. 2017, eq. 4).

    Args:
        a, b: arrays of the same shape (e.g. (z, y, x); [-1, 1] or HU).
        mask: boolean mask of the voxels to use, shape of ``a``; ``None``: all.

    Returns:
        The MAE, in the inputs' units.

    Raises:
        ValueError: different shapes, a mask of another shape, or no voxel to compare.
    """
    return float(np.mean(np.abs(_masked_diff(a, b, mask))))


# --- Histograms ---------------------------------------------------------------------------------------------------

def intensity_histogram(values: np.ndarray, bins: int = HISTOGRAM_BINS,
                        value_range: tuple[float, float] = HISTOGRAM_RANGE) -> np.ndarray:
    """Counts of ``values`` over ``bins`` equal bins of ``value_range``; values outside are clipped into the end bins.

    Args:
        values: any array (flattened), in the units of ``value_range`` (normalised [-1, 1] by default).
        bins: number of bins.
        value_range: (low, high).

    Returns:
        int64 counts, shape (bins,).
    """
    values = np.clip(np.asarray(values, np.float64).ravel(), value_range[0], value_range[1])
    return np.histogram(values, bins=bins, range=value_range)[0].astype(np.int64)


def histogram_w1(counts_a: np.ndarray, counts_b: np.ndarray, value_range: tuple[float, float] = HISTOGRAM_RANGE
                 ) -> float:
    """1-Wasserstein distance between two histograms on the same bins (thesis eq. 7.2 with hard counts).

    ``W1 = Delta * sum_k |H_a(k) - H_b(k)|`` with ``H`` the normalised cumulative counts and ``Delta`` the bin width
    in intensity units; for distributions on bin centres it is exact.

    Args:
        counts_a, counts_b: counts over the same bins of ``value_range``, shape (bins,).
        value_range: (low, high) of the bins.

    Returns:
        W1 in intensity units (normalised [-1, 1] units by default: at most 2); NaN when a histogram is empty.

    Raises:
        ValueError: different numbers of bins.
    """
    a, b = np.asarray(counts_a, np.float64), np.asarray(counts_b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"Histograms have different bins: {a.shape} and {b.shape}.")
    if a.sum() <= 0 or b.sum() <= 0:
        return float("nan")
    delta = (value_range[1] - value_range[0]) / a.size
    return float(delta * np.abs(np.cumsum(a) / a.sum() - np.cumsum(b) / b.sum()).sum())


# --- Statistics ---------------------------------------------------------------------------------------------------

def paired_ttest(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """Paired two-sided t-test of ``a`` against ``b`` (``scipy.stats.ttest_rel``), as Wolterink et al. 2017 report.

    ``t = mean(d) / (std(d, ddof=1) / sqrt(n))`` with ``d = a - b``, ``n - 1`` degrees of freedom.

    Args:
        a, b: per-volume values of two models on the same volumes, in the same order, shape (n,).

    Returns:
        ``{"n", "mean_a", "mean_b", "mean_diff", "t", "p"}`` (means in the inputs' units; NaN t and p with fewer
        than 2 pairs).

    Raises:
        ValueError: different lengths.
    """
    from scipy import stats

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired_ttest needs two sequences of the same length, got {a.size} and {b.size}.")
    out = {"n": int(a.size), "mean_a": float(np.mean(a)) if a.size else float("nan"),
           "mean_b": float(np.mean(b)) if b.size else float("nan"),
           "mean_diff": float(np.mean(a - b)) if a.size else float("nan"), "t": float("nan"), "p": float("nan")}
    if a.size >= 2:
        result = stats.ttest_rel(a, b)
        out["t"], out["p"] = float(result.statistic), float(result.pvalue)
    return out
