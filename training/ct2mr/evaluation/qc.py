"""Quality control of preprocessed collections: ``ct2mr qc`` (thesis section 4.3, Table 2; Appendix B, figures 12-17).

From folders of ``ct2mr preprocess`` outputs (CT and MR, in one folder or several) it computes, per modality:

* the thesis's Table 2: clip percentiles, median P1 and P99 (MR, input units), flagged (flat) volumes;
* the percentage of clipped voxels (below / above the CT window or the MR percentiles), from the counts stored at
  preprocessing time, so the raw data are not needed;
* the left-right orientation check of :mod:`ct2mr.preprocessing.orientation` (heart side per volume, per modality majority);

and writes ``table2.csv``, ``table2.md``, ``volumes.csv`` (one row per volume), ``qc_report.md`` (everything) and the
figures: ``<modality>_triplanar.png`` (raw vs preprocessed; the raw row re-reads the source when it is still
reachable and unchanged), ``<modality>_histogram_raw.png`` (from the raw histograms stored at preprocessing time) and
``<modality>_histogram_preprocessed.png``. Histograms and clipped percentages cover the resampled volume without its
padding (full field of view; no body mask).
"""

from __future__ import annotations

import csv
import logging
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from ct2mr.io.preprocessed import source_stamp, is_preprocessed, read_preprocessed
from ct2mr.io.images import HDF5_SUFFIXES, ImageReadError, image_suffix, read_volumes, write_text
from ct2mr.preprocessing.orientation import OrientationReport, SideIndicator, check_orientation, heart_side
from ct2mr.preprocessing.pipeline import MODALITIES, reorient_to_ras

__all__ = ["HISTOGRAM_BINS", "TABLE2_COLUMNS", "VolumeQC", "Table2Row", "QCReport", "find_preprocessed", "measure_volume", "table2",
           "table2_markdown", "run_qc"]

logger = logging.getLogger(__name__)

#: Bins of the histogram of normalised intensities over [-1, 1].
HISTOGRAM_BINS = 100
#: Raw histograms drawn at most per figure (evenly sampled when a collection has more volumes).
MAX_RAW_HISTOGRAMS = 20
#: Modality names in the tables and figures.
_LABELS = {"ct": "CT", "mr": "MRI"}


@dataclass
class VolumeQC:
    """Quality-control figures of one preprocessed volume.

    Attributes:
        name: volume name.
        path: the preprocessed HDF5 file.
        modality: ``"ct"`` or ``"mr"``.
        flat: flagged flat at preprocessing (zeros; skipped by training).
        intensity_range: (low, high) input units mapped to -1 and 1 (CT window in HU, or MR P_low and P_high).
        percentiles: the MR clip percentiles of its configuration, (low, high).
        voxels: voxels of the resampled volume (padding excluded).
        clipped_low: of those, voxels below the low bound.
        clipped_high: voxels above the high bound.
        side: the left-right indicator (:func:`ct2mr.preprocessing.orientation.heart_side`).
        histogram: counts over :data:`HISTOGRAM_BINS` bins of [-1, 1] of the normalised volume (padding excluded).
        raw_histogram: (counts, edges) of the raw input intensities stored at preprocessing time, or ``None``.
        attrs: every attribute of the file.
    """

    name: str
    path: Path
    modality: str
    flat: bool
    intensity_range: tuple[float, float]
    percentiles: tuple[float, float]
    voxels: int
    clipped_low: int
    clipped_high: int
    side: SideIndicator
    histogram: np.ndarray
    raw_histogram: tuple[list[int], list[float]] | None
    attrs: dict[str, Any] = field(repr=False, default_factory=dict)

    @property
    def clipped_percent(self) -> float:
        """Percentage of the volume's voxels that were clipped (both bounds)."""
        return 100.0 * (self.clipped_low + self.clipped_high) / self.voxels if self.voxels else 0.0


