"""Objectives of issue 4 against hand-computed values (thesis sections 6.3, 6.2.1, 7.7 and 8)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ct2mr.losses import (ADVERSARIAL_HEADS, AdversarialLoss, check_beta, cycle_loss, dual_contrast_loss,
                          histogram_distance, histogram_loss, identity_loss, mutual_information,
                          mutual_information_loss, rician_corrupt, rician_mixed_loss, rician_nll, soft_histogram,
                          ssim3d, structural_cycle_loss)
from ct2mr.networks import ResnetGenerator3D


def _scores(*values: float) -> torch.Tensor:
    return torch.tensor(values).reshape(1, 1, 1, 1, -1)


# ---------------------------------------------------------------- adversarial heads

S_REAL = _scores(-1.0, 0.0, 2.0)
S_FAKE = _scores(0.5, -2.0, 1.0)
SP = lambda v: math.log1p(math.exp(v))  # noqa: E731  softplus

# head: (d_real(S_REAL), d_fake(S_FAKE), discriminator(S_REAL, S_FAKE), generator(S_FAKE)), all by hand
HEAD_VALUES = {
    "lsgan": ((4 + 1 + 1) / 3, (0.25 + 4 + 1) / 3, 0.5 * (2 + 5.25 / 3), (0.25 + 9 + 0) / 3),
    "wgan-gp": (-1 / 3, -0.5 / 3, -1 / 3 - 0.5 / 3, 0.5 / 3),
    "hinge": ((2 + 1 + 0) / 3, (1.5 + 0 + 2) / 3, 1 + 3.5 / 3, (0.5 + 3 + 0) / 3),
    "bce": ((SP(1) + SP(0) + SP(-2)) / 3, (SP(0.5) + SP(-2) + SP(1)) / 3,
            0.5 * ((SP(1) + SP(0) + SP(-2)) / 3 + (SP(0.5) + SP(-2) + SP(1)) / 3), (SP(-0.5) + SP(2) + SP(-1)) / 3),
}


@pytest.mark.parametrize("head", ADVERSARIAL_HEADS)
def test_adversarial_heads_on_known_scores(head):
    adv = AdversarialLoss(head)
    d_real, d_fake, disc, gen = HEAD_VALUES[head]
    assert adv.d_real(S_REAL).item() == pytest.approx(d_real, rel=1e-6)
    assert adv.d_fake(S_FAKE).item() == pytest.approx(d_fake, rel=1e-6)
    assert adv.discriminator(S_REAL, S_FAKE).item() == pytest.approx(disc, rel=1e-6)
    assert adv.generator(S_FAKE).item() == pytest.approx(gen, rel=1e-6)
    # dual contrast: source-domain samples are labelled fake
    assert dual_contrast_loss(adv, S_FAKE).item() == pytest.approx(d_fake, rel=1e-6)
    assert adv.needs_gradient_penalty == (head == "wgan-gp")


def test_adversarial_options_are_validated():
    with pytest.raises(ValueError, match="lsgan"):
        AdversarialLoss("vanilla")
    with pytest.raises(ValueError, match="gp_weight"):
        AdversarialLoss("wgan-gp", gp_weight=-1.0)
    assert not AdversarialLoss("wgan-gp", gp_weight=0.0).needs_gradient_penalty


class _LinearCritic(nn.Module):
    """D(v) = sum(w * v) per sample: its gradient with respect to v is w everywhere."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(w)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return (self.w * v).sum(dim=(1, 2, 3, 4)).reshape(-1, 1, 1, 1, 1)


def test_gradient_penalty_of_a_linear_critic():
    w = torch.full((1, 1, 2, 2, 2), 1.0)  # ||w|| = sqrt(8)
    critic = _LinearCritic(w.clone())
    adv = AdversarialLoss("wgan-gp", gp_weight=10.0)
    real, fake = torch.randn(3, 1, 2, 2, 2), torch.randn(3, 1, 2, 2, 2)
    penalty = adv.gradient_penalty(critic, real, fake, generator=torch.Generator().manual_seed(0))
    norm = math.sqrt(8)
    assert penalty.item() == pytest.approx(10.0 * (norm - 1) ** 2, rel=1e-5)
    penalty.backward()  # create_graph=True: the penalty trains the critic
    torch.testing.assert_close(critic.w.grad, 10.0 * 2 * (norm - 1) * w / norm * 1.0, rtol=1e-4, atol=1e-5)


