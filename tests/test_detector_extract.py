"""Tests of the extraction API on the untrained ``tiny`` C4 detector, real and synthetic images."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from extractors.config import load_config
from extractors.extractor import build_extractor, resolve_device

NUM_CLASSES = 1600
NUM_ATTRIBUTES = 400


def sample_data_dir() -> Path:
    default = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
    path = Path(os.environ.get("CMSEI_SAMPLE_DATA", default))
    if not path.is_dir():
        pytest.skip(f"sample data not found at {path}; set CMSEI_SAMPLE_DATA")
    return path


def real_photos(count: int) -> list[np.ndarray]:
    folder = sample_data_dir() / "images"
    names = sorted(folder.glob("*.jpg"))[:count]
    return [np.asarray(Image.open(name).convert("RGB")) for name in names]


def synthetic_image(seed: int, height: int, width: int) -> np.ndarray:
    """A flat background with two coloured rectangles and mild noise."""
    rng = np.random.default_rng(seed)
    image = np.empty((height, width, 3), dtype=np.uint8)
    image[:] = rng.integers(0, 255, size=3, dtype=np.uint8)
    image[height // 5: height // 2, width // 6: width // 2] = (240, 20, 20)
    image[height // 2: height - 5, width // 2: width - 10] = (20, 20, 230)
    return image + rng.integers(0, 15, size=image.shape, dtype=np.uint8)


@pytest.fixture(scope="module")
def tiny():
    return build_extractor("tiny", weights="untrained", device="cpu")


def tiny_with(**overrides):
    return build_extractor("tiny", overrides=overrides, weights="untrained", device="cpu")


def assert_schema(regions: dict, feature_dim: int, has_class_boxes: bool = False) -> None:
    count = regions["boxes"].shape[0]
    expected = {
        "boxes": (np.float32, (count, 4)),
        "features": (np.float32, (count, feature_dim)),
        "object_ids": (np.int32, (count,)),
        "object_scores": (np.float32, (count,)),
        "attribute_ids": (np.int32, (count,)),
        "attribute_scores": (np.float32, (count,)),
    }
    if has_class_boxes:
        expected["class_boxes"] = (np.float32, (count, 4))
    assert sorted(regions) == sorted(expected)
    for name, (dtype, shape) in expected.items():
        assert regions[name].dtype == dtype, name
        assert regions[name].shape == shape, name


def assert_within(boxes: np.ndarray, height: int, width: int) -> None:
    assert np.all(boxes[:, 0] >= 0)
    assert np.all(boxes[:, 1] >= 0)
    assert np.all(boxes[:, 2] <= width)
    assert np.all(boxes[:, 3] <= height)
    assert np.all(boxes[:, 2] >= boxes[:, 0])
    assert np.all(boxes[:, 3] >= boxes[:, 1])


def test_extractor_attributes(tiny):
    assert tiny.feature_dim == 256
    assert tiny.device == torch.device("cpu")
    assert tiny.weights_sha256 == "untrained"
    assert len(tiny.object_names) == NUM_CLASSES
    assert tiny.object_names[0] == "object_0"
    assert len(tiny.attribute_names) == NUM_ATTRIBUTES
    assert tiny.config == load_config("tiny")
    assert json.loads(json.dumps(tiny.config)) == tiny.config


def test_schema_and_ranges(tiny):
    image = synthetic_image(0, 240, 320)

    regions = tiny.extract([image])[0]

    assert_schema(regions, tiny.feature_dim)
    assert regions["boxes"].shape[0] == 10  # untrained scores are far below conf_thresh
    assert np.all((regions["object_ids"] >= 0) & (regions["object_ids"] < NUM_CLASSES))
    assert np.all((regions["attribute_ids"] >= 0) & (regions["attribute_ids"] < NUM_ATTRIBUTES))
    assert np.all((regions["object_scores"] > 0) & (regions["object_scores"] <= 1))
    assert np.all((regions["attribute_scores"] > 0) & (regions["attribute_scores"] <= 1))
    assert np.isfinite(regions["features"]).all()


def test_real_photos_boxes_within_bounds(tiny):
    photos = real_photos(4)

    results = tiny.extract(photos)

    assert len(results) == 4
    for photo, regions in zip(photos, results):
        assert_schema(regions, tiny.feature_dim)
        assert_within(regions["boxes"], photo.shape[0], photo.shape[1])
        assert regions["boxes"].shape[0] >= 1


def test_deterministic(tiny):
    image = synthetic_image(1, 200, 260)

    first = tiny.extract([image])[0]
    second = tiny.extract([image])[0]

    for name in first:
        np.testing.assert_array_equal(first[name], second[name], err_msg=name)


def test_untrained_is_reproducible(tiny):
    image = synthetic_image(2, 200, 260)
    other = build_extractor("tiny", weights="untrained", device="cpu")

    np.testing.assert_array_equal(tiny.extract([image])[0]["features"],
                                  other.extract([image])[0]["features"])


def test_regions_sorted_by_confidence(tiny):
    regions = tiny.extract([synthetic_image(3, 200, 300)])[0]

    assert regions["boxes"].shape[0] > 1
    assert not np.array_equal(regions["boxes"][0], regions["boxes"][1])


def test_max_boxes_clamps():
    extractor = tiny_with(conf_thresh=0.0, min_boxes=0, max_boxes=4)

    regions = extractor.extract([synthetic_image(4, 240, 320)])[0]

    assert regions["boxes"].shape[0] == 4


def test_min_boxes_clamps():
    extractor = tiny_with(conf_thresh=1.0, min_boxes=3, max_boxes=50)

    regions = extractor.extract([synthetic_image(5, 240, 320)])[0]

    assert regions["boxes"].shape[0] == 3


def test_threshold_without_min_boxes_gives_none():
    extractor = tiny_with(conf_thresh=1.0, min_boxes=0, max_boxes=50)

    regions = extractor.extract([synthetic_image(6, 240, 320)])[0]

    assert_schema(regions, extractor.feature_dim)
    assert regions["boxes"].shape[0] == 0


def test_num_boxes_fixed():
    extractor = tiny_with(num_boxes=7)

    results = extractor.extract([synthetic_image(7, 240, 320), synthetic_image(8, 300, 200)])

    assert [r["boxes"].shape[0] for r in results] == [7, 7]


def test_num_boxes_capped_by_proposals():
    extractor = tiny_with(num_boxes=36, rpn_post_nms_topk=5)

    regions = extractor.extract([synthetic_image(9, 240, 320)])[0]

    assert regions["boxes"].shape[0] == 5


def test_given_boxes_kept(tiny):
    image = synthetic_image(10, 240, 320)
    boxes = np.array([[0, 0, 320, 240], [10.5, 20.25, 100, 200], [300, 200, 400, 300]],
                     dtype=np.float32)

    regions = tiny.extract([image], boxes=[boxes])[0]

    assert_schema(regions, tiny.feature_dim)
    np.testing.assert_array_equal(regions["boxes"], boxes)
    assert np.isfinite(regions["features"]).all()
    assert np.all(regions["object_ids"] >= 0)


def test_given_boxes_reproduce_detected_features(tiny):
    image = synthetic_image(11, 240, 320)
    detected = tiny.extract([image])[0]

    pooled = tiny.extract([image], boxes=[detected["boxes"]])[0]

    np.testing.assert_allclose(pooled["features"], detected["features"], rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(pooled["object_ids"], detected["object_ids"])


def test_given_boxes_empty(tiny):
    image = synthetic_image(12, 100, 100)

    results = tiny.extract([image, image], boxes=[np.zeros((0, 4), np.float32),
                                                  np.array([[0, 0, 50, 50]], np.float32)])

    assert_schema(results[0], tiny.feature_dim)
    assert results[0]["boxes"].shape[0] == 0
    assert results[1]["boxes"].shape[0] == 1


@pytest.mark.parametrize(
    "boxes, message",
    [
        ([np.array([[10, 10, 5, 20]], np.float32)], r"boxes\[0\]\[0\].*x2 < x1"),
        ([np.array([[0, 0, np.nan, 5]], np.float32)], "NaN"),
        ([np.zeros((2, 3), np.float32)], r"shape \(B, 4\)"),
        ([], "list of 1 arrays"),
    ],
)
def test_invalid_boxes_rejected(tiny, boxes, message):
    with pytest.raises(ValueError, match=message):
        tiny.extract([synthetic_image(13, 50, 50)], boxes=boxes)


@pytest.mark.parametrize(
    "images, message",
    [
        ([], "non-empty list"),
        ([np.zeros((10, 10, 3), np.float32)], "uint8"),
        ([np.zeros((10, 10), np.uint8)], r"shape \(H, W, 3\)"),
        ([np.zeros((10, 10, 4), np.uint8)], r"shape \(H, W, 3\)"),
        ([np.zeros((0, 10, 3), np.uint8)], "empty"),
        (["image.jpg"], "numpy array"),
    ],
)
def test_invalid_images_rejected(tiny, images, message):
    with pytest.raises(ValueError, match=message):
        tiny.extract(images)


@pytest.mark.parametrize("shape", [(1, 1, 3), (10, 10, 3), (1, 400, 3), (300, 2, 3)])
def test_tiny_images(tiny, shape):
    image = np.full(shape, 128, dtype=np.uint8)

    regions = tiny.extract([image])[0]

    assert_schema(regions, tiny.feature_dim)
    assert regions["boxes"].shape[0] >= 1
    assert_within(regions["boxes"], shape[0], shape[1])


def test_no_proposal_gives_whole_image():
    # A minimum proposal side larger than any resized image removes every proposal.
    extractor = tiny_with(rpn_min_box_size=10000.0)
    images = [synthetic_image(14, 120, 160), np.zeros((1, 1, 3), np.uint8)]

    results = extractor.extract(images)

    for image, regions in zip(images, results):
        height, width = image.shape[:2]
        np.testing.assert_array_equal(regions["boxes"], [[0, 0, width, height]])
        assert regions["features"].shape == (1, extractor.feature_dim)


def test_class_boxes_stored():
    extractor = tiny_with(store_class_boxes=True)
    image = synthetic_image(15, 240, 320)

    regions = extractor.extract([image])[0]
    given = extractor.extract([image], boxes=[regions["boxes"][:2]])[0]

    assert_schema(regions, extractor.feature_dim, has_class_boxes=True)
    assert_within(regions["class_boxes"], 240, 320)
    assert_schema(given, extractor.feature_dim, has_class_boxes=True)


def test_batch_matches_single_for_largest_image(tiny):
    # Both resize to height 320; the wider one sets the padded batch width.
    largest = synthetic_image(16, 240, 320)
    smaller = synthetic_image(17, 240, 300)
    single = tiny.extract([largest])[0]
    boxes = [single["boxes"], np.zeros((0, 4), np.float32)]

    batch = tiny.extract([largest, smaller], boxes=boxes)[0]

    # The largest image needs no padding, so the batch changes nothing for it. Detected
    # boxes are not compared. Untrained class scores are nearly uniform, so float noise
    # of the batched convolutions can reorder them.
    np.testing.assert_allclose(batch["features"], single["features"], rtol=1e-4, atol=1e-4)


def test_batch_close_to_single_for_padded_image(tiny):
    largest = synthetic_image(18, 240, 320)
    smaller = synthetic_image(19, 200, 150)
    boxes = [np.array([[10, 10, 60, 60], [20, 30, 140, 190]], np.float32)]

    batch = tiny.extract([largest, smaller], boxes=[np.zeros((0, 4), np.float32), boxes[0]])[1]
    single = tiny.extract([smaller], boxes=boxes)[0]

    # Padding changes activations mostly near the right and bottom edges.
    cosine = np.sum(batch["features"] * single["features"], axis=1) / (
        np.linalg.norm(batch["features"], axis=1) * np.linalg.norm(single["features"], axis=1))
    assert np.all(cosine > 0.9)


def test_real_vocab_names():
    labels = sample_data_dir() / "labels"
    extractor = build_extractor(
        "tiny",
        overrides={"object_vocab_path": str(labels / "objects_vocab.txt"),
                   "attribute_vocab_path": str(labels / "attributes_vocab.txt")},
        weights="untrained",
        device="cpu",
    )

    assert extractor.object_names[:2] == ["yolk", "goal"]
    assert extractor.attribute_names[0] == "gray"


def test_no_attribute_head():
    extractor = tiny_with(num_attributes=0)

    regions = extractor.extract([synthetic_image(20, 120, 160)])[0]

    assert extractor.attribute_names == []
    assert np.all(regions["attribute_ids"] == -1)
    assert np.all(regions["attribute_scores"] == 0)


def test_untrained_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="extractors.extractor"):
        build_extractor("tiny", weights="untrained", device="cpu")

    assert any("carry no meaning" in record.message for record in caplog.records)


def test_device_auto_on_cpu(tiny):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available, so auto picks it")

    extractor = build_extractor("tiny", weights="untrained", device="auto")

    assert extractor.device == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cpu")


def test_device_cuda_unavailable():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available")

    with pytest.raises(ValueError, match="CUDA is not available"):
        build_extractor("tiny", weights="untrained", device="cuda:1")


def test_device_invalid():
    with pytest.raises(ValueError, match="invalid device 'gpu'"):
        resolve_device("gpu")


def test_backend_unknown():
    with pytest.raises(ValueError, match="unknown backend"):
        build_extractor("tiny", weights="untrained", backend="caffe")


def test_backend_detectron2_absent():
    try:
        import detectron2  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("detectron2 is installed")

    with pytest.raises(ImportError, match="detectron2"):
        build_extractor("tiny", weights="untrained", device="cpu", backend="detectron2")


def test_invalid_override_named():
    with pytest.raises(ValueError, match="max_boxes"):
        build_extractor("tiny", overrides={"max_boxes": 0}, weights="untrained")


def test_speedups_keep_features(tiny):
    plain = tiny_with(fold_batchnorm=False, channels_last=False)
    image = synthetic_image(21, 240, 320)
    boxes = [np.array([[0, 0, 320, 240], [30, 40, 200, 180], [150, 100, 310, 230]], np.float32)]

    fast = tiny.extract([image], boxes=boxes)[0]
    reference = plain.extract([image], boxes=boxes)[0]

    assert tiny.config["fold_batchnorm"] and tiny.config["channels_last"]
    np.testing.assert_allclose(fast["features"], reference["features"], rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(fast["object_ids"], reference["object_ids"])


def test_zero_regions_everywhere():
    extractor = tiny_with(conf_thresh=1.0, min_boxes=0, store_class_boxes=True)
    images = [synthetic_image(22, 120, 160), synthetic_image(23, 90, 90)]

    detected = extractor.extract(images)
    given = extractor.extract(images, boxes=[np.zeros((0, 4), np.float32)] * 2)

    for regions in detected + given:
        assert_schema(regions, extractor.feature_dim, has_class_boxes=True)
        assert regions["boxes"].shape[0] == 0
