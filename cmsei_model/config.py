"""Options of the CMSEI retrieval model, its similarity and its loss.

Every component of the model sits behind a boolean flag (`spatial_graph`, `semantic_graph`,
`interaction`, `cross_level`, `box_geometry`), so an ablation is one option away.
`CMSEIConfig.baseline()` returns the plain region-word attention model in the style of SCAN
text-to-image attention: no graphs, no interaction, no cross-level terms.

Shape shorthand: B images, C captions, k regions, n words, d = `embed_dim`.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

ALIGNMENT_DIRECTIONS = ("t2i", "i2t", "both")
POOLING_METHODS = ("lse", "mean")


@dataclass(frozen=True)
class CMSEIConfig:
    """All options of the CMSEI model.

    Attributes:
        feature_dim: size D_in of each region feature (2048 for bottom-up-attention features).
        embed_dim: size d of the joint embedding space.
        word_dim: size of the learnt word embeddings.
        box_geometry: add an encoding of the normalised box (x1, y1, x2, y2, area) to each region.
        spatial_graph: run attention over the spatial-graph neighbours of each region.
        spatial_layers: number of stacked spatial-graph layers.
        num_spatial_labels: number of spatial relation labels, 0 (no relation) included. The
            11 relation classes of Yao et al. (ECCV 2018) make 12.
        semantic_graph: pass messages along the scene-graph edges.
        semantic_layers: number of stacked semantic-graph layers.
        num_predicates: size of the predicate vocabulary, the background class at index 0
            included (51 for the 50 VG150 predicates).
        predicate_dim: size of the learnt predicate embeddings.
        relation_threshold: scene-graph edges with a score below this value are ignored.
        gru_layers: number of layers of the bidirectional GRU text encoder.
        interaction: let words and regions of each pair attend to each other and refine
            themselves with gated fusion.
        attention_temperature: inverse temperature of the softmax over cosine scores in the
            word-region attention and in the alignment (lambda_1 in SCAN, 9 there).
        alignment: which fragments are scored against their attended context: "t2i" (each
            word), "i2t" (each region) or "both" (the mean of the two pooled scores).
        pooling: how fragment scores become one similarity, "lse" (LogSumExp) or "mean".
        lse_lambda: sharpness of the LogSumExp pooling (lambda_2 in SCAN, 6 there).
        cross_level: add object-sentence and word-image attention, which refine the regions
            and add two similarity terms.
        cross_level_temperature: inverse temperature of the cross-level attention softmax.
        fine_weight: weight of the fine-grained (fragment alignment) similarity.
        object_sentence_weight: weight of the object-sentence similarity term.
        word_image_weight: weight of the word-image similarity term.
        margin: margin of the hinge triplet loss.
        warmup_epochs: epochs that sum the loss over all negatives before the trainer switches
            to the hardest negative.
        max_pairs_per_chunk: maximum number of image-caption pairs scored at once in
            `CMSEI.similarity`. Peak memory grows linearly with it.
        gradient_checkpointing: during training, recompute each chunk of pairs in the backward
            pass instead of storing its activations. Activation memory then grows with
            `max_pairs_per_chunk` rather than with B * C, at the cost of a second forward pass.
        validate_inputs: check shapes, value ranges and masks of every input batch. The checks
            synchronise a CUDA device once per batch.
    """

    feature_dim: int = 2048
    embed_dim: int = 1024
    word_dim: int = 300
    box_geometry: bool = True
    spatial_graph: bool = True
    spatial_layers: int = 1
    num_spatial_labels: int = 12
    semantic_graph: bool = True
    semantic_layers: int = 1
    num_predicates: int = 51
    predicate_dim: int = 300
    relation_threshold: float = 0.0
    gru_layers: int = 1
    interaction: bool = True
    attention_temperature: float = 9.0
    alignment: str = "both"
    pooling: str = "lse"
    lse_lambda: float = 6.0
    cross_level: bool = True
    cross_level_temperature: float = 9.0
    fine_weight: float = 1.0
    object_sentence_weight: float = 0.5
    word_image_weight: float = 0.5
    margin: float = 0.2
    warmup_epochs: int = 1
    max_pairs_per_chunk: int = 4096
    gradient_checkpointing: bool = False
    validate_inputs: bool = True

    def __post_init__(self) -> None:
        self._check_sizes()
        self._check_choices()
        self._check_numbers()

    def _check_sizes(self) -> None:
        positive = {
            "feature_dim": self.feature_dim,
            "embed_dim": self.embed_dim,
            "word_dim": self.word_dim,
            "spatial_layers": self.spatial_layers,
            "semantic_layers": self.semantic_layers,
            "predicate_dim": self.predicate_dim,
            "gru_layers": self.gru_layers,
            "max_pairs_per_chunk": self.max_pairs_per_chunk,
        }
        for name, value in positive.items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"CMSEIConfig.{name} must be a positive integer, got {value!r}")

        if self.num_spatial_labels < 2:
            raise ValueError(
                f"CMSEIConfig.num_spatial_labels must be at least 2 (label 0 = no relation plus "
                f"one relation), got {self.num_spatial_labels}"
            )
        if self.num_predicates < 2:
            raise ValueError(
                f"CMSEIConfig.num_predicates must be at least 2 (background at index 0 plus one "
                f"predicate), got {self.num_predicates}"
            )
        if self.warmup_epochs < 0:
            raise ValueError(f"CMSEIConfig.warmup_epochs must be >= 0, got {self.warmup_epochs}")

    def _check_choices(self) -> None:
        if self.alignment not in ALIGNMENT_DIRECTIONS:
            raise ValueError(
                f"CMSEIConfig.alignment must be one of {ALIGNMENT_DIRECTIONS}, got {self.alignment!r}"
            )
        if self.pooling not in POOLING_METHODS:
            raise ValueError(
                f"CMSEIConfig.pooling must be one of {POOLING_METHODS}, got {self.pooling!r}"
            )

    def _check_numbers(self) -> None:
        for name in ("attention_temperature", "cross_level_temperature", "lse_lambda"):
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"CMSEIConfig.{name} must be > 0, got {value!r}")

        for name in ("fine_weight", "object_sentence_weight", "word_image_weight", "margin"):
            value = getattr(self, name)
            if not value >= 0:
                raise ValueError(f"CMSEIConfig.{name} must be >= 0, got {value!r}")

        if self.fine_weight == 0 and not self.cross_level:
            raise ValueError(
                "CMSEIConfig.fine_weight is 0 and cross_level is off, so the similarity would be "
                "constant; set fine_weight > 0 or enable cross_level"
            )

    @classmethod
    def baseline(cls, **overrides: Any) -> CMSEIConfig:
        """Build the SCAN-style baseline: text-to-image region-word attention only.

        Args:
            overrides: further fields to set, for example `embed_dim=32`.

        Raises:
            ValueError: when a field value is invalid.
            TypeError: when an override names no field.
        """
        settings: dict[str, Any] = {
            "box_geometry": False,
            "spatial_graph": False,
            "semantic_graph": False,
            "interaction": False,
            "cross_level": False,
            "alignment": "t2i",
        }
        settings.update(overrides)
        return cls(**settings)

    def replace(self, **changes: Any) -> CMSEIConfig:
        """Return a copy with the given fields changed, for example `spatial_graph=False`."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Return the options as a plain dict, suitable for a checkpoint or a YAML file."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> CMSEIConfig:
        """Build a config from `to_dict` output.

        Raises:
            ValueError: when `values` contains a key that is no field, or an invalid value.
        """
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"unknown CMSEIConfig fields {unknown}; remove them or upgrade cmsei_model"
            )
        return cls(**values)
