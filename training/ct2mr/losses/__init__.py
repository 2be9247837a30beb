"""Training objectives of the thesis (sections 6.3, 7.7 and 8). No file I/O happens here; tensors are (B, C, D, H, W).

* adversarial heads LSGAN / WGAN-GP / hinge / cross-entropy and DC-CycleGAN's dual contrast (:mod:`.adversarial`);
* cycle and identity L1, SSIM-3D and the Mix(L1, SSIM-3D) cycle term (:mod:`.cycle`, :mod:`.ssim`);
* Hist-CycleGAN's soft histogram loss and the joint-histogram mutual information (:mod:`.histogram`);
* the Rician forward model and likelihood of magnitude MR (:mod:`.rician`);
* structure preservation between x and G(x): the MIND-SSC loss (:mod:`.mind`; Heinrich et al. 2012/2013, Yang et
  al. 2018) and 3D PatchNCE (:mod:`.patchnce`; Park et al. 2020).
"""

from __future__ import annotations

from ct2mr.losses.adversarial import ADVERSARIAL_HEADS, BETA_RANGE, AdversarialLoss, check_beta, dual_contrast_loss
from ct2mr.losses.cycle import cycle_loss, identity_loss, structural_cycle_loss
from ct2mr.losses.histogram import (HISTOGRAM_DISTANCES, histogram_distance, histogram_loss, mutual_information,
                        mutual_information_loss, soft_histogram)
from ct2mr.losses.mind import mind_loss, mind_ssc
from ct2mr.losses.patchnce import PatchSampleHead, default_nce_layers, encoder_features, patch_nce_loss
from ct2mr.losses.rician import log_i0, rician_corrupt, rician_mixed_loss, rician_nll
from ct2mr.losses.ssim import ssim3d

__all__ = ["ADVERSARIAL_HEADS", "BETA_RANGE", "AdversarialLoss", "check_beta", "dual_contrast_loss", "cycle_loss",
           "identity_loss", "structural_cycle_loss", "ssim3d", "HISTOGRAM_DISTANCES", "soft_histogram",
           "histogram_distance", "histogram_loss", "mutual_information", "mutual_information_loss",
           "rician_corrupt", "rician_nll", "rician_mixed_loss", "log_i0", "mind_ssc", "mind_loss", "PatchSampleHead",
           "patch_nce_loss", "encoder_features", "default_nce_layers"]
