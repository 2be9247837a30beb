"""The user cache folder and the SHA-256 of a file: the one implementation of each (standard library only).

Downloaded models, sample data and feature-extractor weights live under :func:`cache_root` (``$CT2MR_CACHE``, else
``platformdirs.user_cache_dir("ct2mr")``), never in the install tree. Light on purpose: the Slicer module reads the model
list in its own process, which must stay free of NumPy, SimpleITK and torch.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

__all__ = ["CACHE_ENV", "cache_root", "cache_dir", "sha256sum"]

CACHE_ENV = "CT2MR_CACHE"


def cache_root() -> Path:
    """``$CT2MR_CACHE`` when set, else the platform's user cache folder for ``ct2mr`` (``platformdirs``).

    The folder is not created here.
    """
    root = os.environ.get(CACHE_ENV)
    if not root:
        from platformdirs import user_cache_dir

        root = user_cache_dir("ct2mr", appauthor=False)
    return Path(root)


def cache_dir(kind: str) -> Path:
    """One kind of cached file under :func:`cache_root`: ``"models"``, ``"sampledata"`` or ``"weights"``.

    Raises:
        ValueError: ``kind`` is not a plain folder name.
    """
    if not kind or Path(kind).name != kind or kind in {".", ".."}:
        raise ValueError(f"cache_dir needs a plain folder name, got {kind!r}.")
    return cache_root() / kind


def sha256sum(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks of ``chunk`` bytes (checkpoints, the model list's downloads and imports,
    the sample data and downloaded weights all use it).

    Raises:
        OSError: the file cannot be read.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
