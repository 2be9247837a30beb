"""Supported Slicer range, dependency check, install plan and background installs.

The plan is checked against tables of installed versions; the installs run as real pip processes (``runInstall``,
the plain-subprocess twin of the Widget's ``QProcess``) from a local wheel folder and against unreachable indexes and
proxies on 127.0.0.1, so that the failure messages are tested on pip's real output.
"""

from __future__ import annotations

import base64
import hashlib
import os
import sys
import zipfile

import pytest
from CT2MRTranslationTestHelpers import MODULE_DIR, REPO_ROOT

from CT2MRTranslationLib import install

INSTALLED = {"torch": "2.13.0+cpu", "numpy": "2.4.6", "SimpleITK": "2.5.7", "monai": "1.6.1", "h5py": "3.16.0",
             "safetensors": "0.8.0", "platformdirs": "4.14.5", "tqdm": "4.70.1", "scipy": "1.17.1", "ct2mr": "0.1.0"}
PIP = ["PythonSlicer", "-m", "pip", "install", "--disable-pip-version-check", "--no-input"]


def versions(**changes):
    table = {**INSTALLED, **changes}
    return lambda package: table.get(package.name)


def plan(engine="/opt/CT2MRTranslation/Resources/Engine/ct2mr-0.1.0-py3-none-any.whl", imported=(), **changes):
    statuses = install.checkDependencies(versionOf=versions(**changes))
    return install.installPlan(statuses, engine, {name: object() for name in imported})


# --- the supported range --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("slicerVersion", "python", "supported"), [
    ((5, 10), (3, 12), True), ("5.11.0-2026-01-01", (3, 12), True), ((6, 0), (3, 13), True),
    ((5, 8), (3, 9), False), ((5, 6), (3, 9), False), ("5.8.1", (3, 9), False), ((5, 10), (3, 11), False),
])
def test_slicer_version_problem_in_one_sentence(slicerVersion, python, supported):
    message = install.slicerVersionProblem(slicerVersion, python)
    if supported:
        assert message == ""
        return
    assert message.count(". ") == 0 and message.endswith(".")  # one sentence
    assert "needs 3D Slicer 5.10 or newer (Python 3.12)" in message
    assert f"Python {python[0]}.{python[1]}" in message and "nothing was installed" in message


# --- packages and plan ---------------------------------------------------------------------------------------------


def test_every_package_has_a_reason_and_pins_are_exact():
    names = [p.name for p in install.PACKAGES]
    assert names[0] == "torch" and names[-1] == "ct2mr" and len(set(names)) == len(names)
    assert {"torch", "monai", "h5py", "SimpleITK", "ct2mr"} <= set(names)
    for package in install.PACKAGES:
        assert len(package.reason) > 30, package.name
        assert package.installer in ("pip", "torch", "slicer", "engine")
        if package.installer == "pip":
            assert package.requirement.startswith(f"{package.distribution}=="), package.name
            assert install.compareVersions(package.requirement.split("==")[1], package.minimum) >= 0
        elif package.installer == "torch":
            assert package.requirement == "torch" + install.TORCH_REQUIREMENT
        else:
            assert package.requirement is None
    protected = {p.name for p in install.PACKAGES if p.installer in ("torch", "slicer")}
    assert protected == {"torch", "numpy", "SimpleITK"}
    assert all("never replaced" in p.reason.lower() for p in install.PACKAGES if p.name in protected)
    # packages that depend on torch or NumPy must not be able to replace them
    assert {p.name for p in install.PACKAGES if p.noDeps} >= {"monai", "safetensors", "h5py", "scipy", "ct2mr"}


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
        assert package.requirement.split("==")[1] == pinned[package.distribution.lower()], package.name


@pytest.mark.parametrize(("a", "b", "expected"), [("2.10", "2.9", 1), ("2.2", "2.2.0", 0), ("1.6.1", "1.6.10", -1),
                                                  ("2.13.0+cpu", "2.8", 1), ("2.1.2+cu121", "2.8", -1)])
def test_compareVersions(a, b, expected):
    assert install.compareVersions(a, b) == expected


def test_nothing_to_do():
    result = plan()
    assert result.nothingToDo and not result.restartNeeded and result.commands("PythonSlicer") == []
    assert [s.ok for s in result.statuses] == [True] * len(install.PACKAGES)
    assert install.confirmationText(result) == "Every dependency of CT to MR Translation is installed."


