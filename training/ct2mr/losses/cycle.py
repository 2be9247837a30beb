"""Cycle-consistency and identity losses (thesis eqs. 6.6 and 6.7)."""

from __future__ import annotations

import torch

__all__ = ["cycle_loss", "identity_loss"]


def cycle_loss(x: torch.Tensor, x_rec: torch.Tensor, y: torch.Tensor, y_rec: torch.Tensor) -> torch.Tensor:
    """L_cyc = E|F(G(x)) - x|_1 + E|G(F(y)) - y|_1 (eq. 6.6), voxel means; all tensors (B, 1, D, H, W)."""
    return (x_rec - x).abs().mean() + (y_rec - y).abs().mean()


def identity_loss(x: torch.Tensor, f_x: torch.Tensor, y: torch.Tensor, g_y: torch.Tensor) -> torch.Tensor:
    """L_id = E|G(y) - y|_1 + E|F(x) - x|_1 (eq. 6.7), voxel means; all tensors (B, 1, D, H, W)."""
    return (g_y - y).abs().mean() + (f_x - x).abs().mean()
