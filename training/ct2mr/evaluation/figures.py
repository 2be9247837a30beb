"""Quality-control figures of the preprocessing (thesis Appendix B, figures 12-17), written as PNG with matplotlib.

* :func:`plot_triplanar`: raw vs preprocessed axial / coronal / sagittal views (figures 12 and 15).
* :func:`plot_raw_histograms`: log-frequency histograms of the raw intensities with the clipping bounds
  (figures 14 and 16).
* :func:`plot_preprocessed_histogram`: log-frequency histogram after normalisation to [-1, 1] with the clipping bounds
  and the share of clipped voxels (figures 13 and 17).

Evaluation figures (``ct2mr evaluate`` and ``ct2mr compare``, thesis section 7):

* :func:`plot_triplanar_panels`: columns of tri-planar views, e.g. CT | synthetic MR | real MR reference (figures 5
  and 10), CT | round trip | absolute error map (figure 6), or several models side by side.
* :func:`plot_histogram_overlay`: intensity densities of synthetic (orange) vs real (blue) volumes (figures 8, 11).

Views follow the radiological convention: the patient's right on the viewer's left, anterior up in axial views,
superior up in coronal and sagittal views. Volumes are NumPy (z, y, x) arrays on a RAS grid (x towards the patient's
right, y anterior, z superior). matplotlib's non-interactive Agg backend is used; nothing is shown on screen.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = ["triplanar_slices", "plot_triplanar", "plot_raw_histograms", "plot_preprocessed_histogram",
           "Panel", "plot_triplanar_panels", "plot_histogram_overlay", "plot_translation_overview"]


#: One column of :func:`plot_triplanar_panels`: ``(label, slices, (vmin, vmax), colormap)`` with ``slices`` as
#: :func:`triplanar_slices` returns them.
Panel = tuple  # (str, list[tuple[str, np.ndarray, float]], tuple[float, float], str)


def _pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | os.PathLike) -> Path:
    """Lay out, write as PNG (80 dpi) and close a matplotlib figure; return the path."""
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=80)
    _pyplot().close(fig)
    return path


def triplanar_slices(volume: np.ndarray, spacing_zyx: Sequence[float] = (1.0, 1.0, 1.0),
                     centre: Sequence[int] | None = None) -> list[tuple[str, np.ndarray, float]]:
    """The central axial, coronal and sagittal slices of a RAS volume, oriented for display.

    Args:
        volume: (z, y, x) array on a RAS grid.
        spacing_zyx: voxel spacing in mm, (z, y, x), for the display aspect ratios.
        centre: (z, y, x) voxel where the three planes cross; default the volume's centre.

    Returns:
        ``[(plane, 2D image, aspect), ...]`` for ``"axial"``, ``"coronal"``, ``"sagittal"``; each image is ready for
        ``imshow`` (row 0 at the top) and ``aspect`` is the row/column spacing ratio.
    """
    z, y, x = (int(c) for c in (centre if centre is not None else [n // 2 for n in volume.shape]))
    sz, sy, sx = (float(s) for s in spacing_zyx)
    axial = volume[z][::-1, ::-1]          # rows: anterior -> posterior; columns: patient right -> left
    coronal = volume[:, y, :][::-1, ::-1]  # rows: superior -> inferior; columns: patient right -> left
    sagittal = volume[:, :, x][::-1, ::-1]  # rows: superior -> inferior; columns: anterior -> posterior
    return [("axial", axial, sy / sx), ("coronal", coronal, sz / sx), ("sagittal", sagittal, sz / sy)]


def plot_triplanar(path: str | os.PathLike, preprocessed: np.ndarray, raw: np.ndarray | None = None,
                   raw_spacing_zyx: Sequence[float] = (1.0, 1.0, 1.0), title: str = "",
                   raw_label: str = "raw", note: str = "") -> Path:
    """Write the raw vs preprocessed tri-planar figure (thesis figures 12 and 15).

    Args:
        path: destination PNG.
        preprocessed: (z, y, x) volume in [-1, 1] on the 1 mm RAS grid (padding removed).
        raw: the raw (z, y, x) volume reoriented to RAS, in input units (HU for CT), or ``None`` when the source is
            not reachable (only the preprocessed row is drawn).
        raw_spacing_zyx: spacing of ``raw`` in mm, (z, y, x).
        title: figure title.
        raw_label: label of the raw row (e.g. ``"raw (HU)"``).
        note: a line under the title (e.g. why the raw row is missing).

    Returns:
        The PNG path.
    """
    plt = _pyplot()
    rows = [("preprocessed [-1, 1]", preprocessed, (1.0, 1.0, 1.0), (-1.0, 1.0))]
    if raw is not None:
        lo, hi = (float(v) for v in np.percentile(raw, [0.5, 99.5]))
        rows.insert(0, (raw_label, raw, raw_spacing_zyx, (lo, hi if hi > lo else lo + 1.0)))
    fig, axes = plt.subplots(len(rows), 3, figsize=(12, 4.2 * len(rows)), squeeze=False)
    for r, (label, volume, spacing, (vmin, vmax)) in enumerate(rows):
        for c, (plane, image, aspect) in enumerate(triplanar_slices(volume, spacing)):
            ax = axes[r, c]
            ax.imshow(image, cmap="gray", vmin=vmin, vmax=vmax, aspect=aspect, interpolation="nearest")
            ax.set_title(f"{label}: {plane}", fontsize=10)
            ax.set_xticks([])
            ax.set_yticks([])
            if plane in ("axial", "coronal"):
                ax.text(0.01, 0.5, "R", transform=ax.transAxes, color="yellow", fontsize=9, va="center")
                ax.text(0.97, 0.5, "L", transform=ax.transAxes, color="yellow", fontsize=9, va="center")
    fig.suptitle(title + (f"\n{note}" if note else ""), fontsize=11)
    return _save(fig, path)


def plot_raw_histograms(path: str | os.PathLike, histograms: Sequence[tuple[str, Sequence[int], Sequence[float],
                                                                            Sequence[float]]],
                        unit: str, title: str = "", window: Sequence[float] | None = None) -> Path:
    """Write log-frequency histograms of raw intensities, one line per volume, with the clipping bounds.

    Thesis figures 14 (MR: per-volume P1 and P99 as dashed lines in the volume's colour) and 16 (CT: the HU window
    as solid red lines).

    Args:
        path: destination PNG.
        histograms: ``(name, counts, edges, (low, high) clipping bounds)`` per volume, raw input units.
        unit: intensity unit for the x label (e.g. ``"HU"``, ``"a.u."``).
        title: figure title.
        window: a common clipping window drawn once in red (CT); ``None`` draws each volume's bounds (MR).

    Returns:
        The PNG path.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, counts, edges, bounds) in enumerate(histograms):
        colour = colours[i % len(colours)]
        counts = np.asarray(counts, float)
        ax.stairs(np.where(counts > 0, counts, np.nan), np.asarray(edges, float), color=colour, label=name,
                  linewidth=1.2)
        if window is None:
            for b in bounds:
                ax.axvline(float(b), color=colour, linestyle="--", linewidth=0.9)
    if window is not None:
        for b in window:
            ax.axvline(float(b), color="red", linewidth=1.2)
        ax.text(0.99, 0.97, f"clipping window [{window[0]:g}, {window[1]:g}] {unit}", transform=ax.transAxes,
                ha="right", va="top", color="red", fontsize=9)
    else:
        ax.text(0.99, 0.97, "dashed: per-volume clipping bounds", transform=ax.transAxes, ha="right", va="top",
                fontsize=9)
    ax.set_yscale("log")
    ax.set_xlabel(f"raw intensity ({unit})")
    ax.set_ylabel("voxels (log scale)")
    ax.set_title(title, fontsize=11)
    if len(histograms) <= 12:
        ax.legend(fontsize=7, loc="upper left")
    return _save(fig, path)


