"""``ct2mr evaluate --model CKPT --ct ... --mr ... --out DIR``: FID/KID, W1, cycle SSIM/PSNR/MAE, paired metrics,
harmonisation, tables and figures (:func:`ct2mr.evaluation.evaluate.evaluate`). Also the evaluation options
``ct2mr compare`` shares (:func:`add_evaluation_arguments`, :func:`evaluation_settings`)."""

from __future__ import annotations

import argparse
from typing import Sequence

from ct2mr.commands.common import add_precision_argument, add_progress_argument, add_window_arguments

__all__ = ["NAME", "add_parser", "add_evaluation_arguments", "evaluation_settings", "run"]

NAME = "evaluate"

EXAMPLES = """examples:
  ct2mr evaluate --model runs/m1/model.safetensors --ct val/ct --mr val/mr --out eval/m1
  ct2mr evaluate --ct val/ct --mr val/mr --out eval/default --harmonize histogram --reference-mr ref_mr.nii.gz
  ct2mr evaluate --model m.safetensors --ct pairs/ct --mr pairs/mr --paired --out eval/paired   # registered pairs
  ct2mr evaluate --ct val/ct --mr val/mr --out eval/mn --features medicalnet --feature-weights resnet_10_23dataset.pth

outputs: DIR/table.csv, table.md (thesis Tables 6/7/9: FID, KID (%), SSIM_cyc, PSNR_cyc (dB), MAE, MAE (HU), W1),
per_volume.csv/.md, paired.csv/.md (--paired), metrics.json (everything, with the feature extractor's identity and
the patch sampling rule), figures/*.png (tri-planar CT | G(x) | real MR, round trip and error map, histogram
overlays), figure_data.npz (for `ct2mr compare`) and tensorboard/ (scalars and figures).
"""

