"""``ct2mr qa SYNTHETIC_MR REFERENCE_MR -o DIR``: MAE/PSNR/SSIM/MS-SSIM against a registered reference MR in the body
mask, difference map and metrics table (:func:`ct2mr.evaluation.reference_qa.reference_qa`; issue 16)."""

from __future__ import annotations

import argparse
from typing import Sequence

from ct2mr.commands.common import add_progress_argument

__all__ = ["NAME", "add_parser", "run"]

NAME = "qa"

EXAMPLES = ("examples:\n  ct2mr qa out/synthetic_mr.nii.gz mr_registered.nii.gz --ct chest.nii.gz "
            "-o qa/\n  ct2mr qa out/synthetic_mr.nii.gz mr_registered.nrrd --mask body_label.nrrd -o qa/ "
            "--progress json\n")

DESCRIPTION = (
    "QA against a reference (issue 16): the synthetic MR of `ct2mr translate` against a real MR of the same patient "
    "registered and resampled onto the CT's grid. Inside the body mask (of --ct, else of the reference MR, or "
    "--mask): MAE, PSNR (data range 2), 3D SSIM and MS-SSIM (Wang et al. 2003, 5 scales) on the normalised MR scale, "
    "both images clipped to [-1, 1] and set to -1 outside the mask (as SynthRAD2025); the reference is normalised "
    "like the model's MR preprocessing (its own 1st-99th percentiles -> [-1, 1]). Writes OUT_DIR/difference.nii.gz "
    "(synthetic - reference on the synthetic MR's grid), qa_metrics.json and qa_metrics.md (the table and every "
    "definition: mask, range, clipping). A registration error reads as a synthesis error.")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``ct2mr qa`` to ``subparsers`` and return its parser."""
    q = subparsers.add_parser(NAME, help="score a synthetic MR against a registered reference MR (MAE, PSNR, SSIM, "
                              "MS-SSIM)", description=DESCRIPTION, epilog=EXAMPLES,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    q.add_argument("synthetic_mr", metavar="SYNTHETIC_MR", help="the synthetic MR (normalised units), e.g. "
                   "OUT_DIR/synthetic_mr.nii.gz of ct2mr translate")
    q.add_argument("reference_mr", metavar="REFERENCE_MR", help="the registered reference MR on the same grid")
    q.add_argument("-o", "--output", required=True, metavar="OUT_DIR", help="output folder (created if missing)")
    q.add_argument("--ct", metavar="CT", help="the translated CT (HU, same grid): its body mask is used")
    q.add_argument("--mask", metavar="LABELMAP", help="a label map on the same grid (non-zero = inside) instead of a "
                   "body mask")
    q.add_argument("--reference-units", default="raw", choices=("raw", "normalised"), help="raw: normalise the "
                   "reference by its percentiles; normalised: it is already in [-1, 1] (default: %(default)s)")
    q.add_argument("--mr-percentiles", type=float, nargs=2, default=(1.0, 99.0), metavar=("LOW", "HIGH"),
                   help="percentiles of the raw reference's normalisation (default: 1 99, the thesis's)")
    add_progress_argument(q, "progress display (default: %(default)s)", default="none")
    return q


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Score ``args.synthetic_mr`` against ``args.reference_mr`` into ``args.output`` and print the table.

    Returns:
        0.

    Raises:
        FileNotFoundError, ImageReadError, ValueError, OSError: unreadable images, different grids, an empty mask
        (reported by :func:`ct2mr.cli.main`).
    """
    from pathlib import Path

    from ct2mr.evaluation.reference_qa import _finite, metrics_markdown, reference_qa
    from ct2mr.progress import make_reporter

    reporter = make_reporter(args.progress, {"qa": 1.0})
    try:
        with reporter.capture_warnings():
            reporter.event("start", command="qa", synthetic_mr=args.synthetic_mr, reference_mr=args.reference_mr,
                           output=args.output)
            result = reference_qa(args.synthetic_mr, args.reference_mr, args.output, args.ct, args.mask,
                                  args.reference_units, tuple(args.mr_percentiles), reporter)
    finally:
        reporter.close()
    reporter.event("done", outputs=result["outputs"], metrics=_finite(result["metrics"]), mask=result["mask"],
                   seconds=result["seconds"])
    if args.progress != "json":
        print(metrics_markdown(result))
        print(f"Written to {args.output}: {', '.join(Path(p).name for p in result['outputs'].values())}")
    return 0
