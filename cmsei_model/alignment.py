"""Fragment alignment: each word or region against its attended context, pooled per pair.

Also contains the masked softmax, mean and normalisation helpers that the other modules share.

Shape shorthand: B images, c captions in the current chunk, k regions, n words, d features.
Pair tensors carry the leading dims (B, c). A side that does not depend on the pair is passed
with a singleton dim, (B, 1, k, d) for regions or (1, c, n, d) for words, and broadcasts.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

NORM_EPS = 1e-8


def _floor(value: float, dtype: torch.dtype) -> float:
    """Return `value`, raised to the smallest normal number of `dtype` where it would underflow."""
    return max(value, torch.finfo(dtype).tiny)


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """Scale each vector along the last dim to unit L2 norm (zero vectors stay zero)."""
    return F.normalize(x, p=2.0, dim=-1, eps=_floor(NORM_EPS, x.dtype))


def fast_tanh(x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """tanh(x), computed on the CPU as 2 * sigmoid(2x) - 1.

    On the CPU torch's vectorised tanh takes several times as long as sigmoid, and the fused
    words and regions of every pair pass through it. The identity agrees with tanh to within
    2e-7. Other devices call torch.tanh.

    Args:
        x: float tensor.
        inplace: overwrite `x` with the result; only valid when autograd does not need `x`.
    """
    if x.device.type != "cpu":
        return x.tanh_() if inplace else torch.tanh(x)
    if inplace:
        return x.mul_(2.0).sigmoid_().mul_(2.0).sub_(1.0)
    return torch.sigmoid(2.0 * x) * 2.0 - 1.0


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Softmax over `dim` in which masked-out entries get zero weight.

    A row whose entries are all masked out gets uniform weights instead of NaN, so padded
    rows stay finite. Callers must ignore those rows.

    Args:
        scores: float tensor of any shape.
        mask: bool tensor broadcastable to `scores`, True for entries that take part.
        dim: the dim to normalise over.
    """
    lowest = torch.finfo(scores.dtype).min
    filled = scores.masked_fill(~mask, lowest)
    return torch.softmax(filled, dim=dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int) -> torch.Tensor:
    """Mean of `values` over `dim`, counting only entries where `mask` is True.

    Args:
        values: float tensor, for example (C, n, d).
        mask: bool tensor with the shape of `values` up to and including `dim`, for example
            (C, n). Rows without any True entry give zeros.
        dim: the dim to average over, counted in `mask`'s dims.
    """
    weights = mask.to(values.dtype)
    while weights.dim() < values.dim():
        weights = weights.unsqueeze(-1)
    total = (values * weights).sum(dim=dim)
    count = weights.sum(dim=dim).clamp(min=1.0)
    return total / count


def pool_fragment_scores(
    scores: torch.Tensor, mask: torch.Tensor, pooling: str, lse_lambda: float
) -> torch.Tensor:
    """Pool per-fragment scores into one score per pair.

    LogSumExp pooling returns (1 / lambda) * log(sum_i exp(lambda * r_i)) over the valid
    fragments, as in SCAN. Mean pooling returns their mean.

    Args:
        scores: (..., m) float fragment scores.
        mask: bool, broadcastable to `scores`; every row must have at least one True entry.
        pooling: "lse" or "mean".
        lse_lambda: LogSumExp sharpness, > 0.

    Raises:
        ValueError: for an unknown `pooling`.
    """
    mask = mask.expand_as(scores)
    if pooling == "lse":
        scaled = (scores * lse_lambda).masked_fill(~mask, float("-inf"))
        return torch.logsumexp(scaled, dim=-1) / lse_lambda
    if pooling == "mean":
        return masked_mean(scores, mask, dim=-1)
    raise ValueError(f"unknown pooling {pooling!r}; use 'lse' or 'mean'")


