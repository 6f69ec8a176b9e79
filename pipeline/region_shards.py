"""Region shards: one HDF5 file per fixed-size chunk of the sorted image listing.

Shapes: N images in the shard, R regions in total over those images, D feature size.
Image ``i`` owns regions ``region_offsets[i]:region_offsets[i + 1]``. Every input image
of the chunk has a row, failed ones with zero regions and a failure reason. The full
schema is documented in ``docs/shards.md``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pipeline import __version__
from pipeline.atomic import temporary_path
from pipeline.h5io import (
    append_rows,
    check_offsets,
    create_appendable,
    get_json_attr,
    read_strings,
    set_json_attr,
    write_strings,
)

logger = logging.getLogger(__name__)

SCHEMA = "cmsei.regions"
SCHEMA_VERSION = 1
STATUS_OK = "ok"
STATUS_FAILED = "failed"

# Per-region columns: name -> (row shape, dtype); "features" is added with its own size.
REGION_COLUMNS: dict[str, tuple[tuple[int, ...], str]] = {
    "boxes": ((4,), "float32"),
    "object_ids": ((), "int32"),
    "object_scores": ((), "float32"),
    "attribute_ids": ((), "int32"),
    "attribute_scores": ((), "float32"),
}


def shard_file_name(shard_index: int) -> str:
    """Return the file name of region shard ``shard_index``."""
    return f"shard-{shard_index:05d}.h5"


class RegionShardWriter:
    """Append images to a new region shard under a temporary name, then publish it.

    Use as a context manager; :meth:`close` verifies the file and renames it to
    ``path``. On an exception the temporary file is deleted and ``path`` is untouched.
    """

    def __init__(
        self,
        path: Path,
        shard_index: int,
        feature_dim: int,
        feature_dtype: str = "float16",
        with_class_boxes: bool = False,
        attrs: dict[str, Any] | None = None,
        object_names: list[str] | None = None,
        attribute_names: list[str] | None = None,
        compression: str | None = "gzip",
    ) -> None:
        self.path = Path(path)
        self.tmp_path = temporary_path(self.path)
        self.shard_index = shard_index
        self.feature_dim = feature_dim
        self.feature_dtype = np.dtype(feature_dtype)
        self.with_class_boxes = with_class_boxes
        self._attrs = dict(attrs or {})
        self._image_ids: list[str] = []
        self._status: list[str] = []
        self._reasons: list[str] = []
        self._sizes: list[tuple[int, int]] = []
        self._offsets: list[int] = [0]
        self._h5 = h5py.File(self.tmp_path, "w")
        self._columns = self._create_columns(compression)
        write_strings(self._h5, "object_names", list(object_names or []))
        write_strings(self._h5, "attribute_names", list(attribute_names or []))

    def _create_columns(self, compression: str | None) -> dict[str, h5py.Dataset]:
        columns = {}
        for name, (row_shape, dtype) in REGION_COLUMNS.items():
            columns[name] = create_appendable(self._h5, name, row_shape, dtype, compression)
        columns["features"] = create_appendable(
            self._h5, "features", (self.feature_dim,), self.feature_dtype, compression, chunk_rows=256
        )
        if self.with_class_boxes:
            columns["class_boxes"] = create_appendable(self._h5, "class_boxes", (4,), "float32", compression)
        return columns

    def add_image(self, image_id: str, image_size: tuple[int, int], regions: dict[str, np.ndarray]) -> None:
        """Append one successfully processed image.

        Args:
            image_id: the image's id (relative path).
            image_size: upright (height, width) in pixels.
            regions: arrays with R rows each: ``boxes`` float (R, 4), ``features`` float (R, D),
                ``object_ids``/``attribute_ids`` int (R,), ``object_scores``/``attribute_scores``
                float (R,), and ``class_boxes`` (R, 4) when the shard stores them.
        """
        count = int(regions["boxes"].shape[0])
        features = np.asarray(regions["features"])
        if features.shape != (count, self.feature_dim):
            raise ValueError(
                f"image {image_id!r}: features have shape {features.shape}, expected ({count}, {self.feature_dim})"
            )

        for name, column in self._columns.items():
            append_rows(column, np.asarray(regions[name]).astype(column.dtype, copy=False))

        self._append_row(image_id, STATUS_OK, "", image_size, count)

    def add_failure(self, image_id: str, reason: str) -> None:
        """Append an image that could not be processed, with the reason."""
        self._append_row(image_id, STATUS_FAILED, reason, (0, 0), 0)

    def _append_row(self, image_id: str, status: str, reason: str, size: tuple[int, int], count: int) -> None:
        self._image_ids.append(image_id)
        self._status.append(status)
        self._reasons.append(reason)
        self._sizes.append((int(size[0]), int(size[1])))
        self._offsets.append(self._offsets[-1] + count)

    def close(self) -> None:
        """Write the per-image tables and attributes, verify, flush and publish the shard."""
        h5 = self._h5
        write_strings(h5, "image_ids", self._image_ids)
        write_strings(h5, "status", self._status)
        write_strings(h5, "failure_reasons", self._reasons)
        h5.create_dataset("image_sizes", data=np.array(self._sizes, dtype=np.int32).reshape(-1, 2))
        h5.create_dataset("region_offsets", data=np.array(self._offsets, dtype=np.int64))

        num_failed = self._status.count(STATUS_FAILED)
        h5.attrs.update(
            {
                "schema": SCHEMA,
                "schema_version": SCHEMA_VERSION,
                "toolkit_version": __version__,
                "shard_index": self.shard_index,
                "num_images": len(self._image_ids),
                "num_ok": len(self._image_ids) - num_failed,
                "num_failed": num_failed,
                "num_regions": self._offsets[-1],
                "feature_dim": self.feature_dim,
            }
        )
        for key, value in self._attrs.items():
            set_json_attr(h5, key, value)
        h5.attrs["complete"] = True
        h5.flush()
        h5.close()

        problems = verify_region_shard(self.tmp_path)
        if problems:
            self.tmp_path.unlink(missing_ok=True)
            raise RuntimeError(f"shard {self.path.name} failed verification after writing: {'; '.join(problems)}")
        os.replace(self.tmp_path, self.path)

    def abort(self) -> None:
        """Discard the temporary file."""
        try:
            self._h5.close()
        finally:
            self.tmp_path.unlink(missing_ok=True)

    def __enter__(self) -> "RegionShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


@dataclass
class ImageRegions:
    """Regions of one image read back from a shard (R regions, D feature size)."""

    image_id: str
    status: str
    failure_reason: str
    image_size: tuple[int, int]
    boxes: np.ndarray
    features: np.ndarray
    object_ids: np.ndarray
    object_scores: np.ndarray
    attribute_ids: np.ndarray
    attribute_scores: np.ndarray
    class_boxes: np.ndarray | None = None


class RegionShard:
    """Read access to one region shard; arrays are read lazily per image.

    Example:
        >>> with RegionShard("DATA/regions/shard-00000.h5") as shard:
        ...     first = shard[0]; print(first.image_id, first.boxes.shape)
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._h5 = h5py.File(self.path, "r")
        if self._h5.attrs.get("schema") != SCHEMA:
            self._h5.close()
            raise ValueError(f"{self.path} is not a region shard (schema {self._h5.attrs.get('schema')!r})")
        self.image_ids = read_strings(self._h5["image_ids"])
        self.status = read_strings(self._h5["status"])
        self.failure_reasons = read_strings(self._h5["failure_reasons"])
        self.image_sizes = self._h5["image_sizes"][()]
        self.offsets = self._h5["region_offsets"][()]
        self.object_names = read_strings(self._h5["object_names"])
        self.attribute_names = read_strings(self._h5["attribute_names"])
        self._row_of = {image_id: row for row, image_id in enumerate(self.image_ids)}

    @property
    def attrs(self) -> dict[str, Any]:
        """File attributes, with JSON-encoded ones decoded."""
        result = {}
        for key in self._h5.attrs:
            value = self._h5.attrs[key]
            if key in ("config", "weights_sha256", "input"):
                value = get_json_attr(self._h5, key)
            result[key] = value.item() if isinstance(value, np.generic) else value
        return result

    def __len__(self) -> int:
        return len(self.image_ids)

    def row(self, image_id: str) -> int:
        """Return the row of ``image_id``; raises KeyError naming the shard when absent."""
        try:
            return self._row_of[image_id]
        except KeyError:
            raise KeyError(f"image {image_id!r} is not in shard {self.path}") from None

    def __getitem__(self, row: int) -> ImageRegions:
        start, stop = int(self.offsets[row]), int(self.offsets[row + 1])
        h5 = self._h5

        def column(name: str) -> np.ndarray:
            return h5[name][start:stop]

        return ImageRegions(
            image_id=self.image_ids[row],
            status=self.status[row],
            failure_reason=self.failure_reasons[row],
            image_size=(int(self.image_sizes[row][0]), int(self.image_sizes[row][1])),
            boxes=column("boxes"),
            features=column("features"),
            object_ids=column("object_ids"),
            object_scores=column("object_scores"),
            attribute_ids=column("attribute_ids"),
            attribute_scores=column("attribute_scores"),
            class_boxes=column("class_boxes") if "class_boxes" in h5 else None,
        )

    def array(self, name: str) -> np.ndarray:
        """Read one whole flat column (``boxes``, ``features``, ...)."""
        return self._h5[name][()]

    def close(self) -> None:
        self._h5.close()

    def __enter__(self) -> "RegionShard":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def verify_region_shard(path: str | os.PathLike, expected_ids: list[str] | None = None) -> list[str]:
    """Check one region shard and return a list of problems (empty when valid).

    Checks the schema attributes, the presence and row counts of every column, the
    offsets, the per-image tables, that every chunk of every array reads, and that boxes
    are finite. ``expected_ids`` additionally checks the image ids and their order.
    """
    try:
        h5 = h5py.File(path, "r")
    except OSError as error:
        return [f"cannot open as HDF5: {error}"]
    try:
        return _verify_open_shard(h5, expected_ids)
    except (OSError, KeyError, ValueError) as error:
        return [f"unreadable data: {error}"]
    finally:
        h5.close()


