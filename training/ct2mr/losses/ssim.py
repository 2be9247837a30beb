"""SSIM-3D (Wang et al. 2004, in 3D), for the structure-aware cycle loss of DC-CycleGAN / model M3 (thesis 6.2.1).

Gaussian-window SSIM computed with "valid" convolutions (no padding), constants C1 = (0.01 L)^2 and
C2 = (0.03 L)^2 with L = ``data_range``: the same definition as ``monai.metrics.SSIMMetric(spatial_dims=3)`` with
a gaussian kernel, so values agree with MONAI. The window is applied as three separable 1D convolutions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as nnf

__all__ = ["ssim3d", "ssim_map", "gaussian_window", "gaussian_filter3d"]


def gaussian_window(kernel_size: int, sigma: float, device: torch.device | None = None) -> torch.Tensor:
    """Normalised 1D gaussian of ``kernel_size`` taps (odd) and standard deviation ``sigma`` voxels, shape (K,)."""
    x = torch.arange(kernel_size, dtype=torch.float32, device=device) - (kernel_size - 1) / 2
    g = torch.exp(-0.5 * (x / sigma) ** 2)
    return g / g.sum()


def gaussian_filter3d(volume: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Separable 'valid' filtering of each channel of a (B, C, D, H, W) tensor with the 1D ``window`` (K,).

    Returns:
        (B, C, D - K + 1, H - K + 1, W - K + 1): three 1D convolutions, one per axis, without padding.
    """
    c, k = volume.shape[1], window.numel()
    window = window.to(volume)
    for axis in range(3):
        shape = [1, 1, 1]
        shape[axis] = k
        volume = nnf.conv3d(volume, window.reshape(1, 1, *shape).expand(c, 1, *shape), groups=c)
    return volume


def ssim_map(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0, kernel_size: int = 11, sigma: float = 1.5,
             k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """The local SSIM of two volumes at every valid window position (Wang et al. 2004, eq. 13, in 3D).

    Local means, variances and the covariance come from a separable gaussian window (:func:`gaussian_filter3d`);
    ``C1 = (k1 L)^2``, ``C2 = (k2 L)^2`` with ``L = data_range``, as ``monai.metrics.SSIMMetric(spatial_dims=3)``.

    Args:
        x, y: (B, C, D, H, W) of the same shape (computed in float32).
        data_range: L, the dynamic range of the values (2 for [-1, 1]).
        kernel_size: side of the window in voxels (odd; 11 as in Wang et al.).
        sigma: its standard deviation in voxels (1.5).
        k1, k2: the SSIM constants.

    Returns:
        (B, C, D - K + 1, H - K + 1, W - K + 1), values in [-1, 1].

    Raises:
        ValueError: shapes differ or are not 5D, a spatial size is smaller than ``kernel_size``, ``kernel_size`` is
            not a positive odd integer, or ``sigma`` / ``data_range`` is not positive.
    """
    if x.shape != y.shape or x.ndim != 5:
        raise ValueError(f"ssim3d needs two (B, C, D, H, W) tensors of the same shape, got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}.")
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd integer, got {kernel_size}.")
    if sigma <= 0 or data_range <= 0:
        raise ValueError(f"sigma and data_range must be > 0, got {sigma}, {data_range}.")
    if min(x.shape[2:]) < kernel_size:
        raise ValueError(f"ssim3d with a {kernel_size}^3 window needs volumes at least {kernel_size} voxels per "
                         f"side, got {tuple(x.shape[2:])}; use a smaller kernel_size or larger patches.")
    x, y = x.float(), y.float()
    c = x.shape[1]
    stack = gaussian_filter3d(torch.cat([x, y, x * x, y * y, x * y], dim=1), gaussian_window(kernel_size, sigma,
                                                                                                 x.device))
    mu_x, mu_y, e_xx, e_yy, e_xy = stack.split(c, dim=1)
    var_x, var_y, cov = e_xx - mu_x ** 2, e_yy - mu_y ** 2, e_xy - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    return ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))


def ssim3d(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0, kernel_size: int = 11, sigma: float = 1.5
           ) -> torch.Tensor:
    """Mean structural similarity of two volumes (the mean of :func:`ssim_map`).

    Args:
        x: (B, C, D, H, W), e.g. a round trip F(G(x)) in [-1, 1].
        y: same shape, the reference.
        data_range: L, the dynamic range of the values (2 for [-1, 1]).
        kernel_size: side of the gaussian window in voxels (odd; 11 as in Wang et al.).
        sigma: its standard deviation in voxels (1.5).

    Returns:
        Scalar tensor: the SSIM map averaged over all valid window positions, channels and the batch. SSIM lies in
        [-1, 1] and is 1 only for identical volumes; losses use ``1 - ssim3d`` (in [0, 2]).

    Raises:
        ValueError: see :func:`ssim_map`.
    """
    return ssim_map(x, y, data_range, kernel_size, sigma).mean()
