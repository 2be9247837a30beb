"""``ct2mr translate CT -o OUT_DIR``: synthetic MR, round-trip CT and error map on the CT's grid
(:func:`ct2mr.inference.translate.translate_file`); over a folder, several paths or a list file: a resumable batch,
sharded under torchrun (:func:`ct2mr.inference.batch.translate_batch`). With the trust signals of issue 16:
``--uncertainty tta|ensemble`` (:mod:`ct2mr.inference.uncertainty`) and ``--ood`` (:mod:`ct2mr.inference.ood`)."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from typing import Sequence

from ct2mr.commands.common import (PROGRESS_HELP_LONG, LazyBar, add_precision_argument, add_progress_argument,
                                   add_window_arguments, inference_settings)

__all__ = ["NAME", "add_parser", "add_trust_arguments", "run", "done_fields"]

NAME = "translate"

EXAMPLES = """examples:
  ct2mr translate chest.nii.gz -o out/
  ct2mr translate dicom_series_folder/ -o out/ --model run/model.safetensors --device cuda
  ct2mr translate chest.nrrd -o out/ --overlap 0.25 --progress json
  ct2mr translate ct_folder/ -o out/                        # batch: out/<case>/..., out/translate_summary.json
  ct2mr translate a.nii.gz b.nrrd dicom_series_folder/ -o out/
  ct2mr translate cases.txt -o out/                         # list file: one path per line, # comments
  ct2mr translate cases.txt -o out/ --overwrite             # recompute cases that are already done
  ct2mr translate chest.nii.gz -o out/ --uncertainty tta --ood   # + uncertainty.nii.gz (4 extra G passes), ood.json
  ct2mr translate chest.nii.gz -o out/ --model a.safetensors --model b.safetensors --uncertainty ensemble
  torchrun --nproc-per-node 4 -m ct2mr translate cases.txt -o out/ --device cuda

