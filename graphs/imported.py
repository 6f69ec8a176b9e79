"""Scene graphs made by other tools, matched to the regions of a dataset folder.

Shapes: B boxes of an imported graph, R regions of the same image, E imported edges.
Boxes are x1, y1, x2, y2.

An imported graph has its own boxes, so its edges are moved to our regions by box
overlap. The rule, applied per image after the boxes are brought to original-image
pixels:

1. Compute the IoU of every (imported box, region) pair.
2. Repeatedly take the pair with the highest IoU among boxes and regions not yet
   matched, while that IoU is at least the threshold (0.5 by default), and match them.
   Ties go to the lower box index, then the lower region index.
3. An edge is kept when both of its boxes are matched, and becomes the edge between
   their regions. Of several edges that land on the same (subject, object, predicate),
   the one with the highest score is kept.

Boxes of the Scene-Graph-Benchmark custom output are in the frame that its test
transform resized the image to (``resized_frame_size``) and are scaled back first.
"""

from __future__ import annotations

import logging
import posixpath
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np

from pipeline.graph_shards import SceneGraphEdges

logger = logging.getLogger(__name__)

DEFAULT_MATCH_IOU = 0.5


class SceneGraphImportError(ValueError):
    """An imported scene-graph file cannot be read; the message names the file and the field."""


@dataclass
class ImportedSceneGraph:
    """One image's scene graph as another tool wrote it.

    Attributes:
        boxes: (B, 4) float64 x1, y1, x2, y2 in the source frame.
        subject: (E,) int64 rows of ``boxes``.
        object: (E,) int64 rows of ``boxes``.
        predicate: (E,) int64 indices into the import's predicate names, 1..P-1.
        score: (E,) float32 confidences.
        resized_frame: None when the boxes are in original-image pixels, else the
            (min_size, max_size) of the resize whose frame they are in.
    """

    boxes: np.ndarray
    subject: np.ndarray
    object: np.ndarray
    predicate: np.ndarray
    score: np.ndarray
    resized_frame: tuple[int, int] | None = None


@dataclass
class SceneGraphImport:
    """A whole imported file: graphs by image id, predicate names and what was not used.

    Attributes:
        source: a description of the files, for the stage configuration.
        predicate_names: the P names, background first.
        graphs: image id of the dataset -> its imported graph.
        unmatched_keys: keys of the file that name no image of the dataset.
    """

    source: dict
    predicate_names: tuple[str, ...]
    graphs: dict[str, ImportedSceneGraph]
    unmatched_keys: list[str] = field(default_factory=list)


@dataclass
class MatchCounts:
    """Counts of one or more matched images, summed by ``add``."""

    images: int = 0
    boxes: int = 0
    boxes_matched: int = 0
    edges: int = 0
    edges_kept: int = 0
    edges_unmatched_box: int = 0
    edges_duplicate: int = 0
    edges_over_top_k: int = 0

    def add(self, other: "MatchCounts") -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


def resized_frame_size(image_size: tuple[int, int], min_size: int, max_size: int) -> tuple[int, int]:
    """Return the (height, width) that Scene-Graph-Benchmark's test resize gives an image.

    The shorter side becomes ``min_size`` unless the longer side would then exceed
    ``max_size``, in which case the shorter side becomes the rounded
    ``max_size * shorter / longer``. The other side is truncated to an integer. This is
    the rule of maskrcnn-benchmark's ``Resize.get_size``, which Scene-Graph-Benchmark
    uses with ``INPUT.MIN_SIZE_TEST`` 600 and ``INPUT.MAX_SIZE_TEST`` 1000 by default.

    Args:
        image_size: original (height, width) in pixels, both positive.
        min_size: target length of the shorter side.
        max_size: limit of the longer side.
    """
    height, width = image_size
    size = min_size
    shorter, longer = float(min(height, width)), float(max(height, width))
    if longer / shorter * size > max_size:
        size = int(round(max_size * shorter / longer))
    if (width <= height and width == size) or (height <= width and height == size):
        return int(height), int(width)
    if width < height:
        return int(size * height / width), size
    return size, int(size * width / height)


def to_original_pixels(graph: ImportedSceneGraph, image_size: tuple[int, int]) -> np.ndarray:
    """Return the graph's boxes in pixels of the original (height, width) image."""
    boxes = np.asarray(graph.boxes, dtype=np.float64).reshape(-1, 4)
    if graph.resized_frame is None:
        return boxes
    resized_height, resized_width = resized_frame_size(image_size, *graph.resized_frame)
    scale = np.array([image_size[1] / resized_width, image_size[0] / resized_height] * 2)
    return boxes * scale


