"""Summary and checks of the graphs stage, behind ``cmsei-prep inspect`` and ``verify``."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from graphs.spatial import NUM_RELATIONS, RELATION_NAMES
from pipeline.dataset import GRAPHS, DatasetFolder
from pipeline.graph_shards import GraphShard, shard_file_name, verify_graph_shard
from pipeline.manifest import read_manifest
from pipeline.region_shards import RegionShard

logger = logging.getLogger(__name__)

def count_graph_shards(paths: list[Path]) -> dict[str, Any]:
    """Count images, spatial edges per label and scene-graph edges per predicate.

    Args:
        paths: graph shards to read.

    Returns:
        ``images``, ``images_with_regions`` (at least one region), ``spatial_edges``
        (label name -> ordered pairs with that label; ``none`` leaves out the
        diagonal), ``scene_graph_edges``, ``scene_graph_predicates`` (name -> edges)
        and ``scene_graph_counts``, the sums of the shards' per-run counts.
    """
    images, with_regions, diagonal, edges = 0, 0, 0, 0
    labels = np.zeros(NUM_RELATIONS, dtype=np.int64)
    predicates: Counter[str] = Counter()
    counts: Counter[str] = Counter()
    for path in paths:
        with GraphShard(path) as shard:
            region_counts = np.array([shard.num_regions(row) for row in range(len(shard))], dtype=np.int64)
            images += len(shard)
            with_regions += int((region_counts > 0).sum())
            diagonal += int(region_counts.sum())
            labels += shard.spatial_label_counts()
            predicate_ids = shard.array("sg_predicate")
            edges += int(predicate_ids.shape[0])
            for index, count in enumerate(np.bincount(predicate_ids, minlength=len(shard.predicate_names))):
                if count:
                    predicates[shard.predicate_names[index]] += int(count)
            counts.update(shard.attrs.get("scene_graph_counts") or {})
    labels[0] -= diagonal
    return {
        "images": images,
        "images_with_regions": with_regions,
        "spatial_edges": {name: int(count) for name, count in zip(RELATION_NAMES, labels)},
        "scene_graph_edges": edges,
        "scene_graph_predicates": dict(predicates.most_common()),
        "scene_graph_counts": dict(counts),
    }


def summarize_graphs(data: DatasetFolder) -> dict[str, Any]:
    """Summarise the graphs stage: shards, images, edges per spatial label and predicate, config."""
    stage_dir = data.stage_dir(GRAPHS)
    manifest = read_manifest(stage_dir) or {}
    planned = [stage_dir / shard_file_name(index) for index in range(int(manifest.get("num_shards", 0)))]
    present = [path for path in planned if path.exists()]
    summary: dict[str, Any] = {
        "config": manifest.get("config"),
        "shards": len(planned),
        "shards_present": len(present),
    }
    try:
        summary |= count_graph_shards(present)
    except (OSError, ValueError, KeyError) as error:
        summary["note"] = f"a graph shard cannot be read ({error}); run `cmsei-prep verify`"
        return summary
    if summary["config"] and summary["config"].get("scene_graphs") == "none":
        summary["note"] = "no scene graphs: the stage ran without --relations, --import-sgb or --import-vinvl"
    return summary


def verify_graphs(data: DatasetFolder) -> list[str]:
    """Check every planned graph shard against its region shard; return the problems."""
    stage_dir = data.stage_dir(GRAPHS)
    manifest = read_manifest(stage_dir) or {}
    try:
        region_paths = data.region_shard_paths()
    except FileNotFoundError as error:
        return [str(error)]
    problems = []
    if int(manifest.get("num_shards", -1)) != len(region_paths):
        problems.append(f"the graphs manifest plans {manifest.get('num_shards')} shards, the regions stage has "
                        f"{len(region_paths)}; rerun `cmsei-prep graphs --overwrite`")
    for index, region_path in enumerate(region_paths):
        path = stage_dir / shard_file_name(index)
        if not path.exists():
            problems.append(f"{path.name} is missing (rerun `cmsei-prep graphs` to complete it)")
            continue
        if not region_path.exists():
            problems.append(f"{path.name}: its region shard {region_path.name} is missing")
            continue
        with RegionShard(region_path) as regions:
            image_ids, counts = regions.image_ids, np.diff(regions.offsets)
        problems += [f"{path.name}: {problem}" for problem in verify_graph_shard(path, image_ids, counts)]
    return problems
