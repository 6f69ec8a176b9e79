"""Tests of region selection: per-class NMS confidence, count clamping, detection selection."""

from __future__ import annotations

import torch
from torchvision.ops import batched_nms, nms

from extractors.regions import (
    clamp_count,
    per_class_nms_max_conf,
    select_butd_regions,
    select_detections,
)


def _random_boxes(generator: torch.Generator, count: int, size: float = 200.0) -> torch.Tensor:
    corners = torch.rand((count, 2), generator=generator) * size
    sides = torch.rand((count, 2), generator=generator) * size / 2 + 1.0
    return torch.cat([corners, corners + sides], dim=1)


def _reference_max_conf(boxes: torch.Tensor, scores: torch.Tensor, thresh: float) -> torch.Tensor:
    """The loop of bottom-up-attention's generate_tsv.py: one NMS per class."""
    max_conf = torch.zeros(boxes.shape[0])
    for cls in range(scores.shape[1]):
        keep = nms(boxes, scores[:, cls], thresh)
        max_conf[keep] = torch.maximum(max_conf[keep], scores[keep, cls])
    return max_conf


def test_per_class_nms_matches_loop():
    generator = torch.Generator().manual_seed(3)
    for count, classes in [(1, 3), (7, 5), (60, 40), (120, 17)]:
        boxes = _random_boxes(generator, count)
        scores = torch.rand((count, classes), generator=generator).softmax(dim=1)

        fast = per_class_nms_max_conf(boxes, scores, 0.3)
        slow = _reference_max_conf(boxes, scores, 0.3)

        assert fast.shape == (count,)
        assert torch.allclose(fast, slow), (count, classes)


def test_per_class_nms_suppresses_duplicate():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.5], [50.0, 50.0, 60.0, 60.0]])
    scores = torch.tensor([[0.9, 0.1], [0.8, 0.3], [0.2, 0.7]])

    max_conf = per_class_nms_max_conf(boxes, scores, 0.3)

    # Box 1 loses class 0 to box 0 but keeps class 1 (box 0 scores less there).
    assert torch.allclose(max_conf, torch.tensor([0.9, 0.3, 0.7]))


def test_per_class_nms_empty():
    result = per_class_nms_max_conf(torch.zeros((0, 4)), torch.zeros((0, 5)), 0.3)
    assert result.shape == (0,)


def test_clamp_count_threshold():
    confidence = torch.tensor([0.1, 0.5, 0.3, 0.05, 0.9])

    kept = clamp_count(confidence, 0.2, min_boxes=0, max_boxes=10, num_boxes=None)

    assert kept.tolist() == [4, 1, 2]


def test_clamp_count_min_and_max():
    confidence = torch.tensor([0.1, 0.5, 0.3, 0.05, 0.9])

    at_least = clamp_count(confidence, 0.95, min_boxes=2, max_boxes=10, num_boxes=None)
    at_most = clamp_count(confidence, 0.0, min_boxes=0, max_boxes=2, num_boxes=None)
    fixed = clamp_count(confidence, 0.95, min_boxes=0, max_boxes=1, num_boxes=4)
    too_many = clamp_count(confidence, 0.0, min_boxes=10, max_boxes=20, num_boxes=None)

    assert at_least.tolist() == [4, 1]
    assert at_most.tolist() == [4, 1]
    assert fixed.tolist() == [4, 1, 2, 0]
    assert too_many.shape[0] == 5


def test_select_butd_regions_uses_foreground():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [40.0, 40.0, 60.0, 60.0]])
    # Background is the last column: box 0 is mostly background.
    probs = torch.tensor([[0.05, 0.05, 0.9], [0.6, 0.3, 0.1]])
    config = {"selection_nms_thresh": 0.3, "conf_thresh": 0.2, "min_boxes": 0,
              "max_boxes": 10, "num_boxes": None}

    kept = select_butd_regions(boxes, probs, config)

    assert kept.tolist() == [1]


