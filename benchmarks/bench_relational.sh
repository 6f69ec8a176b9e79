#!/usr/bin/env bash
# Relational retrieval benchmark: can CMSEI tell apart images that differ only in relations?
#
# Usage: benchmarks/bench_relational.sh [VENV_BIN] [OUT_DIR]
#
# 1. `synth --paired` renders 2,000 training scenes and 200 test scenes (1,000 captions). In
#    the pairs, both images hold the same shapes and only the relations differ, and each
#    caption states a relation that is false in the partner image.
# 2. `extract --boxes` pools tiny, untrained detector features at the ground-truth boxes.
# 3. `captions` parses the captions; the test captions get the split name "test".
# 4. `train-relations` trains the relation predictor on the training scenes, and `graphs`
#    writes spatial graphs and the top-25 predicted scene-graph triplets for both folders.
# 5. `cmsei-train` trains the full model, each ablation and the SCAN-style baseline, and
#    `cmsei-eval` scores each on the 200 test images.
#
# The sizes below (d = 128, 4 epochs of 90 steps of 32 pairs) keep all six training runs
# within about 20 minutes on 2 busy CPU cores. Set the variables to change them, for example
# EMBED_SIZE=1024 EPOCHS=20 MAX_STEPS= on a GPU (an empty MAX_STEPS runs whole epochs).
set -euo pipefail

BIN=${1:-.venv/bin}
OUT=${2:-bench-relational}
PY="$BIN/python"
TRAIN_IMAGES=${TRAIN_IMAGES:-2000}
TEST_IMAGES=${TEST_IMAGES:-200}
SIZE=${SIZE:-128}
EMBED_SIZE=${EMBED_SIZE:-128}
WORD_DIM=${WORD_DIM:-64}
EPOCHS=${EPOCHS:-4}
BATCH_SIZE=${BATCH_SIZE:-32}
MAX_STEPS=${MAX_STEPS-90}
LR=${LR:-5e-4}
VAL_IMAGES=${VAL_IMAGES:-100}
# One torch thread: on a machine whose cores are shared, 2 threads were several times slower.
THREADS=${THREADS:-1}
RUNS=${RUNS:-runs}
VARIANTS=${VARIANTS-"full no-spatial-graph no-semantic-graph no-interaction no-cross-level baseline"}

prep() { "$PY" -m pipeline.cli "$@"; }
loadavg() { cut -d' ' -f1-3 /proc/loadavg; }

mkdir -p "$OUT"
echo "load average at start: $(loadavg)" | tee "$OUT/load.txt"

if [[ ! -f "$OUT/relations.pt" ]]; then
    prep synth --out "$OUT/scenes-train" --images "$TRAIN_IMAGES" --seed 1 --paired --size "$SIZE" --overwrite
    prep synth --out "$OUT/scenes-test" --images "$TEST_IMAGES" --seed 2 --paired --size "$SIZE" --overwrite
    for part in train test; do
        prep extract --images "$OUT/scenes-$part/images" --out "$OUT/$part" --detector tiny --weights untrained \
            --boxes "$OUT/scenes-$part/annotations.json" --overwrite
    done
    prep captions --captions "$OUT/scenes-train/captions.jsonl" --out "$OUT/train" --split train --overwrite
    prep captions --captions "$OUT/scenes-test/captions.jsonl" --out "$OUT/test" --split test --overwrite
    prep train-relations --data "$OUT/train" --annotations "$OUT/scenes-train/annotations.json" \
        --out "$OUT/relations.tmp.pt" --report "$OUT/relations-report.json"
    for part in train test; do
        prep graphs --data "$OUT/$part" --relations "$OUT/relations.tmp.pt" --top-k 25 --overwrite
    done
    mv "$OUT/relations.tmp.pt" "$OUT/relations.pt"
fi
echo "load average after data preparation: $(loadavg)" | tee -a "$OUT/load.txt"

for variant in $VARIANTS; do
    case "$variant" in
        full) flags=() ;;
        baseline) flags=(--baseline) ;;
        *) flags=("--$variant") ;;
    esac
    run="$OUT/$RUNS/$variant"
    if [[ ! -f "$run/eval-test.json" ]]; then
        "$PY" -m cmsei_model.cli_train --data "$OUT/train" --out "$run" --overwrite --no-progress \
            --embed-size "$EMBED_SIZE" --word-dim "$WORD_DIM" --epochs "$EPOCHS" --lr "$LR" \
            --batch-size "$BATCH_SIZE" ${MAX_STEPS:+--max-steps-per-epoch "$MAX_STEPS"} \
            --val-max-images "$VAL_IMAGES" --no-gradient-checkpointing --threads "$THREADS" --loader-workers 1 \
            "${flags[@]}"
        "$PY" -m cmsei_model.cli_eval --run "$run" --data "$OUT/test" --split test --loader-workers 1 \
            --threads "$THREADS" --json > "$run/eval-stdout.json"
    fi
    echo "load average after $variant: $(loadavg)" | tee -a "$OUT/load.txt"
done

"$PY" - "$OUT/$RUNS" $VARIANTS <<'PYTHON'
"""Collect the test metrics and training times of every variant into summary.md and summary.json."""
import json
import sys
from pathlib import Path

out = Path(sys.argv[1])
rows = []
for variant in sys.argv[2:]:
    run = out / variant
    result = json.loads((run / "eval-test.json").read_text())
    epochs = json.loads((run / "metrics.json").read_text())["epochs"]
    metrics = result["metrics"]
    rows.append({
        "variant": variant,
        **{name: metrics[name] for name in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")},
        "best_epoch": result["epoch"],
        "train_minutes": sum(row["train_seconds"] + row["val_seconds"] for row in epochs) / 60,
    })
lines = ["| variant | i2t R@1 | R@5 | R@10 | t2i R@1 | R@5 | R@10 | rSum | best epoch | train min |",
         "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
for row in rows:
    values = [row[name] for name in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")]
    lines.append(f"| {row['variant']} | " + " | ".join(f"{value:.1f}" for value in values)
                 + f" | {row['best_epoch']} | {row['train_minutes']:.1f} |")
total = sum(row["train_minutes"] for row in rows)
lines.append("")
lines.append(f"total training and validation time: {total:.1f} min")
(out / "summary.md").write_text("\n".join(lines) + "\n")
(out / "summary.json").write_text(json.dumps(rows, indent=2) + "\n")
print("\n".join(lines))
PYTHON
