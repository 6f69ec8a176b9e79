"""Export region shards to precomputed-feature formats, behind ``cmsei-prep export``.

Shapes: N exported images, R regions of one image, k regions per image in SCAN output,
D feature size.

Formats (``EXPORT_FORMATS``): ``scan`` (SCAN precomp with the GSMN box companions,
:mod:`pipeline.exporters.scan`), ``butd-tsv`` and ``lxmert-tsv`` (the TSV layouts that
``cmsei-prep import`` reads, :mod:`pipeline.exporters.tsv`).

Images are chosen with ``--split all`` (every image whose status is ok, in sorted id
order) or ``--images-file`` (ids one per line, in the file's order, which SCAN keeps).
``--split`` also names the output files. Named splits such as ``test`` will come from the
captions stage. Every output file is written under a temporary name and renamed when
complete.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from pipeline.dataset import REGIONS, DatasetFolder
from pipeline.manifest import read_manifest
from pipeline.region_shards import ImageRegions, RegionShard, shard_file_name

logger = logging.getLogger(__name__)

EXPORT_FORMATS = ("scan", "butd-tsv", "lxmert-tsv")
OPEN_SHARDS = 4
"""Region shards kept open while reading images in a caller-chosen order."""


@dataclass
class ExportOptions:
    """Options of one export run (see ``cmsei-prep export --help``).

    Attributes:
        data: dataset folder with a regions stage.
        out: output folder; for the TSV formats a path ending in ``.tsv`` names the file.
        format: one of ``EXPORT_FORMATS``.
        split: ``all``, or the split name used in the output file names.
        images_file: text file of image ids, one per line, that selects and orders the images.
        num_regions: SCAN only: k, zero-padding images with fewer regions.
        image_ext: TSV only: removed from the end of image ids, as the TSV layouts store
            ids without it; ``import`` appends it back.
        overwrite: replace existing output files.
    """

    data: str | Path
    out: str | Path
    format: str
    split: str = "all"
    images_file: str | Path | None = None
    num_regions: int | None = None
    image_ext: str = ".jpg"
    overwrite: bool = False


@dataclass
class ExportSummary:
    """Files and counts of one export run."""

    format: str
    files: list[str]
    num_images: int
    regions_per_image: list[int]
    feature_dim: int
    has_boxes: bool
    seconds: float
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class StoredImage:
    """Location and region count of an ok image in the region shards."""

    shard: int
    row: int
    num_regions: int


def export_features(options: ExportOptions) -> ExportSummary:
    """Select images and write them in ``options.format``.

    Raises:
        FileNotFoundError: the dataset, its regions stage or the images file is missing.
        ValueError: an unknown format or split, requested images that are missing or
            failed, region counts SCAN cannot hold, or existing outputs without ``overwrite``.
    """
    started = time.monotonic()
    if options.format not in EXPORT_FORMATS:
        raise ValueError(f"--format must be one of {', '.join(EXPORT_FORMATS)}, got {options.format!r}")
    data = DatasetFolder(options.data)
    stored = stored_images(data)
    image_ids = select_images(data, stored, options.split, options.images_file)
    has_boxes = dataset_has_boxes(data)

    with RegionReader(data, stored) as reader:
        if options.format == "scan":
            from pipeline.exporters.scan import export_scan

            files, details = export_scan(reader, Path(options.out), options.split, image_ids, options.num_regions,
                                         has_boxes, options.overwrite)
        else:
            from pipeline.exporters.tsv import export_tsv

            files, details = export_tsv(reader, Path(options.out), options.format, options.split, image_ids,
                                        options.image_ext, has_boxes, options.overwrite)
        feature_dim = reader.feature_dim

    counts = sorted({stored[image_id].num_regions for image_id in image_ids})
    summary = ExportSummary(options.format, [str(path) for path in files], len(image_ids), counts, feature_dim,
                            has_boxes, round(time.monotonic() - started, 3), details)
    logger.info("export %s: %d images to %s in %.1f s", options.format, len(image_ids),
                ", ".join(path.name for path in files), summary.seconds)
    return summary


def stored_images(data: DatasetFolder) -> dict[str, StoredImage]:
    """Return every ok image of the regions stage with its shard, row and region count.

    Raises:
        FileNotFoundError: the dataset has no regions stage or no index (an interrupted run).
    """
    stage_dir = data.stage_dir(REGIONS)
    if read_manifest(stage_dir) is None:
        raise FileNotFoundError(f"{data.root} has no regions stage; run `cmsei-prep extract` or `cmsei-prep import` first")
    try:
        index = data.region_index()
    except FileNotFoundError:
        raise FileNotFoundError(f"{stage_dir}/index.parquet is missing: the last run was interrupted; rerun it to finish") from None
    ok = index[index["status"] == "ok"].sort_values(["shard", "row"])
    return {
        row.image_id: StoredImage(int(row.shard), int(row.row), int(row.num_regions))
        for row in ok.itertuples(index=False)
    }


def select_images(data: DatasetFolder, stored: dict[str, StoredImage], split: str, images_file: str | Path | None) -> list[str]:
    """Return the ids to export, in output order.

    Raises:
        FileNotFoundError: ``images_file`` does not exist.
        ValueError: a named split without ``images_file``, an id listed twice, or ids
            that are not ok images of the dataset (up to five are named).
    """
    if images_file is not None:
        return _read_images_file(Path(images_file), stored)
    if split == "all":
        if not stored:
            raise ValueError(f"{data.root} has no image with status ok to export")
        return list(stored)
    # TODO: read split membership from the captions stage once it records splits.
    raise ValueError(
        f"--split {split} needs split lists from the captions stage, which this toolkit does not write yet; "
        "pass --split all, or --images-file FILE with the split's image ids (the split name then names the output files)"
    )


def _read_images_file(path: Path, stored: dict[str, StoredImage]) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except FileNotFoundError:
        raise FileNotFoundError(f"images file not found: {path}") from None

    ids: list[str] = []
    first_line: dict[str, int] = {}
    for number, line in enumerate(lines, start=1):
        image_id = line.strip()
        if not image_id or image_id.startswith("#"):
            continue
        if image_id in first_line:
            raise ValueError(f"{path} lists {image_id!r} twice (lines {first_line[image_id]} and {number}); list each image once")
        first_line[image_id] = number
        ids.append(image_id)

    if not ids:
        raise ValueError(f"{path} lists no image ids; write one id per line")
    missing = [image_id for image_id in ids if image_id not in stored]
    if missing:
        examples = ", ".join(repr(image_id) for image_id in missing[:5])
        raise ValueError(
            f"{len(missing)} ids in {path} are not ok images of the dataset (e.g. {examples}); "
            "`cmsei-prep inspect` lists failed images, and ids are file names with extension"
        )
    return ids


def dataset_has_boxes(data: DatasetFolder) -> bool:
    """Return False for a regions stage imported without boxes, True otherwise."""
    manifest = read_manifest(data.stage_dir(REGIONS)) or {}
    return bool(manifest.get("has_boxes", True))


class RegionReader:
    """Read ok images by id in any order, keeping a few shards open.

    Attributes:
        feature_dim: D of the dataset's shards.
        object_names, attribute_names: the vocabularies of the first shard.
    """

    def __init__(self, data: DatasetFolder, stored: dict[str, StoredImage]) -> None:
        self.stage_dir = data.stage_dir(REGIONS)
        self.stored = stored
        self._open: OrderedDict[int, RegionShard] = OrderedDict()
        first = next(iter(stored.values()), None)
        self.feature_dim = 0
        self.object_names: list[str] = []
        self.attribute_names: list[str] = []
        if first is not None:
            shard = self._shard(first.shard)
            self.feature_dim = int(shard.attrs["feature_dim"])
            self.object_names, self.attribute_names = shard.object_names, shard.attribute_names

    def _shard(self, number: int) -> RegionShard:
        if number in self._open:
            self._open.move_to_end(number)
            return self._open[number]
        if len(self._open) >= OPEN_SHARDS:
            _, oldest = self._open.popitem(last=False)
            oldest.close()
        shard = self._open[number] = RegionShard(self.stage_dir / shard_file_name(number))
        return shard

    def get(self, image_id: str) -> ImageRegions:
        """Return the regions of one ok image."""
        where = self.stored[image_id]
        return self._shard(where.shard)[where.row]

    def iter(self, image_ids: list[str]) -> Iterator[ImageRegions]:
        """Yield the regions of ``image_ids`` in the given order."""
        for image_id in image_ids:
            yield self.get(image_id)

    def close(self) -> None:
        for shard in self._open.values():
            shard.close()
        self._open.clear()

    def __enter__(self) -> "RegionReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_outputs_free(paths: list[Path], overwrite: bool) -> None:
    """Raise ValueError naming the first existing output unless ``overwrite``."""
    if overwrite:
        return
    existing = [path for path in paths if path.exists()]
    if existing:
        raise ValueError(f"{existing[0]} already exists; pass --overwrite to replace it, or another --out")

