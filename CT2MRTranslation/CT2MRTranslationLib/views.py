"""The compare layout: CT | synthetic MR G(x) | round-trip CT F(G(x)) | error map |F(G(x)) - x|.

Three rows (axial, coronal, sagittal) by four columns of slice views, registered as a custom layout in the scene's
layout node. Each view's slice composite node shows one volume as background; all twelve views share a view group
of their own with linked control on, so scrolling or zooming one moves the views of the same orientation together
without touching the standard Red/Green/Yellow views. The cursors are linked through the scene's crosshair node:
Shift + mouse move puts the crosshair at the same RAS point in every view and the other views jump to it.

With the uncertainty map (``ct2mr translate --uncertainty``, issue 16) a fifth column shows it (layouts
:data:`COMPARE_UNCERTAINTY_LAYOUT_ID` and :data:`COMPARE_UNCERTAINTY_ANALYSIS_LAYOUT_ID`).

With an analysis (:mod:`CT2MRTranslationLib.plots`), a fourth row holds a plot view showing the histogram chart and
a table view showing the metrics table (layout :data:`COMPARE_ANALYSIS_LAYOUT_ID`).

The layouts are registered when the module starts (:func:`registerCompareLayouts`, called by the module at Slicer's
start-up): a scene saved with the compare layout shows it again when it is reopened after a restart (a scene file
keeps only the layout's ID, not its description). Each view is fitted to its volume (:func:`fitSliceToVolume`). The
user's layout and crosshair mode before the first compare layout are kept as attributes of the layout node (saved
with the scene) and come back with :func:`restorePreviousViews`.

Only MRML is used (layout node, slice nodes, slice composite nodes): Slicer's layout manager builds the Qt views
from the layout description. No Qt here; runs inside Slicer and in plain Python with the ``slicer-core`` wheel.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import slicer
import vtk

__all__ = [
    "COMPARE_ANALYSIS_LAYOUT_ID",
    "COMPARE_COLUMNS",
    "COMPARE_LAYOUT_ID",
    "COMPARE_ORIENTATIONS",
    "COMPARE_UNCERTAINTY_ANALYSIS_LAYOUT_ID",
    "COMPARE_UNCERTAINTY_LAYOUT_ID",
    "COMPARE_LAYOUT_IDS",
    "UNCERTAINTY_COLUMN",
    "compareLayoutId",
    "COMPARE_VIEW_GROUP",
    "PLOT_VIEW_NAME",
    "TABLE_VIEW_NAME",
    "PREVIOUS_VIEWS_ATTRIBUTES",
    "compareLayoutDescription",
    "compareViewName",
    "fitSliceToVolume",
    "getOrCreateLayoutNode",
    "hasPreviousViews",
    "linkCursors",
    "registerCompareLayouts",
    "rememberPreviousViews",
    "restorePreviousViews",
    "setupCompareLayout",
]

COMPARE_LAYOUT_ID = 18402
"""Layout ID of the compare layout (well above Slicer's built-in layouts, which end near 100)."""

COMPARE_ANALYSIS_LAYOUT_ID = 18403
"""Layout ID of the compare layout with the analysis row (histogram plot view | metrics table view)."""

COMPARE_UNCERTAINTY_LAYOUT_ID = 18404
"""Layout ID of the compare layout with a fifth column, the uncertainty map."""

COMPARE_UNCERTAINTY_ANALYSIS_LAYOUT_ID = 18405
"""Layout ID of the compare layout with the uncertainty column and the analysis row."""

COMPARE_LAYOUT_IDS = {
    (False, False): COMPARE_LAYOUT_ID, (True, False): COMPARE_ANALYSIS_LAYOUT_ID,
    (False, True): COMPARE_UNCERTAINTY_LAYOUT_ID, (True, True): COMPARE_UNCERTAINTY_ANALYSIS_LAYOUT_ID,
}
"""``(withAnalysis, withUncertainty)`` -> layout ID of the compare layouts registered at start-up."""

PLOT_VIEW_NAME = "CT2MRHistogramPlot"
"""Layout name (singleton tag) of the plot view of the analysis row."""

TABLE_VIEW_NAME = "CT2MRMetricsTable"
"""Layout name (singleton tag) of the table view of the analysis row."""

COMPARE_VIEW_GROUP = 18
"""View group of the compare views: linking acts within a group, so the standard views (group 0) stay apart."""

COMPARE_COLUMNS = ("CT", "SyntheticMR", "RoundTripCT", "ErrorMap")
"""Column keys, left to right: input CT x, synthetic MR G(x), round trip F(G(x)) (HU), error map (HU)."""

UNCERTAINTY_COLUMN = "Uncertainty"
"""Key of the optional fifth column: the uncertainty map (spread of G(x), normalised MR units)."""

_COLUMN_LABELS = {"CT": "CT", "SyntheticMR": "MR", "RoundTripCT": "RT", "ErrorMap": "Err", UNCERTAINTY_COLUMN: "Unc"}

COMPARE_ORIENTATIONS = (("Axial", "#F34A33"), ("Coronal", "#6EB04B"), ("Sagittal", "#EDD54C"))
"""Row orientations, top to bottom, with Slicer's colours for them (red, green, yellow)."""

PREVIOUS_VIEWS_ATTRIBUTES = ("CT2MRTranslation.PreviousViewArrangement", "CT2MRTranslation.PreviousCrosshairMode",
                             "CT2MRTranslation.PreviousCrosshairBehavior")
"""Layout node attributes holding the user's view arrangement and crosshair mode/behaviour from before the first
compare layout (:func:`rememberPreviousViews`, :func:`restorePreviousViews`)."""


def compareViewName(column: str, orientation: str) -> str:
    """Return the view (layout) name of one compare view, e.g. ``"CT2MR_CT_Axial"``.

    Args:
        column: one of :data:`COMPARE_COLUMNS`.
        orientation: ``"Axial"``, ``"Coronal"`` or ``"Sagittal"``.
    """
    return f"CT2MR_{column}_{orientation}"


def compareLayoutId(withAnalysis: bool = False, withUncertainty: bool = False) -> int:
    """The ID of the compare layout with or without the analysis row and the uncertainty column."""
    return COMPARE_LAYOUT_IDS[(bool(withAnalysis), bool(withUncertainty))]


def _columns(withUncertainty: bool) -> tuple[str, ...]:
    return (*COMPARE_COLUMNS, UNCERTAINTY_COLUMN) if withUncertainty else COMPARE_COLUMNS


def compareLayoutDescription(withAnalysis: bool = False, withUncertainty: bool = False) -> str:
    """Return the layout XML of the 3 x 4 (or 3 x 5) compare layout.

    Args:
        withAnalysis: add a fourth row with a ``vtkMRMLPlotViewNode`` (:data:`PLOT_VIEW_NAME`) and a
            ``vtkMRMLTableViewNode`` (:data:`TABLE_VIEW_NAME`).
        withUncertainty: add a fifth column (:data:`UNCERTAINTY_COLUMN`) for the uncertainty map.

    Returns:
        A ``<layout type="vertical">`` of three horizontal rows (axial, coronal, sagittal), each holding four
        ``vtkMRMLSliceNode`` views in the order of :data:`COMPARE_COLUMNS` (then the uncertainty column), and the
        analysis row.
    """
    rows = []
    for orientation, color in COMPARE_ORIENTATIONS:
        items = []
        for column in _columns(withUncertainty):
            label = f"{_COLUMN_LABELS[column]}-{orientation[0]}"
            items.append(
                "   <item>\n"
                f'    <view class="vtkMRMLSliceNode" singletontag="{compareViewName(column, orientation)}">\n'
                f'     <property name="orientation" action="default">{orientation}</property>\n'
                f'     <property name="viewlabel" action="default">{label}</property>\n'
                f'     <property name="viewcolor" action="default">{color}</property>\n'
                f'     <property name="viewgroup" action="default">{COMPARE_VIEW_GROUP}</property>\n'
                "    </view>\n"
                "   </item>\n"
            )
        rows.append(' <item>\n  <layout type="horizontal">\n' + "".join(items) + "  </layout>\n </item>\n")
    if withAnalysis:
        rows.append(
            ' <item>\n  <layout type="horizontal">\n'
            f'   <item>\n    <view class="vtkMRMLPlotViewNode" singletontag="{PLOT_VIEW_NAME}">\n'
            '     <property name="viewlabel" action="default">H</property>\n    </view>\n   </item>\n'
            f'   <item>\n    <view class="vtkMRMLTableViewNode" singletontag="{TABLE_VIEW_NAME}">\n'
            '     <property name="viewlabel" action="default">M</property>\n    </view>\n   </item>\n'
            "  </layout>\n </item>\n"
        )
    return '<layout type="vertical">\n' + "".join(rows) + "</layout>\n"


def getOrCreateLayoutNode(scene: slicer.vtkMRMLScene) -> slicer.vtkMRMLLayoutNode:
    """Return the scene's singleton layout node, creating it when the scene has none (plain Python).

    Args:
        scene: the MRML scene.
    """
    layoutNode = scene.GetSingletonNode("vtkMRMLLayoutNode", "vtkMRMLLayoutNode")
    if layoutNode is None:
        layoutNode = scene.GetFirstNodeByClass("vtkMRMLLayoutNode")
    if layoutNode is None:
        layoutNode = slicer.vtkMRMLLayoutNode()
        layoutNode.SetSingletonTag("vtkMRMLLayoutNode")
        layoutNode = scene.AddNode(layoutNode)
    return layoutNode


def _getOrCreateSliceNode(scene: slicer.vtkMRMLScene, viewName: str, orientation: str, color: str, label: str):
    sliceNode = scene.GetSingletonNode(viewName, "vtkMRMLSliceNode")
    if sliceNode is None:
        # Created by vtkMRMLLayoutLogic when it observes the layout node (always in Slicer); create it otherwise.
        # The scene's default slice node carries the orientation presets (and the radiology/neurology choice).
        if scene.GetDefaultNodeByClass("vtkMRMLSliceNode") is None:
            slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene)
        sliceNode = scene.CreateNodeByClass("vtkMRMLSliceNode")
        sliceNode.UnRegister(None)  # CreateNodeByClass returns a new reference that Python already holds
        sliceNode.SetName(viewName)
        sliceNode.SetLayoutName(viewName)
        sliceNode.SetSingletonTag(viewName)
        sliceNode.SetLayoutLabel(label)
        sliceNode.SetLayoutColor([int(color[i : i + 2], 16) / 255.0 for i in (1, 3, 5)])
        sliceNode.SetViewGroup(COMPARE_VIEW_GROUP)
        sliceNode.SetOrientation(orientation)
        sliceNode = scene.AddNode(sliceNode)
    return sliceNode


