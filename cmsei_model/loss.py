"""Bidirectional hinge triplet ranking loss over a batch similarity matrix.

Shape shorthand: B matching image-caption pairs, so the (B, B) similarity S has the positive
pairs on its diagonal. With margin alpha:

    image-to-text cost  c_ij = max(0, alpha - S_ii + S_ij)   caption j != i is a negative of image i
    text-to-image cost  c'_ij = max(0, alpha - S_jj + S_ij)  image i != j is a negative of caption j

All negatives: the loss is the sum of both costs over all negatives. Hardest negative
(VSE++, Faghri et al. 2018): only the largest cost per image and per caption counts. The
loss is summed over the batch, as in the ContrastiveLoss of SCAN (kuanghuei/SCAN, model.py).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)


def triplet_ranking_loss(
    similarity: torch.Tensor,
    margin: float = 0.2,
    hardest_negative: bool = False,
    image_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Compute the bidirectional hinge triplet loss.

    Args:
        similarity: (B, B) float scores, row i = image i, column j = caption j; the diagonal
            contains the positive pairs.
        margin: hinge margin alpha, >= 0.
        hardest_negative: keep only the hardest negative per image and per caption instead of
            summing over all negatives.
        image_ids: optional (B,) ids of the images of the batch. Off-diagonal pairs with the
            same id show the same image, so they are not counted as negatives. Without it,
            every off-diagonal pair is a negative.

    Returns:
        Scalar loss, summed over the batch.

    Raises:
        ValueError: when `similarity` is not square, `image_ids` has the wrong shape, or
            `margin` is negative.
    """
    if similarity.dim() != 2 or similarity.shape[0] != similarity.shape[1]:
        raise ValueError(
            f"similarity must be a square (B, B) matrix with positives on the diagonal, got shape "
            f"{tuple(similarity.shape)}"
        )
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")

    batch = similarity.shape[0]
    positives = similarity.diagonal()
    negative_mask = ~torch.eye(batch, dtype=torch.bool, device=similarity.device)
    if image_ids is not None:
        if tuple(image_ids.shape) != (batch,):
            raise ValueError(f"image_ids must have shape ({batch},), got {tuple(image_ids.shape)}")
        same_image = image_ids[:, None] == image_ids[None, :]
        negative_mask = negative_mask & ~same_image.to(similarity.device)

    cost_caption = (margin + similarity - positives[:, None]).clamp(min=0)
    cost_image = (margin + similarity - positives[None, :]).clamp(min=0)
    cost_caption = cost_caption.masked_fill(~negative_mask, 0.0)
    cost_image = cost_image.masked_fill(~negative_mask, 0.0)

    if hardest_negative:
        return cost_caption.max(dim=1).values.sum() + cost_image.max(dim=0).values.sum()
    return cost_caption.sum() + cost_image.sum()


def use_hardest_negative(epoch: int, warmup_epochs: int) -> bool:
    """Return whether epoch `epoch` (counted from 0) uses the hardest negative.

    The first `warmup_epochs` epochs sum over all negatives, and every later epoch uses the
    hardest negative.
    """
    return epoch >= warmup_epochs


class ContrastiveLoss(nn.Module):
    """Module form of `triplet_ranking_loss`, with a switch for the hardest negative.

    Args:
        margin: hinge margin, >= 0.
        hardest_negative: initial setting; change the attribute between epochs.
    """

    def __init__(self, margin: float = 0.2, hardest_negative: bool = False) -> None:
        super().__init__()
        if margin < 0:
            raise ValueError(f"margin must be >= 0, got {margin}")
        self.margin = margin
        self.hardest_negative = hardest_negative

    def forward(
        self, similarity: torch.Tensor, image_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Return the loss of a (B, B) similarity matrix; see `triplet_ranking_loss`."""
        return triplet_ranking_loss(similarity, self.margin, self.hardest_negative, image_ids)
