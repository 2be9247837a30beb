"""Networks of the thesis's model family (section 6.2): generators G, F and discriminators D_MR, D_CT.

No file I/O happens here. Tensors are (B, C, D, H, W).
"""

from __future__ import annotations

from .factory import build_discriminator, build_generator
from .patchgan import PatchDiscriminator3D
from .resnet import ResnetGenerator3D

__all__ = ["ResnetGenerator3D", "PatchDiscriminator3D", "build_generator", "build_discriminator"]
