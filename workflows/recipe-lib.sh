# Functions shared by the dataset recipes (coco.sh, flickr30k.sh, visual-genome.sh).
# Source it after setting the recipe's variables; it runs nothing by itself.

# Stop with a message unless the path in $2, named by the variable $1, exists.
require() {
    local name="$1" path="$2"
    if [[ -z "$path" || ! -e "$path" ]]; then
        echo "error: $name is '$path', which does not exist; set $name to your local copy" >&2
        exit 2
    fi
}

# Like require, but also accept "untrained" (random detector weights, for trial runs).
require_weights() {
    [[ "$2" == "untrained" ]] || require "$1" "$2"
}

# The executable $1, from $BIN when set, else from PATH.
tool_path() {
    if [[ -n "${BIN:-}" ]]; then
        echo "$BIN/$1"
    else
        echo "$1"
    fi
}

# Run one cmsei-prep stage with the Ray options of CMSEI_RAY_ADDRESS and CMSEI_RESOURCES.
run_prep() {
    local stage="$1"
    shift
    local ray_options=()
    [[ -n "${CMSEI_RAY_ADDRESS:-}" ]] && ray_options+=(--address "$CMSEI_RAY_ADDRESS")
    [[ -n "${CMSEI_RESOURCES:-}" ]] && ray_options+=(--resources "$CMSEI_RESOURCES")
    run_tool cmsei-prep "$stage" "$@" "${ray_options[@]+"${ray_options[@]}"}"
}

# Run a command, with the executable looked up by tool_path, and echo it first.
run_tool() {
    local executable
    executable="$(tool_path "$1")"
    shift
    echo "+ $executable $*" >&2
    "$executable" "$@"
}

# cmsei-prep graphs with the relation predictor checkpoint $2 when given, else spatial
# graphs only (scene graphs stay empty, and training warns about it).
run_graphs() {
    local data="$1" relations="$2"
    if [[ -n "$relations" ]]; then
        require "RELATIONS_CKPT" "$relations"
        run_prep graphs --data "$data" --relations "$relations"
    else
        echo "note: RELATIONS_CKPT is empty, so the scene graphs stay empty (workflows/visual-genome.sh trains the predictor)" >&2
        run_prep graphs --data "$data"
    fi
}

# cmsei-train options that follow from the graphs step: without a relation predictor
# checkpoint ($1 empty) the graph shards have no predicates, so the semantic graph is off.
scene_graph_train_args() {
    [[ -n "$1" ]] || echo "--no-semantic-graph"
}

# Run the steps named in "$@" (default: the list in $1), each by its function step_NAME.
run_steps() {
    local known="$1"
    shift
    local steps=("$@")
    [[ ${#steps[@]} -eq 0 ]] && read -r -a steps <<< "$known"
    for step in "${steps[@]}"; do
        if [[ " $known " != *" $step "* ]]; then
            echo "error: unknown step '$step'; steps: $known" >&2
            exit 2
        fi
    done
    for step in "${steps[@]}"; do
        echo "== $step" >&2
        "step_$step"
    done
}
