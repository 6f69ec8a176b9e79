"""Graph shards: spatial relation graphs and scene graphs, one HDF5 file per region shard.

Shapes: N images in the shard (the images of region shard ``shard-NNNNN.h5``, in its
order), R_i regions of image i, E scene-graph edges over all images, P predicate names
with background at index 0. Image i owns spatial labels
``spatial_offsets[i]:spatial_offsets[i + 1]`` (its (R_i, R_i) label matrix, row-major)
and edges ``sg_offsets[i]:sg_offsets[i + 1]``. Subject and object indices are region
rows local to the image. The schema is documented in ``docs/shards-graphs.md``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import h5py
import numpy as np

from graphs.spatial import NUM_RELATIONS, RELATION_NAMES
from pipeline import __version__
from pipeline.atomic import temporary_path
from pipeline.h5io import append_rows, check_offsets, create_appendable, get_json_attr, read_strings, set_json_attr, write_strings

logger = logging.getLogger(__name__)

SCHEMA = "cmsei.graphs"
SCHEMA_VERSION = 1

# Scene-graph edge columns: name -> dtype.
EDGE_COLUMNS: dict[str, str] = {"sg_subject": "int32", "sg_object": "int32", "sg_predicate": "int32", "sg_score": "float32"}
# Spatial labels read per block when counting or checking, which bounds memory.
_LABEL_BLOCK = 1 << 22
REQUIRED = ("image_ids", "spatial_offsets", "spatial_labels", "sg_offsets", *EDGE_COLUMNS, "predicate_names", "spatial_names")


def shard_file_name(shard_index: int) -> str:
    """Return the file name of the graph shard that belongs to region shard ``shard_index``."""
    return f"graphs-{shard_index:05d}.h5"


@dataclass
class SceneGraphEdges:
    """Scene-graph edges of one image (E edges), sorted by descending score.

    Attributes:
        subject: (E,) int32 region rows of the subjects.
        object: (E,) int32 region rows of the objects.
        predicate: (E,) int32 indices into the shard's ``predicate_names``, never 0.
        score: (E,) float32 confidences.
    """

    subject: np.ndarray
    object: np.ndarray
    predicate: np.ndarray
    score: np.ndarray

    def __len__(self) -> int:
        return int(self.subject.shape[0])

    @classmethod
    def empty(cls) -> "SceneGraphEdges":
        """Return a graph without edges."""
        return cls(np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, np.float32))


@dataclass
class GraphShardContent:
    """Everything one graph shard stores, as flat arrays (see the module docstring)."""

    image_ids: list[str]
    spatial_offsets: np.ndarray
    spatial_labels: np.ndarray
    sg_offsets: np.ndarray
    sg_subject: np.ndarray
    sg_object: np.ndarray
    sg_predicate: np.ndarray
    sg_score: np.ndarray
    predicate_names: Sequence[str]

    @classmethod
    def from_images(
        cls,
        image_ids: list[str],
        spatial_labels: np.ndarray,
        spatial_offsets: np.ndarray,
        edges: list[SceneGraphEdges],
        predicate_names: Sequence[str],
    ) -> "GraphShardContent":
        """Concatenate per-image scene graphs next to the flat spatial labels.

        Args:
            image_ids: the N image ids.
            spatial_labels: (sum R_i^2,) uint8 flat label matrices.
            spatial_offsets: (N + 1,) int64 offsets into ``spatial_labels``.
            edges: N scene graphs, empty for images without one.
            predicate_names: the P names that ``predicate`` indexes.
        """
        counts = np.array([len(graph) for graph in edges], dtype=np.int64)
        sg_offsets = np.zeros(len(edges) + 1, dtype=np.int64)
        np.cumsum(counts, out=sg_offsets[1:])

        def column(name: str, dtype: str) -> np.ndarray:
            parts = [getattr(graph, name) for graph in edges]
            return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)

        return cls(
            image_ids=list(image_ids),
            spatial_offsets=np.asarray(spatial_offsets, dtype=np.int64),
            spatial_labels=np.asarray(spatial_labels, dtype=np.uint8),
            sg_offsets=sg_offsets,
            sg_subject=column("subject", "int32"),
            sg_object=column("object", "int32"),
            sg_predicate=column("predicate", "int32"),
            sg_score=column("score", "float32"),
            predicate_names=list(predicate_names),
        )


def write_graph_shard(
    path: str | os.PathLike,
    shard_index: int,
    content: GraphShardContent,
    attrs: dict[str, Any],
    expected_region_counts: Sequence[int] | None = None,
) -> None:
    """Write one graph shard under a temporary name, verify it, then rename it to ``path``.

    Args:
        path: destination, ``DATA/graphs/graphs-NNNNN.h5``.
        shard_index: index of the region shard it belongs to.
        content: the arrays to store.
        attrs: further file attributes stored as JSON (``config`` and others).
        expected_region_counts: (N,) region count R_i of each image, checked against
            the stored label matrices before publishing.

    Raises:
        RuntimeError: when the written file fails verification; nothing is published.
    """
    path = Path(path)
    tmp = temporary_path(path)
    try:
        with h5py.File(tmp, "w") as h5:
            _write_content(h5, shard_index, content, attrs)
        problems = verify_graph_shard(tmp, content.image_ids, expected_region_counts)
        if problems:
            raise RuntimeError(f"{path.name} failed verification after writing: {'; '.join(problems)}")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_content(h5: h5py.File, shard_index: int, content: GraphShardContent, attrs: dict[str, Any]) -> None:
    write_strings(h5, "image_ids", content.image_ids)
    h5.create_dataset("spatial_offsets", data=content.spatial_offsets)
    h5.create_dataset("sg_offsets", data=content.sg_offsets)
    labels = create_appendable(h5, "spatial_labels", (), "uint8", chunk_rows=1 << 16)
    append_rows(labels, content.spatial_labels)
    for name, dtype in EDGE_COLUMNS.items():
        column = create_appendable(h5, name, (), dtype, chunk_rows=4096)
        append_rows(column, getattr(content, name))
    write_strings(h5, "predicate_names", list(content.predicate_names))
    write_strings(h5, "spatial_names", list(RELATION_NAMES))

    h5.attrs.update(
        {
            "schema": SCHEMA,
            "schema_version": SCHEMA_VERSION,
            "toolkit_version": __version__,
            "shard_index": shard_index,
            "num_images": len(content.image_ids),
            "num_edges": int(content.sg_subject.shape[0]),
        }
    )
    for key, value in attrs.items():
        set_json_attr(h5, key, value)
    h5.attrs["complete"] = True


class GraphShard:
    """Read access to one graph shard.

    Example:
        >>> with GraphShard("DATA/graphs/graphs-00000.h5") as shard:
        ...     labels = shard.spatial(0)          # (R, R) uint8
        ...     edges = shard.scene_graph(0)       # SceneGraphEdges
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._h5 = h5py.File(self.path, "r")
        if self._h5.attrs.get("schema") != SCHEMA:
            schema = self._h5.attrs.get("schema")
            self._h5.close()
            raise ValueError(f"{self.path} is not a graph shard (schema {schema!r}, expected {SCHEMA!r})")
        h5 = self._h5
        self.image_ids = read_strings(h5["image_ids"])
        self.spatial_offsets = h5["spatial_offsets"][()]
        self.sg_offsets = h5["sg_offsets"][()]
        self.predicate_names = read_strings(h5["predicate_names"])
        self.spatial_names = read_strings(h5["spatial_names"])
        self._row_of = {image_id: row for row, image_id in enumerate(self.image_ids)}

    @property
    def attrs(self) -> dict[str, Any]:
        """File attributes, with the JSON-encoded ones decoded."""
        result = {}
        for key in self._h5.attrs:
            value = self._h5.attrs[key]
            if isinstance(value, (str, bytes)) and key not in ("schema", "toolkit_version"):
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
            raise KeyError(f"image {image_id!r} is not in graph shard {self.path}") from None

    def num_regions(self, row: int) -> int:
        """Return R_i, the region count of image ``row``."""
        return int(round(float(np.sqrt(self.spatial_offsets[row + 1] - self.spatial_offsets[row]))))

    def spatial(self, row: int) -> np.ndarray:
        """Return image ``row``'s (R, R) uint8 spatial label matrix (0 on the diagonal)."""
        start, stop = int(self.spatial_offsets[row]), int(self.spatial_offsets[row + 1])
        count = self.num_regions(row)
        return self._h5["spatial_labels"][start:stop].reshape(count, count)

    def scene_graph(self, row: int) -> SceneGraphEdges:
        """Return image ``row``'s scene-graph edges, sorted by descending score."""
        start, stop = int(self.sg_offsets[row]), int(self.sg_offsets[row + 1])
        h5 = self._h5
        return SceneGraphEdges(
            subject=h5["sg_subject"][start:stop],
            object=h5["sg_object"][start:stop],
            predicate=h5["sg_predicate"][start:stop],
            score=h5["sg_score"][start:stop],
        )

    def spatial_label_counts(self) -> np.ndarray:
        """Return the (12,) int64 count of each spatial label over all images, diagonals included."""
        dataset = self._h5["spatial_labels"]
        total = np.zeros(NUM_RELATIONS, dtype=np.int64)
        for start in range(0, dataset.shape[0], _LABEL_BLOCK):
            total += np.bincount(dataset[start : start + _LABEL_BLOCK], minlength=NUM_RELATIONS)[:NUM_RELATIONS]
        return total

    def array(self, name: str) -> np.ndarray:
        """Read one whole flat column (``spatial_labels``, ``sg_predicate``, ...)."""
        return self._h5[name][()]

    def close(self) -> None:
        self._h5.close()

    def __enter__(self) -> "GraphShard":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def verify_graph_shard(
    path: str | os.PathLike,
    expected_ids: Sequence[str] | None = None,
    expected_region_counts: Sequence[int] | None = None,
) -> list[str]:
    """Check one graph shard and return a list of problems (empty when valid).

    Checks the schema attributes, the presence and lengths of every dataset and both
    offsets arrays. Each image must own a square number of spatial labels, labels must
    lie in 0..11 and predicates in 1..P-1. Subject and object must be different regions
    of the image, and scores must be finite and descending per image. The spatial label
    names must be ``RELATION_NAMES``.

    Args:
        path: the graph shard.
        expected_ids: the region shard's image ids; the shard must list exactly these.
        expected_region_counts: R_i of each image; image i must own R_i^2 labels.
    """
    try:
        h5 = h5py.File(path, "r")
    except OSError as error:
        return [f"cannot open as HDF5: {error}"]
    try:
        return _verify_open(h5, expected_ids, expected_region_counts)
    except (OSError, KeyError, ValueError, TypeError) as error:
        return [f"unreadable data: {error}"]
    finally:
        h5.close()


