"""The model family of issue 4 (thesis section 6.2): generators x normalisations, U-Net depths, switchable norm,
spectral norm, PatchGAN receptive fields, and the bundled checkpoint still loading."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from ct2mr.models.checkpoint import load_checkpoint
from ct2mr.networks import (GENERATORS, NORMS, PatchDiscriminator3D, ResnetGenerator3D, SwitchableNorm3d, UNet3D,
                            UNetPlusPlus3D, build_discriminator, build_generator, make_norm, receptive_field)

SPECS = {"resnet": {"name": "resnet", "base_channels": 2, "n_blocks": 9},
         "unet": {"name": "unet", "base_channels": 2, "depth": 4},
         "unetpp": {"name": "unetpp", "base_channels": 2, "depth": 4}}


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("name", GENERATORS)
def test_every_generator_and_norm_keeps_shape_and_tanh_range(name, norm):
    torch.manual_seed(0)
    net = build_generator({**SPECS[name], "norm": norm}).train()
    x = torch.randn(1, 1, 32, 32, 32) * 2
    with torch.no_grad():
        y = net(x)
    assert y.shape == x.shape
    assert torch.isfinite(y).all() and y.abs().max() <= 1.0
    # resize-convolution everywhere: trilinear upsampling, never a transposed convolution
    assert not any(isinstance(m, nn.ConvTranspose3d) for m in net.modules())
    ups = [m for m in net.modules() if isinstance(m, nn.Upsample)]
    assert ups and all(m.mode == "trilinear" and m.scale_factor == 2 for m in ups)
    expected = {"instance": nn.InstanceNorm3d, "batch": nn.BatchNorm3d, "layer": nn.GroupNorm,
                "switchable": SwitchableNorm3d}
    if norm in expected:
        assert any(isinstance(m, expected[norm]) for m in net.modules())
    else:
        assert not any(isinstance(m, tuple(expected.values())) for m in net.modules())


@pytest.mark.parametrize("cls", [UNet3D, UNetPlusPlus3D])
@pytest.mark.parametrize("depth, size", [(2, 16), (3, 24), (4, 32)])
def test_unet_depths(cls, depth, size):
    net = cls(base_channels=2, depth=depth, norm="instance")
    x = torch.randn(2, 1, size, size, size)
    with torch.no_grad():
        assert net(x).shape == x.shape
    # inputs must be divisible by 2**depth
    with pytest.raises(ValueError, match=f"divisible by {2 ** depth}"):
        net(torch.zeros(1, 1, size + 2 ** (depth - 1), size, size))


def test_unetpp_has_nested_dense_skips_and_every_node_trains():
    depth = 3
    net = UNetPlusPlus3D(base_channels=2, depth=depth, norm="instance")
    assert len(net.nodes) == depth * (depth + 1) // 2  # X(i, j) for j >= 1, i + j <= depth
    # node X(0, depth) concatenates X(0, 0..depth-1) and one upsampled input: (depth + 1) * c0 input channels
    assert net.nodes[f"0_{depth}"][0].in_channels == (depth + 1) * net.channels[0]
    net(torch.randn(1, 1, 16, 16, 16)).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


def test_unet_validates_depth_and_norm():
    with pytest.raises(ValueError, match="depth"):
        UNet3D(depth=0)
    with pytest.raises(ValueError, match="Unknown normalisation"):
        UNetPlusPlus3D(base_channels=2, depth=2, norm="group")


def test_resnet_6_blocks():
    net = build_generator({"name": "resnet", "base_channels": 2, "n_blocks": 6, "norm": "layer"})
    # stem + 2 down + 6 blocks x 2 + 2 resize-convs + output
    assert sum(isinstance(m, nn.Conv3d) for m in net.modules()) == 18
    with torch.no_grad():
        assert net(torch.randn(1, 1, 16, 16, 16)).shape == (1, 1, 16, 16, 16)


def test_bundled_default_checkpoint_still_loads_with_unchanged_keys():
    ckpt = load_checkpoint()  # strict load_state_dict inside: any renamed parameter fails here
    spec = ckpt.architecture["generator"]
    assert spec["name"] == "resnet"
    assert list(ResnetGenerator3D(**{k: v for k, v in spec.items() if k != "name"}).state_dict()) == \
        list(ckpt.G.state_dict())
    with torch.no_grad():
        assert ckpt.G(torch.zeros(1, 1, 16, 16, 16)).shape == (1, 1, 16, 16, 16)


# ---------------------------------------------------------------- normalisations

@pytest.mark.parametrize("name, cls", [("instance", nn.InstanceNorm3d), ("batch", nn.BatchNorm3d),
                                       ("layer", nn.GroupNorm), ("switchable", SwitchableNorm3d),
                                       ("none", nn.Identity)])
def test_make_norm(name, cls):
    layer = make_norm(name, 4)
    assert isinstance(layer, cls)
    if name == "layer":
        assert layer.num_groups == 1  # layer norm over (C, D, H, W)
    x = torch.randn(2, 4, 3, 4, 5)
    assert layer(x).shape == x.shape


def test_make_norm_names_the_choices():
    with pytest.raises(ValueError, match="choose one of"):
        make_norm("group", 4)


def _one_hot(sn: SwitchableNorm3d, k: int) -> None:
    with torch.no_grad():
        sn.mean_weight.copy_(torch.full((3,), -50.0))
        sn.var_weight.copy_(torch.full((3,), -50.0))
        sn.mean_weight[k] = 50.0
        sn.var_weight[k] = 50.0


@pytest.mark.parametrize("k, reference", [(0, nn.InstanceNorm3d(3)), (1, nn.GroupNorm(1, 3, affine=False)),
                                          (2, nn.BatchNorm3d(3, affine=False))])
def test_switchable_norm_reduces_to_in_ln_bn(k, reference):
    torch.manual_seed(0)
    x = torch.randn(4, 3, 4, 5, 6) * 3 + 1
    sn = SwitchableNorm3d(3).train()
    _one_hot(sn, k)
    reference.train()
    torch.testing.assert_close(sn(x), reference(x), atol=1e-4, rtol=1e-4)


def test_switchable_norm_weights_sum_to_one_and_train():
    torch.manual_seed(0)
    sn = SwitchableNorm3d(4)
    for w in sn.mixing_weights:
        assert w.shape == (3,)
        torch.testing.assert_close(w.sum(), torch.tensor(1.0))
    net = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), sn, nn.ReLU(), nn.Conv3d(4, 1, 1))
    x = torch.randn(2, 1, 8, 8, 8)
    ((net(x) - x) ** 2).mean().backward()
    assert sn.mean_weight.grad.abs().sum() > 0 and sn.var_weight.grad.abs().sum() > 0
    before = sn.mean_weight.detach().clone()
    torch.optim.SGD(net.parameters(), lr=1.0).step()
    assert not torch.equal(before, sn.mean_weight.detach())
    for w in sn.mixing_weights:
        torch.testing.assert_close(w.sum(), torch.tensor(1.0))
    # running BN statistics were updated in training and are used in eval
    assert not torch.equal(sn.running_mean, torch.zeros(4))
    sn.eval()
    with torch.no_grad():
        assert torch.isfinite(net(x)).all()


def test_switchable_norm_checks_input():
    with pytest.raises(ValueError, match="expects"):
        SwitchableNorm3d(4)(torch.zeros(1, 3, 2, 2, 2))


# ---------------------------------------------------------------- discriminator

def test_receptive_fields():
    assert receptive_field(3) == 70
    assert receptive_field(4) == 142
    assert PatchDiscriminator3D(base_channels=2, n_layers=4).receptive_field == 142
    with pytest.raises(ValueError):
        receptive_field(0)


@pytest.mark.parametrize("n_layers, size", [(2, 48), (3, 80)])
def test_receptive_field_matches_the_gradient_support(n_layers, size):
    torch.manual_seed(0)
    d = PatchDiscriminator3D(base_channels=2, n_layers=n_layers, norm="none")
    x = torch.randn(1, 1, size, size, size, requires_grad=True)
    out = d(x)
    c = [s // 2 for s in out.shape[2:]]
    out[0, 0, c[0], c[1], c[2]].backward()
    support = x.grad[0, 0].abs() > 0
    for axis in range(3):
        others = tuple(a for a in range(3) if a != axis)
        idx = torch.nonzero(support.any(dim=others)).flatten()
        assert int(idx.max() - idx.min() + 1) <= receptive_field(n_layers)
        assert int(idx.max() - idx.min() + 1) >= receptive_field(n_layers) - 2  # only padding can trim it


@pytest.mark.parametrize("norm", ["instance", "switchable", "none"])
def test_spectral_norm_is_applied_and_patches_come_out(norm):
    torch.manual_seed(0)
    d = build_discriminator({"name": "patchgan", "base_channels": 2, "n_layers": 3, "norm": norm,
                             "spectral_norm": True, "in_channels": 2})
    convs = [m for m in d.modules() if isinstance(m, nn.Conv3d)]
    assert len(convs) == 5 and all(parametrize.is_parametrized(m, "weight") for m in convs)
    x = torch.randn(2, 2, 32, 32, 32)
    for _ in range(15):  # each training forward runs one power iteration
        out = d(x)
    assert out.shape == (2, 1, 2, 2, 2)
    for m in convs:
        sigma = torch.linalg.matrix_norm(m.weight.detach().flatten(1), ord=2)
        assert abs(float(sigma) - 1.0) < 0.05


def test_spectral_norm_discriminator_round_trips_its_state_dict():
    spec = {"name": "patchgan", "base_channels": 2, "n_layers": 3, "spectral_norm": True}
    a, b = build_discriminator(spec), build_discriminator(spec)
    a(torch.randn(1, 1, 32, 32, 32))  # one power iteration changes the stored u, v
    b.load_state_dict(a.state_dict(), strict=True)
    a.eval(), b.eval()
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x))


def test_discriminator_without_spectral_norm_keeps_its_keys():
    d = build_discriminator({"name": "patchgan", "base_channels": 2})
    assert "model.0.weight" in d.state_dict()
    assert not any(parametrize.is_parametrized(m) for m in d.modules())


def test_factory_builds_every_name_and_leaves_the_spec_alone():
    for name, spec in SPECS.items():
        frozen = dict(spec)
        build_generator(spec)
        assert spec == frozen
    assert isinstance(build_generator({"name": "unetpp", "base_channels": 2, "depth": 2}), UNetPlusPlus3D)
    with pytest.raises(ValueError, match="Unknown generator"):
        build_generator({"name": "vit"})
    with pytest.raises(ValueError, match="Bad arguments for the unet generator"):
        build_generator({"name": "unet", "n_blocks": 9})
    with pytest.raises(ValueError, match="Unknown discriminator"):
        build_discriminator({"name": "multiscale"})
