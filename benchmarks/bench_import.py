"""Benchmark ``cmsei-prep import`` against the reference readers of the TSV and SCAN formats.

Writes synthetic data of the public shapes (36 regions x 2048 float32 features per
image): an LXMERT TSV of ``--tsv-images`` rows and a SCAN precomp split of
``--scan-images`` images, 1.5 GB for the default 5,000. Then it measures, side by side:

- ``reference``: how the public training code reads the data. For the TSV that is
  ``csv.DictReader`` with a raised field limit and a base64 decode per field, as in
  LXMERT's ``load_obj_tsv``. For SCAN it is ``np.load`` of the whole ``_ims.npy`` and a
  pass over its rows.
- ``reader``: this toolkit's reader alone (listing pass, then decoding and checking
  every image), without writing shards.
- ``import``: the full ``import_features`` run writing float16 gzip shards.

Every measurement runs in a fresh process, so each one reports its own peak resident
memory (VmHWM, reset after start-up imports) above its start-up level. Rates are the
median over ``--repeats`` runs. The source files stay in the page cache between runs,
so the figures are for a warm cache. Images/s and MB/s count source images and bytes.

Run from the repository root:

    .venv/bin/python benchmarks/bench_import.py [--tsv-images 1000] [--scan-images 5000] [--repeats 3]

It prints a Markdown table for docs/benchmarks-import.md. ``--workdir`` keeps the data
(default: a temporary folder that is deleted afterwards).
"""

from __future__ import annotations

import argparse
import base64
import csv
import io
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

logger = logging.getLogger(__name__)

REGIONS = 36
FEATURE_DIM = 2048
LXMERT_FIELDNAMES = ["img_id", "img_h", "img_w", "objects_id", "objects_conf", "attrs_id", "attrs_conf",
                     "num_boxes", "boxes", "features"]


def write_tsv(path: Path, count: int, seed: int = 0) -> None:
    """Write an LXMERT TSV of ``count`` rows with realistic boxes and ReLU-like features."""
    rng = np.random.default_rng(seed)
    with open(path, "wb") as handle:
        for row in range(count):
            x1 = rng.uniform(0, 300, REGIONS)
            y1 = rng.uniform(0, 200, REGIONS)
            boxes = np.stack([x1, y1, x1 + rng.uniform(5, 300, REGIONS), y1 + rng.uniform(5, 200, REGIONS)], axis=1)
            features = np.maximum(rng.standard_normal((REGIONS, FEATURE_DIM), dtype=np.float32), 0)
            fields = [
                f"COCO_train2014_{row:012d}".encode(), b"480", b"640",
                _b64(rng.integers(0, 1600, REGIONS), "<i8"), _b64(rng.uniform(0, 1, REGIONS), "<f4"),
                _b64(rng.integers(0, 400, REGIONS), "<i8"), _b64(rng.uniform(0, 1, REGIONS), "<f4"),
                str(REGIONS).encode(), _b64(boxes, "<f4"), _b64(features, "<f4"),
            ]
            handle.write(b"\t".join(fields) + b"\r\n")


def write_scan(folder: Path, count: int, seed: int = 1) -> None:
    """Write ``{count}`` images of SCAN precomp features in chunks, never holding the whole array."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "train_ims.npy"
    header = {"descr": "<f4", "fortran_order": False, "shape": (count, REGIONS, FEATURE_DIM)}
    with open(path, "wb") as handle:
        np.lib.format.write_array_header_1_0(handle, header)
        for start in range(0, count, 250):
            chunk = np.maximum(rng.standard_normal((min(250, count - start), REGIONS, FEATURE_DIM), dtype=np.float32), 0)
            handle.write(chunk.tobytes())
    (folder / "train_ids.txt").write_text("".join(f"{100000 + row}\n" for row in range(count)), encoding="utf-8")


def _b64(values: np.ndarray, dtype: str) -> bytes:
    return base64.b64encode(np.ascontiguousarray(values, dtype=dtype).tobytes())


def reference_tsv(path: Path) -> int:
    """Read like LXMERT's ``load_obj_tsv``: csv.DictReader, then base64 and frombuffer per field."""
    csv.field_size_limit(sys.maxsize)
    count = 0
    with open(path, newline="") as handle:
        for item in csv.DictReader(handle, LXMERT_FIELDNAMES, delimiter="\t"):
            boxes = int(item["num_boxes"])
            decode = [("objects_id", np.int64), ("objects_conf", np.float32), ("attrs_id", np.int64),
                      ("attrs_conf", np.float32), ("boxes", np.float32), ("features", np.float32)]
            for key, dtype in decode:
                item[key] = np.frombuffer(base64.b64decode(item[key]), dtype=dtype).reshape(boxes, -1)
            count += 1
    return count


def reference_scan(folder: Path) -> int:
    """Read like SCAN's PrecompDataset: np.load of the whole array, then one row per image."""
    images = np.load(folder / "train_ims.npy")
    for row in range(images.shape[0]):
        np.array(images[row])
    return images.shape[0]


