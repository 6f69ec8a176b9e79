"""Import of SCAN precomp splits (features, ids, captions, GSMN boxes and sizes) into region shards."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.dataset import DatasetFolder
from pipeline.importers.stage import ImportOptions, import_features
from pipeline.inspect import verify_dataset
from pipeline.manifest import read_manifest
from pipeline.region_shards import RegionShard

REPO_ROOT = Path(__file__).resolve().parents[1]


def write_precomp(folder: Path, split: str, count: int, per_image: int = 36, dim: int = 64, seed: int = 0,
                  ids: bool = True, boxes: bool = True, captions: bool = True) -> dict[str, np.ndarray]:
    """Write a synthetic precomp split; return the arrays written."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    features = rng.standard_normal((count, per_image, dim), dtype=np.float32)
    np.save(folder / f"{split}_ims.npy", features)
    written = {"features": features}
    if ids:
        image_ids = [str(100 + 7 * row) for row in range(count)]
        (folder / f"{split}_ids.txt").write_text("\n".join(image_ids) + "\n", encoding="utf-8")
        written["ids"] = np.array(image_ids)
    if captions:
        (folder / f"{split}_caps.txt").write_text("a caption\n" * (5 * count), encoding="utf-8")
    if boxes:
        heights = rng.integers(200, 600, count)
        widths = rng.integers(200, 600, count)
        x1 = rng.uniform(0, 100, (count, per_image))
        y1 = rng.uniform(0, 100, (count, per_image))
        box_array = np.stack([x1, y1, x1 + 50, y1 + 50], axis=2).astype(np.float32)
        sizes = np.empty(count, dtype=object)
        sizes[:] = [{"image_h": int(h), "image_w": int(w)} for h, w in zip(heights, widths)]
        np.save(folder / f"{split}_ims_bbx.npy", box_array)
        np.save(folder / f"{split}_ims_size.npy", sizes, allow_pickle=True)
        written |= {"boxes": box_array, "sizes": np.stack([heights, widths], axis=1)}
    return written


def by_id(data: Path) -> dict:
    return {image.image_id: image for image in DatasetFolder(data).iter_regions()}


def test_precomp_with_boxes(tmp_path):
    written = write_precomp(tmp_path / "precomp", "test", 12)
    summary = import_features(ImportOptions(sources=[tmp_path / "precomp"], out=tmp_path / "data", dtype="float32", shard_size=5))

    assert summary.format == "scan"
    assert summary.num_ok == 12
    assert summary.has_boxes is True
    assert summary.source_facts["num_captions"] == 60
    assert summary.source_facts["split"] == "test"
    images = by_id(tmp_path / "data")
    for row, image_id in enumerate(written["ids"]):
        image = images[f"{image_id}.jpg"]
        np.testing.assert_array_equal(image.features, written["features"][row])
        np.testing.assert_array_equal(image.boxes, written["boxes"][row])
        assert image.image_size == tuple(written["sizes"][row])
    assert verify_dataset(tmp_path / "data") == {"regions": []}


def test_precomp_without_boxes(tmp_path):
    written = write_precomp(tmp_path / "precomp", "dev", 4, ids=False, boxes=False, captions=False)
    summary = import_features(ImportOptions(sources=[tmp_path / "precomp" / "dev_ims.npy"], out=tmp_path / "data"))

    assert summary.has_boxes is False
    assert read_manifest(tmp_path / "data" / "regions")["has_boxes"] is False
    images = by_id(tmp_path / "data")
    assert sorted(images) == ["dev-000000", "dev-000001", "dev-000002", "dev-000003"]
    assert not images["dev-000002"].boxes.any()
    assert images["dev-000002"].image_size == (0, 0)
    np.testing.assert_allclose(images["dev-000002"].features, written["features"][2], rtol=1e-3)
    with RegionShard(DatasetFolder(tmp_path / "data").region_shard_paths()[0]) as shard:
        assert shard.attrs["input"]["has_boxes"] is False
        assert shard.attrs["config"]["has_boxes"] is False


def test_precomp_bad_rows_fail_alone(tmp_path):
    folder = tmp_path / "precomp"
    write_precomp(folder, "test", 6)
    features = np.load(folder / "test_ims.npy")
    features[3, 0, 0] = np.nan
    np.save(folder / "test_ims.npy", features)
    boxes = np.load(folder / "test_ims_bbx.npy")
    boxes[4, 2] = (10, 10, 5000, 20)
    np.save(folder / "test_ims_bbx.npy", boxes)

    summary = import_features(ImportOptions(sources=[folder], out=tmp_path / "data"))
    index = DatasetFolder(tmp_path / "data").region_index().set_index("image_id")
    assert summary.num_ok == 4
    assert index.loc["121.jpg", "reason"].startswith("non-finite: row 3: features contain 1 NaN")
    assert index.loc["128.jpg", "reason"].startswith("box-outside-image: row 4: box 2")


def test_precomp_split_choice(tmp_path):
    folder = tmp_path / "precomp"
    write_precomp(folder, "test", 2)
    write_precomp(folder, "dev", 3)
    with pytest.raises(ValueError, match="pass --split"):
        import_features(ImportOptions(sources=[folder], out=tmp_path / "a", format="scan"))
    summary = import_features(ImportOptions(sources=[folder], out=tmp_path / "b", split="dev"))
    assert summary.num_ok == 3


def test_precomp_inconsistent_files(tmp_path):
    folder = tmp_path / "precomp"
    write_precomp(folder, "test", 3)
    (folder / "test_ids.txt").write_text("1\n2\n", encoding="utf-8")
    with pytest.raises(ValueError, match="lists 2 ids but test_ims.npy has 3 rows"):
        import_features(ImportOptions(sources=[folder], out=tmp_path / "a"))

    write_precomp(folder, "test", 3)
    (folder / "test_ims_size.npy").unlink()
    with pytest.raises(ValueError, match="test_ims_size.npy does not"):
        import_features(ImportOptions(sources=[folder], out=tmp_path / "b"))


MEMORY_PROBE = """
import io, json, sys
import pandas as pd
from pipeline.importers.stage import ImportOptions, import_features

def status_kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])

pd.DataFrame({"warm": [1]}).to_parquet(io.BytesIO())
before = status_kib("VmRSS")
try:
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
except OSError:
    pass
summary = import_features(ImportOptions(sources=[sys.argv[1]], out=sys.argv[2], shard_size=50, compression=None))
print(json.dumps({"before_kib": before, "peak_kib": status_kib("VmHWM"), "ok": summary.num_ok}))
"""


def test_precomp_memory_far_below_size(tmp_path):
    """500 images of 36 x 2048 float32 (147 MB) import while peak memory grows far less.

    The peak is read from VmHWM of a fresh process, because ru_maxrss survives exec on
    Linux and would report the pytest process's peak.
    """
    folder = tmp_path / "precomp"
    write_precomp(folder, "train", 500, dim=2048, ids=False, boxes=False, captions=False)
    file_bytes = (folder / "train_ims.npy").stat().st_size

    try:
        result = subprocess.run(
            [sys.executable, "-c", MEMORY_PROBE, str(folder), str(tmp_path / "data")],
            cwd=REPO_ROOT, env=os.environ | {"PYTHONPATH": str(REPO_ROOT)}, capture_output=True, text=True, check=True,
        )
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    growth_bytes = (report["peak_kib"] - report["before_kib"]) * 1024
    assert report["ok"] == 500
    assert growth_bytes < file_bytes / 3, (growth_bytes, file_bytes)
