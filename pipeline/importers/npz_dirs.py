"""Folders of per-image feature files, and a pickle-free ``.npy`` loader.

Shapes: R regions of one image, D feature size, K object classes.

``butd-npz``: one ``np.savez_compressed`` file per image, as written by
``utils/extract_utils.py`` of bottom-up-attention.pytorch (MILVLG). Its members are
``x`` (R, D) float32 features, ``bbox`` (R, 4) float32 x1 y1 x2 y2 in pixels,
``num_bbox`` (must equal R), ``image_h``, ``image_w`` and ``info``. ``info`` is a pickled
dict with ``objects_id`` and ``objects_conf`` (R,), plus ``attrs_id`` and ``attrs_conf``
from the attribute model. Its detectron2 variant stores ``objects`` and ``cls_prob``
(R, K) in ``info`` instead. The current bottom-up-attention.pytorch drops the background
column before the arg-max, so ids are 0-based indices into ``objects_vocab.txt``.

``mmf-npy``: ``NAME.npy`` (R, D) float32 features beside ``NAME_info.npy``, a pickled dict
with ``bbox`` (R, 4), ``num_boxes``, ``objects`` (R,), ``cls_prob`` (R, K) or (R,),
``image_width`` and ``image_height``, as written by MMF's
``tools/scripts/features/extract_features_vmb.py`` and ``frcnn/extract_features_frcnn.py``.
Their ``num_boxes`` is not the row count (the first counts boxes with a non-zero score,
the second is the requested maximum), so every row of the feature file is imported and
``num_boxes`` is ignored. ``NAME_full.npy`` files are skipped.

The image id of a file is its path relative to the folder without the ``.npz`` or
``.npy`` suffix, e.g. ``COCO_val2014_000000000042``.

Pickles: ``info`` and the SCAN size files are pickled object arrays, and unpickling
arbitrary data runs code chosen by whoever wrote the file. :func:`load_npy` therefore
never calls ``np.load(allow_pickle=True)``. It unpickles through an allow-list that
rebuilds only numpy arrays, numpy scalars and dtypes besides plain Python containers,
numbers and strings, and rejects any other global with :class:`UnsafePickleError`. The
remaining risk is a defect in numpy's own array unpickling.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

import numpy as np

from pipeline.importers import (
    ImportedRegions,
    RowError,
    SourceIndex,
    SourceReader,
    SourceRow,
    unlabelled_regions,
)

logger = logging.getLogger(__name__)

FEATURE_DIM_PROBE_FILES = 16
"""Files tried for the feature size when ``--feature-dim`` is not given."""

_ALLOWED_GLOBALS = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }
)


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle refers to a global outside the allow-list of :func:`load_npy`."""


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise UnsafePickleError(f"the pickle refers to {module}.{name}, which is not a numpy array type")
        with warnings.catch_warnings():
            # numpy 2 serves the numpy.core names of files written by numpy 1 with a warning.
            warnings.simplefilter("ignore", DeprecationWarning)
            return super().find_class(module, name)


def read_npy_header(stream: BinaryIO) -> tuple[tuple[int, ...], bool, np.dtype]:
    """Read the ``.npy`` magic and header; leave ``stream`` at the first data byte.

    Returns:
        (shape, fortran_order, dtype).

    Raises:
        ValueError: not an ``.npy`` stream, or an unknown format version.
    """
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(stream)
    if version in ((2, 0), (3, 0)):
        return np.lib.format.read_array_header_2_0(stream)
    raise ValueError(f"unsupported .npy format version {version}")


