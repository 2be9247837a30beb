"""A stand-in for ``python -m ct2mr translate ... --progress json`` used by the Logic tests.

It is a real process that honours the engine's contract (one JSON event per stdout line; outputs
``synthetic_mr.nii.gz``, ``roundtrip_ct.nii.gz`` and ``error_map.nii.gz`` on the input's voxel grid), with simple
arithmetic in place of the networks, so that the Logic is tested end to end without torch or a model:

- synthetic MR = clip((x + 600) / 1600, 0, 1) * 2 - 1 (the thesis's CT normalisation, section 4), in [-1, 1];
- round-trip CT = the inverse mapping back to HU (so values outside [-600, 1000] HU are clipped);
- error map = |round-trip CT - x| (HU);
- with ``--warp-check``: displacement_mm.nii.gz = 0.1 mm per slice index (z) inside the body (x > -500 HU), 0
  outside, and anatomy.json with fixed edge/GMS/NMI values (:data:`ANATOMY`) and the displacement's mean, p95 and
  max inside the body; the ``done`` event carries the same ``anatomy`` dict;
- with ``--analysis``: analysis.json in the engine's layout (``ct2mr.evaluation.translation_analysis``) from arithmetic
  (:func:`fakeAnalysis`): histograms of G(x) in the body (x > -500 HU) and of the reference MR on 128 bins, rows
  ``MAE_cyc``, ``MAE_cyc (HU)`` (mean |F(G(x)) - x| in the body), ``W1`` with a reference, and the anatomy rows with
  the warp check; the ``done`` event carries the same ``analysis`` and the ``ct_window`` [-600, 1000].

``--mode`` (before the sub-command) selects a behaviour: ``ok``, ``fail`` (error event, exit 2), ``crash``
(traceback on stderr, exit 1), ``shifted`` (outputs with the origin moved by 2 mm), ``resized`` (outputs one slice
short), ``nodone`` (exit 0 without a done event), ``sleep`` (starts a child process, reports its pid, then waits),
``oom`` (the engine's own out-of-memory retry: a warning, then success), ``oomalways`` (the engine's out-of-memory
error after its retries, exit 1), ``slow`` (like ``ok``, after 0.5 s), ``anatomyfile`` (like ``ok``, but the
``done`` event carries neither ``anatomy`` nor ``analysis``: only the JSON files have them).

Trust signals (issue 16), as ``ct2mr translate`` reports them: ``--uncertainty tta`` writes
``uncertainty.nii.gz`` (:func:`fakeUncertainty`: 0.01 + 0.05 |G(x)|, on the input's grid; ``shifted``/``resized``
spoil it like the other outputs) and a ``done`` field ``uncertainty`` (mode, extra_passes, cost, body summary);
``--ood`` an ``ood`` event, ``ood.json`` and a ``done`` field ``ood`` with the score :data:`OOD_SCORE` (within range),
or :data:`OOD_WARNING_SCORE` and ``ood_warning: true`` (with a ``warning`` event) in mode ``ood``. Both are refused in
batch mode, as the engine refuses them. ``fake_ct2mr.py qa SYNTHETIC REFERENCE -o DIR [--ct CT]`` is ``ct2mr qa``:
``difference.nii.gz`` (synthetic - reference normalised by its P1-P99 to [-1, 1], on the synthetic MR's grid; a
reference on another grid is refused as the engine does), ``qa_metrics.json`` (MAE, PSNR, SSIM 0.5, MS-SSIM 0.625)
and a ``done`` event with the outputs and metrics.

Like the real engine, it has no CUDA: ``--device cuda`` gives the engine's fallback warning and runs "on the CPU".
Every ``ct2mr translate`` option the Logic passes is accepted; ``--reference-mr`` files must exist.

A batch (several inputs, or a ``.txt``/``.lst`` list file) runs as the engine's batch mode does
(``ct2mr.inference.batch``): cases sorted by path, named by the file name without suffix, outputs in
``OUT_DIR/<case>/``; one ``start`` event (``"mode": "batch"``, after the CUDA fallback warning as in the engine), per
case ``case`` (running), its events, then for a finished case ``case_done`` (what the single ``done`` event reports)
and ``case`` (done), for a failed one ``case`` (failed, with the error; ``fail`` and ``oomalways`` fail only that
case); then ``OUT_DIR/translate_summary.json`` and ``done`` (``"mode": "batch"``, counts), exit status 1 when a case
failed. ``--mode`` may then list one mode per case, comma-separated (``ok,fail,ok``; the last one repeats);
``crash`` and ``nodone`` end the whole process at that case, ``sleep`` keeps it there.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ANATOMY = {"edge_correlation": 0.875, "gradient_magnitude_similarity": 0.8125, "gmsd": 0.125, "nmi": 1.25}
"""Fixed anatomy values the fake engine reports with ``--warp-check``."""

CT_WINDOW = [-600.0, 1000.0]

OOD_SCORE = 1.25
"""The fake engine's OOD score within range."""

