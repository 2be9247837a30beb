"""Dependency check and install plan (no real install: the installers are recorded, as Slicer would call them)."""

from __future__ import annotations

import importlib.metadata

import pytest
from CT2MRTranslationTestHelpers import MODULE_DIR, REPO_ROOT

from CT2MRTranslationLib import install

INSTALLED = {"torch": "2.13.0+cpu", "numpy": "2.4.6", "SimpleITK": "2.5.7", "monai": "1.6.1", "h5py": "3.16.0",
             "safetensors": "0.8.0", "platformdirs": "4.14.5", "tqdm": "4.70.1", "scipy": "1.17.1", "ct2mr": "0.1.0"}


def versions(**changes):
    table = {**INSTALLED, **changes}
    return lambda package: table.get(package.name)


def plan(hasPyTorchUtils=True, engine="/opt/CT2MRTranslation/training", imported=(), **changes):
    statuses = install.checkDependencies(versionOf=versions(**changes))
    return install.installPlan(statuses, hasPyTorchUtils, engine, {name: object() for name in imported})


def test_every_package_has_a_reason_and_pins_are_exact():
    names = [p.name for p in install.PACKAGES]
    assert names[0] == "torch" and names[-1] == "ct2mr" and len(set(names)) == len(names)
    assert {"torch", "monai", "h5py", "SimpleITK", "ct2mr"} <= set(names)
    for package in install.PACKAGES:
        assert len(package.reason) > 30, package.name
        assert package.installer in ("pip", "pytorch", "slicer", "engine")
        if package.installer == "pip":
            assert package.requirement.startswith(f"{package.distribution}=="), package.name
            assert install.compareVersions(package.requirement.split("==")[1], package.minimum) >= 0
        else:
            assert package.requirement is None
    protected = {p.name for p in install.PACKAGES if p.installer in ("pytorch", "slicer")}
    assert protected == {"torch", "numpy", "SimpleITK"}
    assert all("never replaced" in p.reason.lower() for p in install.PACKAGES if p.name in protected)
    # packages that depend on torch or NumPy must not be able to replace them
    assert {p.name for p in install.PACKAGES if p.noDeps} >= {"monai", "safetensors", "ct2mr"}


def test_pins_match_the_tested_versions():
    """The pins are the versions the test suite runs with (requirements-test.txt or the venv)."""
    pinned = {}
    for line in (REPO_ROOT / "requirements-test.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==")
            pinned[name.strip().lower()] = version.strip()
    for package in install.PACKAGES:
        if package.installer != "pip":
            continue
        version = package.requirement.split("==")[1]
        expected = pinned.get(package.distribution.lower())
        if expected is None:
            try:
                expected = importlib.metadata.version(package.distribution)
            except importlib.metadata.PackageNotFoundError:
                continue
        assert version == expected, package.name


@pytest.mark.parametrize(("a", "b", "expected"), [("2.10", "2.9", 1), ("2.2", "2.2.0", 0), ("1.6.1", "1.6.10", -1),
                                                  ("2.13.0+cpu", "2.2", 1), ("2.1.2+cu121", "2.2", -1)])
def test_compareVersions(a, b, expected):
    assert install.compareVersions(a, b) == expected


def test_nothing_to_do():
    result = plan()
    assert result.nothingToDo and not result.restartNeeded
    assert [s.ok for s in result.statuses] == [True] * len(install.PACKAGES)
    assert install.confirmationText(result) == "Every dependency of CT to MR Translation is installed."


