"""C4 RoI head: RoI pooling on res4, res5 per region, mean pool, class/box/attribute heads.

Shapes: R regions over the batch, D = 8 * res2_out_channels feature size, K object
classes, A attributes, S the pooler resolution.

Class logits have K + 1 columns with background LAST (detectron2's convention).
Attribute logits have A + 1 columns with "no attribute" LAST, as in py-bottom-up-attention's
converted Visual Genome weights, whose demo drops the last attribute logit.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.ops import roi_align, roi_pool

from extractors.backbone import build_res5

logger = logging.getLogger(__name__)


@dataclass
class RoIOutputs:
    """Per-region outputs of the RoI head, rows aligned with the input RoIs."""

    features: torch.Tensor           # float (R, D), res5 output averaged over S x S
    class_logits: torch.Tensor       # float (R, K + 1), background last
    box_deltas: torch.Tensor         # float (R, 4 K), class-specific deltas
    attribute_logits: torch.Tensor | None  # float (R, A + 1), "no attribute" last


class BoxPredictor(nn.Module):
    """Linear classifier (K + 1 classes) and class-specific box regression (4 K)."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.cls_score = nn.Linear(in_features, num_classes + 1)
        self.bbox_pred = nn.Linear(in_features, num_classes * 4)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cls_score(features), self.bbox_pred(features)


class AttributeHead(nn.Module):
    """Bottom-up-attention attribute head.

    The arg-max class over all K + 1 logits (background included, as upstream) is
    embedded, concatenated to the region feature, passed through a linear layer with
    ReLU, and scored against A + 1 attributes.
    """

    def __init__(self, in_features: int, num_classes: int, num_attributes: int,
                 embedding_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.class_embedding = nn.Embedding(num_classes + 1, embedding_dim)
        self.fc = nn.Linear(in_features + embedding_dim, hidden_dim)
        self.attr_score = nn.Linear(hidden_dim, num_attributes + 1)

    def forward(self, features: torch.Tensor, class_logits: torch.Tensor) -> torch.Tensor:
        classes = class_logits.argmax(dim=1)
        hidden = torch.cat([features, self.class_embedding(classes)], dim=1)
        return self.attr_score(F.relu(self.fc(hidden)))


class Res5RoIHead(nn.Module):
    """RoI pooling at stride 16, res5 and the prediction heads, run in chunks of RoIs."""

    def __init__(self, config: dict, in_channels: int, stride: int) -> None:
        super().__init__()
        self.pooler_type = config["pooler_type"]
        self.resolution = config["pooler_resolution"]
        self.sampling_ratio = config["pooler_sampling_ratio"]
        self.spatial_scale = 1.0 / stride
        self.chunk_size = config["roi_chunk_size"]

        self.res5 = build_res5(config)
        self.out_channels = in_channels * 2
        self.predictor = BoxPredictor(self.out_channels, config["num_classes"])

        self.attribute_head: AttributeHead | None = None
        if config["num_attributes"] > 0:
            self.attribute_head = AttributeHead(
                self.out_channels,
                config["num_classes"],
                config["num_attributes"],
                config["attribute_embedding_dim"],
                config["attribute_hidden_dim"],
            )

    def pool(self, features: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        """Crop regions: features (N, C, Hf, Wf), rois (R, 5) batch index + box -> (R, C, S, S)."""
        if self.pooler_type == "ROIPool":
            return roi_pool(features, rois, self.resolution, self.spatial_scale)
        return roi_align(features, rois, self.resolution, self.spatial_scale,
                         sampling_ratio=self.sampling_ratio, aligned=True)

    def region_features(self, features: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        """Pool and run res5 chunk by chunk, which bounds memory to one chunk of 14x14 maps.

        Returns:
            float (R, D) region features.
        """
        chunks = []
        for start in range(0, rois.shape[0], self.chunk_size):
            pooled = self.pool(features, rois[start:start + self.chunk_size])
            chunks.append(self.res5(pooled).mean(dim=(2, 3)))
        if not chunks:
            return features.new_zeros((0, self.out_channels))
        return torch.cat(chunks, dim=0)

    def forward(self, features: torch.Tensor, rois: torch.Tensor) -> RoIOutputs:
        """Run the head on RoIs (R, 5): batch index, then x1 y1 x2 y2 in input pixels."""
        region = self.region_features(features, rois)
        class_logits, box_deltas = self.predictor(region)

        attribute_logits = None
        if self.attribute_head is not None:
            attribute_logits = self.attribute_head(region, class_logits)
        return RoIOutputs(region, class_logits, box_deltas, attribute_logits)
