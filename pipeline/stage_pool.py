"""The worker pool of one stage: size it from the cluster, start its actors, run its shard tasks.

The extract, captions and graphs stages all run the same way. The driver attaches to Ray,
checks that the stage folder is shared storage, sizes the pool, starts one long-lived actor
per worker and hands the shard tasks to `run_tasks`. Each stage supplies only its actor
class, the actor's constructor arguments and the task list.

Actors get no Ray restarts: `run_tasks` replaces a dead worker with a fresh actor that any
node with free resources may take, instead of one tied to a lost node.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import ray

from pipeline.cluster import check_shared_storage, max_node_resource
from pipeline.ray_runner import PoolStats, RayOptions, TaskOutcome, create_progress_counter, init_ray, run_tasks

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PoolSize:
    """Worker count and the Ray resources that each worker requests."""

    workers: int
    cpus: float
    gpus: float


def size_pool(options: RayOptions, num_tasks: int, device: str | None) -> PoolSize:
    """Return the pool size, filling the values that `options` leaves unset from the cluster.

    A worker gets `options.gpus_per_worker` GPUs. When that is 0, it gets one GPU if
    `device` is "cuda..." or "auto" on a cluster with GPUs. The default worker count is one per GPU for
    GPU workers and one per CPU otherwise, at most one per task. The default CPU count never
    exceeds the largest node's CPUs, so that a worker fits on one node. More workers than the
    cluster can run at once are allowed: Ray places the rest as resources free up or nodes join.

    Args:
        options: the stage's Ray options; 0 or None for workers and CPUs means unset.
        num_tasks: shard tasks to run, >= 1.
        device: the device the workers compute on; None for work that never uses a GPU.
    """
    resources = ray.cluster_resources()
    total_cpus = max(1, int(resources.get("CPU", 1)))
    total_gpus = int(resources.get("GPU", 0))

    gpus = options.gpus_per_worker
    wants_gpu = device is not None and (device.startswith("cuda") or (device == "auto" and total_gpus > 0))
    if gpus == 0 and wants_gpu:
        gpus = 1.0

    if options.workers:
        workers = options.workers
    elif gpus > 0:
        workers = max(1, min(num_tasks, int(total_gpus / gpus)))
    else:
        workers = max(1, min(num_tasks, total_cpus))
    node_cpus = max(1, int(max_node_resource("CPU")))
    cpus = options.cpus_per_worker or max(1, min(node_cpus, total_cpus // workers))

    size = PoolSize(workers, float(cpus), float(gpus))
    _warn_if_oversubscribed(size, total_cpus, total_gpus)
    return size


def _warn_if_oversubscribed(size: PoolSize, total_cpus: int, total_gpus: int) -> None:
    if size.cpus > max_node_resource("CPU") or size.gpus > max_node_resource("GPU"):
        logger.warning(
            "no node offers %s CPUs and %s GPUs for one worker now; workers wait until such a node joins "
            "(an autoscaler, say) or --start-timeout passes", size.cpus, size.gpus,
        )
        return
    placed = min(int(total_cpus // size.cpus), int(total_gpus // size.gpus) if size.gpus else size.workers)
    if placed < size.workers:
        logger.info("the cluster fits about %d of the %d workers at once; the others start as Ray places them",
                    placed, size.workers)


def run_stage_workers(
    actor_class: type,
    actor_args: Callable[[PoolSize, str], tuple],
    tasks: Sequence[Any],
    *,
    options: RayOptions,
    stage_dir: Path,
    device: str | None,
    total_items: int,
    description: str,
    unit: str = "img",
    probe_ready: bool = True,
    stats: PoolStats | None = None,
) -> list[TaskOutcome]:
    """Run the shard tasks of a stage on a pool of `actor_class` actors.

    Every task needs a `shard_index`, and every actor a `process_shard(task)` method; with
    `probe_ready` the actors also need `describe()`, whose result is logged when they start.

    Args:
        actor_class: the worker class, not yet decorated with `ray.remote`.
        actor_args: returns the constructor arguments from the pool size and the name of
            the progress counter actor.
        tasks: shard tasks, at least one.
        options: cluster address, worker resources, retries and start timeout.
        stage_dir: the stage's output folder, which every node must be able to write.
        device: passed to `size_pool`.
        total_items: images or captions in all tasks, for the progress bar.
        description: progress bar label and log name of the workers.
        unit: progress bar unit.
        probe_ready: wait for `describe()` rather than Ray's built-in ready call.
        stats: filled with worker and retry counts.

    Returns:
        One outcome per task.

    Raises:
        WorkerStartError: when no worker starts within the start timeout.
        StorageCheckError: when a node cannot write `stage_dir`.
    """
    init_ray(options.address)
    check_shared_storage(stage_dir)
    size = size_pool(options, len(tasks), device)
    progress, progress_name = create_progress_counter()
    remote_class = ray.remote(actor_class).options(
        num_cpus=size.cpus, num_gpus=size.gpus, memory=options.memory_per_worker,
        max_restarts=0, max_task_retries=0,
    )

    def start_worker() -> Any:
        return remote_class.remote(*actor_args(size, progress_name))

    actors = [start_worker() for _ in range(size.workers)]
    logger.info("%d %s workers requested with %s CPUs and %s GPUs each", size.workers, description, size.cpus,
                size.gpus)
    return run_tasks(
        actors,
        list(tasks),
        submit=lambda actor, task: actor.process_shard.remote(task),
        key=lambda task: task.shard_index,
        progress=progress,
        total_items=total_items,
        description=description,
        max_retries=options.max_retries,
        unit=unit,
        ready=(lambda actor: actor.describe.remote()) if probe_ready else None,
        replace=start_worker,
        stats=stats,
        start_timeout_s=options.start_timeout_s,
    )
