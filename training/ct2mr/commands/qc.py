"""``ct2mr qc DIR... --out QC_DIR``: Table 2, clipped voxels, left-right check and figures
(:func:`ct2mr.evaluation.qc.run_qc`)."""

from __future__ import annotations

import argparse
from typing import Sequence

__all__ = ["NAME", "add_parser", "run"]

NAME = "qc"

EXAMPLES = """examples:
  ct2mr qc prep/ct prep/mr --out qc/
  ct2mr qc prep/ --out qc/ --example chest_ct_lung2 cardiac_cine_t000 --no-figures

outputs: QC_DIR/table2.csv, table2.md (thesis Table 2 + clipped voxels), volumes.csv (one row per volume),
qc_report.md (printed), and <modality>_triplanar.png, <modality>_histogram_raw.png,
<modality>_histogram_preprocessed.png (thesis figures 12-17).
"""

DESCRIPTION = (
    "Quality control of `ct2mr preprocess` outputs (CT and MR, in one folder or several): the thesis's Table 2 (clip "
    "percentiles, median P1 and P99, flagged volumes) and the percentage of clipped voxels per modality, a left-right "
    "orientation check (which side the heart/mediastinum falls on, per volume; a modality whose majority has it on "
    "the patient's right is flagged), and the raw-vs-preprocessed tri-planar views and log-frequency histograms with "
    "the clipping bounds (thesis figures 12-17). The raw view re-reads the source when it is still reachable and "
    "unchanged.")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``ct2mr qc`` to ``subparsers`` and return its parser."""
    q = subparsers.add_parser(NAME, help="quality control of preprocessed collections (Table 2, clipping, "
                              "orientation)", description=DESCRIPTION, epilog=EXAMPLES,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    q.add_argument("dirs", nargs="+", metavar="DIR", help="folders of preprocessed HDF5 files (or single files)")
    q.add_argument("--out", required=True, metavar="QC_DIR", help="folder for the tables and figures")
    q.add_argument("--example", nargs="+", metavar="NAME", help="volume names shown in the tri-planar figures "
                   "(default: the first non-flat volume of each modality)")
    q.add_argument("--no-figures", action="store_true", help="tables and report only")
    return q


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Write the QC tables and figures into ``args.out`` and print the report; returns 0.

    Raises:
        FileNotFoundError, ValueError, OSError: no preprocessed volumes, or an unwritable output folder.
    """
    from ct2mr.evaluation.qc import run_qc

    report = run_qc(args.dirs, args.out, figures=not args.no_figures, examples=args.example)
    print(report.markdown)
    print(f"Written to {report.out_dir}: {', '.join(p.name for p in report.files)}")
    return 0
