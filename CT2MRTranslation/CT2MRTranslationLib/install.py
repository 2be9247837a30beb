"""The supported 3D Slicer range, the engine's dependencies, and installs that run in the background.

**Supported: 3D Slicer 5.10 or newer** (Python 3.12). The pinned packages need Python >= 3.11 (platformdirs 4.14.5,
scipy 1.17.1) and MONAI 1.6.1 needs torch >= 2.8; Slicer 5.6 and 5.8 embed Python 3.9. The module checks this when
it starts (:func:`slicerVersionProblem`) and says so in one sentence before anything is installed. This file, the
module script and ``__init__.py`` parse and run on Python 3.9 so that an old Slicer can say it (tested with
``vermin``, ``Testing/Python/test_compatibility.py``).

The translation runs in a separate Python process (Slicer's ``PythonSlicer``), which needs PyTorch, MONAI, h5py,
SimpleITK and the ``ct2mr`` engine. :func:`checkDependencies` reads what is installed (package metadata, no import),
:func:`installPlan` decides what to install, :func:`confirmationText` is the one confirmation shown, and
:meth:`InstallPlan.commands` lists the ``PythonSlicer -m pip ...`` command lines. They run in a background process
one after another: the Widget drives a ``QProcess`` with :class:`InstallRun`; scripts and tests use
:func:`runInstall` (plain ``subprocess``). A failure is explained by :func:`installFailureMessage` (offline: install
from a wheel folder; behind a proxy: pip's proxy setting). Nothing here imports Qt, torch or the engine.

Rules (learnt from SlicerTotalSegmentator, SlicerNNUNet and SlicerMONAIAuto3DSeg, whose users report broken Slicer
Python environments after unpinned installs):

- PyTorch is installed as the PyTorch extension's ``PyTorchUtils`` installs it: ``light-the-torch`` picks the build
  that matches the NVIDIA driver (``pip install torch`` would fetch a CPU-only or mismatched CUDA wheel). It runs as a
  background process, so torch is never loaded into Slicer's own process.
- Packages Slicer ships (SimpleITK, NumPy) are never pip-installed: replacing them breaks Slicer's own modules.
- Everything else is installed at a pinned version, and packages that depend on torch or NumPy with ``--no-deps``, so
  that pip cannot replace torch, NumPy or SimpleITK behind the user's back.
- The engine comes from the wheel built when the extension was packaged (``Resources/Engine/ct2mr-*.whl``); a
  source checkout is installed with ``--no-build-isolation`` (Slicer ships setuptools), so nothing is built from the
  network inside Slicer.
- A package that is already imported in this process and gets upgraded needs a Slicer restart to take effect.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, List, Mapping, Optional, Sequence, Tuple

__all__ = [
    "ENGINE_DISTRIBUTION",
    "LIGHT_THE_TORCH_REQUIREMENT",
    "OLDEST_SLICER_SHIPS",
    "PACKAGES",
    "SUPPORTED_PYTHON",
    "SUPPORTED_SLICER",
    "TORCH_REQUIREMENT",
    "DependencyStatus",
    "InstallCommand",
    "InstallError",
    "InstallPlan",
    "InstallRun",
    "InstallStep",
    "Package",
    "checkDependencies",
    "compareVersions",
    "confirmationText",
    "engineSource",
    "installFailureMessage",
    "installPlan",
    "installedVersion",
    "offlineDownloadCommand",
    "runInstall",
    "slicerVersionProblem",
]

SUPPORTED_SLICER = (5, 10)
"""Oldest supported 3D Slicer (major, minor)."""

SUPPORTED_PYTHON = (3, 12)
"""The Python of the oldest supported Slicer (5.10.0 embeds 3.12.10): every pin must support it."""

OLDEST_SLICER_SHIPS = {"python": "3.12.10", "numpy": "2.0.2", "scipy": "1.13.1", "SimpleITK": "2.5.2",
                       "setuptools": "80.9.0"}
"""What 3D Slicer 5.10.0 ships (its ``SuperBuild/External_python*.cmake`` and ``External_SimpleITK.cmake``): the pins'
``Requires-Python`` and their NumPy requirements are checked against these."""

TORCH_REQUIREMENT = ">=2.8"
"""torch requirement installed through light-the-torch: MONAI 1.6.1 (pinned below) declares ``torch>=2.8.0``."""

LIGHT_THE_TORCH_REQUIREMENT = "light-the-torch>=0.5"
"""What the PyTorch extension's ``PyTorchUtilsLogic`` installs to pick the torch build matching the driver."""