@dataclass
class Table2Row:
    """One row of the thesis's Table 2 (per modality), with the clipped-voxel percentages.

    Attributes:
        modality: ``"CT"`` or ``"MRI"``.
        volumes: number of volumes.
        clip_low: MR clip percentile (low), as text (``"—"`` for CT).
        clip_high: MR clip percentile (high), as text.
        median_p_low: median over the non-flat volumes of P_low (input units), ``None`` for CT.
        median_p_high: median of P_high, ``None`` for CT.
        flagged: flat (flagged) volumes.
        clipped_percent: clipped voxels over all voxels of the non-flat volumes, %.
        clipped_low_percent: of which below the low bound, %.
        clipped_high_percent: of which above the high bound, %.
        bounds: the clipping bounds as text (CT window in HU, or the MR percentiles).
    """

    modality: str
    volumes: int
    clip_low: str
    clip_high: str
    median_p_low: float | None
    median_p_high: float | None
    flagged: int
    clipped_percent: float
    clipped_low_percent: float
    clipped_high_percent: float
    bounds: str

    def cells(self) -> list[str]:
        """The row as table cells, in :data:`TABLE2_COLUMNS` order."""
        def fmt(v: float | None) -> str:
            return "—" if v is None else f"{v:.1f}"

        return [self.modality, self.clip_low, self.clip_high, fmt(self.median_p_low), fmt(self.median_p_high),
                f"{self.flagged}/{self.volumes}", f"{self.clipped_percent:.2f}", f"{self.clipped_low_percent:.2f}",
                f"{self.clipped_high_percent:.2f}", self.bounds]


#: Columns of Table 2: the thesis's six, then the clipped-voxel percentages and the bounds.
TABLE2_COLUMNS = ["Modality", "Clip low (%)", "Clip high (%)", "Median P1", "Median P99", "Flagged volumes",
                  "Clipped voxels (%)", "Clipped below (%)", "Clipped above (%)", "Clipping bounds"]


@dataclass
class QCReport:
    """Everything ``ct2mr qc`` computed and wrote.

    Attributes:
        out_dir: the QC folder.
        volumes: per-volume figures.
        rows: Table 2 rows, CT first.
        orientation: the left-right check per modality.
        files: every file written (tables, report, figures).
        markdown: the report's text (also in ``qc_report.md``).
    """

    out_dir: Path
    volumes: list[VolumeQC]
    rows: list[Table2Row]
    orientation: OrientationReport
    files: list[Path]
    markdown: str


def find_preprocessed(dirs: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """The ct2mr preprocessing outputs in folders (not recursive) or given as files.

    Args:
        dirs: folders of ``ct2mr preprocess`` outputs, or output files.

    Returns:
        Sorted paths of the HDF5 files with ``ct2mr_preprocessed`` = 1 (others are ignored with a log message).

    Raises:
        FileNotFoundError: a path does not exist.
        ValueError: no preprocessed volume was found.
    """
    dirs = [dirs] if isinstance(dirs, (str, os.PathLike)) else list(dirs)
    found: list[Path] = []
    for item in dirs:
        path = Path(item)
        if not path.exists():
            raise FileNotFoundError(f"No such file or folder: {path}. Check the path and try again.")
        candidates = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file()
                                                          and image_suffix(p) in HDF5_SUFFIXES)
        for candidate in candidates:
            if is_preprocessed(candidate):
                found.append(candidate)
            else:
                logger.info("%s is not a ct2mr preprocessing output; ignored", candidate)
    if not found:
        raise ValueError(f"No ct2mr preprocessing output (HDF5 with 'ct2mr_preprocessed') in "
                         f"{', '.join(map(str, dirs))}. Run `ct2mr preprocess` first.")
    return sorted(dict.fromkeys(found))


def _unpadded(array: np.ndarray, record) -> np.ndarray:
    """A stored (z, y, x) volume without its padding: the resampled grid only."""
    before = record.pad_before[::-1]
    size = record.resampled_grid["size"][::-1]
    return array[tuple(slice(b, b + n) for b, n in zip(before, size))]


