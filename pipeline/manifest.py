"""Stage manifests: what a stage's shards were built from, so a rerun can resume safely.

Each stage folder contains ``manifest.json`` (input source, digest of the sorted input
listing, the resolved configuration and its digest, shard size and count) and
``listing.parquet`` (image id, path and shard of every input). A rerun whose listing or
configuration differs from the recorded one stops instead of mixing incompatible shards.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline import __version__
from pipeline.atomic import atomic_path, write_json

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
LISTING_NAME = "listing.parquet"


class StageConflictError(RuntimeError):
    """A rerun's input listing or configuration differs from the recorded one."""


def file_sha256(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> str:
    """Return the hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk_bytes), b""):
            digest.update(block)
    return digest.hexdigest()


def config_digest(config: dict[str, Any]) -> str:
    """Return a stable sha256 of a JSON-serialisable configuration."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def read_manifest(stage_dir: Path) -> dict[str, Any] | None:
    """Return the stage's manifest, or None when the stage has not run."""
    path = stage_dir / MANIFEST_NAME
    if not path.exists():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def prepare_stage(
    stage_dir: Path,
    stage: str,
    listing_digest: str,
    config: dict[str, Any],
    extra: dict[str, Any],
    overwrite: bool,
) -> dict[str, Any]:
    """Create or check a stage folder and return its manifest.

    Args:
        stage_dir: the stage's folder inside the dataset folder.
        stage: stage name, e.g. ``"regions"``.
        listing_digest: digest of the sorted input ids.
        config: the resolved configuration that determines the shard contents.
        extra: further manifest fields (input source, counts, shard size, ...).
        overwrite: delete an existing stage folder that disagrees instead of stopping.

    Raises:
        StageConflictError: the folder contains a run over other inputs or another
            configuration and ``overwrite`` is false.
    """
    digest = config_digest(config)
    existing = read_manifest(stage_dir)
    if existing is not None:
        conflict = _describe_conflict(existing, listing_digest, digest, extra)
        if conflict and not overwrite:
            raise StageConflictError(
                f"{stage_dir} already contains a {stage} run with {conflict}; "
                "use the same inputs and options to resume, another --out folder, or --overwrite to replace it"
            )
        if conflict:
            logger.warning("--overwrite: removing the previous %s run in %s (%s)", stage, stage_dir, conflict)
            shutil.rmtree(stage_dir)
        else:
            return existing

    stage_dir.mkdir(parents=True, exist_ok=True)
    manifest = {
        "stage": stage,
        "toolkit_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "listing_digest": listing_digest,
        "config_digest": digest,
        "config": config,
        **extra,
    }
    write_json(stage_dir / MANIFEST_NAME, manifest)
    return manifest


def _describe_conflict(existing: dict[str, Any], listing_digest: str, digest: str, extra: dict[str, Any]) -> str:
    if existing.get("listing_digest") != listing_digest:
        return "a different input listing"
    if existing.get("config_digest") != digest:
        return "a different configuration"
    if existing.get("shard_size") != extra.get("shard_size"):
        return f"shard size {existing.get('shard_size')} (now {extra.get('shard_size')})"
    return ""


def write_listing(stage_dir: Path, frame: pd.DataFrame) -> None:
    """Store the stage's input listing as Parquet, atomically."""
    with atomic_path(stage_dir / LISTING_NAME) as tmp:
        frame.to_parquet(tmp, index=False)


def read_listing(stage_dir: Path) -> pd.DataFrame:
    """Load the stage's input listing."""
    return pd.read_parquet(stage_dir / LISTING_NAME)
