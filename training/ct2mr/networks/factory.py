"""Build networks from a plain-dict architecture description, as stored in checkpoints.

Generator specs (thesis section 6.2):

* ``{"name": "resnet", "base_channels": 64, "n_blocks": 9, "norm": "instance"}`` (ResNet-9b; ``n_blocks`` 6 for
  ResNet-6b), :class:`ct2mr.networks.resnet.ResnetGenerator3D`;
* ``{"name": "unet", "base_channels": 32, "depth": 4, "norm": "instance"}``, :class:`ct2mr.networks.unet.UNet3D`;
* ``{"name": "unetpp", "base_channels": 32, "depth": 4, "norm": "instance"}``,
  :class:`ct2mr.networks.unet.UNetPlusPlus3D`.

Discriminator spec: ``{"name": "patchgan", "base_channels": 64, "n_layers": 3, "norm": "instance",
"spectral_norm": false, "in_channels": 1}``, :class:`ct2mr.networks.patchgan.PatchDiscriminator3D`.

Missing keys take the constructors' defaults; ``norm`` is one of :data:`ct2mr.networks.norm.NORMS`.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from ct2mr.networks.patchgan import PatchDiscriminator3D
from ct2mr.networks.resnet import ResnetGenerator3D
from ct2mr.networks.unet import UNet3D, UNetPlusPlus3D

__all__ = ["GENERATORS", "DISCRIMINATORS", "build_generator", "build_discriminator"]

_GENERATORS: dict[str, Callable[..., nn.Module]] = {"resnet": ResnetGenerator3D, "unet": UNet3D,
                                                    "unetpp": UNetPlusPlus3D}
_DISCRIMINATORS: dict[str, Callable[..., nn.Module]] = {"patchgan": PatchDiscriminator3D}
GENERATORS = tuple(_GENERATORS)
DISCRIMINATORS = tuple(_DISCRIMINATORS)


def _build(kind: str, table: dict[str, Callable[..., nn.Module]], spec: dict[str, Any], default: str) -> nn.Module:
    if not isinstance(spec, dict):
        raise ValueError(f"A {kind} spec must be a dict, got {type(spec).__name__}.")
    spec = dict(spec)
    name = spec.pop("name", default)
    if name not in table:
        raise ValueError(f"Unknown {kind} {name!r}; choose one of {tuple(table)}.")
    try:
        return table[name](**spec)
    except TypeError as exc:
        raise ValueError(f"Bad arguments for the {name} {kind}: {exc}") from exc


def build_generator(spec: dict[str, Any]) -> nn.Module:
    """Build a generator from a spec such as ``{"name": "resnet", "base_channels": 16, "n_blocks": 9}``.

    Args:
        spec: ``name`` is one of :data:`GENERATORS` (default ``"resnet"``); the other keys are the constructor's
            arguments (see the module docstring).

    Returns:
        The module, (B, 1, D, H, W) -> (B, 1, D, H, W) in [-1, 1].

    Raises:
        ValueError: unknown name, unknown or bad arguments.
    """
    return _build("generator", _GENERATORS, spec, "resnet")


def build_discriminator(spec: dict[str, Any]) -> nn.Module:
    """Build a discriminator from ``{"name": "patchgan", "base_channels": 16, "n_layers": 3, "norm": "instance"}``.

    Args:
        spec: ``name`` is one of :data:`DISCRIMINATORS` (default ``"patchgan"``); the other keys are the
            constructor's arguments (``base_channels``, ``n_layers``, ``norm``, ``spectral_norm``, ``in_channels``).

    Returns:
        The module, (B, C, D, H, W) -> (B, 1, D', H', W') patch scores.

    Raises:
        ValueError: unknown name, unknown or bad arguments.
    """
    return _build("discriminator", _DISCRIMINATORS, spec, "patchgan")