ENGINE_DISTRIBUTION = "ct2mr"
"""Distribution name of the engine."""


@dataclass(frozen=True)
class Package:
    """One dependency of the engine process.

    Attributes:
        name: import name (``SimpleITK``).
        distribution: pip distribution name (``SimpleITK``), used to read the installed version.
        minimum: lowest accepted version; ``None`` accepts any.
        requirement: what is installed when missing or too old (``"monai==1.6.1"``, ``"torch>=2.8"``); ``None`` when
            it is not installed from here (SimpleITK, NumPy: shipped with Slicer; ct2mr: the bundled engine).
        installer: ``"pip"``, ``"torch"`` (light-the-torch, as the PyTorch extension does), ``"slicer"`` (shipped with
            Slicer, never replaced) or ``"engine"`` (the bundled ct2mr engine).
        noDeps: install with ``--no-deps``, so that pip cannot replace torch, NumPy or SimpleITK.
        reason: why it is needed and why it is installed this way (shown to the user).
    """

    name: str
    distribution: str
    minimum: Optional[str]
    requirement: Optional[str]
    installer: str
    noDeps: bool
    reason: str


PACKAGES: Tuple[Package, ...] = (
    Package("torch", "torch", "2.8", "torch" + TORCH_REQUIREMENT, "torch", False,
            "runs the networks. Installed as the PyTorch extension installs it (light-the-torch picks the build "
            "matching your NVIDIA driver, or the CPU build), in a background process; plain pip would fetch a "
            "mismatched wheel. An installed torch that is recent enough is never replaced."),
    Package("numpy", "numpy", "1.24", None, "slicer", False,
            "arrays. Shipped with Slicer and used by its own modules: never replaced by pip."),
    Package("SimpleITK", "SimpleITK", "2.3", None, "slicer", False,
            "reads and writes the volumes, resamples. Shipped with Slicer (built with its ITK): never replaced by "
            "pip."),
    Package("monai", "monai", "1.3", "monai==1.6.1", "pip", True,
            "sliding-window inference with gaussian blending. Pinned to the tested version; --no-deps so that pip "
            "cannot replace torch or NumPy."),
    Package("h5py", "h5py", "3.8", "h5py==3.16.0", "pip", True,
            "HDF5 volumes (the engine's preprocessed format). Pinned to the tested version; --no-deps so that pip "
            "cannot replace NumPy."),
    Package("safetensors", "safetensors", "0.4", "safetensors==0.8.0", "pip", True,
            "reads checkpoints without running code (no pickle). Pinned; --no-deps so that pip cannot replace torch."),
    Package("platformdirs", "platformdirs", "3", "platformdirs==4.14.5", "pip", False,
            "finds the user cache folder for downloaded models. Pinned to the tested version."),
    Package("tqdm", "tqdm", "4.60", "tqdm==4.70.1", "pip", False,
            "progress reporting of the engine. Pinned to the tested version."),
    Package("scipy", "scipy", "1.10", "scipy==1.17.1", "pip", True,
            "body masks for the metrics and harmonisation. Shipped with Slicer (kept when recent enough); --no-deps "
            "so that pip cannot replace NumPy."),
    Package("ct2mr", ENGINE_DISTRIBUTION, "0.1", None, "engine", True,
            "the CT-to-MR engine itself, installed from the copy bundled with this module; --no-deps so that its "
            "declared dependencies (torch, NumPy, SimpleITK) are never replaced."),
)
"""Every dependency of the engine process, in install order (torch first: others are checked against it)."""


def _parseVersion(text: str) -> Tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", str(text))[:2])