def _verify_open(h5: h5py.File, expected_ids: Sequence[str] | None, expected_counts: Sequence[int] | None) -> list[str]:
    if h5.attrs.get("schema") != SCHEMA:
        return [f"schema attribute is {h5.attrs.get('schema')!r}, expected {SCHEMA!r}"]
    if int(h5.attrs.get("schema_version", -1)) > SCHEMA_VERSION:
        return [f"schema version {h5.attrs.get('schema_version')} is newer than this toolkit reads ({SCHEMA_VERSION})"]
    if not h5.attrs.get("complete", False):
        return ["shard is not marked complete"]
    missing = [name for name in REQUIRED if name not in h5]
    if missing:
        return [f"missing datasets: {', '.join(missing)}"]

    problems = _check_images(h5, expected_ids)
    region_counts, spatial_problems = _check_spatial(h5, expected_counts)
    problems += spatial_problems
    if region_counts is not None:
        problems += _check_edges(h5, region_counts)
    return problems


def _check_images(h5: h5py.File, expected_ids: Sequence[str] | None) -> list[str]:
    problems = []
    image_ids = read_strings(h5["image_ids"])
    if int(h5.attrs["num_images"]) != len(image_ids):
        problems.append(f"attribute num_images is {h5.attrs['num_images']}, image_ids has {len(image_ids)} rows")
    if expected_ids is not None and image_ids != list(expected_ids):
        problems.append("image ids differ from the region shard's image ids")
    if read_strings(h5["spatial_names"]) != list(RELATION_NAMES):
        problems.append("spatial_names differ from graphs.spatial.RELATION_NAMES")
    return problems


