"""Inter-modal interactive attention between the words and the regions of each pair.

Shape shorthand: B images, c captions in the current chunk, k regions, n words, d features.

Per image-caption pair, with cosine scores s_ij = cos(w_i, v_j) and temperature lambda:

    word i:   a_ij = softmax_j(lambda s_ij),  context t_i = sum_j a_ij v_j
    region j: b_ji = softmax_i(lambda s_ij),  context u_j = sum_i b_ji w_i
    gated fusion of x with its context y:
        g = sigmoid(G_x x + G_y y + b_g),  h = tanh(U_x x + U_y y + b_u)
        x' = l2norm(x + g * h)

Words and regions have separate fusion weights. G_y and U_y have no bias, so G_y t_i equals
sum_j a_ij G_y v_j: the context projections are applied once per region or word and the
per-pair work is only the attention itself. `image_terms` and `caption_terms` compute those
per-region and per-word projections, so a caller scoring many pairs computes them once per
image and caption instead of once per chunk of pairs.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from cmsei_model.alignment import fast_tanh, l2_normalize, masked_softmax

logger = logging.getLogger(__name__)


class GatedFusion(nn.Module):
    """Residual gated fusion of a feature with its attended context.

    Args:
        embed_dim: d.
    """

    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        self.gate_self = nn.Linear(embed_dim, embed_dim)
        self.gate_context = nn.Linear(embed_dim, embed_dim, bias=False)
        self.update_self = nn.Linear(embed_dim, embed_dim)
        self.update_context = nn.Linear(embed_dim, embed_dim, bias=False)

    def self_terms(self, features: torch.Tensor) -> torch.Tensor:
        """Return (..., 2d) gate and update terms of the features themselves."""
        return torch.cat([self.gate_self(features), self.update_self(features)], dim=-1)

    def context_terms(self, features: torch.Tensor) -> torch.Tensor:
        """Return (..., 2d) gate and update terms of features used as context (linear, no bias)."""
        return torch.cat([self.gate_context(features), self.update_context(features)], dim=-1)

    def fuse(
        self, features: torch.Tensor, self_terms: torch.Tensor, attended_terms: torch.Tensor
    ) -> torch.Tensor:
        """Combine features with the attention-weighted context terms.

        Args:
            features: (..., d) unit-norm features x.
            self_terms: `self_terms(features)`, (..., 2d).
            attended_terms: attention-weighted sum of `context_terms` of the other side, (..., 2d).
                Overwritten when autograd is off, to spare copies of pair-sized tensors.

        Returns:
            (..., d) unit-norm fused features; the leading dims broadcast.
        """
        if torch.is_grad_enabled():
            gate, update = (attended_terms + self_terms).chunk(2, dim=-1)
            return l2_normalize(features + torch.sigmoid(gate) * fast_tanh(update))

        # Without autograd every step overwrites the pair-sized terms instead of allocating.
        gate, update = attended_terms.add_(self_terms).chunk(2, dim=-1)
        fused = gate.sigmoid_().mul_(fast_tanh(update, inplace=True)).add_(features)
        return l2_normalize(fused)


class InteractiveAttention(nn.Module):
    """Word-to-region and region-to-word attention with gated fusion, per pair.

    Args:
        embed_dim: d.
        temperature: inverse softmax temperature lambda over cosine scores.
    """

    def __init__(self, embed_dim: int, temperature: float) -> None:
        super().__init__()
        self.temperature = temperature
        self.word_fusion = GatedFusion(embed_dim)
        self.region_fusion = GatedFusion(embed_dim)

    def image_terms(self, regions: torch.Tensor) -> torch.Tensor:
        """Return the (B, k, 4d) pair-independent fusion terms of the regions.

        The first 2d columns are the regions' own gate and update terms, the last 2d the terms
        that the words attend to.
        """
        return torch.cat(
            [self.region_fusion.self_terms(regions), self.word_fusion.context_terms(regions)], dim=-1
        )

    def caption_terms(self, words: torch.Tensor) -> torch.Tensor:
        """Return the (C, n, 4d) pair-independent fusion terms of the words.

        The first 2d columns are the words' own gate and update terms, the last 2d the terms
        that the regions attend to.
        """
        return torch.cat(
            [self.word_fusion.self_terms(words), self.region_fusion.context_terms(words)], dim=-1
        )

    def forward(
        self,
        regions: torch.Tensor,
        region_mask: torch.Tensor,
        words: torch.Tensor,
        word_mask: torch.Tensor,
        image_terms: torch.Tensor | None = None,
        caption_terms: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Refine the words and regions of every image-caption pair.

        Args:
            regions: (B, k, d) unit-norm region features.
            region_mask: (B, k) bool, True for real regions.
            words: (c, n, d) unit-norm word features.
            word_mask: (c, n) bool, True for real words.
            image_terms: `image_terms(regions)`, (B, k, 4d); computed here when None.
            caption_terms: `caption_terms(words)`, (c, n, 4d); computed here when None.

        Returns:
            refined words (B, c, n, d) and refined regions (B, c, k, d), unit-norm. Entries at
            padded positions are meaningless.
        """
        if image_terms is None:
            image_terms = self.image_terms(regions)
        if caption_terms is None:
            caption_terms = self.caption_terms(words)
        region_self, region_context = image_terms.chunk(2, dim=-1)
        word_self, word_context = caption_terms.chunk(2, dim=-1)
        cosine = torch.einsum("cnd,bkd->bcnk", words, regions)

        word_attention = masked_softmax(
            self.temperature * cosine, region_mask[:, None, None, :]
        )
        attended_by_words = _attend_per_image(word_attention, region_context)
        refined_words = self.word_fusion.fuse(words[None], word_self[None], attended_by_words)

        region_attention = masked_softmax(
            self.temperature * cosine.transpose(-1, -2), word_mask[None, :, None, :]
        )
        attended_by_regions = torch.matmul(region_attention, word_context[None])
        refined_regions = self.region_fusion.fuse(
            regions[:, None], region_self[:, None], attended_by_regions
        )

        return refined_words, refined_regions


def _attend_per_image(attention: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Return (B, c, m, e) = attention (B, c, m, k) @ values (B, k, e) for every caption.

    One batched product per image. A broadcasting `matmul` would first copy the values once
    per caption: (B, c, k, e) floats, more than the (B, c, m, e) result when k > m.
    """
    batch, captions, queries, keys = attention.shape
    flat = torch.bmm(attention.reshape(batch, captions * queries, keys), values)
    return flat.view(batch, captions, queries, values.shape[-1])
