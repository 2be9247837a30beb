"""3D PatchGAN discriminator (D_MR, D_CT): a fully convolutional critic that scores overlapping 3D patches.

pix2pix / CycleGAN's 70x70 PatchGAN lifted to 3D (thesis section 6.2; Wolterink et al. 2017 use the 2D one): a
stride-2 4^3 convolution stack, then two stride-1 4^3 convolutions, LeakyReLU 0.2, no normalisation on the first
layer, one logit per patch.
"""

from __future__ import annotations

import torch
from torch import nn

from .norm import make_norm

__all__ = ["PatchDiscriminator3D", "receptive_field"]


def receptive_field(n_layers: int) -> int:
    """Receptive field (voxels per side) of :class:`PatchDiscriminator3D` with ``n_layers`` stride-2 layers.

    Args:
        n_layers: stride-2 convolutions (3 gives the classic 70 voxels).

    Returns:
        Side length of the cube of input voxels that one output logit sees.
    """
    rf = 1
    strides = [2] * n_layers + [1, 1]
    for s in reversed(strides):
        rf = (rf - 1) * s + 4
    return rf


class PatchDiscriminator3D(nn.Module):
    """3D PatchGAN.

    Args:
        in_channels: input channels (1).
        base_channels: width of the first layer (64 in CycleGAN); doubles per layer up to 8x.
        n_layers: stride-2 layers (3: receptive field 70^3 voxels, i.e. 70 mm at 1 mm spacing).
        norm: normalisation of the inner layers.

    Input (B, C, D, H, W); output (B, 1, D', H', W') raw scores (logits for cross-entropy, values for LSGAN).
    """

    def __init__(self, in_channels: int = 1, base_channels: int = 64, n_layers: int = 3, norm: str = "instance"
                 ) -> None:
        super().__init__()
        c = base_channels
        layers: list[nn.Module] = [nn.Conv3d(in_channels, c, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers):
            prev, mult = mult, min(2 ** n, 8)
            layers += [nn.Conv3d(c * prev, c * mult, 4, stride=2, padding=1), make_norm(norm, c * mult),
                       nn.LeakyReLU(0.2, True)]
        prev, mult = mult, min(2 ** n_layers, 8)
        layers += [nn.Conv3d(c * prev, c * mult, 4, stride=1, padding=1), make_norm(norm, c * mult),
                   nn.LeakyReLU(0.2, True), nn.Conv3d(c * mult, 1, 4, stride=1, padding=1)]
        self.model = nn.Sequential(*layers)
        self.receptive_field = receptive_field(n_layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, D, H, W) -> (B, 1, D', H', W') patch scores."""
        return self.model(x)
