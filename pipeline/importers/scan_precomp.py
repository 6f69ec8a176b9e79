"""SCAN precomp region features with the GSMN box companions.

Shapes: N images, k regions per image (36 in the public files), D feature size (2048).

One split of a precomp folder (SCAN, VSRN, SGRAF, GSMN) consists of:

- ``{split}_ims.npy``: (N, k, D) float features, one row per image. It is memory-mapped
  read-only, like ``np.load(mmap_mode="r")``, and never read whole. The reader owns the
  mapping so that it can drop pages already imported from its resident set.
- ``{split}_ids.txt`` (optional): one image id per row of ``_ims.npy``.
- ``{split}_caps.txt`` (optional): captions in image order, usually 5 per image. They are
  only counted here; the captions stage imports them.
- ``{split}_ims_bbx.npy`` (optional, GSMN): (N, k, 4) float boxes, x1 y1 x2 y2 in pixels.
- ``{split}_ims_size.npy`` (optional, GSMN): (N,) pickled object array of dicts
  ``{"image_h": ..., "image_w": ...}``, loaded through the allow-list of
  :func:`pipeline.importers.npz_dirs.load_npy`; an (N, 2) integer array of height,
  width is accepted too.

Without ``_ims_bbx.npy`` the boxes are stored as zeros, the image sizes as (0, 0) unless
``_ims_size.npy`` gives them, and the stage records ``has_boxes: false``, because
spatial graphs cannot be built from such shards. The precomp files carry no labels, so
object and attribute ids are -1 with score 0.

Failure reasons name the 0-based array row, e.g. ``row 12``. Without ``_ids.txt`` the
image ids are ``{split}-{row:06d}``, e.g. ``test-000012``.
"""

from __future__ import annotations

import logging
import mmap
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.importers import ImportedRegions, SourceIndex, SourceReader, SourceRow, unlabelled_regions
from pipeline.importers.npz_dirs import load_npy_file, read_npy_header
from pipeline.manifest import file_sha256

logger = logging.getLogger(__name__)

FEATURES_SUFFIX = "_ims.npy"
ROW_ID_TEMPLATE = "{split}-{row:06d}"
"""Image id template of precomp sets without ``{split}_ids.txt``."""


class MappedNpy:
    """A read-only memory map of a numeric C-order ``.npy`` file.

    Attributes:
        array: the mapped array; slicing it reads pages on demand.

    Raises:
        ValueError: the file is an object array, Fortran-ordered or shorter than its header states.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as stream:
            shape, fortran_order, dtype = read_npy_header(stream)
            offset = stream.tell()
        if dtype.hasobject:
            raise ValueError(f"{self.path} contains a pickled object array, expected numbers")
        if fortran_order and len(shape) > 1:
            raise ValueError(f"{self.path} is stored in Fortran order; save it in C order (np.ascontiguousarray)")

        expected = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        size = self.path.stat().st_size
        if size < expected:
            raise ValueError(f"{self.path} is truncated: {size} bytes, its header needs {expected}")

        self._file = open(self.path, "rb")
        self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
        self._offset = offset
        self.array = np.ndarray(shape, dtype=dtype, buffer=self._map, offset=offset)

    def copy_row(self, index: int, dtype: np.dtype | None = None) -> np.ndarray:
        """Return a copy of ``array[index]`` and drop its pages from the resident set.

        Without the drop, every page read stays mapped into this process until the
        mapping closes, and the resident set grows to the size of the file.
        """
        row = np.array(self.array[index], dtype=dtype)
        row_bytes = self.array[index].nbytes
        if row_bytes and hasattr(mmap, "MADV_DONTNEED"):
            start = self._offset + index * row_bytes
            aligned = start - start % mmap.PAGESIZE
            self._map.madvise(mmap.MADV_DONTNEED, aligned, start + row_bytes - aligned)
        return row

    def release_pages(self) -> None:
        """Drop all mapped pages from this process's resident set; the page cache keeps them."""
        if hasattr(mmap, "MADV_DONTNEED"):
            self._map.madvise(mmap.MADV_DONTNEED)

    def close(self) -> None:
        del self.array
        self._map.close()
        self._file.close()


