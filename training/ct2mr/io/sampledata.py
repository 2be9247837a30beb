"""Sample data for the demo: download once by URL + SHA-256 into the user cache, like Slicer's SampleData.

Files land in ``platformdirs.user_cache_dir("ct2mr")/sampledata`` (override with the environment variable
``CT2MR_CACHE``), never in the install tree. A download goes to a temporary file, is checked against its SHA-256 and
only then renamed into place; a file that fails the check is deleted and reported.
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ct2mr.io import cache
from ct2mr.io.cache import sha256sum

__all__ = ["Sample", "SAMPLES", "ChecksumError", "cache_dir", "fetch", "DEMO_FALLBACK_CT", "demo_fallbacks",
           "demo_ct"]


SLICER_TESTING_DATA = "https://github.com/Slicer/SlicerTestingData/releases/download/SHA256/"


class ChecksumError(RuntimeError):
    """A downloaded file does not have the SHA-256 it was published with."""


@dataclass(frozen=True)
class Sample:
    """A public sample volume.

    Attributes:
        name: short name (as in Slicer's SampleData).
        file_name: the cached file's name.
        url: where to download it.
        sha256: its published SHA-256.
        description: what it is, and its licence.
    """

    name: str
    file_name: str
    url: str
    sha256: str
    description: str


SAMPLES = {
    "CTChest": Sample(
        "CTChest", "CT-chest.nrrd",
        SLICER_TESTING_DATA + "4507b664690840abb6cb9af2d919377ffc4ef75b167cb6fd0f747befdb12e38e",
        "4507b664690840abb6cb9af2d919377ffc4ef75b167cb6fd0f747befdb12e38e",
        "Chest CT, 3D Slicer's SampleData 'CTChest' (SlicerTestingData)."),
}


def cache_dir() -> Path:
    """The sample-data cache folder (``$CT2MR_CACHE/sampledata`` or the platform's user cache)."""
    return cache.cache_dir("sampledata")


def fetch(url: str, sha256: str, destination: str | os.PathLike, timeout: float = 30.0,
          progress: Callable[[int, int], None] | None = None) -> Path:
    """Download ``url`` to ``destination`` unless a file with the right SHA-256 is already there.

    Args:
        url: http(s) or file URL.
        sha256: the expected hex SHA-256.
        destination: the final path; its folder is created.
        timeout: seconds to wait for the server.
        progress: ``callback(bytes_done, bytes_total_or_0)``.

    Returns:
        The destination path.

    Raises:
        ChecksumError: the downloaded bytes do not match ``sha256`` (nothing is kept).
        OSError: the server cannot be reached (``urllib.error.URLError`` is an ``OSError``).
    """
    destination = Path(destination)
    if destination.is_file() and sha256sum(destination) == sha256:
        return destination
    destination.parent.mkdir(parents=True, exist_ok=True)
    tmp = destination.with_name(f".{destination.name}.part")
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0)
            done = 0
            while block := response.read(1 << 20):
                out.write(block)
                digest.update(block)
                done += len(block)
                if progress:
                    progress(done, total)
        if digest.hexdigest() != sha256:
            raise ChecksumError(f"The file downloaded from {url} has SHA-256 {digest.hexdigest()}, expected {sha256}; "
                                "it was deleted. The server may have changed the file: report it, or pass your own file.")
        os.replace(tmp, destination)
    finally:
        tmp.unlink(missing_ok=True)
    return destination


#: The local chest CT ``ct2mr demo`` falls back on offline, relative to the parent of the working directory (the
#: repository's shared data folder beside the checkout).
DEMO_FALLBACK_CT = Path("shared") / "data" / "ct" / "thorax_cta_1p5mm.nii.gz"


def demo_fallbacks() -> list[Path]:
    """The local CTs ``ct2mr demo`` uses when the sample cannot be downloaded, in order: ``$CT2MR_DEMO_CT`` (when
    set), then ``../shared/data/ct/thorax_cta_1p5mm.nii.gz`` from the working directory (:data:`DEMO_FALLBACK_CT`).
    The paths need not exist (:func:`demo_ct` takes the first that does)."""
    fallbacks = [Path.cwd().parent / DEMO_FALLBACK_CT]
    if os.environ.get("CT2MR_DEMO_CT"):
        fallbacks.insert(0, Path(os.environ["CT2MR_DEMO_CT"]))
    return fallbacks


def demo_ct(fallbacks: list[Path] | None = None, sample: str = "CTChest", offline: bool = False,
            progress: Callable[[int, int], None] | None = None) -> tuple[Path, str]:
    """Find a chest CT for the demo: the cached or downloaded sample, else the first existing fallback.

    Args:
        fallbacks: local files to use when the download is impossible (e.g. ``../shared/data/ct/...``).
        sample: a key of :data:`SAMPLES`.
        offline: do not try to download.
        progress: download progress callback.

    Returns:
        ``(path, how)`` where ``how`` says where the file came from.

    Raises:
        FileNotFoundError: no download and no fallback; the message says how to pass ``--input``.
    """
    entry = SAMPLES[sample]
    target = cache_dir() / entry.file_name
    reason = "offline mode"
    if not offline:
        try:
            return fetch(entry.url, entry.sha256, target, progress=progress), f"sample {entry.name} ({entry.url})"
        except (OSError, ChecksumError) as exc:
            reason = str(exc)
    elif target.is_file() and sha256sum(target) == entry.sha256:
        return target, f"cached sample {entry.name}"
    for path in fallbacks or []:
        if Path(path).exists():
            return Path(path), f"local fallback (download impossible: {reason})"
    raise FileNotFoundError(f"No demo CT: the sample {entry.name} could not be downloaded ({reason}) and no local "
                            "fallback exists. Pass your own CT with `ct2mr demo --input CT_FILE_OR_DICOM_FOLDER`.")
