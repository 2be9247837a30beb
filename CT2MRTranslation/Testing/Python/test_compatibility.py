"""What is installed into Slicer's Python fits the supported 3D Slicer range (install.SUPPORTED_SLICER, 5.10+).

- ``vermin`` (static analysis of the minimum Python a file needs) over the front end and the engine against the
  Python of the oldest supported Slicer (3.12), with annotations evaluated as if at run time;
- the module script and its library against Python 3.9 (Slicer 5.6 and 5.8), without annotations (they are never
  evaluated: ``from __future__ import annotations``), so that an old Slicer loads the module and can say it is too
  old instead of failing with a traceback;
- every pin's ``Requires-Python`` (read from the pins the module declares, ``install.PACKAGES``, and their installed
  metadata: ``test_install.py`` keeps the venv at the pins) and its declared torch and NumPy ranges against what the
  oldest supported Slicer ships and what the install plan installs.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import subprocess
import sys

import pytest
from CT2MRTranslationTestHelpers import MODULE_DIR, REPO_ROOT
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from CT2MRTranslationLib import install

SUPPORTED = ".".join(map(str, install.SUPPORTED_PYTHON))
FRONT_END = [MODULE_DIR / "CT2MRTranslation.py", MODULE_DIR / "CT2MRTranslationLib"]
ENGINE = REPO_ROOT / "training" / "ct2mr"


def vermin(target: str, *paths, evalAnnotations: bool) -> subprocess.CompletedProcess:
    pytest.importorskip("vermin", reason="vermin is installed by requirements-test.txt")
    arguments = [sys.executable, "-c", "import sys, vermin; sys.exit(vermin.main())", f"-t={target}-", "--violations", "--no-tips", "--no-parse-comments",
                 *(["--eval-annotations"] if evalAnnotations else []), *map(str, paths)]
    return subprocess.run(arguments, capture_output=True, text=True, timeout=300)


def test_front_end_and_engine_run_on_the_oldest_supported_python():
    completed = vermin(SUPPORTED, *FRONT_END, ENGINE, evalAnnotations=True)
    assert completed.returncode == 0, f"needs a newer Python than {SUPPORTED}:\n{completed.stdout}{completed.stderr}"
    assert "requires" not in completed.stdout


def test_the_module_loads_on_old_slicers_to_say_they_are_too_old():
    completed = vermin("3.9", *FRONT_END, evalAnnotations=False)
    assert completed.returncode == 0, f"the module would not load on Slicer 5.6/5.8 (Python 3.9):\n{completed.stdout}"


def pinned():
    for package in install.PACKAGES:
        if package.installer == "pip":
            yield package.distribution, package.requirement.split("==")[1]


def metadata(distribution: str, version: str):
    found = importlib.metadata.metadata(distribution)
    assert found["Version"] == version, f"{distribution} {found['Version']} installed, {version} pinned"
    return found


def declared(found, name: str) -> list[Requirement]:
    requirements = [Requirement(text) for text in found.get_all("Requires-Dist") or []]
    return [r for r in requirements if r.name.lower() == name and (r.marker is None or r.marker.evaluate(
        {"extra": "", "python_version": SUPPORTED, "sys_platform": "linux", "platform_system": "Linux"}))]


@pytest.mark.parametrize(("distribution", "version"), list(pinned()), ids=lambda value: str(value))
def test_each_pin_supports_the_oldest_slicers_python(distribution, version):
    requires = metadata(distribution, version).get("Requires-Python") or ""
    assert Version(install.OLDEST_SLICER_SHIPS["python"]) in SpecifierSet(requires), (
        f"{distribution}=={version} requires Python {requires}; Slicer {install.SUPPORTED_SLICER} ships "
        f"{install.OLDEST_SLICER_SHIPS['python']}")


@pytest.mark.parametrize(("distribution", "version"), list(pinned()), ids=lambda value: str(value))
def test_each_pin_accepts_slicers_numpy_and_the_installed_torch(distribution, version):
    found = metadata(distribution, version)
    for requirement in declared(found, "numpy"):
        assert Version(install.OLDEST_SLICER_SHIPS["numpy"]) in requirement.specifier, (
            f"{distribution}=={version} needs {requirement}; Slicer ships NumPy {install.OLDEST_SLICER_SHIPS['numpy']}"
            " and NumPy is never replaced")
    lowestTorch = Version(install.TORCH_REQUIREMENT.lstrip(">="))
    for requirement in declared(found, "torch"):
        assert lowestTorch in requirement.specifier, (
            f"{distribution}=={version} needs {requirement}; the install plan accepts torch{install.TORCH_REQUIREMENT}")


def pyprojectList(text: str, key: str) -> list[str]:
    """A list of strings of pyproject.toml (``key = [ ... ]``; comments dropped); tomllib needs Python 3.11."""
    block = re.search(rf"^{re.escape(key)} = \[(.*?)\]$", text, re.M) or re.search(
        rf"^{re.escape(key)} = \[(.*?)^\]", text, re.S | re.M)
    body = "\n".join(line.split("#")[0] for line in block.group(1).splitlines())
    return list(ast.literal_eval("[" + body + "]"))


def test_the_engine_fits_the_oldest_supported_slicer():
    text = (REPO_ROOT / "training" / "pyproject.toml").read_text()
    requiresPython = re.search(r'^requires-python = "([^"]+)"', text, re.M).group(1)
    assert Version(install.OLDEST_SLICER_SHIPS["python"]) in SpecifierSet(requiresPython)
    for entry in pyprojectList(text, "requires"):  # a source engine is built with Slicer's own setuptools
        requirement = Requirement(entry)
        if requirement.name == "setuptools":
            assert Version(install.OLDEST_SLICER_SHIPS["setuptools"]) in requirement.specifier
    dependencies = {Requirement(entry).name.lower(): Requirement(entry) for entry in pyprojectList(text, "dependencies")}
    assert {"numpy", "scipy", "simpleitk", "torch", "monai"} <= set(dependencies)
    for name in ("numpy", "scipy", "simpleitk"):  # what Slicer ships and the engine is installed next to
        shipped = install.OLDEST_SLICER_SHIPS["SimpleITK" if name == "simpleitk" else name]
        assert Version(shipped) in dependencies[name].specifier, (name, shipped)
    assert Version(install.TORCH_REQUIREMENT.lstrip(">=")) in dependencies["torch"].specifier
    minimum = {p.name.lower(): p.minimum for p in install.PACKAGES if p.minimum}
    for name in ("numpy", "scipy", "simpleitk"):  # the module's check accepts what Slicer ships
        shipped = install.OLDEST_SLICER_SHIPS["SimpleITK" if name == "simpleitk" else name]
        assert Version(shipped) >= Version(minimum[name]), name


def test_the_torch_minimum_is_what_the_pins_need():
    torch = next(p for p in install.PACKAGES if p.name == "torch")
    assert torch.minimum == install.TORCH_REQUIREMENT.lstrip(">=")
    needed = [requirement for distribution, version in pinned()
              for requirement in declared(metadata(distribution, version), "torch")]
    assert needed, "MONAI declares a torch range; the check above must see it"
    for requirement in needed:  # no torch the plan accepts is refused by a pin's declared range
        assert Version(torch.minimum) in requirement.specifier
