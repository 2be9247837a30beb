"""Differentiable intensity histograms: the Hist-CycleGAN loss and the joint-histogram MI term (thesis section 7.7).

Soft histogram (eq. 7.1). K bin centres c_k spread uniformly over ``value_range`` = [lo, hi], *including both
ends* (c_1 = lo, c_K = hi), so the bin width is Delta = (hi - lo) / (K - 1), which is the thesis's
Delta = 1 / (K - 1) after its linear remap of [-1, 1] to [0, 1]. Each voxel value v (clamped to [lo, hi]) is
assigned softly to the bins with the gaussian kernel phi(t) = exp(-t^2 / (2 sigma^2)), sigma = 0.5 Delta
(``sigma_bins`` = 0.5):

    w_k(v) = phi(v - c_k) / sum_j phi(v - c_j),   h_k = sum_i m_i w_k(v_i) / sum_i m_i,

with optional voxel weights m (a lung or body mask). So every histogram sums to 1. Only the bins within
ceil(6 sigma_bins) bins of a voxel's nearest centre are evaluated (for sigma = 0.5 Delta the neglected kernel
weights are below exp(-24.5) ~ 2e-11 of the nearest one), which keeps memory at O(N) instead of O(N K) for
K = 64 or 128 bins on 96^3 patches.

Distances (eq. 7.2): W1 is the 1D earth-mover distance on the thesis's [0, 1] intensity scale,
``W1 = (1 / (K - 1)) * sum_k |H_f(k) - H_r(k)|`` with H the cumulative sums (CDFs) of the histograms: the L1
distance between CDFs times the bin width measured on [0, 1] (all mass in the first bin vs all in the last gives
exactly 1, the full intensity range). L2 is ``sum_k (h_f,k - h_r,k)^2``. Multiply W1 by (hi - lo) for units of
``value_range``.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

__all__ = ["HISTOGRAM_DISTANCES", "soft_histogram", "histogram_distance", "histogram_loss", "mutual_information",
           "mutual_information_loss"]

HISTOGRAM_DISTANCES = ("w1", "l2")


def _check(bins: int, value_range: Sequence[float], sigma_bins: float) -> tuple[float, float]:
    if int(bins) != bins or bins < 2:
        raise ValueError(f"bins must be an integer >= 2 (the thesis uses 64 or 128), got {bins}.")
    if len(value_range) != 2 or not float(value_range[1]) > float(value_range[0]):
        raise ValueError(f"value_range must be (lo, hi) with hi > lo, got {value_range}.")
    if not sigma_bins > 0:
        raise ValueError(f"sigma_bins (kernel sigma in bin widths) must be > 0, got {sigma_bins}.")
    return float(value_range[0]), float(value_range[1])


def _flatten(x: torch.Tensor, mask: torch.Tensor | None, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, ...) values and optional mask -> (B, N) float32 values and (B, N) float32 weights (or None)."""
    if x.ndim < 2:
        raise ValueError(f"{name} must be batched, (B, C, D, H, W), got shape {tuple(x.shape)}.")
    v = x.float().reshape(x.shape[0], -1)
    if mask is None:
        return v, None
    try:
        m = torch.broadcast_to(mask, x.shape)
    except RuntimeError as exc:
        raise ValueError(f"The mask of {name} (shape {tuple(mask.shape)}) does not broadcast to its shape "
                         f"{tuple(x.shape)}.") from exc
    m = m.detach().to(device=v.device, dtype=torch.float32).reshape(x.shape[0], -1)
    if bool((m < 0).any()):
        raise ValueError(f"The mask of {name} has negative weights; use a boolean mask or weights >= 0.")
    return v, m