def measure_volume(path: str | os.PathLike) -> tuple[VolumeQC, np.ndarray]:
    """Read one preprocessed volume and compute its quality-control figures.

    Args:
        path: a ``ct2mr preprocess`` output.

    Returns:
        ``(VolumeQC, unpadded volume)``; the volume is float32 (z, y, x) in [-1, 1] on the 1 mm RAS grid.

    Raises:
        ct2mr.io.images.ImageReadError: not a preprocessing output.
    """
    stored = read_preprocessed(path)
    record = stored.record
    volume = _unpadded(stored.array, record)
    counts, _ = np.histogram(volume, bins=HISTOGRAM_BINS, range=(-1.0, 1.0))
    attrs = stored.attrs
    raw = None
    if "raw_histogram_counts" in attrs and "raw_histogram_edges" in attrs:
        raw = ([int(c) for c in attrs["raw_histogram_counts"]], [float(e) for e in attrs["raw_histogram_edges"]])
    extra = record.extra or {}
    qc = VolumeQC(
        name=stored.name, path=Path(path), modality=record.modality, flat=bool(record.flat),
        intensity_range=(float(record.intensity_range[0]), float(record.intensity_range[1])),
        percentiles=tuple(float(v) for v in record.config.get("mr_percentiles", (1.0, 99.0))),
        voxels=int(extra.get("voxels", volume.size)), clipped_low=int(extra.get("clipped_low", 0)),
        clipped_high=int(extra.get("clipped_high", 0)), side=heart_side(stored.array, record),
        histogram=counts.astype(np.int64), raw_histogram=raw, attrs=attrs)
    return qc, volume


def _text_values(values: Sequence[float]) -> str:
    """One value as text, or "mixed (...)" listing the distinct values."""
    unique = sorted(set(values))
    return f"{unique[0]:.1f}" if len(unique) == 1 else "mixed (" + ", ".join(f"{v:.1f}" for v in unique) + ")"


def table2(volumes: Sequence[VolumeQC]) -> list[Table2Row]:
    """The thesis's Table 2 per modality, with clipped-voxel percentages.

    Args:
        volumes: per-volume figures (:func:`measure_volume`).

    Returns:
        One :class:`Table2Row` per modality present, CT first. Medians and clipped percentages ignore flat volumes.
    """
    rows = []
    for modality in MODALITIES:
        group = [v for v in volumes if v.modality == modality]
        if not group:
            continue
        usable = [v for v in group if not v.flat]
        voxels = sum(v.voxels for v in usable)
        low = sum(v.clipped_low for v in usable)
        high = sum(v.clipped_high for v in usable)
        pct = (lambda n: 100.0 * n / voxels if voxels else 0.0)
        if modality == "ct":
            windows = sorted({v.intensity_range for v in group})
            bounds = "; ".join(f"[{lo:g}, {hi:g}] HU" for lo, hi in windows)
            rows.append(Table2Row("CT", len(group), "—", "—", None, None, sum(v.flat for v in group),
                                  pct(low + high), pct(low), pct(high), bounds))
        else:
            p_lo = _text_values([v.percentiles[0] for v in group])
            p_hi = _text_values([v.percentiles[1] for v in group])
            rows.append(Table2Row(
                "MRI", len(group), p_lo, p_hi,
                statistics.median(v.intensity_range[0] for v in usable) if usable else None,
                statistics.median(v.intensity_range[1] for v in usable) if usable else None,
                sum(v.flat for v in group), pct(low + high), pct(low), pct(high),
                f"P{p_lo}-P{p_hi} per volume"))
    return rows


def table2_markdown(rows: Sequence[Table2Row]) -> str:
    """Table 2 as a Markdown table (thesis layout, plus the clipped-voxel columns)."""
    lines = ["| " + " | ".join(TABLE2_COLUMNS) + " |", "|" + "---|" * len(TABLE2_COLUMNS)]
    lines += ["| " + " | ".join(row.cells()) + " |" for row in rows]
    return "\n".join(lines)


def _raw_volume(qc: VolumeQC) -> tuple[np.ndarray | None, tuple[float, float, float], str]:
    """The raw source of a volume reoriented to RAS, when reachable and unchanged since preprocessing."""
    attrs = qc.attrs
    source = Path(str(attrs.get("source_abspath", "")))
    if not source.exists():
        return None, (1.0, 1.0, 1.0), f"raw source {attrs.get('source', '?')} not reachable: preprocessed view only"
    try:
        stamp = source_stamp(source)
        if stamp != {"size": attrs.get("source_size"), "mtime_ns": attrs.get("source_mtime_ns")}:
            return None, (1.0, 1.0, 1.0), f"raw source {source} changed since preprocessing: preprocessed view only"
        index = int(attrs.get("series_index", -1))
        image = read_volumes(source, select=[index] if index >= 0 else None)[0][1]
    except (OSError, ImageReadError, ValueError) as exc:
        return None, (1.0, 1.0, 1.0), f"raw source unreadable ({exc}): preprocessed view only"
    import SimpleITK as sitk

    ras = reorient_to_ras(image)
    return sitk.GetArrayFromImage(ras).astype(np.float32), tuple(ras.GetSpacing()[::-1]), ""