def load_npy(stream: BinaryIO, allow_objects: bool = True) -> np.ndarray:
    """Load one ``.npy`` array from a stream without running arbitrary pickled code.

    Args:
        stream: binary stream positioned at the ``.npy`` magic.
        allow_objects: unpickle object arrays through the allow-list; when False they
            raise ValueError.

    Returns:
        The array; numeric data is a read-only view of the bytes read.

    Raises:
        ValueError: malformed header, or the data ends early.
        UnsafePickleError: the object array's pickle refers to a non-numpy global.
        pickle.UnpicklingError: the pickle itself is corrupt.
    """
    shape, fortran_order, dtype = read_npy_header(stream)
    if dtype.hasobject:
        if not allow_objects:
            raise ValueError("the file contains a pickled object array, expected numbers")
        loaded = _ArrayUnpickler(stream, encoding="latin1").load()
        if not isinstance(loaded, np.ndarray):
            raise ValueError(f"the pickle contains a {type(loaded).__name__}, expected an array")
        return loaded

    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    data = stream.read(expected)
    if len(data) != expected:
        raise ValueError(f"the data ends after {len(data)} of {expected} bytes")
    return np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran_order else "C")


def load_npy_file(path: Path, allow_objects: bool = True) -> np.ndarray:
    """Load an ``.npy`` file with :func:`load_npy`."""
    with open(path, "rb") as stream:
        return load_npy(stream, allow_objects)


def load_info_dict(array: np.ndarray, name: str) -> dict[str, Any]:
    """Return the dict stored in a 0-d object array; raises RowError otherwise."""
    if array.shape != () or not array.dtype.hasobject or not isinstance(array.item(), dict):
        raise RowError("invalid-info", f"{name} contains a {array.dtype} array of shape {array.shape}, expected a pickled dict")
    return array.item()


def folder_digest(files: list[Path], root: Path) -> str:
    """Return a sha256 over the relative names, sizes and modification times of ``files``.

    Reading every file twice only to hash it would double the import's I/O, so an edit
    that keeps a file's size and modification time goes unnoticed on resume.
    """
    digest = hashlib.sha256()
    for path in files:
        info = path.stat()
        digest.update(f"{path.relative_to(root).as_posix()}\0{info.st_size}\0{info.st_mtime_ns}\n".encode("utf-8"))
    return digest.hexdigest()


def list_files(root: Path, keep: Callable[[str], bool]) -> list[Path]:
    """Return files under ``root`` whose name passes ``keep``, sorted, hidden entries skipped."""
    found = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
        found.extend(Path(folder) / name for name in names if not name.startswith(".") and keep(name))
    return sorted(found)


class _PerImageReader(SourceReader):
    """Shared indexing of folders holding one feature file per image."""

    suffix = ""

    def __init__(self, source: Path, feature_dim: int | None = None) -> None:
        super().__init__()
        self.source = Path(source)
        self.root = self.source if self.source.is_dir() else self.source.parent
        self.feature_dim = feature_dim

    def keep(self, name: str) -> bool:
        return name.endswith(self.suffix)

    def index(self) -> SourceIndex:
        files = list_files(self.source, self.keep) if self.source.is_dir() else [self.source]
        if not files:
            raise ValueError(f"no *{self.suffix} feature files found in {self.source}; check --source and --format")

        rows = []
        for number, path in enumerate(files):
            raw_id = path.relative_to(self.root).as_posix()[: -len(self.suffix)]
            rows.append(SourceRow(raw_id, path, f"file {path.relative_to(self.root).as_posix()}", path, number))
        if self.feature_dim is None:
            self.feature_dim = self._probe_feature_dim(files)

        digest = folder_digest(files, self.root)
        logger.info("%s: %d files in %s, feature size %d", self.format_name, len(files), self.source, self.feature_dim)
        return SourceIndex(rows, [], self.feature_dim, has_boxes=True, files=[{"name": self.source.name, "sha256": digest}])

    def _probe_feature_dim(self, files: list[Path]) -> int:
        for path in files[:FEATURE_DIM_PROBE_FILES]:
            try:
                shape = self.feature_shape(path)
            except (OSError, ValueError, KeyError, zipfile.BadZipFile) as error:
                logger.debug("cannot read the feature shape of %s: %s", path, error)
                continue
            if len(shape) == 2:
                return int(shape[1])
        raise ValueError(
            f"cannot infer the feature size: none of the first {FEATURE_DIM_PROBE_FILES} files in {self.source} "
            "contains a readable 2-D feature array; pass --feature-dim, or check --format"
        )

    def feature_shape(self, path: Path) -> tuple[int, ...]:
        """Return the shape of the feature array in ``path`` from its header."""
        raise NotImplementedError

    def read(self, row: SourceRow) -> ImportedRegions:
        try:
            self.bytes_read += row.path.stat().st_size
            return self.read_file(row.path)
        except UnsafePickleError as error:
            raise RowError("unsafe-pickle", f"{error}; only numpy arrays and plain values are loaded") from None
        except (OSError, EOFError, ValueError, zipfile.BadZipFile, pickle.UnpicklingError) as error:
            raise RowError("invalid-file", f"cannot read the file ({type(error).__name__}: {error})") from None

    def read_file(self, path: Path) -> ImportedRegions:
        """Decode one feature file."""
        raise NotImplementedError