def slicerVersionProblem(slicerVersion: Sequence[int] | str, pythonVersion: Sequence[int] | None = None) -> str:
    """Whether this 3D Slicer can run the module, in one sentence.

    Args:
        slicerVersion: ``(major, minor)`` or ``"5.8.1"`` (``slicer.app.majorVersion``, ``minorVersion``).
        pythonVersion: ``(major, minor)`` of Slicer's Python; default ``sys.version_info``.

    Returns:
        ``""`` when supported, else one sentence that says what is needed and what to do.
    """
    slicer = tuple(int(v) for v in (_parseVersion(slicerVersion) if isinstance(slicerVersion, str)
                                    else tuple(slicerVersion)[:2]))
    python = tuple(pythonVersion or sys.version_info[:2])[:2]
    if slicer >= SUPPORTED_SLICER and python >= SUPPORTED_PYTHON:
        return ""
    need = f"{SUPPORTED_SLICER[0]}.{SUPPORTED_SLICER[1]}"
    return (f"CT to MR Translation needs 3D Slicer {need} or newer (Python {SUPPORTED_PYTHON[0]}."
            f"{SUPPORTED_PYTHON[1]}), but this is 3D Slicer {'.'.join(map(str, slicer))} with Python "
            f"{'.'.join(map(str, python))}: install a current 3D Slicer from download.slicer.org; nothing was "
            "installed.")


@dataclass(frozen=True)
class DependencyStatus:
    """What :func:`checkDependencies` found for one package.

    Attributes:
        package: the package.
        installedVersion: the installed version, or ``None`` when missing.
        problem: ``""`` when fine, else ``"missing"`` or ``"too old"``.
    """

    package: Package
    installedVersion: Optional[str]
    problem: str = ""

    @property
    def ok(self) -> bool:
        """Installed and recent enough."""
        return not self.problem

    def describe(self) -> str:
        """One line for the user, e.g. ``"monai: missing (needs >= 1.3)"``."""
        needed = f"needs >= {self.package.minimum}" if self.package.minimum else "needed"
        if self.ok:
            return f"{self.package.name} {self.installedVersion}: OK"
        if self.problem == "missing":
            return f"{self.package.name}: missing ({needed})"
        return f"{self.package.name} {self.installedVersion}: too old ({needed})"


@dataclass(frozen=True)
class InstallCommand:
    """One command line of an install, run in a background process.

    Attributes:
        package: the package it installs.
        argv: the command line (``[PythonSlicer, "-m", "pip", "install", ...]``).
        description: one line for the panel's log.
    """

    package: str
    argv: Tuple[str, ...]
    description: str


@dataclass(frozen=True)
class InstallStep:
    """One install action.

    Attributes:
        package: what it installs.
        installer: ``"pip"`` or ``"torch"``.
        arguments: ``pip install`` arguments (``("--no-deps", "monai==1.6.1")``); for ``"torch"`` the requirement.
        upgrade: the package is installed but too old.
    """

    package: Package
    installer: str
    arguments: Tuple[str, ...]
    upgrade: bool = False

    @property
    def pipArguments(self) -> List[str]:
        """The ``pip install`` arguments as a list (``slicer.util.pip_install`` and pip take a list as it is; a
        single string would be split with ``shlex``, which mangles Windows paths)."""
        return list(self.arguments)

    def commands(self, python: str, wheelFolder: str | None = None) -> List[InstallCommand]:
        """The command lines of this step.

        Args:
            python: the interpreter (``PythonSlicer`` inside Slicer).
            wheelFolder: a folder of wheels to install from without internet (``--no-index --find-links``).

        Returns:
            pip: one command. torch: online, light-the-torch then ``light_the_torch install torch>=2.8``; from a
            wheel folder, ``pip install torch>=2.8`` from it.
        """
        pip = [python, "-m", "pip", "install", "--disable-pip-version-check", "--no-input"]
        offline = ["--no-index", "--find-links", str(wheelFolder)] if wheelFolder else []
        name = self.package.name
        if self.installer == "torch":
            requirement = self.arguments[0]
            if wheelFolder:
                return [InstallCommand(name, tuple(pip + offline + [requirement]),
                                       f"PyTorch {requirement} from {wheelFolder}")]
            return [InstallCommand(name, tuple(pip + [LIGHT_THE_TORCH_REQUIREMENT]), "light-the-torch (picks the "
                                   "PyTorch build for your NVIDIA driver, as the PyTorch extension does)"),
                    InstallCommand(name, (python, "-m", "light_the_torch", "install", requirement),
                                   f"PyTorch {requirement} (light-the-torch)")]
        return [InstallCommand(name, tuple(pip + offline + self.pipArguments),
                               f"pip install {' '.join(self.pipArguments)}")]


