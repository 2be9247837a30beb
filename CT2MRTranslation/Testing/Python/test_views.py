"""The 3 x 4 compare layout on a real scene, with and without Slicer's layout logic."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest
import slicer
from CT2MRTranslationTestHelpers import addSyntheticVolume

from CT2MRTranslationLib import views

ORIENTATIONS = ("Axial", "Coronal", "Sagittal")


def addFourVolumes(scene):
    return [addSyntheticVolume(scene, name) for name in ("CT", "CT synthetic MR", "CT round-trip CT", "CT error map")]


def compareSliceNodes(scene):
    return [node for node in scene.GetNodesByClass("vtkMRMLSliceNode") if node.GetLayoutName().startswith("CT2MR_")]


def test_layout_description_is_3_rows_of_4_slice_views():
    root = ET.fromstring(views.compareLayoutDescription())
    assert root.tag == "layout" and root.get("type") == "vertical"
    rows = root.findall("./item/layout")
    assert len(rows) == 3 and all(row.get("type") == "horizontal" for row in rows)
    names = []
    for row, orientation in zip(rows, ORIENTATIONS, strict=True):
        rowViews = row.findall("./item/view")
        assert [v.get("class") for v in rowViews] == ["vtkMRMLSliceNode"] * 4
        assert [v.find("./property[@name='orientation']").text for v in rowViews] == [orientation] * 4
        assert [v.find("./property[@name='viewgroup']").text for v in rowViews] == [str(views.COMPARE_VIEW_GROUP)] * 4
        names += [v.get("singletontag") for v in rowViews]
    assert names[:4] == ["CT2MR_CT_Axial", "CT2MR_SyntheticMR_Axial", "CT2MR_RoundTripCT_Axial", "CT2MR_ErrorMap_Axial"]
    assert len(set(names)) == 12


@pytest.mark.parametrize("sceneFixture", ["mrml", "mrmlWithoutLayoutLogic"])
def test_compare_layout_shows_each_volume_in_its_column(request, sceneFixture):
    fixture = request.getfixturevalue(sceneFixture)
    scene = fixture.scene
    hadLayoutNode = scene.GetFirstNodeByClass("vtkMRMLLayoutNode") is not None
    assert hadLayoutNode == (fixture.layoutLogic is not None)
    volumes = addFourVolumes(scene)

    layoutId = views.setupCompareLayout(scene, volumes)

    assert layoutId == views.COMPARE_LAYOUT_ID
    layoutNode = views.getOrCreateLayoutNode(scene)
    assert scene.GetNumberOfNodesByClass("vtkMRMLLayoutNode") == 1
    assert layoutNode.GetViewArrangement() == layoutId
    assert layoutNode.GetCurrentLayoutDescription() == views.compareLayoutDescription()

    sliceNodes = compareSliceNodes(scene)
    assert len(sliceNodes) == 12
    for orientation in ORIENTATIONS:
        for column, volume in zip(views.COMPARE_COLUMNS, volumes, strict=True):
            viewName = views.compareViewName(column, orientation)
            sliceNode = scene.GetSingletonNode(viewName, "vtkMRMLSliceNode")
            assert sliceNode is not None, viewName
            assert sliceNode.GetLayoutName() == viewName
            assert sliceNode.GetOrientation() == orientation
            assert sliceNode.GetViewGroup() == views.COMPARE_VIEW_GROUP
            compositeNode = slicer.vtkMRMLSliceLogic.GetSliceCompositeNode(sliceNode)
            assert compositeNode is not None, viewName
            assert compositeNode.GetBackgroundVolumeID() == volume.GetID()
            assert compositeNode.GetForegroundVolumeID() is None
            assert compositeNode.GetLinkedControl()
            # centred on the volume
            bounds = [0.0] * 6
            volume.GetRASBounds(bounds)
            sliceToRAS = sliceNode.GetSliceToRAS()
            for axis in range(3):
                assert sliceToRAS.GetElement(axis, 3) == pytest.approx((bounds[2 * axis] + bounds[2 * axis + 1]) / 2)


def test_layout_logic_creates_the_slice_nodes_from_the_description(mrml):
    """What vtkMRMLLayoutLogic of slicer-core does: slice nodes, not slice composite nodes."""
    layoutNode = views.getOrCreateLayoutNode(mrml.scene)
    layoutNode.AddLayoutDescription(views.COMPARE_LAYOUT_ID, views.compareLayoutDescription())
    compositeBefore = mrml.scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")
    layoutNode.SetViewArrangement(views.COMPARE_LAYOUT_ID)
    sliceNodes = compareSliceNodes(mrml.scene)
    assert len(sliceNodes) == 12
    labels = {node.GetLayoutName(): node.GetLayoutLabel() for node in sliceNodes}
    assert labels["CT2MR_ErrorMap_Sagittal"] == "Err-S"
    assert mrml.scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode") == compositeBefore


def test_setting_up_twice_reuses_views_and_updates_backgrounds(mrml):
    first = addFourVolumes(mrml.scene)
    views.setupCompareLayout(mrml.scene, first)
    second = addFourVolumes(mrml.scene)
    views.setupCompareLayout(mrml.scene, [second[0], second[1], None, second[3]])
    assert len(compareSliceNodes(mrml.scene)) == 12
    composites = [n for n in mrml.scene.GetNodesByClass("vtkMRMLSliceCompositeNode")
                  if n.GetLayoutName().startswith("CT2MR_")]
    assert len(composites) == 12
    background = {n.GetLayoutName(): n.GetBackgroundVolumeID() for n in composites}
    assert background["CT2MR_CT_Coronal"] == second[0].GetID()
    assert background["CT2MR_RoundTripCT_Coronal"] is None
    assert background["CT2MR_ErrorMap_Sagittal"] == second[3].GetID()


def test_standard_views_are_left_alone(mrml):
    red = mrml.scene.GetSingletonNode("Red", "vtkMRMLSliceNode")
    assert red is not None  # created by the layout logic
    views.setupCompareLayout(mrml.scene, addFourVolumes(mrml.scene))
    assert red.GetViewGroup() == 0
    redComposite = slicer.vtkMRMLSliceLogic.GetSliceCompositeNode(red)
    assert redComposite is None or redComposite.GetBackgroundVolumeID() is None


def test_wrong_number_of_volumes(mrml):
    with pytest.raises(ValueError, match="Expected 4 volume nodes"):
        views.setupCompareLayout(mrml.scene, addFourVolumes(mrml.scene)[:3])


def test_analysis_row_holds_the_plot_and_table_views():
    root = ET.fromstring(views.compareLayoutDescription(withAnalysis=True))
    rows = root.findall("./item/layout")
    assert len(rows) == 4
    assert [(v.get("class"), v.get("singletontag")) for v in rows[3].findall("./item/view")] == [
        ("vtkMRMLPlotViewNode", views.PLOT_VIEW_NAME), ("vtkMRMLTableViewNode", views.TABLE_VIEW_NAME)]
    plainRows = ET.fromstring(views.compareLayoutDescription()).findall("./item/layout")
    assert [ET.tostring(row) for row in rows[:3]] == [ET.tostring(row) for row in plainRows]


@pytest.mark.parametrize("sceneFixture", ["mrml", "mrmlWithoutLayoutLogic"])
def test_compare_layout_with_histogram_chart_and_metrics_table(request, sceneFixture):
    scene = request.getfixturevalue(sceneFixture).scene
    volumes = addFourVolumes(scene)
    chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", "histogram")
    table = scene.AddNewNodeByClass("vtkMRMLTableNode", "metrics")

    layoutId = views.setupCompareLayout(scene, volumes, plotChartNode=chart, tableNode=table)

    assert layoutId == views.COMPARE_ANALYSIS_LAYOUT_ID
    layoutNode = views.getOrCreateLayoutNode(scene)
    assert layoutNode.GetViewArrangement() == layoutId
    assert layoutNode.GetCurrentLayoutDescription() == views.compareLayoutDescription(withAnalysis=True)
    assert len(compareSliceNodes(scene)) == 12
    plotViews = [n for n in scene.GetNodesByClass("vtkMRMLPlotViewNode") if n.GetLayoutName() == views.PLOT_VIEW_NAME]
    tableViews = [n for n in scene.GetNodesByClass("vtkMRMLTableViewNode")
                  if n.GetLayoutName() == views.TABLE_VIEW_NAME]
    assert len(plotViews) == len(tableViews) == 1
    assert plotViews[0].GetPlotChartNodeID() == chart.GetID()
    assert tableViews[0].GetTableNodeID() == table.GetID()

    # back to the plain layout: the analysis views stay but the arrangement changes
    assert views.setupCompareLayout(scene, volumes) == views.COMPARE_LAYOUT_ID
    assert layoutNode.GetViewArrangement() == views.COMPARE_LAYOUT_ID


def test_cursors_are_linked_through_the_crosshair(mrml):
    views.setupCompareLayout(mrml.scene, addFourVolumes(mrml.scene))
    crosshairs = list(mrml.scene.GetNodesByClass("vtkMRMLCrosshairNode"))
    assert len(crosshairs) == 1
    crosshair = crosshairs[0]
    assert crosshair.GetCrosshairMode() == slicer.vtkMRMLCrosshairNode.ShowSmallBasic
    assert crosshair.GetCrosshairBehavior() == slicer.vtkMRMLCrosshairNode.OffsetJumpSlice
    assert views.linkCursors(mrml.scene) is crosshair  # reused, not duplicated
