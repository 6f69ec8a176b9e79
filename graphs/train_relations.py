"""Train and evaluate a ``RelationPredictor`` on in-memory arrays, and save checkpoints.

Shapes: R regions of one image, D feature size, K object classes, P predicates with
background at index 0, T ground-truth relations of one image.

A sample is one image as a dict:

- ``features``: (R, D) float16 or float32 region features; float16 stays float16 in
  memory and is converted per batch;
- ``object_ids``: (R,) int object classes in 0..K-1;
- ``boxes``: (R, 4) float x1, y1, x2, y2 in pixels;
- ``image_size``: (height, width) in pixels;
- ``relations``: (T, 3) int rows (subject row, object row, predicate id in 1..P-1).

Training uses every relation as a positive and samples unrelated ordered pairs as
background negatives, ``negative_ratio`` per positive and image, anew each epoch.
The loss is cross-entropy over the P predicates.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from graphs.predictor import RelationPredictor, pair_geometry
from pipeline.atomic import atomic_path

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "cmsei.relation_predictor"
# Version 2 stores the sparse frequency bias (frequency_keys and an (M + 1, P) table);
# version 1 stored a dense (K * K, P) table.
CHECKPOINT_VERSION = 2


@dataclass(frozen=True)
class _Image:
    """One validated sample as CPU tensors, plus its unrelated pairs."""

    features: torch.Tensor  # (R, D) float16 or float32
    object_ids: torch.Tensor  # (R,) int64
    boxes: torch.Tensor  # (R, 4) float32
    image_size: torch.Tensor  # (2,) float32
    relations: torch.Tensor  # (T, 3) int64, unique rows
    unrelated: torch.Tensor  # (U, 2) int64 ordered pairs i != j in no relation


def resolve_device(device: str | torch.device) -> torch.device:
    """Turn "auto", "cpu", "cuda" or "cuda:N" into an available ``torch.device``.

    "auto" picks CUDA when it is available.

    Raises:
        ValueError: for an unknown device string or a CUDA device that is not available.
    """
    text = str(device)
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", text)
    if match is None:
        raise ValueError(f"invalid device {text!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'")
    index = int(match.group(1) or 0)
    if not torch.cuda.is_available() or index >= torch.cuda.device_count():
        raise ValueError(f"device {text!r} requested but it is not available; use 'cpu' or 'auto'")
    return torch.device("cuda", index)


def frequency_log_probs(
    samples: Iterable[Mapping[str, Any]],
    num_object_classes: int,
    num_predicates: int,
    *,
    negative_ratio: float = 3.0,
    smoothing: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Estimate log p(predicate | subject class, object class) from training samples.

    Each relation counts once for its predicate. Background counts are the expected
    numbers of sampled negatives, spread evenly over each image's unrelated pairs, so
    the table matches the class balance of the training batches. Every class pair
    with at least one relation gets its own row. All other pairs, related in no
    sample or never seen, share the last row, estimated from the pooled counts of the
    pairs without relations. Counts are smoothed towards the overall predicate
    distribution with weight ``smoothing``.

    Args:
        samples: image dicts as described in the module docstring.
        num_object_classes: K.
        num_predicates: P, background included.
        negative_ratio: background pairs sampled per relation, as in training.
        smoothing: pseudo-count of the overall distribution, positive.

    Returns:
        keys: (M,) int64, the sorted class pair keys ``subject_class * K + object_class``.
        log_probs: (M + 1, P) float32, row m for ``keys[m]`` and row M for all other pairs.

    Raises:
        ValueError: on an invalid sample (naming it) or a non-positive smoothing.
    """
    if not smoothing > 0:
        raise ValueError(f"smoothing must be positive, got {smoothing}")
    images = [
        _prepare_sample(sample, index, None, num_object_classes, num_predicates) for index, sample in enumerate(samples)
    ]
    return _frequency_table(images, num_object_classes, num_predicates, negative_ratio, smoothing)