@dataclass
class InstallPlan:
    """What must happen before the engine can run.

    Attributes:
        steps: the install actions, in order.
        blockers: problems no install can fix here (Slicer's own NumPy or SimpleITK missing or too old, no
            bundled engine); each message says what the user should do.
        restartNeeded: a package that is already imported in this process is upgraded: restart Slicer after
            installing.
        statuses: the check the plan was made from.
    """

    steps: List[InstallStep] = field(default_factory=list)
    blockers: List[str] = field(default_factory=list)
    restartNeeded: bool = False
    statuses: List[DependencyStatus] = field(default_factory=list)

    @property
    def nothingToDo(self) -> bool:
        """Every dependency is fine."""
        return not self.steps and not self.blockers

    def commands(self, python: str, wheelFolder: str | None = None) -> List[InstallCommand]:
        """Every command line of the plan, in order (see :meth:`InstallStep.commands`)."""
        return [command for step in self.steps for command in step.commands(python, wheelFolder)]


class InstallError(RuntimeError):
    """An install command failed; the message names the package and what to do (:func:`installFailureMessage`)."""


def _versionTuple(version: str) -> tuple:
    parts = []
    for part in re.split(r"[.+-]", version):
        match = re.match(r"(\d+)(.*)", part)
        if match:
            parts.append((int(match.group(1)), match.group(2)))
        else:
            parts.append((-1, part))
    while len(parts) > 1 and parts[-1] == (0, ""):
        parts.pop()
    return tuple(parts)


def compareVersions(a: str, b: str) -> int:
    """Compare two version strings.

    Uses ``packaging.version`` when available, else compares the numeric parts (``"2.10" > "2.9"``; local labels
    such as ``+cu126`` are ignored for the comparison).

    Returns:
        -1, 0 or 1 as ``a`` is older than, equal to or newer than ``b``.
    """
    try:
        from packaging.version import InvalidVersion, Version

        try:
            va, vb = Version(a), Version(b)
            return (va > vb) - (va < vb)
        except InvalidVersion:
            pass
    except ImportError:  # pragma: no cover - packaging is nearly always there
        pass
    ta, tb = _versionTuple(a.split("+")[0]), _versionTuple(b.split("+")[0])
    return (ta > tb) - (ta < tb)


def installedVersion(package: Package) -> Optional[str]:
    """Return the installed version of a package, or ``None`` when it cannot be imported.

    The distribution's metadata is read first (no import: importing torch takes seconds, and torch never enters
    Slicer's process); packages without metadata (Slicer's own SimpleITK build) are found by their import spec, and
    their ``__version__`` read when they are already imported.
    """
    try:
        return importlib.metadata.version(package.distribution)
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        spec = importlib.util.find_spec(package.name)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        return None
    module = sys.modules.get(package.name)
    version = getattr(module, "__version__", None) if module is not None else None
    return str(version) if version else "unknown"


def checkDependencies(
    packages: Sequence[Package] = PACKAGES,
    versionOf: Callable[[Package], Optional[str]] = installedVersion,
) -> List[DependencyStatus]:
    """Check every dependency.

    Args:
        packages: what to check.
        versionOf: returns the installed version of a package or ``None`` (tests pass a table).

    Returns:
        One status per package, in order. A version that cannot be read (``"unknown"``) counts as fine.
    """
    statuses = []
    for package in packages:
        version = versionOf(package)
        if version is None:
            problem = "missing"
        elif package.minimum and version != "unknown" and compareVersions(version, package.minimum) < 0:
            problem = "too old"
        else:
            problem = ""
        statuses.append(DependencyStatus(package, version, problem))
    return statuses