def test_gradient_penalty_through_a_spectral_norm_patchgan_trains_it():
    from ct2mr.networks import build_discriminator

    torch.manual_seed(0)
    D = build_discriminator({"name": "patchgan", "base_channels": 2, "n_layers": 3, "norm": "layer",
                             "spectral_norm": True})
    penalty = AdversarialLoss("wgan-gp", 10.0).gradient_penalty(D, torch.randn(2, 1, 32, 32, 32),
                                                                torch.randn(2, 1, 32, 32, 32))
    assert torch.isfinite(penalty) and penalty.item() > 0
    penalty.backward()
    first = D.model[0].parametrizations.weight.original
    assert first.grad is not None and first.grad.abs().sum() > 0


@pytest.mark.parametrize("head", ["lsgan", "hinge", "bce"])
def test_gradient_penalty_is_zero_for_other_heads(head):
    critic = _LinearCritic(torch.ones(1, 1, 2, 2, 2))
    penalty = AdversarialLoss(head).gradient_penalty(critic, torch.zeros(1, 1, 2, 2, 2), torch.ones(1, 1, 2, 2, 2))
    assert penalty.item() == 0.0


def test_gradient_penalty_needs_matching_shapes():
    with pytest.raises(ValueError, match="same shape"):
        AdversarialLoss("wgan-gp").gradient_penalty(nn.Identity(), torch.zeros(2, 1, 4, 4, 4),
                                                    torch.zeros(1, 1, 4, 4, 4))


@pytest.mark.parametrize("beta, ok", [(0.3, True), (0.5, True), (0.7, True), (0.0, True), (0.2, False),
                                      (0.8, False), (-0.5, False)])
def test_check_beta(beta, ok):
    if ok:
        assert check_beta(beta) == beta
    else:
        with pytest.raises(ValueError, match=r"\[0.3, 0.7\]"):
            check_beta(beta)


# ---------------------------------------------------------------- cycle, identity, SSIM-3D

def test_cycle_and_identity_l1_by_hand():
    x, y = torch.zeros(1, 1, 2, 2, 2), torch.ones(1, 1, 2, 2, 2)
    assert cycle_loss(x, x + 0.5, y, y - 0.25).item() == pytest.approx(0.75)
    assert identity_loss(x, x - 0.1, y, y + 0.2).item() == pytest.approx(0.3)


def test_ssim3d_of_identical_volumes_is_one():
    torch.manual_seed(0)
    x = torch.rand(2, 1, 16, 16, 16) * 2 - 1
    assert ssim3d(x, x).item() == pytest.approx(1.0, abs=1e-6)
    assert abs(ssim3d(x, torch.rand_like(x) * 2 - 1).item()) < 0.1  # independent noise: no structure shared


@pytest.mark.parametrize("data_range, kernel_size, sigma", [(2.0, 11, 1.5), (1.0, 7, 1.0)])
def test_ssim3d_agrees_with_monai(data_range, kernel_size, sigma):
    from monai.metrics import SSIMMetric

    torch.manual_seed(0)
    x = torch.rand(2, 1, 16, 18, 20) * data_range
    y = (x + 0.2 * torch.randn_like(x)).clamp(0, data_range)
    ref = SSIMMetric(spatial_dims=3, data_range=data_range, win_size=kernel_size, kernel_sigma=sigma)(y, x).mean()
    assert ssim3d(y, x, data_range, kernel_size, sigma).item() == pytest.approx(ref.item(), abs=1e-5)