def reader_only(source: Path) -> int:
    """Run this toolkit's reader and checks over every image without writing shards."""
    from pipeline.importers.stage import RegionChecks, check_regions, open_reader, resolve_format

    format_name = resolve_format("auto", [source])
    with open_reader(format_name, [source], None, None) as reader:
        index = reader.index()
        checks = RegionChecks(index.feature_dim, index.has_boxes, 1.0, None, None, "float16")
        for row in index.rows:
            check_regions(reader.read(row), checks)
            if row.row % 100 == 99:
                reader.release_pages()
    return len(index.rows)


def full_import(source: Path, out: Path) -> int:
    from pipeline.importers.stage import ImportOptions, import_features

    shutil.rmtree(out, ignore_errors=True)
    summary = import_features(ImportOptions(sources=[source], out=out))
    return summary.num_ok


def _status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def child(kind: str, source: Path, out: Path) -> None:
    """Run one measurement in this process and print its JSON result."""
    import pandas as pd

    pd.DataFrame({"warm": [1]}).to_parquet(io.BytesIO())
    import pipeline.importers.stage  # noqa: F401  (start-up imports before the baseline)

    before = _status_kib("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
    except OSError:
        logger.warning("cannot reset the peak RSS; the peak includes start-up")
    started = time.perf_counter()
    if kind == "reference-tsv":
        images = reference_tsv(source)
    elif kind == "reference-scan":
        images = reference_scan(source)
    elif kind == "reader":
        images = reader_only(source)
    else:
        images = full_import(source, out)
    seconds = time.perf_counter() - started
    print(json.dumps({"images": images, "seconds": seconds, "peak_growth_kib": _status_kib("VmHWM") - before}))


def measure(kind: str, source: Path, out: Path, repeats: int, source_bytes: int) -> dict:
    runs = []
    for _ in range(repeats):
        result = subprocess.run(
            [sys.executable, __file__, "--child", kind, "--source", str(source), "--out", str(out)],
            cwd=REPO_ROOT, capture_output=True, text=True, check=True,
        )
        runs.append(json.loads(result.stdout.strip().splitlines()[-1]))
    seconds = statistics.median(run["seconds"] for run in runs)
    images = runs[0]["images"]
    return {
        "kind": kind,
        "images": images,
        "seconds": seconds,
        "images_per_s": images / seconds,
        "mb_per_s": source_bytes / 1e6 / seconds,
        "peak_growth_mb": max(run["peak_growth_kib"] for run in runs) / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tsv-images", type=int, default=1000, help="rows of the synthetic LXMERT TSV (default: 1000)")
    parser.add_argument("--scan-images", type=int, default=5000, help="images of the synthetic SCAN split (default: 5000)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement; the median is reported (default: 3)")
    parser.add_argument("--workdir", help="folder for the data and outputs (default: a temporary folder, deleted)")
    parser.add_argument("--json", help="also write the results as JSON to this file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--source", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    if args.child:
        child(args.child, Path(args.source), Path(args.out))
        return

    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench-import-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        results = run_all(workdir, args.tsv_images, args.scan_images, args.repeats)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    print_table(results, args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


def run_all(workdir: Path, tsv_images: int, scan_images: int, repeats: int) -> list[dict]:
    tsv = workdir / "features.tsv"
    scan = workdir / "precomp"
    if not tsv.exists():
        logger.warning("writing %d TSV rows to %s", tsv_images, tsv)
        write_tsv(tsv, tsv_images)
    if not (scan / "train_ims.npy").exists():
        logger.warning("writing %d SCAN images to %s", scan_images, scan)
        write_scan(scan, scan_images)

    results = []
    tsv_bytes = tsv.stat().st_size
    scan_bytes = (scan / "train_ims.npy").stat().st_size
    for kind in ("reference-tsv", "reader", "import"):
        results.append({"format": "lxmert-tsv", "source_mb": tsv_bytes / 1e6,
                        **measure(kind, tsv, workdir / "out-tsv", repeats, tsv_bytes)})
    for kind in ("reference-scan", "reader", "import"):
        results.append({"format": "scan", "source_mb": scan_bytes / 1e6,
                        **measure(kind, scan, workdir / "out-scan", repeats, scan_bytes)})
    return results


def print_table(results: list[dict], args: argparse.Namespace) -> None:
    print(f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"numpy {np.__version__}; {args.repeats} runs per row, median time, warm page cache.\n")
    print("| format | source | reader | images | seconds | images/s | MB/s | peak memory growth (MB) |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for row in results:
        print(f"| {row['format']} | {row['source_mb']:.0f} MB | {row['kind']} | {row['images']} | {row['seconds']:.2f} | "
              f"{row['images_per_s']:.0f} | {row['mb_per_s']:.0f} | {row['peak_growth_mb']:.0f} |")


if __name__ == "__main__":
    main()
