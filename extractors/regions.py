"""Region selection: which boxes of an image become stored regions.

Shapes: R candidate boxes of one image, K object classes (background excluded).

``select_butd_regions`` reproduces the selection of the original bottom-up-attention
feature extraction (``tools/generate_tsv.py`` of peteanderson80/bottom-up-attention):
per-class NMS over the proposals, each proposal's highest confidence among the classes
where it survived, a confidence threshold, then clamping the count to
[min_boxes, max_boxes]. ``select_detections`` does the usual detector post-processing
(class-specific boxes, batched NMS) with the same count clamping.
"""

from __future__ import annotations

import logging

import torch
from torchvision.ops import batched_nms, box_iou

logger = logging.getLogger(__name__)

# torchvision's RoIHeads drops detections whose side is below this (resized pixels).
MIN_DETECTION_SIDE = 1e-2


def per_class_nms_max_conf(boxes: torch.Tensor, scores: torch.Tensor,
                           iou_thresh: float) -> torch.Tensor:
    """Return each box's maximum score over the classes where greedy NMS keeps it.

    Runs the K greedy NMS passes (one per class, all R boxes each) side by side: step t
    visits, for every class, its t-th box by decreasing score, keeps it unless an
    already kept box of that class overlaps it with IoU > ``iou_thresh``, and then
    suppresses its overlaps. The result equals K separate ``torchvision.ops.nms`` calls
    up to ties in score order.

    Args:
        boxes: float (R, 4) x1 y1 x2 y2.
        scores: float (R, K) class probabilities, background excluded.
        iou_thresh: IoU above which a lower-scoring box of the same class is suppressed.

    Returns:
        float (R,) maximum kept score, 0 where a box is kept for no class.
    """
    num_boxes, num_classes = scores.shape
    if num_boxes == 0:
        return scores.new_zeros((0,))

    overlaps = box_iou(boxes, boxes) > iou_thresh
    order = scores.t().argsort(dim=1, descending=True, stable=True)
    class_index = torch.arange(num_classes, device=scores.device)
    suppressed = torch.zeros((num_classes, num_boxes), dtype=torch.bool, device=scores.device)
    kept = torch.zeros_like(suppressed)

    for rank in range(num_boxes):
        candidate = order[:, rank]
        alive = ~suppressed[class_index, candidate]
        kept[class_index, candidate] = alive
        suppressed |= alive[:, None] & overlaps[candidate]

    kept_scores = torch.where(kept.t(), scores, torch.zeros_like(scores))
    return kept_scores.max(dim=1).values


def clamp_count(confidence: torch.Tensor, conf_thresh: float, min_boxes: int, max_boxes: int,
                num_boxes: int | None) -> torch.Tensor:
    """Pick the boxes to keep by confidence.

    Keeps those with ``confidence >= conf_thresh``, but at least ``min_boxes`` and at most
    ``max_boxes`` (or exactly ``num_boxes`` when it is set), never more than exist.

    Returns:
        int64 (R_kept,) indices into ``confidence``, by decreasing confidence.
    """
    if num_boxes is not None:
        min_boxes = max_boxes = num_boxes

    order = confidence.argsort(descending=True, stable=True)
    count = int((confidence >= conf_thresh).sum().item())
    count = min(max(count, min_boxes), max_boxes, confidence.shape[0])
    return order[:count]


def select_butd_regions(boxes: torch.Tensor, class_probs: torch.Tensor,
                        config: dict) -> torch.Tensor:
    """Select proposals as the original bottom-up-attention extraction does.

    Args:
        boxes: float (R, 4) proposals, in original-image pixels as upstream.
        class_probs: float (R, K + 1) softmax over classes, background last.
        config: resolved config with selection_nms_thresh, conf_thresh, min_boxes,
            max_boxes and num_boxes.

    Returns:
        int64 (R_kept,) proposal indices by decreasing confidence.
    """
    foreground = class_probs[:, :-1]
    confidence = per_class_nms_max_conf(boxes, foreground, config["selection_nms_thresh"])
    return clamp_count(confidence, config["conf_thresh"], config["min_boxes"],
                       config["max_boxes"], config["num_boxes"])


def _count_bounds(config: dict) -> tuple[int, int]:
    if config["num_boxes"] is not None:
        return config["num_boxes"], config["num_boxes"]
    return config["min_boxes"], config["max_boxes"]


def select_detections(class_boxes: torch.Tensor, class_probs: torch.Tensor, config: dict,
                      first_candidates: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """Post-process class-specific detections and clamp their count.

    Every (region, class) pair is a candidate. Candidates with a side below 0.01 pixel
    are dropped, the rest go through per-class NMS at ``selection_nms_thresh``. Those
    scoring at least ``conf_thresh`` are kept, clamped to [min_boxes, max_boxes] (or
    ``num_boxes``).

    Greedy NMS visits candidates by decreasing score, so NMS over the highest-scoring
    candidates alone keeps exactly the boxes that NMS over all of them keeps among those.
    The NMS therefore runs on the best ``first_candidates`` candidates and doubles that
    count only until the answer is settled, instead of on all R x K pairs.

    Args:
        class_boxes: float (R, K, 4) box of each region for each class.
        class_probs: float (R, K) class probabilities, background excluded.
        config: resolved config.
        first_candidates: candidates in the first NMS pass.

    Returns:
        region indices int64 (D,) and class indices int64 (D,), by decreasing score.
    """
    num_classes = class_probs.shape[1]
    boxes = class_boxes.reshape(-1, 4)
    scores = class_probs.reshape(-1)
    labels = torch.arange(num_classes, device=scores.device).repeat(class_probs.shape[0])

    sides = torch.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    valid = torch.nonzero(sides >= MIN_DETECTION_SIDE).squeeze(1)
    candidates = valid[scores[valid].argsort(descending=True, stable=True)]

    min_boxes, max_boxes = _count_bounds(config)
    threshold = config["conf_thresh"]
    size = max(1, first_candidates)
    while True:
        head = candidates[:size]
        keep = head[batched_nms(boxes[head], scores[head], labels[head],
                                config["selection_nms_thresh"])]
        keep = keep[scores[keep].argsort(descending=True, stable=True)]
        confident = int((scores[keep] >= threshold).sum().item())

        complete = size >= candidates.shape[0]
        # Once a candidate below the threshold is in the head, every confident one is.
        threshold_settled = complete or scores[head[-1]].item() < threshold
        count = min(max(confident, min_boxes), max_boxes)
        if complete or confident >= max_boxes or (threshold_settled and keep.shape[0] >= count):
            chosen = keep[:count]
            return chosen // num_classes, chosen % num_classes
        size *= 2
