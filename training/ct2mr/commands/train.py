"""``ct2mr train --ct ... --mr ... --out RUN_DIR``: train a 3D CycleGAN-family model
(:func:`ct2mr.training.trainer.train_run`); ``KEY=VALUE`` configuration overrides may sit anywhere on the line."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Callable, Sequence

from ct2mr.commands.common import (LazyBar, add_device_argument, add_precision_argument, add_progress_argument,
                                   plain_warnings)

__all__ = ["NAME", "add_parser", "accept_unknown", "run"]

NAME = "train"

EXAMPLES = """examples:
  ct2mr train --ct ct_folder/ --mr mr_folder/ --out runs/m1
  ct2mr train --preset m3 --ct prep/ct --mr prep/mr --out runs/m3 model.alpha=0.84 train.steps=20000
  ct2mr train --ct a.nii.gz b.nrrd --mr cine_4d.nii.gz --out runs/small --steps 200 --patch-size 48 --width 8
  ct2mr train --out runs/m3 --resume                          # continue exactly where it stopped
  ct2mr train --out runs/m3 --resume train.steps=40000        # extend a finished run
  torchrun --nproc-per-node 4 -m ct2mr train --preset m1 --split-file split.json --out runs/m1 --device cuda

presets: m1 m2 m3 m4 hist hlsnc paired (thesis), sc nce law (issue 13; law: the best on the known-mapping benchmark)
(training/ct2mr/configs/*.yaml); every key is listed in RUN_DIR/config.yaml.
"""

DESCRIPTION = (
    "Train generators G (CT -> MR) and F (MR -> CT) against 3D PatchGAN discriminators on random unpaired 3D patches, "
    "as a preset configures it (thesis Table 4: m1 ResNet-9b + LSGAN, m2 + WGAN-GP, m3 U-Net++ + WGAN-GP + SSIM-3D, "
    "m4 3D DC-CycleGAN; hist Hist-CycleGAN (7.7); hlsnc hinge + switchable norm; paired Jin et al.'s paired terms; "
    "beside the thesis: sc MIND-SSC structure loss, nce 3D PatchNCE, law generators that start at an unpaired CT -> "
    "MR intensity law fitted before the first step). Settings are KEY=VALUE overrides (positional or --set), the "
    "flags below are shorthands for common ones. Inputs go through the thesis's preprocessing chain (or are ct2mr "
    "preprocess HDF5 outputs). The same command runs on 1 CPU or, under torchrun, on N GPUs or nodes. Writes "
    "RUN_DIR/config.yaml (resolved config), split.json, log.jsonl, tb/ (TensorBoard), checkpoints/ + state.json "
    "(resumable with --resume), last.safetensors and model.safetensors.")

#: The path options whose values may swallow a following ``KEY=VALUE`` override (``--ct a.nii.gz model.alpha=0.8``).
PATH_FLAGS = ("ct", "mr", "val_ct", "val_mr", "paired_ct", "paired_mr")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``ct2mr train`` to ``subparsers`` and return its parser."""
    r = subparsers.add_parser(NAME, help="train a 3D CycleGAN-family model (presets M1-M4, HIST, HLSNC, PAIRED)",
                              description=DESCRIPTION, epilog=EXAMPLES,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="configuration overrides, e.g. model.alpha=0.84 "
                   "train.steps=100 data.patch_size=[48,48,48] (see RUN_DIR/config.yaml for every key)")
    r.add_argument("--out", required=True, metavar="RUN_DIR", help="run folder")
    r.add_argument("--preset", metavar="NAME|YAML", help="m1, m2, m3, m4, hist, hlsnc, paired, sc, nce, law or a "
                   "YAML file (default: m1; with --resume: the run's own config.yaml)")
    r.add_argument("--resume", action="store_true", help="continue the run in RUN_DIR from its latest checkpoint "
                   "(exactly: optimisers, schedules, patch streams, RNGs); overrides such as train.steps=N extend it")
    r.add_argument("--set", dest="set_overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a configuration override (repeatable; same as a positional KEY=VALUE)")
    _add_data_arguments(r)
    _add_shorthand_arguments(r)
    r.add_argument("--force", action="store_true", help="use --ct volumes that fail the CT plausibility check and "
                   "--mr volumes that look like CTs (HU statistics), with a warning; spacings outside 0.1-20 mm and "
                   "a file given as both CT and MR stay refused")
    add_progress_argument(r)
    return r


def _add_data_arguments(r: argparse.ArgumentParser) -> None:
    """The training data: ``--ct``, ``--mr``, held-out and paired volumes, a split file."""
    r.add_argument("--ct", nargs="+", metavar="PATH", help="training CT files or folders (data.ct)")
    r.add_argument("--mr", nargs="+", metavar="PATH", help="training MR files or folders, 4D series split (data.mr)")
    r.add_argument("--val-ct", nargs="+", metavar="PATH", help="held-out CT for validation (default: 20%% of the CT "
                   "sources, data.val_fraction)")
    r.add_argument("--val-mr", nargs="+", metavar="PATH", help="held-out MR for validation")
    r.add_argument("--split-file", metavar="JSON|CSV", help="train/val/test lists per modality (replaces --ct/--mr)")
    r.add_argument("--paired-ct", nargs="+", metavar="PATH", help="registered CT of paired mode (Jin et al.)")
    r.add_argument("--paired-mr", nargs="+", metavar="PATH", help="registered MR, in the order of --paired-ct")


def _add_shorthand_arguments(r: argparse.ArgumentParser) -> None:
    """Shorthands of common configuration keys (:func:`ct2mr.training.config.shorthand_overrides`)."""
    r.add_argument("--name", help="model name stored in the checkpoint")
    r.add_argument("--steps", type=int, help="optimisation steps (train.steps; M1 default 1000)")
    r.add_argument("--patch-size", type=int, nargs="+", metavar="N", help="patch size in voxels, 1 or 3 values "
                   "(data.patch_size; default 64)")
    r.add_argument("--batch-size", type=int, help="patches per domain per step and process (data.batch_size; 1)")
    r.add_argument("--width", type=int, help="base channels of G/F and D (default 64)")
    r.add_argument("--blocks", type=int, help="residual blocks of ResNet generators (default 9)")
    r.add_argument("--lr", type=float, help="learning rate of G/F and D (train.lr_g, train.lr_d; 2e-4)")
    r.add_argument("--lambda-cyc", type=float, help="cycle loss weight (model.lambda_cyc; 10)")
    r.add_argument("--lambda-id", type=float, help="identity loss weight (model.lambda_id; 0.2)")
    add_precision_argument(r, "train.precision (auto: bf16 or fp16 on CUDA, fp32 on CPU)", default=None)
    r.add_argument("--seed", type=int, help="random seed (train.seed; 0)")
    add_device_argument(r, "auto, cpu, cuda or cuda:N (train.device; under torchrun auto = cuda:LOCAL_RANK)",
                        default=None)
    r.add_argument("--threads", type=int, help="CPU threads for torch (train.threads; 0: torch's default)")
    r.add_argument("--max-minutes", type=float, metavar="MIN", help="wall-clock budget (train.max_minutes): stop "
                   "cleanly when it is spent (summed over resumes), writing the final checkpoint and model; the "
                   "learning-rate decay then follows the clock instead of the step count")
    r.add_argument("--checkpoint-every", type=int, help="steps between resumable checkpoints (100)")
    r.add_argument("--val-every", type=int, help="steps between validations on held-out volumes (500; 0: none)")


def accept_unknown(args: argparse.Namespace, extra: Sequence[str]) -> bool:
    """Take arguments argparse did not place: ``KEY=VALUE`` overrides may sit anywhere on the line (after an option,
    say); they are appended to ``args.overrides``. Returns ``False`` (a usage error) when any is not one."""
    if not all("=" in e and not e.startswith("-") for e in extra):
        return False
    args.overrides = list(args.overrides) + list(extra)
    return True


def _overrides(args: argparse.Namespace) -> list[str]:
    """Every configuration override of the command line, in order: the shorthand flags, overrides swallowed by the
    path options (which keep their paths), positional ``KEY=VALUE`` and ``--set``."""
    from ct2mr.training.config import shorthand_overrides, split_path_overrides

    paths, moved = split_path_overrides({flag: getattr(args, flag) for flag in PATH_FLAGS})
    for flag, value in paths.items():
        setattr(args, flag, value)
    return shorthand_overrides(
        name=args.name, steps=args.steps, patch_size=args.patch_size, batch_size=args.batch_size, width=args.width,
        blocks=args.blocks, lr=args.lr, lambda_cyc=args.lambda_cyc, lambda_id=args.lambda_id, seed=args.seed,
        device=args.device, threads=args.threads, checkpoint_every=args.checkpoint_every, val_every=args.val_every,
        precision=args.precision, ct=args.ct, mr=args.mr, val_ct=args.val_ct, val_mr=args.val_mr,
        paired_ct=args.paired_ct, paired_mr=args.paired_mr, split_file=args.split_file, max_minutes=args.max_minutes,
    ) + moved + list(args.overrides) + list(args.set_overrides)


def _check(config) -> None:
    """Checks before the work (:mod:`ct2mr.checks`): a file in both domains, a step too large for the memory, and a
    note about fp16 on a CPU.

    Raises:
        InputCheckError, ResourceCheckError: see :func:`ct2mr.checks.check_training_inputs` and
            :func:`ct2mr.checks.check_training_memory`.
    """
    from ct2mr.checks import (
        check_training_inputs,
        check_training_memory,
        human_bytes,
        training_device,
    )

    check_training_inputs(config)
    estimate = check_training_memory(config)
    logging.getLogger("ct2mr.checks").info("training step: about %s (%s)", human_bytes(estimate.total_bytes),
                                           estimate.detail)
    if config.train.precision == "fp16" and training_device(config).type == "cpu":
        from ct2mr.inference.translate import CPU_FP16_NOTE

        print(f"ct2mr train: note: {CPU_FP16_NOTE}", file=sys.stderr)


def _progress(args: argparse.Namespace, preset: str, bar: LazyBar, rank0: bool) -> Callable | None:
    """The per-step callback of ``--progress`` (rank 0 only): the step bar with the losses, or one JSON object per
    logged step."""
    if args.progress == "bar" and rank0:
        def progress(step: int, total: int, info: dict) -> None:
            # created at the first step, so that loading the volumes does not count in the rate
            shown = bar.open(total=total, initial=step, unit="step", desc=f"train {preset}")
            shown.update(step - shown.n)
            shown.set_postfix(cyc=f"{info['cycle']:.3f}", G=f"{info['G_adv']:.3f}",
                              D=f"{info['D_MR'] + info['D_CT']:.3f}", patch_s=f"{info['patches_per_s']:.2f}",
                              refresh=False)
            shown.refresh()
        return progress
    if args.progress == "json" and rank0:
        from ct2mr.progress import JsonReporter

        events = JsonReporter()

        def progress(step: int, total: int, info: dict) -> None:
            events.event("progress", **{"stage": "train", "step": step, "fraction": step / total,
                                        **{k: round(v, 5) for k, v in info.items()}})
        return progress
    return None


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Train (or resume) the run in ``args.out``; rank 0 prints the checkpoint (or a JSON ``done`` event).

    Returns:
        0.

    Raises:
        FileNotFoundError, ValueError, RuntimeError, OSError: unusable inputs, a bad configuration, a step that does
        not fit in memory (reported by :func:`ct2mr.cli.main`).
    """
    from ct2mr.checks import input_checks
    from ct2mr.training.config import load_config
    from ct2mr.training.trainer import command_line, resume_config, train_run

    overrides = _overrides(args)
    config = resume_config(args.out, overrides) if args.resume else load_config(args.preset or "m1", overrides)
    _check(config)
    rank0 = os.environ.get("RANK", "0") == "0"
    with LazyBar() as bar, input_checks(getattr(args, "force", False)), plain_warnings("train"):
        path = train_run(config, args.out, args.resume, _progress(args, config.preset, bar, rank0), command_line(argv))
    if rank0:
        if args.progress == "json":
            from ct2mr.progress import JsonReporter

            JsonReporter().event("done", checkpoint=str(path))
        else:
            print(f"Checkpoint: {path}")
    return 0
