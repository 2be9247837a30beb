"""Build networks from a plain-dict architecture description, as stored in checkpoints."""

from __future__ import annotations

from typing import Any

from torch import nn

from .patchgan import PatchDiscriminator3D
from .resnet import ResnetGenerator3D

__all__ = ["GENERATORS", "DISCRIMINATORS", "build_generator", "build_discriminator"]

GENERATORS = ("resnet",)
DISCRIMINATORS = ("patchgan",)


def build_generator(spec: dict[str, Any]) -> nn.Module:
    """Build a generator from ``{"name": "resnet", "base_channels": 16, "n_blocks": 9, "norm": "instance"}``.

    Args:
        spec: ``name`` is one of :data:`GENERATORS`; the other keys are the constructor's arguments.

    Returns:
        The module, (B, 1, D, H, W) -> (B, 1, D, H, W).

    Raises:
        ValueError: unknown name or arguments.
    """
    spec = dict(spec)
    name = spec.pop("name", "resnet")
    if name == "resnet":
        try:
            return ResnetGenerator3D(**spec)
        except TypeError as exc:
            raise ValueError(f"Bad arguments for the resnet generator: {exc}") from exc
    raise ValueError(f"Unknown generator {name!r}; choose one of {GENERATORS}.")


def build_discriminator(spec: dict[str, Any]) -> nn.Module:
    """Build a discriminator from ``{"name": "patchgan", "base_channels": 16, "n_layers": 3, "norm": "instance"}``.

    Raises:
        ValueError: unknown name or arguments.
    """
    spec = dict(spec)
    name = spec.pop("name", "patchgan")
    if name == "patchgan":
        try:
            return PatchDiscriminator3D(**spec)
        except TypeError as exc:
            raise ValueError(f"Bad arguments for the patchgan discriminator: {exc}") from exc
    raise ValueError(f"Unknown discriminator {name!r}; choose one of {DISCRIMINATORS}.")
