"""The CycleGAN trainer (thesis sections 6.3 and 7.1; model M1: ResNet-9b + LSGAN + L1 cycle + identity).

One step on an unpaired batch (x CT patches, y MR patches, (B, 1, D, H, W) in [-1, 1]):

* generators: ``L_G = L_adv(D_MR(G(x))) + L_adv(D_CT(F(y))) + lambda_cyc * L_cyc + lambda_id * L_id`` (eq. 6.3 with
  the thesis defaults lambda_cyc = 10, lambda_id = 0.2), Adam(lr 2e-4, betas (0.5, 0.999));
* discriminators: LSGAN on real vs detached fake, same optimiser settings.

The run folder receives ``config.json`` (the resolved configuration), ``log.jsonl`` (every logged step's losses),
``last.safetensors`` (every ``checkpoint_every`` steps, written atomically) and ``model.safetensors`` at the end.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from . import __version__
from .checkpoint import save_checkpoint
from .data import UnpairedPatchSampler, load_domain
from .inference import resolve_device
from .losses import AdversarialLoss, cycle_loss, identity_loss
from .networks import build_discriminator, build_generator
from .preprocessing import PreprocessingConfig

__all__ = ["TrainConfig", "train", "seed_everything"]

logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Configuration of a CycleGAN run (thesis Table 4 / section 7.1 defaults where it states them).

    Attributes:
        name: run name stored in the checkpoint.
        steps: optimisation steps.
        patch_size: training patch (D, H, W) voxels at 1 mm; multiples of 4.
        batch_size: patches per domain per step.
        lr: Adam learning rate for G/F and D (2e-4).
        betas: Adam betas ((0.5, 0.999)).
        lambda_cyc: cycle weight (10).
        lambda_id: identity weight (0.2, thesis Table 4).
        adversarial: adversarial head (``"lsgan"``).
        generator: generator spec (:func:`ct2mr.networks.build_generator`).
        discriminator: discriminator spec (:func:`ct2mr.networks.build_discriminator`).
        preprocessing: preprocessing parameters (a dict of :class:`PreprocessingConfig`).
        foreground: minimum foreground fraction of sampled patches.
        seed: seed of torch, NumPy, Python and the patch sampler.
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        log_every: steps between log lines.
        checkpoint_every: steps between ``last.safetensors`` checkpoints.
        threads: CPU threads for torch (0 leaves torch's default).
    """

    name: str = "ct2mr-m1"
    steps: int = 1000
    patch_size: Sequence[int] = (64, 64, 64)
    batch_size: int = 1
    lr: float = 2e-4
    betas: Sequence[float] = (0.5, 0.999)
    lambda_cyc: float = 10.0
    lambda_id: float = 0.2
    adversarial: str = "lsgan"
    generator: dict[str, Any] = field(default_factory=lambda: {"name": "resnet", "base_channels": 64,
                                                               "n_blocks": 9, "norm": "instance"})
    discriminator: dict[str, Any] = field(default_factory=lambda: {"name": "patchgan", "base_channels": 64,
                                                                   "n_layers": 3, "norm": "instance"})
    preprocessing: dict[str, Any] = field(default_factory=lambda: PreprocessingConfig().to_dict())
    foreground: float = 0.2
    seed: int = 0
    device: str = "auto"
    log_every: int = 10
    checkpoint_every: int = 100
    threads: int = 0

    def __post_init__(self) -> None:
        patch = [int(v) for v in (self.patch_size if isinstance(self.patch_size, Sequence) else [self.patch_size])]
        patch = patch * 3 if len(patch) == 1 else patch
        if len(patch) != 3 or any(v < 16 or v % 4 for v in patch):
            raise ValueError(f"patch_size must be 1 or 3 multiples of 4, at least 16, got {self.patch_size}.")
        self.patch_size = tuple(patch)
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch_size must be >= 1.")
        self.betas = tuple(float(b) for b in self.betas)
        smallest = 2 ** (int(self.discriminator.get("n_layers", 3)) + 2)
        if min(patch) < smallest:
            raise ValueError(f"patch_size {patch} is too small for a PatchGAN with {self.discriminator.get('n_layers', 3)} "
                             f"stride-2 layers: use at least {smallest} voxels per side.")
        PreprocessingConfig.from_dict(self.preprocessing)  # validates

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every setting."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _versions() -> dict[str, str]:
    import monai
    import SimpleITK

    return {"ct2mr": __version__, "torch": torch.__version__, "monai": monai.__version__,
            "SimpleITK": SimpleITK.Version_VersionString(), "numpy": np.__version__,
            "python": platform.python_version()}


