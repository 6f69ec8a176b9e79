"""Cross-level interactive attention: regions against the sentence, words against the image.

Shape shorthand: B images, c captions in the current chunk, k regions, n words, d features.

With the sentence vector s of the caption, the image vector m of the image (both unit-norm)
and temperature lambda:

    object-sentence: a_j = softmax_j(lambda cos(v_j, s)),  S_os = cos(sum_j a_j v_j, s)
    word-image:      b_i = softmax_i(lambda cos(w_i, m)),  S_wi = cos(sum_i b_i w_i, m)
    region refinement: v_j' = l2norm(v_j + sigmoid(alpha cos(v_j, s) + beta) P s)

alpha and beta are learnt scalars and P a learnt d x d matrix. The refined regions feed the
fine-grained alignment, and S_os and S_wi are added to the similarity.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from cmsei_model.alignment import l2_normalize, masked_softmax

logger = logging.getLogger(__name__)


class CrossLevelAttention(nn.Module):
    """Object-sentence and word-image attention with sentence-guided region refinement.

    Args:
        embed_dim: d.
        temperature: inverse softmax temperature lambda.
    """

    def __init__(self, embed_dim: int, temperature: float) -> None:
        super().__init__()
        self.temperature = temperature
        self.sentence_projection = nn.Linear(embed_dim, embed_dim, bias=False)
        self.gate_scale = nn.Parameter(torch.ones(()))
        self.gate_bias = nn.Parameter(torch.zeros(()))

    def guidance(self, sentence: torch.Tensor) -> torch.Tensor:
        """Return the (C, d) projection P s of each sentence vector that refines the regions."""
        return self.sentence_projection(sentence)

    def forward(
        self,
        regions: torch.Tensor,
        region_mask: torch.Tensor,
        words: torch.Tensor,
        word_mask: torch.Tensor,
        sentence: torch.Tensor,
        image_vector: torch.Tensor,
        guidance: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Score both cross-level terms and refine the regions of every pair.

        Args:
            regions: (B, c or 1, k, d) unit-norm region features.
            region_mask: (B, k) bool, True for real regions.
            words: (B or 1, c, n, d) unit-norm word features.
            word_mask: (c, n) bool, True for real words.
            sentence: (c, d) unit-norm sentence vectors.
            image_vector: (B, d) unit-norm image vectors.
            guidance: `guidance(sentence)`, (c, d); computed here when None.

        Returns:
            refined regions (B, c, k, d), object-sentence similarity (B, c) and word-image
            similarity (B, c).
        """
        sentence_column = sentence[None, :, :, None]
        region_sentence = torch.matmul(regions, sentence_column).squeeze(-1)
        region_attention = masked_softmax(
            self.temperature * region_sentence, region_mask[:, None, :]
        )
        attended_image = torch.matmul(region_attention.unsqueeze(-2), regions).squeeze(-2)
        object_sentence = (l2_normalize(attended_image) * sentence[None]).sum(-1)

        image_column = image_vector[:, None, :, None]
        word_image = torch.matmul(words, image_column).squeeze(-1)
        word_attention = masked_softmax(self.temperature * word_image, word_mask[None])
        attended_sentence = torch.matmul(word_attention.unsqueeze(-2), words).squeeze(-2)
        word_image_similarity = (l2_normalize(attended_sentence) * image_vector[:, None]).sum(-1)

        gate = torch.sigmoid(self.gate_scale * region_sentence + self.gate_bias)
        if guidance is None:
            guidance = self.guidance(sentence)
        refined_regions = l2_normalize(regions + gate.unsqueeze(-1) * guidance[None, :, None, :])

        return refined_regions, object_sentence, word_image_similarity
