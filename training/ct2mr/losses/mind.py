"""MIND-SSC: a modality-independent structure descriptor and the structure loss between x and G(x).

The modality independent neighbourhood descriptor (MIND; Heinrich et al., Medical Image Analysis 16(7), 2012) describes
each voxel by how similar the small patches around it are to each other, normalised by a local variance estimate, so
that it depends on the local structure and not on the intensity law: the same anatomy imaged as CT and as MR has
nearly the same descriptor. The self-similarity-context variant MIND-SSC (Heinrich et al., MICCAI 2013, "Towards
realtime multimodal fusion for image-guided interventions using self-similarities") compares the 12 pairs of
six-neighbourhood voxels that lie sqrt(2) apart instead of each voxel with its neighbours, which is more robust to
noise.

For an image I, a pair (p, q) of neighbourhood offsets (scaled by the dilation ``d``):

    D_pq(v) = G * (I(v + p) - I(v + q))^2          (patch distance: mean over a small box around v)
    V(v)    = mean over the 12 pairs of D_pq(v)    (local variance estimate)
    MIND_pq(v) = exp(-D_pq(v) / V(v)), divided by its maximum over the 12 pairs

Yang et al. (DLMIA 2018, "Unpaired brain MR-to-CT synthesis using a structure-constrained CycleGAN") add
``|MIND(x) - MIND(G(x))|`` to the CycleGAN objective so that G may change the intensity law but not the structure;
:func:`mind_loss` is that term.

Shapes: (B, 1, D, H, W) torch tensors; the descriptor is (B, 12, D, H, W). No file I/O.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["SSC_PAIRS", "mind_ssc", "mind_loss"]

_SIX = ((1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1))
#: The 12 pairs of six-neighbourhood offsets (z, y, x) at squared distance 2 (MIND-SSC's self-similarity context).
SSC_PAIRS: tuple[tuple[tuple[int, int, int], tuple[int, int, int]], ...] = tuple(
    (_SIX[i], _SIX[j]) for i in range(6) for j in range(i + 1, 6)
    if sum((a - b) ** 2 for a, b in zip(_SIX[i], _SIX[j])) == 2)


def _shift(padded: torch.Tensor, offset: tuple[int, int, int], r: int, shape: tuple[int, ...]) -> torch.Tensor:
    """``I(v + offset)`` from an image padded by ``r`` on every side."""
    dz, dy, dx = offset
    d, h, w = shape
    return padded[..., r + dz:r + dz + d, r + dy:r + dy + h, r + dx:r + dx + w]


def mind_ssc(image: torch.Tensor, dilation: int = 2, patch_radius: int = 1, eps: float = 1e-6) -> torch.Tensor:
    """The MIND-SSC descriptor of each voxel.

    Args:
        image: (B, 1, D, H, W), any intensity unit (the descriptor is invariant to a global gain and offset).
        dilation: spacing of the six-neighbourhood in voxels (2: neighbours 2 voxels away, pairs 2*sqrt(2) apart).
        patch_radius: half-size of the box over which the squared differences are averaged (1: 3^3).
        eps: floor of the variance estimate, relative to the image's mean variance estimate (flat regions).

    Returns:
        (B, 12, D, H, W) in (0, 1], the maximum over the 12 channels is 1 at every voxel.

    Raises:
        ValueError: not a one-channel 5D tensor, or dilation/patch_radius < 1.
    """
    if image.ndim != 5 or image.shape[1] != 1:
        raise ValueError(f"mind_ssc expects (B, 1, D, H, W), got {tuple(image.shape)}.")
    if dilation < 1 or patch_radius < 1:
        raise ValueError(f"dilation and patch_radius must be >= 1, got {dilation}, {patch_radius}.")
    image = image.float()
    shape = tuple(image.shape[2:])
    padded = F.pad(image, (dilation,) * 6, mode="replicate")
    distances = []
    for p, q in SSC_PAIRS:
        a = _shift(padded, tuple(dilation * v for v in p), dilation, shape)
        b = _shift(padded, tuple(dilation * v for v in q), dilation, shape)
        distances.append((a - b) ** 2)
    k = 2 * patch_radius + 1
    dist = torch.cat(distances, 1)
    dist = F.avg_pool3d(F.pad(dist, (patch_radius,) * 6, mode="replicate"), k, stride=1)
    variance = dist.mean(1, keepdim=True)
    floor = variance.mean(dim=(2, 3, 4), keepdim=True) * 1e-3 + eps
    variance = torch.maximum(variance, floor)
    descriptor = torch.exp(-dist / variance)
    return descriptor / descriptor.amax(1, keepdim=True)


def mind_loss(x: torch.Tensor, y: torch.Tensor, dilation: int = 2, patch_radius: int = 1,
              mask: torch.Tensor | None = None) -> torch.Tensor:
    """Structure loss ``mean |MIND-SSC(x) - MIND-SSC(y)|`` (Yang et al., DLMIA 2018, with the SSC descriptor).

    Args:
        x, y: (B, 1, D, H, W) images of the same anatomy in any two modalities (e.g. x and G(x)).
        dilation, patch_radius: see :func:`mind_ssc`.
        mask: optional (B, 1, D, H, W) weights (e.g. the body); the mean is taken over weighted voxels.

    Returns:
        Scalar tensor >= 0; 0 when ``y`` is ``x`` (or a gain/offset of it).

    Raises:
        ValueError: shapes differ or are not (B, 1, D, H, W).
    """
    if x.shape != y.shape:
        raise ValueError(f"mind_loss needs equal shapes, got {tuple(x.shape)} and {tuple(y.shape)}.")
    diff = (mind_ssc(x, dilation, patch_radius) - mind_ssc(y, dilation, patch_radius)).abs().mean(1, keepdim=True)
    if mask is None:
        return diff.mean()
    weights = mask.float()
    return (diff * weights).sum() / weights.sum().clamp_min(1.0)
