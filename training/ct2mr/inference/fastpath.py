"""The inference fast path: the same generator, rewritten for speed on the device it runs on.

:func:`optimize_for_inference` returns a copy of a trained generator (ResNet, U-Net, U-Net++ of
:mod:`ct2mr.networks`, or any module built of ``nn.Conv3d``) whose convolutions compute the same function with
kernels that are faster on that device. The weights are the checkpoint's, unchanged; results differ from the
plain module only by floating-point summation order (measured max abs difference below 1e-5 on the [-1, 1]
output scale in fp32; ``training/tests/test_fastpath.py`` is the guard).

Rewrites, each measured with oneDNN on an AVX-512 CPU (torch 2.13, one thread; ``benchmarks/RESULTS.md``):

- **Depth-split convolution** for few output channels and a deep kernel (the ResNet generator's 7^3 output
  convolution, C_out = 1): oneDNN runs a C_out = 1 convolution at a few GFLOP/s. The k_d depth taps are moved into
  the output channels, ``W'[(i, o), c, :, :] = W[o, c, i, :, :]``, one 2D convolution over every (padded) z slice
  computes all of them, and the k_d partial volumes are summed with a shift of i slices each:
  ``y[o, z] = b[o] + sum_i conv2d(x[:, z + i], W'[(i, o)])``. 8 -> 1 channels at 96^3: 300 ms -> 56 ms; 64 -> 1:
  2.5 s -> 0.43 s.
- **Up-sampling fused into the next convolution** (the resize-convolution decoders: 2x trilinear, then a 3^3
  replicate-padded convolution): 8 phase kernels at the low resolution, :class:`UpsampleConv3d`; 106 ms -> 32 ms for
  the ResNet generator's last decoder stage. Up-sampling not followed by such a convolution is computed as three
  separable 1D passes with the exact weights 0.25/0.75 (:class:`TrilinearUpsample2x`, 2x PyTorch's CPU kernel).
- Other CPU layers stay as they are: ``channels_last_3d`` on the CPU was measured no faster for any layer of the
  generators once the layout conversions are counted.
- On CUDA the whole module is converted to ``channels_last_3d`` (cuDNN's fast NDHWC kernels under autocast) and no
  layer is rewritten: cuDNN has efficient kernels for every shape here.

:func:`tune_cpu_allocator` keeps glibc from handing each large activation back to the operating system after every
layer (every 96^3 window otherwise page-faults its ~100 MB of activations in again): one window of the default
model 0.43 s -> 0.31 s. It is process-wide, so only the ``ct2mr translate`` command calls it.
"""

from __future__ import annotations

import copy
import ctypes
import ctypes.util
import logging

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DepthSplitConv3d", "TrilinearUpsample2x", "UpsampleConv3d", "optimize_for_inference", "tune_cpu_allocator"]

logger = logging.getLogger(__name__)


