#!/usr/bin/env bash
# The demo behind `make demo`: synthetic scenes through every stage, then training and
# evaluation of a small CMSEI model. Runs on a CPU in a few minutes.
# Usage: workflows/demo.sh VENV_BIN OUT_DIR
set -euo pipefail
BIN=${1:-.venv/bin}
OUT=${2:-demo}
SCENES="$OUT/scenes"
DATA="$OUT/data"
RUN="$OUT/run"

"$BIN/cmsei-prep" synth --out "$SCENES" --images 160 --seed 0 --overwrite

# Features pooled at the ground-truth boxes, so region k is annotated object k.
"$BIN/cmsei-prep" extract --images "$SCENES/images" --out "$DATA" --detector tiny --weights untrained \
    --boxes "$SCENES/annotations.json" --shard-size 64 --overwrite
"$BIN/cmsei-prep" captions --captions "$SCENES/captions.jsonl" --out "$DATA" --vocab-threshold 1 --overwrite
"$BIN/cmsei-prep" train-relations --data "$DATA" --annotations "$SCENES/annotations.json" \
    --out "$OUT/relations.pt" --epochs 5 --device cpu
"$BIN/cmsei-prep" graphs --data "$DATA" --relations "$OUT/relations.pt" --top-k 25 --overwrite
"$BIN/cmsei-prep" verify "$DATA"
"$BIN/cmsei-prep" inspect "$DATA"
"$BIN/cmsei-prep" show --data "$DATA" --image scene_00000.png --caption 0 --out "$OUT/scene_00000.png"

"$BIN/cmsei-train" --data "$DATA" --out "$RUN" --overwrite --epochs 3 --batch-size 32 --embed-size 128 \
    --holdout-fraction 0.2 --device cpu --no-progress
"$BIN/cmsei-eval" --run "$RUN" --split test
echo "demo finished: dataset in $DATA, run in $RUN, picture in $OUT/scene_00000.png"
