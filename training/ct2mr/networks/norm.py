"""Normalisation layers selectable by name (thesis section 6.2; switchable normalisation from HLSNC-GAN, paper 003).

Every layer takes and returns (B, C, D, H, W) feature maps:

==============  ==========================================================================================
name            layer
==============  ==========================================================================================
``instance``    ``nn.InstanceNorm3d(C)``, no affine, no running statistics (CycleGAN's choice)
``batch``       ``nn.BatchNorm3d(C)``
``layer``       ``nn.GroupNorm(1, C)``: layer norm over (C, D, H, W) per sample, per-channel affine
``switchable``  :class:`SwitchableNorm3d` (Luo et al. 2019): learned softmax mix of IN / LN / BN statistics
``none``        ``nn.Identity()``
==============  ==========================================================================================
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["NORMS", "make_norm", "SwitchableNorm3d"]

NORMS = ("instance", "batch", "layer", "switchable", "none")


class SwitchableNorm3d(nn.Module):
    """Switchable normalisation for 3D feature maps (Luo, Ren, Peng, Zhang and Li, ICLR 2019; HLSNC-GAN section III).

    The layer estimates the instance (IN: per sample and channel over D, H, W), layer (LN: per sample over C, D, H,
    W) and batch (BN: per channel over B, D, H, W) means and variances, mixes them with learned softmax weights
    (``mean_weight`` and ``var_weight``, three logits each, order IN, LN, BN), normalises with the mixed statistics
    and applies a per-channel affine transform. As in BN, running batch statistics (``running_mean``,
    ``running_var``, updated with ``momentum`` in training) replace the BN statistics in eval mode. Variances are
    biased (population) variances; the statistics are computed in float32 even under mixed precision.

    Args:
        channels: feature channels C.
        eps: added to the variance before the square root.
        momentum: update weight of the running BN statistics (PyTorch's BN convention: new = (1 - m) old + m batch).

    Raises:
        ValueError: ``channels < 1``, ``eps <= 0`` or ``momentum`` outside (0, 1].
    """

    def __init__(self, channels: int, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__()
        if channels < 1 or eps <= 0 or not 0 < momentum <= 1:
            raise ValueError(f"SwitchableNorm3d needs channels >= 1, eps > 0 and momentum in (0, 1], got "
                             f"{channels}, {eps}, {momentum}.")
        self.channels, self.eps, self.momentum = channels, eps, momentum
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.mean_weight = nn.Parameter(torch.ones(3))
        self.var_weight = nn.Parameter(torch.ones(3))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    @property
    def mixing_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Softmax weights (IN, LN, BN) of the means and of the variances; each (3,) and sums to 1."""
        return torch.softmax(self.mean_weight, 0), torch.softmax(self.var_weight, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, D, H, W) -> (B, C, D, H, W), normalised with the mixed statistics.

        Raises:
            ValueError: not a 5D tensor with ``channels`` channels.
        """
        if x.ndim != 5 or x.shape[1] != self.channels:
            raise ValueError(f"SwitchableNorm3d({self.channels}) expects (B, {self.channels}, D, H, W), got "
                             f"{tuple(x.shape)}.")
        b, c = x.shape[:2]
        xf = x.float().reshape(b, c, -1)
        var_in, mean_in = torch.var_mean(xf, dim=-1, correction=0)  # (B, C), two-pass (stable)
        meansq_in = var_in + mean_in ** 2
        mean_ln = mean_in.mean(1, keepdim=True)  # (B, 1)
        var_ln = (meansq_in.mean(1, keepdim=True) - mean_ln ** 2).clamp_min(0)
        if self.training:
            mean_bn = mean_in.mean(0, keepdim=True)  # (1, C)
            var_bn = (meansq_in.mean(0, keepdim=True) - mean_bn ** 2).clamp_min(0)
            with torch.no_grad():
                self.running_mean.mul_(1 - self.momentum).add_(self.momentum * mean_bn[0].to(self.running_mean))
                self.running_var.mul_(1 - self.momentum).add_(self.momentum * var_bn[0].to(self.running_var))
        else:
            mean_bn = self.running_mean.float()[None]
            var_bn = self.running_var.float()[None]
        wm, wv = self.mixing_weights
        wm, wv = wm.float(), wv.float()
        mean = wm[0] * mean_in + wm[1] * mean_ln + wm[2] * mean_bn
        var = wv[0] * var_in + wv[1] * var_ln + wv[2] * var_bn
        out = (xf - mean[..., None]) * torch.rsqrt(var[..., None] + self.eps)
        out = out * self.weight.float()[None, :, None] + self.bias.float()[None, :, None]
        return out.reshape(x.shape).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.channels}, eps={self.eps}, momentum={self.momentum}"


def make_norm(name: str, channels: int) -> nn.Module:
    """Build a 3D normalisation layer by name.

    Args:
        name: one of :data:`NORMS`: ``"instance"`` (InstanceNorm3d without affine or running stats, as CycleGAN
            uses), ``"batch"`` (BatchNorm3d), ``"layer"`` (GroupNorm(1, C): normalises each sample over (C, D, H, W),
            per-channel affine), ``"switchable"`` (:class:`SwitchableNorm3d`) or ``"none"`` (identity).
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
    if name == "layer":
        return nn.GroupNorm(1, channels)
    if name == "switchable":
        return SwitchableNorm3d(channels)
    if name == "none":
        return nn.Identity()
    raise ValueError(f"Unknown normalisation {name!r}; choose one of {NORMS}.")
