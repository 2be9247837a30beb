"""Volume nodes to files and back with exact geometry; the engine's outputs as nodes, and where they go in the scene.

Outputs keep the input CT's voxel grid: same size, spacing, origin and direction (DESIGN.md, "Choices already
made"). Volumes are written and read through ``vtkMRMLVolumeArchetypeStorageNode`` (ITK readers and writers, LPS
files, RAS nodes), never through ``slicer.util.saveNode``/``loadVolume`` which need the application. Arrays from
``slicer.util.arrayFromVolume`` are (z, y, x), i.e. (K, J, I).

No Qt here: this module runs inside Slicer and in plain Python (pytest with the ``slicer-core`` wheel).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import slicer
import vtk

__all__ = [
    "DISPLACEMENT_COLOR_NODE_NAMES",
    "DISPLACEMENT_OUTPUT",
    "GEOMETRY_TOLERANCE",
    "HEAT_COLOR_NODE_NAMES",
    "MIN_DISPLACEMENT_WINDOW_MM",
    "OUTPUT_KEYS",
    "UNCERTAINTY_COLOR_NODE_NAMES",
    "UNCERTAINTY_OUTPUT",
    "assertSameGeometry",
    "findColorNodeID",
    "geometryDifference",
    "ijkToRASMatrixAsNumpy",
    "loadOutputNodes",
    "placeNextTo",
    "readVolumeNode",
    "robustWindowLevel",
    "setDisplacementDisplay",
    "setOutputDisplays",
    "setUncertaintyDisplay",
    "setVolumeDisplay",
    "volumeDimensions",
    "volumePercentiles",
    "writeVolumeNode",
]

GEOMETRY_TOLERANCE = 1e-3
"""Largest accepted difference of any IJK-to-RAS element (mm for the origin column).

NIfTI stores its sform/qform in float32, so a grid that round-trips through ``.nii.gz`` can differ from the input
by ~1e-5 mm; anything above this tolerance (far below any voxel size) is a real geometry change.
"""

HEAT_COLOR_NODE_NAMES = ("Inferno", "PET-Heat", "ColdToHotRainbow", "Red")
"""Colour tables tried, in order, for the error map: black (no error) to bright (large error) where possible.

