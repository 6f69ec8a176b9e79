"""Extraction images/s with one and with two worker processes, side by side.

Each configuration runs ``cmsei-prep extract`` as a whole process on the embedded local
Ray, timed end to end (Ray start, model construction and shard writing included). The
configurations alternate per repeat, and medians are reported. From the run's
``summary.json`` the script also takes the worker phase: images divided by the busiest
worker's summed shard seconds, which leaves out Ray start and model construction, and
each worker's share of time blocked on image decoding (input wait).

Configurations are ``WORKERSxCPUS``: ``2x1`` is two workers with one CPU (one torch
thread) each, ``1x2`` one worker with two threads.

Usage:
    python benchmarks/bench_scaling.py --images ../shared/data/images --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", default=str(REPO.parent / "shared" / "data" / "images"), help="folder of photos")
    parser.add_argument("--count", type=int, default=200, help="photos to process, first N by name (default: 200, or all there are)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per configuration; medians are reported (default: 3)")
    parser.add_argument("--configs", default="1x1,2x1,1x2", help="comma-separated WORKERSxCPUS configurations (default: 1x1,2x1,1x2)")
    parser.add_argument("--shard-size", type=int, default=20, help="images per shard; small enough that every worker gets shards (default: 20)")
    parser.add_argument("--detector", default="tiny", help="detector preset (default: tiny)")
    parser.add_argument("--device", default="cpu", help="device for the workers (default: cpu)")
    parser.add_argument("--json-out", help="write the raw figures to this JSON file")
    return parser.parse_args(argv)


def parse_config(text: str) -> tuple[int, int]:
    """Parse ``WORKERSxCPUS`` into two positive ints; raise ValueError naming the bad text."""
    try:
        workers, cpus = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"invalid configuration {text!r}: write WORKERSxCPUS, e.g. 2x1") from None
    if workers < 1 or cpus < 1:
        raise ValueError(f"invalid configuration {text!r}: workers and CPUs must be at least 1")
    return workers, cpus


def run_once(list_file: Path, args: argparse.Namespace, workers: int, cpus: int, count: int) -> dict[str, Any]:
    """Run one extraction process and return its timing and the summary's worker figures."""
    out = Path(tempfile.mkdtemp(prefix="bench-scaling-"))
    command = [
        str(Path(sys.executable).parent / "cmsei-prep"), "extract", "--images", str(list_file), "--out", str(out),
        "--detector", args.detector, "--weights", "untrained", "--device", args.device,
        "--shard-size", str(args.shard_size), "--workers", str(workers), "--cpus-per-worker", str(cpus),
    ]
    env = os.environ | {"RAY_USAGE_STATS_ENABLED": "0"}
    started = time.perf_counter()
    subprocess.run(command, capture_output=True, text=True, check=True, env=env)
    seconds = time.perf_counter() - started

    summary = json.loads((out / "regions" / "summary.json").read_text(encoding="utf-8"))
    if summary["num_ok"] != count:
        raise RuntimeError(f"the run extracted {summary['num_ok']} of {count} images; see {out}")
    per_worker = summary["per_worker"]
    busiest = max(figures["seconds"] for figures in per_worker.values())
    return {
        "seconds": seconds,
        "images_per_s": count / seconds,
        "worker_phase_images_per_s": count / busiest,
        "workers_used": len(per_worker),
        "input_wait_share": sorted(figures["input_wait_share"] for figures in per_worker.values()),
        "images_per_worker": sorted(figures["images"] for figures in per_worker.values()),
    }


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Return the medians over the repeats of one configuration."""
    waits = [share for run in runs for share in run["input_wait_share"]]
    return {
        "runs": runs,
        "median_seconds": statistics.median(run["seconds"] for run in runs),
        "median_images_per_s": statistics.median(run["images_per_s"] for run in runs),
        "median_worker_phase_images_per_s": statistics.median(run["worker_phase_images_per_s"] for run in runs),
        "median_input_wait_share": statistics.median(waits),
        "max_input_wait_share": max(waits),
    }


def markdown_table(results: dict[str, dict[str, Any]], count: int) -> str:
    lines = [
        "| workers x CPUs | end-to-end s | end-to-end images/s | worker-phase images/s | input wait (median, max) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for config, figures in results.items():
        lines.append(
            f"| {config} | {figures['median_seconds']:.1f} | {figures['median_images_per_s']:.2f} | "
            f"{figures['median_worker_phase_images_per_s']:.2f} | "
            f"{100 * figures['median_input_wait_share']:.1f} %, {100 * figures['max_input_wait_share']:.1f} % |"
        )
    return "\n".join(lines) + f"\n\n{count} images per run."


def main() -> None:
    args = parse_args()
    configs = {text: parse_config(text) for text in args.configs.split(",")}
    photos = sorted(p for p in Path(args.images).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[: args.count]
    if not photos:
        raise SystemExit(f"no photos in {args.images}")
    list_file = Path(tempfile.mkdtemp(prefix="bench-scaling-list-")) / "images.txt"
    list_file.write_text("\n".join(str(p.resolve()) for p in photos) + "\n", encoding="utf-8")

    load_before = os.getloadavg()[0]
    runs: dict[str, list[dict[str, Any]]] = {config: [] for config in configs}
    for repeat in range(args.repeats):
        for config, (workers, cpus) in configs.items():
            runs[config].append(run_once(list_file, args, workers, cpus, len(photos)))
            run = runs[config][-1]
            print(f"repeat {repeat + 1} {config}: {run['seconds']:.1f} s, worker phase "
                  f"{run['worker_phase_images_per_s']:.2f} images/s", flush=True)

    results = {config: summarise(config_runs) for config, config_runs in runs.items()}
    figures = {
        "machine": f"{platform.platform()}, {os.cpu_count()} logical CPUs, Python {platform.python_version()}",
        "detector": args.detector,
        "device": args.device,
        "images": len(photos),
        "shard_size": args.shard_size,
        "repeats": args.repeats,
        "load_average_1min": [load_before, os.getloadavg()[0]],
        "results": results,
    }
    print(json.dumps(figures, indent=2))
    print(markdown_table(results, len(photos)))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
