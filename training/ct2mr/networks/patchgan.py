"""3D PatchGAN discriminator (D_MR, D_CT): a fully convolutional critic that scores overlapping 3D patches.

pix2pix / CycleGAN's 70x70 PatchGAN lifted to 3D (thesis section 6.2; Wolterink et al. 2017 use the 2D one): a
stride-2 4^3 convolution stack, then two stride-1 4^3 convolutions, LeakyReLU 0.2, no normalisation on the first
layer, one logit per patch. Optional spectral normalisation of every convolution (Miyato et al. 2018; the thesis's
DC-CycleGAN critics, section 6.2.1). HLSNC-GAN's "SN" discriminator layers are *switchable* normalisation
(``norm="switchable"``), not spectral normalisation.

Receptive field (voxels per side, 4^3 kernels): ``n_layers`` = 1: 16, 2: 34, 3: 70, 4: 142, 5: 286. The thesis
(remark 2.24) quotes "approximately 96^3"; no depth of this design gives 96 exactly: 3 layers (70^3, the default)
is the closest below it and 4 layers (142^3) the closest above it.
"""

from __future__ import annotations

import torch
from torch import nn

from ct2mr.networks.norm import make_norm

__all__ = ["PatchDiscriminator3D", "receptive_field"]


def receptive_field(n_layers: int) -> int:
    """Receptive field (voxels per side) of :class:`PatchDiscriminator3D` with ``n_layers`` stride-2 layers.

    Args:
        n_layers: stride-2 convolutions (3 gives the classic 70 voxels, 4 gives 142).

    Returns:
        Side length of the cube of input voxels that one output logit sees.

    Raises:
        ValueError: ``n_layers < 1``.
    """
    if n_layers < 1:
        raise ValueError(f"n_layers must be >= 1, got {n_layers}.")
    rf = 1
    strides = [2] * n_layers + [1, 1]
    for s in reversed(strides):
        rf = (rf - 1) * s + 4
    return rf


class PatchDiscriminator3D(nn.Module):
    """3D PatchGAN.

    Args:
        in_channels: input channels (1; 2 for a conditional discriminator on a (source, output) pair).
        base_channels: width of the first layer (64 in CycleGAN); doubles per layer up to 8x.
        n_layers: stride-2 layers, >= 1 (3: receptive field 70^3 voxels, i.e. 70 mm at 1 mm spacing; 4: 142^3).
        norm: normalisation of the inner layers, a name of :data:`ct2mr.networks.norm.NORMS`.
        spectral_norm: wrap every convolution in spectral normalisation
            (``torch.nn.utils.parametrizations.spectral_norm``; state-dict keys then end in
            ``parametrizations.weight.original``).

    Attributes:
        receptive_field: side of the input cube (voxels) one output score sees, :func:`receptive_field`.

    Input (B, in_channels, D, H, W) with D, H, W >= ``2 ** (n_layers + 2)`` for a non-empty score map; output
    (B, 1, D', H', W') raw scores (logits for cross-entropy, values for LSGAN, critic values for WGAN-GP and hinge).

    Raises:
        ValueError: bad channel counts, ``n_layers < 1`` or an unknown norm name.
    """

    def __init__(self, in_channels: int = 1, base_channels: int = 64, n_layers: int = 3, norm: str = "instance",
                 spectral_norm: bool = False) -> None:
        super().__init__()
        if in_channels < 1 or base_channels < 1:
            raise ValueError(f"in_channels and base_channels must be >= 1, got {in_channels}, {base_channels}.")
        self.receptive_field = receptive_field(n_layers)
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
        if spectral_norm:
            from torch.nn.utils.parametrizations import spectral_norm as _sn

            layers = [_sn(m) if isinstance(m, nn.Conv3d) else m for m in layers]
        self.model = nn.Sequential(*layers)
        self.spectral_norm = bool(spectral_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, D, H, W) -> (B, 1, D', H', W') patch scores."""
        return self.model(x)
