"""Encode the images and captions of a split once, then score and rank them by protocol.

Shape shorthand: N images, C captions, k regions (the most of any image of the split),
n words (the longest caption of the split), d embedding size.

Protocols:
- "5k": every image of the split and all its captions (the whole COCO 5K test set, or the
  whole Flickr30K 1K test set).
- "1k": the first `fold_size` (1,000) images of the split and their captions.
- "coco-5fold": the mean over 5 consecutive folds of `fold_size` images (COCO 1K). Only the
  5 diagonal blocks of the similarity matrix are scored.

The embeddings stay on the CPU in float32, (N, k, d) for the images and (C, n, d) for the
captions. Scoring moves one block at a time to the model's device, and `CMSEI.similarity`
keeps the activations of at most `max_pairs_per_chunk` pairs at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from cmsei_model.data import (
    CaptionDataset,
    ImageDataset,
    Reader,
    collate_captions,
    collate_images,
    image_table,
)
from cmsei_model.evaluate import recall_metrics_by_image, similarity_matrix
from cmsei_model.model import CMSEI, CaptionEmbedding, ImageEmbedding

logger = logging.getLogger(__name__)

EmbeddingT = TypeVar("EmbeddingT", ImageEmbedding, CaptionEmbedding)

PROTOCOLS = ("1k", "5k", "coco-5fold")
COCO_FOLDS = 5


@dataclass
class EncodedSplit:
    """A split encoded once.

    Attributes:
        images: N encoded images on the CPU, in `image_table` order.
        captions: C encoded captions on the CPU, grouped by image in image order.
        caption_images: (C,) int64 image index of every caption.
        image_ids: N image ids.
        seconds: time spent encoding.
    """

    images: ImageEmbedding
    captions: CaptionEmbedding
    caption_images: np.ndarray
    image_ids: list[str]
    seconds: float


def autocast_context(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Return `torch.autocast` for `dtype` on `device`, or a context that does nothing for None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def encode_split(
    model: CMSEI,
    reader: Reader,
    pairs: pd.DataFrame,
    device: torch.device,
    batch_size: int = 128,
    loader_workers: int = 0,
    autocast_dtype: torch.dtype | None = None,
) -> EncodedSplit:
    """Encode every image and every caption of `pairs` once.

    Args:
        model: the model, already on `device`; it is put in eval mode.
        reader: reads items from the shards.
        pairs: the pairs of the split, grouped by image (as `build_pair_index` orders them).
        device: where to run the encoders.
        batch_size: images or captions per encoder batch.
        loader_workers: DataLoader worker processes.
        autocast_dtype: run the encoders under autocast with this dtype; None runs fp32.

    Raises:
        ValueError: when `pairs` is empty.
    """
    if pairs.empty:
        raise ValueError("cannot encode an empty split")
    started = time.perf_counter()
    model.eval()
    images = image_table(pairs)
    position = {image_id: index for index, image_id in enumerate(images["image_id"])}
    caption_images = pairs["image_id"].map(position).to_numpy(np.int64)
    order = np.argsort(caption_images, kind="stable")
    pairs = pairs.iloc[order].reset_index(drop=True)
    caption_images = caption_images[order]

    image_loader = _loader(ImageDataset(reader, images), collate_images, batch_size, loader_workers, device)
    image_embedding = _encode_images(model, image_loader, device, autocast_dtype)
    caption_loader = _loader(CaptionDataset(reader, pairs), collate_captions, batch_size, loader_workers, device)
    caption_embedding = _encode_captions(model, caption_loader, device, autocast_dtype)

    seconds = time.perf_counter() - started
    logger.info("encoded %d images and %d captions in %.1f s", len(images), len(pairs), seconds)
    return EncodedSplit(image_embedding, caption_embedding, caption_images, list(images["image_id"]), seconds)


def _loader(dataset: Any, collate: Any, batch_size: int, workers: int, device: torch.device) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=device.type == "cuda",
    )


def _encode_images(
    model: CMSEI, loader: DataLoader, device: torch.device, autocast_dtype: torch.dtype | None
) -> ImageEmbedding:
    blocks: list[ImageEmbedding] = []
    for batch in loader:
        with autocast_context(device, autocast_dtype):
            encoded = model.encode_images(**batch.to(device, non_blocking=True).as_kwargs())
        blocks.append(ImageEmbedding(encoded.regions.float().cpu(), encoded.region_mask.cpu(),
                                     encoded.image_vector.float().cpu()))
    return _concat_padded(blocks)


def _encode_captions(
    model: CMSEI, loader: DataLoader, device: torch.device, autocast_dtype: torch.dtype | None
) -> CaptionEmbedding:
    blocks: list[CaptionEmbedding] = []
    for batch in loader:
        with autocast_context(device, autocast_dtype):
            encoded = model.encode_captions(batch.token_ids.to(device), batch.lengths.to(device))
        blocks.append(CaptionEmbedding(encoded.words.float().cpu(), encoded.word_mask.cpu(),
                                       encoded.sentence.float().cpu()))
    return _concat_padded(blocks)


def _concat_padded(blocks: list[EmbeddingT]) -> EmbeddingT:
    """Concatenate embedding blocks along dim 0, zero-padding the other dims to their largest size.

    Batches pad regions and words to their own longest item, so k and n differ between
    blocks. Fields whose other dims agree (the image and sentence vectors) need no padding.
    """
    values = {}
    for field in dataclasses.fields(blocks[0]):
        parts = [getattr(block, field.name) for block in blocks]
        if parts[0] is None:
            values[field.name] = None
            continue

        trailing = [max(part.shape[dim] for part in parts) for dim in range(1, parts[0].dim())]
        merged = parts[0].new_zeros([sum(len(part) for part in parts), *trailing])
        start = 0
        for part in parts:
            merged[(slice(start, start + len(part)), *(slice(0, size) for size in part.shape[1:]))] = part
            start += len(part)
        values[field.name] = merged
    return type(blocks[0])(**values)


@dataclass
class ScoringOptions:
    """Block sizes and precision of `evaluate_encoded`.

    Attributes:
        image_block_size: images moved to the device per block.
        caption_block_size: captions moved to the device per block.
        max_pairs_per_chunk: pairs scored at once inside a block; None uses the model's setting.
        autocast_dtype: score under autocast with this dtype; None scores in fp32.
        progress: show a progress bar of scored pairs.
    """

    image_block_size: int = 128
    caption_block_size: int = 1024
    max_pairs_per_chunk: int | None = None
    autocast_dtype: torch.dtype | None = None
    progress: bool = False


def evaluate_encoded(
    model: CMSEI,
    encoded: EncodedSplit,
    protocol: str = "5k",
    fold_size: int = 1000,
    scoring: ScoringOptions | None = None,
) -> dict[str, Any]:
    """Score an encoded split and compute its recall metrics under `protocol`.

    Args:
        model: the model that encoded the split.
        encoded: `encode_split` output.
        protocol: "5k", "1k" or "coco-5fold" (see the module docstring).
        fold_size: images per fold for "1k" and "coco-5fold".
        scoring: block sizes and precision.

    Returns:
        {"metrics": recall metrics (means over folds for "coco-5fold"), "num_images",
        "num_captions", "pairs_scored", "seconds", "pairs_per_s", "protocol"}.

    Raises:
        ValueError: for an unknown protocol, or fewer images than the protocol needs.
    """
    scoring = scoring or ScoringOptions()
    folds = _protocol_folds(protocol, len(encoded.images), fold_size)
    device = next(model.parameters()).device
    model.eval()

    started = time.perf_counter()
    fold_metrics = []
    pairs_scored = 0
    caption_count = 0
    for image_slice in folds:
        caption_slice = _caption_slice(encoded.caption_images, image_slice)
        images = encoded.images.slice(image_slice.start, image_slice.stop)
        captions = encoded.captions.slice(caption_slice.start, caption_slice.stop)
        with autocast_context(device, scoring.autocast_dtype):
            scores = similarity_matrix(model, images, captions, scoring.image_block_size,
                                       scoring.caption_block_size, scoring.max_pairs_per_chunk,
                                       scoring.progress)
        owners = encoded.caption_images[caption_slice] - image_slice.start
        fold_metrics.append(recall_metrics_by_image(scores, owners))
        pairs_scored += scores.size
        caption_count += len(captions)
    seconds = time.perf_counter() - started

    metrics = {name: float(np.mean([values[name] for values in fold_metrics])) for name in fold_metrics[0]}
    return {
        "protocol": protocol,
        "metrics": metrics,
        "num_images": sum(image_slice.stop - image_slice.start for image_slice in folds),
        "num_captions": caption_count,
        "num_folds": len(folds),
        "pairs_scored": int(pairs_scored),
        "seconds": seconds,
        "pairs_per_s": pairs_scored / seconds if seconds > 0 else float("nan"),
    }


def _protocol_folds(protocol: str, n_images: int, fold_size: int) -> list[slice]:
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; use one of {PROTOCOLS}")
    if fold_size < 1:
        raise ValueError(f"fold size must be >= 1, got {fold_size}")
    if protocol == "5k":
        return [slice(0, n_images)]

    folds = 1 if protocol == "1k" else COCO_FOLDS
    needed = folds * fold_size
    if n_images < needed:
        raise ValueError(
            f"protocol {protocol!r} needs {needed} images ({folds} x {fold_size}), the split has {n_images}; "
            f"use --protocol 5k to score all images or a smaller --fold-size"
        )
    if n_images > needed:
        logger.warning("protocol %s uses the first %d of %d images", protocol, needed, n_images)
    return [slice(fold * fold_size, (fold + 1) * fold_size) for fold in range(folds)]


def _caption_slice(caption_images: np.ndarray, image_slice: slice) -> slice:
    """Return the contiguous caption range of the images in `image_slice` (captions are grouped by image)."""
    start = int(np.searchsorted(caption_images, image_slice.start, side="left"))
    stop = int(np.searchsorted(caption_images, image_slice.stop, side="left"))
    return slice(start, stop)
