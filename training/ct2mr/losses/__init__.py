"""Training objectives of the thesis (section 6.3). No file I/O happens here; tensors are (B, C, D, H, W)."""

from __future__ import annotations

from .adversarial import ADVERSARIAL_HEADS, AdversarialLoss
from .cycle import cycle_loss, identity_loss

__all__ = ["ADVERSARIAL_HEADS", "AdversarialLoss", "cycle_loss", "identity_loss"]
