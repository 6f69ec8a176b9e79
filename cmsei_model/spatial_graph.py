"""Spatial graph reasoning: regions attend to their spatial-graph neighbours.

Shape shorthand: B images, k regions, d features, L spatial labels (0 = no relation).

Region i gathers messages from three direction groups: the regions j with label(i, j) > 0
("out", i is the subject of the relation), the regions j with label(j, i) > 0 ("in", i is its
object), and itself ("self"). Every group has its own value transform, and each relation
label has its own attention bias per group:

    e_ij^g = (W_q v_i) . (W_k v_j) / sqrt(d) + b^g[label^g(i, j)]
    a = softmax over all (j, g) entries of row i
    m_i = sum_(j, g) a_ij^g W_g v_j
    v_i' = l2norm(v_i + W_o ReLU(m_i))
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from cmsei_model.alignment import l2_normalize, masked_softmax

logger = logging.getLogger(__name__)


class SpatialGraphLayer(nn.Module):
    """One layer of label-biased, direction-aware attention over spatial neighbours.

    Args:
        embed_dim: d.
        num_labels: L, number of spatial labels including 0 (no relation).
    """

    def __init__(self, embed_dim: int, num_labels: int) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.query = nn.Linear(embed_dim, embed_dim)
        self.key = nn.Linear(embed_dim, embed_dim)
        self.value_out = nn.Linear(embed_dim, embed_dim)
        self.value_in = nn.Linear(embed_dim, embed_dim)
        self.value_self = nn.Linear(embed_dim, embed_dim)
        self.bias_out = nn.Parameter(torch.zeros(num_labels))
        self.bias_in = nn.Parameter(torch.zeros(num_labels))
        self.bias_self = nn.Parameter(torch.zeros(()))
        self.output = nn.Linear(embed_dim, embed_dim, bias=False)

    def forward(
        self, regions: torch.Tensor, labels: torch.Tensor, region_mask: torch.Tensor
    ) -> torch.Tensor:
        """Refine regions with their spatial neighbours.

        Args:
            regions: (B, k, d) unit-norm region features.
            labels: (B, k, k) long spatial labels, label(i, j) in [0, L).
            region_mask: (B, k) bool, True for real regions. Padded regions are never
                attended to and their own outputs are meaningless.

        Returns:
            (B, k, d) unit-norm refined regions.
        """
        k = regions.shape[1]
        not_self = ~torch.eye(k, dtype=torch.bool, device=regions.device)
        pair_mask = region_mask[:, :, None] & region_mask[:, None, :] & not_self

        base = torch.matmul(self.query(regions), self.key(regions).transpose(1, 2))
        base = base / math.sqrt(self.embed_dim)

        labels_in = labels.transpose(1, 2)
        score_out = base + self.bias_out[labels]
        score_in = base + self.bias_in[labels_in]
        score_self = torch.diagonal(base, dim1=1, dim2=2).unsqueeze(-1) + self.bias_self

        scores = torch.cat([score_out, score_in, score_self], dim=-1)
        valid_self = torch.ones_like(score_self, dtype=torch.bool)
        valid = torch.cat([(labels > 0) & pair_mask, (labels_in > 0) & pair_mask, valid_self], -1)
        attention = masked_softmax(scores, valid)

        attention_out, attention_in, attention_self = torch.split(attention, [k, k, 1], dim=-1)
        message = torch.matmul(attention_out, self.value_out(regions))
        message = message + torch.matmul(attention_in, self.value_in(regions))
        message = message + attention_self * self.value_self(regions)

        return l2_normalize(regions + self.output(torch.relu(message)))


class SpatialGraphReasoning(nn.Module):
    """A stack of `SpatialGraphLayer`s.

    Args:
        embed_dim: d.
        num_labels: L, number of spatial labels including 0.
        num_layers: number of stacked layers, >= 1.
    """

    def __init__(self, embed_dim: int, num_labels: int, num_layers: int) -> None:
        super().__init__()
        self.num_labels = num_labels
        self.layers = nn.ModuleList(
            SpatialGraphLayer(embed_dim, num_labels) for _ in range(num_layers)
        )

    def forward(
        self, regions: torch.Tensor, labels: torch.Tensor, region_mask: torch.Tensor
    ) -> torch.Tensor:
        """Run all layers; the arguments and result are those of `SpatialGraphLayer.forward`."""
        for layer in self.layers:
            regions = layer(regions, labels, region_mask)
        return regions
