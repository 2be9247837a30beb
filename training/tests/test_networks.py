"""Generators and discriminators: shapes, output range, receptive field (thesis section 6.2)."""

from __future__ import annotations

import pytest
import torch

from ct2mr.networks import PatchDiscriminator3D, ResnetGenerator3D, build_discriminator, build_generator
from ct2mr.networks.patchgan import receptive_field


def test_resnet_generator_keeps_shape_and_outputs_tanh_range():
    net = ResnetGenerator3D(base_channels=4, n_blocks=9).eval()
    x = torch.randn(2, 1, 16, 24, 32) * 3
    with torch.no_grad():
        y = net(x)
    assert y.shape == x.shape
    assert y.abs().max() <= 1.0
    # ResNet-9b: stem + 2 down + 9 blocks (2 convs each) + 2 resize-convs + output = 24 convolutions
    assert sum(isinstance(m, torch.nn.Conv3d) for m in net.modules()) == 24
    assert sum(isinstance(m, torch.nn.Upsample) for m in net.modules()) == 2


def test_generator_refuses_sizes_not_divisible_by_4():
    with pytest.raises(ValueError, match="divisible by 4"):
        ResnetGenerator3D(base_channels=2, n_blocks=1)(torch.zeros(1, 1, 16, 16, 18))


def test_patchgan_receptive_field_and_output_shape():
    assert receptive_field(3) == 70  # the pix2pix / CycleGAN 70x70 PatchGAN, in 3D
    d = PatchDiscriminator3D(base_channels=4)
    assert d.receptive_field == 70
    assert d(torch.zeros(1, 1, 32, 32, 32)).shape == (1, 1, 2, 2, 2)


def test_factory_validates_names():
    assert isinstance(build_generator({"name": "resnet", "base_channels": 2, "n_blocks": 1}), ResnetGenerator3D)
    assert isinstance(build_discriminator({"name": "patchgan", "base_channels": 2}), PatchDiscriminator3D)
    with pytest.raises(ValueError, match="Unknown generator"):
        build_generator({"name": "vit"})
    with pytest.raises(ValueError, match="Bad arguments"):
        build_generator({"name": "resnet", "width": 3})
