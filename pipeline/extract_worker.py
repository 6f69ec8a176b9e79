"""The extraction worker: a Ray actor that keeps one detector and turns shards into files.

Shapes: N images in a shard, B images in a batch, R regions per image, D feature size.
Inside the actor, images decode in a thread pool ahead of inference, each window of
decoded images is grouped into batches of similar aspect ratio (padding changes
features near image borders, so similar shapes pad less), and rows are written in the
shard's listing order. The time the actor spends blocked on decoding is reported per
shard as its input wait.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

logger = logging.getLogger(__name__)

WINDOW_BATCHES = 8


@dataclass
class ShardTask:
    """One shard of work: the images of one fixed-size chunk of the sorted listing."""

    shard_index: int
    image_ids: list[str]
    paths: list[str]
    out_path: str
    boxes: dict[str, list[list[float]]] | None = None


@dataclass
class ShardReport:
    """Report of one processed shard: counts, failures, time and memory."""

    shard_index: int
    node: str
    num_ok: int
    num_failed: int
    num_regions: int
    failures: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    worker: str = ""
    input_wait_seconds: float = 0.0


@dataclass
class WorkerSettings:
    """Everything a worker needs to build its detector and write shards."""

    detector: str
    overrides: dict[str, Any]
    weights: str
    device: str
    backend: str
    batch_size: int
    feature_dtype: str
    decode_threads: int
    max_pixels: int
    torch_threads: int
    compression: str | None
    shard_attrs: dict[str, Any]


class ExtractionWorker:
    """Ray actor body: build the detector once, then process shard tasks."""

    def __init__(self, settings: WorkerSettings, progress_name: str) -> None:
        import torch

        from extractors.extractor import build_extractor
        from pipeline.cluster import current_node_label
        from pipeline.ray_runner import lookup_progress_counter

        torch.set_num_threads(max(1, settings.torch_threads))
        self.settings = settings
        self.progress = lookup_progress_counter(progress_name)
        self.node = current_node_label()
        self.worker = f"{self.node} pid {os.getpid()}"
        self._input_wait_seconds = 0.0
        self.extractor = build_extractor(
            detector=settings.detector,
            overrides=settings.overrides,
            weights=settings.weights,
            device=settings.device,
            backend=settings.backend,
        )
        self.pool = ThreadPoolExecutor(max_workers=max(1, settings.decode_threads), thread_name_prefix="decode")
        logger.info("worker on %s ready (pid %d, device %s)", self.node, os.getpid(), self.extractor.device)

    def describe(self) -> dict[str, Any]:
        """Return the node, process id and device of this worker."""
        return {"node": self.node, "pid": os.getpid(), "device": str(self.extractor.device)}

    def process_shard(self, task: ShardTask) -> ShardReport:
        """Extract every image of ``task`` and publish its shard file atomically."""
        from pipeline.region_shards import RegionShardWriter

        started = time.monotonic()
        self._input_wait_seconds = 0.0
        out_path = Path(task.out_path)
        _check_writable(out_path.parent, self.node)
        extractor = self.extractor
        attrs = dict(self.settings.shard_attrs) | {"weights_sha256": extractor.weights_sha256}
        writer = RegionShardWriter(
            out_path,
            shard_index=task.shard_index,
            feature_dim=extractor.feature_dim,
            feature_dtype=self.settings.feature_dtype,
            with_class_boxes=bool(extractor.config.get("store_class_boxes", False)),
            attrs=attrs,
            object_names=extractor.object_names,
            attribute_names=extractor.attribute_names,
            compression=self.settings.compression,
        )
        report = ShardReport(task.shard_index, self.node, 0, 0, 0, worker=self.worker)
        with writer:
            for image_id, outcome in self._iter_outcomes(task):
                if isinstance(outcome, str):
                    writer.add_failure(image_id, outcome)
                    report.num_failed += 1
                    report.failures[image_id] = outcome
                else:
                    size, regions = outcome
                    writer.add_image(image_id, size, regions)
                    report.num_ok += 1
                    report.num_regions += len(regions["boxes"])
        report.seconds = time.monotonic() - started
        report.input_wait_seconds = self._input_wait_seconds
        report.peak_rss_mb = _peak_rss_mb()
        return report

    def _iter_outcomes(self, task: ShardTask) -> Iterator[tuple[str, Any]]:
        """Yield ``(image_id, outcome)`` in listing order; an outcome is a reason or (size, regions)."""
        window = max(1, self.settings.batch_size) * WINDOW_BATCHES
        count = len(task.image_ids)
        pending = self._submit_decodes(task, 0, window)
        for start in range(0, count, window):
            current = pending
            pending = self._submit_decodes(task, start + window, window)
            waiting_since = time.monotonic()
            decoded = [future.result() for future in current]
            self._input_wait_seconds += time.monotonic() - waiting_since
            outcomes = self._extract_window(task, start, decoded)
            for offset, outcome in enumerate(outcomes):
                yield task.image_ids[start + offset], outcome

    def _submit_decodes(self, task: ShardTask, start: int, window: int) -> list[Future]:
        from extractors.images import decode_image

        stop = min(start + window, len(task.image_ids))
        max_pixels = self.settings.max_pixels
        return [self.pool.submit(_decode_or_reason, decode_image, task.paths[i], max_pixels) for i in range(start, stop)]

    def _extract_window(self, task: ShardTask, start: int, decoded: list[Any]) -> list[Any]:
        outcomes: list[Any] = [None] * len(decoded)
        ready = []
        for offset, item in enumerate(decoded):
            if isinstance(item, str):
                outcomes[offset] = item
                continue
            boxes, reason = _given_boxes(task, task.image_ids[start + offset], item)
            if reason:
                outcomes[offset] = reason
            else:
                ready.append((offset, item, boxes))
        if len(ready) < len(decoded):
            self.progress.add.remote(task.shard_index, 0, len(decoded) - len(ready))

        for batch in _aspect_batches(ready, self.settings.batch_size):
            batch_outcomes = self._extract_batch(batch)
            for (offset, _, _), outcome in zip(batch, batch_outcomes):
                outcomes[offset] = outcome
            failed = sum(1 for outcome in batch_outcomes if isinstance(outcome, str))
            self.progress.add.remote(task.shard_index, len(batch) - failed, failed)
        return outcomes

    def _extract_batch(self, batch: list[tuple[int, Any, np.ndarray | None]]) -> list[Any]:
        """Run one batch; on an error, retry its images one by one to isolate the culprit."""
        try:
            return self._run_detector(batch)
        except Exception as error:  # noqa: BLE001 - any detector error must become a recorded failure
            if len(batch) == 1:
                logger.warning("extraction failed on one image: %s", error)
                return [f"extraction failed: {type(error).__name__}: {error}"]
            return [self._extract_batch([item])[0] for item in batch]

    def _run_detector(self, batch: list[tuple[int, Any, np.ndarray | None]]) -> list[Any]:
        images = [item.pixels for _, item, _ in batch]
        boxes = None if batch[0][2] is None else [b for _, _, b in batch]
        results = self.extractor.extract(images, boxes=boxes)
        outcomes = []
        for (_, item, _), regions in zip(batch, results):
            reason = _check_regions(regions, self.settings.feature_dtype)
            outcomes.append(reason or ((item.height, item.width), regions))
        return outcomes


def _decode_or_reason(decode: Any, path: str, max_pixels: int) -> Any:
    from extractors.images import ImageDecodeError

    try:
        return decode(path, max_pixels=max_pixels)
    except ImageDecodeError as error:
        return f"{error.reason}: {error}"
    except Exception as error:  # noqa: BLE001 - a decoder bug must not lose the shard
        return f"decode-error: {type(error).__name__}: {error}"


def _given_boxes(task: ShardTask, image_id: str, image: Any) -> tuple[np.ndarray | None, str | None]:
    """Return the boxes given for ``image_id`` clipped to the image, or a failure reason."""
    if task.boxes is None:
        return None, None
    given = task.boxes.get(image_id)
    if not given:
        return None, "no-boxes: the --boxes file gives no boxes for this image"
    boxes = np.asarray(given, dtype=np.float32).reshape(-1, 4)
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, image.width)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, image.height)
    if not np.all(np.isfinite(boxes)):
        return None, "invalid-boxes: the --boxes file has non-finite coordinates for this image"
    return boxes, None


def _aspect_batches(ready: list[tuple[int, Any, Any]], batch_size: int) -> list[list[tuple[int, Any, Any]]]:
    """Group images of similar aspect ratio (width / height) into batches."""
    ordered = sorted(ready, key=lambda item: item[1].width / max(item[1].height, 1))
    size = max(1, batch_size)
    return [ordered[i : i + size] for i in range(0, len(ordered), size)]


def _check_regions(regions: dict[str, np.ndarray], feature_dtype: str) -> str | None:
    """Return a failure reason when the detector output cannot be stored faithfully."""
    features = regions["features"]
    if not np.all(np.isfinite(features)):
        return "invalid-features: the detector produced NaN or infinite features"
    limit = np.finfo(np.dtype(feature_dtype)).max
    if features.size and float(np.abs(features).max()) > limit:
        return f"feature-overflow: features exceed the {feature_dtype} range; rerun with --dtype float32"
    return None


def _peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (Linux reports ru_maxrss in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _check_writable(folder: Path, node: str) -> None:
    probe = folder / f".write-probe-{os.getpid()}-{time.monotonic_ns()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise PermissionError(f"node {node} cannot write to {folder}: {error.strerror}") from None
