"""Dependencies inside Slicer: what is missing, the pinned install plan with a reason for each package, and running it.

The translation runs in a separate Python process (Slicer's ``PythonSlicer``), which needs PyTorch, MONAI, h5py,
SimpleITK and the ``ct2mr`` engine. On first use the Widget calls :func:`checkDependencies`; when something is
missing or too old it shows :func:`confirmationText` of :func:`installPlan` once and, if the user agrees, runs
:func:`runInstallPlan` with Slicer's installers (``slicer.util.pip_install`` and the PyTorch extension's
``PyTorchUtilsLogic.installTorch``). This module decides; it installs nothing by itself and never imports Qt, so the
plan is tested in plain Python.

Rules (learnt from SlicerTotalSegmentator, SlicerNNUNet and SlicerMONAIAuto3DSeg, whose users report broken Slicer
Python environments after unpinned installs):

- PyTorch comes from the PyTorch extension (``PyTorchUtils``), which picks the build that matches the NVIDIA driver;
  ``pip install torch`` would fetch a CPU-only or mismatched CUDA wheel.
- Packages Slicer ships (SimpleITK, NumPy) are never pip-installed: replacing them breaks Slicer's own modules.
- Everything else is installed at a pinned version, and packages that depend on torch or NumPy with ``--no-deps``, so
  that pip cannot replace torch, NumPy or SimpleITK behind the user's back.
- A package that is already imported in this process and gets upgraded needs a Slicer restart to take effect.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "ENGINE_DISTRIBUTION",
    "PACKAGES",
    "TORCH_REQUIREMENT",
    "DependencyStatus",
    "InstallPlan",
    "InstallStep",
    "Package",
    "checkDependencies",
    "compareVersions",
    "confirmationText",
    "engineSource",
    "installPlan",
    "installedVersion",
    "runInstallPlan",
]

TORCH_REQUIREMENT = ">=2.2"
"""Version requirement of torch handed to ``PyTorchUtilsLogic.installTorch`` (ct2mr needs 2.2 or newer)."""

ENGINE_DISTRIBUTION = "ct2mr"
"""Distribution name of the engine."""


@dataclass(frozen=True)
class Package:
    """One dependency of the engine process.

    Attributes:
        name: import name (``SimpleITK``).
        distribution: pip distribution name (``SimpleITK``), used to read the installed version.
        minimum: lowest accepted version; ``None`` accepts any.
        requirement: what is installed when missing or too old, pinned (``"monai==1.6.1"``); ``None`` when it is
            not pip-installed (torch: PyTorch extension; SimpleITK, NumPy: shipped with Slicer; ct2mr: bundled).
        installer: ``"pip"``, ``"pytorch"`` (PyTorch extension), ``"slicer"`` (shipped with Slicer, never replaced)
            or ``"engine"`` (the bundled ct2mr engine).
        noDeps: install with ``--no-deps``, so that pip cannot replace torch, NumPy or SimpleITK.
        reason: why it is needed and why it is installed this way (shown to the user).
    """

    name: str
    distribution: str
    minimum: str | None
    requirement: str | None
    installer: str
    noDeps: bool
    reason: str


PACKAGES: tuple[Package, ...] = (
    Package("torch", "torch", "2.2", None, "pytorch", False,
            "runs the networks. Installed by the PyTorch extension, which picks the build matching your NVIDIA "
            "driver (CUDA) or the CPU build; pip would fetch a mismatched wheel. Never replaced by pip."),
    Package("numpy", "numpy", "1.24", None, "slicer", False,
            "arrays. Shipped with Slicer and used by its own modules: never replaced by pip."),
    Package("SimpleITK", "SimpleITK", "2.3", None, "slicer", False,
            "reads and writes the volumes, resamples. Shipped with Slicer (built with its ITK): never replaced by "
            "pip."),
    Package("monai", "monai", "1.3", "monai==1.6.1", "pip", True,
            "sliding-window inference with gaussian blending. Pinned to the tested version; --no-deps so that pip "
            "cannot replace torch or NumPy."),
    Package("h5py", "h5py", "3.8", "h5py==3.16.0", "pip", False,
            "HDF5 volumes (the engine's preprocessed format). Pinned to the tested version."),
    Package("safetensors", "safetensors", "0.4", "safetensors==0.8.0", "pip", True,
            "reads checkpoints without running code (no pickle). Pinned; --no-deps so that pip cannot replace torch."),
    Package("platformdirs", "platformdirs", "3", "platformdirs==4.14.5", "pip", False,
            "finds the user cache folder for downloaded models. Pinned to the tested version."),
    Package("tqdm", "tqdm", "4.60", "tqdm==4.70.1", "pip", False,
            "progress reporting of the engine. Pinned to the tested version."),
    Package("scipy", "scipy", "1.10", "scipy==1.17.1", "pip", True,
            "body masks for the metrics and harmonisation. Usually shipped with Slicer; --no-deps so that pip "
            "cannot replace NumPy."),
    Package("ct2mr", ENGINE_DISTRIBUTION, "0.1", None, "engine", True,
            "the CT-to-MR engine itself, installed from the copy bundled with this module; --no-deps so that its "
            "declared dependencies (torch, NumPy, SimpleITK) are never replaced."),
)
"""Every dependency of the engine process, in install order (torch first: others are checked against it)."""


@dataclass(frozen=True)
class DependencyStatus:
    """What :func:`checkDependencies` found for one package.

    Attributes:
        package: the package.
        installedVersion: the installed version, or ``None`` when missing.
        problem: ``""`` when fine, else ``"missing"`` or ``"too old"``.
    """

    package: Package
    installedVersion: str | None
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
class InstallStep:
    """One install action.

    Attributes:
        package: what it installs.
        installer: ``"pip"`` or ``"pytorch"``.
        arguments: ``pip install`` arguments (``["--no-deps", "monai==1.6.1"]``), or for ``"pytorch"`` the torch
            version requirement (``[">=2.2"]``).
        upgrade: the package is installed but too old.
    """

    package: Package
    installer: str
    arguments: tuple[str, ...]
    upgrade: bool = False

    @property
    def pipArguments(self) -> str:
        """The arguments as one string, as ``slicer.util.pip_install`` takes them (paths quoted)."""
        return " ".join(f'"{a}"' if " " in a else a for a in self.arguments)


@dataclass
class InstallPlan:
    """What must happen before the engine can run.

    Attributes:
        steps: the install actions, in order.
        blockers: problems no install can fix here (the PyTorch extension is missing, Slicer's own SimpleITK is
            broken, no bundled engine); each message says what the user should do.
        restartNeeded: a package that is already imported in this process is upgraded: restart Slicer after
            installing.
        statuses: the check the plan was made from.
    """

    steps: list[InstallStep] = field(default_factory=list)
    blockers: list[str] = field(default_factory=list)
    restartNeeded: bool = False
    statuses: list[DependencyStatus] = field(default_factory=list)

    @property
    def nothingToDo(self) -> bool:
        """Every dependency is fine."""
        return not self.steps and not self.blockers


def _versionTuple(version: str) -> tuple:
    parts = []
    for part in re.split(r"[.+-]", version):
        match = re.match(r"(\d+)(.*)", part)
        if match:
            parts.append((int(match.group(1)), match.group(2)))
        else:
            parts.append((-1, part))
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


def installedVersion(package: Package) -> str | None:
    """Return the installed version of a package, or ``None`` when it cannot be imported.

    The distribution's metadata is read first (no import: importing torch takes seconds); packages without
    metadata (Slicer's own SimpleITK build) are found by their import spec, and their ``__version__`` read when
    they are already imported.
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
    versionOf: Callable[[Package], str | None] = installedVersion,
) -> list[DependencyStatus]:
    """Check every dependency.

    Args:
        packages: what to check.
        versionOf: returns the installed version of a package or ``None`` (tests pass a fake).

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


def engineSource(moduleDirectory: str | os.PathLike | None = None) -> Path | None:
    """Find the engine bundled with the module: a wheel in ``Resources/Engine`` or the repository's ``training/``.

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
    hasPyTorchUtils: bool,
    engine: str | os.PathLike | None = None,
    importedModules: Mapping[str, object] | None = None,
) -> InstallPlan:
    """Turn a dependency check into install steps.

    Args:
        statuses: from :func:`checkDependencies`.
        hasPyTorchUtils: the PyTorch extension's ``PyTorchUtils`` module is importable.
        engine: bundled engine source (wheel or folder, see :func:`engineSource`); ``None`` when there is none.
        importedModules: modules already imported in this process (default ``sys.modules``), to tell whether an
            upgrade needs a restart.

    Returns:
        The plan: pip steps pinned (``--no-deps`` where the package says so), torch through the PyTorch extension,
        blockers for what cannot be installed from here.
    """
    imported = sys.modules if importedModules is None else importedModules
    plan = InstallPlan(statuses=list(statuses))
    for status in plan.statuses:
        if status.ok:
            continue
        package = status.package
        upgrade = status.problem == "too old"
        if package.installer == "pytorch":
            if not hasPyTorchUtils:
                plan.blockers.append(
                    f"PyTorch is {status.problem} (needs {TORCH_REQUIREMENT}) and the PyTorch extension is not "
                    "installed: install 'PyTorch' from the Extensions Manager, restart Slicer and try again."
                )
                continue
            step = InstallStep(package, "pytorch", (TORCH_REQUIREMENT,), upgrade)
        elif package.installer == "slicer":
            plan.blockers.append(
                f"{status.describe()}: it ships with 3D Slicer and is not replaced from here, because Slicer's own "
                "modules depend on it. Install a current 3D Slicer (5.6 or newer)."
            )
            continue
        elif package.installer == "engine":
            if engine is None:
                plan.blockers.append(
                    "The ct2mr engine is not installed and no bundled copy was found: install it in Slicer's Python "
                    "console with slicer.util.pip_install('--no-deps /path/to/CT2MRTranslation/training')."
                )
                continue
            arguments = ("--no-deps", "--upgrade", str(engine)) if upgrade else ("--no-deps", str(engine))
            step = InstallStep(package, "pip", arguments, upgrade)
        else:
            arguments = (("--no-deps",) if package.noDeps else ()) + (("--upgrade",) if upgrade else ()) + (
                str(package.requirement),)
            step = InstallStep(package, "pip", arguments, upgrade)
        plan.steps.append(step)
        if upgrade and package.name in imported:
            plan.restartNeeded = True
    return plan


