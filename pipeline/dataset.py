"""The dataset folder: one folder per dataset, one subfolder per stage.

Layout (documented in ``docs/shards.md``)::

    DATA/
      regions/   manifest.json, listing.parquet, shard-00000.h5 ..., index.parquet, summary.json
      captions/  caption shards, vocabulary, per-caption status table
      graphs/    one graph shard per region shard, same image order

A stage only ever writes inside its own subfolder, so a later stage never rewrites an
earlier stage's files.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator

import pandas as pd

from pipeline.manifest import read_manifest
from pipeline.region_shards import ImageRegions, RegionShard, shard_file_name

logger = logging.getLogger(__name__)

REGIONS = "regions"
CAPTIONS = "captions"
GRAPHS = "graphs"
STAGES = (REGIONS, CAPTIONS, GRAPHS)


class DatasetFolder:
    """Read access to a dataset folder for notebooks and later stages.

    Example:
        >>> data = DatasetFolder("DATA")
        >>> for regions in data.iter_regions():
        ...     print(regions.image_id, regions.features.shape)
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"dataset folder {self.root} does not exist; create it with `cmsei-prep extract --out {self.root}`")

    def stage_dir(self, stage: str) -> Path:
        """Return the folder of ``stage`` (it may not exist yet)."""
        return self.root / stage

    def has_stage(self, stage: str) -> bool:
        """Return whether ``stage`` has run here (its manifest exists)."""
        return read_manifest(self.stage_dir(stage)) is not None

    def region_shard_paths(self) -> list[Path]:
        """Return the region shard paths in shard order, as the manifest plans them."""
        manifest = read_manifest(self.stage_dir(REGIONS))
        if manifest is None:
            raise FileNotFoundError(f"{self.root} has no regions stage; run `cmsei-prep extract --out {self.root}` first")
        return [self.stage_dir(REGIONS) / shard_file_name(i) for i in range(int(manifest["num_shards"]))]

    def region_index(self) -> pd.DataFrame:
        """Return the per-image index of the regions stage."""
        from pipeline.region_index import read_region_index

        return read_region_index(self.stage_dir(REGIONS))

    def iter_regions(self, include_failed: bool = False) -> Iterator[ImageRegions]:
        """Yield the regions of every image in shard order; shards not yet written are skipped."""
        for path in self.region_shard_paths():
            if not path.exists():
                logger.warning("%s is missing; its images are skipped", path)
                continue
            with RegionShard(path) as shard:
                for row in range(len(shard)):
                    if include_failed or shard.status[row] == "ok":
                        yield shard[row]

    def regions(self, image_id: str) -> ImageRegions:
        """Return the regions of one image; raises KeyError when it is not in any shard."""
        index = self.region_index()
        match = index[index["image_id"] == image_id]
        if match.empty or int(match.iloc[0]["shard"]) < 0:
            raise KeyError(f"image {image_id!r} is not in the region shards of {self.root}")
        shard_path = self.stage_dir(REGIONS) / shard_file_name(int(match.iloc[0]["shard"]))
        with RegionShard(shard_path) as shard:
            return shard[int(match.iloc[0]["row"])]
