"""Images/s of ``cmsei-prep extract`` against a plain single-process loop, side by side.

The loop is the way the reference bottom-up-attention scripts work: one process reads
each image and runs the model at batch size 1, with the model as loaded (frozen batch
norm kept as separate scale-and-shift ops, ``torch.no_grad``). Both sides run as whole
processes and are timed end to end, model construction included, alternating per
repeat; the medians are reported.

Usage:
    python benchmarks/bench_extract.py --images ../shared/data/images --count 40 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", default=str(REPO.parent / "shared" / "data" / "images"), help="folder of photos")
    parser.add_argument("--count", type=int, default=40, help="photos to process (first N by name)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per side; medians are reported")
    parser.add_argument("--detector", default="butd-r101-c4", help="detector preset")
    parser.add_argument("--workers", type=int, default=2, help="extract workers")
    parser.add_argument("--cpus-per-worker", type=int, default=1, help="CPUs (torch threads) per worker")
    parser.add_argument("--json-out", help="write the raw figures to this JSON file")
    parser.add_argument("--loop-child", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def run_loop_child(list_file: str, detector: str) -> None:
    """Run the baseline: read each image and run the plain model at batch size 1."""
    import torch

    from extractors.extractor import build_extractor
    from extractors.images import decode_image

    extractor = build_extractor(detector, overrides={"fold_batchnorm": False, "channels_last": False},
                                weights="untrained", device="cpu")
    paths = Path(list_file).read_text(encoding="utf-8").split()
    with torch.no_grad():
        for path in paths:
            image = decode_image(path)
            extractor.extract([image.pixels])
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    sys.stdout.write(json.dumps({"peak_rss_mb": peak_mb}) + "\n")


def time_loop(list_file: Path, detector: str) -> tuple[float, float]:
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, __file__, "--loop-child", str(list_file), "--detector", detector],
        capture_output=True, text=True, check=True,
    )
    seconds = time.perf_counter() - started
    return seconds, json.loads(result.stdout.strip().splitlines()[-1])["peak_rss_mb"]


def time_pipeline(list_file: Path, detector: str, workers: int, cpus: int, count: int) -> tuple[float, float]:
    out = Path(tempfile.mkdtemp(prefix="bench-extract-"))
    shard_size = -(-count // workers)
    command = [
        str(Path(sys.executable).parent / "cmsei-prep"), "extract", "--images", str(list_file), "--out", str(out),
        "--detector", detector, "--weights", "untrained", "--device", "cpu", "--shard-size", str(shard_size),
        "--workers", str(workers), "--cpus-per-worker", str(cpus),
    ]
    started = time.perf_counter()
    subprocess.run(command, capture_output=True, text=True, check=True)
    seconds = time.perf_counter() - started
    summary = json.loads((out / "regions" / "summary.json").read_text(encoding="utf-8"))
    if summary["num_ok"] != count:
        raise RuntimeError(f"pipeline extracted {summary['num_ok']} of {count} images")
    peak = max(node["peak_rss_mb"] for node in summary["per_node"].values())
    return seconds, peak


def main() -> None:
    args = parse_args()
    if args.loop_child:
        run_loop_child(args.loop_child, args.detector)
        return

    photos = sorted(p for p in Path(args.images).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[: args.count]
    list_file = Path(tempfile.mkdtemp(prefix="bench-list-")) / "images.txt"
    list_file.write_text("\n".join(str(p.resolve()) for p in photos) + "\n", encoding="utf-8")

    loop_runs, pipeline_runs = [], []
    for repeat in range(args.repeats):
        loop_runs.append(time_loop(list_file, args.detector))
        pipeline_runs.append(time_pipeline(list_file, args.detector, args.workers, args.cpus_per_worker, len(photos)))
        print(f"repeat {repeat + 1}: loop {loop_runs[-1][0]:.1f} s, pipeline {pipeline_runs[-1][0]:.1f} s", flush=True)

    loop_s = statistics.median(run[0] for run in loop_runs)
    pipe_s = statistics.median(run[0] for run in pipeline_runs)
    figures = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "detector": args.detector,
        "images": len(photos),
        "repeats": args.repeats,
        "loop_seconds": [run[0] for run in loop_runs],
        "pipeline_seconds": [run[0] for run in pipeline_runs],
        "loop_images_per_s": len(photos) / loop_s,
        "pipeline_images_per_s": len(photos) / pipe_s,
        "speedup": loop_s / pipe_s,
        "loop_peak_rss_mb": max(run[1] for run in loop_runs),
        "pipeline_worker_peak_rss_mb": max(run[1] for run in pipeline_runs),
    }
    print(json.dumps(figures, indent=2))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
