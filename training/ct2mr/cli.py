"""The ``ct2mr`` command line: argument parsing only; the work is done by the library modules.

Sub-commands:

* ``ct2mr translate CT -o OUT_DIR``: synthetic MR, round-trip CT and error map on the CT's grid
  (:func:`ct2mr.inference.translate_file`).
* ``ct2mr train --ct ... --mr ... --out RUN_DIR``: train a 3D CycleGAN (:func:`ct2mr.training.train`).
* ``ct2mr demo``: fetch a public chest CT and translate it with the default model.
* ``ct2mr info CHECKPOINT``: what a checkpoint holds.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import time
from typing import Sequence

from . import __version__

__all__ = ["main", "build_parser"]

EXAMPLES_TRANSLATE = """examples:
  ct2mr translate chest.nii.gz -o out/
  ct2mr translate dicom_series_folder/ -o out/ --model run/model.safetensors --device cuda
  ct2mr translate chest.nrrd -o out/ --overlap 0.25 --progress json
"""

EXAMPLES_TRAIN = """examples:
  ct2mr train --ct ct_folder/ --mr mr_folder/ --out runs/m1
  ct2mr train --ct a.nii.gz b.nrrd --mr cine_4d.nii.gz --out runs/small --steps 200 --patch-size 48 --width 8
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``ct2mr`` command."""
    parser = argparse.ArgumentParser(
        prog="ct2mr", description="Unpaired 3D CT -> MR translation (CycleGAN family) for thoracic imaging: "
        "preprocess, train, translate.")
    parser.add_argument("--version", action="version", version=f"ct2mr {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details (INFO level) to stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    t = sub.add_parser("translate", help="translate a CT into a synthetic MR (+ round trip and error map)",
                       description="Translate a CT with generator G (CT -> MR) and back with F (MR -> CT). Writes "
                       "OUT_DIR/synthetic_mr.nii.gz (normalised MR intensity in [-1, 1]), OUT_DIR/roundtrip_ct.nii.gz "
                       "(HU) and OUT_DIR/error_map.nii.gz (|F(G(x)) - x| in HU, x clipped to the CT window), each "
                       "on exactly the input's voxel grid.",
                       epilog=EXAMPLES_TRANSLATE, formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("input", help="CT volume in HU: NIfTI, NRRD, MHA, HDF5 ('volume' dataset) or a DICOM folder")
    t.add_argument("-o", "--output", required=True, metavar="OUT_DIR", help="output folder (created if missing)")
    t.add_argument("--model", metavar="PATH", help="ct2mr checkpoint (.safetensors); default: the bundled model")
    t.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:N "
                   "(default: %(default)s; falls back to CPU with a warning when CUDA is missing)")
    t.add_argument("--overlap", type=float, default=0.25, help="sliding-window overlap in [0, 1) (default: "
                   "%(default)s)")
    t.add_argument("--roi-size", type=int, nargs="+", metavar="N", help="window size in voxels (1 or 3 multiples "
                   "of 4; default: the model's, at least 96)")
    t.add_argument("--sw-batch-size", type=int, default=1, help="windows per forward pass (default: %(default)s)")
    t.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="autocast precision; auto = bf16/fp16 on CUDA, fp32 on CPU (default: %(default)s)")
    t.add_argument("--progress", default="bar", choices=("bar", "json", "none"),
                   help="bar for people, json (one object per stdout line) for programs (default: %(default)s)")

    r = sub.add_parser("train", help="train a 3D CycleGAN on unpaired CT and MR volumes",
                       description="Train generators G (CT -> MR) and F (MR -> CT) with 3D PatchGAN discriminators, "
                       "LSGAN heads, cycle L1 and identity L1 (thesis model M1) on random unpaired 3D patches. "
                       "Inputs go through the thesis's preprocessing chain (RAS, 1 mm, pad to K, CT window / MR "
                       "percentiles). Writes RUN_DIR/model.safetensors (both generators, architecture and every "
                       "preprocessing parameter; safe to load), last.safetensors, config.json and log.jsonl.",
                       epilog=EXAMPLES_TRAIN, formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("--ct", nargs="+", required=True, metavar="PATH", help="CT files or folders")
    r.add_argument("--mr", nargs="+", required=True, metavar="PATH", help="MR files or folders (4D series split)")
    r.add_argument("--out", required=True, metavar="RUN_DIR", help="run folder")
    r.add_argument("--name", default="ct2mr-m1", help="model name stored in the checkpoint")
    r.add_argument("--steps", type=int, default=1000, help="optimisation steps (default: %(default)s)")
    r.add_argument("--patch-size", type=int, nargs="+", default=[64], metavar="N",
                   help="patch size in voxels, 1 or 3 values (default: 64)")
    r.add_argument("--batch-size", type=int, default=1, help="patches per domain per step (default: %(default)s)")
    r.add_argument("--width", type=int, default=64, help="base channels of G/F and D (default: %(default)s)")
    r.add_argument("--blocks", type=int, default=9, help="residual blocks of the generators (default: %(default)s)")
    r.add_argument("--lr", type=float, default=2e-4, help="Adam learning rate (default: %(default)s)")
    r.add_argument("--lambda-cyc", type=float, default=10.0, help="cycle loss weight (default: %(default)s)")
    r.add_argument("--lambda-id", type=float, default=0.2, help="identity loss weight (default: %(default)s)")
    r.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    r.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    r.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    r.add_argument("--checkpoint-every", type=int, default=100, help="steps between last.safetensors saves")
    r.add_argument("--progress", default="bar", choices=("bar", "json", "none"), help="progress display")

    m = sub.add_parser("demo", help="translate a public chest CT with the default model",
                       description="The main job in one command: fetch a public chest CT (3D Slicer's SampleData "
                       "'CTChest', by URL + SHA-256 into the user cache; offline, ../shared/data/ct/"
                       "thorax_cta_1p5mm.nii.gz when it exists), translate it with the default model and print where "
                       "the outputs are.")
    m.add_argument("--input", metavar="CT", help="use this CT instead of the sample")
    m.add_argument("-o", "--output", default="demo_output", metavar="OUT_DIR", help="output folder (default: "
                   "%(default)s)")
    m.add_argument("--offline", action="store_true", help="do not try to download the sample")
    m.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    m.add_argument("--progress", default="bar", choices=("bar", "json", "none"), help="progress display")

    i = sub.add_parser("info", help="show what a checkpoint holds", description="Print a checkpoint's metadata "
                       "(architecture, preprocessing, training summary) as JSON. Without a path: the default model.")
    i.add_argument("checkpoint", nargs="?", help="a ct2mr .safetensors checkpoint (default: the bundled model)")
    return parser


def _translate(args: argparse.Namespace) -> int:
    from .inference import InferenceSettings, translate_file
    from .progress import make_reporter

    reporter = make_reporter(args.progress)
    start = time.perf_counter()
    try:
        with reporter.capture_warnings():
            reporter.event("start", command="translate", input=args.input, output=args.output,
                           model=args.model or "default", device=args.device)
            settings = InferenceSettings(roi_size=args.roi_size, overlap=args.overlap,
                                         sw_batch_size=args.sw_batch_size, precision=args.precision,
                                         device=args.device)
            result = translate_file(args.input, args.output, args.model, settings, reporter)
    finally:
        reporter.close()
    info = result["info"]
    reporter.event("done", outputs=result["outputs"], seconds=round(time.perf_counter() - start, 3),
                   device=info["device"], precision=info["precision"], model=info["model_name"],
                   mean_error_hu=round(info["mean_error_hu"], 3))
    if args.progress != "json":
        print(f"Synthetic MR:  {result['outputs']['synthetic_mr']}\nRound-trip CT: {result['outputs']['roundtrip_ct']}"
              f"\nError map:     {result['outputs']['error_map']}\n({time.perf_counter() - start:.1f} s on "
              f"{info['device']}, mean |F(G(x)) - x| = {info['mean_error_hu']:.1f} HU)")
    return 0


def _train(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from .progress import make_reporter
    from .training import TrainConfig, train

    config = TrainConfig(
        name=args.name, steps=args.steps, patch_size=args.patch_size, batch_size=args.batch_size, lr=args.lr,
        lambda_cyc=args.lambda_cyc, lambda_id=args.lambda_id, seed=args.seed, device=args.device,
        threads=args.threads, checkpoint_every=args.checkpoint_every,
        generator={"name": "resnet", "base_channels": args.width, "n_blocks": args.blocks, "norm": "instance"},
        discriminator={"name": "patchgan", "base_channels": args.width, "n_layers": 3, "norm": "instance"})
    command = "ct2mr " + shlex.join(argv)
    if args.progress == "bar":
        from tqdm.auto import tqdm

        bar = tqdm(total=config.steps, unit="step", file=sys.stderr, desc="train")

        def progress(step: int, total: int, losses: dict[str, float]) -> None:
            bar.update(1)
            bar.set_postfix(cyc=f"{losses['cycle']:.3f}", G=f"{losses['G_adv']:.3f}",
                            D=f"{losses['D_MR'] + losses['D_CT']:.3f}", refresh=False)
    elif args.progress == "json":
        bar = None

        def progress(step: int, total: int, losses: dict[str, float]) -> None:
            print(json.dumps({"event": "progress", "stage": "train", "step": step, "fraction": step / total,
                              **{k: round(v, 5) for k, v in losses.items()}}), flush=True)
    else:
        bar, progress = None, None
    try:
        path = train(args.ct, args.mr, args.out, config, progress, command)
    finally:
        if bar is not None:
            bar.close()
    print(f"Checkpoint: {path}" if args.progress != "json" else json.dumps({"event": "done", "checkpoint": str(path)}))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .sampledata import demo_ct

    if args.input:
        ct, how = Path(args.input), "--input"
    else:
        fallbacks = [Path.cwd().parent / "shared" / "data" / "ct" / "thorax_cta_1p5mm.nii.gz"]
        if os.environ.get("CT2MR_DEMO_CT"):
            fallbacks.insert(0, Path(os.environ["CT2MR_DEMO_CT"]))
        ct, how = demo_ct(fallbacks, offline=args.offline)
    print(f"Demo CT: {ct} ({how})", file=sys.stderr)
    args.input, args.model, args.overlap, args.roi_size, args.sw_batch_size, args.precision = (
        str(ct), None, 0.25, None, 1, "auto")
    return _translate(args)


def _info(args: argparse.Namespace) -> int:
    from .checkpoint import default_model_path, read_metadata, sha256sum

    path = args.checkpoint or default_model_path()
    meta = read_metadata(path)
    meta["path"], meta["sha256"] = str(path), sha256sum(path)
    print(json.dumps(meta, indent=2))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``ct2mr`` command; returns the exit code (0 success, 1 error, 2 usage error)."""
    from .checkpoint import CheckpointError
    from .io import ImageReadError

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        if args.command == "translate":
            return _translate(args)
        if args.command == "train":
            return _train(args, argv)
        if args.command == "demo":
            return _demo(args)
        return _info(args)
    except (FileNotFoundError, ImageReadError, CheckpointError, ValueError, RuntimeError, OSError) as exc:
        message = str(exc) or type(exc).__name__
        if getattr(args, "progress", None) == "json":
            print(json.dumps({"event": "error", "message": message, "type": type(exc).__name__}), flush=True)
        print(f"ct2mr {args.command}: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"ct2mr {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
