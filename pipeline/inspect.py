"""Summaries and checks of a dataset folder, behind ``cmsei-prep inspect`` and ``verify``.

Each stage contributes a summary function and a verify function; stages that have not
run are left out of the summary.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Any, Callable

from pipeline.dataset import REGIONS, DatasetFolder
from pipeline.manifest import read_listing, read_manifest
from pipeline.region_index import INDEX_NAME, read_region_index
from pipeline.region_shards import RegionShard, verify_region_shard

logger = logging.getLogger(__name__)

# stage -> "module:summary_function,verify_function"; later stages register here.
STAGE_CHECKS: dict[str, str] = {
    REGIONS: "pipeline.inspect:summarize_regions,verify_regions",
    "captions": "pipeline.caption_inspect:summarize_captions,verify_captions",
    "graphs": "pipeline.graph_inspect:summarize_graphs,verify_graphs",
}


def _stage_functions(stage: str) -> tuple[Callable, Callable]:
    module_name, names = STAGE_CHECKS[stage].split(":")
    summary_name, verify_name = names.split(",")
    module = importlib.import_module(module_name)
    return getattr(module, summary_name), getattr(module, verify_name)


def inspect_dataset(root: str | Path) -> dict[str, Any]:
    """Return a JSON-serialisable summary of every stage present in the dataset folder."""
    data = DatasetFolder(root)
    summary: dict[str, Any] = {"dataset": str(data.root), "stages": {}}
    for stage in STAGE_CHECKS:
        if data.has_stage(stage):
            summarize, _ = _stage_functions(stage)
            summary["stages"][stage] = summarize(data)
    return summary


def verify_dataset(root: str | Path) -> dict[str, list[str]]:
    """Check every stage present; return ``{stage: [problem, ...]}`` (empty lists when sound)."""
    data = DatasetFolder(root)
    problems: dict[str, list[str]] = {}
    for stage in STAGE_CHECKS:
        if data.has_stage(stage):
            _, verify = _stage_functions(stage)
            problems[stage] = verify(data)
    return problems


def summarize_regions(data: DatasetFolder) -> dict[str, Any]:
    """Summarise the regions stage: image counts by status, failures, regions, shards."""
    stage_dir = data.stage_dir(REGIONS)
    manifest = read_manifest(stage_dir) or {}
    shard_paths = data.region_shard_paths()
    present = [path for path in shard_paths if path.exists()]
    summary: dict[str, Any] = {
        "source": manifest.get("source"),
        "detector": manifest.get("config", {}).get("detector"),
        "shards": len(shard_paths),
        "shards_present": len(present),
    }
    if not (stage_dir / INDEX_NAME).exists():
        summary["note"] = "index.parquet is missing: the run was interrupted; rerun the same command to resume"
        return summary

    index = read_region_index(stage_dir)
    counts = index["status"].value_counts().to_dict()
    ok = index[index["status"] == "ok"]
    summary |= {
        "images": int((index["status"] != "skipped").sum()),
        "images_ok": int(counts.get("ok", 0)),
        "images_failed": int(counts.get("failed", 0)),
        "images_pending": int(counts.get("pending", 0)),
        "files_skipped": int(counts.get("skipped", 0)),
        "regions": int(ok["num_regions"].sum()),
        "regions_per_image": _describe(ok["num_regions"].tolist()),
        "failures": _records(index[index["status"].isin(["failed", "pending"])]),
        "skipped": _records(index[index["status"] == "skipped"]),
    }
    if present:
        with RegionShard(present[0]) as shard:
            summary["feature_dim"] = int(shard.attrs["feature_dim"])
            summary["feature_dtype"] = str(shard.array("features").dtype) if len(shard.offsets) > 1 else None
    return summary


def _describe(values: list[int]) -> dict[str, float]:
    if not values:
        return {"min": 0, "max": 0, "mean": 0.0}
    return {"min": int(min(values)), "max": int(max(values)), "mean": round(sum(values) / len(values), 2)}


def _records(frame) -> list[dict[str, str]]:
    return [{"image_id": row.image_id, "reason": row.reason} for row in frame.itertuples()]


def verify_regions(data: DatasetFolder) -> list[str]:
    """Check every planned region shard against the listing, and the index."""
    stage_dir = data.stage_dir(REGIONS)
    problems = []
    try:
        listing = read_listing(stage_dir)
    except (OSError, ValueError) as error:
        return [f"listing.parquet cannot be read: {error}"]

    expected = {shard: list(group["image_id"]) for shard, group in listing.groupby("shard", sort=True)}
    for index, path in enumerate(data.region_shard_paths()):
        if not path.exists():
            problems.append(f"{path.name} is missing (rerun the extraction to complete it)")
            continue
        for problem in verify_region_shard(path, expected_ids=expected.get(index, [])):
            problems.append(f"{path.name}: {problem}")

    if not (stage_dir / INDEX_NAME).exists():
        problems.append("index.parquet is missing")
    else:
        index = read_region_index(stage_dir)
        listed = index[index["status"] != "skipped"]
        if sorted(listed["image_id"]) != sorted(listing["image_id"]):
            problems.append("index.parquet and listing.parquet list different images")
        if listed["image_id"].duplicated().any():
            problems.append("index.parquet lists an image twice")
    return problems

