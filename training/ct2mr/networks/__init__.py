"""Networks of the thesis's model family (section 6.2): generators G, F and discriminators D_MR, D_CT.

Generators: 3D ResNet-9b / 6b, 3D U-Net, 3D U-Net++ (resize-convolution upsampling, tanh output in [-1, 1]);
discriminator: 3D PatchGAN with optional spectral normalisation; normalisations instance / batch / layer /
switchable / none. Build them from plain-dict specs with :func:`build_generator` and :func:`build_discriminator`.

No file I/O happens here. Tensors are (B, C, D, H, W).
"""

from __future__ import annotations

from ct2mr.networks.factory import DISCRIMINATORS, GENERATORS, build_discriminator, build_generator
from ct2mr.networks.norm import NORMS, SwitchableNorm3d, make_norm
from ct2mr.networks.patchgan import PatchDiscriminator3D, receptive_field
from ct2mr.networks.resnet import ResnetGenerator3D
from ct2mr.networks.unet import UNet3D, UNetPlusPlus3D

__all__ = ["ResnetGenerator3D", "UNet3D", "UNetPlusPlus3D", "PatchDiscriminator3D", "SwitchableNorm3d",
           "build_generator", "build_discriminator", "make_norm", "receptive_field", "GENERATORS",
           "DISCRIMINATORS", "NORMS"]
