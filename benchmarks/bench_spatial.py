"""Benchmark spatial relation graphs per second on one CPU core.

Compares, in one run, ``graphs.spatial.relation_labels_batch`` (many images per call),
``graphs.spatial.relation_labels`` (one call per image) and a plain Python loop over
pairs in the style of the implementation circulating in VQA and retrieval repositories,
with that implementation's labelling defects fixed. Images have 36 or 100 random boxes
of realistic sizes. Every rate is the median over repeats, and the loop's labels are
checked against the vectorised ones before timing.

Run from the repository root:

    .venv/bin/python benchmarks/bench_spatial.py [--repeats 5] [--json out.json]

It prints a Markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import os

# One core: these must be set before numpy or torch is imported.
for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_variable] = "1"

import argparse
import logging
import math
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from graphs.spatial import relation_labels, relation_labels_batch  # noqa: E402
from pipeline.atomic import write_json  # noqa: E402

logger = logging.getLogger(__name__)

# (height, width) of common COCO and Flickr photo sizes.
IMAGE_SIZES = ((480, 640), (640, 480), (375, 500), (427, 640), (500, 333), (612, 612))


def make_images(count: int, regions: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Make random detector-like boxes: log-uniform sides from 4 % to 90 % of the image.

    Returns boxes (count * regions, 4) float32, offsets (count + 1,) int64 and
    image sizes (count, 2) int64.
    """
    rng = np.random.default_rng(seed)
    sizes = np.array(IMAGE_SIZES)[rng.integers(0, len(IMAGE_SIZES), count)]
    height = np.repeat(sizes[:, 0], regions).astype(np.float64)
    width = np.repeat(sizes[:, 1], regions).astype(np.float64)

    box_width = width * np.exp(rng.uniform(np.log(0.04), np.log(0.9), width.shape))
    box_height = height * np.exp(rng.uniform(np.log(0.04), np.log(0.9), height.shape))
    center_x = rng.uniform(0, width)
    center_y = rng.uniform(0, height)
    boxes = np.stack(
        [
            np.clip(center_x - box_width / 2, 0, width),
            np.clip(center_y - box_height / 2, 0, height),
            np.clip(center_x + box_width / 2, 0, width),
            np.clip(center_y + box_height / 2, 0, height),
        ],
        axis=1,
    ).astype(np.float32)
    offsets = np.arange(count + 1, dtype=np.int64) * regions
    return boxes, offsets, sizes


