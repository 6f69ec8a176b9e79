"""Recall@K evaluation of image-sentence retrieval, following SCAN's evaluation.py (kuanghuei/SCAN).

Shape shorthand: N images, C = N * captions_per_image captions, caption c describes image
c // captions_per_image.

Ranks count from 0 in the list sorted by descending score:
  * image-to-text (i2t): the rank of an image is the best (lowest) rank among its captions;
  * text-to-image (t2i): the rank of a caption is the rank of its image.
R@K is the percentage of queries with rank < K. Median and mean ranks are reported 1-based
(floor(median) + 1 and mean + 1), as SCAN reports them.

Ties: SCAN ranks with `np.argsort(scores)[::-1]`, whose order among equal scores depends on
the sort that numpy picks. This module fixes it to the stable version of that expression,
`np.argsort(scores, kind="stable")[::-1]`: among equal scores the item with the higher
index comes first. So a positive tied with k items of higher index is ranked k places lower.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch
from tqdm import tqdm

from cmsei_model.model import CMSEI, CaptionEmbedding, ImageEmbedding

logger = logging.getLogger(__name__)

RECALL_KS = (1, 5, 10)
# Maximum number of booleans compared at once while ranking (about 64 MB).
_COMPARISON_BLOCK = 64 * 1024 * 1024
# Bytes of pair tensors per chunk when scoring on the CPU (see `cpu_pairs_per_chunk`).
_CPU_CHUNK_BYTES = 12 * 1024 * 1024

SimilarityBlockFn = Callable[[slice, slice], np.ndarray]


def _fixed_count_owners(similarity: np.ndarray, captions_per_image: int) -> tuple[np.ndarray, np.ndarray]:
    """Return `similarity` as an array and its caption-to-image map, c // captions_per_image.

    Checks only what the fixed caption count adds: the count itself and the column count. The
    `*_by_image` functions that receive the map check the dtype and the values.
    """
    if not isinstance(captions_per_image, (int, np.integer)) or captions_per_image < 1:
        raise ValueError(f"captions_per_image must be a positive integer, got {captions_per_image!r}")

    scores = np.asarray(similarity)
    if scores.ndim != 2:
        raise ValueError(
            f"similarity must be a 2-D (n_images, n_captions) array, got {scores.ndim} dims "
            f"with shape {scores.shape}"
        )
    n_images, n_captions = scores.shape
    if n_images == 0:
        raise ValueError("similarity has no rows; evaluate at least one image")
    if n_captions != n_images * captions_per_image:
        raise ValueError(
            f"similarity has shape {scores.shape} but {n_images} images with "
            f"{captions_per_image} captions each need {n_images * captions_per_image} columns; "
            f"pass captions in image order, exactly {captions_per_image} per image"
        )
    return scores, np.arange(n_captions) // captions_per_image


def image_to_text_ranks(similarity: np.ndarray, captions_per_image: int = 5) -> np.ndarray:
    """Return the 0-based i2t rank of each image: the best rank among its captions.

    Args:
        similarity: (N, N * captions_per_image) finite scores.
        captions_per_image: captions per image.

    Returns:
        (N,) int64 ranks.

    Raises:
        ValueError: for an invalid shape or non-finite values.
    """
    return image_to_text_ranks_by_image(*_fixed_count_owners(similarity, captions_per_image))


def text_to_image_ranks(similarity: np.ndarray, captions_per_image: int = 5) -> np.ndarray:
    """Return the 0-based t2i rank of each caption: the rank of its image.

    Args:
        similarity: (N, N * captions_per_image) finite scores.
        captions_per_image: captions per image.

    Returns:
        (N * captions_per_image,) int64 ranks.

    Raises:
        ValueError: for an invalid shape or non-finite values.
    """
    return text_to_image_ranks_by_image(*_fixed_count_owners(similarity, captions_per_image))


def _rank_summary(ranks: np.ndarray, prefix: str) -> dict[str, float]:
    metrics = {f"{prefix}_r{k}": 100.0 * float(np.mean(ranks < k)) for k in RECALL_KS}
    metrics[f"{prefix}_medr"] = float(np.floor(np.median(ranks)) + 1)
    metrics[f"{prefix}_meanr"] = float(ranks.mean() + 1)
    return metrics


def recall_metrics(similarity: np.ndarray, captions_per_image: int = 5) -> dict[str, float]:
    """Compute R@1, R@5, R@10 in both directions, their sum and the median and mean ranks.

    Args:
        similarity: (n_images, n_captions) finite scores, caption c belonging to image
            c // captions_per_image.
        captions_per_image: captions per image, >= 1.

    Returns:
        Keys i2t_r1, i2t_r5, i2t_r10, t2i_r1, t2i_r5, t2i_r10 (percent), rsum (their sum),
        i2t_medr, i2t_meanr, t2i_medr, t2i_meanr (1-based ranks).

    Raises:
        ValueError: when `similarity` is not 2-D, its column count is not
            n_images * captions_per_image, or it contains NaN or infinite values.
    """
    return recall_metrics_by_image(*_fixed_count_owners(similarity, captions_per_image))


def _validate_caption_images(similarity: np.ndarray, caption_images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return the score matrix and the caption-to-image map after checking both."""
    scores = np.asarray(similarity)
    if scores.ndim != 2:
        raise ValueError(
            f"similarity must be a 2-D (n_images, n_captions) array, got {scores.ndim} dims "
            f"with shape {scores.shape}"
        )
    n_images, n_captions = scores.shape

    owners = np.asarray(caption_images)
    if owners.shape != (n_captions,) or not np.issubdtype(owners.dtype, np.integer):
        raise ValueError(
            f"caption_images must be ({n_captions},) integers, one image index per similarity column, "
            f"got shape {owners.shape} and dtype {owners.dtype}"
        )
    if n_images == 0:
        raise ValueError("similarity has no rows; evaluate at least one image")
    if n_captions and (owners.min() < 0 or owners.max() >= n_images):
        raise ValueError(
            f"caption_images contains values in [{owners.min()}, {owners.max()}] outside [0, {n_images - 1}]"
        )

    counts = np.bincount(owners, minlength=n_images)
    if np.any(counts == 0):
        raise ValueError(
            f"images {np.flatnonzero(counts == 0)[:10].tolist()} have no caption; every image needs at least one"
        )

    if not np.issubdtype(scores.dtype, np.number) or np.issubdtype(scores.dtype, np.complexfloating):
        raise ValueError(f"similarity must contain real numbers, got dtype {scores.dtype}")
    if not np.isfinite(scores).all():
        bad = np.argwhere(~np.isfinite(scores))[:5].tolist()
        raise ValueError(f"similarity contains NaN or infinite values, first at (row, column) {bad}")
    return scores, owners.astype(np.int64)


