"""Feature extractors for patch-based FID and KID on 3D volumes (thesis section 5 E1, section 7 Tables 6, 7, 9).

FID and KID compare the distributions of features of real and synthetic patches. The thesis computes them "on 3D
patches" without naming the network; no pretrained 3D medical network ships with ct2mr, and none can be fetched
without the user's consent. Two extractors implement the :class:`FeatureExtractor` protocol:

* ``"random"`` (the default, :class:`RandomConv3DFeatures`): a fixed, untrained 3D convolutional network whose
  weights are drawn from a seeded NumPy ``PCG64`` generator (He-normal, zero biases): four stages of
  ``Conv3d(k=3, stride=2, padding=1) + LeakyReLU(0.2)`` with 8, 16, 32, 64 channels; the feature vector is the
  concatenation of each stage's spatial mean (8 + 16 + 32 + 64 = 120 values), so it holds both low-level intensity
  statistics and larger-scale texture. Features of randomly initialised networks are a known proxy for learned
  ones when no in-domain pretrained network exists (Naeem et al., "Reliable fidelity and diversity metrics for
  generative models", ICML 2020, random embeddings for non-ImageNet data; Lee, Kim and Lee, "Demystifying randomly
  initialized networks for evaluating generative models", AAAI 2023, arXiv:2208.09218). The extractor is identified
  by its seed, architecture and the SHA-256 of its weights (:attr:`FeatureExtractor.identity`), written next to every
  score: "random-feature FID" values are comparable only between runs with the same identity, never with the
  thesis's numbers or with Inception-based FID.
* ``"medicalnet"`` (:class:`MedicalNetFeatures`): MedicalNet's ResNet-10 pretrained on 23 medical datasets (Chen et
  al. 2019) as MONAI's ``resnet10(spatial_dims=3, n_input_channels=1, shortcut_type="B",
  bias_downsample=False, feed_forward=False)``; the 512 features are the global average pool before the fully
  connected layer. The weights come from a local file, or from a URL checked against a SHA-256 and cached in the user
  cache (:func:`resolve_weights`); ``.safetensors`` files and PyTorch files read with ``torch.load(...,
  weights_only=True)`` (which cannot run code) are accepted.

Patches are (N, 1, D, H, W) tensors in the network's normalised [-1, 1] intensities, fed as they are (no per-patch
standardisation, so that intensity differences count).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
from torch import nn

__all__ = [
    "FEATURE_EXTRACTORS",
    "MEDICALNET_URL",
    "FeatureExtractor",
    "RandomConv3DFeatures",
    "MedicalNetFeatures",
    "weights_cache_dir",
    "resolve_weights",
    "build_feature_extractor",
]

logger = logging.getLogger(__name__)

#: Accepted ``--features`` values.
FEATURE_EXTRACTORS = ("random", "medicalnet")
#: Where MedicalNet's ResNet-10 (23 datasets) is published (the file MONAI's ``resnet10(pretrained=True)`` fetches).
MEDICALNET_URL = "https://huggingface.co/TencentMedicalNet/MedicalNet-Resnet10/resolve/main/resnet_10_23dataset.pth"


@runtime_checkable
class FeatureExtractor(Protocol):
    """Maps 3D patches to feature vectors.

    Attributes:
        name: short name (``"random"``, ``"medicalnet"``).
        dim: feature dimension.
        identity: JSON-ready description that pins the extractor (architecture, seed or weights file, SHA-256).
    """

    name: str
    dim: int
    identity: dict[str, Any]

    def __call__(self, patches: torch.Tensor) -> np.ndarray:
        """Features of (N, 1, D, H, W) patches in [-1, 1]: a float64 (N, dim) array."""
        ...


class _RandomConvNet(nn.Module):
    """Stride-2 Conv3d + LeakyReLU(0.2) stages; the output concatenates each stage's spatial mean."""
    def __init__(self, channels: Sequence[int]) -> None:
        super().__init__()
        layers, previous = [], 1
        for c in channels:
            layers.append(nn.Conv3d(previous, c, kernel_size=3, stride=2, padding=1))
            previous = c
        self.convs = nn.ModuleList(layers)
        self.act = nn.LeakyReLU(0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Features (N, sum(channels)) of (N, 1, D, H, W) patches."""
        pooled = []
        for conv in self.convs:
            x = self.act(conv(x))
            pooled.append(x.mean(dim=(2, 3, 4)))
        return torch.cat(pooled, dim=1)


class RandomConv3DFeatures:
    """The default extractor: a fixed-seed, untrained 3D conv network (no download; see the module docstring).

    Args:
        seed: seed of the NumPy ``PCG64`` generator that draws the weights (in the order of ``state_dict()``).
        channels: output channels of the stride-2 stages.
        device: where features are computed.
        batch_size: patches per forward pass.
    """

    def __init__(self, seed: int = 0, channels: Sequence[int] = (8, 16, 32, 64), device: str | torch.device = "cpu",
                 batch_size: int = 32) -> None:
        self.name = "random"
        self.seed = int(seed)
        self.channels = tuple(int(c) for c in channels)
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.net = _RandomConvNet(self.channels)
        rng = np.random.default_rng(self.seed)
        digest = hashlib.sha256()
        with torch.no_grad():
            for key, tensor in self.net.state_dict().items():
                if key.endswith("weight"):
                    fan_in = int(np.prod(tensor.shape[1:]))
                    values = rng.standard_normal(tuple(tensor.shape)) * np.sqrt(2.0 / fan_in)
                else:
                    values = np.zeros(tuple(tensor.shape))
                values = values.astype("<f4")
                digest.update(key.encode() + values.tobytes())
                tensor.copy_(torch.from_numpy(values))
        self.net.eval().to(self.device)
        self.dim = int(sum(self.channels))
        architecture = {"stages": [{"conv3d": [3, 2, 1], "out_channels": c, "activation": "leaky_relu(0.2)"}
                                   for c in self.channels], "features": "concatenated spatial means of each stage",
                        "init": "He-normal from numpy.random.default_rng(seed) (PCG64), zero biases"}
        self.identity = {"name": self.name, "seed": self.seed, "dim": self.dim, "architecture": architecture,
                         "weights_sha256": digest.hexdigest(),
                         "architecture_sha256": hashlib.sha256(json.dumps(architecture, sort_keys=True).encode())
                         .hexdigest()}

    def __call__(self, patches: torch.Tensor) -> np.ndarray:
        """Features (N, 120) of (N, 1, D, H, W) patches in [-1, 1]."""
        return _batched(self.net, patches, self.device, self.batch_size)


def _batched(net: nn.Module, patches: torch.Tensor, device: torch.device, batch_size: int) -> np.ndarray:
    """Features of (N, 1, D, H, W) patches by ``net`` in batches, as a float64 (N, dim) array."""
    if patches.ndim != 5 or patches.shape[1] != 1:
        raise ValueError(f"patches must be (N, 1, D, H, W), got {tuple(patches.shape)}.")
    out = []
    with torch.inference_mode():
        for start in range(0, patches.shape[0], batch_size):
            batch = patches[start:start + batch_size].to(device, torch.float32)
            out.append(net(batch).reshape(batch.shape[0], -1).double().cpu())
    if not out:
        return np.zeros((0, 0))
    return torch.cat(out).numpy()


def weights_cache_dir() -> Path:
    """Folder of downloaded feature-extractor weights: ``$CT2MR_CACHE/weights`` or the platform's user cache."""
    from ct2mr.io.cache import cache_dir

    return cache_dir("weights")


def resolve_weights(source: str | os.PathLike | None, sha256: str | None = None, name: str = "MedicalNet ResNet-10",
                    url_hint: str = MEDICALNET_URL) -> Path:
    """Find a weights file: a local path (checked when ``sha256`` is given) or a URL downloaded once into the cache.

    Args:
        source: a local file, an ``http(s)://`` or ``file://`` URL, or ``None``.
        sha256: expected hex SHA-256; required for URLs, optional for local files.
        name: what the weights are, for messages.
        url_hint: where the user can get them, for messages.

    Returns:
        The local path of the verified file.

    Raises:
        FileNotFoundError: no source or a missing file; the message says how to get the weights.
        ValueError: a URL without ``sha256``.
        ct2mr.io.sampledata.ChecksumError: the file does not have ``sha256`` (a failed download keeps nothing).
        OSError: the server cannot be reached.
    """
    from ct2mr.io.cache import sha256sum
    from ct2mr.io.sampledata import ChecksumError, fetch

    how = (f"Download {name} weights (e.g. {url_hint}) and pass the file with --feature-weights PATH, or pass "
           "--feature-weights URL --feature-sha256 HEX to download it once into the cache; or use the default "
           "--features random, which needs no download.")
    if source is None or str(source) == "":
        raise FileNotFoundError(f"No {name} weights were given. {how}")
    text = str(source)
    if text.startswith(("http://", "https://", "file://")):
        if not sha256:
            raise ValueError(f"Downloading {name} weights from {text} needs their SHA-256 (--feature-sha256 HEX), so "
                             "that a changed or corrupted file is refused.")
        suffix = ".safetensors" if text.endswith(".safetensors") else ".pth"
        destination = weights_cache_dir() / f"{sha256[:16]}{suffix}"
        logger.info("Fetching %s weights from %s into %s", name, text, destination)
        return fetch(text, sha256, destination)
    path = Path(text).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{name} weights not found at {path}. {how}")
    if sha256 and sha256sum(path) != sha256.lower():
        raise ChecksumError(f"{path} has SHA-256 {sha256sum(path)}, expected {sha256}; it is not the expected "
                            f"{name} weights file.")
    return path


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors or PyTorch weights file (``module.`` prefixes dropped), loaded safely."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path), device="cpu")
    else:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # unpickling refused or a damaged file
            raise ValueError(f"{path} could not be read safely with torch.load(weights_only=True) ({exc}). Convert it "
                             "to .safetensors or use the original MedicalNet file.") from exc
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds no state dict of tensors.")
    return {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}


class MedicalNetFeatures:
    """MedicalNet ResNet-10 (MONAI ``resnet10``, 3D, one input channel): 512 features before the FC layer.

    Args:
        weights: a local weights file or a URL (see :func:`resolve_weights`).
        sha256: the weights' SHA-256 (required for URLs).
        device: where features are computed.
        batch_size: patches per forward pass.

    Raises:
        FileNotFoundError, ValueError, ct2mr.io.sampledata.ChecksumError: see :func:`resolve_weights`; also weights that
        do not fit the architecture.
    """

    def __init__(self, weights: str | os.PathLike | None, sha256: str | None = None,
                 device: str | torch.device = "cpu", batch_size: int = 16) -> None:
        from monai.networks.nets import resnet10

        from ct2mr.io.cache import sha256sum

        path = resolve_weights(weights, sha256)
        self.name = "medicalnet"
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.net = resnet10(spatial_dims=3, n_input_channels=1, shortcut_type="B", bias_downsample=False,
                            feed_forward=False)
        state = _load_state_dict(path)
        missing, unexpected = self.net.load_state_dict(state, strict=False)
        if missing:
            raise ValueError(f"{path} does not fit MedicalNet ResNet-10 (missing {len(missing)} tensors, e.g. "
                             f"{missing[:3]}). Use resnet_10_23dataset.pth or resnet_10.pth from MedicalNet.")
        if unexpected:
            logger.info("Ignoring %d extra tensors of %s (e.g. the segmentation head)", len(unexpected), path)
        self.net.eval().to(self.device)
        self.dim = 512
        self.identity = {"name": self.name, "dim": self.dim, "architecture": "monai resnet10(spatial_dims=3, "
                         "n_input_channels=1, shortcut_type='B', bias_downsample=False, feed_forward=False)",
                         "weights": str(path), "weights_sha256": sha256sum(path)}

    def __call__(self, patches: torch.Tensor) -> np.ndarray:
        """Features (N, 512) of (N, 1, D, H, W) patches in [-1, 1]."""
        return _batched(self.net, patches, self.device, self.batch_size)


def build_feature_extractor(name: str = "random", weights: str | os.PathLike | None = None,
                            sha256: str | None = None, seed: int = 0, device: str | torch.device = "cpu"
                            ) -> FeatureExtractor:
    """Build the extractor named by ``--features``.

    Args:
        name: one of :data:`FEATURE_EXTRACTORS`.
        weights: ``"medicalnet"``: local file or URL of the weights.
        sha256: ``"medicalnet"``: their SHA-256.
        seed: ``"random"``: the weight seed.
        device: where features are computed.

    Returns:
        The extractor.

    Raises:
        ValueError: unknown name; see also :class:`MedicalNetFeatures`.
    """
    if name == "random":
        return RandomConv3DFeatures(seed=seed, device=device)
    if name == "medicalnet":
        return MedicalNetFeatures(weights, sha256, device=device)
    raise ValueError(f"features must be one of {FEATURE_EXTRACTORS}, got {name!r}.")