def _window(v: torch.Tensor, bins: int, lo: float, hi: float, sigma_bins: float
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft assignment of (B, N) values to their nearest bins: weights (B, N, W) summing to 1 and bin indices."""
    u = (v.clamp(lo, hi) - lo) * ((bins - 1) / (hi - lo))  # position in bin units, [0, K-1]
    radius = max(1, math.ceil(6 * sigma_bins))
    offsets = torch.arange(-radius, radius + 1, device=v.device)
    idx = torch.round(u).detach().long().unsqueeze(-1) + offsets  # (B, N, W)
    valid = (idx >= 0) & (idx < bins)
    t = u.unsqueeze(-1) - idx.to(u.dtype)
    logits = (-0.5 / sigma_bins ** 2) * t * t
    w = torch.softmax(logits.masked_fill(~valid, float("-inf")), dim=-1)
    return w, idx.clamp(0, bins - 1)


def _counts(v: torch.Tensor, m: torch.Tensor | None, bins: int, lo: float, hi: float, sigma_bins: float
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Unnormalised soft counts (B, K) and total voxel weight (B,)."""
    w, idx = _window(v, bins, lo, hi, sigma_bins)
    if m is not None:
        w = w * m.unsqueeze(-1)
    counts = torch.zeros(v.shape[0], bins, device=v.device, dtype=w.dtype).scatter_add(
        1, idx.flatten(1), w.flatten(1))
    total = m.sum(1) if m is not None else torch.full((v.shape[0],), float(v.shape[1]), device=v.device)
    return counts, total


def soft_histogram(x: torch.Tensor, bins: int = 64, value_range: Sequence[float] = (-1.0, 1.0),
                   mask: torch.Tensor | None = None, sigma_bins: float = 0.5) -> torch.Tensor:
    """Differentiable normalised intensity histogram per batch item (thesis eq. 7.1; see the module docstring).

    Args:
        x: (B, C, D, H, W) intensities, normally in [-1, 1]; values outside ``value_range`` are clamped to it.
        bins: K >= 2 (the thesis uses 64 or 128).
        value_range: (lo, hi); bin centres are ``linspace(lo, hi, K)``, bin width (hi - lo) / (K - 1).
        mask: optional voxel weights broadcastable to ``x`` (boolean lung/body mask or weights >= 0); not
            differentiated.
        sigma_bins: kernel sigma in bin widths (0.5, thesis section 7.7).

    Returns:
        (B, K) float32, each row summing to 1; differentiable with respect to ``x``.

    Raises:
        ValueError: bad ``bins``, ``value_range`` or ``sigma_bins``; a mask that does not broadcast, has negative
            weights, or selects no voxel of some batch item.
    """
    lo, hi = _check(bins, value_range, sigma_bins)
    v, m = _flatten(x, mask, "x")
    counts, total = _counts(v, m, int(bins), lo, hi, sigma_bins)
    if m is not None and bool((total <= 0).any()):
        raise ValueError("The mask selects no voxel of at least one batch item; its histogram is undefined.")
    return counts / total.unsqueeze(1)


def histogram_distance(h1: torch.Tensor, h2: torch.Tensor, distance: str = "w1") -> torch.Tensor:
    """Distance between normalised histograms over the last axis (thesis eq. 7.2).

    Args:
        h1, h2: (..., K) histograms, each summing to 1 over the last axis, bins as in :func:`soft_histogram`.
        distance: ``"w1"``: ``(1 / (K - 1)) * sum_k |cumsum(h1)_k - cumsum(h2)_k|`` (earth-mover distance on the
            [0, 1] intensity scale: all mass in the first bin vs all in the last gives (K - 1) * 1 / (K - 1) = 1);
            ``"l2"``: ``sum_k (h1_k - h2_k)^2``.

    Returns:
        Tensor of shape ``h1.shape[:-1]`` (a scalar for 1D inputs).

    Raises:
        ValueError: unknown distance, fewer than 2 bins, or shapes that differ.
    """
    if distance not in HISTOGRAM_DISTANCES:
        raise ValueError(f"Unknown histogram distance {distance!r}; choose one of {HISTOGRAM_DISTANCES}.")
    if h1.shape != h2.shape or h1.shape[-1] < 2:
        raise ValueError(f"Histograms must have the same shape with >= 2 bins, got {tuple(h1.shape)} and "
                         f"{tuple(h2.shape)}.")
    if distance == "l2":
        return ((h1 - h2) ** 2).sum(-1)
    return (torch.cumsum(h1, -1) - torch.cumsum(h2, -1)).abs().sum(-1) / (h1.shape[-1] - 1)


def histogram_loss(fake: torch.Tensor, real: torch.Tensor, bins: int = 64, distance: str = "w1",
                   mask: torch.Tensor | None = None, real_mask: torch.Tensor | None = None,
                   value_range: Sequence[float] = (-1.0, 1.0), sigma_bins: float = 0.5) -> torch.Tensor:
    """Hist-CycleGAN loss L_hist between synthetic and real MR intensity distributions (thesis eq. 7.2).

    The histograms are pooled over each batch (all voxels of the batch, with their mask weights), since fake and
    real batches are unpaired: ``h_f`` = soft histogram of G(x) over the batch, ``h_r`` = that of the real MR
    batch, **detached** (stop-gradient: only G receives gradients).

    Args:
        fake: synthetic MR G(x), (B, 1, D, H, W) in [-1, 1].
        real: real MR batch, (B', 1, D', H', W') in [-1, 1] (any batch and patch size).
        bins: K (64 or 128 in the thesis).
        distance: ``"w1"`` (L1 between CDFs times the [0, 1]-scale bin width 1 / (K - 1), the thesis default) or
            ``"l2"`` (sum of squared bin differences).
        mask: optional weights for ``fake`` voxels (e.g. the CT's lung or body mask: G(x) lies on x's grid).
        real_mask: optional weights for ``real`` voxels (the MR's own mask).
        value_range: intensity range of the histograms.
        sigma_bins: kernel sigma in bin widths (0.5).

    Returns:
        Scalar tensor (W1 in [0, 1]; L2 in [0, 2]). If a mask selects no voxel in its whole batch, the loss is a
        zero that still depends on ``fake`` (the step contributes nothing, training does not crash).

    Raises:
        ValueError: unknown ``distance`` (allowed: ``"w1"``, ``"l2"``) or invalid histogram settings / masks.
    """
    if distance not in HISTOGRAM_DISTANCES:
        raise ValueError(f"Unknown histogram distance {distance!r}; choose one of {HISTOGRAM_DISTANCES}.")
    lo, hi = _check(bins, value_range, sigma_bins)
    bins = int(bins)
    vf, mf = _flatten(fake, mask, "fake")
    vr, mr = _flatten(real.detach(), real_mask, "real")
    counts_f, total_f = _counts(vf, mf, bins, lo, hi, sigma_bins)
    with torch.no_grad():
        counts_r, total_r = _counts(vr, mr, bins, lo, hi, sigma_bins)
    total_f, total_r = total_f.sum(), total_r.sum()
    if float(total_f) <= 0 or float(total_r) <= 0:
        return fake.sum() * 0.0
    h_f = counts_f.sum(0) / total_f
    h_r = (counts_r.sum(0) / total_r).to(h_f.device)
    return histogram_distance(h_f, h_r, distance)


def mutual_information(x: torch.Tensor, y: torch.Tensor, bins: int = 32, value_range: Sequence[float] = (-1.0, 1.0),
                       mask: torch.Tensor | None = None, sigma_bins: float = 0.5) -> torch.Tensor:
    """Mutual information I(x; y) from a soft (Parzen, gaussian) joint histogram (thesis section 7.7, HueNet).

    Both volumes are soft-binned as in :func:`soft_histogram`; the joint histogram of batch item b is
    ``P_kl = sum_i m_i w_k(x_i) w_l(y_i) / sum_i m_i`` and ``I = sum_kl P_kl log(P_kl / (p_k q_l))`` with the
    marginals p, q of P. Used on (x, G(x)) to favour an informative, monotonic intensity mapping.

    Args:
        x: (B, C, D, H, W), e.g. the CT patch in [-1, 1].
        y: same shape, voxel-aligned with ``x`` (e.g. G(x)).
        bins: bins per axis K >= 2 (32: the joint histogram has K^2 cells).
        value_range: intensity range of both volumes.
        mask: optional voxel weights broadcastable to ``x`` (not differentiated).
        sigma_bins: kernel sigma in bin widths (0.5).

    Returns:
        (B,) float32, in nats, >= 0 up to rounding; at most log(K). Differentiable with respect to x and y.

    Raises:
        ValueError: shapes differ; invalid histogram settings; a mask that selects no voxel of some batch item.
    """
    if x.shape != y.shape:
        raise ValueError(f"x and y must be voxel-aligned (same shape), got {tuple(x.shape)} and {tuple(y.shape)}.")
    lo, hi = _check(bins, value_range, sigma_bins)
    bins = int(bins)
    vx, m = _flatten(x, mask, "x")
    vy, _ = _flatten(y, None, "y")
    dense = []
    for v in (vx, vy):
        w, idx = _window(v, bins, lo, hi, sigma_bins)
        dense.append(torch.zeros(*v.shape, bins, device=v.device, dtype=w.dtype).scatter_add(2, idx, w))
    wx, wy = dense
    if m is not None:
        total = m.sum(1)
        if bool((total <= 0).any()):
            raise ValueError("The mask selects no voxel of at least one batch item; MI is undefined.")
        wx = wx * m.unsqueeze(-1)
    else:
        total = torch.full((vx.shape[0],), float(vx.shape[1]), device=vx.device)
    joint = torch.bmm(wx.transpose(1, 2), wy) / total[:, None, None]  # (B, K, K)
    px, py = joint.sum(2, keepdim=True), joint.sum(1, keepdim=True)
    tiny = 1e-12
    return (joint * (torch.log(joint + tiny) - torch.log(px * py + tiny))).sum((1, 2))


def mutual_information_loss(x: torch.Tensor, y: torch.Tensor, bins: int = 32,
                            value_range: Sequence[float] = (-1.0, 1.0), mask: torch.Tensor | None = None,
                            sigma_bins: float = 0.5) -> torch.Tensor:
    """L_MI = -I(x; G(x)) averaged over the batch (thesis section 7.7, eq. 7.3 weight lambda_mi in [0.01, 0.1]).

    Args and errors: see :func:`mutual_information`.

    Returns:
        Scalar tensor (<= 0).
    """
    return -mutual_information(x, y, bins, value_range, mask, sigma_bins).mean()
