"""Known-mapping benchmark: does unpaired ``ct2mr train`` learn a CT -> MR law whose answer we know? (issue 13)

The shared data has no registered CT/MR pairs. This benchmark makes some: ``benchmarks/mr_simulator.py`` computes, from
each shared CT, the UTE MR a documented forward model gives of the same body (tissue classes with literature PD, T1,
T2*, a spoiled gradient-echo signal equation that is non-monotone in HU, susceptibility dephasing near air, a receive
bias field, PSF blur, Rician noise). Then:

1. ``simulate``: every CT of the split gets its simulated MR (seeded; cached in the work folder, outside the repository).
2. ``train`` (one per ``--recipe``): ``ct2mr train`` **unpaired** on the training CTs and the training simulated MRs
   (patches drawn independently from the two domains; the trainer never sees which MR belongs to which CT), with a
   wall-clock budget (``--max-minutes``) and G/F snapshots every ``--snapshot-minutes`` for the learning curve.
3. ``score``: ``ct2mr translate`` of the held-out CT (never seen in training, in either domain) with each snapshot;
   the synthetic MR is scored against the held-out CT's simulated MR with paired MAE, PSNR and SSIM inside the CT's
   body mask on the [-1, 1] scale (the simulated MR normalised by its own 1st-99th percentiles, as the engine
   normalises MR; SSIM: 3D Gaussian window, sigma 1.5 voxels, on the CT grid).

Printed beside the models, on the same case and mask:

- ``identity``: the normalised CT itself (CT window -> [-1, 1]);
- ``histogram matching``: the held-out CT's body intensities mapped through the quantiles of the training simulated
  MRs' body intensities (unpaired, monotone, global);
- ``paired lookup E[MR | HU]``: the mean simulated MR of the *training* pairs in 10-HU bins, applied voxel by voxel.
  It sees pairs, the models do not: the bar to beat. It cannot model blur, bias or the susceptibility effect.

Outputs in ``--work`` (default ``runs/known_mapping``, git-ignored): ``results.json``, ``curve.csv``,
``learning_curve.png`` (SSIM and MAE against minutes and steps), ``slices.png`` (held-out slices: CT, truth, lookup,
each recipe's last snapshot) and the run folders. Nothing of ``../shared/data`` is copied into the repository.

Usage, from the repository root (2 CPU cores: one recipe at a time, ``--threads`` for torch)::

    .venv/bin/python benchmarks/known_mapping.py --recipe sc --recipe m1 --max-minutes 20 --threads 2
    .venv/bin/python benchmarks/known_mapping.py --recipe sc --steps sc=400 --recipe m1 --steps m1=640
    .venv/bin/python benchmarks/known_mapping.py --score-only --recipe sc --recipe m1   # re-score existing runs
    .venv/bin/python benchmarks/known_mapping.py --tiny                                 # smoke run (about 2 minutes)
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from mr_simulator import simulate_image  # noqa: E402

#: The default split (``../shared/data/ct``): four CTs for training, the clinical chest CT held out.
TRAIN_CTS = ("thorax_cta_1p5mm.nii.gz", "thorax_cta_heart_crop_1p5mm.nii.gz", "abdomen_pelvis_ct_3mm.nii.gz",
             "upper_abdomen_ct_dicom")
TEST_CT = "chest_ct_lung2.nrrd"
#: Recipes: a preset and the overrides that size it for the budget (all on the CPU).
RECIPES = {
    "m1": ["--preset", "m1", "--width", "8", "--patch-size", "48"],
    "hist": ["--preset", "hist", "--width", "8", "--patch-size", "48"],
    "sc": ["--preset", "sc"],
    "nce": ["--preset", "nce"],
    "sc-thesis-window": ["--preset", "sc", "data.preprocessing.ct_window=[-600.0,1000.0]"],
    "sc-no-mind": ["--preset", "sc", "model.lambda_mind=0.0"],
    "law": ["--preset", "law"],
    "law-thesis-window": ["--preset", "law", "data.preprocessing.ct_window=[-600.0,1000.0]"],
    "law-frozen": ["--preset", "law", "model.law.lr_scale=0.0"],
    "law-slow": ["--preset", "law", "model.law.lr_scale=0.1"],
    "law-trainable": ["--preset", "law", "model.law.lr_scale=1.0"],
    "law-anchor": ["--preset", "law", "model.law.anchor=10.0"],
    "law-raw": ["--preset", "law", "model.law.relative=false"],
    "law81-anchor": ["--preset", "law", "model.law.knots=81", "model.generator.extra.law_knots=81",
                     "model.law.anchor=10.0"],
}
HU_BINS = np.arange(-1030.0, 3010.0, 10.0)


def _name(path: Path) -> str:
    return path.name.split(".")[0]


def simulate(cts: list[Path], out: Path, crop: int | None = None) -> list[tuple[Path, Path]]:
    """Simulated MR of each CT (cached), with the CT itself (cropped for ``--tiny``)."""
    from ct2mr.io.images import read_image

    out.mkdir(parents=True, exist_ok=True)
    pairs = []
    for i, path in enumerate(cts):
        ct_path, mr_path = out / f"{_name(path)}_ct.nii.gz", out / f"{_name(path)}_mr.nii.gz"
        if not mr_path.exists():
            ct = read_image(path)
            if crop:
                size = ct.GetSize()
                lo = [max(0, (s - crop) // 2) for s in size]
                ct = sitk.RegionOfInterest(ct, [min(crop, s) for s in size], lo)
            sitk.WriteImage(ct, str(ct_path), True)
            sitk.WriteImage(simulate_image(ct, seed=1000 + i), str(mr_path), True)
        pairs.append((ct_path, mr_path))
    return pairs


def _normalise_mr(mr: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(mr, [1.0, 99.0])
    return (np.clip(mr, lo, hi) - lo) * (2.0 / (hi - lo)) - 1.0


def _body(ct_hu: np.ndarray) -> np.ndarray:
    from ct2mr.preprocessing.masks import body_mask

    return body_mask(ct_hu, "ct", normalised=False)


def scores(pred: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """Paired MAE, PSNR (data range 2) and SSIM inside ``mask``; arrays (z, y, x) on the [-1, 1] scale."""
    from ct2mr.evaluation.metrics import mae, psnr, ssim3d

    pred = np.clip(pred.astype(np.float32), -1.0, 1.0)
    return {"mae": mae(pred, truth, mask), "psnr": psnr(pred, truth, 2.0, mask),
            "ssim": ssim3d(pred, truth, 2.0, mask)}


def baselines(train: list[tuple[Path, Path]], test_ct: np.ndarray, window: tuple[float, float]
              ) -> dict[str, np.ndarray]:
    """Identity, unpaired global histogram matching and the paired per-voxel lookup E[MR | HU]."""
    sums = np.zeros(len(HU_BINS) + 1)
    counts = np.zeros(len(HU_BINS) + 1)
    train_mr_body = []
    for ct_path, mr_path in train:
        hu = sitk.GetArrayFromImage(sitk.ReadImage(str(ct_path))).astype(np.float32)
        mr = _normalise_mr(sitk.GetArrayFromImage(sitk.ReadImage(str(mr_path))).astype(np.float32))
        idx = np.digitize(hu, HU_BINS)
        sums += np.bincount(idx.ravel(), mr.ravel(), len(sums))
        counts += np.bincount(idx.ravel(), minlength=len(counts))
        train_mr_body.append(mr[_body(hu)])
    table = np.interp(np.arange(len(sums)), np.flatnonzero(counts), sums[counts > 0] / counts[counts > 0])
    lookup = table[np.digitize(test_ct, HU_BINS)].astype(np.float32)
    identity = np.clip((test_ct - window[0]) * 2.0 / (window[1] - window[0]) - 1.0, -1, 1).astype(np.float32)
    reference = np.sort(np.concatenate(train_mr_body))
    body = _body(test_ct)
    ranks = np.argsort(np.argsort(test_ct[body], kind="stable"), kind="stable") / max(1, body.sum() - 1)
    matched = np.full(test_ct.shape, -1.0, np.float32)
    matched[body] = np.interp(ranks, np.linspace(0, 1, len(reference)), reference)
    return {"identity": identity, "histogram matching": matched, "paired lookup E[MR|HU]": lookup}


def train_recipe(recipe: str, train: list[tuple[Path, Path]], run_dir: Path, args: argparse.Namespace) -> None:
    """``ct2mr train`` (a subprocess, as a user runs it), resumed when the run folder already holds a run."""
    ct2mr = str(Path(sys.executable).with_name("ct2mr"))
    steps = dict(item.split("=") for item in args.steps).get(recipe)
    budget = ["--steps", steps, f"train.snapshot_every={max(1, int(steps) // args.snapshots)}"] if steps else \
        ["--steps", "20" if args.tiny else "100000", "--max-minutes", str(args.max_minutes),
         "train.snapshot_minutes=" + str(args.snapshot_minutes)]
    extra = [*budget, "--threads", str(args.threads),
             "--seed", str(args.seed), "--val-every", "0", "--checkpoint-every", "50", "--progress", "none"]
    extra += list(args.override)
    if args.tiny:
        extra += ["--patch-size", "32", "--width", "4", "model.discriminator.n_layers=2"]
    if (run_dir / "state.json").exists():
        cmd = [ct2mr, "train", "--out", str(run_dir), "--resume"]
        if (run_dir / "model.safetensors").exists():
            return
    else:
        cmd = [ct2mr, "train", "--out", str(run_dir), *RECIPES[recipe],
               "--ct", *[str(c) for c, _ in train], "--mr", *[str(m) for _, m in train],
               "data.val_fraction=0.0", *extra]
    print("$", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True)


def translate(model: Path, ct_path: Path, out: Path, threads: int) -> np.ndarray:
    """``ct2mr translate`` of the held-out CT; the synthetic MR (z, y, x) on the CT grid."""
    ct2mr = str(Path(sys.executable).with_name("ct2mr"))
    if not (out / "synthetic_mr.nii.gz").exists():
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        subprocess.run([ct2mr, "translate", str(ct_path), "-o", str(out), "--model", str(model), "--device", "cpu",
                        "--progress", "none"], check=True, env=env, stdout=subprocess.DEVNULL)
    return sitk.GetArrayFromImage(sitk.ReadImage(str(out / "synthetic_mr.nii.gz"))).astype(np.float32)


def _snapshot_info(path: Path) -> tuple[int, float]:
    from ct2mr.models.checkpoint import load_checkpoint

    summary = load_checkpoint(path).training
    return int(summary.get("steps", 0)), float(summary.get("elapsed_s", 0.0))


def _figures(work: Path, curve: list[dict], slices: dict[str, np.ndarray], bars: dict[str, dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for recipe in sorted({r["recipe"] for r in curve}):
        rows = [r for r in curve if r["recipe"] == recipe]
        axes[0].plot([r["minutes"] for r in rows], [r["ssim"] for r in rows], "o-", label=recipe)
        axes[1].plot([r["minutes"] for r in rows], [r["mae"] for r in rows], "o-", label=recipe)
        axes[2].plot([r["step"] for r in rows], [r["ssim"] for r in rows], "o-", label=recipe)
    for name, value in bars.items():
        for ax, key in ((axes[0], "ssim"), (axes[1], "mae"), (axes[2], "ssim")):
            ax.axhline(value[key], ls="--", lw=1, color="grey" if "lookup" not in name else "k")
            ax.text(0.01, value[key], name, transform=ax.get_yaxis_transform(), fontsize=7, va="bottom")
    axes[0].set(xlabel="training minutes (CPU)", ylabel="SSIM (body)", title="SSIM vs wall clock")
    axes[1].set(xlabel="training minutes (CPU)", ylabel="MAE ([-1, 1], body)", title="MAE vs wall clock")
    axes[2].set(xlabel="steps", ylabel="SSIM (body)", title="SSIM vs steps")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(work / "learning_curve.png", dpi=90)
    plt.close(fig)
    names = list(slices)
    fig, axes = plt.subplots(2, len(names), figsize=(3.2 * len(names), 6.4))
    for j, name in enumerate(names):
        vol = slices[name]
        axial = vol[vol.shape[0] // 2]
        coronal = np.flipud(vol[:, vol.shape[1] // 2])
        lo, hi = (-1000, 600) if name == "CT (HU)" else (-1, 1)
        axes[0, j].imshow(axial, cmap="gray", vmin=lo, vmax=hi)
        axes[1, j].imshow(coronal, cmap="gray", vmin=lo, vmax=hi, aspect="auto")
        axes[0, j].set_title(name, fontsize=9)
        axes[0, j].axis("off"), axes[1, j].axis("off")
    fig.tight_layout()
    fig.savefig(work / "slices.png", dpi=80)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data", help="shared data folder")
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "known_mapping", help="work folder")
    parser.add_argument("--recipe", action="append", choices=sorted(RECIPES), help="recipes to train and score "
                        "(repeatable; default: sc and m1)")
    parser.add_argument("--max-minutes", type=float, default=20.0, help="training budget per recipe (default: "
                        "%(default)s)")
    parser.add_argument("--snapshot-minutes", type=float, default=5.0, help="learning-curve spacing (default: "
                        "%(default)s)")
    parser.add_argument("--steps", action="append", default=[], metavar="RECIPE=N", help="a step budget for a "
                        "recipe instead of --max-minutes (repeatable): reproducible on a loaded machine; convert to "
                        "minutes with the recipe's quiet-machine seconds per step (benchmarks/train_speed.py)")
    parser.add_argument("--snapshots", type=int, default=3, help="learning-curve points of a step budget "
                        "(default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of training and translation")
    parser.add_argument("--seed", type=int, default=0, help="training seed")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE", help="a config override "
                        "for every recipe trained (repeatable), e.g. model.law.file=runs/.../intensity_law.json to "
                        "start from an earlier run's laws")
    parser.add_argument("--score-only", action="store_true", help="score existing runs, train nothing")
    parser.add_argument("--tiny", action="store_true", help="smoke run: 64^3 crops, 20 steps, tiny networks")
    args = parser.parse_args(argv)
    recipes = args.recipe or ["sc", "m1"]
    if args.tiny:
        args.max_minutes, args.snapshot_minutes = min(args.max_minutes, 1.0), 0.0
    ct_dir = args.data / "ct"
    missing = [n for n in (*TRAIN_CTS, TEST_CT) if not (ct_dir / n).exists()]
    if missing:
        parser.error(f"{ct_dir} lacks {', '.join(missing)}: pass --data pointing at the shared data folder.")
    work = args.work
    load = os.getloadavg()[0]
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, load average {load:.2f} (1 min), "
          f"Python {platform.python_version()}", flush=True)
    t0 = time.perf_counter()
    crop = 64 if args.tiny else None
    train = simulate([ct_dir / n for n in TRAIN_CTS], work / "data", crop)
    ((test_ct_path, test_mr_path),) = simulate([ct_dir / TEST_CT], work / "data_test", crop)
    print(f"simulated {len(train) + 1} MRs in {time.perf_counter() - t0:.1f} s", flush=True)
    test_ct = sitk.GetArrayFromImage(sitk.ReadImage(str(test_ct_path))).astype(np.float32)
    truth = _normalise_mr(sitk.GetArrayFromImage(sitk.ReadImage(str(test_mr_path))).astype(np.float32))
    mask = _body(test_ct)

    results: dict[str, dict] = {}
    base = baselines(train, test_ct, (-1000.0, 1000.0))
    for name, pred in base.items():
        results[name] = scores(pred, truth, mask)
    slices = {"CT (HU)": test_ct, "truth (simulated MR)": truth, "paired lookup": base["paired lookup E[MR|HU]"]}
    curve = []
    for recipe in recipes:
        run_dir = work / "runs" / recipe
        if not args.score_only:
            train_recipe(recipe, train, run_dir, args)
        snapshots = sorted((run_dir / "snapshots").glob("step_*.safetensors"))
        if not snapshots and (run_dir / "model.safetensors").exists():
            snapshots = [run_dir / "model.safetensors"]
        last = None
        for snap in snapshots:
            step, seconds = _snapshot_info(snap)
            pred = translate(snap, test_ct_path, work / "translations" / recipe / snap.stem, args.threads)
            row = {"recipe": recipe, "step": step, "minutes": round(seconds / 60.0, 2), **scores(pred, truth, mask)}
            curve.append(row)
            print(f"  {recipe:>18} step {step:6d} {row['minutes']:6.1f} min: SSIM {row['ssim']:.3f}  "
                  f"MAE {row['mae']:.3f}  PSNR {row['psnr']:.2f} dB", flush=True)
            last = (row, pred)
        if last:
            results[recipe] = {k: last[0][k] for k in ("mae", "psnr", "ssim", "step", "minutes")}
            slices[recipe] = last[1]
    print(f"\nheld-out case {TEST_CT} (never trained on), body mask {int(mask.sum())} voxels, [-1, 1] scale:")
    print(f"| {'method':<26} | {'SSIM':>6} | {'MAE':>6} | {'PSNR dB':>7} | steps | minutes |")
    print(f"|{'-' * 28}|{'-' * 8}|{'-' * 8}|{'-' * 9}|-------|---------|")
    for name, r in results.items():
        print(f"| {name:<26} | {r['ssim']:6.3f} | {r['mae']:6.3f} | {r['psnr']:7.2f} | {r.get('step', ''):>5} | "
              f"{r.get('minutes', ''):>7} |")
    work.mkdir(parents=True, exist_ok=True)
    (work / "results.json").write_text(json.dumps({"results": results, "curve": curve, "load_average": load,
                                                   "test_ct": TEST_CT, "train_cts": list(TRAIN_CTS)}, indent=2))
    if curve:
        with open(work / "curve.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(curve[0]))
            writer.writeheader()
            writer.writerows(curve)
    _figures(work, curve, slices, {k: v for k, v in results.items() if k in base})
    print(f"figures: {work / 'learning_curve.png'}, {work / 'slices.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
