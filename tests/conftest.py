"""Shared fixtures: the sample-data folder and one small local Ray instance per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def sample_data_dir() -> Path:
    """Return the real sample-data folder (``CMSEI_SAMPLE_DATA``, default ``../shared/data``)."""
    return Path(os.environ.get("CMSEI_SAMPLE_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def sample_data() -> Path:
    """The real sample data; tests using it skip where it is absent."""
    path = sample_data_dir()
    if not path.is_dir():
        pytest.skip(f"sample data not found at {path} (set CMSEI_SAMPLE_DATA)")
    return path


@pytest.fixture(scope="session")
def ray_local():
    """A real two-CPU Ray instance on loopback shared by the tests of a session."""
    import ray

    from pipeline.ray_runner import init_ray

    init_ray(num_cpus=2)
    yield ray
    ray.shutdown()
