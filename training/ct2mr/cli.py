"""The ``ct2mr`` command line: argument parsing only; the work is done by the library modules.

Sub-commands:

* ``ct2mr preprocess --modality ct|mr INPUTS... --out DIR``: the thesis's preprocessing chain over a collection,
  into training-ready HDF5 (:func:`ct2mr.batch.preprocess_batch`).
* ``ct2mr qc DIR... --out QC_DIR``: Table 2, clipped voxels, left-right check and figures (:func:`ct2mr.qc.run_qc`).
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

EXAMPLES_PREPROCESS = """examples:
  ct2mr preprocess --modality ct ct_folder/ dicom_series_folder/ --out prep/ct
  ct2mr preprocess --modality mr cine_4d.nii.gz --select 0 5 10 --out prep/mr --n4
  ct2mr preprocess --modality mr mr_folder/ --out prep/mr --mr-percentiles 0.5 99.5 --k 32 --jobs 2
  ct2mr train --ct prep/ct --mr prep/mr --out runs/m1      # preprocessed files are used as they are

outputs: DIR/<stem>.h5 (DIR/<stem>_tNNN.h5 per volume of a 4D series): dataset 'volume' (float32, (z, y, x),
[-1, 1]) and attributes (source, shape, spacing, origin, direction, padding, every parameter, clipped voxels,
software versions, git commit, config, timestamp); DIR/preprocess_log.jsonl: one line per volume and run.
Exit status 1 when any volume failed (the others are still written).
"""

EXAMPLES_QC = """examples:
  ct2mr qc prep/ct prep/mr --out qc/
  ct2mr qc prep/ --out qc/ --example chest_ct_lung2 cardiac_cine_t000 --no-figures

outputs: QC_DIR/table2.csv, table2.md (thesis Table 2 + clipped voxels), volumes.csv (one row per volume),
qc_report.md (printed), and <modality>_triplanar.png, <modality>_histogram_raw.png,
<modality>_histogram_preprocessed.png (thesis figures 12-17).
"""

EXAMPLES_TRAIN = """examples:
  ct2mr train --ct ct_folder/ --mr mr_folder/ --out runs/m1
  ct2mr train --ct a.nii.gz b.nrrd --mr cine_4d.nii.gz --out runs/small --steps 200 --patch-size 48 --width 8
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``ct2mr`` command."""
    parser = argparse.ArgumentParser(
        prog="ct2mr", description="Unpaired 3D CT -> MR translation (CycleGAN family) for thoracic imaging: "
        "preprocess (and qc), train, translate.")
    parser.add_argument("--version", action="version", version=f"ct2mr {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details (INFO level) to stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("preprocess", help="preprocess CT or MR collections into training-ready HDF5 volumes",
                       description="The preprocessing chain of the thesis (section 4, Algorithm 1) over files and "
                       "folders (NIfTI, NRRD, MHA, HDF5 'volume' datasets, DICOM series folders; 4D series split into "
                       "3D volumes): reorient to RAS from the direction cosines, resample to 1 mm with trilinear "
                       "interpolation (size round(n * s / t); background: median for float, minimum for integer "
                       "images), pad symmetrically to a multiple of K with the minimum, then CT: clip to the HU window "
                       "-> [-1, 1]; MR: optional N4 bias-field correction, clip to the volume's percentiles -> "
                       "[-1, 1] (a flat MR is warned about, zeroed and flagged). Volumes run in parallel; outputs "
                       "that are up to date (same source, size, modification time and parameters) are skipped; "
                       "writes are atomic and never touch the inputs; a failed volume does not stop the others.",
                       epilog=EXAMPLES_PREPROCESS, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    p.add_argument("--progress", default="bar", choices=("bar", "json", "none"),
                   help="bar for people, json (one object per stdout line) for programs (default: %(default)s)")

    q = sub.add_parser("qc", help="quality control of preprocessed collections (Table 2, clipping, orientation)",
                       description="Quality control of `ct2mr preprocess` outputs (CT and MR, in one folder or "
                       "several): the thesis's Table 2 (clip percentiles, median P1 and P99, flagged volumes) and the "
                       "percentage of clipped voxels per modality, a left-right orientation check (which side the "
                       "heart/mediastinum falls on, per volume; a modality whose majority has it on the patient's "
                       "right is flagged), and the raw-vs-preprocessed tri-planar views and log-frequency histograms "
                       "with the clipping bounds (thesis figures 12-17). The raw view re-reads the source when it is "
                       "still reachable and unchanged.",
                       epilog=EXAMPLES_QC, formatter_class=argparse.RawDescriptionHelpFormatter)
    q.add_argument("dirs", nargs="+", metavar="DIR", help="folders of preprocessed HDF5 files (or single files)")
    q.add_argument("--out", required=True, metavar="QC_DIR", help="folder for the tables and figures")
    q.add_argument("--example", nargs="+", metavar="NAME", help="volume names shown in the tri-planar figures "
                   "(default: the first non-flat volume of each modality)")
    q.add_argument("--no-figures", action="store_true", help="tables and report only")

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


def _preprocess(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from .batch import preprocess_batch
    from .preprocessing import PreprocessingConfig

    config = PreprocessingConfig(target_spacing=args.spacing, k=args.k, ct_window=tuple(args.ct_window),
                                 mr_percentiles=tuple(args.mr_percentiles), n4=args.n4, n4_shrink=args.n4_shrink)
    bar = None
    if args.progress == "bar":
        from tqdm.auto import tqdm

        def progress(done: int, total: int, result) -> None:  # noqa: ANN001
            nonlocal bar
            if bar is None:  # created at the first volume, so that up-front errors stay one line
                bar = tqdm(total=total, unit="vol", file=sys.stderr, desc=f"preprocess {args.modality}")
            bar.update(1)
            bar.set_postfix_str(f"{result.status} {result.name}"[:40])
            for message in result.warnings:
                bar.write(f"ct2mr preprocess: warning: {result.name}: {message}", file=sys.stderr)
            if result.status == "failed":
                bar.write(f"ct2mr preprocess: FAILED {result.name}: {result.message}", file=sys.stderr)
    elif args.progress == "json":
        def progress(done: int, total: int, result) -> None:  # noqa: ANN001
            print(json.dumps({"event": "progress", "stage": "preprocess", "fraction": round(done / total, 4),
                              "volume": result.to_dict()}), flush=True)
    else:
        def progress(done: int, total: int, result) -> None:  # noqa: ANN001
            for message in result.warnings:
                print(f"ct2mr preprocess: warning: {result.name}: {message}", file=sys.stderr)
    try:
        summary = preprocess_batch(args.inputs, args.out, args.modality, config, args.select, args.jobs, args.force,
                                   progress, "ct2mr " + shlex.join(argv))
    finally:
        if bar is not None:
            bar.close()
    if args.progress == "json":
        print(json.dumps({"event": "done", "out": str(summary.out_dir), "seconds": round(summary.seconds, 3),
                          **{status: summary.count(status) for status in ("ok", "skipped", "failed")},
                          "flagged": [r.name for r in summary.flagged], "log": str(summary.log)}), flush=True)
    else:
        print(summary.text())
    return 1 if summary.failed else 0


def _qc(args: argparse.Namespace) -> int:
    from .qc import run_qc

    report = run_qc(args.dirs, args.out, figures=not args.no_figures, examples=args.example)
    print(report.markdown)
    print(f"Written to {report.out_dir}: {', '.join(p.name for p in report.files)}")
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
        if args.command == "preprocess":
            return _preprocess(args, argv)
        if args.command == "qc":
            return _qc(args)
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
