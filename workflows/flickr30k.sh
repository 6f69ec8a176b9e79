#!/usr/bin/env bash
# Flickr30K with the Karpathy split (29,000 training, 1,014 val, 1,000 test images):
# region features, caption parses, graphs, CMSEI training and evaluation.
#
#   bash workflows/flickr30k.sh                  # every step in order
#   bash workflows/flickr30k.sh train eval       # only the named steps, in the order given
#
# Steps: extract captions graphs train eval. Each prep step resumes where an earlier run
# stopped, so rerun the same command after an interruption.
#
# Set the paths below, or export them before running. The script downloads nothing: it
# reads your local copies and stops with a message when one is missing.
# On a Ray cluster, export CMSEI_RAY_ADDRESS=auto (workflows/slurm-ray.sbatch does) and
# keep every path on storage that all nodes share.
set -euo pipefail

# Inputs: your local copies.
FLICKR30K_IMAGES="${FLICKR30K_IMAGES:-/path/to/flickr30k-images}"    # the 31,783 JPEGs, one folder
KARPATHY_JSON="${KARPATHY_JSON:-/path/to/dataset_flickr30k.json}"    # Karpathy split file
DETECTOR_WEIGHTS="${DETECTOR_WEIGHTS:-/path/to/faster_rcnn_from_caffe_attr.pkl}"
RELATIONS_CKPT="${RELATIONS_CKPT:-}"                                 # from workflows/visual-genome.sh; empty: no scene graphs

# Outputs.
DATA="${DATA:-/path/to/cmsei-data/flickr30k}"
RUN="${RUN:-/path/to/cmsei-runs/flickr30k}"

# Options.
DETECTOR="${DETECTOR:-butd-r101-c4}"
NUM_BOXES="${NUM_BOXES:-36}"                   # regions per image, as in SCAN's precomputed features
CMSEI_RAY_ADDRESS="${CMSEI_RAY_ADDRESS:-}"     # empty: Ray on this machine only; "auto": the cluster of this node
CMSEI_RESOURCES="${CMSEI_RESOURCES:-}"         # optional --resources YAML (workers, cpus/gpus/memory per worker)
EXTRACT_ARGS="${EXTRACT_ARGS:-}"               # more cmsei-prep extract options, e.g. "--batch-size 4"
EVAL_ARGS="${EVAL_ARGS:-}"                     # more cmsei-eval options, e.g. "--checkpoint last"
TRAIN_ARGS="${TRAIN_ARGS:-}"                   # more cmsei-train options, e.g. "--epochs 30"
BIN="${BIN:-}"                                 # folder of the cmsei executables; empty: found on PATH

source "$(dirname "${BASH_SOURCE[0]}")/recipe-lib.sh"

step_extract() {
    require "FLICKR30K_IMAGES" "$FLICKR30K_IMAGES"
    require_weights "DETECTOR_WEIGHTS" "$DETECTOR_WEIGHTS"
    run_prep extract --images "$FLICKR30K_IMAGES" --out "$DATA" --detector "$DETECTOR" \
        --weights "$DETECTOR_WEIGHTS" --num-boxes "$NUM_BOXES" $EXTRACT_ARGS
}

step_captions() {
    require "KARPATHY_JSON" "$KARPATHY_JSON"
    run_prep captions --captions "$KARPATHY_JSON" --out "$DATA"
}

step_graphs() {
    run_graphs "$DATA" "$RELATIONS_CKPT"
}

step_train() {
    run_tool cmsei-train --data "$DATA" --out "$RUN" --train-split train --val-split val \
        $(scene_graph_train_args "$RELATIONS_CKPT") $TRAIN_ARGS
}

step_eval() {
    run_tool cmsei-eval --run "$RUN" --split test --protocol 1k $EVAL_ARGS
}

run_steps "extract captions graphs train eval" "$@"
