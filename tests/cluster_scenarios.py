"""Multi-node Ray scenarios for ``tests/test_cluster.py``, run in their own process.

All nodes of the test cluster run on this machine on 127.0.0.1, each a separate raylet
with its own node id, so the driver sees a real multi-node cluster. The process must
start with ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` in its environment: Ray then keeps
127.0.0.1 as the address of this machine instead of replacing it with the address of
a network interface when the driver attaches to the cluster.

Usage:
    python tests/cluster_scenarios.py run WORKDIR      # writes WORKDIR/results.json
    python tests/cluster_scenarios.py node GCS_ADDRESS # one more worker node (see below)

The ``node`` form starts one worker node in the calling process and keeps it up until
SIGTERM. The storage scenario runs it under ``unshare --mount`` with the output folder
mounted read-only, or another folder mounted over it, so that one node really has no
write access to the output, or does not see the same storage, while the others do.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

logger = logging.getLogger("cluster_scenarios")

NUM_IMAGES = 48
SHARD_SIZE = 4
OBJECT_STORE_BYTES = 150 * 1024 * 1024
# Mark a killed node dead after three missed health checks 500 ms apart, much sooner
# than with Ray's default settings.
HEALTH_CHECK_CONFIG = {"health_check_period_ms": 500, "health_check_timeout_ms": 1000, "health_check_failure_threshold": 3}
NODE_ARGS = {"num_cpus": 1, "node_ip_address": "127.0.0.1", "object_store_memory": OBJECT_STORE_BYTES}


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if len(argv) == 2 and argv[0] == "run":
        return run_scenarios(Path(argv[1]))
    if len(argv) == 2 and argv[0] == "node":
        return serve_node(argv[1])
    sys.stderr.write(__doc__)
    return 2


def run_scenarios(workdir: Path) -> int:
    """Start the cluster, run every scenario and write ``results.json``; return the exit code."""
    from ray.cluster_utils import Cluster

    from tests.imagecases import write_good_images

    if os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") != "0":
        raise SystemExit("set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 so that the cluster stays on 127.0.0.1")
    images = workdir / "images"
    write_good_images(images, NUM_IMAGES, seed=21)
    results: dict[str, Any] = {"hostname": socket.gethostname()}

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "node_ip_address": "127.0.0.1", "include_dashboard": False,
        "object_store_memory": OBJECT_STORE_BYTES, "_system_config": HEALTH_CHECK_CONFIG,
    })
    results["head"] = cluster.head_node.node_id
    try:
        node_a = cluster.add_node(**NODE_ARGS)
        node_b = cluster.add_node(**NODE_ARGS)
        results["reference"] = reference_run(cluster, images, workdir / "reference", [node_a, node_b])
        cluster.remove_node(node_b)
        results["node_loss"] = node_loss_run(cluster, images, workdir / "node-loss", node_a)
        results["storage"] = storage_check_run(cluster, images, workdir)
    except Exception:  # noqa: BLE001 - the test reads the traceback from results.json
        results["error"] = traceback.format_exc()
    finally:
        _shutdown(cluster)

    _write_results(workdir, results)
    return 1 if "error" in results else 0


def reference_run(cluster: Any, images: Path, out: Path, nodes: list[Any]) -> dict[str, Any]:
    """Three workers on two one-CPU nodes: two run, one waits for resources all along."""
    from pipeline.inspect import verify_dataset

    summary = _extract(cluster, images, out, workers=3)
    return {
        "summary": summary.to_dict(),
        "verify": verify_dataset(out),
        "nodes": [node.node_id for node in nodes],
    }


def node_loss_run(cluster: Any, images: Path, out: Path, node: Any) -> dict[str, Any]:
    """One worker on ``node``; kill the node in the middle of a shard, then add a fresh node.

    The worker's replacement can only start on the fresh node, so the run finishes only
    if the pool replaces the lost worker instead of waiting for it.
    """
    from pipeline.inspect import verify_dataset

    outcome: dict[str, Any] = {}

    def extract() -> None:
        try:
            outcome["summary"] = _extract(cluster, images, out, workers=1)
        except Exception:  # noqa: BLE001 - reported through results.json
            outcome["error"] = traceback.format_exc()

    thread = threading.Thread(target=extract, name="extract")
    thread.start()
    in_progress = _wait_for_shard_in_progress(out / "regions", thread)
    published_before = sorted(path.name for path in (out / "regions").glob("shard-*.h5"))
    cluster.remove_node(node, allow_graceful=False)
    logger.info("removed node %s while %s was being written", node.node_id[:8], in_progress)
    fresh = cluster.add_node(**NODE_ARGS)
    thread.join(timeout=600)
    if thread.is_alive():
        raise RuntimeError("extraction did not finish within 600 s after the node loss")
    if "error" in outcome:
        raise RuntimeError(outcome["error"])

    return {
        "summary": outcome["summary"].to_dict(),
        "verify": verify_dataset(out),
        "killed_node": node.node_id,
        "fresh_node": fresh.node_id,
        "in_progress": in_progress,
        "published_before": published_before,
        "leftover_temporaries": sorted(path.name for path in (out / "regions").glob("*.tmp-*")),
    }


def storage_check_run(cluster: Any, images: Path, workdir: Path) -> dict[str, Any]:
    """Add a node that sees the output read-only and one that sees another folder there."""
    if not _can_unshare():
        return {"skipped": "this machine does not allow `unshare --mount` (needs CAP_SYS_ADMIN)"}

    out = workdir / "storage"
    (out / "regions").mkdir(parents=True)
    elsewhere = workdir / "local-copy"
    (elsewhere / "regions").mkdir(parents=True)
    processes: list[subprocess.Popen] = []
    try:
        read_only = _start_namespaced_node(
            cluster, f"mount --bind {out} {out} && mount -o remount,bind,ro {out}", processes
        )
        other_storage = _start_namespaced_node(cluster, f"mount --bind {elsewhere} {out}", processes)
        result = {"read_only_node": read_only, "other_storage_node": other_storage, "error_type": None, "message": ""}
        try:
            _extract(cluster, images, out, workers=1)
        except Exception as error:  # noqa: BLE001 - the test checks the type and message
            result |= {"error_type": type(error).__name__, "message": str(error)}
        return result
    finally:
        for process in processes:
            _stop(process)


def serve_node(gcs_address: str) -> int:
    """Start one worker node of the cluster at ``gcs_address``; keep it up until SIGTERM.

    The node also stops when the scenario process that started it dies.
    """
    import ray._private.node
    import ray._private.parameter

    params = ray._private.parameter.RayParams(
        gcs_address=gcs_address, include_log_monitor=False, node_manager_port=0, min_worker_port=0,
        max_worker_port=0, **NODE_ARGS,
    )
    params.dashboard_agent_listen_port = None
    parent = os.getppid()
    node = ray._private.node.Node(params, head=False, shutdown_at_exit=True, spawn_reaper=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    sys.stdout.write(node.node_id + "\n")
    sys.stdout.flush()
    while not stop.is_set() and os.getppid() == parent:
        stop.wait(1.0)
    node.kill_all_processes(check_alive=False, allow_graceful=True, wait=True)
    return 0


def _extract(cluster: Any, images: Path, out: Path, workers: int) -> Any:
    from pipeline.extract import ExtractOptions, extract_images
    from pipeline.ray_runner import RayOptions

    ray_options = RayOptions(address=cluster.address, workers=workers, cpus_per_worker=1, start_timeout_s=300)
    return extract_images(ExtractOptions(
        images=images, out=out, detector="tiny", weights="untrained", device="cpu", shard_size=SHARD_SIZE,
        ray=ray_options,
    ))


def _wait_for_shard_in_progress(regions: Path, thread: threading.Thread, timeout_s: float = 300.0) -> str:
    """Return the name of a partial shard file once one exists after a shard was published."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and thread.is_alive():
        published = list(regions.glob("shard-*.h5"))
        partial = list(regions.glob("shard-*.h5.tmp-*"))
        if published and partial:
            return partial[0].name
        time.sleep(0.01)
    raise RuntimeError("no shard was in progress after the first one was published; cannot kill a node mid-shard")


