"""Extraction on a real multi-node Ray cluster: spread, node loss, and a node without access.

The scenarios run once, in a subprocess (``tests/cluster_scenarios.py``), so that the
cluster's Ray never meets the session's embedded Ray of ``ray_local``. The cluster is a
head without CPUs plus one-CPU worker nodes, all raylets on 127.0.0.1 of this machine:

- reference: 3 workers requested on 2 nodes, so one waits for resources all run long;
- node loss: 1 worker, whose node is killed (no graceful shutdown) while a shard file is
  being written. Then a fresh node joins, so only a replacement worker can finish;
- storage: two extra nodes run in private mount namespaces, one with the output folder
  mounted read-only and one with another folder mounted over it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

from pipeline.cluster import format_node_label

pytestmark = [pytest.mark.slow, pytest.mark.ray]

REPO_ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = REPO_ROOT / "tests" / "cluster_scenarios.py"
NUM_SHARDS = 12


@pytest.fixture(scope="module")
def scenarios(tmp_path_factory) -> tuple[dict, Path]:
    workdir = tmp_path_factory.mktemp("cluster")
    env = os.environ | {
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
    }
    process = subprocess.run(
        [sys.executable, str(SCENARIOS), "run", str(workdir)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    results_path = workdir / "results.json"
    assert results_path.exists(), f"no results (exit code {process.returncode}):\n{process.stderr[-4000:]}"
    results = json.loads(results_path.read_text(encoding="utf-8"))
    assert "error" not in results, results["error"] + "\n" + process.stderr[-3000:]
    return results, workdir


def _label(results: dict, node_id: str) -> str:
    return format_node_label(results["hostname"], "127.0.0.1", node_id)


def test_reference_run_uses_both_nodes(scenarios):
    results, _ = scenarios
    reference = results["reference"]
    summary = reference["summary"]
    expected = sorted(_label(results, node_id) for node_id in reference["nodes"])

    assert sorted(summary["per_node"]) == expected
    for figures in summary["per_node"].values():
        assert figures["images"] > 0
        assert 0.0 <= figures["input_wait_share"] <= 1.0
    assert sum(figures["images"] for figures in summary["per_node"].values()) == 48
    assert summary["workers_started"] == 2
    assert len(summary["per_worker"]) == 2
    assert summary["failed_shards"] == {}
    assert reference["verify"] == {"regions": []}


def test_node_loss_run_recovers(scenarios):
    results, _ = scenarios
    loss = results["node_loss"]
    summary = loss["summary"]

    assert loss["published_before"], "the node was killed before any shard was published"
    assert summary["workers_lost"] >= 1
    assert summary["workers_replaced"] >= 1
    assert summary["shards_retried"] >= 1
    assert summary["failed_shards"] == {}
    assert summary["num_ok"] == 48
    assert summary["shards_written"] == NUM_SHARDS
    assert _label(results, loss["fresh_node"]) in summary["per_node"]
    assert _label(results, loss["killed_node"]) in summary["per_node"]
    assert loss["verify"] == {"regions": []}
    assert loss["leftover_temporaries"] == []


def test_node_loss_result_equals_reference(scenarios):
    _, workdir = scenarios
    reference = workdir / "reference" / "regions"
    disturbed = workdir / "node-loss" / "regions"

    assert sorted(p.name for p in disturbed.iterdir()) == sorted(p.name for p in reference.iterdir())
    pd.testing.assert_frame_equal(pd.read_parquet(disturbed / "index.parquet"), pd.read_parquet(reference / "index.parquet"))
    for index in range(NUM_SHARDS):
        name = f"shard-{index:05d}.h5"
        with h5py.File(reference / name, "r") as expected, h5py.File(disturbed / name, "r") as actual:
            assert sorted(actual.keys()) == sorted(expected.keys()), name
            for key in expected:
                assert np.array_equal(actual[key][()], expected[key][()]), f"{name}:{key}"
            assert dict(actual.attrs) == dict(expected.attrs), name


def test_node_without_access_named(scenarios):
    results, workdir = scenarios
    storage = results["storage"]
    if "skipped" in storage:
        pytest.skip(storage["skipped"])
    folder = (workdir / "storage" / "regions").resolve()
    lines = storage["message"].splitlines()
    read_only = f"node {_label(results, storage['read_only_node'])} cannot write to {folder}: Read-only file system"
    other = f"node {_label(results, storage['other_storage_node'])} cannot write to {folder}: "

    assert storage["error_type"] == "StorageCheckError"
    assert read_only in lines
    assert any(line.startswith(other) and "not the same storage" in line for line in lines)
    assert not any(results["head"][:8] in line for line in lines)
    assert not any(results["node_loss"]["fresh_node"][:8] in line for line in lines)
