"""Benchmark: training throughput (patches/s) and peak memory of a preset (default M1) on CPU or CUDA.

One *patch* here is one training sample of the global batch: a CT patch and an MR patch of ``--patch``^3 voxels,
both translated, cycled, identity-mapped and judged (a full CycleGAN step: G and F forward/backward six times, the
two discriminators on real and fake). Throughput = batch size / median step time over ``--steps`` timed steps after
``--warmup`` untimed ones (CUDA synchronised around each step). Peak memory: ``torch.cuda.max_memory_allocated`` on
CUDA, the process's peak resident set (``ru_maxrss``) on CPU.

Patches come from the real shared volumes (``--data``, default ``../shared/data``: the heart-crop CT and the upper
abdomen MR) through the thesis preprocessing; with no data folder, from random smooth volumes (throughput does not
depend on the content). Nothing is written into the repository.

Usage, from the repository root::

    .venv/bin/python benchmarks/train_speed.py                                  # M1, 128^3, CUDA if available
    .venv/bin/python benchmarks/train_speed.py --device cpu --patch 32 --steps 3 --warmup 1
    .venv/bin/python benchmarks/train_speed.py --preset m3 --patch 96 --grad-checkpointing --precision bf16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _volumes(data: Path | None, patch: int):  # noqa: ANN202
    import numpy as np

    from ct2mr.preprocessing.collections import DomainVolume, load_domain

    ct, mr = (data / "ct" / "thorax_cta_heart_crop_1p5mm.nii.gz", data / "mr" / "upper_abdomen_mr_3mm.nii.gz") \
        if data else (None, None)
    if ct is not None and ct.exists() and mr.exists():
        return load_domain(ct, "ct"), load_domain(mr, "mr"), f"real ({ct.name}, {mr.name})"
    rng = np.random.default_rng(0)
    shape = (max(160, patch + 16),) * 3
    out = []
    for name in ("synthetic_ct", "synthetic_mr"):
        noise = rng.standard_normal([s // 8 for s in shape]).astype(np.float32)
        vol = np.kron(noise, np.ones((8, 8, 8), np.float32))
        out.append([DomainVolume(name, name, np.tanh(vol).astype(np.float32), None)])  # type: ignore[arg-type]
    return out[0], out[1], "synthetic (no shared data found)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="m1", help="preset name or YAML (default: %(default)s)")
    parser.add_argument("--patch", type=int, default=128, help="patch side in voxels (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=1, help="patches per domain per step (default: %(default)s)")
    parser.add_argument("--width", type=int, help="base channels of G/F and D (default: the preset's)")
    parser.add_argument("--blocks", type=int, help="ResNet blocks (default: the preset's)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed first steps (default: %(default)s)")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    parser.add_argument("--channels-last", default=None, action=argparse.BooleanOptionalAction,
                        help="channels_last_3d (default: on CUDA only)")
    parser.add_argument("--grad-checkpointing", action="store_true", help="recompute generator blocks")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data", help="shared data folder")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="further configuration overrides")
    args = parser.parse_args(argv)

    import torch

    from ct2mr.training.config import load_config
    from ct2mr.training.data import TrainingBatches, UnpairedPatchSampler
    from ct2mr.inference.translate import resolve_device
    from ct2mr.training.trainer import CycleGANTrainer, seed_everything

    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = [f"data.patch_size=[{args.patch},{args.patch},{args.patch}]", f"data.batch_size={args.batch}",
                 f"train.precision={args.precision}", f"train.device={args.device}",
                 f"train.grad_checkpointing={str(args.grad_checkpointing).lower()}",
                 f"train.steps={args.steps + args.warmup}", "train.deterministic=false", *args.overrides]
    if args.width:
        overrides += [f"model.generator.base_channels={args.width}", f"model.discriminator.base_channels={args.width}"]
    if args.blocks is not None:
        overrides.append(f"model.generator.n_blocks={args.blocks}")
    if args.channels_last is not None:
        overrides.append(f"train.channels_last={str(args.channels_last).lower()}")
    config = load_config(args.preset, overrides)
    device = resolve_device(config.train.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    ct, mr, data_kind = _volumes(args.data if args.data.exists() else None, args.patch)
    seed_everything(0)
    trainer = CycleGANTrainer(config, device)
    source = TrainingBatches(UnpairedPatchSampler(ct, mr, config.patch_size, config.data.batch_size, seed=0,
                                                  foreground=config.data.foreground, balance="none"))
    batches = [source.sample() for _ in range(min(4, args.steps + args.warmup))]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(args.warmup + args.steps):
        batch = batches[i % len(batches)]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        tick = time.perf_counter()
        trainer.train_step(batch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - tick)
    median = statistics.median(times)
    params = sum(p.numel() for p in trainer.G.parameters())
    result = {
        "preset": config.preset, "patch": args.patch, "batch": args.batch,
        "generator": config.model.generator.to_spec(), "discriminator": config.model.discriminator.to_spec(),
        "generator_parameters_M": round(params / 1e6, 3), "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
        or platform.machine(),
        "precision": str(trainer.dtype).replace("torch.", ""), "channels_last": trainer.channels_last,
        "grad_checkpointing": args.grad_checkpointing, "threads": torch.get_num_threads(),
        "steps_timed": len(times), "step_seconds_median": round(median, 4),
        "step_seconds_min": round(min(times), 4), "patches_per_s": round(args.batch / median, 4),
        "data": data_kind, "torch": torch.__version__, "python": platform.python_version(),
        "load_average_1min": round(os.getloadavg()[0], 2), "cpu_count": os.cpu_count(),
    }
    if device.type == "cuda":
        result["peak_memory_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
        result["peak_reserved_gb"] = round(torch.cuda.max_memory_reserved(device) / 2**30, 3)
    else:
        result["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)
    print(json.dumps(result))
    memory = (f"peak GPU memory {result['peak_memory_gb']} GB allocated ({result['peak_reserved_gb']} GB reserved)"
              if device.type == "cuda" else f"peak RSS {result['peak_rss_gb']} GB")
    print(f"{config.preset.upper()} {args.patch}^3 batch {args.batch} on {result['device_name']} ({device}, "
          f"{result['precision']}): {result['patches_per_s']} patches/s (median step {median:.3f} s over "
          f"{len(times)} steps), {memory}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
