"""Tests of the pair-scoring shortcuts: precomputed pair terms, the Gram or context choice in
fragment alignment, the CPU tanh and the cache-sized CPU chunks.

Each shortcut is checked against the plain computation it replaces, in float64 on the CPU.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cmsei_model.alignment import fast_tanh, fragment_alignment, l2_normalize
from cmsei_model.config import CMSEIConfig
from cmsei_model.evaluate import cpu_pairs_per_chunk, similarity_matrix
from cmsei_model.model import CMSEI, CaptionEmbedding, ImageEmbedding

DIM = 16
VOCAB_SIZE = 30


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def random_images(count: int, k: int, seed: int, dim: int = DIM) -> ImageEmbedding:
    """Unit-norm random images; image 0 has two padded regions."""
    generator = torch.Generator().manual_seed(seed)
    regions = l2_normalize(torch.randn(count, k, dim, generator=generator, dtype=torch.float64))
    mask = torch.ones(count, k, dtype=torch.bool)
    mask[0, k - 2 :] = False
    regions = regions * mask[..., None]
    vector = l2_normalize(torch.randn(count, dim, generator=generator, dtype=torch.float64))
    return ImageEmbedding(regions, mask, vector)


def random_captions(count: int, n: int, seed: int, dim: int = DIM) -> CaptionEmbedding:
    """Unit-norm random captions of 1 to n words."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, n + 1, (count,), generator=generator)
    mask = torch.arange(n)[None] < lengths[:, None]
    words = l2_normalize(torch.randn(count, n, dim, generator=generator, dtype=torch.float64))
    words = words * mask[..., None]
    sentence = l2_normalize(torch.randn(count, dim, generator=generator, dtype=torch.float64))
    return CaptionEmbedding(words, mask, sentence)


def build_model(**overrides) -> CMSEI:
    torch.manual_seed(0)
    config = CMSEIConfig(feature_dim=20, embed_dim=DIM, word_dim=12, predicate_dim=12, num_predicates=5,
                         max_pairs_per_chunk=7, **overrides)
    return CMSEI(config, VOCAB_SIZE).double().eval()


def test_fast_tanh_matches_tanh():
    x = torch.linspace(-30.0, 30.0, 4001, dtype=torch.float32)
    assert torch.allclose(fast_tanh(x), torch.tanh(x), rtol=0.0, atol=3e-7)
    assert torch.allclose(fast_tanh(x.double()), torch.tanh(x.double()), rtol=0.0, atol=1e-14)

    copy = x.clone()
    result = fast_tanh(copy, inplace=True)
    assert result.data_ptr() == copy.data_ptr()
    assert torch.allclose(copy, torch.tanh(x), rtol=0.0, atol=3e-7)


def test_fast_tanh_gradient_matches_tanh():
    x = torch.linspace(-4.0, 4.0, 101, dtype=torch.float64, requires_grad=True)
    (gradient,) = torch.autograd.grad(fast_tanh(x).sum(), x)
    assert torch.allclose(gradient, 1.0 - torch.tanh(x.detach()) ** 2, atol=1e-12)


def naive_alignment(words, word_mask, regions, region_mask, temperature, directions, lse_lambda):
    """Fragment alignment written pair by pair, building every attended context."""
    n_images = max(regions.shape[0], 1)
    n_captions = max(words.shape[1], 1)
    result = torch.empty(n_images, n_captions, dtype=torch.float64)
    for b in range(n_images):
        for c in range(n_captions):
            w = words[min(b, words.shape[0] - 1), c][word_mask[c]]
            v = regions[b, min(c, regions.shape[1] - 1)][region_mask[b]]
            pooled = []
            for queries, keys in ((w, v), (v, w))[: 1 if directions == "t2i" else 2]:
                attention = torch.softmax(temperature * queries @ keys.T, dim=-1)
                context = attention @ keys
                fragment = F.cosine_similarity(queries, context, dim=-1)
                pooled.append(torch.logsumexp(lse_lambda * fragment, dim=0) / lse_lambda)
            result[b, c] = pooled[0] if len(pooled) == 1 else 0.5 * (pooled[0] + pooled[1])
    return result