def test_ssim3d_validates():
    with pytest.raises(ValueError, match="at least 11"):
        ssim3d(torch.zeros(1, 1, 8, 16, 16), torch.zeros(1, 1, 8, 16, 16))
    with pytest.raises(ValueError, match="odd"):
        ssim3d(torch.zeros(1, 1, 16, 16, 16), torch.zeros(1, 1, 16, 16, 16), kernel_size=4)


def test_structural_cycle_loss_mixes_l1_and_one_minus_ssim():
    torch.manual_seed(0)
    x = torch.rand(1, 1, 16, 16, 16) * 2 - 1
    x_rec = x + 0.1 * torch.randn_like(x)
    l1, ssim = (x_rec - x).abs().mean(), ssim3d(x_rec, x)
    assert structural_cycle_loss(x, x_rec, 0.0).item() == pytest.approx(l1.item())
    assert structural_cycle_loss(x, x_rec, 1.0).item() == pytest.approx(1 - ssim.item(), rel=1e-6)
    assert structural_cycle_loss(x, x_rec, 0.3).item() == pytest.approx(0.7 * l1.item() + 0.3 * (1 - ssim.item()),
                                                                         rel=1e-6)
    assert structural_cycle_loss(x, x, 0.5).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        structural_cycle_loss(x, x_rec, 1.5)


# ---------------------------------------------------------------- soft histogram (thesis 7.7)

def _row(v: float, centres: list[float], sigma: float) -> list[float]:
    a = [math.exp(-((v - c) ** 2) / (2 * sigma ** 2)) for c in centres]
    return [ai / sum(a) for ai in a]


def test_soft_histogram_of_a_known_array():
    # K = 3 on [0, 1]: centres 0, 0.5, 1; width 0.5; sigma 0.25
    values = [0.0, 0.5, 0.25, 1.0]
    h = soft_histogram(torch.tensor(values).reshape(1, 1, 1, 1, 4), bins=3, value_range=(0.0, 1.0))
    rows = [_row(v, [0.0, 0.5, 1.0], 0.25) for v in values]
    expected = [sum(r[k] for r in rows) / 4 for k in range(3)]
    torch.testing.assert_close(h, torch.tensor([expected]), rtol=1e-6, atol=1e-7)
    # by hand for the first bin: 1 / (1 + e^-2 + e^-8), e^-2 / (2 e^-2 + 1), e^-.5 / (2 e^-.5 + e^-4.5), e^-8 / (...)
    assert h[0, 0].item() == pytest.approx(0.37069, abs=1e-4)


def test_soft_histogram_matches_the_dense_formula_and_sums_to_one():
    torch.manual_seed(0)
    x = torch.rand(2, 1, 8, 8, 8) * 2.2 - 1.1  # some values outside [-1, 1]: clamped
    h = soft_histogram(x, bins=64)
    assert h.shape == (2, 64)
    torch.testing.assert_close(h.sum(1), torch.ones(2))
    centres = torch.linspace(-1, 1, 64)
    sigma = 0.5 * 2 / 63
    v = x.clamp(-1, 1).reshape(2, -1, 1)
    dense = torch.softmax(-((v - centres) ** 2) / (2 * sigma ** 2), dim=-1).mean(1)
    torch.testing.assert_close(h, dense, atol=1e-6, rtol=1e-5)


def test_soft_histogram_mask():
    x = torch.tensor([-1.0, -1.0, 1.0, 0.3]).reshape(1, 1, 1, 1, 4)
    mask = torch.tensor([True, True, False, False]).reshape(1, 1, 1, 1, 4)
    h = soft_histogram(x, bins=5, mask=mask)
    torch.testing.assert_close(h[0], torch.tensor(_row(-1.0, [-1, -0.5, 0, 0.5, 1], 0.25)))
    with pytest.raises(ValueError, match="selects no voxel"):
        soft_histogram(x, bins=5, mask=torch.zeros_like(mask))


@pytest.mark.parametrize("bins, value_range", [(1, (-1, 1)), (64, (1, -1))])
def test_soft_histogram_validates(bins, value_range):
    with pytest.raises(ValueError):
        soft_histogram(torch.zeros(1, 1, 2, 2, 2), bins=bins, value_range=value_range)


