"""Adversarial heads (thesis section 6.3): LSGAN (Mao et al. 2017) so far; WGAN-GP and hinge come with issue 4."""

from __future__ import annotations

import torch
import torch.nn.functional as nnf

__all__ = ["ADVERSARIAL_HEADS", "AdversarialLoss"]

ADVERSARIAL_HEADS = ("lsgan",)


class AdversarialLoss:
    """Adversarial loss for a PatchGAN's score map.

    LSGAN: the discriminator minimises ``0.5 * [E (D(real) - 1)^2 + E D(fake)^2]`` and the generator minimises
    ``E (D(G(x)) - 1)^2`` (thesis eq. 6.4 with a = 0, b = c = 1).

    Args:
        head: one of :data:`ADVERSARIAL_HEADS`.

    Raises:
        ValueError: unknown head.
    """

    def __init__(self, head: str = "lsgan") -> None:
        if head not in ADVERSARIAL_HEADS:
            raise ValueError(f"Unknown adversarial head {head!r}; choose one of {ADVERSARIAL_HEADS}.")
        self.head = head

    def discriminator(self, real_scores: torch.Tensor, fake_scores: torch.Tensor) -> torch.Tensor:
        """Loss of D given its scores on real and (detached) fake volumes, each (B, 1, D', H', W')."""
        return 0.5 * (nnf.mse_loss(real_scores, torch.ones_like(real_scores))
                      + nnf.mse_loss(fake_scores, torch.zeros_like(fake_scores)))

    def generator(self, fake_scores: torch.Tensor) -> torch.Tensor:
        """Loss of G given D's scores on its outputs, (B, 1, D', H', W')."""
        return nnf.mse_loss(fake_scores, torch.ones_like(fake_scores))
