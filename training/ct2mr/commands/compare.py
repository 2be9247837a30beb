"""``ct2mr compare RUN_A RUN_B ... --out DIR``: side-by-side table, paired t-tests and figures of evaluated models
(:func:`ct2mr.evaluation.evaluate.compare`)."""

from __future__ import annotations

import argparse
from typing import Sequence

from ct2mr.commands.evaluate import add_evaluation_arguments, evaluation_settings

__all__ = ["NAME", "add_parser", "run"]

NAME = "compare"

EXAMPLES = """examples:
  ct2mr compare eval/m1 eval/m2 --out eval/m1_vs_m2
  ct2mr compare runs/m1/model.safetensors runs/m2/model.safetensors --ct val/ct --mr val/mr --out eval/cmp

outputs: DIR/compare.csv, compare.md (one table, paired t-tests of every run against the first), ttests.csv,
figures/compare_triplanar.png, figures/compare_histogram.png, tensorboard/.
"""

DESCRIPTION = (
    "Read the outputs of `ct2mr evaluate` (or evaluate checkpoints first, with --ct and --mr) and write one table, "
    "paired two-sided t-tests of every run against the first on the per-volume metrics, and side-by-side tri-planar "
    "and histogram figures.")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``ct2mr compare`` to ``subparsers`` and return its parser."""
    c = subparsers.add_parser(NAME, help="compare two or more evaluated models side by side",
                              description=DESCRIPTION, epilog=EXAMPLES,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("runs", nargs="+", metavar="RUN", help="evaluation folders (from ct2mr evaluate) or checkpoints")
    c.add_argument("--out", required=True, metavar="DIR", help="output folder (created if missing)")
    add_evaluation_arguments(c, required=False)
    return c


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Compare ``args.runs`` (evaluating checkpoints first) into ``args.out`` and print the table.

    Returns:
        0.

    Raises:
        FileNotFoundError, ValueError, RuntimeError, OSError: reported by :func:`ct2mr.cli.main`.
    """
    from ct2mr.evaluation.evaluate import compare
    from ct2mr.progress import make_reporter

    config, settings = evaluation_settings(args)
    reporter = make_reporter(args.progress)
    try:
        with reporter.capture_warnings():
            result = compare(args.runs, args.out, args.ct, args.mr, config, settings, reporter)
    finally:
        reporter.close()
    reporter.event("done", out=args.out, files=[str(p) for p in result["files"]])
    if args.progress != "json":
        print(result["markdown"])
        print(f"Written to {args.out}: {', '.join(p.name for p in result['files'])}")
    return 0
