"""Unpaired CT and MR volumes for training: loading through the preprocessing chain, and random 3D patches.

Inputs may also be outputs of ``ct2mr preprocess`` (HDF5 files with ``ct2mr_preprocessed`` = 1): those are used as
they are (their stored record included), and the ones flagged flat are skipped.

CT and MR collections are independent (unpaired, thesis section 5): each training step draws a CT patch and an MR
patch from random volumes of each domain. Patches are (B, 1, D, H, W) tensors in [-1, 1].
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from .batch import is_preprocessed, read_preprocessed
from .io import list_images, read_volumes
from .preprocessing import FlatVolumeWarning, PreprocessingConfig, PreprocessRecord, preprocess

__all__ = ["DomainVolume", "load_domain", "UnpairedPatchSampler", "random_patch"]

logger = logging.getLogger(__name__)


@dataclass
class DomainVolume:
    """One preprocessed training volume.

    Attributes:
        name: source file stem (with ``_tNNN`` for a volume of a 4D series).
        source: the source path.
        array: float32 (z, y, x) in [-1, 1].
        record: its preprocessing record.
    """

    name: str
    source: str
    array: np.ndarray
    record: PreprocessRecord


def load_domain(inputs: str | Path | Iterable[str | Path], modality: str, config: PreprocessingConfig | None = None,
                progress: Callable[[int, int, str], None] | None = None) -> list[DomainVolume]:
    """Read and preprocess every volume of one domain; 4D series are split into 3D volumes, flat MRs skipped.

    Outputs of ``ct2mr preprocess`` (:func:`ct2mr.batch.is_preprocessed`) are used as they are, not preprocessed a
    second time; flagged (flat) ones are skipped, and parameters that differ from ``config`` are logged as a warning.

    Args:
        inputs: files and folders (see :func:`ct2mr.io.list_images`), raw or preprocessed by ``ct2mr preprocess``.
        modality: ``"ct"`` or ``"mr"``.
        config: preprocessing parameters (thesis defaults when ``None``).
        progress: ``callback(done, total, name)`` after each file.

    Returns:
        The volumes, in sorted path order.

    Raises:
        FileNotFoundError, ct2mr.io.ImageReadError: a path is missing or unreadable.
        ValueError: nothing usable was found, or a preprocessed file of the other modality.
    """
    config = config or PreprocessingConfig()
    paths = list_images(inputs)
    volumes: list[DomainVolume] = []
    for i, path in enumerate(paths):
        if is_preprocessed(path):
            stored = read_preprocessed(path)
            if stored.modality != modality:
                raise ValueError(f"{path} was preprocessed as {stored.modality.upper()}, not {modality.upper()}.")
            if stored.flat:
                logger.warning("%s: flagged flat at preprocessing (P99 ~ P1); skipped", stored.name)
            else:
                changed = sorted(k for k, v in config.to_dict().items() if stored.record.config.get(k) != v)
                if changed:
                    logger.warning("%s was preprocessed with other parameters (%s) than this run; used as it is",
                                   path, ", ".join(f"{k}={stored.record.config.get(k)}" for k in changed))
                volumes.append(DomainVolume(stored.name, str(path), stored.array, stored.record))
            if progress:
                progress(i + 1, len(paths), path.name)
            continue
        for name, image in read_volumes(path):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", FlatVolumeWarning)
                pre = preprocess(image, modality, config)
            if pre.record.flat:
                logger.warning("%s: %s", name, caught[0].message if caught else "flat volume skipped")
                continue
            volumes.append(DomainVolume(name, str(path), pre.array, pre.record))
        if progress:
            progress(i + 1, len(paths), path.name)
    if not volumes:
        raise ValueError(f"No usable {modality.upper()} volume among {len(paths)} input(s).")
    return volumes


def random_patch(array: np.ndarray, size: Sequence[int], rng: np.random.Generator, foreground: float = 0.2,
                 background: float = -1.0, tries: int = 10) -> np.ndarray:
    """Crop a random (D, H, W) patch, preferring patches with enough foreground.

    Args:
        array: (z, y, x) volume in [-1, 1]; axes shorter than the patch are padded with ``background``.
        size: patch size (D, H, W) voxels.
        rng: random generator.
        foreground: wanted fraction of voxels above ``background + 0.05``; after ``tries`` draws the last is kept.
        background: the normalised background value.
        tries: draws before giving up on the foreground criterion.

    Returns:
        A float32 (D, H, W) patch.
    """
    pad = [(0, max(0, s - n)) for s, n in zip(size, array.shape)]
    if any(p[1] for p in pad):
        array = np.pad(array, pad, constant_values=background)
    patch = array
    for _ in range(max(1, tries)):
        start = [int(rng.integers(0, n - s + 1)) for n, s in zip(array.shape, size)]
        patch = array[tuple(slice(a, a + s) for a, s in zip(start, size))]
        if np.mean(patch > background + 0.05) >= foreground:
            break
    return np.ascontiguousarray(patch, dtype=np.float32)


class UnpairedPatchSampler:
    """Draw unpaired batches of CT and MR patches.

    Args:
        ct: preprocessed CT volumes.
        mr: preprocessed MR volumes.
        patch_size: (D, H, W) voxels, each a multiple of 4.
        batch_size: patches per domain per draw.
        seed: seed of the sampler's own random generator.
        foreground: see :func:`random_patch`.
    """

    def __init__(self, ct: Sequence[DomainVolume], mr: Sequence[DomainVolume], patch_size: Sequence[int],
                 batch_size: int = 1, seed: int = 0, foreground: float = 0.2) -> None:
        if not ct or not mr:
            raise ValueError("Training needs at least one CT and one MR volume.")
        self.ct, self.mr = list(ct), list(mr)
        self.patch_size = tuple(int(s) for s in patch_size)
        self.batch_size = int(batch_size)
        self.foreground = foreground
        self.rng = np.random.default_rng(seed)

    def _batch(self, volumes: Sequence[DomainVolume]) -> torch.Tensor:
        picks = self.rng.integers(0, len(volumes), self.batch_size)
        patches = [random_patch(volumes[i].array, self.patch_size, self.rng, self.foreground) for i in picks]
        return torch.from_numpy(np.stack(patches)[:, None])

    def sample(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(ct_batch, mr_batch)``, each (B, 1, D, H, W) float32 in [-1, 1]."""
        return self._batch(self.ct), self._batch(self.mr)
