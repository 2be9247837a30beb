"""Experiment configuration of ``ct2mr train``: one structured config, presets as YAML, command-line overrides.

A run is described by a :class:`RunConfig` with three sections (one concern each, as ganslate does):

* ``model``: generator, discriminator, adversarial head and every loss weight (thesis sections 6.2-6.3 and 7.7,
  Jin et al. 2019 for the paired terms, thesis section 8 for the Rician terms);
* ``data``: inputs, train/validation/test split, patch sampling, preprocessing (thesis sections 4 and 7.1);
* ``train``: optimisation protocol (thesis section 7.1), precision, checkpoints, validation, logging.

The configuration is resolved in this order, later sources winning:

1. the dataclass defaults below (thesis model M1 with the section 7.1 protocol);
2. a preset: ``ct2mr/configs/<name>.yaml`` (``m1``, ``m2``, ``m3``, ``m4``, ``hist``, ``hlsnc``, ``paired``) or any
   YAML file of the same shape; a preset may start from another with ``extends: <name or path>``;
3. command-line shorthands (``--steps 100``, ``--width 8``; see :func:`shorthand_overrides`);
4. dotlist overrides (``model.alpha=0.84 train.steps=100 data.patch_size=[48,48,48]``).

Unknown keys, wrong types and enumerated values outside their allowed set are refused up front with a
``ValueError`` that names the key and the allowed values. Every run writes its resolved config
(``RUN_DIR/config.yaml``), from which ``--resume`` continues.

OmegaConf (https://omegaconf.readthedocs.io) parses and merges; Hydra's launcher is not needed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from ct2mr.preprocessing.pipeline import PreprocessingConfig

__all__ = [
    "anchor_window_voxels",
    "GeneratorConfig",
    "DiscriminatorConfig",
    "RicianConfig",
    "PairedConfig",
    "ModelConfig",
    "DataConfig",
    "TrainConfig",
    "RunConfig",
    "GENERATOR_NAMES",
    "DISCRIMINATOR_NAMES",
    "NORM_NAMES",
    "ADVERSARIAL_HEADS",
    "HIST_DISTANCES",
    "OPTIMIZERS",
    "PRECISIONS",
    "BALANCE_MODES",
    "DECAY_MODES",
    "list_presets",
    "preset_path",
    "load_config",
    "shorthand_overrides",
    "split_overrides",
    "split_path_overrides",
    "to_yaml",
]

#: Generators of the model family (thesis section 6.2); ``ct2mr.networks`` may add more.
GENERATOR_NAMES = ("resnet", "unet", "unetpp")
#: Discriminators (3D PatchGAN, thesis section 6.2).
DISCRIMINATOR_NAMES = ("patchgan",)
#: Normalisations: CycleGAN's instance norm, batch, layer, switchable (HLSNC-GAN, paper 003), none.
NORM_NAMES = ("instance", "batch", "layer", "switchable", "none")
#: Adversarial heads: LSGAN (eq. 6.4), WGAN-GP (eq. 6.5), hinge (HLSNC-GAN eqs. 5-6), bce (cross-entropy, DC-CycleGAN).
ADVERSARIAL_HEADS = ("lsgan", "wgan-gp", "hinge", "bce")
#: Histogram distances of the Hist-CycleGAN term (thesis eq. 7.2): Wasserstein-1 on CDFs, or L2 on bins.
HIST_DISTANCES = ("w1", "l2")
#: Optimisers: Adam (CycleGAN, thesis), RMSprop (HLSNC-GAN), SGD.
OPTIMIZERS = ("adam", "rmsprop", "sgd")
#: Training precisions: auto = bf16 (or fp16 with a grad scaler) on CUDA, fp32 on CPU.
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
#: How volumes are drawn: ``none`` i.i.d. over volumes; ``volume`` shuffled rounds over volumes (each equally often);
#: ``source`` shuffled rounds over source files, then a random volume of that file (a 4D series counts once).
BALANCE_MODES = ("none", "volume", "source")
#: Learning-rate schedules: ``linear`` (constant, then linear decay to 0 at the last step, as CycleGAN and
#: Jin et al. do), ``none`` (constant).
DECAY_MODES = ("linear", "none")

CONFIG_PACKAGE = "ct2mr.configs"


def _choice(key: str, value: Any, allowed: Sequence[Any]) -> None:
    if value not in allowed:
        raise ValueError(f"{key} must be one of {', '.join(map(str, allowed))}; got {value!r}.")


def _extend(base: Sequence[str], module: str, attr: str) -> tuple[str, ...]:
    """``base`` plus whatever ``ct2mr.<module>.<attr>`` lists (the installed engine may know more)."""
    try:
        import importlib

        extra = tuple(getattr(importlib.import_module(f"ct2mr.{module}"), attr, ()))
    except Exception:  # pragma: no cover - a broken optional piece must not block configuration
        extra = ()
    return tuple(dict.fromkeys((*base, *extra)))


@dataclass
class GeneratorConfig:
    """Generator G (CT -> MR) and F (MR -> CT), both with this architecture (thesis section 6.2).

    Attributes:
        name: ``resnet`` (ResNet-9b/6b), ``unet`` or ``unetpp`` (U-Net++).
        base_channels: width of the first level (CycleGAN: 64; 8-16 fits a CPU).
        norm: one of :data:`NORM_NAMES`.
        n_blocks: residual blocks of ``resnet`` (9 for ResNet-9b).
        depth: downsamplings of ``unet``/``unetpp``; patches must be multiples of ``2**depth``.
        extra: further constructor arguments passed through as they are.
    """

    name: str = "resnet"
    base_channels: int = 64
    norm: str = "instance"
    n_blocks: int = 9
    depth: int = 4
    extra: Dict[str, Any] = field(default_factory=dict)

    def to_spec(self) -> dict[str, Any]:
        """The spec :func:`ct2mr.networks.build_generator` takes (only the keys this ``name`` uses)."""
        spec: dict[str, Any] = {"name": self.name, "base_channels": int(self.base_channels), "norm": self.norm}
        if self.name == "resnet":
            spec["n_blocks"] = int(self.n_blocks)
        elif self.name in ("unet", "unetpp"):
            spec["depth"] = int(self.depth)
        spec.update(dict(self.extra))
        return spec

    @property
    def multiple(self) -> int:
        """Patch sides must be multiples of this (4 for ResNet's two stride-2 convolutions, ``2**depth`` for U-Nets)."""
        return 2 ** int(self.depth) if self.name in ("unet", "unetpp") else 4


@dataclass
class DiscriminatorConfig:
    """Discriminators D_MR and D_CT (3D PatchGAN, thesis section 6.2).

    Attributes:
        name: ``patchgan``.
        base_channels: width of the first layer.
        n_layers: stride-2 layers (3: receptive field 70^3 voxels); patches need at least ``2**(n_layers + 2)``.
        norm: one of :data:`NORM_NAMES`.
        spectral_norm: spectral normalisation on every convolution (Miyato et al. 2018; thesis M4).
        extra: further constructor arguments.
    """

    name: str = "patchgan"
    base_channels: int = 64
    n_layers: int = 3
    norm: str = "instance"
    spectral_norm: bool = False
    extra: Dict[str, Any] = field(default_factory=dict)

    def to_spec(self, in_channels: int = 1) -> dict[str, Any]:
        """The spec :func:`ct2mr.networks.build_discriminator` takes; ``in_channels`` 2 for a pair discriminator.

        ``spectral_norm`` and ``in_channels`` are only written when they differ from the defaults, so that the
        spec stays loadable by engines that predate them.
        """
        spec: dict[str, Any] = {"name": self.name, "base_channels": int(self.base_channels),
                                "n_layers": int(self.n_layers), "norm": self.norm}
        if self.spectral_norm:
            spec["spectral_norm"] = True
        if in_channels != 1:
            spec["in_channels"] = int(in_channels)
        spec.update(dict(self.extra))
        return spec


@dataclass
class RicianConfig:
    """Rician noise model of magnitude MR (thesis section 8, perspective P2).

    Attributes:
        corrupt_d: corrupt real and synthetic MR with Rician noise R_sigma before D_MR (eq. 8.1), sigma drawn
            uniformly in ``sigma_range`` per volume.
        sigma_range: (low, high) noise scale, in the [0, 1] magnitude units of ``ct2mr.losses.rician_corrupt``.
        tau: weight of the Rician negative log-likelihood in the MR identity term and the MR leg of the cycle,
            ``(1 - tau) * L1 + tau * NLL`` (:func:`ct2mr.losses.rician_mixed_loss`; the thesis's eqs. 8.4-8.5 write
            tau on the L1 term, so tau here = 1 - tau there); 0 keeps plain L1. The NLL grows like 1 / sigma^2:
            use small values (0.01-0.1).
        sigma: noise scale of the Rician negative log-likelihood (eq. 8.3), on the [0, 1] magnitude scale.
    """

    corrupt_d: bool = False
    sigma_range: List[float] = field(default_factory=lambda: [0.0, 0.05])
    tau: float = 0.0
    sigma: float = 0.05


@dataclass
class LawConfig:
    """An intensity law fitted before training, where the generators' intensity curves start (issue 13).

    :func:`ct2mr.training.intensity_law.fit_intensity_law` (unpaired, multi-scale sliced Wasserstein matching with random
    restarts) fits CT -> MR for G on the training volumes, and MR -> CT for F unless ``f_start`` is ``"inverse"``
    (the ``law`` preset's default, which also sets ``anchor_f`` to 0); needs generators with
    ``extra: {law_knots: K}`` and the same ``knots``. The fit's time counts in ``train.max_minutes``.

    Attributes:
        enabled: fit the laws when a run starts (not on ``--resume``).
        knots: K, knots of the curves (= the generators' ``law_knots``).
        restarts: optimisation starts (identity, then smooth random curves).
        iterations: Adam steps of each finalist.
        screen_iterations: Adam steps of every start before the best ``finalists`` go on (successive halving).
        finalists: starts optimised for the full ``iterations``.
        spacing_mm: the volumes are subsampled to about this spacing for the fit.
        samples: voxels sampled per volume.
        scales_mm: Gaussian sigmas (mm) of the features (0: the voxel itself).
        gradient_sigma_mm: blur (mm) before the gradient-magnitude feature.
        smoothness: weight of the curve's squared second difference.
        lr_scale: the curves' learning rate as a multiple of ``train.lr_g`` once the GAN trains (0 keeps the fitted
            law; the ResNet branch still learns what needs context).
        relative: the fit compares, for an MR target, features a smooth receive bias leaves unchanged (log-ratios
            of each blur to the widest: :func:`ct2mr.training.intensity_law.relative_features`) instead of the raw
            blurs; the MR -> CT fit never does.
        file: start from the laws of an earlier run's ``intensity_law.json`` instead of fitting (same knots), e.g.
            to compare recipes from one law or to reuse a fit made on a faster machine.
        noise: sigma (normalised target units) of the white noise the fit adds to the law's output before comparing
            it with the target (``null``: estimated from the target volumes; 0: none); with ``degradation``, where
            the fitted sigma starts.
        degradation: fit the target's noise sigma and a smooth multiplicative bias amplitude with the law (the
            law's output degraded as an acquisition degrades the target) instead of keeping the sigma at ``noise``.
        anchor: weight of ``|G(x) - C_G(x)| + |F(y) - C_F(y)|`` (mean, normalised units), ``C`` the generator's
            per-voxel curve alone (:meth:`ResnetGenerator3D.curve_output`): the ResNet branch pays for every change
            it makes to the law, so the GAN adds only what the law cannot (0: off).
        anchor_f: the weight of F's half of the anchor, ``|F(y) - C_F(y)|`` (``null``: ``anchor``). 0 anchors G
            alone: F is then free to learn, through the cycle loss, an inverse of G that uses context (a CT -> MR
            law is not one to one, so F's own per-voxel MR -> CT law is a poor inverse: cycle SSIM 0.35 on the real
            data with both anchored; benchmarks/RESULTS.md, sixth session).
        anchor_sigma_mm: Gaussian sigma (mm) of a low-pass filter applied to ``G(x) - C_G(x)`` (and F's) before the
            anchor takes its mean absolute value: the anchor then holds the law's intensities at the scale of
            tissues and leaves finer detail (resolution, noise texture) to the GAN; 0 (default): voxel by voxel.
            The filter is 'valid' (no padding), so the patch must exceed ``2 ceil(3 sigma) + 1`` voxels (checked).
        f_start: where F's curve starts: ``"fit"``, the unpaired MR -> CT fit; ``"inverse"``, the per-voxel
            least-squares inverse of G's fitted law on the training CTs
            (:func:`ct2mr.training.intensity_law.inverse_intensity_law`: what the cycle loss asks of F, in about
            2 s instead of a 5-minute fit; on the benchmark the per-voxel round trip's SSIM rose from 0.21 to 0.58).
    """

    enabled: bool = False
    knots: int = 41
    restarts: int = 32
    iterations: int = 300
    screen_iterations: int = 40
    finalists: int = 3
    spacing_mm: float = 2.0
    samples: int = 10000
    scales_mm: List[float] = field(default_factory=lambda: [0.0, 3.0, 8.0, 20.0])
    gradient_sigma_mm: float = 1.5
    smoothness: float = 0.0001
    lr_scale: float = 1.0
    file: Optional[str] = None
    noise: Optional[float] = None
    degradation: bool = True
    anchor: float = 0.0
    relative: bool = True
    anchor_f: Optional[float] = None
    anchor_sigma_mm: float = 0.0
    f_start: str = "fit"


@dataclass
class PairedConfig:
    """Paired training next to the unpaired cycle (Jin et al. 2019, "MR-GAN", eq. 5), for registered CT/MR pairs.

    Attributes:
        enabled: add the paired terms; needs ``data.paired_ct`` and ``data.paired_mr``.
        gamma: weight of the voxel-wise L1 ``|G(x_p) - y_p| + |F(y_p) - x_p|`` (Jin et al.: 100).
        lambda_adv: weight of the conditional pair discriminators' terms (D_MR sees (x_p, y) pairs, D_CT (y_p, x)).
        adversarial: head of the pair discriminators (Jin et al. kept the negative log-likelihood, ``bce``).
    """

    enabled: bool = False
    gamma: float = 100.0
    lambda_adv: float = 1.0
    adversarial: str = "bce"


@dataclass
class ModelConfig:
    """Networks and objective (thesis eqs. 6.3 and 7.3).

    Attributes:
        generator: G and F.
        discriminator: D_MR and D_CT.
        adversarial: adversarial head, one of :data:`ADVERSARIAL_HEADS`.
        gp_weight: lambda_gp of WGAN-GP (Gulrajani et al.: 10).
        lambda_cyc: cycle weight (10).
        lambda_id: identity weight (thesis Table 4: 0.2).
        alpha: SSIM-3D weight inside each cycle leg, ``(1 - alpha) L1 + alpha (1 - SSIM)`` (thesis Table 5's
            Mix(l1, SSIM-3D); its eq. 6.3 writes the mix as ``L1 + alpha (1 - SSIM)``, the same up to the L1 weight
            1 - alpha; :func:`ct2mr.losses.structural_cycle_loss`); M3, M4; thesis Table 8: 0.1.
        beta: dual-contrast weight (DC-CycleGAN; thesis section 6.2.1: beta in [0.3, 0.7]); 0 disables.
        lambda_hist: histogram-loss weight on G(x) vs real MR (Hist-CycleGAN, section 7.7: [0.5, 2]); 0 disables.
        hist_bins: K bins of the soft histogram (64 or 128).
        hist_distance: ``w1`` (eq. 7.2) or ``l2``.
        hist_mask: only foreground voxels (above the background level) enter the histograms.
        hist_symmetric: also match F(y) to real CT (section 7.7: "symmetrically optional").
        lambda_mi: weight of -I(x; G(x)) (section 7.7: [0.01, 0.1] if enabled); 0 disables.
        lambda_mind: weight of the MIND-SSC structure loss ``|MIND(x) - MIND(G(x))| + |MIND(y) - MIND(F(y))|``
            (Heinrich et al. 2012/2013; Yang et al., DLMIA 2018); 0 disables.
        mind_dilation: neighbourhood spacing of MIND-SSC in voxels (mm at 1 mm).
        lambda_nce: weight of the 3D PatchNCE loss between the encoder features of x and G(x), and of y and F(y)
            (Park et al., ECCV 2020); 0 disables.
        nce_patches: locations sampled per layer and sample (CUT: 256).
        nce_channels: width of the projection heads (CUT: 256).
        nce_temperature: tau of the InfoNCE (CUT: 0.07).
        rician: Rician corruption and likelihood.
        paired: paired terms of Jin et al.
        law: the intensity law fitted before training (:class:`LawConfig`).
    """

    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    adversarial: str = "lsgan"
    gp_weight: float = 10.0
    lambda_cyc: float = 10.0
    lambda_id: float = 0.2
    alpha: float = 0.0
    beta: float = 0.0
    lambda_hist: float = 0.0
    hist_bins: int = 64
    hist_distance: str = "w1"
    hist_mask: bool = False
    hist_symmetric: bool = False
    lambda_mi: float = 0.0
    lambda_mind: float = 0.0
    mind_dilation: int = 2
    lambda_nce: float = 0.0
    nce_patches: int = 256
    nce_channels: int = 64
    nce_temperature: float = 0.07
    rician: RicianConfig = field(default_factory=RicianConfig)
    paired: PairedConfig = field(default_factory=PairedConfig)
    law: LawConfig = field(default_factory=LawConfig)


@dataclass
class DataConfig:
    """Inputs, split and patch sampling (thesis sections 4 and 7.1).

    Paths are files or folders (any format :func:`ct2mr.io.images.read_image` reads, or ``ct2mr preprocess`` HDF5 outputs);
    4D MR series are split into 3D volumes.

    Attributes:
        ct: training CT inputs.
        mr: training MR inputs.
        val_ct: held-out CT volumes for validation; when empty, ``val_fraction`` of the CT sources are held out.
        val_mr: held-out MR volumes; when empty, ``val_fraction`` of the MR sources are held out.
        paired_ct: registered CT of paired mode (same order as ``paired_mr``; each pair on one voxel grid after
            preprocessing).
        paired_mr: registered MR of paired mode.
        split_file: JSON or CSV file listing train/val/test inputs per modality (see :func:`ct2mr.training.data.read_split`);
            replaces ``ct``/``mr``/``val_*`` when given.
        val_fraction: share of source files held out for validation when no split is given (thesis 7.1: 0.2);
            a modality keeps at least one training source.
        test_fraction: share of source files held out for testing (listed in ``split.json``, never read).
        patch_size: (D, H, W) voxels at 1 mm.
        batch_size: patches per domain per step and per process; the global batch is this times the processes.
        foreground: minimum fraction of foreground voxels (above background + 0.05) of a patch; 0 disables.
        foreground_tries: draws before the foreground criterion gives up.
        foreground_bias: probability of centring a patch on a random foreground voxel instead of uniformly.
        balance: volume drawing, one of :data:`BALANCE_MODES`.
        prefetch: batches prepared ahead by a background thread (0: in the training loop).
        preprocessing: parameters of :class:`ct2mr.preprocessing.pipeline.PreprocessingConfig`.
    """

    ct: List[str] = field(default_factory=list)
    mr: List[str] = field(default_factory=list)
    val_ct: List[str] = field(default_factory=list)
    val_mr: List[str] = field(default_factory=list)
    paired_ct: List[str] = field(default_factory=list)
    paired_mr: List[str] = field(default_factory=list)
    split_file: Optional[str] = None
    val_fraction: float = 0.2
    test_fraction: float = 0.0
    patch_size: List[int] = field(default_factory=lambda: [64, 64, 64])
    batch_size: int = 1
    foreground: float = 0.2
    foreground_tries: int = 10
    foreground_bias: float = 0.0
    balance: str = "source"
    prefetch: int = 2
    preprocessing: Dict[str, Any] = field(default_factory=lambda: PreprocessingConfig().to_dict())


@dataclass
class TrainConfig:
    """Optimisation protocol and run mechanics (thesis section 7.1).

    Attributes:
        steps: optimisation steps (one G update and, unless frozen, one D update each).
        optimizer: one of :data:`OPTIMIZERS`.
        lr_g: learning rate of G and F (2e-4).
        lr_d: learning rate of D_MR and D_CT (2e-4; a different value gives TTUR, Heusel et al. 2017).
        betas: Adam betas ((0.5, 0.999)); SGD uses ``betas[0]`` as momentum.
        rmsprop_alpha: RMSprop smoothing constant (HLSNC-GAN: 0.9).
        weight_decay: optimiser weight decay.
        decay: learning-rate schedule, one of :data:`DECAY_MODES`.
        decay_start: step after which the linear decay starts; ``None``: half of ``steps``.
        pool_size: image pool of past fakes shown to D (CycleGAN: 50); 0 disables.
        freeze_d_every: period (steps) of the "freeze D for a few steps" schedule (thesis section 7.5); 0 disables.
        freeze_d_steps: D updates skipped at the end of each period.
        precision: one of :data:`PRECISIONS`.
        channels_last: ``channels_last_3d`` memory format; ``None``: on CUDA only.
        grad_checkpointing: recompute generator blocks in the backward pass (less memory, ~30% more compute).
        seed: seed of Python, NumPy, torch and the patch sampler.
        deterministic: ``torch.use_deterministic_algorithms`` (warn-only) and no cuDNN autotuning.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (under torchrun: ``cuda:LOCAL_RANK``).
        threads: CPU threads for torch (0: torch's default).
        log_every: steps between log lines (log.jsonl and TensorBoard scalars).
        checkpoint_every: steps between resumable checkpoints.
        val_every: steps between validations on the held-out volumes (0: never; also at the end when > 0).
        val_volumes: held-out volumes per modality used in each validation.
        val_crop: centre crop (D, H, W) of each validation volume; ``None``: the whole volume.
        val_overlap: sliding-window overlap of validation.
        tensorboard: write TensorBoard events to ``RUN_DIR/tb``.
        max_minutes: wall-clock budget of the run in minutes (summed over resumes); when it is spent the run stops
            after the current step and writes its final checkpoint and model as if ``steps`` were reached. With a
            budget, the learning-rate schedule follows the clock: the decay starts when the fraction
            ``decay_start / steps`` of the budget is spent and reaches 0 at the end. ``None``: no budget.
        snapshot_minutes: every this many minutes of training, keep a copy of G and F as
            ``RUN_DIR/snapshots/step_NNNNNNNN.safetensors`` (for learning curves); 0 disables.
        snapshot_every: the same every this many steps (reproducible on a loaded machine); 0 disables.
    """

    steps: int = 1000
    optimizer: str = "adam"
    lr_g: float = 2e-4
    lr_d: float = 2e-4
    betas: List[float] = field(default_factory=lambda: [0.5, 0.999])
    rmsprop_alpha: float = 0.9
    weight_decay: float = 0.0
    decay: str = "linear"
    decay_start: Optional[int] = None
    pool_size: int = 50
    freeze_d_every: int = 0
    freeze_d_steps: int = 0
    precision: str = "auto"
    channels_last: Optional[bool] = None
    grad_checkpointing: bool = False
    seed: int = 0
    deterministic: bool = False
    device: str = "auto"
    threads: int = 0
    log_every: int = 10
    checkpoint_every: int = 100
    val_every: int = 500
    val_volumes: int = 2
    val_crop: Optional[List[int]] = field(default_factory=lambda: [128, 128, 128])
    val_overlap: float = 0.25
    tensorboard: bool = True
    max_minutes: Optional[float] = None
    snapshot_minutes: float = 0.0
    snapshot_every: int = 0


def anchor_window_voxels(sigma_mm: float, spacing_mm: float) -> int:
    """Taps of the 1D Gaussian of ``model.law.anchor_sigma_mm`` on a grid of ``spacing_mm`` (mm): ``2 ceil(3 sigma)
    + 1`` with sigma in voxels (truncated at 3 sigma). The anchor's 'valid' filter shortens each patch axis by this
    minus one, so the patch must be longer than it (checked by :meth:`RunConfig.validate`)."""
    return 2 * math.ceil(3.0 * sigma_mm / spacing_mm) + 1


def _validate_law(m: "ModelConfig") -> None:
    """``model.law`` against the generators' curve and its own ranges (issue 13)."""
    knots = (m.generator.extra or {}).get("law_knots", 0)
    if knots != m.law.knots:
        raise ValueError(f"model.law.enabled needs generators with an intensity curve of model.law.knots "
                         f"= {m.law.knots} knots: set model.generator.extra.law_knots={m.law.knots} "
                         f"(it is {knots}).")
    if m.law.knots < 2 or m.law.restarts < 1 or min(m.law.iterations, m.law.screen_iterations) < 0 \
            or m.law.finalists < 1 or m.law.spacing_mm <= 0 or m.law.samples < 10:
        raise ValueError("model.law needs knots >= 2, restarts >= 1, finalists >= 1, iterations and "
                         "screen_iterations >= 0, spacing_mm > 0 and samples >= 10.")
    if (m.law.lr_scale < 0 or m.law.smoothness < 0 or m.law.anchor < 0 or (m.law.noise or 0.0) < 0
            or (m.law.anchor_f or 0.0) < 0 or m.law.anchor_sigma_mm < 0):
        raise ValueError(f"model.law.lr_scale, smoothness, anchor, anchor_f, anchor_sigma_mm and noise must be >= 0, "
                         f"got {m.law.lr_scale}, {m.law.smoothness}, {m.law.anchor}, {m.law.anchor_f}, "
                         f"{m.law.anchor_sigma_mm} and {m.law.noise}.")
    if m.law.f_start not in ("fit", "inverse"):
        raise ValueError(f"model.law.f_start must be 'fit' (an unpaired MR -> CT fit) or 'inverse' (the inverse of "
                         f"G's law), got {m.law.f_start!r}.")
    if m.law.file and not Path(m.law.file).is_file():
        raise ValueError(f"model.law.file {m.law.file} does not exist: give the intensity_law.json of an "
                         "earlier run, or leave it unset to fit the laws.")


@dataclass
class RunConfig:
    """A whole experiment: ``name``, the preset it started from, and the three sections."""

    name: str = "ct2mr-m1"
    preset: str = "m1"
    description: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    # ---- derived values -------------------------------------------------------------------------------------
    @property
    def patch_size(self) -> tuple[int, int, int]:
        """(D, H, W) voxels."""
        return tuple(int(v) for v in self.data.patch_size)  # type: ignore[return-value]

    @property
    def decay_start(self) -> int:
        """Step after which the learning rate decays linearly (``train.decay_start`` or half the steps)."""
        start = self.train.decay_start
        return int(self.train.steps // 2 if start is None else start)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every setting."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    # ---- validation -----------------------------------------------------------------------------------------
    def validate(self) -> "RunConfig":
        """Check every value; return ``self``.

        Raises:
            ValueError: a value outside its range or allowed set; the message names the key and what is allowed.
        """
        self._validate_choices()
        self._validate_model()
        if self.model.law.enabled:
            _validate_law(self.model)
        self._validate_data()
        self._validate_training()
        return self

    def _validate_choices(self) -> None:
        """Names from their allowed sets (networks, heads, optimiser, ...), this install's extensions included."""
        m, d, t = self.model, self.data, self.train
        _choice("model.generator.name", m.generator.name, _extend(GENERATOR_NAMES, "networks", "GENERATORS"))
        _choice("model.generator.norm", m.generator.norm, _extend(NORM_NAMES, "networks", "NORMS"))
        _choice("model.discriminator.name", m.discriminator.name,
                _extend(DISCRIMINATOR_NAMES, "networks", "DISCRIMINATORS"))
        _choice("model.discriminator.norm", m.discriminator.norm, _extend(NORM_NAMES, "networks", "NORMS"))
        heads = _extend(ADVERSARIAL_HEADS, "losses", "ADVERSARIAL_HEADS")
        _choice("model.adversarial", m.adversarial, heads)
        _choice("model.paired.adversarial", m.paired.adversarial, heads)
        _choice("model.hist_distance", m.hist_distance, HIST_DISTANCES)
        _choice("data.balance", d.balance, BALANCE_MODES)
        _choice("train.optimizer", t.optimizer, OPTIMIZERS)
        _choice("train.precision", t.precision, PRECISIONS)
        _choice("train.decay", t.decay, DECAY_MODES)

    def _validate_model(self) -> None:
        """Network sizes, loss weights, MIND/PatchNCE/histogram settings, Rician and paired terms."""
        m, d = self.model, self.data
        if m.generator.base_channels < 1 or m.discriminator.base_channels < 1:
            raise ValueError("model.generator.base_channels and model.discriminator.base_channels must be >= 1.")
        if m.generator.n_blocks < 0 or m.generator.depth < 1 or m.discriminator.n_layers < 1:
            raise ValueError("model.generator.n_blocks must be >= 0, model.generator.depth and "
                             "model.discriminator.n_layers >= 1.")
        for key in ("gp_weight", "lambda_cyc", "lambda_id", "alpha", "beta", "lambda_hist", "lambda_mi",
                    "lambda_mind", "lambda_nce"):
            if getattr(m, key) < 0:
                raise ValueError(f"model.{key} must be >= 0, got {getattr(m, key)}.")
        if m.mind_dilation < 1 or m.nce_patches < 2 or m.nce_channels < 1 or m.nce_temperature <= 0:
            raise ValueError(f"model.mind_dilation must be >= 1, model.nce_patches >= 2, model.nce_channels >= 1 and "
                             f"model.nce_temperature > 0, got {m.mind_dilation}, {m.nce_patches}, {m.nce_channels}, "
                             f"{m.nce_temperature}.")
        if m.hist_bins < 2:
            raise ValueError(f"model.hist_bins must be >= 2, got {m.hist_bins}.")
        if m.beta != 0 and not 0.3 <= m.beta <= 0.7:
            raise ValueError(f"model.beta (dual contrast) must be 0 (off) or in [0.3, 0.7] (thesis section 6.2.1, "
                             f"following DC-CycleGAN), got {m.beta}.")
        r = m.rician
        if len(r.sigma_range) != 2 or not 0 <= r.sigma_range[0] <= r.sigma_range[1]:
            raise ValueError(f"model.rician.sigma_range must be [low, high] with 0 <= low <= high, got "
                             f"{list(r.sigma_range)}.")
        if not 0 <= r.tau <= 1 or r.sigma <= 0:
            raise ValueError(f"model.rician.tau must be in [0, 1] and model.rician.sigma > 0, got tau={r.tau}, "
                             f"sigma={r.sigma}.")
        if m.paired.gamma < 0 or m.paired.lambda_adv < 0:
            raise ValueError("model.paired.gamma and model.paired.lambda_adv must be >= 0.")
        if m.paired.enabled and (not d.paired_ct or len(d.paired_ct) != len(d.paired_mr)):
            raise ValueError("model.paired.enabled needs data.paired_ct and data.paired_mr, the same number of "
                             f"registered volumes in the same order (got {len(d.paired_ct)} CT, {len(d.paired_mr)} "
                             "MR); pass --paired-ct and --paired-mr, or disable it with model.paired.enabled=false.")

    def _validate_data(self) -> None:
        """Patch size against the networks' down-sampling, batch, split fractions, sampling; the preprocessing."""
        m, d = self.model, self.data
        patch = list(d.patch_size)
        if len(patch) == 1:
            d.patch_size = patch = patch * 3
        multiple = math.lcm(m.generator.multiple, 4)
        smallest = max(16, 2 ** (m.discriminator.n_layers + 2))
        if len(patch) != 3 or any(int(v) < smallest or int(v) % multiple for v in patch):
            raise ValueError(f"data.patch_size must be 1 or 3 multiples of {multiple} (the {m.generator.name} "
                             f"generator's downsampling), each at least {smallest} voxels (a PatchGAN with "
                             f"{m.discriminator.n_layers} stride-2 layers), got {patch}.")
        if d.batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {d.batch_size}.")
        for key in ("val_fraction", "test_fraction", "foreground", "foreground_bias"):
            if not 0 <= getattr(d, key) <= 1:
                raise ValueError(f"data.{key} must be in [0, 1], got {getattr(d, key)}.")
        if d.val_fraction + d.test_fraction >= 1:
            raise ValueError("data.val_fraction + data.test_fraction must leave sources for training (< 1).")
        if d.foreground_tries < 1 or d.prefetch < 0:
            raise ValueError("data.foreground_tries must be >= 1 and data.prefetch >= 0.")
        spacing = PreprocessingConfig.from_dict(d.preprocessing).target_spacing
        if m.law.enabled and m.law.anchor_sigma_mm > 0:  # the anchor's 'valid' Gaussian must fit in the patch
            width, shortest = anchor_window_voxels(m.law.anchor_sigma_mm, spacing), min(int(v) for v in patch)
            if shortest <= width:
                raise ValueError(f"model.law.anchor_sigma_mm={m.law.anchor_sigma_mm} needs a low-pass window of "
                                 f"{width} voxels ({spacing} mm each), which does not fit in data.patch_size "
                                 f"{patch}: use a patch larger than {width} voxels or a sigma of at most "
                                 f"{(shortest - 3) / 6 * spacing:.2f} mm.")

    def _validate_training(self) -> None:
        """Steps, rates, schedule, pool, freezing, logging, validation crop, budgets and device."""
        t = self.train
        if t.steps < 1:
            raise ValueError(f"train.steps must be >= 1, got {t.steps}.")
        if t.lr_g <= 0 or t.lr_d <= 0:
            raise ValueError(f"train.lr_g and train.lr_d must be > 0, got {t.lr_g}, {t.lr_d}.")
        if len(t.betas) != 2 or not all(0 <= b < 1 for b in t.betas):
            raise ValueError(f"train.betas must be two values in [0, 1), got {list(t.betas)}.")
        if not 0 <= self.decay_start <= t.steps:
            raise ValueError(f"train.decay_start must be in [0, train.steps={t.steps}], got {t.decay_start}.")
        if t.pool_size < 0 or t.freeze_d_every < 0 or t.freeze_d_steps < 0:
            raise ValueError("train.pool_size, train.freeze_d_every and train.freeze_d_steps must be >= 0.")
        if t.freeze_d_steps and t.freeze_d_steps >= max(1, t.freeze_d_every):
            raise ValueError(f"train.freeze_d_steps ({t.freeze_d_steps}) must be smaller than train.freeze_d_every "
                             f"({t.freeze_d_every}): D has to be updated in some steps of each period.")
        for key in ("log_every", "checkpoint_every", "val_volumes"):
            if getattr(t, key) < 1:
                raise ValueError(f"train.{key} must be >= 1, got {getattr(t, key)}.")
        if t.val_every < 0 or t.threads < 0:
            raise ValueError("train.val_every and train.threads must be >= 0.")
        if t.val_crop is not None:
            crop = list(t.val_crop) * (3 if len(t.val_crop) == 1 else 1)
            if len(crop) != 3 or any(int(v) < 16 for v in crop):
                raise ValueError(f"train.val_crop must be null or 1 or 3 sizes >= 16, got {list(t.val_crop)}.")
            t.val_crop = crop
        if t.max_minutes is not None and not t.max_minutes > 0:
            raise ValueError(f"train.max_minutes must be > 0 minutes or null, got {t.max_minutes}.")
        if t.snapshot_minutes < 0 or t.snapshot_every < 0:
            raise ValueError(f"train.snapshot_minutes and train.snapshot_every must be >= 0, got "
                             f"{t.snapshot_minutes}, {t.snapshot_every}.")
        if not 0 <= t.val_overlap < 1:
            raise ValueError(f"train.val_overlap must be in [0, 1), got {t.val_overlap}.")
        if t.device != "auto" and t.device != "cpu" and not t.device.startswith("cuda"):
            raise ValueError(f"train.device must be auto, cpu, cuda or cuda:N, got {t.device!r}.")


# ---- presets and loading ------------------------------------------------------------------------------------
def list_presets() -> list[str]:
    """Names of the bundled presets (``ct2mr/configs/*.yaml``)."""
    folder = resources.files(CONFIG_PACKAGE)
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def preset_path(name: str | os.PathLike) -> Path:
    """Path of a preset: a bundled name (``m1``) or a YAML file.

    Raises:
        ValueError: neither a bundled preset nor an existing file.
    """
    text = str(name)
    if text.endswith((".yaml", ".yml")) or os.sep in text:
        path = Path(text)
        if not path.is_file():
            raise ValueError(f"Config file {path} does not exist.")
        return path
    candidate = resources.files(CONFIG_PACKAGE) / f"{text.lower()}.yaml"
    if not candidate.is_file():
        raise ValueError(f"Unknown preset {text!r}; choose one of {', '.join(list_presets())} or pass a YAML file.")
    return Path(str(candidate))


def _read_preset(name: str | os.PathLike, seen: tuple[str, ...] = ()) -> list[Any]:
    """The chain of YAML documents of a preset, base first (``extends`` resolved)."""
    from omegaconf import OmegaConf

    path = preset_path(name)
    key = str(path.resolve())
    if key in seen:
        raise ValueError(f"Preset {path} extends itself (cycle: {' -> '.join(seen + (key,))}).")
    doc = OmegaConf.load(path)
    parent = doc.pop("extends", None) if hasattr(doc, "pop") else None
    chain = _read_preset(parent, seen + (key,)) if parent else []
    return chain + [doc]


def _error(exc: Exception, source: str) -> ValueError:
    message = str(exc).split("\n")[0]
    full_key = getattr(exc, "full_key", None)
    where = f" (key {full_key})" if full_key else ""
    return ValueError(f"Bad configuration in {source}{where}: {message}")


def load_config(preset: str | os.PathLike | None = "m1", overrides: Sequence[str] = (),
                base: str | os.PathLike | None = None) -> RunConfig:
    """Resolve a run configuration.

    Args:
        preset: a bundled preset name or a YAML file (ignored when ``base`` is given).
        overrides: dotlist overrides ``key=value`` (``model.alpha=0.84``, ``data.patch_size=[48,48,48]``), applied
            in order.
        base: a resolved ``config.yaml`` of an earlier run (``--resume``); replaces the preset.

    Returns:
        The validated :class:`RunConfig`.

    Raises:
        ValueError: unknown preset or key, a value of the wrong type, or an invalid value.
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    schema = OmegaConf.structured(RunConfig)
    try:
        if base is not None:
            cfg = OmegaConf.merge(schema, OmegaConf.load(base))
        else:
            cfg = schema
            for doc in _read_preset(preset or "m1"):
                cfg = OmegaConf.merge(cfg, doc)
            if preset is not None and not str(preset).endswith((".yaml", ".yml")):
                cfg.preset = str(preset).lower()
    except OmegaConfBaseException as exc:
        raise _error(exc, f"preset {preset}" if base is None else str(base)) from exc
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"Override {item!r} is not KEY=VALUE (e.g. model.alpha=0.84 or train.steps=100).")
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as exc:
            raise _error(exc, f"override {item!r}") from exc
    try:
        config: RunConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    except OmegaConfBaseException as exc:
        raise _error(exc, "the merged configuration") from exc
    return config.validate()


def shorthand_overrides(**flags: Any) -> list[str]:
    """Dotlist overrides for the short ``ct2mr train`` flags; ``None`` values are left out.

    Args:
        flags: any of ``name, steps, patch_size, batch_size, width, blocks, lr, lr_g, lr_d, lambda_cyc, lambda_id,
            seed, device, threads, checkpoint_every, log_every, val_every, precision, ct, mr, val_ct, val_mr,
            paired_ct, paired_mr, split_file, max_minutes``.

    Returns:
        ``["train.steps=100", "model.generator.base_channels=8", ...]``.

    Raises:
        ValueError: an unknown flag.
    """
    targets = {
        "name": ["name"], "steps": ["train.steps"], "batch_size": ["data.batch_size"],
        "width": ["model.generator.base_channels", "model.discriminator.base_channels"],
        "blocks": ["model.generator.n_blocks"], "lr": ["train.lr_g", "train.lr_d"], "lr_g": ["train.lr_g"],
        "lr_d": ["train.lr_d"], "lambda_cyc": ["model.lambda_cyc"], "lambda_id": ["model.lambda_id"],
        "seed": ["train.seed"], "device": ["train.device"], "threads": ["train.threads"],
        "checkpoint_every": ["train.checkpoint_every"], "log_every": ["train.log_every"],
        "val_every": ["train.val_every"], "precision": ["train.precision"], "ct": ["data.ct"], "mr": ["data.mr"],
        "val_ct": ["data.val_ct"], "val_mr": ["data.val_mr"], "paired_ct": ["data.paired_ct"],
        "paired_mr": ["data.paired_mr"], "split_file": ["data.split_file"], "patch_size": ["data.patch_size"],
        "max_minutes": ["train.max_minutes"],
    }
    out: list[str] = []
    for flag, value in flags.items():
        if flag not in targets:
            raise ValueError(f"Unknown shorthand {flag!r}; known: {', '.join(sorted(targets))}.")
        if value is None:
            continue
        if flag == "patch_size":
            values = [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
            value = values * 3 if len(values) == 1 else values
        if isinstance(value, (list, tuple)):
            text = json.dumps([str(v) if isinstance(v, (str, os.PathLike)) else v for v in value])
        elif isinstance(value, str):
            text = json.dumps(value)
        else:
            text = str(value)
        out += [f"{key}={text}" for key in targets[flag]]
    if flags.get("paired_ct") or flags.get("paired_mr"):
        out.append("model.paired.enabled=true")
    return out


_OVERRIDE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+=")


def split_overrides(items: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separate ``section.key=value`` overrides from paths in a list of command-line values.

    ``ct2mr train --ct a.nii.gz model.alpha=0.8`` hands the override to ``--ct`` (argparse cannot tell); an item that
    looks like a dotted override and is not an existing file is returned as an override instead.

    Returns:
        ``(paths, overrides)``, each in the original order.
    """
    paths, overrides = [], []
    for item in items:
        (overrides if _OVERRIDE.match(str(item)) and not os.path.exists(item) else paths).append(item)
    return paths, overrides


def split_path_overrides(values: Dict[str, Optional[Sequence[str]]]
                         ) -> tuple[dict[str, Optional[list[str]]], list[str]]:
    """:func:`split_overrides` over several path options at once (``ct2mr train --ct``, ``--mr``, ``--val-ct`` ...).

    Args:
        values: option name -> its values as parsed (``None`` or empty: the option was not given).

    Returns:
        ``(paths, overrides)``: every option with the paths it keeps (``None`` when only overrides were there; a
        value that was not given is returned as it is), and the overrides taken out, in command-line order.
    """
    paths: dict[str, Optional[list[str]]] = {}
    overrides: list[str] = []
    for name, items in values.items():
        if items:
            kept, found = split_overrides(items)
            items = kept or None
            overrides += found
        paths[name] = items
    return paths, overrides


def to_yaml(config: RunConfig) -> str:
    """The resolved configuration as YAML (what ``RUN_DIR/config.yaml`` holds)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(config))
