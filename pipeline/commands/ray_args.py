"""Command-line options shared by every Ray-parallel stage."""

from __future__ import annotations

import argparse

from pipeline.ray_runner import RayOptions


def add_ray_arguments(parser: argparse.ArgumentParser) -> None:
    """Add --address, --workers and the per-worker resource options."""
    group = parser.add_argument_group("Ray")
    group.add_argument("--address", help="attach to a Ray cluster: 'auto' or 'ray://host:port' (default: embedded local Ray)")
    group.add_argument("--workers", type=int, help="worker actors (default: one per shard up to the CPUs, or one per GPU)")
    group.add_argument("--cpus-per-worker", type=float, help="CPUs reserved per worker; also its torch threads (default: CPUs / workers)")
    group.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs reserved per worker (default: 1 with --device cuda, else 0)")
    group.add_argument("--memory-per-worker", type=int, help="bytes of memory reserved per worker in the Ray scheduler")
    group.add_argument("--max-retries", type=int, default=2, help="retries of a shard whose worker died or failed (default: 2)")


def ray_options_from_args(args: argparse.Namespace) -> RayOptions:
    """Build :class:`RayOptions` from parsed arguments."""
    return RayOptions(
        address=args.address,
        workers=args.workers or 0,
        cpus_per_worker=args.cpus_per_worker or 0.0,
        gpus_per_worker=args.gpus_per_worker,
        memory_per_worker=args.memory_per_worker,
        max_retries=args.max_retries,
    )
