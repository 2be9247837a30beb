"""Checkpoints that cannot run code: safetensors weights plus JSON metadata, and the bundled default model.

A ct2mr checkpoint is one ``.safetensors`` file holding the tensors of both generators (``G.*`` CT -> MR and
``F.*`` MR -> CT; optionally the discriminators ``D_MR.*`` and ``D_CT.*``) and, in the safetensors header, string
metadata: ``format`` (``"ct2mr.cyclegan"``), ``format_version``, and JSON documents ``architecture``,
``preprocessing`` (every parameter of :class:`ct2mr.preprocessing.pipeline.PreprocessingConfig`), ``inference`` (window size,
overlap) and ``training`` (data, steps, losses, software versions). The checkpoint alone is enough to translate.

safetensors stores raw tensors only: loading never unpickles, so an untrusted file cannot run code.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ct2mr.io.cache import sha256sum
from ct2mr.io.images import atomic_write
from ct2mr.networks import build_discriminator, build_generator
from ct2mr.models.registry import MODELS_DIR, read_model_list
from ct2mr.preprocessing.pipeline import PreprocessingConfig

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "CheckpointError",
    "Checkpoint",
    "save_checkpoint",
    "load_checkpoint",
    "load_discriminators",
    "read_metadata",
    "verify_checkpoint",
    "default_model_path",
    "save_training_state",
    "load_training_state",
    "registry_entry",
    "DEFAULT_MODEL",
]

FORMAT = "ct2mr.cyclegan"
FORMAT_VERSION = "1"
DEFAULT_MODEL = "ct2mr-default-v1.5"


class CheckpointError(ValueError):
    """A file is not a usable ct2mr checkpoint; the message says why and what to do."""


@dataclass
class Checkpoint:
    """A loaded checkpoint.

    Attributes:
        G: generator CT -> MR, (B, 1, D, H, W) -> (B, 1, D, H, W), in eval mode.
        F: generator MR -> CT, same shapes.
        architecture: ``{"generator": {...}, "discriminator": {...}}``.
        preprocessing: the preprocessing parameters the networks were trained with.
        inference: default inference settings (``roi_size`` (D, H, W) voxels, ``overlap``).
        training: the training summary.
        path: the file it came from.
        sha256: SHA-256 of the file.
    """

    G: nn.Module
    F: nn.Module
    architecture: dict[str, Any]
    preprocessing: PreprocessingConfig
    inference: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    sha256: str = ""

    @property
    def name(self) -> str:
        """A display name: the training summary's ``name`` or the file stem."""
        return str(self.training.get("name") or (self.path.stem if self.path else "unnamed"))


def save_checkpoint(path: str | os.PathLike, modules: dict[str, nn.Module], architecture: dict[str, Any],
                    preprocessing: PreprocessingConfig, inference: dict[str, Any] | None = None,
                    training: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint atomically (temporary file, then rename).

    Args:
        path: destination ``.safetensors`` file; its folder must exist.
        modules: at least ``{"G": ..., "F": ...}``; ``"D_MR"`` and ``"D_CT"`` are optional.
        architecture: ``{"generator": spec, "discriminator": spec}`` as :func:`ct2mr.networks.build_generator` takes.
        preprocessing: parameters of the preprocessing the networks expect.
        inference: default inference settings.
        training: training summary (JSON-serialisable).

    Returns:
        The destination path.

    Raises:
        ValueError: ``G`` or ``F`` missing.
    """
    from safetensors.torch import save_file

    if not {"G", "F"} <= set(modules):
        raise ValueError("A checkpoint needs both generators 'G' (CT -> MR) and 'F' (MR -> CT).")
    tensors = {}
    for prefix, module in modules.items():
        module = getattr(module, "module", module)  # unwrap DistributedDataParallel
        for key, value in module.state_dict().items():
            tensors[f"{prefix}.{key}"] = value.detach().to("cpu").contiguous()
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "architecture": json.dumps(architecture),
        "preprocessing": json.dumps(preprocessing.to_dict()),
        "inference": json.dumps(inference or {}),
        "training": json.dumps(training or {}),
    }
    path = Path(path)
    with atomic_write(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate a checkpoint's metadata without loading its tensors.

    Args:
        path: a ``.safetensors`` file.

    Returns:
        The metadata with JSON fields decoded.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: not a safetensors file, or not a ct2mr checkpoint, or a newer format version.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint at {path}. Pass --model with a .safetensors file written by "
                                "`ct2mr train`, or omit it to use the default model.")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for bad headers
        hint = (" PyTorch pickles (.pt/.pth) are refused because loading them can run code; export the weights to "
                "safetensors." if path.suffix in {".pt", ".pth", ".ckpt", ".pkl"} else "")
        raise CheckpointError(f"{path} is not a safetensors checkpoint ({exc}).{hint}") from exc
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path} is a safetensors file but not a ct2mr CycleGAN checkpoint (format "
                              f"{metadata.get('format')!r}, expected {FORMAT!r}). Use a checkpoint from `ct2mr train`.")
    if int(metadata.get("format_version", "0")) > int(FORMAT_VERSION):
        raise CheckpointError(f"{path} has format version {metadata['format_version']}, newer than this ct2mr "
                              f"understands ({FORMAT_VERSION}). Update ct2mr.")
    decoded: dict[str, Any] = dict(metadata)
    for key in ("architecture", "preprocessing", "inference", "training"):
        try:
            decoded[key] = json.loads(metadata.get(key, "{}"))
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{path}: metadata {key!r} is not valid JSON ({exc}).") from exc
    _check_inference_settings(path, decoded["inference"])
    return decoded


def _check_inference_settings(path: Path, inference: Any) -> None:
    """Validate a checkpoint's default inference settings with the rules of ``--roi-size`` and ``--overlap``."""
    from ct2mr.checks import validate_overlap, validate_roi_size

    if not isinstance(inference, dict):
        raise CheckpointError(f"{path}: metadata 'inference' must be a JSON object, got {inference!r}.")
    try:
        if inference.get("roi_size") is not None:
            validate_roi_size(inference["roi_size"], "its inference setting roi_size")
        if inference.get("overlap") is not None:
            validate_overlap(inference["overlap"], "its inference setting overlap")
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc} The checkpoint is damaged or was edited; export it again from "
                              "`ct2mr train`, or use another --model.") from exc


