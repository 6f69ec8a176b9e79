"""Region encoder: project detector region features into the joint embedding space.

Shape shorthand: B images, k regions, D_in region feature size, d embedding size.
v_j = l2norm(W f_j + b + G(x1, y1, x2, y2, area)), where G is the optional box geometry map.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from cmsei_model.alignment import l2_normalize

logger = logging.getLogger(__name__)

GEOMETRY_FEATURES = 5  # x1, y1, x2, y2, area of the normalised box


def box_geometry_features(boxes_norm: torch.Tensor) -> torch.Tensor:
    """Append the box area to normalised (x1, y1, x2, y2) boxes.

    Args:
        boxes_norm: (..., 4) float boxes with coordinates divided by the image width and height.

    Returns:
        (..., 5) float tensor x1, y1, x2, y2, area. Inverted boxes get area 0.
    """
    width = (boxes_norm[..., 2] - boxes_norm[..., 0]).clamp(min=0.0)
    height = (boxes_norm[..., 3] - boxes_norm[..., 1]).clamp(min=0.0)
    area = (width * height).unsqueeze(-1)
    return torch.cat([boxes_norm, area], dim=-1)


class RegionEncoder(nn.Module):
    """Linear projection of region features, optionally plus a box geometry encoding.

    Args:
        feature_dim: D_in, size of each input region feature.
        embed_dim: d, size of the output.
        box_geometry: add a linear encoding of (x1, y1, x2, y2, area).
    """

    def __init__(self, feature_dim: int, embed_dim: int, box_geometry: bool) -> None:
        super().__init__()
        self.projection = nn.Linear(feature_dim, embed_dim)
        self.geometry = nn.Linear(GEOMETRY_FEATURES, embed_dim) if box_geometry else None
        self._init_weights(feature_dim, embed_dim)

    def _init_weights(self, feature_dim: int, embed_dim: int) -> None:
        # Xavier uniform bound, as the SCAN image encoder uses for this layer.
        bound = math.sqrt(6.0) / math.sqrt(feature_dim + embed_dim)
        nn.init.uniform_(self.projection.weight, -bound, bound)
        nn.init.zeros_(self.projection.bias)

    def forward(self, features: torch.Tensor, boxes_norm: torch.Tensor | None) -> torch.Tensor:
        """Encode regions.

        Args:
            features: (B, k, D_in) float region features.
            boxes_norm: (B, k, 4) float normalised boxes, or None when box geometry is off.

        Returns:
            (B, k, d) unit-norm region embeddings.

        Raises:
            ValueError: when box geometry is on and `boxes_norm` is None.
        """
        embedded = self.projection(features)

        if self.geometry is not None:
            if boxes_norm is None:
                raise ValueError(
                    "boxes_norm is None but box_geometry is enabled; pass (B, k, 4) normalised "
                    "boxes or set CMSEIConfig.box_geometry=False"
                )
            geometry = box_geometry_features(boxes_norm.to(embedded.dtype))
            embedded = embedded + self.geometry(geometry)

        return l2_normalize(embedded)
