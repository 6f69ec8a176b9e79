#!/usr/bin/env bash
# Run every benchmark in turn; each writes its own figures (see docs/benchmarks.md).
# Usage: benchmarks/run_all.sh VENV_BIN
set -euo pipefail
BIN=${1:-.venv/bin}
"$BIN/python" benchmarks/bench_extract.py --count 40 --repeats 3
"$BIN/python" benchmarks/bench_captions_stage.py --repeats 3
"$BIN/python" benchmarks/bench_spatial.py --repeats 9
"$BIN/python" benchmarks/bench_import.py --repeats 3
"$BIN/python" benchmarks/bench_scaling.py
"$BIN/python" benchmarks/bench_model.py
"$BIN/python" benchmarks/bench_relations.py
