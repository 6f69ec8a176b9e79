"""Ray orchestration shared by every stage: start or attach, worker pools, retries, progress.

A stage splits its work into shard tasks. A pool of long-lived actors (one per worker,
each holding its model) takes tasks one at a time; a task whose actor dies or raises is
resubmitted up to ``max_retries`` times, after which it is reported as failed while the
rest of the run goes on. Workers report progress to a small counter actor that the
driver polls for its progress bar.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from tqdm import tqdm

logger = logging.getLogger(__name__)

POLL_SECONDS = 0.5


@dataclass
class RayOptions:
    """Where and how wide a stage runs."""

    address: str | None = None
    workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    memory_per_worker: int | None = None
    max_retries: int = 2


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

    logger.info("starting an embedded Ray instance")
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=False,
        logging_level=logging.WARNING,
        _node_ip_address="127.0.0.1",
        configure_logging=True,
    )


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
    """
    name = f"cmsei-progress-{uuid.uuid4().hex[:12]}"
    return ProgressCounter.options(name=name).remote(), name


def lookup_progress_counter(name: str) -> Any:
    """Return the handle of the named progress counter."""
    return ray.get_actor(name)


@dataclass
class TaskOutcome:
    """What became of one shard task."""

    key: Any
    result: Any = None
    error: str | None = None
    attempts: int = 0


@dataclass
class _Slot:
    actor: Any
    task: Any = None
    ref: Any = None
    attempts: dict = field(default_factory=dict)


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
) -> list[TaskOutcome]:
    """Run ``tasks`` over a pool of actors, one task per actor at a time.

    Args:
        actors: Ray actor handles; a dead actor that Ray restarts keeps serving.
        tasks: task descriptions, submitted in order.
        submit: ``submit(actor, task)`` returns the ObjectRef of the remote call.
        key: ``key(task)`` names the task in logs and outcomes.
        progress: a :class:`ProgressCounter` handle the workers report to.
        total_items: total of the items (images, captions) in all tasks, for the bar.
        description: progress bar label.
        max_retries: resubmissions of a task after its first failure.
        on_result: called on the driver for each finished outcome, in completion order.
        unit: progress bar unit.

    Returns:
        One :class:`TaskOutcome` per task, in the order of ``tasks``.
    """
    queue = deque(tasks)
    attempts: dict[Any, int] = {key(task): 0 for task in tasks}
    outcomes: dict[Any, TaskOutcome] = {}
    slots = [_Slot(actor) for actor in actors]
    started = time.monotonic()

    interactive = sys.stderr.isatty()
    with tqdm(total=total_items, desc=description, unit=unit, dynamic_ncols=True,
              mininterval=0.5 if interactive else 10.0) as bar:
        while queue or any(slot.ref is not None for slot in slots):
            _fill_slots(slots, queue, submit, key, attempts)
            refs = [slot.ref for slot in slots if slot.ref is not None]
            ready, _ = ray.wait(refs, num_returns=1, timeout=POLL_SECONDS)
            for ref in ready:
                slot = next(s for s in slots if s.ref == ref)
                outcome = _collect(slot, key, attempts, max_retries, queue, progress)
                if outcome is not None:
                    outcomes[outcome.key] = outcome
                    if on_result is not None:
                        on_result(outcome)
            _update_bar(bar, progress, started)

    return [outcomes[key(task)] for task in tasks]


def _fill_slots(slots: list[_Slot], queue: deque, submit: Callable, key: Callable, attempts: dict) -> None:
    for slot in slots:
        if slot.ref is None and queue:
            task = queue.popleft()
            attempts[key(task)] += 1
            slot.task = task
            slot.ref = submit(slot.actor, task)


def _collect(
    slot: _Slot, key: Callable, attempts: dict, max_retries: int, queue: deque, progress: Any
) -> TaskOutcome | None:
    task, ref = slot.task, slot.ref
    slot.task, slot.ref = None, None
    task_key = key(task)
    try:
        result = ray.get(ref)
        return TaskOutcome(task_key, result=result, attempts=attempts[task_key])
    except (RayActorError, RayTaskError, GetTimeoutError) as error:
        reason = _short_error(error)
        progress.reset.remote(task_key)
        if attempts[task_key] <= max_retries:
            logger.warning("task %s failed (attempt %d): %s; retrying", task_key, attempts[task_key], reason)
            queue.append(task)
            return None
        logger.error("task %s failed %d times, giving up: %s", task_key, attempts[task_key], reason)
        return TaskOutcome(task_key, error=reason, attempts=attempts[task_key])


def _short_error(error: Exception) -> str:
    if isinstance(error, RayTaskError):
        cause = error.cause if getattr(error, "cause", None) is not None else error
        return f"{type(cause).__name__}: {cause}".splitlines()[0][:500]
    if isinstance(error, RayActorError):
        return "the worker process died (killed, out of memory, or its node was lost)"
    return str(error).splitlines()[0][:500]


def _update_bar(bar: tqdm, progress: Any, started: float) -> None:
    """Move the bar to the workers' count; tqdm's mininterval rate-limits the output."""
    done, failed = ray.get(progress.snapshot.remote())
    if done + failed == bar.n:
        return
    elapsed = max(time.monotonic() - started, 1e-9)
    bar.set_postfix(failed=failed, per_s=f"{(done + failed) / elapsed:.2f}", refresh=False)
    bar.update(done + failed - bar.n)
