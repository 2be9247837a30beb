"""Adversarial heads (thesis section 6.3, eqs. 6.4-6.5) and the dual-contrast term of DC-CycleGAN (section 6.2.1).

Scores are the PatchGAN's raw outputs, (B, 1, D', H', W'); every expectation is the mean over all scores. With
``s_r`` the scores of real target-domain volumes and ``s_f`` those of (detached) generated ones:

* ``lsgan`` (Mao et al. 2017): d_real = E (s_r - 1)^2, d_fake = E s_f^2, discriminator = 0.5 (d_real + d_fake)
  (eq. 6.4), generator = E (s_f - 1)^2.
* ``wgan-gp`` (Gulrajani et al. 2017): d_real = -E s_r, d_fake = E s_f, discriminator = d_real + d_fake (eq. 6.5
  without the penalty), generator = -E s_f.
* ``hinge`` (HLSNC-GAN eqs. 5-6): d_real = E relu(1 - s_r), d_fake = E relu(1 + s_f),
  discriminator = d_real + d_fake, generator = E relu(1 - s_f) (HLSNC-GAN eq. 6, -min(0, -1 + D(G(z))); it equals
  the SAGAN/BigGAN form -E s_f + 1 wherever s_f < 1, and stops pushing fakes already scored above 1).
* ``bce`` (cross-entropy on logits, DC-CycleGAN): d_real = BCE(s_r, 1) = E softplus(-s_r),
  d_fake = BCE(s_f, 0) = E softplus(s_f), discriminator = 0.5 (d_real + d_fake), generator = BCE(s_f, 1).

The 0.5 of ``lsgan`` and ``bce`` is CycleGAN's convention (it halves D's learning speed relative to G); the
Wasserstein and hinge critics keep the usual unscaled sum. The LSGAN generator term is E (s_f - 1)^2 without the
thesis's 1/2 (kept from model M1 so its loss values do not change). ``bce`` uses the non-saturating generator loss.
WGAN-GP adds :meth:`AdversarialLoss.gradient_penalty` to the critic loss; the trainer sums the two.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as nnf

__all__ = ["ADVERSARIAL_HEADS", "AdversarialLoss", "dual_contrast_loss", "check_beta", "BETA_RANGE"]

ADVERSARIAL_HEADS = ("lsgan", "wgan-gp", "hinge", "bce")
BETA_RANGE = (0.3, 0.7)


class AdversarialLoss:
    """Adversarial loss of a PatchGAN's score map for one of :data:`ADVERSARIAL_HEADS` (see the module table).

    Args:
        head: ``"lsgan"`` (thesis default, model M1), ``"wgan-gp"`` (models M2/M3 ablation), ``"hinge"``
            (HLSNC-GAN) or ``"bce"`` (cross-entropy on logits, DC-CycleGAN's head).
        gp_weight: lambda_gp of the gradient penalty (eq. 6.5; 10 in Gulrajani et al.); used by ``"wgan-gp"`` only.

    Raises:
        ValueError: unknown head, or a negative / non-finite ``gp_weight``.
    """

    def __init__(self, head: str = "lsgan", gp_weight: float = 10.0) -> None:
        if head not in ADVERSARIAL_HEADS:
            raise ValueError(f"Unknown adversarial head {head!r}; choose one of {ADVERSARIAL_HEADS}.")
        if not (math.isfinite(gp_weight) and gp_weight >= 0):
            raise ValueError(f"gp_weight must be a finite number >= 0, got {gp_weight}.")
        self.head = head
        self.gp_weight = float(gp_weight)

    def __repr__(self) -> str:
        return f"AdversarialLoss(head={self.head!r}, gp_weight={self.gp_weight})"

    @property
    def needs_gradient_penalty(self) -> bool:
        """True for ``"wgan-gp"`` with ``gp_weight > 0``: the trainer must add :meth:`gradient_penalty`."""
        return self.head == "wgan-gp" and self.gp_weight > 0

    def d_real(self, scores: torch.Tensor) -> torch.Tensor:
        """D's loss term on real target-domain volumes; ``scores`` (B, 1, D', H', W') -> scalar."""
        if self.head == "lsgan":
            return nnf.mse_loss(scores, torch.ones_like(scores))
        if self.head == "wgan-gp":
            return -scores.mean()
        if self.head == "hinge":
            return nnf.relu(1.0 - scores).mean()
        return nnf.binary_cross_entropy_with_logits(scores, torch.ones_like(scores))

    def d_fake(self, scores: torch.Tensor) -> torch.Tensor:
        """D's loss term on volumes to be labelled fake (generated, or source-domain for dual contrast) -> scalar."""
        if self.head == "lsgan":
            return nnf.mse_loss(scores, torch.zeros_like(scores))
        if self.head == "wgan-gp":
            return scores.mean()
        if self.head == "hinge":
            return nnf.relu(1.0 + scores).mean()
        return nnf.binary_cross_entropy_with_logits(scores, torch.zeros_like(scores))

    def discriminator(self, real_scores: torch.Tensor, fake_scores: torch.Tensor) -> torch.Tensor:
        """D's loss given its scores on real and (detached) fake volumes, each (B, 1, D', H', W') -> scalar.

        ``0.5 * (d_real + d_fake)`` for ``lsgan`` and ``bce``, ``d_real + d_fake`` for ``wgan-gp`` (without the
        gradient penalty) and ``hinge``.
        """
        loss = self.d_real(real_scores) + self.d_fake(fake_scores)
        return 0.5 * loss if self.head in ("lsgan", "bce") else loss

    def generator(self, fake_scores: torch.Tensor) -> torch.Tensor:
        """G's loss given D's scores on its outputs, (B, 1, D', H', W') -> scalar."""
        if self.head == "lsgan":
            return nnf.mse_loss(fake_scores, torch.ones_like(fake_scores))
        if self.head == "wgan-gp":
            return -fake_scores.mean()
        if self.head == "hinge":
            return nnf.relu(1.0 - fake_scores).mean()
        return nnf.binary_cross_entropy_with_logits(fake_scores, torch.ones_like(fake_scores))

    def gradient_penalty(self, D: Callable[[torch.Tensor], torch.Tensor], real: torch.Tensor, fake: torch.Tensor,
                         generator: torch.Generator | None = None) -> torch.Tensor:
        """WGAN-GP penalty ``gp_weight * E[(||grad_v D(v)||_2 - 1)^2]`` (eq. 6.5), already weighted.

        ``v = a * real + (1 - a) * fake`` with one ``a ~ U(0, 1)`` per sample (on the line between a real and a
        generated volume); the gradient is of the sum of D's patch scores with respect to the whole volume v, its
        norm taken per sample over (C, D, H, W). The graph is kept (``create_graph=True``) so the penalty trains D.
        D runs in float32 with autocast disabled, because double backward in half precision is fragile. The
        penalty is per-sample, so a critic with ``norm="batch"`` (or switchable, which mixes in batch statistics)
        breaks its assumptions: prefer ``"instance"``, ``"layer"`` or ``"none"`` for WGAN-GP critics (Gulrajani et
        al. 2017, section 4).

        Args:
            D: the critic, (B, C, D, H, W) -> scores.
            real: real target-domain batch (B, C, D, H, W) (detached here).
            fake: generated batch, same shape (detached here).
            generator: optional ``torch.Generator`` for the interpolation weights (reproducible tests).

        Returns:
            Scalar tensor; a zero tensor when :attr:`needs_gradient_penalty` is False (heads other than wgan-gp).

        Raises:
            ValueError: ``real`` and ``fake`` differ in shape.
        """
        if real.shape != fake.shape:
            raise ValueError(f"real and fake must have the same shape for the gradient penalty, got "
                             f"{tuple(real.shape)} and {tuple(fake.shape)}.")
        if not self.needs_gradient_penalty:
            return torch.zeros((), device=real.device, dtype=torch.float32)
        real, fake = real.detach().float(), fake.detach().float()
        a = torch.rand((real.shape[0],) + (1,) * (real.ndim - 1), generator=generator, dtype=real.dtype,
                       device=generator.device if generator is not None else real.device).to(real.device)
        v = (a * real + (1 - a) * fake).requires_grad_(True)
        with torch.autocast(device_type=real.device.type, enabled=False):
            scores = D(v)
        (grad,) = torch.autograd.grad(scores.float().sum(), v, create_graph=True)
        norm = torch.sqrt(grad.flatten(1).pow(2).sum(1) + 1e-12)
        return self.gp_weight * ((norm - 1.0) ** 2).mean()