OOD_WARNING_SCORE = 5.97
"""The fake engine's OOD score in mode ``ood`` (the cross-section feature exceeds)."""


def fakeUncertainty(synthetic):
    """The fake uncertainty map: 0.01 + 0.05 |G(x)| (normalised MR units), (z, y, x)."""
    import numpy as np

    return (0.01 + 0.05 * np.abs(synthetic)).astype(np.float32)


def fakeOod(mode: str, threshold: float) -> dict:
    """The fake ``ood`` block: the engine's layout (``ct2mr.inference.ood.assess``) with fixed numbers."""
    warn = mode == "ood"
    z = OOD_WARNING_SCORE if warn else OOD_SCORE
    return {"score": z, "threshold": threshold, "ood_warning": z > threshold,
            "top_features": ["cross_section_cm2", "lung_fraction"],
            "features": {"cross_section_cm2": {"value": 190.0 if warn else 640.0, "mean": 671.0, "std": 60.0,
                                               "tolerance": 50.0, "z": z},
                         "lung_fraction": {"value": 0.18, "mean": 0.2, "std": 0.02, "tolerance": 0.05, "z": 0.4}},
            "reference": "fake training CTs", "seconds": 0.0}


def fakeAnalysis(ct, synthetic, roundTrip, reference, anatomy):
    """The engine's analysis layout, from arithmetic (see the module docstring)."""
    import numpy as np

    body = ct > -500.0
    edges = np.linspace(-1.0, 1.0, 129)

    def percent(values):
        counts = np.histogram(np.clip(values, -1, 1), bins=128, range=(-1.0, 1.0))[0].astype(float)
        return (100.0 * counts / max(counts.sum(), 1.0)).tolist()

    columns = {"Synthetic MR": percent(synthetic[body])}
    maeHU = float(np.abs(roundTrip - ct)[body].mean()) if body.any() else 0.0
    rows = [{"name": "MAE_cyc", "key": "mae_cyc", "value": maeHU / 800.0, "unit": "normalised", "definition": "fake"},
            {"name": "MAE_cyc (HU)", "key": "mae_cyc_hu", "value": maeHU, "unit": "HU", "definition": "fake"}]
    if reference is not None:
        low, high = np.percentile(reference, [1, 99])
        values = np.clip((reference - low) / max(high - low, 1e-6), 0, 1) * 2 - 1
        columns["Reference MR"] = percent(values.ravel())
        a, b = np.cumsum(columns["Synthetic MR"]) / 100.0, np.cumsum(columns["Reference MR"]) / 100.0
        rows.append({"name": "W1", "key": "w1", "value": float(np.abs(a - b).sum() * 2 / 128), "unit": "normalised",
                     "definition": "fake"})
    for name, key in (("Edge correlation", "edge_correlation"), ("GMS", "gradient_magnitude_similarity"),
                      ("NMI", "nmi"), ("Displacement mean (mm)", "displacement_mean_mm"),
                      ("Displacement p95 (mm)", "displacement_p95_mm")):
        if anatomy and key in anatomy:
            rows.append({"name": name, "key": key, "value": float(anatomy[key]), "unit": "", "definition": "fake"})
    return {"version": 1, "ct_window": CT_WINDOW,
            "histogram": {"bins": 128, "range": [-1.0, 1.0], "centres": (0.5 * (edges[:-1] + edges[1:])).tolist(),
                          "columns": columns},
            "metrics": {row["key"]: row["value"] for row in rows}, "rows": rows, "error": ""}


