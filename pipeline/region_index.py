"""The per-image index of the regions stage (``regions/index.parquet``).

One row per input file: image id, path, shard, row in the shard, region count, status
(``ok``, ``failed``, ``skipped`` for non-image files, ``pending`` for a shard that was
not written) and the failure reason.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from pipeline.inputs import InputListing
from pipeline.manifest import atomic_path
from pipeline.region_shards import RegionShard, shard_file_name

logger = logging.getLogger(__name__)

INDEX_NAME = "index.parquet"
INDEX_COLUMNS = ["image_id", "path", "shard", "row", "num_regions", "status", "reason"]


def write_region_index(
    stage_dir: Path, shard_ids: list[list[str]], listing: InputListing, failed_shards: dict[int, str]
) -> pd.DataFrame:
    """Build the index from the shard files and the listing, store it, and return it."""
    paths = {entry.image_id: str(entry.path) for entry in listing.entries}
    rows = []
    for index, image_ids in enumerate(shard_ids):
        rows.extend(_shard_rows(stage_dir, index, image_ids, paths, failed_shards.get(index)))
    for skipped in listing.skipped:
        rows.append(
            {"image_id": skipped.image_id, "path": str(skipped.path), "shard": -1, "row": -1,
             "num_regions": 0, "status": "skipped", "reason": skipped.reason}
        )

    frame = pd.DataFrame(rows, columns=INDEX_COLUMNS)
    with atomic_path(stage_dir / INDEX_NAME) as tmp:
        frame.to_parquet(tmp, index=False)
    return frame


def _shard_rows(stage_dir: Path, index: int, image_ids: list[str], paths: dict[str, str], error: str | None) -> list[dict]:
    path = stage_dir / shard_file_name(index)
    if not path.exists():
        reason = f"shard {index} failed: {error}" if error else f"shard {index} not written yet"
        return [
            {"image_id": image_id, "path": paths[image_id], "shard": index, "row": row,
             "num_regions": 0, "status": "pending", "reason": reason}
            for row, image_id in enumerate(image_ids)
        ]

    with RegionShard(path) as shard:
        counts = shard.offsets[1:] - shard.offsets[:-1]
        return [
            {"image_id": image_id, "path": paths.get(image_id, ""), "shard": index, "row": row,
             "num_regions": int(counts[row]), "status": shard.status[row], "reason": shard.failure_reasons[row]}
            for row, image_id in enumerate(shard.image_ids)
        ]


def read_region_index(stage_dir: Path) -> pd.DataFrame:
    """Load ``index.parquet`` of a regions stage folder."""
    return pd.read_parquet(stage_dir / INDEX_NAME)
