"""run_tasks worker lifecycle on the session's real two-CPU Ray: placement, loss, start failures."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import ray

from pipeline.ray_runner import PoolStats, WorkerStartError, create_progress_counter, run_tasks

pytestmark = pytest.mark.ray


def _squarer_class(num_cpus: float) -> type:
    """Return a Ray actor class that squares numbers.

    The class is defined inside this function so that Ray pickles it by value: worker
    processes cannot import this test module. It exits hard on task 3 the first time
    when given a crash marker path, and raises in its constructor when ``fail_init``.
    Given a rendezvous folder, each task waits (at most 60 s) until two different
    workers have checked in there, so a test can require two workers at once.
    """

    class Squarer:
        def __init__(self, crash_marker: str | None = None, fail_init: bool = False,
                     rendezvous: str | None = None) -> None:
            if fail_init:
                raise FileNotFoundError("weights file /missing/model.pth not found")
            self.crash_marker = crash_marker
            self.rendezvous = rendezvous

        def square(self, value: int) -> tuple[int, int]:
            if self.crash_marker and value == 3 and not Path(self.crash_marker).exists():
                Path(self.crash_marker).write_text("crashed", encoding="utf-8")
                os._exit(1)
            if self.rendezvous:
                self._meet()
            return value * value, os.getpid()

        def _meet(self) -> None:
            folder = Path(self.rendezvous)
            (folder / str(os.getpid())).touch()
            deadline = time.monotonic() + 60
            while len(list(folder.iterdir())) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)

    return ray.remote(Squarer).options(num_cpus=num_cpus, max_restarts=0)


def _run(actors, tasks, stats, **kwargs):
    progress, _ = create_progress_counter()
    return run_tasks(
        actors, tasks,
        submit=lambda actor, task: actor.square.remote(task),
        key=lambda task: task,
        progress=progress,
        total_items=len(tasks),
        description="test",
        stats=stats,
        **kwargs,
    )


def test_pool_larger_than_cluster(ray_local, tmp_path):
    actor_class = _squarer_class(num_cpus=1)
    actors = [actor_class.remote(rendezvous=str(tmp_path)) for _ in range(3)]
    stats = PoolStats()

    outcomes = _run(actors, list(range(8)), stats)

    assert [outcome.result[0] for outcome in outcomes] == [value * value for value in range(8)]
    assert all(outcome.error is None for outcome in outcomes)
    assert stats.workers_requested == 3
    assert stats.workers_started == 2
    assert len({outcome.result[1] for outcome in outcomes}) == 2
    assert len(list(tmp_path.iterdir())) == 2


def test_dead_worker_replaced(ray_local, tmp_path):
    marker = str(tmp_path / "crashed")
    actor_class = _squarer_class(num_cpus=1)
    actors = [actor_class.remote(marker)]
    stats = PoolStats()

    outcomes = _run(actors, list(range(6)), stats, replace=lambda: actor_class.remote(marker))

    assert Path(marker).exists()
    assert [outcome.result[0] for outcome in outcomes] == [value * value for value in range(6)]
    assert outcomes[3].attempts == 2
    assert stats.workers_lost == 1
    assert stats.workers_replaced == 1
    assert stats.tasks_retried == 1


def test_dead_worker_without_replacement(ray_local, tmp_path):
    marker = str(tmp_path / "crashed")
    actor_class = _squarer_class(num_cpus=1)
    stats = PoolStats()

    outcomes = _run([actor_class.remote(marker)], list(range(6)), stats)

    assert [outcome.error is None for outcome in outcomes] == [True, True, True, False, False, False]
    assert "no worker left" in outcomes[4].error
    assert stats.workers_lost == 1
    assert stats.workers_replaced == 0


def test_constructor_failure_raises(ray_local):
    actor_class = _squarer_class(num_cpus=1)
    actors = [actor_class.remote(fail_init=True) for _ in range(2)]
    stats = PoolStats()

    with pytest.raises(WorkerStartError, match="FileNotFoundError: weights file /missing/model.pth not found"):
        _run(actors, list(range(4)), stats)
    assert stats.workers_failed_to_start == 2


def test_unplaceable_workers_time_out(ray_local):
    actor_class = _squarer_class(num_cpus=64)
    stats = PoolStats()

    with pytest.raises(WorkerStartError, match="no worker has been running for 2 s"):
        _run([actor_class.remote()], list(range(2)), stats, start_timeout_s=2)
    assert stats.workers_started == 0


def test_empty_pool_rejected(ray_local):
    with pytest.raises(ValueError, match="at least one actor"):
        _run([], [1], PoolStats())