def emit(**event) -> None:
    print(json.dumps(event), flush=True)


class CaseFailed(Exception):
    """A case that fails with an ``error`` message (single: an ``error`` event; batch: the case's status)."""

    def __init__(self, message: str, exitCode: int) -> None:
        super().__init__(message)
        self.exitCode = exitCode


def translateOne(inputPath: str, outputDir: str, args, mode: str) -> dict | None:
    """Translate one CT (see the module docstring); returns the ``done`` event's fields, ``None`` for ``nodone``.

    Raises:
        CaseFailed: modes ``fail`` and ``oomalways``.
    """
    roi = (args.roi_size or [96])[0]
    if mode == "oomalways":
        emit(event="progress", stage="G", fraction=0.2, message="G(x)")
        raise CaseFailed("Out of memory on cuda:0 while translating a [128, 128, 128] volume, even with one window "
                         "per pass and CPU stitching. Try a smaller --roi-size, or --device cpu.", 1)
    if mode == "oom":
        emit(event="warning", message=f"Out of memory on cuda:0 with {args.sw_batch_size or 4} windows per pass; "
             "retrying with 1.", category="RuntimeWarning")
    if mode == "slow":
        time.sleep(0.5)
    if mode == "sleep":
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        emit(event="progress", stage="G", fraction=0.1, message="sleeping", child_pid=child.pid)
        time.sleep(120)
        sys.exit(0)
    if mode == "crash":
        raise MemoryError("fake CUDA out of memory")
    if mode == "nodone":
        return None

    import numpy as np
    import SimpleITK as sitk

    image = sitk.ReadImage(inputPath)
    emit(event="progress", stage="preprocess", fraction=0.1, message="read input")
    if mode == "fail":
        raise CaseFailed("fake failure: the model does not fit this input", 2)
    emit(event="warning", message="fake engine: no network, arithmetic only")
    ct = sitk.GetArrayFromImage(image).astype(np.float32)  # (z, y, x), HU
    synthetic = np.clip((ct + 600.0) / 1600.0, 0.0, 1.0) * 2.0 - 1.0
    emit(event="progress", stage="G", fraction=0.4, message="G(x)")
    roundTrip = (synthetic + 1.0) / 2.0 * 1600.0 - 600.0
    emit(event="progress", stage="F", fraction=0.7, message="F(G(x))")
    error = np.abs(roundTrip - ct)
    emit(event="progress", stage="postprocess", fraction=0.8, message="error map")

    arrays = [("synthetic_mr", synthetic), ("roundtrip_ct", roundTrip), ("error_map", error)]
    trust = {}
    if args.ood:
        trust["ood"] = fakeOod(mode, args.ood_threshold)
        emit(event="ood", **{k: trust["ood"][k] for k in ("score", "threshold", "ood_warning", "top_features",
                                                           "reference")})
        if trust["ood"]["ood_warning"]:
            emit(event="warning", message="Out-of-distribution score: 5.97 (threshold 3; WARNING: the input differs "
                 "from the model's training CTs)")
    if args.uncertainty != "none":
        uncertainty = fakeUncertainty(synthetic)
        body = uncertainty[ct > -500.0] if (ct > -500.0).any() else uncertainty.ravel()
        trust["uncertainty"] = {"mode": args.uncertainty, "extra_passes": args.uncertainty_passes,
                                "cost": f"{args.uncertainty_passes} extra passes of G", "seconds": 0.0,
                                "body": {"mean": float(body.mean()), "p50": float(np.median(body)),
                                         "p95": float(np.percentile(body, 95)), "max": float(body.max())}}
        arrays.append(("uncertainty", uncertainty))
        emit(event="progress", stage="uncertainty", fraction=0.85, message="uncertainty map")
    anatomy = None
    if args.warp_check:
        body = ct > -500.0
        displacement = np.where(body, 0.1 * np.indices(ct.shape)[0], 0.0).astype(np.float32)
        inside = displacement[body] if body.any() else np.zeros(1, np.float32)
        anatomy = {**ANATOMY, "displacement_mean_mm": float(inside.mean()),
                   "displacement_p95_mm": float(np.percentile(inside, 95)), "displacement_max_mm": float(inside.max()),
                   "registration": "fake"}
        arrays.append(("displacement_mm", displacement))
        emit(event="progress", stage="warp-check", fraction=0.9, message="registration x -> G(x)")

    os.makedirs(outputDir, exist_ok=True)
    outputs = {}
    for key, array in arrays:
        if mode == "resized":
            array = array[:-1]
        result = sitk.GetImageFromArray(array.astype(np.float32))
        result.SetSpacing(image.GetSpacing())
        result.SetDirection(image.GetDirection())
        origin = image.GetOrigin()
        if mode == "shifted":
            origin = (origin[0] + 2.0, origin[1], origin[2])
        result.SetOrigin(origin)
        outputs[key] = os.path.join(outputDir, f"{key}.nii.gz")
        sitk.WriteImage(result, outputs[key], useCompression=True, compressionLevel=1)
    extra = dict(trust)
    if "ood" in trust:
        with open(os.path.join(outputDir, "ood.json"), "w") as file:
            json.dump(trust["ood"], file)
        outputs["ood"] = os.path.join(outputDir, "ood.json")
    if anatomy is not None:
        with open(os.path.join(outputDir, "anatomy.json"), "w") as file:
            json.dump(anatomy, file)
        if mode != "anatomyfile":
            extra["anatomy"] = anatomy
    if args.analysis:
        reference = None
        if args.reference_mr:
            reference = sitk.GetArrayFromImage(sitk.ReadImage(args.reference_mr[0])).astype(np.float32)
        analysis = fakeAnalysis(ct, synthetic, roundTrip, reference, anatomy)
        with open(os.path.join(outputDir, "analysis.json"), "w") as file:
            json.dump(analysis, file)
        outputs["analysis"] = os.path.join(outputDir, "analysis.json")
        if mode != "anatomyfile":
            extra["analysis"] = analysis
    emit(event="progress", stage="write", fraction=1.0, message="written")
    return dict(outputs=outputs, seconds=0.0, device="cpu", precision="float32", model="fake", roi_size=roi,
                sw_batch_size=args.sw_batch_size, harmonize=args.harmonize, ct_window=CT_WINDOW, **extra)