@pytest.mark.parametrize(
    "shared, k, n",
    [
        ("none", 9, 4),  # context branch for words, Gram branch for regions
        ("none", 3, 8),  # the reverse
        ("regions", 9, 4),  # regions shared by all captions: Gram branch for words
        ("words", 3, 8),  # words shared by all images: Gram branch for regions
    ],
)
@pytest.mark.parametrize("directions", ["t2i", "both"])
def test_fragment_alignment_matches_naive_pairs(shared, k, n, directions):
    images = random_images(3, k, seed=1)
    captions = random_captions(4, n, seed=2)
    regions = images.regions[:, None] if shared == "regions" else None
    words = captions.words[None] if shared == "words" else None

    generator = torch.Generator().manual_seed(3)
    if regions is None:
        noise = torch.randn(3, 4, k, DIM, generator=generator, dtype=torch.float64)
        regions = l2_normalize(images.regions[:, None] + 0.3 * noise)
    if words is None:
        noise = torch.randn(3, 4, n, DIM, generator=generator, dtype=torch.float64)
        words = l2_normalize(captions.words[None] + 0.3 * noise)

    fast = fragment_alignment(words, captions.word_mask, regions, images.region_mask, 9.0, directions, "lse", 6.0)
    naive = naive_alignment(words, captions.word_mask, regions, images.region_mask, 9.0, directions, 6.0)
    assert torch.allclose(fast, naive, atol=1e-10)


@pytest.mark.parametrize("grad", [False, True])
def test_prepared_terms_do_not_change_similarity(grad):
    model = build_model()
    images = random_images(5, 6, seed=4)
    captions = random_captions(7, 5, seed=5)
    with torch.set_grad_enabled(grad):
        plain = torch.cat([model._score_pairs(images.slice(i, i + 1), captions) for i in range(5)])
        prepared = model.similarity(model.prepare_images(images), model.prepare_captions(captions))
    assert torch.allclose(plain, prepared, atol=1e-12)


def test_prepare_fills_terms_once():
    model = build_model()
    images = model.prepare_images(random_images(2, 4, seed=6))
    captions = model.prepare_captions(random_captions(3, 5, seed=7))
    assert images.fusion_terms.shape == (2, 4, 4 * DIM)
    assert captions.fusion_terms.shape == (3, 5, 4 * DIM)
    assert captions.guidance.shape == (3, DIM)
    assert model.prepare_images(images) is images
    assert model.prepare_captions(captions) is captions
    assert images.slice(1, 2).fusion_terms.shape == (1, 4, 4 * DIM)


def test_prepare_skips_disabled_components():
    baseline = build_model(interaction=False, cross_level=False, spatial_graph=False, semantic_graph=False)
    images = random_images(2, 4, seed=6)
    captions = random_captions(3, 5, seed=7)
    assert baseline.prepare_images(images) is images
    assert baseline.prepare_captions(captions) is captions


def test_no_grad_fusion_equals_autograd_fusion():
    model = build_model()
    images = random_images(4, 6, seed=8)
    captions = random_captions(5, 7, seed=9)
    with torch.no_grad():
        without = model.similarity(images, captions)
    with torch.enable_grad():
        with_grad = model.similarity(images, captions)
    assert torch.allclose(without, with_grad.detach(), atol=1e-12)


def test_cpu_pairs_per_chunk_follows_pair_size():
    full = cpu_pairs_per_chunk(
        ImageEmbedding(torch.zeros(1, 36, 1024), torch.ones(1, 36, dtype=torch.bool), torch.zeros(1, 1024)),
        CaptionEmbedding(torch.zeros(1, 12, 1024), torch.ones(1, 12, dtype=torch.bool), torch.zeros(1, 1024)),
    )
    assert full == 32
    small = cpu_pairs_per_chunk(random_images(1, 4, seed=0), random_captions(1, 4, seed=0))
    assert small == 12 * 1024 * 1024 // (8 * 2 * DIM * 8)
    huge = cpu_pairs_per_chunk(
        ImageEmbedding(torch.zeros(1, 1000, 4096), torch.ones(1, 1000, dtype=torch.bool), torch.zeros(1, 4096)),
        CaptionEmbedding(torch.zeros(1, 1000, 4096), torch.ones(1, 1000, dtype=torch.bool), torch.zeros(1, 4096)),
    )
    assert huge == 1


@pytest.mark.parametrize("chunk", [None, 1, 5])
def test_similarity_matrix_blocks_equal_one_pass(chunk):
    model = build_model()
    images = random_images(7, 5, seed=10)
    captions = random_captions(11, 6, seed=11)
    with torch.no_grad():
        expected = model.similarity(images, captions, max_pairs_per_chunk=1000).numpy()
    scores = similarity_matrix(model, images, captions, image_block_size=3, caption_block_size=4,
                               max_pairs_per_chunk=chunk)
    assert scores.shape == (7, 11)
    assert abs(scores - expected).max() < 1e-6
    assert images.fusion_terms is None
    assert captions.fusion_terms is None
