#!/usr/bin/env bash
# Reproduces the bundled default model ct2mr-default-v0.2 (training/ct2mr/models/).
# Run from the repository root after `make setup`, with ../shared/data beside the repository.
# CPU, 1 thread, about 25 minutes on the project's 2-core machine. The checkpoint lands in
# runs/default-v0.2/model.safetensors. chest_ct_lung2.nrrd is held out for validation (the seeded 20 % split).
set -euo pipefail
.venv/bin/ct2mr train --preset m1 \
  --ct ../shared/data/ct \
  --mr ../shared/data/mr/cardiac_cine_sax_20phases_4d.nii.gz ../shared/data/mr/upper_abdomen_mr_3mm.nii.gz \
  --out runs/default-v0.2 --name ct2mr-default-v0.2 \
  --steps 600 --patch-size 48 --width 8 --blocks 9 --seed 0 --threads 1 \
  --checkpoint-every 50 --val-every 100 train.val_crop=[96,96,96] "$@"
