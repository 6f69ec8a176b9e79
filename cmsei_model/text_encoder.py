"""Text encoder: learnt word embeddings and a bidirectional GRU.

Shape shorthand: C captions, n words (padded), d embedding size, V vocabulary size.
w_i = l2norm((h_i_forward + h_i_backward) / 2), and the sentence vector is
s = l2norm(masked mean of the w_i).
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from cmsei_model.alignment import l2_normalize, masked_mean

logger = logging.getLogger(__name__)

PAD_ID = 0  # `<pad>` is id 0 in the SCAN vocabularies


class TextEncoder(nn.Module):
    """Word embeddings (V, word_dim) followed by a bidirectional GRU to d.

    Args:
        vocab_size: V, including the padding id 0.
        word_dim: size of the word embeddings.
        embed_dim: d, the GRU hidden size; the two directions are averaged.
        num_layers: GRU layers.
    """

    def __init__(self, vocab_size: int, word_dim: int, embed_dim: int, num_layers: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, word_dim, padding_idx=PAD_ID)
        nn.init.uniform_(self.embedding.weight[1:].data, -0.1, 0.1)
        self.gru = nn.GRU(
            word_dim, embed_dim, num_layers=num_layers, batch_first=True, bidirectional=True
        )
        self.embed_dim = embed_dim

    def forward(
        self, token_ids: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encode captions.

        Args:
            token_ids: (C, n) long token ids, padded after each caption's length.
            lengths: (C,) long caption lengths in [1, n].

        Returns:
            words (C, n, d) unit-norm word features (zeros at padding), word_mask (C, n) bool,
            and sentence (C, d) unit-norm sentence vectors.
        """
        n = token_ids.shape[1]
        embedded = self.embedding(token_ids)

        packed = pack_padded_sequence(
            embedded, lengths.detach().to("cpu", torch.int64), batch_first=True, enforce_sorted=False
        )
        packed_output, _ = self.gru(packed)
        output, _ = pad_packed_sequence(packed_output, batch_first=True, total_length=n)

        forward_half, backward_half = output.split(self.embed_dim, dim=-1)
        positions = torch.arange(n, device=token_ids.device)
        word_mask = positions[None, :] < lengths.to(token_ids.device)[:, None]
        words = l2_normalize((forward_half + backward_half) / 2)
        words = words * word_mask.unsqueeze(-1).to(words.dtype)

        sentence = l2_normalize(masked_mean(words, word_mask, dim=1))
        return words, word_mask, sentence