def _tensor_problems(expected: dict[str, tuple[int, ...]], stored: dict[str, tuple[int, ...]], prefix: str
                     ) -> list[str]:
    """Differences between the tensors an architecture needs (``expected``, without prefix) and those stored."""
    missing = [k for k in expected if f"{prefix}.{k}" not in stored]
    wrong = [(k, stored[f"{prefix}.{k}"], shape) for k, shape in expected.items()
             if f"{prefix}.{k}" in stored and tuple(stored[f"{prefix}.{k}"]) != tuple(shape)]
    unexpected = [k[len(prefix) + 1:] for k in stored if k.startswith(prefix + ".") and k[len(prefix) + 1:]
                  not in expected]
    problems = []
    if missing:
        problems.append(f"{len(missing)} tensor(s) of {prefix} are missing (e.g. {prefix}.{missing[0]})")
    if wrong:
        k, got, want = wrong[0]
        problems.append(f"{len(wrong)} tensor(s) of {prefix} have the wrong shape (e.g. {prefix}.{k}: "
                        f"{list(got)} stored, {list(want)} needed)")
    if unexpected:
        problems.append(f"{len(unexpected)} tensor(s) of {prefix} belong to no layer of its architecture (e.g. "
                        f"{prefix}.{unexpected[0]})")
    return problems


