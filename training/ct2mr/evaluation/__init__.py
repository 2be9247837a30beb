"""Evaluation (thesis chapter 7): metrics, anatomy checks, quality control and figures.

Modules:
    evaluate: ``ct2mr evaluate`` / ``ct2mr compare``: a model on held-out volumes, with its report.
    metrics: the pure metric functions (FID, KID, W1, SSIM-3D, PSNR, MAE, paired t-test) on NumPy arrays.
    features: feature extractors for distribution distances (FID-like).
    anatomy: anatomy-preservation measures (edges, NMI, registration displacement).
    qc: preprocessing quality control (``ct2mr qc``).
    reference_qa: QA against a registered reference MR.
    translation_analysis: the per-translation analysis (histograms, warp check).
    figures: tri-planar panels and histogram plots.
"""
