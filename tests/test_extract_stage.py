"""End-to-end tests of the extraction stage on real image files, real Ray and real HDF5."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from pipeline.dataset import DatasetFolder
from pipeline.extract import ExtractError, ExtractOptions, extract_images
from pipeline.inspect import inspect_dataset, verify_dataset
from pipeline.manifest import StageConflictError
from pipeline.ray_runner import RayOptions
from pipeline.region_shards import RegionShard
from tests.imagecases import expected_upright_sizes, write_bad_inputs, write_good_images

TINY = {"detector": "tiny", "weights": "untrained"}


def _options(images: Path, out: Path, **kwargs) -> ExtractOptions:
    fields = TINY | {"ray": RayOptions(workers=1, cpus_per_worker=1)} | kwargs
    return ExtractOptions(images=images, out=out, **fields)


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    folder = tmp_path_factory.mktemp("bad-inputs")
    return folder, write_bad_inputs(folder)


@pytest.fixture(scope="module")
def bad_run(bad_inputs, tmp_path_factory, ray_local):
    folder, _ = bad_inputs
    out = tmp_path_factory.mktemp("bad-run")
    summary = extract_images(_options(folder, out, shard_size=8))
    return out, summary


def test_every_input_recorded(bad_inputs, bad_run):
    _, expected = bad_inputs
    out, summary = bad_run
    index = DatasetFolder(out).region_index().set_index("image_id")

    assert sorted(index.index) == sorted(expected)
    for image_id, outcome in expected.items():
        row = index.loc[image_id]
        if outcome == "ok":
            assert row["status"] == "ok", (image_id, row["reason"])
            assert row["num_regions"] >= 1, image_id
        elif outcome == "skipped":
            assert row["status"] == "skipped", image_id
            assert row["reason"], image_id
        else:
            assert row["status"] == "failed", image_id
            assert row["reason"].startswith(outcome + ":"), (image_id, row["reason"])
    assert summary.exit_code == 0


def test_bad_run_verifies(bad_run):
    out, _ = bad_run
    assert verify_dataset(out) == {"regions": []}


def test_upright_sizes_and_boxes_inside(bad_inputs, bad_run):
    _, expected = bad_inputs
    out, _ = bad_run
    sizes = expected_upright_sizes()
    seen = 0
    for regions in DatasetFolder(out).iter_regions():
        height, width = regions.image_size
        assert (height, width) == sizes[regions.image_id], regions.image_id
        assert np.all(regions.boxes[:, [0, 2]] <= width + 1e-3)
        assert np.all(regions.boxes[:, [1, 3]] <= height + 1e-3)
        assert np.all(regions.boxes >= -1e-3)
        assert regions.features.dtype == np.float16
        seen += 1
    assert seen == list(expected.values()).count("ok")


def test_inspect_counts(bad_inputs, bad_run):
    _, expected = bad_inputs
    out, _ = bad_run
    regions = inspect_dataset(out)["stages"]["regions"]
    outcomes = list(expected.values())

    assert regions["images_ok"] == outcomes.count("ok")
    assert regions["files_skipped"] == outcomes.count("skipped")
    assert regions["images_failed"] == len(outcomes) - outcomes.count("ok") - outcomes.count("skipped")
    assert {item["image_id"] for item in regions["failures"]} == {
        image_id for image_id, outcome in expected.items() if outcome not in ("ok", "skipped")
    }


def test_shard_attributes(bad_run):
    out, _ = bad_run
    with RegionShard(out / "regions" / "shard-00000.h5") as shard:
        attrs = shard.attrs
        assert attrs["schema"] == "cmsei.regions"
        assert attrs["config"]["detector"] == "tiny"
        assert attrs["weights_sha256"] == "untrained"
        assert attrs["num_images"] == len(shard) == 8
        assert attrs["complete"]


@pytest.fixture()
def good_images(tmp_path) -> Path:
    folder = tmp_path / "images"
    write_good_images(folder, 10, seed=3)
    return folder


def test_resume_redoes_only_broken_shards(good_images, tmp_path, ray_local):
    out = tmp_path / "data"
    extract_images(_options(good_images, out, shard_size=3))
    regions = out / "regions"
    shards = sorted(regions.glob("shard-*.h5"))
    assert len(shards) == 4
    kept_mtime = shards[0].stat().st_mtime_ns
    before = _read_features(shards[2])

    shards[1].unlink()
    shards[2].write_bytes(shards[2].read_bytes()[:200])
    (regions / "shard-00003.h5.tmp-deadbeef").write_bytes(b"partial")
    summary = extract_images(_options(good_images, out, shard_size=3))

    assert summary.shards_written == 2
    assert summary.shards_reused == 2
    assert shards[0].stat().st_mtime_ns == kept_mtime
    assert not list(regions.glob("*.tmp-*"))
    np.testing.assert_array_equal(_read_features(shards[2]), before)
    assert verify_dataset(out) == {"regions": []}


def _read_features(path: Path) -> np.ndarray:
    with h5py.File(path, "r") as h5:
        return h5["features"][()]


def test_changed_listing_stops_unless_overwrite(good_images, tmp_path, ray_local):
    out = tmp_path / "data"
    extract_images(_options(good_images, out, shard_size=5))
    extra = good_images / "extra.png"
    shutil.copy(next(good_images.glob("*.png")), extra)

    with pytest.raises(StageConflictError, match="different input listing"):
        extract_images(_options(good_images, out, shard_size=5))
    summary = extract_images(_options(good_images, out, shard_size=5, overwrite=True))
    assert summary.num_ok == 11


def test_changed_options_stop(good_images, tmp_path, ray_local):
    out = tmp_path / "data"
    extract_images(_options(good_images, out, shard_size=5))
    with pytest.raises(StageConflictError, match="different configuration"):
        extract_images(_options(good_images, out, shard_size=5, dtype="float32"))


def test_missing_weights_rejected(good_images, tmp_path):
    with pytest.raises(ExtractError, match="--weights untrained"):
        extract_images(ExtractOptions(images=good_images, out=tmp_path / "data", detector="tiny"))


def test_given_boxes_are_stored(good_images, tmp_path, ray_local):
    boxes = {}
    lines = []
    for path in sorted(good_images.iterdir()):
        image_boxes = [[1.0, 2.0, 20.0, 18.0], [5.0, 5.0, 30.0, 25.0]]
        boxes[path.name] = image_boxes
        lines.append(json.dumps({"image": path.name, "boxes": image_boxes}))
    boxes_file = tmp_path / "boxes.jsonl"
    boxes_file.write_text("\n".join(lines) + "\n", encoding="utf-8")

    out = tmp_path / "data"
    extract_images(_options(good_images, out, boxes=boxes_file))
    for regions in DatasetFolder(out).iter_regions():
        np.testing.assert_allclose(regions.boxes, np.array(boxes[regions.image_id], dtype=np.float32))


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere, so permissions cannot be tested")
def test_unwritable_output_reported(good_images, tmp_path, ray_local):
    out = tmp_path / "readonly"
    out.mkdir()
    out.chmod(0o500)
    try:
        with pytest.raises(PermissionError):
            extract_images(_options(good_images, out))
    finally:
        out.chmod(0o700)


def test_real_photos_extract(sample_data, tmp_path, ray_local):
    images = sample_data / "images"
    out = tmp_path / "real"
    summary = extract_images(_options(images, out, shard_size=64, ray=RayOptions(workers=2, cpus_per_worker=1)))

    assert summary.num_images == len([p for p in images.iterdir() if p.suffix.lower() == ".jpg"])
    assert summary.num_failed == 0
    assert summary.num_ok == summary.num_images
    assert verify_dataset(out) == {"regions": []}