def _write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> Path:
    """Write a header and rows as CSV; return the path."""
    import io

    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    return write_text(path, buffer.getvalue())


def _orientation_markdown(report: OrientationReport, volumes: Sequence[VolumeQC]) -> str:
    """The left-right check as Markdown: votes per modality, flagged volumes, the indicator's definition."""
    lines = ["| Modality | Heart left | Heart right | Indeterminate | Majority | Flag |", "|---|---|---|---|---|---|"]
    for label, votes in report.votes.items():
        flag = report.flagged_collections.get(label, "")
        lines.append(f"| {label} | {votes['left']} | {votes['right']} | {votes['indeterminate']} | "
                     f"{report.majority[label]} | {flag or 'ok'} |")
    lines.append("")
    lines += [f"- FLAGGED {label} {name}: {reason}" for label, name, reason in report.flagged_volumes]
    if report.ok:
        lines.append("No left-right inconsistency found among the determinate volumes.")
    lines.append("")
    lines.append("Indicator: R-L offset of the mediastinal tissue between the lungs (heart on the patient's left -> "
                 "negative), median over axial slices with both lungs; see ct2mr.preprocessing.orientation for what it measures "
                 "and its limits (cropped or heart-centred fields of view, abdominal volumes).")
    return "\n".join(lines)


def run_qc(dirs: str | os.PathLike | Iterable[str | os.PathLike], out_dir: str | os.PathLike, figures: bool = True,
           examples: Sequence[str] | None = None) -> QCReport:
    """Quality control of preprocessed collections: Table 2, clipped voxels, orientation check and figures.

    Args:
        dirs: folders of ``ct2mr preprocess`` outputs (CT and MR; one folder or several), or output files.
        out_dir: the QC folder (created if missing).
        figures: write the PNG figures (thesis figures 12-17).
        examples: names of the volumes shown in the tri-planar figures (default: the first non-flat volume of each
            modality, by name).

    Returns:
        The :class:`QCReport`.

    Raises:
        FileNotFoundError: a path does not exist.
        ValueError: no preprocessed volume found, or an example name that is not among them.
    """
    dirs = [dirs] if isinstance(dirs, (str, os.PathLike)) else list(dirs)
    paths = find_preprocessed(dirs)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    volumes: list[VolumeQC] = []
    unpadded: dict[Path, np.ndarray] = {}
    wanted = set(examples or [])
    for path in paths:
        qc, volume = measure_volume(path)
        volumes.append(qc)
        if qc.name in wanted:
            unpadded[path] = volume
    missing = wanted - {v.name for v in volumes}
    if missing:
        raise ValueError(f"Example volume(s) {sorted(missing)} not found; available: {[v.name for v in volumes]}.")
    rows = table2(volumes)
    orientation = check_orientation({_LABELS[m]: [(v.name, v.side) for v in volumes if v.modality == m]
                                     for m in MODALITIES if any(v.modality == m for v in volumes)})
    files = _write_tables(out_dir, rows, volumes)
    figure_lines = []
    if figures:
        for modality in MODALITIES:
            group = [v for v in volumes if v.modality == modality]
            if group:
                written, note = _modality_figures(out_dir, modality, group, rows, unpadded, wanted)
                files += written
                if note:
                    figure_lines.append(f"- {_LABELS[modality]}: {note}")
        figure_lines = [f"- {p.name}" for p in files if p.suffix == ".png"] + figure_lines
    markdown = "\n".join([
        "# ct2mr preprocessing quality control", "",
        f"{len(volumes)} volume(s) from {', '.join(str(Path(d)) for d in dirs)}.",
        "", "## Table 2", "", table2_markdown(rows), "",
        "Clipped voxels: share of the resampled voxels (padding excluded, full field of view) below / above the "
        "clipping bounds (CT window, or each MR volume's percentiles); flat volumes excluded.", "",
        "## Left-right orientation", "", _orientation_markdown(orientation, volumes), "",
        *(["## Figures", "", *figure_lines, ""] if figures else []),
    ])
    write_text(out_dir / "qc_report.md", markdown)
    files.append(out_dir / "qc_report.md")
    return QCReport(out_dir, volumes, rows, orientation, files, markdown)


