"""A known CT -> MR mapping: a documented UTE MR forward model applied to real CTs (a test instrument, not engine code).

The shared data has no registered CT/MR pairs, so no paired metric of a translator can be measured on it. This module
computes, from any CT in HU, the magnitude image a thoracic ultrashort-echo-time (UTE) spoiled gradient-echo sequence
would give of the same body, on the CT's own voxel grid. Training on the simulated MR *unpaired* and scoring the
translation of a held-out CT against its simulation gives a paired score with a known answer
(``benchmarks/known_mapping.py``).

The forward model, step by step (all distances in mm, the arrays (z, y, x) as SimpleITK gives them):

1. **Tissue classes from HU** (soft memberships, so partial volume mixes signals, not parameters):
   air (< -950 HU), lung parenchyma (-950 to -300 HU; its proton density scales with the tissue fraction
   ``(HU + 1000) / 1040``), fat (-190 to -30 HU), muscle/soft tissue (-30 to 60 HU), liver-like parenchyma and
   blood (60 to 180 HU), fatty red marrow/trabecular bone (180 to 600 HU) and cortical bone (> 600 HU). Class
   edges are logistic in HU with a width of 12-40 HU.
2. **Tissue parameters at 1.5 T** (proton density PD relative to water, T1 and T2* in ms), rounded from the literature:
   fat PD 0.9, T1 280, T2* 25 (Gold et al., AJR 2004; de Bazelaire et al., Radiology 2004); skeletal muscle
   PD 0.75, T1 1000, T2* 30 (same sources); liver PD 0.7, T1 580, T2* 25; blood PD 0.85, T1 1400, T2* 50
   (Stanisz et al., MRM 2005, for T1); lung parenchyma PD 0.8 x tissue fraction, T1 1200, T2* 1.5
   (Hatabu et al., Eur J Radiol 1999: T2* 1-2 ms at 1.5 T, why lung needs UTE); marrow PD 0.8, T1 400, T2* 8;
   cortical bone PD 0.2 (bound and pore water), T1 250, T2* 0.4 (Du and Bydder, NMR Biomed 2013); air PD 0.
3. **Sequence signal equation**: steady-state spoiled gradient echo,
   ``S = PD sin(a) (1 - E1) / (1 - cos(a) E1) exp(-TE / T2*)``, ``E1 = exp(-TR / T1)``, with the UTE parameters
   TR 4 ms, TE 0.07 ms, flip angle a 8 degrees. Fat is bright (short T1), muscle darker, blood and liver between,
   cortical bone faint but not black (UTE), lung parenchyma low and proportional to density: the signal is
   **non-monotone in HU** (fat at -100 HU is brighter than muscle at 40 HU and than bone at 1000 HU).
4. **A spatial effect no per-voxel mapping can model**: intravoxel dephasing near air-tissue interfaces. The
   volume susceptibility (air +0.36 ppm, soft tissue -9.05 ppm, fat -7.8 ppm, bone -11 ppm; Schenck, Med Phys 1996)
   is smoothed with a 2.5 mm Gaussian (the field perturbation reaches beyond the interface) and its gradient
   magnitude |grad chi| (ppm/mm) adds ``R2*' = kappa |grad chi|`` to each voxel's relaxation rate; kappa is
   calibrated phenomenologically (a 2-3 mm band of soft tissue next to lung and skin loses 20-40 % of its signal),
   since the true dephasing depends on voxel shape and readout. Two voxels of equal HU differ in MR signal
   depending on how close they are to air.
5. **Receive bias field**: a smooth multiplicative coil sensitivity, ``exp(p(r))`` with ``p`` a random polynomial of
   degree 2 in the normalised physical coordinates, scaled to a peak-to-peak of about +-20 % (seeded per case).
6. **Point-spread function**: radial UTE read-outs blur; a Gaussian PSF with 1.6 mm FWHM in every direction, applied in
   physical units (anisotropic voxels get per-axis sigmas in voxels).
7. **Rician noise**: magnitude of the complex signal with i.i.d. Gaussian noise on both channels, sigma 1.5 % of the fat
   signal (SNR about 65 in fat, about 2-6 in lung parenchyma).

Everything is seeded and deterministic (:func:`simulate_ute_mr` with the same CT and seed gives the same bytes).
The result is in arbitrary signal units; the engine normalises MR by its own 1st-99th percentiles.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

__all__ = ["Tissue", "TISSUES", "UTESequence", "tissue_memberships", "signal_per_class", "ideal_signal",
           "susceptibility_map", "simulate_ute_mr", "simulate_image"]


@dataclass(frozen=True)
class Tissue:
    """One tissue class: HU interval (logistic edges) and MR parameters at 1.5 T.

    Attributes:
        name: class name.
        hu_low, hu_high: HU interval of the class; ``-inf``/``inf`` for an open end.
        edge_hu: width (HU) of the logistic membership edges.
        pd: proton density relative to water (for lung: at tissue fraction 1, scaled by density).
        t1_ms, t2s_ms: T1 and T2* in ms.
        chi_ppm: volume magnetic susceptibility (SI, ppm).
    """

    name: str
    hu_low: float
    hu_high: float
    edge_hu: float
    pd: float
    t1_ms: float
    t2s_ms: float
    chi_ppm: float


#: The classes of step 1-2 (see the module docstring for sources).
TISSUES: tuple[Tissue, ...] = (
    Tissue("air", -math.inf, -950.0, 15.0, 0.0, 1000.0, 1.0, 0.36),
    Tissue("lung", -950.0, -300.0, 40.0, 0.8, 1200.0, 1.5, -4.0),
    Tissue("fat", -190.0, -30.0, 15.0, 0.9, 280.0, 25.0, -7.8),
    Tissue("muscle", -30.0, 60.0, 12.0, 0.75, 1000.0, 30.0, -9.05),
    Tissue("liver_blood", 60.0, 180.0, 15.0, 0.8, 900.0, 40.0, -9.05),
    Tissue("marrow", 180.0, 600.0, 40.0, 0.8, 400.0, 8.0, -10.0),
    Tissue("cortical_bone", 600.0, math.inf, 40.0, 0.2, 250.0, 0.4, -11.0),
)


@dataclass(frozen=True)
class UTESequence:
    """Spoiled gradient-echo UTE acquisition and the degradations of steps 4-7.

    Attributes:
        tr_ms, te_ms: repetition and echo time (ms).
        flip_deg: flip angle (degrees).
        kappa: R2*' per unit |grad chi| (1/ms per ppm/mm), step 4.
        chi_sigma_mm: smoothing of the susceptibility map (mm), step 4.
        bias_amplitude: peak-to-peak log-amplitude of the receive field (0.2: about +-20 %), step 5.
        psf_fwhm_mm: Gaussian PSF FWHM (mm), step 6.
        noise_fraction: Rician sigma as a fraction of the fat signal, step 7.
    """

    tr_ms: float = 4.0
    te_ms: float = 0.07
    flip_deg: float = 8.0
    kappa: float = 3.5
    chi_sigma_mm: float = 2.5
    bias_amplitude: float = 0.4
    psf_fwhm_mm: float = 1.6
    noise_fraction: float = 0.015
    tissues: tuple[Tissue, ...] = field(default=TISSUES)


def _logistic(x: np.ndarray, width: float) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(x / (2.0 * width)))


def tissue_memberships(hu: np.ndarray, tissues: Sequence[Tissue] = TISSUES) -> np.ndarray:
    """Soft class memberships of each voxel (step 1).

    Args:
        hu: CT in HU, any shape.
        tissues: classes, ordered by HU.

    Returns:
        float32 array (n_classes, *hu.shape), non-negative, summing to 1 over the first axis.
    """
    hu = np.asarray(hu, np.float32)
    out = np.empty((len(tissues),) + hu.shape, np.float32)
    for i, t in enumerate(tissues):
        lo = np.ones_like(hu) if math.isinf(t.hu_low) else _logistic(hu - t.hu_low, t.edge_hu)
        hi = np.ones_like(hu) if math.isinf(t.hu_high) else _logistic(t.hu_high - hu, t.edge_hu)
        out[i] = lo * hi
    out /= np.maximum(out.sum(0, keepdims=True), 1e-6)
    return out


def _spgr(pd: np.ndarray | float, t1: float, r2s: np.ndarray | float, seq: UTESequence) -> np.ndarray:
    a = math.radians(seq.flip_deg)
    e1 = math.exp(-seq.tr_ms / t1)
    return np.asarray(pd * math.sin(a) * (1 - e1) / (1 - math.cos(a) * e1) * np.exp(-seq.te_ms * r2s), np.float32)


def signal_per_class(hu: np.ndarray, extra_r2s: np.ndarray | float = 0.0, seq: UTESequence = UTESequence()
                     ) -> np.ndarray:
    """Signal of each class at each voxel (steps 2-3), before mixing.

    Args:
        hu: CT in HU (used for the density scaling of lung parenchyma).
        extra_r2s: additional relaxation rate R2*' (1/ms), scalar or like ``hu`` (step 4).
        seq: the sequence.

    Returns:
        float32 (n_classes, *hu.shape).
    """
    hu = np.asarray(hu, np.float32)
    out = np.empty((len(seq.tissues),) + hu.shape, np.float32)
    for i, t in enumerate(seq.tissues):
        pd = t.pd * np.clip((hu + 1000.0) / 1040.0, 0.0, 1.0) if t.name == "lung" else t.pd
        out[i] = _spgr(pd, t.t1_ms, 1.0 / t.t2s_ms + extra_r2s, seq)
    return out


def ideal_signal(hu: np.ndarray, seq: UTESequence = UTESequence()) -> np.ndarray:
    """Per-voxel signal of steps 1-3 only (no spatial effect, bias, blur or noise): the HU -> MR curve.

    Returns:
        float32 array like ``hu``.
    """
    return (tissue_memberships(hu, seq.tissues) * signal_per_class(hu, 0.0, seq)).sum(0)


def susceptibility_map(memberships: np.ndarray, tissues: Sequence[Tissue] = TISSUES) -> np.ndarray:
    """Volume susceptibility chi (ppm) of each voxel: the membership-weighted class values (step 4)."""
    chi = np.asarray([t.chi_ppm for t in tissues], np.float32)
    return np.tensordot(chi, memberships, axes=1).astype(np.float32)


def _bias_field(shape: Sequence[int], spacing_zyx: Sequence[float], rng: np.random.Generator,
                amplitude: float) -> np.ndarray:
    axes = [np.linspace(-1.0, 1.0, n, dtype=np.float32) * (n * s) / 400.0 for n, s in zip(shape, spacing_zyx)]
    z, y, x = np.meshgrid(*axes, indexing="ij", sparse=True)
    terms = [z, y, x, z * z, y * y, x * x, z * y, z * x, y * x]
    coef = rng.normal(0.0, 1.0, len(terms)).astype(np.float32)
    field_ = sum(c * t for c, t in zip(coef, terms))
    field_ = np.broadcast_to(field_, tuple(shape)).astype(np.float32)
    span = float(field_.max() - field_.min())
    if span > 0:
        field_ = (field_ - float(field_.mean())) * (amplitude / span)
    return np.exp(field_)


def simulate_ute_mr(hu: np.ndarray, spacing_zyx: Sequence[float], seed: int = 0,
                    seq: UTESequence = UTESequence(), degrade: bool = True) -> np.ndarray:
    """The simulated UTE MR magnitude of a CT (steps 1-7), on the CT's voxel grid.

    Args:
        hu: (z, y, x) CT in HU.
        spacing_zyx: voxel spacing (mm) in (z, y, x) order.
        seed: seed of the bias field and the noise (the same seed gives the same output).
        seq: the sequence and degradations.
        degrade: apply the bias field, PSF and noise (steps 5-7); ``False`` returns steps 1-4 only.

    Returns:
        float32 (z, y, x) magnitude in arbitrary units (fat about 0.09).

    Raises:
        ValueError: not a 3D array or non-positive spacing.
    """
    hu = np.asarray(hu, np.float32)
    if hu.ndim != 3 or len(spacing_zyx) != 3 or min(spacing_zyx) <= 0:
        raise ValueError(f"simulate_ute_mr needs a (z, y, x) CT and three positive spacings, got {hu.shape}, "
                         f"{spacing_zyx}.")
    spacing = np.asarray(spacing_zyx, float)
    rng = np.random.default_rng(seed)
    w = tissue_memberships(hu, seq.tissues)
    chi = susceptibility_map(w, seq.tissues)
    chi = ndimage.gaussian_filter(chi, seq.chi_sigma_mm / spacing, mode="nearest")
    grad = np.sqrt(sum(np.square(np.gradient(chi, *spacing)))).astype(np.float32)  # ppm/mm
    signal = (w * signal_per_class(hu, seq.kappa * grad, seq)).sum(0)
    del w, chi, grad
    if not degrade:
        return signal.astype(np.float32)
    signal *= _bias_field(hu.shape, spacing, rng, seq.bias_amplitude)
    sigma_vox = seq.psf_fwhm_mm / (2.0 * math.sqrt(2.0 * math.log(2.0))) / spacing
    signal = ndimage.gaussian_filter(signal, sigma_vox, mode="nearest")
    fat = float(_spgr(TISSUES[2].pd, TISSUES[2].t1_ms, 1.0 / TISSUES[2].t2s_ms, seq))
    sigma = seq.noise_fraction * fat
    real = signal + rng.normal(0.0, sigma, hu.shape).astype(np.float32)
    imag = rng.normal(0.0, sigma, hu.shape).astype(np.float32)
    return np.sqrt(real * real + imag * imag).astype(np.float32)


def simulate_image(ct: sitk.Image, seed: int = 0, seq: UTESequence = UTESequence(), degrade: bool = True
                   ) -> sitk.Image:
    """:func:`simulate_ute_mr` of a SimpleITK CT; the result keeps the CT's size, spacing, origin and direction."""
    hu = sitk.GetArrayFromImage(ct).astype(np.float32)
    out = sitk.GetImageFromArray(simulate_ute_mr(hu, ct.GetSpacing()[::-1], seed, seq, degrade))
    out.CopyInformation(ct)
    return out
