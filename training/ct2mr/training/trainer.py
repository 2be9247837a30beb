"""The CycleGAN-family trainer (thesis sections 6.3, 7.1, 7.7 and 8; Jin et al. 2019 for paired data).

One step on an unpaired batch (x CT patches, y MR patches, (B, 1, D, H, W) in [-1, 1]; optional registered pairs
(x_p, y_p)):

* generators G (CT -> MR) and F (MR -> CT), one optimiser (thesis eqs. 6.3 and 7.3)::

      L_G = L_adv(D_MR(R(G(x)))) + L_adv(D_CT(F(y)))                          adversarial heads (6.4, 6.5, hinge, bce)
          + lambda_cyc [leg(x, F(G(x))) + leg_MR(y, G(F(y)))]                  cycle, Mix(L1, SSIM-3D) with alpha (6.6)
          + lambda_id [|F(x) - x| + id_MR(G(y), y)]                            identity (6.7)
          + lambda_hist W1(h(G(x)), h(y)) [+ W1(h(F(y)), h(x))]                Hist-CycleGAN (7.2)
          + lambda_mi (-I(x; G(x)))                                           mutual information (7.3)
          + gamma (|G(x_p) - y_p| + |F(y_p) - x_p|) + lambda_pair L_adv(pairs)  paired terms (Jin et al. eq. 5)

  where ``R`` is the optional Rician corruption (eq. 8.1) and the MR legs optionally mix the Rician NLL
  (eqs. 8.4-8.5);
* discriminators D_MR and D_CT (and the pair discriminators), one optimiser: the head's loss on real vs fakes drawn
  from an image pool of past generator outputs (CycleGAN, size 50), plus ``beta`` times the dual-contrast term
  (source-domain patches labelled fake, DC-CycleGAN) and the WGAN-GP gradient penalty; skipped during the
  "freeze D" steps (thesis section 7.5).

Mechanics: separate G/D learning rates (TTUR), linear decay to 0 after ``decay_start``, Adam/RMSprop/SGD, mixed
precision (bf16, or fp16 with a gradient scaler), ``channels_last_3d`` on CUDA, optional gradient checkpointing of
generator blocks, deterministic seeding, DistributedDataParallel under ``torchrun`` (gloo on CPU, NCCL on CUDA),
exact resume, validation with cycle SSIM/PSNR/MAE and histogram W1, TensorBoard scalars and tri-planar panels.

The run folder (rank 0 writes it):

* ``config.yaml`` (the resolved configuration; ``--resume`` reads it), ``config.json`` (the same, with the command
  and the volumes), ``split.json`` (train/val/test inputs);
* ``log.jsonl``: one line per logged step (every loss term, learning rates, throughput) and per validation;
* ``tb/``: TensorBoard events;
* ``checkpoints/step_NNNNNNNN/``: the training state (``trainer.pt``: networks, optimisers, schedulers, scaler,
  step; ``rank<r>.pt``: patch-stream, image-pool and RNG states of each process), written every
  ``checkpoint_every`` steps, and ``state.json`` pointing at the latest complete one (replaced atomically after all
  files are written, so a run killed at any moment resumes from a whole checkpoint);
* ``last.safetensors`` (G, F and the discriminators, every checkpoint) and ``model.safetensors`` (G and F, at the
  end): checkpoints ``ct2mr translate`` loads.

Resuming from the same configuration reproduces an uninterrupted run exactly on the same hardware and thread
count (the patch streams, image pools, noise generators, optimisers, schedulers, scaler and RNGs are restored).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import shlex
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ct2mr.models.checkpoint import CheckpointError, load_training_state, save_checkpoint, save_training_state
from ct2mr.training.config import RunConfig, anchor_window_voxels, load_config, to_yaml
from ct2mr.preprocessing.collections import DomainVolume, load_domain
from ct2mr.training.data import (PairedPatchSampler, PatchPrefetcher, TrainingBatches, UnpairedPatchSampler, make_split,
                                 pair_volumes, read_split, write_split)
from ct2mr.inference.translate import (InferenceSettings, cluster_device, resolve_device, resolve_precision,
                                       sliding_window)
from ct2mr.io.images import verify_file, write_json, write_text
from ct2mr.networks import build_discriminator, build_generator
from ct2mr.networks.resnet import IntensityCurve
from ct2mr.provenance import software_versions
from ct2mr.inference.ood import training_ct_statistics
from ct2mr.preprocessing.pipeline import PreprocessingConfig

__all__ = [
    "RunConfig",
    "portable_config",
    "DistContext",
    "ImagePool",
    "CycleGANTrainer",
    "train",
    "train_run",
    "resume_config",
    "seed_everything",
    "lr_factor",
    "d_frozen",
    "enable_gradient_checkpointing",
    "triplanar_panel",
    "validate",
    "init_distributed",
    "command_line",
    "STATE_POINTER",
]

logger = logging.getLogger(__name__)

#: The file in a run folder that points at the latest complete training state.
STATE_POINTER = "state.json"
#: Normalised background level of the preprocessed volumes; voxels above it + 0.05 are foreground.
_FOREGROUND = -1.0 + 0.05

# ---- small pure helpers -------------------------------------------------------------------------------------
def lr_factor(done: int, steps: int, decay: str = "linear", decay_start: int | None = None) -> float:
    """Learning-rate multiplier after ``done`` completed steps (CycleGAN's and Jin et al.'s linear decay).

    Constant 1 up to ``decay_start`` completed steps, then linear to 0 at ``steps``:
    ``f(k) = 1`` for ``k <= start``, ``(steps - k) / (steps - start)`` afterwards. Step ``t`` (1-based) uses
    ``f(t - 1)``, so the last step still has a positive rate and the rate after the run is 0.

    Args:
        done: optimisation steps already taken, >= 0.
        steps: total steps.
        decay: ``"linear"`` or ``"none"``.
        decay_start: completed steps before the decay; ``None``: ``steps // 2``.

    Returns:
        The factor in [0, 1].
    """
    if decay == "none":
        return 1.0
    start = steps // 2 if decay_start is None else int(decay_start)
    if done <= start or steps <= start:
        return 1.0
    return max(0.0, (steps - done) / (steps - start))


def d_frozen(step: int, every: int, frozen: int) -> bool:
    """Whether D's update is skipped at 1-based ``step`` ("freeze D for a few steps", thesis section 7.5).

    In each period of ``every`` steps the last ``frozen`` skip the discriminator update (D keeps learning first);
    ``every == 0`` or ``frozen == 0`` never freezes.
    """
    if every <= 0 or frozen <= 0:
        return False
    return (step - 1) % every >= every - frozen


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---- distributed --------------------------------------------------------------------------------------------
@dataclass
class DistContext:
    """Where this process stands in a ``torchrun`` job (rank 0 of 1 without one).

    Attributes:
        rank: global rank.
        world_size: number of processes.
        local_rank: rank on this node (the CUDA device index).
        backend: ``"nccl"``, ``"gloo"`` or ``None`` (single process).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        """True inside a multi-process job."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on rank 0, the process that writes logs and checkpoints."""
        return self.rank == 0

    def slots(self, batch_size: int) -> list[int]:
        """Global batch slots of this process: ``rank * b .. rank * b + b - 1``."""
        return list(range(self.rank * batch_size, (self.rank + 1) * batch_size))

    def barrier(self) -> None:
        """Wait for every process (no-op without a job)."""
        if self.enabled:
            torch.distributed.barrier()

    def all_true(self, flag: bool) -> bool:
        """``flag`` on every process (rank 0's clock decides for all, so that all stop at the same step)."""
        if not self.enabled:
            return bool(flag)
        device = f"cuda:{self.local_rank}" if self.backend == "nccl" else "cpu"
        value = torch.tensor([1.0 if flag else 0.0], device=device)
        torch.distributed.broadcast(value, 0)
        return bool(value.item())

    def mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """Average a tensor over processes (a copy; the input is unchanged)."""
        if not self.enabled:
            return tensor
        out = tensor.detach().clone()
        torch.distributed.all_reduce(out)
        return out / self.world_size


