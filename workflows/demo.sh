#!/usr/bin/env bash
# The demo behind `make demo`: synthetic scenes through every stage that is available.
# Usage: workflows/demo.sh VENV_BIN OUT_DIR
set -euo pipefail
BIN=${1:-.venv/bin}
OUT=${2:-demo}

"$BIN/cmsei-prep" synth --out "$OUT/scenes" --images 48 --seed 0
"$BIN/cmsei-prep" extract --images "$OUT/scenes/images" --out "$OUT/data" \
    --detector tiny --weights untrained --shard-size 16
"$BIN/cmsei-prep" verify "$OUT/data"
"$BIN/cmsei-prep" inspect "$OUT/data"
