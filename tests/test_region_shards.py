"""Region shard writing, reading and verification on real HDF5 files."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from pipeline.region_shards import RegionShard, RegionShardWriter, verify_region_shard

FEATURE_DIM = 8


def _regions(count: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    corners = rng.uniform(0, 50, size=(count, 2))
    return {
        "boxes": np.concatenate([corners, corners + 10], axis=1).astype(np.float32),
        "features": rng.normal(size=(count, FEATURE_DIM)).astype(np.float32),
        "object_ids": rng.integers(0, 5, size=count).astype(np.int32),
        "object_scores": rng.uniform(size=count).astype(np.float32),
        "attribute_ids": rng.integers(0, 3, size=count).astype(np.int32),
        "attribute_scores": rng.uniform(size=count).astype(np.float32),
    }


def _write(path: Path, dtype: str = "float32") -> dict[str, dict[str, np.ndarray]]:
    written = {"a.jpg": _regions(3, 0), "c.png": _regions(5, 1)}
    with RegionShardWriter(path, 0, FEATURE_DIM, dtype, object_names=["cat", "dog"], attrs={"config": {"k": 1}}) as writer:
        writer.add_image("a.jpg", (60, 80), written["a.jpg"])
        writer.add_failure("b.jpg", "truncated: file ends early")
        writer.add_image("c.png", (70, 90), written["c.png"])
    return written


def test_round_trip(tmp_path):
    path = tmp_path / "shard-00000.h5"
    written = _write(path)

    with RegionShard(path) as shard:
        assert shard.image_ids == ["a.jpg", "b.jpg", "c.png"]
        assert shard.status == ["ok", "failed", "ok"]
        assert shard.failure_reasons[1] == "truncated: file ends early"
        assert shard.object_names == ["cat", "dog"]
        assert shard.attrs["config"] == {"k": 1}
        np.testing.assert_array_equal(shard.offsets, [0, 3, 3, 8])
        image = shard[shard.row("c.png")]
        assert image.image_size == (70, 90)
        for name, values in written["c.png"].items():
            np.testing.assert_array_equal(getattr(image, name), values)
        assert shard[1].boxes.shape == (0, 4)


def test_float16_storage(tmp_path):
    path = tmp_path / "shard-00000.h5"
    written = _write(path, dtype="float16")
    with RegionShard(path) as shard:
        features = shard[0].features
    assert features.dtype == np.float16
    np.testing.assert_allclose(features, written["a.jpg"]["features"], rtol=1e-3, atol=1e-3)


def test_publish_is_atomic_on_error(tmp_path):
    path = tmp_path / "shard-00000.h5"
    with pytest.raises(ValueError, match="features have shape"):
        with RegionShardWriter(path, 0, FEATURE_DIM) as writer:
            writer.add_image("a.jpg", (10, 10), _regions(2, 0))
            bad = _regions(2, 1)
            bad["features"] = bad["features"][:, :3]
            writer.add_image("b.jpg", (10, 10), bad)
    assert list(tmp_path.iterdir()) == []


def test_missing_row_lookup_names_shard(tmp_path):
    path = tmp_path / "shard-00000.h5"
    _write(path)
    with RegionShard(path) as shard, pytest.raises(KeyError, match="shard-00000.h5"):
        shard.row("missing.jpg")


def test_verify_accepts_sound_shard(tmp_path):
    path = tmp_path / "shard-00000.h5"
    _write(path)
    assert verify_region_shard(path) == []
    assert verify_region_shard(path, expected_ids=["a.jpg", "b.jpg", "c.png"]) == []


@pytest.mark.parametrize(
    "damage, message",
    [
        ("offsets", "offsets"),
        ("nan", "NaN"),
        ("incomplete", "not marked complete"),
        ("drop", "missing datasets"),
        ("order", "differ from the manifest"),
    ],
)
def test_verify_finds_faults(tmp_path, damage, message):
    path = tmp_path / "shard-00000.h5"
    _write(path)
    expected = ["a.jpg", "b.jpg", "c.png"]
    with h5py.File(path, "r+") as h5:
        if damage == "offsets":
            h5["region_offsets"][2] = 9
        elif damage == "nan":
            h5["boxes"][0, 0] = np.nan
        elif damage == "incomplete":
            h5.attrs["complete"] = False
        elif damage == "drop":
            del h5["object_scores"]
        elif damage == "order":
            expected = ["b.jpg", "a.jpg", "c.png"]
    problems = verify_region_shard(path, expected_ids=expected)
    assert any(message in problem for problem in problems), problems


def test_verify_truncated_file(tmp_path):
    path = tmp_path / "shard-00000.h5"
    _write(path)
    path.write_bytes(path.read_bytes()[:300])
    problems = verify_region_shard(path)
    assert problems and "cannot open" in problems[0]