def _pad_amounts(conv: nn.Conv3d) -> tuple[int, ...]:
    """F.pad amounts (x_lo, x_hi, y_lo, y_hi, z_lo, z_hi) equivalent to ``conv``'s own padding."""
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return (0,) * 6
        amounts = []  # "same", stride 1
        for k, d in zip(reversed(conv.kernel_size), reversed(conv.dilation)):
            total = d * (k - 1)
            amounts += [total // 2, total - total // 2]
        return tuple(amounts)
    return tuple(p for p in reversed(conv.padding) for _ in range(2))


def _pad(x: torch.Tensor, conv: nn.Conv3d) -> torch.Tensor:
    amounts = _pad_amounts(conv)
    if not any(amounts):
        return x
    if conv.padding_mode == "zeros":
        return F.pad(x, amounts)
    return F.pad(x, amounts, mode=conv.padding_mode)


class DepthSplitConv3d(nn.Module):
    """A stride-1 ``nn.Conv3d`` computed as one 2D (k_h, k_w) convolution of every z slice into k_d x C_out channels,
    plus a sum shifted along z.

    Same function and weights as ``conv`` (see the module docstring for the identity); faster on CPUs when C_out
    is small and k_d large.

    Args:
        conv: the convolution to replace: stride 1, dilation 1, groups 1.

    Raises:
        ValueError: ``conv`` is strided, dilated or grouped.

    Shapes: input (B, C_in, D, H, W) -> output (B, C_out, D', H', W') exactly as ``conv``.
    """

    def __init__(self, conv: nn.Conv3d) -> None:
        super().__init__()
        if tuple(conv.stride) != (1, 1, 1) or tuple(conv.dilation) != (1, 1, 1) or conv.groups != 1:
            raise ValueError("DepthSplitConv3d needs a stride-1, undilated, ungrouped convolution.")
        self.conv = conv
        k_d = conv.kernel_size[0]
        weight = conv.weight.detach()
        self.register_buffer("split_weight", weight.permute(2, 0, 1, 3, 4).reshape(
            k_d * conv.out_channels, conv.in_channels, *conv.kernel_size[1:]).contiguous(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``conv(x)``: (B, C_in, D, H, W) -> (B, C_out, D', H', W'), in ``x``'s dtype."""
        conv = self.conv
        x = _pad(x, conv)
        k_d, c_out = conv.kernel_size[0], conv.out_channels
        b, c_in, d_pad, h_pad, w_pad = x.shape
        slices = x.transpose(1, 2).reshape(b * d_pad, c_in, h_pad, w_pad)  # every padded z slice as a 2D image
        parts = F.conv2d(slices, self.split_weight.to(x.dtype))  # (B * D_pad, k_d * C_out, H', W')
        parts = parts.view(b, d_pad, k_d, c_out, *parts.shape[2:])
        depth = d_pad - k_d + 1
        out = parts[:, 0:depth, 0].clone()  # (B, D', C_out, H', W')
        for i in range(1, k_d):
            out += parts[:, i:i + depth, i]
        if conv.bias is not None:
            out += conv.bias.to(out.dtype).view(1, 1, -1, 1, 1)
        return out.transpose(1, 2).contiguous()


class TrilinearUpsample2x(nn.Module):
    """``nn.Upsample(scale_factor=2, mode="trilinear", align_corners=False)`` as three separable 1D passes.

    Along each axis, output 2i is ``0.25 x[i-1] + 0.75 x[i]`` and 2i+1 is ``0.75 x[i] + 0.25 x[i+1]`` (indices
    clamped to the edge): exactly PyTorch's trilinear weights for a factor of 2 (the weights are exact in binary
    floating point), computed with vectorised tensor operations, about 2x faster than PyTorch's CPU kernel.

    Shapes: (B, C, D, H, W) -> (B, C, 2D, 2H, 2W).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Up-sample ``x`` by 2 along z, y and x: (B, C, D, H, W) -> (B, C, 2D, 2H, 2W)."""
        for dim in (4, 3, 2):
            n = x.shape[dim]
            before = torch.cat([x.narrow(dim, 0, 1), x.narrow(dim, 0, n - 1)], dim)
            after = torch.cat([x.narrow(dim, 1, n - 1), x.narrow(dim, n - 1, 1)], dim)
            even = before.mul_(0.25).add_(x, alpha=0.75)
            odd = after.mul_(0.25).add_(x, alpha=0.75)
            x = torch.stack([even, odd], dim + 1).flatten(dim, dim + 1)
        return x


#: 1D trilinear x2 phases (align_corners=False, edges replicated): row t (conv tap -1, 0, +1) of output phase p
#: holds the weights of the low-resolution neighbours (-1, 0, +1) of voxel i that up-sampled voxel 2i + p + t is made of.
_PHASES = ((( 0.75, 0.25, 0.0), (0.25, 0.75, 0.0), (0.0, 0.75, 0.25)),
           ((0.25, 0.75, 0.0), (0.0, 0.75, 0.25), (0.0, 0.25, 0.75)))


class UpsampleConv3d(nn.Module):
    """``conv(upsample_2x_trilinear(x))`` for a 3^3, stride-1, replicate-padded ``conv``, as one low-resolution conv.

    Both steps are linear, so each of the 8 output phases (the parity of z, y, x) is a 3^3 convolution of the
    replicate-padded low-resolution input with the kernel ``K_p = w x_z M_pz x_y M_py x_x M_px`` (the 1D phase matrices
    :data:`_PHASES`, composed in float64): the 8 phase kernels are stacked into 8 x C_out output channels, computed in
    one convolution at the low resolution, and interleaved. Replicate padding of the up-sampled volume equals the
    up-sampling formula applied to the replicate-padded input (both give the edge voxel), so the result is the
    original's up to rounding. The up-sampling and the full-resolution convolution of the resize-convolution decoder
    (ResNet generator, 16 -> 8 channels, 48^3 -> 96^3) become one convolution 3x faster (106 ms -> 32 ms, one thread).

    Args:
        conv: the convolution after the up-sampling: kernel 3, stride 1, padding 1, dilation 1, groups 1, replicate.

    Raises:
        ValueError: any other convolution.

    Shapes: (B, C_in, D, H, W) -> (B, C_out, 2D, 2H, 2W).
    """

    def __init__(self, conv: nn.Conv3d) -> None:
        super().__init__()
        if not _fusable_after_upsampling(conv):
            raise ValueError("UpsampleConv3d needs a 3^3, stride-1, padding-1, replicate-padded convolution.")
        phases = torch.tensor(_PHASES, dtype=torch.float64)
        w = conv.weight.detach().to(torch.float64)
        kernels = [torch.einsum("ocabd,ai,bj,dk->ocijk", w, phases[pz], phases[py], phases[px])
                   for pz in (0, 1) for py in (0, 1) for px in (0, 1)]
        weight = torch.stack(kernels, 1).reshape(conv.out_channels * 8, conv.in_channels, 3, 3, 3)
        self.out_channels = conv.out_channels
        self.register_buffer("weight", weight.to(conv.weight.dtype), persistent=False)
        bias = None if conv.bias is None else conv.bias.detach().repeat_interleave(8)
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``conv(upsample_2x(x))``: (B, C_in, D, H, W) -> (B, C_out, 2D, 2H, 2W), in ``x``'s dtype."""
        b, _, d, h, w = x.shape
        bias = None if self.bias is None else self.bias.to(x.dtype)
        y = F.conv3d(F.pad(x, (1,) * 6, mode="replicate"), self.weight.to(x.dtype), bias)  # (B, 8 C_out, D, H, W)
        y = y.view(b, self.out_channels, 2, 2, 2, d, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)
        return y.reshape(b, self.out_channels, 2 * d, 2 * h, 2 * w)


def _fusable_after_upsampling(conv: nn.Module) -> bool:
    return (type(conv) is nn.Conv3d and tuple(conv.kernel_size) == (3, 3, 3) and tuple(conv.stride) == (1, 1, 1)
            and tuple(conv.padding) == (1, 1, 1) and tuple(conv.dilation) == (1, 1, 1) and conv.groups == 1
            and conv.padding_mode == "replicate")


def _fuse_upsampling(parent: nn.Module) -> int:
    """Replace ``Upsample(2x trilinear), Conv3d(3^3, replicate)`` pairs in a Sequential by :class:`UpsampleConv3d`."""
    if not isinstance(parent, nn.Sequential):
        return 0
    fused = 0
    names = list(parent._modules)
    for first, second in zip(names, names[1:]):
        up, conv = parent._modules[first], parent._modules[second]
        if _is_trilinear_2x(up) and _fusable_after_upsampling(conv):
            parent._modules[first] = nn.Identity()
            parent._modules[second] = UpsampleConv3d(conv)
            fused += 1
    return fused


def _is_trilinear_2x(module: nn.Module) -> bool:
    if type(module) is not nn.Upsample or module.mode != "trilinear" or module.align_corners or module.size:
        return False
    factor = module.scale_factor
    factors = factor if isinstance(factor, (tuple, list)) else (factor,) * 3
    return all(float(f) == 2.0 for f in factors)


def _cpu_rewrite(module: nn.Module) -> nn.Module | None:
    if _is_trilinear_2x(module):
        return TrilinearUpsample2x()
    if type(module) is not nn.Conv3d:
        return None
    plain = tuple(module.stride) == (1, 1, 1) and tuple(module.dilation) == (1, 1, 1) and module.groups == 1
    if plain and module.out_channels <= 4 and module.kernel_size[0] >= 5:
        return DepthSplitConv3d(module)
    return None


def optimize_for_inference(net: nn.Module, device: torch.device) -> nn.Module:
    """A copy of ``net`` in eval mode on ``device`` with layers rewritten for speed (module docstring).

    ``net`` itself is not changed. Shapes and outputs are those of ``net`` ((B, C, D, H, W) in and out), equal up to
    floating-point summation order.

    Args:
        net: a generator (any module; only its ``nn.Conv3d`` and 2x trilinear ``nn.Upsample`` layers are rewritten).
        device: where it will run; CPU gets the layer rewrites, CUDA the ``channels_last_3d`` layout.

    Returns:
        The optimised copy, with gradients off.
    """
    fast = copy.deepcopy(net).to(device).eval()
    fast.requires_grad_(False)
    if device.type == "cuda":
        return fast.to(memory_format=torch.channels_last_3d)
    if device.type != "cpu":
        return fast
    rewritten = 0
    for parent in list(fast.modules()):
        rewritten += _fuse_upsampling(parent)
        for name, child in list(parent.named_children()):
            replacement = _cpu_rewrite(child)
            if replacement is not None:
                setattr(parent, name, replacement)
                rewritten += 1
    logger.debug("fast path: %d layer(s) rewritten for the CPU", rewritten)
    return fast


_ALLOCATOR_TUNED = False


def tune_cpu_allocator(mmap_threshold: int = 1 << 30) -> bool:
    """Ask glibc's malloc to keep large freed blocks for reuse instead of unmapping them (process-wide).

    PyTorch's CPU allocator calls malloc/free for every activation; above glibc's mmap threshold each one is a fresh
    ``mmap`` whose pages fault in again on first touch. Raising the threshold and the trim threshold keeps those
    pages mapped: peak memory is unchanged, memory is returned to the system at exit rather than after every layer.

    Args:
        mmap_threshold: blocks up to this many bytes come from the heap (glibc's ``M_MMAP_THRESHOLD``).

    Returns:
        True when the settings were applied (glibc found), False elsewhere (musl, macOS, Windows: nothing changes).
    """
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED:
        return True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    ok = bool(mallopt(m_mmap_threshold, int(mmap_threshold))) and bool(mallopt(m_trim_threshold, 2 ** 31 - 1))
    _ALLOCATOR_TUNED = ok
    return ok
