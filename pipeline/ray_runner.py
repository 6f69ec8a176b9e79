"""Ray orchestration shared by every stage: start or attach, worker pools, retries, progress.

A stage splits its work into shard tasks. A pool of long-lived actors (one per worker,
each holding its model) takes tasks one at a time; a task whose actor dies or raises is
resubmitted up to ``max_retries`` times, after which it is reported as failed while the
rest of the run goes on. Tasks go only to actors that have started, so a pool larger
than the cluster runs with the actors Ray could place, and a worker lost with its node
is replaced by a fresh actor elsewhere (:mod:`pipeline.worker_pool`). Workers report
progress to a small counter actor on the driver's node that the driver polls for its
progress bar.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayError, RayTaskError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from tqdm import tqdm

from pipeline.worker_pool import PoolStats, WorkerPool, WorkerSlot, WorkerStartError, actor_death_reason, builtin_ready

__all__ = [
    "PoolStats", "ProgressCounter", "RayOptions", "TaskOutcome", "WorkerStartError", "create_progress_counter",
    "init_ray", "lookup_progress_counter", "run_tasks",
]

logger = logging.getLogger(__name__)

POLL_SECONDS = 0.5
DEFAULT_START_TIMEOUT_S = 1800.0


@dataclass
class RayOptions:
    """Cluster address and worker resources of a stage."""

    address: str | None = None
    workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    memory_per_worker: int | None = None
    max_retries: int = 2
    start_timeout_s: float | None = DEFAULT_START_TIMEOUT_S


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Start an embedded local Ray instance, or attach to a cluster.

    Args:
        address: None for an embedded instance on this machine (dashboard off, loopback
            only), ``"auto"`` for the cluster this machine belongs to, or
            ``"ray://host:port"`` for a remote cluster through Ray Client.
        num_cpus: CPUs the embedded instance offers; ignored when attaching.
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        return

    if address:
        logger.info("attaching to Ray cluster at %s", address)
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True)
        return

    logger.info("starting an embedded Ray instance on 127.0.0.1")
    _use_loopback_address()
    # address="local" starts a fresh instance even when this machine already runs a
    # cluster started by `ray start`, which ray.init() would otherwise join.
    ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=False,
        logging_level=logging.WARNING,
        _node_ip_address="127.0.0.1",
        configure_logging=True,
    )


def _use_loopback_address() -> None:
    """Make an embedded Ray instance bind and connect on 127.0.0.1 only.

    Ray resolves "127.0.0.1" to the machine's routable address unless its cluster mode is
    off, so ``_node_ip_address`` alone does not keep it on loopback.
    """
    from ray._private import ray_constants

    # NOTE: relies on Ray's private switch RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER (read by
    # ray._private.services.get_node_ip_address in Ray 2.60); child processes read the
    # environment variable, this process the module constant.
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


@ray.remote(num_cpus=0)
class ProgressCounter:
    """Counts items done and failed per task across all workers of a run.

    Counts are kept per task so that a retried task starts again from zero instead of
    counting its images twice.
    """

    def __init__(self) -> None:
        self.counts: dict = {}

    def add(self, task_key: Any, done: int, failed: int) -> None:
        previous_done, previous_failed = self.counts.get(task_key, (0, 0))
        self.counts[task_key] = (previous_done + done, previous_failed + failed)

    def reset(self, task_key: Any) -> None:
        self.counts.pop(task_key, None)

    def snapshot(self) -> tuple[int, int]:
        done = sum(count[0] for count in self.counts.values())
        failed = sum(count[1] for count in self.counts.values())
        return done, failed


def create_progress_counter() -> tuple[Any, str]:
    """Start a named :class:`ProgressCounter` and return its handle and name.

    Workers look the counter up by name (:func:`lookup_progress_counter`) instead of
    receiving the handle as a constructor argument, so a restarted worker finds it again.
    The counter is pinned to the driver's node whenever Ray reports that node, so the
    loss of a worker node does not take the counter with it.
    """
    name = f"cmsei-progress-{uuid.uuid4().hex[:12]}"
    node_id = ray.get_runtime_context().get_node_id()
    if node_id is None:
        logger.warning("the driver's node is unknown; the progress counter may land on a worker node")
        return ProgressCounter.options(name=name).remote(), name
    strategy = NodeAffinitySchedulingStrategy(node_id=node_id, soft=False)
    return ProgressCounter.options(name=name, scheduling_strategy=strategy).remote(), name


def lookup_progress_counter(name: str) -> Any:
    """Return the handle of the named progress counter."""
    return ray.get_actor(name)


@dataclass
class TaskOutcome:
    """Outcome of one shard task: its result or the error after the last attempt."""

    key: Any
    result: Any = None
    error: str | None = None
    attempts: int = 0


def run_tasks(
    actors: list[Any],
    tasks: list[Any],
    submit: Callable[[Any, Any], Any],
    key: Callable[[Any], Any],
    progress: Any,
    total_items: int,
    description: str,
    max_retries: int = 2,
    on_result: Callable[[TaskOutcome], None] | None = None,
    unit: str = "img",
    ready: Callable[[Any], Any] | None = None,
    replace: Callable[[], Any] | None = None,
    stats: PoolStats | None = None,
    start_timeout_s: float | None = None,
    max_replacements: int | None = None,
) -> list[TaskOutcome]:
    """Run ``tasks`` over a pool of actors, one task per actor at a time.

    Tasks go to the actors that have started, so a pool larger than the cluster's free
    resources runs while the other actors wait to be placed. A task whose actor dies or
    raises is resubmitted to any worker up to ``max_retries`` times. A dead actor is
    probed again (Ray may have restarted it) and otherwise replaced through ``replace``.

    Args:
        actors: Ray actor handles, at least one; they may still be waiting for resources.
        tasks: task descriptions, submitted in order.
        submit: ``submit(actor, task)`` returns the ObjectRef of the remote call.
        key: ``key(task)`` names the task in logs and outcomes.
        progress: a :class:`ProgressCounter` handle the workers report to.
        total_items: total of the items (images, captions) in all tasks, for the bar.
        description: progress bar label.
        max_retries: resubmissions of a task after its first failure.
        on_result: called on the driver for each finished outcome, in completion order.
        unit: progress bar unit.
        ready: ``ready(actor)`` returns an ObjectRef that resolves once the actor is
            built; its value, when a dict, is logged. Default: Ray's built-in
            ``__ray_ready__`` call.
        replace: creates a fresh actor for one that died; None drops dead actors.
        stats: a :class:`PoolStats` to fill with worker and retry counts.
        start_timeout_s: give up after this many seconds without any running worker;
            None waits forever.
        max_replacements: most fresh actors created over the run; default
            ``len(actors) * (max_retries + 1)``.

    Returns:
        One :class:`TaskOutcome` per task, in the order of ``tasks``. When every worker
        is gone, the tasks not yet done get an outcome with an error.

    Raises:
        ValueError: ``actors`` is empty.
        WorkerStartError: no worker could be built (every constructor raised), or none
            was placed within ``start_timeout_s``.
    """
    if not actors:
        raise ValueError("run_tasks needs at least one actor; got an empty list")
    stats = stats if stats is not None else PoolStats()
    budget = max_replacements if max_replacements is not None else len(actors) * (max_retries + 1)
    pool = WorkerPool(actors, ready or builtin_ready, replace, stats, budget, start_timeout_s)
    queue = deque(tasks)
    attempts: dict[Any, int] = {key(task): 0 for task in tasks}
    outcomes: dict[Any, TaskOutcome] = {}
    started = time.monotonic()

    interactive = sys.stderr.isatty()
    with tqdm(total=total_items, desc=description, unit=unit, dynamic_ncols=True,
              mininterval=0.5 if interactive else 10.0) as bar:
        while queue or pool.busy():
            if not pool.slots:
                _fail_remaining(queue, key, attempts, outcomes, on_result)
                break
            _fill_slots(pool, queue, submit, key, attempts)
            ready_refs, _ = ray.wait(pool.refs(), num_returns=1, timeout=POLL_SECONDS)
            for ref in ready_refs:
                slot, is_probe = pool.find(ref)
                if is_probe:
                    pool.on_probe_done(slot)
                    continue
                outcome = _collect(pool, slot, key, attempts, max_retries, queue, progress)
                if outcome is not None:
                    outcomes[outcome.key] = outcome
                    if on_result is not None:
                        on_result(outcome)
            pool.log_pending()
            pool.check_stalled()
            _update_bar(bar, progress, started)
    pool.stop_starting()

    return [outcomes[key(task)] for task in tasks]


def _fill_slots(pool: WorkerPool, queue: deque, submit: Callable, key: Callable, attempts: dict) -> None:
    for slot in pool.idle_slots():
        if not queue:
            return
        task = queue.popleft()
        attempts[key(task)] += 1
        slot.task = task
        slot.ref = submit(slot.actor, task)


def _collect(
    pool: WorkerPool, slot: WorkerSlot, key: Callable, attempts: dict, max_retries: int, queue: deque, progress: Any
) -> TaskOutcome | None:
    task, ref = slot.task, slot.ref
    slot.task, slot.ref = None, None
    task_key = key(task)
    try:
        result = ray.get(ref)
        return TaskOutcome(task_key, result=result, attempts=attempts[task_key])
    except (RayActorError, RayTaskError, GetTimeoutError) as error:
        reason = _short_error(error)
        if isinstance(error, RayActorError):
            pool.on_actor_error(slot, reason)
        _reset_progress(progress, task_key)
        if attempts[task_key] <= max_retries:
            logger.warning("task %s failed (attempt %d): %s; retrying", task_key, attempts[task_key], reason)
            pool.stats.tasks_retried += 1
            queue.append(task)
            return None
        logger.error("task %s failed %d times, giving up: %s", task_key, attempts[task_key], reason)
        return TaskOutcome(task_key, error=reason, attempts=attempts[task_key])


def _fail_remaining(queue: deque, key: Callable, attempts: dict, outcomes: dict, on_result: Callable | None) -> None:
    """Give every task still queued an error outcome once no worker is left."""
    reason = "no worker left to run this task: every worker died or could not start (see the log above)"
    logger.error("no worker left; %d tasks not run", len(queue))
    while queue:
        task = queue.popleft()
        outcome = TaskOutcome(key(task), error=reason, attempts=attempts[key(task)])
        outcomes[outcome.key] = outcome
        if on_result is not None:
            on_result(outcome)


def _short_error(error: Exception) -> str:
    if isinstance(error, RayTaskError):
        cause = error.cause if getattr(error, "cause", None) is not None else error
        return f"{type(cause).__name__}: {cause}".splitlines()[0][:500]
    if isinstance(error, RayActorError):
        return f"the worker process died (killed, out of memory, or its node was lost): {actor_death_reason(error)}"
    return str(error).splitlines()[0][:500]


def _reset_progress(progress: Any, task_key: Any) -> None:
    try:
        progress.reset.remote(task_key)
    except RayError as error:
        logger.debug("progress counter unavailable: %s", error)


def _update_bar(bar: tqdm, progress: Any, started: float) -> None:
    """Move the bar to the workers' count; tqdm's mininterval rate-limits the output."""
    try:
        done, failed = ray.get(progress.snapshot.remote(), timeout=POLL_SECONDS * 20)
    except RayError as error:
        logger.debug("progress counter unavailable: %s", error)
        return
    if done + failed == bar.n:
        return
    elapsed = max(time.monotonic() - started, 1e-9)
    bar.set_postfix(failed=failed, per_s=f"{(done + failed) / elapsed:.2f}", refresh=False)
    bar.update(done + failed - bar.n)