single vs batch: one CT file or one DICOM series folder writes OUT_DIR/synthetic_mr.nii.gz, roundtrip_ct.nii.gz
and error_map.nii.gz (an OUT_DIR that already holds them is refused unless --overwrite). A folder of volumes
(image files and DICOM series sub-folders), several paths, or a list file (.txt, .lst, .csv: one path per line, '#'
comment lines, relative paths relative to the list file; .csv: first column) is a batch: OUT_DIR/<case>/ per volume
(<case> = file name without suffix, _2, _3 ... on collisions) and OUT_DIR/translate_summary.json (per case: input,
status done/skipped/failed, seconds, error). The model is loaded once and the next CT is read and preprocessed while
the current one is translated.
resume: a case is skipped when its outputs and OUT_DIR/<case>/.ct2mr_done.json (input path, size and modification
time, model SHA-256, settings) match; a crash mid-case leaves no partial outputs, so rerunning the same command
finishes the batch. A failing case is recorded and the others go on; exit status 1 when any case failed.
checks before the work: OUT_DIR is created and a probe file written first; the free disk space, the 1 mm network
grid and the estimated memory are checked; the input must look like a CT in HU (air/lung/fat, soft tissue, CT range;
not constant; --force overrides) with spacings of 0.1-20 mm; NaN/inf voxels are replaced by -1024 HU. Every output is
fsynced and read back before it gets its name: a full disk ends with exit status 1 and no partial file.
torchrun / clusters: every process (RANK of WORLD_SIZE, e.g. torchrun --nproc-per-node N, multi-node alike, or a
scheduler that sets RANK and WORLD_SIZE) takes every WORLD_SIZE-th case of the sorted list, runs on
cuda:LOCAL_RANK (when --device is auto or cuda and CUDA is available) and writes its own cases and
OUT_DIR/translate_summary.rank<RANK>.json. No process group is created and no process waits for another.
"""

DESCRIPTION = (
    "Translate a CT with generator G (CT -> MR) and back with F (MR -> CT). Writes OUT_DIR/synthetic_mr.nii.gz "
    "(normalised MR intensity in [-1, 1]), OUT_DIR/roundtrip_ct.nii.gz (HU) and OUT_DIR/error_map.nii.gz "
    "(|F(G(x)) - x| in HU, x clipped to the CT window), each on exactly the input's voxel grid.")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``ct2mr translate`` to ``subparsers`` and return its parser."""
    t = subparsers.add_parser(NAME, help="translate a CT into a synthetic MR (+ round trip and error map)",
                              description=DESCRIPTION, epilog=EXAMPLES,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("inputs", nargs="+", metavar="INPUT", help="CT volume(s) in HU: NIfTI, NRRD, MHA, HDF5 "
                   "('volume' dataset) or a DICOM series folder; or a folder of them, or a list file (.txt, .lst, "
                   ".csv) for a batch (see below)")
    t.add_argument("-o", "--output", required=True, metavar="OUT_DIR", help="output folder (created if missing)")
    t.add_argument("--overwrite", action="store_true", help="one CT: replace outputs already in OUT_DIR (without "
                   "it such a folder is refused before any work); batch: recompute cases that are already done "
                   "(default: skip them)")
    t.add_argument("--force", action="store_true", help="translate a volume that fails the CT plausibility check "
                   "(HU statistics: air/lung, soft tissue and CT-range shares; a constant volume), e.g. a CT in "
                   "unusual units; spacings outside 0.1-20 mm stay refused")
    t.add_argument("--model", metavar="PATH", action="append", help="ct2mr checkpoint (.safetensors); default: the "
                   "bundled model. Give it more than once for --uncertainty ensemble: the first model writes the "
                   "outputs, the others only add their G(x) to the uncertainty map")
    add_window_arguments(t, device_help="auto (CUDA if available), cpu, cuda or cuda:N (default: %(default)s; falls "
                         "back to CPU with a warning when CUDA is missing)",
                         overlap_help="sliding-window overlap in [0, 1) (default: %(default)s)",
                         roi_help="window size in voxels (1 or 3 multiples of 4; default: the model's, at least 96)")
    t.add_argument("--gpu-memory-gb", type=float, metavar="GB", help="cap on the GPU memory this run may use; the "
                   "window batch and the stitching buffer (GPU or CPU) are planned within it (default: all free "
                   "memory)")
    t.add_argument("--reference-path", action="store_true", help="run the plain reference path instead of the fast "
                   "path: the networks as trained, one window per pass unless --sw-batch-size, no memory planning "
                   "(with --precision fp32: the fp32 reference the fast path is tested against)")
    add_precision_argument(t, "autocast precision; auto = bf16/fp16 on CUDA, fp32 on CPU (default: %(default)s)")
    add_progress_argument(t, PROGRESS_HELP_LONG)
    _add_output_arguments(t)
    add_trust_arguments(t)  # issue 16: uncertainty map and out-of-distribution score
    return t


def _add_output_arguments(t: argparse.ArgumentParser) -> None:
    """``--harmonize``, ``--reference-mr``, ``--warp-check`` and ``--analysis``: what translate adds to its outputs."""
    t.add_argument("--harmonize", default="none", choices=("none", "histogram", "nyul", "zscore"),
                   help="post-hoc intensity harmonisation of the synthetic MR (thesis 7.6): histogram matching to the "
                   "reference MR, Nyul landmark standardisation learned from the reference MR(s), or median/MAD "
                   "standardisation in the CT's body mask (matched to the reference's median/MAD; without a "
                   "reference: robust z-scores) (default: %(default)s)")
    t.add_argument("--reference-mr", nargs="+", metavar="PATH", help="reference MR file(s) or folder(s) for "
                   "--harmonize (required by histogram and nyul)")
    t.add_argument("--warp-check", action="store_true", help="anatomy checks (thesis 5, P1/E2): edge correlation, "
                   "gradient-magnitude similarity and NMI of x and G(x) in the body, and a deformable B-spline "
                   "registration (Mattes MI, ~50 mm control points, 3 mm working grid) of G(x) onto x; also writes "
                   "OUT_DIR/displacement_mm.nii.gz (|displacement| in mm on the input's grid; near 0 when G moved no "
                   "anatomy) and OUT_DIR/anatomy.json (metrics, mean/p95 displacement, settings). Adds ~10-60 s")
    t.add_argument("--analysis", action="store_true", help="also write OUT_DIR/analysis.json (a batch: "
                   "OUT_DIR/<case>/analysis.json; and put it in the done / case_done event): cycle SSIM/PSNR/MAE of "
                   "x vs F(G(x)), W1 vs the --reference-mr histogram, edge correlation, GMS and NMI of x vs G(x), "
                   "and the intensity histograms, all in the CT's body mask (ct2mr.evaluation.translation_analysis); "
                   "for front ends that show them")


# --- issue 16: trust signals (uncertainty map, out-of-distribution score) ---------------------------------------

def add_trust_arguments(t: argparse.ArgumentParser) -> None:
    """Declare ``--uncertainty tta|ensemble``, ``--uncertainty-passes``, ``--ood`` and ``--ood-threshold``."""
    from ct2mr.inference.ood import OOD_THRESHOLD
    from ct2mr.inference.uncertainty import (
        DEFAULT_MAX_SHIFT,
        DEFAULT_TTA_PASSES,
        UNCERTAINTY_MODES,
    )

    t.add_argument("--uncertainty", default="none", choices=UNCERTAINTY_MODES, help="also write "
                   "OUT_DIR/uncertainty.nii.gz: the voxel-wise standard deviation of G(x) (normalised MR units, on "
                   "the input's grid). tta: G(x) and G on N flipped and shifted copies of the CT (flips along x, y, "
                   f"z; shifts of 1-{DEFAULT_MAX_SHIFT} voxels), undone before aggregation; COSTS N EXTRA PASSES OF "
                   "G (--uncertainty-passes). ensemble: G(x) of every --model given (one extra pass per further "
                   "model). High spread marks where G is unstable, not where it is wrong (default: %(default)s)")
    t.add_argument("--uncertainty-passes", type=int, default=DEFAULT_TTA_PASSES, metavar="N", help="augmented "
                   "passes of --uncertainty tta, each one more pass of G (default: %(default)s)")
    t.add_argument("--ood", action="store_true", help="out-of-distribution check, before the networks run: summary "
                   "statistics of the CT (HU percentiles and lung/dense shares in the body, body extent and "
                   "cross-section, slice thickness) against those of the model's training CTs; the score (largest "
                   "standardised deviation, ct2mr.inference.ood) is printed, sent as an 'ood' event and in the done "
                   "event, and written to OUT_DIR/ood.json; above --ood-threshold a warning says the input differs "
                   "from the training CTs. About a second")
    t.add_argument("--ood-threshold", type=float, default=OOD_THRESHOLD, metavar="Z", help="score above which "
                   "--ood warns (default: %(default)s)")


def _models(args: argparse.Namespace) -> list[str]:
    """The --model paths of translate (repeatable); sets ``args.model`` to the first (or None)."""
    models = args.model if isinstance(args.model, list) else ([args.model] if args.model else [])
    args.model = models[0] if models else None
    return models


def _trust_stage_weights(args: argparse.Namespace, models: list[str]) -> dict | None:
    """Progress weights with the uncertainty passes (``None``: the default weights)."""
    mode = getattr(args, "uncertainty", "none")
    passes = args.uncertainty_passes if mode == "tta" else max(0, len(models) - 1) if mode == "ensemble" else 0
    if passes <= 0:
        return None
    from ct2mr.inference.uncertainty import stage_weights

    return stage_weights(passes)


def _trust_extensions(args: argparse.Namespace, models: list[str], settings, reporter) -> list:
    """The translate_file extensions of --uncertainty and --ood (issue 16), checked before any work.

    Raises:
        ValueError: several models without ``--uncertainty ensemble``, or an ensemble of fewer than two.
        CheckpointError: a further ``--model`` is not a usable checkpoint.
    """
    mode = getattr(args, "uncertainty", "none")
    if len(models) > 1 and mode != "ensemble":
        raise ValueError(f"{len(models)} --model paths were given; several models are only used by --uncertainty "
                         "ensemble.")
    extensions = []
    if getattr(args, "ood", False):
        from ct2mr.inference.ood import OodCheck, describe

        def on_result(result: dict) -> None:
            reporter.event("ood", **{k: result[k] for k in ("score", "threshold", "ood_warning", "top_features",
                                                             "reference")})
            if result.get("ood_warning"):
                reporter.event("warning", message=describe(result))
            elif args.progress != "json":
                print(f"ct2mr translate: {describe(result)}", file=sys.stderr)

        extensions.append(OodCheck(args.ood_threshold, on_result))
    if mode != "none":
        from ct2mr.inference.uncertainty import UncertaintyOutput
        from ct2mr.models.checkpoint import load_checkpoint

        if mode == "ensemble" and len(models) < 2:
            raise ValueError("--uncertainty ensemble needs at least two models: give --model more than once.")
        members = [load_checkpoint(path) for path in models[1:]] if mode == "ensemble" else []
        extensions.append(UncertaintyOutput(mode, args.uncertainty_passes, members, settings))
    return extensions


def _print_trust(info: dict, outputs: dict) -> None:
    """The uncertainty and OOD lines of translate's human summary."""
    if info.get("uncertainty"):
        from ct2mr.inference.uncertainty import describe

        print(f"Uncertainty:   {outputs['uncertainty']}\n{describe(info['uncertainty'])}")
    if info.get("ood"):
        from ct2mr.inference.ood import describe

        print(f"OOD check:     {outputs['ood']}\n{describe(info['ood'])}")


def _refuse_trust_in_batch(args: argparse.Namespace, models: list[str]) -> None:
    """--uncertainty, --ood and several --model are single-CT options (for now).

    Raises:
        ValueError: one of them was given for a batch.
    """
    if getattr(args, "uncertainty", "none") != "none" or getattr(args, "ood", False) or len(models) > 1:
        raise ValueError("--uncertainty, --ood and several --model paths work on one CT at a time; run ct2mr "
                         "translate once per CT for them.")


# --- one CT ----------------------------------------------------------------------------------------------------

def run(args: argparse.Namespace, argv: Sequence[str] = ()) -> int:
    """Translate one CT (or, for several inputs, a folder or a list file, a batch: :func:`_run_batch`).

    ``ct2mr demo`` calls it too, with ``args.input`` instead of ``args.inputs``.

    Returns:
        0; a batch: 1 when any case failed or its summary could not be written.

    Raises:
        FileNotFoundError, ImageReadError, CheckpointError, ValueError, RuntimeError, OSError: reported by
        :func:`ct2mr.cli.main`, with no partial output left.
    """
    from ct2mr.inference.batch import is_single_input
    from ct2mr.inference.translate import translate_file
    from ct2mr.progress import make_reporter

    inputs = list(getattr(args, "inputs", None) or [args.input])  # `ct2mr demo` sets args.input
    models = _models(args)  # issue 16: --model may be repeated (ensemble)
    if not is_single_input(inputs):
        _refuse_trust_in_batch(args, models)  # issue 16
        return _run_batch(args, inputs)
    args.input = inputs[0]
    reporter = make_reporter(args.progress, _trust_stage_weights(args, models))
    start = time.perf_counter()
    try:
        with reporter.capture_warnings():
            reporter.event("start", command="translate", input=args.input, output=args.output,
                           model=args.model or "default", device=args.device)
            settings = _inference_settings(args)
            extensions = _trust_extensions(args, models, settings, reporter)
            overwrite = getattr(args, "overwrite", None)
            if overwrite is None:  # `ct2mr demo` rewrites its own output folder
                overwrite = args.command == "demo"
            result = translate_file(args.input, args.output, args.model, settings, reporter,
                                    getattr(args, "harmonize", "none"), getattr(args, "reference_mr", None),
                                    warp_check=getattr(args, "warp_check", False), overwrite=overwrite,
                                    force=getattr(args, "force", False), extensions=extensions)
            analysis = _analysis(args, result, reporter) if getattr(args, "analysis", False) else None
    finally:
        reporter.close()
    info = result["info"]
    reporter.event("done", outputs=result["outputs"], seconds=round(time.perf_counter() - start, 3),
                   **done_fields(info), analysis=analysis,
                   **{k: info[k] for k in ("uncertainty", "ood") if k in info})  # issue 16
    if args.progress != "json":
        _print_summary(result, info, time.perf_counter() - start)
    return 0


def _print_summary(result: dict, info: dict, seconds: float) -> None:
    """The human summary of one translation: outputs, time, device, mean round-trip error, anatomy and trust."""
    print(f"Synthetic MR:  {result['outputs']['synthetic_mr']}\nRound-trip CT: {result['outputs']['roundtrip_ct']}"
          f"\nError map:     {result['outputs']['error_map']}\n({seconds:.1f} s on "
          f"{info['device']}, mean |F(G(x)) - x| = {info['mean_error_hu']:.1f} HU)")
    if info.get("anatomy"):
        from ct2mr.evaluation.anatomy import describe

        print(describe(info["anatomy"]) + f"\nDisplacement:  {result['outputs']['displacement_mm']}")
    _print_trust(info, result["outputs"])  # issue 16


def _inference_settings(args: argparse.Namespace):
    """InferenceSettings from the translate flags; tunes the CPU allocator for the fast path (process-wide)."""
    from ct2mr.inference.fastpath import tune_cpu_allocator

    fast = not getattr(args, "reference_path", False)
    if fast:
        tune_cpu_allocator()
    return inference_settings(args, fast=fast, gpu_memory_gb=getattr(args, "gpu_memory_gb", None))


def _ct_window(info: dict) -> list[float]:
    """The CT window (HU) of the model that ran, for the done event (front ends display with it)."""
    from ct2mr.evaluation.translation_analysis import ct_window_of

    return list(info["ct_window"]) if info.get("ct_window") else ct_window_of(info)


def done_fields(info: dict) -> dict:
    """What the ``done`` event (one CT) and each ``case_done`` event (batch) report of a translation's ``info``:
    device, precision, model, mean error (HU), stage seconds, window batch, stitching device, fast path, GPU peak
    (MiB), anatomy (warp check) and CT window (HU). Keys a skipped batch case does not know are ``None``."""
    mean_error = info.get("mean_error_hu")
    return {"device": info.get("device"), "precision": info.get("precision"), "model": info.get("model_name"),
            "mean_error_hu": None if mean_error is None else round(mean_error, 3),
            "stage_seconds": info.get("seconds"), "sw_batch_size": info.get("sw_batch_size"),
            "stitch_device": info.get("stitch_device"), "fast": info.get("fast"),
            "gpu_peak_mib": info.get("gpu_peak_mib"), "anatomy": info.get("anatomy"),
            "ct_window": _ct_window(info)}


def _analysis(args: argparse.Namespace, result: dict, reporter) -> dict:
    """``translate --analysis``: metrics table and histograms (ct2mr.evaluation.translation_analysis) into
    OUT_DIR/analysis.json."""
    from ct2mr.evaluation.translation_analysis import analyze_outputs
    from ct2mr.io.images import read_image

    analysis = analyze_outputs(
        read_image(args.input), result["outputs"], result["info"], args.output, getattr(args, "reference_mr", None),
        lambda fraction, message: reporter.event("progress", stage="analysis", fraction=1.0,
                                                 stage_fraction=round(fraction, 4), message=message))
    if analysis["error"]:
        reporter.event("warning", message=f"analysis incomplete: {analysis['error']}")
    return analysis


# --- a batch ---------------------------------------------------------------------------------------------------

def _on_case(args: argparse.Namespace, reporter, bar: LazyBar):
    """The per-case callback of a batch: the case bar (``--progress bar``), ``case_done`` and ``case`` events
    (``json``), or ``None``."""
    if args.progress == "bar":
        rank = os.environ.get("RANK", "0")
        desc = f"translate [rank {rank}]" if os.environ.get("WORLD_SIZE", "1") != "1" else "translate"

        def on_case(index: int, total: int, result) -> None:
            shown = bar.open(total=total, unit="case", desc=desc)
            shown.set_postfix_str(f"{result.status} {result.case_id}"[:40])
            if result.status != "running":
                shown.update(1)
            elif hasattr(reporter, "bar"):  # the stage bar starts again for every case
                reporter.bar.reset(total=100)
        return on_case
    if args.progress == "json":
        def on_case(index: int, total: int, result) -> None:
            if result.status in ("done", "skipped"):  # what a front end loads, before the case's final status
                reporter.event("case_done", index=index, total=total, case=result.case_id, input=result.input,
                               status=result.status, seconds=round(result.seconds, 3), outputs=result.outputs,
                               output_dir=os.path.join(args.output, result.case_id),
                               **done_fields(result.info), analysis=result.info.get("analysis"))
            reporter.event("case", index=index, total=total, **result.to_dict())
        return on_case
    return None


def _run_batch(args: argparse.Namespace, inputs: list[str]) -> int:
    """Translate a batch (:func:`ct2mr.inference.batch.translate_batch`); print the summary and the failed cases.

    Returns:
        1 when any case failed or the summary could not be updated, else 0.
    """
    from ct2mr.inference.batch import translate_batch
    from ct2mr.progress import make_reporter

    extra = {"warp_check": True} if getattr(args, "warp_check", False) else {}
    settings = _inference_settings(args)
    reporter = make_reporter(args.progress)
    try:
        with LazyBar() as bar, reporter.capture_warnings():
            reporter.event("start", command="translate", mode="batch", inputs=inputs, output=args.output,
                           model=args.model or "default", device=args.device)
            summary = translate_batch(inputs, args.output, args.model, settings, reporter,
                                      _on_case(args, reporter, bar),
                                      getattr(args, "overwrite", False), getattr(args, "harmonize", "none"),
                                      getattr(args, "reference_mr", None), command="ct2mr " + shlex.join(sys.argv[1:]),
                                      force=getattr(args, "force", False),
                                      analysis=getattr(args, "analysis", False), **extra)
    finally:
        reporter.close()
    reporter.event("done", mode="batch", summary=str(summary.summary), seconds=round(summary.seconds, 3),
                   device=summary.device, **{status: summary.count(status) for status in ("done", "skipped",
                                                                                          "failed")})
    if args.progress != "json":
        print(summary.text())
    for result in summary.failed:
        print(f"ct2mr translate: error: {result.case_id} ({result.input}): {result.error}", file=sys.stderr)
    if summary.summary_error:
        print(f"ct2mr translate: error: the summary {summary.summary} could not be updated: {summary.summary_error}",
              file=sys.stderr)
    return 1 if summary.failed or summary.summary_error else 0
