"""Benchmark: `ct2mr translate` against a plain SimpleITK + MONAI baseline, on a chest CT and a 512x512x600 CT.

Times, in one run and each in its own process (so that peak memory is per method):

(a) ``ct2mr translate CT -o OUT --progress json``: the shipped command (fast path: rewritten generators, memory
    plan, autocast on GPUs, tuned CPU allocator), synthetic MR + round trip + error map written as NIfTI;
(b) the baseline written below in this file, what a researcher would write with the libraries alone: SimpleITK
    reads the CT, orients it to RAS and resamples it to 1 mm (trilinear), NumPy pads it to a multiple of 16 and
    maps the CT window to [-1, 1], ``monai.inferers.sliding_window_inference`` runs G and then F in fp32 with
    sw_batch_size 1 and the same window, overlap and gaussian blending as (a), with the same generator weights
    (the modules as trained), SimpleITK resamples both back onto the CT's grid, and the same three files are
    written the same way.

Prints, per volume and method: wall seconds, peak resident memory of the process (``ru_maxrss`` via ``wait4``),
peak GPU memory (``torch.cuda.max_memory_allocated``) on CUDA, and the ratio b/a. Also the achieved TFLOP/s of the
generator convolutions in (a) (multiply-adds of every ``nn.Conv3d`` of G and F counted with forward hooks on one
window, times the windows, over the time of the two network passes) against the device's peak.

The 512x512x600 volume is generated from ``chest_ct_lung2.nrrd`` (the CT resampled onto a 512x512x600 grid of
1 mm voxels, the body stretched to fill it) into a temporary folder; nothing is written into the repository.

Usage, from the repository root::

    .venv/bin/python benchmarks/translate_speed.py                       # both volumes, CUDA if available
    .venv/bin/python benchmarks/translate_speed.py --volumes chest       # the chest CT only
    .venv/bin/python benchmarks/translate_speed.py --device cuda --gpu-memory-gb 8
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
CHEST = DATA / "ct" / "chest_ct_lung2.nrrd"
CT_WINDOW = (-600.0, 1000.0)
K = 16


def baseline(ct_path: str, out_dir: str, model: str | None, device: str, roi: int, overlap: float) -> dict:
    """The plain baseline (b): SimpleITK resampling + MONAI sliding-window inference in fp32, sw_batch_size 1.

    Args:
        ct_path: CT file (HU).
        out_dir: folder for synthetic_mr.nii.gz, roundtrip_ct.nii.gz, error_map.nii.gz.
        model: ct2mr checkpoint (None: the bundled default), for the same generator weights as (a).
        device: torch device for the windows (stitching on the same device, as MONAI's default).
        roi: window side (voxels).
        overlap: window overlap.

    Returns:
        ``{"seconds": {...}, "gpu_peak_mib": ...}``.
    """
    import numpy as np
    import SimpleITK as sitk
    import torch
    from monai.inferers import sliding_window_inference

    from ct2mr.models.checkpoint import load_checkpoint

    times: dict[str, float] = {}
    t = time.perf_counter()
    dev = torch.device(device)
    checkpoint = load_checkpoint(model)
    G, F = checkpoint.G.to(dev).eval(), checkpoint.F.to(dev).eval()
    ct = sitk.ReadImage(ct_path)
    ras = sitk.DICOMOrient(sitk.Cast(ct, sitk.sitkFloat32), "RAS")
    size = [max(1, round(n * s)) for n, s in zip(ras.GetSize(), ras.GetSpacing())]
    iso = sitk.Resample(ras, size, sitk.Transform(), sitk.sitkLinear, ras.GetOrigin(), (1.0, 1.0, 1.0),
                        ras.GetDirection(), -1024.0, sitk.sitkFloat32)
    array = sitk.GetArrayFromImage(iso)
    pads = [(-(-n // K) * K - n) for n in array.shape]
    array = np.pad(array, [(p // 2, p - p // 2) for p in pads], constant_values=array.min())
    array = (np.clip(array, *CT_WINDOW) - CT_WINDOW[0]) / (CT_WINDOW[1] - CT_WINDOW[0]) * 2 - 1
    times["preprocess"] = time.perf_counter() - t

    volume = torch.from_numpy(array.astype(np.float32))[None, None].to(dev)
    outputs = []
    for name, net in (("G", G), ("F", F)):
        t = time.perf_counter()
        with torch.inference_mode():
            volume = sliding_window_inference(volume, [roi] * 3, 1, net, overlap=overlap, mode="gaussian",
                                              padding_mode="replicate")
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        times[name] = time.perf_counter() - t
        outputs.append(volume[0, 0].cpu().numpy())

    t = time.perf_counter()
    crop = tuple(slice(p // 2, p // 2 + n) for p, n in zip(pads, iso.GetSize()[::-1]))
    results = []
    for array_out, default in ((outputs[0], -1.0), ((outputs[1] + 1) / 2 * (CT_WINDOW[1] - CT_WINDOW[0])
                                                    + CT_WINDOW[0], CT_WINDOW[0])):
        image = sitk.GetImageFromArray(np.ascontiguousarray(array_out[crop]))
        image.CopyInformation(iso)
        results.append(sitk.Resample(image, ct, sitk.Transform(), sitk.sitkLinear, default, sitk.sitkFloat32))
    x = np.clip(sitk.GetArrayViewFromImage(ct).astype(np.float32), *CT_WINDOW)
    error = sitk.GetImageFromArray(np.abs(sitk.GetArrayViewFromImage(results[1]) - x))
    error.CopyInformation(ct)
    os.makedirs(out_dir, exist_ok=True)
    for image, name in zip((*results, error), ("synthetic_mr", "roundtrip_ct", "error_map")):
        sitk.WriteImage(image, os.path.join(out_dir, f"{name}.nii.gz"), True)
    times["postprocess"] = time.perf_counter() - t
    peak = torch.cuda.max_memory_allocated(dev) / 2 ** 20 if dev.type == "cuda" else None
    return {"seconds": times, "gpu_peak_mib": peak}


def _run(command: list[str]) -> str:
    """Run a command, return its stdout; raise with the end of stderr when it fails."""
    process = subprocess.run(command, capture_output=True, text=True)
    if process.returncode:
        raise RuntimeError(f"{' '.join(command)} failed ({process.returncode}):\n{process.stderr[-3000:]}")
    return process.stdout


def _isolated(command: list[str]) -> tuple[float, float, str]:
    """Run ``command`` under a fresh Python parent so that RUSAGE_CHILDREN's peak is this command's alone."""
    wrapper = ("import json, resource, subprocess, sys, time; t = time.perf_counter(); "
               "p = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
               "s = time.perf_counter() - t; sys.stderr.write(p.stderr[-3000:]); "
               "print(json.dumps({'rc': p.returncode, 'seconds': s, 'stdout': p.stdout, "
               "'peak_mib': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))")
    out = _run([sys.executable, "-c", wrapper, *command])
    result = json.loads(out.strip().splitlines()[-1])
    if result["rc"]:
        raise RuntimeError(f"{' '.join(command)} failed with exit code {result['rc']}")
    return result["seconds"], result["peak_mib"], result["stdout"]


def conv_flops_per_window(model: str | None, roi: int) -> float:
    """Multiply-add FLOPs (2 per MAC) of every Conv3d of G plus F for one (1, 1, roi, roi, roi) window."""
    import torch

    from ct2mr.models.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(model)
    total = 0.0

    def hook(module, inputs, output):  # noqa: ANN001, ANN202
        nonlocal total
        k = 1
        for side in module.kernel_size:
            k *= side
        total += 2.0 * output.numel() * k * module.in_channels / module.groups

    with torch.inference_mode():
        for net in (checkpoint.G, checkpoint.F):
            handles = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, torch.nn.Conv3d)]
            net.eval()(torch.zeros(1, 1, roi, roi, roi))
            for handle in handles:
                handle.remove()
    return total


def peak_tflops(device: str) -> tuple[float | None, str]:
    """The device's peak dense TFLOP/s for the precision the fast path uses there, and how it was obtained."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        table = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "V100": 125.0,
                 "T4": 65.0, "RTX 4090": 165.0, "RTX 3090": 71.0}
        for key, value in table.items():
            if key in name:
                return value, f"{name}: dense bf16/fp16 tensor-core peak from the vendor's data sheet"
        return None, f"{name}: peak unknown"
    cores = os.cpu_count() or 1
    mhz = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                mhz = float(line.split(":")[1])
                break
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        flags = ""
    lanes = 16 if "avx512f" in flags else 8  # fp32 lanes per FMA
    if mhz is None:
        return None, "CPU: clock unknown"
    peak = cores * mhz * 1e6 * 2 * 2 * lanes / 1e12  # 2 FMA units x 2 FLOP per FMA
    return peak, f"CPU: {cores} core(s) x {mhz:.0f} MHz x 2 FMA units x {lanes} fp32 lanes x 2 (fp32)"