``Inferno`` and ``ColdToHotRainbow`` come from Slicer's colour files (present in the application, absent in the
``slicer-core`` wheel); ``PET-Heat`` and ``Red`` are built in and always exist once the colour logic is attached.
"""


def ijkToRASMatrixAsNumpy(volumeNode: slicer.vtkMRMLVolumeNode) -> np.ndarray:
    """Return the IJK-to-RAS matrix of a volume node.

    Args:
        volumeNode: any volume node.

    Returns:
        (4, 4) float64 array mapping homogeneous voxel indices (i, j, k, 1) to RAS coordinates in mm. The upper-left
        3x3 block is direction cosines times spacing; the last column is the origin in RAS.
    """
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    return slicer.util.arrayFromVTKMatrix(matrix).astype(np.float64)


def volumeDimensions(volumeNode: slicer.vtkMRMLVolumeNode) -> tuple[int, int, int]:
    """Return the number of voxels along (I, J, K) = (x, y, z), or (0, 0, 0) without image data."""
    imageData = volumeNode.GetImageData()
    if imageData is None:
        return (0, 0, 0)
    return tuple(int(d) for d in imageData.GetDimensions())


def geometryDifference(volumeNode: slicer.vtkMRMLVolumeNode, referenceNode: slicer.vtkMRMLVolumeNode) -> float:
    """Return the largest absolute difference between the IJK-to-RAS matrices of two volume nodes (mm)."""
    return float(np.max(np.abs(ijkToRASMatrixAsNumpy(volumeNode) - ijkToRASMatrixAsNumpy(referenceNode))))


def assertSameGeometry(
    volumeNode: slicer.vtkMRMLVolumeNode,
    referenceNode: slicer.vtkMRMLVolumeNode,
    tolerance: float = GEOMETRY_TOLERANCE,
    snap: bool = False,
) -> None:
    """Check that a volume lies on the voxel grid of a reference volume.

    Args:
        volumeNode: the volume to check (e.g. the synthetic MR).
        referenceNode: the volume whose grid must be kept (the input CT).
        tolerance: largest accepted difference of any IJK-to-RAS element, see :data:`GEOMETRY_TOLERANCE`.
        snap: when the check passes, copy the reference's IJK-to-RAS matrix into ``volumeNode`` so that both are
            bit-identical (removes the float32 rounding of NIfTI files).

    Raises:
        RuntimeError: the dimensions differ, or an IJK-to-RAS element differs by more than ``tolerance``.
    """
    name = volumeNode.GetName()
    dimensions, referenceDimensions = volumeDimensions(volumeNode), volumeDimensions(referenceNode)
    if dimensions != referenceDimensions:
        raise RuntimeError(
            f"'{name}' has {dimensions} voxels but the input has {referenceDimensions}: the engine did not write "
            "its result on the input's voxel grid. Update the ct2mr engine, or report this with the input file."
        )
    difference = geometryDifference(volumeNode, referenceNode)
    if difference > tolerance:
        raise RuntimeError(
            f"'{name}' does not have the input's IJK-to-RAS matrix (largest difference {difference:.3g} mm > "
            f"{tolerance:g} mm):\n{ijkToRASMatrixAsNumpy(volumeNode)}\ninput:\n{ijkToRASMatrixAsNumpy(referenceNode)}\n"
            "The engine changed the spacing, origin or direction. Update the ct2mr engine, or report this with the "
            "input file."
        )
    if snap:
        matrix = vtk.vtkMatrix4x4()
        referenceNode.GetIJKToRASMatrix(matrix)
        volumeNode.SetIJKToRASMatrix(matrix)


def writeVolumeNode(volumeNode: slicer.vtkMRMLVolumeNode, path: str, compress: bool = False) -> str:
    """Write a volume node to a file with its exact geometry.

    The node's own IJK-to-RAS matrix is written (a parent transform, if any, is not applied), converted to LPS
    as the file formats require. The node keeps no reference to the file.

    Args:
        volumeNode: volume node with image data.
        path: destination; the extension picks the format (``.nrrd``, ``.nii.gz``, ``.mha``).
        compress: compress the voxel data (slower; not worth it for temporary files).

    Returns:
        ``path``.

    Raises:
        ValueError: the node has no image data.
        RuntimeError: the writer failed (full disk, unwritable folder, unsupported extension).
    """
    if volumeNode is None or volumeNode.GetImageData() is None:
        raise ValueError("The volume node has no image data: select a volume that has been loaded.")
    storageNode = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storageNode.SetFileName(path)
    storageNode.SetUseCompression(bool(compress))
    if not storageNode.WriteData(volumeNode) or not os.path.isfile(path):
        raise RuntimeError(
            f"Could not write '{volumeNode.GetName()}' to {path}. Check that the folder is writable and has free "
            "space."
        )
    return path


def readVolumeNode(path: str, name: str) -> slicer.vtkMRMLScalarVolumeNode:
    """Read a volume file into a new scalar volume node that is not in any scene.

    The node keeps no storage node, so a scene it is later added to never points to the (temporary) file; Slicer
    creates a storage node when the user saves it.

    Args:
        path: volume file (NIfTI, NRRD, MetaImage, ...).
        name: node name.

    Returns:
        The node; add it to a scene with ``scene.AddNode``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        RuntimeError: the file could not be read as a volume.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"The engine reported {path} but the file does not exist.")
    volumeNode = slicer.vtkMRMLScalarVolumeNode()
    volumeNode.SetName(name)
    storageNode = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storageNode.SetFileName(path)
    storageNode.SetSingleFile(True)
    if not storageNode.ReadData(volumeNode, True) or volumeNode.GetImageData() is None:
        raise RuntimeError(f"Could not read {path} as a volume: the file is damaged or not an image.")
    return volumeNode