def confirmationText(plan: InstallPlan) -> str:
    """The one confirmation shown before installing: what, at which version, why, and whether a restart follows.

    Returns:
        Plain text (one paragraph per package).
    """
    if plan.nothingToDo:
        return "Every dependency of CT to MR Translation is installed."
    lines = []
    if plan.steps:
        lines.append("CT to MR Translation needs these Python packages in Slicer. Install them now? This downloads "
                     "from the internet and can take several minutes (PyTorch is about 1-3 GB).\n")
        for step in plan.steps:
            what = (f"PyTorch {step.arguments[0]} through the PyTorch extension" if step.installer == "pytorch"
                    else f"pip install {step.pipArguments}")
            verb = "upgrade" if step.upgrade else "install"
            lines.append(f"- {step.package.name} ({verb}): {what}\n  Why: {step.package.reason}")
    kept = [s for s in plan.statuses if s.ok and s.package.installer in ("pytorch", "slicer")]
    if kept:
        lines.append("\nKept as they are (never replaced by pip): "
                     + ", ".join(f"{s.package.name} {s.installedVersion}" for s in kept) + ".")
    if plan.blockers:
        lines.append("\nTo do first:\n" + "\n".join(f"- {blocker}" for blocker in plan.blockers))
    if plan.restartNeeded:
        lines.append("\nA package that is already loaded is upgraded: restart Slicer after the installation.")
    return "\n".join(lines)


