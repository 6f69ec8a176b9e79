"""The CMSEI model: image and caption encoders and the pairwise similarity.

Shape shorthand: B images, C captions, k regions, n words, E scene-graph edges per image,
D_in region feature size, d embedding size.

Images: region encoder -> spatial graph -> semantic graph, then an image vector by masked
mean. Captions: word embeddings -> bidirectional GRU, then a sentence vector by masked mean.
Every image-caption pair: interactive attention -> cross-level attention -> fragment
alignment, and the similarity

    S = fine_weight * S_fine + object_sentence_weight * S_os + word_image_weight * S_wi

where the cross-level terms count only when `cross_level` is on. docs/model.md lists the
equations of every step.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Self

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from cmsei_model.alignment import fragment_alignment, l2_normalize, masked_mean
from cmsei_model.config import CMSEIConfig
from cmsei_model.cross_level import CrossLevelAttention
from cmsei_model.interaction import InteractiveAttention
from cmsei_model.region_encoder import RegionEncoder
from cmsei_model.semantic_graph import SemanticGraphReasoning
from cmsei_model.spatial_graph import SpatialGraphReasoning
from cmsei_model.text_encoder import TextEncoder

logger = logging.getLogger(__name__)


class _TensorFields:
    """Slicing, device moves and detaching for a dataclass whose fields are tensors or None."""

    def _map(self, function: Callable[[torch.Tensor], torch.Tensor]) -> Self:
        values = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            values[field.name] = None if value is None else function(value)
        return type(self)(**values)

    def slice(self, start: int, stop: int) -> Self:
        """Return items [start, stop) as views."""
        return self._map(lambda tensor: tensor[start:stop])

    def to(self, device: torch.device | str) -> Self:
        """Return a copy on `device`."""
        return self._map(lambda tensor: tensor.to(device))

    def detach(self) -> Self:
        """Return a copy cut from the autograd graph."""
        return self._map(torch.Tensor.detach)


@dataclass
class ImageEmbedding(_TensorFields):
    """Encoded images.

    Attributes:
        regions: (B, k, d) float unit-norm region features after the graph reasoning.
        region_mask: (B, k) bool, True for real regions.
        image_vector: (B, d) float unit-norm masked mean of the regions.
        fusion_terms: (B, k, 4d) float interactive-attention terms of the regions, which every
            pair reuses; None until `CMSEI.prepare_images` fills them.
    """

    regions: torch.Tensor
    region_mask: torch.Tensor
    image_vector: torch.Tensor
    fusion_terms: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.regions.shape[0]


@dataclass
class CaptionEmbedding(_TensorFields):
    """Encoded captions.

    Attributes:
        words: (C, n, d) float unit-norm word features, zeros at padding.
        word_mask: (C, n) bool, True for real words.
        sentence: (C, d) float unit-norm masked mean of the words.
        fusion_terms: (C, n, 4d) float interactive-attention terms of the words, which every
            pair reuses; None until `CMSEI.prepare_captions` fills them.
        guidance: (C, d) float cross-level projection of the sentence vectors; None until
            `CMSEI.prepare_captions` fills it.
    """

    words: torch.Tensor
    word_mask: torch.Tensor
    sentence: torch.Tensor
    fusion_terms: torch.Tensor | None = None
    guidance: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.words.shape[0]


def _require_shape(name: str, tensor: torch.Tensor, expected: tuple[int | None, ...]) -> None:
    """Raise ValueError unless `tensor` has len(expected) dims matching every non-None size."""
    actual = tuple(tensor.shape)
    matches = len(actual) == len(expected) and all(
        size is None or size == got for size, got in zip(expected, actual)
    )
    if not matches:
        wanted = tuple("*" if size is None else size for size in expected)
        raise ValueError(f"{name} has shape {actual}, expected {wanted} (* = any size)")


def _require_range(name: str, values: torch.Tensor, low: int, high: int, hint: str) -> None:
    """Raise ValueError unless every value lies in [low, high)."""
    if values.numel() == 0:
        return
    smallest = int(values.min())
    largest = int(values.max())
    if smallest < low or largest >= high:
        raise ValueError(
            f"{name} contains values in [{smallest}, {largest}] outside [{low}, {high - 1}]; {hint}"
        )


class CMSEI(nn.Module):
    """Cross-modal semantic enhanced interaction model for image-sentence retrieval.

    Components whose flag is off in `config` are not built, so their parameters do not exist.

    Args:
        config: model options.
        vocab_size: number of rows of the word embedding table, padding id 0 included.

    Raises:
        ValueError: when `vocab_size` < 2.
    """

    def __init__(self, config: CMSEIConfig, vocab_size: int) -> None:
        super().__init__()
        if vocab_size < 2:
            raise ValueError(f"vocab_size must be at least 2 (padding plus one word), got {vocab_size}")

        self.config = config
        self.vocab_size = vocab_size
        d = config.embed_dim
        self.region_encoder = RegionEncoder(config.feature_dim, d, config.box_geometry)
        self.spatial_graph = (
            SpatialGraphReasoning(d, config.num_spatial_labels, config.spatial_layers)
            if config.spatial_graph
            else None
        )
        self.semantic_graph = (
            SemanticGraphReasoning(
                d,
                config.num_predicates,
                config.predicate_dim,
                config.semantic_layers,
                config.relation_threshold,
            )
            if config.semantic_graph
            else None
        )
        self.text_encoder = TextEncoder(vocab_size, config.word_dim, d, config.gru_layers)
        self.interaction = (
            InteractiveAttention(d, config.attention_temperature) if config.interaction else None
        )
        self.cross_level = (
            CrossLevelAttention(d, config.cross_level_temperature) if config.cross_level else None
        )

    def encode_images(
        self,
        features: torch.Tensor,
        region_mask: torch.Tensor,
        boxes_norm: torch.Tensor | None = None,
        spatial_labels: torch.Tensor | None = None,
        sg_edges: torch.Tensor | None = None,
        sg_predicates: torch.Tensor | None = None,
        sg_scores: torch.Tensor | None = None,
        sg_mask: torch.Tensor | None = None,
    ) -> ImageEmbedding:
        """Encode a batch of images.

        Args:
            features: (B, k, D_in) float region features, any values at padded regions.
            region_mask: (B, k) bool, True for real regions; every image needs at least one.
            boxes_norm: (B, k, 4) float boxes x1, y1, x2, y2 divided by the image width and
                height, in [0, 1] for real regions. Required when `box_geometry` is on.
            spatial_labels: (B, k, k) uint8 or long spatial relation labels in
                [0, num_spatial_labels), 0 = no relation. Required when `spatial_graph` is on.
            sg_edges: (B, E, 2) long subject and object region indices. Required, like the
                next three, when `semantic_graph` is on.
            sg_predicates: (B, E) long predicate ids in [0, num_predicates).
            sg_scores: (B, E) float edge scores; edges below `relation_threshold` are ignored.
            sg_mask: (B, E) bool, True for real edges, which must join real regions.

        Returns:
            The encoded images.

        Raises:
            ValueError: when an input needed by an enabled component is missing, or (with
                `validate_inputs`) when a shape, range or mask is invalid.
        """
        features = features.to(self.region_encoder.projection.weight.dtype)
        region_mask = region_mask.to(torch.bool)
        if self.config.validate_inputs:
            self._validate_images(features, region_mask, boxes_norm, spatial_labels)

        # Zero the padding first: attention weights of 0 would still turn NaN padding into NaN.
        padding = ~region_mask.unsqueeze(-1)
        features = features.masked_fill(padding, 0.0)
        if boxes_norm is not None:
            boxes_norm = boxes_norm.masked_fill(padding, 0.0)
        regions = self.region_encoder(features, boxes_norm)

        if self.spatial_graph is not None:
            if spatial_labels is None:
                raise ValueError(
                    "spatial_graph is enabled but spatial_labels is None; pass (B, k, k) labels "
                    "or set CMSEIConfig.spatial_graph=False"
                )
            regions = self.spatial_graph(regions, spatial_labels.long(), region_mask)

        if self.semantic_graph is not None:
            edges, predicates, scores, edge_mask = self._prepare_scene_graph(
                sg_edges, sg_predicates, sg_scores, sg_mask, region_mask
            )
            regions = self.semantic_graph(regions, edges, predicates, scores, edge_mask)

        regions = regions * region_mask.unsqueeze(-1).to(regions.dtype)
        image_vector = l2_normalize(masked_mean(regions, region_mask, dim=1))
        return ImageEmbedding(regions, region_mask, image_vector)

    def encode_captions(self, token_ids: torch.Tensor, lengths: torch.Tensor) -> CaptionEmbedding:
        """Encode a batch of captions.

        Args:
            token_ids: (C, n) long token ids in [0, vocab_size), padded with 0.
            lengths: (C,) long caption lengths in [1, n].

        Returns:
            The encoded captions.

        Raises:
            ValueError: (with `validate_inputs`) when a shape, id or length is invalid.
        """
        if self.config.validate_inputs:
            self._validate_captions(token_ids, lengths)
        words, word_mask, sentence = self.text_encoder(token_ids.long(), lengths.long())
        return CaptionEmbedding(words, word_mask, sentence)

    def prepare_images(self, images: ImageEmbedding) -> ImageEmbedding:
        """Return `images` with the terms that every pair reuses, computed once.

        `similarity` calls this itself; call it first when scoring the same images against
        several caption blocks. Images that already carry the terms are returned as they are.
        """
        if self.interaction is None or images.fusion_terms is not None:
            return images
        return dataclasses.replace(images, fusion_terms=self.interaction.image_terms(images.regions))

    def prepare_captions(self, captions: CaptionEmbedding) -> CaptionEmbedding:
        """Return `captions` with the terms that every pair reuses, computed once.

        The caption counterpart of `prepare_images`.
        """
        updates = {}
        if self.interaction is not None and captions.fusion_terms is None:
            updates["fusion_terms"] = self.interaction.caption_terms(captions.words)
        if self.cross_level is not None and captions.guidance is None:
            updates["guidance"] = self.cross_level.guidance(captions.sentence)
        return dataclasses.replace(captions, **updates) if updates else captions

    def similarity(
        self,
        images: ImageEmbedding,
        captions: CaptionEmbedding,
        max_pairs_per_chunk: int | None = None,
    ) -> torch.Tensor:
        """Score every image against every caption.

        Pairs are scored in chunks of at most `max_pairs_per_chunk` (default
        `config.max_pairs_per_chunk`), so without autograd the peak memory is bounded by the
        chunk size, not by B * C. With autograd every chunk's activations are kept for the
        backward pass unless `config.gradient_checkpointing` is on. docs/model.md gives the
        memory per pair.

        Args:
            images: B encoded images.
            captions: C encoded captions, on the same device.
            max_pairs_per_chunk: overrides the configured chunk size.

        Returns:
            (B, C) float similarity.

        Raises:
            ValueError: when `max_pairs_per_chunk` < 1 or the embedding sizes differ.
        """
        budget = max_pairs_per_chunk or self.config.max_pairs_per_chunk
        if budget < 1:
            raise ValueError(f"max_pairs_per_chunk must be >= 1, got {budget}")
        if images.regions.shape[-1] != captions.words.shape[-1]:
            raise ValueError(
                f"image embeddings have size {images.regions.shape[-1]} but caption embeddings "
                f"{captions.words.shape[-1]}; encode both with the same model"
            )

        n_images = len(images)
        n_captions = len(captions)
        if n_images == 0 or n_captions == 0:
            return images.regions.new_zeros((n_images, n_captions))

        images = self.prepare_images(images)
        captions = self.prepare_captions(captions)
        # Near-square chunks, taller when there are few captions.
        image_block = min(n_images, max(1, math.isqrt(budget), budget // n_captions))
        caption_block = max(1, budget // image_block)

        rows = []
        for image_start in range(0, n_images, image_block):
            image_chunk = images.slice(image_start, image_start + image_block)
            columns = []
            for caption_start in range(0, n_captions, caption_block):
                caption_chunk = captions.slice(caption_start, caption_start + caption_block)
                if self.config.gradient_checkpointing and torch.is_grad_enabled():
                    block = checkpoint(self._score_pairs, image_chunk, caption_chunk, use_reentrant=False)
                else:
                    block = self._score_pairs(image_chunk, caption_chunk)
                columns.append(block)
            rows.append(torch.cat(columns, dim=1))
        return torch.cat(rows, dim=0)

    def forward(
        self,
        features: torch.Tensor,
        region_mask: torch.Tensor,
        token_ids: torch.Tensor,
        lengths: torch.Tensor,
        boxes_norm: torch.Tensor | None = None,
        spatial_labels: torch.Tensor | None = None,
        sg_edges: torch.Tensor | None = None,
        sg_predicates: torch.Tensor | None = None,
        sg_scores: torch.Tensor | None = None,
        sg_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Encode a batch of images and captions and return their (B, C) similarity.

        The arguments are those of `encode_images` and `encode_captions`. For training, pass
        B matching pairs so that the diagonal contains the positives.
        """
        images = self.encode_images(
            features, region_mask, boxes_norm, spatial_labels, sg_edges, sg_predicates, sg_scores, sg_mask
        )
        captions = self.encode_captions(token_ids, lengths)
        return self.similarity(images, captions)

    def _score_pairs(self, images: ImageEmbedding, captions: CaptionEmbedding) -> torch.Tensor:
        """Return the (B, c) similarity of one chunk of images and captions."""
        config = self.config
        regions = images.regions[:, None]
        words = captions.words[None]

        if self.interaction is not None:
            words, regions = self.interaction(
                images.regions,
                images.region_mask,
                captions.words,
                captions.word_mask,
                images.fusion_terms,
                captions.fusion_terms,
            )

        cross_terms = None
        if self.cross_level is not None:
            regions, object_sentence, word_image = self.cross_level(
                regions,
                images.region_mask,
                words,
                captions.word_mask,
                captions.sentence,
                images.image_vector,
                captions.guidance,
            )
            cross_terms = (
                config.object_sentence_weight * object_sentence
                + config.word_image_weight * word_image
            )

        fine = fragment_alignment(
            words,
            captions.word_mask,
            regions,
            images.region_mask,
            config.attention_temperature,
            config.alignment,
            config.pooling,
            config.lse_lambda,
        )
        similarity = config.fine_weight * fine
        if cross_terms is not None:
            similarity = similarity + cross_terms
        return similarity

    def _prepare_scene_graph(
        self,
        sg_edges: torch.Tensor | None,
        sg_predicates: torch.Tensor | None,
        sg_scores: torch.Tensor | None,
        sg_mask: torch.Tensor | None,
        region_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Check the scene-graph inputs and return them as long, long, float and bool tensors."""
        inputs = {
            "sg_edges": sg_edges,
            "sg_predicates": sg_predicates,
            "sg_scores": sg_scores,
            "sg_mask": sg_mask,
        }
        missing = [name for name, value in inputs.items() if value is None]
        if missing:
            raise ValueError(
                f"semantic_graph is enabled but {missing} are None; pass the scene-graph tensors "
                f"or set CMSEIConfig.semantic_graph=False"
            )

        edges = sg_edges.long()
        predicates = sg_predicates.long()
        scores = sg_scores.to(torch.float32)
        edge_mask = sg_mask.to(torch.bool)
        if self.config.validate_inputs:
            self._validate_scene_graph(edges, predicates, scores, edge_mask, region_mask)
        return edges, predicates, scores, edge_mask

    def _validate_images(
        self,
        features: torch.Tensor,
        region_mask: torch.Tensor,
        boxes_norm: torch.Tensor | None,
        spatial_labels: torch.Tensor | None,
    ) -> None:
        config = self.config
        _require_shape("features", features, (None, None, config.feature_dim))
        n_images, k = features.shape[:2]
        _require_shape("region_mask", region_mask, (n_images, k))

        empty = (~region_mask.any(dim=1)).nonzero().flatten().tolist()
        if empty:
            raise ValueError(
                f"images at batch positions {empty[:10]} have no real region (region_mask all "
                f"False); drop those images or give each at least one region"
            )

        if config.box_geometry and boxes_norm is not None:
            _require_shape("boxes_norm", boxes_norm, (n_images, k, 4))
            real_boxes = boxes_norm[region_mask]
            tolerance = 1e-3
            if real_boxes.numel() and (
                not torch.isfinite(real_boxes).all()
                or real_boxes.min() < -tolerance
                or real_boxes.max() > 1 + tolerance
            ):
                raise ValueError(
                    f"boxes_norm of real regions must be finite and in [0, 1], got values in "
                    f"[{float(real_boxes.min()):.4g}, {float(real_boxes.max()):.4g}]; divide "
                    f"x by the image width and y by the image height"
                )

        if config.spatial_graph and spatial_labels is not None:
            _require_shape("spatial_labels", spatial_labels, (n_images, k, k))
            _require_range(
                "spatial_labels",
                spatial_labels,
                0,
                config.num_spatial_labels,
                "set CMSEIConfig.num_spatial_labels to the label count of the spatial graphs",
            )

    def _validate_scene_graph(
        self,
        edges: torch.Tensor,
        predicates: torch.Tensor,
        scores: torch.Tensor,
        edge_mask: torch.Tensor,
        region_mask: torch.Tensor,
    ) -> None:
        n_images, k = region_mask.shape
        _require_shape("sg_edges", edges, (n_images, None, 2))
        n_edges = edges.shape[1]
        _require_shape("sg_predicates", predicates, (n_images, n_edges))
        _require_shape("sg_scores", scores, (n_images, n_edges))
        _require_shape("sg_mask", edge_mask, (n_images, n_edges))

        real_edges = edges[edge_mask]
        _require_range(
            "sg_edges (real edges)", real_edges, 0, k, "edge indices must point at regions of the image"
        )
        _require_range(
            "sg_predicates (real edges)",
            predicates[edge_mask],
            0,
            self.config.num_predicates,
            "set CMSEIConfig.num_predicates to the predicate vocabulary size, background included",
        )
        if not torch.isfinite(scores[edge_mask]).all():
            raise ValueError("sg_scores contains NaN or infinite values on real edges")

        if real_edges.numel():
            image_index = edge_mask.nonzero()[:, 0]
            joins_real = region_mask[image_index, real_edges[:, 0]] & region_mask[image_index, real_edges[:, 1]]
            if not joins_real.all():
                bad = edge_mask.nonzero()[~joins_real][:5].tolist()
                raise ValueError(
                    f"scene-graph edges at (image, edge) {bad} point at padded regions; mask those "
                    f"edges out in sg_mask or fix the region indices"
                )

    def _validate_captions(self, token_ids: torch.Tensor, lengths: torch.Tensor) -> None:
        _require_shape("token_ids", token_ids, (None, None))
        n_captions, n = token_ids.shape
        _require_shape("lengths", lengths, (n_captions,))
        if token_ids.dtype.is_floating_point or lengths.dtype.is_floating_point:
            raise ValueError(
                f"token_ids and lengths must be integer tensors, got {token_ids.dtype} and "
                f"{lengths.dtype}"
            )
        _require_range(
            "token_ids",
            token_ids,
            0,
            self.vocab_size,
            f"the model was built with vocab_size={self.vocab_size}; use the same vocabulary",
        )
        _require_range(
            "lengths", lengths, 1, n + 1, f"every caption needs 1 to {n} tokens (the padded length)"
        )
