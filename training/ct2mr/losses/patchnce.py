"""PatchNCE in 3D: contrastive structure preservation between x and G(x) (Park, Efros, Zhang and Zhu, "Contrastive
Learning for Unpaired Image-to-Image Translation", ECCV 2020, section 3.2 and eq. 3).

The generator's encoder features of the input x and of its translation G(x) are sampled at the same N voxel
locations, passed through a small two-layer MLP head per layer (H_l) and L2-normalised. For each location, the
feature of G(x) (the query) must pick out the feature of x at the same location (the positive) among the features of
x at the other N - 1 locations (the negatives): a cross-entropy over N candidates with temperature tau = 0.07 (the
paper's value). Summed over the chosen layers, averaged over locations.

Here the encoder is the generator itself: :func:`encoder_features` takes the outputs of chosen layers of a
``nn.Sequential`` generator body (forward hooks, no change to the network), so every generator of the family can be
used. Shapes: features (B, C_l, D_l, H_l, W_l); no file I/O.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PatchSampleHead", "patch_nce_loss", "encoder_features", "default_nce_layers"]


class PatchSampleHead(nn.Module):
    """The projection heads H_l of PatchNCE: one two-layer MLP (C_l -> C -> C, ReLU) per encoder layer.

    Args:
        in_channels: channels C_l of each sampled layer.
        channels: projection width C (the paper: 256; a CPU model does well with 64).

    Raises:
        ValueError: no layers or a width < 1.
    """

    def __init__(self, in_channels: Sequence[int], channels: int = 64) -> None:
        super().__init__()
        if not in_channels or channels < 1:
            raise ValueError(f"PatchSampleHead needs at least one layer and channels >= 1, got {in_channels}, "
                             f"{channels}.")
        self.mlps = nn.ModuleList(nn.Sequential(nn.Linear(int(c), channels), nn.ReLU(True),
                                                nn.Linear(channels, channels)) for c in in_channels)

    def forward(self, features: Sequence[torch.Tensor], index: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Project the features at the sampled locations.

        Args:
            features: per layer (B, C_l, D_l, H_l, W_l).
            index: per layer a (N,) long tensor of flat voxel indices into D_l * H_l * W_l.

        Returns:
            Per layer (B, N, C), L2-normalised along C.
        """
        out = []
        for mlp, feat, idx in zip(self.mlps, features, index):
            flat = feat.flatten(2).transpose(1, 2)[:, idx]  # (B, N, C_l)
            out.append(F.normalize(mlp(flat.float()), dim=-1))
        return out


def patch_nce_loss(query: torch.Tensor, key: torch.Tensor, temperature: float = 0.07) -> torch.Tensor:
    """InfoNCE over locations (Park et al. 2020, eq. 3): query i must match key i among all N keys.

    Args:
        query: (B, N, C) projected, L2-normalised features of G(x).
        key: (B, N, C) those of x at the same N locations (detached: the positive and negatives are targets).
        temperature: tau (0.07).

    Returns:
        Scalar mean cross-entropy; log N for random features, near 0 when each query matches its own key.

    Raises:
        ValueError: shapes differ or temperature <= 0.
    """
    if query.shape != key.shape or query.ndim != 3:
        raise ValueError(f"patch_nce_loss needs two (B, N, C) tensors, got {tuple(query.shape)}, {tuple(key.shape)}.")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    logits = torch.bmm(query, key.detach().transpose(1, 2)) / temperature  # (B, N, N): positives on the diagonal
    target = torch.arange(query.shape[1], device=query.device).expand(query.shape[0], -1)
    return F.cross_entropy(logits.flatten(0, 1), target.flatten())


def default_nce_layers(net: nn.Module) -> list[int]:
    """Indices of the layers PatchNCE samples in a generator's ``model`` (``nn.Sequential``): the stem's activation,
    each downsampling activation and the first and middle residual blocks (as CUT samples its ResNet encoder).

    Raises:
        ValueError: the generator has no ``model`` Sequential.
    """
    body = getattr(net, "model", None)
    if not isinstance(body, nn.Sequential):
        raise ValueError("PatchNCE needs a generator whose layers are an nn.Sequential named 'model'.")
    relus = [i for i, m in enumerate(body) if isinstance(m, nn.ReLU)]
    blocks = [i for i, m in enumerate(body) if type(m).__name__.endswith("Block3D")]
    layers = relus[:3] + (blocks[:1] + blocks[len(blocks) // 2:len(blocks) // 2 + 1] if blocks else [])
    return sorted(set(layers))


def encoder_features(net: nn.Module, x: torch.Tensor, layers: Sequence[int]) -> list[torch.Tensor]:
    """Outputs of ``net.model[i]`` for ``i`` in ``layers`` on input x, running only as far as the last of them.

    Args:
        net: a generator with an ``nn.Sequential`` ``model``.
        x: (B, 1, D, H, W).
        layers: indices into ``net.model``.

    Returns:
        Per layer (B, C_l, D_l, H_l, W_l), in the order of ``layers``.
    """
    body = net.model
    wanted = set(layers)
    out: dict[int, torch.Tensor] = {}
    h = x
    for i, module in enumerate(body):
        h = module(h)
        if i in wanted:
            out[i] = h
        if len(out) == len(wanted):
            break
    return [out[i] for i in layers]