@pytest.mark.parametrize("K", [64, 128])
def test_w1_of_opposite_one_hot_histograms_is_the_full_range(K):
    first, last = torch.zeros(K), torch.zeros(K)
    first[0], last[-1] = 1.0, 1.0
    width = 1.0 / (K - 1)  # bin width on the thesis's [0, 1] scale
    assert histogram_distance(first, last).item() == pytest.approx((K - 1) * width)
    shifted = torch.zeros(K)
    shifted[1] = 1.0
    assert histogram_distance(first, shifted).item() == pytest.approx(width)
    assert histogram_distance(first, last, "l2").item() == pytest.approx(2.0)


def test_l2_on_bins_by_hand():
    assert histogram_distance(torch.tensor([0.5, 0.5, 0.0]), torch.tensor([0.0, 0.5, 0.5]), "l2").item() == \
        pytest.approx(0.5)
    with pytest.raises(ValueError, match="w1"):
        histogram_distance(torch.ones(3), torch.ones(3), "kl")


def test_histogram_loss_of_constant_volumes_by_hand():
    K = 64
    fake, real = torch.full((1, 1, 4, 4, 4), -1.0), torch.full((2, 1, 4, 4, 4), 1.0)
    # soft histogram of a value at the first centre: weights e^(-2 k^2) / Z on bins k = 0, 1, 2, 3 (window radius 3)
    z = sum(math.exp(-2 * k * k) for k in range(4))
    mean_bin = sum(k * math.exp(-2 * k * k) for k in range(4)) / z
    # real is the mirror image, one CDF lies above the other: W1 = difference of the means on [0, 1]
    expected = ((K - 1) - 2 * mean_bin) / (K - 1)
    assert histogram_loss(fake, real, bins=K).item() == pytest.approx(expected, rel=1e-5)


def test_histogram_loss_approximates_w1_of_shifted_uniforms():
    torch.manual_seed(0)
    fake = torch.rand(1, 1, 16, 16, 16) - 1.0  # U(-1, 0)
    real = torch.rand(1, 1, 16, 16, 16)  # U(0, 1): a shift of 1 on [-1, 1], i.e. 0.5 on [0, 1]
    assert histogram_loss(fake, real, bins=128).item() == pytest.approx(0.5, abs=0.01)


def test_histogram_loss_detaches_real_and_reaches_the_generator():
    torch.manual_seed(0)
    G = ResnetGenerator3D(base_channels=2, n_blocks=1)
    x = torch.rand(2, 1, 16, 16, 16) * 2 - 1
    real = (torch.rand(2, 1, 16, 16, 16) * 0.5 + 0.3).requires_grad_(True)
    for distance in ("w1", "l2"):
        G.zero_grad()
        loss = histogram_loss(G(x), real, bins=64, distance=distance)
        loss.backward()
        assert loss.item() > 0
        grads = [p.grad for p in G.parameters()]
        assert all(g is not None for g in grads)
        assert grads[0].abs().sum() > 0 and grads[-1].abs().sum() > 0  # stem and output convolution
        assert real.grad is None


def test_histogram_loss_masks_and_empty_masks():
    fake = torch.cat([torch.full((1, 1, 2, 2, 2), 0.5), torch.full((1, 1, 2, 2, 2), -0.5)], dim=4)
    real = torch.full((1, 1, 2, 2, 4), 0.5)
    mask = torch.zeros_like(fake, dtype=torch.bool)
    mask[..., :2] = True  # only the 0.5 half of fake
    assert histogram_loss(fake, real, mask=mask).item() == pytest.approx(0.0, abs=1e-6)
    assert histogram_loss(fake, real).item() > 0.2
    leaf = fake.clone().requires_grad_(True)
    empty = histogram_loss(leaf, real, mask=torch.zeros_like(mask))
    empty.backward()
    assert empty.item() == 0.0 and leaf.grad is not None
    with pytest.raises(ValueError, match="w1"):
        histogram_loss(fake, real, distance="emd")


# ---------------------------------------------------------------- mutual information