def _getOrCreateSliceCompositeNode(scene: slicer.vtkMRMLScene, sliceNode) -> slicer.vtkMRMLSliceCompositeNode:
    compositeNode = slicer.vtkMRMLSliceLogic.GetSliceCompositeNode(sliceNode)
    if compositeNode is None:
        # Created by the view's vtkMRMLSliceLogic in Slicer, which adopts an existing node of the same layout name.
        compositeNode = slicer.vtkMRMLSliceCompositeNode()
        compositeNode.SetLayoutName(sliceNode.GetLayoutName())
        compositeNode = scene.AddNode(compositeNode)
    return compositeNode


def linkCursors(scene: slicer.vtkMRMLScene) -> slicer.vtkMRMLCrosshairNode:
    """Show the crosshair in every view and make Shift + mouse move jump the other views to it (linked cursors).

    Uses the scene's crosshair node (singleton ``"default"``, created by Slicer at start-up; created here when
    missing, as in plain Python).

    Returns:
        The crosshair node.
    """
    crosshairNode = _crosshairNode(scene)
    wasModifying = crosshairNode.StartModify()
    crosshairNode.SetCrosshairMode(slicer.vtkMRMLCrosshairNode.ShowSmallBasic)
    crosshairNode.SetCrosshairBehavior(slicer.vtkMRMLCrosshairNode.OffsetJumpSlice)
    crosshairNode.EndModify(wasModifying)
    return crosshairNode


