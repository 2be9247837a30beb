"""``ct2mr preprocess --modality ct|mr INPUTS... --out DIR``: the thesis's preprocessing chain over a collection, into
training-ready HDF5 (:func:`ct2mr.preprocessing.batch.preprocess_batch`)."""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Callable, Sequence

from ct2mr.commands.common import PROGRESS_HELP_LONG, LazyBar, add_progress_argument

__all__ = ["NAME", "add_parser", "run"]

NAME = "preprocess"

EXAMPLES = """examples:
  ct2mr preprocess --modality ct ct_folder/ dicom_series_folder/ --out prep/ct
  ct2mr preprocess --modality mr cine_4d.nii.gz --select 0 5 10 --out prep/mr --n4
  ct2mr preprocess --modality mr mr_folder/ --out prep/mr --mr-percentiles 0.5 99.5 --k 32 --jobs 2
  ct2mr train --ct prep/ct --mr prep/mr --out runs/m1      # preprocessed files are used as they are

outputs: DIR/<stem>.h5 (DIR/<stem>_tNNN.h5 per volume of a 4D series): dataset 'volume' (float32, (z, y, x),
[-1, 1]) and attributes (source, shape, spacing, origin, direction, padding, every parameter, clipped voxels,
software versions, git commit, config, timestamp); DIR/preprocess_log.jsonl: one line per volume and run.
Exit status 1 when any volume failed (the others are still written).
"""

DESCRIPTION = (
    "The preprocessing chain of the thesis (section 4, Algorithm 1) over files and folders (NIfTI, NRRD, MHA, HDF5 "
    "'volume' datasets, DICOM series folders; 4D series split into 3D volumes): reorient to RAS from the direction "
    "cosines, resample to 1 mm with trilinear interpolation (size round(n * s / t); background: median for float, "
    "minimum for integer images), pad symmetrically to a multiple of K with the minimum, then CT: clip to the HU "
    "window -> [-1, 1]; MR: optional N4 bias-field correction, clip to the volume's percentiles -> [-1, 1] (a flat MR "
    "is warned about, zeroed and flagged). Volumes run in parallel; outputs that are up to date (same source, size, "
    "modification time and parameters) are skipped; writes are atomic and never touch the inputs; a failed volume "
    "does not stop the others.")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``ct2mr preprocess`` to ``subparsers`` and return its parser."""
    p = subparsers.add_parser(NAME, help="preprocess CT or MR collections into training-ready HDF5 volumes",
                              description=DESCRIPTION, epilog=EXAMPLES,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="volume files or folders (a folder of files, or one "
                   "DICOM series)")
    p.add_argument("--modality", required=True, choices=("ct", "mr"), help="ct (HU) or mr (arbitrary units)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created if missing)")
    p.add_argument("--select", type=int, nargs="+", metavar="T", help="0-based indices of the volumes to keep from "
                   "4D series (cardiac phases, respiratory gates); default: all. 3D inputs ignore it")
    p.add_argument("--spacing", type=float, default=1.0, metavar="MM", help="isotropic target spacing in mm "
                   "(default: %(default)s)")
    p.add_argument("--k", type=int, default=16, help="pad every axis to a multiple of K voxels (default: "
                   "%(default)s)")
    p.add_argument("--ct-window", type=float, nargs=2, default=(-600.0, 1000.0), metavar=("MIN", "MAX"),
                   help="CT clipping window in HU (default: -600 1000)")
    p.add_argument("--mr-percentiles", type=float, nargs=2, default=(1.0, 99.0), metavar=("LOW", "HIGH"),
                   help="MR clipping percentiles (default: 1 99)")
    p.add_argument("--n4", action="store_true", help="MR only: N4 bias-field correction (SimpleITK, Otsu mask, "
                   "fitted on a shrunk image, applied at full resolution) before the chain")
    p.add_argument("--n4-shrink", type=int, default=4, metavar="F", help="shrink factor of the N4 fit (default: "
                   "%(default)s)")
    p.add_argument("--jobs", type=int, metavar="N", help="parallel worker processes (default: min(4, CPU count); "
                   "1 runs in this process)")
    p.add_argument("--force", action="store_true", help="re-process volumes whose outputs are up to date")
    add_progress_argument(p, PROGRESS_HELP_LONG)
    return p


def _progress(args: argparse.Namespace, bar: LazyBar) -> Callable:
    """The per-volume callback of ``--progress``: the bar (with warnings and failures above it), one JSON object per
    volume, or the warnings alone."""
    if args.progress == "bar":
        def progress(done: int, total: int, result) -> None:
            # created at the first volume, so that up-front errors stay one line
            shown = bar.open(total=total, unit="vol", desc=f"preprocess {args.modality}")
            shown.update(1)
            shown.set_postfix_str(f"{result.status} {result.name}"[:40])
            for message in result.warnings:
                shown.write(f"ct2mr preprocess: warning: {result.name}: {message}", file=sys.stderr)
            if result.status == "failed":
                shown.write(f"ct2mr preprocess: FAILED {result.name}: {result.message}", file=sys.stderr)
    elif args.progress == "json":
        from ct2mr.progress import JsonReporter

        events = JsonReporter()

        def progress(done: int, total: int, result) -> None:
            events.event("progress", stage="preprocess", fraction=round(done / total, 4), volume=result.to_dict())
    else:
        def progress(done: int, total: int, result) -> None:
            for message in result.warnings:
                print(f"ct2mr preprocess: warning: {result.name}: {message}", file=sys.stderr)
    return progress


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Preprocess ``args.inputs`` into ``args.out``; print the summary (or a JSON ``done`` event).

    Returns:
        0, or 1 when any volume failed (the others are still written).

    Raises:
        FileNotFoundError, ValueError, OSError: unusable inputs or output folder (reported by :func:`ct2mr.cli.main`).
    """
    from ct2mr.preprocessing.batch import preprocess_batch
    from ct2mr.preprocessing.pipeline import PreprocessingConfig

    config = PreprocessingConfig(target_spacing=args.spacing, k=args.k, ct_window=tuple(args.ct_window),
                                 mr_percentiles=tuple(args.mr_percentiles), n4=args.n4, n4_shrink=args.n4_shrink)
    with LazyBar() as bar:
        summary = preprocess_batch(args.inputs, args.out, args.modality, config, args.select, args.jobs, args.force,
                                   _progress(args, bar), "ct2mr " + shlex.join(argv))
    if args.progress == "json":
        from ct2mr.progress import JsonReporter

        JsonReporter().event("done", out=str(summary.out_dir), seconds=round(summary.seconds, 3),
                             **{status: summary.count(status) for status in ("ok", "skipped", "failed")},
                             flagged=[r.name for r in summary.flagged], log=str(summary.log))
    else:
        print(summary.text())
    return 1 if summary.failed else 0
