"""The ``ct2mr`` command line: argument parsing only; the work is done by the library modules.

Sub-commands:

* ``ct2mr preprocess --modality ct|mr INPUTS... --out DIR``: the thesis's preprocessing chain over a collection,
  into training-ready HDF5 (:func:`ct2mr.preprocessing.batch.preprocess_batch`).
* ``ct2mr qc DIR... --out QC_DIR``: Table 2, clipped voxels, left-right check and figures (:func:`ct2mr.evaluation.qc.run_qc`).
* ``ct2mr translate CT -o OUT_DIR``: synthetic MR, round-trip CT and error map on the CT's grid
  (:func:`ct2mr.inference.translate.translate_file`); over a folder, several paths or a list file: a resumable batch, sharded
  under torchrun (:func:`ct2mr.inference.batch.translate_batch`).
* ``ct2mr train --ct ... --mr ... --out RUN_DIR``: train a 3D CycleGAN (:func:`ct2mr.training.trainer.train`).
* ``ct2mr evaluate --model CKPT --ct ... --mr ... --out DIR``: FID/KID, W1, cycle SSIM/PSNR/MAE, paired metrics,
  harmonisation, tables and figures (:func:`ct2mr.evaluation.evaluate`).
* ``ct2mr compare RUN_A RUN_B ... --out DIR``: side-by-side table, paired t-tests and figures
  (:func:`ct2mr.evaluation.evaluate.compare`).
* ``ct2mr qa SYNTHETIC_MR REFERENCE_MR -o DIR``: MAE/PSNR/SSIM/MS-SSIM against a registered reference MR in the body
  mask, difference map and metrics table (:func:`ct2mr.evaluation.reference_qa.reference_qa`; issue 16).
* ``ct2mr demo``: fetch a public chest CT and translate it with the default model.
* ``ct2mr info CHECKPOINT``: what a checkpoint holds.
* ``ct2mr models list|download NAME|import FILE|clear``: the model list, the user cache, offline import
  (:mod:`ct2mr.models.registry`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shlex
import sys
import time
from typing import Sequence

from ct2mr import __version__

__all__ = ["main", "build_parser"]

EXAMPLES_TRANSLATE = """examples:
  ct2mr translate chest.nii.gz -o out/
  ct2mr translate dicom_series_folder/ -o out/ --model run/model.safetensors --device cuda
  ct2mr translate chest.nrrd -o out/ --overlap 0.25 --progress json
  ct2mr translate ct_folder/ -o out/                        # batch: out/<case>/..., out/translate_summary.json
  ct2mr translate a.nii.gz b.nrrd dicom_series_folder/ -o out/
  ct2mr translate cases.txt -o out/                         # list file: one path per line, # comments
  ct2mr translate cases.txt -o out/ --overwrite             # recompute cases that are already done
  ct2mr translate chest.nii.gz -o out/ --uncertainty tta --ood   # + uncertainty.nii.gz (4 extra G passes), ood.json
  ct2mr translate chest.nii.gz -o out/ --model a.safetensors --model b.safetensors --uncertainty ensemble
  torchrun --nproc-per-node 4 -m ct2mr translate cases.txt -o out/ --device cuda

single vs batch: one CT file or one DICOM series folder writes OUT_DIR/synthetic_mr.nii.gz, roundtrip_ct.nii.gz
and error_map.nii.gz (an OUT_DIR that already holds them is refused unless --overwrite). A folder of volumes
(image files and DICOM series sub-folders), several paths, or a list file (.txt, .lst, .csv: one path per line, '#'
comment lines, relative paths relative to the list file; .csv: first column) is a batch: OUT_DIR/<case>/ per volume
(<case> = file name without suffix, _2, _3 ... on collisions) and OUT_DIR/translate_summary.json (per case: input,
status done/skipped/failed, seconds, error). The model is loaded once and the next CT is read and preprocessed while
the current one is translated.
resume: a case is skipped when its outputs and OUT_DIR/<case>/.ct2mr_done.json (input path, size and modification
time, model SHA-256, settings) match; a crash mid-case leaves no partial outputs, so rerunning the same command
finishes the batch. A failing case is recorded and the others go on; exit status 1 when any case failed.
checks before the work: OUT_DIR is created and a probe file written first; the free disk space, the 1 mm network
grid and the estimated memory are checked; the input must look like a CT in HU (air/lung/fat, soft tissue, CT range;
not constant; --force overrides) with spacings of 0.1-20 mm; NaN/inf voxels are replaced by -1024 HU. Every output is
fsynced and read back before it gets its name: a full disk ends with exit status 1 and no partial file.
torchrun / clusters: every process (RANK of WORLD_SIZE, e.g. torchrun --nproc-per-node N, multi-node alike, or a
scheduler that sets RANK and WORLD_SIZE) takes every WORLD_SIZE-th case of the sorted list, runs on
cuda:LOCAL_RANK (when --device is auto or cuda and CUDA is available) and writes its own cases and
OUT_DIR/translate_summary.rank<RANK>.json. No process group is created and no process waits for another.
"""

EXAMPLES_PREPROCESS = """examples:
  ct2mr preprocess --modality ct ct_folder/ dicom_series_folder/ --out prep/ct
  ct2mr preprocess --modality mr cine_4d.nii.gz --select 0 5 10 --out prep/mr --n4
  ct2mr preprocess --modality mr mr_folder/ --out prep/mr --mr-percentiles 0.5 99.5 --k 32 --jobs 2
  ct2mr train --ct prep/ct --mr prep/mr --out runs/m1      # preprocessed files are used as they are

outputs: DIR/<stem>.h5 (DIR/<stem>_tNNN.h5 per volume of a 4D series): dataset 'volume' (float32, (z, y, x),
[-1, 1]) and attributes (source, shape, spacing, origin, direction, padding, every parameter, clipped voxels,
software versions, git commit, config, timestamp); DIR/preprocess_log.jsonl: one line per volume and run.
Exit status 1 when any volume failed (the others are still written).
"""

EXAMPLES_QC = """examples:
  ct2mr qc prep/ct prep/mr --out qc/
  ct2mr qc prep/ --out qc/ --example chest_ct_lung2 cardiac_cine_t000 --no-figures

outputs: QC_DIR/table2.csv, table2.md (thesis Table 2 + clipped voxels), volumes.csv (one row per volume),
qc_report.md (printed), and <modality>_triplanar.png, <modality>_histogram_raw.png,
<modality>_histogram_preprocessed.png (thesis figures 12-17).
"""

EXAMPLES_EVALUATE = """examples:
  ct2mr evaluate --model runs/m1/model.safetensors --ct val/ct --mr val/mr --out eval/m1
  ct2mr evaluate --ct val/ct --mr val/mr --out eval/default --harmonize histogram --reference-mr ref_mr.nii.gz
  ct2mr evaluate --model m.safetensors --ct pairs/ct --mr pairs/mr --paired --out eval/paired   # registered pairs
  ct2mr evaluate --ct val/ct --mr val/mr --out eval/mn --features medicalnet --feature-weights resnet_10_23dataset.pth