def caseList(inputs: list[str]) -> list[str] | None:
    """The batch's CT paths, sorted (``None``: one CT, the single-volume mode)."""
    if len(inputs) == 1 and not inputs[0].endswith((".txt", ".lst")):
        return None
    paths = []
    for path in inputs:
        if path.endswith((".txt", ".lst")):
            with open(path, encoding="utf-8") as file:
                lines = [line.strip() for line in file if line.strip() and not line.startswith("#")]
            paths += [os.path.join(os.path.dirname(path), line) for line in lines]
        else:
            paths.append(path)
    return sorted(os.path.abspath(p) for p in paths)


def runBatch(paths: list[str], args, modes: list[str]) -> int:
    """The engine's batch mode (see the module docstring)."""
    started = time.monotonic()
    cases = []
    for index, path in enumerate(paths, start=1):
        case = os.path.basename(path).split(".")[0]
        mode = modes[min(index - 1, len(modes) - 1)]
        record = {"case": case, "input": path, "status": "running", "seconds": 0.0, "error": None, "outputs": {},
                  "timeline": {}}
        emit(event="case", index=index, total=len(paths), **record)
        caseStart = time.monotonic()
        try:
            done = translateOne(path, os.path.join(args.output, case), args, mode)
        except CaseFailed as failure:
            record.update(status="failed", error=str(failure))
        else:
            if done is None:  # nodone: the process ends without reporting this case or the rest
                return 0
            record.update(status="done", outputs=done["outputs"])
        record["seconds"] = round(time.monotonic() - caseStart, 3)
        if record["status"] == "done":
            emit(event="case_done", index=index, total=len(paths), case=case, input=path, status="done",
                 output_dir=os.path.join(args.output, case), **{**done, "seconds": record["seconds"]})
        emit(event="case", index=index, total=len(paths), **record)
        cases.append(record)
    summary = os.path.join(args.output, "translate_summary.json")
    counts = {status: sum(c["status"] == status for c in cases) for status in ("done", "skipped", "failed")}
    with open(summary, "w", encoding="utf-8") as file:
        json.dump({"command": "fake", "out_dir": args.output, "counts": counts, "cases": cases}, file)
    emit(event="done", mode="batch", summary=summary, seconds=round(time.monotonic() - started, 3), device="cpu",
         **counts)
    return 1 if counts["failed"] else 0


