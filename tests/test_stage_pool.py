"""Pool sizing shared by the extract, captions and graphs stages, on the two-CPU local Ray."""

from __future__ import annotations

import logging

import pytest

from pipeline.ray_runner import RayOptions
from pipeline.stage_pool import PoolSize, size_pool


def unset(**values) -> RayOptions:
    """Ray options with the worker count and CPUs left for `size_pool` to fill."""
    return RayOptions(**{"workers": 0, "cpus_per_worker": 0.0, **values})


@pytest.mark.parametrize(
    ("options", "num_tasks", "device", "expected"),
    [
        (unset(), 5, "cpu", PoolSize(2, 1.0, 0.0)),
        (unset(), 1, "cpu", PoolSize(1, 2.0, 0.0)),
        (unset(), 5, "auto", PoolSize(2, 1.0, 0.0)),
        (unset(), 5, None, PoolSize(2, 1.0, 0.0)),
        (unset(workers=3), 5, "cpu", PoolSize(3, 1.0, 0.0)),
        (unset(cpus_per_worker=0.5), 1, "cpu", PoolSize(1, 0.5, 0.0)),
        (unset(gpus_per_worker=0.5), 4, None, PoolSize(1, 2.0, 0.5)),
    ],
)
def test_size_pool_defaults(ray_local, options, num_tasks, device, expected):
    assert size_pool(options, num_tasks, device) == expected


def test_size_pool_cuda_without_gpus_warns(ray_local, caplog):
    with caplog.at_level(logging.WARNING, logger="pipeline.stage_pool"):
        size = size_pool(unset(), 3, "cuda")
    assert size == PoolSize(1, 2.0, 1.0)
    assert "no node offers 2.0 CPUs and 1.0 GPUs" in caplog.text
