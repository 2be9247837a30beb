"""Helpers shared by the CT2MRTranslation module's pytest suite (paths, scene set-up, test volumes).

Kept out of ``conftest.py`` under a name unique in the repository: the engine's tests have a ``conftest.py`` of
their own, and ``from conftest import ...`` would pick whichever was loaded last when both suites run together.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

TESTS_DIR = Path(__file__).resolve().parent
MODULE_DIR = TESTS_DIR.parents[1]  # CT2MRTranslation/
REPO_ROOT = MODULE_DIR.parent
DATA_DIR = REPO_ROOT.parent / "shared" / "data"
FAKE_ENGINE = TESTS_DIR / "fake_ct2mr.py"

if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))

import slicer  # noqa: E402  (after sys.path is set, like Slicer's own start-up)


def dataFile(relativePath: str) -> Path:
    """Return a file of the shared real-data folder, or skip the test with the reason when it is absent."""
    path = DATA_DIR / relativePath
    if not path.exists():
        pytest.skip(f"real data {relativePath} not found under {DATA_DIR} (the shared data folder beside the repo)")
    return path


@dataclass
class SceneFixture:
    """A scene with the logics attached to it."""

    scene: slicer.vtkMRMLScene
    appLogic: slicer.vtkMRMLApplicationLogic
    colorLogic: slicer.vtkSlicerColorLogic
    volumesLogic: slicer.vtkSlicerVolumesLogic
    layoutLogic: slicer.vtkMRMLLayoutLogic | None
    sequencesLogic: slicer.vtkSlicerSequencesLogic | None = None

    def loadVolume(self, path: Path | str, name: str) -> slicer.vtkMRMLScalarVolumeNode:
        """Load a volume file as Slicer's "Add data" does (storage and display nodes included)."""
        node = self.volumesLogic.AddArchetypeVolume(str(path), name)
        assert node is not None, f"could not load {path}"
        return node


def makeScene(tmpDir: Path, withLayoutLogic: bool) -> SceneFixture:
    """Create a scene, make it ``slicer.mrmlScene`` and attach the logics Slicer attaches at start-up (application,
    colour, volumes, sequences and, if asked, layout)."""
    scene = slicer.vtkMRMLScene()
    slicer.mrmlScene = scene
    appLogic = slicer.vtkMRMLApplicationLogic()
    # The wheel ships no colour files: an empty share/ColorFiles folder gives the built-in tables without an error
    # message. File-based tables such as Inferno or ColdToHotRainbow are therefore absent here.
    (tmpDir / "share" / "ColorFiles").mkdir(parents=True, exist_ok=True)
    appLogic.SetHomeDirectory(str(tmpDir))
    appLogic.SetShareDirectory("share")
    appLogic.SetMRMLScene(scene)
    colorLogic = slicer.vtkSlicerColorLogic()
    colorLogic.SetMRMLApplicationLogic(appLogic)  # before SetMRMLScene, so that the default colours load
    colorLogic.SetMRMLScene(scene)
    appLogic.SetColorLogic(colorLogic)
    appLogic.SetModuleLogic("Colors", colorLogic)
    volumesLogic = slicer.vtkSlicerVolumesLogic()
    volumesLogic.SetMRMLApplicationLogic(appLogic)
    volumesLogic.SetMRMLScene(scene)
    appLogic.SetModuleLogic("Volumes", volumesLogic)
    sequencesLogic = slicer.vtkSlicerSequencesLogic()  # registers the sequence browser node, makes proxy nodes
    sequencesLogic.SetMRMLApplicationLogic(appLogic)
    sequencesLogic.SetMRMLScene(scene)
    appLogic.SetModuleLogic("Sequences", sequencesLogic)
    layoutLogic = None
    if withLayoutLogic:
        layoutLogic = slicer.vtkMRMLLayoutLogic()
        layoutLogic.SetMRMLApplicationLogic(appLogic)
        layoutLogic.SetMRMLScene(scene)
    return SceneFixture(scene, appLogic, colorLogic, volumesLogic, layoutLogic, sequencesLogic)


def closeScene(fixture: SceneFixture) -> None:
    """Empty the scene at the end of a test."""
    # Clear(True) with the layout logic attached crashes (DESIGN.md); Clear(False) keeps the singletons.
    fixture.scene.Clear(False)
    slicer.mrmlScene = None


def addSyntheticVolume(
    scene: slicer.vtkMRMLScene,
    name: str = "Synthetic CT",
    shape: tuple[int, int, int] = (12, 20, 16),
    spacing: tuple[float, float, float] = (0.7, 0.8, 2.5),
    origin: tuple[float, float, float] = (-12.25, 30.5, -101.75),
    angleDegrees: float = 20.0,
) -> slicer.vtkMRMLScalarVolumeNode:
    """Add a small CT-like volume (HU) with oblique direction cosines and anisotropic spacing.

    Args:
        scene: the scene.
        name: node name.
        shape: array shape (z, y, x).
        spacing: (x, y, z) in mm.
        origin: RAS origin in mm.
        angleDegrees: rotation of the IJK axes about the RAS S axis.
    """
    rng = np.random.default_rng(7)
    z, y, x = np.indices(shape)
    body = ((y - shape[1] / 2) ** 2 + (x - shape[2] / 2) ** 2) < (min(shape[1:]) / 2.5) ** 2
    array = np.where(body, 40.0, -1000.0) + rng.normal(0, 20, shape) + 30.0 * z
    array = array.astype(np.int16)
    node = slicer.vtkMRMLScalarVolumeNode()
    node.SetName(name)
    node.SetSpacing(*spacing)
    node.SetOrigin(*origin)
    angle = np.deg2rad(angleDegrees)
    directions = np.array([[np.cos(angle), -np.sin(angle), 0.0], [np.sin(angle), np.cos(angle), 0.0], [0.0, 0.0, 1.0]])
    node.SetIJKToRASDirections(directions.tolist())
    node = scene.AddNode(node)
    slicer.util.updateVolumeFromArray(node, array)
    return node


def processIsGone(pid: int) -> bool:
    """True when no live process has this pid (a zombie waiting to be reaped counts as gone)."""
    statPath = f"/proc/{pid}/stat"
    if os.path.exists("/proc"):
        try:
            with open(statPath) as stat:
                state = stat.read().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        return state in ("Z", "X")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False
