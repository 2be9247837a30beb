"""Cycle-consistency and identity losses (thesis eqs. 6.6 and 6.7) and the structure-aware cycle term (6.2.1)."""

from __future__ import annotations

import torch

from ct2mr.losses.ssim import ssim3d

__all__ = ["cycle_loss", "identity_loss", "structural_cycle_loss"]


def cycle_loss(x: torch.Tensor, x_rec: torch.Tensor, y: torch.Tensor, y_rec: torch.Tensor) -> torch.Tensor:
    """L_cyc = E|F(G(x)) - x|_1 + E|G(F(y)) - y|_1 (eq. 6.6), voxel means; all tensors (B, 1, D, H, W)."""
    return (x_rec - x).abs().mean() + (y_rec - y).abs().mean()


def identity_loss(x: torch.Tensor, f_x: torch.Tensor, y: torch.Tensor, g_y: torch.Tensor) -> torch.Tensor:
    """L_id = E|G(y) - y|_1 + E|F(x) - x|_1 (eq. 6.7), voxel means; all tensors (B, 1, D, H, W)."""
    return (g_y - y).abs().mean() + (f_x - x).abs().mean()


def structural_cycle_loss(x: torch.Tensor, x_rec: torch.Tensor, alpha: float, data_range: float = 2.0,
                          kernel_size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Mix(L1, SSIM-3D) cycle term of one direction (thesis section 6.2.1, table 5; models M3, M4).

    ``(1 - alpha) * E|x_rec - x|_1 + alpha * (1 - SSIM3D(x_rec, x))``. Convention: the SSIM part is always
    ``1 - SSIM`` (in [0, 2], 0 for a perfect round trip), never ``-SSIM``, and the two parts are mixed convexly so
    ``alpha = 0`` is exactly the plain L1 cycle term of eq. 6.6 (the SSIM is then not computed). The thesis's
    ablation (table 8) used alpha = 0.1. Call once per direction (x vs F(G(x)), y vs G(F(y))) and sum.

    Args:
        x: the input volume, (B, 1, D, H, W) in [-1, 1].
        x_rec: its round trip, same shape.
        alpha: SSIM weight in [0, 1].
        data_range, kernel_size, sigma: SSIM settings, see :func:`ct2mr.losses.ssim.ssim3d`.

    Returns:
        Scalar tensor.

    Raises:
        ValueError: ``alpha`` outside [0, 1], shape mismatch, or volumes smaller than the SSIM window.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha (SSIM weight of the cycle loss) must be in [0, 1], got {alpha}.")
    if x.shape != x_rec.shape:
        raise ValueError(f"x and x_rec must have the same shape, got {tuple(x.shape)} and {tuple(x_rec.shape)}.")
    l1 = (x_rec - x).abs().mean()
    if alpha == 0.0:
        return l1
    return (1.0 - alpha) * l1 + alpha * (1.0 - ssim3d(x_rec, x, data_range, kernel_size, sigma))