def engineSource(moduleDirectory: str | os.PathLike | None = None) -> Optional[Path]:
    """Find the engine bundled with the module: the wheel in ``Resources/Engine`` (built when the extension is
    packaged), else a source folder (the repository's ``training/``, for a source checkout).

    Args:
        moduleDirectory: the module's folder (``CT2MRTranslation/``); ``None`` uses this file's parent's parent.

    Returns:
        The wheel file or the folder holding ``pyproject.toml``; ``None`` when neither exists.
    """
    moduleDirectory = Path(moduleDirectory) if moduleDirectory else Path(__file__).resolve().parents[1]
    wheels = sorted((moduleDirectory / "Resources" / "Engine").glob("ct2mr-*.whl"))
    if wheels:
        return wheels[-1]
    for candidate in (moduleDirectory.parent / "training", moduleDirectory / "Resources" / "Engine" / "training"):
        if (candidate / "pyproject.toml").is_file():
            return candidate
    return None


def installPlan(
    statuses: Iterable[DependencyStatus],
    engine: str | os.PathLike | None = None,
    importedModules: Mapping[str, object] | None = None,
) -> InstallPlan:
    """Turn a dependency check into install steps.

    Args:
        statuses: from :func:`checkDependencies`.
        engine: bundled engine (wheel or source folder, see :func:`engineSource`); ``None`` when there is none.
        importedModules: modules already imported in this process (default ``sys.modules``), to tell whether an
            upgrade needs a restart.

    Returns:
        The plan: pinned pip steps (``--no-deps`` where the package says so), torch through light-the-torch,
        blockers for what cannot be installed from here.
    """
    imported = sys.modules if importedModules is None else importedModules
    plan = InstallPlan(statuses=list(statuses))
    for status in plan.statuses:
        if status.ok:
            continue
        package = status.package
        upgrade = status.problem == "too old"
        if package.installer == "torch":
            step = InstallStep(package, "torch", (str(package.requirement),), upgrade)
        elif package.installer == "slicer":
            plan.blockers.append(
                f"{status.describe()}: it ships with 3D Slicer and is not replaced from here, because Slicer's own "
                f"modules depend on it. Install a current 3D Slicer ({SUPPORTED_SLICER[0]}.{SUPPORTED_SLICER[1]} or "
                "newer)."
            )
            continue
        elif package.installer == "engine":
            if engine is None:
                plan.blockers.append(
                    "The ct2mr engine is not installed and no bundled copy was found in the module's Resources/Engine "
                    "folder: reinstall the CT2MRTranslation extension."
                )
                continue
            arguments = ["--no-deps"]
            if not str(engine).endswith(".whl"):
                arguments.append("--no-build-isolation")  # Slicer ships setuptools: nothing fetched to build
            if upgrade:
                arguments.append("--upgrade")
            step = InstallStep(package, "pip", tuple(arguments + [str(engine)]), upgrade)
        else:
            arguments = (("--no-deps",) if package.noDeps else ()) + (("--upgrade",) if upgrade else ()) + (
                str(package.requirement),)
            step = InstallStep(package, "pip", arguments, upgrade)
        plan.steps.append(step)
        if upgrade and package.name in imported:
            plan.restartNeeded = True
    return plan


def offlineDownloadCommand(plan: InstallPlan, platform: str = "manylinux2014_x86_64") -> str:
    """The command to run on a computer with internet access that fills a wheel folder for this plan.

    Args:
        plan: the plan.
        platform: pip's platform tag of the offline computer (``win_amd64``, ``macosx_11_0_arm64``, ...).

    Returns:
        One ``pip download`` line (Python of the oldest supported Slicer, binary wheels only, with the packages'
        own dependencies, which torch needs).
    """
    requirements = [f'"{step.package.requirement}"' if ">" in str(step.package.requirement)
                    else str(step.package.requirement) for step in plan.steps if step.package.requirement]
    python = f"{SUPPORTED_PYTHON[0]}.{SUPPORTED_PYTHON[1]}"
    return (f"pip download --only-binary=:all: --python-version {python} --platform {platform} "
            f"-d wheels {' '.join(requirements)}")


