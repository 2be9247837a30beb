"""Benchmark: the cycle metrics of a perfect round trip through the network grid (issue 13's cycle SSIM target).

``ct2mr translate --analysis`` scores F(G(x)) against x on the CT's own grid, but the generators see x only on the
1 mm network grid. This script measures how much of the cycle SSIM that grid alone costs: it runs the engine's own
preprocessing (RAS, 1 mm, CT window to [-1, 1]), takes the network-grid volume *unchanged* as the round trip, puts it
back on the input grid as ``translate_image`` does (``denormalize_ct``, ``restore_to_input_grid``) and scores it with
``analyze_translation``, the function behind ``--analysis``. A model can do no better than this on the cycle metrics.

Prints the CT's spacing and size, the model's CT window, and the cycle SSIM, MAE (HU) and PSNR (dB) in the body mask.

Usage, from the repository root::

    .venv/bin/python benchmarks/cycle_ceiling.py ../shared/data/ct/chest_ct_lung2.nrrd            # default model
    .venv/bin/python benchmarks/cycle_ceiling.py CT.nrrd --model runs/X/model.safetensors          # its window
"""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> None:
    """Parse the arguments, run the perfect round trip and print its cycle metrics.

    Raises:
        RuntimeError / ValueError: from SimpleITK or the engine when the CT or the model cannot be read.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ct", help="a CT volume in HU (any format SimpleITK reads)")
    parser.add_argument("--model", default=None, help="checkpoint whose preprocessing (CT window) is used; "
                                                     "default: the bundled default model")
    args = parser.parse_args(argv)

    import SimpleITK as sitk

    from ct2mr.evaluation.translation_analysis import analyze_translation
    from ct2mr.models.checkpoint import load_checkpoint
    from ct2mr.preprocessing.pipeline import denormalize_ct, preprocess, restore_to_input_grid

    checkpoint = load_checkpoint(args.model)
    window = checkpoint.preprocessing.ct_window
    ct = sitk.ReadImage(args.ct)
    print(f"CT spacing {tuple(round(s, 3) for s in ct.GetSpacing())} mm (x, y, z), size {ct.GetSize()}, "
          f"CT window {list(window)} HU")
    pre = preprocess(ct, "ct", checkpoint.preprocessing)
    roundtrip = restore_to_input_grid(denormalize_ct(pre.array.copy(), window), pre.record, default_value=window[0])
    synthetic = restore_to_input_grid(pre.array, pre.record, default_value=-1.0)  # only its grid is used
    metrics = analyze_translation(ct, synthetic, roundtrip, window)["metrics"]
    print(f"perfect round trip through the {list(pre.array.shape)} (z, y, x) network grid: "
          f"cycle SSIM {metrics['ssim_cyc']:.3f}, MAE {metrics['mae_cyc_hu']:.1f} HU, "
          f"PSNR {metrics['psnr_cyc_db']:.1f} dB")


if __name__ == "__main__":
    main()
