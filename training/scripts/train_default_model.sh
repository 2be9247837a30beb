#!/usr/bin/env bash
# Reproduces the bundled default model ct2mr-default-v0.1 (training/ct2mr/models/).
# Run from the repository root after `make setup`, with ../shared/data beside the repository.
# CPU, 2 cores, about 40 minutes. The checkpoint lands in runs/default-v0.1/model.safetensors.
set -euo pipefail
.venv/bin/ct2mr train \
  --ct ../shared/data/ct \
  --mr ../shared/data/mr/cardiac_cine_sax_20phases_4d.nii.gz ../shared/data/mr/upper_abdomen_mr_3mm.nii.gz \
  --out runs/default-v0.1 --name ct2mr-default-v0.1 \
  --steps 500 --patch-size 48 --width 8 --blocks 9 --seed 0 --threads 1 --checkpoint-every 50 "$@"
