#!/usr/bin/env bash
# Trains a default-model candidate, NAME (default ct2mr-default-v1.5) in OUT (default runs/default-v1.5); whether it is
# bundled, and the anatomy figures, are in training/ct2mr/models/MODEL_CARD.md (with each bundled model's command).
# Run from the repository root after `make setup`, with ../shared/data beside the repository.
# Recipe: preset law (issue 13: the generators' intensity curves start at an intensity law, then the SC objective
# without histogram or identity terms; CT window [-1000, 1000] HU). G's law is v1.0's unpaired fit on this data
# (LAW_FILE, default training/ct2mr/models/laws/ct2mr-default-v1.0.intensity_law.json: 41 knots, curvature weight
# 1e-2; on this real data the law preset's own 1e-4 fit amplifies CT noise, edge correlation 0.32 against 0.67;
# LAW_FILE= fits anew), F's curve starts at the inverse of G's law, and only G is anchored to its law (the preset's
# model.law.f_start=inverse and anchor_f=0), so that F learns to undo G. PRESET=sc gives the earlier candidate; v1.0's
# overrides are in the model card.
# CPU, THREADS threads (default 2; a resumed run keeps its own unless THREADS is set), a wall-clock budget of MINUTES
# (default 50); resumable: rerun the command to continue a killed run, or with a larger MINUTES to train a finished
# one longer (MINUTES counts all runs together; the learning rate follows the new budget; a finished run that has
# had MINUTES already is left as it is). chest_ct_lung2.nrrd is held out for validation and for the anatomy checks
# of the model card. The checkpoint lands in OUT/model.safetensors.
set -euo pipefail
MINUTES="${MINUTES:-50}"
OUT="${OUT:-runs/default-v1.5}"
NAME="${NAME:-ct2mr-default-v1.5}"
LAW_FILE="${LAW_FILE-training/ct2mr/models/laws/ct2mr-default-v1.0.intensity_law.json}"
PRESET="${PRESET:-law}"
RECIPE=()  # the law preset itself starts F at G's inverse and anchors G alone
if [ "$PRESET" = law ] && [ -n "$LAW_FILE" ]; then
  RECIPE+=(model.law.knots=41 model.generator.extra.law_knots=41 "model.law.file=$LAW_FILE")
fi
DATA=../shared/data
if [ -f "$OUT/state.json" ]; then  # killed or finished: continue it up to MINUTES in all
  if [ -f "$OUT/model.safetensors" ] && .venv/bin/python -c 'import json, sys
sys.exit(json.load(open(sys.argv[1]))["elapsed_s"] < 60 * float(sys.argv[2]))' "$OUT/state.json" "$MINUTES"; then
    echo "$OUT/model.safetensors has trained for $MINUTES minutes or more; a larger MINUTES trains it longer."
    exit 0
  fi
  exec .venv/bin/ct2mr train --out "$OUT" --resume "train.max_minutes=$MINUTES" ${THREADS:+--threads "$THREADS"} "$@"
fi
exec .venv/bin/ct2mr train --preset "$PRESET" \
  --ct "$DATA/ct/thorax_cta_1p5mm.nii.gz" "$DATA/ct/thorax_cta_heart_crop_1p5mm.nii.gz" \
       "$DATA/ct/abdomen_pelvis_ct_3mm.nii.gz" "$DATA/ct/upper_abdomen_ct_dicom" \
  --val-ct "$DATA/ct/chest_ct_lung2.nrrd" \
  --mr "$DATA/mr/cardiac_cine_sax_20phases_4d.nii.gz" "$DATA/mr/upper_abdomen_mr_3mm.nii.gz" \
  data.val_fraction=0.0 \
  --out "$OUT" --name "$NAME" \
  --steps 100000 --max-minutes "$MINUTES" --seed 0 --threads "${THREADS:-2}" \
  --checkpoint-every 25 --val-every 200 'train.val_crop=[96,96,96]' train.snapshot_minutes=15 "${RECIPE[@]}" "$@"
