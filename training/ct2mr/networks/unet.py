"""3D U-Net and 3D U-Net++ generators (thesis section 6.2, models M2/M3).

Both are encoder-decoders over ``depth`` scales. Level i (0 = full resolution) has ``base_channels * 2**i``
channels (capped at 16x); the encoder node of level i > 0 is a stride-2 3^3 convolution (downsampling) then a 3^3
convolution, each followed by the selected normalisation and ReLU. Upsampling is resize-convolution (trilinear x2
then 3^3 convolution, no transposed convolutions: no checkerboard artefacts). The output is a 1^3 convolution and
tanh, so outputs are in [-1, 1] like the normalised inputs (section 4.3).

* :class:`UNet3D`: decoder node i = conv block(cat(encoder i, up(decoder i + 1))).
* :class:`UNetPlusPlus3D` (Zhou et al. 2018): nested dense skips; node X(i, j), j >= 1, is
  conv block(cat(X(i, 0), ..., X(i, j - 1), up(X(i + 1, j - 1)))) and the output is read from X(0, depth)
  (no deep supervision).

3^3 convolutions use replicate padding, as the ResNet generator does, which softens borders of sliding windows.
"""

from __future__ import annotations

import torch
from torch import nn

from ct2mr.networks.norm import make_norm

__all__ = ["UNet3D", "UNetPlusPlus3D", "MAX_DEPTH"]

MAX_DEPTH = 6


def _conv(cin: int, cout: int, norm: str, stride: int = 1) -> list[nn.Module]:
    padding_mode = "replicate" if stride == 1 else "zeros"
    return [nn.Conv3d(cin, cout, 3, stride=stride, padding=1, padding_mode=padding_mode), make_norm(norm, cout),
            nn.ReLU(inplace=True)]


def _block(cin: int, cout: int, norm: str) -> nn.Sequential:
    """Two (3^3 conv -> norm -> ReLU): (B, cin, D, H, W) -> (B, cout, D, H, W)."""
    return nn.Sequential(*_conv(cin, cout, norm), *_conv(cout, cout, norm))


def _down(cin: int, cout: int, norm: str) -> nn.Sequential:
    """Stride-2 conv then 3^3 conv: (B, cin, D, H, W) -> (B, cout, D/2, H/2, W/2)."""
    return nn.Sequential(*_conv(cin, cout, norm, stride=2), *_conv(cout, cout, norm))


def _up(cin: int, cout: int, norm: str) -> nn.Sequential:
    """Resize-convolution: trilinear x2 then 3^3 conv: (B, cin, D, H, W) -> (B, cout, 2D, 2H, 2W)."""
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="trilinear", align_corners=False), *_conv(cin, cout, norm))


class _UNetBase(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, base_channels: int, depth: int, norm: str) -> None:
        super().__init__()
        if base_channels < 1 or in_channels < 1 or out_channels < 1:
            raise ValueError(f"Channel counts must be >= 1, got in={in_channels}, out={out_channels}, "
                             f"base={base_channels}.")
        if not 1 <= depth <= MAX_DEPTH:
            raise ValueError(f"depth (number of downsamplings) must be in 1..{MAX_DEPTH}, got {depth}.")
        self.depth = depth
        self.channels = [base_channels * min(2 ** i, 16) for i in range(depth + 1)]
        make_norm(norm, 1)  # validates the name up front
        self.encoder = nn.ModuleList([_block(in_channels, self.channels[0], norm)]
                                     + [_down(self.channels[i - 1], self.channels[i], norm)
                                        for i in range(1, depth + 1)])
        self.head = nn.Sequential(nn.Conv3d(self.channels[0], out_channels, 1), nn.Tanh())

    def _check(self, x: torch.Tensor) -> None:
        k = 2 ** self.depth
        if x.ndim != 5 or any(s % k for s in x.shape[2:]):
            raise ValueError(f"{type(self).__name__} with depth {self.depth} needs a (B, C, D, H, W) input with "
                             f"D, H, W divisible by {k}, got {tuple(x.shape)}.")


class UNet3D(_UNetBase):
    """3D U-Net generator G (CT -> MR) or F (MR -> CT).

    Args:
        in_channels: input channels (1).
        out_channels: output channels (1).
        base_channels: channels at full resolution; level i has ``base_channels * 2**i`` (at most 16x).
        depth: number of stride-2 downsamplings, 1..6 (default 4).
        norm: a name of :data:`ct2mr.networks.norm.NORMS`.

    Input (B, in_channels, D, H, W) with D, H, W divisible by ``2**depth`` (the preprocessing pads to a multiple of
    K = 16, enough for depth 4); output (B, out_channels, D, H, W) in [-1, 1].

    Raises:
        ValueError: bad channel counts, depth or norm name.
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 1, base_channels: int = 32, depth: int = 4,
                 norm: str = "instance") -> None:
        super().__init__(in_channels, out_channels, base_channels, depth, norm)
        c = self.channels
        self.up = nn.ModuleList([_up(c[i + 1], c[i], norm) for i in range(depth)])
        self.decoder = nn.ModuleList([_block(2 * c[i], c[i], norm) for i in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, D, H, W) -> (B, C_out, D, H, W) in [-1, 1]; D, H, W divisible by ``2**depth``.

        Raises:
            ValueError: sizes not divisible by ``2**depth``.
        """
        self._check(x)
        skips = []
        for enc in self.encoder:
            x = enc(x)
            skips.append(x)
        x = skips.pop()
        for i in reversed(range(self.depth)):
            x = self.decoder[i](torch.cat([skips[i], self.up[i](x)], dim=1))
        return self.head(x)


class UNetPlusPlus3D(_UNetBase):
    """3D U-Net++ generator (nested dense skip pathways; Zhou et al. 2018; thesis section 6.2).

    Args:
        in_channels: input channels (1).
        out_channels: output channels (1).
        base_channels: channels at full resolution; level i has ``base_channels * 2**i`` (at most 16x).
        depth: number of stride-2 downsamplings, 1..6 (default 4).
        norm: a name of :data:`ct2mr.networks.norm.NORMS`.

    Input (B, in_channels, D, H, W) with D, H, W divisible by ``2**depth``; output (B, out_channels, D, H, W) in
    [-1, 1], read from the last full-resolution node X(0, depth).

    Raises:
        ValueError: bad channel counts, depth or norm name.
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 1, base_channels: int = 32, depth: int = 4,
                 norm: str = "instance") -> None:
        super().__init__(in_channels, out_channels, base_channels, depth, norm)
        c = self.channels
        self.up = nn.ModuleDict()
        self.nodes = nn.ModuleDict()
        for j in range(1, depth + 1):
            for i in range(depth + 1 - j):
                self.up[f"{i}_{j}"] = _up(c[i + 1], c[i], norm)
                self.nodes[f"{i}_{j}"] = _block((j + 1) * c[i], c[i], norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, D, H, W) -> (B, C_out, D, H, W) in [-1, 1]; D, H, W divisible by ``2**depth``.

        Raises:
            ValueError: sizes not divisible by ``2**depth``.
        """
        self._check(x)
        grid: list[list[torch.Tensor]] = []
        for enc in self.encoder:
            x = enc(x)
            grid.append([x])
        for j in range(1, self.depth + 1):
            for i in range(self.depth + 1 - j):
                up = self.up[f"{i}_{j}"](grid[i + 1][j - 1])
                grid[i].append(self.nodes[f"{i}_{j}"](torch.cat([*grid[i][:j], up], dim=1)))
        return self.head(grid[0][self.depth])
