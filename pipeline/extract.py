"""The ``extract`` stage: detect regions in a folder of images and write region shards.

Python API behind ``cmsei-prep extract``::

    from pipeline.extract import ExtractOptions, extract_images
    summary = extract_images(ExtractOptions(images="photos/", out="DATA", detector="tiny", weights="untrained"))

Images are sorted by id and cut into fixed-size shards, so the assignment of images to
shard files is deterministic and a rerun redoes only missing or partial shards. On a
multi-node cluster, every node must see the output folder, which is checked before the
workers start. A shard whose node is lost is redone on another node, and its partial
file is removed when the run ends.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from pipeline.atomic import remove_temporaries, write_json
from pipeline.dataset import REGIONS
from pipeline.extract_worker import ExtractionWorker, ShardReport, ShardTask, WorkerSettings
from pipeline.inputs import InputListing, discover_images
from pipeline.manifest import file_sha256, prepare_stage, write_listing
from pipeline.ray_runner import PoolStats, RayOptions, TaskOutcome, WorkerStartError
from pipeline.region_index import write_region_index
from pipeline.region_shards import shard_file_name, verify_region_shard
from pipeline.stage_pool import PoolSize, run_stage_workers

logger = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 100_000_000


class ExtractError(ValueError):
    """Invalid extraction options or inputs. The message names the value and the fix."""


@dataclass
class ExtractOptions:
    """Options of one extraction run (see ``cmsei-prep extract --help``)."""

    images: str | Path
    out: str | Path
    detector: str = "butd-r101-c4"
    config: str | Path | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    weights: str | None = None
    backend: str = "torchvision"
    device: str = "auto"
    batch_size: int = 1
    shard_size: int = 1000
    dtype: str = "float16"
    boxes: str | Path | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    decode_threads: int = 2
    compression: str | None = "gzip"
    overwrite: bool = False
    ray: RayOptions = field(default_factory=RayOptions)


@dataclass
class ExtractSummary:
    """Counts and timing of one extraction run."""

    num_images: int
    num_ok: int
    num_failed: int
    num_skipped: int
    num_regions: int
    shards_total: int
    shards_written: int
    shards_reused: int
    failed_shards: dict[int, str]
    seconds: float
    per_node: dict[str, dict[str, float]]
    per_worker: dict[str, dict[str, Any]] = field(default_factory=dict)
    shards_retried: int = 0
    workers_started: int = 0
    workers_lost: int = 0
    workers_replaced: int = 0

    @property
    def exit_code(self) -> int:
        """0 when every shard was written (image failures are recorded), 1 otherwise."""
        return 1 if self.failed_shards else 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def extract_images(options: ExtractOptions) -> ExtractSummary:
    """Run the extraction stage and return its summary.

    Raises:
        ExtractError: missing weights, empty input, unreadable ``--boxes`` file, bad options,
            or no worker could build its detector.
        pipeline.manifest.StageConflictError: the output contains a run over other inputs.
        pipeline.cluster.StorageCheckError: a node cannot see or write the output folder.
        FileNotFoundError: ``options.images`` does not exist.
    """
    started = time.monotonic()
    _check_options(options)
    listing = discover_images(options.images)
    if not listing.entries:
        raise ExtractError(f"no images found in {options.images} ({len(listing.skipped)} other files skipped)")
    boxes = _load_boxes(Path(options.boxes)) if options.boxes else None

    stage_dir = Path(options.out) / REGIONS
    config = _stage_config(options, boxes)
    shard_ids = _plan_shards(listing, options.shard_size)
    prepare_stage(
        stage_dir,
        REGIONS,
        listing.listing_digest(),
        config,
        {"source": str(options.images), "shard_size": options.shard_size, "num_shards": len(shard_ids)},
        options.overwrite,
    )
    write_listing(stage_dir, _listing_frame(listing, options.shard_size))
    removed = remove_temporaries(stage_dir)
    if removed:
        logger.info("removed %d partial shard files of an interrupted run", len(removed))

    pending = [index for index, ids in enumerate(shard_ids) if not _shard_is_complete(stage_dir, index, ids)]
    logger.info("%d images in %d shards; %d shards to do", len(listing.entries), len(shard_ids), len(pending))
    paths = {entry.image_id: str(entry.path) for entry in listing.entries}
    tasks = [
        ShardTask(index, shard_ids[index], [paths[i] for i in shard_ids[index]], str(stage_dir / shard_file_name(index)),
                  None if boxes is None else {i: boxes[i] for i in shard_ids[index] if i in boxes})
        for index in pending
    ]
    pool_stats = PoolStats()
    outcomes = _run_workers(options, config, tasks, stage_dir, pool_stats) if tasks else []
    leftovers = remove_temporaries(stage_dir)
    if leftovers:
        logger.info("removed %d partial shard files left by lost or failed workers", len(leftovers))

    failed_shards = {outcome.key: outcome.error for outcome in outcomes if outcome.error}
    index_frame = write_region_index(stage_dir, shard_ids, listing, failed_shards)
    summary = _summarise(index_frame, listing, shard_ids, outcomes, failed_shards, time.monotonic() - started)
    summary.shards_retried = pool_stats.tasks_retried
    summary.workers_started = pool_stats.workers_started
    summary.workers_lost = pool_stats.workers_lost
    summary.workers_replaced = pool_stats.workers_replaced
    write_json(stage_dir / "summary.json", summary.to_dict())
    _log_summary(summary)
    return summary


def _check_options(options: ExtractOptions) -> None:
    if not options.weights:
        raise ExtractError(
            "no --weights given: pass --weights PATH to a checkpoint, or --weights untrained to run "
            "a randomly initialised detector (its features carry no meaning)"
        )
    if options.shard_size < 1:
        raise ExtractError(f"--shard-size must be at least 1, got {options.shard_size}")
    if options.batch_size < 1:
        raise ExtractError(f"--batch-size must be at least 1, got {options.batch_size}")
    if options.dtype not in ("float16", "float32"):
        raise ExtractError(f"--dtype must be float16 or float32, got {options.dtype!r}")


def _load_boxes(path: Path) -> dict[str, list[list[float]]]:
    """Read ``--boxes``: JSON lines ``{"image", "boxes"}`` or a synth ``annotations.json``."""
    from pipeline.boxes_file import read_boxes_file

    try:
        return read_boxes_file(path)
    except (OSError, ValueError) as error:
        raise ExtractError(str(error)) from None


def _stage_config(options: ExtractOptions, boxes: dict | None) -> dict[str, Any]:
    weights = options.weights
    weights_sha = "untrained" if weights == "untrained" else file_sha256(weights)
    overrides = dict(options.overrides)
    if options.config:
        import yaml

        overrides = dict(yaml.safe_load(Path(options.config).read_text(encoding="utf-8")) or {}) | overrides
    return {
        "detector": options.detector,
        "overrides": overrides,
        "weights_sha256": weights_sha,
        "backend": options.backend,
        "dtype": options.dtype,
        "max_pixels": options.max_pixels,
        "boxes_sha256": None if boxes is None else file_sha256(options.boxes),
    }


def _plan_shards(listing: InputListing, shard_size: int) -> list[list[str]]:
    ids = [entry.image_id for entry in listing.entries]
    return [ids[start : start + shard_size] for start in range(0, len(ids), shard_size)]


def _listing_frame(listing: InputListing, shard_size: int) -> pd.DataFrame:
    rows = [
        {"image_id": entry.image_id, "path": str(entry.path), "shard": i // shard_size, "row": i % shard_size}
        for i, entry in enumerate(listing.entries)
    ]
    return pd.DataFrame(rows, columns=["image_id", "path", "shard", "row"])


def _shard_is_complete(stage_dir: Path, index: int, image_ids: list[str]) -> bool:
    path = stage_dir / shard_file_name(index)
    if not path.exists():
        return False
    problems = verify_region_shard(path, expected_ids=image_ids)
    if problems:
        logger.warning("redoing %s: %s", path.name, "; ".join(problems))
        path.unlink()
        return False
    return True


def _run_workers(options: ExtractOptions, config: dict[str, Any], tasks: list[ShardTask], stage_dir: Path,
                 stats: PoolStats) -> list[TaskOutcome]:
    def worker_args(size: PoolSize, progress_name: str) -> tuple:
        settings = WorkerSettings(
            detector=options.detector,
            overrides=config["overrides"],
            weights=options.weights,
            device=options.device,
            backend=options.backend,
            batch_size=options.batch_size,
            feature_dtype=options.dtype,
            decode_threads=options.decode_threads,
            max_pixels=options.max_pixels,
            torch_threads=max(1, int(size.cpus)),
            compression=options.compression,
            shard_attrs={"config": config},
        )
        return settings, progress_name

    try:
        return run_stage_workers(
            ExtractionWorker, worker_args, tasks,
            options=options.ray,
            stage_dir=stage_dir,
            device=options.device,
            total_items=sum(len(task.image_ids) for task in tasks),
            description="extract",
            stats=stats,
        )
    except WorkerStartError as error:
        raise ExtractError(f"no worker could start its detector: {error}") from None


def _summarise(index_frame: pd.DataFrame, listing: InputListing, shard_ids: list[list[str]],
               outcomes: list[TaskOutcome], failed_shards: dict, seconds: float) -> ExtractSummary:
    status = Counter(index_frame["status"])
    reports = [outcome.result for outcome in outcomes if outcome.result is not None]
    return ExtractSummary(
        num_images=len(listing.entries),
        num_ok=status.get("ok", 0),
        num_failed=status.get("failed", 0),
        num_skipped=status.get("skipped", 0),
        num_regions=int(index_frame["num_regions"].sum()),
        shards_total=len(shard_ids),
        shards_written=sum(1 for outcome in outcomes if outcome.error is None),
        shards_reused=len(shard_ids) - len(outcomes),
        failed_shards={int(k): v for k, v in failed_shards.items()},
        seconds=seconds,
        per_node=_throughput_by(reports, lambda report: report.node),
        per_worker=_throughput_by(reports, lambda report: report.worker or report.node),
    )


def _throughput_by(reports: list[ShardReport], group: Callable[[ShardReport], str]) -> dict[str, dict[str, Any]]:
    """Sum the shard reports per group (node or worker).

    Per group: images, shards, worker-seconds, ``images_per_s`` (images per
    worker-second, so the rate of one worker), ``input_wait_share`` (share of the
    worker-seconds spent blocked on image decoding), workers, and the peak memory of one
    worker process.
    """
    groups: dict[str, dict[str, Any]] = {}
    for report in reports:
        figures = groups.setdefault(group(report), {
            "images": 0, "shards": 0, "seconds": 0.0, "input_wait_seconds": 0.0, "peak_rss_mb": 0.0, "workers": set(),
        })
        figures["images"] += report.num_ok + report.num_failed
        figures["shards"] += 1
        figures["seconds"] += report.seconds
        figures["input_wait_seconds"] += report.input_wait_seconds
        figures["peak_rss_mb"] = max(figures["peak_rss_mb"], report.peak_rss_mb)
        figures["workers"].add(report.worker)
    for figures in groups.values():
        seconds = figures["seconds"]
        figures["workers"] = len(figures["workers"])
        figures["images_per_s"] = figures["images"] / seconds if seconds else 0.0
        figures["input_wait_share"] = figures["input_wait_seconds"] / seconds if seconds else 0.0
    return dict(sorted(groups.items()))


def _log_summary(summary: ExtractSummary) -> None:
    logger.info(
        "extract: %d images, %d ok, %d failed, %d non-image files skipped, %d regions; "
        "shards %d written, %d reused, %d failed; %.1f s",
        summary.num_images, summary.num_ok, summary.num_failed, summary.num_skipped, summary.num_regions,
        summary.shards_written, summary.shards_reused, len(summary.failed_shards), summary.seconds,
    )
    if summary.workers_lost or summary.shards_retried:
        logger.warning("%d workers lost, %d replaced, %d shard attempts retried",
                       summary.workers_lost, summary.workers_replaced, summary.shards_retried)
    for node, figures in summary.per_node.items():
        logger.info(
            "node %s: %d images in %d shards by %d workers, %.2f images/s per worker, %.0f%% of worker time "
            "waiting for input, peak worker memory %.0f MiB",
            node, figures["images"], figures["shards"], figures["workers"], figures["images_per_s"],
            100 * figures["input_wait_share"], figures["peak_rss_mb"],
        )
    for index, reason in summary.failed_shards.items():
        logger.error("shard %d failed: %s", index, reason)
    if summary.num_failed:
        logger.warning("%d images failed; `cmsei-prep inspect` lists them with reasons", summary.num_failed)