DESCRIPTION = (
    "Run G and F over held-out CT and MR volumes (sliding window, as translate) and write the thesis's evaluation "
    "(section 5 E1-E2, section 7 Tables 6/7/9, figures 5, 6, 8, 10, 11): distribution realism CT->MR and MR->CT (FID "
    "and KID on 3D patches, W1 between intensity histograms), self-consistency (SSIM, PSNR in dB on the [-1, 1] "
    "range, MAE of x vs F(G(x)) and y vs G(F(y)) inside the body mask), post-hoc harmonisation and the copy-CT "
    "baseline, and with --paired the synthetic vs the real target (MAE in HU, PSNR, SSIM). Patches: N per volume of "
    "S^3 voxels of the 1 mm grid, centres drawn uniformly inside the mask with a fixed seed, the same positions for a "
    "volume and its translation. Default features: a fixed-seed random 3D conv network (no download; identified by "
    "the SHA-256 of its weights in metrics.json).")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``ct2mr evaluate`` to ``subparsers`` and return its parser."""
    e = subparsers.add_parser(NAME, help="FID/KID, W1, cycle and paired metrics, tables and figures of a model",
                              description=DESCRIPTION, epilog=EXAMPLES,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_evaluation_arguments(e)
    e.add_argument("--model", metavar="PATH", help="ct2mr checkpoint (.safetensors); default: the bundled model")
    e.add_argument("--out", required=True, metavar="DIR", help="output folder (created if missing)")
    e.add_argument("--name", help="model name in the tables (default: the checkpoint's)")
    e.add_argument("--warp-check", action="store_true", help="also register G(x) onto x per CT volume (B-spline, "
                   "Mattes MI; seconds to a minute each) and report the mean and p95 displacement in mm, ~0 when G "
                   "moved no anatomy (edge correlation, GMS and NMI of x and G(x) are always reported)")
    return e


def add_evaluation_arguments(p: argparse.ArgumentParser, required: bool = True) -> None:
    """Options shared by ``evaluate`` and ``compare`` (which evaluates checkpoints with them); ``--ct`` and ``--mr``
    are required when ``required``."""
    p.add_argument("--ct", nargs="+", required=required, metavar="PATH", help="held-out CT files or folders (HU, "
                   "or ct2mr preprocess outputs)")
    p.add_argument("--mr", nargs="+", required=required, metavar="PATH", help="held-out MR files or folders (4D "
                   "series split)")
    p.add_argument("--paired", action="store_true", help="the i-th CT and the i-th MR (sorted paths) are registered "
                   "scans of one patient: also compare synthetic vs real target")
    p.add_argument("--mask", default="body", choices=("body", "none"), help="where metrics are taken: the body "
                   "mask, or every voxel but the padding (default: %(default)s)")
    _add_feature_arguments(p)
    p.add_argument("--harmonize", nargs="+", default=["histogram", "nyul", "zscore"],
                   choices=("none", "histogram", "nyul", "zscore"), help="post-hoc harmonisations scored on G(x) "
                   "(default: histogram nyul zscore; none: no harmonised rows)")
    p.add_argument("--reference-mr", nargs="+", metavar="PATH", help="reference MR(s) for harmonisation (default: the "
                   "--mr set itself, which is optimistic)")
    p.add_argument("--no-baselines", action="store_true", help="do not score the copy-CT (identity) baseline")
    p.add_argument("--no-figures", action="store_true", help="tables only")
    p.add_argument("--figure-volumes", type=int, default=1, metavar="N", help="CT volumes with tri-planar and "
                   "round-trip figures (default: %(default)s)")
    p.add_argument("--no-tensorboard", action="store_true", help="do not write TensorBoard events")
    add_window_arguments(p)
    add_precision_argument(p, "autocast precision")
    add_progress_argument(p)


def _add_feature_arguments(p: argparse.ArgumentParser) -> None:
    """The FID/KID patches and feature extractor: ``--patch-size`` ... ``--kid-subset-size``."""
    p.add_argument("--patch-size", type=int, default=32, metavar="S", help="FID/KID patch side in voxels of the 1 mm "
                   "grid (default: %(default)s)")
    p.add_argument("--patches-per-volume", type=int, default=64, metavar="N", help="FID/KID patches per volume "
                   "(default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of patch sampling, KID subsets and the random features "
                   "(default: %(default)s)")
    p.add_argument("--features", default="random", choices=("random", "medicalnet"), help="feature extractor: a "
                   "fixed-seed random 3D conv network (no download), or MedicalNet ResNet-10 with --feature-weights "
                   "(default: %(default)s)")
    p.add_argument("--feature-weights", metavar="PATH_OR_URL", help="MedicalNet weights: a local .pth/.safetensors "
                   "file, or a URL downloaded once into the user cache (needs --feature-sha256)")
    p.add_argument("--feature-sha256", metavar="HEX", help="SHA-256 of --feature-weights")
    p.add_argument("--kid-subsets", type=int, default=100, help="KID subsets (default: %(default)s)")
    p.add_argument("--kid-subset-size", type=int, default=1000, help="KID samples per subset, capped by the set sizes "
                   "(default: %(default)s)")


def evaluation_settings(args: argparse.Namespace):
    """``(EvaluationConfig, InferenceSettings)`` from the options of :func:`add_evaluation_arguments`.

    Raises:
        ValueError: an invalid setting.
    """
    from ct2mr.commands.common import inference_settings
    from ct2mr.evaluation.evaluate import EvaluationConfig

    config = EvaluationConfig(
        patch_size=args.patch_size, patches_per_volume=args.patches_per_volume, seed=args.seed, features=args.features,
        feature_weights=args.feature_weights, feature_sha256=args.feature_sha256, kid_subsets=args.kid_subsets,
        kid_subset_size=args.kid_subset_size, mask=args.mask, harmonize=tuple(args.harmonize),
        reference_mr=tuple(args.reference_mr or ()), baselines=not args.no_baselines, paired=args.paired,
        figures=not args.no_figures, figure_volumes=args.figure_volumes, tensorboard=not args.no_tensorboard,
        warp_check=getattr(args, "warp_check", False))
    return config, inference_settings(args)


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Evaluate ``args.model`` on the held-out volumes into ``args.out`` and print the table.

    Returns:
        0.

    Raises:
        FileNotFoundError, ImageReadError, CheckpointError, ValueError, RuntimeError, OSError: reported by
        :func:`ct2mr.cli.main`.
    """
    from ct2mr.evaluation.evaluate import evaluate
    from ct2mr.progress import make_reporter

    config, settings = evaluation_settings(args)
    reporter = make_reporter(args.progress)
    try:
        with reporter.capture_warnings():
            result = evaluate(args.model, args.ct, args.mr, args.out, config, settings, reporter, args.name)
    finally:
        reporter.close()
    reporter.event("done", out=str(result.out_dir), files=[str(p) for p in result.files])
    if args.progress != "json":
        print(result.markdown)
        print(f"Written to {result.out_dir}: {', '.join(p.name for p in result.files)}")
    return 0
