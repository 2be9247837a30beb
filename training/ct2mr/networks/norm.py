"""Normalisation layers selectable by name (thesis section 6.2; more in later issues)."""

from __future__ import annotations

from torch import nn

__all__ = ["NORMS", "make_norm"]

NORMS = ("instance", "batch", "none")


def make_norm(name: str, channels: int) -> nn.Module:
    """Build a 3D normalisation layer.

    Args:
        name: ``"instance"`` (InstanceNorm3d without affine or running stats, as CycleGAN uses), ``"batch"``
            (BatchNorm3d) or ``"none"`` (identity).
        channels: number of feature channels C of the (B, C, D, H, W) input.

    Returns:
        The layer.

    Raises:
        ValueError: unknown name.
    """
    if name == "instance":
        return nn.InstanceNorm3d(channels, affine=False, track_running_stats=False)
    if name == "batch":
        return nn.BatchNorm3d(channels)
    if name == "none":
        return nn.Identity()
    raise ValueError(f"Unknown normalisation {name!r}; choose one of {NORMS}.")