def train(ct: Sequence[str | Path], mr: Sequence[str | Path], out_dir: str | Path, config: TrainConfig | None = None,
          progress: Callable[[int, int, dict[str, float]], None] | None = None, command: str = "") -> Path:
    """Train a CycleGAN (G: CT -> MR, F: MR -> CT) on unpaired CT and MR volumes.

    Args:
        ct: CT files or folders (any format :func:`ct2mr.io.read_image` reads).
        mr: MR files or folders; 4D series are split into 3D volumes.
        out_dir: run folder (created; an existing ``model.safetensors`` in it is replaced only at the end).
        config: the run's configuration.
        progress: ``callback(step, steps, losses)`` after every step.
        command: the command line, recorded in the checkpoint.

    Returns:
        Path of the final checkpoint ``out_dir/model.safetensors``.

    Raises:
        FileNotFoundError, ct2mr.io.ImageReadError, ValueError: unusable inputs or configuration.
    """
    config = config or TrainConfig()
    out_dir = Path(out_dir)
    prep = PreprocessingConfig.from_dict(config.preprocessing)
    ct_volumes = load_domain(ct, "ct", prep)
    mr_volumes = load_domain(mr, "mr", prep)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps({"config": config.to_dict(), "command": command,
                                                      "ct": [v.name for v in ct_volumes],
                                                      "mr": [v.name for v in mr_volumes]}, indent=2))
    if config.threads:
        torch.set_num_threads(config.threads)
    seed_everything(config.seed)
    device = resolve_device(config.device)
    G, F = build_generator(config.generator).to(device), build_generator(config.generator).to(device)
    D_MR, D_CT = build_discriminator(config.discriminator).to(device), build_discriminator(config.discriminator).to(device)
    opt_g = torch.optim.Adam(list(G.parameters()) + list(F.parameters()), lr=config.lr, betas=config.betas)
    opt_d = torch.optim.Adam(list(D_MR.parameters()) + list(D_CT.parameters()), lr=config.lr, betas=config.betas)
    adv = AdversarialLoss(config.adversarial)
    sampler = UnpairedPatchSampler(ct_volumes, mr_volumes, config.patch_size, config.batch_size, config.seed,
                                   config.foreground)
    architecture = {"generator": config.generator, "discriminator": config.discriminator}
    inference = {"roi_size": [max(96, p) for p in config.patch_size], "overlap": 0.25}

    def summary(step: int, last: dict[str, float]) -> dict[str, Any]:
        return {"name": config.name, "steps": step, "config": config.to_dict(), "command": command,
                "ct_volumes": [v.name for v in ct_volumes], "mr_volumes": [v.name for v in mr_volumes],
                "last_losses": last, "software": _versions(), "device": str(device)}

    log_path = out_dir / "log.jsonl"
    log = open(log_path, "a", encoding="utf-8")
    losses: dict[str, float] = {}
    start = time.perf_counter()
    try:
        for step in range(1, config.steps + 1):
            x, y = (t.to(device) for t in sampler.sample())
            # generators
            for p in list(D_MR.parameters()) + list(D_CT.parameters()):
                p.requires_grad_(False)
            fake_mr, fake_ct = G(x), F(y)
            rec_ct, rec_mr = F(fake_mr), G(fake_ct)
            l_adv = adv.generator(D_MR(fake_mr)) + adv.generator(D_CT(fake_ct))
            l_cyc = cycle_loss(x, rec_ct, y, rec_mr)
            l_id = identity_loss(x, F(x), y, G(y)) if config.lambda_id > 0 else torch.zeros((), device=device)
            l_g = l_adv + config.lambda_cyc * l_cyc + config.lambda_id * l_id
            opt_g.zero_grad(set_to_none=True)
            l_g.backward()
            opt_g.step()
            # discriminators
            for p in list(D_MR.parameters()) + list(D_CT.parameters()):
                p.requires_grad_(True)
            l_d_mr = adv.discriminator(D_MR(y), D_MR(fake_mr.detach()))
            l_d_ct = adv.discriminator(D_CT(x), D_CT(fake_ct.detach()))
            opt_d.zero_grad(set_to_none=True)
            (l_d_mr + l_d_ct).backward()
            opt_d.step()
            losses = {key: value.item() for key, value in (("G_adv", l_adv), ("cycle", l_cyc), ("identity", l_id),
                                                            ("G_total", l_g), ("D_MR", l_d_mr), ("D_CT", l_d_ct))}
            if not all(np.isfinite(v) for v in losses.values()):
                raise FloatingPointError(f"Non-finite loss at step {step}: {losses}. Lower the learning rate.")
            if step % config.log_every == 0 or step == config.steps:
                log.write(json.dumps({"step": step, "seconds": round(time.perf_counter() - start, 3), **losses}) + "\n")
                log.flush()
            if step % config.checkpoint_every == 0 and step < config.steps:
                save_checkpoint(out_dir / "last.safetensors", {"G": G, "F": F, "D_MR": D_MR, "D_CT": D_CT},
                                architecture, prep, inference, summary(step, losses))
            if progress:
                progress(step, config.steps, losses)
    finally:
        log.close()
    final = save_checkpoint(out_dir / "model.safetensors", {"G": G, "F": F}, architecture, prep, inference,
                            summary(config.steps, losses))
    save_checkpoint(out_dir / "last.safetensors", {"G": G, "F": F, "D_MR": D_MR, "D_CT": D_CT}, architecture, prep,
                    inference, summary(config.steps, losses))
    logger.info("Trained %d steps in %.1f s", config.steps, time.perf_counter() - start)
    return final