def findColorNodeID(scene: slicer.vtkMRMLScene, names: Sequence[str] = HEAT_COLOR_NODE_NAMES) -> str | None:
    """Return the ID of the first colour node of the scene whose name is in ``names``.

    Args:
        scene: the MRML scene.
        names: colour node names in order of preference.

    Returns:
        The node ID, or ``None`` when none exists (no colour logic attached to the scene).
    """
    for name in names:
        node = scene.GetFirstNode(name, "vtkMRMLColorNode", False, False)
        if node is not None:
            return node.GetID()
    return None


def volumePercentiles(volumeNode: slicer.vtkMRMLVolumeNode, percentiles: Sequence[float]) -> list[float]:
    """Return percentiles of the finite voxel values of a volume.

    Volumes above two million voxels are subsampled regularly (about one million values), plenty for display.

    Args:
        volumeNode: scalar volume with image data.
        percentiles: values in [0, 100].

    Returns:
        One value per percentile, in the volume's units (HU for CT and error maps); all 0.0 when no voxel is finite.
    """
    values = slicer.util.arrayFromVolume(volumeNode).ravel()  # (z, y, x) flattened
    if values.size > 2_000_000:
        values = values[:: values.size // 1_000_000]
    values = values[np.isfinite(values)]
    if values.size == 0:
        return [0.0 for _ in percentiles]
    return [float(v) for v in np.percentile(values, list(percentiles))]


def robustWindowLevel(
    volumeNode: slicer.vtkMRMLVolumeNode, lowerPercentile: float = 1.0, upperPercentile: float = 99.0
) -> tuple[float, float]:
    """Return a window/level that spans two percentiles of the voxel values.

    Args:
        volumeNode: scalar volume with image data.
        lowerPercentile: percentile (0-100) shown as black.
        upperPercentile: percentile (0-100) shown as white.

    Returns:
        ``(window, level)`` in the volume's units (HU for CT); the window is at least 1e-6.
    """
    low, high = volumePercentiles(volumeNode, [lowerPercentile, upperPercentile])
    return max(high - low, 1e-6), (high + low) / 2.0


def setVolumeDisplay(
    volumeNode: slicer.vtkMRMLScalarVolumeNode,
    window: float,
    level: float,
    colorNodeID: str | None = None,
) -> slicer.vtkMRMLScalarVolumeDisplayNode:
    """Give a volume node (already in a scene) a display node with a fixed window/level and colour table.

    Args:
        volumeNode: scalar volume node in a scene.
        window: display window (volume units).
        level: display level (volume units).
        colorNodeID: colour node ID; ``None`` keeps the display node's default (grey in Slicer).

    Returns:
        The volume's display node (created when missing).

    Raises:
        ValueError: the node is not in a scene.
    """
    scene = volumeNode.GetScene()
    if scene is None:
        raise ValueError(f"'{volumeNode.GetName()}' is not in a scene: add it with scene.AddNode first.")
    displayNode = volumeNode.GetDisplayNode()
    if displayNode is None:
        displayNode = scene.AddNewNodeByClass("vtkMRMLScalarVolumeDisplayNode")
        if colorNodeID is None:
            colorNodeID = findColorNodeID(scene, ("Grey",))
        volumeNode.SetAndObserveDisplayNodeID(displayNode.GetID())
    wasModifying = displayNode.StartModify()
    if colorNodeID is not None:
        displayNode.SetAndObserveColorNodeID(colorNodeID)
    displayNode.AutoWindowLevelOff()
    displayNode.SetWindowLevel(float(window), float(level))
    displayNode.EndModify(wasModifying)
    return displayNode


def placeNextTo(volumeNode: slicer.vtkMRMLNode, referenceNode: slicer.vtkMRMLNode) -> int:
    """Put a node beside a reference node in subject hierarchy (same parent: patient, study or folder).

    In Slicer every node has a subject hierarchy item; in plain Python (no subject hierarchy plugins) items are
    created as needed, the reference's under the scene item.

    Args:
        volumeNode: node to place; must be in the same scene as ``referenceNode``.
        referenceNode: node whose parent item is used.

    Returns:
        The subject hierarchy item ID of ``volumeNode``.

    Raises:
        ValueError: the nodes are not in the same scene.
    """
    scene = referenceNode.GetScene()
    if scene is None or volumeNode.GetScene() is not scene:
        raise ValueError("Both nodes must be in the same scene before they can be placed in subject hierarchy.")
    shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    invalid = shNode.GetInvalidItemID()
    referenceItem = shNode.GetItemByDataNode(referenceNode)
    if referenceItem == invalid:
        referenceItem = shNode.CreateItem(shNode.GetSceneItemID(), referenceNode)
    parentItem = shNode.GetItemParent(referenceItem)
    item = shNode.GetItemByDataNode(volumeNode)
    if item == invalid:
        item = shNode.CreateItem(parentItem, volumeNode)
    else:
        shNode.SetItemParent(item, parentItem)
    return item


# ---------------------------------------------------------------------------------------------------- engine outputs

OUTPUT_KEYS = {
    "synthetic_mr": ("synthetic_mr.nii.gz", "synthetic MR"),
    "roundtrip_ct": ("roundtrip_ct.nii.gz", "round-trip CT"),
    "error_map": ("error_map.nii.gz", "error map"),
}
"""Engine output key -> (file name in OUT_DIR, suffix of the node name): G(x) in [-1, 1], F(G(x)) in HU and the
error map |F(G(x)) - x| in HU."""

DISPLACEMENT_OUTPUT = ("displacement_mm", "displacement_mm.nii.gz", "displacement (mm)")
"""The warp check's output: (engine output key, file name in OUT_DIR, suffix of the node name)."""

DISPLACEMENT_COLOR_NODE_NAMES = ("ColdToHotRainbow", "Inferno", "PET-Heat", "Red")
"""Colour tables tried, in order, for the displacement map (blue: no displacement, red: large)."""

UNCERTAINTY_OUTPUT = ("uncertainty", "uncertainty.nii.gz", "uncertainty")
"""The uncertainty map (``ct2mr translate --uncertainty tta``, issue 16): (engine output key, file name in OUT_DIR,
suffix of the node name). The voxel-wise standard deviation of G(x), normalised MR units (>= 0), on the CT's grid."""

UNCERTAINTY_COLOR_NODE_NAMES = ("Viridis", "Inferno", "PET-Rainbow2", "PET-Heat", "Red")
"""Colour tables tried, in order, for the uncertainty map (dark: stable G(x), bright: unstable)."""

MIN_UNCERTAINTY_WINDOW = 0.01
"""The uncertainty map is shown from 0 to max(its p99 inside the body, this) normalised MR units, so that the
numerical noise of a very stable G(x) stays dark."""

MIN_DISPLACEMENT_WINDOW_MM = 1.0
"""The displacement map is shown from 0 to max(its p95, this) mm, so that sub-millimetre registration noise of a
faithful translation stays dark."""


def loadOutputNodes(
    outputDir: str,
    reportedOutputs: dict[str, str] | None,
    inputNode: slicer.vtkMRMLScalarVolumeNode,
    withDisplacement: bool = False,
    withUncertainty: bool = False,
) -> dict[str, slicer.vtkMRMLScalarVolumeNode]:
    """Read the engine's output files into new volume nodes (not in a scene yet) on the input's exact grid.

    Args:
        outputDir: the engine's OUT_DIR.
        reportedOutputs: the ``done`` event's ``outputs`` (key -> path); missing keys use the file names of
            :data:`OUTPUT_KEYS` in ``outputDir``.
        inputNode: the translated CT; names are ``"<input> synthetic MR"``, ...
        withDisplacement: also read the warp check's displacement map.
        withUncertainty: also read the uncertainty map (:data:`UNCERTAINTY_OUTPUT`).

    Returns:
        ``{engine output key: node}``, each with the input's IJK-to-RAS matrix copied bit for bit.

    Raises:
        RuntimeError: a file is missing, unreadable, or not on the input's voxel grid.
    """
    reported = reportedOutputs or {}
    expected = dict(OUTPUT_KEYS)
    if withDisplacement:
        expected[DISPLACEMENT_OUTPUT[0]] = DISPLACEMENT_OUTPUT[1:]
    if withUncertainty:
        expected[UNCERTAINTY_OUTPUT[0]] = UNCERTAINTY_OUTPUT[1:]
    loaded = {}
    for key, (fileName, suffix) in expected.items():
        path = reported.get(key) or os.path.join(outputDir, fileName)
        if not os.path.isabs(path):
            path = os.path.join(outputDir, path)
        if not os.path.isfile(path):
            raise RuntimeError(
                f"The engine reported success but its {suffix} file {path} does not exist. Update the ct2mr "
                "engine, or report this with the engine output.")
        node = readVolumeNode(path, f"{inputNode.GetName()} {suffix}")
        assertSameGeometry(node, inputNode, snap=True)
        loaded[key] = node
    return loaded


def setOutputDisplays(inputNode, syntheticMR, roundTripCT, errorMap) -> None:
    """Display settings of the three outputs (nodes in a scene): the synthetic MR with a robust window/level (0.5th
    to 99.5th percentile), the round-trip CT with the input's window/level (x and F(G(x)) look alike where the round
    trip is faithful), the error map from 0 HU (black) to its 99th percentile with a heat colour table."""
    scene = inputNode.GetScene()
    window, level = robustWindowLevel(syntheticMR, 0.5, 99.5)
    setVolumeDisplay(syntheticMR, window, level)
    inputDisplay = inputNode.GetDisplayNode()
    if inputDisplay is not None and inputDisplay.IsA("vtkMRMLScalarVolumeDisplayNode"):
        window, level = inputDisplay.GetWindow(), inputDisplay.GetLevel()
    else:
        window, level = robustWindowLevel(inputNode)
    setVolumeDisplay(roundTripCT, window, level)
    high = max(volumePercentiles(errorMap, [99.0])[0], 1.0)
    setVolumeDisplay(errorMap, high, high / 2.0, findColorNodeID(scene))


def setDisplacementDisplay(displacementMap, anatomy: dict | None) -> None:
    """Colour map of the displacement map from 0 mm to max(p95, :data:`MIN_DISPLACEMENT_WINDOW_MM`): the engine's
    p95 inside the body (``anatomy["displacement_p95_mm"]``) when reported, else the map's own 95th percentile."""
    try:
        high = float((anatomy or {}).get("displacement_p95_mm"))
    except (TypeError, ValueError):
        high = float("nan")
    if not high > 0.0:  # also NaN
        high = volumePercentiles(displacementMap, [95.0])[0]
    high = max(high, MIN_DISPLACEMENT_WINDOW_MM)
    setVolumeDisplay(displacementMap, high, high / 2.0,
                     findColorNodeID(displacementMap.GetScene(), DISPLACEMENT_COLOR_NODE_NAMES))


def setUncertaintyDisplay(uncertaintyMap, summary: dict | None = None) -> None:
    """Colour map of the uncertainty map from 0 (dark) to max(p99, :data:`MIN_UNCERTAINTY_WINDOW`) (bright).

    Args:
        uncertaintyMap: the uncertainty volume node (in a scene), normalised MR units.
        summary: the engine's ``done`` event ``uncertainty`` block; its ``body`` p95 inside the body mask is used when
            reported (x 1.5, as the p99 of a long-tailed map), else the map's own 99th percentile.
    """
    try:
        high = 1.5 * float(((summary or {}).get("body") or {}).get("p95"))
    except (TypeError, ValueError):
        high = float("nan")
    if not high > 0.0:  # also NaN
        high = volumePercentiles(uncertaintyMap, [99.0])[0]
    high = max(high, MIN_UNCERTAINTY_WINDOW)
    setVolumeDisplay(uncertaintyMap, high, high / 2.0,
                     findColorNodeID(uncertaintyMap.GetScene(), UNCERTAINTY_COLOR_NODE_NAMES))
