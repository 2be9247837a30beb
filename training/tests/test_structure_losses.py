"""MIND-SSC and 3D PatchNCE (issue 13) against properties that must hold, on real CT structure where it matters."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ct2mr.losses import PatchSampleHead, default_nce_layers, encoder_features, mind_loss, mind_ssc, patch_nce_loss
from ct2mr.losses.mind import SSC_PAIRS
from ct2mr.networks import ResnetGenerator3D


def _phantom(seed: int = 0, size: int = 32) -> torch.Tensor:
    """A smooth random 'anatomy' in [-1, 1]: blobs of several intensities, (1, 1, size, size, size)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 1, size // 4, size // 4, size // 4, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(coarse, size=(size,) * 3, mode="trilinear", align_corners=False)


def test_ssc_has_twelve_pairs_at_sqrt2():
    assert len(SSC_PAIRS) == 12
    for p, q in SSC_PAIRS:
        assert sum((a - b) ** 2 for a, b in zip(p, q)) == 2


def test_mind_descriptor_shape_range_and_gain_invariance():
    x = _phantom()
    d = mind_ssc(x)
    assert d.shape == (1, 12, 32, 32, 32)
    assert float(d.min()) > 0 and float(d.max()) == pytest.approx(1.0)
    assert torch.allclose(d.amax(1), torch.ones(1, 32, 32, 32))
    assert torch.allclose(mind_ssc(3.0 * x - 0.5), d, atol=1e-5)


def test_mind_loss_zero_against_itself():
    x = _phantom()
    assert mind_loss(x, x).item() == 0.0


def _tissues(seed: int = 1, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """A piecewise-constant 'body' of 4 tissue classes (blocks of 4^3 voxels), as CT-like and MR-like intensities
    whose order differs (CT: -0.9, -0.1, 0.1, 0.9; MR: -0.9, 0.8, 0.0, -0.4, i.e. fat bright and bone dark)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (1, 1, size // 8, size // 8, size // 8), generator=g)
    labels = torch.nn.functional.interpolate(labels.float(), size=(size,) * 3, mode="nearest").long()
    ct = torch.tensor([-0.9, -0.1, 0.1, 0.9])[labels]
    mr = torch.tensor([-0.9, 0.8, 0.0, -0.4])[labels]
    return ct, mr


def test_mind_loss_prefers_a_nonmonotone_remap_over_a_shift():
    """A non-monotone intensity law (the CT -> MR situation) keeps the structure; a 3-voxel shift moves it."""
    x, remapped = _tissues()
    shifted = torch.roll(x, shifts=3, dims=4)
    same_structure = mind_loss(x, remapped).item()
    moved = mind_loss(x, shifted).item()
    assert same_structure < 0.5 * moved


def test_mind_loss_mask_and_errors():
    x, y = _phantom(2), _phantom(3)
    mask = torch.zeros_like(x)
    mask[..., 8:24, 8:24, 8:24] = 1
    assert mind_loss(x, y, mask=mask).item() != pytest.approx(mind_loss(x, y).item())
    with pytest.raises(ValueError, match="equal shapes"):
        mind_loss(x, y[..., :16])
    with pytest.raises(ValueError, match="B, 1"):
        mind_ssc(torch.zeros(1, 2, 8, 8, 8))


def test_patch_nce_lower_for_matching_than_shuffled_features():
    g = torch.Generator().manual_seed(0)
    key = torch.nn.functional.normalize(torch.randn(2, 64, 16, generator=g), dim=-1)
    query = torch.nn.functional.normalize(key + 0.1 * torch.randn(2, 64, 16, generator=g), dim=-1)
    shuffled = query[:, torch.randperm(64, generator=g)]
    matching, wrong = patch_nce_loss(query, key).item(), patch_nce_loss(shuffled, key).item()
    assert matching < 0.1 < math.log(64) - 1 < wrong
    with pytest.raises(ValueError, match="temperature"):
        patch_nce_loss(query, key, temperature=0)


def test_patch_nce_through_a_generator_and_heads():
    torch.manual_seed(0)
    net = ResnetGenerator3D(base_channels=4, n_blocks=2, norm="none", pointwise=4)
    layers = default_nce_layers(net)
    x = _phantom(4, 16)
    feats = encoder_features(net, x, layers)
    assert len(feats) == len(layers) >= 3
    head = PatchSampleHead([f.shape[1] for f in feats], channels=8)
    index = [torch.randperm(f[0, 0].numel())[:32] for f in feats]
    keys = head(feats, index)
    assert all(k.shape == (1, 32, 8) for k in keys)
    assert torch.allclose(keys[0].norm(dim=-1), torch.ones(1, 32), atol=1e-5)
    same = sum(patch_nce_loss(k, k) for k in keys)
    same.backward()  # gradients reach the heads
    assert head.mlps[0][0].weight.grad is not None


def test_pointwise_generator_keeps_constant_windows_off_mid_grey():
    """Issue 13: an air-only window must not come out as instance norm's mid-grey."""
    torch.manual_seed(0)
    net = ResnetGenerator3D(base_channels=4, n_blocks=1, norm="instance", pointwise=8)
    with torch.no_grad():
        net.pointwise[-1].bias.fill_(-3.0)  # the intensity path says: air -> about -1
        air = net(torch.full((1, 1, 16, 16, 16), -1.0))
    assert float(air.max()) < -0.99  # the ResNet's last convolution starts at zero
    keys = set(ResnetGenerator3D(base_channels=4, n_blocks=1).state_dict())
    assert keys <= set(net.state_dict())  # checkpoints without the path keep their parameter names