def test_mutual_information_of_a_two_valued_volume_by_hand():
    # K = 2 on [-1, 1]: centres -1, 1, width 2, sigma 1; a value at a centre has weights p, q = 1, e^-2 normalised
    x = torch.tensor([-1.0, 1.0] * 4).reshape(1, 1, 2, 2, 2)
    p, q = 1 / (1 + math.exp(-2)), math.exp(-2) / (1 + math.exp(-2))
    diag, off = (p * p + q * q) / 2, p * q  # joint cells; both marginals are (1/2, 1/2)
    expected = 2 * diag * math.log(diag / 0.25) + 2 * off * math.log(off / 0.25)
    assert mutual_information(x, x, bins=2).item() == pytest.approx(expected, rel=1e-5)


def test_mutual_information_self_noise_and_monotone_remap():
    torch.manual_seed(0)
    x = torch.rand(1, 1, 16, 16, 16) * 2 - 1
    noise = torch.rand_like(x) * 2 - 1
    remapped = torch.tanh(1.5 * x) / math.tanh(1.5)  # monotone, same range
    mi_self, mi_noise, mi_remap = (mutual_information(x, y).item() for y in (x, noise, remapped))
    assert mi_self <= math.log(32) + 1e-5
    assert mi_self > 10 * mi_noise
    assert mi_remap == pytest.approx(mi_self, rel=0.1)
    assert mutual_information(noise, x).item() == pytest.approx(mi_noise, rel=1e-4)  # symmetric


def test_mutual_information_loss_is_minus_mi_and_has_gradients():
    torch.manual_seed(0)
    x = torch.rand(2, 1, 8, 8, 8) * 2 - 1
    y = (0.5 * x + 0.1 * torch.randn_like(x)).requires_grad_(True)
    loss = mutual_information_loss(x, y)
    assert loss.item() == pytest.approx(-mutual_information(x, y).mean().item())
    loss.backward()
    assert y.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="same shape"):
        mutual_information(x, y[:, :, :4])


# ---------------------------------------------------------------- Rician (thesis section 8)

@pytest.mark.parametrize("sigma", [0.05, 0.2])
def test_rician_nll_matches_scipy(sigma):
    stats = pytest.importorskip("scipy.stats")
    x = torch.tensor([0.01, 0.1, 0.3, 0.5, 0.9, 1.0, 0.02, 0.7], dtype=torch.float64)
    nu = torch.tensor([0.0, 0.1, 0.2, 0.6, 1.0, 0.95, 0.5, 0.0], dtype=torch.float64)
    expected = -stats.rice.logpdf(x.numpy(), (nu / sigma).numpy(), scale=sigma)
    nll = rician_nll(x, nu, sigma, reduction="none")
    torch.testing.assert_close(nll.double(), torch.from_numpy(expected), rtol=1e-4, atol=1e-3)
    # eq. 8.3 drops the terms that do not depend on nu
    reduced = rician_nll(x, nu, sigma, constants=False, reduction="none")
    dropped = -torch.log(x) + 2 * math.log(sigma) + x ** 2 / (2 * sigma ** 2)
    torch.testing.assert_close((nll - reduced).double(), dropped, rtol=1e-5, atol=1e-4)


def test_rician_nll_by_hand_and_its_gradient():
    # x = 0.5, nu = 0.4, sigma = 0.5: z = 0.8; NLL = -log 0.5 + 2 log 0.5 + (0.25 + 0.16) / 0.5 - log I0(0.8)
    i0 = sum((0.4 ** (2 * k)) / math.factorial(k) ** 2 for k in range(20))  # I0(z) = sum (z/2)^2k / (k!)^2
    expected = -math.log(0.5) + 2 * math.log(0.5) + 0.41 / 0.5 - math.log(i0)
    nu = torch.tensor([0.4], requires_grad=True)
    assert rician_nll(torch.tensor([0.5]), nu, 0.5).item() == pytest.approx(expected, rel=1e-5)
    rician_nll(torch.tensor([0.5]), nu, 0.5, constants=False).backward()
    # d/dnu = nu / s^2 - (x / s^2) I1(z) / I0(z)
    z = torch.tensor(0.8)
    grad = 0.4 / 0.25 - (0.5 / 0.25) * (torch.special.i1e(z) / torch.special.i0e(z)).item()
    assert nu.grad.item() == pytest.approx(grad, rel=1e-5)
    # large arguments stay finite (I0 would overflow without the exponential scaling)
    big = rician_nll(torch.tensor([1.0]), torch.tensor([1.0]), 0.01)
    assert torch.isfinite(big)


