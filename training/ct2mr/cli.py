"""The ``ct2mr`` command line: the entry point; each sub-command is a module of :mod:`ct2mr.commands` (its parser
and its handler), and the work is done by the library modules.

Sub-commands:

* ``ct2mr preprocess --modality ct|mr INPUTS... --out DIR``: the thesis's preprocessing chain over a collection,
  into training-ready HDF5 (:func:`ct2mr.preprocessing.batch.preprocess_batch`).
* ``ct2mr qc DIR... --out QC_DIR``: Table 2, clipped voxels, left-right check and figures
  (:func:`ct2mr.evaluation.qc.run_qc`).
* ``ct2mr translate CT -o OUT_DIR``: synthetic MR, round-trip CT and error map on the CT's grid
  (:func:`ct2mr.inference.translate.translate_file`); over a folder, several paths or a list file: a resumable batch,
  sharded under torchrun (:func:`ct2mr.inference.batch.translate_batch`).
* ``ct2mr train --ct ... --mr ... --out RUN_DIR``: train a 3D CycleGAN (:func:`ct2mr.training.trainer.train`).
* ``ct2mr demo``: fetch a public chest CT and translate it with the default model.
* ``ct2mr synthesize-dataset --images CT... --labels SEG... --out DIR``: labelled CTs -> synthetic-MR training set
  (:func:`ct2mr.inference.labeltransfer.synthesize_dataset`).
* ``ct2mr evaluate --model CKPT --ct ... --mr ... --out DIR``: FID/KID, W1, cycle SSIM/PSNR/MAE, paired metrics,
  harmonisation, tables and figures (:func:`ct2mr.evaluation.evaluate`).
* ``ct2mr compare RUN_A RUN_B ... --out DIR``: side-by-side table, paired t-tests and figures
  (:func:`ct2mr.evaluation.evaluate.compare`).
* ``ct2mr qa SYNTHETIC_MR REFERENCE_MR -o DIR``: MAE/PSNR/SSIM/MS-SSIM against a registered reference MR in the body
  mask, difference map and metrics table (:func:`ct2mr.evaluation.reference_qa.reference_qa`; issue 16).
* ``ct2mr info CHECKPOINT``: what a checkpoint holds.
* ``ct2mr models list|download NAME|import FILE|clear``: the model list, the user cache, offline import
  (:mod:`ct2mr.models.registry`).

Exit status: 0 success, 1 an error (one line ``ct2mr COMMAND: error: MESSAGE`` on stderr, and a JSON ``error`` event
with ``--progress json``), 2 a usage error, 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from ct2mr import __version__
from ct2mr.commands import COMMANDS, command
from ct2mr.commands.common import setup_openmp

__all__ = ["main", "build_parser"]

#: The errors reported as one line with exit status 1 (anything else is a bug and keeps its traceback).
#: ``ct2mr.io.images.ImageReadError``, ``ct2mr.models.checkpoint.CheckpointError`` and
#: ``ct2mr.models.registry.RegistryError`` are ``ValueError``s: listing the base keeps torch out of light commands.
USER_ERRORS = (FileNotFoundError, ValueError, RuntimeError, OSError, FloatingPointError)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``ct2mr`` command: the global options and every sub-command of
    :data:`ct2mr.commands.COMMANDS`."""
    parser = argparse.ArgumentParser(
        prog="ct2mr", description="Unpaired 3D CT -> MR translation (CycleGAN family) for thoracic imaging: "
        "preprocess (and qc), train, translate.")
    parser.add_argument("--version", action="version", version=f"ct2mr {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details (INFO level) to stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module in COMMANDS:
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``ct2mr`` command; returns the exit code (0 success, 1 error, 2 usage error, 130 interrupted).

    Raises:
        SystemExit: ``--help``, ``--version`` and usage errors (status 2), from argparse.
    """
    setup_openmp()  # before torch (and its OpenMP) is loaded
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    handler = command(args.command)
    accept_unknown = getattr(handler, "accept_unknown", None)
    if extra and not (accept_unknown is not None and accept_unknown(args, extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return handler.run(args, argv)
    except USER_ERRORS as exc:
        message = str(exc) or type(exc).__name__
        if getattr(args, "progress", None) == "json":
            from ct2mr.progress import JsonReporter

            JsonReporter().event("error", message=message, type=type(exc).__name__)
        print(f"ct2mr {args.command}: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"ct2mr {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