def _getOrCreateViewNode(scene: slicer.vtkMRMLScene, className: str, viewName: str, label: str):
    viewNode = scene.GetSingletonNode(viewName, className)
    if viewNode is None:  # created by vtkMRMLLayoutLogic from the description when it is attached
        viewNode = scene.CreateNodeByClass(className)
        viewNode.UnRegister(None)
        viewNode.SetName(viewName)
        viewNode.SetLayoutName(viewName)
        viewNode.SetSingletonTag(viewName)
        viewNode.SetLayoutLabel(label)
        viewNode = scene.AddNode(viewNode)
    return viewNode


def registerCompareLayouts(scene: slicer.vtkMRMLScene) -> slicer.vtkMRMLLayoutNode:
    """Register the compare layouts (:data:`COMPARE_LAYOUT_IDS`: with or without the analysis row and the
    uncertainty column) in the scene's layout node, replacing older descriptions. The module calls it when Slicer
    starts; calling it again is harmless.

    Layout descriptions live in the (singleton) layout node, which survives closing the scene, and are not written to
    scene files: registering them at start-up is what lets a saved scene reopen in the compare layout.

    Args:
        scene: the MRML scene (its layout node is created when missing, as in plain Python).

    Returns:
        The layout node.
    """
    layoutNode = getOrCreateLayoutNode(scene)
    for (withAnalysis, withUncertainty), layoutId in COMPARE_LAYOUT_IDS.items():
        description = compareLayoutDescription(withAnalysis, withUncertainty)
        if not layoutNode.IsLayoutDescription(layoutId):
            layoutNode.AddLayoutDescription(layoutId, description)
        elif layoutNode.GetLayoutDescription(layoutId) != description:
            layoutNode.SetLayoutDescription(layoutId, description)
    return layoutNode


