"""Tests of the bidirectional hinge triplet loss on hand-computed matrices."""

from __future__ import annotations

import pytest
import torch

from cmsei_model.loss import ContrastiveLoss, triplet_ranking_loss, use_hardest_negative

# Rows are images and columns captions. The diagonal contains the positives 0.9, 0.7 and 0.4.
HAND_MATRIX = torch.tensor(
    [
        [0.90, 0.50, 0.80],
        [0.30, 0.70, 0.60],
        [0.85, 0.35, 0.40],
    ],
    dtype=torch.float64,
)
# With margin 0.2, the costs max(0, 0.2 + S_ij - S_ii) of negative captions j per image i:
#   image 0: 0.0 (caption 1), 0.1 (caption 2)
#   image 1: 0.0 (caption 0), 0.1 (caption 2)
#   image 2: 0.65 (caption 0), 0.15 (caption 1)
# and the costs max(0, 0.2 + S_ij - S_jj) of negative images i per caption j:
#   caption 0: 0.0 (image 1), 0.15 (image 2)
#   caption 1: 0.0 (image 0), 0.0 (image 2)
#   caption 2: 0.6 (image 0), 0.4 (image 1)
ALL_NEGATIVES = (0.1 + 0.1 + 0.65 + 0.15) + (0.15 + 0.6 + 0.4)
HARDEST_NEGATIVES = (0.1 + 0.1 + 0.65) + (0.15 + 0.0 + 0.6)


def test_all_negatives_hand_computed():
    loss = triplet_ranking_loss(HAND_MATRIX, margin=0.2, hardest_negative=False)

    assert loss.item() == pytest.approx(ALL_NEGATIVES, abs=1e-12)
    assert ALL_NEGATIVES == pytest.approx(2.15)


def test_hardest_negative_hand_computed():
    loss = triplet_ranking_loss(HAND_MATRIX, margin=0.2, hardest_negative=True)

    assert loss.item() == pytest.approx(HARDEST_NEGATIVES, abs=1e-12)
    assert HARDEST_NEGATIVES == pytest.approx(1.6)


def test_zero_when_positives_beat_negatives_by_margin():
    similarity = torch.full((4, 4), 0.25, dtype=torch.float64)
    similarity.fill_diagonal_(0.5)

    for hardest in (False, True):
        loss = triplet_ranking_loss(similarity, margin=0.2, hardest_negative=hardest)
        assert loss.item() == 0.0


def test_positive_when_a_negative_is_within_margin():
    similarity = torch.full((4, 4), 0.25, dtype=torch.float64)
    similarity.fill_diagonal_(0.5)
    similarity[1, 3] = 0.35

    for hardest in (False, True):
        loss = triplet_ranking_loss(similarity, margin=0.2, hardest_negative=hardest)
        # Caption 3 is a negative for image 1 (cost 0.05) and image 1 for caption 3 (cost 0.05).
        assert loss.item() == pytest.approx(0.1, abs=1e-12)


def test_image_ids_exclude_same_image_pairs():
    similarity = HAND_MATRIX.clone()
    same_image = torch.tensor([7, 7, 9])

    loss = triplet_ranking_loss(similarity, margin=0.2, image_ids=same_image)

    # Pairs (0, 1) and (1, 0) no longer count; their costs were 0, so only the others remain.
    assert loss.item() == pytest.approx(ALL_NEGATIVES, abs=1e-12)
    similarity[0, 1] = 0.95
    with_ids = triplet_ranking_loss(similarity, margin=0.2, image_ids=same_image)
    without_ids = triplet_ranking_loss(similarity, margin=0.2)
    assert with_ids.item() == pytest.approx(ALL_NEGATIVES, abs=1e-12)
    assert without_ids.item() > with_ids.item()


def test_gradient_pushes_positives_up_and_negatives_down():
    similarity = HAND_MATRIX.clone().requires_grad_(True)

    triplet_ranking_loss(similarity, margin=0.2).backward()

    assert torch.all(similarity.grad.diagonal() <= 0)
    assert similarity.grad[2, 2] < 0
    assert similarity.grad[0, 2] > 0


def test_module_switches_negatives():
    criterion = ContrastiveLoss(margin=0.2)

    assert criterion(HAND_MATRIX).item() == pytest.approx(ALL_NEGATIVES, abs=1e-12)
    criterion.hardest_negative = True
    assert criterion(HAND_MATRIX).item() == pytest.approx(HARDEST_NEGATIVES, abs=1e-12)


def test_warmup_schedule():
    assert [use_hardest_negative(epoch, warmup_epochs=1) for epoch in range(3)] == [False, True, True]
    assert use_hardest_negative(0, warmup_epochs=0)


def test_rejects_invalid_input():
    with pytest.raises(ValueError, match="square"):
        triplet_ranking_loss(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="square"):
        triplet_ranking_loss(torch.zeros(4))
    with pytest.raises(ValueError, match="margin"):
        triplet_ranking_loss(torch.zeros(2, 2), margin=-0.1)
    with pytest.raises(ValueError, match="image_ids"):
        triplet_ranking_loss(torch.zeros(2, 2), image_ids=torch.tensor([1, 2, 3]))
