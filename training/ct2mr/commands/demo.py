"""``ct2mr demo``: fetch a public chest CT (:func:`ct2mr.io.sampledata.demo_ct`) and translate it with the default
model (:mod:`ct2mr.commands.translate`), then draw an overview figure."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from ct2mr.commands import translate
from ct2mr.commands.common import add_device_argument, add_progress_argument

__all__ = ["NAME", "add_parser", "run"]

NAME = "demo"

DESCRIPTION = (
    "The main job in one command: fetch a public chest CT (3D Slicer's SampleData 'CTChest', by URL + SHA-256 into "
    "the user cache; offline, ../shared/data/ct/thorax_cta_1p5mm.nii.gz when it exists), translate it with the "
    "default model and print where the outputs are.")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``ct2mr demo`` to ``subparsers`` and return its parser."""
    m = subparsers.add_parser(NAME, help="translate a public chest CT with the default model",
                              description=DESCRIPTION)
    m.add_argument("--input", metavar="CT", help="use this CT instead of the sample")
    m.add_argument("-o", "--output", default="demo_output", metavar="OUT_DIR", help="output folder (default: "
                   "%(default)s)")
    m.add_argument("--offline", action="store_true", help="do not try to download the sample")
    add_device_argument(m)
    add_progress_argument(m)
    return m


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Translate the demo CT (``--input``, else the sample or a local fallback) into ``args.output`` (rewritten if
    there) with the default model and default settings, and write ``overview.png``.

    Returns:
        0.

    Raises:
        FileNotFoundError: no download and no local fallback (the message says how to pass ``--input``); and what
        :func:`ct2mr.commands.translate.run` raises.
    """
    from pathlib import Path

    from ct2mr.io.sampledata import demo_ct, demo_fallbacks

    if args.input:
        ct, how = Path(args.input), "--input"
    else:
        ct, how = demo_ct(demo_fallbacks(), offline=args.offline)
    print(f"Demo CT: {ct} ({how})", file=sys.stderr)
    args.input, args.model, args.overlap, args.roi_size, args.sw_batch_size, args.precision = (
        str(ct), None, 0.25, None, None, "auto")
    status = translate.run(args, argv)
    if status == 0:
        print(f"Overview:      {_overview(Path(args.input), Path(args.output))}")
    return status


def _overview(ct_path, out_dir):
    """Write ``OUT/overview.png`` (CT, G(x), F(G(x)), error map, tri-planar) and return its path."""
    import SimpleITK as sitk

    from ct2mr.evaluation.figures import plot_translation_overview
    from ct2mr.io.images import read_image
    from ct2mr.models.checkpoint import load_checkpoint

    outputs = [sitk.ReadImage(str(out_dir / name)) for name in
               ("synthetic_mr.nii.gz", "roundtrip_ct.nii.gz", "error_map.nii.gz")]
    checkpoint = load_checkpoint(None)
    window = checkpoint.preprocessing.ct_window
    return plot_translation_overview(out_dir / "overview.png", read_image(ct_path), *outputs, ct_window=window,
                                     title=f"ct2mr demo: {ct_path.name} with {checkpoint.name}")