def loop_relation_labels(boxes: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
    """Label pairs one at a time with IoU, containment and atan2, as the common code does.

    Each unordered pair is visited once and its reverse label is derived from it. Unlike
    the circulating code, reverse labels are right in all quadrants, the sectors of the
    third quadrant are in order, an angle of 0 gives sector 4 and coincident centres
    give ``overlap`` instead of NaN.
    """
    height, width = image_size
    diagonal = math.hypot(height, width)
    count = len(boxes)
    labels = np.zeros((count, count), dtype=np.uint8)
    boxes = boxes.tolist()
    for i in range(count):
        for j in range(i + 1, count):
            label = _loop_pair_label(_clamped(boxes[i]), _clamped(boxes[j]), diagonal)
            labels[i, j] = label
            labels[j, i] = _loop_reverse_label(label)
    return labels


def _clamped(box: list[float]) -> list[float]:
    x1, y1, x2, y2 = box
    return [x1, y1, max(x2, x1 + 1.0), max(y2, y1 + 1.0)]


def _loop_pair_label(box_a: list[float], box_b: list[float], diagonal: float) -> int:
    a_in_b = box_a[0] >= box_b[0] and box_a[1] >= box_b[1] and box_a[2] <= box_b[2] and box_a[3] <= box_b[3]
    b_in_a = box_b[0] >= box_a[0] and box_b[1] >= box_a[1] and box_b[2] <= box_a[2] and box_b[3] <= box_a[3]
    if a_in_b and b_in_a:
        return 3
    if a_in_b:
        return 1
    if b_in_a:
        return 2

    inter_width = max(0.0, min(box_a[2], box_b[2]) - max(box_a[0], box_b[0]))
    inter_height = max(0.0, min(box_a[3], box_b[3]) - max(box_a[1], box_b[1]))
    intersection = inter_width * inter_height
    area_a = (box_a[2] - box_a[0]) * (box_a[3] - box_a[1])
    area_b = (box_b[2] - box_b[0]) * (box_b[3] - box_b[1])
    dx = (box_b[0] + box_b[2]) / 2 - (box_a[0] + box_a[2]) / 2
    dy = (box_a[1] + box_a[3]) / 2 - (box_b[1] + box_b[3]) / 2
    if intersection / (area_a + area_b - intersection) >= 0.5 or (dx == 0 and dy == 0):
        return 3

    if math.hypot(dx, dy) >= 0.5 * diagonal:
        return 0
    angle = math.degrees(math.atan2(dy, dx)) % 360.0
    return 4 + int(angle // 45.0) % 8


def _loop_reverse_label(label: int) -> int:
    if label in (1, 2):
        return 3 - label
    if label >= 4:
        return 4 + (label - 4 + 4) % 8
    return label


def median_rates(function: Callable[[], object], images: int, repeats: int) -> tuple[float, float]:
    """Run ``function`` ``repeats`` times and return the median images per CPU second and per wall second.

    CPU time (of this process) leaves out the time that other processes on a shared
    machine take from it, so it is the steadier of the two.
    """
    cpu_rates, wall_rates = [], []
    for _ in range(repeats):
        cpu_start, wall_start = time.process_time(), time.perf_counter()
        function()
        cpu_rates.append(images / (time.process_time() - cpu_start))
        wall_rates.append(images / (time.perf_counter() - wall_start))
    return statistics.median(cpu_rates), statistics.median(wall_rates)


def check_agreement(boxes: np.ndarray, offsets: np.ndarray, sizes: np.ndarray, images: int) -> None:
    """Raise AssertionError unless the loop and the vectorised code agree on ``images`` images."""
    for image in range(images):
        image_boxes = boxes[offsets[image] : offsets[image + 1]]
        expected = loop_relation_labels(image_boxes, tuple(sizes[image]))
        actual = relation_labels(image_boxes, tuple(sizes[image]))
        if not np.array_equal(expected, actual):
            raise AssertionError(f"loop and vectorised labels differ on image {image}")


def benchmark(regions: int, repeats: int, seed: int) -> dict[str, float]:
    """Measure the three implementations on images with ``regions`` boxes each."""
    batch_images = 20_000 if regions <= 36 else 2_000
    loop_images = 20 if regions <= 36 else 3
    per_call_images = 500 if regions <= 36 else 100
    boxes, offsets, sizes = make_images(batch_images, regions, seed)
    check_agreement(boxes, offsets, sizes, loop_images)

    def run_batch() -> None:
        relation_labels_batch(boxes, offsets, sizes)

    def run_per_call() -> None:
        for image in range(per_call_images):
            relation_labels(boxes[offsets[image] : offsets[image + 1]], tuple(sizes[image]))

    def run_loop() -> None:
        for image in range(loop_images):
            loop_relation_labels(boxes[offsets[image] : offsets[image + 1]], tuple(sizes[image]))

    batch_rate, batch_wall_rate = median_rates(run_batch, batch_images, repeats)
    per_call_rate, _ = median_rates(run_per_call, per_call_images, repeats)
    loop_rate, loop_wall_rate = median_rates(run_loop, loop_images, repeats)
    return {
        "regions": regions,
        "batch_images_per_s": batch_rate,
        "per_call_images_per_s": per_call_rate,
        "loop_images_per_s": loop_rate,
        "batch_over_loop": batch_rate / loop_rate,
        "per_call_over_loop": per_call_rate / loop_rate,
        "batch_pairs_per_s": batch_rate * regions * regions,
        "batch_wall_images_per_s": batch_wall_rate,
        "loop_wall_images_per_s": loop_wall_rate,
    }


def machine_description() -> str:
    """Describe the CPU model and the Python and numpy versions."""
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model}, {os.cpu_count()} logical CPUs, Python {platform.python_version()}, numpy {np.__version__}"


def markdown_table(results: list[dict[str, float]]) -> str:
    """Format the results as a Markdown table of images per second (CPU time unless marked wall)."""
    lines = [
        "| regions | batch | per-call | Python loop | batch / loop | per-call / loop | batch, wall | loop, wall |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in results:
        lines.append(
            f"| {row['regions']} | {row['batch_images_per_s']:,.0f} | {row['per_call_images_per_s']:,.0f} "
            f"| {row['loop_images_per_s']:,.1f} | {row['batch_over_loop']:,.0f}x | {row['per_call_over_loop']:,.1f}x "
            f"| {row['batch_wall_images_per_s']:,.0f} | {row['loop_wall_images_per_s']:,.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement; the median is reported")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random boxes")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    load_before = os.getloadavg()[0]
    results = [benchmark(regions, args.repeats, args.seed) for regions in (36, 100)]
    load_after = os.getloadavg()[0]
    logger.info("machine: %s", machine_description())
    logger.info("command: %s", " ".join([Path(sys.executable).name, *sys.argv]))
    logger.info("1-minute load average: %.1f at the start, %.1f at the end", load_before, load_after)
    logger.info("%s", markdown_table(results))
    if args.json:
        write_json(
            args.json,
            {"machine": machine_description(), "load_average": [load_before, load_after], "results": results},
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