def init_distributed(device_name: str = "auto") -> tuple[DistContext, torch.device]:
    """Join the ``torchrun`` job described by the environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``), if any.

    Args:
        device_name: the configured device; under a job ``auto``/``cuda`` become ``cuda:LOCAL_RANK``.

    Returns:
        ``(context, device)``. NCCL on CUDA, gloo on CPU.

    Raises:
        ValueError: a bad device name.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext(), resolve_device(device_name)
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name != "cpu" and torch.cuda.is_available()
    if use_cuda:
        device = torch.device(cluster_device(device_name))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    backend = "nccl" if use_cuda else "gloo"
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend=backend)
    return DistContext(rank, world, local, backend), device


# ---- image pool ---------------------------------------------------------------------------------------------
class ImagePool:
    """History of generated volumes shown to the discriminator (Shrivastava et al. 2017; CycleGAN's pool of 50).

    For each generated volume of a batch: while the pool fills up it is stored and returned; afterwards, with
    probability 1/2 a random stored volume is returned and replaced by the new one, otherwise the new one is
    returned. The pool is sharded by global batch slot (see :mod:`ct2mr.training.data`), each shard with its own generator
    and ``ceil(size / global_batch)`` places, so that a run on N processes sees what one process with the same
    global batch sees; with batch 1 it is exactly CycleGAN's pool.

    Args:
        size: total capacity (0 disables: volumes pass through).
        slots: the global slots this process handles (one per batch item).
        global_batch: slots over all processes.
        seed: run seed.
        stream: distinguishes the pools of D_MR and D_CT.
    """

    def __init__(self, size: int, slots: Sequence[int], global_batch: int, seed: int = 0, stream: int = 0) -> None:
        self.size = int(size)
        self.slots = [int(s) for s in slots]
        self.capacity = math.ceil(self.size / max(1, global_batch)) if self.size > 0 else 0
        self.rngs = {s: np.random.default_rng(np.random.SeedSequence([int(seed), s, 100 + int(stream)]))
                     for s in self.slots}
        self.images: dict[int, list[torch.Tensor]] = {s: [] for s in self.slots}

    def query(self, images: torch.Tensor) -> torch.Tensor:
        """Return the batch D trains on; ``images`` (B, C, D, H, W), B = number of slots, is stored (detached).

        Raises:
            ValueError: the batch size differs from the number of slots.
        """
        if self.capacity == 0:
            return images.detach()
        if images.shape[0] != len(self.slots):
            raise ValueError(f"ImagePool expected {len(self.slots)} volumes (one per slot), got {images.shape[0]}.")
        out = []
        for i, slot in enumerate(self.slots):
            image = images[i:i + 1].detach()
            store = self.images[slot]
            if len(store) < self.capacity:
                store.append(image.clone())
                out.append(image)
            elif self.rngs[slot].random() < 0.5:
                j = int(self.rngs[slot].integers(0, self.capacity))
                out.append(store[j])
                store[j] = image.clone()
            else:
                out.append(image)
        return torch.cat(out)

    def state_dict(self) -> dict[str, Any]:
        """Stored volumes (on CPU) and generator states, keyed by slot."""
        return {"slots": {s: {"rng": self.rngs[s].bit_generator.state,
                              "images": [t.detach().cpu() for t in self.images[s]]} for s in self.slots}}

    def load_state_dict(self, state: Mapping[str, Any], device: torch.device | None = None) -> None:
        """Restore this process's slots from a (possibly merged) :meth:`state_dict`.

        Raises:
            KeyError: a slot is missing (a different global batch size).
        """
        stored = {int(k): v for k, v in state["slots"].items()}
        for s in self.slots:
            if s not in stored:
                raise KeyError(f"The saved image pool has no slot {s}; resume with the same global batch size.")
            self.rngs[s].bit_generator.state = dict(stored[s]["rng"])
            self.images[s] = [t.to(device) if device is not None else t for t in stored[s]["images"]]


# ---- gradient checkpointing ---------------------------------------------------------------------------------
def _is_block(module: nn.Module, parent: nn.Module | None) -> bool:
    name = type(module).__name__
    if name.endswith(("Block", "Block3D", "Node")):
        return True
    return isinstance(module, nn.Sequential) and isinstance(parent, (nn.ModuleList, nn.ModuleDict)) and \
        any(True for _ in module.parameters())


def enable_gradient_checkpointing(net: nn.Module) -> int:
    """Recompute the generator's blocks in the backward pass instead of storing their activations.

    Wraps, without changing parameter names, the forward of every residual block (``*Block``) and every
    ``nn.Sequential`` node held in a ``ModuleList``/``ModuleDict`` (the U-Net/U-Net++ nodes) in
    :func:`torch.utils.checkpoint.checkpoint` (non-reentrant, so it works with DDP and autocast). Only active in
    training mode with gradients enabled. Layers with running statistics (batch/switchable norm) update them twice
    per step.

    Args:
        net: a generator.

    Returns:
        The number of wrapped blocks (0: nothing recognised; the network is left as it is).
    """
    from torch.utils.checkpoint import checkpoint

    targets: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        for child in module.children():
            if _is_block(child, module):
                targets.append(child)
            else:
                visit(child)

    visit(net)
    for block in targets:
        forward = block.forward

        def wrapped(*args: Any, _forward: Callable = forward, _block: nn.Module = block, **kwargs: Any) -> Any:
            if _block.training and torch.is_grad_enabled():
                return checkpoint(_forward, *args, use_reentrant=False, **kwargs)
            return _forward(*args, **kwargs)

        block.forward = wrapped  # type: ignore[method-assign]
    return len(targets)


# ---- RNG state ----------------------------------------------------------------------------------------------
def _rng_state(device: torch.device) -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                       int(np_state[3]), float(np_state[4]))}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: Mapping[str, Any], device: torch.device) -> None:
    random.setstate(tuple(state["python"]) if not isinstance(state["python"], tuple) else state["python"])
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _deep_merge(items: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    out: dict[Any, Any] = {}
    for item in items:
        for key, value in item.items():
            if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
                out[key] = _deep_merge([out[key], value])
            else:
                out.setdefault(key, value)
    return out


# ---- the trainer --------------------------------------------------------------------------------------------
class _Missing(NotImplementedError):
    pass


def _require_losses(*names: str) -> list[Any]:
    from ct2mr import losses

    missing = [n for n in names if not hasattr(losses, n)]
    if missing:
        raise _Missing(f"This configuration needs ct2mr.losses.{', '.join(missing)}, which this install lacks; "
                       "update ct2mr or turn the corresponding term off.")
    return [getattr(losses, n) for n in names]


class CycleGANTrainer:
    """Networks, optimisers and one training step of a CycleGAN-family model, as configured.

    Args:
        config: the validated run configuration.
        device: compute device.
        dist: this process's place in a ``torchrun`` job.

    Attributes:
        G, F: generators (CT -> MR, MR -> CT), unwrapped modules.
        D_MR, D_CT: discriminators; ``D_MR_pair``/``D_CT_pair`` in paired mode (2 input channels).
        step_count: completed optimisation steps.

    Raises:
        ValueError: an invalid configuration.
        NotImplementedError: a configured network, normalisation, head or loss that this install lacks.
    """

    def __init__(self, config: RunConfig, device: torch.device | None = None, dist: DistContext | None = None
                 ) -> None:
        from ct2mr import losses

        self.config = config
        self.dist = dist or DistContext()
        self.device = device or resolve_device(config.train.device)
        m, t = config.model, config.train
        self.slots = self.dist.slots(config.data.batch_size)
        self.global_batch = config.data.batch_size * self.dist.world_size
        self._check_losses()
        self.adv = losses.AdversarialLoss(m.adversarial, gp_weight=m.gp_weight)
        self.adv_pair = losses.AdversarialLoss(m.paired.adversarial) if m.paired.enabled else None
        self._build_networks()
        self.channels_last = self.device.type == "cuda" if t.channels_last is None else bool(t.channels_last)
        for net in self.networks.values():
            net.to(self.device)
            if self.channels_last:
                net.to(memory_format=torch.channels_last_3d)
        self.checkpointed_blocks = 0
        if t.grad_checkpointing:
            self.checkpointed_blocks = enable_gradient_checkpointing(self.G) + enable_gradient_checkpointing(self.F)
        # optimisers and schedules (TTUR: separate rates)
        self.opt_g = self._optimizer(self._generator_groups(), t.lr_g)
        self.opt_d = self._optimizer([p for d in self.discriminators.values() for p in d.parameters()], t.lr_d)
        steps, decay, start = t.steps, t.decay, config.decay_start
        self.sched_g = torch.optim.lr_scheduler.LambdaLR(self.opt_g, lambda k: lr_factor(k, steps, decay, start))
        self.sched_d = torch.optim.lr_scheduler.LambdaLR(self.opt_d, lambda k: lr_factor(k, steps, decay, start))
        self.dtype = resolve_precision(t.precision, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        # randomness owned by the trainer (per slot where it touches samples)
        self.pool_mr = ImagePool(t.pool_size, self.slots, self.global_batch, t.seed, stream=0)
        self.pool_ct = ImagePool(t.pool_size, self.slots, self.global_batch, t.seed, stream=1)
        self.noise = {s: torch.Generator(device=self.device).manual_seed(t.seed * 1_000_003 + 7919 * s + 17)
                      for s in self.slots}
        self.gp_generator = torch.Generator(device=self.device).manual_seed(t.seed * 1_000_003 + 104_729
                                                                            + self.dist.rank)
        self._wrap_for_ddp()
        self._anchor_low_pass = self._anchor_filter(config.model.law.anchor_sigma_mm)  # built once, used every step
        self.step_count = 0
        self.clock_fraction: float | None = None

    # -- construction helpers --
    def _check_losses(self) -> None:
        """Refuse a configuration that needs a loss or head this install's ``ct2mr.losses`` lacks."""
        from ct2mr import losses

        m = self.config.model
        heads = getattr(losses, "ADVERSARIAL_HEADS", ("lsgan",))
        for key, head in (("model.adversarial", m.adversarial), ("model.paired.adversarial", m.paired.adversarial)):
            if head not in heads and (key == "model.adversarial" or m.paired.enabled):
                raise _Missing(f"{key}={head!r} is not implemented by this install's ct2mr.losses (it has "
                               f"{', '.join(heads)}).")
        if m.beta:
            check = getattr(losses, "check_beta", None)
            if check is None:
                raise _Missing("model.beta (dual contrast) needs ct2mr.losses.check_beta/dual_contrast_loss.")
            check(m.beta)
        if m.alpha or m.rician.tau:
            _require_losses("ssim3d", "structural_cycle_loss")
        if m.rician.corrupt_d or m.rician.tau:
            _require_losses("rician_corrupt", "rician_mixed_loss")
        if m.lambda_hist:
            _require_losses("histogram_loss")
        if m.lambda_mi:
            _require_losses("mutual_information_loss")
        if m.lambda_mind:
            _require_losses("mind_loss")
        if m.lambda_nce:
            _require_losses("patch_nce_loss", "PatchSampleHead", "encoder_features", "default_nce_layers")

    def _build_networks(self) -> None:
        """G, F, the discriminators (+ pair discriminators) and the PatchNCE heads of ``model.*``."""
        m, t = self.config.model, self.config.train
        self.architecture = {"generator": m.generator.to_spec(), "discriminator": m.discriminator.to_spec()}
        if m.paired.enabled:
            self.architecture["pair_discriminator"] = m.discriminator.to_spec(in_channels=2)
        self.G = self._build(build_generator, self.architecture["generator"], "model.generator")
        self.F = self._build(build_generator, self.architecture["generator"], "model.generator")
        self.D_MR = self._build(build_discriminator, self.architecture["discriminator"], "model.discriminator")
        self.D_CT = self._build(build_discriminator, self.architecture["discriminator"], "model.discriminator")
        self.discriminators = {"D_MR": self.D_MR, "D_CT": self.D_CT}
        if m.paired.enabled:
            spec = self.architecture["pair_discriminator"]
            self.D_MR_pair = self._build(build_discriminator, spec, "model.discriminator (pair)")
            self.D_CT_pair = self._build(build_discriminator, spec, "model.discriminator (pair)")
            self.discriminators.update(D_MR_pair=self.D_MR_pair, D_CT_pair=self.D_CT_pair)
        self.heads: dict[str, nn.Module] = {}
        if m.lambda_nce:
            from ct2mr.losses import PatchSampleHead, default_nce_layers, encoder_features

            self.nce_layers = default_nce_layers(self.G)
            with torch.no_grad():
                probe = encoder_features(self.G, torch.zeros(1, 1, 16, 16, 16), self.nce_layers)
            channels = [int(f.shape[1]) for f in probe]
            self.heads = {"H_G": PatchSampleHead(channels, m.nce_channels),
                          "H_F": PatchSampleHead(channels, m.nce_channels)}
            self.nce_generator = torch.Generator().manual_seed(t.seed * 1_000_003 + 3571 + self.dist.rank)

    def _wrap_for_ddp(self) -> None:
        """DistributedDataParallel wrappers in a torchrun job (``_G``, ``_F``, ``_D``, ``_H``); else the plain modules."""
        self._G, self._F = self.G, self.F
        self._D = dict(self.discriminators)
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            import inspect

            ids = [self.device.index] if self.device.type == "cuda" else None
            # rank-local buffers (running statistics of batch/switchable norms) are not broadcast each forward
            no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
                       else {"broadcast_buffers": False})
            wrap = lambda net: DDP(net, device_ids=ids, **no_sync)  # noqa: E731
            self._G, self._F = wrap(self.G), wrap(self.F)
            self._D = {k: wrap(v) for k, v in self.discriminators.items()}
            self._H = {k: wrap(v) for k, v in self.heads.items()}
        else:
            self._H = dict(self.heads)

    def _build(self, builder: Callable[[dict], nn.Module], spec: dict[str, Any], key: str) -> nn.Module:
        from ct2mr.networks import factory, norm

        name = spec.get("name")
        known = factory.GENERATORS if builder is build_generator else factory.DISCRIMINATORS
        if name not in known:
            raise _Missing(f"{key}.name={name!r} is not implemented by this install's ct2mr.networks (it has "
                           f"{', '.join(known)}).")
        if spec.get("norm") not in norm.NORMS:
            raise _Missing(f"{key}.norm={spec.get('norm')!r} is not implemented by this install's ct2mr.networks "
                           f"(it has {', '.join(norm.NORMS)}).")
        try:
            return builder(spec)
        except ValueError as exc:
            if "Bad arguments" in str(exc) and ({"spectral_norm", "in_channels", "depth"} & set(spec)):
                raise _Missing(f"{key}: {exc} (this install's ct2mr.networks predates the option).") from exc
            raise

    def _generator_groups(self) -> list[dict[str, Any]]:
        """G's, F's and the heads' parameters; the intensity curves in a group of their own at ``model.law.lr_scale``
        times the rate when that is not 1 (issue 13: the GAN steps otherwise pull the fitted law away)."""
        params = list(self.G.parameters()) + list(self.F.parameters()) + [p for h in self.heads.values()
                                                                            for p in h.parameters()]
        scale = self.config.model.law.lr_scale
        curves = {id(m.values) for net in (self.G, self.F) for m in net.modules() if isinstance(m, IntensityCurve)}
        if scale == 1.0 or not curves:
            return [{"params": params}]
        return [{"params": [p for p in params if id(p) not in curves]},
                {"params": [p for p in params if id(p) in curves], "lr_scale": scale}]

    def _optimizer(self, params: list, lr: float) -> torch.optim.Optimizer:
        t = self.config.train
        for group in params:
            if isinstance(group, dict) and "lr_scale" in group:
                group["lr"] = lr * group["lr_scale"]
        if t.optimizer == "adam":
            return torch.optim.Adam(params, lr=lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
        if t.optimizer == "rmsprop":
            return torch.optim.RMSprop(params, lr=lr, alpha=t.rmsprop_alpha, weight_decay=t.weight_decay)
        return torch.optim.SGD(params, lr=lr, momentum=t.betas[0], weight_decay=t.weight_decay)

    @property
    def networks(self) -> dict[str, nn.Module]:
        """Every trained network by checkpoint prefix: ``G``, ``F``, ``D_MR``, ``D_CT`` (+ pair discriminators, + the
        PatchNCE heads ``H_G``/``H_F``)."""
        return {"G": self.G, "F": self.F, **self.discriminators, **self.heads}

    def follow_clock(self, fraction: float) -> None:
        """Set the learning rates from the spent fraction of a wall-clock budget (``train.max_minutes``).

        Args:
            fraction: spent share of the budget, in [0, 1]; the schedule of :func:`lr_factor` is evaluated at
                ``fraction * steps``.
        """
        t = self.config.train
        self.clock_fraction = min(max(float(fraction), 0.0), 1.0)
        factor = lr_factor(int(round(self.clock_fraction * t.steps)), t.steps, t.decay, self.config.decay_start)
        for opt, base in ((self.opt_g, t.lr_g), (self.opt_d, t.lr_d)):
            for group in opt.param_groups:
                group["lr"] = base * group.get("lr_scale", 1.0) * factor

    def lr(self) -> tuple[float, float]:
        """Current learning rates (G/F, D)."""
        return self.opt_g.param_groups[0]["lr"], self.opt_d.param_groups[0]["lr"]

    # -- loss pieces --
    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.to(self.device, non_blocking=True)
        return tensor.contiguous(memory_format=torch.channels_last_3d) if self.channels_last else tensor

    def _rician(self, volumes: torch.Tensor) -> torch.Tensor:
        """R_sigma before D_MR (eq. 8.1), with one noise generator per batch slot."""
        r = self.config.model.rician
        if not r.corrupt_d:
            return volumes
        from ct2mr.losses import rician_corrupt

        return torch.cat([rician_corrupt(volumes[i:i + 1], tuple(r.sigma_range), generator=self.noise[s])
                          for i, s in enumerate(self.slots)])

    def _leg(self, target: torch.Tensor, recon: torch.Tensor, mr: bool) -> torch.Tensor:
        """One cycle leg: L1 (eq. 6.6), Mix(L1, SSIM-3D) with alpha (6.2.1), Rician-mixed on the MR leg (8.5)."""
        m = self.config.model
        if mr and m.rician.tau > 0:
            from ct2mr.losses import rician_mixed_loss, ssim3d

            base = rician_mixed_loss(recon.float(), target.float(), m.rician.sigma, m.rician.tau)
            if m.alpha == 0:
                return base
            return (1 - m.alpha) * base + m.alpha * (1 - ssim3d(recon, target))
        if m.alpha == 0:
            return (recon - target).abs().mean()
        from ct2mr.losses import structural_cycle_loss

        return structural_cycle_loss(target, recon, m.alpha)

    def _identity(self, target: torch.Tensor, output: torch.Tensor, mr: bool) -> torch.Tensor:
        r = self.config.model.rician
        if mr and r.tau > 0:
            from ct2mr.losses import rician_mixed_loss

            return rician_mixed_loss(output.float(), target.float(), r.sigma, r.tau)
        return (output - target).abs().mean()

    def _patch_nce(self, net: nn.Module, head: nn.Module, source: torch.Tensor, translated: torch.Tensor
                   ) -> torch.Tensor:
        """PatchNCE between the encoder features of ``source`` and of its translation (Park et al. 2020, eq. 5):
        the same generator encodes both; the same locations are sampled in both; summed over layers."""
        from ct2mr.losses import encoder_features, patch_nce_loss

        m = self.config.model
        feat_k = encoder_features(net, source, self.nce_layers)
        feat_q = encoder_features(net, translated, self.nce_layers)
        index = [torch.randperm(f[0, 0].numel(), generator=self.nce_generator)[:m.nce_patches].to(f.device)
                 for f in feat_k]
        keys, queries = head(feat_k, index), head(feat_q, index)
        return sum(patch_nce_loss(q, k, m.nce_temperature) for q, k in zip(queries, keys)) / len(queries)

    def _autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def _set_d_grad(self, flag: bool) -> None:
        for d in self.discriminators.values():
            for p in d.parameters():
                p.requires_grad_(flag)

    def _check_finite(self, terms: dict[str, float]) -> None:
        bad = {k: v for k, v in terms.items() if not math.isfinite(v)}
        if bad:
            raise FloatingPointError(f"Non-finite loss at step {self.step_count}: {bad}. Lower the learning rates "
                                     "(train.lr_g, train.lr_d), or use train.precision=fp32.")

    # -- one step --
    def train_step(self, batch: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """One optimisation step: G/F update, then (unless frozen) the discriminators' update.

        Args:
            batch: ``{"ct", "mr"}`` (and ``{"paired_ct", "paired_mr"}`` in paired mode), (B, 1, D, H, W) in [-1, 1]
                with B = this process's batch size.

        Returns:
            This process's loss terms as floats: ``G_adv``, ``cycle``, ``identity``, ``G_total``, ``D_MR``,
            ``D_CT`` (the sums M1 always logged), every individual term (``G_adv_MR``, ``cycle_CT``, ``hist_MR``,
            ``gp``, ...), ``D_updated`` (1 or 0), ``lr_G`` and ``lr_D`` (the rates this step used).

        Raises:
            FloatingPointError: a non-finite loss.
        """
        t = self.config.train
        step = self.step_count + 1
        x, y = self._to_device(batch["ct"]), self._to_device(batch["mr"])
        pair = None
        if self.config.model.paired.enabled:
            pair = {"xp": self._to_device(batch["paired_ct"]), "yp": self._to_device(batch["paired_mr"])}
        lr_g, lr_d = self.lr()
        terms: dict[str, torch.Tensor] = {}
        fake_mr, fake_ct = self._generator_step(x, y, pair, terms)
        frozen = d_frozen(step, t.freeze_d_every, t.freeze_d_steps)
        if not frozen:
            self._discriminator_step(x, y, fake_mr, fake_ct, pair, terms)
        self._set_d_grad(True)
        self.scaler.update()
        with warnings.catch_warnings():  # fp16: a step skipped by the scaler is normal, not a misordered schedule
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)`")
            self.sched_g.step()
            self.sched_d.step()
        if self.clock_fraction is not None:  # a wall-clock budget sets the rates (follow_clock), not the step count
            self.follow_clock(self.clock_fraction)
        self.step_count = step
        return self._step_report(terms, frozen, lr_g, lr_d)

    def _generator_step(self, x: torch.Tensor, y: torch.Tensor, pair: dict[str, torch.Tensor] | None,
                        terms: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """G and F's update (adversarial, cycle, identity and the structure/paired terms); returns G(x), F(y)."""
        m = self.config.model
        G, F = self._G, self._F
        self._set_d_grad(False)
        self.G.train(), self.F.train()
        with self._autocast():
            fake_mr, fake_ct = G(x), F(y)
            rec_ct, rec_mr = F(fake_mr), G(fake_ct)
            terms["G_adv_MR"] = self.adv.generator(self.D_MR(self._rician(fake_mr)))
            terms["G_adv_CT"] = self.adv.generator(self.D_CT(fake_ct))
            terms["cycle_CT"] = self._leg(x, rec_ct, mr=False)
            terms["cycle_MR"] = self._leg(y, rec_mr, mr=True)
            total = terms["G_adv_MR"] + terms["G_adv_CT"] + m.lambda_cyc * (terms["cycle_CT"] + terms["cycle_MR"])
            if m.lambda_id > 0:
                terms["identity_MR"] = self._identity(y, G(y), mr=True)
                terms["identity_CT"] = self._identity(x, F(x), mr=False)
                total = total + m.lambda_id * (terms["identity_MR"] + terms["identity_CT"])
            total = total + self._structure_terms(x, y, fake_mr, fake_ct, terms)
            if m.law.enabled:
                total = total + self._anchor_terms(x, y, fake_mr, fake_ct, terms)
            if pair is not None:
                total = total + self._paired_generator_terms(pair, terms)
        self.opt_g.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        self.scaler.step(self.opt_g)
        terms["G_total"] = total
        return fake_mr, fake_ct

    def _anchor_terms(self, x: torch.Tensor, y: torch.Tensor, fake_mr: torch.Tensor, fake_ct: torch.Tensor,
                      terms: dict[str, torch.Tensor]) -> torch.Tensor | float:
        """``model.law.anchor`` x |G(x) - C_G(x)| + ``anchor_f`` x |F(y) - C_F(y)| (means; 0 if both weights are 0),
        each difference low-pass filtered first when ``anchor_sigma_mm`` > 0.

        ``C`` is a generator's per-voxel curve alone; ``terms`` gains ``law_anchor`` (the sum of the two means) and
        ``law_anchor_G`` / ``law_anchor_F``.
        """
        law = self.config.model.law
        weights = (law.anchor, law.anchor if law.anchor_f is None else law.anchor_f)
        if max(weights) <= 0:
            return 0.0
        low_pass = self._anchor_low_pass
        terms["law_anchor_G"] = low_pass(fake_mr - self.G.curve_output(x)).abs().mean()
        terms["law_anchor_F"] = low_pass(fake_ct - self.F.curve_output(y)).abs().mean()
        terms["law_anchor"] = terms["law_anchor_G"] + terms["law_anchor_F"]
        return weights[0] * terms["law_anchor_G"] + weights[1] * terms["law_anchor_F"]

    def _anchor_filter(self, sigma_mm: float) -> Callable[[torch.Tensor], torch.Tensor]:
        """The low-pass filter of ``model.law.anchor_sigma_mm``: a 'valid' separable Gaussian of sigma in voxels of
        the training grid, truncated at 3 sigma, on (B, C, D, H, W) tensors; the identity for sigma 0."""
        if sigma_mm <= 0:
            return lambda diff: diff
        from ct2mr.losses.ssim import gaussian_filter3d, gaussian_window

        spacing = PreprocessingConfig.from_dict(self.config.data.preprocessing).target_spacing
        window = gaussian_window(anchor_window_voxels(sigma_mm, spacing), sigma_mm / spacing)
        return lambda diff: gaussian_filter3d(diff, window)

    def _structure_terms(self, x: torch.Tensor, y: torch.Tensor, fake_mr: torch.Tensor, fake_ct: torch.Tensor,
                         terms: dict[str, torch.Tensor]) -> torch.Tensor | float:
        """The weighted histogram, mutual-information, MIND and PatchNCE terms that are switched on (0 if none)."""
        m = self.config.model
        total: torch.Tensor | float = 0.0
        if m.lambda_hist > 0:
            from ct2mr.losses import histogram_loss

            masks = ((x > _FOREGROUND).float(), (y > _FOREGROUND).float()) if m.hist_mask else (None, None)
            terms["hist_MR"] = histogram_loss(fake_mr.float(), y.float(), m.hist_bins, m.hist_distance,
                                              mask=masks[0], real_mask=masks[1])
            total = total + m.lambda_hist * terms["hist_MR"]
            if m.hist_symmetric:
                terms["hist_CT"] = histogram_loss(fake_ct.float(), x.float(), m.hist_bins, m.hist_distance,
                                                  mask=masks[1], real_mask=masks[0])
                total = total + m.lambda_hist * terms["hist_CT"]
        if m.lambda_mi > 0:
            from ct2mr.losses import mutual_information_loss

            terms["mi"] = mutual_information_loss(x.float(), fake_mr.float())
            total = total + m.lambda_mi * terms["mi"]
        if m.lambda_mind > 0:
            from ct2mr.losses import mind_loss

            terms["mind_MR"] = mind_loss(x, fake_mr, m.mind_dilation)
            terms["mind_CT"] = mind_loss(y, fake_ct, m.mind_dilation)
            total = total + m.lambda_mind * (terms["mind_MR"] + terms["mind_CT"])
        if m.lambda_nce > 0:
            terms["nce_MR"] = self._patch_nce(self.G, self._H["H_G"], x, fake_mr)
            terms["nce_CT"] = self._patch_nce(self.F, self._H["H_F"], y, fake_ct)
            total = total + m.lambda_nce * (terms["nce_MR"] + terms["nce_CT"])
        return total

    def _paired_generator_terms(self, pair: dict[str, torch.Tensor], terms: dict[str, torch.Tensor]) -> torch.Tensor:
        """MR-GAN's paired terms (Jin et al. 2019, eq. 5), weighted; keeps G(x_p), F(y_p) in ``pair`` for the D step."""
        m = self.config.model
        G, F = self._G, self._F
        xp, yp = pair["xp"], pair["yp"]
        pair["g_xp"], pair["f_yp"] = g_xp, f_yp = G(xp), F(yp)
        terms["paired_L1"] = (g_xp - yp).abs().mean() + (f_yp - xp).abs().mean()
        terms["paired_cycle"] = (F(g_xp) - xp).abs().mean() + (G(f_yp) - yp).abs().mean()
        terms["G_adv_pair"] = (self.adv_pair.generator(self.D_MR_pair(torch.cat([xp, g_xp], 1)))
                               + self.adv_pair.generator(self.D_CT_pair(torch.cat([yp, f_yp], 1))))
        return (m.paired.gamma * terms["paired_L1"] + m.lambda_cyc * terms["paired_cycle"]
                + m.paired.lambda_adv * terms["G_adv_pair"])

    def _discriminator_step(self, x: torch.Tensor, y: torch.Tensor, fake_mr: torch.Tensor, fake_ct: torch.Tensor,
                            pair: dict[str, torch.Tensor] | None, terms: dict[str, torch.Tensor]) -> None:
        """The discriminators' update on real volumes and pooled fakes (+ dual contrast, paired D, gradient penalty)."""
        m = self.config.model
        self._set_d_grad(True)
        D = self._D
        pooled_mr, pooled_ct = self.pool_mr.query(fake_mr), self.pool_ct.query(fake_ct)
        with self._autocast():
            real_in, fake_in = self._rician(y), self._rician(pooled_mr)
            terms["D_MR"] = self.adv.discriminator(D["D_MR"](real_in), D["D_MR"](fake_in))
            terms["D_CT"] = self.adv.discriminator(D["D_CT"](x), D["D_CT"](pooled_ct))
            d_total = terms["D_MR"] + terms["D_CT"]
            if m.beta > 0:
                from ct2mr.losses import dual_contrast_loss

                terms["DC_MR"] = dual_contrast_loss(self.adv, D["D_MR"](self._rician(x)))
                terms["DC_CT"] = dual_contrast_loss(self.adv, D["D_CT"](y))
                d_total = d_total + m.beta * (terms["DC_MR"] + terms["DC_CT"])
            if pair is not None:
                xp, yp = pair["xp"], pair["yp"]
                terms["D_pair"] = (
                    self.adv_pair.discriminator(D["D_MR_pair"](torch.cat([xp, yp], 1)),
                                                D["D_MR_pair"](torch.cat([xp, pair["g_xp"].detach()], 1)))
                    + self.adv_pair.discriminator(D["D_CT_pair"](torch.cat([yp, xp], 1)),
                                                  D["D_CT_pair"](torch.cat([yp, pair["f_yp"].detach()], 1))))
                d_total = d_total + m.paired.lambda_adv * terms["D_pair"]
        if self.adv.needs_gradient_penalty:
            terms["gp"] = (self.adv.gradient_penalty(self.D_MR, real_in, fake_in, generator=self.gp_generator)
                           + self.adv.gradient_penalty(self.D_CT, x, pooled_ct, generator=self.gp_generator))
            d_total = d_total + terms["gp"]
        self.opt_d.zero_grad(set_to_none=True)
        self.scaler.scale(d_total).backward()
        self.scaler.step(self.opt_d)
        terms["D_total"] = d_total

    def _step_report(self, terms: dict[str, torch.Tensor], frozen: bool, lr_g: float, lr_d: float
                     ) -> dict[str, float]:
        """The step's terms as floats with the sums M1 logged; raises FloatingPointError on a non-finite one."""
        names = list(terms)
        values = torch.stack([v.detach().float().reshape(()) for v in terms.values()]).cpu().tolist()
        out = dict(zip(names, values))
        out["G_adv"] = out["G_adv_MR"] + out["G_adv_CT"]
        out["cycle"] = out["cycle_CT"] + out["cycle_MR"]
        out["identity"] = out.get("identity_MR", 0.0) + out.get("identity_CT", 0.0)
        out.setdefault("D_MR", float("nan") if frozen else 0.0)
        out.setdefault("D_CT", float("nan") if frozen else 0.0)
        self._check_finite({k: v for k, v in out.items() if not (frozen and k in ("D_MR", "D_CT"))})
        out.update(D_updated=0.0 if frozen else 1.0, lr_G=lr_g, lr_D=lr_d)
        return out

    # -- state --
    def state_dict(self) -> dict[str, Any]:
        """State shared by all processes: networks, optimisers, schedulers, scaler, step (CPU tensors)."""
        return {"step": self.step_count,
                "nets": {k: {n: v.detach().cpu() for n, v in net.state_dict().items()}
                         for k, net in self.networks.items()},
                "opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict(),
                "sched_g": self.sched_g.state_dict(), "sched_d": self.sched_d.state_dict(),
                "scaler": self.scaler.state_dict(), "architecture": json.dumps(self.architecture),
                "model": json.dumps(dataclasses.asdict(self.config.model)),
                "patch_size": list(self.config.patch_size), "global_batch": self.global_batch}

    def local_state_dict(self) -> dict[str, Any]:
        """State of this process: image pools, noise generators (by slot) and its global RNGs."""
        return {"rank": self.dist.rank, "world_size": self.dist.world_size,
                "pool_mr": self.pool_mr.state_dict(), "pool_ct": self.pool_ct.state_dict(),
                "noise": {"slots": {s: g.get_state() for s, g in self.noise.items()}},
                "gp_generator": self.gp_generator.get_state(), "rng": _rng_state(self.device),
                **({"nce_generator": self.nce_generator.get_state()} if self.heads else {})}

    def load_state_dict(self, shared: Mapping[str, Any], local: Sequence[Mapping[str, Any]]) -> None:
        """Restore :meth:`state_dict` and the :meth:`local_state_dict` of every process of the saved run.

        Args:
            shared: the saved shared state.
            local: the saved per-process states (any number of processes, same global batch).

        Raises:
            ValueError: the saved run had another model, patch size or global batch size.
        """
        mine = json.loads(json.dumps(dataclasses.asdict(self.config.model)))
        saved = json.loads(shared["model"])
        defaults = json.loads(json.dumps(dataclasses.asdict(type(self.config.model)())))
        for key, value in defaults.items():  # runs saved before a setting existed had its default
            saved.setdefault(key, value)
        if saved != mine:
            diff = sorted(k for k in set(saved) | set(mine) if saved.get(k) != mine.get(k))
            raise ValueError(f"Cannot resume: the saved run's model differs in {', '.join('model.' + k for k in diff)}."
                             " Resume with the run's own config.yaml (omit model overrides).")
        if list(shared["patch_size"]) != list(self.config.patch_size) or shared["global_batch"] != self.global_batch:
            raise ValueError(f"Cannot resume: the saved run used patches {shared['patch_size']} and global batch "
                             f"{shared['global_batch']}, this one {list(self.config.patch_size)} and "
                             f"{self.global_batch} (data.batch_size x processes).")
        for key, net in self.networks.items():
            net.load_state_dict(shared["nets"][key])
        self.opt_g.load_state_dict(shared["opt_g"])
        self.opt_d.load_state_dict(shared["opt_d"])
        self.sched_g.load_state_dict(shared["sched_g"])
        self.sched_d.load_state_dict(shared["sched_d"])
        self.scaler.load_state_dict(shared["scaler"])
        self.step_count = int(shared["step"])
        merged = _deep_merge(local)
        self.pool_mr.load_state_dict(merged["pool_mr"], self.device)
        self.pool_ct.load_state_dict(merged["pool_ct"], self.device)
        noise = {int(k): v for k, v in merged["noise"]["slots"].items()}
        for s, g in self.noise.items():
            g.set_state(noise[s])
        own = [st for st in local if st["rank"] == self.dist.rank and st["world_size"] == self.dist.world_size]
        if own:
            self.gp_generator.set_state(own[0]["gp_generator"])
            _set_rng_state(own[0]["rng"], self.device)
            if self.heads and "nce_generator" in own[0]:
                self.nce_generator.set_state(own[0]["nce_generator"])
        else:
            warnings.warn(f"The checkpoint was written by {local[0]['world_size']} process(es), this run has "
                          f"{self.dist.world_size}: the per-process RNGs are reseeded (patch streams and pools are "
                          "restored exactly).", RuntimeWarning, stacklevel=2)
            seed_everything(self.config.train.seed + 7 * self.dist.rank + self.step_count)


# ---- validation ---------------------------------------------------------------------------------------------
def _centre_crop(array: np.ndarray, size: Sequence[int] | None) -> np.ndarray:
    if size is None:
        return array
    start = [max(0, (n - s) // 2) for n, s in zip(array.shape, size)]
    return np.ascontiguousarray(array[tuple(slice(a, a + s) for a, s in zip(start, size))])


def triplanar_panel(volumes: Sequence[np.ndarray], value_ranges: Sequence[tuple[float, float]]) -> np.ndarray:
    """Axial, coronal and sagittal mid-slices of several (z, y, x) volumes as one grey image in [0, 1].

    Rows are the planes (axial z, coronal y, sagittal x, each flipped so anterior/superior is up), columns the
    volumes; slices are padded to a common size.

    Args:
        volumes: (z, y, x) arrays of one shape.
        value_ranges: display range per volume.

    Returns:
        (H, W) float32 image.
    """
    rows = []
    for axis in range(3):
        tiles = []
        for vol, (lo, hi) in zip(volumes, value_ranges):
            sl = np.take(vol, vol.shape[axis] // 2, axis=axis)
            sl = np.flipud(sl) if axis else sl
            tiles.append(np.clip((sl - lo) / max(hi - lo, 1e-6), 0, 1))
        rows.append(tiles)
    h = max(t.shape[0] for row in rows for t in row)
    w = max(t.shape[1] for row in rows for t in row)
    pad = lambda t: np.pad(t, ((0, h - t.shape[0] + 2), (0, w - t.shape[1] + 2)))  # noqa: E731
    return np.concatenate([np.concatenate([pad(t) for t in row], 1) for row in rows], 0).astype(np.float32)


def validate(trainer: CycleGANTrainer, val_ct: Sequence[DomainVolume], val_mr: Sequence[DomainVolume],
             reference_mr: Sequence[DomainVolume]) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Cycle SSIM/PSNR/MAE and histogram W1 on held-out volumes (thesis section 7.1 metrics, E2 of section 5).

    Each volume (centre-cropped to ``train.val_crop``) goes through G then F (CT) or F then G (MR) with the
    sliding-window inferer at the training patch size. SSIM is :func:`ct2mr.losses.ssim3d` (gaussian 11^3 window,
    data range 2), PSNR ``10 log10(2^2 / MSE)`` dB (data range 2 of [-1, 1]), MAE in normalised units; the histogram
    distance is the soft-histogram W1 (thesis eq. 7.2, 64 bins, [0, 1] scale) between G(x) and real MR (held-out MR,
    else training MR, centre-cropped).

    Args:
        trainer: the trainer (its unwrapped G and F are used in eval mode).
        val_ct: held-out CT volumes.
        val_mr: held-out MR volumes.
        reference_mr: MR volumes for the histogram distance when ``val_mr`` is empty.

    Returns:
        ``(metrics, panels)``: metrics ``ct_cycle_ssim``, ``ct_cycle_psnr``, ``ct_cycle_mae``, ``mr_cycle_*``,
        ``hist_w1`` (means over volumes; absent when there is nothing to measure) and tri-planar panels
        (CT | G(x) | F(G(x)) | |F(G(x)) - x|) of the first CT (and MR) volume.
    """
    from ct2mr.losses import histogram_loss, ssim3d

    cfg = trainer.config
    t = cfg.train
    crop = t.val_crop
    settings = InferenceSettings(overlap=t.val_overlap, device=str(trainer.device))
    roi = cfg.patch_size
    nets = (trainer.G, trainer.F)
    modes = [n.training for n in nets]
    for n in nets:
        n.eval()
    metrics: dict[str, list[float]] = {}
    panels: dict[str, np.ndarray] = {}
    fakes_mr: list[torch.Tensor] = []
    try:
        for domain, volumes, first, second in (("ct", val_ct, trainer.G, trainer.F), ("mr", val_mr, trainer.F,
                                                                                         trainer.G)):
            for i, vol in enumerate(volumes[: t.val_volumes]):
                arr = _centre_crop(vol.array, crop)
                source = torch.from_numpy(arr)[None, None]
                out = sliding_window(first, source, settings, roi, trainer.device, trainer.dtype)
                rec = sliding_window(second, out, settings, roi, trainer.device, trainer.dtype)
                mse = float(((rec - source) ** 2).mean())
                metrics.setdefault(f"{domain}_cycle_ssim", []).append(float(ssim3d(rec, source)) if min(arr.shape)
                                                                      >= 11 else float("nan"))
                metrics.setdefault(f"{domain}_cycle_psnr", []).append(10 * math.log10(4.0 / max(mse, 1e-12)))
                metrics.setdefault(f"{domain}_cycle_mae", []).append(float((rec - source).abs().mean()))
                if domain == "ct":
                    fakes_mr.append(out)
                if i == 0:
                    a, b, c = arr, out[0, 0].numpy(), rec[0, 0].numpy()
                    panels[domain] = triplanar_panel([a, b, c, np.abs(c - a)], [(-1, 1)] * 3 + [(0, 1)])
        refs = [torch.from_numpy(_centre_crop(v.array, crop))[None, None]
                for v in (val_mr or reference_mr)[: t.val_volumes]]
        if fakes_mr and refs:
            w1 = [float(histogram_loss(f.flatten()[None, None, None, None], torch.cat([r.flatten() for r in refs])
                                       [None, None, None, None], 64, "w1")) for f in fakes_mr]
            metrics["hist_w1"] = w1
    finally:
        for n, mode in zip(nets, modes):
            n.train(mode)
    return {k: float(np.nanmean(v)) if np.isfinite(v).any() else float("nan") for k, v in metrics.items()}, panels


# ---- the run ------------------------------------------------------------------------------------------------
DATA_PATH_KEYS = ("ct", "mr", "val_ct", "val_mr", "paired_ct", "paired_mr", "split_file")


def portable_config(config: dict[str, Any], start: str | os.PathLike | None = None) -> dict[str, Any]:
    """A copy of a resolved run config whose data paths are relative to ``start`` (default: the working directory).

    The run folder keeps absolute paths so that ``--resume`` works from anywhere; checkpoints, which travel, get these
    relative paths instead, so they carry no machine-specific folders.

    Args:
        config: ``RunConfig.to_dict()`` output.
        start: the folder the paths are made relative to.

    Returns:
        The copy.
    """
    out = json.loads(json.dumps(config))
    data = out.get("data", {})
    for key in DATA_PATH_KEYS:
        value = data.get(key)
        if isinstance(value, str):
            data[key] = os.path.relpath(value, start)
        elif isinstance(value, list):
            data[key] = [os.path.relpath(v, start) if os.path.isabs(v) else v for v in value]
    return out


def _absolute(paths: Iterable[str]) -> list[str]:
    return [str(Path(p).expanduser().resolve()) for p in paths]


def _resolve_split(config: RunConfig, out_dir: Path, resume: bool) -> dict[str, dict[str, list[str]]]:
    d = config.data
    stored = out_dir / "split.json"
    if resume and stored.is_file():
        return read_split(stored)
    if d.split_file:
        return read_split(d.split_file)
    if not d.ct or not d.mr:
        raise ValueError("No training data: pass --ct and --mr (or data.ct / data.mr), or --split-file.")
    auto = make_split([] if d.val_ct else d.ct, [] if d.val_mr else d.mr, d.val_fraction, d.test_fraction,
                      config.train.seed)
    out = {}
    for modality, inputs, explicit in (("ct", d.ct, d.val_ct), ("mr", d.mr, d.val_mr)):
        if explicit:
            out[modality] = {"train": _absolute(inputs), "val": _absolute(explicit), "test": []}
        else:
            out[modality] = auto[modality]
    return out


def _load_limited(inputs: Sequence[str], modality: str, prep: PreprocessingConfig, limit: int) -> list[DomainVolume]:
    volumes: list[DomainVolume] = []
    for path in inputs:
        if len(volumes) >= limit:
            break
        try:
            volumes += load_domain(path, modality, prep)
        except ValueError as exc:  # a flat held-out MR: skip it
            logger.warning("validation volume %s skipped: %s", path, exc)
    return volumes[:limit]


def _open_writer(out_dir: Path, purge_step: int | None) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception as exc:  # tensorboard missing
        warnings.warn(f"TensorBoard logging is off ({exc}); install `tensorboard` or set train.tensorboard=false.",
                      RuntimeWarning, stacklevel=2)
        return None
    return SummaryWriter(log_dir=str(out_dir / "tb"), purge_step=purge_step)


def _complete_checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    """Checkpoint folders ``checkpoints/step_N`` holding a readable ``trainer.pt`` and ``rank*.pt``, newest first."""
    found = []
    for folder in (out_dir / "checkpoints").glob("step_*"):
        try:
            step = int(folder.name.split("_", 1)[1])
        except (IndexError, ValueError):
            continue
        ranks = sorted(folder.glob("rank*.pt"))
        try:
            for file in [folder / "trainer.pt", *ranks]:
                verify_file(file)
        except OSError:
            continue
        if ranks:
            found.append((step, folder))
    return sorted(found, reverse=True)


def _latest_state(out_dir: Path) -> dict[str, Any] | None:
    """The run's latest complete training state: ``state.json``, or the newest complete checkpoint folder.

    ``state.json`` is used when it parses and points at a folder with ``trainer.pt``. When it is corrupt (a bad JSON
    document, missing keys, a folder that is gone) or missing while checkpoint folders exist, the newest complete
    folder (:func:`_complete_checkpoints`) is used with a warning that names the file.

    Returns:
        ``{"step", "dir", ...}``, or ``None`` when the folder holds no run.

    Raises:
        CheckpointError: ``state.json`` is corrupt and no complete checkpoint folder remains.
    """
    pointer = out_dir / STATE_POINTER
    problem = None
    if pointer.is_file():
        try:
            state = json.loads(pointer.read_text(encoding="utf-8"))
            if not isinstance(state, dict) or not isinstance(state.get("step"), int) \
                    or not isinstance(state.get("dir"), str):
                raise ValueError("it lacks an integer 'step' or a 'dir'")
            if not (out_dir / state["dir"] / "trainer.pt").is_file():
                raise ValueError(f"the folder it names, {out_dir / state['dir']}, holds no trainer.pt")
            return state
        except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            problem = f"{pointer} is corrupt ({' '.join(str(exc).split())})"
    complete = _complete_checkpoints(out_dir)
    if not complete:
        if problem:
            raise CheckpointError(f"{problem}, and {out_dir / 'checkpoints'} holds no complete checkpoint folder "
                                  "(trainer.pt and rank*.pt) to fall back to. Start a new run with another --out.")
        return None
    step, folder = complete[0]
    why = problem or f"{pointer} is missing"
    logger.warning("%s; falling back to the newest complete checkpoint folder %s (step %d). The wall-clock budget "
                   "(--max-minutes) counts from this resume.", why, folder, step)
    return {"step": step, "dir": str(folder.relative_to(out_dir)), "elapsed_s": 0.0, "fallback": True}


def _truncate_log(log_path: Path, step: int) -> None:
    if not log_path.is_file():
        return
    kept = []
    for line in log_path.read_text().splitlines():
        try:
            if line.strip() and json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except ValueError:  # a line cut by a kill mid-write
            continue
    write_text(log_path, "".join(line + "\n" for line in kept))


def resume_config(out_dir: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
    """The configuration of an earlier run (``RUN_DIR/config.yaml``) with ``overrides`` applied.

    Raises:
        FileNotFoundError: the folder holds no run to resume.
        ValueError: bad overrides.
    """
    out_dir = Path(out_dir)
    if not (out_dir / "config.yaml").is_file() or not ((out_dir / STATE_POINTER).is_file()
                                                       or _complete_checkpoints(out_dir)):
        raise FileNotFoundError(f"Nothing to resume in {out_dir}: it has no config.yaml and {STATE_POINTER} from an "
                                "earlier `ct2mr train` (start a new run without --resume).")
    return load_config(base=out_dir / "config.yaml", overrides=overrides)


def train_run(config: RunConfig, out_dir: str | Path, resume: bool = False,
              progress: Callable[[int, int, dict[str, float]], None] | None = None, command: str = "") -> Path:
    """Train a CycleGAN-family model as configured; works from 1 CPU process to N GPUs under ``torchrun``.

    Args:
        config: the validated run configuration (data paths included).
        out_dir: run folder (created).
        resume: continue from the latest checkpoint in ``out_dir`` (see :func:`resume_config`).
        progress: ``callback(step, steps, info)`` after every step on rank 0; ``info`` holds the loss terms and
            ``patches_per_s`` (samples per second over all processes, one sample = one CT and one MR patch).
        command: the command line, recorded in the run folder and the checkpoints.

    Returns:
        Path of the final checkpoint ``out_dir/model.safetensors`` (G and F).

    Raises:
        FileNotFoundError, ct2mr.io.images.ImageReadError: unusable inputs.
        ValueError: a bad configuration, a run folder that already holds a run (without ``resume``), or a
            checkpoint that does not match the configuration.
        NotImplementedError: a configured piece this install lacks.
        FloatingPointError: a non-finite loss.
    """
    out_dir = Path(out_dir)
    t = config.train
    dist, device = init_distributed(t.device)
    try:
        return _train_run(config, out_dir, resume, progress, command, dist, device)
    finally:
        if dist.enabled and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def start_intensity_laws(trainer: "CycleGANTrainer", config: RunConfig, ct_volumes: Sequence[DomainVolume],
                         mr_volumes: Sequence[DomainVolume], out_dir: Path | None = None) -> float:
    """Fit the CT -> MR and MR -> CT intensity laws and start G's and F's intensity curves there (issue 13).

    :func:`ct2mr.training.intensity_law.fit_intensity_law` on the preprocessed training volumes, with ``model.law``'s
    settings and ``train.seed`` (every process computes the same laws; with ``model.law.f_start: inverse`` F's law
    is :func:`ct2mr.training.intensity_law.inverse_intensity_law` of G's); with ``model.law.file``, the laws of that
    earlier run are read instead (no fit). With ``out_dir``, writes ``intensity_law.json`` (both laws, their distances
    per restart) and ``intensity_law.png`` (the curves).

    Returns:
        Seconds spent (they count in ``train.max_minutes``).

    Raises:
        ValueError: a generator without an intensity curve of ``model.law.knots`` knots, or a ``model.law.file``
            that is not a law file or has another number of knots.
    """
    from ct2mr.training.intensity_law import fit_intensity_law, inverse_intensity_law, read_intensity_laws

    law, prep = config.model.law, PreprocessingConfig.from_dict(config.data.preprocessing)
    start = time.perf_counter()
    settings = dict(voxel_mm=prep.target_spacing, knots=law.knots, spacing_mm=law.spacing_mm,
                    scales_mm=tuple(law.scales_mm), gradient_sigma_mm=law.gradient_sigma_mm, samples=law.samples,
                    restarts=law.restarts, iterations=law.iterations, screen_iterations=law.screen_iterations,
                    finalists=law.finalists, smoothness=law.smoothness, noise=law.noise,
                    degradation=law.degradation, relative=law.relative,
                    seed=config.train.seed, ct_window=tuple(prep.ct_window))
    def one_per_source(volumes: Sequence[DomainVolume]) -> list[np.ndarray]:
        """Each acquisition first (the phases of a 4D series share one), so one cine series cannot fill the cap."""
        firsts = {v.group: v for v in reversed(volumes)}
        rest = [v for v in volumes if firsts.get(v.group) is not v]
        return [v.array for v in list(firsts.values())[::-1] + rest]

    ct, mr = one_per_source(ct_volumes), one_per_source(mr_volumes)
    given = read_intensity_laws(law.file) if law.file else {}
    fitted = {}
    for name, net, (src, dst, a, b) in (("G", trainer.G, ("ct", "mr", ct, mr)), ("F", trainer.F, ("mr", "ct", mr, ct))):
        if not hasattr(net, "set_intensity_law"):
            raise ValueError(f"model.law.enabled needs {name} with an intensity curve (a resnet generator with "
                             f"extra.law_knots={law.knots}).")
        if name == "F" and law.f_start == "inverse":  # also over a model.law.file's F: G's law decides
            fitted[name] = inverse_intensity_law(fitted["G"], ct, settings["voxel_mm"], spacing_mm=law.spacing_mm,
                                                 seed=config.train.seed, ct_window=settings["ct_window"])
        elif name in given:
            fitted[name] = given[name]
        else:
            fitted[name] = fit_intensity_law(a, b, src, dst, **settings)
        net.set_intensity_law(fitted[name].values)
        logger.info("Intensity law %s -> %s fitted in %.1f s (distance %.5f; starts %s)", src, dst,
                    fitted[name].seconds, fitted[name].distance, fitted[name].restarts)
    if out_dir is not None:
        write_json(out_dir / "intensity_law.json", {k: v.to_dict() for k, v in fitted.items()})
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
            lo, hi = prep.ct_window
            for ax, (name, fit) in zip(axes, fitted.items()):
                x = (fit.knots + 1.0) * 0.5 * (hi - lo) + lo if fit.source == "ct" else fit.knots
                y = (fit.values + 1.0) * 0.5 * (hi - lo) + lo if fit.target == "ct" else fit.values
                ax.plot(x, y, "o-", ms=3)
                ax.set(xlabel="CT (HU)" if fit.source == "ct" else "MR (normalised)",
                       ylabel="MR (normalised)" if fit.target == "mr" else "CT (HU)",
                       title=f"{name}: {fit.source.upper()} -> {fit.target.upper()} law (start)")
                ax.grid(alpha=0.3)
            fig.tight_layout()
            fig.savefig(out_dir / "intensity_law.png", dpi=90)
            plt.close(fig)
        except ImportError:  # matplotlib is optional for training
            pass
    return time.perf_counter() - start


@dataclass
class _RunData:
    """The volumes a run trains and validates on, read once at its start."""

    prep: PreprocessingConfig
    split: dict[str, dict[str, list[str]]]
    ct: list[DomainVolume]
    mr: list[DomainVolume]
    pairs: Any
    val_ct: list[DomainVolume]
    val_mr: list[DomainVolume]
    ct_statistics: Any


def _check_run_folder(out_dir: Path, resume: bool) -> dict[str, Any] | None:
    """The run folder's state pointer; refuses a resume without one and a fresh run over one."""
    pointer = _latest_state(out_dir)
    if resume and pointer is None:
        raise FileNotFoundError(f"Nothing to resume in {out_dir}: no {STATE_POINTER}.")
    if not resume and pointer is not None:
        raise ValueError(f"{out_dir} already holds a run (checkpoint at step {pointer['step']}). Continue it with "
                         "--resume, or choose another --out (or delete the folder).")
    return pointer


def _torch_settings(t: Any, device: torch.device) -> None:
    """Determinism, cuDNN autotuning and the thread count of ``train.*``."""
    if t.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not t.deterministic
        torch.backends.cudnn.deterministic = bool(t.deterministic)
    if t.threads:
        torch.set_num_threads(t.threads)


def _load_run_data(config: RunConfig, out_dir: Path, resume: bool, dist: DistContext) -> _RunData:
    """Read and preprocess the split's training (and, on rank 0, validation) volumes."""
    t, d = config.train, config.data
    if not resume:  # record absolute paths, so that --resume works from any working directory
        for key in ("ct", "mr", "val_ct", "val_mr", "paired_ct", "paired_mr"):
            setattr(d, key, _absolute(getattr(d, key)))
        d.split_file = _absolute([d.split_file])[0] if d.split_file else None
    prep = PreprocessingConfig.from_dict(d.preprocessing)
    split = _resolve_split(config, out_dir, resume)
    ct_volumes = load_domain(split["ct"]["train"], "ct", prep)
    # what the out-of-distribution check of `ct2mr translate --ood` compares an input CT with (issue 16)
    ct_statistics = training_ct_statistics(ct_volumes) if dist.is_main and ct_volumes else None
    mr_volumes = load_domain(split["mr"]["train"], "mr", prep)
    pairs = None
    if config.model.paired.enabled:
        pairs = pair_volumes(load_domain(d.paired_ct, "ct", prep), load_domain(d.paired_mr, "mr", prep))
    val_ct = val_mr = []
    if t.val_every > 0 and dist.is_main:
        val_ct = _load_limited(split["ct"]["val"], "ct", prep, t.val_volumes)
        val_mr = _load_limited(split["mr"]["val"], "mr", prep, t.val_volumes)
    return _RunData(prep, split, ct_volumes, mr_volumes, pairs, val_ct, val_mr, ct_statistics)


def _batch_source(config: RunConfig, slots: Any, data: _RunData) -> TrainingBatches:
    """The per-slot unpaired (and paired) patch samplers of ``data.*``."""
    t, d = config.train, config.data
    common = dict(foreground=d.foreground, slots=slots, foreground_tries=d.foreground_tries,
                  foreground_bias=d.foreground_bias, balance=d.balance)
    return TrainingBatches(UnpairedPatchSampler(data.ct, data.mr, config.patch_size, seed=t.seed, **common),
                           PairedPatchSampler(data.pairs, config.patch_size, seed=t.seed, **common)
                           if data.pairs else None)


class _TrainingRun:
    """One call of :func:`train_run` after the data is read: the run folder, the loop, checkpoints and snapshots.

    Rank 0 owns the folder (config, split, ``log.jsonl``, TensorBoard, snapshots, ``model.safetensors``); every rank
    writes its own sampler and RNG state into the resumable checkpoint.
    """

    def __init__(self, config: RunConfig, out_dir: Path, dist: DistContext, device: torch.device,
                 trainer: CycleGANTrainer, data: _RunData, command: str, prefetch: PatchPrefetcher) -> None:
        self.config, self.out_dir, self.dist, self.device = config, out_dir, dist, device
        self.trainer, self.data, self.command, self.prefetch = trainer, data, command, prefetch
        self.log: Any = None
        self.writer: Any = None
        self.elapsed_before = 0.0
        self.run_start = time.perf_counter()
        multiple = config.model.generator.multiple
        self.inference = {"roi_size": [int(math.ceil(max(96, p) / multiple) * multiple) for p in config.patch_size],
                          "overlap": 0.25}

    def elapsed(self) -> float:
        """Training seconds of this run, summed over earlier resumed parts."""
        return self.elapsed_before + time.perf_counter() - self.run_start

    def open_folder(self, resume: bool, start: int) -> None:
        """Write the config, split and run record (rank 0), and open the log and TensorBoard writer."""
        config, out_dir, data, t, d = self.config, self.out_dir, self.data, self.config.train, self.config.data
        if self.dist.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            write_text(out_dir / "config.yaml", to_yaml(config))
            if not resume:
                write_split(out_dir / "split.json", data.split, seed=t.seed, val_fraction=d.val_fraction,
                            test_fraction=d.test_fraction)
            write_json(out_dir / "config.json",
                       {"config": config.to_dict(), "command": self.command, "world_size": self.dist.world_size,
                        "global_batch": self.trainer.global_batch, "ct": [v.name for v in data.ct],
                        "mr": [v.name for v in data.mr], "val_ct": [v.name for v in data.val_ct],
                        "val_mr": [v.name for v in data.val_mr]})
            if resume:
                _truncate_log(out_dir / "log.jsonl", start)
            self.log = open(out_dir / "log.jsonl", "a", encoding="utf-8")
            if t.tensorboard:
                self.writer = _open_writer(out_dir, start + 1 if resume else None)
        self.dist.barrier()

    def close(self) -> None:
        """Stop the prefetcher and close the log and the TensorBoard writer."""
        self.prefetch.close()
        if self.log is not None:
            self.log.close()
        if self.writer is not None:
            self.writer.close()

    def summary(self, step: int, last: dict[str, float]) -> dict[str, Any]:
        """The ``training`` record stored in every checkpoint."""
        config, data = self.config, self.data
        return {"name": config.name, "preset": config.preset, "steps": step,
                "config": portable_config(config.to_dict()), "command": self.command,
                "ct_volumes": [v.name for v in data.ct], "mr_volumes": [v.name for v in data.mr],
                "ct_statistics": data.ct_statistics, "last_losses": last,
                "software": software_versions("torch", "monai", "SimpleITK", "numpy"), "device": str(self.device),
                "world_size": self.dist.world_size, "global_batch": self.trainer.global_batch}

    def save_state(self, step: int, last: dict[str, float]) -> None:
        """The resumable checkpoint of ``step`` (every rank), ``last.safetensors`` and the state pointer (rank 0)."""
        out_dir, dist, trainer = self.out_dir, self.dist, self.trainer
        folder = out_dir / "checkpoints" / f"step_{step:08d}"
        if dist.is_main:
            folder.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        save_training_state(folder / f"rank{dist.rank}.pt", {**trainer.local_state_dict(),
                                                              "sampler": self.prefetch.state_dict()})
        dist.barrier()
        if dist.is_main:
            save_training_state(folder / "trainer.pt", trainer.state_dict())
            save_checkpoint(out_dir / "last.safetensors", trainer.networks, trainer.architecture, self.data.prep,
                            self.inference, self.summary(step, last))
            write_json(out_dir / STATE_POINTER, {"step": step, "dir": str(folder.relative_to(out_dir)),
                                                 "world_size": dist.world_size, "global_batch": trainer.global_batch,
                                                 "elapsed_s": round(self.elapsed(), 3),
                                                 "time": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=None)
            for old in (out_dir / "checkpoints").glob("step_*"):
                if old != folder:
                    shutil.rmtree(old, ignore_errors=True)

    def run_validation(self, step: int) -> dict[str, float]:
        """:func:`validate` on the validation volumes, logged and sent to TensorBoard."""
        metrics, panels = validate(self.trainer, self.data.val_ct, self.data.val_mr, self.data.mr)
        if self.log is not None:
            self.log.write(json.dumps({"step": step, "validation": {k: round(v, 6) for k, v in metrics.items()}})
                           + "\n")
            self.log.flush()
        if self.writer is not None:
            for k, v in metrics.items():
                self.writer.add_scalar(f"val/{k}", v, step)
            for k, img in panels.items():
                self.writer.add_image(f"val/{k}_triplanar", img, step, dataformats="HW")
        return metrics

    def snapshot(self, step: int, last: dict[str, float]) -> None:
        """G and F of ``step`` as a translatable model in ``snapshots/`` (the learning curve's points)."""
        folder = self.out_dir / "snapshots"
        folder.mkdir(exist_ok=True)
        save_checkpoint(folder / f"step_{step:08d}.safetensors", {"G": self.trainer.G, "F": self.trainer.F},
                        self.trainer.architecture, self.data.prep, self.inference,
                        {**self.summary(step, last), "elapsed_s": round(self.elapsed(), 3)})

    def log_step(self, step: int, losses: dict[str, float], rate: float) -> None:
        """Average the losses over ranks; one ``log.jsonl`` line and the TensorBoard scalars."""
        keys = sorted(k for k in losses if not k.startswith("lr_"))
        averaged = self.dist.mean(torch.tensor([losses[k] for k in keys], dtype=torch.float64)).tolist()
        logged = dict(zip(keys, averaged))
        record = {"step": step, "seconds": round(time.perf_counter() - self.run_start, 3),  # frozen D: null
                  **{k: round(v, 6) if math.isfinite(v) else None for k, v in logged.items()},
                  "lr_G": losses["lr_G"], "lr_D": losses["lr_D"], "patches_per_s": round(rate, 4)}
        if self.device.type == "cuda":
            record["max_memory_gb"] = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 3)
        if self.log is not None:
            self.log.write(json.dumps(record) + "\n")
            self.log.flush()
        if self.writer is not None:
            for k, v in logged.items():
                if math.isfinite(v):
                    self.writer.add_scalar(f"loss/{k}" if k != "D_updated" else "train/D_updated", v, step)
            self.writer.add_scalar("lr/G", losses["lr_G"], step)
            self.writer.add_scalar("lr/D", losses["lr_D"], step)
            self.writer.add_scalar("train/patches_per_s", rate, step)

    def loop(self, start: int, law_seconds: float, progress: Callable | None) -> Path:
        """Train from step ``start + 1`` to ``train.steps`` or the time budget; write the final model."""
        t, dist, trainer = self.config.train, self.dist, self.trainer
        budget_s = None if t.max_minutes is None else 60.0 * float(t.max_minutes)
        losses: dict[str, float] = {}
        self.run_start = time.perf_counter()
        rate, validated_at, final_step = 0.0, -1, t.steps
        next_snapshot = (self.elapsed_before // (60 * t.snapshot_minutes) + 1) * 60 * t.snapshot_minutes \
            if t.snapshot_minutes else math.inf
        if budget_s is not None:
            trainer.follow_clock(self.elapsed_before / budget_s)
        if law_seconds and dist.is_main and (t.snapshot_minutes or t.snapshot_every):
            self.snapshot(0, {})  # the fitted laws alone: the learning curve's first point
        for step in range(start + 1, t.steps + 1):
            if budget_s is not None and dist.all_true(self.elapsed() >= budget_s) and step > start + 1:
                final_step = step - 1
                logger.info("Time budget of %.1f min spent after step %d", t.max_minutes, final_step)
                break
            tick = time.perf_counter()
            losses = trainer.train_step(self.prefetch.next())
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            now = trainer.global_batch / max(time.perf_counter() - tick, 1e-9)
            rate = now if step == start + 1 else 0.9 * rate + 0.1 * now
            if step % t.log_every == 0 or step == t.steps:
                self.log_step(step, losses, rate)
            if budget_s is not None:
                trainer.follow_clock(self.elapsed() / budget_s)
            if t.val_every and step % t.val_every == 0 and dist.is_main and self.data.val_ct + self.data.val_mr:
                self.run_validation(step)
                validated_at = step
            if dist.is_main and (self.elapsed() >= next_snapshot or (t.snapshot_every and step % t.snapshot_every == 0)):
                self.snapshot(step, losses)
                while next_snapshot <= self.elapsed():
                    next_snapshot += 60 * t.snapshot_minutes
            if step % t.checkpoint_every == 0 and step < t.steps:
                self.save_state(step, losses)
            if progress is not None and dist.is_main:
                progress(step, t.steps, {**losses, "patches_per_s": rate})
        return self.finish(start, final_step, validated_at, losses)

    def finish(self, start: int, final_step: int, validated_at: int, losses: dict[str, float]) -> Path:
        """Last validation and snapshot, the resumable state, and ``model.safetensors`` (G and F)."""
        t, dist = self.config.train, self.dist
        if t.val_every and dist.is_main and self.data.val_ct + self.data.val_mr and validated_at != final_step \
                and start < final_step:
            self.run_validation(final_step)
        if (t.snapshot_minutes or t.snapshot_every) and dist.is_main and final_step > start:
            self.snapshot(final_step, losses)
        self.save_state(final_step, losses)
        final = self.out_dir / "model.safetensors"
        if dist.is_main:
            save_checkpoint(final, {"G": self.trainer.G, "F": self.trainer.F}, self.trainer.architecture,
                            self.data.prep, self.inference,
                            {**self.summary(final_step, losses), "elapsed_s": round(self.elapsed(), 3),
                             "stopped_by": "max_minutes" if final_step < t.steps else "steps"})
            logger.info("Trained steps %d-%d in %.1f s", start + 1, final_step, time.perf_counter() - self.run_start)
        dist.barrier()
        return final


def _train_run(config: RunConfig, out_dir: Path, resume: bool, progress: Callable | None, command: str,
               dist: DistContext, device: torch.device) -> Path:
    """:func:`train_run` in one process of the job: read the data, build or restore the trainer, fit the laws, train."""
    t = config.train
    pointer = _check_run_folder(out_dir, resume)
    _torch_settings(t, device)
    data = _load_run_data(config, out_dir, resume, dist)
    seed_everything(t.seed)
    trainer = CycleGANTrainer(config, device, dist)
    source = _batch_source(config, trainer.slots, data)
    if resume:
        folder = out_dir / pointer["dir"]
        shared = load_training_state(folder / "trainer.pt")
        local = [load_training_state(p) for p in sorted(folder.glob("rank*.pt"))]
        trainer.load_state_dict(shared, local)
        source.load_state_dict(_deep_merge([st["sampler"] for st in local]))
    law_seconds = 0.0
    if config.model.law.enabled and not resume:
        if dist.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
        law_seconds = start_intensity_laws(trainer, config, data.ct, data.mr, out_dir if dist.is_main else None)
    start = trainer.step_count
    run = _TrainingRun(config, out_dir, dist, device, trainer, data, command,
                       PatchPrefetcher(source, config.data.prefetch, pin_memory=device.type == "cuda"))
    run.elapsed_before = float(pointer.get("elapsed_s", 0.0)) if resume and pointer else law_seconds
    try:
        run.open_folder(resume, start)
        return run.loop(start, law_seconds, progress)
    finally:
        run.close()


def train(ct: Sequence[str | Path] | None, mr: Sequence[str | Path] | None, out_dir: str | Path,
          config: RunConfig | None = None, progress: Callable[[int, int, dict[str, float]], None] | None = None,
          command: str = "", resume: bool = False) -> Path:
    """Train on unpaired CT and MR volumes (the historical entry point; see :func:`train_run`).

    Args:
        ct: CT files or folders (``None``: those of ``config.data.ct``).
        mr: MR files or folders; 4D series are split into 3D volumes (``None``: ``config.data.mr``).
        out_dir: run folder.
        config: the run configuration (default: preset M1).
        progress: ``callback(step, steps, info)`` after every step.
        command: the command line, recorded in the checkpoint.
        resume: continue the run in ``out_dir``.

    Returns:
        Path of the final checkpoint ``out_dir/model.safetensors``.
    """
    config = config or load_config("m1")
    if ct is not None:
        config.data.ct = [str(p) for p in ct]
    if mr is not None:
        config.data.mr = [str(p) for p in mr]
    config.validate()
    return train_run(config, out_dir, resume, progress, command)


def command_line(argv: Sequence[str]) -> str:
    """``ct2mr ARGS`` as a shell-quoted string (recorded in the run)."""
    return "ct2mr " + shlex.join(list(argv))
