"""Facts about the nodes of a Ray cluster: readable node names and a shared-storage check.

A stage writes its output on storage that every node must see (NFS, Lustre, a cloud
file system). :func:`check_shared_storage` runs one small task on each alive node,
pinned there with ``NodeAffinitySchedulingStrategy``, before any worker starts. Each task
checks that the node sees the file the driver just wrote in the output folder (so the
path is the same storage, not a local folder of the same name) and that it can create,
sync and delete a file there.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path

import ray
from ray.exceptions import GetTimeoutError, RayError, RayTaskError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

logger = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 120.0
TOKEN_PREFIX = ".cmsei-storage-check-"
PROBE_PREFIX = ".cmsei-write-probe-"


class StorageCheckError(RuntimeError):
    """One or more nodes cannot use the output folder; the message names each node."""


@dataclass(frozen=True)
class NodeInfo:
    """One alive Ray node."""

    node_id: str
    hostname: str
    ip: str

    @property
    def label(self) -> str:
        """Hostname, IP and node id prefix, so that two nodes on one machine differ."""
        return format_node_label(self.hostname, self.ip, self.node_id)


def format_node_label(hostname: str, ip: str, node_id: str) -> str:
    """Return the name a node gets in logs and summaries, e.g. ``gpu-07 10.0.3.7 (node 3f2a9c1b)``."""
    return f"{hostname} {ip} (node {node_id[:8]})"


def current_node_label() -> str:
    """Return the label of the node this process runs on (driver or Ray worker).

    Raises:
        RuntimeError: Ray is not initialised in this process.
    """
    if not ray.is_initialized():
        raise RuntimeError("current_node_label needs Ray: call pipeline.ray_runner.init_ray first")
    context = ray.get_runtime_context()
    return format_node_label(socket.gethostname(), ray.util.get_node_ip_address(), context.get_node_id())


def alive_nodes() -> list[NodeInfo]:
    """Return the alive nodes of the connected cluster, sorted by IP and node id."""
    nodes = [
        NodeInfo(node["NodeID"], node.get("NodeManagerHostname", "?"), node.get("NodeManagerAddress", "?"))
        for node in ray.nodes()
        if node.get("Alive")
    ]
    return sorted(nodes, key=lambda node: (node.ip, node.node_id))


def max_node_resource(name: str) -> float:
    """Return the largest amount of resource ``name`` (``"CPU"``, ``"GPU"``) that one alive node offers."""
    amounts = [float(node.get("Resources", {}).get(name, 0.0)) for node in ray.nodes() if node.get("Alive")]
    return max(amounts, default=0.0)


def check_shared_storage(folder: str | os.PathLike, timeout_s: float = PROBE_TIMEOUT_S) -> list[NodeInfo]:
    """Check from every alive node that ``folder`` is shared storage it can write to.

    The driver writes a token file into ``folder``; one task pinned to each alive node
    reads the token back and creates, syncs and deletes a file of its own. Nodes that
    leave the cluster during the check are logged and skipped. The check is skipped when
    the driver's own node is the only node and the driver is not a Ray Client, because
    then the workers share the driver's file system.

    Args:
        folder: output folder; must exist and be writable by the driver.
        timeout_s: seconds to wait for all nodes to answer; a node that has not answered
            by then counts as failed.

    Returns:
        The nodes that passed, sorted by IP and node id.

    Raises:
        StorageCheckError: one or more nodes cannot see or write the folder. The message
            has one line per node: ``node <label> cannot write to <folder>: <reason>``.
        OSError: the driver itself cannot write the token file.
    """
    # NOTE: nodes that join later (an autoscaler, say) are not probed. Only the
    # extraction worker repeats a write check before each shard.
    folder = Path(folder).resolve()
    nodes = alive_nodes()
    if _driver_is_only_node(nodes):
        logger.debug("storage check skipped: the driver's node is the only node")
        return nodes

    token_name, token_value = f"{TOKEN_PREFIX}{uuid.uuid4().hex}", uuid.uuid4().hex
    token_path = folder / token_name
    token_path.write_text(token_value, encoding="ascii")
    try:
        reasons = _probe_nodes(nodes, str(folder), token_name, token_value, timeout_s)
    finally:
        token_path.unlink(missing_ok=True)

    failed = [node for node in nodes if reasons.get(node.node_id)]
    if failed:
        lines = [f"node {node.label} cannot write to {folder}: {reasons[node.node_id]}" for node in failed]
        raise StorageCheckError(
            "\n".join(lines) + "\nevery node must be able to write the output folder on storage that all nodes "
            "share (NFS, Lustre, a cloud file system); fix the mount on the named nodes or choose another --out"
        )

    passed = [node for node in nodes if node.node_id in reasons]
    logger.info("storage check: %d nodes can write to %s", len(passed), folder)
    return passed


def _driver_is_only_node(nodes: list[NodeInfo]) -> bool:
    if len(nodes) != 1 or ray.util.client.ray.is_connected():
        return False
    return nodes[0].node_id == ray.get_runtime_context().get_node_id()


def _probe_nodes(
    nodes: list[NodeInfo], folder: str, token_name: str, token_value: str, timeout_s: float
) -> dict[str, str]:
    """Return {node id: failure reason, or "" when the node passed}; skipped nodes are absent."""
    refs = {}
    for node in nodes:
        strategy = NodeAffinitySchedulingStrategy(node_id=node.node_id, soft=False)
        refs[node.node_id] = _probe_storage.options(scheduling_strategy=strategy).remote(folder, token_name, token_value)

    ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
    reasons = {}
    labels = {node.node_id: node.label for node in nodes}
    for node_id, ref in refs.items():
        try:
            reasons[node_id] = ray.get(ref, timeout=0) or ""
        except GetTimeoutError:
            ray.cancel(ref, force=True)
            reasons[node_id] = f"the node did not answer the storage check within {timeout_s:.0f} s"
        except RayTaskError as error:
            reasons[node_id] = f"the storage check failed: {error.cause!r}"
        except RayError as error:
            logger.warning("node %s left during the storage check, skipping it: %s",
                           labels[node_id], str(error).splitlines()[0])
    return reasons


@ray.remote(num_cpus=0, max_retries=0)
def _probe_storage(folder: str, token_name: str, token_value: str) -> str | None:
    """Runs on one node: return None when ``folder`` is the driver's folder and writable, else why not."""
    path = Path(folder)
    if not path.is_dir():
        return "the folder does not exist on this node; is the shared storage mounted here?"

    try:
        seen = (path / token_name).read_text(encoding="ascii")
    except FileNotFoundError:
        seen = None
    except OSError as error:
        return f"cannot read the folder: {error.strerror or error}"
    if seen != token_value:
        return ("this node does not see the file the driver just wrote there, so the path is not the same "
                "storage on this node (a local folder of the same name?)")

    probe = path / f"{PROBE_PREFIX}{uuid.uuid4().hex}"
    try:
        with open(probe, "wb") as handle:
            handle.write(b"cmsei")
            handle.flush()
            os.fsync(handle.fileno())
        probe.unlink()
    except OSError as error:
        _remove_quietly(probe)
        return error.strerror or str(error)
    return None


def _remove_quietly(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass
