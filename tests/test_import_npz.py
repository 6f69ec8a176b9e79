"""Import of per-image .npz (bottom-up-attention.pytorch) and .npy + _info.npy (MMF) folders."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest

from pipeline.dataset import DatasetFolder
from pipeline.importers.npz_dirs import UnsafePickleError, load_npy
from pipeline.importers.stage import ImportOptions, import_features
from pipeline.inspect import verify_dataset


def regions(seed: int, count: int = 10, dim: int = 32, height: int = 240, width: int = 320):
    """Boxes (count, 4) inside the image, features (count, dim), object ids and a (count, 5) score matrix."""
    rng = np.random.default_rng(seed)
    x1 = rng.uniform(0, width / 2, count)
    y1 = rng.uniform(0, height / 2, count)
    boxes = np.stack([x1, y1, x1 + width / 3, y1 + height / 3], axis=1).astype(np.float32)
    features = rng.uniform(0, 5, (count, dim)).astype(np.float32)
    cls_prob = rng.dirichlet(np.ones(5), count).astype(np.float32)
    return boxes, features, cls_prob.argmax(axis=1), cls_prob


def save_butd_npz(path: Path, seed: int, with_attributes: bool = True, num_bbox: int | None = None) -> dict:
    boxes, features, objects, cls_prob = regions(seed)
    info = {"image_id": path.stem, "image_h": 240, "image_w": 320, "num_boxes": len(boxes),
            "objects_id": objects, "objects_conf": cls_prob.max(axis=1)}
    if with_attributes:
        info |= {"attrs_id": (objects + 1) % 4, "attrs_conf": np.full(len(boxes), 0.3, np.float32)}
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, x=features, bbox=boxes, num_bbox=len(boxes) if num_bbox is None else num_bbox,
                        image_h=240, image_w=320, info=info)
    return {"boxes": boxes, "features": features, "objects": objects, "conf": cls_prob.max(axis=1)}


def save_mmf(folder: Path, name: str, seed: int, num_boxes: int = 100) -> dict:
    boxes, features, objects, cls_prob = regions(seed)
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / f"{name}.npy", features)
    info = {"bbox": boxes, "num_boxes": num_boxes, "objects": objects, "cls_prob": cls_prob,
            "image_width": 320, "image_height": 240}
    np.save(folder / f"{name}_info.npy", info, allow_pickle=True)
    return {"boxes": boxes, "features": features, "objects": objects, "cls_prob": cls_prob}


class Payload:
    """Pickles to a call of os.system, which a safe loader must reject."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_butd_npz_folder(tmp_path):
    source = tmp_path / "npz"
    expected = {
        "COCO_val2014_000000000042.jpg": save_butd_npz(source / "COCO_val2014_000000000042.npz", 1),
        "sub/COCO_val2014_000000000073.jpg": save_butd_npz(source / "sub" / "COCO_val2014_000000000073.npz", 2, False),
    }
    summary = import_features(ImportOptions(sources=[source], out=tmp_path / "data", dtype="float32"))

    assert summary.format == "butd-npz"
    assert summary.num_ok == 2
    images = {image.image_id: image for image in DatasetFolder(tmp_path / "data").iter_regions()}
    assert sorted(images) == sorted(expected)
    for image_id, arrays in expected.items():
        image = images[image_id]
        assert image.image_size == (240, 320)
        np.testing.assert_array_equal(image.features, arrays["features"])
        np.testing.assert_array_equal(image.boxes, arrays["boxes"])
        np.testing.assert_array_equal(image.object_ids, arrays["objects"])
        np.testing.assert_allclose(image.object_scores, arrays["conf"])
    assert (images["sub/COCO_val2014_000000000073.jpg"].attribute_ids == -1).all()
    assert (images["COCO_val2014_000000000042.jpg"].attribute_ids >= 0).all()
    assert verify_dataset(tmp_path / "data") == {"regions": []}


def test_butd_npz_bad_files(tmp_path):
    source = tmp_path / "npz"
    save_butd_npz(source / "good.npz", 1)
    save_butd_npz(source / "count.npz", 2, num_bbox=9)
    (source / "broken.npz").write_bytes(b"PK\x03\x04 not really a zip")
    boxes, _, _, _ = regions(3)
    np.savez_compressed(source / "boxes_only.npz", bbox=boxes, num_bbox=len(boxes))

    import_features(ImportOptions(sources=[source], out=tmp_path / "data", format="butd-npz"))
    index = DatasetFolder(tmp_path / "data").region_index().set_index("image_id")
    assert index.loc["good.jpg", "status"] == "ok"
    assert index.loc["count.jpg", "reason"] == "num-boxes-mismatch: file count.npz: num_bbox is 9 but x contains 10 rows"
    assert index.loc["broken.jpg", "reason"].startswith("invalid-file: file broken.npz: ")
    assert index.loc["boxes_only.jpg", "reason"].startswith("missing-key: file boxes_only.npz: ")


def test_mmf_npy_pairs(tmp_path):
    source = tmp_path / "mmf"
    first = save_mmf(source, "COCO_val2014_000000000042", 1, num_boxes=7)
    save_mmf(source, "COCO_val2014_000000000073", 2)
    np.save(source / "lonely.npy", np.zeros((10, 32), np.float32))
    np.save(source / "COCO_val2014_000000000042_full.npy", np.zeros((3, 3), np.float32))

    summary = import_features(ImportOptions(sources=[source], out=tmp_path / "data", dtype="float32"))
    assert summary.format == "mmf-npy"
    index = DatasetFolder(tmp_path / "data").region_index().set_index("image_id")
    assert len(index) == 3
    assert index.loc["lonely.jpg", "reason"].startswith("missing-info: file lonely.npy: lonely_info.npy is missing")

    image = DatasetFolder(tmp_path / "data").regions("COCO_val2014_000000000042.jpg")
    assert image.features.shape == (10, 32)
    assert image.image_size == (240, 320)
    np.testing.assert_array_equal(image.object_ids, first["objects"])
    np.testing.assert_allclose(image.object_scores, first["cls_prob"].max(axis=1))


def test_unsafe_pickle_rejected(tmp_path):
    marker = tmp_path / "payload-ran"
    source = tmp_path / "mmf"
    save_mmf(source, "evil", 1)
    info = np.empty((), dtype=object)
    info[()] = {"bbox": Payload(marker)}
    np.save(source / "evil_info.npy", info, allow_pickle=True)
    save_mmf(source, "fine", 2)

    import_features(ImportOptions(sources=[source], out=tmp_path / "data", format="mmf-npy"))
    index = DatasetFolder(tmp_path / "data").region_index().set_index("image_id")
    assert index.loc["evil.jpg", "reason"].startswith("unsafe-pickle: file evil.npy: the pickle refers to ")
    assert ".system" in index.loc["evil.jpg", "reason"]
    assert index.loc["fine.jpg", "status"] == "ok"
    assert not marker.exists()


def test_load_npy_reads_plain_dicts():
    buffer = io.BytesIO()
    np.save(buffer, {"image_h": np.int64(3), "objects": np.arange(4), "name": "x"}, allow_pickle=True)
    buffer.seek(0)
    loaded = load_npy(buffer).item()
    assert loaded["image_h"] == 3
    np.testing.assert_array_equal(loaded["objects"], np.arange(4))

    buffer = io.BytesIO()
    np.save(buffer, np.array([Payload(Path("/nonexistent/never"))], dtype=object), allow_pickle=True)
    buffer.seek(0)
    with pytest.raises(UnsafePickleError):
        load_npy(buffer)
