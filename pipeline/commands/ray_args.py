"""Command-line options shared by every Ray-parallel stage.

Per-worker resources come from the command line or from a YAML file given with
``--resources``, for example::

    workers: 16
    cpus_per_worker: 4
    gpus_per_worker: 1
    memory_per_worker: 24GiB

A value on the command line wins over the same key in the file.
"""

from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path
from typing import Any

import yaml

from pipeline.ray_runner import DEFAULT_START_TIMEOUT_S, RayOptions

logger = logging.getLogger(__name__)

RESOURCE_KEYS = ("workers", "cpus_per_worker", "gpus_per_worker", "memory_per_worker")

_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3, "t": 1000**4, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


class ResourcesFileError(ValueError):
    """An invalid ``--resources`` file or resource value; the message names the key and the fix."""


def parse_memory_size(value: str | int | float) -> int:
    """Parse a memory size in bytes: ``17179869184``, ``16GiB``, ``16G``, ``512MiB`` or ``1.5GB``.

    Units with an ``i`` are powers of 1024; the others (and a bare ``G``) are powers of 1000.

    Args:
        value: a number of bytes or a string with a unit.

    Raises:
        ResourcesFileError: the value is not a positive size with a known unit.
    """
    if isinstance(value, bool):
        raise ResourcesFileError(f"invalid memory size {value!r}: give bytes or a size such as 16GiB")
    if isinstance(value, (int, float)):
        number, unit = float(value), ""
    else:
        match = _SIZE.match(str(value))
        if not match or match.group(2).lower() not in _UNITS:
            raise ResourcesFileError(
                f"invalid memory size {value!r}: give bytes or a number with a unit (KiB, MiB, GiB, TiB, KB, MB, GB, TB)"
            )
        number, unit = float(match.group(1)), match.group(2).lower()
    size = int(number * _UNITS[unit])
    if size <= 0:
        raise ResourcesFileError(f"invalid memory size {value!r}: it must be more than 0 bytes")
    return size


def load_resources_file(path: str | Path) -> dict[str, Any]:
    """Read a ``--resources`` YAML file into ``{key: value}`` with validated values.

    Args:
        path: YAML mapping with any of the keys ``workers``, ``cpus_per_worker``,
            ``gpus_per_worker`` and ``memory_per_worker``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ResourcesFileError: the file is not a YAML mapping, has an unknown key, or a value
            of the wrong type or range.
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"--resources file not found: {path}") from None
    except yaml.YAMLError as error:
        raise ResourcesFileError(f"--resources file {path} is not valid YAML: {error}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ResourcesFileError(f"--resources file {path} must be a mapping of {', '.join(RESOURCE_KEYS)}")

    unknown = sorted(set(map(str, data)) - set(RESOURCE_KEYS))
    if unknown:
        raise ResourcesFileError(
            f"--resources file {path} has unknown keys {', '.join(unknown)}; allowed keys: {', '.join(RESOURCE_KEYS)}"
        )
    try:
        return {key: _check_resource(key, value) for key, value in data.items()}
    except ResourcesFileError as error:
        raise ResourcesFileError(f"--resources file {path}: {error}") from None


def _check_resource(key: str, value: Any) -> Any:
    if key == "memory_per_worker":
        return parse_memory_size(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ResourcesFileError(f"{key} must be a number, got {value!r}")
    if key == "workers":
        if int(value) != value or value < 1:
            raise ResourcesFileError(f"workers must be a whole number of at least 1, got {value!r}")
        return int(value)
    if key == "cpus_per_worker" and value <= 0:
        raise ResourcesFileError(f"cpus_per_worker must be more than 0, got {value!r}")
    if key == "gpus_per_worker" and value < 0:
        raise ResourcesFileError(f"gpus_per_worker must be 0 or more, got {value!r}")
    return float(value)


def _memory_argument(value: str) -> int:
    try:
        return parse_memory_size(value)
    except ResourcesFileError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_ray_arguments(parser: argparse.ArgumentParser) -> None:
    """Add --address, --resources, --workers, the per-worker resources and the retry options."""
    group = parser.add_argument_group("Ray")
    group.add_argument("--address", help="attach to a Ray cluster: 'auto' or 'ray://host:port' (default: embedded local Ray)")
    group.add_argument("--resources", metavar="FILE", help="YAML file with workers, cpus_per_worker, gpus_per_worker, memory_per_worker; options given on the command line win")
    group.add_argument("--workers", type=int, help="worker actors; may exceed the free resources, extra workers start when Ray places them (default: one per shard up to the CPUs, or one per GPU)")
    group.add_argument("--cpus-per-worker", type=float, help="CPUs reserved per worker; also its torch threads (default: CPUs / workers, at most one node's CPUs)")
    group.add_argument("--gpus-per-worker", type=float, help="GPUs reserved per worker (default: 1 with --device cuda or a GPU cluster, else 0)")
    group.add_argument("--memory-per-worker", type=_memory_argument, help="memory reserved per worker in the Ray scheduler: bytes or a size such as 16GiB")
    group.add_argument("--max-retries", type=int, default=2, help="retries of a shard whose worker died or failed (default: 2)")
    group.add_argument("--start-timeout", type=float, default=DEFAULT_START_TIMEOUT_S, help=f"seconds to wait while no worker is running, e.g. for an autoscaler to add nodes, before giving up; 0 waits forever (default: {DEFAULT_START_TIMEOUT_S:.0f})")


def ray_options_from_args(args: argparse.Namespace) -> RayOptions:
    """Build :class:`RayOptions` from parsed arguments and the ``--resources`` file.

    Raises:
        FileNotFoundError: the ``--resources`` file does not exist.
        ResourcesFileError: the file or a resource option is invalid.
    """
    from_file = load_resources_file(args.resources) if getattr(args, "resources", None) else {}
    values = dict(from_file)
    for key in RESOURCE_KEYS:
        given = getattr(args, key, None)
        if given is not None:
            values[key] = _check_resource(key, given)
    if from_file:
        logger.info("resources from %s: %s", args.resources, ", ".join(f"{k}={v}" for k, v in sorted(values.items())))
    if args.max_retries < 0:
        raise ResourcesFileError(f"--max-retries must be 0 or more, got {args.max_retries}")

    start_timeout = getattr(args, "start_timeout", DEFAULT_START_TIMEOUT_S)
    return RayOptions(
        address=args.address,
        workers=values.get("workers", 0),
        cpus_per_worker=values.get("cpus_per_worker", 0.0),
        gpus_per_worker=values.get("gpus_per_worker", 0.0),
        memory_per_worker=values.get("memory_per_worker"),
        max_retries=args.max_retries,
        start_timeout_s=start_timeout if start_timeout and start_timeout > 0 else None,
    )