def _context_cosine(
    attention: torch.Tensor, cosine: torch.Tensor, keys: torch.Tensor
) -> torch.Tensor:
    """Cosine between each unit-norm query and its attended context.

    For unit-norm queries q_i and keys v_j with context c_i = sum_j a_ij v_j, the dot product
    is q_i . c_i = sum_j a_ij cos_ij, so only |c_i| needs the keys. It comes either from the
    context itself, m * k * d multiply-adds per pair, or from the key Gram matrix G as
    |c_i|^2 = a_i G a_i^T, k * k * d per distinct key set plus m * k * k per pair. The
    cheaper way for the given shapes is taken. That is mostly the Gram matrix when all
    captions (or images) of a chunk share the keys or when there are fewer keys than queries.

    Args:
        attention: (..., m, k) attention weights of m queries over k keys.
        cosine: (..., m, k) cosine scores between the queries and the keys.
        keys: (..., k, d) unit-norm keys; the leading dims broadcast against `attention`'s.
    """
    dot = (attention * cosine).sum(dim=-1)

    queries, key_count = attention.shape[-2:]
    dim = keys.shape[-1]
    pairs = attention[..., 0, 0].numel()
    key_sets = keys[..., 0, 0].numel()
    gram_cost = key_sets * key_count * key_count * dim + pairs * queries * key_count * key_count
    context_cost = pairs * queries * key_count * dim

    if gram_cost <= context_cost:
        gram = torch.matmul(keys, keys.transpose(-1, -2))
        squared_norm = (torch.matmul(attention, gram) * attention).sum(dim=-1)
        norm = squared_norm.clamp(min=_floor(NORM_EPS**2, squared_norm.dtype)).sqrt()
    else:
        context = torch.matmul(attention, keys)
        norm = torch.linalg.vector_norm(context, dim=-1).clamp(min=_floor(NORM_EPS, dot.dtype))
    return dot / norm


def fragment_alignment(
    words: torch.Tensor,
    word_mask: torch.Tensor,
    regions: torch.Tensor,
    region_mask: torch.Tensor,
    temperature: float,
    directions: str,
    pooling: str,
    lse_lambda: float,
) -> torch.Tensor:
    """Score every pair by aligning each fragment with its attended context.

    Text-to-image ("t2i"): word i attends to the regions with
    a_ij = softmax_j(temperature * cos(w_i, v_j)), and scores r_i = cos(w_i, sum_j a_ij v_j).
    Image-to-text ("i2t") swaps the roles. The fragment scores are pooled per pair, and
    "both" averages the two pooled scores.

    Args:
        words: (B or 1, c, n, d) unit-norm word features.
        word_mask: (c, n) bool, True for real words.
        regions: (B, c or 1, k, d) unit-norm region features.
        region_mask: (B, k) bool, True for real regions.
        temperature: inverse softmax temperature, > 0.
        directions: "t2i", "i2t" or "both".
        pooling: "lse" or "mean".
        lse_lambda: LogSumExp sharpness.

    Returns:
        (B, c) float similarity.

    Raises:
        ValueError: for an unknown `directions` or `pooling`.
    """
    if directions not in ("t2i", "i2t", "both"):
        raise ValueError(f"unknown alignment directions {directions!r}; use 't2i', 'i2t' or 'both'")

    cosine = torch.matmul(words, regions.transpose(-1, -2))
    word_mask_pair = word_mask[None, :, :]
    region_mask_pair = region_mask[:, None, :]
    pooled = []

    if directions in ("t2i", "both"):
        attention = masked_softmax(temperature * cosine, region_mask_pair[:, :, None, :])
        word_scores = _context_cosine(attention, cosine, regions)
        pooled.append(pool_fragment_scores(word_scores, word_mask_pair, pooling, lse_lambda))

    if directions in ("i2t", "both"):
        cosine_t = cosine.transpose(-1, -2)
        attention = masked_softmax(temperature * cosine_t, word_mask_pair[:, :, None, :])
        region_scores = _context_cosine(attention, cosine_t, words)
        pooled.append(pool_fragment_scores(region_scores, region_mask_pair, pooling, lse_lambda))

    if len(pooled) == 1:
        return pooled[0]
    return 0.5 * (pooled[0] + pooled[1])
