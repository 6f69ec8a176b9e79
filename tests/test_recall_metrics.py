"""Tests of the recall metrics on hand-computed matrices and against a loop reference."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from cmsei_model.evaluate import (
    coco_1k_folds,
    image_to_text_ranks,
    recall_metrics,
    text_to_image_ranks,
)

RECALL_KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")


def reference_ranks(similarity: np.ndarray, captions_per_image: int) -> tuple[np.ndarray, np.ndarray]:
    """Loop over queries as the SCAN evaluation code does, with a stable argsort."""
    n_images = similarity.shape[0]
    i2t = np.zeros(n_images, dtype=np.int64)
    for image in range(n_images):
        order = np.argsort(similarity[image], kind="stable")[::-1]
        own = range(captions_per_image * image, captions_per_image * (image + 1))
        i2t[image] = min(np.where(order == caption)[0][0] for caption in own)

    t2i = np.zeros(similarity.shape[1], dtype=np.int64)
    for caption in range(similarity.shape[1]):
        order = np.argsort(similarity[:, caption], kind="stable")[::-1]
        t2i[caption] = np.where(order == caption // captions_per_image)[0][0]
    return i2t, t2i


# 3 images x 5 captions. Image 0: its caption 0 ranks 1st and caption 1 ranks 7th, so its
# rank is 0. Image 1: its best caption (5) ranks 6th. Image 2: its best caption (10) ranks 11th.
I2T_MATRIX = np.array(
    [
        [1.00, 0.50, 0.00, -0.1, -0.2, 0.90, 0.85, 0.80, 0.75, 0.70, 0.30, 0.20, 0.10, 0.05, 0.01],
        [0.90, 0.80, 0.70, 0.65, 0.30, 0.60, 0.10, 0.00, -0.1, -0.2, 0.95, 0.20, 0.15, 0.12, 0.11],
        [0.90, 0.85, 0.80, 0.75, 0.70, 0.65, 0.62, 0.60, 0.58, 0.55, 0.50, 0.40, 0.30, 0.20, 0.10],
    ]
)

# 6 images x 6 captions, one caption per image; column c is caption c.
T2I_MATRIX = np.array(
    [
        # c0    c1    c2    c3    c4    c5
        [0.10, 0.20, 0.90, 0.00, 0.50, 0.30],
        [0.90, 0.95, 0.80, 0.00, 0.60, 0.30],
        [0.80, 0.10, 0.70, 0.00, 0.70, 0.30],
        [0.70, 0.10, 0.10, 0.50, 0.80, 0.30],
        [0.60, 0.10, 0.10, 0.00, 0.40, 0.30],
        [0.50, 0.10, 0.10, 0.00, 0.90, 0.90],
    ]
)


def test_i2t_best_caption_counts():
    ranks = image_to_text_ranks(I2T_MATRIX, captions_per_image=5)

    assert ranks.tolist() == [0, 5, 10]


def test_i2t_recall_hand_computed():
    metrics = recall_metrics(I2T_MATRIX, captions_per_image=5)

    assert metrics["i2t_r1"] == pytest.approx(100 / 3)
    assert metrics["i2t_r5"] == pytest.approx(100 / 3)
    assert metrics["i2t_r10"] == pytest.approx(200 / 3)
    assert metrics["i2t_medr"] == 6.0
    assert metrics["i2t_meanr"] == 6.0


def test_t2i_caption_whose_image_ranks_sixth():
    ranks = text_to_image_ranks(T2I_MATRIX, captions_per_image=1)

    assert ranks.tolist() == [5, 0, 2, 0, 5, 0]


def test_t2i_recall_hand_computed():
    metrics = recall_metrics(T2I_MATRIX, captions_per_image=1)

    assert metrics["t2i_r1"] == pytest.approx(50.0)
    assert metrics["t2i_r5"] == pytest.approx(400 / 6)
    assert metrics["t2i_r10"] == pytest.approx(100.0)
    assert metrics["t2i_medr"] == 2.0
    assert metrics["t2i_meanr"] == 3.0


def test_rsum_is_sum_of_recalls():
    metrics = recall_metrics(T2I_MATRIX, captions_per_image=1)

    assert metrics["rsum"] == pytest.approx(sum(metrics[key] for key in RECALL_KEYS))
    assert set(metrics) == set(RECALL_KEYS) | {"rsum", "i2t_medr", "i2t_meanr", "t2i_medr", "t2i_meanr"}


def block_matrix(n_images: int, captions_per_image: int, own: float, other: float) -> np.ndarray:
    matrix = np.full((n_images, n_images * captions_per_image), other, dtype=np.float32)
    blocks = matrix.reshape(n_images, n_images, captions_per_image)
    blocks[np.arange(n_images), np.arange(n_images)] = own
    return matrix


def test_perfect_matrix():
    metrics = recall_metrics(block_matrix(20, 5, own=1.0, other=0.0), captions_per_image=5)

    for key in RECALL_KEYS:
        assert metrics[key] == 100.0, key
    assert metrics["rsum"] == 600.0
    for key in ("i2t_medr", "i2t_meanr", "t2i_medr", "t2i_meanr"):
        assert metrics[key] == 1.0, key


def test_reversed_matrix():
    matrix = block_matrix(20, 5, own=0.0, other=1.0)

    metrics = recall_metrics(matrix, captions_per_image=5)

    for key in RECALL_KEYS:
        assert metrics[key] == 0.0, key
    # Each image's last caption is its best: the 95 other captions are all higher.
    assert image_to_text_ranks(matrix, 5).tolist() == [95] * 20
    assert metrics["i2t_medr"] == 96.0
    assert metrics["t2i_medr"] == 20.0
    assert metrics["t2i_meanr"] == 20.0


def test_ties_follow_reversed_stable_argsort():
    tied = np.full((2, 2), 0.5)

    # np.argsort([0.5, 0.5], kind="stable")[::-1] == [1, 0]: the higher index comes first.
    assert image_to_text_ranks(tied, 1).tolist() == [1, 0]
    assert text_to_image_ranks(tied, 1).tolist() == [1, 0]
    metrics = recall_metrics(tied, captions_per_image=1)
    assert metrics["i2t_r1"] == 50.0
    assert metrics["t2i_r1"] == 50.0


def test_ties_between_positive_and_higher_index_negative():
    # Image 0's only caption ties with caption 2 (higher index) and beats caption 1.
    matrix = np.array(
        [
            [0.7, 0.1, 0.7],
            [0.0, 0.9, 0.0],
            [0.7, 0.0, 0.3],
        ]
    )

    assert image_to_text_ranks(matrix, 1).tolist() == [1, 0, 1]
    # Caption 0: images 0 and 2 tie at 0.7, and image 2 has the higher index.
    assert text_to_image_ranks(matrix, 1).tolist() == [1, 0, 1]


@settings(max_examples=60, deadline=None)
@given(
    captions_per_image=st.integers(1, 4),
    data=st.data(),
)
def test_matches_loop_reference(captions_per_image, data):
    n_images = data.draw(st.integers(1, 7))
    matrix = data.draw(
        arrays(np.float32, (n_images, n_images * captions_per_image), elements=st.sampled_from([0.0, 0.25, 0.5, 1.0]))
    )

    i2t, t2i = reference_ranks(matrix, captions_per_image)

    np.testing.assert_array_equal(image_to_text_ranks(matrix, captions_per_image), i2t)
    np.testing.assert_array_equal(text_to_image_ranks(matrix, captions_per_image), t2i)


def test_matches_loop_reference_on_larger_random_matrix():
    matrix = np.random.default_rng(0).normal(size=(60, 300)).astype(np.float32)

    i2t, t2i = reference_ranks(matrix, 5)

    np.testing.assert_array_equal(image_to_text_ranks(matrix, 5), i2t)
    np.testing.assert_array_equal(text_to_image_ranks(matrix, 5), t2i)


INVALID_MATRICES = [
    ("one dim", np.zeros(10), 5, "2-D"),
    ("three dims", np.zeros((2, 10, 1)), 5, "2-D"),
    ("too few columns", np.zeros((2, 9)), 5, "need 10 columns"),
    ("too many columns", np.zeros((2, 11)), 5, "need 10 columns"),
    ("transposed", np.zeros((10, 2)), 5, "need 50 columns"),
    ("no rows", np.zeros((0, 0)), 5, "no rows"),
    ("nan", np.array([[0.0, np.nan]]), 2, "NaN or infinite"),
    ("inf", np.array([[0.0, np.inf]]), 2, "NaN or infinite"),
    ("zero captions per image", np.zeros((2, 2)), 0, "captions_per_image"),
    ("strings", np.array([["a", "b"]]), 2, "real numbers"),
]


@pytest.mark.parametrize("case, matrix, per_image, message", INVALID_MATRICES, ids=[c[0] for c in INVALID_MATRICES])
def test_rejects_invalid_matrix(case, matrix, per_image, message):
    with pytest.raises(ValueError, match=message):
        recall_metrics(matrix, captions_per_image=per_image)


def test_coco_1k_folds_average_diagonal_blocks():
    matrix = np.random.default_rng(1).normal(size=(12, 36))
    fold_metrics = [recall_metrics(matrix[f * 4 : (f + 1) * 4, f * 12 : (f + 1) * 12], 3) for f in range(3)]

    result = coco_1k_folds(matrix, n_folds=3, captions_per_image=3, fold_size=4)

    for key, value in result.items():
        assert value == pytest.approx(np.mean([m[key] for m in fold_metrics])), key
    assert set(result) == set(fold_metrics[0])


def test_coco_1k_folds_fetches_diagonal_blocks():
    matrix = np.random.default_rng(2).normal(size=(12, 36))
    requested = []

    def similarity_block(images: slice, captions: slice) -> np.ndarray:
        requested.append((images.start, images.stop, captions.start, captions.stop))
        return matrix[images, captions]

    from_function = coco_1k_folds(similarity_block, n_folds=3, captions_per_image=3, fold_size=4, n_images=12)

    assert requested == [(0, 4, 0, 12), (4, 8, 12, 24), (8, 12, 24, 36)]
    assert from_function == coco_1k_folds(matrix, n_folds=3, captions_per_image=3, fold_size=4)


def test_coco_1k_folds_perfect_5k_layout():
    matrix = block_matrix(5000, 5, own=1.0, other=0.0)

    result = coco_1k_folds(matrix)

    assert result["rsum"] == 600.0
    assert recall_metrics(matrix)["rsum"] == 600.0


def test_coco_1k_folds_rejects_too_few_images():
    with pytest.raises(ValueError, match="need 5000 images, got 12"):
        coco_1k_folds(np.zeros((12, 60)))
    with pytest.raises(ValueError, match="n_images is required"):
        coco_1k_folds(lambda images, captions: np.zeros((4, 20)), fold_size=4)
