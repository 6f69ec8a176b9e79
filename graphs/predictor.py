"""Relation predictor: predicate logits for ordered region pairs (subject, object).

Shapes: R regions (of one image, or of several images concatenated), D region feature
size, K object classes, P predicates with background at index 0, T region pairs,
G = ``GEOMETRY_DIM`` pair geometry features. Boxes are x1, y1, x2, y2 in pixels and
image sizes are (height, width).

Each pair's logits add two terms. The first is an MLP over the subject's and the
object's encodings (features and class embedding, one linear map per role) plus an
encoding of the pair geometry. The second is a frequency bias looked up by
(subject class, object class), as in Neural Motifs (Zellers et al., CVPR 2018). It
starts from the log empirical predicate frequencies of the training data and is
trained with the rest.

The bias table is sparse, because a dense (K * K, P) table of 1600 detector classes
and 51 predicates would take 522 MB. It has one row per class pair key
``subject_class * K + object_class`` listed in the sorted buffer ``frequency_keys``
(M keys), plus a last row shared by every other pair. ``torch.searchsorted`` finds
the row of a pair.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from graphs.predicates import BACKGROUND

logger = logging.getLogger(__name__)

GEOMETRY_DIM = 16

# Ordered pairs scored per forward pass in predict_image, which bounds its memory.
_PAIRS_PER_PASS = 65536


def pair_geometry(boxes: torch.Tensor, pairs: torch.Tensor, image_sizes: torch.Tensor) -> torch.Tensor:
    """Describe the geometry of each (subject, object) pair with 16 numbers.

    The features are the object's centre offset in subject-box units, compressed as
    sign(x) * log(1 + |x|) (2), the log ratios of object to subject width and height
    (2), and the subject box, the object box and their union box divided by the image
    width and height (4 each). Box sides are clamped to at least one pixel.

    Args:
        boxes: (R, 4) float, x1, y1, x2, y2 in pixels.
        pairs: (T, 2) integer, subject and object row of ``boxes``.
        image_sizes: (T, 2) float, (height, width) of each pair's image, or (2,) for
            one image.

    Returns:
        (T, 16) float32 on the device of ``boxes``.
    """
    boxes = boxes.to(torch.float32)
    boxes = torch.cat([boxes[:, :2], torch.maximum(boxes[:, 2:], boxes[:, :2] + 1.0)], dim=1)
    pairs = pairs.to(device=boxes.device, dtype=torch.long)
    subject, object_ = boxes[pairs[:, 0]], boxes[pairs[:, 1]]
    sizes = image_sizes.to(device=boxes.device, dtype=torch.float32).reshape(-1, 2).expand(pairs.shape[0], 2)
    scale = torch.stack([sizes[:, 1], sizes[:, 0], sizes[:, 1], sizes[:, 0]], dim=1)

    subject_size = subject[:, 2:] - subject[:, :2]
    object_size = object_[:, 2:] - object_[:, :2]
    offset = ((object_[:, :2] + object_[:, 2:]) - (subject[:, :2] + subject[:, 2:])) / (2.0 * subject_size)
    union = torch.cat([torch.minimum(subject[:, :2], object_[:, :2]), torch.maximum(subject[:, 2:], object_[:, 2:])], dim=1)

    return torch.cat(
        [
            torch.sign(offset) * torch.log1p(offset.abs()),
            torch.log(object_size / subject_size),
            subject / scale,
            object_ / scale,
            union / scale,
        ],
        dim=1,
    )


def all_ordered_pairs(count: int) -> torch.Tensor:
    """Return the (count * (count - 1), 2) int64 pairs (i, j) with i != j, row-major."""
    rows, cols = torch.meshgrid(torch.arange(count), torch.arange(count), indexing="ij")
    keep = rows != cols
    return torch.stack([rows[keep], cols[keep]], dim=1)


class RelationPredictor(nn.Module):
    """Predicate classifier over ordered region pairs with a class-pair frequency bias.

    Args:
        feature_dim: D, the region feature size.
        num_object_classes: K; object ids lie in 0..K-1.
        predicate_names: the P predicate names, ``BACKGROUND`` at index 0.
        embed_dim: size of the object class embedding.
        hidden_dim: width of the pair MLP.
        dropout: dropout probability inside the pair MLP.
        num_frequency_pairs: M, the class pairs with their own frequency bias row.
            The keys start as zeros, so a new model needs ``set_frequency_bias``
            and a loaded one gets them from its state dict.

    Raises:
        ValueError: on a non-positive size, a negative M, fewer than two predicates,
            or a first predicate other than ``BACKGROUND``.
    """

    def __init__(
        self,
        feature_dim: int,
        num_object_classes: int,
        predicate_names: Sequence[str],
        *,
        embed_dim: int = 64,
        hidden_dim: int = 256,
        dropout: float = 0.1,
        num_frequency_pairs: int = 0,
    ) -> None:
        super().__init__()
        predicate_names = tuple(predicate_names)
        _check_config(feature_dim, num_object_classes, predicate_names, embed_dim, hidden_dim, dropout)
        if int(num_frequency_pairs) != num_frequency_pairs or num_frequency_pairs < 0:
            raise ValueError(f"num_frequency_pairs must be a non-negative integer, got {num_frequency_pairs!r}")
        self.feature_dim = feature_dim
        self.num_object_classes = num_object_classes
        self.predicate_names = predicate_names
        self.embed_dim = embed_dim
        self.hidden_dim = hidden_dim
        self.dropout = dropout
        num_predicates = len(predicate_names)

        self.feature_norm = nn.LayerNorm(feature_dim)
        self.object_embedding = nn.Embedding(num_object_classes, embed_dim)
        self.subject_encoder = nn.Linear(feature_dim + embed_dim, hidden_dim)
        self.object_encoder = nn.Linear(feature_dim + embed_dim, hidden_dim)
        self.geometry_encoder = nn.Sequential(nn.Linear(GEOMETRY_DIM, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, hidden_dim))
        self.classifier = nn.Sequential(
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, num_predicates),
        )
        self.register_buffer("frequency_keys", torch.zeros(int(num_frequency_pairs), dtype=torch.long))
        self.frequency_bias = nn.Embedding(int(num_frequency_pairs) + 1, num_predicates)
        nn.init.zeros_(self.frequency_bias.weight)

    @property
    def num_predicates(self) -> int:
        """P, background included."""
        return len(self.predicate_names)

    def config(self) -> dict[str, Any]:
        """Return the constructor arguments as plain Python values."""
        return {
            "feature_dim": self.feature_dim,
            "num_object_classes": self.num_object_classes,
            "predicate_names": list(self.predicate_names),
            "embed_dim": self.embed_dim,
            "hidden_dim": self.hidden_dim,
            "dropout": self.dropout,
            "num_frequency_pairs": int(self.frequency_keys.shape[0]),
        }

    @torch.no_grad()
    def set_frequency_bias(self, keys: torch.Tensor | np.ndarray, log_frequencies: torch.Tensor | np.ndarray) -> None:
        """Replace the frequency bias by a new sparse table.

        Call it before creating the optimiser, because the table becomes a new
        parameter when M changes.

        Args:
            keys: (M,) integer class pair keys ``subject_class * K + object_class``,
                strictly increasing, each in 0..K*K-1.
            log_frequencies: (M + 1, P) float, the log predicate distribution of each
                key's class pair, and in the last row that of every other pair (see
                ``graphs.train_relations.frequency_log_probs``).

        Raises:
            ValueError: on keys that are not increasing integers in range, a table of
                another shape, or values that are not finite.
        """
        keys = torch.as_tensor(keys)
        table = torch.as_tensor(log_frequencies, dtype=torch.float32)
        _check_frequency_table(keys, table, self.num_object_classes, self.num_predicates)

        device = self.frequency_bias.weight.device
        self.frequency_keys = keys.to(device=device, dtype=torch.long).clone()
        self.frequency_bias = nn.Embedding(table.shape[0], table.shape[1]).to(device)
        self.frequency_bias.weight.copy_(table)

    def frequency_rows(self, subject_classes: torch.Tensor, object_classes: torch.Tensor) -> torch.Tensor:
        """Return the frequency bias row of each (subject class, object class) pair.

        Args:
            subject_classes, object_classes: (T,) integer classes in 0..K-1.

        Returns:
            (T,) int64 rows in 0..M; M, the last row, for pairs without their own.
        """
        queries = subject_classes.long() * self.num_object_classes + object_classes.long()
        count = self.frequency_keys.shape[0]
        if count == 0:
            return torch.zeros_like(queries)
        positions = torch.searchsorted(self.frequency_keys, queries).clamp_(max=count - 1)
        found = self.frequency_keys[positions] == queries
        return torch.where(found, positions, torch.full_like(positions, count))

    def forward(
        self,
        features: torch.Tensor,
        object_ids: torch.Tensor,
        pairs: torch.Tensor,
        geometry: torch.Tensor,
    ) -> torch.Tensor:
        """Score every predicate for each pair.

        Args:
            features: (R, D) float region features.
            object_ids: (R,) integer object classes in 0..K-1.
            pairs: (T, 2) integer subject and object rows of ``features``.
            geometry: (T, G) float from ``pair_geometry``.

        Returns:
            (T, P) float32 logits, background at index 0.
        """
        regions = torch.cat([self.feature_norm(features.float()), self.object_embedding(object_ids)], dim=1)
        subjects = self.subject_encoder(regions)
        objects = self.object_encoder(regions)

        subject_rows, object_rows = pairs[:, 0], pairs[:, 1]
        hidden = subjects[subject_rows] + objects[object_rows] + self.geometry_encoder(geometry)
        bias_rows = self.frequency_rows(object_ids[subject_rows], object_ids[object_rows])
        return self.classifier(hidden) + self.frequency_bias(bias_rows)

    @torch.no_grad()
    def predict_image(
        self,
        features: torch.Tensor | np.ndarray,
        object_ids: torch.Tensor | np.ndarray,
        boxes: torch.Tensor | np.ndarray,
        image_size: tuple[float, float],
        top_k: int = 25,
        *,
        object_scores: torch.Tensor | np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Return the top-K (subject, object, predicate) triplets of one image.

        Every ordered pair i != j and every predicate except background is a candidate,
        so one pair may appear with several predicates. A triplet's score is the
        predicate's softmax probability, times both object scores when given.

        Args:
            features: (R, D) float region features.
            object_ids: (R,) integer object classes in 0..K-1.
            boxes: (R, 4) float, x1, y1, x2, y2 in pixels.
            image_size: (height, width) in pixels.
            top_k: maximum number of triplets returned.
            object_scores: optional (R,) float detector confidences.

        Returns:
            pairs: (T, 2) int32 subject and object rows, T = min(top_k, candidates).
            predicate_ids: (T,) int32 in 1..P-1.
            scores: (T,) float32, in descending order.

        Raises:
            ValueError: on mismatched shapes, an object id outside 0..K-1, or top_k < 1.
        """
        if top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}")
        device = self.frequency_bias.weight.device
        features = torch.as_tensor(features, device=device, dtype=torch.float32)
        object_ids = torch.as_tensor(object_ids, device=device, dtype=torch.long)
        boxes = torch.as_tensor(boxes, device=device, dtype=torch.float32)
        _check_regions(features, object_ids, boxes, self.feature_dim, self.num_object_classes)
        count = features.shape[0]
        if count < 2:
            return np.zeros((0, 2), np.int32), np.zeros((0,), np.int32), np.zeros((0,), np.float32)

        was_training = self.training
        self.eval()
        try:
            pairs = all_ordered_pairs(count).to(device)
            size = torch.tensor(image_size, device=device, dtype=torch.float32)
            probabilities = torch.cat(
                [
                    torch.softmax(self(features, object_ids, chunk, pair_geometry(boxes, chunk, size)), dim=1)[:, 1:]
                    for chunk in torch.split(pairs, _PAIRS_PER_PASS)
                ]
            )
        finally:
            self.train(was_training)

        if object_scores is not None:
            object_scores = torch.as_tensor(object_scores, device=device, dtype=torch.float32).reshape(-1)
            if object_scores.shape[0] != count:
                raise ValueError(f"object_scores must have shape ({count},), got {tuple(object_scores.shape)}")
            probabilities = probabilities * (object_scores[pairs[:, 0]] * object_scores[pairs[:, 1]])[:, None]

        scores, flat = torch.topk(probabilities.reshape(-1), min(top_k, probabilities.numel()))
        foreground = probabilities.shape[1]
        return (
            pairs[flat // foreground].cpu().numpy().astype(np.int32),
            (flat % foreground + 1).cpu().numpy().astype(np.int32),
            scores.cpu().numpy().astype(np.float32),
        )


def _check_config(
    feature_dim: int,
    num_object_classes: int,
    predicate_names: tuple[str, ...],
    embed_dim: int,
    hidden_dim: int,
    dropout: float,
) -> None:
    for name, value in (
        ("feature_dim", feature_dim),
        ("num_object_classes", num_object_classes),
        ("embed_dim", embed_dim),
        ("hidden_dim", hidden_dim),
    ):
        if int(value) != value or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if len(predicate_names) < 2 or predicate_names[0] != BACKGROUND:
        raise ValueError(
            f"predicate_names must start with {BACKGROUND!r} and name at least one predicate, got "
            f"{list(predicate_names[:3])}...; graphs.predicates.with_background adds the background"
        )
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must lie in [0, 1), got {dropout}")


def _check_frequency_table(keys: torch.Tensor, table: torch.Tensor, num_object_classes: int, num_predicates: int) -> None:
    if keys.ndim != 1 or (keys.numel() and (keys.is_floating_point() or keys.is_complex())):
        raise ValueError(f"keys must be a 1-D integer array, got dtype {keys.dtype} shape {tuple(keys.shape)}")
    if keys.numel() and (keys.min() < 0 or keys.max() >= num_object_classes * num_object_classes):
        raise ValueError(
            f"keys must lie in 0..{num_object_classes * num_object_classes - 1} (K * K - 1), "
            f"got {int(keys.min())}..{int(keys.max())}"
        )
    if keys.numel() > 1 and not bool((keys[1:] > keys[:-1]).all()):
        raise ValueError("keys must be strictly increasing; sort them and drop repeats")
    expected = (keys.shape[0] + 1, num_predicates)
    if tuple(table.shape) != expected:
        raise ValueError(f"log_frequencies must have shape {expected} (M + 1, P), got {tuple(table.shape)}")
    if not torch.isfinite(table).all():
        raise ValueError("log_frequencies contains NaN or infinity; smooth the counts before taking the log")


def _check_regions(
    features: torch.Tensor,
    object_ids: torch.Tensor,
    boxes: torch.Tensor,
    feature_dim: int,
    num_object_classes: int,
) -> None:
    count = features.shape[0] if features.ndim == 2 else -1
    if features.ndim != 2 or features.shape[1] != feature_dim:
        raise ValueError(f"features must have shape (R, {feature_dim}), got {tuple(features.shape)}")
    if tuple(object_ids.shape) != (count,):
        raise ValueError(f"object_ids must have shape ({count},), got {tuple(object_ids.shape)}")
    if tuple(boxes.shape) != (count, 4):
        raise ValueError(f"boxes must have shape ({count}, 4), got {tuple(boxes.shape)}")
    if not (torch.isfinite(features).all() and torch.isfinite(boxes).all()):
        raise ValueError("features or boxes contain NaN or infinity; drop or repair those regions first")
    if count and (object_ids.min() < 0 or object_ids.max() >= num_object_classes):
        raise ValueError(
            f"object ids must lie in 0..{num_object_classes - 1}, got {int(object_ids.min())}..{int(object_ids.max())}"
        )