def make_large_ct(folder: Path) -> Path:
    """Write a 512x512x600 CT at 1 mm (int16, HU) generated from chest_ct_lung2.nrrd; returns its path."""
    import SimpleITK as sitk

    source = sitk.ReadImage(str(CHEST))
    stretched = sitk.Image(source)
    stretched.SetSpacing([512 / source.GetSize()[0], 512 / source.GetSize()[1], 600 / source.GetSize()[2]])
    large = sitk.Resample(stretched, [512, 512, 600], sitk.Transform(), sitk.sitkLinear, source.GetOrigin(),
                          (1.0, 1.0, 1.0), source.GetDirection(), -1024, sitk.sitkInt16)
    path = folder / "ct_512x512x600_1mm.nrrd"
    sitk.WriteImage(large, str(path), True)
    return path


def _windows(shape, roi: int, overlap: float) -> int:
    from ct2mr.inference.translate import _window_count

    return _window_count(shape, (roi,) * 3, overlap)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--volumes", nargs="+", default=["chest", "large"], choices=("chest", "large"),
                        help="chest: chest_ct_lung2.nrrd; large: the generated 512x512x600 CT (default: both)")
    parser.add_argument("--model", help="ct2mr checkpoint (default: the bundled default model)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (default: %(default)s)")
    parser.add_argument("--roi", type=int, default=96, help="window side, voxels (default: %(default)s)")
    parser.add_argument("--overlap", type=float, default=0.25, help="window overlap (default: %(default)s)")
    parser.add_argument("--gpu-memory-gb", type=float, help="passed to ct2mr translate (e.g. 8 for the 8 GB target)")
    parser.add_argument("--skip-baseline", action="store_true", help="time (a) only")
    parser.add_argument("--baseline-only", nargs=2, metavar=("CT", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    import torch

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if args.baseline_only:
        result = baseline(*args.baseline_only, args.model, device, args.roi, args.overlap)
        print(json.dumps(result))
        return 0

    ct2mr = str(Path(sys.executable).with_name("ct2mr"))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, load average {load:.2f} (1 min), Python "
          f"{platform.python_version()}, torch {torch.__version__} ({torch.get_num_threads()} threads), device "
          f"{device}{' ' + torch.cuda.get_device_name() if device.startswith('cuda') else ''}")
    flops = conv_flops_per_window(args.model, args.roi)
    peak, how = peak_tflops(device)
    rows = []
    with tempfile.TemporaryDirectory(prefix="ct2mr-bench-") as tmp:
        tmp_path = Path(tmp)
        volumes = {"chest": CHEST}
        if "large" in args.volumes:
            volumes["large"] = make_large_ct(tmp_path)
        for key in args.volumes:
            ct = str(volumes[key])
            command = [ct2mr, "translate", ct, "-o", str(tmp_path / f"a_{key}"), "--progress", "json", "--device",
                       device, "--roi-size", str(args.roi), "--overlap", str(args.overlap)]
            if args.model:
                command += ["--model", args.model]
            if args.gpu_memory_gb:
                command += ["--gpu-memory-gb", str(args.gpu_memory_gb)]
            a_seconds, a_peak, out = _isolated(command)
            done = [json.loads(line) for line in out.splitlines() if line.startswith("{")][-1]
            stages = done.get("stage_seconds") or {}
            net_seconds = (stages.get("G") or 0) + (stages.get("F") or 0)
            row = {"volume": key, "input": Path(ct).name, "a_seconds": a_seconds, "a_peak_rss_mib": a_peak,
                   "a_gpu_peak_mib": done.get("gpu_peak_mib"), "a_stages": stages,
                   "sw_batch_size": done.get("sw_batch_size"), "stitch_device": done.get("stitch_device"),
                   "precision": done.get("precision")}
            shape = None
            for line in out.splitlines():  # the preprocess stage reports "Network grid [z, y, x] (z, y, x) voxels"
                if "Network grid [" in line:
                    shape = json.loads(line.split("Network grid ")[1].split("]")[0] + "]")
            if shape and net_seconds:
                windows = _windows(shape, args.roi, args.overlap)
                achieved = flops * windows / net_seconds / 1e12
                row.update({"network_grid": shape, "windows_per_pass": windows, "network_seconds": net_seconds,
                            "achieved_tflops": achieved, "peak_tflops": peak,
                            "fraction_of_peak": achieved / peak if peak else None})
            if not args.skip_baseline:
                b_seconds, b_peak, b_out = _isolated([sys.executable, __file__, "--device", device, "--roi",
                                                      str(args.roi), "--overlap", str(args.overlap),
                                                      *(["--model", args.model] if args.model else []),
                                                      "--baseline-only", ct, str(tmp_path / f"b_{key}")])
                b = json.loads(b_out.strip().splitlines()[-1])
                row.update({"b_seconds": b_seconds, "b_peak_rss_mib": b_peak, "b_gpu_peak_mib": b["gpu_peak_mib"],
                            "b_stages": b["seconds"], "ratio_b_over_a": b_seconds / a_seconds})
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\nconvolution FLOPs of G + F per {args.roi}^3 window: {flops / 1e9:.1f} GFLOP; peak: "
          f"{'%.2f TFLOP/s' % peak if peak else 'unknown'} ({how})")
    for row in rows:
        line = (f"{row['volume']:6s} {row['input']}: (a) ct2mr translate {row['a_seconds']:.1f} s, peak RSS "
                f"{row['a_peak_rss_mib'] / 1024:.2f} GiB")
        if row.get("a_gpu_peak_mib"):
            line += f", peak GPU {row['a_gpu_peak_mib'] / 1024:.2f} GiB"
        if "b_seconds" in row:
            line += (f"; (b) baseline {row['b_seconds']:.1f} s, peak RSS {row['b_peak_rss_mib'] / 1024:.2f} GiB"
                     + (f", peak GPU {row['b_gpu_peak_mib'] / 1024:.2f} GiB" if row.get("b_gpu_peak_mib") else "")
                     + f"; ratio b/a {row['ratio_b_over_a']:.2f}")
        if row.get("achieved_tflops"):
            line += (f"; generator convolutions {row['achieved_tflops']:.3f} TFLOP/s"
                     + (f" = {100 * row['fraction_of_peak']:.1f}% of peak" if row.get('fraction_of_peak') else ""))
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