def test_fresh_slicer_with_the_pytorch_extension():
    result = plan(torch=None, monai=None, h5py=None, safetensors=None, ct2mr=None)
    assert not result.blockers and not result.restartNeeded
    steps = [(s.package.name, s.installer, s.arguments) for s in result.steps]
    assert steps == [
        ("torch", "pytorch", (">=2.2",)),
        ("monai", "pip", ("--no-deps", "monai==1.6.1")),
        ("h5py", "pip", ("h5py==3.16.0",)),
        ("safetensors", "pip", ("--no-deps", "safetensors==0.8.0")),
        ("ct2mr", "pip", ("--no-deps", "/opt/CT2MRTranslation/training")),
    ]
    text = install.confirmationText(result)
    for phrase in ("PyTorch >=2.2 through the PyTorch extension", "pip install --no-deps monai==1.6.1",
                   "pip install h5py==3.16.0", "Why: runs the networks", "Kept as they are (never replaced by pip): "
                   "numpy 2.4.6, SimpleITK 2.5.7."):
        assert phrase in text, phrase
    assert "restart" not in text.lower()


def test_upgrade_of_an_imported_package_needs_a_restart():
    result = plan(monai="1.2.0", imported=["monai"])
    assert [(s.package.name, s.arguments, s.upgrade) for s in result.steps] == [
        ("monai", ("--no-deps", "--upgrade", "monai==1.6.1"), True)]
    assert result.restartNeeded
    assert "restart Slicer" in install.confirmationText(result)
    assert not plan(monai="1.2.0").restartNeeded  # not imported yet: no restart


def test_old_torch_goes_through_the_pytorch_extension():
    result = plan(torch="2.1.2+cu121", imported=["torch"])
    assert [(s.package.name, s.installer, s.upgrade) for s in result.steps] == [("torch", "pytorch", True)]
    assert result.restartNeeded


@pytest.mark.parametrize(
    ("changes", "hasPyTorchUtils", "engine", "message"),
    [
        ({"torch": None}, False, "/x", "install 'PyTorch' from the Extensions Manager"),
        ({"SimpleITK": None}, True, "/x", "ships with 3D Slicer and is not replaced"),
        ({"numpy": "1.20"}, True, "/x", "numpy 1.20: too old"),
        ({"ct2mr": None}, True, None, "no bundled copy was found"),
    ],
)
def test_blockers(changes, hasPyTorchUtils, engine, message):
    result = plan(hasPyTorchUtils, engine, **changes)
    assert not result.steps and len(result.blockers) == 1 and message in result.blockers[0]
    assert message in install.confirmationText(result)
    with pytest.raises(RuntimeError, match="Cannot install"):
        install.runInstallPlan(result, pipInstall=lambda args: None)


def test_runInstallPlan_calls_the_installers_in_order():
    calls = []
    result = plan(torch=None, monai=None, ct2mr="0.0.1", engine="/path with space/training")
    done = install.runInstallPlan(result, pipInstall=lambda args: calls.append(("pip", args)),
                                  installTorch=lambda requirement: calls.append(("torch", requirement)) or "torch",
                                  log=lambda message: calls.append(("log", message)))
    assert [c for c in calls if c[0] != "log"] == [
        ("torch", ">=2.2"), ("pip", "--no-deps monai==1.6.1"),
        ("pip", '--no-deps --upgrade "/path with space/training"')]
    assert [s.package.name for s in done] == ["torch", "monai", "ct2mr"]
    assert sum(c[0] == "log" for c in calls) == 3


def test_runInstallPlan_stops_at_a_failure_or_a_declined_torch():
    result = plan(torch=None, monai=None)
    with pytest.raises(RuntimeError, match="Installing torch failed: the installation of PyTorch was cancelled"):
        install.runInstallPlan(result, pipInstall=lambda args: None, installTorch=lambda requirement: None)

    def failingPip(args):
        raise OSError("no network")

    with pytest.raises(RuntimeError, match="Installing monai failed: no network"):
        install.runInstallPlan(plan(monai=None), pipInstall=failingPip)


def test_real_environment_and_engine_source():
    """In this venv every dependency is installed, and the engine is found next to the module."""
    statuses = install.checkDependencies()
    assert all(s.ok for s in statuses), [s.describe() for s in statuses if not s.ok]
    assert install.engineSource() == REPO_ROOT / "training"
    assert install.engineSource(MODULE_DIR / "nowhere") is None
    missing = install.Package("notapackage", "notapackage", None, "notapackage==1", "pip", False, "x" * 40)
    assert install.installedVersion(missing) is None
