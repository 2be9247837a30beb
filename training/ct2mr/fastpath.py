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
- **Separable 2x trilinear up-sampling** (the resize-convolution decoders): three 1D passes with the exact weights
  0.25/0.75 instead of PyTorch's generic CPU kernel, 16 channels 48^3 -> 96^3: 50 ms -> 24 ms.
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

__all__ = ["DepthSplitConv3d", "TrilinearUpsample2x", "optimize_for_inference", "tune_cpu_allocator"]

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
        for dim in (4, 3, 2):
            n = x.shape[dim]
            before = torch.cat([x.narrow(dim, 0, 1), x.narrow(dim, 0, n - 1)], dim)
            after = torch.cat([x.narrow(dim, 1, n - 1), x.narrow(dim, n - 1, 1)], dim)
            even = before.mul_(0.25).add_(x, alpha=0.75)
            odd = after.mul_(0.25).add_(x, alpha=0.75)
            x = torch.stack([even, odd], dim + 1).flatten(dim, dim + 1)
        return x


def _is_trilinear_2x(module: nn.Module) -> bool:
    if type(module) is not nn.Upsample or module.mode != "trilinear" or module.align_corners or module.size:
        return False
    factor = module.scale_factor
    factors = factor if isinstance(factor, (tuple, list)) else (factor,) * 3
    return all(float(f) == 2.0 for f in factors)


def _cpu_rewrite(conv: nn.Module) -> nn.Module | None:
    if _is_trilinear_2x(conv):
        return TrilinearUpsample2x()
    if type(conv) is not nn.Conv3d:
        return None
    plain = tuple(conv.stride) == (1, 1, 1) and tuple(conv.dilation) == (1, 1, 1) and conv.groups == 1
    if plain and conv.out_channels <= 4 and conv.kernel_size[0] >= 5:
        return DepthSplitConv3d(conv)
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
