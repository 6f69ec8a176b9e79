"""Kill the extraction command with SIGKILL part-way, rerun it, and check the result."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.dataset import DatasetFolder
from pipeline.inspect import verify_dataset
from tests.imagecases import write_good_images

pytestmark = pytest.mark.slow


def _command(images: Path, out: Path) -> list[str]:
    return [
        sys.executable, "-m", "pipeline.cli", "extract", "--images", str(images), "--out", str(out),
        "--detector", "tiny", "--weights", "untrained", "--shard-size", "4", "--workers", "1",
        "--cpus-per-worker", "1",
    ]


def test_sigkill_then_rerun(tmp_path):
    images = tmp_path / "images"
    write_good_images(images, 40, seed=11)
    out = tmp_path / "data"
    env = os.environ | {"RAY_USAGE_STATS_ENABLED": "0"}

    process = subprocess.Popen(_command(images, out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    regions = out / "regions"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if len(list(regions.glob("shard-*.h5"))) >= 2:
            break
        time.sleep(0.05)
    assert process.poll() is None, "the run finished before it could be killed; " + process.stderr.read().decode()[-2000:]
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    written_before = len(list(regions.glob("shard-*.h5")))
    assert 2 <= written_before < 10

    rerun = subprocess.run(_command(images, out), env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]

    index = DatasetFolder(out).region_index()
    assert sorted(index["image_id"]) == sorted(p.name for p in images.iterdir())
    assert not index["image_id"].duplicated().any()
    assert (index["status"] == "ok").all()
    assert verify_dataset(out) == {"regions": []}
    assert len(list(regions.glob("shard-*.h5"))) == 10
    assert not list(regions.glob("*.tmp-*"))