def runQa(args, mode: str) -> int:
    """``ct2mr qa`` (see the module docstring); mode ``fail`` gives the engine's error event."""
    import numpy as np
    import SimpleITK as sitk

    emit(event="start", command="qa", synthetic_mr=args.synthetic_mr, reference_mr=args.reference_mr,
         output=args.output)
    synthetic, reference = sitk.ReadImage(args.synthetic_mr), sitk.ReadImage(args.reference_mr)
    if mode == "fail" or synthetic.GetSize() != reference.GetSize() or not np.allclose(
            synthetic.GetOrigin(), reference.GetOrigin(), atol=1e-3):
        emit(event="error", message="The reference MR is not on the synthetic MR's grid (size or origin differs); "
             "register and resample it onto the CT first.")
        return 2
    s = np.clip(sitk.GetArrayFromImage(synthetic).astype(np.float32), -1, 1)
    r = sitk.GetArrayFromImage(reference).astype(np.float32)
    low, high = np.percentile(r, [1, 99])
    r = np.clip((r - low) / max(high - low, 1e-6), 0, 1) * 2 - 1
    emit(event="progress", stage="qa", fraction=0.5, message="metrics")
    difference = sitk.GetImageFromArray((s - r).astype(np.float32))
    difference.CopyInformation(synthetic)
    os.makedirs(args.output, exist_ok=True)
    outputs = {"difference": os.path.join(args.output, "difference.nii.gz"),
               "metrics_json": os.path.join(args.output, "qa_metrics.json")}
    sitk.WriteImage(difference, outputs["difference"], useCompression=True, compressionLevel=1)
    mse = float(np.mean((s - r) ** 2))
    metrics = {"mae": float(np.mean(np.abs(s - r))), "psnr_db": float(10 * np.log10(4.0 / max(mse, 1e-12))),
               "ssim": 0.5, "ms_ssim": 0.625, "voxels": int(s.size)}
    result = {"synthetic_mr": args.synthetic_mr, "reference_mr": args.reference_mr, "metrics": metrics,
              "mask": {"source": "ct" if args.ct else "reference", "voxels": int(s.size), "volume_ml": 1.0},
              "definitions": {"mae": "fake mean |s - r|", "psnr_db": "fake PSNR", "ssim": "fake", "ms_ssim": "fake"},
              "outputs": outputs, "seconds": 0.0}
    with open(outputs["metrics_json"], "w") as file:
        json.dump(result, file)
    emit(event="done", outputs=outputs, metrics=metrics, mask=result["mask"], seconds=0.0)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fake_ct2mr")
    parser.add_argument("--mode", default="ok", help="ok, fail, crash, shifted, resized, nodone, sleep, oom, "
                        "oomalways, slow, anatomyfile, ood; a batch: one per case, comma-separated")
    commands = parser.add_subparsers(dest="command", required=True)
    translate = commands.add_parser("translate")
    translate.add_argument("inputs", nargs="+")
    translate.add_argument("-o", "--output", required=True)
    translate.add_argument("--model")
    translate.add_argument("--device", default="auto")
    translate.add_argument("--overlap", type=float, default=0.5)
    translate.add_argument("--progress", choices=["json", "bar", "none"], default="bar")
    translate.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto")
    translate.add_argument("--roi-size", type=int, nargs="+")
    translate.add_argument("--sw-batch-size", type=int, default=None)
    translate.add_argument("--harmonize", choices=["none", "histogram", "nyul", "zscore"], default="none")
    translate.add_argument("--reference-mr", nargs="+")
    translate.add_argument("--warp-check", action="store_true")
    translate.add_argument("--analysis", action="store_true")
    translate.add_argument("--overwrite", action="store_true")
    translate.add_argument("--uncertainty", choices=["none", "tta", "ensemble"], default="none")
    translate.add_argument("--uncertainty-passes", type=int, default=4)
    translate.add_argument("--ood", action="store_true")
    translate.add_argument("--ood-threshold", type=float, default=3.0)
    qa = commands.add_parser("qa")
    qa.add_argument("synthetic_mr")
    qa.add_argument("reference_mr")
    qa.add_argument("-o", "--output", required=True)
    qa.add_argument("--ct")
    qa.add_argument("--mask")
    qa.add_argument("--progress", choices=["json", "bar", "none"], default="none")
    args = parser.parse_args(argv)
    if args.command == "qa":
        return runQa(args, args.mode)
    modes = args.mode.split(",")
    known = {"ok", "fail", "crash", "shifted", "resized", "nodone", "sleep", "oom", "oomalways", "slow", "anatomyfile",
             "ood"}
    if not set(modes) <= known:
        parser.error(f"unknown --mode {args.mode}")
    paths = caseList(args.inputs)

    if paths is None:
        emit(event="start", input=args.inputs[0], device="cpu" if args.device == "auto" else args.device,
             model=args.model, overlap=args.overlap, argv=sys.argv[sys.argv.index("translate"):])
        print("plain text from a library", flush=True)
    if args.device.startswith("cuda"):  # what ct2mr.inference.translate.resolve_device warns on a machine without CUDA
        emit(event="warning", message="CUDA was requested but is not available (no NVIDIA GPU, or a CPU-only "
             "PyTorch); running on the CPU instead.", category="RuntimeWarning")
    if paths is not None:
        emit(event="start", command="translate", mode="batch", inputs=args.inputs, output=args.output,
             model=args.model or "default", device=args.device, argv=sys.argv[sys.argv.index("translate"):])
        print("plain text from a library", flush=True)
    for path in args.reference_mr or ():
        if not os.path.isfile(path):
            emit(event="error", message=f"reference MR {path} does not exist")
            return 1
    if paths is not None:
        if args.uncertainty != "none" or args.ood:
            emit(event="error", message="--uncertainty, --ood and several --model paths work on one CT at a time; "
                 "run ct2mr translate once per CT for them.")
            return 2
        return runBatch(paths, args, modes)
    try:
        done = translateOne(args.inputs[0], args.output, args, modes[0])
    except CaseFailed as failure:
        emit(event="error", message=str(failure), **({"type": "RuntimeError"} if modes[0] == "oomalways" else {}))
        return failure.exitCode
    if done is None:
        return 0
    emit(event="done", **done)
    return 0


if __name__ == "__main__":
    sys.exit(main())