def _check_spatial(h5: h5py.File, expected_counts: Sequence[int] | None) -> tuple[np.ndarray | None, list[str]]:
    """Check the spatial labels; return the region counts they imply and the problems."""
    num_images = h5["image_ids"].shape[0]
    offsets = h5["spatial_offsets"][()]
    labels = h5["spatial_labels"]
    problem = check_offsets(offsets, num_images, labels.shape[0])
    if problem:
        return None, [f"spatial_offsets: {problem}"]

    sizes = np.diff(offsets)
    counts = np.round(np.sqrt(sizes)).astype(np.int64)
    problems = []
    not_square = np.flatnonzero(counts * counts != sizes)
    if not_square.size:
        problems.append(f"image {not_square[0]} owns {sizes[not_square[0]]} spatial labels, not R * R for any R")
        return None, problems
    if expected_counts is not None:
        expected = np.asarray(expected_counts, dtype=np.int64)
        if expected.shape != counts.shape or (expected != counts).any():
            row = int(np.flatnonzero(expected != counts)[0]) if expected.shape == counts.shape else 0
            problems.append(
                f"spatial labels do not match the region counts: image {row} has "
                f"{counts[row] if counts.size else 0}^2 labels, its region shard row has "
                f"{expected[row] if expected.size > row else 'no'} regions"
            )

    for start in range(0, labels.shape[0], _LABEL_BLOCK):
        block = labels[start : start + _LABEL_BLOCK]
        if block.size and block.max() >= NUM_RELATIONS:
            problems.append(f"spatial label {int(block.max())} is outside 0..{NUM_RELATIONS - 1}")
            break
    return counts, problems


