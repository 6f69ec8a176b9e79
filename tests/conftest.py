"""Shared fixtures: the sample-data folder, one small local Ray instance per session, one torch thread."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

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


@pytest.fixture
def one_torch_thread():
    """Run a test on one torch thread: model tests use tiny tensors, and on a loaded machine
    extra OpenMP threads slow them down many times over."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