def _crosshairNode(scene: slicer.vtkMRMLScene) -> slicer.vtkMRMLCrosshairNode:
    crosshairNode = scene.GetSingletonNode("default", "vtkMRMLCrosshairNode")
    if crosshairNode is None:
        crosshairNode = scene.GetFirstNodeByClass("vtkMRMLCrosshairNode")
    if crosshairNode is None:  # created by Slicer at start-up; here for plain Python
        crosshairNode = slicer.vtkMRMLCrosshairNode()
        crosshairNode.SetSingletonTag("default")
        crosshairNode.SetName("Crosshair")
        crosshairNode = scene.AddNode(crosshairNode)
    return crosshairNode


def rememberPreviousViews(scene: slicer.vtkMRMLScene) -> bool:
    """Keep the current view arrangement and crosshair mode/behaviour in the layout node's attributes
    (:data:`PREVIOUS_VIEWS_ATTRIBUTES`), unless a compare layout is already shown or something is already kept (so
    a second translation does not replace the user's own layout with the first compare layout).

    Returns:
        ``True`` when the current views were remembered.
    """
    layoutNode = getOrCreateLayoutNode(scene)
    if hasPreviousViews(scene) or layoutNode.GetViewArrangement() in COMPARE_LAYOUT_IDS.values():
        return False
    crosshairNode = _crosshairNode(scene)
    values = (layoutNode.GetViewArrangement(), crosshairNode.GetCrosshairMode(), crosshairNode.GetCrosshairBehavior())
    for attribute, value in zip(PREVIOUS_VIEWS_ATTRIBUTES, values):
        layoutNode.SetAttribute(attribute, str(int(value)))
    return True


