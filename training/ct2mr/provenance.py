"""Provenance: the software versions and the git commit an output was made with (one record for every command).

Preprocessed files, training runs and evaluation reports store where they came from with these two functions. Standard
library only at import time; the packages named are imported when asked for.
"""

from __future__ import annotations

import functools
import importlib
import platform
import subprocess
from pathlib import Path

from ct2mr import __version__

__all__ = ["software_versions", "git_commit"]


def software_versions(*packages: str) -> dict[str, str]:
    """Versions of ct2mr, Python and each named package, e.g. ``software_versions("torch", "SimpleITK")``.

    Args:
        packages: importable module names (``"numpy"``, ``"torch"``, ``"monai"``, ``"SimpleITK"``, ``"h5py"``, ...);
            SimpleITK reports ``Version_VersionString()``, the others ``__version__``.

    Returns:
        ``{"ct2mr": ..., "python": ..., package: version, ...}`` in that order.

    Raises:
        ImportError: a named package is not installed.
    """
    versions = {"ct2mr": __version__, "python": platform.python_version()}
    for name in packages:
        module = importlib.import_module(name)
        versions[name] = module.Version_VersionString() if name == "SimpleITK" else str(module.__version__)
    return versions


@functools.lru_cache(maxsize=None)
def git_commit() -> str:
    """The git commit of the checkout the ``ct2mr`` package runs from.

    Returns:
        The 40-character commit, with ``-dirty`` appended when the package's files differ from it; ``"unknown"`` when
        the package is not inside a git checkout of this project (e.g. installed from a wheel) or git is missing.
    """
    package = Path(__file__).resolve().parent

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(package), *args], capture_output=True, text=True, timeout=20,
                              check=True).stdout.strip()

    try:
        top = Path(git("rev-parse", "--show-toplevel"))
        if (top / "training" / "ct2mr").resolve() != package:
            return "unknown"
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no", "--", str(package)))
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")