def check_beta(beta: float) -> float:
    """Validate the dual-contrast weight beta of DC-CycleGAN (thesis eq. 6.3: beta in [0.3, 0.7], J. Wang et al. 2023).

    Args:
        beta: 0 (dual contrast disabled) or a value in :data:`BETA_RANGE` = [0.3, 0.7].

    Returns:
        ``float(beta)``.

    Raises:
        ValueError: beta not 0 and outside [0.3, 0.7].
    """
    beta = float(beta)
    if beta != 0.0 and not BETA_RANGE[0] <= beta <= BETA_RANGE[1]:
        raise ValueError(f"Dual-contrast weight beta must be in [{BETA_RANGE[0]}, {BETA_RANGE[1]}] (thesis section "
                         f"6.2.1, following DC-CycleGAN), or 0 to disable dual contrast; got {beta}.")
    return beta


def dual_contrast_loss(adv: AdversarialLoss, source_scores: torch.Tensor) -> torch.Tensor:
    """Dual-contrast term L_DC of a discriminator (thesis eq. 6.1, DC-CycleGAN adapted to 3D, section 6.2.1).

    Source-domain volumes fed to the target-domain critic are labelled fake: for D_MR, real CT patches x'; for D_CT,
    real MR patches y'. The term is ``adv.d_fake(source_scores)`` (for ``bce``: E[-log(1 - sigmoid(D(x')))]; for
    ``wgan-gp``: E D(x'), the same sign as generated samples; for ``lsgan``: E D(x')^2). The trainer adds
    ``beta * dual_contrast_loss(...)`` to the discriminator's loss, with beta from :func:`check_beta`.

    Args:
        adv: the adversarial head in use.
        source_scores: D's scores on source-domain volumes, (B, 1, D', H', W').

    Returns:
        Scalar tensor.
    """
    return adv.d_fake(source_scores)
