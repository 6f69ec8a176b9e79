"""Semantic graph reasoning: message passing along the scene-graph edges of each image.

Shape shorthand: B images, k regions, E edges per image (padded), d features, P predicates
(background at index 0), p predicate embedding size.

For an edge (s, o, r) with subject region s, object region o and predicate r:

    e_r = W_r embed(r)                                      predicate vector, (d,)
    g = sigmoid(sum(W_a v_s * e_r * W_b v_o) / sqrt(d) + c)  how well s, r and o fit together
    subject s receives  g * ReLU(W_subj [v_o; e_r])
    object o receives   g * ReLU(W_obj [v_s; e_r])
    v_i' = l2norm(v_i + W_o mean of the messages region i receives)

Regions without edges stay unchanged. `init_predicate_embeddings` starts each predicate's
embedding from the text encoder's embeddings of the predicate's words.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from cmsei_model.alignment import l2_normalize

if TYPE_CHECKING:
    from cmsei_model.model import CMSEI

logger = logging.getLogger(__name__)


def _gather_regions(regions: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Gather (B, E, d) region features for (B, E) region indices."""
    expanded = indices.unsqueeze(-1).expand(-1, -1, regions.shape[-1])
    return torch.gather(regions, 1, expanded)


class SemanticGraphLayer(nn.Module):
    """One round of gated, role-aware message passing along scene-graph edges.

    Args:
        embed_dim: d.
        predicate_dim: p, size of the predicate embeddings.
    """

    def __init__(self, embed_dim: int, predicate_dim: int) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.predicate_projection = nn.Linear(predicate_dim, embed_dim)
        self.fit_subject = nn.Linear(embed_dim, embed_dim, bias=False)
        self.fit_object = nn.Linear(embed_dim, embed_dim, bias=False)
        self.fit_bias = nn.Parameter(torch.zeros(()))
        self.subject_message = nn.Linear(2 * embed_dim, embed_dim)
        self.object_message = nn.Linear(2 * embed_dim, embed_dim)
        self.output = nn.Linear(embed_dim, embed_dim, bias=False)

    def forward(
        self,
        regions: torch.Tensor,
        predicate_vectors: torch.Tensor,
        edges: torch.Tensor,
        edge_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Refine regions with messages along the valid edges.

        Args:
            regions: (B, k, d) unit-norm region features.
            predicate_vectors: (B, E, p) float predicate embeddings of the edges.
            edges: (B, E, 2) long subject and object region indices, in [0, k) on every edge.
            edge_mask: (B, E) bool, True for edges that send messages.

        Returns:
            (B, k, d) unit-norm refined regions.
        """
        subject_index = edges[..., 0]
        object_index = edges[..., 1]
        subjects = _gather_regions(regions, subject_index)
        objects = _gather_regions(regions, object_index)
        relation = self.predicate_projection(predicate_vectors)

        fit = (self.fit_subject(subjects) * relation * self.fit_object(objects)).sum(-1)
        gate = torch.sigmoid(fit / math.sqrt(self.embed_dim) + self.fit_bias)
        gate = gate * edge_mask.to(gate.dtype)

        to_subject = torch.relu(self.subject_message(torch.cat([objects, relation], dim=-1)))
        to_object = torch.relu(self.object_message(torch.cat([subjects, relation], dim=-1)))
        to_subject = gate.unsqueeze(-1) * to_subject
        to_object = gate.unsqueeze(-1) * to_object

        received = torch.zeros_like(regions)
        received = received.scatter_add(1, subject_index.unsqueeze(-1).expand_as(to_subject), to_subject)
        received = received.scatter_add(1, object_index.unsqueeze(-1).expand_as(to_object), to_object)

        edge_weight = edge_mask.to(regions.dtype)
        count = torch.zeros(regions.shape[:2], dtype=regions.dtype, device=regions.device)
        count = count.scatter_add(1, subject_index, edge_weight)
        count = count.scatter_add(1, object_index, edge_weight)
        received = received / count.clamp(min=1.0).unsqueeze(-1)

        return l2_normalize(regions + self.output(received))


class SemanticGraphReasoning(nn.Module):
    """Predicate embeddings and a stack of `SemanticGraphLayer`s.

    Args:
        embed_dim: d.
        num_predicates: P, the background class at index 0 included.
        predicate_dim: p.
        num_layers: number of stacked layers, >= 1.
        relation_threshold: edges scored below it send no message.
    """

    def __init__(
        self,
        embed_dim: int,
        num_predicates: int,
        predicate_dim: int,
        num_layers: int,
        relation_threshold: float,
    ) -> None:
        super().__init__()
        self.relation_threshold = relation_threshold
        self.predicate_embedding = nn.Embedding(num_predicates, predicate_dim)
        nn.init.uniform_(self.predicate_embedding.weight, -0.1, 0.1)
        self.layers = nn.ModuleList(
            SemanticGraphLayer(embed_dim, predicate_dim) for _ in range(num_layers)
        )

    def forward(
        self,
        regions: torch.Tensor,
        edges: torch.Tensor,
        predicates: torch.Tensor,
        scores: torch.Tensor,
        edge_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Refine regions along the edges whose mask is set and whose score reaches the threshold.

        Args:
            regions: (B, k, d) unit-norm region features.
            edges: (B, E, 2) long subject and object indices. Masked-out edges may contain any
                value, because they are replaced by index 0 and send nothing.
            predicates: (B, E) long predicate ids in [0, P).
            scores: (B, E) float edge scores.
            edge_mask: (B, E) bool, True for real edges.

        Returns:
            (B, k, d) unit-norm refined regions.
        """
        active = edge_mask & (scores >= self.relation_threshold)
        safe_edges = torch.where(active.unsqueeze(-1), edges, torch.zeros_like(edges))
        safe_predicates = torch.where(active, predicates, torch.zeros_like(predicates))
        predicate_vectors = self.predicate_embedding(safe_predicates)

        for layer in self.layers:
            regions = layer(regions, predicate_vectors, safe_edges, active)
        return regions


def _predicate_words(name: str) -> list[str]:
    """Split a predicate name such as "parked on" or "in_front_of" into lowercase words."""
    return name.lower().replace("_", " ").split()


def _word_to_predicate_projection(word_weights: torch.Tensor, predicate_dim: int) -> torch.Tensor:
    """Return a (word_dim, predicate_dim) projection from word space to predicate space.

    Equal sizes use the identity and a larger predicate space pads with zeros, both of which
    keep dot products. A smaller one projects onto the top right singular vectors of the
    word embedding table, the subspace that keeps the largest share of its squared norm.
    """
    word_dim = word_weights.shape[1]
    if predicate_dim >= word_dim:
        projection = torch.zeros(word_dim, predicate_dim, dtype=word_weights.dtype)
        projection[:, :word_dim] = torch.eye(word_dim, dtype=word_weights.dtype)
        return projection

    _, _, right_vectors = torch.linalg.svd(word_weights.float(), full_matrices=False)
    return right_vectors[:predicate_dim].T.to(word_weights.dtype)


def init_predicate_embeddings(
    model: CMSEI, predicate_names: Sequence[str], vocab_word_to_id: Mapping[str, int]
) -> list[str]:
    """Set each predicate's embedding to the mean word embedding of its words.

    The words of a predicate name are its lowercase, space- or underscore-separated parts
    ("in front of" -> in, front, of). Words missing from the vocabulary are skipped. The mean
    is mapped to the predicate embedding size by `_word_to_predicate_projection`, which is
    the identity at the default sizes (300 and 300). Index 0, the background class, and
    predicates without any known word keep their random initialisation.

    Args:
        model: a CMSEI model built with `semantic_graph=True`.
        predicate_names: P names, index 0 the background class.
        vocab_word_to_id: word -> row of the text encoder's word embedding table.

    Returns:
        The names of the predicates that kept their random initialisation, background excluded.

    Raises:
        ValueError: when the model has no semantic graph, when the number of names differs
            from the model's predicate count, or when a vocabulary id is out of range.
    """
    if model.semantic_graph is None:
        raise ValueError(
            "the model was built with semantic_graph=False, so it has no predicate embeddings "
            "to initialise; build it with CMSEIConfig(semantic_graph=True)"
        )

    predicate_table = model.semantic_graph.predicate_embedding.weight
    word_table = model.text_encoder.embedding.weight
    if len(predicate_names) != predicate_table.shape[0]:
        raise ValueError(
            f"got {len(predicate_names)} predicate names but the model has "
            f"{predicate_table.shape[0]} predicates (CMSEIConfig.num_predicates); pass the same "
            f"predicate list, background first, that the scene graphs were made with"
        )

    with torch.no_grad():
        projection = _word_to_predicate_projection(word_table.detach().cpu(), predicate_table.shape[1])
        missing: list[str] = []
        for predicate_id, name in enumerate(predicate_names):
            if predicate_id == 0:
                continue
            word_ids = [vocab_word_to_id[w] for w in _predicate_words(name) if w in vocab_word_to_id]
            for word_id in word_ids:
                if not 0 <= word_id < word_table.shape[0]:
                    raise ValueError(
                        f"vocabulary id {word_id} for predicate {name!r} is outside the word "
                        f"embedding table of {word_table.shape[0]} rows; pass the vocabulary "
                        f"the model was built with"
                    )
            if not word_ids:
                missing.append(name)
                continue
            mean_word = word_table.detach()[word_ids].mean(dim=0).cpu()
            predicate_table[predicate_id] = (mean_word @ projection).to(predicate_table.device)

    initialised = len(predicate_names) - 1 - len(missing)
    logger.info(
        "initialised %d of %d predicate embeddings from word embeddings; no known word for %s",
        initialised,
        len(predicate_names) - 1,
        missing,
    )
    return missing