def _verify_open_shard(h5: h5py.File, expected_ids: list[str] | None) -> list[str]:
    if h5.attrs.get("schema") != SCHEMA:
        return [f"schema attribute is {h5.attrs.get('schema')!r}, expected {SCHEMA!r}"]
    if int(h5.attrs.get("schema_version", -1)) > SCHEMA_VERSION:
        return [f"schema version {h5.attrs.get('schema_version')} is newer than this toolkit reads ({SCHEMA_VERSION})"]
    if not h5.attrs.get("complete", False):
        return ["shard is not marked complete"]

    required = ["image_ids", "status", "failure_reasons", "image_sizes", "region_offsets", "features", *REGION_COLUMNS]
    missing = [name for name in required if name not in h5]
    if missing:
        return [f"missing datasets: {', '.join(missing)}"]

    problems = []
    num_images = int(h5.attrs["num_images"])
    offsets = h5["region_offsets"][()]
    num_rows = h5["boxes"].shape[0]
    offsets_problem = check_offsets(offsets, num_images, num_rows)
    if offsets_problem:
        problems.append(offsets_problem)

    for name in ("image_ids", "status", "failure_reasons", "image_sizes"):
        if h5[name].shape[0] != num_images:
            problems.append(f"{name} has {h5[name].shape[0]} rows, expected {num_images}")
    row_columns = [*REGION_COLUMNS, "features"] + (["class_boxes"] if "class_boxes" in h5 else [])
    for name in row_columns:
        if h5[name].shape[0] != num_rows:
            problems.append(f"{name} has {h5[name].shape[0]} rows, expected {num_rows}")
    if int(h5.attrs["num_regions"]) != num_rows:
        problems.append(f"attribute num_regions is {h5.attrs['num_regions']}, data has {num_rows} rows")
    if problems:
        return problems

    status = read_strings(h5["status"])
    if status.count(STATUS_FAILED) != int(h5.attrs["num_failed"]):
        problems.append("attribute num_failed disagrees with the status column")
    image_ids = read_strings(h5["image_ids"])
    if len(set(image_ids)) != len(image_ids):
        problems.append("duplicate image ids")
    if expected_ids is not None and image_ids != list(expected_ids):
        problems.append("image ids differ from the manifest's listing for this shard")

    for name in row_columns:
        if not _column_is_finite(h5[name]):
            problems.append(f"{name} contains NaN or infinite values")
    return problems


def _column_is_finite(dataset: h5py.Dataset, block_rows: int = 65536) -> bool:
    """Read every block of a column (so unreadable chunks surface) and check floats are finite."""
    floating = np.issubdtype(dataset.dtype, np.floating)
    for start in range(0, dataset.shape[0], block_rows):
        block = dataset[start : start + block_rows]
        if floating and not np.all(np.isfinite(block)):
            return False
    return True