def plot_preprocessed_histogram(path: str | os.PathLike, counts: Sequence[int], edges: Sequence[float],
                                bounds_label: tuple[str, str] = ("-1", "1"), clipped_percent: float | None = None,
                                title: str = "") -> Path:
    """Write the log-frequency histogram of normalised intensities with the clipping bounds at -1 and 1.

    Thesis figures 13 (MR, bounds P1 and P99) and 17 (CT, bounds -600 and 1000 HU, with the share of clipped voxels).

    Args:
        path: destination PNG.
        counts: voxel counts per bin (padding excluded), summed over the volumes.
        edges: bin edges in [-1, 1].
        bounds_label: labels of the lower and upper bound in input units (e.g. ``("-600 HU", "1000 HU")``).
        clipped_percent: percentage of voxels clipped, written on the figure.
        title: figure title.

    Returns:
        The PNG path.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 5))
    counts = np.asarray(counts, float)
    ax.stairs(np.where(counts > 0, counts, np.nan), np.asarray(edges, float), fill=True, alpha=0.6,
              color="tab:blue")
    for value, label in zip((-1.0, 1.0), bounds_label):
        ax.axvline(value, color="red", linewidth=1.2)
        ax.text(value, 1.0, f" {label}", transform=ax.get_xaxis_transform(), color="red", fontsize=9,
                ha="left" if value < 0 else "right", va="bottom")
    if clipped_percent is not None:
        ax.text(0.5, 0.97, f"{clipped_percent:.1f}% of voxels clipped", transform=ax.transAxes, ha="center",
                va="top", fontsize=10)
    ax.set_yscale("log")
    ax.set_xlim(-1.1, 1.1)
    ax.set_xlabel("normalised intensity")
    ax.set_ylabel("voxels (log scale)")
    ax.set_title(title, fontsize=11, pad=16)
    return _save(fig, path)


# --- Evaluation figures (thesis section 7: figures 5, 6, 8, 10, 11) -------------------------------------------------

def plot_triplanar_panels(path: str | os.PathLike, panels: Sequence[Panel], title: str = "", note: str = "",
                          colorbar: bool = True) -> Path:
    """Write a grid of tri-planar views: one column per panel, rows axial / coronal / sagittal.

    Thesis figures 5 and 10 (CT | synthetic MR | ... | real MR reference) and 6 (CT | round trip F(G(x)) | absolute
    error map), and the side-by-side comparison of ``ct2mr compare``.

    Args:
        path: destination PNG.
        panels: ``(label, slices, (vmin, vmax), colormap)`` per column; ``slices`` is
            :func:`triplanar_slices` of a (z, y, x) RAS volume (radiological display: patient right on the left).
        title: figure title.
        note: a smaller line under the title (e.g. units, what the reference MR is).
        colorbar: draw a colour bar under each column.

    Returns:
        The PNG path.

    Raises:
        ValueError: no panels.
    """
    if not panels:
        raise ValueError("plot_triplanar_panels needs at least one panel.")
    plt = _pyplot()
    n = len(panels)
    fig, axes = plt.subplots(3, n, figsize=(3.2 * n, 9.6), squeeze=False)
    for c, (label, slices, (vmin, vmax), cmap) in enumerate(panels):
        for r, (plane, image, aspect) in enumerate(slices):
            ax = axes[r, c]
            shown = ax.imshow(image, cmap=cmap, vmin=vmin, vmax=vmax, aspect=aspect, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(label, fontsize=10)
            if c == 0:
                ax.set_ylabel(plane, fontsize=10)
            if plane in ("axial", "coronal"):
                ax.text(0.01, 0.5, "R", transform=ax.transAxes, color="yellow", fontsize=8, va="center")
                ax.text(0.95, 0.5, "L", transform=ax.transAxes, color="yellow", fontsize=8, va="center")
            if colorbar and r == 2:
                fig.colorbar(shown, ax=ax, orientation="horizontal", fraction=0.05, pad=0.04)
    fig.suptitle(title + (f"\n{note}" if note else ""), fontsize=11)
    return _save(fig, path)


def plot_histogram_overlay(path: str | os.PathLike, edges: Sequence[float], real: tuple[str, Sequence[float]],
                           synthetic: Sequence[tuple[str, Sequence[float]]], title: str = "",
                           xlabel: str = "normalised MR intensity [-1, 1]", note: str = "") -> Path:
    """Write intensity histograms of synthetic vs real volumes as densities (thesis figures 8 and 11).

    The real distribution is drawn in blue and filled, the first synthetic one in orange (the thesis's colours),
    further ones (harmonised variants, other models) in the next colours of the cycle.

    Args:
        path: destination PNG.
        edges: bin edges (``len(counts) + 1`` values).
        real: ``(label, counts)`` of the real target domain (e.g. real MR inside the body masks).
        synthetic: ``(label, counts)`` per synthetic distribution.
        title: figure title.
        xlabel: x-axis label with units.
        note: a line written in the upper right corner (e.g. the W1 distances).

    Returns:
        The PNG path.
    """
    plt = _pyplot()
    edges = np.asarray(edges, float)
    widths = np.diff(edges)

    def density(counts: Sequence[float]) -> np.ndarray:
        counts = np.asarray(counts, float)
        total = counts.sum()
        return counts / (total * widths) if total > 0 else counts

    fig, ax = plt.subplots(figsize=(9, 5))
    label, counts = real
    ax.stairs(density(counts), edges, fill=True, alpha=0.35, color="tab:blue", label=label)
    ax.stairs(density(counts), edges, color="tab:blue", linewidth=1.0)
    colours = ["tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan"]
    for i, (label, counts) in enumerate(synthetic):
        ax.stairs(density(counts), edges, color=colours[i % len(colours)], linewidth=1.4, label=label)
    if note:
        ax.text(0.99, 0.97, note, transform=ax.transAxes, ha="right", va="top", fontsize=8, family="monospace")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density")
    ax.set_title(title, fontsize=11)
    ax.legend(fontsize=8, loc="upper left")
    return _save(fig, path)


def plot_translation_overview(path: str | os.PathLike, ct, synthetic_mr, roundtrip_ct, error_map,
                              ct_window: Sequence[float] = (-1000.0, 1000.0), title: str = "") -> Path:
    """Tri-planar overview of one translation: CT x, synthetic MR G(x), round trip F(G(x)) and error map.

    What ``ct2mr demo`` writes so that a newcomer sees the result, not only file names. The four images are
    SimpleITK images on the CT's grid (as ``ct2mr translate`` writes them); they are reoriented to RAS for display
    (radiological convention: patient right on the left), with the CT's spacing for the aspect ratios. The planes
    cross at the centre of the body (CT > -500 HU).

    Args:
        path: destination PNG.
        ct, roundtrip_ct: CT and F(G(x)) in HU.
        synthetic_mr: G(x) on the [-1, 1] MR scale.
        error_map: |F(G(x)) - x| in HU.
        ct_window: display window of the CT columns (HU).
        title: figure title.

    Returns:
        The PNG path.
    """
    from ct2mr.preprocessing.pipeline import reorient_to_ras
    import SimpleITK as sitk

    arrays = [sitk.GetArrayFromImage(reorient_to_ras(image)).astype(np.float32)
              for image in (ct, synthetic_mr, roundtrip_ct, error_map)]
    spacing = tuple(reorient_to_ras(ct).GetSpacing()[::-1])
    body = np.argwhere(arrays[0] > -500.0)
    centre = body.mean(0).round().astype(int) if len(body) else None
    hi_error = float(np.percentile(arrays[3][arrays[0] > -500.0], 99)) if len(body) else 200.0
    lo, hi = float(ct_window[0]), float(ct_window[1])
    panels = [("CT x (HU)", triplanar_slices(arrays[0], spacing, centre), (lo, hi), "gray"),
              ("synthetic MR G(x)", triplanar_slices(arrays[1], spacing, centre), (-1.0, 1.0), "gray"),
              ("round trip F(G(x)) (HU)", triplanar_slices(arrays[2], spacing, centre), (lo, hi), "gray"),
              ("error |F(G(x)) - x| (HU)", triplanar_slices(arrays[3], spacing, centre), (0.0, max(hi_error, 1.0)),
               "magma")]
    return plot_triplanar_panels(path, panels, title=title, note="on the CT's own grid; radiological view (R on the "
                                 "left)")