def test_fresh_slicer_plan_and_its_command_lines():
    result = plan(torch=None, monai=None, h5py=None, safetensors=None, ct2mr=None)
    assert not result.blockers and not result.restartNeeded
    wheel = "/opt/CT2MRTranslation/Resources/Engine/ct2mr-0.1.0-py3-none-any.whl"
    assert [(s.package.name, s.installer, s.arguments) for s in result.steps] == [
        ("torch", "torch", ("torch>=2.8",)),
        ("monai", "pip", ("--no-deps", "monai==1.6.1")),
        ("h5py", "pip", ("--no-deps", "h5py==3.16.0")),
        ("safetensors", "pip", ("--no-deps", "safetensors==0.8.0")),
        ("ct2mr", "pip", ("--no-deps", wheel)),
    ]
    online = [list(c.argv) for c in result.commands("PythonSlicer")]
    assert online == [
        [*PIP, "light-the-torch>=0.5"],
        ["PythonSlicer", "-m", "light_the_torch", "install", "torch>=2.8"],
        [*PIP, "--no-deps", "monai==1.6.1"],
        [*PIP, "--no-deps", "h5py==3.16.0"],
        [*PIP, "--no-deps", "safetensors==0.8.0"],
        [*PIP, "--no-deps", wheel],
    ]
    offline = [list(c.argv) for c in result.commands("PythonSlicer", "/media/usb/wheels")]
    local = ["--no-index", "--find-links", "/media/usb/wheels"]
    assert offline[0] == [*PIP, *local, "torch>=2.8"] and offline[1] == [*PIP, *local, "--no-deps", "monai==1.6.1"]
    assert all(command[6:9] == local for command in offline)
    text = install.confirmationText(result)
    for phrase in ("PyTorch torch>=2.8 through light-the-torch", "pip install --no-deps monai==1.6.1",
                   "Why: runs the networks", "in the background", "Kept as they are (never replaced by pip): "
                   "numpy 2.4.6, SimpleITK 2.5.7.", "wheel folder"):
        assert phrase in text, phrase
    assert "restart" not in text.lower()
    download = install.offlineDownloadCommand(result, "win_amd64")
    assert download.startswith("pip download --only-binary=:all: --python-version 3.12 --platform win_amd64")
    assert download.endswith('"torch>=2.8" monai==1.6.1 h5py==3.16.0 safetensors==0.8.0')
    assert install.offlineDownloadCommand(result) in text


def test_a_source_engine_is_built_without_the_network_and_paths_stay_one_argument():
    result = plan(ct2mr="0.0.1", engine="C:/Program Files/Slicer 5.10/CT2MR/training")
    (step,) = result.steps
    assert step.pipArguments == ["--no-deps", "--no-build-isolation", "--upgrade",
                                 "C:/Program Files/Slicer 5.10/CT2MR/training"]
    assert isinstance(step.pipArguments, list)  # slicer.util.pip_install splits a string with shlex
    assert list(result.commands("PythonSlicer")[0].argv)[-1] == "C:/Program Files/Slicer 5.10/CT2MR/training"


def test_upgrade_of_an_imported_package_needs_a_restart():
    result = plan(monai="1.2.0", imported=["monai"])
    assert [(s.package.name, s.arguments, s.upgrade) for s in result.steps] == [
        ("monai", ("--no-deps", "--upgrade", "monai==1.6.1"), True)]
    assert result.restartNeeded and "restart Slicer" in install.confirmationText(result)
    assert not plan(monai="1.2.0").restartNeeded  # not imported yet: no restart
    torch = plan(torch="2.1.2+cu121", imported=["torch"])
    assert [(s.package.name, s.installer, s.upgrade) for s in torch.steps] == [("torch", "torch", True)]
    assert torch.restartNeeded


@pytest.mark.parametrize(
    ("changes", "engine", "message"),
    [
        ({"SimpleITK": None}, "/x", "ships with 3D Slicer and is not replaced"),
        ({"numpy": "1.20"}, "/x", "numpy 1.20: too old"),
        ({"ct2mr": None}, None, "reinstall the CT2MRTranslation extension"),
    ],
)
def test_blockers(changes, engine, message):
    result = plan(engine, **changes)
    assert not result.steps and len(result.blockers) == 1 and message in result.blockers[0]
    assert message in install.confirmationText(result)


# --- background installs: real pip processes ----------------------------------------------------------------------