class ScanPrecompReader(SourceReader):
    """Reader of one split of a SCAN precomp folder (see the module docstring).

    Args:
        source: the precomp folder, or its ``{split}_ims.npy`` file.
        split: split name, e.g. ``test``; may be None when the folder contains one split
            or ``source`` is the features file.
        feature_dim: expected D; None accepts the file's.

    Raises:
        FileNotFoundError: no ``{split}_ims.npy`` for the split.
        ValueError: the split is ambiguous or contradicts the file name.
    """

    format_name = "scan"

    def __init__(self, source: Path, split: str | None = None, feature_dim: int | None = None) -> None:
        super().__init__()
        self.folder, self.split = resolve_split(Path(source), split)
        self.feature_dim = feature_dim
        self._features: MappedNpy | None = None
        self._boxes: MappedNpy | None = None
        self._sizes: np.ndarray | None = None

    def path(self, suffix: str) -> Path:
        """Return the path of this split's file with ``suffix``, e.g. ``_ids.txt``."""
        return self.folder / f"{self.split}{suffix}"

    def index(self) -> SourceIndex:
        features = self._features = MappedNpy(self.path(FEATURES_SUFFIX))
        count, per_image, dim = self._check_features(features.array)
        ids = self._read_ids(count)
        self._boxes = self._open_boxes(count, per_image)
        self._sizes = self._read_sizes(count)
        if self._boxes is not None and self._sizes is None:
            raise ValueError(
                f"{self.path('_ims_bbx.npy')} exists but {self.path('_ims_size.npy').name} does not; "
                "boxes cannot be checked or used without image sizes"
            )

        rows = [
            SourceRow(ids[row] if ids else str(row), features.path, f"row {row}", row, row)
            for row in range(count)
        ]
        present = [self.path(suffix) for suffix in (FEATURES_SUFFIX, "_ids.txt", "_ims_bbx.npy", "_ims_size.npy")]
        files = [{"name": path.name, "sha256": file_sha256(path)} for path in present if path.exists()]
        extra: dict[str, Any] = {"split": self.split, "regions_per_image": per_image, "num_captions": self._count_captions(count)}
        if not ids:
            extra["id_template"] = ROW_ID_TEMPLATE
        logger.info("scan %s: %d images x %d regions x %d, boxes %s", self.split, count, per_image, dim,
                    "present" if self._boxes is not None else "absent")
        return SourceIndex(rows, [], dim, has_boxes=self._boxes is not None, files=files, extra=extra)

    def _check_features(self, array: np.ndarray) -> tuple[int, int, int]:
        if array.ndim != 3 or not np.issubdtype(array.dtype, np.floating):
            raise ValueError(
                f"{self.path(FEATURES_SUFFIX)} contains a {array.dtype} array of shape {array.shape}, "
                "expected (images, regions, feature size) floats"
            )
        count, per_image, dim = (int(value) for value in array.shape)
        if self.feature_dim is not None and self.feature_dim != dim:
            raise ValueError(f"--feature-dim is {self.feature_dim} but {self.path(FEATURES_SUFFIX).name} has {dim}")
        self.feature_dim = dim
        return count, per_image, dim

    def _read_ids(self, count: int) -> list[str]:
        path = self.path("_ids.txt")
        if not path.exists():
            return []
        ids = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        while ids and not ids[-1]:
            ids.pop()
        if len(ids) != count:
            raise ValueError(f"{path} lists {len(ids)} ids but {self.path(FEATURES_SUFFIX).name} has {count} rows")
        return ids

    def _open_boxes(self, count: int, per_image: int) -> MappedNpy | None:
        path = self.path("_ims_bbx.npy")
        if not path.exists():
            return None
        boxes = MappedNpy(path)
        if boxes.array.shape != (count, per_image, 4) or not np.issubdtype(boxes.array.dtype, np.number):
            shape = boxes.array.shape
            boxes.close()
            raise ValueError(f"{path} has shape {shape}, expected ({count}, {per_image}, 4) to match the features")
        return boxes

    def _read_sizes(self, count: int) -> np.ndarray | None:
        path = self.path("_ims_size.npy")
        if not path.exists():
            return None
        return image_sizes_array(load_npy_file(path), count, path)

    def _count_captions(self, count: int) -> int | None:
        path = self.path("_caps.txt")
        if not path.exists():
            return None
        with open(path, "rb") as handle:
            captions = sum(1 for line in handle if line.strip())
        if count and captions % count:
            logger.warning("%s has %d captions for %d images, not a whole number per image", path, captions, count)
        return captions

    def read(self, row: SourceRow) -> ImportedRegions:
        """Copy one image's rows out of the mapped arrays."""
        index = row.key
        features = self._features.copy_row(index)
        self.bytes_read += features.nbytes
        if self._boxes is not None:
            boxes = self._boxes.copy_row(index, np.dtype(np.float32))
            self.bytes_read += self._boxes.array[index].nbytes
        else:
            boxes = np.zeros((features.shape[0], 4), dtype=np.float32)
        size = (0, 0) if self._sizes is None else (int(self._sizes[index, 0]), int(self._sizes[index, 1]))
        return unlabelled_regions(size, boxes, features)

    def release_pages(self) -> None:
        for mapped in (self._features, self._boxes):
            if mapped is not None:
                mapped.release_pages()

    def close(self) -> None:
        for mapped in (self._features, self._boxes):
            if mapped is not None:
                mapped.close()
        self._features = self._boxes = None


