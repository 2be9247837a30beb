"""Label transfer in Slicer: show a CT's segmentation over its synthetic MR and export the pair as training data.

The synthetic MR G(x) lies on the CT's voxel grid, so the CT's segmentation is also the synthetic MR's (thesis 1.2,
E3). :func:`exportTrainingPair` writes the pair in the nnU-Net v2 raw layout (``imagesTr/<case>_0000.nii.gz``,
``labelsTr/<case>.nii.gz``, ``dataset.json``) or as a MONAI datalist, the same layout ``ct2mr synthesize-dataset``
writes (:mod:`ct2mr.io.nnunet`, which needs no torch). Qt-free: runs in Slicer and on a slicer-core scene.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import slicer

from . import nodes

__all__ = ["showSegmentationOver", "segmentLabelNames", "exportTrainingPair"]


def showSegmentationOver(segmentationNode: slicer.vtkMRMLSegmentationNode,
                         volumeNode: slicer.vtkMRMLScalarVolumeNode) -> None:
    """Show a segmentation's outlines and fill in every slice view, over ``volumeNode`` (e.g. the synthetic MR).

    Args:
        segmentationNode: the CT's segmentation.
        volumeNode: the volume it is shown over; it becomes the segmentation's reference geometry when it has none.

    Raises:
        ValueError: a node is missing.
    """
    if segmentationNode is None or volumeNode is None:
        raise ValueError("Select both a segmentation and a volume.")
    if segmentationNode.GetDisplayNode() is None:
        segmentationNode.CreateDefaultDisplayNodes()
    display = segmentationNode.GetDisplayNode()
    display.SetVisibility(True)
    display.SetVisibility2DFill(True)
    display.SetVisibility2DOutline(True)
    display.RemoveAllViewNodeIDs()  # every view, the compare layout's included
    if not segmentationNode.GetNodeReferenceID(segmentationNode.GetReferenceImageGeometryReferenceRole()):
        segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)


def segmentLabelNames(segmentationNode: slicer.vtkMRMLSegmentationNode) -> dict[str, int]:
    """Label values of an exported segmentation: ``{"background": 0, <segment name>: 1, ...}`` in segment order.

    Names are made unique and safe for nnU-Net (letters, digits, ``_`` and ``-``).
    """
    segmentation = segmentationNode.GetSegmentation()
    names = {"background": 0}
    for index in range(segmentation.GetNumberOfSegments()):
        name = re.sub(r"[^A-Za-z0-9_-]+", "_", segmentation.GetNthSegment(index).GetName()).strip("_") or "segment"
        unique, n = name, 2
        while unique in names:
            unique, n = f"{name}_{n}", n + 1
        names[unique] = index + 1
    return names


def exportTrainingPair(syntheticMRNode: slicer.vtkMRMLScalarVolumeNode,
                       segmentationNode: slicer.vtkMRMLSegmentationNode, outputFolder: str, caseId: str | None = None,
                       fmt: str = "nnunet", datasetName: str = "CT2MRSynthetic") -> dict[str, str]:
    """Export (synthetic MR, segmentation) as one training case of an nnU-Net v2 or MONAI dataset folder.

    The segmentation is exported as a label map on the synthetic MR's grid (segment i -> value i, segment order),
    the synthetic MR as is; ``dataset.json`` (or ``datalist.json``) is rewritten to list every case of the folder.
    Files are written to temporary names and renamed.

    Args:
        syntheticMRNode: the synthetic MR (on the CT's grid).
        segmentationNode: the CT's segmentation.
        outputFolder: the dataset folder (created when missing).
        caseId: case name; default: the synthetic MR node's name made file-safe.
        fmt: ``"nnunet"`` or ``"monai"``.
        datasetName: the dataset's name in its index.

    Returns:
        ``{"image": path, "label": path, "index": path}``.

    Raises:
        ValueError: missing nodes, an empty segmentation, an unknown format, or a folder whose existing index names
            the labels differently.
    """
    from ct2mr.io.nnunet import FORMATS, image_name, label_name, write_layout_index

    if syntheticMRNode is None or segmentationNode is None:
        raise ValueError("Select the synthetic MR and the segmentation to export.")
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}.")
    if segmentationNode.GetSegmentation().GetNumberOfSegments() == 0:
        raise ValueError(f"The segmentation '{segmentationNode.GetName()}' has no segment to export.")
    caseId = caseId or re.sub(r"[^A-Za-z0-9_-]+", "_", syntheticMRNode.GetName()).strip("_")
    labels = segmentLabelNames(segmentationNode)
    folder = Path(outputFolder)
    indexPath = folder / ("dataset.json" if fmt == "nnunet" else "datalist.json")
    if indexPath.is_file():
        existing = json.loads(indexPath.read_text()).get("labels", {})
        if existing and existing != labels:
            raise ValueError(f"{indexPath} names the labels {existing}, this segmentation {labels}. Export into "
                             "another folder, or rename the segments to match.")
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(parents=True, exist_ok=True)

    scene = syntheticMRNode.GetScene()
    before = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
    labelmapNode = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", f"{caseId} labels")
    try:
        segmentIds = [segmentationNode.GetSegmentation().GetNthSegmentID(i)
                      for i in range(segmentationNode.GetSegmentation().GetNumberOfSegments())]
        import vtk

        idList = vtk.vtkStringArray()
        for segmentId in segmentIds:
            idList.InsertNextValue(segmentId)
        if not slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
                segmentationNode, idList, labelmapNode, syntheticMRNode):
            raise RuntimeError(f"Could not export '{segmentationNode.GetName()}' to a label map.")
        imagePath = folder / "imagesTr" / image_name(caseId)
        labelPath = folder / "labelsTr" / label_name(caseId)
        for node, path in ((syntheticMRNode, imagePath), (labelmapNode, labelPath)):
            temporary = path.with_name(f".{path.name}.tmp.nii.gz")
            nodes.writeVolumeNode(node, str(temporary), compress=True)
            os.replace(temporary, path)
    finally:
        # the label map and what the export made for it (display node, colour table); singletons stay
        added = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]
        for node in added:
            if node.GetID() not in before and not node.GetSingletonTag():
                scene.RemoveNode(node)
    cases = [p.name[: -len(".nii.gz")] for p in sorted((folder / "labelsTr").glob("*.nii.gz"))]
    index = write_layout_index(folder, cases, labels, fmt, datasetName,
                               "Synthetic MR from CT2MRTranslation with the CT's segmentation, exported from 3D Slicer.")
    return {"image": str(imagePath), "label": str(labelPath), "index": str(index)}