def _check_edges(h5: h5py.File, region_counts: np.ndarray) -> list[str]:
    num_images = region_counts.shape[0]
    offsets = h5["sg_offsets"][()]
    num_edges = h5["sg_subject"].shape[0]
    problem = check_offsets(offsets, num_images, num_edges)
    if problem:
        return [f"sg_offsets: {problem}"]
    problems = []
    for name in EDGE_COLUMNS:
        if h5[name].shape[0] != num_edges:
            problems.append(f"{name} has {h5[name].shape[0]} rows, sg_subject has {num_edges}")
    if int(h5.attrs["num_edges"]) != num_edges:
        problems.append(f"attribute num_edges is {h5.attrs['num_edges']}, the data has {num_edges} edges")
    if problems or num_edges == 0:
        return problems

    subject, object_ = h5["sg_subject"][()], h5["sg_object"][()]
    predicate, score = h5["sg_predicate"][()], h5["sg_score"][()]
    limit = np.repeat(region_counts, np.diff(offsets))
    num_predicates = h5["predicate_names"].shape[0]
    if ((subject < 0) | (subject >= limit) | (object_ < 0) | (object_ >= limit)).any():
        problems.append("a scene-graph edge refers to a region outside its image")
    if (subject == object_).any():
        problems.append("a scene-graph edge has the same region as subject and object")
    if predicate.min() < 1 or predicate.max() >= num_predicates:
        problems.append(f"scene-graph predicates must lie in 1..{num_predicates - 1}, got {predicate.min()}..{predicate.max()}")
    if not np.isfinite(score).all():
        problems.append("sg_score contains NaN or infinity")
    else:
        image_start = np.zeros(num_edges, dtype=bool)
        image_start[offsets[:-1][offsets[:-1] < num_edges]] = True
        increases = np.flatnonzero((np.diff(score) > 0) & ~image_start[1:])
        if increases.size:
            problems.append("scene-graph edges of an image are not sorted by descending score")
    return problems
