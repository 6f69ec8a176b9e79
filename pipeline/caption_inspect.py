"""Summary and checks of the captions stage for ``inspect`` and ``verify``."""

from __future__ import annotations

import json
from typing import Any

import pandas as pd

from pipeline.caption_shards import shard_file_name, verify_caption_shard
from pipeline.dataset import CAPTIONS, DatasetFolder
from pipeline.manifest import read_manifest

MAX_LISTED = 200


def summarize_captions(data: DatasetFolder) -> dict[str, Any]:
    """Summarise captions: counts by status, tokens, objects, relations, images, vocabulary."""
    stage_dir = data.stage_dir(CAPTIONS)
    manifest = read_manifest(stage_dir) or {}
    summary_path = stage_dir / "summary.json"
    run = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.exists() else {}
    if not (stage_dir / "index.parquet").exists():
        return {"source": manifest.get("source"), "note": "index.parquet is missing: rerun the same command to resume"}

    index = pd.read_parquet(stage_dir / "index.parquet")
    ok = index[index["status"] == "ok"]
    skipped = index[index["status"] == "skipped"]
    return {
        "source": manifest.get("source"),
        "format": run.get("format"),
        "shards": int(manifest.get("num_shards", 0)),
        "captions": int(len(ok)),
        "captions_skipped": int(len(skipped)),
        "captions_pending": int((index["status"] == "pending").sum()),
        "captions_truncated": run.get("truncated"),
        "tokens": int(ok["num_tokens"].sum()),
        "objects": int(ok["num_objects"].sum()),
        "relations": int(ok["num_relations"].sum()),
        "captions_with_relations": int((ok["num_relations"] > 0).sum()),
        "images": int(ok["image_id"].nunique()),
        "images_without_regions": run.get("unmatched_images"),
        "splits": {str(k): int(v) for k, v in ok["split"].fillna("none").value_counts().items()},
        "vocab_size": run.get("vocab_size"),
        "notes": run.get("notes", []),
        "skipped": [{"image_id": r.image_id, "reason": f"caption {r.caption_index}: {r.reason}"}
                    for r in skipped.head(MAX_LISTED).itertuples()],
    }


def verify_captions(data: DatasetFolder) -> list[str]:
    """Check every planned caption shard and the index."""
    stage_dir = data.stage_dir(CAPTIONS)
    manifest = read_manifest(stage_dir) or {}
    problems = []
    index_path = stage_dir / "index.parquet"
    index = pd.read_parquet(index_path) if index_path.exists() else None
    if index is None:
        problems.append("index.parquet is missing")
    for shard_index in range(int(manifest.get("num_shards", 0))):
        path = stage_dir / shard_file_name(shard_index)
        if not path.exists():
            problems.append(f"{path.name} is missing (rerun the captions stage to complete it)")
            continue
        expected = None if index is None else int((index["shard"] == shard_index).sum())
        problems.extend(f"{path.name}: {problem}" for problem in verify_caption_shard(path, expected))
    if not (stage_dir / "vocab.json").exists():
        problems.append("vocab.json is missing")
    return problems
