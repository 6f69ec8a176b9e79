"""Tests of the frcnn-r50-fpn preset against torchvision's own fasterrcnn_resnet50_fpn."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision

from extractors.extractor import build_extractor

# Small inputs keep the ResNet-50 FPN quick; eps 1e-5 matches torchvision's BatchNorm2d
# of a model built with weights=None.
SMALL_FPN = {"min_size_test": 160, "max_size_test": 240, "rpn_post_nms_topk": 60,
             "rpn_pre_nms_topk": 300, "batchnorm_eps": 1e-5, "min_boxes": 0,
             "max_boxes": 100}


def synthetic_image(seed: int, height: int, width: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = np.empty((height, width, 3), dtype=np.uint8)
    image[:] = rng.integers(0, 255, size=3, dtype=np.uint8)
    image[height // 4: height // 2, width // 4: width // 2] = (30, 200, 40)
    return image + rng.integers(0, 25, size=image.shape, dtype=np.uint8)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """torchvision's model with random weights, and our extractor loading its state dict."""
    torch.manual_seed(21)
    model = torchvision.models.detection.fasterrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, min_size=SMALL_FPN["min_size_test"],
        max_size=SMALL_FPN["max_size_test"], rpn_pre_nms_top_n_test=300,
        rpn_post_nms_top_n_test=60, box_score_thresh=0.05, box_detections_per_img=100,
    )
    with torch.no_grad():
        # A larger spread of class logits gives a few confident detections, while
        # staying below saturation, where tied scores would make the order arbitrary.
        model.roi_heads.box_predictor.cls_score.weight.mul_(8.0)
    model.eval()
    path = tmp_path_factory.mktemp("fpn") / "fasterrcnn.pth"
    torch.save(model.state_dict(), path)
    extractor = build_extractor("frcnn-r50-fpn", overrides=SMALL_FPN, weights=path, device="cpu")
    return model, extractor


def test_fpn_extractor_attributes(reference):
    _, extractor = reference

    assert extractor.feature_dim == 1024
    assert len(extractor.object_names) == 90
    assert extractor.object_names[0] == "person"
    assert extractor.attribute_names == []


def test_fpn_detections_match_torchvision(reference):
    model, extractor = reference
    image = synthetic_image(0, 150, 200)

    regions = extractor.extract([image])[0]
    with torch.inference_mode():
        expected = model([torch.from_numpy(image).permute(2, 0, 1).float() / 255.0])[0]

    assert regions["boxes"].shape[0] == expected["boxes"].shape[0]
    assert regions["boxes"].shape[0] > 0
    np.testing.assert_allclose(regions["boxes"], expected["boxes"].numpy(), atol=1e-3)
    np.testing.assert_array_equal(regions["object_ids"], expected["labels"].numpy() - 1)
    np.testing.assert_allclose(regions["object_scores"], expected["scores"].numpy(), atol=1e-5)
    assert np.all(regions["attribute_ids"] == -1)


def test_fpn_features_are_box_head_outputs(reference):
    model, extractor = reference
    image = synthetic_image(1, 150, 200)
    boxes = np.array([[10, 10, 90, 80], [50, 40, 190, 140]], dtype=np.float32)

    regions = extractor.extract([image], boxes=[boxes])[0]
    with torch.inference_mode():
        images, _ = model.transform([torch.from_numpy(image).permute(2, 0, 1).float() / 255.0])
        features = model.backbone(images.tensors)
        # Per-axis ratios, as torchvision's resize_boxes.
        ratio_y = images.image_sizes[0][0] / image.shape[0]
        ratio_x = images.image_sizes[0][1] / image.shape[1]
        ratios = torch.tensor([ratio_x, ratio_y, ratio_x, ratio_y])
        pooled = model.roi_heads.box_roi_pool(features, [torch.from_numpy(boxes) * ratios],
                                              images.image_sizes)
        expected = model.roi_heads.box_head(pooled)

    np.testing.assert_array_equal(regions["boxes"], boxes)
    np.testing.assert_allclose(regions["features"], expected.numpy(), rtol=1e-4, atol=1e-4)


def test_fpn_batch_and_class_boxes(tmp_path):
    extractor = build_extractor("frcnn-r50-fpn", overrides={**SMALL_FPN, "num_boxes": 5,
                                                            "store_class_boxes": True},
                                weights="untrained", device="cpu")
    images = [synthetic_image(2, 150, 200), synthetic_image(3, 120, 90)]

    results = extractor.extract(images)

    for image, regions in zip(images, results):
        assert regions["features"].shape == (5, 1024)
        assert regions["class_boxes"].dtype == np.float32
        np.testing.assert_array_equal(regions["class_boxes"], regions["boxes"])
        assert np.all(regions["boxes"][:, 2] <= image.shape[1])
        assert np.all(regions["boxes"][:, 3] <= image.shape[0])


def test_fpn_no_proposal_gives_whole_image():
    extractor = build_extractor("frcnn-r50-fpn", overrides=SMALL_FPN, weights="untrained",
                                device="cpu")
    # A minimum proposal size above any image side makes torchvision's RPN drop everything.
    extractor.model.model.rpn.min_size = 1e9
    image = synthetic_image(4, 120, 160)

    regions = extractor.extract([image])[0]

    np.testing.assert_array_equal(regions["boxes"], [[0, 0, 160, 120]])
    assert regions["features"].shape == (1, 1024)
    assert regions["object_ids"].shape == (1,)


def test_fpn_given_boxes_empty(reference):
    _, extractor = reference
    image = synthetic_image(5, 120, 160)

    regions = extractor.extract([image], boxes=[np.zeros((0, 4), np.float32)])[0]

    assert regions["features"].shape == (0, 1024)
    assert regions["object_ids"].dtype == np.int32
