"""Collections of volumes through the preprocessing chain: every CT or every MR of a set of files and folders.

:func:`load_domain` reads a whole domain (thesis section 5: CT and MR collections are independent) into
:class:`DomainVolume` arrays on the network grid. Training (:mod:`ct2mr.training.data`), evaluation and the
reference MRs of harmonisation (:func:`ct2mr.inference.harmonization.load_reference_mrs`) read their volumes
through it. Inputs may be raw images or outputs of ``ct2mr preprocess`` (:mod:`ct2mr.io.preprocessed`), which are
used as they are.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from ct2mr.checks import check_input_image, input_checks_mode
from ct2mr.io.images import list_images, read_volumes
from ct2mr.io.preprocessed import is_preprocessed, read_preprocessed
from ct2mr.preprocessing.pipeline import FlatVolumeWarning, PreprocessingConfig, PreprocessRecord, preprocess

__all__ = ["DomainVolume", "load_domain"]

logger = logging.getLogger(__name__)


@dataclass
class DomainVolume:
    """One preprocessed volume of a domain (a training, validation or reference volume).

    Attributes:
        name: source file stem (with ``_tNNN`` for a volume of a 4D series).
        source: the path it was read from.
        array: float32 (z, y, x) in [-1, 1].
        record: its preprocessing record.
        group: the original acquisition it comes from (the source file, or for ``ct2mr preprocess`` outputs the
            file they were made from); the phases of a 4D series share one group. Splits and ``balance="source"``
            work on groups.
    """

    name: str
    source: str
    array: np.ndarray
    record: PreprocessRecord
    group: str = ""

    def __post_init__(self) -> None:
        """An empty ``group`` is the volume's own ``source``."""
        if not self.group:
            self.group = self.source


def load_domain(inputs: str | Path | Iterable[str | Path], modality: str, config: PreprocessingConfig | None = None,
                progress: Callable[[int, int, str], None] | None = None) -> list[DomainVolume]:
    """Read and preprocess every volume of one domain; 4D series are split into 3D volumes, flat MRs skipped.

    Outputs of ``ct2mr preprocess`` (:func:`ct2mr.io.preprocessed.is_preprocessed`) are used as they are, not
    preprocessed a second time; flagged (flat) ones are skipped, and parameters that differ from ``config`` are
    logged as a warning. Raw volumes are checked first (:func:`ct2mr.checks.check_input_image`): a spacing outside
    0.1-20 mm is refused and NaN/inf voxels are replaced (CT -1024 HU, MR 0) with a warning; inside
    :func:`ct2mr.checks.input_checks` (``ct2mr train``) a CT that is not plausible in HU (an MR, a constant volume)
    and an MR that is a CT in HU are refused too (with ``force``: a warning).

    Args:
        inputs: files and folders (see :func:`ct2mr.io.images.list_images`), raw or preprocessed by
            ``ct2mr preprocess``.
        modality: ``"ct"`` or ``"mr"``.
        config: preprocessing parameters (thesis defaults when ``None``).
        progress: ``callback(done, total, name)`` after each file.

    Returns:
        The volumes, in sorted path order.

    Raises:
        FileNotFoundError, ct2mr.io.images.ImageReadError: a path is missing or unreadable.
        ct2mr.checks.InputCheckError: a raw volume refused by the input checks (the message names the file).
        ValueError: nothing usable was found, or a preprocessed file of the other modality.
    """
    config = config or PreprocessingConfig()
    paths = list_images(inputs)
    volumes: list[DomainVolume] = []
    for i, path in enumerate(paths):
        if is_preprocessed(path):
            volumes += _stored_volume(path, modality, config)
        else:
            volumes += _raw_volumes(path, modality, config)
        if progress:
            progress(i + 1, len(paths), path.name)
    if not volumes:
        raise ValueError(f"No usable {modality.upper()} volume among {len(paths)} input(s).")
    return volumes


def _stored_volume(path: Path, modality: str, config: PreprocessingConfig) -> list[DomainVolume]:
    """The volume of a ``ct2mr preprocess`` output as stored (none when flagged flat); other parameters warn."""
    stored = read_preprocessed(path)
    if stored.modality != modality:
        raise ValueError(f"{path} was preprocessed as {stored.modality.upper()}, not {modality.upper()}.")
    if stored.flat:
        logger.warning("%s: flagged flat at preprocessing (P99 ~ P1); skipped", stored.name)
        return []
    changed = sorted(k for k, v in config.to_dict().items() if stored.record.config.get(k) != v)
    if changed:
        logger.warning("%s was preprocessed with other parameters (%s) than this run; used as it is",
                       path, ", ".join(f"{k}={stored.record.config.get(k)}" for k in changed))
    return [DomainVolume(stored.name, str(path), stored.array, stored.record,
                         str(stored.attrs.get("source_abspath") or path))]


def _raw_volumes(path: Path, modality: str, config: PreprocessingConfig) -> list[DomainVolume]:
    """The 3D volumes of a raw input, checked and preprocessed; flat ones are skipped with a warning."""
    volumes = []
    series = read_volumes(path)
    for name, image in series:
        image, _ = check_input_image(image, modality, str(path) if len(series) == 1 else f"{path} ({name})",
                                     constant_mr="allow", plausibility=input_checks_mode() is not None)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", FlatVolumeWarning)
            pre = preprocess(image, modality, config)
        if pre.record.flat:
            logger.warning("%s: %s", name, caught[0].message if caught else "flat volume skipped")
            continue
        volumes.append(DomainVolume(name, str(path), pre.array, pre.record, str(path)))
    return volumes
