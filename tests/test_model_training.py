"""Tests that a small CMSEI model learns a synthetic retrieval task and can be evaluated.

Each synthetic image shows three of ten concepts: three regions carry a noisy prototype
feature of one concept each and a fourth region is noise. Its caption lists the word ids of
the three concepts in random order. Training on such pairs must lower the loss, and the
trained model must rank held-out images with new concept combinations better than chance.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from cmsei_model.config import CMSEIConfig
from cmsei_model.evaluate import recall_metrics, similarity_matrix
from cmsei_model.loss import triplet_ranking_loss, use_hardest_negative
from cmsei_model.model import CMSEI

FEATURE_DIM = 48
N_CONCEPTS = 10
FIRST_CONCEPT_WORD = 4  # ids 0-3 are <pad>, <start>, <end>, <unk> as in the SCAN vocabularies
VOCAB_SIZE = FIRST_CONCEPT_WORD + N_CONCEPTS
NUM_PREDICATES = 5



pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_task(combinations: list[tuple[int, ...]], seed: int) -> tuple[dict, dict]:
    """Build image and caption inputs for the given concept combinations, one caption each."""
    generator = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(N_CONCEPTS, FEATURE_DIM, generator=torch.Generator().manual_seed(1234))
    n_images = len(combinations)
    k = 4

    features = torch.randn(n_images, k, FEATURE_DIM, generator=generator)
    concepts = torch.tensor(combinations)
    features[:, :3] = prototypes[concepts] + 0.3 * torch.randn(n_images, 3, FEATURE_DIM, generator=generator)
    corners = torch.rand(n_images, k, 2, generator=generator) * 0.5
    images = {
        "features": features,
        "region_mask": torch.ones(n_images, k, dtype=torch.bool),
        "boxes_norm": torch.cat([corners, corners + 0.4], dim=-1),
        "spatial_labels": torch.randint(0, 12, (n_images, k, k), generator=generator, dtype=torch.uint8),
        "sg_edges": torch.tensor([[0, 1], [1, 2]]).expand(n_images, 2, 2).clone(),
        "sg_predicates": torch.randint(1, NUM_PREDICATES, (n_images, 2), generator=generator),
        "sg_scores": torch.ones(n_images, 2),
        "sg_mask": torch.ones(n_images, 2, dtype=torch.bool),
    }

    order = torch.argsort(torch.rand(n_images, 3, generator=generator), dim=1)
    token_ids = torch.gather(concepts, 1, order) + FIRST_CONCEPT_WORD
    captions = {"token_ids": token_ids, "lengths": torch.full((n_images,), 3)}
    return images, captions


def split_combinations() -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
    combinations = list(itertools.combinations(range(N_CONCEPTS), 3))
    order = np.random.default_rng(0).permutation(len(combinations))
    shuffled = [combinations[i] for i in order]
    return shuffled[:48], shuffled[48:64]


def batch_loss(model: CMSEI, images: dict, captions: dict, hardest: bool) -> torch.Tensor:
    return triplet_ranking_loss(model(**images, **captions), margin=0.2, hardest_negative=hardest)


def test_training_lowers_loss_and_beats_chance():
    torch.manual_seed(0)
    config = CMSEIConfig(
        feature_dim=FEATURE_DIM,
        embed_dim=32,
        word_dim=24,
        predicate_dim=24,
        num_predicates=NUM_PREDICATES,
    )
    model = CMSEI(config, VOCAB_SIZE)
    train, held_out = split_combinations()
    train_images, train_captions = make_task(train, seed=1)
    test_images, test_captions = make_task(held_out, seed=2)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)

    with torch.no_grad():
        initial_loss = batch_loss(model, train_images, train_captions, hardest=False).item()

    for step in range(60):
        batch = slice((step % 3) * 16, (step % 3 + 1) * 16)
        images = {key: value[batch] for key, value in train_images.items()}
        captions = {key: value[batch] for key, value in train_captions.items()}
        loss = batch_loss(model, images, captions, hardest=use_hardest_negative(step // 3, 10))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    model.eval()
    with torch.no_grad():
        final_loss = batch_loss(model, train_images, train_captions, hardest=False).item()
        encoded_images = model.encode_images(**test_images)
        encoded_captions = model.encode_captions(**test_captions)
    scores = similarity_matrix(model, encoded_images, encoded_captions, 5, 7)
    metrics = recall_metrics(scores, captions_per_image=1)

    assert final_loss < 0.5 * initial_loss
    # Chance R@1 on 16 held-out pairs is 6.25 %; an untrained model gets 0 and 6.25 here.
    assert metrics["t2i_r1"] >= 37.5
    assert metrics["i2t_r1"] >= 37.5


def test_similarity_matrix_matches_model_similarity():
    torch.manual_seed(0)
    config = CMSEIConfig(feature_dim=FEATURE_DIM, embed_dim=16, word_dim=8, predicate_dim=8, num_predicates=NUM_PREDICATES)
    model = CMSEI(config, VOCAB_SIZE).eval()
    images, captions = make_task(split_combinations()[1][:6], seed=3)

    with torch.no_grad():
        encoded_images = model.encode_images(**images)
        encoded_captions = model.encode_captions(**captions)
        expected = model.similarity(encoded_images, encoded_captions).numpy()
    blockwise = similarity_matrix(model, encoded_images, encoded_captions, image_block_size=4, caption_block_size=5)

    assert blockwise.shape == (6, 6)
    assert blockwise.dtype == np.float32
    np.testing.assert_allclose(blockwise, expected, atol=1e-6)
    with pytest.raises(ValueError, match="block sizes"):
        similarity_matrix(model, encoded_images, encoded_captions, image_block_size=0)
