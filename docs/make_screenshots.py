"""Render the README's screenshots offscreen, without Slicer's GUI: the compare layout and the histogram plot.

The pictures come from the module's own code on a real MRML scene (``slicer-core`` wheel): the Logic translates a
real CT with the real engine (default model) and sets up the compare layout, the histogram chart and the metrics
table exactly as in Slicer; each of the twelve compare views is then resliced and coloured by MRML's own
``vtkMRMLSliceLogic`` (the pipeline behind Slicer's slice views: window/level, colour tables), the linked cursor is
drawn at the same RAS point in every view, and VTK renders the tiles offscreen (EGL/OSMesa) to PNG. The histogram
plot is drawn by VTK's ``vtkChartXY`` from the histogram table node.

Usage (from the repository root, ~1-2 minutes on a CPU)::

    .venv/bin/python docs/make_screenshots.py                  # the shared chest CT (held out) and cardiac MR
    .venv/bin/python docs/make_screenshots.py --ct my_ct.nii.gz --reference-mr my_mr.nii.gz --device cuda

Writes ``docs/compare_layout.png`` (with the uncertainty column unless ``--uncertainty none``) and
``docs/histogram_plot.png``. Nothing is written into the repository but the
two pictures (medical images stay where they are).
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "CT2MRTranslation"))

import slicer  # noqa: E402
import vtk  # noqa: E402
from vtk.util.numpy_support import numpy_to_vtk, vtk_to_numpy  # noqa: E402

from CT2MRTranslationLib import views  # noqa: E402
from CT2MRTranslationLib.logic import CT2MRTranslationLogic  # noqa: E402

DATA = REPO.parent / "shared" / "data"
COLUMN_TITLES = {"CT": "CT x (HU)", "SyntheticMR": "synthetic MR G(x)", "RoundTripCT": "round trip F(G(x)) (HU)",
                 "ErrorMap": "error map abs(F(G(x)) - x) (HU)", "Uncertainty": "uncertainty (TTA std of G(x))"}


def makeScene(home: Path):
    """A scene with the logics Slicer attaches at start-up (application, colours, volumes, layout)."""
    scene = slicer.vtkMRMLScene()
    slicer.mrmlScene = scene
    appLogic = slicer.vtkMRMLApplicationLogic()
    (home / "share" / "ColorFiles").mkdir(parents=True, exist_ok=True)
    appLogic.SetHomeDirectory(str(home))
    appLogic.SetShareDirectory("share")
    appLogic.SetMRMLScene(scene)
    colorLogic = slicer.vtkSlicerColorLogic()
    colorLogic.SetMRMLApplicationLogic(appLogic)
    colorLogic.SetMRMLScene(scene)
    appLogic.SetColorLogic(colorLogic)
    appLogic.SetModuleLogic("Colors", colorLogic)  # the volumes logic gives new volumes a colour table through it
    volumesLogic = slicer.vtkSlicerVolumesLogic()
    volumesLogic.SetMRMLApplicationLogic(appLogic)
    volumesLogic.SetMRMLScene(scene)
    appLogic.SetModuleLogic("Volumes", volumesLogic)
    layoutLogic = slicer.vtkMRMLLayoutLogic()
    layoutLogic.SetMRMLApplicationLogic(appLogic)
    layoutLogic.SetMRMLScene(scene)
    return scene, appLogic, volumesLogic, (colorLogic, layoutLogic)


def rasToXY(sliceNode, ras) -> tuple[float, float]:
    """Pixel position of a RAS point in a slice view (inverse of the slice node's XY-to-RAS matrix)."""
    matrix = vtk.vtkMatrix4x4()
    vtk.vtkMatrix4x4.Invert(sliceNode.GetXYToRAS(), matrix)
    x, y, _, _ = matrix.MultiplyPoint([*ras, 1.0])
    return x, y


def renderSliceView(scene, appLogic, sliceNode, size: tuple[int, int], cursorRAS) -> np.ndarray:
    """What Slicer's slice view of ``sliceNode`` shows: an (H, W, 3) uint8 image with the small crosshair."""
    width, height = size
    sliceNode.SetDimensions(width, height, 1)
    sliceLogic = slicer.vtkMRMLSliceLogic()
    sliceLogic.SetMRMLApplicationLogic(appLogic)
    sliceLogic.SetMRMLScene(scene)
    sliceLogic.SetSliceNode(sliceNode)
    sliceLogic.FitSliceToAll()
    sliceNode.JumpSliceByOffsetting(*cursorRAS)  # linked cursor: every view passes through the same point
    sliceLogic.UpdatePipeline()
    sliceLogic.UpdateImageData()
    blend = sliceLogic.GetBlend()
    blend.Update()
    image = blend.GetOutput()
    w, h, _ = image.GetDimensions()
    rgba = vtk_to_numpy(image.GetPointData().GetScalars()).reshape(h, w, -1)
    rgb = rgba[..., :3].copy()  # rows bottom-up (VTK)
    rgb[h - 22:, :52] = (0.35 * rgb[h - 22:, :52]).astype(np.uint8)  # darker corner behind the view label
    x, y = (int(round(v)) for v in rasToXY(sliceNode, cursorRAS))
    yellow = np.array([255, 230, 60], np.uint8)
    for d in range(4, 12):  # Slicer's "small basic" crosshair: four short arms with a gap
        for px, py in ((x + d, y), (x - d, y), (x, y + d), (x, y - d)):
            if 0 <= px < w and 0 <= py < h:
                rgb[py, px] = yellow
    return rgb


def text(renderer, value: str, x: float, y: float, size: int, color=(1, 1, 1), bold=False, right=False):
    actor = vtk.vtkTextActor()
    actor.SetInput(value)
    prop = actor.GetTextProperty()
    prop.SetFontSize(size)
    prop.SetColor(*color)
    prop.SetBold(bold)
    prop.SetJustificationToRight() if right else prop.SetJustificationToLeft()
    actor.SetDisplayPosition(int(x), int(y))
    renderer.AddViewProp(actor)


def writePNG(renderWindow, path: Path) -> None:
    renderWindow.Render()
    grab = vtk.vtkWindowToImageFilter()
    grab.SetInput(renderWindow)
    grab.ReadFrontBufferOff()
    grab.Update()
    writer = vtk.vtkPNGWriter()
    writer.SetCompressionLevel(9)
    writer.SetFileName(str(path))
    writer.SetInputConnection(grab.GetOutputPort())
    writer.Write()


def renderCompareLayout(scene, appLogic, cursorRAS, path: Path, tile=(270, 230), header=34,
                        withUncertainty: bool = False) -> None:
    """The compare layout (axial, coronal, sagittal rows; 4 columns, 5 with the uncertainty map) as one PNG."""
    width, height = tile
    columns = (*views.COMPARE_COLUMNS, views.UNCERTAINTY_COLUMN) if withUncertainty else views.COMPARE_COLUMNS
    rows = []
    for orientation, _ in views.COMPARE_ORIENTATIONS:
        row = [renderSliceView(scene, appLogic, scene.GetSingletonNode(views.compareViewName(column, orientation),
                                                                        "vtkMRMLSliceNode"), tile, cursorRAS)
               for column in columns]
        rows.append(np.concatenate(row, axis=1))
    gap = np.full((2, rows[0].shape[1], 3), 40, np.uint8)
    body = np.concatenate([rows[2], gap, rows[1], gap, rows[0]], axis=0)  # bottom-up: sagittal row at the bottom
    canvas = np.concatenate([body, np.full((header, body.shape[1], 3), 25, np.uint8)], axis=0)
    for c in range(1, len(columns)):  # thin separators between columns
        canvas[:, c * width - 1: c * width + 1] = 40

    imageData = vtk.vtkImageData()
    imageData.SetDimensions(canvas.shape[1], canvas.shape[0], 1)
    imageData.GetPointData().SetScalars(numpy_to_vtk(canvas.reshape(-1, 3), deep=True,
                                                     array_type=vtk.VTK_UNSIGNED_CHAR))
    renderWindow = vtk.vtkRenderWindow()
    renderWindow.SetOffScreenRendering(1)
    renderWindow.SetSize(canvas.shape[1], canvas.shape[0])
    renderer = vtk.vtkRenderer()
    renderWindow.AddRenderer(renderer)
    actor = vtk.vtkImageActor()
    actor.SetInputData(imageData)
    renderer.AddViewProp(actor)
    camera = renderer.GetActiveCamera()
    camera.ParallelProjectionOn()
    cx, cy = (canvas.shape[1] - 1) / 2.0, (canvas.shape[0] - 1) / 2.0
    camera.SetFocalPoint(cx, cy, 0.0)
    camera.SetPosition(cx, cy, 1000.0)
    camera.SetParallelScale(canvas.shape[0] / 2.0)
    for c, column in enumerate(columns):
        text(renderer, COLUMN_TITLES[column], c * width + 8, body.shape[0] + 9, 15, bold=True)
    labels = {"CT": "CT", "SyntheticMR": "MR", "RoundTripCT": "RT", "ErrorMap": "Err", "Uncertainty": "Unc"}
    for r, (orientation, color) in enumerate(views.COMPARE_ORIENTATIONS):
        rgb = tuple(int(color[i: i + 2], 16) / 255.0 for i in (1, 3, 5))
        top = body.shape[0] - r * (height + 2)
        for c, column in enumerate(columns):
            text(renderer, f"{labels[column]}-{orientation[0]}", c * width + 6, top - 18, 13, rgb, bold=True)
    writePNG(renderWindow, path)


def renderHistogram(analysis, path: Path, size=(900, 420)) -> None:
    """The histogram plot (synthetic MR vs reference MR) and the metrics, drawn by VTK's chart from the table node."""
    from vtkmodules.vtkChartsCore import vtkChart, vtkChartXY
    from vtkmodules.vtkViewsContext2D import vtkContextView

    table = analysis.histogramTable.GetTable()
    view = vtkContextView()
    view.GetRenderWindow().SetOffScreenRendering(1)
    view.GetRenderWindow().SetSize(*size)
    view.GetRenderer().SetBackground(1.0, 1.0, 1.0)
    chart = vtkChartXY()
    view.GetScene().AddItem(chart)
    chart.SetShowLegend(True)
    chart.SetTitle(analysis.chart.GetTitle())
    chart.GetTitleProperties().SetFontSize(16)
    chart.GetAxis(0).SetTitle(analysis.chart.GetYAxisTitle())
    chart.GetAxis(1).SetTitle(analysis.chart.GetXAxisTitle())
    for series in analysis.series:
        line = chart.AddPlot(vtkChart.LINE)
        line.SetInputData(table, series.GetXColumnName(), series.GetYColumnName())
        r, g, b = series.GetColor()
        line.SetColor(int(255 * r), int(255 * g), int(255 * b), 255)
        line.SetWidth(2.5)
        line.SetLabel(series.GetYColumnName())
    metrics = analysis.metrics
    if metrics:
        lines = [f"SSIM_cyc {metrics['SSIM_cyc']:.3f}   PSNR_cyc {metrics['PSNR_cyc']:.1f} dB   "
                 f"MAE_cyc {metrics['MAE_cyc (HU)']:.0f} HU"]
        if not math.isnan(metrics.get("W1", float("nan"))):
            lines.append(f"W1 (synthetic vs reference MR) {metrics['W1']:.3f}")
        renderer = view.GetRenderer()
        for i, line in enumerate(lines):
            text(renderer, line, size[0] // 3, size[1] - 120 - 20 * i, 14, (0.1, 0.1, 0.1))
    writePNG(view.GetRenderWindow(), path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ct", default=str(DATA / "ct" / "chest_ct_lung2.nrrd"),
                        help="CT (HU); default: the shared chest CT that the default model never saw")
    parser.add_argument("--reference-mr", default=str(DATA / "mr" / "cardiac_cine_sax_phase01.nii.gz"),
                        help="real MR for the histogram")
    parser.add_argument("--model", help="ct2mr checkpoint (default: the bundled default model)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--outputs", help="reuse the outputs of an earlier `ct2mr translate CT -o DIR` of the same CT "
                        "(no new translation)")
    parser.add_argument("--uncertainty", choices=("tta", "none"), default="tta", help="tta (default): translate with "
                        "the uncertainty map and render its fifth column (4 extra passes of G); none: four columns")
    parser.add_argument("--out", default=str(REPO / "docs"), help="folder of the PNG files")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory(prefix="ct2mr-screenshots-") as temporary:
        scene, appLogic, volumesLogic, _keep = makeScene(Path(temporary))
        ctNode = volumesLogic.AddArchetypeVolume(args.ct, "Chest CT")
        referenceNode = volumesLogic.AddArchetypeVolume(args.reference_mr, "Cardiac MR")
        logic = CT2MRTranslationLogic()
        logic.temporaryDirectory = temporary
        factory = None
        if args.outputs:  # a stand-in process that reports the earlier outputs, as the engine's 'done' event would
            from CT2MRTranslationLib.runner import TranslationProcess

            outputs = {key: str(Path(args.outputs) / f"{key}.nii.gz")
                       for key in ("synthetic_mr", "roundtrip_ct", "error_map", "uncertainty")
                       if args.uncertainty != "none" or key != "uncertainty"}
            analysis = Path(args.outputs) / "analysis.json"  # from an earlier `ct2mr translate --analysis`
            code = (f"import json, pathlib; a = pathlib.Path({str(analysis)!r}); print(json.dumps({{'event': 'done', "
                    f"'outputs': {outputs!r}, 'device': 'reused', 'analysis': json.loads(a.read_text()) if a.exists() "
                    "else None}))")
            factory = lambda engineArgs: TranslationProcess([sys.executable, "-c", code])  # noqa: E731
        start = time.monotonic()
        result = logic.translate(ctNode, modelPath=args.model, device=args.device, analysis=True,
                                 uncertainty=args.uncertainty,
                                 referenceMRNode=referenceNode, processFactory=factory,
                                 progressCallback=lambda f, m: print(f"\r{100 * f:5.1f}% {m[:60]:<60}", end=""))
        print(f"\ntranslated in {time.monotonic() - start:.0f} s on {result.device}; metrics: "
              + ", ".join(f"{k} {v:.3g}" for k, v in result.analysis.metrics.items()))
        bounds = [0.0] * 6
        ctNode.GetRASBounds(bounds)
        # linked cursor a little off-centre (through the hilum in the shared chest CT)
        cursor = [bounds[0] + 0.55 * (bounds[1] - bounds[0]), bounds[2] + 0.5 * (bounds[3] - bounds[2]),
                  bounds[4] + 0.5 * (bounds[5] - bounds[4])]
        renderCompareLayout(scene, appLogic, cursor, out / "compare_layout.png",
                            withUncertainty=args.uncertainty != "none")
        renderHistogram(result.analysis, out / "histogram_plot.png")
        scene.Clear(False)
    for name in ("compare_layout.png", "histogram_plot.png"):
        print(f"wrote {out / name} ({(out / name).stat().st_size / 1024:.0f} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