class ButdNpzReader(_PerImageReader):
    """Reader of bottom-up-attention.pytorch ``.npz`` files (see the module docstring).

    Args:
        source: a folder searched recursively for ``*.npz``, or one ``.npz`` file.
        feature_dim: D; read from the first files when None.
    """

    format_name = "butd-npz"
    suffix = ".npz"

    def feature_shape(self, path: Path) -> tuple[int, ...]:
        with zipfile.ZipFile(path) as archive, archive.open("x.npy") as stream:
            return read_npy_header(stream)[0]

    def read_file(self, path: Path) -> ImportedRegions:
        with zipfile.ZipFile(path) as archive:
            members = set(archive.namelist())
            if "x.npy" not in members:
                raise RowError("missing-key", "the file has no 'x' features (bounding-box-only extraction?)")

            def member(name: str) -> np.ndarray:
                if f"{name}.npy" not in members:
                    raise RowError("missing-key", f"the file has no {name!r} entry")
                with archive.open(f"{name}.npy") as stream:
                    return load_npy(stream)

            features = member("x")
            boxes = member("bbox")
            count = _scalar_int(member("num_bbox"), "num_bbox")
            size = (_scalar_int(member("image_h"), "image_h"), _scalar_int(member("image_w"), "image_w"))
            info = load_info_dict(member("info"), "info") if "info.npy" in members else {}

        _check_rows(features, "x", count, "num_bbox")
        _check_rows(boxes, "bbox", count, "num_bbox")
        return regions_with_info(size, boxes, features, info)


class MmfNpyReader(_PerImageReader):
    """Reader of MMF ``NAME.npy`` + ``NAME_info.npy`` pairs (see the module docstring).

    Args:
        source: a folder searched recursively for feature ``.npy`` files.
        feature_dim: D; read from the first files when None.
    """

    format_name = "mmf-npy"
    suffix = ".npy"

    def keep(self, name: str) -> bool:
        return name.endswith(".npy") and not name.endswith(("_info.npy", "_full.npy"))

    def feature_shape(self, path: Path) -> tuple[int, ...]:
        with open(path, "rb") as stream:
            return read_npy_header(stream)[0]

    def read_file(self, path: Path) -> ImportedRegions:
        info_path = path.with_name(path.name[: -len(".npy")] + "_info.npy")
        if not info_path.exists():
            raise RowError("missing-info", f"{info_path.name} is missing beside the features, so boxes and image size are unknown")
        self.bytes_read += info_path.stat().st_size

        features = load_npy_file(path, allow_objects=False)
        info = load_info_dict(load_npy_file(info_path), info_path.name)
        if "bbox" not in info:
            raise RowError("missing-key", f"{info_path.name} has no 'bbox' entry")

        boxes = np.asarray(info["bbox"])
        count = features.shape[0] if features.ndim == 2 else -1
        _check_rows(features, "features", count, "the feature rows")
        _check_rows(boxes, "bbox", count, "the feature rows")
        size = (_scalar_int(info.get("image_height"), "image_height"), _scalar_int(info.get("image_width"), "image_width"))
        return regions_with_info(size, boxes, features, info)


