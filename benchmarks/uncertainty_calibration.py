"""Does high uncertainty mark high error? Calibration of ``ct2mr translate --uncertainty tta`` (issue 16).

On the known-mapping benchmark's held-out case (``benchmarks/known_mapping.py``: ``chest_ct_lung2`` and its simulated
UTE MR, never trained on), translate with a model trained there, with the test-time-augmentation uncertainty map, and
compare, inside the CT's body mask on the CT grid: the Spearman rank correlation of the uncertainty with the absolute
error |G(x) - truth| (both on the [-1, 1] MR scale), and the mean error in each uncertainty decile (a calibration
plot: a calibrated map gives a rising curve).

Usage, from the repository root, after ``benchmarks/known_mapping.py`` has trained a recipe::

    .venv/bin/python benchmarks/uncertainty_calibration.py --recipe sc --passes 4
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import stats

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from known_mapping import _body, _normalise_mr  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "known_mapping", help="known-mapping work folder")
    parser.add_argument("--recipe", default="sc", help="trained recipe whose model.safetensors is used")
    parser.add_argument("--passes", type=int, default=4, help="TTA passes (default: %(default)s)")
    args = parser.parse_args(argv)
    ct_path = args.work / "data_test" / "chest_ct_lung2_ct.nii.gz"
    mr_path = args.work / "data_test" / "chest_ct_lung2_mr.nii.gz"
    model = args.work / "runs" / args.recipe / "model.safetensors"
    for path in (ct_path, mr_path, model):
        if not path.exists():
            parser.error(f"{path} is missing: run benchmarks/known_mapping.py --recipe {args.recipe} first.")
    out = args.work / "uncertainty" / args.recipe
    if not (out / "uncertainty.nii.gz").exists():
        subprocess.run([str(Path(sys.executable).with_name("ct2mr")), "translate", str(ct_path), "-o", str(out),
                        "--model", str(model), "--uncertainty", "tta", "--uncertainty-passes", str(args.passes),
                        "--device", "cpu", "--progress", "none", "--overwrite"], check=True)
    hu = sitk.GetArrayFromImage(sitk.ReadImage(str(ct_path))).astype(np.float32)
    truth = _normalise_mr(sitk.GetArrayFromImage(sitk.ReadImage(str(mr_path))).astype(np.float32))
    pred = np.clip(sitk.GetArrayFromImage(sitk.ReadImage(str(out / "synthetic_mr.nii.gz"))), -1, 1)
    unc = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "uncertainty.nii.gz")))
    mask = _body(hu)
    error, u = np.abs(pred - truth)[mask], unc[mask]
    rng = np.random.default_rng(0)
    sample = rng.choice(error.size, min(error.size, 2_000_000), replace=False)
    rho = float(stats.spearmanr(u[sample], error[sample]).statistic)
    edges = np.quantile(u, np.linspace(0, 1, 11))
    index = np.clip(np.searchsorted(edges, u, side="right") - 1, 0, 9)
    deciles = [{"decile": d + 1, "uncertainty_mean": float(u[index == d].mean()),
                "error_mean": float(error[index == d].mean())} for d in range(10)]
    result = {"recipe": args.recipe, "passes": args.passes, "voxels": int(mask.sum()), "spearman": rho,
              "deciles": deciles, "load_average": os.getloadavg()[0]}
    (out / "calibration.json").write_text(json.dumps(result, indent=2))
    print(f"Spearman(uncertainty, |G(x) - truth|) inside the body: {rho:.3f} ({int(mask.sum())} voxels)")
    print("| decile | mean uncertainty | mean |error| |\n|---|---|---|")
    for row in deciles:
        print(f"| {row['decile']} | {row['uncertainty_mean']:.4f} | {row['error_mean']:.3f} |")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot([r["uncertainty_mean"] for r in deciles], [r["error_mean"] for r in deciles], "o-")
    ax.set(xlabel="mean uncertainty of the decile (std of G(x), [-1, 1] units)", ylabel="mean |G(x) - truth|",
           title=f"TTA calibration ({args.recipe}), Spearman {rho:.2f}")
    fig.tight_layout()
    fig.savefig(out / "calibration.png", dpi=90)
    print(f"figure: {out / 'calibration.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
