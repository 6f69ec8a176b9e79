"""Region proposal network of the C4 detector, in detectron2's conventions.

Shapes: N images, A anchors per feature-map cell, Hf x Wf the feature map, P proposals
per image. Boxes are x1, y1, x2, y2 in pixels of the resized input.

The anchor order at each cell follows detectron2's ``DefaultAnchorGenerator``: for each
size, for each aspect ratio. Anchors are centred on the cell's top-left pixel (offset
0) and not rounded. torchvision's ``AnchorGenerator`` instead orders aspect ratio first
and rounds, so detectron2 RPN weights only fit anchors generated here.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.ops import nms

logger = logging.getLogger(__name__)

# detectron2's clamp for dw and dh: no larger than turning a 16 px box into a 1000 px one.
SCALE_CLAMP = math.log(1000.0 / 16)


def apply_deltas(deltas: torch.Tensor, boxes: torch.Tensor, weights: list[float]) -> torch.Tensor:
    """Decode R-CNN box deltas (dx, dy, dw, dh) relative to ``boxes``.

    Args:
        deltas: float (R, k * 4), k box predictions per reference box.
        boxes: float (R, 4) reference boxes, x1 y1 x2 y2.
        weights: the 4 divisors (wx, wy, ww, wh) applied to the deltas.

    Returns:
        float (R, k * 4) decoded boxes, x1 y1 x2 y2.
    """
    boxes = boxes.to(deltas.dtype)
    widths = boxes[:, 2] - boxes[:, 0]
    heights = boxes[:, 3] - boxes[:, 1]
    center_x = boxes[:, 0] + 0.5 * widths
    center_y = boxes[:, 1] + 0.5 * heights

    wx, wy, ww, wh = weights
    dx = deltas[:, 0::4] / wx
    dy = deltas[:, 1::4] / wy
    dw = torch.clamp(deltas[:, 2::4] / ww, max=SCALE_CLAMP)
    dh = torch.clamp(deltas[:, 3::4] / wh, max=SCALE_CLAMP)

    pred_center_x = dx * widths[:, None] + center_x[:, None]
    pred_center_y = dy * heights[:, None] + center_y[:, None]
    pred_w = torch.exp(dw) * widths[:, None]
    pred_h = torch.exp(dh) * heights[:, None]

    pred = torch.empty_like(deltas)
    pred[:, 0::4] = pred_center_x - 0.5 * pred_w
    pred[:, 1::4] = pred_center_y - 0.5 * pred_h
    pred[:, 2::4] = pred_center_x + 0.5 * pred_w
    pred[:, 3::4] = pred_center_y + 0.5 * pred_h
    return pred


def clip_boxes(boxes: torch.Tensor, height: float, width: float) -> torch.Tensor:
    """Clip boxes (..., 4) to the image rectangle [0, width] x [0, height]."""
    x = boxes[..., 0::2].clamp(min=0, max=width)
    y = boxes[..., 1::2].clamp(min=0, max=height)
    return torch.stack((x[..., 0], y[..., 0], x[..., 1], y[..., 1]), dim=-1)


def cell_anchors(sizes: list[float], aspect_ratios: list[float]) -> torch.Tensor:
    """Anchors (A, 4) centred on (0, 0): for each size, for each aspect ratio (h / w)."""
    anchors = []
    for size in sizes:
        area = float(size) ** 2
        for ratio in aspect_ratios:
            w = math.sqrt(area / ratio)
            h = ratio * w
            anchors.append([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0])
    return torch.tensor(anchors, dtype=torch.float32)


def grid_anchors(base: torch.Tensor, grid_height: int, grid_width: int, stride: int,
                 offset: float) -> torch.Tensor:
    """Tile cell anchors (A, 4) over a feature map: (Hf * Wf * A, 4), cell-major order."""
    device = base.device
    shifts_x = torch.arange(grid_width, device=device, dtype=torch.float32) * stride
    shifts_y = torch.arange(grid_height, device=device, dtype=torch.float32) * stride
    shift_y, shift_x = torch.meshgrid(shifts_y + offset * stride, shifts_x + offset * stride,
                                      indexing="ij")
    shift_x = shift_x.reshape(-1)
    shift_y = shift_y.reshape(-1)
    shifts = torch.stack((shift_x, shift_y, shift_x, shift_y), dim=1)
    return (shifts[:, None, :] + base[None, :, :]).reshape(-1, 4)


class RPNHead(nn.Module):
    """3x3 convolution with ReLU, then 1x1 objectness logits (A) and box deltas (4 A)."""

    def __init__(self, in_channels: int, hidden_channels: int, num_anchors: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, hidden_channels, kernel_size=3, padding=1)
        self.cls_logits = nn.Conv2d(hidden_channels, num_anchors, kernel_size=1)
        self.bbox_pred = nn.Conv2d(hidden_channels, num_anchors * 4, kernel_size=1)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = F.relu(self.conv(features))
        return self.cls_logits(hidden), self.bbox_pred(hidden)


class RegionProposalNetwork(nn.Module):
    """Single-level RPN: top-k anchors by objectness, decode, clip, drop empty, NMS.

    Returns per image the proposals (P_i, 4) and their objectness logits (P_i,), sorted
    by decreasing logit, with P_i <= ``rpn_post_nms_topk``.
    """

    def __init__(self, config: dict, in_channels: int, stride: int) -> None:
        super().__init__()
        base = cell_anchors(config["anchor_sizes"], config["anchor_aspect_ratios"])
        self.register_buffer("cell_anchors", base, persistent=False)
        self.head = RPNHead(in_channels, config["rpn_hidden_channels"], base.shape[0])
        self.stride = stride
        self.offset = config["anchor_offset"]
        self.weights = config["rpn_bbox_reg_weights"]
        self.pre_nms_topk = config["rpn_pre_nms_topk"]
        self.post_nms_topk = config["rpn_post_nms_topk"]
        self.nms_thresh = config["rpn_nms_thresh"]
        self.min_box_size = config["rpn_min_box_size"]

    def forward(self, features: torch.Tensor,
                image_sizes: list[tuple[int, int]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Propose boxes for each image of a padded batch.

        Args:
            features: float (N, C, Hf, Wf) backbone features at ``stride``.
            image_sizes: N (height, width) of each resized image before padding.
        """
        logits, deltas = self.head(features)
        num_images, num_anchors, grid_height, grid_width = logits.shape

        # detectron2's flattening: index = (y * Wf + x) * A + anchor.
        logits = logits.permute(0, 2, 3, 1).reshape(num_images, -1)
        deltas = deltas.view(num_images, num_anchors, 4, grid_height, grid_width)
        deltas = deltas.permute(0, 3, 4, 1, 2).reshape(num_images, -1, 4)
        anchors = grid_anchors(self.cell_anchors, grid_height, grid_width, self.stride,
                               self.offset)

        topk = min(self.pre_nms_topk, logits.shape[1])
        results = []
        for index, (height, width) in enumerate(image_sizes):
            scores, order = logits[index].topk(topk, sorted=True)
            boxes = apply_deltas(deltas[index, order], anchors[order], self.weights)
            results.append(self._filter(boxes, scores, height, width))
        return results

    def _filter(self, boxes: torch.Tensor, scores: torch.Tensor, height: int,
                width: int) -> tuple[torch.Tensor, torch.Tensor]:
        boxes = clip_boxes(boxes, height, width)
        sides_w = boxes[:, 2] - boxes[:, 0]
        sides_h = boxes[:, 3] - boxes[:, 1]
        nonempty = (sides_w > self.min_box_size) & (sides_h > self.min_box_size)
        boxes, scores = boxes[nonempty], scores[nonempty]

        keep = nms(boxes, scores, self.nms_thresh)[: self.post_nms_topk]
        return boxes[keep], scores[keep]