def hasPreviousViews(scene: slicer.vtkMRMLScene) -> bool:
    """Whether views from before the compare layout are kept (:func:`restorePreviousViews` can bring them back)."""
    layoutNode = scene.GetSingletonNode("vtkMRMLLayoutNode", "vtkMRMLLayoutNode") or scene.GetFirstNodeByClass(
        "vtkMRMLLayoutNode")
    return layoutNode is not None and bool(layoutNode.GetAttribute(PREVIOUS_VIEWS_ATTRIBUTES[0]))


def restorePreviousViews(scene: slicer.vtkMRMLScene) -> bool:
    """Bring back the view arrangement and crosshair mode/behaviour from before the compare layout, and forget them.

    Returns:
        ``True`` when something was restored, ``False`` when nothing was kept.
    """
    if not hasPreviousViews(scene):
        return False
    layoutNode = getOrCreateLayoutNode(scene)
    values = []
    for attribute in PREVIOUS_VIEWS_ATTRIBUTES:
        try:
            values.append(int(layoutNode.GetAttribute(attribute) or ""))
        except ValueError:
            values.append(None)
        layoutNode.RemoveAttribute(attribute)
    arrangement, mode, behavior = values
    crosshairNode = _crosshairNode(scene)
    wasModifying = crosshairNode.StartModify()
    if mode is not None:
        crosshairNode.SetCrosshairMode(mode)
    if behavior is not None:
        crosshairNode.SetCrosshairBehavior(behavior)
    crosshairNode.EndModify(wasModifying)
    if arrangement is not None:
        layoutNode.SetViewArrangement(arrangement)
    return True


def fitSliceToVolume(sliceNode: slicer.vtkMRMLSliceNode, volumeNode: slicer.vtkMRMLVolumeNode) -> None:
    """Centre a slice view on a volume and set its field of view to the volume's extent in the view's plane, at the
    view's aspect ratio (what Slicer's "fit to window" does, from MRML alone).

    The extent is that of the volume's voxel corners (IJK -0.5 .. N-0.5) mapped to RAS and projected on the slice
    axes; a parent transform is not applied.

    Args:
        sliceNode: the view's slice node (its orientation already set).
        volumeNode: a volume with image data.
    """
    imageData = volumeNode.GetImageData()
    if imageData is None:
        return
    ijkToRAS = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(ijkToRAS)
    toRAS = slicer.util.arrayFromVTKMatrix(ijkToRAS)
    dims = imageData.GetDimensions()
    corners = np.array([[i, j, k, 1.0] for i in (-0.5, dims[0] - 0.5) for j in (-0.5, dims[1] - 0.5)
                        for k in (-0.5, dims[2] - 0.5)])
    ras = (toRAS @ corners.T)[:3]  # (3, 8)
    rotation = slicer.util.arrayFromVTKMatrix(sliceNode.GetSliceToRAS())[:3, :3]
    inSlice = rotation.T @ ras  # slice x, y, z of each corner
    extent = inSlice.max(axis=1) - inSlice.min(axis=1)
    width, height = (max(1, int(d)) for d in sliceNode.GetDimensions()[:2])
    fovX, fovY = max(float(extent[0]), 1e-3), max(float(extent[1]), 1e-3)
    if fovX / fovY > width / height:
        fovY = fovX * height / width
    else:
        fovX = fovY * width / height
    sliceNode.SetFieldOfView(fovX, fovY, sliceNode.GetFieldOfView()[2])
    center = ras.mean(axis=1)
    sliceNode.JumpSliceByCentering(float(center[0]), float(center[1]), float(center[2]))