def runInstallPlan(
    plan: InstallPlan,
    pipInstall: Callable[[str], object],
    installTorch: Callable[[str], object] | None = None,
    log: Callable[[str], None] | None = None,
) -> list[InstallStep]:
    """Run the steps of a plan with the given installers (in Slicer: ``slicer.util.pip_install`` and PyTorchUtils).

    Args:
        plan: from :func:`installPlan`.
        pipInstall: ``pipInstall("--no-deps monai==1.6.1")``; raises on failure.
        installTorch: ``installTorch(">=2.2")``: installs torch through the PyTorch extension and returns the
            ``torch`` module, or ``None`` when the user declined.
        log: ``log(message)`` before each step.

    Returns:
        The steps run.

    Raises:
        RuntimeError: the plan has blockers, torch could not be installed, or a step failed (the message names the
            package; later steps are not run).
    """
    if plan.blockers:
        raise RuntimeError("Cannot install the dependencies:\n" + "\n".join(plan.blockers))
    done = []
    for step in plan.steps:
        if log is not None:
            how = f"PyTorch {step.arguments[0]}" if step.installer == "pytorch" else f"pip install {step.pipArguments}"
            log(f"Installing {step.package.name}: {how}")
        try:
            if step.installer == "pytorch":
                if installTorch is None:
                    raise RuntimeError("no PyTorch installer is available")
                if installTorch(step.arguments[0]) is None:
                    raise RuntimeError("the installation of PyTorch was cancelled")
            else:
                pipInstall(step.pipArguments)
        except Exception as error:
            raise RuntimeError(f"Installing {step.package.name} failed: {error}. Check the internet connection and "
                               "the Python console, then try again.") from error
        done.append(step)
    return done