def regions_with_info(
    size: tuple[int, int], boxes: np.ndarray, features: np.ndarray, info: dict[str, Any]
) -> ImportedRegions:
    """Combine boxes (R, 4) and features (R, D) with the labels of an ``info`` dict.

    Object ids come from ``objects_id`` or ``objects``, their scores from
    ``objects_conf``, else from ``cls_prob``: (R,) directly, or (R, K) at the object id.
    Attributes come from ``attrs_id`` with ``attrs_conf`` or ``attrs_scores`` alike.
    A source without object ids is stored unlabelled (ids -1, scores 0).

    Raises:
        RowError: a label array does not have R rows, or an id is outside a (R, K) score matrix.
    """
    regions = unlabelled_regions(size, boxes.astype(np.float32, copy=False), features)
    count = features.shape[0]
    object_ids = _first_present(info, ("objects_id", "objects"))
    # NOTE: older bottom-up-attention.pytorch versions took the arg-max over the
    # background column too, so their ids are one higher; nothing here detects that.
    if object_ids is not None:
        regions.object_ids = _label_ids(object_ids, "objects_id", count)
        regions.object_scores = _label_scores(info, ("objects_conf", "cls_prob"), regions.object_ids, count)
    attribute_ids = _first_present(info, ("attrs_id",))
    if attribute_ids is not None:
        regions.attribute_ids = _label_ids(attribute_ids, "attrs_id", count)
        regions.attribute_scores = _label_scores(info, ("attrs_conf", "attrs_scores"), regions.attribute_ids, count)
    return regions


def _first_present(info: dict[str, Any], keys: tuple[str, ...]) -> Any:
    for key in keys:
        if info.get(key) is not None:
            return info[key]
    return None


def _label_ids(values: Any, name: str, count: int) -> np.ndarray:
    ids = np.asarray(values)
    if ids.shape != (count,) or not np.issubdtype(ids.dtype, np.integer):
        raise RowError("num-boxes-mismatch", f"info {name} is a {ids.dtype} array of shape {ids.shape}, expected ({count},) integers")
    return ids.astype(np.int64, copy=False)


def _label_scores(info: dict[str, Any], keys: tuple[str, ...], ids: np.ndarray, count: int) -> np.ndarray:
    for key in keys:
        if info.get(key) is None:
            continue
        scores = np.asarray(info[key], dtype=np.float32)
        if scores.shape == (count,):
            return scores
        if scores.ndim == 2 and scores.shape[0] == count:
            if count and (ids.min() < 0 or ids.max() >= scores.shape[1]):
                raise RowError("invalid-label", f"ids reach {int(ids.max())} but info {key} has {scores.shape[1]} columns")
            return np.take_along_axis(scores, ids[:, None], axis=1)[:, 0] if count else np.zeros(0, np.float32)
        raise RowError("num-boxes-mismatch", f"info {key} has shape {scores.shape}, expected ({count},) or ({count}, K)")
    return np.zeros(count, dtype=np.float32)


def _check_rows(array: np.ndarray, name: str, count: int, count_name: str) -> None:
    expected_width = 4 if name == "bbox" else None
    if array.ndim != 2 or (expected_width and array.shape[1] != expected_width):
        raise RowError("invalid-array", f"{name} has shape {array.shape}, expected ({count}, {expected_width or 'D'})")
    if not np.issubdtype(array.dtype, np.floating):
        raise RowError("invalid-array", f"{name} has dtype {array.dtype}, expected floating point")
    if array.shape[0] != count:
        raise RowError("num-boxes-mismatch", f"{count_name} is {count} but {name} contains {array.shape[0]} rows")


def _scalar_int(value: Any, name: str) -> int:
    array = np.asarray(value)
    if array.size != 1 or not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise RowError("invalid-number", f"{name} is {value!r}, expected one integer")
    number = array.reshape(()).item()
    if float(number) != int(number):
        raise RowError("invalid-number", f"{name} is {number}, expected an integer")
    return int(number)


def zip_member_names(path: Path) -> list[str]:
    """Return the member names of a zip file, or an empty list when it is not one."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.namelist()
    except (OSError, zipfile.BadZipFile):
        return []


def npy_header_of(path: Path) -> tuple[tuple[int, ...], bool, np.dtype] | None:
    """Return the ``.npy`` header of a file, or None when it is not an ``.npy`` file."""
    try:
        with open(path, "rb") as stream:
            return read_npy_header(stream)
    except (OSError, ValueError):
        return None
