"""Label transfer in Slicer: a CT segmentation shown over the synthetic MR and exported as an nnU-Net training pair."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import slicer
import slicer.util
import vtk

from CT2MRTranslationLib.export import exportTrainingPair, segmentLabelNames, showSegmentationOver
from CT2MRTranslationTestHelpers import dataFile

nnunet = pytest.importorskip("ct2mr.io.nnunet", reason="the ct2mr engine package is not installed")


@pytest.fixture
def ctWithSegmentation(mrml):
    ct = mrml.loadVolume(dataFile("ct/thorax_cta_heart_crop_1p5mm.nii.gz"), "Heart CT")
    hu = slicer.util.arrayFromVolume(ct)
    labels = np.zeros(hu.shape, np.uint8)
    labels[hu > -500] = 1  # body
    labels[(hu < -400) & (hu > -950)] = 2  # lung parenchyma
    labelmap = mrml.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "thresholds")
    matrix = vtk.vtkMatrix4x4()
    ct.GetIJKToRASMatrix(matrix)
    labelmap.SetIJKToRASMatrix(matrix)
    slicer.util.updateVolumeFromArray(labelmap, labels)
    segmentation = mrml.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Heart CT segmentation")
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, segmentation)
    segmentation.GetSegmentation().GetNthSegment(0).SetName("body")
    segmentation.GetSegmentation().GetNthSegment(1).SetName("lung parenchyma")
    # the synthetic MR: a volume on the CT's grid (what the Logic creates), here a rescaled copy of the CT
    synthetic = mrml.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "Heart CT synthetic MR")
    synthetic.SetIJKToRASMatrix(matrix)
    slicer.util.updateVolumeFromArray(synthetic, (np.clip(hu, -600, 1000).astype(np.float32) + 600) / 800 - 1)
    return ct, synthetic, segmentation, labels


def test_segmentation_is_shown_over_the_synthetic_mr(ctWithSegmentation):
    _, synthetic, segmentation, _ = ctWithSegmentation
    showSegmentationOver(segmentation, synthetic)
    display = segmentation.GetDisplayNode()
    assert display.GetVisibility() and display.GetVisibility2DFill() and display.GetVisibility2DOutline()
    assert display.GetNumberOfViewNodeIDs() == 0  # shown in every view
    with pytest.raises(ValueError, match="Select both"):
        showSegmentationOver(None, synthetic)


def test_pair_is_exported_in_the_nnunet_layout_with_identical_labels_and_grid(ctWithSegmentation, tmp_path):
    ct, synthetic, segmentation, labels = ctWithSegmentation
    assert segmentLabelNames(segmentation) == {"background": 0, "body": 1, "lung_parenchyma": 2}
    paths = exportTrainingPair(synthetic, segmentation, str(tmp_path / "Dataset502"), caseId="heart01")
    assert paths["image"].endswith("imagesTr/heart01_0000.nii.gz")
    assert paths["label"].endswith("labelsTr/heart01.nii.gz")
    image, label = sitk.ReadImage(paths["image"]), sitk.ReadImage(paths["label"])
    assert image.GetSize() == label.GetSize() == tuple(ct.GetImageData().GetDimensions())
    assert image.GetOrigin() == label.GetOrigin() and image.GetDirection() == label.GetDirection()
    assert image.GetSpacing() == label.GetSpacing() == pytest.approx(ct.GetSpacing())
    np.testing.assert_array_equal(sitk.GetArrayFromImage(label), labels)
    np.testing.assert_allclose(sitk.GetArrayFromImage(image), slicer.util.arrayFromVolume(synthetic))
    data = json.loads((tmp_path / "Dataset502" / "dataset.json").read_text())
    assert nnunet.validate_dataset_json(data, tmp_path / "Dataset502") == []
    assert data["labels"] == {"background": 0, "body": 1, "lung_parenchyma": 2} and data["numTraining"] == 1
    assert not [p for p in (tmp_path / "Dataset502").rglob(".*")], "no temporary file left"

    exportTrainingPair(synthetic, segmentation, str(tmp_path / "Dataset502"), caseId="heart02")
    data = json.loads((tmp_path / "Dataset502" / "dataset.json").read_text())
    assert data["numTraining"] == 2

    segmentation.GetSegmentation().GetNthSegment(0).SetName("skin")
    with pytest.raises(ValueError, match="names the labels"):
        exportTrainingPair(synthetic, segmentation, str(tmp_path / "Dataset502"), caseId="heart03")


def test_export_leaves_no_temporary_label_map_node(ctWithSegmentation, mrml, tmp_path):
    _, synthetic, segmentation, _ = ctWithSegmentation
    def ids():
        return {mrml.scene.GetNthNode(i).GetID() for i in range(mrml.scene.GetNumberOfNodes())}

    before = ids()
    exportTrainingPair(synthetic, segmentation, str(tmp_path / "ds"), fmt="monai")
    assert ids() - before == set(), [mrml.scene.GetNodeByID(i).GetClassName() for i in ids() - before]
    datalist = json.loads((tmp_path / "ds" / "datalist.json").read_text())
    assert datalist["training"] == [{"image": "imagesTr/Heart_CT_synthetic_MR_0000.nii.gz",
                                     "label": "labelsTr/Heart_CT_synthetic_MR.nii.gz"}]