def box_iou(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Return the (B, R) IoU of two sets of x1, y1, x2, y2 boxes; 0 for empty boxes."""
    first = np.asarray(first, dtype=np.float64).reshape(-1, 4)
    second = np.asarray(second, dtype=np.float64).reshape(-1, 4)
    top_left = np.maximum(first[:, None, :2], second[None, :, :2])
    bottom_right = np.minimum(first[:, None, 2:], second[None, :, 2:])
    intersection = np.clip(bottom_right - top_left, 0, None).prod(axis=2)
    area_first = np.clip(first[:, 2:] - first[:, :2], 0, None).prod(axis=1)
    area_second = np.clip(second[:, 2:] - second[:, :2], 0, None).prod(axis=1)
    union = area_first[:, None] + area_second[None, :] - intersection
    return np.divide(intersection, union, out=np.zeros_like(intersection), where=union > 0)


def greedy_match(iou: np.ndarray, threshold: float) -> np.ndarray:
    """Match boxes to regions one to one, highest IoU first, as in the module docstring.

    Args:
        iou: (B, R) float IoU matrix.
        threshold: minimum IoU of a match.

    Returns:
        (B,) int64, the matched region of each box or -1.
    """
    matches = np.full(iou.shape[0], -1, dtype=np.int64)
    if iou.size == 0:
        return matches
    box_rows, region_columns = np.nonzero(iou >= threshold)
    values = iou[box_rows, region_columns]
    order = np.lexsort((region_columns, box_rows, -values))
    region_taken = np.zeros(iou.shape[1], dtype=bool)
    for index in order:
        box, region = box_rows[index], region_columns[index]
        if matches[box] < 0 and not region_taken[region]:
            matches[box] = region
            region_taken[region] = True
    return matches


def match_to_regions(
    graph: ImportedSceneGraph,
    region_boxes: np.ndarray,
    image_size: tuple[int, int],
    top_k: int,
    iou_threshold: float = DEFAULT_MATCH_IOU,
) -> tuple[SceneGraphEdges, MatchCounts]:
    """Move an imported graph's edges onto our regions and keep the top K by score.

    Args:
        graph: the imported graph of one image.
        region_boxes: (R, 4) float boxes of our regions, original-image pixels.
        image_size: original (height, width) of the image.
        top_k: most edges kept.
        iou_threshold: minimum IoU of a box-region match.

    Returns:
        The edges between regions, sorted by descending score, and the counts.
    """
    boxes = to_original_pixels(graph, image_size)
    matches = greedy_match(box_iou(boxes, region_boxes), iou_threshold)
    counts = MatchCounts(images=1, boxes=boxes.shape[0], boxes_matched=int((matches >= 0).sum()), edges=len(graph.subject))

    subject = matches[graph.subject] if len(graph.subject) else np.zeros(0, np.int64)
    object_ = matches[graph.object] if len(graph.object) else np.zeros(0, np.int64)
    usable = (subject >= 0) & (object_ >= 0)
    counts.edges_unmatched_box = int((~usable).sum())

    order = np.argsort(-np.asarray(graph.score, dtype=np.float64)[usable], kind="stable")
    unique_rows, seen = [], set()
    usable_rows = np.flatnonzero(usable)[order]
    for row in usable_rows:
        key = (int(subject[row]), int(object_[row]), int(graph.predicate[row]))
        if key in seen:
            counts.edges_duplicate += 1
            continue
        seen.add(key)
        unique_rows.append(row)
    counts.edges_over_top_k = max(0, len(unique_rows) - top_k)
    top_rows = np.array(unique_rows[:top_k], dtype=np.int64)
    counts.edges_kept = int(top_rows.shape[0])

    edges = SceneGraphEdges(
        subject=subject[top_rows].astype(np.int32),
        object=object_[top_rows].astype(np.int32),
        predicate=np.asarray(graph.predicate)[top_rows].astype(np.int32),
        score=np.asarray(graph.score)[top_rows].astype(np.float32),
    )
    return edges, counts


def match_image_keys(keys: Iterable[str], image_ids: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """Map the image keys or file paths of an imported file to our image ids.

    A key matches the id that equals it. Otherwise it matches the id that its path ends
    with (``/data/vg/images/2.jpg`` matches ``images/2.jpg`` and ``2.jpg``; the longest
    such id wins). Otherwise it matches the one id whose file name without extension
    equals the key's (VinVL keys such as ``2`` match ``2.jpg``). Keys that match
    nothing, or only ambiguously, are returned as unmatched.

    Returns:
        key -> image id, and the unmatched keys in file order.
    """
    ids = set(image_ids)
    by_name: dict[str, list[str]] = defaultdict(list)
    by_stem: dict[str, list[str]] = defaultdict(list)
    for image_id in image_ids:
        name = posixpath.basename(image_id)
        by_name[name].append(image_id)
        by_stem[posixpath.splitext(name)[0]].append(image_id)

    matched, unmatched = {}, []
    for key in keys:
        normalised = str(key).replace("\\", "/")
        if normalised in ids:
            matched[key] = normalised
            continue
        name = posixpath.basename(normalised)
        suffixes = [image_id for image_id in by_name.get(name, []) if normalised.endswith("/" + image_id)]
        stems = by_stem.get(posixpath.splitext(name)[0], [])
        if suffixes:
            matched[key] = max(suffixes, key=len)
        elif len(stems) == 1:
            matched[key] = stems[0]
        else:
            unmatched.append(str(key))
    return matched, unmatched


def field_array(record: dict, name: str, where: str, dtype: Any, shape: tuple[int, ...]) -> np.ndarray:
    """Return ``record[name]`` as an array of ``shape``, -1 meaning any length.

    An empty list fits any shape.

    Raises:
        SceneGraphImportError: when the field is missing, not numeric or of another
            shape; the message starts with ``where``.
    """
    if name not in record:
        raise SceneGraphImportError(f"{where}: field {name!r} is missing")
    try:
        values = np.asarray(record[name], dtype=dtype)
    except (TypeError, ValueError) as error:
        raise SceneGraphImportError(f"{where}: field {name!r} is not a numeric array: {error}") from None
    if values.size == 0:
        return np.zeros([0 if size < 0 else size for size in shape], dtype=dtype)
    if values.ndim != len(shape) or any(size >= 0 and size != actual for size, actual in zip(shape, values.shape)):
        expected = ", ".join("n" if size < 0 else str(size) for size in shape)
        raise SceneGraphImportError(f"{where}: field {name!r} has shape {values.shape}, expected ({expected})")
    return values
