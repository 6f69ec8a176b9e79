"""Lifecycle of the worker actors behind :func:`pipeline.ray_runner.run_tasks`.

Each worker slot refers to one Ray actor and is starting, idle or busy. A starting slot
waits on a ready probe (a cheap actor call that resolves once the actor is placed and
built), so a pool larger than the cluster runs with the actors that got placed while the
rest wait for resources. When a worker dies (its process is killed or its node is
lost), the slot probes the actor again: an actor that Ray restarted keeps serving, and a
dead one is replaced by a fresh actor that Ray may place on any node.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

import ray
from ray.exceptions import RayActorError, RayError

logger = logging.getLogger(__name__)

PENDING_LOG_SECONDS = 60.0
PENDING_CHANGE_LOG_SECONDS = 10.0


class WorkerStartError(RuntimeError):
    """No worker of a pool could start or be placed; the message gives the cause."""


@dataclass
class PoolStats:
    """Worker lifecycle counts of one :func:`pipeline.ray_runner.run_tasks` call."""

    workers_requested: int = 0
    workers_started: int = 0
    workers_lost: int = 0
    workers_replaced: int = 0
    workers_failed_to_start: int = 0
    tasks_retried: int = 0


@dataclass
class WorkerSlot:
    """One worker of the pool: its actor and what the actor is doing."""

    number: int
    actor: Any
    probe: Any = None
    task: Any = None
    ref: Any = None
    loss_counted: bool = False

    @property
    def idle(self) -> bool:
        """Whether the actor is started and has no task."""
        return self.probe is None and self.ref is None


def builtin_ready(actor: Any) -> Any:
    """Return an ObjectRef that resolves once ``actor`` is placed and constructed."""
    return actor.__ray_ready__.remote()


class WorkerPool:
    """Slots of worker actors with start, loss and replacement handling.

    Args:
        actors: Ray actor handles, already created (they may still wait for resources).
        ready: ``ready(actor)`` returns an ObjectRef that resolves once the actor is built.
        replace: creates a fresh actor for a dead one; None drops dead workers instead.
        stats: counters to fill.
        max_replacements: most fresh actors created over the whole run.
        start_timeout_s: seconds without any running worker after which the pool gives
            up; None waits forever (for an autoscaler, say).
    """

    def __init__(
        self,
        actors: list[Any],
        ready: Callable[[Any], Any],
        replace: Callable[[], Any] | None,
        stats: PoolStats,
        max_replacements: int,
        start_timeout_s: float | None,
    ) -> None:
        self._ready = ready
        self._replace = replace
        self.stats = stats
        self._max_replacements = max_replacements
        self._start_timeout_s = start_timeout_s
        self.slots = [WorkerSlot(number, actor, probe=ready(actor)) for number, actor in enumerate(actors, 1)]
        stats.workers_requested += len(actors)
        self._first_start_error: str | None = None
        self._last_running = time.monotonic()
        self._pending_logged: tuple[float, int] | None = None

    def busy(self) -> bool:
        """Return whether any worker is running a task."""
        return any(slot.ref is not None for slot in self.slots)

    def idle_slots(self) -> list[WorkerSlot]:
        """Return the started workers without a task."""
        return [slot for slot in self.slots if slot.idle]

    def refs(self) -> list[Any]:
        """Return the ObjectRefs to wait on: ready probes and running tasks."""
        return [ref for slot in self.slots for ref in (slot.probe, slot.ref) if ref is not None]

    def find(self, ref: Any) -> tuple[WorkerSlot, bool]:
        """Return the slot that owns ``ref`` and whether ``ref`` is its ready probe."""
        for slot in self.slots:
            if slot.probe == ref:
                return slot, True
            if slot.ref == ref:
                return slot, False
        raise KeyError(f"no worker slot owns {ref}")

    def on_probe_done(self, slot: WorkerSlot) -> None:
        """Mark the worker started, or handle its death or failed construction."""
        probe, slot.probe = slot.probe, None
        try:
            description = ray.get(probe)
        except RayError as error:
            self._on_start_failure(slot, error)
            return

        slot.loss_counted = False
        self.stats.workers_started += 1
        suffix = "" if not isinstance(description, dict) else ": " + ", ".join(f"{k} {v}" for k, v in description.items())
        logger.info("worker %d started%s", slot.number, suffix)

    def on_actor_error(self, slot: WorkerSlot, reason: str) -> None:
        """Count a worker that died during a task and probe it again."""
        if not slot.loss_counted:
            slot.loss_counted = True
            self.stats.workers_lost += 1
        logger.warning("worker %d lost: %s", slot.number, reason)
        slot.probe = self._ready(slot.actor)

    def log_pending(self) -> None:
        """Log how many workers are starting or waiting for resources, rate-limited."""
        pending = sum(1 for slot in self.slots if slot.probe is not None)
        now = time.monotonic()
        if self._pending_logged is not None:
            logged_at, logged_count = self._pending_logged
            changed = pending != logged_count and now - logged_at >= PENDING_CHANGE_LOG_SECONDS
            reminder = pending > 0 and now - logged_at >= PENDING_LOG_SECONDS
            if not (changed or reminder):
                return
        self._pending_logged = (now, pending)
        running = len(self.slots) - pending
        logger.info("%d of %d workers running, %d starting or waiting for cluster resources",
                    running, len(self.slots), pending)

    def check_stalled(self) -> None:
        """Give up when no worker has been running for ``start_timeout_s``.

        Raises:
            WorkerStartError: no worker of this run ever started within the timeout.
        """
        now = time.monotonic()
        if any(slot.probe is None for slot in self.slots):
            self._last_running = now
            return
        if self._start_timeout_s is None or now - self._last_running < self._start_timeout_s:
            return

        waited = f"no worker has been running for {self._start_timeout_s:.0f} s"
        if self.stats.workers_started == 0:
            self._drop_all()
            raise WorkerStartError(
                f"{waited}: no node offers the CPUs, GPUs and memory one worker requests, or the workers cannot "
                "start there; lower --cpus-per-worker, --gpus-per-worker or --memory-per-worker, add nodes, or "
                "raise --start-timeout"
            )
        logger.error("%s; giving up on the %d workers still starting", waited, len(self.slots))
        self._drop_all()

    def stop_starting(self) -> None:
        """Kill the workers still starting once the work is done, so they stop taking resources."""
        starting = [slot for slot in self.slots if slot.probe is not None]
        for slot in starting:
            self._kill(slot.actor)
        if starting:
            logger.info("stopped %d workers that were still starting when the work ran out", len(starting))

    def _on_start_failure(self, slot: WorkerSlot, error: Exception) -> None:
        reason = actor_death_reason(error)
        if isinstance(error, RayActorError) and error.actor_init_failed:
            self.stats.workers_failed_to_start += 1
            self._first_start_error = self._first_start_error or _construction_error(error)
            logger.error("worker %d failed to start: %s", slot.number, self._first_start_error)
            self._drop(slot)
            self._raise_if_none_can_start()
            return

        if not slot.loss_counted:
            slot.loss_counted = True
            self.stats.workers_lost += 1
        if self._replace is None or self.stats.workers_replaced >= self._max_replacements:
            logger.warning("worker %d is dead and is not replaced (%d replacements made): %s",
                           slot.number, self.stats.workers_replaced, reason)
            self._drop(slot)
            return

        self._kill(slot.actor)
        slot.actor = self._replace()
        slot.probe = self._ready(slot.actor)
        self.stats.workers_replaced += 1
        logger.warning("worker %d is dead (%s); starting a fresh worker that any node may take", slot.number, reason)

    def _raise_if_none_can_start(self) -> None:
        if self.stats.workers_started == 0 and not self.slots:
            raise WorkerStartError(f"no worker could start: {self._first_start_error}")

    def _drop(self, slot: WorkerSlot) -> None:
        self._kill(slot.actor)
        self.slots.remove(slot)

    def _drop_all(self) -> None:
        for slot in list(self.slots):
            self._drop(slot)

    @staticmethod
    def _kill(actor: Any) -> None:
        """Stop an actor so that a pending restart does not take resources later."""
        try:
            ray.kill(actor, no_restart=True)
        except (RayError, ValueError) as error:
            logger.debug("could not kill a dead worker: %s", error)


def _construction_error(error: RayActorError) -> str:
    """Return the last error line of a failed actor constructor, e.g. ``FileNotFoundError: ...``."""
    lines = [line.strip() for line in str(getattr(error, "error_msg", None) or error).splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line and not line.startswith("ray.exceptions")]
    if errors:
        return errors[-1][:500]
    if lines:
        return lines[-1][:500]
    return "unknown error"


def actor_death_reason(error: Exception) -> str:
    """Return Ray's cause of an actor's death and its node IP, or the error's first line.

    Ray's ActorDiedError message is a fixed first line, tab-indented fields (class name,
    actor id, pid, ip, ...) and then the cause, e.g. that the actor's node died.
    """
    lines = [line for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    fields = dict(line.strip().split(": ", 1) for line in lines[1:] if line.startswith("\t") and ": " in line)
    causes = [line.strip() for line in lines[1:] if not line.startswith("\t")]
    reason = causes[0] if causes else lines[0].strip()
    if "ip" in fields:
        reason = f"{reason} (node IP {fields['ip']})"
    return reason[:300]