def train_relation_predictor(
    samples: Iterable[Mapping[str, Any]],
    predicate_names: Sequence[str],
    num_object_classes: int,
    feature_dim: int,
    epochs: int,
    lr: float,
    seed: int,
    device: str | torch.device = "auto",
    *,
    negative_ratio: float = 3.0,
    images_per_batch: int = 16,
    embed_dim: int = 64,
    hidden_dim: int = 256,
    dropout: float = 0.1,
    weight_decay: float = 1e-4,
) -> tuple[RelationPredictor, dict[str, Any]]:
    """Train a relation predictor with Adam and cross-entropy.

    Args:
        samples: image dicts as described in the module docstring; read once.
        predicate_names: the P names, ``graphs.predicates.BACKGROUND`` first.
        num_object_classes: K.
        feature_dim: D.
        epochs: passes over the samples, at least 1.
        lr: Adam learning rate.
        seed: seeds the initial weights, the image order, negative sampling and
            dropout. On CPU two runs with the same seed give the same model.
        device: "auto" (CUDA when available), "cpu", "cuda" or "cuda:N".
        negative_ratio: background pairs sampled per relation of an image; an image
            without relations contributes this many.
        images_per_batch: images per optimiser step.
        embed_dim, hidden_dim, dropout: passed to ``RelationPredictor``.
        weight_decay: Adam L2 penalty.

    Returns:
        The trained model in eval mode, and metrics: ``epoch_losses`` (mean loss per
        pair of each epoch), ``final_loss``, ``images``, ``relations``,
        ``negatives_per_epoch``, ``device`` and ``seconds``.

    Raises:
        ValueError: on an invalid sample (naming its index and field), no relation in
            any sample, an unavailable device or a non-positive setting.
    """
    _check_training_settings(epochs, lr, negative_ratio, images_per_batch)
    start = time.perf_counter()
    # NOTE: only the CPU path has been run. On CUDA, index backward passes are not
    # deterministic, so runs with the same seed may differ slightly.
    device = resolve_device(device)
    num_predicates = len(predicate_names)
    images = [
        _prepare_sample(sample, index, feature_dim, num_object_classes, num_predicates)
        for index, sample in enumerate(samples)
    ]
    relations = sum(image.relations.shape[0] for image in images)
    if relations == 0:
        raise ValueError(f"none of the {len(images)} training samples has a relation; nothing to learn from")

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = RelationPredictor(
        feature_dim,
        num_object_classes,
        predicate_names,
        embed_dim=embed_dim,
        hidden_dim=hidden_dim,
        dropout=dropout,
    )
    model.set_frequency_bias(*_frequency_table(images, num_object_classes, num_predicates, negative_ratio, 1.0))
    model.to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    logger.info(
        "training a relation predictor on %d images with %d relations for %d epochs on %s",
        len(images),
        relations,
        epochs,
        device,
    )

    epoch_losses = []
    negatives = 0
    for epoch in range(epochs):
        loss_sum, pair_count, negatives = 0.0, 0, 0
        order = rng.permutation(len(images))
        for first in range(0, len(order), images_per_batch):
            batch = [images[index] for index in order[first : first + images_per_batch]]
            inputs, labels, batch_negatives = _training_batch(batch, negative_ratio, rng, device)
            if labels.shape[0] == 0:  # only images with fewer than two regions
                continue
            loss = F.cross_entropy(model(*inputs), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * labels.shape[0]
            pair_count += labels.shape[0]
            negatives += batch_negatives
        epoch_losses.append(loss_sum / pair_count)
        logger.info("epoch %d/%d: loss %.4f over %d pairs", epoch + 1, epochs, epoch_losses[-1], pair_count)

    model.eval()
    metrics = {
        "epoch_losses": epoch_losses,
        "final_loss": epoch_losses[-1],
        "images": len(images),
        "relations": relations,
        "negatives_per_epoch": negatives,
        "device": str(device),
        "seconds": time.perf_counter() - start,
    }
    return model, metrics


def evaluate_recall(
    model: RelationPredictor,
    samples: Iterable[Mapping[str, Any]],
    ks: Sequence[int] = (20, 50, 100),
) -> dict[str, float]:
    """Measure predicate recall@K over the ground-truth triplets of the samples.

    For each image the model ranks all (subject, object, predicate) triplets with
    ``predict_image``. recall@K is the fraction of all ground-truth triplets, pooled
    over images, that appear among the top K of their image. Repeated ground-truth
    triplets count once. Images without relations are skipped.

    Args:
        model: a trained predictor.
        samples: image dicts as described in the module docstring.
        ks: the cut-offs K, each at least 1.

    Returns:
        ``recall@K`` for each K, plus ``images`` and ``triplets`` evaluated.

    Raises:
        ValueError: on an invalid sample, a K below 1, or no relation in any sample.
    """
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")
    hits = dict.fromkeys(ks, 0)
    images, triplets = 0, 0
    for index, sample in enumerate(samples):
        image = _prepare_sample(sample, index, model.feature_dim, model.num_object_classes, model.num_predicates)
        truth = {tuple(row) for row in image.relations.tolist()}
        if not truth:
            continue
        pairs, predicates, _ = model.predict_image(
            image.features, image.object_ids, image.boxes, tuple(image.image_size.tolist()), top_k=ks[-1]
        )
        ranked = [(int(s), int(o), int(p)) for (s, o), p in zip(pairs, predicates)]
        for k in ks:
            hits[k] += len(truth.intersection(ranked[:k]))
        images += 1
        triplets += len(truth)
    if triplets == 0:
        raise ValueError("the samples contain no relation to evaluate")
    return {**{f"recall@{k}": hits[k] / triplets for k in ks}, "images": images, "triplets": triplets}


def save_checkpoint(path: str | os.PathLike, model: RelationPredictor, meta: Mapping[str, Any] | None = None) -> None:
    """Write the model's weights and configuration to ``path`` atomically with ``torch.save``.

    The file is a plain dict (``format``, ``version``, ``config``, ``predicate_names``,
    ``num_object_classes``, ``state_dict``, ``meta``) that ``torch.load`` reads with
    ``weights_only=True``.

    Args:
        path: destination file; its folder must exist.
        model: the predictor to save.
        meta: optional JSON-compatible information, such as training metrics.

    Raises:
        ValueError: when ``meta`` contains values that are not JSON types.
    """
    meta = dict(meta or {})
    try:
        meta = json.loads(json.dumps(meta))
    except (TypeError, ValueError) as error:
        raise ValueError(f"meta must contain only JSON types (str, int, float, bool, None, list, dict): {error}") from error

    checkpoint = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "config": model.config(),
        "predicate_names": list(model.predicate_names),
        "num_object_classes": model.num_object_classes,
        "state_dict": {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()},
        "meta": meta,
    }
    with atomic_path(path) as temporary:
        torch.save(checkpoint, temporary)
    logger.info("saved relation predictor checkpoint to %s", path)


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "auto") -> tuple[RelationPredictor, dict[str, Any]]:
    """Rebuild a predictor saved by ``save_checkpoint``, in eval mode on ``device``.

    Returns:
        The model and the ``meta`` dict stored with it.

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        ValueError: when the file is not a relation predictor checkpoint of a known
            version, or its weights do not fit its configuration.
    """
    path = Path(path)
    device = resolve_device(device)
    if not path.is_file():
        raise FileNotFoundError(f"relation predictor checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
        raise ValueError(f"cannot read {path} as a relation predictor checkpoint: {error}") from error
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a relation predictor checkpoint (format {CHECKPOINT_FORMAT!r} missing)")
    if checkpoint.get("version") != CHECKPOINT_VERSION:
        raise ValueError(
            f"{path} has checkpoint version {checkpoint.get('version')!r}; this code reads version "
            f"{CHECKPOINT_VERSION} only, so retrain it with `cmsei-prep train-relations`"
        )

    try:
        model = RelationPredictor(**checkpoint["config"])
        model.load_state_dict(checkpoint["state_dict"])
    except (KeyError, TypeError, RuntimeError) as error:
        raise ValueError(f"{path}: the weights do not match the stored configuration: {error}") from error
    return model.to(device).eval(), dict(checkpoint.get("meta") or {})


def _check_training_settings(epochs: int, lr: float, negative_ratio: float, images_per_batch: int) -> None:
    if int(epochs) != epochs or epochs < 1:
        raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be positive, got {lr!r}")
    if not (math.isfinite(negative_ratio) and negative_ratio >= 0):
        raise ValueError(f"negative_ratio must be zero or more, got {negative_ratio!r}")
    if int(images_per_batch) != images_per_batch or images_per_batch < 1:
        raise ValueError(f"images_per_batch must be a positive integer, got {images_per_batch!r}")


def _prepare_sample(
    sample: Mapping[str, Any],
    index: int,
    feature_dim: int | None,
    num_object_classes: int,
    num_predicates: int,
) -> _Image:
    """Validate one sample dict and convert it to tensors.

    Raises:
        ValueError: naming the sample index and the invalid field.
    """
    missing = [key for key in ("features", "object_ids", "boxes", "image_size", "relations") if key not in sample]
    if missing:
        raise ValueError(f"sample {index} lacks {missing}; see graphs.train_relations for the sample layout")

    raw_features = np.asarray(sample["features"])
    features = torch.as_tensor(raw_features if raw_features.dtype == np.float16 else raw_features.astype(np.float32))
    count = features.shape[0] if features.ndim == 2 else -1
    if count < 0 or (feature_dim is not None and features.shape[1] != feature_dim):
        raise ValueError(f"sample {index}: features must have shape (R, {feature_dim or 'D'}), got {tuple(features.shape)}")
    raw_object_ids = np.asarray(sample["object_ids"])
    raw_relations = np.asarray(sample["relations"])
    if raw_relations.size == 0:
        raw_relations = np.zeros((0, 3), dtype=np.int64)
    object_ids = torch.as_tensor(raw_object_ids.astype(np.int64))
    boxes = torch.as_tensor(np.asarray(sample["boxes"], dtype=np.float32))
    image_size = torch.as_tensor(np.asarray(sample["image_size"], dtype=np.float32))
    relations = torch.as_tensor(raw_relations.astype(np.int64))

    problem = None
    if raw_object_ids.size and not np.issubdtype(raw_object_ids.dtype, np.integer):
        problem = f"object_ids must be integers, got dtype {raw_object_ids.dtype}"
    elif raw_relations.ndim != 2 or raw_relations.shape[1] != 3 or not np.issubdtype(raw_relations.dtype, np.integer):
        problem = f"relations must be (T, 3) integers, got dtype {raw_relations.dtype} shape {raw_relations.shape}"
    elif tuple(object_ids.shape) != (count,):
        problem = f"object_ids must have shape ({count},), got {tuple(object_ids.shape)}"
    elif tuple(boxes.shape) != (count, 4):
        problem = f"boxes must have shape ({count}, 4), got {tuple(boxes.shape)}"
    elif tuple(image_size.shape) != (2,) or not (image_size > 0).all():
        problem = f"image_size must be a positive (height, width), got {image_size.tolist()}"
    elif not (torch.isfinite(features).all() and torch.isfinite(boxes).all()):
        problem = "features or boxes contain NaN or infinity"
    elif count and (object_ids.min() < 0 or object_ids.max() >= num_object_classes):
        problem = f"object ids must lie in 0..{num_object_classes - 1}, got {object_ids.min()}..{object_ids.max()}"
    elif relations.numel() and (relations[:, :2].min() < 0 or relations[:, :2].max() >= count):
        problem = f"relation rows must lie in 0..{count - 1}"
    elif relations.numel() and (relations[:, 0] == relations[:, 1]).any():
        problem = "a relation has the same region as subject and object"
    elif relations.numel() and (relations[:, 2].min() < 1 or relations[:, 2].max() >= num_predicates):
        problem = f"relation predicates must lie in 1..{num_predicates - 1} (0 is background)"
    if problem:
        raise ValueError(f"sample {index}: {problem}")

    relations = torch.unique(relations, dim=0)
    related = torch.zeros((count, count), dtype=torch.bool)
    related[relations[:, 0], relations[:, 1]] = True
    related.fill_diagonal_(True)
    unrelated = torch.nonzero(~related)
    return _Image(features, object_ids, boxes, image_size, relations, unrelated)


def _negative_count(image: _Image, negative_ratio: float) -> int:
    requested = math.ceil(negative_ratio * max(1, image.relations.shape[0]))
    return min(requested, image.unrelated.shape[0])


def _frequency_table(
    images: list[_Image], num_object_classes: int, num_predicates: int, negative_ratio: float, smoothing: float
) -> tuple[np.ndarray, np.ndarray]:
    """Count predicates per class pair key and return (keys, smoothed log probabilities)."""
    keys, predicates, weights = [], [], []
    for image in images:
        classes = image.object_ids.numpy()
        relations = image.relations.numpy()
        keys.append(classes[relations[:, 0]] * num_object_classes + classes[relations[:, 1]])
        predicates.append(relations[:, 2])
        weights.append(np.ones(relations.shape[0]))
        if image.unrelated.shape[0]:
            unrelated = image.unrelated.numpy()
            keys.append(classes[unrelated[:, 0]] * num_object_classes + classes[unrelated[:, 1]])
            predicates.append(np.zeros(unrelated.shape[0], dtype=np.int64))
            weights.append(np.full(unrelated.shape[0], _negative_count(image, negative_ratio) / unrelated.shape[0]))
    keys_all = np.concatenate(keys) if keys else np.zeros(0, np.int64)
    predicates_all = np.concatenate(predicates) if predicates else np.zeros(0, np.int64)
    weights_all = np.concatenate(weights) if weights else np.zeros(0)

    related_keys = np.unique(keys_all[predicates_all > 0])
    rows = np.searchsorted(related_keys, keys_all)
    member = rows < related_keys.shape[0]
    member[member] = related_keys[rows[member]] == keys_all[member]
    rows[~member] = related_keys.shape[0]

    counts = np.zeros((related_keys.shape[0] + 1, num_predicates), dtype=np.float64)
    np.add.at(counts, (rows, predicates_all), weights_all)
    overall = (counts.sum(axis=0) + 1.0) / (counts.sum() + num_predicates)
    probabilities = (counts + smoothing * overall) / (counts.sum(axis=1, keepdims=True) + smoothing)
    return related_keys.astype(np.int64), np.log(probabilities).astype(np.float32)


def _training_batch(
    images: list[_Image], negative_ratio: float, rng: np.random.Generator, device: torch.device
) -> tuple[tuple[torch.Tensor, ...], torch.Tensor, int]:
    """Concatenate images into one forward pass: all relations plus sampled negatives.

    Returns:
        (features, object_ids, pairs, geometry) on ``device``, the (T,) int64 labels
        and the number of negatives.
    """
    pair_rows, labels, sizes = [], [], []
    offset, negatives = 0, 0
    for image in images:
        chosen = rng.choice(image.unrelated.shape[0], _negative_count(image, negative_ratio), replace=False)
        negative_pairs = image.unrelated[torch.from_numpy(chosen).long()]
        image_pairs = torch.cat([image.relations[:, :2], negative_pairs]) + offset
        pair_rows.append(image_pairs)
        labels.append(torch.cat([image.relations[:, 2], torch.zeros(negative_pairs.shape[0], dtype=torch.long)]))
        sizes.append(image.image_size.expand(image_pairs.shape[0], 2))
        offset += image.features.shape[0]
        negatives += negative_pairs.shape[0]

    boxes = torch.cat([image.boxes for image in images]).to(device)
    pairs = torch.cat(pair_rows).to(device)
    inputs = (
        torch.cat([image.features for image in images]).to(device=device, dtype=torch.float32),
        torch.cat([image.object_ids for image in images]).to(device),
        pairs,
        pair_geometry(boxes, pairs, torch.cat(sizes).to(device)),
    )
    return inputs, torch.cat(labels).to(device), negatives
