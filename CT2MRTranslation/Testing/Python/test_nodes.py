"""Volume node <-> file with exact geometry, display, subject hierarchy placement (real scene, real volumes)."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import slicer
from CT2MRTranslationTestHelpers import addSyntheticVolume, dataFile

from CT2MRTranslationLib import nodes


def lpsGeometry(path) -> tuple:
    image = sitk.ReadImage(str(path))
    return image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection()


@pytest.mark.parametrize(
    "relativePath",
    [
        "ct/thorax_cta_1p5mm.nii.gz",  # isotropic, axis-aligned
        "ct/chest_ct_lung2.nrrd",  # 512 x 512 x 61, 5 mm slices
        "mr/cardiac_cine_sax_phase01.nii.gz",  # oblique direction cosines
    ],
)
def test_write_read_round_trip_keeps_geometry_and_voxels(mrml, tmp_path, relativePath):
    source = dataFile(relativePath)
    inputNode = mrml.loadVolume(source, "input")
    inputArray = slicer.util.arrayFromVolume(inputNode).copy()  # (z, y, x)

    written = nodes.writeVolumeNode(inputNode, str(tmp_path / "input.nrrd"))
    size, spacing, origin, direction = lpsGeometry(written)
    sourceSize, sourceSpacing, sourceOrigin, sourceDirection = lpsGeometry(source)
    assert size == sourceSize
    np.testing.assert_allclose(spacing, sourceSpacing, atol=1e-6)
    np.testing.assert_allclose(origin, sourceOrigin, atol=1e-4)
    np.testing.assert_allclose(direction, sourceDirection, atol=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(written)), inputArray)

    readNode = nodes.readVolumeNode(written, "read back")
    assert readNode.GetScene() is None and readNode.GetStorageNode() is None
    assert readNode.GetName() == "read back"
    # RAS -> LPS -> RAS in double precision: equal up to rounding (exact for axis-aligned grids)
    np.testing.assert_allclose(nodes.ijkToRASMatrixAsNumpy(readNode), nodes.ijkToRASMatrixAsNumpy(inputNode),
                               rtol=0, atol=1e-9)
    assert nodes.volumeDimensions(readNode) == nodes.volumeDimensions(inputNode) == tuple(sourceSize)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(readNode), inputArray)


def test_ijkToRASMatrix_of_a_synthetic_oblique_volume(mrml):
    node = addSyntheticVolume(mrml.scene, spacing=(0.7, 0.8, 2.5), origin=(1.0, 2.0, 3.0), angleDegrees=90.0)
    matrix = nodes.ijkToRASMatrixAsNumpy(node)
    assert matrix.shape == (4, 4) and matrix.dtype == np.float64
    # a rotation of 90 degrees about S: I goes along A, J along -R
    np.testing.assert_allclose(matrix[:3, :3], [[0.0, -0.8, 0.0], [0.7, 0.0, 0.0], [0.0, 0.0, 2.5]], atol=1e-12)
    np.testing.assert_allclose(matrix[:3, 3], [1.0, 2.0, 3.0])
    assert nodes.volumeDimensions(node) == (16, 20, 12)


def test_nifti_round_trip_is_within_tolerance_and_snapped_exactly(mrml, tmp_path):
    inputNode = addSyntheticVolume(mrml.scene, origin=(-12.345678901, 30.987654321, -101.123456789), angleDegrees=33.3)
    written = nodes.writeVolumeNode(inputNode, str(tmp_path / "output.nii.gz"))
    outputNode = nodes.readVolumeNode(written, "output")
    difference = nodes.geometryDifference(outputNode, inputNode)
    assert difference <= nodes.GEOMETRY_TOLERANCE  # float32 sform/qform of NIfTI
    nodes.assertSameGeometry(outputNode, inputNode, snap=True)
    np.testing.assert_array_equal(nodes.ijkToRASMatrixAsNumpy(outputNode), nodes.ijkToRASMatrixAsNumpy(inputNode))


def test_assertSameGeometry_rejects_moved_and_resized_grids(mrml, tmp_path):
    inputNode = addSyntheticVolume(mrml.scene)
    moved = nodes.readVolumeNode(nodes.writeVolumeNode(inputNode, str(tmp_path / "moved.nrrd")), "moved")
    origin = list(moved.GetOrigin())
    moved.SetOrigin(origin[0] + 0.01, origin[1], origin[2])
    with pytest.raises(RuntimeError, match="IJK-to-RAS"):
        nodes.assertSameGeometry(moved, inputNode)

    resized = slicer.vtkMRMLScalarVolumeNode()
    resized.SetName("resized")
    resized.SetIJKToRASMatrix(_matrixOf(inputNode))
    slicer.util.updateVolumeFromArray(resized, np.zeros((11, 20, 16), np.float32))
    with pytest.raises(RuntimeError, match=r"\(16, 20, 11\) voxels but the input has \(16, 20, 12\)"):
        nodes.assertSameGeometry(resized, inputNode)


def _matrixOf(node):
    import vtk

    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return matrix


def test_writeVolumeNode_errors(mrml, tmp_path):
    empty = mrml.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    with pytest.raises(ValueError, match="no image data"):
        nodes.writeVolumeNode(empty, str(tmp_path / "empty.nrrd"))
    volume = addSyntheticVolume(mrml.scene)
    (tmp_path / "a-file").write_text("")
    with pytest.raises(RuntimeError, match="Could not write"):
        nodes.writeVolumeNode(volume, str(tmp_path / "a-file" / "x.nrrd"))  # a file where a folder should be


def test_readVolumeNode_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        nodes.readVolumeNode(str(tmp_path / "absent.nii.gz"), "absent")
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not an image")
    with pytest.raises(RuntimeError, match="Could not read"):
        nodes.readVolumeNode(str(broken), "broken")


def test_findColorNodeID_prefers_heat_tables(mrml):
    colorNodeID = nodes.findColorNodeID(mrml.scene)
    present = [name for name in nodes.HEAT_COLOR_NODE_NAMES
               if mrml.scene.GetFirstNode(name, "vtkMRMLColorNode") is not None]
    assert present, "the colour logic should provide at least PET-Heat and Red"
    assert mrml.scene.GetNodeByID(colorNodeID).GetName() == present[0]
    assert nodes.findColorNodeID(mrml.scene, ("NoSuchTable", "Red")) == "vtkMRMLColorTableNodeRed"


def test_findColorNodeID_without_colour_nodes():
    assert nodes.findColorNodeID(slicer.vtkMRMLScene()) is None


def test_volumePercentiles_and_robustWindowLevel(mrml):
    node = mrml.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "ramp")
    array = np.arange(1000, dtype=np.float32).reshape(10, 10, 10)
    array[0, 0, 0] = np.nan
    slicer.util.updateVolumeFromArray(node, array)
    low, high = nodes.volumePercentiles(node, [0.0, 100.0])
    assert (low, high) == (1.0, 999.0)  # NaN ignored
    window, level = nodes.robustWindowLevel(node, 0.0, 100.0)
    assert window == pytest.approx(998.0) and level == pytest.approx(500.0)


def test_setVolumeDisplay(mrml):
    node = addSyntheticVolume(mrml.scene)
    assert node.GetDisplayNode() is None
    displayNode = nodes.setVolumeDisplay(node, 400.0, 40.0, "vtkMRMLColorTableNodeRed")
    assert node.GetDisplayNode() is displayNode
    assert (displayNode.GetWindow(), displayNode.GetLevel()) == (400.0, 40.0)
    assert not displayNode.GetAutoWindowLevel()
    assert displayNode.GetColorNodeID() == "vtkMRMLColorTableNodeRed"
    grey = nodes.setVolumeDisplay(addSyntheticVolume(mrml.scene, "second"), 2.0, 0.0)
    assert grey.GetColorNodeID() == "vtkMRMLColorTableNodeGrey"
    with pytest.raises(ValueError, match="not in a scene"):
        nodes.setVolumeDisplay(slicer.vtkMRMLScalarVolumeNode(), 1.0, 0.0)


def test_placeNextTo_uses_the_parent_of_the_reference(mrml):
    scene = mrml.scene
    shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    patient = shNode.CreateSubjectItem(shNode.GetSceneItemID(), "Patient 1")
    study = shNode.CreateStudyItem(patient, "CT study")
    reference = addSyntheticVolume(scene, "CT")
    shNode.CreateItem(study, reference)
    output = addSyntheticVolume(scene, "CT synthetic MR")

    item = nodes.placeNextTo(output, reference)
    assert shNode.GetItemDataNode(item) is output
    assert shNode.GetItemParent(item) == study
    # an output that already has an item is moved, not duplicated
    assert nodes.placeNextTo(output, reference) == item
    assert shNode.GetNumberOfItemChildren(study) == 2


def test_placeNextTo_without_subject_hierarchy_items(mrml):
    reference = addSyntheticVolume(mrml.scene, "CT")
    output = addSyntheticVolume(mrml.scene, "output")
    shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(mrml.scene)
    item = nodes.placeNextTo(output, reference)
    assert shNode.GetItemParent(item) == shNode.GetSceneItemID()
    assert shNode.GetItemParent(shNode.GetItemByDataNode(reference)) == shNode.GetSceneItemID()
    with pytest.raises(ValueError, match="same scene"):
        nodes.placeNextTo(slicer.vtkMRMLScalarVolumeNode(), reference)