def image_to_text_ranks_by_image(similarity: np.ndarray, caption_images: np.ndarray) -> np.ndarray:
    """Return the 0-based i2t rank of each image for any caption-to-image map.

    Same rule and tie order as `image_to_text_ranks`: the rank of an image is the best rank
    among its captions, and among equal scores the higher column ranks first.

    Args:
        similarity: (N, C) finite scores.
        caption_images: (C,) int, the image of every caption; every image needs one caption.

    Returns:
        (N,) int64 ranks.

    Raises:
        ValueError: for an invalid shape, map or non-finite values.
    """
    scores, owners = _validate_caption_images(similarity, caption_images)
    n_images, n_captions = scores.shape
    ranks = np.empty(n_images, dtype=np.int64)
    column_index = np.arange(n_captions)
    block = max(1, _COMPARISON_BLOCK // max(n_captions, 1))

    for start in range(0, n_images, block):
        rows = scores[start : start + block]
        image_index = np.arange(start, start + rows.shape[0])
        own = owners[None, :] == image_index[:, None]
        best_score = np.where(own, rows, -np.inf).max(axis=1)
        is_best = own & (rows == best_score[:, None])
        best_column = n_captions - 1 - np.argmax(is_best[:, ::-1], axis=1)

        higher = rows > best_score[:, None]
        tied_before = (rows == best_score[:, None]) & (column_index[None, :] > best_column[:, None])
        ranks[start : start + rows.shape[0]] = higher.sum(axis=1) + tied_before.sum(axis=1)
    return ranks


def text_to_image_ranks_by_image(similarity: np.ndarray, caption_images: np.ndarray) -> np.ndarray:
    """Return the 0-based t2i rank of each caption (the rank of its image) for any caption-to-image map.

    Args:
        similarity: (N, C) finite scores.
        caption_images: (C,) int, the image of every caption.

    Returns:
        (C,) int64 ranks.

    Raises:
        ValueError: for an invalid shape, map or non-finite values.
    """
    scores, owners = _validate_caption_images(similarity, caption_images)
    n_images, n_captions = scores.shape
    ranks = np.empty(n_captions, dtype=np.int64)
    image_index = np.arange(n_images)
    block = max(1, _COMPARISON_BLOCK // n_images)

    for start in range(0, n_captions, block):
        columns = scores[:, start : start + block]
        target_image = owners[start : start + columns.shape[1]]
        target_scores = columns[target_image, np.arange(columns.shape[1])]
        higher = columns > target_scores[None, :]
        tied_before = (columns == target_scores[None, :]) & (image_index[:, None] > target_image[None, :])
        ranks[start : start + columns.shape[1]] = higher.sum(axis=0) + tied_before.sum(axis=0)
    return ranks


def recall_metrics_by_image(similarity: np.ndarray, caption_images: np.ndarray) -> dict[str, float]:
    """Compute the keys of `recall_metrics` when images have different caption counts.

    Caption c belongs to image `caption_images[c]`, in any order. With exactly m captions per
    image in image order (`caption_images = arange(C) // m`) the result equals
    `recall_metrics(similarity, m)`.

    Args:
        similarity: (N, C) finite scores.
        caption_images: (C,) int image index of every caption; every image needs one caption.

    Returns:
        i2t_r1, i2t_r5, i2t_r10, t2i_r1, t2i_r5, t2i_r10 (percent), rsum, and the 1-based
        median and mean ranks of both directions.

    Raises:
        ValueError: for an invalid shape, map or non-finite values.
    """
    i2t = _rank_summary(image_to_text_ranks_by_image(similarity, caption_images), "i2t")
    t2i = _rank_summary(text_to_image_ranks_by_image(similarity, caption_images), "t2i")

    metrics = {f"i2t_r{k}": i2t[f"i2t_r{k}"] for k in RECALL_KS}
    metrics.update({f"t2i_r{k}": t2i[f"t2i_r{k}"] for k in RECALL_KS})
    metrics["rsum"] = sum(metrics.values())
    for name in ("i2t_medr", "i2t_meanr"):
        metrics[name] = i2t[name]
    for name in ("t2i_medr", "t2i_meanr"):
        metrics[name] = t2i[name]
    return metrics


def coco_1k_folds(
    similarity: np.ndarray | SimilarityBlockFn,
    n_folds: int = 5,
    captions_per_image: int = 5,
    fold_size: int = 1000,
    n_images: int | None = None,
) -> dict[str, float]:
    """Average `recall_metrics` over folds of `fold_size` images and their captions (COCO 1K).

    Fold f contains images [f * fold_size, (f + 1) * fold_size) and their captions. The COCO 5K
    numbers are `recall_metrics` of the whole matrix.

    Args:
        similarity: the full (N, N * captions_per_image) score matrix, or a function that takes
            an image slice and a caption slice and returns that block of scores, so only the
            diagonal fold blocks need computing.
        n_folds: number of folds.
        captions_per_image: captions per image.
        fold_size: images per fold.
        n_images: N; required when `similarity` is a function, else read from the matrix.

    Returns:
        The mean over the folds of every key of `recall_metrics`.

    Raises:
        ValueError: when there are fewer than n_folds * fold_size images, `n_images` is missing
            for a function, or a fold block is invalid for `recall_metrics`.
    """
    if n_folds < 1 or fold_size < 1:
        raise ValueError(f"n_folds and fold_size must be >= 1, got {n_folds} and {fold_size}")

    if callable(similarity):
        if n_images is None:
            raise ValueError("n_images is required when similarity is a function of (image slice, caption slice)")
        total_images = n_images
        fetch_block = similarity
    else:
        matrix = np.asarray(similarity)
        if matrix.ndim != 2:
            raise ValueError(f"similarity must be a 2-D array, got shape {matrix.shape}")
        total_images = matrix.shape[0]

        def fetch_block(images: slice, captions: slice) -> np.ndarray:
            return matrix[images, captions]

    needed = n_folds * fold_size
    if total_images < needed:
        raise ValueError(
            f"{n_folds} folds of {fold_size} images need {needed} images, got {total_images}; "
            f"lower n_folds or fold_size"
        )
    if total_images > needed:
        logger.warning("coco_1k_folds uses the first %d of %d images", needed, total_images)

    fold_metrics = []
    for fold in range(n_folds):
        images = slice(fold * fold_size, (fold + 1) * fold_size)
        captions = slice(images.start * captions_per_image, images.stop * captions_per_image)
        block = fetch_block(images, captions)
        fold_metrics.append(recall_metrics(block, captions_per_image))

    return {name: float(np.mean([m[name] for m in fold_metrics])) for name in fold_metrics[0]}


def cpu_pairs_per_chunk(images: ImageEmbedding, captions: CaptionEmbedding) -> int:
    """Return how many pairs to score at once on the CPU so that a chunk stays in the cache.

    The interactive attention builds (k + n) fused 2d-dim vectors per pair. Chunks whose
    pair tensors fit in about `_CPU_CHUNK_BYTES` stay in the processor cache between steps.
    A 1,024-dim model with 36 regions and 12 words then scores 32 pairs at a time.
    docs/model.md gives the measured speed of several chunk sizes.
    """
    dim = images.regions.shape[-1]
    fragments = images.regions.shape[1] + captions.words.shape[1]
    bytes_per_pair = fragments * 2 * dim * images.regions.element_size()
    return max(1, _CPU_CHUNK_BYTES // max(bytes_per_pair, 1))


@torch.no_grad()
def similarity_matrix(
    model: CMSEI,
    images: ImageEmbedding,
    captions: CaptionEmbedding,
    image_block_size: int = 128,
    caption_block_size: int = 1024,
    max_pairs_per_chunk: int | None = None,
    progress: bool = False,
) -> np.ndarray:
    """Score every image against every caption block by block, without autograd.

    The terms that every pair of an image or a caption reuses (`CMSEI.prepare_images` and
    `CMSEI.prepare_captions`) are computed once: the image terms for all images first, then
    the caption terms once per caption block, which the outer loop walks. Blocks are moved to
    the model's device, scored with `CMSEI.similarity` and copied back, so `images` and
    `captions` may stay on the CPU. Call `model.eval()` first.

    Args:
        model: the model that encoded `images` and `captions`.
        images: N encoded images, on any device.
        captions: C encoded captions, on any device.
        image_block_size: images per block, >= 1.
        caption_block_size: captions per block, >= 1.
        max_pairs_per_chunk: pairs that `CMSEI.similarity` scores at once; None uses
            `cpu_pairs_per_chunk` on the CPU and the model's `config.max_pairs_per_chunk`
            on other devices.
        progress: show a tqdm bar of scored pairs.

    Returns:
        (N, C) float32 scores.

    Raises:
        ValueError: when a block size is < 1.
    """
    if image_block_size < 1 or caption_block_size < 1:
        raise ValueError(
            f"block sizes must be >= 1, got image_block_size={image_block_size}, "
            f"caption_block_size={caption_block_size}"
        )

    device = next(model.parameters()).device
    if max_pairs_per_chunk is None and device.type == "cpu":
        max_pairs_per_chunk = cpu_pairs_per_chunk(images, captions)
    image_blocks = _prepared_image_blocks(model, images, image_block_size, device)

    scores = np.empty((len(images), len(captions)), dtype=np.float32)
    bar = tqdm(total=scores.size, desc="scoring pairs", unit="pair", unit_scale=True, disable=not progress)
    for caption_start in range(0, len(captions), caption_block_size):
        caption_block = captions.slice(caption_start, caption_start + caption_block_size).to(device)
        caption_block = model.prepare_captions(caption_block)
        caption_stop = caption_start + len(caption_block)
        for image_start, image_block in image_blocks:
            image_block = image_block.to(device)
            image_stop = image_start + len(image_block)
            block = model.similarity(image_block, caption_block, max_pairs_per_chunk)
            scores[image_start:image_stop, caption_start:caption_stop] = block.float().cpu().numpy()
            bar.update(block.numel())
    bar.close()
    return scores


def _prepared_image_blocks(
    model: CMSEI, images: ImageEmbedding, block_size: int, device: torch.device
) -> list[tuple[int, ImageEmbedding]]:
    """Return (first image, block) pairs whose blocks carry their pair terms, on the images' device."""
    blocks = []
    for start in range(0, len(images), block_size):
        block = images.slice(start, start + block_size)
        prepared = model.prepare_images(block.to(device))
        blocks.append((start, prepared.to(block.regions.device)))
    return blocks
