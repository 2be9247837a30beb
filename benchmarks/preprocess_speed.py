"""Benchmark: seconds and peak memory to preprocess one 512 x 512 x 300 CT (thesis section 4, Algorithm 1).

Builds the test volume from the real chest CT ``../shared/data/ct/chest_ct_lung2.nrrd`` (512 x 512 x 61 voxels at
0.627 x 0.627 x 5 mm) by trilinear resampling along z to 300 slices (1.017 mm), int16 HU, written as NRRD into a
temporary folder (never into the repository). Each measurement then runs in a fresh Python process, so that its peak
resident memory (``ru_maxrss``) is its own:

* ``preprocess``: :func:`ct2mr.preprocessing.pipeline.preprocess` on the image already in memory (RAS, 1 mm trilinear, pad to
  16, CT window -> [-1, 1]); best and median of ``--repeats`` runs;
* ``batch``: the whole per-volume job of ``ct2mr preprocess`` (read the NRRD, preprocess, raw histogram, write the
  gzip-compressed HDF5 with every attribute), ``jobs=1``.

Targets (issue 3): under 5 s and under 2 GB per volume. Usage, from the repository root::

    .venv/bin/python benchmarks/preprocess_speed.py [--data ../shared/data] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGET_SECONDS, TARGET_MB = 5.0, 2048.0


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kB


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


def build_volume(source: Path, dest: Path, slices: int = 300) -> dict:
    """Resample ``source`` along z to ``slices`` slices (same in-plane grid) and write it to ``dest``."""
    import SimpleITK as sitk

    image = sitk.ReadImage(str(source))
    nx, ny, nz = image.GetSize()
    sx, sy, sz = image.GetSpacing()
    spacing = (sx, sy, sz * nz / slices)
    big = sitk.Resample(image, (nx, ny, slices), sitk.Transform(), sitk.sitkLinear, image.GetOrigin(), spacing,
                        image.GetDirection(), -1024.0, image.GetPixelID())
    sitk.WriteImage(big, str(dest), False)
    return {"size": list(big.GetSize()), "spacing_mm": [round(s, 4) for s in spacing],
            "pixel_type": big.GetPixelIDTypeAsString()}


def child_preprocess(path: str, repeats: int) -> dict:
    """Measure preprocess() on the image in memory (run in a fresh process)."""
    import SimpleITK as sitk

    from ct2mr.preprocessing.pipeline import preprocess

    t0 = time.perf_counter()
    image = sitk.ReadImage(path)
    read_s = time.perf_counter() - t0
    rss_after_read = _rss_mb()
    times = []
    shape = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        pre = preprocess(image, "ct")
        times.append(time.perf_counter() - t0)
        shape = list(pre.array.shape)
        del pre
    return {"read_s": read_s, "preprocess_s_best": min(times), "preprocess_s_median": statistics.median(times),
            "rss_after_read_mb": rss_after_read, "peak_rss_mb": _peak_mb(), "network_shape_zyx": shape,
            "sitk_threads": sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()}


def child_batch(path: str, out: str) -> dict:
    """Measure the whole per-volume job of `ct2mr preprocess` (run in a fresh process)."""
    from ct2mr.preprocessing.batch import preprocess_batch

    t0 = time.perf_counter()
    summary = preprocess_batch(path, out, "ct", jobs=1)
    seconds = time.perf_counter() - t0
    result = summary.results[0]
    if result.status != "ok":
        raise RuntimeError(result.message)
    return {"batch_s": seconds, "peak_rss_mb": _peak_mb(), "output_mb": os.path.getsize(result.output) / 2**20}


def _run_child(*args: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data"), help="the shared data folder")
    parser.add_argument("--repeats", type=int, default=3, help="preprocess() runs (default: %(default)s)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, *rest = args.child
        out = child_preprocess(rest[0], int(rest[1])) if mode == "preprocess" else child_batch(rest[0], rest[1])
        print(json.dumps(out))
        return 0
    source = Path(args.data) / "ct" / "chest_ct_lung2.nrrd"
    if not source.exists():
        print(f"{source} is absent: the benchmark needs ../shared/data beside the repository.", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="ct2mr-bench-") as tmp:
        volume = Path(tmp) / "chest_ct_512x512x300.nrrd"
        info = build_volume(source, volume)
        pre = _run_child("preprocess", str(volume), str(args.repeats))
        batch = _run_child("batch", str(volume), str(Path(tmp) / "out"))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, load average "
          f"{load:.2f} (1 min), Python {platform.python_version()}, SimpleITK threads {pre['sitk_threads']}")
    print(f"input: {info['size']} voxels (x, y, z) at {info['spacing_mm']} mm, {info['pixel_type']} (from "
          f"chest_ct_lung2.nrrd) -> network volume {pre['network_shape_zyx']} (z, y, x)")
    print(f"preprocess() in memory: best {pre['preprocess_s_best']:.2f} s, median {pre['preprocess_s_median']:.2f} s "
          f"of {args.repeats}; peak RSS {pre['peak_rss_mb']:.0f} MB (after reading: {pre['rss_after_read_mb']:.0f} "
          f"MB; read {pre['read_s']:.2f} s)")
    print(f"ct2mr preprocess job (read + preprocess + histogram + gzip HDF5 write, jobs=1): {batch['batch_s']:.2f} s, "
          f"peak RSS {batch['peak_rss_mb']:.0f} MB, output {batch['output_mb']:.0f} MB")
    ok = pre["preprocess_s_median"] < TARGET_SECONDS and max(pre["peak_rss_mb"], batch["peak_rss_mb"]) < TARGET_MB
    print(f"target (< {TARGET_SECONDS:g} s and < {TARGET_MB / 1024:g} GB per volume for preprocess): "
          f"{'met' if ok else 'MISSED'}; the whole job: "
          f"{'met' if batch['batch_s'] < TARGET_SECONDS and batch['peak_rss_mb'] < TARGET_MB else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