def confirmationText(plan: InstallPlan) -> str:
    """The one confirmation shown before installing: what, at which version, why, and whether a restart follows.

    Returns:
        Plain text (one paragraph per package).
    """
    if plan.nothingToDo:
        return "Every dependency of CT to MR Translation is installed."
    lines = []
    if plan.steps:
        lines.append("CT to MR Translation needs these Python packages in Slicer. Install them now? They are "
                     "downloaded and installed in the background (PyTorch is about 1-3 GB); Translate is available "
                     "when they are done.\n")
        for step in plan.steps:
            what = (f"PyTorch {step.arguments[0]} through light-the-torch (as the PyTorch extension installs it)"
                    if step.installer == "torch" else f"pip install {' '.join(step.pipArguments)}")
            verb = "upgrade" if step.upgrade else "install"
            lines.append(f"- {step.package.name} ({verb}): {what}\n  Why: {step.package.reason}")
    kept = [s for s in plan.statuses if s.ok and s.package.installer in ("torch", "slicer")]
    if kept:
        lines.append("\nKept as they are (never replaced by pip): "
                     + ", ".join(f"{s.package.name} {s.installedVersion}" for s in kept) + ".")
    if plan.blockers:
        lines.append("\nTo do first:\n" + "\n".join(f"- {blocker}" for blocker in plan.blockers))
    if plan.restartNeeded:
        lines.append("\nA package that is already loaded is upgraded: restart Slicer after the installation.")
    if plan.steps:
        lines.append("\nWithout internet access: fill a wheel folder on another computer with\n  "
                     + offlineDownloadCommand(plan) + "\nand choose it as the wheel folder in Dependencies first.")
    return "\n".join(lines)


_OFFLINE_SIGNS = ("failed to establish a new connection", "name or service not known",
                  "temporary failure in name resolution", "network is unreachable", "getaddrinfo failed",
                  "max retries exceeded", "no route to host", "connection refused", "nodename nor servname")
_PROXY_SIGNS = ("proxyerror", "proxy authentication required", "cannot connect to proxy", "tunnel connection failed",
                "407 ")
_MISSING_SIGNS = ("no matching distribution found", "could not find a version that satisfies")


def installFailureMessage(command: InstallCommand, output: str, exitCode: Optional[int],
                          wheelFolder: str | None = None) -> str:
    """What to tell the user when an install command failed.

    Args:
        command: the command that failed.
        output: what it printed (stdout and stderr).
        exitCode: its exit status (``None``: it could not be started).
        wheelFolder: the wheel folder it installed from, if any.

    Returns:
        ``"Installing <package> failed: <cause>. <what to do>"`` and the last lines of the output.
    """
    text = (output or "").lower()
    tail = "\n".join((output or "").strip().splitlines()[-8:])
    head = f"Installing {command.package} failed"
    if exitCode is None:
        advice = (f": {command.argv[0]} could not be started. Check that Slicer's PythonSlicer exists, or reinstall "
                  "3D Slicer.")
    elif any(sign in text for sign in _PROXY_SIGNS):
        advice = (": the proxy refused the connection. Set the proxy for pip (PythonSlicer -m pip config set "
                  "global.proxy http://user:password@proxy.example:8080) or the HTTPS_PROXY environment variable, "
                  "restart Slicer and install again.")
    elif "certificate_verify_failed" in text or "certificate verify failed" in text:
        advice = (": the download's TLS certificate could not be verified (a company proxy that inspects traffic?). "
                  "Give pip your organisation's certificate (PythonSlicer -m pip config set global.cert "
                  "/path/to/ca-bundle.pem), restart Slicer and install again.")
    elif wheelFolder and any(sign in text for sign in _MISSING_SIGNS):
        advice = (f": the wheel folder {wheelFolder} has no wheel of it for this Python "
                  f"({sys.version_info[0]}.{sys.version_info[1]}) and system. Add it to the folder (see the README, "
                  "'Installing offline') and install again.")
    elif any(sign in text for sign in _OFFLINE_SIGNS) or (not wheelFolder and any(s in text for s in _MISSING_SIGNS)):
        advice = (": the package index could not be reached (no internet access?). On a computer without internet, "
                  "download the wheels on another computer (see the README, 'Installing offline'), choose that folder "
                  "as the wheel folder in Dependencies and install again.")
    elif "permission denied" in text or "errno 13" in text:
        advice = (": Slicer's Python folder is not writable. Install Slicer in a folder you can write to (or run "
                  "the install once as the user who installed Slicer).")
    elif "no space left" in text:
        advice = ": the disk is full. Free some space (PyTorch needs a few GB) and install again."
    else:
        advice = f" (exit status {exitCode}). See the output below and the Python console, then install again."
    return f"{head}{advice}" + (f"\n\nOutput (last lines):\n{tail}" if tail else "")