def _write_tables(out_dir: Path, rows: Sequence[Table2Row], volumes: Sequence[VolumeQC]) -> list[Path]:
    """Write ``table2.csv``, ``volumes.csv`` (one row per volume) and ``table2.md``; return their paths."""
    files = [
        _write_csv(out_dir / "table2.csv", TABLE2_COLUMNS, [row.cells() for row in rows]),
        _write_csv(out_dir / "volumes.csv",
                   ["modality", "name", "flat", "p_low", "p_high", "voxels", "clipped_low", "clipped_high",
                    "clipped_percent", "heart_side", "lr_offset_mm", "side_agreement", "thoracic_slices",
                    "side_reason", "source", "path"],
                   [[v.modality, v.name, int(v.flat), f"{v.intensity_range[0]:.6g}", f"{v.intensity_range[1]:.6g}",
                     v.voxels, v.clipped_low, v.clipped_high, f"{v.clipped_percent:.3f}", v.side.side,
                     "" if v.side.offset_mm is None else f"{v.side.offset_mm:.2f}",
                     "" if v.side.agreement is None else f"{v.side.agreement:.3f}", v.side.slices, v.side.reason,
                     v.attrs.get("source", ""), str(v.path)] for v in volumes]),
    ]
    write_text(out_dir / "table2.md", "Table 2 - Quality control statistics after clipping (ct2mr qc).\n\n"
               + table2_markdown(rows) + "\n")
    files.append(out_dir / "table2.md")
    return files


def _modality_figures(out_dir: Path, modality: str, group: Sequence[VolumeQC], rows: Sequence[Table2Row],
                      unpadded: dict[Path, np.ndarray], wanted: set[str]) -> tuple[list[Path], str]:
    """Tri-planar, raw-histogram and preprocessed-histogram figures of one modality; (paths, raw-view note)."""
    from ct2mr.evaluation import figures as fig

    files = []
    label, unit = _LABELS[modality], "HU" if modality == "ct" else "a.u."
    usable = [v for v in group if not v.flat] or group
    pick = next((v for v in group if v.name in wanted), usable[0])
    volume = unpadded.get(pick.path)
    if volume is None:
        stored = read_preprocessed(pick.path)
        volume = _unpadded(stored.array, stored.record)
    raw, raw_spacing, note = _raw_volume(pick)
    bounds = (f"{pick.intensity_range[0]:g} HU", f"{pick.intensity_range[1]:g} HU") if modality == "ct" else \
        (f"P{pick.percentiles[0]:g} = {pick.intensity_range[0]:.4g}",
         f"P{pick.percentiles[1]:g} = {pick.intensity_range[1]:.4g}")
    files.append(fig.plot_triplanar(
        out_dir / f"{modality}_triplanar.png", volume, raw, raw_spacing,
        title=f"{label} {pick.name}: raw vs preprocessed (clipped to {bounds[0]} .. {bounds[1]} -> [-1, 1])",
        raw_label=f"raw ({unit})", note=note))
    sample = usable if len(usable) <= MAX_RAW_HISTOGRAMS else \
        [usable[i] for i in np.linspace(0, len(usable) - 1, MAX_RAW_HISTOGRAMS).astype(int)]
    histograms = [(v.name, *v.raw_histogram, v.intensity_range) for v in sample if v.raw_histogram]
    if histograms:
        windows = {v.intensity_range for v in sample}
        files.append(fig.plot_raw_histograms(
            out_dir / f"{modality}_histogram_raw.png", histograms, unit,
            title=f"{label} intensities before preprocessing ({len(histograms)} of {len(group)} volumes)",
            window=next(iter(windows)) if modality == "ct" and len(windows) == 1 else None))
    row = next(r for r in rows if r.modality == label)
    total = np.sum([v.histogram for v in usable], axis=0)
    edge_labels = (tuple(f"{b:g} HU" for b in usable[0].intensity_range) if modality == "ct"
                   else (f"P{row.clip_low}", f"P{row.clip_high}"))
    files.append(fig.plot_preprocessed_histogram(
        out_dir / f"{modality}_histogram_preprocessed.png", total, np.linspace(-1.0, 1.0, HISTOGRAM_BINS + 1),
        edge_labels, row.clipped_percent,
        title=f"{label} intensities after preprocessing ({len(usable)} volumes; bounds at -1 and 1)"))
    return files, note