def _can_unshare() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"], capture_output=True)
    return probe.returncode == 0


def _start_namespaced_node(cluster: Any, mount_commands: str, processes: list[subprocess.Popen]) -> str:
    """Start ``node`` in a private mount namespace after ``mount_commands``; return its node id.

    The process is appended to ``processes`` as soon as it exists, so the caller can stop it.
    """
    import ray

    command = f"{mount_commands} && exec {sys.executable} {Path(__file__).resolve()} node {cluster.address}"
    process = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", command],
        stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT,
    )
    processes.append(process)
    node_id = process.stdout.readline().strip()
    if not node_id:
        raise RuntimeError(f"the namespaced node did not start (exit code {process.wait(timeout=30)})")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if any(node["NodeID"] == node_id and node["Alive"] for node in ray.nodes()):
            return node_id
        time.sleep(0.2)
    raise RuntimeError(f"node {node_id} did not join the cluster within 60 s")


def _stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=30)


def _shutdown(cluster: Any) -> None:
    import ray

    ray.shutdown()
    cluster.shutdown()


def _write_results(workdir: Path, results: dict[str, Any]) -> None:
    target = workdir / "results.json"
    tmp = target.with_name("results.json.tmp")
    tmp.write_text(json.dumps(results, indent=2, default=str), encoding="utf-8")
    os.replace(tmp, target)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