outputs: DIR/table.csv, table.md (thesis Tables 6/7/9: FID, KID (%), SSIM_cyc, PSNR_cyc (dB), MAE, MAE (HU), W1),
per_volume.csv/.md, paired.csv/.md (--paired), metrics.json (everything, with the feature extractor's identity and
the patch sampling rule), figures/*.png (tri-planar CT | G(x) | real MR, round trip and error map, histogram
overlays), figure_data.npz (for `ct2mr compare`) and tensorboard/ (scalars and figures).
"""

EXAMPLES_COMPARE = """examples:
  ct2mr compare eval/m1 eval/m2 --out eval/m1_vs_m2
  ct2mr compare runs/m1/model.safetensors runs/m2/model.safetensors --ct val/ct --mr val/mr --out eval/cmp

outputs: DIR/compare.csv, compare.md (one table, paired t-tests of every run against the first), ttests.csv,
figures/compare_triplanar.png, figures/compare_histogram.png, tensorboard/.
"""

EXAMPLES_TRAIN = """examples:
  ct2mr train --ct ct_folder/ --mr mr_folder/ --out runs/m1
  ct2mr train --preset m3 --ct prep/ct --mr prep/mr --out runs/m3 model.alpha=0.84 train.steps=20000
  ct2mr train --ct a.nii.gz b.nrrd --mr cine_4d.nii.gz --out runs/small --steps 200 --patch-size 48 --width 8
  ct2mr train --out runs/m3 --resume                          # continue exactly where it stopped
  ct2mr train --out runs/m3 --resume train.steps=40000        # extend a finished run
  torchrun --nproc-per-node 4 -m ct2mr train --preset m1 --split-file split.json --out runs/m1 --device cuda

presets: m1 m2 m3 m4 hist hlsnc paired (thesis), sc nce law (issue 13; law: the best on the known-mapping benchmark)
(training/ct2mr/configs/*.yaml); every key is listed in RUN_DIR/config.yaml.
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``ct2mr`` command."""
    parser = argparse.ArgumentParser(
        prog="ct2mr", description="Unpaired 3D CT -> MR translation (CycleGAN family) for thoracic imaging: "
        "preprocess (and qc), train, translate.")
    parser.add_argument("--version", action="version", version=f"ct2mr {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details (INFO level) to stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("preprocess", help="preprocess CT or MR collections into training-ready HDF5 volumes",
                       description="The preprocessing chain of the thesis (section 4, Algorithm 1) over files and "
                       "folders (NIfTI, NRRD, MHA, HDF5 'volume' datasets, DICOM series folders; 4D series split into "
                       "3D volumes): reorient to RAS from the direction cosines, resample to 1 mm with trilinear "
                       "interpolation (size round(n * s / t); background: median for float, minimum for integer "
                       "images), pad symmetrically to a multiple of K with the minimum, then CT: clip to the HU window "
                       "-> [-1, 1]; MR: optional N4 bias-field correction, clip to the volume's percentiles -> "
                       "[-1, 1] (a flat MR is warned about, zeroed and flagged). Volumes run in parallel; outputs "
                       "that are up to date (same source, size, modification time and parameters) are skipped; "
                       "writes are atomic and never touch the inputs; a failed volume does not stop the others.",
                       epilog=EXAMPLES_PREPROCESS, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="volume files or folders (a folder of files, or one "
                   "DICOM series)")
    p.add_argument("--modality", required=True, choices=("ct", "mr"), help="ct (HU) or mr (arbitrary units)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created if missing)")
    p.add_argument("--select", type=int, nargs="+", metavar="T", help="0-based indices of the volumes to keep from "
                   "4D series (cardiac phases, respiratory gates); default: all. 3D inputs ignore it")
    p.add_argument("--spacing", type=float, default=1.0, metavar="MM", help="isotropic target spacing in mm "
                   "(default: %(default)s)")
    p.add_argument("--k", type=int, default=16, help="pad every axis to a multiple of K voxels (default: "
                   "%(default)s)")
    p.add_argument("--ct-window", type=float, nargs=2, default=(-600.0, 1000.0), metavar=("MIN", "MAX"),
                   help="CT clipping window in HU (default: -600 1000)")
    p.add_argument("--mr-percentiles", type=float, nargs=2, default=(1.0, 99.0), metavar=("LOW", "HIGH"),
                   help="MR clipping percentiles (default: 1 99)")
    p.add_argument("--n4", action="store_true", help="MR only: N4 bias-field correction (SimpleITK, Otsu mask, "
                   "fitted on a shrunk image, applied at full resolution) before the chain")
    p.add_argument("--n4-shrink", type=int, default=4, metavar="F", help="shrink factor of the N4 fit (default: "
                   "%(default)s)")
    p.add_argument("--jobs", type=int, metavar="N", help="parallel worker processes (default: min(4, CPU count); "
                   "1 runs in this process)")
    p.add_argument("--force", action="store_true", help="re-process volumes whose outputs are up to date")
    p.add_argument("--progress", default="bar", choices=("bar", "json", "none"),
                   help="bar for people, json (one object per stdout line) for programs (default: %(default)s)")

    q = sub.add_parser("qc", help="quality control of preprocessed collections (Table 2, clipping, orientation)",
                       description="Quality control of `ct2mr preprocess` outputs (CT and MR, in one folder or "
                       "several): the thesis's Table 2 (clip percentiles, median P1 and P99, flagged volumes) and the "
                       "percentage of clipped voxels per modality, a left-right orientation check (which side the "
                       "heart/mediastinum falls on, per volume; a modality whose majority has it on the patient's "
                       "right is flagged), and the raw-vs-preprocessed tri-planar views and log-frequency histograms "
                       "with the clipping bounds (thesis figures 12-17). The raw view re-reads the source when it is "
                       "still reachable and unchanged.",
                       epilog=EXAMPLES_QC, formatter_class=argparse.RawDescriptionHelpFormatter)
    q.add_argument("dirs", nargs="+", metavar="DIR", help="folders of preprocessed HDF5 files (or single files)")
    q.add_argument("--out", required=True, metavar="QC_DIR", help="folder for the tables and figures")
    q.add_argument("--example", nargs="+", metavar="NAME", help="volume names shown in the tri-planar figures "
                   "(default: the first non-flat volume of each modality)")
    q.add_argument("--no-figures", action="store_true", help="tables and report only")

    t = sub.add_parser("translate", help="translate a CT into a synthetic MR (+ round trip and error map)",
                       description="Translate a CT with generator G (CT -> MR) and back with F (MR -> CT). Writes "
                       "OUT_DIR/synthetic_mr.nii.gz (normalised MR intensity in [-1, 1]), OUT_DIR/roundtrip_ct.nii.gz "
                       "(HU) and OUT_DIR/error_map.nii.gz (|F(G(x)) - x| in HU, x clipped to the CT window), each "
                       "on exactly the input's voxel grid.",
                       epilog=EXAMPLES_TRANSLATE, formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("inputs", nargs="+", metavar="INPUT", help="CT volume(s) in HU: NIfTI, NRRD, MHA, HDF5 "
                   "('volume' dataset) or a DICOM series folder; or a folder of them, or a list file (.txt, .lst, "
                   ".csv) for a batch (see below)")
    t.add_argument("-o", "--output", required=True, metavar="OUT_DIR", help="output folder (created if missing)")
    t.add_argument("--overwrite", action="store_true", help="one CT: replace outputs already in OUT_DIR (without "
                   "it such a folder is refused before any work); batch: recompute cases that are already done "
                   "(default: skip them)")
    t.add_argument("--force", action="store_true", help="translate a volume that fails the CT plausibility check "
                   "(HU statistics: air/lung, soft tissue and CT-range shares; a constant volume), e.g. a CT in "
                   "unusual units; spacings outside 0.1-20 mm stay refused")
    t.add_argument("--model", metavar="PATH", action="append", help="ct2mr checkpoint (.safetensors); default: the "
                   "bundled model. Give it more than once for --uncertainty ensemble: the first model writes the "
                   "outputs, the others only add their G(x) to the uncertainty map")
    t.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:N "
                   "(default: %(default)s; falls back to CPU with a warning when CUDA is missing)")
    t.add_argument("--overlap", type=float, default=0.25, help="sliding-window overlap in [0, 1) (default: "
                   "%(default)s)")
    t.add_argument("--roi-size", type=int, nargs="+", metavar="N", help="window size in voxels (1 or 3 multiples "
                   "of 4; default: the model's, at least 96)")
    t.add_argument("--sw-batch-size", type=int, default=None, help="windows per forward pass (default: chosen from "
                   "the free GPU memory, 1 on the CPU)")
    t.add_argument("--gpu-memory-gb", type=float, metavar="GB", help="cap on the GPU memory this run may use; the "
                   "window batch and the stitching buffer (GPU or CPU) are planned within it (default: all free memory)")
    t.add_argument("--reference-path", action="store_true", help="run the plain reference path instead of the fast "
                   "path: the networks as trained, one window per pass unless --sw-batch-size, no memory planning "
                   "(with --precision fp32: the fp32 reference the fast path is tested against)")
    t.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="autocast precision; auto = bf16/fp16 on CUDA, fp32 on CPU (default: %(default)s)")
    t.add_argument("--progress", default="bar", choices=("bar", "json", "none"),
                   help="bar for people, json (one object per stdout line) for programs (default: %(default)s)")
    t.add_argument("--harmonize", default="none", choices=("none", "histogram", "nyul", "zscore"),
                   help="post-hoc intensity harmonisation of the synthetic MR (thesis 7.6): histogram matching to the "
                   "reference MR, Nyul landmark standardisation learned from the reference MR(s), or median/MAD "
                   "standardisation in the CT's body mask (matched to the reference's median/MAD; without a "
                   "reference: robust z-scores) (default: %(default)s)")
    t.add_argument("--reference-mr", nargs="+", metavar="PATH", help="reference MR file(s) or folder(s) for "
                   "--harmonize (required by histogram and nyul)")
    t.add_argument("--warp-check", action="store_true", help="anatomy checks (thesis 5, P1/E2): edge correlation, "
                   "gradient-magnitude similarity and NMI of x and G(x) in the body, and a deformable B-spline "
                   "registration (Mattes MI, ~50 mm control points, 3 mm working grid) of G(x) onto x; also writes "
                   "OUT_DIR/displacement_mm.nii.gz (|displacement| in mm on the input's grid; near 0 when G moved no "
                   "anatomy) and OUT_DIR/anatomy.json (metrics, mean/p95 displacement, settings). Adds ~10-60 s")
    t.add_argument("--analysis", action="store_true", help="also write OUT_DIR/analysis.json (a batch: "
                   "OUT_DIR/<case>/analysis.json; and put it in the done / case_done event): cycle SSIM/PSNR/MAE of "
                   "x vs F(G(x)), W1 vs the --reference-mr histogram, edge correlation, GMS and NMI of x vs G(x), "
                   "and the intensity histograms, all in the CT's body mask (ct2mr.evaluation.translation_analysis); for front "
                   "ends that show them")
    _add_trust_arguments(t)  # issue 16: uncertainty map and out-of-distribution score

    r = sub.add_parser("train", help="train a 3D CycleGAN-family model (presets M1-M4, HIST, HLSNC, PAIRED)",
                       description="Train generators G (CT -> MR) and F (MR -> CT) against 3D PatchGAN discriminators "
                       "on random unpaired 3D patches, as a preset configures it (thesis Table 4: m1 ResNet-9b + "
                       "LSGAN, m2 + WGAN-GP, m3 U-Net++ + WGAN-GP + SSIM-3D, m4 3D DC-CycleGAN; hist Hist-CycleGAN "
                       "(7.7); hlsnc hinge + switchable norm; paired Jin et al.'s paired terms; beside the thesis: sc "
                       "MIND-SSC structure loss, nce 3D PatchNCE, law generators that start at an unpaired CT -> MR "
                       "intensity law fitted before the first step). Settings are "
                       "KEY=VALUE overrides (positional or --set), the flags below are shorthands for common ones. "
                       "Inputs go through the thesis's preprocessing chain (or are ct2mr preprocess HDF5 outputs). "
                       "The same command runs on 1 CPU or, under torchrun, on N GPUs or nodes. Writes RUN_DIR/"
                       "config.yaml (resolved config), split.json, log.jsonl, tb/ (TensorBoard), checkpoints/ + "
                       "state.json (resumable with --resume), last.safetensors and model.safetensors.",
                       epilog=EXAMPLES_TRAIN, formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="configuration overrides, e.g. model.alpha=0.84 "
                   "train.steps=100 data.patch_size=[48,48,48] (see RUN_DIR/config.yaml for every key)")
    r.add_argument("--out", required=True, metavar="RUN_DIR", help="run folder")
    r.add_argument("--preset", metavar="NAME|YAML", help="m1, m2, m3, m4, hist, hlsnc, paired, sc, nce, law or a "
                   "YAML file (default: m1; with --resume: the run's own config.yaml)")
    r.add_argument("--resume", action="store_true", help="continue the run in RUN_DIR from its latest checkpoint "
                   "(exactly: optimisers, schedules, patch streams, RNGs); overrides such as train.steps=N extend it")
    r.add_argument("--set", dest="set_overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a configuration override (repeatable; same as a positional KEY=VALUE)")
    r.add_argument("--ct", nargs="+", metavar="PATH", help="training CT files or folders (data.ct)")
    r.add_argument("--mr", nargs="+", metavar="PATH", help="training MR files or folders, 4D series split (data.mr)")
    r.add_argument("--val-ct", nargs="+", metavar="PATH", help="held-out CT for validation (default: 20%% of the CT "
                   "sources, data.val_fraction)")
    r.add_argument("--val-mr", nargs="+", metavar="PATH", help="held-out MR for validation")
    r.add_argument("--split-file", metavar="JSON|CSV", help="train/val/test lists per modality (replaces --ct/--mr)")
    r.add_argument("--paired-ct", nargs="+", metavar="PATH", help="registered CT of paired mode (Jin et al.)")
    r.add_argument("--paired-mr", nargs="+", metavar="PATH", help="registered MR, in the order of --paired-ct")
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
    r.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), help="train.precision (auto: bf16 or "
                   "fp16 on CUDA, fp32 on CPU)")
    r.add_argument("--seed", type=int, help="random seed (train.seed; 0)")
    r.add_argument("--device", help="auto, cpu, cuda or cuda:N (train.device; under torchrun auto = cuda:LOCAL_RANK)")
    r.add_argument("--threads", type=int, help="CPU threads for torch (train.threads; 0: torch's default)")
    r.add_argument("--max-minutes", type=float, metavar="MIN", help="wall-clock budget (train.max_minutes): stop "
                   "cleanly when it is spent (summed over resumes), writing the final checkpoint and model; the "
                   "learning-rate decay then follows the clock instead of the step count")
    r.add_argument("--checkpoint-every", type=int, help="steps between resumable checkpoints (100)")
    r.add_argument("--val-every", type=int, help="steps between validations on held-out volumes (500; 0: none)")
    r.add_argument("--force", action="store_true", help="use --ct volumes that fail the CT plausibility check and "
                   "--mr volumes that look like CTs (HU statistics), with a warning; spacings outside 0.1-20 mm and "
                   "a file given as both CT and MR stay refused")
    r.add_argument("--progress", default="bar", choices=("bar", "json", "none"), help="progress display")

    m = sub.add_parser("demo", help="translate a public chest CT with the default model",
                       description="The main job in one command: fetch a public chest CT (3D Slicer's SampleData "
                       "'CTChest', by URL + SHA-256 into the user cache; offline, ../shared/data/ct/"
                       "thorax_cta_1p5mm.nii.gz when it exists), translate it with the default model and print where "
                       "the outputs are.")
    m.add_argument("--input", metavar="CT", help="use this CT instead of the sample")
    m.add_argument("-o", "--output", default="demo_output", metavar="OUT_DIR", help="output folder (default: "
                   "%(default)s)")
    m.add_argument("--offline", action="store_true", help="do not try to download the sample")
    m.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    m.add_argument("--progress", default="bar", choices=("bar", "json", "none"), help="progress display")

    s = sub.add_parser("synthesize-dataset", help="labelled CTs -> synthetic-MR training set with the same labels",
                       description="Label transfer (thesis 1.2, E3): translate every CT, copy its label map unchanged "
                       "(the synthetic MR keeps the CT's voxel grid, so the labels stay valid) and write an nnU-Net v2 "
                       "raw dataset (imagesTr/<case>_0000.nii.gz, labelsTr/<case>.nii.gz, dataset.json with channel "
                       "'MR') or a MONAI datalist. CTs and label maps are paired by case id (file name without suffix "
                       "and without _0000); unmatched files are reported. Finished cases are skipped on a rerun. Under "
                       "torchrun the cases are shared among the processes. ct2mr_dataset.json records the model "
                       "(name, version, SHA-256), the preprocessing and inference parameters and the ct2mr version.",
                       epilog="examples:\n  ct2mr synthesize-dataset --images ct/ --labels seg/ --out Dataset501_SynMR\n"
                       "  ct2mr synthesize-dataset --images ct/ --labels seg/ --out ds/ --format monai --augment 2 "
                       "--label-names names.json\n  torchrun --nproc-per-node 4 -m ct2mr synthesize-dataset --images "
                       "ct/ --labels seg/ --out ds/ --device cuda\n", formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--images", nargs="+", required=True, metavar="PATH", help="CT files or folders (HU)")
    s.add_argument("--labels", nargs="+", required=True, metavar="PATH", help="label-map files or folders")
    s.add_argument("--out", required=True, metavar="DIR", help="dataset folder (created if missing)")
    s.add_argument("--model", metavar="PATH", help="ct2mr checkpoint (default: the bundled model)")
    s.add_argument("--format", default="nnunet", choices=("nnunet", "monai"), help="layout (default: %(default)s)")
    s.add_argument("--label-names", metavar="JSON", help='label names, {"lung": 1, ...} or {"1": "lung", ...} '
                   "(default: label_<value> for every value found)")
    s.add_argument("--name", default="CT2MRSynthetic", help="dataset name (default: %(default)s)")
    s.add_argument("--augment", type=int, default=0, metavar="N", help="N extra synthetic MRs per CT with a random "
                   "bias field and Rician noise (default: 0)")
    s.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s; under torchrun "
                   "auto uses cuda:LOCAL_RANK)")
    s.add_argument("--overlap", type=float, default=0.25, help="sliding-window overlap (default: %(default)s)")
    s.add_argument("--roi-size", type=int, nargs="+", metavar="N", help="window size in voxels (default: the model's)")
    s.add_argument("--progress", default="bar", choices=("bar", "json", "none"), help="progress display")

    e = sub.add_parser("evaluate", help="FID/KID, W1, cycle and paired metrics, tables and figures of a model",
                       description="Run G and F over held-out CT and MR volumes (sliding window, as translate) and "
                       "write the thesis's evaluation (section 5 E1-E2, section 7 Tables 6/7/9, figures 5, 6, 8, 10, "
                       "11): distribution realism CT->MR and MR->CT (FID and KID on 3D patches, W1 between intensity "
                       "histograms), self-consistency (SSIM, PSNR in dB on the [-1, 1] range, MAE of x vs F(G(x)) and "
                       "y vs G(F(y)) inside the body mask), post-hoc harmonisation and the copy-CT baseline, and with "
                       "--paired the synthetic vs the real target (MAE in HU, PSNR, SSIM). Patches: N per volume of "
                       "S^3 voxels of the 1 mm grid, centres drawn uniformly inside the mask with a fixed seed, the "
                       "same positions for a volume and its translation. Default features: a fixed-seed random 3D "
                       "conv network (no download; identified by the SHA-256 of its weights in metrics.json).",
                       epilog=EXAMPLES_EVALUATE, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_evaluation_arguments(e)
    e.add_argument("--model", metavar="PATH", help="ct2mr checkpoint (.safetensors); default: the bundled model")
    e.add_argument("--out", required=True, metavar="DIR", help="output folder (created if missing)")
    e.add_argument("--name", help="model name in the tables (default: the checkpoint's)")
    e.add_argument("--warp-check", action="store_true", help="also register G(x) onto x per CT volume (B-spline, "
                   "Mattes MI; seconds to a minute each) and report the mean and p95 displacement in mm, ~0 when G "
                   "moved no anatomy (edge correlation, GMS and NMI of x and G(x) are always reported)")

    c = sub.add_parser("compare", help="compare two or more evaluated models side by side",
                       description="Read the outputs of `ct2mr evaluate` (or evaluate checkpoints first, with --ct "
                       "and --mr) and write one table, paired two-sided t-tests of every run against the first on the "
                       "per-volume metrics, and side-by-side tri-planar and histogram figures.",
                       epilog=EXAMPLES_COMPARE, formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("runs", nargs="+", metavar="RUN", help="evaluation folders (from ct2mr evaluate) or checkpoints")
    c.add_argument("--out", required=True, metavar="DIR", help="output folder (created if missing)")
    _add_evaluation_arguments(c, required=False)

    _add_qa_parser(sub)  # issue 16: QA against a registered reference MR

    i = sub.add_parser("info", help="show what a checkpoint holds", description="Print a checkpoint's metadata "
                       "(architecture, preprocessing, training summary) as JSON. Without a path: the default model.")
    i.add_argument("checkpoint", nargs="?", help="a ct2mr .safetensors checkpoint (default: the bundled model)")

    mo = sub.add_parser("models", help="list, download, import or clear models (the user cache)",
                        description="The model list (name, version, description, training data, licence, URL, "
                        "SHA-256, size; models/models.json and its JSON Schema, plus the lists in "
                        "$CT2MR_MODEL_REGISTRY or --registry) and the models in the user cache (downloaded, SHA-256 "
                        "checked, or imported from local files for offline machines). Old versions stay until cleared.",
                        epilog="examples:\n  ct2mr models list\n  ct2mr models download ct2mr-m1 --version 1.0\n"
                        "  ct2mr models import m1.safetensors --name ct2mr-m1 --version 1.0\n"
                        "  ct2mr models clear ct2mr-m1 --keep-latest\n",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    mo.add_argument("--registry", action="append", metavar="JSON", help="a further model list (same format; "
                    "repeatable)")
    mosub = mo.add_subparsers(dest="action", metavar="ACTION", required=True)
    ml = mosub.add_parser("list", help="every known model version and whether it is local")
    ml.add_argument("--json", action="store_true", help="one JSON array (with paths) instead of a table")
    md = mosub.add_parser("download", help="download a listed model into the user cache (SHA-256 checked)")
    md.add_argument("name", help="model name")
    md.add_argument("--version", help="version (default: the newest listed)")
    md.add_argument("--progress", default="bar", choices=("bar", "json", "none"), help="progress display")
    mi = mosub.add_parser("import", help="copy a local checkpoint into the user cache (offline machines)")
    mi.add_argument("file", help="a ct2mr .safetensors checkpoint")
    mi.add_argument("--name", help="model name (default: the listed name for a known SHA-256, else the "
                    "checkpoint's training name)")
    mi.add_argument("--version", help="version (default: the listed one, else local-<SHA-256 prefix>)")
    mi.add_argument("--json", action="store_true", help="print the cached model as JSON")
    mc = mosub.add_parser("clear", help="remove cached model versions (never the bundled model)")
    mc.add_argument("name", nargs="?", help="model name (default: every cached model)")
    mc.add_argument("--version", help="only this version")
    mc.add_argument("--keep-latest", action="store_true", help="keep the newest version of each model")
    return parser


# --- issue 16: trust signals (uncertainty map, out-of-distribution score, QA against a reference) ---------------

def _add_trust_arguments(t: argparse.ArgumentParser) -> None:
    """``translate --uncertainty tta|ensemble``, ``--uncertainty-passes``, ``--ood``, ``--ood-threshold``."""
    from ct2mr.inference.ood import OOD_THRESHOLD
    from ct2mr.inference.uncertainty import DEFAULT_MAX_SHIFT, DEFAULT_TTA_PASSES, UNCERTAINTY_MODES

    t.add_argument("--uncertainty", default="none", choices=UNCERTAINTY_MODES, help="also write "
                   "OUT_DIR/uncertainty.nii.gz: the voxel-wise standard deviation of G(x) (normalised MR units, on "
                   "the input's grid). tta: G(x) and G on N flipped and shifted copies of the CT (flips along x, y, "
                   f"z; shifts of 1-{DEFAULT_MAX_SHIFT} voxels), undone before aggregation; COSTS N EXTRA PASSES OF "
                   "G (--uncertainty-passes). ensemble: G(x) of every --model given (one extra pass per further "
                   "model). High spread marks where G is unstable, not where it is wrong (default: %(default)s)")
    t.add_argument("--uncertainty-passes", type=int, default=DEFAULT_TTA_PASSES, metavar="N", help="augmented "
                   "passes of --uncertainty tta, each one more pass of G (default: %(default)s)")
    t.add_argument("--ood", action="store_true", help="out-of-distribution check, before the networks run: summary "
                   "statistics of the CT (HU percentiles and lung/dense shares in the body, body extent and "
                   "cross-section, slice thickness) against those of the model's training CTs; the score (largest "
                   "standardised deviation, ct2mr.inference.ood) is printed, sent as an 'ood' event and in the done event, and "
                   "written to OUT_DIR/ood.json; above --ood-threshold a warning says the input differs from the "
                   "training CTs. About a second")
    t.add_argument("--ood-threshold", type=float, default=OOD_THRESHOLD, metavar="Z", help="score above which "
                   "--ood warns (default: %(default)s)")


def _add_qa_parser(sub) -> None:  # noqa: ANN001
    """``ct2mr qa SYNTHETIC_MR REFERENCE_MR -o DIR``."""
    q = sub.add_parser("qa", help="score a synthetic MR against a registered reference MR (MAE, PSNR, SSIM, MS-SSIM)",
                       description="QA against a reference (issue 16): the synthetic MR of `ct2mr translate` against "
                       "a real MR of the same patient registered and resampled onto the CT's grid. Inside the body "
                       "mask (of --ct, else of the reference MR, or --mask): MAE, PSNR (data range 2), 3D SSIM and "
                       "MS-SSIM (Wang et al. 2003, 5 scales) on the normalised MR scale, both images clipped to "
                       "[-1, 1] and set to -1 outside the mask (as SynthRAD2025); the reference is normalised like "
                       "the model's MR preprocessing (its own 1st-99th percentiles -> [-1, 1]). Writes OUT_DIR/"
                       "difference.nii.gz (synthetic - reference on the synthetic MR's grid), qa_metrics.json and "
                       "qa_metrics.md (the table and every definition: mask, range, clipping). A registration error "
                       "reads as a synthesis error.",
                       epilog="examples:\n  ct2mr qa out/synthetic_mr.nii.gz mr_registered.nii.gz --ct chest.nii.gz "
                       "-o qa/\n  ct2mr qa out/synthetic_mr.nii.gz mr_registered.nrrd --mask body_label.nrrd -o qa/ "
                       "--progress json\n", formatter_class=argparse.RawDescriptionHelpFormatter)
    q.add_argument("synthetic_mr", metavar="SYNTHETIC_MR", help="the synthetic MR (normalised units), e.g. "
                   "OUT_DIR/synthetic_mr.nii.gz of ct2mr translate")
    q.add_argument("reference_mr", metavar="REFERENCE_MR", help="the registered reference MR on the same grid")
    q.add_argument("-o", "--output", required=True, metavar="OUT_DIR", help="output folder (created if missing)")
    q.add_argument("--ct", metavar="CT", help="the translated CT (HU, same grid): its body mask is used")
    q.add_argument("--mask", metavar="LABELMAP", help="a label map on the same grid (non-zero = inside) instead of a "
                   "body mask")
    q.add_argument("--reference-units", default="raw", choices=("raw", "normalised"), help="raw: normalise the "
                   "reference by its percentiles; normalised: it is already in [-1, 1] (default: %(default)s)")
    q.add_argument("--mr-percentiles", type=float, nargs=2, default=(1.0, 99.0), metavar=("LOW", "HIGH"),
                   help="percentiles of the raw reference's normalisation (default: 1 99, the thesis's)")
    q.add_argument("--progress", default="none", choices=("bar", "json", "none"), help="progress display "
                   "(default: %(default)s)")


def _translate_models(args: argparse.Namespace) -> list[str]:
    """The --model paths of translate (repeatable); sets ``args.model`` to the first (or None)."""
    models = args.model if isinstance(args.model, list) else ([args.model] if args.model else [])
    args.model = models[0] if models else None
    return models


def _trust_stage_weights(args: argparse.Namespace, models: list[str]) -> dict | None:
    """Progress weights with the uncertainty passes (``None``: the default weights)."""
    mode = getattr(args, "uncertainty", "none")
    passes = args.uncertainty_passes if mode == "tta" else max(0, len(models) - 1) if mode == "ensemble" else 0
    if passes <= 0:
        return None
    from ct2mr.inference.uncertainty import stage_weights

    return stage_weights(passes)


def _trust_extensions(args: argparse.Namespace, models: list[str], settings, reporter) -> list:  # noqa: ANN001
    """The translate_file extensions of --uncertainty and --ood (issue 16), checked before any work."""
    mode = getattr(args, "uncertainty", "none")
    if len(models) > 1 and mode != "ensemble":
        raise ValueError(f"{len(models)} --model paths were given; several models are only used by --uncertainty "
                         "ensemble.")
    extensions = []
    if getattr(args, "ood", False):
        from ct2mr.inference.ood import OodCheck, describe

        def on_result(result: dict) -> None:
            reporter.event("ood", **{k: result[k] for k in ("score", "threshold", "ood_warning", "top_features",
                                                             "reference")})
            if result.get("ood_warning"):
                reporter.event("warning", message=describe(result))
            elif args.progress != "json":
                print(f"ct2mr translate: {describe(result)}", file=sys.stderr)

        extensions.append(OodCheck(args.ood_threshold, on_result))
    if mode != "none":
        from ct2mr.models.checkpoint import load_checkpoint
        from ct2mr.inference.uncertainty import UncertaintyOutput

        if mode == "ensemble" and len(models) < 2:
            raise ValueError("--uncertainty ensemble needs at least two models: give --model more than once.")
        members = [load_checkpoint(path) for path in models[1:]] if mode == "ensemble" else []
        extensions.append(UncertaintyOutput(mode, args.uncertainty_passes, members, settings))
    return extensions


def _print_trust(info: dict, outputs: dict) -> None:
    """The uncertainty and OOD lines of translate's human summary."""
    if info.get("uncertainty"):
        from ct2mr.inference.uncertainty import describe

        print(f"Uncertainty:   {outputs['uncertainty']}\n{describe(info['uncertainty'])}")
    if info.get("ood"):
        from ct2mr.inference.ood import describe

        print(f"OOD check:     {outputs['ood']}\n{describe(info['ood'])}")


def _refuse_trust_in_batch(args: argparse.Namespace, models: list[str]) -> None:
    """--uncertainty, --ood and several --model are single-CT options (for now)."""
    if getattr(args, "uncertainty", "none") != "none" or getattr(args, "ood", False) or len(models) > 1:
        raise ValueError("--uncertainty, --ood and several --model paths work on one CT at a time; run ct2mr "
                         "translate once per CT for them.")


def _qa(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ct2mr.progress import make_reporter
    from ct2mr.evaluation.reference_qa import _finite, metrics_markdown, reference_qa

    reporter = make_reporter(args.progress, {"qa": 1.0})
    try:
        with reporter.capture_warnings():
            reporter.event("start", command="qa", synthetic_mr=args.synthetic_mr, reference_mr=args.reference_mr,
                           output=args.output)
            result = reference_qa(args.synthetic_mr, args.reference_mr, args.output, args.ct, args.mask,
                                  args.reference_units, tuple(args.mr_percentiles), reporter)
    finally:
        reporter.close()
    reporter.event("done", outputs=result["outputs"], metrics=_finite(result["metrics"]), mask=result["mask"],
                   seconds=result["seconds"])
    if args.progress != "json":
        print(metrics_markdown(result))
        print(f"Written to {args.output}: {', '.join(Path(p).name for p in result['outputs'].values())}")
    return 0


def _models(args: argparse.Namespace) -> int:
    from ct2mr.models import registry
    from ct2mr.progress import make_reporter

    reg = registry.load_registry(args.registry)
    if args.action == "list":
        rows = registry.list_models(reg)
        print(json.dumps(rows, indent=2) if args.json else registry.models_table(rows))
    elif args.action == "download":
        entry = reg.get(args.name, args.version)
        _interrupt_on_sigterm()  # a front end's Cancel: the download removes its partial file itself
        reporter = make_reporter(args.progress)
        reporter.event("start", command="models download", model=entry.name, version=entry.version, url=entry.url,
                       size=entry.size)
        try:
            path = registry.download(entry, lambda done, total: reporter(
                "download", done / total if total else 0.0, f"{done / 1e6:.1f} of {total / 1e6:.1f} MB"))
        finally:
            reporter.close()
        reporter.event("done", path=str(path), model=entry.name, version=entry.version, sha256=entry.sha256)
        if args.progress != "json":
            print(path)
    elif args.action == "import":
        cached = registry.import_checkpoint(args.file, args.name, args.version)
        print(json.dumps({**cached.entry.to_dict(), "path": str(cached.path)}) if args.json
              else f"Imported {cached.entry.key}: {cached.path}")
    else:
        removed = registry.clear(args.name, args.version, args.keep_latest)
        print("\n".join(f"Removed {path}" for path in removed) or "Nothing to clear.")
    return 0


def _interrupt_on_sigterm() -> None:
    """Turn SIGTERM (a front end's Cancel) into KeyboardInterrupt, so that clean-up code (``finally``) runs."""
    import signal

    def interrupt(signum, frame):  # noqa: ANN001, ARG001
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def _translate(args: argparse.Namespace) -> int:
    from ct2mr.inference.translate import translate_file
    from ct2mr.progress import make_reporter
    from ct2mr.inference.batch import is_single_input

    inputs = list(getattr(args, "inputs", None) or [args.input])  # `ct2mr demo` sets args.input
    models = _translate_models(args)  # issue 16: --model may be repeated (ensemble)
    if not is_single_input(inputs):
        _refuse_trust_in_batch(args, models)  # issue 16
        return _translate_batch(args, inputs)
    args.input = inputs[0]
    reporter = make_reporter(args.progress, _trust_stage_weights(args, models))
    start = time.perf_counter()
    try:
        with reporter.capture_warnings():
            reporter.event("start", command="translate", input=args.input, output=args.output,
                           model=args.model or "default", device=args.device)
            settings = _inference_settings(args)
            extensions = _trust_extensions(args, models, settings, reporter)
            overwrite = getattr(args, "overwrite", None)
            if overwrite is None:  # `ct2mr demo` rewrites its own output folder
                overwrite = args.command == "demo"
            result = translate_file(args.input, args.output, args.model, settings, reporter,
                                    getattr(args, "harmonize", "none"), getattr(args, "reference_mr", None),
                                    warp_check=getattr(args, "warp_check", False), overwrite=overwrite,
                                    force=getattr(args, "force", False), extensions=extensions)
            analysis = _translate_analysis(args, result, reporter) if getattr(args, "analysis", False) else None
    finally:
        reporter.close()
    info = result["info"]
    reporter.event("done", outputs=result["outputs"], seconds=round(time.perf_counter() - start, 3),
                   **_translate_done_fields(info), analysis=analysis,
                   **{k: info[k] for k in ("uncertainty", "ood") if k in info})  # issue 16
    if args.progress != "json":
        print(f"Synthetic MR:  {result['outputs']['synthetic_mr']}\nRound-trip CT: {result['outputs']['roundtrip_ct']}"
              f"\nError map:     {result['outputs']['error_map']}\n({time.perf_counter() - start:.1f} s on "
              f"{info['device']}, mean |F(G(x)) - x| = {info['mean_error_hu']:.1f} HU)")
        if info.get("anatomy"):
            from ct2mr.evaluation.anatomy import describe

            print(describe(info["anatomy"]) + f"\nDisplacement:  {result['outputs']['displacement_mm']}")
        _print_trust(info, result["outputs"])  # issue 16
    return 0


def _inference_settings(args: argparse.Namespace):
    """InferenceSettings from the translate flags; tunes the CPU allocator for the fast path (process-wide)."""
    from ct2mr.inference.fastpath import tune_cpu_allocator
    from ct2mr.inference.translate import InferenceSettings

    fast = not getattr(args, "reference_path", False)
    if fast:
        tune_cpu_allocator()
    return InferenceSettings(roi_size=args.roi_size, overlap=args.overlap, sw_batch_size=args.sw_batch_size,
                             precision=args.precision, device=args.device, fast=fast,
                             gpu_memory_gb=getattr(args, "gpu_memory_gb", None))


def _translate_ct_window(info: dict) -> list[float]:
    """The CT window (HU) of the model that ran, for the done event (front ends display with it)."""
    from ct2mr.evaluation.translation_analysis import ct_window_of

    return list(info["ct_window"]) if info.get("ct_window") else ct_window_of(info)


def _translate_done_fields(info: dict) -> dict:
    """What the ``done`` event (one CT) and each ``case_done`` event (batch) report of a translation's ``info``:
    device, precision, model, mean error (HU), stage seconds, window batch, stitching device, fast path, GPU peak
    (MiB), anatomy (warp check) and CT window (HU). Keys a skipped batch case does not know are ``None``."""
    mean_error = info.get("mean_error_hu")
    return {"device": info.get("device"), "precision": info.get("precision"), "model": info.get("model_name"),
            "mean_error_hu": None if mean_error is None else round(mean_error, 3),
            "stage_seconds": info.get("seconds"), "sw_batch_size": info.get("sw_batch_size"),
            "stitch_device": info.get("stitch_device"), "fast": info.get("fast"),
            "gpu_peak_mib": info.get("gpu_peak_mib"), "anatomy": info.get("anatomy"),
            "ct_window": _translate_ct_window(info)}


def _translate_analysis(args: argparse.Namespace, result: dict, reporter) -> dict:  # noqa: ANN001
    """``translate --analysis``: metrics table and histograms (ct2mr.evaluation.translation_analysis) into OUT_DIR/analysis.json."""
    from ct2mr.io.images import read_image
    from ct2mr.evaluation.translation_analysis import analyze_outputs

    analysis = analyze_outputs(
        read_image(args.input), result["outputs"], result["info"], args.output, getattr(args, "reference_mr", None),
        lambda fraction, message: reporter.event("progress", stage="analysis", fraction=1.0,
                                                 stage_fraction=round(fraction, 4), message=message))
    if analysis["error"]:
        reporter.event("warning", message=f"analysis incomplete: {analysis['error']}")
    return analysis


def _translate_batch(args: argparse.Namespace, inputs: list[str]) -> int:
    from ct2mr.progress import make_reporter
    from ct2mr.inference.batch import translate_batch

    extra = {"warp_check": True} if getattr(args, "warp_check", False) else {}
    settings = _inference_settings(args)
    rank = os.environ.get("RANK", "0")
    reporter = make_reporter(args.progress)
    bar = None
    if args.progress == "bar":
        from tqdm.auto import tqdm

        def on_case(index: int, total: int, result) -> None:  # noqa: ANN001
            nonlocal bar
            if bar is None:
                bar = tqdm(total=total, unit="case", file=sys.stderr, desc=f"translate [rank {rank}]"
                           if os.environ.get("WORLD_SIZE", "1") != "1" else "translate")
            bar.set_postfix_str(f"{result.status} {result.case_id}"[:40])
            if result.status != "running":
                bar.update(1)
            elif hasattr(reporter, "bar"):  # the stage bar starts again for every case
                reporter.bar.reset(total=100)
    elif args.progress == "json":
        def on_case(index: int, total: int, result) -> None:  # noqa: ANN001
            if result.status in ("done", "skipped"):  # what a front end loads, before the case's final status
                reporter.event("case_done", index=index, total=total, case=result.case_id, input=result.input,
                               status=result.status, seconds=round(result.seconds, 3), outputs=result.outputs,
                               output_dir=os.path.join(args.output, result.case_id),
                               **_translate_done_fields(result.info), analysis=result.info.get("analysis"))
            reporter.event("case", index=index, total=total, **result.to_dict())
    else:
        on_case = None
    try:
        with reporter.capture_warnings():
            reporter.event("start", command="translate", mode="batch", inputs=inputs, output=args.output,
                           model=args.model or "default", device=args.device)
            summary = translate_batch(inputs, args.output, args.model, settings, reporter, on_case,
                                      getattr(args, "overwrite", False), getattr(args, "harmonize", "none"),
                                      getattr(args, "reference_mr", None), command="ct2mr " + shlex.join(sys.argv[1:]),
                                      force=getattr(args, "force", False),
                                      analysis=getattr(args, "analysis", False), **extra)
    finally:
        if bar is not None:
            bar.close()
        reporter.close()
    reporter.event("done", mode="batch", summary=str(summary.summary), seconds=round(summary.seconds, 3),
                   device=summary.device, **{status: summary.count(status) for status in ("done", "skipped",
                                                                                          "failed")})
    if args.progress != "json":
        print(summary.text())
    for result in summary.failed:
        print(f"ct2mr translate: error: {result.case_id} ({result.input}): {result.error}", file=sys.stderr)
    if summary.summary_error:
        print(f"ct2mr translate: error: the summary {summary.summary} could not be updated: {summary.summary_error}",
              file=sys.stderr)
    return 1 if summary.failed or summary.summary_error else 0


@contextlib.contextmanager
def _plain_warnings(command: str):
    """Show Python warnings raised inside the block as one line each: ``ct2mr COMMAND: warning: MESSAGE``."""
    import warnings

    previous = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001
        print(f"ct2mr {command}: warning: {message}", file=sys.stderr)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = previous


def _training_device_type(config) -> str:  # noqa: ANN001
    """``"cuda"`` or ``"cpu"``: where ``config.train.device`` will put the training."""
    import torch

    name = str(config.train.device)
    return "cuda" if name != "cpu" and torch.cuda.is_available() else "cpu"


def _train(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from ct2mr.checks import check_training_inputs, check_training_memory, human_bytes, input_checks
    from ct2mr.training.config import load_config, shorthand_overrides, split_overrides
    from ct2mr.training.trainer import command_line, resume_config, train_run

    moved: list[str] = []
    for flag in ("ct", "mr", "val_ct", "val_mr", "paired_ct", "paired_mr"):  # KEY=VALUE swallowed by --ct A B k=v
        if getattr(args, flag):
            paths, found = split_overrides(getattr(args, flag))
            setattr(args, flag, paths or None)
            moved += found
    overrides = shorthand_overrides(
        name=args.name, steps=args.steps, patch_size=args.patch_size, batch_size=args.batch_size, width=args.width,
        blocks=args.blocks, lr=args.lr, lambda_cyc=args.lambda_cyc, lambda_id=args.lambda_id, seed=args.seed,
        device=args.device, threads=args.threads, checkpoint_every=args.checkpoint_every, val_every=args.val_every,
        precision=args.precision, ct=args.ct, mr=args.mr, val_ct=args.val_ct, val_mr=args.val_mr,
        paired_ct=args.paired_ct, paired_mr=args.paired_mr, split_file=args.split_file, max_minutes=args.max_minutes,
    ) + moved + list(args.overrides) + list(args.set_overrides)
    if args.resume:
        config = resume_config(args.out, overrides)
    else:
        config = load_config(args.preset or "m1", overrides)
    # checks before the work (ct2mr.checks): a file in both domains, a step too large for the memory, fp16 on a CPU
    check_training_inputs(config)
    estimate = check_training_memory(config)
    logging.getLogger("ct2mr.checks").info("training step: about %s (%s)", human_bytes(estimate.total_bytes),
                                           estimate.detail)
    if config.train.precision == "fp16" and _training_device_type(config) == "cpu":
        from ct2mr.inference.translate import CPU_FP16_NOTE

        print(f"ct2mr train: note: {CPU_FP16_NOTE}", file=sys.stderr)
    bar = None
    rank0 = os.environ.get("RANK", "0") == "0"
    if args.progress == "bar" and rank0:
        from tqdm.auto import tqdm

        def progress(step: int, total: int, info: dict) -> None:
            nonlocal bar
            if bar is None:  # created at the first step, so that loading the volumes does not count in the rate
                bar = tqdm(total=total, initial=step, unit="step", file=sys.stderr, desc=f"train {config.preset}")
            bar.update(step - bar.n)
            bar.set_postfix(cyc=f"{info['cycle']:.3f}", G=f"{info['G_adv']:.3f}",
                            D=f"{info['D_MR'] + info['D_CT']:.3f}", patch_s=f"{info['patches_per_s']:.2f}",
                            refresh=False)
            bar.refresh()
    elif args.progress == "json" and rank0:
        def progress(step: int, total: int, info: dict) -> None:
            print(json.dumps({"event": "progress", "stage": "train", "step": step, "fraction": step / total,
                              **{k: round(v, 5) for k, v in info.items()}}), flush=True)
    else:
        progress = None
    try:
        with input_checks(getattr(args, "force", False)), _plain_warnings("train"):
            path = train_run(config, args.out, args.resume, progress, command_line(argv))
    finally:
        if bar is not None:
            bar.close()
    if rank0:
        print(f"Checkpoint: {path}" if args.progress != "json" else json.dumps({"event": "done",
                                                                                "checkpoint": str(path)}))
    return 0


def _preprocess(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from ct2mr.preprocessing.batch import preprocess_batch
    from ct2mr.preprocessing.pipeline import PreprocessingConfig

    config = PreprocessingConfig(target_spacing=args.spacing, k=args.k, ct_window=tuple(args.ct_window),
                                 mr_percentiles=tuple(args.mr_percentiles), n4=args.n4, n4_shrink=args.n4_shrink)
    bar = None
    if args.progress == "bar":
        from tqdm.auto import tqdm

        def progress(done: int, total: int, result) -> None:  # noqa: ANN001
            nonlocal bar
            if bar is None:  # created at the first volume, so that up-front errors stay one line
                bar = tqdm(total=total, unit="vol", file=sys.stderr, desc=f"preprocess {args.modality}")
            bar.update(1)
            bar.set_postfix_str(f"{result.status} {result.name}"[:40])
            for message in result.warnings:
                bar.write(f"ct2mr preprocess: warning: {result.name}: {message}", file=sys.stderr)
            if result.status == "failed":
                bar.write(f"ct2mr preprocess: FAILED {result.name}: {result.message}", file=sys.stderr)
    elif args.progress == "json":
        def progress(done: int, total: int, result) -> None:  # noqa: ANN001
            print(json.dumps({"event": "progress", "stage": "preprocess", "fraction": round(done / total, 4),
                              "volume": result.to_dict()}), flush=True)
    else:
        def progress(done: int, total: int, result) -> None:  # noqa: ANN001
            for message in result.warnings:
                print(f"ct2mr preprocess: warning: {result.name}: {message}", file=sys.stderr)
    try:
        summary = preprocess_batch(args.inputs, args.out, args.modality, config, args.select, args.jobs, args.force,
                                   progress, "ct2mr " + shlex.join(argv))
    finally:
        if bar is not None:
            bar.close()
    if args.progress == "json":
        print(json.dumps({"event": "done", "out": str(summary.out_dir), "seconds": round(summary.seconds, 3),
                          **{status: summary.count(status) for status in ("ok", "skipped", "failed")},
                          "flagged": [r.name for r in summary.flagged], "log": str(summary.log)}), flush=True)
    else:
        print(summary.text())
    return 1 if summary.failed else 0


def _qc(args: argparse.Namespace) -> int:
    from ct2mr.evaluation.qc import run_qc

    report = run_qc(args.dirs, args.out, figures=not args.no_figures, examples=args.example)
    print(report.markdown)
    print(f"Written to {report.out_dir}: {', '.join(p.name for p in report.files)}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ct2mr.io.sampledata import demo_ct

    if args.input:
        ct, how = Path(args.input), "--input"
    else:
        fallbacks = [Path.cwd().parent / "shared" / "data" / "ct" / "thorax_cta_1p5mm.nii.gz"]
        if os.environ.get("CT2MR_DEMO_CT"):
            fallbacks.insert(0, Path(os.environ["CT2MR_DEMO_CT"]))
        ct, how = demo_ct(fallbacks, offline=args.offline)
    print(f"Demo CT: {ct} ({how})", file=sys.stderr)
    args.input, args.model, args.overlap, args.roi_size, args.sw_batch_size, args.precision = (
        str(ct), None, 0.25, None, None, "auto")
    status = _translate(args)
    if status == 0:
        print(f"Overview:      {_demo_overview(Path(args.input), Path(args.output))}")
    return status


def _demo_overview(ct_path, out_dir):
    """Write ``OUT/overview.png`` (CT, G(x), F(G(x)), error map, tri-planar) and return its path."""
    import SimpleITK as sitk

    from ct2mr.models.checkpoint import load_checkpoint
    from ct2mr.evaluation.figures import plot_translation_overview
    from ct2mr.io.images import read_image

    outputs = [sitk.ReadImage(str(out_dir / name)) for name in
               ("synthetic_mr.nii.gz", "roundtrip_ct.nii.gz", "error_map.nii.gz")]
    checkpoint = load_checkpoint(None)
    window = checkpoint.preprocessing.ct_window
    return plot_translation_overview(out_dir / "overview.png", read_image(ct_path), *outputs, ct_window=window,
                                     title=f"ct2mr demo: {ct_path.name} with {checkpoint.name}")


def _synthesize_dataset(args: argparse.Namespace) -> int:
    from ct2mr.inference.labeltransfer import synthesize_dataset
    from ct2mr.inference.translate import InferenceSettings, cluster_device

    settings = InferenceSettings(roi_size=args.roi_size, overlap=args.overlap, device=cluster_device(args.device))
    bar, progress = None, None
    if args.progress == "bar":
        from tqdm.auto import tqdm

        bar = tqdm(unit="case", file=sys.stderr, desc="synthesize")

        def progress(done: int, total: int, case: str) -> None:
            bar.total = total
            bar.update(1)
            bar.set_postfix_str(case)
    elif args.progress == "json":
        def progress(done: int, total: int, case: str) -> None:
            print(json.dumps({"event": "progress", "stage": "case", "fraction": done / total, "case": case}),
                  flush=True)
    try:
        report = synthesize_dataset(args.images, args.labels, args.out, args.model, args.format, args.label_names,
                                    settings, args.augment, args.name, progress)
    finally:
        if bar is not None:
            bar.close()
    if args.progress == "json":
        print(json.dumps({"event": "done", "index": str(report.index), "failed": [r.case for r in report.failed],
                          "unmatched_images": report.unmatched_images, "unmatched_labels": report.unmatched_labels}))
    else:
        print(report.summary())
    return 1 if report.failed else 0


def _add_evaluation_arguments(p: argparse.ArgumentParser, required: bool = True) -> None:
    """Options shared by ``evaluate`` and ``compare`` (which evaluates checkpoints with them)."""
    p.add_argument("--ct", nargs="+", required=required, metavar="PATH", help="held-out CT files or folders (HU, "
                   "or ct2mr preprocess outputs)")
    p.add_argument("--mr", nargs="+", required=required, metavar="PATH", help="held-out MR files or folders (4D "
                   "series split)")
    p.add_argument("--paired", action="store_true", help="the i-th CT and the i-th MR (sorted paths) are registered "
                   "scans of one patient: also compare synthetic vs real target")
    p.add_argument("--mask", default="body", choices=("body", "none"), help="where metrics are taken: the body "
                   "mask, or every voxel but the padding (default: %(default)s)")
    p.add_argument("--patch-size", type=int, default=32, metavar="S", help="FID/KID patch side in voxels of the 1 mm "
                   "grid (default: %(default)s)")
    p.add_argument("--patches-per-volume", type=int, default=64, metavar="N", help="FID/KID patches per volume "
                   "(default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of patch sampling, KID subsets and the random features "
                   "(default: %(default)s)")
    p.add_argument("--features", default="random", choices=("random", "medicalnet"), help="feature extractor: a "
                   "fixed-seed random 3D conv network (no download), or MedicalNet ResNet-10 with --feature-weights "
                   "(default: %(default)s)")
    p.add_argument("--feature-weights", metavar="PATH_OR_URL", help="MedicalNet weights: a local .pth/.safetensors "
                   "file, or a URL downloaded once into the user cache (needs --feature-sha256)")
    p.add_argument("--feature-sha256", metavar="HEX", help="SHA-256 of --feature-weights")
    p.add_argument("--kid-subsets", type=int, default=100, help="KID subsets (default: %(default)s)")
    p.add_argument("--kid-subset-size", type=int, default=1000, help="KID samples per subset, capped by the set sizes "
                   "(default: %(default)s)")
    p.add_argument("--harmonize", nargs="+", default=["histogram", "nyul", "zscore"],
                   choices=("none", "histogram", "nyul", "zscore"), help="post-hoc harmonisations scored on G(x) "
                   "(default: histogram nyul zscore; none: no harmonised rows)")
    p.add_argument("--reference-mr", nargs="+", metavar="PATH", help="reference MR(s) for harmonisation (default: the "
                   "--mr set itself, which is optimistic)")
    p.add_argument("--no-baselines", action="store_true", help="do not score the copy-CT (identity) baseline")
    p.add_argument("--no-figures", action="store_true", help="tables only")
    p.add_argument("--figure-volumes", type=int, default=1, metavar="N", help="CT volumes with tri-planar and "
                   "round-trip figures (default: %(default)s)")
    p.add_argument("--no-tensorboard", action="store_true", help="do not write TensorBoard events")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    p.add_argument("--overlap", type=float, default=0.25, help="sliding-window overlap (default: %(default)s)")
    p.add_argument("--roi-size", type=int, nargs="+", metavar="N", help="window size in voxels (default: the model's)")
    p.add_argument("--sw-batch-size", type=int, default=None, help="windows per forward pass (default: chosen from "
                   "the free GPU memory, 1 on the CPU)")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"), help="autocast precision")
    p.add_argument("--progress", default="bar", choices=("bar", "json", "none"), help="progress display")


def _evaluation_settings(args: argparse.Namespace):
    from ct2mr.evaluation.evaluate import EvaluationConfig
    from ct2mr.inference.translate import InferenceSettings

    config = EvaluationConfig(
        patch_size=args.patch_size, patches_per_volume=args.patches_per_volume, seed=args.seed, features=args.features,
        feature_weights=args.feature_weights, feature_sha256=args.feature_sha256, kid_subsets=args.kid_subsets,
        kid_subset_size=args.kid_subset_size, mask=args.mask, harmonize=tuple(args.harmonize),
        reference_mr=tuple(args.reference_mr or ()), baselines=not args.no_baselines, paired=args.paired,
        figures=not args.no_figures, figure_volumes=args.figure_volumes, tensorboard=not args.no_tensorboard,
        warp_check=getattr(args, "warp_check", False))
    settings = InferenceSettings(roi_size=args.roi_size, overlap=args.overlap, sw_batch_size=args.sw_batch_size,
                                 precision=args.precision, device=args.device)
    return config, settings


def _evaluate(args: argparse.Namespace) -> int:
    from ct2mr.evaluation.evaluate import evaluate
    from ct2mr.progress import make_reporter

    config, settings = _evaluation_settings(args)
    reporter = make_reporter(args.progress)
    try:
        with reporter.capture_warnings():
            result = evaluate(args.model, args.ct, args.mr, args.out, config, settings, reporter, args.name)
    finally:
        reporter.close()
    reporter.event("done", out=str(result.out_dir), files=[str(p) for p in result.files])
    if args.progress != "json":
        print(result.markdown)
        print(f"Written to {result.out_dir}: {', '.join(p.name for p in result.files)}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from ct2mr.evaluation.evaluate import compare
    from ct2mr.progress import make_reporter

    config, settings = _evaluation_settings(args)
    reporter = make_reporter(args.progress)
    try:
        with reporter.capture_warnings():
            result = compare(args.runs, args.out, args.ct, args.mr, config, settings, reporter)
    finally:
        reporter.close()
    reporter.event("done", out=args.out, files=[str(p) for p in result["files"]])
    if args.progress != "json":
        print(result["markdown"])
        print(f"Written to {args.out}: {', '.join(p.name for p in result['files'])}")
    return 0


def _info(args: argparse.Namespace) -> int:
    from ct2mr.io.cache import sha256sum
    from ct2mr.models.checkpoint import default_model_path, read_metadata

    path = args.checkpoint or default_model_path()
    meta = read_metadata(path)
    meta["path"], meta["sha256"] = str(path), sha256sum(path)
    print(json.dumps(meta, indent=2))
    return 0


#: OpenMP's wait policy for the command's torch threads, unless the environment sets one (issue 13). Measured on the
#: 2-core machine (benchmarks/RESULTS.md, M1 width 8, 48^3, 2 threads): two training processes side by side take 4.4
#: s per step each with the default spinning threads and 2.8 s with PASSIVE (quiet: 1.38 s vs 1.68 s), so a run
#: degrades gracefully on a shared machine; OMP_WAIT_POLICY=ACTIVE gives back the quiet-machine 20 %.
OPENMP_WAIT_POLICY = "PASSIVE"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``ct2mr`` command; returns the exit code (0 success, 1 error, 2 usage error)."""
    os.environ.setdefault("OMP_WAIT_POLICY", OPENMP_WAIT_POLICY)  # before torch (and its OpenMP) is loaded
    from ct2mr.models.checkpoint import CheckpointError
    from ct2mr.io.images import ImageReadError

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not (args.command == "train" and all("=" in e and not e.startswith("-") for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "train":  # KEY=VALUE overrides may sit anywhere on the line
        args.overrides = list(args.overrides) + extra
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        if args.command == "preprocess":
            return _preprocess(args, argv)
        if args.command == "qc":
            return _qc(args)
        if args.command == "translate":
            return _translate(args)
        if args.command == "train":
            return _train(args, argv)
        if args.command == "evaluate":
            return _evaluate(args)
        if args.command == "compare":
            return _compare(args)
        if args.command == "qa":
            return _qa(args)
        if args.command == "synthesize-dataset":
            return _synthesize_dataset(args)
        if args.command == "demo":
            return _demo(args)
        if args.command == "models":
            return _models(args)
        return _info(args)
    except (FileNotFoundError, ImageReadError, CheckpointError, ValueError, RuntimeError, OSError,
            FloatingPointError) as exc:
        message = str(exc) or type(exc).__name__
        if getattr(args, "progress", None) == "json":
            print(json.dumps({"event": "error", "message": message, "type": type(exc).__name__}), flush=True)
        print(f"ct2mr {args.command}: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"ct2mr {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
