"""The visual graphs of one image, read from a dataset folder's region and graph shards.

Shapes: R regions of the image, E scene-graph edges. Boxes are x1, y1, x2, y2 in
pixels of the original image.

Example:
    >>> graphs = load_image_graphs(DatasetFolder("DATA"), "000000000139.jpg")
    >>> graphs.spatial.labels.shape, len(graphs.scene.edges)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from pipeline.dataset import GRAPHS, REGIONS, DatasetFolder
from pipeline.graph_shards import GraphShard, SceneGraphEdges
from pipeline.graph_shards import shard_file_name as graph_shard_name
from pipeline.region_shards import ImageRegions, RegionShard
from pipeline.region_shards import shard_file_name as region_shard_name

logger = logging.getLogger(__name__)


@dataclass
class RegionNodes:
    """The regions of one image as graph nodes (R of them).

    Attributes:
        boxes: (R, 4) float32 boxes.
        object_names: R class names (from the shard's ``object_names``).
        object_scores: (R,) float32 class confidences.
        attribute_names: R attribute names, "" where the detector has no attribute head.
    """

    boxes: np.ndarray
    object_names: list[str]
    object_scores: np.ndarray
    attribute_names: list[str]

    @classmethod
    def from_regions(cls, regions: ImageRegions, object_names: list[str], attribute_names: list[str]) -> "RegionNodes":
        """Name the classes and attributes of regions read from a region shard."""
        objects = [object_names[int(index)] for index in regions.object_ids]
        attributes = [attribute_names[int(index)] if 0 <= int(index) < len(attribute_names) else ""
                      for index in regions.attribute_ids]
        return cls(np.asarray(regions.boxes), objects, np.asarray(regions.object_scores), attributes)


@dataclass
class SpatialGraph:
    """The spatial relation graph of one image: label [i, j] relates region i to region j.

    Attributes:
        image_id: the image.
        image_size: (height, width) in pixels.
        regions: the R nodes.
        labels: (R, R) uint8 indices into ``label_names``, 0 (none) on the diagonal.
        label_names: the 12 names of ``graphs.spatial.RELATION_NAMES``.
    """

    image_id: str
    image_size: tuple[int, int]
    regions: RegionNodes
    labels: np.ndarray
    label_names: list[str]


@dataclass
class SceneGraph:
    """The scene graph of one image: E (subject, predicate, object) edges between regions.

    Attributes:
        image_id: the image.
        image_size: (height, width) in pixels.
        regions: the R nodes.
        edges: the edges, sorted by descending score.
        predicate_names: the names that ``edges.predicate`` indexes, background at 0.
    """

    image_id: str
    image_size: tuple[int, int]
    regions: RegionNodes
    edges: SceneGraphEdges
    predicate_names: list[str]


@dataclass
class ImageGraphs:
    """Both visual graphs of one image, with its regions as stored."""

    regions: ImageRegions
    spatial: SpatialGraph
    scene: SceneGraph


def load_image_graphs(data: DatasetFolder, image_id: str) -> ImageGraphs:
    """Read the regions, spatial graph and scene graph of one image.

    Raises:
        KeyError: when the image is not in the region shards.
        FileNotFoundError: when the graphs stage has not run or its shard is missing.
    """
    index = data.region_index()
    match = index[index["image_id"] == image_id]
    if match.empty or int(match.iloc[0]["shard"]) < 0:
        raise KeyError(f"image {image_id!r} is not in the region shards of {data.root}; `cmsei-prep inspect` lists the ids")
    shard_index, row = int(match.iloc[0]["shard"]), int(match.iloc[0]["row"])

    graph_path = data.stage_dir(GRAPHS) / graph_shard_name(shard_index)
    if not graph_path.exists():
        raise FileNotFoundError(f"{graph_path} does not exist; run `cmsei-prep graphs --data {data.root}` first")
    with RegionShard(data.stage_dir(REGIONS) / region_shard_name(shard_index)) as shard:
        regions = shard[row]
        nodes = RegionNodes.from_regions(regions, shard.object_names, shard.attribute_names)
    with GraphShard(graph_path) as graphs:
        graph_row = graphs.row(image_id)
        labels = graphs.spatial(graph_row)
        edges = graphs.scene_graph(graph_row)
        spatial = SpatialGraph(image_id, regions.image_size, nodes, labels, list(graphs.spatial_names))
        scene = SceneGraph(image_id, regions.image_size, nodes, edges, list(graphs.predicate_names))
    return ImageGraphs(regions, spatial, scene)
