"""3D ResNet generator (ResNet-9b), the thesis's content-preserving backbone (section 6.2, model M1).

Architecture (CycleGAN's ResNet generator lifted to 3D): a 7^3 stem, two stride-2 3^3 convolutions (x4 down),
``n_blocks`` residual blocks at the bottleneck, two resize-convolutions (trilinear x2 upsampling then 3^3
convolution, which avoids checkerboard artefacts), and a 7^3 output convolution with tanh, so the output is in
[-1, 1] like the normalised inputs (section 4.3).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn

from ct2mr.networks.norm import make_norm

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


class IntensityCurve(nn.Module):
    """A learnable piecewise-linear curve applied voxel by voxel, in pre-tanh units (issue 13).

    ``K`` knots evenly spaced on [-1, 1]; the parameter ``values`` (K,) holds ``atanh`` of the curve's output at each
    knot, so that ``tanh(L(x))`` is the curve when nothing else is added. It starts at the identity (clipped to
    +-0.96 before ``atanh``). Input (B, 1, D, H, W) in [-1, 1] (clamped); output the same shape.

    Raises:
        ValueError: fewer than 2 knots.
    """

    LIMIT = 0.96

    def __init__(self, knots: int) -> None:
        super().__init__()
        if knots < 2:
            raise ValueError(f"IntensityCurve needs at least 2 knots, got {knots}.")
        self.values = nn.Parameter(torch.atanh(torch.linspace(-1.0, 1.0, int(knots)).clamp(-self.LIMIT, self.LIMIT)))

    def set_values(self, values: Sequence[float]) -> None:
        """Set the curve to ``values`` (K numbers in [-1, 1], clipped to +-0.96) at the knots.

        Raises:
            ValueError: not K values.
        """
        tensor = torch.as_tensor(np.asarray(values, np.float32)).flatten()
        if tensor.numel() != self.values.numel():
            raise ValueError(f"The curve has {self.values.numel()} knots, got {tensor.numel()} values.")
        with torch.no_grad():
            self.values.copy_(torch.atanh(tensor.clamp(-self.LIMIT, self.LIMIT)).to(self.values))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, D, H, W) -> (B, 1, D, H, W), the curve's pre-tanh value at each voxel."""
        k = self.values.numel()
        position = (x.clamp(-1.0, 1.0) + 1.0) * (0.5 * (k - 1))
        low = position.detach().floor().clamp(0, k - 2)
        weight = position - low
        low = low.long()
        return self.values[low] * (1.0 - weight) + self.values[low + 1] * weight


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
        law_knots: knots of a learnable piecewise-linear intensity curve ``L`` (0: off): the output is
            ``tanh(R(x) + P(x) + L(x))``, ``L`` evenly spaced on [-1, 1] and starting at the identity; the trainer can
            set it to a law fitted before training (:mod:`ct2mr.training.intensity_law`, :meth:`set_intensity_law`).

    Parameter names (state-dict keys) for a given configuration never change: checkpoints written by earlier
    versions keep loading.

    Raises:
        ValueError: ``base_channels < 1``, ``n_blocks < 0``, ``law_knots`` 1 or negative, or an unknown norm name.

    Input (B, in_channels, D, H, W) with D, H, W multiples of 4 (the preprocessing pads to a multiple of K = 16);
    output (B, out_channels, D, H, W) in [-1, 1].
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 1, base_channels: int = 64, n_blocks: int = 9,
                 norm: str = "instance", pointwise: int = 0, law_knots: int = 0) -> None:
        super().__init__()
        if base_channels < 1 or n_blocks < 0 or pointwise < 0 or law_knots < 0 or law_knots == 1:
            raise ValueError(f"base_channels must be >= 1, n_blocks and pointwise >= 0, law_knots 0 or >= 2, got "
                             f"{base_channels}, {n_blocks}, {pointwise}, {law_knots}.")
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
        self.law = IntensityCurve(law_knots) if law_knots else None
        if pointwise or law_knots:
            # the Tanh moves after the sum; it has no parameters, so the state-dict keys of ``model`` do not change
            layers.pop()
            nn.init.zeros_(layers[-1].weight)
            nn.init.zeros_(layers[-1].bias)
        if pointwise:
            h = int(pointwise)
            self.pointwise = nn.Sequential(
                nn.Conv3d(in_channels, h, 1), nn.LeakyReLU(0.2, True), nn.Conv3d(h, h, 1), nn.LeakyReLU(0.2, True),
                nn.Conv3d(h, out_channels, 1))
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, D, H, W) -> (B, C_out, D, H, W) in [-1, 1]; D, H, W must be multiples of 4."""
        if any(s % 4 for s in x.shape[2:]):
            raise ValueError(f"ResnetGenerator3D needs D, H, W divisible by 4, got {tuple(x.shape[2:])}.")
        if self.pointwise is None and self.law is None:
            return self.model(x)
        out = self.model(x)
        if self.pointwise is not None:
            out = out + self.pointwise(x)
        if self.law is not None:
            out = out + self.law(x)
        return torch.tanh(out)

    def curve_output(self, x: torch.Tensor) -> torch.Tensor:
        """The per-voxel part alone, ``tanh(P(x) + L(x))`` (B, C_out, D, H, W) in [-1, 1]: what the generator gives
        without its ResNet branch ``R``. ``|G(x) - G.curve_output(x)|`` is what the context adds, which
        ``model.law.anchor`` penalises (issue 13).

        Raises:
            ValueError: the generator has neither an intensity curve nor a pointwise path.
        """
        if self.pointwise is None and self.law is None:
            raise ValueError("This generator has no per-voxel path: build it with law_knots > 0 or pointwise > 0.")
        out = self.law(x) if self.law is not None else 0.0
        if self.pointwise is not None:
            out = out + self.pointwise(x)
        return torch.tanh(out)

    def set_intensity_law(self, values: Sequence[float]) -> None:
        """Start the intensity curve ``L`` at a law (K values in [-1, 1] at evenly spaced knots; K = law_knots).

        Raises:
            ValueError: the generator has no curve, or ``values`` has the wrong length.
        """
        if self.law is None:
            raise ValueError("This generator has no intensity curve: build it with law_knots > 0.")
        self.law.set_values(values)
