"""3D ResNet generator (ResNet-9b), the thesis's content-preserving backbone (section 6.2, model M1).

Architecture (CycleGAN's ResNet generator lifted to 3D): a 7^3 stem, two stride-2 3^3 convolutions (x4 down),
``n_blocks`` residual blocks at the bottleneck, two resize-convolutions (trilinear x2 upsampling then 3^3
convolution, which avoids checkerboard artefacts), and a 7^3 output convolution with tanh, so the output is in
[-1, 1] like the normalised inputs (section 4.3).
"""

from __future__ import annotations

import torch
from torch import nn

from .norm import make_norm

__all__ = ["ResnetBlock3D", "ResnetGenerator3D"]


class ResnetBlock3D(nn.Module):
    """Residual block: x + (conv3 -> norm -> ReLU -> conv3 -> norm)(x), with replicate padding.

    Args:
        channels: feature channels C; input and output are (B, C, D, H, W).
        norm: normalisation name (see :func:`ct2mr.networks.norm.make_norm`).
    """

    def __init__(self, channels: int, norm: str = "instance") -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv3d(channels, channels, 3, padding=1, padding_mode="replicate"), make_norm(norm, channels),
            nn.ReLU(inplace=True),
            nn.Conv3d(channels, channels, 3, padding=1, padding_mode="replicate"), make_norm(norm, channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, D, H, W) -> (B, C, D, H, W)."""
        return x + self.body(x)


class ResnetGenerator3D(nn.Module):
    """3D ResNet generator G (CT -> MR) or F (MR -> CT).

    Args:
        in_channels: input channels (1 for a CT or MR volume).
        out_channels: output channels.
        base_channels: width of the stem (CycleGAN uses 64; 8-16 fits a laptop); the bottleneck has 4x this.
        n_blocks: residual blocks (9 for ResNet-9b, 6 for ResNet-6b).
        norm: a name of :data:`ct2mr.networks.norm.NORMS` (``"instance"``, ``"batch"``, ``"layer"``,
            ``"switchable"``, ``"none"``).
        pointwise: hidden channels of a per-voxel intensity path (0: off, the thesis's network). When on, the
            output is ``tanh(R(x) + P(x))``: ``P`` is a 1^3-convolution MLP (1 -> pointwise -> pointwise -> 1, leaky
            ReLU) that maps each voxel's intensity alone, ``R`` the ResNet (its last convolution starts at zero), so
            the network starts as a learnable intensity curve and the ResNet adds what needs context. A window that
            holds only air then maps to the learned air value instead of the mid-grey that instance
            normalisation makes of a constant input (issue 13).

    Parameter names (state-dict keys) for a given configuration never change: checkpoints written by earlier
    versions keep loading.

    Raises:
        ValueError: ``base_channels < 1``, ``n_blocks < 0`` or an unknown norm name.

    Input (B, in_channels, D, H, W) with D, H, W multiples of 4 (the preprocessing pads to a multiple of K = 16);
    output (B, out_channels, D, H, W) in [-1, 1].
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 1, base_channels: int = 64, n_blocks: int = 9,
                 norm: str = "instance", pointwise: int = 0) -> None:
        super().__init__()
        if base_channels < 1 or n_blocks < 0 or pointwise < 0:
            raise ValueError(f"base_channels must be >= 1, n_blocks and pointwise >= 0, got {base_channels}, "
                             f"{n_blocks}, {pointwise}.")
        make_norm(norm, 1)  # validates the name up front
        c = base_channels
        layers: list[nn.Module] = [
            nn.Conv3d(in_channels, c, 7, padding=3, padding_mode="replicate"), make_norm(norm, c), nn.ReLU(True),
            nn.Conv3d(c, 2 * c, 3, stride=2, padding=1), make_norm(norm, 2 * c), nn.ReLU(True),
            nn.Conv3d(2 * c, 4 * c, 3, stride=2, padding=1), make_norm(norm, 4 * c), nn.ReLU(True),
        ]
        layers += [ResnetBlock3D(4 * c, norm) for _ in range(n_blocks)]
        for cin, cout in ((4 * c, 2 * c), (2 * c, c)):
            layers += [nn.Upsample(scale_factor=2, mode="trilinear", align_corners=False),
                       nn.Conv3d(cin, cout, 3, padding=1, padding_mode="replicate"), make_norm(norm, cout),
                       nn.ReLU(True)]
        layers += [nn.Conv3d(c, out_channels, 7, padding=3, padding_mode="replicate"), nn.Tanh()]
        self.pointwise = None
        if pointwise:
            # the Tanh moves after the sum; it has no parameters, so the state-dict keys of ``model`` do not change
            layers.pop()
            nn.init.zeros_(layers[-1].weight)
            nn.init.zeros_(layers[-1].bias)
            h = int(pointwise)
            self.pointwise = nn.Sequential(
                nn.Conv3d(in_channels, h, 1), nn.LeakyReLU(0.2, True), nn.Conv3d(h, h, 1), nn.LeakyReLU(0.2, True),
                nn.Conv3d(h, out_channels, 1))
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, D, H, W) -> (B, C_out, D, H, W) in [-1, 1]; D, H, W must be multiples of 4."""
        if any(s % 4 for s in x.shape[2:]):
            raise ValueError(f"ResnetGenerator3D needs D, H, W divisible by 4, got {tuple(x.shape[2:])}.")
        if self.pointwise is None:
            return self.model(x)
        return torch.tanh(self.model(x) + self.pointwise(x))
