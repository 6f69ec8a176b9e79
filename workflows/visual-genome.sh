#!/usr/bin/env bash
# Visual Genome: regions pooled at the annotated object boxes, the relation predictor
# that `cmsei-prep graphs --relations` uses for COCO and Flickr30K, and optionally a
# CMSEI model on region descriptions.
#
#   bash workflows/visual-genome.sh                       # every step in order
#   bash workflows/visual-genome.sh extract relations     # only the named steps
#
# Steps: extract relations graphs captions train eval.
# - extract pools features at the boxes of VG_ANNOTATIONS (extract --boxes), so region k
#   of an image is annotated object k.
# - relations trains the predictor and writes RELATIONS_CKPT; pass that path to
#   workflows/coco.sh and workflows/flickr30k.sh as RELATIONS_CKPT.
# - graphs labels the Visual Genome regions with it.
# - captions, train and eval run only when VG_CAPTIONS names a caption file, for example
#   the region descriptions written as JSON lines {"image": ..., "caption": ...}.
#
# VG_ANNOTATIONS is the annotations.json layout of `cmsei-prep synth`: images[] with
# image (the id under VG_IMAGES, e.g. VG_100K/1.jpg), objects[] (box, label) and
# relations[] (subject, predicate, object). The toolkit has no converter from Visual
# Genome's objects.json and relationships.json, so write that file yourself.
#
# Set the paths below, or export them before running. The script downloads nothing: it
# reads your local copies and stops with a message when one is missing.
set -euo pipefail

# Inputs: your local copies.
VG_IMAGES="${VG_IMAGES:-/path/to/visual-genome}"                    # folder with VG_100K/ and VG_100K_2/
VG_ANNOTATIONS="${VG_ANNOTATIONS:-/path/to/vg-annotations.json}"    # boxes, labels, relations (see above)
VG_SGG_DICTS="${VG_SGG_DICTS-/path/to/VG-SGG-dicts-with-attri.json}"   # predicate vocabulary (VG150); empty: the predicates of VG_ANNOTATIONS
VG_CAPTIONS="${VG_CAPTIONS:-}"                                      # optional caption file; empty: no retrieval model
DETECTOR_WEIGHTS="${DETECTOR_WEIGHTS:-/path/to/faster_rcnn_from_caffe_attr.pkl}"

# Outputs.
DATA="${DATA:-/path/to/cmsei-data/visual-genome}"
RELATIONS_CKPT="${RELATIONS_CKPT:-/path/to/cmsei-data/relations-vg150.pt}"
RUN="${RUN:-/path/to/cmsei-runs/visual-genome}"

# Options.
DETECTOR="${DETECTOR:-butd-r101-c4}"
CMSEI_RAY_ADDRESS="${CMSEI_RAY_ADDRESS:-}"     # empty: Ray on this machine only; "auto": the cluster of this node
CMSEI_RESOURCES="${CMSEI_RESOURCES:-}"         # optional --resources YAML (workers, cpus/gpus/memory per worker)
EXTRACT_ARGS="${EXTRACT_ARGS:-}"               # more cmsei-prep extract options
RELATIONS_ARGS="${RELATIONS_ARGS:-}"           # more cmsei-prep train-relations options, e.g. "--epochs 20"
EVAL_ARGS="${EVAL_ARGS:-}"                     # more cmsei-eval options, e.g. "--checkpoint last"
TRAIN_ARGS="${TRAIN_ARGS:-}"                   # more cmsei-train options
BIN="${BIN:-}"                                 # folder of the cmsei executables; empty: found on PATH

source "$(dirname "${BASH_SOURCE[0]}")/recipe-lib.sh"

step_extract() {
    require "VG_IMAGES" "$VG_IMAGES"
    require "VG_ANNOTATIONS" "$VG_ANNOTATIONS"
    require_weights "DETECTOR_WEIGHTS" "$DETECTOR_WEIGHTS"
    run_prep extract --images "$VG_IMAGES" --out "$DATA" --detector "$DETECTOR" \
        --weights "$DETECTOR_WEIGHTS" --boxes "$VG_ANNOTATIONS" $EXTRACT_ARGS
}

step_relations() {
    require "VG_ANNOTATIONS" "$VG_ANNOTATIONS"
    local predicates=()
    if [[ -n "$VG_SGG_DICTS" ]]; then
        require "VG_SGG_DICTS" "$VG_SGG_DICTS"
        predicates=(--predicates "$VG_SGG_DICTS")
    fi
    run_tool cmsei-prep train-relations --data "$DATA" --annotations "$VG_ANNOTATIONS" \
        "${predicates[@]+"${predicates[@]}"}" --out "$RELATIONS_CKPT" $RELATIONS_ARGS
}

step_graphs() {
    run_graphs "$DATA" "$RELATIONS_CKPT"
}

step_captions() {
    if [[ -z "$VG_CAPTIONS" ]]; then
        echo "note: VG_CAPTIONS is empty; skipping captions" >&2
        return 0
    fi
    require "VG_CAPTIONS" "$VG_CAPTIONS"
    run_prep captions --captions "$VG_CAPTIONS" --out "$DATA"
}

step_train() {
    if [[ -z "$VG_CAPTIONS" ]]; then
        echo "note: VG_CAPTIONS is empty; skipping train" >&2
        return 0
    fi
    run_tool cmsei-train --data "$DATA" --out "$RUN" $TRAIN_ARGS
}

step_eval() {
    if [[ -z "$VG_CAPTIONS" ]]; then
        echo "note: VG_CAPTIONS is empty; skipping eval" >&2
        return 0
    fi
    run_tool cmsei-eval --run "$RUN" --split test --protocol 1k $EVAL_ARGS
}

run_steps "extract relations graphs captions train eval" "$@"