def resolve_split(source: Path, split: str | None) -> tuple[Path, str]:
    """Return (folder, split) of a precomp source: a folder, or a ``{split}_ims.npy`` file.

    Raises:
        FileNotFoundError: the source or the split's features file does not exist.
        ValueError: no split given while the folder contains several, or a contradiction.
    """
    if source.is_file():
        if not source.name.endswith(FEATURES_SUFFIX):
            raise ValueError(f"{source} is not a SCAN features file; pass the precomp folder or its {{split}}{FEATURES_SUFFIX}")
        named = source.name[: -len(FEATURES_SUFFIX)]
        if split and split != named:
            raise ValueError(f"--split {split} contradicts the features file {source.name}")
        return source.parent, named

    if not source.is_dir():
        raise FileNotFoundError(f"SCAN precomp source not found: {source}")
    if split:
        if not (source / f"{split}{FEATURES_SUFFIX}").is_file():
            raise FileNotFoundError(f"{source / (split + FEATURES_SUFFIX)} not found; splits present: {', '.join(list_splits(source)) or 'none'}")
        return source, split

    splits = list_splits(source)
    if len(splits) != 1:
        found = ", ".join(splits) if splits else f"no *{FEATURES_SUFFIX} file"
        raise ValueError(f"{source} contains {found}; pass --split NAME to choose one")
    return source, splits[0]


def list_splits(folder: Path) -> list[str]:
    """Return the split names of the ``*_ims.npy`` files in ``folder``, sorted."""
    return sorted(path.name[: -len(FEATURES_SUFFIX)] for path in folder.glob(f"*{FEATURES_SUFFIX}") if path.is_file())


def image_sizes_array(loaded: np.ndarray, count: int, path: Path) -> np.ndarray:
    """Turn a GSMN size array into (count, 2) int64 height, width.

    Args:
        loaded: (count,) object array of dicts with ``image_h`` and ``image_w``, or
            (count, 2) integers height, width.
        count: N, the number of images of the split.
        path: the file, for messages.

    Raises:
        ValueError: another shape or dict layout.
    """
    if loaded.dtype.hasobject and loaded.shape == (count,):
        sizes = np.zeros((count, 2), dtype=np.int64)
        for row, entry in enumerate(loaded):
            if not isinstance(entry, dict) or "image_h" not in entry or "image_w" not in entry:
                raise ValueError(f"{path} row {row} is {entry!r}, expected a dict with image_h and image_w")
            sizes[row] = (int(entry["image_h"]), int(entry["image_w"]))
        return sizes
    if loaded.shape == (count, 2) and np.issubdtype(loaded.dtype, np.number):
        return loaded.astype(np.int64)
    raise ValueError(f"{path} contains a {loaded.dtype} array of shape {loaded.shape}, expected ({count},) dicts or ({count}, 2) sizes")