def setupCompareLayout(
    scene: slicer.vtkMRMLScene,
    volumeNodes: Sequence[slicer.vtkMRMLVolumeNode | None],
    layoutId: int | None = None,
    activate: bool = True,
    plotChartNode: slicer.vtkMRMLPlotChartNode | None = None,
    tableNode: slicer.vtkMRMLTableNode | None = None,
) -> int:
    """Register the compare layout, show it, put each volume in its column and link the cursors.

    Args:
        scene: the MRML scene.
        volumeNodes: four volume nodes (or ``None`` for an empty column) in the order of :data:`COMPARE_COLUMNS`:
            input CT, synthetic MR, round-trip CT, error map; and optionally a fifth, the uncertainty map (a fifth
            column, :data:`UNCERTAINTY_COLUMN`, when it is not ``None``).
        layoutId: ID under which the layout description is registered (replaced if it exists); ``None`` means
            the registered one (:func:`compareLayoutId`: with the analysis row for a plot chart or table, with the
            uncertainty column for an uncertainty map).
        activate: make it the layout node's view arrangement (the previous arrangement and crosshair are kept for
            :func:`restorePreviousViews`).
        plotChartNode: histogram chart shown in the analysis row's plot view.
        tableNode: metrics table shown in the analysis row's table view.

    Returns:
        The layout ID.

    Raises:
        ValueError: ``volumeNodes`` does not hold four or five entries.
    """
    if len(volumeNodes) not in (len(COMPARE_COLUMNS), len(COMPARE_COLUMNS) + 1):
        raise ValueError(f"Expected {len(COMPARE_COLUMNS)} volume nodes ({', '.join(COMPARE_COLUMNS)}), or a fifth "
                         f"({UNCERTAINTY_COLUMN}), got {len(volumeNodes)}.")
    volumeNodes = list(volumeNodes)
    withUncertainty = len(volumeNodes) > len(COMPARE_COLUMNS) and volumeNodes[-1] is not None
    if not withUncertainty:
        volumeNodes = volumeNodes[:len(COMPARE_COLUMNS)]
    withAnalysis = plotChartNode is not None or tableNode is not None
    if layoutId is None:
        layoutId = compareLayoutId(withAnalysis, withUncertainty)
    layoutNode = registerCompareLayouts(scene)
    if layoutId not in COMPARE_LAYOUT_IDS.values():
        description = compareLayoutDescription(withAnalysis, withUncertainty)
        if layoutNode.IsLayoutDescription(layoutId):
            layoutNode.SetLayoutDescription(layoutId, description)
        else:
            layoutNode.AddLayoutDescription(layoutId, description)
    if activate:
        rememberPreviousViews(scene)
        layoutNode.SetViewArrangement(layoutId)

    for orientation, color in COMPARE_ORIENTATIONS:
        for column, volumeNode in zip(_columns(withUncertainty), volumeNodes):  # lengths checked above
            viewName = compareViewName(column, orientation)
            label = f"{_COLUMN_LABELS[column]}-{orientation[0]}"
            sliceNode = _getOrCreateSliceNode(scene, viewName, orientation, color, label)
            compositeNode = _getOrCreateSliceCompositeNode(scene, sliceNode)
            wasModifying = compositeNode.StartModify()
            compositeNode.SetBackgroundVolumeID(volumeNode.GetID() if volumeNode is not None else None)
            compositeNode.SetForegroundVolumeID(None)
            compositeNode.SetLabelVolumeID(None)
            compositeNode.SetLinkedControl(True)
            compositeNode.EndModify(wasModifying)
            if volumeNode is not None:
                fitSliceToVolume(sliceNode, volumeNode)
    if withAnalysis:
        plotView = _getOrCreateViewNode(scene, "vtkMRMLPlotViewNode", PLOT_VIEW_NAME, "H")
        plotView.SetPlotChartNodeID(plotChartNode.GetID() if plotChartNode is not None else None)
        tableView = _getOrCreateViewNode(scene, "vtkMRMLTableViewNode", TABLE_VIEW_NAME, "M")
        tableView.SetTableNodeID(tableNode.GetID() if tableNode is not None else None)
    linkCursors(scene)
    return layoutId