def _expected_shapes(spec: dict[str, Any], builder: Any) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the tensors a network built from ``spec`` holds (built on the meta device: no memory)."""
    try:
        with torch.device("meta"):
            net = builder(spec)
    except Exception:  # noqa: BLE001 - a network that needs real memory to be built
        net = builder(spec)
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def verify_checkpoint(path: str | os.PathLike, metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    """Check that a checkpoint holds every tensor its architecture needs, with the right shape, without loading them.

    The generators (and the discriminators, when the file holds any of their tensors) are built from the metadata's
    architecture (on PyTorch's meta device: no memory) and their ``state_dict`` names and shapes compared with the
    tensor headers of the safetensors file.

    Args:
        path: a ct2mr ``.safetensors`` checkpoint.
        metadata: its :func:`read_metadata` (read here when ``None``).

    Returns:
        The metadata.

    Raises:
        FileNotFoundError, CheckpointError: see :func:`read_metadata`; also a bad architecture, missing tensors,
            tensors of the wrong shape, or tensors no layer uses, each with an example name.
    """
    from safetensors import safe_open

    path = Path(path)
    meta = metadata if metadata is not None else read_metadata(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            stored = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as exc:  # noqa: BLE001 - safetensors' own error types
        raise CheckpointError(f"{path}: the tensor headers could not be read ({exc}); the file may be truncated.") \
            from exc
    architecture = meta.get("architecture") or {}
    try:
        generator = _expected_shapes(architecture["generator"], build_generator)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: bad generator architecture in metadata ({exc}).") from exc
    problems = _tensor_problems(generator, stored, "G") + _tensor_problems(generator, stored, "F")
    if any(k.startswith(("D_MR.", "D_CT.")) for k in stored) and "discriminator" in architecture:
        try:
            disc = _expected_shapes(architecture["discriminator"], build_discriminator)
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: bad discriminator architecture in metadata ({exc}).") from exc
        problems += _tensor_problems(disc, stored, "D_MR") + _tensor_problems(disc, stored, "D_CT")
    if problems:
        raise CheckpointError(f"{path}: its weights do not fit its architecture ({architecture.get('generator')}): "
                              f"{'; '.join(problems)}. The file is damaged or incomplete; export or download it "
                              "again.")
    return meta


def load_checkpoint(path: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> Checkpoint:
    """Load both generators of a checkpoint (safely: no code runs).

    Args:
        path: a ct2mr ``.safetensors`` checkpoint; ``None`` loads the bundled default model.
        device: where to put the networks.

    Returns:
        The :class:`Checkpoint` with G and F in eval mode.

    Raises:
        FileNotFoundError, CheckpointError: see :func:`read_metadata` (also invalid inference settings) and
            :func:`verify_checkpoint` (missing tensors, wrong shapes, each named).
    """
    from safetensors.torch import load_file

    path = Path(path) if path is not None else default_model_path()
    meta = verify_checkpoint(path)
    try:
        tensors = load_file(str(path), device="cpu")
    except Exception as exc:
        raise CheckpointError(f"{path}: the tensors could not be read ({exc}); the file may be truncated.") from exc
    nets = {}
    for prefix in ("G", "F"):
        try:
            net = build_generator(meta["architecture"]["generator"])
        except (KeyError, ValueError) as exc:
            raise CheckpointError(f"{path}: bad generator architecture in metadata ({exc}).") from exc
        state = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
        if not state:
            raise CheckpointError(f"{path} holds no weights for generator {prefix}.")
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"{path}: weights of {prefix} do not fit its architecture ({exc}).") from exc
        nets[prefix] = net.to(device).eval()
    return Checkpoint(G=nets["G"], F=nets["F"], architecture=meta["architecture"],
                      preprocessing=PreprocessingConfig.from_dict(meta["preprocessing"]),
                      inference=meta["inference"], training=meta["training"], path=path, sha256=sha256sum(path))


def load_discriminators(path: str | os.PathLike) -> dict[str, nn.Module]:
    """Load D_MR and D_CT from a checkpoint that holds them (training checkpoints do).

    Raises:
        CheckpointError: the checkpoint holds no discriminators.
    """
    from safetensors.torch import load_file

    meta = read_metadata(path)
    tensors = load_file(str(path), device="cpu")
    out = {}
    for prefix in ("D_MR", "D_CT"):
        state = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
        if not state:
            raise CheckpointError(f"{path} holds no weights for discriminator {prefix}.")
        net = build_discriminator(meta["architecture"]["discriminator"])
        net.load_state_dict(state, strict=True)
        out[prefix] = net
    return out


def registry_entry(sha256: str) -> dict[str, Any] | None:
    """The entry of ``models/models.json`` (name, version, licence, ...) whose SHA-256 is ``sha256``, if any."""
    return next((m for m in read_model_list()["models"] if m["sha256"] == sha256), None)


def default_model_path() -> Path:
    """Path of the bundled default model, checked against the SHA-256 in ``models/models.json``.

    Returns:
        The path of the default ``.safetensors`` file inside the installed package.

    Raises:
        CheckpointError: the file is missing or its checksum does not match (a damaged install).
    """
    registry = read_model_list()
    entry = next(m for m in registry["models"] if m["name"] == registry["default"])
    path = MODELS_DIR / entry["file"]
    if not path.is_file():
        raise CheckpointError(f"The default model {entry['name']} is missing from {MODELS_DIR}; reinstall ct2mr or "
                              "pass --model.")
    if sha256sum(path) != entry["sha256"]:
        raise CheckpointError(f"The default model {path} does not match its SHA-256 in models.json; the install is "
                              "damaged. Reinstall ct2mr or pass --model.")
    return path


def save_training_state(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write a resumable training state atomically (temporary file, then rename).

    The state holds only tensors, numbers, strings and nested dicts/lists/tuples of them (optimiser and scheduler
    state dicts, RNG states), so :func:`load_training_state` reads it with ``torch.load(weights_only=True)``, which
    never runs code.

    Args:
        path: destination file (``.pt``); its folder must exist.
        state: the state.

    Returns:
        The destination path.
    """
    path = Path(path)
    with atomic_write(path) as tmp:
        torch.save(state, tmp)
    return path


def load_training_state(path: str | os.PathLike) -> dict[str, Any]:
    """Read a training state written by :func:`save_training_state` (safely: ``weights_only=True``, on CPU).

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: unreadable or holding objects other than tensors and plain containers.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No training state at {path}; the checkpoint folder is incomplete.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError for damaged files
        raise CheckpointError(f"{path} is not a readable ct2mr training state ({exc}).") from exc