def makeWheel(folder, name="ct2mrtestpkg", version="1.0"):
    """A minimal pure-Python wheel (one module that defines VALUE = 42)."""
    dist = f"{name}-{version}.dist-info"
    files = {f"{name}.py": b"VALUE = 42\n",
             f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
             f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{dist}/RECORD,,")
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, data in files.items():
            archive.writestr(path, data)
        archive.writestr(f"{dist}/RECORD", "\n".join(record) + "\n")
    return wheel


def pipCommand(*arguments, package="ct2mrtestpkg"):
    argv = (sys.executable, "-m", "pip", "install", "--isolated", "--disable-pip-version-check", "--no-input",
            *arguments)
    return install.InstallCommand(package, argv, f"pip install {' '.join(arguments)}")


def test_install_from_a_wheel_folder_with_progress(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    makeWheel(wheels)
    target = tmp_path / "site"
    step = install.InstallStep(install.Package("ct2mrtestpkg", "ct2mrtestpkg", "1.0", "ct2mrtestpkg==1.0", "pip",
                                               True, "a test package" * 3), "pip", ("--no-deps", "ct2mrtestpkg==1.0"))
    (command,) = step.commands(sys.executable, str(wheels))
    command = install.InstallCommand(command.package, (*command.argv[:4], "--isolated", "--target", str(target),
                                                       *command.argv[4:]), command.description)
    messages = []
    run = install.runInstall([command], str(wheels), log=messages.append, timeout=120)
    assert run.succeeded and run.fraction == 1.0 and run.message == "Dependencies installed."
    assert messages == ["[1/1] Installing pip install --no-deps ct2mrtestpkg==1.0"]
    assert (target / "ct2mrtestpkg.py").read_text() == "VALUE = 42\n"


def test_a_missing_wheel_in_the_wheel_folder_is_named(tmp_path):
    empty = tmp_path / "wheels"
    empty.mkdir()
    with pytest.raises(install.InstallError) as error:
        install.runInstall([pipCommand("--no-index", "--find-links", str(empty), "ct2mrtestpkg==1.0")], str(empty),
                           timeout=120)
    text = str(error.value)
    assert text.startswith(f"Installing ct2mrtestpkg failed: the wheel folder {empty} has no wheel of it")
    assert "No matching distribution found for ct2mrtestpkg==1.0" in text  # pip's own words follow


@pytest.mark.parametrize(("arguments", "message"), [
    (("--index-url", "http://127.0.0.1:1/simple"), "the package index could not be reached (no internet access?)"),
    (("--proxy", "http://127.0.0.1:1", "--index-url", "https://pypi.invalid/simple"),
     "the proxy refused the connection. Set the proxy for pip"),
])
def test_offline_and_proxy_failures_say_what_to_do(arguments, message):
    command = pipCommand(*arguments, "--retries", "1", "--timeout", "2", "ct2mrtestpkg==1.0")
    with pytest.raises(install.InstallError, match="Installing ct2mrtestpkg failed") as error:
        install.runInstall([command, pipCommand("never-run")], timeout=120)
    assert message in str(error.value)


def test_a_command_that_cannot_start_and_the_run_state():
    missing = install.InstallCommand("torch", ("/no/such/PythonSlicer", "-m", "pip"), "PyTorch")
    ok = install.InstallCommand("monai", (sys.executable, "-c", "pass"), "monai")
    run = install.InstallRun([ok, missing])
    assert run.nextCommand() is ok and run.fraction == 0.0 and run.message == "[1/2] Installing monai"
    run.commandFinished(0, "")
    assert run.nextCommand() is missing and run.fraction == 0.5
    run.commandFinished(None, "No such file")
    assert run.done and not run.succeeded and run.nextCommand() is None
    assert run.error.startswith("Installing torch failed: /no/such/PythonSlicer could not be started")
    with pytest.raises(install.InstallError, match="could not be started"):
        install.runInstall([missing])


@pytest.mark.parametrize(("output", "advice"), [
    ("SSLError(SSLCertVerificationError(1, '[SSL: CERTIFICATE_VERIFY_FAILED]", "global.cert"),
    ("ERROR: Could not install packages due to an OSError: [Errno 13] Permission denied: '/opt/Slicer/lib'",
     "not writable"),
    ("OSError: [Errno 28] No space left on device", "the disk is full"),
    ("something else entirely", "exit status 1"),
])
def test_failure_messages(output, advice):
    command = install.InstallCommand("monai", ("PythonSlicer", "-m", "pip", "install", "monai==1.6.1"), "monai")
    message = install.installFailureMessage(command, output, 1)
    assert message.startswith("Installing monai failed") and advice in message and output in message


def test_real_environment_and_engine_source():
    """In this venv every dependency is installed, and the engine is found next to the module."""
    statuses = install.checkDependencies()
    assert all(s.ok for s in statuses), [s.describe() for s in statuses if not s.ok]
    assert install.engineSource() == REPO_ROOT / "training"
    assert install.engineSource(MODULE_DIR / "nowhere") is None
    missing = install.Package("notapackage", "notapackage", None, "notapackage==1", "pip", False, "x" * 40)
    assert install.installedVersion(missing) is None


def test_a_bundled_wheel_is_preferred(tmp_path):
    engineFolder = tmp_path / "CT2MRTranslation" / "Resources" / "Engine"
    engineFolder.mkdir(parents=True)
    wheel = makeWheel(engineFolder, "ct2mr", "0.1.0")
    assert install.engineSource(tmp_path / "CT2MRTranslation") == wheel
    assert os.path.basename(plan(ct2mr=None, engine=wheel).steps[0].arguments[-1]) == wheel.name


def test_cancelling_an_install_stops_after_the_current_command():
    commands = [install.InstallCommand(name, (sys.executable, "-c", "pass"), name) for name in ("torch", "monai")]
    run = install.InstallRun(commands)
    run.commandFinished(0, "")
    run.cancel()
    assert run.cancelled and run.done and not run.succeeded and run.nextCommand() is None
    assert run.error == "The installation was cancelled after 1 of 2 steps; install again to finish it."
    run.commandFinished(-1, "killed")  # the killed command's end changes nothing
    assert run.index == 1 and run.message.startswith("The installation was cancelled")