def test_rician_nll_validates():
    with pytest.raises(ValueError, match=">= 0"):
        rician_nll(torch.tensor([-0.1]), torch.tensor([0.1]), 0.1)
    with pytest.raises(ValueError, match="> 0"):
        rician_nll(torch.tensor([0.1]), torch.tensor([0.1]), 0.0)
    with pytest.raises(ValueError, match="reduction"):
        rician_nll(torch.tensor([0.1]), torch.tensor([0.1]), 0.1, reduction="max")


def test_rician_corrupt_statistics():
    gen = torch.Generator().manual_seed(0)
    y = torch.full((1, 1, 32, 32, 32), -1.0)  # magnitude 0: Rician(0, sigma) = Rayleigh, mean sigma sqrt(pi / 2)
    out = rician_corrupt(y, sigma=0.05, generator=gen)
    assert out.shape == y.shape and out.min() >= -1.0
    assert ((out + 1) / 2).mean().item() == pytest.approx(0.05 * math.sqrt(math.pi / 2), rel=0.02)
    bright = rician_corrupt(torch.ones(1, 1, 32, 32, 32), sigma=0.05, generator=gen)  # high SNR: ~ N(1, sigma^2)
    assert ((bright + 1) / 2).std().item() == pytest.approx(0.05, rel=0.03)
    torch.testing.assert_close(rician_corrupt(y * 0.3, sigma=0.0), y * 0.3, atol=1e-5, rtol=0)


def test_rician_corrupt_draws_sigma_per_sample_reproducibly_and_is_differentiable():
    y = torch.full((6, 1, 16, 16, 16), -1.0, requires_grad=True)
    a = rician_corrupt(y, (0.01, 0.1), generator=torch.Generator().manual_seed(3))
    b = rician_corrupt(y, (0.01, 0.1), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b)
    sigma_hat = ((a.detach() + 1) / 2).mean(dim=(1, 2, 3, 4)) / math.sqrt(math.pi / 2)  # Rayleigh mean -> sigma
    assert sigma_hat.min() > 0.009 and sigma_hat.max() < 0.105
    assert sigma_hat.max() - sigma_hat.min() > 0.005  # not one sigma for the whole batch
    a.sum().backward()
    assert torch.isfinite(y.grad).all()
    with pytest.raises(ValueError, match="sigma_range"):
        rician_corrupt(y, (0.1, 0.01))


def test_rician_mixed_loss():
    torch.manual_seed(0)
    target = torch.rand(1, 1, 4, 4, 4) * 2 - 1
    pred = (target + 0.1 * torch.randn_like(target)).clamp(-1, 1).requires_grad_(True)
    l1 = (pred - target).abs().mean()
    nll = rician_nll((target + 1) / 2, (pred + 1) / 2, 0.1, constants=False)
    assert rician_mixed_loss(pred, target, 0.1, 0.0).item() == pytest.approx(l1.item())
    assert rician_mixed_loss(pred, target, 0.1, 1.0).item() == pytest.approx(nll.item(), rel=1e-6)
    mixed = rician_mixed_loss(pred, target, 0.1, 0.25)
    assert mixed.item() == pytest.approx(0.75 * l1.item() + 0.25 * nll.item(), rel=1e-6)
    mixed.backward()
    assert pred.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="tau"):
        rician_mixed_loss(pred, target, 0.1, 1.5)
    with pytest.raises(ValueError, match="sigma"):
        rician_mixed_loss(pred, target, 0.0, 0.5)
