"""The 3 x 4 compare layout on a real scene, with and without Slicer's layout logic: registered at start-up, kept
through .mrb save and reopen, views fitted to the volume, the user's previous views restored."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import numpy as np
import pytest
import slicer
from CT2MRTranslationTestHelpers import addSyntheticVolume

from CT2MRTranslationLib import nodes, views

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


# --- registered at start-up, kept with the scene, fitted, and undone --------------------------------------------------


def test_registration_at_start_up_is_idempotent(mrmlWithoutLayoutLogic):
    scene = mrmlWithoutLayoutLogic.scene
    layoutNode = views.registerCompareLayouts(scene)
    assert layoutNode.IsLayoutDescription(views.COMPARE_LAYOUT_ID)
    assert layoutNode.GetLayoutDescription(views.COMPARE_ANALYSIS_LAYOUT_ID) == views.compareLayoutDescription(True)
    assert views.registerCompareLayouts(scene) is layoutNode and scene.GetNumberOfNodesByClass("vtkMRMLLayoutNode") == 1
    assert layoutNode.GetViewArrangement() != views.COMPARE_LAYOUT_ID  # registering does not switch the layout


def withDataIO(fixture, folder):
    """What Slicer's application sets up for reading .mrb files: a data I/O manager with a cache folder."""
    cache = slicer.vtkCacheManager()
    folder.mkdir(parents=True, exist_ok=True)
    cache.SetRemoteCacheDirectory(str(folder))
    dataIO = slicer.vtkDataIOManager()
    dataIO.SetCacheManager(cache)
    fixture.scene.SetDataIOManager(dataIO)
    fixture.scene.SetCacheManager(cache)
    fixture.keep = (cache, dataIO)
    return fixture


@pytest.mark.parametrize("analysisRow", [False, True])
def test_compare_layout_survives_saving_and_reopening_the_scene(tmp_path, analysisRow):
    """A .mrb saved with the compare layout reopens in it in a fresh application, because the layouts are registered
    at start-up (a scene file keeps the layout's ID, not its description)."""
    from CT2MRTranslationTestHelpers import closeScene, dataFile, makeScene

    ctPath = dataFile("ct/thorax_cta_heart_crop_1p5mm.nii.gz")
    first = withDataIO(makeScene(tmp_path / "first", withLayoutLogic=True), tmp_path / "cache1")
    try:
        views.registerCompareLayouts(first.scene)  # what the module does when Slicer starts
        volumes = [first.loadVolume(ctPath, name) for name in ("CT", "CT synthetic MR", "CT round-trip CT",
                                                               "CT error map")]
        chart = first.scene.AddNewNodeByClass("vtkMRMLPlotChartNode", "histogram") if analysisRow else None
        layoutId = views.setupCompareLayout(first.scene, volumes, plotChartNode=chart)
        assert first.scene.WriteToMRB(str(tmp_path / "compare.mrb"))
    finally:
        closeScene(first)

    fresh = withDataIO(makeScene(tmp_path / "fresh", withLayoutLogic=True), tmp_path / "cache2")
    try:
        views.registerCompareLayouts(fresh.scene)  # the module's start-up in the new session
        assert fresh.scene.ReadFromMRB(str(tmp_path / "compare.mrb"))
        layoutNode = views.getOrCreateLayoutNode(fresh.scene)
        assert fresh.scene.GetNumberOfNodesByClass("vtkMRMLLayoutNode") == 1
        assert layoutNode.GetViewArrangement() == layoutId
        assert layoutNode.GetCurrentLayoutDescription() == views.compareLayoutDescription(analysisRow)
        sliceNode = fresh.scene.GetSingletonNode(views.compareViewName("ErrorMap", "Coronal"), "vtkMRMLSliceNode")
        background = slicer.vtkMRMLSliceLogic.GetSliceCompositeNode(sliceNode).GetBackgroundVolumeID()
        assert fresh.scene.GetNodeByID(background).GetName() == "CT error map"
        assert views.hasPreviousViews(fresh.scene)  # the user's layout from before is kept with the scene too
    finally:
        closeScene(fresh)


def test_previous_layout_and_crosshair_are_restored(mrml):
    scene = mrml.scene
    layoutNode = views.getOrCreateLayoutNode(scene)
    layoutNode.SetViewArrangement(slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpView)
    crosshair = views.linkCursors(scene)
    crosshair.SetCrosshairMode(slicer.vtkMRMLCrosshairNode.NoCrosshair)
    crosshair.SetCrosshairBehavior(slicer.vtkMRMLCrosshairNode.NoAction)
    assert not views.hasPreviousViews(scene) and not views.restorePreviousViews(scene)

    views.setupCompareLayout(scene, addFourVolumes(scene))
    assert crosshair.GetCrosshairMode() == slicer.vtkMRMLCrosshairNode.ShowSmallBasic
    layoutNode.SetViewArrangement(slicer.vtkMRMLLayoutNode.SlicerLayoutOneUpRedSliceView)  # the user looks around
    views.setupCompareLayout(scene, addFourVolumes(scene))  # a second translation keeps the first memory

    assert views.restorePreviousViews(scene)
    assert layoutNode.GetViewArrangement() == slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpView
    assert crosshair.GetCrosshairMode() == slicer.vtkMRMLCrosshairNode.NoCrosshair
    assert crosshair.GetCrosshairBehavior() == slicer.vtkMRMLCrosshairNode.NoAction
    assert not views.hasPreviousViews(scene) and not views.restorePreviousViews(scene)


@pytest.mark.parametrize("dimensions", [(256, 256), (400, 200)])
def test_views_are_fitted_to_the_volume(mrml, dimensions):
    scene = mrml.scene
    volume = addSyntheticVolume(scene, "Oblique CT", shape=(12, 20, 16), spacing=(0.7, 0.8, 2.5), angleDegrees=20.0)
    matrix = nodes.ijkToRASMatrixAsNumpy(volume)
    shape = (16, 20, 12)  # (i, j, k)
    corners = np.array([[i, j, k, 1.0] for i in (-0.5, shape[0] - 0.5) for j in (-0.5, shape[1] - 0.5)
                        for k in (-0.5, shape[2] - 0.5)])
    ras = (matrix @ corners.T)[:3]
    for orientation in ORIENTATIONS:
        sliceNode = slicer.vtkMRMLSliceNode()
        sliceNode.SetOrientation(orientation)
        sliceNode.SetDimensions(dimensions[0], dimensions[1], 1)
        scene.AddNode(sliceNode)
        views.fitSliceToVolume(sliceNode, volume)
        rotation = slicer.util.arrayFromVTKMatrix(sliceNode.GetSliceToRAS())[:3, :3]
        extent = np.ptp(rotation.T @ ras, axis=1)
        fov = sliceNode.GetFieldOfView()
        # the whole volume is in view, one side exactly, at the view's aspect ratio
        assert fov[0] >= extent[0] - 1e-6 and fov[1] >= extent[1] - 1e-6
        assert min(fov[0] - extent[0], fov[1] - extent[1]) == pytest.approx(0.0, abs=1e-6)
        assert fov[0] / fov[1] == pytest.approx(dimensions[0] / dimensions[1])
        np.testing.assert_allclose(slicer.util.arrayFromVTKMatrix(sliceNode.GetSliceToRAS())[:3, 3], ras.mean(axis=1),
                                   atol=1e-6)