def _torchvision_postprocess(boxes, probs, score_thresh, nms_thresh, top):
    """torchvision RoIHeads.postprocess_detections for one image (background removed)."""
    num_classes = probs.shape[1]
    flat_boxes = boxes.reshape(-1, 4)
    flat_scores = probs.reshape(-1)
    labels = torch.arange(num_classes).repeat(probs.shape[0])
    keep = torch.where(flat_scores >= score_thresh)[0]
    keep = keep[batched_nms(flat_boxes[keep], flat_scores[keep], labels[keep], nms_thresh)][:top]
    return keep // num_classes, keep % num_classes


def test_select_detections_matches_torchvision():
    generator = torch.Generator().manual_seed(5)
    count, classes = 80, 6
    class_boxes = _random_boxes(generator, count * classes).reshape(count, classes, 4)
    probs = (torch.randn((count, classes + 1), generator=generator) * 3).softmax(dim=1)[:, 1:]
    config = {"selection_nms_thresh": 0.5, "conf_thresh": 0.05, "min_boxes": 0,
              "max_boxes": 30, "num_boxes": None}

    regions, labels = select_detections(class_boxes, probs, config)
    ref_regions, ref_labels = _torchvision_postprocess(class_boxes, probs, 0.05, 0.5, 30)

    assert regions.tolist() == ref_regions.tolist()
    assert labels.tolist() == ref_labels.tolist()


def test_select_detections_fills_min_boxes():
    generator = torch.Generator().manual_seed(6)
    class_boxes = _random_boxes(generator, 20 * 3).reshape(20, 3, 4)
    probs = torch.full((20, 3), 0.01)
    probs[0, 0] = 0.9
    config = {"selection_nms_thresh": 0.5, "conf_thresh": 0.5, "min_boxes": 5,
              "max_boxes": 10, "num_boxes": None}

    regions, labels = select_detections(class_boxes, probs, config)

    assert regions.shape[0] == 5
    assert (regions[0].item(), labels[0].item()) == (0, 0)


def _select_all_at_once(class_boxes, probs, config):
    """NMS over every candidate, then the count clamp: what select_detections must equal."""
    num_classes = probs.shape[1]
    boxes = class_boxes.reshape(-1, 4)
    scores = probs.reshape(-1)
    labels = torch.arange(num_classes).repeat(probs.shape[0])
    keep = batched_nms(boxes, scores, labels, config["selection_nms_thresh"])
    keep = keep[scores[keep].argsort(descending=True, stable=True)]
    chosen = keep[clamp_count(scores[keep], config["conf_thresh"], config["min_boxes"],
                              config["max_boxes"], config["num_boxes"])]
    return chosen // num_classes, chosen % num_classes


def test_select_detections_candidate_doubling():
    generator = torch.Generator().manual_seed(8)
    count, classes = 60, 9
    class_boxes = _random_boxes(generator, count * classes).reshape(count, classes, 4)
    probs = (torch.randn((count, classes + 1), generator=generator) * 2).softmax(dim=1)[:, 1:]
    cases = [(0.3, 0, 100, None), (0.3, 20, 100, None), (0.0, 0, 7, None), (0.9, 0, 50, None),
             (0.3, 0, 100, 36), (0.05, 5, 10, None)]

    for conf_thresh, min_boxes, max_boxes, num_boxes in cases:
        config = {"selection_nms_thresh": 0.5, "conf_thresh": conf_thresh,
                  "min_boxes": min_boxes, "max_boxes": max_boxes, "num_boxes": num_boxes}
        expected = _select_all_at_once(class_boxes, probs, config)

        for first in (1, 5, 64, 10_000):
            regions, labels = select_detections(class_boxes, probs, config, first_candidates=first)
            assert regions.tolist() == expected[0].tolist(), (config, first)
            assert labels.tolist() == expected[1].tolist(), (config, first)