class InstallRun:
    """The state of an install running command after command (the Widget runs each one in a ``QProcess``;
    :func:`runInstall` in a plain subprocess).

    Args:
        commands: from :meth:`InstallPlan.commands`.
        wheelFolder: the wheel folder the commands install from, if any (for the failure message).

    Attributes:
        commands: the commands.
        index: how many commands have finished successfully.
        error: the failure message once a command failed, else ``""``.
        outputs: what each finished command printed.
    """

    def __init__(self, commands: Sequence[InstallCommand], wheelFolder: str | None = None) -> None:
        self.commands = list(commands)
        self.wheelFolder = wheelFolder
        self.index = 0
        self.error = ""
        self.cancelled = False
        self.outputs: List[str] = []

    def cancel(self) -> None:
        """Stop after the current command (the caller kills it); what was installed stays installed."""
        if not self.done:
            self.cancelled = True
            self.error = (f"The installation was cancelled after {self.index} of {len(self.commands)} steps; "
                          "install again to finish it.")

    @property
    def done(self) -> bool:
        """Every command succeeded, or one failed."""
        return bool(self.error) or self.index >= len(self.commands)

    @property
    def succeeded(self) -> bool:
        """Every command succeeded."""
        return not self.error and self.index >= len(self.commands)

    @property
    def fraction(self) -> float:
        """Finished commands / all commands."""
        return self.index / len(self.commands) if self.commands else 1.0

    @property
    def message(self) -> str:
        """A line for the panel: what runs now, or how it ended."""
        if self.error:
            return self.error.splitlines()[0]
        if self.index >= len(self.commands):
            return "Dependencies installed."
        return f"[{self.index + 1}/{len(self.commands)}] Installing {self.commands[self.index].description}"

    def nextCommand(self) -> Optional[InstallCommand]:
        """The command to run now, or ``None`` when the install is done."""
        return None if self.done else self.commands[self.index]

    def commandFinished(self, exitCode: Optional[int], output: str) -> None:
        """Record how the current command ended (``exitCode`` ``None``: it could not be started)."""
        if self.done:
            return
        self.outputs.append(output or "")
        if exitCode == 0:
            self.index += 1
        else:
            self.error = installFailureMessage(self.commands[self.index], output, exitCode, self.wheelFolder)


def runInstall(commands: Sequence[InstallCommand], wheelFolder: str | None = None,
               log: Callable[[str], None] | None = None, timeout: float | None = None,
               environment: Mapping[str, str] | None = None) -> InstallRun:
    """Run install commands one after another in plain subprocesses (scripts, tests; the Widget uses ``QProcess``).

    Args:
        commands: from :meth:`InstallPlan.commands`.
        wheelFolder: the wheel folder they install from, if any.
        log: ``log(message)`` before each command.
        timeout: seconds per command.
        environment: the processes' environment (default: this process's).

    Returns:
        The finished run.

    Raises:
        InstallError: a command failed (:func:`installFailureMessage`); later commands are not run.
    """
    run = InstallRun(commands, wheelFolder)
    while True:
        command = run.nextCommand()
        if command is None:
            break
        if log is not None:
            log(run.message)
        try:
            completed = subprocess.run(list(command.argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                                       env=dict(environment) if environment is not None else None)
        except OSError as error:
            run.commandFinished(None, str(error))
        except subprocess.TimeoutExpired as error:
            output = error.output if isinstance(error.output, str) else ""
            run.commandFinished(-1, f"{output}\ntimed out after {timeout} s")
        else:
            run.commandFinished(completed.returncode, completed.stdout)
    if run.error:
        raise InstallError(run.error)
    return run
